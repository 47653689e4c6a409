//! A session's data plans and the legs they are made of.

use super::*;
use std::collections::HashMap;

/// Where a plan is in its life. Done is its removal from [`Plans`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Asked of the shell, whose result has not come.
    Opening,
    /// Open: its listen legs wait for their peers.
    Listening,
    /// Its legs are connected and their TLS handshakes under way.
    Handshaking,
    /// Every leg connected; bytes flow.
    Connected,
}

#[derive(Debug, Clone)]
struct Plan {
    mode: TransferMode,
    client_dials: bool,
    stage: Stage,
    /// Where its listen legs listen, once open.
    opened: Option<Opened>,
    /// What its TLS legs negotiated, once secured.
    tls: DataTls,
}

/// The session's data plans, from the open asked of the shell to their
/// end. A plan is armed from its open until a transfer command takes it or
/// a newer plan replaces it. Every way out of a plan (closed, failed to
/// open, ended by its task) goes through [`Plans::remove`], which disarms
/// it too, so no caller can forget to.
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
            tls: DataTls::default(),
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

    /// The legs of `id` are connected; their TLS handshakes have begun.
    pub(super) fn handshaking(&mut self, id: PlanId) {
        if let Some(p) = self.live.get_mut(&id) {
            p.stage = Stage::Handshaking;
        }
    }

    /// True while the TLS handshakes of `id` are under way.
    pub(super) fn is_handshaking(&self, id: PlanId) -> bool {
        self.live
            .get(&id)
            .is_some_and(|p| p.stage == Stage::Handshaking)
    }

    /// The TLS legs of `id` are up, with these versions and ciphers.
    pub(super) fn secured(&mut self, id: PlanId, tls: DataTls) {
        if let Some(p) = self.live.get_mut(&id) {
            p.tls = tls;
        }
    }

    /// What the TLS legs of `id` negotiated (none known: clear text).
    pub(super) fn tls(&self, id: PlanId) -> DataTls {
        self.live
            .get(&id)
            .map(|p| p.tls.clone())
            .unwrap_or_default()
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

impl Session {
    pub(super) fn after_open(&mut self, id: PlanId, after: AfterOpen, opened: Opened) {
        match after {
            AfterOpen::ReplyPassive(ask) => {
                let reply = self.passive_announcement(ask, id);
                self.reply_now(reply);
            }
            AfterOpen::ReplyPortOk(ask) => {
                self.reply_now(rewrite::reply(
                    200,
                    &format!("{} command successful", ask.verb()),
                ));
            }
            AfterOpen::SendPort(ask) => {
                let Some(addr) = opened.server_listen else {
                    self.close_plan(id);
                    self.refuse(
                        ask.verb(),
                        425,
                        "Can't open data connection: no server listener",
                    );
                    return;
                };
                let cmd = match addr {
                    SocketAddr::V4(a) => rewrite::port(a),
                    SocketAddr::V6(_) => rewrite::eprt(addr),
                };
                self.queue.push_back(Pending::SentPort { ask, plan: id });
                self.push(Action::ToServer(cmd));
            }
        }
    }

    /// The 227/229 that tells the client where to connect for plan `id`.
    pub(super) fn passive_announcement(&mut self, ask: ClientAsk, id: PlanId) -> Vec<u8> {
        let Some(port) = self.plans.client_listen(id).map(|a| a.port()) else {
            self.close_plan(id);
            return rewrite::reply(425, "Can't open data connection: no client listener");
        };
        match (ask, self.announce_ip()) {
            (ClientAsk::Pasv, IpAddr::V4(ip)) => rewrite::reply_227(SocketAddrV4::new(ip, port)),
            (ClientAsk::Pasv, IpAddr::V6(_)) => {
                self.close_plan(id);
                rewrite::reply(
                    425,
                    "Can't open data connection: no IPv4 address to announce",
                )
            }
            _ => rewrite::reply_229(port),
        }
    }

    /// The gateway listens for the client, and admits only the client.
    pub(super) fn client_listen_leg(&self) -> Leg {
        Leg::Listen {
            bind: self.client_bind(),
            peer: self.params.client.ip(),
        }
    }

    /// The gateway connects to the client's (already checked) address.
    pub(super) fn client_connect_leg(&self, target: SocketAddr) -> Leg {
        Leg::Connect {
            target,
            bind: self.client_bind(),
        }
    }

    /// The gateway listens for the server, and admits only the server.
    pub(super) fn server_listen_leg(&self) -> Leg {
        Leg::Listen {
            bind: self.params.server_local.ip(),
            peer: self.params.server.ip(),
        }
    }

    /// Opens a plan of these two legs. A leg where the gateway listens is
    /// passive on that side; one where it connects is active.
    ///
    /// The plan it supersedes, if still unused, is closed first: pipelined
    /// PASVs are all read before the first 227 comes back, so this, not the
    /// command, is where a session is held to one unused pinhole per leg.
    /// Closed before the open, so its ports are back in the pools (and in
    /// the client's share) when the new plan takes its own.
    pub(super) fn open(&mut self, client: Leg, server: Leg, after: AfterOpen) {
        self.drop_unused_plan();
        let id = self.plans.begin(&client, &server, after);
        let plan = DataPlan {
            id,
            client,
            server,
            client_view: self.client_view(),
            // Each leg follows its own PROT: the client's, and the
            // gateway's own toward the server.
            tls: {
                let (client, server) = self.data_protection();
                crate::pinhole::PlanTls { client, server }
            },
        };
        self.push(Action::Open(plan));
    }

    pub(super) fn close_plan(&mut self, id: PlanId) {
        if self.plans.remove(id).is_some() {
            self.push(Action::Close(id));
        }
        // A closed plan sends no Closed event: settle its transfer here.
        if let Some(t) = self.transfers.iter_mut().find(|t| t.plan == Some(id)) {
            t.data
                .get_or_insert((0, 0, DataOutcome::Failed(DataFailure::NoDataConnection)));
        }
    }

    /// A new PASV/PORT replaces a pinhole that was never used. A plan a
    /// transfer command took is no longer armed, and is left alone.
    pub(super) fn drop_unused_plan(&mut self) {
        if let Some(id) = self.plans.disarm_unused() {
            self.close_plan(id);
        }
    }

    /// Ports below 1024 are never accepted; others must be in `data_ports`.
    pub(super) fn check_port(&self, port: u16) -> Result<(), String> {
        if port < 1024 {
            return Err(format!("privileged port {port}"));
        }
        let range = self.params.policy.data_ports;
        if !range.contains(port) {
            return Err(format!("port {port} outside allowed data ports {range}"));
        }
        Ok(())
    }

    pub(super) fn client_view(&self) -> Option<IpAddr> {
        self.params.transparent.then(|| self.params.server.ip())
    }

    /// In transparent mode the local address may not be ours (tproxy), and
    /// the backend makes the client see the server's address anyway.
    pub(super) fn client_bind(&self) -> IpAddr {
        if self.params.transparent {
            match self.params.client {
                SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            }
        } else {
            self.params.client_local.ip()
        }
    }

    /// The address the client believes is the server.
    pub(super) fn announce_ip(&self) -> IpAddr {
        if self.params.transparent {
            return self.params.server.ip();
        }
        match self.params.announce {
            Some(ip) if ip.is_ipv4() == self.params.client.is_ipv4() => ip,
            _ => self.params.client_local.ip(),
        }
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
