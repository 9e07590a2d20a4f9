//! The token endpoint misbehaving: 2xx answers whose rest is spoiled, slow
//! rotations (and a reload or SIGTERM during one), redirects, oversized
//! answers, absurd `expires_in` values, and a slow code exchange. Whatever
//! it does, no refresh token is lost, no spent one is presented, nothing
//! panics, and no error message shows a token.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criteo_token_proxy::Tenant;
use criteo_token_proxy::consent;
use serde_json::{Value, json};
use support::fake_criteo::Spoil;
use support::process::{Running, write};
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

fn stored_token(dir: &Path) -> String {
    support::stored::stored_token(&store_path(dir), "acme")
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

async fn get(url: &str) -> reqwest::Response {
    client().get(url).send().await.unwrap()
}

async fn tenant_json(proxy: &TestProxy, name: &str) -> Value {
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

fn tenant(proxy: &TestProxy, name: &str) -> Arc<Tenant> {
    Arc::clone(proxy.tenants().get(name).unwrap())
}

/// Waits until the tenant serves a token newer than `generation`.
async fn wait_token_after(tenant: &Tenant, generation: u64) -> u64 {
    let mut attempts = tenant.tokens.attempts();
    let wait = async {
        loop {
            if let Some(t) = tenant.tokens.usable()
                && t.generation() > generation
            {
                return t.generation();
            }
            attempts.changed().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("tenant {} got no newer token", tenant.name))
}

/// Waits until a token request of the tenant has failed; its message.
async fn wait_error(tenant: &Tenant) -> String {
    let mut attempts = tenant.tokens.attempts();
    let wait = async {
        loop {
            if let Some(e) = tenant.tokens.health().last_error.clone() {
                return e;
            }
            attempts.changed().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("no token request of {} failed", tenant.name))
}

fn generation(tenant: &Tenant) -> u64 {
    tenant.tokens.current().map_or(0, |t| t.generation())
}

/// Makes the proxy renew now: Criteo forgets its access tokens, so the
/// next request gets a 401 and the proxy asks for a new token.
fn force_renewal(fake: &FakeCriteo, proxy_url: &str) {
    fake.revoke_all_tokens();
    let url = format!("{proxy_url}/x");
    tokio::spawn(async move {
        let _ = client().get(url).send().await;
    });
}

/// No error message may show a token (the stand-in's all start so).
fn assert_no_token_in(text: &str) {
    for marker in ["fake-access", "fake-refresh", "98765432123456789"] {
        assert!(!text.contains(marker), "a token shows in {text:?}");
    }
}

// === a 2xx rotation whose rest is bad ===

/// A rotation answered 2xx with a good refresh token and a bad rest: the
/// new refresh token is saved, the renewal fails (transient), and the next
/// renewal presents the saved token and succeeds.
async fn survives_a_rotation_whose_rest_is(spoil: Spoil) {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, dir.path(), Some(&seed)).start().await;
    proxy.wait_ready().await;
    let acme = tenant(&proxy, "acme");
    let before = generation(&acme);

    fake.spoil_next_token_answer(spoil.clone());
    force_renewal(&fake, &proxy.url);
    let error = wait_error(&acme).await;
    assert_no_token_in(&error);
    assert_no_token_in(&tenant_json(&proxy, "acme").await.to_string());
    wait_token_after(&acme, before).await;
    assert_eq!(tenant_json(&proxy, "acme").await["state"], "ready");
    assert_eq!(get(&format!("{}/x", proxy.url)).await.status(), 200);

    proxy.stop().await;
    assert_eq!(
        fake.spent_presented(),
        0,
        "{spoil:?}: a spent refresh token was presented"
    );
    assert_eq!(
        Some(stored_token(dir.path())),
        fake.newest_refresh_token(ACME_ID),
        "{spoil:?}: the store holds the newest refresh token"
    );
}

#[tokio::test]
async fn a_rotation_with_expires_in_as_a_string_keeps_the_new_refresh_token() {
    survives_a_rotation_whose_rest_is(Spoil::ExpiresInString).await;
}

#[tokio::test]
async fn a_rotation_with_a_negative_expires_in_keeps_the_new_refresh_token() {
    survives_a_rotation_whose_rest_is(Spoil::ExpiresInNegative).await;
}

#[tokio::test]
async fn a_rotation_with_a_fractional_expires_in_keeps_the_new_refresh_token() {
    survives_a_rotation_whose_rest_is(Spoil::ExpiresInFraction).await;
}

#[tokio::test]
async fn a_rotation_with_a_token_type_other_than_bearer_keeps_the_new_refresh_token() {
    survives_a_rotation_whose_rest_is(Spoil::TokenTypeMac).await;
}

#[tokio::test]
async fn a_rotation_with_an_empty_access_token_keeps_the_new_refresh_token() {
    survives_a_rotation_whose_rest_is(Spoil::EmptyAccessToken).await;
}

#[tokio::test]
async fn a_rotation_with_a_non_printable_access_token_keeps_the_new_refresh_token() {
    survives_a_rotation_whose_rest_is(Spoil::NonPrintableAccessToken).await;
}

#[tokio::test]
async fn a_rotation_with_a_numeric_access_token_keeps_the_new_refresh_token() {
    survives_a_rotation_whose_rest_is(Spoil::NumericAccessToken(98765432123456789)).await;
}

#[tokio::test]
async fn a_rotation_with_an_overlong_access_token_keeps_the_new_refresh_token() {
    survives_a_rotation_whose_rest_is(Spoil::LongAccessToken).await;
}

#[tokio::test]
async fn a_rotation_with_json_broken_after_the_refresh_token_keeps_it() {
    survives_a_rotation_whose_rest_is(Spoil::BrokenAfterRefreshToken).await;
}

#[tokio::test]
async fn an_oversized_rotation_answer_keeps_the_refresh_token_it_starts_with() {
    survives_a_rotation_whose_rest_is(Spoil::Padded(100 * 1024)).await;
}

#[tokio::test]
async fn a_code_exchange_with_a_bad_access_token_still_onboards_the_tenant() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = acme(&fake, dir.path(), None).start().await;
    fake.spoil_next_token_answer(Spoil::EmptyAccessToken);

    // A person consents: authorize → consent page → callback.
    let page = get(&format!("{}/oauth/authorize?tenant=acme", proxy.admin)).await;
    assert_eq!(page.status(), 200, "{}", page.text().await.unwrap());
    assert_eq!(get(&format!("{}/x", proxy.url)).await.status(), 200);
    assert_eq!(tenant_json(&proxy, "acme").await["state"], "ready");

    proxy.stop().await;
    assert_eq!(fake.spent_presented(), 0);
    let from_code = fake.answered_refresh_tokens("authorization_code");
    assert_eq!(
        fake.refresh_presented(),
        from_code,
        "the code's refresh token was saved and renewed with"
    );
    assert_eq!(
        Some(stored_token(dir.path())),
        fake.newest_refresh_token(ACME_ID)
    );
}

// === what an error may say ===

#[tokio::test]
async fn a_wrongly_typed_access_token_is_named_never_echoed() {
    let fake = FakeCriteo::builder()
        .spoil_token_answers(Spoil::NumericAccessToken(98765432123456789))
        .start()
        .await;
    let proxy = TestProxy::builder(&fake).start().await;
    let error = wait_error(&tenant(&proxy, "main")).await;
    assert!(error.contains("access_token"), "{error}");
    let shown = tenant_json(&proxy, "main").await;
    assert_no_token_in(&shown.to_string());
    assert!(
        shown["last_error"]
            .as_str()
            .unwrap()
            .contains("access_token"),
        "{shown}"
    );
}

// === redirects and sizes ===

#[tokio::test]
async fn a_redirecting_token_endpoint_gets_no_credentials_sent_elsewhere() {
    for status in [307, 308] {
        let elsewhere = FakeCriteo::start().await;
        let fake = FakeCriteo::builder()
            .redirect_token_endpoint(
                status,
                &format!("{}?where=query-secret", elsewhere.token_url()),
            )
            .start()
            .await;
        let proxy = TestProxy::builder(&fake).start().await;
        let error = wait_error(&tenant(&proxy, "main")).await;
        assert!(error.contains("redirect"), "{status}: {error}");
        assert!(!error.contains("query-secret"), "{status}: {error}");
        assert!(!error.contains("main-secret"), "{status}: {error}");
        let resp = get(&format!("{}/x", proxy.url)).await;
        assert_eq!(resp.status(), 503);
        assert!(fake.token_requests() >= 1);
        assert_eq!(
            elsewhere.token_requests(),
            0,
            "{status}: the client secret was re-posted to the redirect's target"
        );
        assert!(elsewhere.seen().is_empty());
    }
}

#[tokio::test]
async fn an_oversized_token_answer_is_refused() {
    let fake = FakeCriteo::builder()
        .spoil_token_answers(Spoil::Padded(100 * 1024))
        .start()
        .await;
    let proxy = TestProxy::builder(&fake).start().await;
    let error = wait_error(&tenant(&proxy, "main")).await;
    assert!(error.contains("64 KiB"), "{error}");
    assert_no_token_in(&error);
    assert_eq!(get(&format!("{}/x", proxy.url)).await.status(), 503);
}

#[tokio::test]
async fn an_access_token_over_16_kib_is_refused() {
    let fake = FakeCriteo::builder()
        .spoil_token_answers(Spoil::LongAccessToken)
        .start()
        .await;
    let proxy = TestProxy::builder(&fake).start().await;
    let error = wait_error(&tenant(&proxy, "main")).await;
    assert!(error.contains("16 KiB"), "{error}");
    assert_no_token_in(&error);
    assert_eq!(get(&format!("{}/x", proxy.url)).await.status(), 503);
}

// === expires_in ===

#[tokio::test]
async fn absurd_expires_in_values_are_clamped_and_the_token_serves() {
    let values = [
        json!(1u64 << 32),
        json!(10_000_000_000_000_000_000u64),
        json!(u64::MAX),
        json!(1e19),
        json!(1e300),
    ];
    for v in values {
        let fake = FakeCriteo::builder()
            .advertised_expires_in(v.clone())
            .start()
            .await;
        let proxy = TestProxy::builder(&fake).start().await;
        proxy.wait_ready().await;
        for _ in 0..3 {
            assert_eq!(get(&format!("{}/x", proxy.url)).await.status(), 200, "{v}");
        }
        assert_eq!(fake.token_requests(), 1, "{v}: one token serves them all");
        let left = tenant_json(&proxy, "main").await["expires_in_seconds"]
            .as_u64()
            .unwrap();
        assert!(left <= 24 * 3600, "{v}: clamped to a day, not {left}");
    }
}

#[tokio::test]
async fn a_zero_expires_in_is_raised_to_the_floor_and_does_not_renew_faster() {
    let fake = FakeCriteo::builder()
        .advertised_expires_in(json!(0))
        .start()
        .await;
    let proxy = TestProxy::ready(&fake).await;
    // An observation window (the stimulus is time passing): a zero
    // lifetime believed would renew every second or faster.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for _ in 0..3 {
        assert_eq!(get(&format!("{}/x", proxy.url)).await.status(), 200);
    }
    assert_eq!(fake.token_requests(), 1, "no renewal before the floor");
}

#[tokio::test]
async fn renewals_never_come_faster_than_the_floor() {
    // A zero lifetime raised to 10 s, renewed at 1 % of it: every 0.1 s,
    // were it not for the floor (half of refresh.min_token_lifetime).
    let fake = FakeCriteo::builder()
        .advertised_expires_in(json!(0))
        .start()
        .await;
    let proxy = TestProxy::builder(&fake)
        .refresh("at_fraction = 0.01")
        .start()
        .await;
    proxy.wait_ready().await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // observation window
    assert_eq!(get(&format!("{}/x", proxy.url)).await.status(), 200);
    assert_eq!(fake.token_requests(), 1, "no renewal before the floor");
}

// === slow rotations ===

#[tokio::test]
async fn a_rotation_slower_than_token_timeout_is_awaited_and_the_tenant_stays_ready() {
    let fake = FakeCriteo::builder()
        .client(ACME_ID, ACME_SECRET)
        .answer_delay(Duration::from_millis(800))
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, dir.path(), Some(&seed))
        .refresh("token_timeout = \"300ms\"")
        .start()
        .await;
    proxy.wait_ready().await; // the first rotation took 800 ms
    let acme = tenant(&proxy, "acme");
    let before = generation(&acme);
    force_renewal(&fake, &proxy.url);
    wait_token_after(&acme, before).await;
    assert_eq!(tenant_json(&proxy, "acme").await["state"], "ready");

    proxy.stop().await;
    assert_eq!(fake.spent_presented(), 0);
    assert_eq!(
        Some(stored_token(dir.path())),
        fake.newest_refresh_token(ACME_ID)
    );
}

