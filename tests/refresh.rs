//! Refresh-token tenants: rotation, the token store, revoked consent and
//! onboarding, against a stand-in whose refresh tokens are single-use.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criteo_token_proxy::consent;
use serde_json::Value;
use support::{FakeCriteo, ProxyBuilder, TestProxy, client};

const ACME_ID: &str = "acme-id";
const ACME_SECRET: &str = "acme-secret";

async fn fake() -> FakeCriteo {
    FakeCriteo::builder()
        .client(ACME_ID, ACME_SECRET)
        .start()
        .await
}

fn store_path(dir: &Path) -> PathBuf {
    dir.join("tokens.json")
}

/// A proxy whose default tenant is the refresh-token tenant `acme`.
fn acme(fake: &FakeCriteo, dir: &Path, seed: Option<&str>) -> ProxyBuilder {
    let mut body = format!(
        "grant = \"refresh_token\"\nclient_id = \"{ACME_ID}\"\nclient_secret = \"{ACME_SECRET}\"\n\
         redirect_uri = \"{{admin}}/oauth/callback\"\n"
    );
    if let Some(seed) = seed {
        body.push_str(&format!("refresh_token = \"{seed}\"\n"));
    }
    TestProxy::builder(fake)
        .without_main()
        .server("default_tenant = \"acme\"")
        .tenant("acme", &body)
        .section(&format!(
            "[store]\npath = \"{}\"",
            store_path(dir).display()
        ))
}

fn stored_token(dir: &Path) -> String {
    support::stored::stored_token(&store_path(dir), "acme")
}

async fn get(url: &str) -> reqwest::Response {
    client().get(url).send().await.unwrap()
}

async fn tenant_state(proxy: &TestProxy, name: &str) -> Value {
    let all: Value = get(&format!("{}/tenants", proxy.admin))
        .await
        .json()
        .await
        .unwrap();
    all["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn every_renewal_rotates_and_saves_the_refresh_token_and_none_is_presented_twice() {
    let fake = FakeCriteo::builder()
        .client(ACME_ID, ACME_SECRET)
        .expires_in(Duration::from_secs(1))
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, dir.path(), Some(&seed)).start().await;
    proxy.wait_ready().await;

    // Requests under load while the token rotates five times.
    let mut load = Vec::new();
    for _ in 0..8 {
        let url = format!("{}/2024-10/advertisers/me", proxy.url);
        load.push(tokio::spawn(async move {
            let c = client();
            let mut statuses = Vec::new();
            for _ in 0..60 {
                statuses.push(c.get(&url).send().await.unwrap().status().as_u16());
                tokio::time::sleep(Duration::from_millis(40)).await; // pacing
            }
            statuses
        }));
    }
    fake.wait_token_requests(6, Duration::from_secs(20)).await;
    for l in load {
        let statuses = l.await.unwrap();
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    }

    proxy.stop().await; // no rotation between the two reads below
    assert_eq!(
        fake.spent_presented(),
        0,
        "a spent refresh token was presented"
    );
    let presented = fake.refresh_presented();
    let unique: std::collections::HashSet<_> = presented.iter().collect();
    assert_eq!(
        unique.len(),
        presented.len(),
        "each refresh token used once"
    );
    assert_eq!(presented[0], seed);
    assert_eq!(
        Some(stored_token(dir.path())),
        fake.newest_refresh_token(ACME_ID),
        "the store holds the newest refresh token"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(store_path(dir.path()))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the store is private");
    assert_eq!(fake.expired_presented(), 0);
}

#[tokio::test]
async fn the_store_wins_over_the_seed() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let in_store = fake.issue_refresh_token(ACME_ID);
    let seed = fake.issue_refresh_token(ACME_ID);
    std::fs::write(
        store_path(dir.path()),
        serde_json::json!({"version": 1, "tenants": {"acme": {
            "refresh_token": in_store, "rejected": false, "updated_at": "2026-11-25T00:00:00Z"}}})
        .to_string(),
    )
    .unwrap();
    let proxy = acme(&fake, dir.path(), Some(&seed)).start().await;
    proxy.wait_ready().await;
    assert_eq!(fake.refresh_presented(), vec![in_store]);
    assert_eq!(get(&format!("{}/x", proxy.url)).await.status(), 200);
}

