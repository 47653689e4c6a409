//! Relay backend: the gateway ends both legs and copies the bytes.
//!
//! One task per plan: wait for every listen leg (wrong peers are turned
//! away), dial every connect leg, then relay until both directions are done.
//! A plan with a TLS leg makes that leg's handshake after the peer checks
//! (so a foreign peer never gets one) and is copied through user space
//! (`tls_copy`); other plans are spliced.
//! Dropping the plan's [`Pinhole`] aborts the task, frees its ports and
//! removes its nftables elements.

mod copy;
mod meter;
#[cfg(target_os = "linux")]
mod splice;
mod tls_copy;
#[cfg(test)]
mod tls_tests;

pub use copy::{relay, Counts, DataPath};

use super::{
    DataEvent, DataFailure, DataOutcome, DataPlan, DataSettings, DataTls, Leg, OpenError, Opened,
    Pinhole, PlanId, PlanTls, PortLease, PortPool, SessionInfo, TlsFailure, TlsLeg, Usage,
};
use crate::netfilter::{Element, InterceptTable};
use crate::proxy::proxy_protocol::{self, Header};
use copy::relay_metered;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tls_copy::{relay_streams, DataStream, Records};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

/// Carries out data plans by relaying through the gateway.
#[derive(Debug)]
pub struct RelayBackend {
    client_pool: PortPool,
    server_pool: PortPool,
    settings: DataSettings,
    /// The gateway's table, for transparent plans; `None` in reverse-only
    /// deployments, which then refuse transparent plans.
    intercept: Option<Arc<InterceptTable>>,
    /// Plans whose [`Held`] still exists: what [`RelayBackend::usage`] reports.
    live: Arc<AtomicUsize>,
}

