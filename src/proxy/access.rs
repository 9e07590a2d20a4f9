//! Phase 5's access log: one line per request, only when its target is
//! enabled.

use std::time::{Duration, Instant};

use http::{Method, Request, StatusCode, Uri};
use hyper::body::Incoming;
use tracing::Level;

use crate::tenant::Tenant;

/// What phase 5 reports on a forwarded request.
#[derive(Debug)]
pub(super) struct Observed {
    pub(super) started: Instant,
    /// Method and URI for the access log line, only when its target is
    /// enabled (it costs a URI refcount and two clock reads).
    pub(super) access: Option<(Method, Uri)>,
    /// Time spent waiting for the upstream, when the access log wants it.
    pub(super) upstream_time: Option<Duration>,
    /// Time spent waiting for a turn under the tenant's rate limit.
    pub(super) waited: Option<Duration>,
}

impl Observed {
    pub(super) fn start(req: &Request<Incoming>, started: Instant) -> Self {
        let access = tracing::enabled!(target: ACCESS_LOG, Level::INFO)
            .then(|| (req.method().clone(), req.uri().clone()));
        let upstream_time = access.as_ref().map(|_| Duration::ZERO);
        Self {
            started,
            access,
            upstream_time,
            waited: None,
        }
    }
}

/// The target of the one line logged per request.
pub(crate) const ACCESS_LOG: &str = "criteo_token_proxy::access";

/// One line per request: tenant, method, path, status, total and upstream
/// latency (time to response headers), and the wait for a turn under the
/// tenant's rate limit. The query string can carry
/// identifiers, so it is logged only at debug level.
pub(super) fn access_log(
    tenant: &Tenant,
    method: &Method,
    uri: &Uri,
    status: StatusCode,
    total: Duration,
    upstream: Option<Duration>,
    waited: Option<Duration>,
) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let upstream_ms = upstream.map_or(0.0, ms);
    let wait_ms = waited.map_or(0.0, ms);
    if tracing::enabled!(target: ACCESS_LOG, Level::DEBUG) {
        tracing::debug!(
            target: ACCESS_LOG,
            tenant = &*tenant.name,
            method = method.as_str(),
            path = uri.path(),
            query = uri.query().unwrap_or(""),
            status = status.as_u16(),
            total_ms = ms(total),
            upstream_ms,
            wait_ms,
            "request"
        );
    } else {
        tracing::info!(
            target: ACCESS_LOG,
            tenant = &*tenant.name,
            method = method.as_str(),
            path = uri.path(),
            status = status.as_u16(),
            total_ms = ms(total),
            upstream_ms,
            wait_ms,
            "request"
        );
    }
}