#[tokio::test]
async fn stopping_waits_for_a_rotation_in_flight_and_saves_its_token() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, dir.path(), Some(&seed))
        .refresh("token_timeout = \"300ms\"")
        .start()
        .await;
    proxy.wait_ready().await;
    fake.set_answer_delay(Duration::from_secs(1));
    force_renewal(&fake, &proxy.url);
    fake.wait_token_requests(2, Duration::from_secs(5)).await;

    proxy.stop().await;
    assert_eq!(fake.answers_sent(), 2);
    assert_eq!(
        Some(stored_token(dir.path())),
        fake.newest_refresh_token(ACME_ID),
        "the rotation in flight at shutdown was saved"
    );
}

/// The real binary's configuration for `acme`, with extra `[refresh]` and
/// `[server]` lines.
fn binary_config(fake: &FakeCriteo, dir: &Path, seed: &str, server: &str, refresh: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndefault_tenant = \"acme\"\n{server}\n\
         [upstream]\nurl = \"{url}\"\ntoken_url = \"{token_url}\"\n\n\
         [refresh]\n{refresh}\n\n\
         [store]\npath = \"{store}\"\n\n\
         [tenants.acme]\ngrant = \"refresh_token\"\nclient_id = \"{ACME_ID}\"\nclient_secret = \"{ACME_SECRET}\"\n\
         redirect_uri = \"http://127.0.0.1:9/oauth/callback\"\nrefresh_token = \"{seed}\"\n",
        url = fake.url(),
        token_url = fake.token_url(),
        store = store_path(dir).display(),
    )
}

