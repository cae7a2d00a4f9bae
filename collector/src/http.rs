//! Outbound HTTP, the same for intel polls and export sinks: one client per source or sink,
//! trusting its own CA when one is configured, never following redirects (credentials stay with
//! the host they were given for), and every response body capped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use crate::config::HttpAuth;

/// Largest response body read from a source or sink.
const MAX_BODY_BYTES: u64 = 64 << 20;
/// What TAXII 2.1 requests accept and send.
pub const TAXII: &str = "application/taxii+json;version=2.1";
/// How much of a refusing server's answer an error quotes.
const QUOTED: usize = 200;

/// Why a request to a source or sink failed; each names the request or the file.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("`{}`: {source}", path.display())]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{}`: no certificate in it", .0.display())]
    NoCertificate(PathBuf),
    #[error("{method} {url}: {source}")]
    Request {
        method: &'static str,
        url: String,
        source: Box<ureq::Error>,
    },
    #[error("{method} {url}: reading the body: {source}")]
    Body {
        method: &'static str,
        url: String,
        source: Box<ureq::Error>,
    },
    #[error("{method} {url}: HTTP {status}: the credentials were refused")]
    Credentials {
        method: &'static str,
        url: String,
        status: u16,
    },
    #[error("{method} {url}: HTTP {status}: {answer}")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        /// The start of what the server answered.
        answer: String,
    },
    #[error("{what}: not JSON: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },
}

/// An HTTP client trusting `ca` (PEM), or the public web PKI roots.
pub fn agent(ca: Option<&Path>) -> Result<ureq::Agent, HttpError> {
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|source| HttpError::CaFile {
            path: ca.to_owned(),
            source,
        })?;
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(HttpError::NoCertificate(ca.to_owned()));
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

/// The body of an answer (capped), or the error its status says.
pub(crate) fn answer(
    method: &'static str,
    url: &str,
    resp: &mut ureq::http::Response<ureq::Body>,
) -> Result<Vec<u8>, HttpError> {
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY_BYTES)
        .read_to_vec()
        .map_err(|e| HttpError::Body {
            method,
            url: url.to_string(),
            source: Box::new(e),
        })?;
    match status {
        200..=299 => Ok(body),
        401 | 403 => Err(HttpError::Credentials {
            method,
            url: url.to_string(),
            status,
        }),
        _ => Err(HttpError::Status {
            method,
            url: url.to_string(),
            status,
            answer: String::from_utf8_lossy(&body)
                .chars()
                .take(QUOTED)
                .collect(),
        }),
    }
}

/// GET `url`: the body (capped), and the TAXII date-added header.
pub fn get(
    agent: &ureq::Agent,
    url: &str,
    accept: &str,
    auth: &HttpAuth,
) -> Result<(Vec<u8>, Option<String>), HttpError> {
    let req = authorize(agent.get(url), auth).header("Accept", accept);
    let mut resp = req.call().map_err(|e| HttpError::Request {
        method: "GET",
        url: url.to_string(),
        source: Box::new(e),
    })?;
    let last = resp
        .headers()
        .get("X-TAXII-Date-Added-Last")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((answer("GET", url, &mut resp)?, last))
}

fn authorize<B>(req: ureq::RequestBuilder<B>, auth: &HttpAuth) -> ureq::RequestBuilder<B> {
    match auth {
        HttpAuth::None => req,
        HttpAuth::Basic { username, password } => req.header(
            "Authorization",
            format!("Basic {}", basic(username, password.expose())),
        ),
        HttpAuth::Bearer(token) => {
            req.header("Authorization", format!("Bearer {}", token.expose()))
        }
    }
}

/// The credentials of HTTP Basic authentication (RFC 7617).
fn basic(username: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
}

/// A TAXII request with a JSON answer: GET, or POST of `body`.
pub fn send_json(
    agent: &ureq::Agent,
    url: &str,
    auth: &HttpAuth,
    body: Option<&Value>,
) -> Result<Value, HttpError> {
    let (method, result) = match body {
        Some(b) => (
            "POST",
            authorize(agent.post(url), auth)
                .header("Accept", TAXII)
                .header("Content-Type", TAXII)
                .send(b.to_string()),
        ),
        None => (
            "GET",
            authorize(agent.get(url), auth)
                .header("Accept", TAXII)
                .call(),
        ),
    };
    let mut resp = result.map_err(|e| HttpError::Request {
        method,
        url: url.to_string(),
        source: Box::new(e),
    })?;
    json(&answer(method, url, &mut resp)?, url)
}

/// `bytes` as JSON; `what` names where they came from.
pub fn json(bytes: &[u8], what: &str) -> Result<Value, HttpError> {
    serde_json::from_slice(bytes).map_err(|source| HttpError::Json {
        what: what.to_string(),
        source,
    })
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
