//! Replicas sharing a store share each tenant's rate limits: every
//! second this replica says it is alive in the database and counts the
//! replicas alive (itself included), and each paced tenant paces to
//! 1/that of its limits. The request path never waits for the database:
//! it reads only what this task last set.
//!
//! While the database cannot be reached the last count stays (never the
//! whole limit because the others became invisible). Before the first
//! count this replica paces to the whole limit: it may be alone, and
//! pacing to nothing would turn a database outage into an outage of every
//! paced tenant (the tokens it holds keep serving, like the store's other
//! rule); the first count comes as soon as the database answers, and a
//! 429 from Criteo meanwhile pauses the tenant until its reset.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;

use crate::store::{HEARTBEAT, Replicas, TokenStore};
use crate::tenant::Tenants;

/// The heartbeat task, and what it needs to say goodbye.
#[derive(Debug)]
pub(super) struct Sharing {
    replicas: Arc<Replicas>,
    /// Keeps the store's connection up until the row is deleted.
    _store: Arc<dyn TokenStore>,
    task: JoinHandle<()>,
}

impl Sharing {
    pub(super) fn start(
        store: Arc<dyn TokenStore>,
        replicas: Replicas,
        tenants: Arc<ArcSwap<Tenants>>,
    ) -> Self {
        let replicas = Arc::new(replicas);
        let task = tokio::spawn(beat(Arc::clone(&replicas), tenants));
        Self {
            replicas,
            _store: store,
            task,
        }
    }

    /// Stops the heartbeat and deletes this replica's row (best effort,
    /// within `within`): the others take its share at their next
    /// heartbeat rather than when its row expires.
    pub(super) async fn leave(self, within: Duration) {
        self.task.abort();
        match tokio::time::timeout(within, self.replicas.leave()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot remove this replica from the token store database; it expires there within seconds");
            }
            Err(_) => tracing::warn!(
                "no time left to remove this replica from the token store database; it expires there within seconds"
            ),
        }
    }
}

async fn beat(replicas: Arc<Replicas>, tenants: Arc<ArcSwap<Tenants>>) {
    let mut counted: Option<u32> = None;
    let mut failing = false;
    loop {
        match replicas.beat().await {
            Ok(n) => {
                if counted != Some(n) {
                    tracing::info!(
                        replicas = n,
                        "replicas sharing the tenants' rate limits: each paces to 1/{n} of them"
                    );
                }
                counted = Some(n);
                failing = false;
                // Every time: a tenant a reload rebuilt gets it too.
                tenants.load().set_share(n);
            }
            Err(e) if !failing => {
                failing = true;
                let share = counted.map_or("the whole".to_owned(), |n| format!("1/{n}"));
                tracing::warn!(error = %e, "cannot count the replicas sharing the rate limits; keeping {share} of each limit");
            }
            Err(_) => {}
        }
        if counted.is_some() {
            tokio::time::sleep(HEARTBEAT).await;
        } else {
            // The first count as soon as the database is up.
            let _ = tokio::time::timeout(HEARTBEAT, replicas.connected()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
