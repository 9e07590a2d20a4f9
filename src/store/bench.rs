//! What `benches/store_rotation.rs` needs of the stores, and nothing more:
//! a store at a path filled with many tenants at once (one transaction,
//! one file write: filling 100,000 tenants through 100,000 durable puts
//! would take minutes), and one rotation as the refreshers make it (read
//! the generation, write the next token conditional on it). Not a stable
//! API: it exists for the benchmark.

use std::path::Path;
use std::sync::Arc;

use rusqlite::{Connection, params};
use secrecy::SecretString;

use super::format::StoreFile;
use super::{FileStore, Generation, Key, Put, TokenStore, disk, sqlite};

/// A store holding tenants `tenant-0` … `tenant-<n-1>`.
#[derive(Debug)]
pub struct Filled {
    store: Arc<dyn TokenStore>,
    tenants: usize,
}

/// A refresh token of a realistic length (Criteo's are a few hundred bytes).
fn token(tenant: usize, n: u64) -> String {
    format!("rt-{tenant}-{n}-{}", "x".repeat(200))
}

fn name(tenant: usize) -> String {
    format!("tenant-{tenant}")
}

/// The embedded store (SQLite, as `store.path` opens it: WAL,
/// `synchronous=FULL`) at `path`, which must not exist, with `tenants`
/// tenants written in one transaction.
pub fn sqlite(path: &Path, tenants: usize) -> Filled {
    let mut conn = Connection::open(path).unwrap();
    conn.execute_batch(sqlite::SCHEMA).unwrap();
    conn.pragma_update(None, "user_version", sqlite::SCHEMA_VERSION)
        .unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO tenants (name, client_id, refresh_token, rejected, generation, updated_at)
                 VALUES (?1, 'bench-app', ?2, 0, 1, ?3)",
            )
            .unwrap();
        for t in 0..tenants {
            insert
                .execute(params![name(t), token(t, 0), sqlite::now()])
                .unwrap();
        }
    }
    tx.commit().unwrap();
    drop(conn);
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    Filled {
        store: super::open(path).unwrap(),
        tenants,
    }
}

/// The JSON store of earlier releases (rewritten whole, synced and renamed
/// on every change) at `path`, with `tenants` tenants.
pub fn json(path: &Path, tenants: usize) -> Filled {
    let mut file = StoreFile::empty();
    for t in 0..tenants {
        file.set(&name(t), &token(t, 0), false);
    }
    disk::write_atomically(path, &serde_json::to_vec_pretty(&file).unwrap()).unwrap();
    Filled {
        store: Arc::new(FileStore::open(path).unwrap()),
        tenants,
    }
}

impl Filled {
    pub fn tenants(&self) -> usize {
        self.tenants
    }

    /// Rotates `tenant`'s refresh token to its `n`th one, as a refresher
    /// does: the write is conditional on the generation read, and returns
    /// once it is durable.
    pub async fn rotate(&self, tenant: usize, n: u64) {
        let name = name(tenant);
        let key = Key {
            name: &name,
            client_id: "bench-app",
        };
        let read = self.store.get(key).await.unwrap();
        let expected = read.map_or(Generation::NONE, |r| r.generation);
        let refresh_token = SecretString::from(token(tenant, n));
        let put = Put {
            refresh_token: &refresh_token,
            rejected: false,
            adopt_seed: false,
            access: None,
        };
        self.store.put(key, expected, put).await.unwrap();
    }
}
