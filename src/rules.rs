//! (client, server) → [`Decision`], made once per session at connect.

use crate::config::{Action, Config, DataMode, PortRange, ServerMode, TlsPolicy};
use std::net::{IpAddr, SocketAddr};

/// The policy a session runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The matching rule's name, for logs.
    pub rule: String,
    /// Data modes the client may ask for.
    pub modes: Vec<DataMode>,
    /// How the server leg is set up.
    pub server_mode: ServerMode,
    /// Ports an endpoint may name.
    pub data_ports: PortRange,
    /// What AUTH gets.
    pub tls: TlsPolicy,
    /// Verbs refused with 502, upper case.
    pub deny_commands: Vec<String>,
    /// USER before a completed AUTH TLS gets 530.
    pub require_tls: bool,
    /// A data command under PROT C gets 521.
    pub require_prot_p: bool,
}

/// The outcome of matching a new session against the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// A rule allowed it.
    Allow(Policy),
    /// A rule denied it (its name), or no rule matched (`None`).
    Deny(Option<String>),
}

/// First match wins; no match denies.
///
/// A rule matches when the client is inside one of its `clients` networks
/// and the server's IP inside one of its `servers` networks. An IPv4-mapped
/// IPv6 address (`::ffff:10.0.0.5`, as a dual-stack socket reports an IPv4
/// peer) is matched as the IPv4 address it carries, so IPv4 rules apply.
pub(crate) fn decide(config: &Config, client: IpAddr, server: SocketAddr) -> Decision {
    let client = client.to_canonical();
    let server = server.ip().to_canonical();
    let Some(rule) = config.rules.iter().find(|r| {
        r.clients.iter().any(|n| n.contains(&client))
            && r.servers.iter().any(|n| n.contains(&server))
    }) else {
        return Decision::Deny(None);
    };
    match rule.action {
        Action::Deny => Decision::Deny(Some(rule.name.clone())),
        Action::Allow => Decision::Allow(Policy {
            rule: rule.name.clone(),
            modes: rule.modes.clone(),
            server_mode: rule.server_mode,
            data_ports: rule.data_ports,
            tls: rule.tls,
            deny_commands: rule.deny_commands.clone(),
            require_tls: rule.require_tls,
            require_prot_p: rule.require_prot_p,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const RULES: &str = r#"
listeners:
  - name: edge
    listen: 127.0.0.1:0
    mode: transparent
rules:
  - name: no bounce lab
    clients: [10.0.0.0/24]
    servers: [198.51.100.0/24]
    action: deny
  - name: lan
    clients: [10.0.0.0/24, "fd00::/64"]
    modes: [passive]
    server_mode: active
    data_ports: 2000-3000
    tls: passthrough
    deny_commands: [site, Dele]
  - name: v6 servers
    servers: ["2001:db8::/32"]
  - name: mapped written as v6
    clients: ["::ffff:192.168.7.0/120"]
"#;

    fn config() -> Config {
        match Config::parse(RULES, Path::new("decide.yaml")) {
            Ok(c) => c,
            Err(e) => panic!("test rules do not load:\n{e}"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|_| panic!("bad test address {s}"))
    }

    fn sock(s: &str) -> SocketAddr {
        s.parse()
            .unwrap_or_else(|_| panic!("bad test socket address {s}"))
    }

    /// The rule that decided, as `allow NAME`, `deny NAME` or `deny -`.
    fn outcome(d: &Decision) -> String {
        match d {
            Decision::Allow(p) => format!("allow {}", p.rule),
            Decision::Deny(Some(name)) => format!("deny {name}"),
            Decision::Deny(None) => "deny -".to_string(),
        }
    }

    #[test]
    fn first_match_wins_and_no_match_denies() {
        let config = config();
        let cases = [
            // (client, server, outcome)
            ("10.0.0.5", "198.51.100.7:21", "deny no bounce lab"),
            ("10.0.0.5", "203.0.113.9:21", "allow lan"),
            ("10.0.0.255", "203.0.113.9:2121", "allow lan"),
            ("10.0.1.5", "203.0.113.9:21", "deny -"),
            ("fd00::1", "198.51.100.7:21", "allow lan"),
            ("fd00:0:0:1::1", "198.51.100.7:21", "deny -"),
            // A LAN client to a v6 server: the LAN rule comes first.
            ("10.0.0.5", "[2001:db8::21]:21", "allow lan"),
            ("192.0.2.1", "[2001:db8::21]:21", "allow v6 servers"),
            ("192.0.2.1", "[2001:db9::21]:21", "deny -"),
            // IPv4-mapped client and server addresses match IPv4 rules.
            ("::ffff:10.0.0.5", "198.51.100.7:21", "deny no bounce lab"),
            ("::ffff:10.0.0.5", "[::ffff:203.0.113.9]:21", "allow lan"),
            (
                "::ffff:10.0.0.5",
                "[::ffff:198.51.100.7]:21",
                "deny no bounce lab",
            ),
            ("::ffff:10.0.1.5", "203.0.113.9:21", "deny -"),
            // A mapped network in the file was turned into 192.168.7.0/24.
            (
                "192.168.7.9",
                "203.0.113.9:21",
                "allow mapped written as v6",
            ),
            (
                "::ffff:192.168.7.9",
                "203.0.113.9:21",
                "allow mapped written as v6",
            ),
            ("192.168.8.9", "203.0.113.9:21", "deny -"),
        ];
        for (client, server, want) in cases {
            let got = outcome(&decide(&config, ip(client), sock(server)));
            assert_eq!(got, want, "client {client}, server {server}");
        }
    }

    #[test]
    fn allow_carries_the_rule_policy() {
        let d = decide(&config(), ip("10.0.0.5"), sock("203.0.113.9:21"));
        let want = Policy {
            rule: "lan".to_string(),
            modes: vec![DataMode::Passive],
            server_mode: ServerMode::Active,
            data_ports: PortRange { lo: 2000, hi: 3000 },
            tls: TlsPolicy::Passthrough,
            deny_commands: vec!["SITE".to_string(), "DELE".to_string()],
            require_tls: false,
            require_prot_p: false,
        };
        assert_eq!(d, Decision::Allow(want));
    }

    #[test]
    fn omitted_fields_allow_any_with_defaults() {
        let d = decide(&config(), ip("192.0.2.1"), sock("[2001:db8::1]:21"));
        let want = Policy {
            rule: "v6 servers".to_string(),
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
        };
        assert_eq!(d, Decision::Allow(want));
    }

    #[test]
    fn empty_rule_list_denies_everything() {
        let mut config = config();
        config.rules.clear();
        let d = decide(&config, ip("10.0.0.5"), sock("203.0.113.9:21"));
        assert_eq!(d, Decision::Deny(None));
    }
}
