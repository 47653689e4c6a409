//! The validated configuration: what the rest of the crate reads.

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Declares a unit enum together with each value's name in the rule file.
/// The parser, its error messages, the printer and `ftpgate explain` all
/// take the names from the `NAMES` table and `as_str` this generates.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $ty:ident {
            $($(#[$vmeta:meta])* $variant:ident = $name:literal,)+
        }
    ) => {
        $(#[$meta])*
        $vis enum $ty {
            $($(#[$vmeta])* $variant,)+
        }

        impl $ty {
            /// Every value with its rule-file name, in the order error
            /// messages list them.
            $vis const NAMES: &'static [(&'static str, $ty)] = &[$(($name, $ty::$variant)),+];

            /// The value's name in the rule file.
            $vis fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)+
                }
            }
        }
    };
}

/// The `path` of an audit log that means standard output.
pub(crate) const AUDIT_STDOUT: &str = "-";

/// `metrics:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Address the HTTP endpoint binds (`/metrics`). Port 0 lets the kernel
    /// pick, for tests.
    pub listen: SocketAddr,
}

/// `audit:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// Where the JSON lines go.
    pub path: AuditTarget,
}

/// Where audit lines are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    /// Standard output (`path: "-"`), e.g. for journald or a container log.
    Stdout,
    /// Appended to this file, reopened when it is rotated away.
    File(PathBuf),
}

/// How a listener finds the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerMode {
    /// Fixed upstream; `announce` is the address told to clients, if set.
    Reverse {
        /// The FTP server behind the gateway.
        upstream: SocketAddr,
        /// Address announced in 227 replies instead of the local address.
        announce: Option<IpAddr>,
    },
    /// The server is the intercepted connection's original destination.
    Transparent,
}

named_enum! {
    /// A listener's `mode`, the part of [`ListenerMode`] that has a name.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum ListenerKind {
        /// [`ListenerMode::Reverse`].
        Reverse = "reverse",
        /// [`ListenerMode::Transparent`].
        Transparent = "transparent",
    }
}

impl ListenerMode {
    /// Which of the two modes this is.
    pub(crate) fn kind(&self) -> ListenerKind {
        match self {
            ListenerMode::Reverse { .. } => ListenerKind::Reverse,
            ListenerMode::Transparent => ListenerKind::Transparent,
        }
    }
}

/// One listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Used in logs and metrics.
    pub name: String,
    /// Address to bind.
    pub listen: SocketAddr,
    /// Reverse or transparent.
    pub mode: ListenerMode,
    /// Balancers that put a PROXY header before each connection; none when
    /// the `proxy_protocol` section is absent.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// The PROXY header version the gateway sends first on its control
    /// connection to the upstream, naming the real client (reverse
    /// listeners only); none: no header.
    pub upstream_proxy_protocol: Option<ProxyVersion>,
    /// The gateway's certificate toward clients, when the listener has a
    /// `tls:` section (needed by rules with `tls: terminate`).
    pub tls: Option<super::ListenerTls>,
    /// How the gateway speaks to the server (reverse listeners); `None`:
    /// clear text, no downgrade allowed.
    pub upstream_tls: Option<super::UpstreamTls>,
}

named_enum! {
    /// A PROXY protocol version, as a listener sends it to its upstream.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ProxyVersion {
        /// The text header, `PROXY TCP4 ...\r\n`.
        V1 = "v1",
        /// The binary header.
        V2 = "v2",
    }
}

/// A listener's `proxy_protocol:` section: which peers are balancers that
/// must send a PROXY header (v1 or v2), and how long the header may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocol {
    /// Balancer CIDRs. A connection from one of them must start with a
    /// header; from anywhere else, a header is refused.
    pub from: Vec<IpNet>,
    /// The whole header must arrive within this. Default 5s.
    pub timeout: Duration,
    /// The listener's connections waiting for their header now.
    pub waiting: HeaderWaits,
}

impl ProxyProtocol {
    /// The `timeout` when the file gives none.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
    /// The longest `timeout` a rule file may set.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

