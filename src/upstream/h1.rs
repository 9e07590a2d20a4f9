//! An HTTP/1.1 connection driven by the request that uses it, instead of
//! a task of its own.
//!
//! hyper's `http1::Connection` is a future that does the connection's
//! reading and writing; the usual way is to spawn it and talk to it
//! through `SendRequest`'s channel, which costs two task wake-ups per
//! request (the connection's task to write the request, the request's
//! task when the answer is in). Here the request's own task polls the
//! connection while it waits for the answer, and its response body
//! ([`super::UpstreamBody`]) while the answer streams; no other task
//! touches it. Between requests nobody polls it: a connection the upstream
//! closed meanwhile is found out by the next request's first poll, before
//! anything is written (the request then goes on another connection), or
//! by the pool's reaper.
//!
//! Whatever the connection hands over (the answer, the body's bytes) is
//! put in place by a poll made in this very task, so waking the task for
//! it only polls it once more for nothing (a third poll per request, of
//! the whole client connection). The connection is therefore polled with
//! a [`Relay`] waker, muted while the task takes what the connection
//! handed over, and what it hands over is taken with a waker that does
//! nothing.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::coop::Unconstrained;
use tokio::time::{Instant, Sleep};

use crate::http::OutBody;

/// What the connector dials: TCP, maybe under TLS.
pub(super) type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// One HTTP/1.1 connection: its sender and the connection itself. Boxed
/// where it is kept, so that it moves between the idle list, a request
/// and its response body as a pointer.
pub(super) struct Http1 {
    tx: http1::SendRequest<OutBody>,
    /// `None` once the connection has ended (closed by either side, or
    /// failed): dropping it closes the socket, and fails the request it
    /// was serving, if any.
    conn: Option<http1::Connection<Io, OutBody>>,
    relay: Arc<Relay>,
    /// `relay` as a waker, made once.
    waker: Waker,
    /// Bounds the wait for an answer (`upstream.timeout`). One per
    /// connection, moved from request to request: moving a timer to a
    /// later deadline is one atomic operation, where a timer made and
    /// dropped per request goes in and out of the runtime's timer wheel.
    timer: Pin<Box<Sleep>>,
}

/// What hyper answers a request with.
type Answer = Result<Response<Incoming>, TrySendError<Request<OutBody>>>;

/// Why a request got no answer on a connection.
#[derive(Debug)]
pub(super) enum NoAnswer {
    /// Not written (the connection had closed): it may go on another one.
    /// (Boxed: rare, and the other variants are small.)
    Back(Box<Request<OutBody>>, hyper::Error),
    /// The connection failed while it was being sent or answered.
    Failed(hyper::Error),
    /// No answer by the deadline.
    TimedOut,
}

/// The waker the connection is polled with: passes its wake-ups on to the
/// task that polled it last, unless muted. The connection's socket (and a
/// streamed request body) wake it from outside the task; muted, it drops
/// the wake-ups that the task causes itself by handing a request over or
/// taking the body's bytes. A worker is one thread, so nothing else can
/// wake it in the instant it is muted.
#[derive(Debug, Default)]
struct Relay {
    task: Mutex<Option<Waker>>,
    muted: AtomicBool,
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.muted.load(Ordering::Relaxed) {
            return;
        }
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

impl Relay {
    /// Wake-ups go to `task` from now on (to nobody for `None`).
    fn set(&self, task: Option<&Waker>) {
        let mut now = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        match (now.as_ref(), task) {
            (Some(a), Some(b)) if a.will_wake(b) => {}
            _ => *now = task.cloned(),
        }
    }
}

/// A context whose waker does nothing, for what only this task's own
/// polls of the connection make ready.
fn unwoken() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

impl std::fmt::Debug for Http1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1")
            .field("ended", &self.conn.is_none())
            .finish_non_exhaustive()
    }
}

impl Http1 {
    pub(super) fn new(
        tx: http1::SendRequest<OutBody>,
        conn: http1::Connection<Io, OutBody>,
    ) -> Box<Self> {
        let relay = Arc::new(Relay::default());
        Box::new(Self {
            tx,
            conn: Some(conn),
            waker: Waker::from(Arc::clone(&relay)),
            relay,
            timer: Box::pin(tokio::time::sleep(Duration::MAX)),
        })
    }

    pub(super) fn ended(&self) -> bool {
        self.conn.is_none()
    }

