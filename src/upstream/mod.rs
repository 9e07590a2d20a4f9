//! The connections to the Criteo API: one pool per worker thread, built on
//! hyper's connection API over rustls.
//!
//! ALPN decides the protocol. An HTTP/2 connection is shared by every
//! request of the worker; HTTP/1.1 connections (plain `http://` upstreams,
//! used by tests, local stand-ins and meshes that originate TLS, or TLS
//! servers that chose HTTP/1.1) are kept in a last-in-first-out idle list
//! and come back to it when their response body has been read to the end.
//! An HTTP/2 connection runs in a task of its own; an HTTP/1.1 connection
//! has none: the request that uses it drives it ([`h1`]).
//!
//! This replaces hyper-util's legacy client, which is built for a pool
//! shared between threads and pays for it on every request: a keyed map
//! behind a lock, a boxed future, and the `Host` header formatted anew.
//! Here the `Host` value is built once, the pool key is implicit (one
//! upstream) and the lock is never contended (one thread per pool).
//!
//! Each request holds a [`Slot`] from before it is sent until its response
//! body ends: at most the worker's share of `upstream.max_connections`, so
//! at most that many HTTP/1.1 connections (and HTTP/2 streams) per worker.
//! A request that finds none free waits for one up to
//! `upstream.connect_timeout`, then gets `503 upstream_busy`.

mod body;
mod h1;
mod pool;
mod tls;

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use tokio::time::{Instant, Timeout};

pub(crate) use body::UpstreamBody;
use h1::NoAnswer;
pub(crate) use pool::Slot;
use pool::{Conn, Pool, Waiting};

use crate::config::UpstreamConfig;
use crate::http::OutBody;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream.url: {0}")]
    BadUrl(String),
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why a request did not get a response from the upstream. Only
/// [`SendError::Request`] may have reached the upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// TCP or TLS failed: nothing was written.
    #[error("cannot connect")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The HTTP/2 or HTTP/1.1 handshake failed: nothing was written.
    #[error("cannot connect")]
    Handshake(#[source] hyper::Error),
    /// The dial this request waited for (HTTP/2 single flight) failed:
    /// nothing was written.
    #[error("cannot connect: {0}")]
    SharedDial(Arc<str>),
    /// The connection failed while the request was being sent or answered.
    #[error(transparent)]
    Request(#[from] hyper::Error),
    /// No answer within the bound the request was sent with.
    #[error("no answer in time")]
    TimedOut,
}

impl From<NoAnswer> for SendError {
    fn from(e: NoAnswer) -> Self {
        match e {
            // A fresh connection that closed at once.
            NoAnswer::Back(_, e) | NoAnswer::Failed(e) => SendError::Request(e),
            NoAnswer::TimedOut => SendError::TimedOut,
        }
    }
}

impl SendError {
    /// Whether any of the request may have reached the upstream (a
    /// request that was not is safe to send again).
    pub(crate) fn maybe_written(&self) -> bool {
        matches!(self, SendError::Request(_) | SendError::TimedOut)
    }

    /// Whether the HTTP/2 upstream said it did not process the request,
    /// which may then be sent again (RFC 9113): its stream was reset with
    /// `REFUSED_STREAM` (section 8.7), or a `GOAWAY` came whose last stream
    /// is below it, or before it could be opened (section 6.8: nginx does
    /// so after `keepalive_requests`). Only the peer's word counts: a
    /// stream ended by anything else (an I/O error, h2's own reset) may
    /// have been processed. Looked at only once a request has failed.
    pub(crate) fn refused(&self) -> bool {
        let SendError::Request(e) = self else {
            return false;
        };
        let Some(h2) = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>())
        else {
            return false;
        };
        h2.is_remote()
            && (h2.is_go_away()
                || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)))
    }
}

/// Every slot of the worker stayed taken for the whole wait.
#[derive(Debug, thiserror::Error)]
#[error("every upstream connection stayed busy for {0:?}")]
pub(crate) struct Busy(pub Duration);

/// Where requests go, and the pool that takes them there. Cloning shares
/// the pool.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    inner: Arc<Pool>,
    /// A path prefix of `upstream.url` without its trailing slash, if any.
    base_path: Option<Arc<str>>,
    timeout: Duration,
}

