//! Token injection and tenant lookup, the per-request work the proxy adds.
//!
//! Injection is measured against two baselines in the same run:
//! - `static_header`: inserting a pre-built `HeaderValue` (the floor: what
//!   nginx with a fixed `Authorization` header does);
//! - `rwlock_cache`: the same token cache built on `RwLock<Arc<Token>>`;
//! - `plain_arc`: the token read from an `Arc` that never changes (not a
//!   cache at all), to tell arc-swap's cost from the token's own.
//!
//! Each is run on 1, 2 and 4 threads hammering the same tenant; the time
//! reported is per injection per thread, so a flat line means no
//! contention. The machine has 2 cores: with 4 threads every variant pays
//! for time-sharing alike; compare variants, not thread counts.

use std::hint::black_box;
use std::sync::{Arc, Barrier, RwLock};
use std::time::{Duration, Instant};

use criteo_token_proxy::{Config, Granted, Metrics, Tenants, Token, TokenCell};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, USER_AGENT};

/// Criteo's access tokens are JWTs of about 900 characters.
fn granted() -> Granted {
    Granted {
        access_token: "eyJhbGciOiJSUzI1NiJ9.".repeat(40).into(),
        expires_in: Duration::from_secs(900),
    }
}

fn token() -> Token {
    Token::new(&granted(), Instant::now(), 0.8, 1).unwrap()
}

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(ACCEPT, HeaderValue::from_static("application/json"));
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(USER_AGENT, HeaderValue::from_static("python-requests/2.32"));
    h.insert(
        "x-request-id",
        HeaderValue::from_static("0f8fad5b-d9cb-469f"),
    );
    h
}

trait Inject: Send + Sync + 'static {
    fn inject(&self, headers: &mut HeaderMap);
}

/// The floor: a header value built once, cloned (a refcount) per request.
struct Static(HeaderValue);
impl Inject for Static {
    #[inline]
    fn inject(&self, headers: &mut HeaderMap) {
        headers.insert(AUTHORIZATION, self.0.clone());
    }
}

/// What the proxy does: an `ArcSwap` load, a validity check, a refcount.
struct Cell(TokenCell);
impl Inject for Cell {
    #[inline]
    fn inject(&self, headers: &mut HeaderMap) {
        self.0.inject(headers).expect("a token is cached");
    }
}

/// The lock-based alternative.
/// The token read straight from an `Arc` that never changes: what the
/// cell costs without arc-swap's protection (which a swapped token needs).
/// Shown only to split the cell's cost into arc-swap's and the token's.
struct Plain(Arc<Token>);
impl Inject for Plain {
    #[inline]
    fn inject(&self, headers: &mut HeaderMap) {
        assert!(self.0.is_usable_now());
        headers.insert(AUTHORIZATION, self.0.header().clone());
    }
}

struct Locked(RwLock<Arc<Token>>);
impl Inject for Locked {
    #[inline]
    fn inject(&self, headers: &mut HeaderMap) {
        let t = Arc::clone(&self.0.read().unwrap());
        assert!(t.is_usable_now());
        headers.insert(AUTHORIZATION, t.header().clone());
    }
}

/// Runs `iters` injections on each of `threads` threads at once and
/// returns the wall time, i.e. the time per injection per thread.
fn hammer(inj: &Arc<dyn Inject>, threads: usize, iters: u64) -> Duration {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let inj = Arc::clone(inj);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut headers = request_headers();
                barrier.wait();
                for _ in 0..iters {
                    inj.inject(black_box(&mut headers));
                }
                black_box(headers);
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    start.elapsed()
}

fn injection(c: &mut Criterion) {
    let cell = TokenCell::default();
    cell.install(token());
    let variants: Vec<(&str, Arc<dyn Inject>)> = vec![
        ("static_header", Arc::new(Static(token().header().clone()))),
        ("arc_swap_cell", Arc::new(Cell(cell))),
        ("plain_arc", Arc::new(Plain(Arc::new(token())))),
        (
            "rwlock_cache",
            Arc::new(Locked(RwLock::new(Arc::new(token())))),
        ),
    ];
    let mut group = c.benchmark_group("inject");
    group.measurement_time(Duration::from_secs(3));
    for threads in [1usize, 2, 4] {
        for (name, inj) in &variants {
            group.bench_with_input(BenchmarkId::new(*name, threads), &threads, |b, &t| {
                if t == 1 {
                    let mut headers = request_headers();
                    b.iter(|| inj.inject(black_box(&mut headers)));
                } else {
                    b.iter_custom(|iters| hammer(inj, t, iters));
                }
            });
        }
    }
    group.finish();
}

fn tenant_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("tenant_lookup");
    for n in [1usize, 100, 10_000] {
        let mut toml = String::from("[server]\ndefault_tenant = \"t0\"\n");
        for i in 0..n {
            toml.push_str(&format!(
                "[tenants.t{i}]\ngrant = \"client_credentials\"\nclient_id = \"id{i}\"\nclient_secret = \"s{i}\"\n"
            ));
        }
        let config = Config::from_toml(&toml).unwrap();
        let tenants = Tenants::new(&config, &Metrics::new(prometheus::Registry::new()));
        let name = format!("t{}", n / 2);
        group.bench_with_input(BenchmarkId::from_parameter(n), &name, |b, name| {
            b.iter(|| black_box(tenants.choose(Some(black_box(name.as_str())))).is_some());
        });
    }
    group.finish();
}

criterion_group!(benches, injection, tenant_lookup);
criterion_main!(benches);
