//! The request path, end to end: the real server in-process against the
//! Criteo stand-in.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{FakeCriteo, TestProxy, client};

async fn json(resp: reqwest::Response) -> Value {
    resp.json().await.unwrap()
}

#[tokio::test]
async fn forwards_method_path_query_headers_and_body_unchanged() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;

    let resp = client()
        .post(format!(
            "{}/2024-10/advertisers/me?limit=5&q=a%20b&status=201",
            proxy.url
        ))
        .header("content-type", "application/json")
        .header("x-request-id", "abc-123")
        .body(r#"{"name":"ad"}"#)
        .send()
        .await
        .unwrap();

    assert_eq!(resp.status(), 201, "Criteo's status comes back unchanged");
    assert_eq!(resp.headers()["x-fake-criteo"], "echo");
    assert_eq!(resp.headers()["x-ratelimit-remaining"], "249");
    let echo = json(resp).await;
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/2024-10/advertisers/me");
    assert_eq!(echo["query"], "limit=5&q=a%20b&status=201");
    assert_eq!(echo["body"], r#"{"name":"ad"}"#);
    assert_eq!(echo["headers"]["content-type"], "application/json");
    assert_eq!(echo["headers"]["x-request-id"], "abc-123");
    let auth = echo["headers"]["authorization"].as_str().unwrap();
    assert!(auth.starts_with("Bearer fake-access-1-"), "{auth}");

    for method in ["GET", "PUT", "PATCH", "DELETE"] {
        let resp = client()
            .request(method.parse().unwrap(), format!("{}/2024-10/x", proxy.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(json(resp).await["method"], method);
    }
}

#[tokio::test]
async fn the_token_endpoint_gets_a_form_with_its_content_type() {
    let fake = FakeCriteo::start().await;
    let _proxy = TestProxy::ready(&fake).await;
    // The stand-in refuses a token request without the form Content-Type,
    // so being ready proves it was sent; the form itself:
    let form = &fake.token_forms()[0];
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_id"], "main-id");
    assert_eq!(form["client_secret"], "main-secret");
}

#[tokio::test]
async fn streams_a_large_response_without_buffering_it() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    let total = 8 << 20;

    // `/gated` sends its first chunk, then holds the rest until released:
    // the client can only see that chunk if the proxy streams.
    let mut resp = proxy.get(&format!("/gated?bytes={total}")).await;
    assert_eq!(resp.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
        .await
        .expect("the first chunk arrives before the upstream finished")
        .unwrap()
        .unwrap();
    assert!(!first.is_empty());
    fake.release();
    let mut got = first.len();
    let mut ok = first
        .iter()
        .enumerate()
        .all(|(i, b)| *b == support::fake_criteo::pattern_byte(i));
    while let Some(chunk) = resp.chunk().await.unwrap() {
        ok &= chunk
            .iter()
            .enumerate()
            .all(|(i, b)| *b == support::fake_criteo::pattern_byte(got + i));
        got += chunk.len();
    }
    assert_eq!(got, total);
    assert!(ok, "the body arrives byte for byte");
}

#[tokio::test]
async fn the_tenant_comes_from_the_header_or_the_default() {
    let fake = FakeCriteo::builder()
        .client("acme-id", "acme-secret")
        .start()
        .await;
    let proxy = TestProxy::builder(&fake)
        .tenant(
            "acme",
            "grant = \"client_credentials\"\nclient_id = \"acme-id\"\nclient_secret = \"acme-secret\"",
        )
        .start()
        .await;
    proxy.wait_ready().await;
    let forms = fake.token_forms();
    assert_eq!(forms.len(), 2, "one token per tenant");

    let who = |resp: Value| -> String {
        resp["headers"]["authorization"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let acme = who(json(proxy.get_as("acme", "/x").await).await);
    let main = who(json(proxy.get("/x").await).await);
    assert_ne!(acme, main, "each tenant has its own token");
    let main_again = who(json(
        client()
            .get(format!("{}/x", proxy.url))
            .header("x-criteo-tenant", "main")
            .send()
            .await
            .unwrap(),
    )
    .await);
    assert_eq!(main, main_again);
}

#[tokio::test]
async fn an_unknown_tenant_gets_a_400_and_nothing_is_forwarded() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    let resp = proxy.get_as("nobody", "/2024-10/advertisers/me").await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["x-criteo-proxy-error"], "unknown_tenant");
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body = json(resp).await;
    assert_eq!(body["error"], "unknown_tenant");
    assert_eq!(body["tenant"], "nobody");
    assert!(body["message"].as_str().unwrap().contains("nobody"));
    assert!(fake.seen().is_empty(), "nothing reached the API");
}

#[tokio::test]
async fn without_a_default_tenant_the_header_is_required() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .without_main()
        .tenant(
            "solo",
            "grant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret = \"main-secret\"",
        )
        .start()
        .await;
    proxy.wait_ready().await;
    let resp = proxy.get("/x").await;
    assert_eq!(resp.status(), 400);
    let body = json(resp).await;
    let msg = body["message"].as_str().unwrap().to_ascii_lowercase();
    assert!(msg.contains("x-criteo-tenant"), "{body}");
    assert!(fake.seen().is_empty());
}

#[tokio::test]
async fn renews_tokens_before_they_expire() {
    // Two-second tokens: renewed around 1.6 s, used until 1.8 s.
    let fake = FakeCriteo::builder()
        .expires_in(Duration::from_secs(2))
        .start()
        .await;
    let proxy = TestProxy::ready(&fake).await;

    let url = format!("{}/x", proxy.url);
    let load = tokio::spawn(async move {
        let c = client();
        let mut statuses = Vec::new();
        for _ in 0..120 {
            statuses.push(c.get(&url).send().await.unwrap().status().as_u16());
            tokio::time::sleep(Duration::from_millis(25)).await; // pacing, not synchronisation
        }
        statuses
    });
    fake.wait_token_requests(3, Duration::from_secs(10)).await;
    let statuses = load.await.unwrap();

    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(fake.late_renewals(), 0, "every renewal came before expiry");
    assert_eq!(
        fake.expired_presented(),
        0,
        "no request carried an expired token"
    );
    let tokens: std::collections::HashSet<String> = fake
        .seen()
        .iter()
        .map(|s| s.headers["authorization"].clone())
        .collect();
    assert!(tokens.len() >= 2, "requests moved on to renewed tokens");
}

#[tokio::test]
async fn sixty_four_waiting_requests_cause_one_token_request() {
    let fake = FakeCriteo::builder()
        .token_delay(Duration::from_millis(300))
        .start()
        .await;
    let proxy = TestProxy::builder(&fake).start().await; // not waiting: cold cache

    let mut tasks = Vec::new();
    for i in 0..64 {
        let url = format!("{}/x?i={i}", proxy.url);
        tasks.push(tokio::spawn(async move {
            client().get(url).send().await.unwrap().status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(fake.token_requests(), 1, "single flight");
    assert_eq!(fake.seen().len(), 64);
}

#[tokio::test]
async fn replays_once_on_401_with_a_fresh_token_and_the_same_body() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    fake.revoke_all_tokens();

    let resp = client()
        .post(format!("{}/2024-10/campaigns", proxy.url))
        .header("x-trace", "kept for the replay")
        .header("accept", "application/json")
        .body("payload that must survive the replay")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo = json(resp).await;
    assert_eq!(echo["body"], "payload that must survive the replay");

    let seen = fake.seen_path("/2024-10/campaigns");
    assert_eq!(seen.len(), 2, "one attempt, one replay");
    assert_eq!(seen[0].status, 401);
    assert_eq!(seen[1].status, 200);
    assert_ne!(
        seen[0].headers["authorization"],
        seen[1].headers["authorization"]
    );
    let without_token = |s: &support::fake_criteo::Seen| {
        let mut h = s.headers.clone();
        h.remove("authorization");
        h
    };
    assert_eq!(without_token(&seen[1]), without_token(&seen[0]));
    assert_eq!(seen[1].headers["x-trace"], "kept for the replay");
    assert_eq!(seen[1].headers["host"], fake.addr().to_string());
    assert_eq!(seen[1].body, seen[0].body);
    assert_eq!(fake.token_requests(), 2);
    assert!(
        proxy
            .metrics()
            .await
            .contains("criteo_proxy_upstream_retries_total{tenant=\"main\"} 1")
    );
}

#[tokio::test]
async fn a_persistent_401_is_replayed_exactly_once_and_returned_unchanged() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    let resp = proxy.get("/always-401").await;
    assert_eq!(resp.status(), 401);
    assert!(
        resp.headers().get("x-criteo-proxy-error").is_none(),
        "Criteo's own answer"
    );
    let body = json(resp).await;
    assert_eq!(body["errors"][0]["code"], "authorization-token-invalid");
    assert_eq!(fake.seen_path("/always-401").len(), 2);
    assert_eq!(fake.token_requests(), 2);
}

#[tokio::test]
async fn concurrent_401s_share_one_token_refresh() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    fake.revoke_all_tokens();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let url = format!("{}/x?i={i}", proxy.url);
        tasks.push(tokio::spawn(async move {
            client()
                .post(url)
                .body("b")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(fake.token_requests(), 2, "one startup token, one refresh");
}

#[tokio::test]
async fn a_403_is_passed_through_and_never_retried() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    let resp = proxy.get("/forbidden").await;
    assert_eq!(resp.status(), 403);
    assert!(resp.headers().get("x-criteo-proxy-error").is_none());
    assert_eq!(fake.seen_path("/forbidden").len(), 1);
    assert_eq!(fake.token_requests(), 1);
}

#[tokio::test]
async fn a_body_over_the_replay_limit_streams_and_is_not_replayed() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .server("max_replay_body = \"64KiB\"")
        .start()
        .await;
    proxy.wait_ready().await;
    let big = vec![b'z'; 200 * 1024];

    let resp = client()
        .post(format!("{}/upload", proxy.url))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await["body_len"], 200 * 1024);

    fake.revoke_all_tokens();
    let resp = client()
        .post(format!("{}/upload", proxy.url))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        401,
        "too large to replay: Criteo's 401 comes back"
    );
    assert_eq!(fake.seen_path("/upload").len(), 2);
}

#[tokio::test]
async fn a_chunked_body_within_the_limit_is_replayed_too() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    fake.revoke_all_tokens();
    let chunks: Vec<Result<&'static str, std::io::Error>> = vec![Ok("part one, "), Ok("part two")];
    let body = reqwest::Body::wrap_stream(futures_stream(chunks));
    let resp = client()
        .post(format!("{}/chunked", proxy.url))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await["body"], "part one, part two");
}

