//! The kernel's connection tracking over netlink (ctnetlink): the messages
//! the kernel backend reads (events, dumps, one entry's counters) and the
//! requests it sends.
//!
//! Parsing is pure: bytes in, [`Record`]s out, every length checked against
//! the buffer, so a truncated or garbled message ends the parse instead of a
//! panic. [`Socket`] is the thin shell around a `NETLINK_NETFILTER` socket.
//!
//! A message is a `nlmsghdr` (16 bytes, host byte order), a `nfgenmsg`
//! (family, version, resource id) and attributes (`nlattr`: length, type,
//! payload, padded to 4 bytes), as in `linux/netfilter/nfnetlink_conntrack.h`:
//!
//! ```text
//! CTA_TUPLE_ORIG  { CTA_TUPLE_IP { CTA_IP_V4_SRC, CTA_IP_V4_DST },
//!                   CTA_TUPLE_PROTO { CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT } }
//! CTA_TUPLE_REPLY { ... the same ... }
//! CTA_PROTOINFO   { CTA_PROTOINFO_TCP { CTA_PROTOINFO_TCP_STATE } }
//! CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY { CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES }
//! CTA_HELP        { CTA_HELP_NAME "sane\0" }
//! CTA_ID
//! ```
//!
//! Ports, counters and the ID are in network byte order. A NEW event carries
//! `NLM_F_CREATE | NLM_F_EXCL` in its header; an update event carries neither.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Multicast groups NFNLGRP_CONNTRACK_NEW (1), _UPDATE (2) and _DESTROY (3),
/// as the bind(2) group mask (bit n-1 for group n).
pub(crate) const EVENT_GROUPS: u32 = 0b111;

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
/// NFNL_SUBSYS_CTNETLINK, in the high byte of the message type.
const SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NFGENMSG_LEN: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_PROTOINFO: u16 = 4;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_MARK: u16 = 8;
const CTA_ID: u16 = 12;
const CTA_MARK_MASK: u16 = 21;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;
const CTA_HELP: u16 = 5;
const CTA_HELP_NAME: u16 = 1;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// One direction of a connection: source and destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
}

/// A TCP conntrack entry as one message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    /// The entry was destroyed (IPCTNL_MSG_CT_DELETE); otherwise it is new
    /// or changed.
    pub gone: bool,
    /// The message announces a new entry (a NEW event), not a change to one
    /// the listener may already know under the same tuple.
    pub created: bool,
    /// The kernel's ID of the entry (`CTA_ID`). It tells apart entries that
    /// exist at the same time, but it is a hash of the entry's address and
    /// original tuple, so a new entry that reuses a destroyed one's memory
    /// and tuple may get the same ID.
    pub id: Option<u32>,
    /// The original direction (as the first packet went).
    pub orig: Tuple,
    /// The reply direction: its source is where the connection was
    /// translated to.
    pub reply: Tuple,
    /// `enum tcp_conntrack` (3 = ESTABLISHED, 4..=8 = FIN_WAIT … CLOSE),
    /// when the message carries it.
    pub tcp_state: Option<u8>,
    /// Bytes of the original and the reply direction, when the message
    /// carries them (dumps, GET answers and destroy events, with
    /// `nf_conntrack_acct` on).
    pub bytes: Option<(u64, u64)>,
    /// The name of the entry's conntrack helper (`CTA_HELP_NAME`), when it
    /// has one and the message carries it.
    pub helper: Option<String>,
    /// The entry's ct mark (`CTA_MARK`), when the message carries it.
    pub mark: Option<u32>,
}

impl Conn {
    /// Whether the TCP state says a FIN or RST was seen (FIN_WAIT,
    /// CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE).
    pub fn finishing(&self) -> bool {
        self.tcp_state.is_some_and(|s| (4..=8).contains(&s))
    }
}

/// One netlink message, as far as the kernel backend cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A TCP conntrack entry (new, changed, destroyed, dumped or answered).
    Conn {
        /// The message's sequence number (0 for events).
        seq: u32,
        /// The entry.
        conn: Conn,
    },
    /// The end of a dump.
    Done {
        /// The request's sequence number.
        seq: u32,
    },
    /// An error answer to a request (`errno` is positive; 0 is an ack).
    Error {
        /// The request's sequence number.
        seq: u32,
        /// The error number.
        errno: i32,
    },
    /// Anything else: another protocol's entry, another message type, an
    /// entry with missing attributes.
    Other {
        /// The message's sequence number.
        seq: u32,
    },
}

