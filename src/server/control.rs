//! The control plane: the refreshers' lifecycle and hot reload, in a task
//! of their own. The accept loops only accept; whatever a reload or a
//! refresher waits for (files, the token endpoint, the store) never holds
//! up `/healthz` or a new proxy connection. A reload publishes the new
//! tenant set through the shared `ArcSwap`, which the request path reads.
//!
//! At shutdown the accept loop, as soon as it stops accepting, hands this
//! task the deadline by which the refreshers must have stopped: no new
//! token request starts during the drain, and one under way (a rotation)
//! has until the deadline to finish and save.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::refreshers::Refreshers;
use super::reload::Reloader;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::tenant::Tenants;

/// The running control task.
#[derive(Debug)]
pub(crate) struct Control {
    stop: oneshot::Sender<Instant>,
    task: JoinHandle<()>,
}

/// What the control task is given to run.
#[derive(Debug)]
pub(crate) struct Plane {
    pub(crate) refreshers: Refreshers,
    pub(crate) config: Config,
    pub(crate) tenants: Arc<ArcSwap<Tenants>>,
    pub(crate) metrics: Metrics,
    /// Where to reload the configuration from; `None`: no reloading.
    pub(crate) reload_from: Option<PathBuf>,
}

impl Control {
    /// Starts every tenant's refresher, then watches for reloads.
    pub(crate) fn spawn(plane: Plane) -> Self {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(plane, stopped));
        Self { stop, task }
    }

    /// Stops the refreshers, giving one in the middle of a token request
    /// until `deadline` to finish it, and waits for the task to end.
    pub(crate) async fn shutdown(self, deadline: Instant) {
        let _ = self.stop.send(deadline);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the control task failed");
        }
    }
}

async fn run(plane: Plane, mut stop: oneshot::Receiver<Instant>) {
    let Plane {
        mut refreshers,
        config,
        tenants,
        metrics,
        reload_from,
    } = plane;
    // Before anything can be logged as started: a SIGHUP that comes before
    // the handler would terminate the process (its default action). The
    // handler buffers one that comes while the refreshers start.
    let mut hangup = hangup_signal(reload_from.is_some());
    for t in tenants.load_full().iter() {
        if let Some(cfg) = config.tenants.iter().find(|c| *c.name == *t.name) {
            refreshers.start(t, cfg);
        }
    }
    let mut reloader = match reload_from {
        Some(path) => Some(Reloader::new(path, config, tenants, metrics).await),
        None => None,
    };
    loop {
        tokio::select! {
            deadline = &mut stop => {
                // A dropped sender (the server gone) stops at once.
                refreshers.stop_all(deadline.unwrap_or_else(|_| Instant::now())).await;
                return;
            }
            Some(()) = recv(&mut hangup) => {
                if let Some(r) = reloader.as_mut() {
                    r.reload(&mut refreshers, "SIGHUP").await;
                }
            }
            () = files(&mut reloader) => {
                if let Some(r) = reloader.as_mut()
                    && r.files_changed().await
                {
                    r.reload(&mut refreshers, "a watched file changed").await;
                }
            }
        }
    }
}

/// The next time the watched files are worth a look; never, when there is
/// no reloading.
async fn files(reloader: &mut Option<Reloader>) {
    match reloader {
        Some(r) => r.wait_for_files().await,
        None => std::future::pending().await,
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

/// SIGHUP, when reloading is on.
fn hangup_signal(on: bool) -> Hangup {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if on {
            return signal(SignalKind::hangup()).ok();
        }
        None
    }
    #[cfg(not(unix))]
    {
        let _ = on;
        None
    }
}

/// The next SIGHUP; never, when there is no handler.
async fn recv(hangup: &mut Hangup) -> Option<()> {
    #[cfg(unix)]
    if let Some(s) = hangup {
        return s.recv().await;
    }
    std::future::pending().await
}
