//! Connections to PostgreSQL: a `deadpool` of `tokio-postgres` clients, at most [`POOL_SIZE`]
//! open, driven by the collector's own runtime (a command-line tool without one gets a
//! one-thread runtime of the store's own). A connection that broke while idle (the database
//! restarted, say) is found closed when taken and replaced by a new one; one that breaks in use
//! fails that call, which its caller retries (an agent resends its batch). A caller waits for
//! a free connection up to [`POOL_WAIT`], so a slow database slows acks down instead of
//! queueing work in memory.
//!
//! Store calls run on blocking threads (`server::blocking`), never on the runtime's own:
//! [`Conn`] and [`Tx`] give them the synchronous calls the store is written with, each waiting
//! on the runtime for its query.

use std::path::Path;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, PoolError, RecyclingMethod, Runtime};
use rustls_pki_types::pem::PemObject;
use tokio::runtime::Handle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Config, NoTls, Row};

use crate::store::StoreError;

/// Most connections one collector holds.
const POOL_SIZE: usize = 8;

/// How long a caller waits for a free connection before the call fails (and is retried by
/// whoever called: an agent resends its batch).
const POOL_WAIT: Duration = Duration::from_secs(30);

/// How long making one connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The parameters of a statement.
pub(super) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// What the store's futures run on.
enum Rt {
    /// The collector's runtime (the store was opened inside it).
    Shared(Handle),
    /// A runtime of the store's own, for callers without one (`vedette-collector users`,
    /// `certs issue`, tests); shut down in the background when the store goes.
    Own(Option<tokio::runtime::Runtime>),
}

impl Rt {
    fn new() -> Result<Rt, StoreError> {
        if let Ok(h) = Handle::try_current() {
            return Ok(Rt::Shared(h));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("store-pg")
            .enable_all()
            .build()
            .map_err(StoreError::Thread)?;
        Ok(Rt::Own(Some(rt)))
    }

    fn handle(&self) -> Handle {
        match self {
            Rt::Shared(h) => h.clone(),
            Rt::Own(rt) => rt
                .as_ref()
                .map_or_else(Handle::current, |r| r.handle().clone()),
        }
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        // Dropping a runtime waits for its tasks, which is refused inside another runtime.
        if let Rt::Own(rt) = self
            && let Some(rt) = rt.take()
        {
            rt.shutdown_background();
        }
    }
}

/// The pool, and how to make connections outside it (the listening one).
pub(super) struct Pool {
    pool: deadpool_postgres::Pool,
    rt: Rt,
    pub(super) config: Config,
    pub(super) tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl Pool {
    pub(super) fn new(
        config: Config,
        tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    ) -> Result<Pool, StoreError> {
        let rt = Rt::new()?;
        let recycling = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &tls {
            Some(tls) => Manager::from_config(config.clone(), tls.clone(), recycling),
            None => Manager::from_config(config.clone(), NoTls, recycling),
        };
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        Ok(Pool {
            pool,
            rt,
            config,
            tls,
        })
    }

    /// A connection from the pool (waiting for a free one), for a blocking thread.
    pub(super) fn get(&self) -> Result<Conn, StoreError> {
        let rt = self.rt.handle();
        let client = rt.block_on(self.pool.get()).map_err(pool_error)?;
        Ok(Conn { client, rt })
    }

    /// Runs `f` as a task of the store's runtime.
    pub(super) fn spawn<F>(&self, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.rt.handle().spawn(f);
    }
}

fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
            StoreError::PoolTimeout(POOL_WAIT)
        }
        PoolError::Timeout(_) => StoreError::Pool(format!(
            "no connection to the database within {}s",
            CONNECT_TIMEOUT.as_secs()
        )),
        PoolError::Backend(e) => StoreError::Pg(e),
        other => StoreError::Pool(other.to_string()),
    }
}

