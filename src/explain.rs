//! `ftpgate explain`: which rule a (client, server) pair meets, and what the
//! session may then do, in the words of the rule file.

use crate::config::{Config, ServerMode, TlsPolicy};
use crate::rules::{decide, Decision};
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

/// The explanation, and whether a session would be allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// True when a rule allows the session.
    pub allowed: bool,
    /// Lines for a person, ending in a newline.
    pub text: String,
}

/// Explains [`decide`] for `client` connecting to `server` under `config`.
pub fn explain(config: &Config, client: IpAddr, server: SocketAddr) -> Explanation {
    let mut text = format!("client {client} → server {server}\n");
    // The rule's position helps to find it in the file; `decide` says
    // which rule won, and its position is the first with that outcome.
    let (c, s) = (client.to_canonical(), server.ip().to_canonical());
    let position = config.rules.iter().position(|r| {
        r.clients.iter().any(|n| n.contains(&c)) && r.servers.iter().any(|n| n.contains(&s))
    });
    let allowed = match (decide(config, client, server), position) {
        (Decision::Allow(p), Some(i)) => {
            let _ = writeln!(text, "allowed by rule {} `{}`", i + 1, p.rule);
            let modes: Vec<&str> = p.modes.iter().map(|m| m.as_str()).collect();
            let _ = writeln!(text, "  modes: {}", modes.join(", "));
            let _ = writeln!(text, "  server_mode: {}", server_mode(p.server_mode));
            let _ = writeln!(text, "  data_ports: {}", p.data_ports);
            let _ = writeln!(text, "  tls: {}", tls(p.tls));
            if p.tls == TlsPolicy::Terminate {
                let _ = writeln!(
                    text,
                    "  require_tls: {}",
                    if p.require_tls {
                        "true (USER before AUTH TLS gets 530)"
                    } else {
                        "false"
                    }
                );
                let _ = writeln!(
                    text,
                    "  require_prot_p: {}",
                    if p.require_prot_p {
                        "true (a transfer under PROT C gets 521)"
                    } else {
                        "false"
                    }
                );
            }
            let deny = if p.deny_commands.is_empty() {
                "(none)".to_string()
            } else {
                p.deny_commands.join(", ")
            };
            let _ = writeln!(text, "  deny_commands: {deny}");
            true
        }
        (Decision::Deny(Some(name)), Some(i)) => {
            let _ = writeln!(
                text,
                "refused by rule {} `{name}` (action: deny): the client gets 421",
                i + 1
            );
            false
        }
        _ => {
            let _ = writeln!(
                text,
                "refused: none of the {} rules matches both the client and the server, and no match denies: the client gets 421",
                config.rules.len()
            );
            false
        }
    };
    Explanation { allowed, text }
}

/// The rule file's name for `m`, and what it does.
fn server_mode(m: ServerMode) -> String {
    let what = match m {
        ServerMode::Same => "the mode the client asks for",
        ServerMode::Passive => "PASV/EPSV toward the server",
        ServerMode::Active => "PORT/EPRT toward the server",
    };
    format!("{} ({what})", m.as_str())
}

/// The rule file's name for `t`, and what it does.
fn tls(t: TlsPolicy) -> String {
    let what = match t {
        TlsPolicy::Refuse => "AUTH gets 534; the session stays in clear text",
        TlsPolicy::Passthrough => "after AUTH the gateway copies bytes and stops parsing",
        TlsPolicy::Terminate => {
            "the gateway answers AUTH TLS with the listener's certificate and keeps parsing; each leg's data follows its own PROT"
        }
    };
    format!("{} ({what})", t.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn terminate_shows_what_the_rule_requires() {
        let text = "listeners:\n  - name: lo\n    listen: 127.0.0.1:2121\n    mode: reverse\n    upstream: 127.0.0.1:21\nrules:\n  - name: ftps\n    tls: terminate\n    require_prot_p: true\n";
        let config = Config::parse(text, Path::new("t.yaml")).unwrap();
        let e = explain(
            &config,
            "10.0.0.5".parse().unwrap(),
            "127.0.0.1:21".parse().unwrap(),
        );
        assert!(e.allowed);
        assert!(
            e.text
                .contains("  tls: terminate (the gateway answers AUTH TLS"),
            "{}",
            e.text
        );
        assert!(e.text.contains("  require_tls: false\n"), "{}", e.text);
        assert!(
            e.text
                .contains("  require_prot_p: true (a transfer under PROT C gets 521)\n"),
            "{}",
            e.text
        );
    }
}
