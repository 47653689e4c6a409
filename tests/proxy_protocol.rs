//! The PROXY protocol on a listener, in process: a test socket bound to a
//! loopback address of its own plays the balancer (127.0.0.5), and the
//! header it sends names the real client. libunftp serves behind the
//! gateway; suppaftp or a raw peer is the client.

mod common;

use common::{bounded, digest, port_of_227, retr_all, Gw, Harness, Peer, Upstream};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use suppaftp::tokio::AsyncFtpStream;
use suppaftp::types::FileType;
use suppaftp::Mode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The balancer's address in every test.
const BALANCER: &str = "127.0.0.5";

/// The v2 signature (§2.2 of the specification), written out here rather
/// than taken from the crate.
const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The gateway in front of libunftp, its listener taking PROXY headers
/// from the balancer; `more` adds lines to the `proxy_protocol` mapping.
fn behind_balancer(more: &str) -> Harness {
    Harness::new(Upstream::Unftp)
        .file("proxy.yaml")
        .listener(&format!(
            "    proxy_protocol:\n      from: [{BALANCER}/32]\n{more}"
        ))
}

/// A connection to the gateway from `ip` (any loopback address).
async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    bounded("connect", s.connect(to)).await.unwrap()
}

/// A connection from the balancer that has sent `header`.
async fn via_balancer(gw: &Gw, header: &[u8]) -> TcpStream {
    let mut s = connect_from(BALANCER, gw.addr).await;
    s.write_all(header).await.unwrap();
    s
}

/// `PROXY TCP4 <client> 127.0.0.1 <port> 21`.
fn v1(client: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 {port} 21\r\n").into_bytes()
}

/// A v2 PROXY header over TCP/IPv4 for `client`, with a NOOP TLV after the
/// addresses (which the gateway skips).
fn v2(client: [u8; 4], port: u16) -> Vec<u8> {
    let mut b = SIG.to_vec();
    b.extend_from_slice(&[0x21, 0x11, 0, 12 + 7]);
    b.extend_from_slice(&client);
    b.extend_from_slice(&[127, 0, 0, 1]);
    b.extend_from_slice(&port.to_be_bytes());
    b.extend_from_slice(&21u16.to_be_bytes());
    b.extend_from_slice(&[0x04, 0, 4, 0, 0, 0, 0]);
    b
}

/// Logs in over `stream` (its header already sent) as a suppaftp client.
async fn ftp_over(stream: TcpStream) -> AsyncFtpStream {
    let mut ftp = bounded("greeting", AsyncFtpStream::connect_with_stream(stream))
        .await
        .unwrap();
    ftp.set_mode(Mode::Passive);
    ftp.login("anonymous", "x@").await.unwrap();
    ftp.transfer_type(FileType::Binary).await.unwrap();
    ftp
}

/// Logs in over `stream` as a raw peer.
async fn logged_in(stream: TcpStream) -> Peer {
    let mut c = Peer::new(stream);
    assert_eq!(c.reply().await.0, 220);
    assert_eq!(c.cmd("USER anonymous").await.0, 331);
    assert_eq!(c.cmd("PASS x@").await.0, 230);
    c
}

/// The first line of `log` that contains `needle`.
fn line_with<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?}:\n{log}"))
}

