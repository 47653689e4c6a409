//! The rule file: YAML in, validated [`Config`] out, once, at load.
//!
//! Every error names `file:line:column`. Strings become `IpNet`,
//! `SocketAddr`, [`PortRange`] and `Duration` here, so nothing downstream
//! parses configuration text again.

use ipnet::IpNet;
use serde::de;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it was loaded from (for reload and messages).
    pub path: PathBuf,
    /// At least one listener; names are unique.
    pub listeners: Vec<Listener>,
    /// Data-connection settings.
    pub data: DataConfig,
    /// Session limits.
    pub limits: Limits,
    /// Rules in file order; first match wins.
    pub rules: Vec<Rule>,
    /// The Prometheus endpoint; none when the `metrics` section is absent.
    pub metrics: Option<MetricsConfig>,
    /// The transfer audit log; none when the `audit` section is absent.
    pub audit: Option<AuditConfig>,
}

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

/// One listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Used in logs and metrics.
    pub name: String,
    /// Address to bind.
    pub listen: SocketAddr,
    /// Reverse or transparent.
    pub mode: ListenerMode,
}

/// Which backend carries data connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Bytes pass through the gateway.
    Relay,
    /// The kernel forwards the bytes through per-pinhole nftables elements.
    Nftables,
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

/// allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The session proceeds under the rule's policy.
    Allow,
    /// The session is refused with 421.
    Deny,
}

/// A data mode a client may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataMode {
    /// PASV/EPSV
    Passive,
    /// PORT/EPRT
    Active,
}

/// How the gateway sets up the server leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerMode {
    /// The same mode as the client asked for.
    Same,
    /// Always PASV/EPSV toward the server.
    Passive,
    /// Always PORT/EPRT toward the server.
    Active,
}

/// What AUTH TLS/SSL gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Refused with 534; the session stays in clear text.
    Refuse,
    /// Forwarded; once TLS starts the gateway stops parsing and copies bytes.
    Passthrough,
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
}

/// A configuration error, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line, 0 when unknown.
    pub line: usize,
    /// 1-based column, 0 when unknown.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// All errors found in one file (at least one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

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

/// A rule file is written by hand; anything bigger is a mistake, and the
/// limit keeps a hostile file from costing much memory before validation.
pub const MAX_FILE_BYTES: usize = 1 << 20;

/// Errors located beyond this many cost one extra parse each, so a file full
/// of mistakes reports the first ones and a count.
const MAX_LOCATED_ERRORS: usize = 50;

impl Config {
    /// Reads and validates a rule file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        use std::io::Read;
        let whole_file = |message: String| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                message,
            }])
        };
        let file =
            std::fs::File::open(path).map_err(|e| whole_file(format!("cannot open: {e}")))?;
        let mut bytes = Vec::new();
        // Read one byte past the limit so an oversized file is detected
        // without reading all of it.
        file.take(MAX_FILE_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| whole_file(format!("cannot read: {e}")))?;
        if bytes.len() > MAX_FILE_BYTES {
            return Err(whole_file(too_large()));
        }
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
                let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                let column = String::from_utf8_lossy(&valid[line_start..])
                    .chars()
                    .count()
                    + 1;
                return Err(ConfigErrors(vec![ConfigError {
                    file: path.to_path_buf(),
                    line,
                    column,
                    message: "the file is not valid UTF-8".to_string(),
                }]));
            }
        };
        Config::parse(&text, path)
    }

    /// Validates YAML text; `path` is used in messages only.
    ///
    /// Structural problems (YAML syntax, an unknown key, a list where a
    /// value belongs) stop at the first one, located by the YAML parser.
    /// Every other mistake is collected, so one run of `ftpgate check`
    /// lists them all.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        let error = |line, column, message| ConfigError {
            file: path.to_path_buf(),
            line,
            column,
            message,
        };
        if text.len() > MAX_FILE_BYTES {
            return Err(ConfigErrors(vec![error(0, 0, too_large())]));
        }
        let raw = match serde_yaml::from_str::<Option<RawConfig>>(text) {
            Ok(Some(raw)) => raw,
            Ok(None) => {
                return Err(ConfigErrors(vec![error(
                    1,
                    1,
                    "the file is empty: a rule file needs `listeners` and `rules`".to_string(),
                )]))
            }
            Err(e) => {
                let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
                let mut message = yaml_message(&e);
                // libyaml reads `::` after `[` or `,` as a broken key, so an
                // unquoted IPv6 network such as `[0.0.0.0/0, ::/0]` fails.
                let source_line = text.lines().nth(line.saturating_sub(1)).unwrap_or("");
                if message.contains("while parsing a flow") && source_line.contains("::") {
                    message.push_str(
                        "; inside [ ], quote IPv6 addresses that start with `::`, e.g. \"::/0\"",
                    );
                }
                return Err(ConfigErrors(vec![error(line, column, message)]));
            }
        };
        let mut check = Check::default();
        let config = check.config(&raw, path);
        if check.errors.is_empty() {
            return Ok(config);
        }
        let total = check.errors.len();
        let mut errors: Vec<ConfigError> = check
            .errors
            .into_iter()
            .take(MAX_LOCATED_ERRORS)
            .map(|(at, message)| {
                let (line, column) = locate(text, &at);
                error(line, column, message)
            })
            .collect();
        errors.sort_by_key(|e| (e.line, e.column));
        if total > MAX_LOCATED_ERRORS {
            errors.push(error(
                0,
                0,
                format!("{} more errors not shown", total - MAX_LOCATED_ERRORS),
            ));
        }
        Err(ConfigErrors(errors))
    }

    /// The effective configuration, defaults filled in, as YAML in the
    /// rule-file schema (what `ftpgate check` prints).
    ///
    /// `Config::parse` of the result gives back an equal `Config` (durations
    /// below a millisecond, which no rule file can express, are rounded up).
    pub fn to_yaml(&self) -> String {
        let out = OutConfig {
            listeners: self
                .listeners
                .iter()
                .map(|l| {
                    let (mode, upstream, announce) = match &l.mode {
                        ListenerMode::Reverse { upstream, announce } => (
                            "reverse",
                            Some(upstream.to_string()),
                            announce.map(|a| a.to_string()),
                        ),
                        ListenerMode::Transparent => ("transparent", None, None),
                    };
                    OutListener {
                        name: l.name.clone(),
                        listen: l.listen.to_string(),
                        mode,
                        upstream,
                        announce,
                    }
                })
                .collect(),
            data: OutData {
                backend: match self.data.backend {
                    BackendKind::Relay => "relay",
                    BackendKind::Nftables => "nftables",
                },
                client_ports: self.data.client_ports.to_string(),
                server_ports: self.data.server_ports.to_string(),
                pinhole_timeout: format_duration(self.data.pinhole_timeout),
                nftables_table: self.data.nftables_table.clone(),
                max_ports_per_client: self.data.max_ports_per_client.to_string(),
            },
            limits: OutLimits {
                max_sessions: self.limits.max_sessions,
                max_sessions_per_client: self.limits.max_sessions_per_client,
                idle_timeout: format_duration(self.limits.idle_timeout),
                connect_timeout: format_duration(self.limits.connect_timeout),
            },
            rules: self
                .rules
                .iter()
                .map(|r| OutRule {
                    name: r.name.clone(),
                    clients: r.clients.iter().map(ToString::to_string).collect(),
                    servers: r.servers.iter().map(ToString::to_string).collect(),
                    action: match r.action {
                        Action::Allow => "allow",
                        Action::Deny => "deny",
                    },
                    modes: r
                        .modes
                        .iter()
                        .map(|m| match m {
                            DataMode::Passive => "passive",
                            DataMode::Active => "active",
                        })
                        .collect(),
                    server_mode: match r.server_mode {
                        ServerMode::Same => "same",
                        ServerMode::Passive => "passive",
                        ServerMode::Active => "active",
                    },
                    data_ports: r.data_ports.to_string(),
                    tls: match r.tls {
                        TlsPolicy::Refuse => "refuse",
                        TlsPolicy::Passthrough => "passthrough",
                    },
                    deny_commands: r.deny_commands.clone(),
                })
                .collect(),
            metrics: self.metrics.as_ref().map(|m| OutMetrics {
                listen: m.listen.to_string(),
            }),
            audit: self.audit.as_ref().map(|a| OutAudit {
                path: match &a.path {
                    AuditTarget::Stdout => "-".to_string(),
                    AuditTarget::File(p) => p.display().to_string(),
                },
            }),
        };
        // Plain strings, numbers and lists cannot fail to serialise; the
        // fallback keeps this total anyway.
        let yaml =
            serde_yaml::to_string(&out).unwrap_or_else(|e| format!("# cannot serialise: {e}\n"));
        // What the share comes to in each pool, as a comment: the operator
        // sees the figure the gateway enforces, and the YAML still loads.
        let d = &self.data;
        let share = d.max_ports_per_client;
        let key = format!("  max_ports_per_client: {share}\n");
        let note = format!(
            "  max_ports_per_client: {share} # per client address: {} of {} client ports, {} of {} server ports\n",
            share.of(d.client_ports.len()),
            d.client_ports.len(),
            share.of(d.server_ports.len()),
            d.server_ports.len()
        );
        yaml.replacen(&key, &note, 1)
    }
}

/// True when connecting to `upstream` reaches a socket bound to `listen`:
/// the same address, or a loopback address of the family of a listener
/// bound to every address (an IPv6 listener is v6-only).
fn reaches(upstream: SocketAddr, listen: SocketAddr) -> bool {
    let (to, at) = (upstream.ip().to_canonical(), listen.ip());
    upstream.port() == listen.port()
        && (to == at.to_canonical()
            || (at.is_unspecified() && to.is_loopback() && to.is_ipv4() == at.is_ipv4()))
}

fn too_large() -> String {
    format!(
        "the file is larger than {} KiB; a rule file is never that big",
        MAX_FILE_BYTES / 1024
    )
}

