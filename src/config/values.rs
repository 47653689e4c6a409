//! Value parsers: one scalar's text → its typed value, or a message that
//! says how to fix it.

use super::types::{AuditTarget, PortRange, PortShare, AUDIT_STDOUT};
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The value named `s` in an enum's `NAMES` table.
pub(super) fn parse_enum<T: Copy>(s: &str, table: &[(&str, T)]) -> Result<T, String> {
    table
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            format!(
                "unknown value `{s}`, expected one of: {}",
                joined(table, ", ")
            )
        })
}

/// An enum's names as a message lists them: `passive, active`,
/// `reverse or transparent`.
pub(super) fn joined<T>(table: &[(&str, T)], separator: &str) -> String {
    let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
    names.join(separator)
}

/// `-` is standard output; anything else a file path.
pub(super) fn parse_audit_target(s: &str) -> Result<AuditTarget, String> {
    if s == AUDIT_STDOUT {
        Ok(AuditTarget::Stdout)
    } else if s.trim().is_empty() {
        Err("the path is blank".to_string())
    } else if s.chars().any(char::is_control) {
        Err("the path contains a control character".to_string())
    } else {
        Ok(AuditTarget::File(PathBuf::from(s)))
    }
}

/// Names appear in log lines, so control characters (a newline could forge
/// a log entry) are refused.
pub(super) fn parse_name(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("the name is blank".to_string())
    } else if s.chars().any(char::is_control) {
        Err("the name contains a control character".to_string())
    } else {
        Ok(s.to_string())
    }
}

/// `10.0.0.0/24`, `2001:db8::/32`, or one address. IPv4-mapped IPv6
/// networks become IPv4 ones, because client and server addresses are
/// matched in their IPv4 form.
pub(super) fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    let net = match t.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match t.parse::<IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => {
                return Err(format!(
                    "`{s}` is not a CIDR such as 10.0.0.0/24 or 2001:db8::/32, nor an address"
                ))
            }
        },
    };
    Ok(unmap_net(net))
}

pub(super) fn unmap_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, n.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

/// `192.0.2.1:21` or `[2001:db8::1]:21`. Port 0 is allowed only where the
/// kernel picks the port (a listen address in tests).
pub(super) fn parse_socket_addr(s: &str, port0_ok: bool) -> Result<SocketAddr, String> {
    let t = s.trim();
    match t.parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 && !port0_ok => Err(format!("`{s}` has port 0")),
        Ok(a) if !port0_ok && a.ip().is_unspecified() => {
            Err(format!("`{s}` is not a concrete address to connect to"))
        }
        Ok(a) => Ok(a),
        Err(_) => Err(match t.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => format!("`{s}` has no port; write e.g. {ip}:21"),
            Ok(IpAddr::V6(ip)) => format!("`{s}` has no port; write e.g. [{ip}]:21"),
            Err(_) if t.matches(':').count() > 1 && !t.starts_with('[') => {
                format!("`{s}`: an IPv6 address needs brackets, e.g. [2001:db8::1]:21")
            }
            Err(_) => format!(
                "`{s}` is not address:port such as 192.0.2.1:21 or [2001:db8::1]:21 (host names are not resolved)"
            ),
        }),
    }
}

pub(super) fn parse_announce(s: &str) -> Result<IpAddr, String> {
    match s.trim().parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => Err(format!("`{s}` cannot be announced to clients")),
        Ok(ip) => Ok(ip),
        Err(_) => Err(format!(
            "`{s}` is not an IP address (no port: the data port is chosen per transfer)"
        )),
    }
}

