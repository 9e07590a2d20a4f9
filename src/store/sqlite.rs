//! The embedded store: a SQLite database at `store.path`, one row per
//! tenant, so that a rotation costs one small transaction whatever the
//! number of tenants (the JSON file was rewritten whole on every one).
//!
//! Durable on commit (`journal_mode=WAL`, `synchronous=FULL`), mode 0600,
//! and held by one process at a time through the same lock file as the
//! JSON store. Every call runs on the blocking pool: SQLite's fsyncs never
//! stall the async runtime. A JSON store of earlier releases found at
//! `store.path` is imported once (`import.rs`).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use secrecy::{ExposeSecret, SecretString};

use super::contract::{self, BoxFuture, Changes, Key, Lease, Listed};
use super::{Generation, Put, PutError, Record, StoreError, TokenStore, disk, format};

/// The first bytes of every SQLite database file.
pub(super) const MAGIC: &[u8] = b"SQLite format 3\0";

/// The schema this release writes (`PRAGMA user_version`).
pub(super) const SCHEMA_VERSION: i64 = 1;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tenants (
    name          TEXT PRIMARY KEY NOT NULL,
    client_id     TEXT NOT NULL DEFAULT '',
    refresh_token TEXT NOT NULL,
    rejected      INTEGER NOT NULL,
    generation    INTEGER NOT NULL,
    updated_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS presented_seeds (
    hash TEXT PRIMARY KEY NOT NULL
);
";

pub(crate) struct SqliteStore {
    /// The database file, every symbolic link resolved.
    path: PathBuf,
    /// Device and inode of the file opened: a put refuses to write into a
    /// file that is no longer at `store.path` (moved or replaced), where
    /// the next start would not find the token.
    identity: (u64, u64),
    conn: Arc<Mutex<Connection>>,
    /// What the database holds, read at open and updated after each
    /// commit: the lock file makes this process its only writer, so reads
    /// are answered at once, without a trip to the blocking pool (a
    /// tenant's first read decides its state at start).
    cache: Mutex<Cache>,
    leases: contract::Leases,
    _lock: File,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
pub(super) struct Cache {
    /// By name, with the `client_id` last written.
    pub(super) tenants: HashMap<String, (String, Record)>,
    /// SHA-256 (hex) of every seed presented.
    pub(super) seeds: HashSet<String>,
}

/// What is at `store.path`.
pub(super) enum Found {
    /// Nothing, or an empty file: a new database.
    Nothing,
    Database,
    /// Anything else: a JSON store of an earlier release, or not a store.
    Other,
}

/// Peeks at the first bytes of `path`, never through a link.
pub(super) fn found(path: &Path) -> Result<Found, StoreError> {
    match disk::read_head(path, MAGIC.len()) {
        Ok(None) => Ok(Found::Nothing),
        Ok(Some(head)) if head.is_empty() => Ok(Found::Nothing),
        Ok(Some(head)) if head == MAGIC => Ok(Found::Database),
        Ok(Some(_)) => Ok(Found::Other),
        Err(e) if disk::is_link_error(&e) => Err(StoreError::Link {
            path: path.to_owned(),
        }),
        Err(source) => Err(StoreError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

impl SqliteStore {
    /// Opens the database at `path` (resolved, its folder checked, its lock
    /// file held), creating it if there is none. A file that is not a
    /// database of this store is refused and left untouched.
    pub(super) fn open_locked(path: PathBuf, lock: File) -> Result<Self, StoreError> {
        let corrupt = |reason: String| StoreError::NotADatabase {
            path: path.clone(),
            reason,
        };
        create_private(&path).map_err(|source| StoreError::Read {
            path: path.clone(),
            source,
        })?;
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .map_err(|e| corrupt(e.to_string()))?;
        // Checked before anything is written: a damaged file stays as it is.
        check(&conn).map_err(corrupt)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;",
        )
        .and_then(|()| conn.execute_batch(SCHEMA))
        .and_then(|()| conn.pragma_update(None, "user_version", SCHEMA_VERSION))
        .map_err(|e| StoreError::Read {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        let cache = load(&conn).map_err(|e| corrupt(e.to_string()))?;
        let meta = fs::metadata(&path).map_err(|source| StoreError::Read {
            path: path.clone(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "token store was readable by others; setting mode 0600");
            let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o600));
        }
        Ok(Self {
            identity: (meta.dev(), meta.ino()),
            path,
            conn: Arc::new(Mutex::new(conn)),
            cache: Mutex::new(cache),
            leases: contract::Leases::default(),
            _lock: lock,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the connection on the blocking pool.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, PutError> + Send + 'static,
    ) -> Result<T, PutError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|e| PutError::Io(io::Error::other(e)))?
    }

    /// Refuses to write when `store.path` is no longer the file opened.
    fn still_in_place(&self) -> io::Result<()> {
        let meta = fs::metadata(&self.path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("store.path: {}: {e}", self.path.display()),
            )
        })?;
        if (meta.dev(), meta.ino()) != self.identity {
            return Err(io::Error::other(format!(
                "store.path: {} was moved or replaced while the proxy ran; nothing is written into a file the next start would not read",
                self.path.display()
            )));
        }
        Ok(())
    }
}

/// Creates the database file if there is none: private from the first
/// byte, never through a link.
fn create_private(path: &Path) -> io::Result<()> {
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(_) => disk::sync_folder(disk::parent(path)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether the database is whole and, if it has tables, this store's.
pub(super) fn check(conn: &Connection) -> Result<(), String> {
    let verdict: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if verdict != "ok" {
        return Err(verdict);
    }
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| e.to_string())?;
    if !tables.is_empty() && !tables.iter().any(|t| t == "tenants") {
        return Err(format!("a database of something else (tables: {tables:?})"));
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if version > SCHEMA_VERSION {
        return Err(format!(
            "written by a newer release (schema {version}; this one knows {SCHEMA_VERSION})"
        ));
    }
    Ok(())
}

/// Every row, for the cache.
pub(super) fn load(conn: &Connection) -> rusqlite::Result<Cache> {
    let mut cache = Cache::default();
    let mut rows =
        conn.prepare("SELECT name, client_id, refresh_token, rejected, generation FROM tenants")?;
    for row in rows.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            Record {
                refresh_token: SecretString::from(r.get::<_, String>(2)?),
                rejected: r.get(3)?,
                generation: Generation(r.get::<_, i64>(4)?.unsigned_abs()),
                access: None,
            },
        ))
    })? {
        let (name, client_id, record) = row?;
        cache.tenants.insert(name, (client_id, record));
    }
    let mut seeds = conn.prepare("SELECT hash FROM presented_seeds")?;
    for hash in seeds.query_map([], |r| r.get::<_, String>(0))? {
        cache.seeds.insert(hash?);
    }
    Ok(cache)
}

pub(super) fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn sql(e: rusqlite::Error) -> PutError {
    PutError::Io(io::Error::other(e))
}

/// The tenant's generation in `tx` (`NONE`: no row).
fn generation(conn: &Connection, tenant: &str) -> rusqlite::Result<Generation> {
    conn.query_row(
        "SELECT generation FROM tenants WHERE name = ?1",
        [tenant],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|g| Generation(g.map_or(0, |g| g.unsigned_abs())))
}

// === impl SqliteStore ===

impl TokenStore for SqliteStore {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn get<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, io::Result<Option<Record>>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let record = cache.tenants.get(key.name).map(|(_, r)| r.clone());
        Box::pin(std::future::ready(Ok(record)))
    }

    fn put<'a>(
        &'a self,
        key: Key<'a>,
        expected: Generation,
        put: Put<'a>,
    ) -> BoxFuture<'a, Result<Generation, PutError>> {
        let name = key.name.to_owned();
        let client_id = key.client_id.to_owned();
        let token = put.refresh_token.expose_secret().to_owned();
        let (rejected, adopt_seed) = (put.rejected, put.adopt_seed);
        Box::pin(async move {
            self.still_in_place()?;
            let (tenant, client) = (name.clone(), client_id.clone());
            let generation = self
                .call(move |conn| {
                    let tx = conn
                        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                        .map_err(sql)?;
                    let next = i64::try_from(expected.0)
                        .ok()
                        .and_then(|g| g.checked_add(1))
                        .ok_or_else(|| io::Error::other("the generation counter overflowed"))?;
                    let changed = if expected == Generation::NONE {
                        tx.execute(
                        "INSERT INTO tenants (name, refresh_token, rejected, generation, updated_at, client_id)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (name) DO NOTHING",
                        params![tenant, token, rejected, next, now(), client],
                    )
                    } else {
                        tx.execute(
                            "UPDATE tenants SET refresh_token = ?2, rejected = ?3, generation = ?4,
                         updated_at = ?5, client_id = ?7 WHERE name = ?1 AND generation = ?6",
                            params![tenant, token, rejected, next, now(), next - 1, client],
                        )
                    }
                    .map_err(sql)?;
                    if changed == 0 {
                        let current = generation(&tx, &tenant).map_err(sql)?;
                        return Err(PutError::Stale { expected, current });
                    }
                    if adopt_seed {
                        tx.execute(
                            "INSERT OR IGNORE INTO presented_seeds (hash) VALUES (?1)",
                            [format::seed_hash(&token)],
                        )
                        .map_err(sql)?;
                    }
                    tx.commit().map_err(sql)?;
                    Ok(Generation(next.unsigned_abs()))
                })
                .await?;
            // Only once committed: a failed write leaves the old record.
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.tenants.insert(
                name,
                (
                    client_id,
                    Record {
                        refresh_token: put.refresh_token.clone(),
                        rejected,
                        generation,
                        access: None,
                    },
                ),
            );
            if adopt_seed {
                cache
                    .seeds
                    .insert(format::seed_hash(put.refresh_token.expose_secret()));
            }
            Ok(generation)
        })
    }

    fn seed_presented<'a>(&'a self, seed: &'a SecretString) -> BoxFuture<'a, io::Result<bool>> {
        let hash = format::seed_hash(seed.expose_secret());
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        Box::pin(std::future::ready(Ok(cache.seeds.contains(&hash))))
    }

    fn lease<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, io::Result<Lease>> {
        Box::pin(async move { Ok(self.leases.take(key.name).await) })
    }

    /// Never yields: the lock file keeps every other process out.
    fn changes(&self) -> Changes {
        Changes::never()
    }

    fn all(&self) -> BoxFuture<'_, io::Result<Vec<Listed>>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        Box::pin(std::future::ready(Ok(Listed::all_of(&cache.tenants))))
    }

    fn presented_seeds(&self) -> BoxFuture<'_, io::Result<Vec<String>>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let seeds = cache.seeds.iter().cloned().collect();
        Box::pin(std::future::ready(Ok(seeds)))
    }

    fn add_presented_seeds<'a>(&'a self, hashes: &'a [String]) -> BoxFuture<'a, io::Result<()>> {
        let owned = hashes.to_vec();
        Box::pin(async move {
            self.still_in_place()?;
            self.call(move |conn| {
                let tx = conn.transaction().map_err(sql)?;
                for hash in &owned {
                    tx.execute(
                        "INSERT OR IGNORE INTO presented_seeds (hash) VALUES (?1)",
                        [hash],
                    )
                    .map_err(sql)?;
                }
                tx.commit().map_err(sql)
            })
            .await
            .map_err(|e| match e {
                PutError::Io(e) => e,
                other => io::Error::other(other),
            })?;
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.seeds.extend(hashes.iter().cloned());
            Ok(())
        })
    }
}
