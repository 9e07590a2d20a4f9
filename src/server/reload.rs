//! Hot reload: on SIGHUP, or when the configuration file or a secret file
//! changes (Kubernetes updates mounted secrets by swapping a symlink), the
//! configuration is read and validated again. An invalid one is rejected
//! with one log line and the running one keeps serving. A valid one
//! replaces the tenant set at once: added tenants start, removed ones stop,
//! changed ones are rebuilt, unchanged ones keep their tokens. Tenants stuck
//! on rejected credentials or a missing consent are retried at once, since
//! a changed secret or seed file may be what they were waiting for.
//! Settings outside `[tenants]` that need new sockets or clients are
//! reported as needing a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use super::refreshers::Refreshers;
use crate::config::{Config, SecretSource};
use crate::metrics::Metrics;
use crate::tenant::Tenants;
use crate::token::State;

/// How often watched files are checked for changes.
pub(crate) const POLL: Duration = Duration::from_secs(2);

/// A watched file as last seen: where its link led, when it changed, its
/// size. `None` when it could not be read.
type Seen = Vec<(PathBuf, Option<(PathBuf, SystemTime, u64)>)>;

#[derive(Debug)]
pub(crate) struct Reloader {
    path: PathBuf,
    running: Config,
    tenants: Arc<ArcSwap<Tenants>>,
    metrics: Metrics,
    seen: Seen,
}

fn watched(path: &Path, config: &Config) -> Vec<PathBuf> {
    let mut files = vec![path.to_owned()];
    let mut secret = |s: &SecretSource| {
        if let SecretSource::File(p) = s {
            files.push(p.clone());
        }
    };
    for t in &config.tenants {
        secret(&t.client_secret);
        if let Some(seed) = &t.seed_refresh_token {
            secret(seed);
        }
    }
    if let Some(c) = &config.consent {
        secret(&c.signing_secret);
    }
    if let Some(r) = &config.upstream.extra_roots {
        files.push(r.path.clone());
    }
    files
}

/// [`look`] on the blocking pool: the control task never waits on a disk.
async fn look_async(files: Vec<PathBuf>) -> Seen {
    tokio::task::spawn_blocking(move || look(files))
        .await
        .unwrap_or_default()
}

fn look(files: Vec<PathBuf>) -> Seen {
    files
        .into_iter()
        .map(|f| {
            let state = std::fs::canonicalize(&f).ok().and_then(|target| {
                let meta = std::fs::metadata(&target).ok()?;
                Some((target, meta.modified().ok()?, meta.len()))
            });
            (f, state)
        })
        .collect()
}

impl Reloader {
    pub(crate) async fn new(
        path: PathBuf,
        running: Config,
        tenants: Arc<ArcSwap<Tenants>>,
        metrics: Metrics,
    ) -> Self {
        let seen = look_async(watched(&path, &running)).await;
        Self {
            path,
            running,
            tenants,
            metrics,
            seen,
        }
    }

    /// True when a watched file changed since the last look.
    pub(crate) async fn files_changed(&mut self) -> bool {
        let now = look_async(watched(&self.path, &self.running)).await;
        if now != self.seen {
            self.seen = now;
            true
        } else {
            false
        }
    }

    pub(crate) async fn reload(&mut self, refreshers: &mut Refreshers, trigger: &str) {
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(Some(&path))).await;
        let config = match loaded {
            Ok(Ok(c)) => c,
            Err(e) => {
                tracing::error!(trigger, error = %e, "configuration reload failed");
                return;
            }
            Ok(Err(e)) => {
                tracing::error!(
                    trigger,
                    problems = %e.problems.join("; "),
                    "configuration reload rejected; the running configuration keeps serving"
                );
                return;
            }
        };
        let needs_store = config
            .tenants
            .iter()
            .any(|t| t.grant == crate::config::Grant::RefreshToken);
        if needs_store && refreshers.store.is_none() {
            let (store, errors) = (config.store.clone(), self.metrics.store_errors());
            match tokio::task::spawn_blocking(move || crate::store::open_configured(&store, errors))
                .await
            {
                Ok(Ok(s)) => refreshers.store = s,
                Ok(Err(e)) => {
                    tracing::error!(trigger, error = %e, "configuration reload rejected");
                    return;
                }
                Err(e) => {
                    tracing::error!(trigger, error = %e, "configuration reload rejected");
                    return;
                }
            }
        }
        self.warn_restart_only(&config);

        let previous = self.tenants.load_full();
        let (tenants, changes) = Tenants::rebuild(&config, &self.metrics, Some(&previous));
        // Stopping only signals: a refresher in the middle of a rotation
        // finishes it (and its save) on its own, and its successor waits
        // for it. The reload (in the control task) never waits for one.
        for name in &changes.stop {
            refreshers.stop(name);
        }
        // Kept tenants stuck on rejected credentials or a missing consent
        // start over: their secret or seed file may have been fixed.
        let mut restart = Vec::new();
        for t in tenants.iter() {
            let new = changes.start.iter().any(|(s, _)| Arc::ptr_eq(s, t));
            let state = t.tokens.health().state;
            if !new
                && matches!(state, State::Rejected | State::ConsentRequired)
                && let Some(cfg) = config.tenants.iter().find(|c| *c.name == *t.name)
            {
                restart.push((Arc::clone(t), cfg.clone()));
            }
        }
        for (t, _) in &restart {
            refreshers.stop(&t.name);
        }
        let (added, removed) = (changes.start.len(), changes.stop.len());
        self.tenants.store(Arc::new(tenants));
        // A removed tenant's series would otherwise stay in /metrics forever.
        for gone in previous.iter() {
            if !config.tenants.iter().any(|c| *c.name == *gone.name) {
                self.metrics.forget(&gone.name);
            }
        }
        for (t, cfg) in changes.start.iter().chain(restart.iter()) {
            refreshers.start(t, cfg);
        }
        tracing::info!(
            trigger,
            tenants = config.tenants.len(),
            started = added,
            stopped = removed,
            retried = restart.len(),
            "configuration reloaded"
        );
        self.seen = look_async(watched(&self.path, &config)).await;
        self.running = config;
    }

    fn warn_restart_only(&self, new: &Config) {
        let (a, b) = (&self.running, new);
        let changed: Vec<&str> = [
            ("server.listen", a.server.listen != b.server.listen),
            (
                "server.admin_listen",
                a.server.admin_listen != b.server.admin_listen,
            ),
            (
                "server.tenant_header",
                a.server.tenant_header != b.server.tenant_header,
            ),
            ("server.workers", a.server.workers != b.server.workers),
            ("upstream.url", a.upstream.url != b.upstream.url),
            (
                "upstream.token_url",
                a.upstream.token_url != b.upstream.token_url,
            ),
            ("store.path", a.store.path != b.store.path),
            (
                "store.url",
                a.store.url.as_ref().map(SecretSource::identity)
                    != b.store.url.as_ref().map(SecretSource::identity),
            ),
            ("store.lease", a.store.lease != b.store.lease),
            (
                "store.poll_interval",
                a.store.poll_interval != b.store.poll_interval,
            ),
        ]
        .into_iter()
        .filter_map(|(key, differs)| differs.then_some(key))
        .collect();
        if !changed.is_empty() {
            tracing::warn!(
                keys = %changed.join(", "),
                "these settings changed but take effect only after a restart"
            );
        }
    }
}
