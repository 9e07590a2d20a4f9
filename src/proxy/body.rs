//! Request bodies on their way upstream. Small ones (up to
//! `server.max_replay_body`, while `server.replay_budget` has room) are
//! read whole so a 401 can be replayed with the same bytes; the others
//! stream through untouched. Either way a client that stops sending for
//! `server.body_read_timeout` is given up on, and a streamed body says when
//! it has been sent (so that `upstream.timeout` starts then, not before).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Sleep;

pub(crate) use crate::http::{BodyEnd, BodyError, End, OutBody};

// === the replay budget ===

/// The bytes that every body kept for a replay may hold together
/// (`server.replay_budget`), shared by all workers. Taking from it is one
/// compare-and-swap, giving back one atomic add: no lock, no waiting (a
/// body that does not fit streams instead, as an oversized one does).
#[derive(Debug)]
pub(crate) struct ReplayBudget {
    left: AtomicUsize,
}

impl ReplayBudget {
    pub(crate) fn new(bytes: usize) -> Self {
        Self {
            left: AtomicUsize::new(bytes),
        }
    }

    /// An empty reservation, given back whole when dropped.
    pub(crate) fn reserve(&self) -> Reservation<'_> {
        Reservation {
            budget: self,
            bytes: 0,
        }
    }

    fn take(&self, n: usize) -> bool {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(n)
            })
            .is_ok()
    }
}

/// Bytes of the budget held by one request until it ends.
#[derive(Debug)]
pub(crate) struct Reservation<'a> {
    budget: &'a ReplayBudget,
    bytes: usize,
}

impl Reservation<'_> {
    /// Holds `n` more bytes, if the budget has them.
    fn grow(&mut self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let ok = self.budget.take(n);
        if ok {
            self.bytes += n;
        }
        ok
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.left.fetch_add(self.bytes, Ordering::AcqRel);
        }
    }
}

// === reading ===

/// A client's body, read as far as needed to know whether it can be replayed.
#[derive(Debug)]
pub(crate) enum Prepared {
    Replayable(Bytes),
    Streaming(OutBody, BodyEnd),
}

/// Reads the body if it fits in `limit` and in the budget (held in `kept`
/// until the caller drops it), or starts streaming it. `gap` bounds every
/// wait for the client's next bytes.
pub(crate) async fn prepare(
    mut body: Incoming,
    limit: usize,
    kept: &mut Reservation<'_>,
    gap: Duration,
) -> Result<Prepared, BodyError> {
    if body.is_end_stream() {
        return Ok(Prepared::Replayable(Bytes::new()));
    }
    let streaming = |prefix, rest| {
        let (body, end) = OutBody::stream(prefix, rest, gap);
        Ok(Prepared::Streaming(body, end))
    };
    // With a Content-Length, the budget is taken at once; without, frame
    // by frame.
    let exact = body.size_hint().exact();
    if let Some(n) = exact {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n > limit || !kept.grow(n) {
            return streaming(None, body);
        }
    }
    // Most bodies come in one frame: keep it without copying.
    let mut first: Option<Bytes> = None;
    let mut more: Option<BytesMut> = None;
    let mut total = 0usize;
    let mut stall = None;
    while let Some(frame) = next_frame(&mut body, gap, &mut stall).await? {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers are not forwarded
        };
        total += data.len();
        let fits = total <= limit && (exact.is_some() || kept.grow(data.len()));
        match (&mut first, &mut more) {
            (None, _) => first = Some(data),
            (Some(f), None) => {
                let capacity = exact.map_or(f.len() + data.len(), |n| n as usize);
                let mut buf = BytesMut::with_capacity(capacity);
                buf.extend_from_slice(f);
                buf.extend_from_slice(&data);
                more = Some(buf);
            }
            (Some(_), Some(buf)) => buf.extend_from_slice(&data),
        }
        if !fits {
            let prefix = match more {
                Some(buf) => buf.freeze(),
                None => first.take().unwrap_or_default(),
            };
            return streaming(Some(prefix), body);
        }
    }
    Ok(Prepared::Replayable(match more {
        Some(buf) => buf.freeze(),
        None => first.unwrap_or_default(),
    }))
}

/// The body's next frame, waiting at most `gap` for it. A frame already
/// there is taken without starting a timer; `stall` is the body's one
/// timer, made the first time it is needed.
async fn next_frame(
    body: &mut Incoming,
    gap: Duration,
    stall: &mut Option<Pin<Box<Sleep>>>,
) -> Result<Option<Result<Frame<Bytes>, hyper::Error>>, BodyError> {
    let mut next = body.frame();
    let now = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut next).poll(cx))).await;
    if let Poll::Ready(frame) = now {
        return Ok(frame);
    }
    let deadline = tokio::time::Instant::now() + gap;
    let stall = match stall {
        Some(s) => {
            s.as_mut().reset(deadline);
            s
        }
        None => stall.insert(Box::pin(tokio::time::sleep_until(deadline))),
    };
    tokio::select! {
        frame = next => Ok(frame),
        () = stall.as_mut() => Err(BodyError::Stalled(gap)),
    }
}

/// Reads and drops what is left of a client's body, at most `limit` bytes
/// and `within` in all. True when the body was read to its end.
pub(super) async fn drain(body: &mut Incoming, limit: usize, within: Duration) -> bool {
    let read = async {
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    total += f.data_ref().map_or(0, Bytes::len);
                    if total > limit {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        true
    };
    tokio::time::timeout(within, read).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_given_back_when_a_reservation_ends() {
        let budget = ReplayBudget::new(100);
        {
            let mut a = budget.reserve();
            assert!(a.grow(60));
            let mut b = budget.reserve();
            assert!(!b.grow(60), "over the budget");
            assert!(b.grow(40));
            assert!(!a.grow(1));
        }
        let mut c = budget.reserve();
        assert!(c.grow(100), "everything came back");
    }
}
