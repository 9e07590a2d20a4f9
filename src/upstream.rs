//! The connections to the Criteo API: one pool per worker thread, built on
//! hyper's connection API over rustls.
//!
//! ALPN decides the protocol. An HTTP/2 connection is shared by every
//! request of the worker; HTTP/1.1 connections (plain `http://` upstreams,
//! used by tests, local stand-ins and meshes that originate TLS, or TLS
//! servers that chose HTTP/1.1) are kept in a last-in-first-out idle list
//! and come back to it when their response body has been read to the end.
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

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Notify;
use tower_service::Service;

use crate::config::UpstreamConfig;
use crate::proxy::OutBody;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream.url: {0}")]
    BadUrl(String),
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why a request did not get a response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// Every slot of the worker stayed taken for the whole wait.
#[derive(Debug, thiserror::Error)]
#[error("every upstream connection stayed busy for {0:?}")]
pub struct Busy(pub Duration);

/// How long an idle HTTP/1.1 connection is kept for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// At most this many idle HTTP/1.1 connections per worker; more are closed
/// when their response ends.
const MAX_IDLE: usize = 512;
/// Per upstream connection (HTTP/1.1) or request stream (HTTP/2): what is
/// read ahead of a slow client, or queued before Criteo takes it. hyper's
/// defaults (about 400 KB and 1 MB), times `upstream.max_connections`
/// per worker, would not fit the memory limit.
const BUFFER: usize = 64 * 1024;

/// Where requests go, and the pool that takes them there. Cloning shares
/// the pool.
#[derive(Debug, Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`: what the connector dials.
    dial: Uri,
    scheme: Scheme,
    authority: Authority,
    /// `Host` for HTTP/1.1 requests, built once.
    host: HeaderValue,
    /// A path prefix of `upstream.url` without its trailing slash, if any.
    base_path: Option<Arc<str>>,
    timeout: Duration,
    idle: Mutex<VecDeque<Idle>>,
    /// The HTTP/2 connection every request shares, once ALPN chose it.
    h2: ArcSwapOption<http2::SendRequest<OutBody>>,
    /// Slots taken (requests between [`Upstream::acquire`] and the end of
    /// their response body), at most `max_in_flight`.
    in_flight: AtomicUsize,
    max_in_flight: usize,
    /// Requests waiting for a slot; a slot given back wakes one only when
    /// there are any, so the common path takes no lock.
    waiting: AtomicUsize,
    freed: Notify,
    /// How long a request waits for a slot.
    queue_wait: Duration,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("dial", &self.dial)
            .field("base_path", &self.base_path)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// An HTTP/1.1 connection waiting for its next request.
struct Idle {
    tx: http1::SendRequest<OutBody>,
    since: coarsetime::Instant,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, UpstreamError> {
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
        let host = host_header(&scheme, &authority)?;

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(cfg)?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Ok(Self {
            inner: Arc::new(Inner {
                connector,
                dial,
                scheme,
                authority,
                host,
                base_path,
                timeout: cfg.timeout,
                idle: Mutex::new(VecDeque::new()),
                h2: ArcSwapOption::empty(),
                in_flight: AtomicUsize::new(0),
                max_in_flight: cfg.max_connections,
                waiting: AtomicUsize::new(0),
                freed: Notify::new(),
                queue_wait: cfg.connect_timeout,
            }),
        })
    }

    /// Bound on the wait for the upstream's response headers.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The upstream request target (origin form) for a request's path and
    /// query. Without a base path this copies nothing but a refcount.
    pub fn uri_for(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = match (&self.inner.base_path, pq) {
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
    pub async fn acquire(&self) -> Result<Slot, Busy> {
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
    /// pooled connection or a new one. A request that a pooled connection
    /// could not take (it had just closed) goes on another one; a request
    /// that was written is never sent twice. The slot stays with the
    /// response body until it ends.
    pub async fn send(
        &self,
        slot: Slot,
        mut req: Request<OutBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let inner = &self.inner;
        // HTTP/2, once ALPN has chosen it: every request shares the connection.
        if let Some(mut tx) = inner.shared_h2() {
            inner.absolute_form(&mut req);
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(UpstreamBody::unpooled(resp, slot)),
                // Not taken (the connection is closing): a new one below.
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        // HTTP/1.1: the connection that went idle last.
        while let Some(mut tx) = inner.checkout() {
            if !tx.is_ready() {
                // Still busy (a request body still going up after an early
                // answer, or the connection not yet past its last
                // response): never wait behind it.
                Self::when_ready(tx, &self.inner);
                continue;
            }
            inner.origin_form(&mut req);
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(UpstreamBody::pooled(resp, tx, slot)),
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        // A new connection. Boxed: its future (TLS handshake included) is
        // ten times the size of the rest, and would otherwise be copied
        // with every request's future.
        match Box::pin(inner.connect()).await? {
            Conn::H1(mut tx) => {
                inner.origin_form(&mut req);
                let resp = tx.send_request(req).await?;
                Ok(UpstreamBody::pooled(resp, tx, slot))
            }
            Conn::H2(mut tx) => {
                inner.absolute_form(&mut req);
                let resp = tx.send_request(req).await?;
                Ok(UpstreamBody::unpooled(resp, slot))
            }
        }
    }

    /// Puts a busy connection back in the pool once it can take a request
    /// (dropped if it closes instead).
    fn when_ready(mut tx: http1::SendRequest<OutBody>, pool: &Arc<Inner>) {
        let pool = Arc::clone(pool);
        tokio::spawn(async move {
            if tx.ready().await.is_ok() {
                pool.release(tx);
            }
        });
    }
}

enum Conn {
    H1(http1::SendRequest<OutBody>),
    H2(http2::SendRequest<OutBody>),
}

/// One request's place under `upstream.max_connections`, given back when
/// dropped.
#[derive(Debug)]
pub struct Slot(Arc<Inner>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.0.waiting.load(Ordering::SeqCst) > 0 {
            self.0.freed.notify_one();
        }
    }
}

/// Counts a request among the waiters while it waits.
struct Waiting<'a>(&'a Inner);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn idle_too_long(since: coarsetime::Instant, now: coarsetime::Instant) -> bool {
    now.duration_since(since) > coarsetime::Duration::from(IDLE_TIMEOUT)
}

impl Inner {
    fn try_take(&self) -> bool {
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_in_flight).then_some(n + 1)
            })
            .is_ok()
    }

