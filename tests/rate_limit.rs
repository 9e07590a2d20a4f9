//! Rate limits: a tenant with a limit stays under it, its clients queue
//! instead of getting Criteo's 429s, and what would wait too long is
//! answered 429 `rate_limited` at once, never forwarded.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::process::{command, fake_config, write};
use support::{FakeCriteo, TestProxy, client};
use tokio::task::JoinSet;

const API: &str = "/2024-10/advertisers/me";
const REPORT: &str = "/2024-10/statistics/report";

/// The most arrivals in any window of `window`.
fn most_in_any_window(mut at: Vec<Instant>, window: Duration) -> usize {
    at.sort();
    let (mut most, mut start) = (0, 0);
    for end in 0..at.len() {
        while at[end] - at[start] >= window {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    most
}

/// Sends `n` requests to `path` for `tenant` at once; answers (status,
/// JSON body, Retry-After) in the order they completed.
async fn burst(proxy: &TestProxy, tenant: &str, path: &str, n: usize) -> JoinSet<Answer> {
    let mut set = JoinSet::new();
    for _ in 0..n {
        let req = client()
            .post(format!("{}{path}", proxy.url))
            .header("X-Criteo-Tenant", tenant)
            .body("{}");
        set.spawn(async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            let proxy_error = resp.headers().get("x-criteo-proxy-error").is_some();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            Answer {
                status,
                body,
                retry_after,
                proxy_error,
            }
        });
    }
    set
}

#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
    retry_after: Option<u64>,
    proxy_error: bool,
}

async fn all(mut set: JoinSet<Answer>) -> Vec<Answer> {
    let mut out = Vec::new();
    while let Some(a) = set.join_next().await {
        out.push(a.unwrap());
    }
    out
}

