//! The `vedette-agent` command line: what each subcommand takes, and running it.

pub mod doctor;
pub mod enroll;
pub mod scan;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use vedette_ops::cli::{LogArgs, exit, fail, wait_for_signal};

use crate::config::RawConfig;
use crate::detect::walk::{WalkRules, exclusions};
use crate::state::StateDir;
use enroll::{CaPin, EnrollArgs};

#[derive(Parser)]
#[command(
    name = "vedette-agent",
    version,
    about = "The Vedette endpoint agent: watches files with YARA rules and streams detections to a collector",
    after_help = "Typical use:\n  vedette-agent enroll --collector collector.example:7443 --token-file token.txt \
        --ca-sha256 <fingerprint> --state-dir /var/lib/vedette\n  \
        vedette-agent run --state-dir /var/lib/vedette --watch /srv --rules /etc/vedette/rules"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Check this host's agent set-up and print each problem with its fix (read-only).
    ///
    /// Checks the configuration, the enrollment, the key's and the state directory's modes,
    /// the certificate (issued by the CA in ca.crt, expiry), each collector (reachable, TLS,
    /// knows this agent), the clock against the collector's, the file-event source and its
    /// limits (fanotify privileges, fs.inotify.max_user_watches) and the disk space for the
    /// spool. Exit status: 0 healthy (warnings allowed), 1 problems.
    Doctor(DoctorCmd),
    /// Internal: compiles the rule sources given on standard input for `run`, which starts it.
    #[command(name = "compile-rules", hide = true)]
    CompileRules,
}

