//! `vedettectl`: administer a Vedette collector from anywhere (enrollment tokens, agents,
//! detections, rule bundles) with an operator or maintainer certificate.

mod actions;
mod args;
mod client;
mod commands;
mod hunt;
mod intel;
mod rules;
mod triage;

use std::process::ExitCode;

use clap::Parser;
use vedette_ops::cli::{exit, fail};

use crate::args::{Cli, Command, KeysCmd, RulesCmd};
use crate::client::CtlConfig;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Keys(KeysCmd::Generate { out }) = &cli.command {
        return match vedette_engine::bundle::write_key_pair(out) {
            Ok((key, public, k)) => {
                println!("wrote {} (0600) and {}", key.display(), public.display());
                println!("key id {}", k.id());
                println!("SHA-256 {}", k.sha256());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e, exit::FAILURE),
        };
    }
    if let Command::Rules(RulesCmd::Check {
        strict,
        profile,
        top,
        paths,
    }) = &cli.command
    {
        return match rules::check_paths(paths, *strict, profile.as_deref(), *top) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&format!("{e:#}"), exit::FAILURE),
        };
    }
    let cfg = match CtlConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            eprintln!(
                "hint: pass --config or set VEDETTECTL_CONFIG to the vedettectl.toml written by `vedette-collector init`"
            );
            return ExitCode::from(exit::CONFIG);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = match rt {
        Ok(rt) => rt.block_on(commands::run(cli.command, cfg)),
        Err(e) => return fail(&format!("cannot start the runtime: {e}"), exit::FAILURE),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("{e:#}"), exit::FAILURE),
    }
}
