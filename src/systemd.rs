//! systemd readiness notifications (`Type=notify`). Without `NOTIFY_SOCKET`
//! (not started by systemd) each call does nothing.

use sd_notify::NotifyState;

/// Tells systemd the gateway is serving: every listener is bound. Also sent
/// after a reload finishes.
pub fn notify_ready() {
    send(&[NotifyState::Ready]);
}

/// Tells systemd a reload (SIGHUP) has started; follow with [`notify_ready`]
/// when the new configuration is in force or the old one kept.
pub fn notify_reloading() {
    // systemd ≥ 253 matches RELOADING=1 with a monotonic timestamp.
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Tells systemd the gateway is stopping, so it does not wait for READY.
pub fn notify_stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState<'_>]) {
    // Keep NOTIFY_SOCKET set: reloads notify again later.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("systemd notification failed: {e}");
    }
}
