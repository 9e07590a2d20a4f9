//! A response body from the upstream, which drives its HTTP/1.1
//! connection while it streams, and gives the connection and its slot back
//! to the pool when it ends.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::h1::Http1;
use super::pool::{Pool, Slot};

/// A response body from the upstream. An HTTP/1.1 connection is polled
/// here while the body waits for more (nobody else polls it), and goes
/// back to the pool once the body has been read to the end; a body
/// dropped before that closes its connection. The request's slot is given
/// back at the same moment.
#[derive(Debug)]
pub(crate) struct UpstreamBody {
    inner: Incoming,
    home: Option<Box<Http1>>,
    slot: Option<Slot>,
}

impl UpstreamBody {
    pub(super) fn unpooled(resp: Response<Incoming>, slot: Slot) -> Response<Self> {
        Self::wrap(resp, None, slot)
    }

    pub(super) fn pooled(resp: Response<Incoming>, h1: Box<Http1>, slot: Slot) -> Response<Self> {
        Self::wrap(resp, Some(h1), slot)
    }

    fn wrap(resp: Response<Incoming>, home: Option<Box<Http1>>, slot: Slot) -> Response<Self> {
        resp.map(|inner| {
            let mut body = Self {
                inner,
                home,
                slot: Some(slot),
            };
            // An empty body may never be polled.
            if body.inner.is_end_stream() {
                body.go_home(None);
            }
            body
        })
    }

    /// The body has been read to the end: the connection can take another
    /// request, and the slot another request.
    fn go_home(&mut self, cx: Option<&mut Context<'_>>) {
        if let (Some(h1), Some(slot)) = (self.home.take(), &self.slot) {
            back_to_pool(h1, &slot.0, cx);
        }
        self.slot = None;
    }

    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(h1) = self.home.as_mut() else {
            return Pin::new(&mut self.inner).poll_frame(cx);
        };
        let polled = h1.poll_body(&mut self.inner, cx);
        if h1.ended() {
            self.home = None;
        }
        polled
    }
}

/// Puts a connection whose answer has ended back in the pool, once it can
/// take another request: at once as a rule; after the rest of its request
/// body when the upstream answered before reading all of it, which a task
/// of its own then sends (the next request must not wait behind it).
fn back_to_pool(mut h1: Box<Http1>, pool: &Arc<Pool>, cx: Option<&mut Context<'_>>) {
    if !h1.is_ready() {
        // The end of the answer may need one more turn to be taken in.
        if let Some(cx) = cx
            && h1.poll(cx).is_ready()
        {
            return;
        }
        if !h1.is_ready() {
            pool.release_when_ready(h1);
            return;
        }
    }
    pool.release(h1);
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = this.poll_inner(cx);
        match &polled {
            Poll::Ready(None) => this.go_home(Some(cx)),
            // The server stops polling once `is_end_stream` says so.
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.go_home(Some(cx)),
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
