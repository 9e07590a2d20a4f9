//! What the proxy listener answers itself and never forwards: Criteo's
//! token endpoint, and the placeholder tokens it hands out.
//!
//! Criteo's official SDKs fetch their own token from `{host}/oauth2/token`
//! before any call, with whatever credentials they were given. Forwarded,
//! that request would reach Criteo's token endpoint with a tenant's bearer
//! token added, and its `401` to the SDK's credentials would pass for the
//! API refusing the tenant's token: the proxy would retire a good token and
//! renew it, once per SDK call (and with real credentials the SDK would
//! compete with the proxy for a single-use refresh token). So the proxy
//! answers it here, for any grant and any credentials, with a placeholder
//! that names a tenant: `criteo-token-proxy.<tenant>`. It is not a secret
//! and worth nothing outside the proxy; a later request that carries it and
//! no tenant header goes to that tenant. No path under `/oauth2/`, however
//! spelt, is ever forwarded.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{AUTHORIZATION, CACHE_CONTROL, HeaderValue, PRAGMA};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Limited};
use hyper::body::Incoming;
use tracing::Level;

use super::asked::Asked;
use super::{ACCESS_LOG, Failed, Proxy, ResponseBody, access_log};
use crate::error::{ProxyError, json_response};
use crate::tenant::{Tenant, Tenants};

/// Every placeholder starts with this, then the tenant's name
/// (percent-encoded where it is not a plain token character).
pub(crate) const PLACEHOLDER_PREFIX: &str = "criteo-token-proxy.";
/// `Authorization: Bearer <placeholder>`, as the SDKs send it.
const BEARER_PLACEHOLDER: &[u8] = b"bearer criteo-token-proxy.";
/// The largest token request body read; a real one is a few hundred bytes.
const MAX_FORM: usize = 64 * 1024;
/// How long a token request's body may take to arrive.
const FORM_TIMEOUT: Duration = Duration::from_secs(10);
/// The lifetime placeholder answers announce: Criteo's. A placeholder never
/// expires at the proxy; the SDKs ask again after this (plus 15 s).
const PLACEHOLDER_LIFETIME: u64 = 900;

/// A request the proxy answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// `/oauth2/token`: the placeholder token endpoint.
    TokenEndpoint,
    /// Any other path under `/oauth2/`: never forwarded.
    OAuth,
}

/// Whether the proxy answers this path itself. A path with neither a
/// percent-escape nor `oauth2` (any case) in it cannot lead under
/// `/oauth2`, however spelt: a word-at-a-time scan, the usual case. Others
/// cost one more scan of their bytes and no allocation; only a path with
/// percent-escapes, dot segments, doubled slashes, backslashes or `;` is
/// normalised (as a server might before routing it) to see where it
/// really leads.
#[inline]
pub(super) fn route(path: &str) -> Option<Route> {
    if !may_lead_to_oauth(path) {
        return None;
    }
    if !needs_normalising(path.as_bytes()) {
        return classify(path);
    }
    classify(&normalise(path))
}

/// `rest` of a path whose first segment is `oauth2` (any case).
fn classify(path: &str) -> Option<Route> {
    let head = path.get(..7)?;
    if !head.eq_ignore_ascii_case("/oauth2") {
        return None;
    }
    let rest = &path[7..];
    if rest.is_empty() {
        return Some(Route::OAuth);
    }
    if !rest.starts_with('/') {
        return None; // `/oauth2x…`
    }
    let tail = rest.strip_suffix('/').unwrap_or(rest);
    if tail.eq_ignore_ascii_case("/token") {
        Some(Route::TokenEndpoint)
    } else {
        Some(Route::OAuth)
    }
}

/// Whether `path` has a percent-escape (which could spell anything) or
/// `oauth2` in any case (which normalising leaves as it is): else no
/// spelling of it reaches `/oauth2`. Eight bytes at a time, looking for a
/// `%` or a `2` (no case to fold); only those bytes are looked at one by
/// one. The last word overlaps the one before it.
fn may_lead_to_oauth(path: &str) -> bool {
    let bytes = path.as_bytes();
    if bytes.len() < 8 {
        let mut word = [0; 8];
        word[..bytes.len()].copy_from_slice(bytes);
        return suspect(bytes, 0, u64::from_le_bytes(word));
    }
    let at_most = bytes.len() - 8;
    let mut at = 0;
    loop {
        let start = at.min(at_most);
        let word = u64::from_le_bytes(bytes[start..start + 8].try_into().unwrap_or([0; 8]));
        if suspect(bytes, start, word) {
            return true;
        }
        if start == at_most {
            return false;
        }
        at += 8;
    }
}

