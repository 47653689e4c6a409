//! Moving a relay's bytes when a leg carries TLS: splice cannot carry TLS
//! records, so the payload passes through user space, decrypted on one leg
//! and encrypted on the other.
//!
//! Both directions are polled at once until both have ended, so a leg is
//! read even while nothing is written to it: a TLS 1.3 server sends its
//! session tickets after the handshake, and the gateway takes them in
//! (for the next data connection's resumption) only by reading.
//!
//! Memory per direction is bounded by [`BUF_SIZE`] plus what rustls
//! buffers on a TLS leg: its outgoing buffer (64 KiB by default, rustls'
//! `set_buffer_limit`) and at most one incoming record (16 KiB plus its
//! overhead).

use super::meter::Meter;
use crate::pinhole::Activity;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::Counts;

/// A direction's buffer: the same size as the plain copy's, so a bulk
/// transfer moves in few records and syscalls.
pub(crate) const BUF_SIZE: usize = 128 * 1024;

/// One leg's connection: plain TCP, or TLS with the gateway as server
/// (client leg) or client (server leg).
pub(crate) enum DataStream {
    /// No TLS on this leg.
    Plain(TcpStream),
    /// TLS on this leg, either role.
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl DataStream {
    /// The TCP connection underneath, for resets.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            DataStream::Plain(s) => s,
            DataStream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for DataStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DataStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            DataStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for DataStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            DataStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            DataStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DataStream::Plain(s) => Pin::new(s).poll_flush(cx),
            DataStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DataStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            DataStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Copies both directions between `client` and `server` until both have
/// ended, keeping half-closes: EOF from one side (a TLS peer's
/// close_notify, or a plain peer's FIN) becomes close_notify (on a TLS
/// leg) then shutdown(write) toward the other. A TLS peer that closes its
/// TCP connection without close_notify has possibly been truncated: that
/// is an error, not an end of file. An error in either direction ends both.
/// Touches `activity` at every write, as the plain relay does.
pub(crate) async fn relay_streams<C, S>(
    client: &mut C,
    server: &mut S,
    activity: Option<&Activity>,
) -> (Counts, io::Result<()>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Direction::new(activity);
    let mut down = Direction::new(activity);
    let result = poll_fn(|cx| {
        // Both are polled each time, so each side is read while the other
        // is being written to.
        let up_done = up.poll(cx, &mut *client, &mut *server)?;
        let down_done = down.poll(cx, &mut *server, &mut *client)?;
        if up_done.is_ready() && down_done.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    let counts = Counts {
        to_client: down.meter.bytes,
        to_server: up.meter.bytes,
    };
    (counts, result)
}

/// One direction's state: its buffer (made when the copy starts, dropped
/// at the direction's end) and what is still to write.
struct Direction<'a> {
    buf: Option<Box<[u8]>>,
    pos: usize,
    len: usize,
    eof: bool,
    done: bool,
    /// Written since the last flush: a TLS stream may hold the tail of a
    /// record until flushed.
    unflushed: bool,
    meter: Meter<'a>,
}

impl<'a> Direction<'a> {
    fn new(activity: Option<&'a Activity>) -> Self {
        Direction {
            buf: None,
            pos: 0,
            len: 0,
            eof: false,
            done: false,
            unflushed: false,
            meter: Meter::new(activity),
        }
    }

    /// Moves what `src` has to `dst`; ready once `src` ended and `dst` was
    /// shut down.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, src: &mut R, dst: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pos == self.len && !self.eof {
                let buf = self
                    .buf
                    .get_or_insert_with(|| vec![0u8; BUF_SIZE].into_boxed_slice());
                let mut rb = ReadBuf::new(buf);
                match Pin::new(&mut *src).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        self.pos = 0;
                        self.len = n;
                        self.eof = n == 0;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing more to add to the record: send it.
                        if self.unflushed {
                            ready!(Pin::new(&mut *dst).poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.len {
                let buf = self.buf.as_deref().unwrap_or_default();
                let n = ready!(Pin::new(&mut *dst).poll_write(cx, &buf[self.pos..self.len]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.unflushed = true;
                self.meter.add(n);
            }
            if self.eof {
                self.buf = None;
                // Flushes, sends close_notify on a TLS leg, then FIN. A peer
                // already gone has nothing left to be told (as for the plain
                // relay's shutdown); had it gone early, the other
                // direction's read reports it.
                match ready!(Pin::new(&mut *dst).poll_shutdown(cx)) {
                    Err(e)
                        if !matches!(
                            e.kind(),
                            io::ErrorKind::NotConnected
                                | io::ErrorKind::BrokenPipe
                                | io::ErrorKind::ConnectionReset
                        ) =>
                    {
                        return Poll::Ready(Err(e))
                    }
                    _ => {}
                }
                tracing::trace!(bytes = self.meter.bytes, "relay direction ended");
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}
