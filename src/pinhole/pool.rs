//! Port pools over `client_ports` and `server_ports`.
//!
//! A pool hands out each port to one lease at a time, and at most
//! `max_ports_per_client` of them to one client address, so that one client
//! cannot take a pool that every client shares.
//!
//! Ports are drawn at random, so that a port cannot be guessed from the one
//! a client was just given. A port just given back waits until half the pool
//! has been returned after it before it is drawn again (sooner only when
//! nothing else is free): its old connection may still be in TIME_WAIT, in
//! the host's or in conntrack's table, and a late packet for the old pinhole
//! should not reach a new one.

use super::OpenError;
use crate::config::PortRange;
use socket2::{Domain, Protocol, Socket, Type};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex, MutexGuard};

/// Backlog of a pinhole listener: it admits one connection, but wrong peers
/// may knock while the right one is on its way.
const LISTEN_BACKLOG: i32 = 8;

/// A pool of gateway ports. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct PortPool {
    /// For errors and logs: "client" or "server".
    name: &'static str,
    range: PortRange,
    /// Most ports one client address may hold at once.
    per_client: usize,
    state: Arc<Mutex<PoolState>>,
}

#[derive(Debug)]
struct PoolState {
    /// Free ports (offsets from `range.lo`) not given back recently: a lease
    /// draws one of these at random.
    fresh: Vec<u16>,
    /// Free ports given back recently, oldest first; at most `cool_len`.
    cooling: VecDeque<u16>,
    /// Half the pool: how many returns a port sits out before it is fresh.
    cool_len: usize,
    /// Leased ports per client address; absent means none.
    by_client: HashMap<IpAddr, usize>,
    in_use: usize,
}

/// A port taken from a pool; returned when dropped.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    offset: u16,
    /// The client it counts against; `None` once uncounted.
    client: Option<IpAddr>,
    state: Arc<Mutex<PoolState>>,
}

