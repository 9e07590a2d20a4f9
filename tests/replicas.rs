//! Several replicas sharing one PostgreSQL store (the real binary, a real
//! PostgreSQL started by the test, the in-process stand-in for Criteo with
//! single-use rotating refresh tokens and 2 s access tokens).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use support::postgres::Postgres;
use support::process::{Running, command, free_port, write};
use support::{FakeCriteo, client};

const ACME_ID: &str = "acme-id";
const ACME_SECRET: &str = "acme-secret";

/// One replica's config: its own admin port, everything else shared
/// (the consent callback goes to `callback_admin`).
fn config(
    fake: &FakeCriteo,
    db: &Postgres,
    admin: &str,
    callback_admin: &str,
    seed: Option<&str>,
) -> String {
    let seed = seed
        .map(|s| format!("refresh_token = \"{s}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "{admin}"
default_tenant = "acme"

[upstream]
url = "{url}"
token_url = "{token_url}"
consent_url = "{url}/request"

[refresh]
min_token_lifetime = "1s"

[store]
url = "{db}"
lease = "1s"
poll_interval = "200ms"

[tenants.acme]
grant = "refresh_token"
client_id = "{ACME_ID}"
client_secret = "{ACME_SECRET}"
redirect_uri = "http://{callback_admin}/oauth/callback"
{seed}"#,
        url = fake.url(),
        token_url = fake.token_url(),
        db = db.url(),
    )
}

struct Cluster {
    _dir: tempfile::TempDir,
    callback_admin: String,
    configs: Vec<std::path::PathBuf>,
    replicas: Vec<Running>,
}

impl Cluster {
    async fn start(fake: &FakeCriteo, db: &Postgres, n: usize, seed: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let admins: Vec<String> = (0..n).map(|_| free_port()).collect();
        let configs: Vec<_> = admins
            .iter()
            .enumerate()
            .map(|(i, admin)| {
                write(
                    dir.path(),
                    &format!("replica-{i}.toml"),
                    &config(fake, db, admin, &admins[0], seed),
                )
            })
            .collect();
        let mut replicas = Vec::new();
        for c in &configs {
            replicas.push(Running::start(c, "info").await);
        }
        Self {
            _dir: dir,
            callback_admin: admins[0].clone(),
            configs,
            replicas,
        }
    }

    /// Starts one more replica, its admin on a port of its own.
    async fn add(&mut self, fake: &FakeCriteo, db: &Postgres, seed: Option<&str>) {
        let n = self.configs.len();
        let admin = free_port();
        let callback = self.callback_admin.clone();
        let path = write(
            self._dir.path(),
            &format!("replica-{n}.toml"),
            &config(fake, db, &admin, &callback, seed),
        );
        self.replicas.push(Running::start(&path, "info").await);
        self.configs.push(path);
    }

    /// Replaces replica `i` (after a kill) with a fresh process.
    async fn restart(&mut self, i: usize) {
        self.replicas[i] = Running::start(&self.configs[i], "info").await;
    }
}

async fn tenant(replica: &Running) -> Value {
    let v: Value = client()
        .get(format!("{}/tenants", replica.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["tenants"][0].clone()
}

/// Waits (polling `/tenants`, at most 20 s) until `pred` holds for acme.
async fn wait_tenant(replica: &Running, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let wait = async {
        loop {
            let t = tenant(replica).await;
            if pred(&t) {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("acme never became {what} on {}", replica.admin))
}

fn ready(t: &Value) -> bool {
    t["state"] == "ready" && t["has_token"] == true
}

/// Requests sent round-robin to `targets` until stopped; counts answers
/// other than 200.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(targets: Vec<String>, clients: usize) -> Self {
        let (stop, sent, failed) = Default::default();
        let mut load = Load {
            stop,
            sent,
            failed,
            tasks: Vec::new(),
        };
        for c in 0..clients {
            let targets = targets.clone();
            let (stop, sent, failed) = (
                Arc::clone(&load.stop),
                Arc::clone(&load.sent),
                Arc::clone(&load.failed),
            );
            load.tasks.push(tokio::spawn(async move {
                let http = client();
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let target = &targets[i % targets.len()];
                    i += 1;
                    let status = http
                        .get(format!("{target}/x"))
                        .send()
                        .await
                        .map(|r| r.status());
                    sent.fetch_add(1, Ordering::Relaxed);
                    if !matches!(status, Ok(s) if s == 200) {
                        eprintln!("{target}: {status:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        load
    }

    /// Stops, and returns (sent, failed).
    async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

fn refresh_grants(fake: &FakeCriteo) -> usize {
    fake.token_forms()
        .iter()
        .filter(|f| f["grant_type"] == "refresh_token")
        .count()
}

async fn fake(lifetime: Duration) -> FakeCriteo {
    FakeCriteo::builder()
        .client(ACME_ID, ACME_SECRET)
        .expires_in(lifetime)
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_under_load_rotate_about_once_per_token_lifetime_between_them() {
    let Some(db) = Postgres::start() else { return };
    let fake = fake(Duration::from_secs(2)).await;
    let seed = fake.issue_refresh_token(ACME_ID);
    let cluster = Cluster::start(&fake, &db, 3, Some(&seed)).await;
    for r in &cluster.replicas {
        wait_tenant(r, "ready", ready).await;
    }
    let before = refresh_grants(&fake);
    let targets = cluster.replicas.iter().map(|r| r.proxy.clone()).collect();
    let load = Load::start(targets, 6);
    // Eight seconds of 2 s tokens: renewed at ~1.5 s, about five
    // rotations in all, whichever replica makes them.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (sent, failed) = load.stop().await;
    let rotations = refresh_grants(&fake) - before;
    assert!(sent > 100, "load ran: {sent}");
    assert_eq!(failed, 0, "every answer is 200 ({sent} sent)");
    assert_eq!(
        fake.spent_presented(),
        0,
        "no spent refresh token presented"
    );
    // One replica alone would make ~5; three each on their own, ~15.
    assert!(
        (3..=9).contains(&rotations),
        "{rotations} rotations in 8 s of 2 s tokens across three replicas"
    );
    let here: Vec<bool> = futures_join(&cluster.replicas).await;
    assert_eq!(
        here.iter().filter(|h| **h).count(),
        1,
        "one replica made the last rotation: {here:?}"
    );
}

async fn futures_join(replicas: &[Running]) -> Vec<bool> {
    let mut out = Vec::new();
    for r in replicas {
        out.push(tenant(r).await["refreshing_here"] == true);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_on_every_replica_retires_the_shared_token_once() {
    let Some(db) = Postgres::start() else { return };
    let fake = fake(Duration::from_secs(60)).await;
    let seed = fake.issue_refresh_token(ACME_ID);
    let cluster = Cluster::start(&fake, &db, 3, Some(&seed)).await;
    for r in &cluster.replicas {
        wait_tenant(r, "ready", ready).await;
    }
    let before = refresh_grants(&fake);
    fake.revoke_all_tokens();
    for r in &cluster.replicas {
        let resp = client().get(format!("{}/x", r.proxy)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "retried with a fresh token");
    }
    assert_eq!(
        refresh_grants(&fake) - before,
        1,
        "one rotation for three 401s"
    );
    assert_eq!(fake.spent_presented(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_refreshing_replica_again_and_again_loses_nothing() {
    let Some(db) = Postgres::start() else { return };
    let fake = fake(Duration::from_secs(2)).await;
    let seed = fake.issue_refresh_token(ACME_ID);
    let mut cluster = Cluster::start(&fake, &db, 3, Some(&seed)).await;
    for r in &cluster.replicas {
        wait_tenant(r, "ready", ready).await;
    }
    for round in 0..3 {
        // The replica that made the latest rotation.
        let mut leader = None;
        for (i, r) in cluster.replicas.iter().enumerate() {
            if tenant(r).await["refreshing_here"] == true {
                leader = Some(i);
            }
        }
        let leader = leader.unwrap_or(round % 3);
        let survivors: Vec<String> = (0..3)
            .filter(|i| *i != leader)
            .map(|i| cluster.replicas[i].proxy.clone())
            .collect();
        let load = Load::start(survivors, 4);
        // Killed while holding a token request, before the stand-in
        // answers it, or between rotations.
        let seen = fake.token_requests();
        if round % 2 == 0 {
            fake.set_token_delay(Duration::from_millis(300));
            fake.wait_token_requests(seen + 1, Duration::from_secs(10))
                .await;
        } else {
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        cluster.replicas[leader].kill9().await;
        fake.set_token_delay(Duration::ZERO);
        // Two token lifetimes on the survivors alone.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (sent, failed) = load.stop().await;
        assert!(sent > 20, "round {round}: load ran ({sent})");
        assert_eq!(
            failed, 0,
            "round {round}: the survivors answered every request"
        );
        assert_eq!(
            fake.spent_presented(),
            0,
            "round {round}: no spent token presented"
        );
        cluster.restart(leader).await;
        wait_tenant(&cluster.replicas[leader], "ready", ready).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_paused_past_its_lease_loses_it_and_nothing_is_lost() {
    let Some(db) = Postgres::start() else { return };
    let fake = fake(Duration::from_secs(3)).await;
    let seed = fake.issue_refresh_token(ACME_ID);
    // One replica for now: the rotation about to be held is surely its own.
    let mut cluster = Cluster::start(&fake, &db, 1, Some(&seed)).await;
    wait_tenant(&cluster.replicas[0], "ready", ready).await;
    // Its next rotation is held by the stand-in for 2.5 s before it is
    // spent and answered; the replica is paused meanwhile, past its 1 s
    // lease, and a second replica comes up.
    fake.set_token_delay(Duration::from_millis(2500));
    let seen = fake.token_requests();
    fake.wait_token_requests(seen + 1, Duration::from_secs(10))
        .await;
    cluster.replicas[0].signal("-STOP");
    cluster.add(&fake, &db, Some(&seed)).await;
    // The second takes the lease over and presents the same token, after
    // the paused one's request (held as long) was spent.
    fake.wait_token_requests(seen + 2, Duration::from_secs(10))
        .await;
    fake.set_token_delay(Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.replicas[0].signal("-CONT");
    // Both end up serving the refresh token chain Criteo kept.
    for r in &cluster.replicas {
        wait_tenant(r, "ready", ready).await;
        let resp = client().get(format!("{}/x", r.proxy)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    // And the chain goes on: the next rotations succeed.
    let after = refresh_grants(&fake);
    fake.wait_answers_sent(fake.answers_sent() + 2, Duration::from_secs(10))
        .await;
    assert!(refresh_grants(&fake) > after);
    for r in &cluster.replicas {
        let t = wait_tenant(r, "ready", ready).await;
        assert_eq!(t["state"], "ready", "{t}");
    }
    // The second replica presented the token the paused one had in flight
    // (Criteo had spent it): its refusal, written first, did not outweigh
    // the paused replica's rotation of that same token.
    assert_eq!(fake.spent_presented(), 1);
    assert_stored_is_criteos_newest(&db, &fake);
}

/// Nothing lost: the store holds the refresh token Criteo would accept
/// next (checked while no rotation is in flight: the stand-in answers at once).
fn assert_stored_is_criteos_newest(db: &Postgres, fake: &FakeCriteo) {
    for _ in 0..50 {
        let stored = db.sql("SELECT refresh_token FROM criteo_proxy_tenants WHERE name = 'acme'");
        if Some(stored.trim().to_owned()) == fake.newest_refresh_token(ACME_ID) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the stored refresh token is not the newest Criteo issued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_on_one_replica_serves_on_all_and_revocation_reaches_all() {
    let Some(db) = Postgres::start() else { return };
    let fake = fake(Duration::from_secs(60)).await;
    let cluster = Cluster::start(&fake, &db, 3, None).await;
    for r in &cluster.replicas {
        wait_tenant(r, "consent_required", |t| t["state"] == "consent_required").await;
    }
    let out = command()
        .args([
            "consent-url",
            "--config",
            cluster.configs[0].to_str().unwrap(),
            "--tenant",
            "acme",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8(out.stdout).unwrap();
    // The advertiser consents: the stand-in sends them to replica 0.
    let page = client().get(url.trim()).send().await.unwrap();
    assert_eq!(page.status(), 200);
    for r in &cluster.replicas {
        wait_tenant(r, "ready", ready).await;
        let resp = client().get(format!("{}/x", r.proxy)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(
        refresh_grants(&fake),
        0,
        "the others served the onboarded token"
    );

    // Criteo revokes the consent; replica 1 finds out on a 401.
    fake.revoke_refresh_tokens(ACME_ID);
    fake.revoke_all_tokens();
    let resp = client()
        .get(format!("{}/x", cluster.replicas[1].proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503, "the tenant needs a new consent");
    for r in &cluster.replicas {
        wait_tenant(r, "consent_required", |t| t["state"] == "consent_required").await;
    }
    let presented = fake.refresh_presented().len();
    for r in &cluster.replicas {
        let _ = client().get(format!("{}/x", r.proxy)).send().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        fake.refresh_presented().len(),
        presented,
        "no replica keeps calling the token endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_down_for_longer_than_a_token_lifetime_loses_nothing() {
    let Some(mut db) = Postgres::start() else {
        return;
    };
    let fake = fake(Duration::from_secs(2)).await;
    let seed = fake.issue_refresh_token(ACME_ID);
    let cluster = Cluster::start(&fake, &db, 2, Some(&seed)).await;
    for r in &cluster.replicas {
        wait_tenant(r, "ready", ready).await;
    }
    db.stop();
    // Tokens held keep serving.
    for r in &cluster.replicas {
        let resp = client().get(format!("{}/x", r.proxy)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    // The store's trouble shows.
    let problem = async {
        loop {
            let v: Value = client()
                .get(format!("{}/readyz", cluster.replicas[0].admin))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if v["store"]["ok"] == false {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let readyz = tokio::time::timeout(Duration::from_secs(20), problem)
        .await
        .expect("the store problem shows");
    assert!(
        readyz["store"]["error"]
            .as_str()
            .unwrap()
            .contains("database"),
        "{readyz}"
    );
    // Longer than a token's lifetime: no rotation that could not be saved.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fake.spent_presented(), 0);
    let metrics = client()
        .get(format!("{}/metrics", cluster.replicas[0].admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("criteo_proxy_store_errors_total"),
        "{metrics}"
    );

    db.start_again();
    for r in &cluster.replicas {
        wait_tenant(r, "ready", ready).await;
        let resp = client().get(format!("{}/x", r.proxy)).send().await.unwrap();
        assert_eq!(
            resp.status(),
            200,
            "serving again once the database is back"
        );
    }
    let before = refresh_grants(&fake);
    fake.wait_answers_sent(fake.answers_sent() + 1, Duration::from_secs(10))
        .await;
    assert!(refresh_grants(&fake) > before, "rotation resumed");
    assert_eq!(fake.spent_presented(), 0, "nothing lost");
    assert_stored_is_criteos_newest(&db, &fake);
}
