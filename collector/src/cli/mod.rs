//! The `vedette-collector` command line: what each subcommand takes (this file) and does
//! (`commands.rs` dispatches; `init.rs`, `users.rs` and `doctor.rs` are the commands that are
//! not the server).

mod commands;
pub mod doctor;
pub mod init;
pub mod users;

pub use commands::dispatch;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use vedette_ops::cli::LogArgs;

use crate::pki::Role;

#[derive(Parser)]
#[command(
    name = "vedette-collector",
    version,
    about = "The Vedette collector: enrolls agents, stores their detections, serves vedettectl",
    long_about = "The Vedette collector: enrolls agents under its own CA, stores their detections \
        in SQLite or PostgreSQL, and serves the admin API used by vedettectl.\n\n\
        First run `vedette-collector init --dir /var/lib/vedette-collector` once, then \
        `vedette-collector serve --config /var/lib/vedette-collector/collector.toml`."
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create a new CA, the server certificate, an operator certificate and the config files.
    ///
    /// Writes into DIR: ca.crt, ca.key (0600), server.crt/.key, operator.crt/.key (the
    /// certificate vedettectl uses; roles operator and maintainer), collector.toml and
    /// vedettectl.toml. Refuses to overwrite an existing CA. Rule maintainers keep their
    /// signing keys on their own machines: give their public keys with --maintainer-key, or
    /// add them to collector.toml later; --with-maintainer-key makes one here instead.
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
        /// Where detections are kept: `sqlite:vedette.db` (the default, relative to DIR) for
        /// one collector, or `postgres://USER@HOST/DB` for several sharing one database.
        #[arg(
            long = "store",
            value_name = "URL",
            default_value = "sqlite:vedette.db"
        )]
        store: String,
        /// A rule maintainer's public key to trust (the .pub of `vedettectl keys generate`,
        /// made on the maintainer's machine); repeatable. Agents should be given the same
        /// files at enrollment (`vedette-agent enroll --maintainer-key`).
        #[arg(long = "maintainer-key", value_name = "FILE")]
        maintainer_keys: Vec<PathBuf>,
        /// Also make a maintainer key pair here, trusted and used by vedettectl.toml: one
        /// command to a working setup, but whoever takes this host can then sign bundles every
        /// agent runs. For trials.
        #[arg(long)]
        with_maintainer_key: bool,
    },
    /// Client certificates for people and tools (run on the collector host: it uses the CA key).
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Console accounts: people who sign in to the web console (`console_listen`) with a
    /// password instead of a client certificate (run on the collector host).
    #[command(subcommand)]
    Users(UsersCmd),
    /// Check a collector's set-up and print each problem with its fix (read-only).
    ///
    /// Checks the configuration, the private keys' modes, the CA and server certificates
    /// (chain, expiry), the store (reachable, readable) and whether the listen and metrics
    /// addresses are free. Exit status: 0 healthy (warnings allowed), 1 problems.
    Doctor {
        /// The collector.toml written by `init`.
        #[arg(long, env = "VEDETTE_COLLECTOR_CONFIG")]
        config: PathBuf,
    },
    /// Run the collector until SIGTERM or SIGINT, then drain open streams and stop.
    Serve {
        /// The collector.toml written by `init`.
        #[arg(long, env = "VEDETTE_COLLECTOR_CONFIG")]
        config: PathBuf,
        /// Listen on this address instead of the config's `listen` (to run several
        /// collectors from one config, on one PostgreSQL store).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Serve Prometheus metrics here instead of the config's `metrics_listen`
        /// (`HOST:PORT`, or `off`).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<String>,
    },
    /// Internal: compiles the rule sources given on standard input for `serve`, which starts
    /// it for each bundle published and each YARA item of outside intel.
    #[command(name = "compile-rules", hide = true)]
    CompileRules,
}

#[derive(Subcommand)]
pub enum CertsCmd {
    /// Issue a client certificate with the given roles: `operator` (tokens, agents,
    /// detections) and/or `maintainer` (publish rule bundles). Writes PREFIX.crt and
    /// PREFIX.key (0600); with `--csr`, only PREFIX.crt, for the key the request was made with
    /// (a key made on the operator's own machine never travels).
    ///
    /// With `--org NAME` the certificate sees and acts only on that organisation's agents,
    /// detections, tokens and certificates, and cannot publish bundles, stage intel, or see
    /// other organisations. Without it, the certificate is collector-wide.
    #[command(
        after_help = "Examples:\n  vedette-collector certs issue --config collector.toml --name alice --role operator --out alice\n\n\
        With the key made on the operator's machine:\n  \
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout alice.key -out alice.csr -subj /CN=alice\n  \
        vedette-collector certs issue --config collector.toml --name alice --role operator --csr alice.csr --out alice --ctl-config"
    )]
    Issue {
        /// The collector.toml (for the CA's certificate and key).
        #[arg(long, env = "VEDETTE_COLLECTOR_CONFIG")]
        config: PathBuf,
        /// The person or tool the certificate is for (its common name).
        #[arg(long)]
        name: String,
        /// A role (repeatable).
        #[arg(long = "role", required = true, value_enum)]
        roles: Vec<Role>,
        /// Limit the certificate to this organisation (created first with
        /// `vedettectl orgs create`).
        #[arg(long, value_name = "NAME")]
        org: Option<String>,
        /// Sign this certificate signing request (PEM) instead of making a key here. Only its
        /// public key is used: the name, roles and organisation are the ones given here.
        #[arg(long, value_name = "FILE")]
        csr: Option<PathBuf>,
        /// Also write PREFIX.vedettectl.toml, a ready vedettectl configuration (this
        /// collector's address, PREFIX.ca.crt, PREFIX.crt, PREFIX.key), to hand over with the
        /// certificate.
        #[arg(long)]
        ctl_config: bool,
        /// Output path prefix.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum UsersCmd {
    /// Create an account, or set a new password (and roles, organisation) for an existing one.
    ///
    /// The password is read from standard input (without echo on a terminal; at least 12
    /// characters) and stored as an argon2id hash. Setting a new password ends the account's
    /// open sessions.
    Add {
        /// The collector.toml (for the store).
        #[arg(long, env = "VEDETTE_COLLECTOR_CONFIG")]
        config: PathBuf,
        /// The account name (letters, digits, `.`, `_`, `-`, `@`).
        name: String,
        /// A role (repeatable): `operator` sees and acts on agents and detections,
        /// `maintainer` sees bundles.
        #[arg(long = "role", required = true, value_enum)]
        roles: Vec<Role>,
        /// Limit the account to this organisation, as `certs issue --org` does.
        #[arg(long, value_name = "NAME")]
        org: Option<String>,
    },
    /// List the accounts.
    List {
        #[arg(long, env = "VEDETTE_COLLECTOR_CONFIG")]
        config: PathBuf,
    },
    /// Remove an account; its open sessions end at their next request.
    Remove {
        #[arg(long, env = "VEDETTE_COLLECTOR_CONFIG")]
        config: PathBuf,
        name: String,
    },
}
