//! A response body from the upstream, which gives its connection and its
//! slot back to the pool when it ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;

use super::pool::Slot;
use crate::http::OutBody;

/// A response body from the upstream. An HTTP/1.1 connection goes back to
/// the pool once its body has been read to the end; a body dropped before
/// that takes its connection with it (hyper closes it). The request's slot
/// is given back at the same moment.
#[derive(Debug)]
pub(crate) struct UpstreamBody {
    inner: Incoming,
    home: Option<http1::SendRequest<OutBody>>,
    slot: Option<Slot>,
}

impl UpstreamBody {
    pub(super) fn unpooled(resp: Response<Incoming>, slot: Slot) -> Response<Self> {
        Self::wrap(resp, None, slot)
    }

    pub(super) fn pooled(
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
