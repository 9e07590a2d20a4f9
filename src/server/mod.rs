//! Wiring and lifecycle: build the tenants and clients, start one
//! refresher per tenant, accept on both listeners, and shut down in
//! bounded stages (stop accepting; let in-flight requests finish within
//! `server.shutdown_grace`; stop the refreshers, letting a rotation in
//! flight finish and save within what is left of that grace).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::admin::{Admin, Onboarding};
use crate::config::{Config, Grant, UpstreamConfig};
use crate::metrics::Metrics;
use crate::oauth::TokenEndpoint;
use crate::proxy::Proxy;
use crate::store::{StoreError, TokenStore};
use crate::tenant::Tenants;

use crate::upstream::{Upstream, UpstreamError};

mod conn;
mod control;
mod refreshers;
mod refusals;
mod reload;
mod share;
mod watch;
mod watchdog;
mod worker;

use conn::Drain;
use control::{Control, Plane};
use refreshers::Refreshers;
use refusals::{Refusal, Refused, allowed};
use share::Sharing;

/// The two sockets the proxy serves, bound by the caller (tests bind
/// `127.0.0.1:0`, so they never race for ports).
#[derive(Debug)]
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds `server.listen` and `server.admin_listen`.
    pub async fn bind(config: &Config) -> Result<Self, BindError> {
        let bind = |key: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| BindError { key, addr, source })
        };
        Ok(Self {
            proxy: bind("server.listen", config.server.listen).await?,
            admin: bind("server.admin_listen", config.server.admin_listen).await?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{key}: cannot listen on {addr}: {source}")]
pub struct BindError {
    key: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("upstream.token_url: cannot build the HTTP client: {0}")]
    TokenClient(#[from] reqwest::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the proxy workers")]
    Workers(#[source] std::io::Error),
}

/// A built proxy, ready to serve.
#[derive(Debug)]
pub struct App {
    /// The request path's settings; each worker makes its own copy with
    /// its own upstream pool.
    proxy: Proxy,
    upstream: UpstreamConfig,
    workers: usize,
    limits: worker::Limits,
    admin: Arc<Admin>,
    tenants: Arc<ArcSwap<Tenants>>,
    metrics: Metrics,
    refreshers: Refreshers,
    shutdown_grace: Duration,
    allowed_clients: Option<Vec<ipnet::IpNet>>,
    /// The configuration as loaded, kept for reloads.
    config: Config,
    /// Where to reload the configuration from (SIGHUP, file changes).
    config_path: Option<PathBuf>,
    /// With a shared store and a paced tenant: the store, and this
    /// replica's row among the replicas sharing the rate limits.
    sharing: Option<(Arc<dyn TokenStore>, crate::store::Replicas)>,
}

impl App {
    pub fn new(config: Config) -> Result<Self, StartError> {
        for (key, addr) in [
            ("server.listen", config.server.listen),
            ("server.admin_listen", config.server.admin_listen),
        ] {
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    %addr,
                    "{key} is not a loopback address: anything that can reach it can use this proxy's Criteo credentials; consider server.allowed_clients"
                );
            }
        }
        let metrics = Metrics::new(prometheus::Registry::new());
        let tenants = Arc::new(ArcSwap::from_pointee(Tenants::new(&config, &metrics)));
        let upstream = Upstream::new(&config.upstream)?;
        let endpoint = TokenEndpoint::new(
            config.upstream.token_url.clone(),
            &config.refresh,
            config.upstream.extra_roots.as_ref(),
        )?;
        let needs_store = config
            .tenants
            .iter()
            .any(|t| t.grant == Grant::RefreshToken);
        // Replicas on a shared store share the rate limits through it,
        // even when no tenant keeps its tokens there.
        let shares_limits = config.store.url.is_some() && tenants.load().replicas().is_some();
        let (store, replicas) = match needs_store || shares_limits {
            true => crate::store::open_with_replicas(&config.store, metrics.store_errors())?,
            false => (None, None),
        };
        let sharing = store.clone().zip(replicas.filter(|_| shares_limits));
        let refreshers = Refreshers::new(config.refresh.clone(), endpoint, store, metrics.clone());
        let proxy = Proxy::new(&config, Arc::clone(&tenants), upstream, metrics.clone());
        let onboarding = Onboarding::new(
            Arc::clone(&tenants),
            refreshers.grants(),
            config.upstream.consent_url.clone(),
            config.consent.clone(),
            config.refresh.at_fraction,
            metrics.clone(),
        );
        let admin = Arc::new(
            Admin::new(
                Arc::clone(&tenants),
                metrics.clone(),
                onboarding,
                config.server.admin_token.clone(),
            )
            .with_body_read_timeout(config.server.body_read_timeout)
            .with_store(refreshers.store.clone(), refreshers.grants()),
        );
        Ok(Self {
            proxy,
            upstream: config.upstream.clone(),
            workers: config.server.workers.unwrap_or_else(worker::default_count),
            limits: worker::Limits {
                max_connections: config.server.max_connections,
                admin_max_connections: config.server.admin_max_connections,
                max_header_bytes: config.server.max_header_bytes,
                header_read_timeout: config.server.header_read_timeout,
                idle_timeout: config.server.idle_timeout,
            },
            admin,
            tenants,
            metrics,
            refreshers,
            shutdown_grace: config.server.shutdown_grace,
            allowed_clients: config.server.allowed_clients.clone(),
            config,
            config_path: None,
            sharing,
        })
    }

    /// Reload the configuration from `path` on SIGHUP and when it, or a
    /// secret file it names, changes.
    pub fn reload_from(mut self, path: PathBuf) -> Self {
        self.config_path = Some(path);
        self
    }

    /// Serves until `shutdown` completes, then drains and returns; fails
    /// only when serving could not start.
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartError> {
        let first = self.tenants.load_full();
        let sharing = self
            .sharing
            .map(|(store, replicas)| Sharing::start(store, replicas, Arc::clone(&self.tenants)));
        // Reload and the refreshers live in their own task: nothing they
        // wait for can hold up an accept.
        let control = Control::spawn(Plane {
            refreshers: self.refreshers,
            config: self.config,
            tenants: Arc::clone(&self.tenants),
            metrics: self.metrics.clone(),
            reload_from: self.config_path,
        });

        let addr = |l: &TcpListener| {
            l.local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string())
        };
        tracing::info!(
            proxy = %addr(&listeners.proxy),
            admin = %addr(&listeners.admin),
            tenants = first.len(),
            "listening"
        );

        let mut workers = match worker::Workers::start(
            self.workers,
            &self.proxy,
            &self.upstream,
            self.shutdown_grace,
            &self.limits,
        ) {
            Ok(w) => w,
            Err(e) => {
                control.shutdown(tokio::time::Instant::now()).await;
                return Err(StartError::Workers(e));
            }
        };
        let admin_drain = Drain::new();
        let builder = worker::http_builder(&self.limits);
        let timeouts = self.limits.timeouts();
        let connections = Arc::new(Semaphore::new(self.limits.max_connections));
        let admin_connections = Arc::new(Semaphore::new(self.limits.admin_max_connections));
        let mut refused = Refused::new(self.metrics.clone());
        let serve_admin =
            |stream: tokio::net::TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit| {
                let admin = AdminPeer {
                    admin: Arc::clone(&self.admin),
                    peer,
                };
                conn::spawn(&builder, stream, admin, timeouts, &admin_drain, permit);
            };
        // An admin connection over the cap is closed at once.
        let admit = |stream, peer, refused: &mut Refused| match Arc::clone(&admin_connections)
            .try_acquire_owned()
        {
            Ok(permit) => serve_admin(stream, peer, permit),
            Err(_) => refused.count(Refusal::AdminFull, peer),
        };

        let Listeners {
            proxy: proxy_listener,
            admin: admin_listener,
        } = listeners;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = proxy_listener.accept() => {
                    let Some((stream, peer)) = accepted_or_pause(accepted).await else { continue };
                    // A client outside the allow-list, or over the
                    // connection limit, is closed at once, before any HTTP.
                    if !allowed(self.allowed_clients.as_deref(), peer) {
                        refused.count(Refusal::NotAllowed, peer);
                        continue;
                    }
                    let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                        refused.count(Refusal::ProxyFull, peer);
                        continue;
                    };
                    workers.dispatch(stream, permit);
                }
                accepted = admin_listener.accept() => {
                    let Some((stream, peer)) = accepted_or_pause(accepted).await else { continue };
                    admit(stream, peer, &mut refused);
                }
                () = &mut shutdown => break,
            }
        }

        // Every stage together ends by this deadline.
        let deadline = tokio::time::Instant::now()
            .checked_add(self.shutdown_grace)
            .unwrap_or_else(tokio::time::Instant::now);
        // Stage 1: refuse new proxy connections; /readyz answers 503 at once
        // (the admin listener stays open so probes see it).
        self.admin.begin_shutdown();
        drop(proxy_listener);
        // The refreshers are told now, not after the drain: none starts a
        // new token request (a rotation) that the deadline could cut off;
        // one already under way gets until the deadline to finish and save.
        let refreshers_stopped = tokio::spawn(control.shutdown(deadline));
        tracing::info!(grace = ?self.shutdown_grace, "shutting down: finishing in-flight requests");
        // Stage 2: in-flight requests finish within the grace period (each
        // worker bounds its own wait), while the admin listener answers.
        let drain = workers.shutdown();
        tokio::pin!(drain);
        loop {
            tokio::select! {
                () = &mut drain => break,
                accepted = admin_listener.accept() => {
                    if let Some((stream, peer)) = accepted_or_pause(accepted).await {
                        admit(stream, peer, &mut refused);
                    }
                }
            }
        }
        drop(admin_listener);
        tokio::select! {
            () = admin_drain.shutdown() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        tracing::info!("connections closed");
        // Only now: until its last request went out, this replica used
        // its share.
        if let Some(sharing) = sharing {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            sharing.leave(left.max(Duration::from_millis(500))).await;
        }
        // Stage 3: the refreshers have stopped, or the one in the middle of
        // a token request (a rotation, whose new refresh token must reach
        // the store) has had until the deadline to finish it.
        let _ = refreshers_stopped.await;
        Ok(())
    }

    /// The current tenant set.
    pub fn tenants(&self) -> Arc<Tenants> {
        self.tenants.load_full()
    }
}