#[tokio::test]
async fn sigterm_during_a_slow_rotation_keeps_criteos_newest_refresh_token() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let seed = fake.issue_refresh_token(ACME_ID);
    let path = write(
        dir.path(),
        "proxy.toml",
        &binary_config(&fake, dir.path(), &seed, "", "token_timeout = \"300ms\""),
    );
    let mut proxy = Running::start(&path, "info").await;
    proxy.wait_for_message("access token obtained").await;
    fake.set_answer_delay(Duration::from_millis(1500));
    force_renewal(&fake, &proxy.proxy);
    fake.wait_token_requests(2, Duration::from_secs(5)).await;

    proxy.signal("-TERM");
    assert_eq!(proxy.wait_exit().await, 0);
    assert_eq!(fake.answers_sent(), 2);
    assert_eq!(fake.spent_presented(), 0);
    assert_eq!(
        Some(stored_token(dir.path())),
        fake.newest_refresh_token(ACME_ID),
        "the store holds Criteo's newest refresh token"
    );
}

#[tokio::test]
async fn a_rotation_outlasting_the_shutdown_grace_is_given_up_with_a_log_line() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let seed = fake.issue_refresh_token(ACME_ID);
    let path = write(
        dir.path(),
        "proxy.toml",
        &binary_config(&fake, dir.path(), &seed, "shutdown_grace = \"1s\"", ""),
    );
    let mut proxy = Running::start(&path, "info").await;
    proxy.wait_for_message("access token obtained").await;
    fake.set_answer_delay(Duration::from_secs(5));
    force_renewal(&fake, &proxy.proxy);
    fake.wait_token_requests(2, Duration::from_secs(5)).await;

    proxy.signal("-TERM");
    assert_eq!(proxy.wait_exit().await, 0);
    assert_eq!(fake.answers_sent(), 1, "the process did not wait 5 s");
    let logs = proxy.all_logs();
    assert!(
        logs.contains("server.shutdown_grace ran out") && logs.contains("acme"),
        "{logs}"
    );
}

