//! The replicas on one database: each one's row, its heartbeat keeping
//! `seen` fresh, counted to share each tenant's rate limit between the
//! replicas alive. Times are the database's own (`now()`), so replicas'
//! clocks need not agree.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use super::{PgStore, Shared};

/// A replica not seen for this long is gone (it died without deleting its
/// row): three heartbeats of [`HEARTBEAT`].
pub(crate) const ALIVE_WITHIN: Duration = Duration::from_secs(3);

/// How often a replica says it is alive.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);

/// Rows of replicas gone for this long are deleted by the others (the
/// table stays small after crashes).
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// This replica's row in `criteo_proxy_replicas`.
pub(crate) struct Replicas {
    shared: Arc<Shared>,
    /// Random, new each start: a restarted replica is a new one (its old
    /// row expires).
    id: String,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas").field("id", &self.id).finish()
    }
}

impl PgStore {
    /// A handle on this process's row among the replicas.
    pub(crate) fn replicas(&self) -> Replicas {
        Replicas {
            shared: Arc::clone(&self.shared),
            id: format!("{}-{:016x}", std::process::id(), rand::random::<u64>()),
        }
    }
}

impl Replicas {
    /// Says this replica is alive, and counts the replicas alive (itself
    /// included): one statement. Fails at once while the database is
    /// unreachable.
    pub(crate) async fn beat(&self) -> io::Result<u32> {
        let id = self.id.clone();
        let (alive, forget) = (ALIVE_WITHIN.as_secs_f64(), FORGET_AFTER.as_secs_f64());
        let row = self
            .shared
            .run("replicas", |client| async move {
                // The count runs on the snapshot taken before the upsert,
                // so it counts the others, and this one is added.
                client
                    .query_one(
                        "WITH me AS (
                             INSERT INTO criteo_proxy_replicas (id, seen) VALUES ($1, now())
                             ON CONFLICT (id) DO UPDATE SET seen = now()
                         ), gone AS (
                             DELETE FROM criteo_proxy_replicas
                             WHERE seen < now() - make_interval(secs => $3::float8)
                         )
                         SELECT count(*) FROM criteo_proxy_replicas
                         WHERE id <> $1 AND seen > now() - make_interval(secs => $2::float8)",
                        &[&id, &alive, &forget],
                    )
                    .await
            })
            .await?;
        let others: i64 = row.get(0);
        Ok(u32::try_from(others).unwrap_or(u32::MAX - 1) + 1)
    }

    /// Deletes this replica's row (at shutdown): the others take its share
    /// at their next heartbeat instead of after [`ALIVE_WITHIN`].
    pub(crate) async fn leave(&self) -> io::Result<()> {
        let id = self.id.clone();
        self.shared
            .run("replicas", |client| async move {
                client
                    .execute("DELETE FROM criteo_proxy_replicas WHERE id = $1", &[&id])
                    .await
            })
            .await?;
        Ok(())
    }

    /// Waits until the database is connected (at once if it is).
    pub(crate) async fn connected(&self) {
        let mut live = self.shared.client.subscribe();
        let _ = live.wait_for(Option::is_some).await;
    }
}

#[cfg(test)]
mod tests {
    use crate::store::postgres::tests::database;

    #[tokio::test]
    async fn replicas_count_themselves_and_the_others_seen_lately_not_the_expired() {
        let Some((pg, store)) = database().await else {
            return;
        };
        let (a, b) = (store.replicas(), store.replicas());
        assert_eq!(a.beat().await.unwrap(), 1, "alone");
        assert_eq!(b.beat().await.unwrap(), 2);
        assert_eq!(a.beat().await.unwrap(), 2);
        // A replica that died without a word: last seen past the window.
        pg.sql("INSERT INTO criteo_proxy_replicas VALUES ('dead', now() - interval '10 seconds')");
        // One that died long ago: forgotten altogether.
        pg.sql("INSERT INTO criteo_proxy_replicas VALUES ('older', now() - interval '2 hours')");
        assert_eq!(a.beat().await.unwrap(), 2, "the expired are not counted");
        assert_eq!(
            pg.sql("SELECT count(*) FROM criteo_proxy_replicas WHERE id = 'older'")
                .trim(),
            "0"
        );
        b.leave().await.unwrap();
        assert_eq!(a.beat().await.unwrap(), 1, "one that left is not counted");
    }
}
