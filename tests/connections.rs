//! No connection is held forever, on either listener, and an answer the
//! proxy makes early never breaks the client's connection. Open
//! connections are counted from the client's side: each socket must see
//! the server close it (end of stream or reset) within a generous bound.

mod support;

use std::time::Duration;

use support::raw::{self, until_closed};
use support::{FakeCriteo, TestProxy, client};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Small timers, so that every phase ends fast.
fn quick(builder: support::ProxyBuilder) -> support::ProxyBuilder {
    builder
        .server("header_read_timeout = \"300ms\"")
        .server("idle_timeout = \"300ms\"")
        .server("body_read_timeout = \"300ms\"")
}

async fn ok(url: String) -> u16 {
    client().get(url).send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn silent_connections_are_closed_on_both_listeners_and_clients_served_after() {
    const N: usize = 8;
    let fake = FakeCriteo::start().await;
    let proxy = quick(TestProxy::builder(&fake))
        .server(&format!("max_connections = {N}"))
        .server(&format!("admin_max_connections = {N}"))
        .start()
        .await;
    proxy.wait_ready().await;
    for listener in [&proxy.url, &proxy.admin] {
        // Every place taken by a connection that never says a word…
        let mut silent = Vec::new();
        for _ in 0..N {
            silent.push(raw::connect(listener).await);
        }
        // …is given back: the server closes each one.
        for s in &mut silent {
            assert!(until_closed(s).await.is_empty(), "closed without an answer");
        }
    }
    assert_eq!(ok(format!("{}/x", proxy.url)).await, 200);
    assert_eq!(ok(format!("{}/healthz", proxy.admin)).await, 200);
}

#[tokio::test]
async fn half_sent_prefaces_and_heads_are_closed_on_both_listeners() {
    let fake = FakeCriteo::start().await;
    let proxy = quick(TestProxy::builder(&fake)).start().await;
    proxy.wait_ready().await;
    for listener in [&proxy.url, &proxy.admin] {
        for partial in [
            &b"PRI * HTTP/2.0\r\n"[..],          // 16 of the preface's 24 bytes
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", // the whole preface, then nothing
            b"GET /x HTTP/1.1\r\nhost: x\r\nx-criteo-ten", // half a head
        ] {
            let mut s = raw::send(listener, partial).await;
            until_closed(&mut s).await;
        }
    }
    assert!(fake.seen().is_empty());
}

#[tokio::test]
async fn a_half_sent_head_after_a_kept_alive_request_is_closed_on_both_listeners() {
    let fake = FakeCriteo::start().await;
    // Idle connections are left alone for a minute: only the header read
    // timeout can close these.
    let proxy = TestProxy::builder(&fake)
        .server("header_read_timeout = \"300ms\"")
        .server("idle_timeout = \"60s\"")
        .start()
        .await;
    proxy.wait_ready().await;
    for (listener, path) in [(&proxy.url, "/x"), (&proxy.admin, "/healthz")] {
        let mut s = raw::send(
            listener,
            format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes(),
        )
        .await;
        let (head, _) = raw::read_response(&mut s).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        s.write_all(b"GET /x HTTP/1.1\r\nhost: x\r\nx-criteo-ten")
            .await
            .unwrap();
        assert!(
            until_closed(&mut s).await.is_empty(),
            "closed without an answer"
        );
    }
    assert_eq!(fake.seen_path("/x").len(), 1);
}

#[tokio::test]
async fn a_request_body_that_stops_is_closed_whether_kept_or_streamed_on_both_listeners() {
    let fake = FakeCriteo::start().await;
    let proxy = quick(TestProxy::builder(&fake))
        .server("max_replay_body = \"1KiB\"")
        .start()
        .await;
    proxy.wait_ready().await;
    // 100 bytes of 500 (kept for a replay), then 2000 of 5000 (streamed).
    for (length, sent) in [(500, 100), (5000, 2000)] {
        let mut s = raw::send(
            &proxy.url,
            format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {length}\r\n\r\n")
                .as_bytes(),
        )
        .await;
        s.write_all(&vec![b'b'; sent]).await.unwrap();
        let answer = String::from_utf8_lossy(&until_closed(&mut s).await).to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 408"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        assert!(answer.contains("body_timeout"), "{answer}");
    }
    // On the admin listener, the one route that reads a body.
    let mut s = raw::send(
        &proxy.admin,
        b"POST /consent/callback HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"a\":",
    )
    .await;
    let answer = String::from_utf8_lossy(&until_closed(&mut s).await).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 408"), "{answer}");
    // The kept body never left; the streamed one was cut off.
    let seen = fake.seen_path("/upload");
    assert!(seen.len() <= 1, "{seen:?}");
    assert!(seen.iter().all(|s| s.body.len() < 2000), "{seen:?}");
}

#[tokio::test]
async fn idle_http1_and_http2_connections_are_closed() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let fake = FakeCriteo::start().await;
    let proxy = quick(TestProxy::builder(&fake)).start().await;
    proxy.wait_ready().await;
    let uri: http::Uri = format!("{}/x", proxy.url).parse().unwrap();
    let request = || {
        http::Request::get(uri.clone())
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };

    // HTTP/2: one request, then nothing; the connection future ends when
    // the server has closed the connection.
    let io = TokioIo::new(raw::connect(&proxy.url).await);
    let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let resp = tx.send_request(request()).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    tokio::time::timeout(raw::CLOSE_WITHIN, conn)
        .await
        .expect("the idle HTTP/2 connection is closed")
        .unwrap()
        .unwrap();

    // HTTP/1.1 keep-alive, likewise.
    let io = TokioIo::new(raw::connect(&proxy.url).await);
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    let conn = tokio::spawn(conn);
    let resp = tx.send_request(request()).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    tokio::time::timeout(raw::CLOSE_WITHIN, conn)
        .await
        .expect("the idle HTTP/1.1 connection is closed")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn admin_connections_over_the_cap_are_closed_at_once() {
    let fake = FakeCriteo::start().await;
    // Long timers: a connection closed here is closed by the cap.
    let proxy = TestProxy::builder(&fake)
        .server("admin_max_connections = 2")
        .server("header_read_timeout = \"60s\"")
        .start()
        .await;
    proxy.wait_ready().await;
    let _held = [
        raw::connect(&proxy.admin).await,
        raw::connect(&proxy.admin).await,
    ];
    let mut over = raw::send(&proxy.admin, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(until_closed(&mut over).await.is_empty(), "no answer");
}

// === early answers to requests with a body ===

/// Sends a request with a `size`-byte body (and `headers`), then the
/// client's next request: on the same connection if the answer kept it
/// alive, else on a new one once the server has closed this one cleanly.
/// Returns the answer's head, and whether it kept the connection.
async fn post_then_get(url: &str, headers: &str, size: usize) -> (String, bool) {
    let (head, mut s) = post(url, headers, size).await;
    let kept = !head.contains("connection: close");
    let next = b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n";
    let (next_head, _) = if kept {
        s.write_all(next).await.unwrap();
        raw::read_response(&mut s).await
    } else {
        assert!(
            raw::closes_cleanly(&mut s).await,
            "no reset under the answer"
        );
        raw::read_response(&mut raw::send(url, next).await).await
    };
    assert!(next_head.starts_with("http/1.1 200"), "next: {next_head}");
    (head, kept)
}

/// Sends a POST with a `size`-byte body while reading its answer (which
/// may come before the body is sent), as an HTTP client does. Returns the
/// answer's head, and the connection once the whole body has been sent.
async fn post(url: &str, headers: &str, size: usize) -> (String, TcpStream) {
    let (mut rx, mut tx) = raw::connect(url).await.into_split();
    let head =
        format!("POST /upload HTTP/1.1\r\nhost: x\r\n{headers}content-length: {size}\r\n\r\n");
    let writer = tokio::spawn(async move {
        tx.write_all(head.as_bytes()).await?;
        tx.write_all(&vec![b'p'; size]).await?;
        Ok::<_, std::io::Error>(tx)
    });
    let (answer, _) = read_from(&mut rx).await;
    let tx = writer.await.unwrap().unwrap_or_else(|e| {
        panic!("the client could not send its whole body: {e}; answer: {answer}")
    });
    (answer, rx.reunite(tx).unwrap())
}

/// [`raw::read_response`] on a read half.
async fn read_from(rx: &mut tokio::net::tcp::OwnedReadHalf) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(raw::CLOSE_WITHIN, rx.read(&mut byte))
            .await
            .expect("an answer arrives")
            .unwrap_or(0);
        assert!(
            n > 0,
            "closed before an answer: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    rx.read_exact(&mut body).await.unwrap();
    (head, body)
}

#[tokio::test]
async fn early_error_answers_to_requests_with_a_body_keep_the_client_working() {
    let fake = FakeCriteo::start().await;
    let store = tempfile::tempdir().unwrap();
    let proxy = TestProxy::builder(&fake)
        .tenant(
            "bad",
            "grant = \"client_credentials\"\nclient_id = \"main-id\"\nclient_secret = \"wrong\"",
        )
        .tenant(
            "acme",
            "grant = \"refresh_token\"\nclient_id = \"main-id\"\nclient_secret = \"main-secret\"\nredirect_uri = \"http://127.0.0.1/cb\"",
        )
        .section(&format!(
            "[store]\npath = \"{}\"",
            store.path().join("tokens.json").display()
        ))
        .start()
        .await;
    fake.wait_token_requests(2, Duration::from_secs(10)).await;
    for (tenant, status, code) in [
        ("nobody", 400, "unknown_tenant"),
        ("bad", 503, "token_unavailable"),
        ("acme", 503, "consent_required"),
    ] {
        let header = format!("x-criteo-tenant: {tenant}\r\n");
        for size in [20_000, 2_000_000] {
            let (head, kept) = post_then_get(&proxy.url, &header, size).await;
            assert!(head.starts_with(&format!("http/1.1 {status}")), "{head}");
            assert!(
                head.contains(&format!("x-criteo-proxy-error: {code}")),
                "{head}"
            );
            if size == 20_000 {
                assert!(kept, "a small body is read and dropped: {head}");
            }
        }
    }
    assert!(fake.seen_path("/upload").is_empty());
}

#[tokio::test]
async fn a_busy_answer_to_a_request_with_a_body_keeps_the_client_working() {
    let fake = FakeCriteo::start().await;
    let proxy = TestProxy::builder(&fake)
        .server("workers = 1")
        .upstream("max_connections = 1")
        .upstream("connect_timeout = \"200ms\"")
        .start()
        .await;
    proxy.wait_ready().await;
    let held = {
        let url = format!("{}/hold", proxy.url);
        tokio::spawn(async move { ok(url).await })
    };
    fake.wait_api_arrivals(1, Duration::from_secs(5)).await;
    for size in [20_000, 2_000_000] {
        let (head, mut s) = post(&proxy.url, "", size).await;
        assert!(head.starts_with("http/1.1 503"), "{head}");
        assert!(
            head.contains("x-criteo-proxy-error: upstream_busy"),
            "{head}"
        );
        if head.contains("connection: close") {
            assert!(
                raw::closes_cleanly(&mut s).await,
                "no reset under the answer"
            );
        } else {
            // Still busy, but the connection serves the next request.
            s.write_all(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let (next, _) = raw::read_response(&mut s).await;
            assert!(next.starts_with("http/1.1 503"), "{next}");
        }
    }
    fake.release();
    assert_eq!(held.await.unwrap(), 200);
    let (_, kept) = post_then_get(&proxy.url, "", 20_000).await;
    assert!(kept);
}

// === upstream connections ===

/// An upstream written by hand, for what the stand-in does not do: close a
/// kept-alive connection while it is idle, answer a request before reading
/// its body, or stop in the middle of an answer. By path: `/early` answers
/// 413 at once and then reads the body; `/half` sends the head and part of
/// a body, then waits; `/stall` never answers; anything else gets 200
/// with, as its body, the number of the connection it came on (from 1).
struct RawUpstream {
    url: String,
    /// Closes the idle connections numbered up to this.
    close_idle: tokio::sync::watch::Sender<usize>,
    /// What happened, in order.
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// The whole body of an `/early` request arrived, after its answer.
    BodyAfterAnswer(usize),
    /// Connection `n` ended: the proxy closed it, or the upstream did.
    Ended(usize),
}

impl RawUpstream {
    async fn start() -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (close_idle, close_rx) = tokio::sync::watch::channel(0);
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let count = std::sync::Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let (close, tx) = (close_rx.clone(), tx.clone());
                tokio::spawn(async move {
                    serve_raw(s, n, close, &tx).await;
                    let _ = tx.send(Event::Ended(n));
                });
            }
        });
        Self {
            url,
            close_idle,
            events,
            accepted,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn next_event(&mut self) -> Event {
        tokio::time::timeout(raw::CLOSE_WITHIN, self.events.recv())
            .await
            .expect("an upstream event")
            .unwrap()
    }
}

/// One connection of [`RawUpstream`]: requests in turn, until either side
/// closes it.
async fn serve_raw(
    s: TcpStream,
    n: usize,
    mut close_idle: tokio::sync::watch::Receiver<usize>,
    events: &tokio::sync::mpsc::UnboundedSender<Event>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    let mut s = BufReader::new(s);
    loop {
        let mut line = String::new();
        tokio::select! {
            read = s.read_line(&mut line) => if read.unwrap_or(0) == 0 { return },
            _ = close_idle.wait_for(|&upto| n <= upto) => return,
        }
        let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
        let mut length = 0;
        loop {
            let mut header = String::new();
            s.read_line(&mut header).await.unwrap();
            if header == "\r\n" {
                break;
            }
            if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; length];
        match path.as_str() {
            "/early" => {
                let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n";
                s.get_mut().write_all(answer).await.unwrap();
                s.read_exact(&mut body).await.unwrap();
                events.send(Event::BodyAfterAnswer(n)).unwrap();
            }
            "/half" | "/stall" => {
                if path == "/half" {
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\nstarted";
                    s.get_mut().write_all(answer).await.unwrap();
                }
                // Nothing more: waits for the proxy to close the connection.
                while s.read(&mut body).await.is_ok_and(|r| r > 0) {}
                return;
            }
            _ => {
                s.read_exact(&mut body).await.unwrap();
                let n = n.to_string();
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{n}", n.len());
                s.get_mut().write_all(answer.as_bytes()).await.unwrap();
            }
        }
    }
}

/// The proxy in front of `up` (tokens from `fake`), one worker so that
/// every request uses the same pool.
async fn proxy_to(up: &RawUpstream, fake: &FakeCriteo) -> TestProxy {
    proxy_with(up, fake, "timeout = \"30s\"").await
}

async fn proxy_with(up: &RawUpstream, fake: &FakeCriteo, upstream: &str) -> TestProxy {
    let proxy = TestProxy::builder(fake)
        .upstream_url(&up.url)
        .upstream(upstream)
        .server("workers = 1")
        .server("max_replay_body = \"1KiB\"")
        .start()
        .await;
    proxy.wait_ready().await;
    proxy
}

/// `GET path`: the status and the body (the upstream connection's number).
async fn get_text(proxy: &TestProxy, path: &str) -> (u16, String) {
    let resp = proxy.get(path).await;
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn an_upstream_connection_closed_while_idle_is_not_used() {
    let fake = FakeCriteo::start().await;
    let mut up = RawUpstream::start().await;
    let proxy = proxy_to(&up, &fake).await;
    assert_eq!(get_text(&proxy, "/a").await, (200, "1".into()));
    assert_eq!(get_text(&proxy, "/b").await, (200, "1".into()), "reused");

    up.close_idle.send(1).unwrap();
    assert_eq!(up.next_event().await, Event::Ended(1));
    // Not sent on the closed connection (which would fail it): on a new one.
    assert_eq!(get_text(&proxy, "/c").await, (200, "2".into()));
    assert_eq!(get_text(&proxy, "/d").await, (200, "2".into()));
}

#[tokio::test]
async fn a_client_that_leaves_mid_answer_takes_the_upstream_connection_with_it() {
    let fake = FakeCriteo::start().await;
    let mut up = RawUpstream::start().await;
    let proxy = proxy_to(&up, &fake).await;
    assert_eq!(get_text(&proxy, "/a").await, (200, "1".into()));

    let mut s = raw::send(&proxy.url, b"GET /half HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let head = raw::read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(s);
    // The connection is closed, not left in the pool with half an answer
    // unread, where the next request would read it as its own.
    assert_eq!(up.next_event().await, Event::Ended(1));
    assert_eq!(get_text(&proxy, "/b").await, (200, "2".into()));
}

#[tokio::test]
async fn a_connection_answered_before_its_body_was_sent_is_reused_after_it() {
    let fake = FakeCriteo::start().await;
    let mut up = RawUpstream::start().await;
    let proxy = proxy_to(&up, &fake).await;
    assert_eq!(get_text(&proxy, "/a").await, (200, "1".into()));

    // A streamed body (over max_replay_body): half of it, the answer, the rest.
    let mut s = raw::send(
        &proxy.url,
        b"POST /early HTTP/1.1\r\nhost: x\r\ncontent-length: 200000\r\n\r\n",
    )
    .await;
    s.write_all(&[b'p'; 100_000]).await.unwrap();
    let (head, _) = raw::read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 413"), "{head}");
    s.write_all(&[b'p'; 100_000]).await.unwrap();
    assert_eq!(up.next_event().await, Event::BodyAfterAnswer(1));

    // The client's connection and the upstream one both serve the next.
    s.write_all(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = raw::read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"1");
    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn an_answer_late_on_a_reused_connection_is_a_504_after_upstream_timeout() {
    let fake = FakeCriteo::start().await;
    let mut up = RawUpstream::start().await;
    let proxy = proxy_with(&up, &fake, "timeout = \"300ms\"").await;
    assert_eq!(get_text(&proxy, "/a").await, (200, "1".into()));
    // The first request's deadline passes while the connection is idle: the
    // next one's is a deadline of its own.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get_text(&proxy, "/b").await, (200, "1".into()));

    let resp = tokio::time::timeout(raw::CLOSE_WITHIN, proxy.get("/stall"))
        .await
        .expect("answered once upstream.timeout is over");
    assert_eq!(resp.status(), 504);
    assert_eq!(resp.headers()["x-criteo-proxy-error"], "upstream_timeout");
    // The connection is closed, not left in the pool with an answer due.
    assert_eq!(up.next_event().await, Event::Ended(1));
    assert_eq!(get_text(&proxy, "/c").await, (200, "2".into()));
}
