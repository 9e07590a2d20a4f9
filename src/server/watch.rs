//! Hears of changes to the files a reload depends on, so that at rest the
//! proxy does nothing at all: no timer fires and no thread wakes until the
//! kernel reports a change (inotify on Linux, through `notify`). Polling
//! them every 2 s cost a timer, a blocking-pool thread kept alive and a
//! few system calls, about three wake-ups a second (`benches/idle.sh`).
//!
//! For each file, what is watched is the directory of every path met while
//! resolving it (each symbolic link, then the file it leads to) and that
//! file itself. So an edit in place (through any mount of the file), a file
//! replaced by rename, deleted and created again, and the kubelet's atomic
//! swap of a mounted volume's `..data` link are all heard. Events about
//! other entries of those directories (a token store kept beside the
//! configuration, a temporary file) are dropped on the watcher's own
//! thread. What is heard only says "look again": whether anything changed
//! is still decided by comparing the files' stamps (`reload.rs`).
//!
//! A path that cannot be watched (a directory that does not exist yet, the
//! kernel's limit on watches reached, no watcher at all) is reported, and
//! the caller polls until it can be.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use notify::event::ModifyKind;
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;

/// Symbolic links followed at most while resolving one path (Linux's own
/// limit); past it the path is taken as it is.
const MAX_LINKS: usize = 40;

/// What the watcher's thread compares events against.
#[derive(Debug, Default)]
struct Interest {
    /// Every path met while resolving a watched file, and their ancestors:
    /// a change to any of them may change what the file reads.
    paths: HashSet<PathBuf>,
    /// The paths watched now (directories and files).
    watched: HashSet<PathBuf>,
}

/// Shared with the watcher's thread.
#[derive(Debug, Default)]
struct Shared {
    interest: ArcSwap<Interest>,
    /// A watched path was removed or renamed over: its watch went with the
    /// old file, so the next [`FileWatch::follow`] watches everything anew.
    lost: AtomicBool,
    /// Something relevant happened (a permit is kept until it is awaited,
    /// so that a burst of events is heard once).
    heard: Notify,
}

/// The watcher, or why there is none.
#[derive(Debug)]
pub(crate) struct FileWatch {
    shared: Arc<Shared>,
    watcher: Result<Mutex<RecommendedWatcher>, String>,
}

impl FileWatch {
    /// Starts the watcher (a thread that sleeps until the kernel reports an
    /// event); watches nothing yet.
    pub(crate) fn new() -> Self {
        let shared = Arc::new(Shared::default());
        let on_event = {
            let shared = Arc::clone(&shared);
            move |event: notify::Result<Event>| shared.consider(event)
        };
        let watcher = notify::recommended_watcher(on_event)
            .map(Mutex::new)
            .map_err(|e| e.to_string());
        Self { shared, watcher }
    }

    /// Watches what `files` depend on now, and stops watching what they no
    /// longer do. Blocking (file system calls): run it on the blocking pool.
    /// `Err` names a path that could not be watched, and why.
    pub(crate) fn follow(&self, files: &[PathBuf]) -> Result<(), String> {
        let watcher = self.watcher.as_ref().map_err(Clone::clone)?;
        let mut watcher = watcher.lock().unwrap_or_else(PoisonError::into_inner);
        let mut paths = HashSet::new();
        let mut wanted = HashSet::new();
        for file in files {
            let met = resolve(file);
            for p in &met {
                if let Some(dir) = p.parent() {
                    wanted.insert(dir.to_owned());
                }
                paths.extend(p.ancestors().map(Path::to_owned));
            }
            if let Some(target) = met.last().filter(|t| t.is_file()) {
                wanted.insert(target.clone());
            }
        }
        let anew = self.shared.lost.swap(false, Ordering::SeqCst);
        let before = self.shared.interest.load_full();
        let mut watched = HashSet::new();
        let mut failed = None;
        for p in wanted {
            if !anew && before.watched.contains(&p) {
                watched.insert(p);
                continue;
            }
            match watcher.watch(&p, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(p);
                }
                Err(e) => failed = Some(format!("{}: {e}", p.display())),
            }
        }
        for gone in before.watched.difference(&watched) {
            let _ = watcher.unwatch(gone);
        }
        self.shared
            .interest
            .store(Arc::new(Interest { paths, watched }));
        failed.map_or(Ok(()), Err)
    }

    /// Resolves once a change to a watched file was heard since the last
    /// time this resolved.
    pub(crate) async fn heard(&self) {
        self.shared.heard.notified().await;
    }
}

impl Shared {
    /// On the watcher's thread: is this event worth a look?
    fn consider(&self, event: notify::Result<Event>) {
        let Ok(event) = event else {
            // Events may have been lost (the kernel's queue overflowed).
            self.lost.store(true, Ordering::SeqCst);
            self.heard.notify_one();
            return;
        };
        // Opening and reading (the proxy reads its secret files at every
        // token request) change nothing.
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        let interest = self.interest.load();
        let gone = matches!(
            event.kind,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
        );
        if event.need_rescan() || (gone && event.paths.iter().any(|p| interest.watched.contains(p)))
        {
            self.lost.store(true, Ordering::SeqCst);
        }
        if event.need_rescan() || event.paths.iter().any(|p| interest.paths.contains(p)) {
            self.heard.notify_one();
        }
    }
}

