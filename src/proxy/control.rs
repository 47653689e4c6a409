//! One control connection: find the server, apply the rules, connect, then
//! feed the session core and carry out its actions.

use super::proxy_protocol::{self, Header, Sniff};
use super::tls_ctx::{ControlStream, ListenerContexts, Readable};
use super::{origdst, Gateway, SessionSlot};
use crate::config::{Config, Limits, Listener, ListenerMode, ProxyProtocol, ProxyVersion};
use crate::escape::Escaped;
use crate::ftp::rewrite;
use crate::metrics::{OpenGuard, Refusal};
use crate::pinhole::{Activity, DataEvent, DataPlan, Pinhole, PlanId, SessionInfo};
use crate::rules::{decide, Decision, Policy};
use crate::session::{
    Action, Direction, EndReason, LogEvent, OpenFailure, Refused, Session, SessionParams, Side,
    TlsLegs, TransferRecord,
};
use crate::tls::client::SessionClient;
use crate::tls::server::SessionServer;
use socket2::SockRef;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{info, info_span, warn, Instrument};

/// Runs one session to its end. Never panics the process; every failure is
/// logged in the session's span.
pub(super) async fn session(
    gateway: Arc<Gateway>,
    listener: Arc<Listener>,
    client: TcpStream,
    peer: SocketAddr,
    id: u64,
) {
    let span = info_span!("session", id, listener = %listener.name);
    run(gateway, listener, client, peer, id)
        .instrument(span)
        .await
}

async fn run(
    gateway: Arc<Gateway>,
    listener: Arc<Listener>,
    mut client: TcpStream,
    peer: SocketAddr,
    id: u64,
) {
    let started = Instant::now();
    let _open = gateway.metrics.session_opened(&listener.name);
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    // ABOR arrives with urgent data (ftplib sends the whole line with
    // MSG_OOB): keep the urgent byte in the stream, or the line loses its LF.
    let _ = SockRef::from(&client).set_out_of_band_inline(true);
    let _ = client.set_nodelay(true);
    let Ok(client_local) = client.local_addr() else {
        return;
    };
    // From here on the client is the real one: behind a balancer, the one
    // its PROXY header names.
    let Some(who) = real_client(&gateway, &listener, &mut client, peer, client_local).await else {
        return;
    };
    let socket_peer = peer;
    let peer = who.addr;
    let Some((server, announce, transparent)) =
        destination(&gateway, &listener, &mut client, &who).await
    else {
        return;
    };
    // Held for the whole session, and while a later check refuses it.
    let Some(_slot) = acquire_slot(&gateway, &mut client, &who).await else {
        return;
    };
    let Some(tls) = session_tls(&gateway, &listener, &mut client, &who).await else {
        return;
    };
    // An implicit listener's TLS starts at the first byte, behind the
    // PROXY header if any; the refusals below are then sent in TLS.
    let mut client = match (
        &tls.server,
        listener.tls.as_ref().is_some_and(|t| t.implicit),
    ) {
        (Some(server), true) => match server.accept_control(client).await {
            Ok(s) => ControlStream::Tls(Box::new(s.into())),
            Err(e) => {
                warn!(client = %who.addr, reason = %e, "client TLS handshake failed (implicit listener): connection closed");
                return;
            }
        },
        _ => ControlStream::Plain(client),
    };
    // One configuration for the whole session, even across a reload.
    let config = gateway.config();
    let Some(policy) = allow(&gateway, &config, &mut client, &who, server).await else {
        return;
    };
    let limits = &config.limits;
    let Some((upstream, server_local)) =
        connect(&gateway, &listener, &tls, limits, &mut client, &who, server).await
    else {
        return;
    };
    let server_local = SocketAddr::new(server_local.ip().to_canonical(), server_local.port());
    let client_local = SocketAddr::new(client_local.ip().to_canonical(), client_local.port());
    gateway.metrics.session_setup(started.elapsed());
    let via = who.via.map(tracing::field::display);
    let tls_client = client.describe();
    let tls_server = upstream.describe();
    info!(client = %peer, via, %server, rule = %policy.rule, mode = listener.mode.kind().as_str(), tls = %policy.tls.as_str(), tls_client, tls_server, "session start");
    let upstream_tls = listener.upstream_tls.as_ref();
    let params = SessionParams {
        client: peer,
        client_local,
        server,
        server_local,
        transparent,
        announce,
        policy,
        tls: TlsLegs {
            client_cert: tls.server.is_some(),
            client_implicit: matches!(client, ControlStream::Tls(_)),
            upstream: upstream_tls.map_or(crate::config::UpstreamMode::Off, |u| u.mode),
            allow_downgrade: upstream_tls.is_some_and(|u| u.allow_downgrade),
            data_tls: DATA_TLS,
        },
    };
    let idle = limits.idle_timeout;
    let mut conn = Conn::new(&gateway, &listener, id, params, client, upstream, idle);
    conn.info.control = Some(crate::pinhole::ControlConns {
        client_local,
        client_peer: SocketAddr::new(socket_peer.ip().to_canonical(), socket_peer.port()),
        // Before any DNAT: the server in transparent mode (the connection
        // was redirected), else the address the client connected to.
        client_dst: if transparent { server } else { client_local },
        server_local,
        server,
    });
    // The data plane resumes these very sides on each data connection.
    conn.info.tls = crate::pinhole::SessionTls {
        client: tls.server.clone(),
        server: tls.client.clone(),
    };
    conn.tls = tls;
    conn.sniff = who.sniff.then(Vec::new);
    conn.via = who.via;
    let reason = conn.drive().await;
    conn.end(started, reason);
}

/// Who a session is for, as its listener learns it.
struct Client {
    /// The real client: the TCP peer, or the one a balancer's header names.
    addr: SocketAddr,
    /// The balancer the connection came through.
    via: Option<SocketAddr>,
    /// What the client connected to: the balancer's front end (from its
    /// header), or this listener. A header sent upstream names it.
    front: SocketAddr,
    /// The client's first bytes must not be a PROXY header: the listener
    /// takes headers from balancers only, and from each connection once.
    sniff: bool,
    /// The balancer's own session (a LOCAL or UNKNOWN header): a header
    /// sent upstream says so rather than naming the balancer as a client.
    local: bool,
}

