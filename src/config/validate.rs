//! From what was written to a [`Config`]: every key checked, every bad one
//! named by its dotted path, all of them reported before failing.

mod tenants;

use std::collections::BTreeMap;
use std::time::Duration;

use http::HeaderName;
use secrecy::ExposeSecret;
use url::Url;

use self::tenants::{store, tenants};
use super::raw::{
    RawConfig, RawConsent, RawRateLimit, RawRefresh, RawServer, RawTenant, RawUpstream,
};
use super::secret::{SecretSource, check_admin_token, secret_pair};
use super::{
    Config, ConfigError, ConsentConfig, RateLimitConfig, RefreshConfig, ServerConfig,
    UpstreamConfig, read_roots,
};
use crate::pacing::{Globs, Rate};

// === bounds ===
//
// A value past these is a mistake, and some would crash the process later:
// `Instant + 3e11 years` panics, so does a semaphore of 2^61 permits.

/// Every timeout and back-off.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// `server.shutdown_grace`: Kubernetes waits `terminationGracePeriodSeconds`.
const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(3600);
const MAX_CONNECTIONS: usize = 1_000_000;
const MAX_REPLAY_BODY: u64 = 64 * 1024 * 1024;
const MAX_HEADER_BYTES: u64 = 1024 * 1024;
const MAX_REPLAY_BUDGET: u64 = 1024 * 1024 * 1024;

/// More than zero, at most `max`.
fn duration_within(key: &str, d: Duration, max: Duration, bad: &mut impl FnMut(&str, String)) {
    if d.is_zero() {
        bad(key, "must be more than 0s".into());
    } else if d > max {
        bad(
            key,
            format!(
                "{} is more than the {} allowed",
                humantime::format_duration(d),
                humantime::format_duration(max)
            ),
        );
    }
}

/// The size in bytes, if within `range`.
fn size_within(
    key: &str,
    size: bytesize::ByteSize,
    range: std::ops::RangeInclusive<u64>,
    bad: &mut impl FnMut(&str, String),
) -> usize {
    let n = size.as_u64();
    if !range.contains(&n) {
        let show = |b: u64| bytesize::ByteSize::b(b).display().iec().to_string();
        bad(
            key,
            format!(
                "{n} bytes is outside {} … {}",
                show(*range.start()),
                show(*range.end())
            ),
        );
    }
    usize::try_from(n.min(*range.end())).unwrap_or(usize::MAX)
}

impl RawConfig {
    /// Every section checked, every bad key named, then all of them
    /// reported at once.
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, msg: String| problems.push(format!("{key}: {msg}"));
        let server = server(self.server, &self.tenants, &mut bad);
        let upstream = upstream(self.upstream, &mut bad);
        let refresh = refresh(self.refresh, &mut bad);
        let rate_limit = rate_limit(self.rate_limit, &mut bad);
        let consent = self.consent.and_then(|c| consent(c, &mut bad));
        if self.tenants.is_empty() {
            bad(
                "tenants",
                "no tenant is configured; add a [tenants.NAME] section".into(),
            );
        }
        let tenants = tenants(self.tenants, &mut bad);
        let store = store(self.store, &tenants, &mut bad);
        match upstream {
            Some(upstream) if problems.is_empty() => Ok(Config {
                server,
                upstream,
                refresh,
                store,
                rate_limit,
                consent,
                tenants,
                file_digest: None,
            }),
            _ => Err(ConfigError { problems }),
        }
    }
}

