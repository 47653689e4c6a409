//! Restarts that drop nothing. A second `ftpgate run` with the same rule
//! file binds beside the running one (SO_REUSEPORT); SIGTERM makes the old
//! one close its listeners, so new sessions go to the new one, while its
//! own sessions finish. Listeners can also come from the service manager
//! (systemd socket activation, `LISTEN_FDS`), and two gateways never share
//! an nftables table.
//!
//! The handoff and table tests run the gateways in a network namespace of
//! their own (`net.ipv4.tcp_migrate_req` is per namespace, and the test
//! sets it there without touching the host). They need root and `ip`;
//! without them they print `skipped (<reason>)` and pass, unless
//! `FTPGATE_LAB=1` is set, in which case they fail.

mod common;

use common::{bounded, digest, retr_all, start_unftp, LogBuf};
use sha2::{Digest, Sha256};
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use suppaftp::tokio::AsyncFtpStream;
use suppaftp::types::FileType;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ftpgate")
}

/// A process whose stderr is read into a `LogBuf`; killed when dropped, so
/// a failed test leaves none behind.
struct Proc {
    child: tokio::process::Child,
    log: LogBuf,
}

impl Proc {
    /// Runs `program args` with `RUST_LOG=info` and `stdin`.
    fn spawn<S: AsRef<OsStr>>(program: &str, args: &[S], stdin: Stdio) -> Proc {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{program} starts: {e}"));
        let log = LogBuf::default();
        let sink = log.clone();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        // Read to the end, so that the pipe never fills and blocks the gateway.
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                sink.append(format!("{l}\n").as_bytes());
            }
        });
        Proc { child, log }
    }

    /// `ftpgate run --reuse-port -c config --grace 30`.
    fn gateway(config: &Path) -> Proc {
        let args = [
            OsStr::new("run"),
            OsStr::new("--reuse-port"),
            OsStr::new("--grace"),
            OsStr::new("30"),
            OsStr::new("-c"),
            config.as_os_str(),
        ];
        Proc::spawn(bin(), &args, Stdio::null())
    }

    /// Waits for a log line containing `what` and returns its `addr=`.
    async fn addr_of(&self, what: &str) -> SocketAddr {
        let text = self.log.wait_for(what).await;
        let line = text.lines().find(|l| l.contains(what)).unwrap();
        line.split("addr=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line}"))
    }

    /// SIGTERM, sent at once (no `kill` process to start first).
    fn terminate(&self) {
        let pid = self
            .child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32));
        rustix::process::kill_process(pid.expect("still running"), rustix::process::Signal::TERM)
            .unwrap();
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("still running").to_string();
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(ok.success(), "kill {sig} {pid}");
    }

    /// Sessions this process served, by its log.
    fn sessions(&self) -> usize {
        self.log.text().matches("session start").count()
    }

    /// Waits for the process to end; its log when it failed.
    async fn exit_ok(&mut self) {
        let status = bounded("exit", self.child.wait()).await.unwrap();
        assert!(status.success(), "{status}\n{}", self.log.text());
    }
}

fn rule_file(listen: &str, upstream: SocketAddr) -> String {
    format!(
        "listeners:\n  - name: t\n    listen: {listen}\n    mode: reverse\n    upstream: {upstream}\n\
         data:\n  client_ports: 20000-29999\n  server_ports: 30000-39999\n\
         rules:\n  - name: r\n    clients: [127.0.0.0/8]\n"
    )
}

/// Bytes that differ from offset to offset, so a lost or repeated block
/// changes the digest.
fn body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// Reports why a test cannot run here; under FTPGATE_LAB=1, where a silent
/// skip would hide a broken CI machine, fails instead.
fn skip(why: &str) {
    assert!(
        std::env::var("FTPGATE_LAB").as_deref() != Ok("1"),
        "FTPGATE_LAB=1 but {why}"
    );
    eprintln!("skipped ({why})");
}

fn run_ok(program: &str, args: &[&str]) -> Result<(), String> {
    match Command::new(program).args(args).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {program}: {e}")),
    }
}

/// A network namespace with loopback up and `net.ipv4.tcp_migrate_req` on,
/// deleted when dropped.
struct Netns(String);

