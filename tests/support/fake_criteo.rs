//! An in-process stand-in for Criteo on `127.0.0.1:0`: a token endpoint
//! (client credentials, rotating refresh tokens, codes; configurable
//! lifetime, delays, outage, and the ways a token answer can go wrong:
//! a spoiled rest, a huge `expires_in`, a redirect, an oversized body) and
//! an API that answers 401 to unknown, expired or revoked tokens and echoes
//! what it received.
//!
//! The tokens, the grants and Criteo's error shapes are the library's
//! `sandbox` (the core of the `--dev` stand-in); this file adds only the
//! test knobs and what it records.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criteo_token_proxy::sandbox::{self, GrantError, Ledger, Refusal};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

type Body = Either<Full<Bytes>, StreamBody<tokio_stream::Chunks>>;

/// What the API saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HashMap<String, String>,
    pub body: Bytes,
    pub status: u16,
    /// The proxy's end of the connection the request came on.
    pub peer: SocketAddr,
    /// When the request arrived.
    pub arrived: Instant,
}

/// Criteo's limit: at most `calls` accepted calls per client in any
/// window of `window` (a sliding window); more get 429.
#[derive(Debug, Clone, Copy)]
struct Limit {
    calls: usize,
    window: Duration,
}

/// The address a connection came from, attached to each of its requests.
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

/// A 2xx token answer whose refresh token (if any) is good and whose
/// rest is not. The refresh token, when there is one, comes first.
#[derive(Debug, Clone, PartialEq)]
pub enum Spoil {
    /// `"expires_in": "900"`
    ExpiresInString,
    /// `"expires_in": -5`
    ExpiresInNegative,
    /// `"expires_in": 899.5`
    ExpiresInFraction,
    /// `"token_type": "mac"`
    TokenTypeMac,
    /// `"access_token": ""`
    EmptyAccessToken,
    /// An access token with a control character in it.
    NonPrintableAccessToken,
    /// `"access_token": <this number>`
    NumericAccessToken(u64),
    /// An access token of 20 KiB.
    LongAccessToken,
    /// The JSON stops right after the refresh token.
    BrokenAfterRefreshToken,
    /// The refresh token, then this many bytes of padding, then the rest.
    Padded(usize),
}

#[derive(Debug)]
pub struct State {
    clients: Mutex<HashMap<String, String>>,
    expires_in: Mutex<Duration>,
    /// What the answers say `expires_in` is, when not the real lifetime.
    advertised_expires_in: Mutex<Option<Value>>,
    token_delay: Mutex<Duration>,
    /// Before a request of this grant type is processed.
    grant_delays: Mutex<HashMap<String, Duration>>,
    /// After a token request was processed (a rotation done), before the
    /// answer goes out.
    answer_delay: Mutex<Duration>,
    /// How to spoil 2xx answers; `true`: only the next one.
    spoil: Mutex<Option<(Spoil, bool)>>,
    /// Answer every token request with this redirect (status, Location).
    redirect: Mutex<Option<(u16, String)>>,
    /// Token answers sent, any outcome.
    answers_sent: watch::Sender<usize>,
    /// Refresh tokens handed out in 2xx answers: (grant_type, token).
    answered_refresh_tokens: Mutex<Vec<(String, String)>>,
    outage: AtomicBool,
    always_401: AtomicBool,
    /// 401 answers send their headers and a first chunk, then stall.
    stall_401_bodies: AtomicBool,
    /// Tokens and codes issued, spent, revoked: the shared stand-in's.
    ledger: Mutex<Ledger>,
    token_requests: watch::Sender<usize>,
    token_forms: Mutex<Vec<HashMap<String, String>>>,
    /// Renewals that came only after the previous token had expired.
    late_renewals: AtomicUsize,
    /// API requests that carried an expired token.
    expired_presented: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    api_requests: watch::Sender<usize>,
    /// Counted when a request arrives, before it is answered.
    api_arrivals: watch::Sender<usize>,
    release: Notify,
    /// Every refresh token presented, in order.
    refresh_presented: Mutex<Vec<String>>,
    /// Presentations of a refresh token that had already been used.
    spent_presented: AtomicUsize,
    consent_denied: AtomicBool,
    limit: Option<Limit>,
    /// Accepted calls per client id, in the current window.
    calls: Mutex<HashMap<String, VecDeque<Instant>>>,
    /// 429s sent for the limit.
    rate_limited: AtomicUsize,
}

