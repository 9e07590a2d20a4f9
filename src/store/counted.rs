//! Counts the embedded store's failed writes in
//! `criteo_proxy_store_errors_total{op="put"}` (its reads come from memory
//! and cannot fail); the shared store counts its own.

use std::io;
use std::sync::Arc;

use secrecy::SecretString;

use super::contract::{BoxFuture, Changes, Key, Lease, Listed};
use super::{Generation, Put, PutError, Record, TokenStore};
use crate::metrics::StoreErrors;

#[derive(Debug)]
pub(super) struct Counted {
    pub(super) inner: Arc<dyn TokenStore>,
    pub(super) errors: StoreErrors,
}

impl TokenStore for Counted {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }

    fn get<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, io::Result<Option<Record>>> {
        self.inner.get(key)
    }

    fn put<'a>(
        &'a self,
        key: Key<'a>,
        expected: Generation,
        put: Put<'a>,
    ) -> BoxFuture<'a, Result<Generation, PutError>> {
        Box::pin(async move {
            let done = self.inner.put(key, expected, put).await;
            if let Err(PutError::Io(_)) = &done {
                self.errors.inc("put");
            }
            done
        })
    }

    fn seed_presented<'a>(&'a self, seed: &'a SecretString) -> BoxFuture<'a, io::Result<bool>> {
        self.inner.seed_presented(seed)
    }

    fn lease<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, io::Result<Lease>> {
        self.inner.lease(key)
    }

    fn changes(&self) -> Changes {
        self.inner.changes()
    }

    fn all(&self) -> BoxFuture<'_, io::Result<Vec<Listed>>> {
        self.inner.all()
    }

    fn problem(&self) -> Option<String> {
        self.inner.problem()
    }
}
