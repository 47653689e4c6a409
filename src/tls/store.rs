//! The served certificate, swappable while the gateway runs.
//!
//! rustls asks the resolver for a certificate at each handshake, so a
//! reload (SIGHUP) that swaps the stored chain takes effect at the next
//! handshake; connections already established keep the keys they agreed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::pem::{self, LoadedCert, PemError};

/// A listener's certificate and key, reloadable from their files.
#[derive(Debug)]
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    /// Held only to clone an `Arc` out or to swap one in: never across I/O.
    current: RwLock<LoadedCert>,
}

impl CertStore {
    /// Loads the pair once; the gateway does not start on an error.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<CertStore>, PemError> {
        let loaded = pem::load(cert_path, key_path, &super::provider())?;
        Ok(Arc::new(CertStore {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new(loaded),
        }))
    }

    /// Reads the files again and, only if the new pair loads and matches,
    /// serves it from the next handshake on. A bad pair leaves the old one
    /// in place, so a botched renewal never takes FTPS down.
    pub fn reload(&self) -> Result<LoadedCert, PemError> {
        let loaded = pem::load(&self.cert_path, &self.key_path, &super::provider())?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded.clone();
        Ok(loaded)
    }

    /// What is served now.
    pub fn current(&self) -> LoadedCert {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .certified
                .clone(),
        )
    }
}
