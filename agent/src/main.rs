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
    /// Scan paths (and processes) once, without a collector, and print what matched.
    ///
    /// Exit status: 0 nothing matched, 1 something matched, 2 error (like grep).
    Scan(ScanCmd),
    /// Show the detections waiting in the spool for the collector's ack (read-only).
    Spool(SpoolCmd),
}

#[derive(Args)]
struct SpoolCmd {
    /// The state directory given at enrollment.
    #[arg(long, default_value = "/var/lib/vedette")]
    state_dir: PathBuf,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ScanCmd {
    /// YARA files (.yar, .yara), indicator lists (hash/filename/c2/process/cmdline in the name)
    /// or directories holding them (repeatable).
    #[arg(long = "rules", value_name = "PATH", required = true)]
    rules: Vec<PathBuf>,
    /// One JSON object per detection.
    #[arg(long)]
    json: bool,
    /// Skip files larger than this many bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024, value_name = "BYTES")]
    max_file_size: u64,
    /// YARA time budget per file (e.g. 30s).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Also scan running processes (names, command lines, executables) and their connections.
    #[arg(long)]
    processes: bool,
    /// Fail (exit 2) if any rule file or indicator line does not load.
    #[arg(long)]
    strict: bool,
    /// Scanning threads.
    #[arg(long, short = 'p', default_value_t = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))]
    threads: usize,
    /// Cross file-system boundaries below each path.
    #[arg(long)]
    cross_filesystems: bool,
    /// Skip paths matching this glob (repeatable); /proc, /sys, /dev and /run are always skipped.
    #[arg(long = "exclude", value_name = "GLOB")]
    excludes: Vec<String>,
    /// Percentage of one core each scanning thread may use (1-100).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_cpu_percent: u32,
    /// Keep results in this file: unchanged files are not scanned again with the same rules.
    #[arg(long, value_name = "FILE")]
    cache: Option<PathBuf>,
    /// Files or directories to scan.
    #[arg(value_name = "PATH")]
    paths: Vec<PathBuf>,
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
        Command::Spool(cmd) => {
            let dir = StateDir::new(&cmd.state_dir).spool();
            match vedette_agent::spool::inspect(&dir) {
                Ok(i) if cmd.json => {
                    println!("{}", serde_json::json!(i));
                    ExitCode::SUCCESS
                }
                Ok(i) => {
                    println!("spool:            {}", dir.display());
                    println!("pending:          {} detections", i.pending);
                    println!(
                        "size:             {} bytes in {} segments",
                        i.bytes, i.segments
                    );
                    println!("acknowledged up to record {}", i.acked);
                    println!("dropped (ever):   {}", i.dropped_total);
                    if i.damaged_segments > 0 {
                        println!(
                            "damaged:          {} bytes in {} segments (cut at the agent's next start)",
                            i.damaged_bytes, i.damaged_segments
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: cannot read the spool: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Scan(cmd) => {
            if cmd.paths.is_empty() && !cmd.processes {
                eprintln!("error: give at least one PATH to scan, or --processes");
                return ExitCode::from(2);
            }
            let args = vedette_agent::standalone::ScanArgs {
                rules: cmd.rules,
                paths: cmd.paths,
                json: cmd.json,
                processes: cmd.processes,
                strict: cmd.strict,
                walk: vedette_agent::walk::WalkOptions {
                    threads: cmd.threads,
                    one_file_system: !cmd.cross_filesystems,
                    excludes: cmd.excludes,
                    max_cpu_percent: cmd.max_cpu_percent,
                    scan: vedette_engine::ScanOptions {
                        max_file_size: cmd.max_file_size,
                        timeout: cmd.timeout,
                    },
                },
                cache: cmd.cache,
            };
            ExitCode::from(vedette_agent::standalone::run(args))
        }
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
