//! Criteo's two error shapes, written once for the `--dev` sandbox and the
//! tests' fake: its APIs' `{"errors": [{…}]}` list and its token
//! endpoint's OAuth `{"error", "error_description"}`.

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
