//! `vedette-agent doctor`: checks what the agent needs, read-only, and prints each problem
//! with its fix. Exit status 0 when nothing is wrong, 1 otherwise (warnings alone pass).

use std::path::{Path, PathBuf};
use std::time::Duration;

use vedette_ops::client::{ClientTls, connect};
use vedette_proto::v1::PingRequest;
use vedette_proto::v1::agent_service_client::AgentServiceClient;

use vedette_ops::doctor::{Finding, private_mode};

use crate::config::{Config, EventSource, RawConfig};
use crate::state::{Enrollment, StateDir};

/// Clock skew beyond which the collector's and the agent's times disagree too much:
/// detection times are off, and certificates can look not yet valid or expired.
const MAX_SKEW: Duration = Duration::from_secs(30);

/// Runs every check.
pub async fn run(state_dir: &Path, config: Option<&Path>) -> Vec<Finding> {
    let mut out = Vec::new();
    let settings = check_config(config, &mut out);
    let state = StateDir::new(state_dir);
    let enrolled = check_state(&state, &mut out);
    if let Some(enrollment) = enrolled {
        let collectors = match &settings {
            Some(s) if !s.collectors.is_empty() => s.collectors.clone(),
            _ => enrollment.collectors.clone(),
        };
        check_collectors(&state, &collectors, &mut out).await;
    }
    if let Some(s) = &settings {
        check_events(s, &mut out);
        check_dns(s, &mut out);
        check_history(&state, s.history_max_bytes, &mut out);
        check_disk(state_dir, s.spool_max_bytes, &mut out);
    } else {
        check_disk(state_dir, 256 * 1024 * 1024, &mut out);
    }
    out
}

fn check_config(path: Option<&Path>, out: &mut Vec<Finding>) -> Option<Config> {
    let raw = match path {
        None => RawConfig::default(),
        Some(p) => match RawConfig::load(p) {
            Ok(r) => r,
            Err(e) => {
                out.push(Finding::problem(
                    "config",
                    e.to_string(),
                    format!(
                        "correct `{}` (deploy/agent.toml documents every key)",
                        p.display()
                    ),
                ));
                return None;
            }
        },
    };
    match raw.validate(path) {
        Ok(s) => {
            let text = match path {
                Some(p) => format!("`{}` is valid", p.display()),
                None => "no --config given: defaults".to_string(),
            };
            out.push(Finding::ok("config", text));
            Some(s)
        }
        Err(e) => {
            out.push(Finding::problem(
                "config",
                e.to_string(),
                "correct the keys named above (deploy/agent.toml documents every key)",
            ));
            None
        }
    }
}

/// The state directory, the key's mode and the certificates; the enrollment when readable.
fn check_state(state: &StateDir, out: &mut Vec<Finding>) -> Option<Enrollment> {
    let reenroll = format!(
        "enroll again: vedette-agent enroll --collector HOST:PORT --token-file FILE --ca-sha256 HEX --state-dir {}",
        state.dir.display()
    );
    if !state.is_enrolled() {
        out.push(Finding::problem(
            "enrollment",
            format!("`{}` holds no enrollment", state.dir.display()),
            reenroll.replacen("enroll again", "enroll this host", 1),
        ));
        return None;
    }
    let enrollment = match std::fs::read_to_string(state.enrollment())
        .map_err(|e| e.to_string())
        .and_then(|t| toml::from_str::<Enrollment>(&t).map_err(|e| e.to_string()))
    {
        Ok(e) => e,
        Err(e) => {
            out.push(Finding::problem(
                "enrollment",
                format!("`{}`: {e}", state.enrollment().display()),
                reenroll,
            ));
            return None;
        }
    };
    out.push(Finding::ok(
        "enrollment",
        format!("agent {}", enrollment.agent_id),
    ));
    out.push(private_mode(&state.dir, "state directory", &reenroll));
    out.push(writable(&state.dir));
    out.push(private_mode(&state.key(), "private key", &reenroll));
    let ca = read_cert(&state.ca());
    let cert = read_cert(&state.cert());
    match (&ca, &cert) {
        (Err(e), _) | (_, Err(e)) => {
            out.push(Finding::problem("certificate", e.to_string(), reenroll));
        }
        (Ok(ca), Ok(cert)) => check_certificate(ca, cert, &state.cert(), &reenroll, out),
    }
    Some(enrollment)
}

