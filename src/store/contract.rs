//! The interface the refreshers and onboarding talk to ([`TokenStore`]),
//! and its implementation by the JSON file ([`FileStore`]).
//!
//! The interface is what several replicas sharing one store need: every
//! write is conditional on the generation its writer last read (a writer
//! that lost its lease can never overwrite a newer token), a per-tenant
//! lease is held around each call to the token endpoint (one caller per
//! tenant at a time), and a feed of records other processes changed.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use secrecy::{ExposeSecret, SecretString};

use super::FileStore;

/// A boxed future, so that the store can be a trait object.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which version of a tenant's record a writer read. `Generation::NONE`:
/// no record (or, in the file, one written by a release that did not count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Generation(pub u64);

impl Generation {
    pub(crate) const NONE: Generation = Generation(0);
}

/// A tenant's record as read.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub refresh_token: SecretString,
    /// The token endpoint has refused this token (`invalid_grant`).
    pub rejected: bool,
    pub generation: Generation,
}

/// What a conditional put writes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Put<'a> {
    pub refresh_token: &'a SecretString,
    pub rejected: bool,
    /// The token is the config seed, about to be presented: recorded as
    /// presented in the same write, so it is never taken from the config
    /// again.
    pub adopt_seed: bool,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum PutError {
    /// The record changed since the writer read it: the write is refused.
    #[error(
        "the store holds a newer record for this tenant (generation {}, expected {})",
        current.0,
        expected.0
    )]
    Stale {
        expected: Generation,
        current: Generation,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A tenant's refresh lease: while it is held, no other holder of the same
/// store calls the token endpoint for that tenant. Released on drop.
pub(crate) struct Lease {
    _held: Box<dyn Send + Sync>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Lease")
    }
}

/// Names of tenants whose record another process changed.
///
/// Nothing reads it yet outside the tests: the file store has no other
/// writer, and the shared store (many replicas) is its first reader.
#[derive(Debug)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct Changes {
    rx: Option<tokio::sync::mpsc::UnboundedReceiver<Arc<str>>>,
}

#[cfg_attr(not(test), allow(dead_code))]
impl Changes {
    /// A feed with nothing to tell: a store no other process writes.
    pub(crate) fn never() -> Self {
        Self { rx: None }
    }

    /// The next tenant changed elsewhere; never completes on a store that
    /// no other process writes.
    pub(crate) async fn next(&mut self) -> Option<Arc<str>> {
        match &mut self.rx {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }
}

/// Where refresh tokens live. Losing the newest one loses the tenant: a
/// put returns only once the token is durable.
pub(crate) trait TokenStore: Send + Sync + fmt::Debug {
    /// Where the store is, for messages (never a secret).
    fn location(&self) -> String;

    /// The tenant's record, if any.
    fn get<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, io::Result<Option<Record>>>;

    /// Writes the tenant's record if it is still at `expected` (the
    /// generation last read), and returns the new generation.
    fn put<'a>(
        &'a self,
        tenant: &'a str,
        expected: Generation,
        put: Put<'a>,
    ) -> BoxFuture<'a, Result<Generation, PutError>>;

    /// Whether `seed` was ever presented to the token endpoint (by any
    /// tenant): then it is spent, or it is a tenant's stored token.
    fn seed_presented<'a>(&'a self, seed: &'a SecretString) -> BoxFuture<'a, io::Result<bool>>;

    /// Takes the tenant's refresh lease, waiting while another holds it.
    fn lease<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, io::Result<Lease>>;

    /// Records other processes change.
    #[cfg_attr(not(test), allow(dead_code))]
    fn changes(&self) -> Changes;
}

/// The file store's leases: one async mutex per tenant.
#[derive(Debug, Default)]
pub(super) struct Leases(Mutex<HashMap<Box<str>, Arc<tokio::sync::Mutex<()>>>>);

impl Leases {
    pub(super) async fn take(&self, tenant: &str) -> Lease {
        let lock = {
            let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(all.entry(tenant.into()).or_default())
        };
        Lease {
            _held: Box::new(lock.lock_owned().await),
        }
    }
}

// === impl FileStore ===

impl TokenStore for FileStore {
    fn location(&self) -> String {
        self.path().display().to_string()
    }

    fn get<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, io::Result<Option<Record>>> {
        Box::pin(async move { Ok(FileStore::get(self, tenant)) })
    }

