//! ftpgate: an FTP-aware gateway for the network edge.
//!
//! It reads every FTP control stream that passes (RFC 959, RFC 2428), opens a
//! data pinhole for exactly the expected peer, and rewrites PORT/EPRT/227/229
//! so that active and passive FTP both work through firewalls and NAT.
//!
//! # Layout
//!
//! - [`ftp`]: pure wire handling — line framer, Telnet decoding and the
//!   re-serialisation of checked lines, command and reply parsers, and the
//!   formatting of rewritten lines.
//! - [`config`]: the YAML rule file → validated [`config::Config`], with
//!   errors located at `file:line:column`.
//! - [`rules`]: (client, server) → [`rules::Decision`], once per session.
//! - [`session`]: the sans-IO session core. Events in (lines, data events,
//!   timers), actions out (bytes, pinholes, local replies, log events). All
//!   protocol logic and policy lives here.
//! - [`pinhole`]: port pools and the backends that carry out a data plan
//!   (relay; the gateway's nftables table).
//! - [`proxy`]: the tokio shell — listeners, the control task per session,
//!   original-destination lookup, shutdown.
//! - [`metrics`], [`audit`], [`systemd`]: what the shell reports to
//!   operators — Prometheus metrics, the per-transfer JSON audit log, and
//!   readiness notifications.
//! - [`explain`]: which rule a (client, server) pair meets, for the CLI.
//! - [`escape`]: peer-controlled text made safe for text log lines.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod config;
pub mod escape;
pub mod explain;
pub mod ftp;
pub mod metrics;
pub mod netfilter;
pub mod pinhole;
pub mod proxy;
pub mod rules;
pub mod session;
pub mod systemd;
