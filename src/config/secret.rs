//! Secrets, inline or in a file: read at every use (a rotated credential
//! is picked up without a restart), only from a small regular file.

use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

use super::files::{self, MAX_SECRET_FILE};

/// Where a secret lives. A file is read again at every use, so that a
/// rotated credential (Criteo allows five pairs per app) is picked up
/// without a restart.
#[derive(Clone)]
pub enum SecretSource {
    Inline(SecretString),
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("Inline(<redacted>)"),
            SecretSource::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

impl SecretSource {
    /// Reads the secret now: the inline value, or the file's content with
    /// surrounding whitespace trimmed. An empty secret is an error.
    pub fn load(&self) -> Result<SecretString, String> {
        match self {
            SecretSource::Inline(s) if s.expose_secret().trim().is_empty() => {
                Err("is empty".into())
            }
            SecretSource::Inline(s) => Ok(s.clone()),
            SecretSource::File(path) => read_secret_file(path),
        }
    }

    /// What tells two sources apart (compared, never shown): the inline
    /// value, or the file's path.
    pub(crate) fn identity(&self) -> String {
        match self {
            SecretSource::Inline(s) => format!("inline:{}", s.expose_secret()),
            SecretSource::File(p) => format!("file:{}", p.display()),
        }
    }

    /// [`Self::load`] for async code: a file is read on the blocking pool,
    /// so that a slow disk never stalls the runtime it is called from.
    pub async fn load_async(&self) -> Result<SecretString, String> {
        match self {
            SecretSource::Inline(_) => self.load(),
            SecretSource::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_secret_file(&path))
                    .await
                    .unwrap_or_else(|e| Err(format!("cannot read the secret file: {e}")))
            }
        }
    }
}

/// Only a regular file, at most [`MAX_SECRET_FILE`] bytes, opened so that a
/// FIFO cannot block (see `files.rs`): this runs at every token request.
fn read_secret_file(path: &Path) -> Result<SecretString, String> {
    let bytes = files::read_regular(path, MAX_SECRET_FILE)?;
    let text =
        String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

/// `NAME` inline or `NAME_file`, exactly one, read once now to check it.
/// `key` names the inline key; errors about the file name `key_file`.
pub(super) fn secret_pair(
    key: &str,
    inline: Option<SecretString>,
    file: Option<PathBuf>,
    bad: &mut impl FnMut(&str, String),
) -> Option<SecretSource> {
    let file_key = format!("{key}_file");
    let (src, src_key) = match (inline, file) {
        (Some(_), Some(_)) => {
            bad(key, format!("set {key} or {file_key}, not both"));
            return None;
        }
        (None, None) => {
            bad(key, format!("is missing (set {key} or {file_key})"));
            return None;
        }
        (Some(s), None) => (SecretSource::Inline(s), key),
        (None, Some(p)) => (SecretSource::File(p), file_key.as_str()),
    };
    match src.load() {
        Ok(_) => Some(src),
        Err(e) => {
            bad(src_key, e);
            None
        }
    }
}

/// An admin token travels in `Authorization: Bearer …` as-is. (Its
/// strength is the operator's: `openssl rand -hex 32` makes a good one.)
pub(crate) fn check_admin_token(token: &str) -> Result<(), String> {
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces".into());
    }
    Ok(())
}
