//! The pooled client to the Criteo API: hyper-util's legacy client over
//! rustls, speaking HTTP/1.1 or HTTP/2 as ALPN decides (plain `http://`
//! upstreams, used by tests and local stand-ins, speak HTTP/1.1).

use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;
use crate::proxy::OutBody;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream.url: {0}")]
    BadUrl(String),
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Where requests go, and the pool that takes them there.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, OutBody>,
    scheme: Scheme,
    authority: Authority,
    /// A path prefix of `upstream.url` without its trailing slash, if any.
    base_path: Option<Arc<str>>,
    timeout: Duration,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, UpstreamError> {
        let uri: Uri = cfg
            .url
            .as_str()
            .parse()
            .map_err(|e: http::uri::InvalidUri| UpstreamError::BadUrl(e.to_string()))?;
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTPS);
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| UpstreamError::BadUrl("has no host".into()))?;
        let base_path = match uri.path().trim_end_matches('/') {
            "" => None,
            p => Some(Arc::from(p)),
        };

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(cfg)?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Ok(Self {
            client,
            scheme,
            authority,
            base_path,
            timeout: cfg.timeout,
        })
    }

    pub fn client(&self) -> &Client<HttpsConnector<HttpConnector>, OutBody> {
        &self.client
    }

    /// Bound on the wait for the upstream's response headers.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The upstream URI for a request's path and query. Without a base
    /// path this copies nothing but refcounts.
    pub fn uri_for(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let builder = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone());
        match (&self.base_path, pq) {
            (None, Some(pq)) => builder.path_and_query(pq.clone()).build(),
            (None, None) => builder.path_and_query("/").build(),
            (Some(base), pq) => {
                let rest = pq.map_or("/", |p| p.as_str());
                builder.path_and_query(format!("{base}{rest}")).build()
            }
        }
    }
}

/// rustls with the ring provider, the web PKI roots and any
/// `upstream.ca_file` roots. ALPN is set by the connector builder.
fn tls_config(cfg: &UpstreamConfig) -> Result<rustls::ClientConfig, UpstreamError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(extra) = &cfg.extra_roots {
        for cert in &extra.certs {
            roots.add(cert.clone())?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
