//! The `ftpgate` binary under signals: SIGTERM drains, SIGHUP reloads the
//! rule file. The binary runs as a child process in front of libunftp (in
//! this process), everything on loopback with kernel-chosen ports.

mod common;

use common::{start_unftp, Binary, LogBuf};

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(30);

async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

struct Gate {
    bin: Binary,
    addr: SocketAddr,
    log: LogBuf,
}

impl Gate {
    async fn start(config: &Path) -> Gate {
        Gate::start_with(config, &[]).await
    }

    /// Runs with `extra` arguments after `run`'s own.
    async fn start_with(config: &Path, extra: &[&str]) -> Gate {
        let mut args = vec![
            "run".as_ref(),
            "--grace".as_ref(),
            "10".as_ref(),
            "-c".as_ref(),
            config.as_os_str(),
        ];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        let bin = Binary::spawn(&args, "info", LIMIT);
        let addr = bin.addr_of("listening").await;
        let log = bin.log.clone();
        Gate { bin, addr, log }
    }

    fn signal(&self, sig: &str) {
        let pid = self.bin.pid();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }
}

fn rule_file(upstream: SocketAddr, clients: &str) -> String {
    format!(
        "listeners:\n  - name: t\n    listen: 127.0.0.1:0\n    mode: reverse\n    upstream: {upstream}\n\
         data:\n  client_ports: 20000-29999\n  server_ports: 30000-39999\n\
         rules:\n  - name: r\n    clients: [{clients}]\n"
    )
}

/// Reads one whole reply; returns its first line.
async fn reply(r: &mut BufReader<TcpStream>) -> String {
    let mut first = String::new();
    bounded("reply", r.read_line(&mut first)).await.unwrap();
    if first.as_bytes().get(3) == Some(&b'-') {
        let end = format!("{} ", &first[..3]);
        loop {
            let mut l = String::new();
            if bounded("reply", r.read_line(&mut l)).await.unwrap() == 0 || l.starts_with(&end) {
                break;
            }
        }
    }
    first
}

async fn cmd(r: &mut BufReader<TcpStream>, c: &str) -> String {
    r.get_mut()
        .write_all(format!("{c}\r\n").as_bytes())
        .await
        .unwrap();
    reply(r).await
}

/// The greeting a new session gets, or what it gets instead.
/// Logs in through the gateway at `addr`, opens a passive data connection
/// and starts `RETR path`: the control connection (150 read) and the data
/// connection.
async fn retr(addr: SocketAddr, path: &str) -> (BufReader<TcpStream>, TcpStream) {
    let c = login(addr).await;
    retr_on(c, addr, path).await
}

/// A control connection through the gateway at `addr`, logged in, TYPE I.
async fn login(addr: SocketAddr) -> BufReader<TcpStream> {
    let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
    assert!(reply(&mut c).await.starts_with("220"));
    assert!(cmd(&mut c, "USER anonymous").await.starts_with("331"));
    assert!(cmd(&mut c, "PASS x@").await.starts_with("230"));
    assert!(cmd(&mut c, "TYPE I").await.starts_with("200"));
    c
}

/// On the logged-in `c`: EPSV, a data connection, and `RETR path` started.
async fn retr_on(
    mut c: BufReader<TcpStream>,
    addr: SocketAddr,
    path: &str,
) -> (BufReader<TcpStream>, TcpStream) {
    let epsv = cmd(&mut c, "EPSV").await;
    let port: u16 = epsv
        .split("|||")
        .nth(1)
        .unwrap()
        .trim_end_matches(|ch: char| !ch.is_ascii_digit())
        .parse()
        .unwrap();
    let d = TcpStream::connect((addr.ip(), port)).await.unwrap();
    let started = cmd(&mut c, &format!("RETR {path}")).await;
    assert!(started.starts_with("150"), "{started}");
    (c, d)
}

