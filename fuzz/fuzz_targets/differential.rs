//! The parser differential, on the real session core: arbitrary client and
//! server bytes in arbitrary pieces, with data events and open results in
//! between. Every line the gateway writes must split, under each framing a
//! real peer uses (LF only, CRLF only, Telnet-aware: RFC 854 decode then
//! LF), into exactly one line, the same under all three; and that line is
//! one the gateway checked (a line of the peer's as an independent model
//! reads it) or one the gateway made. Nothing denied, no third-party
//! PORT/EPRT and no foreign 227/229 gets through under any framing.
#![no_main]

use ftpgate::config::{DataMode, PortRange, ServerMode, TlsPolicy};
use ftpgate::ftp::{parse_227, parse_229, parse_command, Command};
use ftpgate::pinhole::{DataEvent, DataOutcome, Leg, Opened};
use ftpgate::rules::Policy;
use ftpgate::session::{Action, OpenFailure, Session, SessionParams};
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

const CLIENT: &str = "198.51.100.7:40000";
const GW_PUBLIC: &str = "203.0.113.1:21";
const SERVER: &str = "10.0.0.3:21";
const GW_INSIDE: &str = "10.0.0.1:50000";
/// Where the fuzzed backend says the gateway listens, per leg.
const CLIENT_LISTEN: &str = "203.0.113.1:20001";
const SERVER_LISTEN: &str = "10.0.0.1:30001";

const IAC: u8 = 0xFF;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("constant address")
}

