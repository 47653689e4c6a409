//! What a kernel plan holds in the gateway's table, and the claims that
//! outlive it: a port's claim lingers after its plan, until the port's next
//! plan, the session's end, or `pinhole_timeout`, whichever comes first.

use crate::netfilter::{Element, InterceptTable};
use crate::pinhole::{DataEvent, PortLease};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Counts a plan as live until dropped.
#[derive(Debug)]
pub(super) struct Live(Arc<AtomicUsize>);

impl Live {
    /// One more live plan in `count`.
    pub(super) fn enter(count: &Arc<AtomicUsize>) -> Live {
        count.fetch_add(1, Ordering::Relaxed);
        Live(count.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a plan still holds: elements in the table, its claim, its port.
pub(super) struct Held {
    pub(super) table: Arc<InterceptTable>,
    pub(super) shared: Arc<Shared>,
    pub(super) claims: Arc<Claims>,
    /// `once`, `dnat`, `ksnat`, `fwd`: gone once the connection is in.
    pub(super) elements: Mutex<Vec<Element>>,
    /// The claim and the port's lease, until the plan ends and hands them
    /// to [`Claims::linger`].
    pub(super) end: Mutex<Option<(Element, PortLease)>>,
    pub(super) port: u16,
    pub(super) linger: Duration,
    /// The session's event channel: closed when the session ends.
    pub(super) session: mpsc::UnboundedSender<DataEvent>,
    /// Counts the plan in [`super::KernelBackend::plans`] while it exists.
    pub(super) _live: Live,
}

fn take<T: Default>(m: &Mutex<T>) -> T {
    match m.lock() {
        Ok(mut e) => std::mem::take(&mut *e),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    }
}

impl Held {
    pub(super) async fn remove(&self) {
        let elements = take(&self.elements);
        if elements.is_empty() {
            return;
        }
        let mut shared = self.shared.lock().await;
        let gone: Vec<_> = elements
            .into_iter()
            .filter(|e| {
                if !keyed_by_endpoint(e) {
                    return true;
                }
                let Some(n) = shared.get_mut(e) else {
                    return true;
                };
                *n = n.saturating_sub(1);
                if *n == 0 {
                    shared.remove(e);
                    true
                } else {
                    false
                }
            })
            .collect();
        self.table.remove_each(&gone).await;
    }

    /// The plan is over: removes its elements and lets the claim linger.
    /// Whoever comes first (the plan's task or its guard) does it.
    pub(super) async fn end(&self) {
        self.remove().await;
        if let Some((claim, lease)) = take(&self.end) {
            self.claims
                .linger(
                    &self.table,
                    claim,
                    self.port,
                    self.linger,
                    &self.session,
                    lease,
                )
                .await;
        }
    }

    /// Keeps the claim alive while the connection runs.
    pub(super) async fn refresh_claim(&self, timeout: Duration) {
        let claim = match self.end.lock() {
            Ok(e) => e.as_ref().map(|(c, _)| *c),
            Err(p) => p.into_inner().as_ref().map(|(c, _)| *c),
        };
        if let Some(claim) = claim {
            if let Err(e) = self.table.refresh(claim, timeout).await {
                tracing::warn!(table = %self.table.name(), "nft: claim not refreshed: {e}");
            }
        }
    }
}

/// The `ksnat` and `fwd` elements are keyed by (peer, real endpoint), which
/// two live plans can share (a server reuses its passive port for the same
/// client). Counts how many live plans hold each, so that one plan's end
/// does not remove another's.
pub(super) type Shared = tokio::sync::Mutex<HashMap<Element, usize>>;

/// Whether `e` is one of the elements [`Shared`] counts.
pub(super) fn keyed_by_endpoint(e: &Element) -> bool {
    matches!(e, Element::Snat { .. } | Element::Forward { .. })
}

/// Claims whose plan has ended, by port. A port's next plan removes the
/// lingering claim before it announces the port.
#[derive(Debug, Default)]
pub(super) struct Claims {
    lingering: tokio::sync::Mutex<HashMap<u16, (u64, Element)>>,
    next: AtomicU64,
}

impl Claims {
    /// Removes the lingering claim on `port`, if any: the port has a new
    /// plan.
    pub(super) async fn release(&self, table: &InterceptTable, port: u16) {
        let mut lingering = self.lingering.lock().await;
        if let Some((_, claim)) = lingering.remove(&port) {
            table.remove_each(&[claim]).await;
        }
    }

    /// Keeps `claim` for `linger` more, until `session` ends, or until
    /// [`Claims::release`], whichever comes first. The port returns to its
    /// pool only once the claim is registered here, so its next plan finds
    /// it.
    async fn linger(
        self: &Arc<Self>,
        table: &Arc<InterceptTable>,
        claim: Element,
        port: u16,
        linger: Duration,
        session: &mpsc::UnboundedSender<DataEvent>,
        lease: PortLease,
    ) {
        if session.is_closed() {
            table.remove_each(&[claim]).await;
            return;
        }
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut lingering = self.lingering.lock().await;
            if let Err(e) = table.refresh(claim, linger).await {
                tracing::warn!(table = %table.name(), "nft: claim not refreshed: {e}");
            }
            lingering.insert(port, (generation, claim));
        }
        drop(lease);
        let (claims, table, session) = (self.clone(), table.clone(), session.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = session.closed() => {}
                _ = tokio::time::sleep(linger) => {}
            }
            let mut lingering = claims.lingering.lock().await;
            if lingering.get(&port).map(|(g, _)| *g) == Some(generation) {
                lingering.remove(&port);
                table.remove_each(&[claim]).await;
            }
        });
    }
}