#[derive(Debug, Clone)]
pub struct FakeCriteo {
    addr: SocketAddr,
    state: Arc<State>,
    /// With TLS: the PEM of its self-signed certificate, to be trusted.
    ca_pem: Option<String>,
}

#[derive(Debug)]
pub struct Builder {
    clients: HashMap<String, String>,
    expires_in: Duration,
    advertised_expires_in: Option<Value>,
    token_delay: Duration,
    answer_delay: Duration,
    spoil: Option<Spoil>,
    redirect: Option<(u16, String)>,
    outage: bool,
    tls: bool,
    limit: Option<Limit>,
}

impl FakeCriteo {
    pub fn builder() -> Builder {
        Builder {
            clients: HashMap::from([("main-id".into(), "main-secret".into())]),
            expires_in: Duration::from_secs(900),
            advertised_expires_in: None,
            token_delay: Duration::ZERO,
            answer_delay: Duration::ZERO,
            spoil: None,
            redirect: None,
            outage: false,
            tls: false,
            limit: None,
        }
    }

    pub async fn start() -> Self {
        Self::builder().start().await
    }

    fn scheme(&self) -> &'static str {
        if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.addr)
    }

    pub fn token_url(&self) -> String {
        format!("{}://{}/oauth2/token", self.scheme(), self.addr)
    }

    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Calls to the token endpoint so far (any outcome).
    pub fn token_requests(&self) -> usize {
        *self.state.token_requests.borrow()
    }

    /// Waits until the token endpoint has been called `n` times.
    pub async fn wait_token_requests(&self, n: usize, within: Duration) {
        let mut rx = self.state.token_requests.subscribe();
        tokio::time::timeout(within, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("fewer than {n} token requests within {within:?}"))
            .unwrap();
    }

    /// Waits until `n` API requests have arrived (answered or not).
    pub async fn wait_api_arrivals(&self, n: usize, within: Duration) {
        let mut rx = self.state.api_arrivals.subscribe();
        tokio::time::timeout(within, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("fewer than {n} API requests arrived within {within:?}"))
            .unwrap();
    }

    /// Waits until the API has answered `n` requests.
    pub async fn wait_api_requests(&self, n: usize, within: Duration) {
        let mut rx = self.state.api_requests.subscribe();
        tokio::time::timeout(within, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("fewer than {n} API requests within {within:?}"))
            .unwrap();
    }

    pub fn token_forms(&self) -> Vec<HashMap<String, String>> {
        self.state.token_forms.lock().unwrap().clone()
    }

    pub fn issued_tokens(&self) -> Vec<String> {
        let ledger = self.state.ledger.lock().unwrap();
        ledger.access_tokens().map(str::to_owned).collect()
    }

    /// 429s sent for the rate limit.
    pub fn rate_limited(&self) -> usize {
        self.state.rate_limited.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn seen_path(&self, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.path == path).collect()
    }

    pub fn late_renewals(&self) -> usize {
        self.state.late_renewals.load(Ordering::SeqCst)
    }

    pub fn expired_presented(&self) -> usize {
        self.state.expired_presented.load(Ordering::SeqCst)
    }

    /// Makes the token endpoint answer 503 (true) or work again (false).
    pub fn set_outage(&self, on: bool) {
        self.state.outage.store(on, Ordering::SeqCst);
    }

    /// Makes the API answer 401 to every token.
    pub fn set_always_401(&self, on: bool) {
        self.state.always_401.store(on, Ordering::SeqCst);
    }

    /// Makes every 401 send its headers and the start of its body, then
    /// nothing more, ever.
    pub fn stall_401_bodies(&self) {
        self.state.stall_401_bodies.store(true, Ordering::SeqCst);
    }

    pub fn set_token_delay(&self, d: Duration) {
        *self.state.token_delay.lock().unwrap() = d;
    }

    /// Holds each answer this long after the request was processed: a
    /// rotation is done at once, its answer comes late.
    pub fn set_answer_delay(&self, d: Duration) {
        *self.state.answer_delay.lock().unwrap() = d;
    }

    /// Holds requests of `grant_type` this long before processing them.
    pub fn set_grant_delay(&self, grant_type: &str, d: Duration) {
        self.state
            .grant_delays
            .lock()
            .unwrap()
            .insert(grant_type.into(), d);
    }

    /// Spoils the next 2xx token answer only.
    pub fn spoil_next_token_answer(&self, spoil: Spoil) {
        *self.state.spoil.lock().unwrap() = Some((spoil, true));
    }

    /// Spoils every 2xx token answer from now on (`None`: none).
    pub fn spoil_token_answers(&self, spoil: Option<Spoil>) {
        *self.state.spoil.lock().unwrap() = spoil.map(|s| (s, false));
    }

    /// The lifetime of the access tokens it issues.
    pub fn expires_in(&self) -> Duration {
        *self.state.expires_in.lock().unwrap()
    }

    /// Token answers sent so far (any outcome).
    pub fn answers_sent(&self) -> usize {
        *self.state.answers_sent.borrow()
    }

    /// Waits until `n` token answers have been sent.
    pub async fn wait_answers_sent(&self, n: usize, within: Duration) {
        let mut rx = self.state.answers_sent.subscribe();
        tokio::time::timeout(within, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("fewer than {n} token answers within {within:?}"))
            .unwrap();
    }

    /// The refresh tokens handed out in 2xx answers to `grant_type`, in order.
    pub fn answered_refresh_tokens(&self, grant_type: &str) -> Vec<String> {
        self.state
            .answered_refresh_tokens
            .lock()
            .unwrap()
            .iter()
            .filter(|(g, _)| g == grant_type)
            .map(|(_, t)| t.clone())
            .collect()
    }

    pub fn set_client(&self, id: &str, secret: &str) {
        self.state
            .clients
            .lock()
            .unwrap()
            .insert(id.into(), secret.into());
    }

    /// Invalidates every token issued so far: the API answers 401 to them.
    pub fn revoke_all_tokens(&self) {
        self.state.ledger.lock().unwrap().revoke_access();
    }

    /// A fresh refresh token for `client_id`, as a consent would give.
    pub fn issue_refresh_token(&self, client_id: &str) -> String {
        self.state.ledger.lock().unwrap().issue_refresh(client_id)
    }

    /// The one refresh token of `client_id` still usable, if any.
    pub fn newest_refresh_token(&self, client_id: &str) -> Option<String> {
        self.state.ledger.lock().unwrap().newest_refresh(client_id)
    }

    /// Every refresh token presented to the token endpoint, in order.
    pub fn refresh_presented(&self) -> Vec<String> {
        self.state.refresh_presented.lock().unwrap().clone()
    }

    /// How often an already-used refresh token was presented: must stay 0.
    pub fn spent_presented(&self) -> usize {
        self.state.spent_presented.load(Ordering::SeqCst)
    }

    /// The consenting user left: every refresh token of the client dies.
    pub fn revoke_refresh_tokens(&self, client_id: &str) {
        self.state.ledger.lock().unwrap().revoke_refresh(client_id);
    }

    /// An authorization code, as the consent page would hand out.
    pub fn issue_code(&self, client_id: &str, redirect_uri: &str) -> String {
        let mut ledger = self.state.ledger.lock().unwrap();
        ledger.issue_code(client_id, redirect_uri)
    }

    /// Makes the consent page answer `error=access_denied`.
    pub fn set_consent_denied(&self, on: bool) {
        self.state.consent_denied.store(on, Ordering::SeqCst);
    }

    /// Lets a held `/gated` response send the rest of its body.
    /// Lets one `/gated` body go on, or one `/hold` request be answered.
    pub fn release(&self) {
        self.state.release.notify_one();
    }
}

