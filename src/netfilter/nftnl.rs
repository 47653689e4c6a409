//! Element changes for the gateway's nftables table, written as nf_tables
//! netlink messages (what `nft` itself sends), so that a change costs the
//! gateway a `sendmsg` and a few `recv`s instead of a line for an `nft`
//! process to parse.
//!
//! One change is one batch, which the kernel applies whole or not at all:
//!
//! ```text
//! NFNL_MSG_BATCH_BEGIN (res_id NFNL_SUBSYS_NFTABLES)
//! NFT_MSG_NEWSETELEM / NFT_MSG_DELSETELEM (family inet), one per element:
//!   NFTA_SET_ELEM_LIST_TABLE "ftpgate"
//!   NFTA_SET_ELEM_LIST_SET   "pasv4"
//!   NFTA_SET_ELEM_LIST_ELEMENTS { NFTA_LIST_ELEM {
//!       NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE 0a000005 c6336407 9c410000 }
//!       NFTA_SET_ELEM_TIMEOUT 30000 (be64, milliseconds; adds only)
//!       NFTA_SET_ELEM_DATA { NFTA_DATA_VALUE ... } (maps, adds only) } }
//! NFNL_MSG_BATCH_END
//! ```
//!
//! That is `add element inet ftpgate pasv4 { 10.0.0.5 . 198.51.100.7 .
//! 40001 timeout 30000ms }`. In a concatenated key each field takes a
//! multiple of 4 bytes: an address its 4 or 16 bytes, a port 2 bytes in
//! network order and 2 zero bytes. Only the last element message asks for
//! an ack (NLM_F_ACK): once the batch has been run, the kernel sends an
//! error for each message that failed, in order, then that ack, so one
//! `recv` ends a batch that succeeded (an ack per message cost one `recv`
//! each).

use super::ctnetlink::{Builder, Record, Socket};
use super::element::Element;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = (NFNL_SUBSYS_NFTABLES << 8) | 12;
const NFT_MSG_DELSETELEM: u16 = (NFNL_SUBSYS_NFTABLES << 8) | 14;
const NFPROTO_INET: u8 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;

/// Receive buffer: every refused element message of a batch is answered
/// before the gateway reads any answer, one datagram each.
const RCVBUF: usize = 4 << 20;

/// One element change inside a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// `add element`: a no-op, old timeout kept, if the element exists.
    Add(Element, Duration),
    /// `delete element`: fails the transaction if the element is missing.
    Delete(Element),
}

impl Op {
    /// The element's set, or the error for an element that fits none.
    pub(crate) fn check(&self) -> io::Result<&'static str> {
        match self {
            Op::Add(e, _) | Op::Delete(e) => e.set(),
        }
    }
}

/// Key bytes of one concatenation: each field padded to 4 bytes.
#[derive(Default)]
struct Concat(Vec<u8>);

impl Concat {
    fn addr(mut self, a: IpAddr) -> Concat {
        match a {
            IpAddr::V4(a) => self.0.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => self.0.extend_from_slice(&a.octets()),
        }
        self
    }

    fn port(mut self, p: u16) -> Concat {
        self.0.extend_from_slice(&p.to_be_bytes());
        self.0.extend_from_slice(&[0, 0]);
        self
    }
}

