//! The sans-IO session core, fed lines: every data plan and every refusal.

use ftpgate::config::{DataMode, PortRange, ServerMode, TlsPolicy};
use ftpgate::pinhole::{DataEvent, DataFailure, DataOutcome, DataPlan, Leg, Opened};
use ftpgate::rules::Policy;
use ftpgate::session::{
    Action, Direction, EndReason, LogEvent, OpenFailure, Refused, Session, SessionParams,
};
use std::net::{IpAddr, SocketAddr};

const CLIENT: &str = "198.51.100.7:50000";
const GW_PUBLIC: &str = "192.0.2.1:21";
const SERVER: &str = "10.0.0.3:21";
const GW_INSIDE: &str = "10.0.0.1:40123";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn policy(server_mode: ServerMode) -> Policy {
    Policy {
        rule: "test".into(),
        modes: vec![DataMode::Passive, DataMode::Active],
        server_mode,
        data_ports: PortRange {
            lo: 1024,
            hi: 65535,
        },
        tls: TlsPolicy::Refuse,
        deny_commands: vec!["SITE".into()],
        require_tls: false,
        require_prot_p: false,
    }
}

fn reverse(server_mode: ServerMode) -> Session {
    session(server_mode, false, CLIENT, GW_PUBLIC, SERVER, GW_INSIDE)
}

fn session(
    server_mode: ServerMode,
    transparent: bool,
    client: &str,
    client_local: &str,
    server: &str,
    server_local: &str,
) -> Session {
    let mut s = Session::new(SessionParams {
        client: sa(client),
        client_local: sa(client_local),
        server: sa(server),
        server_local: sa(server_local),
        transparent,
        announce: None,
        policy: policy(server_mode),
        tls: Default::default(),
    });
    s.server_bytes(b"220 ready\r\n");
    assert_eq!(
        drain(&mut s),
        vec![Action::ToClient(b"220 ready\r\n".to_vec())]
    );
    s
}

fn drain(s: &mut Session) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

/// Actions other than logs.
fn acts(s: &mut Session) -> Vec<Action> {
    drain(s)
        .into_iter()
        .filter(|a| !matches!(a, Action::Log(_)))
        .collect()
}

fn logs(actions: &[Action]) -> Vec<LogEvent> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Log(l) => Some(l.clone()),
            _ => None,
        })
        .collect()
}

fn to_client(a: &[Action]) -> String {
    a.iter()
        .filter_map(|a| match a {
            Action::ToClient(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect()
}

fn to_server(a: &[Action]) -> String {
    a.iter()
        .filter_map(|a| match a {
            Action::ToServer(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect()
}

fn the_plan(a: &[Action]) -> DataPlan {
    let plans: Vec<_> = a
        .iter()
        .filter_map(|a| match a {
            Action::Open(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(plans.len(), 1, "expected one Open in {a:?}");
    plans[0].clone()
}

/// PASV, the server's 227, and the pinhole opened: the usual start of a
/// passive transfer.
fn passive_plan(s: &mut Session) -> DataPlan {
    s.client_bytes(b"PASV\r\n");
    drain(s);
    s.server_bytes(b"227 (10,0,0,3,195,80)\r\n");
    let plan = the_plan(&drain(s));
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: Some(sa("192.0.2.1:40000")),
            server_listen: None,
        }),
    );
    drain(s);
    plan
}

#[test]
fn pasv_same_mode_rewrites_227_to_gateway_and_connects_to_control_peer() {
    let mut s = reverse(ServerMode::Same);
    s.client_bytes(b"PASV\r\n");
    assert_eq!(to_server(&acts(&mut s)), "PASV\r\n");
    // The server announces its private (or a third-party) address: ignored.
    s.server_bytes(b"227 Entering Passive Mode (172,16,9,9,200,10).\r\n");
    let a = drain(&mut s);
    let plan = the_plan(&a);
    assert_eq!(
        plan.client,
        Leg::Listen {
            bind: ip("192.0.2.1"),
            peer: ip("198.51.100.7")
        }
    );
    assert_eq!(
        plan.server,
        Leg::Connect {
            target: sa("10.0.0.3:51210"),
            bind: ip("10.0.0.1")
        }
    );
    assert_eq!(plan.client_view, None);
    assert_eq!(to_client(&a), "", "no reply before the pinhole exists");
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: Some(sa("192.0.2.1:40001")),
            server_listen: None,
        }),
    );
    assert_eq!(
        to_client(&acts(&mut s)),
        "227 Entering Passive Mode (192,0,2,1,156,65).\r\n"
    );
}

#[test]
fn epsv_same_mode_answers_229_with_gateway_port() {
    let mut s = reverse(ServerMode::Same);
    s.client_bytes(b"EPSV\r\n");
    assert_eq!(to_server(&acts(&mut s)), "EPSV\r\n");
    s.server_bytes(b"229 Entering Extended Passive Mode (|||50001|)\r\n");
    let plan = the_plan(&drain(&mut s));
    assert_eq!(
        plan.server,
        Leg::Connect {
            target: sa("10.0.0.3:50001"),
            bind: ip("10.0.0.1")
        }
    );
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: Some(sa("192.0.2.1:40002")),
            server_listen: None,
        }),
    );
    assert_eq!(
        to_client(&acts(&mut s)),
        "229 Entering Extended Passive Mode (|||40002|)\r\n"
    );
}

