//! A token store file read for `store copy`, without changing it in any
//! way: the source of a copy is an operator's only copy of the tenants'
//! tokens until the copy is proven, so it is neither imported (a JSON
//! store), migrated, made private nor cleaned of a crash's temporary files.
//!
//! Its lock file is held as long as the snapshot lives (the whole copy): a
//! proxy holding it refuses the copy, and a proxy started meanwhile is
//! refused in turn, so no token is rotated between reading and copying.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use secrecy::{ExposeSecret, SecretString};

use super::contract::{BoxFuture, Changes, Key, Lease, Listed};
use super::format::{self, StoreFile};
use super::{Generation, Put, PutError, Record, StoreError, TokenStore, disk, sqlite};

/// Every record of a store file as it was when opened, its lock held.
pub(crate) struct Snapshot {
    path: PathBuf,
    /// By name: the `client_id` recorded (empty in a JSON store) and the record.
    tenants: HashMap<String, (String, Record)>,
    seeds: HashSet<String>,
    _lock: File,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    /// Reads the JSON store of an earlier release at `path`, with what the
    /// temporary files a crash left hold (merged here, in memory, as the
    /// proxy would merge them on its next start).
    pub(crate) fn json(path: &Path) -> Result<Self, StoreError> {
        let (path, lock) = locked(path)?;
        let read_error = |source| StoreError::Read {
            path: path.clone(),
            source,
        };
        let Some((bytes, _)) = disk::read(&path).map_err(read_error)? else {
            return Err(read_error(io::ErrorKind::NotFound.into()));
        };
        let mut data: StoreFile =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                path: path.clone(),
                source,
            })?;
        for tmp in disk::leftovers(&path).map_err(read_error)? {
            // An incomplete one (a write cut short) is no newer state.
            if let Ok(Some((bytes, _))) = disk::read(&tmp)
                && let Ok(copy) = serde_json::from_slice::<StoreFile>(&bytes)
            {
                data.absorb(copy);
            }
        }
        let tenants = data
            .tenants
            .into_iter()
            .map(|(name, e)| {
                let record = Record {
                    refresh_token: SecretString::from(e.refresh_token),
                    rejected: e.rejected,
                    generation: Generation(e.seq),
                    access: None,
                };
                (name, (String::new(), record))
            })
            .collect();
        Ok(Self {
            path,
            tenants,
            seeds: data.presented_seeds.into_iter().collect(),
            _lock: lock,
        })
    }

    /// Reads the SQLite store at `path` through a read-only connection:
    /// nothing is written into it (not even a checkpoint of its log).
    pub(crate) fn sqlite(path: &Path) -> Result<Self, StoreError> {
        let (path, lock) = locked(path)?;
        let corrupt = |reason: String| StoreError::NotADatabase {
            path: path.clone(),
            reason,
        };
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .map_err(|e| corrupt(e.to_string()))?;
        sqlite::check(&conn).map_err(corrupt)?;
        let cache = sqlite::load(&conn).map_err(|e| corrupt(e.to_string()))?;
        drop(conn);
        Ok(Self {
            path,
            tenants: cache.tenants,
            seeds: cache.seeds,
            _lock: lock,
        })
    }
}

/// `path` resolved and its lock file held (see [`super::lock`]).
fn locked(path: &Path) -> Result<(PathBuf, File), StoreError> {
    let resolved = disk::resolve(path).map_err(|source| StoreError::Read {
        path: path.to_owned(),
        source,
    })?;
    let lock = super::lock(&resolved)?;
    Ok((resolved, lock))
}

fn read_only() -> io::Error {
    io::Error::new(
        io::ErrorKind::ReadOnlyFilesystem,
        "the source of a copy is never written",
    )
}

// === impl Snapshot ===

impl TokenStore for Snapshot {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn get<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, io::Result<Option<Record>>> {
        let record = self.tenants.get(key.name).map(|(_, r)| r.clone());
        Box::pin(std::future::ready(Ok(record)))
    }

    fn put<'a>(
        &'a self,
        _key: Key<'a>,
        _expected: Generation,
        _put: Put<'a>,
    ) -> BoxFuture<'a, Result<Generation, PutError>> {
        Box::pin(std::future::ready(Err(PutError::Io(read_only()))))
    }

    fn seed_presented<'a>(&'a self, seed: &'a SecretString) -> BoxFuture<'a, io::Result<bool>> {
        let hash = format::seed_hash(seed.expose_secret());
        Box::pin(std::future::ready(Ok(self.seeds.contains(&hash))))
    }

    fn lease<'a>(&'a self, _key: Key<'a>) -> BoxFuture<'a, io::Result<Lease>> {
        Box::pin(std::future::ready(Ok(Lease::new(()))))
    }

    fn changes(&self) -> Changes {
        Changes::never()
    }

    fn all(&self) -> BoxFuture<'_, io::Result<Vec<Listed>>> {
        Box::pin(std::future::ready(Ok(Listed::all_of(&self.tenants))))
    }

    fn presented_seeds(&self) -> BoxFuture<'_, io::Result<Vec<String>>> {
        Box::pin(std::future::ready(Ok(self.seeds.iter().cloned().collect())))
    }

    fn add_presented_seeds<'a>(&'a self, _hashes: &'a [String]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(std::future::ready(Err(read_only())))
    }
}
