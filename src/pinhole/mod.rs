//! Data connections: what a data plan is, the port pools, and who carries a
//! plan out.
//!
//! The session core decides a [`DataPlan`]; the [`Backend`] opens it and
//! reports back through [`DataEvent`]s. Dropping the returned [`Pinhole`]
//! closes whatever is still open (listeners, relays, nftables elements), so a
//! session that ends cannot leak a pinhole.
//!
//! [`Backend::open`] is the one place that decides which backend carries a
//! plan: the [`relay`] (the gateway ends both legs) or the [`kernel`]
//! (nftables NAT, for the plans it can carry). Neither backend calls the
//! other.

pub(crate) mod kernel;
pub(crate) mod pool;
pub mod relay;

pub use pool::{PortLease, PortPool};

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Identifies a plan inside its session.
pub type PlanId = u64;

/// One leg of a data plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// The gateway listens on `bind` (port from the leg's pool) and admits one
    /// connection, from `peer` only.
    Listen {
        /// Local address to bind.
        bind: IpAddr,
        /// The only address allowed to connect.
        peer: IpAddr,
    },
    /// The gateway connects to `target`, from `bind` (any port).
    Connect {
        /// Where to connect.
        target: SocketAddr,
        /// Local source address.
        bind: IpAddr,
    },
}

/// What the core asks the shell to open for one transfer.
///
/// Listen legs are waited for first (both at once when there are two);
/// connect legs are made once every listen leg has its connection. So in a
/// passive plan the server is dialled only after the client arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataPlan {
    /// Unique within the session.
    pub id: PlanId,
    /// The gateway↔client leg.
    pub client: Leg,
    /// The gateway↔server leg.
    pub server: Leg,
    /// Transparent mode only: the address the client believes is the server.
    /// A client listen leg is then reached at (this, port) and a client
    /// connect leg must appear to come from this address; the backend makes
    /// that so with elements in its nftables table.
    pub client_view: Option<IpAddr>,
    /// Which legs carry TLS (each leg's own PROT P); the session's
    /// [`SessionTls`] sides make the handshakes. A plan with a TLS leg is
    /// carried by the relay, which alone can read the bytes.
    pub tls: PlanTls,
}

/// Which legs of a plan carry TLS (that leg's PROT P). The gateway is the TLS
/// server on the client leg and the TLS client on the server leg, whichever end dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlanTls {
    /// The client leg carries TLS, the gateway as TLS server.
    pub client: bool,
    /// The server leg carries TLS, the gateway as TLS client.
    pub server: bool,
}

impl PlanTls {
    /// Whether any leg carries TLS.
    pub fn any(self) -> bool {
        self.client || self.server
    }
}

/// A session's TLS sides, which the plan's TLS legs use.
#[derive(Debug, Clone, Default)]
pub struct SessionTls {
    /// The gateway as TLS server toward the client (the control session's
    /// own cache and ticket key, so data connections resume it).
    pub client: Option<crate::tls::server::SessionServer>,
    /// The gateway as TLS client toward the server (the control session's
    /// own resumption store, so data connections resume it).
    pub server: Option<crate::tls::client::SessionClient>,
}

/// Session context a backend needs for logs and for nftables keys.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// Session id, carried by every log line.
    pub id: u64,
    /// The client's control-connection peer.
    pub client: SocketAddr,
    /// The server's control-connection address.
    pub server: SocketAddr,
    /// When the session's data bytes last moved: a backend touches it, and
    /// the session's idle timer reads it, so that a long transfer on a
    /// quiet control connection is not taken for an idle session.
    pub activity: Activity,
    /// The listener's trusted balancers (`proxy_protocol`), if it has
    /// any: a data connection from one of them reaches a client listen leg
    /// only behind a PROXY header that names `client`.
    pub balancers: Option<Arc<crate::config::ProxyProtocol>>,
    /// The session's TLS sides; a plan's TLS leg whose side is `None` fails
    /// with [`DataFailure::Tls`] ([`TlsFailure::NoSessionTls`]).
    pub tls: SessionTls,
    /// The control connections as connection tracking knows them: the
    /// kernel backend makes its expectations on them. `None` where there
    /// are none (tests of other parts).
    pub control: Option<ControlConns>,
}

