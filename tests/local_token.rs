//! The proxy's own token endpoint: Criteo's SDKs fetch a token from
//! `{host}/oauth2/token` before any call; the proxy answers that itself with
//! a placeholder naming a tenant, never forwards it, and routes requests
//! carrying the placeholder to that tenant.

mod support;

use serde_json::Value;
use support::{FakeCriteo, TestProxy, client};

const ACME: &str =
    "grant = \"client_credentials\"\nclient_id = \"acme-id\"\nclient_secret = \"acme-secret\"";

async fn fake_with_acme() -> FakeCriteo {
    FakeCriteo::builder()
        .client("acme-id", "acme-secret")
        .start()
        .await
}

async fn with_acme(fake: &FakeCriteo) -> TestProxy {
    let proxy = TestProxy::builder(fake).tenant("acme", ACME).start().await;
    proxy.wait_ready().await;
    proxy
}

/// `POST /oauth2/token` with `form` as the body, as the SDKs send it.
async fn token_request(proxy: &TestProxy, form: &str) -> reqwest::Response {
    client()
        .post(format!("{}/oauth2/token", proxy.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept", "application/json")
        .body(form.to_owned())
        .send()
        .await
        .unwrap()
}

/// The placeholder the proxy hands out for `form`.
async fn placeholder_for(proxy: &TestProxy, form: &str) -> String {
    let resp = token_request(proxy, form).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// The `Authorization` the stand-in received for a request.
async fn authorization_seen(resp: reqwest::Response) -> String {
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    echo["headers"]["authorization"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The header the proxy injects for `tenant` right now.
fn token_of(proxy: &TestProxy, tenant: &str) -> String {
    let t = proxy.tenants().get(tenant).unwrap();
    let token = t.tokens.usable().unwrap();
    token.header().to_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_token_endpoint_is_answered_by_the_proxy_and_never_forwarded() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    let before = fake.token_requests();
    for form in [
        "grant_type=client_credentials&client_id=dummy&client_secret=dummy",
        "grant_type=refresh_token&client_id=dummy&client_secret=dummy&refresh_token=whatever",
        "grant_type=authorization_code&code=c&redirect_uri=https%3A%2F%2Fx&client_id=x&client_secret=y",
        "",
        "\u{0}not a form at all",
    ] {
        let resp = token_request(&proxy, form).await;
        assert_eq!(resp.status(), 200, "{form:?}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert_eq!(resp.headers()["cache-control"], "no-store");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["access_token"], "criteo-token-proxy.main", "{body}");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 900);
        assert_eq!(
            body["refresh_token"], body["access_token"],
            "the SDKs read refresh_token from every answer"
        );
    }
    assert_eq!(fake.token_requests(), before, "no token request upstream");
    assert!(fake.seen().is_empty(), "nothing reached the API");
}

#[tokio::test]
async fn twenty_token_requests_with_bad_credentials_cost_the_tenant_nothing() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    let before = fake.token_requests();
    let generation = proxy
        .tenants()
        .get("main")
        .unwrap()
        .tokens
        .usable()
        .unwrap()
        .generation();
    for i in 0..20 {
        let form = format!("grant_type=client_credentials&client_id=bad-{i}&client_secret=bad");
        assert_eq!(token_request(&proxy, &form).await.status(), 200);
    }
    assert_eq!(
        fake.token_requests(),
        before,
        "zero token requests upstream"
    );
    let main = proxy.tenants().get("main").unwrap();
    assert_eq!(
        main.tokens.usable().unwrap().generation(),
        generation,
        "the tenant's token was neither retired nor renewed"
    );
    assert!(fake.seen().is_empty());
    let metrics = proxy.metrics().await;
    assert!(
        !metrics.contains("criteo_proxy_upstream_retries_total{tenant=\"main\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_placeholder_goes_to_the_tenant_its_client_id_names() {
    let fake = fake_with_acme().await;
    let proxy = with_acme(&fake).await;
    let by_client_id = placeholder_for(
        &proxy,
        "grant_type=client_credentials&client_id=acme-id&client_secret=anything",
    )
    .await;
    assert_eq!(by_client_id, "criteo-token-proxy.acme");
    let by_name = placeholder_for(
        &proxy,
        "grant_type=client_credentials&client_id=acme&client_secret=anything",
    )
    .await;
    assert_eq!(by_name, "criteo-token-proxy.acme");
    let by_default = placeholder_for(
        &proxy,
        "grant_type=client_credentials&client_id=someone-else&client_secret=x",
    )
    .await;
    assert_eq!(by_default, "criteo-token-proxy.main");

    let seen = authorization_seen(
        client()
            .get(format!("{}/2024-10/advertisers/me", proxy.url))
            .bearer_auth(&by_client_id)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(seen, token_of(&proxy, "acme"), "acme's own token was sent");
    let seen = authorization_seen(
        client()
            .get(format!("{}/2024-10/advertisers/me", proxy.url))
            .bearer_auth(&by_default)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(seen, token_of(&proxy, "main"));
    for s in fake.seen() {
        let auth = &s.headers["authorization"];
        assert!(!auth.contains("criteo-token-proxy"), "{auth}");
    }
}

#[tokio::test]
async fn an_explicit_tenant_header_wins_over_a_placeholder() {
    let fake = fake_with_acme().await;
    let proxy = with_acme(&fake).await;
    let seen = authorization_seen(
        client()
            .get(format!("{}/x", proxy.url))
            .bearer_auth("criteo-token-proxy.acme")
            .header("X-Criteo-Tenant", "main")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(seen, token_of(&proxy, "main"));
    // The same holds for the token endpoint itself.
    let resp = client()
        .post(format!("{}/oauth2/token", proxy.url))
        .header("X-Criteo-Tenant", "main")
        .body("grant_type=client_credentials&client_id=acme-id&client_secret=x")
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["access_token"], "criteo-token-proxy.main");
}

#[tokio::test]
async fn an_unknown_client_id_without_a_default_tenant_is_refused() {
    let fake = fake_with_acme().await;
    let proxy = TestProxy::builder(&fake)
        .without_main()
        .tenant("acme", ACME)
        .start()
        .await;
    proxy.wait_ready().await;
    let before = fake.token_requests();
    let resp = token_request(
        &proxy,
        "grant_type=client_credentials&client_id=nobody&client_secret=x",
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["x-criteo-proxy-error"], "unknown_tenant");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "unknown_tenant");
    assert!(
        body["message"].as_str().unwrap().contains("nobody"),
        "{body}"
    );
    // The tenant's client id still works.
    let ok = placeholder_for(
        &proxy,
        "grant_type=client_credentials&client_id=acme-id&client_secret=x",
    )
    .await;
    assert_eq!(ok, "criteo-token-proxy.acme");
    assert_eq!(fake.token_requests(), before);
    assert!(fake.seen().is_empty());
}

#[tokio::test]
async fn a_client_id_shared_by_several_tenants_needs_a_tenant_name() {
    let fake = fake_with_acme().await;
    let proxy = TestProxy::builder(&fake)
        .without_main()
        .tenant("acme", ACME)
        .tenant("acme_too", ACME)
        .start()
        .await;
    proxy.wait_ready().await;
    let resp = token_request(&proxy, "client_id=acme-id&client_secret=x").await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("acme, acme_too"), "{message}");
    let ok = placeholder_for(&proxy, "client_id=acme_too&client_secret=x").await;
    assert_eq!(ok, "criteo-token-proxy.acme_too");
}

#[tokio::test]
async fn a_placeholder_for_an_unknown_tenant_is_refused() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    let resp = client()
        .get(format!("{}/2024-10/advertisers/me", proxy.url))
        .bearer_auth("criteo-token-proxy.nobody")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["x-criteo-proxy-error"], "unknown_tenant");
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("placeholder"),
        "{body}"
    );
    assert!(fake.seen().is_empty());
    // Any other bearer token is ignored, as before: the default tenant.
    let seen = authorization_seen(
        client()
            .get(format!("{}/x", proxy.url))
            .bearer_auth("some-real-looking-token")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(seen, token_of(&proxy, "main"));
}

#[tokio::test]
async fn other_methods_on_the_token_endpoint_get_405() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    let before = fake.token_requests();
    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let resp = client()
            .request(method.clone(), format!("{}/oauth2/token", proxy.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{method}");
        assert_eq!(resp.headers()["allow"], "POST");
        assert_eq!(resp.headers()["x-criteo-proxy-error"], "method_not_allowed");
    }
    assert_eq!(fake.token_requests(), before);
    assert!(fake.seen().is_empty());
}

#[tokio::test]
async fn no_spelling_of_an_oauth_path_reaches_criteo() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    let before = fake.token_requests();
    let generation = proxy
        .tenants()
        .get("main")
        .unwrap()
        .tokens
        .usable()
        .unwrap()
        .generation();
    for path in [
        "/OAuth2/Token",
        "/oauth2/token/",
        "/oauth2//token",
        "/%6Fauth2/token",
    ] {
        let resp = client()
            .post(format!("{}{path}", proxy.url))
            .body("grant_type=client_credentials&client_id=bad&client_secret=bad")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path} is the token endpoint");
    }
    let resp = client()
        .post(format!("{}/oauth2/revoke", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-criteo-proxy-error"], "not_forwarded");
    assert_eq!(fake.token_requests(), before);
    assert!(fake.seen().is_empty());
    let main = proxy.tenants().get("main").unwrap();
    assert_eq!(main.tokens.usable().unwrap().generation(), generation);
}

#[tokio::test]
async fn a_huge_token_request_body_is_refused() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    let resp = token_request(&proxy, &"a".repeat(65 * 1024)).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["x-criteo-proxy-error"], "bad_request");
    assert!(fake.seen().is_empty());
}

#[tokio::test]
async fn a_refresh_grant_keeps_the_tenant_of_its_placeholder() {
    let fake = fake_with_acme().await;
    let proxy = with_acme(&fake).await;
    let renewed = placeholder_for(
        &proxy,
        "grant_type=refresh_token&client_id=dummy&client_secret=x&refresh_token=criteo-token-proxy.acme",
    )
    .await;
    assert_eq!(renewed, "criteo-token-proxy.acme");
    let resp = token_request(
        &proxy,
        "grant_type=refresh_token&client_id=dummy&refresh_token=criteo-token-proxy.gone",
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["x-criteo-proxy-error"], "unknown_tenant");
}
