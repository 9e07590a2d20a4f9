//! The shared store against a real PostgreSQL (`harness`, the same code
//! as `tests/support/postgres.rs`): what only a shared store does. The
//! contract every store keeps runs on it too (`contract_tests.rs`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};

use super::harness::Postgres;
use super::{PgOptions, PgStore};
use crate::config::SecretSource;
use crate::metrics::{Metrics, StoreErrors};
use crate::store::contract::{Access, Key, TokenStore};
use crate::store::{Generation, Put, PutError};

const ACME: Key<'static> = Key {
    name: "acme",
    client_id: "app-1",
};

/// Long enough that no test sees a lease run out unless it means to.
const LONG_LEASE: Duration = Duration::from_secs(60);

fn options(pg: &Postgres, lease: Duration) -> PgOptions {
    PgOptions {
        url: SecretSource::Inline(SecretString::from(pg.url())),
        lease,
        poll_interval: Duration::from_millis(200),
        errors: StoreErrors::default(),
    }
}

async fn store(pg: &Postgres, lease: Duration) -> PgStore {
    PgStore::connect(options(pg, lease), Duration::from_secs(20))
        .await
        .expect("connected")
}

/// A database and a store on it; `None` (said loudly) without PostgreSQL.
pub(crate) async fn database() -> Option<(Postgres, PgStore)> {
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()?;
    let store = store(&pg, LONG_LEASE).await;
    Some((pg, store))
}

fn put<'a>(token: &'a SecretString, access: Option<&'a Access>) -> Put<'a> {
    Put {
        refresh_token: token,
        rejected: false,
        adopt_seed: false,
        access,
    }
}

fn rejection(token: &SecretString) -> Put<'_> {
    Put {
        rejected: true,
        ..put(token, None)
    }
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within 10s"))
}

#[tokio::test]
async fn the_access_token_is_stored_with_the_refresh_token() {
    let Some((_pg, store)) = database().await else {
        return;
    };
    assert!(store.shared());
    let (rt, at) = (SecretString::from("rt-1"), SecretString::from("at-1"));
    let requested_at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    let access = Access {
        token: at,
        requested_at,
        lifetime: Duration::from_secs(900),
    };
    let g = store
        .put(ACME, Generation::NONE, put(&rt, Some(&access)))
        .await
        .unwrap();
    let read = store.get(ACME).await.unwrap().unwrap();
    let got = read.access.expect("the access token");
    assert_eq!(got.token.expose_secret(), "at-1");
    assert_eq!(got.requested_at, requested_at);
    assert_eq!(got.lifetime, Duration::from_secs(900));
    // A put without one clears it: it came with the older refresh token.
    store.put(ACME, g, put(&rt, None)).await.unwrap();
    assert!(store.get(ACME).await.unwrap().unwrap().access.is_none());
    assert!(!format!("{store:?}").contains("at-1"));
}

#[tokio::test]
async fn a_rotation_read_at_g_wins_over_a_rejection_written_against_g_only() {
    let Some((_pg, store)) = database().await else {
        return;
    };
    let (old, new) = (SecretString::from("rt-old"), SecretString::from("rt-new"));
    let g = store
        .put(ACME, Generation::NONE, put(&old, None))
        .await
        .unwrap();
    // Replica B presented rt-old second and wrote the rejection first.
    let rejected = store.put(ACME, g, rejection(&old)).await.unwrap();
    // Replica A, which got rt-new for it, still writes: its token is the
    // only valid one.
    let rotated = store.put(ACME, g, put(&new, None)).await.unwrap();
    let read = store.get(ACME).await.unwrap().unwrap();
    assert!(!read.rejected);
    assert_eq!(read.refresh_token.expose_secret(), "rt-new");
    assert!(rotated.0 > rejected.0);

    // But a rotation never overwrites another rotation from g.
    let again = store.put(ACME, g, put(&old, None)).await.unwrap_err();
    assert!(
        matches!(again, PutError::Stale { current, .. } if current == rotated),
        "{again}"
    );
    // Nor a rejection another rejection's successor.
    let late = store.put(ACME, rejected, put(&old, None)).await;
    assert!(matches!(late, Err(PutError::Stale { .. })));
}

