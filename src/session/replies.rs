//! The server side: each reply matched to the command it answers, then
//! forwarded, rewritten, held or withheld; and the replies the gateway
//! makes itself, queued in command order.

use super::*;

/// A transfer's final reply held until its plan has ended.
#[derive(Debug)]
pub(super) struct Deferred {
    pub(super) plan: PlanId,
    /// Held until the plan's end; otherwise only until its TLS handshakes
    /// succeed (`Connected`) or fail (`Closed`).
    pub(super) until_end: bool,
    pub(super) code: u16,
    /// Its last line, re-serialised.
    pub(super) raw: Vec<u8>,
    /// The text of the lines before it that were held for rewriting.
    pub(super) held: Vec<Vec<u8>>,
}

impl Session {
    /// One reply line, as checked: only its re-serialised form is ever
    /// sent to the client.
    pub(super) fn server_line(&mut self, line: CheckedReply) {
        let text = line.text();
        match self.replies.push(text) {
            ReplyPos::Garbage => {
                self.log(LogEvent::IgnoredReply {
                    code: 0,
                    reason: "line from server is not a reply".into(),
                });
            }
            ReplyPos::Inside(code) => {
                // A 227/229 is held whatever it answers: one that answers no
                // PASV/EPSV is replaced whole, so no line of it, the first
                // included, can carry an address to the client.
                if self.head_rewrites() || code == 227 || code == 229 {
                    if may_hold(&self.held_reply, text.len()) {
                        self.held_reply.push(text.to_vec());
                    }
                } else {
                    let wire = line.inner_wire(code);
                    // Once a reply is held, all of it is: a line sent now
                    // would overtake its first line. Past the bound, dropped.
                    if self.holds_final(code).is_some() || !self.held_transfer.is_empty() {
                        if may_hold(&self.held_transfer, wire.len()) {
                            self.held_transfer.push(wire);
                        }
                    } else if !self.feat_filtered(text) {
                        if self.queue.front() == Some(&Pending::Feat) {
                            self.feat_lines = true;
                        }
                        self.push(Action::ToClient(wire));
                    }
                }
            }
            ReplyPos::End(code) => {
                let held = std::mem::take(&mut self.held_reply);
                // A bare `nnn` ends a reply here; many clients end one only
                // at `nnn SP` (RFC 959 §4.2), so it is sent in that form.
                let wire = if text.len() == 3 {
                    format!("{code} \r\n").into_bytes()
                } else {
                    line.to_wire()
                };
                self.server_reply(code, wire, held);
            }
        }
    }

    /// True when the head's reply must be seen whole before anything is sent.
    pub(super) fn head_rewrites(&self) -> bool {
        matches!(
            self.queue.front(),
            Some(Pending::Passive { .. } | Pending::ConvPassive { .. } | Pending::SentPort { .. })
        )
    }

    /// Under `tls: refuse`, FEAT does not advertise what would be refused;
    /// under `tls: terminate` the gateway says what it offers itself.
    pub(super) fn feat_filtered(&self, text: &[u8]) -> bool {
        if self.params.policy.tls == TlsPolicy::Passthrough
            || self.queue.front() != Some(&Pending::Feat)
        {
            return false;
        }
        let t = String::from_utf8_lossy(text);
        let word = t
            .trim_start()
            .split(' ')
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        matches!(word.as_str(), "AUTH" | "PBSZ" | "PROT" | "CCC")
    }

