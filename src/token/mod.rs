//! Access tokens: the [`Token`] itself, the lock-free per-tenant
//! [`TokenCell`] the request path reads, the [`refresher`] task that keeps
//! it filled, and the [`TokenSource`] that knows how to ask for a token.

mod cell;
mod refresh_grant;
pub(crate) mod refresher;
mod source;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderValue;
use rand::Rng;
use secrecy::ExposeSecret;

pub(crate) use cell::{Health, Unavailable};
pub use cell::{Newer, State, TokenCell};
pub(crate) use refresh_grant::RefreshGrant;
pub(crate) use source::TokenSource;

use crate::oauth::{Granted, MAX_LIFETIME};

/// The refresh-token grants of the running refreshers, by tenant name,
/// published by the control task as refreshers start and stop:
/// onboarding hands a consent's code to the grant found here.
pub(crate) type Grants = Arc<ArcSwap<HashMap<Arc<str>, Arc<RefreshGrant>>>>;

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

/// Why an answer's access token cannot be put in service.
#[derive(Debug, thiserror::Error)]
pub enum UnusableToken {
    #[error("the access token is not a valid header value")]
    Header,
    #[error("the access token's lifetime is out of the clock's range")]
    Lifetime,
}

impl Token {
    /// `requested_at` is when the token request was sent: the lifetime is
    /// counted from then, never from the (later) answer. Lifetimes past
    /// [`MAX_LIFETIME`] are cut to it, and every instant is computed with
    /// checked arithmetic: no answer can panic the proxy.
    pub fn new(
        granted: &Granted,
        requested_at: Instant,
        at_fraction: f64,
        generation: u64,
    ) -> Result<Self, UnusableToken> {
        let mut header = HeaderValue::from_maybe_shared(Bytes::from(format!(
            "Bearer {}",
            granted.access_token.expose_secret()
        )))
        .map_err(|_| UnusableToken::Header)?;
        header.set_sensitive(true);
        let lifetime = granted.expires_in.min(MAX_LIFETIME);
        let (refresh_in, usable_for) = schedule(lifetime, at_fraction, rand::rng().random());
        let at = |d: Duration| requested_at.checked_add(d).ok_or(UnusableToken::Lifetime);
        let usable_until = at(usable_for)?;
        // The coarse clock counts whole seconds in 32 bits: a day fits.
        let left = usable_until
            .saturating_duration_since(Instant::now())
            .min(MAX_LIFETIME);
        let usable_until_coarse = coarsetime::Instant::now()
            .checked_add(coarsetime::Duration::from(left))
            .ok_or(UnusableToken::Lifetime)?;
        Ok(Self {
            usable_until_coarse,
            header,
            generation,
            lifetime,
            refresh_at: at(refresh_in)?,
            usable_until,
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

    /// Whether the proxy still uses this token, on the coarse clock (the
    /// request path reads it).
    #[inline]
    pub fn is_usable_now(&self) -> bool {
        coarsetime::Instant::now() < self.usable_until_coarse
    }

    pub fn refresh_at(&self) -> Instant {
        self.refresh_at
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
/// Total: any input gives an answer (lifetimes past [`MAX_LIFETIME`] count
/// as that), never a panic.
pub(crate) fn schedule(lifetime: Duration, at_fraction: f64, jitter: f64) -> (Duration, Duration) {
    let lifetime = lifetime.min(MAX_LIFETIME);
    let at_fraction = if at_fraction.is_nan() {
        0.8
    } else {
        at_fraction.clamp(0.0, 1.0)
    };
    let jitter = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    };
    let due = lifetime.mul_f64(at_fraction);
    let refresh_in = due.mul_f64(1.0 - 0.1 * jitter);
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
        };
        let t = Token::new(&g, Instant::now(), 0.8, 1).unwrap();
        assert!(!format!("{t:?}").contains("very-secret"));
        assert!(!format!("{:?}", t.header()).contains("very-secret"));
        assert_eq!(t.header().to_str().unwrap(), "Bearer very-secret-token");
    }

    #[test]
    fn any_lifetime_makes_a_usable_token_and_no_panic() {
        for secs in [0, 1, 900, 1 << 32, 10_000_000_000_000_000_000, u64::MAX] {
            let g = Granted {
                access_token: "t".to_owned().into(),
                expires_in: Duration::from_secs(secs),
            };
            let t = Token::new(&g, Instant::now(), 0.8, 1).unwrap();
            assert!(t.remaining(Instant::now()) <= MAX_LIFETIME);
            if secs >= 1 {
                assert!(t.is_usable_now(), "{secs}");
                assert!(t.remaining(Instant::now()) > Duration::ZERO, "{secs}");
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        #[test]
        fn schedule_never_panics_and_renews_before_the_end(
            secs in proptest::prelude::any::<u64>(),
            nanos in 0u32..1_000_000_000,
            at_fraction in proptest::prelude::any::<f64>(),
            jitter in proptest::prelude::any::<f64>(),
        ) {
            let (refresh, usable) = schedule(Duration::new(secs, nanos), at_fraction, jitter);
            proptest::prop_assert!(usable <= MAX_LIFETIME);
            proptest::prop_assert!(refresh <= usable || secs == 0);
        }
    }
}
