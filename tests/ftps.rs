//! FTPS through the gateway, in process: libunftp as the FTPS (or plain)
//! server, suppaftp with rustls as the FTPS (or plain) client. Every
//! certificate and key is generated here, at test time, by rcgen.

mod common;

use common::{bounded, digest, start_unftp, Binary, Harness, Upstream};

use libunftp::options::{ActivePassiveMode, FtpsRequired};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use suppaftp::tokio::{AsyncFtpStream, AsyncRustlsConnector, AsyncRustlsFtpStream};
use suppaftp::FtpError;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use unftp_sbe_fs::Filesystem;

/// The test's certificates: two CAs, the gateway's leaf (localhost and
/// 127.0.0.1) and the server's (127.0.0.1), both signed by `ca`.
struct Pki {
    dir: tempfile::TempDir,
    ca: rustls::pki_types::CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (issuer, ca_pem) = ca("ftps test CA");
        let (_, other_pem) = ca("some other CA");
        std::fs::write(dir.path().join("ca.pem"), &ca_pem.1).unwrap();
        std::fs::write(dir.path().join("other-ca.pem"), other_pem.1).unwrap();
        for (name, sans) in [
            ("gw", vec!["localhost".to_string(), "127.0.0.1".to_string()]),
            ("srv", vec!["127.0.0.1".to_string()]),
        ] {
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            let chain = format!("{}{}", cert.pem(), ca_pem.1);
            std::fs::write(dir.path().join(format!("{name}.pem")), chain).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Pki {
            dir,
            ca: ca_pem.0,
            issuer,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The listener's `tls:` lines (four-space indent).
    fn listener_tls(&self, implicit: bool) -> String {
        format!(
            "    tls:\n      cert: {}\n      key: {}\n      implicit: {implicit}\n",
            self.path("gw.pem").display(),
            self.path("gw.key").display()
        )
    }
}

type CaPem = (rustls::pki_types::CertificateDer<'static>, String);

fn ca(cn: &str) -> (Issuer<'static, KeyPair>, CaPem) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let pem = (cert.der().clone(), cert.pem());
    (Issuer::new(params, key), pem)
}

/// libunftp serving `root` with FTPS (`pki`'s server pair); with
/// `required`, on both the control and the data connections.
async fn start_ftps_unftp(root: &Path, pki: &Pki, required: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let root = root.to_path_buf();
    let (cert, key) = (pki.path("srv.pem"), pki.path("srv.key"));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let root = root.clone();
            let server = libunftp::ServerBuilder::new(Box::new(move || {
                Filesystem::new(root.clone()).unwrap()
            }))
            .active_passive_mode(ActivePassiveMode::ActiveAndPassive)
            .ftps(cert.clone(), key.clone())
            .ftps_required(FtpsRequired::from(required), FtpsRequired::from(required))
            .build()
            .unwrap();
            tokio::spawn(server.service(stream));
        }
    });
    addr
}

