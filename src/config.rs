//! Configuration: serde structs read with figment (defaults < TOML file <
//! `CRITEO_PROXY_` environment), then validated into [`Config`], a type in
//! which every value has been checked and every secret file read once.
//!
//! Validation reports *every* bad key, each named by its dotted path
//! (`tenants.acme.client_secret`), before anything is bound or spawned.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use http::HeaderName;
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::Url;

pub(crate) mod files;
#[cfg(test)]
mod fuzz;
mod view;

pub(crate) use files::{MAX_CA_FILE, MAX_SECRET_FILE};

/// Prefix of the environment variables that override the file.
pub(crate) const ENV_PREFIX: &str = "CRITEO_PROXY_";

// === raw, as written ===
//
// The raw structs are also what `check-config` prints (see `view.rs`):
// secrets serialise as "<redacted>" whatever they hold, sizes as exact
// byte counts.

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    refresh: RawRefresh,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    consent: Option<RawConsent>,
    #[serde(default)]
    tenants: BTreeMap<String, RawTenant>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: SocketAddr,
    admin_listen: SocketAddr,
    tenant_header: String,
    #[serde(deserialize_with = "opt_lenient_string")]
    default_tenant: Option<String>,
    #[serde(serialize_with = "exact_bytes")]
    max_replay_body: bytesize::ByteSize,
    #[serde(with = "humantime_serde")]
    shutdown_grace: Duration,
    allowed_clients: Option<Vec<IpNet>>,
    workers: Option<usize>,
    max_connections: usize,
    #[serde(serialize_with = "exact_bytes")]
    max_header_bytes: bytesize::ByteSize,
    #[serde(with = "humantime_serde")]
    header_read_timeout: Duration,
    #[serde(deserialize_with = "opt_lenient_secret", serialize_with = "redacted")]
    admin_token: Option<SecretString>,
    admin_token_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    body_read_timeout: Duration,
    admin_max_connections: usize,
    #[serde(serialize_with = "exact_bytes")]
    replay_budget: bytesize::ByteSize,
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
struct RawUpstream {
    url: String,
    token_url: String,
    consent_url: String,
    #[serde(with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    timeout: Duration,
    max_connections: usize,
    ca_file: Option<PathBuf>,
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
struct RawRefresh {
    at_fraction: f64,
    #[serde(with = "humantime_serde")]
    wait_timeout: Duration,
    #[serde(with = "humantime_serde")]
    token_timeout: Duration,
    #[serde(with = "humantime_serde")]
    rotation_timeout: Duration,
    #[serde(with = "humantime_serde")]
    min_token_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    max_backoff: Duration,
    #[serde(with = "humantime_serde")]
    rejected_backoff: Duration,
    lazy: bool,
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

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    path: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConsent {
    #[serde(default, deserialize_with = "opt_lenient_string")]
    signing_key: Option<String>,
    #[serde(
        default,
        deserialize_with = "opt_lenient_secret",
        serialize_with = "redacted"
    )]
    signing_secret: Option<SecretString>,
    signing_secret_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    grant: Grant,
    #[serde(default, deserialize_with = "opt_lenient_string")]
    client_id: Option<String>,
    #[serde(
        default,
        deserialize_with = "opt_lenient_secret",
        serialize_with = "redacted"
    )]
    client_secret: Option<SecretString>,
    client_secret_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "opt_lenient_string")]
    redirect_uri: Option<String>,
    #[serde(
        default,
        deserialize_with = "opt_lenient_secret",
        serialize_with = "redacted"
    )]
    refresh_token: Option<SecretString>,
    refresh_token_file: Option<PathBuf>,
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
        Some(_) => s.serialize_some(view::REDACTED),
        None => s.serialize_none(),
    }
}

/// Sizes print as exact byte counts (`ByteSize`'s own text rounds).
fn exact_bytes<S: Serializer>(size: &bytesize::ByteSize, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(size.as_u64())
}

// === validated ===

/// A configuration in which every value has been checked.
#[derive(Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub refresh: RefreshConfig,
    pub store: StoreConfig,
    pub consent: Option<ConsentConfig>,
    pub tenants: Vec<TenantConfig>,
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

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: Option<PathBuf>,
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
}

