//! End-to-end: the real collector, vedettectl and agent processes over mutual TLS on 127.0.0.1,
//! real inotify, real SQLite, real YARA, certificates made by `vedette-collector init`.

mod backbone;
mod bench_smoke;
mod bundles;
mod classes;
mod code_map;
mod console;
mod delivery;
mod dns;
mod engine;
mod faults;
mod hardening;
mod hunts;
mod intel;
mod lifecycle;
mod onaccess;
mod ops;
mod output;
mod response;
mod retro;
mod scaleout;
mod tenancy;
mod triage;
