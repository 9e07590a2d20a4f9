//! Which tenant a request asks for, as its headers say, before the tenant
//! set is consulted.

use std::borrow::Cow;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};

use super::local;
use crate::error::ProxyError;
use crate::tenant::{Tenant, Tenants};

/// What a request's headers say about its tenant.
#[derive(Debug)]
pub(super) enum Asked<'a> {
    /// Neither a tenant header nor a placeholder: `server.default_tenant`.
    Default,
    /// The tenant header's value, trimmed.
    Header(&'a str),
    /// No tenant header; a placeholder from the proxy's own token endpoint
    /// names the tenant (what Criteo's SDKs send).
    Placeholder(Cow<'a, str>),
    /// A tenant header that is not visible ASCII: it names no tenant.
    Unreadable,
}

impl<'a> Asked<'a> {
    /// Reads the tenant header, else the placeholder; no allocation unless
    /// a placeholder has to be decoded.
    pub(super) fn from(headers: &'a HeaderMap, tenant_header: &HeaderName) -> Self {
        match headers.get(tenant_header) {
            Some(v) => v
                .to_str()
                .map_or(Asked::Unreadable, |s| Asked::Header(s.trim())),
            None => local::placeholder_tenant(headers).map_or(Asked::Default, Asked::Placeholder),
        }
    }

    /// The tenant it names, by name (case-insensitively) or by default.
    pub(super) fn lookup<'t>(&self, tenants: &'t Tenants) -> Option<&'t Arc<Tenant>> {
        match self {
            Asked::Default => tenants.choose(None),
            Asked::Header(name) => tenants.choose(Some(name)),
            Asked::Placeholder(name) => tenants.choose(Some(name)),
            Asked::Unreadable => None,
        }
    }

    /// The name given, if any (what an error answer echoes).
    pub(super) fn name(&self) -> Option<&str> {
        match self {
            Asked::Header(name) => Some(name),
            Asked::Placeholder(name) => Some(name),
            Asked::Default | Asked::Unreadable => None,
        }
    }

    /// Why [`Asked::lookup`] found no tenant.
    pub(super) fn unknown(&self, tenant_header: &HeaderName) -> ProxyError {
        ProxyError::UnknownTenant(match self {
            Asked::Placeholder(name) => format!(
                "the bearer token is a placeholder for tenant {name:?}, which is not configured"
            ),
            Asked::Header(name) => {
                format!("tenant {name:?} is not configured (header {tenant_header})")
            }
            Asked::Unreadable => {
                format!("the {tenant_header} header is not text, so it names no tenant")
            }
            Asked::Default => format!(
                "the request names no tenant: send the {tenant_header} header (no server.default_tenant is set)"
            ),
        })
    }
}
