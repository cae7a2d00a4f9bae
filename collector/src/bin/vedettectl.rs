//! `vedettectl`: administer a Vedette collector (tokens, agents, detections).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vedette_collector::bundles::{self, PublishOptions};
use vedette_collector::ctl::{self, CtlConfig};

const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "vedettectl",
    version,
    about = "Administer a Vedette collector: enrollment tokens, agents, detections, rule bundles",
    after_help = "Examples:\n  vedettectl token create --ttl 1h\n  vedettectl agents list\n  \
        vedettectl detections list --since 2026-11-25T00:00:00Z --json\n  \
        vedettectl rules publish /etc/vedette/fleet-rules\n  vedettectl rules status"
)]
struct Cli {
    /// vedettectl.toml (written by `vedette-collector init`).
    #[arg(
        long,
        env = "VEDETTECTL_CONFIG",
        default_value = "/etc/vedette/vedettectl.toml",
        global = true
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Enrolled agents.
    #[command(subcommand)]
    Agents(AgentsCmd),
    /// Stored detections.
    #[command(subcommand)]
    Detections(DetectionsCmd),
    /// Rule bundles: publish signed YARA rules and indicators to every agent.
    #[command(subcommand)]
    Rules(RulesCmd),
    /// Maintainer signing keys (local; no collector needed).
    #[command(subcommand)]
    Keys(KeysCmd),
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Write a new Ed25519 maintainer key pair: PREFIX.key (0600) and PREFIX.pub. List the .pub
    /// file under `maintainer_keys` in collector.toml to trust it.
    Generate {
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct SignArgs {
    /// Maintainer private key (default: `sign_key` in vedettectl.toml).
    #[arg(long, value_name = "KEY")]
    sign_key: Option<PathBuf>,
    /// Who publishes, recorded in the bundle (default: $USER).
    #[arg(long)]
    publisher: Option<String>,
    /// Send the bundle unsigned. Agents and the collector refuse it unless they are configured
    /// to accept unsigned bundles.
    #[arg(long)]
    insecure_unsigned: bool,
}

#[derive(Subcommand)]
enum RulesCmd {
    /// Validate, sign and publish YARA files and indicator lists (files or directories) as the
    /// next bundle version; connected agents apply it within seconds.
    Publish {
        /// Bundle name (default: the previous bundle's name, or `rules`).
        #[arg(long)]
        name: Option<String>,
        /// Refuse indicator lines that do not parse (default: report them, agents skip them).
        #[arg(long)]
        strict: bool,
        #[command(flatten)]
        sign: SignArgs,
        /// YARA files (.yar, .yara), indicator lists, or directories of them.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// List published bundles, newest first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one bundle: metadata and files.
    Show {
        version: u64,
        #[arg(long)]
        json: bool,
    },
    /// Publish the content of an older version again, as a new version.
    Rollback {
        version: u64,
        #[command(flatten)]
        sign: SignArgs,
    },
    /// How many agents run a version, are behind, or failed to apply it (default: the latest).
    Status {
        version: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a one-time enrollment token; prints only the token.
    Create {
        /// How long the token stays valid (e.g. 30m, 1h, 2d).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
}

#[derive(Subcommand)]
enum AgentsCmd {
    /// List enrolled agents.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an agent: its open stream is closed and it can no longer connect.
    Revoke {
        /// The agent id (see `agents list`).
        id: String,
    },
}

#[derive(Subcommand)]
enum DetectionsCmd {
    /// List the most recent detections, oldest first.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Only this agent's detections.
        #[arg(long)]
        agent: Option<String>,
        /// Only detections received at or after this time (RFC 3339, e.g. 2026-11-25T10:00:00Z).
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        since: Option<std::time::SystemTime>,
        /// At most this many (the most recent); the collector caps it at 10000.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Keys(KeysCmd::Generate { out }) = &cli.command {
        return match bundles::keys_generate(out) {
            Ok((key, public, k)) => {
                println!("wrote {} (0600) and {}", key.display(), public.display());
                println!("key id {}", k.id());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let cfg = match CtlConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            eprintln!(
                "hint: pass --config or set VEDETTECTL_CONFIG to the vedettectl.toml written by `vedette-collector init`"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli.command, cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(command: Command, cfg: CtlConfig) -> anyhow::Result<()> {
    match command {
        Command::Token(TokenCmd::Create { ttl, uses }) => {
            println!("{}", ctl::token_create(&cfg, ttl, uses).await?);
        }
        Command::Agents(AgentsCmd::List { json }) => {
            let agents = ctl::agents_list(&cfg).await?;
            if json {
                for a in &agents {
                    println!("{}", ctl::agent_json(a));
                }
            } else {
                println!(
                    "{:<36}  {:<20} {:<12} {:<24} {:>6} {:<24} {:>8}  VERSION",
                    "ID", "HOSTNAME", "STATE", "LAST SEEN", "BUNDLE", "APPLIED", "DROPPED"
                );
                for a in &agents {
                    let bundle = if a.bundle_failed_version > a.bundle_version {
                        format!("{}!", a.bundle_version)
                    } else {
                        a.bundle_version.to_string()
                    };
                    println!(
                        "{:<36}  {:<20} {:<12} {:<24} {:>6} {:<24} {:>8}  {}",
                        a.id,
                        a.hostname,
                        ctl::agent_state(a),
                        ctl::rfc3339_ms(a.last_seen_ms),
                        bundle,
                        ctl::rfc3339_ms(a.bundle_applied_at_ms),
                        a.dropped_total,
                        a.agent_version
                    );
                }
                if agents
                    .iter()
                    .any(|a| a.bundle_failed_version > a.bundle_version)
                {
                    println!("! a newer bundle failed to apply: see `vedettectl rules status`");
                }
            }
        }
        Command::Agents(AgentsCmd::Revoke { id }) => {
            let disconnected = ctl::agents_revoke(&cfg, &id).await?;
            if disconnected {
                println!("revoked {id}; its open stream was closed");
            } else {
                println!("revoked {id}");
            }
        }
        Command::Keys(_) => {}
        Command::Rules(cmd) => rules(cmd, &cfg).await?,
        Command::Detections(DetectionsCmd::List {
            json,
            agent,
            since,
            limit,
        }) => {
            let list = ctl::detections_list(&cfg, agent, since, limit).await?;
            for d in &list {
                if json {
                    println!("{}", ctl::detection_json(d));
                } else {
                    println!("{}", ctl::detection_line(d));
                }
            }
        }
    }
    Ok(())
}

fn sign_options(a: SignArgs) -> PublishOptions {
    PublishOptions {
        sign_key: a.sign_key,
        insecure_unsigned: a.insecure_unsigned,
        publisher: a.publisher,
    }
}

async fn rules(cmd: RulesCmd, cfg: &CtlConfig) -> anyhow::Result<()> {
    match cmd {
        RulesCmd::Publish {
            name,
            strict,
            sign,
            paths,
        } => {
            let (r, warnings) =
                bundles::publish(cfg, &paths, name, strict, &sign_options(sign)).await?;
            for w in &warnings {
                eprintln!("warning: {w} (line skipped by agents; --strict refuses it)");
            }
            println!(
                "published version {} (sha256 {}); pushed to {} connected agent(s)",
                r.version, r.digest, r.agents_notified
            );
        }
        RulesCmd::Rollback { version, sign } => {
            let r = bundles::rollback(cfg, version, &sign_options(sign)).await?;
            println!(
                "published the content of version {version} as version {} (sha256 {}); pushed to {} connected agent(s)",
                r.version, r.digest, r.agents_notified
            );
        }
        RulesCmd::List { json } => {
            let list = bundles::list(cfg).await?;
            if json {
                for b in &list {
                    println!("{}", bundles::info_json(b));
                }
            } else {
                println!(
                    "{:>7}  {:<20} {:<24} {:<16} {:>5}  SHA-256",
                    "VERSION", "NAME", "PUBLISHED", "PUBLISHER", "FILES"
                );
                for b in &list {
                    println!(
                        "{:>7}  {:<20} {:<24} {:<16} {:>5}  {}",
                        b.version,
                        b.name,
                        ctl::rfc3339_ms(b.published_at_ms),
                        b.publisher,
                        b.files,
                        &b.digest[..16.min(b.digest.len())]
                    );
                }
            }
        }
        RulesCmd::Show { version, json } => {
            let (info, content) = bundles::fetch(cfg, version).await?;
            if json {
                let mut v = bundles::info_json(&info);
                v["paths"] = content
                    .files
                    .iter()
                    .map(|f| serde_json::json!({"path": f.path, "size": f.data.len()}))
                    .collect();
                println!("{v}");
            } else {
                println!("version:      {}", info.version);
                println!("name:         {}", info.name);
                println!(
                    "publisher:    {} (certificate {})",
                    info.publisher, info.published_by
                );
                println!("created:      {}", ctl::rfc3339_ms(info.created_at_ms));
                println!("published:    {}", ctl::rfc3339_ms(info.published_at_ms));
                println!("sha256:       {}", info.digest);
                println!(
                    "signed by:    {}",
                    if info.signer_key.is_empty() {
                        "nobody (unsigned)".to_string()
                    } else {
                        info.signer_key.clone()
                    }
                );
                println!("files:");
                for f in &content.files {
                    println!("  {:>10}  {}", f.data.len(), f.path);
                }
            }
        }
        RulesCmd::Status { version, json } => {
            let r = bundles::rollout(cfg, version.unwrap_or(0)).await?;
            if json {
                println!("{}", bundles::rollout_json(&r));
            } else {
                println!(
                    "version {}: {} on it, {} behind, {} failed, {} ahead",
                    r.version, r.on_version, r.behind, r.failed, r.ahead
                );
                for a in r.agents.iter().filter(|a| a.applied_version != r.version) {
                    let what = if a.failed_version == r.version {
                        format!("failed: {}", a.error)
                    } else {
                        format!("runs version {}", a.applied_version)
                    };
                    println!("  {} ({}): {what}", a.agent_id, a.hostname);
                }
            }
        }
    }
    Ok(())
}
