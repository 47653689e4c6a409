//! The sans-IO session core.
//!
//! A [`Session`] is fed what happened — bytes from either side, the result
//! of opening a data plan, data events, an idle timer — and answers with
//! [`Action`]s for the shell to carry out. It owns no socket and no clock,
//! so every protocol decision and every policy check can be tested by
//! feeding it lines.
//!
//! It keeps the queue of outstanding commands, so it knows which reply
//! answers which command, and it forwards, rewrites or swallows each reply.
//! Replies it makes itself wait in the same queue, so the client always
//! sees replies in the order of its commands, pipelined or not.

mod plans;

use crate::config::{DataMode, ServerMode, TlsPolicy};
use crate::ftp::{
    self, parse_227, parse_229, parse_command, rewrite, CheckedCommand, CheckedReply, Command,
    CommandError, EpsvParam, Framer, Line, LineFault, ReplyPos, ReplyTracker,
};
use crate::pinhole::{
    DataEvent, DataFailure, DataOutcome, DataPlan, Leg, OpenError, Opened, PlanId,
};
use crate::rules::Policy;
use plans::Plans;
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

/// What a session is, fixed at connect.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// The client's control-connection peer.
    pub client: SocketAddr,
    /// The gateway's address on the client control connection.
    pub client_local: SocketAddr,
    /// The server's control-connection address.
    pub server: SocketAddr,
    /// The gateway's address on the server control connection.
    pub server_local: SocketAddr,
    /// Transparent mode: the client believes it talks to `server` directly.
    pub transparent: bool,
    /// Reverse mode: the address to announce to clients, if not the local one.
    pub announce: Option<IpAddr>,
    /// The matching rule's policy.
    pub policy: Policy,
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the client.
    ToClient(Vec<u8>),
    /// Write these bytes to the server.
    ToServer(Vec<u8>),
    /// Open this data plan and report back with [`Session::opened`]. The
    /// session processes no further input until then.
    Open(DataPlan),
    /// Close this plan's pinholes and connections, if still open.
    Close(PlanId),
    /// TLS started: stop parsing and copy bytes both ways, starting with
    /// these bytes that were already read.
    Passthrough {
        /// Buffered client bytes to send to the server first.
        to_server: Vec<u8>,
        /// Buffered server bytes to send to the client first.
        to_client: Vec<u8>,
    },
    /// Something to log in the session's span.
    Log(LogEvent),
    /// Close the session after writing what came before.
    End(EndReason),
}

/// Events worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// A command, reply or connection was refused.
    Refusal {
        /// What was refused.
        what: Refused,
        /// The reply code the client got (0 when none).
        code: u16,
        /// Why.
        reason: String,
    },
    /// A transfer finished, or the session ended before it did.
    Transfer(TransferRecord),
    /// The server accepted this user: a 230 to its USER, or to the PASS or
    /// ACCT after it.
    User(String),
    /// The session reached [`MAX_REFUSALS`] refusals and is being closed
    /// with 421.
    RefusalLimit {
        /// Refusals so far.
        refusals: u32,
    },
    /// TLS started under `tls: passthrough`; parsing stopped.
    TlsPassthrough,
    /// A reply was not forwarded as received.
    IgnoredReply {
        /// Its code (0 for a line that was not a reply).
        code: u16,
        /// Why.
        reason: String,
    },
    /// A pinhole closed without being used.
    PinholeExpired(PlanId),
}

/// What a [`LogEvent::Refusal`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// A command, by its verb (`?` when no verb could be read).
    Command(String),
    /// A data connection from a peer other than the expected one.
    DataPeer,
}

impl Refused {
    /// The log line's `what` field: the verb, or `DATA`.
    pub fn what(&self) -> &str {
        match self {
            Refused::Command(verb) => verb,
            Refused::DataPeer => "DATA",
        }
    }
}

/// Why a data plan could not be opened, as the core sees it: the pinhole's
/// [`OpenError`] without its `io::Error`, so that it can be cloned and
/// compared. Its text follows the 425 reply's "Can't open data connection: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenFailure {
    /// Every port of a pool is taken.
    #[error("no free port in {0} pool")]
    PoolExhausted(&'static str),
    /// The client already holds its share of a pool.
    #[error("client {client} already holds {share} ports of the {pool} pool, its share (data.max_ports_per_client)")]
    ClientShare {
        /// "client" or "server".
        pool: &'static str,
        /// The client address the ports are counted against.
        client: IpAddr,
        /// The most ports that address may hold.
        share: usize,
    },
    /// A socket or nftables call failed; the error's text.
    #[error("{0}")]
    Io(String),
}

