//! The nftables rules an operator needs, as `ftpgate nft` prints them.
//!
//! `ftpgate nft --config F` prints one template, `ruleset.nft`, with three
//! sections: the gateway's own table (`table.nft`), the control-port
//! interception for each transparent listener, and what the operator's
//! filter chains must accept. `ftpgate nft --into FAMILY/TABLE --input C
//! --dstnat C` prints only the last two, as `add rule` commands into the
//! operator's existing chains ([`operator_rules`]).
//!
//! Both print the same, smallest set: input accepts for the listeners'
//! ports and the relay's data pools, and the interception. The forward chain
//! needs nothing: the kernel backend's data connections are RELATED to
//! their control connection, as the kernel FTP helper's are, so
//! `ct state established,related accept` admits them, and the relay ends
//! both legs on the gateway.

use super::table::table_script_for;
use crate::config::{BackendKind, Config, Listener, ListenerMode};
use std::fmt::Write as _;

/// The ruleset, with `${name}` for each value [`ruleset`] fills in.
const RULESET: &str = include_str!("ruleset.nft");

/// The control port `ftpgate nft` intercepts unless told others.
pub const DEFAULT_CONTROL_PORTS: &[u16] = &[21];

/// The ruleset for `config`, intercepting `control_ports` (none means
/// [`DEFAULT_CONTROL_PORTS`]) for its transparent listeners.
pub fn ruleset(config: &Config, control_ports: &[u16]) -> String {
    let d = &config.data;
    let kernel = d.backend == BackendKind::Nftables;
    let config_path = config.path.display().to_string();
    let timeout_ms = d.pinhole_timeout.as_millis().to_string();
    let client_ports = d.client_ports.to_string();
    let server_ports = d.server_ports.to_string();
    let values = [
        ("config", config_path.as_str()),
        ("timeout_ms", &timeout_ms),
        (
            "table_script",
            &table_script_for(&d.nftables_table, d.conntrack_mark),
        ),
        ("interception", &interception(config, control_ports)),
        ("table", &d.nftables_table),
        ("listener_rules", &listener_rules(config)),
        ("client_ports", &client_ports),
        ("server_ports", &server_ports),
        ("forward", if kernel { FORWARD } else { "" }),
        ("forward_note", if kernel { "" } else { FORWARD_NOTE }),
    ];
    fill(RULESET, &values)
}

/// Section 3's forward chain, for the kernel backend: the one rule that
/// admits its data connections is the one a firewall built for the kernel
/// FTP helper already has.
const FORWARD: &str = "\
#\t\tchain forward {
#\t\t\ttype filter hook forward priority filter; policy accept;
#\t\t\t# data.backend nftables: each same-mode data connection is RELATED
#\t\t\t# to its control connection (a conntrack expectation), as the
#\t\t\t# kernel FTP helper's are: nothing broader is needed. Conversion
#\t\t\t# plans are relayed: the input rules above apply to them.
#\t\t\tct state established,related accept
#\t\t}
";

/// Section 3's note for the relay backend.
const FORWARD_NOTE: &str = "\
#    The forward chain needs nothing for FTP: the gateway ends both legs of
#    every control and data connection.
";

/// `ports` as an nft expression: one port, or an anonymous set.
fn port_expr(ports: &[u16]) -> String {
    let ports = if ports.is_empty() {
        DEFAULT_CONTROL_PORTS
    } else {
        ports
    };
    let mut sorted = ports.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    match sorted.as_slice() {
        [one] => one.to_string(),
        many => {
            let list: Vec<String> = many.iter().map(u16::to_string).collect();
            format!("{{ {} }}", list.join(", "))
        }
    }
}