/// An element as the kernel takes it: set, key and (for a map) data.
type Encoded = (&'static str, Vec<u8>, Option<Vec<u8>>);

/// The element's set, key and (for a map) data, laid out as the set's type
/// in `table_script` says.
fn encode(e: &Element) -> io::Result<Encoded> {
    let set = e.set()?;
    let c = Concat::default;
    let (key, data) = match *e {
        // pasv: ipv4_addr . ipv4_addr . inet_service
        Element::Passive {
            client,
            server,
            port,
        } => (c().addr(client).addr(server).port(port), None),
        // actv: ipv4_addr . inet_service : ipv4_addr
        Element::Active { client, source } => (
            c().addr(client.ip()).port(client.port()),
            Some(c().addr(source)),
        ),
        // once, claim: ipv4_addr . inet_service
        Element::Once { peer, port } | Element::Claim { dst: peer, port } => {
            (c().addr(peer).port(port), None)
        }
        // dnat: ipv4_addr . ipv4_addr . inet_service : ipv4_addr . inet_service
        Element::Dnat {
            peer,
            dst,
            port,
            to,
        } => (
            c().addr(peer).addr(dst).port(port),
            Some(c().addr(to.ip()).port(to.port())),
        ),
        // ksnat: ipv4_addr . ipv4_addr . inet_service : ipv4_addr
        Element::Snat { peer, to, source } => (
            c().addr(peer).addr(to.ip()).port(to.port()),
            Some(c().addr(source)),
        ),
    };
    Ok((set, key.0, data.map(|d| d.0)))
}

/// A NUL-terminated string attribute payload.
fn cstr(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

/// The datagram for one transaction on `table`: the batch begin at `seq`,
/// `ops[i]` at `seq + 1 + i`, the batch end after them.
pub(crate) fn batch(table: &str, ops: &[Op], seq: u32) -> io::Result<Vec<u8>> {
    let frame =
        |kind, seq| Builder::with_type(kind, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES).finish();
    let mut out = frame(NFNL_MSG_BATCH_BEGIN, seq);
    for (i, op) in ops.iter().enumerate() {
        let (e, timeout) = match *op {
            Op::Add(e, t) => (e, Some(t)),
            Op::Delete(e) => (e, None),
        };
        let (set, key, data) = encode(&e)?;
        let (kind, mut flags) = match timeout {
            Some(_) => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE),
            None => (NFT_MSG_DELSETELEM, NLM_F_REQUEST),
        };
        if i + 1 == ops.len() {
            flags |= NLM_F_ACK;
        }
        let at = seq.wrapping_add(1).wrapping_add(i as u32);
        let mut b = Builder::with_type(kind, flags, at, NFPROTO_INET, 0);
        b.put(NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
        b.put(NFTA_SET_ELEM_LIST_SET, &cstr(set));
        b.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
            b.nest(NFTA_LIST_ELEM, |b| {
                b.nest(NFTA_SET_ELEM_KEY, |b| b.put(NFTA_DATA_VALUE, &key));
                if let Some(t) = timeout {
                    // A zero timeout would mean "none".
                    let ms = t.as_millis().clamp(1, u64::MAX.into()) as u64;
                    b.put(NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
                }
                if let (Some(d), Some(_)) = (&data, timeout) {
                    b.nest(NFTA_SET_ELEM_DATA, |b| b.put(NFTA_DATA_VALUE, d));
                }
            });
        });
        out.extend(b.finish());
    }
    let end = seq.wrapping_add(1).wrapping_add(ops.len() as u32);
    out.extend(frame(NFNL_MSG_BATCH_END, end));
    Ok(out)
}

/// The kernel's answers to one batch, as they arrive: an error for each
/// refused op, in order, then the last op's answer (its ack, or its error).
#[derive(Debug)]
pub(crate) struct Answers {
    seq: u32,
    n: usize,
    /// The last op has been answered: every answer has arrived.
    last: bool,
    /// The first error: the op's index (`None` for the batch itself) and
    /// the errno.
    error: Option<(Option<usize>, i32)>,
}

impl Answers {
    /// Waiting for the answers to a batch of `n` ops that began at `seq`.
    pub(crate) fn new(seq: u32, n: usize) -> Answers {
        Answers {
            seq,
            n,
            last: false,
            error: None,
        }
    }

    /// Takes one message; anything not about this batch (an earlier batch's
    /// late answer, another message type) is ignored.
    pub(crate) fn take(&mut self, r: &Record) {
        let Record::Error { seq, errno } = *r else {
            return;
        };
        let at = seq.wrapping_sub(self.seq) as usize;
        let op = match at.checked_sub(1) {
            Some(i) if i < self.n => {
                self.last |= i + 1 == self.n;
                Some(i)
            }
            // The batch begin or end: only errors come back for these.
            _ if at == 0 || at == self.n + 1 => None,
            _ => return,
        };
        if errno != 0 && self.error.is_none() {
            self.error = Some((op, errno));
        }
    }

    /// The last op answered, or the batch refused as a whole.
    pub(crate) fn complete(&self) -> bool {
        self.last || self.error.is_some_and(|(op, _)| op.is_none())
    }

    /// The first error, if any.
    pub(crate) fn error(&self) -> Option<(Option<usize>, i32)> {
        self.error
    }
}

/// How long one batch may take before the socket is given up.
const BATCH_LIMIT: Duration = Duration::from_secs(5);

/// A `NETLINK_NETFILTER` socket that applies element changes; reopened
/// after it broke.
pub(crate) struct Netlink {
    /// The network namespace to open the socket in (`/run/netns/NAME`), or
    /// the gateway's own.
    netns: Option<PathBuf>,
    sock: Option<Socket>,
    seq: u32,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink")
            .field("netns", &self.netns)
            .field("open", &self.sock.is_some())
            .finish()
    }
}