/// Whether this process can write in the state directory (the spool, the scan cache and the
/// kept bundle live there): a file made and removed again.
fn writable(dir: &Path) -> Finding {
    let probe = dir.join(format!(".doctor-{}", std::process::id()));
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe);
    match made {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Finding::ok("state directory", "writable")
        }
        Err(e) => Finding::problem(
            "state directory",
            format!("cannot write in `{}`: {e}", dir.display()),
            "run the agent as the user that owns it, and check that its file system is mounted read-write (`findmnt -T DIR`)",
        ),
    }
}

fn read_cert(path: &Path) -> Result<Vec<u8>, CertFileError> {
    let text = std::fs::read(path).map_err(|source| CertFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let p = pem::parse(&text).map_err(|source| CertFileError::Pem {
        path: path.to_owned(),
        source,
    })?;
    Ok(p.contents().to_vec())
}

/// A certificate file that cannot be read.
#[derive(Debug, thiserror::Error)]
enum CertFileError {
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("`{}` is not PEM: {source}", path.display())]
    Pem {
        path: std::path::PathBuf,
        source: pem::PemError,
    },
}

fn check_certificate(
    ca_der: &[u8],
    cert_der: &[u8],
    cert_path: &Path,
    reenroll: &str,
    out: &mut Vec<Finding>,
) {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (Ok((_, ca)), Ok((_, cert))) = (
        X509Certificate::from_der(ca_der),
        X509Certificate::from_der(cert_der),
    ) else {
        out.push(Finding::problem(
            "certificate",
            "the certificate or the CA certificate does not parse",
            reenroll,
        ));
        return;
    };
    if cert.verify_signature(Some(ca.public_key())).is_err() {
        out.push(Finding::problem(
            "certificate",
            format!(
                "`{}` was not issued by the CA in ca.crt (wrong or replaced CA)",
                cert_path.display()
            ),
            format!("put the collector's own CA back in ca.crt, or {reenroll}"),
        ));
    } else {
        out.push(Finding::ok("certificate", "issued by the CA in ca.crt"));
    }
    let now = vedette_proto::now_ms() / 1000;
    let (from, until) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    let date = |t: i64| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64),
        )
    };
    if now > until {
        out.push(Finding::problem(
            "certificate",
            format!("the agent certificate expired on {}", date(until)),
            format!(
                "an expired certificate cannot be renewed: {reenroll} (with a new token from `vedettectl token create`)"
            ),
        ));
    } else if now < from {
        out.push(Finding::problem(
            "certificate",
            format!("the agent certificate is valid only from {}", date(from)),
            "this host's clock is behind: set it (systemd-timesyncd, chrony)",
        ));
    } else if now > from + (until - from) * 9 / 10 {
        out.push(Finding::warning(
            "certificate",
            format!(
                "the agent certificate expires on {} and was not renewed (renewal starts at two thirds of its life)",
                date(until)
            ),
            "check that the agent runs and reaches the collector",
        ));
    } else {
        out.push(Finding::ok(
            "certificate",
            format!("valid until {}", date(until)),
        ));
    }
}

async fn check_collectors(state: &StateDir, collectors: &[String], out: &mut Vec<Finding>) {
    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_default();
    let tls = ClientTls {
        ca_pem: read(state.ca()),
        identity: Some((read(state.cert()), read(state.key()))),
    };
    for address in collectors {
        check_collector(address, &tls, out).await;
    }
}

const REACH: &str = "check the address, that the collector runs there (systemctl status vedette-collector) and that no firewall blocks the port; the addresses are in the state directory's agent.toml, or `collectors` in the config";

