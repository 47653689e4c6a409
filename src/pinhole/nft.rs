//! The gateway's nftables table.
//!
//! In transparent mode the client believes it talks to the server, so its
//! data connections must look that way too. Two kinds of per-pinhole
//! elements, each with a timeout so that the kernel expires them even if the
//! gateway dies:
//!
//! - `pasv4`/`pasv6`: a passive data connection the client aims at
//!   (server, port) is redirected to the gateway's pinhole on that port.
//! - `actv4`/`actv6`: the gateway's active data connection to (client, port)
//!   leaves with the server's address as its source.
//!
//! The table itself is created and deleted with `nft -f -`. Element changes
//! are nf_tables netlink batches (`nftnl`), each one kernel transaction. A
//! gateway that cannot open the netlink socket does not start: nft itself
//! needs that socket.

use super::nftnl::{Netlink, Op};
use crate::config::{Config, ListenerMode};
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
#[cfg(test)]
use std::path::Path;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// One per-pinhole element of the gateway's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Element {
    /// Redirect the client's connection to (server, port) to the gateway's
    /// listener on `port`.
    Passive {
        /// The client's address.
        client: IpAddr,
        /// The address the client believes is the server.
        server: IpAddr,
        /// The pinhole's port.
        port: u16,
    },
    /// Source-NAT the gateway's connection to `client` so that it comes from
    /// `source`.
    Active {
        /// Where the gateway connects (the client's PORT/EPRT address).
        client: SocketAddr,
        /// The address the client must see (the server's).
        source: IpAddr,
    },
    /// Kernel backend: admits one new connection from `peer` to `port`; the
    /// packet path deletes it at the first SYN, so the pinhole is one-shot.
    Once {
        /// The only address allowed to connect.
        peer: IpAddr,
        /// The announced port.
        port: u16,
    },
    /// Kernel backend: a connection from `peer` to (`dst`, `port`) is
    /// destination-NATed to `to`.
    Dnat {
        /// Who connects.
        peer: IpAddr,
        /// The address `peer` connects to (the announced one).
        dst: IpAddr,
        /// The announced port.
        port: u16,
        /// The real endpoint.
        to: SocketAddr,
    },
    /// Kernel backend: the DNATed connection from `peer` to `to` leaves
    /// with `source` as its source address.
    Snat {
        /// Who connects.
        peer: IpAddr,
        /// The real endpoint (after DNAT).
        to: SocketAddr,
        /// The address the endpoint must see.
        source: IpAddr,
    },
    /// Kernel backend: the forward chain accepts the new connection from
    /// `peer` to `to` (after DNAT).
    Forward {
        /// Who connects.
        peer: IpAddr,
        /// The real endpoint (after DNAT).
        to: SocketAddr,
    },
    /// Kernel backend: (`dst`, `port`) is a pinhole's announced endpoint; a
    /// new connection to it that `Once` did not admit is dropped. It outlives
    /// the pinhole's other elements (see `kernel`), so a second connection,
    /// or one after the timeout, is dropped too.
    Claim {
        /// The announced address.
        dst: IpAddr,
        /// The announced port.
        port: u16,
    },
}

impl Element {
    /// The set or map this element lives in.
    pub(super) fn set(&self) -> io::Result<&'static str> {
        match *self {
            Element::Passive { client, server, .. } => match (client, server) {
                (IpAddr::V4(_), IpAddr::V4(_)) => Ok("pasv4"),
                (IpAddr::V6(_), IpAddr::V6(_)) => Ok("pasv6"),
                _ => Err(mixed_families(self)),
            },
            Element::Active { client, source } => match (client.ip(), source) {
                (IpAddr::V4(_), IpAddr::V4(_)) => Ok("actv4"),
                (IpAddr::V6(_), IpAddr::V6(_)) => Ok("actv6"),
                _ => Err(mixed_families(self)),
            },
            Element::Once { peer, .. } => Ok(if peer.is_ipv4() { "once4" } else { "once6" }),
            Element::Dnat { peer, dst, to, .. } => {
                family3(self, peer, dst, to.ip(), "dnat4", "dnat6")
            }
            Element::Snat { peer, to, source } => {
                family3(self, peer, to.ip(), source, "ksnat4", "ksnat6")
            }
            Element::Forward { peer, to } => family3(self, peer, peer, to.ip(), "fwd4", "fwd6"),
            Element::Claim { dst, .. } => Ok(if dst.is_ipv4() { "claim4" } else { "claim6" }),
        }
    }
}