impl Record {
    /// The sequence number of the message.
    pub(crate) fn seq(&self) -> u32 {
        match self {
            Record::Conn { seq, .. }
            | Record::Done { seq }
            | Record::Error { seq, .. }
            | Record::Other { seq } => *seq,
        }
    }
}

/// The messages in one datagram, in order. Stops at the first header that
/// does not fit the buffer.
pub fn parse(buf: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            break;
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let flags = u16::from_ne_bytes([rest[6], rest[7]]);
        let seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
        let body = &rest[NLMSG_HDRLEN..len];
        out.push(match kind {
            NLMSG_DONE => Record::Done { seq },
            NLMSG_ERROR => match body.get(..4) {
                Some(e) => Record::Error {
                    seq,
                    errno: i32::from_ne_bytes([e[0], e[1], e[2], e[3]]).saturating_neg(),
                },
                None => Record::Other { seq },
            },
            k if k >> 8 == SUBSYS_CTNETLINK
                && matches!(k & 0xff, IPCTNL_MSG_CT_NEW | IPCTNL_MSG_CT_DELETE) =>
            {
                match conn(body, k & 0xff == IPCTNL_MSG_CT_DELETE) {
                    Some(conn) => Record::Conn {
                        seq,
                        conn: Conn {
                            created: !conn.gone && flags & NLM_F_CREATE != 0,
                            ..conn
                        },
                    },
                    None => Record::Other { seq },
                }
            }
            _ => Record::Other { seq },
        });
        rest = rest.get(align(len)..).unwrap_or_default();
    }
    out
}

fn align(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// The attributes of `buf`, as (type without flags, payload). Stops at the
/// first attribute that does not fit.
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let head = rest.get(..4)?;
        let len = u16::from_ne_bytes([head[0], head[1]]) as usize;
        let kind = u16::from_ne_bytes([head[2], head[3]]) & NLA_TYPE_MASK;
        let payload = rest.get(4..len)?;
        rest = rest.get(align(len)..).unwrap_or_default();
        Some((kind, payload))
    })
}

fn attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

fn be16(p: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(p.get(..2)?.try_into().ok()?))
}

fn be32(p: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(p.get(..4)?.try_into().ok()?))
}

fn be64(p: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(p.get(..8)?.try_into().ok()?))
}

/// A conntrack message's body (after the header): TCP entries only.
fn conn(body: &[u8], gone: bool) -> Option<Conn> {
    let attributes = body.get(NFGENMSG_LEN..)?;
    let orig = tuple(attr(attributes, CTA_TUPLE_ORIG)?)?;
    let reply = tuple(attr(attributes, CTA_TUPLE_REPLY)?)?;
    let tcp_state = attr(attributes, CTA_PROTOINFO)
        .and_then(|p| attr(p, CTA_PROTOINFO_TCP))
        .and_then(|t| attr(t, CTA_PROTOINFO_TCP_STATE))
        .and_then(|s| s.first().copied());
    let counter = |kind| attr(attributes, kind).and_then(|c| be64(attr(c, CTA_COUNTERS_BYTES)?));
    let bytes = counter(CTA_COUNTERS_ORIG).zip(counter(CTA_COUNTERS_REPLY));
    let id = attr(attributes, CTA_ID).and_then(be32);
    let helper = attr(attributes, CTA_HELP)
        .and_then(|h| attr(h, CTA_HELP_NAME))
        .map(|n| {
            let n = n.split(|b| *b == 0).next().unwrap_or_default();
            String::from_utf8_lossy(n).into_owned()
        });
    let mark = attr(attributes, CTA_MARK).and_then(be32);
    Some(Conn {
        gone,
        created: false,
        id,
        orig,
        reply,
        tcp_state,
        bytes,
        helper,
        mark,
    })
}

