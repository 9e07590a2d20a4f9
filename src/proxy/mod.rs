//! The request path: answer locally what is not for Criteo, choose the
//! tenant, clean the headers, inject the token, forward, and replay once
//! with a fresh token on a 401. An error answered before the client's body
//! has been read leaves its connection usable ([`Proxy::settle`]).

mod asked;
mod body;
pub(crate) mod headers;
mod local;

use std::sync::Arc;

use arc_swap::ArcSwap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONNECTION};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use tracing::Level;

pub(crate) use body::{BodyEnd, BodyError, End, OutBody, Prepared, ReplayBudget, prepare};

use crate::config::Config;
use crate::error::{self, ProxyError};
use crate::metrics::Metrics;
use crate::tenant::{Tenant, Tenants};
use crate::token::{State, Unavailable};
use crate::upstream::{Slot, Upstream, UpstreamBody};

/// What the proxy listener answers: Criteo's streamed body, or the
/// proxy's own small JSON.
pub(crate) type ResponseBody = Either<UpstreamBody, Full<Bytes>>;

/// How much of a 401's body is read (and dropped) before the replay, so
/// that the pooled connection can be reused.
const DRAIN_LIMIT: usize = 64 * 1024;

/// An error answered before the client's body was read: this much of the
/// body is first read and dropped, so that the HTTP/1.1 connection stays
/// usable for the client's next request…
const UNREAD_DRAIN_LIMIT: usize = 1024 * 1024;
const UNREAD_DRAIN_TIME: Duration = Duration::from_secs(1);
/// …past that, the answer says `Connection: close`, and the rest is still
/// read and dropped for this long (at most this much), so that the close,
/// which comes once the body has ended, does not reset the connection
/// under the answer (a close with unread data sends a TCP RST, and the
/// client loses what it had not read yet).
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_LIMIT: usize = 64 * 1024 * 1024;

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

/// What is left of the client's body when the proxy answers an error.
#[derive(Debug)]
enum Leftover {
    /// Read to its end, or there was none.
    Nothing,
    /// Not read at all.
    Unread(Incoming),
    /// Partly read, then given up: the connection cannot be reused.
    Lost,
}

/// What a replay sends again.
#[derive(Debug)]
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    bytes: Bytes,
    generation: u64,
}

/// An error to answer, and what is left of the body.
#[derive(Debug)]
struct Failed {
    err: ProxyError,
    left: Leftover,
}

impl Failed {
    fn unread(err: ProxyError, body: Incoming) -> Self {
        Self {
            err,
            left: Leftover::Unread(body),
        }
    }

    fn read(err: ProxyError) -> Self {
        Self {
            err,
            left: Leftover::Nothing,
        }
    }

    fn lost(err: ProxyError) -> Self {
        Self {
            err,
            left: Leftover::Lost,
        }
    }
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

/// What phase 5 reports on a forwarded request.
#[derive(Debug)]
struct Observed {
    started: Instant,
    /// Method and URI for the access log line, only when its target is
    /// enabled (it costs a URI refcount and two clock reads).
    access: Option<(Method, Uri)>,
    /// Time spent waiting for the upstream, when the access log wants it.
    upstream_time: Option<Duration>,
}

impl Observed {
    fn start(req: &Request<Incoming>, started: Instant) -> Self {
        let access = tracing::enabled!(target: ACCESS_LOG, Level::INFO)
            .then(|| (req.method().clone(), req.uri().clone()));
        let upstream_time = access.as_ref().map(|_| Duration::ZERO);
        Self {
            started,
            access,
            upstream_time,
        }
    }
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

