//! The store's files, handled so that someone who can write to the store's
//! folder can neither read a refresh token nor redirect a write: no
//! symbolic link is followed (`O_NOFOLLOW`), temporary files have
//! unpredictable names and are created exclusively (`O_CREAT|O_EXCL`),
//! every file is mode 0600, and a folder writable by every user is refused.

use std::ffi::OsString;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Symbolic links followed when resolving `store.path` (the kernel's own
/// limit for one path).
const MAX_LINKS: usize = 40;

/// Tries at an unused temporary name; a collision of 128 random bits
/// means something other than chance.
const TEMP_ATTEMPTS: usize = 4;

/// `path` with every symbolic link resolved, in its folder and in its own
/// name (which may not exist yet): the store then lives at the link's
/// target, so that renaming a new version into place keeps the link
/// pointing at the live store instead of replacing the link.
pub(crate) fn resolve(path: &Path) -> io::Result<PathBuf> {
    let mut path = path.to_owned();
    for _ in 0..MAX_LINKS {
        let Some(name) = path.file_name().map(ToOwned::to_owned) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} does not name a file", path.display()),
            ));
        };
        let dir = parent(&path);
        let dir = fs::canonicalize(dir).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => io::Error::new(
                e.kind(),
                format!("the folder {} does not exist", dir.display()),
            ),
            _ => io::Error::new(e.kind(), format!("{}: {e}", dir.display())),
        })?;
        let full = dir.join(name);
        match fs::symlink_metadata(&full) {
            Ok(meta) if meta.file_type().is_symlink() => {
                // A relative target is relative to the link's folder; an
                // absolute one replaces it.
                path = dir.join(fs::read_link(&full)?);
            }
            _ => return Ok(full),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{} is a loop of symbolic links", path.display()),
    ))
}

/// The folder a (resolved) store path is in.
pub(crate) fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Refuses a folder that is not one or that every user may write to: such
/// a user could plant or swap files the proxy reads and writes. Returns
/// the folder's mode.
pub(crate) fn check_folder(dir: &Path) -> Result<u32, String> {
    let meta = match fs::metadata(dir) {
        Ok(m) if m.is_dir() => m,
        _ => return Err(format!("the folder {} does not exist", dir.display())),
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o002 != 0 {
        return Err(format!(
            "the folder {} is writable by every user (mode {mode:o}): anyone on the host could plant \
             files the proxy would use or read its refresh tokens; use a folder only the proxy's user \
             (and its group) can write to, e.g. `chmod o-w {}`",
            dir.display(),
            dir.display()
        ));
    }
    Ok(mode)
}

/// Opens (creating it if needed) the lock file, never through a link.
pub(crate) fn open_lock(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = regular(&file)?;
    if meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Reads a store file, never through a link and only if it is a regular
/// file (a FIFO would block, a device never end). `None`: no such file.
pub(crate) fn read(path: &Path) -> io::Result<Option<(Vec<u8>, File)>> {
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = regular(&file)?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut bytes)?;
    Ok(Some((bytes, file)))
}

/// The first `len` bytes of a file (fewer if it is shorter), never through
/// a link and only if it is a regular file. `None`: no such file.
pub(crate) fn read_head(path: &Path, len: usize) -> io::Result<Option<Vec<u8>>> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    regular(&file)?;
    let mut head = Vec::with_capacity(len);
    file.take(len as u64).read_to_end(&mut head)?;
    Ok(Some(head))
}

/// True for the error `O_NOFOLLOW` gives when the name is a link.
pub(crate) fn is_link_error(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
}

fn regular(file: &File) -> io::Result<Metadata> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(meta)
}

/// `.tokens.json.tmp.`: every temporary file of the store at `path` starts
/// so, this release's (128 random bits in hex) and older ones' (a pid).
fn temp_prefix(path: &Path) -> OsString {
    let mut prefix = OsString::from(".");
    prefix.push(path.file_name().unwrap_or_default());
    prefix.push(".tmp.");
    prefix
}

/// Temporary files of this store left behind by a process that died
/// before renaming one into place; each may hold the newest token.
pub(crate) fn leftovers(path: &Path) -> io::Result<Vec<PathBuf>> {
    let prefix = temp_prefix(path);
    let mut found = Vec::new();
    for entry in fs::read_dir(parent(path))? {
        let entry = entry?;
        if entry.file_name().as_bytes().starts_with(prefix.as_bytes()) {
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// Replaces `path` with `bytes` so that a crash at any point leaves the
/// old file or the new one, whole (a temporary file in the same folder,
/// fsync, rename, fsync of the folder), and a temporary file that reached
/// the disk whole is found by [`leftovers`] if the rename never happened.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent(path);
    let (tmp, mut file) = create_temp(path)?;
    let result = (|| {
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        sync_folder(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A new private file at an unpredictable name: a file or link planted
/// beforehand makes the open fail instead of being written through.
fn create_temp(path: &Path) -> io::Result<(PathBuf, File)> {
    let dir = parent(path);
    let prefix = temp_prefix(path);
    for _ in 0..TEMP_ATTEMPTS {
        let mut name = prefix.clone();
        name.push(format!("{:032x}", rand::random::<u128>()));
        let tmp = dir.join(name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "{}: every random temporary name tried was taken",
            dir.display()
        ),
    ))
}

/// Makes renames and removals in `dir` durable.
pub(crate) fn sync_folder(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
