//! Pure FTP wire handling: line framing, Telnet decoding and the
//! re-serialisation of checked lines, command and reply parsing, and the
//! formatting used when the gateway rewrites PORT/EPRT/227/229.
//!
//! Nothing here does I/O or panics on wire data. Addresses and ports are
//! checked inside the parsers (octets ≤ 255, ports 1–65535).

pub(crate) mod command;
pub(crate) mod framer;
pub(crate) mod reply;
pub(crate) mod rewrite;
pub(crate) mod telnet;

pub use command::{parse_command, Command, CommandError, EpsvParam, ParsedCommand};
pub use framer::{FrameError, Framer, Line, MAX_LINE};
pub use reply::{parse_227, parse_229, parse_reply_line, ReplyLine, ReplyPos, ReplyTracker};
pub use telnet::{CheckedCommand, CheckedReply, LineFault, Signals};
