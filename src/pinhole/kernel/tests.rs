//! The kernel backend in network namespaces: a client, the gateway (a
//! router, with the operator's firewall: forward policy drop, only
//! established and related connections accepted) and a server.

use super::*;
use crate::config::PortRange;
use crate::netfilter::netns::{within, Netns};
use crate::pinhole::{ControlConns, Leg, PlanTls, SessionTls};
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};

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
    dial_at(SocketAddr::new(from.parse().unwrap(), 0), to, mark)
}

/// Like [`dial`], from the port of `from` too.
fn dial_at(from: SocketAddr, to: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    if let Some(m) = mark {
        s.set_mark(m)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&from.into())?;
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

/// A listener on `addr` in namespace `ns`.
fn bind_in(ns: &Path, addr: &'static str) -> TcpListener {
    within(ns.to_path_buf(), move || TcpListener::bind(addr).unwrap())
        .join()
        .unwrap()
}

fn ip(a: &str) -> IpAddr {
    a.parse().unwrap()
}

/// A plan with a listen leg (`bind`, for `peer`) and a connect leg (to
/// `target`, from `bind`), on the client's side when `passive`.
fn plan(
    id: PlanId,
    passive: bool,
    (listen, peer): (&str, &str),
    (target, from): (&str, &str),
    client_view: Option<IpAddr>,
) -> DataPlan {
    let listen = Leg::Listen {
        bind: ip(listen),
        peer: ip(peer),
    };
    let connect = Leg::Connect {
        target: target.parse().unwrap(),
        bind: ip(from),
    };
    let (client, server) = if passive {
        (listen, connect)
    } else {
        (connect, listen)
    };
    DataPlan {
        id,
        client,
        server,
        client_view,
        tls: PlanTls::default(),
    }
}

/// A session's control connections, open while this lives: the client's
/// (from `client`, in namespace `c`) to the gateway's marked listener on
/// `gateway`, and the gateway's (marked, from `upstream`) to `server_ctl`.
struct Control {
    session: SessionInfo,
    client_ctl: TcpStream,
    _conns: [TcpStream; 3],
}

fn control(
    id: u64,
    c: &Path,
    client: &'static str,
    gateway: &str,
    upstream: &str,
    server_ctl: &TcpListener,
) -> Control {
    let listener = marked_listener(gateway);
    let to = listener.local_addr().unwrap();
    let client_ctl = within(c.to_path_buf(), move || dial(client, to, None).unwrap())
        .join()
        .unwrap();
    let (accepted, client_peer) = listener.accept().unwrap();
    let server = server_ctl.local_addr().unwrap();
    let up = dial(upstream, server, Some(MARK)).unwrap();
    let (server_side, _) = server_ctl.accept().unwrap();
    let session = SessionInfo {
        id,
        client: client_peer,
        server,
        activity: Default::default(),
        balancers: None,
        tls: SessionTls::default(),
        control: Some(ControlConns {
            client_local: accepted.local_addr().unwrap(),
            client_peer,
            client_dst: accepted.local_addr().unwrap(),
            server_local: up.local_addr().unwrap(),
            server: up.peer_addr().unwrap(),
        }),
    };
    Control {
        session,
        client_ctl,
        _conns: [accepted, up, server_side],
    }
}

/// `plan` opened on `backend`: where it listens, its pinhole, its events.
async fn open(
    backend: &KernelBackend,
    session: &SessionInfo,
    plan: DataPlan,
) -> (Opened, Pinhole, mpsc::UnboundedReceiver<DataEvent>) {
    let shape = Shape::of(&plan).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (opened, pinhole) = backend.open(session, plan, shape, tx).await.expect("open");
    (opened, pinhole, rx)
}

/// What one data connection through a pinhole did: where it came from at
/// the far end, the bytes that arrived there, a second connection's fate
/// and the plan's closing event.
struct Transfer {
    from: SocketAddr,
    bytes: Vec<u8>,
    second: io::Result<()>,
    closed: DataEvent,
}

/// `bytes` sent from `from` in `ns` to `announced`, received on `far`; then
/// a second connection; the plan (`id`) must report `Connected` first.
async fn transfer(
    rx: &mut mpsc::UnboundedReceiver<DataEvent>,
    id: PlanId,
    (ns, from): (&Path, &'static str),
    announced: SocketAddr,
    far: TcpListener,
    bytes: &'static [u8],
) -> Transfer {
    let got = receive(far);
    send_from(ns.to_path_buf(), from, announced, bytes).expect("the data connection");
    let (peer, bytes) = got.join().unwrap();
    let second = send_from(ns.to_path_buf(), from, announced, b"again");
    assert_eq!(next_event(rx).await, DataEvent::Connected { id });
    let closed = next_event(rx).await;
    Transfer {
        from: peer,
        bytes,
        second,
        closed,
    }
}

fn timed_out(r: &io::Result<()>) -> bool {
    matches!(r, Err(e) if e.kind() == io::ErrorKind::TimedOut)
}

/// The transfer came from `from` with `bytes`, and a second connection
/// got no answer; its closing event is the caller's to check.
fn check<'a>(t: &'a Transfer, from: &str, bytes: &[u8]) -> &'a DataEvent {
    assert_eq!(t.from.ip().to_string(), from);
    assert_eq!(t.bytes, bytes);
    assert!(timed_out(&t.second), "a second connection: {:?}", t.second);
    &t.closed
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
    let server_ctl = bind_in(&s, "10.71.2.2:2100");
    let server_data = bind_in(&s, "10.71.2.2:30000");
    let server_data2 = bind_in(&s, "10.71.2.2:30001");
    let server_ctl6 = bind_in(&s, "[fd71:2::2]:2100");
    let server_data6 = bind_in(&s, "[fd71:2::2]:30000");
    // Listens, never accepts: a connection admitted to it would complete.
    let server_data3 = bind_in(&s, "10.71.2.2:30002");
    // The client's PORT listener.
    let client_data = bind_in(&c, "198.51.100.2:5555");
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
            let ctl = control(
                1,
                &c,
                "198.51.100.2",
                "198.51.100.1:2121",
                "10.71.2.1",
                &server_ctl,
            );
            let session = &ctl.session;
            let mut results = Vec::new();

            // PASV→PASV: the client connects to the gateway, reaches the
            // server's port 30000 from the gateway's server-side address.
            let pasv = plan(
                1,
                true,
                ("198.51.100.1", "198.51.100.2"),
                ("10.71.2.2:30000", "10.71.2.1"),
                None,
            );
            let (opened, pinhole, mut rx) = open(&backend, session, pasv).await;
            let announced = opened.client_listen.unwrap();
            let foreign = send_from(c.clone(), "198.51.100.3", announced, b"x");
            let from = (c.as_path(), "198.51.100.2");
            let t = transfer(&mut rx, 1, from, announced, server_data, b"passive data").await;
            results.push((foreign, t));
            drop(pinhole);

            // PORT→PORT: the server connects to the gateway, reaches the
            // client's port 5555 from the address the client connected to.
            let port = plan(
                2,
                false,
                ("10.71.2.1", "10.71.2.2"),
                ("198.51.100.2:5555", "198.51.100.1"),
                None,
            );
            let (opened, pinhole, mut rx) = open(&backend, session, port).await;
            let announced = opened.server_listen.unwrap();
            let from = (s.as_path(), "10.71.2.2");
            let t = transfer(&mut rx, 2, from, announced, client_data, b"active data").await;
            results.push((Ok(()), t));
            drop(pinhole);

            // Transparent PASV: the client aims at the server's own address
            // (as curl does), through the gateway, its router.
            let transparent = plan(
                3,
                true,
                ("198.51.100.1", "198.51.100.2"),
                ("10.71.2.2:30001", "10.71.2.1"),
                Some(ip("10.71.2.2")),
            );
            let (opened, pinhole, mut rx) = open(&backend, session, transparent).await;
            let announced = opened.client_listen.unwrap();
            assert_eq!(announced.ip(), ip("10.71.2.2"));
            let from = (c.as_path(), "198.51.100.2");
            let t = transfer(&mut rx, 3, from, announced, server_data2, b"transparent").await;
            results.push((Ok(()), t));
            drop(pinhole);

            // IPv6: a session of its own (a plan's master is a control
            // connection of its family), PASV→PASV.
            let ctl6 = control(
                2,
                &c,
                "2001:db8:100::2",
                "[2001:db8:100::1]:2121",
                "fd71:2::1",
                &server_ctl6,
            );
            let pasv6 = plan(
                6,
                true,
                ("2001:db8:100::1", "2001:db8:100::2"),
                ("[fd71:2::2]:30000", "fd71:2::1"),
                None,
            );
            let (opened, pinhole, mut rx) = open(&backend, &ctl6.session, pasv6).await;
            let announced = opened.client_listen.unwrap();
            let from = (c.as_path(), "2001:db8:100::2");
            let t = transfer(&mut rx, 6, from, announced, server_data6, b"over ipv6").await;
            results.push((Ok(()), t));
            drop(pinhole);
            drop(ctl6.client_ctl);

            // A plan closed unused: its expectation is deleted, and its
            // peer is not admitted.
            let unused = plan(
                4,
                true,
                ("198.51.100.1", "198.51.100.2"),
                ("10.71.2.2:30000", "10.71.2.1"),
                None,
            );
            let (opened, pinhole, _rx) = open(&backend, session, unused).await;
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
            let shape = Shape::of(&plan(
                5,
                true,
                ("198.51.100.1", "198.51.100.2"),
                ("10.71.2.2:30002", "10.71.2.1"),
                None,
            ))
            .unwrap();
            let port = 40009;
            let conns = session.control.as_ref().unwrap();
            let exp = shape.expectation(port, conns).unwrap();
            let (claim, once, elements) = shape.elements(port);
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
            drop(ctl.client_ctl);
            table.destroy().await.expect("destroy");
            drop(server_data3);
            (results, messages, unused, (waiting, late))
        })
    })
    .join()
    .expect("the gateway thread");
    let (results, messages, unused, (waiting, late)) = gateway;
    let (foreign, t) = &results[0];
    assert!(timed_out(foreign), "another host: {foreign:?}");
    let closed = check(t, "10.71.2.1", b"passive data");
    assert!(
        matches!(closed, DataEvent::Closed { id: 1, to_server, outcome: DataOutcome::Completed, .. } if *to_server >= 12),
        "{closed:?}"
    );
    let closed = check(&results[1].1, "198.51.100.1", b"active data");
    assert!(
        matches!(closed, DataEvent::Closed { id: 2, to_client, outcome: DataOutcome::Completed, .. } if *to_client >= 11),
        "{closed:?}"
    );
    let closed = check(&results[2].1, "10.71.2.1", b"transparent");
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
    let closed = check(&results[3].1, "fd71:2::1", b"over ipv6");
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
    // Refused by the closed port, or unanswered while the claim lasts: not
    // any other error (a set-up failure would pass for a refusal).
    assert!(
        matches!(&late, Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut)),
        "a connection after the timeout: {late:?}"
    );
    // Four data connections, each admitted as RELATED by its first packet.
    let listed = related_packets(&lab.gateway);
    assert!(
        listed.contains("ct state related counter packets 4 "),
        "{listed}"
    );
    // Per plan: one transaction and one expectation to open it; one more
    // transaction for its NAT maps' removal (at the connection, or at the
    // end of the plan closed unused); then the counters' read at the end
    // of a connection that came, or the expectation's deletion for the
    // plan closed unused. Once per process and side, the first passive and
    // the first active plan read their control connection's helper.
    assert_eq!(messages, (5, 4 + 4 + 4 + 4 + 4 + 2));
}

