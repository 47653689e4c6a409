//! Several instances, one service: the check that a set of rule files can
//! run side by side behind one balancer (`ftpgate check --peer`), and the
//! balancer configuration for such a set (`ftpgate balancer`).
//!
//! A data connection must reach the instance that announced its port. So
//! instances that announce the same address (a balancer's VIP) own disjoint
//! slices of `client_ports`, and the balancer routes each slice to its
//! owner; the control port is spread over all of them.
//!
//! - `set`: the set check, and what instances of one service must agree on;
//! - `haproxy`, `nftables`: the two generators, pure text out.

mod haproxy;
mod nftables;
mod set;
#[cfg(test)]
mod tests;

pub use set::{check_set, SetError};

use crate::config::Config;

/// What `ftpgate balancer --format` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// An HAProxy configuration: PROXY v2 to each instance, health checks.
    Haproxy,
    /// An nftables table that DNATs to the instances, keeping the source.
    Nftables,
}

/// The balancer configuration for `set` in `format`, or every reason it
/// cannot be written (the set check's first).
pub fn generate(set: &[Config], format: Format) -> Result<String, Vec<SetError>> {
    check_set(set)?;
    match format {
        Format::Haproxy => haproxy::generate(set),
        Format::Nftables => nftables::generate(set),
    }
}

/// One control port on the balancer, spread over every instance.
#[derive(Debug)]
struct Control<'a> {
    /// The listener's name, the same in every instance.
    listener: &'a str,
    /// The address the instances announce: the balancer's.
    vip: std::net::IpAddr,
    /// The control port, the same in every instance.
    port: u16,
    /// Each instance's name and listen address.
    servers: Vec<(&'a str, std::net::SocketAddr)>,
}

/// One instance's slice of data ports on one VIP.
#[derive(Debug)]
struct Slice<'a> {
    instance: &'a str,
    vip: std::net::IpAddr,
    /// Where the instance listens (its data ports are on the same address).
    to: std::net::IpAddr,
    ports: crate::config::PortRange,
}

/// What both generators need, from a set that passed the set check; every
/// listener must announce a VIP and listen on a specified address.
fn plan(set: &[Config]) -> Result<(Vec<Control<'_>>, Vec<Slice<'_>>), Vec<SetError>> {
    use crate::config::ListenerMode;
    let mut errors = Vec::new();
    let mut controls: Vec<Control> = Vec::new();
    let mut slices: Vec<Slice> = Vec::new();
    for c in set {
        // The set check made sure each file has a name.
        let instance = c.instance.as_deref().unwrap_or_default();
        for l in &c.listeners {
            let at = format!("{}, listener `{}`", set::who(c), l.name);
            let ListenerMode::Reverse {
                announce: Some(vip),
                ..
            } = l.mode
            else {
                errors.push(format!(
                    "{at}: a balanced listener is a reverse listener whose `announce` is the balancer's address (the VIP)"
                ));
                continue;
            };
            let listen = l.listen.ip();
            if listen.is_unspecified() {
                errors.push(format!(
                    "{at}: listens on {listen}, which the balancer cannot connect to: listen on the instance's own address"
                ));
                continue;
            }
            if vip.is_ipv4() != listen.to_canonical().is_ipv4() {
                errors.push(format!(
                    "{at}: announces {vip} but listens on {listen}; the VIP and the instances must be of one address family"
                ));
                continue;
            }
            match controls.iter_mut().find(|k| k.listener == l.name) {
                Some(k) if k.vip != vip => errors.push(format!(
                    "{at}: announces {vip} but another instance announces {}; a balanced listener has one VIP",
                    k.vip
                )),
                Some(k) => k.servers.push((instance, l.listen)),
                None => controls.push(Control {
                    listener: &l.name,
                    vip,
                    port: l.listen.port(),
                    servers: vec![(instance, l.listen)],
                }),
            }
            if !slices
                .iter()
                .any(|s| s.instance == instance && s.vip == vip)
            {
                slices.push(Slice {
                    instance,
                    vip,
                    to: listen,
                    ports: c.data.client_ports,
                });
            }
        }
    }
    // Two balanced listeners on one VIP and port would be one frontend.
    for (i, k) in controls.iter().enumerate() {
        if let Some(o) = controls[..i]
            .iter()
            .find(|o| o.vip == k.vip && o.port == k.port)
        {
            errors.push(format!(
                "listeners `{}` and `{}` both take {}:{}; a balancer port leads to one listener",
                o.listener, k.listener, k.vip, k.port
            ));
        }
    }
    // A control port inside a slice on the same VIP would be bound twice
    // on the balancer, which would then split control connections between
    // the control frontend and one instance's data frontend.
    for s in &slices {
        for k in controls
            .iter()
            .filter(|k| k.vip == s.vip && s.ports.contains(k.port))
        {
            errors.push(format!(
                "instance `{}`: client_ports {} on {} contain the control port {} of listener `{}`; a balancer port leads to one place: choose client_ports that leave it out",
                s.instance, s.ports, s.vip, k.port, k.listener
            ));
        }
    }
    if errors.is_empty() {
        Ok((controls, slices))
    } else {
        Err(errors.into_iter().map(SetError).collect())
    }
}

/// The files, as given, for the header of the generated text.
fn sources(set: &[Config]) -> String {
    set.iter()
        .map(|c| format!("-c {}", c.path.display()))
        .collect::<Vec<_>>()
        .join(" ")
}
