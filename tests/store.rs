//! The token store on disk: what a crash leaves behind, what someone who
//! can write to its folder can plant there, and a symlinked `store.path`.

mod support;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use support::process::{Running, command, write};
use support::{FakeCriteo, ProxyBuilder, TestProxy};

const ACME_ID: &str = "acme-id";
const ACME_SECRET: &str = "acme-secret";

async fn fake() -> FakeCriteo {
    FakeCriteo::builder()
        .client(ACME_ID, ACME_SECRET)
        .start()
        .await
}

/// A proxy whose default tenant is the refresh-token tenant `acme`, its
/// store at `store`.
fn acme(fake: &FakeCriteo, store: &Path, seed: Option<&str>) -> ProxyBuilder {
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
        .section(&format!("[store]\npath = \"{}\"", store.display()))
}

/// The same, as a config file for the binary.
fn acme_toml(fake: &FakeCriteo, store: &Path) -> String {
    acme(fake, store, None)
        .toml()
        .replace("{admin}", "http://127.0.0.1:9")
}

fn stored_token(path: &Path) -> String {
    support::stored::stored_token(path, "acme")
}

/// The folder's file names, sorted; the backup of an imported JSON store
/// (`tokens.json.imported-<unix time>`) as `tokens.json.imported-*`. The
/// database's `-wal` and `-shm` files are part of the live database (SQLite
/// removes them at the last close, which may come just after a stop).
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with("-wal") && !n.ends_with("-shm"))
        .map(|n| match n.split_once(".imported-") {
            Some((stem, _)) => format!("{stem}.imported-*"),
            None => n,
        })
        .collect();
    names.sort();
    names
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

async fn status(proxy: &TestProxy) -> (u16, Option<String>) {
    let resp = proxy.get("/x").await;
    let error = resp
        .headers()
        .get("x-criteo-proxy-error")
        .map(|v| v.to_str().unwrap().to_owned());
    (resp.status().as_u16(), error)
}

/// A store folder with the given mode.
fn folder(dir: &Path, mode: u32) -> PathBuf {
    let f = dir.join("store");
    fs::create_dir(&f).unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
    f
}

/// Runs the binary on `config`, expecting it to exit at start.
async fn refused_start(config: &Path) -> std::process::Output {
    let run = command()
        .args(["--config", config.to_str().unwrap()])
        .output();
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the proxy refuses to start")
        .unwrap()
}

// === a kill between the temporary file and the rename ===

#[tokio::test]
async fn a_newer_token_left_in_a_temporary_file_is_used_at_start_and_the_file_removed() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, &store, Some(&seed)).start().await;
    proxy.wait_ready().await;
    proxy.stop().await;
    let newest = stored_token(&store);
    assert_eq!(Some(newest.clone()), fake.newest_refresh_token(ACME_ID));

    // An earlier release's JSON store as a kill leaves it after the new
    // file was written and synced, before the rename: the store file still
    // names the token just spent.
    let entry = |token: &str, seq: u64| {
        json!({"version": 1, "seq": seq, "tenants": {"acme": {
            "refresh_token": token, "rejected": false, "seq": seq, "updated_at": "2026-11-25T00:00:00Z"}}})
        .to_string()
    };
    fs::remove_file(&store).unwrap();
    fs::write(
        dir.path().join(".tokens.json.tmp.5e3c0d1f"),
        entry(&newest, 2),
    )
    .unwrap();
    fs::write(&store, entry(&seed, 1)).unwrap();

    let proxy = acme(&fake, &store, Some(&seed)).start().await;
    proxy.wait_ready().await;
    assert_eq!(fake.refresh_presented(), vec![seed, newest]);
    assert_eq!(fake.spent_presented(), 0, "a spent token was presented");
    assert_eq!(status(&proxy).await.0, 200);
    proxy.stop().await;
    assert_eq!(
        names(dir.path()),
        ["tokens.json", "tokens.json.imported-*", "tokens.json.lock"]
    );
    assert_eq!(
        Some(stored_token(&store)),
        fake.newest_refresh_token(ACME_ID)
    );
}

#[tokio::test]
async fn a_truncated_temporary_file_is_ignored_and_removed() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    let in_store = fake.issue_refresh_token(ACME_ID);
    let whole = json!({"version": 1, "seq": 1, "tenants": {"acme": {
        "refresh_token": in_store, "rejected": false, "seq": 1, "updated_at": "2026-11-25T00:00:00Z"}}})
    .to_string();
    fs::write(&store, &whole).unwrap();
    let cut = whole
        .replace(&in_store, "fake-refresh-999")
        .replace("\"seq\": 1", "\"seq\": 2");
    let leftover = dir.path().join(".tokens.json.tmp.00c0ffee");
    fs::write(&leftover, &cut[..cut.len() / 2]).unwrap();

    let proxy = acme(&fake, &store, None).start().await;
    proxy.wait_ready().await;
    assert_eq!(fake.refresh_presented(), vec![in_store]);
    assert!(!leftover.exists(), "the partial temporary file was removed");
    proxy.stop().await;
    assert_eq!(
        names(dir.path()),
        ["tokens.json", "tokens.json.imported-*", "tokens.json.lock"]
    );
}

