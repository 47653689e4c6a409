//! What every way of moving a relay's bytes shares: counting them as they
//! are written, and writing a whole buffer to a non-blocking socket.

use crate::pinhole::Activity;
use std::io;
use tokio::net::TcpStream;

/// Bytes written in one direction of a relay, and the session's activity
/// to touch with each write.
#[derive(Debug, Default)]
pub(crate) struct Meter<'a> {
    /// Bytes written so far.
    pub(crate) bytes: u64,
    activity: Option<&'a Activity>,
}

impl<'a> Meter<'a> {
    pub(crate) fn new(activity: Option<&'a Activity>) -> Self {
        Meter { bytes: 0, activity }
    }

    /// `n` bytes were written just now.
    pub(crate) fn add(&mut self, n: usize) {
        self.bytes += n as u64;
        if let Some(a) = self.activity {
            a.touch();
        }
    }
}

/// Writes all of `bytes` to `dst`, adding each byte written to `count`.
pub(crate) async fn write_all(
    dst: &TcpStream,
    bytes: &[u8],
    count: &mut Meter<'_>,
) -> io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        dst.writable().await?;
        match dst.try_write(&bytes[sent..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                sent += n;
                count.add(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
