//! `--dev`: a sandbox. An embedded stand-in for Criteo on loopback and the
//! real proxy pointed at it, so a newcomer sees the whole flow (token fetch,
//! renewal, rotation of a refresh token, 401 replay, Criteo's own errors)
//! work with no credentials, and Criteo's official SDKs work against it
//! unchanged. Only the `--dev` flag turns it on; nothing here is reachable
//! from a normal configuration.
//!
//! The stand-in knows two apps, one per tenant of the sandbox's
//! configuration: `demo` (client credentials, the default tenant) and `acme`
//! (an authorization-code app whose single-use refresh token rotates at every
//! renewal and is kept in a store in a private temporary folder). Its API
//! answers, under any version segment (`/2024-10/`, `/2027-01/`,
//! `/preview/`), the main read paths of Marketing Solutions and Retail Media
//! in the shapes of the official SDKs' models, each app seeing its own data.

mod api;
pub(crate) mod errors;
mod oauth;
mod report;
pub(crate) mod tokens;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::error::json_response;

/// The `demo` app's credentials (not secret: they open nothing real).
pub(crate) const CLIENT_ID: &str = "sandbox-client";
pub(crate) const CLIENT_SECRET: &str = "sandbox-secret";
/// The `acme` app's credentials.
pub(crate) const ACME_CLIENT_ID: &str = "sandbox-acme-client";
pub(crate) const ACME_CLIENT_SECRET: &str = "sandbox-acme-secret";
/// Sandbox tokens live a minute, so renewal is seen within one.
pub(crate) const TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// How many requests `/sandbox/seen` remembers.
const SEEN_KEPT: usize = 500;
/// How much of a request body is read.
const MAX_BODY: usize = 1 << 20;

/// An app the stand-in knows, and what its tokens see.
#[derive(Debug)]
struct App {
    tenant: &'static str,
    client_id: &'static str,
    client_secret: &'static str,
    /// Criteo's published limit for the app's kind, per minute.
    rate_limit: u32,
    application_id: u64,
    advertiser: (&'static str, &'static str),
}

const APPS: [App; 2] = [
    App {
        tenant: "demo",
        client_id: CLIENT_ID,
        client_secret: CLIENT_SECRET,
        rate_limit: 250,
        application_id: 1001,
        advertiser: ("12345", "Sandbox Advertiser"),
    },
    App {
        tenant: "acme",
        client_id: ACME_CLIENT_ID,
        client_secret: ACME_CLIENT_SECRET,
        rate_limit: 10,
        application_id: 1002,
        advertiser: ("67890", "Acme Sandbox Advertiser"),
    },
];

/// The running stand-in.
#[derive(Debug)]
pub(crate) struct Sandbox {
    addr: SocketAddr,
    /// `acme`'s first refresh token, for the proxy's configuration.
    seed: String,
    store: StoreDir,
}

/// What the stand-in holds: tokens, what it saw, its rate-limit windows.
#[derive(Debug)]
struct Stand {
    tokens: Mutex<tokens::Ledger>,
    seen: Mutex<VecDeque<Value>>,
    /// API calls still to be answered with a 429 (`/sandbox/throttle`).
    throttled: AtomicU32,
    windows: Mutex<api::Windows>,
}

