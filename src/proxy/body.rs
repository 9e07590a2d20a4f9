//! Request bodies on their way upstream. Small ones (up to
//! `server.max_replay_body`) are read whole so a 401 can be replayed with
//! the same bytes; larger ones stream through untouched.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// The body of a request sent upstream.
#[derive(Debug)]
pub enum OutBody {
    /// Complete bytes (cheap to clone for a replay).
    Full(Option<Bytes>),
    /// Streaming: bytes already read, then the rest of the client's body.
    Stream {
        prefix: Option<Bytes>,
        rest: Incoming,
    },
}

impl OutBody {
    pub fn full(bytes: Bytes) -> Self {
        if bytes.is_empty() {
            OutBody::Full(None)
        } else {
            OutBody::Full(Some(bytes))
        }
    }
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            OutBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            OutBody::Stream { prefix, rest } => match prefix.take() {
                Some(p) => Poll::Ready(Some(Ok(Frame::data(p)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Full(b) => b.is_none(),
            OutBody::Stream { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            OutBody::Stream { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let h = rest.size_hint();
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

/// A client's body, read as far as needed to know whether it can be replayed.
#[derive(Debug)]
pub enum Prepared {
    Replayable(Bytes),
    Streaming(OutBody),
}

/// Reads the body if it fits in `limit`, or starts streaming it.
pub async fn prepare(mut body: Incoming, limit: usize) -> Result<Prepared, hyper::Error> {
    if body.is_end_stream() {
        return Ok(Prepared::Replayable(Bytes::new()));
    }
    if body.size_hint().exact().is_some_and(|n| n > limit as u64) {
        return Ok(Prepared::Streaming(OutBody::Stream {
            prefix: None,
            rest: body,
        }));
    }
    // Most bodies come in one frame: keep it without copying.
    let mut first: Option<Bytes> = None;
    let mut more: Option<BytesMut> = None;
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers are not forwarded
        };
        total += data.len();
        match (&mut first, &mut more) {
            (None, _) => first = Some(data),
            (Some(f), None) => {
                let mut buf = BytesMut::with_capacity(f.len() + data.len());
                buf.extend_from_slice(f);
                buf.extend_from_slice(&data);
                more = Some(buf);
            }
            (Some(_), Some(buf)) => buf.extend_from_slice(&data),
        }
        if total > limit {
            let prefix = match more {
                Some(buf) => buf.freeze(),
                None => first.take().unwrap_or_default(),
            };
            return Ok(Prepared::Streaming(OutBody::Stream {
                prefix: Some(prefix),
                rest: body,
            }));
        }
    }
    Ok(Prepared::Replayable(match more {
        Some(buf) => buf.freeze(),
        None => first.unwrap_or_default(),
    }))
}
