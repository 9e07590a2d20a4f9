//! The per-tenant background task: the only caller of the token endpoint.
//!
//! It fetches a first token at once, then renews each token once
//! `at_fraction` of its lifetime has passed (with jitter), and whenever a
//! request reports a 401 or finds no usable token. Failures back off
//! exponentially with jitter while the current token, if any, keeps
//! serving; rejected credentials back off much longer, so the token
//! endpoint is never hammered. Absent a 401, a tenant is never renewed more
//! often than every half `refresh.min_token_lifetime`, whatever lifetime
//! the token endpoint announces.
//!
//! A token request is never cut short here: each call carries its own
//! bound (`refresh.token_timeout`, or `refresh.rotation_timeout` for one
//! that may rotate a refresh token), and a stop signal is only looked at
//! between calls, so that a rotation in flight always ends with its new
//! refresh token saved.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use tokio::sync::{Semaphore, watch};
use tokio::time::sleep_until;

use super::{Health, State, Token, TokenCell, TokenSource};
use crate::config::RefreshConfig;
use crate::metrics::{RefreshMetrics, RefreshOutcome};
use crate::oauth::GrantError;

/// Demand-driven fetches (after a 401) are spaced at least this far apart,
/// so an API that rejects every token cannot turn each request into a
/// token request.
const MIN_DEMAND_INTERVAL: Duration = Duration::from_millis(500);

/// "Until something else wakes the refresher" (about a year).
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// `d` after `from`, or as late as the clock allows (never a panic).
fn after(from: Instant, d: Duration) -> Instant {
    from.checked_add(d)
        .or_else(|| from.checked_add(NEVER))
        .unwrap_or(from)
}

fn later(d: Duration) -> Instant {
    after(Instant::now(), d)
}

/// First pause after a transient failure; doubles up to `max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// What a refresher keeps filled: the tenant's cell, with the name and
/// counters its logs and metrics need (not the whole tenant).
#[derive(Debug)]
pub(crate) struct Target {
    pub name: Arc<str>,
    pub cell: Arc<TokenCell>,
    pub metrics: RefreshMetrics,
}

/// How long to pause after a failure of this kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pause {
    /// Exponential back-off with jitter (see [`backoff`]).
    Backoff,
    /// `refresh.rejected_backoff`: credentials rarely fix themselves.
    Rejected,
    /// Until onboarding installs a token: nothing to present meanwhile.
    UntilOnboarding,
}

/// What a failed token request means for the tenant: its state, how long
/// to pause, and the metric's outcome. Pure, so that the mapping is tested
/// on its own.
pub(crate) fn classify(err: &GrantError) -> (State, Pause, RefreshOutcome) {
    match err {
        GrantError::Transient(_) => (State::Failing, Pause::Backoff, RefreshOutcome::Error),
        GrantError::Rejected { .. } | GrantError::InvalidGrant { .. } => {
            (State::Rejected, Pause::Rejected, RefreshOutcome::Rejected)
        }
        GrantError::ConsentRequired(_) => (
            State::ConsentRequired,
            Pause::UntilOnboarding,
            RefreshOutcome::ConsentRequired,
        ),
    }
}

/// The loop's memory between token requests.
#[derive(Debug)]
struct Schedule {
    next: Instant,
    failures: u32,
    last_fetch: Option<Instant>,
}

pub(crate) async fn run(
    target: Target,
    source: TokenSource,
    cfg: RefreshConfig,
    fetches: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let cell = &*target.cell;
    // A token already in place (a refresher restarted by a reload) is
    // renewed when due; a lazy tenant sleeps until its first request asks.
    let next = match cell.current() {
        Some(t) if t.is_usable_now() => t.refresh_at(),
        _ if cfg.lazy => later(NEVER),
        _ => Instant::now(),
    };
    let mut s = Schedule {
        next,
        failures: 0,
        last_fetch: None,
    };
    loop {
        let demanded = tokio::select! {
            // A stop is seen before anything else that is ready.
            biased;
            _ = stop.changed() => return,
            _ = sleep_until(s.next.into()) => false,
            _ = cell.demanded() => true,
            _ = cell.installed() => {
                // Onboarding put a fresh token in place: renew that one.
                s.failures = 0;
                if let Some(t) = cell.current() {
                    s.next = t.refresh_at();
                }
                continue;
            }
            // Onboarding saved a refresh token but could not put an access
            // token in service: renew now with that refresh token.
            () = source.renewal_wanted() => {
                s.failures = 0;
                s.next = Instant::now();
                continue;
            }
            // Another replica sharing the store rotated (or lost) the
            // refresh token: serve its access token from now on.
            () = source.change_reported() => {
                let requested_at = Instant::now();
                match source.adopt_changed().await {
                    Ok(Some(granted)) => s.adopted(&target, &granted, requested_at, &cfg),
                    Ok(None) => {}
                    Err(err) => s.failed(&target, &err, &cfg),
                }
                continue;
            }
        };
        if demanded && !s.answers_demand(cell) {
            continue;
        }
        cell.set_fetching(true);
        // Bounds the token requests in flight across all tenants, so that
        // thousands of tenants starting (or renewing) at once queue here
        // instead of storming the token endpoint.
        let Ok(_permit) = fetches.acquire().await else {
            return;
        };
        let requested_at = Instant::now();
        // Boxed: a tenant spends nearly all its life waiting, and its task
        // should not carry the (large) state of a token request meanwhile.
        // Not under a timeout: the call bounds itself, and cutting a
        // rotation short here could drop a refresh token Criteo issued.
        let result = Box::pin(source.fetch()).await;
        s.last_fetch = Some(requested_at);
        let token = result.and_then(|granted| {
            Token::new(
                &granted,
                requested_at,
                cfg.at_fraction,
                cell.next_generation(),
            )
            .map_err(|e| GrantError::Transient(e.to_string()))
        });
        match token {
            Ok(token) => s.succeeded(&target, token, requested_at, &cfg),
            Err(err) => s.failed(&target, &err, &cfg),
        }
        cell.set_fetching(false);
        cell.attempt_done();
    }
}

