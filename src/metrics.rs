//! Prometheus metrics and the small HTTP endpoint that serves them.
//!
//! Only the shell records metrics (where it turns the core's log events into
//! log lines); the session core knows nothing of them. Label values come
//! from fixed sets (listener names from the rule file, [`Refusal`] reasons,
//! the core's data modes), never from what a peer sends.

use crate::session::{Refused, TransferMode};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Why a session, command or data connection was refused: the `reason`
/// label of `ftpgate_refusals_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // The variant names are the label values.
pub enum Refusal {
    /// `max_sessions` or `max_sessions_per_client` reached.
    limit,
    /// A deny rule matched, or no rule allowed the session.
    rule,
    /// A transparent listener could not find the original destination.
    no_destination,
    /// The server could not be reached.
    unreachable,
    /// The core refused a command (denied verb, mode, data port, TLS...).
    command,
    /// A data connection came from the wrong peer.
    data_peer,
    /// A PROXY header missing, malformed or late from a balancer, or sent
    /// by a peer that is not one.
    proxy_header,
}

impl From<&Refused> for Refusal {
    fn from(what: &Refused) -> Self {
        match what {
            Refused::Command(_) => Refusal::command,
            Refused::DataPeer => Refusal::data_peer,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: Refusal,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // The variant names are the label values.
enum Way {
    to_client,
    to_server,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: Way,
}

/// Every metric the gateway exports, registered once per gateway.
pub struct Metrics {
    registry: Registry,
    sessions: Family<ListenerLabel, Counter>,
    refusals: Family<ReasonLabel, Counter>,
    transfers: Family<ModeLabel, Counter>,
    data_bytes: Family<DirectionLabel, Counter>,
    open_sessions: Family<ListenerLabel, Gauge>,
    open_pinholes: Family<ListenerLabel, Gauge>,
    setup_seconds: Histogram,
    transfer_seconds: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ftpgate");
        let sessions = Family::default();
        let refusals = Family::default();
        let transfers = Family::default();
        let data_bytes = Family::default();
        let open_sessions = Family::default();
        let open_pinholes = Family::default();
        // 1 ms .. ~16 s: setup is a TCP connect plus a rule lookup.
        let setup_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        // 1 ms .. ~9 h: transfers range from a listing to a disk image.
        let transfer_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 25));
        registry.register("sessions", "Control connections accepted", sessions.clone());
        registry.register(
            "refusals",
            "Sessions, commands and data connections refused",
            refusals.clone(),
        );
        registry.register(
            "transfers",
            "Transfers finished, by client/server data mode",
            transfers.clone(),
        );
        registry.register(
            "data_bytes",
            "Data-connection bytes written to each side",
            data_bytes.clone(),
        );
        registry.register(
            "open_sessions",
            "Sessions running now",
            open_sessions.clone(),
        );
        registry.register(
            "open_pinholes",
            "Data plans (pinholes) open now",
            open_pinholes.clone(),
        );
        registry.register(
            "session_setup_seconds",
            "From accept to the session core starting (rules, server connect)",
            setup_seconds.clone(),
        );
        registry.register(
            "transfer_seconds",
            "From the data connection connecting to the transfer's log event",
            transfer_seconds.clone(),
        );
        registry.register(
            "kernel_plans",
            "Data plans the kernel backend opened",
            crate::pinhole::kernel::PLANS.clone(),
        );
        registry.register(
            "kernel_netlink_messages",
            "Netlink messages the kernel backend sent for its plans (per plan: divide by kernel_plans)",
            crate::pinhole::kernel::NETLINK_MESSAGES.clone(),
        );
        Metrics {
            registry,
            sessions,
            refusals,
            transfers,
            data_bytes,
            open_sessions,
            open_pinholes,
            setup_seconds,
            transfer_seconds,
        }
    }

    /// A connection was accepted on `listener`; the returned guard counts it
    /// as open until dropped.
    pub(crate) fn session_opened(&self, listener: &str) -> OpenGuard {
        let label = ListenerLabel {
            listener: listener.to_string(),
        };
        self.sessions.get_or_create(&label).inc();
        OpenGuard::new(self.open_sessions.get_or_create(&label).clone())
    }

    /// A pinhole opened for a session on `listener`; open until the guard drops.
    pub(crate) fn pinhole_opened(&self, listener: &str) -> OpenGuard {
        let label = ListenerLabel {
            listener: listener.to_string(),
        };
        OpenGuard::new(self.open_pinholes.get_or_create(&label).clone())
    }

