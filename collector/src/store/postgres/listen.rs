//! Events between collectors sharing one database: `announce` is a `NOTIFY` on [`EVENTS`];
//! each collector `LISTEN`s on a connection of its own, in a task of its own, and re-makes it
//! (with a `Resync`) when it breaks.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc::Sender;
use tokio_postgres::{AsyncMessage, Config, NoTls};
use tokio_util::sync::CancellationToken;

use crate::store::StoreEvent;

/// The channel collectors announce on.
pub(super) const EVENTS: &str = "vedette_events";

/// How long to wait before listening again after the connection broke or could not be made.
const RETRY: Duration = Duration::from_secs(1);

/// Listens until `stop` fires or the receiver is gone; a connection that breaks is re-made
/// (after a pause), with a `Resync` since events may have been missed meanwhile.
pub(super) async fn listen(
    config: Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    tx: Sender<StoreEvent>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let result = match &tls {
            Some(tls) => listen_once(&config, tls.clone(), &tx, &stop).await,
            None => listen_once(&config, NoTls, &tx, &stop).await,
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "not listening for other collectors' events; retrying");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// Why listening stopped.
#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error("{0}")]
    Pg(#[from] tokio_postgres::Error),
    #[error("the server closed the connection")]
    Closed,
}

/// One listening connection: `Ok` when `stop` fired or the receiver is gone, `Err` when the
/// connection could not be made or broke.
async fn listen_once<T>(
    config: &Config,
    tls: T,
    tx: &Sender<StoreEvent>,
    stop: &CancellationToken,
) -> Result<(), ListenError>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = config.connect(tls).await?;
    // The connection is driven here: its messages are where notifications arrive.
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let sql = format!("LISTEN {EVENTS}");
    let listening = client.batch_execute(&sql);
    tokio::pin!(listening);
    loop {
        tokio::select! {
            r = &mut listening => { r?; break; }
            m = messages.next() => match m {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Err(ListenError::Closed),
            },
        }
    }
    // Whatever was announced before this LISTEN (at start, or while reconnecting) is found by
    // comparing with the store.
    if tx.send(StoreEvent::Resync).await.is_err() {
        return Ok(());
    }
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            m = messages.next() => m,
        };
        match message {
            Some(Ok(AsyncMessage::Notification(n))) => {
                let Some(event) = StoreEvent::decode(n.payload()) else {
                    continue;
                };
                if tx.send(event).await.is_err() {
                    return Ok(());
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ListenError::Closed),
        }
    }
}
