//! Phase 4, send: the body kept for a replay (or streamed), a place on an
//! upstream connection, the request sent with its answer bounded in time,
//! and replayed once with a fresh token on a 401.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Limited};
use hyper::body::Incoming;

use super::settle::{Failed, Leftover};
use super::unavailable;
use super::{BodyEnd, BodyError, End, OutBody, Prepared, Proxy, ResponseBody, headers, prepare};
use crate::error::{self, ProxyError};
use crate::tenant::Tenant;
use crate::token::Newer;
use crate::upstream::{Slot, UpstreamBody};

/// How much of a 401's body is read (and dropped) before the replay, so
/// that the pooled connection can be reused.
const DRAIN_LIMIT: usize = 64 * 1024;

/// What a replay sends again.
#[derive(Debug)]
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    bytes: Bytes,
    generation: u64,
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
            .wait_usable(Newer::Than(generation), self.wait_timeout)
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