/// The session's two control connections, by their sockets' addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlConns {
    /// The client's connection: the gateway's end.
    pub client_local: SocketAddr,
    /// The client's connection: the peer's end (a balancer, behind one).
    pub client_peer: SocketAddr,
    /// Where the client's connection was addressed before any DNAT.
    pub client_dst: SocketAddr,
    /// The gateway's connection to the server: its own end.
    pub server_local: SocketAddr,
    /// The gateway's connection to the server: the server's end.
    pub server: SocketAddr,
}

/// When bytes last moved, shared by a session and the tasks that move its
/// bytes (data relays, TLS passthrough). Cheap to touch: one clock read and
/// one atomic store.
#[derive(Debug, Clone)]
pub struct Activity(Arc<ActivityInner>);

#[derive(Debug)]
struct ActivityInner {
    epoch: Instant,
    /// Microseconds from `epoch` to the last byte, plus one; 0: none yet.
    last: AtomicU64,
    /// Connected data connections whose bytes cannot be seen while they
    /// flow (the kernel backend): each counts as activity until it ends.
    unseen: AtomicUsize,
}

impl Default for Activity {
    fn default() -> Self {
        Activity(Arc::new(ActivityInner {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            unseen: AtomicUsize::new(0),
        }))
    }
}

impl Activity {
    /// Bytes moved just now.
    pub(crate) fn touch(&self) {
        let us = self.0.epoch.elapsed().as_micros() as u64;
        self.0.last.store(us + 1, Ordering::Relaxed);
    }

    /// A connection whose bytes this process cannot see is up; it counts as
    /// activity until the returned guard is dropped.
    pub(crate) fn unseen(&self) -> UnseenGuard {
        self.0.unseen.fetch_add(1, Ordering::Relaxed);
        UnseenGuard(self.clone())
    }

    /// Until when the session is busy with its data, given `idle`: the last
    /// byte plus `idle`, or now plus `idle` while an unseen connection is
    /// up. `None` if no byte ever moved.
    pub(crate) fn busy_until(&self, idle: Duration) -> Option<Instant> {
        if self.0.unseen.load(Ordering::Relaxed) > 0 {
            return Some(Instant::now() + idle);
        }
        match self.0.last.load(Ordering::Relaxed) {
            0 => None,
            us => Some(self.0.epoch + Duration::from_micros(us - 1) + idle),
        }
    }
}

/// Returned by [`Activity::unseen`]; ends that activity when dropped.
#[derive(Debug)]
pub(crate) struct UnseenGuard(Activity);

impl Drop for UnseenGuard {
    fn drop(&mut self) {
        self.0 .0.unseen.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a backend opened: the ports that must be announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Where the client listen leg listens (`None` for a connect leg).
    pub client_listen: Option<SocketAddr>,
    /// Where the server listen leg listens (`None` for a connect leg).
    pub server_listen: Option<SocketAddr>,
}

/// Why a plan could not be opened; the client gets 425.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Every port of a pool is taken.
    #[error("no free port in {0} pool")]
    PoolExhausted(&'static str),
    /// The client already holds its share of a pool
    /// (`data.max_ports_per_client`).
    #[error("client {client} already holds {share} ports of the {pool} pool, its share (data.max_ports_per_client)")]
    ClientShare {
        /// "client" or "server".
        pool: &'static str,
        /// The client address the ports are counted against.
        client: IpAddr,
        /// The most ports that address may hold.
        share: usize,
    },
    /// A socket or nftables call failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// How a data connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataOutcome {
    /// Both legs connected and the relay finished.
    Completed,
    /// Nobody (or only wrong peers) connected within `pinhole_timeout`.
    Expired,
    /// A connect leg failed, or a leg broke mid-transfer.
    Failed(DataFailure),
}

/// Why a data connection failed. Its text is the transfer log line's
/// `result`. Errors are kept as their text, so that outcomes stay `Clone`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataFailure {
    /// A connect leg could not reach its target (refused, timed out...).
    #[error("connect to {target}: {error}")]
    Connect {
        /// Where the leg dialled.
        target: SocketAddr,
        /// The error, or the time limit that passed.
        error: String,
    },
    /// Accepting on a listen leg failed.
    #[error("accept: {0}")]
    Accept(String),
    /// The relay's I/O broke mid-transfer.
    #[error("relay: {0}")]
    Relay(String),
    /// The conntrack watcher that follows kernel-carried connections stopped.
    #[error("conntrack watcher stopped")]
    WatcherStopped,
    /// The session ended before the backend reported the connection's end.
    #[error("data connection's end not reported")]
    EndNotReported,
    /// No data connection carried the transfer (none armed, or its plan was
    /// closed unused).
    #[error("no data connection")]
    NoDataConnection,
    /// A leg's TLS handshake failed or was refused.
    #[error("TLS on the {leg} leg: {reason}")]
    Tls {
        /// The leg whose handshake failed.
        leg: TlsLeg,
        /// Why.
        reason: TlsFailure,
    },
}

