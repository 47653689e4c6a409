//! The PROXY protocol header (HAProxy's `proxy-protocol.txt`, versions 1
//! and 2) that a balancer puts before a relayed connection's first byte to
//! name the real client. The parser is pure: bytes in, a [`Header`] out,
//! and back. [`read_header`] is the one piece of I/O, shared by control and
//! data connections: it takes exactly a header's bytes off a socket.
//!
//! Bounds: a v1 header is at most [`V1_MAX`] bytes, CRLF included (the
//! specification's own limit). A v2 header is its 16-byte preamble plus a
//! length field of at most [`V2_MAX_LEN`]: the largest address block (36
//! bytes, TCP over IPv6) and up to 512 bytes of TLVs, which are skipped.
//! So no header is longer than [`MAX_HEADER`].

use nom::bytes::complete::{tag, take, take_while1};
use nom::number::complete::{be_u16, be_u8};
use nom::IResult;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v1 signature: `PROXY TCP4 192.0.2.7 198.51.100.1 51000 21\r\n`.
pub const V1_SIGNATURE: &[u8] = b"PROXY ";
/// The v2 signature, the first 12 bytes of a binary header (§2.2).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, `PROXY TCP6` with two full IPv6 addresses (§2.1).
pub const V1_MAX: usize = 107;
/// Largest v2 length field accepted: a 36-byte IPv6 address block plus 512
/// bytes of TLVs. A longer one is refused rather than read.
pub const V2_MAX_LEN: usize = 36 + 512;
/// The v2 preamble: signature, version/command, family, length.
const V2_PREAMBLE: usize = 16;
/// Longest header of either version.
pub const MAX_HEADER: usize = V2_PREAMBLE + V2_MAX_LEN;

/// What a header says about the connection it precedes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A relayed TCP connection: the real client and the address it
    /// connected to (`PROXY TCP4/TCP6`, v2 `PROXY` over `AF_INET(6)`).
    Proxied {
        /// The real client.
        source: SocketAddr,
        /// What the client connected to (the balancer's front end).
        destination: SocketAddr,
    },
    /// The balancer's own connection, or one it cannot describe (v1
    /// `UNKNOWN`, v2 `LOCAL` as health checks send, v2 `PROXY` over an
    /// unspecified or UNIX family): the specification says to use the
    /// connection's own endpoints.
    Local,
}

/// Why bytes are not an acceptable header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Neither the v1 nor the v2 signature.
    NotProxy,
    /// A signature, then something the specification does not allow.
    Malformed(&'static str),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::NotProxy => f.write_str("the first bytes are not a PROXY v1 or v2 header"),
            HeaderError::Malformed(why) => write!(f, "malformed PROXY header: {why}"),
        }
    }
}

/// The header at the start of `buf` and its length, `Ok(None)` while
/// `buf` is a correct but incomplete start of one. Bytes after the header
/// are not looked at.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    if buf.starts_with(V1_SIGNATURE) {
        v1(buf)
    } else if buf.starts_with(&V2_SIGNATURE) {
        v2(buf)
    } else if V1_SIGNATURE.starts_with(buf) || V2_SIGNATURE.starts_with(buf) {
        Ok(None)
    } else {
        Err(HeaderError::NotProxy)
    }
}

/// How the first bytes of a stream look, for a peer that may not send a
/// header: they are one, they might become one, or they cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// A v1 or v2 signature.
    Header,
    /// A strict start of a signature: more bytes decide.
    Undecided,
    /// Not a header.
    Clear,
}

/// Whether the stream that starts with `prefix` carries a PROXY header.
pub fn sniff(prefix: &[u8]) -> Sniff {
    if prefix.starts_with(V1_SIGNATURE) || prefix.starts_with(&V2_SIGNATURE) {
        Sniff::Header
    } else if V1_SIGNATURE.starts_with(prefix) || V2_SIGNATURE.starts_with(prefix) {
        Sniff::Undecided
    } else {
        Sniff::Clear
    }
}