fn futures_stream(
    items: Vec<Result<&'static str, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<&'static str, std::io::Error>> + Send + Sync + 'static
{
    struct Iter(std::vec::IntoIter<Result<&'static str, std::io::Error>>);
    impl futures_core::Stream for Iter {
        type Item = Result<&'static str, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Iter(items.into_iter())
}

#[tokio::test]
async fn token_endpoint_outage_answers_503_fast_and_recovers() {
    let fake = FakeCriteo::builder().outage().start().await;
    let proxy = TestProxy::builder(&fake)
        .refresh("wait_timeout = \"1s\"")
        .refresh("max_backoff = \"1s\"")
        .start()
        .await;

    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        client().get(format!("{}/x", proxy.url)).send(),
    )
    .await
    .expect("answered within the bounded wait")
    .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-criteo-proxy-error"], "token_unavailable");
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after));
    assert_eq!(json(resp).await["error"], "token_unavailable");
    assert!(fake.seen().is_empty(), "nothing forwarded without a token");

    let ready = client()
        .get(format!("{}/readyz", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);

    fake.set_outage(false);
    proxy.wait_ready().await;
    let resp = proxy.get("/x").await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn rejected_credentials_are_reported_and_not_hammered() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .without_main()
        .server("default_tenant = \"bad\"")
        .tenant(
            "bad",
            "grant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret = \"wrong\"",
        )
        .start()
        .await;
    fake.wait_token_requests(1, Duration::from_secs(10)).await;

    for _ in 0..20 {
        let resp = proxy.get("/x").await;
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["x-criteo-proxy-error"], "token_unavailable");
        let body = json(resp).await;
        assert!(
            body["message"].as_str().unwrap().contains("invalid_client"),
            "{body}"
        );
    }
    assert_eq!(
        fake.token_requests(),
        1,
        "the token endpoint is not hammered"
    );

    let tenants = json(
        client()
            .get(format!("{}/tenants", proxy.admin))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let bad = &tenants["tenants"][0];
    assert_eq!(bad["name"], "bad");
    assert_eq!(bad["state"], "credentials_rejected");
    assert!(
        bad["last_error"]
            .as_str()
            .unwrap()
            .contains("invalid_client")
    );

    let ready = client()
        .get(format!("{}/readyz", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let ready = json(ready).await;
    assert_eq!(ready["tenants"][0]["tenant"], "bad");
    assert_eq!(ready["tenants"][0]["state"], "credentials_rejected");
    assert!(
        proxy
            .metrics()
            .await
            .contains("criteo_proxy_token_refreshes_total{outcome=\"rejected\",tenant=\"bad\"} 1")
    );
}

#[tokio::test]
async fn client_credentials_headers_and_hop_by_hop_never_reach_criteo() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    let resp = client()
        .get(format!("{}/x", proxy.url))
        .header("authorization", "Bearer the-clients-own")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("x-criteo-tenant", "main")
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("x-kept", "yes")
        .send()
        .await
        .unwrap();
    let echo = json(resp).await;
    let h = &echo["headers"];
    for gone in [
        "proxy-authorization",
        "x-criteo-tenant",
        "x-hop",
        "keep-alive",
        "te",
    ] {
        assert!(h.get(gone).is_none(), "{gone} leaked: {h}");
    }
    assert_ne!(h["authorization"], "Bearer the-clients-own");
    assert!(
        h["authorization"]
            .as_str()
            .unwrap()
            .starts_with("Bearer fake-access-")
    );
    assert_eq!(h["host"], fake.addr().to_string(), "Host is the upstream's");
    assert_eq!(h["x-kept"], "yes");
}

#[tokio::test]
async fn an_upstream_that_accepts_and_never_handshakes_is_a_502_within_connect_timeout() {
    let fake = FakeCriteo::start().await;
    // The kernel accepts the TCP connection into the backlog; nothing ever
    // answers the TLS ClientHello.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let proxy = TestProxy::builder(&fake)
        .upstream_url(&format!("https://{addr}"))
        .upstream("connect_timeout = \"300ms\"")
        .upstream("timeout = \"60s\"")
        .start()
        .await;
    proxy.wait_ready().await;
    let resp = tokio::time::timeout(Duration::from_secs(20), proxy.get("/x"))
        .await
        .expect("the stalled handshake is bounded by upstream.connect_timeout");
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.headers()["x-criteo-proxy-error"],
        "upstream_unreachable"
    );
    drop(silent);
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_and_a_slow_one_a_504() {
    let fake = FakeCriteo::start().await;
    // Bound but never listening: connecting is refused, and the port stays
    // ours for the whole test (a freed port could be taken by another test).
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = reserved.local_addr().unwrap();
    let proxy = TestProxy::builder(&fake)
        .upstream_url(&format!("http://{closed}"))
        .start()
        .await;
    proxy.wait_ready().await;
    let resp = proxy.get("/x").await;
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.headers()["x-criteo-proxy-error"],
        "upstream_unreachable"
    );

    let proxy = TestProxy::builder(&fake)
        .upstream("timeout = \"300ms\"")
        .start()
        .await;
    proxy.wait_ready().await;
    let resp = proxy.get("/slow?ms=3000").await;
    assert_eq!(resp.status(), 504);
    assert_eq!(resp.headers()["x-criteo-proxy-error"], "upstream_timeout");
}

#[tokio::test]
async fn admin_endpoints_report_health_readiness_metrics_and_tenants() {
    let fake = FakeCriteo::builder()
        .token_delay(Duration::from_millis(500))
        .start()
        .await;
    let proxy = TestProxy::builder(&fake).start().await;
    let get = |path: &str| client().get(format!("{}{path}", proxy.admin)).send();

    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    fake.wait_token_requests(1, Duration::from_secs(5)).await;
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 503, "no token yet");
    assert_eq!(json(ready).await["tenants"][0]["tenant"], "main");

    proxy.wait_ready().await;
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    proxy.get("/x").await;

    let metrics = proxy.metrics().await;
    for name in [
        "criteo_proxy_requests_total{status=\"200\",tenant=\"main\"} 1",
        "criteo_proxy_request_duration_seconds_bucket{tenant=\"main\"",
        "criteo_proxy_token_refreshes_total{outcome=\"success\",tenant=\"main\"} 1",
        "criteo_proxy_token_expiry_seconds{tenant=\"main\"} 8",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }

    let text = get("/tenants").await.unwrap().text().await.unwrap();
    let tenants: Value = serde_json::from_str(&text).unwrap();
    let main = &tenants["tenants"][0];
    assert_eq!(main["name"], "main");
    assert_eq!(main["grant"], "client_credentials");
    assert_eq!(main["state"], "ready");
    assert!(main["expires_in_seconds"].as_u64().unwrap() > 800);
    assert!(main["last_refresh"].as_str().unwrap().ends_with('Z'));
    assert!(!text.contains("main-secret"));
    for token in fake.issued_tokens() {
        assert!(!text.contains(&token) && !metrics.contains(&token));
    }
    assert_eq!(get("/nope").await.unwrap().status(), 404);
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    let url = format!("{}/slow?ms=700", proxy.url);
    let slow = tokio::spawn(async move { client().get(url).send().await.unwrap().status() });
    fake.wait_api_arrivals(1, Duration::from_secs(5)).await;
    let proxy_url = proxy.url.clone();
    proxy.stop().await;
    assert_eq!(slow.await.unwrap(), 200, "the in-flight request completed");
    assert!(
        client().get(format!("{proxy_url}/x")).send().await.is_err(),
        "new connections are refused"
    );
}

