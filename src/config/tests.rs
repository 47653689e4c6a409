use super::check::reaches;
use super::print::format_duration;
use super::types::ListenerKind;
use super::values::*;
use super::*;
use ipnet::IpNet;
use proptest::prelude::*;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

const HEAD: &str = "listeners:\n  - name: lo\n    listen: 127.0.0.1:2121\n    mode: reverse\n    upstream: 127.0.0.1:21\n";

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(text, Path::new("t.yaml"))
}

fn ok(text: &str) -> Config {
    match parse(text) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}\n--- in:\n{text}"),
    }
}

/// Each error as `line:column: message`.
fn errors(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(ConfigErrors(errs)) => errs
            .iter()
            .map(|e| format!("{}:{}: {}", e.line, e.column, e.message))
            .collect(),
    }
}

#[test]
fn minimal_file_gets_every_default() {
    let c = ok(&format!("{HEAD}rules:\n  - name: all\n"));
    assert_eq!(c.path, Path::new("t.yaml"));
    assert_eq!(
        c.listeners,
        vec![Listener {
            name: "lo".into(),
            listen: "127.0.0.1:2121".parse().unwrap(),
            mode: ListenerMode::Reverse {
                upstream: "127.0.0.1:21".parse().unwrap(),
                announce: None
            },
            proxy_protocol: None,
            upstream_proxy_protocol: None,
            tls: None,
            upstream_tls: None,
        }]
    );
    assert_eq!(c.data, DataConfig::default());
    assert_eq!(
        c.data.client_ports,
        PortRange {
            lo: 40000,
            hi: 40999
        }
    );
    assert_eq!(
        c.data.server_ports,
        PortRange {
            lo: 41000,
            hi: 41999
        }
    );
    assert_eq!(c.data.pinhole_timeout, Duration::from_secs(30));
    assert_eq!(c.data.nftables_table, "ftpgate");
    assert_eq!(c.data.backend, BackendKind::Relay);
    assert_eq!(c.limits, Limits::default());
    assert_eq!(c.limits.max_sessions, 10_000);
    assert_eq!(c.limits.max_sessions_per_client, 64);
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(900));
    assert_eq!(c.limits.connect_timeout, Duration::from_secs(10));
    assert_eq!(c.rules, vec![Rule::new("all")]);
    let r = &c.rules[0];
    assert_eq!(
        r.clients,
        vec![
            "0.0.0.0/0".parse::<IpNet>().unwrap(),
            "::/0".parse().unwrap()
        ]
    );
    assert_eq!(r.servers, r.clients);
    assert_eq!(r.action, Action::Allow);
    assert_eq!(r.modes, vec![DataMode::Passive, DataMode::Active]);
    assert_eq!(r.server_mode, ServerMode::Same);
    assert_eq!(
        r.data_ports,
        PortRange {
            lo: 1024,
            hi: 65535
        }
    );
    assert_eq!(r.tls, TlsPolicy::Refuse);
    assert!(r.deny_commands.is_empty());
}

#[test]
fn design_example_parses() {
    let c = ok(r#"
listeners:
  - name: lan-out
    listen: 10.0.0.1:8021
    mode: transparent
  - name: public-ftp
    listen: 192.0.2.1:21
    mode: reverse
    upstream: 10.0.0.3:21
    announce: 192.0.2.1
data:
  backend: nftables
  client_ports: 40000-40999
  server_ports: 41000-41999
  pinhole_timeout: 500ms
  nftables_table: ftp_gate-1
  conntrack_mark: 0x100
limits:
  max_sessions: 100
  max_sessions_per_client: 100
  idle_timeout: 1h
  connect_timeout: 2m
rules:
  - name: lan clients
    clients: [10.0.0.0/24]
    servers: [0.0.0.0/0, "::/0"]
    action: allow
    modes: [active]
    server_mode: passive
    data_ports: 2121
    tls: passthrough
    deny_commands: [SITE, stor]
  - name: everyone else
    action: deny
"#);
    assert_eq!(c.listeners[0].mode, ListenerMode::Transparent);
    assert_eq!(
        c.listeners[1].mode,
        ListenerMode::Reverse {
            upstream: "10.0.0.3:21".parse().unwrap(),
            announce: Some("192.0.2.1".parse().unwrap()),
        }
    );
    assert_eq!(c.data.backend, BackendKind::Nftables);
    assert_eq!(c.data.pinhole_timeout, Duration::from_millis(500));
    assert_eq!(c.data.nftables_table, "ftp_gate-1");
    assert_eq!(c.data.conntrack_mark, 0x100);
    assert_eq!(c.limits.max_sessions, 100);
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(3600));
    assert_eq!(c.limits.connect_timeout, Duration::from_secs(120));
    let r = &c.rules[0];
    assert_eq!(r.clients, vec!["10.0.0.0/24".parse::<IpNet>().unwrap()]);
    assert_eq!(r.modes, vec![DataMode::Active]);
    assert_eq!(r.server_mode, ServerMode::Passive);
    assert_eq!(r.data_ports, PortRange { lo: 2121, hi: 2121 });
    assert_eq!(r.tls, TlsPolicy::Passthrough);
    assert_eq!(r.deny_commands, vec!["SITE", "STOR"]);
    assert_eq!(c.rules[1].action, Action::Deny);
}

/// Input text, and the value or a part of the error message.
type Case<T> = (&'static str, Result<T, &'static str>);

