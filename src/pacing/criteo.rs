//! What the pacer learns from Criteo's 429s: a new turn for the request
//! Criteo refused (reserved before its answer's body is drained, so that a
//! turn too far away leaves that answer untouched for the client), and a
//! lower limit than configured.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::gcra::Grant;
use super::{Pacing, Rate, Refused};

/// A turn reserved for a request to send again; it waits with
/// [`Turn::wait`]. Dropped unused, it stays unused (the safe side).
#[derive(Debug)]
pub(crate) struct Turn<'a> {
    pacing: &'a Pacing,
    grants: [Option<Grant>; 2],
    turn: u64,
}

impl Turn<'_> {
    /// Waits for the turn (and, if Criteo asks for another pause
    /// meanwhile, for a new one after it); `Err` if that new one is
    /// further than `max_wait`. Returns how long it waited.
    pub(crate) async fn wait(self, path: &str) -> Result<Duration, Refused> {
        let started = Instant::now();
        let p = self.pacing;
        if self.turn > p.nanos(started) {
            Box::pin(p.wait(path, self.grants, self.turn)).await?;
        }
        Ok(started.elapsed())
    }
}

impl Pacing {
    /// A new turn for a request Criteo answered 429, not further than
    /// `max_wait` from now (after the pause that answer asked for, which
    /// the caller has set).
    pub(crate) fn turn_again(&self, path: &str) -> Result<Turn<'_>, Refused> {
        let now = self.nanos(Instant::now());
        let grants = self.reserve(path, now)?;
        let turn = grants[0].map_or(now, |g| g.turn);
        Ok(Turn {
            pacing: self,
            grants,
            turn,
        })
    }

    /// Criteo's `x-ratelimit-limit` for a request on `path`: `calls` per
    /// window, taken to be the configured period (Criteo does not say
    /// it). If that is less than the budget the path counts against (its
    /// reporting budget on a reporting path, else the whole one) paces now,
    /// that budget adopts it: returns `(before, now)` to be logged.
    pub(crate) fn learn_limit(&self, path: &str, calls: u32) -> Option<(Rate, Rate)> {
        let reporting = self
            .reporting
            .as_ref()
            .filter(|r| r.paths.matches(path))
            .zip(self.limits.reporting.as_ref());
        let (slot, configured) = match reporting {
            Some((_, (rate, _))) => (1, *rate),
            None => (0, self.limits.overall?),
        };
        let in_effect = |learnt: u32| {
            if learnt == 0 {
                configured.calls
            } else {
                learnt
            }
        };
        let lower = |learnt: u32| (calls > 0 && calls < in_effect(learnt)).then_some(calls);
        let learnt = self.learnt[slot]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, lower)
            .ok()?;
        let adopted = Rate {
            calls,
            ..configured
        };
        match reporting {
            Some((r, _)) => r.budget.adopt(adopted),
            None => self.adopt_limit(adopted),
        }
        let before = Rate {
            calls: in_effect(learnt),
            ..configured
        };
        Some((before, adopted))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Globs, Limits};
    use super::*;

    const REPORT: &str = "/v/statistics/report";

    fn pacing(overall: &str, reporting: Option<&str>) -> Pacing {
        Pacing::new(Limits {
            overall: Some(Rate::parse(overall).unwrap()),
            reporting: reporting.map(|r| {
                let globs = Globs::new(&["/*/statistics/report".to_owned()]).unwrap();
                (Rate::parse(r).unwrap(), globs)
            }),
            max_wait: Duration::from_secs(10),
        })
        .unwrap()
    }

    #[test]
    fn a_lower_limit_is_adopted_once_and_a_higher_one_never() {
        let p = pacing("100/sec", None);
        assert_eq!(p.learn_limit("/v/x", 200), None);
        assert_eq!(p.learn_limit("/v/x", 100), None);
        let (before, now) = p.learn_limit("/v/x", 10).unwrap();
        assert_eq!(
            (before.to_string(), now.to_string()),
            ("100/sec".into(), "10/sec".into())
        );
        assert_eq!(p.learn_limit("/v/x", 10), None, "logged once");
        assert_eq!(p.learn_limit("/v/x", 50), None);
        assert!(p.learn_limit("/v/x", 5).is_some(), "lower still: adopted");
    }

    #[test]
    fn a_reporting_paths_limit_is_its_reporting_budgets() {
        let p = pacing("250/min", Some("40/min"));
        let (before, now) = p.learn_limit(REPORT, 20).unwrap();
        assert_eq!((before.calls, now.calls), (40, 20));
        // The tenant's whole budget still has its configured 250.
        assert_eq!(p.learn_limit("/v/x", 200).unwrap().0.calls, 250);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_request_takes_a_new_turn_after_a_pause() {
        let p = pacing("1/sec", None);
        let start = Instant::now();
        assert_eq!(p.admit("/v/x").await.unwrap(), None);
        // Its turn is about a second away; Criteo asks for five.
        let waiter = p.admit("/v/x");
        let pause = async {
            tokio::task::yield_now().await;
            p.pause_until(start + Duration::from_secs(5));
        };
        let (waited, ()) = tokio::join!(waiter, pause);
        assert!(waited.unwrap().unwrap() >= Duration::from_secs(5));
        // And the request refused by Criteo gets the turn after it.
        let turn = p.turn_again("/v/x").unwrap();
        turn.wait("/v/x").await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(6));
    }
}