/// The transparent listeners, each with the rule (without chain) that sends
/// control connections to `control_ports` of addresses that are not the
/// gateway's own to it. `nfproto` prefixes the family match an inet table
/// needs.
fn interception_rules<'c>(
    config: &'c Config,
    control_ports: &[u16],
    nfproto: bool,
) -> Vec<(&'c Listener, String)> {
    let ports = port_expr(control_ports);
    config
        .listeners
        .iter()
        .filter(|l| l.mode == ListenerMode::Transparent)
        .map(|l| {
            let a = l.listen;
            let (proto, fam) = if a.is_ipv4() {
                ("ipv4", "ip")
            } else {
                ("ipv6", "ip6")
            };
            let to = if a.ip().is_unspecified() {
                // Any local address will do: the one of the incoming interface.
                format!("redirect to :{}", a.port())
            } else {
                // The listener is bound to one address; `redirect` would pick
                // the incoming interface's primary address, which may differ.
                format!("dnat {fam} to {a}")
            };
            let family = if nfproto {
                format!("meta nfproto {proto} ")
            } else {
                String::new()
            };
            let rule = format!("{family}fib daddr type != local tcp dport {ports} {to}");
            (l, rule)
        })
        .collect()
}

/// Section 2: a table that sends each transparent listener's control
/// connections to it.
fn interception(config: &Config, control_ports: &[u16]) -> String {
    let rules = interception_rules(config, control_ports, true);
    if rules.is_empty() {
        return "#    (No transparent listener: nothing to intercept.)\n".to_owned();
    }
    let mut out = format!(
        "table inet {}-edge {{\n\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n",
        config.data.nftables_table
    );
    for (l, rule) in rules {
        let _ = writeln!(
            out,
            "\t\t# listener {:?} on {}\n\t\t{rule}",
            l.name, l.listen
        );
    }
    out + "\t}\n}\n"
}

/// Why each listener's control port is accepted.
fn listener_purpose(l: &Listener) -> &'static str {
    match l.mode {
        ListenerMode::Transparent => "control connections, through the redirect",
        ListenerMode::Reverse { .. } => "control connections from clients",
    }
}

/// Section 3's input rules for the listeners' control ports.
fn listener_rules(config: &Config) -> String {
    let mut out = String::new();
    for l in &config.listeners {
        let _ = writeln!(
            out,
            "#\t\t\t# listener {:?}: {}\n#\t\t\ttcp dport {} accept",
            l.name,
            listener_purpose(l),
            l.listen.port()
        );
    }
    out
}

/// The nftables families whose tables [`operator_rules`] can write into.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4 only: the IPv6 listeners' rules are left out.
    Ip,
    /// IPv6 only: the IPv4 listeners' rules are left out.
    Ip6,
    /// Both.
    Inet,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Inet => "inet",
        }
    }

    fn admits(self, l: &Listener) -> bool {
        match self {
            Family::Ip => l.listen.is_ipv4(),
            Family::Ip6 => l.listen.is_ipv6(),
            Family::Inet => true,
        }
    }
}

/// The operator's own table and chains that `ftpgate nft --into` writes
/// `add rule` commands for; a group of rules is left out when its chain is
/// not given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorChains {
    /// The table's family.
    pub family: Family,
    /// The table, which must exist.
    pub table: String,
    /// A filter chain on (or jumped to from) the input hook.
    pub input: Option<String>,
    /// A filter chain on (or jumped to from) the forward hook.
    pub forward: Option<String>,
    /// A nat chain on (or jumped to from) prerouting, priority dstnat.
    pub dstnat: Option<String>,
}

impl OperatorChains {
    /// Checks `into` (`FAMILY/TABLE`, e.g. `inet/filter`) and the chain
    /// names, or says what is wrong with the first bad one.
    pub fn new(
        into: &str,
        input: Option<String>,
        forward: Option<String>,
        dstnat: Option<String>,
    ) -> Result<Self, String> {
        let Some((family, table)) = into.split_once('/') else {
            return Err(format!(
                "--into `{into}`: expected FAMILY/TABLE, e.g. inet/filter"
            ));
        };
        let family = match family {
            "ip" => Family::Ip,
            "ip6" => Family::Ip6,
            "inet" => Family::Inet,
            other => {
                return Err(format!(
                    "--into `{into}`: the family `{other}` is not ip, ip6 or inet"
                ))
            }
        };
        check_name("--into", "table", table)?;
        for (option, chain) in [
            ("--input", &input),
            ("--forward", &forward),
            ("--dstnat", &dstnat),
        ] {
            if let Some(name) = chain {
                check_name(option, "chain", name)?;
            }
        }
        if input.is_none() && forward.is_none() && dstnat.is_none() {
            return Err("--into needs at least one of --input, --forward and --dstnat".into());
        }
        Ok(OperatorChains {
            family,
            table: table.to_owned(),
            input,
            forward,
            dstnat,
        })
    }
}

