//! Moving a relay's bytes: both directions at once, each by splice(2)
//! where the kernel can, else through a buffer, with half-closes kept.

use super::meter::{write_all, Meter};
use crate::pinhole::Activity;
use std::io;
use tokio::net::TcpStream;

/// Size of a direction's buffer when the bytes are copied through user space
/// (no splice): large enough that a bulk transfer moves in few syscalls.
const BUF_SIZE: usize = 128 * 1024;

/// Bytes written to each side by [`relay`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Written to the client leg (downloads, listings).
    pub to_client: u64,
    /// Written to the server leg (uploads).
    pub to_server: u64,
}

/// How [`relay`] moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// splice(2) through a pipe per direction on Linux, so the payload never
    /// enters user space; where splice cannot serve the sockets, and on
    /// other systems, the same as [`DataPath::Buffered`].
    Splice,
    /// read(2) into a buffer per direction, then write(2).
    Buffered,
}

/// Copies both directions until both have seen EOF, keeping half-closes: EOF
/// from one side becomes shutdown(write) toward the other. An error in either
/// direction ends both. A direction's pipe or buffer is made when its first
/// byte (or its EOF) arrives, and freed when it ends.
pub async fn relay(
    client: &TcpStream,
    server: &TcpStream,
    path: DataPath,
) -> (Counts, io::Result<()>) {
    relay_metered(client, server, path, None).await
}

/// [`relay`], touching `activity` at every write, so that the session sees
/// its transfer move.
pub(super) async fn relay_metered(
    client: &TcpStream,
    server: &TcpStream,
    path: DataPath,
    activity: Option<&Activity>,
) -> (Counts, io::Result<()>) {
    let mut up = Meter::new(activity);
    let mut down = Meter::new(activity);
    let result = {
        let up = pump(client, server, path, &mut up);
        let down = pump(server, client, path, &mut down);
        tokio::try_join!(up, down).map(|_| ())
    };
    let counts = Counts {
        to_client: down.bytes,
        to_server: up.bytes,
    };
    (counts, result)
}

/// One direction of [`relay`], then the half-close.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    path: DataPath,
    count: &mut Meter<'_>,
) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    if path == DataPath::Splice {
        match super::splice::pump(src, dst, count).await? {
            super::splice::Spliced::Eof { spliced } => {
                tracing::trace!(bytes = count.bytes, spliced, "relay direction ended");
                return shutdown_write(dst);
            }
            super::splice::Spliced::Unsupported(e) => {
                tracing::debug!(error = %e, "splice unavailable; copying through a buffer");
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = path;
    copy(src, dst, count).await?;
    shutdown_write(dst)
}

/// The buffered copy, until `src`'s EOF.
async fn copy(src: &TcpStream, dst: &TcpStream, count: &mut Meter<'_>) -> io::Result<()> {
    src.readable().await?;
    let mut buf = vec![0u8; BUF_SIZE].into_boxed_slice();
    loop {
        src.readable().await?;
        let n = match src.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        write_all(dst, &buf[..n], count).await?;
    }
}

/// Passes an EOF on: FIN toward `dst`, which may still send.
fn shutdown_write(dst: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write) {
        // The other side is already fully closed; nothing to tell it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}
