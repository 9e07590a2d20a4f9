//! The shared store: PostgreSQL at `store.url` (or `store.url_file`), for
//! several replicas serving the same tenants.
//!
//! One connection, shared by every task (`conn.rs`: kept up by a task of
//! its own, never waited for at start); the tables and their migrations
//! (`schema.rs`); per-tenant refresh leases held in the database
//! (`lease.rs`); the feed of tenants other replicas changed (`feed.rs`).
//! Every write is one statement conditional on the generation its writer
//! read, so a replica that lost its lease can never overwrite a newer
//! refresh token.

mod conn;
mod feed;
mod lease;
mod replicas;
mod schema;
mod sql;
mod tls;
mod url;

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::AbortHandle;
use tokio_postgres::Client;

use self::sql::{COLUMNS, INSERT, UPDATE, generation, record};
use super::contract::{BoxFuture, Changed, Changes, Key, Lease, Listed};
use super::{Generation, Put, PutError, Record, TokenStore, format};
use crate::config::SecretSource;
use crate::metrics::StoreErrors;

pub(crate) use self::replicas::{HEARTBEAT, Replicas};
pub(crate) use self::url::{parse as parse_url, redact};

/// Bound on every statement, from the caller's side.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// What a [`PgStore`] is started with.
#[derive(Debug, Clone)]
pub(crate) struct PgOptions {
    /// `store.url` or `store.url_file` (read at every connection).
    pub(crate) url: SecretSource,
    /// `store.lease`.
    pub(crate) lease: Duration,
    /// `store.poll_interval`.
    pub(crate) poll_interval: Duration,
    pub(crate) errors: StoreErrors,
}

/// The PostgreSQL store (see the module's doc). Dropping it closes its
/// connection (the database frees its leases at once).
pub(crate) struct PgStore {
    shared: Arc<Shared>,
    tasks: [AbortHandle; 2],
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("location", &self.shared.shown)
            .finish_non_exhaustive()
    }
}