#[test]
fn port_same_mode_sends_gateway_port_to_server() {
    let mut s = reverse(ServerMode::Same);
    s.client_bytes(b"PORT 198,51,100,7,195,80\r\n");
    let a = drain(&mut s);
    let plan = the_plan(&a);
    assert_eq!(
        plan.client,
        Leg::Connect {
            target: sa("198.51.100.7:50000"),
            bind: ip("192.0.2.1")
        }
    );
    assert_eq!(
        plan.server,
        Leg::Listen {
            bind: ip("10.0.0.1"),
            peer: ip("10.0.0.3")
        }
    );
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: None,
            server_listen: Some(sa("10.0.0.1:41000")),
        }),
    );
    assert_eq!(to_server(&acts(&mut s)), "PORT 10,0,0,1,160,40\r\n");
    s.server_bytes(b"200 PORT command successful\r\n");
    assert_eq!(to_client(&acts(&mut s)), "200 PORT command successful\r\n");
}

#[test]
fn eprt_v6_client_to_v4_server_speaks_port_on_the_server_leg() {
    let mut s = session(
        ServerMode::Same,
        false,
        "[2001:db8::7]:50000",
        "[2001:db8::1]:21",
        SERVER,
        GW_INSIDE,
    );
    s.client_bytes(b"EPRT |2|2001:db8::7|50001|\r\n");
    let plan = the_plan(&drain(&mut s));
    assert_eq!(
        plan.client,
        Leg::Connect {
            target: sa("[2001:db8::7]:50001"),
            bind: ip("2001:db8::1")
        }
    );
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: None,
            server_listen: Some(sa("10.0.0.1:41001")),
        }),
    );
    assert_eq!(to_server(&acts(&mut s)), "PORT 10,0,0,1,160,41\r\n");
    s.server_bytes(b"200 ok\r\n");
    assert_eq!(to_client(&acts(&mut s)), "200 ok\r\n");
}

#[test]
fn epsv_v6_client_to_v4_server_uses_epsv_and_answers_229() {
    let mut s = session(
        ServerMode::Same,
        false,
        "[2001:db8::7]:50000",
        "[2001:db8::1]:21",
        SERVER,
        GW_INSIDE,
    );
    s.client_bytes(b"PASV\r\n");
    let a = drain(&mut s);
    assert!(to_client(&a).starts_with("504 "), "{a:?}");
    s.client_bytes(b"EPSV\r\n");
    assert_eq!(to_server(&acts(&mut s)), "EPSV\r\n");
}

#[test]
fn port_to_passive_conversion() {
    let mut s = reverse(ServerMode::Passive);
    s.client_bytes(b"EPRT |1|198.51.100.7|50001|\r\n");
    assert_eq!(to_server(&acts(&mut s)), "PASV\r\n");
    s.server_bytes(b"227 Entering Passive Mode (10,0,0,3,195,81)\r\n");
    let plan = the_plan(&drain(&mut s));
    assert_eq!(
        plan.client,
        Leg::Connect {
            target: sa("198.51.100.7:50001"),
            bind: ip("192.0.2.1")
        }
    );
    assert_eq!(
        plan.server,
        Leg::Connect {
            target: sa("10.0.0.3:50001"),
            bind: ip("10.0.0.1")
        }
    );
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: None,
            server_listen: None,
        }),
    );
    assert_eq!(to_client(&acts(&mut s)), "200 EPRT command successful\r\n");
}

