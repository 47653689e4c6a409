use super::*;
use std::path::Path;

/// An instance file: `name` (none: no `instance` key), listen address,
/// `announce` (none: key absent), client_ports, and extra text appended to
/// the listener.
struct Inst<'a> {
    name: Option<&'a str>,
    listen: &'a str,
    announce: Option<&'a str>,
    ports: &'a str,
    listener_extra: &'a str,
    tail: &'a str,
}

const PP: &str = "    proxy_protocol:\n      from: [10.0.1.254]\n";

fn inst<'a>(name: &'a str, listen: &'a str, ports: &'a str) -> Inst<'a> {
    Inst {
        name: Some(name),
        listen,
        announce: Some("203.0.113.10"),
        ports,
        listener_extra: PP,
        tail: "",
    }
}

fn load(i: &Inst<'_>) -> Config {
    let mut text = String::new();
    if let Some(n) = i.name {
        text.push_str(&format!("instance: {n}\n"));
    }
    text.push_str(&format!(
        "listeners:\n  - name: ftp\n    listen: \"{}\"\n    mode: reverse\n    upstream: 10.0.0.3:21\n",
        i.listen
    ));
    if let Some(a) = i.announce {
        text.push_str(&format!("    announce: \"{a}\"\n"));
    }
    text.push_str(i.listener_extra);
    text.push_str(&format!(
        "data:\n  client_ports: {}\n  server_ports: 50000-50999\nlimits:\n  idle_timeout: 10m\nrules:\n  - name: all\n{}",
        i.ports, i.tail
    ));
    let file = format!("{}.yaml", i.name.unwrap_or("unnamed"));
    match Config::parse(&text, Path::new(&file)) {
        Ok(c) => c,
        Err(e) => panic!("test file does not load:\n{e}\n{text}"),
    }
}