/// A CTA_TUPLE_* payload, if it is TCP.
fn tuple(buf: &[u8]) -> Option<Tuple> {
    let ip = attr(buf, CTA_TUPLE_IP)?;
    let proto = attr(buf, CTA_TUPLE_PROTO)?;
    if attr(proto, CTA_PROTO_NUM)?.first() != Some(&IPPROTO_TCP) {
        return None;
    }
    let sport = be16(attr(proto, CTA_PROTO_SRC_PORT)?)?;
    let dport = be16(attr(proto, CTA_PROTO_DST_PORT)?)?;
    let v4 = |p: &[u8]| -> Option<IpAddr> {
        let a: [u8; 4] = p.get(..4)?.try_into().ok()?;
        Some(Ipv4Addr::from(a).into())
    };
    let v6 = |p: &[u8]| -> Option<IpAddr> {
        let a: [u8; 16] = p.get(..16)?.try_into().ok()?;
        Some(Ipv6Addr::from(a).into())
    };
    let (src, dst) = match attr(ip, CTA_IP_V4_SRC) {
        Some(s) => (v4(s)?, v4(attr(ip, CTA_IP_V4_DST)?)?),
        None => (v6(attr(ip, CTA_IP_V6_SRC)?)?, v6(attr(ip, CTA_IP_V6_DST)?)?),
    };
    Some(Tuple {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
    })
}

/// Builds one nfnetlink message with nested attributes (shared with
/// `nftnl`).
pub(super) struct Builder(Vec<u8>);

impl Builder {
    fn new(msg: u16, flags: u16, seq: u32, family: u8) -> Builder {
        Builder::with_type((SUBSYS_CTNETLINK << 8) | msg, flags, seq, family, 0)
    }

    /// A message of netlink type `kind` (subsystem << 8 | message), whose
    /// nfgenmsg carries `family` and `res_id` (in network byte order).
    pub(super) fn with_type(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Builder {
        let mut b = Vec::with_capacity(128);
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, NFNETLINK_V0, resource id.
        b.extend_from_slice(&[family, 0]);
        b.extend_from_slice(&res_id.to_be_bytes());
        Builder(b)
    }

    /// One attribute, padded to 4 bytes.
    pub(super) fn put(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(align(self.0.len()), 0);
    }

    /// A nested attribute whose content `inner` writes.
    pub(super) fn nest(&mut self, kind: u16, inner: impl FnOnce(&mut Builder)) {
        let at = self.0.len();
        self.put(kind | NLA_F_NESTED, &[]);
        inner(self);
        let len = (self.0.len() - at) as u16;
        self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// The message, its length filled in.
    pub(super) fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

/// IPCTNL_MSG_CT_GET for the TCP entry whose original direction is `orig`:
/// the kernel answers with the entry (counters included) or ENOENT.
pub fn get_request(seq: u32, orig: Tuple) -> Vec<u8> {
    let mut b = Builder::new(
        IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST,
        seq,
        family_of(orig.src.ip()),
    );
    put_tuple(&mut b, CTA_TUPLE_ORIG, orig);
    b.finish()
}

fn family_of(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

/// A TCP tuple as the nested attribute `kind` (CTA_TUPLE_ORIG,
/// CTA_EXPECT_MASTER, ...).
fn put_tuple(b: &mut Builder, kind: u16, t: Tuple) {
    b.nest(kind, |b| {
        b.nest(CTA_TUPLE_IP, |b| match (t.src.ip(), t.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                b.put(CTA_IP_V4_SRC, &s.octets());
                b.put(CTA_IP_V4_DST, &d.octets());
            }
            (s, d) => {
                let v6 = |a: IpAddr| match a {
                    IpAddr::V4(a) => a.to_ipv6_mapped(),
                    IpAddr::V6(a) => a,
                };
                b.put(CTA_IP_V6_SRC, &v6(s).octets());
                b.put(CTA_IP_V6_DST, &v6(d).octets());
            }
        });
        b.nest(CTA_TUPLE_PROTO, |b| {
            b.put(CTA_PROTO_NUM, &[IPPROTO_TCP]);
            b.put(CTA_PROTO_SRC_PORT, &t.src.port().to_be_bytes());
            b.put(CTA_PROTO_DST_PORT, &t.dst.port().to_be_bytes());
        });
    });
}

/// NFNL_SUBSYS_CTNETLINK_EXP, in the high byte of the message type.
const SUBSYS_CTNETLINK_EXP: u16 = 2;
const IPCTNL_MSG_EXP_NEW: u16 = 0;
const IPCTNL_MSG_EXP_DELETE: u16 = 2;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const CTA_EXPECT_MASTER: u16 = 1;
const CTA_EXPECT_TUPLE: u16 = 2;
const CTA_EXPECT_MASK: u16 = 3;
const CTA_EXPECT_NAT: u16 = 10;
const CTA_EXPECT_FN: u16 = 11;
const CTA_EXPECT_NAT_DIR: u16 = 1;
const CTA_EXPECT_NAT_TUPLE: u16 = 2;

/// A conntrack expectation: the kernel admits one TCP connection from
/// `peer` (any source port) to `dst`, as RELATED to `master`, and forgets
/// the expectation at that connection.
///
/// The master must carry a conntrack helper (the kernel answers
/// EOPNOTSUPP otherwise), and the expectation lives for that helper's
/// policy timeout, whatever the request says: its owner deletes it at its
/// own timer ([`expect_delete_request`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expectation {
    /// A tuple of the master connection, in either direction.
    pub master: Tuple,
    /// The only address the connection may come from.
    pub peer: IpAddr,
    /// Where it goes (before any NAT).
    pub dst: SocketAddr,
    /// NAT like nf_nat_ftp's (`nat-follow-master`), if any.
    pub nat: Option<FollowMaster>,
}

/// `nat-follow-master`: the expected connection's source becomes the
/// destination address of the master's `!dir` tuple, and its destination
/// the source address of that tuple, at `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowMaster {
    /// The master's direction the expected connection goes in: `false` for
    /// ORIGINAL (addresses from the master's reply tuple), `true` for
    /// REPLY (from its original tuple).
    pub reply: bool,
    /// The destination port after NAT.
    pub port: u16,
}

impl Expectation {
    fn family(&self) -> u8 {
        family_of(self.peer)
    }

