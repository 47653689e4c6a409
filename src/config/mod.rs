//! The rule file: YAML in, validated [`Config`] out, once, at load.
//!
//! Every error names `file:line:column`. Strings become `IpNet`,
//! `SocketAddr`, [`PortRange`] and `Duration` here, so nothing downstream
//! parses configuration text again.
//!
//! - `types`: the validated types the rest of the crate reads, each enum
//!   with its rule-file names written once;
//! - `raw`: the file's shape as serde reads it, and locating a node in it;
//! - `check`: raw → validated, collecting every mistake with its place;
//! - `values`: one scalar's text → its typed value, or how to fix it;
//! - `print`: the effective configuration as YAML (`ftpgate check`);
//! - `tls`: FTPS settings (listener `tls`, `upstream_tls`, a rule's
//!   `require_*`), the certificate pair loaded at check time.

mod check;
mod print;
mod raw;
#[cfg(test)]
mod tests;
mod tls;
mod types;
mod values;

pub use types::{
    Action, AuditConfig, AuditTarget, BackendKind, DataConfig, DataMode, Limits, Listener,
    ListenerMode, MetricsConfig, PortRange, PortShare, ProxyProtocol, Rule, ServerMode, TlsPolicy,
};
pub use types::{HeaderWait, HeaderWaits, ProxyVersion};

pub use tls::{tls_warnings, ListenerTls, UpstreamMode, UpstreamTls};

use check::Check;
use raw::{locate, RawConfig, Seg};
use std::path::{Path, PathBuf};

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it was loaded from (for reload and messages).
    pub path: PathBuf,
    /// This gateway's name among the instances of one service (`instance:`),
    /// shown at startup and in the audit log; none when the key is absent.
    pub instance: Option<String>,
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

/// A rule file is written by hand; anything bigger is a mistake, and the
/// limit keeps a hostile file from costing much memory before validation.
pub(crate) const MAX_FILE_BYTES: usize = 1 << 20;

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
        let error = |(line, column, message)| ConfigError {
            file: path.to_path_buf(),
            line,
            column,
            message,
        };
        if text.len() > MAX_FILE_BYTES {
            return Err(ConfigErrors(vec![error((0, 0, too_large()))]));
        }
        let raw = structure(text).map_err(|e| ConfigErrors(vec![error(e)]))?;
        let mut check = Check::default();
        let config = check.config(&raw, path);
        if check.errors.is_empty() {
            // At start and at each reload; `ftpgate check` prints them as
            // comments in the effective configuration.
            for (line, column, message) in located(text, check.warnings) {
                tracing::warn!("{}:{line}:{column}: {message}", path.display());
            }
            return Ok(config);
        }
        let errors = located(text, check.errors);
        Err(ConfigErrors(errors.into_iter().map(error).collect()))
    }

    /// Whether the kernel carries every data connection this configuration
    /// allows, leaving the gateway only the control connections:
    /// `backend: nftables`, every allowing rule with `server_mode: same` and
    /// `tls: refuse`, no listener with TLS on either leg or with
    /// `proxy_protocol` (a balancer's data connection starts with a header
    /// only the relay reads), and every reverse listener's upstream in its
    /// own address family. The other plans (a mode conversion, a TLS data
    /// connection, mixed families) are relayed.
    pub fn kernel_data_only(&self) -> bool {
        self.data.backend == BackendKind::Nftables
            && self
                .rules
                .iter()
                .filter(|r| r.action == Action::Allow)
                .all(|r| r.server_mode == ServerMode::Same && r.tls == TlsPolicy::Refuse)
            && self.listeners.iter().all(|l| {
                let same_family = match &l.mode {
                    ListenerMode::Reverse { upstream, .. } => {
                        upstream.is_ipv4() == l.listen.is_ipv4()
                    }
                    ListenerMode::Transparent => true,
                };
                l.tls.is_none()
                    && l.upstream_tls.is_none()
                    && l.proxy_protocol.is_none()
                    && same_family
            })
    }

    /// The worker threads `ftpgate run --threads 0` starts: one when the
    /// kernel carries the data ([`Config::kernel_data_only`]), where one
    /// thread serves thousands of sessions a second and hands nothing
    /// between threads; otherwise 0, one per CPU, for relaying.
    pub fn default_threads(&self) -> usize {
        usize::from(self.kernel_data_only())
    }
}

/// A message with its 1-based line and column (0 when unknown).
type Located = (usize, usize, String);

/// The file's structure, or the first structural problem, as the YAML
/// parser locates it.
fn structure(text: &str) -> Result<RawConfig, Located> {
    match serde_yaml::from_str::<Option<RawConfig>>(text) {
        Ok(Some(raw)) => Ok(raw),
        Ok(None) => Err((
            1,
            1,
            "the file is empty: a rule file needs `listeners` and `rules`".to_string(),
        )),
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
            Err((line, column, message))
        }
    }
}

/// The checks' errors in file order, the first `MAX_LOCATED_ERRORS` of
/// them located, then a count of the rest.
fn located(text: &str, errors: Vec<(Vec<Seg>, String)>) -> Vec<Located> {
    let total = errors.len();
    let mut out: Vec<Located> = errors
        .into_iter()
        .take(MAX_LOCATED_ERRORS)
        .map(|(at, message)| {
            let (line, column) = locate(text, &at);
            (line, column, message)
        })
        .collect();
    out.sort_by_key(|&(line, column, _)| (line, column));
    if total > MAX_LOCATED_ERRORS {
        out.push((
            0,
            0,
            format!("{} more errors not shown", total - MAX_LOCATED_ERRORS),
        ));
    }
    out
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