/// A client may reopen a tuple whose gateway side is in TIME_WAIT (the
/// gateway closed first). The first packet's socket is then the TIME_WAIT
/// one, not the marked listener, and the table's anchor gives the client's
/// control connection no helper: an active plan's expectation cannot hang
/// on it. The plan still opens (on the server's connection), its data
/// connection is RELATED, and it reaches the client.
#[test]
fn an_active_plan_opens_when_the_client_reopened_a_time_wait_tuple() {
    let Some(lab) = Lab::new() else { return };
    let (c, g, s) = (lab.client.path(), lab.gateway.path(), lab.server.path());
    let server_ctl = bind_in(&s, "10.71.2.2:2100");
    let client_data = bind_in(&c, "198.51.100.2:5555");
    let client_port: SocketAddr = "198.51.100.2:47000".parse().unwrap();
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
            let listener = marked_listener("198.51.100.1:2121");
            let to = listener.local_addr().unwrap();
            // An earlier session from the same client port, which the
            // gateway closes first.
            let first = within(c.clone(), move || dial_at(client_port, to, None).unwrap())
                .join()
                .unwrap();
            let (accepted, _) = listener.accept().unwrap();
            drop(accepted);
            let mut first = first;
            assert_eq!(first.read(&mut [0; 1]).unwrap(), 0, "the gateway's FIN");
            drop(first);
            // Poll for the gateway's TIME_WAIT socket (the state under
            // test), with a bound.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let listed = tokio::process::Command::new("ss")
                    .args(["-tanH", "state", "time-wait"])
                    .output()
                    .await
                    .unwrap();
                let out = String::from_utf8_lossy(&listed.stdout);
                if out.contains("198.51.100.2:47000") {
                    break;
                }
                assert!(Instant::now() < deadline, "no TIME_WAIT socket: {out}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let client_ctl = within(c.clone(), move || dial_at(client_port, to, None))
                .join()
                .unwrap()
                .expect("the client reopens its tuple");
            let (accepted, client_peer) = listener.accept().unwrap();
            assert_eq!(client_peer, client_port);
            let server = server_ctl.local_addr().unwrap();
            let up = dial("10.71.2.1", server, Some(MARK)).unwrap();
            let (_server_side, _) = server_ctl.accept().unwrap();
            let session = SessionInfo {
                id: 1,
                client: client_peer,
                server,
                activity: Default::default(),
                balancers: None,
                tls: SessionTls::default(),
                control: Some(ControlConns {
                    client_local: accepted.local_addr().unwrap(),
                    client_peer,
                    client_dst: accepted.local_addr().unwrap(),
                    server_local: up.local_addr().unwrap(),
                    server: up.peer_addr().unwrap(),
                }),
            };
            // The client's connection has neither the mark nor a helper.
            let listed = tokio::process::Command::new("conntrack")
                .args(["-L", "-p", "tcp", "--sport", "47000", "--dport", "2121"])
                .output()
                .await
                .unwrap();
            let entry = String::from_utf8_lossy(&listed.stdout).into_owned();
            let port = plan(
                2,
                false,
                ("10.71.2.1", "10.71.2.2"),
                ("198.51.100.2:5555", "198.51.100.1"),
                None,
            );
            let (opened, pinhole, mut rx) = open(&backend, &session, port).await;
            let announced = opened.server_listen.unwrap();
            let from = (s.as_path(), "10.71.2.2");
            let t = transfer(&mut rx, 2, from, announced, client_data, b"active data").await;
            drop(pinhole);
            let messages = backend.messages().sent.load(Ordering::Relaxed);
            drop((client_ctl, accepted, up));
            table.destroy().await.expect("destroy");
            (entry, t, messages)
        })
    })
    .join()
    .expect("the gateway thread");
    let (entry, t, messages) = gateway;
    assert!(
        entry.contains("ESTABLISHED")
            && !entry.contains("mark=268435456")
            && !entry.contains("helper="),
        "the reopened client connection: {entry}"
    );
    let closed = check(&t, "198.51.100.1", b"active data");
    assert!(
        matches!(
            closed,
            DataEvent::Closed {
                id: 2,
                outcome: DataOutcome::Completed,
                ..
            }
        ),
        "{closed:?}"
    );
    let listed = related_packets(&lab.gateway);
    assert!(
        listed.contains("ct state related counter packets 1 "),
        "{listed}"
    );
    // The refused expectation on the client's connection and the one on
    // the server's; the transaction to open, the maps' removal, the
    // counters' read; the server side's helper check.
    assert_eq!(messages, 2 + 3 + 1);
}

