//! A bounded pool of connections: at most [`POOL_SIZE`] open, callers wait for a free one (up to
//! [`POOL_WAIT`]), so a slow database slows acks down instead of queueing work in memory.

use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use rustls_pki_types::pem::PemObject;

use crate::store::StoreError;

/// Most connections one collector holds.
const POOL_SIZE: usize = 8;

/// How long a caller waits for a free connection before the call fails (and is retried by
/// whoever called: an agent resends its batch).
const POOL_WAIT: Duration = Duration::from_secs(30);

/// A bounded pool of connections: at most [`POOL_SIZE`] open, callers wait for a free one.
pub(super) struct Pool {
    pub(super) config: postgres::Config,
    pub(super) tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    pub(super) idle: Mutex<Vec<Client>>,
    /// Connections open (idle or in use).
    pub(super) state: Mutex<usize>,
    pub(super) freed: Condvar,
}

impl Pool {
    pub(super) fn connect(&self) -> Result<Client, postgres::Error> {
        connect(&self.config, self.tls.as_ref())
    }

    pub(super) fn get(&self) -> Result<Client, StoreError> {
        let deadline = Instant::now() + POOL_WAIT;
        let mut open = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(c) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
                if !c.is_closed() {
                    return Ok(c);
                }
                *open -= 1;
                continue;
            }
            if *open < POOL_SIZE {
                *open += 1;
                drop(open);
                return self.connect().map_err(|e| {
                    *self.state.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
                    self.freed.notify_one();
                    StoreError::Pg(e)
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::PoolTimeout(POOL_WAIT));
            }
            open = self
                .freed
                .wait_timeout(open, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Returns a connection (a broken one is closed and its slot freed).
    pub(super) fn put(&self, client: Client) {
        let mut open = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if client.is_closed() {
            *open -= 1;
        } else {
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(client);
        }
        drop(open);
        self.freed.notify_one();
    }
}

/// Opens one connection, over TLS when the store has a TLS set-up.
pub(super) fn connect(
    config: &postgres::Config,
    tls: Option<&tokio_postgres_rustls::MakeRustlsConnect>,
) -> Result<Client, postgres::Error> {
    match tls {
        Some(tls) => config.connect(tls.clone()),
        None => config.connect(NoTls),
    }
}

/// A TLS set-up trusting only the CA certificates in `path` (PEM).
pub(super) fn tls_connector(
    path: &Path,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let fail = |e: String| StoreError::Tls(format!("`{}`: {e}", path.display()));
    let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| fail(e.to_string()))?;
        roots.add(cert).map_err(|e| fail(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(fail("no certificate in the file".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}
