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
