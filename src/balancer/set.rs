//! The set check: rule files that run as instances of one service.
//!
//! Each instance has a unique `instance` name. Instances that are reached at
//! the same address (the same `announce`, or no `announce` and the same
//! listen address) own disjoint `client_ports`, or a data connection could
//! reach an instance that did not announce its port.
//!
//! A balancer sends a client to any instance, so what a client meets must not
//! depend on which one it got. The instances also agree on:
//! - the listeners, by name: the same `mode`, control port, `upstream` and
//!   `proxy_protocol.from` (the balancer forwards one port and sends, or does
//!   not send, one kind of header to all of them);
//! - the rules (first match wins, so their order too);
//! - `max_sessions_per_client` (a balancer that keeps a client on one
//!   instance makes it that instance's limit).
//!
//! Pool sizes, `max_sessions`, timeouts and the data backend may differ: a
//! bigger box may take more.

use crate::config::{Config, Listener, ListenerMode, PortRange};
use std::net::IpAddr;

/// Why a set of files cannot be instances of one service, naming the files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetError(pub String);

impl std::fmt::Display for SetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks `set` (each file already valid on its own) as the instances of one
/// service. Every problem is reported, in file order.
pub fn check_set(set: &[Config]) -> Result<(), Vec<SetError>> {
    let mut errors = Vec::new();
    names(set, &mut errors);
    if let Some((first, rest)) = set.split_first() {
        for other in rest {
            agree(first, other, &mut errors);
        }
    }
    for (i, a) in set.iter().enumerate() {
        for b in &set[i + 1..] {
            disjoint(a, b, &mut errors);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.into_iter().map(SetError).collect())
    }
}

/// `file (instance `name`)`, or the file alone when it has no name.
pub(super) fn who(c: &Config) -> String {
    match &c.instance {
        Some(name) => format!("{} (instance `{name}`)", c.path.display()),
        None => c.path.display().to_string(),
    }
}

/// Every file names its instance, and no two names are the same.
fn names(set: &[Config], errors: &mut Vec<String>) {
    for (i, c) in set.iter().enumerate() {
        let Some(name) = &c.instance else {
            errors.push(format!(
                "{}: no `instance` name; each instance of a service needs one (`instance: NAME` at the top of the file)",
                c.path.display()
            ));
            continue;
        };
        if let Some(first) = set[..i].iter().find(|o| o.instance.as_ref() == Some(name)) {
            errors.push(format!(
                "{} and {}: both are instance `{name}`; each instance needs its own name",
                first.path.display(),
                c.path.display()
            ));
        }
    }
}

/// What `b` must share with `a`: listeners, rules, the per-client limit.
fn agree(a: &Config, b: &Config, errors: &mut Vec<String>) {
    if listed(a) != listed(b) {
        errors.push(format!(
            "{} has listeners {} but {} has {}; instances of one service have the same listeners",
            who(b),
            quoted(&listed(b)),
            who(a),
            quoted(&listed(a))
        ));
    }
    for la in &a.listeners {
        let Some(lb) = b.listeners.iter().find(|l| l.name == la.name) else {
            continue;
        };
        let what = |s: String| format!("listener `{}`: {s}", la.name);
        if la.mode.kind() != lb.mode.kind() {
            errors.push(what(format!(
                "{} has mode {} but {} has {}",
                who(b),
                lb.mode.kind().as_str(),
                who(a),
                la.mode.kind().as_str()
            )));
        }
        if la.listen.port() != lb.listen.port() {
            errors.push(what(format!(
                "{} listens on port {} but {} on port {}; a balancer forwards one control port to every instance",
                who(b),
                lb.listen.port(),
                who(a),
                la.listen.port()
            )));
        }
        if let (
            ListenerMode::Reverse { upstream: ua, .. },
            ListenerMode::Reverse { upstream: ub, .. },
        ) = (&la.mode, &lb.mode)
        {
            if ua != ub {
                errors.push(what(format!(
                    "{} has upstream {ub} but {} has {ua}; a client would see other files on another instance",
                    who(b),
                    who(a)
                )));
            }
        }
        let from = |l: &Listener| l.proxy_protocol.as_ref().map(|p| p.from.clone());
        if from(la) != from(lb) {
            let show = |l: &Listener| match &l.proxy_protocol {
                Some(p) => format!(
                    "proxy_protocol from [{}]",
                    p.from
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => "no proxy_protocol".to_string(),
            };
            errors.push(what(format!(
                "{} has {} but {} has {}; the balancer sends the same header to every instance",
                who(b),
                show(lb),
                who(a),
                show(la)
            )));
        }
    }
    if a.rules != b.rules {
        let n = a.rules.len().min(b.rules.len());
        let at = (0..n).find(|&i| a.rules[i] != b.rules[i]).unwrap_or(n);
        let name = |c: &Config| {
            c.rules
                .get(at)
                .map_or_else(|| "none".to_string(), |r| format!("`{}`", r.name))
        };
        errors.push(format!(
            "{} and {}: the rules differ, first at rule {} ({} and {}); a client's access would depend on the instance the balancer picks",
            who(a),
            who(b),
            at + 1,
            name(a),
            name(b)
        ));
    }
    let (pa, pb) = (
        a.limits.max_sessions_per_client,
        b.limits.max_sessions_per_client,
    );
    if pa != pb {
        errors.push(format!(
            "{} has max_sessions_per_client {pb} but {} has {pa}; a client's limit would depend on the instance the balancer picks",
            who(b),
            who(a)
        ));
    }
}

/// A file's listener names, sorted.
fn listed(c: &Config) -> Vec<&str> {
    let mut names: Vec<&str> = c.listeners.iter().map(|l| l.name.as_str()).collect();
    names.sort_unstable();
    names
}

/// `a` and `b` share no client port where they share an address.
fn disjoint(a: &Config, b: &Config, errors: &mut Vec<String>) {
    let (ra, rb) = (a.data.client_ports, b.data.client_ports);
    let Some(both) = overlap(ra, rb) else {
        return;
    };
    let shared = a.listeners.iter().find_map(|la| {
        b.listeners
            .iter()
            .find(|lb| reached_at(la) == reached_at(lb))
            .map(|lb| (la, lb))
    });
    let Some((la, lb)) = shared else {
        return;
    };
    errors.push(format!(
        "{} and {}: client_ports {ra} and {rb} overlap ({both}), and both are reached at {} (listener `{}` of the first {}, listener `{}` of the second {}); a data connection to a shared port could reach the instance that did not announce it: give each instance a disjoint slice of client_ports",
        who(a),
        who(b),
        reached_at(la),
        la.name,
        describe(la),
        lb.name,
        describe(lb),
    ));
}

/// The address a client is told to open data connections to: `announce`,
/// or else the listen address (which, unspecified, stands for whatever
/// address the client reached).
pub(super) fn reached_at(l: &Listener) -> IpAddr {
    match l.mode {
        ListenerMode::Reverse {
            announce: Some(a), ..
        } => a.to_canonical(),
        _ => l.listen.ip().to_canonical(),
    }
}

fn describe(l: &Listener) -> String {
    match l.mode {
        ListenerMode::Reverse {
            announce: Some(a), ..
        } => format!("announces {a}"),
        _ => format!("announces nothing and listens on {}", l.listen.ip()),
    }
}

/// The ports two ranges share, if any.
pub(super) fn overlap(a: PortRange, b: PortRange) -> Option<PortRange> {
    let (lo, hi) = (a.lo.max(b.lo), a.hi.min(b.hi));
    (lo <= hi).then_some(PortRange { lo, hi })
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