/// The session's client: the TCP peer, or the real client that a trusted
/// balancer names in its PROXY header. Closes the connection, with a log
/// line, when a balancer's header is missing, malformed, truncated or
/// late, or when [`ProxyProtocol::MAX_WAITING`] connections of the
/// listener already wait for theirs.
async fn real_client(
    gateway: &Gateway,
    listener: &Listener,
    client: &mut TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) -> Option<Client> {
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    let direct = |sniff| Client {
        addr: peer,
        via: None,
        front: local,
        sniff,
        local: false,
    };
    let Some(pp) = &listener.proxy_protocol else {
        return Some(direct(false));
    };
    if !pp.trusts(peer.ip()) {
        return Some(direct(true));
    }
    // Taken before the wait: a host inside `from` that connects and sends
    // nothing holds a bounded number of connections.
    let Some(_waiting) = pp.waiting.enter(ProxyProtocol::MAX_WAITING) else {
        gateway.metrics.refused(Refusal::proxy_header);
        warn!(
            via = %peer,
            max = ProxyProtocol::MAX_WAITING,
            "PROXY header not awaited: as many connections of this listener already wait for theirs; connection closed"
        );
        let _ = client.shutdown().await;
        return None;
    };
    let why = match tokio::time::timeout(pp.timeout, proxy_protocol::read_header(client)).await {
        // A health check, or a client the balancer cannot name: the
        // session is the balancer's own, as the specification says.
        Ok(Ok(Header::Local)) => {
            return Some(Client {
                via: Some(peer),
                local: true,
                ..direct(true)
            })
        }
        Ok(Ok(Header::Proxied {
            source,
            destination,
        })) => {
            let source = SocketAddr::new(source.ip().to_canonical(), source.port());
            let why = if let Some(what) = not_a_client(source, peer, local) {
                // Taken as the client, such an address would pass the
                // PORT/EPRT check for the gateway's own services (a bounce).
                format!("the PROXY header names {source}, {what}, which no client can be")
            } else if source.is_ipv4() == local.is_ipv4() {
                let front = SocketAddr::new(destination.ip().to_canonical(), destination.port());
                return Some(Client {
                    addr: source,
                    via: Some(peer),
                    front,
                    sniff: true,
                    local: false,
                });
            } else {
                // Its data connections come straight to the gateway, on an
                // address of the listener's family, which this client lacks.
                format!(
                    "the PROXY header names {source}, not of the address family of this listener ({local}), so its data connections could not reach the gateway"
                )
            };
            let who = Client {
                addr: source,
                via: Some(peer),
                ..direct(false)
            };
            refuse_session(gateway, Refusal::proxy_header, client, &who, &why).await;
            return None;
        }
        Ok(Err(why)) => why,
        Err(_) => format!("no complete PROXY header within {:?}", pp.timeout),
    };
    gateway.metrics.refused(Refusal::proxy_header);
    warn!(via = %peer, reason = %why, "PROXY header refused: connection closed");
    let _ = client.shutdown().await;
    None
}

/// What makes `source`, named by the PROXY header of the balancer at
/// `balancer`, impossible as a client: an unspecified, multicast or
/// broadcast address, or port 0; and, from a balancer on another host, a
/// loopback address or the gateway's own address (a loopback client of that
/// host is not one of this host's).
fn not_a_client(
    source: SocketAddr,
    balancer: SocketAddr,
    local: SocketAddr,
) -> Option<&'static str> {
    let ip = source.ip();
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    let same_host = balancer.ip().is_loopback();
    if ip.is_loopback() && !same_host {
        Some("a loopback address, from a balancer on another host")
    } else if ip == local.ip().to_canonical() && !same_host {
        Some("the gateway's own address")
    } else if ip.is_unspecified() {
        Some("an unspecified address")
    } else if ip.is_multicast() || broadcast {
        Some("a multicast or broadcast address")
    } else if source.port() == 0 {
        Some("port 0")
    } else {
        None
    }
}

/// Where the session goes, what 227 replies announce, and whether the
/// listener is transparent: the listener's upstream, or the intercepted
/// connection's original destination. Refuses the session when there is
/// none.
async fn destination(
    gateway: &Gateway,
    listener: &Listener,
    client: &mut TcpStream,
    who: &Client,
) -> Option<(SocketAddr, Option<IpAddr>, bool)> {
    match &listener.mode {
        ListenerMode::Reverse { upstream, announce } => Some((*upstream, *announce, false)),
        ListenerMode::Transparent => match origdst::original_destination(client, listener.listen) {
            Ok(dst) => Some((dst, None, true)),
            Err(e) => {
                let why = format!("{e}");
                refuse_session(gateway, Refusal::no_destination, client, who, &why).await;
                None
            }
        },
    }
}

/// The session's slot under the session limits, or the session refused.
async fn acquire_slot(
    gateway: &Gateway,
    client: &mut TcpStream,
    who: &Client,
) -> Option<SessionSlot> {
    match gateway.limits.acquire(who.addr.ip()) {
        Ok(slot) => Some(slot),
        Err(hit) => {
            let why = match hit {
                super::limits::LimitHit::Total(n) => {
                    format!("too many sessions (max_sessions {n})")
                }
                super::limits::LimitHit::PerClient(n) => {
                    format!(
                        "too many sessions from {} (max_sessions_per_client {n})",
                        who.addr.ip()
                    )
                }
            };
            refuse_session(gateway, Refusal::limit, client, who, &why).await;
            None
        }
    }
}

/// The data plane carries TLS data connections (the relay; plans with a
/// TLS leg never go to the kernel backend), so PROT P is answered 200 and
/// asked of the server. The core refuses PROT P with 536 without it.
const DATA_TLS: bool = true;

/// One session's TLS sides: the listener's, with a session cache and
/// resumption store of the session's own, so that its data connections
/// resume this control session and no other.
#[derive(Default)]
struct SessionTlsSides {
    server: Option<SessionServer>,
    client: Option<SessionClient>,
}

