//! `vedette-agent`: enroll this host with a collector, run the agent, scan once, inspect the
//! spool. The subcommands live in [`vedette_agent::cli`].

use std::process::ExitCode;

use clap::Parser;
use vedette_agent::cli::{Cli, dispatch};

fn main() -> ExitCode {
    let cli = Cli::parse();
    vedette_ops::cli::init_logging(cli.log.log_format);
    dispatch(cli.command)
}