/// serde_yaml's message without its trailing " at line L column C", which
/// `ConfigError` already carries.
fn yaml_message(e: &serde_yaml::Error) -> String {
    let text = e.to_string();
    match e.location() {
        Some(l) => text.replacen(
            &format!(" at line {} column {}", l.line(), l.column()),
            "",
            1,
        ),
        None => text,
    }
}

// ---------------------------------------------------------------------------
// Raw file shape: what serde reads. Leaves are kept as text so that every
// bad value can be reported, not only the first one serde would stop at.

/// A key that may be absent, present with no value (`key:`), or set. An empty
/// value is an error rather than the default: `clients:` with the list
/// forgotten must not mean "any client".
#[derive(Debug, Default)]
enum Field<T> {
    #[default]
    Absent,
    Null,
    Set(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Field<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(d)? {
            None => Field::Null,
            Some(v) => Field::Set(v),
        })
    }
}

/// A scalar as written. YAML may resolve `21` to a number and `yes` to a
/// string; validation parses the text either way.
#[derive(Debug)]
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a single value (text or number)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `listeners`, `data`, `limits` and `rules`"
)]
struct RawConfig {
    #[serde(default)]
    listeners: Field<Vec<RawListener>>,
    #[serde(default)]
    data: Field<RawData>,
    #[serde(default)]
    limits: Field<RawLimits>,
    #[serde(default)]
    rules: Field<Vec<RawRule>>,
    #[serde(default)]
    metrics: Field<RawMetrics>,
    #[serde(default)]
    audit: Field<RawAudit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping (the `metrics` section)")]
struct RawMetrics {
    #[serde(default)]
    listen: Field<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping (the `audit` section)")]
struct RawAudit {
    #[serde(default)]
    path: Field<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a listener: a mapping with `name`, `listen`, `mode`, ..."
)]
struct RawListener {
    #[serde(default)]
    name: Field<Text>,
    #[serde(default)]
    listen: Field<Text>,
    #[serde(default)]
    mode: Field<Text>,
    #[serde(default)]
    upstream: Field<Text>,
    #[serde(default)]
    announce: Field<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping (the `data` section)")]
struct RawData {
    #[serde(default)]
    backend: Field<Text>,
    #[serde(default)]
    client_ports: Field<Text>,
    #[serde(default)]
    server_ports: Field<Text>,
    #[serde(default)]
    pinhole_timeout: Field<Text>,
    #[serde(default)]
    nftables_table: Field<Text>,
    #[serde(default)]
    max_ports_per_client: Field<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping (the `limits` section)")]
struct RawLimits {
    #[serde(default)]
    max_sessions: Field<Text>,
    #[serde(default)]
    max_sessions_per_client: Field<Text>,
    #[serde(default)]
    idle_timeout: Field<Text>,
    #[serde(default)]
    connect_timeout: Field<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a rule: a mapping with `name`, `clients`, `servers`, `action`, ..."
)]
struct RawRule {
    #[serde(default)]
    name: Field<Text>,
    #[serde(default)]
    clients: Field<Vec<Text>>,
    #[serde(default)]
    servers: Field<Vec<Text>>,
    #[serde(default)]
    action: Field<Text>,
    #[serde(default)]
    modes: Field<Vec<Text>>,
    #[serde(default)]
    server_mode: Field<Text>,
    #[serde(default)]
    data_ports: Field<Text>,
    #[serde(default)]
    tls: Field<Text>,
    #[serde(default)]
    deny_commands: Field<Vec<Text>>,
}

// The effective configuration as printed: every key present.

#[derive(Serialize)]
struct OutConfig {
    listeners: Vec<OutListener>,
    data: OutData,
    limits: OutLimits,
    rules: Vec<OutRule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<OutMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    audit: Option<OutAudit>,
}

#[derive(Serialize)]
struct OutMetrics {
    listen: String,
}

#[derive(Serialize)]
struct OutAudit {
    path: String,
}

#[derive(Serialize)]
struct OutListener {
    name: String,
    listen: String,
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    announce: Option<String>,
}

#[derive(Serialize)]
struct OutData {
    backend: &'static str,
    client_ports: String,
    server_ports: String,
    pinhole_timeout: String,
    nftables_table: String,
    max_ports_per_client: String,
}

#[derive(Serialize)]
struct OutLimits {
    max_sessions: usize,
    max_sessions_per_client: usize,
    idle_timeout: String,
    connect_timeout: String,
}

#[derive(Serialize)]
struct OutRule {
    name: String,
    clients: Vec<String>,
    servers: Vec<String>,
    action: &'static str,
    modes: Vec<&'static str>,
    server_mode: &'static str,
    data_ports: String,
    tls: &'static str,
    deny_commands: Vec<String>,
}

// ---------------------------------------------------------------------------
// Validation: raw → runtime types, collecting (path, message) pairs. Paths
// are turned into line:column only when there are errors.

/// One step of a path into the document: a mapping key or a list index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg {
    Key(&'static str),
    Index(usize),
}

impl From<&'static str> for Seg {
    fn from(k: &'static str) -> Self {
        Seg::Key(k)
    }
}

impl From<usize> for Seg {
    fn from(i: usize) -> Self {
        Seg::Index(i)
    }
}

fn at(path: &[Seg], seg: impl Into<Seg>) -> Vec<Seg> {
    let mut p = path.to_vec();
    p.push(seg.into());
    p
}

#[derive(Default)]
struct Check {
    errors: Vec<(Vec<Seg>, String)>,
}

impl Check {
    fn err(&mut self, path: &[Seg], message: impl Into<String>) {
        self.errors.push((path.to_vec(), message.into()));
    }

