//! criteo-token-proxy: plain HTTP in, `Authorization: Bearer …` added,
//! forwarded to the Criteo API. Tokens come from a lock-free per-tenant
//! cache ([`TokenCell`]) that a background task per tenant renews before
//! expiry; an upstream 401 retires the token and the request is replayed
//! once with a fresh one.
//!
//! The public API is small on purpose: the binary's commands ([`cli`]),
//! [`App::run`], which takes its listeners and a shutdown future (so
//! embedders and tests bind their own sockets), and what tests and
//! benchmarks look at (the tenants and their token cells, consent states,
//! the stand-in for Criteo that `--dev` and the tests share). Everything
//! else is `pub(crate)`.

pub mod cli;

pub(crate) mod admin;
pub(crate) mod config;
pub(crate) mod dev;
pub(crate) mod error;
pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod oauth;
pub(crate) mod pacing;
pub(crate) mod proxy;
pub(crate) mod server;
pub(crate) mod store;
pub(crate) mod tenant;
pub(crate) mod token;
pub(crate) mod upstream;

pub use config::{Config, ConfigError};
pub use metrics::Metrics;
pub use oauth::Granted;
pub use server::{App, Listeners, StartError};
pub use tenant::{Tenant, Tenants};
pub use token::{Newer, State, Token, TokenCell};

/// The core of a stand-in for Criteo (tokens issued, rotated and checked;
/// the token endpoint's grants; Criteo's error shapes), shared by `--dev`
/// and the tests' fake so that the two cannot drift apart. Not a stable
/// API: it exists for the tests.
#[doc(hidden)]
pub mod sandbox {
    pub use crate::dev::errors::{GrantError, Refusal, criteo_error, oauth_error};
    pub use crate::dev::tokens::{Grant, Ledger, form_encoded};
}

/// The token stores filled with many tenants and rotated one tenant at a
/// time, for `benches/store_rotation.rs`. Not a stable API: it exists for
/// the benchmark.
#[doc(hidden)]
pub mod bench_support {
    pub use crate::store::bench::{Filled, json, sqlite};
}

/// Consent states, as the admin listener issues and checks them.
pub mod consent {
    pub use crate::oauth::consent::{STATE_TTL, issue_state};
}