    fn put<'a>(
        &'a self,
        tenant: &'a str,
        expected: Generation,
        put: Put<'a>,
    ) -> BoxFuture<'a, Result<Generation, PutError>> {
        Box::pin(self.update(move |data| {
            let current = Generation(data.tenants.get(tenant).map_or(0, |e| e.seq));
            if current != expected {
                return Err(PutError::Stale { expected, current });
            }
            let token = put.refresh_token.expose_secret();
            data.set(tenant, token, put.rejected);
            if put.adopt_seed {
                data.record_seed(token);
            }
            Ok(Generation(data.seq))
        }))
    }

    fn seed_presented<'a>(&'a self, seed: &'a SecretString) -> BoxFuture<'a, io::Result<bool>> {
        Box::pin(async move { Ok(self.seed_was_presented(seed)) })
    }

    fn lease<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, io::Result<Lease>> {
        Box::pin(async move { Ok(self.leases.take(tenant).await) })
    }

    /// Never yields: the lock file keeps every other process out.
    fn changes(&self) -> Changes {
        Changes::never()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each implementation in a folder of its own: the JSON file store
    /// and the SQLite database `store.path` opens by default.
    fn stores() -> Vec<(tempfile::TempDir, Arc<dyn TokenStore>)> {
        let (json, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let file: Arc<dyn TokenStore> =
            Arc::new(FileStore::open(&json.path().join("tokens.json")).unwrap());
        let sqlite = super::super::open(&db.path().join("tokens.db")).unwrap();
        assert!(format!("{sqlite:?}").contains("SqliteStore"));
        vec![(json, file), (db, sqlite)]
    }

    fn put(token: &SecretString) -> Put<'_> {
        Put {
            refresh_token: token,
            rejected: false,
            adopt_seed: false,
        }
    }

    /// Whether `fut` is ready at its first poll.
    async fn ready_now<F: Future>(fut: Pin<&mut F>) -> bool {
        tokio::select! {
            biased;
            _ = fut => true,
            () = std::future::ready(()) => false,
        }
    }

    #[tokio::test]
    async fn a_put_on_the_generation_last_read_is_taken_and_one_on_a_stale_one_refused() {
        for (_dir, store) in stores() {
            assert!(store.get("acme").await.unwrap().is_none());
            let (one, two) = (SecretString::from("rt-1"), SecretString::from("rt-2"));
            let first = store
                .put("acme", Generation::NONE, put(&one))
                .await
                .unwrap();
            let read = store.get("acme").await.unwrap().unwrap();
            assert_eq!(read.generation, first);
            assert_eq!(read.refresh_token.expose_secret(), "rt-1");

            let second = store.put("acme", first, put(&two)).await.unwrap();
            assert_ne!(second, first);
            let stale = store.put("acme", first, put(&one)).await.unwrap_err();
            assert!(
                matches!(stale, PutError::Stale { expected, current } if expected == first && current == second),
                "{stale}"
            );
            let refused = store.put("acme", Generation::NONE, put(&one)).await;
            assert!(matches!(refused, Err(PutError::Stale { .. })));
            let kept = store.get("acme").await.unwrap().unwrap();
            assert_eq!(kept.refresh_token.expose_secret(), "rt-2");
            assert_eq!(kept.generation, second);
        }
    }

    #[tokio::test]
    async fn adopting_a_seed_records_it_as_presented() {
        for (_dir, store) in stores() {
            let seed = SecretString::from("seed-1");
            assert!(!store.seed_presented(&seed).await.unwrap());
            let adopt = Put {
                adopt_seed: true,
                ..put(&seed)
            };
            store.put("acme", Generation::NONE, adopt).await.unwrap();
            assert!(store.seed_presented(&seed).await.unwrap());
        }
    }

    #[tokio::test]
    async fn a_lease_is_exclusive_per_tenant_until_released() {
        for (_dir, store) in stores() {
            let held = store.lease("acme").await.unwrap();
            let mut second = std::pin::pin!(store.lease("acme"));
            assert!(!ready_now(second.as_mut()).await, "a second holder waits");
            let other = std::pin::pin!(store.lease("other"));
            assert!(
                ready_now(other).await,
                "another tenant's lease is independent"
            );
            drop(held); // released on drop, as the refresher releases it
            let again = tokio::time::timeout(std::time::Duration::from_secs(10), second)
                .await
                .expect("granted once released");
            assert!(again.is_ok());
        }
    }

    #[tokio::test]
    async fn the_file_store_reports_no_changes_from_elsewhere() {
        for (_dir, store) in stores() {
            let mut changes = store.changes();
            let next = std::pin::pin!(changes.next());
            assert!(!ready_now(next).await);
        }
    }
}
