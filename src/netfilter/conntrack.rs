//! The kernel's connection tracking table over netlink: one socket
//! subscribed to its events, one for requests (a dump of the table, one
//! entry by its original tuple).

use super::ctnetlink::{self, Conn, Expectation, Record, Socket, Tuple};
use std::io;
use std::time::Duration;

/// Turns on conntrack events (0 off, 1 on, 2 on while someone listens).
const EVENTS: &str = "/proc/sys/net/netfilter/nf_conntrack_events";
/// Room for a burst of events (forced past `rmem_max` where allowed).
const EVENT_BUFFER: usize = 8 << 20;
/// Room for the answers to one request.
const REQUEST_BUFFER: usize = 1 << 20;
/// How long the kernel may take to answer one request.
const REQUEST_WAIT: Duration = Duration::from_secs(2);

/// The conntrack event and request sockets.
pub(crate) struct Netlink {
    events: Socket,
    requests: Socket,
    seq: u32,
    /// Only entries with one of these ct mark bits are read (`None`: all).
    mark: Option<u32>,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").field("seq", &self.seq).finish()
    }
}

impl Netlink {
    /// Turns conntrack events on if they are off, and subscribes to them:
    /// with `mark`, only to events of entries whose ct mark has all of its
    /// bits (a socket filter drops the rest in the kernel), and dumps read
    /// only those entries.
    pub(crate) async fn open(mark: Option<u32>) -> io::Result<Netlink> {
        let on = tokio::fs::read_to_string(EVENTS)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("{EVENTS}: {e}")))?;
        if on.trim() == "0" {
            tokio::fs::write(EVENTS, b"1")
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("cannot enable {EVENTS}: {e}")))?;
        }
        let events = Socket::open_fd(ctnetlink::EVENT_GROUPS, EVENT_BUFFER)?;
        if let Some(mark) = mark {
            socket2::SockRef::from(&events)
                .attach_filter(&mark_filter(mark))
                .map_err(|e| io::Error::new(e.kind(), format!("conntrack event filter: {e}")))?;
        }
        Ok(Netlink {
            events: Socket::from_fd(events)?,
            requests: Socket::open(0, REQUEST_BUFFER)?,
            seq: 0,
            mark,
        })
    }

    /// The socket the kernel's events arrive on.
    pub(crate) fn events(&mut self) -> &mut Socket {
        &mut self.events
    }

    /// Every TCP entry of the table.
    pub(crate) async fn dump(&mut self) -> io::Result<Vec<Conn>> {
        let seq = self.next_seq();
        let mut all = Vec::new();
        let msg = ctnetlink::dump_request(seq, self.mark);
        self.request(&msg, seq, |r| match r {
            Record::Conn { conn, .. } => {
                all.push(conn);
                Ok(false)
            }
            Record::Done { .. } => Ok(true),
            Record::Error { errno, .. } => Err(io::Error::from_raw_os_error(errno)),
            Record::Other { .. } => Ok(false),
        })
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("conntrack dump: {e}")))?;
        Ok(all)
    }

    /// The entry whose original tuple is `orig` now, with its counters, or
    /// `None` if there is none.
    pub(crate) async fn get(&mut self, orig: Tuple) -> io::Result<Option<Conn>> {
        let seq = self.next_seq();
        get(&mut self.requests, orig, seq).await
    }

    /// Sends `msg` (built for sequence number `seq`) and hands each answer
    /// to `take` until it says the answer is complete.
    async fn request(
        &mut self,
        msg: &[u8],
        seq: u32,
        take: impl FnMut(Record) -> io::Result<bool>,
    ) -> io::Result<()> {
        request(&mut self.requests, msg, seq, take).await
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }
}

/// Sends `msg` (built for sequence number `seq`) on `sock` and hands each
/// answer to `take` until it says the answer is complete.
async fn request(
    sock: &mut Socket,
    msg: &[u8],
    seq: u32,
    mut take: impl FnMut(Record) -> io::Result<bool>,
) -> io::Result<()> {
    sock.send(msg).await?;
    let answered = async {
        loop {
            for r in sock.recv().await? {
                // Late answers to an earlier request are not this one's.
                if r.seq() == seq && take(r)? {
                    return Ok(());
                }
            }
        }
    };
    tokio::time::timeout(REQUEST_WAIT, answered)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no answer")))
}