/// One step of a path being resolved.
enum Step {
    /// A prefix or the root: resolving starts over from it.
    Root(OsString),
    Up,
    Name(OsString),
}

fn steps(path: &Path) -> impl DoubleEndedIterator<Item = Step> + '_ {
    path.components().filter_map(|c| match c {
        Component::Prefix(_) | Component::RootDir => Some(Step::Root(c.as_os_str().to_owned())),
        Component::CurDir => None,
        Component::ParentDir => Some(Step::Up),
        Component::Normal(n) => Some(Step::Name(n.to_owned())),
    })
}

/// Every path met while resolving `path` as the kernel does: each symbolic
/// link (one swapped changes what `path` reads), then where it leads (last;
/// the rest of the path unresolved where a part is missing).
fn resolve(path: &Path) -> Vec<PathBuf> {
    let absolute = std::env::current_dir().unwrap_or_default().join(path);
    let mut todo: Vec<Step> = steps(&absolute).rev().collect();
    let mut at = PathBuf::new();
    let mut met = Vec::new();
    while let Some(step) = todo.pop() {
        match step {
            Step::Root(r) => at.push(r),
            Step::Up => {
                at.pop();
            }
            Step::Name(name) => {
                let next = at.join(name);
                match std::fs::read_link(&next) {
                    Ok(target) if met.len() < MAX_LINKS => {
                        todo.extend(steps(&target).rev());
                        met.push(next);
                    }
                    _ => at = next,
                }
            }
        }
    }
    met.push(at);
    met
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::time::Duration;

    use super::*;

    #[test]
    fn resolving_a_kubernetes_mount_meets_both_links_then_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("..2026_a")).unwrap();
        std::fs::write(root.join("..2026_a/secret"), "s").unwrap();
        symlink("..2026_a", root.join("..data")).unwrap();
        symlink("..data/secret", root.join("secret")).unwrap();
        assert_eq!(
            resolve(&root.join("secret")),
            [
                root.join("secret"),
                root.join("..data"),
                root.join("..2026_a/secret")
            ]
        );
    }

    #[test]
    fn resolving_a_missing_file_keeps_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let missing = root.join("no/such/../file");
        assert_eq!(resolve(&missing), [root.join("no/file")]);
    }

    #[test]
    fn a_link_loop_ends() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        symlink("b", root.join("a")).unwrap();
        symlink("a", root.join("b")).unwrap();
        assert_eq!(resolve(&root.join("a")).len(), MAX_LINKS + 1);
    }

    /// Whether a change was heard (a permit is waiting), without waiting.
    async fn was_heard(shared: &Shared) -> bool {
        tokio::select! {
            biased;
            () = shared.heard.notified() => true,
            () = std::future::ready(()) => false,
        }
    }

    fn shared_watching(file: &Path) -> Shared {
        let shared = Shared::default();
        shared.interest.store(Arc::new(Interest {
            paths: file.ancestors().map(Path::to_owned).collect(),
            watched: [file.to_owned(), file.parent().unwrap().to_owned()].into(),
        }));
        shared
    }

    #[tokio::test]
    async fn reads_and_neighbours_are_not_heard() {
        let shared = shared_watching(Path::new("/etc/proxy/proxy.toml"));
        let read = EventKind::Access(notify::event::AccessKind::Open(
            notify::event::AccessMode::Any,
        ));
        shared.consider(Ok(Event::new(read).add_path("/etc/proxy/proxy.toml".into())));
        let written = EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any));
        shared.consider(Ok(
            Event::new(written).add_path("/etc/proxy/tokens.db".into())
        ));
        assert!(!was_heard(&shared).await);
        shared.consider(Ok(
            Event::new(written).add_path("/etc/proxy/proxy.toml".into())
        ));
        assert!(was_heard(&shared).await);
        assert!(!shared.lost.load(Ordering::SeqCst), "still watched");
    }

    #[tokio::test]
    async fn a_file_renamed_over_is_heard_and_watched_anew() {
        let shared = shared_watching(Path::new("/etc/proxy/proxy.toml"));
        let renamed = EventKind::Modify(ModifyKind::Name(notify::event::RenameMode::To));
        shared.consider(Ok(
            Event::new(renamed).add_path("/etc/proxy/proxy.toml".into())
        ));
        assert!(was_heard(&shared).await);
        assert!(shared.lost.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_write_in_place_is_heard_from_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("proxy.toml");
        std::fs::write(&file, "a").unwrap();
        let watch = FileWatch::new();
        watch.follow(std::slice::from_ref(&file)).unwrap();
        std::fs::write(&file, "b").unwrap();
        tokio::time::timeout(Duration::from_secs(10), watch.heard())
            .await
            .expect("heard");
    }
}