    /// A complete reply: `raw` is its last line re-serialised, `held` the
    /// text of the lines before it that were held for rewriting.
    pub(super) fn server_reply(&mut self, code: u16, raw: Vec<u8>, held: Vec<Vec<u8>>) {
        if code < 200 {
            self.preliminary_reply(code, raw);
            return;
        }
        self.flush_locals();
        let Some(raw) = self.defer_final(code, raw, held.as_slice()) else {
            return;
        };
        // Lines of a reply that the gateway's own refusal replaces are
        // dropped with it.
        let replaced =
            self.queue.front() == Some(&Pending::Transfer) && self.tls_failure_reply().is_some();
        for cont in std::mem::take(&mut self.held_transfer) {
            if !replaced {
                self.push(Action::ToClient(cont));
            }
        }
        let Some(head) = self.queue.pop_front() else {
            if code == 227 || code == 229 {
                self.log(LogEvent::IgnoredReply {
                    code,
                    reason: "passive reply that no PASV/EPSV asked for; dropped".into(),
                });
            } else {
                self.push(Action::ToClient(raw));
            }
            return;
        };
        match head {
            // flush_locals() above leaves no local reply at the head.
            Pending::Local(bytes) | Pending::LocalAuth(bytes) => self.push(Action::ToClient(bytes)),
            Pending::Greeting => {
                self.forward_reply(code, raw);
                self.after_greeting(code);
            }
            Pending::Own(cmd) => self.own_reply(cmd, code, &raw),
            Pending::Feat => {
                let lines = std::mem::take(&mut self.feat_lines);
                match self.feat_additions() {
                    Some(add) if code == 211 => {
                        if !lines {
                            self.push(Action::ToClient(b"211-Features:\r\n".to_vec()));
                        }
                        for line in add {
                            self.push(Action::ToClient(line));
                        }
                        self.forward_reply(code, raw);
                    }
                    _ => self.forward_reply(code, raw),
                }
            }
            Pending::Forward => {
                self.forward_reply(code, raw);
            }
            Pending::User(_) | Pending::Login | Pending::Rein => {
                self.forward_reply(code, raw);
                self.login_reply(head, code);
            }
            Pending::Transfer => {
                match self.tls_failure_reply() {
                    Some(reply) => self.push(Action::ToClient(reply)),
                    None => self.forward_reply(code, raw),
                }
                self.stamp_user();
                self.transfer_reply(code);
            }
            Pending::Auth => {
                // Not a PASV/EPSV answer either: a 227/229 loses its address.
                self.forward_reply(code, raw);
                if code == 234 {
                    self.start_passthrough();
                    return;
                }
            }
            Pending::Passive { ask } => self.passive_reply(code, &held, raw, ask, None),
            Pending::ConvPassive { ask, target } => {
                self.passive_reply(code, &held, raw, ask, Some(target))
            }
            Pending::SentPort { ask, plan } => self.sent_port_reply(code, raw, ask, plan),
        }
        self.flush_locals();
    }

    /// A 1xx: the command stays outstanding. Only a transfer or the
    /// greeting may have one.
    fn preliminary_reply(&mut self, code: u16, raw: Vec<u8>) {
        match self.queue.front() {
            Some(Pending::Transfer) => {
                self.stamp_user();
                self.push(Action::ToClient(raw));
            }
            Some(Pending::Greeting) => self.push(Action::ToClient(raw)),
            _ => self.log(LogEvent::IgnoredReply {
                code,
                reason: "preliminary reply to a command that has none".into(),
            }),
        }
    }

    /// Follows the login through the final reply to USER, PASS/ACCT or REIN.
    fn login_reply(&mut self, head: Pending, code: u16) {
        match (head, code) {
            (Pending::User(name), 230) => self.accept_user(name),
            // A new login starts: the server dropped the old one.
            (Pending::User(name), 331 | 332) => {
                self.user = None;
                self.login = Some(name);
            }
            // Refused: the server keeps whatever login it had.
            (Pending::User(_), _) => {}
            (Pending::Login, 230) => {
                if let Some(name) = self.login.take() {
                    self.accept_user(name);
                }
            }
            (Pending::Login, 332) => {}
            (Pending::Login, _) => self.login = None,
            (Pending::Rein, 200..=299) => {
                self.user = None;
                self.login = None;
            }
            _ => {}
        }
    }

    /// AUTH was accepted under `tls: passthrough`: parsing stops, and what
    /// each side sent after it goes on as it is.
    fn start_passthrough(&mut self) {
        self.phase = Phase::Passthrough;
        let to_server = self.client_in.take_buffered();
        let to_client = self.server_in.take_buffered();
        self.log(LogEvent::TlsPassthrough);
        self.push(Action::Passthrough {
            to_server,
            to_client,
        });
    }

    /// The server's reply to the gateway's own PORT/EPRT for plan `plan`.
    fn sent_port_reply(&mut self, code: u16, raw: Vec<u8>, ask: ClientAsk, plan: PlanId) {
        if (200..300).contains(&code) {
            match ask {
                ClientAsk::Port | ClientAsk::Eprt => self.forward_reply(code, raw),
                ClientAsk::Pasv | ClientAsk::Epsv => {
                    // The plan's client listen port was stored at open.
                    let reply = self.passive_announcement(ask, plan);
                    self.push(Action::ToClient(reply));
                }
            }
        } else {
            self.close_plan(plan);
            let text = lossy_tail(&raw);
            self.refuse_now(
                ask.verb(),
                425,
                &format!("Can't open data connection: server refused PORT ({code} {text})"),
            );
        }
    }

