//! The contract every store keeps, run against each implementation:
//! the JSON file, SQLite and, where PostgreSQL is installed, PostgreSQL.

use super::*;

/// What keeps a store's backing alive: its folder, or its database.
type Backing = Box<dyn std::any::Any>;

/// Each implementation on backing of its own: the JSON file store, the
/// SQLite database `store.path` opens, and (where PostgreSQL is
/// installed) the shared store on a database of its own.
async fn stores() -> Vec<(Backing, Arc<dyn TokenStore>)> {
    let (json, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let file: Arc<dyn TokenStore> =
        Arc::new(FileStore::open(&json.path().join("tokens.json")).unwrap());
    let sqlite = super::super::open(&db.path().join("tokens.db")).unwrap();
    assert!(format!("{sqlite:?}").contains("SqliteStore"));
    let mut all: Vec<(Backing, Arc<dyn TokenStore>)> =
        vec![(Box::new(json), file), (Box::new(db), sqlite)];
    if let Some((pg, store)) = super::super::postgres::tests::database().await {
        all.push((Box::new(pg), Arc::new(store)));
    }
    all
}

/// Whether `fut` is still pending after a while: it waits.
async fn waits<F: Future>(fut: Pin<&mut F>) -> bool {
    tokio::time::timeout(std::time::Duration::from_millis(500), fut)
        .await
        .is_err()
}

fn put(token: &SecretString) -> Put<'_> {
    Put {
        refresh_token: token,
        rejected: false,
        adopt_seed: false,
        access: None,
    }
}

const ACME: Key<'static> = Key {
    name: "acme",
    client_id: "app-1",
};
const OTHER: Key<'static> = Key {
    name: "other",
    client_id: "app-1",
};

/// Whether `fut` is ready at its first poll.
async fn ready_now<F: Future>(fut: Pin<&mut F>) -> bool {
    tokio::select! {
        biased;
        _ = fut => true,
        () = std::future::ready(()) => false,
    }
}

#[tokio::test]
async fn a_put_on_the_generation_last_read_is_taken_and_one_on_a_stale_one_refused() {
    for (_backing, store) in stores().await {
        assert!(store.get(ACME).await.unwrap().is_none());
        let (one, two) = (SecretString::from("rt-1"), SecretString::from("rt-2"));
        let first = store.put(ACME, Generation::NONE, put(&one)).await.unwrap();
        let read = store.get(ACME).await.unwrap().unwrap();
        assert_eq!(read.generation, first);
        assert_eq!(read.refresh_token.expose_secret(), "rt-1");

        let second = store.put(ACME, first, put(&two)).await.unwrap();
        assert_ne!(second, first);
        let stale = store.put(ACME, first, put(&one)).await.unwrap_err();
        assert!(
            matches!(stale, PutError::Stale { expected, current } if expected == first && current == second),
            "{stale}"
        );
        let refused = store.put(ACME, Generation::NONE, put(&one)).await;
        assert!(matches!(refused, Err(PutError::Stale { .. })));
        let kept = store.get(ACME).await.unwrap().unwrap();
        assert_eq!(kept.refresh_token.expose_secret(), "rt-2");
        assert_eq!(kept.generation, second);
    }
}

#[tokio::test]
async fn adopting_a_seed_records_it_as_presented() {
    for (_backing, store) in stores().await {
        let seed = SecretString::from("seed-1");
        assert!(!store.seed_presented(&seed).await.unwrap());
        let adopt = Put {
            adopt_seed: true,
            ..put(&seed)
        };
        store.put(ACME, Generation::NONE, adopt).await.unwrap();
        assert!(store.seed_presented(&seed).await.unwrap());
    }
}

#[tokio::test]
async fn a_lease_is_exclusive_per_tenant_until_released() {
    for (_backing, store) in stores().await {
        let held = store.lease(ACME).await.unwrap();
        let mut second = std::pin::pin!(store.lease(ACME));
        assert!(waits(second.as_mut()).await, "a second holder waits");
        let other = tokio::time::timeout(std::time::Duration::from_secs(10), store.lease(OTHER));
        assert!(
            other.await.is_ok_and(|l| l.is_ok()),
            "another tenant's lease is independent"
        );
        drop(held); // released on drop, as the refresher releases it
        let again = tokio::time::timeout(std::time::Duration::from_secs(10), second)
            .await
            .expect("granted once released");
        assert!(again.is_ok());
    }
}

#[tokio::test]
async fn every_record_is_listed_with_the_client_id_written() {
    for (_backing, store) in stores().await {
        let one = SecretString::from("rt-1");
        store.put(ACME, Generation::NONE, put(&one)).await.unwrap();
        store.put(OTHER, Generation::NONE, put(&one)).await.unwrap();
        let mut all = store.all().await.unwrap();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<_> = all.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["acme", "other"]);
        let json = store.location().ends_with("tokens.json");
        // The JSON file of earlier releases records no client_id.
        let expected = if json { "" } else { "app-1" };
        assert_eq!(all[0].client_id, expected);
        assert_eq!(all[0].record.refresh_token.expose_secret(), "rt-1");
    }
}

#[tokio::test]
async fn the_embedded_stores_report_no_changes_from_elsewhere() {
    for (_backing, store) in stores().await {
        if store.shared() {
            continue; // its feed has tests of its own
        }
        let mut changes = store.changes();
        let next = std::pin::pin!(changes.next());
        assert!(!ready_now(next).await);
    }
}

#[tokio::test]
async fn presented_seeds_are_listed_and_recorded_by_their_hashes() {
    let mut all = stores().await;
    let (from_dir, from) = all.remove(0);
    let seed = SecretString::from("seed-1");
    let adopt = Put {
        adopt_seed: true,
        ..put(&seed)
    };
    from.put(ACME, Generation::NONE, adopt).await.unwrap();
    let hashes = from.presented_seeds().await.unwrap();
    assert_eq!(hashes.len(), 1);
    assert!(!hashes[0].contains("seed-1"), "a hash, not the seed");
    for (_dir, to) in std::iter::once((from_dir, from)).chain(all) {
        to.add_presented_seeds(&hashes).await.unwrap();
        assert!(to.seed_presented(&seed).await.unwrap());
        assert!(
            !to.seed_presented(&SecretString::from("other"))
                .await
                .unwrap()
        );
        assert_eq!(to.presented_seeds().await.unwrap(), hashes);
    }
}
