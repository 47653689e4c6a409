//! The kernel backend (`data.backend: nftables`): data bytes never enter
//! user space.
//!
//! Here: a plan's shape and the elements it amounts to; in `claims`, what a
//! plan holds in the table and the claims that outlive it; in `conntrack`,
//! the watcher that follows each plan's connection.
//!
//! For a plan whose two legs are one listen and one connect of the same
//! address family (PASV→PASV, PORT→PORT), the kernel admits the one data
//! connection through a **conntrack expectation** whose master is one of
//! the session's control connections, as the kernel's FTP helper does: the
//! connection is RELATED, so an operator's `ct state established,related
//! accept` admits it and nothing broader is needed. Per plan, on the fast
//! path, two netlink messages to open it; one when its connection comes
//! (the NAT maps' removal: conntrack keeps the translation), and one at its
//! end (an IPCTNL_MSG_CT_GET for the connection's byte counters, which
//! update events do not carry; for a plan closed unused, the maps' removal
//! and the expectation's deletion), all counted in
//! `ftpgate_kernel_netlink_messages_total`:
//!
//! - one `nft` transaction: the `claim` on the announced address and port
//!   (a new connection to it is dropped: no SYN-ACK, no RST), the `once`
//!   element whose timeout (`pinhole_timeout`) bounds the expectation's
//!   life, and the `dnat` and `ksnat` map elements that translate the
//!   connection's first packet (not `nat-follow-master`: see
//!   [`Shape::expectation`]);
//! - one IPCTNL_MSG_EXP_NEW: the expected peer (source port any) to the
//!   announced address and port, on the master the kernel's FTP helper
//!   would use. An active plan's master is the client's connection, which
//!   gets its helper from its first packet's socket: when that packet
//!   reopened a tuple the gateway held in TIME_WAIT, the socket found is
//!   the TIME_WAIT one, which has no mark, and the connection has no
//!   helper. The kernel refuses the expectation (EOPNOTSUPP), and a second
//!   one goes on the gateway's connection to the server. A plan with no
//!   master at all goes to the relay.
//!
//! The kernel deletes the expectation when the connection comes, so a
//! second one is new, and dropped by the claim; a foreign peer never
//! matches it. The expectation's own timeout is its master's helper's (300
//! s): a RELATED connection after `once` expired is dropped by the table's
//! gate, and the gateway deletes an unused expectation when its plan ends,
//! and every waiting one at exit ([`KernelBackend::close`], before the
//! table goes: an expectation does not depend on the table, and would
//! admit its peer, NATed and ungated, after it).
//! Control connections get their helper and the ct mark
//! `data.conntrack_mark` from the table's anchor rules; the data connection
//! inherits the mark, and the watcher reads only the events of marked
//! entries. The helper ("sane") rewrites nothing, but it is no barrier: the
//! peers choose the bytes it reads (a client's own, TLS ciphertext whose
//! keys it holds, a passthrough server's) and can make it expect a
//! connection from the client to any port of the master's responder. The
//! table's `gate` drops every marked RELATED connection that is not a live
//! pinhole's (not in `once`): it, not the helper, is the barrier, for as
//! long as the table exists (an operator's `flush ruleset` removes it).
//!
//! The kernel's expectation table (`nf_conntrack_expect_max`) is shared by
//! every helper of the box: the backend keeps at most half of it waiting
//! ([`expect_cap`]). A plan over that share, or one whose expectation the
//! kernel refuses for want of room, goes to the relay (the router,
//! `Backend::open`, logs it at info).
//!
//! The claim outlives the plan: it is refreshed while the connection runs,
//! and when the plan ends it lingers until its timeout in the kernel (at
//! least `pinhole_timeout` more), or until the port's next plan (kernel or
//! relay, which listens on the port) removes it first. The gateway follows the connection in the kernel's
//! connection tracking table, through its netlink events, with
//! `nf_conntrack_acct` on for byte counts: an entry for the flow means
//! [`DataEvent::Connected`], the entry reaching a FIN state (or going
//! away) means [`DataEvent::Closed`], with the entry's byte counters.
//!
//! A plan follows one conntrack *entry*, not a tuple. Servers that send
//! active-mode data from a fixed port (vsftpd's `connect_from_port_20`,
//! in.ftpd) give every data connection to one gateway port the same tuple,
//! and a port is reused within conntrack's TIME_WAIT (when the pool wraps,
//! after a restart). The kernel then destroys the old entry and creates a
//! new one with the same tuple, in one batch of events. The watcher numbers
//! each entry it sees, and goes by that number: a tuple seen again after its
//! entry was destroyed, announced by a NEW event, with another kernel ID,
//! another reply tuple, or counters that went down, is a new entry, which
//! no earlier plan or process took.
//!
//! Conversion plans (PORT→PASV, PASV→PORT) need the gateway to originate
//! both legs or listen on both, which address translation cannot do; so do
//! plans whose legs differ in address family. [`Shape::of`] says which
//! plans the kernel can carry; the router (`Backend::open`) gives the rest
//! to the relay.

