//! A refresh-token tenant: an advertiser's consent, carried by a refresh
//! token that rotates on every use. Losing the newest one loses the tenant,
//! so every new refresh token is in the [`TokenStore`] before the
//! access token that came with it is used (or judged: a 2xx answer has
//! spent the old token whatever else is wrong with it), and every change
//! of the refresh token (renewal, onboarding) is serialised behind one
//! lock. Onboarding's code exchange takes that lock only to install its
//! result, never while it waits on the token endpoint, so that bogus
//! callbacks cannot hold up renewals. Every call that presents a refresh
//! token holds the tenant's lease in the store, and every write names the
//! generation last read: a writer that lost the race adopts the newer
//! token instead of overwriting it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard, Notify};

use crate::config::{SecretSource, TenantConfig};
use crate::oauth::{Answer, GrantError, Granted, TokenEndpoint};
use crate::store::{Access, Generation, Key, Put, PutError, Record, TokenStore};

#[derive(Debug)]
pub(crate) struct RefreshGrant {
    tenant: Arc<str>,
    endpoint: TokenEndpoint,
    client_id: String,
    client_secret: SecretSource,
    redirect_uri: String,
    store: Arc<dyn TokenStore>,
    seed: Option<SecretSource>,
    /// Read from the store at first use (`None` until then).
    chain: Mutex<Option<Chain>>,
    /// Asks the refresher to renew at once (see [`Self::exchange_code`]).
    renew: Notify,
    /// Shared store: its record changed elsewhere (see [`Self::adopt_changed`]).
    changed: Notify,
    /// Shared store: the generation of the record whose access token this
    /// replica serves (one it stored, or one it adopted). A record newer
    /// than that carries a token another replica got: this one serves it
    /// instead of rotating the refresh token again.
    served: AtomicU64,
    /// Shared store: this replica made the tenant's latest rotation.
    refreshing_here: AtomicBool,
}

/// A stored access token with less time left than this is not adopted:
/// the replica rotates instead.
const MIN_ADOPTED_LIFETIME: Duration = Duration::from_secs(1);

/// The refresh token in hand, and what is known about it.
#[derive(Debug)]
struct Chain {
    current: Option<SecretString>,
    /// The config seed has been presented (or found spent) already.
    seed_tried: bool,
    /// `current` came from the token endpoint but is not on disk yet.
    unsaved: bool,
    /// A config seed the store has not adopted yet (made the tenant's
    /// stored token and recorded as presented). That is done before it is
    /// presented, so that a seed is taken from the config only once.
    unadopted_seed: Option<SecretString>,
    /// The store's generation of the tenant's record, as last read or
    /// written: the next write is conditional on it.
    generation: Generation,
}

impl Chain {
    fn empty() -> Self {
        Self {
            current: None,
            seed_tried: true,
            unsaved: false,
            unadopted_seed: None,
            generation: Generation::NONE,
        }
    }
}

fn store_error(what: &str, e: impl std::fmt::Display) -> GrantError {
    GrantError::Transient(format!("{what}: {e}"))
}

impl RefreshGrant {
    /// Nothing is read here: the store and the seed are read at first use.
    pub(crate) fn new(
        config: &TenantConfig,
        endpoint: TokenEndpoint,
        store: Arc<dyn TokenStore>,
    ) -> Self {
        Self {
            tenant: config.name.as_str().into(),
            endpoint,
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
            redirect_uri: config.redirect_uri.clone().unwrap_or_default(),
            store,
            seed: config.seed_refresh_token.clone(),
            chain: Mutex::new(None),
            renew: Notify::new(),
            changed: Notify::new(),
            served: AtomicU64::new(0),
            refreshing_here: AtomicBool::new(false),
        }
    }

    /// Whether this replica made the tenant's latest rotation; `None`
    /// unless the store is shared.
    pub(crate) fn refreshing_here(&self) -> Option<bool> {
        self.store
            .shared()
            .then(|| self.refreshing_here.load(Ordering::Relaxed))
    }

    /// The store reports that another process changed this tenant's record.
    pub(crate) fn changed_elsewhere(&self) {
        self.changed.notify_one();
    }

    /// Completes when the store reported a change made elsewhere.
    pub(crate) async fn change_reported(&self) {
        self.changed.notified().await
    }

