//! The tokio shell: listeners, one control task per session, limits and
//! shutdown. It has no FTP knowledge beyond feeding the session core and
//! carrying out its actions. [`proxy_protocol`] is the pure parser of the
//! header a balancer sends before a relayed connection.

mod control;
mod limits;
mod origdst;
pub mod proxy_protocol;
pub mod tls_ctx;

pub use limits::{SessionLimits, SessionSlot};

use crate::config::{Config, Listener, ListenerMode};
use crate::pinhole::Backend;
use anyhow::Context;
use socket2::{Domain, Socket, Type};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

/// Everything the sessions of one gateway share.
pub struct Gateway {
    /// The configuration new sessions run under; replaced by
    /// [`Gateway::reload`]. A session keeps the one it started with.
    config: RwLock<Arc<Config>>,
    /// Opens data plans.
    pub backend: Backend,
    /// Counts sessions against `limits`.
    pub limits: SessionLimits,
    /// What the metrics endpoint serves; recorded whether or not it is served.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The transfer audit log, when configured.
    pub audit: Option<crate::audit::AuditLog>,
    /// Session ids: unique for the process's life, carried by every log line.
    next_id: AtomicU64,
    /// Set once shutdown starts: the metrics endpoint then closes, so a
    /// health check that scrapes it sees this process go.
    stopping: watch::Sender<bool>,
    /// Each listener's TLS contexts (certificates reload on SIGHUP).
    pub tls: tls_ctx::TlsContexts,
}