/// 1 MiB that is not all one byte.
fn payload() -> Vec<u8> {
    (0..1024 * 1024u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect()
}

/// Uploads `name`, checks what reached the server's disk, lists it, and
/// downloads it again: digests compared both ways.
macro_rules! round_trip {
    ($ftp:expr, $root:expr, $name:expr) => {{
        let data = payload();
        bounded(
            "TYPE I",
            $ftp.transfer_type(suppaftp::types::FileType::Binary),
        )
        .await
        .unwrap();
        let sent = bounded(
            "upload",
            $ftp.put_file($name, &mut std::io::Cursor::new(data.clone())),
        )
        .await
        .unwrap();
        assert_eq!(sent, data.len() as u64);
        let on_disk = std::fs::read($root.join($name)).unwrap();
        assert_eq!(digest(&on_disk), digest(&data), "upload arrived intact");
        let list = bounded("LIST", $ftp.list(None)).await.unwrap();
        assert!(list.iter().any(|l| l.ends_with($name)), "{list:?}");
        let mut s = bounded("RETR", $ftp.retr_as_stream($name)).await.unwrap();
        let mut back = Vec::new();
        bounded("read", s.read_to_end(&mut back)).await.unwrap();
        bounded("226", s.finish()).await.unwrap();
        assert_eq!(digest(&back), digest(&data), "download arrived intact");
    }};
}

/// The reply code of an error suppaftp got from the gateway, read from
/// the reply's text (suppaftp maps codes it has no name for, such as 521,
/// to 0).
fn code_of(e: &FtpError) -> u32 {
    match e {
        FtpError::UnexpectedResponse(r) => String::from_utf8_lossy(&r.body)
            .get(..3)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[tokio::test]
async fn require_tls_answers_user_before_auth_with_530() {
    let pki = Pki::new();
    let gw = Harness::new(Upstream::Unftp)
        .listener(&pki.listener_tls(false))
        .listener("    upstream_tls:\n      allow_downgrade: true\n")
        .rule("    tls: terminate\n    require_tls: true\n")
        .start()
        .await;
    let mut ftp = bounded("connect", AsyncFtpStream::connect(gw.addr))
        .await
        .unwrap();
    let err = bounded("login", ftp.login("anonymous", "x"))
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), 530, "{err}");
    gw.logs
        .wait_for("TLS required by gateway policy: send AUTH TLS first")
        .await;
}

#[tokio::test]
async fn a_bad_server_certificate_gives_421_and_says_why() {
    let pki = Pki::new();
    let root = tempfile::tempdir().unwrap();
    let server = start_ftps_unftp(root.path(), &pki, false).await;
    // The gateway trusts another CA than the one that signed the server.
    let gw = Harness::new(Upstream::At(server))
        .listener(&explicit_upstream(
            &pki.path("other-ca.pem"),
            "      allow_downgrade: true\n",
        ))
        .rule("    tls: terminate\n")
        .start()
        .await;
    let mut ftp = bounded("connect", AsyncFtpStream::connect(gw.addr))
        .await
        .unwrap();
    let err = bounded("login", ftp.login("anonymous", "x"))
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), 421, "{err}");
    let line = gw.logs.wait_for("server certificate refused").await;
    assert!(line.contains("code=421"), "{line}");
}

#[tokio::test]
async fn a_plain_client_reaches_an_ftps_server_through_the_gateway() {
    let pki = Pki::new();
    let root = tempfile::tempdir().unwrap();
    let server = start_ftps_unftp(root.path(), &pki, false).await;
    let gw = Harness::new(Upstream::At(server))
        .listener(&explicit_upstream(
            &pki.path("ca.pem"),
            "      allow_downgrade: true\n",
        ))
        .rule("    tls: terminate\n")
        .start()
        .await;
    let mut ftp = bounded("connect", AsyncFtpStream::connect(gw.addr))
        .await
        .unwrap();
    bounded("login", ftp.login("anonymous", "x")).await.unwrap();
    round_trip!(ftp, root.path(), "bridged.bin");
    let _ = ftp.quit().await;
    let line = gw.logs.wait_for("TLS downgrade").await;
    assert!(
        line.contains("client leg clear text, server leg TLS"),
        "{line}"
    );
    let start = gw.logs.wait_for("server leg TLS started").await;
    assert!(start.contains("TLSv1."), "{start}");
}

/// A control connection on which the test did AUTH TLS itself, for what
/// suppaftp does not show: the certificate served, and bytes pipelined
/// behind AUTH TLS.
struct TlsControl {
    s: tokio::io::BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
}

impl TlsControl {
    /// Reads the greeting, sends `auth` (AUTH TLS and whatever follows it
    /// in the same write), expects 234 and makes the handshake.
    async fn open(addr: SocketAddr, pki: &Pki, auth: &[u8]) -> TlsControl {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let tcp = bounded("connect", tokio::net::TcpStream::connect(addr))
            .await
            .unwrap();
        let mut r = tokio::io::BufReader::new(tcp);
        let mut line = String::new();
        bounded("220", r.read_line(&mut line)).await.unwrap();
        assert!(line.starts_with("220"), "{line}");
        r.get_mut().write_all(auth).await.unwrap();
        line.clear();
        bounded("234", r.read_line(&mut line)).await.unwrap();
        assert!(line.starts_with("234 "), "{line}");
        assert!(r.buffer().is_empty(), "nothing after the 234 in clear text");
        let config = pki.client_config();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = bounded(
            "handshake",
            tokio_rustls::TlsConnector::from(config).connect(name, r.into_inner()),
        )
        .await
        .unwrap();
        TlsControl {
            s: tokio::io::BufReader::new(tls),
        }
    }

