//! The Vedette agent: watches files against YARA rules and indicators and streams detections to
//! the collector over mutual TLS.
#![forbid(unsafe_code)]

pub mod cache;
pub mod config;
pub mod counters;
pub mod enroll;
pub mod inventory;
pub mod procmon;
pub mod rules;
pub mod run;
pub mod scan;
pub mod ship;
pub mod spool;
pub mod standalone;
pub mod state;
pub mod walk;
pub mod watch;
