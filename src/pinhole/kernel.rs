//! The kernel backend (`data.backend: nftables`): data bytes never enter
//! user space.
//!
//! For a plan whose two legs are one listen and one connect of the same
//! address family (PASV→PASV, PORT→PORT), the gateway adds five elements to
//! its table, in one `nft` transaction:
//!
//! - `once`: admits one new connection from the expected peer to the
//!   announced port. The prerouting rule deletes it at the first SYN.
//! - `claim`: the announced address and port. A new connection to it that
//!   `once` did not admit (another host, a second connection, one after the
//!   timeout) is dropped: no SYN-ACK, no RST, nothing reaches the endpoint.
//! - `dnat`: (peer, announced address, port) → the real endpoint.
//! - `ksnat`: the real endpoint sees the address the invariant asks for (the
//!   gateway's server-facing address, or the address the client believes is
//!   the server).
//! - `fwd`: the forward chain accepts exactly that flow.
//!
//! Each element has a timeout (the pinhole timeout; twice that for the
//! claim), so the kernel removes it even if the gateway dies.
//!
//! The claim outlives the plan: it is refreshed while the connection runs,
//! and when the plan ends it lingers for `pinhole_timeout` more, until the
//! session ends, or until the port's next plan (kernel or relay, which
//! listens on the port) removes it first, whichever comes first. The gateway follows the connection in the kernel's
//! connection tracking table, through its netlink events (or, where they
//! are not available, by reading `/proc/net/nf_conntrack`), with
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
//! plans whose legs differ in address family. Those go to the relay.

use super::ctnetlink::{self, Conn, Record};
use super::nft::{Element, InterceptTable};
use super::relay::RelayBackend;
use super::{
    Backend, DataEvent, DataOutcome, DataPlan, DataSettings, Leg, OpenError, OpenFuture, Opened,
    Pinhole, PlanId, PortPool, SessionInfo,
};
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Where the kernel lists tracked connections (of the caller's namespace).
const CONNTRACK: &str = "/proc/net/nf_conntrack";
/// Turns on per-connection byte counters.
const ACCT: &str = "/proc/sys/net/netfilter/nf_conntrack_acct";
/// Turns on conntrack events (0 off, 1 on, 2 on while someone listens).
const EVENTS: &str = "/proc/sys/net/netfilter/nf_conntrack_events";
/// Set to `proc` to follow connections by reading [`CONNTRACK`] even where
/// netlink events are available.
const SOURCE_ENV: &str = "FTPGATE_CONNTRACK";
/// Room for a burst of events (forced past `rmem_max` where allowed).
const EVENT_BUFFER: usize = 8 << 20;
/// How long the kernel may take to answer one request.
const REQUEST_WAIT: Duration = Duration::from_secs(2);
/// How often the watcher reads the conntrack table while some plan is
/// live (waiting for its connection, or connected: an active-mode
/// transfer's final reply waits for its plan's end). With no live plan it
/// does not read at all.
const TICK: Duration = Duration::from_millis(5);

/// Carries out same-mode plans with kernel NAT, the rest with the relay.
pub struct KernelBackend {
    client_pool: PortPool,
    server_pool: PortPool,
    settings: DataSettings,
    table: Arc<InterceptTable>,
    relay: RelayBackend,
    claims: Arc<Claims>,
    conntrack: Arc<Conntrack>,
    shared: Arc<Shared>,
}

impl KernelBackend {
    /// Checks that the kernel can do the job (conntrack events or the
    /// conntrack table readable, byte accounting on) and builds the
    /// backend. Fails with a plain message otherwise, so that the gateway
    /// does not start half-working.
    pub async fn new(
        client_pool: PortPool,
        server_pool: PortPool,
        settings: DataSettings,
        table: Arc<InterceptTable>,
    ) -> io::Result<Self> {
        // Accounting applies to connections created after it is on.
        tokio::fs::write(ACCT, b"1").await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot enable {ACCT} (needs CAP_NET_ADMIN and nf_conntrack): {e}"),
            )
        })?;
        let conntrack = Conntrack::start().await?;
        let relay = RelayBackend::new(
            client_pool.clone(),
            server_pool.clone(),
            settings.clone(),
            Some(table.clone()),
        );
        Ok(KernelBackend {
            client_pool,
            server_pool,
            settings,
            table,
            relay,
            claims: Arc::default(),
            conntrack,
            shared: Arc::default(),
        })
    }

    /// The NAT-able shape of `plan`, or `None` when the relay must carry it.
    fn shape(plan: &DataPlan) -> Option<Shape> {
        let view = plan.client_view;
        let shape = match (plan.client, plan.server) {
            // PASV same: the client connects to (announced, P).
            (
                Leg::Listen { bind, peer },
                Leg::Connect {
                    target,
                    bind: source,
                },
            ) => Shape {
                passive: true,
                peer,
                dst: view.unwrap_or(bind),
                to: target,
                source,
            },
            // PORT same: the server connects to (gateway, Q).
            (Leg::Connect { target, bind }, Leg::Listen { bind: dst, peer }) => Shape {
                passive: false,
                peer,
                dst,
                to: target,
                source: view.unwrap_or(bind),
            },
            _ => return None,
        };
        let same = [shape.dst, shape.to.ip(), shape.source]
            .iter()
            .all(|a| a.is_ipv4() == shape.peer.is_ipv4());
        let specific = !shape.dst.is_unspecified() && !shape.source.is_unspecified();
        (same && specific).then_some(shape)
    }

    async fn open_plan(
        &self,
        session: &SessionInfo,
        plan: DataPlan,
        events: mpsc::UnboundedSender<DataEvent>,
    ) -> Result<(Opened, Pinhole), OpenError> {
        let Some(shape) = Self::shape(&plan) else {
            tracing::debug!(
                session = session.id,
                plan = plan.id,
                "data plan needs the relay (conversion or mixed families)"
            );
            let (opened, pinhole) = self.relay.open(session, plan, events).await?;
            // The relay listens on these ports: an earlier plan's claim on
            // them would drop its connections.
            for addr in [opened.client_listen, opened.server_listen]
                .into_iter()
                .flatten()
            {
                self.claims.release(&self.table, addr.port()).await;
            }
            return Ok((opened, pinhole));
        };
        let pool = if shape.passive {
            &self.client_pool
        } else {
            &self.server_pool
        };
        let lease = pool.lease(session.client.ip())?;
        let port = lease.port();
        self.claims.release(&self.table, port).await;
        let claim = Element::Claim {
            dst: shape.dst,
            port,
        };
        let elements = vec![
            Element::Once {
                peer: shape.peer,
                port,
            },
            Element::Dnat {
                peer: shape.peer,
                dst: shape.dst,
                port,
                to: shape.to,
            },
            Element::Snat {
                peer: shape.peer,
                to: shape.to,
                source: shape.source,
            },
            Element::Forward {
                peer: shape.peer,
                to: shape.to,
            },
        ];
        let timeout = self.settings.pinhole_timeout;
        // Held across the nft changes, so that a plan's adds and another's
        // removal of a shared key keep their order.
        let mut shared = self.shared.lock().await;
        let mut timed = Vec::new();
        let mut renew = Vec::new();
        for e in &elements {
            if !keyed_by_endpoint(e) {
                timed.push((*e, timeout));
            } else if shared.get(e).is_some_and(|&n| n > 0) {
                // Another live plan holds it: give it this plan's timeout.
                renew.push(*e);
            } else {
                timed.push((*e, timeout));
            }
        }
        // Longer than the rest, so that it is still there when the plan
        // hands it over to linger at the timeout.
        timed.push((claim, 2 * timeout));
        self.table.add(&timed).await?;
        for e in renew {
            self.table.refresh(e, timeout).await?;
        }
        for e in elements.iter().filter(|e| keyed_by_endpoint(e)) {
            *shared.entry(*e).or_insert(0) += 1;
        }
        drop(shared);
        let announced = SocketAddr::new(shape.dst, port);
        let opened = Opened {
            client_listen: shape.passive.then_some(announced),
            server_listen: (!shape.passive).then_some(announced),
        };
        let held = Arc::new(Held {
            table: self.table.clone(),
            shared: self.shared.clone(),
            claims: self.claims.clone(),
            elements: Mutex::new(elements),
            end: Mutex::new(Some((claim, lease))),
            port,
            linger: timeout,
            session: events.clone(),
        });
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
        Ok((
            opened,
            Pinhole {
                id: plan.id,
                guard: Box::new(guard),
            },
        ))
    }
}