    /// Shared store: reads the record after a reported change. A newer
    /// access token is returned to be served; a newer refusal puts this
    /// replica's tenant in `consent_required` too, without a call to the
    /// token endpoint; anything else (this replica's own write) is `None`.
    pub(crate) async fn adopt_changed(&self) -> Result<Option<Granted>, GrantError> {
        let Some(record) = self.read_shared().await? else {
            return Ok(None);
        };
        if record.rejected && record.generation.0 > self.served.load(Ordering::Acquire) {
            self.served.store(record.generation.0, Ordering::Release);
            self.refreshing_here.store(false, Ordering::Relaxed);
            return Err(self.consent_hint("another replica's refresh token was refused"));
        }
        Ok(self.adopt(&record))
    }

    /// The tenant's record in a shared store (`None` for other stores, or
    /// no record).
    async fn read_shared(&self) -> Result<Option<Record>, GrantError> {
        if !self.store.shared() {
            return Ok(None);
        }
        self.store
            .get(self.key())
            .await
            .map_err(|e| store_error("cannot read the token store", e))
    }

    /// The access token another replica stored with `record`, if the
    /// record is newer than the one this replica serves and its token has
    /// time left.
    fn adopt(&self, record: &Record) -> Option<Granted> {
        if record.rejected || record.generation.0 <= self.served.load(Ordering::Acquire) {
            return None;
        }
        let access = record.access.as_ref()?;
        let left = access
            .requested_at
            .checked_add(access.lifetime)?
            .duration_since(SystemTime::now())
            .ok()
            .filter(|left| *left >= MIN_ADOPTED_LIFETIME)?;
        self.served.store(record.generation.0, Ordering::Release);
        self.refreshing_here.store(false, Ordering::Relaxed);
        tracing::debug!(
            tenant = &*self.tenant,
            generation = record.generation.0,
            "serving the access token another replica stored"
        );
        Some(Granted {
            access_token: access.token.clone(),
            expires_in: left,
        })
    }

