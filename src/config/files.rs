//! Reading the files a configuration names (secrets, `upstream.ca_file`,
//! the configuration itself) without trusting what they are.
//!
//! A path can name `/dev/zero` (endless), a FIFO (blocks the open until a
//! writer appears) or a 200 MB file by mistake. Each would hang or exhaust
//! the process at start, at a reload, or at every token request (secret
//! files are read again at each use). So a file is opened with
//! `O_NONBLOCK` (a FIFO cannot block the open), checked with `fstat` on
//! the open descriptor to be a regular file (no race with a swap of the
//! path), and read with a size cap. Symlinks are followed: Kubernetes
//! mounts Secrets and ConfigMaps through `..data` symlinks.

use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Largest secret file read (client secrets, refresh tokens, signing
/// secrets, the admin token are all far smaller).
pub(crate) const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Largest `upstream.ca_file` read (a bundle of a few hundred roots).
pub(crate) const MAX_CA_FILE: u64 = 1024 * 1024;

/// Largest configuration file read (about 100,000 tenants).
pub(crate) const MAX_CONFIG_FILE: u64 = 64 * 1024 * 1024;

/// A digest of the configuration file at `path` as it is now (`None`
/// when it cannot be read): the same bytes give the same digest.
pub(crate) fn digest(path: &Path) -> Option<u64> {
    use std::hash::{DefaultHasher, Hasher};
    let bytes = read_regular(path, MAX_CONFIG_FILE).ok()?;
    let mut h = DefaultHasher::new();
    h.write(&bytes);
    Some(h.finish())
}

/// The whole content of the regular file at `path`, at most `cap` bytes.
/// Errors name the path and say what is wrong, never the content.
pub(crate) fn read_regular(path: &Path, cap: u64) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let file = open_nonblocking(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "{shown} is not a regular file (a device, FIFO or folder cannot hold a secret)"
        ));
    }
    if meta.len() > cap {
        return Err(format!(
            "{shown} is {} bytes, more than the {} allowed",
            meta.len(),
            human(cap)
        ));
    }
    // The length can change between fstat and read: read at most one byte
    // past the cap to notice.
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(cap + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if buf.len() as u64 > cap {
        return Err(format!("{shown} grew past the {} allowed", human(cap)));
    }
    Ok(buf)
}

/// Checks, without opening it (a FIFO would block the open), that `path`
/// leads to a regular file of at most `cap` bytes: for files another
/// library opens, such as the configuration file figment reads.
pub(crate) fn check_regular(path: &Path, cap: u64) -> Result<(), String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    if meta.len() > cap {
        return Err(format!(
            "{shown} is {} bytes, more than the {} allowed",
            meta.len(),
            human(cap)
        ));
    }
    Ok(())
}

#[cfg(unix)]
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    File::open(path)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1024 * 1024 && b % (1024 * 1024) == 0 => format!("{} MiB", b / (1024 * 1024)),
        b if b >= 1024 && b % 1024 == 0 => format!("{} KiB", b / 1024),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Runs `f` on another thread and fails if it does not return within
    /// a generous bound: a FIFO must never block.
    fn promptly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("returned promptly")
    }

    #[test]
    fn a_small_regular_file_is_read_whole_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("..2024_01_01");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("secret"), b"s3cret\n").unwrap();
        std::os::unix::fs::symlink("..2024_01_01", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/secret", dir.path().join("secret")).unwrap();
        let got = read_regular(&dir.path().join("secret"), MAX_SECRET_FILE).unwrap();
        assert_eq!(got, b"s3cret\n");
    }

    #[test]
    fn devices_fifos_folders_and_big_files_are_refused_promptly() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let big = dir.path().join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(200 * 1024 * 1024)
            .unwrap();
        for (path, says) in [
            (Path::new("/dev/zero").to_owned(), "not a regular file"),
            (fifo, "not a regular file"),
            (dir.path().to_owned(), "not a regular file"),
            (big, "more than the 64 KiB allowed"),
            (dir.path().join("missing"), "cannot read"),
        ] {
            let p = path.clone();
            let err = promptly(move || read_regular(&p, MAX_SECRET_FILE)).unwrap_err();
            assert!(err.contains(says), "{}: {err}", path.display());
            assert!(err.contains(&path.display().to_string()), "{err}");
            if path.exists() {
                let p = path.clone();
                let err = promptly(move || check_regular(&p, MAX_SECRET_FILE)).unwrap_err();
                assert!(err.contains(&path.display().to_string()), "{err}");
            }
        }
    }
}
