//! The syslog sink (`[[export.syslog]]`): one RFC 5424 message per detection, its ECS JSON
//! document (under the organisation's sharing policy) as the message, over TCP with octet
//! counting (RFC 6587) or over TLS (RFC 5425).
//!
//! A batch is written on one connection and the cursor moves once the connection was closed
//! cleanly; a failure sends the batch again, so a receiver may see a message twice, which its
//! `event.sequence` tells apart.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use vedette_proto::v1::StoredDetection;
use vedette_share::sharing::{Sharing, ecs_document};

use super::ExportError;

/// How long connecting and each write may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// `local0`: what syslog receivers route on.
const FACILITY: u8 = 16;

/// Where a syslog sink sends.
pub(super) struct Receiver<'a> {
    pub address: &'a str,
    pub tls: bool,
    pub ca_cert: Option<&'a Path>,
}

/// Writes the messages of `batch` (none for organisations that share nothing); how many.
pub(super) fn send(
    receiver: &Receiver<'_>,
    batch: &[(u64, StoredDetection)],
    policy: &dyn Fn(&str) -> Option<Sharing>,
) -> Result<u64, ExportError> {
    let mut frames = Vec::new();
    let mut count = 0;
    for (seq, s) in batch {
        let Some(mut doc) = policy(&s.org).and_then(|p| ecs_document(s, &p)) else {
            continue;
        };
        doc["event"]["sequence"] = serde_json::json!(seq);
        let msg = message(s, &doc);
        frames.extend_from_slice(format!("{} ", msg.len()).as_bytes());
        frames.extend_from_slice(msg.as_bytes());
        count += 1;
    }
    if count == 0 {
        return Ok(0);
    }
    let fail =
        |e: std::io::Error| ExportError::Refused(format!("syslog {}: {e}", receiver.address));
    let addr = receiver
        .address
        .to_socket_addrs()
        .map_err(fail)?
        .next()
        .ok_or_else(|| fail(std::io::Error::other("the name has no address")))?;
    let tcp = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(fail)?;
    tcp.set_write_timeout(Some(TIMEOUT)).map_err(fail)?;
    tcp.set_read_timeout(Some(TIMEOUT)).map_err(fail)?;
    if receiver.tls {
        let config = tls_config(receiver.ca_cert).map_err(fail)?;
        let host = receiver
            .address
            .rsplit_once(':')
            .map_or(receiver.address, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let name = rustls_pki_types::ServerName::try_from(host)
            .map_err(|e| fail(std::io::Error::other(e.to_string())))?;
        let conn = rustls::ClientConnection::new(config, name)
            .map_err(|e| fail(std::io::Error::other(e.to_string())))?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        stream.write_all(&frames).map_err(fail)?;
        stream.conn.send_close_notify();
        stream.flush().map_err(fail)?;
    } else {
        let mut tcp = tcp;
        tcp.write_all(&frames).map_err(fail)?;
        tcp.flush().map_err(fail)?;
        tcp.shutdown(std::net::Shutdown::Write).map_err(fail)?;
    }
    Ok(count)
}

/// A client TLS set-up trusting the CA certificates in `ca` (PEM), or the public web PKI.
fn tls_config(ca: Option<&Path>) -> std::io::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem = std::fs::read(path)?;
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                let cert =
                    cert.map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(std::io::Error::other(format!(
                    "{}: no certificate in it",
                    path.display()
                )));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The RFC 5424 message of one detection: priority from its score, its time, the host it
/// was seen on (`-` when the policy names no host), app `vedette`, message id `detection`,
/// no structured data, the ECS document as the message.
pub(super) fn message(s: &StoredDetection, doc: &Value) -> String {
    let d = s.detection.as_ref();
    let score = d.map_or(0, |d| d.score);
    let severity: u8 = match score {
        80.. => 2,
        60..=79 => 3,
        40..=59 => 4,
        _ => 5,
    };
    let at = d.map_or(s.received_at_ms, |d| d.observed_at_ms).max(0) as u64;
    let time = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(at));
    let host: String = doc["host"]["name"]
        .as_str()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    let host = if host.is_empty() { "-".into() } else { host };
    format!(
        "<{}>1 {time} {host} vedette - detection - {doc}",
        FACILITY * 8 + severity
    )
}
