//! criteo-token-proxy: plain HTTP in, `Authorization: Bearer …` added,
//! forwarded to the Criteo API. Tokens come from a lock-free per-tenant
//! cache ([`token::TokenCell`]) that a background task per tenant
//! ([`token::refresher`]) renews before expiry; an upstream 401 retires the
//! token and the request is replayed once with a fresh one.
//!
//! [`run`] takes its listeners and a shutdown future, so embedders and
//! tests bind their own sockets.

pub mod admin;
pub mod config;
pub mod dev;
pub mod error;
pub mod http;
pub mod metrics;
pub mod oauth;
pub mod proxy;
pub mod server;
pub mod store;
pub mod tenant;
pub mod token;
pub mod upstream;

pub use config::{Config, ConfigError};
pub use server::{App, Listeners, run};
