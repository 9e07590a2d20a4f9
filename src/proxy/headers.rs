//! Header hygiene. Nothing the client meant for the proxy, nor any
//! connection-level header, crosses to the other side.

use crate::error::PROXY_ERROR_HEADER;
use http::header::{
    AUTHORIZATION, CONNECTION, EXPECT, HeaderMap, HeaderName, PROXY_AUTHENTICATE,
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

/// How many distinct names one pass of [`remove_where`] notes for removal:
/// more than a message usually carries (a request its `Host`, a response
/// from an HTTP/1.1 upstream its `Connection`).
const NOTED: usize = 4;

/// Removes every header `doomed` picks, and every header a `Connection`
/// header names. One pass over the headers (a message carries a handful),
/// then a hashed removal only for the names found; no allocation, unless
/// `Connection` names more than the usual `keep-alive` or `close`.
fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    let mut noted: [Option<HeaderName>; NOTED] = Default::default();
    let mut count = 0;
    let mut overflow = false;
    let mut listed = false;
    for (name, value) in headers.iter() {
        if name == CONNECTION && !plain(value.as_bytes()) {
            listed = true;
        }
        if !doomed(name) || noted[..count].iter().flatten().any(|n| n == name) {
            continue;
        }
        match noted.get_mut(count) {
            Some(slot) => {
                *slot = Some(name.clone());
                count += 1;
            }
            None => overflow = true,
        }
    }
    // Before `Connection` itself goes.
    if listed {
        remove_connection_listed(headers);
    }
    for name in noted.into_iter().flatten() {
        headers.remove(name);
    }
    if overflow {
        while let Some(name) = headers.keys().find(|n| doomed(n)).cloned() {
            headers.remove(&name);
        }
    }
}

/// A `Connection` value that names no header to remove.
fn plain(v: &[u8]) -> bool {
    v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close")
}

/// Headers named in `Connection` are hop-by-hop too. Parsing the list
/// allocates: only for a list that is not just `keep-alive` or `close`.
fn remove_connection_listed(headers: &mut HeaderMap) {
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
/// choice and hop-by-hop headers go. `Host` stays, for the upstream pool
/// to overwrite with the upstream's (or remove, over HTTP/2): cheaper than
/// removing it here and adding it back there.
pub(crate) fn sanitize_request(headers: &mut HeaderMap, tenant_header: &HeaderName) {
    remove_where(headers, |n| {
        is_hop_by_hop(n) || n == AUTHORIZATION || n == EXPECT || n == tenant_header
    });
}

/// Before a response goes back: hop-by-hop headers go, and so does the
/// marker of the proxy's own errors, so that an answer from upstream never
/// passes for one the proxy made.
pub(crate) fn sanitize_response(headers: &mut HeaderMap) {
    remove_where(headers, |n| is_hop_by_hop(n) || n == PROXY_ERROR_HEADER);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http::header::HOST;

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
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        // `Host` is the pool's to replace.
        assert_eq!(left, ["accept", "host"]);
    }

    #[test]
    fn more_kinds_of_hop_by_hop_headers_than_one_pass_notes_all_go() {
        let mut h = HeaderMap::new();
        for name in HOP_BY_HOP {
            h.append(name, HeaderValue::from_static("1"));
            h.append("x-kept", HeaderValue::from_static("1"));
        }
        sanitize_response(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
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