#[test]
fn passive_to_active_conversion() {
    let mut s = reverse(ServerMode::Active);
    s.client_bytes(b"PASV\r\n");
    let plan = the_plan(&drain(&mut s));
    assert_eq!(
        plan.client,
        Leg::Listen {
            bind: ip("192.0.2.1"),
            peer: ip("198.51.100.7")
        }
    );
    assert_eq!(
        plan.server,
        Leg::Listen {
            bind: ip("10.0.0.1"),
            peer: ip("10.0.0.3")
        }
    );
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: Some(sa("192.0.2.1:40003")),
            server_listen: Some(sa("10.0.0.1:41003")),
        }),
    );
    assert_eq!(to_server(&acts(&mut s)), "PORT 10,0,0,1,160,43\r\n");
    s.server_bytes(b"200 PORT ok\r\n");
    assert_eq!(
        to_client(&acts(&mut s)),
        "227 Entering Passive Mode (192,0,2,1,156,67).\r\n"
    );
}

#[test]
fn passive_to_active_conversion_refused_by_server_closes_plan_with_425() {
    let mut s = reverse(ServerMode::Active);
    s.client_bytes(b"EPSV\r\n");
    let plan = the_plan(&drain(&mut s));
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: Some(sa("192.0.2.1:40003")),
            server_listen: Some(sa("10.0.0.1:41003")),
        }),
    );
    drain(&mut s);
    s.server_bytes(b"500 Illegal PORT command.\r\n");
    let a = drain(&mut s);
    assert!(a.contains(&Action::Close(plan.id)), "{a:?}");
    assert!(to_client(&a).starts_with("425 "), "{a:?}");
}

#[test]
fn transparent_mode_announces_the_server_address_and_asks_for_interception() {
    let mut s = session(
        ServerMode::Same,
        true,
        "192.168.1.10:50000",
        "192.168.1.1:8021",
        "203.0.113.5:21",
        "203.0.113.1:40000",
    );
    s.client_bytes(b"PASV\r\n");
    drain(&mut s);
    s.server_bytes(b"227 Entering Passive Mode (203,0,113,5,100,0)\r\n");
    let plan = the_plan(&drain(&mut s));
    assert_eq!(plan.client_view, Some(ip("203.0.113.5")));
    assert_eq!(
        plan.client,
        Leg::Listen {
            bind: ip("0.0.0.0"),
            peer: ip("192.168.1.10")
        }
    );
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: Some(sa("0.0.0.0:40010")),
            server_listen: None,
        }),
    );
    assert_eq!(
        to_client(&acts(&mut s)),
        "227 Entering Passive Mode (203,0,113,5,156,74).\r\n"
    );
}

#[test]
fn refusals_answer_and_the_session_goes_on() {
    // (line, expected reply code)
    let cases: &[(&[u8], &str)] = &[
        (b"PORT 203,0,113,9,195,80\r\n", "501"), // bounce: third party
        (b"PORT 198,51,100,7,0,22\r\n", "501"),  // privileged port
        (b"PORT 198,51,100,7,300,1\r\n", "501"), // octet > 255
        (b"PORT 198,51,100,7,0,0\r\n", "501"),   // port 0
        (b"EPRT |1|203.0.113.9|5000|\r\n", "501"), // bounce via EPRT
        (b"EPRT |2|2001:db8::1|5000|\r\n", "522"), // wrong family
        (b"EPSV 2\r\n", "522"),
        (b"LPRT 4,4,1,2,3,4,2,1,1\r\n", "502"),
        (b"LPSV\r\n", "502"),
        (b"SITE CHMOD 777 x\r\n", "502"), // deny_commands
        (b"AUTH TLS\r\n", "534"),         // tls: refuse
        (b"227 Entering Passive Mode (1,2,3,4,5,6)\r\n", "500"), // reply sent by a client
    ];
    for (line, code) in cases {
        let mut s = reverse(ServerMode::Same);
        s.client_bytes(line);
        let a = drain(&mut s);
        let out = to_client(&a);
        assert!(
            out.starts_with(code),
            "{}: got {out:?}",
            String::from_utf8_lossy(line)
        );
        assert_eq!(
            to_server(&a),
            "",
            "nothing forwarded for {}",
            String::from_utf8_lossy(line)
        );
        assert!(
            !a.iter().any(|a| matches!(a, Action::Open(_))),
            "no pinhole for {}",
            String::from_utf8_lossy(line)
        );
        assert!(
            logs(&a)
                .iter()
                .any(|l| matches!(l, LogEvent::Refusal { .. })),
            "refusal logged for {}",
            String::from_utf8_lossy(line)
        );
        // The session continues.
        s.client_bytes(b"NOOP\r\n");
        assert_eq!(to_server(&acts(&mut s)), "NOOP\r\n");
    }
}