/// `PROXY TCP4 192.0.2.7 198.51.100.1 51000 21\r\n`, `PROXY UNKNOWN ...\r\n`
/// (§2.1): single spaces, ports without leading zeros, CRLF within
/// [`V1_MAX`] bytes.
fn v1(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(HeaderError::Malformed("v1 header longer than 107 bytes"))
        } else {
            Ok(None)
        };
    };
    let Some(line) = window[..lf].strip_suffix(b"\r") else {
        return Err(HeaderError::Malformed("v1 header ends without CRLF"));
    };
    let rest = &line[V1_SIGNATURE.len()..];
    if rest == b"UNKNOWN" || rest.starts_with(b"UNKNOWN ") {
        // §2.1: whatever follows UNKNOWN up to the CRLF is ignored.
        return Ok(Some((Header::Local, lf + 1)));
    }
    match v1_tcp(rest) {
        Ok((b"", header)) => Ok(Some((header, lf + 1))),
        _ => Err(HeaderError::Malformed(
            "v1 header is not `TCP4|TCP6 source destination sport dport`",
        )),
    }
}

/// `TCP4 src dst sport dport`, addresses of the family the protocol names.
fn v1_tcp(i: &[u8]) -> IResult<&[u8], Header> {
    let (i, family) = nom::branch::alt((tag("TCP4 "), tag("TCP6 ")))(i)?;
    let v4 = family == b"TCP4 ";
    let (i, src) = v1_addr(i, v4)?;
    let (i, _) = tag(" ")(i)?;
    let (i, dst) = v1_addr(i, v4)?;
    let (i, _) = tag(" ")(i)?;
    let (i, sport) = v1_port(i)?;
    let (i, _) = tag(" ")(i)?;
    let (i, dport) = v1_port(i)?;
    Ok((
        i,
        Header::Proxied {
            source: SocketAddr::new(src, sport),
            destination: SocketAddr::new(dst, dport),
        },
    ))
}

fn v1_addr(i: &[u8], v4: bool) -> IResult<&[u8], IpAddr> {
    let fail = || nom::Err::Error(nom::error::Error::new(i, nom::error::ErrorKind::Verify));
    let (rest, text) = take_while1(|b: u8| b.is_ascii_hexdigit() || b == b'.' || b == b':')(i)?;
    let text = std::str::from_utf8(text).map_err(|_| fail())?;
    let ip = if v4 {
        IpAddr::V4(text.parse::<Ipv4Addr>().map_err(|_| fail())?)
    } else {
        IpAddr::V6(text.parse::<Ipv6Addr>().map_err(|_| fail())?)
    };
    Ok((rest, ip))
}

/// 0-65535 in decimal, no leading zero (§2.1).
fn v1_port(i: &[u8]) -> IResult<&[u8], u16> {
    let fail = || nom::Err::Error(nom::error::Error::new(i, nom::error::ErrorKind::Verify));
    let (rest, digits) = take_while1(|b: u8| b.is_ascii_digit())(i)?;
    if digits.len() > 5 || (digits.len() > 1 && digits[0] == b'0') {
        return Err(fail());
    }
    let n = digits
        .iter()
        .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    let port = u16::try_from(n).map_err(|_| fail())?;
    Ok((rest, port))
}

/// The binary header (§2.2): signature, version 2 and command, family and
/// transport, length, address block, TLVs (skipped).
fn v2(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    if buf.len() < V2_PREAMBLE {
        return Ok(None);
    }
    let Ok((body, (ver_cmd, fam, len))) = v2_preamble(buf) else {
        return Err(HeaderError::Malformed("v2 preamble"));
    };
    let len = usize::from(len);
    if ver_cmd >> 4 != 2 {
        return Err(HeaderError::Malformed(
            "v2 signature with a version other than 2",
        ));
    }
    if len > V2_MAX_LEN {
        return Err(HeaderError::Malformed(
            "v2 length above 548 bytes (addresses and TLVs)",
        ));
    }
    let total = V2_PREAMBLE + len;
    let Ok((_, block)) = take::<_, _, nom::error::Error<&[u8]>>(len)(body) else {
        return Ok(None);
    };
    let header = match ver_cmd & 0x0f {
        // LOCAL: the address block, whatever it says, is ignored.
        0x0 => Header::Local,
        0x1 => v2_addresses(fam, block)?,
        _ => {
            return Err(HeaderError::Malformed(
                "v2 command other than LOCAL or PROXY",
            ))
        }
    };
    Ok(Some((header, total)))
}

