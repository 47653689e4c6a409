//! Splits a control stream into lines.

/// Longest line accepted, terminator included. RFC 959 commands are short;
/// this leaves room for long paths while bounding memory per session.
pub const MAX_LINE: usize = 4096;

/// One framed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The bytes exactly as received, terminator and Telnet sequences included,
    /// so that a line forwarded unchanged is byte-identical.
    pub raw: Vec<u8>,
}

impl Line {
    /// The line's text: terminator removed and Telnet IAC sequences stripped
    /// (`IAC IAC` becomes one 0xFF byte). This is what the parsers read.
    pub fn text(&self) -> Vec<u8> {
        unimplemented!()
    }
}

/// A framing violation: the session must be closed after a 500.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More than [`MAX_LINE`] bytes arrived without a line end.
    #[error("line longer than {0} bytes")]
    TooLong(usize),
}

/// Incremental line framer. Feed it any split of the stream; it yields the
/// same lines. Ends a line at LF (CRLF or bare LF). Keeps Telnet IAC
/// sequences (`IAC x`, `IAC WILL/WONT/DO/DONT x`) intact and never ends a
/// line inside one.
#[derive(Debug, Default)]
pub struct Framer {}

impl Framer {
    /// A framer with an empty buffer.
    pub fn new() -> Self {
        unimplemented!()
    }
    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        let _ = bytes;
        unimplemented!()
    }
    /// The next complete line: `Ok(None)` when more bytes are needed.
    pub fn next_line(&mut self) -> Result<Option<Line>, FrameError> {
        unimplemented!()
    }
    /// Takes the bytes buffered but not yet framed (used when the stream
    /// stops being parsed, e.g. after TLS starts, so nothing is lost).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        unimplemented!()
    }
}
