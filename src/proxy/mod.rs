//! The request path: choose the tenant, clean the headers, inject the
//! token, forward, and replay once with a fresh token on a 401.

mod body;
pub mod headers;
mod local;

use std::sync::Arc;

use arc_swap::ArcSwap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use tracing::Level;

pub use body::{OutBody, Prepared, prepare};
pub use local::{PLACEHOLDER_PREFIX, placeholder};

use crate::config::Config;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::tenant::{Tenant, Tenants};
use crate::token::{State, Unavailable};
use crate::upstream::{Upstream, UpstreamBody};

/// What the proxy listener answers: Criteo's streamed body, or the
/// proxy's own small JSON.
pub type ResponseBody = Either<UpstreamBody, Full<Bytes>>;

/// How much of a 401's body is read (and dropped) before the replay, so
/// that the pooled connection can be reused.
const DRAIN_LIMIT: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct Proxy {
    /// Replaced whole on a configuration reload.
    tenants: Arc<ArcSwap<Tenants>>,
    upstream: Upstream,
    metrics: Metrics,
    tenant_header: HeaderName,
    max_replay_body: usize,
    wait_timeout: Duration,
}

impl Proxy {
    pub fn new(
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
        }
    }

    /// The same settings with another upstream pool (one per worker).
    pub fn with_upstream(&self, upstream: Upstream) -> Self {
        Self {
            upstream,
            ..self.clone()
        }
    }

    /// Answers one client request. Never fails: errors become JSON answers.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        let started = Instant::now();
        if let Some(route) = local::route(req.uri().path()) {
            return self.answer_locally(route, req, started).await;
        }
        let header = req.headers().get(&self.tenant_header);
        // Without a tenant header, a placeholder from the proxy's own token
        // endpoint names the tenant (what Criteo's SDKs send).
        let placeholder = match header {
            None => local::placeholder_tenant(req.headers()),
            Some(_) => None,
        };
        let requested = match header {
            None => placeholder.as_deref(),
            Some(v) => match v.to_str() {
                Ok(s) => Some(s.trim()),
                Err(_) => Some("<not text>"),
            },
        };
        // One refcount on the tenant, so the tenant set can be replaced
        // while this request is under way.
        let chosen = self.tenants.load().choose(requested).cloned();
        let Some(tenant) = chosen else {
            let err = ProxyError::UnknownTenant(match requested {
                Some(name) if placeholder.is_some() => format!(
                    "the bearer token is a placeholder for tenant {name:?}, which is not configured"
                ),
                Some(name) => format!(
                    "tenant {name:?} is not configured (header {})",
                    self.tenant_header
                ),
                None => format!(
                    "the request names no tenant: send the {} header (no server.default_tenant is set)",
                    self.tenant_header
                ),
            });
            self.metrics.unknown_tenant(err.status());
            tracing::debug!(tenant = requested, error = %err, "request refused");
            return err.to_response(requested).map(Either::Right);
        };
        // The access log line costs a URI refcount and two clock reads; it
        // is skipped when its target is filtered out.
        let access = tracing::enabled!(target: ACCESS_LOG, Level::INFO)
            .then(|| (req.method().clone(), req.uri().clone()));
        let mut upstream_time = access.as_ref().map(|_| Duration::ZERO);
        let tenant = &*tenant;
        let resp = match self.forward(tenant, req, &mut upstream_time).await {
            Ok(resp) => resp,
            Err(err) => {
                tracing::debug!(tenant = &*tenant.name, error = %err, "request failed");
                err.to_response(Some(&tenant.name)).map(Either::Right)
            }
        };
        let elapsed = started.elapsed();
        tenant.metrics.request(resp.status(), elapsed.as_secs_f64());
        if let Some((method, uri)) = access {
            access_log(tenant, &method, &uri, resp.status(), elapsed, upstream_time);
        }
        resp
    }

    /// The answer to a client that may not use the proxy at all.
    pub fn refuse(&self, err: &ProxyError) -> Response<ResponseBody> {
        self.metrics.unknown_tenant(err.status());
        err.to_response(None).map(Either::Right)
    }

    async fn forward(
        &self,
        tenant: &Tenant,
        req: Request<Incoming>,
        upstream_time: &mut Option<Duration>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        headers::sanitize_request(&mut parts.headers, &self.tenant_header);
        let uri = self
            .upstream
            .uri_for(parts.uri.path_and_query())
            .map_err(|e| ProxyError::BadRequest(format!("request target: {e}")))?;

        // No token, no forwarding: get it before reading the body.
        let generation = match tenant.tokens.inject(&mut parts.headers) {
            Some(generation) => generation,
            None => {
                let token = tenant
                    .tokens
                    .wait_usable(0, self.wait_timeout)
                    .await
                    .map_err(|u| unavailable(tenant, u))?;
                parts.headers.insert(AUTHORIZATION, token.header().clone());
                token.generation()
            }
        };

        let body = prepare(body, self.max_replay_body)
            .await
            .map_err(|e| ProxyError::BadRequest(format!("reading the body: {e}")))?;
        let bytes = match body {
            Prepared::Streaming(body) => {
                let req = outgoing(parts.method, uri, parts.headers, body);
                return Ok(self
                    .send(tenant, req, upstream_time)
                    .await?
                    .map(Either::Left));
            }
            Prepared::Replayable(bytes) => bytes,
        };

        let first = outgoing(
            parts.method.clone(),
            uri.clone(),
            parts.headers.clone(),
            OutBody::full(bytes.clone()),
        );
        let resp = self.send(tenant, first, upstream_time).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp.map(Either::Left));
        }

        // The token was refused: drop it (if nobody has yet), get a newer
        // one through the refresher, and try exactly once more.
        let _ = Limited::new(resp.into_body(), DRAIN_LIMIT).collect().await;
        tenant.tokens.retire(generation);
        tenant.metrics.retry();
        tracing::info!(
            tenant = &*tenant.name,
            generation,
            "upstream answered 401; replaying once with a fresh token"
        );
        let fresh = tenant
            .tokens
            .wait_usable(generation, self.wait_timeout)
            .await
            .map_err(|u| unavailable(tenant, u))?;
        parts.headers.insert(AUTHORIZATION, fresh.header().clone());
        let second = outgoing(parts.method, uri, parts.headers, OutBody::full(bytes));
        Ok(self
            .send(tenant, second, upstream_time)
            .await?
            .map(Either::Left))
    }

    /// A 403 is not cured by a new token (an administrator may have revoked
    /// the app): pass it through, never retry, and say so once per tenant.
    fn forbidden(&self, tenant: &Tenant) {
        if !tenant.warned_forbidden.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                tenant = &*tenant.name,
                "Criteo answered 403: if an account administrator revoked this app's access, \
                 a new token will not help; 403s are passed through and not retried (logged once)"
            );
        }
    }

    async fn send(
        &self,
        tenant: &Tenant,
        req: Request<OutBody>,
        upstream_time: &mut Option<Duration>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let timeout = self.upstream.timeout();
        let sent = upstream_time.map(|_| Instant::now());
        let answer = tokio::time::timeout(timeout, self.upstream.send(req)).await;
        if let (Some(total), Some(sent)) = (upstream_time.as_mut(), sent) {
            *total += sent.elapsed();
        }
        match answer {
            Err(_) => Err(ProxyError::UpstreamTimeout(timeout)),
            Ok(Err(e)) => Err(ProxyError::UpstreamUnreachable(error_chain(&e))),
            Ok(Ok(mut resp)) => {
                headers::sanitize_response(resp.headers_mut());
                if resp.status() == StatusCode::FORBIDDEN {
                    self.forbidden(tenant);
                }
                Ok(resp)
            }
        }
    }
}

