//! The gateway's own nftables table: its lifecycle (created at start with
//! `nft -f -`, replacing a stale one; deleted at a clean exit) and the
//! element changes made while it runs.
//!
//! The table is `table.nft`. In transparent mode the client believes it
//! talks to the server, so its data connections must look that way too:
//! `pasv4`/`pasv6` redirect a passive data connection the client aims at
//! (server, port) to the gateway's pinhole on that port; `actv4`/`actv6`
//! give the gateway's active data connection the server's address as its
//! source. The kernel backend's sets and maps carry its pinholes (see
//! [`Element`]). Every element has a timeout, so that the kernel expires it
//! even if the gateway dies.
//!
//! Element changes are nf_tables netlink batches (`nftnl`), each one kernel
//! transaction. A gateway that cannot open the netlink socket does not
//! start: nft itself needs that socket.

use super::element::Element;
use super::nftnl::{Netlink, Op};
use std::io;
#[cfg(test)]
use std::path::Path;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// The table, `${table}` standing for its name; the lines before it are
/// the template's own comment.
const TABLE: &str = include_str!("table.nft");

/// The gateway's own nftables table (family `inet`). Created at start,
/// removed by [`InterceptTable::destroy`] at a clean exit. One gateway owns
/// a table name per network namespace while it runs (see `claim_name`).
///
/// Element changes are nf_tables netlink batches the gateway writes itself
/// (see `nftnl`): each change (all the elements of a pinhole, say) is one
/// transaction, applied whole or not at all. Changes that queue up while
/// one runs share the next transaction (see `spawn_applier`).
#[derive(Debug)]
pub struct InterceptTable {
    name: String,
    /// Held for the table's life: see [`claim_name`].
    _owner: std::fs::File,
    /// Runs before `nft` (e.g. `ip netns exec NS`); empty outside tests.
    prefix: Vec<String>,
    /// The task that applies element changes.
    changes: tokio::sync::mpsc::UnboundedSender<Change>,
}

/// One change (a transaction), and where its result goes.
struct Change {
    ops: Vec<Op>,
    done: tokio::sync::oneshot::Sender<io::Result<()>>,
}

impl InterceptTable {
    /// Creates the table `name`, replacing a stale one left by an earlier
    /// run. Fails if the netfilter netlink socket cannot be opened.
    /// `mark` is `data.conntrack_mark` (see `table.nft`).
    pub(crate) async fn create(name: &str, mark: u32) -> io::Result<Self> {
        Self::open(name, mark, Vec::new(), None).await
    }