    /// Logs in as anonymous after AUTH TLS and sets PBSZ 0 and `prot`
    /// (`PROT P` or `PROT C`), each reply checked.
    async fn login(&mut self, prot: &str) {
        for (cmd, code) in [
            ("USER anonymous", "331"),
            ("PASS x", "230"),
            ("PBSZ 0", "200"),
            (prot, "200"),
        ] {
            let r = self.cmd(cmd).await;
            assert!(r.starts_with(code), "{cmd}: {r}");
        }
    }

    /// PASV, the data connection made, then LIST and its 150: the data
    /// connection, for the caller to read (and handshake on under PROT P).
    async fn list_on_pasv(&mut self) -> tokio::net::TcpStream {
        let port = common::port_of_227(&self.cmd("PASV").await);
        let data = bounded(
            "data connect",
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        .unwrap();
        self.send("LIST").await;
        let r = self.reply().await;
        assert!(r.starts_with("150"), "{r}");
        data
    }

    /// The leaf certificate the gateway served.
    fn leaf(&self) -> Vec<u8> {
        self.s.get_ref().get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    /// Sends `c`; the last line of its reply.
    async fn cmd(&mut self, c: &str) -> String {
        self.send(c).await;
        self.reply().await
    }

    /// Sends `c` and CRLF.
    async fn send(&mut self, c: &str) {
        use tokio::io::AsyncWriteExt;
        let w = self.s.get_mut();
        w.write_all(format!("{c}\r\n").as_bytes()).await.unwrap();
        w.flush().await.unwrap();
    }

    /// The last line of the next reply.
    async fn reply(&mut self) -> String {
        use tokio::io::AsyncBufReadExt;
        loop {
            let mut line = String::new();
            let n = bounded("reply", self.s.read_line(&mut line)).await.unwrap();
            assert!(n > 0, "control connection closed");
            if line.as_bytes().get(3) == Some(&b' ') {
                return line.trim_end().to_string();
            }
        }
    }
}

impl Pki {
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// suppaftp's rustls client trusting the test CA. Its data connections
    /// share the control connection's config, so they resume its session.
    fn connector(&self) -> AsyncRustlsConnector {
        AsyncRustlsConnector::from(tokio_rustls::TlsConnector::from(self.client_config()))
    }

    /// Writes a new gateway pair named `cn` over gw.pem/gw.key; its
    /// leaf's DER.
    fn renew_gateway(&self, cn: &str) -> Vec<u8> {
        let issuer = &self.issuer;
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, issuer).unwrap();
        std::fs::write(self.path("gw.pem"), cert.pem()).unwrap();
        std::fs::write(self.path("gw.key"), key.serialize_pem()).unwrap();
        cert.der().to_vec()
    }
}

/// A gateway terminating TLS toward the client in front of a plain
/// libunftp (the downgrade allowed).
async fn offload(pki: &Pki) -> common::Gw {
    Harness::new(Upstream::Unftp)
        .listener(&pki.listener_tls(false))
        .listener("    upstream_tls:\n      allow_downgrade: true\n")
        .rule("    tls: terminate\n")
        .start()
        .await
}

#[tokio::test]
async fn clear_text_pipelined_behind_auth_tls_is_never_run() {
    let pki = Pki::new();
    let gw = offload(&pki).await;
    // MKD sent in clear text right behind AUTH TLS, in the same segment.
    let mut c = TlsControl::open(gw.addr, &pki, b"AUTH TLS\r\nMKD injected\r\n").await;
    assert!(c.cmd("USER anonymous").await.starts_with("331"));
    assert!(c.cmd("PASS x").await.starts_with("230"));
    assert!(c.cmd("MKD real").await.starts_with("257"));
    assert!(gw.root().join("real").is_dir());
    assert!(!gw.root().join("injected").exists(), "the injected MKD ran");
    let line = gw.logs.wait_for("discarded").await;
    assert!(line.contains("bytes=14"), "{line}");
    // Client leg TLS, server leg clear: logged as a downgrade.
    gw.logs.wait_for("TLS downgrade").await;
}

#[tokio::test]
async fn sighup_reload_serves_a_new_certificate_and_keeps_sessions() {
    let pki = Pki::new();
    let gw = offload(&pki).await;
    let mut before = TlsControl::open(gw.addr, &pki, b"AUTH TLS\r\n").await;
    let old = before.leaf();

    let new = pki.renew_gateway("gw-renewed");
    let results = gw.gateway.tls.reload();
    assert_eq!(results.len(), 1);
    assert!(
        results[0]
            .1
            .as_ref()
            .is_ok_and(|s| s.contains("gw-renewed")),
        "{results:?}"
    );
    // A new session gets the new leaf.
    let after = TlsControl::open(gw.addr, &pki, b"AUTH TLS\r\n").await;
    assert_eq!(after.leaf(), new);
    assert_ne!(new, old);
    // The session made before the reload goes on.
    assert!(before.cmd("NOOP").await.starts_with("200"), "old session");

    // A key that does not match: refused, and the renewed pair stays.
    let stray = KeyPair::generate().unwrap();
    std::fs::write(pki.path("gw.key"), stray.serialize_pem()).unwrap();
    let results = gw.gateway.tls.reload();
    let err = results[0].1.as_ref().unwrap_err();
    assert!(err.contains("does not match"), "{err}");
    let again = TlsControl::open(gw.addr, &pki, b"AUTH TLS\r\n").await;
    assert_eq!(again.leaf(), new);
}

#[tokio::test]
async fn an_implicit_listener_speaks_tls_from_the_first_byte() {
    let pki = Pki::new();
    let gw = Harness::new(Upstream::Unftp)
        .listener(&pki.listener_tls(true))
        .listener("    upstream_tls:\n      allow_downgrade: true\n")
        .rule("    tls: terminate\n")
        .start()
        .await;
    let mut ftp = bounded(
        "implicit connect",
        AsyncRustlsFtpStream::connect_secure_implicit(gw.addr, pki.connector(), "localhost"),
    )
    .await
    .unwrap();
    bounded("login", ftp.login("anonymous", "x")).await.unwrap();
    bounded("MKD", ftp.mkdir("over-tls")).await.unwrap();
    assert!(gw.root().join("over-tls").is_dir());
    // suppaftp's implicit mode sends no PBSZ/PROT but speaks TLS on its
    // data connections: ask for PROT P as curl and lftp do.
    for cmd in ["PBSZ 0", "PROT P"] {
        bounded(cmd, ftp.custom_command(cmd, &[suppaftp::Status::CommandOk]))
            .await
            .unwrap();
    }
    let root = gw.root().to_path_buf();
    round_trip!(ftp, root, "implicit.bin");
    let _ = ftp.quit().await;
    let start = gw.logs.wait_for("session start").await;
    assert!(start.contains("tls_client=\"TLSv1.3"), "{start}");
}

/// A listener's `upstream_tls`: explicit FTPS to the server, trusting
/// `ca`, then `more` (its further lines).
fn explicit_upstream(ca: &Path, more: &str) -> String {
    format!(
        "    upstream_tls:\n      mode: explicit\n      ca: {}\n{more}",
        ca.display()
    )
}

/// An audited gateway in front of `server` with TLS on both control
/// legs (explicit FTPS from the client, to the server trusting the test
/// CA) and `rule`'s TLS policy.
async fn ftps_both_legs(pki: &Pki, server: SocketAddr, rule: &str) -> common::Gw {
    Harness::new(Upstream::At(server))
        .listener(&pki.listener_tls(false))
        .listener(&explicit_upstream(&pki.path("ca.pem"), ""))
        .rule(rule)
        .audit()
        .start()
        .await
}

/// suppaftp's explicit FTPS through the gateway: AUTH TLS, PBSZ 0,
/// PROT P, then the login.
async fn ftps_client(gw: &common::Gw, pki: &Pki) -> AsyncRustlsFtpStream {
    ftps_client_at(gw.addr, pki).await
}

/// As `ftps_client`, to a gateway at `addr`.
async fn ftps_client_at(addr: SocketAddr, pki: &Pki) -> AsyncRustlsFtpStream {
    let ftp = bounded("connect", AsyncRustlsFtpStream::connect(addr))
        .await
        .unwrap();
    let mut ftp = bounded("AUTH TLS", ftp.into_secure(pki.connector(), "localhost"))
        .await
        .unwrap();
    bounded("login", ftp.login("anonymous", "x")).await.unwrap();
    ftp
}

#[tokio::test]
async fn explicit_ftps_on_both_legs_in_every_data_mode() {
    let pki = Pki::new();
    let root = tempfile::tempdir().unwrap();
    // The server requires TLS on control and data connections alike.
    let server = start_ftps_unftp(root.path(), &pki, true).await;
    let gw = ftps_both_legs(
        &pki,
        server,
        "    tls: terminate\n    require_tls: true\n    require_prot_p: true\n",
    )
    .await;
    let mut ftp = ftps_client(&gw, &pki).await;
    ftp.set_mode(suppaftp::Mode::Passive);
    round_trip!(ftp, root.path(), "pasv.bin");
    ftp.set_mode(suppaftp::Mode::ExtendedPassive);
    round_trip!(ftp, root.path(), "epsv.bin");
    let mut ftp = ftp.active_mode(std::time::Duration::from_secs(10));
    round_trip!(ftp, root.path(), "port.bin");
    let _ = ftp.quit().await;
    // Three uploads, three listings, three downloads; each audit line
    // names both control legs' TLS. suppaftp ends each upload with
    // close_notify; libunftp then closes its side of the data connection
    // with FIN alone, which the relay passes on as it came: nothing of
    // the upload can have been cut.
    let lines = gw.audit_lines(9).await;
    for l in &lines {
        assert_eq!(l["reply"], 226, "{l}");
        assert_eq!(l["result"], "ok", "{l}");
        assert!(
            l["tls_client"].as_str().unwrap().starts_with("TLSv1."),
            "{l}"
        );
        assert!(
            l["tls_server"].as_str().unwrap().starts_with("TLSv1."),
            "{l}"
        );
        // And each leg of the transfer's own data connection.
        for leg in ["data_tls_client", "data_tls_server"] {
            assert!(l[leg].as_str().unwrap().starts_with("TLSv1."), "{leg}: {l}");
        }
    }
    let modes: Vec<&str> = lines.iter().map(|l| l["mode"].as_str().unwrap()).collect();
    assert!(modes.contains(&"active/active"), "{modes:?}");
    let said = "TLS data connection ended without close_notify";
    let log = gw.logs.wait_for_n(said, 3).await;
    let session = format!("session={}", lines[0]["session"]);
    for line in log.lines().filter(|l| l.contains(said)) {
        assert!(
            line.contains(" INFO ") && line.contains(&session) && line.contains("from=\"server\""),
            "{line}"
        );
    }
}

#[tokio::test]
async fn an_ftps_client_reaches_a_plain_server_through_the_gateway() {
    let pki = Pki::new();
    let gw = offload(&pki).await;
    let mut ftp = ftps_client(&gw, &pki).await;
    let root = gw.root().to_path_buf();
    round_trip!(ftp, root, "offloaded.bin");
    let _ = ftp.quit().await;
    let line = gw.logs.wait_for("TLS downgrade").await;
    assert!(
        line.contains("client leg TLS, server leg clear text"),
        "{line}"
    );
}

#[tokio::test]
async fn require_prot_p_refuses_a_transfer_under_prot_c() {
    let pki = Pki::new();
    let gw = Harness::new(Upstream::Unftp)
        .listener(&pki.listener_tls(false))
        .listener("    upstream_tls:\n      allow_downgrade: true\n")
        .rule("    tls: terminate\n    require_prot_p: true\n")
        .start()
        .await;
    let mut ftp = ftps_client(&gw, &pki).await;
    bounded(
        "PROT C",
        ftp.custom_command("PROT C", &[suppaftp::Status::CommandOk]),
    )
    .await
    .unwrap();
    let err = bounded("LIST", ftp.list(None)).await.unwrap_err();
    assert_eq!(code_of(&err), 521, "{err}");
    gw.logs
        .wait_for("Data connection protection required by gateway policy (PROT P)")
        .await;
}

#[tokio::test]
async fn a_data_connection_that_does_not_resume_is_refused_with_522() {
    let pki = Pki::new();
    let gw = offload(&pki).await;
    let mut c = TlsControl::open(gw.addr, &pki, b"AUTH TLS\r\n").await;
    c.login("PROT P").await;
    let data = c.list_on_pasv().await;
    // A client that does not offer its control session for resumption.
    let mut config = (*pki.client_config()).clone();
    config.resumption = rustls::client::Resumption::disabled();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, data);
    if let Ok(mut s) = bounded("data handshake", tls).await {
        let mut buf = Vec::new();
        let got = bounded("data read", s.read_to_end(&mut buf)).await;
        assert!(
            got.is_err() || buf.is_empty(),
            "no listing without resumption"
        );
    }
    assert_eq!(
        c.reply().await,
        "522 SSL connection failed: session reuse required"
    );
    let line = gw.logs.wait_for("command=LIST").await;
    assert!(line.contains("session reuse required"), "{line}");
}

