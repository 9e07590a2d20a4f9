//! Access tokens: the [`Token`] itself, the lock-free per-tenant
//! [`TokenCell`] the request path reads, the [`refresher`] task that keeps
//! it filled, and the [`TokenSource`] that knows how to ask for a token.

mod cell;
mod refresh_grant;
pub mod refresher;
mod source;

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use rand::Rng;
use secrecy::ExposeSecret;

pub use cell::{Health, State, TokenCell, Unavailable};
pub use refresh_grant::RefreshGrant;
pub use source::TokenSource;

use crate::oauth::Granted;

/// One access token, with its `Authorization` value built once, so that
/// injecting it costs a refcount and a header insert.
///
/// Aligned to 128 bytes (a pair of cache lines, which x86 prefetches
/// together): every request on every worker reads these fields, while the
/// header value's reference count, allocated elsewhere, is written by all of
/// them. Sharing a line with that count (or with anything else written) made
/// each read a cache miss once two threads inject at once (`benches/injection.rs`).
#[repr(align(128))]
pub struct Token {
    header: HeaderValue,
    generation: u64,
    lifetime: Duration,
    obtained_at: Instant,
    refresh_at: Instant,
    usable_until: Instant,
    /// The same moment on the coarse clock, which the request path reads:
    /// a few nanoseconds instead of a full clock read (which traps to the
    /// hypervisor on some VMs). Its millisecond resolution is far inside
    /// the safety margin.
    usable_until_coarse: coarsetime::Instant,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("value", &"<redacted>")
            .field("generation", &self.generation)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl Token {
    /// `requested_at` is when the token request was sent: the lifetime is
    /// counted from then, never from the (later) answer.
    pub fn new(
        granted: &Granted,
        requested_at: Instant,
        at_fraction: f64,
        generation: u64,
    ) -> Result<Self, http::header::InvalidHeaderValue> {
        let mut header = HeaderValue::from_maybe_shared(Bytes::from(format!(
            "Bearer {}",
            granted.access_token.expose_secret()
        )))?;
        header.set_sensitive(true);
        let lifetime = granted.expires_in;
        let (refresh_in, usable_for) = schedule(lifetime, at_fraction, rand::rng().random());
        let left = (requested_at + usable_for).saturating_duration_since(Instant::now());
        Ok(Self {
            usable_until_coarse: coarsetime::Instant::now() + coarsetime::Duration::from(left),
            header,
            generation,
            lifetime,
            obtained_at: requested_at,
            refresh_at: requested_at + refresh_in,
            usable_until: requested_at + usable_for,
        })
    }

    /// The `Authorization: Bearer …` value, marked sensitive.
    #[inline]
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    #[inline]
    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }

    /// [`Token::is_usable`] on the coarse clock, for the request path.
    #[inline]
    pub fn is_usable_now(&self) -> bool {
        coarsetime::Instant::now() < self.usable_until_coarse
    }

    pub fn refresh_at(&self) -> Instant {
        self.refresh_at
    }

    pub fn obtained_at(&self) -> Instant {
        self.obtained_at
    }

    /// Time left before the proxy stops using this token.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.usable_until.saturating_duration_since(now)
    }
}

/// When to renew a token of `lifetime`, and how long to keep using it.
///
/// Renewal is due once `at_fraction` of the lifetime has passed, brought
/// forward by up to a tenth of that (`jitter` in `[0, 1)`) so that many
/// tenants do not renew in lockstep. The token is used until a safety
/// margin before its expiry (half the time after renewal, at most 30 s), so
/// that clock skew and transit time never let an expired token through.
pub fn schedule(lifetime: Duration, at_fraction: f64, jitter: f64) -> (Duration, Duration) {
    let due = lifetime.mul_f64(at_fraction);
    let refresh_in = due.mul_f64(1.0 - 0.1 * jitter.clamp(0.0, 1.0));
    let margin = lifetime
        .mul_f64((1.0 - at_fraction) / 2.0)
        .min(Duration::from_secs(30));
    (refresh_in, lifetime.saturating_sub(margin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_before_the_token_stops_being_used() {
        for lifetime in [1, 2, 60, 900, 3600] {
            let l = Duration::from_secs(lifetime);
            for jitter in [0.0, 0.5, 0.999] {
                let (refresh, usable) = schedule(l, 0.8, jitter);
                assert!(refresh < usable, "{lifetime}s: {refresh:?} !< {usable:?}");
                assert!(usable < l);
                assert!(refresh <= l.mul_f64(0.8));
                assert!(refresh >= l.mul_f64(0.8 * 0.9) - Duration::from_millis(1));
            }
        }
        let (_, usable) = schedule(Duration::from_secs(900), 0.8, 0.0);
        assert_eq!(usable, Duration::from_secs(870));
    }

    #[test]
    fn a_token_never_shows_itself_in_debug_output() {
        let g = Granted {
            access_token: "very-secret-token".to_owned().into(),
            expires_in: Duration::from_secs(900),
            refresh_token: None,
        };
        let t = Token::new(&g, Instant::now(), 0.8, 1).unwrap();
        assert!(!format!("{t:?}").contains("very-secret"));
        assert!(!format!("{:?}", t.header()).contains("very-secret"));
        assert_eq!(t.header().to_str().unwrap(), "Bearer very-secret-token");
    }
}