    /// Makes an answer to a request whose body was not read to its end
    /// safe for the client's connection: a small body is read and dropped
    /// first. Past that, HTTP/2 ends the request's stream on its own
    /// (RST_STREAM with NO_ERROR, which some clients mishandle, hence the
    /// reading first); HTTP/1.1 gets `Connection: close`, and the body is
    /// still read for a while, in the background, so that the close comes
    /// cleanly after it.
    async fn settle(
        &self,
        mut resp: Response<ResponseBody>,
        version: Version,
        left: Leftover,
    ) -> Response<ResponseBody> {
        let h2 = version == Version::HTTP_2;
        let close = match left {
            Leftover::Nothing => false,
            Leftover::Lost => !h2,
            Leftover::Unread(body) => !drain_unread(body, h2).await && !h2,
        };
        if close {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// Phase 3, inject: the tenant's token in `Authorization`, waiting for
    /// one (single flight, through the refresher) only when none is cached.
    /// Returns the token's generation, which a 401 retires.
    async fn inject(&self, tenant: &Tenant, headers: &mut HeaderMap) -> Result<u64, ProxyError> {
        if let Some(generation) = tenant.tokens.inject(headers) {
            return Ok(generation);
        }
        match tenant.tokens.wait_usable(0, self.wait_timeout).await {
            Ok(token) => {
                headers.insert(AUTHORIZATION, token.header().clone());
                Ok(token.generation())
            }
            Err(u) => Err(unavailable(tenant, u)),
        }
    }

    /// Phase 4, send: the body kept for a replay (or streamed), a place on
    /// an upstream connection, the request sent, and replayed once with a
    /// fresh token on a 401.
    async fn forward(
        &self,
        tenant: &Tenant,
        req: Request<Incoming>,
        upstream_time: &mut Option<Duration>,
    ) -> Result<Response<ResponseBody>, Failed> {
        let (mut parts, body) = req.into_parts();
        headers::sanitize_request(&mut parts.headers, &self.tenant_header);
        let uri = match self.upstream.uri_for(parts.uri.path_and_query()) {
            Ok(uri) => uri,
            Err(e) => {
                let err = ProxyError::BadRequest(format!("request target: {e}"));
                return Err(Failed::unread(err, body));
            }
        };

        // No token, no forwarding: get it before reading the body.
        let generation = match self.inject(tenant, &mut parts.headers).await {
            Ok(generation) => generation,
            Err(err) => return Err(Failed::unread(err, body)),
        };
        // The replay budget this request holds, given back when it ends.
        let mut kept = self.replay_budget.reserve();
        let gap = self.body_read_timeout;
        let prepared = prepare(body, self.max_replay_body, &mut kept, gap)
            .await
            .map_err(|e| Failed {
                err: body_error(e),
                left: Leftover::Lost,
            })?;
        // A place on an upstream connection once the body is in hand (a
        // slow client holds none while it sends a body that is kept); a
        // busy answer leaves the rest of a streamed body to be drained.
        let slot = match self.upstream.acquire().await {
            Ok(slot) => slot,
            Err(busy) => {
                let left = match prepared {
                    Prepared::Replayable(_) => Leftover::Nothing,
                    Prepared::Streaming(body, _) => {
                        body.into_unsent().map_or(Leftover::Lost, Leftover::Unread)
                    }
                };
                let err = ProxyError::UpstreamBusy(busy.0);
                return Err(Failed { err, left });
            }
        };
        let bytes = match prepared {
            Prepared::Streaming(body, end) => {
                let req = outgoing(parts.method, uri, parts.headers, body);
                let sent = self.send_streamed(tenant, slot, req, end, generation, upstream_time);
                return Box::pin(sent).await;
            }
            Prepared::Replayable(bytes) => bytes,
        };

        let first = outgoing(
            parts.method.clone(),
            uri.clone(),
            parts.headers.clone(),
            OutBody::full(bytes.clone()),
        );
        let resp = self
            .send(tenant, slot, first, None, upstream_time)
            .await
            .map_err(Failed::read)?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp.map(Either::Left));
        }
        let again = Replay {
            method: parts.method,
            uri,
            headers: parts.headers,
            bytes,
            generation,
        };
        Box::pin(self.replay(tenant, resp, again, upstream_time)).await
    }

    /// The token was refused: drop it (if nobody has yet), get a newer
    /// one through the refresher, and try exactly once more. The 401's
    /// body is read (so its connection can be reused) only as long as the
    /// upstream would be waited for anyway.
    async fn replay(
        &self,
        tenant: &Tenant,
        resp: Response<UpstreamBody>,
        again: Replay,
        upstream_time: &mut Option<Duration>,
    ) -> Result<Response<ResponseBody>, Failed> {
        let Replay {
            method,
            uri,
            mut headers,
            bytes,
            generation,
        } = again;
        let drain = Limited::new(resp.into_body(), DRAIN_LIMIT).collect();
        let _ = tokio::time::timeout(self.upstream.timeout(), drain).await;
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
            .map_err(|u| Failed::read(unavailable(tenant, u)))?;
        headers.insert(AUTHORIZATION, fresh.header().clone());
        let slot = self
            .upstream
            .acquire()
            .await
            .map_err(|busy| Failed::read(ProxyError::UpstreamBusy(busy.0)))?;
        let second = outgoing(method, uri, headers, OutBody::full(bytes));
        Ok(self
            .send(tenant, slot, second, None, upstream_time)
            .await
            .map_err(Failed::read)?
            .map(Either::Left))
    }

