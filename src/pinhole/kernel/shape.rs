//! Which plans the kernel can carry, and the elements of the gateway's
//! table that one such plan amounts to.

use crate::netfilter::ctnetlink::{Expectation, Tuple};
use crate::netfilter::Element;
use crate::pinhole::{ControlConns, DataPlan, Leg};
use std::net::{IpAddr, SocketAddr};

/// A plan the kernel can carry: `peer` connects to (`dst`, port), which is
/// translated to `to`, whose side sees `source`.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// The client connects (PASV); otherwise the server does (PORT).
    pub(super) passive: bool,
    pub(super) peer: IpAddr,
    pub(super) dst: IpAddr,
    pub(super) to: SocketAddr,
    pub(super) source: IpAddr,
}

impl Shape {
    /// The NAT-able shape of `plan`, or `None` when the relay must carry it.
    pub fn of(plan: &DataPlan) -> Option<Shape> {
        let view = plan.client_view;
        let shape = match (plan.client, plan.server) {
            // PASV same: the client connects to (announced, P).
            (
                Leg::Listen { bind, peer },
                Leg::Connect {
                    target,
                    bind: source,
                },
            ) => Shape {
                passive: true,
                peer,
                dst: view.unwrap_or(bind),
                to: target,
                source,
            },
            // PORT same: the server connects to (gateway, Q).
            (Leg::Connect { target, bind }, Leg::Listen { bind: dst, peer }) => Shape {
                passive: false,
                peer,
                dst,
                to: target,
                source: view.unwrap_or(bind),
            },
            _ => return None,
        };
        let same = [shape.dst, shape.to.ip(), shape.source]
            .iter()
            .all(|a| a.is_ipv4() == shape.peer.is_ipv4());
        let specific = !shape.dst.is_unspecified() && !shape.source.is_unspecified();
        (same && specific).then_some(shape)
    }

    /// The plan's expectation for its connection to `port`, on the control
    /// connection `control` that nf_nat_ftp would use as its master: the
    /// gateway's connection to the server for a passive plan (the client
    /// connects), the client's connection for an active one (the server
    /// connects). `None` when the master's address family is not the
    /// plan's.
    ///
    /// The expectation makes the connection RELATED; the table's `dnat` and
    /// `ksnat` maps NAT it, not the kernel's `nat-follow-master`. That
    /// function sets up the source NAT before the destination NAT, so its
    /// check that the connection's tuple is unique is made on the tuple
    /// before DNAT: a data connection whose translated tuple is already in
    /// the table (a TIME_WAIT entry of an earlier connection from the same
    /// client port to the same server port) fails to insert, its first SYN
    /// is dropped, and its retransmissions, no longer expected, meet the
    /// claim (1 session in about 700 at 200 sessions/s in the lab; the
    /// kernel's own FTP helper fails the same way). The maps' SNAT runs
    /// after DNAT, in postrouting, and picks another source port instead.
    pub(crate) fn expectation(&self, port: u16, control: &ControlConns) -> Option<Expectation> {
        let master = if self.passive {
            server_leg(control)
        } else {
            // Looked up by the gateway's own view: the reply tuple, which
            // DNAT on the way in does not change.
            Tuple {
                src: control.client_local,
                dst: control.client_peer,
            }
        };
        self.expectation_on(master, port)
    }

    /// The plan's expectation for its connection to `port` on the gateway's
    /// connection to the server, whatever the plan's direction: for an
    /// active plan whose client connection has no helper (see
    /// `KernelBackend::open`). The gateway's connection to the server gets
    /// its helper on the way out, by the socket's own mark, which no state
    /// of another socket can hide.
    pub(crate) fn expectation_on_server(
        &self,
        port: u16,
        control: &ControlConns,
    ) -> Option<Expectation> {
        self.expectation_on(server_leg(control), port)
    }

    fn expectation_on(&self, master: Tuple, port: u16) -> Option<Expectation> {
        let family = self.peer.is_ipv4();
        if master.src.is_ipv4() != family || master.dst.is_ipv4() != family {
            return None;
        }
        Some(Expectation {
            master,
            peer: self.peer,
            dst: SocketAddr::new(self.dst, port),
            nat: None,
        })
    }

    /// The plan's claim on its announced `port`, and the elements that let
    /// its one connection through: `once`, `dnat` and `ksnat`. Each is shown as the element
    /// `nft` would add to table `ftpgate` for a passive IPv4 plan (client
    /// 198.51.100.2, announced 192.0.2.1 port 40001, server 10.71.2.2 port
    /// 30000 seen from 10.71.2.1), with the rule of `table.nft` it feeds.
    pub(super) fn elements(&self, port: u16) -> (Element, Element, Vec<Element>) {
        let Shape {
            peer,
            dst,
            to,
            source,
            ..
        } = *self;
        // add element inet ftpgate claim4 { 192.0.2.1 . 40001 timeout 60000ms }
        // prerouting (nat): ct state new ip daddr . tcp dport @claim4 drop
        let claim = Element::Claim { dst, port };
        // add element inet ftpgate once4 { 198.51.100.2 . 40001 timeout 30000ms }
        // gate: ct state related ct mark & 0x10000000 == 0x10000000 ip saddr . tcp dport != @once4 drop
        let once = Element::Once { peer, port };
        let elements = vec![
            // add element inet ftpgate dnat4 { 198.51.100.2 . 192.0.2.1 . 40001 timeout 30000ms : 10.71.2.2 . 30000 }
            // prerouting: dnat ip to ip saddr . ip daddr . tcp dport map @dnat4
            Element::Dnat {
                peer,
                dst,
                port,
                to,
            },
            // add element inet ftpgate ksnat4 { 198.51.100.2 . 10.71.2.2 . 30000 timeout 30000ms : 10.71.2.1 }
            // postrouting: snat ip to ip saddr . ip daddr . tcp dport map @ksnat4
            Element::Snat { peer, to, source },
        ];
        (claim, once, elements)
    }
}

