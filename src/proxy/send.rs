//! Phase 4, send: the body kept for a replay (or streamed), a place on an
//! upstream connection, the request sent with its answer bounded in time,
//! and replayed once with a fresh token on a 401, or after a pause on
//! Criteo's 429 to a tenant with a limit ([`super::throttled`]). A request
//! the HTTP/2 upstream refused unprocessed (`REFUSED_STREAM`, or a
//! `GOAWAY` before its stream) is sent again as it was, if its body was
//! kept.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::Either;
use hyper::body::Incoming;

use super::refused::RESENDS;
use super::settle::{Failed, Leftover};
use super::unavailable;
use super::{BodyEnd, BodyError, End, OutBody, Prepared, Proxy, ResponseBody, headers, prepare};
use crate::error::{self, ProxyError};
use crate::tenant::Tenant;
use crate::token::Newer;
use crate::upstream::{SendError, Slot, UpstreamBody};

/// How much of a 401's (or 429's) body is read (and dropped) before the
/// replay, so that the pooled connection can be reused.
pub(super) const DRAIN_LIMIT: usize = 64 * 1024;

/// What a replay sends again.
#[derive(Debug)]
pub(super) struct Replay {
    pub(super) method: Method,
    pub(super) uri: Uri,
    /// Without `Authorization` until a replay puts its token in, and
    /// without `Host` (the pool sets it).
    pub(super) headers: HeaderMap,
    pub(super) bytes: Bytes,
    pub(super) generation: u64,
    /// The client's path, which the tenant's pacing goes by.
    pub(super) path: String,
}

// === impl Proxy ===