async fn tenants(proxy: &TestProxy) -> Value {
    client()
        .get(format!("{}/tenants", proxy.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn waiting(proxy: &TestProxy, tenant: &str) -> u64 {
    let t = tenants(proxy).await;
    let t = t["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == tenant)
        .unwrap()
        .clone();
    t["rate_limit"]["waiting"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn a_burst_under_a_matching_limit_all_succeeds_with_no_429_from_criteo() {
    let fake = FakeCriteo::builder()
        .rate_limit(10, Duration::from_secs(1))
        .start()
        .await;
    let proxy = TestProxy::builder(&fake)
        .section("[rate_limit]\nclient_credentials = \"10/sec\"")
        .start()
        .await;
    proxy.wait_ready().await;

    let answers = all(burst(&proxy, "main", API, 40).await).await;

    assert!(answers.iter().all(|a| a.status == 200), "{answers:?}");
    assert_eq!(fake.rate_limited(), 0, "Criteo answered 429");
    let arrivals: Vec<Instant> = fake.seen_path(API).iter().map(|s| s.arrived).collect();
    assert_eq!(arrivals.len(), 40);
    let most = most_in_any_window(arrivals, Duration::from_secs(1));
    assert!(most <= 10, "{most} calls reached Criteo within one second");
}

#[tokio::test]
async fn past_max_wait_the_excess_is_refused_at_once_and_never_forwarded() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .section("[rate_limit]\nmax_wait = \"700ms\"\nclient_credentials = \"2/sec\"")
        .start()
        .await;
    proxy.wait_ready().await;

    // In completion order: every refusal comes before the last request
    // that waited its turn.
    let answers = all(burst(&proxy, "main", API, 10).await).await;

    let ok = answers.iter().filter(|a| a.status == 200).count();
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status == 429).collect();
    assert_eq!(ok + refused.len(), 10, "{answers:?}");
    assert!((1..=2).contains(&ok), "{answers:?}");
    for a in &refused {
        assert_eq!(a.body["error"], "rate_limited");
        assert_eq!(a.body["tenant"], "main");
        assert!(a.proxy_error);
        assert!(a.retry_after.is_some_and(|s| s >= 1), "{a:?}");
    }
    let last_ok = answers.iter().rposition(|a| a.status == 200).unwrap();
    let last_refused = answers.iter().rposition(|a| a.status == 429).unwrap();
    assert!(last_refused < last_ok, "a refusal waited: {answers:?}");
    assert_eq!(
        fake.seen_path(API).len(),
        ok,
        "a refused request was forwarded"
    );
    let metrics = proxy.metrics().await;
    let line = format!(
        "criteo_proxy_rate_limited_total{{by=\"proxy\",tenant=\"main\"}} {}",
        refused.len()
    );
    assert!(metrics.contains(&line), "{line} not in\n{metrics}");
}

#[tokio::test]
async fn a_saturated_tenant_does_not_delay_another_and_its_queue_is_visible() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .tenant(
            "slow",
            "grant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret = \"main-secret\"\nrate_limit = \"1/sec\"",
        )
        .tenant(
            "other",
            "grant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret = \"main-secret\"\nrate_limit = \"1000/sec\"",
        )
        .start()
        .await;
    proxy.wait_ready().await;

    let mut slow = burst(&proxy, "slow", API, 4).await;
    // Wait until the slow tenant's queue holds requests (a signal, not a
    // sleep): /tenants shows them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while waiting(&proxy, "slow").await < 2 {
        assert!(Instant::now() < deadline, "no queue formed");
        tokio::task::yield_now().await;
    }
    let other = all(burst(&proxy, "other", API, 20).await).await;
    assert!(other.iter().all(|a| a.status == 200), "{other:?}");
    // The other tenant is done while the slow one still waits.
    assert!(
        waiting(&proxy, "slow").await >= 1,
        "the slow queue drained first"
    );
    let mut slow_done = 0;
    while let Some(a) = slow.join_next().await {
        assert_eq!(a.unwrap().status, 200);
        slow_done += 1;
    }
    assert_eq!(slow_done, 4);
    assert_eq!(waiting(&proxy, "slow").await, 0);

    let t = tenants(&proxy).await;
    let slow_t = t["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "slow")
        .unwrap();
    assert_eq!(slow_t["rate_limit"]["limit"], "1/sec");
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("criteo_proxy_rate_limit_wait_seconds_count{tenant=\"slow\"} 3"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("criteo_proxy_rate_limit_wait_seconds_count{tenant=\"other\"}"),
        "the other tenant waited: {metrics}"
    );
}

#[tokio::test]
async fn reporting_paths_have_their_own_budget() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .section(
            "[rate_limit]\nmax_wait = \"700ms\"\nclient_credentials = \"40/sec\"\nreporting = \"2/sec\"",
        )
        .start()
        .await;
    proxy.wait_ready().await;

    let reports = burst(&proxy, "main", REPORT, 6).await;
    let calls = burst(&proxy, "main", API, 6).await;
    let (reports, calls) = (all(reports).await, all(calls).await);

    assert!(calls.iter().all(|a| a.status == 200), "{calls:?}");
    let ok = reports.iter().filter(|a| a.status == 200).count();
    assert!((1..=2).contains(&ok), "{reports:?}");
    assert!(
        reports
            .iter()
            .filter(|a| a.status != 200)
            .all(|a| a.status == 429 && a.body["error"] == "rate_limited"),
        "{reports:?}"
    );
    assert_eq!(fake.seen_path(REPORT).len(), ok);
}

#[tokio::test]
async fn reporting_calls_count_inside_the_tenants_budget() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .section(
            "[rate_limit]\nmax_wait = \"700ms\"\nclient_credentials = \"2/sec\"\nreporting = \"100/sec\"",
        )
        .start()
        .await;
    proxy.wait_ready().await;

    let reports = all(burst(&proxy, "main", REPORT, 6).await).await;

    // The reporting budget has room for all six; the tenant's does not.
    let ok = reports.iter().filter(|a| a.status == 200).count();
    assert!((1..=2).contains(&ok), "{reports:?}");
    assert_eq!(fake.seen_path(REPORT).len(), ok);
}

/// Two calls pass, the third gets Criteo's own 429, untouched.
async fn criteos_429_passes_straight_back(proxy: &TestProxy, fake: &FakeCriteo, tenant: &str) {
    for _ in 0..2 {
        assert_eq!(proxy.get_as(tenant, API).await.status(), 200);
    }
    let resp = proxy.get_as(tenant, API).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("x-criteo-proxy-error").is_none());
    for h in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "date",
    ] {
        assert!(resp.headers().contains_key(h), "{tenant}: {h} missing");
    }
    assert_eq!(fake.rate_limited(), 1);
    let t = tenants(proxy).await;
    let t = t["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == tenant)
        .unwrap()
        .clone();
    assert!(t["rate_limit"].is_null(), "{t}");
}

