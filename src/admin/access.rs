//! Who may start a consent onboarding (`GET /oauth/authorize`).
//!
//! The admin listener may be reachable from the whole cluster (kubelet
//! probes need it). Whoever runs `/oauth/authorize` can consent with their
//! own Criteo account and replace a tenant's refresh token, so it answers
//! only a client on loopback (an operator's `kubectl port-forward` arrives
//! there) or, when `server.admin_token` is set, only requests bearing that
//! token, from anywhere, loopback included. The callbacks stay open: they
//! prove themselves by state and signature.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode, header::AUTHORIZATION};
use http_body_util::Full;
use secrecy::ExposeSecret;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{SecretSource, check_admin_token};
use crate::error::json_response;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No admin token is configured and the client is not on loopback.
    NotLoopback,
    /// An admin token is configured and the request does not bear it.
    NoToken,
    WrongToken,
}

/// The rule, alone: `admin_token` is the configured token (if any),
/// `authorization` the request's `Authorization` header.
pub(crate) fn decide(
    peer: IpAddr,
    admin_token: Option<&str>,
    authorization: Option<&[u8]>,
) -> Result<(), Refusal> {
    let Some(expected) = admin_token else {
        return if peer.to_canonical().is_loopback() {
            Ok(())
        } else {
            Err(Refusal::NotLoopback)
        };
    };
    let presented = authorization.and_then(bearer).ok_or(Refusal::NoToken)?;
    // Digests first: equal lengths, so neither the content nor the length
    // of the token leaks through timing.
    let same: bool = Sha256::digest(presented)
        .ct_eq(&Sha256::digest(expected.as_bytes()))
        .into();
    if same {
        Ok(())
    } else {
        Err(Refusal::WrongToken)
    }
}

/// The credentials of `Bearer <token>` (scheme case-insensitive).
fn bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !rest.is_empty()).then_some(rest)
}

/// The admin token as configured, and a bounded log of refusals.
#[derive(Debug)]
pub(crate) struct Access {
    admin_token: Option<SecretSource>,
    /// Unix second of the last refusal logged: at most one line per
    /// [`LOG_EVERY_SECS`], so a scan cannot flood the log.
    last_logged: AtomicU64,
    refused: AtomicU64,
}

const LOG_EVERY_SECS: u64 = 10;

impl Access {
    pub(crate) fn new(admin_token: Option<SecretSource>) -> Self {
        Self {
            admin_token,
            last_logged: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// `None` when the request may go on, else the answer to give.
    pub(crate) async fn check(
        &self,
        peer: IpAddr,
        headers: &HeaderMap,
    ) -> Option<Response<Full<Bytes>>> {
        // A file is read at each use, like every secret file, so rotating
        // the mounted Secret needs no restart.
        let loaded = match &self.admin_token {
            None => None,
            Some(source) => Some(source.load_async().await),
        };
        let token = match loaded {
            None => None,
            Some(Ok(t)) => match check_admin_token(t.expose_secret()) {
                Ok(()) => Some(t),
                Err(e) => return Some(unreadable(&e)),
            },
            Some(Err(e)) => return Some(unreadable(&e)),
        };
        let auth = headers.get(AUTHORIZATION).map(|v| v.as_bytes());
        let refusal = decide(peer, token.as_ref().map(|t| t.expose_secret()), auth).err()?;
        self.log(peer, refusal);
        let message = match refusal {
            Refusal::NotLoopback => {
                "/oauth/authorize answers only clients on loopback (use kubectl port-forward), or requests bearing server.admin_token when it is set"
            }
            Refusal::NoToken | Refusal::WrongToken => {
                "/oauth/authorize needs Authorization: Bearer <server.admin_token>"
            }
        };
        Some(json_response(
            StatusCode::FORBIDDEN,
            &json!({"error": "admin_forbidden", "message": message}),
        ))
    }

    fn log(&self, peer: IpAddr, refusal: Refusal) {
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let now = super::onboarding::unix_now();
        let last = self.last_logged.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= LOG_EVERY_SECS
            && self
                .last_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                client = %peer,
                reason = ?refusal,
                refused_so_far = refused,
                "/oauth/authorize refused (admin_forbidden); further refusals are logged at most every {LOG_EVERY_SECS}s"
            );
        }
    }
}

/// The admin token file cannot be used: refuse (fail closed) and say so
/// in the log, never what the file holds.
fn unreadable(why: &str) -> Response<Full<Bytes>> {
    tracing::error!(
        error = why,
        "server.admin_token_file cannot be used; /oauth/authorize refuses every request"
    );
    json_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        &json!({"error": "admin_token_unreadable", "message": "the admin token cannot be read; see the proxy's log"}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_without_a_token_else_only_the_right_bearer_token_from_anywhere() {
        let loopback = ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"];
        let remote = ["10.0.0.5", "192.168.1.2", "::ffff:10.0.0.5", "2001:db8::1"];
        let token = "admin-token-0123456789";
        for (peers, is_loopback) in [(loopback, true), (remote, false)] {
            for peer in peers {
                let ip: IpAddr = peer.parse().unwrap();
                let headers: [(Option<&str>, Result<(), Refusal>); 8] = [
                    (None, Err(Refusal::NoToken)),
                    (Some("Bearer admin-token-0123456789"), Ok(())),
                    (Some("bearer admin-token-0123456789"), Ok(())),
                    (
                        Some("Bearer admin-token-012345678"),
                        Err(Refusal::WrongToken),
                    ),
                    (
                        Some("Bearer admin-token-0123456789x"),
                        Err(Refusal::WrongToken),
                    ),
                    (Some("Bearer "), Err(Refusal::NoToken)),
                    (Some("Basic admin-token-0123456789"), Err(Refusal::NoToken)),
                    (Some("admin-token-0123456789"), Err(Refusal::NoToken)),
                ];
                for (header, with_token) in headers {
                    let h = header.map(str::as_bytes);
                    assert_eq!(
                        decide(ip, Some(token), h),
                        with_token,
                        "{peer} with a token, header {header:?}"
                    );
                    let without = if is_loopback {
                        Ok(())
                    } else {
                        Err(Refusal::NotLoopback)
                    };
                    assert_eq!(
                        decide(ip, None, h),
                        without,
                        "{peer} without a token, header {header:?}"
                    );
                }
            }
        }
    }
}
