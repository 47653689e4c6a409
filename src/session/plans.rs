//! A session's data plans and the legs they are made of.

use super::{AfterOpen, LegMode, TransferMode};
use crate::pinhole::{Leg, Opened, PlanId};
use std::collections::HashMap;
use std::net::SocketAddr;

/// Where a plan is in its life. Done is its removal from [`Plans`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Asked of the shell, whose result has not come.
    Opening,
    /// Open: its listen legs wait for their peers.
    Listening,
    /// Every leg connected; bytes flow.
    Connected,
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    mode: TransferMode,
    client_dials: bool,
    stage: Stage,
    /// Where its listen legs listen, once open.
    opened: Option<Opened>,
}

/// The session's data plans, from the open asked of the shell to their
/// end. A plan is armed from its open until a transfer command takes it or
/// a newer plan replaces it. Every way out of a plan goes through
/// [`Plans::remove`], so none leaves a stale armed or opening mark.
#[derive(Debug)]
pub(super) struct Plans {
    next: PlanId,
    live: HashMap<PlanId, Plan>,
    /// The plan the next transfer command will use.
    armed: Option<PlanId>,
    /// The open in flight and what follows it; no input is processed
    /// meanwhile. Kept apart from the plan, which its task may end first:
    /// the command it answers is still owed its reply.
    opening: Option<(PlanId, AfterOpen)>,
}

impl Plans {
    pub(super) fn new() -> Self {
        Plans {
            next: 1,
            live: HashMap::new(),
            armed: None,
            opening: None,
        }
    }

    /// A new plan of these legs, armed and opening. A leg where the gateway
    /// listens is passive on that side; one where it connects is active.
    pub(super) fn begin(&mut self, client: &Leg, server: &Leg, after: AfterOpen) -> PlanId {
        let id = self.next;
        self.next += 1;
        let client_dials = matches!(client, Leg::Connect { .. });
        let client = if client_dials {
            LegMode::Active
        } else {
            LegMode::Passive
        };
        let server = match server {
            Leg::Listen { .. } => LegMode::Active,
            Leg::Connect { .. } => LegMode::Passive,
        };
        let plan = Plan {
            mode: TransferMode::Legs { client, server },
            client_dials,
            stage: Stage::Opening,
            opened: None,
        };
        self.live.insert(id, plan);
        self.armed = Some(id);
        self.opening = Some((id, after));
        id
    }

    /// True while an open is in flight.
    pub(super) fn is_opening(&self) -> bool {
        self.opening.is_some()
    }

    /// The open of plan `id` finished: what was to follow it, if `id` is
    /// the plan being opened. A plan that failed to open is done; one that
    /// opened listens at `opened`.
    pub(super) fn open_result(&mut self, id: PlanId, opened: Option<Opened>) -> Option<AfterOpen> {
        let (want, after) = self.opening?;
        if want != id {
            return None;
        }
        self.opening = None;
        match opened {
            Some(opened) => {
                if let Some(p) = self.live.get_mut(&id) {
                    p.stage = Stage::Listening;
                    p.opened = Some(opened);
                }
            }
            None => {
                self.remove(id);
            }
        }
        Some(after)
    }

    /// Every leg of `id` connected.
    pub(super) fn connected(&mut self, id: PlanId) {
        if let Some(p) = self.live.get_mut(&id) {
            p.stage = Stage::Connected;
        }
    }

    /// The plan is done: closed by the session, or ended by its task. True
    /// if it had connected; `None` if it was not live.
    pub(super) fn remove(&mut self, id: PlanId) -> Option<bool> {
        let plan = self.live.remove(&id)?;
        if self.armed == Some(id) {
            self.armed = None;
        }
        Some(plan.stage == Stage::Connected)
    }

    /// A transfer command takes the armed plan, if any, and its modes.
    pub(super) fn take_armed(&mut self) -> (Option<PlanId>, TransferMode) {
        let id = self.armed.take();
        let mode = id
            .and_then(|id| self.live.get(&id))
            .map_or(TransferMode::None, |p| p.mode);
        (id, mode)
    }

    /// Disarms the armed plan; returns it if it never connected, so the
    /// caller closes it. A plan a transfer command took is not armed.
    pub(super) fn disarm_unused(&mut self) -> Option<PlanId> {
        let id = self.armed.take()?;
        self.live
            .get(&id)
            .is_some_and(|p| p.stage != Stage::Connected)
            .then_some(id)
    }

