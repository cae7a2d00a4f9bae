//! `vedette-collector`: `init` creates a collector's PKI and configuration; `serve` runs it.
//! The subcommands are described in [`vedette_collector::cli`].

use std::process::ExitCode;

use clap::Parser;
use vedette_collector::cli::{CertsCmd, Cli, Command};
use vedette_collector::config::Config;
use vedette_collector::{init, pki, server};
use vedette_proto::cli::{exit, fail, init_logging};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Init {
            dir,
            listen,
            sans,
            store,
            maintainer_keys,
            with_maintainer_key,
        } => match init::init(
            &dir,
            listen,
            &sans,
            &store,
            &init::Maintainers {
                keys: maintainer_keys,
                generate: with_maintainer_key,
            },
        ) {
            Ok(done) => {
                print!("{}", init::next_steps(&done));
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e, exit::FAILURE),
        },
        Command::Certs(CertsCmd::Issue {
            config,
            name,
            roles,
            out,
        }) => match Config::load(&config) {
            Err(e) => fail(&e, exit::CONFIG),
            Ok(config) => {
                match pki::issue_files(&config.ca_cert, &config.ca_key, &name, &roles, &out) {
                    Ok((crt, key)) => {
                        println!("wrote {} and {} (0600)", crt.display(), key.display());
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&format!("{e:#}"), exit::FAILURE),
                }
            }
        },
        Command::Serve { config, listen } => match Config::load(&config) {
            Err(e) => fail(&e, exit::CONFIG),
            Ok(mut config) => {
                config.listen = listen.unwrap_or(config.listen);
                server::run_until_signal(config)
            }
        },
    }
}
