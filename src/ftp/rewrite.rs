//! Formatting of the lines the gateway writes itself. Each output parses back
//! with the parsers in this module to the same value.

use std::net::{SocketAddr, SocketAddrV4};

/// `PORT h1,h2,h3,h4,p1,p2\r\n`
pub fn port(addr: SocketAddrV4) -> Vec<u8> {
    let _ = addr;
    unimplemented!()
}
/// `EPRT |1|a.b.c.d|port|\r\n` or `EPRT |2|::1|port|\r\n`
pub fn eprt(addr: SocketAddr) -> Vec<u8> {
    let _ = addr;
    unimplemented!()
}
/// `227 Entering Passive Mode (h1,h2,h3,h4,p1,p2).\r\n`
pub fn reply_227(addr: SocketAddrV4) -> Vec<u8> {
    let _ = addr;
    unimplemented!()
}
/// `229 Entering Extended Passive Mode (|||port|)\r\n`
pub fn reply_229(port: u16) -> Vec<u8> {
    let _ = port;
    unimplemented!()
}
/// `<code> <text>\r\n`; CR and LF in `text` are replaced by spaces.
pub fn reply(code: u16, text: &str) -> Vec<u8> {
    let _ = (code, text);
    unimplemented!()
}
