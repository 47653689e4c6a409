//! Several instances, one service, through the built binary: `ftpgate check
//! --peer` on good and broken sets of instance files, and `ftpgate balancer`,
//! whose output HAProxy and nft accept.
//!
//! In process, a named instance says its name in its startup line and in
//! each audit line.
//!
//! The HAProxy and nft checks need `haproxy`, and root and `unshare` and
//! `nft`. Without them those tests print `skipped (<reason>)` and pass,
//! unless `FTPGATE_LAB=1` is set, in which case they fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn example(name: &str) -> PathBuf {
    manifest().join("rules/instances").join(name)
}

fn ftpgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ftpgate"))
        .args(args)
        .current_dir(manifest())
        .output()
        .expect("run ftpgate")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `example` with each (from, to) replaced, written into `dir` as `name`.
fn variant(dir: &Path, example_name: &str, name: &str, edits: &[(&str, &str)]) -> String {
    let mut t = std::fs::read_to_string(example(example_name)).unwrap();
    for (from, to) in edits {
        assert!(t.contains(from), "{example_name} has no {from:?}");
        t = t.replace(from, to);
    }
    let path = dir.join(name);
    std::fs::write(&path, t).unwrap();
    path.to_string_lossy().into_owned()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| text(&o.stdout).trim() == "0")
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

const GOOD: [&str; 6] = [
    "-c",
    "rules/instances/gw1.yaml",
    "-c",
    "rules/instances/gw2.yaml",
    "-c",
    "rules/instances/gw3.yaml",
];

