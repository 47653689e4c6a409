//! An honest audit trail and clean logs, in process: the gateway in front of
//! libunftp (or a scripted server where one must refuse a login), with the
//! audit log in a file and the text log captured.

mod common;

use common::{bounded, Gw, Harness, Peer, Upstream};

use ftpgate::session::MAX_REFUSALS;
use std::collections::BTreeSet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The gateway in front of `upstream`, writing its audit log to a file.
async fn gateway(upstream: Upstream) -> Gw {
    Harness::new(upstream)
        .file("audit.yaml")
        .audit()
        .start()
        .await
}

/// The gateway in front of libunftp serving an empty directory.
async fn with_unftp() -> Gw {
    gateway(Upstream::Unftp).await
}

async fn logged_in(gw: &Gw) -> Peer {
    let mut c = Peer::new(TcpStream::connect(gw.addr).await.unwrap());
    assert_eq!(c.reply().await.0, 220);
    assert_eq!(c.cmd("USER anonymous").await.0, 331);
    assert_eq!(c.cmd("PASS x@").await.0, 230);
    c
}

// ---- no record is dropped ------------------------------------------------

#[tokio::test(flavor = "current_thread")]
async fn pipelined_transfers_each_get_a_record_or_a_4xx() {
    let gw = with_unftp().await;
    let mut c = logged_in(&gw).await;
    // Forty transfer commands in one segment, none with a data connection:
    // the server answers each in turn, long after the gateway read them all.
    let mut sent = Vec::new();
    let mut burst = String::new();
    for i in 0..20 {
        for (verb, path) in [("NLST", format!("dir{i}")), ("RETR", format!("file{i}"))] {
            burst.push_str(&format!("{verb} {path}\r\n"));
            sent.push((verb.to_string(), path));
        }
    }
    c.send(burst.as_bytes()).await;
    let mut expected = BTreeSet::new();
    let mut refused = 0;
    for (verb, path) in &sent {
        let (code, text) = c.reply().await;
        if code == 450 && text.contains("await completion") {
            refused += 1;
        } else {
            assert!(code >= 400, "{verb} {path}: {code} {text}");
            expected.insert((verb.clone(), path.clone(), code));
        }
    }
    assert!(
        refused > 0,
        "the bound on pending transfers was not reached"
    );
    let lines = gw.audit_lines(expected.len()).await;
    let recorded: BTreeSet<_> = lines
        .iter()
        .map(|v| {
            (
                v["command"].as_str().unwrap().to_string(),
                v["path"].as_str().unwrap().to_string(),
                v["reply"].as_u64().unwrap() as u16,
            )
        })
        .collect();
    assert_eq!(lines.len(), expected.len(), "one record per transfer");
    assert_eq!(recorded, expected, "each record names its own command");
    assert_eq!(refused + lines.len(), sent.len());
}

// ---- the user is the one the server accepted -----------------------------

#[tokio::test(flavor = "current_thread")]
async fn record_carries_the_user_as_of_its_command() {
    let gw = with_unftp().await;
    let mut c = Peer::new(TcpStream::connect(gw.addr).await.unwrap());
    assert_eq!(c.reply().await.0, 220);
    // A transfer command, and a USER right behind it before its reply: the
    // record is written at the reply, after the USER was read.
    c.send(b"RETR before\r\nUSER alice\r\n").await;
    assert_eq!(c.reply().await.0, 530);
    assert_eq!(c.reply().await.0, 331);
    assert_eq!(c.cmd("PASS x").await.0, 230);
    c.send(b"RETR after\r\nUSER bob\r\n").await;
    assert_eq!(c.reply().await.0, 425);
    c.reply().await;
    c.cmd("PASS y").await;
    let lines = gw.audit_lines(2).await;
    let user_of = |path: &str| {
        lines
            .iter()
            .find(|v| v["path"] == path)
            .unwrap_or_else(|| panic!("no record of {path}: {lines:?}"))["user"]
            .clone()
    };
    assert_eq!(user_of("before"), serde_json::Value::Null);
    assert_eq!(user_of("after"), "alice");
}

/// A scripted server: the test answers each command by hand.
async fn scripted() -> (Gw, Peer, Peer) {
    let mut gw = gateway(Upstream::Scripted).await;
    let upstream = gw.take_upstream();
    let mut c = Peer::new(TcpStream::connect(gw.addr).await.unwrap());
    let (s, _) = bounded("accept", upstream.accept()).await.unwrap();
    let mut s = Peer::new(s);
    s.send(b"220 scripted\r\n").await;
    assert_eq!(c.reply().await.0, 220);
    (gw, c, s)
}

/// The client sends `cmd`, the server reads it and answers `reply`.
async fn exchange(c: &mut Peer, s: &mut Peer, cmd: &str, reply: &str) -> u16 {
    c.send(format!("{cmd}\r\n").as_bytes()).await;
    assert_eq!(s.line().await, cmd);
    s.send(format!("{reply}\r\n").as_bytes()).await;
    c.reply().await.0
}