impl Builder {
    pub fn client(mut self, id: &str, secret: &str) -> Self {
        self.clients.insert(id.into(), secret.into());
        self
    }

    pub fn expires_in(mut self, d: Duration) -> Self {
        self.expires_in = d;
        self
    }

    pub fn token_delay(mut self, d: Duration) -> Self {
        self.token_delay = d;
        self
    }

    /// See [`FakeCriteo::set_answer_delay`].
    pub fn answer_delay(mut self, d: Duration) -> Self {
        self.answer_delay = d;
        self
    }

    /// Answers say `expires_in` is `v` (any JSON), while tokens really
    /// live `expires_in`.
    pub fn advertised_expires_in(mut self, v: Value) -> Self {
        self.advertised_expires_in = Some(v);
        self
    }

    /// Spoils every 2xx token answer.
    pub fn spoil_token_answers(mut self, spoil: Spoil) -> Self {
        self.spoil = Some(spoil);
        self
    }

    /// Answers every token request with a redirect to `location`.
    pub fn redirect_token_endpoint(mut self, status: u16, location: &str) -> Self {
        self.redirect = Some((status, location.into()));
        self
    }

    pub fn outage(mut self) -> Self {
        self.outage = true;
        self
    }

    /// Serves HTTPS (HTTP/2 or HTTP/1.1 by ALPN) with a self-signed
    /// certificate for 127.0.0.1.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Criteo's rate limit: at most `calls` API calls per client in any
    /// window of `window`; past it, 429 with `x-ratelimit-limit`,
    /// `x-ratelimit-remaining`, `x-ratelimit-reset` (Unix seconds) and
    /// `Date`, as Criteo answers (no `Retry-After`).
    pub fn rate_limit(mut self, calls: usize, window: Duration) -> Self {
        self.limit = Some(Limit { calls, window });
        self
    }