/// `[server]`. `tenant_names` is what `default_tenant` may name.
fn server(
    raw: RawServer,
    tenant_names: &BTreeMap<String, RawTenant>,
    bad: &mut impl FnMut(&str, String),
) -> ServerConfig {
    let tenant_header = match HeaderName::from_bytes(raw.tenant_header.as_bytes()) {
        Ok(h) => h,
        Err(_) => {
            bad(
                "server.tenant_header",
                format!("{:?} is not a valid header name", raw.tenant_header),
            );
            HeaderName::from_static("x-criteo-tenant")
        }
    };
    if let Some(d) = &raw.default_tenant
        && !tenant_names.contains_key(d)
    {
        bad(
            "server.default_tenant",
            format!("names {d:?}, which is not a configured tenant"),
        );
    }
    let max_replay_body = size_within(
        "server.max_replay_body",
        raw.max_replay_body,
        0..=MAX_REPLAY_BODY,
        bad,
    );
    if let Some(w) = raw.workers
        && !(1..=256).contains(&w)
    {
        bad("server.workers", format!("{w} must be between 1 and 256"));
    }
    if !(1..=MAX_CONNECTIONS).contains(&raw.max_connections) {
        bad(
            "server.max_connections",
            format!(
                "{} must be between 1 and {MAX_CONNECTIONS}",
                raw.max_connections
            ),
        );
    }
    // Connection limits and their timers: counts a semaphore can hold,
    // durations a deadline can be computed from.
    for (key, n) in [("server.admin_max_connections", raw.admin_max_connections)] {
        if !(1..=MAX_CONNECTIONS).contains(&n) {
            bad(key, format!("{n} must be between 1 and {MAX_CONNECTIONS}"));
        }
    }
    for (key, d) in [
        ("server.idle_timeout", raw.idle_timeout),
        ("server.body_read_timeout", raw.body_read_timeout),
    ] {
        duration_within(key, d, MAX_TIMEOUT, bad);
    }
    let replay_budget = size_within(
        "server.replay_budget",
        raw.replay_budget,
        1..=MAX_REPLAY_BUDGET,
        bad,
    );
    let max_header_bytes = size_within(
        "server.max_header_bytes",
        raw.max_header_bytes,
        8 * 1024..=MAX_HEADER_BYTES,
        bad,
    );
    duration_within(
        "server.header_read_timeout",
        raw.header_read_timeout,
        MAX_TIMEOUT,
        bad,
    );
    duration_within(
        "server.shutdown_grace",
        raw.shutdown_grace,
        MAX_SHUTDOWN_GRACE,
        bad,
    );
    let admin_token = match (raw.admin_token, raw.admin_token_file) {
        (None, None) => None,
        (inline, file) => secret_pair("server.admin_token", inline, file, bad).filter(|src| {
            let key = match src {
                SecretSource::Inline(_) => "server.admin_token",
                SecretSource::File(_) => "server.admin_token_file",
            };
            match src.load().map(|t| check_admin_token(t.expose_secret())) {
                Ok(Err(e)) | Err(e) => {
                    bad(key, e);
                    false
                }
                Ok(Ok(())) => true,
            }
        }),
    };
    if raw.listen == raw.admin_listen && raw.listen.port() != 0 {
        bad(
            "server.admin_listen",
            format!("is the same address as server.listen ({})", raw.listen),
        );
    }

    ServerConfig {
        listen: raw.listen,
        admin_listen: raw.admin_listen,
        tenant_header,
        default_tenant: raw.default_tenant,
        max_replay_body,
        shutdown_grace: raw.shutdown_grace,
        allowed_clients: raw.allowed_clients,
        workers: raw.workers,
        max_connections: raw.max_connections,
        max_header_bytes,
        header_read_timeout: raw.header_read_timeout,
        admin_token,
        idle_timeout: raw.idle_timeout,
        body_read_timeout: raw.body_read_timeout,
        admin_max_connections: raw.admin_max_connections,
        replay_budget,
    }
}

/// `[upstream]`; `None` when a URL is unusable.
fn upstream(raw: RawUpstream, bad: &mut impl FnMut(&str, String)) -> Option<UpstreamConfig> {
    let mut url = |key: &str, value: &str| match Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
        Ok(_) => {
            bad(
                key,
                format!("{value:?} must be an http:// or https:// URL with a host"),
            );
            None
        }
        Err(e) => {
            bad(key, format!("{value:?} is not a URL: {e}"));
            None
        }
    };
    let upstream_url = url("upstream.url", &raw.url);
    let token_url = url("upstream.token_url", &raw.token_url);
    let consent_url = url("upstream.consent_url", &raw.consent_url);
    if let Some(u) = &upstream_url
        && (u.query().is_some() || u.fragment().is_some())
    {
        bad("upstream.url", "must not carry a query or fragment".into());
    }
    let extra_roots = match &raw.ca_file {
        None => None,
        Some(p) => match read_roots(p) {
            Ok(r) => Some(r),
            Err(e) => {
                bad("upstream.ca_file", e);
                None
            }
        },
    };
    for (key, d) in [
        ("upstream.connect_timeout", raw.connect_timeout),
        ("upstream.timeout", raw.timeout),
    ] {
        duration_within(key, d, MAX_TIMEOUT, bad);
    }
    let n = raw.max_connections;
    if !(1..=MAX_CONNECTIONS).contains(&n) {
        bad(
            "upstream.max_connections",
            format!("{n} must be between 1 and {MAX_CONNECTIONS}"),
        );
    }

    Some(UpstreamConfig {
        url: upstream_url?,
        token_url: token_url?,
        consent_url: consent_url?,
        connect_timeout: raw.connect_timeout,
        timeout: raw.timeout,
        max_connections: raw.max_connections,
        extra_roots,
    })
}

