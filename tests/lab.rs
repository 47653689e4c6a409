//! The network-namespace lab (tests/lab): real FTP servers and clients behind a real
//! nftables edge, with ftpgate in the edge. `lab.py` runs the client/server matrix,
//! `pinholes.py` checks that a kernel-backend pinhole admits its one connection and
//! drops every other, `reuse.py` that it finds its connection when the tuple is reused.
//!
//! It needs root, `ip`, `nft` and the lab packages (`.ci/install-lab-deps`). Without
//! them each test prints `lab: skipped (<reason>)` and passes, unless `FTPGATE_LAB=1`
//! is set, in which case missing prerequisites fail the test.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// The lab's cases have per-client time limits; two labs at once on a
/// two-core machine can starve each other past them, so the tests in this
/// file take turns.
static ONE_LAB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lab_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/lab/lab.py")
}

fn ftpgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ftpgate")
}

fn lab_command() -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(lab_script()).env("FTPGATE_BIN", ftpgate_bin());
    cmd
}

/// Why the lab cannot run here with `extra` options (e.g. `--ftps`), if it cannot.
fn missing_prerequisites_for(extra: &[&str]) -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not running as root".into());
    }
    for tool in ["ip", "nft", "python3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            return Some(format!("{tool} not found"));
        }
    }
    let check = match lab_command()
        .args(["--check", "--targets", "ftpgate"])
        .args(extra)
        .output()
    {
        Ok(out) => out,
        Err(err) => return Some(format!("cannot run lab.py: {err}")),
    };
    if check.status.success() {
        None
    } else {
        let text = String::from_utf8_lossy(&check.stdout).trim().to_string();
        let text = text.strip_prefix("lab: ").unwrap_or(&text).to_string();
        Some(text + &String::from_utf8_lossy(&check.stderr))
    }
}

/// Returns true when the lab can run; otherwise reports the skip (or fails under
/// FTPGATE_LAB=1, where a silent skip would hide a broken CI machine).
fn lab_available() -> bool {
    lab_available_for(&[])
}

/// `lab_available` for a run with `extra` options.
fn lab_available_for(extra: &[&str]) -> bool {
    match missing_prerequisites_for(extra) {
        None => true,
        Some(reason) => {
            assert!(
                std::env::var("FTPGATE_LAB").as_deref() != Ok("1"),
                "lab: FTPGATE_LAB=1 but prerequisites are missing: {reason}"
            );
            println!("lab: skipped ({reason})");
            false
        }
    }
}

fn print_output(out: &Output) {
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
}

/// The run's namespace prefix, from the line `lab: namespaces PREFIX*, ...`.
fn prefix_of(line: &str) -> Option<String> {
    let rest = line.strip_prefix("lab: namespaces ")?;
    Some(rest.split('*').next()?.to_string())
}

fn namespaces_with(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Runs the ftpgate target's matrix with `args`, checks that every case passed,
/// and returns lab.py's output.
fn ftpgate_matrix(args: &[&str]) -> String {
    let out = lab_command()
        .args(["--targets", "ftpgate"])
        .args(args)
        .output()
        .expect("lab.py runs");
    print_output(&out);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("ftpgate: "))
        .unwrap_or_else(|| panic!("no ftpgate summary line"));
    assert!(out.status.success(), "lab failed: {summary}");
    assert!(summary.ends_with(" 0 failed"), "{summary}");
    assert!(!summary.starts_with("ftpgate: 0 passed"), "{summary}");
    stdout
}

#[test]
fn lab_ftpgate_passes_every_case() {
    let _turn = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !lab_available() {
        return;
    }
    ftpgate_matrix(&[]);
}

/// The kernel backend under the operator's firewall as it is (forward: only
/// established/related, the DNAT'd control ports and LAN to WAN), with exactly
/// the rules `ftpgate nft --into` prints: its data connections pass as RELATED.
#[test]
fn lab_kernel_backend_passes_every_case_with_only_the_printed_rules() {
    let _turn = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !lab_available() {
        return;
    }
    let stdout = ftpgate_matrix(&["--backend", "nftables"]);
    assert!(
        stdout.contains(
            "lab: ftpgate: the edge has the 9 rules `ftpgate nft --into` printed, nothing else\n"
        ),
        "the edge did not load the printed rules"
    );
}

/// The FTPS cases (`lab.py --ftps`): every server in TLS mode behind the edge's
/// NAT (vsftpd with session reuse required, explicit and implicit; ProFTPD
/// mod_tls, reuse required; pure-ftpd; pyftpdlib), every FTPS client (curl
/// explicit and implicit, lftp, ftplib with PROT P), passive and active, over
/// IPv4 and IPv6, each listing, downloading and uploading with digests compared
/// through the gateway terminating TLS on both legs.
#[test]
fn lab_ftps_ftpgate_passes_every_case() {
    let _turn = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !lab_available_for(&["--ftps"]) {
        return;
    }
    let out = lab_command()
        .args(["--ftps", "--targets", "ftpgate"])
        .output()
        .expect("lab.py runs");
    print_output(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("ftpgate: "))
        .unwrap_or_else(|| panic!("no ftpgate summary line"));
    assert!(out.status.success(), "lab --ftps failed: {summary}");
    // The matrix: tests/lab/README.md, "FTPS".
    assert_eq!(summary, "ftpgate: 47 passed, 0 failed");
    let passed = |what: &str| {
        stdout
            .lines()
            .filter(|l| l.contains(what) && l.ends_with(": ok"))
            .count()
    };
    for server in [
        "vsftpd",
        "proftpd",
        "pure-ftpd",
        "pyftpdlib",
        "vsftpd-implicit",
    ] {
        assert!(
            passed(&format!(" {server} ")) > 0,
            "no {server} case passed"
        );
    }
    assert_eq!(passed(" v6: ok"), 20, "IPv6 FTPS cases passed");
    assert_eq!(passed("-tls-active "), 16, "active-mode FTPS cases passed");
}

