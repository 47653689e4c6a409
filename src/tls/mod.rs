//! TLS for FTPS termination: the pieces that the control and data legs
//! are built from, with no FTP in them.
//!
//! - [`pem`]: a certificate chain and its key from PEM files, checked at
//!   load (errors name the file and the line of the bad block; a key that
//!   does not match the chain is refused), with the chain's expiry.
//! - [`store`]: the served certificate behind a lock, so a reload swaps it
//!   for new handshakes while established sessions carry on.
//! - [`server`]: the gateway as a TLS server toward the client, with
//!   session resumption scoped to one control session, and the check that
//!   a data connection resumed it (vsftpd's `require_ssl_reuse`).
//! - [`client`]: the gateway as a TLS client toward the server, verified
//!   against a CA file or the system roots (or an explicit, logged
//!   opt-out), with one resumption store per control session so every
//!   data connection resumes the gateway's own control session.
//!
//! The crypto provider is rustls' `ring` provider, named once here.

pub mod client;
pub mod pem;
pub mod server;
pub mod store;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;

/// The protocol versions both legs offer. TLS 1.2 stays because FTPS
/// servers in the field (and their session-reuse checks) still speak it.
pub(crate) static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The bound on one TLS handshake, on either leg, control or data; a peer
/// that stalls mid-handshake is cut off after it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The crypto provider: `ring`, so that no C toolchain beyond ring's own
/// small build is needed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether a finished handshake was a resumption, as rustls reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// A full handshake: no earlier session was resumed.
    Full,
    /// The peer resumed a session this endpoint issued earlier.
    Resumed,
}

impl Handshake {
    /// Reads the kind of a finished handshake. `None` (not finished) and
    /// a full handshake after a HelloRetryRequest both count as full.
    pub fn of(state: &rustls::CommonState) -> Handshake {
        match state.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => Handshake::Resumed,
            _ => Handshake::Full,
        }
    }
}

/// The negotiated version and cipher suite of one leg, for the session
/// log and the audit line, e.g. `TLSv1.3 TLS13_AES_256_GCM_SHA384`.
pub fn describe(state: &rustls::CommonState) -> String {
    let version = match state.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS?",
    };
    let suite = state
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("?");
    format!("{version} {suite}")
}