/// Signature, version/command byte, family/transport byte, length.
fn v2_preamble(i: &[u8]) -> IResult<&[u8], (u8, u8, u16)> {
    let (i, _) = tag(&V2_SIGNATURE[..])(i)?;
    let (i, ver_cmd) = be_u8(i)?;
    let (i, fam) = be_u8(i)?;
    let (i, len) = be_u16(i)?;
    Ok((i, (ver_cmd, fam, len)))
}

/// A PROXY command's address block; TLVs after it are skipped.
fn v2_addresses(fam: u8, block: &[u8]) -> Result<Header, HeaderError> {
    let short = HeaderError::Malformed("v2 address block shorter than its family needs");
    match fam {
        // TCP over IPv4: 4 + 4 + 2 + 2 bytes.
        0x11 => {
            let (src, dst, ports) = split::<4>(block).ok_or(short)?;
            let (sport, dport) = ports;
            Ok(Header::Proxied {
                source: SocketAddr::new(Ipv4Addr::from(src).into(), sport),
                destination: SocketAddr::new(Ipv4Addr::from(dst).into(), dport),
            })
        }
        // TCP over IPv6: 16 + 16 + 2 + 2 bytes.
        0x21 => {
            let (src, dst, ports) = split::<16>(block).ok_or(short)?;
            let (sport, dport) = ports;
            Ok(Header::Proxied {
                source: SocketAddr::new(Ipv6Addr::from(src).into(), sport),
                destination: SocketAddr::new(Ipv6Addr::from(dst).into(), dport),
            })
        }
        // UDP over a TCP connection cannot be right.
        0x12 | 0x22 | 0x32 => Err(HeaderError::Malformed("v2 header for a datagram transport")),
        // Unspecified, or a UNIX stream socket: no IP client to name (§2.2
        // lets the receiver use the connection's endpoints).
        0x00 | 0x31 => Ok(Header::Local),
        _ => Err(HeaderError::Malformed(
            "v2 unknown address family or transport",
        )),
    }
}

/// Two `N`-byte addresses and two big-endian ports from the front of `b`.
#[allow(clippy::type_complexity)]
fn split<const N: usize>(b: &[u8]) -> Option<([u8; N], [u8; N], (u16, u16))> {
    let src: [u8; N] = b.get(..N)?.try_into().ok()?;
    let dst: [u8; N] = b.get(N..2 * N)?.try_into().ok()?;
    let ports = b.get(2 * N..2 * N + 4)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    Some((src, dst, (sport, dport)))
}

/// Reads a PROXY header and not a byte more: the bytes are peeked, and
/// only those that belong to the header are taken off the socket, so what
/// follows it (the client's first command, or a data connection's first
/// byte) stays in the socket for whoever reads next. At most
/// [`MAX_HEADER`] bytes; the caller's timer bounds the wait.
pub async fn read_header(stream: &mut TcpStream) -> Result<Header, String> {
    let mut got: Vec<u8> = Vec::with_capacity(MAX_HEADER);
    let mut peeked = [0u8; MAX_HEADER];
    loop {
        let room = MAX_HEADER - got.len();
        if room == 0 {
            // The parser decides within MAX_HEADER bytes; kept total anyway.
            return Err("PROXY header over its bound".to_string());
        }
        let n = stream
            .peek(&mut peeked[..room])
            .await
            .map_err(|e| format!("reading the PROXY header: {e}"))?;
        if n == 0 {
            return Err(if got.is_empty() {
                "closed before sending a PROXY header".to_string()
            } else {
                format!("truncated PROXY header: closed after {} bytes", got.len())
            });
        }
        let before = got.len();
        got.extend_from_slice(&peeked[..n]);
        let (header, take) = match parse(&got) {
            Ok(Some((header, len))) => (Some(header), len - before),
            // Every byte so far is part of the header.
            Ok(None) => (None, n),
            Err(e) => return Err(e.to_string()),
        };
        stream
            .read_exact(&mut peeked[..take])
            .await
            .map_err(|e| format!("reading the PROXY header: {e}"))?;
        if let Some(header) = header {
            return Ok(header);
        }
    }
}

