//! `store.url`: a `postgres://` URL read into a connection configuration
//! and a TLS mode, and shown with its password redacted.
//!
//! The URL holds a password, so it is parsed here rather than handed to
//! `tokio_postgres::Config::from_str` (whose errors may quote a character
//! of it): every error names a part of the URL, never its content.
//!
//! `sslmode` follows libpq's meanings where rustls allows:
//! - `disable`: plain TCP;
//! - `prefer` (the default, as in libpq): TLS if the server offers it,
//!   with `require`'s checks, else plain;
//! - `require`: TLS, and the certificate is not checked (as libpq does) unless
//!   `sslrootcert` names a file of trusted roots: then it is checked against
//!   them (host name included);
//! - `verify-ca` and `verify-full`: TLS, the certificate checked against
//!   the web PKI roots plus `sslrootcert`'s, host name included (rustls
//!   always checks the name, so `verify-ca` is as strict as `verify-full`).

use std::path::PathBuf;
use std::time::Duration;

use url::Url;

/// How the connection is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TlsMode {
    Disable,
    /// TLS if offered; `verify` as in `Require`.
    Prefer {
        verify: bool,
    },
    /// TLS; the certificate checked only when `verify`.
    Require {
        verify: bool,
    },
}

/// A parsed `store.url`.
#[derive(Clone)]
pub(crate) struct PgUrl {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) tls: TlsMode,
    /// `sslrootcert`: PEM roots trusted besides the web PKI's.
    pub(crate) root_cert: Option<PathBuf>,
    /// host:port/database, for messages.
    pub(crate) place: String,
}

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgUrl")
            .field("place", &self.place)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Bound on connecting (TCP, TLS, authentication), unless the URL's
/// `connect_timeout` says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses `text`; an error says what is wrong without quoting the URL.
pub(crate) fn parse(text: &str) -> Result<PgUrl, String> {
    let url = Url::parse(text.trim()).map_err(|e| format!("is not a URL ({e})"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err("must be a postgres:// or postgresql:// URL".into());
    }
    let mut config = tokio_postgres::Config::new();
    config
        .application_name("criteo-token-proxy")
        .connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    let decode = |part: &str, what: &str| {
        percent_decode(part).ok_or_else(|| format!("the {what} is not valid percent-encoded UTF-8"))
    };
    let host = url.host_str().unwrap_or_default();
    if !host.is_empty() {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        config.host(host);
    }
    if let Some(port) = url.port() {
        config.port(port);
    }
    if !url.username().is_empty() {
        config.user(decode(url.username(), "user name")?);
    }
    if let Some(password) = url.password() {
        config.password(decode(password, "password")?);
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() {
        config.dbname(decode(db, "database name")?);
    }
    let (mut mode, mut root_cert) = ("prefer".to_owned(), None);
    for (key, value) in url.query_pairs() {
        match &*key {
            "sslmode" => mode = value.into_owned(),
            "sslrootcert" => root_cert = Some(PathBuf::from(&*value)),
            // A folder holding the server's Unix socket.
            "host" => {
                config.host(&*value);
            }
            "port" => {
                let port = value.parse().map_err(|_| "the port is not a number")?;
                config.port(port);
            }
            "user" => {
                config.user(&*value);
            }
            "dbname" => {
                config.dbname(&*value);
            }
            "connect_timeout" => {
                let secs: u64 = value
                    .parse()
                    .ok()
                    .filter(|s| (1..=300).contains(s))
                    .ok_or("connect_timeout must be a number of seconds between 1 and 300")?;
                config.connect_timeout(Duration::from_secs(secs));
            }
            "application_name" => {}
            other => {
                return Err(format!(
                    "has a parameter this proxy does not know: {other:?}"
                ));
            }
        }
    }
    let verify_roots = root_cert.is_some();
    let tls = match &*mode {
        "disable" => TlsMode::Disable,
        "prefer" => TlsMode::Prefer {
            verify: verify_roots,
        },
        "require" => TlsMode::Require {
            verify: verify_roots,
        },
        "verify-ca" | "verify-full" => TlsMode::Require { verify: true },
        _ => {
            return Err(
                "sslmode must be disable, prefer, require, verify-ca or verify-full".to_owned(),
            );
        }
    };
    config.ssl_mode(match tls {
        TlsMode::Disable => tokio_postgres::config::SslMode::Disable,
        TlsMode::Prefer { .. } => tokio_postgres::config::SslMode::Prefer,
        TlsMode::Require { .. } => tokio_postgres::config::SslMode::Require,
    });
    if config.get_hosts().is_empty() {
        return Err("names no host (postgres://user@host:5432/database)".into());
    }
    let place = place(&config);
    Ok(PgUrl {
        config,
        tls,
        root_cert,
        place,
    })
}

/// host:port/database.
fn place(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => String::new(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or_default();
    format!("{host}:{port}/{db}")
}

/// `text` with its password replaced by `<redacted>`, for `check-config`
/// and messages. Something that is not a URL shows as `<redacted>` whole:
/// where the password would be cannot be told.
pub(crate) fn redact(text: &str) -> String {
    let Ok(url) = Url::parse(text.trim()) else {
        return crate::config::REDACTED.to_owned();
    };
    if url.query_pairs().any(|(k, _)| k == "password") {
        return crate::config::REDACTED.to_owned();
    }
    if url.password().is_none() {
        return url.to_string();
    }
    let shown = url.to_string();
    // user:password@ → user:<redacted>@, built by hand: `Url` would
    // percent-encode the brackets.
    let scheme_end = url.scheme().len() + 3;
    match shown[scheme_end..].find('@') {
        Some(at) => {
            let user = url.username();
            format!(
                "{}{user}:{}{}",
                &shown[..scheme_end],
                crate::config::REDACTED,
                &shown[scheme_end + at..]
            )
        }
        None => crate::config::REDACTED.to_owned(),
    }
}

/// RFC 3986 percent-decoding into UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_read_with_its_tls_mode_and_shown_without_its_password() {
        let u =
            parse("postgres://proxy:s%40cret@db.internal:5433/criteo?sslmode=verify-full").unwrap();
        assert_eq!(u.tls, TlsMode::Require { verify: true });
        assert_eq!(u.place, "db.internal:5433/criteo");
        assert_eq!(u.config.get_password(), Some(&b"s@cret"[..]));
        assert_eq!(u.config.get_user(), Some("proxy"));
        let shown = redact("postgres://proxy:s%40cret@db.internal:5433/criteo?sslmode=require");
        assert_eq!(
            shown,
            "postgres://proxy:<redacted>@db.internal:5433/criteo?sslmode=require"
        );
        assert_eq!(
            parse("postgres://p@h/d").unwrap().tls,
            TlsMode::Prefer { verify: false }
        );
        let root = parse("postgres://p@h/d?sslmode=require&sslrootcert=/ca.pem").unwrap();
        assert_eq!(root.tls, TlsMode::Require { verify: true });
    }

    #[test]
    fn a_bad_url_is_refused_without_quoting_the_password() {
        for bad in [
            "mysql://u:hunter2@h/d",
            "postgres://u:hunter2@h/d?sslmode=bogus",
            "postgres://u:hunter2@h/d?bogus=1",
            "postgres://u@h/d?password=hunter2",
            "postgres://u:hunter2@/d",
            "postgres://u:hunter2@h:99999/d",
            "hunter2",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(!err.contains("hunter2"), "{bad}: {err}");
            assert!(!redact(bad).contains("hunter2"), "{bad}");
        }
    }
}