    /// Like [`InterceptTable::create`], in the network namespace that
    /// `prefix` (`["ip", "netns", "exec", NAME]`) runs `nft` in.
    #[cfg(test)]
    pub(crate) async fn create_with_prefix(name: &str, prefix: Vec<String>) -> io::Result<Self> {
        let netns = netns_of(&prefix).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no network namespace in the prefix {prefix:?}"),
            )
        })?;
        Self::open(name, DEFAULT_MARK, prefix, netns).await
    }

    /// Creates the table, running `nft` through `prefix`, with element
    /// changes on a netlink socket in `netns`.
    async fn open(
        name: &str,
        mark: u32,
        prefix: Vec<String>,
        netns: Option<PathBuf>,
    ) -> io::Result<Self> {
        check_name(name)?;
        // Before anything touches the table: another live gateway's table
        // must not be replaced under its sessions.
        let owner = claim_name(name, netns.clone())?;
        let netlink = Netlink::open(netns)
            .map_err(|e| io::Error::new(e.kind(), format!("nftables netlink socket: {e}")))?;
        let table = InterceptTable {
            name: name.to_owned(),
            _owner: owner,
            prefix,
            changes: spawn_applier(name.to_owned(), netlink),
        };
        // `add` then `delete` makes the deletion succeed whether or not a
        // stale table exists; the batch is one transaction, so there is no
        // moment without the table's rules once it exists.
        let script = format!(
            "add table inet {name}\ndelete table inet {name}\n{}",
            table_script_for(name, mark)
        );
        table.run(&script).await?;
        Ok(table)
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds `elements` in one transaction, each expiring after its timeout.
    pub async fn add(&self, elements: &[(Element, Duration)]) -> io::Result<()> {
        let ops = elements.iter().map(|(e, t)| Op::Add(*e, *t)).collect();
        self.batch(ops).await
    }

    /// Removes `elements` in one transaction. Fails if one is already gone
    /// (expired), in which case none is removed by this call.
    pub async fn remove(&self, elements: &[Element]) -> io::Result<()> {
        let ops = elements.iter().map(|e| Op::Delete(*e)).collect();
        self.batch(ops).await
    }

    /// Sets `element`'s timeout to `timeout` from now, adding it if it is
    /// gone. `add` of an existing element keeps its old timeout, hence the
    /// add-delete-add, which is one transaction and cannot fail on a missing
    /// element.
    pub(crate) async fn refresh(&self, element: Element, timeout: Duration) -> io::Result<()> {
        let ops = vec![
            Op::Add(element, timeout),
            Op::Delete(element),
            Op::Add(element, timeout),
        ];
        self.batch(ops).await
    }

    /// In one transaction: removes `gone` (whether or not there), and sets
    /// each of `fresh` with its timeout from now, whether or not it was
    /// there (`add` alone would keep an old element's timeout).
    pub(crate) async fn renew(
        &self,
        gone: &[Element],
        fresh: &[(Element, Duration)],
    ) -> io::Result<()> {
        let mut ops = Vec::new();
        for e in gone {
            ops.extend([Op::Add(*e, Duration::from_millis(1)), Op::Delete(*e)]);
        }
        for (e, t) in fresh {
            ops.extend([
                Op::Add(*e, Duration::from_millis(1)),
                Op::Delete(*e),
                Op::Add(*e, *t),
            ]);
        }
        self.batch(ops).await
    }

    /// Removes `elements`, whether or not some are already gone (expired,
    /// or deleted by the packet path), in one transaction: each is added
    /// (a no-op if present) and then deleted, so no delete can fail on a
    /// missing element. Errors are logged, not returned: the kernel's
    /// timeouts are the backstop.
    pub(crate) async fn remove_each(&self, elements: &[Element]) {
        let mut ops = Vec::new();
        for e in elements {
            // The transaction is atomic: no packet ever sees the re-added
            // element.
            match e.set() {
                Ok(_) => ops.extend([Op::Add(*e, Duration::from_millis(1)), Op::Delete(*e)]),
                Err(err) => {
                    tracing::debug!(table = %self.name, element = ?e, "nft element not removed: {err}");
                }
            }
        }
        if let Err(err) = self.batch(ops).await {
            tracing::warn!(table = %self.name, "nft elements not removed: {err}");
        }
    }

    /// Deletes the table and everything in it.
    pub(crate) async fn destroy(&self) -> io::Result<()> {
        self.run(&format!("delete table inet {}\n", self.name))
            .await
    }

    /// Runs `ops` as one transaction on the applier task. An element that
    /// fits no set fails the call before anything is sent.
    async fn batch(&self, ops: Vec<Op>) -> io::Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        for op in &ops {
            op.check()?;
        }
        let start = std::time::Instant::now();
        let (done, result) = tokio::sync::oneshot::channel();
        if self.changes.send(Change { ops, done }).is_err() {
            return Err(io::Error::other("nft change task is gone"));
        }
        let result = result
            .await
            .unwrap_or_else(|_| Err(io::Error::other("nft change task is gone")));
        tracing::debug!(
            table = %self.name,
            us = start.elapsed().as_micros() as u64,
            ok = result.is_ok(),
            "nft change done"
        );
        result
    }

    /// Runs `nft -f -` with `script` on stdin: for multi-line scripts (the
    /// table itself).
    async fn run(&self, script: &str) -> io::Result<()> {
        let mut cmd = nft_command(&self.prefix);
        let mut child = cmd
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run nft: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).await?;
            // Dropping stdin closes it, so nft sees the end of the script.
        }
        let out = child.wait_with_output().await?;
        if out.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            Err(io::Error::other(format!(
                "nft failed ({}): {}",
                out.status,
                stderr.trim()
            )))
        }
    }
}

/// `nft`, run through `prefix` when there is one.
fn nft_command(prefix: &[String]) -> Command {
    match prefix.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg("nft");
            c
        }
        None => Command::new("nft"),
    }
}

