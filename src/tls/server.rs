//! The gateway as a TLS server toward the client.
//!
//! Each control session gets its own session cache and its own ticket
//! key, so a data connection can only resume the control session it
//! belongs to: a ticket from another session (or another client) does not
//! decrypt, the handshake is full, and [`SessionServer::accept_data`]
//! refuses it when resumption is required, as vsftpd's
//! `require_ssl_reuse` does.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::server::{ServerConfig, ServerSessionMemoryCache};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::store::CertStore;
use super::{Handshake, HANDSHAKE_TIMEOUT};

/// TLS 1.2 sessions one control session may hold in its own cache: its
/// control handshake plus the few that data connections add; the oldest
/// is dropped first.
pub const SESSION_CACHE: usize = 16;

/// A listener's TLS server side: its certificate store and its policy.
#[derive(Debug, Clone)]
pub struct ServerTls {
    base: Arc<ServerConfig>,
    require_resumption: bool,
}

impl ServerTls {
    /// Serves the certificates in `store`. With `require_resumption`, a
    /// data connection that does not resume its control session is refused.
    pub fn new(
        store: Arc<CertStore>,
        require_resumption: bool,
    ) -> Result<ServerTls, rustls::Error> {
        let config = ServerConfig::builder_with_provider(super::provider())
            .with_protocol_versions(super::VERSIONS)?
            .with_no_client_auth()
            .with_cert_resolver(store);
        Ok(ServerTls {
            base: Arc::new(config),
            require_resumption,
        })
    }

    /// The TLS server for one control session and its data connections:
    /// a fresh session cache and ticket key, shared by nobody else.
    pub fn for_session(&self) -> Result<SessionServer, rustls::Error> {
        let mut config = (*self.base).clone();
        config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        // The same cache and ticket key (both shared by the clone), no tickets.
        let mut quiet = config.clone();
        quiet.send_tls13_tickets = 0;
        Ok(SessionServer {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            quiet: TlsAcceptor::from(Arc::new(quiet)),
            data_tickets: Arc::new(AtomicBool::new(true)),
            require_resumption: self.require_resumption,
            timeout: HANDSHAKE_TIMEOUT,
        })
    }
}

/// One control session's TLS server side.
#[derive(Clone)]
pub struct SessionServer {
    acceptor: TlsAcceptor,
    /// The same session's acceptor, sending no TLS 1.3 tickets.
    quiet: TlsAcceptor,
    /// Whether data connections get tickets now; shared by the session's
    /// clones (the control task sets it, the relay reads it).
    data_tickets: Arc<AtomicBool>,
    require_resumption: bool,
    timeout: Duration,
}

impl fmt::Debug for SessionServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionServer")
            .field("require_resumption", &self.require_resumption)
            .field("data_tickets", &self.data_tickets.load(Ordering::Relaxed))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why a client's data connection got no TLS stream.
#[derive(Debug)]
pub enum DataTlsError {
    /// The handshake failed or timed out.
    Handshake(io::Error),
    /// The handshake was full where resumption of the control session is
    /// required.
    NotResumed,
}

impl fmt::Display for DataTlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataTlsError::Handshake(e) => write!(f, "data TLS handshake failed: {e}"),
            DataTlsError::NotResumed => f.write_str(
                "data TLS did not resume the control session's TLS session (resumption is required)",
            ),
        }
    }
}

impl std::error::Error for DataTlsError {}

impl SessionServer {
    /// Replaces the handshake bound (default [`HANDSHAKE_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> SessionServer {
        self.timeout = timeout;
        self
    }

    /// Whether the next data connections get TLS 1.3 session tickets (on
    /// until set). The control task turns them off for each new data plan,
    /// whose command is not known yet, and for an upload; on when it
    /// forwards a download or listing command. A client that only writes
    /// never reads tickets, and closing a socket with unread bytes resets
    /// it: the kernel then drops what the client had not sent yet (a
    /// truncated upload). Clients that use each ticket once (rustls) take
    /// fresh ones from their downloads and listings.
    pub fn tickets_on_data(&self, on: bool) {
        self.data_tickets.store(on, Ordering::Relaxed);
    }

    /// Whether data connections must resume the control session.
    pub fn require_resumption(&self) -> bool {
        self.require_resumption
    }

    /// The control connection's handshake (after AUTH TLS, or at once on
    /// an implicit listener), bounded by the handshake timeout.
    pub async fn accept_control<IO>(&self, io: IO) -> io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        handshake(self.timeout, self.acceptor.accept(io)).await
    }

    /// A data connection's handshake, refused unless it resumed this
    /// control session when resumption is required; with session tickets
    /// only as [`SessionServer::tickets_on_data`] says.
    pub async fn accept_data<IO>(&self, io: IO) -> Result<TlsStream<IO>, DataTlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = if self.data_tickets.load(Ordering::Relaxed) {
            &self.acceptor
        } else {
            &self.quiet
        };
        let stream = handshake(self.timeout, acceptor.accept(io))
            .await
            .map_err(DataTlsError::Handshake)?;
        if self.require_resumption && Handshake::of(stream.get_ref().1) != Handshake::Resumed {
            return Err(DataTlsError::NotResumed);
        }
        Ok(stream)
    }
}

/// Runs a handshake under a timer; a stall becomes `TimedOut`.
pub(crate) async fn handshake<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("TLS handshake took longer than {timeout:?}"),
        )),
    }
}