#[tokio::test]
async fn clients_outside_allowed_clients_are_closed_at_accept_and_nothing_is_forwarded() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .server("allowed_clients = [\"192.0.2.0/24\", \"::1/128\"]")
        .start()
        .await;
    proxy.wait_ready().await;
    // Closed before any HTTP: no answer at all (it used to be a 403).
    let resp = client().get(format!("{}/x", proxy.url)).send().await;
    assert!(resp.is_err(), "{resp:?}");
    assert!(fake.seen().is_empty());
    assert!(proxy.metrics().await.contains(
        "criteo_proxy_connections_refused_total{listener=\"proxy\",reason=\"allowed_clients\"} 1"
    ));

    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .server("allowed_clients = [\"127.0.0.0/8\"]")
        .start()
        .await;
    proxy.wait_ready().await;
    let resp = proxy.get("/x").await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn speaks_tls_to_the_upstream_with_http2_by_alpn() {
    let fake = FakeCriteo::builder().tls().start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, fake.ca_pem().unwrap()).unwrap();
    let proxy = TestProxy::builder(&fake)
        .upstream(&format!("ca_file = \"{}\"", ca.display()))
        .start()
        .await;
    proxy.wait_ready().await;
    let resp = client()
        .post(format!("{}/2024-10/advertisers/me?x=1", proxy.url))
        .body("over tls")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo = json(resp).await;
    assert_eq!(echo["version"], "HTTP/2.0", "ALPN chose HTTP/2");
    assert_eq!(echo["body"], "over tls");
    assert_eq!(echo["query"], "x=1");

    // Without the extra root the certificate is not trusted: no token, so
    // nothing is forwarded.
    let untrusting = TestProxy::builder(&fake)
        .refresh("wait_timeout = \"1s\"")
        .start()
        .await;
    let resp = untrusting.get("/x").await;
    assert_eq!(resp.status(), 503);
}

