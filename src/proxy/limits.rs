//! `max_sessions` and `max_sessions_per_client`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Counts open sessions, in total and per client address.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    inner: Arc<Mutex<Counts>>,
    /// Shared so that a reload reaches every clone.
    max: Arc<AtomicUsize>,
    per_client: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// A session's place under the limits; given back when dropped.
#[derive(Debug)]
pub struct SessionSlot {
    limits: SessionLimits,
    client: IpAddr,
}

/// Which limit refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitHit {
    /// `max_sessions`
    Total(usize),
    /// `max_sessions_per_client`
    PerClient(usize),
}

impl SessionLimits {
    /// Limits of `max` sessions, `per_client` from one address.
    pub fn new(max: usize, per_client: usize) -> Self {
        SessionLimits {
            inner: Arc::new(Mutex::new(Counts::default())),
            max: Arc::new(AtomicUsize::new(max)),
            per_client: Arc::new(AtomicUsize::new(per_client)),
        }
    }

    /// New limits for sessions acquired from now on; sessions already open
    /// stay open even when they are now over the limit.
    pub fn set(&self, max: usize, per_client: usize) {
        self.max.store(max, Ordering::Relaxed);
        self.per_client.store(per_client, Ordering::Relaxed);
    }

    /// Takes a slot for `client`, or says which limit is reached.
    pub(crate) fn acquire(&self, client: IpAddr) -> Result<SessionSlot, LimitHit> {
        let max = self.max.load(Ordering::Relaxed);
        let per_client = self.per_client.load(Ordering::Relaxed);
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= max {
            return Err(LimitHit::Total(max));
        }
        let n = c.by_client.entry(client).or_insert(0);
        if *n >= per_client {
            return Err(LimitHit::PerClient(per_client));
        }
        *n += 1;
        c.total += 1;
        Ok(SessionSlot {
            limits: self.clone(),
            client,
        })
    }

    /// Sessions open now.
    pub fn open(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut c = self.limits.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                c.by_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_and_release() {
        let l = SessionLimits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = l.acquire(a).unwrap();
        let _s2 = l.acquire(a).unwrap();
        assert_eq!(l.acquire(a).unwrap_err(), LimitHit::PerClient(2));
        let _s3 = l.acquire(b).unwrap();
        assert_eq!(l.acquire(b).unwrap_err(), LimitHit::Total(3));
        drop(s1);
        assert_eq!(l.open(), 2);
        assert!(l.acquire(a).is_ok());
    }

    #[test]
    fn new_limits_apply_to_new_sessions_only() {
        let l = SessionLimits::new(10, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let _s1 = l.acquire(a).unwrap();
        let _s2 = l.acquire(a).unwrap();
        // A clone (as each session holds) sees the change too.
        l.clone().set(10, 1);
        assert_eq!(l.open(), 2, "open sessions stay");
        assert_eq!(l.acquire(a).unwrap_err(), LimitHit::PerClient(1));
        l.set(10, 3);
        assert!(l.acquire(a).is_ok());
    }
}
