//! The refresher tasks, one per tenant, started and stopped as tenants come
//! and go. A refresher is stopped by a signal it checks between token
//! requests, never aborted in the middle of one: aborting a refresh-token
//! rotation after Criteo answered would lose the new refresh token.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::config::{Grant, RefreshConfig, TenantConfig};
use crate::oauth::TokenEndpoint;
use crate::store::TokenStore;
use crate::tenant::Tenant;
use crate::token::{RefreshGrant, TokenSource, refresher};

/// Token requests in flight at once, across all tenants.
const MAX_CONCURRENT_FETCHES: usize = 32;

#[derive(Debug)]
pub(crate) struct Refreshers {
    tasks: HashMap<Arc<str>, (watch::Sender<bool>, JoinHandle<()>)>,
    fetches: Arc<Semaphore>,
    pub(crate) refresh: RefreshConfig,
    endpoint: TokenEndpoint,
    pub(crate) store: Option<Arc<TokenStore>>,
}

impl Refreshers {
    pub(crate) fn new(
        refresh: RefreshConfig,
        endpoint: TokenEndpoint,
        store: Option<Arc<TokenStore>>,
    ) -> Self {
        Self {
            tasks: HashMap::new(),
            fetches: Arc::new(Semaphore::new(MAX_CONCURRENT_FETCHES)),
            refresh,
            endpoint,
            store,
        }
    }

    /// Builds the tenant's token source and starts its refresher.
    pub(crate) fn start(&mut self, tenant: Arc<Tenant>, config: &TenantConfig) {
        let source = match (config.grant, &self.store) {
            (Grant::RefreshToken, Some(store)) => {
                let grant = Arc::new(RefreshGrant::new(
                    config,
                    self.endpoint.clone(),
                    Arc::clone(store),
                ));
                tenant.refresh.store(Some(Arc::clone(&grant)));
                TokenSource::RefreshToken(grant)
            }
            _ => TokenSource::ClientCredentials {
                endpoint: self.endpoint.clone(),
                client_id: config.client_id.clone(),
                client_secret: config.client_secret.clone(),
            },
        };
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(refresher::run(
            Arc::clone(&tenant),
            source,
            self.refresh.clone(),
            Arc::clone(&self.fetches),
            stop_rx,
        ));
        self.tasks.insert(Arc::clone(&tenant.name), (stop, task));
    }

    /// Stops a tenant's refresher once its current token request (if any)
    /// is over.
    pub(crate) async fn stop(&mut self, name: &str) {
        if let Some((stop, task)) = self.tasks.remove(name) {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }

    pub(crate) async fn stop_all(&mut self) {
        for (_, (stop, _)) in self.tasks.iter() {
            let _ = stop.send(true);
        }
        for (_, (_, task)) in self.tasks.drain() {
            let _ = task.await;
        }
    }
}