#[test]
fn durations() {
    let cases: &[Case<u64>] = &[
        ("500ms", Ok(500)),
        ("30s", Ok(30_000)),
        ("15m", Ok(900_000)),
        ("1h", Ok(3_600_000)),
        (" 2 s", Ok(2_000)),
        ("30", Err("has no unit; write e.g. 30s")),
        ("0s", Err("is zero")),
        ("0ms", Err("is zero")),
        ("1d", Err("unknown unit")),
        ("1.5s", Err("unknown unit")),
        ("1h30m", Err("unknown unit")),
        ("-1s", Err("is not a duration")),
        ("s", Err("is not a duration")),
        ("", Err("is not a duration")),
        ("99999999999999999999h", Err("too long")),
        ("18446744073709551615h", Err("too long")),
    ];
    for (text, want) in cases {
        match (parse_duration(text), want) {
            (Ok(d), Ok(ms)) => assert_eq!(d, Duration::from_millis(*ms), "{text:?}"),
            (Err(e), Err(w)) => assert!(e.contains(w), "{text:?}: {e}"),
            (got, _) => panic!("{text:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn durations_print_in_the_largest_exact_unit() {
    let cases = [
        (Duration::from_millis(500), "500ms"),
        (Duration::from_millis(1500), "1500ms"),
        (Duration::from_secs(30), "30s"),
        (Duration::from_secs(90), "90s"),
        (Duration::from_secs(900), "15m"),
        (Duration::from_secs(7200), "2h"),
        (Duration::from_micros(1), "1ms"),
    ];
    for (d, want) in cases {
        assert_eq!(format_duration(d), want);
        assert_eq!(
            parse_duration(want).ok(),
            Some(d.max(Duration::from_millis(1)))
        );
    }
}

#[test]
fn ranges() {
    let cases: &[Case<(u16, u16)>] = &[
        ("40000-40999", Ok((40000, 40999))),
        ("21", Ok((21, 21))),
        ("1-65535", Ok((1, 65535))),
        ("100 - 200", Ok((100, 200))),
        ("7-7", Ok((7, 7))),
        ("0-100", Err("port 0")),
        ("0", Err("port 0")),
        ("200-100", Err("is reversed; write 100-200")),
        ("1-65536", Err("above 65535")),
        ("1-", Err("not a port range")),
        ("-5", Err("not a port range")),
        ("a-b", Err("not a port range")),
        ("1-2-3", Err("not a port range")),
        ("", Err("not a port range")),
    ];
    for (text, want) in cases {
        match (parse_range(text), want) {
            (Ok(r), Ok((lo, hi))) => assert_eq!((r.lo, r.hi), (*lo, *hi), "{text:?}"),
            (Err(e), Err(w)) => assert!(e.contains(w), "{text:?}: {e}"),
            (got, _) => panic!("{text:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn addresses_and_networks() {
    let sockets: &[(&str, bool, Result<&str, &str>)] = &[
        ("192.0.2.1:21", false, Ok("192.0.2.1:21")),
        ("[2001:db8::1]:21", false, Ok("[2001:db8::1]:21")),
        ("127.0.0.1:0", true, Ok("127.0.0.1:0")),
        ("0.0.0.0:21", true, Ok("0.0.0.0:21")),
        ("127.0.0.1:0", false, Err("port 0")),
        ("0.0.0.0:21", false, Err("not a concrete address")),
        ("192.0.2.1", false, Err("no port; write e.g. 192.0.2.1:21")),
        (
            "2001:db8::1",
            false,
            Err("no port; write e.g. [2001:db8::1]:21"),
        ),
        (
            "2001:db8::1:21",
            true,
            Err("no port; write e.g. [2001:db8::1:21]:21"),
        ),
        ("2001:db8::1:x", true, Err("needs brackets")),
        (
            "ftp.example.com:21",
            false,
            Err("host names are not resolved"),
        ),
        ("192.0.2.1:65536", false, Err("not address:port")),
    ];
    for (text, port0, want) in sockets {
        match (parse_socket_addr(text, *port0), want) {
            (Ok(a), Ok(w)) => assert_eq!(a.to_string(), *w),
            (Err(e), Err(w)) => assert!(e.contains(w), "{text:?}: {e}"),
            (got, _) => panic!("{text:?}: got {got:?}, want {want:?}"),
        }
    }
    let nets: &[(&str, Option<&str>)] = &[
        ("10.0.0.0/8", Some("10.0.0.0/8")),
        ("10.0.0.5", Some("10.0.0.5/32")),
        ("2001:db8::/32", Some("2001:db8::/32")),
        ("::1", Some("::1/128")),
        ("::ffff:10.0.0.0/104", Some("10.0.0.0/8")),
        ("::ffff:0:0/96", Some("0.0.0.0/0")),
        ("::/0", Some("::/0")),
        ("10.0.0.0/33", None),
        ("10.0.0/8", None),
        ("any", None),
        ("", None),
    ];
    for (text, want) in nets {
        let got = parse_cidr(text).ok().map(|n| n.to_string());
        assert_eq!(got.as_deref(), *want, "{text:?}");
    }
    assert!(parse_announce("0.0.0.0").is_err());
    assert!(parse_announce("192.0.2.1:21").is_err());
    assert_eq!(
        parse_announce("2001:db8::1").ok(),
        "2001:db8::1".parse().ok()
    );
}

#[test]
fn names_tables_verbs_counts() {
    assert!(parse_name("lan clients").is_ok());
    assert!(parse_name("ünïcode ok").is_ok());
    assert!(parse_name("  ").is_err());
    assert!(parse_name("two\nlines").is_err());
    assert_eq!(parse_table("ftpgate").ok().as_deref(), Some("ftpgate"));
    assert!(parse_table("ftp_gate-2").is_ok());
    assert!(parse_table(&"a".repeat(64)).is_ok());
    assert!(parse_table(&"a".repeat(65)).is_err());
    assert!(parse_table("").is_err());
    assert!(parse_table("ftp gate").is_err());
    assert!(parse_table("ftp;flush").is_err());
    assert_eq!(parse_verb("site").ok().as_deref(), Some("SITE"));
    assert!(parse_verb(&"A".repeat(16)).is_ok());
    assert!(parse_verb(&"A".repeat(17)).is_err());
    assert!(parse_verb("").is_err());
    assert!(parse_verb("SITE CHMOD").is_err());
    assert!(parse_verb("X1").is_err());
    assert_eq!(parse_count("1"), Ok(1));
    assert!(parse_count("0").is_err());
    assert!(parse_count("-1").is_err());
    assert!(parse_count("1.5").is_err());
}

/// Runs every case before failing, so one run shows every mismatch.
fn check_table(cases: &[(String, &str)]) {
    let mut wrong = Vec::new();
    for (text, want) in cases {
        let got = errors(text);
        if got != vec![want.to_string()] {
            wrong.push(format!("in:\n{text}\n got: {got:?}\nwant: {want:?}\n"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// One semantic mistake per file; the position is the offending value.
#[test]
fn each_semantic_error_is_located_at_its_value() {
    let rules = "rules:\n  - name: all\n";
    let cases: Vec<(String, &str)> = vec![
            (
                format!("{HEAD}{rules}data:\n  client_ports: 100-50\n"),
                "9:17: client_ports: `100-50` is reversed; write 50-100",
            ),
            (
                format!("{HEAD}{rules}data:\n  server_ports: 0-10\n"),
                "9:17: server_ports: `0-10`: port 0 is not a usable port",
            ),
            (
                format!("{HEAD}{rules}data:\n  client_ports: 41500-42000\n"),
                "9:17: client_ports 41500-42000 and server_ports 41000-41999 overlap; the two pools must be disjoint",
            ),
            (
                format!("{HEAD}{rules}metrics:\n  listen: 127.0.0.1\n"),
                "9:11: listen: `127.0.0.1` has no port; write e.g. 127.0.0.1:21",
            ),
            (
                format!("{HEAD}{rules}metrics:\n  listen:\n"),
                "9:10: `listen` has no value: give one, or remove the key",
            ),
            (
                format!("{HEAD}{rules}audit:\n  path: \" \"\n"),
                "9:9: path: the path is blank",
            ),
            (
                format!("{HEAD}{rules}data:\n  backend: ebpf\n"),
                "9:12: backend: unknown value `ebpf`, expected one of: relay, nftables",
            ),
            (
                format!("{HEAD}{rules}data:\n  pinhole_timeout: 30\n"),
                "9:20: pinhole_timeout: `30` has no unit; write e.g. 30s (a number and a unit: 500ms, 30s, 15m or 1h)",
            ),
            (
                format!("{HEAD}{rules}data:\n  nftables_table: \"my table\"\n"),
                "9:19: nftables_table: `my table` is not 1-64 characters of A-Z, a-z, 0-9, `_` and `-`",
            ),
            (
                format!("{HEAD}{rules}data:\n  conntrack_mark: 0\n"),
                "9:19: conntrack_mark: `0` is not a non-zero 32-bit mark (write e.g. 0x10000000)",
            ),
            (
                format!("{HEAD}{rules}limits:\n  max_sessions: 10\n  max_sessions_per_client: 11\n"),
                "10:28: max_sessions_per_client 11 is above max_sessions 10",
            ),
            (
                format!("{HEAD}{rules}limits:\n  max_sessions: 10\n"),
                "9:17: max_sessions 10 is below max_sessions_per_client (64, the default); set that too",
            ),
            (
                format!("{HEAD}{rules}limits:\n  idle_timeout: 0s\n"),
                "9:17: idle_timeout: `0s` is zero; a timeout must be longer than that",
            ),
            (
                format!("{HEAD}{rules}limits:\n  connect_timeout: 0ms\n"),
                "9:20: connect_timeout: `0ms` is zero; a timeout must be longer than that",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    clients: [10.0.0.0/8, 10.0.0.0/33]\n"),
                "8:27: clients: `10.0.0.0/33` is not a CIDR such as 10.0.0.0/24 or 2001:db8::/32, nor an address",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    servers:\n      - 192.0.2.0/24\n      - nowhere\n"),
                "10:9: servers: `nowhere` is not a CIDR such as 10.0.0.0/24 or 2001:db8::/32, nor an address",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    modes: []\n"),
                "8:12: `modes` is an empty list; remove the key for the default",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    modes: [passive, epsv]\n"),
                "8:22: modes: unknown value `epsv`, expected one of: passive, active",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    modes: [active, active]\n"),
                "8:12: modes: list each of passive and active at most once",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    action: reject\n"),
                "8:13: action: unknown value `reject`, expected one of: allow, deny",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    tls: allow\n"),
                "8:10: tls: unknown value `allow`, expected one of: refuse, passthrough, terminate",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    server_mode: epsv\n"),
                "8:18: server_mode: unknown value `epsv`, expected one of: same, passive, active",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    data_ports: 1024-\n"),
                "8:17: data_ports: `1024-` is not a port range such as 40000-40999, or a single port",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    deny_commands: [SITE, \"SITE EXEC\"]\n"),
                "8:27: deny_commands: `SITE EXEC` is not an FTP command (1-16 letters, e.g. SITE)",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    deny_commands: [SITE, site]\n"),
                "8:27: deny_commands: `SITE` is listed twice",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n  - name: all\n"),
                "8:11: rule name `all` is already used by rule 1",
            ),
            (format!("{HEAD}rules: []\n"), "6:8: `rules` is empty: with no rule every session is refused"),
            (HEAD.to_string(), "1:1: missing `rules`: with no rule every session is refused"),
            (
                "listeners: []\nrules:\n  - name: all\n".to_string(),
                "1:12: `listeners` is empty: at least one listener is required",
            ),
            (
                rules.to_string(),
                "1:1: missing `listeners`: at least one listener is required",
            ),
            (
                "listeners:\n  - name: a\n    listen: 127.0.0.1:21\n    mode: reverse\nrules:\n  - name: all\n".to_string(),
                "4:11: a reverse listener needs `upstream`, the FTP server's address:port",
            ),
            (
                "listeners:\n  - name: a\n    listen: 127.0.0.1:21\n    mode: transparent\n    upstream: 10.0.0.1:21\nrules:\n  - name: all\n".to_string(),
                "5:15: a transparent listener takes no `upstream`: its server is the original destination of each intercepted connection",
            ),
            (
                "listeners:\n  - name: a\n    listen: 127.0.0.1:21\n    mode: transparent\n    announce: 192.0.2.1\nrules:\n  - name: all\n".to_string(),
                "5:15: `announce` applies to reverse listeners only: a transparent listener announces the server's own address",
            ),
            (
                "listeners:\n  - name: a\n    listen: 127.0.0.1:21\n    mode: bridge\nrules:\n  - name: all\n".to_string(),
                "4:11: mode: unknown value `bridge`, expected one of: reverse, transparent",
            ),
            (
                "listeners:\n  - name: a\n    listen: 127.0.0.1\n    mode: transparent\nrules:\n  - name: all\n".to_string(),
                "3:13: listen: `127.0.0.1` has no port; write e.g. 127.0.0.1:21",
            ),
            (
                "listeners:\n  - listen: 127.0.0.1:21\n    mode: transparent\nrules:\n  - name: all\n".to_string(),
                "2:5: missing `name`: a listener needs a name for logs",
            ),
            (
                "listeners:\n  - name: a\n    mode: transparent\nrules:\n  - name: all\n".to_string(),
                "2:5: missing `listen`: the address to bind, e.g. 0.0.0.0:21",
            ),
            (
                format!("{HEAD}  - name: lo\n    listen: 127.0.0.1:2122\n    mode: transparent\n{rules}"),
                "6:11: listener name `lo` is already used by listener 1",
            ),
            (
                format!("{HEAD}  - name: lo2\n    listen: 127.0.0.1:2121\n    mode: transparent\n{rules}"),
                "7:13: 127.0.0.1:2121 is already the address of listener `lo`",
            ),
            (
                "listeners:\n  - name: a\n    listen: 127.0.0.1:21\n    mode: reverse\n    upstream: 10.0.0.1:0\nrules:\n  - name: all\n".to_string(),
                "5:15: upstream: `10.0.0.1:0` has port 0",
            ),
            (
                "listeners:\n  - name: a\n    listen: 127.0.0.1:21\n    mode: reverse\n    upstream: 10.0.0.1:21\n    announce: 0.0.0.0\nrules:\n  - name: all\n".to_string(),
                "6:15: announce: `0.0.0.0` cannot be announced to clients",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    clients:\n"),
                "8:13: `clients` has no value: give one, or remove the key",
            ),
            (
                format!("{HEAD}rules:\n  - name: \"\"\n"),
                "7:11: name: the name is blank",
            ),
        ];
    check_table(&cases);
}

#[test]
fn pools_and_shares_are_checked_where_written() {
    let rules = "rules:\n  - name: all\n";
    let cases: Vec<(String, &str)> = vec![
            (
                format!("{HEAD}{rules}data:\n  client_ports: 21-40000\n  server_ports: 41000-41999\n"),
                "9:17: client_ports: `21-40000` includes ports below 1024; pools must be within 1024-65535",
            ),
            (
                format!("{HEAD}{rules}data:\n  server_ports: 1000-1023\n"),
                "9:17: server_ports: `1000-1023` includes ports below 1024; pools must be within 1024-65535",
            ),
            (
                format!("{HEAD}{rules}data:\n  max_ports_per_client: 0\n"),
                "9:25: max_ports_per_client: `0` would refuse every data connection; write a number of ports such as 16, or a percentage of each pool such as 25%",
            ),
            (
                format!("{HEAD}{rules}data:\n  max_ports_per_client: 0%\n"),
                "9:25: max_ports_per_client: `0%` is not a percentage from 1% to 100%",
            ),
            (
                format!("{HEAD}{rules}data:\n  max_ports_per_client: 101%\n"),
                "9:25: max_ports_per_client: `101%` is not a percentage from 1% to 100%",
            ),
            (
                format!("{HEAD}{rules}data:\n  max_ports_per_client: half\n"),
                "9:25: max_ports_per_client: `half` is not a number of ports such as 16, or a percentage of each pool such as 25%",
            ),
        ];
    for (text, want) in cases {
        assert_eq!(errors(&text), vec![want.to_string()], "in:\n{text}");
    }
    // 1024 itself is a usable pool port.
    let c = ok(&format!(
            "{HEAD}{rules}data:\n  client_ports: 1024-1100\n  server_ports: 2000-2009\n  max_ports_per_client: 16\n"
        ));
    assert_eq!(c.data.client_ports, PortRange { lo: 1024, hi: 1100 });
    assert_eq!(c.data.max_ports_per_client, PortShare::Ports(16));
}

#[test]
fn port_share_of_a_pool() {
    let cases = [
        (PortShare::Percent(25), 40, 10),
        (PortShare::Percent(25), 1000, 250),
        (PortShare::Percent(25), 41, 11), // rounds up
        (PortShare::Percent(1), 40, 2),   // at least two
        (PortShare::Percent(25), 2, 2),
        (PortShare::Percent(25), 1, 1), // never more than the pool
        (PortShare::Percent(100), 40, 40),
        (PortShare::Ports(16), 40, 16),
        (PortShare::Ports(16), 4, 4),
        (PortShare::Ports(1), 40, 1),
    ];
    for (share, len, want) in cases {
        assert_eq!(share.of(len), want, "{share} of {len}");
    }
    assert_eq!(
        DataConfig::default().max_ports_per_client,
        PortShare::Percent(25)
    );
}

#[test]
fn check_prints_the_share_and_what_it_comes_to() {
    let c = ok(&format!(
            "{HEAD}rules:\n  - name: all\ndata:\n  client_ports: 40000-40039\n  server_ports: 41000-41999\n"
        ));
    let yaml = c.to_yaml();
    assert!(
            yaml.contains("  max_ports_per_client: 25% # per client address: 10 of 40 client ports, 250 of 1000 server ports\n"),
            "{yaml}"
        );
    assert_eq!(parse(&yaml), Ok(c));
}

#[test]
fn an_upstream_that_is_a_listener_is_a_loop() {
    let rules = "rules:\n  - name: all\n";
    let lst = |name: &str, listen: &str, upstream: &str| {
        format!(
            "  - name: {name}\n    listen: {listen}\n    mode: reverse\n    upstream: {upstream}\n"
        )
    };
    let cases: Vec<(String, &str)> = vec![
            (
                format!("listeners:\n{}{rules}", lst("a", "127.0.0.1:2121", "127.0.0.1:2121")),
                "5:15: upstream 127.0.0.1:2121 is the gateway's own listener `a` (127.0.0.1:2121): every session would connect back to the gateway (a loop)",
            ),
            (
                format!(
                    "listeners:\n{}{}{rules}",
                    lst("a", "192.0.2.1:21", "10.0.0.3:21"),
                    lst("b", "192.0.2.1:2121", "192.0.2.1:21")
                ),
                "9:15: upstream 192.0.2.1:21 is the gateway's own listener `a` (192.0.2.1:21): every session would connect back to the gateway (a loop)",
            ),
            (
                format!("listeners:\n{}{rules}", lst("any", "0.0.0.0:21", "127.0.0.5:21")),
                "5:15: upstream 127.0.0.5:21 is the gateway's own listener `any` (0.0.0.0:21): every session would connect back to the gateway (a loop)",
            ),
            (
                format!("listeners:\n{}{rules}", lst("v6", "\"[::]:21\"", "\"[::1]:21\"")),
                "5:15: upstream [::1]:21 is the gateway's own listener `v6` ([::]:21): every session would connect back to the gateway (a loop)",
            ),
            (
                format!("listeners:\n{}{rules}", lst("m", "127.0.0.1:21", "\"[::ffff:127.0.0.1]:21\"")),
                "5:15: upstream [::ffff:127.0.0.1]:21 is the gateway's own listener `m` (127.0.0.1:21): every session would connect back to the gateway (a loop)",
            ),
        ];
    for (text, want) in cases {
        assert_eq!(errors(&text), vec![want.to_string()], "in:\n{text}");
    }
    // Not loops: another host on the same port, another port, and a
    // v6-only listener that an IPv4 loopback upstream cannot reach.
    for (listen, upstream) in [
        ("0.0.0.0:21", "10.0.0.3:21"),
        ("127.0.0.1:2121", "127.0.0.1:21"),
        ("\"[::]:21\"", "127.0.0.1:21"),
        ("127.0.0.1:21", "127.0.0.2:21"),
    ] {
        ok(&format!(
            "listeners:\n{}{rules}",
            lst("x", listen, upstream)
        ));
    }
}

#[test]
fn every_semantic_error_is_reported_in_file_order() {
    let text = "\
listeners:
  - name: a
    listen: 127.0.0.1
    mode: reverse
data:
  client_ports: 9-1
  pinhole_timeout: 30
limits:
  max_sessions: 0
rules:
  - name: one
    clients: [10.0.0.0/33, 10.1.0.0/16, bogus]
    tls: maybe
";
    assert_eq!(
            errors(text),
            vec![
                "3:13: listen: `127.0.0.1` has no port; write e.g. 127.0.0.1:21",
                "4:11: a reverse listener needs `upstream`, the FTP server's address:port",
                "6:17: client_ports: `9-1` is reversed; write 1-9",
                "7:20: pinhole_timeout: `30` has no unit; write e.g. 30s (a number and a unit: 500ms, 30s, 15m or 1h)",
                "9:17: max_sessions: 0 would refuse every session; the least is 1",
                "12:15: clients: `10.0.0.0/33` is not a CIDR such as 10.0.0.0/24 or 2001:db8::/32, nor an address",
                "12:41: clients: `bogus` is not a CIDR such as 10.0.0.0/24 or 2001:db8::/32, nor an address",
                "13:10: tls: unknown value `maybe`, expected one of: refuse, passthrough, terminate",
            ]
        );
}

/// Syntax and shape errors stop at the first, located by the YAML parser.
#[test]
fn structural_errors_are_located() {
    let cases: Vec<(String, &str)> = vec![
            (
                format!("{HEAD}    lisen: 1.2.3.4:21\nrules:\n  - name: all\n"),
                "6:5: listeners[0]: unknown field `lisen`, expected one of `name`, `listen`, `mode`, `upstream`, `announce`, `proxy_protocol`, `upstream_proxy_protocol`, `tls`, `upstream_tls`",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    client: [10.0.0.0/8]\n"),
                "8:5: rules[0]: unknown field `client`, expected one of `name`, `clients`, `servers`, `action`, `modes`, `server_mode`, `data_ports`, `tls`, `deny_commands`, `require_tls`, `require_prot_p`",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    clients: 10.0.0.0/8\n"),
                "8:14: rules[0].clients: invalid type: string \"10.0.0.0/8\", expected a sequence",
            ),
            (
                format!("{HEAD}rules:\n  - name: [a, b]\n"),
                "7:11: rules[0].name: invalid type: sequence, expected a single value (text or number)",
            ),
            (
                format!("{HEAD}rules:\n  name: all\n"),
                "7:3: rules: invalid type: map, expected a sequence",
            ),
            (format!("{HEAD}rules: [\n"), "7:1: did not find expected node content, while parsing a flow node"),
            (
                format!("{HEAD}  bad indent: 1\n"),
                "6:3: did not find expected '-' indicator, while parsing a block collection at line 2 column 3",
            ),
            (
                format!("{HEAD}rules:\n  - name: all\n    servers: [0.0.0.0/0, ::/0]\n"),
                "8:26: did not find expected node content, while parsing a flow node; inside [ ], quote IPv6 addresses that start with `::`, e.g. \"::/0\"",
            ),
            ("- 1\n".to_string(), "1:1: invalid type: sequence, expected a mapping with `listeners`, `data`, `limits` and `rules`"),
            ("".to_string(), "1:1: the file is empty: a rule file needs `listeners` and `rules`"),
            ("# nothing\n".to_string(), "1:1: the file is empty: a rule file needs `listeners` and `rules`"),
            (
                format!("{HEAD}rules:\n  - name: a\n  - name: *nowhere\n"),
                "8:11: unknown anchor",
            ),
        ];
    check_table(&cases);
}

#[test]
fn alias_bomb_is_refused_without_panic() {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        text.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    text.push_str(HEAD);
    text.push_str("rules:\n  - name: *a11\n");
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    // Either limit is a clean refusal: the unknown key or the expansion.
    assert!(
        errs[0].contains("unknown field `a0`") || errs[0].contains("repetition limit"),
        "{errs:?}"
    );
    let bomb_in_value = text
        .replace("a0: &a0", "listeners: &a0")
        .replacen(HEAD, "", 1);
    let errs = errors(&bomb_in_value);
    assert_eq!(errs.len(), 1, "{errs:?}");
}

#[test]
fn aliases_and_deep_nesting_do_not_panic() {
    // A well-formed alias is fine, and errors inside it are located.
    let c = ok(&format!(
            "{HEAD}rules:\n  - name: a\n    clients: &lan [10.0.0.0/8]\n  - name: b\n    servers: *lan\n"
        ));
    assert_eq!(
        c.rules[1].servers,
        vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
    );
    let errs = errors(&format!(
            "{HEAD}rules:\n  - name: a\n    clients: &lan [10.0.0.0/99]\n  - name: b\n    servers: *lan\n"
        ));
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs.iter().all(|e| e.starts_with("8:20: ")), "{errs:?}");
    let deep = format!(
        "{HEAD}rules:\n  - name: {}{}\n",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert_eq!(errors(&deep).len(), 1);
}

#[test]
fn oversized_text_is_refused() {
    let mut text = format!("{HEAD}rules:\n  - name: all\n");
    text.push_str(&"#".repeat(MAX_FILE_BYTES));
    let errs = errors(&text);
    assert_eq!(errs, vec![format!("0:0: {}", too_large())]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.yaml");
    std::fs::write(&path, &text).unwrap();
    let e = Config::load(&path).unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert!(e.0[0].message.contains("larger than 1024 KiB"), "{e}");
}

#[test]
fn load_reports_unreadable_and_non_utf8_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    let e = Config::load(&missing).unwrap_err();
    assert_eq!((e.0[0].line, e.0[0].column), (0, 0));
    assert!(
        e.to_string()
            .starts_with(&format!("{}:0:0: cannot open", missing.display())),
        "{e}"
    );
    let bad = dir.path().join("latin1.yaml");
    std::fs::write(&bad, b"listeners:\n  - name: caf\xe9\n").unwrap();
    let e = Config::load(&bad).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}:2:14: the file is not valid UTF-8", bad.display())
    );
}

#[test]
fn many_errors_are_capped() {
    let mut text = format!("{HEAD}rules:\n  - name: all\n    clients:\n");
    for _ in 0..MAX_LOCATED_ERRORS + 5 {
        text.push_str("      - nope\n");
    }
    let errs = errors(&text);
    assert_eq!(errs.len(), MAX_LOCATED_ERRORS + 1);
    assert_eq!(
        errs.last().map(String::as_str),
        Some("0:0: 5 more errors not shown")
    );
    assert!(errs[0].starts_with("9:9: "), "{errs:?}");
}

#[test]
fn metrics_and_audit_sections() {
    let c = ok(&format!("{HEAD}rules:\n  - name: all\n"));
    assert_eq!((c.metrics, c.audit), (None, None));
    let c = ok(&format!(
        "{HEAD}rules:\n  - name: all\nmetrics:\n  listen: \"[::1]:9121\"\naudit:\n  path: \"-\"\n"
    ));
    assert_eq!(
        c.metrics,
        Some(MetricsConfig {
            listen: "[::1]:9121".parse().unwrap()
        })
    );
    assert_eq!(
        c.audit,
        Some(AuditConfig {
            path: AuditTarget::Stdout
        })
    );
    let yaml = c.to_yaml();
    assert!(
        yaml.contains("listen: '[::1]:9121'") || yaml.contains("listen: \"[::1]:9121\""),
        "{yaml}"
    );
    assert_eq!(parse(&yaml), Ok(c));
    let c = ok(&format!(
        "{HEAD}rules:\n  - name: all\naudit:\n  path: /var/log/ftpgate/audit.jsonl\n"
    ));
    assert_eq!(
        c.audit.map(|a| a.path),
        Some(AuditTarget::File(PathBuf::from(
            "/var/log/ftpgate/audit.jsonl"
        )))
    );
    let errs = errors(&format!(
        "{HEAD}rules:\n  - name: all\naudit: {{}}\nmetrics:\n  port: 1\n"
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("10:3: metrics: unknown field `port`, expected `listen`"),
        "{errs:?}"
    );
    let errs = errors(&format!("{HEAD}rules:\n  - name: all\naudit: {{}}\n"));
    assert_eq!(
        errs,
        vec!["8:8: missing `path`: a file to append to, or \"-\" for standard output".to_string()]
    );
}

#[test]
fn to_yaml_prints_defaults_and_round_trips() {
    let c = ok(&format!("{HEAD}rules:\n  - name: all\n"));
    let yaml = c.to_yaml();
    for key in [
        "backend: relay",
        "client_ports: 40000-40999",
        "server_ports: 41000-41999",
        "pinhole_timeout: 30s",
        "nftables_table: ftpgate",
        "conntrack_mark: '0x10000000'",
        "max_sessions: 10000",
        "max_sessions_per_client: 64",
        "idle_timeout: 15m",
        "connect_timeout: 10s",
        "action: allow",
        "server_mode: same",
        "data_ports: 1024-65535",
        "tls: refuse",
        "deny_commands: []",
    ] {
        assert!(yaml.contains(key), "missing {key:?} in:\n{yaml}");
    }
    assert_eq!(parse(&yaml), Ok(c));
}

fn arb_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
    ]
}

fn arb_net() -> impl Strategy<Value = IpNet> {
    (arb_ip(), any::<u8>()).prop_map(|(ip, p)| {
        let max = if ip.is_ipv4() { 33 } else { 129 };
        let net = IpNet::new(ip, p % max).unwrap_or(IpNet::from(ip));
        // The loader turns IPv4-mapped networks into IPv4 ones.
        unmap_net(net)
    })
}

fn arb_range() -> impl Strategy<Value = PortRange> {
    (1u16.., 1u16..).prop_map(|(a, b)| PortRange {
        lo: a.min(b),
        hi: a.max(b),
    })
}

fn arb_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (1u64..100_000).prop_map(Duration::from_millis),
        (1u64..10_000).prop_map(Duration::from_secs),
        (1u64..1_000).prop_map(|m| Duration::from_secs(m * 60)),
        (1u64..100).prop_map(|h| Duration::from_secs(h * 3600)),
    ]
}

/// Names that must survive YAML quoting: `null`, `~`, `123`, `- x`, `#`...
fn arb_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_string()),
        Just("~".to_string()),
        Just("123".to_string()),
        Just("true".to_string()),
        Just("- x".to_string()),
        Just("'quoted'".to_string()),
        "[^\\p{Cc}]{0,12}",
    ]
    .prop_filter("not blank", |s| !s.trim().is_empty())
}

fn arb_listener() -> impl Strategy<Value = Listener> {
    let mode = prop_oneof![
        Just(ListenerMode::Transparent),
        (
            arb_ip().prop_filter("concrete", |ip| !ip.is_unspecified()),
            1u16..,
            proptest::option::of(arb_ip().prop_filter("concrete", |ip| !ip.is_unspecified())),
        )
            .prop_map(|(ip, port, announce)| ListenerMode::Reverse {
                upstream: SocketAddr::new(ip, port),
                announce,
            }),
    ];
    let proxy = proptest::option::of(
        (
            proptest::collection::vec(arb_net(), 1..4),
            // A header's timeout is at most ProxyProtocol::MAX_TIMEOUT.
            arb_duration().prop_filter("a header timeout", |d| *d <= ProxyProtocol::MAX_TIMEOUT),
        )
            .prop_map(|(from, timeout)| ProxyProtocol {
                from,
                timeout,
                waiting: Default::default(),
            }),
    );
    let send = proptest::option::of(prop_oneof![Just(ProxyVersion::V1), Just(ProxyVersion::V2)]);
    (arb_name(), arb_ip(), any::<u16>(), mode, proxy, send).prop_map(
        |(name, ip, port, mode, proxy_protocol, send)| {
            // Only a reverse listener takes or sends a PROXY header.
            let reverse = mode != ListenerMode::Transparent;
            Listener {
                name,
                listen: SocketAddr::new(ip, port),
                proxy_protocol: proxy_protocol.filter(|_| reverse),
                upstream_proxy_protocol: send.filter(|_| reverse),
                mode,
                tls: None,
                upstream_tls: None,
            }
        },
    )
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    let modes = prop_oneof![
        Just(vec![DataMode::Passive]),
        Just(vec![DataMode::Active]),
        Just(vec![DataMode::Passive, DataMode::Active]),
        Just(vec![DataMode::Active, DataMode::Passive]),
    ];
    (
        arb_name(),
        proptest::collection::vec(arb_net(), 1..4),
        proptest::collection::vec(arb_net(), 1..4),
        any::<bool>(),
        modes,
        0..3usize,
        arb_range(),
        any::<bool>(),
        proptest::collection::btree_set("[A-Z]{1,16}", 0..4),
    )
        .prop_map(
            |(name, clients, servers, deny, modes, sm, data_ports, tls, verbs)| Rule {
                name,
                clients,
                servers,
                action: if deny { Action::Deny } else { Action::Allow },
                modes,
                server_mode: [ServerMode::Same, ServerMode::Passive, ServerMode::Active][sm],
                data_ports,
                tls: if tls {
                    TlsPolicy::Passthrough
                } else {
                    TlsPolicy::Refuse
                },
                deny_commands: verbs.into_iter().collect(),
                require_tls: false,
                require_prot_p: false,
            },
        )
}

/// Two disjoint pools, the low one for clients when `backend` is nftables.
fn arb_data() -> impl Strategy<Value = DataConfig> {
    (
        any::<bool>(),
        1024u16..30_000,
        1024u16..30_000,
        30_001u16..,
        30_001u16..,
        arb_duration(),
        "[A-Za-z0-9_-]{1,64}",
        1u32..,
        prop_oneof![
            (1usize..100_000).prop_map(PortShare::Ports),
            (1u8..=100).prop_map(PortShare::Percent),
        ],
    )
        .prop_map(
            |(nft, a, b, c, d, pinhole_timeout, nftables_table, conntrack_mark, share)| {
                let low = PortRange {
                    lo: a.min(b),
                    hi: a.max(b),
                };
                let high = PortRange {
                    lo: c.min(d),
                    hi: c.max(d),
                };
                let (client_ports, server_ports) = if nft { (low, high) } else { (high, low) };
                DataConfig {
                    backend: if nft {
                        BackendKind::Nftables
                    } else {
                        BackendKind::Relay
                    },
                    client_ports,
                    server_ports,
                    pinhole_timeout,
                    nftables_table,
                    conntrack_mark,
                    max_ports_per_client: share,
                }
            },
        )
}

/// Limits where the per-client cap is at most the total.
fn arb_limits() -> impl Strategy<Value = Limits> {
    (
        1usize..1_000_000,
        1usize..1_000_000,
        arb_duration(),
        arb_duration(),
    )
        .prop_map(|(a, b, idle_timeout, connect_timeout)| Limits {
            max_sessions: a.max(b),
            max_sessions_per_client: a.min(b),
            idle_timeout,
            connect_timeout,
        })
}

fn arb_config() -> impl Strategy<Value = Config> {
    (
        proptest::collection::vec(arb_listener(), 1..4),
        arb_data(),
        arb_limits(),
        proptest::collection::vec(arb_rule(), 1..5),
        proptest::option::of((arb_ip(), any::<u16>())),
        (
            proptest::option::of(prop_oneof![
                Just(AuditTarget::Stdout),
                arb_name().prop_map(|n| AuditTarget::File(PathBuf::from(n))),
            ]),
            proptest::option::of(arb_name()),
        ),
    )
        .prop_map(|(mut listeners, data, limits, mut rules, metrics, audit)| {
            let metrics = metrics.map(|(ip, port)| MetricsConfig {
                listen: SocketAddr::new(ip, port),
            });
            let (audit, instance) = audit;
            let audit = audit
                .filter(|t| t != &AuditTarget::File(PathBuf::from("-")))
                .map(|path| AuditConfig { path });
            // Names and listen addresses are unique in a valid file.
            for (i, l) in listeners.iter_mut().enumerate() {
                l.name = format!("{}#{i}", l.name);
                l.listen
                    .set_port(l.listen.port().wrapping_add(i as u16).max(1));
            }
            for (i, r) in rules.iter_mut().enumerate() {
                r.name = format!("{}#{i}", r.name);
            }
            listeners.dedup_by_key(|l| l.listen);
            // An upstream that is one of the listeners is a loop, which
            // a valid file cannot hold.
            let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.listen).collect();
            for l in &mut listeners {
                if let ListenerMode::Reverse { upstream, .. } = l.mode {
                    if addrs.iter().any(|&a| reaches(upstream, a)) {
                        l.mode = ListenerMode::Transparent;
                        l.proxy_protocol = None;
                        l.upstream_proxy_protocol = None;
                    }
                }
            }
            Config {
                path: PathBuf::from("t.yaml"),
                // A blank name is an error; the suffix keeps it a name.
                instance: instance.map(|n| format!("{n}#i")),
                listeners,
                data,
                limits,
                rules,
                metrics,
                audit,
            }
        })
}

proptest! {
    #[test]
    fn any_valid_config_round_trips(config in arb_config()) {
        let yaml = config.to_yaml();
        let back = parse(&yaml);
        prop_assert_eq!(back, Ok(config), "{}", yaml);
    }
}

/// Each value's name is read as that value and printed back as written, for
/// every named enum in the rule file.
#[test]
fn each_named_value_is_read_and_printed_as_written() {
    let rule = |key: &str, name: &str| format!("{HEAD}rules:\n  - name: all\n    {key}: {name}\n");
    for &(name, v) in Action::NAMES {
        let c = ok(&rule("action", name));
        assert_eq!(c.rules[0].action, v, "{name}");
        assert!(
            c.to_yaml().contains(&format!("  action: {name}\n")),
            "{name}"
        );
    }
    for &(name, v) in ServerMode::NAMES {
        let c = ok(&rule("server_mode", name));
        assert_eq!(c.rules[0].server_mode, v, "{name}");
        assert!(
            c.to_yaml().contains(&format!("  server_mode: {name}\n")),
            "{name}"
        );
    }
    for &(name, v) in TlsPolicy::NAMES {
        let c = ok(&rule("tls", name));
        assert_eq!(c.rules[0].tls, v, "{name}");
        assert!(c.to_yaml().contains(&format!("  tls: {name}\n")), "{name}");
    }
    for &(name, v) in DataMode::NAMES {
        let c = ok(&rule("modes", &format!("[{name}]")));
        assert_eq!(c.rules[0].modes, vec![v], "{name}");
        assert!(
            c.to_yaml().contains(&format!("  modes:\n  - {name}\n")),
            "{name}"
        );
    }
    for &(name, v) in BackendKind::NAMES {
        let c = ok(&format!(
            "{HEAD}rules:\n  - name: all\ndata:\n  backend: {name}\n"
        ));
        assert_eq!(c.data.backend, v, "{name}");
        assert!(
            c.to_yaml().contains(&format!("  backend: {name}\n")),
            "{name}"
        );
    }
    for &(name, v) in ListenerKind::NAMES {
        let upstream = if v == ListenerKind::Reverse {
            "    upstream: 127.0.0.1:21\n"
        } else {
            ""
        };
        let c = ok(&format!(
            "listeners:\n  - name: lo\n    listen: 127.0.0.1:2121\n    mode: {name}\n{upstream}rules:\n  - name: all\n"
        ));
        assert_eq!(c.listeners[0].mode.kind(), v, "{name}");
        assert!(c.to_yaml().contains(&format!("  mode: {name}\n")), "{name}");
    }
}

/// A listener without `mode` is told both names it may use.
#[test]
fn a_listener_without_mode_is_told_the_modes() {
    let errs = errors("listeners:\n  - name: a\n    listen: 127.0.0.1:21\nrules:\n  - name: all\n");
    assert_eq!(
        errs,
        vec!["2:5: missing `mode`: reverse or transparent".to_string()]
    );
}

#[test]
fn proxy_protocol_section() {
    let rules = "rules:\n  - name: all\n";
    let c = ok(&format!(
        "{HEAD}    proxy_protocol: {{ from: [10.0.0.0/24, \"fd00::/64\", 192.0.2.9] }}\n{rules}"
    ));
    let p = c.listeners[0].proxy_protocol.clone().unwrap();
    assert_eq!(
        p.from,
        vec![
            "10.0.0.0/24".parse::<IpNet>().unwrap(),
            "fd00::/64".parse().unwrap(),
            "192.0.2.9/32".parse().unwrap(),
        ]
    );
    assert_eq!(p.timeout, Duration::from_secs(5), "the default");
    assert!(p.trusts("10.0.0.7".parse().unwrap()));
    assert!(p.trusts("::ffff:10.0.0.7".parse().unwrap()), "mapped");
    assert!(!p.trusts("10.0.1.7".parse().unwrap()));
    let yaml = c.to_yaml();
    assert!(yaml.contains("proxy_protocol:"), "{yaml}");
    assert!(yaml.contains("timeout: 5s"), "{yaml}");
    assert_eq!(parse(&yaml), Ok(c.clone()));
    // Without the section, nothing is printed for it.
    assert!(!ok(&format!("{HEAD}{rules}"))
        .to_yaml()
        .contains("proxy_protocol"));
    let c = ok(&format!(
        "{HEAD}    proxy_protocol:\n      from: [10.0.0.1]\n      timeout: 250ms\n{rules}"
    ));
    assert_eq!(
        c.listeners[0].proxy_protocol.as_ref().unwrap().timeout,
        Duration::from_millis(250)
    );
    let transparent =
        "listeners:\n  - name: t\n    listen: 127.0.0.1:2121\n    mode: transparent\n";
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{HEAD}    proxy_protocol: {{ timeout: 5s }}\n{rules}"),
            "6:21: missing `from`: the balancers' addresses (CIDRs) that send a PROXY header",
        ),
        (
            format!("{HEAD}    proxy_protocol: {{ from: [] }}\n{rules}"),
            "6:29: `from` is an empty list: name the balancers, or remove `proxy_protocol`",
        ),
        (
            format!("{HEAD}    proxy_protocol:\n      from: [10.0.0.0/33]\n{rules}"),
            "7:14: from: `10.0.0.0/33` is not a CIDR such as 10.0.0.0/24 or 2001:db8::/32, nor an address",
        ),
        (
            format!("{HEAD}    proxy_protocol:\n      from: [10.0.0.1]\n      timeout: 0s\n{rules}"),
            "8:16: timeout: `0s` is zero; a timeout must be longer than that",
        ),
        (
            format!("{HEAD}    proxy_protocol:\n      from: [10.0.0.1]\n      timeout: 2m\n{rules}"),
            "8:16: timeout: `2m` is longer than 60s, the longest a header may take",
        ),
        (
            format!("{HEAD}    proxy_protocol:\n{rules}"),
            "6:20: `proxy_protocol` has no value: give one, or remove the key",
        ),
        (
            format!("{transparent}    proxy_protocol: {{ from: [10.0.0.1] }}\n{rules}"),
            "5:21: proxy_protocol applies to reverse listeners only: a transparent listener's server is the original destination of a connection that no balancer relayed",
        ),
    ];
    for (text, want) in &cases {
        assert_eq!(errors(text), vec![want.to_string()], "{text}");
    }
    let errs = errors(&format!(
        "{HEAD}    proxy_protocol: {{ from: [10.0.0.1], trusted: yes }}\n{rules}"
    ));
    assert!(errs[0].contains("unknown field `trusted`"), "{errs:?}");
}

