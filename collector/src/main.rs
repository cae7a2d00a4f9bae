//! `vedette-collector`: `init` creates a collector's PKI and configuration; `serve` runs it.
//! The subcommands live in [`vedette_collector::cli`].

use std::process::ExitCode;

use clap::Parser;
use vedette_collector::cli::{Cli, dispatch};

fn main() -> ExitCode {
    let cli = Cli::parse();
    vedette_ops::cli::init_logging(cli.log.log_format);
    dispatch(cli.command)
}
