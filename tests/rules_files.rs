//! Every example in `rules/` loads and round-trips; bad files are reported at
//! the exact `file:line:column` of the mistake.

use ftpgate::config::{Action, BackendKind, Config, ListenerMode};
use std::path::{Path, PathBuf};

fn example_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.map(|e| e.path()).unwrap_or_default())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn load(path: &Path) -> Config {
    Config::load(path).unwrap_or_else(|e| panic!("{} does not validate:\n{e}", path.display()))
}

#[test]
fn every_example_validates_and_round_trips() {
    let files = example_files();
    let names: Vec<String> = files
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for required in [
        "minimal.yaml",
        "nftables.yaml",
        "reverse.yaml",
        "transparent.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == required),
            "rules/{required} is missing: {names:?}"
        );
    }
    for path in &files {
        let config = load(path);
        let printed = config.to_yaml();
        let again = Config::parse(&printed, path).unwrap_or_else(|e| {
            panic!(
                "effective config of {} does not parse:\n{e}\n{printed}",
                path.display()
            )
        });
        assert_eq!(
            again,
            config,
            "{} does not round-trip:\n{printed}",
            path.display()
        );
        // Printing is stable: the effective config of the effective config is itself.
        assert_eq!(again.to_yaml(), printed, "{}", path.display());
    }
}

#[test]
fn examples_say_what_their_comments_say() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let minimal = load(&dir.join("minimal.yaml"));
    assert_eq!(
        minimal.listeners[0].mode,
        ListenerMode::Reverse {
            upstream: "127.0.0.1:2100".parse().unwrap(),
            announce: None
        }
    );
    assert_eq!(
        minimal.listeners[0].listen,
        "127.0.0.1:2121".parse().unwrap()
    );

    let reverse = load(&dir.join("reverse.yaml"));
    assert!(matches!(
        reverse.listeners[0].mode,
        ListenerMode::Reverse {
            announce: Some(_),
            ..
        }
    ));
    assert_eq!(reverse.rules.len(), 2);

    let transparent = load(&dir.join("transparent.yaml"));
    assert_eq!(transparent.listeners[0].mode, ListenerMode::Transparent);
    assert_eq!(transparent.rules[0].action, Action::Deny);
    assert!(transparent
        .rules
        .iter()
        .any(|r| r.deny_commands == ["SITE"]));

    let nft = load(&dir.join("nftables.yaml"));
    assert_eq!(nft.data.backend, BackendKind::Nftables);
    assert_eq!(nft.listeners[0].mode, ListenerMode::Transparent);
}

/// Bad files on disk: the whole message, file name included, as `check`
/// prints it.
#[test]
fn bad_files_are_reported_at_the_offending_value() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "bad-range.yaml",
            "listeners:\n  - name: a\n    listen: 127.0.0.1:2121\n    mode: reverse\n    upstream: 127.0.0.1:21\ndata:\n  client_ports: 41000-40000\nrules:\n  - name: all\n",
            &["7:17: client_ports: `41000-40000` is reversed; write 40000-41000"],
        ),
        (
            "unknown-key.yaml",
            "listeners:\n  - name: a\n    listen: 127.0.0.1:2121\n    mode: reverse\n    upstrem: 127.0.0.1:21\nrules:\n  - name: all\n",
            &["5:5: listeners[0]: unknown field `upstrem`, expected one of `name`, `listen`, `mode`, `upstream`, `announce`, `proxy_protocol`, `upstream_proxy_protocol`, `tls`, `upstream_tls`"],
        ),
        (
            "several.yaml",
            "listeners:\n  - name: a\n    listen: 0.0.0.0:21\n    mode: transparent\n    upstream: 10.0.0.3:21\ndata:\n  backend: nft\n  pinhole_timeout: 45\nrules:\n  - name: lan\n    clients: [10.0.0.0/24, 10.0.0.300/32]\n    deny_commands: [SITE, \"\"]\n",
            &[
                "5:15: a transparent listener takes no `upstream`: its server is the original destination of each intercepted connection",
                "7:12: backend: unknown value `nft`, expected one of: relay, nftables",
                "8:20: pinhole_timeout: `45` has no unit; write e.g. 45s (a number and a unit: 500ms, 30s, 15m or 1h)",
                "11:28: clients: `10.0.0.300/32` is not a CIDR such as 10.0.0.0/24 or 2001:db8::/32, nor an address",
                "12:27: deny_commands: `` is not an FTP command (1-16 letters, e.g. SITE)",
            ],
        ),
        (
            "syntax.yaml",
            "listeners:\n  - name: a\n   listen: 127.0.0.1:2121\n",
            &["3:4: did not find expected '-' indicator, while parsing a block collection at line 2 column 3"],
        ),
    ];
    for (name, text, want) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let errors = match Config::load(&path) {
            Ok(_) => panic!("{name} validated"),
            Err(e) => e,
        };
        let want: Vec<String> = want
            .iter()
            .map(|w| format!("{}:{w}", path.display()))
            .collect();
        let got: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
        assert_eq!(got, want, "{name}");
        assert_eq!(errors.to_string(), want.join("\n"), "{name}");
    }
}