/// Runs pinholes.py for the nftables backend with `args`, and `env` set for the
/// gateway; checks that every check passed and that `cases` cases ran, and returns
/// its output.
fn pinholes(args: &[&str], cases: usize) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/lab/pinholes.py");
    let out = Command::new("python3")
        .arg(script)
        .args(["--backend", "nftables", "--ftpgate-bin", ftpgate_bin()])
        .args(args)
        .output()
        .expect("pinholes.py runs");
    print_output(&out);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("pinholes: "))
        .unwrap_or_else(|| panic!("no pinholes summary line"));
    assert!(out.status.success(), "pinholes failed: {summary}");
    assert!(summary.ends_with(" 0 failed"), "{summary}");
    let count = |suffix: &str| stdout.lines().filter(|l| l.ends_with(suffix)).count();
    for check in ["intruder", "second", "expired"] {
        let dropped = count(&format!(" {check}: dropped"));
        assert_eq!(
            dropped, cases,
            "{check}: dropped in {dropped} of {cases} cases"
        );
    }
    // The audit's byte counts come from the kernel's counters.
    let counted = count(" bytes: counted");
    assert_eq!(
        counted, cases,
        "transfers counted right: {counted} of {cases}"
    );
    let empty = count("empty: no elements");
    assert_eq!(empty, 2 * cases, "sessions that left no element: {empty}");
    stdout
}

/// Every lab run makes namespaces of its own (`fgl<pid>x<random>-`), and with them
/// its own nftables table and ports; this test takes its turn all the same, for
/// the CPU: its drop checks wait for a connect timeout that a starved machine
/// could mistake.
#[test]
fn lab_kernel_pinholes_drop_all_but_the_expected_connection() {
    let _turn = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !lab_available() {
        return;
    }
    // 2 scenarios x 2 families x 2 modes, each with the same checks.
    let stdout = pinholes(&[], 8);
    assert!(
        stdout.contains("pinholes nftables conntrack: netlink\n"),
        "the gateway did not follow conntrack events"
    );
}

/// A server that sends active-mode data from port 20 (vsftpd's Debian default):
/// every data connection to one gateway port has the same tuple. reuse.py wraps a
/// two-port `server_ports` pool and restarts the gateway between runs (4 runs of 3
/// transfers), and needs every 226 well before `pinhole_timeout`.
#[test]
fn lab_kernel_reused_tuples_keep_every_transfer_on_time() {
    let _turn = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !lab_available() {
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/lab/reuse.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--ftpgate-bin", ftpgate_bin()])
        .output()
        .expect("reuse.py runs");
    print_output(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("reuse conntrack: netlink\n"),
        "the gateway did not follow conntrack events"
    );
    assert!(
        stdout.contains("reuse: 12 of 12 on time\n"),
        "not every transfer was on time"
    );
    assert!(
        stdout.contains("reuse: 'data connection never made' logged 0 times"),
        "the gateway missed a data connection"
    );
    assert!(out.status.success(), "reuse.py failed");
}

#[test]
fn lab_teardown_leaves_no_namespaces() {
    let _turn = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !lab_available() {
        return;
    }
    // A complete run: its namespaces are gone afterwards.
    let out = lab_command()
        .args([
            "--targets",
            "none",
            "--servers",
            "pyftpdlib",
            "--clients",
            "curl-epsv",
        ])
        .output()
        .expect("lab.py runs");
    print_output(&out);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("none outbound pyftpdlib curl-epsv v4: ok"));
    let prefix = stdout
        .lines()
        .find_map(prefix_of)
        .expect("lab prints its namespace prefix");
    assert_eq!(namespaces_with(&prefix), Vec::<String>::new());

    // A run killed with SIGTERM mid-way: its handler tears everything down.
    let mut child = lab_command()
        .args(["--targets", "none,kernel", "--servers", "vsftpd,pyftpdlib"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("lab.py starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let prefix = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| prefix_of(&l))
        .expect("lab prints its namespace prefix");
    // Wait for the first case, so the kill lands with servers and clients running.
    let first_case = lines.by_ref().map_while(Result::ok).next();
    assert!(first_case.is_some(), "lab printed no case before the kill");
    assert_eq!(
        namespaces_with(&prefix).len(),
        5,
        "namespaces exist mid-run"
    );
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = child.wait().expect("lab.py exits");
    assert!(!status.success(), "a killed run reports failure");
    assert_eq!(namespaces_with(&prefix), Vec::<String>::new());

    // --cleanup removes namespaces left by a run that died without tearing down
    // (its pid in the prefix is beyond pid_max, so it cannot be alive).
    let stale = "fgl99999999x0badc0-edge";
    let added = Command::new("ip")
        .args(["netns", "add", stale])
        .status()
        .expect("ip runs");
    assert!(added.success());
    let out = lab_command()
        .arg("--cleanup")
        .output()
        .expect("lab.py runs");
    print_output(&out);
    assert!(out.status.success());
    assert_eq!(namespaces_with(stale), Vec::<String>::new());
}