mod claims;
mod conntrack;
mod shape;

pub(crate) use shape::Shape;

use super::{
    Activity, DataEvent, DataFailure, DataOutcome, DataPlan, DataSettings, OpenError, Opened,
    Pinhole, PlanId, PortPool, SessionInfo,
};
use crate::netfilter::conntrack::Expectations;
use crate::netfilter::ctnetlink::{Expectation, Tuple};
use crate::netfilter::{Element, InterceptTable};
use claims::{Claim, Claims, Held, Shared};
pub(crate) use claims::{Messages, NETLINK_MESSAGES, PLANS};
use conntrack::{Conntrack, Flow, Watch};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Turns on per-connection byte counters.
const ACCT: &str = "/proc/sys/net/netfilter/nf_conntrack_acct";
/// The kernel's limit on expectations, for every helper of the box.
const EXPECT_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_expect_max";
/// The kernel's default `nf_conntrack_expect_max` on small machines, for
/// when the sysctl cannot be read.
const EXPECT_MAX_DEFAULT: usize = 256;
/// The kernel's answers when the expectation table is full.
const EMFILE: i32 = rustix::io::Errno::MFILE.raw_os_error();
const ENOSPC: i32 = rustix::io::Errno::NOSPC.raw_os_error();
/// The kernel's answer when the master has no helper.
const EOPNOTSUPP: i32 = rustix::io::Errno::OPNOTSUPP.raw_os_error();

/// The share of `nf_conntrack_expect_max` the backend's waiting
/// expectations may hold: half, so that peers cannot take the whole table
/// from the box's other helpers. Plans over it go to the relay.
fn expect_cap(expect_max: usize) -> usize {
    (expect_max / 2).max(1)
}

/// The kernel refused an expectation for want of room, or the backend's
/// share of the table is used up: the relay carries the plan instead.
#[derive(Debug, thiserror::Error)]
#[error("conntrack expectations full ({0})")]
pub(crate) struct Full(String);

/// No control connection of the session can be the plan's master: the
/// kernel found none with a helper. The relay carries the plan instead.
#[derive(Debug, thiserror::Error)]
#[error("no control connection with the table's helper ({0})")]
pub(crate) struct NoAnchor(String);

/// Whether `e` is [`Full`] or [`NoAnchor`]: the router then gives the plan
/// to the relay.
pub(crate) fn to_relay(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<Full>() || inner.is::<NoAnchor>())
}

/// Expectations created (or being created) and not yet taken by a
/// connection nor deleted, by a number of their own: the gateway deletes
/// each at exit ([`KernelBackend::close`]), since they do not depend on its
/// table. Their count is held to [`KernelBackend::cap`].
#[derive(Debug, Default)]
pub(super) struct Waiting {
    exps: HashMap<u64, Expectation>,
    next: u64,
    /// Set by [`KernelBackend::close`]: no new expectation after it.
    closed: bool,
}

/// Shared by the backend and its plans.
pub(super) type Pending = Arc<Mutex<Waiting>>;

/// Forgets waiting expectation `id`; whether it was still there.
pub(super) fn unwait(pending: &Pending, id: u64) -> Option<Expectation> {
    pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .exps
        .remove(&id)
}

/// The type of the table's `ct helper` anchors (`anchor4`, `anchor6`), as
/// conntrack names the helper of the connections they are set on.
const ANCHOR_HELPER: &str = "sane";

