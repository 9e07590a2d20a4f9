//! An HTTP/2 upstream that turns requests away unprocessed (RFC 9113: a
//! stream reset with `REFUSED_STREAM`, section 8.7, or above the last
//! stream of a `GOAWAY`, section 6.8, as nginx does after
//! `keepalive_requests`): a request whose body was kept is sent again and
//! answered, a bounded number of times; a streamed one cannot be, and
//! gets the error.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use support::fake_criteo::tls_acceptor;
use support::{FakeCriteo, TestProxy, client};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the upstream turns requests away.
#[derive(Debug, Clone, Copy)]
enum TurnAway {
    /// Resets the first `n` requests' streams with `REFUSED_STREAM`, once
    /// their bodies are in (so that nothing of a request is left unsent).
    Refuse(usize),
    /// Its first connection answers the first request's `HEADERS` with a
    /// `GOAWAY` whose last stream is 0: none processed.
    GoAway,
}

/// A request that reached the upstream's HTTP/2 server.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    body: Bytes,
    authorization: Option<String>,
}

/// The upstream: HTTPS on 127.0.0.1, HTTP/2 only (by ALPN).
#[derive(Debug)]
struct H2Upstream {
    url: String,
    ca: PathBuf,
    _dir: tempfile::TempDir,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Requests the `GOAWAY` turned away.
    gone_away: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
}

impl H2Upstream {
    async fn start(turn_away: TurnAway) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let (acceptor, ca_pem) = tls_acceptor(&[b"h2"]);
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let gone_away = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (s, g, c) = (
            Arc::clone(&seen),
            Arc::clone(&gone_away),
            Arc::clone(&connections),
        );
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                let (acceptor, s, g) = (acceptor.clone(), Arc::clone(&s), Arc::clone(&g));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    match turn_away {
                        TurnAway::GoAway if n == 1 => go_away_at_once(tls, &g).await,
                        TurnAway::GoAway => serve(tls, 0, s).await,
                        TurnAway::Refuse(refused) => serve(tls, refused, s).await,
                    }
                });
            }
        });
        Self {
            url,
            ca,
            _dir: dir,
            seen,
            gone_away,
            connections,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// An HTTP/2 server (the `h2` crate's) that refuses the first `refused`
/// requests and answers the others `200 ok`.
async fn serve<S>(io: S, refused: usize, seen: Arc<Mutex<Vec<Seen>>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    while let Some(Ok((req, respond))) = conn.accept().await {
        tokio::spawn(answer(req, respond, refused, Arc::clone(&seen)));
    }
}

async fn answer(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    refused: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    let authorization = req
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut body = req.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return };
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    let n = {
        let mut seen = seen.lock().unwrap();
        seen.push(Seen {
            body: bytes.into(),
            authorization,
        });
        seen.len()
    };
    if n <= refused {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    }
    if let Ok(mut stream) = respond.send_response(http::Response::new(()), false) {
        let _ = stream.send_data(Bytes::from_static(b"ok"), true);
    }
}

/// HTTP/2 by hand, as a server going away does: its `SETTINGS`, and a
/// `GOAWAY` with last stream 0 (`NO_ERROR`) for the first request's
/// `HEADERS`, which it never processes; then it waits for the client to
/// close.
async fn go_away_at_once<S>(mut io: S, gone_away: &AtomicUsize)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    const SETTINGS_ACK: [u8; 9] = [0, 0, 0, 4, 1, 0, 0, 0, 0];
    const GOAWAY: [u8; 17] = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut preface = [0u8; 24];
    if io.read_exact(&mut preface).await.is_err() || io.write_all(&SETTINGS).await.is_err() {
        return;
    }
    let _ = io.flush().await;
    let mut went_away = false;
    loop {
        let mut head = [0u8; 9];
        if io.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        if io.read_exact(&mut payload).await.is_err() {
            return;
        }
        let reply: &[u8] = match (head[3], head[4] & 1) {
            // SETTINGS, not an ACK.
            (4, 0) => &SETTINGS_ACK,
            // HEADERS: a request.
            (1, _) => {
                gone_away.fetch_add(1, Ordering::SeqCst);
                if went_away {
                    continue;
                }
                went_away = true;
                &GOAWAY
            }
            _ => continue,
        };
        if io.write_all(reply).await.is_err() || io.flush().await.is_err() {
            return;
        }
    }
}

/// The proxy in front of `up` (tokens from `fake`), one worker so that
/// every request shares one pool, and its HTTP/2 connection.
async fn proxy_to(up: &H2Upstream, fake: &FakeCriteo) -> TestProxy {
    let proxy = TestProxy::builder(fake)
        .upstream_url(&up.url)
        .upstream(&format!("ca_file = \"{}\"", up.ca.display()))
        .server("workers = 1")
        .server("max_replay_body = \"1KiB\"")
        .start()
        .await;
    proxy.wait_ready().await;
    proxy
}

async fn post(proxy: &TestProxy, body: impl Into<reqwest::Body>) -> (u16, String) {
    let resp = client()
        .post(format!("{}/2024-10/advertisers/me", proxy.url))
        .body(body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn a_refused_stream_is_sent_again_with_its_body_and_token_and_counted_once() {
    let fake = FakeCriteo::start().await;
    let up = H2Upstream::start(TurnAway::Refuse(1)).await;
    let proxy = proxy_to(&up, &fake).await;

    assert_eq!(post(&proxy, "kept").await, (200, "ok".to_owned()));
    let seen = up.seen();
    assert_eq!(seen.len(), 2, "refused once, then answered: {seen:?}");
    assert_eq!(seen[0], seen[1], "the same body and token both times");
    assert_eq!(seen[1].body, "kept");
    assert!(seen[1].authorization.is_some());
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("criteo_proxy_requests_total{status=\"200\",tenant=\"main\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("criteo_proxy_upstream_retries_total{tenant=\"main\"} 1"),
        "not a replay to Criteo: {metrics}"
    );
}

#[tokio::test]
async fn a_request_above_the_last_stream_of_a_goaway_goes_on_a_new_connection() {
    let fake = FakeCriteo::start().await;
    let up = H2Upstream::start(TurnAway::GoAway).await;
    let proxy = proxy_to(&up, &fake).await;

    let resp = proxy.get("/2024-10/advertisers/me").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
    assert_eq!(up.gone_away.load(Ordering::SeqCst), 1);
    assert_eq!(up.seen().len(), 1, "answered on the next connection");
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_request_refused_every_time_is_sent_a_bounded_number_of_times() {
    let fake = FakeCriteo::start().await;
    let up = H2Upstream::start(TurnAway::Refuse(usize::MAX)).await;
    let proxy = proxy_to(&up, &fake).await;

    let (status, body) = post(&proxy, "kept").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("upstream_unreachable"), "{body}");
    assert_eq!(up.seen().len(), 3, "sent, then twice again");
}

#[tokio::test]
async fn a_refused_streamed_body_is_not_sent_again() {
    let fake = FakeCriteo::start().await;
    let up = H2Upstream::start(TurnAway::Refuse(1)).await;
    let proxy = proxy_to(&up, &fake).await;

    // Over `max_replay_body`: streamed, so not kept for a second send.
    let body = vec![b'x'; 4096];
    let (status, answer) = post(&proxy, body).await;
    assert_eq!(status, 502, "{answer}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.len(), 4096);
    // The connection still serves the next request.
    assert_eq!(post(&proxy, "kept").await, (200, "ok".to_owned()));
}
