//! Configuration: serde structs read with figment (defaults < TOML file <
//! `CRITEO_PROXY_` environment), then validated into [`Config`], a type in
//! which every value has been checked and every secret file read once.
//!
//! Validation reports *every* bad key, each named by its dotted path
//! (`tenants.acme.client_secret`), before anything is bound or spawned.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use http::HeaderName;
use ipnet::IpNet;
use url::Url;

use crate::pacing::{Globs, Limits, Rate};

pub(crate) mod files;
#[cfg(test)]
mod fuzz;
mod raw;
mod secret;
#[cfg(test)]
mod tests;
mod validate;
mod view;

pub(crate) use files::MAX_CA_FILE;
pub(crate) use raw::Grant;
use raw::RawConfig;
pub(crate) use secret::{SecretSource, check_admin_token};
pub(crate) use view::REDACTED;

/// Prefix of the environment variables that override the file.
pub(crate) const ENV_PREFIX: &str = "CRITEO_PROXY_";

// === validated ===

/// A configuration in which every value has been checked.
#[derive(Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub refresh: RefreshConfig,
    pub store: StoreConfig,
    pub rate_limit: RateLimitConfig,
    pub consent: Option<ConsentConfig>,
    pub tenants: Vec<TenantConfig>,
    /// A digest of the configuration file as it was just before it was
    /// parsed (`None`: no file). The reloader, once it watches the file,
    /// compares it with the file then: a change made in between would
    /// otherwise be heard by nobody.
    pub(crate) file_digest: Option<u64>,
}

/// `[rate_limit]`: the limits a tenant gets unless it sets its own.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// A request whose turn is further away is answered 429 at once.
    pub max_wait: Duration,
    pub(crate) client_credentials: Option<Rate>,
    pub(crate) refresh_token: Option<Rate>,
    /// The budget of reporting paths, inside a tenant's whole one.
    pub(crate) reporting: Option<Rate>,
    pub(crate) reporting_paths: Globs,
}

/// `tenants.NAME.rate_limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TenantLimit {
    /// Not set: the `[rate_limit]` value for the tenant's grant.
    Inherit,
    /// `"off"`: no limit at all, reporting included.
    Off,
    Own(Rate),
}

impl Config {
    /// What `tenant` is paced by.
    pub(crate) fn limits(&self, tenant: &TenantConfig) -> Limits {
        let r = &self.rate_limit;
        let by_grant = match tenant.grant {
            Grant::ClientCredentials => r.client_credentials,
            Grant::RefreshToken => r.refresh_token,
        };
        let (overall, reporting) = match tenant.rate_limit {
            TenantLimit::Off => (None, None),
            TenantLimit::Own(rate) => (Some(rate), r.reporting),
            TenantLimit::Inherit => (by_grant, r.reporting),
        };
        Limits {
            overall,
            reporting: reporting.map(|rate| (rate, r.reporting_paths.clone())),
            max_wait: r.max_wait,
        }
    }
}

/// Signing key pair of the app's consent connector (client-credentials
/// apps' programmatic consent).
#[derive(Debug, Clone)]
pub struct ConsentConfig {
    pub signing_key: String,
    pub signing_secret: SecretSource,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub tenant_header: HeaderName,
    pub default_tenant: Option<String>,
    pub max_replay_body: usize,
    pub shutdown_grace: Duration,
    pub allowed_clients: Option<Vec<IpNet>>,
    /// Threads serving the proxy listener (default: one per CPU).
    pub workers: Option<usize>,
    /// Open proxy connections at most; more are closed at once.
    pub max_connections: usize,
    /// Largest request head (request line + headers) read.
    pub max_header_bytes: usize,
    /// A client must send its request head within this time.
    pub header_read_timeout: Duration,
    /// When set, `/oauth/authorize` answers only requests bearing it, from
    /// anywhere; when not, only clients on loopback. A file is read again
    /// at each such request.
    pub admin_token: Option<SecretSource>,
    /// A connection with no request in progress for this long is closed.
    pub idle_timeout: Duration,
    /// A request body that sends nothing for this long is abandoned.
    pub body_read_timeout: Duration,
    /// Open admin connections at most; more are closed at once.
    pub admin_max_connections: usize,
    /// Bytes all the bodies kept for a replay may hold together.
    pub replay_budget: usize,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub url: Url,
    pub token_url: Url,
    pub consent_url: Url,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// Requests in flight to the upstream at most (so HTTP/1.1
    /// connections), shared equally by the workers; more wait up to
    /// `connect_timeout`.
    pub max_connections: usize,
    /// Extra trusted roots (PEM) besides the built-in web PKI roots.
    pub extra_roots: Option<ExtraRoots>,
}

/// Certificates from `upstream.ca_file`, parsed once, kept as PEM too for
/// the token client.
#[derive(Debug, Clone)]
pub struct ExtraRoots {
    pub path: PathBuf,
    pub pem: Vec<u8>,
    pub certs: Vec<rustls_pki_types::CertificateDer<'static>>,
}

fn read_roots(path: &Path) -> Result<ExtraRoots, String> {
    use rustls_pki_types::pem::PemObject;
    let pem = files::read_regular(path, MAX_CA_FILE)?;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(ExtraRoots {
        path: path.to_owned(),
        pem,
        certs,
    })
}