/// What an admin connection's requests are answered by: the admin service,
/// with the peer it checks them against.
#[derive(Debug)]
struct AdminPeer {
    admin: Arc<Admin>,
    peer: SocketAddr,
}

impl conn::Handler for AdminPeer {
    const LISTENER: &'static str = "admin";
    type Body = Full<Bytes>;

    fn call(&self, req: Request<Incoming>) -> impl Future<Output = Response<Full<Bytes>>> + Send {
        self.admin.handle(req, self.peer)
    }
}

/// An accepted stream with `TCP_NODELAY`, or `None` after a short pause on
/// an accept error (such as running out of file descriptors).
async fn accepted_or_pause(
    accepted: std::io::Result<(tokio::net::TcpStream, SocketAddr)>,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    match accepted {
        Ok((stream, peer)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, peer))
        }
        Err(e) => {
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{TokenSource, refresher};

    #[test]
    fn an_idle_refresher_task_is_small() {
        // 10,000 tenants means 10,000 of these futures.
        let cfg = Config::from_toml(
            "[tenants.a]\ngrant = \"client_credentials\"\nclient_id = \"x\"\nclient_secret = \"y\"\n",
        )
        .unwrap();
        let app = App::new(cfg).unwrap();
        let tenant = Arc::clone(app.tenants().iter().next().unwrap());
        let t = &app.config.tenants[0];
        let source = TokenSource::ClientCredentials {
            endpoint: TokenEndpoint::new(
                app.config.upstream.token_url.clone(),
                &app.config.refresh,
                None,
            )
            .unwrap(),
            client_id: t.client_id.clone(),
            client_secret: t.client_secret.clone(),
        };
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let target = refresher::Target {
            name: Arc::clone(&tenant.name),
            cell: Arc::clone(&tenant.tokens),
            metrics: app.metrics.refresher(&tenant.name),
        };
        let fut = refresher::run(
            target,
            source,
            app.config.refresh.clone(),
            Arc::new(tokio::sync::Semaphore::new(1)),
            rx,
        );
        let size = std::mem::size_of_val(&fut);
        assert!(size < 2048, "refresher future is {size} bytes");
    }
}
