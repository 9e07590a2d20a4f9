//! The stand-in's API: the main read paths of Marketing Solutions and
//! Retail Media under any version segment, with bodies in the shapes of the
//! official SDKs' models (the Python SDK checks types and enumerations, so
//! `"type": "advertiser"`, never `"Advertiser"`), Criteo's error lists for
//! 401, 404 and 429, and `x-ratelimit-*` headers on every answer.

use crate::admin::onboarding::unix_now;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{AUTHORIZATION, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};

use super::errors::criteo_error;
use super::{APPS, App, Stand, json_response};

/// Per app: the minute (Unix seconds / 60) being counted, and the calls in it.
pub(super) type Windows = HashMap<usize, (u64, u32)>;

const ROUTES: &str = "under any version (/2024-10/, /2027-01/, /preview/): GET advertisers/me, \
    GET marketing-solutions/me, GET retail-media/me, GET retail-media/accounts, POST statistics/report";

/// `/{version}/{rest}` → `rest`, for a version like `2027-01` or `preview`.
fn versioned(path: &str) -> Option<&str> {
    let (version, rest) = path.strip_prefix('/')?.split_once('/')?;
    let b = version.as_bytes();
    let dated = b.len() == 7
        && b[4] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || c.is_ascii_digit());
    (dated || version == "preview").then_some(rest)
}

impl Stand {
    /// Every path that is not the token endpoint or a sandbox control.
    pub(super) fn api(&self, parts: &Parts, body: &[u8]) -> Response<Full<Bytes>> {
        let path = parts.uri.path();
        let bearer = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let app = match self.lock_tokens().check(bearer) {
            Ok(client) => APPS.iter().position(|a| a.client_id == client),
            Err(refusal) => return refusal.response(path),
        };
        // Only the sandbox's apps are ever granted a token.
        let Some(app) = app else {
            return super::errors::Refusal::Invalid.response(path);
        };
        let (limit, remaining, reset) = match self.count_call(app) {
            Ok(quota) => quota,
            Err((limit, reset)) => {
                let mut resp = criteo_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "quota",
                    "too-many-requests",
                    path,
                    "Too many requests",
                    &format!("The limit is {limit} calls per minute; it resets at {reset}"),
                );
                rate_headers(&mut resp, limit, 0, reset);
                return resp;
            }
        };
        let mut resp = self.route(&APPS[app], parts, body);
        rate_headers(&mut resp, limit, remaining, reset);
        resp
    }

    /// Counts a call against the app's per-minute limit: `(limit,
    /// remaining, reset)`, or `(limit, reset)` when over it (or throttled).
    fn count_call(&self, app: usize) -> Result<(u32, u32, u64), (u32, u64)> {
        let limit = APPS[app].rate_limit;
        let now = unix_now();
        let minute = now / 60;
        let reset = (minute + 1) * 60;
        let throttled = self
            .throttled
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if throttled {
            return Err((limit, reset));
        }
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let window = windows.entry(app).or_insert((minute, 0));
        if window.0 != minute {
            *window = (minute, 0);
        }
        if window.1 >= limit {
            return Err((limit, reset));
        }
        window.1 += 1;
        Ok((limit, limit - window.1, reset))
    }

    fn route(&self, app: &App, parts: &Parts, body: &[u8]) -> Response<Full<Bytes>> {
        let path = parts.uri.path();
        let not_found = || {
            criteo_error(
                StatusCode::NOT_FOUND,
                "validation",
                "not-found",
                path,
                "Resource not found",
                &format!("The sandbox answers, {ROUTES}"),
            )
        };
        let Some(rest) = versioned(path) else {
            return not_found();
        };
        let expected = match rest {
            "advertisers/me"
            | "marketing-solutions/me"
            | "retail-media/me"
            | "retail-media/accounts" => Method::GET,
            "statistics/report" => Method::POST,
            _ => return not_found(),
        };
        if parts.method != expected {
            return criteo_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "validation",
                "method-not-allowed",
                path,
                "Method not allowed",
                &format!("The sandbox answers, {ROUTES}"),
            );
        }
        match rest {
            "advertisers/me" => json_response(StatusCode::OK, &advertisers(app)),
            "marketing-solutions/me" => {
                json_response(StatusCode::OK, &application(app, "MarketingSolutions"))
            }
            "retail-media/me" => json_response(StatusCode::OK, &application(app, "RetailMedia")),
            "retail-media/accounts" => {
                json_response(StatusCode::OK, &accounts(app, parts.uri.query()))
            }
            _ => super::report::statistics(app, path, body),
        }
    }
}

