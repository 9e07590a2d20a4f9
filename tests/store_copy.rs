//! `criteo-token-proxy store copy`: the real binary moving tenants between
//! token stores, as an operator runs it before going from one replica to
//! many.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use serde_json::json;
use sha2::{Digest, Sha256};
use support::process::{Running, command, write};
use support::stored::stored;
use support::{FakeCriteo, ProxyBuilder, TestProxy};

const ACME_ID: &str = "acme-id";
const ACME_SECRET: &str = "acme-secret";

async fn fake() -> FakeCriteo {
    FakeCriteo::builder()
        .client(ACME_ID, ACME_SECRET)
        .start()
        .await
}

/// A proxy whose default tenant is the refresh-token tenant `acme`.
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
fn acme_config(fake: &FakeCriteo, dir: &Path, store: &Path) -> PathBuf {
    let toml = acme(fake, store, None)
        .toml()
        .replace("{admin}", "http://127.0.0.1:9");
    write(dir, "proxy.toml", &toml)
}

/// A JSON token store as earlier releases wrote it (no sequence numbers,
/// no client_id), mode 0600.
fn old_json_store(path: &Path, tenants: &[(&str, &str, bool)], seeds: &[&str]) -> Vec<u8> {
    let mut all = serde_json::Map::new();
    for (name, token, rejected) in tenants {
        all.insert(
            (*name).to_owned(),
            json!({"refresh_token": token, "rejected": rejected, "updated_at": "2026-11-25T00:00:00Z"}),
        );
    }
    let hashes: Vec<String> = seeds
        .iter()
        .map(|s| hex::encode(Sha256::digest(s.as_bytes())))
        .collect();
    let bytes = json!({"version": 1, "tenants": all, "presented_seeds": hashes})
        .to_string()
        .into_bytes();
    fs::write(path, &bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    bytes
}

/// Runs `store copy` with `args`.
async fn copy(args: &[&str]) -> Output {
    let run = command().args(["store", "copy"]).args(args).output();
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the copy ends")
        .unwrap()
}

async fn copy_paths(from: &Path, to: &Path, more: &[&str]) -> Output {
    let mut args = vec![
        "--from",
        from.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    copy(&args).await
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn client_id(db: &Path, tenant: &str) -> String {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.query_row(
        "SELECT client_id FROM tenants WHERE name = ?1",
        [tenant],
        |r| r.get(0),
    )
    .unwrap()
}

/// The folder's file names, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_json_store_of_an_earlier_release_is_copied_into_a_new_database_and_left_as_it_was() {
    let fake = fake().await;
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let src = src_dir.path().join("tokens.json");
    let before = old_json_store(
        &src,
        &[
            ("acme", "rt-acme-secret", false),
            ("gone", "rt-gone-secret", true),
        ],
        &["seed-spent"],
    );
    let dst = dst_dir.path().join("tokens.db");
    let config = acme_config(&fake, dst_dir.path(), &dst);

    let out = copy_paths(&src, &dst, &["--config", config.to_str().unwrap()]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("acme (client_id acme-id)"), "{stdout}");
    assert!(
        stdout.contains("gone (no client_id recorded, consent required"),
        "{stdout}"
    );
    assert!(
        stdout.contains("copied 2 tenant(s) and 1 presented seed(s)"),
        "{stdout}"
    );
    assert!(
        !format!("{stdout}{stderr}").contains("secret"),
        "a token was printed"
    );

    assert_eq!(stored(&dst, "acme"), Some(("rt-acme-secret".into(), false)));
    assert_eq!(stored(&dst, "gone"), Some(("rt-gone-secret".into(), true)));
    assert_eq!(client_id(&dst, "acme"), ACME_ID, "taken from --config");
    assert_eq!(
        fs::metadata(&dst).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Not imported, converted nor backed up: only the copy's lock file.
    assert_eq!(fs::read(&src).unwrap(), before);
    assert_eq!(names(src_dir.path()), ["tokens.json", "tokens.json.lock"]);
}

#[tokio::test]
async fn a_proxy_started_on_the_copy_presents_the_copied_token_and_rotates_it() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("tokens.db"), dir.path().join("copy.db"));
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, &src, Some(&seed)).start().await;
    proxy.wait_ready().await;
    proxy.stop().await;
    let copied = stored_token(&src);
    let before = fs::read(&src).unwrap();

    let out = copy_paths(&src, &dst, &[]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains("copied  acme (client_id acme-id)"),
        "{stdout}"
    );
    assert!(!stdout.contains(&copied) && !stderr.contains(&copied));
    assert_eq!(fs::read(&src).unwrap(), before, "the source is unchanged");

    // No seed this time: only the copied token can serve.
    let proxy = acme(&fake, &dst, None).start().await;
    proxy.wait_ready().await;
    assert_eq!(proxy.get("/x").await.status(), 200);
    proxy.stop().await;
    assert_eq!(fake.refresh_presented(), vec![seed, copied]);
    assert_eq!(fake.spent_presented(), 0, "a spent token was presented");
    assert_eq!(
        Some(stored_token(&dst)),
        fake.newest_refresh_token(ACME_ID),
        "the copy holds the rotated token"
    );
}

