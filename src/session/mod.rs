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

mod commands;
mod plans;
mod replies;
mod tls;
mod transfers;

use crate::config::{DataMode, ServerMode, TlsPolicy, UpstreamMode};
use crate::ftp::{
    self, parse_227, parse_229, parse_command, rewrite, CheckedCommand, CheckedReply, Command,
    CommandError, EpsvParam, Framer, Line, LineFault, ReplyPos, ReplyTracker,
};
use crate::pinhole::{
    DataEvent, DataFailure, DataOutcome, DataPlan, DataTls, Leg, OpenError, Opened, PlanId,
};
use crate::rules::Policy;
use plans::Plans;
use replies::Deferred;
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use transfers::Transfer;

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
    /// What the listener offers for TLS on each leg.
    pub tls: TlsLegs,
}

/// What a listener offers for TLS, fixed at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsLegs {
    /// The listener has a certificate: `tls: terminate` can answer AUTH TLS.
    pub client_cert: bool,
    /// The client leg is TLS from its first byte (an implicit listener).
    pub client_implicit: bool,
    /// How the gateway speaks to the server.
    pub upstream: UpstreamMode,
    /// One leg in TLS and the other in clear text is allowed (and logged).
    pub allow_downgrade: bool,
    /// The data plane can carry TLS: PROT P is accepted from the client
    /// and sent to the server. Without it PROT P gets 536 and the server
    /// leg is asked for PROT C.
    pub data_tls: bool,
}

impl Default for TlsLegs {
    /// No TLS on either leg: a plain listener.
    fn default() -> Self {
        TlsLegs {
            client_cert: false,
            client_implicit: false,
            upstream: UpstreamMode::Off,
            allow_downgrade: false,
            data_tls: false,
        }
    }
}

/// One of a session's two control connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The gateway↔client connection: the gateway is the TLS server.
    Client,
    /// The gateway↔server connection: the gateway is the TLS client.
    Server,
}

/// The TLS state of one control leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LegTls {
    /// Clear text.
    Plain,
    /// (Server leg) the gateway's own AUTH TLS is on its way.
    Asking,
    /// The shell was told to start TLS and has not reported back.
    Starting,
    /// TLS is up; for the server leg, PBSZ/PROT may still be outstanding.
    Up,
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the client.
    ToClient(Vec<u8>),
    /// Write these bytes to the server.
    ToServer(Vec<u8>),
    /// Start TLS on this control connection (the gateway is the TLS server
    /// toward the client, the TLS client toward the server), then report
    /// with [`Session::tls_started`]. Nothing more is read from that peer
    /// in clear text.
    StartTls(Side),
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
    /// Clear-text bytes the client sent behind AUTH TLS, before its
    /// handshake; discarded, never taken as protected commands.
    DiscardedAfterAuth(usize),
    /// One leg in TLS and the other in clear text (`allow_downgrade`).
    Downgrade(String),
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
    /// The plan's task reported its end before its open result. The
    /// gateway's shell reports the open first; a plan that is already over
    /// must not be announced, whatever its shape.
    #[error("the data connection ended before it was announced")]
    EndedFirst,
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
    /// What each leg of its data connection negotiated, if TLS.
    pub data_tls: DataTls,
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
    /// The server did not take the gateway's AUTH TLS, PBSZ or PROT.
    ServerTls(String),
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::ClientClosed => f.write_str("client closed"),
            EndReason::ServerClosed => f.write_str("server closed"),
            EndReason::Idle => f.write_str("idle timeout"),
            EndReason::Framing(side) => write!(f, "overlong line from {side}"),
            EndReason::TooManyRefusals(n) => write!(f, "too many refusals ({n})"),
            EndReason::ServerTls(why) => write!(f, "server leg TLS: {why}"),
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
    /// The gateway's 234 to the client's AUTH TLS, waiting for its turn;
    /// once sent, TLS starts on the client leg.
    LocalAuth(Vec<u8>),
    /// A command the gateway sent the server itself; its reply is not
    /// forwarded.
    Own(OwnCommand),
}

