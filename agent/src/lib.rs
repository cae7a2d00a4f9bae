//! The Vedette agent: watches files and processes against YARA rules and indicators and streams
//! detections to the collector over mutual TLS.
//!
//! Stages, in the order data flows: [`detect`] finds (watcher, full scans, process monitor),
//! [`rules`] holds what it judges with, [`deliver`] makes detections durable and ships them;
//! [`daemon`] starts and stops them all; [`cli`] is the command line. See ARCHITECTURE.md.

pub mod budget;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod deliver;
pub mod detect;
pub mod governor;
pub mod history;
pub mod response;
pub mod rules;
pub mod state;
pub mod telemetry;
