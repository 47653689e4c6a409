//! Formatting of the lines the gateway writes itself. Each output parses back
//! with the parsers in this module to the same value.
//!
//! Ports are the caller's to check: port 0 formats, but every parser here
//! (and any sane peer) refuses it.

use std::net::{SocketAddr, SocketAddrV4};

/// `h1,h2,h3,h4,p1,p2` — the six numbers of PORT and 227 (RFC 959 §4.1.2).
fn host_port(addr: SocketAddrV4) -> String {
    let [h1, h2, h3, h4] = addr.ip().octets();
    let [p1, p2] = addr.port().to_be_bytes();
    format!("{h1},{h2},{h3},{h4},{p1},{p2}")
}

/// `PORT h1,h2,h3,h4,p1,p2\r\n`
///
/// `PORT 192,0,2,1,156,64\r\n` for 192.0.2.1:40000 — RFC 959 §4.1.2.
pub(crate) fn port(addr: SocketAddrV4) -> Vec<u8> {
    format!("PORT {}\r\n", host_port(addr)).into_bytes()
}

/// `EPRT |1|a.b.c.d|port|\r\n` or `EPRT |2|::1|port|\r\n`
///
/// RFC 2428 §2, with `|` as the delimiter it suggests. An IPv6 scope or flow
/// label has no place on the wire and is dropped.
pub(crate) fn eprt(addr: SocketAddr) -> Vec<u8> {
    let (proto, ip) = match addr {
        SocketAddr::V4(a) => (1, a.ip().to_string()),
        SocketAddr::V6(a) => (2, a.ip().to_string()),
    };
    format!("EPRT |{proto}|{ip}|{}|\r\n", addr.port()).into_bytes()
}

/// `227 Entering Passive Mode (h1,h2,h3,h4,p1,p2).\r\n`
///
/// RFC 959 §4.1.2; the parentheses are there for clients that need them,
/// RFC 1123 §4.1.2.6 scanners do not.
pub(crate) fn reply_227(addr: SocketAddrV4) -> Vec<u8> {
    format!("227 Entering Passive Mode ({}).\r\n", host_port(addr)).into_bytes()
}

/// `229 Entering Extended Passive Mode (|||port|)\r\n`
///
/// RFC 2428 §3.
pub(crate) fn reply_229(port: u16) -> Vec<u8> {
    format!("229 Entering Extended Passive Mode (|||{port}|)\r\n").into_bytes()
}

/// `<code> <text>\r\n`; CR, LF and NUL in `text` are replaced by spaces.
///
/// `502 Command not implemented\r\n`. Replacing them keeps text that came
/// from a peer or a rule file from forging a second reply line, under any
/// framing. (A `str` holds no 0xFF byte, so there is no IAC to escape.)
pub(crate) fn reply(code: u16, text: &str) -> Vec<u8> {
    let mut out = format!("{code} ").into_bytes();
    out.extend(text.bytes().map(|b| {
        if matches!(b, b'\r' | b'\n' | 0) {
            b' '
        } else {
            b
        }
    }));
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ftp::{
        parse_227, parse_229, parse_command, parse_reply_line, Command, Framer, ReplyLine,
    };
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6};

    /// Frames `bytes` and returns the one line's text; fails the test if the
    /// output is not exactly one line.
    fn one_line(bytes: &[u8]) -> Vec<u8> {
        let mut framer = Framer::new();
        framer.push(bytes);
        let (raw, text) = match framer.next_line() {
            Ok(Some(line)) => (line.as_received().to_vec(), line.text().into_owned()),
            other => panic!("no line in {bytes:?}: {other:?}"),
        };
        assert_eq!(
            framer.next_line(),
            Ok(None),
            "more than one line in {bytes:?}"
        );
        assert_eq!(raw, bytes);
        text
    }

    #[test]
    fn literal_wire_forms() {
        let a: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 40000);
        assert_eq!(port(a), b"PORT 192,0,2,1,156,64\r\n");
        assert_eq!(eprt(a.into()), b"EPRT |1|192.0.2.1|40000|\r\n");
        let v6 = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 6446, 7, 3));
        assert_eq!(eprt(v6), b"EPRT |2|::1|6446|\r\n");
        assert_eq!(
            reply_227(a),
            b"227 Entering Passive Mode (192,0,2,1,156,64).\r\n"
        );
        assert_eq!(
            reply_229(6446),
            b"229 Entering Extended Passive Mode (|||6446|)\r\n"
        );
        assert_eq!(reply(502, "no\r\n227 x"), b"502 no  227 x\r\n");
        assert_eq!(reply(502, "no\0x"), b"502 no x\r\n");
        assert_eq!(reply(200, ""), b"200 \r\n");
    }

    fn arb_v4() -> impl Strategy<Value = SocketAddrV4> {
        (any::<u32>(), 1..=u16::MAX).prop_map(|(ip, p)| SocketAddrV4::new(Ipv4Addr::from(ip), p))
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            arb_v4().prop_map(SocketAddr::V4),
            (any::<u128>(), 1..=u16::MAX)
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p)),
        ]
    }

    proptest! {
        #[test]
        fn port_round_trips(addr in arb_v4()) {
            let text = one_line(&port(addr));
            let parsed = parse_command(&text).map(|c| c.command);
            prop_assert_eq!(parsed, Ok(Command::Port(addr)));
        }

        #[test]
        fn eprt_round_trips(addr in arb_addr()) {
            let text = one_line(&eprt(addr));
            let parsed = parse_command(&text).map(|c| c.command);
            prop_assert_eq!(parsed, Ok(Command::Eprt(addr)));
        }

        #[test]
        fn reply_227_round_trips(addr in arb_v4()) {
            let text = one_line(&reply_227(addr));
            let ReplyLine::Last { code: 227, text } = parse_reply_line(&text) else {
                return Err(TestCaseError::fail(format!("not a 227: {text:?}")));
            };
            prop_assert_eq!(parse_227(text), Some(addr));
        }

        #[test]
        fn reply_229_round_trips(port in 1..=u16::MAX) {
            let text = one_line(&reply_229(port));
            let ReplyLine::Last { code: 229, text } = parse_reply_line(&text) else {
                return Err(TestCaseError::fail(format!("not a 229: {text:?}")));
            };
            prop_assert_eq!(parse_229(text), Some(port));
        }

        #[test]
        fn reply_round_trips(code in 100u16..600, text in any::<String>()) {
            let line = one_line(&reply(code, &text));
            let want: Vec<u8> = text
                .bytes()
                .map(|b| if matches!(b, b'\r' | b'\n' | 0) { b' ' } else { b })
                .collect();
            prop_assert_eq!(parse_reply_line(&line), ReplyLine::Last { code, text: &want });
        }
    }
}
