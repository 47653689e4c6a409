//! Server replies (RFC 959 §4.2).
//!
//! Small nom functions over one line's text. The 227 and 229 scanners are
//! tolerant where real servers differ (text around the numbers) and strict
//! where a value reaches the session core (octets, ports).

use std::net::SocketAddrV4;

use nom::bytes::complete::take_while_m_n;
use nom::character::complete::char;

use super::command::{delimiter, field, host_port, tcp_port, PResult};

/// One reply line, classified — RFC 959 §4.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyLine<'a> {
    /// `nnn text` — a single line, or the last line of a multi-line reply.
    Last {
        /// The reply code, 100–599.
        code: u16,
        /// The text after the separator.
        text: &'a [u8],
    },
    /// `nnn-text` — the first line of a multi-line reply.
    First {
        /// The reply code, 100–599.
        code: u16,
        /// The text after the separator.
        text: &'a [u8],
    },
    /// Any other line; valid only inside a multi-line reply.
    Text(&'a [u8]),
}

/// Classifies one line's text (terminator removed).
///
/// `226 Transfer complete` → `Last`, `211-Features:` → `First`,
/// ` MDTM` → `Text`, `150` → `Last` with empty text.
///
/// A reply line is `nnn` with the first digit 1–5 (RFC 959 §4.2.1), then
/// `' '`, `'-'` or nothing at all.
pub fn parse_reply_line(text: &[u8]) -> ReplyLine<'_> {
    if let [a @ b'1'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9', rest @ ..] = text {
        let code = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
        match rest.split_first() {
            None => return ReplyLine::Last { code, text: rest },
            Some((b' ', after)) => return ReplyLine::Last { code, text: after },
            Some((b'-', after)) => return ReplyLine::First { code, text: after },
            Some(_) => {}
        }
    }
    ReplyLine::Text(text)
}

/// Follows multi-line replies: a reply that opens with `nnn-` ends only at a
/// line starting `nnn ` with the same code (RFC 959 §4.2).
///
/// A bare `nnn` line with the same code also ends it, as it does for a
/// single-line reply: waiting for more would hang the session for no gain.
#[derive(Debug, Default, Clone)]
pub struct ReplyTracker {
    /// The code of the multi-line reply that is open, if any.
    open: Option<u16>,
}

/// Where a line stands in the reply it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyPos {
    /// The line completes a reply with this code.
    End(u16),
    /// More lines of the reply with this code follow.
    Inside(u16),
    /// The line is not a reply line at all (no reply open, no code).
    Garbage,
}

impl ReplyTracker {
    /// Feeds one line's text and tells where it stands.
    pub fn push(&mut self, text: &[u8]) -> ReplyPos {
        let line = parse_reply_line(text);
        match (self.open, line) {
            (Some(open), ReplyLine::Last { code, .. }) if code == open => {
                self.open = None;
                ReplyPos::End(code)
            }
            // Anything else, other codes included, is text of the open reply.
            (Some(open), _) => ReplyPos::Inside(open),
            (None, ReplyLine::First { code, .. }) => {
                self.open = Some(code);
                ReplyPos::Inside(code)
            }
            (None, ReplyLine::Last { code, .. }) => ReplyPos::End(code),
            (None, ReplyLine::Text(_)) => ReplyPos::Garbage,
        }
    }

    /// True while a multi-line reply is open.
    pub fn in_multiline(&self) -> bool {
        self.open.is_some()
    }
}

/// `227 Entering Passive Mode (192,0,2,1,156,64)` — RFC 959 §4.1.2, scanned as
/// RFC 1123 §4.1.2.6: the first digit after the code starts h1, parentheses
/// optional. `text` is the text after the code. Rejects octets > 255, port 0
/// and overlong numbers.
///
/// `Entering Passive Mode (192,0,2,1,156,64).` → `192.0.2.1:40000`;
/// `=192,0,2,1,156,64` → the same.
pub fn parse_227(text: &[u8]) -> Option<SocketAddrV4> {
    let start = text.iter().position(u8::is_ascii_digit)?;
    let (rest, addr) = host_port(text.get(start..)?).ok()?;
    // A seventh field means this is not the address we think it is.
    if rest.first() == Some(&b',') {
        return None;
    }
    Some(addr)
}

/// `(|||6446|)` with the same delimiter four times — RFC 2428 §3.
fn epsv_port(input: &[u8]) -> PResult<'_, u16> {
    let (rest, _) = char('(')(input)?;
    let (rest, d) = delimiter(rest)?;
    let (rest, _) = take_while_m_n(2, 2, |b| b == d)(rest)?;
    let (rest, port) = field(d)(rest)?;
    let (rest, _) = char(')')(rest)?;
    Ok((rest, tcp_port(port)?))
}