    /// True while `id` is open and not yet connected.
    pub(super) fn is_unconnected(&self, id: PlanId) -> bool {
        self.live
            .get(&id)
            .is_some_and(|p| p.stage != Stage::Connected)
    }

    /// True until `id` is done.
    pub(super) fn is_live(&self, id: PlanId) -> bool {
        self.live.contains_key(&id)
    }

    /// True when the gateway dials the client for `id` (an active client
    /// leg) and the plan is live.
    pub(super) fn dials_client(&self, id: PlanId) -> bool {
        self.live.get(&id).is_some_and(|p| p.client_dials)
    }

    /// Where `id`'s client listen leg listens, once it is open.
    pub(super) fn client_listen(&self, id: PlanId) -> Option<SocketAddr> {
        self.live.get(&id)?.opened?.client_listen
    }

    /// Every live plan, in no order.
    pub(super) fn ids(&self) -> Vec<PlanId> {
        self.live.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::ClientAsk;
    use std::net::IpAddr;

    fn listen() -> Leg {
        Leg::Listen {
            bind: IpAddr::from([192, 0, 2, 1]),
            peer: IpAddr::from([198, 51, 100, 7]),
        }
    }

    fn connect() -> Leg {
        Leg::Connect {
            target: "10.0.0.3:50000".parse().unwrap(),
            bind: IpAddr::from([10, 0, 0, 1]),
        }
    }

    fn opened() -> Opened {
        Opened {
            client_listen: Some("192.0.2.1:40000".parse().unwrap()),
            server_listen: None,
        }
    }

    #[test]
    fn a_plan_goes_from_opening_to_done() {
        let mut p = Plans::new();
        let after = AfterOpen::ReplyPassive(ClientAsk::Pasv);
        let id = p.begin(&listen(), &connect(), after);
        assert!(p.is_opening());
        assert_eq!(p.client_listen(id), None, "no port before the open");
        assert_eq!(p.open_result(id + 1, Some(opened())), None, "not this one");
        assert_eq!(p.open_result(id, Some(opened())), Some(after));
        assert!(!p.is_opening());
        assert_eq!(p.client_listen(id), opened().client_listen);
        assert!(p.is_unconnected(id));
        p.connected(id);
        assert!(!p.is_unconnected(id));
        assert_eq!(p.remove(id), Some(true), "it had connected");
        assert!(!p.is_live(id));
        assert_eq!(p.remove(id), None, "done once");
        assert_eq!(p.take_armed(), (None, TransferMode::None));
    }

    #[test]
    fn a_failed_open_is_done_and_disarmed() {
        let mut p = Plans::new();
        let after = AfterOpen::SendPort(ClientAsk::Port);
        let id = p.begin(&connect(), &listen(), after);
        assert_eq!(p.open_result(id, None), Some(after));
        assert!(!p.is_live(id) && !p.is_opening());
        assert_eq!(p.take_armed(), (None, TransferMode::None));
        assert!(p.ids().is_empty());
    }

    #[test]
    fn a_transfer_takes_the_armed_plan_and_its_modes() {
        let mut p = Plans::new();
        let after = AfterOpen::SendPort(ClientAsk::Port);
        let id = p.begin(&connect(), &listen(), after);
        p.open_result(id, Some(opened()));
        assert!(p.dials_client(id));
        let (taken, mode) = p.take_armed();
        assert_eq!(taken, Some(id));
        assert_eq!(mode.as_label(), "active/active");
        assert_eq!(p.disarm_unused(), None, "a taken plan is not replaced");
        assert!(p.is_live(id));
    }

    #[test]
    fn only_an_unconnected_armed_plan_is_replaced() {
        let mut p = Plans::new();
        let after = AfterOpen::ReplyPassive(ClientAsk::Epsv);
        let id = p.begin(&listen(), &connect(), after);
        p.open_result(id, Some(opened()));
        assert_eq!(p.disarm_unused(), Some(id));
        assert_eq!(p.take_armed().0, None, "disarmed");
        let next = p.begin(&listen(), &connect(), after);
        assert_ne!(next, id);
        p.open_result(next, Some(opened()));
        p.connected(next);
        assert_eq!(p.disarm_unused(), None, "a connected plan stays");
    }
}