impl Backend for KernelBackend {
    fn open<'a>(
        &'a self,
        session: &'a SessionInfo,
        plan: DataPlan,
        events: mpsc::UnboundedSender<DataEvent>,
    ) -> OpenFuture<'a> {
        Box::pin(self.open_plan(session, plan, events))
    }
}

/// A plan the kernel can carry: `peer` connects to (`dst`, port), which is
/// translated to `to`, whose side sees `source`.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// The client connects (PASV); otherwise the server does (PORT).
    passive: bool,
    peer: IpAddr,
    dst: IpAddr,
    to: SocketAddr,
    source: IpAddr,
}

/// What a plan still holds: elements in the table, its claim, its port.
struct Held {
    table: Arc<InterceptTable>,
    shared: Arc<Shared>,
    claims: Arc<Claims>,
    /// `once`, `dnat`, `ksnat`, `fwd`: gone once the connection is in.
    elements: Mutex<Vec<Element>>,
    /// The claim and the port's lease, until the plan ends and hands them
    /// to [`Claims::linger`].
    end: Mutex<Option<(Element, super::PortLease)>>,
    port: u16,
    linger: Duration,
    /// The session's event channel: closed when the session ends.
    session: mpsc::UnboundedSender<DataEvent>,
}

fn take<T: Default>(m: &Mutex<T>) -> T {
    match m.lock() {
        Ok(mut e) => std::mem::take(&mut *e),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    }
}

impl Held {
    async fn remove(&self) {
        let elements = take(&self.elements);
        if elements.is_empty() {
            return;
        }
        let mut shared = self.shared.lock().await;
        let gone: Vec<_> = elements
            .into_iter()
            .filter(|e| {
                if !keyed_by_endpoint(e) {
                    return true;
                }
                let Some(n) = shared.get_mut(e) else {
                    return true;
                };
                *n = n.saturating_sub(1);
                if *n == 0 {
                    shared.remove(e);
                    true
                } else {
                    false
                }
            })
            .collect();
        self.table.remove_each(&gone).await;
    }

    /// The plan is over: removes its elements and lets the claim linger.
    /// Whoever comes first (the plan's task or its guard) does it.
    async fn end(&self) {
        self.remove().await;
        if let Some((claim, lease)) = take(&self.end) {
            self.claims
                .linger(
                    &self.table,
                    claim,
                    self.port,
                    self.linger,
                    &self.session,
                    lease,
                )
                .await;
        }
    }

    /// Keeps the claim alive while the connection runs.
    async fn refresh_claim(&self, timeout: Duration) {
        let claim = match self.end.lock() {
            Ok(e) => e.as_ref().map(|(c, _)| *c),
            Err(p) => p.into_inner().as_ref().map(|(c, _)| *c),
        };
        if let Some(claim) = claim {
            if let Err(e) = self.table.refresh(claim, timeout).await {
                tracing::warn!(table = %self.table.name(), "nft: claim not refreshed: {e}");
            }
        }
    }
}

/// The `ksnat` and `fwd` elements are keyed by (peer, real endpoint), which
/// two live plans can share (a server reuses its passive port for the same
/// client). Counts how many live plans hold each, so that one plan's end
/// does not remove another's.
type Shared = tokio::sync::Mutex<HashMap<Element, usize>>;

/// Whether `e` is one of the elements [`Shared`] counts.
fn keyed_by_endpoint(e: &Element) -> bool {
    matches!(e, Element::Snat { .. } | Element::Forward { .. })
}

/// Claims whose plan has ended, by port. A port's next plan removes the
/// lingering claim before it announces the port.
#[derive(Default)]
struct Claims {
    lingering: tokio::sync::Mutex<HashMap<u16, (u64, Element)>>,
    next: AtomicU64,
}

impl Claims {
    /// Removes the lingering claim on `port`, if any: the port has a new
    /// plan.
    async fn release(&self, table: &InterceptTable, port: u16) {
        let mut lingering = self.lingering.lock().await;
        if let Some((_, claim)) = lingering.remove(&port) {
            table.remove_each(&[claim]).await;
        }
    }

    /// Keeps `claim` for `linger` more, until `session` ends, or until
    /// [`Claims::release`], whichever comes first. The port returns to its
    /// pool only once the claim is registered here, so its next plan finds
    /// it.
    async fn linger(
        self: &Arc<Self>,
        table: &Arc<InterceptTable>,
        claim: Element,
        port: u16,
        linger: Duration,
        session: &mpsc::UnboundedSender<DataEvent>,
        lease: super::PortLease,
    ) {
        if session.is_closed() {
            table.remove_each(&[claim]).await;
            return;
        }
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut lingering = self.lingering.lock().await;
            if let Err(e) = table.refresh(claim, linger).await {
                tracing::warn!(table = %table.name(), "nft: claim not refreshed: {e}");
            }
            lingering.insert(port, (generation, claim));
        }
        drop(lease);
        let (claims, table, session) = (self.clone(), table.clone(), session.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = session.closed() => {}
                _ = tokio::time::sleep(linger) => {}
            }
            let mut lingering = claims.lingering.lock().await;
            if lingering.get(&port).map(|(g, _)| *g) == Some(generation) {
                lingering.remove(&port);
                table.remove_each(&[claim]).await;
            }
        });
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
    activity: super::Activity,
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
                    // The one connection is in; the rest of the elements
                    // have done their job (conntrack keeps the NAT). In a
                    // task of its own, so that an abort cannot stop it
                    // half-way (shared keys counted down, not removed).
                    let h = held.clone();
                    let _ = tokio::spawn(async move { h.remove().await }).await;
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
                break DataOutcome::Failed(super::DataFailure::WatcherStopped);
            },
            _ = tokio::time::sleep_until(wake_at) => {}
        }
    };
    drop(watch);
    // In a task of its own: the guard may abort this one at any moment,
    // and a claim taken but not yet registered would be left behind.
    let ending = held.clone();
    let _ = tokio::spawn(async move { ending.end().await }).await;
    // The originating side's bytes are the first direction of the entry.
    let (to_client, to_server) = if shape.passive {
        (last.reply_bytes, last.orig_bytes)
    } else {
        (last.orig_bytes, last.reply_bytes)
    };
    drop(unseen);
    let _ = events.send(DataEvent::Closed {
        id,
        to_client,
        to_server,
        outcome,
    });
}

