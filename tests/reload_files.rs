//! Hot reload with no SIGHUP: every way a configuration or secret file is
//! changed on disk is heard and reloaded (edited in place, replaced by
//! rename, deleted and created again, a Kubernetes ConfigMap's `..data`
//! link swapped), and a file whose folder vanished is polled for until it
//! is back.

mod support;

use std::path::Path;

use support::FakeCriteo;
use support::process::{MAIN, OTHER, Running, fake_config, status, write};

const WATCHING: &str = "watching the configuration and the files it names for changes";

async fn fake() -> FakeCriteo {
    FakeCriteo::builder()
        .client("other-id", "other-secret")
        .start()
        .await
}

/// Starts the proxy on the configuration at `path` (tenant `main` only),
/// lets `change` add tenant `other` on disk, and checks that it serves
/// without a signal.
async fn heard_without_a_signal(fake: &FakeCriteo, path: &Path, change: impl FnOnce(&str)) {
    let mut proxy = Running::start(path, "info").await;
    proxy.wait_for_message("access token obtained").await;
    proxy.wait_for_message(WATCHING).await;
    assert_eq!(status(&proxy, "other").await, 400);

    change(&fake_config(fake, &format!("{MAIN}{OTHER}")));
    proxy.wait_for_message("configuration reloaded").await;
    assert_eq!(status(&proxy, "other").await, 200);
    assert_eq!(status(&proxy, "main").await, 200);
    proxy.signal("-TERM");
    assert_eq!(proxy.wait_exit().await, 0);
}

#[tokio::test]
async fn a_configuration_edited_in_place_is_reloaded() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "proxy.toml", &fake_config(&fake, MAIN));
    heard_without_a_signal(&fake, &path, |text| std::fs::write(&path, text).unwrap()).await;
}

#[tokio::test]
async fn a_configuration_replaced_by_rename_is_reloaded() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "proxy.toml", &fake_config(&fake, MAIN));
    heard_without_a_signal(&fake, &path, |text| {
        let tmp = dir.path().join(".proxy.toml.swp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_configuration_deleted_and_created_again_is_reloaded() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "proxy.toml", &fake_config(&fake, MAIN));
    heard_without_a_signal(&fake, &path, |text| {
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, text).unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_config_map_update_swapping_the_data_link_is_reloaded() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    // The kubelet's layout: proxy.toml -> ..data/proxy.toml, ..data -> ..2026_a
    let a = dir.path().join("..2026_a");
    std::fs::create_dir(&a).unwrap();
    write(&a, "proxy.toml", &fake_config(&fake, MAIN));
    std::os::unix::fs::symlink("..2026_a", dir.path().join("..data")).unwrap();
    let path = dir.path().join("proxy.toml");
    std::os::unix::fs::symlink("..data/proxy.toml", &path).unwrap();
    heard_without_a_signal(&fake, &path, |text| {
        // Its update: a new folder, one atomic rename of the ..data link,
        // then the old folder removed.
        let b = dir.path().join("..2026_b");
        std::fs::create_dir(&b).unwrap();
        write(&b, "proxy.toml", text);
        std::os::unix::fs::symlink("..2026_b", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        std::fs::remove_dir_all(&a).unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_secret_whose_folder_vanished_is_picked_up_when_it_is_back() {
    let fake = FakeCriteo::start().await;
    let (config_dir, secret_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let folder = secret_dir.path().join("criteo/current");
    std::fs::create_dir_all(&folder).unwrap();
    let secret = write(&folder, "client_secret", "wrong-secret\n");
    let tenant = format!(
        "[tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret_file = \"{}\"\n",
        secret.display()
    );
    let path = write(
        config_dir.path(),
        "proxy.toml",
        &fake_config(&fake, &tenant),
    );
    let mut proxy = Running::start(&path, "info").await;
    proxy
        .wait_for_message(
            "token endpoint rejected this tenant's credentials; fix client_id/client_secret",
        )
        .await;
    proxy.wait_for_message(WATCHING).await;

    // The folder goes (a reload now is refused: the secret is missing), and
    // nothing watched sees it come back: only polling can.
    std::fs::remove_dir_all(secret_dir.path().join("criteo")).unwrap();
    proxy
        .wait_for_message("configuration reload rejected; the running configuration keeps serving")
        .await;
    proxy
        .wait_for_message("cannot watch the files the configuration depends on for changes; checking them every 2s instead")
        .await;
    std::fs::create_dir_all(&folder).unwrap();
    write(&folder, "client_secret", "main-secret\n");

    proxy.wait_for_message("configuration reloaded").await;
    proxy
        .wait_for_message("the configuration's files can be watched again; polling stopped")
        .await;
    proxy.wait_for_message("access token obtained").await;
    assert_eq!(status(&proxy, "main").await, 200);
    proxy.signal("-TERM");
    assert_eq!(proxy.wait_exit().await, 0);
}
