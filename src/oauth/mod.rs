//! Calls to Criteo's token endpoint (reqwest). Only the background
//! refresher and onboarding call these; the request path never waits on
//! them directly.
//!
//! Three rules keep the credentials and the tenants safe. No redirect is
//! followed: a 307 would re-post the client secret wherever it points.
//! Answers are read up to 64 KiB, and a 2xx answer gives up its new refresh
//! token before anything else in it is judged ([`answer`]). A request that
//! may rotate a refresh token gets its own, long bound
//! (`refresh.rotation_timeout`): giving up on it while Criteo completes the
//! rotation anyway would leave the proxy holding a spent token.

pub(crate) mod answer;
pub(crate) mod consent;

use std::time::Duration;

use http::header::{ACCEPT, CONTENT_TYPE, LOCATION};
use http::{HeaderMap, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

pub(crate) use answer::{Answer, MAX_ANSWER, MAX_LIFETIME};

use crate::config::RefreshConfig;

/// A usable access token and its lifetime (already clamped to
/// `refresh.min_token_lifetime ..= MAX_LIFETIME`).
pub struct Granted {
    pub access_token: SecretString,
    pub expires_in: Duration,
}

impl std::fmt::Debug for Granted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Granted")
            .field("access_token", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// Why a token request failed, split by what the refresher should do next.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GrantError {
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
    /// Network trouble, a timeout, a 5xx or 429, a redirect, or an
    /// unusable answer.
    #[error("token request failed: {0}")]
    Transient(String),
}

fn describe(d: &Option<String>) -> String {
    d.as_ref().map(|d| format!(": {d}")).unwrap_or_default()
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// A client for one token endpoint.
#[derive(Debug, Clone)]
pub(crate) struct TokenEndpoint {
    http: reqwest::Client,
    url: Url,
    /// Bound on a client-credentials request: nothing is lost by giving up.
    token_timeout: Duration,
    /// Bound on a request that may rotate a refresh token.
    rotation_timeout: Duration,
    min_lifetime: Duration,
}

impl TokenEndpoint {
    pub(crate) fn new(
        url: Url,
        refresh: &RefreshConfig,
        extra_roots: Option<&crate::config::ExtraRoots>,
    ) -> Result<Self, reqwest::Error> {
        let mut builder = reqwest::Client::builder();
        if let Some(extra) = extra_roots {
            for cert in reqwest::Certificate::from_pem_bundle(&extra.pem)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            // Each request carries its own bound (see `post`).
            .connect_timeout(refresh.token_timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("criteo-token-proxy/", env!("CARGO_PKG_VERSION")))
            // Like the API client, talk to the token endpoint directly:
            // an HTTP(S)_PROXY variable meant for other programs must not
            // silently reroute credentials.
            .no_proxy()
            .build()?;
        Ok(Self {
            http,
            url,
            token_timeout: refresh.token_timeout,
            rotation_timeout: refresh.rotation_timeout,
            min_lifetime: refresh.min_token_lifetime,
        })
    }

    /// `grant_type=client_credentials`.
    pub(crate) async fn client_credentials(
        &self,
        client_id: &str,
        client_secret: &SecretString,
    ) -> Result<Granted, GrantError> {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", client_secret.expose_secret()),
        ];
        self.post(&form, self.token_timeout).await?.access
    }

    /// `grant_type=refresh_token`: answers with a new, rotated refresh
    /// token, which the caller must save before anything else.
    pub(crate) async fn refresh_token(
        &self,
        client_id: &str,
        client_secret: &SecretString,
        refresh_token: &SecretString,
    ) -> Result<Answer, GrantError> {
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose_secret()),
            ("client_id", client_id),
            ("client_secret", client_secret.expose_secret()),
        ];
        self.post(&form, self.rotation_timeout).await
    }

    /// `grant_type=authorization_code`: trades a consent's code (valid 30 s,
    /// once) for an access token and a first refresh token.
    pub(crate) async fn authorization_code(
        &self,
        client_id: &str,
        client_secret: &SecretString,
        code: &str,
        redirect_uri: &str,
    ) -> Result<Answer, GrantError> {
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("client_id", client_id),
            ("client_secret", client_secret.expose_secret()),
        ];
        self.post(&form, self.rotation_timeout).await
    }

    /// One call, bounded by `timeout` from connect to the answer's last
    /// byte. `Ok` means a 2xx answer, however unusable its rest.
    async fn post(&self, form: &[(&str, &str)], timeout: Duration) -> Result<Answer, GrantError> {
        let resp = self.send(form, timeout).await?;
        let status = resp.status();
        if status.is_redirection() {
            return Err(redirected(status, resp.headers(), &self.url));
        }
        let (body, cut) = read_capped(resp, timeout).await;
        if status.is_success() {
            return Ok(answer::parse(&body, cut, self.min_lifetime));
        }
        Err(classify_failure(status, &body))
    }

    async fn send(
        &self,
        form: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<reqwest::Response, GrantError> {
        // `.form()` sets `Content-Type: application/x-www-form-urlencoded`,
        // which Criteo requires; it is repeated here to make it explicit.
        let request = || {
            self.http
                .post(self.url.clone())
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header(ACCEPT, "application/json")
                .form(form)
                .timeout(timeout)
                .send()
        };
        match request().await {
            Ok(resp) => Ok(resp),
            // No connection, so the request provably never left: sending it
            // again at once presents nothing twice. Any other failure may
            // have reached Criteo, and waits for the refresher's back-off.
            Err(e) if e.is_connect() => {
                tracing::debug!(error = %crate::error::chain(&e), "cannot connect to the token endpoint; trying again at once");
                request()
                    .await
                    .map_err(|e| GrantError::Transient(transport(&e, timeout)))
            }
            Err(e) => Err(GrantError::Transient(transport(&e, timeout))),
        }
    }
}

