//! The Vedette agent: watches files against YARA rules and indicators and streams detections to
//! the collector over mutual TLS.
#![forbid(unsafe_code)]

pub mod config;
pub mod counters;
pub mod enroll;
pub mod inventory;
pub mod run;
pub mod scan;
pub mod ship;
pub mod state;
pub mod watch;
