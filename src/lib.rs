//! ftpgate: an FTP-aware gateway for the network edge.
//!
//! It reads every FTP control stream that passes (RFC 959, RFC 2428), opens a
//! data pinhole for exactly the expected peer, and rewrites PORT/EPRT/227/229
//! so that active and passive FTP both work through firewalls and NAT.
//!
//! # Layout
//!
//! Imports point down this list, never back up:
//!
//! - [`ftp`]: pure wire handling — line framer, Telnet decoding and the
//!   re-serialisation of checked lines, command and reply parsers, and the
//!   formatting of rewritten lines.
//! - [`tls`]: FTPS building blocks with no FTP in them — certificate chain
//!   and key from PEM (errors at file:line, key-match check, expiry), the
//!   reloadable served certificate, the TLS server side with per-control-
//!   session resumption and the data-resumption check, and the verifying TLS
//!   client side with a per-control-session resumption store.
//! - [`config`]: the YAML rule file → validated [`config::Config`]: the
//!   types, the raw serde layer with positions, the checks (errors at
//!   `file:line:column`) and the printer; each enum's rule-file names are
//!   written once, beside its variants.
//! - [`rules`]: (client, server) → [`rules::Decision`], once per session.
//! - [`session`]: the sans-IO session core. Events in (lines, data events,
//!   timers), actions out (bytes, pinholes, local replies, log events). All
//!   protocol logic and policy lives here: commands, replies, the life of
//!   each data plan, and the transfer records.
//! - [`pinhole`]: what a data plan is and who carries it — the plan and its
//!   legs, the events and outcomes reported to the session, the port pools,
//!   and [`pinhole::Backend`], the one place that routes a plan to the
//!   user-space `relay` (per-plan task, copy, splice) or to the `kernel`
//!   backend (a plan's shape → nftables elements, port claims, following the
//!   plan's connection in conntrack).
//! - [`netfilter`]: kernel plumbing with no FTP in it — the netfilter netlink
//!   socket, conntrack messages and events, nf_tables element batches, the
//!   gateway's table and its lifecycle, and the `ftpgate nft` ruleset
//!   template.
//! - [`proxy`]: the tokio shell — listeners, the control task per session,
//!   original-destination lookup, per-client limits, shutdown; and, pure,
//!   the PROXY protocol header (v1/v2) by which a balancer names the real
//!   client.
//! - [`metrics`], [`audit`], [`systemd`]: what the shell reports to
//!   operators — Prometheus metrics, the per-transfer JSON audit log, and
//!   readiness notifications.
//! - [`balancer`]: several instances of one service — the set check behind
//!   `ftpgate check --peer`, and the HAProxy and nftables configurations
//!   `ftpgate balancer` prints.
//! - [`explain`]: which rule a (client, server) pair meets, for the CLI.
//! - [`escape`]: peer-controlled text made safe for text log lines.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![warn(unreachable_pub)]

pub mod audit;
pub mod balancer;
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
pub mod tls;
