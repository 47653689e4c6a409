//! The kernel backend in network namespaces: a client, the gateway (a
//! router, with the operator's firewall: forward policy drop, only
//! established and related connections accepted) and a server.

use super::*;
use crate::config::PortRange;
use crate::netfilter::netns::{within, Netns};
use crate::pinhole::{ControlConns, Leg, PlanTls, SessionTls};
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::PathBuf;

const MARK: u32 = 0x1000_0000;

/// An operator firewall built for the kernel's FTP helper: nothing but
/// established and related connections is forwarded.
const FIREWALL: &str = "table inet op {
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established accept
		ct state related counter accept
	}
}
";

struct Lab {
    client: Netns,
    gateway: Netns,
    server: Netns,
}

fn sh(ns: &Netns, program: &str, args: &[&str]) {
    let (ok, out) = ns.run(program, args);
    assert!(ok, "{program} {args:?}: {out}");
}

impl Lab {
    /// client 198.51.100.2 (and .3, another host) — gateway 198.51.100.1 |
    /// 10.71.2.1 — server 10.71.2.2.
    fn new() -> Option<Lab> {
        let lab = Lab {
            client: Netns::new()?,
            gateway: Netns::new()?,
            server: Netns::new()?,
        };
        let (c, g, s) = (lab.client.name(), lab.gateway.name(), lab.server.name());
        let host = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        host(&[
            "link", "add", "gc", "netns", g, "type", "veth", "peer", "name", "c0", "netns", c,
        ]);
        host(&[
            "link", "add", "gs", "netns", g, "type", "veth", "peer", "name", "s0", "netns", s,
        ]);
        for (ns, dev, addrs) in [
            (
                &lab.client,
                "c0",
                &["198.51.100.2/24", "198.51.100.3/24", "2001:db8:100::2/64"][..],
            ),
            (
                &lab.gateway,
                "gc",
                &["198.51.100.1/24", "2001:db8:100::1/64"],
            ),
            (&lab.gateway, "gs", &["10.71.2.1/24", "fd71:2::1/64"]),
            (&lab.server, "s0", &["10.71.2.2/24", "fd71:2::2/64"]),
        ] {
            for a in addrs {
                // No duplicate address detection: usable at once.
                sh(ns, "ip", &["addr", "add", a, "dev", dev, "nodad"]);
            }
            sh(ns, "ip", &["link", "set", dev, "up"]);
            sh(ns, "ip", &["link", "set", "lo", "up"]);
        }
        sh(
            &lab.client,
            "ip",
            &["route", "add", "default", "via", "198.51.100.1"],
        );
        sh(
            &lab.server,
            "ip",
            &["route", "add", "default", "via", "10.71.2.1"],
        );
        sh(
            &lab.client,
            "ip",
            &["-6", "route", "add", "default", "via", "2001:db8:100::1"],
        );
        sh(
            &lab.server,
            "ip",
            &["-6", "route", "add", "default", "via", "fd71:2::1"],
        );
        sh(&lab.gateway, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        sh(
            &lab.gateway,
            "sysctl",
            &["-qw", "net.ipv6.conf.all.forwarding=1"],
        );
        let (ok, out) = lab.gateway.nft(&["-f", "-"], Some(FIREWALL));
        assert!(ok, "{out}");
        Some(lab)
    }
}

fn marked_listener(addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    s.set_mark(MARK).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(8).unwrap();
    s.into()
}

/// A connection from `from` (port any) to `to`, or the error within 2 s:
/// `TimedOut` when the SYN got no answer at all.
fn dial(from: &str, to: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    if let Some(m) = mark {
        s.set_mark(m)?;
    }
    s.bind(&SocketAddr::new(from.parse().unwrap(), 0).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(2))?;
    Ok(s.into())
}

/// `bytes` sent on a connection from `from` to `to` in namespace `ns`,
/// then closed.
fn send_from(
    ns: PathBuf,
    from: &'static str,
    to: SocketAddr,
    bytes: &'static [u8],
) -> io::Result<()> {
    within(ns, move || {
        let mut c = dial(from, to, None)?;
        c.write_all(bytes)?;
        c.shutdown(std::net::Shutdown::Write)
    })
    .join()
    .unwrap()
}

/// Accepts one connection on `l`: its peer and every byte it sent.
fn receive(l: TcpListener) -> std::thread::JoinHandle<(SocketAddr, Vec<u8>)> {
    std::thread::spawn(move || {
        let (mut s, from) = l.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        (from, got)
    })
}

fn related_packets(gateway: &Netns) -> String {
    let (_, listed) = gateway.nft(&["list", "chain", "inet", "op", "forward"], None);
    listed
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<DataEvent>) -> DataEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an event in time")
        .expect("the plan's events")
}

