//! Line smuggling, in process: the real gateway on loopback between a raw
//! client and a raw server. The server frames on LF alone, as vsftpd does,
//! and keeps every byte it received. Whatever a peer hides behind an IAC,
//! a bare CR or a NUL, the other peer only ever sees the lines the gateway
//! checked.

mod common;

use common::{bounded, Gw, Harness, Upstream};

use ftpgate::pinhole::Usage;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// A gateway in reverse mode in front of a raw server, with DELE denied
/// and `rule` as extra lines of the rule.
async fn gateway_with(rule: &str) -> (Gw, TcpListener) {
    let mut gw = Harness::new(Upstream::Scripted)
        .file("smuggle.yaml")
        .rule("    deny_commands: [DELE]\n")
        .rule(rule)
        .start()
        .await;
    let upstream = gw.take_upstream();
    (gw, upstream)
}

/// The same, with the default rule.
async fn gateway() -> (Gw, TcpListener) {
    gateway_with("").await
}

/// One end of a control connection that frames on LF alone and keeps
/// every byte it read.
struct Peer {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    /// Everything read so far, as received.
    seen: Vec<u8>,
}

impl Peer {
    fn new(s: TcpStream) -> Self {
        let (r, w) = s.into_split();
        Peer {
            r: BufReader::new(r),
            w,
            seen: Vec::new(),
        }
    }

    async fn send(&mut self, b: &[u8]) {
        self.w.write_all(b).await.unwrap();
    }

    /// The next line up to and including its LF, as received.
    async fn line(&mut self) -> Vec<u8> {
        let mut buf = Vec::new();
        let n = bounded("line", self.r.read_until(b'\n', &mut buf))
            .await
            .unwrap();
        assert!(n > 0, "end of stream; read so far: {:?}", self.seen);
        self.seen.extend_from_slice(&buf);
        buf
    }

    /// The reply code of the next line.
    async fn code(&mut self) -> u16 {
        let line = self.line().await;
        let code = line.get(..3).and_then(|c| std::str::from_utf8(c).ok());
        code.and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not a reply: {line:?}"))
    }
}

/// The client connects, the raw server accepts and greets.
async fn pair(gw: &Gw, upstream: &TcpListener) -> (Peer, Peer) {
    let mut c = Peer::new(TcpStream::connect(gw.addr).await.unwrap());
    let (s, _) = bounded("upstream accept", upstream.accept()).await.unwrap();
    let mut s = Peer::new(s);
    s.send(b"220 raw\r\n").await;
    assert_eq!(c.line().await, b"220 raw\r\n");
    (c, s)
}

/// The client sends `NOOP`; the server must read it as the very next line
/// (so nothing else reached it before), and answers 200.
async fn sync(c: &mut Peer, s: &mut Peer) {
    c.send(b"NOOP\r\n").await;
    assert_eq!(s.line().await, b"NOOP\r\n", "server read: {:?}", s.seen);
    s.send(b"200 ok\r\n").await;
    assert_eq!(c.line().await, b"200 ok\r\n");
}