impl Netns {
    /// The namespace, or `None` after saying why this host cannot make one.
    fn new(tag: &str) -> Option<Netns> {
        let uid = Command::new("id").arg("-u").output();
        if !uid.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0") {
            skip("not running as root");
            return None;
        }
        let name = format!("ftpgate-{tag}-{}", std::process::id());
        if let Err(e) = run_ok("ip", &["netns", "add", &name]) {
            skip(&e);
            return None;
        }
        let ns = Netns(name);
        let exec = ["netns", "exec", &ns.0];
        run_ok(
            "ip",
            &[&exec[..], &["ip", "link", "set", "lo", "up"]].concat(),
        )
        .unwrap();
        let sysctl = [&exec[..], &["sysctl", "-qw", "net.ipv4.tcp_migrate_req=1"]].concat();
        if let Err(e) = run_ok("ip", &sysctl) {
            skip(&format!("net.ipv4.tcp_migrate_req (Linux 5.14): {e}"));
            return None;
        }
        Some(ns)
    }

    /// Runs `f` on a thread of its own inside the namespace: sockets it
    /// makes, threads it starts and processes it spawns are all there.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = Path::new("/run/netns").join(&self.0);
        std::thread::scope(|s| {
            let t = s.spawn(move || {
                use std::os::fd::AsFd;
                let ns = std::fs::File::open(&path).unwrap();
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap();
                f()
            });
            t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn login(addr: SocketAddr) -> Result<AsyncFtpStream, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    login_on(stream).await
}

async fn login_on(stream: tokio::net::TcpStream) -> Result<AsyncFtpStream, String> {
    let mut ftp = AsyncFtpStream::connect_with_stream(stream)
        .await
        .map_err(|e| format!("greeting: {e}"))?;
    ftp.login("anonymous", "x@")
        .await
        .map_err(|e| format!("login: {e}"))?;
    ftp.transfer_type(FileType::Binary)
        .await
        .map_err(|e| format!("TYPE I: {e}"))?;
    Ok(ftp)
}

/// A listing that names `f`, then `f` itself, checked against `want`.
async fn list_and_fetch(ftp: &mut AsyncFtpStream, want: &[u8]) -> Result<(), String> {
    let list = ftp.list(None).await.map_err(|e| format!("LIST: {e}"))?;
    if !list.iter().any(|l| l.ends_with(" f")) {
        return Err(format!("LIST without f: {list:?}"));
    }
    let got = retr_all(ftp, "f").await.map_err(|e| format!("RETR: {e}"))?;
    if digest(&got) != want {
        return Err(format!("RETR f: {} bytes, wrong digest", got.len()));
    }
    Ok(())
}

/// One whole session: login, LIST, a digest-checked RETR, QUIT. A session
/// that connects once A has closed its listeners is noted in `late`.
async fn session(addr: SocketAddr, want: &[u8], tally: &Tally) -> Result<(), String> {
    let late = tally.a_closed.load(Ordering::SeqCst);
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if late {
        tally
            .late
            .lock()
            .unwrap()
            .push(stream.local_addr().unwrap());
    }
    let mut ftp = login_on(stream).await?;
    list_and_fetch(&mut ftp, want).await?;
    ftp.quit().await.map_err(|e| format!("QUIT: {e}"))
}

/// What the client loop counts.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: Mutex<Vec<String>>,
    stop: AtomicBool,
    /// Set once A's log says its listeners are closed.
    a_closed: AtomicBool,
    /// The client addresses of sessions that connected after that.
    late: Mutex<Vec<SocketAddr>>,
    /// Told of each session that ends, so `wait_ok` needs no polling.
    ended: tokio::sync::Notify,
}

impl Tally {
    /// Runs one session, bounded, and counts how it went.
    async fn record(&self, session: impl std::future::Future<Output = Result<(), String>>) {
        match tokio::time::timeout(Duration::from_secs(20), session).await {
            Ok(Ok(())) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => self.failed.lock().unwrap().push(e),
            Err(_) => self.failed.lock().unwrap().push("timed out".into()),
        }
        self.ended.notify_waiters();
    }

    fn failed(&self) -> Vec<String> {
        self.failed.lock().unwrap().clone()
    }

    /// Waits until `n` sessions have passed (or one has failed).
    async fn wait_ok(&self, n: usize) {
        let limit = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            // Registered before the check, so an end between the two is seen.
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.ok.load(Ordering::Relaxed) >= n || !self.failed().is_empty() {
                return;
            }
            if tokio::time::timeout_at(limit, ended).await.is_err() {
                panic!("{} of {n} sessions", self.ok.load(Ordering::Relaxed));
            }
        }
    }
}

