//! Tenants: one Criteo credential each, with its token cell and metric
//! handles, looked up by name on every request.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::config::{Config, Grant};
use crate::metrics::{Metrics, TenantMetrics};
use crate::token::TokenCell;

#[derive(Debug)]
pub struct Tenant {
    pub name: Arc<str>,
    pub grant: Grant,
    pub tokens: TokenCell,
    pub metrics: TenantMetrics,
    /// Set once the first upstream 403 has been logged.
    pub warned_forbidden: AtomicBool,
}

/// Every configured tenant, by name, plus the default.
#[derive(Debug)]
pub struct Tenants {
    by_name: HashMap<Box<str>, Arc<Tenant>>,
    /// In configuration order, for the admin pages.
    ordered: Vec<Arc<Tenant>>,
    default: Option<Arc<Tenant>>,
}

impl Tenants {
    pub fn new(config: &Config, metrics: &Metrics) -> Self {
        let ordered: Vec<Arc<Tenant>> = config
            .tenants
            .iter()
            .map(|t| {
                Arc::new(Tenant {
                    name: t.name.as_str().into(),
                    grant: t.grant,
                    tokens: TokenCell::new(config.refresh.lazy),
                    metrics: metrics.tenant(&t.name),
                    warned_forbidden: AtomicBool::new(false),
                })
            })
            .collect();
        let by_name = ordered
            .iter()
            .map(|t| (Box::from(&*t.name), Arc::clone(t)))
            .collect::<HashMap<_, _>>();
        let default = config
            .server
            .default_tenant
            .as_deref()
            .and_then(|d| by_name.get(d).cloned());
        Self {
            by_name,
            ordered,
            default,
        }
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

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.ordered.iter()
    }

    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }
}
