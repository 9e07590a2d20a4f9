//! `criteo-token-proxy store copy --from SRC --to DST`: every tenant's
//! record (refresh token, refused flag, `client_id`) and every presented
//! seed, from one store to another, through [`TokenStore`]. This is how an
//! operator moves from the embedded store to the shared one (one replica
//! to many) without asking advertisers to consent again.
//!
//! The source is never written, and is held for the whole copy: a running
//! proxy rotating its tokens meanwhile would leave the destination with
//! spent ones. A tenant the destination already holds is never
//! overwritten (each write is a put at [`Generation::NONE`]); the copy is
//! refused before anything is written, unless `--skip-existing`.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::snapshot::Snapshot;
use super::{
    Generation, Key, PgOptions, PgStore, Put, PutError, StoreError, TokenStore, disk, sqlite,
};
use crate::config::SecretSource;
use crate::metrics::StoreErrors;

/// Where a store is, as given to `--from` or `--to`.
pub(crate) enum StoreSpec {
    /// The JSON token store of an earlier release (a source only).
    Json(PathBuf),
    Sqlite(PathBuf),
    /// A `postgres://` or `postgresql://` URL (it may hold a password).
    Postgres(SecretString),
}

/// Which end of the copy an argument names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Source,
    Destination,
}

impl Side {
    fn flag(self) -> &'static str {
        match self {
            Side::Source => "--from",
            Side::Destination => "--to",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CopyError {
    /// The command line names no usable store (exit 64).
    #[error("{0}")]
    Usage(String),
    /// The source is held by a running proxy.
    #[error(
        "--from {path}: a running criteo-token-proxy holds this store: stop the proxy first (it would keep rotating the tokens being copied, and the copy would hold spent ones), then run the copy again"
    )]
    SourceInUse { path: String },
    #[error("{flag} {location}: {message}")]
    Store {
        flag: &'static str,
        location: String,
        message: String,
    },
    /// Tenants DST already holds, without `--skip-existing`.
    #[error(
        "--to {location} already holds tenant(s) {}: nothing was copied, and their records are left as they are; give --skip-existing to copy the others",
        names.join(", ")
    )]
    Exists {
        location: String,
        names: Vec<String>,
    },
}

impl CopyError {
    fn store(side: Side, location: &str, e: impl fmt::Display) -> Self {
        let message = e.to_string();
        CopyError::Store {
            flag: side.flag(),
            location: location.to_owned(),
            message: message
                .strip_prefix("store.path: ")
                .unwrap_or(&message)
                .to_owned(),
        }
    }

    /// True for a command line that cannot be used (exit 64).
    pub(crate) fn is_usage(&self) -> bool {
        matches!(self, CopyError::Usage(_))
    }
}

impl fmt::Display for StoreSpec {
    /// The path, or the URL without its password or parameters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Json(p) | StoreSpec::Sqlite(p) => write!(f, "{}", p.display()),
            StoreSpec::Postgres(url) => match url::Url::parse(url.expose_secret()) {
                Ok(u) => {
                    let host = u.host_str().unwrap_or("");
                    let user = match u.username() {
                        "" => String::new(),
                        name => format!("{name}@"),
                    };
                    let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
                    write!(f, "{}://{user}{host}{port}{}", u.scheme(), u.path())
                }
                Err(_) => f.write_str("<a PostgreSQL URL>"),
            },
        }
    }
}

impl StoreSpec {
    /// Reads `arg`: a PostgreSQL URL, else a path whose first bytes say
    /// the format. A missing file is a new SQLite database as a
    /// destination, an error as a source.
    pub(crate) fn parse(arg: &str, side: Side) -> Result<Self, CopyError> {
        let flag = side.flag();
        let lower = arg.get(..13).unwrap_or(arg).to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            return Ok(StoreSpec::Postgres(SecretString::from(arg)));
        }
        if arg.is_empty() {
            return Err(CopyError::Usage(format!("{flag} is empty")));
        }
        let path = PathBuf::from(arg);
        let resolved =
            disk::resolve(&path).map_err(|e| CopyError::Usage(format!("{flag} {arg}: {e}")))?;
        let head = disk::read_head(&resolved, 16)
            .map_err(|e| CopyError::Usage(format!("{flag} {arg}: cannot read it: {e}")))?;
        match (head, side) {
            (None, Side::Source) => Err(CopyError::Usage(format!(
                "{flag} {arg}: no such file (give the store.path of the proxy whose tokens to copy)"
            ))),
            (Some(h), Side::Source) if h.is_empty() => Err(CopyError::Usage(format!(
                "{flag} {arg}: the file is empty: it holds no token"
            ))),
            (None, Side::Destination) => Ok(StoreSpec::Sqlite(path)),
            (Some(h), Side::Destination) if h.is_empty() => Ok(StoreSpec::Sqlite(path)),
            (Some(h), _) if h == sqlite::MAGIC => Ok(StoreSpec::Sqlite(path)),
            (Some(h), Side::Source) if h.trim_ascii_start().starts_with(b"{") => {
                Ok(StoreSpec::Json(path))
            }
            (Some(h), Side::Destination) if h.trim_ascii_start().starts_with(b"{") => {
                Err(CopyError::Usage(format!(
                    "{flag} {arg}: a JSON token store of an earlier release: this release writes only SQLite or PostgreSQL (give a new file name)"
                )))
            }
            (Some(_), _) => Err(CopyError::Usage(format!(
                "{flag} {arg}: unknown format: neither a SQLite database nor a JSON token store"
            ))),
        }
    }

    /// Whether records need a `client_id` there: PostgreSQL keys tenants
    /// by name and `client_id`, so that deployments can share a database.
    fn keys_by_client_id(&self) -> bool {
        matches!(self, StoreSpec::Postgres(_))
    }
}