// === a seed is presented once ===

#[tokio::test]
async fn a_spent_seed_is_not_presented_again_when_the_stored_token_is_refused() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, &store, Some(&seed)).start().await;
    proxy.wait_ready().await;
    proxy.stop().await;
    let rotated = stored_token(&store);

    // The chain is lost (here: the consent revoked); the config still
    // names the seed, spent at first start.
    fake.revoke_refresh_tokens(ACME_ID);
    let proxy = acme(&fake, &store, Some(&seed)).start().await;
    fake.wait_token_requests(2, Duration::from_secs(5)).await;
    assert_eq!(status(&proxy).await, (503, Some("consent_required".into())));
    assert_eq!(fake.refresh_presented(), vec![seed, rotated]);
    assert_eq!(fake.spent_presented(), 0, "the spent seed was presented");
}

#[tokio::test]
async fn a_spent_seed_is_not_presented_again_when_the_tenant_is_gone_from_the_store() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, &store, Some(&seed)).start().await;
    proxy.wait_ready().await;
    proxy.stop().await;

    // The tenant's entry is lost (removed by hand); the record of the
    // seeds presented is not.
    support::stored::remove(&store, "acme");
    let proxy = acme(&fake, &store, Some(&seed)).start().await;
    assert_eq!(status(&proxy).await, (503, Some("consent_required".into())));
    assert_eq!(fake.refresh_presented(), vec![seed]);
    assert_eq!(fake.spent_presented(), 0, "the spent seed was presented");
}

// === files someone else can plant ===

#[tokio::test]
async fn a_link_planted_at_the_old_temporary_name_is_not_followed() {
    let fake = FakeCriteo::builder()
        .client(ACME_ID, ACME_SECRET)
        .expires_in(Duration::from_secs(1))
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, &store, Some(&seed)).start().await;
    proxy.wait_ready().await;

    // Earlier releases wrote `.tokens.json.tmp.<pid>`; this server runs in
    // the test's process.
    let leak = dir.path().join("leak");
    let planted = dir
        .path()
        .join(format!(".tokens.json.tmp.{}", std::process::id()));
    symlink(&leak, &planted).unwrap();
    let after = fake.token_requests() + 2;
    fake.wait_token_requests(after, Duration::from_secs(10))
        .await; // rotations
    proxy.stop().await;
    assert!(
        !leak.exists(),
        "a token was written through the planted link"
    );
    assert!(fs::symlink_metadata(&store).unwrap().is_file());
    assert_eq!(mode(&store), 0o600);
    assert_eq!(
        Some(stored_token(&store)),
        fake.newest_refresh_token(ACME_ID)
    );

    // The next start removes what was planted in the store's name space.
    let proxy = acme(&fake, &store, Some(&seed)).start().await;
    proxy.wait_ready().await;
    proxy.stop().await;
    assert_eq!(names(dir.path()), ["tokens.json", "tokens.json.lock"]);
    assert_eq!(fake.spent_presented(), 0);
}

#[tokio::test]
async fn a_file_precreated_at_the_old_temporary_name_never_becomes_the_store() {
    let fake = FakeCriteo::builder()
        .client(ACME_ID, ACME_SECRET)
        .expires_in(Duration::from_secs(1))
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, &store, Some(&seed)).start().await;
    proxy.wait_ready().await;

    let planted = dir
        .path()
        .join(format!(".tokens.json.tmp.{}", std::process::id()));
    fs::write(&planted, "").unwrap();
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o666)).unwrap();
    let after = fake.token_requests() + 2;
    fake.wait_token_requests(after, Duration::from_secs(10))
        .await;
    proxy.stop().await;
    assert_eq!(mode(&store), 0o600, "the store stayed private");
    assert_eq!(
        fs::read(&planted).unwrap(),
        b"",
        "nothing was written to it"
    );
}

#[tokio::test]
async fn a_store_folder_writable_by_every_user_is_a_config_error() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let store = folder(dir.path(), 0o777).join("tokens.json");
    let config = write(dir.path(), "proxy.toml", &acme_toml(&fake, &store));
    let out = refused_start(&config).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("store.path") && stderr.contains("writable by every user"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_group_writable_store_folder_starts_with_a_warning() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let store = folder(dir.path(), 0o2770).join("tokens.json"); // as fsGroup mounts it
    let config = write(dir.path(), "proxy.toml", &acme_toml(&fake, &store));
    let mut proxy = Running::start(&config, "info").await;
    let warning = proxy
        .wait_for_message(
            "the token store's folder is writable by its group: its members can plant files there \
             (expected on a Kubernetes volume mounted with fsGroup; otherwise use chmod g-w)",
        )
        .await;
    assert_eq!(warning["level"], "WARN");
    proxy.signal("-TERM");
    assert_eq!(proxy.wait_exit().await, 0);
}

