//! Validation and loading, end to end: every bad key named.
#![allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error

use super::*;
use figment::Jail;
use secrecy::ExposeSecret;

const MINIMAL: &str = r#"
    [tenants.main]
    grant = "client_credentials"
    client_id = "id"
    client_secret = "s3cret"
"#;

#[test]
fn defaults_follow_the_design() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(c.server.tenant_header.as_str(), "x-criteo-tenant");
    assert_eq!(c.server.max_replay_body, 1024 * 1024);
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(20));
    assert_eq!(c.refresh.at_fraction, 0.8);
    assert_eq!(c.refresh.rotation_timeout, Duration::from_secs(120));
    assert_eq!(c.refresh.min_token_lifetime, Duration::from_secs(10));
    assert_eq!(c.upstream.url.as_str(), "https://api.criteo.com/");
}

#[test]
fn environment_overrides_the_file_with_double_underscore_nesting() {
    Jail::expect_with(|jail| {
        jail.create_file("proxy.toml", MINIMAL)?;
        jail.set_env("CRITEO_PROXY_SERVER__LISTEN", "127.0.0.1:18080");
        jail.set_env("CRITEO_PROXY_TENANTS__MAIN__CLIENT_ID", "12345");
        jail.set_env("CRITEO_PROXY_SERVER__MAX_REPLAY_BODY", "2MiB");
        let c = Config::load(Some(Path::new("proxy.toml"))).map_err(|e| e.to_string())?;
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:18080");
        assert_eq!(c.tenants[0].client_id, "12345");
        assert_eq!(c.server.max_replay_body, 2 * 1024 * 1024);
        Ok(())
    });
}

#[test]
fn secret_files_are_trimmed_and_must_not_be_empty() {
    Jail::expect_with(|jail| {
        jail.create_file("secret", "  s3cret\n")?;
        jail.create_file("empty", " \n")?;
        let ok = Config::from_toml(
            "[tenants.a]\ngrant = \"client_credentials\"\nclient_id = \"x\"\nclient_secret_file = \"secret\"\n",
        )
        .map_err(|e| e.to_string())?;
        let s = ok.tenants[0].client_secret.load().unwrap();
        assert_eq!(s.expose_secret(), "s3cret");
        let err = Config::from_toml(
            "[tenants.a]\ngrant = \"client_credentials\"\nclient_id = \"x\"\nclient_secret_file = \"empty\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tenants.a.client_secret_file"), "{err}");
        Ok(())
    });
}

#[test]
fn every_bad_key_is_named() {
    let err = Config::from_toml(
        r#"
        [server]
        default_tenant = "nobody"
        [refresh]
        at_fraction = 1.5
        token_timeout = "30s"
        rotation_timeout = "10s"
        min_token_lifetime = "0s"
        [tenants.a]
        grant = "client_credentials"
        [tenants.b]
        grant = "client_credentials"
        client_id = "x"
        "#,
    )
    .unwrap_err()
    .to_string();
    for key in [
        "server.default_tenant",
        "refresh.at_fraction",
        "refresh.rotation_timeout",
        "refresh.min_token_lifetime",
        "tenants.a.client_id",
        "tenants.a.client_secret",
        "tenants.b.client_secret",
    ] {
        assert!(err.contains(key), "{key} missing from {err}");
    }
}