/// The gateway's connection to the server, as a master's tuple.
fn server_leg(control: &ControlConns) -> Tuple {
    Tuple {
        src: control.server_local,
        dst: control.server,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(client: Leg, server: Leg) -> DataPlan {
        DataPlan {
            id: 1,
            client,
            server,
            client_view: None,
            tls: crate::pinhole::PlanTls::default(),
        }
    }

    #[test]
    fn conversion_and_mixed_families_go_to_the_relay() {
        let l4 = Leg::Listen {
            bind: "192.0.2.1".parse().unwrap(),
            peer: "198.51.100.2".parse().unwrap(),
        };
        let c4 = Leg::Connect {
            target: "10.71.2.2:30000".parse().unwrap(),
            bind: "10.71.2.1".parse().unwrap(),
        };
        let c6 = Leg::Connect {
            target: "[fd71:2::2]:30000".parse().unwrap(),
            bind: "fd71:2::1".parse().unwrap(),
        };
        assert!(Shape::of(&plan(l4, c4)).is_some());
        assert!(Shape::of(&plan(c4, l4)).is_some());
        assert!(Shape::of(&plan(l4, l4)).is_none());
        assert!(Shape::of(&plan(c4, c4)).is_none());
        assert!(Shape::of(&plan(l4, c6)).is_none());
    }

    fn control(client_dst: &str) -> ControlConns {
        ControlConns {
            client_local: "192.0.2.1:21".parse().unwrap(),
            client_peer: "198.51.100.2:50000".parse().unwrap(),
            client_dst: client_dst.parse().unwrap(),
            server_local: "10.71.2.1:40000".parse().unwrap(),
            server: "10.71.2.2:21".parse().unwrap(),
        }
    }

    fn ip(a: &str) -> IpAddr {
        a.parse().unwrap()
    }

    #[test]
    fn the_master_and_direction_give_the_plans_addresses() {
        let reverse = control("192.0.2.1:21");
        // PASV: the gateway's connection to the server.
        let pasv = Shape {
            passive: true,
            peer: ip("198.51.100.2"),
            dst: ip("192.0.2.1"),
            to: "10.71.2.2:30000".parse().unwrap(),
            source: ip("10.71.2.1"),
        };
        let exp = pasv.expectation(40001, &reverse).unwrap();
        assert_eq!(exp.master.src, reverse.server_local);
        assert_eq!(exp.master.dst, reverse.server);
        assert_eq!(
            (exp.peer, exp.dst),
            (pasv.peer, "192.0.2.1:40001".parse().unwrap())
        );
        // The maps NAT it, after DNAT in postrouting (see `expectation`).
        assert_eq!(exp.nat, None);
        let (claim, once, rest) = pasv.elements(40001);
        assert!(matches!(claim, Element::Claim { port: 40001, .. }));
        assert!(matches!(once, Element::Once { port: 40001, .. }));
        assert_eq!(
            rest,
            [
                Element::Dnat {
                    peer: pasv.peer,
                    dst: pasv.dst,
                    port: 40001,
                    to: pasv.to,
                },
                Element::Snat {
                    peer: pasv.peer,
                    to: pasv.to,
                    source: pasv.source,
                },
            ]
        );
        // PORT: the client's connection, by the gateway's own view of it.
        let port = Shape {
            passive: false,
            peer: ip("10.71.2.2"),
            dst: ip("10.71.2.1"),
            to: "198.51.100.2:5555".parse().unwrap(),
            source: ip("192.0.2.1"),
        };
        let exp = port.expectation(41001, &reverse).unwrap();
        assert_eq!(
            (exp.master.src, exp.master.dst),
            (reverse.client_local, reverse.client_peer)
        );
        assert_eq!(exp.nat, None);
        // When the client's connection has no helper: the server's.
        let on_server = port.expectation_on_server(41001, &reverse).unwrap();
        assert_eq!(
            (on_server.master.src, on_server.master.dst),
            (reverse.server_local, reverse.server)
        );
        assert_eq!((on_server.peer, on_server.dst), (exp.peer, exp.dst));
        // Behind a balancer the client's control peer is the balancer: the
        // master is still the connection the gateway holds.
        let balanced = ControlConns {
            client_peer: "192.0.2.200:50000".parse().unwrap(),
            ..reverse
        };
        assert_eq!(
            port.expectation(41001, &balanced).unwrap().master.dst,
            balanced.client_peer
        );
        // A control connection of the other family cannot be the master.
        let v6 = ControlConns {
            server_local: "[fd71:2::1]:40000".parse().unwrap(),
            server: "[fd71:2::2]:21".parse().unwrap(),
            ..reverse
        };
        assert!(pasv.expectation(40001, &v6).is_none());
    }
}
