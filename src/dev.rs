//! `--dev`: a sandbox. An embedded stand-in for Criteo on loopback (a
//! token endpoint with short-lived tokens, a few realistic API routes that
//! answer 401 to stale tokens) and the real proxy pointed at it, so a
//! newcomer sees the whole flow (token fetch, renewal, 401 replay) work with
//! no credentials. Only the `--dev` flag turns it on; nothing here is
//! reachable from a normal configuration.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rand::RngCore;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The sandbox app's credentials (not secret: they open nothing real).
pub const CLIENT_ID: &str = "sandbox-client";
pub const CLIENT_SECRET: &str = "sandbox-secret";
/// Sandbox tokens live a minute, so renewal is seen within one.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Sandbox {
    tokens: Mutex<HashMap<String, Instant>>,
    issued: AtomicU64,
}

/// Starts the stand-in on `127.0.0.1:0`; returns its address.
pub async fn start() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sandbox = Arc::new(Sandbox::default());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let sandbox = Arc::clone(&sandbox);
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let sandbox = Arc::clone(&sandbox);
                    async move { Ok::<_, Infallible>(sandbox.handle(req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// The proxy's configuration for the sandbox, before environment
/// overrides (`CRITEO_PROXY_SERVER__LISTEN` still applies).
pub fn config_toml(upstream: SocketAddr) -> String {
    format!(
        r#"[server]
default_tenant = "demo"

[upstream]
url = "http://{upstream}"
token_url = "http://{upstream}/oauth2/token"
consent_url = "http://{upstream}/consent"

[tenants.demo]
grant = "client_credentials"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
"#
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn criteo_error(status: StatusCode, code: &str, title: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({"errors": [{"type": "authorization", "code": code, "title": title}]}),
    )
}

impl Sandbox {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        if path == "/oauth2/token" && req.method() == Method::POST {
            return self.token(req).await;
        }
        if path == "/sandbox/revoke-tokens" && req.method() == Method::POST {
            let n = {
                let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
                let n = tokens.len();
                tokens.clear();
                n
            };
            tracing::info!(
                revoked = n,
                "sandbox: every access token revoked; the next call gets a 401"
            );
            return json_response(StatusCode::OK, &json!({"revoked": n}));
        }
        let bearer = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let valid = bearer.as_ref().and_then(|t| {
            let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
            tokens.get(t).copied()
        });
        match valid {
            None => {
                return criteo_error(
                    StatusCode::UNAUTHORIZED,
                    "authorization-token-invalid",
                    "Authorization token is invalid",
                );
            }
            Some(exp) if exp <= Instant::now() => {
                return criteo_error(
                    StatusCode::UNAUTHORIZED,
                    "authorization-token-expired",
                    "Authorization token has expired",
                );
            }
            Some(_) => {}
        }
        let method = req.method().clone();
        let body = Limited::new(req.into_body(), 1 << 20)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        match (method, path.as_str()) {
            (Method::GET, "/2024-10/advertisers/me") => json_response(
                StatusCode::OK,
                &json!({"data": [{"id": "12345", "type": "Advertiser", "attributes": {
                    "advertiserName": "Sandbox Advertiser", "currency": "EUR", "timezone": "Europe/Paris"}}]}),
            ),
            (Method::GET, "/2024-10/retail-media/accounts") => json_response(
                StatusCode::OK,
                &json!({"data": [{"id": "98765", "type": "RetailMediaAccount", "attributes": {
                    "name": "Sandbox Retail Account", "type": "supplier", "countries": ["FR", "DE"]}}],
                    "metadata": {"totalItemsAcrossAllPages": 1, "currentPageSize": 25, "currentPageIndex": 0}}),
            ),
            (Method::POST, "/2024-10/statistics/report") => {
                let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                json_response(
                    StatusCode::OK,
                    &json!({"Rows": [{"AdvertiserId": "12345", "Day": "2026-11-24",
                        "Displays": 120_000, "Clicks": 840, "AdvertiserCost": 312.5}],
                        "Columns": ["AdvertiserId", "Day", "Displays", "Clicks", "AdvertiserCost"],
                        "echo": request}),
                )
            }
            _ => json_response(
                StatusCode::NOT_FOUND,
                &json!({"errors": [{"type": "validation", "code": "not-found",
                    "title": "The sandbox knows GET /2024-10/advertisers/me, GET /2024-10/retail-media/accounts, POST /2024-10/statistics/report"}]}),
            ),
        }
    }

    async fn token(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let body = Limited::new(req.into_body(), 64 * 1024)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let form: HashMap<String, String> =
            url::form_urlencoded::parse(&body).into_owned().collect();
        let ok = form.get("grant_type").map(String::as_str) == Some("client_credentials")
            && form.get("client_id").map(String::as_str) == Some(CLIENT_ID)
            && form.get("client_secret").map(String::as_str) == Some(CLIENT_SECRET);
        if !ok {
            return json_response(
                StatusCode::UNAUTHORIZED,
                &json!({"error": "invalid_client", "error_description": "the sandbox knows one client"}),
            );
        }
        let mut random = [0u8; 12];
        rand::rng().fill_bytes(&mut random);
        let n = self.issued.fetch_add(1, Ordering::Relaxed) + 1;
        let token = format!("sandbox-{n}-{}", hex::encode(random));
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.clone(), Instant::now() + TOKEN_LIFETIME);
        json_response(
            StatusCode::OK,
            &json!({"access_token": token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME.as_secs()}),
        )
    }
}
