//! `[tenants.NAME]` and the `[store]` their rotated refresh tokens need.

use std::collections::BTreeMap;

use url::Url;

use crate::config::raw::{Grant, RawStore, RawTenant};
use crate::config::secret::secret_pair;
use crate::config::{StoreConfig, TenantConfig};

/// `[tenants.NAME]`: the tenants whose client secret can be read.
pub(super) fn tenants(
    raw: BTreeMap<String, RawTenant>,
    bad: &mut impl FnMut(&str, String),
) -> Vec<TenantConfig> {
    let mut tenants = Vec::with_capacity(raw.len());
    let mut refresh_tenants = Vec::new();
    for (name, t) in raw {
        let key = |field: &str| format!("tenants.{name}.{field}");
        if name.is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
            bad(
                &format!("tenants.{name:?}"),
                "a tenant name must be non-empty, without spaces".into(),
            );
        }
        let client_id = match t.client_id.filter(|s| !s.trim().is_empty()) {
            Some(id) => id.trim().to_owned(),
            None => {
                bad(&key("client_id"), "is missing".into());
                String::new()
            }
        };
        let client_secret = secret_pair(
            &key("client_secret"),
            t.client_secret,
            t.client_secret_file,
            bad,
        );
        if client_secret.is_none() {
            continue;
        }
        let (redirect_uri, seed_refresh_token) = match t.grant {
            Grant::ClientCredentials => {
                for (field, set) in [
                    ("redirect_uri", t.redirect_uri.is_some()),
                    ("refresh_token", t.refresh_token.is_some()),
                    ("refresh_token_file", t.refresh_token_file.is_some()),
                ] {
                    if set {
                        bad(
                            &key(field),
                            "only applies to grant = \"refresh_token\" tenants".into(),
                        );
                    }
                }
                (None, None)
            }
            Grant::RefreshToken => {
                refresh_tenants.push(name.clone());
                let redirect_uri = match t.redirect_uri {
                    None => {
                        bad(
                            &key("redirect_uri"),
                            "is missing (the redirect URI registered for the app; consent and code exchange need it)".into(),
                        );
                        None
                    }
                    Some(u) => match Url::parse(&u) {
                        Ok(_) => Some(u),
                        Err(e) => {
                            bad(&key("redirect_uri"), format!("{u:?} is not a URL: {e}"));
                            None
                        }
                    },
                };
                let seed = match (t.refresh_token, t.refresh_token_file) {
                    (None, None) => None,
                    (inline, file) => secret_pair(&key("refresh_token"), inline, file, bad),
                };
                (redirect_uri, seed)
            }
        };
        if let Some(client_secret) = client_secret {
            tenants.push(TenantConfig {
                name,
                grant: t.grant,
                client_id,
                client_secret,
                redirect_uri,
                seed_refresh_token,
            });
        }
    }

    tenants
}

/// `[store]`: required by refresh-token tenants, whose rotated refresh
/// tokens must survive restarts.
pub(super) fn store(
    raw: RawStore,
    tenants: &[TenantConfig],
    bad: &mut impl FnMut(&str, String),
) -> StoreConfig {
    let refresh_tenants: Vec<&str> = tenants
        .iter()
        .filter(|t| t.grant == Grant::RefreshToken)
        .map(|t| &*t.name)
        .collect();
    if !refresh_tenants.is_empty() {
        match &raw.path {
            None => bad(
                "store.path",
                format!(
                    "is required: tenant(s) {} use grant = \"refresh_token\", whose rotated refresh tokens must survive restarts",
                    refresh_tenants.join(", ")
                ),
            ),
            // Its folder (a symbolic link's target's) must exist and
            // not be writable by every user.
            Some(p) => {
                if let Err(msg) = crate::store::check_location(p) {
                    bad("store.path", msg);
                }
            }
        }
    }

    StoreConfig { path: raw.path }
}