/// The digest of a file `len` bytes long, read from `stream` after `first`.
async fn finish_digest(first: &[u8], stream: &mut (impl AsyncReadExt + Unpin)) -> (Vec<u8>, usize) {
    let mut h = Sha256::new();
    h.update(first);
    let mut n = first.len();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let got = bounded("transfer", stream.read(&mut buf)).await.unwrap();
        if got == 0 {
            break;
        }
        h.update(&buf[..got]);
        n += got;
    }
    (h.finalize().to_vec(), n)
}

/// Process A serves a continuous client loop; B starts on A's port, A gets
/// SIGTERM. No session fails, both served some, the sessions A had open
/// at the SIGTERM (one mid-download, one idle that then lists and
/// downloads) finish on A, and after it A takes no new session.
#[test]
fn sigterm_hands_the_port_to_a_new_process_under_load() {
    let Some(ns) = Netns::new("handoff") else {
        return;
    };
    ns.run(|| runtime().block_on(handoff_under_load()));
}

async fn handoff_under_load() {
    const WORKERS: usize = 4;
    const AFTER: usize = 40;
    const BURST: usize = 48;
    let root = tempfile::tempdir().unwrap();
    let small = body(64 * 1024);
    let big = body(16 << 20);
    std::fs::write(root.path().join("f"), &small).unwrap();
    std::fs::write(root.path().join("big"), &big).unwrap();
    let want = digest(&small);
    let upstream = start_unftp(root.path()).await;
    let dir = tempfile::tempdir().unwrap();
    let file_a = dir.path().join("a.yaml");
    std::fs::write(&file_a, rule_file("127.0.0.1:0", upstream)).unwrap();
    let mut a = Proc::gateway(&file_a);
    let addr = a.addr_of("listening").await;
    // Set in this namespace only; the gateway reads it at start.
    assert!(
        !a.log.text().contains("tcp_migrate_req"),
        "{}",
        a.log.text()
    );

    // Two sessions that are A's before B exists: one mid-download, held
    // back by not reading, and one idle.
    let mut mid = bounded("login", login(addr)).await.unwrap();
    let mut download = bounded("RETR big", mid.retr_as_stream("big"))
        .await
        .unwrap();
    let mut first = vec![0u8; 64 * 1024];
    let n = bounded("first bytes", download.read(&mut first))
        .await
        .unwrap();
    assert!(n > 0);
    first.truncate(n);
    let mut idle = bounded("login", login(addr)).await.unwrap();

    let tally = Arc::new(Tally::default());
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let (tally, want) = (tally.clone(), want.clone());
        workers.spawn(async move {
            while !tally.stop.load(Ordering::Relaxed) {
                tally.record(session(addr, &want, &tally)).await;
            }
        });
    }
    tally.wait_ok(10).await;

    let file_b = dir.path().join("b.yaml");
    std::fs::write(&file_b, rule_file(&addr.to_string(), upstream)).unwrap();
    let mut b = Proc::gateway(&file_b);
    assert_eq!(b.addr_of("listening").await, addr);
    // The kernel spreads new connections over both: wait until B has some.
    b.log.wait_for_n("session start", 5).await;

    // A burst of sessions as the SIGTERM lands: some are queued on A's
    // listener when it closes, and must move to B rather than be reset.
    let at_term = tally.ok.load(Ordering::Relaxed);
    for _ in 0..BURST {
        let (tally, want) = (tally.clone(), want.clone());
        workers.spawn(async move { tally.record(session(addr, &want, &tally)).await });
    }
    a.terminate();
    a.log.wait_for("shutting down: no new sessions").await;
    tally.a_closed.store(true, Ordering::SeqCst);

    // A's sessions go on: a new listing and download (new pinholes) on the
    // idle one, and the rest of the held-back download.
    bounded("idle session", list_and_fetch(&mut idle, &want))
        .await
        .unwrap();
    let (got, len) = finish_digest(&first, &mut download).await;
    assert_eq!(len, big.len());
    assert!(got == digest(&big), "big: wrong digest after the handoff");
    bounded("226", download.finish()).await.unwrap();

    tally.wait_ok(at_term + BURST + AFTER).await;
    tally.stop.store(true, Ordering::Relaxed);
    while bounded("workers", workers.join_next()).await.is_some() {}
    for mut ftp in [mid, idle] {
        bounded("QUIT", ftp.quit()).await.unwrap();
    }
    a.exit_ok().await;

    let failed = tally.failed();
    let total = tally.ok.load(Ordering::Relaxed);
    let log_a = a.log.text();
    let (on_a, on_b) = (a.sessions(), b.sessions());
    eprintln!(
        "handoff: {total} sessions passed, {} failed; A served {on_a} (2 held across the SIGTERM), B {on_b}",
        failed.len()
    );
    assert!(failed.is_empty(), "failed sessions: {failed:?}");
    assert!(on_a > 2, "A served only the held sessions:\n{log_a}");
    assert!(on_b > 0);
    assert_eq!(on_a + on_b, total + 2, "every session is in one log");
    let late = tally.late.lock().unwrap().clone();
    assert!(
        late.len() >= AFTER - WORKERS,
        "{} late sessions",
        late.len()
    );
    // The check below would pass on a log that names clients otherwise.
    let named = format!("client={}:", late[0].ip());
    assert!(log_a.contains(&named), "no {named} in A's log:\n{log_a}");
    for client in &late {
        assert!(
            !log_a.contains(&format!("client={client} ")),
            "{client} connected after A closed its listeners, yet reached A:\n{log_a}"
        );
    }
    assert!(!log_a.contains("grace period over"), "{log_a}");

    b.signal("-TERM");
    b.exit_ok().await;
}