    /// Lets the connection read and write what it can; `cx`'s task is
    /// woken when it can do more. Ready once it has ended.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.poll_for(Some(cx.waker()))
    }

    fn poll_for(&mut self, task: Option<&Waker>) -> Poll<()> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(());
        };
        self.relay.set(task);
        let Poll::Ready(end) = Pin::new(conn).poll(&mut Context::from_waker(&self.waker)) else {
            return Poll::Pending;
        };
        if let Err(e) = end {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
        self.conn = None;
        Poll::Ready(())
    }

    /// Whether it can take a request: not while it is still sending an
    /// earlier request's body after its answer, nor once it has ended.
    pub(super) fn is_ready(&self) -> bool {
        self.tx.is_ready()
    }

    /// Going idle: wakes nobody until its next request. (The task that
    /// used it last may be gone; its waker would keep it in memory.)
    pub(super) fn idle(&self) {
        self.relay.set(None);
    }

    /// Whether the upstream closed it while it was idle: polled here, as
    /// an idle connection is polled by nobody else.
    pub(super) fn closed_while_idle(&mut self) -> bool {
        self.poll_for(None).is_ready()
    }

    /// Sends `req`, the first half: hands it over, and returns its answer
    /// to come, for [`Http1::answer`] to wait for with the connection
    /// driven. Two halves, so that the caller pins the answer where it
    /// lies (in every request's future) instead of a second place for the
    /// request beside it. `deadline` (if any) bounds the wait.
    pub(super) fn hand_over(
        &mut self,
        req: Request<OutBody>,
        deadline: Option<Instant>,
    ) -> Unconstrained<impl Future<Output = Answer> + use<>> {
        if let Some(deadline) = deadline {
            self.timer.as_mut().reset(deadline);
        }
        // Muted: handing the request over wakes the connection, which is
        // polled next.
        self.relay.muted.store(true, Ordering::Relaxed);
        let answer = self.tx.try_send_request(req);
        self.relay.muted.store(false, Ordering::Relaxed);
        // Outside tokio's cooperative budget: polled with a waker that does
        // nothing, a budget-forced `Pending` would never be followed by a
        // wake-up.
        tokio::task::coop::unconstrained(answer)
    }

    /// Sends a request, the second half: drives the connection until the
    /// answer [`Http1::hand_over`] returned is in, or the deadline given
    /// there (if `timed`) has passed. A request the connection did not
    /// take comes back: so does one sent on a connection the upstream
    /// closed while it was idle, as the first poll finds the end of stream
    /// before it writes.
    pub(super) async fn answer<F: Future<Output = Answer>>(
        &mut self,
        mut answer: Pin<&mut F>,
        timed: bool,
    ) -> Result<Response<Incoming>, NoAnswer> {
        std::future::poll_fn(|cx| {
            // The connection first: it writes the request, and reads the
            // answer that the second poll then finds. Only the connection
            // (and the timer) wait on anything outside this task (its
            // socket, the client's body), so only they register this
            // task's waker: the answer is put in place by the connection's
            // poll, and registering for it would wake this task again for
            // nothing.
            let _ = self.poll(cx);
            if let Poll::Ready(answer) = answer.as_mut().poll(&mut unwoken()) {
                return Poll::Ready(answer.map_err(|mut e| match e.take_message() {
                    Some(back) => NoAnswer::Back(Box::new(back), e.into_error()),
                    None => NoAnswer::Failed(e.into_error()),
                }));
            }
            if timed
                && self
                    .timer
                    .as_mut()
                    .poll(&mut Context::from_waker(&self.waker))
                    .is_ready()
            {
                return Poll::Ready(Err(NoAnswer::TimedOut));
            }
            Poll::Pending
        })
        .await
    }

    /// The next frame of `body`, this connection's answer, driving the
    /// connection when the body has nothing yet.
    pub(super) fn poll_body(
        &mut self,
        body: &mut Incoming,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = self.take(body);
        if polled.is_ready() {
            return polled;
        }
        let _ = self.poll(cx);
        self.take(body)
    }

    /// What the connection has handed `body` so far. Muted: taking it
    /// wakes the connection, which this task polls anyway when it next
    /// wants more.
    fn take(&self, body: &mut Incoming) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.relay.muted.store(true, Ordering::Relaxed);
        let polled = Pin::new(body).poll_frame(&mut unwoken());
        self.relay.muted.store(false, Ordering::Relaxed);
        polled
    }

    /// Drives a connection that is still sending a request's body after
    /// its answer ended, until it can take another request (true) or ends.
    pub(super) async fn finish(&mut self) -> bool {
        std::future::poll_fn(|cx| {
            if self.poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            if self.tx.is_ready() {
                return Poll::Ready(true);
            }
            Poll::Pending
        })
        .await
    }
}
