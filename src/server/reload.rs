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
//!
//! Changes to files are heard from the kernel ([`FileWatch`]); only while
//! some file cannot be watched are they polled for.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::refreshers::Refreshers;
use super::watch::FileWatch;
use crate::config::files::digest;
use crate::config::{Config, SecretSource};
use crate::metrics::Metrics;
use crate::tenant::Tenants;
use crate::token::State;

/// How often watched files are checked for changes while some of them
/// cannot be watched.
const POLL: Duration = Duration::from_secs(2);

/// After a change is heard, how long to let the writer finish (an editor
/// truncating then writing, the kubelet's several steps) before looking:
/// a half-written file would be rejected, with an error in the log.
const SETTLE: Duration = Duration::from_millis(200);

/// A watched file as last seen: where its links led, when it changed, its
/// size and (Unix) its inode, so that a file replaced by one of the same
/// size and time is still told apart.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    target: PathBuf,
    modified: SystemTime,
    len: u64,
    inode: u64,
}

/// Each watched file and its stamp; `None` when it could not be read.
type Seen = Vec<(PathBuf, Option<Stamp>)>;

#[derive(Debug)]
pub(crate) struct Reloader {
    path: PathBuf,
    running: Config,
    tenants: Arc<ArcSwap<Tenants>>,
    metrics: Metrics,
    seen: Seen,
    watch: Arc<FileWatch>,
    /// While some file cannot be watched: the polling that stands in.
    poll: Option<Interval>,
    /// The configuration file changed between its parse and the first
    /// look: reload without waiting for a change to be heard.
    stale: bool,
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

/// Watches what `files` depend on, then stamps them (in that order, so that
/// a change between the two is either seen now or heard later). On the
/// blocking pool: the control task never waits on a disk. `Err`: a file
/// that cannot be watched.
async fn observe(files: Vec<PathBuf>, watch: Arc<FileWatch>) -> (Seen, Result<(), String>) {
    tokio::task::spawn_blocking(move || {
        let watching = watch.follow(&files);
        (look(files), watching)
    })
    .await
    .unwrap_or_else(|e| (Seen::default(), Err(e.to_string())))
}

fn look(files: Vec<PathBuf>) -> Seen {
    files
        .into_iter()
        .map(|f| {
            let state = std::fs::canonicalize(&f).ok().and_then(|target| {
                let meta = std::fs::metadata(&target).ok()?;
                Some(Stamp {
                    modified: meta.modified().ok()?,
                    len: meta.len(),
                    inode: inode(&meta),
                    target,
                })
            });
            (f, state)
        })
        .collect()
}

#[cfg(unix)]
fn inode(meta: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(meta)
}
#[cfg(not(unix))]
fn inode(_: &std::fs::Metadata) -> u64 {
    0
}

impl Reloader {
    pub(crate) async fn new(
        path: PathBuf,
        running: Config,
        tenants: Arc<ArcSwap<Tenants>>,
        metrics: Metrics,
    ) -> Self {
        let watch = Arc::new(FileWatch::new());
        let mut reloader = Self {
            path,
            running,
            tenants,
            metrics,
            seen: Seen::default(),
            watch,
            poll: None,
            stale: false,
        };
        reloader.seen = reloader.observe().await;
        if reloader.poll.is_none() {
            tracing::info!(
                files = reloader.seen.len(),
                "watching the configuration and the files it names for changes"
            );
        }
        // Watched first, then compared: a change from now on is heard.
        if let Some(parsed) = reloader.running.file_digest {
            let path = reloader.path.clone();
            let now = tokio::task::spawn_blocking(move || digest(&path))
                .await
                .ok()
                .flatten();
            if now != Some(parsed) {
                tracing::info!(
                    "the configuration file changed while the proxy started; reloading it"
                );
                reloader.stale = true;
            }
        }
        reloader
    }

    /// [`observe`]s the running configuration's files, and polls them
    /// while some cannot be watched.
    async fn observe(&mut self) -> Seen {
        let files = watched(&self.path, &self.running);
        let (seen, watching) = observe(files, Arc::clone(&self.watch)).await;
        match (watching, self.poll.is_some()) {
            (Ok(()), false) => {}
            (Ok(()), true) => {
                tracing::info!("the configuration's files can be watched again; polling stopped");
                self.poll = None;
            }
            (Err(why), false) => {
                tracing::warn!(
                    problem = %why,
                    "cannot watch the files the configuration depends on for changes; checking them every {}s instead",
                    POLL.as_secs()
                );
                let mut poll = tokio::time::interval_at(Instant::now() + POLL, POLL);
                poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
                self.poll = Some(poll);
            }
            (Err(_), true) => {}
        }
        seen
    }

    /// Resolves when the watched files are worth a look: a change was
    /// heard (and had [`SETTLE`] to finish), or it is time to poll.
    pub(crate) async fn wait_for_files(&mut self) {
        if self.stale {
            return;
        }
        match self.poll.as_mut() {
            Some(poll) => tokio::select! {
                () = self.watch.heard() => {}
                _ = poll.tick() => return,
            },
            None => self.watch.heard().await,
        }
        tokio::time::sleep(SETTLE).await;
        // What was heard meanwhile is covered by the look that follows.
        tokio::select! {
            biased;
            () = self.watch.heard() => {}
            () = std::future::ready(()) => {}
        }
    }

    /// True when a watched file changed since the last look.
    pub(crate) async fn files_changed(&mut self) -> bool {
        let now = self.observe().await;
        if std::mem::take(&mut self.stale) || now != self.seen {
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
        self.running = config;
        self.seen = self.observe().await;
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

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str =
        "[tenants.a]\ngrant = \"client_credentials\"\nclient_id = \"x\"\nclient_secret = \"y\"\n";
    const TWO: &str =
        "[tenants.b]\ngrant = \"client_credentials\"\nclient_id = \"z\"\nclient_secret = \"w\"\n";

    async fn reloader(path: &Path, config: Config) -> Reloader {
        let metrics = Metrics::new(prometheus::Registry::new());
        let tenants = Arc::new(ArcSwap::from_pointee(Tenants::new(&config, &metrics)));
        Reloader::new(path.to_owned(), config, tenants, metrics).await
    }

    #[tokio::test]
    async fn a_change_made_while_the_proxy_starts_is_reloaded_without_waiting_for_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, ONE).unwrap();
        let config = Config::load(Some(&path)).unwrap();
        // Edited in place after the parse, before the watcher started: no
        // event will ever report it.
        std::fs::write(&path, format!("{ONE}{TWO}")).unwrap();
        let mut r = reloader(&path, config).await;
        tokio::time::timeout(Duration::from_secs(10), r.wait_for_files())
            .await
            .expect("the watched files are worth a look at once");
        assert!(r.files_changed().await, "the change is reloaded");
        assert!(!r.files_changed().await, "once");
    }

    #[tokio::test]
    async fn an_unchanged_configuration_is_not_reloaded_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, ONE).unwrap();
        let config = Config::load(Some(&path)).unwrap();
        let mut r = reloader(&path, config).await;
        assert!(!r.files_changed().await);
    }
}
