//! One line's content as RFC 854 reads it, and the bytes the gateway
//! writes for it.
//!
//! The gateway never forwards a line as received. It decodes the Telnet NVT
//! (RFC 854) in the line, checks the text, and writes the text again:
//! `text CR LF`, with each 0xFF data byte doubled to `IAC IAC`. So a peer
//! that frames on LF alone (vsftpd), one that frames on CR LF, and one that
//! decodes Telnet first all see the line the gateway checked, and only it.
//!
//! Decoding, after the framer has cut the line at its LF and the CR before
//! that LF is removed:
//!
//! - `IAC IAC` is one 0xFF data byte;
//! - `IAC IP` and `IAC DM` are noted: written again in front of ABOR, STAT
//!   and QUIT, where RFC 959 §4.1 puts them, and dropped elsewhere;
//! - `IAC WILL/WONT/DO/DONT x` (three bytes) and any other `IAC x` are dropped;
//! - a sequence cut by the line end (`NOOP IAC LF`) makes a command line
//!   refused; in a reply line it is dropped.
//!
//! A command whose text holds CR or NUL is refused. In a reply line each CR
//! or NUL becomes a space, so a bare CR can never make one line two.

use std::fmt;

use super::reply::{parse_reply_line, ReplyLine};

/// Telnet "interpret as command" — RFC 854.
pub(crate) const IAC: u8 = 0xFF;
/// Telnet Interrupt Process — RFC 854.
const IP: u8 = 0xF4;
/// Telnet Data Mark, the data part of Synch — RFC 854.
const DM: u8 = 0xF2;
/// Telnet WILL (0xFB), WONT (0xFC), DO (0xFD), DONT (0xFE) take one option
/// byte after them — RFC 854.
const OPTION_VERBS: std::ops::RangeInclusive<u8> = 0xFB..=0xFE;

/// Commands sent "while a data transfer is in progress" behind Telnet IP
/// and Synch — RFC 959 §4.1 (FTP commands, preamble).
const URGENT_VERBS: [&[u8]; 3] = [b"ABOR", b"STAT", b"QUIT"];

/// Why a command line is refused before it is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFault {
    /// A Telnet sequence cut by the line end: `NOOP\xff\n`. A peer that
    /// decodes Telnet first would read the LF as part of the sequence.
    CutTelnet,
    /// A CR inside the line: `NOOP\rDELE x\r\n`.
    Cr,
    /// A NUL inside the line: `RETR a\0b\r\n`.
    Nul,
}

impl fmt::Display for LineFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LineFault::CutTelnet => "Telnet sequence cut by the line end",
            LineFault::Cr => "CR inside the line",
            LineFault::Nul => "NUL inside the line",
        })
    }
}

/// The Telnet signals a line carried — RFC 854.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signals {
    /// `IAC IP` (Interrupt Process) was in the line.
    pub ip: bool,
    /// `IAC DM` (Data Mark) was in the line.
    pub dm: bool,
}

/// A line's body (terminator removed), Telnet decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decoded {
    /// The data bytes.
    pub text: Vec<u8>,
    /// IP and DM seen.
    pub signals: Signals,
    /// The body ended inside a Telnet sequence (that sequence is dropped).
    pub cut: bool,
}

/// Decodes the Telnet NVT in `body` (see the module docs). Linear: each byte
/// is looked at once, and runs without IAC are copied whole.
pub(crate) fn decode(body: &[u8]) -> Decoded {
    let mut text = Vec::with_capacity(body.len());
    let mut signals = Signals::default();
    let mut cut = false;
    let mut rest = body;
    while let Some(i) = memchr::memchr(IAC, rest) {
        text.extend_from_slice(&rest[..i]);
        let len = match rest.get(i + 1) {
            None => {
                cut = true;
                1
            }
            Some(&IAC) => {
                text.push(IAC);
                2
            }
            Some(v) if OPTION_VERBS.contains(v) => {
                if rest.len() < i + 3 {
                    cut = true;
                }
                3
            }
            Some(&IP) => {
                signals.ip = true;
                2
            }
            Some(&DM) => {
                signals.dm = true;
                2
            }
            Some(_) => 2,
        };
        rest = rest.get(i + len..).unwrap_or_default();
    }
    text.extend_from_slice(rest);
    Decoded { text, signals, cut }
}

