//! Criteo answered 429 to a tenant with a limit (its limit changed, or
//! other callers share it): the tenant pauses until Criteo's reset, learns
//! a lower limit if Criteo names one, and a request whose body was kept
//! is sent again at its new turn, if that comes within `max_wait` of the
//! 429. Otherwise (a streamed body, a turn too far, replays spent) the 429
//! goes back as Criteo sent it.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

use super::Proxy;
use super::refused::RESENDS;
use super::send::{DRAIN_LIMIT, Replay};
use super::settle::Failed;
use crate::error::ProxyError;
use crate::pacing::Pacing;
use crate::tenant::Tenant;
use crate::upstream::UpstreamBody;

/// A request is sent again after at most this many 429s; the next one
/// goes back to the client.
const MAX_REPLAYS: u32 = 2;
/// The pause when Criteo's answer does not say (or says nonsense).
const DEFAULT_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause a 429 can ask for.
const MAX_PAUSE: Duration = Duration::from_secs(60);

// === impl Proxy ===

impl Proxy {
    /// Learns from a 429 Criteo sent to a tenant with a limit: counts it,
    /// pauses the tenant until Criteo's reset (with jitter, so that
    /// replicas do not all resume at once), and adopts a lower limit.
    pub(super) fn learn(&self, tenant: &Tenant, pacing: &Pacing, path: &str, headers: &HeaderMap) {
        tenant.metrics.rate_limited_by_criteo();
        // First the limit, so that the pause ends into its spacing.
        let limit = headers
            .get("x-ratelimit-limit")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        if let Some((before, now)) = limit.and_then(|calls| pacing.learn_limit(path, calls)) {
            tracing::warn!(
                tenant = &*tenant.name,
                configured = %before,
                adopted = %now,
                "Criteo's x-ratelimit-limit is lower than this tenant's limit; pacing to Criteo's \
                 (taken per the configured period) until restart or reload"
            );
        }
        let pause = pause_for(headers, SystemTime::now());
        let pause = pause + jitter(pause, rand::random());
        pacing.pause_until(tokio::time::Instant::now() + pause);
        tracing::debug!(
            tenant = &*tenant.name,
            pause_ms = pause.as_millis() as u64,
            "Criteo answered 429; tenant paused"
        );
    }

    /// A 429 to a request whose body was kept: learn from it, then send
    /// the request again at its new turn, at most [`MAX_REPLAYS`] times.
    /// The 429 goes back untouched when the new turn is further than
    /// `max_wait` from now; its body is drained (bounded) only once the
    /// request is sure to be sent again.
    pub(super) async fn throttled(
        &self,
        tenant: &Tenant,
        pacing: &Pacing,
        mut resp: Response<UpstreamBody>,
        again: &mut Replay,
        upstream_time: &mut Option<Duration>,
    ) -> Result<Response<UpstreamBody>, Failed> {
        for _ in 0..MAX_REPLAYS {
            self.learn(tenant, pacing, &again.path, resp.headers());
            let Ok(turn) = pacing.turn_again(&again.path) else {
                return Ok(resp);
            };
            self.drain(resp).await;
            turn.wait(&again.path).await.map_err(|refused| {
                tenant.metrics.rate_limited_by_proxy();
                let limits = pacing.limits();
                Failed::read(ProxyError::RateLimited {
                    limit: limits.overall.map_or("none".into(), |r| r.to_string()),
                    max_wait: limits.max_wait,
                    retry_after: refused.retry_after,
                })
            })?;
            tenant.metrics.retry();
            let generation = self
                .inject(tenant, &mut again.headers)
                .await
                .map_err(Failed::read)?;
            again.generation = generation;
            resp = self
                .send_again(tenant, again, RESENDS, upstream_time)
                .await?;
            if resp.status() != StatusCode::TOO_MANY_REQUESTS {
                return Ok(resp);
            }
        }
        self.learn(tenant, pacing, &again.path, resp.headers());
        Ok(resp)
    }

    /// Reads (and drops) an answer's body that will not be passed on, so
    /// that its pooled connection can be reused: at most [`DRAIN_LIMIT`],
    /// for at most `upstream.timeout`.
    pub(super) async fn drain(&self, resp: Response<UpstreamBody>) {
        let drain = Limited::new(resp.into_body(), DRAIN_LIMIT).collect();
        let _ = tokio::time::timeout(self.upstream.timeout(), drain).await;
    }
}

