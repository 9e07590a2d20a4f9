//! The request path: answer locally what is not for Criteo, choose the
//! tenant, clean the headers, inject the token, forward, and replay once
//! with a fresh token on a 401 (or, for a tenant with a limit, after the
//! pause Criteo's 429 asks for: [`throttled`]). An error answered before the client's body
//! has been read leaves its connection usable ([`Proxy::settle`]).

mod access;
mod asked;
mod body;
pub(crate) mod headers;
mod local;
mod refused;
mod send;
mod settle;
mod throttled;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, Method, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

pub(crate) use access::ACCESS_LOG;
pub(crate) use body::{BodyEnd, BodyError, End, OutBody, Prepared, ReplayBudget, prepare};

use access::{Observed, access_log};
use settle::{Failed, Leftover};

use crate::config::Config;
use crate::error::{self, ProxyError};
use crate::metrics::Metrics;
use crate::pacing::{self, Pacing};
use crate::tenant::{Tenant, Tenants};
use crate::token::{Newer, State, Unavailable};
use crate::upstream::{Upstream, UpstreamBody};

/// What the proxy listener answers: Criteo's streamed body, or the
/// proxy's own small JSON.
pub(crate) type ResponseBody = Either<UpstreamBody, Full<Bytes>>;

#[derive(Debug, Clone)]
pub(crate) struct Proxy {
    /// Replaced whole on a configuration reload.
    tenants: Arc<ArcSwap<Tenants>>,
    upstream: Upstream,
    metrics: Metrics,
    tenant_header: HeaderName,
    max_replay_body: usize,
    wait_timeout: Duration,
    body_read_timeout: Duration,
    /// Shared by every worker.
    replay_budget: Arc<ReplayBudget>,
}

/// Phase 1, route: what the proxy answers itself, with no tenant and no
/// token, and what it forwards.
#[derive(Debug)]
enum Route {
    Forward,
    /// `CONNECT` and `OPTIONS *`: nothing to forward.
    NotForwardable,
    /// The proxy's own routes (its token endpoint, `/oauth2/`).
    Own(local::Route),
}

fn route(req: &Request<Incoming>) -> Route {
    if req.method() == Method::CONNECT
        || (req.method() == Method::OPTIONS && req.uri().path() == "*")
    {
        return Route::NotForwardable;
    }
    local::route(req.uri().path()).map_or(Route::Forward, Route::Own)
}

/// A request that names no configured tenant: why, and the name it gave.
#[derive(Debug)]
struct Refused {
    err: ProxyError,
    name: Option<String>,
}

impl Proxy {
    pub(crate) fn new(
        config: &Config,
        tenants: Arc<ArcSwap<Tenants>>,
        upstream: Upstream,
        metrics: Metrics,
    ) -> Self {
        Self {
            tenants,
            upstream,
            metrics,
            tenant_header: config.server.tenant_header.clone(),
            max_replay_body: config.server.max_replay_body,
            wait_timeout: config.refresh.wait_timeout,
            body_read_timeout: config.server.body_read_timeout,
            replay_budget: Arc::new(ReplayBudget::new(config.server.replay_budget)),
        }
    }

    /// The same settings with another upstream pool (one per worker).
    pub(crate) fn with_upstream(&self, upstream: Upstream) -> Self {
        Self {
            upstream,
            ..self.clone()
        }
    }

    /// Answers one client request. Never fails: errors become JSON answers.
    ///
    /// In phases, as pingora's filters are, each a function of its own so
    /// that one more (pacing) plugs in between two without touching the
    /// others: [`route`] (what the proxy answers itself) → tenant
    /// ([`Proxy::tenant`]) → inject ([`Proxy::inject`]) → send, with one
    /// replay on a 401 ([`Proxy::forward`]) → observe ([`Proxy::observe`]).
    pub(crate) async fn handle(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        let started = Instant::now();
        match route(&req) {
            Route::Forward => {}
            Route::NotForwardable => return self.locally(req).await,
            Route::Own(own) => return self.answer_locally(own, req, started).await,
        }
        let tenant = match self.tenant(&req) {
            Ok(tenant) => tenant,
            // Boxed, as every rare branch here: the request's future is
            // allocated per HTTP/2 stream, and a branch's size counts
            // whether it runs or not.
            Err(refused) => return Box::pin(self.refuse(req, refused)).await,
        };
        let tenant = &*tenant;
        let mut seen = Observed::start(&req, started);
        let version = req.version();
        // Phase 2½, pace: one null check for a tenant without a limit.
        if let Some(pacing) = tenant.pacing.as_deref() {
            match pacing.admit(req.uri().path()).await {
                Ok(None) => {}
                Ok(Some(waited)) => {
                    tenant.metrics.rate_limit_wait(waited.as_secs_f64());
                    seen.waited = Some(waited);
                }
                Err(refused) => {
                    let resp = Box::pin(self.rate_limited(tenant, pacing, req, refused)).await;
                    self.observe(tenant, &resp, seen);
                    return resp;
                }
            }
        }
        let resp = match self.forward(tenant, req, &mut seen.upstream_time).await {
            Ok(resp) => resp,
            Err(Failed { err, left }) => {
                tracing::debug!(tenant = &*tenant.name, error = %err, "request failed");
                let resp = err.to_response(Some(&tenant.name)).map(Either::Right);
                Box::pin(self.settle(resp, version, left)).await
            }
        };
        self.observe(tenant, &resp, seen);
        resp
    }