/// Carries out the plans whose [`Shape`] the kernel can NAT.
#[derive(Debug)]
pub struct KernelBackend {
    client_pool: PortPool,
    server_pool: PortPool,
    settings: DataSettings,
    table: Arc<InterceptTable>,
    claims: Arc<Claims>,
    conntrack: Arc<Conntrack>,
    shared: Arc<Shared>,
    expectations: Arc<tokio::sync::Mutex<Expectations>>,
    /// Netlink messages sent for plans, and plans opened.
    messages: Arc<Messages>,
    /// The mark the table's anchor rules look for (see [`KernelBackend::new`]).
    mark: u32,
    /// Plans whose [`Held`] still exists.
    live: Arc<AtomicUsize>,
    /// Expectations waiting for their connection.
    pending: Pending,
    /// The most expectations that may wait at once: half of
    /// `nf_conntrack_expect_max` ([`expect_cap`]).
    pub(super) cap: usize,
    /// `nf_conntrack_expect_max` as read at start.
    expect_max: usize,
    /// Whether the helper of a server (0) and of a client (1) control
    /// connection has been looked at ([`KernelBackend::check_anchor`]).
    anchors_checked: [AtomicBool; 2],
}

impl KernelBackend {
    /// Checks that the kernel can do the job (conntrack events over
    /// netlink, byte accounting on) and builds the backend. Fails with a
    /// plain message otherwise, so that the gateway does not start
    /// half-working. `mark` is `data.conntrack_mark`: the table's anchor
    /// rules set it on the control connections, and only entries with it
    /// are followed.
    pub async fn new(
        client_pool: PortPool,
        server_pool: PortPool,
        settings: DataSettings,
        table: Arc<InterceptTable>,
        mark: u32,
    ) -> io::Result<Self> {
        // Accounting applies to connections created after it is on.
        tokio::fs::write(ACCT, b"1").await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot enable {ACCT} (needs CAP_NET_ADMIN and nf_conntrack): {e}"),
            )
        })?;
        let messages: Arc<Messages> = Arc::default();
        let conntrack = Conntrack::start(mark, messages.clone()).await?;
        let expect_max = match tokio::fs::read_to_string(EXPECT_MAX).await {
            Ok(s) => s.trim().parse().unwrap_or(EXPECT_MAX_DEFAULT),
            Err(e) => {
                tracing::warn!("cannot read {EXPECT_MAX} ({e}): taking {EXPECT_MAX_DEFAULT}");
                EXPECT_MAX_DEFAULT
            }
        };
        let expectations = Expectations::open()
            .map_err(|e| io::Error::new(e.kind(), format!("conntrack expectations: {e}")))?;
        Ok(KernelBackend {
            expectations: Arc::new(tokio::sync::Mutex::new(expectations)),
            messages,
            mark,
            client_pool,
            server_pool,
            settings,
            table,
            claims: Arc::default(),
            conntrack,
            shared: Arc::default(),
            live: Arc::default(),
            pending: Arc::default(),
            cap: expect_cap(expect_max),
            expect_max,
            anchors_checked: Default::default(),
        })
    }

    /// Once per process for each side (the first plan on a server's and
    /// the first on a client's control connection that is still there, one
    /// IPCTNL_MSG_CT_GET each): warns when the control
    /// connection the expectation hangs on has a helper other than the
    /// table's anchor, or a ct mark without the gateway's bits. A rule of
    /// the operator's that was there first (`ct helper set "ftp"`, iptables
    /// `-j CT --helper ftp`) wins over the anchor, and the kernel's FTP
    /// helper then parses the gateway's control text, making expectations
    /// and, with NAT, rewriting it. A rule that sets the whole ct mark
    /// after the anchor takes the gateway's bits from the control
    /// connection and from the data connections that inherit it: the
    /// watcher and the gate then pass them by. What it warned about, if
    /// anything.
    async fn check_anchor(&self, session: u64, on_server: bool, master: Tuple) -> Option<String> {
        let side = usize::from(!on_server);
        if self.anchors_checked[side].swap(true, Ordering::Relaxed) {
            return None;
        }
        self.messages.sent(1);
        let which = if on_server { "server" } else { "client" };
        match self.expectations.lock().await.entry(master).await {
            Ok(Some(conn)) => {
                let mut wrong = Vec::new();
                let helper = conn.helper.as_deref().unwrap_or("none");
                if helper != ANCHOR_HELPER {
                    tracing::warn!(
                        session,
                        helper,
                        "the gateway's {which} control connection {} -> {} does not have the \
                         table's anchor helper \"{ANCHOR_HELPER}\": a rule outside the gateway's \
                         table set another one first; remove that rule's helper assignment (e.g. \
                         ct helper set \"ftp\") for the gateway's control connections, or the \
                         kernel's helper parses the gateway's control text",
                        master.src,
                        master.dst
                    );
                    wrong.push(format!("helper {helper}"));
                }
                let mark = conn.mark.unwrap_or(0);
                if mark & self.mark != self.mark {
                    tracing::warn!(
                        session,
                        "the gateway's {which} control connection {} -> {} has the ct mark \
                         {mark:#010x}, without data.conntrack_mark {:#010x}: a rule outside the \
                         gateway's table overwrote it; its data connections inherit the mark, and \
                         without it the gateway neither follows them nor gates them; make that \
                         rule add its bits (ct mark set ct mark | ...) instead",
                        master.src,
                        master.dst,
                        self.mark
                    );
                    wrong.push(format!("mark {mark:#010x}"));
                }
                (!wrong.is_empty()).then(|| wrong.join(", "))
            }
            // Gone meanwhile (its session ended), or no answer: the side's
            // next plan looks again.
            Ok(None) => {
                self.anchors_checked[side].store(false, Ordering::Relaxed);
                None
            }
            Err(e) => {
                tracing::debug!(
                    session,
                    "conntrack: the {which} control connection's helper: {e}"
                );
                self.anchors_checked[side].store(false, Ordering::Relaxed);
                None
            }
        }
    }

    /// Warns when `nf_conntrack_expect_max` is below two expectations per
    /// session (`limits.max_sessions`): the backend's share of it then
    /// runs out first, and plans over it go to the relay.
    pub fn check_expect_max(&self, max_sessions: usize) {
        if self.expect_max < 2 * max_sessions {
            tracing::warn!(
                expect_max = self.expect_max,
                max_sessions,
                cap = self.cap,
                "net.netfilter.nf_conntrack_expect_max is below 2 x limits.max_sessions: \
                 past {} waiting pinholes, plans go to the relay",
                self.cap
            );
        }
    }

    /// Deletes every expectation still waiting for its connection (one
    /// message each), and lets no plan make another: they outlive the
    /// gateway's table, and would admit their peers, NATed, with nothing
    /// gating them. Call it before the table is destroyed.
    pub async fn close(&self) {
        let waiting: Vec<_> = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            p.closed = true;
            p.exps.drain().map(|(_, e)| e).collect()
        };
        let mut expectations = self.expectations.lock().await;
        for exp in waiting {
            self.messages.sent(1);
            if let Err(e) = expectations.delete(&exp).await {
                tracing::warn!(
                    port = exp.dst.port(),
                    "conntrack: expectation not deleted at exit: {e}"
                );
            }
        }
    }

    /// Expectations waiting for their connection now.
    pub fn waiting(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .exps
            .len()
    }

    /// Plans not yet fully released (elements, claim, lease).
    pub fn plans(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// `data.conntrack_mark`, as the table was made with it.
    pub fn mark(&self) -> u32 {
        self.mark
    }

    /// Netlink messages sent for plans, and plans opened, so far.
    pub fn messages(&self) -> &Messages {
        &self.messages
    }

    /// Removes the lingering claim on `port`, if any: another backend
    /// listens on the port now, and the claim would drop its connections.
    pub(crate) async fn release_claim(&self, port: u16) {
        self.claims.release(&self.table, port).await;
    }

    /// Opens `plan`, of shape `shape`: leases its port, adds its elements
    /// and starts following its connection; progress comes on `events`.
    pub async fn open(
        &self,
        session: &SessionInfo,
        plan: DataPlan,
        shape: Shape,
        events: mpsc::UnboundedSender<DataEvent>,
    ) -> Result<(Opened, Pinhole), OpenError> {
        if self.waiting() >= self.cap {
            let full = Full(format!(
                "{} expectations waiting, the backend's share",
                self.cap
            ));
            return Err(io::Error::other(full).into());
        }
        let pool = if shape.passive {
            &self.client_pool
        } else {
            &self.server_pool
        };
        let control = session
            .control
            .as_ref()
            .ok_or_else(|| io::Error::other("no control connections to make an expectation on"))?;
        let lease = pool.lease(session.client.ip())?;
        let port = lease.port();
        let exp = shape.expectation(port, control).ok_or_else(|| {
            io::Error::other("the control connection's address family is not the plan's")
        })?;
        let (claim, once, elements) = shape.elements(port);
        let timeout = self.settings.pinhole_timeout;
        self.messages.opened();
        let claim = self.install(claim, once, &elements, timeout).await?;
        let held = Arc::new(Held {
            table: self.table.clone(),
            shared: self.shared.clone(),
            claims: self.claims.clone(),
            expectations: self.expectations.clone(),
            messages: self.messages.clone(),
            elements: Mutex::new(elements),
            expectation: Mutex::new(None),
            pending: self.pending.clone(),
            end: Mutex::new(Some((claim, lease))),
            port,
            _live: claims::Live::enter(&self.live),
        });
        // After the elements: the claim and the gate are in place before
        // the kernel admits anything.
        let id = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            (!p.closed).then(|| {
                p.next += 1;
                let id = p.next;
                p.exps.insert(id, exp);
                id
            })
        };
        let Some(id) = id else {
            held.end().await;
            return Err(io::Error::other("the gateway is stopping").into());
        };
        self.messages.sent(1);
        let mut exp = exp;
        let mut created = self.expectations.lock().await.create(&exp).await;
        if let (Err(e), false) = (&created, shape.passive) {
            // The client's connection got no helper: its first packet met
            // no socket with the mark, only the gateway's TIME_WAIT socket
            // of an earlier connection from the same client port (a client
            // may reopen such a tuple). The server's connection has one.
            if let Some(on_server) = (e.raw_os_error() == Some(EOPNOTSUPP))
                .then(|| shape.expectation_on_server(port, control))
                .flatten()
            {
                tracing::info!(
                    session = session.id,
                    plan = plan.id,
                    port,
                    "the client control connection {} -> {} has no helper (it reopened a \
                     tuple the gateway held in TIME_WAIT): the pinhole's expectation is on the \
                     server control connection",
                    exp.master.dst,
                    exp.master.src
                );
                exp = on_server;
                if let Some(waiting) = self
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .exps
                    .get_mut(&id)
                {
                    *waiting = exp;
                }
                self.messages.sent(1);
                created = self.expectations.lock().await.create(&exp).await;
            }
        }
        if let Err(e) = created {
            unwait(&self.pending, id);
            held.end().await;
            return Err(match e.raw_os_error() {
                Some(n) if n == EMFILE || n == ENOSPC => io::Error::other(Full(e.to_string())),
                Some(EOPNOTSUPP) => io::Error::other(NoAnchor(format!(
                    "the master {} -> {}: {e}",
                    exp.master.src, exp.master.dst
                ))),
                _ => e,
            }
            .into());
        }
        let on_server = shape.passive || exp.master.src == control.server_local;
        self.check_anchor(session.id, on_server, exp.master).await;
        *held.expectation.lock().unwrap_or_else(|p| p.into_inner()) = Some((id, exp));
        let drained = !self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .exps
            .contains_key(&id);
        if drained {
            // Closed meanwhile, maybe before the kernel had it: nothing
            // deletes it but this plan.
            held.end().await;
            return Err(io::Error::other("the gateway is stopping").into());
        }
        tracing::debug!(
            session = session.id,
            plan = plan.id,
            port,
            "kernel pinhole: expectation on the {} control connection",
            if on_server { "server" } else { "client" }
        );
        let announced = SocketAddr::new(shape.dst, port);
        let opened = Opened {
            client_listen: shape.passive.then_some(announced),
            server_listen: (!shape.passive).then_some(announced),
        };
        let watch = self.conntrack.watch(shape, port);
        let activity = session.activity.clone();
        let task = tokio::spawn(follow(
            plan.id,
            shape,
            watch,
            timeout,
            held.clone(),
            events,
            activity,
        ));
        let guard = Guard {
            held,
            task: task.abort_handle(),
        };
        let pinhole = Pinhole {
            id: plan.id,
            guard: Box::new(guard),
        };
        Ok((opened, pinhole))
    }

    /// Adds a plan's claim, its `once` gate and its elements in one
    /// transaction, which also removes (or renews) the port's lingering
    /// claim. Every element gets its timeout from now, whether it was there
    /// or not ([`Shared`] elements that another live plan holds included).
    async fn install(
        &self,
        claim: Element,
        once: Element,
        elements: &[Element],
        timeout: Duration,
    ) -> io::Result<Claim> {
        // Held across the nft change, so that a plan's adds and another's
        // removal of a shared key keep their order.
        let mut shared = self.shared.lock().await;
        let port = match claim {
            Element::Claim { port, .. } => port,
            _ => 0,
        };
        let taken = self.claims.peek(port).await;
        let lingering: Vec<_> = taken
            .into_iter()
            .map(|(_, c)| c)
            .filter(|c| *c != claim)
            .collect();
        let mut fresh: Vec<_> = elements.iter().map(|e| (*e, timeout)).collect();
        fresh.push((once, timeout));
        // Longer than the rest, so that it is still there for at least
        // `timeout` after the plan ends (it expires at the timeout, or is
        // refreshed while its connection runs).
        fresh.push((claim, 2 * timeout));
        self.messages.sent(1);
        self.table.renew(&lingering, &fresh).await?;
        if let Some((generation, _)) = taken {
            self.claims.forget(port, generation).await;
        }
        for e in elements.iter().filter(|e| claims::keyed_by_endpoint(e)) {
            *shared.entry(*e).or_insert(0) += 1;
        }
        Ok(Claim {
            element: claim,
            expires: Instant::now() + 2 * timeout,
        })
    }
}

