//! The commands of the `criteo-token-proxy` binary: the clap types, and
//! each command as a function whose failure says which exit code it means
//! ([`Failure`]); `main.rs` only dispatches and maps those to codes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use secrecy::ExposeSecret;
use tracing_subscriber::EnvFilter;
use url::Url;

use crate::config::{Grant, SecretSource};
use crate::oauth::consent;
use crate::{App, Config, Listeners, dev};

/// Longest `consent-url --valid-for`: a consent link is a credential.
const MAX_VALID_FOR: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why a command failed, already reported on stderr or in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The configuration cannot be used (sysexits `EX_CONFIG`).
    Config,
    /// The command line cannot be used (sysexits `EX_USAGE`).
    Usage,
    /// Anything else: a port that cannot be bound, a worker that did not
    /// start.
    Runtime,
}

#[derive(Debug, Parser)]
#[command(version, about = "A token-refreshing reverse proxy for the Criteo API")]
pub struct Cli {
    /// The TOML configuration file.
    #[arg(long, global = true, env = "CRITEO_PROXY_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CRITEO_PROXY_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Run a sandbox: an embedded stand-in for Criteo on loopback and the
    /// proxy in front of it, with a demo tenant. No credentials needed;
    /// nothing reaches Criteo.
    #[arg(long, conflicts_with = "config")]
    pub dev: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration and print it with every secret redacted.
    CheckConfig,
    /// Print a consent URL: for a refresh-token tenant (--tenant), or a
    /// signed one for a client-credentials app (--state, --redirect-uri).
    ConsentUrl(ConsentUrlArgs),
    /// Work on a token store (stop the proxy that uses it first).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy every tenant's refresh token from one store to another, e.g.
    /// from the embedded store to PostgreSQL before running replicas.
    ///
    /// The source is only read, never changed, and is held for the whole
    /// copy: a proxy running on it refuses the copy (stop it first), and
    /// one started meanwhile is refused. A tenant the destination already
    /// holds is never overwritten: the copy is refused before anything is
    /// written, unless --skip-existing. Prints each tenant copied (name and
    /// client_id, never a token) and a summary. With --config, each
    /// tenant's client_id is taken from the proxy's configuration where the
    /// source records none (JSON stores of earlier releases); PostgreSQL
    /// needs one.
    ///
    /// Exit codes: 0 copied; 64 unusable arguments (no such file, unknown
    /// format, a client_id missing); 78 invalid --config; 1 anything else
    /// (source in use, tenants already in the destination, I/O).
    Copy(StoreCopyArgs),
}

#[derive(Debug, clap::Args)]
pub struct StoreCopyArgs {
    /// The store to read: a token store file (SQLite, or the JSON file of
    /// an earlier release), or a postgres:// URL.
    #[arg(long, value_name = "PATH|URL")]
    from: String,
    /// The store to write: a SQLite file (created, mode 0600, if missing)
    /// or a postgres:// URL.
    #[arg(long, value_name = "PATH|URL")]
    to: String,
    /// Copy the other tenants when the destination already holds some
    /// (those are left as they are, and listed as skipped).
    #[arg(long)]
    skip_existing: bool,
}

#[derive(Debug, clap::Args)]
pub struct ConsentUrlArgs {
    /// A `grant = "refresh_token"` tenant of the configuration.
    #[arg(long, conflicts_with_all = ["signing_key", "signing_secret_file", "state", "redirect_uri", "timestamp"])]
    tenant: Option<String>,
    /// How long the link's state stays valid (--tenant only).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    valid_for: Duration,
    /// Public signing key of the app's connector (else `consent.signing_key`).
    #[arg(long)]
    signing_key: Option<String>,
    /// File holding the secret signing key (else `consent.signing_secret(_file)`).
    #[arg(long, value_name = "PATH")]
    signing_secret_file: Option<PathBuf>,
    /// Returned as-is in Criteo's consent callback (e.g. your user's id).
    #[arg(long)]
    state: Option<String>,
    /// Where Criteo sends the person after consent.
    #[arg(long)]
    redirect_uri: Option<String>,
    /// Unix seconds to sign (default: now).
    #[arg(long)]
    timestamp: Option<u64>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The main runtime. The proxy listener is served by its own worker
/// threads (one single-threaded runtime each); this one runs the acceptor,
/// the admin listener and the token refreshers, which are light.
fn main_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("criteo-token-proxy: cannot start the runtime: {e}");
            Failure::Runtime
        })
}

