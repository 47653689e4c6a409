//! Client commands (RFC 959 §4.1, RFC 2428, RFC 2228).

use std::net::{SocketAddr, SocketAddrV4};

/// The protocol argument of EPSV — RFC 2428 §3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpsvParam {
    /// `EPSV`
    Any,
    /// `EPSV 1`
    V4,
    /// `EPSV 2`
    V6,
    /// `EPSV ALL`
    All,
    /// `EPSV <n>` for another network protocol number.
    Unknown(u32),
}

/// A client command the gateway understands; everything else is `Other`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `PORT h1,h2,h3,h4,p1,p2` — RFC 959 §4.1.2.
    Port(SocketAddrV4),
    /// `EPRT |1|132.235.1.2|6275|` — RFC 2428 §2.
    Eprt(SocketAddr),
    /// `PASV`
    Pasv,
    /// `EPSV [1|2|ALL]`
    Epsv(EpsvParam),
    /// `LPRT ...` (RFC 1639) — refused by the gateway.
    Lprt,
    /// `LPSV` (RFC 1639) — refused by the gateway.
    Lpsv,
    /// `AUTH <mechanism>` — RFC 2228 / RFC 4217, mechanism as sent.
    Auth(String),
    /// `CCC`
    Ccc,
    /// `PBSZ <n>`
    Pbsz,
    /// `PROT <level>`
    Prot,
    /// `USER <name>`, kept for logs.
    User(String),
    /// `ABOR`
    Abor,
    /// `QUIT`
    Quit,
    /// `REIN`
    Rein,
    /// A command that uses a data connection: RETR, STOR, STOU, APPE, LIST,
    /// NLST, MLSD. The argument (path) is in [`ParsedCommand::arg`].
    Transfer,
    /// Any other command; forwarded as it is.
    Other,
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCommand<'a> {
    /// The verb, as sent (compare with `eq_ignore_ascii_case`).
    pub verb: &'a str,
    /// Everything after the first space, terminator removed; may be empty.
    pub arg: &'a [u8],
    /// What it is.
    pub command: Command,
}

/// Why a command line could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Empty line, or a verb that is not 1–16 ASCII letters.
    #[error("malformed command line")]
    Malformed,
    /// A known verb with an argument that does not parse (octet > 255,
    /// port 0, missing or extra fields, overlong numbers, stray bytes).
    #[error("{verb}: {reason}")]
    BadArgument {
        /// The verb, upper case.
        verb: &'static str,
        /// What was wrong, for the reply text and the log.
        reason: &'static str,
    },
}

/// Parses one line's text (terminator and Telnet sequences already removed,
/// see [`crate::ftp::Line::text`]).
pub fn parse_command(text: &[u8]) -> Result<ParsedCommand<'_>, CommandError> {
    let _ = text;
    unimplemented!()
}
