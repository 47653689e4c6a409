//! The client side: each command checked, then forwarded, answered or
//! refused.

use super::*;
use crate::ftp::ParsedCommand;

impl Session {
    /// One command line, as checked: only its re-serialised form is ever
    /// sent, and one with CR, NUL or a cut Telnet sequence in it is not.
    pub(super) fn client_line(&mut self, line: Result<CheckedCommand, LineFault>) {
        let line = match line {
            Ok(line) => line,
            Err(fault) => {
                self.refuse("?", 500, &format!("Syntax error: {fault}"));
                return;
            }
        };
        let Some(parsed) = self.admitted(&line) else {
            return;
        };
        let verb = parsed.verb;
        let terminate = self.params.policy.tls == TlsPolicy::Terminate;
        match parsed.command {
            Command::Port(addr) => self.client_active(ClientAsk::Port, SocketAddr::V4(addr)),
            Command::Eprt(addr) => self.client_active(ClientAsk::Eprt, addr),
            Command::Pasv => self.client_passive(ClientAsk::Pasv, EpsvParam::Any),
            Command::Epsv(EpsvParam::All) => {
                self.epsv_all = true;
                self.reply_local(200, "EPSV ALL command successful");
            }
            Command::Epsv(p) => self.client_passive(ClientAsk::Epsv, p),
            Command::Lprt => self.refuse("LPRT", 502, "LPRT not supported; use EPRT"),
            Command::Lpsv => self.refuse("LPSV", 502, "LPSV not supported; use EPSV"),
            Command::Auth(mechanism) => match self.params.policy.tls {
                TlsPolicy::Refuse => self.refuse(
                    "AUTH",
                    534,
                    "TLS refused by gateway policy; continue in clear",
                ),
                TlsPolicy::Passthrough => self.forward(&line, Pending::Auth),
                TlsPolicy::Terminate => self.auth_terminate(&mechanism),
            },
            Command::Pbsz if terminate => self.pbsz_terminate(),
            Command::Prot if terminate => self.prot_terminate(parsed.arg),
            Command::Ccc if terminate => self.refuse(
                "CCC",
                534,
                "CCC refused by gateway policy: the control connection stays protected",
            ),
            Command::Rein if self.client_tls == LegTls::Up => self.refuse(
                "REIN",
                502,
                "REIN not available under TLS: it would drop the protection",
            ),
            Command::User(name) => {
                if self.user_allowed() {
                    self.forward(&line, Pending::User(name))
                }
            }
            Command::Transfer => {
                if self.prot_allows_transfer(&verb.to_ascii_uppercase()) {
                    self.transfer_command(&line, verb, parsed.arg)
                }
            }
            Command::Other if verb.eq_ignore_ascii_case("FEAT") => {
                self.forward(&line, Pending::Feat)
            }
            Command::Other
                if verb.eq_ignore_ascii_case("PASS") || verb.eq_ignore_ascii_case("ACCT") =>
            {
                self.forward(&line, Pending::Login)
            }
            Command::Rein => self.forward(&line, Pending::Rein),
            Command::Ccc
            | Command::Pbsz
            | Command::Prot
            | Command::Abor
            | Command::Quit
            | Command::Other => self.forward(&line, Pending::Forward),
        }
    }