impl From<&OpenError> for OpenFailure {
    fn from(e: &OpenError) -> Self {
        match e {
            OpenError::PoolExhausted(pool) => OpenFailure::PoolExhausted(pool),
            OpenError::ClientShare {
                pool,
                client,
                share,
            } => OpenFailure::ClientShare {
                pool,
                client: *client,
                share: *share,
            },
            OpenError::Io(e) => OpenFailure::Io(e.to_string()),
        }
    }
}

/// The data mode of one leg of a plan: passive where the peer connects to
/// the gateway, active where the gateway connects to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegMode {
    /// The peer connects to the gateway.
    Passive,
    /// The gateway connects to the peer.
    Active,
}

/// A transfer's data modes, the client leg's and the server leg's. Its
/// label is the `mode` of the transfer log line, the audit record and the
/// `ftpgate_transfers_total` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferMode {
    /// No data plan was armed for the transfer.
    None,
    /// The modes of the plan that carried it.
    Legs {
        /// The gateway↔client leg.
        client: LegMode,
        /// The gateway↔server leg.
        server: LegMode,
    },
}

impl TransferMode {
    /// `client/server`, e.g. `passive/active`, or `none`.
    pub fn as_label(self) -> &'static str {
        use LegMode::{Active, Passive};
        match self {
            TransferMode::None => "none",
            TransferMode::Legs { client, server } => match (client, server) {
                (Passive, Passive) => "passive/passive",
                (Passive, Active) => "passive/active",
                (Active, Passive) => "active/passive",
                (Active, Active) => "active/active",
            },
        }
    }
}

impl std::fmt::Display for TransferMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_label())
    }
}

/// Which way a transfer's bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// RETR
    Download,
    /// STOR, STOU, APPE
    Upload,
    /// LIST, NLST, MLSD
    Listing,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Download => "download",
            Direction::Upload => "upload",
            Direction::Listing => "listing",
        })
    }
}

/// One transfer, for the transfer log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRecord {
    /// RETR, STOR, LIST, ...
    pub command: String,
    /// The command's argument.
    pub path: String,
    /// The user the server had accepted (230) when it took the command;
    /// `None` if no login had succeeded by then.
    pub user: Option<String>,
    /// Download, upload or listing.
    pub direction: Direction,
    /// The data modes, client leg and server leg.
    pub mode: TransferMode,
    /// Bytes written to the client.
    pub to_client: u64,
    /// Bytes written to the server.
    pub to_server: u64,
    /// The server's final reply code (0 if none came).
    pub reply: u16,
    /// `ok`, or what went wrong.
    pub result: String,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The client closed the control connection.
    ClientClosed,
    /// The server closed the control connection.
    ServerClosed,
    /// No traffic for `idle_timeout`.
    Idle,
    /// A line longer than the cap.
    Framing(&'static str),
    /// [`MAX_REFUSALS`] commands were refused.
    TooManyRefusals(u32),
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::ClientClosed => f.write_str("client closed"),
            EndReason::ServerClosed => f.write_str("server closed"),
            EndReason::Idle => f.write_str("idle timeout"),
            EndReason::Framing(side) => write!(f, "overlong line from {side}"),
            EndReason::TooManyRefusals(n) => write!(f, "too many refusals ({n})"),
        }
    }
}

/// Totals for the end-of-session log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Transfers that got a data connection or a final reply.
    pub transfers: u64,
    /// Data bytes written to the client.
    pub data_to_client: u64,
    /// Data bytes written to the server.
    pub data_to_server: u64,
}

/// How the client asked for its data connection, so the answer uses the
/// same form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientAsk {
    Pasv,
    Epsv,
    Port,
    Eprt,
}

impl ClientAsk {
    fn verb(self) -> &'static str {
        match self {
            ClientAsk::Pasv => "PASV",
            ClientAsk::Epsv => "EPSV",
            ClientAsk::Port => "PORT",
            ClientAsk::Eprt => "EPRT",
        }
    }
}

/// What the reply at the head of the queue answers, and what to do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    /// The server's greeting.
    Greeting,
    /// A reply the gateway made itself, waiting for its turn.
    Local(Vec<u8>),
    /// An ordinary command: its reply is forwarded.
    Forward,
    /// USER with this name: a 230 makes it the session's user, a 331/332
    /// starts a login that PASS/ACCT completes.
    User(String),
    /// PASS or ACCT: a 230 makes the name of the USER before it the
    /// session's user.
    Login,
    /// REIN: a 2xx ends the login.
    Rein,
    /// FEAT: its reply is filtered under `tls: refuse`.
    Feat,
    /// The gateway forwarded PASV/EPSV for the client's PASV/EPSV.
    Passive { ask: ClientAsk },
    /// The gateway sent PASV/EPSV for the client's PORT/EPRT (conversion).
    ConvPassive { ask: ClientAsk, target: SocketAddr },
    /// The gateway sent its own PORT/EPRT; the plan is already open.
    SentPort { ask: ClientAsk, plan: PlanId },
    /// A transfer command.
    Transfer,
    /// AUTH under passthrough.
    Auth,
}

