//! The stand-in's token endpoint, as Criteo's behaves: client credentials,
//! and single-use refresh tokens that rotate at every renewal (the answer
//! to a refresh grant carries the next one; presenting a spent one is
//! `invalid_grant`).

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;
use rand::RngCore;
use serde_json::json;

use super::{APPS, Stand, TOKEN_LIFETIME, json_response};

/// Tokens the stand-in issued.
#[derive(Debug, Default)]
pub(super) struct Tokens {
    /// Access token → (app index, expiry).
    access: HashMap<String, (usize, Instant)>,
    /// Refresh token → (app index, spent).
    refresh: HashMap<String, (usize, bool)>,
    issued: u64,
}

/// Why an API call's token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    Invalid,
    Expired,
}

impl Tokens {
    fn fresh(&mut self, kind: &str) -> String {
        let mut random = [0u8; 12];
        rand::rng().fill_bytes(&mut random);
        self.issued += 1;
        format!("sandbox-{kind}-{}-{}", self.issued, hex::encode(random))
    }

    /// A new refresh token for `app`.
    pub(super) fn issue_refresh(&mut self, app: usize) -> String {
        let token = self.fresh("refresh");
        self.refresh.insert(token.clone(), (app, false));
        token
    }

    fn issue_access(&mut self, app: usize) -> String {
        let token = self.fresh("access");
        self.access
            .insert(token.clone(), (app, Instant::now() + TOKEN_LIFETIME));
        token
    }

    /// The app whose valid access token `token` is.
    pub(super) fn check(&self, token: Option<&str>) -> Result<usize, Refusal> {
        match token.and_then(|t| self.access.get(t)) {
            None => Err(Refusal::Invalid),
            Some(&(_, expiry)) if expiry <= Instant::now() => Err(Refusal::Expired),
            Some(&(app, _)) => Ok(app),
        }
    }

    /// Forgets every access token (refresh tokens stay valid).
    pub(super) fn revoke_access(&mut self) -> usize {
        let n = self.access.len();
        self.access.clear();
        n
    }
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

impl Stand {
    /// `POST /oauth2/token`.
    pub(super) fn token(&self, headers: &HeaderMap, body: &[u8]) -> Response<Full<Bytes>> {
        let form_encoded = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if !form_encoded {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the body must be application/x-www-form-urlencoded",
            );
        }
        let form: HashMap<String, String> =
            url::form_urlencoded::parse(body).into_owned().collect();
        let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
        let Some(app) = APPS.iter().position(|a| {
            a.client_id == field("client_id") && a.client_secret == field("client_secret")
        }) else {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "the sandbox knows two apps; see the --dev banner",
            );
        };
        let mut tokens = self.lock_tokens();
        let refresh = match field("grant_type") {
            "client_credentials" => None,
            "refresh_token" => {
                match tokens.refresh.get_mut(field("refresh_token")) {
                    Some((owner, spent)) if *owner == app && !*spent => *spent = true,
                    _ => {
                        return oauth_error(
                            StatusCode::BAD_REQUEST,
                            "invalid_grant",
                            "the refresh token is unknown, spent or not this app's",
                        );
                    }
                }
                Some(tokens.issue_refresh(app))
            }
            _ => {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "unsupported_grant_type",
                    "the sandbox knows client_credentials and refresh_token",
                );
            }
        };
        let access = tokens.issue_access(app);
        let mut answer = json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": TOKEN_LIFETIME.as_secs(),
        });
        if let Some(refresh) = refresh {
            answer["refresh_token"] = refresh.into();
        }
        json_response(StatusCode::OK, &answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_tokens_are_single_use_and_access_tokens_expire() {
        let mut t = Tokens::default();
        let r = t.issue_refresh(1);
        assert_eq!(t.refresh[&r], (1, false));
        let a = t.issue_access(0);
        assert_eq!(t.check(Some(&a)), Ok(0));
        assert_eq!(t.check(Some("nope")), Err(Refusal::Invalid));
        assert_eq!(t.check(None), Err(Refusal::Invalid));
        t.access.get_mut(&a).unwrap().1 = Instant::now();
        assert_eq!(t.check(Some(&a)), Err(Refusal::Expired));
        assert_eq!(t.revoke_access(), 1);
    }
}