/// One task follows the conntrack table for every live plan and hands each
/// plan its entry (or `None`) when it changed.
///
/// With netlink ([`watch_netlink`]) the task keeps a copy of the table's TCP
/// entries, updated by the kernel's events, and looks at the plans after
/// each batch of events: no reading of the whole table. Without it
/// ([`watch_proc`]) it reads `/proc/net/nf_conntrack` once per [`TICK`]
/// while a plan is live.
#[derive(Default)]
struct Conntrack {
    plans: Mutex<HashMap<u64, Watched>>,
    next: AtomicU64,
    wake: tokio::sync::Notify,
}

/// A registered plan, as the watcher sees it.
struct Watched {
    shape: Shape,
    port: u16,
    /// The [`Entry::serial`] of the entry this plan follows, once found.
    entry: Option<u64>,
    tx: tokio::sync::watch::Sender<Option<Flow>>,
}

/// A plan's registration; dropping it unregisters.
struct Watch {
    conntrack: Arc<Conntrack>,
    key: u64,
    port: u16,
    rx: tokio::sync::watch::Receiver<Option<Flow>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        lock(&self.conntrack.plans).remove(&self.key);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where an entry is among those to one port: (peer, source port, port).
/// The kernel holds at most one entry per key at a time, but one after
/// another may have it: [`Entry::serial`] tells them apart.
type Key = (IpAddr, u16, u16);

impl Conntrack {
    /// The watcher, with its task running: on netlink events if it can,
    /// else on `/proc`; fails if it can do neither.
    async fn start() -> io::Result<Arc<Conntrack>> {
        let conntrack = Arc::new(Conntrack::default());
        let weak = Arc::downgrade(&conntrack);
        // Entries that exist now belong to no plan of this process; nor
        // does an entry, once one plan took it. Without this, a plan would
        // take the TIME_WAIT entry of an earlier connection from the same
        // peer to the same port and endpoint (ports are reused) for its own,
        // end at once, and its lingering claim would drop the real one.
        let why = if std::env::var(SOURCE_ENV).as_deref() == Ok("proc") {
            format!("{SOURCE_ENV}=proc")
        } else {
            match Netlink::open().await {
                Ok((netlink, all)) => {
                    tracing::info!(entries = all.len(), "conntrack: following netlink events");
                    tokio::spawn(watch_netlink(weak, netlink, Mirror::new(all)));
                    return Ok(conntrack);
                }
                Err(e) => format!("no netlink events: {e}"),
            }
        };
        let text = tokio::fs::read_to_string(CONNTRACK).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("conntrack: {why}; and cannot read {CONNTRACK}: {e}"),
            )
        })?;
        if why.starts_with(SOURCE_ENV) {
            tracing::info!("conntrack: {why}, reading {CONNTRACK}");
        } else {
            tracing::warn!(
                "conntrack: {why}; reading {CONNTRACK} every {} ms instead",
                TICK.as_millis()
            );
        }
        tokio::spawn(watch_proc(weak, ProcTable::new(entries(&text, None))));
        Ok(conntrack)
    }

    /// Registers the plan whose connection comes from `shape.peer` to
    /// `port` and is translated to `shape.to`.
    fn watch(self: &Arc<Self>, shape: Shape, port: u16) -> Watch {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::watch::channel(None);
        lock(&self.plans).insert(
            key,
            Watched {
                shape,
                port,
                entry: None,
                tx,
            },
        );
        self.wake.notify_one();
        Watch {
            conntrack: self.clone(),
            key,
            port,
            rx,
        }
    }
}

/// Hands `flow` to the plan if it changed. A finished flow is final: its
/// entry may go away right after, and the plan ends with the finished
/// flow's counters.
fn publish(w: &Watched, flow: Option<Flow>) {
    w.tx.send_if_modified(|old| {
        if old.as_ref().is_some_and(|f| f.done) || *old == flow {
            return false;
        }
        *old = flow;
        true
    });
}

/// The `/proc` watcher's copy of the entries it cares about, numbered. A
/// read of the table has no entry IDs and no events: an entry is the one
/// read before under its key unless [`ProcTable::same`] says otherwise.
#[derive(Debug, Default)]
struct ProcTable {
    /// The last read's entries to the ports it wanted.
    known: HashMap<Key, Entry>,
    /// Serials of entries that existed at start or that a plan took, while
    /// they exist.
    taken: HashSet<u64>,
    next: u64,
}

impl ProcTable {
    /// The table at start: every entry is taken.
    fn new(all: Vec<Entry>) -> ProcTable {
        let mut table = ProcTable::default();
        table.update(all);
        table.taken = table.known.values().map(|e| e.serial).collect();
        table
    }

    /// Whether `new`, read under `old`'s key, is still `old`'s entry. Beyond
    /// [`Entry::continues`]: a TCP entry never leaves a FIN state, so one
    /// that is open again was created since (a SYN reused a TIME_WAIT
    /// entry's tuple between two reads).
    fn same(old: &Entry, new: &Entry) -> bool {
        let reopened = old.flow.done && !new.flow.done;
        new.continues(old) && !reopened
    }

    /// Takes a fresh read (of the wanted ports): numbers its entries, and
    /// forgets taken entries that are gone.
    fn update(&mut self, mut found: Vec<Entry>) {
        for e in &mut found {
            e.serial = match self.known.get(&e.tuple()) {
                Some(old) if Self::same(old, e) => old.serial,
                _ => {
                    self.next += 1;
                    self.next
                }
            };
        }
        self.known = found.into_iter().map(|e| (e.tuple(), e)).collect();
        let present: HashSet<u64> = self.known.values().map(|e| e.serial).collect();
        self.taken.retain(|s| present.contains(s));
    }
}