#[derive(Debug, Clone)]
pub struct RefreshConfig {
    /// Renew once this fraction of a token's lifetime has passed.
    pub at_fraction: f64,
    /// How long a request may wait for a token that is being fetched.
    pub wait_timeout: Duration,
    /// Bound on one client-credentials call to the token endpoint.
    pub token_timeout: Duration,
    /// Bound on a call that may rotate a refresh token (refresh token,
    /// code exchange): abandoning one that Criteo completes loses the tenant.
    pub rotation_timeout: Duration,
    /// A shorter `expires_in` is raised to this; renewals come at most
    /// every half of it, unless a 401 asks.
    pub min_token_lifetime: Duration,
    /// Ceiling of the exponential back-off after transient failures.
    pub max_backoff: Duration,
    /// Pause after the token endpoint rejected the credentials.
    pub rejected_backoff: Duration,
    /// Fetch a tenant's first token on its first request, not at start.
    pub lazy: bool,
}

/// `[store]`: at most one of `path` (embedded) and `url` (shared).
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `store.path`: the embedded SQLite store.
    pub path: Option<PathBuf>,
    /// `store.url` / `store.url_file`: the shared PostgreSQL store. A file
    /// is read again at every connection (a rotated password is picked up).
    pub url: Option<SecretSource>,
    /// `store.lease`: how long a refresh lease lasts without renewal.
    pub lease: Duration,
    /// `store.poll_interval`: the change feed's polling, behind `NOTIFY`.
    pub poll_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub name: String,
    pub grant: Grant,
    pub client_id: String,
    pub client_secret: SecretSource,
    /// Refresh-token tenants: where Criteo sends the person after consent.
    pub redirect_uri: Option<String>,
    /// Refresh-token tenants: the refresh token to start from when the
    /// store holds none.
    pub seed_refresh_token: Option<SecretSource>,
    pub(crate) rate_limit: TenantLimit,
}

// === errors ===

/// Everything wrong with a configuration, one line per problem.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(msg: String) -> Self {
        Self {
            problems: vec![msg],
        }
    }
}

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        let problems = err
            .into_iter()
            .map(|e| {
                let key = e.path.join(".");
                let origin = e
                    .metadata
                    .as_ref()
                    .and_then(|m| m.source.as_ref())
                    .map(|s| format!(" (from {s})"))
                    .unwrap_or_default();
                if key.is_empty() {
                    format!("invalid configuration{origin}: {}", e.kind)
                } else {
                    format!("{key}: {}{origin}", e.kind)
                }
            })
            .collect();
        Self { problems }
    }
}

// === loading ===

impl Config {
    /// Reads the file (which must exist) and the environment, then validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            if let Err(e) = files::check_regular(path, files::MAX_CONFIG_FILE) {
                return Err(ConfigError::one(format!("config file: {e}")));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // Before the parse reads it: a change after this point makes the
        // digest differ from the file, and the reloader look again.
        let digest = path.and_then(files::digest);
        let mut config = Self::from_figment(figment.merge(env_provider()))?;
        config.file_digest = digest;
        Ok(config)
    }

    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let raw: RawConfig = figment.extract()?;
        raw.validate()
    }

    /// Parses TOML text, then the environment over it (`--dev`).
    pub fn from_toml_with_env(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(text)).merge(env_provider()))
    }

    /// Parses TOML text (no environment), for tests and embedding.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(text)))
    }

    /// The effective configuration as TOML, every secret redacted, every
    /// file named by its path: valid input to `check-config` again. It is
    /// printed from the same structs the file is read into (`view.rs`), so
    /// a key cannot be left out.
    pub fn redacted_toml(&self) -> Result<String, String> {
        view::redacted_toml(self)
    }

    /// Settings that work but deserve a word at start: each names its key.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (key, url) in [
            ("upstream.url", &self.upstream.url),
            ("upstream.token_url", &self.upstream.token_url),
        ] {
            if is_plain_http_to_another_host(url) {
                out.push(format!(
                    "{key} is plain http:// to {}, which is not loopback: credentials and tokens cross the network unencrypted",
                    url.host_str().unwrap_or_default()
                ));
            }
        }
        out
    }
}

/// `http://` to anything but this machine (`localhost`, `*.localhost`,
/// 127.0.0.0/8, `::1`): a stand-in on loopback is fine, anything else
/// carries secrets in clear text.
fn is_plain_http_to_another_host(url: &Url) -> bool {
    if url.scheme() != "http" {
        return false;
    }
    match url.host() {
        Some(url::Host::Ipv4(ip)) => !ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => !ip.to_canonical().is_loopback(),
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            !(d == "localhost" || d.ends_with(".localhost"))
        }
        None => true,
    }
}

/// `CRITEO_PROXY_SERVER__LISTEN` → `server.listen`. `CRITEO_PROXY_CONFIG`
/// names the file and is not a key.
fn env_provider() -> Env {
    Env::prefixed(ENV_PREFIX)
        .ignore(&["config", "log_format"])
        .split("__")
}
