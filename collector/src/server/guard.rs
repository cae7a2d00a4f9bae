//! What the collector enforces before any handler runs. A request on a connection without a
//! client certificate may only enroll; its body is capped at [`MAX_ENROLL_BYTES`] as it arrives,
//! before anything is decoded. Every other request without a certificate is refused before its
//! body is read. (The connection itself is closed after the unauthenticated timeout: see
//! [`super::tls::Conn`].)

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Bytes, Service, http};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use vedette_proto::limits::MAX_ENROLL_BYTES;

use super::State;
use crate::metrics::Refused;

/// The one call allowed without a client certificate.
pub const ENROLL_PATH: &str = "/vedette.v1.AgentService/Enroll";
/// The gRPC frame header (compression flag and length) in front of the message.
const GRPC_FRAME_HEADER: usize = 5;

/// Wraps the gRPC router in a [`Guard`].
#[derive(Clone)]
pub struct GuardLayer {
    pub state: Arc<State>,
}

impl<S> tower_layer::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    state: Arc<State>,
}

/// The (verified) client certificate of the connection a request came on, DER.
fn client_cert<B>(req: &http::Request<B>) -> Option<Vec<u8>> {
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()))
}

/// Refuses a revoked certificate. The first time this collector sees a certificate: records a
/// client's, so that `certs list` shows certificates issued before records were kept; for an
/// agent's, revokes the ones it replaced ([`retire_older_certs`]).
fn check_cert(state: &Arc<State>, der: &[u8]) -> Result<(), Status> {
    let Some(serial) = crate::pki::serial_hex(der) else {
        return Err(Status::permission_denied("unreadable client certificate"));
    };
    if state.cert_revoked(&serial) {
        state.metrics.refused(Refused::Revoked);
        return Err(Status::permission_denied(format!(
            "this certificate (serial {serial}) has been revoked"
        )));
    }
    let first = state
        .seen_certs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(serial);
    if first && let Some(row) = crate::peer::Peer::cert_row(der, crate::store::now_ms()) {
        if row.kind == "client" {
            let store = state.store.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = store.record_cert(&row) {
                    tracing::warn!(error = %e, serial = %row.serial, "cannot record a client certificate");
                }
            });
        } else {
            tokio::spawn(retire_older_certs(state.clone(), row.subject, row.serial));
        }
    }
    Ok(())
}

/// An agent certificate in use revokes the agent's certificates issued before it: a renewed
/// certificate ends the one it replaced, so a stolen key's certificate (or one minted from it)
/// stops working once the agent uses its new one, and an agent refused for this is a sign of
/// theft.
async fn retire_older_certs(state: Arc<State>, agent: String, serial: String) {
    let (a, s) = (agent.clone(), serial.clone());
    let now = crate::store::now_ms();
    let retired = match super::blocking(&state.store, move |st| st.retire_older_certs(&a, &s, now))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(agent, error = %e.message(), "cannot retire the certificates a renewal replaced");
            return;
        }
    };
    for old in retired {
        tracing::info!(agent, serial = %old, replaced_by = %serial, "agent certificate replaced by a renewal: revoked");
        state.revoke_cert_here(&old);
        super::admin::announce(&state, crate::store::StoreEvent::CertRevoked(old)).await;
    }
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<http::Request<Body>> for Guard<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if let Some(der) = client_cert(&req) {
            if let Err(refused) = check_cert(&self.state, &der) {
                let refused = refused.into_http();
                return Box::pin(async move { Ok(refused) });
            }
            return Box::pin(self.inner.call(req));
        }
        if req.uri().path() != ENROLL_PATH {
            self.state.metrics.refused(Refused::NoCertificate);
            let refused = Status::unauthenticated("a client certificate is required").into_http();
            return Box::pin(async move { Ok(refused) });
        }
        let (parts, body) = req.into_parts();
        let capped = Capped {
            inner: body,
            left: MAX_ENROLL_BYTES + GRPC_FRAME_HEADER,
            metrics: self.state.metrics.clone(),
        };
        Box::pin(
            self.inner
                .call(http::Request::from_parts(parts, Body::new(capped))),
        )
    }
}

/// A request body that fails once more than `left` bytes have come.
struct Capped {
    inner: Body,
    left: usize,
    metrics: Arc<crate::metrics::Metrics>,
}

impl http_body::Body for Capped {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            if data.len() > self.left {
                self.left = 0;
                self.metrics.refused(Refused::OversizedEnrollment);
                return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                    "enrollment request larger than {MAX_ENROLL_BYTES} bytes"
                )))));
            }
            self.left -= data.len();
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
