//! The Vedette collector: enrolls agents under its own CA, stores their detections, and serves the
//! admin API that `vedettectl` (the vedette-ctl crate) uses.

pub mod cli;
pub mod config;
pub mod export;
pub mod http;
pub mod intel;
pub mod metrics;
pub mod orgs;
pub mod peer;
pub mod pki;
pub mod server;
pub mod store;
