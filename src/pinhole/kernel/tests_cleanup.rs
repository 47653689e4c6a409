//! The kernel backend's expectations at the gateway's exit, against the
//! expectation table's share, and the gate against expectations the
//! gateway did not make, in network namespaces: a client, the gateway (a
//! router whose operator firewall forwards and admits only established
//! and related connections) and a server.

use super::*;
use crate::config::PortRange;
use crate::netfilter::ctnetlink::Tuple;
use crate::netfilter::netns::{within, Netns};
use crate::pinhole::relay::RelayBackend;
use crate::pinhole::{Backend, ControlConns, Leg, PlanTls, SessionTls};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::PathBuf;

const MARK: u32 = 0x1000_0000;

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
    /// client 198.51.100.2 — gateway 198.51.100.1 | 10.71.2.1 — server
    /// 10.71.2.2. The gateway's input chain admits established and
    /// related connections first (tests add their drops after).
    fn new() -> Option<Lab> {
        let lab = Lab {
            client: Netns::new()?,
            gateway: Netns::new()?,
            server: Netns::new()?,
        };
        let (c, g, s) = (lab.client.name(), lab.gateway.name(), lab.server.name());
        for (ours, peer, theirs) in [("gc", "c0", c), ("gs", "s0", s)] {
            let out = std::process::Command::new("ip")
                .args([
                    "link", "add", ours, "netns", g, "type", "veth", "peer", "name", peer, "netns",
                    theirs,
                ])
                .output()
                .unwrap();
            assert!(out.status.success(), "ip link: {out:?}");
        }
        for (ns, dev, addr) in [
            (&lab.client, "c0", "198.51.100.2/24"),
            (&lab.gateway, "gc", "198.51.100.1/24"),
            (&lab.gateway, "gs", "10.71.2.1/24"),
            (&lab.server, "s0", "10.71.2.2/24"),
        ] {
            sh(ns, "ip", &["addr", "add", addr, "dev", dev, "nodad"]);
            sh(ns, "ip", &["link", "set", dev, "up"]);
            sh(ns, "ip", &["link", "set", "lo", "up"]);
        }
        let route = ["route", "add", "default", "via"];
        sh(&lab.client, "ip", &[&route[..], &["198.51.100.1"]].concat());
        sh(&lab.server, "ip", &[&route[..], &["10.71.2.1"]].concat());
        sh(&lab.gateway, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        const FIREWALL: &str = "table inet op {
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
	}
	chain input {
		type filter hook input priority filter; policy accept;
		ct state established,related accept
	}
}
";
        let (ok, out) = lab.gateway.nft(&["-f", "-"], Some(FIREWALL));
        assert!(ok, "{out}");
        Some(lab)
    }
}

/// A listener on `addr` (port 0: any), made in namespace `ns`; with the
/// gateway's mark when `mark`.
fn listener(ns: PathBuf, addr: &'static str, mark: bool) -> TcpListener {
    within(ns, move || {
        let addr: SocketAddr = addr.parse().unwrap();
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if mark {
            s.set_mark(MARK).unwrap();
        }
        s.bind(&addr.into()).unwrap();
        s.listen(8).unwrap();
        TcpListener::from(s)
    })
    .join()
    .unwrap()
}

/// A connection from `from` (port any) to `to`, in namespace `ns`, or the
/// error within 2 s: `TimedOut` when the SYN got no answer at all.
fn dial(ns: PathBuf, from: &'static str, to: SocketAddr, mark: bool) -> io::Result<TcpStream> {
    within(ns, move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        if mark {
            s.set_mark(MARK)?;
        }
        s.bind(&SocketAddr::new(from.parse().unwrap(), 0).into())?;
        s.connect_timeout(&to.into(), Duration::from_secs(2))?;
        Ok(s.into())
    })
    .join()
    .unwrap()
}

