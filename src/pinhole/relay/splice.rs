//! Zero-copy relay direction for Linux: socket → pipe → socket with
//! splice(2), so the payload stays in the kernel's pages and never enters
//! user space.
//!
//! The sockets stay non-blocking and owned by tokio: each splice runs inside
//! [`TcpStream::try_io`], so an `EAGAIN` clears tokio's readiness exactly as a
//! `try_read`/`try_write` would, and the task sleeps until the next edge.
//! The pipe is this direction's own and is always drained before the next
//! fill, so an `EAGAIN` on the fill means the socket is empty and one on the
//! drain means the socket's send buffer is full, never the pipe's state.
//! Filling while the pipe still holds bytes gains nothing measurable (README,
//! "Performance"): while `dst` is full, `src`'s receive buffer, autotuned to
//! megabytes, keeps taking the sender's bytes.

use super::meter::{write_all, Meter};
use rustix::fd::OwnedFd;
use rustix::pipe::{self, PipeFlags, SpliceFlags};
use std::io;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe capacity asked for with `F_SETPIPE_SZ`: each splice moves up to this
/// much. 1 MiB is the default `fs.pipe-max-size`, so an unprivileged process
/// gets it too; a refusal (size limit, per-user pipe quota) leaves the
/// kernel's default of 64 KiB, which still works, in more syscalls (in the
/// lab, 0.48 CPU s per GiB at 64 KiB and 0.42 at 256 KiB against 0.33).
pub(super) const PIPE_SIZE: usize = 1024 * 1024;

/// A direction starts with plain reads into a buffer this large, and makes
/// its pipe only once a read fills it: a listing, a small file or the
/// empty direction of a transfer (which only ever sees EOF) then ends
/// without a pipe, saving the pipe's creation, resizing, the splices into
/// and out of it, and its two closes.
pub(super) const HEAD_SIZE: usize = 16 * 1024;

/// How a spliced direction ended.
#[derive(Debug)]
pub(super) enum Spliced {
    /// The source reached EOF and everything read was written; `spliced` of
    /// those bytes went through the pipe (0 when the direction stayed
    /// below [`HEAD_SIZE`] per read).
    Eof { spliced: u64 },
    /// splice(2) is not available for these descriptors (no pipe could be
    /// made, or the kernel refused the call with `EINVAL`/`ENOSYS`/...).
    /// Every byte read so far was written: the caller goes on with the
    /// buffered copy from where this left off.
    Unsupported(io::Error),
}