#[test]
fn data_ports_policy_limits_port_and_227() {
    let mut s = Session::new(SessionParams {
        client: sa(CLIENT),
        client_local: sa(GW_PUBLIC),
        server: sa(SERVER),
        server_local: sa(GW_INSIDE),
        transparent: false,
        announce: None,
        policy: Policy {
            data_ports: PortRange {
                lo: 50000,
                hi: 50100,
            },
            ..policy(ServerMode::Same)
        },
        tls: Default::default(),
    });
    s.server_bytes(b"220 hi\r\n");
    drain(&mut s);
    s.client_bytes(b"PORT 198,51,100,7,4,0\r\n"); // 1024: outside
    assert!(to_client(&drain(&mut s)).starts_with("501 "));
    s.client_bytes(b"PASV\r\n");
    drain(&mut s);
    s.server_bytes(b"227 Entering Passive Mode (10,0,0,3,4,1)\r\n"); // 1025: outside
    let a = drain(&mut s);
    assert!(to_client(&a).starts_with("425 "), "{a:?}");
    assert!(!a.iter().any(|a| matches!(a, Action::Open(_))));
}

#[test]
fn modes_policy_refuses_active() {
    let mut s = Session::new(SessionParams {
        client: sa(CLIENT),
        client_local: sa(GW_PUBLIC),
        server: sa(SERVER),
        server_local: sa(GW_INSIDE),
        transparent: false,
        announce: Some(ip("203.0.113.77")),
        policy: Policy {
            modes: vec![DataMode::Passive],
            ..policy(ServerMode::Same)
        },
        tls: Default::default(),
    });
    s.server_bytes(b"220 hi\r\n");
    drain(&mut s);
    s.client_bytes(b"PORT 198,51,100,7,195,80\r\n");
    assert!(to_client(&drain(&mut s)).starts_with("502 "));
    // announce is used in 227.
    s.client_bytes(b"PASV\r\n");
    drain(&mut s);
    s.server_bytes(b"227 =10,0,0,3,195,80\r\n");
    let plan = the_plan(&drain(&mut s));
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: Some(sa("192.0.2.1:40000")),
            server_listen: None,
        }),
    );
    assert_eq!(
        to_client(&acts(&mut s)),
        "227 Entering Passive Mode (203,0,113,77,156,64).\r\n"
    );
}

#[test]
fn unsolicited_227_is_dropped_and_227_to_other_command_is_withheld() {
    let mut s = reverse(ServerMode::Same);
    s.server_bytes(b"227 Entering Passive Mode (10,0,0,3,195,80)\r\n");
    let a = drain(&mut s);
    assert_eq!(to_client(&a), "");
    assert!(!a.iter().any(|a| matches!(a, Action::Open(_))));
    s.client_bytes(b"NOOP\r\n");
    drain(&mut s);
    s.server_bytes(b"227 Entering Passive Mode (10,0,0,3,195,80)\r\n");
    let a = drain(&mut s);
    assert!(!to_client(&a).contains("195"), "{a:?}");
    assert!(!a.iter().any(|a| matches!(a, Action::Open(_))));
}

#[test]
fn local_replies_keep_command_order_when_pipelined() {
    let mut s = reverse(ServerMode::Same);
    s.client_bytes(b"NOOP\r\nLPSV\r\nSYST\r\n");
    let a = drain(&mut s);
    assert_eq!(to_server(&a), "NOOP\r\nSYST\r\n");
    assert_eq!(to_client(&a), "", "502 waits behind NOOP's reply");
    s.server_bytes(b"200 NOOP ok\r\n215 UNIX Type: L8\r\n");
    let out = to_client(&drain(&mut s));
    let order: Vec<&str> = out.lines().map(|l| &l[..3]).collect();
    assert_eq!(order, vec!["200", "502", "215"]);
}