impl DataFailure {
    /// Whether this is a client data connection that did not resume its
    /// control session where that is required: vsftpd answers it with
    /// `522 SSL connection failed: session reuse required`.
    pub fn not_resumed(&self) -> bool {
        matches!(
            self,
            DataFailure::Tls {
                reason: TlsFailure::NotResumed,
                ..
            }
        )
    }
}

/// The leg of a data plan that a TLS failure concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsLeg {
    /// Gateway↔client: the gateway is the TLS server.
    Client,
    /// Gateway↔server: the gateway is the TLS client.
    Server,
}

impl std::fmt::Display for TlsLeg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsLeg::Client => "client",
            TlsLeg::Server => "server",
        })
    }
}

/// Why a data leg's TLS handshake gave no stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsFailure {
    /// The client's data connection made a full handshake where resuming
    /// its control session's TLS session is required.
    #[error("session reuse required: the data connection did not resume the control session's TLS session")]
    NotResumed,
    /// The handshake failed or passed its time limit; the error's text.
    #[error("{0}")]
    Handshake(String),
    /// The plan asks for TLS on a leg for which the session has no TLS
    /// side (a bug in whoever built the plan, reported, not panicked on).
    #[error("the session has no TLS side for this leg")]
    NoSessionTls,
}

/// The TLS version and cipher of each leg of one data connection, e.g.
/// `TLSv1.3 TLS13_AES_256_GCM_SHA384`; `None` on a clear-text leg.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataTls {
    /// The client leg (the gateway as TLS server).
    pub client: Option<String>,
    /// The server leg (the gateway as TLS client).
    pub server: Option<String>,
}

/// Reports from a plan's task to its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataEvent {
    /// Every leg is connected; bytes flow.
    Connected {
        /// The plan.
        id: PlanId,
    },
    /// Both legs have their TCP connections and the TLS handshakes are
    /// under way (a plan with a TLS leg only). `Connected` (success) or
    /// `Closed` (failure) follows within the handshakes' time limit.
    Handshaking {
        /// The plan.
        id: PlanId,
    },
    /// Both legs' TLS handshakes succeeded (a plan with a TLS leg only;
    /// sent just before `Connected`), for the transfer's log and audit line.
    Secured {
        /// The plan.
        id: PlanId,
        /// What each leg negotiated.
        tls: DataTls,
    },
    /// A connection to a listen leg came from the wrong address; it was closed.
    Rejected {
        /// The plan.
        id: PlanId,
        /// Who tried.
        from: SocketAddr,
        /// Who was expected.
        expected: IpAddr,
    },
    /// The plan is over; its ports are free again.
    Closed {
        /// The plan.
        id: PlanId,
        /// Bytes written to the client.
        to_client: u64,
        /// Bytes written to the server.
        to_server: u64,
        /// How it ended.
        outcome: DataOutcome,
    },
}

