//! The connections of one worker's pool: a last-in-first-out list of idle
//! HTTP/1.1 connections (closed by a reaper once idle too long), one shared
//! HTTP/2 connection dialed by a single request at a time, and the slots
//! that cap the requests in flight.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Uri};
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Notify;
use tower_service::Service;

use super::SendError;
use super::h1::Http1;
use crate::http::OutBody;

/// How long an idle HTTP/1.1 connection is kept for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often the reaper looks for connections idle longer than that.
const REAP_EVERY: Duration = Duration::from_secs(30);
/// At most this many idle HTTP/1.1 connections per worker; more are closed
/// when their response ends.
const MAX_IDLE: usize = 512;
/// Per upstream connection (HTTP/1.1) or request stream (HTTP/2): what is
/// read ahead of a slow client, or queued before Criteo takes it. hyper's
/// defaults (about 400 KB and 1 MB), times `upstream.max_connections`
/// per worker, would not fit the memory limit.
pub(super) const BUFFER: usize = 64 * 1024;
/// HTTP/2 pings on the shared connection, idle or not: a connection that a
/// middlebox dropped silently is found out (and replaced) within
/// interval + timeout, not at the next request's `upstream.timeout`.
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// What ALPN chose, once a connection has told.
const UNKNOWN: u8 = 0;
const H1: u8 = 1;
const H2: u8 = 2;

pub(super) struct Pool {
    pub(super) connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`: what the connector dials.
    pub(super) dial: Uri,
    pub(super) scheme: Scheme,
    pub(super) authority: Authority,
    /// `Host` for HTTP/1.1 requests, built once.
    pub(super) host: HeaderValue,
    idle: Mutex<VecDeque<Idle>>,
    /// Whether a reaper task is watching `idle`.
    reaping: AtomicBool,
    /// The HTTP/2 connection every request shares, once ALPN chose it.
    h2: ArcSwapOption<http2::SendRequest<OutBody>>,
    /// [`UNKNOWN`] until a TLS connection is made (plain `http://` is
    /// [`H1`] from the start); then what ALPN chose.
    protocol: AtomicU8,
    /// Taken by the one request that dials while the protocol may be
    /// HTTP/2; holds why the last such dial failed. The others wait and
    /// share its outcome instead of each dialing a connection of its own
    /// (at start, and again after every GOAWAY).
    dialing: tokio::sync::Mutex<Option<Arc<str>>>,
    /// Dials made under `dialing`, so a waiter can tell that the one it
    /// waited for has ended.
    dials: AtomicU64,
    /// Slots taken (requests between [`super::Upstream::acquire`] and the
    /// end of their response body), at most `max_in_flight`.
    in_flight: AtomicUsize,
    max_in_flight: usize,
    /// Requests waiting for a slot; a slot given back wakes one only when
    /// there are any, so the common path takes no lock.
    pub(super) waiting: AtomicUsize,
    pub(super) freed: Notify,
    /// `upstream.connect_timeout`: how long a request waits for a slot,
    /// and the bound on dialing a connection (TCP and TLS).
    pub(super) queue_wait: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("dial", &self.dial)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

/// An HTTP/1.1 connection waiting for its next request.
struct Idle {
    h1: Box<Http1>,
    since: coarsetime::Instant,
}

/// A connection just made.
pub(super) enum Conn {
    H1(Box<Http1>),
    H2(http2::SendRequest<OutBody>),
}

/// One request's place under `upstream.max_connections`, given back when
/// dropped.
#[derive(Debug)]
pub(crate) struct Slot(pub(super) Arc<Pool>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.0.waiting.load(Ordering::SeqCst) > 0 {
            self.0.freed.notify_one();
        }
    }
}

/// Counts a request among the waiters while it waits.
pub(super) struct Waiting<'a>(pub(super) &'a Pool);

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

// === impl Pool ===

impl Pool {
    pub(super) fn new(
        connector: HttpsConnector<HttpConnector>,
        dial: Uri,
        authority: Authority,
        host: HeaderValue,
        max_in_flight: usize,
        queue_wait: Duration,
    ) -> Self {
        let scheme = dial.scheme().cloned().unwrap_or(Scheme::HTTPS);
        // Only TLS negotiates HTTP/2 (by ALPN); plain HTTP is HTTP/1.1.
        let protocol = if scheme == Scheme::HTTP { H1 } else { UNKNOWN };
        Self {
            connector,
            dial,
            scheme,
            authority,
            host,
            idle: Mutex::new(VecDeque::new()),
            reaping: AtomicBool::new(false),
            h2: ArcSwapOption::empty(),
            protocol: AtomicU8::new(protocol),
            dialing: tokio::sync::Mutex::new(None),
            dials: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight,
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
            queue_wait,
        }
    }

