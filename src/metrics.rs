//! Prometheus metrics. [`Metrics`] owns its registry (no global macros) and
//! hands each tenant handles that are resolved once, on first use, so the
//! request path does no label hashing for the common statuses.

use std::collections::HashMap;
use std::sync::OnceLock;

use http::StatusCode;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    refreshes: IntCounterVec,
    retries: IntCounterVec,
    expiry: prometheus::GaugeVec,
    consent_required: IntCounterVec,
    consent_callbacks: IntCounterVec,
    connections_refused: IntCounterVec,
    store_errors: IntCounterVec,
    rate_limited: IntCounterVec,
    rate_limit_wait: HistogramVec,
}

/// The statuses whose counters are resolved once per tenant.
const COMMON: [u16; 14] = [
    200, 201, 204, 400, 401, 403, 404, 409, 429, 500, 502, 503, 504, 206,
];

/// `criteo_proxy_store_errors_total{op}`, handed to the token store;
/// the default counts nothing (`store copy`, tests).
#[derive(Debug, Clone, Default)]
pub(crate) struct StoreErrors(Option<IntCounterVec>);

impl StoreErrors {
    /// A failed store operation: `op` is one of get, put, lease, feed,
    /// connect, migrate.
    pub(crate) fn inc(&self, op: &'static str) {
        if let Some(c) = &self.0 {
            c.with_label_values(&[op]).inc();
        }
    }
}

/// Outcomes of a token request, the `outcome` label.
#[derive(Debug, Clone, Copy)]
pub enum RefreshOutcome {
    Success,
    /// The token endpoint rejected the credentials (e.g. `invalid_client`).
    Rejected,
    /// Network error, timeout, 5xx, unreadable answer.
    Error,
    /// A refresh-token tenant needs a new consent.
    ConsentRequired,
}

impl RefreshOutcome {
    pub(crate) fn label(self) -> &'static str {
        match self {
            RefreshOutcome::Success => "success",
            RefreshOutcome::Rejected => "rejected",
            RefreshOutcome::Error => "error",
            RefreshOutcome::ConsentRequired => "consent_required",
        }
    }
}