/// Whether `word` (the bytes from `start`) has a `%`, or the `2` of an
/// `oauth2`.
fn suspect(bytes: &[u8], start: usize, word: u64) -> bool {
    let mut found = bytes_equal_to(word, b'%') | bytes_equal_to(word, b'2');
    while found != 0 {
        let i = start + found.trailing_zeros() as usize / 8;
        found &= found - 1;
        if bytes[i] == b'%' || (i >= 5 && bytes[i - 5..i].eq_ignore_ascii_case(b"oauth")) {
            return true;
        }
    }
    false
}

/// The high bit of each byte of `word` that is `b`, and no other bit.
fn bytes_equal_to(word: u64, b: u8) -> u64 {
    const LOWS: u64 = u64::from_le_bytes([0x7f; 8]);
    let x = word ^ (u64::from_le_bytes([1; 8]) * u64::from(b));
    !(((x & LOWS) + LOWS) | x | LOWS)
}

fn needs_normalising(path: &[u8]) -> bool {
    let mut prev = 0u8;
    for &b in path {
        if b == b'%' || b == b'\\' || b == b';' || (prev == b'/' && (b == b'/' || b == b'.')) {
            return true;
        }
        prev = b;
    }
    false
}

/// The path as a lenient server would route it: percent-escapes decoded,
/// backslashes as slashes, `;parameters` dropped, empty and `.` segments
/// skipped, `..` applied.
fn normalise(path: &str) -> String {
    let decoded = percent_decode(path.as_bytes());
    let decoded = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        let segment = segment.split(';').next().unwrap_or("");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for s in segments {
        out.push('/');
        out.push_str(s);
    }
    out
}

fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(|&b| hex(b)),
                bytes.get(i + 2).and_then(|&b| hex(b)),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The placeholder that names `tenant`.
pub(crate) fn placeholder(tenant: &str) -> String {
    let mut out = String::from(PLACEHOLDER_PREFIX);
    out.extend(url::form_urlencoded::byte_serialize(tenant.as_bytes()));
    out
}

/// The tenant a placeholder names, if `token` is one.
fn placeholder_name(token: &[u8]) -> Option<Cow<'_, str>> {
    let name = token.strip_prefix(PLACEHOLDER_PREFIX.as_bytes())?;
    if name.contains(&b'%') || name.contains(&b'+') {
        let decoded = url::form_urlencoded::parse(name)
            .next()
            .map(|(k, _)| k.into_owned())
            .unwrap_or_default();
        return Some(Cow::Owned(decoded));
    }
    std::str::from_utf8(name).ok().map(Cow::Borrowed)
}

/// The tenant named by a placeholder in `Authorization`, if the request
/// carries one. On the request path, only for requests with no tenant
/// header: one prefix compare, no allocation for a plain tenant name.
#[inline]
pub(super) fn placeholder_tenant(headers: &HeaderMap) -> Option<Cow<'_, str>> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let head = value.get(..BEARER_PLACEHOLDER.len())?;
    if !head.eq_ignore_ascii_case(BEARER_PLACEHOLDER) {
        return None;
    }
    placeholder_name(&value[7..])
}

/// What a token request says about the tenant it wants.
#[derive(Debug, Default)]
struct TokenForm {
    client_id: Option<String>,
    refresh_token: Option<String>,
    grant_type: Option<String>,
}

impl TokenForm {
    fn parse(body: &[u8]) -> Self {
        let mut form = Self::default();
        for (k, v) in url::form_urlencoded::parse(body) {
            let slot = match &*k {
                "client_id" => &mut form.client_id,
                "refresh_token" => &mut form.refresh_token,
                "grant_type" => &mut form.grant_type,
                _ => continue,
            };
            *slot = Some(v.trim().to_owned());
        }
        form
    }
}

// === impl Proxy ===

