//! `[tenants.NAME]` and the `[store]` their rotated refresh tokens need.

use std::collections::BTreeMap;

use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::config::raw::{Grant, RawStore, RawTenant};
use crate::config::secret::{SecretSource, secret_pair};
use crate::config::{StoreConfig, TenantConfig, TenantLimit};

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
        let rate_limit = match t.rate_limit.as_deref().map(str::trim) {
            None => TenantLimit::Inherit,
            Some("off") => TenantLimit::Off,
            Some(text) => super::rate(&key("rate_limit"), Some(text), bad)
                .map_or(TenantLimit::Inherit, TenantLimit::Own),
        };
        if let Some(client_secret) = client_secret {
            tenants.push(TenantConfig {
                name,
                grant: t.grant,
                client_id,
                client_secret,
                redirect_uri,
                seed_refresh_token,
                rate_limit,
            });
        }
    }

    tenants
}

/// `[store]`: one of `path`, `url`, `url_file`; required by
/// refresh-token tenants, whose rotated refresh tokens must survive
/// restarts.
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
    let set: Vec<&str> = [
        ("store.path", raw.path.is_some()),
        ("store.url", raw.url.is_some()),
        ("store.url_file", raw.url_file.is_some()),
    ]
    .into_iter()
    .filter_map(|(key, set)| set.then_some(key))
    .collect();
    let mut url = None;
    match set.as_slice() {
        [] if !refresh_tenants.is_empty() => bad(
            "store.path",
            format!(
                "is required: tenant(s) {} use grant = \"refresh_token\", whose rotated refresh tokens must survive restarts; set store.path (a SQLite file, one replica) or store.url / store.url_file (PostgreSQL, shared by replicas)",
                refresh_tenants.join(", ")
            ),
        ),
        [] => {}
        [_] => url = store_url(raw.url, raw.url_file, bad),
        [first, rest @ ..] => bad(
            first,
            format!(
                "set only one of store.path, store.url, store.url_file (found {first} and {})",
                rest.join(" and ")
            ),
        ),
    }
    // Its folder (a symbolic link's target's) must exist and not be
    // writable by every user.
    if let (Some(p), [_]) = (&raw.path, set.as_slice())
        && !refresh_tenants.is_empty()
        && let Err(msg) = crate::store::check_location(p)
    {
        bad("store.path", msg);
    }
    for (key, d, range) in [
        (
            "store.lease",
            raw.lease,
            Duration::from_secs(1)..=Duration::from_secs(600),
        ),
        (
            "store.poll_interval",
            raw.poll_interval,
            Duration::from_millis(100)..=Duration::from_secs(60),
        ),
    ] {
        if !range.contains(&d) {
            bad(
                key,
                format!(
                    "{} must be between {} and {}",
                    humantime::format_duration(d),
                    humantime::format_duration(*range.start()),
                    humantime::format_duration(*range.end())
                ),
            );
        }
    }

    StoreConfig {
        path: raw.path,
        url,
        lease: raw.lease,
        poll_interval: raw.poll_interval,
    }
}

/// `store.url` or `store.url_file` (only one is set), read now and parsed:
/// an error names the key and never quotes the URL (it holds a password).
fn store_url(
    inline: Option<SecretString>,
    file: Option<PathBuf>,
    bad: &mut impl FnMut(&str, String),
) -> Option<SecretSource> {
    if inline.is_none() && file.is_none() {
        return None;
    }
    let key = if inline.is_some() {
        "store.url"
    } else {
        "store.url_file"
    };
    let src = secret_pair("store.url", inline, file, bad)?;
    match src
        .load()
        .map(|u| crate::store::check_url(u.expose_secret()))
    {
        Ok(Ok(())) => Some(src),
        Ok(Err(e)) | Err(e) => {
            bad(key, e);
            None
        }
    }
}