/// A table or chain name that nft reads as a name, unquoted, everywhere:
/// a letter or `_` first, then letters, digits, `_` and `-`.
fn check_name(option: &str, what: &str, name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    let ok = first_ok
        && name.len() <= 64
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{option}: `{name}` is not a {what} name: 1-64 characters of A-Z, a-z, 0-9, `_` and `-`, \
             starting with a letter or `_`"
        ))
    }
}

/// The operator's rules for `config`, as `add rule` commands into `chains`,
/// for `nft -f -`: the input accepts for the listeners' control ports and
/// the relay's data pools, and the interception of `control_ports` (none
/// means [`DEFAULT_CONTROL_PORTS`]) for the transparent listeners. The
/// forward chain needs nothing, which a comment says.
pub fn operator_rules(config: &Config, chains: &OperatorChains, control_ports: &[u16]) -> String {
    let d = &config.data;
    let at = |chain: &str| format!("add rule {} {} {chain}", chains.family.name(), chains.table);
    let mut out = format!(
        "# ftpgate's rules for the chains of table {} {} ({})\n",
        chains.family.name(),
        chains.table,
        config.path.display()
    );
    if let Some(chain) = &chains.input {
        let _ = writeln!(out, "# {chain}: what the gateway itself accepts");
        let mut seen = Vec::new();
        for l in config.listeners.iter().filter(|l| chains.family.admits(l)) {
            let port = l.listen.port();
            let _ = writeln!(out, "# listener {:?}: {}", l.name, listener_purpose(l));
            if seen.contains(&port) {
                let _ = writeln!(out, "#   (port {port} is accepted above)");
                continue;
            }
            seen.push(port);
            let _ = writeln!(out, "{} tcp dport {port} accept", at(chain));
        }
        let _ = writeln!(
            out,
            "# client_ports: passive data connections from clients, for relayed plans\n{} tcp dport {} accept",
            at(chain),
            d.client_ports
        );
        let _ = writeln!(
            out,
            "# server_ports: active data connections from servers, for relayed plans\n{} tcp dport {} accept",
            at(chain),
            d.server_ports
        );
    }
    if let Some(chain) = &chains.forward {
        let why = if d.backend == BackendKind::Nftables {
            "the kernel's data connections are RELATED, \
             which `ct state established,related accept` admits"
        } else {
            "the gateway ends both legs of every control and data connection"
        };
        let _ = writeln!(out, "# {chain}: nothing to add: {why}");
    }
    if let Some(chain) = &chains.dstnat {
        let rules: Vec<_> =
            interception_rules(config, control_ports, chains.family == Family::Inet)
                .into_iter()
                .filter(|(l, _)| chains.family.admits(l))
                .collect();
        if rules.is_empty() {
            let _ = writeln!(out, "# {chain}: nothing to add: no transparent listener");
        } else {
            let _ = writeln!(
                out,
                "# {chain}: control connections to the transparent listeners"
            );
        }
        for (l, rule) in rules {
            let _ = writeln!(
                out,
                "# listener {:?} on {}\n{} {rule}",
                l.name,
                l.listen,
                at(chain)
            );
        }
    }
    out
}