/// The entry with tuple `t` (either direction) now, as one
/// IPCTNL_MSG_CT_GET at `seq` on `sock` answers, or `None` if there is none.
async fn get(sock: &mut Socket, t: Tuple, seq: u32) -> io::Result<Option<Conn>> {
    let mut got = None;
    request(sock, &ctnetlink::get_request(seq, t), seq, |r| match r {
        Record::Conn { conn, .. } => {
            got = Some(conn);
            Ok(true)
        }
        Record::Error { errno: 0, .. } => Ok(true),
        Record::Error { errno, .. } if errno == rustix::io::Errno::NOENT.raw_os_error() => Ok(true),
        Record::Error { errno, .. } => Err(io::Error::from_raw_os_error(errno)),
        Record::Done { .. } | Record::Other { .. } => Ok(false),
    })
    .await?;
    Ok(got)
}

/// A classic BPF socket filter that passes a conntrack event only if its
/// top-level CTA_MARK has all of `mark`'s bits (as the dump filter). The kernel sends one event
/// per datagram, so the filter decides per event; an event of an entry
/// with no mark carries no CTA_MARK and is dropped.
///
/// ```text
/// ld #20                  ; after nlmsghdr (16) and nfgenmsg (4)
/// ldx #8                  ; CTA_MARK
/// ld #nlattr              ; A = offset of the attribute, 0 if none
/// jeq #0, drop
/// tax
/// ld [x + 4]              ; the mark (big-endian, as BPF loads)
/// and #mark
/// jeq #mark, pass, drop
/// drop: ret #0
/// pass: ret #-1
/// ```
pub(crate) fn mark_filter(mark: u32) -> Vec<socket2::SockFilter> {
    use socket2::SockFilter as F;
    const LD_IMM: u16 = 0x00;
    const LDX_IMM: u16 = 0x01;
    const LD_W_ABS: u16 = 0x20;
    const LD_W_IND: u16 = 0x40;
    const JEQ_K: u16 = 0x15;
    const AND_K: u16 = 0x54;
    const TAX: u16 = 0x07;
    const RET_K: u16 = 0x06;
    /// SKF_AD_OFF + SKF_AD_NLATTR.
    const NLATTR: u32 = (-0x1000i32 + 12) as u32;
    const CTA_MARK: u32 = 8;
    vec![
        F::new(LD_IMM, 0, 0, 20),
        F::new(LDX_IMM, 0, 0, CTA_MARK),
        F::new(LD_W_ABS, 0, 0, NLATTR),
        F::new(JEQ_K, 4, 0, 0),
        F::new(TAX, 0, 0, 0),
        F::new(LD_W_IND, 0, 0, 4),
        F::new(AND_K, 0, 0, mark),
        F::new(JEQ_K, 1, 0, mark),
        F::new(RET_K, 0, 0, 0),
        F::new(RET_K, 0, 0, u32::MAX),
    ]
}

/// The socket that creates and deletes the kernel backend's expectations,
/// one request at a time.
pub(crate) struct Expectations {
    sock: Socket,
    seq: u32,
}

impl std::fmt::Debug for Expectations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Expectations")
            .field("seq", &self.seq)
            .finish()
    }
}

impl Expectations {
    /// A request socket for expectations.
    pub(crate) fn open() -> io::Result<Expectations> {
        Ok(Expectations {
            sock: Socket::open(0, REQUEST_BUFFER)?,
            seq: 0,
        })
    }

    /// Creates `exp`: one message, answered with an ack or an error.
    pub(crate) async fn create(&mut self, exp: &Expectation) -> io::Result<()> {
        let seq = self.next_seq();
        match self
            .ack(&ctnetlink::expect_new_request(seq, exp), seq)
            .await?
        {
            0 => Ok(()),
            // The table is full, or the master has no helper: the caller
            // tells it by the errno.
            e if e == rustix::io::Errno::MFILE.raw_os_error()
                || e == rustix::io::Errno::NOSPC.raw_os_error()
                || e == rustix::io::Errno::OPNOTSUPP.raw_os_error() =>
            {
                Err(io::Error::from_raw_os_error(e))
            }
            e => {
                let err = io::Error::from_raw_os_error(e);
                Err(io::Error::new(
                    err.kind(),
                    format!("conntrack expectation {exp:?}: {err}"),
                ))
            }
        }
    }