#[tokio::test(flavor = "current_thread")]
async fn dele_behind_an_iac_never_reaches_the_server() {
    let (gw, up) = gateway().await;
    let (mut c, mut s) = pair(&gw, &up).await;
    // An LF right after IAC (or IAC DO) ends the line for vsftpd: a DELE
    // hidden there is a second command to it, and so it is to the gateway.
    for (smuggle, codes) in [
        (&b"NOOP\xff\nDELE x\r\n"[..], &[500, 502][..]),
        (b"NOOP\xff\xfd\nDELE x\r\n", &[500, 502]),
        (b"NOOP\xff\ndele x\n", &[500, 502]),
        // A bare CR or a NUL inside a line: refused whole.
        (b"NOOP\rDELE x\r\n", &[500]),
        (b"NOOP\x00DELE x\r\n", &[500]),
    ] {
        c.send(smuggle).await;
        for &want in codes {
            assert_eq!(c.code().await, want, "{smuggle:?}: {:?}", c.seen);
        }
    }
    sync(&mut c, &mut s).await;
    // Everything the server ever received is the one NOOP: under LF
    // framing, no DELE.
    assert_eq!(s.seen, b"NOOP\r\n");
    let log = gw
        .logs
        .wait_for("Telnet sequence cut by the line end")
        .await;
    assert!(log.contains("CR inside the line"), "{log}");
    assert!(log.contains("NUL inside the line"), "{log}");
    assert_eq!(
        log.matches("DELE not allowed by gateway policy").count(),
        3,
        "{log}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn port_behind_an_iac_passes_no_bounce_check() {
    let (gw, up) = gateway().await;
    let (mut c, mut s) = pair(&gw, &up).await;
    // A third-party PORT hidden behind an IAC: checked as its own line,
    // refused as a bounce; nothing is opened and the server sees nothing.
    c.send(b"NOOP\xff\nPORT 127,0,0,9,200,1\r\n").await;
    assert_eq!(c.code().await, 500, "{:?}", c.seen);
    assert_eq!(c.code().await, 501, "{:?}", c.seen);
    c.send(b"NOOP\xff\xfb\nEPRT |1|127.0.0.9|51201|\r\n").await;
    assert_eq!(c.code().await, 500, "{:?}", c.seen);
    assert_eq!(c.code().await, 501, "{:?}", c.seen);
    sync(&mut c, &mut s).await;
    assert_eq!(s.seen, b"NOOP\r\n");
    assert_eq!(gw.usage(), Usage::default());
    let log = gw.logs.wait_for("(FTP bounce)").await;
    assert!(log.contains("Telnet sequence cut by the line end"), "{log}");
}

#[tokio::test(flavor = "current_thread")]
async fn commands_reach_the_server_re_serialised() {
    let (gw, up) = gateway().await;
    let (mut c, mut s) = pair(&gw, &up).await;
    // What the server reads is the checked line in canonical form: bare
    // LF becomes CRLF, other Telnet sequences are gone, IAC IAC and the
    // IP/DM in front of ABOR stay.
    for (sent, received) in [
        (&b"SYST\n"[..], &b"SYST\r\n"[..]),
        (b"NO\xff\xf1OP\r\n", b"NOOP\r\n"),
        (b"MKD a\xff\xffb\r\n", b"MKD a\xff\xffb\r\n"),
        (b"\xff\xf4\xff\xf2ABOR\r\n", b"\xff\xf4\xff\xf2ABOR\r\n"),
    ] {
        c.send(sent).await;
        assert_eq!(s.line().await, received, "{sent:?}");
        s.send(b"200 ok\r\n").await;
        assert_eq!(c.code().await, 200);
    }
    assert!(
        gw.logs.text().matches("refused").count() == 0,
        "{}",
        gw.logs.text()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn reply_behind_an_iac_is_no_reply_of_its_own() {
    let (gw, up) = gateway().await;
    let (mut c, mut s) = pair(&gw, &up).await;
    let forged = "227 Entering Passive Mode (127,0,0,9,200,1)";
    // Single line: the 227 after IAC LF is a line of its own to the
    // gateway too; nobody asked for it, so it is dropped.
    c.send(b"NOOP\r\n").await;
    assert_eq!(s.line().await, b"NOOP\r\n");
    s.send(&[b"200 ok\xff\n", forged.as_bytes(), b"\r\n"].concat())
        .await;
    assert_eq!(c.line().await, b"200 ok\r\n");
    gw.logs.wait_for("no PASV/EPSV asked for").await;
    // Multi-line: the 227 inside a 200- reply is padded (RFC 959 §4.2),
    // so no client reads it as a reply.
    c.send(b"NOOP\r\n").await;
    assert_eq!(s.line().await, b"NOOP\r\n");
    s.send(&[b"200-a\xff\n", forged.as_bytes(), b"\r\n200 end\r\n"].concat())
        .await;
    assert_eq!(c.line().await, b"200-a\r\n");
    assert_eq!(c.line().await, format!(" {forged}\r\n").as_bytes());
    assert_eq!(c.line().await, b"200 end\r\n");
    // A bare CR (or NUL) inside a reply line becomes a space: one line.
    c.send(b"NOOP\r\n").await;
    assert_eq!(s.line().await, b"NOOP\r\n");
    s.send(format!("200 a\r{forged}\0\r\n").as_bytes()).await;
    assert_eq!(c.line().await, format!("200 a {forged} \r\n").as_bytes());
    // Nothing else reached the client in between: the next line it reads
    // answers its next command.
    c.send(b"SYST\r\n").await;
    assert_eq!(s.line().await, b"SYST\r\n");
    s.send(b"215 UNIX\r\n").await;
    assert_eq!(c.line().await, b"215 UNIX\r\n");
    let lines: Vec<&[u8]> = c.seen.split(|&b| b == b'\n').collect();
    assert!(!lines.iter().any(|l| l.starts_with(b"227")), "{:?}", c.seen);
}

#[tokio::test(flavor = "current_thread")]
async fn passive_reply_to_auth_loses_its_address() {
    let (gw, up) = gateway_with("    tls: passthrough\n").await;
    let (mut c, mut s) = pair(&gw, &up).await;
    // Under passthrough AUTH is forwarded; a 227 answering it names a
    // third party, and no PASV asked for it.
    c.send(b"AUTH TLS\r\n").await;
    assert_eq!(s.line().await, b"AUTH TLS\r\n");
    s.send(b"227 Entering Passive Mode (127,0,0,9,200,1)\r\n")
        .await;
    let line = c.line().await;
    assert!(line.starts_with(b"227 Reply withheld"), "{line:?}");
    gw.logs.wait_for("address withheld").await;
}