    pub async fn start(self) -> FakeCriteo {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            clients: Mutex::new(self.clients),
            expires_in: Mutex::new(self.expires_in),
            advertised_expires_in: Mutex::new(self.advertised_expires_in),
            token_delay: Mutex::new(self.token_delay),
            grant_delays: Mutex::new(HashMap::new()),
            answer_delay: Mutex::new(self.answer_delay),
            spoil: Mutex::new(self.spoil.map(|s| (s, false))),
            redirect: Mutex::new(self.redirect),
            answers_sent: watch::Sender::new(0),
            answered_refresh_tokens: Mutex::new(Vec::new()),
            outage: AtomicBool::new(self.outage),
            always_401: AtomicBool::new(false),
            stall_401_bodies: AtomicBool::new(false),
            ledger: Mutex::new(Ledger::new("fake")),
            token_requests: watch::Sender::new(0),
            token_forms: Mutex::new(Vec::new()),
            late_renewals: AtomicUsize::new(0),
            expired_presented: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            api_requests: watch::Sender::new(0),
            api_arrivals: watch::Sender::new(0),
            release: Notify::new(),
            refresh_presented: Mutex::new(Vec::new()),
            spent_presented: AtomicUsize::new(0),
            consent_denied: AtomicBool::new(false),
            limit: self.limit,
            calls: Mutex::new(HashMap::new()),
            rate_limited: AtomicUsize::new(0),
        });
        let (acceptor, ca_pem) = if self.tls {
            let (a, pem) = tls_acceptor(&[b"h2", b"http/1.1"]);
            (Some(a), Some(pem))
        } else {
            (None, None)
        };
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let st = Arc::clone(&st);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |mut req: Request<Incoming>| {
                        req.extensions_mut().insert(Peer(peer));
                        let st = Arc::clone(&st);
                        async move { Ok::<_, Infallible>(handle(st, req).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                    }
                });
            }
        });
        FakeCriteo {
            addr,
            state,
            ca_pem,
        }
    }
}

/// A TLS acceptor for 127.0.0.1 and localhost with a fresh self-signed
/// certificate (its PEM returned, for a client to trust), offering `alpn`.
pub fn tls_acceptor(alpn: &[&[u8]]) -> (tokio_rustls::TlsAcceptor, String) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        ck.cert.pem(),
    )
}

fn json_body(status: StatusCode, v: Value) -> Response<Body> {
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(v.to_string()))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/oauth2/token" => token(st, req).await,
        "/request" => consent_page(&st, &req),
        _ => api(st, req).await,
    }
}

/// Criteo's consent page, with the person always saying yes (or no, when
/// told to): redirects to `redirect_uri` with a code and the state.
fn consent_page(st: &State, req: &Request<Incoming>) -> Response<Body> {
    let q: HashMap<String, String> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let (Some("code"), Some(client_id), Some(redirect_uri), Some(state)) = (
        q.get("response_type").map(String::as_str),
        q.get("client_id"),
        q.get("redirect_uri"),
        q.get("state"),
    ) else {
        return json_body(
            StatusCode::BAD_REQUEST,
            json!({"error": "bad consent request"}),
        );
    };
    if !st.clients.lock().unwrap().contains_key(client_id) {
        return json_body(
            StatusCode::BAD_REQUEST,
            json!({"error": "unknown client_id"}),
        );
    }
    let mut target = url::Url::parse(redirect_uri).unwrap();
    if st.consent_denied.load(Ordering::SeqCst) {
        target
            .query_pairs_mut()
            .append_pair("error", "access_denied")
            .append_pair("state", state);
    } else {
        let code = st
            .ledger
            .lock()
            .unwrap()
            .issue_code(client_id, redirect_uri);
        target
            .query_pairs_mut()
            .append_pair("code", &code)
            .append_pair("state", state);
    }
    let mut r = Response::new(Either::Left(Full::new(Bytes::new())));
    *r.status_mut() = StatusCode::FOUND;
    r.headers_mut()
        .insert("location", target.as_str().parse().unwrap());
    r
}

