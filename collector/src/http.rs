//! Outbound HTTP, the same for intel polls and export sinks: one client per source or sink,
//! trusting its own CA when one is configured, never following redirects (credentials stay with
//! the host they were given for), and every response body capped.

use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use crate::config::HttpAuth;

/// Largest response body read from a source or sink.
const MAX_BODY_BYTES: u64 = 64 << 20;
/// What TAXII 2.1 requests accept and send.
pub const TAXII: &str = "application/taxii+json;version=2.1";

/// An HTTP client trusting `ca` (PEM), or the public web PKI roots.
pub fn agent(ca: Option<&std::path::Path>) -> Result<ureq::Agent, String> {
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", ca.display()));
        }
        tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    Ok(ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        // Credentials are never carried to wherever a redirect points.
        .max_redirects(0)
        .tls_config(tls.build())
        .build()
        .into())
}

/// GET `url`: the status, the body (capped), and the TAXII date-added header.
pub fn get(
    agent: &ureq::Agent,
    url: &str,
    accept: &str,
    auth: &HttpAuth,
) -> Result<(Vec<u8>, Option<String>), String> {
    let req = authorize(agent.get(url), auth).header("Accept", accept);
    let mut resp = req.call().map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status().as_u16();
    let last = resp
        .headers()
        .get("X-TAXII-Date-Added-Last")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY_BYTES)
        .read_to_vec()
        .map_err(|e| format!("GET {url}: reading the body: {e}"))?;
    match status {
        200..=299 => Ok((body, last)),
        401 | 403 => Err(format!(
            "GET {url}: HTTP {status}: the credentials were refused"
        )),
        _ => Err(format!(
            "GET {url}: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(200)
                .collect::<String>()
        )),
    }
}

fn authorize<B>(req: ureq::RequestBuilder<B>, auth: &HttpAuth) -> ureq::RequestBuilder<B> {
    match auth {
        HttpAuth::None => req,
        HttpAuth::Basic { username, password } => req.header(
            "Authorization",
            format!("Basic {}", basic(username, password)),
        ),
        HttpAuth::Bearer(token) => req.header("Authorization", format!("Bearer {token}")),
    }
}

/// The credentials of HTTP Basic authentication (RFC 7617).
fn basic(username: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
}

/// A TAXII request with a JSON answer: GET, or POST of `body`.
pub fn send_json(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    auth: &HttpAuth,
    body: Option<&Value>,
) -> Result<Value, String> {
    let result = match body {
        Some(b) => authorize(agent.post(url), auth)
            .header("Accept", TAXII)
            .header("Content-Type", TAXII)
            .send(b.to_string()),
        None => authorize(agent.get(url), auth)
            .header("Accept", TAXII)
            .call(),
    };
    let mut resp = result.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY_BYTES)
        .read_to_vec()
        .map_err(|e| format!("{method} {url}: reading the body: {e}"))?;
    if !(200..300).contains(&status) {
        return Err(format!(
            "{method} {url}: HTTP {status}: {}",
            String::from_utf8_lossy(&text)
                .chars()
                .take(200)
                .collect::<String>()
        ));
    }
    json(&text, url)
}

pub fn json(bytes: &[u8], what: &str) -> Result<Value, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("{what}: not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_base64() {
        assert_eq!(basic("user1", "Password1"), "dXNlcjE6UGFzc3dvcmQx");
        assert_eq!(basic("a", ""), "YTo=");
    }
}