/// The proxy: the configuration validated before anything is bound, then
/// served until SIGTERM or SIGINT, reloaded from its file on SIGHUP.
pub fn proxy(config_path: Option<PathBuf>, log_format: LogFormat) -> Result<(), Failure> {
    let config = load(config_path.as_deref())?;
    init_tracing(log_format);
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    main_runtime()?.block_on(serve(config, config_path, |_| {}))
}

/// Binds the listeners, tells `announce` where, and serves until SIGTERM or
/// SIGINT. With `reload`, SIGHUP or a change to that file (or a secret file
/// it names) reloads the configuration.
async fn serve(
    config: Config,
    reload: Option<PathBuf>,
    announce: impl FnOnce(&Listeners),
) -> Result<(), Failure> {
    let shutdown = shutdown_signal();
    let failed = |e: &dyn std::fmt::Display| {
        tracing::error!("{e}");
        Failure::Runtime
    };
    let listeners = Listeners::bind(&config).await.map_err(|e| failed(&e))?;
    let app = App::new(config).map_err(|e| failed(&e))?;
    announce(&listeners);
    let app = match reload {
        Some(path) => app.reload_from(path),
        None => app,
    };
    app.run(listeners, shutdown).await.map_err(|e| failed(&e))
}

/// `--dev`: the sandbox stand-in and the real proxy in front of it.
pub fn dev(log_format: LogFormat) -> Result<(), Failure> {
    init_tracing(log_format);
    main_runtime()?.block_on(async {
        let sandbox = dev::start().await.map_err(|e| {
            tracing::error!("cannot start the sandbox: {e}");
            Failure::Runtime
        })?;
        let config = Config::from_toml_with_env(&sandbox.config_toml()).map_err(|e| {
            print_problems(&e);
            Failure::Config
        })?;
        serve(config, None, |listeners| sandbox.announce(listeners)).await
    })
}

/// `check-config`: the effective configuration on stdout (valid input
/// again), warnings and the verdict on stderr.
pub fn check_config(config_path: Option<&Path>) -> Result<(), Failure> {
    let config = load(config_path)?;
    match config.redacted_toml() {
        Ok(text) => print!("{text}"),
        Err(e) => {
            eprintln!("criteo-token-proxy: cannot print the configuration: {e}");
            return Err(Failure::Config);
        }
    }
    for warning in config.warnings() {
        eprintln!("warning: {warning}");
    }
    eprintln!("configuration is valid");
    Ok(())
}

fn load(path: Option<&Path>) -> Result<Config, Failure> {
    Config::load(path).map_err(|e| {
        print_problems(&e);
        Failure::Config
    })
}

fn print_problems(e: &crate::ConfigError) {
    eprintln!("criteo-token-proxy: invalid configuration:");
    for p in &e.problems {
        eprintln!("  {p}");
    }
}

fn usage(msg: &str) -> Failure {
    eprintln!("criteo-token-proxy consent-url: {msg}");
    Failure::Usage
}

/// The `consent-url` command: the URL on stdout.
pub fn consent_url(config_path: Option<&Path>, args: &ConsentUrlArgs) -> Result<(), Failure> {
    let url = make_consent_url(config_path, args)?;
    println!("{url}");
    Ok(())
}