fn outgoing(method: Method, uri: Uri, headers: HeaderMap, body: OutBody) -> Request<OutBody> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    // The pool picks HTTP/2 by ALPN; an HTTP/1.1 request rides either.
    *req.version_mut() = Version::HTTP_11;
    req
}

/// The target of the one line logged per request.
pub const ACCESS_LOG: &str = "criteo_token_proxy::access";

/// One line per request: tenant, method, path, status, total and upstream
/// latency (time to response headers). The query string can carry
/// identifiers, so it is logged only at debug level.
fn access_log(
    tenant: &Tenant,
    method: &Method,
    uri: &Uri,
    status: StatusCode,
    total: Duration,
    upstream: Option<Duration>,
) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let upstream_ms = upstream.map_or(0.0, ms);
    if tracing::enabled!(target: ACCESS_LOG, Level::DEBUG) {
        tracing::debug!(
            target: ACCESS_LOG,
            tenant = &*tenant.name,
            method = method.as_str(),
            path = uri.path(),
            query = uri.query().unwrap_or(""),
            status = status.as_u16(),
            total_ms = ms(total),
            upstream_ms,
            "request"
        );
    } else {
        tracing::info!(
            target: ACCESS_LOG,
            tenant = &*tenant.name,
            method = method.as_str(),
            path = uri.path(),
            status = status.as_u16(),
            total_ms = ms(total),
            upstream_ms,
            "request"
        );
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

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}