    /// In an active plan the gateway dials the client only once the server's
    /// data connection has arrived. A fast server can finish and send 226
    /// before that dial lands; and even once the dial has completed, the
    /// client may not have accepted it yet (the handshake's last ACK and the
    /// 226 travel separately). A client still waiting to accept treats a final
    /// reply as an error (curl: "weird server reply"). So a transfer's 2xx
    /// waits until the plan has ended: the data is delivered and the data
    /// connection closed before the client reads the completion reply, the
    /// order a server talking to the client directly keeps.
    ///
    /// Under TLS, a data connection can also be refused after its TCP
    /// connection was made (a client that does not resume its session
    /// gets 522): the server, which saw its leg reset, may answer first,
    /// and its reply would reach the client in place of the refusal. So
    /// any final reply to a transfer whose plan is mid-handshake waits for
    /// the handshakes' result, which the relay reports within their time
    /// limit (`tls::HANDSHAKE_TIMEOUT`).
    ///
    /// Gives the reply back when it is not held.
    pub(super) fn defer_final(
        &mut self,
        code: u16,
        raw: Vec<u8>,
        held: &[Vec<u8>],
    ) -> Option<Vec<u8>> {
        let Some((plan, until_end)) = self.holds_final(code) else {
            return Some(raw);
        };
        self.deferred = Some(Deferred {
            plan,
            until_end,
            code,
            raw,
            held: held.to_vec(),
        });
        None
    }

    /// The plan a transfer's final reply with `code` waits for, and whether
    /// until its end: a 2xx to the transfer at the head, whose plan dials
    /// the client and is live (until its end); any final reply to the
    /// transfer at the head whose plan is mid-handshake (until the result).
    pub(super) fn holds_final(&self, code: u16) -> Option<(PlanId, bool)> {
        if self.queue.front() != Some(&Pending::Transfer) {
            return None;
        }
        let plan = self
            .transfers
            .iter()
            .find(|t| t.reply.is_none())
            .and_then(|t| t.plan)?;
        if (200..300).contains(&code) && self.plans.dials_client(plan) {
            return Some((plan, true));
        }
        self.plans.is_handshaking(plan).then_some((plan, false))
    }

    /// Lets a final reply held for the handshakes of `id` go once they
    /// succeeded; one held until the plan's end stays.
    pub(super) fn release_secured(&mut self, id: PlanId) {
        if self
            .deferred
            .as_ref()
            .is_some_and(|d| d.plan == id && !d.until_end)
        {
            self.release_deferred(id);
        }
    }

    /// Lets a held final reply go once its plan is over.
    pub(super) fn release_deferred(&mut self, id: PlanId) {
        if self.deferred.as_ref().is_some_and(|d| d.plan == id) {
            if let Some(Deferred {
                code, raw, held, ..
            }) = self.deferred.take()
            {
                self.server_reply(code, raw, held);
            }
            self.process();
        }
    }

    /// Forwards a final reply; a 227/229 that answers no PASV/EPSV loses its
    /// address so nothing downstream can act on it.
    pub(super) fn forward_reply(&mut self, code: u16, raw: Vec<u8>) {
        if code == 227 || code == 229 {
            self.log(LogEvent::IgnoredReply {
                code,
                reason: "passive reply to a command other than PASV/EPSV; address withheld".into(),
            });
            self.push(Action::ToClient(rewrite::reply(
                code,
                "Reply withheld by gateway (no passive request outstanding)",
            )));
            return;
        }
        self.push(Action::ToClient(raw));
    }

    /// The server's reply to a PASV/EPSV the gateway sent, either for the
    /// client's own PASV/EPSV or for a PORT/EPRT being converted.
    pub(super) fn passive_reply(
        &mut self,
        code: u16,
        held: &[Vec<u8>],
        raw: Vec<u8>,
        ask: ClientAsk,
        convert_to: Option<SocketAddr>,
    ) {
        if code != 227 && code != 229 {
            match convert_to {
                None => self.push(Action::ToClient(raw)),
                Some(_) => {
                    let text = lossy_tail(&raw);
                    self.refuse_now(
                        ask.verb(),
                        425,
                        &format!("Can't open data connection: server refused passive mode ({code} {text})"),
                    );
                }
            }
            return;
        }
        let Some(port) = self.announced_port(code, held, &raw) else {
            self.refuse_now(
                ask.verb(),
                425,
                "Can't open data connection: malformed passive reply from server",
            );
            return;
        };
        if let Err(reason) = self.check_port(port) {
            self.refuse_now(
                ask.verb(),
                425,
                &format!("Can't open data connection: server announced {reason}"),
            );
            return;
        }
        // The gateway only ever connects to the server's control address.
        let server = Leg::Connect {
            target: SocketAddr::new(self.params.server.ip(), port),
            bind: self.params.server_local.ip(),
        };
        match convert_to {
            None => {
                let client = self.client_listen_leg();
                self.open(client, server, AfterOpen::ReplyPassive(ask));
            }
            Some(target) => {
                let client = self.client_connect_leg(target);
                self.open(client, server, AfterOpen::ReplyPortOk(ask));
            }
        }
    }