impl Metrics {
    pub fn new(registry: Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "criteo_proxy_requests_total",
                "Requests answered by the proxy listener, by tenant and status.",
            ),
            &["tenant", "status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "criteo_proxy_request_duration_seconds",
                "Time from request to response headers, by tenant.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["tenant"],
        )
        .expect("valid metric");
        let refreshes = IntCounterVec::new(
            Opts::new(
                "criteo_proxy_token_refreshes_total",
                "Calls to the token endpoint, by tenant and outcome.",
            ),
            &["tenant", "outcome"],
        )
        .expect("valid metric");
        let retries = IntCounterVec::new(
            Opts::new(
                "criteo_proxy_upstream_retries_total",
                "Requests replayed with a fresh token after an upstream 401.",
            ),
            &["tenant"],
        )
        .expect("valid metric");
        let expiry = prometheus::GaugeVec::new(
            Opts::new(
                "criteo_proxy_token_expiry_seconds",
                "Seconds until the tenant's current access token expires (0 when none).",
            ),
            &["tenant"],
        )
        .expect("valid metric");
        let consent_required = IntCounterVec::new(
            Opts::new(
                "criteo_proxy_consent_required_total",
                "Times a refresh-token tenant lost its consent and needs a person to consent again.",
            ),
            &["tenant"],
        )
        .expect("valid metric");
        let consent_callbacks = IntCounterVec::new(
            Opts::new(
                "criteo_proxy_consent_callbacks_total",
                "Consent callbacks from Criteo with a valid signature, by type.",
            ),
            &["type"],
        )
        .expect("valid metric");
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "criteo_proxy_connections_refused_total",
                "Connections closed at accept, by listener and reason (allowed_clients, max_connections).",
            ),
            &["listener", "reason"],
        )
        .expect("valid metric");
        let store_errors = IntCounterVec::new(
            Opts::new(
                "criteo_proxy_store_errors_total",
                "Token store operations that failed, by operation (get, put, lease, feed, connect, migrate).",
            ),
            &["op"],
        )
        .expect("valid metric");
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "criteo_proxy_rate_limited_total",
                "Requests refused for a rate limit, by tenant and by whom: proxy (its queue was too long, nothing forwarded) or criteo (Criteo answered 429).",
            ),
            &["tenant", "by"],
        )
        .expect("valid metric");
        let rate_limit_wait = HistogramVec::new(
            HistogramOpts::new(
                "criteo_proxy_rate_limit_wait_seconds",
                "Time a request waited for its turn under its tenant's rate limit (requests that waited).",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0]),
            &["tenant"],
        )
        .expect("valid metric");
        for c in [
            Box::new(consent_required.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(rate_limited.clone()),
            Box::new(rate_limit_wait.clone()),
            Box::new(store_errors.clone()),
            Box::new(connections_refused.clone()),
            Box::new(consent_callbacks.clone()),
            Box::new(requests.clone()),
            Box::new(duration.clone()),
            Box::new(refreshes.clone()),
            Box::new(retries.clone()),
            Box::new(expiry.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            duration,
            refreshes,
            retries,
            expiry,
            consent_required,
            consent_callbacks,
            connections_refused,
            store_errors,
            rate_limited,
            rate_limit_wait,
        }
    }

    /// The counter of failed token store operations, for the store.
    pub(crate) fn store_errors(&self) -> StoreErrors {
        StoreErrors(Some(self.store_errors.clone()))
    }

    /// A connection was closed at accept.
    pub fn connection_refused(&self, listener: &str, reason: &str) {
        self.connections_refused
            .with_label_values(&[listener, reason])
            .inc();
    }

    /// A signed consent callback was accepted.
    pub fn consent_callback(&self, kind: &str) {
        let kind = match kind {
            "ConsentGranted" | "ConsentDenied" => kind,
            _ => "other",
        };
        self.consent_callbacks.with_label_values(&[kind]).inc();
    }

    /// Handles for one tenant. Each series is created on first use (so
    /// 10,000 idle tenants cost no series) and then kept: later uses are
    /// one atomic load, no label hashing.
    pub fn tenant(&self, name: &str) -> TenantMetrics {
        TenantMetrics {
            name: name.into(),
            vecs: self.clone(),
            common: Default::default(),
            duration: OnceLock::new(),
            retries: OnceLock::new(),
            expiry: OnceLock::new(),
            rate_limited: OnceLock::new(),
            rate_limit_wait: OnceLock::new(),
        }
    }

    /// Handles for one tenant's refresher.
    pub fn refresher(&self, name: &str) -> RefreshMetrics {
        RefreshMetrics {
            name: name.into(),
            vecs: self.clone(),
            consent_required: OnceLock::new(),
        }
    }

    /// Requests answered with no tenant to count them under (counted with
    /// `tenant=""`): an unknown tenant, a client outside the allow-list,
    /// the proxy's own local answers.
    pub fn request_without_tenant(&self, status: StatusCode) {
        self.requests
            .with_label_values(&["", status.as_str()])
            .inc();
    }

    /// Deletes every series of a tenant that is no longer configured, so
    /// that a removed tenant does not stay in the exposition forever.
    pub fn forget(&self, tenant: &str) {
        forget_in(&self.requests, tenant);
        forget_in(&self.refreshes, tenant);
        forget_in(&self.retries, tenant);
        forget_in(&self.consent_required, tenant);
        forget_in(&self.duration, tenant);
        forget_in(&self.expiry, tenant);
        forget_in(&self.rate_limited, tenant);
        forget_in(&self.rate_limit_wait, tenant);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(8 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

/// Removes every series of `vec` whose `tenant` label is `tenant`.
fn forget_in<T: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<T>,
    tenant: &str,
) {
    use prometheus::core::Collector;
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if labels.get("tenant") == Some(&tenant) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

#[derive(Debug)]
pub struct TenantMetrics {
    name: Box<str>,
    vecs: Metrics,
    common: [OnceLock<IntCounter>; COMMON.len()],
    duration: OnceLock<Histogram>,
    retries: OnceLock<IntCounter>,
    expiry: OnceLock<prometheus::Gauge>,
    rate_limited: OnceLock<IntCounter>,
    rate_limit_wait: OnceLock<Histogram>,
}

/// What a refresher counts.
#[derive(Debug)]
pub struct RefreshMetrics {
    name: Box<str>,
    vecs: Metrics,
    consent_required: OnceLock<IntCounter>,
}

impl RefreshMetrics {
    pub fn refresh(&self, outcome: RefreshOutcome) {
        self.vecs
            .refreshes
            .with_label_values(&[&self.name, outcome.label()])
            .inc();
    }

    pub fn consent_required(&self) {
        self.consent_required
            .get_or_init(|| self.vecs.consent_required.with_label_values(&[&self.name]))
            .inc();
    }
}

impl TenantMetrics {
    #[inline]
    pub fn request(&self, status: StatusCode, seconds: f64) {
        let code = status.as_u16();
        match COMMON.iter().position(|&s| s == code) {
            Some(i) => self.common[i]
                .get_or_init(|| {
                    self.vecs
                        .requests
                        .with_label_values(&[&self.name, status.as_str()])
                })
                .inc(),
            None => self
                .vecs
                .requests
                .with_label_values(&[&self.name, status.as_str()])
                .inc(),
        }
        self.duration
            .get_or_init(|| self.vecs.duration.with_label_values(&[&self.name]))
            .observe(seconds);
    }

    pub fn retry(&self) {
        self.retries
            .get_or_init(|| self.vecs.retries.with_label_values(&[&self.name]))
            .inc();
    }

    /// A request answered 429 `rate_limited` by the proxy itself.
    pub(crate) fn rate_limited_by_proxy(&self) {
        self.rate_limited
            .get_or_init(|| {
                self.vecs
                    .rate_limited
                    .with_label_values(&[&self.name, "proxy"])
            })
            .inc();
    }

    /// A 429 from Criteo to a tenant with a limit (rare: no handle kept).
    pub(crate) fn rate_limited_by_criteo(&self) {
        self.vecs
            .rate_limited
            .with_label_values(&[&self.name, "criteo"])
            .inc();
    }

    /// A request waited this long for its turn.
    pub(crate) fn rate_limit_wait(&self, seconds: f64) {
        self.rate_limit_wait
            .get_or_init(|| self.vecs.rate_limit_wait.with_label_values(&[&self.name]))
            .observe(seconds);
    }

    /// Sets the gauge; a tenant that never had a token gets no series.
    pub fn set_expiry(&self, seconds: f64) {
        match self.expiry.get() {
            Some(g) => g.set(seconds),
            None if seconds > 0.0 => self
                .expiry
                .get_or_init(|| self.vecs.expiry.with_label_values(&[&self.name]))
                .set(seconds),
            None => {}
        }
    }
}
