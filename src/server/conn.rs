//! One accepted connection, on either listener, from its first byte to its
//! close: no phase of it can hold the connection forever.
//!
//! - Before its first complete request head (protocol detection, a silent
//!   socket, a half-sent HTTP/2 preface or HTTP/1 head):
//!   `server.header_read_timeout`, then closed.
//! - With no request in progress (HTTP/1.1 keep-alive, an HTTP/2
//!   connection with no open stream): `server.idle_timeout`, then a
//!   graceful close (HTTP/2: GOAWAY); if that does not end it, closed
//!   after `server.header_read_timeout` more.
//! - HTTP/1.1 heads after the first: `server.header_read_timeout` from
//!   the end of the previous response, then closed (hyper's own
//!   `header_read_timeout` would do the same with a timer made, armed and
//!   dropped per request). HTTP/2: a ping after `server.idle_timeout` of
//!   silence, closed if unanswered as long.
//! - Request bodies: `server.body_read_timeout` between bytes
//!   (`proxy/body.rs`).
//!
//! One timer per connection, re-armed only when it fires; per request, a
//! counter goes up when the head arrives and down when the response body
//! ends. The rule the watchdog applies, and the waker its timer is polled
//! with, are in `watchdog.rs`.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::{Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::watchdog::{Alarm, Seen, Verdict, verdict};

/// The timers of a connection, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) header_read: Duration,
    pub(crate) idle: Duration,
}

/// A connection's state shared by its requests and its watchdog, with
/// what its requests are served by (`app`), so that a request clones one
/// reference, as it would for the app alone.
#[derive(Debug)]
struct Conn<T> {
    app: T,
    /// Requests whose response has not ended.
    open: AtomicUsize,
    /// When the last response ended (coarse clock ticks); 0: none yet.
    last_end: AtomicU64,
    /// Whether it is an HTTP/2 connection (known from its first request).
    h2: AtomicBool,
}

impl<T> Conn<T> {
    fn new(app: T) -> Arc<Self> {
        Arc::new(Self {
            app,
            open: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            h2: AtomicBool::new(false),
        })
    }
}

/// One request in progress on a connection, from its head to the end of
/// its response body (or until either is dropped).
#[derive(Debug)]
struct Open<T>(Arc<Conn<T>>);

impl<T> Open<T> {
    fn begin(conn: &Arc<Conn<T>>) -> Self {
        conn.open.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(conn))
    }

    fn app(&self) -> &T {
        &self.0.app
    }
}