/// `[refresh]`.
fn refresh(raw: RawRefresh, bad: &mut impl FnMut(&str, String)) -> RefreshConfig {
    for (key, d) in [
        ("refresh.wait_timeout", raw.wait_timeout),
        ("refresh.token_timeout", raw.token_timeout),
        ("refresh.rotation_timeout", raw.rotation_timeout),
        ("refresh.max_backoff", raw.max_backoff),
        ("refresh.rejected_backoff", raw.rejected_backoff),
    ] {
        duration_within(key, d, MAX_TIMEOUT, bad);
    }

    // Compared only once token_timeout is itself sane: one bad key, one line.
    if raw.token_timeout <= MAX_TIMEOUT && raw.rotation_timeout < raw.token_timeout {
        bad(
            "refresh.rotation_timeout",
            "must be at least refresh.token_timeout: a rotation may take longer, never shorter"
                .into(),
        );
    }
    let lifetime = raw.min_token_lifetime;
    if !(Duration::from_secs(1)..=Duration::from_secs(900)).contains(&lifetime) {
        bad(
            "refresh.min_token_lifetime",
            "must be between 1s and 15m (Criteo's tokens live 15 minutes)".into(),
        );
    }

    let f = raw.at_fraction;
    if !(f > 0.0 && f < 1.0) {
        bad(
            "refresh.at_fraction",
            format!("{f} must be between 0 and 1 (exclusive), e.g. 0.8"),
        );
    }

    RefreshConfig {
        at_fraction: f,
        wait_timeout: raw.wait_timeout,
        token_timeout: raw.token_timeout,
        rotation_timeout: raw.rotation_timeout,
        min_token_lifetime: raw.min_token_lifetime,
        max_backoff: raw.max_backoff,
        rejected_backoff: raw.rejected_backoff,
        lazy: raw.lazy,
    }
}

/// A limit (`"250/min"`), `None` when unset or bad (and then named).
pub(super) fn rate(
    key: &str,
    text: Option<&str>,
    bad: &mut impl FnMut(&str, String),
) -> Option<Rate> {
    Rate::parse(text?).map_err(|e| bad(key, e)).ok()
}

/// `[rate_limit]`.
fn rate_limit(raw: RawRateLimit, bad: &mut impl FnMut(&str, String)) -> RateLimitConfig {
    duration_within("rate_limit.max_wait", raw.max_wait, MAX_TIMEOUT, bad);
    let reporting_paths = Globs::new(&raw.reporting_paths).unwrap_or_else(|e| {
        bad("rate_limit.reporting_paths", e);
        Globs::new(&[]).unwrap_or_else(|_| unreachable!("no glob is a good glob"))
    });
    RateLimitConfig {
        max_wait: raw.max_wait,
        client_credentials: rate(
            "rate_limit.client_credentials",
            raw.client_credentials.as_deref(),
            bad,
        ),
        refresh_token: rate(
            "rate_limit.refresh_token",
            raw.refresh_token.as_deref(),
            bad,
        ),
        reporting: rate("rate_limit.reporting", raw.reporting.as_deref(), bad),
        reporting_paths,
    }
}

/// `[consent]`, when present.
fn consent(c: RawConsent, bad: &mut impl FnMut(&str, String)) -> Option<ConsentConfig> {
    let secret = secret_pair(
        "consent.signing_secret",
        c.signing_secret,
        c.signing_secret_file,
        bad,
    );
    match (c.signing_key.filter(|k| !k.trim().is_empty()), secret) {
        (Some(signing_key), Some(signing_secret)) => Some(ConsentConfig {
            signing_key,
            signing_secret,
        }),
        (None, Some(_)) => {
            bad("consent.signing_key", "is missing".into());
            None
        }
        (Some(_), None) => {
            bad(
                "consent.signing_secret",
                "is missing (set signing_secret or signing_secret_file)".into(),
            );
            None
        }
        (None, None) => None,
    }
}
