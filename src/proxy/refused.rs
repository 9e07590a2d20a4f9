//! A request the HTTP/2 upstream turned away unprocessed (RFC 9113: its
//! stream reset with `REFUSED_STREAM`, section 8.7, or above the last
//! stream of a `GOAWAY`, section 6.8, as nginx does after
//! `keepalive_requests`) can be sent again: it is, when its body was kept,
//! a bounded number of times. A streamed body cannot be, and its client
//! gets the error.

use std::time::Duration;

use http::Response;

use super::send::{Replay, outgoing};
use super::settle::Failed;
use super::{OutBody, Proxy, ResponseBody};
use crate::error::{self, ProxyError};
use crate::tenant::Tenant;
use crate::upstream::{SendError, UpstreamBody};

/// A request whose body was kept is sent at most this many more times
/// while the upstream refuses it unprocessed (HTTP/2 `REFUSED_STREAM`, or
/// a `GOAWAY` before it): enough for a connection that closes and the
/// next one, bounded for an upstream that refuses everything.
pub(super) const RESENDS: u32 = 2;

// === impl Proxy ===

impl Proxy {
    /// The upstream turned the request away unprocessed (see
    /// [`SendError::refused`]): it goes again, on the same HTTP/2
    /// connection if that one only refused the stream, on the next one
    /// (the pool dials it once for every waiting request) after a
    /// `GOAWAY`. It keeps its pacing turn and counts as one request (it
    /// was never processed), and goes with the cached token: the one it
    /// had, unless that was renewed meanwhile; then, as any answer, it
    /// may be replayed on a 401 or 429.
    pub(super) async fn resend(
        &self,
        tenant: &Tenant,
        refused: SendError,
        mut again: Replay,
        upstream_time: &mut Option<Duration>,
    ) -> Result<Response<ResponseBody>, Failed> {
        tracing::debug!(
            tenant = &*tenant.name,
            error = %error::chain(&refused),
            "the upstream refused the request unprocessed; sending it again"
        );
        again.generation = self
            .inject(tenant, &mut again.headers)
            .await
            .map_err(Failed::read)?;
        let resp = self
            .send_again(tenant, &again, RESENDS - 1, upstream_time)
            .await?;
        self.replay_if_asked(tenant, resp, again, upstream_time)
            .await
    }

    /// Sends a kept request (its token in) on a new slot; sent again, at
    /// most `resends` times, while the upstream refuses it unprocessed.
    pub(super) async fn send_again(
        &self,
        tenant: &Tenant,
        again: &Replay,
        mut resends: u32,
        upstream_time: &mut Option<Duration>,
    ) -> Result<Response<UpstreamBody>, Failed> {
        loop {
            let slot = self
                .upstream
                .acquire()
                .await
                .map_err(|busy| Failed::read(ProxyError::UpstreamBusy(busy.0)))?;
            let req = outgoing(
                again.method.clone(),
                again.uri.clone(),
                again.headers.clone(),
                OutBody::full(again.bytes.clone()),
            );
            match self.exchange(slot, req, None, upstream_time).await {
                Err(e) if e.refused() && resends > 0 => {
                    resends -= 1;
                    tracing::debug!(
                        tenant = &*tenant.name,
                        error = %error::chain(&e),
                        "the upstream refused the request unprocessed; sending it again"
                    );
                }
                answer => return self.answered(tenant, answer).map_err(Failed::read),
            }
        }
    }
}
