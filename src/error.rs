//! Errors the proxy answers itself. Each one knows its status, its stable
//! code (the `x-criteo-proxy-error` header and the JSON `error` field) and
//! turns into a JSON response, so a client can tell them from Criteo's.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{HeaderName, Response, StatusCode};
use http_body_util::Full;

/// Header that marks a response made by the proxy, not by Criteo.
pub(crate) const PROXY_ERROR_HEADER: HeaderName = HeaderName::from_static("x-criteo-proxy-error");

/// The longest `Retry-After` the proxy sends, whatever the cause. Clients
/// such as urllib3 and `curl --retry` sleep for as long as they are told,
/// and asking again is cheap (the proxy answers from its own state).
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// The methods the proxy forwards (CONNECT is answered locally).
pub(crate) const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// The request named no tenant, or one that is not configured.
    #[error("{0}")]
    UnknownTenant(String),
    /// A refresh-token tenant with no usable refresh token.
    #[error("tenant needs a new consent: {0}")]
    ConsentRequired(String),
    /// No token could be had in time.
    #[error("no access token is available: {reason}")]
    TokenUnavailable {
        reason: String,
        retry_after: Duration,
    },
    /// Connecting to, or talking with, the upstream failed.
    #[error("the upstream could not be reached: {0}")]
    UpstreamUnreachable(String),
    /// The upstream did not answer within `upstream.timeout`.
    #[error("the upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    /// Every upstream connection of the worker stayed busy for the whole
    /// wait (`upstream.max_connections`, `upstream.connect_timeout`).
    #[error(
        "every upstream connection stayed busy for {0:?} (upstream.max_connections); nothing was forwarded"
    )]
    UpstreamBusy(Duration),
    /// The client's request could not be read or forwarded as sent.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A path the proxy answers itself, asked with a method it does not
    /// answer (`Allow` lists the ones it does).
    #[error("{message}")]
    MethodNotAllowed {
        allow: &'static str,
        message: String,
    },
    /// A path that is never forwarded (Criteo's OAuth endpoints: the proxy
    /// holds the tokens, and a refusal there must not pass for the API's).
    #[error("{0}")]
    NotForwarded(String),
    /// The tenant's rate-limit queue would make the request wait longer
    /// than `rate_limit.max_wait`; nothing was forwarded.
    #[error(
        "this tenant's rate limit ({limit}) would make this request wait longer than rate_limit.max_wait ({}); nothing was forwarded",
        humantime::format_duration(*max_wait)
    )]
    RateLimited {
        limit: String,
        max_wait: Duration,
        retry_after: Duration,
    },
    /// The client stopped sending its request body.
    #[error("the request body sent nothing for {0:?} (server.body_read_timeout)")]
    BodyTimeout(Duration),
}

impl ProxyError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::UnknownTenant(_) | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::ConsentRequired(_) | ProxyError::TokenUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::UpstreamBusy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NotForwarded(_) => StatusCode::NOT_FOUND,
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The stable code clients and dashboards match on.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            ProxyError::UnknownTenant(_) => "unknown_tenant",
            ProxyError::ConsentRequired(_) => "consent_required",
            ProxyError::TokenUnavailable { .. } => "token_unavailable",
            ProxyError::UpstreamBusy(_) => "upstream_busy",
            ProxyError::UpstreamUnreachable(_) => "upstream_unreachable",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::MethodNotAllowed { .. } => "method_not_allowed",
            ProxyError::NotForwarded(_) => "not_forwarded",
            ProxyError::BodyTimeout(_) => "body_timeout",
            ProxyError::RateLimited { .. } => "rate_limited",
        }
    }

    /// When a client may usefully ask again, uncapped.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::TokenUnavailable { retry_after, .. } => Some(*retry_after),
            ProxyError::UpstreamBusy(_) => Some(Duration::from_secs(1)),
            ProxyError::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// `{"error": code, "message": …, "tenant": …}` with the marker header.
    pub(crate) fn to_response(&self, tenant: Option<&str>) -> Response<Full<Bytes>> {
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
            "tenant": tenant,
        });
        let mut resp = json_response(self.status(), &body);
        let headers = resp.headers_mut();
        headers.insert(PROXY_ERROR_HEADER, HeaderValue::from_static(self.code()));
        if let Some(after) = self.retry_after() {
            // Rounded up: a client that waits as told finds a turn.
            let secs = after.as_nanos().div_ceil(1_000_000_000);
            let secs = u64::try_from(secs).unwrap_or(u64::MAX);
            let secs = secs.clamp(1, MAX_RETRY_AFTER.as_secs());
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if let ProxyError::MethodNotAllowed { allow, .. } = self {
            headers.insert(ALLOW, HeaderValue::from_static(allow));
        }
        resp
    }
}

/// A small JSON response (admin answers and proxy errors).
pub(crate) fn json_response(
    status: StatusCode,
    value: &serde_json::Value,
) -> Response<Full<Bytes>> {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The answer to `OPTIONS *` (a question about the proxy itself, which
/// names no resource to forward): what it forwards, and no body.
pub(crate) fn options_asterisk() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(FORWARDED_METHODS));
    resp
}

/// An error and its sources, `: `-separated: what a log line or an answer
/// says about an error from a library that nests them.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_capped_at_thirty_seconds_and_at_least_one() {
        let header = |d: Duration| {
            ProxyError::TokenUnavailable {
                reason: "x".into(),
                retry_after: d,
            }
            .to_response(None)
            .headers()[RETRY_AFTER]
                .to_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(header(Duration::from_secs(299)), "30");
        assert_eq!(header(Duration::from_millis(200)), "1");
        assert_eq!(header(Duration::from_secs(7)), "7");
        assert_eq!(header(Duration::from_millis(7_200)), "8", "rounded up");
        let busy = ProxyError::UpstreamBusy(Duration::from_secs(5)).to_response(None);
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.headers()[RETRY_AFTER], "1");
    }
}