/// A second gateway with the same listener fails to start unless both were
/// told `--reuse-port`: then it joins the first's port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_shares_the_port_only_with_reuse_port() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("f"), body(1000)).unwrap();
    let want = digest(&body(1000));
    let upstream = start_unftp(root.path()).await;
    let dir = tempfile::tempdir().unwrap();
    let file_a = dir.path().join("a.yaml");
    std::fs::write(&file_a, rule_file("127.0.0.1:0", upstream)).unwrap();
    let mut a = Proc::gateway(&file_a);
    let addr = a.addr_of("listening").await;
    // The warnings that belong to --reuse-port, where they apply here.
    let migrate_off = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .map_or(true, |v| v.trim() == "0");
    let root = rustix::process::geteuid().is_root();
    let log_a = a.log.text();
    assert_eq!(log_a.contains("tcp_migrate_req"), migrate_off, "{log_a}");
    assert_eq!(log_a.contains("--reuse-port as root"), root, "{log_a}");
    assert_eq!(
        log_a.matches("--reuse-port as root").count(),
        usize::from(root)
    );
    let file_b = dir.path().join("b.yaml");
    std::fs::write(&file_b, rule_file(&addr.to_string(), upstream)).unwrap();

    // Without the flag: A (with it) and a plain one; a plain A and B with
    // the flag. Neither joins.
    let plain = [OsStr::new("run"), OsStr::new("-c"), file_b.as_os_str()];
    let mut alone = Proc::spawn(bin(), &plain, Stdio::null());
    let status = bounded("exit", alone.child.wait()).await.unwrap();
    assert!(!status.success());
    let log = alone.log.wait_for("ftpgate: starting").await;
    assert!(
        log.contains(&format!("bind {addr}: Address already in use")),
        "{log}"
    );
    let file_c = dir.path().join("c.yaml");
    std::fs::write(&file_c, rule_file("127.0.0.1:0", upstream)).unwrap();
    let plain_c = [OsStr::new("run"), OsStr::new("-c"), file_c.as_os_str()];
    let mut c = Proc::spawn(bin(), &plain_c, Stdio::null());
    let addr_c = c.addr_of("listening").await;
    let log_c = c.log.text();
    assert!(
        !log_c.contains("tcp_migrate_req") && !log_c.contains("as root"),
        "warned without --reuse-port:\n{log_c}"
    );
    let file_d = dir.path().join("d.yaml");
    std::fs::write(&file_d, rule_file(&addr_c.to_string(), upstream)).unwrap();
    let mut d = Proc::gateway(&file_d);
    let status = bounded("exit", d.child.wait()).await.unwrap();
    assert!(!status.success());
    let log = d.log.wait_for("ftpgate: starting").await;
    assert!(
        log.contains(&format!("bind {addr_c}: Address already in use")),
        "{log}"
    );
    c.signal("-TERM");
    c.exit_ok().await;

    let mut b = Proc::gateway(&file_b);
    assert_eq!(b.addr_of("listening").await, addr);
    let tally = Tally::default();
    bounded("session", session(addr, &want, &tally))
        .await
        .unwrap();
    assert_eq!(a.sessions() + b.sessions(), 1);
    for p in [&mut a, &mut b] {
        p.signal("-TERM");
        p.exit_ok().await;
    }
}