// === impl Schedule ===

impl Schedule {
    /// Whether a request's demand calls for a token request now. While
    /// backing off, a waiting request is answered from the health record
    /// (it does not shorten the pause); demands are spaced.
    fn answers_demand(&mut self, cell: &TokenCell) -> bool {
        if self.failures > 0 || !cell.needs_token() {
            return false;
        }
        if let Some(earliest) = self.last_fetch.map(|l| after(l, MIN_DEMAND_INTERVAL))
            && Instant::now() < earliest
        {
            self.next = self.next.min(earliest);
            return false;
        }
        true
    }

    fn succeeded(
        &mut self,
        target: &Target,
        token: Token,
        requested_at: Instant,
        cfg: &RefreshConfig,
    ) {
        // Renewals that no 401 asked for come at most this often.
        let floor = cfg.min_token_lifetime / 2;
        self.failures = 0;
        self.next = token.refresh_at().max(after(requested_at, floor));
        tracing::info!(
            tenant = &*target.name,
            generation = token.generation(),
            renew_in = ?self.next.saturating_duration_since(Instant::now()),
            "access token obtained"
        );
        in_service(&target.cell, token);
        target.metrics.refresh(RefreshOutcome::Success);
    }

    /// A token another replica obtained, read from the shared store: put
    /// in service and renewed when due, like one of this replica's own
    /// (whichever replica is due first rotates; the others adopt again).
    fn adopted(
        &mut self,
        target: &Target,
        granted: &crate::oauth::Granted,
        requested_at: Instant,
        cfg: &RefreshConfig,
    ) {
        let cell = &target.cell;
        let token = Token::new(
            granted,
            requested_at,
            cfg.at_fraction,
            cell.next_generation(),
        );
        let Ok(token) = token else {
            return;
        };
        self.failures = 0;
        self.next = token.refresh_at();
        tracing::debug!(
            tenant = &*target.name,
            generation = token.generation(),
            "access token taken from the shared store"
        );
        in_service(cell, token);
    }

    fn failed(&mut self, target: &Target, err: &GrantError, cfg: &RefreshConfig) {
        let (cell, name) = (&target.cell, &*target.name);
        let previous = cell.health();
        self.failures = self.failures.saturating_add(1);
        let (state, pause, outcome) = classify(err);
        let pause = match pause {
            Pause::Backoff => backoff(self.failures, cfg.max_backoff, rand::rng().random()),
            Pause::Rejected => cfg.rejected_backoff,
            Pause::UntilOnboarding => NEVER,
        };
        self.next = later(pause);
        let still_serving = cell.usable().is_some();
        match state {
            State::ConsentRequired => {
                if previous.state != State::ConsentRequired {
                    target.metrics.consent_required();
                }
                tracing::error!(tenant = name, "{err}");
            }
            State::Rejected => tracing::error!(
                tenant = name,
                error = %err,
                retry_in = ?pause,
                still_serving,
                "token endpoint rejected this tenant's credentials; fix client_id/client_secret"
            ),
            _ => tracing::warn!(
                tenant = name,
                error = %err,
                retry_in = ?pause,
                still_serving,
                "token request failed"
            ),
        }
        cell.set_health(Health {
            state,
            last_refresh: previous.last_refresh,
            last_error: Some(err.to_string()),
            retry_at: (state != State::ConsentRequired).then_some(self.next),
        });
        target.metrics.refresh(outcome);
    }
}

/// Puts `token` in service: the tenant is ready, refreshed now.
fn in_service(cell: &TokenCell, token: Token) {
    cell.publish(token);
    cell.set_health(Health {
        state: State::Ready,
        last_refresh: Some(SystemTime::now()),
        last_error: None,
        retry_at: None,
    });
}

/// Exponential back-off from one second, capped, with "equal jitter": a
/// random point in the upper half of the step.
fn backoff(failures: u32, max: Duration, jitter: f64) -> Duration {
    let exp = FIRST_BACKOFF
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(max);
    exp.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_failure_maps_to_its_state_pause_and_outcome() {
        let transient = classify(&GrantError::Transient("timeout".into()));
        assert_eq!((transient.0, transient.1), (State::Failing, Pause::Backoff));
        assert_eq!(transient.2.label(), "error");

        let rejected = classify(&GrantError::Rejected {
            code: "invalid_client".into(),
            description: None,
        });
        assert_eq!((rejected.0, rejected.1), (State::Rejected, Pause::Rejected));
        assert_eq!(rejected.2.label(), "rejected");

        let refused = classify(&GrantError::InvalidGrant { description: None });
        assert_eq!((refused.0, refused.1), (State::Rejected, Pause::Rejected));

        let consent = classify(&GrantError::ConsentRequired("revoked".into()));
        assert_eq!(
            (consent.0, consent.1),
            (State::ConsentRequired, Pause::UntilOnboarding)
        );
        assert_eq!(consent.2.label(), "consent_required");
    }

    #[test]
    fn backoff_grows_to_its_ceiling_and_keeps_jitter() {
        let max = Duration::from_secs(30);
        assert_eq!(backoff(1, max, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(2, max, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(5, max, 1.0), Duration::from_secs(16));
        assert_eq!(backoff(50, max, 1.0), max);
        assert_eq!(backoff(50, max, 0.0), max / 2);
    }
}
