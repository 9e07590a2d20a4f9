//! With the shared store (PostgreSQL): how long after one replica rotates a
//! tenant's refresh token the other replica has the new access token in
//! service (the issue's target: under 100 ms on loopback).
//!
//! Two real proxies on one real PostgreSQL (started here, as the tests
//! do), the in-process stand-in for Criteo issuing 2 s tokens: every
//! rotation, by whichever replica, is timed from the rotating replica's
//! "access token obtained" log line to the other's "access token taken
//! from the shared store", both stamped by the same clock.
//!
//!     cargo bench --bench propagation

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, SystemTime};

use serde_json::Value;
use support::FakeCriteo;
use support::postgres::Postgres;
use support::process::{Running, write};

const ID: &str = "acme-id";
const SECRET: &str = "acme-secret";
const RUN: Duration = Duration::from_secs(30);

fn config(fake: &FakeCriteo, db: &Postgres, seed: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
default_tenant = "acme"

[upstream]
url = "{url}"
token_url = "{token_url}"

[refresh]
min_token_lifetime = "1s"

[store]
url = "{db}"

[tenants.acme]
grant = "refresh_token"
client_id = "{ID}"
client_secret = "{SECRET}"
redirect_uri = "http://127.0.0.1:9/oauth/callback"
refresh_token = "{seed}"
"#,
        url = fake.url(),
        token_url = fake.token_url(),
        db = db.url(),
    )
}

/// (time, message) of each log line of interest.
fn events(replica: &Running) -> Vec<(SystemTime, String)> {
    replica
        .all_logs()
        .lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            let msg = v["fields"]["message"].as_str()?.to_owned();
            let at = humantime::parse_rfc3339(v["timestamp"].as_str()?).ok()?;
            Some((at, msg))
        })
        .collect()
}

const OBTAINED: &str = "access token obtained";
const ADOPTED: &str = "access token taken from the shared store";

#[tokio::main]
async fn main() {
    let Some(db) = Postgres::start() else {
        eprintln!("propagation: SKIPPED, no PostgreSQL");
        return;
    };
    let fake = FakeCriteo::builder()
        .client(ID, SECRET)
        .expires_in(Duration::from_secs(2))
        .start()
        .await;
    let seed = fake.issue_refresh_token(ID);
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "proxy.toml", &config(&fake, &db, &seed));
    let log = "info,criteo_token_proxy::token=debug";
    let mut a = Running::start(&path, log).await;
    let b = Running::start(&path, log).await;
    a.wait_for_message(OBTAINED).await;
    tokio::time::sleep(RUN).await;

    let (ea, eb) = (events(&a), events(&b));
    let mut lags = Vec::new();
    for (mine, theirs) in [(&ea, &eb), (&eb, &ea)] {
        for (at, _) in mine.iter().filter(|(_, m)| m == OBTAINED) {
            // The other replica's first adoption after this rotation.
            if let Some((seen, _)) = theirs
                .iter()
                .filter(|(t, m)| m == ADOPTED && t >= at)
                .min_by_key(|(t, _)| *t)
            {
                let lag = seen.duration_since(*at).unwrap();
                if lag < Duration::from_secs(1) {
                    lags.push(lag);
                }
            }
        }
    }
    lags.sort();
    let rotations = fake
        .token_forms()
        .iter()
        .filter(|f| f["grant_type"] == "refresh_token")
        .count();
    if lags.is_empty() {
        eprintln!("propagation: no rotation was seen on the other replica");
        std::process::exit(1);
    }
    let pct = |p: f64| lags[((lags.len() - 1) as f64 * p).round() as usize];
    println!(
        "propagation (rotation on one replica → new token in service on the other), {} rotations in {:?}, {} timed:",
        rotations,
        RUN,
        lags.len()
    );
    println!(
        "  median {:.1} ms   p90 {:.1} ms   max {:.1} ms",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.9).as_secs_f64() * 1e3,
        lags.last().unwrap().as_secs_f64() * 1e3
    );
    println!(
        "  spent refresh tokens presented: {}",
        fake.spent_presented()
    );
}
