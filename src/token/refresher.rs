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

use super::{Health, State, Token, TokenSource};
use crate::config::RefreshConfig;
use crate::metrics::RefreshOutcome;
use crate::oauth::GrantError;
use crate::tenant::Tenant;

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

pub(crate) async fn run(
    tenant: Arc<Tenant>,
    source: TokenSource,
    cfg: RefreshConfig,
    fetches: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let cell = &tenant.tokens;
    let name = &*tenant.name;
    // A token already in place (a refresher restarted by a reload) is
    // renewed when due; a lazy tenant sleeps until its first request asks.
    let mut next = match cell.current() {
        Some(t) if t.is_usable_now() => t.refresh_at(),
        _ if cfg.lazy => later(NEVER),
        _ => Instant::now(),
    };
    // Renewals that no 401 asked for come at most this often.
    let floor = cfg.min_token_lifetime / 2;
    let mut failures: u32 = 0;
    let mut last_fetch: Option<Instant> = None;
    loop {
        let demanded = tokio::select! {
            // A stop is seen before anything else that is ready.
            biased;
            _ = stop.changed() => return,
            _ = sleep_until(next.into()) => false,
            _ = cell.demanded() => true,
            _ = cell.installed() => {
                // Onboarding put a fresh token in place: renew that one.
                failures = 0;
                if let Some(t) = cell.current() {
                    next = t.refresh_at();
                }
                continue;
            }
            // Onboarding saved a refresh token but could not put an access
            // token in service: renew now with that refresh token.
            () = source.renewal_wanted() => {
                failures = 0;
                next = Instant::now();
                continue;
            }
        };
        if demanded {
            // While backing off, a waiting request is answered from the
            // health record; it does not shorten the pause.
            if failures > 0 || !cell.needs_token() {
                continue;
            }
            if let Some(earliest) = last_fetch.map(|l| after(l, MIN_DEMAND_INTERVAL))
                && Instant::now() < earliest
            {
                next = next.min(earliest);
                continue;
            }
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
        last_fetch = Some(requested_at);
        let previous = cell.health();
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
            Ok(token) => {
                failures = 0;
                next = token.refresh_at().max(after(requested_at, floor));
                tracing::info!(
                    tenant = name,
                    generation = token.generation(),
                    renew_in = ?next.saturating_duration_since(Instant::now()),
                    "access token obtained"
                );
                cell.publish(token);
                cell.set_health(Health {
                    state: State::Ready,
                    last_refresh: Some(SystemTime::now()),
                    last_error: None,
                    retry_at: None,
                });
                tenant.metrics.refresh(RefreshOutcome::Success);
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                let (state, pause, outcome) = match &err {
                    GrantError::Transient(_) => (
                        State::Failing,
                        backoff(failures, cfg.max_backoff, rand::rng().random()),
                        RefreshOutcome::Error,
                    ),
                    GrantError::Rejected { .. } | GrantError::InvalidGrant { .. } => (
                        State::Rejected,
                        cfg.rejected_backoff,
                        RefreshOutcome::Rejected,
                    ),
                    // Nothing to present until a person consents again:
                    // sleep until onboarding installs a token.
                    GrantError::ConsentRequired(_) => (
                        State::ConsentRequired,
                        NEVER,
                        RefreshOutcome::ConsentRequired,
                    ),
                };
                next = later(pause);
                let still_serving = cell.usable().is_some();
                if state == State::ConsentRequired {
                    if previous.state != State::ConsentRequired {
                        tenant.metrics.consent_required();
                    }
                    tracing::error!(tenant = name, "{err}");
                } else if state == State::Rejected {
                    tracing::error!(
                        tenant = name,
                        error = %err,
                        retry_in = ?pause,
                        still_serving,
                        "token endpoint rejected this tenant's credentials; fix client_id/client_secret"
                    );
                } else {
                    tracing::warn!(
                        tenant = name,
                        error = %err,
                        retry_in = ?pause,
                        still_serving,
                        "token request failed"
                    );
                }
                cell.set_health(Health {
                    state,
                    last_refresh: previous.last_refresh,
                    last_error: Some(err.to_string()),
                    retry_at: (state != State::ConsentRequired).then_some(next),
                });
                tenant.metrics.refresh(outcome);
            }
        }
        cell.set_fetching(false);
        cell.attempt_done();
    }
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
    fn backoff_grows_to_its_ceiling_and_keeps_jitter() {
        let max = Duration::from_secs(30);
        assert_eq!(backoff(1, max, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(2, max, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(5, max, 1.0), Duration::from_secs(16));
        assert_eq!(backoff(50, max, 1.0), max);
        assert_eq!(backoff(50, max, 0.0), max / 2);
    }
}