    /// A streamed body cannot be replayed; a 401 still retires the token,
    /// so that the next request gets a fresh one.
    async fn send_streamed(
        &self,
        tenant: &Tenant,
        slot: Slot,
        req: Request<OutBody>,
        mut end: BodyEnd,
        generation: u64,
        upstream_time: &mut Option<Duration>,
    ) -> Result<Response<ResponseBody>, Failed> {
        match self
            .send(tenant, slot, req, Some(&mut end), upstream_time)
            .await
        {
            Ok(resp) => {
                if resp.status() == StatusCode::UNAUTHORIZED {
                    tenant.tokens.retire(generation);
                    tracing::info!(
                        tenant = &*tenant.name,
                        generation,
                        "upstream answered 401 to a streamed request (not replayable); token retired"
                    );
                }
                Ok(resp.map(Either::Left))
            }
            Err(err) => Err(match end.ended() {
                Some(End::Complete) => Failed::read(err),
                Some(End::Stalled(gap)) => Failed {
                    err: ProxyError::BodyTimeout(gap),
                    left: Leftover::Lost,
                },
                _ => Failed {
                    err,
                    left: Leftover::Lost,
                },
            }),
        }
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

    /// Sends `req` and waits for the response headers at most
    /// `upstream.timeout` from the end of the request body: at once for a
    /// complete body, once `end` says so for a streamed one (an upload
    /// takes as long as the client takes, each gap bounded by
    /// `server.body_read_timeout`).
    async fn send(
        &self,
        tenant: &Tenant,
        slot: Slot,
        req: Request<OutBody>,
        end: Option<&mut BodyEnd>,
        upstream_time: &mut Option<Duration>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let timeout = self.upstream.timeout();
        let sent = upstream_time.map(|_| Instant::now());
        let sending = self.upstream.send(slot, req);
        let answer = match end {
            None => tokio::time::timeout(timeout, sending).await.ok(),
            Some(end) => Box::pin(after_body(sending, end, timeout)).await,
        };
        if let (Some(total), Some(sent)) = (upstream_time.as_mut(), sent) {
            *total += sent.elapsed();
        }
        match answer {
            None => Err(ProxyError::UpstreamTimeout(timeout)),
            Some(Err(e)) => {
                tracing::debug!(written = e.maybe_written(), error = %e, "upstream request failed");
                Err(ProxyError::UpstreamUnreachable(error::chain(&e)))
            }
            Some(Ok(mut resp)) => {
                headers::sanitize_response(resp.headers_mut());
                if resp.status() == StatusCode::FORBIDDEN {
                    self.forbidden(tenant);
                }
                Ok(resp)
            }
        }
    }
}

/// `sending`'s output, waited for as long as the body is being sent, then
/// at most `timeout`; `None` once that is over.
async fn after_body<F: Future>(
    sending: F,
    end: &mut BodyEnd,
    timeout: Duration,
) -> Option<F::Output> {
    tokio::pin!(sending);
    tokio::select! {
        biased;
        out = &mut sending => return Some(out),
        _ = end.wait() => {}
    }
    tokio::time::timeout(timeout, sending).await.ok()
}

/// Reads and drops a body the answer did not need, so that the connection
/// stays usable. A small one is read now; when more is coming (or it takes
/// too long) it returns false, and on HTTP/1.1, whose answer then closes
/// the connection, a task goes on reading and dropping the body for a
/// while so that the close comes cleanly after it.
async fn drain_unread(mut body: Incoming, h2: bool) -> bool {
    use http_body::Body as _;
    if body.is_end_stream() {
        return true;
    }
    let small = body
        .size_hint()
        .exact()
        .is_none_or(|n| n <= UNREAD_DRAIN_LIMIT as u64);
    if small && body::drain(&mut body, UNREAD_DRAIN_LIMIT, UNREAD_DRAIN_TIME).await {
        return true;
    }
    if h2 {
        return false;
    }
    tokio::spawn(async move {
        body::drain(&mut body, LINGER_LIMIT, LINGER_TIME).await;
    });
    false
}

fn body_error(e: BodyError) -> ProxyError {
    match e {
        BodyError::Stalled(gap) => ProxyError::BodyTimeout(gap),
        BodyError::Read(e) => ProxyError::BadRequest(format!("reading the body: {e}")),
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
pub(crate) const ACCESS_LOG: &str = "criteo_token_proxy::access";

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
