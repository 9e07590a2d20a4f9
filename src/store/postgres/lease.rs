//! Refresh leases: a row per tenant in `criteo_proxy_leases`, naming its
//! holder (fresh per lease), the holder's database session and until when
//! it holds.
//!
//! A lease is taken when it is free, expired, or its holder's session is
//! gone (`pg_stat_activity`): a holder killed with `kill -9` loses its
//! connection, so its lease is free at once; a holder stuck (paused,
//! partitioned, its node frozen while its kernel still answers keep-alives)
//! keeps its session but stops renewing, and loses the lease when `until`
//! passes. While held, a task renews it every third of `store.lease`.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::Shared;
use crate::store::contract::{Key, Lease};

/// How often a waiting replica tries again when no notification came.
const RETRY: Duration = Duration::from_millis(200);

/// Beyond `store.lease`, how long a replica waits for another's lease: a
/// stuck holder's lease has run out by then.
const WAIT_BEYOND: Duration = Duration::from_secs(3);

const ACQUIRE: &str = "
INSERT INTO criteo_proxy_leases AS l (name, client_id, holder, holder_pid, until)
VALUES ($1, $2, $3, pg_backend_pid(), now() + $4::float8 * interval '1 millisecond')
ON CONFLICT (name, client_id) DO UPDATE
    SET holder = EXCLUDED.holder, holder_pid = EXCLUDED.holder_pid, until = EXCLUDED.until
    WHERE l.holder = EXCLUDED.holder
       OR l.until < now()
       OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.holder_pid)
RETURNING holder";

const RENEW: &str = "
UPDATE criteo_proxy_leases
SET until = now() + $4::float8 * interval '1 millisecond', holder_pid = pg_backend_pid()
WHERE name = $1 AND client_id = $2 AND holder = $3";

const RELEASE: &str =
    "DELETE FROM criteo_proxy_leases WHERE name = $1 AND client_id = $2 AND holder = $3";

/// Held while it lives: renewed by its task, released when dropped.
struct Held {
    shared: Arc<Shared>,
    name: String,
    client_id: String,
    holder: String,
    renewal: JoinHandle<()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renewal.abort();
        let shared = Arc::clone(&self.shared);
        let args = (
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.client_id),
            std::mem::take(&mut self.holder),
        );
        // Without a runtime (the process ending) the lease runs out, or
        // dies with the session.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let (name, client_id, holder) = args;
                let tenant = name.clone();
                let released = shared
                    .run("lease", |c| async move {
                        c.execute(RELEASE, &[&name, &client_id, &holder]).await
                    })
                    .await;
                if let Err(e) = released {
                    tracing::debug!(%tenant, error = %e, "lease not released; it runs out by itself");
                }
            });
        }
    }
}

/// Takes `key`'s lease, waiting (bounded) while another holds it.
pub(super) async fn take(shared: &Arc<Shared>, key: Key<'_>) -> io::Result<Lease> {
    let holder = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
    let millis = shared.lease.as_secs_f64() * 1000.0;
    let deadline = tokio::time::Instant::now() + shared.lease + WAIT_BEYOND;
    let (name, client_id) = (key.name.to_owned(), key.client_id.to_owned());
    loop {
        // Registered before trying: a release between the try and the
        // wait still wakes it.
        let woken = shared.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let (n, c, h) = (name.clone(), client_id.clone(), holder.clone());
        let taken = shared
            .run("lease", |client| async move {
                client.query_opt(ACQUIRE, &[&n, &c, &h, &millis]).await
            })
            .await?;
        if taken.is_some() {
            let renewal = tokio::spawn(renew(
                Arc::clone(shared),
                (name.clone(), client_id.clone(), holder.clone()),
                millis,
            ));
            return Ok(Lease::new(Held {
                shared: Arc::clone(shared),
                name,
                client_id,
                holder,
                renewal,
            }));
        }
        if tokio::time::Instant::now() >= deadline {
            shared.errors.inc("lease");
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("another replica holds the refresh lease of tenant {name}"),
            ));
        }
        let _ =
            tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + RETRY), woken).await;
    }
}

/// Renews the lease every third of `store.lease` until aborted.
async fn renew(
    shared: Arc<Shared>,
    (name, client_id, holder): (String, String, String),
    millis: f64,
) {
    let mut tick = tokio::time::interval(shared.lease / 3);
    tick.tick().await; // the first tick is now
    loop {
        tick.tick().await;
        if shared.renewal_paused() {
            continue;
        }
        let (n, c, h) = (name.clone(), client_id.clone(), holder.clone());
        match shared
            .run("lease", |client| async move {
                client.execute(RENEW, &[&n, &c, &h, &millis]).await
            })
            .await
        {
            Ok(1) => {}
            Ok(_) => {
                // Taken over (it ran out): the fencing of every write
                // keeps this replica from overwriting the new holder's.
                tracing::warn!(tenant = %name, "the refresh lease was lost to another replica");
                return;
            }
            Err(e) => tracing::warn!(tenant = %name, error = %e, "cannot renew the refresh lease"),
        }
    }
}