    /// Connections of one listener that may wait for their header at
    /// once; the next is closed. A balancer sends its header in the
    /// connection's first segment, so a wait normally lasts one round trip
    /// (64 waits at once allow some 100,000 connections a second at a
    /// LAN's 0.5ms), while a host inside `from` that connects and sends
    /// nothing holds at most this many descriptors, not all of them.
    pub const MAX_WAITING: usize = 64;
    /// Prefixes shorter than these (IPv4, IPv6) in `from` draw a warning:
    /// every address inside may name any client and take its data
    /// pinholes, and "the whole LAN" (/8, /16) is the usual mistake, while
    /// balancers fit in one subnet.
    pub const BROAD_PREFIX: (u8, u8) = (24, 64);

    /// True when `peer` is one of the balancers.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.from.iter().any(|net| net.contains(&peer))
    }

    /// Why `net`, one of `from`, is suspiciously broad; `None` when it is not.
    pub fn too_broad(net: &IpNet) -> Option<String> {
        let (shortest, family) = match net {
            IpNet::V4(_) => (Self::BROAD_PREFIX.0, "IPv4"),
            IpNet::V6(_) => (Self::BROAD_PREFIX.1, "IPv6"),
        };
        if net.prefix_len() >= shortest {
            return None;
        }
        let what = if net.prefix_len() == 0 {
            format!("every {family} address")
        } else {
            format!("a network shorter than /{shortest}")
        };
        Some(format!(
            "proxy_protocol.from {net} is {what}: any host in it may name any client, and so pass rules, limits and the PORT check; name the balancers"
        ))
    }
}

/// How many of one listener's connections wait for their PROXY header.
/// Clones share the count, so every session of a listener counts against
/// one bound; it is never compared (two configurations are equal whatever
/// their connections are doing).
#[derive(Debug, Clone, Default)]
pub struct HeaderWaits(Arc<AtomicUsize>);

impl PartialEq for HeaderWaits {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for HeaderWaits {}

impl HeaderWaits {
    /// A place among the waiting connections, or `None` when `max` already
    /// wait.
    pub fn enter(&self, max: usize) -> Option<HeaderWait> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| HeaderWait(Arc::clone(&self.0)))
    }

    /// Connections waiting now.
    pub fn now(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// A connection's place among those waiting for their header; given back
/// when dropped.
#[derive(Debug)]
pub struct HeaderWait(Arc<AtomicUsize>);

impl Drop for HeaderWait {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

named_enum! {
    /// Which backend carries data connections.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum BackendKind {
        /// Bytes pass through the gateway.
        Relay = "relay",
        /// The kernel forwards the bytes through per-pinhole nftables elements.
        Nftables = "nftables",
    }
}

/// An inclusive port range `lo-hi`, with 1 ≤ lo ≤ hi.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// Lowest port.
    pub lo: u16,
    /// Highest port.
    pub hi: u16,
}

impl PortRange {
    /// True when `port` is inside the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }
    /// Number of ports in the range.
    pub fn len(&self) -> usize {
        usize::from(self.hi - self.lo) + 1
    }
    /// Never true: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

/// `data:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataConfig {
    /// relay (default) or nftables.
    pub backend: BackendKind,
    /// Gateway ports for data connections with clients. Default 40000-40999.
    pub client_ports: PortRange,
    /// Gateway ports for data connections with servers. Default 41000-41999.
    pub server_ports: PortRange,
    /// An unused pinhole closes after this. Default 30s.
    pub pinhole_timeout: Duration,
    /// The nftables table the gateway owns. Default `ftpgate`.
    pub nftables_table: String,
    /// The ct mark bit(s) the kernel backend sets on the gateway's control
    /// connections (their data connections inherit it), and the socket
    /// mark it gives its listeners and server control connections, so that
    /// its table finds them. Default `0x10000000`.
    pub conntrack_mark: u32,
    /// Most ports of each pool that one client address may hold at once.
    /// Default 25%.
    pub max_ports_per_client: PortShare,
}

/// `max_ports_per_client`: a count of ports, or a percentage of each pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortShare {
    /// At most this many ports of each pool (`16`).
    Ports(usize),
    /// At most this percentage of each pool, 1-100 (`25%`).
    Percent(u8),
}

