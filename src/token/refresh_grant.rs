//! A refresh-token tenant: an advertiser's consent, carried by a refresh
//! token that rotates on every use. Losing the newest one loses the tenant,
//! so every new refresh token is on disk (the [`TokenStore`]) before the
//! access token that came with it is used, and every use of the refresh
//! token (renewal, onboarding) is serialised behind one lock.

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::sync::Mutex;

use crate::config::{SecretSource, TenantConfig};
use crate::oauth::{GrantError, Granted, TokenEndpoint};
use crate::store::TokenStore;

#[derive(Debug)]
pub struct RefreshGrant {
    tenant: Arc<str>,
    endpoint: TokenEndpoint,
    client_id: String,
    client_secret: SecretSource,
    redirect_uri: String,
    store: Arc<TokenStore>,
    seed: Option<SecretSource>,
    chain: Mutex<Chain>,
}

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
}

impl RefreshGrant {
    /// Chooses the starting refresh token: the store's, unless Criteo has
    /// refused it; then the config seed, unless it was ever presented
    /// before (it is then spent, or it is the stored token); else none
    /// (consent required).
    pub fn new(config: &TenantConfig, endpoint: TokenEndpoint, store: Arc<TokenStore>) -> Self {
        let tenant: Arc<str> = config.name.as_str().into();
        let stored = store.get(&tenant);
        let seed = config
            .seed_refresh_token
            .as_ref()
            .and_then(|s| s.load().ok())
            .filter(|seed| {
                // The second test covers stores written before seeds were
                // recorded.
                !store.seed_presented(seed)
                    && !stored
                        .as_ref()
                        .is_some_and(|s| same(&s.refresh_token, seed))
            });
        let (current, seed_tried, unadopted_seed) = match (stored, seed) {
            (Some(s), seed) if !s.rejected => (Some(s.refresh_token), seed.is_none(), None),
            (_, Some(seed)) => (Some(seed.clone()), true, Some(seed)),
            (_, None) => (None, true, None),
        };
        Self {
            tenant,
            endpoint,
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
            redirect_uri: config.redirect_uri.clone().unwrap_or_default(),
            store,
            seed: config.seed_refresh_token.clone(),
            chain: Mutex::new(Chain {
                current,
                seed_tried,
                unsaved: unadopted_seed.is_some(),
                unadopted_seed,
            }),
        }
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// The key that signs this tenant's onboarding `state`s: its client
    /// secret, which the `consent-url` command also knows.
    pub fn state_key(&self) -> Result<SecretString, String> {
        self.client_secret.load()
    }

    fn secret(&self) -> Result<SecretString, GrantError> {
        self.client_secret
            .load()
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
    pub async fn fetch(&self) -> Result<Granted, GrantError> {
        let mut chain = self.chain.lock().await;
        if chain.unsaved {
            self.save(&mut chain).await?;
        }
        loop {
            let Some(refresh_token) = chain.current.clone() else {
                return Err(self.consent_hint("no refresh token is stored or configured"));
            };
            let secret = self.secret()?;
            match self
                .endpoint
                .refresh_token(&self.client_id, &secret, &refresh_token)
                .await
            {
                Ok(granted) => {
                    if let Some(next) = &granted.refresh_token {
                        // The old token is spent the moment this answer
                        // exists: from here on only `next` is worth anything.
                        chain.current = Some(next.clone());
                        chain.unsaved = true;
                        self.save(&mut chain).await?;
                    }
                    return Ok(granted);
                }
                Err(GrantError::InvalidGrant { description }) => {
                    tracing::warn!(
                        tenant = &*self.tenant,
                        reason = description.as_deref().unwrap_or("invalid_grant"),
                        "the token endpoint refused the refresh token"
                    );
                    if let Err(e) = self.store.put(&self.tenant, &refresh_token, true).await {
                        tracing::warn!(tenant = &*self.tenant, error = %e, "cannot record the refused refresh token");
                    }
                    chain.current = None;
                    if !chain.seed_tried {
                        chain.seed_tried = true;
                        if let Some(seed) = self.seed.as_ref().and_then(|s| s.load().ok())
                            && !same(&seed, &refresh_token)
                            && !self.store.seed_presented(&seed)
                        {
                            tracing::info!(
                                tenant = &*self.tenant,
                                "trying the configured refresh_token seed once"
                            );
                            chain.current = Some(seed.clone());
                            chain.unsaved = true;
                            chain.unadopted_seed = Some(seed);
                            self.save(&mut chain).await?;
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

    /// Onboarding: trades a consent's code for the first tokens, saves the
    /// refresh token, and makes it the one renewals use.
    pub async fn exchange_code(&self, code: &str) -> Result<Granted, GrantError> {
        let mut chain = self.chain.lock().await;
        let secret = self.secret()?;
        let granted = self
            .endpoint
            .authorization_code(&self.client_id, &secret, code, &self.redirect_uri)
            .await?;
        let Some(refresh_token) = &granted.refresh_token else {
            return Err(GrantError::Transient(
                "the token endpoint answered the code without a refresh_token".into(),
            ));
        };
        chain.current = Some(refresh_token.clone());
        chain.unsaved = true;
        chain.seed_tried = true;
        self.save(&mut chain).await?;
        Ok(granted)
    }

    async fn save(&self, chain: &mut Chain) -> Result<(), GrantError> {
        let Some(token) = &chain.current else {
            return Ok(());
        };
        let saved = if let Some(seed) = &chain.unadopted_seed
            && same(seed, token)
        {
            self.store.adopt_seed(&self.tenant, token).await
        } else {
            self.store.put(&self.tenant, token, false).await
        };
        match saved {
            Ok(()) => {
                chain.unsaved = false;
                chain.unadopted_seed = None;
                Ok(())
            }
            Err(e) => {
                tracing::error!(
                    tenant = &*self.tenant,
                    path = %self.store.path().display(),
                    error = %e,
                    "cannot save the rotated refresh token; it is kept in memory and the access token is not used until it is saved"
                );
                Err(GrantError::Transient(format!(
                    "cannot save the rotated refresh token to {}: {e}",
                    self.store.path().display()
                )))
            }
        }
    }
}

/// Constant-time equality of two secrets.
fn same(a: &SecretString, b: &SecretString) -> bool {
    a.expose_secret()
        .as_bytes()
        .ct_eq(b.expose_secret().as_bytes())
        .into()
}
