//! TLS building blocks against real handshakes over in-memory pipes.
//! Every certificate and key is generated here, at test time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::client::{ClientTls, SessionClient, Trust};
use super::pem::{self, EXPIRY_WARNING};
use super::server::{DataTlsError, ServerTls, SessionServer};
use super::store::CertStore;
use super::Handshake;

/// A generated CA that signs leaves.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(cn: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        issuer: Issuer::new(params, key),
        pem: cert.pem(),
    }
}

/// A leaf for `name` signed by `ca`: (certificate PEM, key PEM, leaf DER).
fn leaf(ca: &Ca, name: &str, not_after: Option<(i32, u8, u8)>) -> (String, String, Vec<u8>) {
    let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    if let Some((y, m, d)) = not_after {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(y, m, d);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().to_vec())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The 1-based line on which the `n`th (0-based) BEGIN marker of `text` sits.
fn begin_line_of(text: &str, n: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("-----BEGIN"))
        .nth(n)
        .unwrap()
        .0
        + 1
}

#[test]
fn loads_a_chain_and_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("Test CA");
    let (cert, key, der) = leaf(&ca, "ftp.example", None);
    let chain = write(dir.path(), "chain.pem", &format!("{cert}{}", ca.pem));
    let key = write(dir.path(), "key.pem", &key);
    let loaded = pem::load(&chain, &key, &super::provider()).unwrap();
    assert_eq!(loaded.certified.cert.len(), 2);
    assert_eq!(loaded.certified.cert[0].as_ref(), &der[..]);
    assert!(loaded.subject.contains("ftp.example"), "{}", loaded.subject);

    // One file holding both works too, with text around the blocks.
    let both = std::fs::read_to_string(&chain).unwrap()
        + "comment\n"
        + &std::fs::read_to_string(&key).unwrap();
    let both = write(dir.path(), "both.pem", &both);
    let loaded = pem::load(&both, &both, &super::provider()).unwrap();
    assert_eq!(loaded.certified.cert.len(), 2);
}

#[test]
fn bad_files_are_named_with_the_line_of_the_bad_block() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("Test CA");
    let (cert, key, _) = leaf(&ca, "ftp.example", None);
    let key_path = write(dir.path(), "key.pem", &key);
    let provider = super::provider();

    // The second block's base64 is broken.
    let broken =
        format!("{cert}-----BEGIN CERTIFICATE-----\nnot*base64!\n-----END CERTIFICATE-----\n");
    let path = write(dir.path(), "b64.pem", &broken);
    let err = pem::load(&path, &key_path, &provider).unwrap_err();
    assert_eq!(err.path, path);
    assert_eq!(err.line, Some(begin_line_of(&broken, 1)));
    assert!(err.message.contains("base64"), "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "{}:{}: ",
            path.display(),
            begin_line_of(&broken, 1)
        )),
        "{err}"
    );

    // A block with no END line.
    let unterminated = format!("{cert}\n-----BEGIN CERTIFICATE-----\nAAAA\n");
    let path = write(dir.path(), "noend.pem", &unterminated);
    let err = pem::load(&path, &key_path, &provider).unwrap_err();
    assert_eq!(err.line, Some(begin_line_of(&unterminated, 1)), "{err}");
    assert!(
        err.message.contains("no -----END CERTIFICATE----- line"),
        "{err}"
    );

    // Valid base64 that is no certificate.
    let garbage = format!(
        "# header\n{cert}-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n"
    );
    let path = write(dir.path(), "garbage.pem", &garbage);
    let err = pem::load(&path, &key_path, &provider).unwrap_err();
    assert_eq!(err.line, Some(begin_line_of(&garbage, 1)), "{err}");
    assert!(err.message.contains("not an X.509 certificate"), "{err}");

    // A key file given as the certificate: no certificate in it.
    let err = pem::load(&key_path, &key_path, &provider).unwrap_err();
    assert_eq!(
        (err.line, err.message.as_str()),
        (None, "no CERTIFICATE block")
    );

    // A certificate given as the key.
    let cert_path = write(dir.path(), "cert.pem", &cert);
    let err = pem::load(&cert_path, &cert_path, &provider).unwrap_err();
    assert_eq!(
        (err.path.clone(), err.message.as_str()),
        (cert_path.clone(), "no PRIVATE KEY block")
    );

    // Two keys in one key file.
    let two = format!("{key}{key}");
    let two_path = write(dir.path(), "two.pem", &two);
    let err = pem::load(&cert_path, &two_path, &provider).unwrap_err();
    assert_eq!(err.line, Some(begin_line_of(&two, 1)), "{err}");
    assert!(err.message.contains("second private key"), "{err}");

    // A file that is not there.
    let missing = dir.path().join("missing.pem");
    let err = pem::load(&missing, &key_path, &provider).unwrap_err();
    assert_eq!(err.path, missing);
    assert!(err.message.starts_with("cannot read"), "{err}");
}