/// Opens the source of a copy, read-only and held against a running proxy.
pub(crate) async fn open_source(spec: &StoreSpec) -> Result<Arc<dyn TokenStore>, CopyError> {
    let location = spec.to_string();
    let opened = match spec {
        StoreSpec::Json(path) => Snapshot::json(path),
        StoreSpec::Sqlite(path) => Snapshot::sqlite(path),
        StoreSpec::Postgres(url) => {
            let store = connect(url, Side::Source, &location).await?;
            // No lock spans replicas: a proxy's session on the database
            // is what says one is running.
            match store.running_proxies().await {
                Ok(0) => return Ok(Arc::new(store)),
                Ok(_) => return Err(CopyError::SourceInUse { path: location }),
                Err(e) => return Err(CopyError::store(Side::Source, &location, e)),
            }
        }
    };
    match opened {
        Ok(store) => Ok(Arc::new(store)),
        Err(StoreError::InUse { .. }) => Err(CopyError::SourceInUse { path: location }),
        Err(e) => Err(CopyError::store(Side::Source, &location, e)),
    }
}

/// Opens (or creates) the destination: as the proxy opens its store, so a
/// new file is private and created exclusively, and a proxy running on it
/// refuses the copy.
pub(crate) async fn open_destination(spec: &StoreSpec) -> Result<Arc<dyn TokenStore>, CopyError> {
    let location = spec.to_string();
    match spec {
        StoreSpec::Sqlite(path) => super::open(path).map_err(|e| match e {
            StoreError::InUse { .. } => CopyError::store(
                Side::Destination,
                &location,
                "a running criteo-token-proxy holds this store: stop it first",
            ),
            e => CopyError::store(Side::Destination, &location, e),
        }),
        StoreSpec::Json(_) => Err(CopyError::Usage(format!(
            "--to {location}: a JSON token store is never written by this release"
        ))),
        StoreSpec::Postgres(url) => Ok(Arc::new(connect(url, Side::Destination, &location).await?)),
    }
}

/// The shared store at `url`, once connected with its schema in place (at
/// most 10 s).
async fn connect(url: &SecretString, side: Side, location: &str) -> Result<PgStore, CopyError> {
    let options = PgOptions {
        url: SecretSource::Inline(url.clone()),
        lease: Duration::from_secs(15),
        poll_interval: Duration::from_secs(1),
        errors: StoreErrors::default(),
    };
    PgStore::connect(options, Duration::from_secs(10))
        .await
        .map_err(|e| CopyError::store(side, location, e))
}

/// What to copy, and how.
pub(crate) struct Copy {
    pub from: StoreSpec,
    pub to: StoreSpec,
    /// Copy the other tenants when DST already holds some (else refuse).
    pub skip_existing: bool,
    /// Each configured tenant's `client_id` (from `--config`): records of
    /// a JSON store carry none.
    pub client_ids: Option<HashMap<String, String>>,
}

impl Copy {
    /// The copy the command line asks for (see [`StoreSpec::parse`]).
    pub(crate) fn parse(
        from: &str,
        to: &str,
        skip_existing: bool,
        client_ids: Option<HashMap<String, String>>,
    ) -> Result<Self, CopyError> {
        let same = match (disk::resolve(Path::new(from)), disk::resolve(Path::new(to))) {
            (Ok(a), Ok(b)) => a == b,
            _ => from == to,
        };
        if same {
            return Err(CopyError::Usage(format!(
                "--from and --to are the same store ({from})"
            )));
        }
        Ok(Self {
            from: StoreSpec::parse(from, Side::Source)?,
            to: StoreSpec::parse(to, Side::Destination)?,
            skip_existing,
            client_ids,
        })
    }
}