impl RelayBackend {
    /// A backend drawing client-leg ports from `client_pool` and server-leg
    /// ports from `server_pool`.
    pub fn new(
        client_pool: PortPool,
        server_pool: PortPool,
        settings: DataSettings,
        intercept: Option<Arc<InterceptTable>>,
    ) -> Self {
        RelayBackend {
            client_pool,
            server_pool,
            settings,
            intercept,
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Opens `plan` and returns at once, once its listen legs listen;
    /// progress comes on `events`.
    pub async fn open(
        &self,
        session: &SessionInfo,
        plan: DataPlan,
        events: mpsc::UnboundedSender<DataEvent>,
    ) -> Result<(Opened, Pinhole), OpenError> {
        self.live.fetch_add(1, Ordering::Relaxed);
        let held = Arc::new(Held {
            inner: Mutex::new(HeldInner::default()),
            table: self.intercept.clone(),
            live: Arc::clone(&self.live),
        });
        let mut opened = Opened {
            client_listen: None,
            server_listen: None,
        };
        let mut elements = Vec::new();

        let client = self.client_leg(session, &plan, &held, &mut opened, &mut elements)?;
        let server = match plan.server {
            Leg::Listen { bind, peer } => {
                let (lease, listener) = self.server_pool.bind(bind, session.client.ip())?;
                let (listener, addr) = held.listen(bind, lease, listener)?;
                opened.server_listen = Some(addr);
                Pending::Listen { listener, peer }
            }
            Leg::Connect { target, bind } => Pending::Connect { target, bind },
        };

        if !elements.is_empty() {
            let Some(table) = &self.intercept else {
                return Err(OpenError::Io(io::Error::other(
                    "transparent data plan, but no nftables table to intercept with",
                )));
            };
            table.add(&elements).await?;
            held.lock().elements = elements.into_iter().map(|(e, _)| e).collect();
        }

        let id = plan.id;
        let task = tokio::spawn(run(
            plan,
            session.clone(),
            client,
            server,
            self.settings.clone(),
            Arc::clone(&held),
            events,
        ));
        let guard = PlanGuard {
            task: task.abort_handle(),
            held,
        };
        Ok((
            opened,
            Pinhole {
                id,
                guard: Box::new(guard),
            },
        ))
    }

    /// The client leg of `plan`: its listener (with the redirect element
    /// of a transparent plan), or where to connect (with the source NAT
    /// element of a transparent plan).
    fn client_leg(
        &self,
        session: &SessionInfo,
        plan: &DataPlan,
        held: &Held,
        opened: &mut Opened,
        elements: &mut Vec<(Element, Duration)>,
    ) -> Result<Pending, OpenError> {
        Ok(match plan.client {
            Leg::Listen { bind, peer } => {
                let ip = match plan.client_view {
                    // Reached through the redirect, whose destination is the
                    // incoming interface's address: listen on all of them.
                    Some(_) => unspecified(bind),
                    None => bind,
                };
                let (lease, listener) = self.client_pool.bind(ip, session.client.ip())?;
                if let Some(view) = plan.client_view {
                    // Client → (server, port) is redirected to our port.
                    let e = Element::Passive {
                        client: peer,
                        server: view,
                        port: lease.port(),
                    };
                    elements.push((e, self.settings.pinhole_timeout));
                }
                let (listener, addr) = held.listen(ip, lease, listener)?;
                opened.client_listen = Some(addr);
                Pending::Listen { listener, peer }
            }
            Leg::Connect { target, bind } => {
                if let Some(view) = plan.client_view {
                    // The client must see its data connection come from the
                    // address it believes is the server.
                    let e = Element::Active {
                        client: target,
                        source: view,
                    };
                    // Consulted when the dial starts, which can be up to
                    // pinhole_timeout from now, plus the connect time.
                    let timeout = self.settings.pinhole_timeout + self.settings.connect_timeout;
                    elements.push((e, timeout));
                }
                Pending::Connect { target, bind }
            }
        })
    }
}

impl RelayBackend {
    /// Plans not yet released, and the ports leased from both pools.
    pub fn usage(&self) -> Usage {
        Usage {
            plans: self.live.load(Ordering::Relaxed),
            ports: self.client_pool.in_use() + self.server_pool.in_use(),
        }
    }
}

/// The unspecified address of `ip`'s family.
fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// A pinhole's listener, shared by its plan's task, which accepts on it,
/// and by [`Held`], which closes it as soon as the plan is closed: a plan
/// superseded by the next PASV must be closed before that one binds, not
/// whenever the runtime gets round to dropping the aborted task.
type SharedListener = Arc<Mutex<Option<TcpListener>>>;

/// A leg before it has its connection.
enum Pending {
    Listen {
        listener: SharedListener,
        peer: IpAddr,
    },
    Connect {
        target: SocketAddr,
        bind: IpAddr,
    },
}

/// What a plan holds outside its task: shared by the task (which frees it
/// when the plan ends) and the guard (which frees it when dropped first).
#[derive(Debug)]
struct Held {
    inner: Mutex<HeldInner>,
    table: Option<Arc<InterceptTable>>,
    /// The backend's count of live plans; decremented on drop.
    live: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
struct HeldInner {
    leases: Vec<PortLease>,
    /// Closed before the leases are given back.
    listeners: Vec<SharedListener>,
    elements: Vec<Element>,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HeldInner> {
        // Plain data, consistent after any panic elsewhere.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `lease` and turns `listener`, bound to (`ip`, the lease's
    /// port), into a tokio listener; returns it with that address, which
    /// is known without asking the socket.
    fn listen(
        &self,
        ip: IpAddr,
        lease: PortLease,
        listener: std::net::TcpListener,
    ) -> Result<(SharedListener, SocketAddr), OpenError> {
        let addr = SocketAddr::new(ip, lease.port());
        let listener = Arc::new(Mutex::new(Some(TcpListener::from_std(listener)?)));
        let mut inner = self.lock();
        inner.leases.push(lease);
        inner.listeners.push(Arc::clone(&listener));
        Ok((listener, addr))
    }

    /// Closes the listeners, then gives their ports back.
    fn free_ports(&self) {
        let (listeners, leases) = {
            let mut inner = self.lock();
            (
                std::mem::take(&mut inner.listeners),
                std::mem::take(&mut inner.leases),
            )
        };
        for l in listeners {
            drop(take_listener(&l));
        }
        drop(leases);
    }

    /// Takes the elements still installed, so that only one caller removes
    /// them.
    fn take_elements(&self) -> Vec<Element> {
        std::mem::take(&mut self.lock().elements)
    }

    /// Removes the elements still installed, now.
    async fn remove_elements(&self) {
        let elements = self.take_elements();
        if let (Some(table), false) = (&self.table, elements.is_empty()) {
            table.remove_each(&elements).await;
        }
    }

    /// Frees the ports and removes the elements without waiting (for drop).
    fn release(&self) {
        self.free_ports();
        let elements = self.take_elements();
        if let (Some(table), false) = (&self.table, elements.is_empty()) {
            // Without a runtime (process exit) the kernel's timeouts remain.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let table = Arc::clone(table);
                rt.spawn(async move { table.remove_each(&elements).await });
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Covers an `open` that failed half-way, before any guard existed.
        self.release();
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The boxed guard inside a [`Pinhole`].
struct PlanGuard {
    task: AbortHandle,
    held: Arc<Held>,
}

impl Drop for PlanGuard {
    fn drop(&mut self) {
        self.task.abort();
        // At once, not when the runtime gets round to dropping the task.
        self.held.release();
    }
}

/// One plan, from waiting to the end of the relay.
async fn run(
    plan: DataPlan,
    session: SessionInfo,
    client: Pending,
    server: Pending,
    settings: DataSettings,
    held: Arc<Held>,
    events: mpsc::UnboundedSender<DataEvent>,
) {
    let (id, tls) = (plan.id, plan.tls);
    let outcome = connect_legs(id, &session, client, server, &settings, &held, &events).await;
    let (to_client, to_server, outcome) = match outcome {
        Ok((client, server)) if tls.any() => {
            relay_tls(id, tls, &session, client, server, &events).await
        }
        Ok((client, server)) => {
            let _ = events.send(DataEvent::Connected { id });
            let (counts, result) =
                relay_metered(&client, &server, DataPath::Splice, Some(&session.activity)).await;
            let outcome = match result {
                Ok(()) => DataOutcome::Completed,
                Err(e) => {
                    reset(&client);
                    reset(&server);
                    DataOutcome::Failed(super::DataFailure::Relay(e.to_string()))
                }
            };
            (counts.to_client, counts.to_server, outcome)
        }
        Err(outcome) => (0, 0, outcome),
    };
    tracing::debug!(
        session = session.id,
        plan = id,
        to_client,
        to_server,
        ?outcome,
        "data connection closed"
    );
    held.remove_elements().await;
    held.free_ports();
    let _ = events.send(DataEvent::Closed {
        id,
        to_client,
        to_server,
        outcome,
    });
}

/// A plan with a TLS leg, once both legs have their TCP connection: the
/// handshakes (both at once, each bounded by its side's timer), then the
/// copy through user space. `Connected` is reported once both handshakes
/// succeeded. Returns (to client, to server, outcome).
async fn relay_tls(
    id: PlanId,
    tls: PlanTls,
    session: &SessionInfo,
    client: TcpStream,
    server: TcpStream,
    events: &mpsc::UnboundedSender<DataEvent>,
) -> (u64, u64, DataOutcome) {
    // The session holds the transfer's final reply until the handshakes'
    // result, so a refusal (522) reaches the client whatever the server
    // answers first.
    let _ = events.send(DataEvent::Handshaking { id });
    // Until both handshakes succeed, a failure drops the connections with
    // RST: a peer must not take it for an orderly (empty) transfer.
    reset(&client);
    reset(&server);
    let secured = tokio::try_join!(
        secure_client(session, tls.client, client),
        secure_server(session, tls.server, server)
    );
    let (mut client, mut server) = match secured {
        Ok(pair) => pair,
        Err(failure) => {
            tracing::warn!(
                session = session.id,
                plan = id,
                reason = %failure,
                "data connection refused: TLS handshake failed"
            );
            return (0, 0, DataOutcome::Failed(failure));
        }
    };
    for s in [&client, &server] {
        let _ = socket2::SockRef::from(s.tcp()).set_linger(None);
    }
    let secured = DataTls {
        client: describe(&client),
        server: describe(&server),
    };
    tracing::debug!(
        session = session.id,
        plan = id,
        client = secured.client.as_deref().unwrap_or("plain"),
        server = secured.server.as_deref().unwrap_or("plain"),
        "data connection secured"
    );
    let _ = events.send(DataEvent::Secured { id, tls: secured });
    let _ = events.send(DataEvent::Connected { id });
    let (counts, result) = relay_streams(
        &mut client,
        &mut server,
        Some(&session.activity),
        session.id,
    )
    .await;
    let outcome = match result {
        Ok(()) => DataOutcome::Completed,
        Err(e) => {
            reset(client.tcp());
            reset(server.tcp());
            DataOutcome::Failed(DataFailure::Relay(e.to_string()))
        }
    };
    (counts.to_client, counts.to_server, outcome)
}

/// The client leg: TLS with the gateway as server when `tls`, refused
/// unless it resumed the control session where that is required.
async fn secure_client(
    session: &SessionInfo,
    tls: bool,
    tcp: TcpStream,
) -> Result<DataStream, DataFailure> {
    if !tls {
        return Ok(DataStream::Plain(tcp));
    }
    let failed = |reason| DataFailure::Tls {
        leg: TlsLeg::Client,
        reason,
    };
    let side = session
        .tls
        .client
        .as_ref()
        .ok_or(failed(TlsFailure::NoSessionTls))?;
    match side.accept_data(Records::new(tcp)).await {
        Ok(s) => Ok(DataStream::Tls(Box::new(s.into()))),
        Err(crate::tls::server::DataTlsError::NotResumed) => Err(failed(TlsFailure::NotResumed)),
        Err(crate::tls::server::DataTlsError::Handshake(e)) => {
            Err(failed(TlsFailure::Handshake(e.to_string())))
        }
    }
}

/// The server leg: TLS with the gateway as client when `tls`, resuming the
/// gateway's own control session with the server.
async fn secure_server(
    session: &SessionInfo,
    tls: bool,
    tcp: TcpStream,
) -> Result<DataStream, DataFailure> {
    if !tls {
        return Ok(DataStream::Plain(tcp));
    }
    let failed = |reason| DataFailure::Tls {
        leg: TlsLeg::Server,
        reason,
    };
    let side = session
        .tls
        .server
        .as_ref()
        .ok_or(failed(TlsFailure::NoSessionTls))?;
    match side.connect(Records::new(tcp)).await {
        Ok(s) => Ok(DataStream::Tls(Box::new(s.into()))),
        Err(e) => Err(failed(TlsFailure::Handshake(e.message))),
    }
}

/// A leg's TLS version and cipher; `None` in clear text.
fn describe(s: &DataStream) -> Option<String> {
    match s {
        DataStream::Plain(_) => None,
        DataStream::Tls(t) => Some(crate::tls::describe(t.get_ref().1)),
    }
}

/// Waits for the listen legs, then dials the connect legs.
/// Returns (client stream, server stream) or how the plan ended.
async fn connect_legs(
    id: PlanId,
    session: &SessionInfo,
    client: Pending,
    server: Pending,
    settings: &DataSettings,
    held: &Held,
    events: &mpsc::UnboundedSender<DataEvent>,
) -> Result<(TcpStream, TcpStream), DataOutcome> {
    let deadline = Instant::now() + settings.pinhole_timeout;
    // Each listener is dropped as soon as its leg has its connection, so a
    // second connection is refused.
    // Balancers relay data connections to the client side only.
    let headers = session.balancers.as_ref().map(|pp| Balancers {
        session: session.id,
        pp: Arc::clone(pp),
    });
    let waited = tokio::time::timeout_at(deadline, async {
        tokio::try_join!(
            accept_leg(id, client, events, headers.as_ref()),
            accept_leg(id, server, events, None)
        )
    })
    .await;
    let (client, server) = match waited {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            return Err(DataOutcome::Failed(super::DataFailure::Accept(
                e.to_string(),
            )))
        }
        Err(_) => return Err(DataOutcome::Expired),
    };

    let limit = settings.connect_timeout;
    let (client, server) = tokio::try_join!(dial_leg(client, limit), dial_leg(server, limit))
        .map_err(DataOutcome::Failed)?;
    // Connected: the intercept elements have done their one job.
    held.remove_elements().await;
    Ok((client, server))
}

/// A leg after the waiting phase: connected, or still to dial.
enum Ready {
    Stream(TcpStream),
    Dial { target: SocketAddr, bind: IpAddr },
}

/// The check a client listen leg makes of connections from the session's
/// trusted balancers.
struct Balancers {
    /// For the log line of a refused connection.
    session: u64,
    pp: Arc<crate::config::ProxyProtocol>,
}

/// A balancer's connection and its PROXY header, read or failed.
type HeaderRead = (TcpStream, SocketAddr, Result<Header, String>);

/// Connections from balancers one listen leg reads headers from at once;
/// one more is refused until a read ends. A balancer sends its header as
/// its first segment, so reads end within a round trip, and the right
/// client's connection never waits behind a stalled one.
const MAX_HEADER_READS: usize = 4;

/// Accepts on a listen leg until the expected peer arrives; a connect leg
/// passes through untouched.
///
/// With `balancers`, a connection from one of them must begin with a PROXY
/// header, read within the listener's `proxy_protocol.timeout`, whose
/// source is the expected peer; only the header's bytes are taken, so the
/// data behind it is relayed intact. Any other connection must come from
/// the peer itself. A refused connection is reset and reported, and the
/// leg goes on waiting for the right one.
async fn accept_leg(
    id: PlanId,
    leg: Pending,
    events: &mpsc::UnboundedSender<DataEvent>,
    balancers: Option<&Balancers>,
) -> io::Result<Ready> {
    let (listener, peer) = match leg {
        Pending::Listen { listener, peer } => (listener, peer),
        Pending::Connect { target, bind } => return Ok(Ready::Dial { target, bind }),
    };
    let mut refusals = Refusals {
        id,
        expected: peer,
        events,
        reported: 0,
    };
    // Dropped with the leg: a read still going is aborted, its stream closed.
    let mut reading: JoinSet<HeaderRead> = JoinSet::new();
    loop {
        let accept = std::future::poll_fn(|cx| match &*lock_listener(&listener) {
            Some(l) => l.poll_accept(cx),
            None => std::task::Poll::Ready(Err(io::Error::other("pinhole closed"))),
        });
        let (stream, from, header) = tokio::select! {
            accepted = accept => match accepted {
                Ok((stream, from)) => (stream, from, None),
                // The peer gave up before we got to it; keep waiting.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            },
            Some(read) = reading.join_next(), if !reading.is_empty() => match read {
                Ok((stream, from, header)) => (stream, from, Some(header)),
                // Only an abort or a panic of the read itself: nothing to answer.
                Err(_) => continue,
            },
        };
        let from_balancer = balancers.filter(|b| b.pp.trusts(from.ip()));
        let verdict = match (from_balancer, header) {
            (None, _) if same_ip(from.ip(), peer) => Ok(()),
            (None, _) => Err(Refusal::plain(from)),
            (Some(b), None) if reading.len() >= MAX_HEADER_READS => Err(Refusal::via(
                b,
                from,
                from,
                format!("{MAX_HEADER_READS} connections from balancers already wait for their PROXY header"),
            )),
            (Some(b), None) => {
                let timeout = b.pp.timeout;
                reading.spawn(async move {
                    let mut stream = stream;
                    let read = proxy_protocol::read_header(&mut stream);
                    let header = match tokio::time::timeout(timeout, read).await {
                        Ok(r) => r,
                        Err(_) => Err(format!("no complete PROXY header within {timeout:?}")),
                    };
                    (stream, from, header)
                });
                continue;
            }
            (Some(b), Some(Err(why))) => Err(Refusal::via(b, from, from, why)),
            (Some(b), Some(Ok(header))) => {
                // A LOCAL header is the balancer's own connection.
                let source = match header {
                    Header::Proxied { source, .. } => {
                        SocketAddr::new(source.ip().to_canonical(), source.port())
                    }
                    Header::Local => from,
                };
                if same_ip(source.ip(), peer) {
                    Ok(())
                } else {
                    let why = format!("the PROXY header names {source}, not the session's client");
                    Err(Refusal::via(b, from, source, why))
                }
            }
        };
        match verdict {
            Ok(()) => {
                // Closed now: a second connection is refused.
                drop(take_listener(&listener));
                return Ok(Ready::Stream(stream));
            }
            Err(refusal) => refusals.refuse(stream, refusal),
        }
    }
}

/// Why a connection to a listen leg was turned away.
struct Refusal<'a> {
    /// Who the connection says it is: its TCP peer, or the client its
    /// balancer's header names.
    from: SocketAddr,
    /// The balancer it came through, the session, and why it was refused.
    via: Option<(&'a Balancers, SocketAddr, String)>,
}

impl<'a> Refusal<'a> {
    /// A connection straight from someone other than the peer.
    fn plain(from: SocketAddr) -> Self {
        Refusal { from, via: None }
    }

    /// A connection from balancer `at`, naming `from`, refused for `why`.
    fn via(b: &'a Balancers, at: SocketAddr, from: SocketAddr, why: String) -> Self {
        Refusal {
            from,
            via: Some((b, at, why)),
        }
    }
}

/// Turns wrong connections away and reports the first of them.
struct Refusals<'a> {
    id: PlanId,
    expected: IpAddr,
    events: &'a mpsc::UnboundedSender<DataEvent>,
    reported: u32,
}

impl Refusals<'_> {
    /// Resets `stream`; reports it as a knock while under the bound.
    fn refuse(&mut self, stream: TcpStream, r: Refusal<'_>) {
        reset(&stream);
        drop(stream);
        // The event channel is unbounded and a session may be slow to drain
        // it (a write waiting on a client that does not read): a third party
        // knocking at the pinhole reports only its first knocks.
        if self.reported >= MAX_REJECTED_EVENTS {
            return;
        }
        self.reported += 1;
        if let Some((b, at, why)) = &r.via {
            // The session's own line says who and what was expected; this
            // one says which balancer and why.
            tracing::warn!(
                session = b.session,
                plan = self.id,
                via = %at,
                reason = %why,
                "data connection from a balancer refused"
            );
        }
        let _ = self.events.send(DataEvent::Rejected {
            id: self.id,
            from: r.from,
            expected: self.expected,
        });
    }
}

/// Rejected connections a listening leg reports (logged and counted); those
/// after them are still reset, but not reported.
const MAX_REJECTED_EVENTS: u32 = 8;

fn lock_listener(l: &SharedListener) -> std::sync::MutexGuard<'_, Option<TcpListener>> {
    // An Option, consistent after any panic elsewhere.
    l.lock().unwrap_or_else(|p| p.into_inner())
}

fn take_listener(l: &SharedListener) -> Option<TcpListener> {
    lock_listener(l).take()
}

/// Compares addresses, treating an IPv4-mapped IPv6 address as its IPv4 one.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

async fn dial_leg(leg: Ready, limit: Duration) -> Result<TcpStream, super::DataFailure> {
    let (target, bind) = match leg {
        Ready::Stream(s) => return Ok(s),
        Ready::Dial { target, bind } => (target, bind),
    };
    let dial = async {
        let socket = match target {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(bind, 0))?;
        socket.connect(target).await
    };
    match tokio::time::timeout(limit, dial).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(super::DataFailure::Connect {
            target,
            error: e.to_string(),
        }),
        Err(_) => Err(super::DataFailure::Connect {
            target,
            error: format!("timed out after {limit:?}"),
        }),
    }
}

/// Closes with RST rather than FIN: a peer must not take a broken transfer
/// (or a refused connection) for a complete one.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortRange;
    use crate::netfilter::netns::Netns;
    use crate::pinhole::{Activity, PlanTls, SessionTls};
    use std::collections::hash_map::DefaultHasher;
    use std::hash::Hasher;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const MIB: usize = 1024 * 1024;

    fn pools() -> (PortPool, PortPool) {
        // Wide ranges: ports other processes hold are skipped on EADDRINUSE.
        (
            PortPool::new(
                "client",
                PortRange {
                    lo: 20000,
                    hi: 39999,
                },
            ),
            PortPool::new(
                "server",
                PortRange {
                    lo: 40000,
                    hi: 60000,
                },
            ),
        )
    }

    fn backend(pinhole: Duration) -> (RelayBackend, PortPool, PortPool) {
        let (c, s) = pools();
        backend_with(pinhole, c, s)
    }

    fn backend_with(
        pinhole: Duration,
        c: PortPool,
        s: PortPool,
    ) -> (RelayBackend, PortPool, PortPool) {
        let settings = DataSettings {
            pinhole_timeout: pinhole,
            connect_timeout: Duration::from_secs(5),
        };
        (
            RelayBackend::new(c.clone(), s.clone(), settings, None),
            c,
            s,
        )
    }

    fn session() -> SessionInfo {
        SessionInfo {
            id: 7,
            client: "127.0.0.1:1".parse().unwrap(),
            server: "127.0.0.1:2".parse().unwrap(),
            activity: Activity::default(),
            balancers: None,
            tls: SessionTls::default(),
            control: None,
        }
    }

    fn lo() -> IpAddr {
        Ipv4Addr::LOCALHOST.into()
    }

    /// Deterministic test data, different per `seed`.
    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
            .collect()
    }

    fn digest(bytes: &[u8]) -> u64 {
        let mut h = DefaultHasher::new();
        h.write(bytes);
        h.finish()
    }

    async fn connect_from(bind: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
        let s = match to {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        s.bind(SocketAddr::new(bind, 0))?;
        s.connect(to).await
    }

    /// Sends `out`, then half-closes, while reading everything the peer sends.
    async fn exchange(mut s: TcpStream, out: Vec<u8>) -> io::Result<Vec<u8>> {
        let (mut r, mut w) = s.split();
        let send = async {
            w.write_all(&out).await?;
            w.shutdown().await
        };
        let mut got = Vec::new();
        let recv = r.read_to_end(&mut got);
        tokio::try_join!(send, recv)?;
        Ok(got)
    }

    /// `fut`, or a test failure if it is stuck.
    async fn bounded<T>(fut: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(20), fut)
            .await
            .expect("stuck: no progress in 20s")
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<DataEvent>) -> DataEvent {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("no event in time")
            .expect("event channel closed")
    }

    /// Both endpoints exchange 1 MiB each way through the plan's legs.
    async fn transfer(client: TcpStream, server: TcpStream) -> (Vec<u8>, Vec<u8>) {
        let up = data(MIB, 1);
        let down = data(MIB, 2);
        let both = async {
            tokio::try_join!(exchange(server, down.clone()), exchange(client, up.clone()))
        };
        // A lost half-close would hang both ends: fail instead.
        let (at_server, at_client) = bounded(both).await.expect("exchange");
        assert_eq!(
            digest(&at_server),
            digest(&up),
            "client→server bytes differ"
        );
        assert_eq!(
            digest(&at_client),
            digest(&down),
            "server→client bytes differ"
        );
        (at_client, at_server)
    }

    /// A plan that listens for the client and dials `server`, all on
    /// loopback.
    fn passive_plan(id: PlanId, server: &TcpListener) -> DataPlan {
        DataPlan {
            id,
            client: Leg::Listen {
                bind: lo(),
                peer: lo(),
            },
            server: Leg::Connect {
                target: server.local_addr().unwrap(),
                bind: lo(),
            },
            client_view: None,
            tls: PlanTls::default(),
        }
    }

    /// A passive plan opened on `b` with both sides connected and
    /// Connected reported: (client, server side, events, pinhole).
    async fn connected(
        b: &RelayBackend,
        id: PlanId,
    ) -> (
        TcpStream,
        TcpStream,
        mpsc::UnboundedReceiver<DataEvent>,
        Pinhole,
    ) {
        let server = TcpListener::bind((lo(), 0)).await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (opened, pinhole) = b
            .open(&session(), passive_plan(id, &server), tx)
            .await
            .unwrap();
        let client = connect_from(lo(), opened.client_listen.unwrap())
            .await
            .unwrap();
        let (server_side, _) = server.accept().await.unwrap();
        assert_eq!(next(&mut rx).await, DataEvent::Connected { id });
        (client, server_side, rx, pinhole)
    }

    fn closed_counts(ev: DataEvent, id: PlanId) -> (u64, u64, DataOutcome) {
        match ev {
            DataEvent::Closed {
                id: got,
                to_client,
                to_server,
                outcome,
            } if got == id => (to_client, to_server, outcome),
            other => panic!("expected Closed for {id}, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn passive_plan_relays_a_mebibyte_each_way() {
        let (b, cpool, spool) = backend(Duration::from_secs(10));
        let server = TcpListener::bind((lo(), 0)).await.unwrap();
        let plan = passive_plan(1, &server);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (opened, pinhole) = b.open(&session(), plan, tx).await.unwrap();
        assert_eq!(opened.server_listen, None);
        let addr = opened.client_listen.unwrap();
        assert!(cpool.range().contains(addr.port()));
        assert_eq!(cpool.in_use(), 1);

        let client = connect_from(lo(), addr).await.unwrap();
        // The server is dialled only once the client is in.
        let (server_side, _) = server.accept().await.unwrap();
        assert_eq!(next(&mut rx).await, DataEvent::Connected { id: 1 });
        transfer(client, server_side).await;
        let (to_client, to_server, outcome) = closed_counts(next(&mut rx).await, 1);
        assert_eq!((to_client, to_server), (MIB as u64, MIB as u64));
        assert_eq!(outcome, DataOutcome::Completed);
        assert_eq!((cpool.in_use(), spool.in_use()), (0, 0));
        drop(pinhole);
    }

    #[tokio::test]
    async fn passive_plan_over_ipv6() {
        let (b, _, _) = backend(Duration::from_secs(10));
        let v6: IpAddr = Ipv6Addr::LOCALHOST.into();
        let Ok(server) = TcpListener::bind((v6, 0)).await else {
            eprintln!("skipped: no IPv6 loopback");
            return;
        };
        let plan = DataPlan {
            id: 6,
            client: Leg::Listen { bind: v6, peer: v6 },
            server: Leg::Connect {
                target: server.local_addr().unwrap(),
                bind: v6,
            },
            client_view: None,
            tls: PlanTls::default(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (opened, _pinhole) = b.open(&session(), plan, tx).await.unwrap();
        let addr = opened.client_listen.unwrap();
        assert!(addr.is_ipv6());
        let client = connect_from(v6, addr).await.unwrap();
        let (server_side, _) = server.accept().await.unwrap();
        assert_eq!(next(&mut rx).await, DataEvent::Connected { id: 6 });
        transfer(client, server_side).await;
        let (c, s, outcome) = closed_counts(next(&mut rx).await, 6);
        assert_eq!(
            (c, s, outcome),
            (MIB as u64, MIB as u64, DataOutcome::Completed)
        );
    }

    #[tokio::test]
    async fn two_listen_legs() {
        let (b, cpool, spool) = backend(Duration::from_secs(10));
        let plan = DataPlan {
            id: 2,
            client: Leg::Listen {
                bind: lo(),
                peer: lo(),
            },
            server: Leg::Listen {
                bind: lo(),
                peer: lo(),
            },
            client_view: None,
            tls: PlanTls::default(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (opened, _pinhole) = b.open(&session(), plan, tx).await.unwrap();
        let (c_addr, s_addr) = (opened.client_listen.unwrap(), opened.server_listen.unwrap());
        assert!(cpool.range().contains(c_addr.port()));
        assert!(spool.range().contains(s_addr.port()));
        // The server side arrives first; nothing happens until the client does.
        let server = connect_from(lo(), s_addr).await.unwrap();
        let client = connect_from(lo(), c_addr).await.unwrap();
        assert_eq!(next(&mut rx).await, DataEvent::Connected { id: 2 });
        transfer(client, server).await;
        let (c, s, outcome) = closed_counts(next(&mut rx).await, 2);
        assert_eq!(
            (c, s, outcome),
            (MIB as u64, MIB as u64, DataOutcome::Completed)
        );
        assert_eq!((cpool.in_use(), spool.in_use()), (0, 0));
    }

    #[tokio::test]
    async fn two_connect_legs() {
        let (b, cpool, spool) = backend(Duration::from_secs(10));
        let client_end = TcpListener::bind((lo(), 0)).await.unwrap();
        let server_end = TcpListener::bind((lo(), 0)).await.unwrap();
        let plan = DataPlan {
            id: 3,
            client: Leg::Connect {
                target: client_end.local_addr().unwrap(),
                bind: lo(),
            },
            server: Leg::Connect {
                target: server_end.local_addr().unwrap(),
                bind: lo(),
            },
            client_view: None,
            tls: PlanTls::default(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (opened, _pinhole) = b.open(&session(), plan, tx).await.unwrap();
        assert_eq!(
            opened,
            Opened {
                client_listen: None,
                server_listen: None
            }
        );
        assert_eq!((cpool.in_use(), spool.in_use()), (0, 0));
        let ((client, _), (server, _)) =
            tokio::try_join!(client_end.accept(), server_end.accept()).unwrap();
        assert_eq!(next(&mut rx).await, DataEvent::Connected { id: 3 });
        transfer(client, server).await;
        let (c, s, outcome) = closed_counts(next(&mut rx).await, 3);
        assert_eq!(
            (c, s, outcome),
            (MIB as u64, MIB as u64, DataOutcome::Completed)
        );
    }

    #[tokio::test]
    async fn a_knocking_stranger_reports_only_its_first_knocks() {
        let (b, _, _) = backend(Duration::from_secs(10));
        let server = TcpListener::bind((lo(), 0)).await.unwrap();
        let plan = passive_plan(6, &server);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (opened, _pinhole) = b.open(&session(), plan, tx).await.unwrap();
        let addr = opened.client_listen.unwrap();
        let stranger_ip: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
        let knocks = 3 * MAX_REJECTED_EVENTS;
        for _ in 0..knocks {
            let mut stranger = connect_from(stranger_ip, addr).await.unwrap();
            // Reset at once: waiting for it orders the knocks.
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(5), stranger.read(&mut byte))
                .await
                .expect("rejected connection left open");
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        }
        // The right peer still gets in; the events before its Connected are
        // the reported knocks, and no more.
        let client = connect_from(lo(), addr).await.unwrap();
        let (server_side, _) = server.accept().await.unwrap();
        let mut rejected = 0;
        loop {
            match next(&mut rx).await {
                DataEvent::Rejected { id: 6, .. } => rejected += 1,
                DataEvent::Connected { id: 6 } => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(rejected, MAX_REJECTED_EVENTS);
        transfer(client, server_side).await;
        let (_, _, outcome) = closed_counts(next(&mut rx).await, 6);
        assert_eq!(outcome, DataOutcome::Completed);
    }

    /// At most MAX_HEADER_READS connections from balancers wait for their
    /// header at once; the next is refused at once, and a connection
    /// straight from the client is not held up by them.
    #[tokio::test]
    async fn header_reads_are_bounded_and_do_not_hold_up_the_client() {
        let (b, _, _) = backend(Duration::from_secs(10));
        let server = TcpListener::bind((lo(), 0)).await.unwrap();
        let balancer: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
        let mut info = session();
        info.balancers = Some(Arc::new(crate::config::ProxyProtocol {
            from: vec!["127.0.0.2/32".parse().unwrap()],
            timeout: Duration::from_secs(30),
            waiting: Default::default(),
        }));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (opened, _pinhole) = b.open(&info, passive_plan(9, &server), tx).await.unwrap();
        let addr = opened.client_listen.unwrap();
        // Connected, and silent: each holds a header read.
        let mut stalled = Vec::new();
        for _ in 0..MAX_HEADER_READS {
            stalled.push(connect_from(balancer, addr).await.unwrap());
        }
        let mut over = connect_from(balancer, addr).await.unwrap();
        let from = over.local_addr().unwrap();
        assert_eq!(
            next(&mut rx).await,
            DataEvent::Rejected {
                id: 9,
                from,
                expected: lo()
            }
        );
        let mut byte = [0u8; 1];
        let read = bounded(over.read(&mut byte)).await;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // The stalled reads do not hold up the client itself.
        let client = connect_from(lo(), addr).await.unwrap();
        let (server_side, _) = server.accept().await.unwrap();
        assert_eq!(next(&mut rx).await, DataEvent::Connected { id: 9 });
        transfer(client, server_side).await;
        let (_, _, outcome) = closed_counts(next(&mut rx).await, 9);
        assert_eq!(outcome, DataOutcome::Completed);
        // The reads ended with the leg: their connections are closed.
        for mut s in stalled {
            let read = bounded(s.read(&mut byte)).await;
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        }
    }

    #[tokio::test]
    async fn wrong_peer_is_rejected_and_the_right_one_still_gets_in() {
        let (b, _, _) = backend(Duration::from_secs(10));
        let server = TcpListener::bind((lo(), 0)).await.unwrap();
        let plan = passive_plan(4, &server);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (opened, _pinhole) = b.open(&session(), plan, tx).await.unwrap();
        let addr = opened.client_listen.unwrap();

        let stranger_ip: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
        let mut stranger = connect_from(stranger_ip, addr).await.unwrap();
        let from = stranger.local_addr().unwrap();
        assert_eq!(
            next(&mut rx).await,
            DataEvent::Rejected {
                id: 4,
                from,
                expected: lo()
            }
        );
        // Closed at once: the stranger reads EOF or a reset, never data.
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stranger.read(&mut byte))
            .await
            .expect("rejected connection left open");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

        let client = connect_from(lo(), addr).await.unwrap();
        let (server_side, _) = server.accept().await.unwrap();
        assert_eq!(next(&mut rx).await, DataEvent::Connected { id: 4 });
        transfer(client, server_side).await;
        let (_, _, outcome) = closed_counts(next(&mut rx).await, 4);
        assert_eq!(outcome, DataOutcome::Completed);
    }

    #[tokio::test]
    async fn unused_pinhole_expires_and_frees_its_port() {
        let (b, cpool, _) = backend(Duration::from_millis(200));
        let plan = DataPlan {
            id: 5,
            client: Leg::Listen {
                bind: lo(),
                peer: lo(),
            },
            server: Leg::Connect {
                target: "127.0.0.1:9".parse().unwrap(),
                bind: lo(),
            },
            client_view: None,
            tls: PlanTls::default(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (opened, _pinhole) = b.open(&session(), plan, tx).await.unwrap();
        assert_eq!(cpool.in_use(), 1);
        let (c, s, outcome) = closed_counts(next(&mut rx).await, 5);
        assert_eq!((c, s, outcome), (0, 0, DataOutcome::Expired));
        assert_eq!(cpool.in_use(), 0);
        // The listener is gone too.
        assert!(connect_from(lo(), opened.client_listen.unwrap())
            .await
            .is_err());
    }

    #[tokio::test]
    async fn failed_connect_leg_is_reported() {
        let (b, cpool, _) = backend(Duration::from_secs(10));
        // A port nobody listens on: learn one, then close it.
        let dead = TcpListener::bind((lo(), 0))
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let plan = DataPlan {
            id: 8,
            client: Leg::Listen {
                bind: lo(),
                peer: lo(),
            },
            server: Leg::Connect {
                target: dead,
                bind: lo(),
            },
            client_view: None,
            tls: PlanTls::default(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (opened, _pinhole) = b.open(&session(), plan, tx).await.unwrap();
        let mut client = connect_from(lo(), opened.client_listen.unwrap())
            .await
            .unwrap();
        let (c, s, outcome) = closed_counts(next(&mut rx).await, 8);
        assert_eq!((c, s), (0, 0));
        assert!(
            matches!(&outcome, DataOutcome::Failed(why) if why.to_string().contains(&dead.to_string())),
            "{outcome:?}"
        );
        assert_eq!(cpool.in_use(), 0);
        let mut byte = [0u8; 1];
        assert!(matches!(client.read(&mut byte).await, Ok(0) | Err(_)));
    }

    #[tokio::test]
    async fn half_close_lets_the_server_answer_after_client_eof() {
        let (b, _, _) = backend(Duration::from_secs(10));
        let (mut client, mut server_side, mut rx, _pinhole) = connected(&b, 9).await;

        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        // The server reads to EOF first, and only then replies.
        let mut req = Vec::new();
        bounded(server_side.read_to_end(&mut req)).await.unwrap();
        assert_eq!(req, b"request");
        server_side.write_all(b"reply after eof").await.unwrap();
        server_side.shutdown().await.unwrap();
        let mut reply = Vec::new();
        bounded(client.read_to_end(&mut reply)).await.unwrap();
        assert_eq!(reply, b"reply after eof");

        let (c, s, outcome) = closed_counts(next(&mut rx).await, 9);
        assert_eq!((c, s, outcome), (15, 7, DataOutcome::Completed));
    }

    #[tokio::test]
    async fn reset_mid_transfer_fails_and_resets_the_other_side() {
        let (b, _, _) = backend(Duration::from_secs(10));
        let (mut client, mut server_side, mut rx, _pinhole) = connected(&b, 10).await;
        server_side.write_all(b"partial").await.unwrap();
        let mut got = [0u8; 7];
        client.read_exact(&mut got).await.unwrap();
        reset(&server_side);
        drop(server_side);

        let (c, _, outcome) = closed_counts(next(&mut rx).await, 10);
        assert_eq!(c, 7);
        assert!(matches!(outcome, DataOutcome::Failed(_)), "{outcome:?}");
        // The client sees a reset, not an EOF that would pass for a complete file.
        let mut rest = Vec::new();
        assert!(client.read_to_end(&mut rest).await.is_err());
    }

    #[tokio::test]
    async fn dropping_the_pinhole_frees_ports_and_closes_listeners() {
        // Ranges no other test here uses: once freed, the ports must stay
        // closed, so another test's pool must not pick them up meanwhile.
        let (b, cpool, spool) = backend_with(
            Duration::from_secs(30),
            PortPool::new(
                "client",
                PortRange {
                    lo: 17000,
                    hi: 17999,
                },
            ),
            PortPool::new(
                "server",
                PortRange {
                    lo: 18000,
                    hi: 18999,
                },
            ),
        );
        let plan = DataPlan {
            id: 11,
            client: Leg::Listen {
                bind: lo(),
                peer: lo(),
            },
            server: Leg::Listen {
                bind: lo(),
                peer: lo(),
            },
            client_view: None,
            tls: PlanTls::default(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (opened, pinhole) = b.open(&session(), plan, tx).await.unwrap();
        assert_eq!((cpool.in_use(), spool.in_use()), (1, 1));
        drop(pinhole);
        assert_eq!((cpool.in_use(), spool.in_use()), (0, 0));
        // The aborted task ends without a Closed event: the channel closes.
        let ended = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("task not aborted");
        assert_eq!(ended, None);
        assert!(connect_from(lo(), opened.client_listen.unwrap())
            .await
            .is_err());
        assert!(connect_from(lo(), opened.server_listen.unwrap())
            .await
            .is_err());
    }

    #[tokio::test]
    async fn transparent_plan_without_table_is_refused_and_leaks_nothing() {
        let (b, cpool, _) = backend(Duration::from_secs(10));
        let plan = DataPlan {
            id: 12,
            client: Leg::Listen {
                bind: lo(),
                peer: lo(),
            },
            server: Leg::Connect {
                target: "127.0.0.1:9".parse().unwrap(),
                bind: lo(),
            },
            client_view: Some(Ipv4Addr::new(198, 51, 100, 7).into()),
            tls: PlanTls::default(),
        };
        let (tx, _rx) = mpsc::unbounded_channel();
        let err = b.open(&session(), plan, tx).await.unwrap_err();
        assert!(matches!(err, OpenError::Io(_)), "{err:?}");
        assert_eq!(cpool.in_use(), 0);
    }

    #[tokio::test]
    async fn exhausted_pool_refuses_the_plan() {
        let c = PortPool::new(
            "client",
            PortRange {
                lo: 20000,
                hi: 20000,
            },
        );
        let s = PortPool::new(
            "server",
            PortRange {
                lo: 40000,
                hi: 60000,
            },
        );
        let _only = c.lease(lo());
        let settings = DataSettings {
            pinhole_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
        };
        let b = RelayBackend::new(c, s.clone(), settings, None);
        let plan = DataPlan {
            id: 13,
            client: Leg::Listen {
                bind: lo(),
                peer: lo(),
            },
            server: Leg::Listen {
                bind: lo(),
                peer: lo(),
            },
            client_view: None,
            tls: PlanTls::default(),
        };
        let (tx, _rx) = mpsc::unbounded_channel();
        let err = b.open(&session(), plan, tx).await.unwrap_err();
        assert!(matches!(err, OpenError::PoolExhausted("client")), "{err:?}");
        assert_eq!(s.in_use(), 0);
    }

    /// Polls `nft list table` in `ns` until `pred` holds, within a bound.
    async fn until_listed(ns: &Netns, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, listed) = ns.nft(&["list", "table", "inet", "ftpgate_r"], None);
            if pred(&listed) {
                return listed;
            }
            assert!(Instant::now() < deadline, "never reached:\n{listed}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn transparent_plans_install_and_remove_their_elements() {
        let Some(ns) = Netns::new() else { return };
        let table = InterceptTable::create_with_prefix("ftpgate_r", ns.prefix())
            .await
            .expect("create");
        let (c, s) = pools();
        let settings = DataSettings {
            pinhole_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        };
        let b = RelayBackend::new(c, s, settings, Some(Arc::new(table)));
        let view: IpAddr = Ipv4Addr::new(198, 51, 100, 7).into();

        // Passive: the element exists while the pinhole waits, and goes once
        // the client is in (before Connected is reported).
        let server = TcpListener::bind((lo(), 0)).await.unwrap();
        let plan = DataPlan {
            client_view: Some(view),
            ..passive_plan(20, &server)
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (opened, _pasv) = b.open(&session(), plan, tx).await.unwrap();
        let addr = opened.client_listen.unwrap();
        assert!(addr.ip().is_unspecified(), "{addr}");
        let key = format!("127.0.0.1 . 198.51.100.7 . {} timeout 30s", addr.port());
        let (_, listed) = ns.nft(&["list", "table", "inet", "ftpgate_r"], None);
        assert!(listed.contains(&key), "{listed}");
        let client = connect_from(lo(), SocketAddr::new(lo(), addr.port()))
            .await
            .unwrap();
        let (server_side, _) = server.accept().await.unwrap();
        assert_eq!(next(&mut rx).await, DataEvent::Connected { id: 20 });
        let (_, listed) = ns.nft(&["list", "table", "inet", "ftpgate_r"], None);
        assert!(!listed.contains("198.51.100.7 . "), "{listed}");
        drop((client, server_side));

        // Active: the SNAT element is in place before the dial, and dropping
        // the pinhole removes it.
        let client_end = TcpListener::bind((lo(), 0)).await.unwrap();
        let target = client_end.local_addr().unwrap();
        let plan = DataPlan {
            id: 21,
            client: Leg::Connect { target, bind: lo() },
            server: Leg::Listen {
                bind: lo(),
                peer: lo(),
            },
            client_view: Some(view),
            tls: PlanTls::default(),
        };
        let (tx, _rx) = mpsc::unbounded_channel();
        let (_, actv) = b.open(&session(), plan, tx).await.unwrap();
        let key = format!("127.0.0.1 . {} timeout 35s", target.port());
        let (_, listed) = ns.nft(&["list", "table", "inet", "ftpgate_r"], None);
        assert!(
            listed.contains(&key) && listed.contains(": 198.51.100.7"),
            "{listed}"
        );
        drop(actv);
        until_listed(&ns, |l| !l.contains(&key)).await;
    }

    /// A connected loopback pair: (the end a test drives, the end the relay gets).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind((lo(), 0)).await.unwrap();
        let (outer, inner) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (outer.unwrap(), inner.unwrap().0)
    }

    const PATHS: [DataPath; 2] = [DataPath::Splice, DataPath::Buffered];

    #[tokio::test]
    async fn each_path_relays_megabytes_each_way_with_exact_counts() {
        for path in PATHS {
            let (client, client_in) = pair().await;
            let (server, server_in) = pair().await;
            let relayed = tokio::spawn(async move { relay(&client_in, &server_in, path).await });
            // Sizes that are no multiple of a page, a pipe or a buffer.
            let up = data(8 * MIB + 4093, 3);
            let down = data(12 * MIB + 1, 4);
            let (at_server, at_client) = bounded(async {
                tokio::try_join!(exchange(server, down.clone()), exchange(client, up.clone()))
            })
            .await
            .expect("exchange");
            assert_eq!(digest(&at_server), digest(&up), "{path:?} up");
            assert_eq!(digest(&at_client), digest(&down), "{path:?} down");
            let (counts, result) = bounded(relayed).await.unwrap();
            result.unwrap_or_else(|e| panic!("{path:?}: {e}"));
            let want = Counts {
                to_client: down.len() as u64,
                to_server: up.len() as u64,
            };
            assert_eq!(counts, want, "{path:?}");
        }
    }

    #[tokio::test]
    async fn each_path_keeps_the_half_close() {
        for path in PATHS {
            let (mut client, client_in) = pair().await;
            let (mut server, server_in) = pair().await;
            let relayed = tokio::spawn(async move { relay(&client_in, &server_in, path).await });
            client.write_all(b"request").await.unwrap();
            client.shutdown().await.unwrap();
            let mut req = Vec::new();
            bounded(server.read_to_end(&mut req)).await.unwrap();
            assert_eq!(req, b"request", "{path:?}");
            server.write_all(b"reply after eof").await.unwrap();
            server.shutdown().await.unwrap();
            let mut reply = Vec::new();
            bounded(client.read_to_end(&mut reply)).await.unwrap();
            assert_eq!(reply, b"reply after eof", "{path:?}");
            let (counts, result) = bounded(relayed).await.unwrap();
            assert!(result.is_ok(), "{path:?}: {result:?}");
            let want = Counts {
                to_client: 15,
                to_server: 7,
            };
            assert_eq!(counts, want, "{path:?}");
        }
    }

    #[tokio::test]
    async fn each_path_fails_on_a_reset_and_counts_what_was_written() {
        for path in PATHS {
            let (mut client, client_in) = pair().await;
            let (mut server, server_in) = pair().await;
            let relayed = tokio::spawn(async move { relay(&client_in, &server_in, path).await });
            server.write_all(b"partial").await.unwrap();
            let mut got = [0u8; 7];
            bounded(client.read_exact(&mut got)).await.unwrap();
            assert_eq!(&got, b"partial", "{path:?}");
            reset(&server);
            drop(server);
            let (counts, result) = bounded(relayed).await.unwrap();
            assert!(result.is_err(), "{path:?}: a reset passed for an EOF");
            assert_eq!(counts.to_client, 7, "{path:?}");
        }
    }

    #[tokio::test]
    async fn dropping_the_pinhole_mid_transfer_ends_the_relay() {
        let (b, cpool, _) = backend(Duration::from_secs(10));
        let (mut client, mut server_side, mut rx, pinhole) = connected(&b, 14).await;
        // Data in flight, source still open: the relay is inside its loop.
        server_side.write_all(&data(MIB, 5)).await.unwrap();
        let mut first = vec![0u8; 4096];
        bounded(client.read_exact(&mut first)).await.unwrap();
        drop(pinhole);
        assert_eq!(cpool.in_use(), 0);
        let ended = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("task not aborted");
        assert_eq!(ended, None);
        // Both ends see the connection go (EOF or reset), not a stall.
        let mut rest = Vec::new();
        let _ = bounded(client.read_to_end(&mut rest)).await;
        assert!(rest.len() < MIB, "more than was sent arrived");
        let mut byte = [0u8; 1];
        assert!(matches!(
            bounded(server_side.read(&mut byte)).await,
            Ok(0) | Err(_)
        ));
    }

    #[test]
    fn mapped_v4_counts_as_the_same_peer() {
        let cases = [
            ("127.0.0.1", "127.0.0.1", true),
            ("::ffff:127.0.0.1", "127.0.0.1", true),
            ("127.0.0.2", "127.0.0.1", false),
            ("::1", "127.0.0.1", false),
        ];
        for (a, b, same) in cases {
            assert_eq!(
                same_ip(a.parse().unwrap(), b.parse().unwrap()),
                same,
                "{a} {b}"
            );
        }
    }
}
