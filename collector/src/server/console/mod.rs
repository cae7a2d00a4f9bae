//! The web console and its JSON API, on `console_listen` (HTTPS with the collector's server
//! certificate).
//!
//! Operators authenticate with a client certificate from the fleet CA (the same ones
//! `vedettectl` uses) or with an account (`vedette-collector users add`) and a session cookie.
//! Every page and API call goes through the admin service with the caller's identity, so the
//! console sees and does exactly what that caller could with `vedettectl`, organisation scope
//! included. Every state change carries a CSRF token; every response carries a strict CSP.

mod actions;
mod alerts;
mod api;
pub mod auth;
mod hunts;
mod pages;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use tracing::{debug, info, warn};

use super::State as Shared;
use super::admin::AdminSvc;
use crate::peer::{OnBehalfOf, Peer};
use auth::{Keys, Who};

/// Console connections open at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 256;
/// Console connections open at once from one address; more are closed at once, so one client
/// cannot take every slot.
const MAX_CONNECTIONS_PER_IP: usize = 16;
/// How long a client may take to finish the TLS handshake, to send a request's headers, and
/// to send its body.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body (forms, JSON).
const MAX_BODY: usize = 64 * 1024;
/// Argon2 verifications at once (each takes tens of milliseconds of one core).
const LOGIN_CHECKS: usize = 2;

/// The API's routes (method, path), as `collector/openapi.json` documents them.
pub const API_ROUTES: &[(&str, &str)] = &[
    ("get", "/api/v1/session"),
    ("get", "/api/v1/alerts"),
    ("get", "/api/v1/alerts/{id}"),
    ("get", "/api/v1/detections"),
    ("get", "/api/v1/detections/{seq}"),
    ("get", "/api/v1/agents"),
    ("post", "/api/v1/agents/{id}/revoke"),
    ("get", "/api/v1/bundles"),
    ("get", "/api/v1/bundles/{version}/rollout"),
    ("get", "/api/v1/rules/slow"),
    ("get", "/api/v1/intel"),
    ("get", "/api/v1/audit"),
    ("get", "/api/v1/hunts"),
    ("post", "/api/v1/hunts"),
    ("get", "/api/v1/hunts/{id}"),
    ("get", "/api/v1/actions"),
    ("post", "/api/v1/actions"),
    ("post", "/api/v1/actions/{id}/{verb}"),
    ("get", "/api/v1/stats"),
    ("get", "/api/v1/openapi.json"),
];

/// The OpenAPI document of [`API_ROUTES`].
pub const OPENAPI: &str = include_str!("../../../openapi.json");

/// The content security policy of every response: nothing inline, nothing from elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What console handlers share.
pub(crate) struct Console {
    state: Arc<Shared>,
    admin: AdminSvc,
    keys: Keys,
    login_checks: Semaphore,
}

/// The client certificate (DER) of the connection a request came on.
#[derive(Clone)]
struct PeerCert(Option<Arc<Vec<u8>>>);

/// The address a console request came from (the TCP peer).
#[derive(Clone, Copy)]
pub(crate) struct ClientAddr(pub IpAddr);

/// An error page or JSON error with its status.
pub(crate) struct Failure {
    status: StatusCode,
    message: String,
}

impl Failure {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Failure {
        use tonic::Code;
        let status = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure::new(status, s.message())
    }
}

impl Console {
    /// An admin request made on behalf of the console's caller.
    fn request<T>(who: &Who, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.extensions_mut().insert(OnBehalfOf(who.peer.clone()));
        r
    }

    /// Who sent `req`: its client certificate, else its session cookie.
    /// What a request presents: its connection's client certificate and its session cookie.
    fn credentials(req: &Request) -> (Option<Arc<Vec<u8>>>, Option<String>) {
        let cert = req.extensions().get::<PeerCert>().and_then(|p| p.0.clone());
        let session = auth::cookie(req.headers(), auth::SESSION_COOKIE).map(str::to_string);
        (cert, session)
    }

    /// Who presented these credentials: the certificate first, else the session.
    async fn authenticate(
        &self,
        cert: Option<Arc<Vec<u8>>>,
        session: Option<String>,
    ) -> Result<Who, Failure> {
        if let Some(der) = cert {
            let row = Peer::cert_row(&der, 0).ok_or_else(|| {
                Failure::new(
                    StatusCode::FORBIDDEN,
                    "the client certificate names no identity",
                )
            })?;
            if self.state.cert_revoked(&row.serial) {
                return Err(Failure::new(
                    StatusCode::UNAUTHORIZED,
                    "this client certificate has been revoked",
                ));
            }
            let peer = Peer::from_der(&der).ok_or_else(|| {
                Failure::new(
                    StatusCode::FORBIDDEN,
                    "the client certificate names no identity",
                )
            })?;
            if matches!(peer, Peer::Agent { .. }) {
                return Err(Failure::new(
                    StatusCode::FORBIDDEN,
                    "agent certificates cannot use the console",
                ));
            }
            return Ok(Who {
                csrf: self.keys.cert_csrf(&row.serial),
                peer,
                account: false,
            });
        }
        let unauthenticated = || {
            Failure::new(
                StatusCode::UNAUTHORIZED,
                "sign in, or present an operator client certificate",
            )
        };
        let value = session.ok_or_else(unauthenticated)?;
        let name = Keys::session_user(&value).ok_or_else(unauthenticated)?;
        let user = super::blocking(&self.state.store, move |s| s.user(&name))
            .await?
            .ok_or_else(unauthenticated)?;
        let csrf = self
            .keys
            .check_session(&value, &user, crate::store::now_ms())
            .ok_or_else(unauthenticated)?;
        Ok(Who {
            peer: auth::account_peer(&user),
            csrf,
            account: true,
        })
    }
}