/// What a copy did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Copied {
    pub tenants: usize,
    pub skipped: usize,
    pub seeds: usize,
}

/// Runs the copy; writes one line per tenant to `out` (names and
/// `client_id`s only: never a token) and the summary.
pub(crate) async fn run(copy: &Copy, out: &mut dyn Write) -> Result<Copied, CopyError> {
    let (src_at, dst_at) = (copy.from.to_string(), copy.to.to_string());
    // The source first: its lock is held before DST is touched, and DST
    // is not touched before the records are known to fit it.
    let src = open_source(&copy.from).await?;
    let src_error = |e| CopyError::store(Side::Source, &src_at, e);
    let dst_error = |e: &dyn fmt::Display| CopyError::store(Side::Destination, &dst_at, e);

    let mut listed = src.all().await.map_err(src_error)?;
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(ids) = &copy.client_ids {
        for l in listed.iter_mut().filter(|l| l.client_id.is_empty()) {
            if let Some(id) = ids.get(&l.name) {
                l.client_id.clone_from(id);
            }
        }
    }
    let missing: Vec<_> = listed
        .iter()
        .filter(|l| l.client_id.is_empty())
        .map(|l| l.name.clone())
        .collect();
    if copy.to.keys_by_client_id() && !missing.is_empty() {
        let hint = match copy.client_ids {
            Some(_) => "they are not in the configuration given: add them to it",
            None => {
                "give --config with the proxy's configuration: each tenant's client_id is taken from it"
            }
        };
        return Err(CopyError::Usage(format!(
            "--from {src_at} records no client_id for tenant(s) {} (a JSON store of an earlier release), and {dst_at} keys tenants by client_id: {hint}",
            missing.join(", ")
        )));
    }

    let dst = open_destination(&copy.to).await?;
    let mut existing = Vec::new();
    for l in &listed {
        let key = key(l);
        if dst.get(key).await.map_err(|e| dst_error(&e))?.is_some() {
            existing.push(l.name.clone());
        }
    }
    if !existing.is_empty() && !copy.skip_existing {
        return Err(CopyError::Exists {
            location: dst_at,
            names: existing,
        });
    }

    let mut done = Copied::default();
    for l in &listed {
        let put = Put {
            refresh_token: &l.record.refresh_token,
            rejected: l.record.rejected,
            adopt_seed: false,
            access: l.record.access.as_ref(),
        };
        match dst.put(key(l), Generation::NONE, put).await {
            Ok(_) => {
                done.tenants += 1;
                let _ = writeln!(out, "copied  {}", describe(l));
            }
            // Held by DST already (checked above, or written since).
            Err(PutError::Stale { .. }) if copy.skip_existing => {
                done.skipped += 1;
                let _ = writeln!(
                    out,
                    "skipped {}: {dst_at} already holds it (left as it is)",
                    l.name
                );
            }
            Err(PutError::Stale { .. }) => {
                return Err(CopyError::Exists {
                    location: dst_at,
                    names: vec![l.name.clone()],
                });
            }
            Err(PutError::Io(e)) => {
                return Err(dst_error(&format!("cannot write tenant {}: {e}", l.name)));
            }
        }
    }
    // A tenant whose stored token Criteo refused falls back to its config
    // seed unless that seed was presented before: without these, it would
    // present a spent one again.
    let seeds = src.presented_seeds().await.map_err(src_error)?;
    dst.add_presented_seeds(&seeds)
        .await
        .map_err(|e| dst_error(&format!("cannot record the presented seeds: {e}")))?;
    done.seeds = seeds.len();
    let _ = writeln!(
        out,
        "copied {} tenant(s) and {} presented seed(s) from {src_at} to {dst_at}; {} skipped (already in {dst_at})",
        done.tenants, done.seeds, done.skipped
    );
    Ok(done)
}

fn key(l: &super::contract::Listed) -> Key<'_> {
    Key {
        name: &l.name,
        client_id: &l.client_id,
    }
}

/// A tenant as printed: its name, its `client_id`, and whether it needs
/// a new consent (never its token).
fn describe(l: &super::contract::Listed) -> String {
    let id = match l.client_id.as_str() {
        "" => "no client_id recorded".to_owned(),
        id => format!("client_id {id}"),
    };
    let refused = if l.record.rejected {
        ", consent required: Criteo refused its token"
    } else {
        ""
    };
    format!("{} ({id}{refused})", l.name)
}