/// How long a 429 asks to pause: `x-ratelimit-reset` (Unix seconds) less
/// the answer's `Date` (so that a skew between Criteo's clock and ours
/// does not matter), or less `now` when there is no `Date`. A reset that
/// is missing, unreadable or already past gives [`DEFAULT_PAUSE`]; none is
/// longer than [`MAX_PAUSE`].
fn pause_for(headers: &HeaderMap, now: SystemTime) -> Duration {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(reset) = text("x-ratelimit-reset").and_then(|v| v.trim().parse::<u64>().ok()) else {
        return DEFAULT_PAUSE;
    };
    let reset = SystemTime::UNIX_EPOCH + Duration::from_secs(reset.min(u64::from(u32::MAX)));
    let date = text("date").and_then(http_date).unwrap_or(now);
    match reset.duration_since(date) {
        Ok(wait) if !wait.is_zero() => wait.min(MAX_PAUSE),
        _ => DEFAULT_PAUSE,
    }
}

/// Up to a tenth more (at least up to 100 ms), from `r` in `[0, 1)`.
fn jitter(pause: Duration, r: f64) -> Duration {
    (pause / 10)
        .max(Duration::from_millis(100))
        .mul_f64(r.clamp(0.0, 1.0))
}

/// Reads an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`, the only form
/// a server may send in `Date`).
fn http_date(text: &str) -> Option<SystemTime> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (_weekday, rest) = text.trim().split_once(", ")?;
    let mut parts = rest.split(' ');
    let day: u64 = parts.next()?.parse().ok()?;
    let month = parts.next()?;
    let month = MONTHS.iter().position(|m| *m == month)? as u64 + 1;
    let year: u64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|n| n.parse::<u64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if parts.next()? != "GMT" || parts.next().is_some() || hms.next().is_some() {
        return None;
    }
    if !(1..=31).contains(&day) || !(1970..=9999).contains(&year) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard
    // Hinnant's days_from_civil), with March as the first month.
    let y = if month <= 2 { year - 1 } else { year };
    let (era, yoe) = (y / 400, y % 400);
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    let secs = days * 86_400 + h * 3600 + m * 60 + s;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn reads_http_dates() {
        assert_eq!(
            http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(at(784_111_777))
        );
        assert_eq!(http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(at(0)));
        assert_eq!(
            http_date("Thu, 29 Feb 2024 23:59:59 GMT"),
            Some(at(1_709_251_199))
        );
        for bad in [
            "",
            "Sun, 06 Nov 1994 08:49:37",
            "06 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nox 1994 08:49:37 GMT",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
        ] {
            assert_eq!(http_date(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_pause_is_reset_less_criteos_date_whatever_our_clock_says() {
        // Criteo's clock is an hour behind ours: the pause is still 7 s.
        let h = headers(&[
            ("x-ratelimit-reset", "784111784"),
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        assert_eq!(
            pause_for(&h, at(784_111_777 + 3600)),
            Duration::from_secs(7)
        );
        // No Date: against our clock.
        let h = headers(&[("x-ratelimit-reset", "1000")]);
        assert_eq!(pause_for(&h, at(997)), Duration::from_secs(3));
    }

    #[test]
    fn a_missing_past_or_absurd_reset_gives_a_short_bounded_pause() {
        let now = at(1_000_000);
        assert_eq!(pause_for(&headers(&[]), now), DEFAULT_PAUSE);
        assert_eq!(
            pause_for(&headers(&[("x-ratelimit-reset", "soon")]), now),
            DEFAULT_PAUSE
        );
        assert_eq!(
            pause_for(&headers(&[("x-ratelimit-reset", "999990")]), now),
            DEFAULT_PAUSE
        );
        assert_eq!(
            pause_for(&headers(&[("x-ratelimit-reset", "-5")]), now),
            DEFAULT_PAUSE
        );
        let far = headers(&[("x-ratelimit-reset", "99999999999")]);
        assert_eq!(pause_for(&far, now), MAX_PAUSE);
    }

    #[test]
    fn jitter_is_a_tenth_at_most() {
        assert_eq!(jitter(Duration::from_secs(10), 0.0), Duration::ZERO);
        assert!(jitter(Duration::from_secs(10), 0.999) < Duration::from_secs(1));
        assert!(jitter(Duration::from_secs(1), 0.5) == Duration::from_millis(50));
    }
}
