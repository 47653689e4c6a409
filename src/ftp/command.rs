//! Client commands (RFC 959 §4.1, RFC 2428, RFC 2228).
//!
//! Each parser is a small nom function over one line's text. Numbers are
//! bounded in digits and value inside the parser, so nothing overflows and
//! every octet and port is checked before it reaches the session core.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use nom::branch::alt;
use nom::bytes::complete::{tag, tag_no_case, take_till, take_while_m_n};
use nom::character::complete::{char, digit1, space0};
use nom::combinator::{eof, map, value};
use nom::error::{ErrorKind, ParseError};
use nom::sequence::terminated;
use nom::IResult;

/// The protocol argument of EPSV — RFC 2428 §3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpsvParam {
    /// `EPSV`
    Any,
    /// `EPSV 1`
    V4,
    /// `EPSV 2`
    V6,
    /// `EPSV ALL`
    All,
    /// `EPSV <n>` for another network protocol number.
    Unknown(u32),
}

/// A client command the gateway understands; everything else is `Other`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `PORT h1,h2,h3,h4,p1,p2` — RFC 959 §4.1.2.
    Port(SocketAddrV4),
    /// `EPRT |1|132.235.1.2|6275|` — RFC 2428 §2.
    Eprt(SocketAddr),
    /// `PASV`
    Pasv,
    /// `EPSV [1|2|ALL]`
    Epsv(EpsvParam),
    /// `LPRT ...` (RFC 1639) — refused by the gateway.
    Lprt,
    /// `LPSV` (RFC 1639) — refused by the gateway.
    Lpsv,
    /// `AUTH <mechanism>` — RFC 2228 / RFC 4217, mechanism as sent.
    Auth(String),
    /// `CCC`
    Ccc,
    /// `PBSZ <n>`
    Pbsz,
    /// `PROT <level>`
    Prot,
    /// `USER <name>`, kept for logs.
    User(String),
    /// `ABOR`
    Abor,
    /// `QUIT`
    Quit,
    /// `REIN`
    Rein,
    /// A command that uses a data connection: RETR, STOR, STOU, APPE, LIST,
    /// NLST, MLSD. The argument (path) is in [`ParsedCommand::arg`].
    Transfer,
    /// Any other command; forwarded as it is.
    Other,
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCommand<'a> {
    /// The verb, as sent (compare with `eq_ignore_ascii_case`).
    pub verb: &'a str,
    /// Everything after the first space, terminator removed; may be empty.
    pub arg: &'a [u8],
    /// What it is.
    pub command: Command,
}

/// Why a command line could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Empty line, or a verb that is not 1–16 ASCII letters.
    #[error("malformed command line")]
    Malformed,
    /// A known verb with an argument that does not parse (octet > 255,
    /// port 0, missing or extra fields, overlong numbers, stray bytes).
    #[error("{verb}: {reason}")]
    BadArgument {
        /// The verb, upper case.
        verb: &'static str,
        /// What was wrong, for the reply text and the log.
        reason: &'static str,
    },
}

/// Longest verb accepted. RFC 959 verbs are 3–4 letters; extensions such as
/// `XSHA512` are longer, and 16 leaves room without inviting junk.
const MAX_VERB: usize = 16;