#[test]
fn a_key_that_is_not_the_chains_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("Test CA");
    let (cert, _, _) = leaf(&ca, "ftp.example", None);
    let (_, other_key, _) = leaf(&ca, "other.example", None);
    let cert = write(dir.path(), "cert.pem", &cert);
    let key = write(dir.path(), "key.pem", &other_key);
    let err = pem::load(&cert, &key, &super::provider()).unwrap_err();
    assert_eq!(err.path, key);
    assert_eq!(err.line, Some(1));
    assert!(
        err.message.contains(&format!(
            "does not match the certificate at {}:1",
            cert.display()
        )),
        "{err}"
    );
}

#[test]
fn a_chain_expiring_within_30_days_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("Test CA");
    let (cert, key, _) = leaf(&ca, "ftp.example", Some((2030, 1, 1)));
    let cert = write(dir.path(), "cert.pem", &cert);
    let key = write(dir.path(), "key.pem", &key);
    let loaded = pem::load(&cert, &key, &super::provider()).unwrap();
    let at = |y: i32, m: u8, d: u8| SystemTime::from(rcgen::date_time_ymd(y, m, d));

    assert_eq!(loaded.expiry_warning(at(2029, 11, 1), EXPIRY_WARNING), None);
    let soon = loaded
        .expiry_warning(at(2029, 12, 20), EXPIRY_WARNING)
        .unwrap();
    assert!(soon.contains("expires in 12 day(s)"), "{soon}");
    assert!(soon.contains(&cert.display().to_string()), "{soon}");
    assert!(soon.contains("2030"), "{soon}");
    let gone = loaded
        .expiry_warning(at(2030, 1, 5), EXPIRY_WARNING)
        .unwrap();
    assert!(gone.contains("expired 4 day(s) ago"), "{gone}");
}

/// A control-style connection: handshake, then a line each way, so the
/// client has read the server's session tickets.
async fn control(server: &SessionServer, client: &SessionClient) -> (Handshake, Handshake) {
    let (a, b) = duplex(64 * 1024);
    let (s, c) = tokio::join!(server.accept_control(a), client.connect(b));
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    exchange(&mut s, &mut c).await;
    (Handshake::of(s.get_ref().1), Handshake::of(c.get_ref().1))
}

async fn exchange<S, C>(s: &mut S, c: &mut C)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(b"220 ready\r\n").await.unwrap();
    s.flush().await.unwrap();
    let mut line = [0u8; 11];
    c.read_exact(&mut line).await.unwrap();
    assert_eq!(&line, b"220 ready\r\n");
    c.write_all(b"NOOP\r\n").await.unwrap();
    c.flush().await.unwrap();
    let mut line = [0u8; 6];
    s.read_exact(&mut line).await.unwrap();
    assert_eq!(&line, b"NOOP\r\n");
}

/// A data connection: the server side's verdict and the client's view.
async fn data(
    server: &SessionServer,
    client: &SessionClient,
) -> (Result<Handshake, String>, Option<Handshake>) {
    let (a, b): (DuplexStream, DuplexStream) = duplex(64 * 1024);
    let (s, c) = tokio::join!(server.accept_data(a), client.connect(b));
    let client_kind = c.as_ref().ok().map(|c| Handshake::of(c.get_ref().1));
    let verdict = match (s, c) {
        (Ok(mut s), Ok(mut c)) => {
            exchange(&mut s, &mut c).await;
            Ok(Handshake::of(s.get_ref().1))
        }
        (Err(e), _) => Err(e.to_string()),
        (Ok(_), Err(e)) => Err(e.to_string()),
    };
    (verdict, client_kind)
}

