//! Consent onboarding on the admin listener:
//!
//! - `GET /oauth/authorize?tenant=NAME` redirects a person to Criteo's
//!   consent page with a fresh, signed, single-use `state` bound to the
//!   tenant and valid ten minutes;
//! - `GET /oauth/callback?code=…&state=…` (where the tenant's `redirect_uri`
//!   leads) checks the state, exchanges the code, saves the refresh token
//!   and puts the access token in service at once; at most one exchange
//!   per tenant is in flight and a few start per minute (`exchanges.rs`);
//! - `POST /consent/callback` takes Criteo's signed consent-delegation
//!   callback for client-credentials apps.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, LOCATION};
use http::{Response, StatusCode};
use http_body_util::Full;
use secrecy::ExposeSecret;
use serde_json::json;
use url::Url;

use super::exchanges::{self, Busy, Exchanges};
use crate::config::ConsentConfig;
use crate::error::json_response;
use crate::metrics::Metrics;
use crate::oauth::GrantError;
use crate::oauth::consent::{self, STATE_TTL, StateClaims, StateError};
use crate::tenant::Tenants;
use crate::token::{Grants, RefreshGrant, Token};

/// Header in which Criteo signs its consent callbacks.
pub(crate) const SIGNATURE_HEADER: &str = "x-criteo-hmac-sha512";