impl PortPool {
    /// A pool over `range`; `name` is used in errors ("client", "server").
    /// A client may hold the whole pool until [`PortPool::with_client_share`].
    pub fn new(name: &'static str, range: PortRange) -> Self {
        // range.len() <= 65536, so every offset fits in a u16.
        let fresh: Vec<u16> = (0..=range.hi - range.lo).collect();
        let state = PoolState {
            fresh,
            cooling: VecDeque::new(),
            cool_len: range.len() / 2,
            by_client: HashMap::new(),
            in_use: 0,
        };
        PortPool {
            name,
            range,
            per_client: range.len(),
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// Limits each client address to `per_client` ports of this pool at
    /// once (at least one).
    pub(crate) fn with_client_share(mut self, per_client: usize) -> Self {
        self.per_client = per_client.max(1);
        self
    }

    /// The pool's name, as given to [`PortPool::new`].
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The ports this pool hands out.
    pub fn range(&self) -> PortRange {
        self.range
    }

    /// Number of ports currently leased.
    pub(crate) fn in_use(&self) -> usize {
        lock(&self.state).in_use
    }

    /// Number of ports currently leased for `client`.
    pub fn held_by(&self, client: IpAddr) -> usize {
        lock(&self.state)
            .by_client
            .get(&client)
            .copied()
            .unwrap_or(0)
    }

    /// Takes a free port, drawn at random, for `client`.
    ///
    /// [`OpenError::PoolExhausted`] when every port is leased;
    /// [`OpenError::ClientShare`] when `client` already holds its share.
    pub fn lease(&self, client: IpAddr) -> Result<PortLease, OpenError> {
        // Drawn before the lock: the syscall need not hold up other leases.
        let draw = random();
        let mut st = lock(&self.state);
        if st.fresh.is_empty() && st.cooling.is_empty() {
            return Err(OpenError::PoolExhausted(self.name));
        }
        let held = st.by_client.get(&client).copied().unwrap_or(0);
        if held >= self.per_client {
            return Err(OpenError::ClientShare {
                pool: self.name,
                client,
                share: self.per_client,
            });
        }
        let offset = if st.fresh.is_empty() {
            // Everything free was given back recently. At random among the
            // older half: those given back longest ago are the likeliest to
            // be out of TIME_WAIT, and a fixed order would tell anyone who
            // saw the returns which port comes next.
            let older = st.cooling.len().div_ceil(2).max(1);
            let i = (draw % older as u64) as usize;
            st.cooling.remove(i)
        } else {
            // len <= 65536, so the modulo's bias is below 2^-47.
            let i = (draw % st.fresh.len() as u64) as usize;
            Some(st.fresh.swap_remove(i))
        };
        let Some(offset) = offset else {
            return Err(OpenError::PoolExhausted(self.name));
        };
        *st.by_client.entry(client).or_insert(0) += 1;
        st.in_use += 1;
        Ok(PortLease {
            port: self.range.lo + offset,
            offset,
            client: Some(client),
            state: Arc::clone(&self.state),
        })
    }

    /// Leases a port for `client` and binds a listener on (`ip`, port).
    ///
    /// A port that another process holds (`EADDRINUSE`) is skipped and
    /// another one tried; [`OpenError::PoolExhausted`] once every free port
    /// of the pool was tried. Skipped ports do not count against the
    /// client's share. An IPv6 listener is v6-only, so `[::]` never
    /// catches IPv4 connections meant for another socket. The listener is
    /// non-blocking, ready for `tokio::net::TcpListener::from_std`.
    pub fn bind(&self, ip: IpAddr, client: IpAddr) -> Result<(PortLease, TcpListener), OpenError> {
        // Ports that failed stay leased until we are done, so that each
        // attempt is a different port and the loop ends.
        let mut busy = Vec::new();
        loop {
            let mut lease = self.lease(client)?;
            match listen_on(SocketAddr::new(ip, lease.port)) {
                Ok(listener) => return Ok((lease, listener)),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    lease.uncount();
                    busy.push(lease);
                }
                Err(e) => return Err(OpenError::Io(e)),
            }
        }
    }
}

impl PortLease {
    /// The leased port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops counting this lease against its client's share.
    fn uncount(&mut self) {
        if let Some(client) = self.client.take() {
            uncount(&mut lock(&self.state), client);
        }
    }
}

fn uncount(st: &mut PoolState, client: IpAddr) {
    if let Some(n) = st.by_client.get_mut(&client) {
        *n -= 1;
        if *n == 0 {
            st.by_client.remove(&client);
        }
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        if let Some(client) = self.client.take() {
            uncount(&mut st, client);
        }
        st.in_use -= 1;
        st.cooling.push_back(self.offset);
        if st.cooling.len() > st.cool_len {
            if let Some(rested) = st.cooling.pop_front() {
                st.fresh.push(rested);
            }
        }
    }
}

/// 64 random bits from the OS (getrandom(2)), so that the next port cannot
/// be predicted from the ports a client has seen.
fn random() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        // getrandom(2) does not fail once the kernel's pool is seeded; should
        // it, std's hasher keys are random per process, which still hides
        // the order from a client.
        use std::hash::BuildHasher;
        std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now())
    })
}

