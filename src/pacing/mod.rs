//! Pacing: each tenant with a limit stays under it. A request reserves its
//! turn at arrival ([`gcra`]: one compare-and-swap, no lock); under the
//! budget its turn is now and it goes on at once (no allocation, no task
//! hop); over it, it sleeps until its turn, in arrival order; a turn
//! further than `rate_limit.max_wait` away is refused at once and takes
//! nothing from the budget.
//!
//! A request on a reporting path needs a turn in both the tenant's budget
//! and its reporting budget, at the same instant (the later of the two).
//! Those few requests take a short lock around the two reservations, so
//! that the instant reserved in one is exactly the instant reserved in the
//! other; the other requests never touch it.
//!
//! Criteo's 429s feed it ([`criteo`]): [`Pacing::pause_until`] (no turn
//! before its reset; a request still waiting for an earlier turn takes a
//! new one after it) and [`Pacing::learn_limit`] (Criteo says the limit is
//! lower) act on the same budgets, without a lock.

mod criteo;
mod gcra;
mod paths;
mod rate;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use gcra::{Gcra, Grant};
pub(crate) use paths::{DEFAULT_REPORTING_PATHS, Globs};
pub(crate) use rate::Rate;

/// What a tenant is paced by; a reload rebuilds the pacer when this changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Limits {
    /// The tenant's whole budget, if it has one.
    pub(crate) overall: Option<Rate>,
    /// The budget of reporting paths, inside the whole one.
    pub(crate) reporting: Option<(Rate, Globs)>,
    pub(crate) max_wait: Duration,
}

/// A request's turn is further than `max_wait` away.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refused {
    /// From now until its turn would be within `max_wait`.
    pub(crate) retry_after: Duration,
}

/// One tenant's budgets.
#[derive(Debug)]
pub(crate) struct Pacing {
    limits: Limits,
    epoch: Instant,
    overall: Option<Gcra>,
    reporting: Option<Reporting>,
    /// Requests sleeping until their turn (`/tenants`).
    waiting: AtomicUsize,
    /// Replicas sharing the budgets (this one paces to 1/`replicas` of
    /// them); 1 without a shared store.
    replicas: AtomicU32,
    /// The end of the latest pause Criteo asked for (nanoseconds since
    /// `epoch`): a turn reserved before it and earlier than it is not used.
    paused: AtomicU64,
    /// The calls per period learnt from Criteo, `[overall, reporting]`
    /// (0: none learnt).
    learnt: [AtomicU32; 2],
}

#[derive(Debug)]
struct Reporting {
    budget: Gcra,
    paths: Globs,
    /// Held only while a reporting request reserves in both budgets.
    reserving: Mutex<()>,
}

impl Pacing {
    /// `None` when `limits` limit nothing: such a tenant is not paced at all.
    pub(crate) fn new(limits: Limits) -> Option<Self> {
        if limits.overall.is_none() && limits.reporting.is_none() {
            return None;
        }
        Some(Self {
            overall: limits.overall.map(Gcra::new),
            reporting: limits.reporting.as_ref().map(|(rate, paths)| Reporting {
                budget: Gcra::new(*rate),
                paths: paths.clone(),
                reserving: Mutex::new(()),
            }),
            limits,
            epoch: Instant::now(),
            waiting: AtomicUsize::new(0),
            replicas: AtomicU32::new(1),
            paused: AtomicU64::new(0),
            learnt: [AtomicU32::new(0), AtomicU32::new(0)],
        })
    }

    /// Paces every budget to one `replicas`-th of its limit from now on
    /// (replicas sharing a store share the tenant's limits equally).
    /// Cheap when the count is unchanged; `admit` never waits for it.
    pub(crate) fn set_share(&self, replicas: u32) {
        let replicas = replicas.max(1);
        if self.replicas.swap(replicas, Ordering::Relaxed) == replicas {
            return;
        }
        if let Some(o) = &self.overall {
            o.set_share(replicas);
        }
        if let Some(r) = &self.reporting {
            r.budget.set_share(replicas);
        }
    }