#[test]
fn split_and_pipelined_commands_are_seen() {
    // PORT split at every byte, after a pipelined command.
    let mut s = reverse(ServerMode::Same);
    for b in b"TYPE I\r\nPORT 198,51,100,7,195,80\r\n" {
        s.client_bytes(&[*b]);
    }
    let a = drain(&mut s);
    assert_eq!(to_server(&a), "TYPE I\r\n");
    let plan = the_plan(&a);
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: None,
            server_listen: Some(sa("10.0.0.1:41000")),
        }),
    );
    assert_eq!(to_server(&acts(&mut s)), "PORT 10,0,0,1,160,40\r\n");
}

#[test]
fn multiline_replies_pass_and_feat_hides_auth_under_refuse() {
    let mut s = reverse(ServerMode::Same);
    s.client_bytes(b"FEAT\r\n");
    drain(&mut s);
    s.server_bytes(b"211-Features:\r\n EPSV\r\n AUTH TLS\r\n PBSZ\r\n211 End\r\n");
    assert_eq!(
        to_client(&drain(&mut s)),
        "211-Features:\r\n EPSV\r\n211 End\r\n"
    );
}

#[test]
fn multiline_227_is_scanned_whole() {
    let mut s = reverse(ServerMode::Same);
    s.client_bytes(b"PASV\r\n");
    drain(&mut s);
    s.server_bytes(b"227-Here it comes\r\n227 Entering Passive Mode (10,0,0,3,195,80)\r\n");
    let plan = the_plan(&drain(&mut s));
    assert_eq!(
        plan.server,
        Leg::Connect {
            target: sa("10.0.0.3:50000"),
            bind: ip("10.0.0.1")
        }
    );
}

#[test]
fn transfer_is_logged_with_bytes_when_both_reply_and_data_end_arrive() {
    let mut s = reverse(ServerMode::Same);
    let plan = passive_plan(&mut s);
    s.client_bytes(b"RETR dir/file.bin\r\n");
    assert_eq!(to_server(&acts(&mut s)), "RETR dir/file.bin\r\n");
    s.data_event(DataEvent::Connected { id: plan.id });
    s.server_bytes(b"150 Opening\r\n226 Transfer complete\r\n");
    let a = drain(&mut s);
    assert_eq!(to_client(&a), "150 Opening\r\n226 Transfer complete\r\n");
    assert!(
        !logs(&a).iter().any(|l| matches!(l, LogEvent::Transfer(_))),
        "waits for data end"
    );
    s.data_event(DataEvent::Closed {
        id: plan.id,
        to_client: 1048576,
        to_server: 0,
        outcome: DataOutcome::Completed,
    });
    let l = logs(&drain(&mut s));
    let t = l
        .iter()
        .find_map(|l| match l {
            LogEvent::Transfer(t) => Some(t.clone()),
            _ => None,
        })
        .expect("transfer logged");
    assert_eq!(t.command, "RETR");
    assert_eq!(t.path, "dir/file.bin");
    assert_eq!(t.direction, Direction::Download);
    assert_eq!(t.mode.as_label(), "passive/passive");
    assert_eq!(t.to_client, 1048576);
    assert_eq!(t.reply, 226);
    assert_eq!(t.result, "ok");
    assert_eq!(s.totals().transfers, 1);
}

#[test]
fn failed_transfer_releases_unused_pinhole() {
    let mut s = reverse(ServerMode::Same);
    let plan = passive_plan(&mut s);
    s.client_bytes(b"RETR missing\r\n");
    drain(&mut s);
    s.server_bytes(b"550 No such file\r\n");
    let a = drain(&mut s);
    assert!(a.contains(&Action::Close(plan.id)), "{a:?}");
    assert!(logs(&a)
        .iter()
        .any(|l| matches!(l, LogEvent::Transfer(t) if t.reply == 550)));
}

