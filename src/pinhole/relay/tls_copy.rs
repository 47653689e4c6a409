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
//!
//! A TLS peer's TCP FIN without close_notify is a possible truncation,
//! and fails the transfer, except in two cases where nothing the transfer
//! carries can have been cut, provided it came right after a whole record:
//! - it ends the client's direction (an upload's data, or nothing): the
//!   server gets every byte, then the same end (FIN, no close_notify), and
//!   judges it as it would the client's own (ProFTPD 1.3.8 answers 226,
//!   vsftpd 3.0.3 on OpenSSL 3 answers 426);
//! - it ends the server's direction after the client's direction ended and
//!   before any byte came that way: the server closing its side of an
//!   upload (libunftp does so); the client gets the same end.
//!
//! The gateway never sends a close_notify its peer did not send, so each
//! endpoint can still tell such an end from a clean one. Either case is
//! logged at info with the session id. A server that answers the first
//! case with an alert or a reset on its (empty) side judges the upload in
//! its final reply; that answer ends the relay without an error.

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
    Tls(Box<tokio_rustls::TlsStream<Records>>),
}

impl DataStream {
    /// The TCP connection underneath, for resets.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            DataStream::Plain(s) => s,
            DataStream::Tls(s) => &s.get_ref().0.tcp,
        }
    }

    /// Whether this TLS leg's peer closed its TCP connection (FIN) right
    /// after a whole record: nothing of a record was cut off.
    fn ended_on_record_boundary(&self) -> bool {
        match self {
            DataStream::Plain(_) => false,
            DataStream::Tls(s) => s.get_ref().0.ended_on_boundary(),
        }
    }

    /// Sends what is buffered, then a FIN with no close_notify: the end
    /// the peer on the other leg made, passed on unchanged.
    fn poll_shutdown_without_close_notify(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut *self).poll_flush(cx))?;
        socket2::SockRef::from(self.tcp()).shutdown(std::net::Shutdown::Write)?;
        Poll::Ready(Ok(()))
    }
}

/// A TLS leg's TCP connection, reading the record headers of what it
/// receives (5 bytes: type, version, length — RFC 8446 §5.1, RFC 5246
/// §6.2.1), to know whether the peer's FIN came between two records.
pub(crate) struct Records {
    tcp: TcpStream,
    /// Header bytes of the record being read, and how many came so far.
    header: [u8; 5],
    have: usize,
    /// Body bytes of the current record still to come.
    body_left: usize,
    /// The peer's FIN was read.
    eof: bool,
}

impl Records {
    /// Wraps a leg's connection before its handshake, so that every
    /// record is counted.
    pub(crate) fn new(tcp: TcpStream) -> Records {
        Records {
            tcp,
            header: [0; 5],
            have: 0,
            body_left: 0,
            eof: false,
        }
    }

    /// The peer's FIN came, and right after a whole record.
    fn ended_on_boundary(&self) -> bool {
        self.eof && self.have == 0 && self.body_left == 0
    }

    /// Follows the record framing over bytes just received.
    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 5 {
                self.have = 0;
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
            }
        }
    }
}

impl AsyncRead for Records {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.tcp).poll_read(cx, buf))?;
        let got = &buf.filled()[before..];
        if got.is_empty() && buf.remaining() > 0 {
            this.eof = true;
        }
        this.advance(got);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Records {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
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
/// is an error, not an end of file, except in the two cases of the
/// module's docs, passed on as they came and logged with `session`. An
/// error in either direction ends both. Touches `activity` at every
/// write, as the plain relay does.
pub(crate) async fn relay_streams(
    client: &mut DataStream,
    server: &mut DataStream,
    activity: Option<&Activity>,
    session: u64,
) -> (Counts, io::Result<()>) {
    let mut up = Direction::new(activity);
    up.fin_alone_passes = Some((session, "client"));
    let mut down = Direction::new(activity);
    let result = poll_fn(|cx| {
        // Both are polled each time, so each side is read while the other
        // is being written to.
        let up_done = up.poll(cx, &mut *client, &mut *server)?;
        if up.done && down.meter.bytes == 0 {
            down.fin_alone_passes = Some((session, "server"));
        }
        let down_done = match down.poll(cx, &mut *server, &mut *client) {
            // The server's answer to the client's end without
            // close_notify (OpenSSL sends a fatal alert): its verdict is
            // its final reply (vsftpd 426, ProFTPD 226); nothing of the
            // upload is at stake, and the client has stopped sending.
            Poll::Ready(Err(e)) if up.fin_alone && down.meter.bytes == 0 => {
                tracing::info!(
                    session,
                    "the server answered the upload's end without close_notify with: {e}"
                );
                down.done = true;
                Poll::Ready(())
            }
            other => other?,
        };
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
    /// Set where a TLS source's FIN without close_notify, on a record
    /// boundary, cannot have cut anything (the module's docs): it then
    /// ends this direction with the same end toward the destination. The
    /// session id and the source's side are for the log line.
    fin_alone_passes: Option<(u64, &'static str)>,
    /// The source ended that way.
    fin_alone: bool,
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
            fin_alone_passes: None,
            fin_alone: false,
            meter: Meter::new(activity),
        }
    }

    /// Moves what `src` has to `dst`; ready once `src` ended and `dst` was
    /// shut down.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut DataStream,
        dst: &mut DataStream,
    ) -> Poll<io::Result<()>> {
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
                    Poll::Ready(Err(e))
                        if e.kind() == io::ErrorKind::UnexpectedEof
                            && src.ended_on_record_boundary() =>
                    {
                        let Some((session, from)) = self.fin_alone_passes else {
                            return Poll::Ready(Err(e));
                        };
                        tracing::info!(
                            session,
                            from,
                            bytes = self.meter.bytes,
                            "TLS data connection ended without close_notify (TCP FIN after a whole record), where nothing can have been cut: passed on the same way"
                        );
                        self.fin_alone = true;
                        self.pos = 0;
                        self.len = 0;
                        self.eof = true;
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
                let shut = if self.fin_alone {
                    ready!(dst.poll_shutdown_without_close_notify(cx))
                } else {
                    ready!(Pin::new(&mut *dst).poll_shutdown(cx))
                };
                match shut {
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
