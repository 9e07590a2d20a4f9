//! Wiring and lifecycle: build the tenants and clients, start one
//! refresher per tenant, accept on both listeners, and shut down in
//! bounded stages (stop accepting; let in-flight requests finish within
//! `server.shutdown_grace`; stop the refreshers).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use std::collections::HashMap;

use crate::admin::{Admin, Onboarding};
use crate::config::{Config, Grant, RefreshConfig, UpstreamConfig};
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::oauth::TokenEndpoint;
use crate::proxy::Proxy;
use crate::store::{StoreError, TokenStore};
use crate::tenant::Tenants;
use crate::token::{RefreshGrant, TokenSource, refresher};
use crate::upstream::{Upstream, UpstreamError};

mod worker;

/// Token requests in flight at once, across all tenants.
const MAX_CONCURRENT_FETCHES: usize = 32;

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
    tenants: Arc<Tenants>,
    sources: Vec<TokenSource>,
    refresh: RefreshConfig,
    shutdown_grace: Duration,
    allowed_clients: Option<Vec<ipnet::IpNet>>,
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
        let tenants = Arc::new(Tenants::new(&config, &metrics));
        let upstream = Upstream::new(&config.upstream)?;
        let endpoint = TokenEndpoint::new(
            config.upstream.token_url.clone(),
            config.refresh.token_timeout,
            config.upstream.extra_roots.as_ref(),
        )?;
        let needs_store = config
            .tenants
            .iter()
            .any(|t| t.grant == Grant::RefreshToken);
        let store = match &config.store.path {
            Some(path) if needs_store => Some(Arc::new(TokenStore::open(path)?)),
            _ => None,
        };
        let mut grants = HashMap::new();
        let mut sources = Vec::with_capacity(config.tenants.len());
        for t in &config.tenants {
            sources.push(match (t.grant, &store) {
                (Grant::RefreshToken, Some(store)) => {
                    let grant = Arc::new(RefreshGrant::new(t, endpoint.clone(), Arc::clone(store)));
                    grants.insert(t.name.clone(), Arc::clone(&grant));
                    TokenSource::RefreshToken(grant)
                }
                _ => TokenSource::ClientCredentials {
                    endpoint: endpoint.clone(),
                    client_id: t.client_id.clone(),
                    client_secret: t.client_secret.clone(),
                },
            });
        }
        let proxy = Proxy::new(&config, Arc::clone(&tenants), upstream, metrics.clone());
        let onboarding = Onboarding::new(
            Arc::clone(&tenants),
            grants,
            config.upstream.consent_url.clone(),
            config.consent.clone(),
            config.refresh.at_fraction,
            metrics.clone(),
        );
        let admin = Arc::new(Admin::new(Arc::clone(&tenants), metrics, onboarding));
        Ok(Self {
            proxy,
            upstream: config.upstream.clone(),
            workers: config.server.workers.unwrap_or_else(worker::default_count),
            limits: worker::Limits {
                max_connections: config.server.max_connections,
                max_header_bytes: config.server.max_header_bytes,
                header_read_timeout: config.server.header_read_timeout,
            },
            admin,
            tenants,
            sources,
            refresh: config.refresh,
            shutdown_grace: config.server.shutdown_grace,
            allowed_clients: config.server.allowed_clients,
        })
    }

    /// Serves until `shutdown` completes, then drains and returns.
    pub async fn run(mut self, listeners: Listeners, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut background = JoinSet::new();
        let fetches = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_FETCHES));
        for (tenant, source) in self.tenants.iter().zip(std::mem::take(&mut self.sources)) {
            background.spawn(refresher::run(
                Arc::clone(tenant),
                source,
                self.refresh.clone(),
                Arc::clone(&fetches),
                stop_rx.clone(),
            ));
        }

        let addr = |l: &TcpListener| {
            l.local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string())
        };
        tracing::info!(
            proxy = %addr(&listeners.proxy),
            admin = %addr(&listeners.admin),
            tenants = self.tenants.len(),
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
                tracing::error!(error = %e, "cannot start the proxy workers");
                return;
            }
        };
        let graceful = GracefulShutdown::new();
        let builder = worker::http_builder(&self.limits);
        let connections = Arc::new(tokio::sync::Semaphore::new(self.limits.max_connections));
        let serve_admin = |stream: tokio::net::TcpStream| {
            let admin = Arc::clone(&self.admin);
            let svc = service_fn(move |req| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            let conn = builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
            });
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
                    // Over the connection limit, a connection is closed at once.
                    let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                        tracing::warn!(limit = self.limits.max_connections, "server.max_connections reached; connection refused");
                        continue;
                    };
                    workers.dispatch(stream, self.refuses(peer), permit);
                }
                accepted = admin_listener.accept() => {
                    let Some((stream, _)) = accepted_or_pause(accepted).await else { continue };
                    serve_admin(stream);
                }
                () = &mut shutdown => break,
            }
        }

        // Stage 1: refuse new proxy connections; /readyz answers 503 at once
        // (the admin listener stays open so probes see it).
        self.admin.begin_shutdown();
        drop(proxy_listener);
        tracing::info!(grace = ?self.shutdown_grace, "shutting down: finishing in-flight requests");
        // Stage 2: in-flight requests finish within the grace period (each
        // worker bounds its own wait), while the admin listener answers.
        let drain = workers.shutdown();
        tokio::pin!(drain);
        loop {
            tokio::select! {
                () = &mut drain => break,
                accepted = admin_listener.accept() => {
                    if let Some((stream, _)) = accepted_or_pause(accepted).await {
                        serve_admin(stream);
                    }
                }
            }
        }
        drop(admin_listener);
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        tracing::info!("connections closed");
        // Stage 3: stop the refreshers.
        let _ = stop_tx.send(true);
        while background.join_next().await.is_some() {}
    }

    pub fn tenants(&self) -> &Arc<Tenants> {
        &self.tenants
    }

    /// The error a client at `peer` gets if `server.allowed_clients` leaves
    /// it out.
    fn refuses(&self, peer: SocketAddr) -> Option<Arc<ProxyError>> {
        let nets = self.allowed_clients.as_ref()?;
        let ip = peer.ip().to_canonical();
        if nets.iter().any(|n| n.contains(&ip)) {
            None
        } else {
            tracing::warn!(client = %ip, "connection from outside server.allowed_clients refused");
            Some(Arc::new(ProxyError::ClientNotAllowed(ip)))
        }
    }
}

/// Builds and runs the proxy on the given listeners until `shutdown`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    App::new(config)?.run(listeners, shutdown).await;
    Ok(())
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

    #[test]
    fn an_idle_refresher_task_is_small() {
        // 10,000 tenants means 10,000 of these futures.
        let cfg = Config::from_toml(
            "[tenants.a]\ngrant = \"client_credentials\"\nclient_id = \"x\"\nclient_secret = \"y\"\n",
        )
        .unwrap();
        let app = App::new(cfg).unwrap();
        let tenant = Arc::clone(app.tenants.iter().next().unwrap());
        let source = app.sources.into_iter().next().unwrap();
        let (_tx, rx) = watch::channel(false);
        let fut = refresher::run(
            tenant,
            source,
            app.refresh.clone(),
            Arc::new(tokio::sync::Semaphore::new(1)),
            rx,
        );
        let size = std::mem::size_of_val(&fut);
        assert!(size < 2048, "refresher future is {size} bytes");
    }
}