#[tokio::test]
async fn concurrent_first_requests_share_one_http2_connection() {
    let fake = FakeCriteo::builder().tls().start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, fake.ca_pem().unwrap()).unwrap();
    let proxy = TestProxy::builder(&fake)
        .server("workers = 1")
        .upstream(&format!("ca_file = \"{}\"", ca.display()))
        .start()
        .await;
    proxy.wait_ready().await;

    // Every one arrives before the first TLS handshake ends: one dials,
    // the others wait for its connection instead of dialing their own.
    let requests = (0..64).map(|i| {
        let url = format!("{}/2024-10/advertisers/me?i={i}", proxy.url);
        tokio::spawn(async move { client().get(url).send().await.unwrap().status() })
    });
    for r in requests.collect::<Vec<_>>() {
        assert_eq!(r.await.unwrap(), 200);
    }
    let peers: std::collections::HashSet<_> = fake
        .seen_path("/2024-10/advertisers/me")
        .iter()
        .map(|s| s.peer)
        .collect();
    assert_eq!(peers.len(), 1, "connections opened: {peers:?}");
}

#[tokio::test]
async fn lazy_tenants_fetch_their_first_token_on_first_use() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .refresh("lazy = true")
        .start()
        .await;
    let ready = client()
        .get(format!("{}/readyz", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        200,
        "an idle tenant does not hold readiness up"
    );
    let tenants = json(
        client()
            .get(format!("{}/tenants", proxy.admin))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(tenants["tenants"][0]["state"], "idle");
    assert_eq!(fake.token_requests(), 0, "nothing fetched before use");

    let resp = proxy.get("/x").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(fake.token_requests(), 1);
    let tenants = json(
        client()
            .get(format!("{}/tenants", proxy.admin))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(tenants["tenants"][0]["state"], "ready");
}

#[tokio::test]
async fn oversized_headers_get_a_431_and_the_connection_limit_holds() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .server("max_header_bytes = \"8KiB\"")
        .server("max_connections = 1")
        .start()
        .await;
    proxy.wait_ready().await;
    let resp = client()
        .get(format!("{}/x", proxy.url))
        .header("x-big", "a".repeat(16 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 431);
    assert!(fake.seen().is_empty());

    // One connection held open: a second one is closed at once.
    let held = tokio::net::TcpStream::connect(proxy.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let refused = client().get(format!("{}/x", proxy.url)).send().await;
    assert!(refused.is_err(), "over server.max_connections");
    drop(held);
}

#[tokio::test]
async fn upstream_connections_are_reused_and_one_criteo_closes_is_replaced() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    // One kept-alive client connection, so one worker and its pool.
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |q: &'static str| {
        let c = c.clone();
        let url = format!("{}/2024-10/pooled{q}", proxy.url);
        // The body is read, so the client keeps its one connection.
        async move {
            let resp = c.get(url).send().await.unwrap();
            let status = resp.status();
            resp.bytes().await.unwrap();
            status
        }
    };
    for _ in 0..10 {
        assert_eq!(get("").await, 200);
    }
    // Criteo retires the connection after this answer.
    assert_eq!(get("?close=1").await, 200);
    for _ in 0..5 {
        assert_eq!(get("").await, 200, "a closed connection is never reused");
    }

    let seen = fake.seen_path("/2024-10/pooled");
    assert_eq!(seen.len(), 16);
    let host = fake.addr().to_string();
    assert!(
        seen.iter().all(|s| s.headers["host"] == host),
        "Host names the upstream"
    );
    let peers = |s: &[support::fake_criteo::Seen]| {
        s.iter()
            .map(|s| s.peer)
            .collect::<std::collections::HashSet<_>>()
    };
    let before = peers(&seen[..11]);
    let after = peers(&seen[11..]);
    assert_eq!(before.len(), 1, "eleven requests, one upstream connection");
    assert_eq!(after.len(), 1, "after the close, one new connection");
    assert!(before.is_disjoint(&after));
}

#[tokio::test]
async fn a_401_whose_body_stalls_is_replayed_once_upstream_timeout_is_over() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .upstream("timeout = \"500ms\"")
        .start()
        .await;
    proxy.wait_ready().await;
    fake.stall_401_bodies();
    fake.revoke_all_tokens();
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client()
            .post(format!("{}/x", proxy.url))
            .body("kept for the replay")
            .send(),
    )
    .await
    .expect("answered: the stalled 401 body does not hold the request")
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await["body"], "kept for the replay");
    let seen = fake.seen_path("/x");
    assert_eq!(seen.len(), 2, "one attempt, one replay");
    assert_eq!(seen[0].status, 401);
}

