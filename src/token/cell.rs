//! The per-tenant token cache. The request path reads it with one
//! `ArcSwap` load and a refcount; only the refresher task writes it.
//! Requests that find no usable token wake the refresher and wait for it
//! (single flight): they never call the token endpoint themselves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderMap;
use http::header::AUTHORIZATION;
use tokio::sync::{Notify, watch};

use super::Token;

/// What a tenant is doing, for `/tenants`, `/readyz` and error answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// `refresh.lazy`: no token is fetched until the first request.
    Idle,
    /// No token yet; the first request to the token endpoint is under way.
    Starting,
    /// The last token request succeeded.
    Ready,
    /// The last token request failed for a reason that may pass.
    Failing,
    /// The token endpoint refused the credentials; retried slowly.
    Rejected,
    /// A refresh-token tenant that needs a new consent.
    ConsentRequired,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Starting => "starting",
            State::Ready => "ready",
            State::Failing => "failing",
            State::Rejected => "credentials_rejected",
            State::ConsentRequired => "consent_required",
        }
    }
}

/// The refresher's latest word, replaced whole on each change.
#[derive(Debug, Clone)]
pub struct Health {
    pub state: State,
    pub last_refresh: Option<SystemTime>,
    pub last_error: Option<String>,
    /// When the refresher will next call the token endpoint after a failure.
    pub retry_at: Option<Instant>,
}

/// Why a request got no token.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub state: State,
    pub reason: String,
    pub retry_after: Duration,
}

/// Which token [`TokenCell::wait_usable`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Newer {
    /// Any usable one: the request has none yet.
    Any,
    /// One newer than this generation, which the upstream refused.
    Than(u64),
}

impl Newer {
    fn admits(self, generation: u64) -> bool {
        match self {
            Newer::Any => true,
            Newer::Than(refused) => generation > refused,
        }
    }
}

#[derive(Debug)]
pub struct TokenCell {
    current: ArcSwapOption<Token>,
    health: ArcSwap<Health>,
    /// True while the refresher is calling the token endpoint.
    fetching: AtomicBool,
    /// The newest generation a request saw rejected with a 401.
    retired_upto: AtomicU64,
    generation: AtomicU64,
    /// Wakes the refresher when a request needs a token now.
    demand: Notify,
    /// Tells the refresher a token was installed from outside (onboarding).
    installed: Notify,
    /// Bumped by the refresher after every attempt, good or bad.
    attempts: watch::Sender<()>,
}

impl Default for TokenCell {
    fn default() -> Self {
        Self::new(false)
    }
}

impl TokenCell {
    /// A lazy cell starts `Idle`: its first token is fetched on demand.
    pub fn new(lazy: bool) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            health: ArcSwap::from_pointee(Health {
                state: if lazy { State::Idle } else { State::Starting },
                last_refresh: None,
                last_error: None,
                retry_at: None,
            }),
            fetching: AtomicBool::new(false),
            retired_upto: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            demand: Notify::new(),
            installed: Notify::new(),
            attempts: watch::Sender::new(()),
        }
    }
}

// === the request path ===

impl TokenCell {
    /// The current token if it may still be used. Lock-free: one atomic
    /// load and one refcount increment.
    #[inline]
    pub fn usable(&self) -> Option<Arc<Token>> {
        let guard = self.current.load();
        match guard.as_ref() {
            Some(t) if t.is_usable_now() => Some(Arc::clone(t)),
            _ => None,
        }
    }

    /// The request path's injection: puts the current token's
    /// `Authorization` value into `headers` and returns its generation (to
    /// retire it on a 401). One `ArcSwap` load, a coarse clock read and the
    /// header's refcount: no lock, no allocation, no `Arc<Token>` refcount.
    #[inline]
    pub fn inject(&self, headers: &mut HeaderMap) -> Option<u64> {
        let guard = self.current.load();
        let token = guard.as_ref()?;
        if !token.is_usable_now() {
            return None;
        }
        headers.insert(AUTHORIZATION, token.header().clone());
        Some(token.generation())
    }

