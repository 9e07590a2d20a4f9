//! The real binary as a user runs it: bad configurations, `check-config`,
//! signals, and what it writes to its logs.

mod support;

use std::time::Duration;

use support::process::{Running, command, fake_config, write};
use support::{FakeCriteo, client};

/// Runs the binary to completion: (exit code, stdout, stderr).
async fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = command();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), c.output())
        .await
        .expect("the binary exits on its own")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config_for(fake: &FakeCriteo, extra: &str) -> String {
    fake_config(
        fake,
        &format!(
            "[tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret = \"main-secret\"\n{extra}"
        ),
    )
}

#[tokio::test]
async fn bad_configuration_exits_non_zero_with_one_message_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ok_tenant = "[tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"id\"\nclient_secret = \"s\"\n";
    let cases: Vec<(&str, String, &str)> = vec![
        ("invalid TOML", "[server\nlisten = ".into(), "invalid configuration"),
        (
            "unknown grant",
            "[tenants.main]\ngrant = \"password\"\nclient_id = \"id\"\nclient_secret = \"s\"\n".into(),
            "tenants.main.grant",
        ),
        (
            "missing secret",
            "[tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"id\"\n".into(),
            "tenants.main.client_secret",
        ),
        (
            "missing secret file",
            "[tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"id\"\nclient_secret_file = \"/nonexistent/secret\"\n".into(),
            "tenants.main.client_secret_file",
        ),
        (
            "bad address",
            format!("[server]\nlisten = \"localhost-ish\"\n{ok_tenant}"),
            "server.listen",
        ),
        (
            "bad upstream URL",
            format!("[upstream]\nurl = \"ftp://api.criteo.com\"\n{ok_tenant}"),
            "upstream.url",
        ),
        (
            "unknown key",
            format!("[server]\nlisen = \"127.0.0.1:1\"\n{ok_tenant}"),
            "lisen",
        ),
        ("no tenants", "[server]\n".into(), "tenants"),
    ];
    for (what, text, key) in cases {
        let path = write(dir.path(), "bad.toml", &text);
        for args in [
            vec!["--config", path.to_str().unwrap()],
            vec!["check-config", "--config", path.to_str().unwrap()],
        ] {
            let (code, _, stderr) = run_to_end(&args, &[]).await;
            assert_ne!(code, 0, "{what}: exit code");
            assert!(
                stderr.contains(key),
                "{what}: {key:?} not named in {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        }
    }

    let (code, _, stderr) = run_to_end(&["--config", "/nonexistent/proxy.toml"], &[]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("/nonexistent/proxy.toml"), "{stderr}");

    let path = write(dir.path(), "ok.toml", ok_tenant);
    let (code, _, stderr) = run_to_end(
        &["check-config", "--config", path.to_str().unwrap()],
        &[("CRITEO_PROXY_SERVER__LISTEN", "nope")],
    )
    .await;
    assert_ne!(code, 0);
    assert!(stderr.contains("server.listen"), "{stderr}");
}

#[tokio::test]
async fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write(dir.path(), "secret", "file-secret-value\n");
    let path = write(
        dir.path(),
        "proxy.toml",
        &format!(
            "[tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"id\"\nclient_secret = \"inline-secret-value\"\n\
             [tenants.other]\ngrant = \"client_credentials\"\nclient_id = \"id2\"\nclient_secret_file = \"{}\"\n",
            secret.display()
        ),
    );
    let (code, stdout, stderr) = run_to_end(
        &["check-config"],
        &[
            ("CRITEO_PROXY_CONFIG", path.to_str().unwrap()),
            ("CRITEO_PROXY_SERVER__LISTEN", "127.0.0.1:18080"),
        ],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("listen = \"127.0.0.1:18080\""), "{stdout}");
    assert!(
        stdout.contains("max_replay_body"),
        "defaults are shown: {stdout}"
    );
    assert!(
        stdout.contains("client_secret = \"<redacted>\""),
        "{stdout}"
    );
    assert!(!stdout.contains("inline-secret-value") && !stderr.contains("inline-secret-value"));
    assert!(!stdout.contains("file-secret-value") && !stderr.contains("file-secret-value"));
}