async fn greeting(addr: SocketAddr) -> String {
    match TcpStream::connect(addr).await {
        Ok(s) => {
            let mut r = BufReader::new(s);
            let mut l = String::new();
            let _ = bounded("greeting", r.read_line(&mut l)).await;
            l
        }
        Err(e) => format!("connect failed: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_finishes_transfers() {
    let root = tempfile::tempdir().unwrap();
    let size = 64usize << 20;
    std::fs::write(root.path().join("big"), vec![5u8; size]).unwrap();
    let upstream = start_unftp(root.path()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gate.yaml");
    std::fs::write(&file, rule_file(upstream, "127.0.0.0/8")).unwrap();
    let mut gate = Gate::start(&file).await;

    let (mut c, mut d) = retr(gate.addr, "big").await;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = bounded("first bytes", d.read(&mut buf)).await.unwrap();
    assert!(got > 0);
    std::fs::write(root.path().join("small"), b"drained\n").unwrap();
    let idle = login(gate.addr).await;

    gate.signal("-TERM");
    gate.log.wait_for_n("shutting down", 1).await;
    let refused = greeting(gate.addr).await;
    assert!(
        !refused.starts_with("220"),
        "accepting stopped: {refused:?}"
    );

    // A session that was open at the SIGTERM still gets new data pinholes.
    let (mut ic, mut id) = retr_on(idle, gate.addr, "small").await;
    let mut small = Vec::new();
    bounded("download", id.read_to_end(&mut small))
        .await
        .unwrap();
    assert_eq!(small, b"drained\n");
    assert!(reply(&mut ic).await.starts_with("226"));
    let _ = cmd(&mut ic, "QUIT").await;

    // The running transfer completes.
    loop {
        let n = bounded("transfer", d.read(&mut buf)).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, size);
    assert!(reply(&mut c).await.starts_with("226"));
    let _ = cmd(&mut c, "QUIT").await;
    let status = bounded("exit", gate.bin.child.wait()).await.unwrap();
    assert!(status.success(), "{status}\n{}", gate.log.text());
    let log = gate.log.text();
    assert!(!log.contains("grace period over"), "{log}");
}

/// One thread (the default), two, and one per CPU (0) each carry a
/// session with a download through the relay, then stop on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_thread_count_serves_a_transfer() {
    let root = tempfile::tempdir().unwrap();
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.path().join("f"), &body).unwrap();
    let upstream = start_unftp(root.path()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gate.yaml");
    std::fs::write(&file, rule_file(upstream, "127.0.0.0/8")).unwrap();
    for threads in ["1", "2", "0"] {
        let mut gate = Gate::start_with(&file, &["--threads", threads]).await;
        let (mut c, mut d) = retr(gate.addr, "f").await;
        let mut got = Vec::new();
        bounded("download", d.read_to_end(&mut got)).await.unwrap();
        assert!(
            got == body,
            "--threads {threads}: {} bytes, not the file's",
            got.len()
        );
        assert!(
            reply(&mut c).await.starts_with("226"),
            "--threads {threads}"
        );
        assert!(cmd(&mut c, "QUIT").await.starts_with("221"));
        gate.signal("-TERM");
        let status = bounded("exit", gate.bin.child.wait()).await.unwrap();
        assert!(
            status.success(),
            "--threads {threads}: {status}\n{}",
            gate.log.text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_rules_and_keeps_them_on_a_bad_file() {
    let root = tempfile::tempdir().unwrap();
    let upstream = start_unftp(root.path()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gate.yaml");
    std::fs::write(&file, rule_file(upstream, "127.0.0.0/8")).unwrap();
    let gate = Gate::start(&file).await;
    assert!(greeting(gate.addr).await.starts_with("220"));

    // Rule changed: loopback no longer allowed.
    std::fs::write(&file, rule_file(upstream, "192.0.2.0/24")).unwrap();
    gate.signal("-HUP");
    gate.log.wait_for_n("configuration reloaded", 1).await;
    let g = greeting(gate.addr).await;
    assert!(g.starts_with("421") && g.contains("no rule allows"), "{g}");

    // A broken file: the error is logged with file:line:column and the
    // rules in force stay.
    let broken = rule_file(upstream, "127.0.0.0/8")
        .replace("clients: [127.0.0.0/8]", "clients: [not-a-net]");
    std::fs::write(&file, broken).unwrap();
    gate.signal("-HUP");
    let log = gate.log.wait_for_n("reload failed", 1).await;
    let line = log.lines().find(|l| l.contains("reload failed")).unwrap();
    let at = format!("{}:", file.display());
    let rest = line.split(&at).nth(1).unwrap_or_else(|| panic!("{line}"));
    let mut parts = rest.splitn(3, ':');
    let l: u32 = parts
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{line}"));
    let col: u32 = parts
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{line}"));
    assert_eq!(l, 11, "{line}");
    assert!(col > 0);
    let g = greeting(gate.addr).await;
    assert!(
        g.starts_with("421"),
        "old (reloaded) rules still in force: {g}"
    );

    // And back: allowed again.
    std::fs::write(&file, rule_file(upstream, "127.0.0.0/8")).unwrap();
    gate.signal("-HUP");
    gate.log.wait_for_n("configuration reloaded", 2).await;
    assert!(greeting(gate.addr).await.starts_with("220"));
}

/// At SIGTERM the metrics endpoint closes with the listeners, while an open
/// session still drains: a health check that scrapes it (keepalived's
/// track_script) sees the process go and moves the address away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_the_metrics_endpoint_while_sessions_drain() {
    let root = tempfile::tempdir().unwrap();
    let upstream = start_unftp(root.path()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gate.yaml");
    let yaml = rule_file(upstream, "127.0.0.0/8") + "metrics:\n  listen: 127.0.0.1:0\n";
    std::fs::write(&file, yaml).unwrap();
    let args = ["run", "--grace", "10", "-c"].map(std::ffi::OsStr::new);
    let args = [&args[..], &[file.as_os_str()]].concat();
    let mut bin = Binary::spawn(&args, "info", LIMIT);
    let addr = bin.addr_of("listener=t").await;
    let metrics = bin.addr_of("metrics endpoint listening").await;
    let scrape = || async move {
        let mut s = TcpStream::connect(metrics).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        std::io::Result::Ok(text)
    };
    let before = bounded("scrape", scrape()).await.unwrap();
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");

    let mut idle = login(addr).await;
    let pid = bin.pid().to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(ok.success());
    bin.log.wait_for("shutting down").await;
    let after = bounded("scrape", scrape()).await;
    assert_eq!(
        after.as_ref().map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "{after:?}"
    );
    // The session is still served: the process drains.
    assert!(cmd(&mut idle, "NOOP").await.starts_with("200"));
    let _ = cmd(&mut idle, "QUIT").await;
    let status = bounded("exit", bin.child.wait()).await.unwrap();
    assert!(status.success(), "{status}\n{}", bin.log.text());
}
