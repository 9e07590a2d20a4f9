//! Learning from Criteo's 429s: a tenant with a limit that Criteo still
//! answers 429 (its limit is lower, or others share it) pauses until
//! Criteo's reset, adopts the lower limit, and sends the request again if
//! its body was kept; otherwise the 429 goes back as Criteo sent it.

mod support;

use std::time::Duration;

use support::process::{Running, fake_config, write};
use support::{FakeCriteo, TestProxy, client};
use tokio::task::JoinSet;

const API: &str = "/2024-10/advertisers/me";

/// `n` GETs to `API` at once; their statuses.
async fn burst(url: &str, n: usize) -> Vec<u16> {
    let mut set = JoinSet::new();
    for _ in 0..n {
        let req = client().get(format!("{url}{API}"));
        set.spawn(async move { req.send().await.unwrap().status().as_u16() });
    }
    set.join_all().await
}

fn criteo_429s(metrics: &str) -> u64 {
    let prefix = "criteo_proxy_rate_limited_total{by=\"criteo\",tenant=\"main\"} ";
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test]
async fn a_limit_configured_too_high_still_ends_200_for_every_replayable_request() {
    let fake = FakeCriteo::builder()
        .rate_limit(10, Duration::from_secs(1))
        .start()
        .await;
    let proxy = TestProxy::builder(&fake)
        .section("[rate_limit]\nclient_credentials = \"100/sec\"\nmax_wait = \"20s\"")
        .start()
        .await;
    proxy.wait_ready().await;

    let statuses = burst(&proxy.url, 30).await;

    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let from_criteo = fake.rate_limited();
    assert!(from_criteo > 0, "the stand-in never answered 429");
    assert_eq!(criteo_429s(&proxy.metrics().await), from_criteo as u64);
}

#[tokio::test]
async fn a_post_replayed_after_a_429_carries_its_body() {
    let fake = FakeCriteo::builder()
        .rate_limit(1, Duration::from_secs(1))
        .start()
        .await;
    let proxy = TestProxy::builder(&fake)
        .section("[rate_limit]\nclient_credentials = \"100/sec\"\nmax_wait = \"10s\"")
        .start()
        .await;
    proxy.wait_ready().await;
    assert_eq!(proxy.get(API).await.status(), 200);

    let body = r#"{"data":{"attributes":{"name":"replayed"}}}"#;
    let resp = client()
        .post(format!("{}{API}", proxy.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();

    assert_eq!(resp.status(), 200);
    let posts: Vec<_> = fake
        .seen_path(API)
        .into_iter()
        .filter(|s| s.method == "POST")
        .collect();
    assert_eq!(posts.len(), 2, "sent once, refused, sent again");
    assert_eq!(posts[0].status, 429);
    assert_eq!(posts[1].status, 200);
    assert_eq!(posts[1].body, body.as_bytes());
}

#[tokio::test]
async fn a_streamed_body_gets_criteos_429_unchanged_and_is_not_replayed() {
    let fake = FakeCriteo::builder()
        .rate_limit(1, Duration::from_secs(1))
        .start()
        .await;
    let proxy = TestProxy::builder(&fake)
        .server("max_replay_body = \"16B\"")
        .section("[rate_limit]\nclient_credentials = \"100/sec\"\nmax_wait = \"10s\"")
        .start()
        .await;
    proxy.wait_ready().await;
    assert_eq!(proxy.get(API).await.status(), 200);

    let resp = client()
        .post(format!("{}{API}", proxy.url))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();

    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("x-criteo-proxy-error").is_none());
    for h in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        assert!(resp.headers().contains_key(h), "{h} missing");
    }
    let posts = fake
        .seen_path(API)
        .into_iter()
        .filter(|s| s.method == "POST");
    assert_eq!(posts.count(), 1, "a streamed body was sent again");
    assert_eq!(criteo_429s(&proxy.metrics().await), 1);
}

#[tokio::test]
async fn a_429_whose_reset_is_past_max_wait_goes_back_at_once() {
    let fake = FakeCriteo::builder()
        .rate_limit(1, Duration::from_secs(30))
        .start()
        .await;
    let proxy = TestProxy::builder(&fake)
        .section("[rate_limit]\nclient_credentials = \"100/sec\"\nmax_wait = \"2s\"")
        .start()
        .await;
    proxy.wait_ready().await;
    assert_eq!(proxy.get(API).await.status(), 200);

    let started = std::time::Instant::now();
    let resp = proxy.get(API).await;

    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("x-criteo-proxy-error").is_none());
    assert!(resp.headers().contains_key("x-ratelimit-reset"));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "rate-limit-exceeded", "{body}");
    // "At once": not after the 2 s it may wait (a bound, not a timing).
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(fake.seen_path(API).len(), 2, "the 429 was replayed");
    // The tenant is paused: the next request is refused by the proxy,
    // never forwarded.
    let resp = proxy.get(API).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("x-criteo-proxy-error").is_some());
    assert_eq!(fake.seen_path(API).len(), 2);
}

#[tokio::test]
async fn a_lower_limit_from_criteo_is_adopted_and_logged_once() {
    let fake = FakeCriteo::builder()
        .rate_limit(5, Duration::from_secs(1))
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = fake_config(
        &fake,
        "[rate_limit]\nclient_credentials = \"100/sec\"\nmax_wait = \"20s\"\n\n\
         [tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret = \"main-secret\"\n",
    );
    let path = write(dir.path(), "config.toml", &config);
    let mut proxy = Running::start(&path, "info").await;
    proxy.wait_for_message("access token obtained").await;

    // The first burst meets Criteo's lower limit...
    let first = burst(&proxy.proxy, 12).await;
    assert!(first.iter().all(|&s| s == 200), "{first:?}");
    let learnt = fake.rate_limited();
    assert!(learnt > 0);
    // ...a later one is paced to it: no more 429 from the stand-in.
    let second = burst(&proxy.proxy, 12).await;
    assert!(second.iter().all(|&s| s == 200), "{second:?}");
    assert_eq!(fake.rate_limited(), learnt, "Criteo answered 429 again");

    let logs = proxy.all_logs();
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("x-ratelimit-limit is lower"))
        .collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    for part in ["main", "100/sec", "5/sec"] {
        assert!(warnings[0].contains(part), "{part} not in {}", warnings[0]);
    }
}
