//! The `ftpgate` command: run, check, nft, explain, balancer.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ftpgate::config::Config;
use ftpgate::proxy::{serve, Launched};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// FTP-aware gateway: makes active and passive FTP work through firewalls
/// and NAT.
#[derive(Parser, Debug)]
#[command(name = "ftpgate", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the gateway.
    Run {
        /// The rule file. SIGHUP reads it again: rules and limits apply to
        /// new sessions; listeners and the data section need a restart.
        #[arg(long, short)]
        config: PathBuf,
        /// How long running sessions may go on after SIGTERM/SIGINT.
        #[arg(long, default_value = "10", value_name = "SECONDS")]
        grace: u64,
        /// Threads that run sessions and relays: 1 runs everything on one
        /// thread (no hand-offs between threads, the least CPU per session,
        /// but one core's worth of relaying); N > 1, N threads. 0 (the
        /// default): 1 when the kernel carries every data connection
        /// (`backend: nftables`, rules with `server_mode: same` and
        /// `tls: refuse`, no listener TLS or PROXY headers, upstreams in
        /// their listener's address family), else one per CPU.
        #[arg(long, default_value = "0", value_name = "N")]
        threads: usize,
        /// Bind listeners and the metrics endpoint with SO_REUSEPORT, so that
        /// a second gateway started the same way shares the port and takes
        /// over while this one drains (blue/green upgrades). Any process of
        /// the same user can then join the port; without this flag a second
        /// gateway on the same address fails to start.
        #[arg(long)]
        reuse_port: bool,
    },
    /// Validate a rule file; print the effective configuration or each error.
    /// With --peer, also check the files as instances of one service.
    Check {
        /// The rule file.
        #[arg(long, short)]
        config: PathBuf,
        /// The rule file of another instance of the same service (repeat
        /// for each): instance names must be unique, client_ports disjoint
        /// where instances share an address, listeners and rules the same.
        #[arg(long, value_name = "FILE")]
        peer: Vec<PathBuf>,
    },
    /// Print the balancer configuration for a set of instances, after the
    /// same checks as `check --peer`.
    Balancer {
        /// What to print.
        #[arg(long, value_enum)]
        format: BalancerFormat,
        /// Each instance's rule file (repeat for each instance).
        #[arg(long, short, required = true)]
        config: Vec<PathBuf>,
    },
    /// Print the nftables ruleset an operator needs for this configuration;
    /// with --into, only the rules for the operator's own chains, as
    /// `add rule` commands that `nft -f -` loads.
    Nft {
        /// The rule file.
        #[arg(long, short)]
        config: PathBuf,
        /// The operator's existing table, as FAMILY/TABLE (e.g. inet/filter):
        /// print only the rules for its chains given below; a group of
        /// rules is left out when its chain is not given.
        #[arg(long, value_name = "FAMILY/TABLE")]
        into: Option<String>,
        /// The filter chain for input: the listeners' control ports and the
        /// data pools.
        #[arg(long, value_name = "CHAIN", requires = "into")]
        input: Option<String>,
        /// The filter chain for forward (it needs no rule: printed as a
        /// comment that says why).
        #[arg(long, value_name = "CHAIN", requires = "into")]
        forward: Option<String>,
        /// The nat chain at prerouting priority dstnat: the transparent
        /// listeners' interception.
        #[arg(long, value_name = "CHAIN", requires = "into")]
        dstnat: Option<String>,
        /// The control ports the transparent listeners intercept.
        #[arg(long, value_name = "PORT,...", value_delimiter = ',', default_value = "21",
              value_parser = clap::value_parser!(u16).range(1..))]
        control_ports: Vec<u16>,
    },
    /// Show which rule a session from CLIENT to SERVER meets and what it
    /// allows, or why it is refused. Exits 0 when allowed, 1 when refused.
    Explain {
        /// The rule file.
        #[arg(long, short)]
        config: PathBuf,
        /// The client's address.
        #[arg(long)]
        client: IpAddr,
        /// The FTP server's address:port.
        #[arg(long)]
        server: SocketAddr,
    },
    /// Write the man page or shell completions to standard output (for
    /// packagers).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum BalancerFormat {
    /// HAProxy: PROXY v2 to each instance, health checks.
    Haproxy,
    /// An nftables table that DNATs, keeping the client's address.
    Nftables,
}