#[tokio::test]
async fn presented_seeds_come_along_so_a_spent_seed_is_not_presented_again() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("tokens.db"), dir.path().join("copy.db"));
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, &src, Some(&seed)).start().await;
    proxy.wait_ready().await;
    proxy.stop().await;
    let rotated = stored_token(&src);

    let out = copy_paths(&src, &dst, &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);

    // The chain is lost (consent revoked); the config still names the
    // seed, spent before the copy.
    fake.revoke_refresh_tokens(ACME_ID);
    let proxy = acme(&fake, &dst, Some(&seed)).start().await;
    fake.wait_token_requests(2, Duration::from_secs(5)).await;
    let resp = proxy.get("/x").await;
    assert_eq!(resp.status(), 503);
    proxy.stop().await;
    assert_eq!(fake.refresh_presented(), vec![seed, rotated]);
    assert_eq!(fake.spent_presented(), 0, "the spent seed was presented");
}

#[tokio::test]
async fn the_copy_is_refused_while_a_proxy_holds_the_source() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("tokens.db"), dir.path().join("copy.db"));
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, &src, Some(&seed)).start().await;
    proxy.wait_ready().await;
    proxy.stop().await;
    let config = acme_config(&fake, dir.path(), &src);
    let mut running = Running::start(&config, "info").await;
    running.wait_for_message("token store opened").await;

    let out = copy_paths(&src, &dst, &[]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(src.to_str().unwrap()) && stderr.contains("stop the proxy first"),
        "{stderr}"
    );
    assert!(!dst.exists(), "nothing was written");

    running.signal("-TERM");
    assert_eq!(running.wait_exit().await, 0);
    let out = copy_paths(&src, &dst, &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    assert_eq!(stored_token(&dst), stored_token(&src));
}

#[tokio::test]
async fn a_tenant_the_destination_holds_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (src, held, dst) = (
        dir.path().join("tokens.json"),
        dir.path().join("held.json"),
        dir.path().join("tokens.db"),
    );
    old_json_store(&held, &[("acme", "rt-dst-acme", false)], &[]);
    let out = copy_paths(&held, &dst, &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    old_json_store(
        &src,
        &[
            ("acme", "rt-src-acme", false),
            ("beta", "rt-src-beta", false),
        ],
        &[],
    );

    let out = copy_paths(&src, &dst, &[]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("already holds tenant(s) acme") && stderr.contains("--skip-existing"),
        "{stderr}"
    );
    assert_eq!(stored_token(&dst), "rt-dst-acme");
    assert_eq!(stored(&dst, "beta"), None, "nothing was copied");

    let out = copy_paths(&src, &dst, &["--skip-existing"]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("skipped acme"), "{stdout}");
    assert!(stdout.contains("copied 1 tenant(s)"), "{stdout}");
    assert_eq!(stored_token(&dst), "rt-dst-acme", "left as it was");
    assert_eq!(stored(&dst, "beta"), Some(("rt-src-beta".into(), false)));
}

