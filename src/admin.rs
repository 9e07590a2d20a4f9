//! The admin listener: liveness, readiness, metrics and the tenant list.
//! Nothing here ever shows a secret or a token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};

use crate::error::json_response;
use crate::metrics::Metrics;
use crate::tenant::{Tenant, Tenants};

#[derive(Debug)]
pub struct Admin {
    tenants: Arc<Tenants>,
    metrics: Metrics,
    shutting_down: AtomicBool,
}

impl Admin {
    pub fn new(tenants: Arc<Tenants>, metrics: Metrics) -> Self {
        Self {
            tenants,
            metrics,
            shutting_down: AtomicBool::new(false),
        }
    }

    /// From now on `/readyz` answers 503.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// True when the proxy is not shutting down and every tenant holds a
    /// usable token.
    pub fn is_ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Acquire)
            && self.tenants.iter().all(|t| t.tokens.usable().is_some())
    }

    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method_not_allowed", "message": format!("{path} answers GET")}),
            );
        }
        match path {
            "/healthz" => json_response(StatusCode::OK, &json!({"status": "ok"})),
            "/readyz" => self.readyz(),
            "/metrics" => self.metrics(),
            "/tenants" => json_response(
                StatusCode::OK,
                &json!({"tenants": self.tenants.iter().map(|t| describe(t)).collect::<Vec<_>>()}),
            ),
            _ => json_response(
                StatusCode::NOT_FOUND,
                &json!({
                    "error": "not_found",
                    "message": "admin paths: /healthz /readyz /metrics /tenants",
                }),
            ),
        }
    }

    fn readyz(&self) -> Response<Full<Bytes>> {
        if self.shutting_down.load(Ordering::Acquire) {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"ready": false, "reason": "shutting down"}),
            );
        }
        let not_ready: Vec<Value> = self
            .tenants
            .iter()
            .filter(|t| t.tokens.usable().is_none())
            .map(|t| {
                let h = t.tokens.health();
                json!({
                    "tenant": &*t.name,
                    "state": h.state.as_str(),
                    "reason": h.last_error.as_deref().unwrap_or("no token yet"),
                })
            })
            .collect();
        if not_ready.is_empty() {
            json_response(StatusCode::OK, &json!({"ready": true}))
        } else {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"ready": false, "tenants": not_ready}),
            )
        }
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let now = Instant::now();
        for t in self.tenants.iter() {
            let secs = t
                .tokens
                .usable()
                .map_or(0.0, |tok| tok.remaining(now).as_secs_f64());
            t.metrics.set_expiry(secs);
        }
        let mut resp = Response::new(Full::new(Bytes::from(self.metrics.render())));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        resp
    }
}

fn describe(t: &Tenant) -> Value {
    let h = t.tokens.health();
    let now = Instant::now();
    let token = t.tokens.usable();
    // A tenant whose token still serves is shown by its refresher's word,
    // except that "starting" cannot outlive the first token.
    let state = match (&token, h.state) {
        (None, crate::token::State::Ready) => "expired",
        (_, s) => s.as_str(),
    };
    json!({
        "name": &*t.name,
        "grant": t.grant.as_str(),
        "state": state,
        "has_token": token.is_some(),
        "expires_in_seconds": token.as_ref().map(|tok| tok.remaining(now).as_secs()),
        "last_refresh": h.last_refresh.map(rfc3339),
        "last_error": h.last_error,
        "retry_in_seconds": h.retry_at.map(|r| r.saturating_duration_since(now).as_secs()),
    })
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