/// Where a secret lives. A file is read again at every use, so that a
/// rotated credential (Criteo allows five pairs per app) is picked up
/// without a restart.
#[derive(Clone)]
pub enum SecretSource {
    Inline(SecretString),
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("Inline(<redacted>)"),
            SecretSource::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

impl SecretSource {
    /// Reads the secret now: the inline value, or the file's content with
    /// surrounding whitespace trimmed. An empty secret is an error.
    pub fn load(&self) -> Result<SecretString, String> {
        match self {
            SecretSource::Inline(s) if s.expose_secret().trim().is_empty() => {
                Err("is empty".into())
            }
            SecretSource::Inline(s) => Ok(s.clone()),
            SecretSource::File(path) => read_secret_file(path),
        }
    }
}

/// Only a regular file, at most [`MAX_SECRET_FILE`] bytes, opened so that a
/// FIFO cannot block (see `files.rs`): this runs at every token request.
fn read_secret_file(path: &Path) -> Result<SecretString, String> {
    let bytes = files::read_regular(path, MAX_SECRET_FILE)?;
    let text =
        String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

/// `NAME` inline or `NAME_file`, exactly one, read once now to check it.
/// `key` names the inline key; errors about the file name `key_file`.
fn secret_pair(
    key: &str,
    inline: Option<SecretString>,
    file: Option<PathBuf>,
    bad: &mut impl FnMut(&str, String),
) -> Option<SecretSource> {
    let file_key = format!("{key}_file");
    let (src, src_key) = match (inline, file) {
        (Some(_), Some(_)) => {
            bad(key, format!("set {key} or {file_key}, not both"));
            return None;
        }
        (None, None) => {
            bad(key, format!("is missing (set {key} or {file_key})"));
            return None;
        }
        (Some(s), None) => (SecretSource::Inline(s), key),
        (None, Some(p)) => (SecretSource::File(p), file_key.as_str()),
    };
    match src.load() {
        Ok(_) => Some(src),
        Err(e) => {
            bad(src_key, e);
            None
        }
    }
}

/// An admin token travels in `Authorization: Bearer …` as-is. (Its
/// strength is the operator's: `openssl rand -hex 32` makes a good one.)
pub(crate) fn check_admin_token(token: &str) -> Result<(), String> {
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces".into());
    }
    Ok(())
}

// === bounds ===
//
// A value past these is a mistake, and some would crash the process later:
// `Instant + 3e11 years` panics, so does a semaphore of 2^61 permits.

/// Every timeout and back-off.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// `server.shutdown_grace`: Kubernetes waits `terminationGracePeriodSeconds`.
const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(3600);
const MAX_CONNECTIONS: usize = 1_000_000;
const MAX_REPLAY_BODY: u64 = 64 * 1024 * 1024;
const MAX_HEADER_BYTES: u64 = 1024 * 1024;
const MAX_REPLAY_BUDGET: u64 = 1024 * 1024 * 1024;

/// More than zero, at most `max`.
fn duration_within(key: &str, d: Duration, max: Duration, bad: &mut impl FnMut(&str, String)) {
    if d.is_zero() {
        bad(key, "must be more than 0s".into());
    } else if d > max {
        bad(
            key,
            format!(
                "{} is more than the {} allowed",
                humantime::format_duration(d),
                humantime::format_duration(max)
            ),
        );
    }
}

/// The size in bytes, if within `range`.
fn size_within(
    key: &str,
    size: bytesize::ByteSize,
    range: std::ops::RangeInclusive<u64>,
    bad: &mut impl FnMut(&str, String),
) -> usize {
    let n = size.as_u64();
    if !range.contains(&n) {
        let show = |b: u64| bytesize::ByteSize::b(b).display().iec().to_string();
        bad(
            key,
            format!(
                "{n} bytes is outside {} … {}",
                show(*range.start()),
                show(*range.end())
            ),
        );
    }
    usize::try_from(n.min(*range.end())).unwrap_or(usize::MAX)
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
        Self::from_figment(figment.merge(env_provider()))
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

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, msg: String| problems.push(format!("{key}: {msg}"));

        let tenant_header = match HeaderName::from_bytes(self.server.tenant_header.as_bytes()) {
            Ok(h) => h,
            Err(_) => {
                bad(
                    "server.tenant_header",
                    format!("{:?} is not a valid header name", self.server.tenant_header),
                );
                HeaderName::from_static("x-criteo-tenant")
            }
        };
        if let Some(d) = &self.server.default_tenant
            && !self.tenants.contains_key(d)
        {
            bad(
                "server.default_tenant",
                format!("names {d:?}, which is not a configured tenant"),
            );
        }
        let max_replay_body = size_within(
            "server.max_replay_body",
            self.server.max_replay_body,
            0..=MAX_REPLAY_BODY,
            &mut bad,
        );
        if let Some(w) = self.server.workers
            && !(1..=256).contains(&w)
        {
            bad("server.workers", format!("{w} must be between 1 and 256"));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.server.max_connections) {
            bad(
                "server.max_connections",
                format!(
                    "{} must be between 1 and {MAX_CONNECTIONS}",
                    self.server.max_connections
                ),
            );
        }
        // Connection limits and their timers: counts a semaphore can hold,
        // durations a deadline can be computed from.
        for (key, n) in [
            (
                "server.admin_max_connections",
                self.server.admin_max_connections,
            ),
            ("upstream.max_connections", self.upstream.max_connections),
        ] {
            if !(1..=MAX_CONNECTIONS).contains(&n) {
                bad(key, format!("{n} must be between 1 and {MAX_CONNECTIONS}"));
            }
        }
        for (key, d) in [
            ("server.idle_timeout", self.server.idle_timeout),
            ("server.body_read_timeout", self.server.body_read_timeout),
        ] {
            duration_within(key, d, MAX_TIMEOUT, &mut bad);
        }
        let replay_budget = size_within(
            "server.replay_budget",
            self.server.replay_budget,
            1..=MAX_REPLAY_BUDGET,
            &mut bad,
        );
        let max_header_bytes = size_within(
            "server.max_header_bytes",
            self.server.max_header_bytes,
            8 * 1024..=MAX_HEADER_BYTES,
            &mut bad,
        );
        duration_within(
            "server.header_read_timeout",
            self.server.header_read_timeout,
            MAX_TIMEOUT,
            &mut bad,
        );
        duration_within(
            "server.shutdown_grace",
            self.server.shutdown_grace,
            MAX_SHUTDOWN_GRACE,
            &mut bad,
        );
        let admin_token = match (self.server.admin_token, self.server.admin_token_file) {
            (None, None) => None,
            (inline, file) => {
                secret_pair("server.admin_token", inline, file, &mut bad).filter(|src| {
                    let key = match src {
                        SecretSource::Inline(_) => "server.admin_token",
                        SecretSource::File(_) => "server.admin_token_file",
                    };
                    match src.load().map(|t| check_admin_token(t.expose_secret())) {
                        Ok(Err(e)) | Err(e) => {
                            bad(key, e);
                            false
                        }
                        Ok(Ok(())) => true,
                    }
                })
            }
        };
        if self.server.listen == self.server.admin_listen && self.server.listen.port() != 0 {
            bad(
                "server.admin_listen",
                format!(
                    "is the same address as server.listen ({})",
                    self.server.listen
                ),
            );
        }

        let mut url = |key: &str, value: &str| match Url::parse(value) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
            Ok(_) => {
                bad(
                    key,
                    format!("{value:?} must be an http:// or https:// URL with a host"),
                );
                None
            }
            Err(e) => {
                bad(key, format!("{value:?} is not a URL: {e}"));
                None
            }
        };
        let upstream_url = url("upstream.url", &self.upstream.url);
        let token_url = url("upstream.token_url", &self.upstream.token_url);
        let consent_url = url("upstream.consent_url", &self.upstream.consent_url);
        if let Some(u) = &upstream_url
            && (u.query().is_some() || u.fragment().is_some())
        {
            bad("upstream.url", "must not carry a query or fragment".into());
        }
        let extra_roots = match &self.upstream.ca_file {
            None => None,
            Some(p) => match read_roots(p) {
                Ok(r) => Some(r),
                Err(e) => {
                    bad("upstream.ca_file", e);
                    None
                }
            },
        };
        for (key, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.timeout", self.upstream.timeout),
            ("refresh.wait_timeout", self.refresh.wait_timeout),
            ("refresh.token_timeout", self.refresh.token_timeout),
            ("refresh.rotation_timeout", self.refresh.rotation_timeout),
            ("refresh.max_backoff", self.refresh.max_backoff),
            ("refresh.rejected_backoff", self.refresh.rejected_backoff),
        ] {
            duration_within(key, d, MAX_TIMEOUT, &mut bad);
        }

