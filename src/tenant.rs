//! Tenants: one Criteo credential each, with its token cell and metric
//! handles, looked up by name on every request. The set is replaced whole
//! on a configuration reload ([`Tenants::rebuild`]); a tenant whose
//! settings did not change keeps its `Arc<Tenant>`, and so its token.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::config::{Config, Grant, SecretSource, TenantConfig};
use crate::metrics::{Metrics, TenantMetrics};
use crate::pacing::{Limits, Pacing};
use crate::token::TokenCell;

#[derive(Debug)]
pub struct Tenant {
    pub name: Arc<str>,
    pub grant: Grant,
    /// Shared with the tenant's refresher, its only writer.
    pub tokens: Arc<TokenCell>,
    pub metrics: TenantMetrics,
    /// Set once the first upstream 403 has been logged.
    pub warned_forbidden: AtomicBool,
    /// The tenant's rate limits; `None` (one null check on the request
    /// path) when it has none.
    pub(crate) pacing: Option<Box<Pacing>>,
    /// What the tenant was built from; a reload keeps the tenant only if
    /// this is unchanged. Secrets enter it hashed.
    fingerprint: String,
}

/// Every configured tenant, by name, plus the default.
#[derive(Debug)]
pub struct Tenants {
    by_name: HashMap<Box<str>, Arc<Tenant>>,
    /// In configuration order, for the admin pages.
    ordered: Vec<Arc<Tenant>>,
    default: Option<Arc<Tenant>>,
    /// Tenants by their app's `client_id` (several tenants of one app
    /// share it), for the local token endpoint's choice by client id.
    by_client_id: HashMap<Box<str>, Vec<Arc<Tenant>>>,
}

/// What a rebuild decided for each tenant.
#[derive(Debug, Default)]
pub struct Changes {
    /// Tenants (new, or rebuilt because their settings changed) whose
    /// refresher must start, with their configuration.
    pub start: Vec<(Arc<Tenant>, TenantConfig)>,
    /// Names whose running refresher must stop (removed or rebuilt).
    pub stop: Vec<Arc<str>>,
}

fn fingerprint(t: &TenantConfig) -> String {
    let secret = |s: &SecretSource| match s {
        SecretSource::Inline(v) => {
            format!(
                "inline:{}",
                hex::encode(Sha256::digest(v.expose_secret().as_bytes()))
            )
        }
        SecretSource::File(p) => format!("file:{}", p.display()),
    };
    format!(
        "{}|{}|{}|{}|{}",
        t.grant.as_str(),
        t.client_id,
        secret(&t.client_secret),
        t.redirect_uri.as_deref().unwrap_or(""),
        t.seed_refresh_token
            .as_ref()
            .map(secret)
            .unwrap_or_default()
    )
}

impl Tenant {
    fn new(t: &TenantConfig, lazy: bool, metrics: &Metrics, limits: Limits) -> Self {
        Tenant {
            name: t.name.as_str().into(),
            grant: t.grant,
            tokens: Arc::new(TokenCell::new(lazy)),
            metrics: metrics.tenant(&t.name),
            warned_forbidden: AtomicBool::new(false),
            pacing: Pacing::new(limits).map(Box::new),
            fingerprint: fingerprint(t),
        }
    }

    /// The same tenant (its token cell, which its refresher keeps
    /// filling) paced by other limits: a reload that changes only limits
    /// keeps the token. Requests already waiting keep their turns in the
    /// old budget.
    fn repaced(&self, metrics: &Metrics, limits: Limits) -> Self {
        Tenant {
            name: Arc::clone(&self.name),
            grant: self.grant,
            tokens: Arc::clone(&self.tokens),
            metrics: metrics.tenant(&self.name),
            warned_forbidden: AtomicBool::new(self.warned_forbidden.load(Ordering::Relaxed)),
            pacing: Pacing::new(limits).map(Box::new),
            fingerprint: self.fingerprint.clone(),
        }
    }

    fn limits(&self) -> Option<&Limits> {
        self.pacing.as_deref().map(Pacing::limits)
    }
}

/// The limits that pace nothing are no pacer at all.
fn paced(limits: &Limits) -> Option<&Limits> {
    (limits.overall.is_some() || limits.reporting.is_some()).then_some(limits)
}

impl Tenants {
    pub fn new(config: &Config, metrics: &Metrics) -> Self {
        Self::rebuild(config, metrics, None).0
    }

