//! The admin listener: liveness, readiness, metrics, the tenant list and
//! consent onboarding. Nothing here ever shows a secret or a token.
//! Starting an onboarding is for operators only (`access.rs`).

mod access;
mod exchanges;
pub(crate) mod onboarding;

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::config::SecretSource;
use crate::error::json_response;
use crate::metrics::Metrics;
use crate::store::TokenStore;
use crate::tenant::{Tenant, Tenants};
use crate::token::{Grants, State};
pub(crate) use onboarding::Onboarding;

/// Largest consent callback body read.
const MAX_CALLBACK_BODY: usize = 64 * 1024;

#[derive(Debug)]
pub(crate) struct Admin {
    tenants: Arc<ArcSwap<Tenants>>,
    metrics: Metrics,
    onboarding: Onboarding,
    access: access::Access,
    shutting_down: AtomicBool,
    /// Bound on reading a callback's body (`server.body_read_timeout`).
    body_read_timeout: Duration,
    /// The token store (its problems are shown) and the refresh-token
    /// grants (whether this replica is the one refreshing). Not kept
    /// alive from here: an admin connection outliving the server must not
    /// keep the store (and its lock file) open.
    store: Option<Weak<dyn TokenStore>>,
    grants: Grants,
}

impl Admin {
    /// `admin_token` is `server.admin_token(_file)`: when set, only requests
    /// bearing it may start an onboarding; when not, only loopback clients.
    pub(crate) fn new(
        tenants: Arc<ArcSwap<Tenants>>,
        metrics: Metrics,
        onboarding: Onboarding,
        admin_token: Option<SecretSource>,
    ) -> Self {
        Self {
            tenants,
            metrics,
            onboarding,
            access: access::Access::new(admin_token),
            shutting_down: AtomicBool::new(false),
            body_read_timeout: Duration::from_secs(30),
            store: None,
            grants: Grants::default(),
        }
    }

    /// Shows the store's problems in `/readyz` and `/tenants`, and which
    /// replica refreshes each tenant of a shared store.
    pub(crate) fn with_store(mut self, store: Option<Arc<dyn TokenStore>>, grants: Grants) -> Self {
        self.store = store.as_ref().map(Arc::downgrade);
        self.grants = grants;
        self
    }

    /// `{"ok": …, "location": …, "error": …}`, or null without a store.
    fn store_status(&self) -> Value {
        self.store.as_ref().map_or(Value::Null, |store| {
            let Some(store) = store.upgrade() else {
                return Value::Null;
            };
            let problem = store.problem();
            json!({
                "shared": store.shared(),
                "ok": problem.is_none(),
                "error": problem,
            })
        })
    }

    /// A client that stops sending a callback's body is answered 408
    /// after this long, instead of holding its connection.
    pub(crate) fn with_body_read_timeout(mut self, timeout: Duration) -> Self {
        self.body_read_timeout = timeout;
        self
    }

    /// From now on `/readyz` answers 503.
    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Answers one request from `peer`, the client's address as accepted.
    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        let query = req.uri().query().map(str::to_owned);
        let query = query.as_deref();
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => {
                json_response(StatusCode::OK, &json!({"status": "ok"}))
            }
            (&Method::GET | &Method::HEAD, "/readyz") => self.readyz(),
            (&Method::GET | &Method::HEAD, "/metrics") => self.metrics(),
            (&Method::GET | &Method::HEAD, "/tenants") => json_response(
                StatusCode::OK,
                &json!({
                    "tenants": self.tenants.load().iter().map(|t| self.describe(t)).collect::<Vec<_>>(),
                    "store": self.store_status(),
                }),
            ),
            (&Method::GET, "/oauth/authorize") => {
                match self.access.check(peer.ip(), req.headers()).await {
                    Some(refused) => refused,
                    None => self.onboarding.authorize(query).await,
                }
            }
            (&Method::GET, "/oauth/callback") => self.onboarding.callback(query).await,
            (&Method::POST, "/consent/callback") => {
                let signature = req
                    .headers()
                    .get(onboarding::SIGNATURE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = Limited::new(req.into_body(), MAX_CALLBACK_BODY).collect();
                match tokio::time::timeout(self.body_read_timeout, body).await {
                    Ok(Ok(body)) => {
                        self.onboarding
                            .consent_callback(signature.as_deref(), &body.to_bytes())
                            .await
                    }
                    Err(_) => json_response(
                        StatusCode::REQUEST_TIMEOUT,
                        &json!({"error": "body_timeout", "message": "the callback body was not sent in time (server.body_read_timeout)"}),
                    ),
                    Ok(Err(_)) => json_response(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &json!({"error": "body_too_large", "message": "consent callbacks are small"}),
                    ),
                }
            }
            (
                _,
                path @ ("/healthz" | "/readyz" | "/metrics" | "/tenants" | "/oauth/authorize"
                | "/oauth/callback" | "/consent/callback"),
            ) => json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method_not_allowed", "message": format!("{path} does not answer {}", req.method())}),
            ),
            _ => json_response(
                StatusCode::NOT_FOUND,
                &json!({
                    "error": "not_found",
                    "message": "admin paths: /healthz /readyz /metrics /tenants /oauth/authorize /oauth/callback /consent/callback",
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
            .load()
            .iter()
            // An idle (lazy, never used) tenant does not hold readiness up.
            .filter(|t| t.tokens.usable().is_none() && t.tokens.health().state != State::Idle)
            .map(|t| {
                let h = t.tokens.health();
                json!({
                    "tenant": &*t.name,
                    "state": h.state.as_str(),
                    "reason": h.last_error.as_deref().unwrap_or("no token yet"),
                })
            })
            .collect();
        // A store problem alone keeps readiness: the tokens held serve
        // until they expire, and each tenant's own state says when not.
        let (status, mut body) = if not_ready.is_empty() {
            (StatusCode::OK, json!({"ready": true}))
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ready": false, "tenants": not_ready}),
            )
        };
        let store = self.store_status();
        if !store.is_null() {
            body["store"] = store;
        }
        json_response(status, &body)
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let now = Instant::now();
        for t in self.tenants.load().iter() {
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

impl Admin {
    fn describe(&self, t: &Tenant) -> Value {
        let mut described = describe(t);
        if let Some(here) = self
            .grants
            .load()
            .get(&t.name)
            .and_then(|g| g.refreshing_here())
        {
            described["refreshing_here"] = Value::Bool(here);
        }
        described
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
        "rate_limit": t.pacing.as_deref().map(|p| {
            let l = p.limits();
            json!({
                "limit": l.overall.map(|r| r.to_string()),
                "reporting": l.reporting.as_ref().map(|(r, _)| r.to_string()),
                "max_wait_seconds": l.max_wait.as_secs_f64(),
                "waiting": p.waiting(),
                "share": format!("1/{}", p.replicas()),
            })
        }),
    })
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