#[derive(Debug)]
pub(crate) struct Onboarding {
    tenants: Arc<ArcSwap<Tenants>>,
    /// The running refreshers' grants (the control task keeps it current).
    grants: Grants,
    consent_url: Url,
    consent: Option<ConsentConfig>,
    at_fraction: f64,
    metrics: Metrics,
    /// Nonces of states already presented, until they would expire anyway.
    used: Mutex<HashMap<String, u64>>,
    exchanges: Exchanges,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Onboarding {
    pub(crate) fn new(
        tenants: Arc<ArcSwap<Tenants>>,
        grants: Grants,
        consent_url: Url,
        consent: Option<ConsentConfig>,
        at_fraction: f64,
        metrics: Metrics,
    ) -> Self {
        Self {
            tenants,
            grants,
            consent_url,
            consent,
            at_fraction,
            metrics,
            used: Mutex::new(HashMap::new()),
            exchanges: Exchanges::default(),
        }
    }

    /// The refresh-token grant of a tenant, if it is one.
    fn grant(&self, tenant: &str) -> Option<Arc<RefreshGrant>> {
        self.grants.load().get(tenant).cloned()
    }

    /// `GET /oauth/authorize?tenant=NAME`.
    pub(crate) async fn authorize(&self, query: Option<&str>) -> Response<Full<Bytes>> {
        let tenant = param(query, "tenant");
        let Some(tenant) = tenant else {
            return error(
                StatusCode::BAD_REQUEST,
                "missing_tenant",
                "add ?tenant=NAME",
                None,
            );
        };
        let Some(grant) = self.grant(&tenant) else {
            let known = self.tenants.load().get(&tenant).is_some();
            let msg = if known {
                "this tenant uses client credentials: it needs no consent onboarding"
            } else {
                "no such tenant"
            };
            return error(
                StatusCode::BAD_REQUEST,
                "unknown_tenant",
                msg,
                Some(&tenant),
            );
        };
        let key = match grant.state_key().await {
            Ok(k) => k,
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "client_secret_unreadable",
                    &e,
                    Some(&tenant),
                );
            }
        };
        let state = consent::issue_state(
            key.expose_secret().as_bytes(),
            &tenant,
            unix_now(),
            STATE_TTL,
        );
        let url = consent::authorize_url(
            &self.consent_url,
            grant.client_id(),
            grant.redirect_uri(),
            &state,
        );
        tracing::info!(tenant, "consent onboarding started");
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::FOUND;
        if let Ok(v) = HeaderValue::from_str(url.as_str()) {
            resp.headers_mut().insert(LOCATION, v);
        }
        resp.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }

    /// `GET /oauth/callback?code=…&state=…` (or `?error=…&state=…`).
    pub(crate) async fn callback(&self, query: Option<&str>) -> Response<Full<Bytes>> {
        let Some(state) = param(query, "state") else {
            return page(
                StatusCode::BAD_REQUEST,
                "Consent failed",
                "The callback carries no state. Start again from /oauth/authorize?tenant=NAME.",
            );
        };
        let (tenant, grant, claims) = match self.verify_state(&state).await {
            Ok(found) => found,
            Err(why) => {
                tracing::warn!(reason = %why, "consent callback refused");
                return page(
                    StatusCode::BAD_REQUEST,
                    "Consent failed",
                    &format!(
                        "{why}. No code was exchanged. Start again from /oauth/authorize?tenant=NAME."
                    ),
                );
            }
        };
        if let Some(err) = param(query, "error") {
            if let Err(why) = self.use_state(claims) {
                return page(StatusCode::BAD_REQUEST, "Consent failed", &why);
            }
            let detail = param(query, "error_description").unwrap_or_default();
            tracing::warn!(tenant, error = err, "consent was not given");
            return page(
                StatusCode::BAD_REQUEST,
                "Consent was not given",
                &format!(
                    "Criteo answered {err} for tenant {tenant}. {detail} Nothing was changed; \
                     the tenant stays as it was. To try again, open /oauth/authorize?tenant={tenant}."
                ),
            );
        }
        let Some(code) = param(query, "code") else {
            return page(
                StatusCode::BAD_REQUEST,
                "Consent failed",
                "The callback carries no code.",
            );
        };
        let Some(t) = self.tenants.load().get(&tenant).cloned() else {
            return page(StatusCode::BAD_REQUEST, "Consent failed", "No such tenant.");
        };
        // The bound comes before the state is spent, so a refused callback
        // can be retried with the same link.
        let slot = match self.exchanges.try_begin(&tenant, Instant::now()) {
            Ok(slot) => slot,
            Err(busy) => return too_many(&tenant, busy),
        };
        if let Err(why) = self.use_state(claims) {
            tracing::warn!(tenant, reason = %why, "consent callback refused");
            return page(
                StatusCode::BAD_REQUEST,
                "Consent failed",
                &format!(
                    "{why}. No code was exchanged. Start again from /oauth/authorize?tenant=NAME."
                ),
            );
        }
        let requested_at = Instant::now();
        slot.start(requested_at);
        // The code is valid 30 s: the token endpoint timeout is well below.
        // The exchange (and the renewal that follows it when its access
        // token is unusable) runs in a task of its own: a browser that
        // closes its tab drops this request, and with it anything the
        // request awaits, but a rotation Criteo has answered must reach
        // the store.
        let exchange = {
            let grant = Arc::clone(&grant);
            tokio::spawn(async move { grant.exchange_code(&code).await })
        };
        let exchanged = exchange.await.unwrap_or_else(|e| {
            Err(GrantError::Transient(format!(
                "the code exchange did not finish: {e}"
            )))
        });
        match exchanged {
            Ok(granted) => {
                match Token::new(
                    &granted,
                    requested_at,
                    self.at_fraction,
                    t.tokens.next_generation(),
                ) {
                    Ok(token) => t.tokens.install(token),
                    Err(_) => {
                        return page(
                            StatusCode::BAD_GATEWAY,
                            "Consent failed",
                            "The token endpoint answered an unusable access token.",
                        );
                    }
                }
                tracing::info!(tenant, "consent onboarding complete; the tenant is serving");
                page(
                    StatusCode::OK,
                    "Connected",
                    &format!("Tenant {tenant} is connected and serving. You can close this page."),
                )
            }
            Err(e) => {
                tracing::warn!(tenant, error = %e, "code exchange failed");
                page(
                    StatusCode::BAD_GATEWAY,
                    "Consent failed",
                    &format!(
                        "Exchanging the code failed: {e}. Start again from /oauth/authorize?tenant={tenant}."
                    ),
                )
            }
        }
    }

    /// The state's tenant, grant and claims, once its MAC (constant time)
    /// and expiry are checked. Single use is [`Self::use_state`]'s.
    async fn verify_state(
        &self,
        state: &str,
    ) -> Result<(String, Arc<RefreshGrant>, StateClaims), String> {
        // The tenant is read before the MAC is checked only to find the key.
        let tenant = state
            .split('.')
            .next()
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| StateError::Malformed.to_string())?;
        let grant = self
            .grant(&tenant)
            .ok_or_else(|| StateError::Forged.to_string())?;
        let key = grant.state_key().await?;
        let now = unix_now();
        let claims = consent::verify_state(key.expose_secret().as_bytes(), state, now)
            .map_err(|e| e.to_string())?;
        if claims.tenant != tenant {
            return Err(StateError::WrongTenant.to_string());
        }
        Ok((tenant, grant, claims))
    }

    /// Spends a verified state: the second use of a nonce is refused.
    fn use_state(&self, claims: StateClaims) -> Result<(), String> {
        let now = unix_now();
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        used.retain(|_, exp| *exp > now);
        if used.insert(claims.nonce, claims.expires_at).is_some() {
            return Err("the state was already used".into());
        }
        Ok(())
    }

    /// `POST /consent/callback`: Criteo's consent-delegation callback.
    pub(crate) async fn consent_callback(
        &self,
        signature: Option<&str>,
        body: &[u8],
    ) -> Response<Full<Bytes>> {
        let Some(consent) = &self.consent else {
            return error(
                StatusCode::NOT_FOUND,
                "consent_not_configured",
                "set [consent] signing_key and signing_secret(_file) to accept consent callbacks",
                None,
            );
        };
        let Ok(secret) = consent.signing_secret.load_async().await else {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "signing_secret_unreadable",
                "the consent signing secret cannot be read",
                None,
            );
        };
        let valid = signature.is_some_and(|sig| {
            consent::verify_callback(secret.expose_secret().as_bytes(), body, sig)
        });
        if !valid {
            // Nothing from an unauthenticated body is logged.
            return error(
                StatusCode::UNAUTHORIZED,
                "invalid_signature",
                "x-criteo-hmac-sha512 does not match the body",
                None,
            );
        }
        let event: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let field = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| event.get(*n))
                .cloned()
                .unwrap_or_default()
        };
        let kind = field(&["Type", "type"]);
        let kind = kind.as_str().unwrap_or("unknown");
        let state = field(&["State", "state"]);
        let scopes = field(&["AcceptedScopes", "acceptedScopes", "accepted_scopes"]);
        self.metrics.consent_callback(kind);
        tracing::info!(
            event = kind,
            state = state.as_str().unwrap_or(""),
            accepted_scopes = %scopes,
            "consent callback"
        );
        json_response(StatusCode::OK, &json!({"received": kind}))
    }
}