#[test]
fn open_failure_answers_425() {
    let mut s = reverse(ServerMode::Same);
    s.client_bytes(b"PASV\r\n");
    drain(&mut s);
    s.server_bytes(b"227 (10,0,0,3,195,80)\r\n");
    let plan = the_plan(&drain(&mut s));
    s.opened(plan.id, Err(OpenFailure::PoolExhausted("client")));
    let a = drain(&mut s);
    assert_eq!(
        to_client(&a),
        "425 Can't open data connection: no free port in client pool\r\n"
    );
    assert!(logs(&a).iter().any(|l| matches!(
        l,
        LogEvent::Refusal { what: Refused::Command(verb), code: 425, .. } if verb == "PASV"
    )));
    // And the session goes on.
    s.client_bytes(b"NOOP\r\n");
    assert_eq!(to_server(&acts(&mut s)), "NOOP\r\n");
}

#[test]
fn no_input_is_processed_while_an_open_is_in_flight() {
    let mut s = reverse(ServerMode::Same);
    s.client_bytes(b"PORT 198,51,100,7,195,80\r\nRETR f\r\n");
    let a = drain(&mut s);
    assert_eq!(to_server(&a), "", "RETR must not overtake our PORT");
    let plan = the_plan(&a);
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: None,
            server_listen: Some(sa("10.0.0.1:41000")),
        }),
    );
    assert_eq!(
        to_server(&acts(&mut s)),
        "PORT 10,0,0,1,160,40\r\nRETR f\r\n"
    );
}

#[test]
fn overlong_line_gets_500_and_ends() {
    let mut s = reverse(ServerMode::Same);
    s.client_bytes(&vec![b'A'; 1 << 20]);
    let a = drain(&mut s);
    assert!(to_client(&a).starts_with("500 "));
    assert!(a
        .iter()
        .any(|a| matches!(a, Action::End(EndReason::Framing(_)))));
}

#[test]
fn new_pasv_closes_the_unused_pinhole() {
    let mut s = reverse(ServerMode::Same);
    let plan = passive_plan(&mut s);
    s.client_bytes(b"PASV\r\n");
    let a = drain(&mut s);
    assert!(a.contains(&Action::Close(plan.id)));
}

#[test]
fn session_end_closes_every_plan() {
    let mut s = reverse(ServerMode::Same);
    s.client_bytes(b"PORT 198,51,100,7,195,80\r\n");
    let plan = the_plan(&drain(&mut s));
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: None,
            server_listen: Some(sa("10.0.0.1:41000")),
        }),
    );
    drain(&mut s);
    s.client_closed();
    let a = drain(&mut s);
    assert!(a.contains(&Action::Close(plan.id)));
    assert!(a.contains(&Action::End(EndReason::ClientClosed)));
}

#[test]
fn idle_timeout_says_421() {
    let mut s = reverse(ServerMode::Same);
    s.idle_timeout();
    let a = drain(&mut s);
    assert!(to_client(&a).starts_with("421 "));
    assert!(a.contains(&Action::End(EndReason::Idle)));
}

#[test]
fn tls_passthrough_stops_parsing() {
    let mut s = Session::new(SessionParams {
        client: sa(CLIENT),
        client_local: sa(GW_PUBLIC),
        server: sa(SERVER),
        server_local: sa(GW_INSIDE),
        transparent: false,
        announce: None,
        policy: Policy {
            tls: TlsPolicy::Passthrough,
            ..policy(ServerMode::Same)
        },
        tls: Default::default(),
    });
    s.server_bytes(b"220 hi\r\n");
    drain(&mut s);
    s.client_bytes(b"AUTH TLS\r\n");
    assert_eq!(to_server(&acts(&mut s)), "AUTH TLS\r\n");
    s.server_bytes(b"234 Proceed\r\n");
    let a = drain(&mut s);
    assert_eq!(to_client(&a), "234 Proceed\r\n");
    assert!(a.iter().any(|a| matches!(a, Action::Passthrough { .. })));
    assert!(logs(&a).contains(&LogEvent::TlsPassthrough));
    assert!(s.is_passthrough());
}