fn set(insts: &[Inst<'_>]) -> Vec<Config> {
    insts.iter().map(load).collect()
}

fn good() -> Vec<Config> {
    set(&[
        inst("gw1", "10.0.1.1:21", "40000-40299"),
        inst("gw2", "10.0.1.2:21", "40300-40599"),
        inst("gw3", "10.0.1.3:21", "40600-40899"),
    ])
}

/// The set check's messages, which must exist.
fn refused(set: &[Config]) -> Vec<String> {
    match check_set(set) {
        Ok(()) => panic!("the set check passed"),
        Err(e) => e.into_iter().map(|e| e.0).collect(),
    }
}

#[test]
fn disjoint_slices_of_one_address_pass() {
    assert_eq!(check_set(&good()), Ok(()));
    // One file alone is a set of one.
    assert_eq!(check_set(&good()[..1]), Ok(()));
}

#[test]
fn overlapping_slices_of_one_address_are_refused_with_both_files_and_ranges() {
    let s = set(&[
        inst("gw1", "10.0.1.1:21", "40000-40499"),
        inst("gw2", "10.0.1.2:21", "40400-40999"),
    ]);
    let e = refused(&s);
    assert_eq!(e.len(), 1, "{e:?}");
    for part in [
        "gw1.yaml (instance `gw1`)",
        "gw2.yaml (instance `gw2`)",
        "client_ports 40000-40499 and 40400-40999 overlap (40400-40499)",
        "both are reached at 203.0.113.10",
        "disjoint slice",
    ] {
        assert!(e[0].contains(part), "{part:?} not in {}", e[0]);
    }
    // Touching at one port is an overlap too.
    let s = set(&[
        inst("gw1", "10.0.1.1:21", "40000-40300"),
        inst("gw2", "10.0.1.2:21", "40300-40599"),
    ]);
    assert!(refused(&s)[0].contains("overlap (40300-40300)"));
}

#[test]
fn overlap_matters_only_where_instances_share_an_address() {
    // Each instance announces its own address: the same slice is fine.
    let mut a = inst("gw1", "10.0.1.1:21", "40000-40999");
    a.announce = Some("203.0.113.11");
    let mut b = inst("gw2", "10.0.1.2:21", "40000-40999");
    b.announce = Some("203.0.113.12");
    assert_eq!(check_set(&set(&[a, b])), Ok(()));
    // No announce, different listen addresses: each is reached at its own.
    let mut a = inst("gw1", "10.0.1.1:21", "40000-40999");
    a.announce = None;
    let mut b = inst("gw2", "10.0.1.2:21", "40000-40999");
    b.announce = None;
    assert_eq!(check_set(&set(&[a, b])), Ok(()));
    // No announce and both on every address: they may be reached at one.
    let mut a = inst("gw1", "0.0.0.0:21", "40000-40999");
    a.announce = None;
    let mut b = inst("gw2", "0.0.0.0:21", "40500-40999");
    b.announce = None;
    let e = refused(&set(&[a, b]));
    assert!(
        e[0].contains("announces nothing and listens on 0.0.0.0"),
        "{e:?}"
    );
    // One announces the address the other listens on without announcing.
    let mut a = inst("gw1", "10.0.1.1:21", "40000-40999");
    a.announce = Some("10.0.1.2");
    let mut b = inst("gw2", "10.0.1.2:21", "40000-40999");
    b.announce = None;
    assert!(refused(&set(&[a, b]))[0].contains("both are reached at 10.0.1.2"));
}

#[test]
fn names_must_be_present_and_unique() {
    let mut unnamed = inst("x", "10.0.1.2:21", "40300-40599");
    unnamed.name = None;
    let e = refused(&set(&[inst("gw1", "10.0.1.1:21", "40000-40299"), unnamed]));
    assert_eq!(
        e,
        ["unnamed.yaml: no `instance` name; each instance of a service needs one (`instance: NAME` at the top of the file)"]
    );
    let mut s = set(&[
        inst("gw1", "10.0.1.1:21", "40000-40299"),
        inst("gw1", "10.0.1.2:21", "40300-40599"),
    ]);
    s[1].path = "other.yaml".into();
    assert_eq!(
        refused(&s),
        ["gw1.yaml and other.yaml: both are instance `gw1`; each instance needs its own name"]
    );
}

#[test]
fn listeners_rules_and_the_per_client_limit_must_agree() {
    let base = || inst("gw1", "10.0.1.1:21", "40000-40299");
    let other = |listen: &'static str, extra: &'static str, tail: &'static str| Inst {
        name: Some("gw2"),
        listen,
        announce: Some("203.0.113.10"),
        ports: "40300-40599",
        listener_extra: extra,
        tail,
    };
    let cases: [(Inst<'_>, &str); 3] = [
        (
            other("10.0.1.2:2121", PP, ""),
            "listener `ftp`: gw2.yaml (instance `gw2`) listens on port 2121 but gw1.yaml (instance `gw1`) on port 21",
        ),
        (
            other("10.0.1.2:21", "", ""),
            "gw2.yaml (instance `gw2`) has no proxy_protocol but gw1.yaml (instance `gw1`) has proxy_protocol from [10.0.1.254/32]",
        ),
        (
            other("10.0.1.2:21", PP, "    clients: [10.0.0.0/8]\n"),
            "the rules differ, first at rule 1 (`all` and `all`)",
        ),
    ];
    for (b, want) in cases {
        let e = refused(&[load(&base()), load(&b)]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains(want), "{want:?} not in {}", e[0]);
    }
    let mut b = load(&inst("gw2", "10.0.1.2:21", "40300-40599"));
    b.limits.max_sessions_per_client = 3;
    assert_eq!(
        refused(&[load(&base()), b]),
        ["gw2.yaml (instance `gw2`) has max_sessions_per_client 3 but gw1.yaml (instance `gw1`) has 64; a client's limit would depend on the instance the balancer picks"]
    );
    // Another upstream, and another set of listeners.
    let mut b = load(&inst("gw2", "10.0.1.2:21", "40300-40599"));
    if let crate::config::ListenerMode::Reverse { upstream, .. } = &mut b.listeners[0].mode {
        *upstream = "10.0.0.4:21".parse().unwrap();
    }
    assert!(refused(&[load(&base()), b.clone()])[0].contains("has upstream 10.0.0.4:21"));
    b.listeners[0].name = "other".into();
    let e = refused(&[load(&base()), b]);
    assert!(
        e[0].contains("has listeners `other` but gw1.yaml (instance `gw1`) has `ftp`"),
        "{e:?}"
    );
}

#[test]
fn haproxy_spreads_control_by_source_and_routes_each_slice_to_its_owner() {
    let text = generate(&good(), Format::Haproxy).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let has = |l: &str| assert!(lines.contains(&l), "no line {l:?} in:\n{text}");
    for l in [
        "mode tcp",
        // idle_timeout 10m, plus a minute.
        "timeout client 660s",
        "timeout server 660s",
        "bind 203.0.113.10:21",
        "balance source",
        "hash-type consistent",
        "tcp-check connect default linger",
        "tcp-check expect rstring ^220",
        "retries 2",
        "option redispatch",
        "default-server send-proxy-v2 check check-send-proxy inter 2s fall 2 rise 2",
        "server gw1 10.0.1.1:21",
        "server gw2 10.0.1.2:21",
        "server gw3 10.0.1.3:21",
        "bind 203.0.113.10:40000-40299",
        "server gw1 10.0.1.1 send-proxy-v2",
        "bind 203.0.113.10:40600-40899",
        "server gw3 10.0.1.3 send-proxy-v2",
    ] {
        has(l);
    }
    // Each slice's frontend leads to its owner only.
    let gw2 = text.split("\nbackend ftp-data-gw2-v4\n").nth(1).unwrap();
    let gw2 = gw2.split("\n\n").next().unwrap();
    assert!(gw2.contains("server gw2 10.0.1.2 send-proxy-v2"));
    assert!(!gw2.contains("gw1") && !gw2.contains("gw3"), "{gw2}");
}

#[test]
fn haproxy_needs_proxy_protocol_a_vip_and_a_reachable_address() {
    let mut no_pp = inst("gw2", "10.0.1.2:21", "40300-40599");
    no_pp.listener_extra = "";
    let mut a = load(&inst("gw1", "10.0.1.1:21", "40000-40299"));
    a.listeners[0].proxy_protocol = None;
    let e = generate(&[a, load(&no_pp)], Format::Haproxy).unwrap_err();
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0]
        .0
        .contains("gw1.yaml (instance `gw1`), listener `ftp`: no `proxy_protocol`"));
    let unspecified = set(&[inst("gw1", "0.0.0.0:21", "40000-40299")]);
    let e = generate(&unspecified, Format::Haproxy).unwrap_err();
    assert!(
        e[0].0
            .contains("listens on 0.0.0.0, which the balancer cannot connect to"),
        "{e:?}"
    );
    let mut no_vip = inst("gw1", "10.0.1.1:21", "40000-40299");
    no_vip.announce = None;
    let e = generate(&set(&[no_vip]), Format::Nftables).unwrap_err();
    assert!(e[0]
        .0
        .contains("whose `announce` is the balancer's address"));
    let mut other_vip = inst("gw2", "10.0.1.2:21", "40300-40599");
    other_vip.announce = Some("203.0.113.99");
    let e = generate(
        &set(&[inst("gw1", "10.0.1.1:21", "40000-40299"), other_vip]),
        Format::Haproxy,
    )
    .unwrap_err();
    assert!(
        e[0].0
            .contains("announces 203.0.113.99 but another instance announces 203.0.113.10"),
        "{e:?}"
    );
    let e = generate(
        &set(&[inst("gw one", "10.0.1.1:21", "40000-40299")]),
        Format::Haproxy,
    )
    .unwrap_err();
    assert!(e[0]
        .0
        .contains("instance name `gw one` cannot name an HAProxy server"));
    // nft only shows the name in a comment.
    let named = set(&[inst("gw one", "10.0.1.1:21", "40000-40299")]);
    assert!(generate(&named, Format::Nftables).is_ok());
    // The kernel backend cannot take a PROXY header on data connections.
    let mut kernel = load(&inst("gw1", "10.0.1.1:21", "40000-40299"));
    kernel.data.backend = crate::config::BackendKind::Nftables;
    let e = generate(std::slice::from_ref(&kernel), Format::Haproxy).unwrap_err();
    assert!(
        e[0].0
            .contains("gw1.yaml (instance `gw1`): data.backend nftables"),
        "{e:?}"
    );
    assert!(generate(&[kernel], Format::Nftables).is_ok());
    // The set check comes first.
    let overlapping = set(&[
        inst("gw1", "10.0.1.1:21", "40000-40499"),
        inst("gw2", "10.0.1.2:21", "40400-40999"),
    ]);
    for f in [Format::Haproxy, Format::Nftables] {
        assert!(generate(&overlapping, f).unwrap_err()[0]
            .0
            .contains("overlap"));
    }
}

