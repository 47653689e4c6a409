//! The relay carrying TLS data legs, against real rustls endpoints on
//! loopback. Certificates are generated here, at test time. Each test
//! first makes the control-session handshakes (test client ↔ gateway,
//! gateway ↔ test server) so that data connections have a session to
//! resume, as an FTPS session would after AUTH TLS.

use super::*;
use crate::config::PortRange;
use crate::pinhole::{Activity, SessionTls};
use crate::tls::client::{ClientTls, SessionClient, Trust};
use crate::tls::server::{ServerTls, SessionServer};
use crate::tls::store::CertStore;
use crate::tls::Handshake;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MIB: usize = 1024 * 1024;

/// One generated CA with a leaf for `ftp.example`, loaded.
struct Pki {
    _dir: tempfile::TempDir,
    ca: std::path::PathBuf,
    store: Arc<CertStore>,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "Test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(params, ca_key);
    let mut params = CertificateParams::new(vec!["ftp.example".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "ftp.example");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cert_path = write("cert.pem", cert.pem());
    let key_path = write("key.pem", key.serialize_pem());
    let ca = write("ca.pem", ca_cert.pem());
    let store = CertStore::load(&cert_path, &key_path).unwrap();
    Pki {
        _dir: dir,
        ca,
        store,
    }
}

/// The four TLS ends of one FTPS session: the test client and the
/// gateway's server side (client leg), the gateway's client side and the
/// test server (server leg).
struct Ends {
    client: SessionClient,
    gw_server: SessionServer,
    gw_client: SessionClient,
    server: SessionServer,
}

impl Ends {
    /// With `require_resumption` on the gateway's client leg; the test
    /// server always requires it (a strict server, as vsftpd).
    async fn new(pki: &Pki, require_resumption: bool) -> Ends {
        let client_side = ClientTls::new(Trust::CaFile(pki.ca.clone()), "ftp.example").unwrap();
        let ends = Ends {
            client: client_side.for_session(),
            gw_server: ServerTls::new(Arc::clone(&pki.store), require_resumption)
                .unwrap()
                .for_session()
                .unwrap(),
            gw_client: client_side.for_session(),
            server: ServerTls::new(Arc::clone(&pki.store), true)
                .unwrap()
                .for_session()
                .unwrap(),
        };
        control(&ends.gw_server, &ends.client).await;
        control(&ends.server, &ends.gw_client).await;
        ends
    }

    fn session(&self) -> SessionInfo {
        SessionInfo {
            id: 41,
            client: "127.0.0.1:1".parse().unwrap(),
            server: "127.0.0.1:2".parse().unwrap(),
            activity: Activity::default(),
            balancers: None,
            tls: SessionTls {
                client: Some(self.gw_server.clone()),
                server: Some(self.gw_client.clone()),
            },
            control: None,
        }
    }
}

/// A control connection: handshake, then a line each way, so the client
/// has read the server's session tickets.
async fn control(server: &SessionServer, client: &SessionClient) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (s, c) = tokio::join!(server.accept_control(a), client.connect(b));
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    s.write_all(b"220 ready\r\n").await.unwrap();
    s.flush().await.unwrap();
    let mut line = [0u8; 11];
    c.read_exact(&mut line).await.unwrap();
    c.write_all(b"NOOP\r\n").await.unwrap();
    c.flush().await.unwrap();
    let mut line = [0u8; 6];
    s.read_exact(&mut line).await.unwrap();
}

/// How a test endpoint speaks on its data connection.
#[derive(Clone)]
enum Role {
    Plain,
    /// TLS client (the FTP client on the client leg).
    Client(SessionClient),
    /// TLS server, refusing a data connection that does not resume.
    Server(SessionServer),
}

