//! The `ftpgate` command: run, check, nft.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ftpgate::config::Config;
use ftpgate::proxy::{serve, Launched};
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
    },
    /// Validate a rule file; print the effective configuration or each error.
    Check {
        /// The rule file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the nftables ruleset an operator needs for this configuration.
    Nft {
        /// The rule file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Check { config } => match Config::load(&config) {
            Ok(c) => {
                print!("{}", c.to_yaml());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(2)
            }
        },
        Cmd::Nft { config } => match Config::load(&config) {
            Ok(c) => {
                print!("{}", ftpgate::pinhole::nft::ruleset(&c));
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(2)
            }
        },
        Cmd::Run { config, grace } => {
            init_tracing(cli.log_format);
            let path = config;
            let config = match Config::load(&path) {
                Ok(c) => Arc::new(c),
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(2);
                }
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ftpgate: tokio runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(config, path, Duration::from_secs(grace))) {
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

async fn run(config: Arc<Config>, path: PathBuf, grace: Duration) -> anyhow::Result<()> {
    let launched = Launched::new(config).await.context("starting")?;
    let table = launched.table.clone();
    let reloader = tokio::spawn(reload_on_hangup(launched.gateway.clone(), path));
    serve(
        launched.gateway,
        launched.listeners,
        shutdown_signal(),
        grace,
    )
    .await;
    reloader.abort();
    Launched::cleanup(table).await;
    Ok(())
}

/// On each SIGHUP, reads the rule file again. A valid file is put in force
/// for new sessions; a broken one is logged (file:line:column) and the
/// configuration in force stays.
async fn reload_on_hangup(gateway: Arc<ftpgate::proxy::Gateway>, path: PathBuf) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("no SIGHUP handler, reload unavailable: {e}");
            return;
        }
    };
    while hup.recv().await.is_some() {
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
    }
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in journald or files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