/// The answer's body up to [`MAX_ANSWER`] bytes, and why it is incomplete
/// (too large, or broken off), if it is.
async fn read_capped(mut resp: reqwest::Response, timeout: Duration) -> (Vec<u8>, Option<String>) {
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(None) => return (body, None),
            Ok(Some(chunk)) => {
                let room = MAX_ANSWER - body.len();
                if chunk.len() > room {
                    body.extend_from_slice(&chunk[..room]);
                    let why = format!(
                        "the token endpoint answered more than {} KiB",
                        MAX_ANSWER / 1024
                    );
                    return (body, Some(why));
                }
                body.extend_from_slice(&chunk);
            }
            Err(e) => return (body, Some(transport(&e, timeout))),
        }
    }
}

/// A 3xx is never followed; the message names where it pointed (no query,
/// no user info), so that a wrong `token_url` is easy to fix.
fn redirected(status: StatusCode, headers: &HeaderMap, base: &Url) -> GrantError {
    let target = headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| base.join(l).ok())
        .map_or_else(
            || "an unreadable location".to_owned(),
            |u| {
                format!(
                    "{}{}",
                    u.origin().ascii_serialization(),
                    truncate(u.path(), 100)
                )
            },
        );
    GrantError::Transient(format!(
        "the token endpoint answered {status}, a redirect to {target}; redirects are not followed \
         (they would carry the client secret elsewhere): check upstream.token_url"
    ))
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

/// At most `max` characters, control characters dropped (the text comes
/// from the peer and goes to logs and pages).
fn truncate(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// A transport failure in words; a timeout says which bound ran out.
fn transport(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        format!(
            "no answer from the token endpoint within {}",
            humantime::format_duration(timeout)
        )
    } else {
        // reqwest's errors name the URL, never the form body.
        crate::error::chain(e)
    }
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
        let parse = |b: &[u8]| answer::parse(b, None, Duration::from_secs(10));
        let a = parse(
            br#"{"access_token":"abc.def","token_type":"Bearer","expires_in":900,"refresh_token":"r.t"}"#,
        );
        assert!(!format!("{a:?}").contains("r.t"));
        let g = a.access.unwrap();
        assert_eq!(g.expires_in, Duration::from_secs(900));
        assert!(!format!("{g:?}").contains("abc.def"));
        assert!(
            parse(br#"{"access_token":"a b","token_type":"Bearer"}"#)
                .access
                .is_err()
        );
        assert!(
            parse(br#"{"access_token":"x","token_type":"mac"}"#)
                .access
                .is_err()
        );
    }

    #[test]
    fn a_redirect_names_its_target_without_query_or_user_info() {
        let base = Url::parse("https://api.criteo.com/oauth2/token").unwrap();
        let mut h = HeaderMap::new();
        let evil = "https://u:pw@evil.example:8443/grab?secret=1#f";
        h.insert(LOCATION, evil.parse().unwrap());
        let e = redirected(StatusCode::TEMPORARY_REDIRECT, &h, &base).to_string();
        assert!(e.contains("https://evil.example:8443/grab"), "{e}");
        assert!(!e.contains("secret=1") && !e.contains("pw"), "{e}");
        h.insert(LOCATION, "/elsewhere?x=1".parse().unwrap());
        let e = redirected(StatusCode::FOUND, &h, &base).to_string();
        assert!(e.contains("https://api.criteo.com/elsewhere;"), "{e}");
    }
}
