//! Port pools over `client_ports` and `server_ports`.
//!
//! A pool hands out each port to one lease at a time. A rotating cursor makes
//! the next lease start after the last one, so a port just given back is not
//! handed out again at once (its old connection may still be in TIME_WAIT,
//! and a late packet for the old pinhole should not reach a new one).

use super::OpenError;
use crate::config::PortRange;
use socket2::{Domain, Protocol, Socket, Type};
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
    state: Arc<Mutex<PoolState>>,
}

#[derive(Debug)]
struct PoolState {
    /// `taken[i]` is true while port `range.lo + i` is leased.
    taken: Vec<bool>,
    /// Index where the next search starts.
    cursor: usize,
    in_use: usize,
}

/// A port taken from a pool; returned when dropped.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    index: usize,
    state: Arc<Mutex<PoolState>>,
}

impl PortPool {
    /// A pool over `range`; `name` is used in errors ("client", "server").
    pub fn new(name: &'static str, range: PortRange) -> Self {
        let state = PoolState {
            taken: vec![false; range.len()],
            cursor: 0,
            in_use: 0,
        };
        PortPool {
            name,
            range,
            state: Arc::new(Mutex::new(state)),
        }
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
    pub fn in_use(&self) -> usize {
        lock(&self.state).in_use
    }

    /// Takes the next free port after the cursor, or `None` when every port
    /// is leased.
    pub fn lease(&self) -> Option<PortLease> {
        let mut st = lock(&self.state);
        let len = st.taken.len();
        if st.in_use == len {
            return None;
        }
        // Free ports are plentiful in practice, so this scan is short.
        let start = st.cursor;
        let index = (0..len)
            .map(|i| (start + i) % len)
            .find(|&i| !st.taken[i])?;
        // index < len <= 65536 - lo, so this neither fails nor overflows.
        let port = self.range.lo + u16::try_from(index).ok()?;
        st.taken[index] = true;
        st.in_use += 1;
        st.cursor = (index + 1) % len;
        Some(PortLease {
            port,
            index,
            state: Arc::clone(&self.state),
        })
    }

    /// Leases a port and binds a listener on (`ip`, port).
    ///
    /// A port that another process holds (`EADDRINUSE`) is skipped and the
    /// next one tried; [`OpenError::PoolExhausted`] once every free port of
    /// the pool was tried. An IPv6 listener is v6-only, so `[::]` never
    /// catches IPv4 connections meant for another socket. The listener is
    /// non-blocking, ready for `tokio::net::TcpListener::from_std`.
    pub fn bind(&self, ip: IpAddr) -> Result<(PortLease, TcpListener), OpenError> {
        // Ports that failed stay leased until we are done, so that each
        // attempt is a different port and the loop ends.
        let mut busy = Vec::new();
        loop {
            let Some(lease) = self.lease() else {
                return Err(OpenError::PoolExhausted(self.name));
            };
            match listen_on(SocketAddr::new(ip, lease.port)) {
                Ok(listener) => return Ok((lease, listener)),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => busy.push(lease),
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
}

impl Drop for PortLease {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        if st.taken[self.index] {
            st.taken[self.index] = false;
            st.in_use -= 1;
        }
    }
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

    #[test]
    fn leases_every_port_once_then_is_exhausted() {
        let p = pool(50000, 50003);
        let leases: Vec<_> = (0..4).filter_map(|_| p.lease()).collect();
        let ports: HashSet<u16> = leases.iter().map(PortLease::port).collect();
        assert_eq!(ports, (50000..=50003).collect());
        assert_eq!(p.in_use(), 4);
        assert!(p.lease().is_none());
    }

    #[test]
    fn dropped_lease_returns_its_port() {
        let p = pool(50000, 50001);
        let a = p.lease();
        let b = p.lease();
        assert!(a.is_some() && b.is_some());
        assert!(p.lease().is_none());
        let freed = a.as_ref().map(PortLease::port);
        drop(a);
        assert_eq!(p.in_use(), 1);
        let again = p.lease();
        assert_eq!(again.as_ref().map(PortLease::port), freed);
        drop((b, again));
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn cursor_rotates_past_a_returned_port() {
        let p = pool(50000, 50009);
        let first = p.lease().map(|l| l.port()); // returned at once
        let second = p.lease().map(|l| l.port());
        assert_ne!(first, second);
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn concurrent_leases_never_collide() {
        let p = pool(30000, 30999);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for round in 0..500 {
                        if let Some(l) = p.lease() {
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
    }

    #[test]
    fn bind_skips_a_port_held_by_another_socket() {
        // Learn a free port, hold it, and build a two-port pool starting there.
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let Some(hi) = port.checked_add(1) else {
            return; // the kernel gave us 65535; nothing above it to try
        };
        let p = pool(port, hi);
        match p.bind(Ipv4Addr::LOCALHOST.into()) {
            Ok((lease, listener)) => {
                assert_eq!(lease.port(), hi);
                assert_eq!(listener.local_addr().unwrap().port(), hi);
                // Both ports tried: one held by us, one by `taken`.
                assert!(matches!(
                    p.bind(Ipv4Addr::LOCALHOST.into()),
                    Err(OpenError::PoolExhausted("test"))
                ));
                assert_eq!(p.in_use(), 1);
            }
            // Someone else holds `hi` too: then the pool must say so.
            Err(e) => assert!(matches!(e, OpenError::PoolExhausted("test"))),
        }
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn bind_on_v6_is_v6_only() {
        let p = pool(20000, 60000);
        let Ok((lease, listener)) = p.bind(std::net::Ipv6Addr::UNSPECIFIED.into()) else {
            eprintln!("skipped: no IPv6 on this host");
            return;
        };
        let sock = socket2::SockRef::from(&listener);
        assert!(sock.only_v6().unwrap());
        assert_eq!(listener.local_addr().unwrap().port(), lease.port());
    }
}
