//! FTPS settings: a listener's `tls` (the gateway's certificate toward
//! clients), a reverse listener's `upstream_tls` (the gateway as a TLS
//! client toward its server), and a rule's `require_tls`/`require_prot_p`.
//!
//! The certificate and key are loaded and matched here, so `ftpgate check`
//! reports a bad file at the `cert:` or `key:` key, naming the PEM file and
//! the line of the bad block. What the gateway cannot serve yet (rule
//! `tls: terminate`, implicit listeners, TLS toward the server, the
//! `require_*` policies) is refused with a clear message rather than
//! accepted and ignored.
//!
//! ```yaml
//! listeners:
//!   - name: ftps
//!     listen: 0.0.0.0:21
//!     mode: reverse
//!     upstream: 192.0.2.10:21
//!     tls:
//!       cert: /etc/ftpgate/chain.pem    # leaf first; relative to this file
//!       key: /etc/ftpgate/key.pem
//!       implicit: false                 # true: TLS from the first byte (990 style)
//!       require_resumption: true        # data TLS must resume the control session
//!     upstream_tls:
//!       mode: off                       # off | explicit | implicit
//!       ca: system                      # a PEM file, or `system`
//!       name: ftp.example.com           # default: the upstream's address
//!       insecure: false                 # true: no verification (lab servers)
//! ```

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;

use super::check::Check;
use super::raw::{at, Field, RawListener, RawRule, Seg, Text};
use super::types::{ListenerMode, TlsPolicy};
use super::values::parse_enum;
use super::ConfigError;
use crate::tls::client::Trust;
use crate::tls::pem::{self, EXPIRY_WARNING};

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping (a listener's `tls`: `cert`, `key`, `implicit`, `require_resumption`)"
)]
pub(super) struct RawListenerTls {
    #[serde(default)]
    cert: Field<Text>,
    #[serde(default)]
    key: Field<Text>,
    #[serde(default)]
    implicit: Field<Text>,
    #[serde(default)]
    require_resumption: Field<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping (a listener's `upstream_tls`: `mode`, `ca`, `name`, `insecure`, `allow_downgrade`)"
)]
pub(super) struct RawUpstreamTls {
    #[serde(default)]
    mode: Field<Text>,
    #[serde(default)]
    ca: Field<Text>,
    #[serde(default)]
    name: Field<Text>,
    #[serde(default)]
    insecure: Field<Text>,
    #[serde(default)]
    allow_downgrade: Field<Text>,
}

/// A listener's `tls:` section, validated: the pair loaded and matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// TLS from the first byte (port 990 style) rather than after AUTH TLS.
    pub implicit: bool,
    /// A client's data TLS must resume its control session. Default true.
    pub require_resumption: bool,
}

/// How the gateway speaks to the server: `upstream_tls.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamMode {
    /// Clear text toward the server.
    Off,
    /// AUTH TLS after the server's greeting.
    Explicit,
    /// TLS from the first byte.
    Implicit,
}

impl UpstreamMode {
    /// Every value with its rule-file name, in the order messages list them.
    pub const NAMES: &'static [(&'static str, UpstreamMode)] = &[
        ("off", UpstreamMode::Off),
        ("explicit", UpstreamMode::Explicit),
        ("implicit", UpstreamMode::Implicit),
    ];

    /// The value's name in the rule file.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamMode::Off => "off",
            UpstreamMode::Explicit => "explicit",
            UpstreamMode::Implicit => "implicit",
        }
    }
}

/// A reverse listener's `upstream_tls:` section, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// off (default), explicit or implicit.
    pub mode: UpstreamMode,
    /// What the server's certificate is checked against.
    pub trust: Trust,
    /// The name (or address) the server's certificate must carry.
    pub name: String,
    /// One leg in TLS and the other in clear text (an FTPS client to a
    /// plain server, or a plain client to an FTPS server) is allowed, and
    /// logged at the start of each such session. Default false.
    pub allow_downgrade: bool,
}