/// An open plan. Dropping it closes everything that is still open.
pub struct Pinhole {
    /// The plan's id.
    pub id: PlanId,
    /// Closes the plan when dropped.
    pub guard: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for Pinhole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinhole").field("id", &self.id).finish()
    }
}

/// Carries out data plans. One instance serves every session.
#[derive(Debug)]
pub enum Backend {
    /// `data.backend: relay`: the relay carries every plan.
    Relay(relay::RelayBackend),
    /// `data.backend: nftables`: the kernel carries the plans it can (one
    /// listen and one connect leg of one address family); the relay
    /// carries the rest.
    Kernel {
        /// Carries plans by NAT in the gateway's table.
        kernel: kernel::KernelBackend,
        /// Carries conversion and mixed-family plans.
        relay: relay::RelayBackend,
    },
}

impl Backend {
    /// The socket mark the gateway's control connections to servers must
    /// carry: the kernel backend's `data.conntrack_mark`, as at start (a
    /// reload does not change it).
    pub fn conntrack_mark(&self) -> Option<u32> {
        match self {
            Backend::Relay(_) => None,
            Backend::Kernel { kernel, .. } => Some(kernel.mark()),
        }
    }

    /// Opens `plan` and returns at once (after binding / installing
    /// elements); progress comes on `events`.
    pub async fn open(
        &self,
        session: &SessionInfo,
        plan: DataPlan,
        events: mpsc::UnboundedSender<DataEvent>,
    ) -> Result<(Opened, Pinhole), OpenError> {
        let (kernel, relay) = match self {
            Backend::Relay(relay) => return relay.open(session, plan, events).await,
            Backend::Kernel { kernel, relay } => (kernel, relay),
        };
        match kernel_shape(session, &plan) {
            // The kernel's expectations are a shared, bounded table: past
            // the backend's share of it, the relay carries the plan.
            Ok(shape) => match kernel
                .open(session, plan.clone(), shape, events.clone())
                .await
            {
                Err(OpenError::Io(e)) if kernel::to_relay(&e) => tracing::info!(
                    session = session.id,
                    plan = plan.id,
                    "data plan goes to the relay: {e}"
                ),
                opened => return opened,
            },
            Err(why) => tracing::debug!(
                session = session.id,
                plan = plan.id,
                "data plan needs the relay ({why})"
            ),
        }
        let (opened, pinhole) = relay.open(session, plan, events).await?;
        // The relay listens on these ports: an earlier kernel plan's claim
        // on them would drop its connections.
        for addr in [opened.client_listen, opened.server_listen]
            .into_iter()
            .flatten()
        {
            kernel.release_claim(addr.port()).await;
        }
        Ok((opened, pinhole))
    }

    /// Warns when the kernel's expectation table is small for
    /// `max_sessions` sessions (see the kernel backend's share of it).
    pub fn check_expect_max(&self, max_sessions: usize) {
        if let Backend::Kernel { kernel, .. } = self {
            kernel.check_expect_max(max_sessions);
        }
    }

    /// Deletes what outlives the gateway's table: the kernel backend's
    /// expectations still waiting for their connection. Call it at exit,
    /// before the table is destroyed.
    pub async fn close(&self) {
        if let Backend::Kernel { kernel, .. } = self {
            kernel.close().await;
        }
    }

    /// What is open now: the data plans not yet fully released and the
    /// ports they lease. The gateway logs it when the shutdown grace period
    /// ends with sessions still open; tests use it to prove that a refused
    /// command opened nothing.
    pub fn usage(&self) -> Usage {
        match self {
            Backend::Relay(relay) => relay.usage(),
            Backend::Kernel { kernel, relay } => Usage {
                plans: kernel.plans() + relay.usage().plans,
                // The two share the pools: the relay's count is the whole.
                ports: relay.usage().ports,
            },
        }
    }
}

