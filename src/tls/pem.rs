//! A certificate chain and its private key from PEM files, checked at load.
//!
//! Every error names the file and, where a block is at fault, the line of
//! its `-----BEGIN` marker, so `ftpgate check` can point at it. A key that
//! does not belong to the chain's first certificate is refused here rather
//! than at the first client's handshake.

use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// The largest certificate or key file read; PEM chains are a few KiB, so
/// anything bigger is a wrong path, not a certificate.
pub const MAX_PEM_FILE: u64 = 1024 * 1024;

/// How far ahead `check` looks for a chain that is about to expire.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// Why a PEM file could not be used: the file, the line of the block at
/// fault when there is one, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemError {
    /// The file at fault.
    pub path: PathBuf,
    /// The 1-based line of the bad block's BEGIN marker, if a block is at fault.
    pub line: Option<usize>,
    /// What is wrong, for a person.
    pub message: String,
}

impl fmt::Display for PemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.path.display(), line, self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for PemError {}

/// A chain and key that belong together, ready to serve.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    /// The chain (leaf first) and its signing key.
    pub certified: Arc<CertifiedKey>,
    /// The earliest `notAfter` in the chain: when the chain stops working.
    pub not_after: SystemTime,
    /// That `notAfter` as the certificate states it, for messages.
    pub not_after_text: String,
    /// The leaf's subject, for the log line that says what is served.
    pub subject: String,
    /// The certificate file, for messages.
    pub cert_path: PathBuf,
}

impl LoadedCert {
    /// A warning when the chain expires within `window` of `now` (or has
    /// expired), naming the file and the date; `None` when it is not close.
    pub fn expiry_warning(&self, now: SystemTime, window: Duration) -> Option<String> {
        const DAY: u64 = 24 * 60 * 60;
        let path = self.cert_path.display();
        match self.not_after.duration_since(now) {
            Err(ago) => Some(format!(
                "certificate chain in {path} expired {} day(s) ago (notAfter {})",
                ago.duration().as_secs() / DAY,
                self.not_after_text
            )),
            Ok(left) if left <= window => Some(format!(
                "certificate chain in {path} expires in {} day(s) (notAfter {})",
                left.as_secs() / DAY,
                self.not_after_text
            )),
            Ok(_) => None,
        }
    }
}

/// Loads the chain in `cert_path` and the key in `key_path` (they may be
/// the same file), and checks that the key belongs to the chain's leaf.
pub fn load(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<LoadedCert, PemError> {
    let mut chain = Vec::new();
    let mut leaf_line = 0;
    let mut not_after: Option<(i64, String)> = None;
    let mut subject = String::new();
    for block in blocks(cert_path)? {
        if block.kind != SectionKind::Certificate {
            continue;
        }
        let x509 = match x509_parser::parse_x509_certificate(&block.der) {
            Ok((_, cert)) => cert,
            Err(e) => return Err(block.error(cert_path, format!("not an X.509 certificate: {e}"))),
        };
        let end = x509.validity().not_after;
        if not_after
            .as_ref()
            .map_or(true, |(t, _)| end.timestamp() < *t)
        {
            not_after = Some((end.timestamp(), end.to_string()));
        }
        if chain.is_empty() {
            leaf_line = block.line;
            subject = x509.subject().to_string();
        }
        chain.push(CertificateDer::from(block.der));
    }
    let Some((not_after, not_after_text)) = not_after else {
        return Err(file_error(cert_path, "no CERTIFICATE block"));
    };

    let mut key = None;
    for block in blocks(key_path)? {
        let line = block.line;
        let der = match block.kind {
            SectionKind::PrivateKey => PrivateKeyDer::Pkcs8(block.der.into()),
            SectionKind::RsaPrivateKey => PrivateKeyDer::Pkcs1(block.der.into()),
            SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(block.der.into()),
            _ => continue,
        };
        let at = |message: String| PemError {
            path: key_path.to_path_buf(),
            line: Some(line),
            message,
        };
        if key.is_some() {
            return Err(at("a second private key; give exactly one".into()));
        }
        let signing = provider
            .key_provider
            .load_private_key(der)
            .map_err(|e| at(format!("unusable private key: {e}")))?;
        key = Some((signing, line));
    }
    let Some((signing, key_line)) = key else {
        return Err(file_error(key_path, "no PRIVATE KEY block"));
    };

    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(PemError {
                path: key_path.to_path_buf(),
                line: Some(key_line),
                message: format!(
                    "this key does not match the certificate at {}:{}",
                    cert_path.display(),
                    leaf_line
                ),
            })
        }
        Err(e) => {
            return Err(PemError {
                path: cert_path.to_path_buf(),
                line: Some(leaf_line),
                message: format!("cannot check the key against this certificate: {e}"),
            })
        }
    }
    Ok(LoadedCert {
        certified: Arc::new(certified),
        not_after: epoch_plus(not_after),
        not_after_text,
        subject,
        cert_path: cert_path.to_path_buf(),
    })
}