/// What the store's tasks share.
pub(super) struct Shared {
    source: SecretSource,
    /// The URL, password redacted.
    shown: String,
    /// host:port/database of the last URL read.
    place: Mutex<String>,
    lease: Duration,
    poll_interval: Duration,
    /// The live connection, if any.
    client: watch::Sender<Option<Arc<Client>>>,
    problem: Mutex<Option<String>>,
    /// Connection attempts that failed so far.
    failures: watch::Sender<u64>,
    /// A statement timed out: the supervisor drops the connection.
    reset: Notify,
    /// Something changed (a notification, a poll): lease waiters retry.
    wake: Notify,
    feed_tx: mpsc::Sender<Changed>,
    feed_rx: Mutex<Option<mpsc::Receiver<Changed>>>,
    feed_state: tokio::sync::Mutex<feed::State>,
    errors: StoreErrors,
    #[cfg(test)]
    pause_renewal: std::sync::atomic::AtomicBool,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl PgStore {
    /// Starts the store's tasks and returns at once: the database is
    /// connected (and its schema created or migrated) as soon as it can
    /// be; until then every operation fails with an `io::Error` and
    /// [`TokenStore::problem`] says why. Must run inside a Tokio runtime.
    pub(crate) fn start(options: PgOptions) -> Self {
        let shown = match &options.url {
            SecretSource::Inline(u) => redact(u.expose_secret()),
            SecretSource::File(p) => match options.url.load() {
                Ok(u) => redact(u.expose_secret()),
                Err(_) => format!("the URL in {}", p.display()),
            },
        };
        let (feed_tx, feed_rx) = mpsc::channel(feed::CAPACITY);
        let (notes_tx, notes_rx) = mpsc::channel(feed::CAPACITY);
        let shared = Arc::new(Shared {
            source: options.url,
            place: Mutex::new(shown.clone()),
            problem: Mutex::new(Some(format!(
                "the token store database at {shown} is not connected yet"
            ))),
            shown,
            lease: options.lease,
            poll_interval: options.poll_interval,
            client: watch::Sender::new(None),
            failures: watch::Sender::new(0),
            reset: Notify::new(),
            wake: Notify::new(),
            feed_tx,
            feed_rx: Mutex::new(Some(feed_rx)),
            feed_state: tokio::sync::Mutex::default(),
            errors: options.errors,
            #[cfg(test)]
            pause_renewal: std::sync::atomic::AtomicBool::new(false),
        });
        let supervisor = tokio::spawn(conn::supervise(Arc::clone(&shared), notes_tx));
        let feed = tokio::spawn(feed::run(Arc::clone(&shared), notes_rx));
        Self {
            shared,
            tasks: [supervisor.abort_handle(), feed.abort_handle()],
        }
    }

    /// [`Self::start`], then waits up to `wait` for the database (for
    /// `store copy`, which has nothing to do without it): `Ok` once
    /// connected (schema checked), `Err` saying why at the first failed
    /// attempt (unreachable, refused, a certificate or schema problem) or
    /// when `wait` runs out.
    #[allow(dead_code)] // until `store copy`
    pub(crate) async fn connect(options: PgOptions, wait: Duration) -> Result<Self, String> {
        let store = Self::start(options);
        let mut live = store.shared.client.subscribe();
        let mut failures = store.shared.failures.subscribe();
        let up = tokio::time::timeout(wait, async {
            tokio::select! {
                up = live.wait_for(Option::is_some) => up.is_ok(),
                _ = failures.wait_for(|n| *n > 0) => false,
            }
        })
        .await;
        match up {
            Ok(true) => Ok(store),
            _ => Err(store
                .shared
                .problem()
                .unwrap_or_else(|| "the token store database is not connected".into())),
        }
    }

    /// Test hook: a holder that stops renewing its leases (paused).
    #[cfg(test)]
    pub(crate) fn pause_lease_renewal(&self) {
        self.shared
            .pause_renewal
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Shared {
    fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_problem(&self, problem: Option<String>) {
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = problem;
    }

    fn source_key(&self) -> &'static str {
        match self.source {
            SecretSource::Inline(_) => "store.url",
            SecretSource::File(_) => "store.url_file",
        }
    }

    fn renewal_paused(&self) -> bool {
        #[cfg(test)]
        return self.pause_renewal.load(std::sync::atomic::Ordering::SeqCst);
        #[cfg(not(test))]
        false
    }

    /// Runs `op` on the live connection, bounded by [`OP_TIMEOUT`]; a
    /// failure is counted under `label`. No connection: fails at once.
    async fn run<T, F, Fut>(&self, label: &'static str, op: F) -> io::Result<T>
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let client = self.client.borrow().clone();
        let Some(client) = client else {
            self.errors.inc(label);
            let problem = self
                .problem()
                .unwrap_or_else(|| "the token store database is not connected".into());
            return Err(io::Error::new(io::ErrorKind::NotConnected, problem));
        };
        let place = self.place.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match tokio::time::timeout(OP_TIMEOUT, op(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.errors.inc(label);
                let kind = if e.is_closed() {
                    io::ErrorKind::NotConnected
                } else {
                    io::ErrorKind::Other
                };
                Err(io::Error::new(
                    kind,
                    format!("token store database at {place}: {}", sql::full(&e)),
                ))
            }
            Err(_) => {
                self.errors.inc(label);
                // The peer may be gone without a word: start afresh.
                self.reset.notify_waiters();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "token store database at {place}: no answer within {}s",
                        OP_TIMEOUT.as_secs()
                    ),
                ))
            }
        }
    }

    async fn current(&self, key: Key<'_>) -> io::Result<Generation> {
        let (n, c) = (key.name.to_owned(), key.client_id.to_owned());
        let row = self
            .run("put", |client| async move {
                client
                    .query_opt(
                        "SELECT generation FROM criteo_proxy_tenants WHERE name = $1 AND client_id = $2",
                        &[&n, &c],
                    )
                    .await
            })
            .await?;
        Ok(row.map_or(Generation::NONE, |r| generation(r.get(0))))
    }
}

impl PgStore {
    /// Other sessions of running proxies on this database (`store copy`
    /// refuses to read a store a proxy is rotating).
    pub(crate) async fn running_proxies(&self) -> io::Result<i64> {
        let row = self
            .shared
            .run("get", |client| async move {
                client
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity \
                         WHERE application_name = 'criteo-token-proxy' AND pid <> pg_backend_pid()",
                        &[],
                    )
                    .await
            })
            .await?;
        Ok(row.get(0))
    }
}

// === impl PgStore ===

impl TokenStore for PgStore {
    /// The URL with its password redacted.
    fn location(&self) -> String {
        self.shared.shown.clone()
    }

    fn shared(&self) -> bool {
        true
    }

    fn get<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, io::Result<Option<Record>>> {
        Box::pin(async move {
            let (n, c) = (key.name.to_owned(), key.client_id.to_owned());
            let sql = format!(
                "SELECT {COLUMNS} FROM criteo_proxy_tenants WHERE name = $1 AND client_id = $2"
            );
            let row = self
                .shared
                .run("get", |client| async move {
                    client.query_opt(&sql, &[&n, &c]).await
                })
                .await?;
            Ok(row.map(|r| record(&r, 0)))
        })
    }