#[tokio::test]
async fn a_401_to_a_streamed_request_retires_the_token() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .server("max_replay_body = \"1KiB\"")
        .start()
        .await;
    proxy.wait_ready().await;
    fake.revoke_all_tokens();
    let resp = client()
        .post(format!("{}/upload", proxy.url))
        .body(vec![b'z'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "streamed: not replayed");
    // The refused token is dropped at once, so the next request starts
    // with a fresh one instead of meeting the same 401.
    fake.wait_token_requests(2, Duration::from_secs(5)).await;
    proxy.wait_ready().await;
    let resp = proxy.get("/next").await;
    assert_eq!(resp.status(), 200);
    let seen = fake.seen_path("/next");
    assert_eq!(seen.len(), 1, "no 401 on the way: {seen:?}");
}

#[tokio::test]
async fn upstream_timeout_starts_when_the_request_body_has_been_sent() {
    use tokio::io::AsyncWriteExt;
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .server("max_replay_body = \"1KiB\"")
        .upstream("timeout = \"500ms\"")
        .start()
        .await;
    proxy.wait_ready().await;
    // A streamed upload that takes longer than upstream.timeout: the
    // pauses are the stimulus (a slow client), not synchronisation.
    let mut s = support::raw::send(
        &proxy.url,
        b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 3000\r\n\r\n",
    )
    .await;
    for part in [1500, 1000, 500] {
        s.write_all(&vec![b'u'; part]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let head = support::raw::read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = fake.seen_path("/upload");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.len(), 3000);
}

#[tokio::test]
async fn connect_and_options_asterisk_are_answered_locally() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    let mut s = support::raw::send(
        &proxy.url,
        b"CONNECT api.criteo.com:443 HTTP/1.1\r\nhost: api.criteo.com:443\r\n\r\n",
    )
    .await;
    let head = support::raw::read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 405"), "{head}");
    assert!(
        head.contains("x-criteo-proxy-error: method_not_allowed"),
        "{head}"
    );
    let mut s = support::raw::send(&proxy.url, b"OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let head = support::raw::read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("allow: get,"), "{head}");
    assert!(fake.seen().is_empty(), "never forwarded: {:?}", fake.seen());
}

#[tokio::test]
async fn an_upstream_proxy_error_header_is_removed() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::ready(&fake).await;
    let resp = proxy.get("/x?proxy_error=1").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-fake-criteo"], "echo");
    assert!(
        resp.headers().get("x-criteo-proxy-error").is_none(),
        "a Criteo answer never looks like a proxy error"
    );
}

