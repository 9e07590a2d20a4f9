//! Onboarding is not open to the cluster: `/oauth/authorize` answers a
//! loopback client, or only the admin token when one is set; the callbacks
//! stay open but exchange codes at a bounded rate per tenant.
//!
//! Only loopback addresses exist here, so the rule for other peers is
//! tested on its decision function (`src/admin/access.rs`); these tests
//! run the whole server on 127.0.0.1.

mod support;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criteo_token_proxy::State;
use criteo_token_proxy::consent;
use serde_json::Value;
use support::{FakeCriteo, ProxyBuilder, TestProxy, client};

const ACME_ID: &str = "acme-id";
const ACME_SECRET: &str = "acme-secret";
const ADMIN_TOKEN: &str = "admin-token-5f1c0d2e9a7b";

async fn fake() -> FakeCriteo {
    FakeCriteo::builder()
        .client(ACME_ID, ACME_SECRET)
        .start()
        .await
}

/// A proxy with the refresh-token tenant `acme`, no refresh token yet.
fn acme(fake: &FakeCriteo, dir: &Path) -> ProxyBuilder {
    TestProxy::builder(fake)
        .without_main()
        .server("default_tenant = \"acme\"")
        .tenant(
            "acme",
            &format!(
                "grant = \"refresh_token\"\nclient_id = \"{ACME_ID}\"\nclient_secret = \"{ACME_SECRET}\"\n\
                 redirect_uri = \"{{admin}}/oauth/callback\"\n"
            ),
        )
        .section(&format!(
            "[store]\npath = \"{}\"",
            dir.join("tokens.json").display()
        ))
}

/// A client that shows redirects instead of following them.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn authorize(proxy: &TestProxy, bearer: Option<&str>) -> reqwest::Response {
    let mut req = no_redirects().get(format!("{}/oauth/authorize?tenant=acme", proxy.admin));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    req.send().await.unwrap()
}

async fn assert_forbidden(resp: reqwest::Response) {
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "admin_forbidden", "{body}");
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Waits until the refresher has found that `acme` has nothing to present,
/// so that its first attempt does not race the exchanges under test.
async fn wait_consent_required(proxy: &TestProxy) {
    let t = proxy.tenants().get("acme").unwrap();
    let mut attempts = t.tokens.attempts();
    let wait = async {
        while t.tokens.health().state != State::ConsentRequired {
            attempts.changed().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("acme is consent_required");
}

/// Code exchanges so far (renewals left out).
fn exchanges(fake: &FakeCriteo) -> usize {
    fake.token_forms()
        .iter()
        .filter(|f| f["grant_type"] == "authorization_code")
        .count()
}

/// The URL Criteo would send the person back to: a fresh genuine state and
/// a fresh code.
fn callback_url(fake: &FakeCriteo, proxy: &TestProxy) -> String {
    let callback = format!("{}/oauth/callback", proxy.admin);
    let state = consent::issue_state(ACME_SECRET.as_bytes(), "acme", now(), consent::STATE_TTL);
    let code = fake.issue_code(ACME_ID, &callback);
    format!("{callback}?code={code}&state={state}")
}

#[tokio::test]
async fn without_an_admin_token_authorize_answers_a_loopback_client() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = acme(&fake, dir.path()).start().await;
    let resp = authorize(&proxy, None).await;
    assert_eq!(resp.status(), 302);
    assert!(
        resp.headers()["location"]
            .to_str()
            .unwrap()
            .contains("state=")
    );
}

#[tokio::test]
async fn with_an_admin_token_authorize_needs_it_even_on_loopback() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = acme(&fake, dir.path())
        .server(&format!("admin_token = \"{ADMIN_TOKEN}\""))
        .start()
        .await;
    assert_forbidden(authorize(&proxy, None).await).await;
    assert_forbidden(authorize(&proxy, Some("not-the-admin-token")).await).await;
    let resp = authorize(&proxy, Some(ADMIN_TOKEN)).await;
    assert_eq!(resp.status(), 302);
    assert!(
        resp.headers()["location"]
            .to_str()
            .unwrap()
            .contains("state=")
    );

    // What only reads stays open to the probes and Prometheus.
    for path in ["/healthz", "/tenants", "/metrics"] {
        let resp = client()
            .get(format!("{}{path}", proxy.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    assert_eq!(fake.token_requests(), 0);
}

#[tokio::test]
async fn the_admin_token_file_is_read_again_at_each_request() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin_token");
    std::fs::write(&file, "first-admin-token-value\n").unwrap();
    let proxy = acme(&fake, dir.path())
        .server(&format!("admin_token_file = \"{}\"", file.display()))
        .start()
        .await;
    assert_eq!(
        authorize(&proxy, Some("first-admin-token-value"))
            .await
            .status(),
        302
    );
    std::fs::write(&file, "second-admin-token-value\n").unwrap();
    assert_forbidden(authorize(&proxy, Some("first-admin-token-value")).await).await;
    assert_eq!(
        authorize(&proxy, Some("second-admin-token-value"))
            .await
            .status(),
        302
    );
}

#[tokio::test]
async fn callbacks_stay_open_when_an_admin_token_is_set() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = acme(&fake, dir.path())
        .server(&format!("admin_token = \"{ADMIN_TOKEN}\""))
        .start()
        .await;
    let resp = client()
        .get(callback_url(&fake, &proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let resp = proxy.get("/2024-10/advertisers/me").await;
    assert_eq!(resp.status(), 200, "the tenant serves at once");
}

#[tokio::test]
async fn code_exchanges_are_one_at_a_time_and_a_few_a_minute_per_tenant() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = acme(&fake, dir.path()).start().await;
    wait_consent_required(&proxy).await;

    // One in flight: a second callback while the token endpoint is slow
    // (the delay is the stimulus; its arrival is awaited) is refused.
    fake.set_token_delay(Duration::from_millis(1500));
    let first = tokio::spawn(client().get(callback_url(&fake, &proxy)).send());
    fake.wait_token_requests(1, Duration::from_secs(10)).await;
    let second = client()
        .get(callback_url(&fake, &proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 429);
    assert!(second.headers().contains_key("retry-after"));
    assert!(
        second
            .text()
            .await
            .unwrap()
            .contains("No code was exchanged")
    );
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(
        exchanges(&fake),
        1,
        "the refused callback exchanged nothing"
    );

    // A few a minute: four more succeed, the next is refused.
    fake.set_token_delay(Duration::ZERO);
    for _ in 0..4 {
        let resp = client()
            .get(callback_url(&fake, &proxy))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let over = client()
        .get(callback_url(&fake, &proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(over.status(), 429);
    let wait: u64 = over.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(exchanges(&fake), 5, "nothing exchanged past the bound");
}