/// What to do once an open finishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterOpen {
    /// Answer the client's PASV/EPSV (same mode): 227/229 now.
    ReplyPassive(ClientAsk),
    /// Send our PORT/EPRT to the server; its reply answers `ask`.
    SendPort(ClientAsk),
    /// Answer the client's PORT/EPRT with 200 (PORT→PASV conversion).
    ReplyPortOk(ClientAsk),
}

#[derive(Debug, Clone)]
struct Transfer {
    command: String,
    path: String,
    /// The accepted user as of this command (see `stamp_user`).
    user: Option<String>,
    direction: Direction,
    plan: Option<PlanId>,
    mode: TransferMode,
    /// The final reply code, once it came.
    reply: Option<u16>,
    /// (to_client, to_server, outcome) once the data connection closed.
    data: Option<(u64, u64, DataOutcome)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Parsing,
    Passthrough,
    Ended,
}

/// The state of one FTP session, between one client and one server.
#[derive(Debug)]
pub struct Session {
    params: SessionParams,
    client_in: Framer,
    server_in: Framer,
    replies: ReplyTracker,
    /// Outstanding commands, oldest first.
    queue: VecDeque<Pending>,
    /// Lines of a reply that is being rewritten, held until its last line.
    held_reply: Vec<Vec<u8>>,
    /// Continuation lines, re-serialised, of a transfer's final reply that
    /// is held with it (see `defer_final`).
    held_transfer: Vec<Vec<u8>>,
    /// A transfer's final reply held until its active-mode plan has ended
    /// (see `defer_final`); no input is processed meanwhile.
    deferred: Option<Deferred>,
    /// The data plans, from their open to their end.
    plans: Plans,
    transfers: Vec<Transfer>,
    epsv_all: bool,
    /// The user the server accepted (230); `None` before a login succeeds.
    user: Option<String>,
    /// The name of a USER the server answered 331/332, until PASS/ACCT
    /// succeeds or fails.
    login: Option<String>,
    /// Commands refused so far (see [`MAX_REFUSALS`]).
    refusals: u32,
    phase: Phase,
    totals: Totals,
    actions: VecDeque<Action>,
}

/// A transfer's final reply held until its plan has ended.
#[derive(Debug)]
struct Deferred {
    plan: PlanId,
    code: u16,
    /// Its last line, re-serialised.
    raw: Vec<u8>,
    /// The text of the lines before it that were held for rewriting.
    held: Vec<Vec<u8>>,
}

// ---- bounds --------------------------------------------------------------
//
// Each buffer of a session has a bound, so that no peer can grow a session
// without limit. Past a bound the session either stops taking that peer's
// input (the shell stops reading, and TCP pushes back) or refuses.

/// Commands awaiting their reply, the gateway's own queued replies
/// included. Past it no further command is processed until a reply frees
/// a slot; its lines wait in the framer, and past [`MAX_INPUT_BACKLOG`] the
/// client is no longer read.
pub const MAX_PENDING: usize = 64;

/// Bytes of one peer's input framed but not yet processed (lines waiting
/// while an open is in flight, a final reply is held, or the queue is full,
/// each with its framer entry), plus its partial line. Past it
/// [`Session::wants_client_input`] or [`Session::wants_server_input`] turns
/// false and the shell stops reading that peer until processing resumes. It
/// is at least [`ftp::MAX_LINE`], so a partial line alone never stops
/// reading.
pub const MAX_INPUT_BACKLOG: usize = 2 * ftp::MAX_LINE;

/// Transfers whose log record waits for the final reply or the data
/// connection's end. Past it a transfer command is refused with 450 and not
/// forwarded, so no record is ever dropped to make room.
pub const MAX_OPEN_TRANSFERS: usize = 16;

/// Refused commands per session. The one that reaches it closes the session
/// with 421 and one log line.
pub const MAX_REFUSALS: u32 = 50;

/// Lines of one reply held for rewriting (a multi-line 227/229/PORT reply,
/// or the continuation lines of a held final reply). Lines past it, or past
/// [`MAX_HELD_BYTES`], are dropped: sent at once, they would reach the
/// client ahead of the reply's first line.
const MAX_HELD_LINES: usize = 64;
/// Bytes of one reply held for rewriting (see [`MAX_HELD_LINES`]).
const MAX_HELD_BYTES: usize = 8192;

/// Actions waiting for the shell. Once this many wait, processing pauses
/// until the shell has carried them out and calls [`Session::resume`], so
/// one read of small lines cannot queue an action per byte.
pub const MAX_ACTIONS: usize = 256;