#[tokio::test(flavor = "current_thread")]
async fn v1_and_v2_headers_name_the_real_client_end_to_end() {
    let gw = behind_balancer("").audit().start().await;
    let body: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(gw.root().join("data.bin"), &body).unwrap();
    for (n, header) in [v1("127.0.0.1", 61001), v2([127, 0, 0, 1], 61002)]
        .into_iter()
        .enumerate()
    {
        let port = 61001 + n;
        let mut ftp = ftp_over(via_balancer(&gw, &header).await).await;
        let list = bounded("NLST", ftp.nlst(None)).await.unwrap();
        assert!(list.iter().any(|l| l.ends_with("data.bin")), "{list:?}");
        let got = bounded("RETR", retr_all(&mut ftp, "data.bin"))
            .await
            .unwrap();
        assert_eq!(digest(&got), digest(&body), "header v{}", n + 1);
        ftp.quit().await.unwrap();
        // The session is the real client's, through the balancer.
        let log = gw.logs.wait_for(&format!("client=127.0.0.1:{port}")).await;
        let start = line_with(&log, &format!("client=127.0.0.1:{port}"));
        assert!(start.contains("session start"), "{start}");
        assert!(start.contains(&format!("via={BALANCER}:")), "{start}");
    }
    // Each transfer's audit line names the real client, not the balancer.
    let lines = gw.audit_lines(4).await;
    let records: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["command"].as_str().unwrap(),
                l["client"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        records,
        [
            ("NLST", "127.0.0.1:61001"),
            ("RETR", "127.0.0.1:61001"),
            ("NLST", "127.0.0.1:61002"),
            ("RETR", "127.0.0.1:61002"),
        ]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn rules_match_the_real_client_not_the_balancer() {
    // The rule admits 127.0.0.2 only: neither the balancer nor 127.0.0.3.
    let gw = behind_balancer("")
        .clients("clients: [127.0.0.2/32]")
        .start()
        .await;
    let mut c = logged_in(via_balancer(&gw, &v1("127.0.0.2", 40001)).await).await;
    assert_eq!(c.cmd("PWD").await.0, 257);
    let log = gw.logs.wait_for("client=127.0.0.2:40001").await;
    assert!(line_with(&log, "session start").contains("rule=loopback"));

    let mut other = Peer::new(via_balancer(&gw, &v2([127, 0, 0, 3], 40002)).await);
    let (code, text) = other.reply().await;
    assert_eq!(code, 421, "{text}");
    assert!(text.contains("no rule allows this session"), "{text}");
    let log = gw.logs.wait_for("client=127.0.0.3:40002").await;
    let refusal = line_with(&log, "client=127.0.0.3:40002");
    assert!(refusal.contains("refused"), "{refusal}");
    // The line names the balancer the refused client came through.
    assert!(refusal.contains(&format!("via={BALANCER}:")), "{refusal}");
}

#[tokio::test(flavor = "current_thread")]
async fn per_client_limits_count_the_real_client() {
    let gw = behind_balancer("")
        .limits("  max_sessions_per_client: 1\n")
        .start()
        .await;
    let _first = logged_in(via_balancer(&gw, &v1("127.0.0.2", 40001)).await).await;
    // Same client through the same balancer: over its limit.
    let mut second = Peer::new(via_balancer(&gw, &v1("127.0.0.2", 40002)).await);
    let (code, text) = second.reply().await;
    assert_eq!(code, 421, "{text}");
    assert!(text.contains("too many sessions from 127.0.0.2"), "{text}");
    let log = gw.logs.wait_for("client=127.0.0.2:40002").await;
    let refusal = line_with(&log, "client=127.0.0.2:40002");
    assert!(refusal.contains("max_sessions_per_client"), "{refusal}");
    assert!(refusal.contains(&format!("via={BALANCER}:")), "{refusal}");
    // Another client through the same balancer is not.
    let mut third = logged_in(via_balancer(&gw, &v1("127.0.0.3", 40003)).await).await;
    assert_eq!(third.cmd("NOOP").await.0, 200);
}

#[tokio::test(flavor = "current_thread")]
async fn bad_headers_from_the_balancer_close_with_a_log_line() {
    let gw = behind_balancer("      timeout: 300ms\n").start().await;
    let mut over_bound = SIG.to_vec();
    over_bound.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        (
            "malformed v1",
            b"PROXY TCP4 127.0.0.999 127.0.0.1 1 21\r\n".to_vec(),
            false,
            "malformed PROXY header: v1 header is not",
        ),
        (
            "malformed v2",
            over_bound,
            false,
            "malformed PROXY header: v2 length above 548 bytes",
        ),
        (
            "missing",
            b"USER anonymous\r\n".to_vec(),
            false,
            "the first bytes are not a PROXY v1 or v2 header",
        ),
        (
            "truncated",
            b"PROXY TCP4 127.0".to_vec(),
            true,
            "truncated PROXY header: closed after 16 bytes",
        ),
        (
            "late",
            b"PROXY TCP4 127.0".to_vec(),
            false,
            "no complete PROXY header within 300ms",
        ),
    ];
    for (what, bytes, half_close, reason) in cases {
        let mut s = via_balancer(&gw, &bytes).await;
        if half_close {
            s.shutdown().await.unwrap();
        }
        // The gateway closes; the client never saw a greeting.
        let mut got = Vec::new();
        let _ = bounded("close", s.read_to_end(&mut got)).await;
        assert!(got.is_empty(), "{what}: {}", String::from_utf8_lossy(&got));
        let log = gw.logs.wait_for(reason).await;
        let line = line_with(&log, reason);
        assert!(line.contains("PROXY header refused"), "{what}: {line}");
        assert!(line.contains("session{id="), "{what}: {line}");
        assert!(line.contains(&format!("via={BALANCER}:")), "{what}: {line}");
    }
    assert!(!gw.logs.text().contains("session start"));
    gw.wait_idle().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_header_from_an_untrusted_peer_is_refused() {
    // Only 127.0.0.9 is a balancer; the tests connect from 127.0.0.1.
    let gw = Harness::new(Upstream::Unftp)
        .listener("    proxy_protocol: { from: [127.0.0.9/32] }\n")
        .start()
        .await;
    let mut v2_split = v2([10, 0, 0, 1], 40000);
    let tail = v2_split.split_off(5);
    for (n, (first, rest)) in [(v1("10.0.0.1", 40000), vec![]), (v2_split, tail)]
        .into_iter()
        .enumerate()
    {
        let mut c = Peer::connect(gw.addr).await;
        assert_eq!(c.reply().await.0, 220);
        c.send(&first).await;
        if !rest.is_empty() {
            // A start of the signature alone decides nothing.
            c.send(&rest).await;
        }
        let (code, text) = c.reply().await;
        assert_eq!(code, 421, "{text}");
        assert!(
            text.contains("PROXY header from untrusted 127.0.0.1"),
            "{text}"
        );
        assert_eq!(c.rest().await, "");
        gw.logs
            .wait_for_n("PROXY header from untrusted 127.0.0.1", 2 * (n + 1))
            .await;
    }
    // A direct client without a header goes on as on any listener, even
    // with its first command split after a byte.
    let mut c = Peer::connect(gw.addr).await;
    assert_eq!(c.reply().await.0, 220);
    c.send(b"U").await;
    c.send(b"SER anonymous\r\n").await;
    assert_eq!(c.reply().await.0, 331);
    assert_eq!(c.cmd("PASS x@").await.0, 230);
    assert_eq!(c.cmd("PWD").await.0, 257);
    assert!(!gw.logs.text().contains("via="));
}

#[tokio::test(flavor = "current_thread")]
async fn data_connections_are_checked_against_the_real_client() {
    let gw = behind_balancer("").start().await;
    std::fs::write(gw.root().join("a.txt"), b"hello\n").unwrap();
    let mut c = logged_in(via_balancer(&gw, &v1("127.0.0.3", 40001)).await).await;
    // PORT naming the TCP peer's address is a third party now.
    let (code, text) = c.cmd("PORT 127,0,0,1,200,1").await;
    assert_eq!(code, 501, "{text}");
    assert!(text.contains("not the client's own 127.0.0.3"), "{text}");
    let (code, text) = c.cmd("PASV").await;
    assert_eq!(code, 227, "{text}");
    let data = SocketAddr::new(gw.addr.ip(), port_of_227(&text));
    // From 127.0.0.1, the address the control connection came from
    // in-process: refused.
    let mut wrong = connect_from("127.0.0.1", data).await;
    let mut buf = [0u8; 16];
    assert_eq!(wrong.read(&mut buf).await.unwrap_or(0), 0);
    gw.logs.wait_for("data connection from 127.0.0.1").await;
    assert!(gw.logs.text().contains("refused: expected 127.0.0.3"));
    // From the real client: the listing arrives.
    let mut right = connect_from("127.0.0.3", data).await;
    let (code, _) = c.cmd("NLST").await;
    assert!(code == 150 || code == 125, "{code}");
    let mut out = Vec::new();
    bounded("listing", right.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out).contains("a.txt"));
    assert_eq!(c.reply().await.0, 226);
}

#[tokio::test(flavor = "current_thread")]
async fn a_health_check_is_the_balancers_own_session() {
    let gw = behind_balancer("").start().await;
    let mut local = SIG.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    for (n, header) in [local, b"PROXY UNKNOWN\r\n".to_vec()]
        .into_iter()
        .enumerate()
    {
        let mut c = Peer::new(via_balancer(&gw, &header).await);
        // The server's greeting, as a `tcp-check expect string 220` wants.
        assert_eq!(c.reply().await.0, 220);
        assert_eq!(c.cmd("QUIT").await.0, 221);
        let log = gw.logs.wait_for_n("session start", n + 1).await;
        let start = log
            .lines()
            .filter(|l| l.contains("session start"))
            .nth(n)
            .unwrap();
        assert!(start.contains(&format!("client={BALANCER}:")), "{start}");
        assert!(start.contains(&format!("via={BALANCER}:")), "{start}");
    }
    // A check that sends its header and closes ends quietly.
    let mut local = SIG.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    drop(via_balancer(&gw, &local).await);
    gw.logs.wait_for_n("session end", 3).await;
    gw.wait_idle().await;
    assert!(!gw.logs.text().contains("PROXY header refused"));
}

/// Bytes the client sent right behind the balancer's header, in the same
/// segment, reach the session: the gateway takes only the header's bytes.
#[tokio::test(flavor = "current_thread")]
async fn bytes_behind_the_header_reach_the_session() {
    let gw = behind_balancer("").start().await;
    let mut both = v1("127.0.0.2", 40001);
    both.extend_from_slice(b"USER anonymous\r\n");
    let mut c = Peer::new(via_balancer(&gw, &both).await);
    assert_eq!(c.reply().await.0, 220);
    assert_eq!(c.reply().await.0, 331, "{}", gw.logs.text());
    assert_eq!(c.cmd("PASS x@").await.0, 230);
    let mut both = v2([127, 0, 0, 3], 40002);
    both.extend_from_slice(b"USER anonymous\r\n");
    let mut c = Peer::new(via_balancer(&gw, &both).await);
    assert_eq!(c.reply().await.0, 220);
    assert_eq!(c.reply().await.0, 331, "{}", gw.logs.text());
}

/// A header may not name an address no client can have: taken as the
/// client, it would pass the PORT/EPRT check for the gateway's own
/// services. Each gets 421 and a log line; no session starts.
#[tokio::test(flavor = "current_thread")]
async fn a_header_naming_no_possible_client_is_refused() {
    let gw = behind_balancer("").start().await;
    for (header, what) in [
        (v1("0.0.0.0", 40001), "an unspecified address"),
        (v1("224.0.0.1", 40002), "a multicast or broadcast address"),
        (
            v1("255.255.255.255", 40003),
            "a multicast or broadcast address",
        ),
        (v2([127, 0, 0, 2], 0), "port 0"),
    ] {
        let mut c = Peer::new(via_balancer(&gw, &header).await);
        let (code, text) = c.reply().await;
        assert_eq!(code, 421, "{what}: {text}");
        gw.logs
            .wait_for(&format!("{what}, which no client can be"))
            .await;
    }
    assert!(
        !gw.logs.text().contains("session start"),
        "{}",
        gw.logs.text()
    );
}

/// Logs in through the balancer as `client` (127.0.0.x) and opens a
/// passive data port: the session and where its data connection goes.
async fn passive_via_balancer(gw: &Gw, client: [u8; 4]) -> (Peer, SocketAddr) {
    let mut c = logged_in(via_balancer(gw, &v2(client, 40001)).await).await;
    assert_eq!(c.cmd("TYPE I").await.0, 200);
    let (code, text) = c.cmd("PASV").await;
    assert_eq!(code, 227, "{text}");
    (c, SocketAddr::new(gw.addr.ip(), port_of_227(&text)))
}

/// A data connection from the balancer that has sent `bytes` (a header,
/// and maybe data behind it).
async fn data_via_balancer(to: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = connect_from(BALANCER, to).await;
    s.write_all(bytes).await.unwrap();
    s
}

/// What a refused data connection reads: nothing, then EOF or a reset.
async fn refused(mut s: TcpStream) {
    let mut got = Vec::new();
    let r = bounded("refusal", s.read_to_end(&mut got)).await;
    assert!(
        got.is_empty(),
        "a refused connection got {} bytes",
        got.len()
    );
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
}

/// A 1 MiB download and an upload, each through a data connection that the
/// balancer relays with a v2 header naming the session's client: the bytes
/// behind the header (the upload's first bytes, in the header's segment)
/// are data and arrive intact.
#[tokio::test(flavor = "current_thread")]
async fn data_connections_through_the_balancer_carry_a_header() {
    let gw = behind_balancer("").start().await;
    let body: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(gw.root().join("big.bin"), &body).unwrap();
    let (mut c, data) = passive_via_balancer(&gw, [127, 0, 0, 3]).await;
    let mut d = data_via_balancer(data, &v2([127, 0, 0, 3], 50001)).await;
    let (code, text) = c.cmd("RETR big.bin").await;
    assert!(code == 150 || code == 125, "{code} {text}");
    let mut got = Vec::new();
    bounded("RETR", d.read_to_end(&mut got)).await.unwrap();
    assert_eq!(c.reply().await.0, 226);
    assert_eq!(got.len(), body.len());
    assert_eq!(digest(&got), digest(&body));

    let (code, text) = c.cmd("PASV").await;
    assert_eq!(code, 227, "{text}");
    let data = SocketAddr::new(gw.addr.ip(), port_of_227(&text));
    let mut first = v2([127, 0, 0, 3], 50002);
    first.extend_from_slice(&body[..1000]);
    let mut d = data_via_balancer(data, &first).await;
    let (code, text) = c.cmd("STOR up.bin").await;
    assert!(code == 150 || code == 125, "{code} {text}");
    d.write_all(&body[1000..]).await.unwrap();
    d.shutdown().await.unwrap();
    drop(d);
    assert_eq!(c.reply().await.0, 226);
    let stored = std::fs::read(gw.root().join("up.bin")).unwrap();
    assert_eq!(digest(&stored), digest(&body));
    assert!(!gw.logs.text().contains("refused"), "{}", gw.logs.text());
}

/// A balancer's data connection whose header names another client is a
/// wrong peer: refused before a byte moves, a knock in the session's log
/// with the balancer and the reason, and the pinhole still waits for the
/// session's own client.
#[tokio::test(flavor = "current_thread")]
async fn a_data_header_naming_another_client_is_refused() {
    let gw = behind_balancer("").start().await;
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(gw.root().join("f.bin"), &body).unwrap();
    let (mut c, data) = passive_via_balancer(&gw, [127, 0, 0, 3]).await;
    let wrong = data_via_balancer(data, &v2([127, 0, 0, 4], 50001)).await;
    refused(wrong).await;
    let log = gw
        .logs
        .wait_for("data connection from 127.0.0.4:50001 refused")
        .await;
    let knock = line_with(&log, "data connection from 127.0.0.4:50001 refused");
    assert!(knock.contains("expected 127.0.0.3"), "{knock}");
    assert!(knock.contains("session{id="), "{knock}");
    let why = line_with(&log, "data connection from a balancer refused");
    assert!(
        why.contains("the PROXY header names 127.0.0.4:50001, not the session's client"),
        "{why}"
    );
    assert!(why.contains(&format!("via={BALANCER}:")), "{why}");
    assert!(why.contains("session="), "{why}");
    // The right client, through the same balancer, still gets the file.
    let mut right = data_via_balancer(data, &v2([127, 0, 0, 3], 50002)).await;
    let (code, text) = c.cmd("RETR f.bin").await;
    assert!(code == 150 || code == 125, "{code} {text}");
    let mut got = Vec::new();
    bounded("RETR", right.read_to_end(&mut got)).await.unwrap();
    assert_eq!(c.reply().await.0, 226);
    assert_eq!(digest(&got), digest(&body));
}

/// A balancer's data connection without a header (other bytes, nothing
/// within the timeout, or a close) is refused; a connection straight from
/// the client is checked as on any listener, and gets the data.
#[tokio::test(flavor = "current_thread")]
async fn a_data_connection_from_the_balancer_without_a_header_is_refused() {
    let gw = behind_balancer("      timeout: 300ms\n").start().await;
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 3 % 247) as u8).collect();
    std::fs::write(gw.root().join("f.bin"), &body).unwrap();
    let (mut c, data) = passive_via_balancer(&gw, [127, 0, 0, 3]).await;
    let cases: [(&[u8], bool, &str); 3] = [
        (
            b"RETR f.bin\r\n",
            false,
            "the first bytes are not a PROXY v1 or v2 header",
        ),
        (b"", false, "no complete PROXY header within 300ms"),
        (b"", true, "closed before sending a PROXY header"),
    ];
    for (n, (bytes, close, reason)) in cases.into_iter().enumerate() {
        let mut s = data_via_balancer(data, bytes).await;
        if close {
            s.shutdown().await.unwrap();
        }
        refused(s).await;
        let log = gw
            .logs
            .wait_for_n("data connection from a balancer refused", n + 1)
            .await;
        let why = line_with(&log, reason);
        assert!(why.contains(&format!("via={BALANCER}:")), "{why}");
        gw.logs
            .wait_for_n(&format!("data connection from {BALANCER}:"), n + 1)
            .await;
    }
    // Straight from the client, no header: checked as now, and let in.
    let mut right = connect_from("127.0.0.3", data).await;
    let (code, text) = c.cmd("RETR f.bin").await;
    assert!(code == 150 || code == 125, "{code} {text}");
    let mut got = Vec::new();
    bounded("RETR", right.read_to_end(&mut got)).await.unwrap();
    assert_eq!(c.reply().await.0, 226);
    assert_eq!(digest(&got), digest(&body));
}

