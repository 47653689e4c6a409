//! Test network namespaces: each netns test gets a namespace of its own, with
//! its own nftables ruleset and conntrack table.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A network namespace for one test, deleted when dropped.
pub(crate) struct Netns {
    name: String,
}

impl Netns {
    /// A fresh namespace, or `None` (after saying why) when this host
    /// cannot make one. With `FTPGATE_LAB=1` that is a failure instead.
    pub(crate) fn new() -> Option<Netns> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ftpgate-t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let nft = std::process::Command::new("nft").arg("--version").output();
        if !nft.map(|o| o.status.success()).unwrap_or(false) {
            skip("nft is not installed");
            return None;
        }
        let added = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .output();
        match added {
            Ok(o) if o.status.success() => Some(Netns { name }),
            Ok(o) => {
                skip(&format!(
                    "cannot create a network namespace (not root?): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
                None
            }
            Err(e) => {
                skip(&format!("cannot run ip: {e}"));
                None
            }
        }
    }

    /// Command prefix that runs a program inside the namespace.
    pub(crate) fn prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// The namespace's name (`ip netns`).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file, for a thread to move into.
    pub(crate) fn path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/netns").join(&self.name)
    }

    /// Runs `PROGRAM ARGS` inside the namespace; (success, stdout+stderr).
    pub(crate) fn run(&self, program: &str, args: &[&str]) -> (bool, String) {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output();
        match out {
            Ok(o) => (
                o.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            ),
            Err(e) => (false, e.to_string()),
        }
    }

    /// Runs `nft ARGS` inside the namespace; (success, stdout+stderr).
    pub(crate) fn nft(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        use std::io::Write;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "nft"]).args(args);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let Ok(mut child) = cmd.spawn() else {
            return (false, "cannot spawn nft".into());
        };
        if let (Some(mut w), Some(text)) = (child.stdin.take(), stdin) {
            let _ = w.write_all(text.as_bytes());
        }
        match child.wait_with_output() {
            Ok(o) => (
                o.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            ),
            Err(e) => (false, e.to_string()),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `f` on a thread of its own inside the namespace at `path` (a
/// socket belongs to the namespace its maker was in).
pub(crate) fn within<T: Send + 'static>(
    path: std::path::PathBuf,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let ns = std::fs::File::open(&path).expect("the namespace");
        rustix::thread::move_into_link_name_space(
            ns.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns");
        f()
    })
}

pub(crate) fn skip(why: &str) {
    if std::env::var("FTPGATE_LAB").as_deref() == Ok("1") {
        panic!("FTPGATE_LAB=1 but {why}");
    }
    eprintln!("skipped: {why}");
}
