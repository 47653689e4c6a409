//! Server replies (RFC 959 §4.2).

use std::net::SocketAddrV4;

/// One reply line, classified — RFC 959 §4.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyLine<'a> {
    /// `nnn text` — a single line, or the last line of a multi-line reply.
    Last {
        /// The reply code, 100–599.
        code: u16,
        /// The text after the separator.
        text: &'a [u8],
    },
    /// `nnn-text` — the first line of a multi-line reply.
    First {
        /// The reply code, 100–599.
        code: u16,
        /// The text after the separator.
        text: &'a [u8],
    },
    /// Any other line; valid only inside a multi-line reply.
    Text(&'a [u8]),
}

/// Classifies one line's text (terminator removed).
pub fn parse_reply_line(text: &[u8]) -> ReplyLine<'_> {
    let _ = text;
    unimplemented!()
}

/// Follows multi-line replies: a reply that opens with `nnn-` ends only at a
/// line starting `nnn ` with the same code (RFC 959 §4.2).
#[derive(Debug, Default, Clone)]
pub struct ReplyTracker {}

/// Where a line stands in the reply it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyPos {
    /// The line completes a reply with this code.
    End(u16),
    /// More lines of the reply with this code follow.
    Inside(u16),
    /// The line is not a reply line at all (no reply open, no code).
    Garbage,
}

impl ReplyTracker {
    /// Feeds one line's text and tells where it stands.
    pub fn push(&mut self, text: &[u8]) -> ReplyPos {
        let _ = text;
        unimplemented!()
    }
    /// True while a multi-line reply is open.
    pub fn in_multiline(&self) -> bool {
        unimplemented!()
    }
}

/// `227 Entering Passive Mode (192,0,2,1,156,64)` — RFC 959 §4.1.2, scanned as
/// RFC 1123 §4.1.2.6: the first digit after the code starts h1, parentheses
/// optional. `text` is the text after the code. Rejects octets > 255, port 0
/// and overlong numbers.
pub fn parse_227(text: &[u8]) -> Option<SocketAddrV4> {
    let _ = text;
    unimplemented!()
}

/// `229 Entering Extended Passive Mode (|||6446|)` — RFC 2428 §3, with any
/// delimiter in ASCII 33–126. `text` is the text after the code. Returns the port (1–65535).
pub fn parse_229(text: &[u8]) -> Option<u16> {
    let _ = text;
    unimplemented!()
}
