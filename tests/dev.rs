//! `--dev`: the sandbox, end to end, as a newcomer runs it.

mod support;

use serde_json::Value;
use support::client;
use support::process::{Running, command};

const LOOPBACK_PORT_0: [(&str, &str); 2] = [
    ("CRITEO_PROXY_SERVER__LISTEN", "127.0.0.1:0"),
    ("CRITEO_PROXY_SERVER__ADMIN_LISTEN", "127.0.0.1:0"),
];

#[tokio::test]
async fn the_sandbox_serves_renews_and_replays_with_no_credentials() {
    let mut dev = Running::start_with(&["--dev"], &LOOPBACK_PORT_0, "info").await;
    let banner = dev.wait_for_message("SANDBOX MODE (--dev): requests go to an embedded stand-in for Criteo with fake tokens and data, never to Criteo").await;
    assert_eq!(banner["level"], "WARN", "the sandbox says so loudly");
    dev.wait_for_message("access token obtained").await;

    let me: Value = client()
        .get(format!("{}/2024-10/advertisers/me", dev.proxy))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        me["data"][0]["attributes"]["advertiserName"],
        "Sandbox Advertiser"
    );

    // Revoke every token at the stand-in: the next call meets a 401, and
    // the proxy gets a fresh token and replays it.
    let revoked = client()
        .post(format!("{}/sandbox/revoke-tokens", dev.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let report = client()
        .post(format!("{}/2024-10/statistics/report", dev.proxy))
        .body(r#"{"dimensions":["Day"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(report.status(), 200);
    let report: Value = report.json().await.unwrap();
    assert_eq!(
        report["echo"]["dimensions"][0], "Day",
        "the body survived the replay"
    );
    let metrics = client()
        .get(format!("{}/metrics", dev.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("criteo_proxy_upstream_retries_total{tenant=\"demo\"} 1"),
        "{metrics}"
    );

    dev.signal("-TERM");
    assert_eq!(dev.wait_exit().await, 0);
}

#[tokio::test]
async fn the_sandbox_is_never_mixed_with_a_real_configuration() {
    let out = command()
        .args(["--dev", "--config", "/etc/criteo-token-proxy/proxy.toml"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let out = command()
        .arg("--dev")
        .env("CRITEO_PROXY_CONFIG", "/etc/criteo-token-proxy/proxy.toml")
        .output()
        .await
        .unwrap();
    assert!(
        !out.status.success(),
        "a config from the environment refuses --dev too"
    );
}

/// `GET` through the sandbox's proxy, as `tenant` (or the default).
async fn get(dev: &Running, path: &str, tenant: Option<&str>) -> reqwest::Response {
    let mut req = client().get(format!("{}{path}", dev.proxy));
    if let Some(t) = tenant {
        req = req.header("X-Criteo-Tenant", t);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn the_sandbox_answers_any_version_in_the_shapes_of_criteos_sdks() {
    let mut dev = Running::start_with(&["--dev"], &LOOPBACK_PORT_0, "info").await;
    dev.wait_for_message("access token obtained").await;

    for version in ["2024-10", "2027-01", "preview"] {
        let resp = get(&dev, &format!("/{version}/advertisers/me"), None).await;
        assert_eq!(resp.status(), 200, "{version}");
        assert_eq!(resp.headers()["x-ratelimit-limit"], "250");
        let me: Value = resp.json().await.unwrap();
        assert_eq!(me["data"][0]["type"], "advertiser", "the SDK's enumeration");
        assert_eq!(me["data"][0]["id"], "12345");
    }
    let app: Value = get(&dev, "/2027-01/marketing-solutions/me", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        app["data"]["attributes"]["name"],
        "criteo-token-proxy sandbox: demo"
    );
    let accounts: Value = get(&dev, "/2027-01/retail-media/accounts", Some("acme"))
        .await
        .json()
        .await
        .unwrap();
    let first = &accounts["data"][0]["attributes"];
    for field in [
        "currency",
        "timeZone",
        "parentAccountLabel",
        "countries",
        "type",
    ] {
        assert!(!first[field].is_null(), "{field}: {accounts}");
    }
    assert_eq!(accounts["metadata"]["totalItemsAcrossAllPages"], 2);

    let missing = get(&dev, "/2027-01/no-such-thing", None).await;
    assert_eq!(missing.status(), 404);
    let missing: Value = missing.json().await.unwrap();
    assert_eq!(missing["errors"][0]["code"], "not-found");

    let throttle = client()
        .post(format!("{}/sandbox/throttle", dev.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(throttle.status(), 200);
    let limited = get(&dev, "/2027-01/advertisers/me", None).await;
    assert_eq!(limited.status(), 429, "Criteo's 429 passes through");
    assert_eq!(limited.headers()["x-ratelimit-remaining"], "0");
    let reset: u64 = limited.headers()["x-ratelimit-reset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(reset > 1_700_000_000, "a Unix time");
    let limited: Value = limited.json().await.unwrap();
    assert_eq!(limited["errors"][0]["type"], "quota");

    dev.signal("-TERM");
    assert_eq!(dev.wait_exit().await, 0);
}

#[tokio::test]
async fn the_sandboxs_refresh_token_tenant_rotates_its_token_at_each_renewal() {
    let mut dev = Running::start_with(&["--dev"], &LOOPBACK_PORT_0, "info").await;
    dev.wait_for_message("access token obtained").await;
    let me = |v: Value| v["data"][0]["attributes"]["advertiserName"].clone();
    let first: Value = get(&dev, "/2027-01/advertisers/me", Some("acme"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me(first), "Acme Sandbox Advertiser");
    // Each revocation makes the next call renew acme's token with its
    // refresh token; the second renewal works only if the first answer
    // carried a new refresh token (the sandbox's are single-use).
    for _ in 0..2 {
        client()
            .post(format!("{}/sandbox/revoke-tokens", dev.proxy))
            .send()
            .await
            .unwrap();
        let resp = get(&dev, "/2027-01/advertisers/me", Some("acme")).await;
        assert_eq!(resp.status(), 200);
    }
    let seen: Value = get(&dev, "/sandbox/seen", None).await.json().await.unwrap();
    let refresh_grants = seen["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["body"]
                .as_str()
                .is_some_and(|b| b.contains("grant_type=refresh_token"))
        })
        .count();
    assert_eq!(refresh_grants, 3, "the first token and two renewals");

    dev.signal("-TERM");
    assert_eq!(dev.wait_exit().await, 0);
}

#[tokio::test]
async fn the_sandbox_prints_its_ports_and_credentials_and_logs_plain_text_into_a_pipe() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = command()
        .arg("--dev")
        .envs(LOOPBACK_PORT_0)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let read = async {
        let mut logs = String::new();
        while let Some(line) = stderr.next_line().await.unwrap() {
            logs.push_str(&line);
            logs.push('\n');
            if line.contains("access token obtained") {
                break;
            }
        }
        let mut banner = String::new();
        while let Some(line) = stdout.next_line().await.unwrap() {
            banner.push_str(&line);
            banner.push('\n');
            if line.contains("Ctrl-C") {
                break;
            }
        }
        (logs, banner)
    };
    let (logs, banner) = tokio::time::timeout(std::time::Duration::from_secs(20), read)
        .await
        .expect("the sandbox starts");
    assert!(
        !logs.contains('\x1b'),
        "no colour codes in a pipe: {logs:?}"
    );
    assert!(logs.contains("SANDBOX MODE"), "{logs}");
    let proxy = logs
        .split("proxy=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the listening line names the proxy's address");
    assert!(banner.contains(&format!("http://{proxy}")), "{banner}");
    for expected in [
        "CRITEO_PROXY_SERVER__LISTEN",
        "CRITEO_PROXY_SERVER__ADMIN_LISTEN",
        "sandbox-client",
        "sandbox-secret",
        "sandbox-acme-client",
        "acme",
    ] {
        assert!(banner.contains(expected), "{expected}: {banner}");
    }
    // SIGTERM, so that the sandbox removes its store folder.
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
        .await
        .expect("the sandbox stops")
        .unwrap();
    assert!(status.success());
}