struct Pki {
    _dir: tempfile::TempDir,
    ca_path: PathBuf,
    store: Arc<CertStore>,
}

fn pki(name: &str) -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("Test CA");
    let (cert, key, _) = leaf(&ca, name, None);
    let cert = write(dir.path(), "cert.pem", &cert);
    let key = write(dir.path(), "key.pem", &key);
    let ca_path = write(dir.path(), "ca.pem", &ca.pem);
    let store = CertStore::load(&cert, &key).unwrap();
    Pki {
        _dir: dir,
        ca_path,
        store,
    }
}

#[tokio::test]
async fn data_connections_must_resume_their_own_control_session() {
    let pki = pki("ftp.example");
    let tls = ServerTls::new(pki.store.clone(), true).unwrap();
    let upstream = ClientTls::new(Trust::CaFile(pki.ca_path.clone()), "ftp.example").unwrap();

    let session = tls.for_session().unwrap();
    let client = upstream.for_session();
    assert_eq!(
        control(&session, &client).await,
        (Handshake::Full, Handshake::Full)
    );

    // The same client store resumes, on both ends, and keeps doing so.
    for _ in 0..3 {
        let (verdict, client_kind) = data(&session, &client).await;
        assert_eq!(verdict, Ok(Handshake::Resumed));
        assert_eq!(client_kind, Some(Handshake::Resumed));
    }

    // A client with no session of its own does a full handshake: refused.
    let stranger = upstream.for_session();
    let (verdict, client_kind) = data(&session, &stranger).await;
    assert_eq!(client_kind, Some(Handshake::Full));
    assert_eq!(verdict, Err(DataTlsError::NotResumed.to_string()));

    // A client that holds another control session's ticket cannot resume
    // this one: each session has its own ticket key and cache.
    let other_session = tls.for_session().unwrap();
    let other_client = upstream.for_session();
    control(&other_session, &other_client).await;
    let (verdict, client_kind) = data(&session, &other_client).await;
    assert_eq!(client_kind, Some(Handshake::Full));
    assert_eq!(verdict, Err(DataTlsError::NotResumed.to_string()));

    // Without the requirement, a full data handshake is accepted.
    let lax = ServerTls::new(pki.store.clone(), false)
        .unwrap()
        .for_session()
        .unwrap();
    let (verdict, _) = data(&lax, &upstream.for_session()).await;
    assert_eq!(verdict, Ok(Handshake::Full));
}