impl Session {
    /// A new session; the server's greeting is the first reply expected.
    pub fn new(params: SessionParams) -> Self {
        let mut queue = VecDeque::new();
        queue.push_back(Pending::Greeting);
        Session {
            params,
            client_in: Framer::new(),
            server_in: Framer::new(),
            replies: ReplyTracker::default(),
            queue,
            held_reply: Vec::new(),
            held_transfer: Vec::new(),
            deferred: None,
            plans: Plans::new(),
            transfers: Vec::new(),
            epsv_all: false,
            user: None,
            login: None,
            refusals: 0,
            phase: Phase::Parsing,
            totals: Totals::default(),
            actions: VecDeque::new(),
        }
    }

    /// The next action to carry out, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Totals so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// True once TLS passthrough started: the shell copies raw bytes.
    pub fn is_passthrough(&self) -> bool {
        self.phase == Phase::Passthrough
    }

    /// True while a transfer that got its final reply still waits for its
    /// data connection's end. A backend that learns of that end late (the
    /// kernel one polls conntrack) may report it after the control
    /// connection closed; the shell waits briefly so the transfer is logged.
    pub fn awaiting_data(&self) -> bool {
        self.transfers.iter().any(|t| {
            t.reply.is_some() && t.data.is_none() && t.plan.is_some_and(|id| self.plans.is_live(id))
        })
    }

    /// True once the session ended.
    pub fn is_ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// Complete lines received so far, from both peers: what counts as
    /// activity on a control connection (a peer trickling bytes that never
    /// end a line is idle).
    pub fn lines_received(&self) -> u64 {
        self.client_in.lines_completed() + self.server_in.lines_completed()
    }

    /// Whether the shell should read from the client: false while its
    /// unprocessed input is over [`MAX_INPUT_BACKLOG`]. Processing resumes
    /// through a reply, a data event, an open's result or the idle timer,
    /// so a session that reads neither peer still ends or goes on.
    pub fn wants_client_input(&self) -> bool {
        self.phase == Phase::Parsing && self.client_in.buffered() < MAX_INPUT_BACKLOG
    }

    /// Whether the shell should read from the server (see
    /// [`Session::wants_client_input`]).
    pub fn wants_server_input(&self) -> bool {
        self.phase == Phase::Parsing && self.server_in.buffered() < MAX_INPUT_BACKLOG
    }

    /// Processes input that waits after a pause (see [`MAX_ACTIONS`]);
    /// true when actions now wait to be carried out.
    pub fn resume(&mut self) -> bool {
        self.process();
        !self.actions.is_empty()
    }

    /// Bytes from the client's control connection. Processing pauses once
    /// [`MAX_ACTIONS`] actions wait: carry them out, then call
    /// [`Session::resume`].
    pub fn client_bytes(&mut self, bytes: &[u8]) {
        if self.phase != Phase::Parsing {
            return;
        }
        self.client_in.push(bytes);
        self.process();
    }

    /// Bytes from the server's control connection (see
    /// [`Session::client_bytes`]).
    pub fn server_bytes(&mut self, bytes: &[u8]) {
        if self.phase != Phase::Parsing {
            return;
        }
        self.server_in.push(bytes);
        self.process();
    }

    /// The client closed its control connection.
    pub fn client_closed(&mut self) {
        self.end(EndReason::ClientClosed);
    }

    /// The server closed its control connection.
    pub fn server_closed(&mut self) {
        if self.phase == Phase::Parsing {
            let waiting = self.queue.iter().any(|p| !matches!(p, Pending::Local(_)));
            if waiting {
                self.push(Action::ToClient(rewrite::reply(
                    421,
                    "Service not available: the server closed the connection",
                )));
            }
        }
        self.end(EndReason::ServerClosed);
    }

    /// The control connection was idle for `idle_timeout`.
    pub fn idle_timeout(&mut self) {
        if self.phase == Phase::Parsing {
            self.push(Action::ToClient(rewrite::reply(
                421,
                "Idle timeout: closing control connection",
            )));
        }
        self.end(EndReason::Idle);
    }

    /// The result of an [`Action::Open`].
    pub fn opened(&mut self, id: PlanId, result: Result<Opened, OpenFailure>) {
        let Some(after) = self.plans.open_result(id, result.as_ref().ok().copied()) else {
            return;
        };
        match result {
            Ok(opened) => self.after_open(id, after, opened),
            Err(reason) => {
                let why = format!("Can't open data connection: {reason}");
                match after {
                    // The client's PORT/EPRT/PASV is not answered yet and may
                    // have replies ahead of it: queue the refusal.
                    AfterOpen::SendPort(a) => self.refuse(a.verb(), 425, &why),
                    // The server's reply was just consumed: answer now.
                    AfterOpen::ReplyPassive(a) | AfterOpen::ReplyPortOk(a) => {
                        self.refuse_now(a.verb(), 425, &why)
                    }
                }
            }
        }
        self.process();
    }

