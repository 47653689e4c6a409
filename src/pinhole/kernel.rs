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
//! connection tracking table (`/proc/net/nf_conntrack`, with
//! `nf_conntrack_acct` on for byte counts): an entry for the flow means
//! [`DataEvent::Connected`], the entry reaching a FIN state (or going
//! away) means [`DataEvent::Closed`], with the entry's byte counters.
//!
//! Conversion plans (PORT→PASV, PASV→PORT) need the gateway to originate
//! both legs or listen on both, which address translation cannot do; so do
//! plans whose legs differ in address family. Those go to the relay.

use super::nft::{Element, InterceptTable};
use super::relay::RelayBackend;
use super::{
    Backend, DataEvent, DataOutcome, DataPlan, DataSettings, Leg, OpenError, OpenFuture, Opened,
    Pinhole, PlanId, PortPool, SessionInfo,
};
use std::collections::HashMap;
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
    /// Checks that the kernel can do the job (conntrack table readable,
    /// byte accounting on) and builds the backend. Fails with a plain
    /// message otherwise, so that the gateway does not start half-working.
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
        tokio::fs::read(CONNTRACK)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot read {CONNTRACK}: {e}")))?;
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
            conntrack: Conntrack::start().await,
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
        let Some(lease) = pool.lease() else {
            return Err(OpenError::PoolExhausted(pool.name()));
        };
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
        let task = tokio::spawn(follow(plan.id, shape, watch, timeout, held.clone(), events));
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
) {
    let start = Instant::now();
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
                    let _ = events.send(DataEvent::Connected { id });
                }
                let done = flow.done;
                last = flow;
                if done {
                    tracing::debug!(
                        plan = id,
                        port = watch.port,
                        after_us = start.elapsed().as_micros() as u64,
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
                break DataOutcome::Failed("conntrack watcher stopped".into());
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
    let _ = events.send(DataEvent::Closed {
        id,
        to_client,
        to_server,
        outcome,
    });
}

/// One task reads the conntrack table for every live plan, once per
/// [`TICK`], and hands each plan its entry (or `None`) when it changed.
/// With no live plan it sleeps until one registers.
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
    /// The source port of the connection this plan follows, once found.
    sport: Option<u16>,
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

impl Conntrack {
    /// The watcher, with its task running.
    async fn start() -> Arc<Conntrack> {
        let conntrack = Arc::new(Conntrack::default());
        // Entries that exist now belong to no plan of this process; nor
        // does an entry, once one plan took it. Without this, a plan would
        // take the TIME_WAIT entry of an earlier connection from the same
        // peer to the same port and endpoint (ports are reused) for its own,
        // end at once, and its lingering claim would drop the real one.
        let text = tokio::fs::read_to_string(CONNTRACK)
            .await
            .unwrap_or_default();
        let taken = entries(&text, None).iter().map(Entry::tuple).collect();
        tokio::spawn(watch_conntrack(Arc::downgrade(&conntrack), taken));
        conntrack
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
                sport: None,
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

/// The watcher's task: ends when the backend is gone.
async fn watch_conntrack(
    conntrack: std::sync::Weak<Conntrack>,
    mut taken: std::collections::HashSet<(IpAddr, u16, u16)>,
) {
    loop {
        let Some(ct) = conntrack.upgrade() else {
            return;
        };
        if lock(&ct.plans).is_empty() && taken.is_empty() {
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
            let wanted: std::collections::HashSet<u16> = plans
                .values()
                .map(|w| w.port)
                .chain(taken.iter().map(|t| t.2))
                .collect();
            let found = entries(&text, Some(&wanted));
            // An entry stays taken for as long as it exists.
            let present: std::collections::HashSet<_> = found.iter().map(Entry::tuple).collect();
            taken.retain(|t| present.contains(t));
            for w in plans.values_mut() {
                let flow = assign(w, &found, &mut taken);
                w.tx.send_if_modified(|old| {
                    let changed = *old != flow;
                    if changed {
                        old.clone_from(&flow);
                    }
                    changed
                });
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

/// The entry of `w`'s connection among `found`: the one it follows, or
/// else a new one for its flow that no plan took yet (which it then takes).
fn assign(
    w: &mut Watched,
    found: &[Entry],
    taken: &mut std::collections::HashSet<(IpAddr, u16, u16)>,
) -> Option<Flow> {
    match w.sport {
        Some(sport) => found
            .iter()
            .find(|e| e.tuple() == (w.shape.peer, sport, w.port))
            .map(|e| e.flow.clone()),
        None => found
            .iter()
            .find(|e| {
                e.peer == w.shape.peer
                    && e.dport == w.port
                    && e.to == w.shape.to
                    && !taken.contains(&e.tuple())
            })
            .map(|e| {
                w.sport = Some(e.sport);
                taken.insert(e.tuple());
                e.flow.clone()
            }),
    }
}

/// A TCP entry of the conntrack table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// Original source address and port.
    peer: IpAddr,
    sport: u16,
    /// Original destination port.
    dport: u16,
    /// Reply source: where the connection was translated to.
    to: SocketAddr,
    flow: Flow,
}

impl Entry {
    /// What tells entries to the same port apart.
    fn tuple(&self) -> (IpAddr, u16, u16) {
        (self.peer, self.sport, self.dport)
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
fn entries(text: &str, ports: Option<&std::collections::HashSet<u16>>) -> Vec<Entry> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.nth(2) != Some("tcp") {
                return None;
            }
            let state = words.nth(2)?;
            let mut src = Vec::new();
            let mut sport = Vec::new();
            let mut dport = Vec::new();
            let mut bytes = Vec::new();
            for w in words {
                let Some((k, v)) = w.split_once('=') else {
                    continue;
                };
                match k {
                    "src" => src.push(v),
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

    #[test]
    fn a_plan_takes_only_an_entry_no_plan_took_before() {
        let old = "ipv6 10 tcp 6 100 TIME_WAIT src=2001:db8:100::2 dst=2001:db8::1 sport=50000 dport=40001 packets=3 bytes=180 src=fd71:2::2 dst=fd71:2::1 sport=30000 dport=50000 packets=9 bytes=9000 [ASSURED]\n";
        let new = "ipv6 10 tcp 6 100 ESTABLISHED src=2001:db8:100::2 dst=2001:db8::1 sport=50007 dport=40001 packets=1 bytes=60 src=fd71:2::2 dst=fd71:2::1 sport=30000 dport=50007 packets=1 bytes=60 [ASSURED]\n";
        // The earlier connection's entry was taken (by its plan, or found
        // at start): the new plan on the same port and endpoint waits.
        let mut taken: std::collections::HashSet<_> =
            entries(old, None).iter().map(Entry::tuple).collect();
        let (tx, _rx) = tokio::sync::watch::channel(None);
        let mut w = Watched {
            shape: passive(),
            port: 40001,
            sport: None,
            tx,
        };
        assert_eq!(assign(&mut w, &entries(old, None), &mut taken), None);
        // Its own connection comes: taken, and followed by source port.
        let both = format!("{old}{new}");
        let flow = assign(&mut w, &entries(&both, None), &mut taken).expect("new entry");
        assert_eq!((flow.orig_bytes, flow.done), (60, false));
        assert_eq!(w.sport, Some(50007));
        assert_eq!(taken.len(), 2);
        // Once taken, it is never another plan's.
        let (tx, _rx) = tokio::sync::watch::channel(None);
        let mut other = Watched {
            shape: passive(),
            port: 40001,
            sport: None,
            tx,
        };
        assert_eq!(assign(&mut other, &entries(&both, None), &mut taken), None);
        // The followed entry going away is seen.
        assert_eq!(assign(&mut w, &entries(old, None), &mut taken), None);
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
