//! The refresher tasks, one per tenant, started and stopped as tenants come
//! and go.
//!
//! A refresher is stopped by a signal it checks between token requests,
//! never aborted in the middle of one: aborting a refresh-token rotation
//! after Criteo answered would lose the new refresh token. Nor does anyone
//! wait for it on the spot: a reload (in the control task) only
//! signals, and the stopped refresher finishes its rotation and its save on
//! its own. A tenant started again under the same name begins only once its
//! previous refresher has ended, and reads the store after that, so that it
//! never presents a refresh token the previous one has just spent. At
//! shutdown, the refreshers get what is left of `server.shutdown_grace`.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{Grant, RefreshConfig, TenantConfig};
use crate::metrics::Metrics;
use crate::oauth::TokenEndpoint;
use crate::store::TokenStore;
use crate::tenant::Tenant;
use crate::token::refresher::{self, Target};
use crate::token::{Grants, RefreshGrant, TokenSource};

/// Token requests in flight at once, across all tenants.
const MAX_CONCURRENT_FETCHES: usize = 32;

#[derive(Debug)]
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
pub(crate) struct Refreshers {
    tasks: HashMap<Arc<str>, Running>,
    /// Stopped refreshers that may still be finishing a token request.
    stopping: HashMap<Arc<str>, JoinHandle<()>>,
    fetches: Arc<Semaphore>,
    refresh: RefreshConfig,
    endpoint: TokenEndpoint,
    pub(crate) store: Option<Arc<dyn TokenStore>>,
    metrics: Metrics,
    grants: Grants,
    /// Hands the shared store's change reports to the tenants' grants.
    watcher: Option<JoinHandle<()>>,
}

impl Refreshers {
    pub(crate) fn new(
        refresh: RefreshConfig,
        endpoint: TokenEndpoint,
        store: Option<Arc<dyn TokenStore>>,
        metrics: Metrics,
    ) -> Self {
        Self {
            tasks: HashMap::new(),
            stopping: HashMap::new(),
            fetches: Arc::new(Semaphore::new(MAX_CONCURRENT_FETCHES)),
            refresh,
            endpoint,
            store,
            metrics,
            grants: Grants::default(),
            watcher: None,
        }
    }

    /// With a shared store, starts (once) the task that tells each
    /// tenant's grant when another replica changed its record.
    fn watch_changes(&mut self) {
        let Some(store) = self.store.as_ref().filter(|s| s.shared()) else {
            return;
        };
        if self.watcher.is_some() {
            return;
        }
        let mut changes = store.changes();
        let grants = Arc::clone(&self.grants);
        self.watcher = Some(tokio::spawn(async move {
            while let Some(changed) = changes.next().await {
                if let Some(grant) = grants.load().get(&changed.name)
                    && grant.client_id() == &*changed.client_id
                {
                    grant.changed_elsewhere();
                }
            }
        }));
    }

    /// The registry of grants, kept current as refreshers start and stop.
    pub(crate) fn grants(&self) -> Grants {
        Arc::clone(&self.grants)
    }

    /// Starts the tenant's refresher: at once, or, if a refresher of the
    /// same name is still finishing, as soon as it has ended.
    pub(crate) fn start(&mut self, tenant: &Tenant, config: &TenantConfig) {
        self.watch_changes();
        self.stop(&tenant.name);
        let previous = self.stopping.remove(&tenant.name);
        let (stop, stop_rx) = watch::channel(false);
        let target = Target {
            name: Arc::clone(&tenant.name),
            cell: Arc::clone(&tenant.tokens),
            metrics: self.metrics.refresher(&tenant.name),
        };
        let (endpoint, store) = (self.endpoint.clone(), self.store.clone());
        let (refresh, fetches) = (self.refresh.clone(), Arc::clone(&self.fetches));
        let task = match previous {
            // Published now, so that onboarding finds the tenant's grant at once.
            None => {
                let source = source(config, endpoint, store, &self.grants);
                tokio::spawn(refresher::run(target, source, refresh, fetches, stop_rx))
            }
            Some(previous) => {
                let (config, grants) = (config.clone(), Arc::clone(&self.grants));
                tokio::spawn(async move {
                    let _ = previous.await;
                    if *stop_rx.borrow() {
                        return;
                    }
                    // Its grant reads the store only now, after the
                    // previous refresher's last save.
                    let source = source(&config, endpoint, store, &grants);
                    refresher::run(target, source, refresh, fetches, stop_rx).await;
                })
            }
        };
        self.tasks
            .insert(Arc::clone(&tenant.name), Running { stop, task });
    }

    /// Tells a tenant's refresher to stop once its current token request
    /// (if any) is over, without waiting for it. Its grant leaves the
    /// registry at once.
    pub(crate) fn stop(&mut self, name: &str) {
        self.stopping.retain(|_, task| !task.is_finished());
        if let Some((name, running)) = self.tasks.remove_entry(name) {
            let _ = running.stop.send(true);
            self.stopping.insert(name, running.task);
        }
        if self.grants.load().contains_key(name) {
            self.grants.rcu(|all| {
                let mut all = HashMap::clone(all);
                all.remove(name);
                all
            });
        }
    }
    /// Stops every refresher and waits, until `deadline`, for those still
    /// finishing a token request (a rotation and its save).
    pub(crate) async fn stop_all(&mut self, deadline: Instant) {
        let names: Vec<Arc<str>> = self.tasks.keys().cloned().collect();
        for name in names {
            self.stop(&name);
        }
        let mut unfinished = Vec::new();
        for (name, mut task) in self.stopping.drain() {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                unfinished.push(name);
            }
        }
        if !unfinished.is_empty() {
            unfinished.sort();
            tracing::error!(
                tenants = %unfinished.join(", "),
                "server.shutdown_grace ran out while these tenants were still calling the token endpoint; \
                 a refresh token rotated now may be lost (the tenant then needs a new consent)"
            );
        }
    }
}

/// The tenant's token source; a refresh-token tenant's grant is published
/// in the registry for onboarding.
fn source(
    config: &TenantConfig,
    endpoint: TokenEndpoint,
    store: Option<Arc<dyn TokenStore>>,
    grants: &Grants,
) -> TokenSource {
    match (config.grant, store) {
        (Grant::RefreshToken, Some(store)) => {
            let grant = Arc::new(RefreshGrant::new(config, endpoint, store));
            let name: Arc<str> = config.name.as_str().into();
            grants.rcu(|all| {
                let mut all = HashMap::clone(all);
                all.insert(Arc::clone(&name), Arc::clone(&grant));
                all
            });
            TokenSource::RefreshToken(grant)
        }
        _ => TokenSource::ClientCredentials {
            endpoint,
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
        },
    }
}