#[test]
fn abor_during_transfer_keeps_replies_matched() {
    let mut s = reverse(ServerMode::Same);
    let plan = passive_plan(&mut s);
    s.client_bytes(b"RETR big\r\n");
    s.data_event(DataEvent::Connected { id: plan.id });
    s.server_bytes(b"150 go\r\n");
    drain(&mut s);
    // Telnet IP + DM before ABOR, as RFC 959 §4.1.3 asks.
    s.client_bytes(b"\xff\xf4\xff\xf2ABOR\r\n");
    assert_eq!(
        to_server(&acts(&mut s)),
        "\u{fffd}\u{fffd}\u{fffd}\u{fffd}ABOR\r\n"
    );
    s.server_bytes(b"426 aborted\r\n226 ABOR ok\r\n");
    s.data_event(DataEvent::Closed {
        id: plan.id,
        to_client: 10,
        to_server: 0,
        outcome: DataOutcome::Completed,
    });
    let a = drain(&mut s);
    assert!(to_client(&a).contains("426 aborted\r\n226 ABOR ok\r\n"));
    assert!(logs(&a)
        .iter()
        .any(|l| matches!(l, LogEvent::Transfer(t) if t.reply == 426 && t.to_client == 10)));
}

#[test]
fn active_transfer_holds_226_until_the_plan_has_ended() {
    let mut s = reverse(ServerMode::Same);
    s.client_bytes(b"PORT 198,51,100,7,195,80\r\n");
    let plan = the_plan(&drain(&mut s));
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: None,
            server_listen: Some(sa("10.0.0.1:41000")),
        }),
    );
    drain(&mut s);
    s.server_bytes(b"200 PORT ok\r\n");
    drain(&mut s);
    s.client_bytes(b"LIST\r\n");
    drain(&mut s);
    // A fast server: the listing is sent and done before the gateway's
    // connection to the client exists.
    s.server_bytes(b"150 Here it comes\r\n226 Done\r\n");
    assert_eq!(to_client(&drain(&mut s)), "150 Here it comes\r\n");
    s.client_bytes(b"NOOP\r\n");
    assert_eq!(
        to_server(&drain(&mut s)),
        "",
        "input waits behind the held reply"
    );
    // Connected is not enough: the client may not have accepted yet.
    s.data_event(DataEvent::Connected { id: plan.id });
    let a = drain(&mut s);
    assert_eq!(to_client(&a), "", "226 waits for the data to be delivered");
    assert_eq!(to_server(&a), "");
    s.data_event(DataEvent::Closed {
        id: plan.id,
        to_client: 285,
        to_server: 0,
        outcome: DataOutcome::Completed,
    });
    let a = drain(&mut s);
    assert_eq!(to_client(&a), "226 Done\r\n");
    assert_eq!(to_server(&a), "NOOP\r\n");
    assert!(logs(&a)
        .iter()
        .any(|l| matches!(l, LogEvent::Transfer(t) if t.reply == 226 && t.to_client == 285)));
}

#[test]
fn multi_line_226_of_an_active_transfer_is_held_whole() {
    let mut s = reverse(ServerMode::Same);
    s.client_bytes(b"PORT 198,51,100,7,195,80\r\n");
    let plan = the_plan(&drain(&mut s));
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: None,
            server_listen: Some(sa("10.0.0.1:41000")),
        }),
    );
    drain(&mut s);
    s.server_bytes(b"200 PORT ok\r\n");
    s.client_bytes(b"LIST\r\n");
    drain(&mut s);
    // pure-ftpd's listing reply: its first line alone already makes a
    // client that is still waiting to accept give up.
    s.server_bytes(b"150 Connecting\r\n226-Options: -l\r\n226 4 matches total\r\n");
    assert_eq!(to_client(&drain(&mut s)), "150 Connecting\r\n");
    s.data_event(DataEvent::Connected { id: plan.id });
    assert_eq!(to_client(&drain(&mut s)), "");
    s.data_event(DataEvent::Closed {
        id: plan.id,
        to_client: 285,
        to_server: 0,
        outcome: DataOutcome::Completed,
    });
    assert_eq!(
        to_client(&drain(&mut s)),
        "226-Options: -l\r\n226 4 matches total\r\n"
    );
}

