//! The transfer audit log: one JSON object per line, one line per transfer.
//!
//! A file is opened with O_APPEND, so each line lands whole at the end even
//! if something else appends too, and it is reopened when the path no longer
//! names the open file (logrotate moved or removed it): rotation needs no
//! signal and no `copytruncate`.

use crate::config::AuditTarget;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// One transfer, as written to the audit log.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord<'a> {
    /// When the transfer's record was made, RFC 3339 in UTC.
    pub time: String,
    /// The session id that every log line of the session carries.
    pub session: u64,
    /// The gateway's `instance` name, among several instances of one
    /// service; absent from the line when the rule file names none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<&'a str>,
    /// The listener's name.
    pub listener: &'a str,
    /// Client address:port.
    pub client: String,
    /// Server address:port.
    pub server: String,
    /// The user the server had accepted (230) when it took the command.
    pub user: Option<&'a str>,
    /// RETR, STOR, LIST, ...
    pub command: &'a str,
    /// The command's argument.
    pub path: &'a str,
    /// `client/server` data modes, e.g. `passive/active`.
    pub mode: &'a str,
    /// download, upload or listing.
    pub direction: String,
    /// Data bytes both ways.
    pub bytes: u64,
    /// Data bytes written to the client.
    pub to_client: u64,
    /// Data bytes written to the server.
    pub to_server: u64,
    /// Milliseconds from the data connection connecting to the end.
    pub duration_ms: u64,
    /// The server's final reply code (0 if none came).
    pub reply: u16,
    /// `ok`, or what went wrong.
    pub result: &'a str,
    /// The client control leg's TLS version and cipher (e.g. `TLSv1.3
    /// TLS13_AES_256_GCM_SHA384`); absent in clear text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client: Option<&'a str>,
    /// The server control leg's TLS version and cipher; absent in clear
    /// text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_server: Option<&'a str>,
    /// The client leg of this transfer's data connection: its TLS version
    /// and cipher, or `none` (PROT C); absent when the client control leg
    /// is clear text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_tls_client: Option<&'a str>,
    /// The server leg of this transfer's data connection, as
    /// `data_tls_client`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_tls_server: Option<&'a str>,
}

/// Where audit lines go.
#[derive(Debug)]
pub struct AuditLog {
    sink: Mutex<Sink>,
}

#[derive(Debug)]
enum Sink {
    Stdout,
    File {
        path: PathBuf,
        file: File,
        /// (device, inode) of `file`, to notice rotation.
        id: (u64, u64),
    },
}

fn open_append(path: &Path) -> std::io::Result<(File, (u64, u64))> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let m = file.metadata()?;
    Ok((file, (m.dev(), m.ino())))
}

impl AuditLog {
    /// Opens the target; a file that cannot be opened fails startup.
    pub fn open(target: &AuditTarget) -> std::io::Result<Self> {
        let sink = match target {
            AuditTarget::Stdout => Sink::Stdout,
            AuditTarget::File(path) => {
                let (file, id) = open_append(path)?;
                Sink::File {
                    path: path.clone(),
                    file,
                    id,
                }
            }
        };
        Ok(AuditLog {
            sink: Mutex::new(sink),
        })
    }

    /// Writes one record as one line. A transfer is a few per second at
    /// most, so a short blocking write under a lock is cheaper than a
    /// writer task.
    pub fn write(&self, record: &AuditRecord<'_>) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        // A poisoned lock only means another writer panicked mid-line; the
        // sink itself is still usable.
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *sink {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&line)?;
                out.flush()
            }
            Sink::File { path, file, id } => {
                let current = std::fs::metadata(&*path).map(|m| (m.dev(), m.ino())).ok();
                if current != Some(*id) {
                    let (f, i) = open_append(path)?;
                    *file = f;
                    *id = i;
                }
                file.write_all(&line)
            }
        }
    }
}

/// `t` as RFC 3339 in UTC with milliseconds, e.g. `2024-05-01T12:00:00.250Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 → (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_known_instants() {
        for (secs, millis, want) in [
            (0, 0, "1970-01-01T00:00:00.000Z"),
            (951_782_400, 5, "2000-02-29T00:00:00.005Z"),
            (1_709_210_096, 999, "2024-02-29T12:34:56.999Z"),
            (4_102_444_799, 0, "2099-12-31T23:59:59.000Z"),
        ] {
            let t =
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis);
            assert_eq!(rfc3339(t), want);
        }
    }

    fn record() -> AuditRecord<'static> {
        AuditRecord {
            time: rfc3339(SystemTime::now()),
            session: 7,
            instance: None,
            listener: "l",
            client: "127.0.0.1:1".into(),
            server: "127.0.0.1:2".into(),
            user: None,
            command: "RETR",
            path: "a",
            mode: "passive/passive",
            direction: "download".into(),
            bytes: 1,
            to_client: 1,
            to_server: 0,
            duration_ms: 0,
            reply: 226,
            result: "ok",
            tls_client: None,
            tls_server: None,
            data_tls_client: None,
            data_tls_server: None,
        }
    }

    #[test]
    fn reopens_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&AuditTarget::File(path.clone())).unwrap();
        log.write(&record()).unwrap();
        let rotated = dir.path().join("audit.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.write(&record()).unwrap();
        log.write(&record()).unwrap();
        let count = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count();
        assert_eq!(count(&rotated), 1);
        assert_eq!(count(&path), 2);
    }

    #[test]
    fn instance_is_written_only_when_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&AuditTarget::File(path.clone())).unwrap();
        log.write(&record()).unwrap();
        log.write(&AuditRecord {
            instance: Some("gw2"),
            ..record()
        })
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0].get("instance"), None, "{text}");
        assert_eq!(lines[1]["instance"], "gw2", "{text}");
        assert_eq!(lines[1]["listener"], "l");
    }
}