    /// The expected tuple: any source port.
    fn tuple(&self) -> Tuple {
        Tuple {
            src: SocketAddr::new(self.peer, 0),
            dst: self.dst,
        }
    }

    /// The mask: the source address exact, the source port any, the
    /// destination always exact.
    fn mask(&self) -> Tuple {
        let all = match self.peer {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::BROADCAST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from([0xff; 16])),
        };
        Tuple {
            src: SocketAddr::new(all, 0),
            dst: SocketAddr::new(all, u16::MAX),
        }
    }
}

/// IPCTNL_MSG_EXP_NEW (create, fail if it exists, ack) for `exp`.
///
/// ```text
/// CTA_EXPECT_MASTER { the master's tuple }
/// CTA_EXPECT_TUPLE  { peer:0 -> dst }
/// CTA_EXPECT_MASK   { ff..ff:0 -> ff..ff:65535 }
/// CTA_EXPECT_NAT    { CTA_EXPECT_NAT_DIR (be32), CTA_EXPECT_NAT_TUPLE { ::port -> ::0 } }
/// CTA_EXPECT_FN     "nat-follow-master"
/// ```
pub fn expect_new_request(seq: u32, exp: &Expectation) -> Vec<u8> {
    let kind = (SUBSYS_CTNETLINK_EXP << 8) | IPCTNL_MSG_EXP_NEW;
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let mut b = Builder::with_type(kind, flags, seq, exp.family(), 0);
    put_tuple(&mut b, CTA_EXPECT_MASTER, exp.master);
    put_tuple(&mut b, CTA_EXPECT_TUPLE, exp.tuple());
    put_tuple(&mut b, CTA_EXPECT_MASK, exp.mask());
    if let Some(nat) = exp.nat {
        let none = match exp.peer {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        b.nest(CTA_EXPECT_NAT, |b| {
            b.put(CTA_EXPECT_NAT_DIR, &u32::from(nat.reply).to_be_bytes());
            // Only the source port counts (the kernel's saved_proto).
            let t = Tuple {
                src: SocketAddr::new(none, nat.port),
                dst: SocketAddr::new(none, 0),
            };
            put_tuple(b, CTA_EXPECT_NAT_TUPLE, t);
        });
        b.put(CTA_EXPECT_FN, b"nat-follow-master\0");
    }
    b.finish()
}

/// IPCTNL_MSG_EXP_DELETE (ack) of the expectation for `exp`'s tuple:
/// ENOENT once a connection took it.
pub fn expect_delete_request(seq: u32, exp: &Expectation) -> Vec<u8> {
    let kind = (SUBSYS_CTNETLINK_EXP << 8) | IPCTNL_MSG_EXP_DELETE;
    let mut b = Builder::with_type(kind, NLM_F_REQUEST | NLM_F_ACK, seq, exp.family(), 0);
    put_tuple(&mut b, CTA_EXPECT_TUPLE, exp.tuple());
    b.finish()
}

/// IPCTNL_MSG_CT_GET with NLM_F_DUMP: every entry of every family, or
/// with `mark` only those whose ct mark has all of its bits (CTA_MARK and
/// CTA_MARK_MASK: the kernel's dump filter).
pub(crate) fn dump_request(seq: u32, mark: Option<u32>) -> Vec<u8> {
    let mut b = Builder::new(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, 0);
    if let Some(m) = mark {
        b.put(CTA_MARK, &m.to_be_bytes());
        b.put(CTA_MARK_MASK, &m.to_be_bytes());
    }
    b.finish()
}

/// A non-blocking `NETLINK_NETFILTER` socket registered with tokio.
pub(crate) struct Socket {
    /// Tokio's datagram socket type as the safe way to register the
    /// descriptor with the reactor (`AsyncFd`'s safe constructor is
    /// deprecated): only readiness, recv(2) and send(2) are used, which work
    /// alike for any datagram socket. Unconnected, a netlink socket sends
    /// to the kernel.
    sock: tokio::net::UnixDatagram,
    buf: Vec<u8>,
}

/// Events lost: the socket's receive buffer overflowed.
pub(crate) fn is_overflow(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::NOBUFS.raw_os_error())
}