/// Serves the console on `listener` until `shutdown` fires.
pub(crate) async fn serve(
    state: Arc<Shared>,
    config: &crate::config::Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = super::tls::console_config(&config.ca_cert, &config.server_cert, &config.server_key)
        .context("cannot set up the console's TLS")?;
    let ca_key = std::fs::read(&config.ca_key)
        .with_context(|| format!("cannot read `{}`", config.ca_key.display()))?;
    let console = Arc::new(Console {
        admin: AdminSvc::new(state.clone()),
        state,
        keys: Keys::from_ca_key(&ca_key),
        login_checks: Semaphore::new(LOGIN_CHECKS),
    });
    let app = router(console);
    info!(address = %listener.local_addr()?, "serving the console");
    tokio::spawn(accept_loop(
        listener,
        TlsAcceptor::from(Arc::new(tls)),
        app,
        shutdown,
    ));
    Ok(())
}

fn router(console: Arc<Console>) -> Router {
    let private = Router::new()
        .route("/", get(pages::home))
        .route("/alerts", get(alerts::alerts))
        .route("/alerts/{id}", get(alerts::alert))
        .route("/alerts/{id}/verdict", post(alerts::judge))
        .route("/detections", get(pages::detections))
        .route("/detections/{seq}", get(pages::detection))
        .route("/chart", get(pages::chart))
        .route("/agents", get(pages::agents))
        .route("/agents/{id}", get(pages::agent))
        .route(
            "/agents/{id}/revoke",
            get(pages::revoke_confirm).post(pages::revoke),
        )
        .route("/rules", get(pages::rules))
        .route("/rules/diff", get(pages::rules_diff))
        .route("/intel", get(pages::intel))
        .route("/audit", get(pages::audit))
        .route("/hunts", get(hunts::hunts).post(hunts::start_form))
        .route("/hunts/{id}", get(hunts::hunt))
        .route(
            "/actions",
            get(actions::actions).post(actions::request_form),
        )
        .route("/actions/{id}/{verb}", post(actions::decide_form))
        .route("/logout", post(pages::logout))
        .route("/api/v1/session", get(api::session))
        .route("/api/v1/alerts", get(alerts::api_alerts))
        .route("/api/v1/alerts/{id}", get(alerts::api_alert))
        .route("/api/v1/detections", get(api::detections))
        .route("/api/v1/detections/{seq}", get(api::detection))
        .route("/api/v1/agents", get(api::agents))
        .route("/api/v1/agents/{id}/revoke", post(api::revoke))
        .route("/api/v1/bundles", get(api::bundles))
        .route("/api/v1/bundles/{version}/rollout", get(api::rollout))
        .route("/api/v1/rules/slow", get(api::slow_rules))
        .route("/api/v1/intel", get(api::intel))
        .route("/api/v1/audit", get(api::audit))
        .route(
            "/api/v1/hunts",
            get(hunts::api_hunts).post(hunts::api_start),
        )
        .route("/api/v1/hunts/{id}", get(hunts::api_hunt))
        .route(
            "/api/v1/actions",
            get(actions::api_actions).post(actions::api_request),
        )
        .route("/api/v1/actions/{id}/{verb}", post(actions::api_decide))
        .route("/api/v1/stats", get(api::stats))
        .route("/api/v1/openapi.json", get(api::openapi))
        .route_layer(middleware::from_fn_with_state(console.clone(), require));
    Router::new()
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/static/console.css", get(css))
        .route("/static/console.js", get(js))
        .merge(private)
        .fallback(not_found)
        .layer(middleware::from_fn(headers))
        .layer(middleware::from_fn(body_in_time))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(console)
}

/// Reads the request body whole within [`CLIENT_TIMEOUT`] (and [`MAX_BODY`]) before anything
/// handles it: a client trickling a body (`POST /login`, say) holds its connection for that
/// long at most.
async fn body_in_time(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(CLIENT_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => (StatusCode::PAYLOAD_TOO_LARGE, "request body too large").into_response(),
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time",
        )
            .into_response(),
    }
}