#[test]
fn haproxy_brackets_ipv6_servers_without_a_port() {
    let v6 = |name, listen, ports| Inst {
        name: Some(name),
        listen,
        announce: Some("2001:db8::10"),
        ports,
        listener_extra: "    proxy_protocol:\n      from: [\"2001:db8:1::fe\"]\n",
        tail: "",
    };
    let s = set(&[
        v6("gw1", "[2001:db8:1::1]:21", "40000-40499"),
        v6("gw2", "[2001:db8:1::2]:21", "40500-40999"),
    ]);
    let text = generate(&s, Format::Haproxy).unwrap();
    for l in [
        "bind [2001:db8::10]:21",
        "server gw1 [2001:db8:1::1]:21",
        "bind [2001:db8::10]:40500-40999",
        "server gw2 [2001:db8:1::2] send-proxy-v2",
    ] {
        assert!(text.lines().any(|x| x.trim() == l), "no {l:?} in:\n{text}");
    }
    let nft = generate(&s, Format::Nftables).unwrap();
    assert!(nft.contains(
        "ip6 daddr 2001:db8::10 tcp dport 21 dnat ip6 to jhash ip6 saddr mod 2 map { 0 : 2001:db8:1::1, 1 : 2001:db8:1::2 }"
    ), "{nft}");
    // A VIP of one family before instances of the other cannot be DNATed.
    let mut mixed = v6("gw1", "10.0.1.1:21", "40000-40499");
    mixed.listener_extra = PP;
    let e = generate(&set(&[mixed]), Format::Nftables).unwrap_err();
    assert!(e[0].0.contains("of one address family"), "{e:?}");
}