    fn put<'a>(
        &'a self,
        key: Key<'a>,
        expected: Generation,
        put: Put<'a>,
    ) -> BoxFuture<'a, Result<Generation, PutError>> {
        Box::pin(async move {
            let expected_sql = i64::try_from(expected.0)
                .map_err(|_| io::Error::other("the generation counter overflowed"))?;
            let (n, c) = (key.name.to_owned(), key.client_id.to_owned());
            let token = put.refresh_token.expose_secret().to_owned();
            let rejected = put.rejected;
            let access_token = put.access.map(|a| a.token.expose_secret().to_owned());
            let requested_at = put.access.map(|a| a.requested_at);
            let lifetime = put
                .access
                .map(|a| i64::try_from(a.lifetime.as_millis()).unwrap_or(i64::MAX));
            let seed = put.adopt_seed.then(|| format::seed_hash(&token));
            let sql = if expected == Generation::NONE {
                INSERT
            } else {
                UPDATE
            };
            let row = self
                .shared
                .run("put", |client| async move {
                    client
                        .query_opt(
                            sql,
                            &[
                                &n,
                                &c,
                                &token,
                                &rejected,
                                &expected_sql,
                                &access_token,
                                &requested_at,
                                &lifetime,
                                &seed,
                            ],
                        )
                        .await
                })
                .await?;
            match row {
                Some(row) => Ok(generation(row.get(0))),
                None => {
                    let current = self.shared.current(key).await?;
                    Err(PutError::Stale { expected, current })
                }
            }
        })
    }

    fn seed_presented<'a>(&'a self, seed: &'a SecretString) -> BoxFuture<'a, io::Result<bool>> {
        Box::pin(async move {
            let hash = format::seed_hash(seed.expose_secret());
            let row = self
                .shared
                .run("get", |client| async move {
                    client
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM criteo_proxy_presented_seeds WHERE hash = $1)",
                            &[&hash],
                        )
                        .await
                })
                .await?;
            Ok(row.get(0))
        })
    }

    /// Waits at most `store.lease` and a few seconds while another holds
    /// it; fails at once while the database is unreachable.
    fn lease<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, io::Result<Lease>> {
        Box::pin(lease::take(&self.shared, key))
    }

    /// Tenants whose generation rose, written by any replica: this one's
    /// own writes may appear too (the reader compares generations). Within
    /// milliseconds through `NOTIFY`, within `store.poll_interval`
    /// otherwise, and every change made while the connection was down once
    /// it is back. Called once: later calls get a feed that never yields.
    fn changes(&self) -> Changes {
        let rx = self
            .shared
            .feed_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        rx.map_or_else(Changes::never, Changes::from)
    }

    fn all(&self) -> BoxFuture<'_, io::Result<Vec<Listed>>> {
        Box::pin(async move {
            let sql = format!("SELECT name, client_id, {COLUMNS} FROM criteo_proxy_tenants");
            let rows = self
                .shared
                .run("get", |client| async move { client.query(&sql, &[]).await })
                .await?;
            Ok(rows
                .iter()
                .map(|r| Listed {
                    name: r.get(0),
                    client_id: r.get(1),
                    record: record(r, 2),
                })
                .collect())
        })
    }

    /// Sorted, as the embedded stores list them.
    fn presented_seeds(&self) -> BoxFuture<'_, io::Result<Vec<String>>> {
        Box::pin(async move {
            let rows = self
                .shared
                .run("get", |client| async move {
                    client
                        .query(
                            "SELECT hash FROM criteo_proxy_presented_seeds ORDER BY hash",
                            &[],
                        )
                        .await
                })
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    /// One statement: all of them or none.
    fn add_presented_seeds<'a>(&'a self, hashes: &'a [String]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let hashes = hashes.to_vec();
            self.shared
                .run("put", |client| async move {
                    client
                        .execute(
                            "INSERT INTO criteo_proxy_presented_seeds (hash) \
                             SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
                            &[&hashes],
                        )
                        .await
                })
                .await?;
            Ok(())
        })
    }

    /// "cannot reach the token store database at host:port/db: …" while
    /// it is down (never the password).
    fn problem(&self) -> Option<String> {
        self.shared.problem()
    }
}

#[cfg(test)]
#[path = "../../../tests/support/postgres.rs"]
pub(crate) mod harness;
#[cfg(test)]
pub(crate) mod tests;
