//! HTTP body types shared by the request path and the upstream pool: the
//! body a request carries upstream. In its own module so that `proxy`
//! (which builds it) and `upstream` (which sends it) do not import each
//! other.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Sleep;

/// The body of a request sent upstream.
#[derive(Debug)]
pub(crate) enum OutBody {
    /// Complete bytes (cheap to clone for a replay).
    Full(Option<Bytes>),
    /// Streaming: bytes already read, then the rest of the client's body.
    /// Boxed: rare, and much larger than the common case.
    Stream(Box<Streamed>),
}

/// A streamed body's state.
#[derive(Debug)]
pub(crate) struct Streamed {
    prefix: Option<Bytes>,
    rest: Incoming,
    /// `server.body_read_timeout`: the longest wait for the client's next
    /// bytes while the upstream asks for them.
    gap: Duration,
    stall: Pin<Box<Sleep>>,
    /// Whether `stall` runs: only while waiting for the client.
    armed: bool,
    end: Option<oneshot::Sender<End>>,
}

/// How a streamed body finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Sent to the last byte.
    Complete,
    /// The client sent nothing for `server.body_read_timeout`.
    Stalled(Duration),
    /// Reading the client's body failed, or the body was dropped before
    /// its end (the upstream answered or failed first).
    Broken,
}

/// Why a request body could not be read or sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("reading the request body: {0}")]
    Read(#[from] hyper::Error),
    #[error("the request body sent nothing for {0:?}")]
    Stalled(Duration),
}

impl OutBody {
    pub(crate) fn full(bytes: Bytes) -> Self {
        if bytes.is_empty() {
            OutBody::Full(None)
        } else {
            OutBody::Full(Some(bytes))
        }
    }

    /// What is left of the client's body, unsent: a streamed body that
    /// will not go upstream after all can still be read and dropped.
    pub(crate) fn into_unsent(self) -> Option<Incoming> {
        match self {
            OutBody::Full(_) => None,
            OutBody::Stream(s) => Some(s.rest),
        }
    }

    /// `prefix` (already read) then the rest of `rest`, and the receiver
    /// that learns when it has all been sent (a sender dropped before
    /// that counts as [`End::Broken`]).
    pub(crate) fn stream(prefix: Option<Bytes>, rest: Incoming, gap: Duration) -> (Self, BodyEnd) {
        let (tx, rx) = oneshot::channel();
        let body = OutBody::Stream(Box::new(Streamed {
            prefix,
            rest,
            gap,
            stall: Box::pin(tokio::time::sleep(gap)),
            armed: false,
            end: Some(tx),
        }));
        (body, BodyEnd { rx, seen: None })
    }
}

impl Streamed {
    fn finish(&mut self, how: End) {
        if let Some(tx) = self.end.take() {
            let _ = tx.send(how);
        }
    }

    fn poll_rest(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match Pin::new(&mut self.rest).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.armed = false;
                if self.rest.is_end_stream() {
                    self.finish(End::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                self.finish(End::Complete);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.finish(End::Broken);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                if !self.armed {
                    let deadline = tokio::time::Instant::now() + self.gap;
                    self.stall.as_mut().reset(deadline);
                    self.armed = true;
                }
                if self.stall.as_mut().poll(cx).is_ready() {
                    self.finish(End::Stalled(self.gap));
                    return Poll::Ready(Some(Err(BodyError::Stalled(self.gap))));
                }
                Poll::Pending
            }
        }
    }
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            OutBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            OutBody::Stream(s) => match s.prefix.take() {
                Some(p) => Poll::Ready(Some(Ok(Frame::data(p)))),
                None => s.poll_rest(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Full(b) => b.is_none(),
            OutBody::Stream(s) => s.prefix.is_none() && s.rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            OutBody::Stream(s) => {
                let extra = s.prefix.as_ref().map_or(0, |p| p.len() as u64);
                let h = s.rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + extra);
                if let Some(u) = h.upper() {
                    out.set_upper(u + extra);
                }
                out
            }
        }
    }
}

/// Learns when a streamed body has been sent, and how it ended.
#[derive(Debug)]
pub(crate) struct BodyEnd {
    rx: oneshot::Receiver<End>,
    seen: Option<End>,
}

impl BodyEnd {
    /// Waits for the body to end (or to be dropped, which ends it too).
    pub(crate) async fn wait(&mut self) -> End {
        if let Some(e) = self.seen {
            return e;
        }
        let end = (&mut self.rx).await.unwrap_or(End::Broken);
        self.seen = Some(end);
        end
    }

    /// How the body ended, if it has.
    pub(crate) fn ended(&mut self) -> Option<End> {
        if self.seen.is_none() {
            self.seen = match self.rx.try_recv() {
                Ok(e) => Some(e),
                Err(oneshot::error::TryRecvError::Closed) => Some(End::Broken),
                Err(oneshot::error::TryRecvError::Empty) => None,
            };
        }
        self.seen
    }
}