    /// The command parsed, if it is well formed and the policy allows its
    /// verb; otherwise it is refused.
    fn admitted<'l>(&mut self, line: &'l CheckedCommand) -> Option<ParsedCommand<'l>> {
        let parsed = match parse_command(line.text()) {
            Ok(p) => p,
            Err(CommandError::Malformed) => {
                self.refuse("?", 500, "Syntax error, command unrecognized");
                return None;
            }
            Err(CommandError::BadArgument { verb, reason }) => {
                self.refuse(verb, 501, &format!("Syntax error in parameters: {reason}"));
                return None;
            }
        };
        let denied = &self.params.policy.deny_commands;
        if denied.iter().any(|d| d.eq_ignore_ascii_case(parsed.verb)) {
            let verb = parsed.verb.to_ascii_uppercase();
            self.refuse(&verb, 502, &format!("{verb} not allowed by gateway policy"));
            return None;
        }
        Some(parsed)
    }

    pub(super) fn forward(&mut self, line: &CheckedCommand, pending: Pending) {
        self.queue.push_back(pending);
        self.push(Action::ToServer(line.to_wire()));
    }

    /// PASV or EPSV from the client.
    pub(super) fn client_passive(&mut self, ask: ClientAsk, param: EpsvParam) {
        let verb = ask.verb();
        if !self.params.policy.modes.contains(&DataMode::Passive) {
            self.refuse(verb, 502, "passive mode not allowed by gateway policy");
            return;
        }
        if self.epsv_all && ask == ClientAsk::Pasv {
            self.refuse(verb, 501, "EPSV ALL in effect: only EPSV is accepted");
            return;
        }
        let v6 = self.params.client.is_ipv6();
        if ask == ClientAsk::Pasv && v6 {
            self.refuse(verb, 504, "PASV is IPv4 only; use EPSV");
            return;
        }
        match param {
            EpsvParam::Any | EpsvParam::All => {}
            EpsvParam::V4 if !v6 => {}
            EpsvParam::V6 if v6 => {}
            _ => {
                let p = if v6 { 2 } else { 1 };
                self.refuse(
                    verb,
                    522,
                    &format!("Network protocol not supported, use ({p})"),
                );
                return;
            }
        }
        self.drop_unused_plan();
        match self.params.policy.server_mode {
            ServerMode::Same | ServerMode::Passive => {
                let cmd = self.server_passive_command(ask == ClientAsk::Epsv);
                self.queue.push_back(Pending::Passive { ask });
                self.push(Action::ToServer(cmd));
            }
            ServerMode::Active => {
                let (client, server) = (self.client_listen_leg(), self.server_listen_leg());
                self.open(client, server, AfterOpen::SendPort(ask));
            }
        }
    }

    /// PORT or EPRT from the client.
    pub(super) fn client_active(&mut self, ask: ClientAsk, addr: SocketAddr) {
        let verb = ask.verb();
        if !self.params.policy.modes.contains(&DataMode::Active) {
            self.refuse(verb, 502, "active mode not allowed by gateway policy");
            return;
        }
        if self.epsv_all {
            self.refuse(verb, 501, "EPSV ALL in effect: only EPSV is accepted");
            return;
        }
        let client_ip = self.params.client.ip();
        if ask == ClientAsk::Eprt && addr.is_ipv6() != client_ip.is_ipv6() {
            let p = if client_ip.is_ipv6() { 2 } else { 1 };
            self.refuse(
                verb,
                522,
                &format!("Network protocol not supported, use ({p})"),
            );
            return;
        }
        if addr.ip().to_canonical() != client_ip {
            self.refuse(
                verb,
                501,
                &format!(
                    "{verb} refused: address {} is not the client's own {client_ip} (FTP bounce)",
                    addr.ip()
                ),
            );
            return;
        }
        if let Err(reason) = self.check_port(addr.port()) {
            self.refuse(verb, 501, &format!("{verb} refused: {reason}"));
            return;
        }
        let target = SocketAddr::new(client_ip, addr.port());
        self.drop_unused_plan();
        match self.params.policy.server_mode {
            ServerMode::Same | ServerMode::Active => {
                let (client, server) = (self.client_connect_leg(target), self.server_listen_leg());
                self.open(client, server, AfterOpen::SendPort(ask));
            }
            ServerMode::Passive => {
                let cmd = self.server_passive_command(false);
                self.queue.push_back(Pending::ConvPassive { ask, target });
                self.push(Action::ToServer(cmd));
            }
        }
    }

    /// PASV toward an IPv4 server unless the client used EPSV; EPSV toward
    /// an IPv6 server, where PASV cannot express the address.
    pub(super) fn server_passive_command(&self, client_used_epsv: bool) -> Vec<u8> {
        if self.params.server.is_ipv6() || client_used_epsv {
            b"EPSV\r\n".to_vec()
        } else {
            b"PASV\r\n".to_vec()
        }
    }
}