/// The audit line and the session log name the TLS of each leg of each
/// data connection: a listing under PROT P has TLS on both, one under
/// PROT C has none on the client leg while the server leg keeps its own
/// PROT P.
#[tokio::test]
async fn the_audit_line_names_each_data_legs_tls() {
    let pki = Pki::new();
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("listed.txt"), b"x").unwrap();
    let server = start_ftps_unftp(root.path(), &pki, false).await;
    let gw = ftps_both_legs(&pki, server, "    tls: terminate\n").await;

    // PROT P (suppaftp's explicit FTPS).
    let mut ftp = ftps_client(&gw, &pki).await;
    let list = bounded("LIST", ftp.list(None)).await.unwrap();
    assert!(list.iter().any(|l| l.ends_with("listed.txt")), "{list:?}");
    let _ = ftp.quit().await;
    let p = gw.audit_lines(1).await.remove(0);

    // PROT C: the listing comes in clear text on the client leg.
    let mut c = TlsControl::open(gw.addr, &pki, b"AUTH TLS\r\n").await;
    c.login("PROT C").await;
    let mut data = c.list_on_pasv().await;
    let mut listing = Vec::new();
    bounded("listing", data.read_to_end(&mut listing))
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listing).contains("listed.txt"),
        "clear-text listing: {listing:?}"
    );
    // The relay's record waits for both directions' ends, as a client's
    // close gives.
    drop(data);
    assert!(c.reply().await.starts_with("226"));
    let lines = gw.audit_lines(2).await;
    let clear = &lines[1];

    assert_eq!(p["command"], "LIST", "{p}");
    assert_eq!(p["result"], "ok", "{p}");
    for leg in ["data_tls_client", "data_tls_server"] {
        let v = p[leg].as_str().unwrap_or_else(|| panic!("{leg}: {p}"));
        assert!(v.starts_with("TLSv1.") && v.contains("_"), "{leg}: {p}");
    }
    assert_eq!(clear["result"], "ok", "{clear}");
    assert_eq!(clear["data_tls_client"], "none", "{clear}");
    assert!(
        clear["data_tls_server"]
            .as_str()
            .is_some_and(|v| v.starts_with("TLSv1.")),
        "the server leg keeps PROT P: {clear}"
    );
    let log = gw.logs.wait_for_n("command=LIST", 2).await;
    let transfers: Vec<&str> = log.lines().filter(|l| l.contains("command=LIST")).collect();
    assert!(
        transfers[0].contains("data_tls_client=\"TLSv1."),
        "{}",
        transfers[0]
    );
    assert!(
        transfers[1].contains("data_tls_client=\"none\""),
        "{}",
        transfers[1]
    );
}