    /// The value of an optional key. `Err` after reporting an empty value.
    fn field<'a, T>(
        &mut self,
        f: &'a Field<T>,
        path: &[Seg],
        key: &'static str,
    ) -> Result<Option<&'a T>, ()> {
        match f {
            Field::Absent => Ok(None),
            Field::Null => {
                self.err(
                    &at(path, key),
                    format!("`{key}` has no value: give one, or remove the key"),
                );
                Err(())
            }
            Field::Set(v) => Ok(Some(v)),
        }
    }

    /// An optional scalar, parsed. `Err` after reporting why it is unusable.
    fn optional<T>(
        &mut self,
        f: &Field<Text>,
        path: &[Seg],
        key: &'static str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ()> {
        let Some(text) = self.field(f, path, key)? else {
            return Ok(None);
        };
        match parse(&text.0) {
            Ok(v) => Ok(Some(v)),
            Err(message) => {
                self.err(&at(path, key), format!("{key}: {message}"));
                Err(())
            }
        }
    }

    /// A scalar with a default; `None` after reporting an error.
    fn value<T>(
        &mut self,
        f: &Field<Text>,
        path: &[Seg],
        key: &'static str,
        default: T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        self.optional(f, path, key, parse)
            .ok()
            .map(|v| v.unwrap_or(default))
    }

    /// A scalar that must be present; `missing` says what it is for.
    fn required<T>(
        &mut self,
        f: &Field<Text>,
        path: &[Seg],
        key: &'static str,
        missing: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        match self.optional(f, path, key, parse) {
            Ok(Some(v)) => Some(v),
            Ok(None) => {
                self.err(path, format!("missing `{key}`: {missing}"));
                None
            }
            Err(()) => None,
        }
    }

    /// A list of scalars with a default; an empty list is an error because
    /// it would match or allow nothing, which is never what was meant.
    fn list<T>(
        &mut self,
        f: &Field<Vec<Text>>,
        path: &[Seg],
        key: &'static str,
        allow_empty: bool,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<Vec<T>>, ()> {
        let Some(items) = self.field(f, path, key)? else {
            return Ok(None);
        };
        let key_path = at(path, key);
        if items.is_empty() && !allow_empty {
            self.err(
                &key_path,
                format!("`{key}` is an empty list; remove the key for the default"),
            );
            return Err(());
        }
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match parse(&item.0) {
                Ok(v) => out.push(v),
                Err(message) => {
                    self.err(&at(&key_path, i), format!("{key}: {message}"));
                    ok = false;
                }
            }
        }
        if ok {
            Ok(Some(out))
        } else {
            Err(())
        }
    }

    /// A top-level list that must be present and non-empty; reports
    /// `missing` or empty with `why` otherwise.
    fn required_list<'a, T>(
        &mut self,
        f: &'a Field<Vec<T>>,
        key: &'static str,
        why: &str,
    ) -> Option<&'a [T]> {
        match self.field(f, &[], key) {
            Ok(Some(list)) if list.is_empty() => {
                self.err(&[Seg::Key(key)], format!("`{key}` is empty: {why}"));
                None
            }
            Ok(Some(list)) => Some(list),
            Ok(None) => {
                self.err(&[], format!("missing `{key}`: {why}"));
                None
            }
            Err(()) => None,
        }
    }

    fn config(&mut self, raw: &RawConfig, path: &Path) -> Config {
        let root: &[Seg] = &[];
        let listeners = self
            .required_list(
                &raw.listeners,
                "listeners",
                "at least one listener is required",
            )
            .map_or_else(Vec::new, |list| self.listeners(list));
        let data = match self.field(&raw.data, root, "data") {
            Ok(Some(d)) => self.data(d),
            _ => DataConfig::default(),
        };
        let limits = match self.field(&raw.limits, root, "limits") {
            Ok(Some(l)) => self.limits(l),
            _ => Limits::default(),
        };
        let rules = self
            .required_list(&raw.rules, "rules", "with no rule every session is refused")
            .map_or_else(Vec::new, |list| self.rules(list));
        let metrics = match self.field(&raw.metrics, root, "metrics") {
            Ok(Some(m)) => self.metrics(m),
            _ => None,
        };
        let audit = match self.field(&raw.audit, root, "audit") {
            Ok(Some(a)) => self.audit(a),
            _ => None,
        };
        Config {
            path: path.to_path_buf(),
            listeners,
            data,
            limits,
            rules,
            metrics,
            audit,
        }
    }

    fn listeners(&mut self, raw: &[RawListener]) -> Vec<Listener> {
        let mut out: Vec<Listener> = Vec::with_capacity(raw.len());
        // The file's index of each listener in `out`, to locate errors found
        // once all are known.
        let mut index = Vec::with_capacity(raw.len());
        for (i, r) in raw.iter().enumerate() {
            let path = [Seg::Key("listeners"), Seg::Index(i)];
            let name = self.required(
                &r.name,
                &path,
                "name",
                "a listener needs a name for logs",
                parse_name,
            );
            let listen = self.required(
                &r.listen,
                &path,
                "listen",
                "the address to bind, e.g. 0.0.0.0:21",
                |s| parse_socket_addr(s, true),
            );
            let kind = self.required(&r.mode, &path, "mode", "reverse or transparent", |s| {
                parse_enum(s, &[("reverse", true), ("transparent", false)])
            });
            let upstream = self.optional(&r.upstream, &path, "upstream", |s| {
                parse_socket_addr(s, false)
            });
            let announce = self.optional(&r.announce, &path, "announce", parse_announce);
            let mode = match (kind, upstream, announce) {
                (Some(true), Ok(Some(upstream)), Ok(announce)) => {
                    Some(ListenerMode::Reverse { upstream, announce })
                }
                (Some(true), Ok(None), _) => {
                    self.err(
                        &at(&path, "mode"),
                        "a reverse listener needs `upstream`, the FTP server's address:port",
                    );
                    None
                }
                (Some(false), upstream, announce) => {
                    if !matches!(r.upstream, Field::Absent) && upstream.is_ok() {
                        self.err(
                            &at(&path, "upstream"),
                            "a transparent listener takes no `upstream`: its server is the original destination of each intercepted connection",
                        );
                    }
                    if !matches!(r.announce, Field::Absent) && announce.is_ok() {
                        self.err(
                            &at(&path, "announce"),
                            "`announce` applies to reverse listeners only: a transparent listener announces the server's own address",
                        );
                    }
                    Some(ListenerMode::Transparent)
                }
                _ => None,
            };
            if let Some(name) = &name {
                if let Some(first) = out.iter().position(|l| &l.name == name) {
                    self.err(
                        &at(&path, "name"),
                        format!(
                            "listener name `{name}` is already used by listener {}",
                            first + 1
                        ),
                    );
                }
            }
            if let Some(listen) = listen {
                if let Some(other) = out
                    .iter()
                    .find(|l| l.listen == listen && listen.port() != 0)
                {
                    self.err(
                        &at(&path, "listen"),
                        format!(
                            "{listen} is already the address of listener `{}`",
                            other.name
                        ),
                    );
                }
            }
            if let (Some(name), Some(listen), Some(mode)) = (name, listen, mode) {
                out.push(Listener { name, listen, mode });
                index.push(i);
            }
        }
        // Each session would connect back to the gateway, which opens
        // another, until the session limits end it.
        for (l, &i) in out.iter().zip(&index) {
            let ListenerMode::Reverse { upstream, .. } = l.mode else {
                continue;
            };
            if let Some(own) = out.iter().find(|o| reaches(upstream, o.listen)) {
                self.err(
                    &[Seg::Key("listeners"), Seg::Index(i), Seg::Key("upstream")],
                    format!(
                        "upstream {upstream} is the gateway's own listener `{}` ({}): every session would connect back to the gateway (a loop)",
                        own.name, own.listen
                    ),
                );
            }
        }
        out
    }

    fn data(&mut self, raw: &RawData) -> DataConfig {
        let path = [Seg::Key("data")];
        let d = DataConfig::default();
        let backend = self.value(&raw.backend, &path, "backend", d.backend, |s| {
            parse_enum(
                s,
                &[
                    ("relay", BackendKind::Relay),
                    ("nftables", BackendKind::Nftables),
                ],
            )
        });
        let client_ports = self.value(
            &raw.client_ports,
            &path,
            "client_ports",
            d.client_ports,
            parse_pool_range,
        );
        let server_ports = self.value(
            &raw.server_ports,
            &path,
            "server_ports",
            d.server_ports,
            parse_pool_range,
        );
        if let (Some(c), Some(s)) = (client_ports, server_ports) {
            if c.lo <= s.hi && s.lo <= c.hi {
                // Point at whichever the operator wrote, the later one if both.
                let key = if matches!(raw.server_ports, Field::Set(_)) {
                    "server_ports"
                } else {
                    "client_ports"
                };
                self.err(
                    &at(&path, key),
                    format!("client_ports {c} and server_ports {s} overlap; the two pools must be disjoint"),
                );
            }
        }
        let pinhole_timeout = self.value(
            &raw.pinhole_timeout,
            &path,
            "pinhole_timeout",
            d.pinhole_timeout,
            parse_duration,
        );
        let nftables_table = self.value(
            &raw.nftables_table,
            &path,
            "nftables_table",
            d.nftables_table.clone(),
            parse_table,
        );
        let max_ports_per_client = self.value(
            &raw.max_ports_per_client,
            &path,
            "max_ports_per_client",
            d.max_ports_per_client,
            parse_share,
        );
        DataConfig {
            backend: backend.unwrap_or(d.backend),
            client_ports: client_ports.unwrap_or(d.client_ports),
            server_ports: server_ports.unwrap_or(d.server_ports),
            pinhole_timeout: pinhole_timeout.unwrap_or(d.pinhole_timeout),
            nftables_table: nftables_table.unwrap_or(d.nftables_table),
            max_ports_per_client: max_ports_per_client.unwrap_or(d.max_ports_per_client),
        }
    }

    fn metrics(&mut self, raw: &RawMetrics) -> Option<MetricsConfig> {
        let listen = self.required(
            &raw.listen,
            &[Seg::Key("metrics")],
            "listen",
            "the address of the Prometheus endpoint, e.g. 127.0.0.1:9121",
            |s| parse_socket_addr(s, true),
        )?;
        Some(MetricsConfig { listen })
    }

    fn audit(&mut self, raw: &RawAudit) -> Option<AuditConfig> {
        let path = self.required(
            &raw.path,
            &[Seg::Key("audit")],
            "path",
            "a file to append to, or \"-\" for standard output",
            parse_audit_target,
        )?;
        Some(AuditConfig { path })
    }

    fn limits(&mut self, raw: &RawLimits) -> Limits {
        let path = [Seg::Key("limits")];
        let d = Limits::default();
        let max = self.value(
            &raw.max_sessions,
            &path,
            "max_sessions",
            d.max_sessions,
            parse_count,
        );
        let per_client = self.value(
            &raw.max_sessions_per_client,
            &path,
            "max_sessions_per_client",
            d.max_sessions_per_client,
            parse_count,
        );
        if let (Some(max), Some(per_client)) = (max, per_client) {
            if per_client > max {
                if matches!(raw.max_sessions_per_client, Field::Set(_)) {
                    self.err(
                        &at(&path, "max_sessions_per_client"),
                        format!("max_sessions_per_client {per_client} is above max_sessions {max}"),
                    );
                } else {
                    self.err(
                        &at(&path, "max_sessions"),
                        format!("max_sessions {max} is below max_sessions_per_client ({per_client}, the default); set that too"),
                    );
                }
            }
        }
        let idle = self.value(
            &raw.idle_timeout,
            &path,
            "idle_timeout",
            d.idle_timeout,
            parse_duration,
        );
        let connect = self.value(
            &raw.connect_timeout,
            &path,
            "connect_timeout",
            d.connect_timeout,
            parse_duration,
        );
        Limits {
            max_sessions: max.unwrap_or(d.max_sessions),
            max_sessions_per_client: per_client.unwrap_or(d.max_sessions_per_client),
            idle_timeout: idle.unwrap_or(d.idle_timeout),
            connect_timeout: connect.unwrap_or(d.connect_timeout),
        }
    }

    fn rules(&mut self, raw: &[RawRule]) -> Vec<Rule> {
        let mut out: Vec<Rule> = Vec::with_capacity(raw.len());
        for (i, r) in raw.iter().enumerate() {
            let path = [Seg::Key("rules"), Seg::Index(i)];
            let Some(name) = self.required(
                &r.name,
                &path,
                "name",
                "a rule needs a name for logs",
                parse_name,
            ) else {
                continue;
            };
            if let Some(first) = out.iter().position(|o| o.name == name) {
                self.err(
                    &at(&path, "name"),
                    format!("rule name `{name}` is already used by rule {}", first + 1),
                );
            }
            let d = Rule::new(name);
            let clients = self.list(&r.clients, &path, "clients", false, parse_cidr);
            let servers = self.list(&r.servers, &path, "servers", false, parse_cidr);
            let action = self.value(&r.action, &path, "action", d.action, |s| {
                parse_enum(s, &[("allow", Action::Allow), ("deny", Action::Deny)])
            });
            let modes = self.list(&r.modes, &path, "modes", false, |s| {
                parse_enum(
                    s,
                    &[("passive", DataMode::Passive), ("active", DataMode::Active)],
                )
            });
            if let Ok(Some(modes)) = &modes {
                if modes
                    .iter()
                    .enumerate()
                    .any(|(i, m)| modes[..i].contains(m))
                {
                    self.err(
                        &at(&path, "modes"),
                        "modes: list each of passive and active at most once",
                    );
                }
            }
            let server_mode =
                self.value(&r.server_mode, &path, "server_mode", d.server_mode, |s| {
                    parse_enum(
                        s,
                        &[
                            ("same", ServerMode::Same),
                            ("passive", ServerMode::Passive),
                            ("active", ServerMode::Active),
                        ],
                    )
                });
            let data_ports = self.value(
                &r.data_ports,
                &path,
                "data_ports",
                d.data_ports,
                parse_range,
            );
            let tls = self.value(&r.tls, &path, "tls", d.tls, |s| {
                parse_enum(
                    s,
                    &[
                        ("refuse", TlsPolicy::Refuse),
                        ("passthrough", TlsPolicy::Passthrough),
                    ],
                )
            });
            let deny_commands =
                self.list(&r.deny_commands, &path, "deny_commands", true, parse_verb);
            if let Ok(Some(verbs)) = &deny_commands {
                for (j, v) in verbs.iter().enumerate() {
                    if verbs[..j].contains(v) {
                        self.err(
                            &at(&at(&path, "deny_commands"), j),
                            format!("deny_commands: `{v}` is listed twice"),
                        );
                    }
                }
            }
            out.push(Rule {
                clients: clients.ok().flatten().unwrap_or(d.clients),
                servers: servers.ok().flatten().unwrap_or(d.servers),
                action: action.unwrap_or(d.action),
                modes: modes.ok().flatten().unwrap_or(d.modes),
                server_mode: server_mode.unwrap_or(d.server_mode),
                data_ports: data_ports.unwrap_or(d.data_ports),
                tls: tls.unwrap_or(d.tls),
                deny_commands: deny_commands.ok().flatten().unwrap_or(d.deny_commands),
                name: d.name,
            });
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Value parsers: text → typed value, or a message that says how to fix it.

fn parse_enum<T: Copy>(s: &str, table: &[(&str, T)]) -> Result<T, String> {
    table
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
            format!("unknown value `{s}`, expected one of: {}", names.join(", "))
        })
}