/// What the TLS checks keep between hooks.
#[derive(Debug, Default)]
pub(super) struct TlsState {
    /// The rule file's folder: relative PEM paths are taken from it.
    pub(super) base: PathBuf,
    /// Notes for a valid file (expiring chains), shown by `ftpgate check`.
    pub(super) warnings: Vec<(Vec<Seg>, String)>,
    /// "Now" for expiry warnings; the clock when unset.
    pub(super) now: Option<SystemTime>,
}

/// A rule's `tls` value: refuse, passthrough or terminate.
pub(super) fn parse_rule_tls(s: &str) -> Result<TlsPolicy, String> {
    parse_enum(s, TlsPolicy::NAMES)
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("`{s}` is not true or false")),
    }
}

fn parse_path(s: &str) -> Result<PathBuf, String> {
    if s.trim().is_empty() {
        Err("the path is blank".to_string())
    } else {
        Ok(PathBuf::from(s))
    }
}

impl Check {
    /// The rule's `require_tls` and `require_prot_p` (default false). Both
    /// are the gateway's own answers, so they need `tls: terminate`.
    pub(super) fn rule_tls(
        &mut self,
        r: &RawRule,
        path: &[Seg],
        tls: Option<TlsPolicy>,
    ) -> (bool, bool) {
        let mut out = [false, false];
        for (i, (field, key)) in [
            (&r.require_tls, "require_tls"),
            (&r.require_prot_p, "require_prot_p"),
        ]
        .into_iter()
        .enumerate()
        {
            if let Ok(Some(true)) = self.optional(field, path, key, parse_bool) {
                if matches!(tls, Some(TlsPolicy::Refuse | TlsPolicy::Passthrough)) {
                    self.err(
                        &at(path, key),
                        format!("`{key}: true` needs `tls: terminate`: only a gateway that ends TLS itself can tell"),
                    );
                }
                out[i] = true;
            }
        }
        (out[0], out[1])
    }

    /// A listener's `tls` and `upstream_tls`, validated; the pair is loaded.
    pub(super) fn listener_tls(
        &mut self,
        r: &RawListener,
        path: &[Seg],
        mode: Option<&ListenerMode>,
    ) -> (Option<ListenerTls>, Option<UpstreamTls>) {
        let server = match self.field(&r.tls, path, "tls") {
            Ok(Some(t)) => self.server_tls(t, &at(path, "tls")),
            _ => None,
        };
        let upstream = match self.field(&r.upstream_tls, path, "upstream_tls") {
            Ok(Some(t)) => self.upstream_tls(t, &at(path, "upstream_tls"), mode),
            _ => None,
        };
        (server, upstream)
    }

    fn server_tls(&mut self, r: &RawListenerTls, path: &[Seg]) -> Option<ListenerTls> {
        let cert = self.required(
            &r.cert,
            path,
            "cert",
            "the PEM certificate chain, leaf first",
            parse_path,
        );
        let key = self.required(
            &r.key,
            path,
            "key",
            "the chain's PEM private key",
            parse_path,
        );
        let implicit = self.value(&r.implicit, path, "implicit", false, parse_bool);
        let require_resumption = self.value(
            &r.require_resumption,
            path,
            "require_resumption",
            true,
            parse_bool,
        );
        let (cert, key) = (self.tls.base.join(cert?), self.tls.base.join(key?));
        match pem::load(&cert, &key, &crate::tls::provider()) {
            Ok(loaded) => {
                let now = self.tls.now.unwrap_or_else(SystemTime::now);
                if let Some(warning) = loaded.expiry_warning(now, EXPIRY_WARNING) {
                    self.tls.warnings.push((at(path, "cert"), warning));
                }
            }
            Err(e) => {
                // Point at the key that names the file at fault.
                let key_at_fault = e.path == key && key != cert;
                let at_key = if key_at_fault { "key" } else { "cert" };
                self.err(&at(path, at_key), format!("tls.{at_key}: {e}"));
                return None;
            }
        }
        Some(ListenerTls {
            cert,
            key,
            implicit: implicit?,
            require_resumption: require_resumption?,
        })
    }

