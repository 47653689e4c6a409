//! FTPS under `tls: terminate`: the gateway answers AUTH TLS, PBSZ and
//! PROT itself on the client leg, and negotiates the server leg on its
//! own (upstream_tls), each leg with its own protection.

use super::*;

impl Session {
    /// AUTH from the client under `tls: terminate`.
    pub(super) fn auth_terminate(&mut self, mechanism: &str) {
        let m = mechanism.to_ascii_uppercase();
        if !matches!(m.as_str(), "TLS" | "TLS-C" | "SSL") {
            self.refuse("AUTH", 504, "AUTH mechanism not supported; use AUTH TLS");
            return;
        }
        if self.client_tls != LegTls::Plain {
            self.refuse("AUTH", 503, "TLS is already in use on this connection");
            return;
        }
        if !self.params.tls.client_cert {
            self.refuse(
                "AUTH",
                534,
                "TLS not offered: this listener has no certificate (listener `tls`)",
            );
            return;
        }
        if self.server_tls == LegTls::Plain && !self.params.tls.allow_downgrade {
            self.refuse(
                "AUTH",
                534,
                "TLS refused: the server leg is clear text and upstream_tls.allow_downgrade is off",
            );
            return;
        }
        // CVE-2011-0411 class: whatever came behind AUTH TLS in clear text
        // was not protected, so it is dropped, never run after the
        // handshake.
        let behind = self.client_in.take_buffered();
        if !behind.is_empty() {
            self.log(LogEvent::DiscardedAfterAuth(behind.len()));
        }
        self.client_tls = LegTls::Starting;
        let reply = rewrite::reply(234, "AUTH TLS successful");
        if self.queue.is_empty() {
            self.push(Action::ToClient(reply));
            self.push(Action::StartTls(Side::Client));
        } else {
            self.queue.push_back(Pending::LocalAuth(reply));
        }
    }

    /// PBSZ from the client under `tls: terminate`.
    pub(super) fn pbsz_terminate(&mut self) {
        if self.client_tls != LegTls::Up {
            self.refuse("PBSZ", 503, "PBSZ needs AUTH TLS first");
        } else {
            self.reply_local(200, "PBSZ=0");
        }
    }

    /// PROT from the client under `tls: terminate`: recorded for the
    /// client leg's data connections only.
    pub(super) fn prot_terminate(&mut self, arg: &[u8]) {
        if self.client_tls != LegTls::Up {
            self.refuse("PROT", 503, "PROT needs AUTH TLS first");
            return;
        }
        match arg.trim_ascii().to_ascii_uppercase().as_slice() {
            b"C" => {
                self.client_prot_p = false;
                self.reply_local(200, "Protection level set to Clear");
            }
            b"P" if self.params.tls.data_tls => {
                self.client_prot_p = true;
                self.reply_local(200, "Protection level set to Private");
            }
            b"P" => self.refuse(
                "PROT",
                536,
                "PROT P not available: this gateway does not carry TLS data connections yet; use PROT C",
            ),
            b"S" | b"E" => self.refuse("PROT", 536, "Only PROT C and PROT P are supported"),
            _ => self.refuse("PROT", 504, "PROT takes C, S, E or P"),
        }
    }

    /// USER is checked against `require_tls` and the downgrade setting.
    /// True when it may go on.
    pub(super) fn user_allowed(&mut self) -> bool {
        let client = self.client_tls == LegTls::Up;
        let server = self.server_tls == LegTls::Up;
        if !client && self.params.policy.require_tls {
            self.refuse(
                "USER",
                530,
                "TLS required by gateway policy: send AUTH TLS first",
            );
            return false;
        }
        if client != server {
            if !self.params.tls.allow_downgrade {
                self.refuse(
                    "USER",
                    530,
                    "TLS required: the server leg is TLS and upstream_tls.allow_downgrade is off; send AUTH TLS first",
                );
                return false;
            }
            if !self.downgrade_logged {
                self.downgrade_logged = true;
                let what = if client {
                    "client leg TLS, server leg clear text"
                } else {
                    "client leg clear text, server leg TLS"
                };
                self.log(LogEvent::Downgrade(what.to_string()));
            }
        }
        true
    }

    /// A transfer under PROT C where the rule requires PROT P: refused.
    /// True when it may go on.
    pub(super) fn prot_allows_transfer(&mut self, verb: &str) -> bool {
        if self.params.policy.require_prot_p && !self.client_prot_p {
            self.refuse(
                verb,
                521,
                "Data connection protection required by gateway policy (PROT P)",
            );
            return false;
        }
        true
    }