/// Same-mode plans (reverse PASV and PORT, transparent PASV, IPv6 PASV)
/// through the operator's firewall: each data connection is RELATED (the
/// firewall's `ct state related` counter sees its first packet), NATed so
/// that each end sees what the invariant says, once; another host and a
/// second connection get no answer; the transfer's end and bytes come from
/// the filtered conntrack events; two netlink messages per pinhole. A plan
/// closed unused, and one whose gateway is gone, admit nothing later.
#[test]
fn kernel_pinholes_are_related_one_shot_and_exact() {
    let Some(lab) = Lab::new() else { return };
    let (c, g, s) = (lab.client.path(), lab.gateway.path(), lab.server.path());
    // The server: control port 2100, passive data port 30000.
    let server_ctl = within(s.clone(), || TcpListener::bind("10.71.2.2:2100").unwrap())
        .join()
        .unwrap();
    let server_data = within(s.clone(), || TcpListener::bind("10.71.2.2:30000").unwrap())
        .join()
        .unwrap();
    let server_data2 = within(s.clone(), || TcpListener::bind("10.71.2.2:30001").unwrap())
        .join()
        .unwrap();
    let server_ctl6 = within(s.clone(), || TcpListener::bind("[fd71:2::2]:2100").unwrap())
        .join()
        .unwrap();
    let server_data6 = within(s.clone(), || {
        TcpListener::bind("[fd71:2::2]:30000").unwrap()
    })
    .join()
    .unwrap();
    // Listens, never accepts: a connection admitted to it would complete.
    let server_data3 = within(s.clone(), || TcpListener::bind("10.71.2.2:30002").unwrap())
        .join()
        .unwrap();
    // The client's PORT listener.
    let client_data = within(c.clone(), || {
        TcpListener::bind("198.51.100.2:5555").unwrap()
    })
    .join()
    .unwrap();
    let gateway = within(g, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let table = Arc::new(
                InterceptTable::create("ftpgate_k", MARK)
                    .await
                    .expect("the table"),
            );
            let pool = |name, lo| PortPool::new(name, PortRange { lo, hi: lo + 9 });
            let settings = DataSettings {
                pinhole_timeout: Duration::from_secs(5),
                connect_timeout: Duration::from_secs(5),
            };
            let backend = KernelBackend::new(
                pool("client", 40000),
                pool("server", 41000),
                settings,
                table.clone(),
                MARK,
            )
            .await
            .expect("the backend");
            // The control connections: the client's to the gateway's
            // (marked) listener, the gateway's (marked) to the server.
            let listener = marked_listener("198.51.100.1:2121");
            let to = listener.local_addr().unwrap();
            let client_ctl = within(c.clone(), move || dial("198.51.100.2", to, None).unwrap())
                .join()
                .unwrap();
            let (accepted, client_peer) = listener.accept().unwrap();
            let upstream =
                dial("10.71.2.1", "10.71.2.2:2100".parse().unwrap(), Some(MARK)).unwrap();
            let (_server_side, _) = server_ctl.accept().unwrap();
            let session = SessionInfo {
                id: 1,
                client: client_peer,
                server: "10.71.2.2:2100".parse().unwrap(),
                activity: Default::default(),
                balancers: None,
                tls: SessionTls::default(),
                control: Some(ControlConns {
                    client_local: accepted.local_addr().unwrap(),
                    client_peer,
                    client_dst: accepted.local_addr().unwrap(),
                    server_local: upstream.local_addr().unwrap(),
                    server: upstream.peer_addr().unwrap(),
                }),
            };
            let ip = |a: &str| a.parse::<IpAddr>().unwrap();
            let mut results = Vec::new();

            // PASV→PASV: the client connects to the gateway, reaches the
            // server's port 30000 from the gateway's server-side address.
            let plan = DataPlan {
                id: 1,
                client: Leg::Listen {
                    bind: ip("198.51.100.1"),
                    peer: ip("198.51.100.2"),
                },
                server: Leg::Connect {
                    target: "10.71.2.2:30000".parse().unwrap(),
                    bind: ip("10.71.2.1"),
                },
                client_view: None,
                tls: PlanTls::default(),
            };
            let shape = Shape::of(&plan).unwrap();
            let (tx, mut rx) = mpsc::unbounded_channel();
            let (opened, pinhole) = backend.open(&session, plan, shape, tx).await.expect("open");
            let announced = opened.client_listen.unwrap();
            let foreign = send_from(c.clone(), "198.51.100.3", announced, b"x");
            let got = receive(server_data);
            send_from(c.clone(), "198.51.100.2", announced, b"passive data")
                .expect("the data connection");
            let (from, bytes) = got.join().unwrap();
            let second = send_from(c.clone(), "198.51.100.2", announced, b"again");
            assert_eq!(next_event(&mut rx).await, DataEvent::Connected { id: 1 });
            let closed = next_event(&mut rx).await;
            results.push((foreign, from, bytes, second, closed));
            drop(pinhole);

            // PORT→PORT: the server connects to the gateway, reaches the
            // client's port 5555 from the address the client connected to.
            let plan = DataPlan {
                id: 2,
                client: Leg::Connect {
                    target: "198.51.100.2:5555".parse().unwrap(),
                    bind: ip("198.51.100.1"),
                },
                server: Leg::Listen {
                    bind: ip("10.71.2.1"),
                    peer: ip("10.71.2.2"),
                },
                client_view: None,
                tls: PlanTls::default(),
            };
            let shape = Shape::of(&plan).unwrap();
            let (tx, mut rx) = mpsc::unbounded_channel();
            let (opened, pinhole) = backend.open(&session, plan, shape, tx).await.expect("open");
            let announced = opened.server_listen.unwrap();
            let got = receive(client_data);
            send_from(s.clone(), "10.71.2.2", announced, b"active data")
                .expect("the data connection");
            let (from, bytes) = got.join().unwrap();
            let second = send_from(s.clone(), "10.71.2.2", announced, b"again");
            assert_eq!(next_event(&mut rx).await, DataEvent::Connected { id: 2 });
            let closed = next_event(&mut rx).await;
            results.push((Ok(()), from, bytes, second, closed));
            drop(pinhole);

            // Transparent PASV: the client aims at the server's own address
            // (as curl does), through the gateway, its router.
            let plan = DataPlan {
                id: 3,
                client: Leg::Listen {
                    bind: ip("198.51.100.1"),
                    peer: ip("198.51.100.2"),
                },
                server: Leg::Connect {
                    target: "10.71.2.2:30001".parse().unwrap(),
                    bind: ip("10.71.2.1"),
                },
                client_view: Some(ip("10.71.2.2")),
                tls: PlanTls::default(),
            };
            let shape = Shape::of(&plan).unwrap();
            let (tx, mut rx) = mpsc::unbounded_channel();
            let (opened, pinhole) = backend.open(&session, plan, shape, tx).await.expect("open");
            let announced = opened.client_listen.unwrap();
            assert_eq!(announced.ip(), ip("10.71.2.2"));
            let got = receive(server_data2);
            send_from(c.clone(), "198.51.100.2", announced, b"transparent")
                .expect("the data connection");
            let (from, bytes) = got.join().unwrap();
            let second = send_from(c.clone(), "198.51.100.2", announced, b"again");
            assert_eq!(next_event(&mut rx).await, DataEvent::Connected { id: 3 });
            let closed = next_event(&mut rx).await;
            results.push((Ok(()), from, bytes, second, closed));
            drop(pinhole);

            // IPv6: a session of its own (a plan's master is a control
            // connection of its family), PASV→PASV.
            let listener6 = marked_listener("[2001:db8:100::1]:2121");
            let to6 = listener6.local_addr().unwrap();
            let client_ctl6 = within(c.clone(), move || {
                dial("2001:db8:100::2", to6, None).unwrap()
            })
            .join()
            .unwrap();
            let (accepted6, client_peer6) = listener6.accept().unwrap();
            let upstream6 =
                dial("fd71:2::1", "[fd71:2::2]:2100".parse().unwrap(), Some(MARK)).unwrap();
            let (_server_side6, _) = server_ctl6.accept().unwrap();
            let session6 = SessionInfo {
                id: 2,
                client: client_peer6,
                server: "[fd71:2::2]:2100".parse().unwrap(),
                activity: Default::default(),
                balancers: None,
                tls: SessionTls::default(),
                control: Some(ControlConns {
                    client_local: accepted6.local_addr().unwrap(),
                    client_peer: client_peer6,
                    client_dst: accepted6.local_addr().unwrap(),
                    server_local: upstream6.local_addr().unwrap(),
                    server: upstream6.peer_addr().unwrap(),
                }),
            };
            let plan = DataPlan {
                id: 6,
                client: Leg::Listen {
                    bind: ip("2001:db8:100::1"),
                    peer: ip("2001:db8:100::2"),
                },
                server: Leg::Connect {
                    target: "[fd71:2::2]:30000".parse().unwrap(),
                    bind: ip("fd71:2::1"),
                },
                client_view: None,
                tls: PlanTls::default(),
            };
            let shape = Shape::of(&plan).unwrap();
            let (tx, mut rx) = mpsc::unbounded_channel();
            let (opened, pinhole) = backend
                .open(&session6, plan, shape, tx)
                .await
                .expect("open");
            let announced = opened.client_listen.unwrap();
            let got = receive(server_data6);
            send_from(c.clone(), "2001:db8:100::2", announced, b"over ipv6")
                .expect("the data connection");
            let (from, bytes) = got.join().unwrap();
            let second = send_from(c.clone(), "2001:db8:100::2", announced, b"again");
            assert_eq!(next_event(&mut rx).await, DataEvent::Connected { id: 6 });
            let closed = next_event(&mut rx).await;
            results.push((Ok(()), from, bytes, second, closed));
            drop(pinhole);
            drop(client_ctl6);

            // A plan closed unused: its expectation is deleted, and its
            // peer is not admitted.
            let plan = DataPlan {
                id: 4,
                client: Leg::Listen {
                    bind: ip("198.51.100.1"),
                    peer: ip("198.51.100.2"),
                },
                server: Leg::Connect {
                    target: "10.71.2.2:30000".parse().unwrap(),
                    bind: ip("10.71.2.1"),
                },
                client_view: None,
                tls: PlanTls::default(),
            };
            let shape = Shape::of(&plan).unwrap();
            let (tx, _rx) = mpsc::unbounded_channel();
            let (opened, pinhole) = backend.open(&session, plan, shape, tx).await.expect("open");
            let announced = opened.client_listen.unwrap();
            drop(pinhole);
            // Poll for the plan's end (the thing under test), with a bound.
            let deadline = Instant::now() + Duration::from_secs(10);
            while backend.plans() > 0 {
                assert!(Instant::now() < deadline, "the unused plan never ended");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let unused = send_from(c.clone(), "198.51.100.2", announced, b"late");
            let messages = (
                backend.messages().plans.load(Ordering::Relaxed),
                backend.messages().sent.load(Ordering::Relaxed),
            );

            // The gateway gone right after opening a pinhole (no task, no
            // timer, the expectation left in the kernel for its helper's
            // 300 s): after the pinhole's timeout the kernel admits nothing.
            let shape = Shape::of(&DataPlan {
                id: 5,
                client: Leg::Listen {
                    bind: ip("198.51.100.1"),
                    peer: ip("198.51.100.2"),
                },
                server: Leg::Connect {
                    target: "10.71.2.2:30002".parse().unwrap(),
                    bind: ip("10.71.2.1"),
                },
                client_view: None,
                tls: PlanTls::default(),
            })
            .unwrap();
            let port = 40009;
            let control = session.control.as_ref().unwrap();
            let (exp, natted) = shape.expectation(port, control).unwrap();
            let (claim, once, elements) = shape.elements(port, natted);
            let short = Duration::from_millis(300);
            backend
                .install(claim, once, &elements, short)
                .await
                .expect("elements");
            backend
                .expectations
                .lock()
                .await
                .create(&exp)
                .await
                .expect("expectation");
            // Poll for the kernel's expiry of `once` (the thing under test).
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let out = tokio::process::Command::new("nft")
                    .args(["list", "set", "inet", "ftpgate_k", "once4"])
                    .output()
                    .await
                    .unwrap();
                if !String::from_utf8_lossy(&out.stdout).contains(". 40009") {
                    break;
                }
                assert!(Instant::now() < deadline, "once never expired");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let listed = tokio::process::Command::new("conntrack")
                .args(["-L", "expect"])
                .output()
                .await
                .unwrap();
            let waiting = String::from_utf8_lossy(&listed.stdout).contains("dport=40009");
            let late = send_from(
                c.clone(),
                "198.51.100.2",
                SocketAddr::new(ip("198.51.100.1"), port),
                b"late",
            );
            drop(client_ctl);
            table.destroy().await.expect("destroy");
            drop(server_data3);
            (results, messages, unused, (waiting, late))
        })
    })
    .join()
    .expect("the gateway thread");
    let (results, messages, unused, (waiting, late)) = gateway;
    let timed_out = |r: &io::Result<()>| matches!(r, Err(e) if e.kind() == io::ErrorKind::TimedOut);
    let (foreign, from, bytes, second, closed) = &results[0];
    assert!(timed_out(foreign), "another host: {foreign:?}");
    assert_eq!(from.ip().to_string(), "10.71.2.1");
    assert_eq!(bytes, b"passive data");
    assert!(timed_out(second), "a second connection: {second:?}");
    assert!(
        matches!(closed, DataEvent::Closed { id: 1, to_server, outcome: DataOutcome::Completed, .. } if *to_server >= 12),
        "{closed:?}"
    );
    let (_, from, bytes, second, closed) = &results[1];
    assert_eq!(from.ip().to_string(), "198.51.100.1");
    assert_eq!(bytes, b"active data");
    assert!(timed_out(second), "a second connection: {second:?}");
    assert!(
        matches!(closed, DataEvent::Closed { id: 2, to_client, outcome: DataOutcome::Completed, .. } if *to_client >= 11),
        "{closed:?}"
    );
    let (_, from, bytes, second, closed) = &results[2];
    assert_eq!(from.ip().to_string(), "10.71.2.1");
    assert_eq!(bytes, b"transparent");
    assert!(timed_out(second), "a second connection: {second:?}");
    assert!(
        matches!(
            closed,
            DataEvent::Closed {
                id: 3,
                outcome: DataOutcome::Completed,
                ..
            }
        ),
        "{closed:?}"
    );
    let (_, from, bytes, second, closed) = &results[3];
    assert_eq!(from.ip().to_string(), "fd71:2::1");
    assert_eq!(bytes, b"over ipv6");
    assert!(timed_out(second), "a second connection: {second:?}");
    assert!(
        matches!(
            closed,
            DataEvent::Closed {
                id: 6,
                outcome: DataOutcome::Completed,
                ..
            }
        ),
        "{closed:?}"
    );
    assert!(timed_out(&unused), "the unused plan's peer: {unused:?}");
    assert!(waiting, "the expectation outlives the pinhole's timeout");
    // Not admitted: the gate drops its first SYN; the retransmission, no
    // longer expected, finds the claim expired too and the gateway's closed
    // port (as when a gateway dies with any backend).
    assert!(late.is_err(), "a connection after the timeout: {late:?}");
    // Four data connections, each admitted as RELATED by its first packet.
    let listed = related_packets(&lab.gateway);
    assert!(
        listed.contains("ct state related counter packets 4 "),
        "{listed}"
    );
    // One transaction and one expectation per plan, and one more: the
    // counters' read at the end of a connection that came, the
    // expectation's deletion for the plan closed unused.
    assert_eq!(messages, (5, 3 + 3 + 3 + 3 + 3));
}