#[test]
fn check_with_peers_passes_the_example_set() {
    let out = ftpgate(&[
        "check",
        "-c",
        "rules/instances/gw1.yaml",
        "--peer",
        "rules/instances/gw2.yaml",
        "--peer",
        "rules/instances/gw3.yaml",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    // The first file's effective configuration, as without --peer.
    assert!(stdout.starts_with("instance: gw1\n"), "{stdout}");
    assert_eq!(
        stderr.trim(),
        "instances of one service: gw1 (rules/instances/gw1.yaml, client_ports 40000-40299), gw2 (rules/instances/gw2.yaml, client_ports 40300-40599), gw3 (rules/instances/gw3.yaml, client_ports 40600-40899)"
    );
    // Each file passes on its own, in any order.
    for f in ["gw1.yaml", "gw2.yaml", "gw3.yaml"] {
        let path = format!("rules/instances/{f}");
        let out = ftpgate(&["check", "-c", &path]);
        assert!(out.status.success(), "{f}: {}", text(&out.stderr));
    }
    let out = ftpgate(&[
        "check",
        "-c",
        "rules/instances/gw3.yaml",
        "--peer",
        "rules/instances/gw1.yaml",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn check_with_peers_refuses_overlap_duplicates_and_missing_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let overlapping = variant(
        d,
        "gw2.yaml",
        "gw2-wide.yaml",
        &[("client_ports: 40300-40599", "client_ports: 40200-40599")],
    );
    let twin = variant(
        d,
        "gw2.yaml",
        "twin.yaml",
        &[("instance: gw2", "instance: gw1")],
    );
    let unnamed = variant(d, "gw3.yaml", "unnamed.yaml", &[("instance: gw3\n", "")]);
    let cases = [
        (
            overlapping.clone(),
            format!(
                "rules/instances/gw1.yaml (instance `gw1`) and {overlapping} (instance `gw2`): client_ports 40000-40299 and 40200-40599 overlap (40200-40299), and both are reached at 203.0.113.10"
            ),
        ),
        (
            twin.clone(),
            format!("rules/instances/gw1.yaml and {twin}: both are instance `gw1`"),
        ),
        (
            unnamed.clone(),
            format!("{unnamed}: no `instance` name"),
        ),
    ];
    for (peer, want) in cases {
        let out = ftpgate(&["check", "-c", "rules/instances/gw1.yaml", "--peer", &peer]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{peer}: {stderr}");
        assert!(stderr.contains(&want), "{want:?} not in:\n{stderr}");
        // The balancer refuses the same set, and prints nothing.
        let out = ftpgate(&[
            "balancer",
            "--format",
            "haproxy",
            "-c",
            "rules/instances/gw1.yaml",
            "-c",
            &peer,
        ]);
        assert_eq!(out.status.code(), Some(2), "balancer with {peer}");
        assert!(text(&out.stderr).contains(&want));
        assert!(out.stdout.is_empty());
    }
    // A peer that is not a valid file at all: its error, located.
    let broken = variant(
        d,
        "gw2.yaml",
        "broken.yaml",
        &[("mode: reverse", "mode: sideways")],
    );
    let out = ftpgate(&["check", "-c", "rules/instances/gw1.yaml", "--peer", &broken]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains(&format!("{broken}:19:11: mode:")),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn balancer_prints_a_haproxy_config_that_haproxy_accepts() {
    let mut args = vec!["balancer", "--format", "haproxy"];
    args.extend(GOOD);
    let out = ftpgate(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cfg = text(&out.stdout);
    assert!(
        cfg.contains("    server gw2 10.0.1.2 send-proxy-v2\n"),
        "{cfg}"
    );
    // Without proxy_protocol the instances would take HAProxy for every client.
    let dir = tempfile::tempdir().unwrap();
    let bare = variant(
        dir.path(),
        "gw1.yaml",
        "bare.yaml",
        &[("    proxy_protocol:\n      from: [10.0.1.254]            # HAProxy sends a PROXY v2 header on every connection\n", "")],
    );
    let out = ftpgate(&["balancer", "--format", "haproxy", "-c", &bare]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("listener `public-ftp`: no `proxy_protocol`"));
    if !can_run(false, &["haproxy"]) {
        return;
    }
    let file = dir.path().join("haproxy.cfg");
    std::fs::write(&file, &cfg).unwrap();
    let check = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "haproxy -c:\n{}\n{cfg}",
        text(&check.stderr)
    );
    // The check is real: a misspelt keyword fails it.
    std::fs::write(&file, cfg.replace("balance source", "balance sauce")).unwrap();
    let check = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!check.status.success(), "haproxy -c took `balance sauce`");
}

/// The example set with an IPv6 listener beside the IPv4 one in each file:
/// each instance then has a data slice on each VIP, and HAProxy accepts
/// the result (it refuses two proxies with one name). A slice over the
/// control port is refused, naming both.
#[test]
fn balancer_dual_stack_config_passes_haproxy_check_and_a_slice_over_control_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let anchor = "\ndata:\n";
    let mut files = Vec::new();
    for n in 1..=3 {
        let v6 = format!(
            "  - name: public-ftp6\n    listen: \"[2001:db8:1::{n}]:21\"\n    mode: reverse\n    upstream: 10.0.0.3:21\n    announce: \"2001:db8::10\"\n    proxy_protocol:\n      from: [\"2001:db8:1::fe\"]\n{anchor}"
        );
        let name = format!("gw{n}.yaml");
        files.push(variant(dir.path(), &name, &name, &[(anchor, &v6)]));
    }
    let mut args = vec!["balancer", "--format", "haproxy"];
    for f in &files {
        args.extend(["-c", f.as_str()]);
    }
    let out = ftpgate(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cfg = text(&out.stdout);
    for l in [
        "frontend ftp-data-gw1-v4\n",
        "frontend ftp-data-gw1-v6\n",
        "    bind [2001:db8::10]:40300-40599\n",
        "    server gw2 [2001:db8:1::2] send-proxy-v2\n",
    ] {
        assert!(cfg.contains(l), "no {l:?} in:\n{cfg}");
    }

    let over = variant(
        dir.path(),
        "gw1.yaml",
        "over.yaml",
        &[("listen: 10.0.1.1:21 ", "listen: 10.0.1.1:40021 ")],
    );
    let out = ftpgate(&["balancer", "--format", "haproxy", "-c", &over]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains(
            "instance `gw1`: client_ports 40000-40299 on 203.0.113.10 contain the control port 40021 of listener `public-ftp`"
        ),
        "{}",
        text(&out.stderr)
    );

    if !can_run(false, &["haproxy"]) {
        return;
    }
    let file = dir.path().join("haproxy.cfg");
    std::fs::write(&file, &cfg).unwrap();
    let check = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "haproxy -c:\n{}\n{cfg}",
        text(&check.stderr)
    );
}

#[test]
fn balancer_prints_an_nftables_table_that_nft_accepts() {
    let mut args = vec!["balancer", "--format", "nftables"];
    args.extend(GOOD);
    let out = ftpgate(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let nft = text(&out.stdout);
    assert!(
        nft.contains(
            "dnat ip to jhash ip saddr mod 3 map { 0 : 10.0.1.1, 1 : 10.0.1.2, 2 : 10.0.1.3 }"
        ),
        "{nft}"
    );
    if !can_run(true, &["unshare", "nft"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("balancer.nft");
    // In a new network namespace, so the host's ruleset is never touched.
    let nft_check = |text: &str| {
        std::fs::write(&file, text).unwrap();
        Command::new("unshare")
            .args(["-n", "nft", "-c", "-f"])
            .arg(&file)
            .output()
            .unwrap()
    };
    let out = nft_check(&nft);
    assert!(
        out.status.success(),
        "nft -c:\n{}\n{nft}",
        text(&out.stderr)
    );
    let out = nft_check(&nft.replace("jhash ip saddr", "jhash ip sadr"));
    assert!(!out.status.success(), "nft -c took a misspelt key");
}

#[tokio::test(flavor = "current_thread")]
async fn a_named_instance_says_so_at_startup_and_in_the_audit_log() {
    use suppaftp::tokio::AsyncFtpStream;
    use suppaftp::types::FileType;
    use suppaftp::Mode;

    let (logs, _guard) = common::LogBuf::capture();
    let root = tempfile::tempdir().unwrap();
    let body: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(root.path().join("f.bin"), &body).unwrap();
    let upstream = common::start_unftp(root.path()).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let yaml = format!(
        "instance: gw7\nlisteners:\n  - name: test\n    listen: 127.0.0.1:0\n    mode: reverse\n    upstream: {upstream}\n\
         data:\n  client_ports: 20000-29999\n  server_ports: 30000-39999\n\
         audit:\n  path: {}\nrules:\n  - name: loopback\n    clients: [127.0.0.0/8]\n",
        audit.display()
    );
    let run = common::launch(&yaml, "gw7.yaml").await;
    let line = logs.wait_for("listening").await;
    let line = line.lines().find(|l| l.contains("listening")).unwrap();
    assert!(line.contains("instance=\"gw7\" listener=test"), "{line}");

    let mut ftp = AsyncFtpStream::connect(run.addr).await.unwrap();
    ftp.set_mode(Mode::ExtendedPassive);
    ftp.login("anonymous", "test@").await.unwrap();
    ftp.transfer_type(FileType::Binary).await.unwrap();
    let got = common::retr_all(&mut ftp, "f.bin").await.unwrap();
    assert_eq!(common::digest(&got), common::digest(&body));
    let _ = ftp.quit().await;

    // The audit line is written right after the log line, with no await between.
    logs.wait_for("command=RETR").await;
    let text = std::fs::read_to_string(&audit).unwrap();
    let record: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(record["instance"], "gw7", "{text}");
    assert_eq!(record["command"], "RETR");
    assert_eq!(record["to_client"], body.len() as u64);
}