    /// A usable token, [`Newer`] than the one a 401 refused if any,
    /// waiting at most `wait` for the refresher to get one. Fails fast when
    /// waiting cannot help (the refresher is backing off after a failure).
    pub async fn wait_usable(
        &self,
        newer: Newer,
        wait: Duration,
    ) -> Result<Arc<Token>, Unavailable> {
        let now = tokio::time::Instant::now();
        let year = Duration::from_secs(365 * 24 * 3600);
        let deadline = now.checked_add(wait.min(year)).unwrap_or(now);
        let mut attempts = self.attempts.subscribe();
        loop {
            if let Some(t) = self.usable()
                && newer.admits(t.generation())
            {
                return Ok(t);
            }
            if !self.fetching.load(Ordering::Acquire) {
                let health = self.health.load();
                if health.state == State::ConsentRequired {
                    return Err(Unavailable {
                        state: health.state,
                        reason: health
                            .last_error
                            .clone()
                            .unwrap_or_else(|| "a new consent is required".into()),
                        retry_after: Duration::from_secs(60),
                    });
                }
                if let Some(retry_at) = health.retry_at {
                    let now = Instant::now();
                    if retry_at > now {
                        return Err(Unavailable {
                            state: health.state,
                            reason: health
                                .last_error
                                .clone()
                                .unwrap_or_else(|| "the token endpoint failed".into()),
                            retry_after: retry_at - now,
                        });
                    }
                }
            }
            self.demand.notify_one();
            match tokio::time::timeout_at(deadline, attempts.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => {
                    return Err(Unavailable {
                        state: self.health.load().state,
                        reason: "the proxy is shutting down".into(),
                        retry_after: Duration::from_secs(1),
                    });
                }
                Err(_) => {
                    return Err(Unavailable {
                        state: self.health.load().state,
                        reason: format!("no token was obtained within {wait:?}"),
                        retry_after: Duration::from_secs(1),
                    });
                }
            }
        }
    }

    /// The upstream answered 401 to the token of `generation`: stop using
    /// it (only if it is still the current one) and ask the refresher for a
    /// new one.
    pub fn retire(&self, generation: u64) {
        self.retired_upto.fetch_max(generation, Ordering::AcqRel);
        let current = self.current.load();
        if current
            .as_ref()
            .is_some_and(|c| c.generation() == generation)
        {
            self.current.compare_and_swap(&current, None);
        }
        self.demand.notify_one();
    }
}

// === the refresher's side ===

impl TokenCell {
    pub fn health(&self) -> Arc<Health> {
        self.health.load_full()
    }

    pub fn current(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }

    /// Puts a token obtained outside the refresher (onboarding) in place,
    /// and has the refresher schedule its renewal.
    pub fn install(&self, token: Token) {
        self.publish(token);
        self.set_health(Health {
            state: State::Ready,
            last_refresh: Some(SystemTime::now()),
            last_error: None,
            retry_at: None,
        });
        self.installed.notify_one();
        self.attempt_done();
    }

    pub(crate) async fn installed(&self) {
        self.installed.notified().await
    }

    /// Waits until a request asks for a token.
    pub(crate) async fn demanded(&self) {
        self.demand.notified().await
    }

    /// True when a request is waiting for a token that is not there.
    pub(crate) fn needs_token(&self) -> bool {
        match self.usable() {
            None => true,
            Some(t) => t.generation() <= self.retired_upto.load(Ordering::Acquire),
        }
    }

    pub(crate) fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub(crate) fn set_fetching(&self, on: bool) {
        self.fetching.store(on, Ordering::Release);
    }

    pub(crate) fn publish(&self, token: Token) {
        self.current.store(Some(Arc::new(token)));
    }

    pub(crate) fn set_health(&self, health: Health) {
        self.health.store(Arc::new(health));
    }

    /// Changes after every call to the token endpoint, good or bad: what
    /// to await instead of polling (readiness, tests).
    pub fn attempts(&self) -> watch::Receiver<()> {
        self.attempts.subscribe()
    }

    /// Announces the end of an attempt to every waiting request.
    pub(crate) fn attempt_done(&self) {
        self.attempts.send_replace(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_waits_for_a_token_newer_than_the_refused_one() {
        assert!(Newer::Any.admits(1));
        assert!(!Newer::Than(3).admits(3), "the refused token itself");
        assert!(!Newer::Than(3).admits(2));
        assert!(Newer::Than(3).admits(4));
    }
}