#[test]
fn held_226_is_released_when_the_plan_fails() {
    let mut s = reverse(ServerMode::Same);
    s.client_bytes(b"PORT 198,51,100,7,195,80\r\n");
    let plan = the_plan(&drain(&mut s));
    s.opened(
        plan.id,
        Ok(Opened {
            client_listen: None,
            server_listen: Some(sa("10.0.0.1:41000")),
        }),
    );
    drain(&mut s);
    s.server_bytes(b"200 PORT ok\r\n");
    s.client_bytes(b"RETR f\r\n");
    drain(&mut s);
    s.server_bytes(b"150 go\r\n226 Done\r\n");
    drain(&mut s);
    s.data_event(DataEvent::Closed {
        id: plan.id,
        to_client: 0,
        to_server: 0,
        outcome: DataOutcome::Failed(DataFailure::Connect {
            target: "192.0.2.7:2121".parse().unwrap(),
            error: "Connection refused (os error 111)".into(),
        }),
    });
    let a = drain(&mut s);
    assert_eq!(to_client(&a), "226 Done\r\n");
    assert!(logs(&a).iter().any(|l| matches!(l, LogEvent::Transfer(t)
            if t.result == "connect to 192.0.2.7:2121: Connection refused (os error 111)"
                && t.mode.as_label() == "active/active")));
}

#[test]
fn a_data_connection_from_the_wrong_peer_is_a_data_refusal() {
    let mut s = reverse(ServerMode::Same);
    drain(&mut s);
    s.data_event(DataEvent::Rejected {
        id: 1,
        from: sa("192.0.2.9:1234"),
        expected: sa(CLIENT).ip(),
    });
    let a = drain(&mut s);
    assert_eq!(to_client(&a), "", "the client is not told");
    let refusal = logs(&a)
        .into_iter()
        .find_map(|l| match l {
            LogEvent::Refusal { what, code, reason } => Some((what, code, reason)),
            _ => None,
        })
        .expect("refusal logged");
    assert_eq!(refusal.0, Refused::DataPeer);
    assert_eq!(refusal.0.what(), "DATA");
    assert_eq!(refusal.1, 0);
    assert_eq!(
        refusal.2,
        format!(
            "data connection from 192.0.2.9:1234 refused: expected {}",
            sa(CLIENT).ip()
        )
    );
}

/// A plan whose end is reported before its open result is refused with 425
/// in every shape, and nothing points the client or the server at it.
#[test]
fn a_plan_that_ended_before_its_open_result_is_never_announced() {
    let ended = |s: &mut Session, id| {
        s.data_event(DataEvent::Closed {
            id,
            to_client: 0,
            to_server: 0,
            outcome: DataOutcome::Expired,
        });
    };
    let refusal =
        "425 Can't open data connection: the data connection ended before it was announced\r\n";

    // PASV, same mode: no 227 for the dead plan's port.
    let mut s = reverse(ServerMode::Same);
    s.client_bytes(b"PASV\r\n");
    drain(&mut s);
    s.server_bytes(b"227 (10,0,0,3,195,80)\r\n");
    let plan = the_plan(&drain(&mut s));
    ended(&mut s, plan.id);
    let opened = Opened {
        client_listen: Some(sa("192.0.2.1:40000")),
        server_listen: None,
    };
    s.opened(plan.id, Ok(opened));
    assert_eq!(to_client(&drain(&mut s)), refusal);

    // PASV → PORT toward the server: no PORT upstream, no 227.
    let mut s = reverse(ServerMode::Active);
    s.client_bytes(b"PASV\r\n");
    let plan = the_plan(&drain(&mut s));
    ended(&mut s, plan.id);
    let opened = Opened {
        client_listen: Some(sa("192.0.2.1:40003")),
        server_listen: Some(sa("10.0.0.1:41003")),
    };
    s.opened(plan.id, Ok(opened));
    let a = drain(&mut s);
    assert_eq!(to_server(&a), "");
    assert_eq!(to_client(&a), refusal);

    // PORT → PASV toward the server: no 200 for the dead plan.
    let mut s = reverse(ServerMode::Passive);
    s.client_bytes(b"EPRT |1|198.51.100.7|50001|\r\n");
    assert_eq!(to_server(&acts(&mut s)), "PASV\r\n");
    s.server_bytes(b"227 Entering Passive Mode (10,0,0,3,195,81)\r\n");
    let plan = the_plan(&drain(&mut s));
    ended(&mut s, plan.id);
    let opened = Opened {
        client_listen: None,
        server_listen: None,
    };
    s.opened(plan.id, Ok(opened));
    assert_eq!(to_client(&drain(&mut s)), refusal);

    // And the session goes on.
    s.client_bytes(b"NOOP\r\n");
    assert_eq!(to_server(&acts(&mut s)), "NOOP\r\n");
}