impl Proxy {
    /// Phase 4, send: the body kept for a replay (or streamed), a place on
    /// an upstream connection, the request sent, and replayed once with a
    /// fresh token on a 401.
    pub(super) async fn forward(
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
                let path = parts.uri.path();
                let req = outgoing(parts.method, uri, parts.headers, body);
                let sent =
                    self.send_streamed(tenant, slot, req, end, generation, path, upstream_time);
                return Box::pin(sent).await;
            }
            Prepared::Replayable(bytes) => bytes,
        };

        let kept = for_a_replay(&parts.headers);
        let first = outgoing(
            parts.method.clone(),
            uri.clone(),
            std::mem::take(&mut parts.headers),
            OutBody::full(bytes.clone()),
        );
        let answer = self.exchange(slot, first, None, upstream_time).await;
        // What a second attempt sends, built only when one is needed.
        let again = move || Replay {
            method: parts.method,
            uri,
            headers: kept.into_iter().collect(),
            bytes,
            generation,
            path: parts.uri.path().to_owned(),
        };
        let resp = match answer {
            // Rare: sent again in a boxed future, so that no request's
            // future holds room for it.
            Err(e) if e.refused() => {
                return Box::pin(self.resend(tenant, e, again(), upstream_time)).await;
            }
            answer => self.answered(tenant, answer).map_err(Failed::read)?,
        };
        if resp.status() != StatusCode::UNAUTHORIZED
            && resp.status() != StatusCode::TOO_MANY_REQUESTS
        {
            return Ok(resp.map(Either::Left));
        }
        let again = again();
        self.replay_if_asked(tenant, resp, again, upstream_time)
            .await
    }

    /// A 401 replays the request once with a fresh token; Criteo's 429 to
    /// a tenant with a limit sends it again at its new turn; any other
    /// answer (a tenant without a limit gets Criteo's 429 as it came) goes
    /// back as it is.
    pub(super) async fn replay_if_asked(
        &self,
        tenant: &Tenant,
        mut resp: Response<UpstreamBody>,
        mut again: Replay,
        upstream_time: &mut Option<Duration>,
    ) -> Result<Response<ResponseBody>, Failed> {
        if resp.status() == StatusCode::UNAUTHORIZED {
            resp = Box::pin(self.replay(tenant, resp, &mut again, upstream_time)).await?;
        }
        if let Some(pacing) = tenant.pacing.as_deref()
            && resp.status() == StatusCode::TOO_MANY_REQUESTS
        {
            resp =
                Box::pin(self.throttled(tenant, pacing, resp, &mut again, upstream_time)).await?;
        }
        Ok(resp.map(Either::Left))
    }

    /// The token was refused: drop it (if nobody has yet), get a newer
    /// one through the refresher, and try exactly once more. The 401's
    /// body is read (so its connection can be reused) only as long as the
    /// upstream would be waited for anyway.
    async fn replay(
        &self,
        tenant: &Tenant,
        resp: Response<UpstreamBody>,
        again: &mut Replay,
        upstream_time: &mut Option<Duration>,
    ) -> Result<Response<UpstreamBody>, Failed> {
        let generation = again.generation;
        self.drain(resp).await;
        tenant.tokens.retire(generation);
        tenant.metrics.retry();
        tracing::info!(
            tenant = &*tenant.name,
            generation,
            "upstream answered 401; replaying once with a fresh token"
        );
        let fresh = tenant
            .tokens
            .wait_usable(Newer::Than(generation), self.wait_timeout)
            .await
            .map_err(|u| Failed::read(unavailable(tenant, u)))?;
        again.headers.insert(AUTHORIZATION, fresh.header().clone());
        again.generation = fresh.generation();
        self.send_again(tenant, again, RESENDS, upstream_time).await
    }

    /// A streamed body cannot be replayed; a 401 still retires the token,
    /// so that the next request gets a fresh one, and a 429 still pauses
    /// a tenant with a limit (and goes back as it came).
    #[allow(clippy::too_many_arguments)] // The request's parts, as `forward` has them.
    async fn send_streamed(
        &self,
        tenant: &Tenant,
        slot: Slot,
        req: Request<OutBody>,
        mut end: BodyEnd,
        generation: u64,
        path: &str,
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
                if let Some(pacing) = tenant.pacing.as_deref()
                    && resp.status() == StatusCode::TOO_MANY_REQUESTS
                {
                    self.learn(tenant, pacing, path, resp.headers());
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
    pub(super) async fn send(
        &self,
        tenant: &Tenant,
        slot: Slot,
        req: Request<OutBody>,
        end: Option<&mut BodyEnd>,
        upstream_time: &mut Option<Duration>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let answer = self.exchange(slot, req, end, upstream_time).await;
        self.answered(tenant, answer)
    }

    /// [`Proxy::send`] up to the upstream's answer or failure, before the
    /// failure becomes the client's answer (a refused request may be sent
    /// again instead).
    pub(super) async fn exchange(
        &self,
        slot: Slot,
        req: Request<OutBody>,
        end: Option<&mut BodyEnd>,
        upstream_time: &mut Option<Duration>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let timeout = self.upstream.timeout();
        let sent = upstream_time.map(|_| Instant::now());
        let answer = match end {
            None => self.upstream.send(slot, req, Some(timeout)).await,
            Some(end) => {
                let sending = self.upstream.send(slot, req, None);
                Box::pin(after_body(sending, end, timeout))
                    .await
                    .unwrap_or(Err(SendError::TimedOut))
            }
        };
        if let (Some(total), Some(sent)) = (upstream_time.as_mut(), sent) {
            *total += sent.elapsed();
        }
        answer
    }

    /// The upstream's answer, cleaned, or the client's answer to its
    /// failure.
    pub(super) fn answered(
        &self,
        tenant: &Tenant,
        answer: Result<Response<UpstreamBody>, SendError>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        match answer {
            Err(SendError::TimedOut) => Err(ProxyError::UpstreamTimeout(self.upstream.timeout())),
            Err(e) => {
                tracing::debug!(written = e.maybe_written(), error = %e, "upstream request failed");
                Err(ProxyError::UpstreamUnreachable(error::chain(&e)))
            }
            Ok(mut resp) => {
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

/// What a replay needs of a request's headers, copied before the first
/// send takes them: all but `Authorization` (a replay puts its own token
/// in) and `Host` (the pool's to set). Most requests carry few others,
/// often none, and then nothing is copied (nor allocated).
fn for_a_replay(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let mut kept = Vec::with_capacity(headers.len().saturating_sub(2));
    kept.extend(
        headers
            .iter()
            .filter(|(name, _)| *name != AUTHORIZATION && *name != HOST)
            .map(|(name, value)| (name.clone(), value.clone())),
    );
    kept
}

fn body_error(e: BodyError) -> ProxyError {
    match e {
        BodyError::Stalled(gap) => ProxyError::BodyTimeout(gap),
        BodyError::Read(e) => ProxyError::BadRequest(format!("reading the body: {e}")),
    }
}

pub(super) fn outgoing(
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: OutBody,
) -> Request<OutBody> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    // The pool picks HTTP/2 by ALPN; an HTTP/1.1 request rides either.
    *req.version_mut() = Version::HTTP_11;
    req
}
