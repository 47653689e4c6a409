//! Where an intercepted control connection was going.

use socket2::SockRef;
use std::io;
use std::net::SocketAddr;
use tokio::net::TcpStream;

/// The server a transparent listener's client wanted.
///
/// With nftables `redirect`/`dnat`, conntrack remembers the original
/// destination (`SO_ORIGINAL_DST`). With `tproxy` nothing was rewritten and
/// the socket's local address *is* the original destination. A connection
/// made straight to the listener has neither, and is refused, since proxying
/// it would connect the gateway to itself.
pub(super) fn original_destination(
    stream: &TcpStream,
    listen: SocketAddr,
) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    let sock = SockRef::from(stream);
    let orig = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    let orig = match orig {
        Ok(a) => a.as_socket(),
        Err(_) => None,
    };
    let dest = match orig {
        Some(o) if o != local => o,
        // No NAT happened: a tproxy'd connection keeps its destination as
        // the local address.
        _ => local,
    };
    if dest == local && local.port() == listen.port() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no original destination: the connection was made to the listener itself",
        ));
    }
    Ok(SocketAddr::new(dest.ip().to_canonical(), dest.port()))
}