/// The kernel's expectations, as `conntrack -L expect` lists them in the
/// calling thread's namespace.
async fn listed_expectations() -> String {
    let out = tokio::process::Command::new("conntrack")
        .args(["-L", "expect"])
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The session's two control connections (kept open while they are
/// held), and what the backend knows of them.
struct Session {
    info: SessionInfo,
    _conns: Vec<TcpStream>,
}

/// The namespaces' files: (client, gateway, server).
type Paths = (PathBuf, PathBuf, PathBuf);

fn paths(lab: &Lab) -> Paths {
    (lab.client.path(), lab.gateway.path(), lab.server.path())
}

/// A session's control connections, made after the gateway's table (whose
/// anchor gives them their helper).
fn session((c, g, s): &Paths, id: u64) -> Session {
    let server_ctl = listener(s.clone(), "10.71.2.2:0", false);
    let ctl = listener(g.clone(), "198.51.100.1:0", true);
    let to = ctl.local_addr().unwrap();
    let client_side = dial(c.clone(), "198.51.100.2", to, false).unwrap();
    let (accepted, client_peer) = ctl.accept().unwrap();
    let server = server_ctl.local_addr().unwrap();
    let upstream = dial(g.clone(), "10.71.2.1", server, true).unwrap();
    let (server_side, _) = server_ctl.accept().unwrap();
    let control = ControlConns {
        client_local: accepted.local_addr().unwrap(),
        client_peer,
        client_dst: accepted.local_addr().unwrap(),
        server_local: upstream.local_addr().unwrap(),
        server,
    };
    Session {
        info: SessionInfo {
            id,
            client: client_peer,
            server,
            activity: Default::default(),
            balancers: None,
            tls: SessionTls::default(),
            control: Some(control),
        },
        _conns: vec![client_side, accepted, upstream, server_side],
    }
}

/// PASV→PASV: the client 198.51.100.2 to the gateway, on to `target`.
fn passive(id: PlanId, target: SocketAddr) -> DataPlan {
    let ip = |a: &str| a.parse::<IpAddr>().unwrap();
    DataPlan {
        id,
        client: Leg::Listen {
            bind: ip("198.51.100.1"),
            peer: ip("198.51.100.2"),
        },
        server: Leg::Connect {
            target,
            bind: ip("10.71.2.1"),
        },
        client_view: None,
        tls: PlanTls::default(),
    }
}

fn pools() -> (PortPool, PortPool) {
    (
        PortPool::new(
            "client",
            PortRange {
                lo: 40000,
                hi: 40009,
            },
        ),
        PortPool::new(
            "server",
            PortRange {
                lo: 41000,
                hi: 41009,
            },
        ),
    )
}

fn settings() -> DataSettings {
    DataSettings {
        pinhole_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
    }
}

/// Runs `f` with a tokio runtime on a thread of the gateway's namespace.
fn on_gateway<T: Send + 'static, F: std::future::Future<Output = T>>(
    lab: &Lab,
    f: impl FnOnce() -> F + Send + 'static,
) -> T {
    within(lab.gateway.path(), move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
    .join()
    .expect("the gateway thread")
}

/// The gateway exits (the backend's close, then the table's destruction,
/// as `main` does) while a plan still waits for its connection: the
/// expectation is gone with it, and the client's connection to the
/// announced port reaches nothing (the gateway's closed port answers).
/// Without the close, the kernel admitted it, NATed, to the server.
#[test]
fn waiting_expectations_are_deleted_at_exit() {
    let Some(lab) = Lab::new() else { return };
    // Listens, never accepts: a connection admitted to it would complete.
    let server_data = listener(lab.server.path(), "10.71.2.2:0", false);
    let target = server_data.local_addr().unwrap();
    let p = paths(&lab);
    let (before, after, announced) = on_gateway(&lab, move || async move {
        let table = Arc::new(InterceptTable::create("ftpgate_x", MARK).await.unwrap());
        let session = session(&p, 1);
        let (client_pool, server_pool) = pools();
        let backend = KernelBackend::new(client_pool, server_pool, settings(), table.clone(), MARK)
            .await
            .expect("the backend");
        let plan = passive(1, target);
        let shape = Shape::of(&plan).unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let (opened, pinhole) = backend
            .open(&session.info, plan, shape, tx)
            .await
            .expect("open");
        let announced = opened.client_listen.unwrap();
        let before = listed_expectations().await;
        // Exit with the session still open: its pinhole is not dropped.
        backend.close().await;
        table.destroy().await.expect("destroy");
        let after = listed_expectations().await;
        drop(pinhole);
        drop(session);
        (before, after, announced)
    });
    let port = format!("dport={}", announced.port());
    assert!(before.contains(&port), "the plan's expectation: {before}");
    assert!(!after.contains(&port), "left after exit: {after}");
    let late = dial(lab.client.path(), "198.51.100.2", announced, false);
    assert!(
        matches!(&late, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused),
        "a connection to the pinhole after exit: {late:?}"
    );
    drop(server_data);
}

/// With the backend's share of the expectation table set to one, a second
/// plan while the first waits goes to the relay: the kernel holds one plan
/// and one expectation, the relay the other plan, on another port.
#[test]
fn plans_over_the_expectation_share_go_to_the_relay() {
    let Some(lab) = Lab::new() else { return };
    let server_data = listener(lab.server.path(), "10.71.2.2:0", false);
    let target = server_data.local_addr().unwrap();
    let p = paths(&lab);
    let got = on_gateway(&lab, move || async move {
        let table = Arc::new(InterceptTable::create("ftpgate_x", MARK).await.unwrap());
        let session = session(&p, 7);
        let (client_pool, server_pool) = pools();
        let relay = RelayBackend::new(
            client_pool.clone(),
            server_pool.clone(),
            settings(),
            Some(table.clone()),
        );
        let mut kernel =
            KernelBackend::new(client_pool, server_pool, settings(), table.clone(), MARK)
                .await
                .expect("the backend");
        kernel.cap = 1;
        let backend = Backend::Kernel { kernel, relay };
        let mut held = Vec::new();
        let mut ports = Vec::new();
        for id in [1, 2] {
            let (tx, rx) = mpsc::unbounded_channel();
            let (opened, pinhole) = backend
                .open(&session.info, passive(id, target), tx)
                .await
                .expect("open");
            ports.push(opened.client_listen.unwrap().port());
            held.push((pinhole, rx));
        }
        let Backend::Kernel { kernel, relay } = &backend else {
            unreachable!()
        };
        let counts = (kernel.plans(), kernel.waiting(), relay.usage().plans);
        backend.close().await;
        drop(held);
        table.destroy().await.expect("destroy");
        drop(session);
        (counts, ports)
    });
    let ((kernel_plans, waiting, relay_plans), ports) = got;
    assert_eq!((kernel_plans, waiting, relay_plans), (1, 1, 1));
    assert_ne!(ports[0], ports[1]);
    drop(server_data);
}

/// An expectation the gateway did not make (as the "sane" helper makes
/// one from a peer's bytes), on a marked control connection, to a port
/// with no `once` element: the gate drops its RELATED connection, and
/// the retransmission, no longer expected, is new and meets the
/// operator's input, which drops it. Without the table, the same
/// expectation admits the connection (what the test would see without
/// the gate).
#[test]
fn the_gate_drops_related_connections_the_gateway_did_not_make() {
    let Some(lab) = Lab::new() else { return };
    let p = paths(&lab);
    let victim = listener(lab.gateway.path(), "198.51.100.1:0", false);
    let to = victim.local_addr().unwrap();
    let port = to.port().to_string();
    sh(
        &lab.gateway,
        "nft",
        &[
            "add", "rule", "inet", "op", "input", "tcp", "dport", &port, "drop",
        ],
    );
    let c = lab.client.path();
    let (listed, gated, open) = on_gateway(&lab, move || async move {
        let table = InterceptTable::create("ftpgate_x", MARK).await.unwrap();
        let session = session(&p, 1);
        let control = session.info.control.unwrap();
        let exp = Expectation {
            master: Tuple {
                src: control.client_peer,
                dst: control.client_local,
            },
            peer: control.client_peer.ip(),
            dst: to,
            nat: None,
        };
        let mut expectations = Expectations::open().unwrap();
        expectations.create(&exp).await.expect("an expectation");
        let listed = listed_expectations().await;
        let gated = dial(c.clone(), "198.51.100.2", to, false);
        // The control: the same expectation, once the gate is gone.
        table.destroy().await.expect("destroy");
        expectations.create(&exp).await.expect("an expectation");
        let open = dial(c, "198.51.100.2", to, false);
        drop(session);
        (listed, gated, open)
    });
    assert!(listed.contains(&format!("dport={port}")), "{listed}");
    assert!(
        matches!(&gated, Err(e) if e.kind() == io::ErrorKind::TimedOut),
        "a related connection the gateway did not make: {gated:?}"
    );
    assert!(open.is_ok(), "the expectation without the gate: {open:?}");
    drop(victim);
}

/// A port's next plan whose nft transaction fails (the table is gone, as
/// after an operator's `flush ruleset`) leaves the port's lingering claim
/// registered, so that whoever uses the port next still removes it.
#[test]
fn a_failed_transaction_keeps_the_lingering_claim() {
    let Some(lab) = Lab::new() else { return };
    let server_data = listener(lab.server.path(), "10.71.2.2:0", false);
    let target = server_data.local_addr().unwrap();
    let p = paths(&lab);
    let (failed, kept) = on_gateway(&lab, move || async move {
        let table = Arc::new(InterceptTable::create("ftpgate_x", MARK).await.unwrap());
        let session = session(&p, 1);
        let (client_pool, server_pool) = pools();
        let backend = KernelBackend::new(client_pool, server_pool, settings(), table.clone(), MARK)
            .await
            .expect("the backend");
        let plan = passive(1, target);
        let shape = Shape::of(&plan).unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let (opened, pinhole) = backend
            .open(&session.info, plan, shape, tx)
            .await
            .expect("open");
        let port = opened.client_listen.unwrap().port();
        drop(pinhole);
        // Poll for the plan's end (its claim then lingers), with a bound.
        let deadline = Instant::now() + Duration::from_secs(10);
        while backend.plans() > 0 {
            assert!(Instant::now() < deadline, "the plan never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        table.destroy().await.expect("destroy");
        let (claim, once, elements) = shape.elements(port);
        let failed = backend
            .install(claim, once, &elements, Duration::from_secs(5))
            .await
            .is_err();
        let kept = backend.claims.peek(port).await.is_some();
        drop(session);
        (failed, kept)
    });
    assert!(failed, "the transaction on a destroyed table");
    assert!(kept, "the lingering claim is forgotten");
    drop(server_data);
}