/// Dropping it stops following the plan and removes its elements.
struct Guard {
    held: Arc<Held>,
    task: AbortHandle,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.task.abort();
        let held = self.held.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { held.end().await });
        }
    }
}

/// Follows the plan's connection, as the shared [`Conntrack`] watcher sees
/// it, until it ends or never comes.
async fn follow(
    id: PlanId,
    shape: Shape,
    mut watch: Watch,
    timeout: Duration,
    held: Arc<Held>,
    events: mpsc::UnboundedSender<DataEvent>,
    activity: Activity,
) {
    let start = Instant::now();
    // Conntrack does not report bytes while they flow: the connection
    // counts as the session's activity from its start to its end.
    let mut unseen = None;
    let deadline = start + timeout;
    let mut refresh_at = deadline;
    let mut seen = false;
    let mut last = Flow::default();
    let outcome = loop {
        let current = watch.rx.borrow_and_update().clone();
        match current {
            Some(flow) => {
                if !seen {
                    seen = true;
                    tracing::debug!(
                        plan = id,
                        port = watch.port,
                        after_us = start.elapsed().as_micros() as u64,
                        "conntrack: connected"
                    );
                    connected(&held).await;
                    unseen = Some(activity.unseen());
                    let _ = events.send(DataEvent::Connected { id });
                }
                let done = flow.done;
                last = flow;
                if done {
                    tracing::debug!(
                        plan = id,
                        port = watch.port,
                        after_us = start.elapsed().as_micros() as u64,
                        orig_bytes = last.orig_bytes,
                        reply_bytes = last.reply_bytes,
                        "conntrack: closed"
                    );
                    break DataOutcome::Completed;
                }
                if Instant::now() >= refresh_at {
                    held.refresh_claim(2 * timeout).await;
                    refresh_at = Instant::now() + timeout;
                }
            }
            None if seen => break DataOutcome::Completed,
            None if Instant::now() >= deadline => break DataOutcome::Expired,
            None => {}
        }
        let wake_at = if seen { refresh_at } else { deadline };
        tokio::select! {
            changed = watch.rx.changed() => if changed.is_err() {
                break DataOutcome::Failed(DataFailure::WatcherStopped);
            },
            _ = tokio::time::sleep_until(wake_at) => {}
        }
    };
    drop(watch);
    // In a task of its own: the guard may abort this one at any moment,
    // and a claim taken but not yet registered would be left behind.
    let ending = held.clone();
    let _ = tokio::spawn(async move { ending.end().await }).await;
    let (to_client, to_server) = directions(&shape, &last);
    drop(unseen);
    let _ = events.send(DataEvent::Closed {
        id,
        to_client,
        to_server,
        outcome,
    });
}

/// The one connection is in: the kernel took the expectation; the NAT
/// maps' elements, if any, have done their job (conntrack keeps the NAT),
/// and go. In a task of its own, so that an abort cannot stop it half-way
/// (shared keys counted down, not removed).
async fn connected(held: &Arc<Held>) {
    let h = held.clone();
    let _ = tokio::spawn(async move { h.connected().await }).await;
}

/// (to the client, to the server) from a flow's counters: the originating
/// side's bytes are the first direction of the entry.
fn directions(shape: &Shape, flow: &Flow) -> (u64, u64) {
    if shape.passive {
        (flow.reply_bytes, flow.orig_bytes)
    } else {
        (flow.orig_bytes, flow.reply_bytes)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_cleanup;