/// Moves `src`'s bytes to `dst` until `src`'s EOF, adding each byte written
/// to `count`. Does not shut `dst` down: the caller does, as for the buffered
/// copy. Reads go through a [`HEAD_SIZE`] buffer until one fills it; then
/// the pipe is made, and closed when this returns or is dropped.
pub(super) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    count: &mut Meter<'_>,
) -> io::Result<Spliced> {
    if head(src, dst, count).await? {
        return Ok(Spliced::Eof { spliced: 0 });
    }
    let (pipe_r, pipe_w) = match new_pipe() {
        Ok(p) => p,
        Err(e) => return Ok(Spliced::Unsupported(e)),
    };
    let mut spliced = 0u64;
    let cap = pipe::fcntl_getpipe_size(&pipe_w).unwrap_or(PIPE_SIZE);
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    loop {
        // Fill: the pipe is empty here, so WouldBlock means `src` has nothing.
        let filled = loop {
            src.readable().await?;
            let res = src.try_io(Interest::READABLE, || {
                Ok(pipe::splice(src, None, &pipe_w, None, cap, flags)?)
            });
            match res {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if unsupported(&e) => return Ok(Spliced::Unsupported(e)),
                Err(e) => return Err(e),
            }
        };
        if filled == 0 {
            return Ok(Spliced::Eof { spliced });
        }
        // Drain: the pipe holds `left` bytes, so WouldBlock means `dst` is full.
        let mut left = filled;
        while left > 0 {
            dst.writable().await?;
            let res = dst.try_io(Interest::WRITABLE, || {
                Ok(pipe::splice(&pipe_r, None, dst, None, left, flags)?)
            });
            match res {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    left -= n;
                    count.add(n);
                    spliced += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if unsupported(&e) => {
                    // Hand what the pipe holds to the buffered copy's way of
                    // writing, so no byte already read is lost.
                    write_out(&pipe_r, dst, left, count).await?;
                    return Ok(Spliced::Unsupported(e));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Copies through a [`HEAD_SIZE`] buffer until `src`'s EOF (true) or until
/// a read fills the buffer (false: the rest is bulk, for the pipe).
///
/// A read shorter than the buffer drained the socket, so it clears tokio's
/// readiness (sampled before the read), as the control connection's reads
/// do: the next wait is for new bytes, not a recv that fails with EAGAIN.
async fn head(src: &TcpStream, dst: &TcpStream, count: &mut Meter<'_>) -> io::Result<bool> {
    src.readable().await?;
    let mut buf = vec![0u8; HEAD_SIZE];
    loop {
        let mut got = 0;
        let r = src.try_io(Interest::READABLE, || {
            got = src.try_read(&mut buf)?;
            if 0 < got && got < buf.len() {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        match r {
            _ if got > 0 => {
                write_all(dst, &buf[..got], count).await?;
                if got == buf.len() {
                    return Ok(false);
                }
            }
            Ok(()) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        src.readable().await?;
    }
}

/// A non-blocking pipe, enlarged to [`PIPE_SIZE`] when the kernel allows.
fn new_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
    // Best effort: a smaller pipe only costs more syscalls.
    let _ = pipe::fcntl_setpipe_size(&w, PIPE_SIZE);
    Ok((r, w))
}

/// Errors that say splice(2) cannot serve these descriptors at all, as
/// opposed to the connection failing.
fn unsupported(e: &io::Error) -> bool {
    let code = e.raw_os_error();
    [
        rustix::io::Errno::INVAL,
        rustix::io::Errno::NOSYS,
        rustix::io::Errno::OPNOTSUPP,
    ]
    .iter()
    .any(|errno| code == Some(errno.raw_os_error()))
}

/// Writes the `left` bytes still in the pipe to `dst` through user space.
async fn write_out(
    pipe_r: &OwnedFd,
    dst: &TcpStream,
    mut left: usize,
    count: &mut Meter<'_>,
) -> io::Result<()> {
    let mut buf = vec![0u8; left.min(PIPE_SIZE)];
    while left > 0 {
        let got = rustix::io::read(pipe_r, &mut buf)?;
        if got == 0 {
            break;
        }
        write_all(dst, &buf[..got], count).await?;
        left = left.saturating_sub(got);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;
    use std::hash::Hasher;
    use std::net::Ipv4Addr;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let (outer, inner) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (outer.unwrap(), inner.unwrap().0)
    }

    fn digest(bytes: &[u8]) -> u64 {
        let mut h = DefaultHasher::new();
        h.write(bytes);
        h.finish()
    }

    /// Sends `len` bytes through `pump` to a reader behind small socket
    /// buffers; returns how the pump ended, the count it kept, and what the
    /// reader got against what was sent, as (length, digest) pairs.
    async fn through_pump(len: usize) -> (Spliced, u64, (usize, u64), (usize, u64)) {
        let (mut writer, src) = pair().await;
        let (dst, mut reader) = pair().await;
        socket2::SockRef::from(&dst)
            .set_send_buffer_size(16 * 1024)
            .unwrap();
        socket2::SockRef::from(&reader)
            .set_recv_buffer_size(16 * 1024)
            .unwrap();
        let sent: Vec<u8> = (0..len)
            .map(|i: usize| (i.wrapping_mul(7) ^ (i >> 9)) as u8)
            .collect();
        let want = (sent.len(), digest(&sent));
        let write = tokio::spawn(async move {
            writer.write_all(&sent).await?;
            writer.shutdown().await
        });
        let read = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = reader.read(&mut chunk).await?;
                if n == 0 {
                    return io::Result::Ok(got);
                }
                got.extend_from_slice(&chunk[..n]);
            }
        });
        let mut count = Meter::default();
        let ended = tokio::time::timeout(Duration::from_secs(30), pump(&src, &dst, &mut count))
            .await
            .expect("stuck")
            .expect("pump failed");
        write.await.unwrap().unwrap();
        drop(dst);
        let got = read.await.unwrap().unwrap();
        (ended, count.bytes, (got.len(), digest(&got)), want)
    }

    /// The splice path itself (no fallback) carries a transfer to a reader
    /// much slower than the writer, through small socket buffers, so the
    /// drain meets a full send buffer again and again.
    #[tokio::test]
    async fn splices_to_a_slow_reader_through_small_buffers() {
        let len = 3 * 1024 * 1024 + 17;
        let (ended, count, got, want) = through_pump(len).await;
        let Spliced::Eof { spliced } = ended else {
            panic!("{ended:?}");
        };
        assert!(spliced > (len / 2) as u64, "only {spliced} bytes spliced");
        assert_eq!(count, len as u64);
        assert_eq!(got, want);
    }

    /// A listing-sized transfer, or none at all, never needs the pipe: the
    /// bytes arrive in reads shorter than the head buffer.
    #[tokio::test]
    async fn small_transfers_go_without_a_pipe() {
        for len in [0, 1, 3_000, HEAD_SIZE / 2] {
            let (ended, count, got, want) = through_pump(len).await;
            assert!(
                matches!(ended, Spliced::Eof { spliced: 0 }),
                "{len} bytes: {ended:?}"
            );
            assert_eq!(count, len as u64, "{len} bytes");
            assert_eq!(got, want, "{len} bytes");
        }
    }

    #[test]
    fn only_errors_of_the_call_itself_mean_unsupported() {
        let cases = [
            (rustix::io::Errno::INVAL, true),
            (rustix::io::Errno::NOSYS, true),
            (rustix::io::Errno::OPNOTSUPP, true),
            (rustix::io::Errno::CONNRESET, false),
            (rustix::io::Errno::PIPE, false),
            (rustix::io::Errno::AGAIN, false),
        ];
        for (errno, want) in cases {
            assert_eq!(unsupported(&errno.into()), want, "{errno:?}");
        }
    }
}