        // Compared only once token_timeout is itself sane: one bad key, one line.
        if self.refresh.token_timeout <= MAX_TIMEOUT
            && self.refresh.rotation_timeout < self.refresh.token_timeout
        {
            bad(
                "refresh.rotation_timeout",
                "must be at least refresh.token_timeout: a rotation may take longer, never shorter"
                    .into(),
            );
        }
        let lifetime = self.refresh.min_token_lifetime;
        if !(Duration::from_secs(1)..=Duration::from_secs(900)).contains(&lifetime) {
            bad(
                "refresh.min_token_lifetime",
                "must be between 1s and 15m (Criteo's tokens live 15 minutes)".into(),
            );
        }

        let f = self.refresh.at_fraction;
        if !(f > 0.0 && f < 1.0) {
            bad(
                "refresh.at_fraction",
                format!("{f} must be between 0 and 1 (exclusive), e.g. 0.8"),
            );
        }

        let consent = match self.consent {
            None => None,
            Some(c) => {
                let secret = secret_pair(
                    "consent.signing_secret",
                    c.signing_secret,
                    c.signing_secret_file,
                    &mut bad,
                );
                match (c.signing_key.filter(|k| !k.trim().is_empty()), secret) {
                    (Some(signing_key), Some(signing_secret)) => Some(ConsentConfig {
                        signing_key,
                        signing_secret,
                    }),
                    (None, Some(_)) => {
                        bad("consent.signing_key", "is missing".into());
                        None
                    }
                    (Some(_), None) => {
                        bad(
                            "consent.signing_secret",
                            "is missing (set signing_secret or signing_secret_file)".into(),
                        );
                        None
                    }
                    (None, None) => None,
                }
            }
        };