/// Parses one line's text (terminator and Telnet sequences already removed,
/// see [`crate::ftp::Line::text`]).
///
/// `PORT 192,0,2,1,156,64` → verb `PORT`, arg `192,0,2,1,156,64`,
/// `Command::Port(192.0.2.1:40000)`.
pub fn parse_command(text: &[u8]) -> Result<ParsedCommand<'_>, CommandError> {
    // The verb is the letters up to the first space or the end of the line.
    let len = text
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (verb, arg) = match text.get(len) {
        None => (text, &text[len..]),
        Some(b' ') => (&text[..len], &text[len + 1..]),
        Some(_) => return Err(CommandError::Malformed),
    };
    if verb.is_empty() || verb.len() > MAX_VERB {
        return Err(CommandError::Malformed);
    }
    // Letters only, so this cannot fail; no panic either way.
    let verb_str = std::str::from_utf8(verb).map_err(|_| CommandError::Malformed)?;

    let bad = |verb: &'static str| move |reason| CommandError::BadArgument { verb, reason };
    let command = match verb_key(verb) {
        verbs::PORT => Command::Port(port_arg(arg).map_err(bad("PORT"))?),
        verbs::EPRT => Command::Eprt(eprt_arg(arg).map_err(bad("EPRT"))?),
        verbs::PASV => Command::Pasv,
        verbs::EPSV => Command::Epsv(epsv_arg(arg).map_err(bad("EPSV"))?),
        verbs::LPRT => Command::Lprt,
        verbs::LPSV => Command::Lpsv,
        verbs::AUTH => Command::Auth(String::from_utf8_lossy(arg).trim().to_owned()),
        verbs::CCC => Command::Ccc,
        verbs::PBSZ => Command::Pbsz,
        verbs::PROT => Command::Prot,
        verbs::USER => Command::User(String::from_utf8_lossy(arg).into_owned()),
        verbs::ABOR => Command::Abor,
        verbs::QUIT => Command::Quit,
        verbs::REIN => Command::Rein,
        verbs::RETR
        | verbs::STOR
        | verbs::STOU
        | verbs::APPE
        | verbs::LIST
        | verbs::NLST
        | verbs::MLSD => Command::Transfer,
        _ => Command::Other,
    };
    Ok(ParsedCommand {
        verb: verb_str,
        arg,
        command,
    })
}

/// A verb of at most four letters as one number, upper-cased, so that the
/// verb is matched in any case without a copy: `b"Port"` and `b"PORT"` give
/// the same key. Longer verbs get 0, which no known verb has.
///
/// Only for letters: `& 0xDF` upper-cases an ASCII letter.
const fn verb_key(verb: &[u8]) -> u32 {
    if verb.len() > 4 {
        return 0;
    }
    let mut key = [0u8; 4];
    let mut i = 0;
    while i < verb.len() {
        key[i] = verb[i] & 0xDF;
        i += 1;
    }
    u32::from_le_bytes(key)
}

/// The keys of the verbs [`parse_command`] knows (see [`verb_key`]).
mod verbs {
    use super::verb_key;

    pub(super) const PORT: u32 = verb_key(b"PORT");
    pub(super) const EPRT: u32 = verb_key(b"EPRT");
    pub(super) const PASV: u32 = verb_key(b"PASV");
    pub(super) const EPSV: u32 = verb_key(b"EPSV");
    pub(super) const LPRT: u32 = verb_key(b"LPRT");
    pub(super) const LPSV: u32 = verb_key(b"LPSV");
    pub(super) const AUTH: u32 = verb_key(b"AUTH");
    pub(super) const CCC: u32 = verb_key(b"CCC");
    pub(super) const PBSZ: u32 = verb_key(b"PBSZ");
    pub(super) const PROT: u32 = verb_key(b"PROT");
    pub(super) const USER: u32 = verb_key(b"USER");
    pub(super) const ABOR: u32 = verb_key(b"ABOR");
    pub(super) const QUIT: u32 = verb_key(b"QUIT");
    pub(super) const REIN: u32 = verb_key(b"REIN");
    pub(super) const RETR: u32 = verb_key(b"RETR");
    pub(super) const STOR: u32 = verb_key(b"STOR");
    pub(super) const STOU: u32 = verb_key(b"STOU");
    pub(super) const APPE: u32 = verb_key(b"APPE");
    pub(super) const LIST: u32 = verb_key(b"LIST");
    pub(super) const NLST: u32 = verb_key(b"NLST");
    pub(super) const MLSD: u32 = verb_key(b"MLSD");
}

/// A parse failure that carries the reason shown to the client and the log.
/// nom's own errors say where, not why; this says why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Why(pub(crate) &'static str);

impl<I> ParseError<I> for Why {
    fn from_error_kind(_: I, kind: ErrorKind) -> Self {
        Why(match kind {
            ErrorKind::Digit => "expected a decimal number",
            ErrorKind::Eof => "stray bytes after the argument",
            _ => "malformed argument",
        })
    }
    fn append(_: I, _: ErrorKind, other: Self) -> Self {
        other
    }
}

