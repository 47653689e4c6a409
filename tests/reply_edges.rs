//! Edges of the reply rules and of the pools: a multi-line 227/229 that
//! answers no PASV/EPSV, a bare `nnn` last line, a long held 226, and the
//! draw of a busy pool. Each test failed on the code before its fix.

mod common;

use common::core_past_greeting as core;
use ftpgate::config::PortRange;
use ftpgate::pinhole::PortPool;
use std::net::{IpAddr, Ipv4Addr};

/// Once a pool's fresh ports are all leased, the next ports come from those
/// given back; they must still be drawn at random, not in the order they
/// were given back, which anyone who saw the returns could name.
#[test]
fn a_busy_pool_still_draws_ports_at_random() {
    let client: IpAddr = Ipv4Addr::new(192, 0, 2, 1).into();
    let trials = 10;
    let mut in_return_order = 0;
    for _ in 0..trials {
        let pool = PortPool::new(
            "review",
            PortRange {
                lo: 50000,
                hi: 50009,
            },
        );
        let mut held: Vec<_> = (0..10).map(|_| pool.lease(client).unwrap()).collect();
        // Five come back, front to back; none is fresh again yet (half the
        // pool cools).
        let returned: Vec<u16> = held.drain(..5).map(|l| l.port()).collect();
        let next: Vec<_> = (0..5).map(|_| pool.lease(client).unwrap()).collect();
        let next: Vec<u16> = next.iter().map(|l| l.port()).collect();
        let mut sorted = next.clone();
        sorted.sort_unstable();
        let mut want = returned.clone();
        want.sort_unstable();
        assert_eq!(sorted, want, "only the returned ports are free");
        if next == returned {
            in_return_order += 1;
        }
    }
    // At random, at most one order in 12 matches; ten in ten is no chance.
    assert!(
        in_return_order < trials,
        "{trials} times the next ports were the returned ones, in return order"
    );
}

use ftpgate::session::{Action, Session};

/// What the core writes to the client, in order.
fn to_client(s: &mut Session) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(a) = s.poll_action() {
        if let Action::ToClient(b) = a {
            out.extend_from_slice(&b);
        }
    }
    out
}

/// A multi-line 227 that answers no PASV loses its address: every line of
/// it, not only its last. A client that reads the address from the reply's
/// first line (curl reads from the 4th byte of the reply; Python's ftplib
/// searches the whole reply) would otherwise connect where the server said.
#[test]
fn a_multiline_227_answering_no_pasv_loses_its_address_in_every_line() {
    for (cmd, reply) in [
        (
            &b"NOOP\r\n"[..],
            &b"227-Entering Passive Mode (6,6,6,6,1,2)\r\n227 ok\r\n"[..],
        ),
        (
            b"NOOP\r\n",
            b"229-Entering Extended Passive Mode (|||4242|)\r\n229 ok\r\n",
        ),
    ] {
        let mut s = core();
        s.client_bytes(cmd);
        to_client(&mut s);
        s.server_bytes(reply);
        let out = to_client(&mut s);
        let text = String::from_utf8_lossy(&out);
        assert!(
            !text.contains("6,6,6,6") && !text.contains("|||4242|"),
            "the foreign address reached the client: {text:?}"
        );
        assert!(text.ends_with("\r\n") && !text.is_empty(), "{text:?}");
    }
    // Unsolicited (no command outstanding): nothing of it reaches the client.
    let mut s = core();
    s.server_bytes(b"227-Entering Passive Mode (6,6,6,6,1,2)\r\n227 ok\r\n");
    let out = to_client(&mut s);
    assert!(
        !String::from_utf8_lossy(&out).contains("6,6,6,6"),
        "unsolicited: {:?}",
        String::from_utf8_lossy(&out)
    );
}
/// The core ends a reply at a bare `nnn` line; many clients end one only at
/// `nnn SP` (curl's LASTLINE, Apache's proxy_ftp), so a bare code sent on
/// as it is makes the client read the next reply as part of this one. The
/// line the client gets must end a reply under the strict reading too.
#[test]
fn a_bare_code_line_reaches_the_client_as_a_last_line() {
    for reply in [&b"200\r\n"[..], b"211-status\r\n211\r\n"] {
        let mut s = core();
        s.client_bytes(b"NOOP\r\n");
        to_client(&mut s);
        s.server_bytes(reply);
        let out = to_client(&mut s);
        let last = out
            .strip_suffix(b"\r\n")
            .and_then(|o| o.split(|&b| b == b'\n').next_back())
            .unwrap_or_default()
            .to_vec();
        let strict_last =
            last.len() >= 4 && last[..3].iter().all(u8::is_ascii_digit) && last[3] == b' ';
        assert!(
            strict_last,
            "reply {:?} reached the client as {:?}",
            String::from_utf8_lossy(reply),
            String::from_utf8_lossy(&out)
        );
    }
}

/// The continuation lines of a transfer's final reply that is held until
/// its data connection has ended keep their place: past the hold's bound
/// they must not overtake the reply's first line, nor reach the client
/// before the data connection has ended (what the hold is for).
#[test]
fn a_long_held_226_never_reaches_the_client_out_of_order_or_early() {
    use ftpgate::pinhole::{DataEvent, DataOutcome, Opened};
    let mut s = core();
    s.client_bytes(b"PORT 198,51,100,7,195,80\r\n");
    let plan = std::iter::from_fn(|| s.poll_action())
        .find_map(|a| match a {
            Action::Open(p) => Some(p.id),
            _ => None,
        })
        .expect("an Open for PORT");
    s.opened(
        plan,
        Ok(Opened {
            client_listen: None,
            server_listen: Some("10.0.0.1:41000".parse().unwrap()),
        }),
    );
    to_client(&mut s);
    s.server_bytes(b"200 PORT ok\r\n");
    s.client_bytes(b"LIST\r\n");
    to_client(&mut s);
    let mut reply = b"150 Connecting\r\n226-first\r\n".to_vec();
    for i in 0..100 {
        reply.extend_from_slice(format!("line {i}\r\n").as_bytes());
    }
    s.server_bytes(&reply);
    assert_eq!(
        String::from_utf8_lossy(&to_client(&mut s)),
        "150 Connecting\r\n",
        "nothing of the 226 before its data connection ended"
    );
    s.data_event(DataEvent::Connected { id: plan });
    s.server_bytes(b"226 done\r\n");
    s.data_event(DataEvent::Closed {
        id: plan,
        to_client: 10,
        to_server: 0,
        outcome: DataOutcome::Completed,
    });
    let out = String::from_utf8_lossy(&to_client(&mut s)).into_owned();
    assert!(out.starts_with("226-first\r\n"), "{out:?}");
    assert!(out.ends_with("226 done\r\n"), "{out:?}");
}