/// The `/proc` watcher's task: ends when the backend is gone.
async fn watch_proc(conntrack: std::sync::Weak<Conntrack>, mut table: ProcTable) {
    loop {
        let Some(ct) = conntrack.upgrade() else {
            return;
        };
        if lock(&ct.plans).is_empty() && table.taken.is_empty() {
            // Wakes for a new plan; now and then to see whether the
            // backend is still there.
            let _ = tokio::time::timeout(Duration::from_secs(1), ct.wake.notified()).await;
            continue;
        }
        let started = Instant::now();
        let text = tokio::fs::read_to_string(CONNTRACK)
            .await
            .unwrap_or_default();
        let took = started.elapsed();
        let live = {
            let mut plans = lock(&ct.plans);
            let taken_ports = table
                .known
                .values()
                .filter(|e| table.taken.contains(&e.serial))
                .map(|e| e.dport);
            let wanted: HashSet<u16> = plans.values().map(|w| w.port).chain(taken_ports).collect();
            table.update(entries(&text, Some(&wanted)));
            let ProcTable { known, taken, .. } = &mut table;
            for w in plans.values_mut() {
                let flow = assign(w, known.values(), taken).map(|e| e.flow.clone());
                publish(w, flow);
            }
            !plans.is_empty()
        };
        // On a large table a read takes a while: leave the CPU free at
        // least twice as long as it took. With no plan open, only taken
        // entries are left to age out: no hurry, but a new plan wakes the
        // watcher at once.
        if live {
            drop(ct);
            tokio::time::sleep(TICK.max(2 * took)).await;
        } else {
            let idle = Duration::from_secs(1).max(2 * took);
            let _ = tokio::time::timeout(idle, ct.wake.notified()).await;
        }
    }
}

/// The netlink side of the watcher: one socket subscribed to the conntrack
/// events, one for requests (a dump, one entry's counters).
struct Netlink {
    events: ctnetlink::Socket,
    requests: ctnetlink::Socket,
    seq: u32,
}

impl Netlink {
    /// Subscribes to the events, then reads the whole table (so that no
    /// entry falls between the two).
    async fn open() -> io::Result<(Netlink, Vec<Entry>)> {
        let on = tokio::fs::read_to_string(EVENTS)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("{EVENTS}: {e}")))?;
        if on.trim() == "0" {
            tokio::fs::write(EVENTS, b"1")
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("cannot enable {EVENTS}: {e}")))?;
        }
        let events = ctnetlink::Socket::open(ctnetlink::EVENT_GROUPS, EVENT_BUFFER)?;
        let requests = ctnetlink::Socket::open(0, 1 << 20)?;
        let mut netlink = Netlink {
            events,
            requests,
            seq: 0,
        };
        let all = netlink.dump().await?;
        Ok((netlink, all))
    }

    /// Sends `msg` (built for sequence number `seq`) and hands each answer
    /// to `take` until it says the answer is complete.
    async fn request(
        &mut self,
        msg: &[u8],
        seq: u32,
        mut take: impl FnMut(Record) -> io::Result<bool>,
    ) -> io::Result<()> {
        self.requests.send(msg).await?;
        let answered = async {
            loop {
                for r in self.requests.recv().await? {
                    // Late answers to an earlier request are not this one's.
                    if r.seq() == seq && take(r)? {
                        return Ok(());
                    }
                }
            }
        };
        tokio::time::timeout(REQUEST_WAIT, answered)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no answer")))
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Every TCP entry of the table.
    async fn dump(&mut self) -> io::Result<Vec<Entry>> {
        let seq = self.next_seq();
        let mut all = Vec::new();
        self.request(&ctnetlink::dump_request(seq), seq, |r| match r {
            Record::Conn { conn, .. } => {
                all.push(Entry::from_conn(&conn));
                Ok(false)
            }
            Record::Done { .. } => Ok(true),
            Record::Error { errno, .. } => Err(io::Error::from_raw_os_error(errno)),
            Record::Other { .. } => Ok(false),
        })
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("conntrack dump: {e}")))?;
        Ok(all)
    }

    /// The entry's byte counters (original, reply), or `None` if the entry
    /// is gone (its destroy event, which carries them, is on its way). An
    /// answer for another entry that has the tuple now counts as gone.
    async fn counters(&mut self, e: &Entry) -> io::Result<Option<(u64, u64)>> {
        let seq = self.next_seq();
        let orig = ctnetlink::Tuple {
            src: SocketAddr::new(e.peer, e.sport),
            dst: SocketAddr::new(e.dst, e.dport),
        };
        let mut got = None;
        self.request(&ctnetlink::get_request(seq, orig), seq, |r| match r {
            Record::Conn { conn, .. } => {
                if Entry::from_conn(&conn).continues(e) {
                    got = Some(conn.bytes.unwrap_or_default());
                }
                Ok(true)
            }
            Record::Error { errno: 0, .. } => Ok(true),
            Record::Error { errno, .. } if errno == rustix::io::Errno::NOENT.raw_os_error() => {
                Ok(true)
            }
            Record::Error { errno, .. } => Err(io::Error::from_raw_os_error(errno)),
            Record::Done { .. } | Record::Other { .. } => Ok(false),
        })
        .await?;
        Ok(got)
    }
}

/// The watcher's copy of the conntrack table's TCP entries, by port, and
/// the entries no new plan may take.
#[derive(Debug, Default)]
struct Mirror {
    by_port: HashMap<u16, HashMap<Key, Entry>>,
    /// Serials of entries that existed at start or that a plan took, while
    /// they exist.
    taken: HashSet<u64>,
    next: u64,
}

impl Mirror {
    /// The table at start: every entry is taken.
    fn new(all: Vec<Entry>) -> Mirror {
        let mut mirror = Mirror::default();
        for e in all {
            let e = mirror.numbered(e);
            mirror.taken.insert(e.serial);
            mirror
                .by_port
                .entry(e.dport)
                .or_default()
                .insert(e.tuple(), e);
        }
        mirror
    }

    /// `e` with a serial of its own.
    fn numbered(&mut self, e: Entry) -> Entry {
        self.next += 1;
        Entry {
            serial: self.next,
            ..e
        }
    }

    /// Applies one event. A destroyed entry goes to `gone`, finished and
    /// with the counters its event carries. An event for a tuple whose
    /// entry is not the one the mirror has ([`Entry::continues`], or a NEW
    /// event) is a new entry: the one it replaces goes to `gone`.
    fn apply(&mut self, conn: &Conn, gone: &mut Vec<Entry>) {
        let e = Entry::from_conn(conn);
        let key = e.tuple();
        let old = self.by_port.get_mut(&e.dport).and_then(|p| p.remove(&key));
        if conn.gone {
            match old {
                Some(old) if e.continues(&old) => gone.push(e.finished_as(old.serial)),
                // The destroy of an entry that the mirror already counted
                // as replaced: the new one stays.
                Some(old) => self.insert(old),
                None => {
                    let e = self.numbered(e);
                    gone.push(e.finished());
                }
            }
            if self.by_port.get(&key.2).is_some_and(HashMap::is_empty) {
                self.by_port.remove(&key.2);
            }
            return;
        }
        let e = match old {
            Some(old) if !conn.created && e.continues(&old) => Entry {
                serial: old.serial,
                ..e
            },
            Some(old) => {
                // Its destroy was missed or comes late: it ends here, with
                // the counters last seen.
                gone.push(old.finished());
                self.numbered(e)
            }
            None => self.numbered(e),
        };
        self.insert(e);
    }

    fn insert(&mut self, e: Entry) {
        self.by_port
            .entry(e.dport)
            .or_default()
            .insert(e.tuple(), e);
    }

