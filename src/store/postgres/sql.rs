//! The statements of the store's operations and the rows they read.

use std::time::{Duration, SystemTime};

use secrecy::SecretString;

use crate::store::Record;
use crate::store::contract::{Access, Generation};

/// An error with its causes ("error performing TLS handshake: invalid
/// peer certificate: UnknownIssuer"): `tokio-postgres` shows only the
/// first.
pub(crate) fn full(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

pub(super) fn generation(g: i64) -> Generation {
    Generation(g.unsigned_abs())
}

pub(super) const COLUMNS: &str =
    "refresh_token, rejected, generation, access_token, access_requested_at, access_lifetime_ms";

/// A record from a row of [`COLUMNS`] (from column `at` on).
pub(super) fn record(row: &tokio_postgres::Row, at: usize) -> Record {
    let access = match (
        row.get::<_, Option<String>>(at + 3),
        row.get::<_, Option<SystemTime>>(at + 4),
        row.get::<_, Option<i64>>(at + 5),
    ) {
        (Some(token), Some(requested_at), Some(ms)) => Some(Access {
            token: SecretString::from(token),
            requested_at,
            lifetime: Duration::from_millis(ms.unsigned_abs()),
        }),
        _ => None,
    };
    Record {
        refresh_token: SecretString::from(row.get::<_, String>(at)),
        rejected: row.get(at + 1),
        generation: generation(row.get(at + 2)),
        access,
    }
}

/// The conditional write: `$5` is the generation read; a rotation also
/// takes over a rejection written against it (see `TokenStore::put`).
/// The seed's hash (`$9`, when adopted) is recorded in the same statement.
pub(super) const UPDATE: &str = "
WITH w AS (
    UPDATE criteo_proxy_tenants SET
        refresh_token = $3, rejected = $4,
        rejected_from = CASE WHEN $4 THEN $5::bigint END,
        generation = nextval('criteo_proxy_generation'),
        access_token = $6, access_requested_at = $7, access_lifetime_ms = $8,
        updated_at = now()
    WHERE name = $1 AND client_id = $2
      AND (generation = $5 OR (NOT $4 AND rejected AND rejected_from = $5))
    RETURNING generation
), s AS (
    INSERT INTO criteo_proxy_presented_seeds (hash)
    SELECT $9::text FROM w WHERE $9::text IS NOT NULL
    ON CONFLICT DO NOTHING
)
SELECT generation FROM w";

/// The first write of a tenant (`$5` is `Generation::NONE`).
pub(super) const INSERT: &str = "
WITH w AS (
    INSERT INTO criteo_proxy_tenants (name, client_id, refresh_token, rejected, rejected_from,
        generation, access_token, access_requested_at, access_lifetime_ms, updated_at)
    VALUES ($1, $2, $3, $4, CASE WHEN $4 THEN $5::bigint END,
        nextval('criteo_proxy_generation'), $6, $7, $8, now())
    ON CONFLICT (name, client_id) DO NOTHING
    RETURNING generation
), s AS (
    INSERT INTO criteo_proxy_presented_seeds (hash)
    SELECT $9::text FROM w WHERE $9::text IS NOT NULL
    ON CONFLICT DO NOTHING
)
SELECT generation FROM w";