#[derive(Subcommand, Debug)]
enum Generate {
    /// The man page, ftpgate(1), in roff.
    Man,
    /// Completions for SHELL.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Check { config, peer } => match Config::load(&config) {
            Ok(c) => {
                for warning in ftpgate::config::tls_warnings(&config) {
                    eprintln!("warning: {warning}");
                }
                print!("{}", c.to_yaml());
                if peer.is_empty() {
                    return ExitCode::SUCCESS;
                }
                let Some(mut set) = load_all(&peer) else {
                    return ExitCode::from(2);
                };
                set.insert(0, c);
                match ftpgate::balancer::check_set(&set) {
                    Ok(()) => {
                        eprintln!("{}", one_service(&set));
                        ExitCode::SUCCESS
                    }
                    Err(errors) => set_errors(&errors),
                }
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(2)
            }
        },
        Cmd::Balancer { format, config } => {
            let Some(set) = load_all(&config) else {
                return ExitCode::from(2);
            };
            let format = match format {
                BalancerFormat::Haproxy => ftpgate::balancer::Format::Haproxy,
                BalancerFormat::Nftables => ftpgate::balancer::Format::Nftables,
            };
            match ftpgate::balancer::generate(&set, format) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(errors) => set_errors(&errors),
            }
        }
        Cmd::Nft {
            config,
            into,
            input,
            forward,
            dstnat,
            control_ports,
        } => match Config::load(&config) {
            Ok(c) => {
                let Some(into) = into else {
                    print!("{}", ftpgate::netfilter::ruleset(&c, &control_ports));
                    return ExitCode::SUCCESS;
                };
                match ftpgate::netfilter::OperatorChains::new(&into, input, forward, dstnat) {
                    Ok(chains) => {
                        print!(
                            "{}",
                            ftpgate::netfilter::operator_rules(&c, &chains, &control_ports)
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(2)
                    }
                }
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(2)
            }
        },
        Cmd::Explain {
            config,
            client,
            server,
        } => match Config::load(&config) {
            Ok(c) => {
                let e = ftpgate::explain::explain(&c, client, server);
                print!("{}", e.text);
                if e.allowed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(2)
            }
        },
        Cmd::Generate { what } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            let r = match what {
                Generate::Man => clap_mangen::Man::new(cmd).render(&mut std::io::stdout()),
                Generate::Completions { shell } => {
                    clap_complete::generate(shell, &mut cmd, "ftpgate", &mut std::io::stdout());
                    Ok(())
                }
            };
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ftpgate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run {
            config,
            grace,
            threads,
            reuse_port,
        } => {
            init_tracing(cli.log_format);
            // Before any thread starts: taking them unsets LISTEN_FDS and
            // LISTEN_PID, and changing the environment is safe only while
            // the process has one thread.
            let inherited = match inherited_sockets() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("ftpgate: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            let sockets = ftpgate::proxy::Sockets {
                reuse_port,
                inherited,
            };
            let path = config;
            let config = match Config::load(&path) {
                Ok(c) => Arc::new(c),
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(2);
                }
            };
            let threads = match threads {
                0 => config.default_threads(),
                n => n,
            };
            tracing::info!(
                threads = if threads == 0 {
                    std::thread::available_parallelism().map_or(1, |n| n.get())
                } else {
                    threads
                },
                "runtime"
            );
            let rt = match runtime(threads) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ftpgate: tokio runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(config, path, sockets, Duration::from_secs(grace))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("ftpgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Every file loaded, or `None` after printing each error of each file.
fn load_all(paths: &[PathBuf]) -> Option<Vec<Config>> {
    let mut set = Vec::with_capacity(paths.len());
    let mut ok = true;
    for path in paths {
        match Config::load(path) {
            Ok(c) => set.push(c),
            Err(errors) => {
                eprintln!("{errors}");
                ok = false;
            }
        }
    }
    ok.then_some(set)
}

/// Prints why a set of files is not one service; exit status 2, as for an
/// invalid file.
fn set_errors(errors: &[ftpgate::balancer::SetError]) -> ExitCode {
    for e in errors {
        eprintln!("{e}");
    }
    ExitCode::from(2)
}

/// One line saying which instances passed the set check, with their slices.
fn one_service(set: &[Config]) -> String {
    let each: Vec<String> = set
        .iter()
        .map(|c| {
            format!(
                "{} ({}, client_ports {})",
                c.instance.as_deref().unwrap_or_default(),
                c.path.display(),
                c.data.client_ports
            )
        })
        .collect();
    format!("instances of one service: {}", each.join(", "))
}

async fn run(
    config: Arc<Config>,
    path: PathBuf,
    sockets: ftpgate::proxy::Sockets,
    grace: Duration,
) -> anyhow::Result<()> {
    raise_nofile_limit();
    // Installed before the listeners join their ports, so that no failure
    // comes after; and before READY=1, so an early SIGHUP reloads instead
    // of killing the process with the default action.
    let shutdown = shutdown_signal()?;
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("SIGHUP handler")?;
    let launched = Launched::with_sockets(config, sockets)
        .await
        .context("starting")?;
    let table = launched.table.clone();
    let gateway = launched.gateway.clone();
    gateway
        .backend
        .check_expect_max(gateway.config().limits.max_sessions);
    let reloader = tokio::spawn(reload_on_hangup(launched.gateway.clone(), path, hangup));
    // Every listener is bound: connections queue from now on.
    ftpgate::systemd::notify_ready();
    serve(launched.gateway, launched.listeners, shutdown, grace).await;
    reloader.abort();
    // Before the table goes: waiting expectations would outlive it.
    gateway.backend.close().await;
    Launched::cleanup(table).await;
    Ok(())
}

/// The listening sockets a service manager handed over (systemd socket
/// activation: `LISTEN_FDS` descriptors from 3 on, for this `LISTEN_PID`);
/// none when the variables are unset. A descriptor that is not a TCP
/// socket is an error.
fn inherited_sockets() -> anyhow::Result<Vec<std::net::TcpListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::new();
    for i in 0..fds.len() {
        let fd = 3 + i;
        match fds.take_tcp_listener(i) {
            Ok(Some(l)) => {
                // A connected socket passes the type check; only a
                // listener has connections to accept.
                if !socket2::SockRef::from(&l).is_listener().unwrap_or(false) {
                    anyhow::bail!("inherited descriptor {fd} (LISTEN_FDS): not a listening socket");
                }
                out.push(l)
            }
            Ok(None) => {}
            Err(e) => {
                anyhow::bail!("inherited descriptor {fd} (LISTEN_FDS): not a TCP socket: {e}")
            }
        }
    }
    Ok(out)
}

/// The runtime for `ftpgate run` with `threads` worker threads (see the
/// option). One thread is a current-thread runtime: a session's control
/// task and its data plans' tasks then never wake each other across
/// threads, which costs futex and eventfd wake-ups and context switches
/// on every reply.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().build()
}

