//! Each listener's TLS contexts: its certificate store and TLS server
//! side toward clients, its TLS client side toward the server. Built at a
//! listener's first session and kept for the process's life (listeners
//! change only with a restart); certificates reload on SIGHUP.

use crate::config::{Listener, UpstreamMode};
use crate::tls::client::ClientTls;
use crate::tls::server::ServerTls;
use crate::tls::store::CertStore;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// One listener's TLS sides; each `None` when the listener does not use it.
#[derive(Debug)]
pub struct ListenerContexts {
    /// The served certificate, reloadable.
    pub store: Option<Arc<CertStore>>,
    /// The TLS server toward clients.
    pub server: Option<ServerTls>,
    /// The TLS client toward the server (upstream explicit or implicit).
    pub client: Option<ClientTls>,
}

/// Every listener's contexts, by listener name.
#[derive(Debug, Default)]
pub struct TlsContexts {
    /// Held only to look up or insert: never across I/O or a handshake.
    by_listener: Mutex<HashMap<String, Arc<ListenerContexts>>>,
}

impl TlsContexts {
    /// The contexts of `listener`, built at its first session. An error
    /// names what could not be built (the files were checked at load, so
    /// this is a file that changed since).
    pub fn for_listener(&self, listener: &Listener) -> Result<Arc<ListenerContexts>, String> {
        let mut map = self.by_listener.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&listener.name) {
            return Ok(c.clone());
        }
        let (store, server) = match &listener.tls {
            Some(t) => {
                let store = CertStore::load(&t.cert, &t.key).map_err(|e| e.to_string())?;
                let server = ServerTls::new(store.clone(), t.require_resumption)
                    .map_err(|e| format!("TLS server side: {e}"))?;
                (Some(store), Some(server))
            }
            None => (None, None),
        };
        let client = match &listener.upstream_tls {
            Some(u) if u.mode != UpstreamMode::Off => Some(
                ClientTls::new(u.trust.clone(), &u.name)
                    .map_err(|e| format!("TLS client side toward the server: {e}"))?,
            ),
            _ => None,
        };
        let c = Arc::new(ListenerContexts {
            store,
            server,
            client,
        });
        map.insert(listener.name.clone(), c.clone());
        Ok(c)
    }

    /// Reloads every served certificate (SIGHUP). Sessions keep running;
    /// the next handshake gets the new pair. A pair that does not load or
    /// match keeps the old one: the result says why, per listener.
    pub fn reload(&self) -> Vec<(String, Result<String, String>)> {
        let stores: Vec<(String, Arc<CertStore>)> = {
            let map = self.by_listener.lock().unwrap_or_else(|e| e.into_inner());
            map.iter()
                .filter_map(|(name, c)| c.store.clone().map(|s| (name.clone(), s)))
                .collect()
        };
        stores
            .into_iter()
            .map(|(name, store)| {
                let r = store.reload().map(|l| l.subject).map_err(|e| e.to_string());
                (name, r)
            })
            .collect()
    }
}

/// A control connection: clear text, or TLS once started.
#[derive(Debug)]
pub enum ControlStream {
    /// Clear text.
    Plain(TcpStream),
    /// TLS, either role.
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    /// Taken for a handshake that failed; reads end, writes fail.
    Gone,
}

/// What [`ControlStream::wait_read`] found.
pub enum Readable {
    /// A clear-text socket is readable: read it with `try_read`.
    Ready,
    /// This many bytes were read into the buffer (0: end of stream).
    Read(usize),
}

impl ControlStream {
    /// Waits for input. A clear-text socket reports readiness (so the
    /// read itself uses the caller's stack buffer); TLS reads into `buf`,
    /// which holds the decrypted bytes. Cancel safe: an unfinished TLS
    /// read keeps its bytes in the TLS state.
    pub async fn wait_read(&mut self, buf: &mut [u8]) -> std::io::Result<Readable> {
        use tokio::io::AsyncReadExt;
        match self {
            ControlStream::Plain(s) => s.readable().await.map(|()| Readable::Ready),
            ControlStream::Tls(s) => s.read(buf).await.map(Readable::Read),
            ControlStream::Gone => Ok(Readable::Read(0)),
        }
    }

    /// The TLS version and cipher, or `None` in clear text.
    pub fn describe(&self) -> Option<String> {
        match self {
            ControlStream::Tls(s) => Some(crate::tls::describe(s.get_ref().1)),
            _ => None,
        }
    }
}

impl AsyncRead for ControlStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ControlStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ControlStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ControlStream::Gone => Poll::Ready(Ok(())),
        }
    }
}

fn gone() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "connection closed after a failed TLS handshake",
    )
}

impl AsyncWrite for ControlStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ControlStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ControlStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ControlStream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ControlStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ControlStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ControlStream::Gone => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ControlStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ControlStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ControlStream::Gone => Poll::Ready(Ok(())),
        }
    }
}
