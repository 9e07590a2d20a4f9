//! Opening `store.path`: the SQLite database, created if there is none,
//! or, where an earlier release left its JSON token store, that store
//! imported into a new database first.
//!
//! The import cannot lose a tenant to a crash: the database is built under
//! a temporary name, synced, and only then renamed over `store.path`; the
//! JSON file is first linked to `<name>.imported-<unix time>` (the backup)
//! and never deleted. Killed before the rename, the next start finds the
//! JSON store still in place and imports it again.

use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, params};

use super::sqlite::{self, Found, SqliteStore};
use super::{FileStore, StoreError, TokenStore, disk, format};

/// Opens the token store at `path` (see the module's doc).
pub(crate) fn open(path: &Path) -> Result<Arc<dyn TokenStore>, StoreError> {
    let resolved = disk::resolve(path).map_err(|source| StoreError::Read {
        path: path.to_owned(),
        source,
    })?;
    super::check_folder_of(&resolved)?;
    let json_leftovers = disk::leftovers(&resolved).unwrap_or_default();
    let store = match sqlite::found(&resolved)? {
        Found::Other => import(path)?,
        // An earlier release killed before its first rename: the token is
        // only in its temporary file.
        Found::Nothing if !json_leftovers.is_empty() => import(path)?,
        Found::Nothing | Found::Database => {
            let lock = super::lock(&resolved)?;
            remove_import_leftovers(&resolved);
            if !json_leftovers.is_empty() {
                // The import took whatever they held; nothing writes them
                // since (this release reads no JSON from then on).
                tracing::warn!(path = %resolved.display(), "removing temporary files of the JSON token store left from before its import");
                super::remove_all(&resolved, &json_leftovers);
            }
            SqliteStore::open_locked(resolved, lock)?
        }
    };
    tracing::info!(
        path = %store.path().display(),
        configured = %path.display(),
        "token store opened"
    );
    Ok(Arc::new(store))
}

/// Imports the JSON store at `path` (its leftover temporary files merged
/// by [`FileStore::open`], which refuses a file that is not one and leaves
/// it untouched) and opens the database that replaces it.
fn import(path: &Path) -> Result<SqliteStore, StoreError> {
    let json = FileStore::open(path)?;
    let FileStore {
        path: resolved,
        data,
        stale,
        _lock: lock,
        ..
    } = json;
    let data = data.into_inner().unwrap_or_else(|e| e.into_inner());
    remove_import_leftovers(&resolved);
    let failed = |source: io::Error| StoreError::Import {
        path: resolved.clone(),
        source,
    };
    let tmp = import_name(&resolved);
    let built = (|| {
        File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        let mut conn = Connection::open_with_flags(
            &tmp,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .map_err(io::Error::other)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .and_then(|()| write_import(&mut conn, &data))
            .map_err(io::Error::other)?;
        conn.close().map_err(|(_, e)| io::Error::other(e))?;
        File::open(&tmp)?.sync_all()
    })();
    if let Err(e) = built {
        let _ = fs::remove_file(&tmp);
        return Err(failed(e));
    }
    let backup = backup_name(&resolved);
    let swapped = (|| {
        fs::hard_link(&resolved, &backup)?;
        disk::sync_folder(disk::parent(&resolved))?;
        fs::rename(&tmp, &resolved)?;
        disk::sync_folder(disk::parent(&resolved))
    })();
    if let Err(e) = swapped {
        let _ = fs::remove_file(&tmp);
        return Err(failed(e));
    }
    tracing::warn!(
        path = %resolved.display(),
        backup = %backup.display(),
        tenants = data.tenants.len(),
        "imported the JSON token store of an earlier release into a SQLite database; the JSON file is kept as a backup"
    );
    // Their content is in the database now.
    let stale = stale.into_inner().unwrap_or_else(|e| e.into_inner());
    super::remove_all(&resolved, &stale);
    SqliteStore::open_locked(resolved, lock)
}

/// Writes `file` (a JSON store of an earlier release) into `conn`, in one
/// transaction: every tenant with its rejected flag, every presented seed.
fn write_import(conn: &mut Connection, file: &format::StoreFile) -> rusqlite::Result<()> {
    conn.execute_batch(sqlite::SCHEMA)?;
    conn.pragma_update(None, "user_version", sqlite::SCHEMA_VERSION)?;
    let tx = conn.transaction()?;
    for (name, entry) in &file.tenants {
        let updated = if entry.updated_at.is_empty() {
            sqlite::now()
        } else {
            entry.updated_at.clone()
        };
        tx.execute(
            "INSERT INTO tenants (name, refresh_token, rejected, generation, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                name,
                entry.refresh_token,
                entry.rejected,
                i64::try_from(entry.seq.max(1)).unwrap_or(i64::MAX),
                updated
            ],
        )?;
    }
    for hash in &file.presented_seeds {
        tx.execute(
            "INSERT OR IGNORE INTO presented_seeds (hash) VALUES (?1)",
            [hash],
        )?;
    }
    tx.commit()
}

/// `.<name>.import.`: the prefix of a database being imported.
fn import_prefix(path: &Path) -> Vec<u8> {
    let mut prefix = b".".to_vec();
    prefix.extend_from_slice(path.file_name().unwrap_or_default().as_bytes());
    prefix.extend_from_slice(b".import.");
    prefix
}

fn import_name(path: &Path) -> PathBuf {
    let mut name = import_prefix(path);
    name.extend_from_slice(format!("{:032x}", rand::random::<u128>()).as_bytes());
    path.with_file_name(std::ffi::OsStr::from_bytes(&name))
}