/// The synchronous calls of a connection or a transaction (`$field` holds it), each waiting on
/// the runtime for its answer. Statements are prepared once per connection and kept (the
/// pool's statement cache): a query is then one round trip to the server, not two.
macro_rules! blocking_calls {
    ($ty:ty, $field:ident) => {
        // Not every call is made on both a connection and a transaction.
        #[allow(dead_code)]
        impl $ty {
            pub(super) fn query(
                &mut self,
                sql: &str,
                params: Params<'_>,
            ) -> Result<Vec<Row>, StoreError> {
                let on = &self.$field;
                Ok(self.rt.block_on(async {
                    let statement = on.prepare_cached(sql).await?;
                    on.query(&statement, params).await
                })?)
            }

            pub(super) fn query_one(
                &mut self,
                sql: &str,
                params: Params<'_>,
            ) -> Result<Row, StoreError> {
                let on = &self.$field;
                Ok(self.rt.block_on(async {
                    let statement = on.prepare_cached(sql).await?;
                    on.query_one(&statement, params).await
                })?)
            }

            pub(super) fn query_opt(
                &mut self,
                sql: &str,
                params: Params<'_>,
            ) -> Result<Option<Row>, StoreError> {
                let on = &self.$field;
                Ok(self.rt.block_on(async {
                    let statement = on.prepare_cached(sql).await?;
                    on.query_opt(&statement, params).await
                })?)
            }

            pub(super) fn execute(
                &mut self,
                sql: &str,
                params: Params<'_>,
            ) -> Result<u64, StoreError> {
                let on = &self.$field;
                Ok(self.rt.block_on(async {
                    let statement = on.prepare_cached(sql).await?;
                    on.execute(&statement, params).await
                })?)
            }

            pub(super) fn batch_execute(&mut self, sql: &str) -> Result<(), StoreError> {
                Ok(self.rt.block_on(self.$field.batch_execute(sql))?)
            }
        }
    };
}

blocking_calls!(Conn, client);
blocking_calls!(Tx<'_>, tx);

/// One pooled connection, back in the pool when dropped (closed if it broke).
pub(super) struct Conn {
    client: Object,
    rt: Handle,
}

impl Conn {
    /// The rows of a query as they stream in, so that a reader may stop early.
    pub(super) fn query_raw(&mut self, sql: &str, params: Params<'_>) -> Result<Rows, StoreError> {
        let stream = self
            .rt
            .block_on(self.client.query_raw(sql, params.iter().copied()))?;
        Ok(Rows {
            stream: Box::pin(stream),
            rt: self.rt.clone(),
        })
    }

    /// A transaction: committed by [`Tx::commit`], rolled back when dropped without.
    pub(super) fn transaction(&mut self) -> Result<Tx<'_>, StoreError> {
        let rt = self.rt.clone();
        let tx = rt.block_on(self.client.transaction())?;
        Ok(Tx { tx, rt })
    }
}

/// Rows streaming in from [`Conn::query_raw`].
pub(super) struct Rows {
    stream: std::pin::Pin<Box<tokio_postgres::RowStream>>,
    rt: Handle,
}

impl Rows {
    /// The next row; None after the last.
    pub(super) fn next(&mut self) -> Result<Option<Row>, StoreError> {
        use futures_util::StreamExt;
        Ok(self.rt.block_on(self.stream.next()).transpose()?)
    }
}

/// An open transaction on a pooled connection.
pub(super) struct Tx<'a> {
    tx: deadpool_postgres::Transaction<'a>,
    rt: Handle,
}

impl Tx<'_> {
    /// Queries sent together, none waiting for another's answer (the connection pipelines
    /// them: one round trip for all); their rows, in order.
    pub(super) fn query_all(
        &mut self,
        queries: &[(&str, Params<'_>)],
    ) -> Result<Vec<Vec<Row>>, StoreError> {
        let on = &self.tx;
        let each = queries.iter().map(|(sql, params)| async move {
            let statement = on.prepare_cached(sql).await?;
            on.query(&statement, params).await
        });
        Ok(self.rt.block_on(futures_util::future::try_join_all(each))?)
    }
}

impl Tx<'_> {
    pub(super) fn commit(self) -> Result<(), StoreError> {
        Ok(self.rt.block_on(self.tx.commit())?)
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::super::PgStore;

    /// With a CA certificate the connection must be TLS: a server (or someone in between)
    /// that answers the TLS request with `N` gets no plaintext session.
    #[test]
    fn with_a_ca_certificate_a_server_without_tls_is_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = [0u8; 8];
            s.read_exact(&mut request).unwrap();
            s.write_all(b"N").unwrap();
            // What the client sends after the refusal (a plaintext start-up would be here).
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            (request, rest)
        });
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["db.example".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let url = format!("postgres://vedette@127.0.0.1:{port}/vedette");
        let Err(e) = PgStore::open(&url, Some(&ca), crate::store::Opener::Server) else {
            panic!("a store opened over a connection without TLS");
        };
        let (request, rest) = server.join().unwrap();
        // The TLS request: length 8, code 80877103.
        assert_eq!(request, [0, 0, 0, 8, 4, 210, 22, 47], "{e}");
        assert!(
            rest.is_empty(),
            "the client went on in plaintext: {rest:?} ({e})"
        );
    }
}