/// A network in `from` too broad to be only balancers loads, with a
/// warning: a comment in the effective configuration, which still loads.
#[test]
fn a_broad_balancer_network_is_warned_about() {
    let rules = "rules:\n  - name: all\n";
    let c = ok(&format!(
        "{HEAD}    proxy_protocol: {{ from: [0.0.0.0/0, \"::/0\", 10.0.0.0/8, 10.0.0.0/23, 10.0.1.0/24, \"2001:db8::/48\", \"2001:db8::/63\", \"2001:db8::/64\"] }}\n{rules}"
    ));
    let yaml = c.to_yaml();
    let notes: Vec<&str> = yaml
        .lines()
        .filter(|l| l.starts_with("# warning:"))
        .collect();
    assert_eq!(notes.len(), 6, "{yaml}");
    assert!(notes[0].contains("listeners[0] (lo): proxy_protocol.from 0.0.0.0/0 is every IPv4 address: any host in it may name any client"), "{yaml}");
    assert!(notes[1].contains("::/0 is every IPv6 address"), "{yaml}");
    for (note, net) in notes[2..].iter().zip([
        "10.0.0.0/8 is a network shorter than /24",
        "10.0.0.0/23 is a network shorter than /24",
        "2001:db8::/48 is a network shorter than /64",
        "2001:db8::/63 is a network shorter than /64",
    ]) {
        assert!(note.contains(net), "{net}: {yaml}");
    }
    assert_eq!(parse(&yaml), Ok(c));
    let narrow = ok(&format!(
        "{HEAD}    proxy_protocol: {{ from: [10.0.1.0/24, \"2001:db8::/64\", 10.0.1.254] }}\n{rules}"
    ));
    assert!(!narrow.to_yaml().contains("warning"));
}

