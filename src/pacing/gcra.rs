//! One budget: the generic cell rate algorithm (GCRA) in its "virtual
//! scheduling" form, with each request's turn reserved at arrival by one
//! compare-and-swap on the theoretical arrival time (TAT). No lock, no
//! queue: the order in which reservations succeed *is* the queue, and each
//! request knows its exact turn at once.
//!
//! **Never more than N calls in any window of the period.** A plain GCRA
//! with a burst of N and an interval of period/N does not promise that (N
//! at once, then one more each interval, puts 2N−1 in the first period).
//! So a burst `b` is paid for with a longer interval: with
//! `interval = period / (N − b + 1)`, any N+1 consecutive turns span at
//! least `(N + 1 − b) × interval = period`. Each turn `s_k` is at least
//! `TAT_k − tolerance`, each reservation moves the TAT on by at least one
//! interval past its turn, so `s_{k+N} ≥ s_k + N × interval − tolerance`
//! with `tolerance = (b − 1) × interval`. A margin ([`GUARD`]) on top
//! keeps the limit when latency moves calls closer on their way.
//!
//! Times are nanoseconds since the owner's epoch, so that the arithmetic
//! (and its tests) need no clock.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::rate::Rate;

/// The interval is this much longer than the exact bound needs, so that
/// calls that meet jitter on the way (a scheduler, a network) still arrive
/// within the limit: 1/50, 2 %.
const GUARD_DIVISOR: u128 = 50;

/// The burst a limit of N allows at once: a tenth of it, at least one.
/// A script's few calls in a row go out at once, and the steady rate is
/// about 90 % of N (the price of the burst, see the module's comment).
pub(crate) fn burst(rate: Rate) -> u32 {
    (rate.calls / 10).max(1)
}

/// A reserved turn, and what the reservation changed (to give it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grant {
    /// When the request may be sent, in nanoseconds since the epoch.
    pub(crate) turn: u64,
    before: u64,
    after: u64,
}

#[derive(Debug)]
pub(crate) struct Gcra {
    tat: AtomicU64,
    /// Nanoseconds between turns, in the steady state.
    interval: AtomicU64,
    /// How far ahead of the TAT a request may go (the burst, less one).
    tolerance: AtomicU64,
    /// The whole rate (configured, or adopted from Criteo) and how many
    /// replicas share it: what `interval` and `tolerance` are computed
    /// from. Only the rare writers ([`Gcra::adopt`], [`Gcra::set_share`])
    /// take this lock, so that one's change never undoes the other's;
    /// [`Gcra::reserve`] reads only the atomics.
    basis: Mutex<(Rate, u32)>,
}

/// One replica's part of `rate` when `replicas` share it: an equal part,
/// rounded down so that the parts never add up to more than the whole,
/// and at least one call per period (with more replicas than calls, the
/// whole can be exceeded; a limit that small is not worth sharing).
pub(crate) fn share_of(rate: Rate, replicas: u32) -> Rate {
    Rate {
        calls: (rate.calls / replicas.max(1)).max(1),
        period: rate.period,
    }
}

/// `(interval, tolerance)` in nanoseconds for `rate`.
fn shape(rate: Rate) -> (u64, u64) {
    let n = u128::from(rate.calls);
    let b = u128::from(burst(rate));
    let period = rate.period.as_nanos();
    let interval = (period + period / GUARD_DIVISOR).div_ceil(n - b + 1);
    let interval = u64::try_from(interval).unwrap_or(u64::MAX).max(1);
    let tolerance = interval.saturating_mul(u64::from(burst(rate)) - 1);
    (interval, tolerance)
}

impl Gcra {
    pub(crate) fn new(rate: Rate) -> Self {
        let (interval, tolerance) = shape(rate);
        Self {
            tat: AtomicU64::new(0),
            interval: AtomicU64::new(interval),
            tolerance: AtomicU64::new(tolerance),
            basis: Mutex::new((rate, 1)),
        }
    }

    /// The turn a request would get now, not before `not_before`, without
    /// reserving it.
    pub(crate) fn peek(&self, not_before: u64) -> u64 {
        let tolerance = self.tolerance.load(Ordering::Relaxed);
        not_before.max(self.tat.load(Ordering::Acquire).saturating_sub(tolerance))
    }