#[tokio::test]
async fn tls12_data_connections_resume_too() {
    let pki = pki("ftp.example");
    let session = ServerTls::new(pki.store.clone(), true)
        .unwrap()
        .for_session()
        .unwrap();
    // A TLS 1.2-only client, as some FTPS servers and clients still are.
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(pem::load_certificates(&pki.ca_path).unwrap());
    let config = rustls::ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("ftp.example").unwrap();
    let mut kinds = Vec::new();
    for control in [true, false] {
        let (a, b) = duplex(64 * 1024);
        let (s, c) = tokio::join!(
            async {
                if control {
                    session.accept_control(a).await.map_err(|e| e.to_string())
                } else {
                    session.accept_data(a).await.map_err(|e| e.to_string())
                }
            },
            connector.connect(name.clone(), b)
        );
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        assert_eq!(
            c.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        let described = super::describe(s.get_ref().1);
        assert!(described.starts_with("TLSv1.2 TLS_ECDHE_"), "{described}");
        exchange(&mut s, &mut c).await;
        kinds.push(Handshake::of(s.get_ref().1));
    }
    assert_eq!(kinds, [Handshake::Full, Handshake::Resumed]);
}

#[tokio::test]
async fn reload_swaps_the_served_certificate_without_dropping_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("Test CA");
    let ca_path = write(dir.path(), "ca.pem", &ca.pem);
    let (cert_a, key_a, der_a) = leaf(&ca, "ftp.example", None);
    let (cert_b, key_b, der_b) = leaf(&ca, "ftp.example", None);
    assert_ne!(der_a, der_b);
    let cert = write(dir.path(), "cert.pem", &cert_a);
    let key = write(dir.path(), "key.pem", &key_a);
    let store = CertStore::load(&cert, &key).unwrap();
    let tls = ServerTls::new(store.clone(), true).unwrap();
    let upstream = ClientTls::new(Trust::CaFile(ca_path), "ftp.example").unwrap();

    let served = |session: SessionServer, client: SessionClient| async move {
        let (a, b) = duplex(64 * 1024);
        let (s, c) = tokio::join!(session.accept_control(a), client.connect(b));
        let (s, c) = (s.unwrap(), c.unwrap());
        let der = c.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        (der, s, c)
    };
    let (before, mut s_old, mut c_old) =
        served(tls.for_session().unwrap(), upstream.for_session()).await;
    assert_eq!(before, der_a);

    std::fs::write(&cert, &cert_b).unwrap();
    std::fs::write(&key, &key_b).unwrap();
    let reloaded = store.reload().unwrap();
    assert_eq!(reloaded.certified.cert[0].as_ref(), &der_b[..]);
    let (after, _, _) = served(tls.for_session().unwrap(), upstream.for_session()).await;
    assert_eq!(after, der_b);

    // The session established before the reload still carries bytes.
    exchange(&mut s_old, &mut c_old).await;

    // A broken renewal is refused and B stays served.
    std::fs::write(&key, &key_a).unwrap();
    let err = store.reload().unwrap_err();
    assert!(err.message.contains("does not match"), "{err}");
    let (still, _, _) = served(tls.for_session().unwrap(), upstream.for_session()).await;
    assert_eq!(still, der_b);
}

#[tokio::test]
async fn server_certificates_that_fail_verification_say_why() {
    let pki = pki("ftp.example");
    let session = ServerTls::new(pki.store.clone(), true)
        .unwrap()
        .for_session()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    let attempt = |client: SessionClient| {
        let session = session.clone();
        async move {
            let (a, b) = duplex(64 * 1024);
            let (_, c) = tokio::join!(session.accept_control(a), client.connect(b));
            c.map(|_| ()).unwrap_err()
        }
    };

    // Signed by a CA the gateway does not trust.
    let other_ca = write(dir.path(), "other.pem", &ca("Other CA").pem);
    let err = attempt(
        ClientTls::new(Trust::CaFile(other_ca.clone()), "ftp.example")
            .unwrap()
            .for_session(),
    )
    .await;
    assert!(err.certificate);
    assert_eq!(
        err.message,
        format!(
            "server certificate refused: not issued by a CA in CA file {} (expected name ftp.example, trusted: CA file {})",
            other_ca.display(),
            other_ca.display()
        )
    );

    // Trusted CA, wrong name.
    let err = attempt(
        ClientTls::new(Trust::CaFile(pki.ca_path.clone()), "files.example")
            .unwrap()
            .for_session(),
    )
    .await;
    assert!(err.certificate);
    assert!(
        err.message
            .contains("not valid for the expected name files.example"),
        "{}",
        err.message
    );

    // Expired.
    let ca2 = ca("Test CA");
    let (cert, key, _) = leaf(&ca2, "ftp.example", Some((2021, 1, 1)));
    let cert = write(dir.path(), "old.pem", &cert);
    let key = write(dir.path(), "old.key", &key);
    let ca2_path = write(dir.path(), "ca2.pem", &ca2.pem);
    let old = ServerTls::new(CertStore::load(&cert, &key).unwrap(), true)
        .unwrap()
        .for_session()
        .unwrap();
    let client = ClientTls::new(Trust::CaFile(ca2_path), "ftp.example")
        .unwrap()
        .for_session();
    let (a, b) = duplex(64 * 1024);
    let (_, c) = tokio::join!(old.accept_control(a), client.connect(b));
    let err = c.map(|_| ()).unwrap_err();
    assert!(err.message.contains("refused: expired"), "{}", err.message);

    // The opt-out accepts what the CA check refused.
    let insecure = ClientTls::new(Trust::Insecure, "files.example")
        .unwrap()
        .for_session();
    let (a, b) = duplex(64 * 1024);
    let (s, c) = tokio::join!(session.accept_control(a), insecure.connect(b));
    exchange(&mut s.unwrap(), &mut c.unwrap()).await;

    // Configuration mistakes are refused when the client side is built.
    let err = ClientTls::new(Trust::CaFile(pki.ca_path.clone()), "not a name!").unwrap_err();
    assert!(
        err.contains("neither a DNS name nor an IP address"),
        "{err}"
    );
    let empty = write(dir.path(), "empty.pem", "no certificates here\n");
    let err = ClientTls::new(Trust::CaFile(empty.clone()), "ftp.example").unwrap_err();
    assert_eq!(err, format!("{}: no CERTIFICATE block", empty.display()));
}

