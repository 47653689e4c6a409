//! (client, server) → [`Decision`], made once per session at connect.

use crate::config::{Config, DataMode, PortRange, ServerMode, TlsPolicy};
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
}

/// The outcome of matching a new session against the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A rule allowed it.
    Allow(Policy),
    /// A rule denied it (its name), or no rule matched (`None`).
    Deny(Option<String>),
}

/// First match wins; no match denies.
pub fn decide(config: &Config, client: IpAddr, server: SocketAddr) -> Decision {
    let _ = (config, client, server);
    unimplemented!()
}