    /// How many replicas share the budgets (this one has 1/that).
    pub(crate) fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed)
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Requests waiting for their turn now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn instant(&self, nanos: u64) -> Instant {
        self.epoch + Duration::from_nanos(nanos)
    }

    /// Waits for the request's turn: `Ok(None)` when it is now (nothing
    /// awaited), `Ok(Some(wait))` after waiting, `Err` at once when its
    /// turn is too far. A request dropped while it waits (its client went
    /// away) gives its turn back if no later one was reserved; otherwise
    /// the turn goes unused, which keeps every later promise and errs on
    /// the side of fewer calls.
    pub(crate) async fn admit(&self, path: &str) -> Result<Option<Duration>, Refused> {
        let started = Instant::now();
        let now = self.nanos(started);
        let grants = self.reserve(path, now)?;
        let turn = grants[0].map_or(now, |g| g.turn);
        if turn <= now {
            return Ok(None);
        }
        Box::pin(self.wait(path, grants, turn)).await?;
        Ok(Some(started.elapsed()))
    }

    /// The turns reserved: `[overall, reporting]`, either absent.
    fn reserve(&self, path: &str, now: u64) -> Result<[Option<Grant>; 2], Refused> {
        let max_wait = u64::try_from(self.limits.max_wait.as_nanos()).unwrap_or(u64::MAX);
        let refused = |turn: u64| Refused {
            retry_after: Duration::from_nanos(turn.saturating_sub(now).saturating_sub(max_wait)),
        };
        let reporting = self.reporting.as_ref().filter(|r| r.paths.matches(path));
        let Some(r) = reporting else {
            return match &self.overall {
                Some(o) => Ok([Some(o.reserve(now, now, max_wait).map_err(refused)?), None]),
                None => Ok([None, None]),
            };
        };
        // A poisoned lock guards nothing but this sequence: carry on.
        let _one_at_a_time = r.reserving.lock().unwrap_or_else(|p| p.into_inner());
        let earliest = r.budget.peek(now);
        if earliest.saturating_sub(now) > max_wait {
            return Err(refused(earliest));
        }
        let overall = match &self.overall {
            Some(o) => Some(o.reserve(now, earliest, max_wait).map_err(refused)?),
            None => None,
        };
        let turn = overall.map_or(earliest, |g| g.turn);
        // Reporting turns are only reserved under the lock, so this one is
        // exactly `turn`, whatever the wait.
        let reporting = r.budget.reserve(now, turn, u64::MAX).ok();
        Ok(match overall {
            Some(_) => [overall, reporting],
            None => [reporting, None],
        })
    }

    /// Sleeps until `turn`. If Criteo asked for a pause meanwhile that
    /// ends after it, the turn is given up (later ones were reserved: it
    /// stays unused) and a new one taken, as a request arriving then would
    /// (`Err` if that one is further than `max_wait`).
    #[cold]
    async fn wait(
        &self,
        path: &str,
        grants: [Option<Grant>; 2],
        mut turn: u64,
    ) -> Result<(), Refused> {
        let mut waiting = Waiting {
            pacing: self,
            grants,
            done: false,
        };
        self.waiting.fetch_add(1, Ordering::Relaxed);
        loop {
            tokio::time::sleep_until(self.instant(turn)).await;
            if self.paused.load(Ordering::Acquire) <= turn {
                waiting.done = true;
                return Ok(());
            }
            waiting.done = true;
            let now = self.nanos(Instant::now());
            waiting.grants = self.reserve(path, now)?;
            waiting.done = false;
            turn = waiting.grants[0].map_or(now, |g| g.turn);
        }
    }

    /// No turn before `until` in the tenant's whole budget (Criteo asked
    /// for a pause). Turns already given and not yet reached are taken
    /// again after it ([`Pacing::wait`]); the next ones follow `until`,
    /// spaced by the limit, never in a burst beyond it.
    pub(crate) fn pause_until(&self, until: Instant) {
        let until = self.nanos(until);
        self.paused.fetch_max(until, Ordering::AcqRel);
        if let Some(o) = &self.overall {
            o.pause_until(until);
        }
        if let Some(r) = &self.reporting {
            r.budget.pause_until(until);
        }
    }

    /// Paces the tenant's whole budget to `rate` from now on (Criteo's
    /// `x-ratelimit-limit` says less than configured).
    pub(crate) fn adopt_limit(&self, rate: Rate) {
        if let Some(o) = &self.overall {
            o.adopt(rate);
        }
    }
}

/// A request sleeping until its turn: counted in `waiting`, and its turns
/// given back if it is dropped before then.
#[derive(Debug)]
struct Waiting<'a> {
    pacing: &'a Pacing,
    grants: [Option<Grant>; 2],
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.pacing.waiting.fetch_sub(1, Ordering::Relaxed);
        if self.done {
            return;
        }
        let budgets = [
            self.pacing.overall.as_ref(),
            self.pacing.reporting.as_ref().map(|r| &r.budget),
        ];
        let budgets = budgets.into_iter().flatten();
        for (budget, grant) in budgets.zip(self.grants.iter().flatten()) {
            budget.give_back(*grant);
        }
    }
}

#[cfg(test)]
mod tests;