        if self.tenants.is_empty() {
            bad(
                "tenants",
                "no tenant is configured; add a [tenants.NAME] section".into(),
            );
        }
        let mut tenants = Vec::with_capacity(self.tenants.len());
        let mut refresh_tenants = Vec::new();
        for (name, t) in self.tenants {
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
                &mut bad,
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
                        (inline, file) => {
                            secret_pair(&key("refresh_token"), inline, file, &mut bad)
                        }
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

        if !refresh_tenants.is_empty() {
            match &self.store.path {
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

        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(Config {
            server: ServerConfig {
                listen: self.server.listen,
                admin_listen: self.server.admin_listen,
                tenant_header,
                default_tenant: self.server.default_tenant,
                max_replay_body,
                shutdown_grace: self.server.shutdown_grace,
                allowed_clients: self.server.allowed_clients,
                workers: self.server.workers,
                max_connections: self.server.max_connections,
                max_header_bytes,
                header_read_timeout: self.server.header_read_timeout,
                admin_token,
                idle_timeout: self.server.idle_timeout,
                body_read_timeout: self.server.body_read_timeout,
                admin_max_connections: self.server.admin_max_connections,
                replay_budget,
            },
            upstream: UpstreamConfig {
                url: upstream_url.expect("checked above"),
                token_url: token_url.expect("checked above"),
                consent_url: consent_url.expect("checked above"),
                connect_timeout: self.upstream.connect_timeout,
                timeout: self.upstream.timeout,
                max_connections: self.upstream.max_connections,
                extra_roots,
            },
            refresh: RefreshConfig {
                at_fraction: f,
                wait_timeout: self.refresh.wait_timeout,
                token_timeout: self.refresh.token_timeout,
                rotation_timeout: self.refresh.rotation_timeout,
                min_token_lifetime: self.refresh.min_token_lifetime,
                max_backoff: self.refresh.max_backoff,
                rejected_backoff: self.refresh.rejected_backoff,
                lazy: self.refresh.lazy,
            },
            store: StoreConfig {
                path: self.store.path,
            },
            consent,
            tenants,
        })
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    const MINIMAL: &str = r#"
        [tenants.main]
        grant = "client_credentials"
        client_id = "id"
        client_secret = "s3cret"
    "#;

    #[test]
    fn defaults_follow_the_design() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.server.tenant_header.as_str(), "x-criteo-tenant");
        assert_eq!(c.server.max_replay_body, 1024 * 1024);
        assert_eq!(c.server.shutdown_grace, Duration::from_secs(20));
        assert_eq!(c.refresh.at_fraction, 0.8);
        assert_eq!(c.refresh.rotation_timeout, Duration::from_secs(120));
        assert_eq!(c.refresh.min_token_lifetime, Duration::from_secs(10));
        assert_eq!(c.upstream.url.as_str(), "https://api.criteo.com/");
    }

    #[test]
    fn environment_overrides_the_file_with_double_underscore_nesting() {
        Jail::expect_with(|jail| {
            jail.create_file("proxy.toml", MINIMAL)?;
            jail.set_env("CRITEO_PROXY_SERVER__LISTEN", "127.0.0.1:18080");
            jail.set_env("CRITEO_PROXY_TENANTS__MAIN__CLIENT_ID", "12345");
            jail.set_env("CRITEO_PROXY_SERVER__MAX_REPLAY_BODY", "2MiB");
            let c = Config::load(Some(Path::new("proxy.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.server.listen.to_string(), "127.0.0.1:18080");
            assert_eq!(c.tenants[0].client_id, "12345");
            assert_eq!(c.server.max_replay_body, 2 * 1024 * 1024);
            Ok(())
        });
    }

    #[test]
    fn secret_files_are_trimmed_and_must_not_be_empty() {
        Jail::expect_with(|jail| {
            jail.create_file("secret", "  s3cret\n")?;
            jail.create_file("empty", " \n")?;
            let ok = Config::from_toml(
                "[tenants.a]\ngrant = \"client_credentials\"\nclient_id = \"x\"\nclient_secret_file = \"secret\"\n",
            )
            .map_err(|e| e.to_string())?;
            let s = ok.tenants[0].client_secret.load().unwrap();
            assert_eq!(s.expose_secret(), "s3cret");
            let err = Config::from_toml(
                "[tenants.a]\ngrant = \"client_credentials\"\nclient_id = \"x\"\nclient_secret_file = \"empty\"\n",
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("tenants.a.client_secret_file"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn every_bad_key_is_named() {
        let err = Config::from_toml(
            r#"
            [server]
            default_tenant = "nobody"
            [refresh]
            at_fraction = 1.5
            token_timeout = "30s"
            rotation_timeout = "10s"
            min_token_lifetime = "0s"
            [tenants.a]
            grant = "client_credentials"
            [tenants.b]
            grant = "client_credentials"
            client_id = "x"
            "#,
        )
        .unwrap_err()
        .to_string();
        for key in [
            "server.default_tenant",
            "refresh.at_fraction",
            "refresh.rotation_timeout",
            "refresh.min_token_lifetime",
            "tenants.a.client_id",
            "tenants.a.client_secret",
            "tenants.b.client_secret",
        ] {
            assert!(err.contains(key), "{key} missing from {err}");
        }
    }

    #[test]
    fn unknown_grant_and_unknown_keys_are_rejected_by_name() {
        let err = Config::from_toml("[tenants.a]\ngrant = \"password\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tenants.a.grant"), "{err}");
        let err = Config::from_toml(&format!("{MINIMAL}\n[server]\nlisten_addr = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn values_that_would_crash_later_are_refused_by_name() {
        let huge = "300000000000years";
        let cases = [
            (
                "server",
                "max_connections = 2305843009213693952",
                "server.max_connections",
            ),
            (
                "server",
                "max_connections = 1000001",
                "server.max_connections",
            ),
            (
                "server",
                "max_replay_body = \"1EiB\"",
                "server.max_replay_body",
            ),
            (
                "server",
                "max_header_bytes = \"2MiB\"",
                "server.max_header_bytes",
            ),
            ("server", "shutdown_grace = \"2h\"", "server.shutdown_grace"),
            (
                "server",
                &format!("header_read_timeout = \"{huge}\""),
                "server.header_read_timeout",
            ),
            (
                "upstream",
                &format!("connect_timeout = \"{huge}\""),
                "upstream.connect_timeout",
            ),
            ("upstream", "timeout = \"25h\"", "upstream.timeout"),
            (
                "refresh",
                &format!("wait_timeout = \"{huge}\""),
                "refresh.wait_timeout",
            ),
            (
                "refresh",
                &format!("token_timeout = \"{huge}\""),
                "refresh.token_timeout",
            ),
            (
                "refresh",
                &format!("rotation_timeout = \"{huge}\""),
                "refresh.rotation_timeout",
            ),
            (
                "refresh",
                &format!("max_backoff = \"{huge}\""),
                "refresh.max_backoff",
            ),
            (
                "refresh",
                &format!("rejected_backoff = \"{huge}\""),
                "refresh.rejected_backoff",
            ),
        ];
        for (section, line, key) in cases {
            let err = Config::from_toml(&format!("{MINIMAL}\n[{section}]\n{line}\n"))
                .unwrap_err()
                .problems;
            assert_eq!(err.len(), 1, "{line}: {err:?}");
            assert!(err[0].starts_with(&format!("{key}: ")), "{line}: {err:?}");
        }
        // The bounds themselves are accepted.
        let ok = Config::from_toml(&format!(
            "{MINIMAL}\n[server]\nmax_connections = 1000000\nshutdown_grace = \"1h\"\n\
             max_replay_body = \"64MiB\"\nmax_header_bytes = \"1MiB\"\n\
             [refresh]\nrejected_backoff = \"1day\"\n"
        ));
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn plain_http_to_another_host_is_warned_about() {
        let warns = |url: &str| is_plain_http_to_another_host(&Url::parse(url).unwrap());
        for url in [
            "http://api.criteo.com",
            "http://10.0.0.1:8080",
            "http://[2001:db8::1]/",
            "http://localhost.example.com/",
        ] {
            assert!(warns(url), "{url}");
        }
        for url in [
            "https://api.criteo.com",
            "http://127.0.0.1:1",
            "http://127.0.0.2/",
            "http://[::1]:1/",
            "http://[::ffff:127.0.0.1]/",
            "http://localhost:9000/",
            "http://LOCALHOST./",
            "http://criteo.localhost/",
        ] {
            assert!(!warns(url), "{url}");
        }
        let c = Config::from_toml(&format!(
            "{MINIMAL}\n[upstream]\nurl = \"http://criteo.example\"\ntoken_url = \"http://127.0.0.1:1/t\"\n"
        ))
        .unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("upstream.url is plain http:// to criteo.example"),
            "{w:?}"
        );
    }

    #[test]
    fn the_admin_token_is_a_secret_inline_or_in_a_file() {
        Jail::expect_with(|jail| {
            jail.create_file("admin", "admin-token-from-a-file\n")?;
            let c = Config::from_toml(&format!(
                "{MINIMAL}\n[server]\nadmin_token_file = \"admin\"\n"
            ))
            .map_err(|e| e.to_string())?;
            let token = c.server.admin_token.as_ref().unwrap().load().unwrap();
            assert_eq!(token.expose_secret(), "admin-token-from-a-file");
            let c = Config::from_toml(&format!(
                "{MINIMAL}\n[server]\nadmin_token = \"inline-admin-token\"\n"
            ))
            .map_err(|e| e.to_string())?;
            assert!(!format!("{c:?}").contains("inline-admin-token"));
            let shown = c.redacted_toml().unwrap();
            assert!(shown.contains("admin_token = \"<redacted>\""), "{shown}");
            assert!(!shown.contains("inline-admin-token"));
            for (line, key) in [
                (
                    "admin_token = \"x\"\nadmin_token_file = \"admin\"",
                    "server.admin_token",
                ),
                ("admin_token = \"with space\"", "server.admin_token"),
                ("admin_token = \"  \"", "server.admin_token"),
                (
                    "admin_token_file = \"/dev/zero\"",
                    "server.admin_token_file",
                ),
            ] {
                let err = Config::from_toml(&format!("{MINIMAL}\n[server]\n{line}\n"))
                    .unwrap_err()
                    .to_string();
                assert!(err.starts_with(&format!("{key}: ")), "{line}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn connection_limits_and_timers_are_checked_by_name() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.server.max_connections, 256);
        assert_eq!(c.server.admin_max_connections, 64);
        assert_eq!(c.server.replay_budget, 32 * 1024 * 1024);
        assert_eq!(c.upstream.max_connections, 128);
        let err = Config::from_toml(&format!(
            "{MINIMAL}\n[server]\nadmin_max_connections = 0\nidle_timeout = \"0s\"\nbody_read_timeout = \"400days\"\n[upstream]\nmax_connections = 2000000\n"
        ))
        .unwrap_err()
        .to_string();
        for key in [
            "server.admin_max_connections",
            "server.idle_timeout",
            "server.body_read_timeout",
            "upstream.max_connections",
        ] {
            assert!(err.contains(key), "{key} missing from {err}");
        }
    }

    #[test]
    fn debug_and_redacted_output_never_show_a_secret() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        let shown = c.redacted_toml().unwrap();
        assert!(!shown.contains("s3cret"));
        assert!(shown.contains("<redacted>"));
        // The effective config is itself a valid config.
        let again = Config::from_toml(&shown).unwrap();
        assert_eq!(again.tenants[0].client_id, "id");
    }
}