/// Behind a balancer's header, the client's own first bytes may not be a
/// second header: 421, as for a direct client, and nothing reaches the
/// server (which would answer an unknown command otherwise).
#[tokio::test(flavor = "current_thread")]
async fn a_second_header_behind_the_balancers_gets_421() {
    let gw = behind_balancer("").start().await;
    let mut second_v2 = v2([6, 6, 6, 6], 1);
    second_v2.extend_from_slice(b"USER anonymous\r\n");
    for (n, (pipelined, second)) in [
        (false, v1("6.6.6.6", 1)),
        (true, v1("6.6.6.6", 2)),
        (false, second_v2),
    ]
    .into_iter()
    .enumerate()
    {
        let port = 40001 + n as u16;
        let mut first = v1("127.0.0.2", port);
        if pipelined {
            // In the header's own segment.
            first.extend_from_slice(&second);
        }
        let mut c = Peer::new(via_balancer(&gw, &first).await);
        let (mut code, mut text) = c.reply().await;
        if !pipelined {
            assert_eq!(code, 220, "{text}");
            c.send(&second).await;
            (code, text) = c.reply().await;
        } else if code == 220 {
            // The greeting may or may not get ahead of the refusal.
            (code, text) = c.reply().await;
        }
        assert_eq!(code, 421, "{text}");
        assert!(
            text.contains("a second PROXY header, from 127.0.0.2"),
            "{text}"
        );
        assert_eq!(c.rest().await, "");
        let log = gw.logs.wait_for(&format!("client=127.0.0.2:{port}")).await;
        let refusal = log
            .lines()
            .find(|l| l.contains(&format!("client=127.0.0.2:{port}")) && l.contains("refused"))
            .unwrap_or_else(|| panic!("no refusal for {port}:\n{log}"));
        assert!(refusal.contains(&format!("via={BALANCER}:")), "{refusal}");
    }
}