/// nom result over one line's bytes, failing with a [`Why`].
pub(crate) type PResult<'a, T> = IResult<&'a [u8], T, Why>;

/// Runs a whole-argument parser and turns its failure into a reason.
fn finish<'a, T>(
    input: &'a [u8],
    mut parser: impl FnMut(&'a [u8]) -> PResult<'a, T>,
) -> Result<T, &'static str> {
    match parser(input) {
        Ok((_, value)) => Ok(value),
        Err(nom::Err::Error(why) | nom::Err::Failure(why)) => Err(why.0),
        Err(nom::Err::Incomplete(_)) => Err("incomplete argument"),
    }
}

/// Fails unconditionally with `reason` — the leaf of every semantic check.
pub(crate) fn fail(reason: &'static str) -> nom::Err<Why> {
    nom::Err::Failure(Why(reason))
}

/// A decimal number of at most `max_digits` digits and at most `max`.
/// `overlong` and `too_big` name the violation for the reply text.
pub(crate) fn bounded_decimal<'a>(
    max_digits: usize,
    max: u32,
    overlong: &'static str,
    too_big: &'static str,
) -> impl FnMut(&'a [u8]) -> PResult<'a, u32> {
    move |input: &'a [u8]| {
        let (rest, digits) = digit1(input)?;
        if digits.len() > max_digits {
            return Err(fail(overlong));
        }
        // At most 10 digits are ever allowed, so u64 cannot overflow.
        let n = digits
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        match u32::try_from(n) {
            Ok(n) if n <= max => Ok((rest, n)),
            _ => Err(fail(too_big)),
        }
    }
}

/// One PORT/227 field: 1–3 digits, ≤ 255 — RFC 959 §4.1.2.
pub(crate) fn octet(input: &[u8]) -> PResult<'_, u8> {
    let (rest, n) = bounded_decimal(
        3,
        255,
        "number longer than 3 digits",
        "number greater than 255",
    )(input)?;
    // bounded to 255 above
    Ok((
        rest,
        u8::try_from(n).map_err(|_| fail("number greater than 255"))?,
    ))
}

/// `h1,h2,h3,h4,p1,p2` → address and port; port 0 is refused. Shared with
/// the 227 reply, which carries the same six numbers.
pub(crate) fn host_port(input: &[u8]) -> PResult<'_, SocketAddrV4> {
    let mut fields = [0u8; 6];
    let mut rest = input;
    for (i, field) in fields.iter_mut().enumerate() {
        if i > 0 {
            rest = match char::<_, Why>(',')(rest) {
                Ok((r, _)) => r,
                Err(_) if rest.is_empty() => return Err(fail("missing field")),
                Err(_) => return Err(fail("expected ',' between fields")),
            };
        }
        if rest.is_empty() {
            return Err(fail("missing field"));
        }
        let (r, n) = octet(rest)?;
        *field = n;
        rest = r;
    }
    let [h1, h2, h3, h4, p1, p2] = fields;
    let port = u16::from_be_bytes([p1, p2]);
    if port == 0 {
        return Err(fail("port 0"));
    }
    Ok((rest, SocketAddrV4::new(Ipv4Addr::new(h1, h2, h3, h4), port)))
}

/// `PORT 192,0,2,1,156,64` — RFC 959 §4.1.2: exactly six fields, trailing
/// spaces tolerated and nothing else.
fn port_arg(arg: &[u8]) -> Result<SocketAddrV4, &'static str> {
    finish(arg, |i| {
        let (rest, addr) = host_port(i)?;
        if rest.first() == Some(&b',') {
            return Err(fail("more than six fields"));
        }
        let (rest, _) = space0(rest)?;
        let (rest, _) = eof(rest)?;
        Ok((rest, addr))
    })
}

/// A delimiter of RFC 2428 §2: "any character in the ASCII range 33-126".
pub(crate) fn delimiter(input: &[u8]) -> PResult<'_, u8> {
    match input.split_first() {
        Some((&d, rest)) if (33..=126).contains(&d) => Ok((rest, d)),
        Some(_) => Err(fail("delimiter outside ASCII 33-126")),
        None => Err(fail("missing field")),
    }
}