/// The session's TLS sides, or the session refused when the listener's
/// could not be built.
async fn session_tls(
    gateway: &Gateway,
    listener: &Listener,
    client: &mut TcpStream,
    who: &Client,
) -> Option<SessionTlsSides> {
    if listener.tls.is_none() && listener.upstream_tls.is_none() {
        return Some(SessionTlsSides::default());
    }
    let built = gateway
        .tls
        .for_listener(listener)
        .and_then(|c: Arc<ListenerContexts>| {
            let server = match &c.server {
                Some(s) => Some(s.for_session().map_err(|e| format!("TLS session: {e}"))?),
                None => None,
            };
            Ok(SessionTlsSides {
                server,
                client: c.client.as_ref().map(|c| c.for_session()),
            })
        });
    match built {
        Ok(sides) => Some(sides),
        Err(why) => {
            refuse_session(gateway, Refusal::unreachable, client, who, &why).await;
            None
        }
    }
}

/// The policy of the rule that allows this session, or the session refused.
async fn allow(
    gateway: &Gateway,
    config: &Config,
    client: &mut ControlStream,
    who: &Client,
    server: SocketAddr,
) -> Option<Policy> {
    match decide(config, who.addr.ip(), server) {
        Decision::Allow(p) => Some(p),
        Decision::Deny(rule) => {
            let why = match rule {
                Some(r) => format!("denied by rule '{r}'"),
                None => "no rule allows this session".to_string(),
            };
            let why = format!("{why} (server {server})");
            refuse_session(gateway, Refusal::rule, client, who, &why).await;
            None
        }
    }
}

/// The control connection to `server`, made within `connect_timeout`, or
/// the session refused. With `upstream_proxy_protocol`, a PROXY header
/// naming the real client and what it connected to goes first, within the
/// same time. With `upstream_tls: implicit` the TLS handshake follows (its
/// own bound); a refused certificate gives the client 421 and says why.
/// Gives the connection and its local address.
async fn connect(
    gateway: &Gateway,
    listener: &Listener,
    tls: &SessionTlsSides,
    limits: &Limits,
    client: &mut ControlStream,
    who: &Client,
    server: SocketAddr,
) -> Option<(ControlStream, SocketAddr)> {
    let header = listener.upstream_proxy_protocol.map(|version| {
        let h = if who.local {
            Header::Local
        } else {
            Header::Proxied {
                source: who.addr,
                destination: who.front,
            }
        };
        match version {
            ProxyVersion::V1 => proxy_protocol::encode_v1(&h),
            ProxyVersion::V2 => proxy_protocol::encode_v2(&h),
        }
    });
    let mark = gateway.backend.conntrack_mark();
    let dial = async {
        let mut upstream = dial_marked(server, mark)
            .await
            .map_err(|e| format!("cannot reach server {server}: {e}"))?;
        if let Some(header) = &header {
            // A fresh connection's send buffer takes the header at once.
            upstream
                .write_all(header)
                .await
                .map_err(|e| format!("cannot send the PROXY header to server {server}: {e}"))?;
        }
        Ok::<_, String>(upstream)
    };
    let why = match tokio::time::timeout(limits.connect_timeout, dial).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            let local = s.local_addr().ok()?;
            let implicit = listener
                .upstream_tls
                .as_ref()
                .is_some_and(|u| u.mode == crate::config::UpstreamMode::Implicit);
            match (&tls.client, implicit) {
                (Some(tls), true) => match tls.connect(s).await {
                    Ok(s) => return Some((ControlStream::Tls(Box::new(s.into())), local)),
                    Err(e) => {
                        let why = format!("TLS to server {server}: {e}");
                        refuse_session(gateway, Refusal::unreachable, client, who, &why).await;
                        return None;
                    }
                },
                _ => return Some((ControlStream::Plain(s), local)),
            }
        }
        Ok(Err(why)) => why,
        Err(_) => format!(
            "cannot reach server {server}: no answer within {:?}",
            limits.connect_timeout
        ),
    };
    refuse_session(gateway, Refusal::unreachable, client, who, &why).await;
    None
}

/// Connects to `server`. With `mark` the socket carries it (SO_MARK), so
/// that the kernel backend's table finds the control connection
/// (`meta mark`, table.nft) and makes it a master of expectations.
async fn dial_marked(server: SocketAddr, mark: Option<u32>) -> std::io::Result<TcpStream> {
    let Some(mark) = mark else {
        return TcpStream::connect(server).await;
    };
    let socket = match server {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    SockRef::from(&socket).set_mark(mark)?;
    socket.connect(server).await
}

/// Tells the client why with 421, logs and counts it, and closes. The line
/// names the balancer the client came through, if any.
async fn refuse_session<W: AsyncWrite + Unpin>(
    gateway: &Gateway,
    reason: Refusal,
    client: &mut W,
    who: &Client,
    why: &str,
) {
    gateway.metrics.refused(reason);
    let via = who.via.map(tracing::field::display);
    warn!(client = %who.addr, via, what = "SESSION", code = 421u16, reason = %why, "refused");
    let reply = rewrite::reply(421, &format!("Service not available: {why}"));
    // A fresh connection's send buffer takes one line at once; the timer
    // is there for the exception.
    let limit = gateway.config().limits.idle_timeout;
    let _ = tokio::time::timeout(limit, client.write_all(&reply)).await;
    let _ = client.shutdown().await;
}

struct Conn<'a> {
    gateway: &'a Gateway,
    listener: &'a Listener,
    info: SessionInfo,
    core: Session,
    client: ControlStream,
    upstream: ControlStream,
    /// The session's TLS sides (certificate toward the client, trust
    /// toward the server).
    tls: SessionTlsSides,
    /// Each leg's TLS version and cipher, once started.
    tls_client: Option<String>,
    tls_server: Option<String>,
    /// Decrypted bytes of a TLS leg's read; empty until TLS starts.
    client_buf: Vec<u8>,
    upstream_buf: Vec<u8>,
    /// Open plans; dropping one closes its pinholes and lowers the gauge.
    pinholes: HashMap<PlanId, (Pinhole, OpenGuard)>,
    /// `idle_timeout` of the session's configuration.
    idle: std::time::Duration,
    from_client: u64,
    from_server: u64,
    /// Rate limit of the log lines that a peer can trigger at will.
    peer_lines: LogBudget,
    /// When the last data connection connected: the core has no clock, so
    /// a transfer's duration is measured here, up to its log event.
    data_connected: Option<Instant>,
    /// The client's first bytes, held while they may still turn out to be
    /// a PROXY header (a peer that is no balancer, on a listener that takes
    /// them); `None` once they cannot, or where no check is needed. At most
    /// a signature's length (12 bytes) is held.
    sniff: Option<Vec<u8>>,
    /// The balancer the client came through, if any.
    via: Option<SocketAddr>,
    /// Transfer commands forwarded so far (the core's count, see
    /// `SessionServer::tickets_on_data`).
    transfers_forwarded: u64,
}

