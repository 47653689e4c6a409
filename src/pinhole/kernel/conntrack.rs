//! Following plans' connections in the kernel's connection tracking table:
//! one watcher for every live plan, on the kernel's conntrack events.

use super::shape::Shape;
use crate::netfilter::conntrack::Netlink;
use crate::netfilter::ctnetlink::{self, Conn, Record};
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long the watcher waits after a failed read of its event socket
/// before it reads again.
const RETRY: Duration = Duration::from_millis(5);

/// One task follows the conntrack table for every live plan and hands each
/// plan its entry (or `None`) when it changed.
///
/// The task ([`watch_netlink`]) keeps a copy of the table's TCP entries,
/// updated by the kernel's events, and looks at the plans after each batch
/// of events: no reading of the whole table.
#[derive(Debug, Default)]
pub(super) struct Conntrack {
    plans: Mutex<HashMap<u64, Watched>>,
    next: AtomicU64,
    wake: tokio::sync::Notify,
    /// The backend's message count: a finished entry's counters cost one
    /// IPCTNL_MSG_CT_GET.
    messages: Arc<super::Messages>,
}

/// A registered plan, as the watcher sees it.
#[derive(Debug)]
struct Watched {
    shape: Shape,
    port: u16,
    /// The [`Entry::serial`] of the entry this plan follows, once found.
    entry: Option<u64>,
    tx: tokio::sync::watch::Sender<Option<Flow>>,
}

/// A plan's registration; dropping it unregisters.
pub(super) struct Watch {
    conntrack: Arc<Conntrack>,
    key: u64,
    pub(super) port: u16,
    pub(super) rx: tokio::sync::watch::Receiver<Option<Flow>>,
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
    /// The watcher, with its task running on netlink events; fails if
    /// they cannot be had.
    pub(super) async fn start(
        mark: u32,
        messages: Arc<super::Messages>,
    ) -> io::Result<Arc<Conntrack>> {
        let conntrack = Arc::new(Conntrack {
            messages,
            ..Conntrack::default()
        });
        let weak = Arc::downgrade(&conntrack);
        // Entries that exist now belong to no plan of this process; nor
        // does an entry, once one plan took it. Without this, a plan would
        // take the TIME_WAIT entry of an earlier connection from the same
        // peer to the same port and endpoint (ports are reused) for its own,
        // end at once, and its lingering claim would drop the real one.
        let mut netlink = Netlink::open(Some(mark))
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("conntrack netlink events: {e}")))?;
        let all = dump(&mut netlink).await?;
        tracing::info!(entries = all.len(), "conntrack: following netlink events");
        tokio::spawn(watch_netlink(weak, netlink, Mirror::new(all)));
        Ok(conntrack)
    }

    /// Registers the plan whose connection comes from `shape.peer` to
    /// `port` and is translated to `shape.to`.
    pub(super) fn watch(self: &Arc<Self>, shape: Shape, port: u16) -> Watch {
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

/// Every TCP entry of the table, subscribed or not: the watcher opens its
/// event socket first, so that no entry falls between the two.
async fn dump(netlink: &mut Netlink) -> io::Result<Vec<Entry>> {
    let all = netlink.dump().await?;
    Ok(all.iter().map(Entry::from_conn).collect())
}

/// The entry's byte counters (original, reply), or `None` if the entry is
/// gone (its destroy event, which carries them, is on its way). An answer
/// for another entry that has the tuple now counts as gone.
async fn counters(netlink: &mut Netlink, e: &Entry) -> io::Result<Option<(u64, u64)>> {
    let orig = ctnetlink::Tuple {
        src: SocketAddr::new(e.peer, e.sport),
        dst: SocketAddr::new(e.dst, e.dport),
    };
    let got = netlink.get(orig).await?;
    Ok(got
        .filter(|conn| Entry::from_conn(conn).continues(e))
        .map(|conn| conn.bytes.unwrap_or_default()))
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
            got = netlink.events().recv() => Some(got),
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
                    tokio::time::sleep(RETRY).await;
                }
            }
            n += 1;
            if n < BATCH {
                next = netlink.events().try_recv().transpose();
            }
        }
        if lost {
            tracing::debug!("conntrack: events lost, reading the whole table");
            match dump(&mut netlink).await {
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
        ct.messages.sent(1);
        match counters(netlink, &e).await {
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
    /// The kernel's ID of the entry, where it says.
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
pub(super) struct Flow {
    pub(super) orig_bytes: u64,
    pub(super) reply_bytes: u64,
    /// A FIN or RST was seen: the sending side is done, so every data byte
    /// has passed (an FTP data connection carries one direction).
    pub(super) done: bool,
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
            helper: None,
            mark: None,
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
}