/// `-` is standard output; anything else a file path.
fn parse_audit_target(s: &str) -> Result<AuditTarget, String> {
    if s == "-" {
        Ok(AuditTarget::Stdout)
    } else if s.trim().is_empty() {
        Err("the path is blank".to_string())
    } else if s.chars().any(char::is_control) {
        Err("the path contains a control character".to_string())
    } else {
        Ok(AuditTarget::File(PathBuf::from(s)))
    }
}

/// Names appear in log lines, so control characters (a newline could forge
/// a log entry) are refused.
fn parse_name(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("the name is blank".to_string())
    } else if s.chars().any(char::is_control) {
        Err("the name contains a control character".to_string())
    } else {
        Ok(s.to_string())
    }
}

/// `10.0.0.0/24`, `2001:db8::/32`, or one address. IPv4-mapped IPv6
/// networks become IPv4 ones, because client and server addresses are
/// matched in their IPv4 form.
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    let net = match t.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match t.parse::<IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => {
                return Err(format!(
                    "`{s}` is not a CIDR such as 10.0.0.0/24 or 2001:db8::/32, nor an address"
                ))
            }
        },
    };
    Ok(unmap_net(net))
}

fn unmap_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, n.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

/// `192.0.2.1:21` or `[2001:db8::1]:21`. Port 0 is allowed only where the
/// kernel picks the port (a listen address in tests).
fn parse_socket_addr(s: &str, port0_ok: bool) -> Result<SocketAddr, String> {
    let t = s.trim();
    match t.parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 && !port0_ok => Err(format!("`{s}` has port 0")),
        Ok(a) if !port0_ok && a.ip().is_unspecified() => {
            Err(format!("`{s}` is not a concrete address to connect to"))
        }
        Ok(a) => Ok(a),
        Err(_) => Err(match t.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => format!("`{s}` has no port; write e.g. {ip}:21"),
            Ok(IpAddr::V6(ip)) => format!("`{s}` has no port; write e.g. [{ip}]:21"),
            Err(_) if t.matches(':').count() > 1 && !t.starts_with('[') => {
                format!("`{s}`: an IPv6 address needs brackets, e.g. [2001:db8::1]:21")
            }
            Err(_) => format!(
                "`{s}` is not address:port such as 192.0.2.1:21 or [2001:db8::1]:21 (host names are not resolved)"
            ),
        }),
    }
}

fn parse_announce(s: &str) -> Result<IpAddr, String> {
    match s.trim().parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => Err(format!("`{s}` cannot be announced to clients")),
        Ok(ip) => Ok(ip),
        Err(_) => Err(format!(
            "`{s}` is not an IP address (no port: the data port is chosen per transfer)"
        )),
    }
}

/// `lo-hi` or a single port `n`; 1 ≤ lo ≤ hi ≤ 65535.
fn parse_range(s: &str) -> Result<PortRange, String> {
    let t = s.trim();
    let (lo, hi) = match t.split_once('-') {
        Some((lo, hi)) => (lo.trim(), hi.trim()),
        None => (t, t),
    };
    let port = |p: &str| -> Result<u16, String> {
        match p.parse::<u32>() {
            Ok(0) => Err(format!("`{s}`: port 0 is not a usable port")),
            Ok(n) => u16::try_from(n).map_err(|_| format!("`{s}`: port {n} is above 65535")),
            Err(_) => Err(format!(
                "`{s}` is not a port range such as 40000-40999, or a single port"
            )),
        }
    };
    let (lo, hi) = (port(lo)?, port(hi)?);
    if lo > hi {
        return Err(format!("`{s}` is reversed; write {hi}-{lo}"));
    }
    Ok(PortRange { lo, hi })
}

/// A pool of gateway ports: a range of unprivileged ports. A pinhole below
/// 1024 would be a port that only root may bind, and one an ALG must never
/// open (the kernel helper's known fault).
fn parse_pool_range(s: &str) -> Result<PortRange, String> {
    let r = parse_range(s)?;
    if r.lo < 1024 {
        return Err(format!(
            "`{s}` includes ports below 1024; pools must be within 1024-65535"
        ));
    }
    Ok(r)
}

/// `16` (ports) or `25%` (of each pool); never zero, which would refuse
/// every data connection.
fn parse_share(s: &str) -> Result<PortShare, String> {
    let t = s.trim();
    let hint = "a number of ports such as 16, or a percentage of each pool such as 25%";
    if let Some(p) = t.strip_suffix('%') {
        return match p.trim().parse::<u8>() {
            Ok(p @ 1..=100) => Ok(PortShare::Percent(p)),
            _ => Err(format!("`{s}` is not a percentage from 1% to 100%")),
        };
    }
    match t.parse::<usize>() {
        Ok(0) => Err(format!(
            "`{s}` would refuse every data connection; write {hint}"
        )),
        Ok(n) => Ok(PortShare::Ports(n)),
        Err(_) => Err(format!("`{s}` is not {hint}")),
    }
}

/// `500ms`, `30s`, `15m`, `1h`; never zero, because every timeout in the
/// file would then fire at once.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let hint = "a number and a unit: 500ms, 30s, 15m or 1h";
    if digits.is_empty() {
        return Err(format!("`{s}` is not a duration; write {hint}"));
    }
    if unit.is_empty() {
        return Err(format!("`{s}` has no unit; write e.g. {digits}s ({hint})"));
    }
    let ms_per_unit: u64 = match unit.trim_start() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("`{s}` has an unknown unit; write {hint}")),
    };
    let ms = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(ms_per_unit))
        .ok_or_else(|| format!("`{s}` is too long"))?;
    if ms == 0 {
        return Err(format!("`{s}` is zero; a timeout must be longer than that"));
    }
    Ok(Duration::from_millis(ms))
}

