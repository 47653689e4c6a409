//! The gateway as a TLS client toward the server.
//!
//! The server's chain is verified against a CA file or the system roots
//! with an expected name, or, on an explicit opt-out for lab servers, not
//! at all (logged). Each control session gets its own resumption store, so
//! the gateway's data connections resume the gateway's own control session
//! with the server, which strict servers (vsftpd `require_ssl_reuse`,
//! ProFTPD, FileZilla Server) require.
//!
//! System roots come from the operating system's store
//! (rustls-native-certs), not from a list compiled in: the operator's own
//! CA, installed with the system's tools, is then trusted without a
//! rebuild, and the list follows the system's updates.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionMemoryCache, Resumption};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::server::handshake;
use super::HANDSHAKE_TIMEOUT;

/// Sessions one control session's resumption store holds (TLS 1.3
/// tickets are kept per name, at most 8 by rustls): the control session's
/// and those its data connections are issued.
pub const RESUMPTION_STORE: usize = 16;

/// What the server's certificate is verified against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The CA certificates in a PEM file.
    CaFile(PathBuf),
    /// The operating system's root store.
    System,
    /// No verification at all: for self-signed lab servers only; logged.
    Insecure,
}

impl fmt::Display for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trust::CaFile(p) => write!(f, "CA file {}", p.display()),
            Trust::System => f.write_str("the system roots"),
            Trust::Insecure => f.write_str("nothing (insecure)"),
        }
    }
}

/// A listener's TLS client side toward its server.
#[derive(Debug, Clone)]
pub struct ClientTls {
    base: Arc<ClientConfig>,
    name: ServerName<'static>,
    trust: Trust,
}

impl ClientTls {
    /// Builds the client side: the roots are read once, here; `name` is
    /// the DNS name or IP address the server's certificate must carry.
    pub fn new(trust: Trust, name: &str) -> Result<ClientTls, String> {
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|_| format!("{name:?} is neither a DNS name nor an IP address"))?;
        let builder = ClientConfig::builder_with_provider(super::provider())
            .with_protocol_versions(super::VERSIONS)
            .map_err(|e| e.to_string())?;
        let config = match &trust {
            Trust::CaFile(path) => {
                let roots = roots(super::pem::load_certificates(path).map_err(|e| e.to_string())?);
                if roots.is_empty() {
                    return Err(format!("{}: no usable CA certificate", path.display()));
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Trust::System => {
                let found = rustls_native_certs::load_native_certs();
                let roots = roots(found.certs);
                if roots.is_empty() {
                    return Err(format!(
                        "the system root store has no usable CA certificate ({} error(s) reading it)",
                        found.errors.len()
                    ));
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Trust::Insecure => {
                tracing::warn!(
                    name,
                    "upstream TLS: the server's certificate is NOT verified (insecure: true); for lab servers only"
                );
                let algs = super::provider().signature_verification_algorithms;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AcceptAnyCert { algs }))
                    .with_no_client_auth()
            }
        };
        Ok(ClientTls {
            base: Arc::new(config),
            name: server_name,
            trust,
        })
    }

    /// The TLS client for one control session and its data connections,
    /// with a resumption store of its own.
    pub fn for_session(&self) -> SessionClient {
        let mut config = (*self.base).clone();
        config.resumption =
            Resumption::store(Arc::new(ClientSessionMemoryCache::new(RESUMPTION_STORE)));
        SessionClient {
            connector: TlsConnector::from(Arc::new(config)),
            name: self.name.clone(),
            trust: self.trust.clone(),
            timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

fn roots(certs: Vec<CertificateDer<'static>>) -> RootCertStore {
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(certs);
    store
}

/// One control session's TLS client side.
#[derive(Clone)]
pub struct SessionClient {
    connector: TlsConnector,
    name: ServerName<'static>,
    trust: Trust,
    timeout: Duration,
}

impl fmt::Debug for SessionClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionClient")
            .field("name", &self.name)
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

/// Why the gateway's handshake with the server failed, for the 421 and
/// the session's log line.
#[derive(Debug)]
pub struct UpstreamTlsError {
    /// The server's certificate was refused (as opposed to a network or
    /// protocol failure).
    pub certificate: bool,
    /// What happened, for a person.
    pub message: String,
}

impl fmt::Display for UpstreamTlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UpstreamTlsError {}

impl SessionClient {
    /// Replaces the handshake bound (default [`HANDSHAKE_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> SessionClient {
        self.timeout = timeout;
        self
    }

    /// A handshake with the server, control or data: the same store, so a
    /// data connection resumes the control session when the server allows.
    pub async fn connect<IO>(&self, io: IO) -> Result<TlsStream<IO>, UpstreamTlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        handshake(self.timeout, self.connector.connect(self.name.clone(), io))
            .await
            .map_err(|e| self.explain(&e))
    }

    fn explain(&self, e: &io::Error) -> UpstreamTlsError {
        let name = self.name.to_str();
        let Some(rustls::Error::InvalidCertificate(cert)) =
            e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        else {
            return UpstreamTlsError {
                certificate: false,
                message: format!("TLS handshake with the server failed: {e}"),
            };
        };
        let why = match cert {
            CertificateError::UnknownIssuer => format!("not issued by a CA in {}", self.trust),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("not valid for the expected name {name}")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "expired".to_string()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not valid yet".to_string()
            }
            CertificateError::Revoked => "revoked".to_string(),
            CertificateError::BadSignature => "badly signed".to_string(),
            other => format!("{other:?}"),
        };
        UpstreamTlsError {
            certificate: true,
            message: format!(
                "server certificate refused: {why} (expected name {name}, trusted: {})",
                self.trust
            ),
        }
    }
}

/// The opt-out verifier: any chain is accepted, but the handshake
/// signatures are still checked, so the peer holds the key it presents.
#[derive(Debug)]
struct AcceptAnyCert {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        tracing::debug!(name = %server_name.to_str(), "upstream TLS: certificate accepted unverified (insecure: true)");
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