impl Socket {
    /// A socket subscribed to `groups` (0 for one that only sends requests),
    /// with a receive buffer of `rcvbuf` bytes.
    pub(crate) fn open(groups: u32, rcvbuf: usize) -> io::Result<Socket> {
        Socket::from_fd(Socket::open_fd(groups, rcvbuf)?)
    }

    /// The bound descriptor [`Socket::open`] registers: made apart so that
    /// a thread in another network namespace can make it (no tokio needed).
    pub(crate) fn open_fd(groups: u32, rcvbuf: usize) -> io::Result<std::os::fd::OwnedFd> {
        use rustix::net::{netlink, AddressFamily, SocketFlags, SocketType};
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            Some(netlink::NETFILTER),
        )?;
        // Forced past rmem_max where allowed (CAP_NET_ADMIN), so that a
        // burst of events fits.
        if rustix::net::sockopt::set_socket_recv_buffer_size_force(&fd, rcvbuf).is_err() {
            rustix::net::sockopt::set_socket_recv_buffer_size(&fd, rcvbuf)?;
        }
        rustix::net::bind(&fd, &netlink::SocketAddrNetlink::new(0, groups))?;
        Ok(fd)
    }

    /// Registers a descriptor from [`Socket::open_fd`] with tokio.
    pub(crate) fn from_fd(fd: std::os::fd::OwnedFd) -> io::Result<Socket> {
        let sock = std::os::unix::net::UnixDatagram::from(fd);
        Ok(Socket {
            sock: tokio::net::UnixDatagram::from_std(sock)?,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends one request to the kernel.
    pub(crate) async fn send(&self, msg: &[u8]) -> io::Result<()> {
        self.sock.send(msg).await?;
        Ok(())
    }

    /// Waits for the next datagram and returns its messages.
    pub(crate) async fn recv(&mut self) -> io::Result<Vec<Record>> {
        let n = self.sock.recv(&mut self.buf).await?;
        Ok(parse(&self.buf[..n]))
    }

    /// The next datagram's messages, if one is queued.
    pub(crate) fn try_recv(&mut self) -> io::Result<Option<Vec<Record>>> {
        match self.sock.try_recv(&mut self.buf) {
            Ok(n) => Ok(Some(parse(&self.buf[..n]))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(src: &str, dst: &str) -> Tuple {
        Tuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
        }
    }

    /// A message the way the kernel sends an entry: header, nfgenmsg,
    /// tuples, protoinfo and, if given, counters.
    fn message(
        gone: bool,
        orig: Tuple,
        reply: Tuple,
        state: Option<u8>,
        bytes: Option<(u64, u64)>,
    ) -> Vec<u8> {
        event(gone, 0, None, orig, reply, state, bytes)
    }

    /// The same, with the header's flags and an ID (CTA_ID, last, as the
    /// kernel puts it after the counters).
    fn event(
        gone: bool,
        flags: u16,
        id: Option<u32>,
        orig: Tuple,
        reply: Tuple,
        state: Option<u8>,
        bytes: Option<(u64, u64)>,
    ) -> Vec<u8> {
        let msg = if gone {
            IPCTNL_MSG_CT_DELETE
        } else {
            IPCTNL_MSG_CT_NEW
        };
        let mut b = Builder::new(msg, flags, 7, AF_INET);
        for (kind, tuple) in [(CTA_TUPLE_ORIG, orig), (CTA_TUPLE_REPLY, reply)] {
            let get = get_request(0, tuple);
            // The GET request's only attribute is the tuple, nested.
            let nested = &get[NLMSG_HDRLEN + NFGENMSG_LEN..];
            let inner = &nested[4..];
            b.nest(kind, |b| b.0.extend_from_slice(inner));
        }
        if let Some(s) = state {
            b.nest(CTA_PROTOINFO, |b| {
                b.nest(CTA_PROTOINFO_TCP, |b| b.put(CTA_PROTOINFO_TCP_STATE, &[s]))
            });
        }
        if let Some((o, r)) = bytes {
            for (kind, n) in [(CTA_COUNTERS_ORIG, o), (CTA_COUNTERS_REPLY, r)] {
                b.nest(kind, |b| {
                    b.put(1, &9u64.to_be_bytes());
                    b.put(CTA_COUNTERS_BYTES, &n.to_be_bytes());
                });
            }
        }
        if let Some(id) = id {
            b.put(CTA_ID, &id.to_be_bytes());
        }
        b.finish()
    }

    #[test]
    fn reads_the_helper_name() {
        let orig = t("10.71.2.1:50000", "10.71.2.2:21");
        let reply = t("10.71.2.2:21", "10.71.2.1:50000");
        let plain = event(false, 0, None, orig, reply, Some(3), None);
        // The same entry with CTA_HELP { CTA_HELP_NAME "sane\0" } appended.
        let mut b = Builder(plain.clone());
        b.nest(CTA_HELP, |b| b.put(CTA_HELP_NAME, b"sane\0"));
        let helped = b.finish();
        let helper = |buf: &[u8]| match parse(buf).as_slice() {
            [Record::Conn { conn, .. }] => conn.helper.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(helper(&plain), None);
        assert_eq!(helper(&helped).as_deref(), Some("sane"));
    }

    #[test]
    fn tells_a_new_entry_from_an_update_and_reads_its_id() {
        let orig = t("10.71.2.2:20", "10.71.2.1:41000");
        let reply = t("198.51.100.2:50000", "192.0.2.1:20");
        // The kernel's own batch when a SYN reuses a TIME_WAIT entry's tuple:
        // the old entry's destroy, then the new entry's NEW event.
        let mut buf = event(
            true,
            0,
            Some(0xdead_beef),
            orig,
            reply,
            Some(7),
            Some((1, 2)),
        );
        buf.extend(event(
            false,
            0x600,
            Some(0x0102_0304),
            orig,
            reply,
            Some(1),
            None,
        ));
        buf.extend(event(
            false,
            0,
            Some(0x0102_0304),
            orig,
            reply,
            Some(3),
            None,
        ));
        let got: Vec<_> = parse(&buf)
            .into_iter()
            .map(|r| match r {
                Record::Conn { conn, .. } => (conn.gone, conn.created, conn.id),
                other => panic!("not an entry: {other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (true, false, Some(0xdead_beef)),
                (false, true, Some(0x0102_0304)),
                (false, false, Some(0x0102_0304)),
            ]
        );
        // An ID cut short is no ID; the entry is still read.
        let mut short = event(false, 0x600, None, orig, reply, Some(1), None);
        short.extend_from_slice(&6u16.to_ne_bytes());
        short.extend_from_slice(&CTA_ID.to_ne_bytes());
        short.extend_from_slice(&[1, 2, 0, 0]);
        let len = short.len() as u32;
        short[..4].copy_from_slice(&len.to_ne_bytes());
        let Record::Conn { conn, .. } = &parse(&short)[0] else {
            panic!("not an entry");
        };
        assert_eq!((conn.created, conn.id), (true, None));
    }

    #[test]
    fn parses_new_and_destroyed_entries() {
        let orig = t("198.51.100.2:50000", "192.0.2.1:40001");
        let reply = t("10.71.2.2:30000", "10.71.2.1:50000");
        let mut buf = message(false, orig, reply, Some(3), None);
        buf.extend(message(true, orig, reply, Some(7), Some((180, 9000))));
        let got = parse(&buf);
        assert_eq!(
            got,
            vec![
                Record::Conn {
                    seq: 7,
                    conn: Conn {
                        gone: false,
                        created: false,
                        id: None,
                        orig,
                        reply,
                        tcp_state: Some(3),
                        bytes: None,
                        helper: None,
                        mark: None,
                    }
                },
                Record::Conn {
                    seq: 7,
                    conn: Conn {
                        gone: true,
                        created: false,
                        id: None,
                        orig,
                        reply,
                        tcp_state: Some(7),
                        bytes: Some((180, 9000)),
                        helper: None,
                        mark: None,
                    }
                },
            ]
        );
        let Record::Conn { conn, .. } = &got[1] else {
            unreachable!()
        };
        assert!(conn.finishing());
    }

    #[test]
    fn parses_ipv6_and_skips_other_protocols() {
        let orig = t("[2001:db8:100::2]:50000", "[2001:db8::1]:40001");
        let reply = t("[fd71:2::2]:30000", "[fd71:2::1]:50000");
        let buf = message(false, orig, reply, None, None);
        let Record::Conn { conn, .. } = &parse(&buf)[0] else {
            panic!("not an entry: {:?}", parse(&buf));
        };
        assert_eq!((conn.orig, conn.reply, conn.tcp_state), (orig, reply, None));
        assert!(!conn.finishing());
        // The same entry as UDP (protocol 17) is not ours.
        let mut udp = buf.clone();
        let at = udp
            .windows(5)
            .position(|w| w == [5, 0, 1, 0, IPPROTO_TCP])
            .unwrap();
        udp[at + 4] = 17;
        assert_eq!(parse(&udp), vec![Record::Other { seq: 7 }]);
    }

    #[test]
    fn parses_done_and_errors() {
        let mut buf = Vec::new();
        for (kind, extra) in [
            (NLMSG_ERROR, (-2i32).to_ne_bytes().to_vec()),
            (NLMSG_DONE, 0i32.to_ne_bytes().to_vec()),
        ] {
            buf.extend(((NLMSG_HDRLEN + extra.len()) as u32).to_ne_bytes());
            buf.extend(kind.to_ne_bytes());
            buf.extend(0u16.to_ne_bytes());
            buf.extend(5u32.to_ne_bytes());
            buf.extend(0u32.to_ne_bytes());
            buf.extend(extra);
        }
        assert_eq!(
            parse(&buf),
            vec![Record::Error { seq: 5, errno: 2 }, Record::Done { seq: 5 }]
        );
    }

    #[test]
    fn truncated_and_garbled_messages_never_panic() {
        let orig = t("198.51.100.2:50000", "192.0.2.1:40001");
        let reply = t("10.71.2.2:30000", "10.71.2.1:50000");
        let full = message(true, orig, reply, Some(7), Some((180, 9000)));
        // Every truncation: no panic, and no entry from a cut-off message.
        for cut in 0..full.len() {
            let got = parse(&full[..cut]);
            assert!(got.is_empty(), "cut at {cut}: {got:?}");
        }
        // A header that claims less than the message: the body is cut at
        // the claimed length, so the reply counters (last) are never read.
        for claim in 0..full.len() as u32 {
            let mut short = full.clone();
            short[..4].copy_from_slice(&claim.to_ne_bytes());
            for r in parse(&short) {
                if let Record::Conn { conn, .. } = r {
                    assert_eq!(conn.bytes, None, "claim {claim}");
                }
            }
        }
        // Every byte flipped in turn, and attribute lengths of 0..=255:
        // whatever comes out, nothing panics.
        for i in 0..full.len() {
            for v in [0u8, 1, 3, 4, 0x7f, 0xff] {
                let mut bad = full.clone();
                bad[i] = v;
                let _ = parse(&bad);
            }
        }
        // Pseudo-random bytes.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in 0..512 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = parse(&junk);
        }
    }

    #[test]
    fn parses_the_fuzz_seeds_built_independently() {
        // fuzz/seeds.py builds these with its own encoder.
        let seed = include_bytes!("../../fuzz/seeds/ctnetlink/update_destroy_v6");
        let orig = t("[2001:db8:100::2]:50001", "[2001:db8::1]:40002");
        let reply = t("[fd71:2::2]:30000", "[fd71:2::1]:50001");
        let conn = |gone, tcp_state, bytes| Record::Conn {
            seq: 0,
            conn: Conn {
                gone,
                created: false,
                id: None,
                orig,
                reply,
                tcp_state,
                bytes,
                helper: None,
                mark: None,
            },
        };
        assert_eq!(
            parse(seed),
            vec![
                conn(false, Some(4), None),
                conn(true, Some(7), Some((180, 1_050_000)))
            ]
        );
        let seed = include_bytes!("../../fuzz/seeds/ctnetlink/dump_done");
        let got = parse(seed);
        assert!(matches!(got[0], Record::Conn { seq: 9, .. }), "{got:?}");
        assert_eq!(got[1], Record::Done { seq: 9 });
        let seed = include_bytes!("../../fuzz/seeds/ctnetlink/reuse_destroy_new_v4");
        let orig = t("10.71.2.2:20", "10.71.2.1:41000");
        let reply = t("198.51.100.2:50000", "192.0.2.1:20");
        let entry = |gone, created, tcp_state, bytes| Record::Conn {
            seq: 0,
            conn: Conn {
                gone,
                created,
                id: Some(0xdead_beef),
                orig,
                reply,
                tcp_state,
                bytes,
                helper: None,
                mark: None,
            },
        };
        assert_eq!(
            parse(seed),
            vec![
                entry(true, false, Some(7), Some((1_050_000, 180))),
                entry(false, true, Some(1), None)
            ]
        );
        let seed = include_bytes!("../../fuzz/seeds/ctnetlink/error_enoent");
        assert_eq!(parse(seed), vec![Record::Error { seq: 4, errno: 2 }]);
    }

    #[test]
    fn get_request_carries_the_original_tuple() {
        let orig = t("[2001:db8:100::2]:50000", "[2001:db8::1]:40001");
        let req = get_request(9, orig);
        assert_eq!(
            u32::from_ne_bytes(req[..4].try_into().unwrap()) as usize,
            req.len()
        );
        assert_eq!(
            u16::from_ne_bytes([req[4], req[5]]),
            (SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
        );
        let attributes = &req[NLMSG_HDRLEN + NFGENMSG_LEN..];
        assert_eq!(tuple(attr(attributes, CTA_TUPLE_ORIG).unwrap()), Some(orig));
        assert_eq!(dump_request(3, None).len(), NLMSG_HDRLEN + NFGENMSG_LEN);
        let filtered = dump_request(3, Some(0x1000_0000));
        let attributes = &filtered[NLMSG_HDRLEN + NFGENMSG_LEN..];
        assert_eq!(attr(attributes, CTA_MARK), Some(&[0x10, 0, 0, 0][..]));
        assert_eq!(attr(attributes, CTA_MARK_MASK), Some(&[0x10, 0, 0, 0][..]));
    }
}