    /// A report from a data plan's task.
    pub fn data_event(&mut self, event: DataEvent) {
        match event {
            DataEvent::Connected { id } => {
                self.plans.connected(id);
            }
            DataEvent::Rejected { from, expected, .. } => {
                self.log(LogEvent::Refusal {
                    what: Refused::DataPeer,
                    code: 0,
                    reason: format!("data connection from {from} refused: expected {expected}"),
                });
            }
            DataEvent::Closed {
                id,
                to_client,
                to_server,
                outcome,
            } => {
                let was_connected = self.plans.remove(id).unwrap_or(false);
                self.totals.data_to_client += to_client;
                self.totals.data_to_server += to_server;
                if let Some(t) = self.transfers.iter_mut().find(|t| t.plan == Some(id)) {
                    t.data = Some((to_client, to_server, outcome));
                    self.flush_transfers();
                } else if !was_connected && outcome == DataOutcome::Expired {
                    self.log(LogEvent::PinholeExpired(id));
                }
                self.release_deferred(id);
            }
        }
    }

    fn push(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    fn log(&mut self, e: LogEvent) {
        self.push(Action::Log(e));
    }

    fn end(&mut self, reason: EndReason) {
        if self.phase == Phase::Ended {
            return;
        }
        self.phase = Phase::Ended;
        for id in self.plans.ids() {
            self.push(Action::Close(id));
        }
        // Every transfer gets its record: one the server never answered is
        // logged now; one whose data end is still to come waits for
        // `finish`.
        for t in &mut self.transfers {
            if t.reply.is_none() {
                t.reply = Some(0);
                let live = t.plan.is_some_and(|id| self.plans.is_live(id));
                if !live {
                    t.data.get_or_insert((0, 0, DataOutcome::Completed));
                }
            }
        }
        self.flush_transfers();
        self.push(Action::End(reason));
    }

    /// The session is over and late data ends have had their chance: logs
    /// every transfer still without a record, with what is known of it.
    pub fn finish(&mut self) {
        for t in &mut self.transfers {
            t.reply.get_or_insert(0);
            t.data
                .get_or_insert((0, 0, DataOutcome::Failed(DataFailure::EndNotReported)));
        }
        self.flush_transfers();
    }

    /// Processes framed input until both sides need more bytes, or an open
    /// is in flight.
    fn process(&mut self) {
        while self.phase == Phase::Parsing
            && !self.plans.is_opening()
            && self.deferred.is_none()
            && self.actions.len() < MAX_ACTIONS
        {
            // Server lines first: replies free the queue for local replies.
            match self.server_in.next_line() {
                Ok(Some(line)) => {
                    // Owned: the line is forwarded (or held) after the
                    // framer has moved on.
                    let line = line.reply();
                    self.server_line(line);
                    continue;
                }
                Ok(None) => {}
                Err(_) => {
                    self.push(Action::ToClient(rewrite::reply(
                        421,
                        "Service not available: the server sent an overlong line",
                    )));
                    self.end(EndReason::Framing("server"));
                    return;
                }
            }
            if self.phase != Phase::Parsing
                || self.plans.is_opening()
                || self.deferred.is_some()
                || self.queue.len() >= MAX_PENDING
            {
                // The client's lines wait in its framer (see
                // MAX_INPUT_BACKLOG).
                return;
            }
            match self.client_in.next_line() {
                Ok(Some(line)) => {
                    let line = line.command();
                    self.client_line(line);
                }
                Ok(None) => return,
                Err(_) => {
                    self.push(Action::ToClient(rewrite::reply(
                        500,
                        &format!("Line too long (limit {} bytes)", ftp::MAX_LINE),
                    )));
                    self.end(EndReason::Framing("client"));
                    return;
                }
            }
        }
    }

    // ---- client side -------------------------------------------------

    /// One command line, as checked: only its re-serialised form is ever
    /// sent, and one with CR, NUL or a cut Telnet sequence in it is not.
    fn client_line(&mut self, line: Result<CheckedCommand, LineFault>) {
        let line = match line {
            Ok(line) => line,
            Err(fault) => {
                self.refuse("?", 500, &format!("Syntax error: {fault}"));
                return;
            }
        };
        let parsed = match parse_command(line.text()) {
            Ok(p) => p,
            Err(CommandError::Malformed) => {
                self.refuse("?", 500, "Syntax error, command unrecognized");
                return;
            }
            Err(CommandError::BadArgument { verb, reason }) => {
                self.refuse(verb, 501, &format!("Syntax error in parameters: {reason}"));
                return;
            }
        };
        let verb = parsed.verb;
        if self
            .params
            .policy
            .deny_commands
            .iter()
            .any(|d| d.eq_ignore_ascii_case(verb))
        {
            let verb = verb.to_ascii_uppercase();
            self.refuse(&verb, 502, &format!("{verb} not allowed by gateway policy"));
            return;
        }
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
            Command::Auth(_) => match self.params.policy.tls {
                TlsPolicy::Refuse => self.refuse(
                    "AUTH",
                    534,
                    "TLS refused by gateway policy; continue in clear",
                ),
                TlsPolicy::Passthrough => self.forward(&line, Pending::Auth),
            },
            Command::User(name) => self.forward(&line, Pending::User(name)),
            Command::Transfer => {
                let verb = verb.to_ascii_uppercase();
                if self.transfers.len() >= MAX_OPEN_TRANSFERS {
                    self.refuse(
                        &verb,
                        450,
                        &format!(
                            "{verb} not taken: {MAX_OPEN_TRANSFERS} transfers await completion; retry after their replies"
                        ),
                    );
                    return;
                }
                let direction = match verb.as_str() {
                    "RETR" => Direction::Download,
                    "STOR" | "STOU" | "APPE" => Direction::Upload,
                    _ => Direction::Listing,
                };
                let (plan, mode) = self.plans.take_armed();
                let user = self.user_as_of_now();
                self.transfers.push(Transfer {
                    command: verb,
                    path: String::from_utf8_lossy(parsed.arg).into_owned(),
                    user,
                    direction,
                    plan,
                    mode,
                    reply: None,
                    data: None,
                });
                self.forward(&line, Pending::Transfer);
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

    fn forward(&mut self, line: &CheckedCommand, pending: Pending) {
        self.queue.push_back(pending);
        self.push(Action::ToServer(line.to_wire()));
    }

    /// PASV or EPSV from the client.
    fn client_passive(&mut self, ask: ClientAsk, param: EpsvParam) {
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
    fn client_active(&mut self, ask: ClientAsk, addr: SocketAddr) {
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
    fn server_passive_command(&self, client_used_epsv: bool) -> Vec<u8> {
        if self.params.server.is_ipv6() || client_used_epsv {
            b"EPSV\r\n".to_vec()
        } else {
            b"PASV\r\n".to_vec()
        }
    }

    // ---- server side -------------------------------------------------

    /// One reply line, as checked: only its re-serialised form is ever
    /// sent to the client.
    fn server_line(&mut self, line: CheckedReply) {
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
    fn head_rewrites(&self) -> bool {
        matches!(
            self.queue.front(),
            Some(Pending::Passive { .. } | Pending::ConvPassive { .. } | Pending::SentPort { .. })
        )
    }

    /// Under `tls: refuse`, FEAT does not advertise what would be refused.
    fn feat_filtered(&self, text: &[u8]) -> bool {
        if self.params.policy.tls != TlsPolicy::Refuse || self.queue.front() != Some(&Pending::Feat)
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
    fn server_reply(&mut self, code: u16, raw: Vec<u8>, held: Vec<Vec<u8>>) {
        if code < 200 {
            // Preliminary: the command stays outstanding.
            if matches!(
                self.queue.front(),
                Some(Pending::Transfer) | Some(Pending::Greeting)
            ) {
                if self.queue.front() == Some(&Pending::Transfer) {
                    self.stamp_user();
                }
                self.push(Action::ToClient(raw));
            } else {
                self.log(LogEvent::IgnoredReply {
                    code,
                    reason: "preliminary reply to a command that has none".into(),
                });
            }
            return;
        }
        self.flush_locals();
        let Some(raw) = self.defer_final(code, raw, held.as_slice()) else {
            return;
        };
        for cont in std::mem::take(&mut self.held_transfer) {
            self.push(Action::ToClient(cont));
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
            Pending::Local(bytes) => self.push(Action::ToClient(bytes)),
            Pending::Greeting | Pending::Forward | Pending::Feat => {
                self.forward_reply(code, raw);
            }
            Pending::User(name) => {
                self.forward_reply(code, raw);
                match code {
                    230 => self.accept_user(name),
                    // A new login starts: the server dropped the old one.
                    331 | 332 => {
                        self.user = None;
                        self.login = Some(name);
                    }
                    // Refused: the server keeps whatever login it had.
                    _ => {}
                }
            }
            Pending::Login => {
                self.forward_reply(code, raw);
                match code {
                    230 => {
                        if let Some(name) = self.login.take() {
                            self.accept_user(name);
                        }
                    }
                    332 => {}
                    _ => self.login = None,
                }
            }
            Pending::Rein => {
                self.forward_reply(code, raw);
                if (200..300).contains(&code) {
                    self.user = None;
                    self.login = None;
                }
            }
            Pending::Transfer => {
                self.forward_reply(code, raw);
                self.stamp_user();
                self.transfer_reply(code);
            }
            Pending::Auth => {
                // Not a PASV/EPSV answer either: a 227/229 loses its address.
                self.forward_reply(code, raw);
                if code == 234 {
                    self.phase = Phase::Passthrough;
                    let to_server = self.client_in.take_buffered();
                    let to_client = self.server_in.take_buffered();
                    self.log(LogEvent::TlsPassthrough);
                    self.push(Action::Passthrough {
                        to_server,
                        to_client,
                    });
                    return;
                }
            }
            Pending::Passive { ask } => self.passive_reply(code, &held, raw, ask, None),
            Pending::ConvPassive { ask, target } => {
                self.passive_reply(code, &held, raw, ask, Some(target))
            }
            Pending::SentPort { ask, plan } => {
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
        }
        self.flush_locals();
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
    /// Gives the reply back when it is not held.
    fn defer_final(&mut self, code: u16, raw: Vec<u8>, held: &[Vec<u8>]) -> Option<Vec<u8>> {
        let Some(plan) = self.holds_final(code) else {
            return Some(raw);
        };
        self.deferred = Some(Deferred {
            plan,
            code,
            raw,
            held: held.to_vec(),
        });
        None
    }

    /// The plan a transfer's final reply with `code` waits for: a 2xx to
    /// the transfer at the head, whose plan dials the client and is live.
    fn holds_final(&self, code: u16) -> Option<PlanId> {
        if !(200..300).contains(&code) || self.queue.front() != Some(&Pending::Transfer) {
            return None;
        }
        let plan = self
            .transfers
            .iter()
            .find(|t| t.reply.is_none())
            .and_then(|t| t.plan)?;
        self.plans.dials_client(plan).then_some(plan)
    }

    /// Lets a held final reply go once its plan is over.
    fn release_deferred(&mut self, id: PlanId) {
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
    fn forward_reply(&mut self, code: u16, raw: Vec<u8>) {
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
    fn passive_reply(
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
        let last = Line::new(&raw).text();
        // The last line first, then the held ones, newest first.
        let mut texts = std::iter::once(&*last)
            .chain(held.iter().rev().map(Vec::as_slice))
            .map(reply_text);
        let port = if code == 227 {
            texts.find_map(parse_227).map(|a| {
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
                a.port()
            })
        } else {
            texts.find_map(parse_229)
        };
        let Some(port) = port else {
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

    fn after_open(&mut self, id: PlanId, after: AfterOpen, opened: Opened) {
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
    fn passive_announcement(&mut self, ask: ClientAsk, id: PlanId) -> Vec<u8> {
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

    fn transfer_reply(&mut self, code: u16) {
        // Replies come in command order: the oldest transfer still waiting
        // for its final reply is the one answered.
        let Some(idx) = self.transfers.iter().position(|t| t.reply.is_none()) else {
            return;
        };
        self.transfers[idx].reply = Some(code);
        match self.transfers[idx].plan {
            None => {
                let outcome = if code < 400 {
                    DataOutcome::Completed
                } else {
                    DataOutcome::Failed(DataFailure::NoDataConnection)
                };
                self.transfers[idx].data.get_or_insert((0, 0, outcome));
            }
            Some(id) => {
                if code >= 400 && self.plans.is_unconnected(id) {
                    // No data connection will carry this transfer: release
                    // the pinhole now rather than at its timeout.
                    self.close_plan(id);
                }
            }
        }
        self.flush_transfers();
    }

    /// The server accepted `name` (230).
    fn accept_user(&mut self, name: String) {
        self.login = None;
        self.user = Some(name.clone());
        self.log(LogEvent::User(name));
    }

    /// The user for a transfer command read now. Replies come in command
    /// order, so the exact user is known at its first reply (`stamp_user`);
    /// this is what a transfer the server never answers keeps. While a
    /// login command ahead of it awaits its reply, the user is not known,
    /// and none is named.
    fn user_as_of_now(&self) -> Option<String> {
        let login_pending = self
            .queue
            .iter()
            .any(|p| matches!(p, Pending::User(_) | Pending::Login | Pending::Rein));
        if login_pending {
            None
        } else {
            self.user.clone()
        }
    }

    /// The transfer at the head of the queue got its first reply: every
    /// command before it has been answered and no later one has, so the
    /// session's user now is the user as of that command.
    fn stamp_user(&mut self) {
        let user = self.user.clone();
        if let Some(t) = self.transfers.iter_mut().find(|t| t.reply.is_none()) {
            t.user = user;
        }
    }

    /// Logs every transfer that has both its final reply and its data end.
    fn flush_transfers(&mut self) {
        let mut i = 0;
        while i < self.transfers.len() {
            let t = &self.transfers[i];
            if let (Some(reply), Some((to_client, to_server, outcome))) = (t.reply, &t.data) {
                let result = match (reply, outcome) {
                    (0, DataOutcome::Completed) => {
                        "session ended before the server's final reply".to_string()
                    }
                    (200..=299, DataOutcome::Completed) => "ok".to_string(),
                    (_, DataOutcome::Completed) => format!("server replied {reply}"),
                    (_, DataOutcome::Expired) => "data connection never made".to_string(),
                    (_, DataOutcome::Failed(why)) => why.to_string(),
                };
                let rec = TransferRecord {
                    command: t.command.clone(),
                    path: t.path.clone(),
                    user: t.user.clone(),
                    direction: t.direction,
                    mode: t.mode,
                    to_client: *to_client,
                    to_server: *to_server,
                    reply,
                    result,
                };
                self.transfers.remove(i);
                self.totals.transfers += 1;
                self.log(LogEvent::Transfer(rec));
            } else {
                i += 1;
            }
        }
    }

    // ---- plans -------------------------------------------------------

    /// The gateway listens for the client, and admits only the client.
    fn client_listen_leg(&self) -> Leg {
        Leg::Listen {
            bind: self.client_bind(),
            peer: self.params.client.ip(),
        }
    }

    /// The gateway connects to the client's (already checked) address.
    fn client_connect_leg(&self, target: SocketAddr) -> Leg {
        Leg::Connect {
            target,
            bind: self.client_bind(),
        }
    }

    /// The gateway listens for the server, and admits only the server.
    fn server_listen_leg(&self) -> Leg {
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
    fn open(&mut self, client: Leg, server: Leg, after: AfterOpen) {
        self.drop_unused_plan();
        let id = self.plans.begin(&client, &server, after);
        let plan = DataPlan {
            id,
            client,
            server,
            client_view: self.client_view(),
        };
        self.push(Action::Open(plan));
    }

    fn close_plan(&mut self, id: PlanId) {
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
    fn drop_unused_plan(&mut self) {
        if let Some(id) = self.plans.disarm_unused() {
            self.close_plan(id);
        }
    }

    /// Ports below 1024 are never accepted; others must be in `data_ports`.
    fn check_port(&self, port: u16) -> Result<(), String> {
        if port < 1024 {
            return Err(format!("privileged port {port}"));
        }
        let range = self.params.policy.data_ports;
        if !range.contains(port) {
            return Err(format!("port {port} outside allowed data ports {range}"));
        }
        Ok(())
    }

    fn client_view(&self) -> Option<IpAddr> {
        self.params.transparent.then(|| self.params.server.ip())
    }

    /// In transparent mode the local address may not be ours (tproxy), and
    /// the backend makes the client see the server's address anyway.
    fn client_bind(&self) -> IpAddr {
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
    fn announce_ip(&self) -> IpAddr {
        if self.params.transparent {
            return self.params.server.ip();
        }
        match self.params.announce {
            Some(ip) if ip.is_ipv4() == self.params.client.is_ipv4() => ip,
            _ => self.params.client_local.ip(),
        }
    }

    // ---- replies the gateway makes -----------------------------------

    fn reply_local(&mut self, code: u16, text: &str) {
        let bytes = rewrite::reply(code, text);
        if self.queue.is_empty() {
            self.push(Action::ToClient(bytes));
        } else {
            self.queue.push_back(Pending::Local(bytes));
        }
    }

    /// A reply that answers the command now at the head (already popped).
    fn reply_now(&mut self, bytes: Vec<u8>) {
        self.push(Action::ToClient(bytes));
        self.flush_locals();
    }

    fn refuse(&mut self, what: &str, code: u16, reason: &str) {
        self.log(LogEvent::Refusal {
            what: Refused::Command(what.to_string()),
            code,
            reason: reason.to_string(),
        });
        self.reply_local(code, reason);
        self.count_refusal();
    }

    /// A refusal that answers the command whose reply is due now.
    fn refuse_now(&mut self, what: &str, code: u16, reason: &str) {
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
    fn count_refusal(&mut self) {
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

    fn flush_locals(&mut self) {
        while let Some(Pending::Local(_)) = self.queue.front() {
            if let Some(Pending::Local(bytes)) = self.queue.pop_front() {
                self.push(Action::ToClient(bytes));
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
fn lossy_tail(raw: &[u8]) -> String {
    let text = Line::new(raw).text();
    let s = String::from_utf8_lossy(reply_text(&text));
    s.chars().filter(|c| !c.is_control()).take(120).collect()
}