#[tokio::test]
async fn a_tenant_without_a_limit_gets_criteos_429_as_criteo_sent_it() {
    let fake = FakeCriteo::builder()
        .rate_limit(2, Duration::from_secs(60))
        .start()
        .await;
    let proxy = TestProxy::ready(&fake).await;
    criteos_429_passes_straight_back(&proxy, &fake, "main").await;
}

#[tokio::test]
async fn a_tenant_with_its_limit_off_gets_criteos_429_as_criteo_sent_it() {
    let fake = FakeCriteo::builder()
        .rate_limit(2, Duration::from_secs(60))
        .start()
        .await;
    let proxy = TestProxy::builder(&fake)
        .without_main()
        .tenant(
            "off",
            "grant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret = \"main-secret\"\nrate_limit = \"off\"",
        )
        .section("[rate_limit]\nclient_credentials = \"1/min\"\nreporting = \"1/min\"")
        .start()
        .await;
    proxy.wait_ready().await;
    criteos_429_passes_straight_back(&proxy, &fake, "off").await;
}

#[tokio::test]
async fn bad_limits_exit_78_naming_the_key_and_check_config_shows_the_section() {
    let fake = FakeCriteo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let main = "[tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret = \"s\"\n";
    let cases = [
        (
            "[rate_limit]\nclient_credentials = \"0/min\"\n",
            "rate_limit.client_credentials",
        ),
        (
            "[rate_limit]\nreporting = \"10/fortnight\"\n",
            "rate_limit.reporting",
        ),
        (
            "[rate_limit]\nrefresh_token = \"abc\"\n",
            "rate_limit.refresh_token",
        ),
        ("[rate_limit]\nmax_wait = \"0s\"\n", "rate_limit.max_wait"),
        (
            "[rate_limit]\nmax_wait = \"1000d\"\n",
            "rate_limit.max_wait",
        ),
        (
            "[rate_limit]\nreporting_paths = [\"reports/*\"]\n",
            "rate_limit.reporting_paths",
        ),
        ("rate_limit_in_tenant", "tenants.main.rate_limit"),
    ];
    for (section, key) in cases {
        let text = if section == "rate_limit_in_tenant" {
            fake_config(&fake, &format!("{main}rate_limit = \"abc\"\n"))
        } else {
            fake_config(&fake, &format!("{section}\n{main}"))
        };
        let path = write(dir.path(), "bad.toml", &text);
        let out = command()
            .args(["check-config", "--config", path.to_str().unwrap()])
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{key}: {stderr}");
        assert!(stderr.contains(key), "{key} not named in {stderr}");
    }

    let good = fake_config(
        &fake,
        &format!(
            "[rate_limit]\nclient_credentials = \"250/min\"\nreporting = \"40/min\"\n\n{main}rate_limit = \"off\"\n"
        ),
    );
    let path = write(dir.path(), "good.toml", &good);
    let out = command()
        .args(["check-config", "--config", path.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    for line in [
        "[rate_limit]",
        "max_wait = \"30s\"",
        "client_credentials = \"250/min\"",
        "reporting = \"40/min\"",
        "rate_limit = \"off\"",
    ] {
        assert!(stdout.contains(line), "{line} not in\n{stdout}");
    }
}
