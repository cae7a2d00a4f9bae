//! The Prometheus endpoint both daemons serve at `metrics_listen`: `GET /metrics` answers the
//! OpenMetrics text of a registry, rendered at each scrape. Plain HTTP, meant for loopback or
//! a monitoring network: it carries counts, never detections.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use prometheus_client;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// What a scrape answers.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Request heads are cut off here: a scrape needs a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
/// A client has this long to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more connections wait their turn in the backlog.
const MAX_CLIENTS: usize = 8;

/// Reads a `metrics_listen` value: `off` (or empty), or `HOST:PORT`.
pub fn parse_listen(value: &str) -> Result<Option<SocketAddr>, NotAnAddress> {
    let v = value.trim();
    if v.is_empty() || v.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .map_err(|_| NotAnAddress(value.chars().take(80).collect()))
}

/// A `metrics_listen` value that is neither an address nor `off`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an address (HOST:PORT, e.g. 127.0.0.1:9464) nor `off`")]
pub struct NotAnAddress(pub String);

/// The registry's exposition, ending with `# EOF`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(8 * 1024);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        // Only a collector's own encode can fail; say so in the exposition's place.
        return format!("# error encoding metrics: {e}\n# EOF\n");
    }
    out
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// The metrics address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr} (metrics_listen): {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Serves `GET /metrics` on `listener` until `stop` completes.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, stop: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            _ = &mut stop => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = &mut stop => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let registry = registry.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = answer(stream, &registry).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() >= MAX_REQUEST {
                return false;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    if !complete {
        return reply(
            &mut stream,
            "400 Bad Request",
            "text/plain",
            "bad request\n",
            true,
        )
        .await;
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render(registry);
            reply(&mut stream, "200 OK", CONTENT_TYPE, &body, method == "GET").await
        }
        ("GET" | "HEAD", _) => {
            reply(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "see /metrics\n",
                true,
            )
            .await
        }
        _ => {
            let body = "only GET /metrics\n";
            reply(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                body,
                true,
            )
            .await
        }
    }
}

async fn reply(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    with_body: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if with_body {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn listen_values() {
        assert_eq!(parse_listen("off"), Ok(None));
        assert_eq!(parse_listen(""), Ok(None));
        assert_eq!(
            parse_listen("127.0.0.1:9464"),
            Ok(Some("127.0.0.1:9464".parse().unwrap()))
        );
        let e = parse_listen("localhost").unwrap_err();
        assert_eq!(e, NotAnAddress("localhost".into()));
        assert!(e.to_string().contains("`localhost`"), "{e}");
    }

    #[tokio::test]
    async fn serves_the_exposition_and_refuses_the_rest() {
        let mut registry = Registry::default();
        let c: Counter = Counter::default();
        c.inc_by(3);
        registry.register("vedette_test_things", "Things", c);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = stop_signal();
        let server = tokio::spawn(serve(listener, Arc::new(registry), stop.1));
        let get = |req: &'static [u8]| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(req).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("vedette_test_things_total 3\n"), "{ok}");
        assert!(ok.ends_with("# EOF\n"), "{ok}");
        let missing = get(b"GET /other HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = get(b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let huge = get(&[b'a'; MAX_REQUEST + 100]).await;
        assert!(huge.starts_with("HTTP/1.1 400"), "{huge}");
        let _ = stop.0.send(());
        server.await.unwrap();
    }

    fn stop_signal() -> (
        tokio::sync::oneshot::Sender<()>,
        impl Future<Output = ()> + Send + 'static,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        (tx, async move {
            let _ = rx.await;
        })
    }
}