    /// Replaces the copy with a fresh read of the table (events were lost).
    /// Entries missing from it, or replaced by a new entry with the same
    /// tuple, go to `gone`.
    fn replace(&mut self, all: Vec<Entry>, gone: &mut Vec<Entry>) {
        let mut old = std::mem::take(&mut self.by_port);
        for e in all {
            let before = old.get_mut(&e.dport).and_then(|p| p.remove(&e.tuple()));
            let e = match before {
                Some(b) if e.continues(&b) => Entry {
                    serial: b.serial,
                    ..e
                },
                Some(b) => {
                    gone.push(b.finished());
                    self.numbered(e)
                }
                None => self.numbered(e),
            };
            self.insert(e);
        }
        for e in old.into_values().flat_map(HashMap::into_values) {
            gone.push(e.finished());
        }
    }

    #[cfg(test)]
    fn contains(&self, key: &Key) -> bool {
        self.by_port
            .get(&key.2)
            .is_some_and(|port| port.contains_key(key))
    }

    /// After a batch: entries that went away are no longer taken (their
    /// serials never come back).
    fn forget(&mut self, gone: &[Entry]) {
        for e in gone {
            self.taken.remove(&e.serial);
        }
    }

    /// Records the counters of a present entry.
    fn count(&mut self, of: &Entry, (orig, reply): (u64, u64)) {
        if let Some(e) = self
            .by_port
            .get_mut(&of.dport)
            .and_then(|port| port.get_mut(&of.tuple()))
            .filter(|e| e.serial == of.serial)
        {
            e.flow.orig_bytes = orig;
            e.flow.reply_bytes = reply;
            e.counted = true;
        }
    }
}

/// The netlink watcher's task: ends when the backend is gone.
async fn watch_netlink(
    conntrack: std::sync::Weak<Conntrack>,
    mut netlink: Netlink,
    mut mirror: Mirror,
) {
    // How many datagrams one batch takes at most, so that plans are looked
    // at now and then during a flood.
    const BATCH: usize = 1024;
    loop {
        let Some(ct) = conntrack.upgrade() else {
            return;
        };
        // Wakes for events, for a new plan, and now and then to see
        // whether the backend is still there.
        let first = tokio::select! {
            got = netlink.events.recv() => Some(got),
            _ = ct.wake.notified() => None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => None,
        };
        let mut gone = Vec::new();
        let mut lost = false;
        let mut next = first;
        let mut n = 0;
        while let Some(got) = next.take() {
            match got {
                Ok(records) => {
                    for r in records {
                        if let Record::Conn { conn, .. } = r {
                            mirror.apply(&conn, &mut gone);
                        }
                    }
                }
                Err(e) if ctnetlink::is_overflow(&e) => lost = true,
                Err(e) => {
                    tracing::warn!("conntrack: netlink events: {e}");
                    tokio::time::sleep(TICK).await;
                }
            }
            n += 1;
            if n < BATCH {
                next = netlink.events.try_recv().transpose();
            }
        }
        if lost {
            tracing::debug!("conntrack: events lost, reading the whole table");
            match netlink.dump().await {
                Ok(all) => mirror.replace(all, &mut gone),
                Err(e) => tracing::warn!("conntrack: {e}"),
            }
        }
        look(&ct, &mut mirror, &gone, &mut netlink).await;
        mirror.forget(&gone);
    }
}

/// The entries to `port` that a plan may see: those that went away in this
/// batch first (a plan following one of them ends with it), then those
/// present.
fn found<'a>(
    by_port: &'a HashMap<u16, HashMap<Key, Entry>>,
    port: u16,
    gone: &'a [Entry],
) -> impl Iterator<Item = &'a Entry> {
    let present = by_port.get(&port).into_iter().flat_map(HashMap::values);
    gone.iter().filter(move |e| e.dport == port).chain(present)
}

/// Hands each plan its entry. A finished entry's counters are not in its
/// events: they are asked for first.
async fn look(ct: &Conntrack, mirror: &mut Mirror, gone: &[Entry], netlink: &mut Netlink) {
    let mut uncounted = Vec::new();
    {
        let mut plans = lock(&ct.plans);
        let Mirror { by_port, taken, .. } = mirror;
        for (key, w) in plans.iter_mut() {
            match assign(w, found(by_port, w.port, gone), taken) {
                Some(e) if e.flow.done && !e.counted => uncounted.push((*key, e.clone())),
                e => publish(w, e.map(|e| e.flow.clone())),
            }
        }
    }
    for (key, mut e) in uncounted {
        match netlink.counters(&e).await {
            Ok(Some(bytes)) => {
                mirror.count(&e, bytes);
                (e.flow.orig_bytes, e.flow.reply_bytes) = bytes;
            }
            // Gone meanwhile: its destroy event carries the counters.
            Ok(None) => continue,
            Err(err) => tracing::warn!(port = e.dport, "conntrack: no counters: {err}"),
        }
        if let Some(w) = lock(&ct.plans).get(&key) {
            publish(w, Some(e.flow));
        }
    }
}

/// The entry of `w`'s connection among `found`: the one it follows, or
/// else a new one for its flow that no plan took yet (which it then takes).
fn assign<'a>(
    w: &mut Watched,
    mut found: impl Iterator<Item = &'a Entry>,
    taken: &mut HashSet<u64>,
) -> Option<&'a Entry> {
    match w.entry {
        Some(serial) => found.find(|e| e.serial == serial),
        None => found
            .find(|e| {
                e.peer == w.shape.peer
                    && e.dport == w.port
                    && e.to == w.shape.to
                    && !taken.contains(&e.serial)
            })
            .inspect(|e| {
                w.entry = Some(e.serial);
                taken.insert(e.serial);
            }),
    }
}

/// A TCP entry of the conntrack table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// Original source address and port.
    peer: IpAddr,
    sport: u16,
    /// Original destination address and port.
    dst: IpAddr,
    dport: u16,
    /// Reply source: where the connection was translated to.
    to: SocketAddr,
    flow: Flow,
    /// The flow's counters are the kernel's (events other than destroy do
    /// not carry them).
    counted: bool,
    /// The kernel's ID of the entry, where it says (netlink).
    ct_id: Option<u32>,
    /// The watcher's own number for the entry: unique for as long as the
    /// watcher runs, where a tuple is not (0 until numbered).
    serial: u64,
}

impl Entry {
    /// What tells entries to the same port apart.
    fn tuple(&self) -> Key {
        (self.peer, self.sport, self.dport)
    }

    /// Whether `self`, seen under `old`'s tuple, can be the same entry: the
    /// same kernel ID (where both have one), the same reply tuple, and no
    /// counter gone down. A new connection with an old tuple usually
    /// differs in its reply tuple (the real endpoint's port), and always
    /// starts its counters again.
    fn continues(&self, old: &Entry) -> bool {
        let id = match (old.ct_id, self.ct_id) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let counters_back = old.counted
            && self.counted
            && (self.flow.orig_bytes < old.flow.orig_bytes
                || self.flow.reply_bytes < old.flow.reply_bytes);
        id && self.to == old.to && !counters_back
    }