    pub(super) fn try_take(&self) -> bool {
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_in_flight).then_some(n + 1)
            })
            .is_ok()
    }

    /// The shared HTTP/2 connection, unless there is none or it closed
    /// (then it is dropped, and the next request connects anew).
    pub(super) fn shared_h2(&self) -> Option<http2::SendRequest<OutBody>> {
        let slot = self.h2.load();
        let tx = slot.as_deref()?;
        if tx.is_closed() {
            self.h2.compare_and_swap(&*slot, None);
            return None;
        }
        Some(tx.clone())
    }

    /// The HTTP/1.1 connection that went idle last, if it is not too old
    /// (it may have been closed since: see [`Http1::answer`]).
    pub(super) fn checkout(&self) -> Option<Box<Http1>> {
        let mut idle = lock(&self.idle);
        let conn = idle.pop_back()?;
        if idle_too_long(conn.since, coarsetime::Instant::now()) {
            // The newest is too old, so are the others.
            idle.clear();
            return None;
        }
        Some(conn.h1)
    }

    /// Takes back a connection that can take another request.
    pub(super) fn release(self: &Arc<Self>, h1: Box<Http1>) {
        if h1.ended() {
            return;
        }
        h1.idle();
        let now = coarsetime::Instant::now();
        let mut idle = lock(&self.idle);
        while idle.front().is_some_and(|c| idle_too_long(c.since, now)) {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle { h1, since: now });
        }
        drop(idle);
        if !self.reaping.load(Ordering::SeqCst) {
            self.start_reaper();
        }
    }

    /// Drives a connection still sending a request's body (the upstream
    /// answered before reading all of it) in a task of its own, and takes
    /// it back once it can take another request (dropped if it ends
    /// instead).
    pub(super) fn release_when_ready(self: &Arc<Self>, mut h1: Box<Http1>) {
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            if h1.finish().await {
                pool.release(h1);
            }
        });
    }

    /// Closes connections idle longer than [`IDLE_TIMEOUT`] even when no
    /// request comes to find them (each holds a socket and its buffers,
    /// and the upstream closes them anyway); ends once the list is empty,
    /// and the next connection given back starts it again.
    fn start_reaper(self: &Arc<Self>) {
        if self.reaping.swap(true, Ordering::SeqCst) {
            return;
        }
        let pool: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REAP_EVERY).await;
                let Some(pool) = pool.upgrade() else { return };
                let now = coarsetime::Instant::now();
                let mut idle = lock(&pool.idle);
                // Polled here, as nobody else polls an idle connection:
                // one the upstream closed is let go.
                idle.retain_mut(|c| !idle_too_long(c.since, now) && !c.h1.closed_while_idle());
                if idle.is_empty() {
                    // Under the lock, so a connection given back now sees it.
                    pool.reaping.store(false, Ordering::SeqCst);
                    return;
                }
            }
        });
    }

    pub(super) fn origin_form(&self, req: &mut Request<OutBody>) {
        // Only a request turned away by an HTTP/2 connection has a scheme.
        if req.uri().scheme().is_some() {
            let pq = req.uri().path_and_query().cloned();
            *req.uri_mut() = Uri::from(pq.unwrap_or_else(|| PathAndQuery::from_static("/")));
        }
        req.headers_mut().insert(HOST, self.host.clone());
    }

    pub(super) fn absolute_form(&self, req: &mut Request<OutBody>) {
        req.headers_mut().remove(HOST);
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }

    /// A connection for a request that found none to reuse. Over HTTP/1.1
    /// each such request dials its own; while the protocol may be HTTP/2,
    /// one request dials and the others wait for its connection (or its
    /// failure) instead of each opening one.
    pub(super) async fn connect(&self) -> Result<Conn, SendError> {
        if self.protocol.load(Ordering::Relaxed) == H1 {
            return self.dial().await;
        }
        let before = self.dials.load(Ordering::SeqCst);
        let mut failed = self.dialing.lock().await;
        if let Some(tx) = self.shared_h2() {
            return Ok(Conn::H2(tx));
        }
        if self.protocol.load(Ordering::Relaxed) == H1 {
            drop(failed);
            return self.dial().await;
        }
        if self.dials.load(Ordering::SeqCst) != before
            && let Some(why) = &*failed
        {
            return Err(SendError::SharedDial(Arc::clone(why)));
        }
        // Cleared first: a dial whose request is dropped midway must not
        // leave an older failure for the next waiter to report.
        *failed = None;
        self.dials.fetch_add(1, Ordering::SeqCst);
        let dialed = self.dial().await;
        *failed = dialed
            .as_ref()
            .err()
            .map(|e| Arc::from(crate::error::chain(e)));
        dialed
    }

    async fn dial(&self) -> Result<Conn, SendError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        // `upstream.connect_timeout` bounds TCP and TLS together: the
        // connector's own timeout covers only the TCP connect, and a peer
        // that accepts and then stalls the handshake must not hold this
        // request (nor, under HTTP/2 single flight, every other) forever.
        let io = tokio::time::timeout(self.queue_wait, connector.call(self.dial.clone()))
            .await
            .map_err(|_| {
                SendError::Connect(
                    format!(
                        "no TLS handshake within {:?} (upstream.connect_timeout)",
                        self.queue_wait
                    )
                    .into(),
                )
            })?
            .map_err(SendError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_send_buf_size(BUFFER)
                .keep_alive_interval(PING_INTERVAL)
                .keep_alive_timeout(PING_TIMEOUT)
                .keep_alive_while_idle(true)
                .handshake(io)
                .await
                .map_err(SendError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                }
            });
            self.h2.store(Some(Arc::new(tx.clone())));
            self.protocol.store(H2, Ordering::Relaxed);
            Ok(Conn::H2(tx))
        } else {
            let (tx, conn) = http1::Builder::new()
                .max_buf_size(BUFFER)
                .handshake(io)
                .await
                .map_err(SendError::Handshake)?;
            // Not spawned: driven by the requests that use it (see `h1`).
            self.protocol.store(H1, Ordering::Relaxed);
            Ok(Conn::H1(Http1::new(tx, conn)))
        }
    }
}