/// The v4 or v6 set name when all three addresses share a family.
fn family3(
    e: &Element,
    a: IpAddr,
    b: IpAddr,
    c: IpAddr,
    v4: &'static str,
    v6: &'static str,
) -> io::Result<&'static str> {
    match (a.is_ipv4(), b.is_ipv4(), c.is_ipv4()) {
        (true, true, true) => Ok(v4),
        (false, false, false) => Ok(v6),
        _ => Err(mixed_families(e)),
    }
}

fn mixed_families(e: &Element) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("nftables element mixes address families: {e:?}"),
    )
}

/// The gateway's own nftables table (family `inet`). Created at start,
/// removed by [`InterceptTable::destroy`] at a clean exit.
///
/// Element changes are nf_tables netlink batches the gateway writes itself
/// (see `nftnl`): each change (all the elements of a pinhole, say) is one
/// transaction, applied whole or not at all. Changes that queue up while
/// one runs share the next transaction (see `spawn_applier`).
#[derive(Debug)]
pub struct InterceptTable {
    name: String,
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
    pub async fn create(name: &str) -> io::Result<Self> {
        Self::open(name, Vec::new(), None).await
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
        Self::open(name, prefix, netns).await
    }

    /// Creates the table, running `nft` through `prefix`, with element
    /// changes on a netlink socket in `netns`.
    async fn open(name: &str, prefix: Vec<String>, netns: Option<PathBuf>) -> io::Result<Self> {
        check_name(name)?;
        let netlink = Netlink::open(netns)
            .map_err(|e| io::Error::new(e.kind(), format!("nftables netlink socket: {e}")))?;
        let table = InterceptTable {
            name: name.to_owned(),
            prefix,
            changes: spawn_applier(name.to_owned(), netlink),
        };
        // `add` then `delete` makes the deletion succeed whether or not a
        // stale table exists; the batch is one transaction, so there is no
        // moment without the table's rules once it exists.
        let script = format!(
            "add table inet {name}\ndelete table inet {name}\n{}",
            table_script(name)
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
    pub async fn refresh(&self, element: Element, timeout: Duration) -> io::Result<()> {
        let ops = vec![
            Op::Add(element, timeout),
            Op::Delete(element),
            Op::Add(element, timeout),
        ];
        self.batch(ops).await
    }

    /// Removes `elements`, whether or not some are already gone (expired,
    /// or deleted by the packet path), in one transaction: each is added
    /// (a no-op if present) and then deleted, so no delete can fail on a
    /// missing element. Errors are logged, not returned: the kernel's
    /// timeouts are the backstop.
    pub async fn remove_each(&self, elements: &[Element]) {
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
    pub async fn destroy(&self) -> io::Result<()> {
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

/// The gateway's table, without elements.
fn table_script(name: &str) -> String {
    format!(
        "\
table inet {name} {{
\t# Passive data connections a client aims at the server's address
\t# (client . server . port): redirected to the gateway's pinhole on that port.
\tset pasv4 {{
\t\ttype ipv4_addr . ipv4_addr . inet_service
\t\tflags timeout
\t}}
\tset pasv6 {{
\t\ttype ipv6_addr . ipv6_addr . inet_service
\t\tflags timeout
\t}}
\t# Active data connections from the gateway to (client . port): the source
\t# becomes the address the client believes is the server.
\tmap actv4 {{
\t\ttype ipv4_addr . inet_service : ipv4_addr
\t\tflags timeout
\t}}
\tmap actv6 {{
\t\ttype ipv6_addr . inet_service : ipv6_addr
\t\tflags timeout
\t}}
\t# Kernel backend (data.backend: nftables). A pinhole admits one new
\t# connection from (peer . port): the first SYN deletes its element.
\tset once4 {{
\t\ttype ipv4_addr . inet_service
\t\tflags timeout
\t}}
\tset once6 {{
\t\ttype ipv6_addr . inet_service
\t\tflags timeout
\t}}
\t# (peer . announced address . announced port) : real endpoint.
\tmap dnat4 {{
\t\ttype ipv4_addr . ipv4_addr . inet_service : ipv4_addr . inet_service
\t\tflags timeout
\t}}
\tmap dnat6 {{
\t\ttype ipv6_addr . ipv6_addr . inet_service : ipv6_addr . inet_service
\t\tflags timeout
\t}}
\t# (peer . real endpoint) : the source address the endpoint must see.
\tmap ksnat4 {{
\t\ttype ipv4_addr . ipv4_addr . inet_service : ipv4_addr
\t\tflags timeout
\t}}
\tmap ksnat6 {{
\t\ttype ipv6_addr . ipv6_addr . inet_service : ipv6_addr
\t\tflags timeout
\t}}
\t# (peer . real endpoint): the forward chain accepts exactly this flow.
\tset fwd4 {{
\t\ttype ipv4_addr . ipv4_addr . inet_service
\t\tflags timeout
\t}}
\tset fwd6 {{
\t\ttype ipv6_addr . ipv6_addr . inet_service
\t\tflags timeout
\t}}
\t# (announced address . port) of a kernel pinhole, from its opening until
\t# its session ends (or pinhole_timeout after its end): a new connection
\t# that @once did not admit (another host, a second connection, one after
\t# the timeout) is dropped, silently, before it reaches anything.
\tset claim4 {{
\t\ttype ipv4_addr . inet_service
\t\tflags timeout
\t}}
\tset claim6 {{
\t\ttype ipv6_addr . inet_service
\t\tflags timeout
\t}}
\t# Just before the usual dstnat rules, so an operator's own DNAT does not
\t# take these connections elsewhere first. A nat chain sees only the first
\t# packet of a connection, so the drops below never touch an admitted one.
\tchain prerouting {{
\t\ttype nat hook prerouting priority dstnat - 1; policy accept;
\t\tip saddr . ip daddr . tcp dport @dnat4 ip saddr . tcp dport @once4 delete @once4 {{ ip saddr . tcp dport }} dnat ip to ip saddr . ip daddr . tcp dport map @dnat4
\t\tip6 saddr . ip6 daddr . tcp dport @dnat6 ip6 saddr . tcp dport @once6 delete @once6 {{ ip6 saddr . tcp dport }} dnat ip6 to ip6 saddr . ip6 daddr . tcp dport map @dnat6
\t\tip daddr . tcp dport @claim4 drop
\t\tip6 daddr . tcp dport @claim6 drop
\t\tip saddr . ip daddr . tcp dport @pasv4 redirect
\t\tip6 saddr . ip6 daddr . tcp dport @pasv6 redirect
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat - 1; policy accept;
\t\tsnat ip to ip daddr . tcp dport map @actv4
\t\tsnat ip6 to ip6 daddr . tcp dport map @actv6
\t\tsnat ip to ip saddr . ip daddr . tcp dport map @ksnat4
\t\tsnat ip6 to ip6 saddr . ip6 daddr . tcp dport map @ksnat6
\t}}
\t# An accept here does not override a drop in another table's forward
\t# chain: the operator's forward chain must accept these flows too (for
\t# example `ct status dnat accept`).
\tchain forward {{
\t\ttype filter hook forward priority filter - 1; policy accept;
\t\tct state new ip saddr . ip daddr . tcp dport @fwd4 accept
\t\tct state new ip6 saddr . ip6 daddr . tcp dport @fwd6 accept
\t}}
}}
"
    )
}

/// The nftables ruleset an operator needs, as `ftpgate nft --config F`
/// prints it: the gateway's own table, the control-port interception for
/// each transparent listener, and what the filter chains must accept.
pub fn ruleset(config: &Config) -> String {
    let d = &config.data;
    let table = &d.nftables_table;
    let mut out = String::new();
    // Writing to a String cannot fail, hence the ignored results.
    let _ = writeln!(
        out,
        "# nftables ruleset for ftpgate ({})",
        config.path.display()
    );
    let _ = writeln!(out, "#");
    let _ = writeln!(
        out,
        "# 1. The gateway's own table. ftpgate creates it at start (replacing a stale"
    );
    let _ = writeln!(
        out,
        "#    one) and deletes it at exit; it is shown here for review. Each pinhole adds"
    );
    let _ = writeln!(
        out,
        "#    one element with a timeout of {}ms, so the kernel expires it even if the",
        d.pinhole_timeout.as_millis()
    );
    let _ = writeln!(out, "#    gateway dies.");
    out.push_str(&table_script(table));

    let transparent: Vec<_> = config
        .listeners
        .iter()
        .filter(|l| l.mode == ListenerMode::Transparent)
        .collect();
    out.push('\n');
    let _ = writeln!(
        out,
        "# 2. Control-port interception for transparent listeners. Put these rules in"
    );
    let _ = writeln!(
        out,
        "#    your own table (shown as one here so that it loads as is). Add further"
    );
    let _ = writeln!(
        out,
        "#    control ports as a set: tcp dport {{ 21, 2121 }}. Connections to the"
    );
    let _ = writeln!(
        out,
        "#    gateway's own addresses are left alone (fib daddr type local)."
    );
    if transparent.is_empty() {
        let _ = writeln!(out, "#    (No transparent listener: nothing to intercept.)");
    } else {
        let _ = writeln!(out, "table inet {table}-edge {{");
        let _ = writeln!(out, "\tchain prerouting {{");
        let _ = writeln!(
            out,
            "\t\ttype nat hook prerouting priority dstnat; policy accept;"
        );
        for l in &transparent {
            let a = l.listen;
            let _ = writeln!(out, "\t\t# listener {:?} on {a}", l.name);
            let (proto, fam) = if a.is_ipv4() {
                ("ipv4", "ip")
            } else {
                ("ipv6", "ip6")
            };
            let head = format!("\t\tmeta nfproto {proto} fib daddr type != local tcp dport 21");
            if a.ip().is_unspecified() {
                // Any local address will do: the one of the incoming interface.
                let _ = writeln!(out, "{head} redirect to :{}", a.port());
            } else {
                // The listener is bound to one address; `redirect` would pick
                // the incoming interface's primary address, which may differ.
                let _ = writeln!(out, "{head} dnat {fam} to {a}");
            }
        }
        let _ = writeln!(out, "\t}}");
        let _ = writeln!(out, "}}");
    }

    out.push('\n');
    filter_hints(config, &mut out);
    out
}

/// Section 3 of [`ruleset`]: what the operator's filter chains must accept,
/// as an example table whose lines start with `#` and a tab. Without those
/// two characters it loads as is, so every hint is valid nftables syntax
/// (a test loads it with `nft -c`).
fn filter_hints(config: &Config, out: &mut String) {
    let d = &config.data;
    let _ = writeln!(
        out,
        "# 3. Filtering. If your own chains drop by default, they must accept what"
    );
    let _ = writeln!(
        out,
        "#    this example accepts: copy its rules into your chains, before their drop."
    );
    let _ = writeln!(
        out,
        "#    (Without the leading \"#\" and tab, the example loads as it is.)"
    );
    let _ = writeln!(out, "#\ttable inet {}-filter {{", d.nftables_table);
    let _ = writeln!(out, "#\t\tchain input {{");
    let _ = writeln!(
        out,
        "#\t\t\ttype filter hook input priority filter; policy accept;"
    );
    for l in &config.listeners {
        let how = match l.mode {
            ListenerMode::Transparent => "control connections, through the redirect above",
            ListenerMode::Reverse { .. } => "control connections from clients",
        };
        let _ = writeln!(out, "#\t\t\t# listener {:?}: {how}", l.name);
        let _ = writeln!(out, "#\t\t\ttcp dport {} accept", l.listen.port());
    }
    let _ = writeln!(
        out,
        "#\t\t\t# client_ports: passive data connections from clients, directly or"
    );
    let _ = writeln!(out, "#\t\t\t# through the @pasv4/@pasv6 redirect");
    let _ = writeln!(out, "#\t\t\ttcp dport {} accept", d.client_ports);
    let _ = writeln!(
        out,
        "#\t\t\t# server_ports: active data connections from servers"
    );
    let _ = writeln!(out, "#\t\t\ttcp dport {} accept", d.server_ports);
    let _ = writeln!(out, "#\t\t\t# replies to the gateway's own connections");
    let _ = writeln!(out, "#\t\t\tct state established,related accept");
    let _ = writeln!(out, "#\t\t}}");
    if d.backend == crate::config::BackendKind::Nftables {
        // The kernel forwards same-mode data connections; an accept in the
        // gateway's table cannot override a drop in the operator's.
        let _ = writeln!(out, "#\t\tchain forward {{");
        let _ = writeln!(
            out,
            "#\t\t\ttype filter hook forward priority filter; policy accept;"
        );
        let _ = writeln!(
            out,
            "#\t\t\t# data.backend nftables: same-mode data connections are DNAT'd by"
        );
        let _ = writeln!(
            out,
            "#\t\t\t# the gateway's table (@dnat4/@dnat6), whose own forward chain"
        );
        let _ = writeln!(
            out,
            "#\t\t\t# accepts exactly each flow (@fwd4/@fwd6). Conversion plans are"
        );
        let _ = writeln!(
            out,
            "#\t\t\t# relayed: the input rules above apply to them."
        );
        let _ = writeln!(out, "#\t\t\tct status dnat accept");
        let _ = writeln!(out, "#\t\t}}");
    }
    let _ = writeln!(out, "#\t}}");
    if d.backend != crate::config::BackendKind::Nftables {
        let _ = writeln!(
            out,
            "#    The forward chain needs nothing for FTP: the gateway ends both legs of"
        );
        let _ = writeln!(out, "#    every control and data connection.");
    }
    let _ = writeln!(
        out,
        "#    The output chain must let the gateway reach servers (control, passive"
    );
    let _ = writeln!(out, "#    data) and clients (active data).");
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{
        Action, BackendKind, DataConfig, DataMode, Limits, Listener, PortRange, Rule, ServerMode,
        TlsPolicy,
    };
    use std::path::PathBuf;
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

        /// Runs `nft ARGS` inside the namespace; (success, stdout+stderr).
        pub(crate) fn nft(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
            use std::io::Write;
            let mut cmd = std::process::Command::new("ip");
            cmd.args(["netns", "exec", &self.name, "nft"]).args(args);
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
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

    fn skip(why: &str) {
        if std::env::var("FTPGATE_LAB").as_deref() == Ok("1") {
            panic!("FTPGATE_LAB=1 but {why}");
        }
        eprintln!("skipped: {why}");
    }

    fn config(listeners: Vec<Listener>) -> Config {
        Config {
            path: PathBuf::from("rules/test.yaml"),
            listeners,
            data: DataConfig {
                backend: BackendKind::Relay,
                client_ports: PortRange {
                    lo: 40000,
                    hi: 40999,
                },
                server_ports: PortRange {
                    lo: 41000,
                    hi: 41999,
                },
                pinhole_timeout: Duration::from_secs(30),
                nftables_table: "ftpgate".into(),
                max_ports_per_client: crate::config::PortShare::Percent(25),
            },
            limits: Limits {
                max_sessions: 10,
                max_sessions_per_client: 2,
                idle_timeout: Duration::from_secs(900),
                connect_timeout: Duration::from_secs(10),
            },
            rules: vec![Rule {
                name: "all".into(),
                clients: vec![],
                servers: vec![],
                action: Action::Allow,
                modes: vec![DataMode::Passive, DataMode::Active],
                server_mode: ServerMode::Same,
                data_ports: PortRange {
                    lo: 1024,
                    hi: 65535,
                },
                tls: TlsPolicy::Refuse,
                deny_commands: vec![],
            }],
            metrics: None,
            audit: None,
        }
    }

    fn listener(name: &str, listen: &str, mode: ListenerMode) -> Listener {
        Listener {
            name: name.into(),
            listen: listen.parse().unwrap(),
            mode,
        }
    }

    fn full_config() -> Config {
        config(vec![
            listener("lan-out", "10.0.0.1:8021", ListenerMode::Transparent),
            listener("any-v4", "0.0.0.0:8022", ListenerMode::Transparent),
            listener("lan6", "[2001:db8::1]:8021", ListenerMode::Transparent),
            listener(
                "public-ftp",
                "192.0.2.1:21",
                ListenerMode::Reverse {
                    upstream: "10.0.0.3:21".parse().unwrap(),
                    announce: None,
                },
            ),
        ])
    }

    #[test]
    fn ruleset_names_every_transparent_listener_and_the_ports() {
        let text = ruleset(&full_config());
        for want in [
            "table inet ftpgate {",
            "ip saddr . ip daddr . tcp dport @pasv4 redirect",
            "snat ip6 to ip6 daddr . tcp dport map @actv6",
            "tcp dport 21 dnat ip to 10.0.0.1:8021",
            "tcp dport 21 redirect to :8022",
            "tcp dport 21 dnat ip6 to [2001:db8::1]:8021",
            "#\t\t\ttcp dport 40000-40999 accept\n",
            "#\t\t\ttcp dport 41000-41999 accept\n",
            "# listener \"public-ftp\": control connections from clients\n#\t\t\ttcp dport 21 accept\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // A reverse listener is never intercepted.
        assert!(!text.contains("to 192.0.2.1"), "{text}");
    }

    #[test]
    fn ruleset_for_the_kernel_backend_names_its_maps_and_forward_needs() {
        let mut cfg = full_config();
        let relay = ruleset(&cfg);
        assert!(relay.contains("forward chain needs nothing"), "{relay}");
        cfg.data.backend = BackendKind::Nftables;
        let text = ruleset(&cfg);
        for want in [
            "delete @once4 { ip saddr . tcp dport } dnat ip to ip saddr . ip daddr . tcp dport map @dnat4",
            "snat ip6 to ip6 saddr . ip6 daddr . tcp dport map @ksnat6",
            "ct state new ip saddr . ip daddr . tcp dport @fwd4 accept",
            "#\t\t\tct status dnat accept\n",
            "ip daddr . tcp dport @claim4 drop",
            "ip6 daddr . tcp dport @claim6 drop",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("forward chain needs nothing"), "{text}");
    }

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
                Element::Forward { peer, to },
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
    fn ruleset_without_transparent_listener_has_no_interception() {
        let cfg = config(vec![listener(
            "public-ftp",
            "192.0.2.1:21",
            ListenerMode::Reverse {
                upstream: "10.0.0.3:21".parse().unwrap(),
                announce: None,
            },
        )]);
        let text = ruleset(&cfg);
        assert!(!text.contains("-edge"), "{text}");
        assert!(text.contains("No transparent listener"), "{text}");
    }

    #[test]
    fn ruleset_passes_nft_check() {
        let Some(ns) = Netns::new() else { return };
        for cfg in [full_config(), config(vec![])] {
            let text = ruleset(&cfg);
            let (ok, msg) = ns.nft(&["-c", "-f", "-"], Some(&text));
            assert!(ok, "nft -c rejected the ruleset: {msg}\n{text}");
        }
        // The check has teeth: a broken line is refused.
        let (ok, _) = ns.nft(
            &["-c", "-f", "-"],
            Some("table inet x { chain c { bogus } }\n"),
        );
        assert!(!ok);
    }

    /// The example filter table of section 3, without its leading `#`.
    fn hint_lines(text: &str) -> String {
        text.lines()
            .filter(|l| l.starts_with("#\t"))
            .map(|l| format!("{}\n", &l[1..]))
            .collect()
    }

    #[test]
    fn ruleset_hints_pass_nft_check() {
        let have_nft = std::process::Command::new("nft")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !have_nft {
            return skip("nft not found");
        }
        let Some(ns) = Netns::new() else { return };
        for backend in [BackendKind::Relay, BackendKind::Nftables] {
            let mut cfg = full_config();
            cfg.data.backend = backend;
            let hints = hint_lines(&ruleset(&cfg));
            // Every listener and both pools have a rule in the example.
            for port in ["8021", "8022", "21", "40000-40999", "41000-41999"] {
                let rule = format!("\ttcp dport {port} accept\n");
                assert!(hints.contains(&rule), "no {rule:?} in\n{hints}");
            }
            assert_eq!(
                hints.contains("ct status dnat accept"),
                backend == BackendKind::Nftables,
                "{hints}"
            );
            let (ok, msg) = ns.nft(&["-c", "-f", "-"], Some(&hints));
            assert!(ok, "nft -c rejected the hints: {msg}\n{hints}");
        }
        // The hint the ruleset used to give fails the same check.
        let old = "table inet t {\n\tchain f {\n\t\tct status dnat tcp accept\n\t}\n}\n";
        assert!(!ns.nft(&["-c", "-f", "-"], Some(old)).0);
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

        // A second create replaces the stale table, elements and all.
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