async fn check_collector(address: &str, tls: &ClientTls, out: &mut Vec<Finding>) {
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(address),
    )
    .await;
    let unreachable = match tcp {
        Err(_) => format!("{address}: no answer within 5 s"),
        Ok(Err(e)) => format!("cannot reach {address}: {e}"),
        Ok(Ok(_)) => String::new(),
    };
    if !unreachable.is_empty() {
        out.push(Finding::problem("collector", unreachable, REACH));
        return;
    }
    let channel = match tokio::time::timeout(Duration::from_secs(10), connect(address, tls)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why = format!("{why}: {s}");
                source = s.source();
            }
            out.push(Finding::problem(
                "collector",
                format!("TLS with {address} failed: {why}"),
                "the collector's certificate must be signed by the CA in ca.crt and name this address: check ca.crt and the address, or enroll again",
            ));
            return;
        }
        Err(_) => {
            out.push(Finding::problem(
                "collector",
                format!("TLS with {address}: no answer within 10 s"),
                REACH,
            ));
            return;
        }
    };
    let before = vedette_proto::now_ms();
    let answer = AgentServiceClient::new(channel).ping(PingRequest {}).await;
    let after = vedette_proto::now_ms();
    match answer {
        Ok(r) => {
            let r = r.into_inner();
            out.push(Finding::ok(
                "collector",
                format!(
                    "{address} knows this agent as {} (collector {})",
                    r.agent_id, r.version
                ),
            ));
            out.push(clock_finding(r.now_ms - (before + after) / 2));
        }
        Err(s) => out.push(Finding::problem(
            "collector",
            format!("{address} refused this agent: {}", s.message()),
            "if the agent was revoked or the collector was set up again, enroll again with a new token",
        )),
    }
}

/// How far this host's clock is from the collector's (`skew_ms`: the collector's time minus
/// this host's).
fn clock_finding(skew_ms: i64) -> Finding {
    let skew = Duration::from_millis(skew_ms.unsigned_abs());
    if skew <= MAX_SKEW {
        return Finding::ok(
            "clock",
            format!("within {} ms of the collector's", skew.as_millis()),
        );
    }
    Finding::problem(
        "clock",
        format!(
            "this host's clock is {} {} the collector's",
            humantime::format_duration(Duration::from_secs(skew.as_secs())),
            if skew_ms > 0 { "behind" } else { "ahead of" }
        ),
        "synchronise the clocks (systemd-timesyncd or chrony, on both hosts)",
    )
}

/// The file-event source the agent will use, and its limits.
fn check_events(s: &Config, out: &mut Vec<Finding>) {
    let fanotify = may_fanotify();
    if s.event_source != EventSource::Inotify && fanotify {
        out.push(Finding::ok(
            "events",
            "fanotify available (CAP_SYS_ADMIN): no inotify watch limit applies",
        ));
        return;
    }
    if s.event_source == EventSource::Fanotify {
        out.push(Finding::problem(
            "events",
            "event_source = \"fanotify\" but this process lacks CAP_SYS_ADMIN",
            "run the agent as root (the systemd unit does), or set event_source = \"auto\"",
        ));
    }
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/fs/inotify/{name}"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    };
    let Some(limit) = read("max_user_watches") else {
        out.push(Finding::problem(
            "events",
            "cannot read /proc/sys/fs/inotify/max_user_watches: no inotify here?",
            "use a kernel with inotify, or run the agent with CAP_SYS_ADMIN for fanotify",
        ));
        return;
    };
    // Each watched directory takes one watch; count them, stopping past the limit.
    let mut dirs = 0u64;
    for root in &s.watch {
        let walk = walkdir_count(root, limit + 1 - dirs.min(limit));
        dirs += walk;
        if dirs > limit {
            break;
        }
    }
    if dirs > limit {
        out.push(Finding::problem(
            "events",
            format!(
                "fs.inotify.max_user_watches is {limit}, and the watched paths hold more directories than that: part of them would go unwatched"
            ),
            format!(
                "raise it: sysctl -w fs.inotify.max_user_watches={} and keep it in /etc/sysctl.d/90-vedette.conf; or run the agent as root for fanotify",
                (dirs * 2).max(524_288)
            ),
        ));
    } else {
        out.push(Finding::ok(
            "events",
            format!("inotify: {dirs} directories to watch, max_user_watches {limit}"),
        ));
    }
    if let Some(instances) = read("max_user_instances")
        && instances < 8
    {
        out.push(Finding::warning(
            "events",
            format!("fs.inotify.max_user_instances is only {instances}"),
            "sysctl -w fs.inotify.max_user_instances=128",
        ));
    }
}