fn rate_headers(resp: &mut Response<Full<Bytes>>, limit: u32, remaining: u32, reset: u64) {
    let h = resp.headers_mut();
    h.insert("x-ratelimit-limit", HeaderValue::from(limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
    h.insert("x-ratelimit-reset", HeaderValue::from(reset));
}

/// `GetPortfolioResponse`.
fn advertisers(app: &App) -> Value {
    let (id, name) = app.advertiser;
    json!({
        "data": [{"id": id, "type": "advertiser", "attributes": {"advertiserName": name}}],
        "errors": [],
        "warnings": [],
    })
}

/// `ApplicationSummaryModelResponse`.
fn application(app: &App, service: &str) -> Value {
    json!({
        "data": {"type": "Application", "attributes": {
            "applicationId": app.application_id,
            "name": format!("criteo-token-proxy sandbox: {}", app.tenant),
            "description": format!("The --dev stand-in's app for tenant {}", app.tenant),
            "organizationId": 4242,
            "criteoService": service,
        }},
        "errors": [],
        "warnings": [],
    })
}

/// `JsonApiPageResponseOfAccount`, paged by `pageIndex` and `pageSize`.
fn accounts(app: &App, query: Option<&str>) -> Value {
    let all: Vec<Value> = match app.tenant {
        "demo" => vec![account(
            "98765",
            "Sandbox Retail Account",
            ("supply", None),
            &["FR", "DE"],
            ("EUR", "Europe/Paris"),
            "Sandbox Retailer",
        )],
        _ => vec![
            account(
                "54321",
                "Acme Brand",
                ("demand", Some("brand")),
                &["US"],
                ("USD", "America/New_York"),
                "Acme Corporation",
            ),
            account(
                "54322",
                "Acme Marketplace Seller",
                ("demand", Some("seller")),
                &["US", "CA"],
                ("USD", "America/New_York"),
                "Acme Corporation",
            ),
        ],
    };
    let param = |name: &str, default: usize| {
        url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(default)
    };
    let size = param("pageSize", 25).clamp(1, 500);
    let index = param("pageIndex", 0);
    let page: Vec<Value> = all.iter().skip(index * size).take(size).cloned().collect();
    json!({
        "data": page,
        "metadata": {
            "totalItemsAcrossAllPages": all.len(),
            "currentPageSize": size,
            "currentPageIndex": index,
            "totalPages": all.len().div_ceil(size),
            "nextPage": null,
            "previousPage": null,
        },
        "errors": [],
        "warnings": [],
    })
}

fn account(
    id: &str,
    name: &str,
    (kind, subtype): (&str, Option<&str>),
    countries: &[&str],
    (currency, time_zone): (&str, &str),
    company: &str,
) -> Value {
    json!({"id": id, "type": "RetailMediaAccount", "attributes": {
        "name": name,
        "type": kind,
        "subtype": subtype,
        "countries": countries,
        "currency": currency,
        "timeZone": time_zone,
        "parentAccountLabel": company,
        "companyName": company,
        "onBehalfCompanyName": null,
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_version_segment_is_accepted() {
        assert_eq!(versioned("/2024-10/advertisers/me"), Some("advertisers/me"));
        assert_eq!(
            versioned("/2027-01/retail-media/accounts"),
            Some("retail-media/accounts")
        );
        assert_eq!(
            versioned("/preview/marketing-solutions/me"),
            Some("marketing-solutions/me")
        );
        assert_eq!(versioned("/advertisers/me"), None);
        assert_eq!(versioned("/2024-1x/advertisers/me"), None);
        assert_eq!(versioned("/2024-10"), None);
    }

    #[test]
    fn accounts_are_paged() {
        let acme = &APPS[1];
        let page = accounts(acme, Some("pageIndex=1&pageSize=1"));
        assert_eq!(page["data"][0]["id"], "54322");
        assert_eq!(page["metadata"]["totalPages"], 2);
        let all = accounts(acme, None);
        assert_eq!(all["data"].as_array().unwrap().len(), 2);
        assert_eq!(all["data"][0]["attributes"]["timeZone"], "America/New_York");
    }
}