impl Gateway {
    /// A gateway over `config`, opening data plans with `backend`, writing
    /// transfers to `audit`.
    pub fn new(
        config: Arc<Config>,
        backend: Backend,
        audit: Option<crate::audit::AuditLog>,
    ) -> Arc<Self> {
        let limits = SessionLimits::new(
            config.limits.max_sessions,
            config.limits.max_sessions_per_client,
        );
        Arc::new(Gateway {
            config: RwLock::new(config),
            backend,
            limits,
            metrics: Arc::new(crate::metrics::Metrics::new()),
            audit,
            next_id: AtomicU64::new(1),
            stopping: watch::channel(false).0,
            tls: tls_ctx::TlsContexts::default(),
        })
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `new` in force for sessions that start from now on: rules,
    /// `limits` (session counts, timeouts). Listeners and the `data`
    /// section (port pools, backend, pinhole timeout) are bound at start;
    /// returns a note for each of those that differs and so needs a restart.
    pub fn reload(&self, new: Config) -> Vec<String> {
        let old = self.config();
        let mut restart = Vec::new();
        if old.listeners != new.listeners {
            restart.push("listeners changed; restart to apply".to_string());
        }
        if old.data != new.data {
            restart.push("data section changed; restart to apply".to_string());
        }
        self.limits
            .set(new.limits.max_sessions, new.limits.max_sessions_per_client);
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        restart
    }

    fn session_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Binds a listener's socket, without SO_REUSEPORT (see [`bind_with`]).
pub fn bind(listener: &Listener) -> anyhow::Result<TcpListener> {
    bind_with(listener, false)
}

/// Binds a listener's socket. IPv6 sockets are v6-only, so `0.0.0.0:P` and
/// `[::]:P` can be two listeners. Transparent listeners ask for
/// IP_TRANSPARENT so that tproxy works; without CAP_NET_ADMIN that is
/// skipped and `redirect` still works.
///
/// With `reuse_port`, SO_REUSEPORT lets a second gateway bind beside this
/// one, so a new process takes over the port while this one drains. Linux
/// admits a socket to the group only under the same effective UID as the
/// first, so another user cannot take a share of the connections; any
/// process of the same user can, hence opt-in (`run --reuse-port`).
pub fn bind_with(listener: &Listener, reuse_port: bool) -> anyhow::Result<TcpListener> {
    listen(listener, bind_only(listener, reuse_port)?)
}

/// [`bind_with`] without the `listen()`: a socket joins its port's
/// SO_REUSEPORT group, and takes a share of the connections, only when it
/// listens.
fn bind_only(listener: &Listener, reuse_port: bool) -> anyhow::Result<Socket> {
    let addr = listener.listen;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)
        .with_context(|| format!("listener {}: socket", listener.name))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket
            .set_reuse_port(true)
            .with_context(|| format!("listener {}: SO_REUSEPORT", listener.name))?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if listener.mode == ListenerMode::Transparent {
        let r = match addr {
            SocketAddr::V4(_) => socket.set_ip_transparent_v4(true),
            SocketAddr::V6(_) => socket.set_ip_transparent_v6(true),
        };
        if let Err(e) = r {
            tracing::debug!(listener = %listener.name, "IP_TRANSPARENT not set ({e}); tproxy unavailable, redirect still works");
        }
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("listener {}: bind {addr}", listener.name))?;
    Ok(socket)
}

/// Starts `socket`, bound for `listener`, listening.
fn listen(listener: &Listener, socket: Socket) -> anyhow::Result<TcpListener> {
    socket
        .listen(1024)
        .with_context(|| format!("listener {}: listen on {}", listener.name, listener.listen))?;
    let std: std::net::TcpListener = socket.into();
    Ok(TcpListener::from_std(std)?)
}

/// Where the kernel says whether a closing listener's queued connections
/// move to another listener of its SO_REUSEPORT group (Linux 5.14 and
/// later; one value per network namespace).
const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Warns when connections queued on a listener that closes would be reset
/// rather than handed to the process beside it: the handoff then drops
/// the few that arrive in the moment before the old process closes.
fn check_migrate_req() {
    match std::fs::read_to_string(MIGRATE_REQ) {
        Ok(v) if v.trim() == "0" => warn!(
            "net.ipv4.tcp_migrate_req is 0: when this process stops, connections still queued on its listeners are reset instead of moving to the process that shares the port; set it to 1 for restarts that drop nothing"
        ),
        Ok(_) => {}
        Err(e) => warn!(
            "cannot read {MIGRATE_REQ} ({e}; it needs Linux 5.14): when this process stops, connections still queued on its listeners are reset instead of moving to the process that shares the port"
        ),
    }
}

/// The metrics endpoint's socket, bound but not yet listening; with
/// `reuse_port` it can share its port with the next process, as the
/// listeners do (a scrape during the overlap then reaches either process).
fn bind_metrics(addr: SocketAddr, reuse_port: bool) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Says once, at start, that root shares the port with every root process:
/// root is the one user that many unrelated daemons have in common.
fn check_reuse_port_user() {
    if rustix::process::geteuid().is_root() {
        warn!("--reuse-port as root: any other process running as root can bind the same addresses with SO_REUSEPORT and take a share of the connections; run ftpgate as its own user (CAP_NET_BIND_SERVICE for ports below 1024)");
    }
}

/// How `ftpgate run` comes by its listening sockets.
#[derive(Debug)]
pub struct Sockets {
    /// Bind listeners and the metrics endpoint with SO_REUSEPORT (see
    /// [`bind_with`]); off unless `run --reuse-port`.
    pub reuse_port: bool,
    /// Listening sockets handed over by the service manager (systemd socket
    /// activation, `LISTEN_FDS`). Each must have the address of exactly one
    /// configured listener, which then uses it instead of binding its own.
    pub inherited: Vec<std::net::TcpListener>,
}

impl Default for Sockets {
    /// SO_REUSEPORT off, nothing inherited.
    fn default() -> Self {
        Sockets {
            reuse_port: false,
            inherited: Vec::new(),
        }
    }
}

impl Sockets {
    /// Pairs each configured listener with a socket: the inherited one with
    /// its address, else one bound now. An inherited socket that no
    /// listener has the address of is an error naming it: it would
    /// otherwise queue connections that nobody accepts.
    fn listeners(self, config: &Config) -> anyhow::Result<Vec<(Listener, TcpListener)>> {
        let mut inherited = Vec::new();
        for s in self.inherited {
            let addr = s
                .local_addr()
                .context("inherited socket (LISTEN_FDS): local address")?;
            inherited.push((addr, Some(s)));
        }
        for (i, (addr, _)) in inherited.iter().enumerate() {
            if inherited[..i].iter().any(|(a, _)| a == addr) {
                anyhow::bail!(
                    "inherited socket {addr} (LISTEN_FDS): more than one socket has this address"
                );
            }
            if !config.listeners.iter().any(|l| l.listen == *addr) {
                let configured: Vec<String> = config
                    .listeners
                    .iter()
                    .map(|l| format!("{} {}", l.name, l.listen))
                    .collect();
                anyhow::bail!(
                    "inherited socket {addr} (LISTEN_FDS) matches no listener's `listen` (listeners: {})",
                    configured.join(", ")
                );
            }
        }
        // Every socket bound before any listens: a failure part-way then
        // leaves no socket that took a share of the port's connections.
        let mut bound = Vec::new();
        let mut bound_here = false;
        for l in &config.listeners {
            let taken = inherited
                .iter_mut()
                .find(|(addr, _)| *addr == l.listen)
                .and_then(|(_, s)| s.take());
            let socket = match taken {
                Some(s) => {
                    s.set_nonblocking(true)?;
                    info!(listener = %l.name, addr = %l.listen, "listener socket inherited from the service manager (LISTEN_FDS)");
                    Ok(TcpListener::from_std(s)?)
                }
                None => {
                    bound_here = true;
                    Err(bind_only(l, self.reuse_port)?)
                }
            };
            bound.push((l, socket));
        }
        if bound_here && self.reuse_port {
            check_migrate_req();
        }
        let mut out = Vec::new();
        for (l, socket) in bound {
            let socket = match socket {
                Ok(inherited) => inherited,
                Err(own) => listen(l, own)?,
            };
            if config.data.backend == crate::config::BackendKind::Nftables {
                // The kernel backend's table finds the control connections
                // by their listener's mark (`socket mark`, table.nft).
                socket2::SockRef::from(&socket)
                    .set_mark(config.data.conntrack_mark)
                    .with_context(|| {
                        format!("listener {}: SO_MARK (needs CAP_NET_ADMIN)", l.name)
                    })?;
            }
            out.push((l.clone(), socket));
        }
        Ok(out)
    }
}

/// Accepts sessions on every listener until `shutdown` resolves, then waits
/// for running sessions up to `grace` before returning.
///
/// `listeners` pairs each configured listener with its bound socket, so
/// tests can bind port 0 and read the address back.
pub async fn serve(
    gateway: Arc<Gateway>,
    listeners: Vec<(Listener, TcpListener)>,
    shutdown: impl Future<Output = ()>,
    grace: std::time::Duration,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    // Each session holds a clone; when every clone is gone, all are done.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut accepts = JoinSet::new();
    for (listener, socket) in listeners {
        let addr = socket
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let instance = gateway.config().instance.clone();
        info!(instance, listener = %listener.name, %addr, mode = listener.mode.kind().as_str(), "listening");
        accepts.spawn(accept_loop(
            gateway.clone(),
            Arc::new(listener),
            socket,
            stop_rx.clone(),
            done_tx.clone(),
        ));
    }
    drop(done_tx);
    shutdown.await;
    let _ = stop_tx.send(true);
    gateway.stopping.send_replace(true);
    // Each loop drops its listening socket as it ends: once all have, a new
    // connection is refused (or goes to a process that shares the port
    // through SO_REUSEPORT), and only then does the log say so. The
    // metrics endpoint drops its receiver with its socket.
    while accepts.join_next().await.is_some() {}
    let closing = gateway.stopping.closed();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), closing).await;
    info!("shutting down: no new sessions");
    if tokio::time::timeout(grace, done_rx.recv()).await.is_err() {
        let data = gateway.backend.usage();
        warn!(
            open = gateway.limits.open(),
            data_plans = data.plans,
            data_ports = data.ports,
            "grace period over: closing remaining sessions"
        );
    }
}

