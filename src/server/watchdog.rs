//! A connection's watchdog (`conn.rs`): the rule it applies when its one
//! timer fires, and the waker its timer is polled with.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use super::conn::Timeouts;

/// What the watchdog decides when its timer fires.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Look again at this instant.
    Wait(Instant),
    /// Idle for too long: close gracefully.
    Idle,
    /// Close now.
    Drop,
}

/// What the watchdog knows of its connection when its timer fires.
#[derive(Debug, Clone, Copy)]
pub(super) struct Seen {
    /// Requests whose response has not ended.
    pub(super) open: usize,
    /// How long ago the last response ended (`None`: no request yet).
    pub(super) since: Option<Duration>,
    /// Whether a graceful close was already asked for.
    pub(super) closing: bool,
    /// HTTP/2, whose next request head is not timed (its streams are).
    pub(super) h2: bool,
}

/// The watchdog's rule, given what it sees at `now`.
pub(super) fn verdict(seen: Seen, now: Instant, t: Timeouts) -> Verdict {
    let later = |d: Duration| Verdict::Wait(now.checked_add(d).unwrap_or(now));
    // How long an HTTP/1.1 connection may wait for its next head: looked
    // at that often while a request is open, so that the deadline after
    // its end is met on time.
    let quiet = if seen.h2 {
        t.idle
    } else {
        t.idle.min(t.header_read)
    };
    match seen.since {
        _ if seen.open > 0 => later(quiet),
        // No complete request head within header_read_timeout.
        None => Verdict::Drop,
        // A graceful close that did not end the connection.
        Some(_) if seen.closing => Verdict::Drop,
        // HTTP/1.1: no next head within header_read_timeout.
        Some(idle) if !seen.h2 && idle >= t.header_read => Verdict::Drop,
        Some(idle) if idle >= t.idle => Verdict::Idle,
        // Below both limits here: `quiet - idle` is positive.
        Some(idle) => later(quiet - idle),
    }
}

/// The waker the watchdog's timer and `stop` are polled with: notes that
/// one of them woke the task, so that the task's many other wake-ups (its
/// socket, its upstream connections: a few per request) poll only the
/// connection, not the timer and `stop` as well.
#[derive(Debug)]
pub(super) struct Alarm {
    rung: AtomicBool,
    task: Waker,
}

impl Wake for Alarm {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ring();
        self.task.wake_by_ref();
    }
}

impl Alarm {
    /// Whether the timer or `stop` woke the task since the last call.
    pub(super) fn answer(&self) -> bool {
        self.rung.swap(false, Ordering::AcqRel)
    }

    /// Has the next poll look at the timer and `stop` again.
    pub(super) fn ring(&self) {
        self.rung.store(true, Ordering::Release);
    }

    /// The alarm that wakes `task`: `alarm`, or a new one (rung, so that
    /// the timer and `stop` register it) for a first poll or a task whose
    /// waker changed.
    pub(super) fn for_task<'a>(
        alarm: &'a mut Option<(Arc<Self>, Waker)>,
        task: &Waker,
    ) -> &'a (Arc<Self>, Waker) {
        if !alarm.as_ref().is_some_and(|(a, _)| a.task.will_wake(task)) {
            *alarm = None;
        }
        alarm.get_or_insert_with(|| {
            let bell = Arc::new(Self {
                rung: AtomicBool::new(true),
                task: task.clone(),
            });
            let waker = Waker::from(Arc::clone(&bell));
            (bell, waker)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header_read: Duration::from_secs(30),
        idle: Duration::from_secs(60),
    };

    /// What the watchdog sees: `open` requests, the last response ended
    /// `since` ago, on an HTTP/2 connection if `h2`.
    fn seen(open: usize, since: Option<u64>, closing: bool, h2: bool) -> Seen {
        Seen {
            open,
            since: since.map(Duration::from_secs),
            closing,
            h2,
        }
    }

    #[test]
    fn a_connection_without_a_request_is_dropped_at_the_first_deadline() {
        let now = Instant::now();
        for h2 in [false, true] {
            assert_eq!(verdict(seen(0, None, false, h2), now, T), Verdict::Drop);
        }
    }

    #[test]
    fn a_connection_with_a_request_in_progress_is_left_alone() {
        let now = Instant::now();
        for (h2, every) in [(true, T.idle), (false, T.header_read)] {
            let later = Verdict::Wait(now + every);
            assert_eq!(verdict(seen(1, None, false, h2), now, T), later);
            assert_eq!(verdict(seen(2, Some(600), false, h2), now, T), later);
            assert_eq!(verdict(seen(1, Some(0), true, h2), now, T), later);
        }
    }

    #[test]
    fn an_idle_http2_connection_is_closed_gracefully_then_dropped() {
        let now = Instant::now();
        assert_eq!(
            verdict(seen(0, Some(20), false, true), now, T),
            Verdict::Wait(now + Duration::from_secs(40)),
            "looks again when the idle time is up"
        );
        assert_eq!(
            verdict(seen(0, Some(60), false, true), now, T),
            Verdict::Idle
        );
        assert_eq!(
            verdict(seen(0, Some(60), true, true), now, T),
            Verdict::Drop
        );
    }

    #[test]
    fn an_http1_connection_without_its_next_head_in_time_is_dropped() {
        let now = Instant::now();
        assert_eq!(
            verdict(seen(0, Some(20), false, false), now, T),
            Verdict::Wait(now + Duration::from_secs(10)),
            "looks again when the header read time is up"
        );
        assert_eq!(
            verdict(seen(0, Some(30), false, false), now, T),
            Verdict::Drop
        );
        // An idle time shorter than the header read time comes first.
        let short = Timeouts {
            header_read: Duration::from_secs(30),
            idle: Duration::from_secs(10),
        };
        assert_eq!(
            verdict(seen(0, Some(10), false, false), now, short),
            Verdict::Idle
        );
        assert_eq!(
            verdict(seen(0, Some(5), false, false), now, short),
            Verdict::Wait(now + Duration::from_secs(5))
        );
    }
}
