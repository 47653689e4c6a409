//! Which plans the kernel can carry, and the elements of the gateway's
//! table that one such plan amounts to.

use crate::netfilter::ctnetlink::{Expectation, FollowMaster, Tuple};
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
    /// connection `control` that nf_nat_ftp would use as its master, and
    /// whether the kernel NATs it by itself (`nat-follow-master`). `None`
    /// when the master's address family is not the plan's.
    ///
    /// nat-follow-master sets the source to the destination address of the
    /// master's tuple in the other direction than the expected one, and
    /// the destination to that tuple's source address, at the given port:
    ///
    /// - passive (the client connects): master = the gateway's connection
    ///   to the server, same direction: source = the gateway's end,
    ///   destination = the server.
    /// - active (the server connects): master = the client's connection,
    ///   reply direction: source = where the client connected to (the
    ///   server itself in transparent mode), destination = the client.
    ///
    /// Where that is not the plan's `source` and `to` (a client behind a
    /// balancer, say), the table's `dnat`/`ksnat` maps NAT the connection.
    pub(crate) fn expectation(
        &self,
        port: u16,
        control: &ControlConns,
    ) -> Option<(Expectation, bool)> {
        let (master, source, to, reply) = if self.passive {
            let master = Tuple {
                src: control.server_local,
                dst: control.server,
            };
            (
                master,
                control.server_local.ip(),
                control.server.ip(),
                false,
            )
        } else {
            // Looked up by the gateway's own view: the reply tuple, which
            // DNAT on the way in does not change.
            let master = Tuple {
                src: control.client_local,
                dst: control.client_peer,
            };
            (
                master,
                control.client_dst.ip(),
                control.client_peer.ip(),
                true,
            )
        };
        let family = self.peer.is_ipv4();
        if master.src.is_ipv4() != family || master.dst.is_ipv4() != family {
            return None;
        }
        let follows = source == self.source && to == self.to.ip();
        let exp = Expectation {
            master,
            peer: self.peer,
            dst: SocketAddr::new(self.dst, port),
            nat: follows.then_some(FollowMaster {
                reply,
                port: self.to.port(),
            }),
        };
        Some((exp, follows))
    }

    /// The plan's claim on its announced `port`, and the elements that let
    /// its one connection through: `once`, and, unless the kernel NATs it
    /// itself (`natted`), `dnat` and `ksnat`. Each is shown as the element
    /// `nft` would add to table `ftpgate` for a passive IPv4 plan (client
    /// 198.51.100.2, announced 192.0.2.1 port 40001, server 10.71.2.2 port
    /// 30000 seen from 10.71.2.1), with the rule of `table.nft` it feeds.
    pub(super) fn elements(&self, port: u16, natted: bool) -> (Element, Element, Vec<Element>) {
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
        let mut elements = Vec::new();
        if !natted {
            elements.extend([
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
            ]);
        }
        (claim, once, elements)
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
        // PASV: the gateway's connection to the server, same direction.
        let pasv = Shape {
            passive: true,
            peer: ip("198.51.100.2"),
            dst: ip("192.0.2.1"),
            to: "10.71.2.2:30000".parse().unwrap(),
            source: ip("10.71.2.1"),
        };
        let (exp, natted) = pasv.expectation(40001, &reverse).unwrap();
        assert!(natted);
        assert_eq!(exp.master.src, reverse.server_local);
        assert_eq!(exp.master.dst, reverse.server);
        assert_eq!(
            (exp.peer, exp.dst),
            (pasv.peer, "192.0.2.1:40001".parse().unwrap())
        );
        assert_eq!(
            exp.nat,
            Some(FollowMaster {
                reply: false,
                port: 30000
            })
        );
        // PORT: the client's connection, reply direction, by the
        // gateway's own view of it.
        let port = Shape {
            passive: false,
            peer: ip("10.71.2.2"),
            dst: ip("10.71.2.1"),
            to: "198.51.100.2:5555".parse().unwrap(),
            source: ip("192.0.2.1"),
        };
        let (exp, natted) = port.expectation(41001, &reverse).unwrap();
        assert!(natted);
        assert_eq!(
            (exp.master.src, exp.master.dst),
            (reverse.client_local, reverse.client_peer)
        );
        assert_eq!(
            exp.nat,
            Some(FollowMaster {
                reply: true,
                port: 5555
            })
        );
        // Transparent: the client believes it talks to the server; its
        // connection was addressed to the server before the redirect.
        let transparent = control("203.0.113.9:21");
        let port_t = Shape {
            source: ip("203.0.113.9"),
            ..port
        };
        assert!(port_t.expectation(41001, &transparent).unwrap().1);
        // The same plan with the reverse listener's addresses: the kernel
        // would pick the wrong source; the maps NAT it.
        let (exp, natted) = port_t.expectation(41001, &reverse).unwrap();
        assert!(!natted && exp.nat.is_none());
        let (claim, once, rest) = port_t.elements(41001, natted);
        assert!(matches!(claim, Element::Claim { port: 41001, .. }));
        assert!(matches!(once, Element::Once { port: 41001, .. }));
        assert!(matches!(
            rest[..],
            [Element::Dnat { .. }, Element::Snat { .. }]
        ));
        assert!(port.elements(41001, true).2.is_empty());
        // Behind a balancer the client's control peer is the balancer.
        let balanced = ControlConns {
            client_peer: "192.0.2.200:50000".parse().unwrap(),
            ..reverse
        };
        assert!(!port.expectation(41001, &balanced).unwrap().1);
        // A control connection of the other family cannot be the master.
        let v6 = ControlConns {
            server_local: "[fd71:2::1]:40000".parse().unwrap(),
            server: "[fd71:2::2]:21".parse().unwrap(),
            ..reverse
        };
        assert!(pasv.expectation(40001, &v6).is_none());
    }
}
