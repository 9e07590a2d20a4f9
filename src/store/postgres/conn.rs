//! The one connection every task shares (`tokio-postgres` pipelines the
//! statements of concurrent callers on it), kept up by a supervisor task:
//! connect, migrate, `LISTEN`, publish; when the connection dies (or a
//! statement times out: the peer may be gone without a word), unpublish,
//! back off, and start again. Nothing waits for it: while it is down,
//! every operation fails at once and [`Shared::problem`] says why.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client};

use super::tls::MakeRustls;
use super::{Shared, feed, schema, url};

/// Back-off between connection attempts: doubling from the first to the
/// last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Bound on a session's statements on the server's side too: a
/// transaction never stays open longer (the feed relies on it).
pub(super) const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs until aborted (when the store is dropped).
pub(super) async fn supervise(shared: Arc<Shared>, notes: mpsc::Sender<String>) {
    let mut backoff = BACKOFF.0;
    let mut first = true;
    loop {
        match session(&shared, &notes, first).await {
            Ok(()) => {
                first = false;
                backoff = BACKOFF.0;
            }
            Err((op, e)) => {
                shared.errors.inc(op);
                if op == "migrate" {
                    tracing::error!(store = %shared.shown, error = %e, "token store unusable");
                } else {
                    tracing::warn!(store = %shared.shown, error = %e, "token store database unreachable; retrying");
                }
                shared.set_problem(Some(e));
                shared.failures.send_modify(|n| *n += 1);
            }
        }
        shared.client.send_replace(None);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

type Failed = (&'static str, String);

/// One connection, from connecting to its end. `Ok` once it was up and
/// then ended (the error is recorded as the problem already).
async fn session(
    shared: &Arc<Shared>,
    notes: &mpsc::Sender<String>,
    first: bool,
) -> Result<(), Failed> {
    let text = shared
        .source
        .load_async()
        .await
        .map_err(|e| ("connect", format!("{}: {e}", shared.source_key())))?;
    let parsed = url::parse(secrecy::ExposeSecret::expose_secret(&text))
        .map_err(|e| ("connect", format!("{}: {e}", shared.source_key())))?;
    *shared.place.lock().unwrap_or_else(|e| e.into_inner()) = parsed.place.clone();
    let unreachable = |e: &dyn std::fmt::Display| {
        (
            "connect",
            format!(
                "cannot reach the token store database at {}: {e}",
                parsed.place
            ),
        )
    };
    let tls = MakeRustls::for_url(&parsed).map_err(|e| unreachable(&e))?;
    let connecting = parsed.config.connect(tls);
    let (mut client, mut connection) = tokio::time::timeout(Duration::from_secs(30), connecting)
        .await
        .map_err(|_| unreachable(&"timed out"))?
        .map_err(|e| unreachable(&super::sql::full(&e)))?;
    // The connection is driven here, in this task: aborting the task (the
    // store dropped) closes it, and the database frees its leases.
    let driver = async {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    // Full: dropped; the feed's polling catches up.
                    let _ = notes.try_send(n.payload().to_owned());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return super::sql::full(&e),
                None => return "the connection was closed".to_owned(),
            }
        }
    };
    tokio::pin!(driver);
    let setup = async {
        let sql = |e: tokio_postgres::Error| unreachable(&super::sql::full(&e));
        client
            .batch_execute(&format!(
                "SET statement_timeout = {}",
                STATEMENT_TIMEOUT.as_millis()
            ))
            .await
            .map_err(sql)?;
        schema::migrate(&mut client).await.map_err(|e| {
            (
                "migrate",
                format!("token store database at {}: {e}", parsed.place),
            )
        })?;
        client
            .batch_execute("LISTEN criteo_proxy_changed")
            .await
            .map_err(sql)?;
        // Before anyone reads through this connection: what the feed
        // compares later writes with (a reconnection reports what
        // changed while it was down).
        feed::poll(shared, &client, feed::Scope::All { report: !first })
            .await
            .map_err(|e| ("feed", unreachable(&e).1))?;
        Ok::<_, Failed>(())
    };
    tokio::select! {
        e = &mut driver => return Err(unreachable(&e)),
        done = setup => done?,
    }
    let client: Arc<Client> = Arc::new(client);
    shared.client.send_replace(Some(Arc::clone(&client)));
    shared.set_problem(None);
    tracing::info!(store = %shared.shown, "token store database connected");
    let ended = tokio::select! {
        e = &mut driver => e,
        () = shared.reset.notified() => "a statement timed out; reconnecting".to_owned(),
    };
    shared.client.send_replace(None);
    let (op, problem) = unreachable(&ended);
    shared.errors.inc(op);
    tracing::warn!(store = %shared.shown, error = %problem, "token store database connection lost; reconnecting");
    shared.set_problem(Some(problem));
    Ok(())
}
