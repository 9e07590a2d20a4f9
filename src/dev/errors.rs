//! Criteo's two error shapes, written once for the `--dev` sandbox and the
//! tests' fake: its APIs' `{"errors": [{…}]}` list and its token
//! endpoint's OAuth `{"error", "error_description"}`, and why each is sent.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::error::json_response;

/// Criteo's error list, `{"errors": [{…}]}`, as its APIs answer it.
pub fn criteo_error(
    status: StatusCode,
    kind: &str,
    code: &str,
    path: &str,
    title: &str,
    detail: &str,
) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({"errors": [{
            "traceIdentifier": hex::encode(rand::random::<[u8; 16]>()),
            "type": kind,
            "code": code,
            "instance": path,
            "title": title,
            "detail": detail,
        }]}),
    )
}

/// The token endpoint's refusal, as OAuth 2.0 (RFC 6749 §5.2) shapes it.
pub fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

/// Why an API call's token is refused: Criteo's two 401 codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown, missing or revoked.
    Invalid,
    Expired,
}

/// Why a token request is refused, each with Criteo's OAuth error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantError {
    /// The body is not `application/x-www-form-urlencoded`.
    NotAForm,
    /// Unknown client id, or the wrong secret.
    InvalidClient,
    UnsupportedGrantType,
    UnknownRefreshToken,
    /// Another client's refresh token.
    NotThisClientsToken,
    /// A refresh token presented a second time.
    RefreshTokenSpent,
    /// The consent behind the refresh token was withdrawn.
    ConsentRevoked,
    UnknownCode,
    CodeUsed,
    CodeExpired,
    /// The code was issued for another client or `redirect_uri`.
    CodeMismatch,
}

// === impl Refusal ===

impl Refusal {
    /// Criteo's code for it.
    pub fn code(self) -> &'static str {
        match self {
            Self::Invalid => "authorization-token-invalid",
            Self::Expired => "authorization-token-expired",
        }
    }

    /// Criteo's 401 for a call to `path`.
    pub fn response(self, path: &str) -> Response<Full<Bytes>> {
        let (title, detail) = match self {
            Self::Invalid => (
                "Authorization token is invalid",
                "The access token is unknown to the stand-in, or was revoked",
            ),
            Self::Expired => (
                "Authorization token has expired",
                "Get a new token and try again",
            ),
        };
        let status = StatusCode::UNAUTHORIZED;
        criteo_error(status, "authorization", self.code(), path, title, detail)
    }
}

// === impl GrantError ===

impl GrantError {
    /// The OAuth `error` and a description saying which rule was broken.
    fn describe(self) -> (StatusCode, &'static str, &'static str) {
        use GrantError::*;
        let bad = StatusCode::BAD_REQUEST;
        match self {
            NotAForm => (
                bad,
                "invalid_request",
                "the body must be application/x-www-form-urlencoded",
            ),
            InvalidClient => (
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "unknown client or wrong secret",
            ),
            UnsupportedGrantType => (
                bad,
                "unsupported_grant_type",
                "known: client_credentials, refresh_token, authorization_code",
            ),
            UnknownRefreshToken => (bad, "invalid_grant", "unknown refresh token"),
            NotThisClientsToken => (bad, "invalid_grant", "not this client's token"),
            RefreshTokenSpent => (bad, "invalid_grant", "refresh token already used"),
            ConsentRevoked => (bad, "invalid_grant", "consent revoked"),
            UnknownCode => (bad, "invalid_grant", "unknown code"),
            CodeUsed => (bad, "invalid_grant", "code already used"),
            CodeExpired => (bad, "invalid_grant", "code expired"),
            CodeMismatch => (
                bad,
                "invalid_grant",
                "redirect_uri does not match the consent",
            ),
        }
    }

    /// The token endpoint's answer.
    pub fn response(self) -> Response<Full<Bytes>> {
        let (status, error, description) = self.describe();
        oauth_error(status, error, description)
    }
}
