//! Where a tenant's tokens come from. One variant per grant; the refresher
//! does not care which.

use std::sync::Arc;

use super::RefreshGrant;
use crate::config::SecretSource;
use crate::oauth::{GrantError, Granted, TokenEndpoint};

#[derive(Debug)]
pub(crate) enum TokenSource {
    /// `grant_type=client_credentials`: an app acting for itself.
    ClientCredentials {
        endpoint: TokenEndpoint,
        client_id: String,
        client_secret: SecretSource,
    },
    /// `grant_type=refresh_token`: an advertiser's consent, rotating.
    RefreshToken(Arc<RefreshGrant>),
}

impl TokenSource {
    /// One call to the token endpoint. Secrets held in files are read
    /// again each time, so a rotated credential is used from the next call.
    pub(crate) async fn fetch(&self) -> Result<Granted, GrantError> {
        match self {
            TokenSource::ClientCredentials {
                endpoint,
                client_id,
                client_secret,
            } => {
                let secret = client_secret
                    .load_async()
                    .await
                    .map_err(|e| GrantError::Transient(format!("client secret: {e}")))?;
                endpoint.client_credentials(client_id, &secret).await
            }
            TokenSource::RefreshToken(grant) => grant.fetch().await,
        }
    }

    /// Completes when the source wants a renewal now, whatever the
    /// schedule (a refresh token saved by onboarding without a usable
    /// access token); never, for client credentials.
    pub(crate) async fn renewal_wanted(&self) {
        match self {
            TokenSource::ClientCredentials { .. } => std::future::pending().await,
            TokenSource::RefreshToken(grant) => grant.renewal_wanted().await,
        }
    }

    /// Completes when a shared store reports that another replica changed
    /// the tenant's record; never, for client credentials (each replica
    /// fetches its own).
    pub(crate) async fn change_reported(&self) {
        match self {
            TokenSource::ClientCredentials { .. } => std::future::pending().await,
            TokenSource::RefreshToken(grant) => grant.change_reported().await,
        }
    }

    /// After [`Self::change_reported`]: the token another replica stored,
    /// if it is newer than the one served (see
    /// [`RefreshGrant::adopt_changed`]).
    pub(crate) async fn adopt_changed(&self) -> Result<Option<Granted>, GrantError> {
        match self {
            TokenSource::ClientCredentials { .. } => Ok(None),
            TokenSource::RefreshToken(grant) => grant.adopt_changed().await,
        }
    }
}
