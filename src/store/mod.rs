//! The token store: where each refresh-token tenant's newest refresh token
//! lives, so that a restart (or a `kill -9`) never loses it.
//!
//! [`open`] (`open.rs`) opens `store.path` as a SQLite database
//! (`sqlite.rs`), importing first the JSON store of earlier releases if it
//! finds one there. That JSON store ([`FileStore`], this file) is one file,
//! mode 0600, replaced atomically on every change (see [`disk`]); every
//! write carries the next number of a counter, so that a newer copy left in
//! a temporary file by a process killed before renaming it is recognised
//! and merged when it is opened. A lock file next to the store (held for
//! the life of the process) keeps a second proxy from rotating the same
//! tokens, whichever the format. The [`TokenStore`] trait (`contract.rs`)
//! is what the rest of the crate uses.

#[doc(hidden)]
pub(crate) mod bench;
mod configured;
mod contract;
pub(crate) mod copy;
mod disk;
mod format;
mod open;
mod postgres;
mod snapshot;
mod sqlite;

pub(crate) use configured::{open_configured, open_with_replicas};
pub(crate) use contract::{Access, Generation, Key, Put, PutError, Record, TokenStore};
pub(crate) use open::open;
pub(crate) use postgres::{HEARTBEAT, PgOptions, PgStore, Replicas};

/// Whether `url` is a usable `store.url` (the error never quotes it).
pub(crate) fn check_url(url: &str) -> Result<(), String> {
    postgres::parse_url(url).map(|_| ())
}

/// `url` with its password replaced by `<redacted>`.
pub(crate) fn redact_url(url: &str) -> String {
    postgres::redact(url)
}

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use secrecy::{ExposeSecret, SecretString};

use contract::Listed;
use format::StoreFile;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store.path: cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "store.path: {path} is not a token store ({source}); it is left untouched: move it away only if its tokens are not needed"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "store.path: {path} is not a token store database ({reason}); it is left untouched: move it away only if its tokens are not needed"
    )]
    NotADatabase { path: PathBuf, reason: String },
    #[error(
        "store.path: cannot import the JSON token store {path} into a database: {source}; the JSON file is left in place"
    )]
    Import { path: PathBuf, source: io::Error },
    #[error("store.path: cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error(
        "store.path: {path} is a symbolic link where the store keeps its own files; it is not followed (whoever can write to that folder could redirect them): remove it"
    )]
    Link { path: PathBuf },
    #[error("store.path: {0}")]
    Folder(String),
    #[error(
        "store.path: {path} is in use by another criteo-token-proxy; two proxies rotating the same refresh tokens would lose them"
    )]
    InUse { path: PathBuf },
}

#[derive(Debug)]
pub(crate) struct FileStore {
    /// The store file, every symbolic link resolved.
    path: PathBuf,
    /// The file's content as last written (or read).
    data: Mutex<StoreFile>,
    /// Serialises writers, so that the file is always the newest state.
    writing: tokio::sync::Mutex<()>,
    /// Temporary files left by a crash, merged but not yet removed (the
    /// merge could not be written at start): removed after the next write.
    stale: Mutex<Vec<PathBuf>>,
    /// Per-tenant refresh leases: the lock file already keeps other
    /// processes out, so a lease only has to exclude this one's tasks.
    leases: contract::Leases,
    _lock: File,
}

/// Checks `store.path` for the configuration: its folder (after resolving
/// symbolic links) exists and is not writable by every user.
pub(crate) fn check_location(path: &Path) -> Result<(), String> {
    let resolved = disk::resolve(path).map_err(|e| e.to_string())?;
    disk::check_folder(disk::parent(&resolved)).map(drop)
}

impl FileStore {
    /// Opens (or prepares to create) the store at `path`. A store file that
    /// cannot be parsed is an error, never overwritten: it may hold the
    /// only copy of a tenant's refresh token. Temporary files left by a
    /// crash are merged in (the newest entry of each tenant wins) and
    /// removed; one that is incomplete is only removed.
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        let read_error = |source| StoreError::Read {
            path: path.to_owned(),
            source,
        };
        let resolved = disk::resolve(path).map_err(read_error)?;
        check_folder_of(&resolved)?;
        let lock = lock(&resolved)?;
        let data = read_store(&resolved)?;
        let store = Self {
            path: resolved,
            data: Mutex::new(data),
            writing: tokio::sync::Mutex::new(()),
            stale: Mutex::new(Vec::new()),
            leases: contract::Leases::default(),
            _lock: lock,
        };
        store.recover_leftovers();
        tracing::info!(
            path = %store.path.display(),
            configured = %path.display(),
            "token store opened"
        );
        Ok(store)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The tenant's record as it is now (the file is read only at open).
    pub(crate) fn get(&self, tenant: &str) -> Option<Record> {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        data.tenants.get(tenant).map(|e| Record {
            refresh_token: SecretString::from(e.refresh_token.clone()),
            rejected: e.rejected,
            generation: Generation(e.seq),
            access: None,
        })
    }

