//! Header hygiene. Nothing the client meant for the proxy, nor any
//! connection-level header, crosses to the other side.

use http::header::{
    AUTHORIZATION, CONNECTION, EXPECT, HOST, HeaderMap, HeaderName, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the unofficial ones.
const HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too. Collecting them
    // allocates, but only when a client sends such a list.
    if let Some(named) = headers.get(CONNECTION) {
        let extra: Vec<HeaderName> = named
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in extra {
            headers.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
    headers.remove(UPGRADE);
}

/// Before a request goes upstream: the client's credentials, the tenant
/// choice, `Host` (set from the upstream URL) and hop-by-hop headers go.
pub fn sanitize_request(headers: &mut HeaderMap, tenant_header: &HeaderName) {
    strip_hop_by_hop(headers);
    headers.remove(AUTHORIZATION);
    headers.remove(HOST);
    headers.remove(EXPECT);
    headers.remove(tenant_header);
}

/// Before a response goes back: only hop-by-hop headers go.
pub fn sanitize_response(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn credentials_tenant_and_hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer client"));
        h.insert(HOST, HeaderValue::from_static("127.0.0.1:8080"));
        h.insert("x-criteo-tenant", HeaderValue::from_static("main"));
        h.insert(
            CONNECTION,
            HeaderValue::from_static("keep-alive, X-Private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(PROXY_AUTHORIZATION, HeaderValue::from_static("Basic x"));
        h.insert("accept", HeaderValue::from_static("application/json"));
        sanitize_request(&mut h, &HeaderName::from_static("x-criteo-tenant"));
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept"]);
    }
}
