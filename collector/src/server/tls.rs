//! The collector's TLS endpoint: TLS 1.3 only, the fleet CA as the only trust root for client
//! certificates. A certificate is optional at the handshake (enrollment has none yet) but any
//! certificate presented must chain to the CA, or the handshake fails. Handlers then require one
//! through [`crate::peer::Peer::of`].

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tracing::{debug, warn};

use crate::metrics::{Metrics, Refused};

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more wait in the kernel's accept queue.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// Connections without a certificate closed because too many were open.
pub static REFUSED_UNAUTHENTICATED: AtomicU64 = AtomicU64::new(0);
/// Connections closed because `max_connections` were open.
static REFUSED_OVER_LIMIT: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read `{path}`: {source}")]
    Read { path: String, source: io::Error },
    #[error("`{path}` holds no usable {what}")]
    Empty { path: String, what: &'static str },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Read {
            path: path.display().to_string(),
            source: io::Error::other(e.to_string()),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Read {
            path: path.display().to_string(),
            source: io::Error::other(e.to_string()),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.display().to_string(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Builds the server's rustls configuration. Fails closed: without the CA there is no server.
pub fn server_config(
    ca_cert: &Path,
    server_cert: &Path,
    server_key: &Path,
) -> Result<ServerConfig, TlsError> {
    config_with_alpn(ca_cert, server_cert, server_key, b"h2")
}

/// The console's configuration: the same certificates and client-certificate check, over
/// HTTP/1.1.
pub fn console_config(
    ca_cert: &Path,
    server_cert: &Path,
    server_key: &Path,
) -> Result<ServerConfig, TlsError> {
    config_with_alpn(ca_cert, server_cert, server_key, b"http/1.1")
}

fn config_with_alpn(
    ca_cert: &Path,
    server_cert: &Path,
    server_key: &Path,
    alpn: &[u8],
) -> Result<ServerConfig, TlsError> {
    let ca = certs(ca_cert)?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(ca.iter().cloned());
    if added == 0 {
        return Err(TlsError::Empty {
            path: ca_cert.display().to_string(),
            what: "CA certificate (no trust roots loaded)",
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    // The chain ends with the CA so that an enrolling agent can pin it by fingerprint.
    let mut chain = certs(server_cert)?;
    chain.extend(ca);
    let key = PrivateKeyDer::from_pem_file(server_key).map_err(|e| TlsError::Read {
        path: server_key.display().to_string(),
        source: io::Error::other(e.to_string()),
    })?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// Connection limits the accept loop applies.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Open connections at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Open connections without a client certificate; more are closed after the handshake.
    pub max_unauthenticated: usize,
    /// A connection without a client certificate is closed this long after its handshake.
    pub unauthenticated_timeout: Duration,
}

/// An accepted connection, holding its share of the connection limits while it is open.
pub struct Conn {
    inner: TlsStream<TcpStream>,
    _slot: OwnedSemaphorePermit,
    _unauthenticated_slot: Option<OwnedSemaphorePermit>,
    /// For a connection without a client certificate: when it is closed.
    deadline: Option<Deadline>,
}

struct Deadline {
    sleep: Pin<Box<tokio::time::Sleep>>,
    metrics: Arc<Metrics>,
    /// Whether the closing was counted (once per connection).
    counted: bool,
}

impl Conn {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(d) = self.deadline.as_mut() else {
            return false;
        };
        if d.sleep.as_mut().poll(cx).is_pending() {
            return false;
        }
        if !d.counted {
            d.counted = true;
            d.metrics.refused(Refused::UnauthenticatedTimeout);
        }
        true
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "connection without a client certificate open too long",
    )
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts TCP connections and completes TLS handshakes off the accept loop, handing finished
/// streams to the gRPC server through a bounded channel. Stops when `shutdown` fires.
pub async fn accept_loop(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: ConnLimits,
    out: mpsc::Sender<Result<Conn, io::Error>>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let handshakes = Handshakes {
        acceptor: TlsAcceptor::from(config),
        out,
        unauthenticated: Arc::new(Semaphore::new(limits.max_unauthenticated)),
        timeout: limits.unauthenticated_timeout,
        metrics,
    };
    let permits = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Over `max_connections`: closed at once, before any TLS work, so that a storm of
        // reconnecting agents costs an accept each and they go back to their backoff instead
        // of waiting in the kernel's queue.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(tcp);
            handshakes.metrics.refused(Refused::ConnectionLimit);
            let n = REFUSED_OVER_LIMIT.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                warn!(%peer, refused_so_far = n, max_connections = limits.max_connections, "connection limit reached: closed");
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let handshakes = handshakes.clone();
        tokio::spawn(async move { handshakes.complete(tcp, peer, slot, permit).await });
    }
}

/// What each connection's handshake task needs.
#[derive(Clone)]
struct Handshakes {
    acceptor: TlsAcceptor,
    out: mpsc::Sender<Result<Conn, io::Error>>,
    unauthenticated: Arc<Semaphore>,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Handshakes {
    /// The TLS handshake of one connection (holding a handshake `permit` until it is done),
    /// then the connection handed on, or closed when it has no client certificate and the
    /// unauthenticated ones are at their limit.
    async fn complete(
        self,
        tcp: TcpStream,
        peer: std::net::SocketAddr,
        slot: OwnedSemaphorePermit,
        permit: OwnedSemaphorePermit,
    ) {
        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await;
        drop(permit);
        let stream = match handshake {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                self.metrics.refused(Refused::Handshake);
                debug!(%peer, error = %e, "TLS handshake refused");
                return;
            }
            Err(_) => {
                self.metrics.refused(Refused::Handshake);
                debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let certified = stream
            .get_ref()
            .1
            .peer_certificates()
            .is_some_and(|c| !c.is_empty());
        let (unauthenticated_slot, deadline) = if certified {
            (None, None)
        } else {
            let Ok(p) = self.unauthenticated.clone().try_acquire_owned() else {
                self.metrics.refused(Refused::UnauthenticatedLimit);
                // Logged at 1, 2, 4, 8... refusals: a flood does not flood the log.
                let n = REFUSED_UNAUTHENTICATED.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    warn!(%peer, refused_so_far = n, "too many connections without a client certificate: closed");
                }
                return;
            };
            let deadline = Deadline {
                sleep: Box::pin(tokio::time::sleep(self.timeout)),
                metrics: self.metrics.clone(),
                counted: false,
            };
            (Some(p), Some(deadline))
        };
        let conn = Conn {
            inner: stream,
            _slot: slot,
            _unauthenticated_slot: unauthenticated_slot,
            deadline,
        };
        let _ = self.out.send(Ok(conn)).await;
    }
}