    /// Every tenant's record (the file records no `client_id`).
    fn list(&self) -> Vec<Listed> {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        data.tenants
            .iter()
            .map(|(name, e)| Listed {
                name: name.clone(),
                client_id: String::new(),
                record: Record {
                    refresh_token: SecretString::from(e.refresh_token.clone()),
                    rejected: e.rejected,
                    generation: Generation(e.seq),
                    access: None,
                },
            })
            .collect()
    }

    /// Whether `seed` has ever been presented to the token endpoint (by
    /// any tenant): if so it is spent, or it is a tenant's stored token.
    fn seed_was_presented(&self, seed: &SecretString) -> bool {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        data.seed_presented(seed.expose_secret())
    }

    /// Records `token` for `tenant`, whatever is stored, and returns only
    /// once the file on disk holds it.
    #[cfg(test)]
    pub(crate) async fn put(
        &self,
        tenant: &str,
        token: &SecretString,
        rejected: bool,
    ) -> io::Result<()> {
        self.update(|data| {
            data.set(tenant, token.expose_secret(), rejected);
            Ok::<_, io::Error>(())
        })
        .await
    }

    /// Applies `change` and returns only once the file on disk holds the
    /// result (written, synced, renamed, folder synced). A change that
    /// fails must leave the data as it was: nothing is written then.
    async fn update<T, E: From<io::Error>>(
        &self,
        change: impl FnOnce(&mut StoreFile) -> Result<T, E>,
    ) -> Result<T, E> {
        let _writer = self.writing.lock().await;
        // The change is made on a copy, which replaces the data only once
        // it is on disk: a write that fails leaves the data (and so every
        // generation a caller holds) as it was. The writer lock keeps
        // another change from slipping in between.
        let mut next = self.data.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let out = change(&mut next)?;
        let bytes = serde_json::to_vec_pretty(&next).map_err(io::Error::other)?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || disk::write_atomically(&path, &bytes))
            .await
            .map_err(io::Error::other)??;
        *self.data.lock().unwrap_or_else(|e| e.into_inner()) = next;
        let stale = std::mem::take(&mut *self.stale.lock().unwrap_or_else(|e| e.into_inner()));
        if !stale.is_empty() {
            let path = self.path.clone();
            let _ = tokio::task::spawn_blocking(move || remove_all(&path, &stale)).await;
        }
        Ok(out)
    }

    /// Merges the complete temporary files a crash left behind (each may
    /// hold a newer token than the store file) and removes them all once
    /// the merge is on disk.
    fn recover_leftovers(&self) {
        let leftovers = match disk::leftovers(&self.path) {
            Ok(l) if l.is_empty() => return,
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot list the token store's folder for temporary files left by a crash");
                return;
            }
        };
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let mut taken = false;
        let mut done = Vec::with_capacity(leftovers.len());
        for tmp in leftovers {
            match disk::read(&tmp) {
                Ok(Some((bytes, _))) => match serde_json::from_slice::<StoreFile>(&bytes) {
                    Ok(copy) => taken |= data.absorb(copy),
                    Err(_) => tracing::info!(
                        file = %tmp.display(),
                        "removing an incomplete temporary file of the token store (a write cut short)"
                    ),
                },
                Ok(None) => continue,
                // A link or a FIFO there was planted, never written by a
                // proxy: removed (a link, not its target).
                Err(e) if disk::is_link_error(&e) || e.kind() == io::ErrorKind::InvalidInput => {
                    tracing::warn!(file = %tmp.display(), error = %e, "removing something planted among the token store's temporary files");
                }
                // It may hold the newest token: kept for the next start.
                Err(e) => {
                    tracing::warn!(file = %tmp.display(), error = %e, "cannot read a temporary file of the token store; it is left in place");
                    continue;
                }
            }
            done.push(tmp);
        }
        let leftovers = done;
        if taken {
            tracing::warn!(
                path = %self.path.display(),
                "the token store's last write was cut short by a crash; its newer tokens were recovered from the temporary file"
            );
            let written = serde_json::to_vec_pretty(&*data)
                .map_err(io::Error::other)
                .and_then(|bytes| disk::write_atomically(&self.path, &bytes));
            if let Err(e) = written {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot write the recovered token store yet; its temporary files are kept until the next write");
                *self.stale.lock().unwrap_or_else(|e| e.into_inner()) = leftovers;
                return;
            }
        }
        drop(data);
        remove_all(&self.path, &leftovers);
    }
}

