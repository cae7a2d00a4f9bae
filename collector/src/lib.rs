//! The Vedette collector: enrolls agents under its own CA, stores their detections, and serves the
//! admin API that `vedettectl` (the vedette-ctl crate) uses.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod doctor;
pub mod identity;
pub mod init;
pub mod intel;
pub mod metrics;
pub mod orgs;
pub mod pki;
pub mod poll;
pub mod server;
pub mod sinks;
pub mod store;
pub mod users;