impl Proxy {
    /// Answers a request for one of the proxy's own routes.
    pub(super) async fn answer_locally(
        &self,
        route: Route,
        req: Request<Incoming>,
        started: Instant,
    ) -> Response<ResponseBody> {
        let method = req.method().clone();
        let uri = req.uri().clone();
        let version = req.version();
        let answer = match route {
            Route::OAuth => Err(Failed::unread(
                ProxyError::NotForwarded(format!(
                    "{} is one of Criteo's OAuth endpoints, which the proxy never forwards: it \
                     holds the tokens itself (its POST /oauth2/token hands out placeholders)",
                    uri.path()
                )),
                req.into_body(),
            )),
            Route::TokenEndpoint if method != Method::POST => Err(Failed::unread(
                ProxyError::MethodNotAllowed {
                    allow: "POST",
                    message: "the proxy's token endpoint /oauth2/token answers POST only".into(),
                },
                req.into_body(),
            )),
            Route::TokenEndpoint => self.token_endpoint(req).await,
        };
        match answer {
            Ok((tenant, resp)) => {
                let resp = resp.map(Either::Right);
                let elapsed = started.elapsed();
                tenant.metrics.request(resp.status(), elapsed.as_secs_f64());
                if tracing::enabled!(target: ACCESS_LOG, Level::INFO) {
                    access_log(&tenant, &method, &uri, resp.status(), elapsed, None, None);
                }
                resp
            }
            Err(Failed { err, left }) => {
                self.metrics.request_without_tenant(err.status());
                tracing::debug!(path = uri.path(), error = %err, "local answer refused");
                // Like every early answer: the client's body is read (or the
                // connection closed cleanly) so its next request still works.
                self.settle(err.to_response(None).map(Either::Right), version, left)
                    .await
            }
        }
    }