    /// The destroyed entry `serial` as its destroy event tells.
    fn finished_as(self, serial: u64) -> Entry {
        Entry {
            serial,
            ..self.finished()
        }
    }

    /// The entry as it went away: finished, its counters final.
    fn finished(self) -> Entry {
        Entry {
            flow: Flow {
                done: true,
                ..self.flow
            },
            counted: true,
            ..self
        }
    }

    fn from_conn(c: &Conn) -> Entry {
        let (orig_bytes, reply_bytes) = c.bytes.unwrap_or_default();
        Entry {
            peer: c.orig.src.ip(),
            sport: c.orig.src.port(),
            dst: c.orig.dst.ip(),
            dport: c.orig.dst.port(),
            to: c.reply.src,
            flow: Flow {
                orig_bytes,
                reply_bytes,
                done: c.finishing(),
            },
            counted: c.bytes.is_some(),
            ct_id: c.id,
            serial: 0,
        }
    }
}

/// One conntrack entry, as far as a plan cares.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Flow {
    orig_bytes: u64,
    reply_bytes: u64,
    /// A FIN or RST was seen: the sending side is done, so every data byte
    /// has passed (an FTP data connection carries one direction).
    done: bool,
}

/// The TCP entries (to one of `ports`, if given). Addresses are parsed,
/// since the kernel prints IPv6 in full.
fn entries(text: &str, ports: Option<&HashSet<u16>>) -> Vec<Entry> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.nth(2) != Some("tcp") {
                return None;
            }
            let state = words.nth(2)?;
            let mut src = Vec::new();
            let mut dst = None;
            let mut sport = Vec::new();
            let mut dport = Vec::new();
            let mut bytes = Vec::new();
            for w in words {
                let Some((k, v)) = w.split_once('=') else {
                    continue;
                };
                match k {
                    "src" => src.push(v),
                    "dst" if dst.is_none() => dst = Some(v),
                    "sport" => sport.push(v.parse::<u16>().ok()?),
                    "dport" => {
                        let port = v.parse::<u16>().ok()?;
                        if dport.is_empty() && ports.is_some_and(|p| !p.contains(&port)) {
                            return None;
                        }
                        dport.push(port);
                    }
                    "bytes" => bytes.push(v.parse::<u64>().ok()?),
                    _ => {}
                }
            }
            Some(Entry {
                peer: src.first()?.parse().ok()?,
                sport: *sport.first()?,
                dst: dst?.parse().ok()?,
                dport: *dport.first()?,
                to: SocketAddr::new(src.get(1)?.parse().ok()?, *sport.get(1)?),
                flow: Flow {
                    orig_bytes: bytes.first().copied().unwrap_or(0),
                    reply_bytes: bytes.get(1).copied().unwrap_or(0),
                    done: matches!(
                        state,
                        "FIN_WAIT" | "CLOSE_WAIT" | "LAST_ACK" | "TIME_WAIT" | "CLOSE"
                    ),
                },
                counted: true,
                ct_id: None,
                serial: 0,
            })
        })
        .collect()
}