#[tokio::test]
async fn a_reload_during_a_slow_rotation_neither_waits_for_it_nor_cancels_it() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let seed = fake.issue_refresh_token(ACME_ID);
    let path = write(
        dir.path(),
        "proxy.toml",
        &binary_config(&fake, dir.path(), &seed, "", ""),
    );
    let mut proxy = Running::start(&path, "info").await;
    proxy.wait_for_message("access token obtained").await;
    fake.set_answer_delay(Duration::from_secs(3));
    force_renewal(&fake, &proxy.proxy);
    fake.wait_token_requests(2, Duration::from_secs(5)).await;

    // A changed seed rebuilds the tenant: its refresher is replaced.
    let changed = binary_config(&fake, dir.path(), "another-seed", "", "");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, changed).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    proxy.signal("-HUP");
    proxy.wait_for_message("configuration reloaded").await;
    assert_eq!(
        fake.answers_sent(),
        1,
        "the reload did not wait for the rotation's answer"
    );
    assert_eq!(get(&format!("{}/healthz", proxy.admin)).await.status(), 200);

    // The rotation completes; the new refresher starts from its token.
    fake.wait_answers_sent(3, Duration::from_secs(10)).await;
    assert_eq!(get(&format!("{}/x", proxy.proxy)).await.status(), 200);
    proxy.signal("-TERM");
    assert_eq!(proxy.wait_exit().await, 0);
    assert_eq!(fake.spent_presented(), 0);
    let presented = fake.refresh_presented();
    assert_eq!(presented.len(), 3, "{presented:?}");
    assert_eq!(
        Some(stored_token(dir.path())),
        fake.newest_refresh_token(ACME_ID)
    );
}