#[test]
fn upstream_proxy_protocol_key() {
    let rules = "rules:\n  - name: all\n";
    for (text, want) in [("v1", ProxyVersion::V1), ("v2", ProxyVersion::V2)] {
        let c = ok(&format!(
            "{HEAD}    upstream_proxy_protocol: {text}\n{rules}"
        ));
        assert_eq!(c.listeners[0].upstream_proxy_protocol, Some(want));
        let yaml = c.to_yaml();
        assert!(
            yaml.contains(&format!("upstream_proxy_protocol: {text}")),
            "{yaml}"
        );
        assert_eq!(parse(&yaml), Ok(c));
    }
    assert_eq!(
        ok(&format!("{HEAD}{rules}")).listeners[0].upstream_proxy_protocol,
        None
    );
    let transparent =
        "listeners:\n  - name: t\n    listen: 127.0.0.1:2121\n    mode: transparent\n";
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{HEAD}    upstream_proxy_protocol: v3\n{rules}"),
            "6:30: upstream_proxy_protocol: unknown value `v3`, expected one of: v1, v2",
        ),
        (
            format!("{transparent}    upstream_proxy_protocol: v2\n{rules}"),
            "5:30: upstream_proxy_protocol applies to reverse listeners only: a transparent listener's server is whatever the client dialled, which expects no header",
        ),
    ];
    for (text, want) in &cases {
        assert_eq!(errors(text), vec![want.to_string()], "{text}");
    }
}

