//! Validation: raw → validated types, collecting (path, message) pairs.
//! Paths are turned into file:line:column (in `Config::parse`) only when
//! there are errors.

use super::raw::{
    at, Field, RawAudit, RawConfig, RawData, RawLimits, RawListener, RawMetrics, RawProxyProtocol,
    RawRule, Seg, Text,
};
use super::types::*;
use super::values::*;
use super::Config;
use std::net::SocketAddr;
use std::path::Path;

/// The errors found so far, each with the path of the node it is about.
#[derive(Default)]
pub(super) struct Check {
    pub(super) errors: Vec<(Vec<Seg>, String)>,
    /// What loads but is probably a mistake; logged when the file loads.
    pub(super) warnings: Vec<(Vec<Seg>, String)>,
    pub(super) tls: super::tls::TlsState,
}

impl Check {
    pub(super) fn err(&mut self, path: &[Seg], message: impl Into<String>) {
        self.errors.push((path.to_vec(), message.into()));
    }

    fn warn(&mut self, path: &[Seg], message: impl Into<String>) {
        self.warnings.push((path.to_vec(), message.into()));
    }

    /// The value of an optional key. `Err` after reporting an empty value.
    pub(super) fn field<'a, T>(
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
    pub(super) fn optional<T>(
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
    pub(super) fn value<T>(
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
    pub(super) fn required<T>(
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

    pub(super) fn config(&mut self, raw: &RawConfig, path: &Path) -> Config {
        self.tls.base = super::tls::base_dir(path);
        let root: &[Seg] = &[];
        let instance = self
            .optional(&raw.instance, root, "instance", parse_name)
            .ok()
            .flatten();
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
            instance,
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
            if let Some(listener) = self.listener(r, &path, &out) {
                out.push(listener);
                index.push(i);
            }
        }
        self.no_upstream_loops(&out, &index);
        out
    }

    /// One listener; a name or an address already used by one of `earlier`
    /// is an error.
    fn listener(
        &mut self,
        r: &RawListener,
        path: &[Seg],
        earlier: &[Listener],
    ) -> Option<Listener> {
        let name = self.required(
            &r.name,
            path,
            "name",
            "a listener needs a name for logs",
            parse_name,
        );
        let listen = self.required(
            &r.listen,
            path,
            "listen",
            "the address to bind, e.g. 0.0.0.0:21",
            |s| parse_socket_addr(s, true),
        );
        let mode = self.listener_mode(r, path);
        let (tls, upstream_tls) = self.listener_tls(r, path, mode.as_ref());
        let proxy_protocol = match self.field(&r.proxy_protocol, path, "proxy_protocol") {
            Ok(Some(p)) => self.proxy_protocol(p, path, mode.as_ref()).map(Some),
            Ok(None) => Some(None),
            Err(()) => None,
        };
        let upstream_proxy_protocol = self.upstream_proxy_protocol(r, path, mode.as_ref());
        if let Some(name) = &name {
            if let Some(first) = earlier.iter().position(|l| &l.name == name) {
                self.err(
                    &at(path, "name"),
                    format!(
                        "listener name `{name}` is already used by listener {}",
                        first + 1
                    ),
                );
            }
        }
        if let Some(listen) = listen {
            if let Some(other) = earlier
                .iter()
                .find(|l| l.listen == listen && listen.port() != 0)
            {
                self.err(
                    &at(path, "listen"),
                    format!(
                        "{listen} is already the address of listener `{}`",
                        other.name
                    ),
                );
            }
        }
        Some(Listener {
            name: name?,
            listen: listen?,
            mode: mode?,
            proxy_protocol: proxy_protocol?,
            upstream_proxy_protocol: upstream_proxy_protocol?,
            tls,
            upstream_tls,
        })
    }

    /// A listener's `upstream_proxy_protocol`: the header version it sends
    /// its upstream, if any; `None` after reporting an error.
    fn upstream_proxy_protocol(
        &mut self,
        r: &RawListener,
        path: &[Seg],
        mode: Option<&ListenerMode>,
    ) -> Option<Option<ProxyVersion>> {
        let key = "upstream_proxy_protocol";
        let version = self
            .optional(&r.upstream_proxy_protocol, path, key, |s| {
                parse_enum(s, ProxyVersion::NAMES)
            })
            .ok()?;
        if version.is_some() && mode == Some(&ListenerMode::Transparent) {
            self.err(
                &at(path, key),
                "upstream_proxy_protocol applies to reverse listeners only: a transparent listener's server is whatever the client dialled, which expects no header",
            );
            return None;
        }
        Some(version)
    }

    /// A listener's `proxy_protocol` section; `mode` is the listener's, when
    /// it is valid.
    fn proxy_protocol(
        &mut self,
        r: &RawProxyProtocol,
        listener: &[Seg],
        mode: Option<&ListenerMode>,
    ) -> Option<ProxyProtocol> {
        let path = at(listener, "proxy_protocol");
        if mode == Some(&ListenerMode::Transparent) {
            self.err(
                &path,
                "proxy_protocol applies to reverse listeners only: a transparent listener's server is the original destination of a connection that no balancer relayed",
            );
        }
        if matches!(&r.from, Field::Set(v) if v.is_empty()) {
            // `list` would suggest a default, and `from` has none.
            self.err(
                &at(&path, "from"),
                "`from` is an empty list: name the balancers, or remove `proxy_protocol`",
            );
            return None;
        }
        let from = match self.list(&r.from, &path, "from", false, parse_cidr) {
            Ok(Some(from)) => Some(from),
            Ok(None) => {
                self.err(
                    &path,
                    "missing `from`: the balancers' addresses (CIDRs) that send a PROXY header",
                );
                None
            }
            Err(()) => None,
        };
        let timeout = self.value(
            &r.timeout,
            &path,
            "timeout",
            ProxyProtocol::DEFAULT_TIMEOUT,
            |s| {
                // A peer inside `from` holds a connection this long before
                // any session limit counts it.
                parse_duration(s).and_then(|d| {
                    if d > ProxyProtocol::MAX_TIMEOUT {
                        Err(format!(
                            "`{s}` is longer than {}s, the longest a header may take",
                            ProxyProtocol::MAX_TIMEOUT.as_secs()
                        ))
                    } else {
                        Ok(d)
                    }
                })
            },
        );
        let from = from?;
        for (i, net) in from.iter().enumerate() {
            if let Some(why) = ProxyProtocol::too_broad(net) {
                self.warn(&at(&at(&path, "from"), i), why);
            }
        }
        Some(ProxyProtocol {
            from,
            timeout: timeout?,
            waiting: HeaderWaits::default(),
        })
    }

    /// `mode` with the keys that go with it: `upstream` and `announce` for
    /// a reverse listener, neither for a transparent one.
    fn listener_mode(&mut self, r: &RawListener, path: &[Seg]) -> Option<ListenerMode> {
        let kinds = joined(ListenerKind::NAMES, " or ");
        let kind = self.required(&r.mode, path, "mode", &kinds, |s| {
            parse_enum(s, ListenerKind::NAMES)
        });
        let upstream = self.optional(&r.upstream, path, "upstream", |s| {
            parse_socket_addr(s, false)
        });
        let announce = self.optional(&r.announce, path, "announce", parse_announce);
        match (kind?, upstream, announce) {
            (ListenerKind::Reverse, Ok(Some(upstream)), Ok(announce)) => {
                Some(ListenerMode::Reverse { upstream, announce })
            }
            (ListenerKind::Reverse, Ok(None), _) => {
                self.err(
                    &at(path, "mode"),
                    "a reverse listener needs `upstream`, the FTP server's address:port",
                );
                None
            }
            (ListenerKind::Reverse, ..) => None,
            (ListenerKind::Transparent, upstream, announce) => {
                if !matches!(r.upstream, Field::Absent) && upstream.is_ok() {
                    self.err(
                        &at(path, "upstream"),
                        "a transparent listener takes no `upstream`: its server is the original destination of each intercepted connection",
                    );
                }
                if !matches!(r.announce, Field::Absent) && announce.is_ok() {
                    self.err(
                        &at(path, "announce"),
                        "`announce` applies to reverse listeners only: a transparent listener announces the server's own address",
                    );
                }
                Some(ListenerMode::Transparent)
            }
        }
    }

    /// A reverse listener whose upstream is one of the gateway's own
    /// listeners: each session would connect back to the gateway, which
    /// opens another, until the session limits end it. `index` is each
    /// listener's position in the file.
    fn no_upstream_loops(&mut self, listeners: &[Listener], index: &[usize]) {
        for (l, &i) in listeners.iter().zip(index) {
            let ListenerMode::Reverse { upstream, .. } = l.mode else {
                continue;
            };
            if let Some(own) = listeners.iter().find(|o| reaches(upstream, o.listen)) {
                self.err(
                    &[Seg::Key("listeners"), Seg::Index(i), Seg::Key("upstream")],
                    format!(
                        "upstream {upstream} is the gateway's own listener `{}` ({}): every session would connect back to the gateway (a loop)",
                        own.name, own.listen
                    ),
                );
            }
        }
    }

    fn data(&mut self, raw: &RawData) -> DataConfig {
        let path = [Seg::Key("data")];
        let d = DataConfig::default();
        let backend = self.value(&raw.backend, &path, "backend", d.backend, |s| {
            parse_enum(s, BackendKind::NAMES)
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
            self.disjoint_pools(raw, c, s);
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
        let conntrack_mark = self.value(
            &raw.conntrack_mark,
            &path,
            "conntrack_mark",
            d.conntrack_mark,
            parse_mark,
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
            conntrack_mark: conntrack_mark.unwrap_or(d.conntrack_mark),
            max_ports_per_client: max_ports_per_client.unwrap_or(d.max_ports_per_client),
        }
    }

    /// The client and server pools share no port.
    fn disjoint_pools(&mut self, raw: &RawData, c: PortRange, s: PortRange) {
        if c.lo <= s.hi && s.lo <= c.hi {
            // Point at whichever the operator wrote, the later one if both.
            let key = if matches!(raw.server_ports, Field::Set(_)) {
                "server_ports"
            } else {
                "client_ports"
            };
            self.err(
                &[Seg::Key("data"), Seg::Key(key)],
                format!(
                    "client_ports {c} and server_ports {s} overlap; the two pools must be disjoint"
                ),
            );
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
            out.push(self.rule(r, &path, Rule::new(name)));
        }
        out
    }

    /// The rule `r`, each key absent or in error taken from `d`.
    fn rule(&mut self, r: &RawRule, path: &[Seg], d: Rule) -> Rule {
        let clients = self.list(&r.clients, path, "clients", false, parse_cidr);
        let servers = self.list(&r.servers, path, "servers", false, parse_cidr);
        let action = self.value(&r.action, path, "action", d.action, |s| {
            parse_enum(s, Action::NAMES)
        });
        let modes = self.list(&r.modes, path, "modes", false, |s| {
            parse_enum(s, DataMode::NAMES)
        });
        if let Ok(Some(modes)) = &modes {
            self.unique_modes(modes, path);
        }
        let server_mode = self.value(&r.server_mode, path, "server_mode", d.server_mode, |s| {
            parse_enum(s, ServerMode::NAMES)
        });
        let data_ports = self.value(&r.data_ports, path, "data_ports", d.data_ports, parse_range);
        let tls = self.value(&r.tls, path, "tls", d.tls, super::tls::parse_rule_tls);
        let (require_tls, require_prot_p) = self.rule_tls(r, path, tls);
        let deny_commands = self.list(&r.deny_commands, path, "deny_commands", true, parse_verb);
        if let Ok(Some(verbs)) = &deny_commands {
            self.unique_verbs(verbs, path);
        }
        Rule {
            clients: clients.ok().flatten().unwrap_or(d.clients),
            servers: servers.ok().flatten().unwrap_or(d.servers),
            action: action.unwrap_or(d.action),
            modes: modes.ok().flatten().unwrap_or(d.modes),
            server_mode: server_mode.unwrap_or(d.server_mode),
            data_ports: data_ports.unwrap_or(d.data_ports),
            tls: tls.unwrap_or(d.tls),
            deny_commands: deny_commands.ok().flatten().unwrap_or(d.deny_commands),
            require_tls,
            require_prot_p,
            name: d.name,
        }
    }

    /// A mode listed twice is a slip, not a stronger allowance.
    fn unique_modes(&mut self, modes: &[DataMode], path: &[Seg]) {
        if modes
            .iter()
            .enumerate()
            .any(|(i, m)| modes[..i].contains(m))
        {
            self.err(
                &at(path, "modes"),
                format!(
                    "modes: list each of {} at most once",
                    joined(DataMode::NAMES, " and ")
                ),
            );
        }
    }

    /// Each repeat of a verb in `deny_commands`, at the repeat.
    fn unique_verbs(&mut self, verbs: &[String], path: &[Seg]) {
        for (j, v) in verbs.iter().enumerate() {
            if verbs[..j].contains(v) {
                self.err(
                    &at(&at(path, "deny_commands"), j),
                    format!("deny_commands: `{v}` is listed twice"),
                );
            }
        }
    }
}

/// True when connecting to `upstream` reaches a socket bound to `listen`:
/// the same address, or a loopback address of the family of a listener
/// bound to every address (an IPv6 listener is v6-only).
pub(super) fn reaches(upstream: SocketAddr, listen: SocketAddr) -> bool {
    let (to, at) = (upstream.ip().to_canonical(), listen.ip());
    upstream.port() == listen.port()
        && (to == at.to_canonical()
            || (at.is_unspecified() && to.is_loopback() && to.is_ipv4() == at.is_ipv4()))
}