#[tokio::test]
async fn an_address_in_use_is_a_clear_error() {
    let fake = FakeCriteo::start().await;
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = config_for(&fake, "").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{}\"", busy.local_addr().unwrap()),
    );
    let path = write(dir.path(), "proxy.toml", &text);
    let (code, _, stderr) = run_to_end(&["--config", path.to_str().unwrap()], &[]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("server.listen"), "{stderr}");
    assert!(!stderr.contains("panicked"));
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let fake = FakeCriteo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "proxy.toml", &config_for(&fake, ""));
    let mut proxy = Running::start(&path, "info").await;
    proxy.wait_for_message("access token obtained").await;

    let url = format!("{}/slow?ms=800", proxy.proxy);
    let slow = tokio::spawn(async move { client().get(url).send().await.map(|r| r.status()) });
    fake.wait_api_arrivals(1, Duration::from_secs(10)).await;
    proxy.signal("-TERM");
    proxy
        .wait_for_message("shutting down: finishing in-flight requests")
        .await;

    // Draining: readiness fails at once, new proxy connections are refused,
    // the request in flight still completes.
    let ready = client()
        .get(format!("{}/readyz", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert!(
        client()
            .get(format!("{}/x", proxy.proxy))
            .send()
            .await
            .is_err()
    );
    assert_eq!(
        slow.await.unwrap().unwrap(),
        200,
        "the in-flight request finished"
    );
    assert_eq!(proxy.wait_exit().await, 0);
    assert!(
        client()
            .get(format!("{}/x", proxy.proxy))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn sigint_exits_zero() {
    let fake = FakeCriteo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "proxy.toml", &config_for(&fake, ""));
    let mut proxy = Running::start(&path, "info").await;
    let resp = client()
        .get(format!("{}/healthz", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    proxy.signal("-INT");
    assert_eq!(proxy.wait_exit().await, 0);
}

#[tokio::test]
async fn no_secret_or_token_ever_reaches_the_logs() {
    let fake = FakeCriteo::builder()
        .client("other-id", "other-secret-value")
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = write(dir.path(), "secret", "other-secret-value\n");
    let extra = format!(
        "[tenants.other]\ngrant = \"client_credentials\"\nclient_id = \"other-id\"\nclient_secret_file = \"{}\"\n\
         [tenants.wrong]\ngrant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret = \"wrong-secret-value\"\n",
        secret_file.display()
    );
    let path = write(dir.path(), "proxy.toml", &config_for(&fake, &extra));
    let mut proxy = Running::start(&path, "trace").await;
    fake.wait_token_requests(3, Duration::from_secs(10)).await;
    proxy.wait_for_message("access token obtained").await;

    // A request, a 401 and its replay, a rejected tenant: every path that
    // handles a secret or a token.
    let c = client();
    for tenant in ["main", "other", "wrong"] {
        let _ = c
            .get(format!("{}/x", proxy.proxy))
            .header("x-criteo-tenant", tenant)
            .header("authorization", "Bearer client-supplied-credential")
            .send()
            .await
            .unwrap();
    }
    fake.revoke_all_tokens();
    let resp = c
        .post(format!("{}/x", proxy.proxy))
        .body("replayed")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let _ = c
        .get(format!("{}/tenants", proxy.admin))
        .send()
        .await
        .unwrap();
    proxy.signal("-TERM");
    assert_eq!(proxy.wait_exit().await, 0);

    let logs = proxy.all_logs();
    assert!(logs.contains("access token obtained"), "logs were captured");
    assert!(
        logs.contains("invalid_client"),
        "the rejection is explained"
    );
    let mut secrets = vec![
        "main-secret".to_owned(),
        "other-secret-value".to_owned(),
        "wrong-secret-value".to_owned(),
        "client-supplied-credential".to_owned(),
    ];
    secrets.extend(fake.issued_tokens());
    assert!(fake.issued_tokens().len() >= 3);
    for s in secrets {
        assert!(!logs.contains(&s), "{s} appears in the logs");
    }
}

#[tokio::test]
async fn one_access_log_line_per_request_with_the_query_only_at_debug() {
    let fake = FakeCriteo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "proxy.toml", &config_for(&fake, ""));
    for (level, query_logged) in [
        ("info", false),
        ("info,criteo_token_proxy::access=debug", true),
    ] {
        let mut proxy = Running::start(&path, level).await;
        proxy.wait_for_message("access token obtained").await;
        let resp = client()
            .post(format!(
                "{}/2024-10/advertisers/me?advertiser-id=4242",
                proxy.proxy
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let line = proxy.wait_for_message("request").await;
        let f = &line["fields"];
        assert_eq!(line["target"], "criteo_token_proxy::access");
        assert_eq!(f["tenant"], "main");
        assert_eq!(f["method"], "POST");
        assert_eq!(f["path"], "/2024-10/advertisers/me");
        assert_eq!(f["status"], 200);
        assert!(f["total_ms"].as_f64().unwrap() >= f["upstream_ms"].as_f64().unwrap());
        assert!(f["upstream_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(
            proxy.all_logs().contains("advertiser-id=4242"),
            query_logged,
            "the query string appears only at debug level"
        );
        proxy.signal("-TERM");
        assert_eq!(proxy.wait_exit().await, 0);
    }
}
