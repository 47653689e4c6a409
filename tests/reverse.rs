//! In-process integration: libunftp behind ftpgate in reverse mode, driven
//! by suppaftp. Every address is on loopback and every port is chosen by
//! the kernel (port 0) or drawn from the gateway's own pools.

mod common;

use common::{digest, retr_all, Gw, Harness, Upstream};

use std::net::SocketAddr;
use std::time::Duration;
use suppaftp::tokio::AsyncFtpStream;
use suppaftp::types::FileType;
use suppaftp::{FtpError, Mode, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Starts libunftp and ftpgate in front of it, both on 127.0.0.1: libunftp
/// dials active-mode connections without binding, so its source address is
/// the one the kernel picks for 127.0.0.1, and the gateway only admits the
/// server's control-peer address on its server-side pinholes.
async fn start(server_mode: &str, extra_data: &str) -> Gw {
    // Each gateway in this process gets pools of its own, so a pinhole that
    // expires in one test cannot be re-bound by another test's pinhole.
    static NEXT_BLOCK: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let block = NEXT_BLOCK.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 20;
    let (c_lo, s_lo) = (20000 + block * 500, 30000 + block * 500);
    Harness::new(Upstream::Unftp)
        .pools(c_lo..=c_lo + 499, s_lo..=s_lo + 499)
        .data(extra_data)
        .rule(&format!(
            "    server_mode: {server_mode}\n    deny_commands: [SITE]\n"
        ))
        .start()
        .await
}

async fn login(env: &Gw, mode: Mode) -> AsyncFtpStream {
    let mut ftp = AsyncFtpStream::connect(env.addr).await.unwrap();
    if mode == Mode::Active {
        ftp = ftp.active_mode(Duration::from_secs(10));
    } else {
        ftp.set_mode(mode);
    }
    ftp.login("anonymous", "test@").await.unwrap();
    ftp.transfer_type(FileType::Binary).await.unwrap();
    ftp
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    // xorshift: incompressible enough, reproducible, no extra crate.
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends a raw command and returns the reply code, whatever it is.
async fn raw(ftp: &mut AsyncFtpStream, cmd: &str) -> (u32, String) {
    let body = match ftp.custom_command(cmd, &[Status::CommandOk]).await {
        Ok(r) => r.body,
        Err(FtpError::UnexpectedResponse(r)) => r.body,
        Err(e) => panic!("{cmd}: {e}"),
    };
    // Read the code from the wire text: suppaftp maps codes it does not
    // know (534) to 0.
    let text = String::from_utf8_lossy(&body).into_owned();
    (
        text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0),
        text,
    )
}

/// Upload, download and LIST through the gateway; digests must match and
/// the transfer log line must carry the byte count.
async fn round_trip(server_mode: &str, mode: Mode) {
    let env = start(server_mode, "").await;
    let mut ftp = login(&env, mode).await;
    let name = format!("up-{server_mode}-{mode:?}.bin");
    let data = payload(1 << 20, 7);
    let sent = ftp.put_file(&name, &mut data.as_slice()).await.unwrap();
    assert_eq!(sent, data.len() as u64);
    let on_disk = std::fs::read(env.root().join(&name)).unwrap();
    assert_eq!(digest(&on_disk), digest(&data), "upload arrived intact");

    let got = retr_all(&mut ftp, &name).await.unwrap();
    assert_eq!(digest(&got), digest(&data), "download arrived intact");

    let list = ftp.list(None).await.unwrap();
    assert!(
        list.iter().any(|l| l.contains(&name)),
        "LIST shows the file: {list:?}"
    );
    ftp.quit().await.unwrap();

    let log = env.logs.wait_for("command=RETR").await;
    let retr = log.lines().find(|l| l.contains("command=RETR")).unwrap();
    assert!(retr.contains("to_client=1048576"), "{retr}");
    assert!(retr.contains("result=ok"), "{retr}");
    let stor = log.lines().find(|l| l.contains("command=STOR")).unwrap();
    assert!(stor.contains("to_server=1048576"), "{stor}");
    env.logs.wait_for("session end").await;
}

#[tokio::test(flavor = "current_thread")]
async fn pasv_same() {
    round_trip("same", Mode::Passive).await;
}
#[tokio::test(flavor = "current_thread")]
async fn epsv_same() {
    round_trip("same", Mode::ExtendedPassive).await;
}
#[tokio::test(flavor = "current_thread")]
async fn port_same() {
    round_trip("same", Mode::Active).await;
}
#[tokio::test(flavor = "current_thread")]
async fn pasv_to_active_server() {
    round_trip("active", Mode::Passive).await;
}
#[tokio::test(flavor = "current_thread")]
async fn epsv_to_active_server() {
    round_trip("active", Mode::ExtendedPassive).await;
}
#[tokio::test(flavor = "current_thread")]
async fn port_to_passive_server() {
    round_trip("passive", Mode::Active).await;
}
#[tokio::test(flavor = "current_thread")]
async fn pasv_to_passive_server() {
    round_trip("passive", Mode::Passive).await;
}
#[tokio::test(flavor = "current_thread")]
async fn epsv_to_passive_server() {
    round_trip("passive", Mode::ExtendedPassive).await;
}
#[tokio::test(flavor = "current_thread")]
async fn port_to_active_server() {
    round_trip("active", Mode::Active).await;
}

#[tokio::test(flavor = "current_thread")]
async fn bounce_and_privileged_ports_are_refused_and_session_goes_on() {
    let env = start("same", "").await;
    let mut ftp = login(&env, Mode::Passive).await;
    let (code, text) = raw(&mut ftp, "PORT 127,0,0,9,200,1").await;
    assert_eq!(code, 501, "{text}");
    let (code, _) = raw(&mut ftp, "EPRT |1|127.0.0.9|51201|").await;
    assert_eq!(code, 501);
    let (code, _) = raw(&mut ftp, "PORT 127,0,0,1,0,22").await;
    assert_eq!(code, 501);
    let (code, _) = raw(&mut ftp, "SITE CHMOD 777 x").await;
    assert_eq!(code, 502);
    let (code, _) = raw(&mut ftp, "AUTH TLS").await;
    assert_eq!(code, 534);
    // Still usable.
    ftp.noop().await.unwrap();
    let list = ftp.list(None).await.unwrap();
    assert!(list.is_empty());
    let log = env.logs.text();
    assert!(log.contains("FTP bounce"), "{log}");
    assert!(log.contains("privileged port 22"), "{log}");
}

/// Asks for a passive pinhole by hand and returns its port.
async fn pasv_port(ftp: &mut AsyncFtpStream) -> u16 {
    let r = ftp
        .custom_command("EPSV", &[Status::ExtendedPassiveMode])
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&r.body).into_owned();
    let inner = body.split("|||").nth(1).unwrap();
    inner
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn pinhole_refuses_the_wrong_peer_then_admits_the_client() {
    let env = start("same", "").await;
    let mut ftp = login(&env, Mode::Passive).await;
    let port = pasv_port(&mut ftp).await;
    // 127.0.0.2 is not the client (127.0.0.1).
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut intruder = sock
        .connect(SocketAddr::new(env.addr.ip(), port))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = intruder.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "the intruder gets nothing");
    env.logs.wait_for("refused: expected 127.0.0.1").await;
    // The right peer still gets the listing through the same pinhole.
    let mut data = TcpStream::connect(SocketAddr::new(env.addr.ip(), port))
        .await
        .unwrap();
    ftp.custom_command("NLST", &[Status::AboutToSend, Status::AlreadyOpen])
        .await
        .unwrap();
    let mut out = Vec::new();
    data.read_to_end(&mut out).await.unwrap();
    ftp.read_response_in(&[Status::ClosingDataConnection, Status::RequestedFileActionOk])
        .await
        .unwrap();
    // A second connection to the used pinhole is refused.
    assert!(TcpStream::connect(SocketAddr::new(env.addr.ip(), port))
        .await
        .is_err());
}

#[tokio::test(flavor = "current_thread")]
async fn unused_pinhole_expires() {
    let env = start("same", "  pinhole_timeout: 1s\n").await;
    let mut ftp = login(&env, Mode::Passive).await;
    let port = pasv_port(&mut ftp).await;
    env.logs.wait_for("pinhole expired").await;
    assert!(
        TcpStream::connect(SocketAddr::new(env.addr.ip(), port))
            .await
            .is_err(),
        "an expired pinhole accepts nothing"
    );
    // The session is still fine.
    ftp.noop().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn overlong_line_gets_500_and_close() {
    let env = start("same", "").await;
    let mut s = TcpStream::connect(env.addr).await.unwrap();
    let mut greet = [0u8; 256];
    let n = s.read(&mut greet).await.unwrap();
    assert!(greet[..n].starts_with(b"220"));
    let big = vec![b'A'; 64 * 1024];
    let _ = s.write_all(&big).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("500 "),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn upstream_down_gets_421() {
    // A port that was just free: bind, learn it, close.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let run = Harness::new(Upstream::At(dead)).start().await;
    let mut s = TcpStream::connect(run.addr).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("421 ") && out.contains("cannot reach server"),
        "{out}"
    );
}
