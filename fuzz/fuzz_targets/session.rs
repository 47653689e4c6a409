//! The session core fed a random sequence of events: client bytes, server
//! bytes, data events, open results, closes and idle. Besides "no panic",
//! it checks the gateway's central promise on every plan it asks for: data
//! legs only ever connect to, or admit, the two control peers.
#![no_main]

use ftpgate::config::{DataMode, PortRange, ServerMode, TlsPolicy};
use ftpgate::pinhole::{DataEvent, DataFailure, DataOutcome, Leg, Opened};
use ftpgate::rules::Policy;
use ftpgate::session::{Action, OpenFailure, Session, SessionParams};
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;

const CLIENT: &str = "198.51.100.7:40000";
const GW_PUBLIC: &str = "203.0.113.1:21";
const SERVER: &str = "10.0.0.3:21";
const GW_INSIDE: &str = "10.0.0.1:50000";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("constant address")
}

/// Reads the input as a script: one opcode byte, then its operands.
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn bytes(&mut self) -> &[u8] {
        let n = usize::from(self.byte().unwrap_or(0)).min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fuzz_target!(|data: &[u8]| {
    let mut s = Script(data);
    let Some(setup) = s.byte() else { return };
    let server_mode = match setup % 3 {
        0 => ServerMode::Same,
        1 => ServerMode::Passive,
        _ => ServerMode::Active,
    };
    let transparent = setup & 4 != 0;
    let client = sa(CLIENT);
    let server = sa(SERVER);
    let mut core = Session::new(SessionParams {
        client,
        client_local: sa(GW_PUBLIC),
        server,
        server_local: sa(GW_INSIDE),
        transparent,
        announce: None,
        policy: Policy {
            rule: "fuzz".into(),
            modes: vec![DataMode::Passive, DataMode::Active],
            server_mode,
            data_ports: PortRange {
                lo: 1024,
                hi: 65535,
            },
            tls: if setup & 8 != 0 {
                TlsPolicy::Passthrough
            } else {
                TlsPolicy::Refuse
            },
            deny_commands: vec!["SITE".into()],
            require_tls: false,
            require_prot_p: false,
        },
        tls: Default::default(),
    });
    let mut plans: Vec<u64> = Vec::new();
    let mut ended = false;
    while let Some(op) = s.byte() {
        match op % 9 {
            0 | 1 => core.client_bytes(s.bytes()),
            2 | 3 => core.server_bytes(s.bytes()),
            4 => {
                let id = pick(&plans, s.byte());
                core.data_event(DataEvent::Connected { id });
            }
            5 => {
                let id = pick(&plans, s.byte());
                let outcome = match s.byte().unwrap_or(0) % 3 {
                    0 => DataOutcome::Completed,
                    1 => DataOutcome::Expired,
                    _ => DataOutcome::Failed(DataFailure::Relay("fuzz".into())),
                };
                let n = u64::from(s.byte().unwrap_or(0));
                core.data_event(DataEvent::Closed {
                    id,
                    to_client: n,
                    to_server: n / 2,
                    outcome,
                });
            }
            6 => {
                let id = pick(&plans, s.byte());
                core.data_event(DataEvent::Rejected {
                    id,
                    from: sa("192.0.2.9:1234"),
                    expected: client.ip(),
                });
            }
            7 => match s.byte().unwrap_or(0) % 3 {
                0 => core.client_closed(),
                1 => core.server_closed(),
                _ => core.idle_timeout(),
            },
            _ => {
                // An open result for a plan that may or may not be pending.
                let id = pick(&plans, s.byte());
                core.opened(id, Err(OpenFailure::Io("fuzz".into())));
            }
        }
        // Carry out the actions as the shell would, answering opens.
        while let Some(a) = core.poll_action() {
            match a {
                Action::Open(plan) => {
                    check_leg(&plan.client, client);
                    check_leg(&plan.server, server);
                    plans.push(plan.id);
                    let ok = s.byte().unwrap_or(0) % 4 != 0;
                    let result = if ok {
                        Ok(Opened {
                            client_listen: matches!(plan.client, Leg::Listen { .. })
                                .then(|| sa("203.0.113.1:20001")),
                            server_listen: matches!(plan.server, Leg::Listen { .. })
                                .then(|| sa("10.0.0.1:30001")),
                        })
                    } else {
                        Err(OpenFailure::PoolExhausted("client"))
                    };
                    core.opened(plan.id, result);
                }
                // The shell stops driving the core here.
                Action::End(_) | Action::Passthrough { .. } => ended = true,
                _ => {}
            }
        }
        if ended {
            break;
        }
    }
});

fn pick(plans: &[u64], b: Option<u8>) -> u64 {
    let b = usize::from(b.unwrap_or(0));
    plans
        .get(b % (plans.len() + 1))
        .copied()
        .unwrap_or(b as u64)
}

/// A leg may only ever reach or admit its own control peer.
fn check_leg(leg: &Leg, peer: SocketAddr) {
    match leg {
        Leg::Listen { peer: p, .. } => assert_eq!(*p, peer.ip(), "listen admits a third party"),
        Leg::Connect { target, .. } => {
            assert_eq!(target.ip(), peer.ip(), "connects to a third party");
            assert!(target.port() >= 1024, "connects to a privileged port");
        }
    }
}