    /// Phase 2, tenant: the one the request names, with one refcount, so
    /// that the tenant set can be replaced while the request is under way.
    fn tenant(&self, req: &Request<Incoming>) -> Result<Arc<Tenant>, Refused> {
        let asked = asked::Asked::from(req.headers(), &self.tenant_header);
        if let Some(tenant) = asked.lookup(&self.tenants.load()) {
            return Ok(Arc::clone(tenant));
        }
        Err(Refused {
            err: asked.unknown(&self.tenant_header),
            name: asked.name().map(str::to_owned),
        })
    }

    /// A request that names no configured tenant.
    #[cold]
    async fn refuse(&self, req: Request<Incoming>, refused: Refused) -> Response<ResponseBody> {
        let Refused { err, name } = refused;
        self.metrics.request_without_tenant(err.status());
        tracing::debug!(tenant = name.as_deref(), error = %err, "request refused");
        let resp = err.to_response(name.as_deref()).map(Either::Right);
        let version = req.version();
        let left = Leftover::Unread(req.into_body());
        self.settle(resp, version, left).await
    }

    /// The request's turn is further than `rate_limit.max_wait`: 429 at
    /// once, nothing forwarded, nothing taken from the budget.
    #[cold]
    async fn rate_limited(
        &self,
        tenant: &Tenant,
        pacing: &Pacing,
        req: Request<Incoming>,
        refused: pacing::Refused,
    ) -> Response<ResponseBody> {
        tenant.metrics.rate_limited_by_proxy();
        let limits = pacing.limits();
        let limit = match (&limits.overall, &limits.reporting) {
            (Some(all), Some((rep, globs))) if globs.matches(req.uri().path()) => {
                format!("{all}, {rep} on reporting paths")
            }
            (_, Some((rep, globs))) if globs.matches(req.uri().path()) => {
                format!("{rep} on reporting paths")
            }
            (Some(all), _) => all.to_string(),
            (None, _) => "none".into(),
        };
        let err = ProxyError::RateLimited {
            limit,
            max_wait: limits.max_wait,
            retry_after: refused.retry_after,
        };
        tracing::debug!(tenant = &*tenant.name, error = %err, "request refused");
        let resp = err.to_response(Some(&tenant.name)).map(Either::Right);
        let version = req.version();
        self.settle(resp, version, Leftover::Unread(req.into_body()))
            .await
    }

    /// Phase 5, observe: the tenant's metrics and the access log line.
    fn observe(&self, tenant: &Tenant, resp: &Response<ResponseBody>, seen: Observed) {
        let elapsed = seen.started.elapsed();
        tenant.metrics.request(resp.status(), elapsed.as_secs_f64());
        if let Some((method, uri)) = seen.access {
            access_log(
                tenant,
                &method,
                &uri,
                resp.status(),
                elapsed,
                seen.upstream_time,
                seen.waited,
            );
        }
    }

    /// `CONNECT` (a tunnel) and `OPTIONS *` (a question about the proxy
    /// itself) name nothing to forward: answered here, never with a token.
    #[cold]
    async fn locally(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        let resp = if req.method() == Method::CONNECT {
            ProxyError::MethodNotAllowed {
                allow: error::FORWARDED_METHODS,
                message: "CONNECT is not forwarded by this proxy".into(),
            }
            .to_response(None)
        } else {
            error::options_asterisk()
        };
        self.metrics.request_without_tenant(resp.status());
        let version = req.version();
        let left = Leftover::Unread(req.into_body());
        self.settle(resp.map(Either::Right), version, left).await
    }

    /// Phase 3, inject: the tenant's token in `Authorization`, waiting for
    /// one (single flight, through the refresher) only when none is cached.
    /// Returns the token's generation, which a 401 retires.
    async fn inject(&self, tenant: &Tenant, headers: &mut HeaderMap) -> Result<u64, ProxyError> {
        if let Some(generation) = tenant.tokens.inject(headers) {
            return Ok(generation);
        }
        match tenant
            .tokens
            .wait_usable(Newer::Any, self.wait_timeout)
            .await
        {
            Ok(token) => {
                headers.insert(AUTHORIZATION, token.header().clone());
                Ok(token.generation())
            }
            Err(u) => Err(unavailable(tenant, u)),
        }
    }
}

fn unavailable(tenant: &Tenant, u: Unavailable) -> ProxyError {
    match u.state {
        State::ConsentRequired => ProxyError::ConsentRequired(format!(
            "{}; open /oauth/authorize?tenant={} on the admin listener to consent again",
            u.reason, tenant.name
        )),
        _ => ProxyError::TokenUnavailable {
            reason: u.reason,
            retry_after: u.retry_after,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<'a, Fut: Future>(_: impl Fn(&'a Proxy, Request<Incoming>) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn a_request_future_is_small() {
        // Allocated once per HTTP/2 stream, so its size is memory per
        // request in progress; rare branches are boxed to keep it down
        // (3,184 bytes before they grew, 3,152 after, in a debug build).
        let size = future_size(Proxy::handle);
        assert!(size <= 4096, "the request future is {size} bytes");
    }
}
