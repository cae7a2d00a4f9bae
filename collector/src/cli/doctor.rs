//! `vedette-collector doctor`: checks a collector's configuration, certificates, store and
//! addresses, read-only, and prints each problem with its fix.

use std::path::Path;
use std::time::Duration;

use vedette_ops::doctor::{Finding, private_mode};

use crate::config::Config;
use crate::store::StoreLocation;

/// Runs every check on the configuration at `path`.
pub fn run(path: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    let config = match Config::load(path) {
        Ok(c) => {
            out.push(Finding::ok(
                "config",
                format!("`{}` is valid", path.display()),
            ));
            c
        }
        Err(e) => {
            out.push(Finding::problem(
                "config",
                e.to_string(),
                "correct the keys named above (deploy/collector.toml documents every key)",
            ));
            return out;
        }
    };
    for key in [&config.ca_key, &config.server_key] {
        out.push(private_mode(
            key,
            "private key",
            "check the [tls] paths in the config",
        ));
    }
    let ca = read_cert(&config.ca_cert, "CA certificate", &mut out);
    let server = read_cert(&config.server_cert, "server certificate", &mut out);
    if let (Some(ca), Some(server)) = (ca, server) {
        check_certs(&ca, &server, &config, &mut out);
    }
    if config.maintainer_keys.is_empty() && !config.insecure_allow_unsigned_bundles {
        out.push(Finding::warning(
            "maintainers",
            "no maintainer_keys: rule bundles cannot be published",
            "add the rule maintainers' public keys (vedettectl keys generate, on their machines) to maintainer_keys",
        ));
    }
    check_store(&config.store, &mut out);
    check_address("listen", config.listen, &mut out);
    if let Some(c) = config.console_listen {
        check_address("console_listen", c, &mut out);
    }
    if let Some(m) = config.metrics_listen {
        check_address("metrics_listen", m, &mut out);
    }
    out
}

fn read_cert(path: &Path, what: &str, out: &mut Vec<Finding>) -> Option<Vec<u8>> {
    let parsed = std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| pem::parse(b).map_err(|e| e.to_string()));
    match parsed {
        Ok(p) => Some(p.contents().to_vec()),
        Err(e) => {
            out.push(Finding::problem(
                "certificate",
                format!("the {what} `{}`: {e}", path.display()),
                "check the [tls] paths in the config",
            ));
            None
        }
    }
}

fn check_certs(ca_der: &[u8], server_der: &[u8], config: &Config, out: &mut Vec<Finding>) {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (Ok((_, ca)), Ok((_, server))) = (
        X509Certificate::from_der(ca_der),
        X509Certificate::from_der(server_der),
    ) else {
        out.push(Finding::problem(
            "certificate",
            "the CA or server certificate does not parse",
            "check the [tls] paths in the config",
        ));
        return;
    };
    if server.verify_signature(Some(ca.public_key())).is_err() {
        out.push(Finding::problem(
            "certificate",
            format!(
                "`{}` was not issued by the CA `{}`",
                config.server_cert.display(),
                config.ca_cert.display()
            ),
            "point server_cert and ca_cert at the files `vedette-collector init` wrote together",
        ));
    } else {
        out.push(Finding::ok(
            "certificate",
            "the server certificate is issued by the CA",
        ));
    }
    let now = vedette_proto::now_ms() / 1000;
    for (what, cert, lead) in [
        ("CA certificate", &ca, 30 * 86_400),
        ("server certificate", &server, 30 * 86_400),
    ] {
        let until = cert.validity().not_after.timestamp();
        let date = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_secs(until.max(0) as u64),
        );
        if now > until {
            out.push(Finding::problem(
                "certificate",
                format!("the {what} expired on {date}: agents cannot connect"),
                "make a new collector PKI (vedette-collector init in a new directory) and enroll the agents again",
            ));
        } else if now + lead > until {
            out.push(Finding::warning(
                "certificate",
                format!("the {what} expires on {date}"),
                "plan a new PKI before then",
            ));
        } else {
            out.push(Finding::ok(
                "certificate",
                format!("the {what} is valid until {date}"),
            ));
        }
    }
}

fn check_store(location: &StoreLocation, out: &mut Vec<Finding>) {
    if let StoreLocation::Sqlite(path) = location
        && !path.exists()
    {
        out.push(Finding::warning(
            "store",
            format!("`{}` does not exist yet", path.display()),
            "`vedette-collector serve` creates it; check that its directory is writable by the collector's user",
        ));
        return;
    }
    let opened = crate::store::open_as(location, crate::store::Opener::Tool)
        .and_then(|s| s.list_agents().map(|a| a.len()));
    match opened {
        Ok(n) => out.push(Finding::ok(
            "store",
            format!("{} answers ({n} agents)", location.display()),
        )),
        Err(e) => out.push(Finding::problem(
            "store",
            format!("{}: {e}", location.display()),
            match location {
                StoreLocation::Sqlite(_) => {
                    "check the file's owner and mode (the collector's user must write it) and the free disk space"
                }
                StoreLocation::Postgres { .. } => {
                    "check that PostgreSQL runs and accepts this user (pg_hba.conf), and the URL in [store]"
                }
            },
        )),
    }
}

/// Whether the collector could listen at `addr`: free, or taken (by a running collector?).
fn check_address(key: &str, addr: std::net::SocketAddr, out: &mut Vec<Finding>) {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => out.push(Finding::ok("address", format!("{key} {addr} is free"))),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let answers =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok();
            out.push(Finding::warning(
                "address",
                format!(
                    "{key} {addr} is in use{}",
                    if answers { " (a running collector?)" } else { "" }
                ),
                "if the collector is not running, stop what holds the port (ss -ltnp) or change the address",
            ));
        }
        Err(e) => out.push(Finding::problem(
            "address",
            format!("cannot listen at {key} {addr}: {e}"),
            "use an address of this host; ports below 1024 need CAP_NET_BIND_SERVICE",
        )),
    }
}
