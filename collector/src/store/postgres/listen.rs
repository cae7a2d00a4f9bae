//! Events between collectors sharing one database: `announce` is a `NOTIFY` on [`EVENTS`];
//! each collector `LISTEN`s on a connection of its own, on a thread of its own, and re-makes it
//! (with a `Resync`) when it breaks.

use std::time::Duration;

use postgres::Client;
use postgres::fallible_iterator::FallibleIterator;

use super::PgStore;
use super::pool::connect;
use crate::store::StoreEvent;

/// The channel collectors announce on.
pub(super) const EVENTS: &str = "vedette_events";

/// How often the listening thread looks at its stop token while nothing is announced.
const LISTEN_TICK: Duration = Duration::from_millis(250);

impl PgStore {
    /// Listens on a connection of its own; re-made (with a `Resync`) when it breaks.
    pub(super) fn listen(
        config: postgres::Config,
        tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
        tx: tokio::sync::mpsc::Sender<StoreEvent>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        while !stop.is_cancelled() {
            let listening = connect(&config, tls.as_ref()).and_then(|mut c| {
                c.batch_execute(&format!("LISTEN {EVENTS}"))?;
                Ok(c)
            });
            let mut client = match listening {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for other collectors' events; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            // Whatever was announced before this LISTEN (at start, or while reconnecting) is
            // found by comparing with the store.
            if tx.blocking_send(StoreEvent::Resync).is_err() {
                return;
            }
            match relay(&mut client, &tx, &stop) {
                Ok(()) => return,
                Err(e) => {
                    // Re-made (after a pause) rather than read again: the connection is suspect.
                    tracing::warn!(error = %e, "lost the connection listening for other collectors' events");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Hands every announced event to `tx` until `stop` fires or the receiver is gone (`Ok`), or
/// the connection fails (`Err`).
fn relay(
    client: &mut Client,
    tx: &tokio::sync::mpsc::Sender<StoreEvent>,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<(), postgres::Error> {
    while !stop.is_cancelled() {
        let mut notes = client.notifications();
        let mut it = notes.timeout_iter(LISTEN_TICK);
        while let Some(n) = it.next()? {
            let Some(event) = StoreEvent::decode(n.payload()) else {
                continue;
            };
            if tx.blocking_send(event).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}
