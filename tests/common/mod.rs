//! Parts the in-process tests share: a real FTP server (libunftp) on
//! loopback, and a capture of the gateway's log lines to wait on.
// Each test crate uses only some of these.
#![allow(dead_code)]

use ftpgate::config::{Config, DataMode, PortRange, ServerMode, TlsPolicy};
use ftpgate::proxy::{serve, Gateway, Launched};
use ftpgate::rules::Policy;
use ftpgate::session::{Session, SessionParams};
use libunftp::options::ActivePassiveMode;
use std::io::Write;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};
use unftp_sbe_fs::Filesystem;

/// How long a wait on the log may take, by default, before the test fails
/// with the log.
const LOG_LIMIT: Duration = Duration::from_secs(20);

/// Starts libunftp on 127.0.0.1 (port 0) serving `root`, in active and
/// passive mode; one server per accepted connection.
pub async fn start_unftp(root: &Path) -> SocketAddr {
    serve_unftp(root, None).await
}

/// As `start_unftp`, with passive data ports taken from `ports`. libunftp
/// tries ten random ports of its range and answers 425 when none binds; a
/// long run at a high transfer rate wants a range clear of the ephemeral
/// ports that its own connections take.
pub async fn start_unftp_passive(root: &Path, ports: RangeInclusive<u16>) -> SocketAddr {
    serve_unftp(root, Some(ports)).await
}

async fn serve_unftp(root: &Path, ports: Option<RangeInclusive<u16>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let root: PathBuf = root.to_path_buf();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let root = root.clone();
            let mut builder = libunftp::ServerBuilder::new(Box::new(move || {
                Filesystem::new(root.clone()).unwrap()
            }))
            .active_passive_mode(ActivePassiveMode::ActiveAndPassive);
            if let Some(ports) = &ports {
                builder = builder.passive_ports(ports.clone());
            }
            let server = builder.build().unwrap();
            tokio::spawn(server.service(stream));
        }
    });
    addr
}

/// Log lines written by the gateway, and a way to wait for them.
#[derive(Clone)]
pub struct LogBuf {
    bytes: Arc<Mutex<Vec<u8>>>,
    changed: Arc<Notify>,
    limit: Duration,
}

impl Default for LogBuf {
    fn default() -> Self {
        LogBuf::with_limit(LOG_LIMIT)
    }
}

impl LogBuf {
    /// An empty log whose waits fail the test after `limit`.
    pub fn with_limit(limit: Duration) -> Self {
        LogBuf {
            bytes: Arc::default(),
            changed: Arc::default(),
            limit,
        }
    }

    /// Adds bytes (e.g. a child process's stderr) and wakes the waiters.
    pub fn append(&self, b: &[u8]) {
        self.bytes.lock().unwrap().extend_from_slice(b);
        self.changed.notify_waiters();
    }

    /// Captures this thread's tracing output (INFO and up, no colour) until
    /// the guard is dropped. Tests run on a current-thread runtime, so every
    /// task of the gateway logs here.
    pub fn capture() -> (LogBuf, tracing::subscriber::DefaultGuard) {
        let logs = LogBuf::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogWriter(writer.clone()))
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).into_owned()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for(&self, needle: &str) -> String {
        self.wait_for_n(needle, 1).await
    }

    /// Waits until the log contains `needle` at least `n` times; fails the
    /// test with the log after the log's limit.
    pub async fn wait_for_n(&self, needle: &str, n: usize) -> String {
        let limit = tokio::time::Instant::now() + self.limit;
        loop {
            let notified = self.changed.notified();
            let t = self.text();
            if t.matches(needle).count() >= n {
                return t;
            }
            if tokio::time::timeout_at(limit, notified).await.is_err() {
                panic!("log never contained {needle:?}:\n{t}");
            }
        }
    }
}

struct LogWriter(LogBuf);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.append(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A gateway serving in this process: its first listener's address, its
/// shared state, its metrics endpoint, and the sender whose drop stops it.
pub struct Running {
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub metrics: Option<SocketAddr>,
    pub stop: oneshot::Sender<()>,
}

/// Parses `yaml` (named `file` in errors), launches the gateway and serves
/// it with a one-second grace until `Running::stop` is sent or dropped.
pub async fn launch(yaml: &str, file: &str) -> Running {
    let config = Config::parse(yaml, Path::new(file)).unwrap();
    let launched = Launched::new(Arc::new(config)).await.unwrap();
    let addr = launched.listeners[0].1.local_addr().unwrap();
    let gateway = launched.gateway.clone();
    let metrics = launched.metrics_addr;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(
        launched.gateway,
        launched.listeners,
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
    ));
    Running {
        addr,
        gateway,
        metrics,
        stop,
    }
}

/// A reverse-mode session core past the server's greeting, both data modes
/// allowed, for tests that feed it lines as the shell does.
pub fn core_past_greeting() -> Session {
    let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
    let mut s = Session::new(SessionParams {
        client: sa("198.51.100.7:50000"),
        client_local: sa("192.0.2.1:21"),
        server: sa("10.0.0.3:21"),
        server_local: sa("10.0.0.1:40123"),
        transparent: false,
        announce: None,
        policy: Policy {
            rule: "test".into(),
            modes: vec![DataMode::Passive, DataMode::Active],
            server_mode: ServerMode::Same,
            data_ports: PortRange {
                lo: 1024,
                hi: 65535,
            },
            tls: TlsPolicy::Refuse,
            deny_commands: vec![],
        },
    });
    s.server_bytes(b"220 ready\r\n");
    while s.poll_action().is_some() {}
    s
}