impl PortShare {
    /// The most ports one client may hold of a pool of `len` ports.
    ///
    /// A percentage rounds up, and is at least 2 ports (or the whole of a
    /// smaller pool): a client always has room for a fresh pinhole while
    /// the one it supersedes is still being given back.
    pub fn of(self, len: usize) -> usize {
        let n = match self {
            PortShare::Ports(n) => n,
            PortShare::Percent(p) => (len * usize::from(p)).div_ceil(100).max(2),
        };
        n.clamp(1, len.max(1))
    }
}

impl std::fmt::Display for PortShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortShare::Ports(n) => write!(f, "{n}"),
            PortShare::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// `limits:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Default 10000.
    pub max_sessions: usize,
    /// Default 64.
    pub max_sessions_per_client: usize,
    /// Control connection with no traffic is closed after this. Default 15m.
    pub idle_timeout: Duration,
    /// Connecting to a server (control or data). Default 10s.
    pub connect_timeout: Duration,
}

named_enum! {
    /// allow or deny.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Action {
        /// The session proceeds under the rule's policy.
        Allow = "allow",
        /// The session is refused with 421.
        Deny = "deny",
    }
}

named_enum! {
    /// A data mode a client may ask for.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum DataMode {
        /// PASV/EPSV
        Passive = "passive",
        /// PORT/EPRT
        Active = "active",
    }
}

named_enum! {
    /// How the gateway sets up the server leg.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ServerMode {
        /// The same mode as the client asked for.
        Same = "same",
        /// Always PASV/EPSV toward the server.
        Passive = "passive",
        /// Always PORT/EPRT toward the server.
        Active = "active",
    }
}

named_enum! {
    /// What AUTH TLS/SSL gets.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum TlsPolicy {
        /// Refused with 534; the session stays in clear text.
        Refuse = "refuse",
        /// Forwarded; once TLS starts the gateway stops parsing and copies bytes.
        Passthrough = "passthrough",
        /// Answered by the gateway, which ends TLS on the client leg with the
        /// listener's certificate and keeps parsing.
        Terminate = "terminate",
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// For logs.
    pub name: String,
    /// Client CIDRs; default any (0.0.0.0/0 and ::/0).
    pub clients: Vec<IpNet>,
    /// Server CIDRs; default any.
    pub servers: Vec<IpNet>,
    /// allow (default) or deny.
    pub action: Action,
    /// Data modes clients may ask for; default both.
    pub modes: Vec<DataMode>,
    /// default same.
    pub server_mode: ServerMode,
    /// Ports an endpoint may name in PORT/EPRT/227/229; default 1024-65535.
    /// Ports below 1024 are refused whatever this says.
    pub data_ports: PortRange,
    /// default refuse.
    pub tls: TlsPolicy,
    /// Verbs refused with 502, upper case.
    pub deny_commands: Vec<String>,
    /// USER before a completed AUTH TLS gets 530 (`tls: terminate` only).
    pub require_tls: bool,
    /// A data command under PROT C gets 521 (`tls: terminate` only).
    pub require_prot_p: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
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
            nftables_table: "ftpgate".to_string(),
            // One bit, high enough to stay clear of small marks that
            // routing setups commonly use.
            conntrack_mark: crate::netfilter::table::DEFAULT_MARK,
            // One client may take a quarter of a pool: a few hostile
            // addresses cannot starve the others.
            max_ports_per_client: PortShare::Percent(25),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 10_000,
            max_sessions_per_client: 64,
            idle_timeout: Duration::from_secs(15 * 60),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl Rule {
    /// A rule with every default: allow any client to any server, both data
    /// modes, `server_mode: same`, data ports 1024-65535, TLS refused, no
    /// denied commands.
    pub fn new(name: impl Into<String>) -> Rule {
        Rule {
            name: name.into(),
            clients: any_address(),
            servers: any_address(),
            action: Action::Allow,
            modes: vec![DataMode::Passive, DataMode::Active],
            server_mode: ServerMode::Same,
            data_ports: PortRange {
                lo: 1024,
                hi: 65535,
            },
            tls: TlsPolicy::Refuse,
            deny_commands: Vec::new(),
            require_tls: false,
            require_prot_p: false,
        }
    }
}

/// `0.0.0.0/0` and `::/0`: what an omitted `clients`/`servers` means.
fn any_address() -> Vec<IpNet> {
    vec![
        IpNet::V4(ipnet::Ipv4Net::default()),
        IpNet::V6(ipnet::Ipv6Net::default()),
    ]
}