/// The `ftpgate` binary, as it runs in production, reloads its served
/// certificate on SIGHUP: a session opened before goes on transferring
/// under PROT P (its data connections resume its control session), a new
/// session is served the new certificate, and a broken key is refused
/// with a log line naming the file while the last good pair stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reloads_its_certificate_on_sighup() {
    let pki = Pki::new();
    let root = tempfile::tempdir().unwrap();
    let data = payload();
    std::fs::write(root.path().join("f.bin"), &data).unwrap();
    let upstream = start_unftp(root.path()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gate.yaml");
    let yaml = format!(
        "listeners:\n  - name: t\n    listen: 127.0.0.1:0\n    mode: reverse\n    upstream: {upstream}\n{}\
         \x20   upstream_tls:\n      allow_downgrade: true\n\
         data:\n  client_ports: 20000-29999\n  server_ports: 30000-39999\n\
         rules:\n  - name: r\n    clients: [127.0.0.0/8]\n    tls: terminate\n",
        pki.listener_tls(false)
    );
    std::fs::write(&file, yaml).unwrap();
    let args = ["run", "--grace", "10", "-c"].map(std::ffi::OsStr::new);
    let args = [&args[..], &[file.as_os_str()]].concat();
    let bin = Binary::spawn(&args, "info", common::LIMIT);
    let addr = bin.addr_of("listening").await;
    let hup = || {
        let pid = bin.pid().to_string();
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -HUP {pid}");
    };

    let mut open = ftps_client_at(addr, &pki).await;
    bounded(
        "TYPE I",
        open.transfer_type(suppaftp::types::FileType::Binary),
    )
    .await
    .unwrap();
    let old = TlsControl::open(addr, &pki, b"AUTH TLS\r\n").await.leaf();

    let new = pki.renew_gateway("gw-renewed");
    assert_ne!(new, old);
    hup();
    let log = bin.log.wait_for("TLS certificate reloaded").await;
    let line = log
        .lines()
        .find(|l| l.contains("TLS certificate reloaded"))
        .unwrap();
    assert!(line.contains("gw-renewed"), "{line}");
    // A new session is served the new certificate.
    let after = TlsControl::open(addr, &pki, b"AUTH TLS\r\n").await;
    assert_eq!(after.leaf(), new, "new session after SIGHUP");
    // The session opened before it still transfers, both ways.
    let mut s = bounded("RETR", open.retr_as_stream("f.bin")).await.unwrap();
    let mut back = Vec::new();
    bounded("read", s.read_to_end(&mut back)).await.unwrap();
    bounded("226", s.finish()).await.unwrap();
    assert_eq!(digest(&back), digest(&data), "download after the reload");
    bounded(
        "STOR",
        open.put_file("up.bin", &mut std::io::Cursor::new(data.clone())),
    )
    .await
    .unwrap();
    let on_disk = std::fs::read(root.path().join("up.bin")).unwrap();
    assert_eq!(digest(&on_disk), digest(&data), "upload after the reload");

    // A broken key: refused, logged with its file, and the renewed pair
    // is still served.
    std::fs::write(
        pki.path("gw.key"),
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    hup();
    let log = bin.log.wait_for("TLS certificate not reloaded").await;
    let line = log
        .lines()
        .find(|l| l.contains("TLS certificate not reloaded"))
        .unwrap();
    let key = pki.path("gw.key").display().to_string();
    assert!(line.contains(&key) && line.contains("ERROR"), "{line}");
    let again = TlsControl::open(addr, &pki, b"AUTH TLS\r\n").await;
    assert_eq!(again.leaf(), new, "the last good pair stays");
    assert!(open.noop().await.is_ok(), "the first session is still up");
    let _ = open.quit().await;
}

/// FTPS with the client on IPv6 and the server on IPv4, TLS on both legs:
/// the client talks EPSV over [::1] with the gateway, which talks to
/// libunftp (IPv4 passive only) over 127.0.0.1 (RFC 6384's split). A
/// 1 MiB upload and download (digests) and a listing, each data
/// connection TLS on both legs.
#[tokio::test]
async fn ftps_from_an_ipv6_client_to_an_ipv4_server() {
    let probe = match std::net::TcpListener::bind("[::1]:0") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("skipped: this machine has no IPv6 loopback ([::1]): {e}");
            return;
        }
    };
    drop(probe);
    let pki = Pki::new();
    let root = tempfile::tempdir().unwrap();
    let server = start_ftps_unftp(root.path(), &pki, true).await;
    let (logs, _guard) = common::LogBuf::capture();
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.jsonl");
    let yaml = format!(
        "listeners:\n  - name: v6\n    listen: \"[::1]:0\"\n    mode: reverse\n    upstream: {server}\n{}\
         \x20   upstream_tls:\n      mode: explicit\n      ca: {}\n\
         data:\n  client_ports: 20000-29999\n  server_ports: 30000-39999\n\
         audit:\n  path: {}\n\
         rules:\n  - name: v6\n    clients: [\"::1/128\"]\n    tls: terminate\n    require_prot_p: true\n",
        pki.listener_tls(false),
        pki.path("ca.pem").display(),
        audit.display()
    );
    let run = common::launch(&yaml, "v6.yaml").await;
    assert!(run.addr.is_ipv6(), "{}", run.addr);

    let mut ftp = ftps_client_at(run.addr, &pki).await;
    ftp.set_mode(suppaftp::Mode::ExtendedPassive);
    round_trip!(ftp, root.path(), "v6.bin");
    let _ = ftp.quit().await;

    let limit = tokio::time::Instant::now() + common::LIMIT;
    let lines: Vec<serde_json::Value> = loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        if text.ends_with('\n') && text.lines().count() >= 3 {
            break text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        }
        assert!(tokio::time::Instant::now() < limit, "audit: {text}");
        // Polls a file that the gateway's task appends to.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    for l in &lines {
        assert_eq!(l["result"], "ok", "{l}");
        assert!(l["client"].as_str().unwrap().starts_with("[::1]:"), "{l}");
        assert!(
            l["server"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{l}"
        );
        for leg in ["data_tls_client", "data_tls_server"] {
            assert!(l[leg].as_str().unwrap().starts_with("TLSv1."), "{leg}: {l}");
        }
    }
    let start = logs.wait_for("session start").await;
    assert!(start.contains("tls_client=\"TLSv1."), "{start}");
}

