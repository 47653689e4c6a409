//! Transfers: each transfer command's record, completed by its final reply
//! and its data connection's end, then logged.

use super::*;

#[derive(Debug, Clone)]
pub(super) struct Transfer {
    pub(super) command: String,
    pub(super) path: String,
    /// The accepted user as of this command (see `stamp_user`).
    pub(super) user: Option<String>,
    pub(super) direction: Direction,
    pub(super) plan: Option<PlanId>,
    pub(super) mode: TransferMode,
    /// The final reply code, once it came.
    pub(super) reply: Option<u16>,
    /// (to_client, to_server, outcome) once the data connection closed.
    pub(super) data: Option<(u64, u64, DataOutcome)>,
    /// What its data connection's TLS legs negotiated.
    pub(super) data_tls: DataTls,
}

impl Session {
    /// A transfer command (RETR, STOR, LIST...): its record takes the armed
    /// plan, and it is forwarded; past [`MAX_OPEN_TRANSFERS`] it is refused.
    pub(super) fn transfer_command(&mut self, line: &CheckedCommand, verb: &str, arg: &[u8]) {
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
            path: String::from_utf8_lossy(arg).into_owned(),
            user,
            direction,
            plan,
            mode,
            reply: None,
            data: None,
            data_tls: DataTls::default(),
        });
        self.forward(line, Pending::Transfer);
    }

    pub(super) fn transfer_reply(&mut self, code: u16) {
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
    pub(super) fn accept_user(&mut self, name: String) {
        self.login = None;
        self.user = Some(name.clone());
        self.log(LogEvent::User(name));
    }

    /// The user for a transfer command read now. Replies come in command
    /// order, so the exact user is known at its first reply (`stamp_user`);
    /// this is what a transfer the server never answers keeps. While a
    /// login command ahead of it awaits its reply, the user is not known,
    /// and none is named.
    pub(super) fn user_as_of_now(&self) -> Option<String> {
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
    pub(super) fn stamp_user(&mut self) {
        let user = self.user.clone();
        if let Some(t) = self.transfers.iter_mut().find(|t| t.reply.is_none()) {
            t.user = user;
        }
    }

    /// Logs every transfer that has both its final reply and its data end.
    pub(super) fn flush_transfers(&mut self) {
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
                    data_tls: t.data_tls.clone(),
                };
                self.transfers.remove(i);
                self.totals.transfers += 1;
                self.log(LogEvent::Transfer(rec));
            } else {
                i += 1;
            }
        }
    }
}