    fn upstream_tls(
        &mut self,
        r: &RawUpstreamTls,
        path: &[Seg],
        mode: Option<&ListenerMode>,
    ) -> Option<UpstreamTls> {
        let upstream = match mode {
            Some(ListenerMode::Reverse { upstream, .. }) => Some(upstream.ip()),
            Some(ListenerMode::Transparent) => {
                self.err(
                    path,
                    "upstream_tls applies to reverse listeners only: a transparent listener has no one server to name and verify",
                );
                return None;
            }
            None => None,
        };
        let tls_mode = self.value(&r.mode, path, "mode", UpstreamMode::Off, |s| {
            // YAML 1.1 readers turn a bare `off` into false; take it as meant.
            let s = if s == "false" { "off" } else { s };
            parse_enum(s, UpstreamMode::NAMES)
        });
        let allow_downgrade = self.value(
            &r.allow_downgrade,
            path,
            "allow_downgrade",
            false,
            parse_bool,
        );
        let insecure = self.value(&r.insecure, path, "insecure", false, parse_bool);
        let ca = self.optional(&r.ca, path, "ca", parse_path);
        let trust = match (insecure, ca) {
            (Some(true), Ok(Some(_))) => {
                self.err(
                    &at(path, "ca"),
                    "give `ca` or `insecure: true`, not both: with `insecure` nothing is verified",
                );
                None
            }
            (Some(true), Ok(None)) => Some(Trust::Insecure),
            (Some(false), Ok(Some(ca))) if ca.as_os_str() == "system" => Some(Trust::System),
            (Some(false), Ok(Some(ca))) => {
                let ca = self.tls.base.join(ca);
                match pem::load_certificates(&ca) {
                    Ok(_) => Some(Trust::CaFile(ca)),
                    Err(e) => {
                        self.err(&at(path, "ca"), format!("upstream_tls.ca: {e}"));
                        None
                    }
                }
            }
            // Nothing to verify with TLS off (or a mode already in error).
            (Some(false), Ok(None))
                if !matches!(
                    tls_mode,
                    Some(UpstreamMode::Explicit | UpstreamMode::Implicit)
                ) =>
            {
                Some(Trust::System)
            }
            (Some(false), Ok(None)) => {
                self.err(
                    path,
                    "missing `ca`: a PEM file of the CAs that sign the server's certificate, or `system`",
                );
                None
            }
            _ => None,
        };
        let name = match self.optional(&r.name, path, "name", |s| {
            rustls::pki_types::ServerName::try_from(s.to_string())
                .map(|_| s.to_string())
                .map_err(|_| format!("`{s}` is neither a DNS name nor an IP address"))
        }) {
            Ok(Some(name)) => Some(name),
            Ok(None) => upstream.map(|ip| ip.to_string()),
            Err(()) => None,
        };
        Some(UpstreamTls {
            mode: tls_mode?,
            trust: trust?,
            name: name?,
            allow_downgrade: allow_downgrade?,
        })
    }
}

/// Warnings for a rule file that loads: each listener chain that expires
/// within 30 days (or has expired), at its `cert:` key. `ftpgate check`
/// prints them; they do not make the file invalid.
pub fn tls_warnings(path: &Path) -> Vec<ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => warnings_at(&text, path, SystemTime::now()),
        Err(_) => Vec::new(),
    }
}

/// [`tls_warnings`] of `text`, as of `now`.
pub(super) fn warnings_at(text: &str, path: &Path, now: SystemTime) -> Vec<ConfigError> {
    let Ok(raw) = super::structure(text) else {
        return Vec::new();
    };
    let mut check = Check::default();
    check.tls.now = Some(now);
    let _ = check.config(&raw, path);
    super::located(text, check.tls.warnings)
        .into_iter()
        .map(|(line, column, message)| ConfigError {
            file: path.to_path_buf(),
            line,
            column,
            message,
        })
        .collect()
}

