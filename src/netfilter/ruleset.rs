//! The nftables ruleset an operator needs, as `ftpgate nft --config F`
//! prints it: one template, `ruleset.nft`, with three sections: the
//! gateway's own table (`table.nft`), the control-port interception for
//! each transparent listener, and what the operator's filter chains must
//! accept.

use super::table::table_script;
use crate::config::{BackendKind, Config, ListenerMode};

/// The ruleset, with `${name}` for each value [`ruleset`] fills in.
const RULESET: &str = include_str!("ruleset.nft");

/// The ruleset for `config`.
pub fn ruleset(config: &Config) -> String {
    let d = &config.data;
    let kernel = d.backend == BackendKind::Nftables;
    let config_path = config.path.display().to_string();
    let timeout_ms = d.pinhole_timeout.as_millis().to_string();
    let client_ports = d.client_ports.to_string();
    let server_ports = d.server_ports.to_string();
    let values = [
        ("config", config_path.as_str()),
        ("timeout_ms", &timeout_ms),
        ("table_script", &table_script(&d.nftables_table)),
        ("interception", &interception(config)),
        ("table", &d.nftables_table),
        ("listener_rules", &listener_rules(config)),
        ("client_ports", &client_ports),
        ("server_ports", &server_ports),
        ("forward", if kernel { FORWARD } else { "" }),
        ("forward_note", if kernel { "" } else { FORWARD_NOTE }),
    ];
    fill(RULESET, &values)
}

/// Section 3's forward chain, for the kernel backend: it forwards
/// same-mode data connections, and an accept in the gateway's table cannot
/// override a drop in the operator's.
const FORWARD: &str = "\
#\t\tchain forward {
#\t\t\ttype filter hook forward priority filter; policy accept;
#\t\t\t# data.backend nftables: same-mode data connections are DNAT'd by
#\t\t\t# the gateway's table (@dnat4/@dnat6), whose own forward chain
#\t\t\t# accepts exactly each flow (@fwd4/@fwd6). Conversion plans are
#\t\t\t# relayed: the input rules above apply to them.
#\t\t\tct status dnat accept
#\t\t}
";

/// Section 3's note for the relay backend.
const FORWARD_NOTE: &str = "\
#    The forward chain needs nothing for FTP: the gateway ends both legs of
#    every control and data connection.
";

/// Section 2: a table that sends each transparent listener's control
/// connections to it.
fn interception(config: &Config) -> String {
    let transparent: Vec<_> = config
        .listeners
        .iter()
        .filter(|l| l.mode == ListenerMode::Transparent)
        .collect();
    if transparent.is_empty() {
        return "#    (No transparent listener: nothing to intercept.)\n".to_owned();
    }
    let mut out = format!(
        "table inet {}-edge {{\n\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n",
        config.data.nftables_table
    );
    for l in transparent {
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
        out += &format!(
            "\t\t# listener {:?} on {a}\n\t\tmeta nfproto {proto} fib daddr type != local tcp dport 21 {to}\n",
            l.name
        );
    }
    out + "\t}\n}\n"
}

/// Section 3's input rules for the listeners' control ports.
fn listener_rules(config: &Config) -> String {
    let mut out = String::new();
    for l in &config.listeners {
        let how = match l.mode {
            ListenerMode::Transparent => "control connections, through the redirect above",
            ListenerMode::Reverse { .. } => "control connections from clients",
        };
        out += &format!(
            "#\t\t\t# listener {:?}: {how}\n#\t\t\ttcp dport {} accept\n",
            l.name,
            l.listen.port()
        );
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
            "ct mark set ct mark | 0x10000000 ct helper set \"anchor4\"",
            "dnat ip to ip saddr . ip daddr . tcp dport map @dnat4",
            "snat ip6 to ip6 saddr . ip6 daddr . tcp dport map @ksnat6",
            "#\t\t\tct status dnat accept\n",
            "ip daddr . tcp dport @claim4 drop",
            "ip6 daddr . tcp dport @claim6 drop",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("forward chain needs nothing"), "{text}");
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
    fn a_value_is_never_read_as_a_template() {
        let mut cfg = full_config();
        cfg.path = PathBuf::from("rules/${table}-${nope}.yaml");
        let text = ruleset(&cfg);
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