    /// Reserves the next turn, not before `not_before`, if it comes within
    /// `max_wait` of `now`; otherwise reserves nothing and returns the turn
    /// it would have had.
    pub(crate) fn reserve(&self, now: u64, not_before: u64, max_wait: u64) -> Result<Grant, u64> {
        let interval = self.interval.load(Ordering::Relaxed);
        let tolerance = self.tolerance.load(Ordering::Relaxed);
        let mut before = self.tat.load(Ordering::Acquire);
        loop {
            let turn = not_before.max(before.saturating_sub(tolerance));
            if turn.saturating_sub(now) > max_wait {
                return Err(turn);
            }
            let after = before.max(turn).saturating_add(interval);
            match self
                .tat
                .compare_exchange_weak(before, after, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Ok(Grant {
                        turn,
                        before,
                        after,
                    });
                }
                Err(actual) => before = actual,
            }
        }
    }

    /// A request that will not be sent gives its turn back, if no turn
    /// was reserved after it; otherwise the turn stays unused (later turns
    /// were promised already, and an unused turn only errs on the safe
    /// side).
    pub(crate) fn give_back(&self, grant: Grant) -> bool {
        self.tat
            .compare_exchange(
                grant.after,
                grant.before,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// No turn before `until` (nanoseconds since the epoch): for a pause
    /// that Criteo asks for. Turns already reserved are kept; the next
    /// ones come after `until`, spaced as usual (no burst after a pause
    /// beyond the configured one).
    pub(crate) fn pause_until(&self, until: u64) {
        let tolerance = self.tolerance.load(Ordering::Relaxed);
        self.tat
            .fetch_max(until.saturating_add(tolerance), Ordering::AcqRel);
    }

    /// Paces to `rate` from now on (turns already reserved are kept),
    /// still shared by as many replicas as before.
    pub(crate) fn adopt(&self, rate: Rate) {
        self.reshape(|basis| basis.0 = rate);
    }

    /// Paces to one `replicas`-th of the whole rate from now on (turns
    /// already reserved are kept): raises or lowers the rate as replicas
    /// come and go.
    pub(crate) fn set_share(&self, replicas: u32) {
        self.reshape(|basis| basis.1 = replicas.max(1));
    }

    fn reshape(&self, change: impl FnOnce(&mut (Rate, u32))) {
        // A poisoned lock guards two plain values: carry on.
        let mut basis = self.basis.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut basis);
        let (interval, tolerance) = shape(share_of(basis.0, basis.1));
        self.interval.store(interval, Ordering::Relaxed);
        self.tolerance.store(tolerance, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rate(calls: u32, ms: u64) -> Rate {
        Rate {
            calls,
            period: Duration::from_millis(ms),
        }
    }

    const MS: u64 = 1_000_000;

    /// Arrival patterns from a small deterministic generator: bursts,
    /// gaps, trickles.
    fn arrivals(seed: u64, count: usize, spread_ms: u64) -> Vec<u64> {
        let mut x = seed | 1;
        let mut t = 0;
        (0..count)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Mostly together, sometimes a gap.
                if x.is_multiple_of(4) {
                    t += (x >> 8) % (spread_ms * MS);
                }
                t
            })
            .collect()
    }

    fn most_in_any_window(turns: &[u64], window: u64) -> usize {
        let mut sorted = turns.to_vec();
        sorted.sort_unstable();
        let mut most = 0;
        let mut start = 0;
        for end in 0..sorted.len() {
            while sorted[end] - sorted[start] >= window {
                start += 1;
            }
            most = most.max(end - start + 1);
        }
        most
    }

    #[test]
    fn never_more_than_n_in_any_window_of_the_period() {
        for (calls, period_ms) in [(1, 100), (3, 100), (10, 1000), (40, 60_000), (250, 60_000)] {
            let r = rate(calls, period_ms);
            for seed in 1..40 {
                let g = Gcra::new(r);
                let turns: Vec<u64> = arrivals(seed, 3 * calls as usize + 20, period_ms / 2)
                    .into_iter()
                    .map(|at| g.reserve(at, at, u64::MAX).unwrap().turn)
                    .collect();
                let most = most_in_any_window(&turns, period_ms * MS);
                assert!(
                    most <= calls as usize,
                    "{r}: {most} turns in one period (seed {seed})"
                );
            }
        }
    }

    #[test]
    fn turns_follow_arrival_order() {
        let g = Gcra::new(rate(10, 1000));
        let turns: Vec<u64> = arrivals(7, 100, 50)
            .into_iter()
            .map(|at| g.reserve(at, at, u64::MAX).unwrap().turn)
            .collect();
        assert!(turns.windows(2).all(|w| w[0] <= w[1]), "{turns:?}");
    }

    #[test]
    fn a_burst_of_a_tenth_goes_at_once_and_the_rest_is_spaced() {
        let g = Gcra::new(rate(250, 60_000));
        let turns: Vec<u64> = (0..30)
            .map(|_| g.reserve(0, 0, u64::MAX).unwrap().turn)
            .collect();
        assert!(turns[..25].iter().all(|&t| t == 0), "{turns:?}");
        assert!(turns[25] > 0 && turns[26] > turns[25], "{turns:?}");
    }

    #[test]
    fn a_turn_past_max_wait_is_refused_and_reserves_nothing() {
        let g = Gcra::new(rate(1, 1000));
        let first = g.reserve(0, 0, 0).unwrap();
        assert_eq!(first.turn, 0);
        let refused = g.reserve(0, 0, 500 * MS).unwrap_err();
        assert!(refused >= 1000 * MS);
        // Nothing was taken: the same wait is offered again.
        assert_eq!(g.reserve(0, 0, 500 * MS).unwrap_err(), refused);
        assert_eq!(g.reserve(0, 0, u64::MAX).unwrap().turn, refused);
    }

    #[test]
    fn a_turn_given_back_is_offered_again_only_if_it_was_the_last() {
        let g = Gcra::new(rate(1, 1000));
        g.reserve(0, 0, u64::MAX).unwrap();
        let second = g.reserve(0, 0, u64::MAX).unwrap();
        assert!(g.give_back(second));
        assert_eq!(g.reserve(0, 0, u64::MAX).unwrap().turn, second.turn);
        let third = g.reserve(0, 0, u64::MAX).unwrap();
        g.reserve(0, 0, u64::MAX).unwrap();
        assert!(!g.give_back(third), "a later turn was reserved after it");
    }

    #[test]
    fn a_pause_moves_every_next_turn_past_it_and_spaces_them() {
        let g = Gcra::new(rate(10, 1000));
        g.pause_until(5000 * MS);
        let a = g.reserve(0, 0, u64::MAX).unwrap().turn;
        let b = g.reserve(0, 0, u64::MAX).unwrap().turn;
        assert_eq!(a, 5000 * MS);
        assert!(b > a);
    }

    #[test]
    fn a_share_is_an_equal_part_rounded_down_and_at_least_one() {
        let calls = |n, k| share_of(rate(n, 2000), k).calls;
        assert_eq!(calls(12, 1), 12);
        assert_eq!(calls(12, 3), 4);
        assert_eq!(calls(250, 3), 83, "3 × 83 ≤ 250");
        assert_eq!(calls(10, 4), 2);
        assert_eq!(calls(2, 5), 1, "at least one per period");
        assert_eq!(calls(12, 0), 12, "no replica counted: the whole");
        assert_eq!(share_of(rate(12, 2000), 3).period, Duration::from_secs(2));
    }

    #[test]
    fn replicas_each_paced_to_their_share_stay_under_the_whole_together() {
        let whole = rate(12, 2000);
        for seed in 1..20 {
            let mut turns = Vec::new();
            for replica in 0..3 {
                let g = Gcra::new(whole);
                g.set_share(3);
                turns.extend(
                    arrivals(seed * 7 + replica, 60, 500)
                        .into_iter()
                        .map(|at| g.reserve(at, at, u64::MAX).unwrap().turn),
                );
            }
            let most = most_in_any_window(&turns, 2000 * MS);
            assert!(most <= 12, "{most} turns in one period (seed {seed})");
        }
    }

    #[test]
    fn a_share_raised_again_paces_to_the_whole_and_keeps_an_adopted_limit() {
        let g = Gcra::new(rate(12, 1200));
        g.set_share(3);
        assert_eq!(g.interval.load(Ordering::Relaxed), shape(rate(4, 1200)).0);
        g.set_share(1);
        assert_eq!(g.interval.load(Ordering::Relaxed), shape(rate(12, 1200)).0);
        g.adopt(rate(6, 1200));
        g.set_share(2);
        g.set_share(1);
        assert_eq!(g.interval.load(Ordering::Relaxed), shape(rate(6, 1200)).0);
    }

    #[test]
    fn an_adopted_lower_limit_spaces_the_next_turns_further() {
        let g = Gcra::new(rate(10, 1000));
        g.reserve(0, 0, u64::MAX).unwrap();
        let fast = g.reserve(0, 0, u64::MAX).unwrap().turn;
        g.adopt(rate(1, 1000));
        let slow = g.reserve(0, 0, u64::MAX).unwrap().turn;
        let slower = g.reserve(0, 0, u64::MAX).unwrap().turn;
        assert!(
            slow > fast && slower - slow >= 1000 * MS,
            "{fast} {slow} {slower}"
        );
    }
}