    /// The shared HTTP/2 connection, unless there is none or it closed
    /// (then it is dropped, and the next request connects anew).
    fn shared_h2(&self) -> Option<http2::SendRequest<OutBody>> {
        let slot = self.h2.load();
        let tx = slot.as_deref()?;
        if tx.is_closed() {
            self.h2.compare_and_swap(&*slot, None);
            return None;
        }
        Some(tx.clone())
    }

    fn checkout(&self) -> Option<http1::SendRequest<OutBody>> {
        let mut idle = lock(&self.idle);
        while let Some(conn) = idle.pop_back() {
            if idle_too_long(conn.since, coarsetime::Instant::now()) {
                // The newest is too old, so are the others.
                idle.clear();
                return None;
            }
            if !conn.tx.is_closed() {
                return Some(conn.tx);
            }
        }
        None
    }

    /// Takes back a connection whose response has been read to the end.
    fn release(&self, tx: http1::SendRequest<OutBody>) {
        if tx.is_closed() {
            return;
        }
        let now = coarsetime::Instant::now();
        let mut idle = lock(&self.idle);
        while idle
            .front()
            .is_some_and(|c| idle_too_long(c.since, now) || c.tx.is_closed())
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle { tx, since: now });
        }
    }

    fn origin_form(&self, req: &mut Request<OutBody>) {
        // Only a request turned away by an HTTP/2 connection has a scheme.
        if req.uri().scheme().is_some() {
            let pq = req.uri().path_and_query().cloned();
            *req.uri_mut() = Uri::from(pq.unwrap_or_else(|| PathAndQuery::from_static("/")));
        }
        req.headers_mut().insert(HOST, self.host.clone());
    }

    fn absolute_form(&self, req: &mut Request<OutBody>) {
        req.headers_mut().remove(HOST);
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        let io = connector
            .call(self.dial.clone())
            .await
            .map_err(SendError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_send_buf_size(BUFFER)
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                }
            });
            self.h2.store(Some(Arc::new(tx.clone())));
            Ok(Conn::H2(tx))
        } else {
            let (tx, conn) = http1::Builder::new()
                .max_buf_size(BUFFER)
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
            });
            Ok(Conn::H1(tx))
        }
    }
}

/// A response body from the upstream. An HTTP/1.1 connection goes back to
/// the pool once its body has been read to the end; a body dropped before
/// that takes its connection with it (hyper closes it). The request's slot
/// is given back at the same moment.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    home: Option<http1::SendRequest<OutBody>>,
    slot: Option<Slot>,
}

impl UpstreamBody {
    fn unpooled(resp: Response<Incoming>, slot: Slot) -> Response<Self> {
        Self::wrap(resp, None, slot)
    }

    fn pooled(
        resp: Response<Incoming>,
        tx: http1::SendRequest<OutBody>,
        slot: Slot,
    ) -> Response<Self> {
        Self::wrap(resp, Some(tx), slot)
    }

    fn wrap(
        resp: Response<Incoming>,
        home: Option<http1::SendRequest<OutBody>>,
        slot: Slot,
    ) -> Response<Self> {
        resp.map(|inner| {
            let mut body = Self {
                inner,
                home,
                slot: Some(slot),
            };
            // An empty body may never be polled.
            if body.inner.is_end_stream() {
                body.go_home();
            }
            body
        })
    }

    /// The body has been read to the end: the connection can take another
    /// request, and the slot another request.
    fn go_home(&mut self) {
        if let (Some(tx), Some(slot)) = (self.home.take(), &self.slot) {
            slot.0.release(tx);
        }
        self.slot = None;
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.go_home(),
            // The server stops polling once `is_end_stream` says so.
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.go_home(),
            Poll::Ready(Some(Err(_))) => {
                this.home = None;
                this.slot = None;
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The `Host` of HTTP/1.1 requests: the authority without a default port.
fn host_header(scheme: &Scheme, authority: &Authority) -> Result<HeaderValue, UpstreamError> {
    let default_port = if *scheme == Scheme::HTTP { 80 } else { 443 };
    let host = match authority.port_u16() {
        Some(p) if p != default_port => format!("{}:{p}", authority.host()),
        _ => authority.host().to_owned(),
    };
    HeaderValue::try_from(host).map_err(|e| UpstreamError::BadUrl(e.to_string()))
}

/// rustls with the ring provider, the web PKI roots and any
/// `upstream.ca_file` roots. ALPN is set by the connector builder.
fn tls_config(cfg: &UpstreamConfig) -> Result<rustls::ClientConfig, UpstreamError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(extra) = &cfg.extra_roots {
        for cert in &extra.certs {
            roots.add(cert.clone())?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_leaves_out_the_default_port() {
        let h = |s: &str, a: &str| {
            host_header(&s.parse().unwrap(), &a.parse().unwrap())
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(h("https", "api.criteo.com:443"), "api.criteo.com");
        assert_eq!(h("https", "api.criteo.com"), "api.criteo.com");
        assert_eq!(h("http", "127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(h("http", "[::1]:80"), "[::1]");
    }
}