/// The token endpoint; an answer is held `answer_delay` after the request
/// was processed (a rotation done at once, its answer late).
async fn token(st: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let resp = token_answer(&st, req).await;
    let delay = *st.answer_delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    st.answers_sent.send_modify(|c| *c += 1);
    resp
}

async fn token_answer(st: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let st = Arc::clone(st);
    let delay = *st.token_delay.lock().unwrap();
    let (parts, body) = req.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    st.token_forms.lock().unwrap().push(form.clone());
    st.token_requests.send_modify(|c| *c += 1);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let grant_delay = form
        .get("grant_type")
        .and_then(|g| st.grant_delays.lock().unwrap().get(g).copied());
    if let Some(d) = grant_delay {
        tokio::time::sleep(d).await;
    }
    let redirect = st.redirect.lock().unwrap().clone();
    if let Some((status, location)) = redirect {
        let mut r = json_body(StatusCode::from_u16(status).unwrap(), json!({}));
        r.headers_mut()
            .insert("location", location.parse().unwrap());
        return r;
    }
    if st.outage.load(Ordering::SeqCst) {
        return json_body(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "unavailable"}),
        );
    }
    if let Err(e) = sandbox::form_encoded(&parts.headers) {
        return e.response().map(Either::Left);
    }
    let id = form.get("client_id").cloned().unwrap_or_default();
    let known = |id: &str, secret: &str| {
        st.clients.lock().unwrap().get(id).map(String::as_str) == Some(secret)
    };
    let lifetime = *st.expires_in.lock().unwrap();
    let mut ledger = st.ledger.lock().unwrap();
    let late = ledger.newest_access_expired(&id);
    let result = ledger.grant(&form, known, lifetime);
    drop(ledger);
    let authentic = result.as_ref().err() != Some(&GrantError::InvalidClient);
    if authentic && form.get("grant_type").map(String::as_str) == Some("refresh_token") {
        let presented = form.get("refresh_token").cloned().unwrap_or_default();
        st.refresh_presented.lock().unwrap().push(presented);
    }
    let grant = match result {
        Ok(grant) => grant,
        Err(e) => {
            if e == GrantError::RefreshTokenSpent {
                st.spent_presented.fetch_add(1, Ordering::SeqCst);
            }
            return e.response().map(Either::Left);
        }
    };
    if late {
        st.late_renewals.fetch_add(1, Ordering::SeqCst);
    }
    if let Some(rt) = &grant.refresh_token {
        st.answered_refresh_tokens
            .lock()
            .unwrap()
            .push((grant.grant_type.clone(), rt.clone()));
    }
    let advertised = st.advertised_expires_in.lock().unwrap().clone();
    let spoil = {
        let mut spoil = st.spoil.lock().unwrap();
        match spoil.take() {
            Some((s, true)) => Some(s),
            Some((s, false)) => {
                *spoil = Some((s.clone(), false));
                Some(s)
            }
            None => None,
        }
    };
    let text = answer_text(grant.fields(), advertised, spoil.as_ref());
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(text))));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// A 2xx token answer's text from the shared stand-in's fields (the
/// refresh token first), `expires_in` as advertised, spoiled if asked.
fn answer_text(
    mut fields: Vec<(&'static str, Value)>,
    advertised: Option<Value>,
    spoil: Option<&Spoil>,
) -> String {
    let refresh = fields.first().is_some_and(|(k, _)| *k == "refresh_token");
    if let Some(Spoil::Padded(n)) = spoil {
        fields.insert(usize::from(refresh), ("padding", json!("x".repeat(*n))));
    }
    for (key, value) in &mut fields {
        let text = value.as_str().unwrap_or("").to_owned();
        *value = match (*key, spoil) {
            ("access_token", Some(Spoil::EmptyAccessToken)) => json!(""),
            ("access_token", Some(Spoil::NonPrintableAccessToken)) => {
                json!(format!("{text}\u{1}x"))
            }
            ("access_token", Some(Spoil::NumericAccessToken(n))) => json!(n),
            ("access_token", Some(Spoil::LongAccessToken)) => {
                json!(format!("{text}{}", "a".repeat(20 * 1024)))
            }
            ("token_type", Some(Spoil::TokenTypeMac)) => json!("mac"),
            ("expires_in", Some(Spoil::ExpiresInString)) => json!("900"),
            ("expires_in", Some(Spoil::ExpiresInNegative)) => json!(-5),
            ("expires_in", Some(Spoil::ExpiresInFraction)) => json!(899.5),
            ("expires_in", _) if advertised.is_some() => advertised.clone().unwrap(),
            _ => continue,
        };
    }
    let parts: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", json!(k)))
        .collect();
    if spoil == Some(&Spoil::BrokenAfterRefreshToken) {
        // Cut inside the field after the refresh token (or the first one).
        let keep = usize::from(refresh);
        let mut text = format!("{{{}", parts[..keep].join(","));
        if keep > 0 {
            text.push(',');
        }
        text.push_str(&parts[keep][..parts[keep].len() / 2]);
        return text;
    }
    format!("{{{}}}", parts.join(","))
}

/// Counts a call of the token's client against the limit: `Some(429)`
/// when it is over (and then it is not counted).
fn over_limit(st: &State, token: Option<&str>) -> Option<Response<Body>> {
    let limit = st.limit?;
    let client = st.ledger.lock().unwrap().check(token).ok()?.to_owned();
    let now = Instant::now();
    let mut calls = st.calls.lock().unwrap();
    let window = calls.entry(client).or_default();
    while window
        .front()
        .is_some_and(|&at| now.duration_since(at) >= limit.window)
    {
        window.pop_front();
    }
    if window.len() < limit.calls {
        window.push_back(now);
        return None;
    }
    st.rate_limited.fetch_add(1, Ordering::SeqCst);
    let free_at = window[0] + limit.window;
    let reset = SystemTime::now() + free_at.saturating_duration_since(now);
    let reset = reset
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        .ceil() as u64;
    let mut r = json_body(
        StatusCode::TOO_MANY_REQUESTS,
        json!({"errors": [{"type": "rate-limit", "code": "rate-limit-exceeded", "title": "Too many requests"}]}),
    );
    let h = r.headers_mut();
    h.insert("x-ratelimit-limit", limit.calls.into());
    h.insert("x-ratelimit-remaining", 0.into());
    h.insert("x-ratelimit-reset", reset.into());
    h.insert("date", http_date(SystemTime::now()).parse().unwrap());
    Some(r)
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110's IMF-fixdate).
fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!(
        "{weekday}, {day:02} {month} {year} {:02}:{:02}:{:02} GMT",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

async fn api(st: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let arrived = Instant::now();
    st.api_arrivals.send_modify(|c| *c += 1);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers: HashMap<String, String> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("?").to_owned()))
        .collect();
    let token = headers
        .get("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::to_owned);
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let param = |name: &str| -> Option<u64> {
        url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse().ok())
    };

    let verdict = match st.ledger.lock().unwrap().check(token.as_deref()) {
        Err(Refusal::Expired) => {
            st.expired_presented.fetch_add(1, Ordering::SeqCst);
            Some(Refusal::Expired)
        }
        Err(refusal) => Some(refusal),
        Ok(_) if st.always_401.load(Ordering::SeqCst) || path == "/always-401" => {
            Some(Refusal::Invalid)
        }
        Ok(_) => None,
    };
    let limited = match verdict {
        None => over_limit(&st, token.as_deref()),
        Some(_) => None,
    };
    let mut resp = match verdict {
        _ if limited.is_some() => limited.unwrap(),
        Some(refusal) if st.stall_401_bodies.load(Ordering::SeqCst) => {
            let mut r = Response::new(Either::Right(StreamBody::new(
                tokio_stream::Chunks::stalling(refusal.code()),
            )));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r
        }
        Some(refusal) => refusal.response(&path).map(Either::Left),
        None => match path.as_str() {
            "/forbidden" => sandbox::criteo_error(
                StatusCode::FORBIDDEN,
                "authorization",
                "forbidden",
                &path,
                "app access revoked",
                "the app's access to this account was withdrawn",
            )
            .map(Either::Left),
            "/slow" => {
                tokio::time::sleep(Duration::from_millis(param("ms").unwrap_or(1000))).await;
                json_body(StatusCode::OK, json!({"slow": true}))
            }
            // Answered only after `FakeCriteo::release`.
            "/hold" => {
                st.release.notified().await;
                json_body(
                    StatusCode::OK,
                    json!({"held": true, "body_len": body.len()}),
                )
            }
            "/big" | "/gated" => {
                let total = param("bytes").unwrap_or(8 << 20) as usize;
                let gate = (path == "/gated").then(|| Arc::clone(&st));
                let mut r = Response::new(Either::Right(StreamBody::new(
                    tokio_stream::Chunks::new(total, gate),
                )));
                r.headers_mut()
                    .insert("content-type", "application/octet-stream".parse().unwrap());
                r
            }
            _ => {
                let status = param("status")
                    .and_then(|s| StatusCode::from_u16(s as u16).ok())
                    .unwrap_or(StatusCode::OK);
                let mut r = json_body(
                    status,
                    json!({
                        "method": parts.method.as_str(),
                        "version": format!("{:?}", parts.version),
                        "path": path,
                        "query": query,
                        "headers": headers,
                        "body": String::from_utf8_lossy(&body),
                        "body_len": body.len(),
                    }),
                );
                r.headers_mut()
                    .insert("x-fake-criteo", "echo".parse().unwrap());
                // `?proxy_error=1`: a header that only the proxy may send.
                if param("proxy_error") == Some(1) {
                    r.headers_mut()
                        .insert("x-criteo-proxy-error", "upstream_timeout".parse().unwrap());
                }
                r
            }
        },
    };
    // `?close=1`: answer, then close the connection (as a load balancer
    // retiring a keep-alive connection does).
    if param("close") == Some(1) {
        resp.headers_mut()
            .insert("connection", "close".parse().unwrap());
    }
    st.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path,
        query,
        headers,
        body,
        status: resp.status().as_u16(),
        peer: parts.extensions.get::<Peer>().expect("peer recorded").0,
        arrived,
    });
    st.api_requests.send_modify(|c| *c += 1);
    resp.headers_mut()
        .insert("x-ratelimit-remaining", "249".parse().unwrap());
    resp
}

