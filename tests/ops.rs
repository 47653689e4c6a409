//! Operations: the metrics endpoint and the audit log after real transfers
//! (libunftp behind the gateway, suppaftp in front), `ftpgate explain`, the
//! generated man page and completions, and READY=1 to systemd.

mod common;

use common::{retr_all, Gw, Harness, Upstream};

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use suppaftp::tokio::AsyncFtpStream;
use suppaftp::types::FileType;
use suppaftp::{Mode, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The gateway in front of libunftp, with a metrics endpoint and an audit
/// log; SITE is denied.
async fn start() -> Gw {
    start_with("clients: [127.0.0.0/8]").await
}

async fn start_with(clients: &str) -> Gw {
    Harness::new(Upstream::Unftp)
        .file("ops.yaml")
        .metrics()
        .audit()
        .clients(clients)
        .rule("    deny_commands: [SITE]\n")
        .start()
        .await
}

/// The gateway's metrics endpoint.
fn metrics(env: &Gw) -> SocketAddr {
    env.metrics.expect("metrics endpoint bound")
}

/// The gateway's audit log.
fn audit(env: &Gw) -> &Path {
    env.audit.as_deref().expect("audit log")
}

/// One plain HTTP/1.1 GET; returns (status line, body).
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
        .await
        .expect("endpoint answers")
        .unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of one sample line (`name{labels}`), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

/// Scrapes until every `(series, value)` holds, or fails after a bounded
/// wait with the last scrape: the transfer's log event may be handled just
/// after the client saw the final reply.
async fn scrape_until(addr: SocketAddr, want: &[(&str, f64)]) -> String {
    let limit = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        if want.iter().all(|(s, v)| sample(&body, s) == Some(*v)) {
            return body;
        }
        if tokio::time::Instant::now() > limit {
            let got: Vec<_> = want.iter().map(|(s, _)| (s, sample(&body, s))).collect();
            panic!("metrics never reached {want:?}; got {got:?}\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn login(env: &Gw) -> (AsyncFtpStream, SocketAddr) {
    let stream = TcpStream::connect(env.addr).await.unwrap();
    let local = stream.local_addr().unwrap();
    let mut ftp = AsyncFtpStream::connect_with_stream(stream).await.unwrap();
    ftp.set_mode(Mode::Passive);
    ftp.login("anonymous", "test@").await.unwrap();
    ftp.transfer_type(FileType::Binary).await.unwrap();
    (ftp, local)
}

async fn download(ftp: &mut AsyncFtpStream, name: &str) -> Vec<u8> {
    retr_all(ftp, name).await.unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn metrics_count_a_real_session() {
    let env = start().await;
    let (status, _) = get(metrics(&env), "/nope").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let before = scrape_until(metrics(&env), &[]).await;
    assert_eq!(
        sample(&before, "ftpgate_transfers_total{mode=\"passive/passive\"}"),
        None
    );

    let down = vec![7u8; 300_000];
    std::fs::write(env.root().join("down.bin"), &down).unwrap();
    let up = vec![9u8; 123_457];
    let (mut ftp, _) = login(&env).await;
    assert_eq!(download(&mut ftp, "down.bin").await, down);
    ftp.put_file("up.bin", &mut up.as_slice()).await.unwrap();
    let refused = ftp
        .custom_command("SITE CHMOD 777 up.bin", &[Status::CommandOk])
        .await;
    assert!(refused.is_err(), "SITE is denied by the rule");

    // While the control connection is open the session counts as open.
    scrape_until(
        metrics(&env),
        &[
            ("ftpgate_open_sessions{listener=\"test\"}", 1.0),
            ("ftpgate_transfers_total{mode=\"passive/passive\"}", 2.0),
        ],
    )
    .await;
    ftp.quit().await.unwrap();

    let body = scrape_until(
        metrics(&env),
        &[
            ("ftpgate_sessions_total{listener=\"test\"}", 1.0),
            ("ftpgate_open_sessions{listener=\"test\"}", 0.0),
            ("ftpgate_open_pinholes{listener=\"test\"}", 0.0),
            ("ftpgate_transfers_total{mode=\"passive/passive\"}", 2.0),
            (
                "ftpgate_data_bytes_total{direction=\"to_client\"}",
                300_000.0,
            ),
            (
                "ftpgate_data_bytes_total{direction=\"to_server\"}",
                123_457.0,
            ),
            ("ftpgate_refusals_total{reason=\"command\"}", 1.0),
            ("ftpgate_session_setup_seconds_count", 1.0),
            ("ftpgate_transfer_seconds_count", 2.0),
        ],
    )
    .await;
    // Each histogram's +Inf bucket holds every observation.
    assert_eq!(
        sample(&body, "ftpgate_transfer_seconds_bucket{le=\"+Inf\"}"),
        Some(2.0),
        "{body}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn audit_line_of_a_real_transfer() {
    let env = start().await;
    let data = vec![3u8; 65_536 + 11];
    std::fs::write(env.root().join("a file.bin"), &data).unwrap();
    let (mut ftp, client) = login(&env).await;
    let year = ftpgate::audit::rfc3339(std::time::SystemTime::now())[..4].to_string();
    assert_eq!(download(&mut ftp, "a file.bin").await, data);
    ftp.quit().await.unwrap();

    let limit = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(audit(&env)).unwrap_or_default();
        if text.ends_with('\n') {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < limit,
            "no audit line: {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one line per transfer: {text}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let time = v["time"].as_str().unwrap();
    assert_eq!(time.len(), "2024-01-01T00:00:00.000Z".len(), "{time}");
    assert!(
        time.starts_with(&format!("{year}-")) && time.ends_with('Z'),
        "{time}"
    );
    assert_eq!(v["session"], 1);
    assert_eq!(v["listener"], "test");
    assert_eq!(v["client"], client.to_string());
    assert_eq!(v["server"], env.upstream_addr.to_string());
    assert_eq!(v["user"], "anonymous");
    assert_eq!(v["command"], "RETR");
    assert_eq!(v["path"], "a file.bin");
    assert_eq!(v["mode"], "passive/passive");
    assert_eq!(v["direction"], "download");
    assert_eq!(v["bytes"], 65_547);
    assert_eq!(v["to_client"], 65_547);
    assert_eq!(v["to_server"], 0);
    let ms = v["duration_ms"].as_u64().expect("duration_ms is a number");
    assert!(ms < 10_000, "{ms}");
    assert_eq!(v["reply"], 226);
    assert_eq!(v["result"], "ok");
    assert_eq!(
        v.as_object().unwrap().len(),
        16,
        "no unexpected fields: {v}"
    );
}

fn ftpgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftpgate"))
}

const EXPLAIN_RULES: &str = "
listeners:
  - name: edge
    listen: 127.0.0.1:0
    mode: transparent
rules:
  - name: bad servers
    servers: [198.51.100.0/24]
    action: deny
  - name: lan
    clients: [10.0.0.0/24]
    modes: [passive]
    server_mode: active
    data_ports: 2000-3000
    tls: passthrough
    deny_commands: [SITE, DELE]
";

fn explain(client: &str, server: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.yaml");
    std::fs::write(&file, EXPLAIN_RULES).unwrap();
    let out = ftpgate()
        .args(["explain", "--config"])
        .arg(&file)
        .args(["--client", client, "--server", server])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn explain_allowed_denied_and_unmatched() {
    let (code, text) = explain("10.0.0.9", "192.0.2.1:21");
    assert_eq!(code, Some(0), "{text}");
    for line in [
        "allowed by rule 2 `lan`",
        "  modes: passive\n",
        "  server_mode: active",
        "  data_ports: 2000-3000\n",
        "  tls: passthrough",
        "  deny_commands: SITE, DELE\n",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }

    let (code, text) = explain("10.0.0.9", "198.51.100.7:21");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("refused by rule 1 `bad servers` (action: deny)"),
        "{text}"
    );

    let (code, text) = explain("192.0.2.50", "192.0.2.1:21");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("refused: none of the 2 rules matches"),
        "{text}"
    );

    // An IPv4-mapped client is matched as IPv4, as sessions are.
    let (code, _) = explain("::ffff:10.0.0.9", "192.0.2.1:21");
    assert_eq!(code, Some(0));
}

#[test]
fn man_page_and_completions_come_from_the_cli() {
    let man = ftpgate().args(["generate", "man"]).output().unwrap();
    assert!(man.status.success());
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(
        man.starts_with(".ie") || man.contains(".TH ftpgate"),
        "{man}"
    );
    for sub in ["run", "check", "nft", "explain"] {
        assert!(
            man.contains(&format!("ftpgate\\-{sub}")),
            "man page lists {sub}"
        );
    }
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef ftpgate"),
        ("fish", "complete -c ftpgate"),
    ] {
        let out = ftpgate()
            .args(["generate", "completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell} completions: {text}");
        assert!(text.contains("explain"), "{shell} completions know explain");
    }
}

/// `ftpgate run` under `NOTIFY_SOCKET` sends READY=1 once it listens.
#[test]
fn ready_is_sent_to_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let rules = dir.path().join("r.yaml");
    std::fs::write(
        &rules,
        "listeners:\n  - name: l\n    listen: 127.0.0.1:0\n    mode: reverse\n    upstream: 127.0.0.1:9\nrules:\n  - name: none\n    clients: [127.0.0.1]\n",
    )
    .unwrap();
    let child = ftpgate()
        .args(["run", "--grace", "0", "--config"])
        .arg(&rules)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let got = sock.recv(&mut buf);
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let n = got.unwrap_or_else(|e| panic!("no notification ({e}); stderr:\n{stderr}"));
    assert_eq!(&buf[..n], b"READY=1\n");
    // SIGTERM: the gateway tells systemd it is stopping, then exits cleanly.
    let next = sock.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
    assert_eq!(&buf[..next], b"STOPPING=1\n");
    assert!(out.status.success(), "{stderr}");
}

#[tokio::test(flavor = "current_thread")]
async fn refused_session_is_counted_by_reason() {
    // The only rule admits a client that is not us: no rule matches.
    let env = start_with("clients: [192.0.2.1/32]").await;
    let mut s = TcpStream::connect(env.addr).await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut reply))
        .await
        .expect("the gateway answers and closes")
        .unwrap();
    assert!(reply.starts_with("421 "), "{reply}");
    let body = scrape_until(
        metrics(&env),
        &[
            ("ftpgate_sessions_total{listener=\"test\"}", 1.0),
            ("ftpgate_open_sessions{listener=\"test\"}", 0.0),
            ("ftpgate_refusals_total{reason=\"rule\"}", 1.0),
        ],
    )
    .await;
    assert_eq!(
        sample(&body, "ftpgate_session_setup_seconds_count"),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        std::fs::read_to_string(audit(&env)).unwrap(),
        "",
        "no transfer, no audit line"
    );
}
