//! A bound on code exchanges per tenant (`/oauth/callback`).
//!
//! The callback is open to anyone who holds a valid state, and each code
//! exchange is a call to Criteo's token endpoint made with the tenant's
//! credentials. Whatever arrives, a tenant has at most one exchange in
//! flight and at most [`PER_MINUTE`] started in any minute; past that the
//! callback answers 429 and nothing is exchanged.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Code exchanges a tenant may start in any window of [`WINDOW`]. A
/// person onboarding needs one; a few more cover retries.
pub(crate) const PER_MINUTE: usize = 5;
const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Busy {
    /// Another exchange for this tenant is under way.
    InFlight,
    /// [`PER_MINUTE`] exchanges were started in the last minute; the next
    /// one may start after this long.
    TooMany(Duration),
}

#[derive(Debug, Default)]
struct Window {
    in_flight: bool,
    /// When each exchange of the last minute started, oldest first.
    started: VecDeque<Instant>,
}

#[derive(Debug, Default)]
pub(crate) struct Exchanges {
    tenants: Mutex<HashMap<String, Window>>,
}

/// The tenant's one exchange slot, given back when dropped (also when the
/// callback's client goes away mid-exchange).
#[derive(Debug)]
pub(crate) struct Slot<'a> {
    owner: &'a Exchanges,
    tenant: String,
}

impl Exchanges {
    /// Takes the tenant's slot if it is free and the minute's budget allows.
    /// Nothing is counted until [`Slot::start`].
    pub(crate) fn try_begin(&self, tenant: &str, now: Instant) -> Result<Slot<'_>, Busy> {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        // Forget windows that are over, so the map holds only tenants
        // onboarding right now.
        tenants.retain(|_, w| {
            prune(w, now);
            w.in_flight || !w.started.is_empty()
        });
        let w = tenants.entry(tenant.to_owned()).or_default();
        if w.in_flight {
            return Err(Busy::InFlight);
        }
        if w.started.len() >= PER_MINUTE {
            let oldest = w.started.front().copied().unwrap_or(now);
            return Err(Busy::TooMany(
                (oldest + WINDOW).saturating_duration_since(now),
            ));
        }
        w.in_flight = true;
        Ok(Slot {
            owner: self,
            tenant: tenant.to_owned(),
        })
    }
}

fn prune(w: &mut Window, now: Instant) {
    while w
        .started
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW)
    {
        w.started.pop_front();
    }
}

impl Slot<'_> {
    /// The exchange is about to be sent: it counts against the minute.
    pub(crate) fn start(&self, now: Instant) {
        let mut tenants = self.owner.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = tenants.get_mut(&self.tenant) {
            w.started.push_back(now);
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut tenants = self.owner.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = tenants.get_mut(&self.tenant) {
            w.in_flight = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_in_flight_and_a_few_a_minute_per_tenant() {
        let ex = Exchanges::default();
        let t0 = Instant::now();
        let first = ex.try_begin("acme", t0).unwrap();
        first.start(t0);
        assert_eq!(ex.try_begin("acme", t0).unwrap_err(), Busy::InFlight);
        // Other tenants are not held up.
        ex.try_begin("other", t0).unwrap().start(t0);
        drop(first);
        for i in 1..PER_MINUTE as u64 {
            ex.try_begin("acme", t0 + Duration::from_secs(i))
                .unwrap()
                .start(t0 + Duration::from_secs(i));
        }
        let now = t0 + Duration::from_secs(10);
        assert_eq!(
            ex.try_begin("acme", now).unwrap_err(),
            Busy::TooMany(Duration::from_secs(50))
        );
        // A slot taken but never started (the state was already used)
        // costs nothing.
        drop(ex.try_begin("other", now).unwrap());
        ex.try_begin("other", now).unwrap();
        // A minute after the first, one more may start.
        assert!(ex.try_begin("acme", t0 + WINDOW).is_ok());
    }
}