/// At most `MAX_WAITING` (64) connections of a listener wait for their
/// header at once: the next is closed at once with a log line, long before
/// its timeout, and once the others are gone a balancer's session starts.
#[tokio::test(flavor = "current_thread")]
async fn connections_waiting_for_a_header_are_bounded() {
    let gw = behind_balancer("      timeout: 30s\n").start().await;
    let config = gw.gateway.config();
    let waiting = &config.listeners[0].proxy_protocol.as_ref().unwrap().waiting;
    let mut silent = Vec::new();
    for _ in 0..64 {
        silent.push(connect_from(BALANCER, gw.addr).await);
    }
    until("64 connections wait", || waiting.now() == 64).await;
    let mut over = connect_from(BALANCER, gw.addr).await;
    let mut got = Vec::new();
    let _ = bounded("closed at once", over.read_to_end(&mut got)).await;
    assert!(got.is_empty());
    let log = gw.logs.wait_for("PROXY header not awaited").await;
    let line = line_with(&log, "PROXY header not awaited");
    assert!(line.contains("max=64"), "{line}");
    assert!(line.contains(&format!("via={BALANCER}:")), "{line}");
    assert_eq!(waiting.now(), 64, "the refused one never waited");
    drop(silent);
    until("the waits end", || waiting.now() == 0).await;
    let mut c = logged_in(via_balancer(&gw, &v1("127.0.0.2", 40001)).await).await;
    assert_eq!(c.cmd("NOOP").await.0, 200);
}

