//! The per-tenant background task: the only caller of the token endpoint.
//!
//! It fetches a first token at once, then renews each token once
//! `at_fraction` of its lifetime has passed (with jitter), and whenever a
//! request reports a 401 or finds no usable token. Failures back off
//! exponentially with jitter while the current token, if any, keeps
//! serving; rejected credentials back off much longer, so the token
//! endpoint is never hammered.

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

/// First pause after a transient failure; doubles up to `max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

pub async fn run(
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
        _ if cfg.lazy => Instant::now() + NEVER,
        _ => Instant::now(),
    };
    let mut failures: u32 = 0;
    let mut last_fetch: Option<Instant> = None;
    loop {
        let demanded = tokio::select! {
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
            _ = stop.changed() => return,
        };
        if demanded {
            // While backing off, a waiting request is answered from the
            // health record; it does not shorten the pause.
            if failures > 0 || !cell.needs_token() {
                continue;
            }
            if let Some(earliest) = last_fetch.map(|l| l + MIN_DEMAND_INTERVAL)
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
        let result = match tokio::time::timeout(cfg.token_timeout, Box::pin(source.fetch())).await {
            Ok(r) => r,
            Err(_) => Err(GrantError::Transient(format!(
                "no answer from the token endpoint within {:?}",
                cfg.token_timeout
            ))),
        };
        last_fetch = Some(requested_at);
        let previous = cell.health();
        let token = result.and_then(|granted| {
            Token::new(
                &granted,
                requested_at,
                cfg.at_fraction,
                cell.next_generation(),
            )
            .map_err(|_| GrantError::Transient("the access token is not a valid header".into()))
        });
        match token {
            Ok(token) => {
                failures = 0;
                next = token.refresh_at();
                tracing::info!(
                    tenant = name,
                    generation = token.generation(),
                    renew_in = ?token.refresh_at().saturating_duration_since(Instant::now()),
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
                next = Instant::now() + pause;
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