/// Starts `ftpgate run -c config` as systemd starts a socket-activated
/// service: `socket` is descriptor 3, `LISTEN_FDS=1` and `LISTEN_PID` its
/// own pid. `sh` moves the socket from its stdin to 3 and then execs the
/// gateway, which keeps the pid.
fn activated(socket: std::net::TcpListener, config: &Path) -> Proc {
    let script = r#"exec 3<&0 0</dev/null; LISTEN_FDS=1 LISTEN_PID=$$ exec "$0" "$@""#;
    let args = [
        OsStr::new("-c"),
        OsStr::new(script),
        OsStr::new(bin()),
        OsStr::new("run"),
        OsStr::new("-c"),
        config.as_os_str(),
    ];
    let fd = std::os::fd::OwnedFd::from(socket);
    Proc::spawn("sh", &args, Stdio::from(fd))
}

/// A listener whose address is that of the inherited socket takes it (the
/// gateway could not bind it: the socket holds the port without
/// SO_REUSEPORT); another listener is bound as usual. Both carry sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_fds_socket_carries_sessions() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("f"), body(300_000)).unwrap();
    let want = digest(&body(300_000));
    let upstream = start_unftp(root.path()).await;
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let inherited = socket.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gate.yaml");
    let yaml = rule_file(&inherited.to_string(), upstream).replace(
        "data:",
        &format!("  - name: own\n    listen: 127.0.0.1:0\n    mode: reverse\n    upstream: {upstream}\ndata:"),
    );
    std::fs::write(&file, yaml).unwrap();
    let mut gate = activated(socket, &file);
    let log = gate.log.wait_for_n("listening", 2).await;
    let took = log
        .lines()
        .find(|l| l.contains("inherited from the service manager"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        took.contains("listener=t ") && took.contains(&format!("addr={inherited}")),
        "{took}"
    );
    let own: SocketAddr = log
        .lines()
        .find(|l| l.contains("listening listener=own"))
        .and_then(|l| l.split("addr=").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    assert_ne!(own.port(), inherited.port());
    let tally = Tally::default();
    for addr in [inherited, own] {
        bounded("session", session(addr, &want, &tally))
            .await
            .unwrap_or_else(|e| panic!("{addr}: {e}\n{}", gate.log.text()));
    }
    assert_eq!(gate.sessions(), 2);
    gate.signal("-TERM");
    gate.exit_ok().await;
}

/// An inherited socket that no listener has the address of would queue
/// connections nobody accepts: the gateway refuses to start, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_fds_socket_without_a_listener_is_refused() {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stray = socket.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gate.yaml");
    let upstream: SocketAddr = "127.0.0.1:21".parse().unwrap();
    std::fs::write(&file, rule_file("127.0.0.1:0", upstream)).unwrap();
    let mut gate = activated(socket, &file);
    let status = bounded("exit", gate.child.wait()).await.unwrap();
    assert!(!status.success());
    let log = gate.log.wait_for("ftpgate: starting").await;
    assert!(
        log.contains(&format!(
            "inherited socket {stray} (LISTEN_FDS) matches no listener's `listen` (listeners: t 127.0.0.1:0)"
        )),
        "{log}"
    );
    assert!(!log.contains("listening"), "{log}");
}

/// `systemd-socket-activate` (shipped with systemd) holds the socket and
/// starts the gateway at the first connection, which the gateway then
/// serves. In a namespace of its own, where a port learnt from the kernel
/// stays free until the tool binds it.
#[test]
fn systemd_socket_activate_hands_over_its_socket() {
    if Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_err()
    {
        skip("systemd-socket-activate not found (package systemd)");
        return;
    }
    let Some(ns) = Netns::new("activate") else {
        return;
    };
    ns.run(|| runtime().block_on(socket_activate()));
}

async fn socket_activate() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("f"), body(100_000)).unwrap();
    let want = digest(&body(100_000));
    let upstream = start_unftp(root.path()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gate.yaml");
    std::fs::write(&file, rule_file(&addr.to_string(), upstream)).unwrap();
    let listen = addr.to_string();
    let args = [
        OsStr::new("-l"),
        OsStr::new(&listen),
        OsStr::new("-E"),
        OsStr::new("RUST_LOG=info"),
        OsStr::new(bin()),
        OsStr::new("run"),
        OsStr::new("-c"),
        file.as_os_str(),
    ];
    let mut gate = Proc::spawn("systemd-socket-activate", &args, Stdio::null());
    gate.log.wait_for(&format!("Listening on {addr}")).await;
    let tally = Tally::default();
    bounded("session", session(addr, &want, &tally))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", gate.log.text()));
    let log = gate.log.text();
    assert!(
        log.contains(&format!(
            "listener socket inherited from the service manager (LISTEN_FDS) listener=t addr={addr}"
        )),
        "{log}"
    );
    assert_eq!(gate.sessions(), 1);
    gate.signal("-TERM");
    gate.exit_ok().await;
}