#[derive(Args)]
pub struct DoctorCmd {
    /// The state directory given at enrollment.
    #[arg(long, default_value = "/var/lib/vedette")]
    pub state_dir: PathBuf,
    /// The agent's configuration file, as given to `run`.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Args)]
pub struct SpoolCmd {
    /// The state directory given at enrollment.
    #[arg(long, default_value = "/var/lib/vedette")]
    pub state_dir: PathBuf,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ScanCmd {
    /// YARA files (.yar, .yara), indicator lists (hash/filename/c2/process/cmdline in the name)
    /// or directories holding them (repeatable).
    #[arg(long = "rules", value_name = "PATH", required = true)]
    pub rules: Vec<PathBuf>,
    /// One JSON object per detection.
    #[arg(long)]
    pub json: bool,
    /// Skip files larger than this: bytes or a size (`64MiB`, `1GiB`, `500KB`).
    #[arg(long, default_value = "64MiB", value_name = "SIZE", value_parser = crate::config::parse_size)]
    pub max_file_size: u64,
    /// YARA time budget per file (e.g. 30s).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// Also scan running processes (names, command lines, executables) and their connections.
    #[arg(long)]
    pub processes: bool,
    /// With --processes: also match YARA rules against each process's readable private memory
    /// (heap, stack, anonymous mappings; at most 64 MiB per region and 256 MiB per process).
    #[arg(long, requires = "processes")]
    pub memory: bool,
    /// Fail (exit 2) if any rule file or indicator line does not load.
    #[arg(long)]
    pub strict: bool,
    /// Scanning threads. With two or more, files are hashed on a second core while the rules
    /// compile or load (for the indicator lists that need digests).
    #[arg(long, short = 'p', default_value_t = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))]
    pub threads: usize,
    /// Cross file-system boundaries below each path.
    #[arg(long)]
    pub cross_filesystems: bool,
    /// Skip paths matching this glob (repeatable); /proc, /sys, /dev and /run are always skipped.
    #[arg(long = "exclude", value_name = "GLOB")]
    pub excludes: Vec<String>,
    /// Percentage of one core all scanning threads together may use (1-100).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_cpu_percent: u32,
    /// Keep results in this file: unchanged files are not scanned again with the same rules.
    #[arg(long, value_name = "FILE")]
    pub cache: Option<PathBuf>,
    /// Do not keep the compiled YARA rules between runs. By default they are kept in
    /// `$XDG_CACHE_HOME/vedette/` (else `~/.cache/vedette/`), one file per set of rule paths,
    /// reused only while the sources are unchanged and only from a file this user owns and
    /// nobody else may write (with --cache FILE they are kept in FILE.rules instead).
    #[arg(long)]
    pub no_compiled_cache: bool,
    /// Files or directories to scan.
    #[arg(value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("trust").required(true).args(["ca_sha256", "ca"]))]
#[command(group = clap::ArgGroup::new("secret").required(true).args(["token", "token_file"]))]
pub struct EnrollCmd {
    /// The collector's host:port (a name in its server certificate).
    #[arg(long)]
    pub collector: String,
    /// The enrollment token from `vedettectl token create`. On a shared host prefer
    /// `--token-file` or the VEDETTE_TOKEN variable: a command line is visible to `ps`.
    #[arg(long, env = "VEDETTE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the enrollment token (read once; delete it afterwards).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the collector's CA, as printed by `vedette-collector init`.
    #[arg(long, value_name = "HEX")]
    pub ca_sha256: Option<String>,
    /// The collector's CA certificate file (instead of --ca-sha256).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Where the agent keeps its key, certificate and state (created 0700).
    #[arg(long, default_value = "/var/lib/vedette")]
    pub state_dir: PathBuf,
    /// A rule maintainer's public key (the .pub file of `vedettectl keys generate`, made on
    /// the maintainer's machine) to pin: only bundles signed by a pinned key are applied.
    /// Repeatable. The keys the collector offers are not pinned.
    #[arg(long = "maintainer-key", value_name = "FILE")]
    pub maintainer_keys: Vec<PathBuf>,
    /// Or pin a maintainer key by its SHA-256 (64 hex digits, as `vedettectl keys generate`
    /// prints it; repeatable): the key the collector offers with that fingerprint is pinned,
    /// and enrollment fails if it offers none.
    #[arg(long = "maintainer-key-sha256", value_name = "HEX")]
    pub maintainer_key_sha256: Vec<String>,
    /// Pin whatever maintainer keys the collector offers, for a trial: whoever controls the
    /// collector could then sign bundles this agent runs. Without it, enrollment needs
    /// --maintainer-key or --maintainer-key-sha256.
    #[arg(long, conflicts_with_all = ["maintainer_keys", "maintainer_key_sha256"])]
    pub trust_collector_keys: bool,
}

#[derive(Args)]
pub struct RunCmd {
    /// The state directory given at enrollment.
    #[arg(long, default_value = "/var/lib/vedette")]
    pub state_dir: PathBuf,
    /// Agent configuration file (TOML; see deploy/agent.toml). Flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Watch this path recursively (repeatable; added to the config file's list).
    #[arg(long = "watch", value_name = "PATH")]
    pub watch: Vec<PathBuf>,
    /// YARA rule file or directory (repeatable; added to the config file's list).
    #[arg(long = "rules", value_name = "PATH")]
    pub rules: Vec<PathBuf>,
    /// Collector host:port (repeatable; replaces the enrolled address).
    #[arg(long = "collector", value_name = "HOST:PORT")]
    pub collectors: Vec<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (replaces the config's
    /// `metrics_listen`; `off` turns them off).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// Runs one subcommand to its exit status.
pub fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Spool(cmd) => spool(&cmd),
        Command::Scan(cmd) => ExitCode::from(scan_cmd(cmd)),
        Command::CompileRules => ExitCode::from(vedette_engine::child::serve("vedette-agent")),
        Command::Enroll(cmd) => block_on(enroll_cmd(cmd)),
        Command::Run(cmd) => block_on(run_cmd(cmd)),
        Command::Doctor(cmd) => block_on(async move {
            let findings = doctor::run(&cmd.state_dir, cmd.config.as_deref()).await;
            if vedette_ops::doctor::print(&findings) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(exit::FAILURE)
            }
        }),
    }
}

/// Runs an async command on a runtime of its own (the others start none).
fn block_on(command: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(command),
        Err(e) => fail(&format!("cannot start the runtime: {e}"), exit::FAILURE),
    }
}

fn spool(cmd: &SpoolCmd) -> ExitCode {
    let dir = StateDir::new(&cmd.state_dir).spool();
    let i = match crate::deliver::spool::inspect(&dir) {
        Ok(i) => i,
        Err(e) => return fail(&format!("cannot read the spool: {e}"), exit::FAILURE),
    };
    if cmd.json {
        println!("{}", serde_json::json!(i));
        return ExitCode::SUCCESS;
    }
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

fn scan_cmd(cmd: ScanCmd) -> u8 {
    if cmd.paths.is_empty() && !cmd.processes {
        eprintln!("error: give at least one PATH to scan, or --processes");
        return exit::SCAN_ERROR;
    }
    let excludes = match exclusions(&cmd.excludes) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::SCAN_ERROR;
        }
    };
    let args = scan::ScanArgs {
        rules: cmd.rules,
        paths: cmd.paths,
        json: cmd.json,
        processes: cmd.processes,
        memory: cmd.memory,
        strict: cmd.strict,
        plan: crate::detect::full_scan::ScanPlan {
            threads: cmd.threads,
            walk: WalkRules {
                one_file_system: !cmd.cross_filesystems,
                excludes,
            },
            max_cpu_percent: cmd.max_cpu_percent,
            scan: vedette_engine::ScanOptions {
                max_file_size: cmd.max_file_size,
                timeout: cmd.timeout,
                all_digests: false,
            },
        },
        cache: cmd.cache,
        compiled_cache: !cmd.no_compiled_cache,
    };
    scan::run(args)
}