/// Accepts until told to stop.
async fn accept_loop(
    gateway: Arc<Gateway>,
    listener: Arc<Listener>,
    socket: TcpListener,
    mut stop: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    loop {
        tokio::select! {
            // A stop wins over a connection that is ready at the same time.
            biased;
            _ = stop.changed() => break,
            accepted = socket.accept() => match accepted {
                Ok((stream, peer)) => {
                    let id = gateway.session_id();
                    let fut = control::session(gateway.clone(), listener.clone(), stream, peer, id);
                    let done = done.clone();
                    tokio::spawn(async move {
                        fut.await;
                        drop(done);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(listener = %listener.name, "accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// A gateway built from a configuration: bound listeners, backend, and the
/// nftables table when one is needed. Dropping it does not remove the
/// table; call [`Launched::cleanup`] at exit.
pub struct Launched {
    /// Shared state for sessions.
    pub gateway: Arc<Gateway>,
    /// Each listener with its bound socket.
    pub listeners: Vec<(Listener, TcpListener)>,
    /// The gateway's own nftables table, if the configuration needs one.
    pub table: Option<Arc<crate::netfilter::InterceptTable>>,
    /// Where the metrics endpoint listens, when configured (it closes when
    /// [`serve`] begins to shut down).
    pub metrics_addr: Option<SocketAddr>,
}

impl Launched {
    /// Binds every listener and sets up the backend. Fails, and starts
    /// nothing, when any part cannot be set up: a half-working gateway is
    /// worse than none.
    pub async fn new(config: Arc<Config>) -> anyhow::Result<Self> {
        Self::with_sockets(config, Sockets::default()).await
    }

    /// As [`Launched::new`], with listening sockets as `sockets` says.
    pub async fn with_sockets(config: Arc<Config>, sockets: Sockets) -> anyhow::Result<Self> {
        let audit = match &config.audit {
            Some(a) => Some(
                crate::audit::AuditLog::open(&a.path)
                    .with_context(|| format!("audit log {:?}", a.path))?,
            ),
            None => None,
        };
        if sockets.reuse_port {
            check_reuse_port_user();
        }
        // Bound before the table exists, so a failure leaves nothing behind.
        let metrics_socket = match &config.metrics {
            Some(m) => Some(
                bind_metrics(m.listen, sockets.reuse_port)
                    .with_context(|| format!("metrics endpoint: bind {}", m.listen))?,
            ),
            None => None,
        };
        let table = Self::table(&config).await?;
        // Listeners last, each bound before any listens: a process that
        // fails to start after joining a port's SO_REUSEPORT group would
        // take a share of the connections with it (they are reset unless
        // net.ipv4.tcp_migrate_req is 1).
        let started = match Self::backend(&config, table.clone()).await {
            Ok(b) => sockets.listeners(&config).and_then(|l| {
                let metrics = match metrics_socket {
                    Some(socket) => {
                        socket.listen(128).context("metrics endpoint: listen")?;
                        Some(TcpListener::from_std(socket.into())?)
                    }
                    None => None,
                };
                Ok((b, l, metrics))
            }),
            Err(e) => Err(e),
        };
        let (backend, listeners, metrics_socket) = match started {
            Ok(s) => s,
            Err(e) => {
                // Leave nothing behind: the gateway does not start.
                Self::cleanup(table).await;
                return Err(e);
            }
        };
        let gateway = Gateway::new(config, backend, audit);
        let metrics_addr = match metrics_socket {
            Some(socket) => {
                let addr = socket.local_addr()?;
                info!(%addr, "metrics endpoint listening");
                tokio::spawn(crate::metrics::serve(
                    socket,
                    gateway.metrics.clone(),
                    gateway.stopping.subscribe(),
                ));
                Some(addr)
            }
            None => None,
        };
        Ok(Launched {
            gateway,
            listeners,
            table,
            metrics_addr,
        })
    }

    /// The gateway's nftables table, created when a transparent listener or
    /// the kernel backend needs it.
    async fn table(
        config: &Config,
    ) -> anyhow::Result<Option<Arc<crate::netfilter::InterceptTable>>> {
        let kernel = config.data.backend == crate::config::BackendKind::Nftables;
        let transparent = config
            .listeners
            .iter()
            .any(|l| l.mode == ListenerMode::Transparent);
        if !(transparent || kernel) {
            return Ok(None);
        }
        let name = &config.data.nftables_table;
        let t = match crate::netfilter::InterceptTable::create(name, config.data.conntrack_mark)
            .await
        {
            Ok(t) => t,
            // Another gateway owns the table: the message says what to do.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => return Err(e.into()),
            Err(e) => {
                let needs = if kernel {
                    "data.backend nftables"
                } else {
                    "a transparent listener"
                };
                return Err(anyhow::Error::from(e).context(format!(
                    "{needs} needs the nftables table '{name}' (is nft installed, and do we have CAP_NET_ADMIN?)"
                )));
            }
        };
        Ok(Some(Arc::new(t)))
    }

    /// The backend `config` asks for, with its port pools. `table` is the
    /// gateway's table, which the kernel backend needs.
    async fn backend(
        config: &Config,
        table: Option<Arc<crate::netfilter::InterceptTable>>,
    ) -> anyhow::Result<Backend> {
        use crate::pinhole::{kernel::KernelBackend, relay::RelayBackend, DataSettings, PortPool};
        let share = config.data.max_ports_per_client;
        let client_pool = PortPool::new("client", config.data.client_ports)
            .with_client_share(share.of(config.data.client_ports.len()));
        let server_pool = PortPool::new("server", config.data.server_ports)
            .with_client_share(share.of(config.data.server_ports.len()));
        let settings = DataSettings {
            pinhole_timeout: config.data.pinhole_timeout,
            connect_timeout: config.limits.connect_timeout,
        };
        let relay = RelayBackend::new(
            client_pool.clone(),
            server_pool.clone(),
            settings.clone(),
            table.clone(),
        );
        let kernel = config.data.backend == crate::config::BackendKind::Nftables;
        match table {
            Some(t) if kernel => {
                let kernel = KernelBackend::new(
                    client_pool,
                    server_pool,
                    settings,
                    t,
                    config.data.conntrack_mark,
                )
                .await
                .map_err(|e| anyhow::anyhow!("data.backend nftables: {e}"))?;
                Ok(Backend::Kernel { kernel, relay })
            }
            _ => Ok(Backend::Relay(relay)),
        }
    }

    /// Removes what the gateway installed outside itself (its table).
    pub async fn cleanup(table: Option<Arc<crate::netfilter::InterceptTable>>) {
        if let Some(t) = table {
            if let Err(e) = t.destroy().await {
                warn!("removing nftables table {}: {e}", t.name());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the launch order relies on: a socket bound beside a listening
    /// SO_REUSEPORT socket takes none of its connections until it listens
    /// itself, so a launch that fails between bind and listen costs the
    /// running process nothing.
    #[test]
    fn a_bound_socket_takes_no_connections_until_it_listens() {
        let holder = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        holder.set_reuse_address(true).unwrap();
        holder.set_reuse_port(true).unwrap();
        holder
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        holder.listen(64).unwrap();
        let addr = holder.local_addr().unwrap().as_socket().unwrap();
        let yaml = format!(
            "listeners:\n  - name: a\n    listen: {addr}\n    mode: reverse\n    upstream: 127.0.0.1:21\nrules:\n  - name: all\n"
        );
        let config = Config::parse(&yaml, std::path::Path::new("t.yaml")).unwrap();
        let bound = bind_only(&config.listeners[0], true).unwrap();
        // SO_RCVTIMEO bounds accept(): a connection the bound socket took
        // would never reach the holder.
        holder
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut clients = Vec::new();
        for _ in 0..32 {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
        }
        for n in 0..32 {
            let got = holder.accept();
            assert!(
                got.is_ok(),
                "connection {n}: {got:?}; the bound socket took a share"
            );
        }
        drop(bound);
    }
}