    /// Sends the server a command of the gateway's own.
    pub(super) fn own_command(&mut self, cmd: OwnCommand) {
        let wire: &[u8] = match cmd {
            OwnCommand::Auth => b"AUTH TLS\r\n",
            OwnCommand::Pbsz => b"PBSZ 0\r\n",
            OwnCommand::Prot if self.params.tls.data_tls => b"PROT P\r\n",
            OwnCommand::Prot => b"PROT C\r\n",
        };
        self.queue.push_back(Pending::Own(cmd));
        self.push(Action::ToServer(wire.to_vec()));
    }

    /// The server's greeting came: an upstream in TLS is negotiated
    /// before any client command goes to it.
    pub(super) fn after_greeting(&mut self, code: u16) {
        if !(200..300).contains(&code) || self.server_ready {
            return;
        }
        match self.server_tls {
            LegTls::Plain => {
                self.server_tls = LegTls::Asking;
                self.own_command(OwnCommand::Auth);
            }
            // Implicit: TLS is up since the connect.
            LegTls::Up => {
                self.own_command(OwnCommand::Pbsz);
                self.own_command(OwnCommand::Prot);
            }
            LegTls::Asking | LegTls::Starting => {}
        }
    }

    /// The reply to one of the gateway's own commands; not forwarded.
    pub(super) fn own_reply(&mut self, cmd: OwnCommand, code: u16, raw: &[u8]) {
        let ok = (200..300).contains(&code);
        match cmd {
            OwnCommand::Auth if code == 234 => {
                self.server_tls = LegTls::Starting;
                self.push(Action::StartTls(Side::Server));
            }
            OwnCommand::Pbsz if ok => {}
            OwnCommand::Prot if ok => {
                self.server_prot_p = self.params.tls.data_tls;
                self.server_ready = true;
            }
            _ => {
                let verb = match cmd {
                    OwnCommand::Auth => "AUTH TLS",
                    OwnCommand::Pbsz => "PBSZ 0",
                    OwnCommand::Prot if self.params.tls.data_tls => "PROT P",
                    OwnCommand::Prot => "PROT C",
                };
                let why = format!(
                    "server refused the gateway's {verb} ({code} {})",
                    replies::lossy_tail(raw)
                );
                self.push(Action::ToClient(rewrite::reply(
                    421,
                    &format!("Service not available: {why}"),
                )));
                self.end(EndReason::ServerTls(why));
            }
        }
    }

    /// The reply the client gets, in place of the server's final reply,
    /// for a transfer whose data connection failed its TLS handshake: the
    /// server saw only a data connection that closed, and would report
    /// something else. `None` for any other transfer.
    pub(super) fn tls_failure_reply(&self) -> Option<Vec<u8>> {
        let t = self.transfers.iter().find(|t| t.reply.is_none())?;
        let Some((_, _, DataOutcome::Failed(why @ DataFailure::Tls { .. }))) = &t.data else {
            return None;
        };
        Some(if why.not_resumed() {
            rewrite::reply(522, "SSL connection failed: session reuse required")
        } else {
            rewrite::reply(425, &format!("Can't open data connection: {why}"))
        })
    }

