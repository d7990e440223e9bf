//! `isrfsd`: the isr daemon. One process serves every resumed parcel of one
//! runtime directory: a FUSE mount per session, a control socket for `isrctl`
//! (`<runtime dir>/isrfsd.sock`), the shared chunk cache and the fetchers.
//! `isrctl` starts it when it is not running; under systemd it is a service.
//! SIGTERM or SIGINT: every session is flushed and unmounted, and stays
//! resumable (`isrctl resume` reattaches it).

mod daemon;
mod fuse;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// isr daemon: serves resumed parcels as lazy FUSE mounts. Normally started by
/// `isrctl resume`; run it yourself (or under systemd) to see its log.
#[derive(Debug, Parser)]
#[command(name = "isrfsd", version)]
struct Cli {
    /// Control socket and default mount points.
    #[arg(long, env = "ISR_RUNTIME_DIR", value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// Session state (overlays, records).
    #[arg(long, env = "ISR_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Local chunk cache.
    #[arg(long, env = "ISR_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Configuration file.
    #[arg(long, env = "ISR_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Largest size of the chunk cache in bytes (default: `[cache] max_bytes`, 64 GiB).
    #[arg(long, value_name = "BYTES")]
    cache_size: Option<u64>,
    /// FUSE worker threads per mount (each serves one request at a time; a
    /// warm read request mostly waits on a chunk file, so more than cores).
    #[arg(long, default_value_t = 8, value_name = "N")]
    fuse_threads: usize,
    /// Let other users access the mounts (needs user_allow_other in /etc/fuse.conf for non-root).
    #[arg(long)]
    allow_other: bool,
    /// Stay in the caller's session (do not detach from its terminal).
    #[arg(long)]
    no_detach: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("ISR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    if !cli.no_detach {
        // A new session: no controlling terminal, not killed with the shell that started us.
        let _ = nix::unistd::setsid();
    }
    match daemon::run(daemon::Options {
        runtime_dir: cli.runtime_dir,
        state_dir: cli.state_dir,
        cache_dir: cli.cache_dir,
        config: cli.config,
        cache_size: cli.cache_size,
        fuse_threads: cli.fuse_threads.max(1),
        allow_other: cli.allow_other,
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("isrfsd: {error:#}");
            tracing::error!("{error:#}");
            ExitCode::from(1)
        }
    }
}