/// The largest unit that states `d` exactly; sub-millisecond parts, which a
/// rule file cannot express, round up.
fn format_duration(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms != 0 && ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms != 0 && ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1_000 == 0 {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

fn parse_count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("0 would refuse every session; the least is 1".to_string()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

/// nft accepts more, but these characters need no quoting anywhere the
/// name is printed or passed on a command line.
fn parse_table(s: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{s}` is not 1-64 characters of A-Z, a-z, 0-9, `_` and `-`"
        ))
    }
}

/// An FTP verb, as it is compared: upper case.
fn parse_verb(s: &str) -> Result<String, String> {
    if (1..=16).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphabetic()) {
        Ok(s.to_ascii_uppercase())
    } else {
        Err(format!(
            "`{s}` is not an FTP command (1-16 letters, e.g. SITE)"
        ))
    }
}

// ---------------------------------------------------------------------------
// Locating a path. serde_yaml exposes no spans, but it stamps an error raised
// while a node is deserialised with that node's position. So to find a node,
// walk to it through a second parse and raise a marked error there.

const LOCATE_MARK: &str = "ftpgate-locate-mark";

/// 1-based (line, column) of the node at `path`, or of its nearest ancestor
/// that can be found; (0, 0) if none can.
fn locate(text: &str, path: &[Seg]) -> (usize, usize) {
    for len in (0..=path.len()).rev() {
        let seek = Seek(&path[..len]);
        if let Err(e) =
            de::DeserializeSeed::deserialize(seek, serde_yaml::Deserializer::from_str(text))
        {
            if e.to_string().contains(LOCATE_MARK) {
                if let Some(l) = e.location() {
                    return (l.line(), l.column());
                }
            }
        }
    }
    (0, 0)
}

struct Seek<'p>(&'p [Seg]);

impl<'de> de::DeserializeSeed<'de> for Seek<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        // Raise the error inside the node's own deserialize call, so it is
        // stamped with the node's position rather than its parent's.
        d.deserialize_any(self)
    }
}

impl Seek<'_> {
    fn arrived<E: de::Error>(&self) -> Result<(), E> {
        if self.0.is_empty() {
            Err(E::custom(LOCATE_MARK))
        } else {
            Ok(())
        }
    }
}

impl<'de> de::Visitor<'de> for Seek<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.arrived()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.arrived()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.arrived()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.arrived()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.arrived()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.arrived()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.arrived()
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Seg::Index(want), rest)) = self.0.split_first() else {
            return self.arrived();
        };
        let mut i = 0;
        loop {
            if i == *want {
                return seq.next_element_seed(Seek(rest)).map(|_| ());
            }
            if seq.next_element::<de::IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Seg::Key(want), rest)) = self.0.split_first() else {
            return self.arrived();
        };
        while let Some(key) = map.next_key::<KeyName>()? {
            if key.0.as_deref() == Some(*want) {
                return map.next_value_seed(Seek(rest));
            }
            map.next_value::<de::IgnoredAny>()?;
        }
        Ok(())
    }
}

/// A mapping key as text, or `None` for a key that is not a plain string.
struct KeyName(Option<String>);

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = KeyName;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a mapping key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyName, E> {
                Ok(KeyName(Some(v.to_string())))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<KeyName, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(KeyName(None))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<KeyName, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(KeyName(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HEAD: &str = "listeners:\n  - name: lo\n    listen: 127.0.0.1:2121\n    mode: reverse\n    upstream: 127.0.0.1:21\n";

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, Path::new("t.yaml"))
    }

    fn ok(text: &str) -> Config {
        match parse(text) {
            Ok(c) => c,
            Err(e) => panic!("expected a valid config, got:\n{e}\n--- in:\n{text}"),
        }
    }

    /// Each error as `line:column: message`.
    fn errors(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(ConfigErrors(errs)) => errs
                .iter()
                .map(|e| format!("{}:{}: {}", e.line, e.column, e.message))
                .collect(),
        }
    }

    #[test]
    fn minimal_file_gets_every_default() {
        let c = ok(&format!("{HEAD}rules:\n  - name: all\n"));
        assert_eq!(c.path, Path::new("t.yaml"));
        assert_eq!(
            c.listeners,
            vec![Listener {
                name: "lo".into(),
                listen: "127.0.0.1:2121".parse().unwrap(),
                mode: ListenerMode::Reverse {
                    upstream: "127.0.0.1:21".parse().unwrap(),
                    announce: None
                },
            }]
        );
        assert_eq!(c.data, DataConfig::default());
        assert_eq!(
            c.data.client_ports,
            PortRange {
                lo: 40000,
                hi: 40999
            }
        );
        assert_eq!(
            c.data.server_ports,
            PortRange {
                lo: 41000,
                hi: 41999
            }
        );
        assert_eq!(c.data.pinhole_timeout, Duration::from_secs(30));
        assert_eq!(c.data.nftables_table, "ftpgate");
        assert_eq!(c.data.backend, BackendKind::Relay);
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.limits.max_sessions, 10_000);
        assert_eq!(c.limits.max_sessions_per_client, 64);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(900));
        assert_eq!(c.limits.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.rules, vec![Rule::new("all")]);
        let r = &c.rules[0];
        assert_eq!(
            r.clients,
            vec![
                "0.0.0.0/0".parse::<IpNet>().unwrap(),
                "::/0".parse().unwrap()
            ]
        );
        assert_eq!(r.servers, r.clients);
        assert_eq!(r.action, Action::Allow);
        assert_eq!(r.modes, vec![DataMode::Passive, DataMode::Active]);
        assert_eq!(r.server_mode, ServerMode::Same);
        assert_eq!(
            r.data_ports,
            PortRange {
                lo: 1024,
                hi: 65535
            }
        );
        assert_eq!(r.tls, TlsPolicy::Refuse);
        assert!(r.deny_commands.is_empty());
    }

    #[test]
    fn design_example_parses() {
        let c = ok(r#"
listeners:
  - name: lan-out
    listen: 10.0.0.1:8021
    mode: transparent
  - name: public-ftp
    listen: 192.0.2.1:21
    mode: reverse
    upstream: 10.0.0.3:21
    announce: 192.0.2.1
data:
  backend: nftables
  client_ports: 40000-40999
  server_ports: 41000-41999
  pinhole_timeout: 500ms
  nftables_table: ftp_gate-1
limits:
  max_sessions: 100
  max_sessions_per_client: 100
  idle_timeout: 1h
  connect_timeout: 2m
rules:
  - name: lan clients
    clients: [10.0.0.0/24]
    servers: [0.0.0.0/0, "::/0"]
    action: allow
    modes: [active]
    server_mode: passive
    data_ports: 2121
    tls: passthrough
    deny_commands: [SITE, stor]
  - name: everyone else
    action: deny
"#);
        assert_eq!(c.listeners[0].mode, ListenerMode::Transparent);
        assert_eq!(
            c.listeners[1].mode,
            ListenerMode::Reverse {
                upstream: "10.0.0.3:21".parse().unwrap(),
                announce: Some("192.0.2.1".parse().unwrap()),
            }
        );
        assert_eq!(c.data.backend, BackendKind::Nftables);
        assert_eq!(c.data.pinhole_timeout, Duration::from_millis(500));
        assert_eq!(c.data.nftables_table, "ftp_gate-1");
        assert_eq!(c.limits.max_sessions, 100);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(3600));
        assert_eq!(c.limits.connect_timeout, Duration::from_secs(120));
        let r = &c.rules[0];
        assert_eq!(r.clients, vec!["10.0.0.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(r.modes, vec![DataMode::Active]);
        assert_eq!(r.server_mode, ServerMode::Passive);
        assert_eq!(r.data_ports, PortRange { lo: 2121, hi: 2121 });
        assert_eq!(r.tls, TlsPolicy::Passthrough);
        assert_eq!(r.deny_commands, vec!["SITE", "STOR"]);
        assert_eq!(c.rules[1].action, Action::Deny);
    }

    /// Input text, and the value or a part of the error message.
    type Case<T> = (&'static str, Result<T, &'static str>);

    #[test]
    fn durations() {
        let cases: &[Case<u64>] = &[
            ("500ms", Ok(500)),
            ("30s", Ok(30_000)),
            ("15m", Ok(900_000)),
            ("1h", Ok(3_600_000)),
            (" 2 s", Ok(2_000)),
            ("30", Err("has no unit; write e.g. 30s")),
            ("0s", Err("is zero")),
            ("0ms", Err("is zero")),
            ("1d", Err("unknown unit")),
            ("1.5s", Err("unknown unit")),
            ("1h30m", Err("unknown unit")),
            ("-1s", Err("is not a duration")),
            ("s", Err("is not a duration")),
            ("", Err("is not a duration")),
            ("99999999999999999999h", Err("too long")),
            ("18446744073709551615h", Err("too long")),
        ];
        for (text, want) in cases {
            match (parse_duration(text), want) {
                (Ok(d), Ok(ms)) => assert_eq!(d, Duration::from_millis(*ms), "{text:?}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{text:?}: {e}"),
                (got, _) => panic!("{text:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn durations_print_in_the_largest_exact_unit() {
        let cases = [
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(900), "15m"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_micros(1), "1ms"),
        ];
        for (d, want) in cases {
            assert_eq!(format_duration(d), want);
            assert_eq!(
                parse_duration(want).ok(),
                Some(d.max(Duration::from_millis(1)))
            );
        }
    }

    #[test]
    fn ranges() {
        let cases: &[Case<(u16, u16)>] = &[
            ("40000-40999", Ok((40000, 40999))),
            ("21", Ok((21, 21))),
            ("1-65535", Ok((1, 65535))),
            ("100 - 200", Ok((100, 200))),
            ("7-7", Ok((7, 7))),
            ("0-100", Err("port 0")),
            ("0", Err("port 0")),
            ("200-100", Err("is reversed; write 100-200")),
            ("1-65536", Err("above 65535")),
            ("1-", Err("not a port range")),
            ("-5", Err("not a port range")),
            ("a-b", Err("not a port range")),
            ("1-2-3", Err("not a port range")),
            ("", Err("not a port range")),
        ];
        for (text, want) in cases {
            match (parse_range(text), want) {
                (Ok(r), Ok((lo, hi))) => assert_eq!((r.lo, r.hi), (*lo, *hi), "{text:?}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{text:?}: {e}"),
                (got, _) => panic!("{text:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn addresses_and_networks() {
        let sockets: &[(&str, bool, Result<&str, &str>)] = &[
            ("192.0.2.1:21", false, Ok("192.0.2.1:21")),
            ("[2001:db8::1]:21", false, Ok("[2001:db8::1]:21")),
            ("127.0.0.1:0", true, Ok("127.0.0.1:0")),
            ("0.0.0.0:21", true, Ok("0.0.0.0:21")),
            ("127.0.0.1:0", false, Err("port 0")),
            ("0.0.0.0:21", false, Err("not a concrete address")),
            ("192.0.2.1", false, Err("no port; write e.g. 192.0.2.1:21")),
            (
                "2001:db8::1",
                false,
                Err("no port; write e.g. [2001:db8::1]:21"),
            ),
            (
                "2001:db8::1:21",
                true,
                Err("no port; write e.g. [2001:db8::1:21]:21"),
            ),
            ("2001:db8::1:x", true, Err("needs brackets")),
            (
                "ftp.example.com:21",
                false,
                Err("host names are not resolved"),
            ),
            ("192.0.2.1:65536", false, Err("not address:port")),
        ];
        for (text, port0, want) in sockets {
            match (parse_socket_addr(text, *port0), want) {
                (Ok(a), Ok(w)) => assert_eq!(a.to_string(), *w),
                (Err(e), Err(w)) => assert!(e.contains(w), "{text:?}: {e}"),
                (got, _) => panic!("{text:?}: got {got:?}, want {want:?}"),
            }
        }
        let nets: &[(&str, Option<&str>)] = &[
            ("10.0.0.0/8", Some("10.0.0.0/8")),
            ("10.0.0.5", Some("10.0.0.5/32")),
            ("2001:db8::/32", Some("2001:db8::/32")),
            ("::1", Some("::1/128")),
            ("::ffff:10.0.0.0/104", Some("10.0.0.0/8")),
            ("::ffff:0:0/96", Some("0.0.0.0/0")),
            ("::/0", Some("::/0")),
            ("10.0.0.0/33", None),
            ("10.0.0/8", None),
            ("any", None),
            ("", None),
        ];
        for (text, want) in nets {
            let got = parse_cidr(text).ok().map(|n| n.to_string());
            assert_eq!(got.as_deref(), *want, "{text:?}");
        }
        assert!(parse_announce("0.0.0.0").is_err());
        assert!(parse_announce("192.0.2.1:21").is_err());
        assert_eq!(
            parse_announce("2001:db8::1").ok(),
            "2001:db8::1".parse().ok()
        );
    }

    #[test]
    fn names_tables_verbs_counts() {
        assert!(parse_name("lan clients").is_ok());
        assert!(parse_name("ünïcode ok").is_ok());
        assert!(parse_name("  ").is_err());
        assert!(parse_name("two\nlines").is_err());
        assert_eq!(parse_table("ftpgate").ok().as_deref(), Some("ftpgate"));
        assert!(parse_table("ftp_gate-2").is_ok());
        assert!(parse_table(&"a".repeat(64)).is_ok());
        assert!(parse_table(&"a".repeat(65)).is_err());
        assert!(parse_table("").is_err());
        assert!(parse_table("ftp gate").is_err());
        assert!(parse_table("ftp;flush").is_err());
        assert_eq!(parse_verb("site").ok().as_deref(), Some("SITE"));
        assert!(parse_verb(&"A".repeat(16)).is_ok());
        assert!(parse_verb(&"A".repeat(17)).is_err());
        assert!(parse_verb("").is_err());
        assert!(parse_verb("SITE CHMOD").is_err());
        assert!(parse_verb("X1").is_err());
        assert_eq!(parse_count("1"), Ok(1));
        assert!(parse_count("0").is_err());
        assert!(parse_count("-1").is_err());
        assert!(parse_count("1.5").is_err());
    }

    /// Runs every case before failing, so one run shows every mismatch.
    fn check_table(cases: &[(String, &str)]) {
        let mut wrong = Vec::new();
        for (text, want) in cases {
            let got = errors(text);
            if got != vec![want.to_string()] {
                wrong.push(format!("in:\n{text}\n got: {got:?}\nwant: {want:?}\n"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    /// One semantic mistake per file; the position is the offending value.
    #[test]
    fn each_semantic_error_is_located_at_its_value() {
        let rules = "rules:\n  - name: all\n";
        let cases: Vec<(String, &str)> = vec![
            (
                format!("{HEAD}{rules}data:\n  client_ports: 100-50\n"),
                "9:17: client_ports: `100-50` is reversed; write 50-100",
            ),
            (
                format!("{HEAD}{rules}data:\n  server_ports: 0-10\n"),
                "9:17: server_ports: `0-10`: port 0 is not a usable port",
            ),
            (
                format!("{HEAD}{rules}data:\n  client_ports: 41500-42000\n"),
                "9:17: client_ports 41500-42000 and server_ports 41000-41999 overlap; the two pools must be disjoint",
            ),
            (
                format!("{HEAD}{rules}metrics:\n  listen: 127.0.0.1\n"),
                "9:11: listen: `127.0.0.1` has no port; write e.g. 127.0.0.1:21",
            ),
            (
                format!("{HEAD}{rules}metrics:\n  listen:\n"),
                "9:10: `listen` has no value: give one, or remove the key",
            ),
            (
                format!("{HEAD}{rules}audit:\n  path: \" \"\n"),
                "9:9: path: the path is blank",
            ),
            (
                format!("{HEAD}{rules}data:\n  backend: ebpf\n"),
                "9:12: backend: unknown value `ebpf`, expected one of: relay, nftables",
            ),
            (
                format!("{HEAD}{rules}data:\n  pinhole_timeout: 30\n"),
                "9:20: pinhole_timeout: `30` has no unit; write e.g. 30s (a number and a unit: 500ms, 30s, 15m or 1h)",
            ),
            (
                format!("{HEAD}{rules}data:\n  nftables_table: \"my table\"\n"),
                "9:19: nftables_table: `my table` is not 1-64 characters of A-Z, a-z, 0-9, `_` and `-`",
            ),
            (
                format!("{HEAD}{rules}limits:\n  max_sessions: 10\n  max_sessions_per_client: 11\n"),
                "10:28: max_sessions_per_client 11 is above max_sessions 10",
            ),
            (
                format!("{HEAD}{rules}limits:\n  max_sessions: 10\n"),
                "9:17: max_sessions 10 is below max_sessions_per_client (64, the default); set that too",
            ),
            (
                format!("{HEAD}{rules}limits:\n  idle_timeout: 0s\n"),
                "9:17: idle_timeout: `0s` is zero; a timeout must be longer than that",
            ),
            (
                format!("{HEAD}{rules}limits:\n  connect_timeout: 0ms\n"),
                "9:20: connect_timeout: `0ms` is zero; a timeout must be longer than that",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    clients: [10.0.0.0/8, 10.0.0.0/33]\n"),
                "8:27: clients: `10.0.0.0/33` is not a CIDR such as 10.0.0.0/24 or 2001:db8::/32, nor an address",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    servers:\n      - 192.0.2.0/24\n      - nowhere\n"),
                "10:9: servers: `nowhere` is not a CIDR such as 10.0.0.0/24 or 2001:db8::/32, nor an address",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    modes: []\n"),
                "8:12: `modes` is an empty list; remove the key for the default",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    modes: [passive, epsv]\n"),
                "8:22: modes: unknown value `epsv`, expected one of: passive, active",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    modes: [active, active]\n"),
                "8:12: modes: list each of passive and active at most once",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    action: reject\n"),
                "8:13: action: unknown value `reject`, expected one of: allow, deny",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    tls: allow\n"),
                "8:10: tls: unknown value `allow`, expected one of: refuse, passthrough",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    server_mode: epsv\n"),
                "8:18: server_mode: unknown value `epsv`, expected one of: same, passive, active",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    data_ports: 1024-\n"),
                "8:17: data_ports: `1024-` is not a port range such as 40000-40999, or a single port",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    deny_commands: [SITE, \"SITE EXEC\"]\n"),
                "8:27: deny_commands: `SITE EXEC` is not an FTP command (1-16 letters, e.g. SITE)",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    deny_commands: [SITE, site]\n"),
                "8:27: deny_commands: `SITE` is listed twice",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n  - name: all\n"),
                "8:11: rule name `all` is already used by rule 1",
            ),
            (format!("{HEAD}rules: []\n"), "6:8: `rules` is empty: with no rule every session is refused"),
            (HEAD.to_string(), "1:1: missing `rules`: with no rule every session is refused"),
            (
                "listeners: []\nrules:\n  - name: all\n".to_string(),
                "1:12: `listeners` is empty: at least one listener is required",
            ),
            (
                rules.to_string(),
                "1:1: missing `listeners`: at least one listener is required",
            ),
            (
                "listeners:\n  - name: a\n    listen: 127.0.0.1:21\n    mode: reverse\nrules:\n  - name: all\n".to_string(),
                "4:11: a reverse listener needs `upstream`, the FTP server's address:port",
            ),
            (
                "listeners:\n  - name: a\n    listen: 127.0.0.1:21\n    mode: transparent\n    upstream: 10.0.0.1:21\nrules:\n  - name: all\n".to_string(),
                "5:15: a transparent listener takes no `upstream`: its server is the original destination of each intercepted connection",
            ),
            (
                "listeners:\n  - name: a\n    listen: 127.0.0.1:21\n    mode: transparent\n    announce: 192.0.2.1\nrules:\n  - name: all\n".to_string(),
                "5:15: `announce` applies to reverse listeners only: a transparent listener announces the server's own address",
            ),
            (
                "listeners:\n  - name: a\n    listen: 127.0.0.1:21\n    mode: bridge\nrules:\n  - name: all\n".to_string(),
                "4:11: mode: unknown value `bridge`, expected one of: reverse, transparent",
            ),
            (
                "listeners:\n  - name: a\n    listen: 127.0.0.1\n    mode: transparent\nrules:\n  - name: all\n".to_string(),
                "3:13: listen: `127.0.0.1` has no port; write e.g. 127.0.0.1:21",
            ),
            (
                "listeners:\n  - listen: 127.0.0.1:21\n    mode: transparent\nrules:\n  - name: all\n".to_string(),
                "2:5: missing `name`: a listener needs a name for logs",
            ),
            (
                "listeners:\n  - name: a\n    mode: transparent\nrules:\n  - name: all\n".to_string(),
                "2:5: missing `listen`: the address to bind, e.g. 0.0.0.0:21",
            ),
            (
                format!("{HEAD}  - name: lo\n    listen: 127.0.0.1:2122\n    mode: transparent\n{rules}"),
                "6:11: listener name `lo` is already used by listener 1",
            ),
            (
                format!("{HEAD}  - name: lo2\n    listen: 127.0.0.1:2121\n    mode: transparent\n{rules}"),
                "7:13: 127.0.0.1:2121 is already the address of listener `lo`",
            ),
            (
                "listeners:\n  - name: a\n    listen: 127.0.0.1:21\n    mode: reverse\n    upstream: 10.0.0.1:0\nrules:\n  - name: all\n".to_string(),
                "5:15: upstream: `10.0.0.1:0` has port 0",
            ),
            (
                "listeners:\n  - name: a\n    listen: 127.0.0.1:21\n    mode: reverse\n    upstream: 10.0.0.1:21\n    announce: 0.0.0.0\nrules:\n  - name: all\n".to_string(),
                "6:15: announce: `0.0.0.0` cannot be announced to clients",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    clients:\n"),
                "8:13: `clients` has no value: give one, or remove the key",
            ),
            (
                format!("{HEAD}rules:\n  - name: \"\"\n"),
                "7:11: name: the name is blank",
            ),
        ];
        check_table(&cases);
    }

    #[test]
    fn pools_and_shares_are_checked_where_written() {
        let rules = "rules:\n  - name: all\n";
        let cases: Vec<(String, &str)> = vec![
            (
                format!("{HEAD}{rules}data:\n  client_ports: 21-40000\n  server_ports: 41000-41999\n"),
                "9:17: client_ports: `21-40000` includes ports below 1024; pools must be within 1024-65535",
            ),
            (
                format!("{HEAD}{rules}data:\n  server_ports: 1000-1023\n"),
                "9:17: server_ports: `1000-1023` includes ports below 1024; pools must be within 1024-65535",
            ),
            (
                format!("{HEAD}{rules}data:\n  max_ports_per_client: 0\n"),
                "9:25: max_ports_per_client: `0` would refuse every data connection; write a number of ports such as 16, or a percentage of each pool such as 25%",
            ),
            (
                format!("{HEAD}{rules}data:\n  max_ports_per_client: 0%\n"),
                "9:25: max_ports_per_client: `0%` is not a percentage from 1% to 100%",
            ),
            (
                format!("{HEAD}{rules}data:\n  max_ports_per_client: 101%\n"),
                "9:25: max_ports_per_client: `101%` is not a percentage from 1% to 100%",
            ),
            (
                format!("{HEAD}{rules}data:\n  max_ports_per_client: half\n"),
                "9:25: max_ports_per_client: `half` is not a number of ports such as 16, or a percentage of each pool such as 25%",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(errors(&text), vec![want.to_string()], "in:\n{text}");
        }
        // 1024 itself is a usable pool port.
        let c = ok(&format!(
            "{HEAD}{rules}data:\n  client_ports: 1024-1100\n  server_ports: 2000-2009\n  max_ports_per_client: 16\n"
        ));
        assert_eq!(c.data.client_ports, PortRange { lo: 1024, hi: 1100 });
        assert_eq!(c.data.max_ports_per_client, PortShare::Ports(16));
    }

    #[test]
    fn port_share_of_a_pool() {
        let cases = [
            (PortShare::Percent(25), 40, 10),
            (PortShare::Percent(25), 1000, 250),
            (PortShare::Percent(25), 41, 11), // rounds up
            (PortShare::Percent(1), 40, 2),   // at least two
            (PortShare::Percent(25), 2, 2),
            (PortShare::Percent(25), 1, 1), // never more than the pool
            (PortShare::Percent(100), 40, 40),
            (PortShare::Ports(16), 40, 16),
            (PortShare::Ports(16), 4, 4),
            (PortShare::Ports(1), 40, 1),
        ];
        for (share, len, want) in cases {
            assert_eq!(share.of(len), want, "{share} of {len}");
        }
        assert_eq!(
            DataConfig::default().max_ports_per_client,
            PortShare::Percent(25)
        );
    }

    #[test]
    fn check_prints_the_share_and_what_it_comes_to() {
        let c = ok(&format!(
            "{HEAD}rules:\n  - name: all\ndata:\n  client_ports: 40000-40039\n  server_ports: 41000-41999\n"
        ));
        let yaml = c.to_yaml();
        assert!(
            yaml.contains("  max_ports_per_client: 25% # per client address: 10 of 40 client ports, 250 of 1000 server ports\n"),
            "{yaml}"
        );
        assert_eq!(parse(&yaml), Ok(c));
    }

    #[test]
    fn an_upstream_that_is_a_listener_is_a_loop() {
        let rules = "rules:\n  - name: all\n";
        let lst = |name: &str, listen: &str, upstream: &str| {
            format!("  - name: {name}\n    listen: {listen}\n    mode: reverse\n    upstream: {upstream}\n")
        };
        let cases: Vec<(String, &str)> = vec![
            (
                format!("listeners:\n{}{rules}", lst("a", "127.0.0.1:2121", "127.0.0.1:2121")),
                "5:15: upstream 127.0.0.1:2121 is the gateway's own listener `a` (127.0.0.1:2121): every session would connect back to the gateway (a loop)",
            ),
            (
                format!(
                    "listeners:\n{}{}{rules}",
                    lst("a", "192.0.2.1:21", "10.0.0.3:21"),
                    lst("b", "192.0.2.1:2121", "192.0.2.1:21")
                ),
                "9:15: upstream 192.0.2.1:21 is the gateway's own listener `a` (192.0.2.1:21): every session would connect back to the gateway (a loop)",
            ),
            (
                format!("listeners:\n{}{rules}", lst("any", "0.0.0.0:21", "127.0.0.5:21")),
                "5:15: upstream 127.0.0.5:21 is the gateway's own listener `any` (0.0.0.0:21): every session would connect back to the gateway (a loop)",
            ),
            (
                format!("listeners:\n{}{rules}", lst("v6", "\"[::]:21\"", "\"[::1]:21\"")),
                "5:15: upstream [::1]:21 is the gateway's own listener `v6` ([::]:21): every session would connect back to the gateway (a loop)",
            ),
            (
                format!("listeners:\n{}{rules}", lst("m", "127.0.0.1:21", "\"[::ffff:127.0.0.1]:21\"")),
                "5:15: upstream [::ffff:127.0.0.1]:21 is the gateway's own listener `m` (127.0.0.1:21): every session would connect back to the gateway (a loop)",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(errors(&text), vec![want.to_string()], "in:\n{text}");
        }
        // Not loops: another host on the same port, another port, and a
        // v6-only listener that an IPv4 loopback upstream cannot reach.
        for (listen, upstream) in [
            ("0.0.0.0:21", "10.0.0.3:21"),
            ("127.0.0.1:2121", "127.0.0.1:21"),
            ("\"[::]:21\"", "127.0.0.1:21"),
            ("127.0.0.1:21", "127.0.0.2:21"),
        ] {
            ok(&format!(
                "listeners:\n{}{rules}",
                lst("x", listen, upstream)
            ));
        }
    }

    #[test]
    fn every_semantic_error_is_reported_in_file_order() {
        let text = "\
listeners:
  - name: a
    listen: 127.0.0.1
    mode: reverse
data:
  client_ports: 9-1
  pinhole_timeout: 30
limits:
  max_sessions: 0
rules:
  - name: one
    clients: [10.0.0.0/33, 10.1.0.0/16, bogus]
    tls: maybe
";
        assert_eq!(
            errors(text),
            vec![
                "3:13: listen: `127.0.0.1` has no port; write e.g. 127.0.0.1:21",
                "4:11: a reverse listener needs `upstream`, the FTP server's address:port",
                "6:17: client_ports: `9-1` is reversed; write 1-9",
                "7:20: pinhole_timeout: `30` has no unit; write e.g. 30s (a number and a unit: 500ms, 30s, 15m or 1h)",
                "9:17: max_sessions: 0 would refuse every session; the least is 1",
                "12:15: clients: `10.0.0.0/33` is not a CIDR such as 10.0.0.0/24 or 2001:db8::/32, nor an address",
                "12:41: clients: `bogus` is not a CIDR such as 10.0.0.0/24 or 2001:db8::/32, nor an address",
                "13:10: tls: unknown value `maybe`, expected one of: refuse, passthrough",
            ]
        );
    }

    /// Syntax and shape errors stop at the first, located by the YAML parser.
    #[test]
    fn structural_errors_are_located() {
        let cases: Vec<(String, &str)> = vec![
            (
                format!("{HEAD}    lisen: 1.2.3.4:21\nrules:\n  - name: all\n"),
                "6:5: listeners[0]: unknown field `lisen`, expected one of `name`, `listen`, `mode`, `upstream`, `announce`",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    client: [10.0.0.0/8]\n"),
                "8:5: rules[0]: unknown field `client`, expected one of `name`, `clients`, `servers`, `action`, `modes`, `server_mode`, `data_ports`, `tls`, `deny_commands`",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    clients: 10.0.0.0/8\n"),
                "8:14: rules[0].clients: invalid type: string \"10.0.0.0/8\", expected a sequence",
            ),
            (
                format!("{HEAD}rules:\n  - name: [a, b]\n"),
                "7:11: rules[0].name: invalid type: sequence, expected a single value (text or number)",
            ),
            (
                format!("{HEAD}rules:\n  name: all\n"),
                "7:3: rules: invalid type: map, expected a sequence",
            ),
            (format!("{HEAD}rules: [\n"), "7:1: did not find expected node content, while parsing a flow node"),
            (
                format!("{HEAD}  bad indent: 1\n"),
                "6:3: did not find expected '-' indicator, while parsing a block collection at line 2 column 3",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    servers: [0.0.0.0/0, ::/0]\n"),
                "8:26: did not find expected node content, while parsing a flow node; inside [ ], quote IPv6 addresses that start with `::`, e.g. \"::/0\"",
            ),
            ("- 1\n".to_string(), "1:1: invalid type: sequence, expected a mapping with `listeners`, `data`, `limits` and `rules`"),
            ("".to_string(), "1:1: the file is empty: a rule file needs `listeners` and `rules`"),
            ("# nothing\n".to_string(), "1:1: the file is empty: a rule file needs `listeners` and `rules`"),
            (
                format!("{HEAD}rules:\n  - name: a\n  - name: *nowhere\n"),
                "8:11: unknown anchor",
            ),
        ];
        check_table(&cases);
    }

    #[test]
    fn alias_bomb_is_refused_without_panic() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        text.push_str(HEAD);
        text.push_str("rules:\n  - name: *a11\n");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        // Either limit is a clean refusal: the unknown key or the expansion.
        assert!(
            errs[0].contains("unknown field `a0`") || errs[0].contains("repetition limit"),
            "{errs:?}"
        );
        let bomb_in_value = text
            .replace("a0: &a0", "listeners: &a0")
            .replacen(HEAD, "", 1);
        let errs = errors(&bomb_in_value);
        assert_eq!(errs.len(), 1, "{errs:?}");
    }

    #[test]
    fn aliases_and_deep_nesting_do_not_panic() {
        // A well-formed alias is fine, and errors inside it are located.
        let c = ok(&format!(
            "{HEAD}rules:\n  - name: a\n    clients: &lan [10.0.0.0/8]\n  - name: b\n    servers: *lan\n"
        ));
        assert_eq!(
            c.rules[1].servers,
            vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        let errs = errors(&format!(
            "{HEAD}rules:\n  - name: a\n    clients: &lan [10.0.0.0/99]\n  - name: b\n    servers: *lan\n"
        ));
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs.iter().all(|e| e.starts_with("8:20: ")), "{errs:?}");
        let deep = format!(
            "{HEAD}rules:\n  - name: {}{}\n",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert_eq!(errors(&deep).len(), 1);
    }

    #[test]
    fn oversized_text_is_refused() {
        let mut text = format!("{HEAD}rules:\n  - name: all\n");
        text.push_str(&"#".repeat(MAX_FILE_BYTES));
        let errs = errors(&text);
        assert_eq!(errs, vec![format!("0:0: {}", too_large())]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.yaml");
        std::fs::write(&path, &text).unwrap();
        let e = Config::load(&path).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert!(e.0[0].message.contains("larger than 1024 KiB"), "{e}");
    }

    #[test]
    fn load_reports_unreadable_and_non_utf8_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.yaml");
        let e = Config::load(&missing).unwrap_err();
        assert_eq!((e.0[0].line, e.0[0].column), (0, 0));
        assert!(
            e.to_string()
                .starts_with(&format!("{}:0:0: cannot open", missing.display())),
            "{e}"
        );
        let bad = dir.path().join("latin1.yaml");
        std::fs::write(&bad, b"listeners:\n  - name: caf\xe9\n").unwrap();
        let e = Config::load(&bad).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}:2:14: the file is not valid UTF-8", bad.display())
        );
    }

    #[test]
    fn many_errors_are_capped() {
        let mut text = format!("{HEAD}rules:\n  - name: all\n    clients:\n");
        for _ in 0..MAX_LOCATED_ERRORS + 5 {
            text.push_str("      - nope\n");
        }
        let errs = errors(&text);
        assert_eq!(errs.len(), MAX_LOCATED_ERRORS + 1);
        assert_eq!(
            errs.last().map(String::as_str),
            Some("0:0: 5 more errors not shown")
        );
        assert!(errs[0].starts_with("9:9: "), "{errs:?}");
    }

    #[test]
    fn metrics_and_audit_sections() {
        let c = ok(&format!("{HEAD}rules:\n  - name: all\n"));
        assert_eq!((c.metrics, c.audit), (None, None));
        let c = ok(&format!(
            "{HEAD}rules:\n  - name: all\nmetrics:\n  listen: \"[::1]:9121\"\naudit:\n  path: \"-\"\n"
        ));
        assert_eq!(
            c.metrics,
            Some(MetricsConfig {
                listen: "[::1]:9121".parse().unwrap()
            })
        );
        assert_eq!(
            c.audit,
            Some(AuditConfig {
                path: AuditTarget::Stdout
            })
        );
        let yaml = c.to_yaml();
        assert!(
            yaml.contains("listen: '[::1]:9121'") || yaml.contains("listen: \"[::1]:9121\""),
            "{yaml}"
        );
        assert_eq!(parse(&yaml), Ok(c));
        let c = ok(&format!(
            "{HEAD}rules:\n  - name: all\naudit:\n  path: /var/log/ftpgate/audit.jsonl\n"
        ));
        assert_eq!(
            c.audit.map(|a| a.path),
            Some(AuditTarget::File(PathBuf::from(
                "/var/log/ftpgate/audit.jsonl"
            )))
        );
        let errs = errors(&format!(
            "{HEAD}rules:\n  - name: all\naudit: {{}}\nmetrics:\n  port: 1\n"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("10:3: metrics: unknown field `port`, expected `listen`"),
            "{errs:?}"
        );
        let errs = errors(&format!("{HEAD}rules:\n  - name: all\naudit: {{}}\n"));
        assert_eq!(
            errs,
            vec![
                "8:8: missing `path`: a file to append to, or \"-\" for standard output"
                    .to_string()
            ]
        );
    }

    #[test]
    fn to_yaml_prints_defaults_and_round_trips() {
        let c = ok(&format!("{HEAD}rules:\n  - name: all\n"));
        let yaml = c.to_yaml();
        for key in [
            "backend: relay",
            "client_ports: 40000-40999",
            "server_ports: 41000-41999",
            "pinhole_timeout: 30s",
            "nftables_table: ftpgate",
            "max_sessions: 10000",
            "max_sessions_per_client: 64",
            "idle_timeout: 15m",
            "connect_timeout: 10s",
            "action: allow",
            "server_mode: same",
            "data_ports: 1024-65535",
            "tls: refuse",
            "deny_commands: []",
        ] {
            assert!(yaml.contains(key), "missing {key:?} in:\n{yaml}");
        }
        assert_eq!(parse(&yaml), Ok(c));
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u8; 16]>().prop_map(IpAddr::from),
        ]
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        (arb_ip(), any::<u8>()).prop_map(|(ip, p)| {
            let max = if ip.is_ipv4() { 33 } else { 129 };
            let net = IpNet::new(ip, p % max).unwrap_or(IpNet::from(ip));
            // The loader turns IPv4-mapped networks into IPv4 ones.
            unmap_net(net)
        })
    }

    fn arb_range() -> impl Strategy<Value = PortRange> {
        (1u16.., 1u16..).prop_map(|(a, b)| PortRange {
            lo: a.min(b),
            hi: a.max(b),
        })
    }

    fn arb_duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            (1u64..100_000).prop_map(Duration::from_millis),
            (1u64..10_000).prop_map(Duration::from_secs),
            (1u64..1_000).prop_map(|m| Duration::from_secs(m * 60)),
            (1u64..100).prop_map(|h| Duration::from_secs(h * 3600)),
        ]
    }

    /// Names that must survive YAML quoting: `null`, `~`, `123`, `- x`, `#`...
    fn arb_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("null".to_string()),
            Just("~".to_string()),
            Just("123".to_string()),
            Just("true".to_string()),
            Just("- x".to_string()),
            Just("'quoted'".to_string()),
            "[^\\p{Cc}]{0,12}",
        ]
        .prop_filter("not blank", |s| !s.trim().is_empty())
    }

    fn arb_listener() -> impl Strategy<Value = Listener> {
        let mode = prop_oneof![
            Just(ListenerMode::Transparent),
            (
                arb_ip().prop_filter("concrete", |ip| !ip.is_unspecified()),
                1u16..,
                proptest::option::of(arb_ip().prop_filter("concrete", |ip| !ip.is_unspecified())),
            )
                .prop_map(|(ip, port, announce)| ListenerMode::Reverse {
                    upstream: SocketAddr::new(ip, port),
                    announce,
                }),
        ];
        (arb_name(), arb_ip(), any::<u16>(), mode).prop_map(|(name, ip, port, mode)| Listener {
            name,
            listen: SocketAddr::new(ip, port),
            mode,
        })
    }

    fn arb_rule() -> impl Strategy<Value = Rule> {
        let modes = prop_oneof![
            Just(vec![DataMode::Passive]),
            Just(vec![DataMode::Active]),
            Just(vec![DataMode::Passive, DataMode::Active]),
            Just(vec![DataMode::Active, DataMode::Passive]),
        ];
        (
            arb_name(),
            proptest::collection::vec(arb_net(), 1..4),
            proptest::collection::vec(arb_net(), 1..4),
            any::<bool>(),
            modes,
            0..3usize,
            arb_range(),
            any::<bool>(),
            proptest::collection::btree_set("[A-Z]{1,16}", 0..4),
        )
            .prop_map(
                |(name, clients, servers, deny, modes, sm, data_ports, tls, verbs)| Rule {
                    name,
                    clients,
                    servers,
                    action: if deny { Action::Deny } else { Action::Allow },
                    modes,
                    server_mode: [ServerMode::Same, ServerMode::Passive, ServerMode::Active][sm],
                    data_ports,
                    tls: if tls {
                        TlsPolicy::Passthrough
                    } else {
                        TlsPolicy::Refuse
                    },
                    deny_commands: verbs.into_iter().collect(),
                },
            )
    }

    fn arb_config() -> impl Strategy<Value = Config> {
        let data = (
            any::<bool>(),
            1024u16..30_000,
            1024u16..30_000,
            30_001u16..,
            30_001u16..,
            arb_duration(),
            "[A-Za-z0-9_-]{1,64}",
            prop_oneof![
                (1usize..100_000).prop_map(PortShare::Ports),
                (1u8..=100).prop_map(PortShare::Percent),
            ],
        )
            .prop_map(
                |(nft, a, b, c, d, pinhole_timeout, nftables_table, share)| {
                    let low = PortRange {
                        lo: a.min(b),
                        hi: a.max(b),
                    };
                    let high = PortRange {
                        lo: c.min(d),
                        hi: c.max(d),
                    };
                    let (client_ports, server_ports) = if nft { (low, high) } else { (high, low) };
                    DataConfig {
                        backend: if nft {
                            BackendKind::Nftables
                        } else {
                            BackendKind::Relay
                        },
                        client_ports,
                        server_ports,
                        pinhole_timeout,
                        nftables_table,
                        max_ports_per_client: share,
                    }
                },
            );
        let limits = (
            1usize..1_000_000,
            1usize..1_000_000,
            arb_duration(),
            arb_duration(),
        )
            .prop_map(|(a, b, idle_timeout, connect_timeout)| Limits {
                max_sessions: a.max(b),
                max_sessions_per_client: a.min(b),
                idle_timeout,
                connect_timeout,
            });
        (
            proptest::collection::vec(arb_listener(), 1..4),
            data,
            limits,
            proptest::collection::vec(arb_rule(), 1..5),
            proptest::option::of((arb_ip(), any::<u16>())),
            proptest::option::of(prop_oneof![
                Just(AuditTarget::Stdout),
                arb_name().prop_map(|n| AuditTarget::File(PathBuf::from(n))),
            ]),
        )
            .prop_map(|(mut listeners, data, limits, mut rules, metrics, audit)| {
                let metrics = metrics.map(|(ip, port)| MetricsConfig {
                    listen: SocketAddr::new(ip, port),
                });
                let audit = audit
                    .filter(|t| t != &AuditTarget::File(PathBuf::from("-")))
                    .map(|path| AuditConfig { path });
                // Names and listen addresses are unique in a valid file.
                for (i, l) in listeners.iter_mut().enumerate() {
                    l.name = format!("{}#{i}", l.name);
                    l.listen
                        .set_port(l.listen.port().wrapping_add(i as u16).max(1));
                }
                for (i, r) in rules.iter_mut().enumerate() {
                    r.name = format!("{}#{i}", r.name);
                }
                listeners.dedup_by_key(|l| l.listen);
                // An upstream that is one of the listeners is a loop, which
                // a valid file cannot hold.
                let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.listen).collect();
                for l in &mut listeners {
                    if let ListenerMode::Reverse { upstream, .. } = l.mode {
                        if addrs.iter().any(|&a| reaches(upstream, a)) {
                            l.mode = ListenerMode::Transparent;
                        }
                    }
                }
                Config {
                    path: PathBuf::from("t.yaml"),
                    listeners,
                    data,
                    limits,
                    rules,
                    metrics,
                    audit,
                }
            })
    }

    proptest! {
        #[test]
        fn any_valid_config_round_trips(config in arb_config()) {
            let yaml = config.to_yaml();
            let back = parse(&yaml);
            prop_assert_eq!(back, Ok(config), "{}", yaml);
        }
    }
}
