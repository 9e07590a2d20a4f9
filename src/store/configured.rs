//! The store `[store]` names, opened; the embedded store's failed writes
//! counted in `criteo_proxy_store_errors_total{op="put"}` (its reads come
//! from memory and cannot fail; the shared store counts its own).

use std::io;
use std::sync::Arc;

use secrecy::SecretString;

use super::contract::{BoxFuture, Changes, Key, Lease, Listed};
use super::{Generation, Put, PutError, Record, TokenStore};
use crate::metrics::StoreErrors;

/// Opens the store `[store]` names: SQLite at `store.path`, PostgreSQL at
/// `store.url` / `store.url_file` (started, not waited for: it connects
/// as soon as it can). Failed operations count in `errors`.
pub(crate) fn open_configured(
    config: &crate::config::StoreConfig,
    errors: crate::metrics::StoreErrors,
) -> Result<Option<Arc<dyn TokenStore>>, super::StoreError> {
    if let Some(url) = &config.url {
        return Ok(Some(Arc::new(start_shared(url, config, errors))));
    }
    match &config.path {
        Some(path) => Ok(Some(Arc::new(Counted {
            inner: super::open(path)?,
            errors,
        }))),
        None => Ok(None),
    }
}

/// The store, if any, and this replica's row on a shared one.
type Opened = (Option<Arc<dyn TokenStore>>, Option<super::Replicas>);

/// [`open_configured`], and with a shared store this replica's row among
/// the replicas on it (to share the tenants' rate limits).
pub(crate) fn open_with_replicas(
    config: &crate::config::StoreConfig,
    errors: crate::metrics::StoreErrors,
) -> Result<Opened, super::StoreError> {
    match &config.url {
        Some(url) => {
            let store = start_shared(url, config, errors);
            let replicas = store.replicas();
            Ok((Some(Arc::new(store)), Some(replicas)))
        }
        None => Ok((open_configured(config, errors)?, None)),
    }
}

fn start_shared(
    url: &crate::config::SecretSource,
    config: &crate::config::StoreConfig,
    errors: crate::metrics::StoreErrors,
) -> super::PgStore {
    let store = super::PgStore::start(super::PgOptions {
        url: url.clone(),
        lease: config.lease,
        poll_interval: config.poll_interval,
        errors,
    });
    tracing::info!(store = %store.location(), "token store: PostgreSQL");
    store
}

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

    fn presented_seeds(&self) -> BoxFuture<'_, io::Result<Vec<String>>> {
        self.inner.presented_seeds()
    }

    fn add_presented_seeds<'a>(&'a self, hashes: &'a [String]) -> BoxFuture<'a, io::Result<()>> {
        self.inner.add_presented_seeds(hashes)
    }

    fn problem(&self) -> Option<String> {
        self.inner.problem()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::store::Generation;

    #[tokio::test]
    async fn a_failed_write_of_the_embedded_store_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.db");
        let config = crate::config::StoreConfig {
            path: Some(path.clone()),
            url: None,
            lease: std::time::Duration::from_secs(15),
            poll_interval: std::time::Duration::from_secs(1),
        };
        let metrics = Metrics::new(prometheus::Registry::new());
        let store = open_configured(&config, metrics.store_errors())
            .unwrap()
            .unwrap();
        std::fs::rename(&path, dir.path().join("aside.db")).unwrap();
        let rt = SecretString::from("rt-1");
        let put = Put {
            refresh_token: &rt,
            rejected: false,
            adopt_seed: false,
            access: None,
        };
        let key = Key {
            name: "acme",
            client_id: "app",
        };
        assert!(store.put(key, Generation::NONE, put).await.is_err());
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(
            text.contains("criteo_proxy_store_errors_total{op=\"put\"} 1"),
            "{text}"
        );
    }
}
