//! `vedette-collector`: `init` creates a collector's PKI and configuration; `serve` runs it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use vedette_collector::config::Config;
use vedette_collector::pki::{Ca, Role, with_suffix, write_new};
use vedette_collector::{init, server};

/// Exit code for a usage or configuration error (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "vedette-collector",
    version,
    about = "The Vedette collector: enrolls agents, stores their detections, serves vedettectl",
    long_about = "The Vedette collector: enrolls agents under its own CA, stores their detections \
        in SQLite, and serves the admin API used by vedettectl.\n\n\
        First run `vedette-collector init --dir /etc/vedette` once, then \
        `vedette-collector serve --config /etc/vedette/collector.toml`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new CA, the server certificate, an operator certificate and the config files.
    ///
    /// Writes into DIR: ca.crt, ca.key (0600), server.crt/.key, operator.crt/.key (the
    /// certificate vedettectl uses; roles operator and maintainer), maintainer.key (0600) and
    /// maintainer.pub (the first rule-signing key, trusted from the start), collector.toml and
    /// vedettectl.toml. Refuses to overwrite an existing CA.
    Init {
        /// Directory to create the files in (created 0700 if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Address the collector will listen on.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Extra DNS name or IP address agents use to reach the collector (repeatable);
        /// `localhost` and `127.0.0.1` are always included.
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
    /// Client certificates for people and tools (run on the collector host: it uses the CA key).
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Run the collector until SIGTERM or SIGINT, then drain open streams and stop.
    Serve {
        /// The collector.toml written by `init`.
        #[arg(long, env = "VEDETTE_COLLECTOR_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Issue a client certificate with the given roles: `operator` (tokens, agents,
    /// detections) and/or `maintainer` (publish rule bundles). Writes PREFIX.crt and
    /// PREFIX.key (0600).
    Issue {
        /// The collector.toml (for the CA's certificate and key).
        #[arg(long, env = "VEDETTE_COLLECTOR_CONFIG")]
        config: PathBuf,
        /// The person or tool the certificate is for (its common name).
        #[arg(long)]
        name: String,
        /// A role (repeatable): operator, maintainer.
        #[arg(long = "role", required = true, value_parser = ["operator", "maintainer"])]
        roles: Vec<String>,
        /// Output path prefix.
        #[arg(long)]
        out: PathBuf,
    },
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
    match cli.command {
        Command::Init { dir, listen, sans } => match init::init(&dir, listen, &sans) {
            Ok(done) => {
                let d = done.dir.display();
                println!("Created a new collector CA in {d}");
                println!("CA SHA-256 fingerprint: {}", done.fingerprint);
                println!();
                println!("Next:");
                println!("  vedette-collector serve --config {d}/collector.toml");
                println!("  export VEDETTECTL_CONFIG={d}/vedettectl.toml");
                println!("  TOKEN=$(vedettectl token create --ttl 1h)");
                println!("  # on each server to protect:");
                println!(
                    "  vedette-agent enroll --collector {} --token $TOKEN --ca-sha256 {} --state-dir /var/lib/vedette",
                    done.client_address, done.fingerprint
                );
                println!(
                    "  vedette-agent run --state-dir /var/lib/vedette --watch /srv --rules /etc/vedette/rules"
                );
                println!("  # publish signed rules to every agent:");
                println!("  vedettectl rules publish /path/to/rules");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
        Command::Certs(CertsCmd::Issue {
            config,
            name,
            roles,
            out,
        }) => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let roles: Vec<Role> = roles.iter().filter_map(|r| Role::parse(r)).collect();
            match issue(&config, &name, &roles, &out) {
                Ok((crt, key)) => {
                    println!("wrote {} and {} (0600)", crt.display(), key.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Serve { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let listener = server::bind(&config).await?;
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signal.cancel();
    });
    server::serve(config, listener, shutdown).await
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
        _ => {
            // Without signal handlers the process still stops on the default action.
            std::future::pending::<()>().await;
        }
    }
}

fn issue(
    config: &Config,
    name: &str,
    roles: &[Role],
    out: &std::path::Path,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let ca = Ca::load(&config.ca_cert, &config.ca_key)?;
    let cert = ca.issue_client(name, roles)?;
    let (crt, key) = (with_suffix(out, ".crt"), with_suffix(out, ".key"));
    write_new(&key, cert.key_pem.as_bytes(), 0o600)?;
    write_new(&crt, cert.cert_pem.as_bytes(), 0o644)?;
    Ok((crt, key))
}