fn make_consent_url(config_path: Option<&Path>, args: &ConsentUrlArgs) -> Result<String, Failure> {
    let config = match config_path {
        Some(p) => Some(load(Some(p))?),
        None => None,
    };
    let now = crate::admin::onboarding::unix_now();
    if let Some(name) = &args.tenant {
        if args.valid_for > MAX_VALID_FOR {
            return Err(usage(&format!(
                "--valid-for must be at most {}",
                humantime::format_duration(MAX_VALID_FOR)
            )));
        }
        let Some(config) = config else {
            return Err(usage("--tenant needs --config"));
        };
        let Some(t) = config.tenants.iter().find(|t| &t.name == name) else {
            return Err(usage(&format!("tenant {name:?} is not configured")));
        };
        if t.grant != Grant::RefreshToken {
            return Err(usage(&format!(
                "tenant {name:?} uses client credentials; it needs no consent URL (see --signing-key for programmatic consent)"
            )));
        }
        let key = t
            .client_secret
            .load()
            .map_err(|e| usage(&format!("tenants.{name}.client_secret: {e}")))?;
        let state = consent::issue_state(key.expose_secret().as_bytes(), name, now, args.valid_for);
        let url = consent::authorize_url(
            &config.upstream.consent_url,
            &t.client_id,
            t.redirect_uri.as_deref().unwrap_or_default(),
            &state,
        );
        return Ok(url.to_string());
    }

    let (Some(state), Some(redirect_uri)) = (&args.state, &args.redirect_uri) else {
        return Err(usage(
            "give --tenant NAME (authorization-code tenant), or --state and --redirect-uri (signed URL for a client-credentials app)",
        ));
    };
    let from_config = config.as_ref().and_then(|c| c.consent.as_ref());
    let Some(key) = args
        .signing_key
        .clone()
        .or_else(|| from_config.map(|c| c.signing_key.clone()))
    else {
        return Err(usage(
            "no signing key: give --signing-key or set consent.signing_key",
        ));
    };
    let secret = match (&args.signing_secret_file, from_config) {
        (Some(p), _) => SecretSource::File(p.clone()).load(),
        (None, Some(c)) => c.signing_secret.load(),
        (None, None) => {
            return Err(usage(
                "no signing secret: give --signing-secret-file or set consent.signing_secret_file",
            ));
        }
    }
    .map_err(|e| usage(&format!("signing secret: {e}")))?;
    let base = config.as_ref().map_or_else(
        || Url::parse("https://consent.criteo.com/request").expect("valid URL"),
        |c| c.upstream.consent_url.clone(),
    );
    Ok(consent::signed_consent_url(
        &base,
        &key,
        secret.expose_secret().as_bytes(),
        args.timestamp.unwrap_or(now),
        state,
        redirect_uri,
    ))
}

/// `store copy`: what was copied on stdout, a failure on stderr.
pub fn store_copy(config_path: Option<&Path>, args: &StoreCopyArgs) -> Result<(), Failure> {
    use crate::store::copy;
    let failed = |e: copy::CopyError| {
        eprintln!("criteo-token-proxy store copy: {e}");
        if e.is_usage() {
            Failure::Usage
        } else {
            Failure::Runtime
        }
    };
    let client_ids = match config_path {
        Some(p) => Some(
            load(Some(p))?
                .tenants
                .into_iter()
                .map(|t| (t.name, t.client_id))
                .collect(),
        ),
        None => None,
    };
    let job =
        copy::Copy::parse(&args.from, &args.to, args.skip_existing, client_ids).map_err(failed)?;
    // Only warnings: what the copy did is its own output.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mut out = std::io::stdout().lock();
    main_runtime()?
        .block_on(copy::run(&job, &mut out))
        .map(drop)
        .map_err(failed)
}

/// Logs go to stderr; colour only when that is a terminal (a file, a pipe
/// or a log collector gets plain text) and `NO_COLOR` is not set.
fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on SIGTERM (Kubernetes) or SIGINT (Ctrl-C). The handlers are
/// installed now, not when the future is first polled: a signal that
/// arrives just after the listeners are announced must still drain
/// gracefully instead of killing the process.
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    async move {
        tokio::select! {
            () = next(&mut int) => tracing::info!("SIGINT received"),
            () = next(&mut term) => tracing::info!("SIGTERM received"),
        }
    }
}

/// The next delivery of a signal; never, when its handler could not be
/// installed.
#[cfg(unix)]
async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("SIGINT received");
    }
}