    /// Deletes `exp` if it is still there (no connection took it): one
    /// message. Whether it was there.
    pub(crate) async fn delete(&mut self, exp: &Expectation) -> io::Result<bool> {
        let seq = self.next_seq();
        match self
            .ack(&ctnetlink::expect_delete_request(seq, exp), seq)
            .await?
        {
            0 => Ok(true),
            e if e == rustix::io::Errno::NOENT.raw_os_error() => Ok(false),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// The entry with tuple `t` (either direction), with its helper and
    /// mark, or `None` if there is no such entry. One IPCTNL_MSG_CT_GET.
    pub(crate) async fn entry(&mut self, t: Tuple) -> io::Result<Option<Conn>> {
        let seq = self.next_seq();
        get(&mut self.sock, t, seq).await
    }

    /// Sends `msg` (one request at `seq`) and waits for its answer: 0 for
    /// an ack, else the errno.
    async fn ack(&mut self, msg: &[u8], seq: u32) -> io::Result<i32> {
        let mut errno = 0;
        request(&mut self.sock, msg, seq, |r| match r {
            Record::Error { errno: e, .. } => {
                errno = e;
                Ok(true)
            }
            _ => Ok(false),
        })
        .await?;
        Ok(errno)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::ctnetlink::{
        expect_delete_request, expect_new_request, Expectation, FollowMaster,
    };
    use crate::netfilter::netns::Netns;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};

    /// The anchor: a conntrack helper whose parser never matches FTP text
    /// ("sane": an 8-byte binary request, then a binary reply), set on the
    /// control connections' first packet, so that they can be masters; and
    /// nat chains, so that the kernel's NAT hooks run.
    /// Port 2102 gets the kernel's FTP helper first, from a rule that runs
    /// before the anchor's (as an operator's rule may).
    const ANCHOR: &str = "table inet xp {
	ct helper anchor4 { type \"sane\" protocol tcp; l3proto ip; }
	ct helper ftp4 { type \"ftp\" protocol tcp; l3proto ip; }
	chain first {
		type filter hook output priority filter - 10; policy accept;
		ct state new tcp dport 2102 ct helper set \"ftp4\"
	}
	chain output {
		type filter hook output priority filter; policy accept;
		ct state new tcp dport { 2100, 2102 } ct mark set ct mark or 0x40000000 ct helper set \"anchor4\"
		ct state related counter
	}
	chain natout { type nat hook output priority -101; policy accept; }
	chain natpost { type nat hook postrouting priority srcnat - 1; policy accept; }
}
";

    /// The answer to the request with sequence number `seq`: 0 or an errno.
    async fn ack(sock: &mut Socket, seq: u32) -> i32 {
        let answer = async {
            loop {
                for r in sock.recv().await.expect("recv") {
                    if let Record::Error { seq: s, errno } = r {
                        if s == seq {
                            return errno;
                        }
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), answer)
            .await
            .expect("an answer")
    }

    fn bound(local: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&local.parse::<SocketAddr>().unwrap().into())?;
        s.connect_timeout(&to.into(), Duration::from_secs(3))?;
        Ok(s.into())
    }

    /// A passive data connection as an expectation of the gateway's
    /// control connection to the server: the client's connection to the
    /// announced port reaches the server's data port, from the gateway's
    /// address, RELATED, once; another peer and a second connection do
    /// not. A master without the anchor helper is refused.
    #[test]
    fn an_expectation_admits_one_related_connection_natted_like_the_helper() {
        let Some(ns) = Netns::new() else { return };
        for args in [
            &["link", "add", "d0", "type", "veth", "peer", "name", "d1"][..],
            &["link", "set", "d1", "up"],
            &["link", "set", "d0", "up"],
            &["link", "set", "lo", "up"],
        ] {
            let (ok, out) = ns.run("ip", args);
            assert!(ok, "ip {args:?}: {out}");
        }
        // gateway .1, server .2, client .3, another host .4
        for a in ["10.9.0.1/24", "10.9.0.2/24", "10.9.0.3/24", "10.9.0.4/24"] {
            assert!(ns.run("ip", &["addr", "add", a, "dev", "d0"]).0);
        }
        // The kernel's FTP helper is a module a host may lack.
        let probe = "table inet probe { ct helper h { type \"ftp\" protocol tcp; l3proto ip; }; }";
        if let (false, out) = ns.nft(&["-f", "-"], Some(probe)) {
            crate::netfilter::netns::skip(&format!(
                "the kernel's FTP helper (nf_conntrack_ftp) is not available: {}",
                out.trim()
            ));
            return;
        }
        let (ok, out) = ns.nft(&["-f", "-"], Some(ANCHOR));
        assert!(ok, "{out}");
        let path = ns.path();
        let result = std::thread::spawn(move || {
            use std::os::fd::AsFd;
            let f = std::fs::File::open(&path).unwrap();
            rustix::thread::move_into_link_name_space(
                f.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(flow())
        })
        .join()
        .expect("the test thread");
        let (answers, got, peer_seen, others, helpers) = result;
        // The anchor's helper on the master, none on the other connection,
        // and the FTP helper where a rule set it first.
        assert_eq!(
            helpers,
            [
                Some(Some("sane".to_owned())),
                Some(None),
                Some(Some("ftp".to_owned()))
            ]
        );
        let errno = |e: rustix::io::Errno| e.raw_os_error();
        // Created; the same again refused (NLM_F_EXCL); a master without
        // the helper refused; once taken, there is nothing to delete.
        assert_eq!(
            answers,
            [
                0,
                errno(rustix::io::Errno::EXIST),
                errno(rustix::io::Errno::OPNOTSUPP),
                errno(rustix::io::Errno::NOENT)
            ]
        );
        assert_eq!(got, b"data");
        assert_eq!(peer_seen.ip().to_string(), "10.9.0.1");
        assert_eq!(
            others.0.map(|_| ()).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionRefused)
        );
        assert_eq!(
            others.1.map(|_| ()).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionRefused)
        );
        let (_, listed) = ns.nft(&["list", "chain", "inet", "xp", "output"], None);
        assert!(
            listed.contains("ct state related counter packets 1 "),
            "{listed}"
        );
        let (_, expect) = ns.run("conntrack", &["-L", "expect"]);
        assert!(!expect.contains("dport=40001"), "{expect}");
    }

    type Flow = (
        [i32; 4],
        Vec<u8>,
        SocketAddr,
        (std::io::Result<TcpStream>, std::io::Result<TcpStream>),
        [Option<Option<String>>; 3],
    );

    /// Inside the namespace: control connections, expectations, data.
    async fn flow() -> Flow {
        let mut sock = Socket::open(0, 1 << 16).expect("ctnetlink");
        // The server's control port (anchored) and another port (not).
        let ctl = TcpListener::bind("10.9.0.2:2100").unwrap();
        let plain = TcpListener::bind("10.9.0.2:2101").unwrap();
        let ftp = TcpListener::bind("10.9.0.2:2102").unwrap();
        let data = TcpListener::bind("10.9.0.2:30000").unwrap();
        let master = bound("10.9.0.1:0", ctl.local_addr().unwrap()).unwrap();
        let unanchored = bound("10.9.0.1:0", plain.local_addr().unwrap()).unwrap();
        let tuple = |s: &TcpStream| ctnetlink::Tuple {
            src: s.local_addr().unwrap(),
            dst: s.peer_addr().unwrap(),
        };
        let exp = Expectation {
            master: tuple(&master),
            peer: "10.9.0.3".parse().unwrap(),
            dst: "10.9.0.1:40001".parse().unwrap(),
            nat: Some(FollowMaster {
                reply: false,
                port: 30000,
            }),
        };
        sock.send(&expect_new_request(1, &exp)).await.unwrap();
        let created = ack(&mut sock, 1).await;
        // A second expectation of the same tuple: refused.
        sock.send(&expect_new_request(2, &exp)).await.unwrap();
        let again = ack(&mut sock, 2).await;
        let other = Expectation {
            master: tuple(&unanchored),
            dst: "10.9.0.1:40002".parse().unwrap(),
            ..exp
        };
        sock.send(&expect_new_request(3, &other)).await.unwrap();
        let refused = ack(&mut sock, 3).await;
        // Another host first: no expectation for it, nothing listens.
        let foreign = bound("10.9.0.4:0", exp.dst);
        let mut conn = bound("10.9.0.3:0", exp.dst).expect("the expected connection");
        conn.write_all(b"data").unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let (mut accepted, from) = data.accept().unwrap();
        let mut got = Vec::new();
        accepted.read_to_end(&mut got).unwrap();
        let second = bound("10.9.0.3:0", exp.dst);
        // Taken: deleting it finds nothing.
        sock.send(&expect_delete_request(4, &exp)).await.unwrap();
        let deleted = ack(&mut sock, 4).await;
        let helped = bound("10.9.0.1:0", ftp.local_addr().unwrap()).unwrap();
        let mut exps = Expectations::open().expect("request socket");
        let mut helpers = Vec::new();
        for s in [&master, &unanchored, &helped] {
            helpers.push(
                exps.entry(tuple(s))
                    .await
                    .expect("CT_GET")
                    .map(|c| c.helper),
            );
        }
        (
            [created, again, refused, deleted],
            got,
            from,
            (foreign, second),
            helpers.try_into().unwrap(),
        )
    }
}

#[cfg(test)]
mod filter_tests {
    use super::*;
    use crate::netfilter::netns::{within, Netns};
    use std::net::{TcpListener, TcpStream};

    /// Marks connections to port 2100 only.
    const MARKS: &str = "table inet xp {
	chain output {
		type filter hook output priority filter; policy accept;
		ct state new tcp dport 2100 ct mark set ct mark | 0x10000000
	}
}
";

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The first entry event `netlink` reads (within 5 s), then a dump.
    async fn first_and_dump(netlink: &mut Netlink) -> (Conn, Vec<Conn>) {
        let first = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                for r in netlink.events().recv().await.expect("events") {
                    if let Record::Conn { conn, .. } = r {
                        return conn;
                    }
                }
            }
        })
        .await
        .expect("an event");
        let dumped = netlink.dump().await.expect("dump");
        (first, dumped)
    }

    /// The watcher's socket sees the events of marked entries only, and
    /// its dumps list marked entries only: an unmarked connection made
    /// first comes neither before the marked one's events nor in a dump.
    #[test]
    fn only_marked_entries_are_read() {
        let Some(ns) = Netns::new() else { return };
        let (ok, out) = ns.run("ip", &["link", "set", "lo", "up"]);
        assert!(ok, "{out}");
        let (ok, out) = ns.nft(&["-f", "-"], Some(MARKS));
        assert!(ok, "{out}");
        let (first, dumped) = within(ns.path(), || {
            runtime().block_on(async {
                let mut netlink = Netlink::open(Some(0x1000_0000)).await.expect("netlink");
                let plain = TcpListener::bind("127.0.0.1:2101").unwrap();
                let marked = TcpListener::bind("127.0.0.1:2100").unwrap();
                let _a = TcpStream::connect(plain.local_addr().unwrap()).unwrap();
                let _b = TcpStream::connect(marked.local_addr().unwrap()).unwrap();
                first_and_dump(&mut netlink).await
            })
        })
        .join()
        .expect("the namespace thread");
        assert_eq!(first.orig.dst.port(), 2100, "{first:?}");
        assert!(!dumped.is_empty());
        assert!(
            dumped.iter().all(|c| c.orig.dst.port() == 2100),
            "{dumped:?}"
        );
    }

    /// Under the gateway's own table, a control connection (socket mark)
    /// gets the ct mark but sends no events: the first event read is that of
    /// a connection marked after it by another rule (port 2100), and the
    /// control connection (port 2102) is in the marked dump.
    #[test]
    fn the_gateways_control_connections_send_no_events() {
        use crate::netfilter::table::{InterceptTable, DEFAULT_MARK};
        let Some(ns) = Netns::new() else { return };
        let (ok, out) = ns.run("ip", &["link", "set", "lo", "up"]);
        assert!(ok, "{out}");
        let (ok, out) = ns.nft(&["-f", "-"], Some(MARKS));
        assert!(ok, "{out}");
        let rt = runtime();
        let table = rt
            .block_on(InterceptTable::create_with_prefix("ftpgate_e", ns.prefix()))
            .expect("the gateway's table");
        let (first, dumped) = within(ns.path(), || {
            runtime().block_on(async {
                let mut netlink = Netlink::open(Some(DEFAULT_MARK)).await.expect("netlink");
                let control = TcpListener::bind("127.0.0.1:2102").unwrap();
                let sentinel = TcpListener::bind("127.0.0.1:2100").unwrap();
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                s.set_mark(DEFAULT_MARK).unwrap();
                s.connect(&control.local_addr().unwrap().into()).unwrap();
                let (mut accepted, _) = control.accept().unwrap();
                let mut ctl: TcpStream = s.into();
                std::io::Write::write_all(&mut ctl, b"USER x\r\n").unwrap();
                let mut got = [0u8; 8];
                std::io::Read::read_exact(&mut accepted, &mut got).unwrap();
                drop(ctl);
                drop(accepted);
                let _b = TcpStream::connect(sentinel.local_addr().unwrap()).unwrap();
                first_and_dump(&mut netlink).await
            })
        })
        .join()
        .expect("the namespace thread");
        rt.block_on(table.destroy()).expect("destroy");
        assert_eq!(first.orig.dst.port(), 2100, "{first:?}");
        assert!(
            dumped.iter().any(|c| c.orig.dst.port() == 2102),
            "the control connection is marked: {dumped:?}"
        );
    }
}