/// Starts the stand-in on `127.0.0.1:0`, with a private folder for the
/// token store (removed when the sandbox is dropped).
pub(crate) async fn start() -> std::io::Result<Sandbox> {
    let store = StoreDir::create()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stand = Arc::new(Stand::new());
    let seed = stand.lock_tokens().issue_refresh(ACME_CLIENT_ID);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let stand = Arc::clone(&stand);
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let stand = Arc::clone(&stand);
                    async move { Ok::<_, Infallible>(stand.handle(req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(Sandbox { addr, seed, store })
}

impl Sandbox {
    /// The stand-in's address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's configuration for the sandbox, before environment
    /// overrides (`CRITEO_PROXY_SERVER__LISTEN` and `__ADMIN_LISTEN` still
    /// apply).
    pub(crate) fn config_toml(&self) -> String {
        let upstream = self.addr;
        let store = self.store.0.join("tokens.db");
        let seed = &self.seed;
        format!(
            r#"[server]
default_tenant = "demo"

[upstream]
url = "http://{upstream}"
token_url = "http://{upstream}/oauth2/token"
consent_url = "http://{upstream}/consent"

[store]
path = {store:?}

[tenants.demo]
grant = "client_credentials"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"

[tenants.acme]
grant = "refresh_token"
client_id = "{ACME_CLIENT_ID}"
client_secret = "{ACME_CLIENT_SECRET}"
redirect_uri = "http://127.0.0.1:9090/oauth/callback"
refresh_token = "{seed}"
"#
        )
    }

    /// Says loudly that this is the sandbox, and prints the banner once the
    /// proxy's listeners are bound.
    pub(crate) fn announce(&self, listeners: &crate::Listeners) {
        let addr = |l: &TcpListener| l.local_addr().ok();
        tracing::warn!(
            sandbox = %self.addr(),
            "SANDBOX MODE (--dev): requests go to an embedded stand-in for Criteo with fake tokens and data, never to Criteo"
        );
        if let (Some(proxy), Some(admin)) = (addr(&listeners.proxy), addr(&listeners.admin)) {
            println!("{}", self.banner(proxy, admin));
        }
    }

    /// What `--dev` prints once it listens: where everything is, the
    /// sandbox's tenants and credentials, and what to try.
    pub(crate) fn banner(&self, proxy: SocketAddr, admin: SocketAddr) -> String {
        let sandbox = self.addr;
        let p = format!("http://{proxy}");
        let a = format!("http://{admin}");
        let mut out = format!(
            "\ncriteo-token-proxy sandbox (--dev): a stand-in for Criteo on {sandbox}; nothing reaches Criteo.\n\
             \n\
             \x20 proxy  {p}   (set with CRITEO_PROXY_SERVER__LISTEN)\n\
             \x20 admin  {a}   (set with CRITEO_PROXY_SERVER__ADMIN_LISTEN)\n\
             \n\
             Tenants (choose one with the X-Criteo-Tenant header, or with an SDK's client id):\n"
        );
        for app in &APPS {
            let kind = if app.tenant == "demo" {
                "client credentials, the default"
            } else {
                "refresh token, rotated at every renewal"
            };
            out.push_str(&format!(
                "  {:<5} {kind:<40} client_id {} / client_secret {}\n",
                app.tenant, app.client_id, app.client_secret
            ));
        }
        out.push_str(&format!(
            "\nTry:\n\
             \x20 curl -s {p}/2024-10/advertisers/me\n\
             \x20 curl -s -H 'X-Criteo-Tenant: acme' {p}/2027-01/retail-media/accounts\n\
             \x20 curl -s -X POST {p}/2027-01/statistics/report -d '{{\"dimensions\":[\"Day\"],\"metrics\":[\"Clicks\"],\"format\":\"csv\"}}'\n\
             \x20 curl -s {a}/tenants                        # each tenant's state and token expiry\n\
             \x20 curl -s -X POST {p}/sandbox/revoke-tokens  # then call again: 401, fresh token, replayed\n\
             \x20 curl -s -X POST {p}/sandbox/throttle       # the next call gets Criteo's 429\n\
             \x20 curl -s {p}/sandbox/seen                   # what the stand-in received\n\
             Criteo's SDKs: ApiClientBuilder.WithClientCredentials(\"demo\", \"any\", host=\"{p}\")\n\
             Tokens live {}s and are renewed in the background. Ctrl-C to stop.\n",
            TOKEN_LIFETIME.as_secs()
        ));
        out
    }
}

impl Stand {
    fn new() -> Self {
        Self {
            tokens: Mutex::new(tokens::Ledger::new("sandbox")),
            seen: Mutex::default(),
            throttled: AtomicU32::new(0),
            windows: Mutex::default(),
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let path = parts.uri.path();
        if path != "/sandbox/seen" {
            self.remember(&parts, &body);
        }
        match (&parts.method, path) {
            (&Method::POST, "/oauth2/token") => self.token(&parts.headers, &body),
            (&Method::POST, "/sandbox/revoke-tokens") => {
                let n = self.lock_tokens().revoke_access();
                tracing::info!(
                    revoked = n,
                    "sandbox: every access token revoked; the next call gets a 401"
                );
                json_response(StatusCode::OK, &json!({"revoked": n}))
            }
            (&Method::POST, "/sandbox/throttle") => {
                self.throttled.store(1, Ordering::Relaxed);
                json_response(StatusCode::OK, &json!({"throttled_calls": 1}))
            }
            (&Method::GET, "/sandbox/seen") => {
                let seen: Vec<Value> = self
                    .seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .cloned()
                    .collect();
                json_response(StatusCode::OK, &json!({"requests": seen}))
            }
            _ => self.api(&parts, &body),
        }
    }

    fn lock_tokens(&self) -> std::sync::MutexGuard<'_, tokens::Ledger> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every request, as it arrived: what `/sandbox/seen` shows.
    fn remember(&self, parts: &http::request::Parts, body: &[u8]) {
        let headers: serde_json::Map<String, Value> = parts
            .headers
            .iter()
            .map(|(k, v)| {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (k.as_str().to_owned(), Value::String(v))
            })
            .collect();
        let shown = &body[..body.len().min(4096)];
        let entry = json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "headers": headers,
            "body": String::from_utf8_lossy(shown),
        });
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() == SEEN_KEPT {
            seen.pop_front();
        }
        seen.push_back(entry);
    }
}

/// A private folder (mode 0700) for the sandbox's token store, removed
/// when the sandbox ends.
#[derive(Debug)]
struct StoreDir(PathBuf);

impl StoreDir {
    fn create() -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let name = format!(
            "criteo-token-proxy-dev-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let path = std::env::temp_dir().join(name);
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self(path))
    }

    #[cfg(test)]
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for StoreDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_folder_is_private_and_removed_at_the_end() {
        use std::os::unix::fs::PermissionsExt;
        let dir = StoreDir::create().unwrap();
        let path = dir.path().to_owned();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(path.join("tokens.json"), "{}").unwrap();
        drop(dir);
        assert!(!path.exists());
    }
}
