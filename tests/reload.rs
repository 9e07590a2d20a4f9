//! Hot reload with the real binary: SIGHUP, a Kubernetes-style secret swap,
//! and an invalid configuration kept out.

mod support;

use std::path::Path;
use std::time::Duration;

use support::process::{MAIN, OTHER, Running, fake_config, status, write};
use support::{FakeCriteo, client};

fn config(fake: &FakeCriteo, tenants: &str) -> String {
    fake_config(fake, tenants)
}

/// Waits for the n-th log line with this message.
async fn wait_nth(proxy: &mut Running, message: &str, n: usize) {
    let wait = async {
        loop {
            let count = proxy
                .all_logs()
                .lines()
                .filter(|l| l.contains(&format!("\"message\":\"{message}\"")))
                .count();
            if count >= n {
                return;
            }
            proxy.next_line().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("no {message:?} #{n}"));
}

fn rewrite(path: &Path, text: &str) {
    // Written beside and renamed over, as editors and config managers do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn sighup_adds_and_removes_tenants_and_keeps_an_invalid_config_out() {
    let fake = FakeCriteo::builder()
        .client("other-id", "other-secret")
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "proxy.toml", &config(&fake, MAIN));
    let mut proxy = Running::start(&path, "info").await;
    proxy.wait_for_message("access token obtained").await;
    assert_eq!(status(&proxy, "other").await, 400);

    // Add a tenant.
    rewrite(&path, &config(&fake, &format!("{MAIN}{OTHER}")));
    proxy.signal("-HUP");
    wait_nth(&mut proxy, "configuration reloaded", 1).await;
    assert_eq!(status(&proxy, "other").await, 200);
    assert_eq!(status(&proxy, "main").await, 200);
    let tokens_before = fake.token_requests();

    // An invalid configuration is refused; the running one keeps serving.
    rewrite(&path, "[server\nlisten = ");
    proxy.signal("-HUP");
    wait_nth(
        &mut proxy,
        "configuration reload rejected; the running configuration keeps serving",
        1,
    )
    .await;
    assert_eq!(status(&proxy, "other").await, 200);
    assert_eq!(status(&proxy, "main").await, 200);
    assert_eq!(
        fake.token_requests(),
        tokens_before,
        "unchanged tenants keep their tokens"
    );

    // Remove one. (The rewrite alone may reload it too: counted before.)
    let reloads = proxy
        .all_logs()
        .lines()
        .filter(|l| l.contains("\"message\":\"configuration reloaded\""))
        .count();
    rewrite(
        &path,
        &config(&fake, OTHER).replace("default_tenant = \"main\"", "default_tenant = \"other\""),
    );
    proxy.signal("-HUP");
    wait_nth(&mut proxy, "configuration reloaded", reloads + 1).await;
    assert_eq!(
        status(&proxy, "main").await,
        400,
        "a removed tenant is unknown"
    );
    assert_eq!(status(&proxy, "other").await, 200);

    proxy.signal("-TERM");
    assert_eq!(proxy.wait_exit().await, 0);
}

#[tokio::test]
async fn a_swapped_secret_file_unsticks_a_tenant_with_rejected_credentials() {
    let fake = FakeCriteo::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Kubernetes' layout: secret -> ..data/secret, ..data -> ..2026_a
    let a = dir.path().join("..2026_a");
    std::fs::create_dir(&a).unwrap();
    std::fs::write(a.join("client_secret"), "wrong-secret\n").unwrap();
    std::os::unix::fs::symlink("..2026_a", dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/client_secret", dir.path().join("client_secret")).unwrap();
    let tenant = format!(
        "[tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret_file = \"{}\"\n",
        dir.path().join("client_secret").display()
    );
    let path = write(dir.path(), "proxy.toml", &config(&fake, &tenant));
    let mut proxy = Running::start(&path, "info").await;
    fake.wait_token_requests(1, Duration::from_secs(10)).await;
    proxy
        .wait_for_message(
            "token endpoint rejected this tenant's credentials; fix client_id/client_secret",
        )
        .await;
    assert_eq!(status(&proxy, "main").await, 503);
    proxy
        .wait_for_message("watching the configuration and the files it names for changes")
        .await;

    // The new secret arrives the way the kubelet writes it: a new folder,
    // then one atomic rename of the ..data link.
    let b = dir.path().join("..2026_b");
    std::fs::create_dir(&b).unwrap();
    std::fs::write(b.join("client_secret"), "main-secret\n").unwrap();
    std::os::unix::fs::symlink("..2026_b", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();

    wait_nth(&mut proxy, "configuration reloaded", 1).await;
    proxy.wait_for_message("access token obtained").await;
    assert_eq!(
        status(&proxy, "main").await,
        200,
        "no restart, no five-minute wait"
    );
    proxy.signal("-TERM");
    assert_eq!(proxy.wait_exit().await, 0);
}

#[tokio::test]
async fn a_reload_during_a_slow_token_request_holds_up_neither_healthz_nor_new_connections() {
    let fake = FakeCriteo::builder()
        .client("other-id", "other-secret")
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "proxy.toml", &config(&fake, MAIN));
    let mut proxy = Running::start(&path, "info").await;
    proxy.wait_for_message("access token obtained").await;

    // The stimulus: every token request from now on takes 4 s.
    fake.set_token_delay(Duration::from_secs(4));
    let (requests, answers) = (fake.token_requests(), fake.answers_sent());
    rewrite(&path, &config(&fake, &format!("{MAIN}{OTHER}")));
    proxy.signal("-HUP");
    // The added tenant's first token request is now held by the stand-in.
    fake.wait_token_requests(requests + 1, Duration::from_secs(20))
        .await;

    let answered = async {
        let healthz = client()
            .get(format!("{}/healthz", proxy.admin))
            .send()
            .await
            .unwrap()
            .status();
        (healthz.as_u16(), status(&proxy, "main").await)
    };
    let (healthz, main) = tokio::time::timeout(Duration::from_secs(30), answered)
        .await
        .expect("answers at all");
    assert_eq!((healthz, main), (200, 200));
    assert_eq!(
        fake.answers_sent(),
        answers,
        "/healthz and a new proxy connection answered while the token request was still in flight"
    );
    proxy.signal("-TERM");
    assert_eq!(proxy.wait_exit().await, 0);
}

#[tokio::test]
async fn a_removed_tenant_leaves_the_metrics_on_reload() {
    let fake = FakeCriteo::builder()
        .client("other-id", "other-secret")
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "proxy.toml",
        &config(&fake, &format!("{MAIN}{OTHER}")),
    );
    let mut proxy = Running::start(&path, "info").await;
    assert_eq!(status(&proxy, "main").await, 200);
    assert_eq!(status(&proxy, "other").await, 200);
    let admin = proxy.admin.clone();
    let metrics = || async {
        client()
            .get(format!("{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert!(metrics().await.contains("tenant=\"main\""));

    rewrite(
        &path,
        &config(&fake, OTHER).replace("default_tenant = \"main\"", "default_tenant = \"other\""),
    );
    proxy.signal("-HUP");
    wait_nth(&mut proxy, "configuration reloaded", 1).await;
    let after = metrics().await;
    assert!(!after.contains("tenant=\"main\""), "{after}");
    assert!(after.contains("tenant=\"other\""));
    proxy.signal("-TERM");
    assert_eq!(proxy.wait_exit().await, 0);
}
