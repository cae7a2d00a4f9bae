//! Opening a gRPC channel to the collector over TLS, shared by the agent and `vedettectl`.
//!
//! The collector's CA is the only trust root; with an identity, the channel is mutual TLS.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where to connect and whom to trust.
#[derive(Clone)]
pub struct ClientTls {
    /// PEM of the collector's CA.
    pub ca_pem: String,
    /// PEM certificate and key of this client, when it has one.
    pub identity: Option<(String, String)>,
}

/// The host part of `host:port`, `[v6]:port` or a bare host, for certificate name checks.
pub fn host_of(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) && !host.contains(':') => {
            host
        }
        _ => address,
    }
}

/// The endpoint for `address` (`host:port`), not yet connected.
pub fn endpoint(address: &str, tls: &ClientTls) -> Result<Endpoint, tonic::transport::Error> {
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&tls.ca_pem))
        .domain_name(host_of(address));
    if let Some((cert, key)) = &tls.identity {
        cfg = cfg.identity(Identity::from_pem(cert, key));
    }
    Ok(Endpoint::from_shared(format!("https://{address}"))?
        .tls_config(cfg)?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true))
}

/// Connects now, failing if the collector cannot be reached or refuses the handshake.
pub async fn connect(address: &str, tls: &ClientTls) -> Result<Channel, tonic::transport::Error> {
    endpoint(address, tls)?.connect().await
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_is_split_from_port() {
        assert_eq!(host_of("localhost:7443"), "localhost");
        assert_eq!(host_of("127.0.0.1:1"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7443"), "::1");
        assert_eq!(host_of("collector.example"), "collector.example");
    }
}