    /// `POST /oauth2/token`: a placeholder for the tenant the request
    /// names, whatever its grant and credentials. Nothing reaches Criteo
    /// and no tenant's token is touched.
    async fn token_endpoint(
        &self,
        req: Request<Incoming>,
    ) -> Result<(Arc<Tenant>, Response<http_body_util::Full<bytes::Bytes>>), Failed> {
        let (parts, body) = req.into_parts();
        let body = match tokio::time::timeout(FORM_TIMEOUT, Limited::new(body, MAX_FORM).collect())
            .await
        {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) => {
                return Err(Failed::lost(ProxyError::BadRequest(format!(
                    "the token request's body could not be read (at most {} KiB): {e}",
                    MAX_FORM / 1024
                ))));
            }
            Err(_) => {
                return Err(Failed::lost(ProxyError::BadRequest(format!(
                    "the token request's body did not arrive within {}s",
                    FORM_TIMEOUT.as_secs()
                ))));
            }
        };
        let form = TokenForm::parse(&body);
        let tenants = self.tenants.load();
        let tenant = if parts.headers.contains_key(&self.tenant_header) {
            let asked = Asked::from(&parts.headers, &self.tenant_header);
            asked
                .lookup(&tenants)
                .cloned()
                .ok_or_else(|| asked.unknown(&self.tenant_header))
        } else {
            self.tenant_for_form(&tenants, &form)
        }
        .map_err(Failed::read)?;
        tracing::debug!(
            tenant = &*tenant.name,
            grant_type = form.grant_type.as_deref().unwrap_or(""),
            "token request answered by the proxy with a placeholder; nothing sent to Criteo"
        );
        let token = placeholder(&tenant.name);
        let mut resp = json_response(
            StatusCode::OK,
            &serde_json::json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": PLACEHOLDER_LIFETIME,
                "refresh_token": token,
            }),
        );
        // RFC 6749 §5.1: token answers are not cached.
        let headers = resp.headers_mut();
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
        Ok((tenant, resp))
    }

    /// The tenant a token request's form names: its `client_id` as a
    /// tenant name or as a tenant's client id, else the tenant of a
    /// placeholder presented as `refresh_token`, else the default tenant.
    fn tenant_for_form(
        &self,
        tenants: &Tenants,
        form: &TokenForm,
    ) -> Result<Arc<Tenant>, ProxyError> {
        let client_id = form.client_id.as_deref().filter(|s| !s.is_empty());
        if let Some(id) = client_id {
            if let Some(t) = tenants.choose(Some(id)) {
                return Ok(Arc::clone(t));
            }
            match tenants.with_client_id(id) {
                [] => {}
                [t] => return Ok(Arc::clone(t)),
                several => {
                    let names: Vec<&str> = several.iter().map(|t| &*t.name).collect();
                    return Err(ProxyError::UnknownTenant(format!(
                        "client_id {id:?} is the client id of tenants {}: send a tenant's name as \
                         client_id, or the {} header",
                        names.join(", "),
                        self.tenant_header
                    )));
                }
            }
        }
        if let Some(name) = form
            .refresh_token
            .as_deref()
            .and_then(|t| placeholder_name(t.as_bytes()))
        {
            return tenants.choose(Some(&name)).cloned().ok_or_else(|| {
                ProxyError::UnknownTenant(format!(
                    "the refresh_token is a placeholder for tenant {name:?}, which is not configured"
                ))
            });
        }
        tenants.default_tenant().cloned().ok_or_else(|| {
            ProxyError::UnknownTenant(match client_id {
                Some(id) => format!(
                    "client_id {id:?} is neither a tenant's name nor a tenant's client_id, and no \
                     server.default_tenant is set"
                ),
                None => {
                    "the token request has no client_id, and no server.default_tenant is set".into()
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_endpoint_is_recognised_however_it_is_spelt() {
        for path in [
            "/oauth2/token",
            "/oauth2/token/",
            "/OAuth2/Token",
            "//oauth2/token",
            "/oauth2//token",
            "/./oauth2/token",
            "/2024-10/../oauth2/token",
            "/%6fauth2/token",
            "/oauth2%2ftoken",
            "/oauth2;x/token",
            "\\oauth2\\token",
            "/%6Fauth2/token",
            "/%4F%41UTH%32/token",
            "/x/../oauth2/token",
            "/x/..%2foauth2/token",
            "/OAUTH2/token",
            "/oAuTh2/TOKEN",
            "/2/../oauth2/token",
            "/22222/../oauth2/token",
        ] {
            assert_eq!(route(path), Some(Route::TokenEndpoint), "{path}");
        }
    }

    #[test]
    fn other_oauth_paths_are_kept_and_api_paths_are_not() {
        for path in ["/oauth2", "/oauth2/", "/oauth2/revoke", "/OAUTH2/token/x"] {
            assert_eq!(route(path), Some(Route::OAuth), "{path}");
        }
        for path in [
            "/",
            "",
            "/2024-10/advertisers/me",
            "/2024-10/oauth2/token",
            "/oauth2x/token",
            "/oauth",
            "/2024-10/retail-media/accounts?x=/oauth2/token",
        ] {
            assert_eq!(route(path), None, "{path}");
        }
    }

    /// `route` before its shortcut: every path normalised as needed.
    fn route_in_full(path: &str) -> Option<Route> {
        if !needs_normalising(path.as_bytes()) {
            return classify(path);
        }
        classify(&normalise(path))
    }

    #[test]
    fn the_shortcut_never_changes_where_a_path_leads() {
        let pieces = [
            "/", "//", "\\", ".", "..", "%", "%2f", "%2F", "%6f", "%6F", "%32", "2", "22", "o",
            "O", "oauth", "OAuth", "oauth2", "OAUTH2", "auth2", "token", "TOKEN", ";x", "é", "x",
        ];
        let mut checked = 0;
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    for d in pieces {
                        let path = format!("{a}{b}{c}{d}");
                        assert_eq!(route(&path), route_in_full(&path), "{path}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 300_000);
    }

    #[test]
    fn placeholders_name_their_tenant() {
        for name in ["main", "acme-eu", "ünïcode", "a+b", "50%", "a.b_c"] {
            let p = placeholder(name);
            assert!(p.starts_with(PLACEHOLDER_PREFIX));
            assert!(
                HeaderValue::from_str(&format!("Bearer {p}")).is_ok(),
                "{p} fits a header"
            );
            let mut h = HeaderMap::new();
            h.insert(
                AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {p}")).unwrap(),
            );
            assert_eq!(placeholder_tenant(&h).as_deref(), Some(name), "{p}");
        }
        let plain = placeholder("main");
        assert_eq!(plain, "criteo-token-proxy.main");
    }

    #[test]
    fn other_authorizations_are_not_placeholders() {
        for value in [
            "Bearer eyJhbGciOi",
            "Basic Y3JpdGVvLXRva2VuLXByb3h5Lm1haW4=",
            "Bearer criteo-token-proxy",
            "criteo-token-proxy.main",
        ] {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, HeaderValue::from_static(value));
            assert_eq!(placeholder_tenant(&h), None, "{value}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_static("bearer criteo-token-proxy.main"),
        );
        assert_eq!(placeholder_tenant(&h).as_deref(), Some("main"));
    }

    #[test]
    fn the_form_gives_client_id_refresh_token_and_grant() {
        let f = TokenForm::parse(
            b"grant_type=refresh_token&client_id=+acme+&client_secret=s&refresh_token=criteo-token-proxy.main",
        );
        assert_eq!(f.client_id.as_deref(), Some("acme"));
        assert_eq!(f.grant_type.as_deref(), Some("refresh_token"));
        assert_eq!(
            f.refresh_token
                .as_deref()
                .and_then(|t| placeholder_name(t.as_bytes()))
                .as_deref(),
            Some("main")
        );
    }
}