    /// Counts one refusal.
    pub fn refused(&self, reason: Refusal) {
        self.refusals.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// The session core started this long after accept.
    pub(crate) fn session_setup(&self, took: Duration) {
        self.setup_seconds.observe(took.as_secs_f64());
    }

    /// Counts one finished transfer.
    pub fn transfer(&self, mode: TransferMode, to_client: u64, to_server: u64, took: Duration) {
        self.transfers
            .get_or_create(&ModeLabel {
                mode: mode.as_label(),
            })
            .inc();
        self.data_bytes
            .get_or_create(&DirectionLabel {
                direction: Way::to_client,
            })
            .inc_by(to_client);
        self.data_bytes
            .get_or_create(&DirectionLabel {
                direction: Way::to_server,
            })
            .inc_by(to_server);
        self.transfer_seconds.observe(took.as_secs_f64());
    }

    /// The OpenMetrics text exposition of every metric.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Holds a gauge up by one while it lives.
#[derive(Debug)]
pub(crate) struct OpenGuard(Gauge);

impl OpenGuard {
    fn new(g: Gauge) -> Self {
        g.inc();
        OpenGuard(g)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves `GET /metrics` on `socket` until `stop` turns true (or its
/// sender is gone), then closes the socket: a process that drains answers
/// no health check. One request per connection; anything else gets 404.
/// Scrapers are trusted less than nothing: each request is bounded in size
/// and time.
pub async fn serve(
    socket: TcpListener,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            a = socket.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &metrics)).await;
        });
    }
    // The socket first: the sender learns the endpoint is closed when the
    // receiver goes.
    drop(socket);
    drop(stop);
}

/// Binds the endpoint; fails at startup rather than running without it.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 8192 {
            return respond(&mut stream, "431 Request Header Fields Too Large", "", "").await;
        }
    }
    let first = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = first.split(|&b| b == b' ');
    let (method, target) = (parts.next(), parts.next());
    let path = target.map(|t| t.split(|&b| b == b'?').next().unwrap_or_default());
    match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => {
            respond(
                &mut stream,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &metrics.encode(),
            )
            .await
        }
        (Some(b"GET"), _) => {
            respond(&mut stream, "404 Not Found", "text/plain", "try /metrics\n").await
        }
        _ => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "GET only\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::LegMode;

    #[test]
    fn labels_come_from_the_core_types() {
        use LegMode::{Active, Passive};
        let m = Metrics::new();
        m.refused(Refusal::from(&Refused::Command("PORT".into())));
        m.refused(Refusal::from(&Refused::DataPeer));
        m.transfer(TransferMode::None, 0, 0, Duration::ZERO);
        for (client, server) in [(Passive, Active), (Active, Passive), (Active, Active)] {
            m.transfer(TransferMode::Legs { client, server }, 0, 0, Duration::ZERO);
        }
        let text = m.encode();
        for line in [
            "ftpgate_refusals_total{reason=\"command\"} 1",
            "ftpgate_refusals_total{reason=\"data_peer\"} 1",
            "ftpgate_transfers_total{mode=\"none\"} 1",
            "ftpgate_transfers_total{mode=\"passive/active\"} 1",
            "ftpgate_transfers_total{mode=\"active/passive\"} 1",
            "ftpgate_transfers_total{mode=\"active/active\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn guards_move_gauges_and_counters_accumulate() {
        let m = Metrics::new();
        let g = m.session_opened("edge");
        let p = m.pinhole_opened("edge");
        m.refused(Refusal::rule);
        let mode = TransferMode::Legs {
            client: LegMode::Passive,
            server: LegMode::Passive,
        };
        m.transfer(mode, 10, 3, Duration::from_millis(5));
        let text = m.encode();
        for line in [
            "ftpgate_sessions_total{listener=\"edge\"} 1",
            "ftpgate_open_sessions{listener=\"edge\"} 1",
            "ftpgate_open_pinholes{listener=\"edge\"} 1",
            "ftpgate_refusals_total{reason=\"rule\"} 1",
            "ftpgate_transfers_total{mode=\"passive/passive\"} 1",
            "ftpgate_data_bytes_total{direction=\"to_client\"} 10",
            "ftpgate_data_bytes_total{direction=\"to_server\"} 3",
            "ftpgate_transfer_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        drop((g, p));
        let text = m.encode();
        assert!(
            text.contains("ftpgate_open_sessions{listener=\"edge\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("ftpgate_open_pinholes{listener=\"edge\"} 0"),
            "{text}"
        );
    }
}