#[test]
fn nftables_hashes_the_client_and_dnats_each_slice_to_its_owner() {
    let text = generate(&good(), Format::Nftables).unwrap();
    let rules: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("dnat"))
        .collect();
    assert_eq!(
        rules,
        [
            "ip daddr 203.0.113.10 tcp dport 21 dnat ip to jhash ip saddr mod 3 map { 0 : 10.0.1.1, 1 : 10.0.1.2, 2 : 10.0.1.3 }",
            "ip daddr 203.0.113.10 tcp dport 40000-40299 dnat ip to 10.0.1.1",
            "ip daddr 203.0.113.10 tcp dport 40300-40599 dnat ip to 10.0.1.2",
            "ip daddr 203.0.113.10 tcp dport 40600-40899 dnat ip to 10.0.1.3",
        ]
    );
    // Without SNAT, replies are un-DNATed only if they come back this way.
    assert!(text.contains("must come back through this"), "{text}");
}

/// An instance with an IPv4 and an IPv6 listener has a data slice on each
/// VIP; each gets a proxy name of its own, as HAProxy requires.
#[test]
fn haproxy_names_each_data_proxy_once_for_dual_stack_instances() {
    let v6 = "  - name: ftp6\n    listen: \"[2001:db8:1::N]:21\"\n    mode: reverse\n    upstream: 10.0.0.3:21\n    announce: \"2001:db8::10\"\n    proxy_protocol:\n      from: [\"2001:db8:1::fe\"]\n";
    let extra1 = format!("{PP}{}", v6.replace('N', "1"));
    let extra2 = format!("{PP}{}", v6.replace('N', "2"));
    let mut a = inst("gw1", "10.0.1.1:21", "40000-40299");
    a.listener_extra = &extra1;
    let mut b = inst("gw2", "10.0.1.2:21", "40300-40599");
    b.listener_extra = &extra2;
    let text = generate(&set(&[a, b]), Format::Haproxy).unwrap();
    // A frontend and a backend may share a name; two of a kind may not.
    let names: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("frontend ") || l.starts_with("backend "))
        .collect();
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(names.len(), unique.len(), "{names:?}");
    for l in [
        "frontend ftp-data-gw1-v4",
        "frontend ftp-data-gw1-v6",
        "backend ftp-data-gw2-v6",
        "bind [2001:db8::10]:40300-40599",
        "server gw2 [2001:db8:1::2] send-proxy-v2",
    ] {
        assert!(text.lines().any(|x| x.trim() == l), "no {l:?} in:\n{text}");
    }
}

/// client_ports that contain the control port on the same VIP are refused,
/// naming both.
#[test]
fn a_slice_over_a_control_port_of_its_vip_is_refused() {
    let over = set(&[
        inst("gw1", "10.0.1.1:40100", "40000-40299"),
        inst("gw2", "10.0.1.2:40100", "40300-40599"),
    ]);
    for f in [Format::Haproxy, Format::Nftables] {
        let e = generate(&over, f).unwrap_err();
        assert!(
            e.iter().any(|e| e.0.contains(
                "instance `gw1`: client_ports 40000-40299 on 203.0.113.10 contain the control port 40100 of listener `ftp`"
            )),
            "{e:?}"
        );
    }
    // A control port just past the slice is fine.
    let next = set(&[inst("gw1", "10.0.1.1:40300", "40000-40299")]);
    assert!(generate(&next, Format::Haproxy).is_ok());
}