#[test]
fn instance_name_is_optional_printed_and_checked() {
    let rules = "rules:\n  - name: all\n";
    assert_eq!(ok(&format!("{HEAD}{rules}")).instance, None);
    let c = ok(&format!("instance: gw-1\n{HEAD}{rules}"));
    assert_eq!(c.instance.as_deref(), Some("gw-1"));
    let printed = c.to_yaml();
    assert!(printed.starts_with("instance: gw-1\n"), "{printed}");
    assert_eq!(ok(&printed), c);
    // Absent, it is not printed at all.
    assert!(!ok(&format!("{HEAD}{rules}")).to_yaml().contains("instance"));
    assert_eq!(
        errors(&format!("instance:\n{HEAD}{rules}")),
        ["1:10: `instance` has no value: give one, or remove the key"]
    );
    assert_eq!(
        errors(&format!("instance: \"  \"\n{HEAD}{rules}")),
        ["1:11: instance: the name is blank"]
    );
    assert_eq!(
        errors(&format!("instance: [a]\n{HEAD}{rules}")).len(),
        1,
        "a list is not a name"
    );
}

#[test]
fn one_thread_by_default_only_when_the_kernel_carries_every_data_connection() {
    let threads = |data: &str, rules: &str| {
        ok(&format!("{HEAD}rules:\n{rules}data:\n{data}")).default_threads()
    };
    let same = "  - name: all\n";
    let nft = "  backend: nftables\n";
    assert_eq!(threads(nft, same), 1);
    // A denying rule converts nothing.
    let deny = "  - name: no\n    action: deny\n    server_mode: active\n  - name: all\n";
    assert_eq!(threads(nft, deny), 1);
    // Relayed plans: one thread per CPU (0).
    assert_eq!(threads("  backend: relay\n", same), 0);
    for rule in [
        "  - name: all\n    server_mode: passive\n",
        "  - name: all\n    server_mode: active\n",
        "  - name: all\n    tls: passthrough\n",
    ] {
        assert_eq!(threads(nft, rule), 0, "{rule}");
    }
    // Listeners whose data connections the relay carries: a balancer's
    // (PROXY headers), and an upstream of the other address family.
    let listener = |extra: &str| {
        ok(&format!(
            "listeners:\n  - name: lo\n    listen: {extra}\nrules:\n{same}data:\n{nft}"
        ))
        .default_threads()
    };
    assert_eq!(
        listener("127.0.0.1:2121\n    mode: reverse\n    upstream: 127.0.0.1:21"),
        1
    );
    assert_eq!(
        listener(
            "127.0.0.1:2121\n    mode: reverse\n    upstream: 127.0.0.1:21\n    proxy_protocol: { from: [10.0.0.9] }"
        ),
        0
    );
    assert_eq!(
        listener("\"[::1]:2121\"\n    mode: reverse\n    upstream: 127.0.0.1:21"),
        0
    );
}
