//! `vedette-agent`: enroll this host with a collector, then run the agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use vedette_agent::config::RawConfig;
use vedette_agent::enroll::{self, CaPin, EnrollArgs};
use vedette_agent::state::StateDir;

/// Exit code for a usage or configuration error (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "vedette-agent",
    version,
    about = "The Vedette endpoint agent: watches files with YARA rules and streams detections to a collector",
    after_help = "Typical use:\n  vedette-agent enroll --collector collector.example:7443 --token vdt_... \
        --ca-sha256 <fingerprint> --state-dir /var/lib/vedette\n  \
        vedette-agent run --state-dir /var/lib/vedette --watch /srv --rules /etc/vedette/rules"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this host: make a key here, send a CSR with a one-time token, keep the certificate.
    Enroll(EnrollCmd),
    /// Run the agent: watch files, scan them, stream detections to the collector.
    Run(RunCmd),
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("trust").required(true).args(["ca_sha256", "ca"]))]
struct EnrollCmd {
    /// The collector's host:port (a name in its server certificate).
    #[arg(long)]
    collector: String,
    /// The enrollment token from `vedettectl token create`.
    #[arg(long, env = "VEDETTE_TOKEN", hide_env_values = true)]
    token: String,
    /// SHA-256 fingerprint of the collector's CA, as printed by `vedette-collector init`.
    #[arg(long, value_name = "HEX")]
    ca_sha256: Option<String>,
    /// The collector's CA certificate file (instead of --ca-sha256).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Where the agent keeps its key, certificate and state (created 0700).
    #[arg(long, default_value = "/var/lib/vedette")]
    state_dir: PathBuf,
}

#[derive(Args)]
struct RunCmd {
    /// The state directory given at enrollment.
    #[arg(long, default_value = "/var/lib/vedette")]
    state_dir: PathBuf,
    /// Agent configuration file (TOML; see deploy/agent.toml). Flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Watch this path recursively (repeatable; added to the config file's list).
    #[arg(long = "watch", value_name = "PATH")]
    watch: Vec<PathBuf>,
    /// YARA rule file or directory (repeatable; added to the config file's list).
    #[arg(long = "rules", value_name = "PATH")]
    rules: Vec<PathBuf>,
    /// Collector host:port (repeatable; replaces the enrolled address).
    #[arg(long = "collector", value_name = "HOST:PORT")]
    collectors: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VEDETTE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Enroll(cmd) => {
            let pin = match (cmd.ca_sha256, cmd.ca) {
                (Some(h), _) => CaPin::Sha256(h),
                (None, Some(f)) => CaPin::File(f),
                (None, None) => unreachable!("clap requires one of --ca-sha256 and --ca"),
            };
            let state = StateDir::new(&cmd.state_dir);
            let args = EnrollArgs {
                collector: &cmd.collector,
                token: &cmd.token,
                pin,
                state: &state,
            };
            match rt.block_on(enroll::enroll(args)) {
                Ok(id) => {
                    println!(
                        "enrolled as agent {id}; credentials in {}",
                        cmd.state_dir.display()
                    );
                    println!(
                        "next: vedette-agent run --state-dir {} --watch PATH --rules PATH",
                        cmd.state_dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run(cmd) => {
            let mut raw = match &cmd.config {
                Some(p) => match RawConfig::load(p) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(EXIT_CONFIG);
                    }
                },
                None => RawConfig::default(),
            };
            raw.watch.extend(cmd.watch);
            raw.rules.extend(cmd.rules);
            if !cmd.collectors.is_empty() {
                raw.collectors = cmd.collectors;
            }
            let settings = match raw.validate(cmd.config.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let shutdown = CancellationToken::new();
            let state = StateDir::new(&cmd.state_dir);
            let result = rt.block_on(async {
                let signal = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    signal.cancel();
                });
                vedette_agent::run::run(state, settings, shutdown).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