/// Connections open per client address; a slot is given back when its [`IpSlot`] drops.
#[derive(Default)]
struct PerIp(std::sync::Mutex<HashMap<IpAddr, usize>>);

impl PerIp {
    /// A slot for `ip`, or None when it holds [`MAX_CONNECTIONS_PER_IP`] already.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_IP {
            return None;
        }
        *n += 1;
        Some(IpSlot(self.clone(), ip))
    }
}

struct IpSlot(Arc<PerIp>, IpAddr);

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_ip = Arc::new(PerIp::default());
    let mut refused_logged = false;
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (tcp, addr) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "console: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(ip_slot) = per_ip.take(addr.ip()) else {
            if !refused_logged {
                warn!(%addr, limit = MAX_CONNECTIONS_PER_IP, "console: too many connections from one address; closing the extra ones");
                refused_logged = true;
            }
            drop(tcp);
            continue;
        };
        let (acceptor, app, shutdown) = (acceptor.clone(), app.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _slots = (permit, ip_slot);
            serve_connection(tcp, addr, acceptor, app, shutdown).await;
        });
    }
}

/// One console connection: the TLS handshake within [`CLIENT_TIMEOUT`], then HTTP/1.1 until
/// the client leaves or the collector stops.
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    addr: std::net::SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
    shutdown: CancellationToken,
) {
    let tls = match tokio::time::timeout(CLIENT_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%addr, error = %e, "console: TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| Arc::new(c.as_ref().to_vec()));
    let peer = PeerCert(cert);
    let client = ClientAddr(addr.ip());
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
        req.extensions_mut().insert(peer.clone());
        req.extensions_mut().insert(client);
        let mut app = app.clone();
        async move { app.call(req.map(Body::new)).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(CLIENT_TIMEOUT)
        .max_buf_size(MAX_BODY + 16 * 1024)
        .serve_connection(TokioIo::new(tls), svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(%addr, error = %e, "console connection ended");
            }
        }
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

/// Requires an authenticated caller, and on every state change its CSRF token (the
/// `X-CSRF-Token` header, or the `csrf` field of a form).
async fn require(State(console): State<Arc<Console>>, req: Request, next: Next) -> Response {
    let api = req.uri().path().starts_with("/api/");
    let (cert, session) = Console::credentials(&req);
    let who = match console.authenticate(cert, session).await {
        Ok(who) => who,
        Err(f) if f.status == StatusCode::UNAUTHORIZED && !api => {
            return pages::login_page(&console, StatusCode::UNAUTHORIZED, Some(&f.message));
        }
        Err(f) => return failure(api, f),
    };
    let mut req = if matches!(*req.method(), Method::GET | Method::HEAD) {
        req
    } else {
        match csrf_checked(req, &who).await {
            Ok(req) => req,
            Err(f) => {
                warn!(who = %who.peer, "console: state change without a valid CSRF token");
                return failure(api, f);
            }
        }
    };
    req.extensions_mut().insert(who);
    next.run(req).await
}

async fn csrf_checked(req: Request, who: &Who) -> Result<Request, Failure> {
    let refused = || Failure::new(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
    if req
        .headers()
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
    {
        return Err(refused());
    }
    if let Some(token) = req.headers().get("x-csrf-token") {
        return match token.to_str() {
            Ok(t) if auth::same_token(t, &who.csrf) => Ok(req),
            _ => Err(refused()),
        };
    }
    let is_form = req.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .starts_with(b"application/x-www-form-urlencoded")
    });
    if !is_form {
        return Err(refused());
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| Failure::new(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large"))?;
    let token = form_urlencoded_field(&bytes, "csrf").ok_or_else(refused)?;
    if !auth::same_token(&token, &who.csrf) {
        return Err(refused());
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// One field of an `application/x-www-form-urlencoded` body.
fn form_urlencoded_field(body: &[u8], name: &str) -> Option<String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// Adds the security headers to every response.
async fn headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

/// A failure as JSON (API) or as a page.
fn failure(api: bool, f: Failure) -> Response {
    if api {
        api::error(f)
    } else {
        pages::error_page(f)
    }
}

async fn not_found(req: Request) -> Response {
    failure(
        req.uri().path().starts_with("/api/"),
        Failure::new(StatusCode::NOT_FOUND, "no such page"),
    )
}

async fn css() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("static/console.css"),
    )
}

async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("static/console.js"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_documents_exactly_the_served_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in ["get", "post", "put", "patch", "delete"] {
                if item.get(method).is_some() {
                    documented.push((method.to_string(), path.clone()));
                }
            }
        }
        let mut served: Vec<(String, String)> = API_ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
    }

    #[test]
    fn form_fields_are_decoded() {
        assert_eq!(
            form_urlencoded_field(b"a=1&csrf=ab%2Bc&b=2", "csrf").as_deref(),
            Some("ab+c")
        );
        assert_eq!(form_urlencoded_field(b"a=1", "csrf"), None);
    }
}