#[test]
fn unknown_grant_and_unknown_keys_are_rejected_by_name() {
    let err = Config::from_toml("[tenants.a]\ngrant = \"password\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("tenants.a.grant"), "{err}");
    let err = Config::from_toml(&format!("{MINIMAL}\n[server]\nlisten_addr = \"x\"\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("listen_addr"), "{err}");
}

#[test]
fn values_that_would_crash_later_are_refused_by_name() {
    let huge = "300000000000years";
    let cases = [
        (
            "server",
            "max_connections = 2305843009213693952",
            "server.max_connections",
        ),
        (
            "server",
            "max_connections = 1000001",
            "server.max_connections",
        ),
        (
            "server",
            "max_replay_body = \"1EiB\"",
            "server.max_replay_body",
        ),
        (
            "server",
            "max_header_bytes = \"2MiB\"",
            "server.max_header_bytes",
        ),
        ("server", "shutdown_grace = \"2h\"", "server.shutdown_grace"),
        (
            "server",
            &format!("header_read_timeout = \"{huge}\""),
            "server.header_read_timeout",
        ),
        (
            "upstream",
            &format!("connect_timeout = \"{huge}\""),
            "upstream.connect_timeout",
        ),
        ("upstream", "timeout = \"25h\"", "upstream.timeout"),
        (
            "refresh",
            &format!("wait_timeout = \"{huge}\""),
            "refresh.wait_timeout",
        ),
        (
            "refresh",
            &format!("token_timeout = \"{huge}\""),
            "refresh.token_timeout",
        ),
        (
            "refresh",
            &format!("rotation_timeout = \"{huge}\""),
            "refresh.rotation_timeout",
        ),
        (
            "refresh",
            &format!("max_backoff = \"{huge}\""),
            "refresh.max_backoff",
        ),
        (
            "refresh",
            &format!("rejected_backoff = \"{huge}\""),
            "refresh.rejected_backoff",
        ),
    ];
    for (section, line, key) in cases {
        let err = Config::from_toml(&format!("{MINIMAL}\n[{section}]\n{line}\n"))
            .unwrap_err()
            .problems;
        assert_eq!(err.len(), 1, "{line}: {err:?}");
        assert!(err[0].starts_with(&format!("{key}: ")), "{line}: {err:?}");
    }
    // The bounds themselves are accepted.
    let ok = Config::from_toml(&format!(
        "{MINIMAL}\n[server]\nmax_connections = 1000000\nshutdown_grace = \"1h\"\n\
         max_replay_body = \"64MiB\"\nmax_header_bytes = \"1MiB\"\n\
         [refresh]\nrejected_backoff = \"1day\"\n"
    ));
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn plain_http_to_another_host_is_warned_about() {
    let warns = |url: &str| is_plain_http_to_another_host(&Url::parse(url).unwrap());
    for url in [
        "http://api.criteo.com",
        "http://10.0.0.1:8080",
        "http://[2001:db8::1]/",
        "http://localhost.example.com/",
    ] {
        assert!(warns(url), "{url}");
    }
    for url in [
        "https://api.criteo.com",
        "http://127.0.0.1:1",
        "http://127.0.0.2/",
        "http://[::1]:1/",
        "http://[::ffff:127.0.0.1]/",
        "http://localhost:9000/",
        "http://LOCALHOST./",
        "http://criteo.localhost/",
    ] {
        assert!(!warns(url), "{url}");
    }
    let c = Config::from_toml(&format!(
        "{MINIMAL}\n[upstream]\nurl = \"http://criteo.example\"\ntoken_url = \"http://127.0.0.1:1/t\"\n"
    ))
    .unwrap();
    let w = c.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("upstream.url is plain http:// to criteo.example"),
        "{w:?}"
    );
}

#[test]
fn the_admin_token_is_a_secret_inline_or_in_a_file() {
    Jail::expect_with(|jail| {
        jail.create_file("admin", "admin-token-from-a-file\n")?;
        let c = Config::from_toml(&format!(
            "{MINIMAL}\n[server]\nadmin_token_file = \"admin\"\n"
        ))
        .map_err(|e| e.to_string())?;
        let token = c.server.admin_token.as_ref().unwrap().load().unwrap();
        assert_eq!(token.expose_secret(), "admin-token-from-a-file");
        let c = Config::from_toml(&format!(
            "{MINIMAL}\n[server]\nadmin_token = \"inline-admin-token\"\n"
        ))
        .map_err(|e| e.to_string())?;
        assert!(!format!("{c:?}").contains("inline-admin-token"));
        let shown = c.redacted_toml().unwrap();
        assert!(shown.contains("admin_token = \"<redacted>\""), "{shown}");
        assert!(!shown.contains("inline-admin-token"));
        for (line, key) in [
            (
                "admin_token = \"x\"\nadmin_token_file = \"admin\"",
                "server.admin_token",
            ),
            ("admin_token = \"with space\"", "server.admin_token"),
            ("admin_token = \"  \"", "server.admin_token"),
            (
                "admin_token_file = \"/dev/zero\"",
                "server.admin_token_file",
            ),
        ] {
            let err = Config::from_toml(&format!("{MINIMAL}\n[server]\n{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(&format!("{key}: ")), "{line}: {err}");
        }
        Ok(())
    });
}

#[test]
fn connection_limits_and_timers_are_checked_by_name() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(c.server.max_connections, 256);
    assert_eq!(c.server.admin_max_connections, 64);
    assert_eq!(c.server.replay_budget, 32 * 1024 * 1024);
    assert_eq!(c.upstream.max_connections, 128);
    let err = Config::from_toml(&format!(
        "{MINIMAL}\n[server]\nadmin_max_connections = 0\nidle_timeout = \"0s\"\nbody_read_timeout = \"400days\"\n[upstream]\nmax_connections = 2000000\n"
    ))
    .unwrap_err()
    .to_string();
    for key in [
        "server.admin_max_connections",
        "server.idle_timeout",
        "server.body_read_timeout",
        "upstream.max_connections",
    ] {
        assert!(err.contains(key), "{key} missing from {err}");
    }
}

#[test]
fn debug_and_redacted_output_never_show_a_secret() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert!(!format!("{c:?}").contains("s3cret"));
    let shown = c.redacted_toml().unwrap();
    assert!(!shown.contains("s3cret"));
    assert!(shown.contains("<redacted>"));
    // The effective config is itself a valid config.
    let again = Config::from_toml(&shown).unwrap();
    assert_eq!(again.tenants[0].client_id, "id");
}

const REFRESH_TENANT: &str = r#"
    [tenants.acme]
    grant = "refresh_token"
    client_id = "id"
    client_secret = "s3cret"
    redirect_uri = "https://app.example.com/cb"
"#;

#[test]
fn the_store_is_a_path_or_a_url_never_both() {
    Jail::expect_with(|jail| {
        jail.create_file("store_url", "postgres://proxy:hunter2@db:5432/criteo\n")?;
        let url = "url = \"postgres://proxy:hunter2@db:5432/criteo?sslmode=verify-full\"";
        let c = Config::from_toml(&format!("[store]\n{url}\n{REFRESH_TENANT}")).unwrap();
        assert!(c.store.url.is_some() && c.store.path.is_none());
        assert_eq!(c.store.lease, Duration::from_secs(15));
        assert_eq!(c.store.poll_interval, Duration::from_secs(1));
        let c = Config::from_toml(&format!(
            "[store]\nurl_file = \"store_url\"\n{REFRESH_TENANT}"
        ))
        .unwrap();
        assert!(matches!(c.store.url, Some(SecretSource::File(_))));

        let two = format!("[store]\npath = \"tokens.db\"\n{url}\n{REFRESH_TENANT}");
        let err = Config::from_toml(&two).unwrap_err().to_string();
        assert!(
            err.contains("store.path") && err.contains("store.url"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        let two = format!("[store]\nurl_file = \"store_url\"\n{url}\n{REFRESH_TENANT}");
        let err = Config::from_toml(&two).unwrap_err().to_string();
        assert!(err.contains("store.url_file"), "{err}");

        let none = Config::from_toml(REFRESH_TENANT).unwrap_err().to_string();
        assert!(none.contains("store.url"), "{none}");
        Ok(())
    });
}

#[test]
fn a_malformed_store_url_is_named_without_its_password() {
    Jail::expect_with(|jail| {
        jail.create_file("store_url", "mysql://proxy:hunter2@db/criteo")?;
        for store in [
            "url = \"postgres://proxy:hunter2@db/criteo?sslmode=sometimes\"",
            "url = \"postgres://proxy:hunter2@db:99999/criteo\"",
            "url_file = \"store_url\"",
        ] {
            let err = Config::from_toml(&format!("[store]\n{store}\n{REFRESH_TENANT}"))
                .unwrap_err()
                .to_string();
            let key = store.split(' ').next().unwrap();
            assert!(err.contains(&format!("store.{key}:")), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        Ok(())
    });
}

#[test]
fn store_lease_and_poll_interval_are_bounded() {
    let err = Config::from_toml(&format!(
        "[store]\npath = \"x.db\"\nlease = \"500ms\"\npoll_interval = \"2m\"\n{MINIMAL}"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("store.lease: 500ms must be between 1s and 10m"),
        "{err}"
    );
    assert!(
        err.contains("store.poll_interval: 2m must be between"),
        "{err}"
    );
}

#[test]
fn check_config_shows_the_store_url_with_its_password_redacted() {
    let c = Config::from_toml(&format!(
        "[store]\nurl = \"postgres://proxy:hunter2@db:5432/criteo?sslmode=require\"\n{REFRESH_TENANT}"
    ))
    .unwrap();
    let text = c.redacted_toml().unwrap();
    assert!(
        text.contains("url = \"postgres://proxy:<redacted>@db:5432/criteo?sslmode=require\""),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!format!("{c:?}").contains("hunter2"));
    // Valid input again.
    Config::from_toml(&text).unwrap();
}