/// `<name>.imported-<unix time>`, one not taken yet.
fn backup_name(path: &Path) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut backup = path.with_file_name(format!("{name}.imported-{secs}"));
    let mut n = 1;
    while fs::symlink_metadata(&backup).is_ok() {
        backup = path.with_file_name(format!("{name}.imported-{secs}.{n}"));
        n += 1;
    }
    backup
}

/// Removes databases an import killed before its rename left behind (the
/// JSON store they were built from is still in place, or already
/// imported): they hold refresh tokens.
fn remove_import_leftovers(path: &Path) {
    let prefix = import_prefix(path);
    let Ok(entries) = fs::read_dir(disk::parent(path)) else {
        return;
    };
    let found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().as_bytes().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    super::remove_all(path, &found);
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use secrecy::{ExposeSecret, SecretString};

    use crate::store::Key;

    use super::*;
    use crate::store::{Generation, Put};

    /// The folder's file names, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    async fn token(store: &Arc<dyn TokenStore>, tenant: &str) -> (String, bool) {
        let r = store
            .get(Key {
                name: tenant,
                client_id: "",
            })
            .await
            .unwrap()
            .unwrap();
        (r.refresh_token.expose_secret().to_owned(), r.rejected)
    }

    const OLD: &str = r#"{"version":1,"seq":4,"tenants":{
        "acme":{"refresh_token":"acme-3","rejected":false,"seq":3,"updated_at":"2026-01-01T00:00:00Z"},
        "gone":{"refresh_token":"gone-1","rejected":true,"seq":1,"updated_at":"2026-01-01T00:00:00Z"},
        "old":{"refresh_token":"old-0","updated_at":""}},
        "presented_seeds":["2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"]}"#;

    #[tokio::test]
    async fn a_json_store_is_imported_whole_and_kept_as_a_backup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        fs::write(&path, OLD).unwrap();
        // A newer copy of acme's entry left by a write cut short.
        let leftover = OLD
            .replace("acme-3", "acme-4")
            .replace(r#""seq":3"#, r#""seq":4"#);
        fs::write(dir.path().join(".tokens.json.tmp.0badcafe"), leftover).unwrap();
        let store = open(&path).unwrap();
        assert_eq!(token(&store, "acme").await, ("acme-4".into(), false));
        assert_eq!(token(&store, "gone").await, ("gone-1".into(), true));
        assert_eq!(token(&store, "old").await, ("old-0".into(), false));
        assert!(
            store
                .seed_presented(&SecretString::from("secret"))
                .await
                .unwrap(),
            "presented seeds came along"
        );
        drop(store);
        let files = names(dir.path());
        let backup = files
            .iter()
            .find(|n| n.starts_with("tokens.json.imported-"))
            .expect("a backup");
        let kept = fs::read_to_string(dir.path().join(backup)).unwrap();
        assert!(
            kept.contains("acme-4") && kept.contains("gone-1"),
            "the backup is the JSON store as recovered: {kept}"
        );
        assert!(
            !files
                .iter()
                .any(|n| n.contains(".tmp.") || n.contains(".import.")),
            "{files:?}"
        );
        let head = fs::read(&path).unwrap();
        assert!(head.starts_with(b"SQLite format 3\0"));
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = open(&path).unwrap();
        assert_eq!(token(&again, "acme").await, ("acme-4".into(), false));
    }

    #[tokio::test]
    async fn an_import_cut_short_is_done_again_from_the_json_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        fs::write(&path, OLD).unwrap();
        let cut = dir.path().join(".tokens.json.import.0123");
        fs::write(&cut, "SQLite format 3\0 half").unwrap();
        let store = open(&path).unwrap();
        assert_eq!(token(&store, "acme").await, ("acme-3".into(), false));
        assert!(!cut.exists(), "the half-built database is removed");
    }

    #[tokio::test]
    async fn tokens_survive_a_reopen_and_a_second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.db");
        let store = open(&path).unwrap();
        let rt = SecretString::from("rt-1");
        let put = Put {
            refresh_token: &rt,
            rejected: false,
            adopt_seed: false,
            access: None,
        };
        store
            .put(
                Key {
                    name: "acme",
                    client_id: "app",
                },
                Generation::NONE,
                put,
            )
            .await
            .unwrap();
        let err = open(&path).unwrap_err();
        assert!(matches!(err, StoreError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("store.path"), "{err}");
        drop(store);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let store = open(&path).unwrap();
        assert_eq!(token(&store, "acme").await, ("rt-1".into(), false));
    }

    #[test]
    fn a_corrupt_database_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.db");
        let mut bytes = b"SQLite format 3\0".to_vec();
        bytes.extend_from_slice(&[0xa5; 4080]);
        fs::write(&path, &bytes).unwrap();
        let err = open(&path).unwrap_err();
        assert!(matches!(err, StoreError::NotADatabase { .. }), "{err}");
        assert!(err.to_string().contains("store.path"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), bytes);
        assert_eq!(names(dir.path()), ["tokens.db", "tokens.db.lock"]);

        fs::write(&path, "neither JSON nor SQLite").unwrap();
        let err = open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "neither JSON nor SQLite"
        );
    }

    #[tokio::test]
    async fn nothing_is_written_into_a_database_moved_away_from_store_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.db");
        let store = open(&path).unwrap();
        fs::rename(&path, dir.path().join("aside.db")).unwrap();
        let rt = SecretString::from("rt-1");
        let put = Put {
            refresh_token: &rt,
            rejected: false,
            adopt_seed: false,
            access: None,
        };
        let err = store
            .put(
                Key {
                    name: "acme",
                    client_id: "app",
                },
                Generation::NONE,
                put,
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("store.path"), "{err}");
    }
}
