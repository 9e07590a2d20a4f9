//! The `criteo-token-proxy` command: dispatch to the command asked for
//! (`cli.rs` of the library) and map its failure to an exit code.

use std::process::ExitCode;

use clap::Parser;
use criteo_token_proxy::cli::{self, Cli, Command, Failure, StoreCommand};

/// mimalloc: measured against glibc's malloc on the nginx comparison, it
/// takes fewer instructions per request (see the README's Performance
/// section). Transparent huge pages are turned off for the process (as
/// mimalloc's `allow_thp=0` does), or its arenas would be backed by 2 MiB
/// pages and peak memory would nearly double.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a configuration that cannot be used (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;
/// Exit code for a command line that cannot be used (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    // Best effort: an old kernel or a seccomp filter may refuse it, which
    // costs memory, not correctness.
    let _ = nix::sys::prctl::set_thp_disable(true);
    let args = Cli::parse();
    let done = match &args.command {
        Some(Command::ConsentUrl(consent)) => cli::consent_url(args.config.as_deref(), consent),
        Some(_) if args.dev => {
            eprintln!("criteo-token-proxy: --dev runs the sandbox and takes no subcommand");
            Err(Failure::Usage)
        }
        Some(Command::CheckConfig) => cli::check_config(args.config.as_deref()),
        Some(Command::Store {
            command: StoreCommand::Copy(copy),
        }) => cli::store_copy(args.config.as_deref(), copy),
        None if args.dev => cli::dev(args.log_format),
        None => cli::proxy(args.config, args.log_format),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config) => ExitCode::from(EXIT_CONFIG),
        Err(Failure::Usage) => ExitCode::from(EXIT_USAGE),
        Err(Failure::Runtime) => ExitCode::FAILURE,
    }
}