impl<'a> Conn<'a> {
    /// A connected session, before its first byte is read.
    fn new(
        gateway: &'a Gateway,
        listener: &'a Listener,
        id: u64,
        params: SessionParams,
        client: ControlStream,
        upstream: ControlStream,
        idle: Duration,
    ) -> Self {
        let info = SessionInfo {
            id,
            client: params.client,
            server: params.server,
            activity: Activity::default(),
            balancers: listener.proxy_protocol.clone().map(Arc::new),
            tls: crate::pinhole::SessionTls::default(),
            control: None,
        };
        Conn {
            gateway,
            listener,
            info,
            core: Session::new(params),
            tls_client: client.describe(),
            tls_server: upstream.describe(),
            client_buf: tls_buf(&client),
            upstream_buf: tls_buf(&upstream),
            client,
            upstream,
            tls: SessionTlsSides::default(),
            pinholes: HashMap::new(),
            idle,
            from_client: 0,
            from_server: 0,
            peer_lines: LogBudget::default(),
            data_connected: None,
            sniff: None,
            via: None,
            transfers_forwarded: 0,
        }
    }

    /// Closes the session's pinholes, then writes its last line.
    fn end(self, started: Instant, reason: Ended) {
        let totals = self.core.totals();
        drop(self.pinholes);
        info!(
            duration_ms = started.elapsed().as_millis() as u64,
            control_from_client = self.from_client,
            control_from_server = self.from_server,
            data_to_client = totals.data_to_client,
            data_to_server = totals.data_to_server,
            transfers = totals.transfers,
            tls_client = self.tls_client,
            tls_server = self.tls_server,
            %reason,
            "session end"
        );
    }
}

/// Refusal and ignored-reply lines a session logs before the rate limit.
const LOG_BURST: u32 = 10;