#[tokio::test]
async fn a_link_planted_as_the_lock_file_is_refused_not_followed() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let store = folder(dir.path(), 0o700).join("tokens.json");
    let target = dir.path().join("elsewhere");
    symlink(&target, store.with_file_name("tokens.json.lock")).unwrap();
    let config = write(dir.path(), "proxy.toml", &acme_toml(&fake, &store));
    let out = refused_start(&config).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("store.path") && stderr.contains("tokens.json.lock is a symbolic link"),
        "{stderr}"
    );
    assert!(!target.exists(), "the link was followed");
}

// === a symlinked store.path ===

#[tokio::test]
async fn a_symlinked_store_path_keeps_pointing_at_the_live_store() {
    let fake = FakeCriteo::builder()
        .client(ACME_ID, ACME_SECRET)
        .expires_in(Duration::from_secs(1))
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let volume = folder(dir.path(), 0o700);
    let target = volume.join("tokens.json");
    let in_store = fake.issue_refresh_token(ACME_ID);
    fs::write(
        &target,
        json!({"version": 1, "tenants": {"acme": {
            "refresh_token": in_store, "rejected": false, "updated_at": "2026-11-25T00:00:00Z"}}})
        .to_string(),
    )
    .unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
    let link = dir.path().join("tokens.json");
    symlink(&target, &link).unwrap();

    let proxy = acme(&fake, &link, None).start().await;
    proxy.wait_ready().await;
    fake.wait_token_requests(2, Duration::from_secs(10)).await; // a rotation
    proxy.stop().await;
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link is still a link"
    );
    assert_eq!(
        Some(stored_token(&target)),
        fake.newest_refresh_token(ACME_ID),
        "the target holds the newest token"
    );
    assert_eq!(fake.refresh_presented()[0], in_store);
    assert_eq!(
        names(&volume),
        ["tokens.json", "tokens.json.imported-*", "tokens.json.lock"]
    );
}

// === the SQLite database ===

#[tokio::test]
async fn a_json_store_of_an_earlier_release_is_imported_and_kept_as_a_backup() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    let in_store = fake.issue_refresh_token(ACME_ID);
    let seed = fake.issue_refresh_token(ACME_ID);
    // The format of earlier releases: no sequence numbers.
    let old = json!({"version": 1, "tenants": {
        "acme": {"refresh_token": in_store, "rejected": false, "updated_at": "2026-11-25T00:00:00Z"},
        "gone": {"refresh_token": "refused-long-ago", "rejected": true, "updated_at": "2026-11-25T00:00:00Z"}}})
    .to_string();
    fs::write(&store, &old).unwrap();
    fs::set_permissions(&store, fs::Permissions::from_mode(0o600)).unwrap();

    let proxy = acme(&fake, &store, Some(&seed)).start().await;
    proxy.wait_ready().await;
    assert_eq!(fake.refresh_presented(), vec![in_store], "the stored token");
    assert_eq!(status(&proxy).await.0, 200);
    proxy.stop().await;
    assert!(fs::read(&store).unwrap().starts_with(b"SQLite format 3\0"));
    assert_eq!(mode(&store), 0o600);
    assert_eq!(
        support::stored::stored(&store, "gone"),
        Some(("refused-long-ago".into(), true)),
        "every tenant came along, its rejected flag too"
    );
    assert_eq!(
        Some(stored_token(&store)),
        fake.newest_refresh_token(ACME_ID)
    );
    let backup = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("tokens.json.imported-"))
        .expect("the JSON store is kept as a backup");
    assert_eq!(fs::read_to_string(backup).unwrap(), old);
}

#[tokio::test]
async fn a_second_proxy_on_the_same_database_is_refused() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let store = folder(dir.path(), 0o700).join("tokens.db");
    let config = write(dir.path(), "proxy.toml", &acme_toml(&fake, &store));
    let mut first = Running::start(&config, "info").await;
    first.wait_for_message("token store opened").await;

    let out = refused_start(&config).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("store.path") && stderr.contains("in use by another criteo-token-proxy"),
        "{stderr}"
    );
    first.signal("-TERM");
    assert_eq!(first.wait_exit().await, 0);
}

#[tokio::test]
async fn a_corrupt_database_is_refused_and_left_untouched() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let store = folder(dir.path(), 0o700).join("tokens.db");
    let mut damaged = b"SQLite format 3\0".to_vec();
    damaged.extend_from_slice(&[0x5a; 8176]);
    fs::write(&store, &damaged).unwrap();
    let config = write(dir.path(), "proxy.toml", &acme_toml(&fake, &store));

    let out = refused_start(&config).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("store.path") && stderr.contains("is not a token store"),
        "{stderr}"
    );
    assert_eq!(fs::read(&store).unwrap(), damaged, "left as it was");
}
