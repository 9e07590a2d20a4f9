//! The token store: where each refresh-token tenant's newest refresh token
//! lives, so that a restart (or a `kill -9`) never loses it.
//!
//! One JSON file, mode 0600, replaced atomically on every change: write a
//! temporary file in the same folder, fsync it, rename it over the old one,
//! fsync the folder. A lock file next to it (held for the life of the
//! process) keeps a second proxy from rotating the same tokens.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

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
    #[error("store.path: cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error(
        "store.path: {path} is in use by another criteo-token-proxy; two proxies rotating the same refresh tokens would lose them"
    )]
    InUse { path: PathBuf },
}

/// What is kept for one tenant.
#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    refresh_token: String,
    /// True once the token endpoint has refused this token (`invalid_grant`).
    #[serde(default)]
    rejected: bool,
    updated_at: String,
}

#[derive(Default, Serialize, Deserialize)]
struct StoreFile {
    version: u32,
    tenants: BTreeMap<String, Entry>,
}

/// A stored refresh token and whether Criteo has already refused it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub refresh_token: SecretString,
    pub rejected: bool,
}

#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    /// The file's content as last written (or read).
    data: Mutex<StoreFile>,
    /// Serialises writers, so that the file is always the newest state.
    writing: tokio::sync::Mutex<()>,
    _lock: File,
}

impl std::fmt::Debug for StoreFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreFile")
            .field("tenants", &self.tenants.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TokenStore {
    /// Opens (or prepares to create) the store at `path`. A file that
    /// cannot be parsed is an error, never overwritten: it may hold the
    /// only copy of a tenant's refresh token.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let lock_path = lock_path(path);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| StoreError::Lock {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::InUse {
                    path: path.to_owned(),
                });
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(StoreError::Lock {
                    path: lock_path,
                    source,
                });
            }
        }

        let data = match fs::read(path) {
            Ok(bytes) => {
                let data: StoreFile =
                    serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                        path: path.to_owned(),
                        source,
                    })?;
                tighten_mode(path);
                data
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => StoreFile {
                version: 1,
                tenants: BTreeMap::new(),
            },
            Err(source) => {
                return Err(StoreError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Ok(Self {
            path: path.to_owned(),
            data: Mutex::new(data),
            writing: tokio::sync::Mutex::new(()),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, tenant: &str) -> Option<Stored> {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        data.tenants.get(tenant).map(|e| Stored {
            refresh_token: SecretString::from(e.refresh_token.clone()),
            rejected: e.rejected,
        })
    }

    /// Records `token` for `tenant` and returns only once the file on disk
    /// holds it (written, synced, renamed, folder synced).
    pub async fn put(&self, tenant: &str, token: &SecretString, rejected: bool) -> io::Result<()> {
        let _writer = self.writing.lock().await;
        let bytes = {
            let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
            data.version = 1;
            data.tenants.insert(
                tenant.to_owned(),
                Entry {
                    refresh_token: token.expose_secret().to_owned(),
                    rejected,
                    updated_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                },
            );
            serde_json::to_vec_pretty(&*data).map_err(io::Error::other)?
        };
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(io::Error::other)?
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

/// A store readable by others is made private (and said so).
fn tighten_mode(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "token store was readable by others; setting mode 0600");
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o600));
        }
    }
}

/// Temporary file in the same folder, fsync, rename, fsync the folder: a
/// crash at any point leaves either the old file or the new one, whole.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_survive_a_reopen_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        {
            let store = TokenStore::open(&path).unwrap();
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
                matches!(TokenStore::open(&path), Err(StoreError::InUse { .. })),
                "a second proxy on the same store is refused"
            );
        }
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let store = TokenStore::open(&path).unwrap();
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
        let err = TokenStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }));
        assert!(err.to_string().contains("store.path"));
        assert_eq!(fs::read_to_string(&path).unwrap(), "{ half a file");
    }

    #[test]
    fn debug_output_names_tenants_but_no_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(&dir.path().join("t.json")).unwrap();
        store.data.lock().unwrap().tenants.insert(
            "acme".into(),
            Entry {
                refresh_token: "secret-rt".into(),
                rejected: false,
                updated_at: String::new(),
            },
        );
        let shown = format!("{store:?}");
        assert!(shown.contains("acme") && !shown.contains("secret-rt"));
    }
}
