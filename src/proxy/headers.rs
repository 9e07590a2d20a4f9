//! Header hygiene. Nothing the client meant for the proxy, nor any
//! connection-level header, crosses to the other side.

use crate::error::PROXY_ERROR_HEADER;
use http::header::{
    AUTHORIZATION, CONNECTION, EXPECT, HOST, HeaderMap, HeaderName, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the unofficial ones.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Removes every header `doomed` picks. One pass over the names present
/// (a request carries a handful) instead of a hashed removal for each
/// name that might be there; no allocation.
fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    while let Some(name) = headers.keys().find(|n| doomed(n)).cloned() {
        headers.remove(&name);
    }
}

/// Headers named in `Connection` are hop-by-hop too. The usual values,
/// `keep-alive` and `close`, name nothing else to remove; any other list
/// is parsed, which allocates.
fn remove_connection_listed(headers: &mut HeaderMap) {
    if !headers.contains_key(CONNECTION) {
        return;
    }
    let plain =
        |v: &[u8]| v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close");
    if headers
        .get_all(CONNECTION)
        .iter()
        .all(|v| plain(v.as_bytes()))
    {
        return;
    }
    let extra: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in extra {
        headers.remove(n);
    }
}

/// Before a request goes upstream: the client's credentials, the tenant
/// choice, `Host` (set from the upstream URL) and hop-by-hop headers go.
pub(crate) fn sanitize_request(headers: &mut HeaderMap, tenant_header: &HeaderName) {
    remove_connection_listed(headers);
    remove_where(headers, |n| {
        is_hop_by_hop(n) || n == AUTHORIZATION || n == HOST || n == EXPECT || n == tenant_header
    });
}

/// Before a response goes back: hop-by-hop headers go, and so does the
/// marker of the proxy's own errors, so that an answer from upstream never
/// passes for one the proxy made.
pub(crate) fn sanitize_response(headers: &mut HeaderMap) {
    remove_connection_listed(headers);
    remove_where(headers, |n| is_hop_by_hop(n) || n == PROXY_ERROR_HEADER);
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

    #[test]
    fn headers_named_in_any_connection_header_go() {
        let mut h = HeaderMap::new();
        h.append(CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.append(CONNECTION, HeaderValue::from_static("x-a, X-B"));
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("1"));
        h.insert("x-c", HeaderValue::from_static("1"));
        sanitize_response(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-c"]);
    }

    #[test]
    fn an_upstream_proxy_error_marker_goes() {
        let mut h = HeaderMap::new();
        h.insert(
            PROXY_ERROR_HEADER,
            HeaderValue::from_static("upstream_timeout"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        sanitize_response(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn every_value_of_a_repeated_hop_by_hop_header_goes() {
        let mut h = HeaderMap::new();
        h.append(TE, HeaderValue::from_static("trailers"));
        h.append(TE, HeaderValue::from_static("gzip"));
        h.append(UPGRADE, HeaderValue::from_static("h2c"));
        h.append("x-kept", HeaderValue::from_static("1"));
        sanitize_response(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }
}