async fn enroll_cmd(cmd: EnrollCmd) -> ExitCode {
    let pin = match (cmd.ca_sha256, cmd.ca) {
        (Some(h), _) => CaPin::Sha256(h),
        (None, Some(f)) => CaPin::File(f),
        (None, None) => return fail(&"give --ca-sha256 or --ca", exit::CONFIG),
    };
    let token = match (cmd.token, &cmd.token_file) {
        (Some(t), _) => t,
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(t) if !t.trim().is_empty() => t,
            Ok(_) => return fail(&format!("`{}` holds no token", f.display()), exit::CONFIG),
            Err(e) => {
                return fail(
                    &format!("cannot read the token file `{}`: {e}", f.display()),
                    exit::CONFIG,
                );
            }
        },
        (None, None) => return fail(&"give --token-file or --token", exit::CONFIG),
    };
    if cmd.maintainer_keys.is_empty()
        && cmd.maintainer_key_sha256.is_empty()
        && !cmd.trust_collector_keys
    {
        return fail(
            &"no rule maintainer key to pin: give --maintainer-key FILE (a maintainer's .pub \
              from `vedettectl keys generate`) or --maintainer-key-sha256 HEX; \
              --trust-collector-keys pins what the collector offers instead, and whoever \
              controls the collector could then sign bundles this agent runs",
            exit::CONFIG,
        );
    }
    let state = StateDir::new(&cmd.state_dir);
    let mut maintainers = Vec::new();
    for p in &cmd.maintainer_keys {
        match vedette_engine::bundle::PublicKey::load(p) {
            Ok(keys) => maintainers.extend(keys),
            Err(e) => return fail(&format!("--maintainer-key: {e}"), exit::CONFIG),
        }
    }
    let mut fingerprints = Vec::new();
    for f in &cmd.maintainer_key_sha256 {
        let f = f.trim().to_ascii_lowercase();
        if f.len() != 64 || !f.chars().all(|c| c.is_ascii_hexdigit()) {
            return fail(
                &format!("--maintainer-key-sha256: `{f}` is not 64 hex digits"),
                exit::CONFIG,
            );
        }
        fingerprints.push(f);
    }
    let args = EnrollArgs {
        collector: &cmd.collector,
        token: &token,
        pin,
        state: &state,
        maintainers,
        fingerprints,
    };
    match enroll::enroll(args).await {
        Ok(id) => {
            let dir = cmd.state_dir.display();
            println!("enrolled as agent {id}; credentials in {dir}");
            println!("next: vedette-agent run --state-dir {dir} --watch PATH --rules PATH");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("{e:#}"), exit::FAILURE),
    }
}

async fn run_cmd(cmd: RunCmd) -> ExitCode {
    let mut raw = match &cmd.config {
        Some(p) => match RawConfig::load(p) {
            Ok(r) => r,
            Err(e) => return fail(&e, exit::CONFIG),
        },
        None => RawConfig::default(),
    };
    raw.watch.extend(cmd.watch);
    raw.rules.extend(cmd.rules);
    if !cmd.collectors.is_empty() {
        raw.collectors = cmd.collectors;
    }
    if cmd.metrics_listen.is_some() {
        raw.metrics_listen = cmd.metrics_listen;
    }
    let settings = match raw.validate(cmd.config.as_deref()) {
        Ok(s) => s,
        Err(e) => return fail(&e, exit::CONFIG),
    };
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signal.cancel();
    });
    let state = StateDir::new(&cmd.state_dir);
    match crate::daemon::run(state, settings, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("{e:#}"), exit::FAILURE),
    }
}