/// `lo-hi` or a single port `n`; 1 ≤ lo ≤ hi ≤ 65535.
pub(super) fn parse_range(s: &str) -> Result<PortRange, String> {
    let t = s.trim();
    let (lo, hi) = match t.split_once('-') {
        Some((lo, hi)) => (lo.trim(), hi.trim()),
        None => (t, t),
    };
    let port = |p: &str| -> Result<u16, String> {
        match p.parse::<u32>() {
            Ok(0) => Err(format!("`{s}`: port 0 is not a usable port")),
            Ok(n) => u16::try_from(n).map_err(|_| format!("`{s}`: port {n} is above 65535")),
            Err(_) => Err(format!(
                "`{s}` is not a port range such as 40000-40999, or a single port"
            )),
        }
    };
    let (lo, hi) = (port(lo)?, port(hi)?);
    if lo > hi {
        return Err(format!("`{s}` is reversed; write {hi}-{lo}"));
    }
    Ok(PortRange { lo, hi })
}

/// A pool of gateway ports: a range of unprivileged ports. A pinhole below
/// 1024 would be a port that only root may bind, and one an ALG must never
/// open (the kernel helper's known fault).
pub(super) fn parse_pool_range(s: &str) -> Result<PortRange, String> {
    let r = parse_range(s)?;
    if r.lo < 1024 {
        return Err(format!(
            "`{s}` includes ports below 1024; pools must be within 1024-65535"
        ));
    }
    Ok(r)
}

/// `16` (ports) or `25%` (of each pool); never zero, which would refuse
/// every data connection.
pub(super) fn parse_share(s: &str) -> Result<PortShare, String> {
    let t = s.trim();
    let hint = "a number of ports such as 16, or a percentage of each pool such as 25%";
    if let Some(p) = t.strip_suffix('%') {
        return match p.trim().parse::<u8>() {
            Ok(p @ 1..=100) => Ok(PortShare::Percent(p)),
            _ => Err(format!("`{s}` is not a percentage from 1% to 100%")),
        };
    }
    match t.parse::<usize>() {
        Ok(0) => Err(format!(
            "`{s}` would refuse every data connection; write {hint}"
        )),
        Ok(n) => Ok(PortShare::Ports(n)),
        Err(_) => Err(format!("`{s}` is not {hint}")),
    }
}

/// `500ms`, `30s`, `15m`, `1h`; never zero, because every timeout in the
/// file would then fire at once.
pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let hint = "a number and a unit: 500ms, 30s, 15m or 1h";
    if digits.is_empty() {
        return Err(format!("`{s}` is not a duration; write {hint}"));
    }
    if unit.is_empty() {
        return Err(format!("`{s}` has no unit; write e.g. {digits}s ({hint})"));
    }
    let ms_per_unit: u64 = match unit.trim_start() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("`{s}` has an unknown unit; write {hint}")),
    };
    let ms = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(ms_per_unit))
        .ok_or_else(|| format!("`{s}` is too long"))?;
    if ms == 0 {
        return Err(format!("`{s}` is zero; a timeout must be longer than that"));
    }
    Ok(Duration::from_millis(ms))
}

pub(super) fn parse_count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("0 would refuse every session; the least is 1".to_string()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

/// nft accepts more, but these characters need no quoting anywhere the
/// name is printed or passed on a command line.
pub(super) fn parse_table(s: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{s}` is not 1-64 characters of A-Z, a-z, 0-9, `_` and `-`"
        ))
    }
}

/// `data.conntrack_mark`: a non-zero 32-bit mask, hex (`0x10000000`) or
/// decimal.
pub(super) fn parse_mark(s: &str) -> Result<u32, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse::<u32>(),
    };
    match v {
        Ok(m) if m != 0 => Ok(m),
        _ => Err(format!(
            "`{s}` is not a non-zero 32-bit mark (write e.g. 0x10000000)"
        )),
    }
}

/// An FTP verb, as it is compared: upper case.
pub(super) fn parse_verb(s: &str) -> Result<String, String> {
    if (1..=16).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphabetic()) {
        Ok(s.to_ascii_uppercase())
    } else {
        Err(format!(
            "`{s}` is not an FTP command (1-16 letters, e.g. SITE)"
        ))
    }
}