/// The log lines a peer triggers at will (refusals, ignored replies): the
/// first [`LOG_BURST`] are written, then at most one a second, which says
/// how many were suppressed since the one before. Every refusal is still
/// counted in the metrics.
#[derive(Default)]
struct LogBudget {
    logged: u32,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogBudget {
    /// Whether to write this line; `Some(k)` with the `k` lines suppressed
    /// before it.
    fn admit(&mut self) -> Option<u64> {
        let now = Instant::now();
        let due = match self.last {
            Some(t) if self.logged >= LOG_BURST => {
                now.duration_since(t) >= std::time::Duration::from_secs(1)
            }
            _ => true,
        };
        if !due {
            self.suppressed += 1;
            return None;
        }
        self.logged = self.logged.saturating_add(1);
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Largest read from a control connection at once. The buffer is on the
/// stack of the (synchronous) read, not in the session: an idle session
/// holds no read buffer at all, only the framers' partial lines.
const READ_BUF: usize = 8192;

/// What one read from a readable control connection gave.
enum Read {
    /// This many bytes, already handed to the core.
    Data(usize),
    /// End of stream, or an error.
    Closed,
    /// The readiness was stale; nothing to read after all.
    Spurious,
}

/// Reads what is waiting on `stream` and hands it to `feed`.
///
/// A read shorter than the buffer has drained the socket, and epoll (edge
/// triggered) reports the next bytes as a new event. So the closure tells
/// `try_io` "would block" after a short read, which clears tokio's readiness:
/// the next `readable()` waits for new bytes instead of costing a recv that
/// fails with EAGAIN (one per control line). The readiness is sampled before
/// the read, so bytes that arrive after it still wake the session.
fn read_now(stream: &TcpStream, feed: impl FnOnce(&[u8])) -> Read {
    let mut buf = [0u8; READ_BUF];
    let mut got = 0;
    let r = stream.try_io(Interest::READABLE, || {
        got = stream.try_read(&mut buf)?;
        if 0 < got && got < buf.len() {
            Err(std::io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match r {
        // Bytes, whether or not they drained the socket.
        _ if got > 0 => {
            feed(&buf[..got]);
            Read::Data(got)
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Read::Spurious,
        // End of stream, or an error.
        _ => Read::Closed,
    }
}

/// The read buffer of a TLS leg (decrypted bytes); none for clear text,
/// which reads into the stack (see [`read_now`]).
fn tls_buf(s: &ControlStream) -> Vec<u8> {
    match s {
        ControlStream::Tls(_) => vec![0; READ_BUF],
        _ => Vec::new(),
    }
}

/// One read from a control connection that [`ControlStream::wait_read`]
/// found readable, handed to `feed`.
fn read_leg(
    stream: &ControlStream,
    r: std::io::Result<Readable>,
    buf: &[u8],
    feed: impl FnOnce(&[u8]),
) -> Read {
    match (r, stream) {
        (Ok(Readable::Ready), ControlStream::Plain(s)) => read_now(s, feed),
        (Ok(Readable::Read(0)), _) | (Err(_), _) => Read::Closed,
        (Ok(Readable::Read(n)), _) => {
            feed(&buf[..n]);
            Read::Data(n)
        }
        (Ok(Readable::Ready), _) => Read::Spurious,
    }
}

/// Hands client bytes to the core. While `sniff` holds the stream's first
/// bytes, they are kept until they show a PROXY header (true: none is
/// passed on) or cannot be one (all are passed on).
fn feed_client(core: &mut Session, sniff: &mut Option<Vec<u8>>, bytes: &[u8]) -> bool {
    let Some(held) = sniff else {
        core.client_bytes(bytes);
        return false;
    };
    held.extend_from_slice(bytes);
    match proxy_protocol::sniff(held) {
        Sniff::Header => true,
        Sniff::Undecided => false,
        Sniff::Clear => {
            if let Some(held) = sniff.take() {
                core.client_bytes(&held);
            }
            false
        }
    }
}

/// The channel on which a session's data plans report, made at the first
/// plan: a session that never transfers does not pay for it.
#[derive(Default)]
struct DataEvents {
    chan: Option<(
        mpsc::UnboundedSender<DataEvent>,
        mpsc::UnboundedReceiver<DataEvent>,
    )>,
}

impl DataEvents {
    /// A sender for a new plan.
    fn sender(&mut self) -> mpsc::UnboundedSender<DataEvent> {
        self.chan
            .get_or_insert_with(mpsc::unbounded_channel)
            .0
            .clone()
    }

    /// The next event; pending for ever while no plan was ever opened. The
    /// session holds a sender itself, so this never ends with `None`.
    async fn recv(&mut self) -> Option<DataEvent> {
        match &mut self.chan {
            Some((_, rx)) => rx.recv().await,
            None => std::future::pending().await,
        }
    }
}

/// How the drive loop ended.
enum Ended {
    Core(EndReason),
    Passthrough,
    /// Under TLS passthrough, no byte either way for `idle_timeout`.
    PassthroughIdle(Duration),
    /// A write to this peer did not finish within `idle_timeout`: the peer
    /// does not read.
    WriteTimeout(&'static str, Duration),
    Io(String),
    /// A PROXY header where none may be: from a peer that is no balancer,
    /// or a second one behind a balancer's.
    UntrustedHeader(String),
    /// The client's TLS handshake after AUTH TLS failed.
    ClientTls(String),
    /// The gateway's TLS handshake with the server failed (421 sent).
    ServerTls(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Core(r) => write!(f, "{r}"),
            Ended::Passthrough => f.write_str("TLS passthrough ended"),
            Ended::PassthroughIdle(idle) => write!(f, "TLS passthrough idle for {idle:?}"),
            Ended::WriteTimeout(to, idle) => {
                write!(f, "write to {to} timed out (idle_timeout {idle:?})")
            }
            Ended::Io(e) => write!(f, "{e}"),
            Ended::UntrustedHeader(why) => f.write_str(why),
            Ended::ClientTls(why) => write!(f, "client TLS handshake failed: {why}"),
            Ended::ServerTls(why) => f.write_str(why),
        }
    }
}

/// Writes all of `bytes` to `to` (named `peer`) by `deadline`.
async fn write_by<W: AsyncWrite + Unpin>(
    to: &mut W,
    peer: &'static str,
    bytes: &[u8],
    deadline: tokio::time::Instant,
    idle: Duration,
) -> Result<(), Ended> {
    // A TLS stream holds records until flushed; a socket's flush is a no-op.
    let write = async {
        to.write_all(bytes).await?;
        to.flush().await
    };
    match tokio::time::timeout_at(deadline, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Ended::Io(format!("write to {peer}: {e}"))),
        Err(_) => Err(Ended::WriteTimeout(peer, idle)),
    }
}

/// Buffer of each direction under TLS passthrough, made when it starts.
const PASSTHROUGH_BUF: usize = 8192;

/// One direction of TLS passthrough: copies until `from`'s EOF, then
/// passes the EOF on. Each write must finish within `idle`; every byte
/// read or written touches `activity`. Adds the bytes read to `count`.
async fn pipe<R, W>(
    from: &mut R,
    to: &mut W,
    peer: &'static str,
    idle: Duration,
    activity: &Activity,
    count: &mut u64,
) -> Result<(), Ended>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; PASSTHROUGH_BUF];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return Ok(());
            }
            Ok(n) => n,
            Err(e) => return Err(Ended::Io(format!("TLS passthrough: {e}"))),
        };
        *count += n as u64;
        activity.touch();
        let deadline = tokio::time::Instant::now() + idle;
        write_by(to, peer, &buf[..n], deadline, idle).await?;
        activity.touch();
    }
}

impl Conn<'_> {
    async fn drive(&mut self) -> Ended {
        let mut events = DataEvents::default();
        let idle = self.idle;
        let mut deadline = tokio::time::Instant::now() + idle;
        // One timer for the session. Activity only moves `deadline`; when
        // the timer fires early it is set to the new deadline, so a line
        // costs a clock read instead of a timer-wheel insert and removal.
        let timer = tokio::time::sleep_until(deadline);
        tokio::pin!(timer);
        // Only complete lines restart the idle clock: a peer that sends one
        // byte at a time, never ending a line, is cut off at idle_timeout.
        let mut lines = self.core.lines_received();
        loop {
            // A peer whose unprocessed input is over its bound is not read
            // until the core has room again: TCP pushes back on it.
            tokio::select! {
                r = self.client.wait_read(&mut self.client_buf), if self.core.wants_client_input() => {
                    if self.client_readable(r) {
                        return self.refuse_untrusted_header().await;
                    }
                }
                r = self.upstream.wait_read(&mut self.upstream_buf), if self.core.wants_server_input() => {
                    self.server_readable(r);
                }
                Some(ev) = events.recv() => {
                    // A running transfer is activity: an idle control
                    // connection during a long download is normal.
                    deadline = tokio::time::Instant::now() + idle;
                    self.data_event(ev);
                }
                () = &mut timer => {
                    if timer.deadline() < deadline {
                        timer.as_mut().reset(deadline);
                    } else if let Some(until) = self.data_busy_until() {
                        // Quiet control, but a transfer moves bytes.
                        deadline = until;
                        timer.as_mut().reset(deadline);
                    } else {
                        self.core.idle_timeout();
                    }
                }
            }
            // Lines arrive only through the reads above, from either peer.
            let seen = self.core.lines_received();
            if seen != lines {
                lines = seen;
                deadline = tokio::time::Instant::now() + idle;
            }
            if let Some(end) = self.act_all(&mut events, deadline).await {
                return end;
            }
        }
    }

    /// Feeds the core what the client sent, or tells it the client closed.
    /// True when the client's first bytes are a PROXY header it may not
    /// send.
    fn client_readable(&mut self, r: std::io::Result<Readable>) -> bool {
        let (core, sniff) = (&mut self.core, &mut self.sniff);
        let mut header = false;
        match read_leg(&self.client, r, &self.client_buf, |b| {
            header = feed_client(core, sniff, b)
        }) {
            Read::Spurious => {}
            Read::Data(n) => self.from_client += n as u64,
            Read::Closed => {
                if let Some(held) = self.sniff.take() {
                    self.core.client_bytes(&held);
                }
                self.core.client_closed();
            }
        }
        header
    }

    /// The client began with a PROXY header: from a peer that is no
    /// balancer it is never trusted, and behind a balancer's header it is a
    /// second one, which the specification forbids. Either way it is not
    /// passed on, and the session ends with 421.
    async fn refuse_untrusted_header(&mut self) -> Ended {
        let from = self.info.client.ip();
        let why = match self.via {
            None => format!("PROXY header from untrusted {from}"),
            Some(_) => format!("a second PROXY header, from {from} behind its balancer's"),
        };
        self.gateway.metrics.refused(Refusal::proxy_header);
        let via = self.via.map(tracing::field::display);
        warn!(client = %self.info.client, via, what = "SESSION", code = 421u16, reason = %why, "refused");
        let reply = rewrite::reply(421, &format!("Service not available: {why}"));
        let deadline = tokio::time::Instant::now() + self.idle;
        let _ = write_by(&mut self.client, "client", &reply, deadline, self.idle).await;
        let _ = self.client.shutdown().await;
        Ended::UntrustedHeader(why)
    }

    /// Feeds the core what the server sent, or tells it the server closed.
    fn server_readable(&mut self, r: std::io::Result<Readable>) {
        let core = &mut self.core;
        match read_leg(&self.upstream, r, &self.upstream_buf, |b| {
            core.server_bytes(b)
        }) {
            Read::Spurious => {}
            Read::Data(n) => self.from_server += n as u64,
            Read::Closed => self.core.server_closed(),
        }
    }

    /// Starts TLS on one control leg, as the core asked after AUTH TLS:
    /// the gateway is the TLS server toward the client and the TLS client
    /// toward the server. A failed handshake ends the session; toward the
    /// server the client first gets 421 and why.
    async fn start_tls(&mut self, side: Side) -> Option<Ended> {
        match side {
            Side::Client => {
                let Some(server) = self.tls.server.clone() else {
                    return Some(Ended::Io("client TLS: no certificate".into()));
                };
                let ControlStream::Plain(tcp) =
                    std::mem::replace(&mut self.client, ControlStream::Gone)
                else {
                    return Some(Ended::Io("client TLS: already started".into()));
                };
                match server.accept_control(tcp).await {
                    Ok(s) => {
                        self.client = ControlStream::Tls(Box::new(s.into()));
                        self.client_buf = tls_buf(&self.client);
                        self.tls_client = self.client.describe();
                        info!(tls = self.tls_client, "client leg TLS started");
                        self.core.tls_started(Side::Client);
                        None
                    }
                    Err(e) => Some(Ended::ClientTls(e.to_string())),
                }
            }
            Side::Server => {
                let Some(client) = self.tls.client.clone() else {
                    return Some(Ended::Io("server TLS: no upstream_tls".into()));
                };
                let ControlStream::Plain(tcp) =
                    std::mem::replace(&mut self.upstream, ControlStream::Gone)
                else {
                    return Some(Ended::Io("server TLS: already started".into()));
                };
                match client.connect(tcp).await {
                    Ok(s) => {
                        self.upstream = ControlStream::Tls(Box::new(s.into()));
                        self.upstream_buf = tls_buf(&self.upstream);
                        self.tls_server = self.upstream.describe();
                        info!(tls = self.tls_server, "server leg TLS started");
                        self.core.tls_started(Side::Server);
                        None
                    }
                    Err(e) => {
                        let why = format!("TLS to server {}: {e}", self.info.server);
                        self.gateway.metrics.refused(Refusal::unreachable);
                        warn!(client = %self.info.client, what = "SESSION", code = 421u16, reason = %why, certificate = e.certificate, "refused");
                        let reply = rewrite::reply(421, &format!("Service not available: {why}"));
                        let deadline = tokio::time::Instant::now() + self.idle;
                        let _ =
                            write_by(&mut self.client, "client", &reply, deadline, self.idle).await;
                        let _ = self.client.shutdown().await;
                        Some(Ended::ServerTls(why))
                    }
                }
            }
        }
    }

    /// Hands a data plan's report to the core, noting when its connection
    /// connected and dropping its guard when it closed.
    fn data_event(&mut self, ev: DataEvent) {
        if matches!(ev, DataEvent::Connected { .. }) {
            self.data_connected = Some(Instant::now());
        }
        // The plan's task is over: drop its guard now, or a long
        // session keeps one per transfer until it ends.
        if let DataEvent::Closed { id, .. } = &ev {
            self.pinholes.remove(id);
        }
        self.core.data_event(ev);
    }

    /// Carries out the core's actions, resuming it while it paused with
    /// actions queued up (MAX_ACTIONS). When the session ends, lets late
    /// data plans settle and writes the last log lines.
    async fn act_all(
        &mut self,
        events: &mut DataEvents,
        deadline: tokio::time::Instant,
    ) -> Option<Ended> {
        loop {
            if let Some(end) = self.act(events, deadline).await {
                self.settle_data(events).await;
                self.core.finish();
                self.log_pending();
                if self.peer_lines.suppressed > 0 {
                    warn!(
                        suppressed = self.peer_lines.suppressed,
                        "refusal and reply lines suppressed by the rate limit"
                    );
                }
                return Some(end);
            }
            // Processing paused while actions queued up (MAX_ACTIONS).
            if !self.core.resume() {
                return None;
            }
        }
    }

    /// Writes the log events the core still has, after the end.
    fn log_pending(&mut self) {
        while let Some(action) = self.core.poll_action() {
            if let Action::Log(ev) = action {
                self.log_event(ev);
            }
        }
    }

    /// After the end: lets data plans that report late (kernel backend)
    /// deliver their Closed events, for at most a second, so that their
    /// transfers are logged.
    async fn settle_data(&mut self, events: &mut DataEvents) {
        let until = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        while self.core.awaiting_data() {
            match tokio::time::timeout_at(until, events.recv()).await {
                Ok(Some(ev)) => self.core.data_event(ev),
                _ => break,
            }
            while let Some(action) = self.core.poll_action() {
                if let Action::Log(ev) = action {
                    self.log_event(ev);
                }
            }
        }
    }

    /// When the session's data last moved, plus `idle`, if that is still
    /// ahead.
    fn data_busy_until(&self) -> Option<tokio::time::Instant> {
        let until = tokio::time::Instant::from_std(self.info.activity.busy_until(self.idle)?);
        (until > tokio::time::Instant::now()).then_some(until)
    }

    /// Carries out the core's actions in order. Writes must be done by
    /// `deadline`, the session's idle deadline: a peer that does not read
    /// cannot hold the session (and its pinholes) past it.
    async fn act(
        &mut self,
        events: &mut DataEvents,
        deadline: tokio::time::Instant,
    ) -> Option<Ended> {
        // Once the core has ended, its last words are best effort: a peer
        // that does not take them does not change why the session ended.
        let mut mute = false;
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::ToClient(b) | Action::ToServer(b) if mute => drop(b),
                Action::ToClient(b) => {
                    let r = write_by(&mut self.client, "client", &b, deadline, self.idle).await;
                    if let Err(end) = r {
                        if !self.core.is_ended() {
                            return Some(end);
                        }
                        mute = true;
                    }
                }
                Action::ToServer(b) => {
                    // A transfer command going out: its data connection's
                    // session tickets follow its direction.
                    let (count, direction) = self.core.latest_transfer();
                    if count != self.transfers_forwarded {
                        self.transfers_forwarded = count;
                        if let Some(side) = &self.info.tls.client {
                            side.tickets_on_data(direction != Some(Direction::Upload));
                        }
                    }
                    let r = write_by(&mut self.upstream, "server", &b, deadline, self.idle).await;
                    if let Err(end) = r {
                        if !self.core.is_ended() {
                            return Some(end);
                        }
                        mute = true;
                    }
                }
                Action::Open(plan) => {
                    // No tickets until the plan's transfer command is known.
                    if let Some(side) = &self.info.tls.client {
                        side.tickets_on_data(false);
                    }
                    self.open(plan, events).await
                }
                Action::StartTls(side) => {
                    if let Some(end) = self.start_tls(side).await {
                        return Some(end);
                    }
                }
                Action::Close(id) => {
                    // At the end, every pinhole is dropped after
                    // settle_data, so late data ends can still be logged.
                    if !self.core.is_ended() {
                        self.pinholes.remove(&id);
                    }
                }
                Action::Passthrough {
                    to_server,
                    to_client,
                } => {
                    return Some(self.passthrough(to_server, to_client).await);
                }
                Action::Log(ev) => self.log_event(ev),
                Action::End(reason) => {
                    let _ = self.client.flush().await;
                    let _ = self.client.shutdown().await;
                    return Some(Ended::Core(reason));
                }
            }
        }
        None
    }

    /// Opens a data plan with the backend and tells the core how it went.
    async fn open(&mut self, plan: DataPlan, events: &mut DataEvents) {
        let id = plan.id;
        let r = self
            .gateway
            .backend
            .open(&self.info, plan, events.sender())
            .await;
        match r {
            Ok((opened, pinhole)) => {
                let open = self.gateway.metrics.pinhole_opened(&self.listener.name);
                self.pinholes.insert(id, (pinhole, open));
                self.core.opened(id, Ok(opened));
            }
            Err(e) => self.core.opened(id, Err(OpenFailure::from(&e))),
        }
    }

    /// After AUTH TLS under passthrough: raw bytes both ways until both
    /// sides closed, a write cannot finish within `idle_timeout`, or no
    /// byte moved either way for `idle_timeout`.
    async fn passthrough(&mut self, to_server: Vec<u8>, to_client: Vec<u8>) -> Ended {
        let idle = self.idle;
        let activity = self.info.activity.clone();
        let (mut from_client, mut from_server) = (0, 0);
        let (mut client_r, mut client_w) = tokio::io::split(&mut self.client);
        let (mut server_r, mut server_w) = tokio::io::split(&mut self.upstream);
        let copy = async {
            // The bytes already read go first.
            let deadline = tokio::time::Instant::now() + idle;
            write_by(&mut server_w, "server", &to_server, deadline, idle).await?;
            write_by(&mut client_w, "client", &to_client, deadline, idle).await?;
            activity.touch();
            tokio::try_join!(
                pipe(
                    &mut client_r,
                    &mut server_w,
                    "server",
                    idle,
                    &activity,
                    &mut from_client
                ),
                pipe(
                    &mut server_r,
                    &mut client_w,
                    "client",
                    idle,
                    &activity,
                    &mut from_server
                ),
            )
        };
        // Fires once `idle` passed since the last byte either way.
        let quiet = async {
            loop {
                let now = tokio::time::Instant::now();
                match activity
                    .busy_until(idle)
                    .map(tokio::time::Instant::from_std)
                {
                    Some(until) if until > now => tokio::time::sleep_until(until).await,
                    // Not even the first bytes went out yet: the writes
                    // above have their own deadline.
                    None => tokio::time::sleep(idle).await,
                    Some(_) => return,
                }
            }
        };
        let ended = tokio::select! {
            r = copy => match r {
                Ok(_) => Ended::Passthrough,
                Err(e) => e,
            },
            () = quiet => Ended::PassthroughIdle(idle),
        };
        self.from_client += from_client;
        self.from_server += from_server;
        ended
    }
}