/// Where table locks live when the service manager gives no runtime
/// directory (systemd's `RuntimeDirectory=ftpgate` sets
/// `RUNTIME_DIRECTORY`): under /run, which only root can write to.
const LOCK_DIR: &str = "/run/ftpgate";

/// Makes this process the owner of the table `name` in its network
/// namespace (or `netns`), for as long as the returned file stays open.
///
/// Creating the table replaces any table of that name, and a clean exit
/// deletes it: a second gateway with the same table would delete the
/// first one's pinholes at start, and the first would delete the
/// second's table at exit. The owner holds an exclusive `flock` on
/// `DIR/nft-<netns inode>-NAME.lock`, DIR being the runtime directory: the
/// namespace's inode scopes the lock as nftables tables are scoped; the
/// kernel drops the lock when the process dies, so a table left by a crash
/// is still replaced; and the directory (0700, owned by the gateway's
/// user or root) keeps other users from taking the lock first. Fails with
/// `AddrInUse` and a message naming the file while another owner lives.
fn claim_name(name: &str, netns: Option<PathBuf>) -> io::Result<std::fs::File> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
    let ns = netns.unwrap_or_else(|| PathBuf::from("/proc/thread-self/ns/net"));
    let ns_inode = std::fs::metadata(&ns)
        .map_err(|e| io::Error::new(e.kind(), format!("network namespace {}: {e}", ns.display())))?
        .ino();
    let dir = std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(LOCK_DIR));
    let made = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    if let Err(e) = made {
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(io::Error::new(
                e.kind(),
                format!("table lock directory {}: {e}", dir.display()),
            ));
        }
    }
    // A directory that another user owns or may write to would let that
    // user hold the lock first.
    let meta = std::fs::symlink_metadata(&dir)?;
    let me = rustix::process::geteuid().as_raw();
    if !meta.is_dir() || (meta.uid() != me && meta.uid() != 0) || meta.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "table lock directory {}: must be a directory owned by this user or root, writable by nobody else",
                dir.display()
            ),
        ));
    }
    let path = dir.join(format!("nft-{ns_inode}-{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("table lock {}: {e}", path.display())))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "nftables table '{name}' belongs to another running ftpgate in this network namespace \
                 (it holds the lock {path}: `fuser -v {path}` names it). Two gateways cannot share a \
                 table: stop that one first, or give each its own data.nftables_table and data ports \
                 that do not overlap",
                path = path.display()
            ),
        )),
        Err(e) => Err(io::Error::new(
            io::Error::from(e).kind(),
            format!("table lock {}: {e}", path.display()),
        )),
    }
}

/// At most this many changes share one transaction.
const GROUP: usize = 32;

/// The network namespace a test's prefix runs `nft` in: `None` when the
/// prefix is not `ip netns exec NAME`.
#[cfg(test)]
fn netns_of(prefix: &[String]) -> Option<Option<PathBuf>> {
    match prefix {
        [] => Some(None),
        [ip, netns, exec, name]
            if ip == "ip" && netns == "netns" && exec == "exec" && !name.contains('/') =>
        {
            Some(Some(Path::new("/run/netns").join(name)))
        }
        _ => None,
    }
}

/// Runs `ops` on `table` as one transaction, and logs how long it took.
async fn apply(netlink: &mut Netlink, table: &str, ops: &[Op]) -> io::Result<()> {
    let start = std::time::Instant::now();
    let r = netlink.apply(table, ops).await;
    tracing::debug!(
        ops = ops.len(),
        us = start.elapsed().as_micros() as u64,
        ok = r.is_ok(),
        "nft: {ops:?}"
    );
    r
}

/// Starts the task that owns `netlink`: it takes changes in order and
/// applies those that queued up while the previous one ran together, as
/// one transaction. If that fails, each of its changes runs again on its
/// own, so every change is still one transaction with its own result. The
/// task ends when the table is dropped.
fn spawn_applier(
    table: String,
    mut netlink: Netlink,
) -> tokio::sync::mpsc::UnboundedSender<Change> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Change>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut group = vec![first];
            while group.len() < GROUP {
                match rx.try_recv() {
                    Ok(c) => group.push(c),
                    Err(_) => break,
                }
            }
            if group.len() > 1 {
                let ops: Vec<Op> = group.iter().flat_map(|c| c.ops.iter().copied()).collect();
                if apply(&mut netlink, &table, &ops).await.is_ok() {
                    for c in group {
                        let _ = c.done.send(Ok(()));
                    }
                    continue;
                }
            }
            for c in group {
                let r = apply(&mut netlink, &table, &c.ops).await;
                let _ = c.done.send(r);
            }
        }
    });
    tx
}