/// Reads the input as a script: one opcode byte, then its operands.
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn bytes(&mut self) -> &[u8] {
        let n = usize::from(self.byte().unwrap_or(0)).min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

// ---- how real peers frame a stream ----------------------------------------

/// LF only (vsftpd): lines at each LF, a CR before it removed; the bytes
/// after the last LF are left over.
fn split_lf(stream: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut parts: Vec<Vec<u8>> = stream.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    let rest = parts.pop().unwrap_or_default();
    for p in &mut parts {
        if p.last() == Some(&b'\r') {
            p.pop();
        }
    }
    (parts, rest)
}

/// CRLF only: lines at each CR LF pair.
fn split_crlf(stream: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut lines = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i + 1 < stream.len() {
        if stream[i] == b'\r' && stream[i + 1] == b'\n' {
            lines.push(stream[start..i].to_vec());
            start = i + 2;
            i += 2;
        } else {
            i += 1;
        }
    }
    (lines, stream[start..].to_vec())
}

/// RFC 854 decode of a whole stream, byte by byte: IAC IAC is 0xFF, IAC
/// WILL/WONT/DO/DONT x and IAC x are commands and carry no data. Returns
/// the data and whether the stream ended inside a sequence.
fn telnet_decode(stream: &[u8]) -> (Vec<u8>, bool) {
    let mut data = Vec::new();
    let mut i = 0;
    while i < stream.len() {
        let n = match (stream[i], stream.get(i + 1)) {
            (IAC, Some(&IAC)) => {
                data.push(IAC);
                2
            }
            (IAC, Some(0xFB..=0xFE)) => 3,
            (IAC, _) => 2,
            (b, _) => {
                data.push(b);
                1
            }
        };
        i += n;
    }
    (data, i > stream.len())
}

/// Telnet-aware: decode first, then lines at LF.
fn split_telnet(stream: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    split_lf(&telnet_decode(stream).0)
}

/// One action's bytes: exactly one line under every framing, the same
/// line under all three. Returns its text as a Telnet-aware peer reads it.
fn one_line(bytes: &[u8], side: &str) -> Vec<u8> {
    let (lf, lf_rest) = split_lf(bytes);
    let (crlf, crlf_rest) = split_crlf(bytes);
    let (telnet, telnet_rest) = split_telnet(bytes);
    assert!(
        lf.len() == 1 && crlf.len() == 1 && telnet.len() == 1,
        "to {side}: not one line under every framing: {bytes:?}"
    );
    assert!(
        lf_rest.is_empty() && crlf_rest.is_empty() && telnet_rest.is_empty(),
        "to {side}: bytes after the line end: {bytes:?}"
    );
    assert_eq!(lf, crlf, "to {side}: LF and CRLF framing differ: {bytes:?}");
    let (text, cut) = telnet_decode(&lf[0]);
    assert!(
        !cut,
        "to {side}: a Telnet sequence cut by the line end: {bytes:?}"
    );
    assert_eq!(
        text, telnet[0],
        "to {side}: Telnet-aware framing differs: {bytes:?}"
    );
    assert!(
        !text.iter().any(|&b| b == b'\r' || b == 0),
        "to {side}: CR or NUL inside a line: {bytes:?}"
    );
    text
}

// ---- the model: the lines a peer sent, read independently ------------------

/// The lines in `stream`, cut at every LF, each with its terminator removed
/// and its Telnet decoded: (text, whether a sequence was cut by its end).
fn model_lines(stream: &[u8]) -> Vec<(Vec<u8>, bool)> {
    split_lf(stream)
        .0
        .iter()
        .map(|line| telnet_decode(line))
        .collect()
}

/// The commands the gateway may forward: lines without CR, NUL or a cut
/// Telnet sequence.
fn model_commands(stream: &[u8]) -> HashSet<Vec<u8>> {
    model_lines(stream)
        .into_iter()
        .filter(|(text, cut)| !cut && !text.iter().any(|&b| b == b'\r' || b == 0))
        .map(|(text, _)| text)
        .collect()
}

/// The reply lines the gateway may forward: CR and NUL become spaces.
fn model_replies(stream: &[u8]) -> HashSet<Vec<u8>> {
    model_lines(stream)
        .into_iter()
        .map(|(mut text, _)| {
            for b in &mut text {
                if *b == b'\r' || *b == 0 {
                    *b = b' ';
                }
            }
            text
        })
        .collect()
}

/// The reply code at the start of a line, if the line is `nnn` or `nnn `
/// followed by text: what a client takes for a (final) reply.
fn final_code(text: &[u8]) -> Option<u16> {
    match text {
        [a @ b'1'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9', rest @ ..]
            if rest.first().is_none_or(|&s| s == b' ') =>
        {
            Some(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
        }
        _ => None,
    }
}

/// The code a line starts with, final (`nnn SP`, `nnn`) or not (`nnn-`):
/// a client out of step with the gateway may read either as a reply's
/// first line, so neither may carry a foreign address.
fn leading_code(text: &[u8]) -> Option<u16> {
    match text {
        [_, _, _, b'-', ..] => final_code(&[&text[..3], b" "].concat()),
        _ => final_code(text),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut s = Script(data);
    let Some(setup) = s.byte() else { return };
    let server_mode = match setup % 3 {
        0 => ServerMode::Same,
        1 => ServerMode::Passive,
        _ => ServerMode::Active,
    };
    let transparent = setup & 4 != 0;
    let client = sa(CLIENT);
    let server = sa(SERVER);
    let mut core = Session::new(SessionParams {
        client,
        client_local: sa(GW_PUBLIC),
        server,
        server_local: sa(GW_INSIDE),
        transparent,
        announce: None,
        policy: Policy {
            rule: "fuzz".into(),
            modes: vec![DataMode::Passive, DataMode::Active],
            server_mode,
            data_ports: PortRange {
                lo: 1024,
                hi: 65535,
            },
            tls: if setup & 8 != 0 {
                TlsPolicy::Passthrough
            } else {
                TlsPolicy::Refuse
            },
            deny_commands: vec!["SITE".into(), "DELE".into()],
            require_tls: false,
            require_prot_p: false,
        },
        tls: Default::default(),
    });
    // The address a client may be told to connect to.
    let announced: IpAddr = if transparent {
        server.ip()
    } else {
        sa(GW_PUBLIC).ip()
    };
    let mut client_stream = Vec::new();
    let mut server_stream = Vec::new();
    let mut to_server = Vec::new();
    let mut to_client = Vec::new();
    let mut plans: Vec<u64> = Vec::new();
    let mut ended = false;
    while let Some(op) = s.byte() {
        match op % 8 {
            0..=2 => {
                let b = s.bytes();
                client_stream.extend_from_slice(b);
                core.client_bytes(b);
            }
            3..=5 => {
                let b = s.bytes();
                server_stream.extend_from_slice(b);
                core.server_bytes(b);
            }
            6 => {
                let id = pick(&plans, s.byte());
                core.data_event(DataEvent::Connected { id });
            }
            _ => {
                let id = pick(&plans, s.byte());
                core.data_event(DataEvent::Closed {
                    id,
                    to_client: 1,
                    to_server: 0,
                    outcome: DataOutcome::Completed,
                });
            }
        }
        while let Some(a) = core.poll_action() {
            match a {
                Action::ToServer(bytes) => to_server.push(one_line(&bytes, "server")),
                Action::ToClient(bytes) => to_client.push(one_line(&bytes, "client")),
                Action::Open(plan) => {
                    plans.push(plan.id);
                    let ok = s.byte().unwrap_or(0) % 4 != 0;
                    let result = if ok {
                        Ok(Opened {
                            client_listen: matches!(plan.client, Leg::Listen { .. })
                                .then(|| sa(CLIENT_LISTEN)),
                            server_listen: matches!(plan.server, Leg::Listen { .. })
                                .then(|| sa(SERVER_LISTEN)),
                        })
                    } else {
                        Err(OpenFailure::PoolExhausted("client"))
                    };
                    core.opened(plan.id, result);
                }
                // The shell stops parsing here: TLS bytes are copied as
                // they are, by design.
                Action::End(_) | Action::Passthrough { .. } => ended = true,
                _ => {}
            }
        }
        if ended {
            break;
        }
    }

    // Every command the server got is a client line the model reads the
    // same way, or one the gateway made; none is denied, and the only
    // PORT/EPRT is the gateway's own.
    let commands = model_commands(&client_stream);
    for text in &to_server {
        let parsed = parse_command(text);
        if let Ok(p) = &parsed {
            assert!(
                !p.verb.eq_ignore_ascii_case("DELE") && !p.verb.eq_ignore_ascii_case("SITE"),
                "denied command forwarded: {text:?}"
            );
        }
        let own = match parsed.map(|p| p.command) {
            Ok(Command::Port(a)) => {
                assert_eq!(SocketAddr::V4(a), sa(SERVER_LISTEN), "PORT {text:?}");
                true
            }
            Ok(Command::Eprt(a)) => {
                assert_eq!(a, sa(SERVER_LISTEN), "EPRT {text:?}");
                true
            }
            Ok(Command::Pasv) | Ok(Command::Epsv(_)) => true,
            _ => false,
        };
        assert!(
            own || commands.contains(text),
            "sent to the server but never checked: {text:?}"
        );
    }
    // Every line the client got is a server line the model reads the same
    // way (an inner line maybe padded with a space), or one the gateway
    // made; no 227/229 names anything but the gateway's own listener.
    let replies = model_replies(&server_stream);
    for text in &to_client {
        match leading_code(text) {
            Some(227) => {
                if let Some(a) = parse_227(&text[3..]) {
                    assert_eq!(SocketAddr::V4(a).ip(), announced, "227 {text:?}");
                    assert_eq!(a.port(), sa(CLIENT_LISTEN).port(), "227 {text:?}");
                }
            }
            Some(229) => {
                if let Some(p) = parse_229(&text[3..]) {
                    assert_eq!(p, sa(CLIENT_LISTEN).port(), "229 {text:?}");
                }
            }
            _ => {}
        }
        let forwarded =
            replies.contains(text) || text.strip_prefix(b" ").is_some_and(|t| replies.contains(t));
        // A line the gateway makes is a single-line reply in ASCII or
        // UTF-8, and never holds a 0xFF byte.
        let made = final_code(text).is_some() && !text.contains(&IAC);
        assert!(
            forwarded || made,
            "sent to the client but never checked: {text:?}"
        );
    }
});

fn pick(plans: &[u64], b: Option<u8>) -> u64 {
    let b = usize::from(b.unwrap_or(0));
    plans
        .get(b % (plans.len() + 1))
        .copied()
        .unwrap_or(b as u64)
}