impl Conn<'_> {
    /// Turns a core log event into a log line, metrics and audit lines.
    /// Peer-controlled values go through [`Escaped`]; the audit log is JSON
    /// and takes them as they are.
    fn log_event(&mut self, ev: LogEvent) {
        match ev {
            LogEvent::Refusal { what, code, reason } => self.log_refusal(&what, code, &reason),
            LogEvent::RefusalLimit { refusals } => {
                let suppressed = std::mem::take(&mut self.peer_lines.suppressed);
                warn!(
                    refusals,
                    suppressed, "too many refused commands: closing the session with 421"
                );
            }
            LogEvent::Transfer(t) => self.log_transfer(&t),
            LogEvent::User(user) => info!(user = %Escaped(&user), "login accepted"),
            LogEvent::TlsPassthrough => {
                info!("TLS started: control stream no longer parsed (tls: passthrough)")
            }
            LogEvent::IgnoredReply { code, reason } => match self.peer_lines.admit() {
                None => {}
                Some(0) => {
                    info!(code, reason = %Escaped(&reason), "reply not forwarded as received")
                }
                Some(suppressed) => info!(
                    code,
                    reason = %Escaped(&reason),
                    suppressed,
                    "reply not forwarded as received"
                ),
            },
            LogEvent::PinholeExpired(id) => info!(plan = id, "pinhole expired unused"),
            LogEvent::DiscardedAfterAuth(n) => warn!(
                bytes = n,
                "clear-text bytes sent behind AUTH TLS before the handshake discarded"
            ),
            LogEvent::Downgrade(what) => warn!(
                downgrade = %what,
                "TLS downgrade: one leg in clear text (upstream_tls.allow_downgrade)"
            ),
        }
    }

    /// Counts a refusal, and logs it within the session's log budget.
    fn log_refusal(&mut self, what: &Refused, code: u16, reason: &str) {
        self.gateway.metrics.refused(Refusal::from(what));
        let what = what.what();
        match self.peer_lines.admit() {
            None => {}
            Some(0) => {
                warn!(what = %Escaped(what), code, reason = %Escaped(reason), "refused")
            }
            Some(suppressed) => warn!(
                what = %Escaped(what),
                code,
                reason = %Escaped(reason),
                suppressed,
                "refused"
            ),
        }
    }

    /// Counts a transfer, logs it, and writes its audit line.
    fn log_transfer(&mut self, t: &TransferRecord) {
        let took = self
            .data_connected
            .take()
            .map(|at| at.elapsed())
            .unwrap_or_default();
        self.gateway
            .metrics
            .transfer(t.mode, t.to_client, t.to_server, took);
        let user = t.user.as_deref().unwrap_or("");
        info!(
            command = %Escaped(&t.command),
            path = %Escaped(&t.path),
            user = %Escaped(user),
            direction = %t.direction,
            mode = %t.mode,
            bytes = t.to_client + t.to_server,
            to_client = t.to_client,
            to_server = t.to_server,
            reply = t.reply,
            result = %Escaped(&t.result),
            duration_ms = took.as_millis() as u64,
            data_tls_client = data_tls_label(self.tls_client.is_some(), &t.data_tls.client),
            data_tls_server = data_tls_label(self.tls_server.is_some(), &t.data_tls.server),
            "transfer"
        );
        if let Some(audit) = &self.gateway.audit {
            self.audit_transfer(audit, t, took);
        }
    }

    /// Writes a transfer's line to the audit log.
    fn audit_transfer(&self, audit: &crate::audit::AuditLog, t: &TransferRecord, took: Duration) {
        let config = self.gateway.config();
        let record = crate::audit::AuditRecord {
            time: crate::audit::rfc3339(std::time::SystemTime::now()),
            session: self.info.id,
            instance: config.instance.as_deref(),
            listener: &self.listener.name,
            client: self.info.client.to_string(),
            server: self.info.server.to_string(),
            user: t.user.as_deref(),
            command: &t.command,
            path: &t.path,
            mode: t.mode.as_label(),
            direction: t.direction.to_string(),
            bytes: t.to_client + t.to_server,
            to_client: t.to_client,
            to_server: t.to_server,
            duration_ms: took.as_millis() as u64,
            reply: t.reply,
            result: &t.result,
            tls_client: self.tls_client.as_deref(),
            tls_server: self.tls_server.as_deref(),
            data_tls_client: data_tls_label(self.tls_client.is_some(), &t.data_tls.client),
            data_tls_server: data_tls_label(self.tls_server.is_some(), &t.data_tls.server),
        };
        if let Err(e) = audit.write(&record) {
            warn!("audit log: {e}");
        }
    }
}

