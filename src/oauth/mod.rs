//! Calls to Criteo's token endpoint (reqwest). Only the background
//! refresher calls these; the request path never waits on them directly.

pub mod consent;

use std::time::Duration;

use http::StatusCode;
use http::header::{ACCEPT, CONTENT_TYPE};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

/// The answer of a successful token request.
pub struct Granted {
    pub access_token: SecretString,
    pub expires_in: Duration,
    /// Present for the authorization-code and refresh-token grants.
    pub refresh_token: Option<SecretString>,
}

impl std::fmt::Debug for Granted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Granted")
            .field("access_token", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Why a token request failed, split by what the refresher should do next.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The endpoint refused the credentials (`invalid_client`,
    /// `unauthorized_client`, …): retrying soon will not help.
    #[error("the token endpoint rejected the credentials: {code}{}", describe(.description))]
    Rejected {
        code: String,
        description: Option<String>,
    },
    /// The refresh token or code is no longer valid (`invalid_grant`): only a
    /// new consent helps.
    #[error("the token endpoint rejected the grant (invalid_grant){}", describe(.description))]
    InvalidGrant { description: Option<String> },
    /// A refresh-token tenant has no usable refresh token: a person must
    /// consent again. Nothing is sent to the token endpoint.
    #[error("{0}")]
    ConsentRequired(String),
    /// Network trouble, a timeout, a 5xx or 429, or an unreadable answer.
    #[error("token request failed: {0}")]
    Transient(String),
}

fn describe(d: &Option<String>) -> String {
    d.as_ref().map(|d| format!(": {d}")).unwrap_or_default()
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    refresh_token: Option<String>,
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// A client for one token endpoint.
#[derive(Debug, Clone)]
pub struct TokenEndpoint {
    http: reqwest::Client,
    url: Url,
}

/// Criteo's tokens live 900 s; used when an answer omits `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(900);

impl TokenEndpoint {
    pub fn new(
        url: Url,
        timeout: Duration,
        extra_roots: Option<&crate::config::ExtraRoots>,
    ) -> Result<Self, reqwest::Error> {
        let mut builder = reqwest::Client::builder();
        if let Some(extra) = extra_roots {
            for cert in reqwest::Certificate::from_pem_bundle(&extra.pem)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("criteo-token-proxy/", env!("CARGO_PKG_VERSION")))
            // Like the API client, talk to the token endpoint directly:
            // an HTTP(S)_PROXY variable meant for other programs must not
            // silently reroute credentials.
            .no_proxy()
            .build()?;
        Ok(Self { http, url })
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    /// `grant_type=client_credentials`.
    pub async fn client_credentials(
        &self,
        client_id: &str,
        client_secret: &SecretString,
    ) -> Result<Granted, GrantError> {
        self.post(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", client_secret.expose_secret()),
        ])
        .await
    }

    /// `grant_type=refresh_token`: answers with a new, rotated refresh token.
    pub async fn refresh_token(
        &self,
        client_id: &str,
        client_secret: &SecretString,
        refresh_token: &SecretString,
    ) -> Result<Granted, GrantError> {
        self.post(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose_secret()),
            ("client_id", client_id),
            ("client_secret", client_secret.expose_secret()),
        ])
        .await
    }

    /// `grant_type=authorization_code`: trades a consent's code (valid 30 s,
    /// once) for an access token and a first refresh token.
    pub async fn authorization_code(
        &self,
        client_id: &str,
        client_secret: &SecretString,
        code: &str,
        redirect_uri: &str,
    ) -> Result<Granted, GrantError> {
        self.post(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("client_id", client_id),
            ("client_secret", client_secret.expose_secret()),
        ])
        .await
    }

    async fn post(&self, form: &[(&str, &str)]) -> Result<Granted, GrantError> {
        // `.form()` sets `Content-Type: application/x-www-form-urlencoded`,
        // which Criteo requires; it is repeated here to make it explicit.
        let resp = self
            .http
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .form(form)
            .send()
            .await
            .map_err(|e| GrantError::Transient(describe_reqwest(&e)))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| GrantError::Transient(describe_reqwest(&e)))?;
        if status.is_success() {
            return parse_success(&body);
        }
        Err(classify_failure(status, &body))
    }
}

