//! Hostile peers through the lab edge (tests/lab/hostile.py): the kernel's FTP
//! helper and ftpgate side by side, one table of reply codes and what was
//! opened. ftpgate must hold on every gating case; the kernel's results are
//! printed, not asserted.
//!
//! Needs root, `ip`, `nft`, `ss` and python3. Without them the test prints
//! `lab hostile: skipped (<reason>)` and passes, unless `FTPGATE_LAB=1` is set.
//! Namespaces (`fgl<pid>x<random>-*`) and the gateway's nftables table are
//! named per run, and every port is inside those namespaces, so this runs
//! alongside other lab tests.

use std::path::PathBuf;
use std::process::Command;

fn hostile_command() -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/lab/hostile.py"))
        .args(["--ftpgate-bin", env!("CARGO_BIN_EXE_ftpgate")]);
    cmd
}

/// Why the lab cannot run here, if it cannot.
fn missing_prerequisites() -> Option<String> {
    let out = match hostile_command().arg("--check").output() {
        Ok(out) => out,
        Err(err) => return Some(format!("cannot run python3: {err}")),
    };
    if out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Some(text.strip_prefix("hostile: ").unwrap_or(&text).to_string())
}

#[test]
fn lab_hostile_ftpgate_holds_every_case() {
    if let Some(reason) = missing_prerequisites() {
        assert!(
            std::env::var("FTPGATE_LAB").as_deref() != Ok("1"),
            "lab hostile: FTPGATE_LAB=1 but prerequisites are missing: {reason}"
        );
        println!("lab hostile: skipped ({reason})");
        return;
    }
    let out = hostile_command().output().expect("hostile.py runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let verdicts: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("hostile ftpgate "))
        .collect();
    let failed: Vec<&&str> = verdicts.iter().filter(|l| l.contains(": FAIL")).collect();
    assert!(failed.is_empty(), "ftpgate did not hold: {failed:#?}");
    let held = verdicts.iter().filter(|l| l.ends_with(": held")).count();
    // Every case ran: one verdict per row of the table, and most of them gate.
    let rows = stdout.lines().filter(|l| l.starts_with("| ")).count() - 1;
    assert_eq!(verdicts.len(), rows, "a verdict per case");
    assert!(held >= 20, "only {held} cases held");
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("ftpgate: "))
        .expect("summary line");
    assert_eq!(summary, format!("ftpgate: {held} held, 0 failed"));
    assert!(
        out.status.success(),
        "hostile.py exited with {}",
        out.status
    );
}