    /// The port a 227/229 announces, read from its last line first, then
    /// from the held lines, newest first. A 227's address is not used.
    fn announced_port(&mut self, code: u16, held: &[Vec<u8>], raw: &[u8]) -> Option<u16> {
        let last = Line::new(raw).text();
        let mut texts = std::iter::once(&*last)
            .chain(held.iter().rev().map(Vec::as_slice))
            .map(reply_text);
        if code != 227 {
            return texts.find_map(parse_229);
        }
        let a = texts.find_map(parse_227)?;
        if IpAddr::V4(*a.ip()) != self.params.server.ip() {
            // Third-party address (or the server's private one):
            // the gateway only ever connects to the control peer.
            self.log(LogEvent::IgnoredReply {
                code,
                reason: format!(
                    "server announced {}; connecting to the control peer {} instead",
                    a.ip(),
                    self.params.server.ip()
                ),
            });
        }
        Some(a.port())
    }

    pub(super) fn reply_local(&mut self, code: u16, text: &str) {
        let bytes = rewrite::reply(code, text);
        if self.queue.is_empty() {
            self.push(Action::ToClient(bytes));
        } else {
            self.queue.push_back(Pending::Local(bytes));
        }
    }

    /// A reply that answers the command now at the head (already popped).
    pub(super) fn reply_now(&mut self, bytes: Vec<u8>) {
        self.push(Action::ToClient(bytes));
        self.flush_locals();
    }

    pub(super) fn refuse(&mut self, what: &str, code: u16, reason: &str) {
        self.log(LogEvent::Refusal {
            what: Refused::Command(what.to_string()),
            code,
            reason: reason.to_string(),
        });
        self.reply_local(code, reason);
        self.count_refusal();
    }

    /// A refusal that answers the command whose reply is due now.
    pub(super) fn refuse_now(&mut self, what: &str, code: u16, reason: &str) {
        self.log(LogEvent::Refusal {
            what: Refused::Command(what.to_string()),
            code,
            reason: reason.to_string(),
        });
        self.reply_now(rewrite::reply(code, reason));
        self.count_refusal();
    }

    /// A session that piles up refusals is probing or broken: at
    /// [`MAX_REFUSALS`] it ends with 421.
    pub(super) fn count_refusal(&mut self) {
        self.refusals += 1;
        if self.refusals < MAX_REFUSALS || self.phase == Phase::Ended {
            return;
        }
        self.log(LogEvent::RefusalLimit {
            refusals: self.refusals,
        });
        self.push(Action::ToClient(rewrite::reply(
            421,
            &format!(
                "Too many refused commands ({}): closing control connection",
                self.refusals
            ),
        )));
        self.end(EndReason::TooManyRefusals(self.refusals));
    }

    pub(super) fn flush_locals(&mut self) {
        loop {
            match self.queue.front() {
                Some(Pending::Local(_)) => {
                    if let Some(Pending::Local(bytes)) = self.queue.pop_front() {
                        self.push(Action::ToClient(bytes));
                    }
                }
                Some(Pending::LocalAuth(_)) => {
                    if let Some(Pending::LocalAuth(bytes)) = self.queue.pop_front() {
                        self.push(Action::ToClient(bytes));
                        self.push(Action::StartTls(Side::Client));
                    }
                }
                _ => return,
            }
        }
    }
}

/// Whether one more line of `len` bytes fits in a held reply (see
/// [`MAX_HELD_BYTES`]).
fn may_hold(held: &[Vec<u8>], len: usize) -> bool {
    held.len() < MAX_HELD_LINES && held.iter().map(Vec::len).sum::<usize>() + len <= MAX_HELD_BYTES
}

/// The text after a reply code (or the whole line for a middle line).
fn reply_text(line: &[u8]) -> &[u8] {
    if line.len() >= 4 && line[..3].iter().all(u8::is_ascii_digit) {
        &line[4..]
    } else if line.len() == 3 && line.iter().all(u8::is_ascii_digit) {
        &[]
    } else {
        line
    }
}

/// The text of reply line `raw`, printable and at most 120 characters.
pub(super) fn lossy_tail(raw: &[u8]) -> String {
    let text = Line::new(raw).text();
    let s = String::from_utf8_lossy(reply_text(&text));
    s.chars().filter(|c| !c.is_control()).take(120).collect()
}
