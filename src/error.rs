//! Errors the proxy answers itself. Each one knows its status, its stable
//! code (the `x-criteo-proxy-error` header and the JSON `error` field) and
//! turns into a JSON response, so a client can tell them from Criteo's.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{HeaderName, Response, StatusCode};
use http_body_util::Full;

/// Header that marks a response made by the proxy, not by Criteo.
pub const PROXY_ERROR_HEADER: HeaderName = HeaderName::from_static("x-criteo-proxy-error");

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
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
    /// The client's address is outside `server.allowed_clients`.
    #[error("client address {0} is not in server.allowed_clients")]
    ClientNotAllowed(std::net::IpAddr),
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
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::UnknownTenant(_) | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::ConsentRequired(_) | ProxyError::TokenUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::ClientNotAllowed(_) => StatusCode::FORBIDDEN,
            ProxyError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NotForwarded(_) => StatusCode::NOT_FOUND,
        }
    }

    /// The stable code clients and dashboards match on.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::UnknownTenant(_) => "unknown_tenant",
            ProxyError::ConsentRequired(_) => "consent_required",
            ProxyError::TokenUnavailable { .. } => "token_unavailable",
            ProxyError::ClientNotAllowed(_) => "client_not_allowed",
            ProxyError::UpstreamUnreachable(_) => "upstream_unreachable",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::MethodNotAllowed { .. } => "method_not_allowed",
            ProxyError::NotForwarded(_) => "not_forwarded",
        }
    }

    /// `{"error": code, "message": …, "tenant": …}` with the marker header.
    pub fn to_response(&self, tenant: Option<&str>) -> Response<Full<Bytes>> {
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
            "tenant": tenant,
        });
        let mut resp = json_response(self.status(), &body);
        let headers = resp.headers_mut();
        headers.insert(PROXY_ERROR_HEADER, HeaderValue::from_static(self.code()));
        match self {
            ProxyError::TokenUnavailable { retry_after, .. } => {
                let secs = retry_after.as_secs().max(1);
                headers.insert(RETRY_AFTER, HeaderValue::from(secs));
            }
            ProxyError::MethodNotAllowed { allow, .. } => {
                headers.insert(ALLOW, HeaderValue::from_static(allow));
            }
            _ => {}
        }
        resp
    }
}

/// A small JSON response (admin answers and proxy errors).
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