/// A minimal stream of body chunks, written here to avoid a dependency.
pub mod tokio_stream {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use hyper::body::Frame;
    use std::convert::Infallible;
    use std::future::Future;

    const CHUNK: usize = 64 * 1024;

    /// `total` bytes of a repeating pattern; with a gate, the first chunk
    /// goes at once and the rest only after `FakeCriteo::release`.
    pub struct Chunks {
        left: usize,
        sent: usize,
        /// Sent first instead of the pattern.
        first: Option<Bytes>,
        gate: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    }

    impl Chunks {
        /// The start of a Criteo 401 body, then nothing, ever.
        pub fn stalling(code: &str) -> Self {
            let start = format!("{{\"errors\":[{{\"code\":\"{code}\"");
            Self {
                left: usize::MAX,
                sent: 0,
                first: Some(Bytes::from(start)),
                gate: Some(Box::pin(std::future::pending())),
            }
        }

        pub fn new(total: usize, gate: Option<Arc<super::State>>) -> Self {
            Self {
                left: total,
                sent: 0,
                first: None,
                gate: gate.map(|st| {
                    Box::pin(async move { st.release.notified().await })
                        as Pin<Box<dyn Future<Output = ()> + Send>>
                }),
            }
        }
    }

    impl futures_core::Stream for Chunks {
        type Item = Result<Frame<Bytes>, Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            if let Some(first) = self.first.take() {
                self.sent += first.len();
                return Poll::Ready(Some(Ok(Frame::data(first))));
            }
            if self.sent > 0
                && let Some(g) = self.gate.as_mut()
            {
                match g.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => self.gate = None,
                }
            }
            let n = self.left.min(CHUNK);
            let start = self.sent;
            let chunk: Vec<u8> = (start..start + n).map(|i| (i % 251) as u8).collect();
            self.left -= n;
            self.sent += n;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
        }
    }
}

/// The byte at offset `i` of a `/big` or `/gated` body.
pub fn pattern_byte(i: usize) -> u8 {
    (i % 251) as u8
}