#[tokio::test]
async fn a_stalled_handshake_times_out() {
    let pki = pki("ftp.example");
    let session = ServerTls::new(pki.store.clone(), true)
        .unwrap()
        .for_session()
        .unwrap()
        .with_timeout(Duration::from_millis(50));
    // The peer connects and says nothing.
    let (a, _b) = duplex(1024);
    let err = session.accept_control(a).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
}
/// Data connections get session tickets only when told (downloads and
/// listings): a client that only writes would close with them unread, which
/// resets the connection and drops its unsent bytes. The client here reads
/// each data connection, so it takes in whatever tickets come: with none,
/// its two from the control handshake last two data connections.
#[tokio::test]
async fn data_connections_get_tickets_only_when_told() {
    let pki = pki("ftp.example");
    let session = ServerTls::new(pki.store.clone(), true)
        .unwrap()
        .for_session()
        .unwrap();
    let upstream = ClientTls::new(Trust::CaFile(pki.ca_path.clone()), "ftp.example").unwrap();
    // Off (a new plan, an upload): the control handshake's two last two.
    let client = upstream.for_session();
    control(&session, &client).await;
    session.tickets_on_data(false);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(data(&session, &client).await.0);
    }
    assert_eq!(
        got,
        [
            Ok(Handshake::Resumed),
            Ok(Handshake::Resumed),
            Err(DataTlsError::NotResumed.to_string())
        ]
    );
    // Downloads and listings: each brings fresh tickets, so resumption
    // never runs dry.
    session.tickets_on_data(true);
    let client = upstream.for_session();
    control(&session, &client).await;
    for _ in 0..4 {
        assert_eq!(data(&session, &client).await.0, Ok(Handshake::Resumed));
    }
}

/// TLS 1.3 tickets reach the client's store only when it reads from the
/// connection that carried them. A data connection that is never read
/// (an upload, with a copy that only writes) brings no fresh ticket, so
/// the control session's supply runs out: the relay's TLS copy must poll
/// the server leg for reading during uploads too.
#[tokio::test]
async fn tickets_are_only_taken_in_by_reading() {
    let pki = pki("ftp.example");
    let session = ServerTls::new(pki.store.clone(), true)
        .unwrap()
        .for_session()
        .unwrap();
    let client = ClientTls::new(Trust::CaFile(pki.ca_path.clone()), "ftp.example")
        .unwrap()
        .for_session();
    control(&session, &client).await;
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let (a, b) = duplex(64 * 1024);
        let (s, c) = tokio::join!(session.accept_control(a), client.connect(b));
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        // Upload-style: the client writes, the server reads; the client
        // never reads its side.
        c.write_all(b"payload").await.unwrap();
        c.flush().await.unwrap();
        let mut got = [0u8; 7];
        s.read_exact(&mut got).await.unwrap();
        kinds.push(Handshake::of(c.get_ref().1));
        let described = super::describe(c.get_ref().1);
        assert!(described.starts_with("TLSv1.3 TLS13_"), "{described}");
    }
    // The control handshake's two tickets cover two data connections.
    assert_eq!(
        kinds,
        [Handshake::Resumed, Handshake::Resumed, Handshake::Full]
    );
}