#[tokio::test(flavor = "current_thread")]
async fn user_refused_by_the_server_is_never_recorded() {
    let (gw, mut c, mut s) = scripted().await;
    let (c, s) = (&mut c, &mut s);
    assert_eq!(exchange(c, s, "USER mallory", "331 Password").await, 331);
    assert_eq!(
        exchange(c, s, "PASS guess", "530 Login incorrect").await,
        530
    );
    assert_eq!(exchange(c, s, "RETR x", "530 Not logged in").await, 530);
    assert_eq!(exchange(c, s, "USER eve", "530 No such user").await, 530);
    assert_eq!(exchange(c, s, "RETR y", "530 Not logged in").await, 530);
    assert_eq!(exchange(c, s, "USER bob", "331 Password").await, 331);
    assert_eq!(exchange(c, s, "PASS right", "230 Welcome").await, 230);
    // vsftpd's answer to a second USER: the login stays as it was.
    let refused = "530 Can't change to another user";
    assert_eq!(exchange(c, s, "USER eve", refused).await, 530);
    assert_eq!(exchange(c, s, "RETR z", "425 Use PASV first").await, 425);
    assert_eq!(exchange(c, s, "REIN", "220 Ready for new user").await, 220);
    assert_eq!(exchange(c, s, "RETR w", "530 Not logged in").await, 530);

    let lines = gw.audit_lines(4).await;
    let users: Vec<(String, serde_json::Value)> = lines
        .iter()
        .map(|v| (v["path"].as_str().unwrap().to_string(), v["user"].clone()))
        .collect();
    let null = serde_json::Value::Null;
    assert_eq!(
        users,
        [
            ("x".to_string(), null.clone()),
            ("y".to_string(), null.clone()),
            ("z".to_string(), "bob".into()),
            ("w".to_string(), null),
        ]
    );
    let log = gw.logs.text();
    let logins: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("login accepted"))
        .collect();
    assert_eq!(logins.len(), 1, "{log}");
    assert!(logins[0].ends_with("user=bob"), "{}", logins[0]);
}

// ---- log hygiene ---------------------------------------------------------

#[tokio::test(flavor = "current_thread")]
async fn peer_text_in_the_text_log_is_escaped() {
    let gw = with_unftp().await;
    let mut c = Peer::new(TcpStream::connect(gw.addr).await.unwrap());
    assert_eq!(c.reply().await.0, 220);
    assert_eq!(c.cmd("USER a\x1b[31m user=root").await.0, 331);
    assert_eq!(c.cmd("PASS x").await.0, 230);
    assert!(c.cmd("RETR \x1b[2Jf path=/etc/shadow").await.0 >= 400);
    let log = gw.logs.wait_for(" transfer ").await;
    assert!(!log.contains('\x1b'), "ESC reached the log:\n{log:?}");
    for line in log.lines() {
        for field in [" user=", " path="] {
            assert!(line.matches(field).count() <= 1, "forged{field}: {line}");
        }
    }
    let login = log.lines().find(|l| l.contains("login accepted")).unwrap();
    assert!(login.ends_with(r"user=a\x1b[31m user\x3droot"), "{login}");
    // The audit log is JSON: the value as sent, escaped only by JSON.
    let lines = gw.audit_lines(1).await;
    assert_eq!(lines[0]["user"], "a\x1b[31m user=root");
    assert_eq!(lines[0]["path"], "\x1b[2Jf path=/etc/shadow");
}

#[tokio::test(flavor = "current_thread")]
async fn junk_flood_is_closed_at_the_refusal_limit_with_a_small_log() {
    let gw = with_unftp().await;
    let mut c = Peer::new(TcpStream::connect(gw.addr).await.unwrap());
    assert_eq!(c.reply().await.0, 220);
    let before = gw.logs.text().len();
    // 180 KB of lines the command parser refuses (no verb).
    let junk: Vec<u8> = b"\x01\x02 junk=1 \x1b[2J refused line of junk\r\n"
        .iter()
        .copied()
        .cycle()
        .take(180_000)
        .collect();
    let Peer { mut r, mut w } = c;
    let writer = tokio::spawn(async move {
        // The gateway closes before taking it all: a failed write is expected.
        let _ = w.write_all(&junk).await;
    });
    let mut out = Vec::new();
    let _ = bounded("close", r.read_to_end(&mut out)).await;
    writer.abort();
    // The gateway closes with junk still unread, so the client's stack may
    // drop the last replies for the reset; the next test reads them all.
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("500 "), "{out}");
    let log = gw.logs.wait_for("session end").await;
    let log = &log[before..];
    assert!(
        log.len() * 20 < 180_000,
        "{} bytes of log for 180 KB of junk:\n{log}",
        log.len()
    );
    let refused = log
        .lines()
        .filter(|l| l.contains(": refused what="))
        .count();
    assert!(refused <= 12, "{refused} refusal lines:\n{log}");
    let summary = log
        .lines()
        .find(|l| l.contains("too many refused commands"))
        .unwrap_or_else(|| panic!("no summary line:\n{log}"));
    assert!(summary.contains("refusals=50"), "{summary}");
    // Every refusal is either a line or counted in a later line's
    // `suppressed=`.
    let suppressed: usize = log
        .lines()
        .filter_map(|l| l.split("suppressed=").nth(1))
        .filter_map(|s| s.split(' ').next()?.parse::<usize>().ok())
        .sum();
    assert_eq!(refused + suppressed, 50, "{log}");
    assert!(log.contains("reason=too many refusals (50)"), "{log}");
}

#[tokio::test(flavor = "current_thread")]
async fn client_sees_each_refusal_then_421() {
    let gw = with_unftp().await;
    let mut c = Peer::new(TcpStream::connect(gw.addr).await.unwrap());
    assert_eq!(c.reply().await.0, 220);
    // Exactly as many junk lines as the limit, so none is left unread.
    let junk = b"\x01 junk\r\n".repeat(MAX_REFUSALS as usize);
    c.send(&junk).await;
    let mut out = String::new();
    bounded("close", c.r.read_to_string(&mut out))
        .await
        .unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len() as u32, MAX_REFUSALS + 1, "{out}");
    assert!(lines[..MAX_REFUSALS as usize]
        .iter()
        .all(|l| l.starts_with("500 ")));
    assert!(
        lines[MAX_REFUSALS as usize].starts_with("421 Too many refused commands"),
        "{out}"
    );
    gw.logs.wait_for("reason=too many refusals (50)").await;
}