impl<T> Drop for Open<T> {
    fn drop(&mut self) {
        let now = coarsetime::Instant::now().as_ticks().max(1);
        self.0.last_end.store(now, Ordering::Release);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as open until it ends.
#[derive(Debug)]
struct Tracked<B, T> {
    body: B,
    open: Option<Open<T>>,
}

impl<B: Body, T> Tracked<B, T> {
    fn new(body: B, open: Open<T>) -> Self {
        let open = (!body.is_end_stream()).then_some(open);
        Self { body, open }
    }
}

impl<B: Body + Unpin, T> Body for Tracked<B, T> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None | Some(Err(_))) => this.open = None,
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.open = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves `conn` until it ends, `stop` fires (then it is closed
/// gracefully) or a phase overstays its timer. `shutdown` asks `conn` for
/// a graceful close; `permit` (its place under a connection limit) is
/// given back before the socket closes, so a client that sees the close
/// finds the place free.
async fn drive<C, E, T, P>(
    conn: C,
    shutdown: impl Fn(Pin<&mut C>),
    state: &Conn<T>,
    timeouts: Timeouts,
    mut stop: watch::Receiver<()>,
    permit: P,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut conn = pin!(conn);
    let start = Instant::now();
    let first = start.checked_add(timeouts.header_read).unwrap_or(start);
    let mut timer = pin!(tokio::time::sleep_until(first.into()));
    let mut closing = false;
    let mut stopping = false;
    let mut alarm: Option<(Arc<Alarm>, Waker)> = None;
    let result = {
        let mut stopped = pin!(stop.changed());
        std::future::poll_fn(|cx| {
            loop {
                if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                    return Poll::Ready(r);
                }
                let (bell, waker) = Alarm::for_task(&mut alarm, cx.waker());
                if !bell.answer() {
                    return Poll::Pending;
                }
                let mut acx = Context::from_waker(waker);
                let mut acted = false;
                if !stopping && stopped.as_mut().poll(&mut acx).is_ready() {
                    stopping = true;
                    shutdown(conn.as_mut());
                    acted = true;
                }
                if timer.as_mut().poll(&mut acx).is_ready() {
                    let last = state.last_end.load(Ordering::Acquire);
                    let since = (last != 0).then(|| {
                        coarsetime::Instant::now()
                            .duration_since(coarsetime::Instant::from_ticks(last))
                            .into()
                    });
                    let seen = Seen {
                        open: state.open.load(Ordering::Acquire),
                        since,
                        closing,
                        h2: state.h2.load(Ordering::Relaxed),
                    };
                    let now = Instant::now();
                    match verdict(seen, now, timeouts) {
                        Verdict::Wait(at) => timer.as_mut().reset(at.into()),
                        Verdict::Idle => {
                            closing = true;
                            shutdown(conn.as_mut());
                            let at = now.checked_add(timeouts.header_read).unwrap_or(now);
                            timer.as_mut().reset(at.into());
                        }
                        Verdict::Drop => return Poll::Ready(Ok(())),
                    }
                    acted = true;
                }
                if !acted {
                    return Poll::Pending;
                }
                // The connection again (a graceful close may end it at
                // once), then the re-armed timer, to register it.
                bell.ring();
            }
        })
        .await
    };
    drop(permit);
    drop(stop);
    result
}

/// What a connection's requests are answered by: the proxy, or the admin
/// service with the peer it answers.
pub(crate) trait Handler: Send + Sync + 'static {
    /// The listener, as its log lines name it.
    const LISTENER: &'static str;
    type Body: Body<Data: Send, Error: Into<Box<dyn StdError + Send + Sync>>>
        + Send
        + Unpin
        + 'static;

    fn call(&self, req: Request<Incoming>) -> impl Future<Output = Response<Self::Body>> + Send;
}

/// Serves one accepted connection on a task of its own: `handler` answers
/// its requests, each counted open from its head to the end of its
/// response body, and [`drive`] bounds its phases and closes it gracefully
/// when `drain` shuts down. `permit` is its place under a connection limit.
pub(crate) fn spawn<H: Handler>(
    builder: &auto::Builder<TokioExecutor>,
    stream: TcpStream,
    handler: H,
    timeouts: Timeouts,
    drain: &Drain,
    permit: OwnedSemaphorePermit,
) {
    let state = Conn::new(handler);
    let svc = {
        let state = Arc::clone(&state);
        service_fn(move |req: Request<Incoming>| {
            if req.version() == Version::HTTP_2 {
                state.h2.store(true, Ordering::Relaxed);
            }
            let open = Open::begin(&state);
            async move {
                let resp = open.app().call(req).await;
                Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, open)))
            }
        })
    };
    let http = builder
        .serve_connection(TokioIo::new(stream), svc)
        .into_owned();
    let stop = drain.watcher();
    tokio::spawn(async move {
        let shutdown = |c: Pin<&mut _>| auto::Connection::graceful_shutdown(c);
        let served = drive(http, shutdown, &state, timeouts, stop, permit);
        if let Err(e) = served.await {
            tracing::debug!(error = %e, "{} connection ended with an error", H::LISTENER);
        }
    });
}

/// Tells every connection to close gracefully and waits until they have
/// (what hyper-util's `GracefulShutdown` does for hyper's own connection
/// types; ours are driven by [`drive`]).
#[derive(Debug)]
pub(crate) struct Drain {
    tx: watch::Sender<()>,
}

impl Drain {
    pub(crate) fn new() -> Self {
        Self {
            tx: watch::Sender::new(()),
        }
    }

    /// What a new connection watches; taken before it is spawned, so that
    /// a shutdown that starts meanwhile is not missed.
    pub(crate) fn watcher(&self) -> watch::Receiver<()> {
        self.tx.subscribe()
    }

    pub(crate) async fn shutdown(self) {
        let _ = self.tx.send(());
        self.tx.closed().await;
    }
}
