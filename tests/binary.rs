//! The real binary as a user runs it: bad configurations, `check-config`,
//! signals, and what it writes to its logs.

mod support;

use std::path::Path;
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

/// Runs `args` and checks: exit 78, `key` named, no panic, no backtrace.
/// `run_to_end`'s outer timeout catches a hang (a FIFO blocking an open).
async fn assert_config_error(what: &str, args: &[&str], key: &str) {
    let (code, _, stderr) = run_to_end(args, &[]).await;
    assert_eq!(code, 78, "{what}: {stderr}");
    assert!(stderr.contains(key), "{what}: {key} not named in {stderr}");
    for word in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(word), "{what}: {stderr}");
    }
}

#[tokio::test]
async fn values_that_would_crash_or_hang_later_exit_78_naming_the_key() {
    let fake = FakeCriteo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let big = d.join("big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(200 * 1024 * 1024)
        .unwrap();
    let huge = "300000000000years";
    let with_server =
        |line: &str| config_for(&fake, "").replace("[server]\n", &format!("[server]\n{line}\n"));
    let with_section =
        |section: &str, line: &str| config_for(&fake, &format!("[{section}]\n{line}\n"));
    let with_secret_file = |path: &Path| {
        fake_config(
            &fake,
            &format!(
                "[tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret_file = \"{}\"\n",
                path.display()
            ),
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "2^61 connections",
            with_server("max_connections = 2305843009213693952"),
            "server.max_connections",
        ),
        (
            "huge shutdown grace",
            with_server(&format!("shutdown_grace = \"{huge}\"")),
            "server.shutdown_grace",
        ),
        (
            "huge header timeout",
            with_server(&format!("header_read_timeout = \"{huge}\"")),
            "server.header_read_timeout",
        ),
        (
            "huge replay body",
            with_server("max_replay_body = \"16EiB\""),
            "server.max_replay_body",
        ),
        (
            "huge header size",
            with_server("max_header_bytes = \"1TiB\""),
            "server.max_header_bytes",
        ),
        (
            "huge upstream timeout",
            config_for(&fake, "").replace(
                "[upstream]\n",
                &format!("[upstream]\ntimeout = \"{huge}\"\n"),
            ),
            "upstream.timeout",
        ),
        (
            "huge connect timeout",
            config_for(&fake, "").replace(
                "[upstream]\n",
                &format!("[upstream]\nconnect_timeout = \"{huge}\"\n"),
            ),
            "upstream.connect_timeout",
        ),
        (
            "huge wait",
            with_section("refresh", &format!("wait_timeout = \"{huge}\"")),
            "refresh.wait_timeout",
        ),
        (
            "huge token timeout",
            with_section("refresh", &format!("token_timeout = \"{huge}\"")),
            "refresh.token_timeout",
        ),
        (
            "huge backoff",
            with_section("refresh", &format!("max_backoff = \"{huge}\"")),
            "refresh.max_backoff",
        ),
        (
            "huge rejected backoff",
            with_section("refresh", &format!("rejected_backoff = \"{huge}\"")),
            "refresh.rejected_backoff",
        ),
        (
            "secret file /dev/zero",
            with_secret_file(Path::new("/dev/zero")),
            "tenants.main.client_secret_file",
        ),
        (
            "secret file a FIFO",
            with_secret_file(&fifo),
            "tenants.main.client_secret_file",
        ),
        (
            "secret file of 200 MB",
            with_secret_file(&big),
            "tenants.main.client_secret_file",
        ),
        (
            "CA file /dev/zero",
            config_for(&fake, "").replace("[upstream]\n", "[upstream]\nca_file = \"/dev/zero\"\n"),
            "upstream.ca_file",
        ),
        (
            "CA file of 200 MB",
            config_for(&fake, "").replace(
                "[upstream]\n",
                &format!("[upstream]\nca_file = \"{}\"\n", big.display()),
            ),
            "upstream.ca_file",
        ),
        (
            "admin token a FIFO",
            with_server(&format!("admin_token_file = \"{}\"", fifo.display())),
            "server.admin_token_file",
        ),
    ];
    for (what, text, key) in cases {
        let path = write(d, "bad.toml", &text);
        let path = path.to_str().unwrap();
        assert_config_error(what, &["--config", path], key).await;
        assert_config_error(what, &["check-config", "--config", path], key).await;
    }
    // The configuration file itself.
    for (what, path) in [
        ("config /dev/zero", Path::new("/dev/zero")),
        ("config a FIFO", &fifo),
    ] {
        assert_config_error(
            what,
            &["--config", path.to_str().unwrap()],
            path.to_str().unwrap(),
        )
        .await;
    }
}

#[tokio::test]
async fn a_secret_mounted_through_kubernetes_symlinks_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..2025_01_01_00_00_00.1")).unwrap();
    write(
        &d.join("..2025_01_01_00_00_00.1"),
        "client_secret",
        "s3cret\n",
    );
    std::os::unix::fs::symlink("..2025_01_01_00_00_00.1", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/client_secret", d.join("client_secret")).unwrap();
    let path = write(
        d,
        "proxy.toml",
        &format!(
            "[tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"id\"\nclient_secret_file = \"{}\"\n",
            d.join("client_secret").display()
        ),
    );
    let (code, _, stderr) =
        run_to_end(&["check-config", "--config", path.to_str().unwrap()], &[]).await;
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test]
async fn consent_url_refuses_a_validity_that_would_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    let path = write(
        dir.path(),
        "proxy.toml",
        &format!(
            "[store]\npath = \"{}\"\n[tenants.acme]\ngrant = \"refresh_token\"\nclient_id = \"id\"\nclient_secret = \"s\"\nredirect_uri = \"https://app.example.com/cb\"\n",
            store.display()
        ),
    );
    let (code, _, stderr) = run_to_end(
        &[
            "consent-url",
            "--config",
            path.to_str().unwrap(),
            "--tenant",
            "acme",
            "--valid-for",
            "300000000000years",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("--valid-for"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `check-config`'s output, fed back to `check-config`, passes and prints
/// the same; no inline secret appears anywhere. Returns the printed config.
async fn round_trip(dir: &Path, config: &Path, env: &[(&str, &str)], secrets: &[&str]) -> String {
    let (code, printed, stderr) =
        run_to_end(&["check-config", "--config", config.to_str().unwrap()], env).await;
    assert_eq!(code, 0, "{stderr}");
    let again = write(dir, "printed.toml", &printed);
    let (code, reprinted, stderr2) =
        run_to_end(&["check-config", "--config", again.to_str().unwrap()], &[]).await;
    assert_eq!(code, 0, "the printed config fails: {stderr2}\n{printed}");
    assert_eq!(reprinted, printed, "printing is stable");
    for s in secrets {
        for out in [&printed, &stderr, &stderr2] {
            assert!(!out.contains(s), "{s} shown:\n{out}");
        }
    }
    printed
}

#[tokio::test]
async fn check_config_prints_every_key_and_its_output_passes_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let ca = write(d, "ca.pem", &ca.cert.pem());
    let file_secret = write(d, "secret", "file-secret-value\n");
    let (ca, file_secret, store) = (
        ca.display().to_string(),
        file_secret.display().to_string(),
        d.join("tokens.json").display().to_string(),
    );
    let secrets = [
        "inline-client-secret",
        "inline-signing-secret",
        "inline-seed-refresh-token",
        "inline-admin-token-0123",
        "file-secret-value",
    ];
    // Inline and file forms of each secret, across two configurations.
    let every_key = |inline: bool| {
        let (pick, other) = if inline { ("", "_file") } else { ("_file", "") };
        let value = |inline_value: &str, is_file: bool| {
            if is_file {
                file_secret.clone()
            } else {
                inline_value.to_owned()
            }
        };
        format!(
            "[server]\nlisten = \"127.0.0.1:18080\"\nadmin_listen = \"0.0.0.0:19090\"\n\
             tenant_header = \"X-Tenant\"\ndefault_tenant = \"main\"\nmax_replay_body = \"2MiB\"\n\
             shutdown_grace = \"15s\"\nallowed_clients = [\"127.0.0.0/8\", \"::1/128\", \"10.1.2.0/24\"]\n\
             workers = 3\nmax_connections = 500\nmax_header_bytes = \"32KiB\"\nheader_read_timeout = \"1m 30s\"\n\
             admin_token{pick} = \"{admin}\"\n\
             [upstream]\nurl = \"https://api.criteo.com/base/\"\ntoken_url = \"https://auth.example.com/oauth2/token\"\n\
             consent_url = \"https://consent.criteo.com/request\"\nconnect_timeout = \"2s 500ms\"\ntimeout = \"90s\"\n\
             ca_file = \"{ca}\"\n\
             [refresh]\nat_fraction = 0.75\nwait_timeout = \"3s\"\ntoken_timeout = \"7s\"\nmax_backoff = \"1m\"\n\
             rejected_backoff = \"10m\"\nlazy = true\n\
             [store]\npath = \"{store}\"\n\
             [consent]\nsigning_key = \"public-signing-key\"\nsigning_secret{pick} = \"{signing}\"\n\
             [tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret{pick} = \"{client}\"\n\
             [tenants.\"acme.fr\"]\ngrant = \"refresh_token\"\nclient_id = 1234\nclient_secret{other} = \"{client2}\"\n\
             redirect_uri = \"https://app.example.com/criteo/callback\"\nrefresh_token{pick} = \"{seed}\"\n\
             [tenants.bare]\ngrant = \"refresh_token\"\nclient_id = \"bare-id\"\nclient_secret = \"inline-client-secret\"\n\
             redirect_uri = \"http://127.0.0.1:9090/oauth/callback\"\n",
            admin = value("inline-admin-token-0123", !inline),
            signing = value("inline-signing-secret", !inline),
            client = value("inline-client-secret", !inline),
            client2 = value("inline-client-secret", inline),
            seed = value("inline-seed-refresh-token", !inline),
        )
    };
    for inline in [true, false] {
        let path = write(d, "every.toml", &every_key(inline));
        let printed = round_trip(d, &path, &[], &secrets).await;
        for shown in [
            "redirect_uri = \"https://app.example.com/criteo/callback\"",
            "redirect_uri = \"http://127.0.0.1:9090/oauth/callback\"",
            "signing_key = \"public-signing-key\"",
            "[tenants.\"acme.fr\"]",
            "client_id = \"1234\"",
            "max_replay_body = 2097152",
            "header_read_timeout = \"1m 30s\"",
            "lazy = true",
            &format!("ca_file = \"{ca}\""),
            &format!("path = \"{store}\""),
        ] {
            assert!(printed.contains(shown), "{shown} missing:\n{printed}");
        }
        let forms: &[&str] = if inline {
            &[
                "admin_token = \"<redacted>\"",
                "signing_secret = \"<redacted>\"",
                "refresh_token = \"<redacted>\"",
            ]
        } else {
            &[
                "admin_token_file = ",
                "signing_secret_file = ",
                "refresh_token_file = ",
            ]
        };
        for shown in forms {
            assert!(printed.contains(shown), "{shown} missing:\n{printed}");
        }
    }
}

#[tokio::test]
async fn plain_http_to_a_host_that_is_not_loopback_is_warned_about_at_start() {
    let dir = tempfile::tempdir().unwrap();
    // Lazy tenants: nothing is ever sent to these hosts (.invalid never
    // resolves anyway).
    let text = "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                [upstream]\nurl = \"http://criteo-upstream.invalid\"\ntoken_url = \"http://criteo-token.invalid/oauth2/token\"\n\
                [refresh]\nlazy = true\n\
                [tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"id\"\nclient_secret = \"s\"\n";
    let path = write(dir.path(), "proxy.toml", text);
    let mut proxy = Running::start(&path, "info").await;
    let logs = proxy.all_logs();
    for key in ["upstream.url", "upstream.token_url"] {
        let line = logs
            .lines()
            .find(|l| l.contains(&format!("{key} is plain http://")))
            .unwrap_or_else(|| panic!("no warning about {key}: {logs}"));
        assert!(line.contains("\"level\":\"WARN\""), "{line}");
    }
    proxy.signal("-TERM");
    assert_eq!(proxy.wait_exit().await, 0);

    // The stand-in on loopback is plain http:// too, and fine.
    let fake = FakeCriteo::start().await;
    let path = write(dir.path(), "local.toml", &config_for(&fake, ""));
    let mut proxy = Running::start(&path, "info").await;
    assert!(!proxy.all_logs().contains("is plain http://"));
    proxy.signal("-TERM");
    assert_eq!(proxy.wait_exit().await, 0);
}

#[tokio::test]
async fn sigterm_just_after_start_still_drains_and_exits_zero() {
    let fake = FakeCriteo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "proxy.toml", &config_for(&fake, ""));
    // The race is narrow: try it a few times.
    for _ in 0..5 {
        let mut proxy = Running::start(&path, "info").await;
        proxy.signal("-TERM");
        assert_eq!(proxy.wait_exit().await, 0, "{}", proxy.all_logs());
    }
}
