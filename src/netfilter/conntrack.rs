//! The kernel's connection tracking table over netlink: one socket
//! subscribed to its events, one for requests (a dump of the table, one
//! entry by its original tuple).

use super::ctnetlink::{self, Conn, Record, Socket, Tuple};
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
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").field("seq", &self.seq).finish()
    }
}

impl Netlink {
    /// Turns conntrack events on if they are off, and subscribes to them.
    pub(crate) async fn open() -> io::Result<Netlink> {
        let on = tokio::fs::read_to_string(EVENTS)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("{EVENTS}: {e}")))?;
        if on.trim() == "0" {
            tokio::fs::write(EVENTS, b"1")
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("cannot enable {EVENTS}: {e}")))?;
        }
        Ok(Netlink {
            events: Socket::open(ctnetlink::EVENT_GROUPS, EVENT_BUFFER)?,
            requests: Socket::open(0, REQUEST_BUFFER)?,
            seq: 0,
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
        self.request(&ctnetlink::dump_request(seq), seq, |r| match r {
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
        let mut got = None;
        self.request(&ctnetlink::get_request(seq, orig), seq, |r| match r {
            Record::Conn { conn, .. } => {
                got = Some(conn);
                Ok(true)
            }
            Record::Error { errno: 0, .. } => Ok(true),
            Record::Error { errno, .. } if errno == rustix::io::Errno::NOENT.raw_os_error() => {
                Ok(true)
            }
            Record::Error { errno, .. } => Err(io::Error::from_raw_os_error(errno)),
            Record::Done { .. } | Record::Other { .. } => Ok(false),
        })
        .await?;
        Ok(got)
    }

    /// Sends `msg` (built for sequence number `seq`) and hands each answer
    /// to `take` until it says the answer is complete.
    async fn request(
        &mut self,
        msg: &[u8],
        seq: u32,
        mut take: impl FnMut(Record) -> io::Result<bool>,
    ) -> io::Result<()> {
        self.requests.send(msg).await?;
        let answered = async {
            loop {
                for r in self.requests.recv().await? {
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

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }
}