/// Operator rules that give the gateway's connection to the server the
/// kernel's FTP helper before the table's anchor does, and set the whole ct
/// mark of the client's connection after it: the backend's check of each
/// side (once per process) names what is wrong.
#[test]
fn the_anchor_check_names_what_operator_rules_changed() {
    let Some(lab) = Lab::new() else { return };
    let (c, g, s) = (lab.client.path(), lab.gateway.path(), lab.server.path());
    let ftp_first = "table inet opftp {
	ct helper ftp4 { type \"ftp\" protocol tcp; l3proto ip; }
	chain out {
		type filter hook output priority filter - 10; policy accept;
		ct state new tcp dport 2100 ct helper set \"ftp4\"
	}
	chain in {
		type filter hook input priority filter; policy accept;
		ct state new tcp dport 2121 ct mark set 0x1
	}
}
";
    if let (false, out) = lab.gateway.nft(&["-f", "-"], Some(ftp_first)) {
        crate::netfilter::netns::skip(&format!(
            "the kernel's FTP helper (nf_conntrack_ftp) is not available: {}",
            out.trim()
        ));
        return;
    }
    let server_ctl = bind_in(&s, "10.71.2.2:2100");
    let checks = within(g, move || {
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
            let ctl = control(
                1,
                &c,
                "198.51.100.2",
                "198.51.100.1:2121",
                "10.71.2.1",
                &server_ctl,
            );
            let conns = ctl.session.control.unwrap();
            let server_leg = Tuple {
                src: conns.server_local,
                dst: conns.server,
            };
            let client_leg = Tuple {
                src: conns.client_local,
                dst: conns.client_peer,
            };
            let checks = [
                backend.check_anchor(1, true, server_leg).await,
                backend.check_anchor(1, true, server_leg).await,
                backend.check_anchor(1, false, client_leg).await,
            ];
            table.destroy().await.expect("destroy");
            checks
        })
    })
    .join()
    .expect("the gateway thread");
    assert_eq!(
        checks,
        [
            Some("helper ftp".to_owned()),
            None,
            Some("mark 0x00000001".to_owned())
        ]
    );
}
