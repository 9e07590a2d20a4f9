//! Settling an early answer: an error answered before the client's body
//! was read to its end leaves the client's connection usable, or closes
//! it cleanly ([`Proxy::settle`]).

use std::time::Duration;

use http::header::CONNECTION;
use http::{HeaderValue, Response, Version};
use hyper::body::Incoming;

use super::{Proxy, ResponseBody, body};
use crate::error::ProxyError;

/// An error answered before the client's body was read: this much of the
/// body is first read and dropped, so that the HTTP/1.1 connection stays
/// usable for the client's next request…
const UNREAD_DRAIN_LIMIT: usize = 1024 * 1024;
const UNREAD_DRAIN_TIME: Duration = Duration::from_secs(1);
/// …past that, the answer says `Connection: close`, and the rest is still
/// read and dropped for this long (at most this much), so that the close,
/// which comes once the body has ended, does not reset the connection
/// under the answer (a close with unread data sends a TCP RST, and the
/// client loses what it had not read yet).
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_LIMIT: usize = 64 * 1024 * 1024;

/// What is left of the client's body when the proxy answers an error.
#[derive(Debug)]
pub(super) enum Leftover {
    /// Read to its end, or there was none.
    Nothing,
    /// Not read at all.
    Unread(Incoming),
    /// Partly read, then given up: the connection cannot be reused.
    Lost,
}

/// An error to answer, and what is left of the body.
#[derive(Debug)]
pub(super) struct Failed {
    pub(super) err: ProxyError,
    pub(super) left: Leftover,
}

impl Failed {
    pub(super) fn unread(err: ProxyError, body: Incoming) -> Self {
        Self {
            err,
            left: Leftover::Unread(body),
        }
    }

    pub(super) fn read(err: ProxyError) -> Self {
        Self {
            err,
            left: Leftover::Nothing,
        }
    }

    pub(super) fn lost(err: ProxyError) -> Self {
        Self {
            err,
            left: Leftover::Lost,
        }
    }
}

// === impl Proxy ===

impl Proxy {
    /// Makes an answer to a request whose body was not read to its end
    /// safe for the client's connection: a small body is read and dropped
    /// first. Past that, HTTP/2 ends the request's stream on its own
    /// (RST_STREAM with NO_ERROR, which some clients mishandle, hence the
    /// reading first); HTTP/1.1 gets `Connection: close`, and the body is
    /// still read for a while, in the background, so that the close comes
    /// cleanly after it.
    pub(super) async fn settle(
        &self,
        mut resp: Response<ResponseBody>,
        version: Version,
        left: Leftover,
    ) -> Response<ResponseBody> {
        let h2 = version == Version::HTTP_2;
        let close = match left {
            Leftover::Nothing => false,
            Leftover::Lost => !h2,
            Leftover::Unread(body) => !drain_unread(body, h2).await && !h2,
        };
        if close {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Reads and drops a body the answer did not need, so that the connection
/// stays usable. A small one is read now; when more is coming (or it takes
/// too long) it returns false, and on HTTP/1.1, whose answer then closes
/// the connection, a task goes on reading and dropping the body for a
/// while so that the close comes cleanly after it.
async fn drain_unread(mut body: Incoming, h2: bool) -> bool {
    use http_body::Body as _;
    if body.is_end_stream() {
        return true;
    }
    let small = body
        .size_hint()
        .exact()
        .is_none_or(|n| n <= UNREAD_DRAIN_LIMIT as u64);
    if small && body::drain(&mut body, UNREAD_DRAIN_LIMIT, UNREAD_DRAIN_TIME).await {
        return true;
    }
    if h2 {
        return false;
    }
    tokio::spawn(async move {
        body::drain(&mut body, LINGER_LIMIT, LINGER_TIME).await;
    });
    false
}