/// The pool's state stays consistent across a panic elsewhere (every update
/// is a few plain assignments), so a poisoned lock is safe to reuse.
fn lock(state: &Mutex<PoolState>) -> MutexGuard<'_, PoolState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A non-blocking listener on `addr`.
fn listen_on(addr: SocketAddr) -> io::Result<TcpListener> {
    // Non-blocking from socket(2) on: no fcntl round trip per pinhole.
    let kind = Type::STREAM.nonblocking();
    let socket = Socket::new(Domain::for_address(addr), kind, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Lets a port whose previous connection sits in TIME_WAIT be reused;
    // Linux still refuses it while another socket listens there.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::Ipv4Addr;

    fn pool(lo: u16, hi: u16) -> PortPool {
        PortPool::new("test", PortRange { lo, hi })
    }

    fn ip(last: u8) -> IpAddr {
        Ipv4Addr::new(192, 0, 2, last).into()
    }

    #[test]
    fn leases_every_port_once_then_is_exhausted() {
        let p = pool(50000, 50003);
        let leases: Vec<_> = (0..4).filter_map(|_| p.lease(ip(1)).ok()).collect();
        let ports: HashSet<u16> = leases.iter().map(PortLease::port).collect();
        assert_eq!(ports, (50000..=50003).collect());
        assert_eq!(p.in_use(), 4);
        assert!(matches!(
            p.lease(ip(1)),
            Err(OpenError::PoolExhausted("test"))
        ));
    }

    #[test]
    fn dropped_lease_returns_its_port() {
        let p = pool(50000, 50001);
        let a = p.lease(ip(1)).ok();
        let b = p.lease(ip(1)).ok();
        assert!(a.is_some() && b.is_some());
        assert!(p.lease(ip(1)).is_err());
        let freed = a.as_ref().map(PortLease::port);
        drop(a);
        assert_eq!(p.in_use(), 1);
        let again = p.lease(ip(1)).ok();
        assert_eq!(again.as_ref().map(PortLease::port), freed);
        drop((b, again));
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn a_returned_port_sits_out_half_the_pool() {
        // Lease and return one port at a time: no port comes back before
        // half the pool (5 returns) has gone by, although it is always free.
        let p = pool(50000, 50009);
        let mut last_seen: std::collections::HashMap<u16, usize> = Default::default();
        for round in 0..200 {
            let port = p.lease(ip(1)).map(|l| l.port()).unwrap(); // returned at once
            if let Some(prev) = last_seen.insert(port, round) {
                assert!(round - prev > 5, "port {port} again after {}", round - prev);
            }
        }
        assert_eq!(p.in_use(), 0);
        // Every port was used: the sit-out does not shrink the pool.
        assert_eq!(last_seen.len(), 10);
    }

    #[test]
    fn ports_are_drawn_at_random() {
        // Sequential handing-out would make these runs consecutive. Twenty
        // draws from a thousand ports: in order, or equal between two
        // pools, by chance with a probability far below 1e-40.
        let draw = || {
            let p = pool(30000, 30999);
            let leases: Vec<_> = (0..20).map(|_| p.lease(ip(1)).unwrap()).collect();
            leases.iter().map(PortLease::port).collect::<Vec<u16>>()
        };
        let (a, b) = (draw(), draw());
        assert_ne!(a, b, "two pools handed out the same sequence");
        let steps_of_one = a.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(steps_of_one < 5, "looks sequential: {a:?}");
        assert!(!a.windows(2).all(|w| w[0] < w[1]), "ascending: {a:?}");
    }

    #[test]
    fn a_client_holds_at_most_its_share() {
        let p = pool(50000, 50009).with_client_share(3);
        let mine: Vec<_> = (0..3).map(|_| p.lease(ip(1)).unwrap()).collect();
        match p.lease(ip(1)) {
            Err(e @ OpenError::ClientShare { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("192.0.2.1") && msg.contains('3'), "{msg}");
            }
            other => panic!("expected the client's share to be reached: {other:?}"),
        }
        assert_eq!(p.held_by(ip(1)), 3);
        // Another client is not affected.
        let theirs = p.lease(ip(2)).unwrap();
        assert_eq!(p.held_by(ip(2)), 1);
        // A returned port gives the client room again.
        drop(mine);
        assert_eq!(p.held_by(ip(1)), 0);
        assert!(p.lease(ip(1)).is_ok());
        drop(theirs);
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn an_exhausted_pool_says_so_before_the_share() {
        let p = pool(50000, 50001).with_client_share(2);
        let _a = p.lease(ip(1)).unwrap();
        let _b = p.lease(ip(2)).unwrap();
        assert!(matches!(
            p.lease(ip(2)),
            Err(OpenError::PoolExhausted("test"))
        ));
    }

    #[test]
    fn concurrent_leases_never_collide() {
        let p = pool(30000, 30999);
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for round in 0..500 {
                        if let Ok(l) = p.lease(ip(t)) {
                            held.push(l);
                        }
                        // Give some back so ports are reused across threads.
                        if round % 3 == 0 {
                            held.pop();
                        }
                    }
                    held
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in threads {
            all.extend(t.join().unwrap_or_default());
        }
        let distinct: HashSet<u16> = all.iter().map(PortLease::port).collect();
        assert_eq!(distinct.len(), all.len(), "a port was leased twice");
        assert_eq!(p.in_use(), all.len());
        drop(all);
        assert_eq!(p.in_use(), 0);
        assert_eq!(p.held_by(ip(0)), 0);
    }

    /// Two adjacent ports on loopback, both held (a pool's range is
    /// contiguous): the kernel's port 0 and the one above, until both bind.
    fn two_adjacent_ports() -> (TcpListener, TcpListener) {
        for _ in 0..100 {
            let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let Some(next) = a.local_addr().unwrap().port().checked_add(1) else {
                continue;
            };
            if let Ok(b) = TcpListener::bind((Ipv4Addr::LOCALHOST, next)) {
                return (a, b);
            }
        }
        panic!("no two adjacent free ports on 127.0.0.1 in 100 tries");
    }

    #[test]
    fn bind_skips_a_port_held_by_another_socket() {
        // Hold a port, free the one above, and build a two-port pool there.
        let (taken, above) = two_adjacent_ports();
        let port = taken.local_addr().unwrap().port();
        let hi = above.local_addr().unwrap().port();
        drop(above);
        // A share of one: the busy port tried first must not use it up.
        let p = pool(port, hi).with_client_share(1);
        let lo = IpAddr::from(Ipv4Addr::LOCALHOST);
        match p.bind(lo, ip(1)) {
            Ok((lease, listener)) => {
                assert_eq!(lease.port(), hi);
                assert_eq!(listener.local_addr().unwrap().port(), hi);
                assert_eq!(p.held_by(ip(1)), 1);
                // Both ports tried: one held by us, one by `taken`.
                assert!(matches!(
                    p.bind(lo, ip(2)),
                    Err(OpenError::PoolExhausted("test"))
                ));
                assert_eq!(p.in_use(), 1);
            }
            // Someone else holds `hi` too: then the pool must say so.
            Err(e) => assert!(matches!(e, OpenError::PoolExhausted("test")), "{e:?}"),
        }
        assert_eq!(p.in_use(), 0);
        assert_eq!(p.held_by(ip(1)), 0);
    }

    #[test]
    fn bind_never_joins_a_reuse_port_group() {
        // A listener that admits SO_REUSEPORT peers, as a gateway's control
        // listener does: a pinhole socket must not share its port, or a
        // second process could take connections meant for the first.
        let holder = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        holder.set_reuse_address(true).unwrap();
        holder.set_reuse_port(true).unwrap();
        holder
            .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .unwrap();
        holder.listen(8).unwrap();
        let port = holder.local_addr().unwrap().as_socket().unwrap().port();
        let p = pool(port, port);
        let got = p.bind(Ipv4Addr::LOCALHOST.into(), ip(1));
        assert!(
            matches!(got, Err(OpenError::PoolExhausted("test"))),
            "{got:?}"
        );
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn two_pools_over_one_range_never_share_a_port() {
        // Two gateways started from one rule file (the old one draining, the
        // new one taking over) each have a pool over the same range: a
        // port the first listens on is skipped by the second.
        let (a, b) = two_adjacent_ports();
        let port = a.local_addr().unwrap().port();
        let hi = b.local_addr().unwrap().port();
        drop((a, b));
        let lo = IpAddr::from(Ipv4Addr::LOCALHOST);
        let (old, new) = (pool(port, hi), pool(port, hi));
        let (old_lease, _old_listener) = old
            .bind(lo, ip(1))
            .expect("the old pool binds one of two ports just freed");
        let mut held = Vec::new();
        loop {
            match new.bind(lo, ip(2)) {
                Ok(pair) => {
                    assert_ne!(pair.0.port(), old_lease.port(), "port shared");
                    held.push(pair);
                }
                Err(e) => {
                    assert!(matches!(e, OpenError::PoolExhausted("test")), "{e:?}");
                    break;
                }
            }
        }
        // Exactly the one port the old pool does not hold.
        assert_eq!(held.len(), 1, "{} ports", held.len());
        let mut both = [old_lease.port(), held[0].0.port()];
        both.sort_unstable();
        assert_eq!(both, [port, hi]);
    }

    #[test]
    fn bind_on_v6_is_v6_only() {
        let p = pool(20000, 60000);
        let Ok((lease, listener)) = p.bind(std::net::Ipv6Addr::UNSPECIFIED.into(), ip(1)) else {
            eprintln!("skipped: no IPv6 on this host");
            return;
        };
        let sock = socket2::SockRef::from(&listener);
        assert!(sock.only_v6().unwrap());
        assert_eq!(listener.local_addr().unwrap().port(), lease.port());
    }
}