/// The folder relative PEM paths are taken from: the rule file's own.
pub(super) fn base_dir(config: &Path) -> PathBuf {
    config.parent().map(Path::to_path_buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use rcgen::{CertificateParams, KeyPair};

    const HEAD: &str = "listeners:\n  - name: lo\n    listen: 127.0.0.1:2121\n    mode: reverse\n    upstream: 127.0.0.1:21\n";
    const RULES: &str = "rules:\n  - name: all\n";

    /// A self-signed pair for `ftp.example` (not after `not_after`, if
    /// given), written to `dir` as cert.pem and key.pem.
    fn pair(dir: &Path, not_after: Option<(i32, u8, u8)>) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec!["ftp.example".to_string()]).unwrap();
        if let Some((y, m, d)) = not_after {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn errors(text: &str) -> Vec<String> {
        match Config::parse(text, Path::new("t.yaml")) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(e) => {
                e.0.iter()
                    .map(|e| format!("{}:{}: {}", e.line, e.column, e.message))
                    .collect()
            }
        }
    }

    fn listener_tls(extra: &str) -> String {
        format!("{HEAD}{extra}{RULES}")
    }

    #[test]
    fn a_valid_listener_tls_section_loads_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(dir.path(), None);
        let text = listener_tls(&format!(
            "    tls:\n      cert: {}\n      key: {}\n    upstream_tls:\n      mode: off\n      ca: system\n",
            cert.display(),
            key.display()
        ));
        Config::parse(&text, Path::new("t.yaml")).unwrap();

        // The validated values, as the hook returns them.
        let raw = super::super::structure(&text).unwrap();
        let Field::Set(listeners) = &raw.listeners else {
            panic!()
        };
        let mut check = Check::default();
        let mode = ListenerMode::Reverse {
            upstream: "127.0.0.1:21".parse().unwrap(),
            announce: None,
        };
        let (server, upstream) = check.listener_tls(
            &listeners[0],
            &[Seg::Key("listeners"), Seg::Index(0)],
            Some(&mode),
        );
        assert!(check.errors.is_empty(), "{:?}", check.errors);
        assert_eq!(
            server,
            Some(ListenerTls {
                cert,
                key,
                implicit: false,
                require_resumption: true
            })
        );
        assert_eq!(
            upstream,
            Some(UpstreamTls {
                mode: UpstreamMode::Off,
                trust: Trust::System,
                name: "127.0.0.1".into(),
                allow_downgrade: false,
            })
        );
    }

    #[test]
    fn pem_errors_are_reported_at_the_key_that_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(dir.path(), None);
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "# chain\n\n-----BEGIN CERTIFICATE-----\nnot*base64\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let text = listener_tls(&format!(
            "    tls:\n      cert: {}\n      key: {}\n",
            broken.display(),
            key.display()
        ));
        assert_eq!(
            errors(&text),
            [format!(
                "7:13: tls.cert: {}:3: bad PEM block: bad base64: InvalidCharacter(42)",
                broken.display()
            )]
        );

        // A key that belongs to another certificate: at `key:`.
        let other = tempfile::tempdir().unwrap();
        let (_, other_key) = pair(other.path(), None);
        let text = listener_tls(&format!(
            "    tls:\n      cert: {}\n      key: {}\n",
            cert.display(),
            other_key.display()
        ));
        assert_eq!(
            errors(&text),
            [format!(
                "8:12: tls.key: {}:1: this key does not match the certificate at {}:1",
                other_key.display(),
                cert.display()
            )]
        );

        // Missing keys and values.
        let errs = errors(&listener_tls("    tls:\n      implicit: maybe\n"));
        assert_eq!(
            errs,
            [
                "7:7: missing `cert`: the PEM certificate chain, leaf first",
                "7:7: missing `key`: the chain's PEM private key",
                "7:17: implicit: `maybe` is not true or false",
            ]
        );
    }

    #[test]
    fn terminate_and_its_requirements_load_and_need_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(dir.path(), None);
        let text = format!(
            "{HEAD}    tls:\n      cert: {}\n      key: {}\n      implicit: true\n    upstream_tls:\n      mode: explicit\n      insecure: true\n      allow_downgrade: true\nrules:\n  - name: all\n    tls: terminate\n    require_tls: true\n    require_prot_p: true\n  - name: clear\n    tls: refuse\n    require_tls: true\n    require_prot_p: false\n",
            cert.display(),
            key.display()
        );
        // Only a gateway that ends TLS can require it.
        assert_eq!(
            errors(&text),
            ["21:18: `require_tls: true` needs `tls: terminate`: only a gateway that ends TLS itself can tell"]
        );
        let ok = text.replace(
            "    tls: refuse\n    require_tls: true\n",
            "    tls: refuse\n",
        );
        let path = dir.path().join("t.yaml");
        std::fs::write(&path, &ok).unwrap();
        let c = Config::load(&path).unwrap();
        let l = &c.listeners[0];
        assert!(l.tls.as_ref().is_some_and(|t| t.implicit));
        let up = l.upstream_tls.as_ref().unwrap();
        assert_eq!(
            (up.mode, up.allow_downgrade),
            (UpstreamMode::Explicit, true)
        );
        let r = &c.rules[0];
        assert_eq!(
            (r.tls, r.require_tls, r.require_prot_p),
            (TlsPolicy::Terminate, true, true)
        );
        // `check` prints the settings in force, and they read back the same.
        let printed = c.to_yaml();
        assert!(printed.contains("allow_downgrade: true"), "{printed}");
        let again = Config::parse(&printed, &path).unwrap();
        assert_eq!(again.listeners, c.listeners);
        assert_eq!(again.rules, c.rules);
    }

    #[test]
    fn upstream_tls_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = pair(dir.path(), None);
        let up = |body: &str| listener_tls(&format!("    upstream_tls:\n{body}"));
        assert_eq!(
            errors(&up("      mode: off\n      ca: system\n      insecure: true\n")),
            ["8:11: give `ca` or `insecure: true`, not both: with `insecure` nothing is verified"]
        );
        assert_eq!(
            errors(&up("      name: \"not a name\"\n")),
            ["7:13: name: `not a name` is neither a DNS name nor an IP address"]
        );
        let missing = dir.path().join("missing.pem");
        let errs = errors(&up(&format!("      ca: {}\n", missing.display())));
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with(&format!(
                "7:11: upstream_tls.ca: {}: cannot read",
                missing.display()
            )),
            "{errs:?}"
        );
        assert_eq!(
            errors(&up("      mode: sometimes\n")),
            ["7:13: mode: unknown value `sometimes`, expected one of: off, explicit, implicit"]
        );
        // A CA file that loads is accepted with mode off.
        Config::parse(
            &up(&format!(
                "      ca: {}\n      name: ftp.example\n",
                cert.display()
            )),
            Path::new("t.yaml"),
        )
        .unwrap();
        // Transparent listeners have no single server to verify.
        let text = format!(
            "listeners:\n  - name: t\n    listen: 127.0.0.1:2121\n    mode: transparent\n    upstream_tls:\n      mode: off\n{RULES}"
        );
        assert_eq!(
            errors(&text),
            ["6:7: upstream_tls applies to reverse listeners only: a transparent listener has no one server to name and verify"]
        );
    }

    #[test]
    fn check_warns_about_a_chain_expiring_within_30_days() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = pair(dir.path(), Some((2030, 1, 1)));
        // Relative paths are taken from the rule file's folder.
        let text = listener_tls("    tls:\n      cert: cert.pem\n      key: key.pem\n");
        let rules = dir.path().join("rules.yaml");
        std::fs::write(&rules, &text).unwrap();
        Config::load(&rules).unwrap();

        let at = |y, m, d| SystemTime::from(rcgen::date_time_ymd(y, m, d));
        let messages = |now| -> Vec<String> {
            warnings_at(&text, &rules, now)
                .iter()
                .map(|w| format!("{}:{}: {}", w.line, w.column, w.message))
                .collect()
        };
        // Far from expiry, nothing to say.
        assert!(messages(at(2029, 11, 1)).is_empty());
        let warnings = warnings_at(&text, &rules, at(2029, 12, 11));
        assert_eq!(warnings.len(), 1);
        let w = &warnings[0];
        assert_eq!((w.file.clone(), w.line, w.column), (rules.clone(), 7, 13));
        assert!(
            w.message.starts_with(&format!(
                "certificate chain in {} expires in 21 day(s)",
                cert.display()
            )),
            "{w}"
        );
        // Today, well before 2030, nothing.
        assert!(tls_warnings(&rules).is_empty());
    }
}
