//! Every wait of a session is bounded, in process: a control peer that
//! never reads, a TLS passthrough session that goes quiet, and a data
//! transfer that stalls all end after `idle_timeout`; a transfer that keeps
//! moving bytes, and a passthrough session that keeps trading them, do not.
//! The gateway runs with a one-second `idle_timeout`. The server is played
//! by the test over a real socket, so that it can send exactly when and how
//! much the case needs.

mod common;

use common::{bounded, digest, port_of_227, Gw, Harness, Peer, Upstream, LIMIT};

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The gateway's `idle_timeout` in every test here.
const IDLE: Duration = Duration::from_secs(1);
/// Room for scheduling and buffers filling, on top of `IDLE`, when a case
/// must end "after about idle_timeout".
const SLACK: Duration = Duration::from_secs(4);
// ---- the gateway and a scripted server ------------------------------------

/// A gateway with `idle_timeout: 1s` in front of a listener the test plays
/// the server on; `rule` is extra lines of the one rule.
async fn start(rule: &str) -> Gw {
    Harness::new(Upstream::Scripted)
        .file("waits.yaml")
        .limits("  idle_timeout: 1s\n")
        .rule(rule)
        .start()
        .await
}

/// Client connects (through `sock`, or a default socket); the script
/// accepts and greets. Returns (client, server).
async fn pair_from(gw: &Gw, sock: TcpSocket) -> (Peer, Peer) {
    let c = bounded("connect", sock.connect(gw.addr)).await.unwrap();
    let mut c = Peer::new(c);
    let (s, _) = bounded("upstream accept", gw.upstream().accept())
        .await
        .unwrap();
    let mut s = Peer::new(s);
    s.send(b"220 scripted\r\n").await;
    assert_eq!(c.reply().await.0, 220);
    (c, s)
}

async fn pair(gw: &Gw) -> (Peer, Peer) {
    pair_from(gw, TcpSocket::new_v4().unwrap()).await
}

/// Waits for the session's end line and returns it.
async fn end_line(gw: &Gw) -> String {
    let log = gw.logs.wait_for("session end").await;
    log.lines()
        .find(|l| l.contains("session end"))
        .unwrap()
        .to_string()
}

/// The client asks for PASV; the script answers with a data listener of its
/// own. Returns (the gateway's data port, the script's data listener).
async fn pasv(c: &mut Peer, s: &mut Peer) -> (u16, TcpListener) {
    c.send(b"PASV\r\n").await;
    assert_eq!(s.line().await, "PASV");
    let data = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p = data.local_addr().unwrap().port();
    s.send(
        format!(
            "227 Entering Passive Mode (127,0,0,1,{},{})\r\n",
            p >> 8,
            p & 255
        )
        .as_bytes(),
    )
    .await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 227, "{text}");
    (port_of_227(&text), data)
}

/// Sockets of this process that belong to one session's gateway side:
/// local port `gw` (the listener and the client connections), a listener on
/// `listen` (a pinhole), or remote port `up` (the server connections). As
/// `ss -tlnp` would show them; the table lists the whole namespace, so
/// sockets are matched to this process's descriptors by inode.
fn sockets(gw: u16, listen: u16, up: u16) -> usize {
    let ours: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
    let port = |field: &str| u16::from_str_radix(field.rsplit(':').next().unwrap(), 16).unwrap();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote, listening) = (port(f[1]), port(f[2]), f[3] == "0A");
            ours.contains(f[9]) && (local == gw || (listening && local == listen) || remote == up)
        })
        .count()
}

// ---- a control peer that never reads ---------------------------------------

