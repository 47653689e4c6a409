//! The per-pinhole elements of the gateway's nftables table: what each one
//! is keyed by, and which set or map of `table.nft` it lives in. Each
//! variant's doc gives the element as `nft` would write it, and the rule of
//! the table that reads it.

use std::io;
use std::net::{IpAddr, SocketAddr};

/// One per-pinhole element of the gateway's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Element {
    /// Redirect the client's connection to (server, port) to the gateway's
    /// listener on `port`.
    ///
    /// `add element inet ftpgate pasv4 { 10.0.0.5 . 198.51.100.7 . 40001 timeout 30000ms }`,
    /// matched by `ip saddr . ip daddr . tcp dport @pasv4 redirect`.
    Passive {
        /// The client's address.
        client: IpAddr,
        /// The address the client believes is the server.
        server: IpAddr,
        /// The pinhole's port.
        port: u16,
    },
    /// Source-NAT the gateway's connection to `client` so that it comes from
    /// `source`.
    ///
    /// `add element inet ftpgate actv4 { 10.0.0.5 . 50000 timeout 30000ms : 198.51.100.7 }`,
    /// used by `snat ip to ip daddr . tcp dport map @actv4`.
    Active {
        /// Where the gateway connects (the client's PORT/EPRT address).
        client: SocketAddr,
        /// The address the client must see (the server's).
        source: IpAddr,
    },
    /// Kernel backend: the pinhole's expected connection from `peer` to
    /// `port` is admitted until this element times out (the expectation
    /// itself lives for its helper's timeout).
    Once {
        /// The only address allowed to connect.
        peer: IpAddr,
        /// The announced port.
        port: u16,
    },
    /// Kernel backend: a connection from `peer` to (`dst`, `port`) is
    /// destination-NATed to `to`.
    Dnat {
        /// Who connects.
        peer: IpAddr,
        /// The address `peer` connects to (the announced one).
        dst: IpAddr,
        /// The announced port.
        port: u16,
        /// The real endpoint.
        to: SocketAddr,
    },
    /// Kernel backend: the DNATed connection from `peer` to `to` leaves
    /// with `source` as its source address.
    Snat {
        /// Who connects.
        peer: IpAddr,
        /// The real endpoint (after DNAT).
        to: SocketAddr,
        /// The address the endpoint must see.
        source: IpAddr,
    },
    /// Kernel backend: (`dst`, `port`) is a pinhole's announced endpoint; a
    /// new connection to it that `Once` did not admit is dropped. It outlives
    /// the pinhole's other elements (see `kernel`), so a second connection,
    /// or one after the timeout, is dropped too.
    Claim {
        /// The announced address.
        dst: IpAddr,
        /// The announced port.
        port: u16,
    },
}

impl Element {
    /// The set or map this element lives in.
    pub fn set(&self) -> io::Result<&'static str> {
        match *self {
            Element::Passive { client, server, .. } => match (client, server) {
                (IpAddr::V4(_), IpAddr::V4(_)) => Ok("pasv4"),
                (IpAddr::V6(_), IpAddr::V6(_)) => Ok("pasv6"),
                _ => Err(mixed_families(self)),
            },
            Element::Active { client, source } => match (client.ip(), source) {
                (IpAddr::V4(_), IpAddr::V4(_)) => Ok("actv4"),
                (IpAddr::V6(_), IpAddr::V6(_)) => Ok("actv6"),
                _ => Err(mixed_families(self)),
            },
            Element::Once { peer, .. } => Ok(if peer.is_ipv4() { "once4" } else { "once6" }),
            Element::Dnat { peer, dst, to, .. } => {
                family3(self, peer, dst, to.ip(), "dnat4", "dnat6")
            }
            Element::Snat { peer, to, source } => {
                family3(self, peer, to.ip(), source, "ksnat4", "ksnat6")
            }
            Element::Claim { dst, .. } => Ok(if dst.is_ipv4() { "claim4" } else { "claim6" }),
        }
    }
}

/// The v4 or v6 set name when all three addresses share a family.
fn family3(
    e: &Element,
    a: IpAddr,
    b: IpAddr,
    c: IpAddr,
    v4: &'static str,
    v6: &'static str,
) -> io::Result<&'static str> {
    match (a.is_ipv4(), b.is_ipv4(), c.is_ipv4()) {
        (true, true, true) => Ok(v4),
        (false, false, false) => Ok(v6),
        _ => Err(mixed_families(e)),
    }
}

fn mixed_families(e: &Element) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("nftables element mixes address families: {e:?}"),
    )
}