/// Polls `cond` (a state the test cannot be told about) until it holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    bounded(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// A `from` network that covers everyone loads, with a warning where the
/// file says it: in the log at start, and in what `ftpgate check` prints.
#[tokio::test(flavor = "current_thread")]
async fn a_balancer_network_covering_everyone_is_warned_about() {
    let gw = Harness::new(Upstream::Unftp)
        .file("proxy.yaml")
        .listener("    proxy_protocol:\n      from: [127.0.0.5/32, 0.0.0.0/0]\n")
        .start()
        .await;
    let want = "proxy.yaml:7:28: proxy_protocol.from 0.0.0.0/0 is every IPv4 address: any host in it may name any client";
    let log = gw.logs.wait_for(want).await;
    assert!(line_with(&log, want).contains("WARN"), "{log}");
    assert!(!log.contains("127.0.0.5/32 is"), "{log}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broad.yaml");
    std::fs::write(
        &file,
        "listeners:\n  - name: edge\n    listen: 127.0.0.1:0\n    mode: reverse\n    upstream: 127.0.0.1:21\n    proxy_protocol: { from: [\"::/0\"] }\nrules:\n  - name: all\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ftpgate"))
        .args(["check", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.starts_with(
            "# warning: listeners[0] (edge): proxy_protocol.from ::/0 is every IPv6 address"
        ),
        "{printed}"
    );
}