/// How the kernel would carry `plan`, or why only the relay can (the text
/// of the debug line).
fn kernel_shape(session: &SessionInfo, plan: &DataPlan) -> Result<kernel::Shape, &'static str> {
    // NAT forwards TLS records untouched: only the relay can end a TLS leg
    // (and resume the session's TLS sessions on it).
    if plan.tls.any() {
        return Err("a TLS leg, which the kernel cannot end");
    }
    // The kernel forwards a balancer's connection without reading its
    // PROXY header, so it could not tell whose data connection it is.
    let headers = session.balancers.is_some() && matches!(plan.client, Leg::Listen { .. });
    match kernel::Shape::of(plan) {
        Some(_) if headers => Err(
            "a balancer's data connection starts with a PROXY header, which only the relay reads",
        ),
        // The kernel admits the connection as an expectation of a control
        // connection of the plan's family.
        Some(shape) => match &session.control {
            Some(c) if shape.expectation(0, c).is_some() => Ok(shape),
            _ => Err("no control connection of the plan's family to make an expectation on"),
        },
        None => Err("conversion or mixed families"),
    }
}

/// What a backend holds open at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Plans not yet fully released (listeners, relays, elements).
    pub plans: usize,
    /// Ports leased from the client and server pools together.
    pub ports: usize,
}

/// Settings every backend shares.
#[derive(Debug, Clone)]
pub struct DataSettings {
    /// An unused pinhole closes after this.
    pub pinhole_timeout: Duration,
    /// Limit on each connect leg.
    pub connect_timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_with_a_tls_leg_never_go_to_the_kernel() {
        let session = SessionInfo {
            id: 1,
            client: "192.0.2.1:1000".parse().unwrap(),
            server: "198.51.100.2:21".parse().unwrap(),
            activity: Activity::default(),
            balancers: None,
            tls: SessionTls::default(),
            control: Some(ControlConns {
                client_local: "127.0.0.1:21".parse().unwrap(),
                client_peer: "127.0.0.1:1000".parse().unwrap(),
                client_dst: "127.0.0.1:21".parse().unwrap(),
                server_local: "127.0.0.1:1001".parse().unwrap(),
                server: "127.0.0.1:2100".parse().unwrap(),
            }),
        };
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        // A plain passive plan of one family: the kernel's shape.
        let plan = DataPlan {
            id: 1,
            client: Leg::Listen { bind: lo, peer: lo },
            server: Leg::Connect {
                target: "127.0.0.1:2000".parse().unwrap(),
                bind: lo,
            },
            client_view: None,
            tls: PlanTls::default(),
        };
        assert!(kernel_shape(&session, &plan).is_ok());
        // Without a control connection of its family to be the master of
        // its expectation, the relay carries it.
        let unknown = SessionInfo {
            control: None,
            ..session.clone()
        };
        assert!(kernel_shape(&unknown, &plan).is_err());
        for (client, server) in [(true, false), (false, true), (true, true)] {
            let tls = PlanTls { client, server };
            let plan = DataPlan {
                tls,
                ..plan.clone()
            };
            assert_eq!(
                kernel_shape(&session, &plan).err(),
                Some("a TLS leg, which the kernel cannot end"),
                "{tls:?}"
            );
        }
    }

    #[test]
    fn activity_is_the_last_touch_plus_idle() {
        let idle = Duration::from_secs(60);
        let a = Activity::default();
        assert_eq!(a.busy_until(idle), None, "nothing moved yet");
        let before = Instant::now();
        a.clone().touch();
        let until = a.busy_until(idle).unwrap();
        assert!(
            until >= before + idle - Duration::from_millis(1),
            "{until:?}"
        );
        assert!(until <= Instant::now() + idle);
    }

    #[test]
    fn an_unseen_connection_is_busy_until_it_ends() {
        let idle = Duration::from_secs(60);
        let a = Activity::default();
        let (g1, g2) = (a.unseen(), a.unseen());
        let asked = Instant::now();
        assert!(a.busy_until(idle).unwrap() >= asked + idle);
        drop(g1);
        assert!(a.busy_until(idle).unwrap() >= asked + idle, "one still up");
        drop(g2);
        assert_eq!(a.busy_until(idle), None, "no byte was ever seen");
    }
}