    /// The tenants of `config`, reusing from `previous` every tenant whose
    /// settings are unchanged.
    pub fn rebuild(
        config: &Config,
        metrics: &Metrics,
        previous: Option<&Tenants>,
    ) -> (Self, Changes) {
        let mut changes = Changes::default();
        let mut ordered = Vec::with_capacity(config.tenants.len());
        for t in &config.tenants {
            let kept = previous
                .and_then(|p| p.by_name.get(t.name.as_str()))
                .filter(|old| old.fingerprint == fingerprint(t));
            let limits = config.limits(t);
            match kept {
                Some(old) if old.limits() == paced(&limits) => ordered.push(Arc::clone(old)),
                Some(old) => ordered.push(Arc::new(old.repaced(metrics, limits))),
                None => {
                    let tenant = Arc::new(Tenant::new(t, config.refresh.lazy, metrics, limits));
                    if previous.is_some_and(|p| p.by_name.contains_key(t.name.as_str())) {
                        changes.stop.push(Arc::clone(&tenant.name));
                    }
                    changes.start.push((Arc::clone(&tenant), t.clone()));
                    ordered.push(tenant);
                }
            }
        }
        // Replicas sharing a store pace to their share of each limit: a
        // pacer built now starts at the share the others had, not at the
        // whole limit until the next heartbeat.
        if let Some(replicas) = previous.and_then(Tenants::replicas) {
            for t in &ordered {
                if let Some(p) = &t.pacing {
                    p.set_share(replicas);
                }
            }
        }
        if let Some(p) = previous {
            for old in &p.ordered {
                if !config.tenants.iter().any(|t| *t.name == *old.name) {
                    changes.stop.push(Arc::clone(&old.name));
                }
            }
        }
        let by_name = ordered
            .iter()
            .map(|t| (Box::from(&*t.name), Arc::clone(t)))
            .collect::<HashMap<_, _>>();
        let default = config
            .server
            .default_tenant
            .as_deref()
            .and_then(|d| by_name.get(d).cloned());
        let mut by_client_id: HashMap<Box<str>, Vec<Arc<Tenant>>> = HashMap::new();
        for (t, tenant) in config.tenants.iter().zip(&ordered) {
            by_client_id
                .entry(Box::from(t.client_id.as_str()))
                .or_default()
                .push(Arc::clone(tenant));
        }
        (
            Self {
                by_name,
                ordered,
                default,
                by_client_id,
            },
            changes,
        )
    }

    /// The tenant a request names, or the default when it names none.
    /// Names match exactly, then ignoring ASCII case (environment
    /// variables lowercase tenant names).
    #[inline]
    pub fn choose(&self, requested: Option<&str>) -> Option<&Arc<Tenant>> {
        match requested {
            None => self.default.as_ref(),
            Some(name) => self.by_name.get(name).or_else(|| {
                if name.bytes().any(|b| b.is_ascii_uppercase()) {
                    self.by_name.get(name.to_ascii_lowercase().as_str())
                } else {
                    None
                }
            }),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.by_name.get(name)
    }

    /// The default tenant (`server.default_tenant`), if one is set.
    pub fn default_tenant(&self) -> Option<&Arc<Tenant>> {
        self.default.as_ref()
    }

    /// The tenants whose app has this `client_id` (none, one, or several
    /// when one app serves several consented accounts).
    pub fn with_client_id(&self, client_id: &str) -> &[Arc<Tenant>] {
        self.by_client_id.get(client_id).map_or(&[], Vec::as_slice)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.ordered.iter()
    }

    /// How many replicas share the limits, as the paced tenants were
    /// last told (`None`: no tenant is paced).
    pub(crate) fn replicas(&self) -> Option<u32> {
        self.ordered
            .iter()
            .find_map(|t| t.pacing.as_deref().map(Pacing::replicas))
    }

    /// Paces every paced tenant to its share of its limits, `replicas`
    /// sharing them.
    pub(crate) fn set_share(&self, replicas: u32) {
        for p in self.ordered.iter().filter_map(|t| t.pacing.as_deref()) {
            p.set_share(replicas);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.ordered.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(limit: &str) -> Config {
        Config::from_toml(&format!(
            "[rate_limit]\nclient_credentials = \"{limit}\"\n[tenants.main]\ngrant = \"client_credentials\"\nclient_id = \"id\"\nclient_secret = \"s\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_reload_that_changes_only_the_limit_keeps_the_token_and_repaces() {
        let metrics = Metrics::new(prometheus::Registry::new());
        let before = Tenants::new(&config("10/min"), &metrics);
        let (after, changes) = Tenants::rebuild(&config("20/min"), &metrics, Some(&before));
        let (old, new) = (before.get("main").unwrap(), after.get("main").unwrap());
        assert!(
            Arc::ptr_eq(&old.tokens, &new.tokens),
            "the token cell is kept"
        );
        assert!(changes.start.is_empty() && changes.stop.is_empty());
        let limit = |t: &Tenant| t.limits().and_then(|l| l.overall).map(|r| r.to_string());
        assert_eq!(limit(new).as_deref(), Some("20/min"));
        after.set_share(3);
        let (again, _) = Tenants::rebuild(&config("20/min"), &metrics, Some(&after));
        assert!(
            Arc::ptr_eq(new, again.get("main").unwrap()),
            "unchanged: kept whole"
        );
        let (third, _) = Tenants::rebuild(&config("30/min"), &metrics, Some(&again));
        assert_eq!(
            third.replicas(),
            Some(3),
            "a repaced tenant keeps the replicas' share"
        );
    }
}