    /// The gateway's own FEAT lines toward the client under `tls:
    /// terminate` (the server's AUTH/PBSZ/PROT/CCC lines are dropped).
    pub(super) fn feat_additions(&self) -> Option<Vec<Vec<u8>>> {
        (self.params.policy.tls == TlsPolicy::Terminate && self.params.tls.client_cert).then(|| {
            vec![
                b" AUTH TLS\r\n".to_vec(),
                b" PBSZ\r\n".to_vec(),
                b" PROT\r\n".to_vec(),
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortRange;

    fn session(tls: TlsLegs, require_tls: bool, require_prot_p: bool) -> Session {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        Session::new(SessionParams {
            client: sa("198.51.100.7:50000"),
            client_local: sa("192.0.2.1:21"),
            server: sa("10.0.0.3:21"),
            server_local: sa("10.0.0.1:40123"),
            transparent: false,
            announce: None,
            policy: Policy {
                rule: "t".into(),
                modes: vec![DataMode::Passive, DataMode::Active],
                server_mode: ServerMode::Same,
                data_ports: PortRange {
                    lo: 1024,
                    hi: 65535,
                },
                tls: TlsPolicy::Terminate,
                deny_commands: vec![],
                require_tls,
                require_prot_p,
            },
            tls,
        })
    }

    fn legs(upstream: UpstreamMode, allow_downgrade: bool, data_tls: bool) -> TlsLegs {
        TlsLegs {
            client_cert: true,
            client_implicit: false,
            upstream,
            allow_downgrade,
            data_tls,
        }
    }

    /// Every action so far, writes as text.
    fn drain(s: &mut Session) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(a) = s.poll_action() {
            out.push(match a {
                Action::ToClient(b) => format!("C< {}", String::from_utf8_lossy(&b).trim_end()),
                Action::ToServer(b) => format!("S> {}", String::from_utf8_lossy(&b).trim_end()),
                Action::StartTls(side) => format!("TLS {side:?}"),
                Action::Log(LogEvent::DiscardedAfterAuth(n)) => format!("discarded {n}"),
                Action::Log(LogEvent::Downgrade(w)) => format!("downgrade: {w}"),
                Action::Log(_) => "log".into(),
                Action::End(r) => format!("end: {r}"),
                other => format!("{other:?}"),
            });
        }
        out
    }

    #[test]
    fn auth_tls_is_answered_and_what_was_pipelined_behind_it_is_dropped() {
        let mut s = session(legs(UpstreamMode::Off, true, true), false, false);
        s.server_bytes(b"220 hi\r\n");
        assert_eq!(drain(&mut s), ["C< 220 hi"]);
        // The USER behind AUTH TLS came in clear text: never run.
        s.client_bytes(b"AUTH TLS\r\nUSER evil\r\n");
        assert_eq!(
            drain(&mut s),
            ["discarded 11", "C< 234 AUTH TLS successful", "TLS Client"]
        );
        assert!(!s.wants_client_input(), "the ClientHello is the shell's");
        s.tls_started(Side::Client);
        s.client_bytes(b"PBSZ 0\r\nPROT P\r\nCCC\r\n");
        let got = drain(&mut s);
        assert_eq!(got[0], "C< 200 PBSZ=0");
        assert_eq!(got[1], "C< 200 Protection level set to Private");
        assert!(
            got.contains(
                &"C< 534 CCC refused by gateway policy: the control connection stays protected"
                    .to_string()
            ),
            "{got:?}"
        );
        assert_eq!(s.data_protection(), (true, false));
        // Client TLS, server clear: a downgrade, logged at the login.
        s.client_bytes(b"USER ann\r\n");
        assert_eq!(
            drain(&mut s),
            [
                "downgrade: client leg TLS, server leg clear text",
                "S> USER ann"
            ]
        );
        // FEAT: the gateway's own TLS lines, the server's dropped.
        s.server_bytes(b"331 pw\r\n");
        drain(&mut s);
        s.client_bytes(b"FEAT\r\n");
        s.server_bytes(b"211-Features:\r\n AUTH TLS-C\r\n MDTM\r\n211 End\r\n");
        assert_eq!(
            drain(&mut s),
            [
                "S> FEAT",
                "C< 211-Features:",
                "C<  MDTM",
                "C<  AUTH TLS",
                "C<  PBSZ",
                "C<  PROT",
                "C< 211 End"
            ]
        );
    }

    #[test]
    fn policy_requires_tls_before_user_and_prot_p_before_transfers() {
        let mut s = session(legs(UpstreamMode::Off, true, true), true, true);
        s.server_bytes(b"220 hi\r\n");
        s.client_bytes(b"USER ann\r\n");
        assert_eq!(
            drain(&mut s)[2..],
            ["C< 530 TLS required by gateway policy: send AUTH TLS first"]
        );
        s.client_bytes(b"AUTH TLS\r\n");
        drain(&mut s);
        s.tls_started(Side::Client);
        s.client_bytes(b"PBSZ 0\r\nPROT C\r\nRETR f\r\n");
        let got = drain(&mut s);
        assert_eq!(
            got.last().unwrap(),
            "C< 521 Data connection protection required by gateway policy (PROT P)"
        );
        assert!(!got.iter().any(|l| l.contains("S> RETR")), "{got:?}");
    }

    #[test]
    fn without_data_tls_prot_p_is_refused_and_the_server_gets_prot_c() {
        let mut s = session(legs(UpstreamMode::Explicit, false, false), false, false);
        s.client_bytes(b"USER early\r\n");
        s.server_bytes(b"220 hi\r\n");
        // No client command reaches the server before its leg is secured.
        assert_eq!(drain(&mut s), ["C< 220 hi", "S> AUTH TLS"]);
        s.server_bytes(b"234 go\r\n");
        assert_eq!(drain(&mut s), ["TLS Server"]);
        s.tls_started(Side::Server);
        assert_eq!(drain(&mut s), ["S> PBSZ 0", "S> PROT C"]);
        s.server_bytes(b"200 ok\r\n200 ok\r\n");
        // Client in clear, server in TLS, no downgrade allowed.
        assert_eq!(
            drain(&mut s)[1..],
            ["C< 530 TLS required: the server leg is TLS and upstream_tls.allow_downgrade is off; send AUTH TLS first"]
        );
        s.client_bytes(b"AUTH TLS\r\n");
        drain(&mut s);
        s.tls_started(Side::Client);
        s.client_bytes(b"PBSZ 0\r\nPROT P\r\nUSER ann\r\n");
        let got = drain(&mut s);
        assert!(got[2].starts_with("C< 536 PROT P not available"), "{got:?}");
        assert_eq!(got.last().unwrap(), "S> USER ann");
    }

    #[test]
    fn a_server_refusing_auth_tls_ends_the_session_with_421() {
        let mut s = session(legs(UpstreamMode::Explicit, false, true), false, false);
        s.server_bytes(b"220 hi\r\n");
        drain(&mut s);
        s.server_bytes(b"502 no TLS here\r\n");
        let got = drain(&mut s);
        assert_eq!(
            got[0],
            "C< 421 Service not available: server refused the gateway's AUTH TLS (502 no TLS here)"
        );
        assert!(
            got.last().unwrap().starts_with("end: server leg TLS"),
            "{got:?}"
        );
    }

    #[test]
    fn without_a_downgrade_auth_tls_toward_a_clear_server_is_refused() {
        let mut s = session(legs(UpstreamMode::Off, false, true), false, false);
        s.server_bytes(b"220 hi\r\n");
        s.client_bytes(b"AUTH TLS\r\n");
        let got = drain(&mut s);
        assert!(
            got.last()
                .unwrap()
                .starts_with("C< 534 TLS refused: the server leg is clear text"),
            "{got:?}"
        );
        assert!(s.wants_client_input());
    }

    /// The next plan the session asks to open.
    fn next_plan(s: &mut Session) -> DataPlan {
        loop {
            match s.poll_action() {
                Some(Action::Open(p)) => return p,
                Some(_) => {}
                None => panic!("no plan"),
            }
        }
    }

    /// The plan's end: the client leg's data handshake did not resume.
    fn not_resumed(id: PlanId) -> DataEvent {
        use crate::pinhole::{TlsFailure, TlsLeg};
        DataEvent::Closed {
            id,
            to_client: 0,
            to_server: 0,
            outcome: DataOutcome::Failed(DataFailure::Tls {
                leg: TlsLeg::Client,
                reason: TlsFailure::NotResumed,
            }),
        }
    }

    /// A session (implicit FTPS upstream, data TLS on) past AUTH TLS,
    /// PBSZ 0 and PROT P on both legs, and the plan of its PASV.
    fn pasv_under_prot_p(s: &mut Session) -> DataPlan {
        s.server_bytes(b"220 hi\r\n");
        assert_eq!(drain(s), ["C< 220 hi", "S> PBSZ 0", "S> PROT P"]);
        s.server_bytes(b"200 ok\r\n200 ok\r\n");
        s.client_bytes(b"AUTH TLS\r\n");
        drain(s);
        s.tls_started(Side::Client);
        s.client_bytes(b"PBSZ 0\r\nPROT P\r\nPASV\r\n");
        drain(s);
        s.server_bytes(b"227 Entering Passive Mode (10,0,0,3,200,10)\r\n");
        next_plan(s)
    }

    /// `plan` opened by the shell, the client leg listening; then `cmd`
    /// (a transfer) sent.
    fn open_then(s: &mut Session, plan: PlanId, cmd: &[u8]) {
        let opened = crate::pinhole::Opened {
            client_listen: Some("192.0.2.1:40000".parse().unwrap()),
            server_listen: None,
        };
        s.opened(plan, Ok(opened));
        s.client_bytes(cmd);
        drain(s);
    }

    #[test]
    fn plans_carry_each_legs_prot_and_a_data_tls_failure_gets_a_clear_reply() {
        let mut s = session(legs(UpstreamMode::Implicit, false, true), false, false);
        let plan = pasv_under_prot_p(&mut s);
        assert_eq!(
            plan.tls,
            crate::pinhole::PlanTls {
                client: true,
                server: true
            }
        );
        open_then(&mut s, plan.id, b"RETR f\r\n");
        s.data_event(not_resumed(plan.id));
        s.server_bytes(b"426 Connection closed\r\n");
        let got = drain(&mut s);
        assert!(
            got.contains(&"C< 522 SSL connection failed: session reuse required".to_string()),
            "{got:?}"
        );
        assert!(!got.iter().any(|l| l.contains("426")), "{got:?}");

        // PROT C: the client leg is clear, the server leg still TLS.
        s.client_bytes(b"PROT C\r\nEPSV\r\n");
        drain(&mut s);
        s.server_bytes(b"229 Entering Extended Passive Mode (|||50001|)\r\n");
        let plan = next_plan(&mut s);
        assert_eq!(
            plan.tls,
            crate::pinhole::PlanTls {
                client: false,
                server: true
            }
        );
    }

    /// A session past AUTH TLS, PBSZ 0 and PROT P on both legs, with the
    /// plan of a PASV opened and `cmd` (a transfer) sent: the plan's id.
    fn transfer_under_prot_p(s: &mut Session, cmd: &[u8]) -> PlanId {
        let plan = pasv_under_prot_p(s);
        open_then(s, plan.id, cmd);
        plan.id
    }

    #[test]
    fn a_final_reply_waits_for_the_data_handshakes_result() {
        // Refused: the server's reply comes first, the client still gets
        // the refusal, and only it (the server's continuation lines too
        // are dropped).
        let mut s = session(legs(UpstreamMode::Implicit, false, true), false, false);
        let id = transfer_under_prot_p(&mut s, b"LIST\r\n");
        s.data_event(DataEvent::Handshaking { id });
        s.server_bytes(b"150 here it comes\r\n426-Connection closed\r\n426 transfer aborted\r\n");
        assert_eq!(drain(&mut s), ["C< 150 here it comes"]);
        s.client_bytes(b"NOOP\r\n");
        assert!(drain(&mut s).is_empty(), "nothing overtakes the held reply");
        s.data_event(not_resumed(id));
        let got = drain(&mut s);
        assert_eq!(
            got[0], "C< 522 SSL connection failed: session reuse required",
            "{got:?}"
        );
        assert!(!got.iter().any(|l| l.contains("426")), "{got:?}");
        assert!(got.contains(&"S> NOOP".to_string()), "{got:?}");

        // Secured: the held reply goes on as the server sent it.
        let mut s = session(legs(UpstreamMode::Implicit, false, true), false, false);
        let id = transfer_under_prot_p(&mut s, b"RETR f\r\n");
        s.data_event(DataEvent::Handshaking { id });
        s.server_bytes(b"150 ok\r\n226 done\r\n");
        assert_eq!(drain(&mut s), ["C< 150 ok"]);
        s.data_event(DataEvent::Connected { id });
        assert_eq!(drain(&mut s), ["C< 226 done"]);

        // A multi-line 150 during the handshakes goes on whole and in
        // order (pure-ftpd sends one); the client starts its handshake
        // only after its last line.
        let mut s = session(legs(UpstreamMode::Implicit, false, true), false, false);
        let id = transfer_under_prot_p(&mut s, b"RETR f\r\n");
        s.data_event(DataEvent::Handshaking { id });
        s.server_bytes(b"150-Accepted data connection\r\n150 1024.0 kbytes to download\r\n");
        assert_eq!(
            drain(&mut s),
            [
                "C< 150-Accepted data connection",
                "C< 150 1024.0 kbytes to download"
            ]
        );
        s.server_bytes(b"226-File successfully transferred\r\n226 0.051 seconds\r\n");
        assert!(drain(&mut s).is_empty(), "the final reply is held");
        s.data_event(DataEvent::Connected { id });
        assert_eq!(
            drain(&mut s),
            [
                "C< 226-File successfully transferred",
                "C< 226 0.051 seconds"
            ]
        );

        // No data connection under way (the file is missing): not held.
        let mut s = session(legs(UpstreamMode::Implicit, false, true), false, false);
        transfer_under_prot_p(&mut s, b"RETR missing\r\n");
        s.server_bytes(b"550 no such file\r\n");
        assert_eq!(drain(&mut s)[0], "C< 550 no such file");
    }
}
