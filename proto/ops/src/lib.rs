//! What Vedette's programs show an operator, the same in the agent, the collector and
//! `vedettectl`: exit codes, log set-up and signals (`cli`), the one way to print a detection
//! (`output`), `doctor` findings (`doctor`), the configuration error (`config`), the TLS channel to the collector (`client`), and,
//! with the `metrics` feature, the `/metrics` endpoint both daemons serve.

pub mod cli;
pub mod client;
pub mod config;
pub mod doctor;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod output;