/// The field up to the next `d`, and `d` itself.
pub(crate) fn field(d: u8) -> impl FnMut(&[u8]) -> PResult<'_, &[u8]> {
    move |input| {
        terminated(take_till(|b| b == d), take_while_m_n(1, 1, |b| b == d))(input)
            .map_err(|_: nom::Err<Why>| fail("missing delimiter"))
    }
}

/// A TCP port in decimal: 1–5 digits, 1–65535, nothing else in the field.
pub(crate) fn tcp_port(field: &[u8]) -> Result<u16, nom::Err<Why>> {
    if field.is_empty() {
        return Err(fail("missing port"));
    }
    let (rest, n) = bounded_decimal(
        5,
        65535,
        "port longer than 5 digits",
        "port greater than 65535",
    )(field)?;
    if !rest.is_empty() {
        return Err(fail("stray bytes in port"));
    }
    match u16::try_from(n) {
        Ok(0) | Err(_) => Err(fail("port 0")),
        Ok(port) => Ok(port),
    }
}

/// `EPRT |1|132.235.1.2|6275|`, `EPRT |2|1080::8:800:200C:417A|5282|` —
/// RFC 2428 §2. The same delimiter four times; trailing spaces tolerated.
fn eprt_arg(arg: &[u8]) -> Result<SocketAddr, &'static str> {
    finish(arg, |i| {
        let (rest, d) = delimiter(i)?;
        let (rest, proto) = field(d)(rest)?;
        let (rest, addr) = field(d)(rest)?;
        let (rest, port) = field(d)(rest)?;
        let (rest, _) = space0(rest)?;
        let (rest, _) = eof(rest)?;
        let port = tcp_port(port)?;
        // std's parsers take no leading zeros, scopes or ports: exactly the
        // textual forms RFC 2428 names (dotted quad, RFC 4291 text).
        let text = std::str::from_utf8(addr).map_err(|_| fail("bad network address"))?;
        let addr = match proto {
            b"1" => SocketAddr::V4(SocketAddrV4::new(
                text.parse::<Ipv4Addr>()
                    .map_err(|_| fail("bad IPv4 address"))?,
                port,
            )),
            b"2" => SocketAddr::V6(SocketAddrV6::new(
                text.parse::<Ipv6Addr>()
                    .map_err(|_| fail("bad IPv6 address"))?,
                port,
                0,
                0,
            )),
            _ => return Err(fail("unsupported network protocol")),
        };
        Ok((rest, addr))
    })
}