impl Netlink {
    /// Opens the socket (in `netns` when given).
    pub(crate) fn open(netns: Option<PathBuf>) -> io::Result<Netlink> {
        let sock = open_socket(netns.as_deref())?;
        Ok(Netlink {
            netns,
            sock: Some(sock),
            seq: 1,
        })
    }

    /// Applies `ops` to `table` as one transaction.
    pub(crate) async fn apply(&mut self, table: &str, ops: &[Op]) -> io::Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let seq = self.seq;
        let msg = batch(table, ops, seq)?;
        self.seq = seq.wrapping_add(ops.len() as u32 + 2);
        let sock = match &mut self.sock {
            Some(s) => s,
            None => self.sock.insert(open_socket(self.netns.as_deref())?),
        };
        let answers =
            match tokio::time::timeout(BATCH_LIMIT, exchange(sock, &msg, seq, ops.len())).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    self.sock = None;
                    return Err(e);
                }
                Err(_) => {
                    self.sock = None;
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("nftables table inet {table}: no answer within {BATCH_LIMIT:?}"),
                    ));
                }
            };
        match answers.error() {
            None => Ok(()),
            Some((op, errno)) => {
                let err = io::Error::from_raw_os_error(errno);
                let what = match op.and_then(|i| ops.get(i)) {
                    Some(Op::Add(e, _)) => format!("add element {e:?}"),
                    Some(Op::Delete(e)) => format!("delete element {e:?}"),
                    None => "transaction".to_owned(),
                };
                Err(io::Error::new(
                    err.kind(),
                    format!("nftables table inet {table}: {what} refused: {err}"),
                ))
            }
        }
    }
}

/// Sends one batch and reads its answers. The kernel runs a batch inside
/// the `sendmsg`, so once one error has arrived, the rest are queued.
async fn exchange(sock: &mut Socket, msg: &[u8], seq: u32, n: usize) -> io::Result<Answers> {
    sock.send(msg).await?;
    let mut answers = Answers::new(seq, n);
    while !answers.complete() {
        let records = if answers.error().is_some() {
            match sock.try_recv()? {
                Some(r) => r,
                None => break,
            }
        } else {
            sock.recv().await?
        };
        for r in &records {
            answers.take(r);
        }
    }
    Ok(answers)
}