/// libunftp's log messages: in its PROXY protocol mode it logs the client
/// that a control connection's header names.
#[derive(Clone, Default)]
struct UnftpLog(Arc<Mutex<Vec<String>>>);

impl slog::Drain for UnftpLog {
    type Ok = ();
    type Err = slog::Never;
    fn log(&self, r: &slog::Record, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        self.0.lock().unwrap().push(r.msg().to_string());
        Ok(())
    }
}

/// With `upstream_proxy_protocol: v1`, libunftp in its PROXY protocol mode
/// serves a session the gateway relays for a client behind a balancer, and
/// takes the real client from the gateway's header: libunftp refuses a
/// connection without one, and a header to another port is a data
/// connection to it.
#[tokio::test(flavor = "current_thread")]
async fn upstream_libunftp_sees_the_real_client() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().to_path_buf();
    // In its PROXY protocol mode libunftp binds in `listen`: it takes no
    // listener, cannot report a port 0 and says nothing when it listens.
    // So take a port that was just free, and another one when something
    // else took it first (libunftp's `listen` then ends at once).
    let unftp_log = UnftpLog::default();
    let mut listening = None;
    for _ in 0..5 {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let path = path.clone();
        let server = libunftp::ServerBuilder::new(Box::new(move || {
            unftp_sbe_fs::Filesystem::new(path.clone()).unwrap()
        }))
        .logger(slog::Logger::root(unftp_log.clone(), slog::o!()))
        // The control port the clients see: the balancer's front end, as
        // the header names it.
        .proxy_protocol_mode(21)
        .build()
        .unwrap();
        let task = tokio::spawn(server.listen(addr.to_string()));
        let up = bounded("libunftp listening", async {
            loop {
                // A connection counts only while libunftp still listens:
                // it may have reached whoever took the port.
                if TcpStream::connect(addr).await.is_ok() {
                    tokio::task::yield_now().await;
                    return !task.is_finished();
                }
                if task.is_finished() {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        if up {
            listening = Some(addr);
            break;
        }
    }
    let addr = listening.expect("libunftp listens on one of five free ports");
    let gw = Harness::new(Upstream::At(addr))
        .file("proxy.yaml")
        .listener(&format!(
            "    proxy_protocol:\n      from: [{BALANCER}/32]\n    upstream_proxy_protocol: v1\n"
        ))
        .start()
        .await;
    // `v1` names 127.0.0.1:21 as what the client connected to.
    let mut c = logged_in(via_balancer(&gw, &v1("127.0.0.3", 40001)).await).await;
    let (code, text) = c.cmd("PWD").await;
    assert_eq!(code, 257, "{text}");
    assert_eq!(c.cmd("QUIT").await.0, 221);
    let seen = unftp_log.0.lock().unwrap().clone();
    let control = seen
        .iter()
        .find(|m| m.starts_with("Incoming control connection"))
        .unwrap_or_else(|| panic!("libunftp logged no control connection: {seen:#?}"));
    assert!(
        control.contains("source: 127.0.0.3:40001, destination: 127.0.0.1:21"),
        "{control}"
    );
}

/// The v2 header the gateway sends a server for a direct client: exactly
/// the client's address and the listener's, as the first bytes; the
/// session's own bytes follow it.
#[tokio::test(flavor = "current_thread")]
async fn upstream_v2_header_names_a_direct_client_and_the_listener() {
    let mut gw = Harness::new(Upstream::Scripted)
        .listener("    upstream_proxy_protocol: v2\n")
        .start()
        .await;
    let upstream = gw.take_upstream();
    let client = connect_from("127.0.0.3", gw.addr).await;
    let client_port = client.local_addr().unwrap().port();
    let (mut server, _) = bounded("upstream connect", upstream.accept())
        .await
        .unwrap();
    let mut want = SIG.to_vec();
    want.extend_from_slice(&[0x21, 0x11, 0, 12, 127, 0, 0, 3, 127, 0, 0, 1]);
    want.extend_from_slice(&client_port.to_be_bytes());
    want.extend_from_slice(&gw.addr.port().to_be_bytes());
    let mut got = vec![0u8; want.len()];
    bounded("header", server.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(got, want);
    server.write_all(b"220 ready\r\n").await.unwrap();
    let mut c = Peer::new(client);
    assert_eq!(c.reply().await.0, 220);
    c.send(b"NOOP\r\n").await;
    let mut next = [0u8; 6];
    bounded("NOOP", server.read_exact(&mut next)).await.unwrap();
    assert_eq!(&next, b"NOOP\r\n");
}

/// The balancer's own session (a health check: a v2 LOCAL or a v1
/// `UNKNOWN` header) is announced to the server as such, a v2 LOCAL header
/// or `PROXY UNKNOWN`, not as a client at the balancer's address; the
/// session's own bytes follow it.
#[tokio::test(flavor = "current_thread")]
async fn upstream_header_of_a_health_check_says_local() {
    let mut local_v2 = SIG.to_vec();
    local_v2.extend_from_slice(&[0x20, 0x00, 0, 0]);
    for (from_balancer, version, want) in [
        (local_v2.clone(), "v1", b"PROXY UNKNOWN\r\n".to_vec()),
        (b"PROXY UNKNOWN\r\n".to_vec(), "v2", local_v2.clone()),
    ] {
        let mut gw = Harness::new(Upstream::Scripted)
            .listener(&format!(
                "    proxy_protocol:\n      from: [{BALANCER}/32]\n    upstream_proxy_protocol: {version}\n"
            ))
            .start()
            .await;
        let upstream = gw.take_upstream();
        let check = via_balancer(&gw, &from_balancer).await;
        let (mut server, _) = bounded("upstream connect", upstream.accept())
            .await
            .unwrap();
        let mut got = vec![0u8; want.len()];
        bounded("header", server.read_exact(&mut got))
            .await
            .unwrap();
        assert_eq!(
            got,
            want,
            "upstream {version}: {:?}",
            String::from_utf8_lossy(&got)
        );
        server.write_all(b"220 ready\r\n").await.unwrap();
        let mut c = Peer::new(check);
        assert_eq!(c.reply().await.0, 220);
        c.send(b"QUIT\r\n").await;
        let mut next = [0u8; 6];
        bounded("QUIT", server.read_exact(&mut next)).await.unwrap();
        assert_eq!(&next, b"QUIT\r\n", "upstream {version}");
    }
}