/// Appends `text` with each 0xFF doubled (RFC 854 `IAC IAC`).
fn escape_into(out: &mut Vec<u8>, text: &[u8]) {
    let mut rest = text;
    while let Some(i) = memchr::memchr(IAC, rest) {
        out.extend_from_slice(&rest[..=i]);
        out.push(IAC);
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
}

/// A command line as the gateway checked it: no CR, LF or NUL in its text,
/// no Telnet sequence left. [`CheckedCommand::to_wire`] is the only form in
/// which it reaches the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCommand {
    text: Vec<u8>,
    signals: Signals,
}

impl CheckedCommand {
    /// Checks a decoded command body.
    pub(crate) fn check(decoded: Decoded) -> Result<Self, LineFault> {
        if decoded.cut {
            return Err(LineFault::CutTelnet);
        }
        match memchr::memchr2(b'\r', 0, &decoded.text).map(|i| decoded.text[i]) {
            Some(b'\r') => Err(LineFault::Cr),
            Some(_) => Err(LineFault::Nul),
            None => Ok(CheckedCommand {
                text: decoded.text,
                signals: decoded.signals,
            }),
        }
    }

    /// A command of plain text (the framer saw no CR, NUL or IAC in it).
    pub(crate) fn plain(text: &[u8]) -> Self {
        CheckedCommand {
            text: text.to_vec(),
            signals: Signals::default(),
        }
    }

    /// The text that was checked: what the command parser reads.
    pub fn text(&self) -> &[u8] {
        &self.text
    }

    /// The Telnet signals the line carried.
    pub fn signals(&self) -> Signals {
        self.signals
    }

    /// The bytes to send: `text CR LF`, 0xFF doubled, and `IAC IP` /
    /// `IAC DM` in front of ABOR, STAT or QUIT when the client sent them
    /// (RFC 959 §4.1: `\xff\xf4\xff\xf2ABOR\r\n`).
    pub(crate) fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + 6);
        let verb_len = self
            .text
            .iter()
            .position(|b| !b.is_ascii_alphabetic())
            .unwrap_or(self.text.len());
        let verb = &self.text[..verb_len];
        if URGENT_VERBS.iter().any(|v| v.eq_ignore_ascii_case(verb)) {
            if self.signals.ip {
                out.extend_from_slice(&[IAC, IP]);
            }
            if self.signals.dm {
                out.extend_from_slice(&[IAC, DM]);
            }
        }
        escape_into(&mut out, &self.text);
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// A reply line as the gateway checked it: Telnet decoded, each CR or NUL
/// replaced by a space. Only [`CheckedReply::to_wire`] and
/// [`CheckedReply::inner_wire`] reach the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedReply {
    text: Vec<u8>,
}

impl CheckedReply {
    /// Sanitises a decoded reply body; a cut Telnet sequence is already
    /// dropped by the decoder.
    pub(crate) fn check(decoded: Decoded) -> Self {
        let mut text = decoded.text;
        for b in &mut text {
            if *b == b'\r' || *b == 0 {
                *b = b' ';
            }
        }
        CheckedReply { text }
    }

    /// A reply line of plain text (the framer saw no CR, NUL or IAC in it).
    pub(crate) fn plain(text: &[u8]) -> Self {
        CheckedReply {
            text: text.to_vec(),
        }
    }

    /// The text that was checked: what the reply parsers read.
    pub fn text(&self) -> &[u8] {
        &self.text
    }