/// The commands the gateway sends the server on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnCommand {
    /// AUTH TLS (upstream explicit).
    Auth,
    /// PBSZ 0.
    Pbsz,
    /// PROT P or PROT C (with the data plane's TLS or without).
    Prot,
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
    /// A transfer's final reply held until its active-mode plan has ended,
    /// or until its plan's TLS handshakes have a result (see
    /// `defer_final`); no input is processed meanwhile.
    deferred: Option<Deferred>,
    /// The data plans, from their open to their end.
    plans: Plans,
    transfers: Vec<Transfer>,
    /// Transfer commands taken so far (see `latest_transfer`).
    transfer_commands: u64,
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
    /// The client leg's TLS state and its PROT (true: P).
    client_tls: LegTls,
    client_prot_p: bool,
    /// The server leg's TLS state, and whether its PBSZ/PROT are done
    /// (true at once when the leg is plain).
    server_tls: LegTls,
    server_ready: bool,
    server_prot_p: bool,
    /// The FEAT reply at the head had continuation lines.
    feat_lines: bool,
    /// The downgrade line was logged.
    downgrade_logged: bool,
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
pub(crate) const MAX_OPEN_TRANSFERS: usize = 16;

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
pub(crate) const MAX_ACTIONS: usize = 256;

impl Session {
    /// A new session; the server's greeting is the first reply expected.
    pub fn new(params: SessionParams) -> Self {
        let mut queue = VecDeque::new();
        queue.push_back(Pending::Greeting);
        let client_tls = if params.tls.client_implicit {
            LegTls::Up
        } else {
            LegTls::Plain
        };
        let (server_tls, server_ready) = match params.tls.upstream {
            UpstreamMode::Off => (LegTls::Plain, true),
            UpstreamMode::Explicit => (LegTls::Plain, false),
            UpstreamMode::Implicit => (LegTls::Up, false),
        };
        Session {
            client_tls,
            client_prot_p: false,
            server_tls,
            server_ready,
            server_prot_p: false,
            feat_lines: false,
            downgrade_logged: false,
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
            transfer_commands: 0,
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
    pub(crate) fn awaiting_data(&self) -> bool {
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
    pub(crate) fn lines_received(&self) -> u64 {
        self.client_in.lines_completed() + self.server_in.lines_completed()
    }

    /// Whether the shell should read from the client: false while its
    /// unprocessed input is over [`MAX_INPUT_BACKLOG`]. Processing resumes
    /// through a reply, a data event, an open's result or the idle timer,
    /// so a session that reads neither peer still ends or goes on.
    pub fn wants_client_input(&self) -> bool {
        // Between AUTH TLS and the handshake the client's bytes are its
        // ClientHello, for the shell's TLS, not for the framer.
        self.phase == Phase::Parsing
            && self.client_tls != LegTls::Starting
            && self.client_in.buffered() < MAX_INPUT_BACKLOG
    }

    /// Whether the shell should read from the server (see
    /// [`Session::wants_client_input`]).
    pub fn wants_server_input(&self) -> bool {
        self.phase == Phase::Parsing
            && self.server_tls != LegTls::Starting
            && self.server_in.buffered() < MAX_INPUT_BACKLOG
    }

    /// TLS is up on `side` (after [`Action::StartTls`]): reading resumes.
    pub fn tls_started(&mut self, side: Side) {
        match side {
            Side::Client => {
                self.client_tls = LegTls::Up;
                self.client_prot_p = false;
            }
            Side::Server => {
                self.server_tls = LegTls::Up;
                self.own_command(OwnCommand::Pbsz);
                self.own_command(OwnCommand::Prot);
            }
        }
        self.process();
    }

    /// The protection of each leg's data connections (true: PROT P).
    pub fn data_protection(&self) -> (bool, bool) {
        (
            self.client_prot_p && self.client_tls == LegTls::Up,
            self.server_prot_p && self.server_tls == LegTls::Up,
        )
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
        if self.client_tls == LegTls::Starting {
            // Clear text after AUTH TLS: never taken as a command.
            self.log(LogEvent::DiscardedAfterAuth(bytes.len()));
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
        let result = match result {
            Ok(_) if !self.plans.is_live(id) => Err(OpenFailure::EndedFirst),
            other => other,
        };
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
            DataEvent::Handshaking { id } => {
                self.plans.handshaking(id);
            }
            DataEvent::Connected { id } => {
                self.plans.connected(id);
                self.release_secured(id);
            }
            DataEvent::Secured { id, tls } => {
                self.plans.secured(id, tls);
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
                let tls = self.plans.tls(id);
                let was_connected = self.plans.remove(id).unwrap_or(false);
                self.totals.data_to_client += to_client;
                self.totals.data_to_server += to_server;
                if let Some(t) = self.transfers.iter_mut().find(|t| t.plan == Some(id)) {
                    t.data = Some((to_client, to_server, outcome));
                    t.data_tls = tls;
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
                || !self.server_ready
                || self.client_tls == LegTls::Starting
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
}
