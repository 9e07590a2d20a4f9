//! The configuration as written: serde structs that figment fills
//! (defaults < TOML file < environment). They are also what `check-config`
//! prints (see `view.rs`): secrets serialise as "<redacted>" whatever they
//! hold, sizes as exact byte counts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use secrecy::SecretString;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) upstream: RawUpstream,
    #[serde(default)]
    pub(super) refresh: RawRefresh,
    #[serde(default)]
    pub(super) store: RawStore,
    #[serde(default)]
    pub(super) rate_limit: RawRateLimit,
    #[serde(default)]
    pub(super) consent: Option<RawConsent>,
    #[serde(default)]
    pub(super) tenants: BTreeMap<String, RawTenant>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    pub(super) listen: SocketAddr,
    pub(super) admin_listen: SocketAddr,
    pub(super) tenant_header: String,
    #[serde(deserialize_with = "opt_lenient_string")]
    pub(super) default_tenant: Option<String>,
    #[serde(serialize_with = "exact_bytes")]
    pub(super) max_replay_body: bytesize::ByteSize,
    #[serde(with = "humantime_serde")]
    pub(super) shutdown_grace: Duration,
    pub(super) allowed_clients: Option<Vec<IpNet>>,
    pub(super) workers: Option<usize>,
    pub(super) max_connections: usize,
    #[serde(serialize_with = "exact_bytes")]
    pub(super) max_header_bytes: bytesize::ByteSize,
    #[serde(with = "humantime_serde")]
    pub(super) header_read_timeout: Duration,
    #[serde(deserialize_with = "opt_lenient_secret", serialize_with = "redacted")]
    pub(super) admin_token: Option<SecretString>,
    pub(super) admin_token_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub(super) idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) body_read_timeout: Duration,
    pub(super) admin_max_connections: usize,
    #[serde(serialize_with = "exact_bytes")]
    pub(super) replay_budget: bytesize::ByteSize,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            tenant_header: "X-Criteo-Tenant".into(),
            default_tenant: None,
            max_replay_body: bytesize::ByteSize::mib(1),
            shutdown_grace: Duration::from_secs(20),
            allowed_clients: None,
            workers: None,
            max_connections: 256,
            max_header_bytes: bytesize::ByteSize::kib(64),
            header_read_timeout: Duration::from_secs(30),
            admin_token: None,
            admin_token_file: None,
            idle_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
            admin_max_connections: 64,
            replay_budget: bytesize::ByteSize::mib(32),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstream {
    pub(super) url: String,
    pub(super) token_url: String,
    pub(super) consent_url: String,
    #[serde(with = "humantime_serde")]
    pub(super) connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) timeout: Duration,
    pub(super) max_connections: usize,
    pub(super) ca_file: Option<PathBuf>,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            url: "https://api.criteo.com".into(),
            token_url: "https://api.criteo.com/oauth2/token".into(),
            consent_url: "https://consent.criteo.com/request".into(),
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(60),
            max_connections: 128,
            ca_file: None,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRefresh {
    pub(super) at_fraction: f64,
    #[serde(with = "humantime_serde")]
    pub(super) wait_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) token_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) rotation_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) min_token_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) max_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) rejected_backoff: Duration,
    pub(super) lazy: bool,
}

impl Default for RawRefresh {
    fn default() -> Self {
        Self {
            at_fraction: 0.8,
            wait_timeout: Duration::from_secs(5),
            token_timeout: Duration::from_secs(10),
            rotation_timeout: Duration::from_secs(120),
            min_token_lifetime: Duration::from_secs(10),
            max_backoff: Duration::from_secs(30),
            rejected_backoff: Duration::from_secs(300),
            lazy: false,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawStore {
    pub(super) path: Option<PathBuf>,
    /// Holds a password: printed with it redacted.
    #[serde(
        deserialize_with = "opt_lenient_secret",
        serialize_with = "redacted_url"
    )]
    pub(super) url: Option<SecretString>,
    pub(super) url_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub(super) lease: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) poll_interval: Duration,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            path: None,
            url: None,
            url_file: None,
            lease: Duration::from_secs(15),
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// `[rate_limit]`: limits are text (`"250/min"`), read in validation so
/// that a bad one is named by its key.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRateLimit {
    #[serde(with = "humantime_serde")]
    pub(super) max_wait: Duration,
    #[serde(deserialize_with = "opt_lenient_string")]
    pub(super) client_credentials: Option<String>,
    #[serde(deserialize_with = "opt_lenient_string")]
    pub(super) refresh_token: Option<String>,
    #[serde(deserialize_with = "opt_lenient_string")]
    pub(super) reporting: Option<String>,
    pub(super) reporting_paths: Vec<String>,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_secs(30),
            client_credentials: None,
            refresh_token: None,
            reporting: None,
            reporting_paths: crate::pacing::DEFAULT_REPORTING_PATHS
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsent {
    #[serde(default, deserialize_with = "opt_lenient_string")]
    pub(super) signing_key: Option<String>,
    #[serde(
        default,
        deserialize_with = "opt_lenient_secret",
        serialize_with = "redacted"
    )]
    pub(super) signing_secret: Option<SecretString>,
    pub(super) signing_secret_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    pub(super) grant: Grant,
    #[serde(default, deserialize_with = "opt_lenient_string")]
    pub(super) client_id: Option<String>,
    #[serde(
        default,
        deserialize_with = "opt_lenient_secret",
        serialize_with = "redacted"
    )]
    pub(super) client_secret: Option<SecretString>,
    pub(super) client_secret_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "opt_lenient_string")]
    pub(super) redirect_uri: Option<String>,
    #[serde(
        default,
        deserialize_with = "opt_lenient_secret",
        serialize_with = "redacted"
    )]
    pub(super) refresh_token: Option<SecretString>,
    pub(super) refresh_token_file: Option<PathBuf>,
    /// This tenant's own limit, or `"off"`.
    #[serde(default, deserialize_with = "opt_lenient_string")]
    pub(super) rate_limit: Option<String>,
}

/// How a tenant obtains its access tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    ClientCredentials,
    RefreshToken,
}

impl Grant {
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::RefreshToken => "refresh_token",
        }
    }
}

/// Environment values are parsed by figment as TOML scalars, so a numeric
/// client id arrives as an integer: accept any scalar as a string.
fn opt_lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(Option::<Scalar>::deserialize(d)?.map(|s| match s {
        Scalar::S(s) => s,
        Scalar::I(i) => i.to_string(),
        Scalar::U(u) => u.to_string(),
        Scalar::F(f) => f.to_string(),
        Scalar::B(b) => b.to_string(),
    }))
}

fn opt_lenient_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
    Ok(opt_lenient_string(d)?.map(SecretString::from))
}

/// A secret field prints as `"<redacted>"` whatever it holds.
fn redacted<S: Serializer>(secret: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => s.serialize_some(super::view::REDACTED),
        None => s.serialize_none(),
    }
}

/// A database URL prints with its password redacted (the rest helps).
fn redacted_url<S: Serializer>(url: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    use secrecy::ExposeSecret;
    match url {
        Some(u) => s.serialize_some(&crate::store::redact_url(u.expose_secret())),
        None => s.serialize_none(),
    }
}

/// Sizes print as exact byte counts (`ByteSize`'s own text rounds).
fn exact_bytes<S: Serializer>(size: &bytesize::ByteSize, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(size.as_u64())
}
