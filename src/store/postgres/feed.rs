//! The change feed: tenants whose generation rose, learnt from
//! `LISTEN criteo_proxy_changed` within milliseconds and, behind it, from
//! polling every `store.poll_interval` (a notification can be lost: the
//! connection was down, the channel full).
//!
//! Generations come from one sequence, but they are taken when a write
//! starts, not when it commits: a write may commit with a lower number
//! than one already seen. So a poll reads every row above what was seen
//! by a poll [`SETTLE`] ago (longer than any transaction may last), and
//! each tenant's last generation reported decides whether a row is news.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::Client;

use super::Shared;
use super::conn::STATEMENT_TIMEOUT;
use crate::store::contract::Changed;

/// How long after a poll its highest generation is certain to have no
/// lower one still to commit.
const SETTLE: Duration = STATEMENT_TIMEOUT.saturating_add(Duration::from_secs(2));

/// Room in the feed; when full, changes wait for the next poll.
pub(super) const CAPACITY: usize = 1024;

#[derive(Debug, Default)]
pub(super) struct State {
    /// Each tenant's highest generation known.
    seen: HashMap<(Arc<str>, Arc<str>), i64>,
    /// The highest generation each poll saw, when.
    marks: VecDeque<(Instant, i64)>,
}

/// What a poll reads.
#[derive(Debug, Clone, Copy)]
pub(super) enum Scope {
    /// Every row; `report: false` only learns them (the first connection:
    /// nobody has read anything yet).
    All { report: bool },
    /// Rows written since [`SETTLE`] before the last settled poll.
    Recent,
}

/// Reads rows and reports those with a higher generation than known.
pub(super) async fn poll(
    shared: &Shared,
    client: &Client,
    scope: Scope,
) -> Result<(), tokio_postgres::Error> {
    let mut state = shared.feed_state.lock().await;
    let now = Instant::now();
    let floor = match scope {
        Scope::All { .. } => 0,
        Scope::Recent => state
            .marks
            .iter()
            .rev()
            .find(|(at, _)| now.duration_since(*at) >= SETTLE)
            .map_or(0, |(_, g)| *g),
    };
    let report = !matches!(scope, Scope::All { report: false });
    let rows = client
        .query(
            "SELECT name, client_id, generation FROM criteo_proxy_tenants WHERE generation > $1",
            &[&floor],
        )
        .await?;
    let mut top = state.marks.back().map_or(0, |(_, g)| *g);
    for row in rows {
        let (name, client_id, generation): (String, String, i64) =
            (row.get(0), row.get(1), row.get(2));
        top = top.max(generation);
        learn(shared, &mut state, name, client_id, generation, report);
    }
    // Keep marks back to the first settled one.
    state.marks.push_back((now, top));
    while state.marks.len() > 1
        && state
            .marks
            .get(1)
            .is_some_and(|(at, _)| now.duration_since(*at) >= SETTLE)
    {
        state.marks.pop_front();
    }
    Ok(())
}

/// Records `generation` for the tenant, reporting it when it is news.
fn learn(
    shared: &Shared,
    state: &mut State,
    name: String,
    client_id: String,
    generation: i64,
    report: bool,
) {
    let key = (Arc::<str>::from(name), Arc::<str>::from(client_id));
    let known = state.seen.get(&key).copied().unwrap_or(0);
    if generation <= known {
        return;
    }
    state.seen.insert(key.clone(), generation);
    if report {
        // Full: dropped; the reader compares generations anyway, and the
        // lead's refreshers re-read on their own schedule.
        let _ = shared.feed_tx.try_send(Changed {
            name: key.0,
            client_id: key.1,
        });
    }
}

#[derive(serde::Deserialize)]
struct Note {
    g: Option<i64>,
    n: Option<String>,
    c: Option<String>,
}

/// The feed task: notifications as they come, polls on the interval.
pub(super) async fn run(shared: Arc<Shared>, mut notes: mpsc::Receiver<String>) {
    let mut tick = tokio::time::interval(shared.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let note = tokio::select! {
            note = notes.recv() => match note {
                Some(n) => Some(n),
                None => return,
            },
            _ = tick.tick() => None,
        };
        // Lease waiters retry on any news.
        shared.wake.notify_waiters();
        let Some(client) = shared.client.borrow().clone() else {
            continue;
        };
        let fast = note
            .as_deref()
            .and_then(|n| serde_json::from_str::<Note>(n).ok());
        match fast {
            Some(Note {
                g: Some(g),
                n: Some(name),
                c: Some(client_id),
            }) => {
                let mut state = shared.feed_state.lock().await;
                learn(&shared, &mut state, name, client_id, g, true);
            }
            // A lease released: nothing to read.
            Some(Note { g: None, .. }) => {}
            _ => {
                let polled =
                    tokio::time::timeout(STATEMENT_TIMEOUT, poll(&shared, &client, Scope::Recent))
                        .await;
                if !matches!(polled, Ok(Ok(()))) {
                    shared.errors.inc("feed");
                }
            }
        }
    }
}