#[tokio::test]
async fn retry_after_is_at_most_thirty_seconds_after_rejected_credentials() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .without_main()
        .server("default_tenant = \"bad\"")
        .tenant(
            "bad",
            "grant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret = \"wrong\"",
        )
        .start()
        .await;
    fake.wait_token_requests(1, Duration::from_secs(10)).await;
    let resp = proxy.get("/x").await;
    assert_eq!(resp.status(), 503);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=30).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
}

#[tokio::test]
async fn past_the_replay_budget_a_body_streams_and_is_not_replayed() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .server("max_replay_body = \"64KiB\"")
        .server("replay_budget = \"64KiB\"")
        .start()
        .await;
    proxy.wait_ready().await;
    let body = vec![b'b'; 40 * 1024];
    // One body kept while its answer is held…
    let held = {
        let url = format!("{}/hold", proxy.url);
        let body = body.clone();
        tokio::spawn(async move { client().post(url).body(body).send().await.unwrap().status() })
    };
    fake.wait_api_arrivals(1, Duration::from_secs(5)).await;
    // …leaves no room for a second: it streams, so its 401 comes back
    // as Criteo sent it instead of being replayed.
    let resp = client()
        .post(format!("{}/always-401", proxy.url))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(fake.seen_path("/always-401").len(), 1, "not replayed");

    fake.release();
    assert_eq!(held.await.unwrap(), 200);
    // The budget came back with the first request's end.
    proxy.wait_ready().await;
    let resp = client()
        .post(format!("{}/always-401", proxy.url))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(fake.seen_path("/always-401").len(), 3, "kept, so replayed");
}

#[tokio::test]
async fn over_upstream_max_connections_a_request_waits_then_gets_a_503() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .server("workers = 1")
        .upstream("max_connections = 1")
        .upstream("connect_timeout = \"300ms\"")
        .start()
        .await;
    proxy.wait_ready().await;
    let held = {
        let url = format!("{}/hold", proxy.url);
        tokio::spawn(async move { client().get(url).send().await.unwrap().status() })
    };
    fake.wait_api_arrivals(1, Duration::from_secs(5)).await;
    let resp = proxy.get("/x").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-criteo-proxy-error"], "upstream_busy");
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(json(resp).await["error"], "upstream_busy");
    assert!(fake.seen_path("/x").is_empty(), "nothing forwarded");

    fake.release();
    assert_eq!(held.await.unwrap(), 200);
    let resp = proxy.get("/x").await;
    assert_eq!(resp.status(), 200, "the slot came back");
}