fn parse_success(body: &[u8]) -> Result<Granted, GrantError> {
    let t: TokenResponse = serde_json::from_slice(body).map_err(|e| {
        GrantError::Transient(format!("the token endpoint answered unreadable JSON: {e}"))
    })?;
    if let Some(tt) = &t.token_type
        && !tt.eq_ignore_ascii_case("bearer")
    {
        return Err(GrantError::Transient(format!(
            "the token endpoint answered token_type {tt:?}, not Bearer"
        )));
    }
    if t.access_token.is_empty()
        || !t
            .access_token
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"')
    {
        return Err(GrantError::Transient(
            "the token endpoint answered an empty or malformed access_token".into(),
        ));
    }
    Ok(Granted {
        access_token: SecretString::from(t.access_token),
        expires_in: t
            .expires_in
            .map(|s| Duration::from_secs(s.max(1)))
            .unwrap_or(DEFAULT_LIFETIME),
        refresh_token: t
            .refresh_token
            .filter(|r| !r.is_empty())
            .map(SecretString::from),
    })
}

fn classify_failure(status: StatusCode, body: &[u8]) -> GrantError {
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        return GrantError::Transient(format!("the token endpoint answered {status}"));
    }
    // RFC 6749 §5.2 errors come as 400 or 401 with an `error` field.
    if let Ok(e) = serde_json::from_slice::<OAuthError>(body) {
        let description = e.error_description.map(|d| truncate(&d, 200));
        return if e.error == "invalid_grant" {
            GrantError::InvalidGrant { description }
        } else {
            GrantError::Rejected {
                code: truncate(&e.error, 64),
                description,
            }
        };
    }
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => GrantError::Rejected {
            code: "invalid_client".into(),
            description: Some(format!("the token endpoint answered {status}")),
        },
        StatusCode::BAD_REQUEST => GrantError::Rejected {
            code: "invalid_request".into(),
            description: Some(format!("the token endpoint answered {status}")),
        },
        _ => GrantError::Transient(format!("the token endpoint answered {status}")),
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// reqwest's errors name the URL, never the form body.
fn describe_reqwest(e: &reqwest::Error) -> String {
    use std::error::Error;
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
    fn invalid_client_is_a_rejection_and_5xx_is_transient() {
        let e = classify_failure(
            StatusCode::UNAUTHORIZED,
            br#"{"error":"invalid_client","error_description":"bad secret"}"#,
        );
        assert!(matches!(e, GrantError::Rejected { ref code, .. } if code == "invalid_client"));
        let e = classify_failure(StatusCode::BAD_REQUEST, br#"{"error":"invalid_grant"}"#);
        assert!(matches!(e, GrantError::InvalidGrant { .. }));
        let e = classify_failure(StatusCode::SERVICE_UNAVAILABLE, b"");
        assert!(matches!(e, GrantError::Transient(_)));
        let e = classify_failure(StatusCode::UNAUTHORIZED, b"nope");
        assert!(matches!(e, GrantError::Rejected { .. }));
    }

    #[test]
    fn a_success_is_parsed_and_never_debug_printed() {
        let g =
            parse_success(br#"{"access_token":"abc.def","token_type":"Bearer","expires_in":900}"#)
                .unwrap();
        assert_eq!(g.expires_in, Duration::from_secs(900));
        assert!(!format!("{g:?}").contains("abc.def"));
        assert!(parse_success(br#"{"access_token":"a b","token_type":"Bearer"}"#).is_err());
        assert!(parse_success(br#"{"access_token":"x","token_type":"mac"}"#).is_err());
    }
}