#[tokio::test]
async fn a_write_by_one_replica_reaches_the_others_feed_with_or_without_notify() {
    let Some((pg, a)) = database().await else {
        return;
    };
    let b = store(&pg, LONG_LEASE).await;
    let mut feed = b.changes();
    let rt = SecretString::from("rt-1");
    let g = a.put(ACME, Generation::NONE, put(&rt, None)).await.unwrap();
    let changed = within("the notified change", feed.next()).await.unwrap();
    assert_eq!((&*changed.name, &*changed.client_id), ("acme", "app-1"));

    // No NOTIFY any more: the polling still finds it.
    pg.sql("ALTER TABLE criteo_proxy_tenants DISABLE TRIGGER criteo_proxy_changed");
    a.put(ACME, g, put(&rt, None)).await.unwrap();
    let changed = within("the polled change", feed.next()).await.unwrap();
    assert_eq!(&*changed.name, "acme");
}

#[tokio::test]
async fn a_lease_held_by_one_replica_is_refused_to_another_until_dropped() {
    let Some((pg, a)) = database().await else {
        return;
    };
    let b = store(&pg, Duration::from_secs(1)).await;
    let held = a.lease(ACME).await.unwrap();
    let refused = b.lease(ACME).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("another replica holds the refresh lease of tenant acme"),
        "{refused}"
    );
    let mut waiting = std::pin::pin!(b.lease(ACME));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), waiting.as_mut())
            .await
            .is_err()
    );
    drop(held);
    within("the released lease", waiting).await.unwrap();
}

#[tokio::test]
async fn two_leases_taken_in_one_process_exclude_each_other() {
    let Some((_pg, a)) = database().await else {
        return;
    };
    let _held = a.lease(ACME).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), a.lease(ACME))
            .await
            .is_err(),
        "a second grant waits"
    );
}