/// The server floods the client with one endless multi-line reply while the
/// client reads nothing. The gateway's write to the client cannot finish;
/// after idle_timeout the session ends, says why, and releases its pinhole
/// and its sockets.
#[tokio::test(flavor = "current_thread")]
async fn client_that_never_reads_is_cut_off() {
    let gw = start("").await;
    let gw_port = gw.addr.port();
    let up_port = gw.upstream_addr.port();
    // A small receive window, so the flood backs up into the gateway early.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    // The gateway's listening socket.
    let before = sockets(gw_port, 0, up_port);
    let (mut c, mut s) = pair_from(&gw, sock).await;
    let (data_port, data) = pasv(&mut c, &mut s).await;
    assert_eq!(gw.usage().plans, 1, "a pinhole is held");
    // Client side, server side, pinhole.
    assert_eq!(sockets(gw_port, data_port, up_port), before + 3);

    c.send(b"HELP\r\n").await;
    assert_eq!(s.line().await, "HELP");
    let asked = Instant::now();
    let Peer {
        r: mut sr,
        w: mut sw,
    } = s;
    // At most 256 MiB: the flood ends by itself if the gateway never stops it.
    let flood = tokio::spawn(async move {
        let line = format!("214-{}\r\n", "x".repeat(1000));
        let mut sent = 0usize;
        while sent < 256 << 20 {
            if sw.write_all(line.as_bytes()).await.is_err() {
                return sent;
            }
            sent += line.len();
        }
        sent
    });
    let end = end_line(&gw).await;
    let took = asked.elapsed();
    println!("client that never reads: session ended {took:?} after the flood began");
    assert!(end.contains("write to client timed out"), "{end}");
    assert!(
        took >= IDLE && took < IDLE + SLACK,
        "ended {took:?} after the flood began"
    );
    let sent = bounded("flood stops", flood).await.unwrap();
    assert!(sent < 256 << 20, "the gateway kept reading the flood");
    // The server side sees the close.
    let mut rest = Vec::new();
    let _ = bounded("server side closed", sr.read_to_end(&mut rest)).await;
    gw.wait_idle().await;
    drop((c, data));
    let limit = Instant::now() + LIMIT;
    while sockets(gw_port, data_port, up_port) != before {
        assert!(Instant::now() < limit, "gateway sockets still open");
        // Polls the kernel's socket table; closes happen in other tasks.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The same for the server: the client floods, the server reads nothing.
/// The client is pushed back and the session ends within idle_timeout.
#[tokio::test(flavor = "current_thread")]
async fn server_that_never_reads_is_cut_off() {
    let gw = start("").await;
    let (c, _s) = pair(&gw).await;
    let Peer {
        r: mut cr,
        w: mut cw,
    } = c;
    let began = Instant::now();
    let flood = tokio::spawn(async move {
        let mut sent = 0usize;
        while sent < 256 << 20 {
            if cw.write_all(b"NOOP\r\n").await.is_err() {
                return sent;
            }
            sent += 6;
        }
        sent
    });
    let end = end_line(&gw).await;
    let took = began.elapsed();
    // Either wait bounds it: the write toward the server times out, or the
    // bound on pending commands stops reading the client first and the
    // session, with no complete exchange, reaches its idle timeout.
    assert!(
        end.contains("write to server timed out") || end.contains("reason=idle timeout"),
        "{}",
        gw.logs.text()
    );
    assert!(took < IDLE + SLACK, "ended {took:?} after the flood began");
    let sent = bounded("flood stops", flood).await.unwrap();
    assert!(sent < 256 << 20, "the gateway kept reading the flood");
    let _ = bounded("client side closed", cr.read_to_end(&mut Vec::new())).await;
    gw.wait_idle().await;
}

// ---- TLS passthrough ------------------------------------------------------

/// AUTH TLS under passthrough, answered 234 by the script.
async fn passthrough(gw: &Gw) -> (Peer, Peer) {
    let (mut c, mut s) = pair(gw).await;
    c.send(b"AUTH TLS\r\n").await;
    assert_eq!(s.line().await, "AUTH TLS");
    s.send(b"234 go ahead\r\n").await;
    assert_eq!(c.reply().await.0, 234);
    gw.logs.wait_for("TLS started").await;
    (c, s)
}

#[tokio::test(flavor = "current_thread")]
async fn quiet_passthrough_ends_after_idle_timeout() {
    let gw = start("    tls: passthrough\n").await;
    let (mut c, mut s) = passthrough(&gw).await;
    let quiet = Instant::now();
    c.rest().await;
    let took = quiet.elapsed();
    println!("quiet passthrough: session ended {took:?} after the last byte");
    assert!(
        took >= IDLE && took < IDLE + SLACK,
        "ended {took:?} after the last byte"
    );
    s.rest().await;
    let end = end_line(&gw).await;
    assert!(end.contains("TLS passthrough idle for 1s"), "{end}");
    gw.wait_idle().await;
}

#[tokio::test(flavor = "current_thread")]
async fn passthrough_trading_bytes_outlives_idle_timeout() {
    let gw = start("    tls: passthrough\n").await;
    let (mut c, mut s) = passthrough(&gw).await;
    // Records every 200 ms, for three idle timeouts: first only from the
    // client, then only from the server, so either direction alone counts.
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < 3 * IDLE {
        // Paces the traffic; the reads below are the synchronisation.
        tokio::time::sleep(Duration::from_millis(200)).await;
        n += 1;
        let record = format!("\x17\x03\x03record {n:04}");
        let mut got = vec![0u8; record.len()];
        if started.elapsed() < 3 * IDLE / 2 {
            c.send(record.as_bytes()).await;
            bounded("to server", s.r.read_exact(&mut got))
                .await
                .unwrap();
        } else {
            s.send(record.as_bytes()).await;
            bounded("to client", c.r.read_exact(&mut got))
                .await
                .unwrap();
        }
        assert_eq!(got, record.as_bytes(), "after {:?}", started.elapsed());
    }
    assert!(
        !gw.logs.text().contains("session end"),
        "{}",
        gw.logs.text()
    );
    // Both close: the usual end.
    drop(c.w);
    drop(s.w);
    let end = end_line(&gw).await;
    assert!(end.contains("reason=TLS passthrough ended"), "{end}");
    gw.wait_idle().await;
}

/// In passthrough too a write that cannot finish ends the session, even
/// while the other direction keeps moving.
#[tokio::test(flavor = "current_thread")]
async fn passthrough_client_that_never_reads_is_cut_off() {
    let gw = start("    tls: passthrough\n").await;
    let (c, s) = passthrough(&gw).await;
    let Peer {
        r: mut sr,
        w: mut sw,
    } = s;
    let Peer { r: _cr, w: mut cw } = c;
    let flood = tokio::spawn(async move {
        let chunk = vec![0x17u8; 64 * 1024];
        let mut sent = 0usize;
        while sent < 256 << 20 {
            if sw.write_all(&chunk).await.is_err() {
                return sent;
            }
            sent += chunk.len();
        }
        sent
    });
    // The client keeps sending, so the session is never idle as a whole.
    let trickle = tokio::spawn(async move {
        let mut got = [0u8; 64];
        loop {
            // Paces the client's bytes.
            tokio::time::sleep(Duration::from_millis(100)).await;
            if cw.write_all(b"\x17client").await.is_err() {
                return;
            }
            if sr.read(&mut got).await.unwrap_or(0) == 0 {
                return;
            }
        }
    });
    let end = end_line(&gw).await;
    assert!(end.contains("write to client timed out"), "{end}");
    let sent = bounded("flood stops", flood).await.unwrap();
    assert!(sent < 256 << 20);
    bounded("client stops", trickle).await.unwrap();
    gw.wait_idle().await;
}

// ---- transfers longer than idle_timeout -------------------------------------

/// The script's data connection for a RETR: the client connects to the
/// gateway's port, sends RETR, and the script accepts the gateway's dial.
async fn retr(c: &mut Peer, s: &mut Peer, port: u16, data: &TcpListener) -> (TcpStream, TcpStream) {
    let cd = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    c.send(b"RETR big\r\n").await;
    assert_eq!(s.line().await, "RETR big");
    let (sd, _) = bounded("gateway dials the server", data.accept())
        .await
        .unwrap();
    s.send(b"150 here it comes\r\n").await;
    assert_eq!(c.reply().await.0, 150);
    (cd, sd)
}

/// A download that lasts three idle timeouts, with not a line on the
/// control connection meanwhile: it completes, the digest matches, the
/// client gets 226 and the session goes on.
#[tokio::test(flavor = "current_thread")]
async fn transfer_longer_than_idle_timeout_completes() {
    let gw = start("").await;
    let (mut c, mut s) = pair(&gw).await;
    let (port, data) = pasv(&mut c, &mut s).await;
    let (mut cd, mut sd) = retr(&mut c, &mut s, port, &data).await;
    let file: Vec<u8> = (0..30 * 16 * 1024u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    let started = Instant::now();
    let send = async {
        // 16 KiB every 100 ms: about three seconds, three idle timeouts.
        for chunk in file.chunks(16 * 1024) {
            sd.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sd.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let recv = cd.read_to_end(&mut got);
    let (_, r) = bounded("transfer", async { tokio::join!(send, recv) }).await;
    r.unwrap();
    let took = started.elapsed();
    println!("paced download: lasted {took:?}");
    // The client's close ends the data connection, as a real client's does.
    drop(cd);
    s.send(b"226 done\r\n").await;
    assert_eq!(c.reply().await.0, 226);
    c.send(b"NOOP\r\n").await;
    assert_eq!(s.line().await, "NOOP");
    s.send(b"200 still here\r\n").await;
    assert_eq!(
        c.reply().await.0,
        200,
        "the control connection is still open"
    );
    // After the NOOP: on a busy machine a digest can take longer than
    // idle_timeout.
    assert!(took > 2 * IDLE, "the transfer took only {took:?}");
    assert_eq!(digest(&got), digest(&file), "download arrived intact");
    let log = gw.logs.wait_for("command=RETR").await;
    let line = log.lines().find(|l| l.contains("command=RETR")).unwrap();
    assert!(
        line.contains(&format!("to_client={}", file.len())),
        "{line}"
    );
    assert!(line.contains("result=ok"), "{line}");
    assert!(!log.contains("session end"), "{log}");
}

/// A data connection on which nothing moves is no activity: with the
/// control connection quiet too, the session ends after idle_timeout, and
/// the data connection with it.
#[tokio::test(flavor = "current_thread")]
async fn stalled_transfer_ends_after_idle_timeout() {
    let gw = start("").await;
    let (mut c, mut s) = pair(&gw).await;
    let (port, data) = pasv(&mut c, &mut s).await;
    let (mut cd, _sd) = retr(&mut c, &mut s, port, &data).await;
    let stalled = Instant::now();
    let (code, text) = c.reply().await;
    assert_eq!(code, 421, "{text}");
    let took = stalled.elapsed();
    println!("stalled transfer: 421 {took:?} after the 150");
    assert!(
        took >= IDLE && took < IDLE + SLACK,
        "ended {took:?} after the stall"
    );
    let mut rest = Vec::new();
    let _ = bounded("data connection closed", cd.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());
    let end = end_line(&gw).await;
    assert!(end.contains("reason=idle timeout"), "{end}");
    gw.wait_idle().await;
}

/// A data peer that never reads: the relay's writes stop, nothing moves,
/// and with the control connection quiet too the session ends after
/// idle_timeout, closing the data connection and releasing its ports.
#[tokio::test(flavor = "current_thread")]
async fn data_peer_that_never_reads_is_cut_off() {
    let gw = start("").await;
    let (mut c, mut s) = pair(&gw).await;
    let (port, data) = pasv(&mut c, &mut s).await;
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let cd = sock
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    c.send(b"RETR big\r\n").await;
    assert_eq!(s.line().await, "RETR big");
    let (mut sd, _) = bounded("gateway dials the server", data.accept())
        .await
        .unwrap();
    s.send(b"150 here it comes\r\n").await;
    assert_eq!(c.reply().await.0, 150);
    // At most 256 MiB: the flood ends by itself if the gateway never stops it.
    let flood = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        while sent < 256 << 20 {
            if sd.write_all(&chunk).await.is_err() {
                return sent;
            }
            sent += chunk.len();
        }
        sent
    });
    let (code, text) = c.reply().await;
    assert_eq!(code, 421, "{text}");
    let sent = bounded("flood stops", flood).await.unwrap();
    assert!(sent < 256 << 20, "the relay kept reading the flood");
    let end = end_line(&gw).await;
    assert!(end.contains("reason=idle timeout"), "{end}");
    drop(cd);
    gw.wait_idle().await;
}

/// The same through real implementations: suppaftp uploads to libunftp,
/// paced so that the upload lasts three idle timeouts. The file arrives
/// intact, the client gets 226, and the session answers NOOP afterwards.
#[tokio::test(flavor = "current_thread")]
async fn slow_upload_through_libunftp_completes() {
    use suppaftp::tokio::AsyncFtpStream;
    use suppaftp::types::FileType;

    let run = Harness::new(Upstream::Unftp)
        .file("waits.yaml")
        .limits("  idle_timeout: 1s\n")
        .start()
        .await;
    let logs = &run.logs;
    let file: Vec<u8> = (0..60u32 << 16).map(|i| (i ^ (i >> 13)) as u8).collect();
    let mut ftp = AsyncFtpStream::connect(run.addr).await.unwrap();
    ftp.login("anonymous", "test@").await.unwrap();
    ftp.transfer_type(FileType::Binary).await.unwrap();
    let started = Instant::now();
    let mut up = ftp.put_with_stream("slow.bin").await.unwrap();
    // 64 KiB every 50 ms: about three seconds. libunftp reads at once, so
    // the bytes pass the gateway as they are written.
    for chunk in file.chunks(64 * 1024) {
        bounded("upload chunk", up.write_all(chunk)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bounded("226", up.finish()).await.unwrap();
    let took = started.elapsed();
    println!("paced upload: lasted {took:?}");
    // Before the checks below: on a busy machine the digests alone can take
    // longer than idle_timeout.
    if let Err(e) = bounded("NOOP", ftp.noop()).await {
        panic!("NOOP after the upload: {e}\n{}", logs.text());
    }
    assert!(took > 2 * IDLE, "the upload took only {took:?}");
    let on_disk = std::fs::read(run.root().join("slow.bin")).unwrap();
    assert_eq!(digest(&on_disk), digest(&file), "upload arrived intact");
    let log = logs.wait_for("command=STOR").await;
    let line = log.lines().find(|l| l.contains("command=STOR")).unwrap();
    assert!(
        line.contains(&format!("to_server={}", file.len())),
        "{line}"
    );
    assert!(line.contains("reply=226"), "{line}");
    assert!(!log.contains("session end"), "{log}");
}