/// Refuses a store whose folder every user may write to; warns when its
/// group may.
fn check_folder_of(resolved: &Path) -> Result<(), StoreError> {
    let folder = disk::parent(resolved);
    let mode = disk::check_folder(folder).map_err(StoreError::Folder)?;
    if mode & 0o020 != 0 {
        tracing::warn!(
            folder = %folder.display(),
            mode = format!("{mode:o}"),
            "the token store's folder is writable by its group: its members can plant files there (expected on a Kubernetes volume mounted with fsGroup; otherwise use chmod g-w)"
        );
    }
    Ok(())
}

/// Takes the lock file `<store>.lock` for the life of the process.
fn lock(path: &Path) -> Result<File, StoreError> {
    let lock_path = lock_path(path);
    let lock = disk::open_lock(&lock_path).map_err(|source| {
        if disk::is_link_error(&source) {
            StoreError::Link {
                path: lock_path.clone(),
            }
        } else {
            StoreError::Lock {
                path: lock_path.clone(),
                source,
            }
        }
    })?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::InUse {
            path: path.to_owned(),
        }),
        Err(fs::TryLockError::Error(source)) => Err(StoreError::Lock {
            path: lock_path,
            source,
        }),
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

/// Reads the store file (none yet: an empty store), never through a link;
/// one readable by others is made private (and said so).
fn read_store(path: &Path) -> Result<StoreFile, StoreError> {
    let (bytes, file) = match disk::read(path) {
        Ok(Some(read)) => read,
        Ok(None) => return Ok(StoreFile::empty()),
        Err(e) if disk::is_link_error(&e) => {
            return Err(StoreError::Link {
                path: path.to_owned(),
            });
        }
        Err(source) => {
            return Err(StoreError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let data = serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
        path: path.to_owned(),
        source,
    })?;
    if let Ok(meta) = file.metadata() {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "token store was readable by others; setting mode 0600");
            let _ = file.set_permissions(fs::Permissions::from_mode(0o600));
        }
    }
    Ok(data)
}