/// Handshakes as `role`, then sends `out`, half-closes (close_notify
/// under TLS) and reads all the peer sends. Returns what was read, and
/// whether the handshake resumed.
async fn endpoint(tcp: TcpStream, role: Role, out: Vec<u8>) -> io::Result<(Vec<u8>, Handshake)> {
    match role {
        Role::Plain => Ok((exchange(tcp, out).await?, Handshake::Full)),
        Role::Client(c) => {
            let s = c.connect(tcp).await.map_err(io::Error::other)?;
            let kind = Handshake::of(s.get_ref().1);
            Ok((exchange(s, out).await?, kind))
        }
        Role::Server(srv) => {
            let s = srv.accept_data(tcp).await.map_err(io::Error::other)?;
            let kind = Handshake::of(s.get_ref().1);
            Ok((exchange(s, out).await?, kind))
        }
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: S, out: Vec<u8>) -> io::Result<Vec<u8>> {
    let (mut r, mut w) = tokio::io::split(s);
    let send = async {
        w.write_all(&out).await?;
        w.shutdown().await
    };
    let mut got = Vec::new();
    let recv = r.read_to_end(&mut got);
    tokio::try_join!(send, recv)?;
    Ok(got)
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

fn backend(pinhole: Duration) -> RelayBackend {
    let settings = DataSettings {
        pinhole_timeout: pinhole,
        connect_timeout: Duration::from_secs(5),
    };
    RelayBackend::new(
        PortPool::new(
            "client",
            PortRange {
                lo: 20000,
                hi: 39999,
            },
        ),
        PortPool::new(
            "server",
            PortRange {
                lo: 40000,
                hi: 60000,
            },
        ),
        settings,
        None,
    )
}

fn lo() -> IpAddr {
    Ipv4Addr::LOCALHOST.into()
}

async fn bounded<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .expect("stuck: no progress in 30s")
}

/// The plan's `Closed` event, skipping the others.
async fn closed(rx: &mut mpsc::UnboundedReceiver<DataEvent>) -> (u64, u64, DataOutcome) {
    loop {
        match bounded(rx.recv()).await.expect("event channel closed") {
            DataEvent::Closed {
                to_client,
                to_server,
                outcome,
                ..
            } => return (to_client, to_server, outcome),
            _ => continue,
        }
    }
}

/// One transfer through a plan with `tls` legs, passive (`active` false:
/// the client dials the gateway, the gateway dials the server) or active
/// (the server dials the gateway, the gateway dials the client). 1 MiB
/// each way; digests compared at both ends, and the handshakes' kinds.
async fn transfer(tls: PlanTls, active: bool) {
    let pki = pki();
    let ends = Ends::new(&pki, true).await;
    let backend = backend(Duration::from_secs(10));
    let session = ends.session();
    let client_role = match tls.client {
        true => Role::Client(ends.client.clone()),
        false => Role::Plain,
    };
    let server_role = match tls.server {
        true => Role::Server(ends.server.clone()),
        false => Role::Plain,
    };
    let (up, down) = (data(MIB, 1), data(MIB, 2));
    let (tx, mut rx) = mpsc::unbounded_channel();

    let (at_client, at_server) = if !active {
        let server = TcpListener::bind((lo(), 0)).await.unwrap();
        let plan = passive(1, &server, tls);
        let (opened, _pinhole) = backend.open(&session, plan, tx).await.unwrap();
        let to = opened.client_listen.unwrap();
        let client = async {
            let tcp = TcpStream::connect(to).await?;
            endpoint(tcp, client_role, up.clone()).await
        };
        let server = async {
            let (tcp, _) = server.accept().await?;
            endpoint(tcp, server_role, down.clone()).await
        };
        bounded(async { tokio::try_join!(client, server) })
            .await
            .unwrap()
    } else {
        let client = TcpListener::bind((lo(), 0)).await.unwrap();
        let plan = DataPlan {
            id: 1,
            client: Leg::Connect {
                target: client.local_addr().unwrap(),
                bind: lo(),
            },
            server: Leg::Listen {
                bind: lo(),
                peer: lo(),
            },
            client_view: None,
            tls,
        };
        let (opened, _pinhole) = backend.open(&session, plan, tx).await.unwrap();
        let to = opened.server_listen.unwrap();
        let client = async {
            let (tcp, _) = client.accept().await?;
            endpoint(tcp, client_role, up.clone()).await
        };
        let server = async {
            let tcp = TcpStream::connect(to).await?;
            endpoint(tcp, server_role, down.clone()).await
        };
        bounded(async { tokio::try_join!(client, server) })
            .await
            .unwrap()
    };
    assert_eq!(sha(&at_client.0), sha(&down), "download digest, {tls:?}");
    assert_eq!(sha(&at_server.0), sha(&up), "upload digest, {tls:?}");
    // Each TLS leg resumed its control session: the test server requires
    // it, and the client leg's gateway side required it.
    if tls.client {
        assert_eq!(at_client.1, Handshake::Resumed, "client leg, {tls:?}");
    }
    if tls.server {
        assert_eq!(at_server.1, Handshake::Resumed, "server leg, {tls:?}");
    }
    let (to_client, to_server, outcome) = closed(&mut rx).await;
    assert_eq!(outcome, DataOutcome::Completed, "{tls:?}");
    assert_eq!((to_client, to_server), (MIB as u64, MIB as u64), "{tls:?}");
    assert!(session.activity.busy_until(Duration::ZERO).is_some());
    assert_eq!(backend.usage(), Usage::default(), "ports released");
}

const CLIENT: PlanTls = PlanTls {
    client: true,
    server: false,
};
const SERVER: PlanTls = PlanTls {
    client: false,
    server: true,
};
const BOTH: PlanTls = PlanTls {
    client: true,
    server: true,
};

#[tokio::test]
async fn passive_tls_on_the_client_leg() {
    transfer(CLIENT, false).await;
}

#[tokio::test]
async fn passive_tls_on_the_server_leg() {
    transfer(SERVER, false).await;
}

#[tokio::test]
async fn passive_tls_on_both_legs() {
    transfer(BOTH, false).await;
}

#[tokio::test]
async fn active_tls_on_the_client_leg() {
    transfer(CLIENT, true).await;
}

#[tokio::test]
async fn active_tls_on_the_server_leg() {
    transfer(SERVER, true).await;
}

#[tokio::test]
async fn active_tls_on_both_legs() {
    transfer(BOTH, true).await;
}

/// A passive plan with TLS on the client leg only; the test server is
/// plain. Returns the plan's end and what the client's attempt gave.
async fn client_leg_attempt(
    session: SessionInfo,
    client: Role,
) -> (
    (u64, u64, DataOutcome),
    io::Result<(Vec<u8>, Handshake)>,
    Usage,
) {
    let backend = backend(Duration::from_secs(10));
    let server = TcpListener::bind((lo(), 0)).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let plan = passive(2, &server, CLIENT);
    let (opened, _pinhole) = backend.open(&session, plan, tx).await.unwrap();
    let tcp = TcpStream::connect(opened.client_listen.unwrap())
        .await
        .unwrap();
    // The server end answers whatever arrives, so a refused plan shows in
    // the plan's outcome, not in a stuck server.
    let serve = tokio::spawn(async move {
        let (tcp, _) = server.accept().await?;
        exchange(tcp, data(1000, 3)).await
    });
    let attempt = bounded(endpoint(tcp, client, data(1000, 4))).await;
    let end = closed(&mut rx).await;
    serve.abort();
    (end, attempt, backend.usage())
}

#[tokio::test]
async fn a_client_data_connection_that_does_not_resume_is_refused() {
    let pki = pki();
    let ends = Ends::new(&pki, true).await;
    // A client side with no control session behind it: a full handshake.
    let stranger = ClientTls::new(Trust::CaFile(pki.ca.clone()), "ftp.example")
        .unwrap()
        .for_session();
    let ((to_client, to_server, outcome), attempt, usage) =
        client_leg_attempt(ends.session(), Role::Client(stranger.clone())).await;
    let DataOutcome::Failed(failure) = &outcome else {
        panic!("not refused: {outcome:?}");
    };
    assert_eq!(
        failure,
        &DataFailure::Tls {
            leg: TlsLeg::Client,
            reason: TlsFailure::NotResumed
        }
    );
    assert!(failure.not_resumed());
    assert!(
        failure.to_string().contains("session reuse required"),
        "{failure}"
    );
    assert!(attempt.is_err(), "the client got no data: {attempt:?}");
    assert_eq!((to_client, to_server), (0, 0));
    assert_eq!(usage.ports, 0, "ports released");

    // Without require_resumption the same stranger is served.
    let ends = Ends::new(&pki, false).await;
    let ((to_client, to_server, outcome), attempt, _) =
        client_leg_attempt(ends.session(), Role::Client(stranger)).await;
    assert_eq!(outcome, DataOutcome::Completed);
    let (got, kind) = attempt.unwrap();
    assert_eq!(kind, Handshake::Full);
    assert_eq!(sha(&got), sha(&data(1000, 3)));
    assert_eq!((to_client, to_server), (1000, 1000));
}

#[tokio::test]
async fn a_stalled_data_handshake_times_out_and_frees_the_ports() {
    let pki = pki();
    let ends = Ends::new(&pki, true).await;
    let mut session = ends.session();
    session.tls.client = Some(
        ends.gw_server
            .clone()
            .with_timeout(Duration::from_millis(200)),
    );
    let backend = backend(Duration::from_secs(10));
    let server = TcpListener::bind((lo(), 0)).await.unwrap();
    let plan = passive(3, &server, CLIENT);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (opened, _pinhole) = backend.open(&session, plan, tx).await.unwrap();
    // Connects and never says a word.
    let mut silent = TcpStream::connect(opened.client_listen.unwrap())
        .await
        .unwrap();
    let (_to_client, _to_server, outcome) = closed(&mut rx).await;
    let DataOutcome::Failed(DataFailure::Tls {
        leg: TlsLeg::Client,
        reason: TlsFailure::Handshake(why),
    }) = &outcome
    else {
        panic!("{outcome:?}");
    };
    assert!(why.contains("longer than 200ms"), "{why}");
    assert_eq!(backend.usage().ports, 0, "ports released");
    // The silent peer was reset, not closed as if a transfer ended.
    let mut buf = [0u8; 1];
    let read = bounded(silent.read(&mut buf)).await;
    assert!(
        matches!(&read, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
}

#[tokio::test]
async fn a_tls_leg_without_its_session_side_fails_cleanly() {
    let pki = pki();
    let ends = Ends::new(&pki, true).await;
    let mut session = ends.session();
    session.tls.client = None;
    let ((_, _, outcome), attempt, usage) =
        client_leg_attempt(session, Role::Client(ends.client.clone())).await;
    assert_eq!(
        outcome,
        DataOutcome::Failed(DataFailure::Tls {
            leg: TlsLeg::Client,
            reason: TlsFailure::NoSessionTls
        })
    );
    assert!(attempt.is_err());
    assert_eq!(usage.ports, 0, "ports released");
}

#[tokio::test]
async fn a_foreign_peer_on_a_tls_listen_leg_gets_no_handshake() {
    let pki = pki();
    // Resumption not required: were the handshake made before the peer
    // check, this foreign client's full handshake would succeed.
    let ends = Ends::new(&pki, false).await;
    let session = ends.session();
    let backend = backend(Duration::from_secs(10));
    let server = TcpListener::bind((lo(), 0)).await.unwrap();
    let expected: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
    let plan = DataPlan {
        client: Leg::Listen {
            bind: lo(),
            peer: expected,
        },
        ..passive(4, &server, CLIENT)
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (opened, _pinhole) = backend.open(&session, plan, tx).await.unwrap();
    let to = opened.client_listen.unwrap();
    let foreign = TcpStream::connect(to).await.unwrap();
    let handshake = bounded(ends.client.connect(foreign)).await;
    assert!(handshake.is_err(), "a foreign peer got a TLS session");
    match bounded(rx.recv()).await.unwrap() {
        DataEvent::Rejected { expected: e, .. } => assert_eq!(e, expected),
        other => panic!("{other:?}"),
    }

    // The expected peer is still served, over TLS.
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(expected, 0)).unwrap();
    let tcp = sock.connect(to).await.unwrap();
    let serve = async {
        let (tcp, _) = server.accept().await?;
        exchange(tcp, data(5000, 5)).await
    };
    let (got, at_server) = bounded(async {
        tokio::try_join!(
            endpoint(tcp, Role::Client(ends.client.clone()), data(7000, 6)),
            serve
        )
    })
    .await
    .unwrap();
    assert_eq!(sha(&got.0), sha(&data(5000, 5)));
    assert_eq!(sha(&at_server), sha(&data(7000, 6)));
    assert_eq!(closed(&mut rx).await.2, DataOutcome::Completed);
}

/// A passive plan with the given TLS legs toward a plain-or-TLS test
/// server listening at `server`.
fn passive(id: PlanId, server: &TcpListener, tls: PlanTls) -> DataPlan {
    DataPlan {
        id,
        client: Leg::Listen {
            bind: lo(),
            peer: lo(),
        },
        server: Leg::Connect {
            target: server.local_addr().unwrap(),
            bind: lo(),
        },
        client_view: None,
        tls,
    }
}

#[tokio::test]
async fn upload_after_upload_resumes_the_gateways_own_session() {
    // The control handshake leaves the gateway two TLS 1.3 tickets; each
    // resumption spends one and the server issues one more on the data
    // connection, which the gateway takes in only by reading that leg
    // while it uploads. Five uploads in a row, to a server that requires
    // resumption, need that supply kept up.
    let pki = pki();
    let ends = Ends::new(&pki, true).await;
    let session = ends.session();
    let backend = backend(Duration::from_secs(10));
    let server = TcpListener::bind((lo(), 0)).await.unwrap();
    for id in 0..5 {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (opened, _pinhole) = backend
            .open(&session, passive(id, &server, SERVER), tx)
            .await
            .unwrap();
        let tcp = TcpStream::connect(opened.client_listen.unwrap())
            .await
            .unwrap();
        let serve = async {
            let (tcp, _) = server.accept().await?;
            endpoint(tcp, Role::Server(ends.server.clone()), Vec::new()).await
        };
        let (at_client, at_server) = bounded(async {
            tokio::try_join!(endpoint(tcp, Role::Plain, data(256 * 1024, 7)), serve)
        })
        .await
        .unwrap_or_else(|e| panic!("upload {id}: {e}"));
        assert!(at_client.0.is_empty());
        assert_eq!(sha(&at_server.0), sha(&data(256 * 1024, 7)), "upload {id}");
        assert_eq!(at_server.1, Handshake::Resumed, "upload {id}");
        let (to_client, to_server, outcome) = closed(&mut rx).await;
        assert_eq!(outcome, DataOutcome::Completed, "upload {id}");
        assert_eq!((to_client, to_server), (0, 256 * 1024));
    }
}

/// A passive plan with `tls` legs, its client connection made; the
/// server's connection is accepted by the caller.
struct WithClient {
    ends: Ends,
    server: TcpListener,
    tcp: TcpStream,
    rx: mpsc::UnboundedReceiver<DataEvent>,
    _pinhole: Pinhole,
    _pki: Pki,
}

/// A [`WithClient`] over a fresh session that requires resumption.
async fn plan_with_client(id: PlanId, tls: PlanTls) -> WithClient {
    let pki = pki();
    let ends = Ends::new(&pki, true).await;
    let server = TcpListener::bind((lo(), 0)).await.unwrap();
    let backend = backend(Duration::from_secs(10));
    let (tx, rx) = mpsc::unbounded_channel();
    let (opened, pinhole) = backend
        .open(&ends.session(), passive(id, &server, tls), tx)
        .await
        .unwrap();
    let tcp = TcpStream::connect(opened.client_listen.unwrap())
        .await
        .unwrap();
    WithClient {
        ends,
        server,
        tcp,
        rx,
        _pinhole: pinhole,
        _pki: pki,
    }
}

/// Reads until the end or an error; what came, and how it ended.
async fn read_all<R: AsyncRead + Unpin>(r: &mut R) -> (Vec<u8>, io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match bounded(r.read(&mut buf)).await {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

/// The test client's TLS session over `tcp`, `sent` written and flushed;
/// the TCP connection under it, for the caller to end as it means to.
async fn upload_then_raw(ends: &Ends, tcp: TcpStream, sent: &[u8]) -> TcpStream {
    let mut tls = ends.client.connect(tcp).await.unwrap();
    tls.write_all(sent).await.unwrap();
    tls.flush().await.unwrap();
    tls.into_inner().0
}

/// The test server's TLS data connection, accepted on `server`.
async fn accept_tls(
    ends: &Ends,
    server: &TcpListener,
) -> tokio_rustls::server::TlsStream<TcpStream> {
    let (up, _) = bounded(server.accept()).await.unwrap();
    ends.server.accept_data(up).await.unwrap()
}

/// The client's TLS session over `tcp`, while the test server sends
/// `body` and ends its side with FIN alone (no close_notify).
async fn download_ended_by_fin(
    ends: &Ends,
    server: &TcpListener,
    tcp: TcpStream,
    body: &[u8],
) -> (tokio_rustls::client::TlsStream<TcpStream>, TcpStream) {
    let serve = async {
        let mut down = accept_tls(ends, server).await;
        down.write_all(body).await.unwrap();
        down.flush().await.unwrap();
        let (mut tcp, _) = down.into_inner();
        tcp.shutdown().await.unwrap();
        tcp
    };
    bounded(async { tokio::join!(async { ends.client.connect(tcp).await.unwrap() }, serve) }).await
}

/// The plan completed, with these byte counts (to the client, to the
/// server).
async fn assert_completed(rx: &mut mpsc::UnboundedReceiver<DataEvent>, counts: (u64, u64)) {
    let (to_client, to_server, outcome) = closed(rx).await;
    assert_eq!(outcome, DataOutcome::Completed);
    assert_eq!((to_client, to_server), counts);
}

/// The plan failed in the relay (a cut, not a verdict).
async fn assert_relay_failed(rx: &mut mpsc::UnboundedReceiver<DataEvent>) {
    let (_, _, outcome) = closed(rx).await;
    assert!(
        matches!(&outcome, DataOutcome::Failed(DataFailure::Relay(_))),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn a_tls_upload_cut_mid_record_fails() {
    let mut t = plan_with_client(9, CLIENT).await;
    let mut tcp = upload_then_raw(&t.ends, t.tcp, &data(64 * 1024, 8)).await;
    // The header of an application-data record of 16 KiB, 100 bytes of
    // its body, then FIN: the connection was cut inside a record, as an
    // attacker on the path or a broken link could cause; the server must
    // not take it for the file's end.
    tcp.write_all(&[0x17, 0x03, 0x03, 0x40, 0x00])
        .await
        .unwrap();
    tcp.write_all(&[0x5a; 100]).await.unwrap();
    tcp.shutdown().await.unwrap();
    let (mut up, _) = bounded(t.server.accept()).await.unwrap();
    let (_, end) = read_all(&mut up).await;
    assert!(
        matches!(&end, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "the server saw an orderly end: {end:?}"
    );
    assert_relay_failed(&mut t.rx).await;
}

/// suppaftp and Python's ftplib end a TLS upload with FIN alone, after
/// their last whole record. The relay passes every byte and the same end
/// to the server: a TLS server there sees no close_notify either, and
/// decides as it would for the client directly.
#[tokio::test]
async fn a_tls_upload_ended_by_fin_alone_on_a_record_boundary_is_passed_on_as_it_came() {
    let mut t = plan_with_client(10, BOTH).await;
    let sent = data(300 * 1024, 9);
    let mut tcp = upload_then_raw(&t.ends, t.tcp, &sent).await;
    tcp.shutdown().await.unwrap();

    let mut up = accept_tls(&t.ends, &t.server).await;
    let (got, end) = read_all(&mut up).await;
    assert_eq!(sha(&got), sha(&sent), "every byte of the upload arrived");
    assert!(
        matches!(&end, Err(e) if e.kind() == io::ErrorKind::UnexpectedEof),
        "the server sees the client's end (FIN, no close_notify): {end:?}"
    );
    // The server ends its side; the client leg gets close_notify and FIN.
    up.shutdown().await.unwrap();
    let (back, end) = read_all(&mut tcp).await;
    assert!(end.is_ok(), "{end:?}");
    assert!(!back.is_empty(), "close_notify came to the client");
    assert_completed(&mut t.rx, (0, sent.len() as u64)).await;
}

/// A server on OpenSSL answers an upload's end without close_notify with
/// a fatal alert, or resets: that is its verdict on the end (given in its
/// final reply), not a failure of the relay; the upload all arrived.
#[tokio::test]
async fn a_server_refusing_an_upload_end_without_close_notify_is_its_own_verdict() {
    let mut t = plan_with_client(14, BOTH).await;
    let sent = data(100 * 1024, 12);
    let mut tcp = upload_then_raw(&t.ends, t.tcp, &sent).await;
    tcp.shutdown().await.unwrap();
    let mut up = accept_tls(&t.ends, &t.server).await;
    let (got, end) = read_all(&mut up).await;
    assert_eq!(sha(&got), sha(&sent));
    assert!(end.is_err(), "{end:?}");
    // The server gives up on the connection: RST.
    let (up, _) = up.into_inner();
    socket2::SockRef::from(&up)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(up);
    assert_completed(&mut t.rx, (0, sent.len() as u64)).await;
}

/// After a whole upload with close_notify, the server closes its side of
/// the data connection with FIN alone (libunftp does): nothing came that
/// way, so nothing can have been cut. The client gets the same end.
#[tokio::test]
async fn a_server_closing_its_side_of_an_upload_with_fin_alone_completes() {
    let mut t = plan_with_client(12, BOTH).await;
    let sent = data(200 * 1024, 11);
    let mut client = t.ends.client.connect(t.tcp).await.unwrap();
    client.write_all(&sent).await.unwrap();
    client.shutdown().await.unwrap();
    let mut up = accept_tls(&t.ends, &t.server).await;
    let (got, end) = read_all(&mut up).await;
    assert!(end.is_ok(), "the upload ended with close_notify: {end:?}");
    assert_eq!(sha(&got), sha(&sent));
    let (mut tcp, _) = up.into_inner();
    tcp.shutdown().await.unwrap();
    let (back, end) = read_all(&mut client).await;
    assert!(back.is_empty());
    assert!(
        matches!(&end, Err(e) if e.kind() == io::ErrorKind::UnexpectedEof),
        "the client sees the server's end (FIN, no close_notify): {end:?}"
    );
    assert_completed(&mut t.rx, (0, sent.len() as u64)).await;
}

/// The same end of the server's side while the client's side is still
/// open is a download cut before its first byte: it fails.
#[tokio::test]
async fn a_server_fin_alone_before_the_clients_end_fails() {
    let mut t = plan_with_client(13, BOTH).await;
    let (mut client, _server_tcp) = download_ended_by_fin(&t.ends, &t.server, t.tcp, &[]).await;
    let (_, end) = read_all(&mut client).await;
    assert!(
        end.is_err(),
        "the client saw an orderly (empty) end: {end:?}"
    );
    assert_relay_failed(&mut t.rx).await;
}

/// A download is not given that leeway: the server's FIN without
/// close_notify may be a cut, and the client must not take it for the
/// file's end.
#[tokio::test]
async fn a_tls_download_ended_by_fin_alone_fails() {
    let mut t = plan_with_client(11, BOTH).await;
    let body = data(64 * 1024, 10);
    let (mut client, _server_tcp) = download_ended_by_fin(&t.ends, &t.server, t.tcp, &body).await;
    let (_, end) = read_all(&mut client).await;
    assert!(end.is_err(), "the client saw an orderly end: {end:?}");
    assert_relay_failed(&mut t.rx).await;
}

/// This thread's CPU time (user + system), from /proc, in clock ticks of
/// 10 ms.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // Fields after the parenthesised command name; utime and stime are
    // the 14th and 15th fields of the line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// A 256 MiB download through a passive plan with `tls` legs, the relay
/// on a thread of its own so that its CPU time is the gateway's alone.
/// Returns (wall time, the relay thread's CPU time).
fn download_256_mib(tls: PlanTls) -> (Duration, Duration) {
    const TOTAL: usize = 256 * MIB;
    let ends_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pki = pki();
    let (ends, server) = ends_rt.block_on(async {
        let ends = Ends::new(&pki, true).await;
        let server = TcpListener::bind((lo(), 0)).await.unwrap();
        (ends, server)
    });
    let session = ends.session();
    let plan = passive(1, &server, tls);
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let gateway = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let backend = backend(Duration::from_secs(10));
            let (tx, mut rx) = mpsc::unbounded_channel();
            let before = thread_cpu();
            let (opened, _pinhole) = backend.open(&session, plan, tx).await.unwrap();
            opened_tx.send(opened).unwrap();
            let end = loop {
                match rx.recv().await.unwrap() {
                    DataEvent::Closed {
                        to_client, outcome, ..
                    } => break (to_client, outcome),
                    _ => continue,
                }
            };
            (end, thread_cpu() - before)
        })
    });
    let opened = opened_rx.recv().unwrap();
    let started = std::time::Instant::now();
    let got = ends_rt.block_on(async {
        let client_role = match tls.client {
            true => Role::Client(ends.client.clone()),
            false => Role::Plain,
        };
        let tcp = TcpStream::connect(opened.client_listen.unwrap())
            .await
            .unwrap();
        let client = async {
            let mut s: Box<dyn AsyncReadWrite> = match client_role {
                Role::Client(c) => Box::new(c.connect(tcp).await.map_err(io::Error::other)?),
                _ => Box::new(tcp),
            };
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0usize;
            loop {
                match s.read(&mut buf).await? {
                    0 => break,
                    k => n += k,
                }
            }
            s.shutdown().await?;
            io::Result::Ok(n)
        };
        let serve = async {
            let (tcp, _) = server.accept().await?;
            let mut s: Box<dyn AsyncReadWrite> = match tls.server {
                true => Box::new(
                    ends.server
                        .accept_data(tcp)
                        .await
                        .map_err(io::Error::other)?,
                ),
                false => Box::new(tcp),
            };
            let chunk = data(MIB, 9);
            for _ in 0..TOTAL / MIB {
                s.write_all(&chunk).await?;
            }
            s.shutdown().await?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await?;
            io::Result::Ok(())
        };
        tokio::try_join!(client, serve).unwrap().0
    });
    let wall = started.elapsed();
    let ((to_client, outcome), cpu) = gateway.join().unwrap();
    assert_eq!(outcome, DataOutcome::Completed);
    assert_eq!((got, to_client), (TOTAL, TOTAL as u64));
    (wall, cpu)
}

trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncReadWrite for T {}

/// `cargo test --release --lib relay_throughput -- --ignored --nocapture`:
/// prints wall and relay CPU time for 256 MiB plain (spliced) and with
/// TLS on both legs.
#[test]
#[ignore = "a measurement; run in release"]
fn relay_throughput_tls_both_legs_vs_plain() {
    let (plain_wall, plain_cpu) = download_256_mib(PlanTls::default());
    let (tls_wall, tls_cpu) = download_256_mib(BOTH);
    let mibs = |d: Duration| 256.0 / d.as_secs_f64();
    println!(
        "plain: {plain_wall:?} ({:.0} MiB/s), relay CPU {plain_cpu:?}",
        mibs(plain_wall)
    );
    println!(
        "TLS both legs: {tls_wall:?} ({:.0} MiB/s), relay CPU {tls_cpu:?}",
        mibs(tls_wall)
    );
    println!(
        "throughput ratio TLS/plain: {:.2}",
        plain_wall.as_secs_f64() / tls_wall.as_secs_f64()
    );
}
