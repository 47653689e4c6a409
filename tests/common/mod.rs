//! Parts the in-process tests share: the gateway harness (`Harness`, `Gw`),
//! a real FTP server (libunftp) on loopback, and a capture of the gateway's
//! log lines to wait on.
// Each test crate uses only some of these.
#![allow(dead_code)]

use ftpgate::config::{Config, DataMode, PortRange, ServerMode, TlsPolicy};
use ftpgate::pinhole::Usage;
use ftpgate::proxy::{serve, Gateway, Launched};
use ftpgate::rules::Policy;
use ftpgate::session::{Session, SessionParams};
use libunftp::options::ActivePassiveMode;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
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

/// Every bounded wait of the tests, unless a test says otherwise; past it the
/// test fails.
pub const LIMIT: Duration = Duration::from_secs(20);

/// Awaits `fut`, failing the test after `LIMIT` with `what`.
pub async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
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
    launch_config(config).await
}

/// As `launch`, from a parsed config. The one place the tests build a
/// gateway, and with it its backend.
pub async fn launch_config(config: Config) -> Running {
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

/// What a harness gateway sits in front of.
pub enum Upstream {
    /// libunftp serving a fresh directory (`Gw::root`).
    Unftp,
    /// A listener on which the test plays the server (`Gw::take_upstream`).
    Scripted,
    /// An address the test serves (or leaves dead) itself.
    At(SocketAddr),
}

/// Builds the gateway a test runs against: one reverse listener named
/// `test` on 127.0.0.1 (port 0) in front of `Upstream`, the data pools
/// 20000-29999 (client side) and 30000-39999 (server side), and one rule
/// `loopback` admitting 127.0.0.0/8. Each option adds YAML lines to that.
pub struct Harness {
    upstream: Upstream,
    file: String,
    listener: String,
    pools: String,
    data: String,
    limits: String,
    clients: String,
    rule: String,
    audit: bool,
    metrics: bool,
}

impl Harness {
    /// The default gateway in front of `upstream`.
    pub fn new(upstream: Upstream) -> Harness {
        Harness {
            upstream,
            file: "test.yaml".into(),
            listener: String::new(),
            pools: "  client_ports: 20000-29999\n  server_ports: 30000-39999\n".into(),
            data: String::new(),
            limits: String::new(),
            clients: "clients: [127.0.0.0/8]".into(),
            rule: String::new(),
            audit: false,
            metrics: false,
        }
    }

    /// The config's file name, as parse errors give it.
    pub fn file(mut self, name: &str) -> Self {
        self.file = name.into();
        self
    }

    /// Extra lines of the listener (indented four spaces).
    pub fn listener(mut self, lines: &str) -> Self {
        self.listener.push_str(lines);
        self
    }

    /// Replaces the whole `data` section's lines (pools included).
    pub fn data_section(mut self, lines: &str) -> Self {
        self.pools = lines.into();
        self
    }

    /// The two pools: client side and server side.
    pub fn pools(mut self, client: RangeInclusive<u16>, server: RangeInclusive<u16>) -> Self {
        self.pools = format!(
            "  client_ports: {}-{}\n  server_ports: {}-{}\n",
            client.start(),
            client.end(),
            server.start(),
            server.end()
        );
        self
    }

    /// Extra lines of the `data` section, after the pools.
    pub fn data(mut self, lines: &str) -> Self {
        self.data.push_str(lines);
        self
    }

    /// Lines of a `limits` section.
    pub fn limits(mut self, lines: &str) -> Self {
        self.limits.push_str(lines);
        self
    }

    /// The rule's `clients:` line, in place of `clients: [127.0.0.0/8]`.
    pub fn clients(mut self, line: &str) -> Self {
        self.clients = line.into();
        self
    }

    /// Extra lines of the one rule (indented four spaces).
    pub fn rule(mut self, lines: &str) -> Self {
        self.rule.push_str(lines);
        self
    }

    /// An audit log in a file of its own (`Gw::audit`).
    pub fn audit(mut self) -> Self {
        self.audit = true;
        self
    }

    /// A metrics endpoint on 127.0.0.1 (`Gw::metrics`).
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Starts the upstream, captures this thread's log and launches the
    /// gateway.
    pub async fn start(self) -> Gw {
        let (logs, guard) = LogBuf::capture();
        let (upstream_addr, root, scripted) = match self.upstream {
            Upstream::Unftp => {
                let root = tempfile::tempdir().unwrap();
                (start_unftp(root.path()).await, Some(root), None)
            }
            Upstream::Scripted => {
                let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                (l.local_addr().unwrap(), None, Some(l))
            }
            Upstream::At(addr) => (addr, None, None),
        };
        let dir = tempfile::tempdir().unwrap();
        let audit = self.audit.then(|| dir.path().join("audit.jsonl"));
        let mut yaml = format!(
            "listeners:\n  - name: test\n    listen: 127.0.0.1:0\n    mode: reverse\n    upstream: {upstream_addr}\n{}\
             data:\n{}{}",
            self.listener, self.pools, self.data
        );
        if !self.limits.is_empty() {
            yaml.push_str(&format!("limits:\n{}", self.limits));
        }
        if self.metrics {
            yaml.push_str("metrics:\n  listen: 127.0.0.1:0\n");
        }
        if let Some(path) = &audit {
            yaml.push_str(&format!("audit:\n  path: {}\n", path.display()));
        }
        yaml.push_str(&format!(
            "rules:\n  - name: loopback\n    {}\n{}",
            self.clients, self.rule
        ));
        let run = launch(&yaml, &self.file).await;
        Gw {
            addr: run.addr,
            upstream_addr,
            gateway: run.gateway,
            logs,
            metrics: run.metrics,
            audit,
            root,
            scripted,
            stop: Some(run.stop),
            _dir: dir,
            _log_guard: guard,
        }
    }
}

/// A gateway started by `Harness`, serving until dropped or `shutdown`.
pub struct Gw {
    /// The listener's address.
    pub addr: SocketAddr,
    /// The upstream server's address.
    pub upstream_addr: SocketAddr,
    /// The gateway's shared state.
    pub gateway: Arc<Gateway>,
    /// The gateway's log lines.
    pub logs: LogBuf,
    /// The metrics endpoint, with `Harness::metrics`.
    pub metrics: Option<SocketAddr>,
    /// The audit log's file, with `Harness::audit`.
    pub audit: Option<PathBuf>,
    root: Option<tempfile::TempDir>,
    scripted: Option<TcpListener>,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
    _log_guard: tracing::subscriber::DefaultGuard,
}

impl Gw {
    /// Plans and ports the backend holds now.
    pub fn usage(&self) -> Usage {
        self.gateway.backend.usage()
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.gateway.limits.open()
    }

    /// The directory libunftp serves (`Upstream::Unftp`).
    pub fn root(&self) -> &Path {
        self.root.as_ref().expect("no libunftp upstream").path()
    }

    /// The scripted server's listener (`Upstream::Scripted`).
    pub fn upstream(&self) -> &TcpListener {
        self.scripted.as_ref().expect("no scripted upstream")
    }

    /// The scripted server's listener (`Upstream::Scripted`), taken out.
    pub fn take_upstream(&mut self) -> TcpListener {
        self.scripted.take().expect("no scripted upstream")
    }

    /// Stops the gateway (its listeners, then its sessions after a grace).
    pub fn shutdown(&mut self) {
        self.stop.take();
    }

    /// Waits until every plan and port is released (sessions may go on).
    pub async fn wait_released(&self) {
        let limit = tokio::time::Instant::now() + LIMIT;
        while self.usage() != Usage::default() {
            assert!(tokio::time::Instant::now() < limit, "{:?}", self.usage());
            // Polls a counter that the gateway's tasks lower.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every plan and port is released and every session is
    /// gone (plans are freed by tasks that run after the session ends).
    pub async fn wait_idle(&self) {
        let limit = tokio::time::Instant::now() + LIMIT;
        loop {
            let u = self.usage();
            let open = self.open_sessions();
            if u == Usage::default() && open == 0 {
                return;
            }
            if tokio::time::Instant::now() > limit {
                panic!("still open: {u:?}, {open} sessions\n{}", self.logs.text());
            }
            // Polls counters; the events that lower them are inside the
            // gateway's tasks.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until exactly `n` ports are leased; the count is lowered by
    /// tasks inside the gateway.
    pub async fn wait_ports(&self, n: usize) {
        let limit = tokio::time::Instant::now() + LIMIT;
        while self.usage().ports != n {
            assert!(
                tokio::time::Instant::now() < limit,
                "{} ports leased, waited for {n}\n{}",
                self.usage().ports,
                self.logs.text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for `n` complete audit lines and returns them parsed.
    pub async fn audit_lines(&self, n: usize) -> Vec<serde_json::Value> {
        let path = self.audit.as_ref().expect("no audit log");
        let limit = tokio::time::Instant::now() + LIMIT;
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let complete = text.ends_with('\n') || text.is_empty();
            if complete && text.lines().count() >= n {
                return text
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
            }
            assert!(
                tokio::time::Instant::now() < limit,
                "wanted {n} audit lines: {text}"
            );
            // Polls a file that the gateway's task appends to.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One end of a control connection, read line by line.
pub struct Peer {
    pub r: BufReader<OwnedReadHalf>,
    pub w: OwnedWriteHalf,
}

impl Peer {
    /// Wraps a connected stream.
    pub fn new(s: TcpStream) -> Self {
        let (r, w) = s.into_split();
        Peer {
            r: BufReader::new(r),
            w,
        }
    }

    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> Self {
        Peer::new(TcpStream::connect(addr).await.unwrap())
    }

    /// Writes `b` whole.
    pub async fn send(&mut self, b: &[u8]) {
        self.w.write_all(b).await.unwrap();
    }

    /// One line without CRLF; empty at end of stream.
    pub async fn line(&mut self) -> String {
        let mut buf = Vec::new();
        let _ = bounded("line", self.r.read_until(b'\n', &mut buf)).await;
        String::from_utf8_lossy(&buf)
            .trim_end_matches(['\r', '\n'])
            .to_string()
    }

    /// One line as received, CRLF included.
    pub async fn raw_line(&mut self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = bounded("raw line", self.r.read_until(b'\n', &mut buf)).await;
        buf
    }

    /// A whole reply (multi-line included); returns (code, last line). The
    /// code is 0 when the stream ended or the line has none.
    pub async fn reply(&mut self) -> (u16, String) {
        let first = self.line().await;
        let code: u16 = first.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        let mut last = first.clone();
        if first.as_bytes().get(3) == Some(&b'-') {
            let end = format!("{code} ");
            while !last.starts_with(&end) {
                last = self.line().await;
                if last.is_empty() {
                    break;
                }
            }
        }
        (code, last)
    }

    /// Sends `c` and CRLF; returns the reply.
    pub async fn cmd(&mut self, c: &str) -> (u16, String) {
        self.send(format!("{c}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Reads to end of stream (or a reset).
    pub async fn rest(&mut self) -> String {
        let mut out = Vec::new();
        let _ = bounded("end of stream", self.r.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// The data port of a 227 reply's text.
pub fn port_of_227(text: &str) -> u16 {
    let inner = text.split('(').nth(1).unwrap().split(')').next().unwrap();
    let n: Vec<u16> = inner
        .split(',')
        .map(|x| x.trim().parse().unwrap())
        .collect();
    n[4] * 256 + n[5]
}

/// The data port of a 229 reply's text.
pub fn port_of_229(text: &str) -> u16 {
    let inner = text.split("|||").nth(1).unwrap();
    inner
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap()
}

/// Downloads `name` whole through suppaftp's RETR.
pub async fn retr_all(
    ftp: &mut suppaftp::tokio::AsyncFtpStream,
    name: &str,
) -> Result<Vec<u8>, suppaftp::FtpError> {
    ftp.retr(name, |mut s| {
        Box::pin(async move {
            let mut buf = Vec::new();
            s.read_to_end(&mut buf)
                .await
                .map_err(suppaftp::FtpError::ConnectionError)?;
            Ok((buf, s))
        })
    })
    .await
}

/// SHA-256 of `b`, to compare the bytes that arrived with those sent.
pub fn digest(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

/// The built `ftpgate` binary in a process of its own, its stderr read into
/// a `LogBuf`; killed when dropped, so a failed test leaves none.
pub struct Binary {
    pub child: tokio::process::Child,
    pub log: LogBuf,
    keep: Arc<AtomicBool>,
}

impl Binary {
    /// Runs `ftpgate` with `args` and `RUST_LOG=rust_log`; the log's waits
    /// fail the test after `limit`. The log is read until the process ends.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S], rust_log: &str, limit: Duration) -> Binary {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ftpgate"))
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("ftpgate starts");
        let log = LogBuf::with_limit(limit);
        let keep = Arc::new(AtomicBool::new(true));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (sink, kept) = (log.clone(), keep.clone());
        // Read to the end, so that the pipe never fills and blocks the gateway.
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                if kept.load(Ordering::Relaxed) {
                    sink.append(format!("{l}\n").as_bytes());
                }
            }
        });
        Binary { child, log, keep }
    }

    /// Waits for a log line containing `what` and returns its `addr=`.
    pub async fn addr_of(&self, what: &str) -> SocketAddr {
        let text = self.log.wait_for(what).await;
        let line = text.lines().find(|l| l.contains(what)).unwrap();
        line.split("addr=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line}"))
    }

    /// Stops keeping log lines (they are still read): a long run's log
    /// would otherwise grow without bound.
    pub fn forget_log(&self) {
        self.keep.store(false, Ordering::Relaxed);
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("ftpgate still running")
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
            require_tls: false,
            require_prot_p: false,
        },
        tls: Default::default(),
    });
    s.server_bytes(b"220 ready\r\n");
    while s.poll_action().is_some() {}
    s
}