/// `header` as a v1 line. A source and destination of different families
/// cannot be written in v1 and become `PROXY UNKNOWN`.
pub fn encode_v1(header: &Header) -> Vec<u8> {
    match header {
        Header::Proxied {
            source,
            destination,
        } if source.is_ipv4() == destination.is_ipv4() => {
            let proto = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {proto} {} {} {} {}\r\n",
                source.ip(),
                destination.ip(),
                source.port(),
                destination.port()
            )
            .into_bytes()
        }
        _ => b"PROXY UNKNOWN\r\n".to_vec(),
    }
}

/// `header` as a v2 header with no TLVs. Mixed families are sent as
/// IPv6, IPv4 addresses mapped.
pub fn encode_v2(header: &Header) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    match header {
        Header::Local => out.extend_from_slice(&[0x20, 0x00, 0, 0]),
        Header::Proxied {
            source,
            destination,
        } => match (source.ip(), destination.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out.extend_from_slice(&[0x21, 0x11, 0, 12]);
                out.extend_from_slice(&s.octets());
                out.extend_from_slice(&d.octets());
            }
            (s, d) => {
                let v6 = |ip: IpAddr| match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                out.extend_from_slice(&[0x21, 0x21, 0, 36]);
                out.extend_from_slice(&v6(s).octets());
                out.extend_from_slice(&v6(d).octets());
            }
        },
    }
    if let Header::Proxied {
        source,
        destination,
    } = header
    {
        out.extend_from_slice(&source.port().to_be_bytes());
        out.extend_from_slice(&destination.port().to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn proxied(src: &str, dst: &str) -> Header {
        Header::Proxied {
            source: sa(src),
            destination: sa(dst),
        }
    }

    fn proxied_max() -> Header {
        let all = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        proxied(all, all)
    }

    /// A v2 header: version/command, family, then the block as given.
    fn v2_bytes(ver_cmd: u8, fam: u8, block: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.extend_from_slice(&[ver_cmd, fam]);
        b.extend_from_slice(&(block.len() as u16).to_be_bytes());
        b.extend_from_slice(block);
        b
    }

    #[test]
    fn v1_headers() {
        let cases: &[(&[u8], Header)] = &[
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 21\r\n",
                proxied("192.0.2.7:51000", "198.51.100.1:21"),
            ),
            (
                b"PROXY TCP6 2001:db8::7 2001:db8::1 0 65535\r\n",
                proxied("[2001:db8::7]:0", "[2001:db8::1]:65535"),
            ),
            (b"PROXY UNKNOWN\r\n", Header::Local),
            (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", Header::Local),
        ];
        for (bytes, want) in cases {
            let mut with_data = bytes.to_vec();
            with_data.extend_from_slice(b"USER x\r\n");
            assert_eq!(
                parse(&with_data),
                Ok(Some((*want, bytes.len()))),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn v1_malformed() {
        let cases: &[&[u8]] = &[
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 21\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51000\r\n",
            b"PROXY TCP4 192.0.2.7  198.51.100.1 51000 21\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 051000 21\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 21\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 1 21 \r\n",
            b"PROXY TCP4 192.0.2.256 198.51.100.1 1 21\r\n",
            b"PROXY TCP4 2001:db8::7 2001:db8::1 1 21\r\n",
            b"PROXY TCP6 192.0.2.7 198.51.100.1 1 21\r\n",
            b"PROXY TCP5 192.0.2.7 198.51.100.1 1 21\r\n",
            b"PROXY tcp4 192.0.2.7 198.51.100.1 1 21\r\n",
            b"PROXY \r\n",
            b"PROXY UNKNOWNX\r\n",
        ];
        for bytes in cases {
            assert!(
                matches!(parse(bytes), Err(HeaderError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        // No CRLF within 107 bytes: refused without reading further.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX, b'x');
        assert!(matches!(parse(&long), Err(HeaderError::Malformed(_))));
        long.truncate(V1_MAX - 1);
        assert_eq!(parse(&long), Ok(None));
        // The longest header there is fits.
        let max = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert!(max.len() <= V1_MAX);
        assert_eq!(parse(max), Ok(Some((proxied_max(), max.len()))));
    }

    #[test]
    fn not_a_header_and_incomplete() {
        assert_eq!(parse(b"USER anonymous\r\n"), Err(HeaderError::NotProxy));
        assert_eq!(parse(b"PROXZ"), Err(HeaderError::NotProxy));
        assert_eq!(parse(b""), Ok(None));
        assert_eq!(parse(b"PRO"), Ok(None));
        assert_eq!(parse(b"PROXY TCP4 192.0"), Ok(None));
        assert_eq!(parse(&V2_SIGNATURE[..5]), Ok(None));
        let full = v2_bytes(0x21, 0x11, &[192, 0, 2, 7, 10, 0, 0, 1, 0xc7, 0x38, 0, 21]);
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(
            parse(&full),
            Ok(Some((
                proxied("192.0.2.7:51000", "10.0.0.1:21"),
                full.len()
            )))
        );
    }

    #[test]
    fn v2_headers() {
        let mut v6 = Vec::new();
        v6.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0xc7, 0x38, 0, 21]);
        let mut v4_tlvs = vec![192, 0, 2, 7, 10, 0, 0, 1, 0xc7, 0x38, 0, 21];
        // An AWS-style TLV (type 0xEA) and a NOOP TLV: skipped.
        v4_tlvs.extend_from_slice(&[0xea, 0, 4, 1, b'v', b'p', b'c', 0x04, 0, 1, 0]);
        let cases: Vec<(Vec<u8>, Header)> = vec![
            (
                v2_bytes(0x21, 0x11, &[192, 0, 2, 7, 10, 0, 0, 1, 0xc7, 0x38, 0, 21]),
                proxied("192.0.2.7:51000", "10.0.0.1:21"),
            ),
            (
                v2_bytes(0x21, 0x21, &v6),
                proxied("[2001:db8::7]:51000", "[2001:db8::1]:21"),
            ),
            (
                v2_bytes(0x21, 0x11, &v4_tlvs),
                proxied("192.0.2.7:51000", "10.0.0.1:21"),
            ),
            // LOCAL (health checks), with or without an address block.
            (v2_bytes(0x20, 0x00, &[]), Header::Local),
            (v2_bytes(0x20, 0x11, &[0; 12]), Header::Local),
            (v2_bytes(0x21, 0x00, &[]), Header::Local),
            (v2_bytes(0x21, 0x31, &[0; 216]), Header::Local),
        ];
        for (bytes, want) in cases {
            let mut with_data = bytes.clone();
            with_data.extend_from_slice(b"220 hi\r\n");
            assert_eq!(
                parse(&with_data),
                Ok(Some((want, bytes.len()))),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn v2_malformed() {
        let cases: Vec<Vec<u8>> = vec![
            v2_bytes(0x11, 0x11, &[0; 12]),             // version 1
            v2_bytes(0x22, 0x11, &[0; 12]),             // command 2
            v2_bytes(0x21, 0x11, &[0; 11]),             // short IPv4 block
            v2_bytes(0x21, 0x21, &[0; 35]),             // short IPv6 block
            v2_bytes(0x21, 0x12, &[0; 12]),             // UDP
            v2_bytes(0x21, 0x41, &[0; 12]),             // no such family
            v2_bytes(0x21, 0x10, &[0; 12]),             // IPv4, no transport
            v2_bytes(0x21, 0x11, &[0; V2_MAX_LEN + 1]), // over the bound
        ];
        for bytes in cases {
            assert!(
                matches!(parse(&bytes), Err(HeaderError::Malformed(_))),
                "{:?}",
                &bytes[12..16]
            );
        }
        // The bound is judged on the length field, before the bytes come.
        let mut over = V2_SIGNATURE.to_vec();
        over.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse(&over), Err(HeaderError::Malformed(_))));
    }

    #[test]
    fn sniffing_the_first_bytes() {
        assert_eq!(sniff(b""), Sniff::Undecided);
        assert_eq!(sniff(b"PROX"), Sniff::Undecided);
        assert_eq!(sniff(b"PROXY "), Sniff::Header);
        assert_eq!(sniff(b"PROXY TCP4"), Sniff::Header);
        assert_eq!(sniff(&V2_SIGNATURE[..11]), Sniff::Undecided);
        assert_eq!(sniff(&V2_SIGNATURE), Sniff::Header);
        assert_eq!(sniff(b"PROXYUSER"), Sniff::Clear);
        assert_eq!(sniff(b"USER anonymous\r\n"), Sniff::Clear);
        assert_eq!(sniff(b"PWD\r\n"), Sniff::Clear);
        // A blank line starts like the v2 signature, then is not it.
        assert_eq!(sniff(b"\r\nNOOP\r\n"), Sniff::Clear);
    }

    fn arb_header() -> impl Strategy<Value = Header> {
        let ip = prop_oneof![
            any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(n))),
            any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from(n))),
        ];
        let addr = (ip, any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port));
        prop_oneof![
            Just(Header::Local),
            (addr.clone(), addr).prop_map(|(source, destination)| Header::Proxied {
                source,
                destination
            }),
        ]
    }

    /// What a header becomes in v2: mixed families as mapped IPv6.
    fn as_v2(h: Header) -> Header {
        match h {
            Header::Proxied {
                source,
                destination,
            } if source.is_ipv4() != destination.is_ipv4() => {
                let map = |a: SocketAddr| match a.ip() {
                    IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), a.port()),
                    IpAddr::V6(_) => a,
                };
                Header::Proxied {
                    source: map(source),
                    destination: map(destination),
                }
            }
            h => h,
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            if let Ok(Some((_, n))) = parse(&bytes) {
                prop_assert!(n <= bytes.len() && n <= MAX_HEADER);
            }
            let _ = sniff(&bytes);
        }

        #[test]
        fn signatures_then_arbitrary_bytes_never_panic(
            v2 in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..700),
        ) {
            let mut bytes = if v2 { V2_SIGNATURE.to_vec() } else { V1_SIGNATURE.to_vec() };
            bytes.extend_from_slice(&tail);
            if let Ok(Some((_, n))) = parse(&bytes) {
                prop_assert!(n <= bytes.len() && n <= MAX_HEADER);
            }
        }

        #[test]
        fn valid_headers_round_trip(h in arb_header(), data in proptest::collection::vec(any::<u8>(), 0..32)) {
            let v1 = encode_v1(&h);
            prop_assert!(v1.len() <= V1_MAX);
            let mut with_data = v1.clone();
            with_data.extend_from_slice(&data);
            let want_v1 = match h {
                Header::Proxied { source, destination } if source.is_ipv4() == destination.is_ipv4() => h,
                _ => Header::Local,
            };
            prop_assert_eq!(parse(&with_data), Ok(Some((want_v1, v1.len()))));
            let v2 = encode_v2(&h);
            let mut with_data = v2.clone();
            with_data.extend_from_slice(&data);
            prop_assert_eq!(parse(&with_data), Ok(Some((as_v2(h), v2.len()))));
            // Any strict prefix is incomplete, never an error.
            for cut in 0..v2.len() {
                prop_assert_eq!(parse(&v2[..cut]), Ok(None));
            }
            for cut in 0..v1.len() {
                prop_assert_eq!(parse(&v1[..cut]), Ok(None));
            }
        }
    }
}