/// `EPSV`, `EPSV 1`, `EPSV 2`, `EPSV ALL` — RFC 2428 §3; trailing spaces
/// tolerated.
fn epsv_arg(arg: &[u8]) -> Result<EpsvParam, &'static str> {
    finish(arg, |i| {
        let number = map(
            bounded_decimal(
                10,
                u32::MAX,
                "protocol number too long",
                "protocol number too large",
            ),
            |n| match n {
                1 => EpsvParam::V4,
                2 => EpsvParam::V6,
                n => EpsvParam::Unknown(n),
            },
        );
        let (rest, param) = alt((
            value(EpsvParam::All, tag_no_case("ALL")),
            number,
            value(EpsvParam::Any, tag("")),
        ))(i)?;
        let (rest, _) = space0(rest)?;
        let (rest, _) = eof(rest)?;
        Ok((rest, param))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(s: &str) -> SocketAddrV4 {
        s.parse()
            .unwrap_or_else(|e| panic!("test address {s}: {e}"))
    }
    fn sa(s: &str) -> SocketAddr {
        s.parse()
            .unwrap_or_else(|e| panic!("test address {s}: {e}"))
    }
    fn bad(verb: &'static str, reason: &'static str) -> Result<Command, CommandError> {
        Err(CommandError::BadArgument { verb, reason })
    }

    #[test]
    fn commands_table() {
        use Command::*;
        let cases: Vec<(&[u8], Result<Command, CommandError>)> = vec![
            // PORT: valid
            (b"PORT 192,0,2,1,156,64", Ok(Port(v4("192.0.2.1:40000")))),
            (b"port 10,0,0,1,0,1", Ok(Port(v4("10.0.0.1:1")))),
            (
                b"PoRt 255,255,255,255,255,255",
                Ok(Port(v4("255.255.255.255:65535"))),
            ),
            (b"PORT 010,000,2,1,4,0  ", Ok(Port(v4("10.0.2.1:1024")))),
            // PORT: invalid
            (
                b"PORT 256,0,2,1,4,0",
                bad("PORT", "number greater than 255"),
            ),
            (
                b"PORT 192,0,2,1,4,256",
                bad("PORT", "number greater than 255"),
            ),
            (b"PORT 192,0,2,1,0,0", bad("PORT", "port 0")),
            (b"PORT 192,0,2,1,4", bad("PORT", "missing field")),
            (b"PORT 192,0,2,1,4,", bad("PORT", "missing field")),
            (
                b"PORT 192,0,,1,4,0",
                bad("PORT", "expected a decimal number"),
            ),
            (b"PORT", bad("PORT", "missing field")),
            (b"PORT ", bad("PORT", "missing field")),
            (
                b"PORT 0192,0,2,1,4,0",
                bad("PORT", "number longer than 3 digits"),
            ),
            (
                b"PORT 192,0,2,1,4,0000001",
                bad("PORT", "number longer than 3 digits"),
            ),
            (b"PORT 192,0,2,1,4,0,7", bad("PORT", "more than six fields")),
            (
                b"PORT 192,0,2,1,4,0x",
                bad("PORT", "stray bytes after the argument"),
            ),
            (
                b"PORT 192,0,2,1,4,0 x",
                bad("PORT", "stray bytes after the argument"),
            ),
            (
                b"PORT 192,0,2,1,4,0\0",
                bad("PORT", "stray bytes after the argument"),
            ),
            (
                b"PORT 192.0.2.1,4,0",
                bad("PORT", "expected ',' between fields"),
            ),
            (
                b"PORT  192,0,2,1,4,0",
                bad("PORT", "expected a decimal number"),
            ),
            (
                b"PORT -1,0,2,1,4,0",
                bad("PORT", "expected a decimal number"),
            ),
            (
                b"PORT 192, 0,2,1,4,0",
                bad("PORT", "expected a decimal number"),
            ),
            // EPRT: valid, any delimiter in 33..=126
            (
                b"EPRT |1|132.235.1.2|6275|",
                Ok(Eprt(sa("132.235.1.2:6275"))),
            ),
            (
                b"eprt !1!132.235.1.2!6275! ",
                Ok(Eprt(sa("132.235.1.2:6275"))),
            ),
            (b"EPRT ~1~10.0.0.1~65535~", Ok(Eprt(sa("10.0.0.1:65535")))),
            (
                b"EPRT |2|1080::8:800:200C:417A|5282|",
                Ok(Eprt(sa("[1080::8:800:200c:417a]:5282"))),
            ),
            (
                b"EPRT |2|::ffff:10.0.0.1|21|",
                Ok(Eprt(sa("[::ffff:10.0.0.1]:21"))),
            ),
            // EPRT: invalid
            (
                b"EPRT |3|132.235.1.2|6275|",
                bad("EPRT", "unsupported network protocol"),
            ),
            (
                b"EPRT ||132.235.1.2|6275|",
                bad("EPRT", "unsupported network protocol"),
            ),
            (b"EPRT |1|::1|6275|", bad("EPRT", "bad IPv4 address")),
            (
                b"EPRT |2|132.235.1.2|6275|",
                bad("EPRT", "bad IPv6 address"),
            ),
            (
                b"EPRT |1|132.235.1.256|6275|",
                bad("EPRT", "bad IPv4 address"),
            ),
            (b"EPRT |1|132.235.1|6275|", bad("EPRT", "bad IPv4 address")),
            (
                b"EPRT |2|fe80::1%eth0|6275|",
                bad("EPRT", "bad IPv6 address"),
            ),
            (b"EPRT |1|1.2.3.4|0|", bad("EPRT", "port 0")),
            (
                b"EPRT |1|1.2.3.4|65536|",
                bad("EPRT", "port greater than 65535"),
            ),
            (
                b"EPRT |1|1.2.3.4|000080|",
                bad("EPRT", "port longer than 5 digits"),
            ),
            (b"EPRT |1|1.2.3.4||", bad("EPRT", "missing port")),
            (b"EPRT |1|1.2.3.4|80a|", bad("EPRT", "stray bytes in port")),
            (b"EPRT |1|1.2.3.4|80", bad("EPRT", "missing delimiter")),
            (b"EPRT |1|1.2.3.4!80!", bad("EPRT", "missing delimiter")),
            (
                b"EPRT |1|1.2.3.4|80|x",
                bad("EPRT", "stray bytes after the argument"),
            ),
            (
                b"EPRT  |1|1.2.3.4|80|",
                bad("EPRT", "delimiter outside ASCII 33-126"),
            ),
            (
                b"EPRT \x7f1\x7f1.2.3.4\x7f80\x7f",
                bad("EPRT", "delimiter outside ASCII 33-126"),
            ),
            (b"EPRT", bad("EPRT", "missing field")),
            (
                b"EPRT |1|1.2.3.\xff|80|",
                bad("EPRT", "bad network address"),
            ),
            // PASV ignores its argument; EPSV
            (b"PASV", Ok(Pasv)),
            (b"pasv junk", Ok(Pasv)),
            (b"EPSV", Ok(Epsv(EpsvParam::Any))),
            (b"EPSV ", Ok(Epsv(EpsvParam::Any))),
            (b"EPSV 1", Ok(Epsv(EpsvParam::V4))),
            (b"EPSV 2 ", Ok(Epsv(EpsvParam::V6))),
            (b"EPSV ALL", Ok(Epsv(EpsvParam::All))),
            (b"epsv all", Ok(Epsv(EpsvParam::All))),
            (b"EPSV 99", Ok(Epsv(EpsvParam::Unknown(99)))),
            (b"EPSV 4294967295", Ok(Epsv(EpsvParam::Unknown(u32::MAX)))),
            (b"EPSV 4294967296", bad("EPSV", "protocol number too large")),
            (b"EPSV 12345678901", bad("EPSV", "protocol number too long")),
            (b"EPSV ALLX", bad("EPSV", "stray bytes after the argument")),
            (b"EPSV 1x", bad("EPSV", "stray bytes after the argument")),
            (b"EPSV -1", bad("EPSV", "stray bytes after the argument")),
            // the rest
            (b"LPRT 4,4,1,2,3,4,2,0,20", Ok(Lprt)),
            (b"LPSV", Ok(Lpsv)),
            (b"AUTH TLS", Ok(Auth("TLS".into()))),
            (b"auth  tls  ", Ok(Auth("tls".into()))),
            (b"AUTH \xffSSL", Ok(Auth("\u{fffd}SSL".into()))),
            (b"CCC", Ok(Ccc)),
            (b"PBSZ 0", Ok(Pbsz)),
            (b"PROT P", Ok(Prot)),
            (b"USER anonymous", Ok(User("anonymous".into()))),
            (b"user a\0b", Ok(User("a\0b".into()))),
            (b"ABOR", Ok(Abor)),
            (b"QUIT", Ok(Quit)),
            (b"REIN", Ok(Rein)),
            (b"RETR file.bin", Ok(Transfer)),
            (b"stor x", Ok(Transfer)),
            (b"STOU", Ok(Transfer)),
            (b"APPE x", Ok(Transfer)),
            (b"LIST", Ok(Transfer)),
            (b"NLST -a", Ok(Transfer)),
            (b"MLSD", Ok(Transfer)),
            (b"MLST x", Ok(Other)),
            (b"SITE CHMOD 755 x", Ok(Other)),
            (b"ABCDEFGHIJKLMNOP", Ok(Other)),
            // verbs are matched whole and in any case
            (b"Quit", Ok(Quit)),
            (b"cCc", Ok(Ccc)),
            (b"QUITS", Ok(Other)),
            (b"PORTX 1,2,3,4,5,6", Ok(Other)),
            (b"CCCC", Ok(Other)),
            (b"CC", Ok(Other)),
            (b"POR 1,2,3,4,5,6", Ok(Other)),
            // malformed verbs
            (b"", Err(CommandError::Malformed)),
            (b" USER a", Err(CommandError::Malformed)),
            (b"ABCDEFGHIJKLMNOPQ", Err(CommandError::Malformed)),
            (b"US3R a", Err(CommandError::Malformed)),
            (b"USER\ta", Err(CommandError::Malformed)),
            (b"US\xffER a", Err(CommandError::Malformed)),
            (b"US\0ER a", Err(CommandError::Malformed)),
            (b"PORT\r", Err(CommandError::Malformed)),
            (b"\xc3\x9cSER a", Err(CommandError::Malformed)),
        ];
        for (line, want) in cases {
            let got = parse_command(line).map(|c| c.command);
            assert_eq!(got, want, "line {:?}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn verb_and_arg_are_slices_of_the_line() {
        let line = b"retr  dir/a b ";
        let parsed = parse_command(line).map_err(|e| e.to_string());
        let Ok(parsed) = parsed else {
            panic!("{parsed:?}");
        };
        assert_eq!(parsed.verb, "retr");
        assert_eq!(parsed.arg, b" dir/a b ");
        assert_eq!(parsed.command, Command::Transfer);
        let parsed = parse_command(b"NOOP").map(|p| p.arg.len());
        assert_eq!(parsed, Ok(0));
    }

    #[test]
    fn telnet_sequences_in_verb_are_stripped_by_the_framer() {
        use crate::ftp::Line;
        // IAC IP, IAC DM, then ABOR (RFC 959 §4.1.3); IAC NOP inside a verb
        for (raw, want) in [
            (&b"\xff\xf4\xff\xf2ABOR\r\n"[..], Ok(Command::Abor)),
            (&b"QU\xff\xf1IT\r\n"[..], Ok(Command::Quit)),
            // IAC IAC is a data byte 0xFF, which is no letter
            (&b"QU\xff\xffIT\r\n"[..], Err(CommandError::Malformed)),
        ] {
            let line = Line::new(raw);
            let text = line.text();
            assert_eq!(parse_command(&text).map(|c| c.command), want, "{raw:?}");
        }
    }

    #[test]
    fn errors_read_well() {
        let err = parse_command(b"PORT 1,2,3,4,0,0").map(|c| c.command);
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err("PORT: port 0".to_string())
        );
    }

    /// Every verb `parse_command` knows, and what it gives with no argument
    /// (or a bad one, for the verbs that need one).
    const KNOWN: &[&str] = &[
        "PORT", "EPRT", "PASV", "EPSV", "LPRT", "LPSV", "AUTH", "CCC", "PBSZ", "PROT", "USER",
        "ABOR", "QUIT", "REIN", "RETR", "STOR", "STOU", "APPE", "LIST", "NLST", "MLSD",
    ];

    proptest! {
        #[test]
        fn known_verbs_match_in_any_case(
            verb in proptest::sample::select(KNOWN),
            lower in proptest::collection::vec(any::<bool>(), 4),
        ) {
            let mixed: String = verb
                .chars()
                .zip(&lower)
                .map(|(c, &l)| if l { c.to_ascii_lowercase() } else { c })
                .collect();
            let got = parse_command(mixed.as_bytes()).map(|c| c.command);
            prop_assert_eq!(&got, &parse_command(verb.as_bytes()).map(|c| c.command));
            prop_assert_ne!(got, Ok(Command::Other));
        }

        #[test]
        fn other_verbs_are_other(verb in "[a-zA-Z]{1,6}") {
            prop_assume!(!KNOWN.contains(&verb.to_ascii_uppercase().as_str()));
            prop_assert_eq!(parse_command(verb.as_bytes()).map(|c| c.command), Ok(Command::Other));
        }

        #[test]
        fn never_panics_on_any_bytes(line in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_command(&line);
        }

        #[test]
        fn never_panics_on_near_valid_arguments(
            verb in prop_oneof![Just("PORT"), Just("EPRT"), Just("EPSV"), Just("AUTH"), Just("USER")],
            arg in "[0-9,|!.:a-fA-F \\x00\\xff]{0,40}",
        ) {
            let line = format!("{verb} {arg}");
            let parsed = parse_command(line.as_bytes());
            if let Ok(p) = parsed {
                prop_assert!(p.verb.eq_ignore_ascii_case(verb));
            }
        }
    }
}
