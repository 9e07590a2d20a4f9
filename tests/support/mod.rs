//! Shared test support: the Criteo stand-in and a harness that runs the
//! real server in-process on `127.0.0.1:0`.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different part

pub mod fake_criteo;
pub mod postgres;
pub mod process;
pub mod raw;
pub mod stored;

use std::sync::Arc;
use std::time::Duration;

use criteo_token_proxy::{App, Config, Listeners, Tenants};
pub use fake_criteo::FakeCriteo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The server under test, with the addresses it listens on.
#[derive(Debug)]
pub struct TestProxy {
    pub url: String,
    pub admin: String,
    tenants: Arc<Tenants>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Config sections, written as TOML lines, with the stand-in's URLs
/// filled in and a client-credentials tenant `main` as the default.
#[derive(Debug)]
pub struct ProxyBuilder {
    upstream_url: String,
    token_url: String,
    server: Vec<String>,
    upstream: Vec<String>,
    refresh: Vec<String>,
    tenants: Vec<String>,
    sections: Vec<String>,
    with_main: bool,
    /// The stand-in issues tokens shorter than the proxy's default floor.
    short_tokens: bool,
}

impl TestProxy {
    pub fn builder(fake: &FakeCriteo) -> ProxyBuilder {
        ProxyBuilder {
            upstream_url: fake.url(),
            token_url: fake.token_url(),
            server: Vec::new(),
            upstream: Vec::new(),
            refresh: Vec::new(),
            tenants: Vec::new(),
            sections: Vec::new(),
            with_main: true,
            short_tokens: short_tokens(fake),
        }
    }

    /// The default proxy for `fake`, ready (its token obtained).
    pub async fn ready(fake: &FakeCriteo) -> Self {
        let p = Self::builder(fake).start().await;
        p.wait_ready().await;
        p
    }

    /// Waits until every tenant holds a usable token.
    pub async fn wait_ready(&self) {
        for t in self.tenants.iter() {
            let mut attempts = t.tokens.attempts();
            let wait = async {
                while t.tokens.usable().is_none() {
                    attempts.changed().await.unwrap();
                }
            };
            tokio::time::timeout(Duration::from_secs(10), wait)
                .await
                .unwrap_or_else(|_| panic!("tenant {} never got a token", t.name));
        }
    }

    pub fn tenants(&self) -> &Arc<Tenants> {
        &self.tenants
    }

    /// Triggers shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("server stops within 30s")
                .unwrap();
        }
    }

    /// `GET` on the proxy listener: the request most tests send.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        client()
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
    }

    /// `GET` on the proxy listener for `tenant` (by the tenant header).
    pub async fn get_as(&self, tenant: &str, path: &str) -> reqwest::Response {
        client()
            .get(format!("{}{path}", self.url))
            .header("X-Criteo-Tenant", tenant)
            .send()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        client()
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl ProxyBuilder {
    pub fn server(mut self, line: &str) -> Self {
        self.server.push(line.into());
        self
    }

    pub fn upstream(mut self, line: &str) -> Self {
        self.upstream.push(line.into());
        self
    }

    pub fn upstream_url(mut self, url: &str) -> Self {
        self.upstream_url = url.into();
        self
    }

    pub fn refresh(mut self, line: &str) -> Self {
        self.refresh.push(line.into());
        self
    }

    /// Adds `[tenants.NAME]` with the given body lines.
    pub fn tenant(mut self, name: &str, body: &str) -> Self {
        self.tenants.push(format!("[tenants.{name}]\n{body}"));
        self
    }

    /// Adds a whole section, e.g. `"[store]\npath = \"…\""`.
    pub fn section(mut self, text: &str) -> Self {
        self.sections.push(text.into());
        self
    }

    /// Leaves out the default `main` tenant.
    pub fn without_main(mut self) -> Self {
        self.with_main = false;
        self
    }

    pub fn toml(&self) -> String {
        let mut out =
            String::from("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n");
        if self.with_main {
            out.push_str("default_tenant = \"main\"\n");
        }
        for l in &self.server {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str(&format!(
            "[upstream]\nurl = \"{}\"\ntoken_url = \"{}\"\nconsent_url = \"{}\"\n",
            self.upstream_url,
            self.token_url,
            self.token_url.replace("/oauth2/token", "/request")
        ));
        for l in &self.upstream {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str("[refresh]\n");
        if self.short_tokens
            && !self
                .refresh
                .iter()
                .any(|l| l.contains("min_token_lifetime"))
        {
            out.push_str(SHORT_TOKENS);
        }
        for l in &self.refresh {
            out.push_str(l);
            out.push('\n');
        }
        if self.with_main {
            out.push_str(
                "[tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret = \"main-secret\"\n",
            );
        }
        for t in self.tenants.iter().chain(&self.sections) {
            out.push_str(t);
            out.push('\n');
        }
        out
    }

    pub async fn start(self) -> TestProxy {
        init_logs();
        let listeners = Listeners {
            proxy: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let url = format!("http://{}", listeners.proxy.local_addr().unwrap());
        let admin = format!("http://{}", listeners.admin.local_addr().unwrap());
        // `{admin}` in a config line stands for the admin listener's URL.
        let text = self.toml().replace("{admin}", &admin);
        let config = Config::from_toml(&text)
            .unwrap_or_else(|e| panic!("test config is valid: {e}\n{text}"));
        let app = App::new(config).unwrap();
        let tenants = app.tenants();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let stopped = async move {
                let _ = rx.await;
            };
            app.run(listeners, stopped)
                .await
                .expect("the server starts");
        });
        TestProxy {
            url,
            admin,
            tenants,
            stop: Some(tx),
            task: Some(task),
        }
    }
}

/// Tests of renewals use a stand-in with tokens of a second or two; the
/// proxy raises any lifetime under `refresh.min_token_lifetime` (10 s by
/// default) to it, so those tests lower it.
pub const SHORT_TOKENS: &str = "min_token_lifetime = \"1s\"\n";

/// True when `fake` issues tokens shorter than the proxy's default floor
/// (but not the 0 s that tests of that floor use).
pub fn short_tokens(fake: &FakeCriteo) -> bool {
    let life = fake.expires_in();
    !life.is_zero() && life < Duration::from_secs(10)
}

/// A client that talks to loopback directly, whatever the environment says.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// `TEST_LOG=1 cargo test` shows the server's logs.
fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug,hyper=info,h2=info")
            .with_test_writer()
            .try_init();
    }
}
