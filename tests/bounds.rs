//! A memory bound per session, whatever either peer does: the session core's
//! bounds fed directly, and the real gateway in front of a server that reads
//! but never answers, with the process's peak RSS measured around it.

mod common;

use common::{core_past_greeting as core, Harness, Upstream};

use ftpgate::pinhole::{DataEvent, DataOutcome, Opened};
use ftpgate::session::{
    Action, EndReason, LogEvent, Session, MAX_INPUT_BACKLOG, MAX_PENDING, MAX_REFUSALS,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---- the core ------------------------------------------------------------

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn drain(s: &mut Session) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

fn to_server(a: &[Action]) -> String {
    a.iter()
        .filter_map(|a| match a {
            Action::ToServer(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect()
}

fn to_client(a: &[Action]) -> String {
    a.iter()
        .filter_map(|a| match a {
            Action::ToClient(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect()
}

/// Feeds `chunk` for as long as the core wants client input, as the shell
/// does, up to `max` bytes; returns the bytes fed and the actions.
fn feed_while_wanted(s: &mut Session, chunk: &[u8], max: usize) -> (usize, Vec<Action>) {
    let mut fed = 0;
    let mut actions = Vec::new();
    while s.wants_client_input() && fed < max {
        s.client_bytes(chunk);
        fed += chunk.len();
        loop {
            actions.extend(drain(s));
            if !s.resume() {
                break;
            }
        }
    }
    (fed, actions)
}

#[test]
fn pending_commands_are_bounded_and_the_client_is_no_longer_read() {
    let _serial = serial();
    let mut s = core();
    let chunk = b"NOOP\r\n".repeat(1000);
    let (fed, a) = feed_while_wanted(&mut s, &chunk, 50 << 20);
    let forwarded = to_server(&a).matches("NOOP").count();
    assert_eq!(forwarded, MAX_PENDING, "commands forwarded with no reply");
    assert!(
        fed <= MAX_INPUT_BACKLOG + MAX_PENDING * 6 + chunk.len(),
        "took {fed} bytes before pushing back"
    );
    // One reply frees one slot: one more command goes out, and the client is
    // read again once its backlog has drained below the bound.
    s.server_bytes(b"200 ok\r\n");
    let a = drain(&mut s);
    assert_eq!(to_client(&a), "200 ok\r\n");
    assert_eq!(to_server(&a), "NOOP\r\n");
}

#[test]
fn input_behind_a_held_final_reply_is_bounded() {
    let _serial = serial();
    let mut s = core();
    s.client_bytes(b"PORT 198,51,100,7,195,80\r\n");
    let plan = drain(&mut s)
        .into_iter()
        .find_map(|a| match a {
            Action::Open(p) => Some(p),
            _ => None,
        })
        .unwrap();
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: None,
            server_listen: Some(sa("10.0.0.1:41000")),
        }),
    );
    drain(&mut s);
    s.server_bytes(b"200 PORT ok\r\n");
    drain(&mut s);
    s.client_bytes(b"RETR f\r\n");
    drain(&mut s);
    s.server_bytes(b"150 here\r\n226 done\r\n");
    drain(&mut s);
    // The 226 is held until the plan ends; nothing is processed meanwhile.
    let chunk = b"NOOP\r\n".repeat(500);
    let (fed, a) = feed_while_wanted(&mut s, &chunk, 50 << 20);
    assert_eq!(to_server(&a), "");
    assert!(
        fed <= MAX_INPUT_BACKLOG + chunk.len(),
        "fed {fed} bytes while the reply was held"
    );
    // The server side is bounded the same way.
    let mut fed = 0;
    while s.wants_server_input() {
        s.server_bytes(&b"200 more\r\n".repeat(100));
        fed += 1000;
        assert!(fed < 1 << 20, "server input never pushed back");
    }
    assert!(fed <= MAX_INPUT_BACKLOG + 1000, "{fed}");
    // The plan's end lets everything go on.
    s.data_event(DataEvent::Closed {
        id: plan.id,
        to_client: 5,
        to_server: 0,
        outcome: DataOutcome::Completed,
    });
    let mut a = drain(&mut s);
    while s.resume() {
        a.extend(drain(&mut s));
    }
    assert!(to_client(&a).starts_with("226 done\r\n"));
    assert!(to_server(&a).starts_with("NOOP\r\n"));
    assert!(s.wants_server_input());
}

#[test]
fn refusals_end_the_session_with_421_at_the_limit() {
    let _serial = serial();
    let mut s = core();
    let mut a = Vec::new();
    for i in 0..MAX_REFUSALS {
        assert!(!s.is_ended(), "ended after {i} refusals");
        s.client_bytes(b"LPSV\r\n");
        a.extend(drain(&mut s));
    }
    let text = to_client(&a);
    assert_eq!(text.matches("502 LPSV").count() as u32, MAX_REFUSALS);
    assert!(
        text.ends_with("\r\n421 Too many refused commands (50): closing control connection\r\n")
    );
    assert!(a.contains(&Action::End(EndReason::TooManyRefusals(MAX_REFUSALS))));
    assert!(s.is_ended());
}

#[test]
fn transfer_the_server_never_answered_still_gets_its_record() {
    let _serial = serial();
    let mut s = core();
    s.client_bytes(b"USER bob\r\nPASS x\r\nRETR a\r\n");
    drain(&mut s);
    s.server_bytes(b"331 pw\r\n230 in\r\n");
    drain(&mut s);
    s.client_bytes(b"RETR b\r\n");
    drain(&mut s);
    s.server_closed();
    let records: Vec<_> = drain(&mut s)
        .into_iter()
        .filter_map(|a| match a {
            Action::Log(LogEvent::Transfer(t)) => Some((t.path, t.user, t.reply, t.result)),
            _ => None,
        })
        .collect();
    let ended = "session ended before the server's final reply".to_string();
    assert_eq!(
        records,
        [
            // Sent while the login was still unanswered: no user is named.
            ("a".into(), None, 0, ended.clone()),
            ("b".into(), Some("bob".into()), 0, ended),
        ]
    );
}

// ---- the gateway ---------------------------------------------------------

/// One test here measures the process's peak RSS, so every test in this
/// file runs alone (a failing test's backtrace alone takes 100+ MiB).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Resets the peak RSS (VmHWM) to the current RSS — proc(5), clear_refs.
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

/// A server that accepts, reads everything and never answers, not even a
/// greeting; counts the lines it received.
async fn silent_server() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let lines = Arc::new(AtomicU64::new(0));
    let count = lines.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let lf = buf[..n].iter().filter(|&&b| b == b'\n').count();
                    count.fetch_add(lf as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, lines)
}

/// `control_from_client=` of the "session end" line.
fn read_from_client(log: &str) -> u64 {
    log.lines()
        .find(|l| l.contains("session end"))
        .and_then(|l| l.split("control_from_client=").nth(1))
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no session end line:\n{log}"))
}

#[test]
fn pipelined_flood_into_a_silent_server_is_pushed_back() {
    let _serial = serial();
    runtime().block_on(async {
        let (upstream, server_lines) = silent_server().await;
        let run = Harness::new(Upstream::At(upstream))
            .file("bounds.yaml")
            .limits("  idle_timeout: 2s\n")
            .start()
            .await;
        let logs = &run.logs;
        const FLOOD: u64 = 50 << 20;
        reset_peak_rss();
        let before = status_kib("VmRSS");

        let client = TcpStream::connect(run.addr).await.unwrap();
        let (mut r, mut w) = client.into_split();
        let written = Arc::new(AtomicU64::new(0));
        let progress = written.clone();
        let writer = tokio::spawn(async move {
            let chunk = b"NOOP\r\n".repeat(65536 / 6);
            while progress.load(Ordering::Relaxed) < FLOOD {
                if w.write_all(&chunk).await.is_err() {
                    break;
                }
                progress.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        });
        // Pushed back, the session sees no new line and ends at the idle
        // timeout; without a bound the flood runs until the limit here.
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(120), r.read_to_end(&mut out))
            .await
            .expect("the session ends")
            .ok();
        let peak = status_kib("VmHWM");
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("421 "), "{out}");
        let log = logs.wait_for("session end").await;
        writer.abort();

        let written = written.load(Ordering::Relaxed);
        assert!(written < FLOOD, "the client wrote all {written} bytes");
        let read = read_from_client(&log);
        assert!(
            read < 64 * 1024,
            "the gateway read {read} bytes of pipelined commands"
        );
        let forwarded = server_lines.load(Ordering::Relaxed);
        assert!(
            forwarded <= MAX_PENDING as u64,
            "{forwarded} unanswered commands forwarded"
        );
        let growth = peak.saturating_sub(before);
        assert!(
            growth < 16 * 1024,
            "peak RSS grew by {growth} KiB during the flood"
        );
    });
}