/// `template` with each `${name}` replaced by its value, in one pass: a
/// value (a configuration's path, say) is never read as a template.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() * 2);
    let mut rest = template;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let value = after.find('}').and_then(|end| {
            let name = &after[..end];
            values
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v, end))
        });
        match value {
            Some((v, end)) => {
                out.push_str(v);
                rest = &after[end + 1..];
            }
            None => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        Action, BackendKind, DataConfig, DataMode, Limits, Listener, PortRange, Rule, ServerMode,
        TlsPolicy,
    };
    use crate::netfilter::netns::{skip, Netns};
    use std::path::PathBuf;

    use std::time::Duration;

    fn config(listeners: Vec<Listener>) -> Config {
        Config {
            path: PathBuf::from("rules/test.yaml"),
            instance: None,
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
                conntrack_mark: 0x1000_0000,
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
                require_tls: false,
                require_prot_p: false,
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
            proxy_protocol: None,
            upstream_proxy_protocol: None,
            tls: None,
            upstream_tls: None,
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
        let text = ruleset(&full_config(), DEFAULT_CONTROL_PORTS);
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
    fn ruleset_for_the_kernel_backend_needs_no_broad_forward_accept() {
        let mut cfg = full_config();
        let relay = ruleset(&cfg, DEFAULT_CONTROL_PORTS);
        assert!(relay.contains("forward chain needs nothing"), "{relay}");
        cfg.data.backend = BackendKind::Nftables;
        // The gateway's own table is shown as it creates it, with its mark.
        cfg.data.conntrack_mark = 0x0200_0000;
        let text = ruleset(&cfg, DEFAULT_CONTROL_PORTS);
        assert!(
            text.contains(&table_script_for("ftpgate", 0x0200_0000)),
            "{text}"
        );
        let hints = hint_lines(&text);
        assert!(
            hints.contains("\tchain forward {\n")
                && hints.contains("\tct state established,related accept\n"),
            "{hints}"
        );
        assert!(!operator_part(&text).contains("ct status dnat"), "{text}");
        assert!(!text.contains("forward chain needs nothing"), "{text}");
    }

    #[test]
    fn ruleset_intercepts_the_control_ports_given() {
        let text = ruleset(&full_config(), &[2122, 2121, 2122]);
        assert!(
            text.contains("tcp dport { 2121, 2122 } redirect to :8022"),
            "{text}"
        );
        let section2 = operator_part(&text).split("\n# 3. ").next().unwrap_or("");
        assert!(
            section2.contains("dnat ip6 to [2001:db8::1]:8021"),
            "{text}"
        );
        assert!(!section2.contains("tcp dport 21 "), "{text}");
    }

    /// Sections 2 and 3: what goes into the operator's own chains.
    fn operator_part(text: &str) -> &str {
        let at = text
            .find("\n# 2. Control-port interception")
            .expect("section 2");
        &text[at..]
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
        let text = ruleset(&cfg, DEFAULT_CONTROL_PORTS);
        assert!(!text.contains("-edge"), "{text}");
        assert!(text.contains("No transparent listener"), "{text}");
    }

    #[test]
    fn ruleset_passes_nft_check() {
        let Some(ns) = Netns::new() else { return };
        for cfg in [full_config(), config(vec![])] {
            let text = ruleset(&cfg, DEFAULT_CONTROL_PORTS);
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
            let hints = hint_lines(&ruleset(&cfg, DEFAULT_CONTROL_PORTS));
            // Every listener and both pools have a rule in the example.
            for port in ["8021", "8022", "21", "40000-40999", "41000-41999"] {
                let rule = format!("\ttcp dport {port} accept\n");
                assert!(hints.contains(&rule), "no {rule:?} in\n{hints}");
            }
            assert!(!hints.contains("ct status dnat"), "{hints}");
            assert_eq!(
                hints.contains("chain forward {"),
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

    fn chains(into: &str, input: bool, forward: bool, dstnat: bool) -> OperatorChains {
        let name = |on: bool, n: &str| on.then(|| n.to_owned());
        OperatorChains::new(
            into,
            name(input, "tgt_input"),
            name(forward, "tgt_forward"),
            name(dstnat, "tgt_dnat"),
        )
        .unwrap()
    }

    /// The `add rule` lines of `text`, without their `add rule FAMILY TABLE`.
    fn added(text: &str, prefix: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn operator_rules_are_the_listeners_the_pools_and_the_interception() {
        let mut cfg = full_config();
        cfg.data.backend = BackendKind::Nftables;
        let text = operator_rules(&cfg, &chains("inet/lab", true, true, true), &[21, 2121]);
        let rules = added(&text, "add rule inet lab ");
        assert_eq!(
            rules,
            [
                "tgt_input tcp dport 8021 accept",
                "tgt_input tcp dport 8022 accept",
                "tgt_input tcp dport 21 accept",
                "tgt_input tcp dport 40000-40999 accept",
                "tgt_input tcp dport 41000-41999 accept",
                "tgt_dnat meta nfproto ipv4 fib daddr type != local tcp dport { 21, 2121 } dnat ip to 10.0.0.1:8021",
                "tgt_dnat meta nfproto ipv4 fib daddr type != local tcp dport { 21, 2121 } redirect to :8022",
                "tgt_dnat meta nfproto ipv6 fib daddr type != local tcp dport { 21, 2121 } dnat ip6 to [2001:db8::1]:8021",
            ],
            "{text}"
        );
        // Two listeners on 8021 share one accept; forward gets none, and says why.
        assert!(text.contains("#   (port 8021 is accepted above)"), "{text}");
        assert!(
            text.contains(
                "# tgt_forward: nothing to add: the kernel's data connections are RELATED"
            ),
            "{text}"
        );
        // Every line is a comment or a rule.
        for line in text.lines() {
            assert!(
                line.starts_with('#') || line.starts_with("add rule inet lab "),
                "{line}"
            );
        }
    }

    #[test]
    fn operator_rules_leave_out_what_is_not_asked_for() {
        let cfg = full_config();
        let text = operator_rules(&cfg, &chains("inet/lab", false, false, true), &[]);
        let rules = added(&text, "add rule inet lab ");
        assert_eq!(rules.len(), 3, "{text}");
        assert!(
            rules
                .iter()
                .all(|r| r.starts_with("tgt_dnat ") && r.contains("tcp dport 21 ")),
            "{text}"
        );
        // An ip table gets the IPv4 listeners' rules only, without a family match.
        let text = operator_rules(&cfg, &chains("ip/fw", true, false, true), &[]);
        let rules = added(&text, "add rule ip fw ");
        assert!(
            rules.contains(
                &"tgt_dnat fib daddr type != local tcp dport 21 redirect to :8022".to_owned()
            ),
            "{text}"
        );
        assert!(!text.contains("\"lan6\""), "{text}");
        assert!(!text.contains("ip6") && !text.contains("nfproto"), "{text}");
        let text = operator_rules(&cfg, &chains("ip6/fw", true, false, true), &[]);
        let rules = added(&text, "add rule ip6 fw ");
        assert_eq!(
            rules
                .iter()
                .filter(|r| r.starts_with("tgt_dnat "))
                .collect::<Vec<_>>(),
            ["tgt_dnat fib daddr type != local tcp dport 21 dnat ip6 to [2001:db8::1]:8021"],
            "{text}"
        );
        // Without a transparent listener the dstnat chain gets nothing, and is told so.
        let reverse_only = config(vec![listener(
            "public-ftp",
            "192.0.2.1:21",
            ListenerMode::Reverse {
                upstream: "10.0.0.3:21".parse().unwrap(),
                announce: None,
            },
        )]);
        let text = operator_rules(&reverse_only, &chains("inet/lab", false, false, true), &[]);
        assert!(added(&text, "add rule").is_empty(), "{text}");
        assert!(
            text.contains("# tgt_dnat: nothing to add: no transparent listener"),
            "{text}"
        );
    }

    #[test]
    fn operator_chains_refuse_bad_names_with_the_option_named() {
        let some = |s: &str| Some(s.to_owned());
        for (into, input, dstnat, want) in [
            (
                "inet",
                some("in"),
                None,
                "--into `inet`: expected FAMILY/TABLE",
            ),
            (
                "bridge/fw",
                some("in"),
                None,
                "the family `bridge` is not ip, ip6 or inet",
            ),
            ("inet/", some("in"), None, "--into: `` is not a table name"),
            (
                "inet/1fw",
                some("in"),
                None,
                "--into: `1fw` is not a table name",
            ),
            (
                "inet/fw;x",
                some("in"),
                None,
                "--into: `fw;x` is not a table name",
            ),
            (
                "inet/fw",
                some("in put"),
                None,
                "--input: `in put` is not a chain name",
            ),
            (
                "inet/fw",
                None,
                some("nat\naccept"),
                "--dstnat: `nat\naccept` is not a chain name",
            ),
            (
                "inet/fw",
                None,
                None,
                "--into needs at least one of --input, --forward and --dstnat",
            ),
        ] {
            let err = OperatorChains::new(into, input, None, dstnat).unwrap_err();
            assert!(err.contains(want), "{into}: {err}");
        }
        let ok = OperatorChains::new("ip6/my_fw-1", some("_in"), some("FWD"), None).unwrap();
        assert_eq!((ok.family, ok.table.as_str()), (Family::Ip6, "my_fw-1"));
        assert_eq!(ok.dstnat, None);
    }

    /// A table with the chains of an operator's firewall like the lab's: base
    /// chains that drop by default and jump to the chains given to --into.
    fn operator_table(family: &str) -> String {
        format!(
            "table {family} lab {{
\tchain tgt_input {{ }}
\tchain tgt_forward {{ }}
\tchain tgt_dnat {{ }}
\tchain nat_pre {{ type nat hook prerouting priority dstnat; policy accept; jump tgt_dnat; }}
\tchain input {{ type filter hook input priority filter; policy drop; ct state established,related accept; jump tgt_input; }}
\tchain forward {{ type filter hook forward priority filter; policy drop; ct state established,related accept; jump tgt_forward; }}
}}
"
        )
    }

    #[test]
    fn operator_rules_load_into_the_operators_chains_and_accept_nothing_broad() {
        let Some(ns) = Netns::new() else { return };
        for backend in [BackendKind::Relay, BackendKind::Nftables] {
            let mut cfg = full_config();
            cfg.data.backend = backend;
            for family in ["inet", "ip", "ip6"] {
                let text = operator_rules(
                    &cfg,
                    &chains(&format!("{family}/lab"), true, true, true),
                    &[21, 2121],
                );
                let script = operator_table(family) + &text;
                let (ok, msg) = ns.nft(&["-c", "-f", "-"], Some(&script));
                assert!(ok, "nft -c rejected the rules: {msg}\n{script}");
                // Nothing broad: every accept names a port; nothing goes to forward.
                for rule in added(&text, &format!("add rule {family} lab ")) {
                    assert!(rule.contains(" tcp dport "), "{rule}");
                    assert!(!rule.starts_with("tgt_forward"), "{rule}");
                    assert!(
                        !rule.contains("ct status") && !rule.contains("ct state"),
                        "{rule}"
                    );
                }
            }
        }
        // The check has teeth: a rule for a chain the table lacks is refused.
        let text = operator_rules(
            &full_config(),
            &OperatorChains::new("inet/lab", Some("nope".into()), None, None).unwrap(),
            &[],
        );
        let (ok, _) = ns.nft(&["-c", "-f", "-"], Some(&(operator_table("inet") + &text)));
        assert!(!ok, "nft -c took a rule for a missing chain");
    }

    #[test]
    fn a_value_is_never_read_as_a_template() {
        let mut cfg = full_config();
        cfg.path = PathBuf::from("rules/${table}-${nope}.yaml");
        let text = ruleset(&cfg, DEFAULT_CONTROL_PORTS);
        assert!(
            text.starts_with("# nftables ruleset for ftpgate (rules/${table}-${nope}.yaml)\n"),
            "{text}"
        );
        // Every placeholder of the template was filled in.
        let rest = text.split_once('\n').map_or("", |(_, rest)| rest);
        assert!(!rest.contains("${"), "{text}");
        assert_eq!(fill("a ${x} ${y} $", &[("x", "${y}")]), "a ${y} ${y} $");
    }
}
