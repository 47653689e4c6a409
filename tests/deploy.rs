//! The files in deploy/: every nftables example passes `nft -c -f` (inside a
//! throwaway network namespace, so the host's ruleset is never touched),
//! and the systemd unit passes `systemd-analyze verify`.
//!
//! They need root, `ip`, `nft` and `systemd-analyze`. Without them each test
//! prints `skipped (<reason>)` and passes, unless `FTPGATE_LAB=1` is set, in
//! which case missing prerequisites fail the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// True when the test can run; otherwise reports the skip, or fails under
/// FTPGATE_LAB=1 where a silent skip would hide a broken CI machine.
fn can_run(needs_root: bool, tools: &[&str]) -> bool {
    let why = if needs_root && !is_root() {
        Some("not running as root".to_string())
    } else {
        tools
            .iter()
            .find(|t| !have(t))
            .map(|t| format!("{t} not found"))
    };
    match why {
        None => true,
        Some(why) if std::env::var("FTPGATE_LAB").as_deref() == Ok("1") => {
            panic!("FTPGATE_LAB=1 but {why}")
        }
        Some(why) => {
            eprintln!("skipped ({why})");
            false
        }
    }
}

/// A network namespace that is deleted when dropped, even on failure.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("ftpgate-deploy-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "ip netns add {name}");
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn nftables_examples_pass_nft_check() {
    if !can_run(true, &["ip", "nft"]) {
        return;
    }
    let ns = Netns::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy().join("nftables"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "nft"))
        .collect();
    files.sort();
    let names: Vec<_> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        ["edge-transparent.nft", "published-reverse.nft"],
        "both deployments have an example"
    );
    for file in &files {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.0, "nft", "-c", "-f"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nft -c -f {}:\n{}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The check is real: a broken copy of a file fails it.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.nft");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    std::fs::write(&broken, text.replace("policy drop;", "policy dorp;")).unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft", "-c", "-f"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a misspelt policy must fail nft -c");
}

/// `systemd-analyze verify` needs the unit's ExecStart binary to exist, so
/// the unit is checked with its paths pointed at this build.
fn verify_unit(unit_text: &str, dir: &Path, dropin: Option<&str>) -> std::process::Output {
    let bin = env!("CARGO_BIN_EXE_ftpgate");
    let unit = dir.join("ftpgate.service");
    std::fs::write(&unit, unit_text.replace("/usr/local/bin/ftpgate", bin)).unwrap();
    if let Some(d) = dropin {
        let dd = dir.join("ftpgate.service.d");
        std::fs::create_dir_all(&dd).unwrap();
        std::fs::write(dd.join("transparent.conf"), d).unwrap();
    }
    Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .output()
        .unwrap()
}

#[test]
fn systemd_unit_verifies() {
    if !can_run(false, &["systemd-analyze"]) {
        return;
    }
    let text = std::fs::read_to_string(deploy().join("systemd/ftpgate.service")).unwrap();
    for line in [
        "Type=notify",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE\n",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(text.contains(line), "unit lacks {line:?}");
    }
    let dropin =
        std::fs::read_to_string(deploy().join("systemd/ftpgate.service.d/transparent.conf"))
            .unwrap();
    assert!(dropin.contains("CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_ADMIN\n"));
    for d in [None, Some(dropin.as_str())] {
        let dir = tempfile::tempdir().unwrap();
        let out = verify_unit(&text, dir.path(), d);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            // Unknown keys are only warnings, naming the file they are in.
            out.status.success() && !stderr.contains(&*dir.path().to_string_lossy()),
            "systemd-analyze verify (drop-in: {}):\n{stderr}",
            d.is_some()
        );
    }
}