/// 429: the tenant's exchange bound is reached; nothing was exchanged.
fn too_many(tenant: &str, busy: Busy) -> Response<Full<Bytes>> {
    let (why, retry_after) = match busy {
        Busy::InFlight => ("another code exchange for this tenant is under way", 1),
        Busy::TooMany(wait) => (
            "too many code exchanges for this tenant in the last minute",
            wait.as_secs().max(1),
        ),
    };
    tracing::warn!(
        tenant,
        reason = why,
        per_minute = exchanges::PER_MINUTE,
        "consent callback refused"
    );
    let mut resp = page(
        StatusCode::TOO_MANY_REQUESTS,
        "Consent not processed",
        &format!(
            "{why} (tenant {tenant}). No code was exchanged and the link was not used: \
             try again in {retry_after} s, or start again from /oauth/authorize?tenant={tenant}."
        ),
    );
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
    resp
}

fn param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

fn error(
    status: StatusCode,
    code: &str,
    message: &str,
    tenant: Option<&str>,
) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({"error": code, "message": message, "tenant": tenant}),
    )
}

/// A small HTML page for a person in a browser.
fn page(status: StatusCode, title: &str, text: &str) -> Response<Full<Bytes>> {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body style=\"font-family:sans-serif;max-width:40em;margin:3em auto\">\
         <h1>{t}</h1><p>{x}</p><p><small>criteo-token-proxy</small></p></body></html>\n",
        t = escape(title),
        x = escape(text)
    );
    let mut resp = Response::new(Full::new(Bytes::from(html)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