/// Table names go into nft scripts verbatim, so only plain identifiers pass.
fn check_name(name: &str) -> io::Result<()> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid nftables table name {name:?}"),
        ))
    }
}

/// `data.conntrack_mark`'s default.
pub(crate) const DEFAULT_MARK: u32 = 0x1000_0000;

/// The gateway's table `name`, without elements, as `nft -f` takes it,
/// for the conntrack mark `mark`.
pub(crate) fn table_script_for(name: &str, mark: u32) -> String {
    let start = TABLE.find("\ntable inet ").map_or(0, |i| i + 1);
    TABLE[start..]
        .replace("${table}", name)
        .replace("${mark}", &format!("{mark:#010x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::netns::Netns;

    #[tokio::test]
    async fn kernel_elements_in_the_kernel() {
        let Some(ns) = Netns::new() else { return };
        let table = InterceptTable::create_with_prefix("ftpgate_k", ns.prefix())
            .await
            .expect("create");
        let mut all = Vec::new();
        for (peer, dst, to, source) in [
            ("198.51.100.2", "192.0.2.1", "10.71.2.2:30000", "10.71.2.1"),
            (
                "2001:db8:100::2",
                "2001:db8::1",
                "[fd71:2::2]:30000",
                "fd71:2::1",
            ),
        ] {
            let (peer, dst, to, source) = (
                peer.parse().unwrap(),
                dst.parse().unwrap(),
                to.parse().unwrap(),
                source.parse().unwrap(),
            );
            all.extend([
                Element::Once { peer, port: 40001 },
                Element::Dnat {
                    peer,
                    dst,
                    port: 40001,
                    to,
                },
                Element::Snat { peer, to, source },
                Element::Claim { dst, port: 40001 },
            ]);
        }
        let timed: Vec<_> = all.iter().map(|e| (*e, Duration::from_secs(30))).collect();
        table.add(&timed).await.expect("add");
        let (_, listed) = ns.nft(&["list", "table", "inet", "ftpgate_k"], None);
        for want in [
            "198.51.100.2 . 40001 timeout 30s",
            "198.51.100.2 . 192.0.2.1 . 40001 timeout 30s expires",
            ": 10.71.2.2 . 30000",
            "2001:db8:100::2 . fd71:2::2 . 30000 timeout 30s",
            ": fd71:2::1",
            "192.0.2.1 . 40001 timeout 30s",
            "2001:db8::1 . 40001 timeout 30s",
        ] {
            assert!(listed.contains(want), "missing {want:?} in\n{listed}");
        }
        // A refresh sets a new timeout on an element that exists, and adds
        // one that does not.
        let claim = Element::Claim {
            dst: "192.0.2.1".parse().unwrap(),
            port: 40001,
        };
        let fresh = Element::Claim {
            dst: "192.0.2.1".parse().unwrap(),
            port: 40002,
        };
        for e in [claim, fresh] {
            table
                .refresh(e, Duration::from_secs(90))
                .await
                .expect("refresh");
        }
        let (_, listed) = ns.nft(&["list", "set", "inet", "ftpgate_k", "claim4"], None);
        assert!(
            listed.contains("192.0.2.1 . 40001 timeout 1m30s"),
            "{listed}"
        );
        assert!(
            listed.contains("192.0.2.1 . 40002 timeout 1m30s"),
            "{listed}"
        );
        table.remove(&[fresh]).await.expect("remove");
        table.remove(&all).await.expect("remove");
        let (_, listed) = ns.nft(&["list", "table", "inet", "ftpgate_k"], None);
        assert!(!listed.contains("198.51.100.2"), "{listed}");
        assert!(!listed.contains("2001:db8:100::2"), "{listed}");
        table.destroy().await.expect("destroy");
    }

    #[test]
    fn netlink_goes_where_the_prefix_runs_nft() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(netns_of(&[]), Some(None));
        assert_eq!(
            netns_of(&v(&["ip", "netns", "exec", "lab"])),
            Some(Some(PathBuf::from("/run/netns/lab")))
        );
        // Anything else names no namespace: tests refuse it.
        for other in [
            v(&["ip", "netns", "exec", "../x"]),
            v(&["ip", "netns", "exec"]),
            v(&["nsenter", "-t", "1", "-n"]),
        ] {
            assert_eq!(netns_of(&other), None, "{other:?}");
        }
        // A namespace that does not exist: an error naming it, no socket.
        let err = Netlink::open(Some(PathBuf::from("/run/netns/ftpgate-absent-ns"))).unwrap_err();
        assert!(err.to_string().contains("ftpgate-absent-ns"), "{err}");
    }

    #[test]
    fn table_names_are_checked() {
        for (name, ok) in [
            ("ftpgate", true),
            ("ftp_gate-2", true),
            ("", false),
            ("2ftp", false),
            ("a b", false),
            ("x;flush ruleset", false),
        ] {
            assert_eq!(check_name(name).is_ok(), ok, "{name:?}");
        }
    }

    #[tokio::test]
    async fn table_lifecycle_in_the_kernel() {
        let Some(ns) = Netns::new() else { return };
        let table = InterceptTable::create_with_prefix("ftpgate_t", ns.prefix())
            .await
            .expect("create");
        let pasv = Element::Passive {
            client: "10.0.0.5".parse().unwrap(),
            server: "198.51.100.7".parse().unwrap(),
            port: 40001,
        };
        let actv = Element::Active {
            client: "[2001:db8::5]:50000".parse().unwrap(),
            source: "2001:db8::7".parse().unwrap(),
        };
        table
            .add(&[
                (pasv, Duration::from_secs(30)),
                (actv, Duration::from_secs(30)),
            ])
            .await
            .expect("add");
        let (_, listed) = ns.nft(&["list", "table", "inet", "ftpgate_t"], None);
        assert!(
            listed.contains("10.0.0.5 . 198.51.100.7 . 40001 timeout 30s"),
            "{listed}"
        );
        assert!(
            listed.contains("2001:db8::5 . 50000 timeout 30s"),
            "{listed}"
        );

        // While its owner lives, a second create fails and leaves the
        // table, elements and all.
        let err = InterceptTable::create_with_prefix("ftpgate_t", ns.prefix())
            .await
            .expect_err("a second owner");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(
            err.to_string().contains("-ftpgate_t.lock: `fuser -v"),
            "{err}"
        );
        let (_, listed) = ns.nft(&["list", "table", "inet", "ftpgate_t"], None);
        assert!(
            listed.contains("10.0.0.5 . 198.51.100.7 . 40001"),
            "{listed}"
        );

        // Its owner gone without deleting it (as after a crash), a second
        // create replaces the stale table, elements and all.
        drop(table);
        let table = InterceptTable::create_with_prefix("ftpgate_t", ns.prefix())
            .await
            .expect("re-create");
        let (_, listed) = ns.nft(&["list", "table", "inet", "ftpgate_t"], None);
        assert!(!listed.contains("10.0.0.5"), "{listed}");

        table
            .add(&[
                (pasv, Duration::from_secs(30)),
                (actv, Duration::from_secs(30)),
            ])
            .await
            .expect("add");
        table.remove(&[pasv]).await.expect("remove");
        let (_, listed) = ns.nft(&["list", "table", "inet", "ftpgate_t"], None);
        assert!(!listed.contains("10.0.0.5"), "{listed}");
        assert!(listed.contains("2001:db8::5 . 50000"), "{listed}");
        // Gone already: the batch fails as a whole (actv stays), and the
        // process goes on taking changes; remove_each clears the rest.
        assert!(table.remove(&[pasv, actv]).await.is_err());
        let (_, listed) = ns.nft(&["list", "table", "inet", "ftpgate_t"], None);
        assert!(listed.contains("2001:db8::5 . 50000"), "{listed}");
        table.remove_each(&[pasv, actv]).await;
        let (_, listed) = ns.nft(&["list", "table", "inet", "ftpgate_t"], None);
        assert!(!listed.contains("2001:db8::5 . 50000"), "{listed}");

        table.destroy().await.expect("destroy");
        let (exists, _) = ns.nft(&["list", "table", "inet", "ftpgate_t"], None);
        assert!(!exists, "table still there after destroy");
    }

    /// Claims on ports `1..=n` of 192.0.2.1 that the kernel holds.
    fn claims_listed(ns: &Netns, table: &str, n: u16) -> usize {
        let (_, listed) = ns.nft(&["-j", "list", "set", "inet", table, "claim4"], None);
        (1..=n)
            .filter(|port| listed.contains(&format!("\"192.0.2.1\", {port}]")))
            .count()
    }

    fn claim(port: u16) -> Element {
        Element::Claim {
            dst: "192.0.2.1".parse().unwrap(),
            port,
        }
    }

    /// Over netlink: many changes, sequential and concurrent (grouped into
    /// one batch), each in the kernel; a grouped batch with one failing
    /// change is split up, so only that change fails.
    #[tokio::test]
    async fn kernel_takes_netlink_changes_sequential_and_grouped() {
        let Some(ns) = Netns::new() else { return };
        let table = InterceptTable::create_with_prefix("ftpgate_n", ns.prefix())
            .await
            .expect("create");
        let n = 1000u16;
        for port in 1..=n / 2 {
            table
                .add(&[(claim(port), Duration::from_secs(30))])
                .await
                .unwrap_or_else(|e| panic!("change {port}: {e}"));
        }
        let adds = (n / 2 + 1..=n).map(|port| {
            let table = &table;
            async move { table.add(&[(claim(port), Duration::from_secs(30))]).await }
        });
        for r in futures_join(adds).await {
            r.expect("grouped add");
        }
        assert_eq!(claims_listed(&ns, "ftpgate_n", n), n as usize);
        // Port 2000 was never added: its removal fails, the others' do not.
        let removes = [1, 2000, 3].map(|port| {
            let table = &table;
            async move { table.remove(&[claim(port)]).await }
        });
        let results = futures_join(removes).await;
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        let err = results[1].as_ref().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        assert!(err.to_string().contains("ftpgate_n"), "{err}");
        assert!(err.to_string().contains("port: 2000"), "{err}");
        assert_eq!(claims_listed(&ns, "ftpgate_n", n), n as usize - 2);
        // The map data comes back as written.
        let actv = Element::Active {
            client: "[2001:db8::5]:50000".parse().unwrap(),
            source: "2001:db8::7".parse().unwrap(),
        };
        table
            .add(&[(actv, Duration::from_secs(30))])
            .await
            .expect("add");
        let (_, listed) = ns.nft(&["-j", "list", "map", "inet", "ftpgate_n", "actv6"], None);
        assert!(
            listed.contains(r#"{"concat": ["2001:db8::5", 50000]}"#)
                && listed.contains(r#""2001:db8::7""#),
            "{listed}"
        );
        table.destroy().await.expect("destroy");
    }

    /// Runs futures concurrently on this task; results in order.
    async fn futures_join<F: std::future::Future>(
        futures: impl IntoIterator<Item = F>,
    ) -> Vec<F::Output> {
        let mut set = Vec::new();
        for f in futures {
            set.push(Box::pin(f));
        }
        let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (f, o) in set.iter_mut().zip(out.iter_mut()) {
                if o.is_none() {
                    match f.as_mut().poll(cx) {
                        std::task::Poll::Ready(v) => *o = Some(v),
                        std::task::Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        out.into_iter().flatten().collect()
    }

    #[tokio::test]
    async fn kernel_expires_elements() {
        let Some(ns) = Netns::new() else { return };
        let table = InterceptTable::create_with_prefix("ftpgate_t", ns.prefix())
            .await
            .expect("create");
        let pasv = Element::Passive {
            client: "10.0.0.5".parse().unwrap(),
            server: "198.51.100.7".parse().unwrap(),
            port: 40001,
        };
        table
            .add(&[(pasv, Duration::from_millis(300))])
            .await
            .expect("add");
        let (_, listed) = ns.nft(&["list", "set", "inet", "ftpgate_t", "pasv4"], None);
        assert!(listed.contains("10.0.0.5"), "{listed}");
        // Poll for the kernel's expiry (the thing under test), with a bound.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, listed) = ns.nft(&["list", "set", "inet", "ftpgate_t", "pasv4"], None);
            if !listed.contains("10.0.0.5") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "element never expired"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
