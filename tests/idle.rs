//! Many idle control sessions through one gateway process (tests/lab/idle.py
//! in its small mode): every logged-in session still answers NOOP. Needs only
//! loopback, python3 and pyftpdlib. Without pyftpdlib the test prints
//! `idle: skipped (<reason>)` and passes, unless `FTPGATE_LAB=1` is set, in
//! which case it fails. Memory per session is a benchmark figure
//! (`tests/lab/idle.py --sessions 1000,10000` on a release build), not an
//! assertion here.

use std::path::PathBuf;
use std::process::Command;

/// Sessions held at once: enough that the sessions share the gateway's
/// runtime and their replies interleave, small enough for any machine's
/// default descriptor limit.
const SESSIONS: usize = 200;

fn idle_command() -> Command {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/lab/idle.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .arg("--ftpgate-bin")
        .arg(env!("CARGO_BIN_EXE_ftpgate"));
    cmd
}

#[test]
fn idle_sessions_all_answer_noop() {
    let check = idle_command().arg("--check").output();
    let ready = match &check {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        Err(e) => Some(format!("cannot run python3: {e}")),
    };
    if let Some(reason) = ready {
        assert!(
            std::env::var("FTPGATE_LAB").as_deref() != Ok("1"),
            "idle: FTPGATE_LAB=1 but prerequisites are missing: {reason}"
        );
        println!("idle: skipped ({reason})");
        return;
    }
    let out = idle_command()
        .args(["--sessions", &SESSIONS.to_string(), "--idle", "0.5"])
        .output()
        .expect("idle.py runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout
        .lines()
        .find(|l| l.starts_with("idle: sessions="))
        .unwrap_or_else(|| panic!("no result line from idle.py"));
    let want = format!("idle: sessions={SESSIONS} logged_in={SESSIONS} noop_200={SESSIONS} ");
    assert!(line.starts_with(&want), "{line}");
    assert!(out.status.success(), "idle.py failed: {line}");
}
