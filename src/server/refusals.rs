//! Connections closed at accept, before any HTTP: clients outside
//! `server.allowed_clients`, and connections over either listener's cap.
//! Each is counted in the metrics; the log gets at most one line per period
//! and kind, so a flood of connections is not a flood of lines.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// Whether `server.allowed_clients` (if set) lets a client at `peer` in.
pub(super) fn allowed(nets: Option<&[ipnet::IpNet]>, peer: SocketAddr) -> bool {
    let ip = peer.ip().to_canonical();
    nets.is_none_or(|nets| nets.iter().any(|n| n.contains(&ip)))
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy)]
pub(super) enum Refusal {
    NotAllowed,
    ProxyFull,
    AdminFull,
}

impl Refusal {
    /// The metric's `listener` and `reason` labels.
    fn labels(self) -> (&'static str, &'static str) {
        match self {
            Refusal::NotAllowed => ("proxy", "allowed_clients"),
            Refusal::ProxyFull => ("proxy", "max_connections"),
            Refusal::AdminFull => ("admin", "max_connections"),
        }
    }
}

/// Counts refused connections in the metrics, and logs them at most once
/// per period per kind (a flood of connections is not a flood of lines).
#[derive(Debug)]
pub(super) struct Refused {
    metrics: Metrics,
    logs: [Refusals; 3],
}

impl Refused {
    pub(super) fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            logs: [Refusals::new(), Refusals::new(), Refusals::new()],
        }
    }

    /// Counts one refusal of a client at `peer`.
    pub(super) fn count(&mut self, why: Refusal, peer: SocketAddr) {
        let (listener, reason) = why.labels();
        self.metrics.connection_refused(listener, reason);
        let Some(n) = self.logs[why as usize].refused(Instant::now()) else {
            return;
        };
        match why {
            Refusal::NotAllowed => tracing::warn!(
                refused = n,
                client = %peer.ip(),
                "connections from outside server.allowed_clients closed at accept (count since the last such line)"
            ),
            Refusal::ProxyFull => tracing::warn!(
                refused = n,
                "server.max_connections reached: connections closed at accept (count since the last such line)"
            ),
            Refusal::AdminFull => tracing::warn!(
                refused = n,
                "server.admin_max_connections reached: connections closed at accept (count since the last such line)"
            ),
        }
    }
}

/// How often a kind of refused connection is logged at most.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Refused connections, logged at most once per [`REFUSAL_LOG_EVERY`] with
/// how many were refused since the last line: a flood of connections must
/// not become a flood of log lines.
#[derive(Debug)]
pub(super) struct Refusals {
    last_line: Option<Instant>,
    unlogged: u64,
}

impl Refusals {
    pub(super) fn new() -> Self {
        Self {
            last_line: None,
            unlogged: 0,
        }
    }

    /// Counts one refusal at `now`; `Some(n)` when a line is due, `n`
    /// being the refusals it reports (this one included).
    pub(super) fn refused(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        let due = self
            .last_line
            .is_none_or(|l| now.saturating_duration_since(l) >= REFUSAL_LOG_EVERY);
        if !due {
            return None;
        }
        self.last_line = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_once_per_period_with_a_count() {
        let mut r = Refusals::new();
        let t0 = Instant::now();
        assert_eq!(r.refused(t0), Some(1), "the first one at once");
        for i in 1..1000 {
            assert_eq!(r.refused(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(r.refused(t0 + REFUSAL_LOG_EVERY), Some(1000));
        assert_eq!(r.refused(t0 + REFUSAL_LOG_EVERY), None);
    }
}
