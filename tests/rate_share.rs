//! Replicas sharing a PostgreSQL store share each tenant's rate limit:
//! three real binaries on one real database, one client-credentials
//! tenant paced to exactly the stand-in's limit, loaded on all three at
//! once. Without the shared store the same load gets 429s from Criteo.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use support::postgres::Postgres;
use support::process::{Running, write};
use support::{FakeCriteo, client};

const ID: &str = "acme-id";
const SECRET: &str = "acme-secret";
/// The stand-in's limit and the tenant's: 12 calls in any 2 s window.
const CALLS: usize = 12;
const WINDOW: Duration = Duration::from_secs(2);

fn config(fake: &FakeCriteo, db: Option<&Postgres>) -> String {
    let store = db
        .map(|db| format!("[store]\nurl = \"{}\"\n", db.url()))
        .unwrap_or_default();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
default_tenant = "acme"

[upstream]
url = "{url}"
token_url = "{token_url}"

{store}
[rate_limit]
max_wait = "60s"

[tenants.acme]
grant = "client_credentials"
client_id = "{ID}"
client_secret = "{SECRET}"
rate_limit = "{CALLS}/2s"
"#,
        url = fake.url(),
        token_url = fake.token_url(),
    )
}

async fn fake() -> FakeCriteo {
    FakeCriteo::builder()
        .client(ID, SECRET)
        .rate_limit(CALLS, WINDOW)
        .start()
        .await
}

async fn start(fake: &FakeCriteo, db: Option<&Postgres>, dir: &tempfile::TempDir) -> Vec<Running> {
    let path = write(dir.path(), "proxy.toml", &config(fake, db));
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Running::start(&path, "info").await);
    }
    replicas
}

async fn acme(replica: &Running) -> Value {
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

/// Waits (polling `/tenants`, at most 20 s) until acme's share is `share`.
async fn wait_share(replica: &Running, share: &str) {
    let wait = async {
        while acme(replica).await["rate_limit"]["share"] != share {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("acme's share never became {share} on {}", replica.admin));
}

/// Three clients per replica, each sending one request after another,
/// on all replicas at once for three windows: (answers, answers not 200).
async fn load(replicas: &[Running]) -> (usize, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut tasks = Vec::new();
    for r in replicas {
        for _ in 0..3 {
            let (stop, sent, failed) = (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&failed));
            let url = format!("{}/x", r.proxy);
            tasks.push(tokio::spawn(async move {
                let http = client();
                while !stop.load(Ordering::Relaxed) {
                    let status = http.get(&url).send().await.map(|r| r.status());
                    sent.fetch_add(1, Ordering::Relaxed);
                    if !matches!(status, Ok(s) if s == 200) {
                        eprintln!("{url}: {status:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    tokio::time::sleep(3 * WINDOW).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_under_load_together_stay_under_the_shared_limit() {
    let Some(db) = tokio::task::spawn_blocking(Postgres::start).await.unwrap() else {
        return;
    };
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let replicas = start(&fake, Some(&db), &dir).await;
    for r in &replicas {
        wait_share(r, "1/3").await;
    }
    let (sent, failed) = load(&replicas).await;
    assert_eq!(failed, 0, "every client is answered 200 ({sent} sent)");
    assert_eq!(fake.rate_limited(), 0, "Criteo answered 429 ({sent} sent)");
    // They did go on: about the limit, shared.
    assert!(sent >= CALLS, "only {sent} answers in three windows");

    // One replica stops: the two left take its share.
    let mut replicas = replicas;
    let mut gone = replicas.pop().unwrap();
    gone.signal("-TERM");
    assert_eq!(gone.wait_exit().await, 0);
    for r in &replicas {
        wait_share(r, "1/2").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_shared_store_the_same_load_gets_429s_from_criteo() {
    let fake = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let replicas = start(&fake, None, &dir).await;
    for r in &replicas {
        wait_share(r, "1/1").await;
    }
    // Criteo answers 429s (each replica then pauses and replays, so the
    // clients may still end 200: what the share avoids is Criteo's 429s).
    let (sent, _failed) = load(&replicas).await;
    assert!(
        fake.rate_limited() > 0,
        "three replicas each at the whole limit: {sent} sent, {} 429 from Criteo",
        fake.rate_limited()
    );
}