impl Upstream {
    pub(crate) fn new(cfg: &UpstreamConfig) -> Result<Self, UpstreamError> {
        let uri: Uri = cfg
            .url
            .as_str()
            .parse()
            .map_err(|e: http::uri::InvalidUri| UpstreamError::BadUrl(e.to_string()))?;
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTPS);
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| UpstreamError::BadUrl("has no host".into()))?;
        let base_path = match uri.path().trim_end_matches('/') {
            "" => None,
            p => Some(Arc::from(p)),
        };
        let dial = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| UpstreamError::BadUrl(e.to_string()))?;
        let host = tls::host_header(&scheme, &authority)?;
        let pool = Pool::new(
            tls::connector(cfg)?,
            dial,
            authority,
            host,
            cfg.max_connections,
            cfg.connect_timeout,
        );
        Ok(Self {
            inner: Arc::new(pool),
            base_path,
            timeout: cfg.timeout,
        })
    }

    /// Bound on the wait for the upstream's response headers.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The upstream request target (origin form) for a request's path and
    /// query. Without a base path this copies nothing but a refcount.
    pub(crate) fn uri_for(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = match (&self.base_path, pq) {
            (None, Some(pq)) => pq.clone(),
            (None, None) => PathAndQuery::from_static("/"),
            (Some(base), pq) => {
                let rest = pq.map_or("/", |p| p.as_str());
                PathAndQuery::try_from(format!("{base}{rest}"))?
            }
        };
        Ok(Uri::from(pq))
    }

    /// A slot for one request, waiting for one at most
    /// `upstream.connect_timeout` when the worker has none free. Taken
    /// before the client's body is read, so that a busy answer leaves it
    /// unread (and drainable).
    pub(crate) async fn acquire(&self) -> Result<Slot, Busy> {
        if self.inner.try_take() {
            return Ok(Slot(Arc::clone(&self.inner)));
        }
        // Boxed: rare, and the request's future would carry its size.
        Box::pin(self.wait_for_slot()).await
    }

    async fn wait_for_slot(&self) -> Result<Slot, Busy> {
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + inner.queue_wait;
        inner.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(inner);
        loop {
            let freed = inner.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a slot given back between
            // the check and the wait still wakes this one.
            freed.as_mut().enable();
            if inner.try_take() {
                return Ok(Slot(Arc::clone(inner)));
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(Busy(inner.queue_wait));
            }
        }
    }

    /// Sends a request whose URI came from [`Upstream::uri_for`], on a
    /// pooled connection or a new one, and waits for its answer's head at
    /// most `bound` (unbounded with `None`: the caller bounds the wait). A
    /// request that a pooled connection could not take (it had just
    /// closed) goes on another one; a request that was written is never
    /// sent twice here (the caller may send again one the upstream
    /// refused unprocessed: [`SendError::refused`]). The slot stays with
    /// the response body until it ends.
    pub(crate) async fn send(
        &self,
        slot: Slot,
        mut req: Request<OutBody>,
        bound: Option<Duration>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let deadline = bound.and_then(|b| Instant::now().checked_add(b));
        let inner = &self.inner;
        // HTTP/2, once ALPN has chosen it: every request shares the connection.
        if let Some(mut tx) = inner.shared_h2() {
            inner.absolute_form(&mut req);
            let sent = within(deadline, tx.try_send_request(req)).await;
            match sent.map_err(|_| SendError::TimedOut)? {
                Ok(resp) => return Ok(UpstreamBody::unpooled(resp, slot)),
                // Not taken (the connection is closing): a new one below.
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        // HTTP/1.1: the connection that went idle last.
        while let Some(mut h1) = inner.checkout() {
            if !h1.is_ready() {
                // Still sending an earlier request's body after its
                // answer: never wait behind it.
                inner.release_when_ready(h1);
                continue;
            }
            inner.origin_form(&mut req);
            let answer = pin!(h1.hand_over(req, deadline));
            match h1.answer(answer, deadline.is_some()).await {
                Ok(resp) => return Ok(UpstreamBody::pooled(resp, h1, slot)),
                // Not written (the upstream had closed the connection):
                // on the next one.
                Err(NoAnswer::Back(back, _)) => req = *back,
                Err(e) => return Err(e.into()),
            }
        }
        // A new connection. Boxed: its future (TLS handshake included) is
        // ten times the size of the rest, and would otherwise be copied
        // with every request's future.
        let dialed = within(deadline, Box::pin(inner.connect())).await;
        match dialed.map_err(|_| SendError::TimedOut)?? {
            Conn::H1(mut h1) => {
                inner.origin_form(&mut req);
                let answer = pin!(h1.hand_over(req, deadline));
                let resp = h1.answer(answer, deadline.is_some()).await?;
                Ok(UpstreamBody::pooled(resp, h1, slot))
            }
            Conn::H2(mut tx) => {
                inner.absolute_form(&mut req);
                let sent = within(deadline, tx.send_request(req)).await;
                let resp = sent.map_err(|_| SendError::TimedOut)??;
                Ok(UpstreamBody::unpooled(resp, slot))
            }
        }
    }
}

/// `f`, bounded by `deadline` if any. A plain function, not an `async`
/// one: the caller awaits the timeout where it is made, with no second
/// place for `f` beside it in every request's future.
fn within<F: Future>(deadline: Option<Instant>, f: F) -> Timeout<F> {
    match deadline {
        Some(at) => tokio::time::timeout_at(at, f),
        None => tokio::time::timeout(Duration::MAX, f),
    }
}