/// Loads every certificate in a CA file (PEM), for verifying servers.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs: Vec<_> = blocks(path)?
        .into_iter()
        .filter(|b| b.kind == SectionKind::Certificate)
        .map(|b| CertificateDer::from(b.der))
        .collect();
    if certs.is_empty() {
        return Err(file_error(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// One decoded PEM block and the line of its BEGIN marker.
struct Block {
    kind: SectionKind,
    der: Vec<u8>,
    line: usize,
}

impl Block {
    fn error(&self, path: &Path, message: String) -> PemError {
        PemError {
            path: path.to_path_buf(),
            line: Some(self.line),
            message,
        }
    }
}

fn file_error(path: &Path, message: &str) -> PemError {
    PemError {
        path: path.to_path_buf(),
        line: None,
        message: message.to_string(),
    }
}

fn epoch_plus(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// Reads a PEM file and decodes its blocks, each with its line number.
fn blocks(path: &Path) -> Result<Vec<Block>, PemError> {
    let size = std::fs::metadata(path)
        .map_err(|e| file_error(path, &format!("cannot read: {e}")))?
        .len();
    if size > MAX_PEM_FILE {
        return Err(file_error(
            path,
            &format!("{size} bytes; a PEM file may have at most {MAX_PEM_FILE}"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| file_error(path, &format!("cannot read: {e}")))?;
    let mut cursor = Cursor::new(&bytes[..]);
    let mut out = Vec::new();
    loop {
        let start = cursor.position() as usize;
        let result = pem::from_buf(&mut cursor);
        let end = (cursor.position() as usize).max(start);
        // from_buf skips text outside blocks, so the block it read (or
        // failed on) is the first BEGIN marker in what it consumed.
        let line = begin_line(&bytes, start, end);
        match result {
            Ok(Some((kind, der))) => out.push(Block { kind, der, line }),
            Ok(None) => return Ok(out),
            Err(e) => {
                return Err(PemError {
                    path: path.to_path_buf(),
                    line: Some(line),
                    message: format!("bad PEM block: {}", pem_message(&e)),
                })
            }
        }
    }
}

fn begin_line(bytes: &[u8], start: usize, end: usize) -> usize {
    let marker = b"-----BEGIN";
    let at = bytes[start..end]
        .windows(marker.len())
        .position(|w| w == marker)
        .map_or(end, |i| start + i);
    1 + bytes[..at.min(bytes.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

fn pem_message(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => {
            format!(
                "no -----END {}----- line",
                String::from_utf8_lossy(end_marker)
            )
        }
        pem::Error::IllegalSectionStart { line } => {
            format!("malformed BEGIN line {:?}", String::from_utf8_lossy(line))
        }
        pem::Error::Base64Decode(m) => format!("bad base64: {m}"),
        other => other.to_string(),
    }
}