    /// The bytes to send: `text CR LF`, 0xFF doubled.
    pub(crate) fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + 2);
        escape_into(&mut out, &self.text);
        out.extend_from_slice(b"\r\n");
        out
    }

    /// The bytes to send for a line inside the multi-line reply `open`.
    /// RFC 959 §4.2: "If an intermediary line begins with a 3-digit number,
    /// the Server must pad the front to avoid confusion." A line that starts
    /// with a digit (other than the reply's own `nnn-`) gets a leading space,
    /// so that no client takes `227 ...` inside a `200-` reply as a reply of
    /// its own.
    pub(crate) fn inner_wire(&self, open: u16) -> Vec<u8> {
        let own =
            matches!(parse_reply_line(&self.text), ReplyLine::First { code, .. } if code == open);
        let pad = self.text.first().is_some_and(u8::is_ascii_digit) && !own;
        let mut out = Vec::with_capacity(self.text.len() + 3);
        if pad {
            out.push(b' ');
        }
        escape_into(&mut out, &self.text);
        out.extend_from_slice(b"\r\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_table() {
        /// Body, text, signals (ip, dm), cut.
        type Case = (&'static [u8], &'static [u8], (bool, bool), bool);
        let cases: &[Case] = &[
            (b"NOOP", b"NOOP", (false, false), false),
            (b"RETR a\xff\xffb", b"RETR a\xffb", (false, false), false),
            (b"\xff\xf4\xff\xf2ABOR", b"ABOR", (true, true), false),
            (b"AB\xff\xf4OR", b"ABOR", (true, false), false),
            // option negotiation is three bytes, whatever the option
            (b"NO\xff\xfb\nOP", b"NOOP", (false, false), false),
            (b"NO\xff\xfe\xffOP", b"NOOP", (false, false), false),
            // any other IAC x is dropped, x included
            (b"QU\xff\xf1IT", b"QUIT", (false, false), false),
            (b"A\xff\rB", b"AB", (false, false), false),
            // cut by the end
            (b"NOOP\xff", b"NOOP", (false, false), true),
            (b"NOOP\xff\xfd", b"NOOP", (false, false), true),
            (b"\xff", b"", (false, false), true),
            (b"", b"", (false, false), false),
        ];
        for &(body, text, (ip, dm), cut) in cases {
            assert_eq!(
                decode(body),
                Decoded {
                    text: text.to_vec(),
                    signals: Signals { ip, dm },
                    cut
                },
                "body {body:?}"
            );
        }
    }

    #[test]
    fn command_faults_table() {
        /// Body, and the bytes sent or the fault.
        type Case = (&'static [u8], Result<&'static [u8], LineFault>);
        let cases: &[Case] = &[
            (b"DELE x", Ok(b"DELE x\r\n")),
            (b"RETR a\xff\xffb", Ok(b"RETR a\xff\xffb\r\n")),
            (b"\xff\xf4\xff\xf2ABOR", Ok(b"\xff\xf4\xff\xf2ABOR\r\n")),
            (b"\xff\xf2abor", Ok(b"\xff\xf2abor\r\n")),
            (b"\xff\xf4STAT", Ok(b"\xff\xf4STAT\r\n")),
            // IP and DM are kept only where RFC 959 wants them
            (b"\xff\xf4\xff\xf2NOOP", Ok(b"NOOP\r\n")),
            (b"NO\xff\xfb\x01OP", Ok(b"NOOP\r\n")),
            (b"NOOP\xff", Err(LineFault::CutTelnet)),
            (b"NOOP\xff\xfb", Err(LineFault::CutTelnet)),
            (b"NOOP\rDELE x", Err(LineFault::Cr)),
            (b"NOOP\r", Err(LineFault::Cr)),
            (b"RETR a\0b", Err(LineFault::Nul)),
            (b"\0", Err(LineFault::Nul)),
        ];
        for &(body, want) in cases {
            let got = CheckedCommand::check(decode(body)).map(|c| c.to_wire());
            assert_eq!(got, want.map(<[u8]>::to_vec), "body {body:?}");
        }
    }

    #[test]
    fn reply_sanitising_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"200 ok", b"200 ok\r\n"),
            (b"200 a\rb\0c", b"200 a b c\r\n"),
            (b"200 ok\xff", b"200 ok\r\n"),
            (b"257 \"a\xff\xffb\"", b"257 \"a\xff\xffb\"\r\n"),
        ];
        for &(body, want) in cases {
            let got = CheckedReply::check(decode(body)).to_wire();
            assert_eq!(got, want.to_vec(), "body {body:?}");
        }
    }

    #[test]
    fn inner_lines_starting_with_a_digit_are_padded() {
        let cases: &[(&[u8], &[u8])] = &[
            (
                b"227 Entering Passive Mode (1,2,3,4,5,6)",
                b" 227 Entering Passive Mode (1,2,3,4,5,6)\r\n",
            ),
            (b"2", b" 2\r\n"),
            (b"211-Features:", b"211-Features:\r\n"),
            (b" EPSV", b" EPSV\r\n"),
            (b"x 227 y", b"x 227 y\r\n"),
            (b"", b"\r\n"),
        ];
        for &(text, want) in cases {
            let got = CheckedReply::plain(text).inner_wire(211);
            assert_eq!(got, want.to_vec(), "text {text:?}");
        }
    }
}