#[tokio::test]
async fn a_lease_is_free_at_once_when_its_holders_session_dies() {
    let Some((pg, a)) = database().await else {
        return;
    };
    let b = store(&pg, LONG_LEASE).await;
    let held = a.lease(ACME).await.unwrap();
    drop(a); // its connection closes, as with kill -9
    within("the dead holder's lease", b.lease(ACME))
        .await
        .unwrap();
    drop(held);

    // The session killed under a live store: it reconnects, the lease is
    // free for others at once all the same.
    let c = store(&pg, LONG_LEASE).await;
    let other = Key {
        name: "other",
        client_id: "app-1",
    };
    let _held = c.lease(other).await.unwrap();
    pg.sql("SELECT pg_terminate_backend(holder_pid) FROM criteo_proxy_leases WHERE name = 'other'");
    within("the killed session's lease", b.lease(other))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_lease_not_renewed_is_taken_once_it_runs_out() {
    let Some((pg, _store)) = database().await else {
        return;
    };
    let short = Duration::from_secs(1);
    let (a, b) = (store(&pg, short).await, store(&pg, short).await);
    a.pause_lease_renewal(); // paused, partitioned: alive, silent
    let _held = a.lease(ACME).await.unwrap();
    within("the expired lease", b.lease(ACME)).await.unwrap();
}

#[tokio::test]
async fn a_lease_is_renewed_while_held() {
    let Some((pg, _store)) = database().await else {
        return;
    };
    let short = Duration::from_secs(1);
    let (a, b) = (store(&pg, short).await, store(&pg, short).await);
    let _held = a.lease(ACME).await.unwrap();
    // b waits at most 1 s + 3 s: the lease outlives that only if renewed.
    let refused = b.lease(ACME).await.unwrap_err();
    assert!(refused.to_string().contains("another replica"), "{refused}");
}

#[tokio::test]
async fn a_database_of_a_newer_schema_is_refused() {
    let Some((pg, _store)) = database().await else {
        return;
    };
    pg.sql("UPDATE criteo_proxy_schema SET version = 99");
    let err = PgStore::connect(options(&pg, LONG_LEASE), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(err.contains("schema version 99"), "{err}");
    assert!(err.contains("newer release"), "{err}");
}

#[tokio::test]
async fn a_stopped_database_fails_operations_and_a_restarted_one_serves_again() {
    let Some(mut pg) = tokio::task::spawn_blocking(Postgres::start).await.unwrap() else {
        return;
    };
    let metrics = Metrics::new(prometheus::Registry::new());
    let store = PgStore::connect(
        PgOptions {
            errors: metrics.store_errors(),
            url: SecretSource::Inline(SecretString::from(
                pg.url().replace("postgres@", "postgres:hunter2@"),
            )),
            ..options(&pg, LONG_LEASE)
        },
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert!(!store.location().contains("hunter2"));
    let rt = SecretString::from("rt-1");
    let g = store
        .put(ACME, Generation::NONE, put(&rt, None))
        .await
        .unwrap();
    assert_eq!(store.problem(), None);

    let pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .unwrap();
    let mut live = store.shared.client.subscribe();
    within("the lost connection", live.wait_for(Option::is_none))
        .await
        .unwrap();
    let failed = store.put(ACME, g, put(&rt, None)).await.unwrap_err();
    assert!(matches!(failed, PutError::Io(_)), "{failed}");
    assert!(store.get(ACME).await.is_err());
    assert!(store.lease(ACME).await.is_err(), "no waiting while down");
    let problem = store.problem().expect("a problem while down");
    assert!(problem.contains("127.0.0.1"), "{problem}");
    assert!(!problem.contains("hunter2"), "{problem}");
    let text = String::from_utf8(metrics.render()).unwrap();
    assert!(
        text.contains("criteo_proxy_store_errors_total{op=\"put\"}"),
        "{text}"
    );

    let mut pg = pg;
    let pg = tokio::task::spawn_blocking(move || {
        pg.start_again();
        pg
    })
    .await
    .unwrap();
    within("the new connection", live.wait_for(Option::is_some))
        .await
        .unwrap();
    assert_eq!(store.problem(), None);
    let read = store.get(ACME).await.unwrap().unwrap();
    assert_eq!(read.generation, g);
    store.put(ACME, g, put(&rt, None)).await.unwrap();
    drop(pg);
}

#[tokio::test]
async fn a_url_file_is_read_at_connection() {
    let Some(pg) = tokio::task::spawn_blocking(Postgres::start).await.unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("store_url");
    std::fs::write(&file, format!("{}\n", pg.url())).unwrap();
    let store = PgStore::connect(
        PgOptions {
            url: SecretSource::File(file),
            ..options(&pg, LONG_LEASE)
        },
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert!(store.all().await.unwrap().is_empty());
    let _ = Arc::new(store);
}

#[tokio::test]
async fn tls_is_used_for_require_and_checked_for_verify_full() {
    let Some(mut pg) = tokio::task::spawn_blocking(Postgres::start).await.unwrap() else {
        return;
    };
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (ck.cert.pem(), ck.signing_key.serialize_pem());
    let mut pg = tokio::task::spawn_blocking(move || {
        pg.enable_tls(&cert, &key);
        pg
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, ck.cert.pem()).unwrap();
    let at = |query: &str| {
        let url = format!("postgres://postgres@localhost:{}/criteo?{query}", pg.port());
        PgOptions {
            url: SecretSource::Inline(SecretString::from(url)),
            ..options(&pg, LONG_LEASE)
        }
    };
    let wait = Duration::from_secs(10);
    let encrypted = "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'criteo-token-proxy' AND s.ssl";

    // require: encrypted, the certificate (self-signed) not checked.
    let require = PgStore::connect(at("sslmode=require"), wait).await.unwrap();
    assert_eq!(pg.sql(encrypted), "1");
    drop(require);

    // verify-full: checked against sslrootcert, host name included.
    let query = format!("sslmode=verify-full&sslrootcert={}", root.display());
    let verified = PgStore::connect(at(&query), wait).await.unwrap();
    assert!(verified.get(ACME).await.unwrap().is_none());
    drop(verified);
    let err = PgStore::connect(at("sslmode=verify-full"), wait)
        .await
        .unwrap_err();
    assert!(
        err.contains("cannot reach the token store database at localhost"),
        "{err}"
    );
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    pg.stop();
}
