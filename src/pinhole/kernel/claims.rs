//! What a kernel plan holds (elements in the gateway's table, its
//! expectation, its claim), and the claims that outlive it: a port's claim
//! lingers after its plan until the port's next plan or the claim's own
//! timeout in the kernel, whichever comes first.

use crate::netfilter::conntrack::Expectations;
use crate::netfilter::ctnetlink::Expectation;
use crate::netfilter::{Element, InterceptTable};
use crate::pinhole::PortLease;
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::time::Instant;

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

/// Kernel plans opened, for /metrics (`ftpgate_kernel_plans_total`).
pub(crate) static PLANS: LazyLock<Counter> = LazyLock::new(Counter::default);
/// Netlink messages sent for kernel plans (nf_tables transactions,
/// expectation requests, reads of a finished connection's counters), for
/// /metrics
/// (`ftpgate_kernel_netlink_messages_total`): divided by
/// [`PLANS`], the messages per pinhole.
pub(crate) static NETLINK_MESSAGES: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Netlink messages the kernel backend sent for its plans, and the plans
/// opened (also counted in [`PLANS`] and [`NETLINK_MESSAGES`]).
#[derive(Debug, Default)]
pub struct Messages {
    /// Plans opened.
    pub plans: AtomicU64,
    /// nf_tables batches, ctnetlink expectation requests and counter reads
    /// sent for them.
    pub sent: AtomicU64,
}

impl Messages {
    pub(super) fn sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
        NETLINK_MESSAGES.inc_by(n);
    }

    pub(super) fn opened(&self) {
        self.plans.fetch_add(1, Ordering::Relaxed);
        PLANS.inc();
    }
}

/// The claim on a port and when the kernel drops it by itself.
#[derive(Debug, Clone, Copy)]
pub(super) struct Claim {
    pub(super) element: Element,
    pub(super) expires: Instant,
}

/// What a plan still holds.
pub(super) struct Held {
    pub(super) table: Arc<InterceptTable>,
    pub(super) shared: Arc<Shared>,
    pub(super) claims: Arc<Claims>,
    pub(super) expectations: Arc<tokio::sync::Mutex<Expectations>>,
    pub(super) messages: Arc<Messages>,
    /// `dnat`, `ksnat`: gone
    /// once the connection is in. `once` is left to its timeout.
    pub(super) elements: Mutex<Vec<Element>>,
    /// The expectation (and its number in `pending`), until a connection
    /// takes it or the plan ends.
    pub(super) expectation: Mutex<Option<(u64, Expectation)>>,
    /// The backend's waiting expectations, this plan's among them.
    pub(super) pending: super::Pending,
    /// The claim and the port's lease, until the plan ends and hands them
    /// to [`Claims::linger`].
    pub(super) end: Mutex<Option<(Claim, PortLease)>>,
    pub(super) port: u16,
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
    /// The connection is in: the kernel took the expectation, and the
    /// NAT maps' elements have done their job.
    pub(super) async fn connected(&self) {
        if let Some((id, _)) = take(&self.expectation) {
            super::unwait(&self.pending, id);
        }
        self.remove().await;
    }

    async fn remove(&self) {
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
        if !gone.is_empty() {
            self.messages.sent(1);
            self.table.remove_each(&gone).await;
        }
    }

    /// The plan is over: deletes an expectation no connection took,
    /// removes its elements and lets the claim linger. Whoever comes first
    /// (the plan's task or its guard) does it.
    pub(super) async fn end(&self) {
        if let Some((id, exp)) = take(&self.expectation) {
            super::unwait(&self.pending, id);
            self.messages.sent(1);
            let deleted = self.expectations.lock().await.delete(&exp).await;
            if let Err(e) = deleted {
                // The `once` element's timeout still closes the pinhole.
                tracing::warn!(port = self.port, "conntrack: expectation not deleted: {e}");
            }
        }
        self.remove().await;
        if let Some((claim, lease)) = take(&self.end) {
            self.claims.linger(claim, self.port, lease).await;
        }
    }