/// A data leg's TLS for the transfer line: its version and cipher,
/// `none` for a clear-text data leg under a TLS control leg (PROT C),
/// absent when the control leg is clear text too.
fn data_tls_label(control_tls: bool, data: &Option<String>) -> Option<&str> {
    control_tls.then(|| data.as_deref().unwrap_or("none"))
}

#[cfg(test)]
mod tests {
    use super::not_a_client;
    use std::net::SocketAddr;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A balancer on another host cannot have a client on this host's
    /// loopback or at the gateway's own address; one on this host can.
    #[test]
    fn loopback_and_own_address_only_from_a_balancer_on_this_host() {
        let local = sa("192.0.2.1:21");
        let remote = sa("198.51.100.9:5000");
        let here = sa("127.0.0.5:5000");
        for source in [
            "127.0.0.1:4000",
            "[::ffff:127.0.0.1]:4000",
            "192.0.2.1:4000",
        ] {
            let source: SocketAddr = sa(source);
            let source = SocketAddr::new(source.ip().to_canonical(), source.port());
            assert!(not_a_client(source, remote, local).is_some(), "{source}");
            assert_eq!(not_a_client(source, here, local), None, "{source}");
        }
        assert_eq!(not_a_client(sa("203.0.113.7:4000"), remote, local), None);
        assert!(not_a_client(sa("0.0.0.0:4000"), here, local).is_some());
        assert!(not_a_client(sa("203.0.113.7:0"), remote, local).is_some());
    }
}
