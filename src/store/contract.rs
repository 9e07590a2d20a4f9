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
use std::time::{Duration, SystemTime};

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

/// Which tenant: its name and its app's `client_id`. A shared store keys
/// records by both, so that deployments of different apps can share one
/// database; an embedded store serves one deployment and keys by name
/// (it records the `client_id` for `store copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Key<'a> {
    pub name: &'a str,
    pub client_id: &'a str,
}

/// A tenant whose record another process changed (see [`Changes`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Changed {
    pub name: Arc<str>,
    pub client_id: Arc<str>,
}

/// The access token that came with a refresh token: a shared store keeps
/// it with the refresh token, so that the other replicas serve it instead
/// of rotating the refresh token themselves. Embedded stores drop it.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    pub token: SecretString,
    /// When the token request that got it was sent (its lifetime counts
    /// from then), on the wall clock: other processes read it.
    pub requested_at: SystemTime,
    /// `expires_in`, as granted (already clamped).
    pub lifetime: Duration,
}

/// A tenant's record as read.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub refresh_token: SecretString,
    /// The token endpoint has refused this token (`invalid_grant`).
    pub rejected: bool,
    pub generation: Generation,
    /// Shared stores only: the access token stored with `refresh_token`.
    pub access: Option<Access>,
}

/// A record as listed by [`TokenStore::all`] (for `store copy`).
#[derive(Debug, Clone)]
pub(crate) struct Listed {
    pub name: String,
    /// Empty in a record written by a release that did not record it.
    pub client_id: String,
    pub record: Record,
}

impl Listed {
    /// Every record of a by-name map of `(client_id, record)`, as the
    /// embedded stores keep them.
    pub(crate) fn all_of(
        tenants: &std::collections::HashMap<String, (String, Record)>,
    ) -> Vec<Self> {
        tenants
            .iter()
            .map(|(name, (client_id, record))| Listed {
                name: name.clone(),
                client_id: client_id.clone(),
                record: record.clone(),
            })
            .collect()
    }
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
    /// The access token that came with `refresh_token` (kept by shared
    /// stores only).
    pub access: Option<&'a Access>,
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

/// Tenants whose record another process changed: the shared store's
/// replicas learn of a new token (or a refused one) from it.
#[derive(Debug)]
pub(crate) struct Changes {
    rx: Option<tokio::sync::mpsc::Receiver<Changed>>,
}

impl Changes {
    /// A feed with nothing to tell: a store no other process writes.
    pub(crate) fn never() -> Self {
        Self { rx: None }
    }

    /// A feed fed by the store's own task.
    pub(crate) fn from(rx: tokio::sync::mpsc::Receiver<Changed>) -> Self {
        Self { rx: Some(rx) }
    }

    /// The next tenant changed elsewhere; never completes on a store that
    /// no other process writes, `None` once the store has shut down.
    pub(crate) async fn next(&mut self) -> Option<Changed> {
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

    /// Whether other processes share it: its records then carry access
    /// tokens, its leases span processes and [`Self::changes`] yields.
    fn shared(&self) -> bool {
        false
    }

    /// The tenant's record, if any.
    fn get<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, io::Result<Option<Record>>>;

    /// Writes the tenant's record if it is still at `expected` (the
    /// generation last read), and returns the new generation.
    ///
    /// One exception, for shared stores: a rotation (a put that is not a
    /// rejection) read at `expected` is also taken over a *rejection*
    /// written against `expected`. Both presented the same refresh token;
    /// only one can have been answered with a new one, and that new token
    /// is the tenant's only valid one (the rejection came from a replica
    /// that presented it second, after losing its lease).
    fn put<'a>(
        &'a self,
        key: Key<'a>,
        expected: Generation,
        put: Put<'a>,
    ) -> BoxFuture<'a, Result<Generation, PutError>>;

    /// Whether `seed` was ever presented to the token endpoint (by any
    /// tenant): then it is spent, or it is a tenant's stored token.
    fn seed_presented<'a>(&'a self, seed: &'a SecretString) -> BoxFuture<'a, io::Result<bool>>;

    /// Takes the tenant's refresh lease, waiting while another holds it.
    /// A shared store waits a bounded time, then fails.
    fn lease<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, io::Result<Lease>>;

    /// Records other processes change. Called once, at start.
    fn changes(&self) -> Changes;

    /// Every tenant's record (for `store copy`).
    fn all(&self) -> BoxFuture<'_, io::Result<Vec<Listed>>>;

    /// SHA-256 (hex) of every config seed ever presented (for `store
    /// copy`): a copy without them would let a tenant whose stored token
    /// Criteo refused present its spent seed again.
    fn presented_seeds(&self) -> BoxFuture<'_, io::Result<Vec<String>>>;

    /// Records seeds as presented, by the hashes [`Self::presented_seeds`]
    /// lists (for `store copy`); durable when it returns.
    fn add_presented_seeds<'a>(&'a self, hashes: &'a [String]) -> BoxFuture<'a, io::Result<()>>;

    /// What is wrong with the store right now (unreachable, say), for
    /// `/readyz` and `/tenants`; `None` while it works.
    fn problem(&self) -> Option<String> {
        None
    }
}

/// The file store's leases: one async mutex per tenant.
#[derive(Debug, Default)]
pub(super) struct Leases(Mutex<HashMap<Box<str>, Arc<tokio::sync::Mutex<()>>>>);

impl Lease {
    /// A lease held while `held` lives (a guard, a task's handle …).
    pub(crate) fn new(held: impl Send + Sync + 'static) -> Self {
        Self {
            _held: Box::new(held),
        }
    }
}

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

    fn get<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, io::Result<Option<Record>>> {
        Box::pin(async move { Ok(FileStore::get(self, key.name)) })
    }

    fn put<'a>(
        &'a self,
        key: Key<'a>,
        expected: Generation,
        put: Put<'a>,
    ) -> BoxFuture<'a, Result<Generation, PutError>> {
        let tenant = key.name;
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

    fn lease<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, io::Result<Lease>> {
        Box::pin(async move { Ok(self.leases.take(key.name).await) })
    }

    /// Never yields: the lock file keeps every other process out.
    fn changes(&self) -> Changes {
        Changes::never()
    }

    fn all(&self) -> BoxFuture<'_, io::Result<Vec<Listed>>> {
        Box::pin(async move { Ok(self.list()) })
    }

    fn presented_seeds(&self) -> BoxFuture<'_, io::Result<Vec<String>>> {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let seeds = data.presented_seeds.iter().cloned().collect();
        Box::pin(std::future::ready(Ok(seeds)))
    }

    fn add_presented_seeds<'a>(&'a self, hashes: &'a [String]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(self.update(move |data| {
            data.presented_seeds.extend(hashes.iter().cloned());
            Ok::<_, io::Error>(())
        }))
    }
}

#[cfg(test)]
#[path = "contract_tests.rs"]
mod tests;
