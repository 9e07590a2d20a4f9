//! What the pool dials with: rustls over the web PKI roots (plus any
//! `upstream.ca_file`), and the `Host` value built once.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use http::uri::{Authority, Scheme};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use super::UpstreamError;
use crate::config::UpstreamConfig;

/// TCP (no Nagle, keep-alive, `upstream.connect_timeout`) under TLS that
/// offers HTTP/2 and HTTP/1.1 by ALPN; plain `http://` stays plain.
pub(super) fn connector(
    cfg: &UpstreamConfig,
) -> Result<HttpsConnector<HttpConnector>, UpstreamError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(cfg)?)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http))
}

/// The `Host` of HTTP/1.1 requests: the authority without a default port.
pub(super) fn host_header(
    scheme: &Scheme,
    authority: &Authority,
) -> Result<HeaderValue, UpstreamError> {
    let default_port = if *scheme == Scheme::HTTP { 80 } else { 443 };
    let host = match authority.port_u16() {
        Some(p) if p != default_port => format!("{}:{p}", authority.host()),
        _ => authority.host().to_owned(),
    };
    HeaderValue::try_from(host).map_err(|e| UpstreamError::BadUrl(e.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_leaves_out_the_default_port() {
        let h = |s: &str, a: &str| {
            host_header(&s.parse().unwrap(), &a.parse().unwrap())
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(h("https", "api.criteo.com:443"), "api.criteo.com");
        assert_eq!(h("https", "api.criteo.com"), "api.criteo.com");
        assert_eq!(h("http", "127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(h("http", "[::1]:80"), "[::1]");
    }
}