/// Each session holds two descriptors (client and server control
/// connections), and each transfer up to three more, so the usual soft
/// limit of 1024 caps a gateway at a few hundred sessions. Raises the soft
/// RLIMIT_NOFILE to the hard limit (no privilege needed) and logs both.
fn raise_nofile_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let Some(hard) = limit.maximum else {
        // No hard limit: leave the soft one as it is.
        return;
    };
    if limit.current.is_some_and(|soft| soft >= hard) {
        tracing::info!(limit = hard, "open files limit");
        return;
    }
    let raised = Rlimit {
        current: Some(hard),
        maximum: Some(hard),
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::info!(limit = hard, "open files limit raised to the hard limit"),
        Err(e) => {
            tracing::warn!(soft = ?limit.current, hard, "cannot raise the open files limit: {e}")
        }
    }
}

/// On each SIGHUP, reads the rule file again. A valid file is put in force
/// for new sessions; a broken one is logged (file:line:column) and the
/// configuration in force stays.
async fn reload_on_hangup(
    gateway: Arc<ftpgate::proxy::Gateway>,
    path: PathBuf,
    mut hup: tokio::signal::unix::Signal,
) {
    while hup.recv().await.is_some() {
        ftpgate::systemd::notify_reloading();
        match Config::load(&path) {
            Ok(c) => {
                for note in gateway.reload(c) {
                    tracing::warn!(file = %path.display(), "reload: {note}");
                }
                tracing::info!(file = %path.display(), "configuration reloaded");
            }
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!("reload failed, configuration unchanged: {e}");
                }
            }
        }
        // Served certificates are read again whatever the rule file says:
        // a renewal needs no rule change. Sessions keep their keys; a pair
        // that does not load keeps the old one.
        for (listener, r) in gateway.tls.reload() {
            match r {
                Ok(subject) => {
                    tracing::info!(listener, subject, "TLS certificate reloaded")
                }
                Err(e) => tracing::error!(
                    listener,
                    "TLS certificate not reloaded, the old one is still served: {e}"
                ),
            }
        }
        ftpgate::systemd::notify_ready();
    }
}

/// Resolves on SIGTERM or SIGINT and tells systemd the gateway is stopping.
/// The handlers are installed before this returns, so a signal that comes
/// right after READY=1 is not lost to the default action.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        ftpgate::systemd::notify_stopping();
    })
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Plain text, no colour codes even at a terminal: tracing-subscriber
        // is built without its `ansi` feature, whose styling calls ran for
        // every field of every line even with colour off (7% of the
        // gateway's user-space instructions per session).
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => {
            ftpgate::escape::set_json(true);
            builder.json().init()
        }
    }
}