#[tokio::test]
async fn unusable_arguments_exit_64_and_an_invalid_config_78_with_a_message_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("tokens.json");
    old_json_store(&json, &[("acme", "rt-acme", false)], &[]);
    let other = dir.path().join("other.json");
    old_json_store(&other, &[], &[]);
    let junk = write(dir.path(), "junk", "neither JSON nor SQLite");
    let db = dir.path().join("tokens.db");
    let (json_s, junk_s, db_s) = (
        json.to_str().unwrap(),
        junk.to_str().unwrap(),
        db.to_str().unwrap(),
    );
    let missing = dir.path().join("missing.db");
    let cases: [(&[&str], &str); 5] = [
        (
            &["--from", missing.to_str().unwrap(), "--to", db_s],
            "no such file",
        ),
        (&["--from", junk_s, "--to", db_s], "unknown format"),
        (&["--from", json_s, "--to", other.to_str().unwrap()], "--to"),
        (&["--from", json_s, "--to", json_s], "the same store"),
        (
            &[
                "--from",
                json_s,
                "--to",
                "postgres://copier:hunter2@127.0.0.1/tokens",
            ],
            "records no client_id for tenant(s) acme",
        ),
    ];
    for (args, expected) in cases {
        let out = copy(args).await;
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("hunter2"), "the password was printed");
    }
    let bad = write(dir.path(), "bad.toml", "[server]\nlisten = \"nowhere\"\n");
    let out = copy(&[
        "--config",
        bad.to_str().unwrap(),
        "--from",
        json_s,
        "--to",
        db_s,
    ])
    .await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("server.listen"), "{stderr}");
    assert!(!db.exists(), "nothing was created");
}

/// `acme`'s stored refresh token.
fn stored_token(db: &Path) -> String {
    support::stored::stored_token(db, "acme")
}

/// The same tenant on the shared store at `url`.
fn acme_shared(fake: &FakeCriteo, url: &str) -> ProxyBuilder {
    TestProxy::builder(fake)
        .without_main()
        .server("default_tenant = \"acme\"")
        .tenant(
            "acme",
            &format!(
                "grant = \"refresh_token\"\nclient_id = \"{ACME_ID}\"\nclient_secret = \"{ACME_SECRET}\"\n\
                 redirect_uri = \"{{admin}}/oauth/callback\"\n"
            ),
        )
        .section(&format!("[store]\nurl = \"{url}\""))
}

#[tokio::test]
async fn from_one_replica_to_many_and_back_through_postgresql() {
    let Some(db) = support::postgres::Postgres::start() else {
        return;
    };
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let (src, back) = (dir.path().join("tokens.db"), dir.path().join("back.db"));
    let seed = fake.issue_refresh_token(ACME_ID);
    let proxy = acme(&fake, &src, Some(&seed)).start().await;
    proxy.wait_ready().await;
    proxy.stop().await;
    let copied = stored_token(&src);

    // One replica's SQLite store into the shared one.
    let url = db.url();
    let out = copy(&["--from", src.to_str().unwrap(), "--to", &url]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("acme"), "{stdout}");
    assert!(!stdout.contains(&copied) && !stderr.contains(&copied));

    // A replica on the shared store serves the copied token, no consent asked.
    let replica = acme_shared(&fake, &url).start().await;
    replica.wait_ready().await;
    assert_eq!(replica.get("/x").await.status(), 200);

    // While a proxy uses the database, it is not copied from.
    let out = copy(&["--from", &url, "--to", back.to_str().unwrap()]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("stop the proxy first"), "{stderr}");
    assert!(!back.exists(), "nothing was written");
    replica.stop().await;

    // And back to one replica.
    let out = copy(&["--from", &url, "--to", back.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    assert_eq!(
        Some(stored_token(&back)),
        fake.newest_refresh_token(ACME_ID)
    );
    assert_eq!(fake.refresh_presented(), vec![seed, copied]);
    assert_eq!(fake.spent_presented(), 0);
}