/// Whether DNS can be watched: the packet socket needs CAP_NET_RAW.
fn check_dns(s: &Config, out: &mut Vec<Finding>) {
    if !s.dns {
        out.push(Finding::ok(
            "dns",
            "dns = false: domain indicators match command lines only",
        ));
        return;
    }
    match crate::detect::dnscap::Capture::open(std::time::Duration::from_millis(10)) {
        Ok(_) => out.push(Finding::ok(
            "dns",
            "DNS over UDP port 53 can be seen on every interface (packet socket)",
        )),
        Err(e) => out.push(Finding::warning(
            "dns",
            format!("no packet socket for DNS: {e}; domain indicators would match command lines only"),
            "run the agent as root with CAP_NET_RAW (the systemd unit grants it), or set dns = false",
        )),
    }
}

/// The history of files read and executables run: off, not yet made, or its size against
/// its cap and private.
fn check_history(state: &StateDir, max: Option<u64>, out: &mut Vec<Finding>) {
    let Some(max) = max else {
        out.push(Finding::ok(
            "history",
            "history_max_bytes = off: new hash indicators make every host rescan, and hunts are \
             answered with an error",
        ));
        return;
    };
    let dir = state.history();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        out.push(Finding::ok(
            "history",
            format!("none yet (`{}` is made at the first run)", dir.display()),
        ));
        return;
    };
    let bytes: u64 = entries
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let finding = private_mode(&dir, "history directory", "run doctor as the agent's user");
    if finding.level == vedette_ops::doctor::Level::Problem {
        out.push(finding);
        return;
    }
    out.push(Finding::ok(
        "history",
        format!(
            "{} MiB of {} MiB in `{}` (the oldest go first past it)",
            bytes >> 20,
            max >> 20,
            dir.display()
        ),
    ));
}

/// Directories under `root` (itself included), counting no further than `stop`.
fn walkdir_count(root: &Path, stop: u64) -> u64 {
    let mut count = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        count += 1;
        if count >= stop {
            return count;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(e.path());
            }
        }
    }
    count
}

/// Whether this process has CAP_SYS_ADMIN (bit 21 of its effective set).
fn may_fanotify() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 21) != 0)
}

fn check_disk(state_dir: &Path, spool_max: u64, out: &mut Vec<Finding>) {
    let at = if state_dir.exists() {
        state_dir
    } else {
        state_dir.parent().unwrap_or(Path::new("/"))
    };
    match rustix::fs::statvfs(at) {
        Ok(v) => {
            let free = v.f_bavail.saturating_mul(v.f_frsize);
            let mib = |b: u64| b / (1024 * 1024);
            if free < spool_max {
                out.push(Finding::warning(
                    "disk",
                    format!(
                        "{} MiB free where the spool lives ({}), less than its cap of {} MiB: while the collector is unreachable, detections could find no room",
                        mib(free),
                        at.display(),
                        mib(spool_max)
                    ),
                    "free space there, or lower spool_max_bytes in the config",
                ));
            } else {
                out.push(Finding::ok(
                    "disk",
                    format!(
                        "{} MiB free for the spool (cap {} MiB)",
                        mib(free),
                        mib(spool_max)
                    ),
                ));
            }
        }
        Err(e) => out.push(Finding::problem(
            "disk",
            format!("cannot read the file system of `{}`: {e}", at.display()),
            "create the state directory (vedette-agent enroll does)",
        )),
    }
}
