//! Connections closed at accept, before any HTTP: clients outside
//! `server.allowed_clients`, and connections over either listener's cap.
//! Each is counted in the metrics; the log gets at most one line per period
//! and kind, so a flood of connections is not a flood of lines.

use std::net::SocketAddr;
use std::time::Instant;

use super::conn::Refusals;
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
