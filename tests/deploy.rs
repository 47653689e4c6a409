//! The files in deploy/: every nftables example passes `nft -c -f` (inside a
//! throwaway network namespace, so the host's ruleset is never touched),
//! the systemd unit passes `systemd-analyze verify`, the HAProxy recipe is
//! what `ftpgate balancer` prints for rules/instances/ and passes
//! `haproxy -c`, the keepalived pair passes `keepalived -t`, and the
//! Kubernetes manifest runs each instance file on its node's own network.
//!
//! They need root, `ip`, `nft`, `unshare`, `systemd-analyze`, `haproxy` and
//! `keepalived`. Without them each test prints `skipped (<reason>)` and
//! passes, unless `FTPGATE_LAB=1` is set, in which case missing
//! prerequisites fail the test.

use ftpgate::config::{Config, ListenerMode};
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

/// The example instances, loaded.
fn instances() -> Vec<Config> {
    ["gw1.yaml", "gw2.yaml", "gw3.yaml"]
        .iter()
        .map(|f| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("rules/instances")
                .join(f);
            Config::load(&path).unwrap_or_else(|e| panic!("{f}:\n{e}"))
        })
        .collect()
}

#[test]
fn haproxy_recipe_is_generated_from_the_instances_and_passes_haproxy_check() {
    let checked_in = std::fs::read_to_string(deploy().join("haproxy/haproxy.cfg")).unwrap();
    // Relative paths from the crate root, as in the file's header.
    let out = Command::new(env!("CARGO_BIN_EXE_ftpgate"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["balancer", "--format", "haproxy"])
        .args(["-c", "rules/instances/gw1.yaml"])
        .args(["-c", "rules/instances/gw2.yaml"])
        .args(["-c", "rules/instances/gw3.yaml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout) == checked_in,
        "deploy/haproxy/haproxy.cfg differs from `ftpgate balancer --format haproxy` of rules/instances; regenerate it (the command is in its header)"
    );
    // What the instances expect of their balancer is in the file.
    for c in instances() {
        let l = &c.listeners[0];
        let name = c.instance.as_deref().unwrap();
        assert!(checked_in.contains(&format!("    server {name} {}\n", l.listen)));
        let from = &l.proxy_protocol.as_ref().expect("proxy_protocol").from;
        assert_eq!(from.len(), 1, "one balancer address");
    }
    if !can_run(false, &["haproxy"]) {
        return;
    }
    let check = |path: &Path| {
        Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(path)
            .output()
            .unwrap()
    };
    let out = check(&deploy().join("haproxy/haproxy.cfg"));
    assert!(
        out.status.success(),
        "haproxy -c:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.cfg");
    std::fs::write(&broken, checked_in.replace("mode tcp", "mode tcpp")).unwrap();
    assert!(
        !check(&broken).status.success(),
        "haproxy -c took `mode tcpp`"
    );
}

/// `keepalived -t` on `file` in a new network namespace that has the
/// `eth0` the file names: (passed, what it printed). keepalived 2.2.7 ends a
/// good check by sending itself SIGTERM (status 143), and a bad one with
/// exit status 4 or 5; keywords it does not know inside a block are only
/// printed, so a clean check also prints nothing.
fn keepalived_test(file: &Path) -> (bool, String) {
    use std::os::unix::process::ExitStatusExt;
    let out = Command::new("unshare")
        .args([
            "-n",
            "sh",
            "-c",
            "ip link add eth0 type veth peer name eth1 && exec keepalived -t -f \"$0\"",
        ])
        .arg(file)
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ended_well =
        out.status.success() || out.status.code() == Some(143) || out.status.signal() == Some(15);
    (ended_well && printed.trim().is_empty(), printed)
}

#[test]
fn keepalived_pair_passes_keepalived_test() {
    let path = deploy().join("keepalived/keepalived.conf");
    let text = std::fs::read_to_string(&path).unwrap();
    // The VIP is the address the example instances announce.
    let vip = match instances()[0].listeners[0].mode {
        ListenerMode::Reverse {
            announce: Some(a), ..
        } => a,
        _ => panic!("gw1 announces no VIP"),
    };
    for needle in [
        format!("{vip}/24 dev eth0"),
        "state MASTER".to_string(),
        "track_script {\n        ftpgate_alive\n    }".to_string(),
        "http://127.0.0.1:9121/metrics".to_string(),
        "script_user nobody".to_string(),
    ] {
        assert!(text.contains(&needle), "keepalived.conf lacks {needle:?}");
    }
    if !can_run(true, &["unshare", "ip", "keepalived"]) {
        return;
    }
    let (ok, printed) = keepalived_test(&path);
    assert!(ok, "keepalived -t:\n{printed}");
    // The check is real: a misspelt keyword in a block, or an interface
    // that does not exist, fails it.
    let dir = tempfile::tempdir().unwrap();
    for (from, to) in [("interval 2", "intervall 2"), ("dev eth0", "dev eth9")] {
        let broken = dir.path().join("broken.conf");
        std::fs::write(&broken, text.replace(from, to)).unwrap();
        let (ok, printed) = keepalived_test(&broken);
        assert!(!ok, "keepalived -t took {to:?}: {printed}");
    }
}

#[test]
fn kubernetes_manifest_runs_each_instance_on_its_node() {
    use serde_yaml::Value;
    let text = std::fs::read_to_string(deploy().join("kubernetes/ftpgate.yaml")).unwrap();
    // The reason for host networking is written down at the top.
    let head: String = text.lines().take_while(|l| l.starts_with('#')).collect();
    assert!(head.contains("kubernetes/kubernetes#23864") && head.contains("port"));
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let (cm, ds) = (kind("ConfigMap"), kind("DaemonSet"));
    assert_eq!(ds["metadata"]["namespace"], cm["metadata"]["namespace"]);
    // The ConfigMap holds the example instance files, unchanged.
    let data = cm["data"].as_mapping().unwrap();
    assert_eq!(data.len(), 3);
    let set = instances();
    for c in &set {
        let key = c.path.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            data[key].as_str(),
            Some(std::fs::read_to_string(&c.path).unwrap().as_str()),
            "the ConfigMap's {key} differs from rules/instances/{key}"
        );
    }
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    let ctr = &pod["containers"][0];
    let args: Vec<&str> = ctr["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    // Each node reads its own file, from the mounted ConfigMap.
    let config = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    assert_eq!(config, "/etc/ftpgate/$(NODE_NAME).yaml");
    assert_eq!(ctr["env"][0]["name"], "NODE_NAME");
    assert_eq!(
        ctr["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let mount = &ctr["volumeMounts"][0];
    assert_eq!(mount["mountPath"], "/etc/ftpgate");
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["configMap"]["name"], cm["metadata"]["name"]);
    // Sessions drain before the kubelet kills.
    let grace: u64 = args[args.iter().position(|a| *a == "--grace").unwrap() + 1]
        .parse()
        .unwrap();
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > grace);
    // Ports and probes match the files: the control port, and the metrics
    // endpoint for the probes.
    let port = |name: &str| {
        ctr["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no port {name}"))
    };
    for c in &set {
        assert_eq!(port("ftp"), u64::from(c.listeners[0].listen.port()));
        let metrics = c.metrics.as_ref().expect("metrics").listen.port();
        assert_eq!(port("metrics"), u64::from(metrics));
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(
                ctr[probe]["httpGet"]["port"].as_u64(),
                Some(u64::from(metrics))
            );
            assert_eq!(ctr[probe]["httpGet"]["path"], "/metrics");
        }
        // Behind the balancer: every listener takes its PROXY header.
        assert!(c.listeners.iter().all(|l| l.proxy_protocol.is_some()));
    }
    ftpgate::balancer::check_set(&set).expect("the instances form one service");
    let sc = &ctr["securityContext"];
    assert_eq!(sc["capabilities"]["add"][0], "NET_BIND_SERVICE");
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    assert_eq!(sc["allowPrivilegeEscalation"], false);
}
