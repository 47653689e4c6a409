//! Scale-out in the lab (tests/lab/balancer.py): a real HAProxy in front of
//! three ftpgate instances with PROXY headers, in network namespaces. Both data
//! variants (a: each instance announces its own address; b: all announce the
//! VIP, HAProxy forwards each instance's port slice, configuration from
//! `ftpgate balancer --format haproxy`), each through four phases: mixed
//! sessions spread over the instances, the per-client limit on the real
//! client, one instance killed mid-run, and one replaced under load.
//!
//! A shorter run than the full 1,000 sessions: 120 in the mixed phase of each
//! variant, about 90 s on two cores.
//!
//! Needs root, `ip`, `nft`, `ss`, curl, lftp, haproxy and the lab's servers
//! (`.ci/install-lab-deps`). Without them the test prints `lab balancer:
//! skipped (<reason>)` and passes, unless `FTPGATE_LAB=1` is set.

use std::path::PathBuf;
use std::process::Command;

const SESSIONS: usize = 120;

fn balancer_command() -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/lab/balancer.py"))
        .args(["--ftpgate-bin", env!("CARGO_BIN_EXE_ftpgate")]);
    cmd
}

/// Why the lab cannot run here, if it cannot.
fn missing_prerequisites() -> Option<String> {
    let out = match balancer_command().arg("--check").output() {
        Ok(out) => out,
        Err(err) => return Some(format!("cannot run python3: {err}")),
    };
    if out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Some(text.strip_prefix("balancer: ").unwrap_or(&text).to_string())
}

/// The numbers after `key ` in `line` (`per instance gw1 40, gw2 ...`).
fn number_after(line: &str, key: &str) -> usize {
    let rest = &line[line
        .find(key)
        .unwrap_or_else(|| panic!("no `{key}` in {line}"))
        + key.len()..];
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after `{key}` in {line}"))
}

fn line_with<'a>(stdout: &'a str, prefix: &str, contains: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.starts_with(prefix) && l.contains(contains))
        .unwrap_or_else(|| panic!("no line `{prefix}...{contains}...`"))
}

#[test]
fn lab_balancer_three_instances_behind_haproxy() {
    if let Some(reason) = missing_prerequisites() {
        assert!(
            std::env::var("FTPGATE_LAB").as_deref() != Ok("1"),
            "lab balancer: FTPGATE_LAB=1 but prerequisites are missing: {reason}"
        );
        println!("lab balancer: skipped ({reason})");
        return;
    }
    let out = balancer_command()
        .args(["--sessions", &SESSIONS.to_string()])
        .output()
        .expect("balancer.py runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let failed: Vec<&str> = stdout.lines().filter(|l| l.contains(": FAIL")).collect();
    assert!(failed.is_empty(), "phases failed: {failed:#?}");

    for variant in ["a", "b"] {
        for phase in ["mixed", "limit", "kill", "restart"] {
            let verdict = format!("balancer {variant} {phase}: ok");
            assert!(stdout.lines().any(|l| l == verdict), "missing `{verdict}`");
        }
        let p = format!("balancer {variant} ");

        // Every session passed, and each instance served some of them; the
        // instances' logs account for every session.
        let mixed = line_with(&stdout, &p, "per instance");
        assert_eq!(number_after(mixed, "mixed:"), SESSIONS, "{mixed}");
        assert!(mixed.contains(", 0 failed;"), "{mixed}");
        let per: Vec<usize> = ["gw1", "gw2", "gw3"]
            .iter()
            .map(|gw| number_after(mixed, gw))
            .collect();
        assert!(per.iter().all(|&n| n > 0), "an idle instance: {mixed}");
        assert_eq!(per.iter().sum::<usize>(), SESSIONS, "{mixed}");

        // One address over its limit is refused with 421, by name.
        let limit = line_with(&stdout, &format!("{p}limit:"), "replies");
        assert!(limit.contains("replies [220, 220, 421]"), "{limit}");
        let logged = line_with(&stdout, &format!("{p}limit:"), "logged:");
        assert!(
            logged.contains("too many sessions from 198.51.100."),
            "{logged}"
        );
        assert!(logged.contains("client=198.51.100."), "{logged}");

        // The kill: failures only among the killed instance's sessions, a
        // DOWN from HAProxy, and nothing failed afterwards.
        let killed = line_with(&stdout, &format!("{p}kill:"), "failed in all");
        assert!(killed.contains(", 0 of them elsewhere;"), "{killed}");
        assert!(killed.ends_with(" 0 failed"), "{killed}");
        assert!(number_after(killed, "elsewhere;") >= 1, "{killed}");
        let down = line_with(&stdout, &format!("{p}kill:"), "HAProxy logged:");
        assert!(down.contains("/gw2 is DOWN"), "{down}");

        // The restart: the old process drained, the new one served, no
        // session failed.
        let restart = line_with(&stdout, &format!("{p}restart:"), "replaced with");
        assert!(restart.ends_with("; 0 failed"), "{restart}");
        assert!(number_after(restart, "new process served") > 0, "{restart}");
        assert!(number_after(restart, "old process ended") > 0, "{restart}");
    }
    let summary = line_with(&stdout, "balancer: ", "phases ok");
    assert_eq!(summary, "balancer: 8 phases ok, 0 failed, 0 skipped");
    assert!(
        out.status.success(),
        "balancer.py exited with {}",
        out.status
    );
}
