//! Fair port pools: one session holds at most one unused pinhole per leg,
//! however many PASVs it pipelines, and one client address holds at most
//! its share of a pool (`data.max_ports_per_client`), so other clients
//! still get a working 227. In process: libunftp upstream, the real gateway,
//! a raw socket as the hostile client and suppaftp as the well-behaved one.

mod common;

use common::{
    bounded, core_past_greeting as core, digest, port_of_227, retr_all, Gw, Harness, Peer, Upstream,
};

use ftpgate::pinhole::{Leg, Opened};
use ftpgate::session::Action;
use std::net::SocketAddr;
use suppaftp::tokio::AsyncFtpStream;
use suppaftp::types::FileType;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// The gateway in front of libunftp, with 40-port pools from `base` and
/// `data` as extra lines of the `data` section.
async fn gateway(base: u16, data: &str) -> Gw {
    Harness::new(Upstream::Unftp)
        .file("pools.yaml")
        .pools(base..=base + 39, base + 100..=base + 139)
        .data(data)
        .start()
        .await
}

/// Connects from `from` (a loopback address) and logs in.
async fn logged_in(gw: &Gw, from: &str) -> Peer {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let s = bounded("connect", sock.connect(gw.addr)).await.unwrap();
    let mut p = Peer::new(s);
    assert_eq!(p.reply().await.0, 220);
    assert_eq!(p.cmd("USER anonymous").await.0, 331);
    assert_eq!(p.cmd("PASS x@").await.0, 230);
    p
}

/// A well-behaved client (suppaftp, from 127.0.0.1) downloads a file in
/// passive mode; its digest must match.
async fn download_works(gw: &Gw) {
    let data: Vec<u8> = (0..256 * 1024u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    std::fs::write(gw.root().join("f.bin"), &data).unwrap();
    let mut ftp = bounded("connect", AsyncFtpStream::connect(gw.addr))
        .await
        .unwrap();
    ftp.login("anonymous", "x@").await.unwrap();
    ftp.transfer_type(FileType::Binary).await.unwrap();
    let got = bounded("download", retr_all(&mut ftp, "f.bin"))
        .await
        .unwrap();
    assert_eq!(digest(&got), digest(&data), "download arrived intact");
    let _ = ftp.quit().await;
}

#[tokio::test(flavor = "current_thread")]
async fn pipelined_pasv_flood_holds_one_port() {
    // No share: this is about what one session holds on its own.
    let gw = gateway(24000, "  max_ports_per_client: 100%\n").await;
    let mut hostile = logged_in(&gw, "127.0.0.2").await;
    hostile.send(&b"PASV\r\n".repeat(60)).await;
    let mut announced = Vec::new();
    for _ in 0..60 {
        let (code, text) = hostile.reply().await;
        assert_eq!(code, 227, "{text}");
        announced.push(port_of_227(&text));
    }
    // Each 227 superseded the one before: one port of the pool is held.
    assert_eq!(gw.usage().ports, 1, "{}", gw.logs.text());
    let last = announced[59];
    // The first pinhole is closed, not merely unannounced.
    if announced[0] != last {
        assert!(TcpStream::connect(("127.0.0.1", announced[0]))
            .await
            .is_err());
    }
    // Others still get a working 227, while the flooder stays connected.
    download_works(&gw).await;
    // And the pinhole that was kept works for the flooder too.
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut d = sock
        .connect(SocketAddr::new(gw.addr.ip(), last))
        .await
        .unwrap();
    let (code, text) = hostile.cmd("NLST").await;
    assert!(code == 150 || code == 125, "{text}");
    let mut listing = Vec::new();
    bounded("listing", d.read_to_end(&mut listing))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&listing).contains("f.bin"));
    assert_eq!(hostile.reply().await.0, 226);
    // Our close ends the relay's other direction, and with it the plan.
    drop(d);
    gw.wait_ports(0).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_client_holds_its_share_of_the_pool_and_no_more() {
    let gw = gateway(24400, "  max_ports_per_client: 4\n").await;
    // Four sessions from one address, each with an unused pinhole.
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let mut s = logged_in(&gw, "127.0.0.2").await;
        let (code, text) = s.cmd("PASV").await;
        assert_eq!(code, 227, "{text}");
        sessions.push(s);
    }
    // A fifth is past the share: 425 with the reason, and a refusal line.
    let mut fifth = logged_in(&gw, "127.0.0.2").await;
    let (code, text) = fifth.cmd("PASV").await;
    assert_eq!(code, 425, "{text}");
    assert!(
        text.contains("client 127.0.0.2 already holds 4 ports of the client pool"),
        "{text}"
    );
    let log = gw.logs.wait_for("already holds 4 ports").await;
    let line = log
        .lines()
        .find(|l| l.contains("already holds 4 ports"))
        .unwrap_or_default();
    assert!(
        line.contains("WARN") && line.contains("what=PASV") && line.contains("code=425"),
        "{line}"
    );
    assert_eq!(gw.usage().ports, 4);
    // A session at the share can still renew its own pinhole: the old one
    // is given back before the new one is taken.
    assert_eq!(sessions[0].cmd("PASV").await.0, 227);
    assert_eq!(gw.usage().ports, 4);
    // Another client is not affected.
    download_works(&gw).await;
    gw.wait_ports(4).await;
    // Once one of the four ends, the fifth gets its pinhole.
    assert_eq!(sessions[0].cmd("QUIT").await.0, 221);
    gw.wait_ports(3).await;
    assert_eq!(fifth.cmd("PASV").await.0, 227);
    assert_eq!(gw.usage().ports, 4);
}

// ---- the session core ------------------------------------------------

/// Three PASVs pipelined in one segment, then the server's three 227s: each
/// plan is opened only after the one it supersedes was closed.
#[test]
fn pipelined_pasvs_close_each_superseded_plan_first() {
    let mut s = core();
    s.client_bytes(b"PASV\r\nPASV\r\nPASV\r\n");
    s.server_bytes(
        b"227 a (10,0,0,3,200,1)\r\n227 b (10,0,0,3,200,2)\r\n227 c (10,0,0,3,200,3)\r\n",
    );
    let mut order = Vec::new();
    let mut replies = 0;
    // Each open is reported before the core reads further input.
    for port in [40001u16, 40002, 40003] {
        let mut opened = None;
        while let Some(a) = s.poll_action() {
            match a {
                Action::Open(plan) => {
                    assert!(matches!(plan.client, Leg::Listen { .. }));
                    order.push(format!("open {}", plan.id));
                    opened = Some(plan.id);
                }
                Action::Close(id) => order.push(format!("close {id}")),
                Action::ToClient(b) if b.starts_with(b"227 ") => replies += 1,
                _ => {}
            }
        }
        let id = opened.expect("an Open for each 227");
        s.opened(
            id,
            Ok(Opened {
                client_listen: Some(SocketAddr::from(([192, 0, 2, 1], port))),
                server_listen: None,
            }),
        );
    }
    while let Some(a) = s.poll_action() {
        match a {
            Action::Close(id) => order.push(format!("close {id}")),
            Action::ToClient(b) if b.starts_with(b"227 ") => replies += 1,
            _ => {}
        }
    }
    assert_eq!(replies, 3);
    assert_eq!(
        order,
        ["open 1", "close 1", "open 2", "close 2", "open 3"],
        "one unused plan at a time"
    );
}