/// `229 Entering Extended Passive Mode (|||6446|)` — RFC 2428 §3, with any
/// delimiter in ASCII 33–126. `text` is the text after the code. Returns the port (1–65535).
///
/// The text before `(` is free, and may hold parentheses of its own, so each
/// `(` is tried in turn.
pub fn parse_229(text: &[u8]) -> Option<u16> {
    text.iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'(')
        .find_map(|(i, _)| epsv_port(text.get(i..)?).ok().map(|(_, port)| port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reply_lines_table() {
        use ReplyLine::*;
        let cases: &[(&[u8], ReplyLine)] = &[
            (
                b"220 ready",
                Last {
                    code: 220,
                    text: b"ready",
                },
            ),
            (
                b"226 ",
                Last {
                    code: 226,
                    text: b"",
                },
            ),
            (
                b"150",
                Last {
                    code: 150,
                    text: b"",
                },
            ),
            (
                b"599 x",
                Last {
                    code: 599,
                    text: b"x",
                },
            ),
            (
                b"100 x",
                Last {
                    code: 100,
                    text: b"x",
                },
            ),
            (
                b"211-Features:",
                First {
                    code: 211,
                    text: b"Features:",
                },
            ),
            (
                b"211-",
                First {
                    code: 211,
                    text: b"",
                },
            ),
            (
                b"230 a\0b\xff",
                Last {
                    code: 230,
                    text: b"a\0b\xff",
                },
            ),
            (b" MDTM", Text(b" MDTM")),
            (b"", Text(b"")),
            (b"22", Text(b"22")),
            (b"2200 x", Text(b"2200 x")),
            (b"220x", Text(b"220x")),
            (b"220\tx", Text(b"220\tx")),
            (b"620 x", Text(b"620 x")),
            (b"020 x", Text(b"020 x")),
            (b"22a x", Text(b"22a x")),
            (b"\xff220 x", Text(b"\xff220 x")),
        ];
        for (line, want) in cases {
            assert_eq!(parse_reply_line(line), *want, "line {line:?}");
        }
    }

    #[test]
    fn tracker_follows_multiline_replies() {
        use ReplyPos::*;
        let script: &[(&[u8], ReplyPos, bool)] = &[
            (b"220 hello", End(220), false),
            (b"junk", Garbage, false),
            (b"211-Features:", Inside(211), true),
            (b" EPSV", Inside(211), true),
            // other codes, and the same code with '-', do not end it
            (b"226 Transfer complete", Inside(211), true),
            (b"211-more", Inside(211), true),
            (b"211x", Inside(211), true),
            (b"", Inside(211), true),
            (b"211 End", End(211), false),
            (b"230-Welcome", Inside(230), true),
            (b"230", End(230), false),
            (b"150 Opening", End(150), false),
            (b"226 Done", End(226), false),
        ];
        let mut tracker = ReplyTracker::default();
        for (line, pos, open) in script {
            assert_eq!(tracker.push(line), *pos, "line {line:?}");
            assert_eq!(tracker.in_multiline(), *open, "line {line:?}");
        }
    }

    #[test]
    fn parse_227_table() {
        let addr = |s: &str| s.parse::<SocketAddrV4>().ok();
        let cases: &[(&[u8], Option<SocketAddrV4>)] = &[
            (
                b"Entering Passive Mode (192,0,2,1,156,64)",
                addr("192.0.2.1:40000"),
            ),
            (
                b"Entering Passive Mode (192,0,2,1,156,64).",
                addr("192.0.2.1:40000"),
            ),
            (
                b"Entering Passive Mode 192,0,2,1,156,64",
                addr("192.0.2.1:40000"),
            ),
            (b"=192,0,2,1,156,64", addr("192.0.2.1:40000")),
            (b"(010,000,000,001,000,001)", addr("10.0.0.1:1")),
            (b"(255,255,255,255,255,255)", addr("255.255.255.255:65535")),
            (b"OK (192,0,2,1,156,64) \xff\0", addr("192.0.2.1:40000")),
            // invalid
            (b"Entering Passive Mode (256,0,2,1,156,64)", None),
            (b"Entering Passive Mode (192,0,2,1,256,64)", None),
            (b"Entering Passive Mode (192,0,2,1,0,0)", None),
            (b"Entering Passive Mode (192,0,2,1,156)", None),
            (b"Entering Passive Mode (192,0,2,1,156,)", None),
            (b"Entering Passive Mode (192,0,2,1,156,64,1)", None),
            (b"Entering Passive Mode (0192,0,2,1,156,64)", None),
            (b"Entering Passive Mode (192, 0,2,1,156,64)", None),
            (b"Entering Passive Mode (192.0.2.1,156,64)", None),
            // RFC 1123: the first digit starts h1, even a stray one
            (b"Entering Passive Mode 1 (192,0,2,1,156,64)", None),
            (b"Entering Passive Mode", None),
            (b"", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_227(text), *want, "text {text:?}");
        }
    }

    #[test]
    fn parse_229_table() {
        let cases: &[(&[u8], Option<u16>)] = &[
            (b"Entering Extended Passive Mode (|||6446|)", Some(6446)),
            (b"Entering Extended Passive Mode (|||6446|).", Some(6446)),
            (b"(!!!1!)", Some(1)),
            (b"(~~~65535~)", Some(65535)),
            (b"Extended (passive) mode (|||6446|)", Some(6446)),
            (b"x\xff\0(|||6446|)", Some(6446)),
            // invalid
            (b"Entering Extended Passive Mode (|||0|)", None),
            (b"Entering Extended Passive Mode (|||65536|)", None),
            (b"Entering Extended Passive Mode (|||006446|)", None),
            (b"Entering Extended Passive Mode (||||)", None),
            (b"Entering Extended Passive Mode (|||6446)", None),
            (b"Entering Extended Passive Mode (|||6446|", None),
            (b"Entering Extended Passive Mode (|!|6446|)", None),
            (b"Entering Extended Passive Mode (|||6446!)", None),
            (b"Entering Extended Passive Mode (|1|1.2.3.4|6446|)", None),
            (b"Entering Extended Passive Mode (   6446 )", None),
            (
                b"Entering Extended Passive Mode (\x7f\x7f\x7f6446\x7f)",
                None,
            ),
            (b"Entering Extended Passive Mode (|||64a6|)", None),
            (b"Entering Extended Passive Mode |||6446|", None),
            (b"", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_229(text), *want, "text {text:?}");
        }
    }

    /// The nom parser that `parse_reply_line` replaced, kept as the model
    /// the hand-written one must agree with.
    fn reference(text: &[u8]) -> ReplyLine<'_> {
        use nom::branch::alt;
        use nom::combinator::{eof, value};
        #[derive(Clone, Copy)]
        enum Sep {
            Last,
            First,
        }
        fn code_and_sep(input: &[u8]) -> PResult<'_, (u16, Sep)> {
            let (rest, digits) = take_while_m_n(3, 3, |b: u8| b.is_ascii_digit())(input)?;
            let (rest, sep) = alt((
                value(Sep::Last, char(' ')),
                value(Sep::First, char('-')),
                value(Sep::Last, eof),
            ))(rest)?;
            let code = digits
                .iter()
                .fold(0u16, |n, &d| n * 10 + u16::from(d - b'0'));
            if !(100..600).contains(&code) {
                return Err(crate::ftp::command::fail("reply code outside 100-599"));
            }
            Ok((rest, (code, sep)))
        }
        match code_and_sep(text) {
            Ok((rest, (code, Sep::Last))) => ReplyLine::Last { code, text: rest },
            Ok((rest, (code, Sep::First))) => ReplyLine::First { code, text: rest },
            Err(_) => ReplyLine::Text(text),
        }
    }

    proptest! {
        #[test]
        fn agrees_with_the_nom_parser(
            text in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..8),
                "[0-9][0-9]{0,3}[ \\-x0-9]?[a-z ]{0,3}".prop_map(String::into_bytes),
            ],
        ) {
            prop_assert_eq!(parse_reply_line(&text), reference(&text));
        }
    }

    proptest! {
        #[test]
        fn never_panic_on_any_bytes(text in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_reply_line(&text);
            let _ = parse_227(&text);
            let _ = parse_229(&text);
            let mut tracker = ReplyTracker::default();
            for line in text.split(|&b| b == b'\n') {
                let _ = tracker.push(line);
            }
        }

        #[test]
        fn never_panic_on_near_valid_text(
            text in "[0-9,()|!. \\-\\x00\\xff]{0,40}",
        ) {
            let _ = parse_reply_line(text.as_bytes());
            if let Some(addr) = parse_227(text.as_bytes()) {
                prop_assert_ne!(addr.port(), 0);
            }
            if let Some(port) = parse_229(text.as_bytes()) {
                prop_assert_ne!(port, 0);
            }
        }
    }
}