/// A socket in `netns`, made on a thread of its own that moves there (a
/// socket stays in the namespace it was made in).
fn open_socket(netns: Option<&Path>) -> io::Result<Socket> {
    let fd = match netns {
        None => Socket::open_fd(0, RCVBUF)?,
        Some(path) => {
            let path = path.to_owned();
            std::thread::spawn(move || {
                use std::os::fd::AsFd;
                let ns = std::fs::File::open(&path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
                Socket::open_fd(0, RCVBUF)
            })
            .join()
            .map_err(|_| io::Error::other("netns thread failed"))??
        }
    };
    Socket::from_fd(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One message: (type, flags, seq, nfgenmsg, attributes).
    type Msg = (u16, u16, u32, [u8; 4], Vec<u8>);

    /// The messages of a datagram.
    fn split(mut buf: &[u8]) -> Vec<Msg> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            let len = u32::from_ne_bytes(buf[..4].try_into().unwrap()) as usize;
            out.push((
                u16::from_ne_bytes([buf[4], buf[5]]),
                u16::from_ne_bytes([buf[6], buf[7]]),
                u32::from_ne_bytes(buf[8..12].try_into().unwrap()),
                buf[16..20].try_into().unwrap(),
                buf[20..len].to_vec(),
            ));
            buf = &buf[len..];
        }
        out
    }

    #[test]
    fn a_batch_is_framed_and_each_element_laid_out_as_its_set_type() {
        let dnat = Element::Dnat {
            peer: "198.51.100.2".parse().unwrap(),
            dst: "192.0.2.1".parse().unwrap(),
            port: 40001,
            to: "10.71.2.2:30000".parse().unwrap(),
        };
        let claim6 = Element::Claim {
            dst: "2001:db8::1".parse().unwrap(),
            port: 40001,
        };
        let ops = [
            Op::Add(dnat, Duration::from_millis(1500)),
            Op::Delete(claim6),
        ];
        let msgs = split(&batch("gw", &ops, 7).unwrap());
        assert_eq!(msgs.len(), 4);
        // Begin and end: res_id NFNL_SUBSYS_NFTABLES in network order.
        assert_eq!(
            (msgs[0].0, msgs[0].1, msgs[0].2, msgs[0].3),
            (0x10, 1, 7, [0, 0, 0, 10])
        );
        assert_eq!((msgs[3].0, msgs[3].2, msgs[3].3), (0x11, 10, [0, 0, 0, 10]));
        assert!(msgs[0].4.is_empty() && msgs[3].4.is_empty());
        // add element inet gw dnat4 { 198.51.100.2 . 192.0.2.1 . 40001 timeout 1500ms : 10.71.2.2 . 30000 }
        let (kind, flags, seq, nfg, attrs) = &msgs[1];
        assert_eq!(
            (*kind, *flags, *seq, *nfg),
            (0x0a0c, 0x401, 8, [1, 0, 0, 0])
        );
        let want: Vec<u8> = [
            &[7, 0, 1, 0][..],
            b"gw\0\0",
            &[10, 0, 2, 0],
            b"dnat4\0\0\0",
            &[56, 0, 3, 0x80],
            &[52, 0, 1, 0x80],
            &[20, 0, 1, 0x80],
            &[16, 0, 1, 0],
            &[198, 51, 100, 2, 192, 0, 2, 1, 0x9c, 0x41, 0, 0],
            &[12, 0, 4, 0],
            &1500u64.to_be_bytes(),
            &[16, 0, 2, 0x80],
            &[12, 0, 1, 0],
            &[10, 71, 2, 2, 0x75, 0x30, 0, 0],
        ]
        .concat();
        assert_eq!(attrs, &want);
        // delete element inet gw claim6 { 2001:db8::1 . 40001 }: key only.
        // The last op, the only one that asks for an ack.
        let (kind, flags, seq, _, attrs) = &msgs[2];
        assert_eq!((*kind, *flags, *seq), (0x0a0e, 0x5, 9));
        let mut key = "2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
            .to_vec();
        key.extend([0x9c, 0x41, 0, 0]);
        let tail = &attrs[attrs.len() - key.len()..];
        assert_eq!(tail, &key[..]);
        assert_eq!(attrs.len(), 8 + 12 + 4 + 4 + 4 + 4 + 20);
    }

    #[test]
    fn mixed_families_are_refused_before_anything_is_sent() {
        let bad = Element::Active {
            client: "[2001:db8::5]:50000".parse().unwrap(),
            source: "198.51.100.7".parse().unwrap(),
        };
        let err = batch("gw", &[Op::Delete(bad)], 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("mixes address families"), "{err}");
    }

    #[test]
    fn answers_complete_on_every_ack_or_a_refused_batch() {
        let ack = |seq, errno| Record::Error { seq, errno };
        // Ops at 11 and 12.
        let mut a = Answers::new(10, 2);
        a.take(&ack(3, 2)); // an earlier batch's: ignored
        a.take(&Record::Other { seq: 12 });
        assert!(!a.complete());
        a.take(&ack(12, 0));
        assert!(a.complete());
        assert_eq!(a.error(), None);
        // The first op refused: its error comes before the last op's ack.
        let mut a = Answers::new(10, 2);
        a.take(&ack(11, 17));
        assert!(!a.complete());
        a.take(&ack(12, 0));
        assert!(a.complete());
        assert_eq!(a.error(), Some((Some(0), 17)));
        // The last op refused too: the first error is kept.
        let mut a = Answers::new(10, 2);
        a.take(&ack(11, 17));
        a.take(&ack(12, 2));
        assert!(a.complete());
        assert_eq!(a.error(), Some((Some(0), 17)));
        // The batch itself refused (at its begin or end): complete at once.
        for seq in [10, 13] {
            let mut a = Answers::new(10, 2);
            a.take(&ack(seq, 22));
            assert!(a.complete());
            assert_eq!(a.error(), Some((None, 22)));
        }
        // Sequence numbers that wrap.
        let mut a = Answers::new(u32::MAX, 2);
        a.take(&ack(0, 0));
        assert!(!a.complete());
        a.take(&ack(1, 0));
        assert!(a.complete() && a.error().is_none());
    }
}
