//! The effective configuration as YAML in the rule-file schema, every key
//! present (what `ftpgate check` prints).

use super::types::*;
use super::Config;
use serde::Serialize;
use std::time::Duration;

impl Config {
    /// The effective configuration, defaults filled in, as YAML in the
    /// rule-file schema (what `ftpgate check` prints).
    ///
    /// `Config::parse` of the result gives back an equal `Config` (durations
    /// below a millisecond, which no rule file can express, are rounded up).
    pub fn to_yaml(&self) -> String {
        let out = OutConfig {
            instance: self.instance.clone(),
            listeners: self.listeners.iter().map(OutListener::from).collect(),
            data: OutData::from(&self.data),
            limits: OutLimits::from(&self.limits),
            rules: self.rules.iter().map(OutRule::from).collect(),
            metrics: self.metrics.as_ref().map(|m| OutMetrics {
                listen: m.listen.to_string(),
            }),
            audit: self.audit.as_ref().map(|a| OutAudit {
                path: match &a.path {
                    AuditTarget::Stdout => AUDIT_STDOUT.to_string(),
                    AuditTarget::File(p) => p.display().to_string(),
                },
            }),
        };
        // Plain strings, numbers and lists cannot fail to serialise; the
        // fallback keeps this total anyway.
        let yaml =
            serde_yaml::to_string(&out).unwrap_or_else(|e| format!("# cannot serialise: {e}\n"));
        let mut out = broad_balancer_notes(&self.listeners);
        out.push_str(&with_share_note(yaml, &self.data));
        out
    }
}

/// A comment line for each network in a listener's `proxy_protocol.from`
/// that is too broad to be only balancers (the warning the file's load
/// logs), ahead of the YAML, which still loads.
fn broad_balancer_notes(listeners: &[Listener]) -> String {
    let mut out = String::new();
    for (i, l) in listeners.iter().enumerate() {
        let Some(pp) = &l.proxy_protocol else {
            continue;
        };
        for why in pp.from.iter().filter_map(ProxyProtocol::too_broad) {
            out.push_str(&format!("# warning: listeners[{i}] ({}): {why}\n", l.name));
        }
    }
    out
}

/// What the share comes to in each pool, as a comment: the operator sees
/// the figure the gateway enforces, and the YAML still loads.
fn with_share_note(yaml: String, d: &DataConfig) -> String {
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

impl From<&Listener> for OutListener {
    fn from(l: &Listener) -> Self {
        let (upstream, announce) = match &l.mode {
            ListenerMode::Reverse { upstream, announce } => {
                (Some(upstream.to_string()), announce.map(|a| a.to_string()))
            }
            ListenerMode::Transparent => (None, None),
        };
        OutListener {
            name: l.name.clone(),
            listen: l.listen.to_string(),
            mode: l.mode.kind().as_str(),
            upstream,
            announce,
            proxy_protocol: l.proxy_protocol.as_ref().map(|p| OutProxyProtocol {
                from: p.from.iter().map(ToString::to_string).collect(),
                timeout: format_duration(p.timeout),
            }),
            upstream_proxy_protocol: l.upstream_proxy_protocol.map(ProxyVersion::as_str),
            tls: l.tls.as_ref().map(|t| OutListenerTls {
                cert: t.cert.display().to_string(),
                key: t.key.display().to_string(),
                implicit: t.implicit,
                require_resumption: t.require_resumption,
            }),
            upstream_tls: l.upstream_tls.as_ref().map(|u| {
                let (ca, insecure) = match &u.trust {
                    crate::tls::client::Trust::CaFile(p) => (Some(p.display().to_string()), false),
                    crate::tls::client::Trust::System => (Some("system".to_string()), false),
                    crate::tls::client::Trust::Insecure => (None, true),
                };
                OutUpstreamTls {
                    mode: u.mode.as_str(),
                    ca,
                    name: u.name.clone(),
                    insecure,
                    allow_downgrade: u.allow_downgrade,
                }
            }),
        }
    }
}

impl From<&DataConfig> for OutData {
    fn from(d: &DataConfig) -> Self {
        OutData {
            backend: d.backend.as_str(),
            client_ports: d.client_ports.to_string(),
            server_ports: d.server_ports.to_string(),
            pinhole_timeout: format_duration(d.pinhole_timeout),
            nftables_table: d.nftables_table.clone(),
            conntrack_mark: format!("{:#010x}", d.conntrack_mark),
            max_ports_per_client: d.max_ports_per_client.to_string(),
        }
    }
}

impl From<&Limits> for OutLimits {
    fn from(l: &Limits) -> Self {
        OutLimits {
            max_sessions: l.max_sessions,
            max_sessions_per_client: l.max_sessions_per_client,
            idle_timeout: format_duration(l.idle_timeout),
            connect_timeout: format_duration(l.connect_timeout),
        }
    }
}

impl From<&Rule> for OutRule {
    fn from(r: &Rule) -> Self {
        OutRule {
            name: r.name.clone(),
            clients: r.clients.iter().map(ToString::to_string).collect(),
            servers: r.servers.iter().map(ToString::to_string).collect(),
            action: r.action.as_str(),
            modes: r.modes.iter().map(|m| m.as_str()).collect(),
            server_mode: r.server_mode.as_str(),
            data_ports: r.data_ports.to_string(),
            tls: r.tls.as_str(),
            deny_commands: r.deny_commands.clone(),
            require_tls: r.require_tls,
            require_prot_p: r.require_prot_p,
        }
    }
}

// The effective configuration as printed: every key present.

#[derive(Serialize)]
struct OutConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<String>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy_protocol: Option<OutProxyProtocol>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_proxy_protocol: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<OutListenerTls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_tls: Option<OutUpstreamTls>,
}

#[derive(Serialize)]
struct OutListenerTls {
    cert: String,
    key: String,
    implicit: bool,
    require_resumption: bool,
}

#[derive(Serialize)]
struct OutUpstreamTls {
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<String>,
    name: String,
    insecure: bool,
    allow_downgrade: bool,
}

#[derive(Serialize)]
struct OutProxyProtocol {
    from: Vec<String>,
    timeout: String,
}

#[derive(Serialize)]
struct OutData {
    backend: &'static str,
    client_ports: String,
    server_ports: String,
    pinhole_timeout: String,
    nftables_table: String,
    conntrack_mark: String,
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
    // Printed when set, so files without FTPS print as they did.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    require_tls: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    require_prot_p: bool,
}

/// The largest unit that states `d` exactly; sub-millisecond parts, which a
/// rule file cannot express, round up.
pub(super) fn format_duration(d: Duration) -> String {
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
