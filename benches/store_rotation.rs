//! What one rotation costs the embedded store as the tenants grow: a
//! refresh token written for a random tenant, conditional on the generation
//! read, durable when it returns (SQLite with `synchronous=FULL`, as in
//! production). Flat is the goal: one row is written whatever the count.
//! The JSON store of earlier releases, rewritten whole on every rotation,
//! is measured in the same run for comparison.
//!
//! The stores live under `target/tmp` (a real disk, not a tmpfs): an fsync
//! there costs what it costs, and on a VM it is most of a rotation.

use std::time::{Duration, Instant};

use criteo_token_proxy::bench_support::{self, Filled};
use criterion::{BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};

fn folder() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn bench(
    c: &mut Criterion,
    store: &str,
    counts: &[usize],
    fill: fn(&std::path::Path, usize) -> Filled,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("rotation");
    // Milliseconds per iteration: few, equal samples.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    for &n in counts {
        let dir = folder();
        let started = Instant::now();
        let filled = fill(&dir.path().join("tokens"), n);
        eprintln!("{store}: {n} tenants filled in {:?}", started.elapsed());
        let mut rotation = 0u64;
        group.bench_with_input(BenchmarkId::new(store, n), &filled, |b, filled| {
            b.to_async(&rt).iter(|| {
                rotation += 1;
                let tenant = rand::random_range(0..filled.tenants());
                filled.rotate(tenant, rotation)
            });
        });
    }
    group.finish();
}

fn sqlite(c: &mut Criterion) {
    bench(c, "sqlite", &[10, 1_000, 100_000], bench_support::sqlite);
}

fn json(c: &mut Criterion) {
    bench(c, "json", &[10, 1_000, 10_000], bench_support::json);
}

criterion_group!(benches, sqlite, json);
criterion_main!(benches);