    /// The chain, locked; read from the store first if this is its first use.
    async fn chain(&self) -> Result<MappedMutexGuard<'_, Chain>, GrantError> {
        let mut guard = self.chain.lock().await;
        if guard.is_none() {
            *guard = Some(self.first_chain().await?);
        }
        Ok(MutexGuard::map(guard, |c| {
            c.get_or_insert_with(Chain::empty)
        }))
    }

    /// Chooses the starting refresh token: the store's, unless Criteo has
    /// refused it; then the config seed, unless it was ever presented
    /// before (it is then spent, or it is the stored token); else none
    /// (consent required).
    async fn first_chain(&self) -> Result<Chain, GrantError> {
        let stored = self
            .store
            .get(self.key())
            .await
            .map_err(|e| store_error("cannot read the token store", e))?;
        let seed = match &self.seed {
            Some(s) => s.load_async().await.ok(),
            None => None,
        };
        let seed = match seed {
            // The second test covers stores written before seeds were
            // recorded.
            Some(seed)
                if !self.seed_presented(&seed).await?
                    && !stored
                        .as_ref()
                        .is_some_and(|s| same(&s.refresh_token, &seed)) =>
            {
                Some(seed)
            }
            _ => None,
        };
        let generation = stored.as_ref().map_or(Generation::NONE, |s| s.generation);
        let (current, seed_tried, unadopted_seed) = match (stored, seed) {
            (Some(s), seed) if !s.rejected => (Some(s.refresh_token), seed.is_none(), None),
            (_, Some(seed)) => (Some(seed.clone()), true, Some(seed)),
            (_, None) => (None, true, None),
        };
        Ok(Chain {
            current,
            seed_tried,
            unsaved: unadopted_seed.is_some(),
            unadopted_seed,
            generation,
        })
    }

    async fn seed_presented(&self, seed: &SecretString) -> Result<bool, GrantError> {
        self.store
            .seed_presented(seed)
            .await
            .map_err(|e| store_error("cannot read the token store", e))
    }

    /// The tenant's key in the store.
    fn key(&self) -> Key<'_> {
        Key {
            name: &self.tenant,
            client_id: &self.client_id,
        }
    }

    pub(crate) fn client_id(&self) -> &str {
        &self.client_id
    }

    pub(crate) fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// The key that signs this tenant's onboarding `state`s: its client
    /// secret, which the `consent-url` command also knows.
    pub(crate) async fn state_key(&self) -> Result<SecretString, String> {
        self.client_secret.load_async().await
    }

    async fn secret(&self) -> Result<SecretString, GrantError> {
        self.client_secret
            .load_async()
            .await
            .map_err(|e| GrantError::Transient(format!("client secret: {e}")))
    }

    fn consent_hint(&self, why: &str) -> GrantError {
        GrantError::ConsentRequired(format!(
            "tenant {} needs a new consent ({why}): open /oauth/authorize?tenant={} on the admin listener, \
             or run `criteo-token-proxy consent-url --tenant {}` and send the link to the advertiser",
            self.tenant, self.tenant, self.tenant
        ))
    }

    /// `grant_type=refresh_token`, rotating and saving the refresh token.
    ///
    /// On a shared store, a token another replica stored since is served
    /// instead (checked before the lease, and again once it is held), so
    /// that replicas renewing (or hit by a 401) at the same moment rotate
    /// the refresh token once between them.
    pub(crate) async fn fetch(&self) -> Result<Granted, GrantError> {
        if let Some(granted) = self.read_shared().await?.and_then(|r| self.adopt(&r)) {
            return Ok(granted);
        }
        // One caller of the token endpoint per tenant, whatever process.
        let _lease = self
            .store
            .lease(self.key())
            .await
            .map_err(|e| store_error("cannot take the tenant's refresh lease", e))?;
        let mut chain = self.chain().await?;
        if let Some(record) = self.read_shared().await?
            && !chain.unsaved
        {
            if let Some(granted) = self.adopt(&record) {
                return Ok(granted);
            }
            if record.generation != chain.generation {
                // Rotated, refused or onboarded elsewhere since this
                // replica last read it.
                *chain = self.first_chain().await?;
            }
        } else if chain.current.is_none() && !chain.unsaved {
            // Nothing in hand: another grant of this tenant (one a reload
            // replaced, finishing an onboarding) may have saved a token
            // since this one read the store.
            *chain = self.first_chain().await?;
        }
        if chain.unsaved {
            self.save(&mut chain, None).await?;
        }
        loop {
            let Some(refresh_token) = chain.current.clone() else {
                return Err(self.consent_hint("no refresh token is stored or configured"));
            };
            let secret = self.secret().await?;
            let requested_at = SystemTime::now();
            match self
                .endpoint
                .refresh_token(&self.client_id, &secret, &refresh_token)
                .await
            {
                Ok(answer) => return self.rotated(&mut chain, answer, requested_at).await,
                Err(GrantError::InvalidGrant { description }) => {
                    tracing::warn!(
                        tenant = &*self.tenant,
                        reason = description.as_deref().unwrap_or("invalid_grant"),
                        "the token endpoint refused the refresh token"
                    );
                    let refused = Put {
                        refresh_token: &refresh_token,
                        rejected: true,
                        adopt_seed: false,
                        access: None,
                    };
                    match self.store.put(self.key(), chain.generation, refused).await {
                        Ok(g) => chain.generation = g,
                        Err(e) => {
                            tracing::warn!(tenant = &*self.tenant, error = %e, "cannot record the refused refresh token");
                        }
                    }
                    chain.current = None;
                    if !chain.seed_tried {
                        chain.seed_tried = true;
                        let seed = match &self.seed {
                            Some(s) => s.load_async().await.ok(),
                            None => None,
                        };
                        if let Some(seed) = seed
                            && !same(&seed, &refresh_token)
                            && !self.seed_presented(&seed).await?
                        {
                            tracing::info!(
                                tenant = &*self.tenant,
                                "trying the configured refresh_token seed once"
                            );
                            chain.current = Some(seed.clone());
                            chain.unsaved = true;
                            chain.unadopted_seed = Some(seed);
                            self.save(&mut chain, None).await?;
                            continue;
                        }
                    }
                    return Err(self.consent_hint(
                        "the refresh token was refused: consent revoked or expired",
                    ));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A 2xx answer to `grant_type=refresh_token`: the old token is spent
    /// the moment it exists, so its new refresh token is saved before the
    /// rest is looked at. A bad rest is then a transient failure, and the
    /// next renewal presents the saved token.
    async fn rotated(
        &self,
        chain: &mut Chain,
        answer: Answer,
        requested_at: SystemTime,
    ) -> Result<Granted, GrantError> {
        let Some(next) = answer.refresh_token else {
            tracing::warn!(
                tenant = &*self.tenant,
                "the token endpoint renewed without a usable refresh_token; the one presented is kept"
            );
            return answer.access;
        };
        chain.current = Some(next);
        chain.unsaved = true;
        self.save(chain, shared_access(&answer.access, requested_at).as_ref())
            .await?;
        answer.access.map_err(|e| {
            GrantError::Transient(format!(
                "{e} (its new refresh token was saved; the next renewal uses it)"
            ))
        })
    }

    /// Onboarding: trades a consent's code for the first tokens, saves the
    /// refresh token, and makes it the one renewals use.
    ///
    /// The exchange runs without the chain's lock, so that it never holds
    /// up a renewal; the lock is taken only to install its refresh token,
    /// which supersedes whatever a renewal had meanwhile (a newer consent
    /// wins). If the answer's access token is unusable, the saved refresh
    /// token is renewed at once.
    pub(crate) async fn exchange_code(&self, code: &str) -> Result<Granted, GrantError> {
        let secret = self.secret().await?;
        let requested_at = SystemTime::now();
        let answer = self
            .endpoint
            .authorization_code(&self.client_id, &secret, code, &self.redirect_uri)
            .await?;
        let Some(refresh_token) = answer.refresh_token else {
            return Err(GrantError::Transient(
                "the token endpoint answered the code without a usable refresh_token".into(),
            ));
        };
        let saved = {
            let mut chain = self.chain().await?;
            chain.current = Some(refresh_token);
            chain.unsaved = true;
            chain.seed_tried = true;
            self.save(
                &mut chain,
                shared_access(&answer.access, requested_at).as_ref(),
            )
            .await
        };
        if let Err(e) = saved {
            // Kept in memory: the refresher saves it before it renews.
            self.renew.notify_one();
            return Err(e);
        }
        match answer.access {
            Ok(granted) => Ok(granted),
            Err(e) => {
                tracing::warn!(
                    tenant = &*self.tenant,
                    error = %e,
                    "the code's refresh token is saved but its access token is unusable; renewing now"
                );
                let renewed = self.fetch().await;
                if renewed.is_err() {
                    // The refresher takes over, with its back-off.
                    self.renew.notify_one();
                }
                renewed
            }
        }
    }

    /// Completes when onboarding asks for a renewal now.
    pub(crate) async fn renewal_wanted(&self) {
        self.renew.notified().await
    }

    /// Saves the refresh token in hand, with the access token that came
    /// with it (which a shared store hands to the other replicas).
    async fn save(&self, chain: &mut Chain, access: Option<&Access>) -> Result<(), GrantError> {
        let Some(token) = &chain.current else {
            return Ok(());
        };
        let put = Put {
            refresh_token: token,
            rejected: false,
            adopt_seed: chain
                .unadopted_seed
                .as_ref()
                .is_some_and(|seed| same(seed, token)),
            access,
        };
        match self.store.put(self.key(), chain.generation, put).await {
            Ok(generation) => {
                chain.generation = generation;
                self.served.store(generation.0, Ordering::Release);
                self.refreshing_here.store(true, Ordering::Relaxed);
                chain.unsaved = false;
                chain.unadopted_seed = None;
                Ok(())
            }
            Err(PutError::Stale { .. }) => {
                tracing::error!(
                    tenant = &*self.tenant,
                    store = %self.store.location(),
                    "another writer saved a newer refresh token for this tenant; it is used from now on"
                );
                let newer = self.first_chain().await?;
                *chain = Chain {
                    unsaved: false,
                    unadopted_seed: None,
                    ..newer
                };
                Err(GrantError::Transient(
                    "another writer saved a newer refresh token for this tenant".into(),
                ))
            }
            Err(PutError::Io(e)) => {
                let location = self.store.location();
                tracing::error!(
                    tenant = &*self.tenant,
                    path = %location,
                    error = %e,
                    "cannot save the rotated refresh token; it is kept in memory and the access token is not used until it is saved"
                );
                Err(GrantError::Transient(format!(
                    "cannot save the rotated refresh token to {location}: {e}"
                )))
            }
        }
    }
}

/// The access token of a token answer, as a shared store keeps it.
fn shared_access(access: &Result<Granted, GrantError>, requested_at: SystemTime) -> Option<Access> {
    access.as_ref().ok().map(|granted| Access {
        token: granted.access_token.clone(),
        requested_at,
        lifetime: granted.expires_in,
    })
}

/// Constant-time equality of two secrets.
fn same(a: &SecretString, b: &SecretString) -> bool {
    a.expose_secret()
        .as_bytes()
        .ct_eq(b.expose_secret().as_bytes())
        .into()
}