/// A data connection refused for not resuming gets 522 even when the
/// server's final reply comes first: the server here answers 226 as soon
/// as the gateway's data connection reaches it, before the client has
/// even sent its ClientHello, and the gateway holds that reply until the
/// handshakes' result.
#[tokio::test]
async fn the_refusal_reaches_the_client_even_when_the_server_answers_first() {
    let pki = Pki::new();
    let mut gw = Harness::new(Upstream::Scripted)
        .listener(&pki.listener_tls(false))
        .listener("    upstream_tls:\n      allow_downgrade: true\n")
        .rule("    tls: terminate\n")
        .start()
        .await;
    let upstream = gw.take_upstream();
    let serve = async {
        let (s, _) = upstream.accept().await.unwrap();
        // Each reply leaves at once: Nagle would hold the 226 behind the
        // 150's delayed ACK, and the race would not be run.
        s.set_nodelay(true).unwrap();
        let mut s = common::Peer::new(s);
        s.send(b"220 scripted\r\n").await;
        s
    };
    let (mut c, mut s) = bounded("connect", async {
        tokio::join!(TlsControl::open(gw.addr, &pki, b"AUTH TLS\r\n"), serve)
    })
    .await;
    c.send("USER anonymous").await;
    assert_eq!(s.line().await, "USER anonymous");
    s.send(b"230 in\r\n").await;
    assert!(c.reply().await.starts_with("230"));
    assert!(c.cmd("PBSZ 0").await.starts_with("200"));
    assert!(c.cmd("PROT P").await.starts_with("200"));

    let data_server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = data_server.local_addr().unwrap().port();
    c.send("PASV").await;
    assert_eq!(s.line().await, "PASV");
    s.send(
        format!(
            "227 Entering Passive Mode (127,0,0,1,{},{})\r\n",
            port / 256,
            port % 256
        )
        .as_bytes(),
    )
    .await;
    let pasv = c.reply().await;
    let data = bounded(
        "data connect",
        tokio::net::TcpStream::connect(("127.0.0.1", common::port_of_227(&pasv))),
    )
    .await
    .unwrap();
    c.send("LIST").await;
    assert_eq!(s.line().await, "LIST");
    s.send(b"150 here it comes\r\n").await;
    assert!(c.reply().await.starts_with("150"));
    // The gateway's leg reaches the server, which answers at once.
    let (_server_leg, _) = bounded("server leg", data_server.accept()).await.unwrap();
    s.send(b"226 Transfer complete\r\n").await;

    // Only now does the client start its handshake, without resumption.
    let mut config = (*pki.client_config()).clone();
    config.resumption = rustls::client::Resumption::disabled();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, data);
    if let Ok(mut d) = bounded("data handshake", tls).await {
        let mut buf = Vec::new();
        let got = bounded("data read", d.read_to_end(&mut buf)).await;
        assert!(got.is_err() || buf.is_empty(), "no data without resumption");
    }
    assert_eq!(
        c.reply().await,
        "522 SSL connection failed: session reuse required"
    );
    let line = gw.logs.wait_for("command=LIST").await;
    assert!(line.contains("session reuse required"), "{line}");
}