/// Removes temporary files whose content is in the store file (or was
/// never whole): each may hold a refresh token.
fn remove_all(path: &Path, files: &[PathBuf]) {
    if files.is_empty() {
        return;
    }
    for f in files {
        if let Err(e) = fs::remove_file(f)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(file = %f.display(), error = %e, "cannot remove a temporary file of the token store");
        }
    }
    let _ = disk::sync_folder(disk::parent(path));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the store again after the test dropped it. A test elsewhere in
    /// this process that starts a program (PostgreSQL) forks, and until the
    /// child execs it holds a copy of every descriptor, the lock file's
    /// too: the lock can outlive the drop by a moment. The proxy never
    /// forks; there is no signal to wait for, so this looks again.
    fn reopen(path: &Path) -> FileStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match FileStore::open(path) {
                Err(StoreError::InUse { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other.unwrap(),
            }
        }
    }

    #[tokio::test]
    async fn tokens_survive_a_reopen_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        {
            let store = FileStore::open(&path).unwrap();
            assert!(store.get("acme").is_none());
            store
                .put("acme", &SecretString::from("rt-1"), false)
                .await
                .unwrap();
            store
                .put("acme", &SecretString::from("rt-2"), false)
                .await
                .unwrap();
            store
                .put("other", &SecretString::from("rt-x"), true)
                .await
                .unwrap();
            assert!(
                matches!(FileStore::open(&path), Err(StoreError::InUse { .. })),
                "a second proxy on the same store is refused"
            );
        }
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let store = reopen(&path);
        assert_eq!(
            store.get("acme").unwrap().refresh_token.expose_secret(),
            "rt-2"
        );
        assert!(!store.get("acme").unwrap().rejected);
        assert!(store.get("other").unwrap().rejected);
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary file is left behind");
    }

    #[test]
    fn a_corrupt_store_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        fs::write(&path, "{ half a file").unwrap();
        let err = FileStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }));
        assert!(err.to_string().contains("store.path"));
        assert_eq!(fs::read_to_string(&path).unwrap(), "{ half a file");
    }

    /// The folder's file names, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_complete_leftover_with_a_newer_token_is_merged_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        {
            let store = FileStore::open(&path).unwrap();
            let rt = |s: &str| SecretString::from(s.to_owned());
            store.put("acme", &rt("acme-1"), false).await.unwrap();
            store.put("other", &rt("other-1"), false).await.unwrap();
            let before = fs::read(&path).unwrap();
            store.put("acme", &rt("acme-2"), false).await.unwrap();
            // As if killed between writing the temporary file and renaming it.
            fs::rename(&path, dir.path().join(".tokens.json.tmp.0123abcd")).unwrap();
            fs::write(&path, before).unwrap();
        }
        let store = reopen(&path);
        let token = |t: &str| {
            store
                .get(t)
                .unwrap()
                .refresh_token
                .expose_secret()
                .to_owned()
        };
        assert_eq!(token("acme"), "acme-2");
        assert_eq!(token("other"), "other-1");
        assert_eq!(names(dir.path()), ["tokens.json", "tokens.json.lock"]);
        drop(store);
        let reopened = reopen(&path);
        assert_eq!(
            reopened.get("acme").unwrap().refresh_token.expose_secret(),
            "acme-2",
            "the merge was written before the leftover was removed"
        );
    }

    #[test]
    fn an_incomplete_leftover_is_ignored_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        fs::write(
            &path,
            r#"{"version":1,"tenants":{"acme":{"refresh_token":"rt-1","updated_at":""}}}"#,
        )
        .unwrap();
        let leftover = r#"{"version":1,"seq":9,"tenants":{"acme":{"refresh_token":"rt-9","seq":9"#;
        fs::write(dir.path().join(".tokens.json.tmp.feed"), leftover).unwrap();
        let store = FileStore::open(&path).unwrap();
        assert_eq!(
            store.get("acme").unwrap().refresh_token.expose_secret(),
            "rt-1"
        );
        assert_eq!(names(dir.path()), ["tokens.json", "tokens.json.lock"]);
    }

    #[tokio::test]
    async fn temporary_files_have_unpredictable_names_and_none_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = FileStore::open(&path).unwrap();
        // Something planted at the name earlier releases used.
        let planted = dir
            .path()
            .join(format!(".tokens.json.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(dir.path().join("leak"), &planted).unwrap();
        store
            .put("acme", &SecretString::from("rt-1"), false)
            .await
            .unwrap();
        assert!(
            !dir.path().join("leak").exists(),
            "the planted link was not followed"
        );
        assert!(fs::symlink_metadata(&path).unwrap().is_file());
        fs::remove_file(planted).unwrap();
        assert_eq!(names(dir.path()), ["tokens.json", "tokens.json.lock"]);
    }

    #[test]
    fn a_symlinked_lock_file_is_refused_and_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let target = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, dir.path().join("tokens.json.lock")).unwrap();
        let err = FileStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Link { .. }), "{err}");
        assert!(err.to_string().contains("store.path"));
        assert!(!target.exists());
    }

    #[test]
    fn a_symlinked_store_path_lives_at_its_target_whose_folder_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (here, there) = (dir.path().join("here"), dir.path().join("there"));
        fs::create_dir(&here).unwrap();
        fs::create_dir(&there).unwrap();
        let link = here.join("tokens.json");
        std::os::unix::fs::symlink("../there/real.json", &link).unwrap();
        let store = FileStore::open(&link).unwrap();
        assert_eq!(
            store.path(),
            fs::canonicalize(&there).unwrap().join("real.json")
        );
        drop(store);
        assert!(check_location(&link).is_ok());
        fs::set_permissions(&there, fs::Permissions::from_mode(0o777)).unwrap();
        let refused = check_location(&link).unwrap_err();
        assert!(
            refused.contains("there") && refused.contains("writable by every user"),
            "{refused}"
        );
        fs::set_permissions(&there, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(
            check_location(&link).is_ok(),
            "group-writable is only a warning"
        );
    }

    #[test]
    fn debug_output_names_tenants_but_no_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("t.json")).unwrap();
        store.data.lock().unwrap().set("acme", "secret-rt", false);
        let shown = format!("{store:?}");
        assert!(shown.contains("acme") && !shown.contains("secret-rt"));
    }
}