    /// Keeps the claim alive while the connection runs.
    pub(super) async fn refresh_claim(&self, timeout: Duration) {
        let claim = match self.end.lock() {
            Ok(e) => e.as_ref().map(|(c, _)| c.element),
            Err(p) => p.into_inner().as_ref().map(|(c, _)| c.element),
        };
        if let Some(claim) = claim {
            self.messages.sent(1);
            match self.table.refresh(claim, timeout).await {
                Ok(()) => {
                    let expires = Instant::now() + timeout;
                    let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some((c, _)) = end.as_mut() {
                        c.expires = expires;
                    }
                }
                Err(e) => {
                    tracing::warn!(table = %self.table.name(), "nft: claim not refreshed: {e}")
                }
            }
        }
    }
}

/// The `ksnat` elements are keyed by (peer, real endpoint), which two live
/// plans can share (a server reuses its passive port for the same client).
/// Counts how many live plans hold each, so that one plan's end does not
/// remove another's.
pub(super) type Shared = tokio::sync::Mutex<HashMap<Element, usize>>;

/// Whether `e` is one of the elements [`Shared`] counts.
pub(super) fn keyed_by_endpoint(e: &Element) -> bool {
    matches!(e, Element::Snat { .. })
}

/// Claims whose plan has ended, by port, until the kernel drops them. The
/// port's next plan takes over (kernel) or removes (relay) a lingering claim
/// before it announces the port.
#[derive(Debug, Default)]
pub(super) struct Claims {
    lingering: tokio::sync::Mutex<HashMap<u16, (u64, Claim)>>,
    next: AtomicU64,
}

impl Claims {
    /// The lingering claim on `port`, if any, forgotten here: the caller
    /// removes it from the kernel.
    pub(super) async fn take(&self, port: u16) -> Option<Element> {
        let mut lingering = self.lingering.lock().await;
        lingering.remove(&port).map(|(_, c)| c.element)
    }

    /// The lingering claim on `port`, if any, with its generation, left in
    /// place: the port's new plan removes it from here with
    /// [`Claims::forget`] only once its transaction removed (or renewed) it
    /// in the kernel. Were it forgotten first and the transaction failed,
    /// the claim would stay in the kernel with nothing to release it.
    pub(super) async fn peek(&self, port: u16) -> Option<(u64, Element)> {
        let lingering = self.lingering.lock().await;
        lingering.get(&port).map(|(g, c)| (*g, c.element))
    }

    /// Forgets the lingering claim on `port` of `generation`, which the
    /// port's new plan has taken over in the kernel.
    pub(super) async fn forget(&self, port: u16, generation: u64) {
        let mut lingering = self.lingering.lock().await;
        if lingering.get(&port).map(|(g, _)| *g) == Some(generation) {
            lingering.remove(&port);
        }
    }

    /// Removes the lingering claim on `port`, if any: the relay listens on
    /// the port now.
    pub(super) async fn release(&self, table: &InterceptTable, port: u16) {
        if let Some(claim) = self.take(port).await {
            table.remove_each(&[claim]).await;
        }
    }

    /// Keeps `claim` until its timeout in the kernel (at least
    /// `pinhole_timeout` from now: see `KernelBackend::install`), or until
    /// the port's next plan, whichever comes first. The port returns to
    /// its pool only once the claim is registered here, so its next plan
    /// finds it. No netlink message: the kernel expires the element.
    async fn linger(self: &Arc<Self>, claim: Claim, port: u16, lease: PortLease) {
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        self.lingering
            .lock()
            .await
            .insert(port, (generation, claim));
        drop(lease);
        let claims = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(claim.expires).await;
            let mut lingering = claims.lingering.lock().await;
            if lingering.get(&port).map(|(g, _)| *g) == Some(generation) {
                lingering.remove(&port);
            }
        });
    }
}