// === onboarding never holds up renewals ===

#[tokio::test]
async fn a_slow_code_exchange_does_not_hold_up_the_tenants_renewals() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, dir.path(), Some(&seed))
        .refresh("wait_timeout = \"1s\"")
        .start()
        .await;
    proxy.wait_ready().await;
    let acme = tenant(&proxy, "acme");

    // A consent's code, whose exchange the stand-in holds for 3 s.
    fake.set_grant_delay("authorization_code", Duration::from_secs(3));
    let redirect_uri = format!("{}/oauth/callback", proxy.admin);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let state = consent::issue_state(ACME_SECRET.as_bytes(), "acme", now, consent::STATE_TTL);
    let code = fake.issue_code(ACME_ID, &redirect_uri);
    let callback = tokio::spawn(get_owned(format!(
        "{redirect_uri}?code={code}&state={state}"
    )));
    fake.wait_token_requests(2, Duration::from_secs(5)).await;

    // Meanwhile a 401 makes the tenant renew: it is not held up.
    let before = generation(&acme);
    fake.revoke_all_tokens();
    assert_eq!(get(&format!("{}/x", proxy.url)).await.status(), 200);
    assert!(generation(&acme) > before);
    assert!(!callback.is_finished(), "the exchange is still held");

    // The consent completes and supersedes the renewal's refresh token.
    assert_eq!(callback.await.unwrap(), 200);
    proxy.stop().await;
    assert_eq!(fake.spent_presented(), 0);
    assert_eq!(
        Some(stored_token(dir.path())),
        fake.answered_refresh_tokens("authorization_code").pop()
    );
}

async fn get_owned(url: String) -> u16 {
    get(&url).await.status().as_u16()
}
