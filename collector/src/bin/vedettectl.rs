//! `vedettectl`: administer a Vedette collector (tokens, agents, detections).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vedette_collector::ctl::{self, CtlConfig};

const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "vedettectl",
    version,
    about = "Administer a Vedette collector: enrollment tokens, agents, detections",
    after_help = "Examples:\n  vedettectl token create --ttl 1h\n  vedettectl agents list\n  \
        vedettectl detections list --since 2026-11-25T00:00:00Z --json"
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
                    "{:<36}  {:<20} {:<12} {:<24} {:>6} {:>8}  VERSION",
                    "ID", "HOSTNAME", "STATE", "LAST SEEN", "BUNDLE", "DROPPED"
                );
                for a in &agents {
                    println!(
                        "{:<36}  {:<20} {:<12} {:<24} {:>6} {:>8}  {}",
                        a.id,
                        a.hostname,
                        ctl::agent_state(a),
                        ctl::rfc3339_ms(a.last_seen_ms),
                        a.bundle_version,
                        a.dropped_total,
                        a.agent_version
                    );
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