#[tokio::test]
async fn a_refused_stored_token_falls_back_to_a_different_seed_once() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let seed = fake.issue_refresh_token(ACME_ID);
    std::fs::write(
        store_path(dir.path()),
        r#"{"version":1,"tenants":{"acme":{"refresh_token":"long-dead","rejected":false,"updated_at":""}}}"#,
    )
    .unwrap();
    let proxy = acme(&fake, dir.path(), Some(&seed)).start().await;
    proxy.wait_ready().await;
    assert_eq!(fake.refresh_presented(), vec!["long-dead".to_owned(), seed]);
    assert_eq!(
        Some(stored_token(dir.path())),
        fake.newest_refresh_token(ACME_ID)
    );
}

#[tokio::test]
async fn a_refused_seed_is_not_presented_again_after_a_restart() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = acme(&fake, dir.path(), Some("dead-seed")).start().await;
    fake.wait_token_requests(1, Duration::from_secs(5)).await;
    let resp = get(&format!("{}/x", proxy.url)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-criteo-proxy-error"], "consent_required");
    proxy.stop().await;
    assert_eq!(
        support::stored::stored(&store_path(dir.path()), "acme").map(|s| s.1),
        Some(true)
    );

    let proxy = acme(&fake, dir.path(), Some("dead-seed")).start().await;
    let resp = get(&format!("{}/x", proxy.url)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-criteo-proxy-error"], "consent_required");
    assert_eq!(
        fake.token_requests(),
        1,
        "the refused seed is not presented again"
    );
}

#[tokio::test]
async fn revoked_consent_means_consent_required_for_that_tenant_only() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, dir.path(), Some(&seed))
        .tenant(
            "main",
            "grant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret = \"main-secret\"",
        )
        .start()
        .await;
    proxy.wait_ready().await;

    // The consenting user left: refresh tokens and access tokens die.
    fake.revoke_refresh_tokens(ACME_ID);
    fake.revoke_all_tokens();
    let resp = get(&format!("{}/2024-10/advertisers/me", proxy.url)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-criteo-proxy-error"], "consent_required");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "consent_required");
    assert_eq!(body["tenant"], "acme");
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains("/oauth/authorize?tenant=acme"),
        "says how to consent: {msg}"
    );

    let calls = fake.token_requests();
    for _ in 0..10 {
        let resp = get(&format!("{}/x", proxy.url)).await;
        assert_eq!(resp.headers()["x-criteo-proxy-error"], "consent_required");
    }
    assert_eq!(
        fake.token_requests(),
        calls,
        "the token endpoint is left alone"
    );

    let ready = get(&format!("{}/readyz", proxy.admin)).await;
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["tenants"][0]["tenant"], "acme");
    assert_eq!(ready["tenants"][0]["state"], "consent_required");
    assert_eq!(
        tenant_state(&proxy, "acme").await["state"],
        "consent_required"
    );
    assert!(
        proxy
            .metrics()
            .await
            .contains("criteo_proxy_consent_required_total{tenant=\"acme\"} 1")
    );

    // The client-credentials tenant is unaffected (its 401 is replayed).
    let resp = client()
        .get(format!("{}/x", proxy.url))
        .header("x-criteo-tenant", "main")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn concurrent_401s_during_a_rotation_cause_one_refresh() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, dir.path(), Some(&seed)).start().await;
    proxy.wait_ready().await;
    fake.revoke_all_tokens();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let url = format!("{}/x?i={i}", proxy.url);
        tasks.push(tokio::spawn(async move {
            client().get(url).send().await.unwrap().status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(fake.token_requests(), 2, "one start, one refresh");
    assert_eq!(fake.spent_presented(), 0);
}

#[tokio::test]
async fn onboards_a_tenant_with_no_refresh_token_without_a_restart() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = acme(&fake, dir.path(), None).start().await;

    let resp = get(&format!("{}/x", proxy.url)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-criteo-proxy-error"], "consent_required");
    assert_eq!(fake.token_requests(), 0, "nothing to present, nothing sent");

    // The redirect to the consent page.
    let no_redirects = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = no_redirects
        .get(format!("{}/oauth/authorize?tenant=acme", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    let location = url::Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
    assert_eq!(location.path(), "/request");
    let q: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], ACME_ID);
    assert_eq!(q["redirect_uri"], format!("{}/oauth/callback", proxy.admin));
    assert!(q["state"].len() >= 32, "a long random state");

    // A person consents: authorize → consent page → callback.
    let page = client()
        .get(format!("{}/oauth/authorize?tenant=acme", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("connected"));

    let resp = get(&format!("{}/2024-10/advertisers/me", proxy.url)).await;
    assert_eq!(resp.status(), 200, "the tenant serves at once");
    assert_eq!(tenant_state(&proxy, "acme").await["state"], "ready");
    assert_eq!(get(&format!("{}/readyz", proxy.admin)).await.status(), 200);
    assert_eq!(
        Some(stored_token(dir.path())),
        fake.newest_refresh_token(ACME_ID),
        "the first refresh token is saved"
    );
    let form = fake.token_forms().pop().unwrap();
    assert_eq!(form["grant_type"], "authorization_code");
    assert_eq!(
        form["redirect_uri"],
        format!("{}/oauth/callback", proxy.admin)
    );
}

#[tokio::test]
async fn forged_reused_and_expired_states_get_a_400_and_no_code_exchange() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = acme(&fake, dir.path(), None).start().await;
    let callback = format!("{}/oauth/callback", proxy.admin);
    let redirect_uri = callback.clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();

    let forged = [
        "garbage".to_owned(),
        consent::issue_state(b"not-the-key", "acme", now, consent::STATE_TTL),
    ];
    for state in forged {
        let code = fake.issue_code(ACME_ID, &redirect_uri);
        let resp = client()
            .get(&callback)
            .query(&[("code", code.as_str()), ("state", state.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "forged state {state}");
    }

    let expired = consent::issue_state(
        ACME_SECRET.as_bytes(),
        "acme",
        now - 601,
        consent::STATE_TTL,
    );
    let code = fake.issue_code(ACME_ID, &redirect_uri);
    let resp = client()
        .get(&callback)
        .query(&[("code", code.as_str()), ("state", expired.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("expired"));
    assert_eq!(fake.token_requests(), 0, "no code was exchanged");

    // A genuine state works once, then never again.
    let good = consent::issue_state(ACME_SECRET.as_bytes(), "acme", now, consent::STATE_TTL);
    let code = fake.issue_code(ACME_ID, &redirect_uri);
    let url = format!("{callback}?code={code}&state={good}");
    assert_eq!(get(&url).await.status(), 200);
    let again = get(&url).await;
    assert_eq!(again.status(), 400);
    assert!(again.text().await.unwrap().contains("already used"));
    assert_eq!(fake.token_requests(), 1, "one exchange in all");
}

#[tokio::test]
async fn a_denied_consent_is_a_clear_page_and_changes_nothing() {
    let fake = fake().await;
    fake.set_consent_denied(true);
    let dir = tempfile::tempdir().unwrap();
    let proxy = acme(&fake, dir.path(), None).start().await;
    let page = get(&format!("{}/oauth/authorize?tenant=acme", proxy.admin)).await;
    assert_eq!(page.status(), 400);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let text = page.text().await.unwrap();
    assert!(
        text.contains("access_denied") && text.contains("acme"),
        "{text}"
    );
    assert_eq!(fake.token_requests(), 0);
    assert_eq!(
        tenant_state(&proxy, "acme").await["state"],
        "consent_required"
    );
}

#[tokio::test]
async fn authorize_refuses_unknown_and_client_credentials_tenants() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = acme(&fake, dir.path(), None)
        .tenant(
            "main",
            "grant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret = \"main-secret\"",
        )
        .start()
        .await;
    for tenant in ["nobody", "main"] {
        let resp = get(&format!("{}/oauth/authorize?tenant={tenant}", proxy.admin)).await;
        assert_eq!(resp.status(), 400, "{tenant}");
    }
    assert_eq!(
        get(&format!("{}/oauth/authorize", proxy.admin))
            .await
            .status(),
        400
    );
}

/// Computed independently with Python's `hmac` module (see
/// `src/oauth/consent.rs`).
const CALLBACK_BODY: &str =
    r#"{"Type":"ConsentGranted","State":"user-42","AcceptedScopes":["Advertisers/1234"]}"#;
const CALLBACK_SIGNATURE: &str = "6518a0b15165fd47156e0e6fcad40f0d4389a314beb5495f70e7c4252524e33cbe6cbed1d3490924e88f9cb22fcfda8bb47a3d4c415c37320d631d609181e6d2";

#[tokio::test]
async fn consent_callbacks_are_accepted_only_with_a_valid_signature() {
    let fake = FakeCriteo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("signing_secret");
    std::fs::write(&secret, "signing-secret-xyz\n").unwrap();
    let proxy = TestProxy::builder(&fake)
        .section(&format!(
            "[consent]\nsigning_key = \"pub-key-123\"\nsigning_secret_file = \"{}\"",
            secret.display()
        ))
        .start()
        .await;
    let url = format!("{}/consent/callback", proxy.admin);
    let post = |sig: Option<&'static str>, body: &'static str| {
        let mut req = client().post(&url).body(body);
        if let Some(sig) = sig {
            req = req.header("x-criteo-hmac-sha512", sig);
        }
        req.send()
    };
    assert_eq!(
        post(Some(CALLBACK_SIGNATURE), CALLBACK_BODY)
            .await
            .unwrap()
            .status(),
        200
    );
    let tampered =
        r#"{"Type":"ConsentGranted","State":"user-43","AcceptedScopes":["Advertisers/1234"]}"#;
    assert_eq!(
        post(Some(CALLBACK_SIGNATURE), tampered)
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(post(None, CALLBACK_BODY).await.unwrap().status(), 401);
    assert_eq!(
        post(Some("00ff"), CALLBACK_BODY).await.unwrap().status(),
        401
    );
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("criteo_proxy_consent_callbacks_total{type=\"ConsentGranted\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_rotated_token_that_cannot_be_saved_is_kept_and_saved_before_the_next_rotation() {
    let fake = FakeCriteo::builder()
        .client(ACME_ID, ACME_SECRET)
        .expires_in(Duration::from_secs(2))
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("store");
    std::fs::create_dir(&folder).unwrap();
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, &folder, Some(&seed)).start().await;
    proxy.wait_ready().await;

    // The store's folder becomes unwritable (here: replaced by a file).
    let aside = dir.path().join("store.aside");
    std::fs::rename(&folder, &aside).unwrap();
    std::fs::write(&folder, "not a folder").unwrap();
    fake.wait_token_requests(2, Duration::from_secs(10)).await; // a rotation happens
    let tenant = Arc::clone(proxy.tenants().get("acme").unwrap());
    let mut attempts = tenant.tokens.attempts();
    let save_failed = async {
        loop {
            let health = tenant.tokens.health();
            if health
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("cannot save"))
            {
                return health;
            }
            attempts.changed().await.unwrap();
        }
    };
    let health = tokio::time::timeout(Duration::from_secs(10), save_failed)
        .await
        .unwrap();
    assert_eq!(health.state.as_str(), "failing");
    assert_eq!(tenant_state(&proxy, "acme").await["state"], "failing");
    let requests_while_broken = fake.token_requests();
    // Still broken: the next attempts retry the save, and never present
    // the rotated token, which is only in memory (a crash now would leave
    // the store with the spent one).
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(10), attempts.changed())
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        fake.token_requests(),
        requests_while_broken,
        "nothing is rotated while the store cannot be written"
    );

    // Repaired: the token kept in memory is saved first, then used.
    std::fs::remove_file(&folder).unwrap();
    std::fs::rename(&aside, &folder).unwrap();
    fake.wait_token_requests(requests_while_broken + 1, Duration::from_secs(10))
        .await;
    proxy.stop().await;
    assert_eq!(
        fake.spent_presented(),
        0,
        "the unsaved token was never lost"
    );
    assert_eq!(
        Some(stored_token(&folder)),
        fake.newest_refresh_token(ACME_ID),
        "the store caught up with the newest refresh token"
    );
}