/// Two gateways with one nftables table: the second refuses to start,
/// saying why, and the first's table stays; once the first is gone, the
/// table is gone too. The lock is a file under /run/ftpgate, not a name
/// that anyone could take first.
#[test]
fn a_second_gateway_refuses_a_table_in_use() {
    if Command::new("nft").arg("--version").output().is_err() {
        skip("nft not found");
        return;
    }
    let Some(ns) = Netns::new("table") else {
        return;
    };
    let list = || {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.0,
                "nft",
                "list",
                "table",
                "inet",
                "fgt_handoff",
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    ns.run(|| {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("gate.yaml");
            let yaml = "listeners:\n  - name: t\n    listen: 127.0.0.1:0\n    mode: transparent\n\
                        data:\n  nftables_table: fgt_handoff\n  client_ports: 20000-29999\n  server_ports: 30000-39999\n\
                        rules:\n  - name: r\n    clients: [127.0.0.0/8]\n";
            std::fs::write(&file, yaml).unwrap();
            // The abstract socket name an earlier version locked with,
            // which any local user could take first: it no longer matters.
            let squat = {
                use std::os::linux::net::SocketAddrExt;
                let name = std::os::unix::net::SocketAddr::from_abstract_name(b"ftpgate-nft:fgt_handoff")
                    .unwrap();
                std::os::unix::net::UnixListener::bind_addr(&name).unwrap()
            };
            let mut a = Proc::gateway(&file);
            a.addr_of("listening").await;
            assert!(list(), "A's table");
            drop(squat);
            let mut b = Proc::gateway(&file);
            let status = bounded("exit", b.child.wait()).await.unwrap();
            assert!(!status.success());
            let log = b.log.wait_for("ftpgate: starting").await;
            assert!(
                log.contains("nftables table 'fgt_handoff' belongs to another running ftpgate")
                    && log.contains("-fgt_handoff.lock: `fuser -v"),
                "{log}"
            );
            assert!(!log.contains("listening"), "{log}");
            assert!(list(), "A's table survives B");
            a.signal("-TERM");
            a.exit_ok().await;
            assert!(!list(), "A removes its table at exit");
        })
    });
}

/// The socket unit with its service, and an instance of the blue/green
/// template, pass `systemd-analyze verify` (with their paths pointed at
/// this build, whose binary must exist), and carry what the upgrade path
/// relies on.
#[test]
fn systemd_units_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        skip("systemd-analyze not found (package systemd)");
        return;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut texts = std::collections::HashMap::new();
    for name in ["ftpgate.service", "ftpgate.socket", "ftpgate@.service"] {
        let text = std::fs::read_to_string(src.join(name)).unwrap();
        std::fs::write(
            dir.path().join(name),
            text.replace("/usr/local/bin/ftpgate", bin()),
        )
        .unwrap();
        texts.insert(name, text);
    }
    let socket = &texts["ftpgate.socket"];
    assert!(socket.contains("\nListenStream=0.0.0.0:21\n"), "{socket}");
    assert!(socket.contains("\nBindIPv6Only=ipv6-only\n"), "{socket}");
    let template = &texts["ftpgate@.service"];
    for line in [
        "\nDynamicUser=yes\nUser=ftpgate\n",
        "\nType=notify\n",
        "tcp_migrate_req=1",
        " run --reuse-port ",
    ] {
        assert!(template.contains(line), "template lacks {line:?}");
    }
    // Only the blue/green template shares its ports.
    let single = &texts["ftpgate.service"];
    assert!(!single.contains("--reuse-port"), "{single}");
    for units in [
        &["ftpgate.socket", "ftpgate.service"][..],
        &["ftpgate@blue.service"][..],
    ] {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(units.iter().map(|u| dir.path().join(u)))
            .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            // Unknown keys are only warnings, naming the file they are in.
            out.status.success() && !stderr.contains(&*dir.path().to_string_lossy()),
            "systemd-analyze verify {units:?}:\n{stderr}"
        );
    }
}