/// The entry of the plan's connection: from `peer` to `port`, translated to
/// `to`.
#[cfg(test)]
fn find(text: &str, shape: &Shape, port: u16) -> Option<Flow> {
    entries(text, None)
        .into_iter()
        .find(|e| e.peer == shape.peer && e.dport == port && e.to == shape.to)
        .map(|e| e.flow)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passive() -> Shape {
        Shape {
            passive: true,
            peer: "2001:db8:100::2".parse().unwrap(),
            dst: "2001:db8::1".parse().unwrap(),
            to: "[fd71:2::2]:30000".parse().unwrap(),
            source: "fd71:2::1".parse().unwrap(),
        }
    }

    #[test]
    fn finds_the_plans_entry_in_conntrack_text() {
        let text = "\
ipv6     10 tcp      6 431999 ESTABLISHED src=2001:0db8:0100:0000:0000:0000:0000:0002 dst=2001:0db8:0000:0000:0000:0000:0000:0001 sport=50000 dport=40001 packets=3 bytes=180 src=fd71:0002:0000:0000:0000:0000:0000:0002 dst=fd71:0002:0000:0000:0000:0000:0000:0001 sport=30000 dport=50000 packets=9 bytes=9000 [ASSURED] mark=0 zone=0 use=2
ipv6     10 tcp      6 119 TIME_WAIT src=2001:0db8:0100:0000:0000:0000:0000:0002 dst=2001:0db8:0000:0000:0000:0000:0000:0001 sport=50001 dport=40002 packets=3 bytes=200 src=fd71:0002:0000:0000:0000:0000:0000:0002 dst=fd71:0002:0000:0000:0000:0000:0000:0001 sport=30000 dport=50001 packets=9 bytes=7000 [ASSURED] mark=0 zone=0 use=2
";
        let got = find(text, &passive(), 40001);
        assert_eq!(
            got,
            Some(Flow {
                orig_bytes: 180,
                reply_bytes: 9000,
                done: false
            })
        );
        let got = find(text, &passive(), 40002);
        assert_eq!(
            got,
            Some(Flow {
                orig_bytes: 200,
                reply_bytes: 7000,
                done: true
            })
        );
        assert_eq!(find(text, &passive(), 40003), None);
        assert_eq!(find("garbage\nipv4 2 tcp x\n", &passive(), 40001), None);
    }

    /// What the `/proc` watcher hands the plan after reading `text`.
    fn read(w: &mut Watched, table: &mut ProcTable, text: &str) -> Option<Entry> {
        table.update(entries(text, None));
        assign(w, table.known.values(), &mut table.taken).cloned()
    }

    #[test]
    fn a_plan_takes_only_an_entry_no_plan_took_before() {
        let old = "ipv6 10 tcp 6 100 TIME_WAIT src=2001:db8:100::2 dst=2001:db8::1 sport=50000 dport=40001 packets=3 bytes=180 src=fd71:2::2 dst=fd71:2::1 sport=30000 dport=50000 packets=9 bytes=9000 [ASSURED]\n";
        let new = "ipv6 10 tcp 6 100 ESTABLISHED src=2001:db8:100::2 dst=2001:db8::1 sport=50007 dport=40001 packets=1 bytes=60 src=fd71:2::2 dst=fd71:2::1 sport=30000 dport=50007 packets=1 bytes=60 [ASSURED]\n";
        // The earlier connection's entry was taken (by its plan, or found
        // at start): the new plan on the same port and endpoint waits.
        let mut table = ProcTable::new(entries(old, None));
        let mut w = watched();
        assert_eq!(read(&mut w, &mut table, old), None);
        // Its own connection comes: taken, and followed.
        let both = format!("{old}{new}");
        let e = read(&mut w, &mut table, &both).expect("new entry");
        assert_eq!(
            (e.sport, e.flow.orig_bytes, e.flow.done),
            (50007, 60, false)
        );
        assert_eq!(w.entry, Some(e.serial));
        assert_eq!(table.taken.len(), 2);
        // Once taken, it is never another plan's.
        let mut other = watched();
        assert_eq!(read(&mut other, &mut table, &both), None);
        // The followed entry going away is seen.
        assert_eq!(read(&mut w, &mut table, old), None);
        assert_eq!(table.taken.len(), 1);
    }

    #[test]
    fn a_proc_read_tells_a_reused_tuple_from_the_entry_it_had() {
        // Left by an earlier process: the server's fixed port 20 to the
        // gateway's port 41000, in TIME_WAIT.
        let line = |state: &str, bytes: u64, client_port: u16| {
            format!("ipv4 2 tcp 6 100 {state} src=10.71.2.2 dst=10.71.2.1 sport=20 dport=41000 packets=9 bytes={bytes} src=198.51.100.2 dst=192.0.2.1 sport={client_port} dport=20 packets=3 bytes=180 [ASSURED]\n")
        };
        let active = |client_port| Watched {
            shape: Shape {
                passive: false,
                peer: "10.71.2.2".parse().unwrap(),
                dst: "10.71.2.1".parse().unwrap(),
                to: SocketAddr::new("198.51.100.2".parse().unwrap(), client_port),
                source: "192.0.2.1".parse().unwrap(),
            },
            port: 41000,
            entry: None,
            tx: tokio::sync::watch::channel(None).0,
        };
        let start = line("TIME_WAIT", 1_050_000, 50000);
        // The same entry read again, its counters the same or higher: still
        // the earlier one's, whichever plan asks.
        let mut table = ProcTable::new(entries(&start, None));
        let mut w = active(50000);
        assert_eq!(read(&mut w, &mut table, &start), None);
        assert_eq!(
            read(&mut w, &mut table, &line("CLOSE", 1_050_100, 50000)),
            None
        );
        // A new connection from port 20 to the client's new port: another
        // reply tuple, so another entry, even finished and with more bytes
        // by the time of the read.
        let mut table = ProcTable::new(entries(&start, None));
        let mut w = active(50001);
        let e = read(&mut w, &mut table, &line("TIME_WAIT", 2_000_000, 50001));
        assert_eq!(e.map(|e| e.flow.orig_bytes), Some(2_000_000));
        // The client reused its port: the same tuples both ways. The entry
        // is open again, or its counters went down: a new one.
        for (state, bytes) in [("ESTABLISHED", 2_000_000), ("TIME_WAIT", 60)] {
            let mut table = ProcTable::new(entries(&start, None));
            let mut w = active(50000);
            let e = read(&mut w, &mut table, &line(state, bytes, 50000));
            assert_eq!(e.map(|e| e.flow.orig_bytes), Some(bytes), "{state}");
        }
    }

    fn conn(sport: u16, state: u8, gone: bool, bytes: Option<(u64, u64)>) -> Conn {
        let tuple = |s: &str, d: &str| ctnetlink::Tuple {
            src: s.parse().unwrap(),
            dst: d.parse().unwrap(),
        };
        Conn {
            gone,
            created: false,
            id: None,
            orig: tuple(&format!("[2001:db8:100::2]:{sport}"), "[2001:db8::1]:40001"),
            reply: tuple("[fd71:2::2]:30000", &format!("[fd71:2::1]:{sport}")),
            tcp_state: Some(state),
            bytes,
        }
    }

    /// `c` as a NEW event announces it.
    fn created(c: Conn) -> Conn {
        Conn { created: true, ..c }
    }

    /// `c` with the kernel's ID.
    fn with_id(c: Conn, id: u32) -> Conn {
        Conn { id: Some(id), ..c }
    }

    fn watched() -> Watched {
        let (tx, _rx) = tokio::sync::watch::channel(None);
        Watched {
            shape: passive(),
            port: 40001,
            entry: None,
            tx,
        }
    }

    /// What `look` hands the plan after a batch of events.
    fn seen(w: &mut Watched, mirror: &mut Mirror, gone: &[Entry]) -> Option<Entry> {
        assign(w, found(&mirror.by_port, w.port, gone), &mut mirror.taken).cloned()
    }

    #[test]
    fn the_event_mirror_follows_a_connection_like_the_table() {
        // An entry from before the start (dumped, with counters) is taken.
        let mut mirror = Mirror::new(vec![Entry::from_conn(&conn(50000, 7, false, Some((1, 2))))]);
        let mut w = watched();
        let mut gone = Vec::new();
        assert_eq!(seen(&mut w, &mut mirror, &gone), None);
        // The plan's connection: new (SYN_SENT), then established.
        mirror.apply(&created(conn(50007, 1, false, None)), &mut gone);
        mirror.apply(&conn(50007, 3, false, None), &mut gone);
        let e = seen(&mut w, &mut mirror, &gone).expect("its entry");
        assert_eq!((e.sport, e.flow.done, e.counted), (50007, false, false));
        assert_eq!(w.entry, Some(e.serial));
        let followed = e.serial;
        // FIN_WAIT: finished, but events carry no counters: asked for.
        mirror.apply(&conn(50007, 4, false, None), &mut gone);
        let e = seen(&mut w, &mut mirror, &gone).unwrap();
        assert_eq!((e.flow.done, e.counted, e.serial), (true, false, followed));
        mirror.count(&e, (180, 9000));
        let e = seen(&mut w, &mut mirror, &gone).unwrap();
        assert_eq!(
            (e.flow.orig_bytes, e.flow.reply_bytes, e.counted),
            (180, 9000, true)
        );
        // The old entry goes away: no longer taken once the batch is done.
        mirror.apply(&conn(50000, 7, true, Some((1, 2))), &mut gone);
        let mut other = watched();
        assert_eq!(seen(&mut other, &mut mirror, &gone), None);
        mirror.forget(&gone);
        assert_eq!(mirror.taken, HashSet::from([followed]));
        // The followed entry is destroyed: the plan sees it finished, with
        // the destroy event's counters, even though it is no longer there.
        let mut gone = Vec::new();
        mirror.apply(&conn(50007, 7, true, Some((200, 9100))), &mut gone);
        let e = seen(&mut w, &mut mirror, &gone).unwrap();
        assert_eq!((e.flow.reply_bytes, e.flow.done), (9100, true));
        mirror.forget(&gone);
        assert!(mirror.taken.is_empty() && mirror.by_port.is_empty());
    }

    #[test]
    fn a_connection_that_comes_and_goes_in_one_batch_is_seen() {
        let mut mirror = Mirror::new(Vec::new());
        let mut w = watched();
        let mut gone = Vec::new();
        mirror.apply(&created(conn(50009, 1, false, None)), &mut gone);
        mirror.apply(&conn(50009, 8, true, Some((120, 60))), &mut gone);
        let e = seen(&mut w, &mut mirror, &gone).expect("the gone entry");
        assert_eq!(
            (e.flow.orig_bytes, e.flow.done, e.counted),
            (120, true, true)
        );
        mirror.forget(&gone);
        assert!(mirror.taken.is_empty());
    }

    /// A server that sends from a fixed port: the next data connection to
    /// the same gateway port has the old one's tuple (both ways, here, and
    /// the kernel's ID too: a new entry may reuse the memory of the one
    /// destroyed just before). The kernel destroys the TIME_WAIT entry and
    /// creates the new one in one batch.
    #[test]
    fn a_tuple_destroyed_and_created_again_in_one_batch_is_the_new_plans() {
        let mut mirror = Mirror::new(Vec::new());
        let mut first = watched();
        let mut gone = Vec::new();
        mirror.apply(&with_id(created(conn(20, 1, false, None)), 7), &mut gone);
        mirror.apply(&with_id(conn(20, 7, false, None), 7), &mut gone);
        let old = seen(&mut first, &mut mirror, &gone).expect("the first connection");
        assert!(old.flow.done);
        // The next plan on the port: the TIME_WAIT entry is not its own.
        let mut next = watched();
        assert_eq!(seen(&mut next, &mut mirror, &gone), None);
        mirror.apply(&with_id(conn(20, 7, true, Some((180, 9000))), 7), &mut gone);
        mirror.apply(&with_id(created(conn(20, 1, false, None)), 7), &mut gone);
        mirror.apply(&with_id(conn(20, 3, false, None), 7), &mut gone);
        // The first plan sees its entry gone, with the destroy's counters;
        // the next one takes the new entry, open.
        let e = seen(&mut first, &mut mirror, &gone).unwrap();
        assert_eq!(
            (e.serial, e.flow.reply_bytes, e.flow.done),
            (old.serial, 9000, true)
        );
        let e = seen(&mut next, &mut mirror, &gone).expect("the new entry");
        assert_ne!(e.serial, old.serial);
        assert!(!e.flow.done);
        mirror.forget(&gone);
        assert_eq!(mirror.taken, HashSet::from([e.serial]));
        // It is followed to its end.
        mirror.apply(&with_id(conn(20, 4, false, None), 7), &mut gone);
        assert_eq!(
            seen(&mut next, &mut mirror, &gone).map(|e| e.flow.done),
            Some(true)
        );
    }

    #[test]
    fn an_entry_left_by_an_earlier_process_does_not_hide_a_new_plans_connection() {
        let left = || Entry::from_conn(&with_id(conn(20, 7, false, Some((180, 9000))), 7));
        // The kernel's batch: the destroy of the entry left behind, then
        // the NEW of the plan's connection with the same tuple.
        let mut mirror = Mirror::new(vec![left()]);
        let mut w = watched();
        let mut gone = Vec::new();
        assert_eq!(seen(&mut w, &mut mirror, &gone), None);
        mirror.apply(&with_id(conn(20, 7, true, Some((180, 9000))), 7), &mut gone);
        mirror.apply(&with_id(created(conn(20, 1, false, None)), 9), &mut gone);
        let e = seen(&mut w, &mut mirror, &gone).expect("the new entry");
        assert_eq!((e.flow.done, e.ct_id), (false, Some(9)));
        // Without the destroy (lost, or late): the NEW event, or an update
        // with another ID, is a new entry all the same.
        for c in [
            with_id(created(conn(20, 1, false, None)), 9),
            with_id(conn(20, 3, false, None), 9),
        ] {
            let mut mirror = Mirror::new(vec![left()]);
            let mut w = watched();
            let mut gone = Vec::new();
            mirror.apply(&c, &mut gone);
            let e = seen(&mut w, &mut mirror, &gone).expect("the new entry");
            assert!(!e.flow.done, "{c:?}");
            mirror.forget(&gone);
            assert_eq!(mirror.taken, HashSet::from([e.serial]));
            // A late destroy of the one left behind leaves the new entry.
            let mut gone = Vec::new();
            mirror.apply(&with_id(conn(20, 7, true, Some((180, 9000))), 7), &mut gone);
            assert!(gone.is_empty());
            let still = seen(&mut w, &mut mirror, &gone).expect("the new entry");
            assert_eq!((still.serial, still.flow.done), (e.serial, false));
        }
        // An update of the entry left behind is still that entry.
        let mut mirror = Mirror::new(vec![left()]);
        let mut w = watched();
        mirror.apply(&with_id(conn(20, 8, false, None), 7), &mut gone);
        assert_eq!(seen(&mut w, &mut mirror, &gone), None);
        // After lost events, a dump with a new entry under the tuple.
        let mut gone = Vec::new();
        let new = Entry::from_conn(&with_id(conn(20, 3, false, Some((60, 60))), 9));
        mirror.replace(vec![new], &mut gone);
        let e = seen(&mut w, &mut mirror, &gone).expect("the new entry");
        assert_eq!((e.ct_id, e.flow.done), (Some(9), false));
    }

    #[test]
    fn a_resync_ends_plans_whose_entry_went_away_unseen() {
        let mut mirror = Mirror::new(Vec::new());
        let mut w = watched();
        let mut gone = Vec::new();
        mirror.apply(&conn(50011, 3, false, None), &mut gone);
        mirror.apply(&conn(50012, 3, false, None), &mut gone);
        let e = seen(&mut w, &mut mirror, &gone).expect("an entry");
        let (followed, serial) = (e.sport, e.serial);
        let other = if followed == 50011 { 50012 } else { 50011 };
        // Events were lost; the fresh read has only the other entry.
        mirror.replace(
            vec![Entry::from_conn(&conn(other, 3, false, Some((5, 6))))],
            &mut gone,
        );
        let e = seen(&mut w, &mut mirror, &gone).expect("the gone entry");
        assert_eq!((e.sport, e.flow.done), (followed, true));
        mirror.forget(&gone);
        assert!(!mirror.taken.contains(&serial));
        assert!(mirror.contains(&(passive().peer, other, 40001)));
    }

    #[test]
    fn a_finished_flow_is_final() {
        let w = watched();
        let mut rx = w.tx.subscribe();
        let done = Flow {
            orig_bytes: 1,
            reply_bytes: 2,
            done: true,
        };
        publish(&w, Some(done.clone()));
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), Some(done.clone()));
        publish(&w, None);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(*rx.borrow(), Some(done));
    }

    fn plan(client: Leg, server: Leg) -> DataPlan {
        DataPlan {
            id: 1,
            client,
            server,
            client_view: None,
        }
    }

    #[test]
    fn conversion_and_mixed_families_go_to_the_relay() {
        let l4 = Leg::Listen {
            bind: "192.0.2.1".parse().unwrap(),
            peer: "198.51.100.2".parse().unwrap(),
        };
        let c4 = Leg::Connect {
            target: "10.71.2.2:30000".parse().unwrap(),
            bind: "10.71.2.1".parse().unwrap(),
        };
        let c6 = Leg::Connect {
            target: "[fd71:2::2]:30000".parse().unwrap(),
            bind: "fd71:2::1".parse().unwrap(),
        };
        assert!(KernelBackend::shape(&plan(l4, c4)).is_some());
        assert!(KernelBackend::shape(&plan(c4, l4)).is_some());
        assert!(KernelBackend::shape(&plan(l4, l4)).is_none());
        assert!(KernelBackend::shape(&plan(c4, c4)).is_none());
        assert!(KernelBackend::shape(&plan(l4, c6)).is_none());
    }
}
