//! `isrfsd`: the isr daemon. One process serves every resumed parcel of one
//! runtime directory: a FUSE mount per session, a control socket for `isrctl`
//! (`<runtime dir>/isrfsd.sock`), the shared chunk cache and the fetchers.
//! `isrctl` starts it when it is not running; under systemd it is a service.
//! SIGTERM or SIGINT: every session is flushed and unmounted, and stays
//! resumable (`isrctl resume` reattaches it).

mod daemon;
mod fuse;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::{EnvFilter, fmt};

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
    /// Exit after this many seconds without sessions (0: never). `isrctl`
    /// passes 30 to the daemon it starts; the systemd unit leaves it at 0.
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    idle_exit: u64,
    /// Log into daily files in DIR (`isrfsd.YYYY-MM-DD.log`, the last 7
    /// kept) instead of stderr. `isrctl` passes `<runtime dir>/log`.
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
}

/// The default log filter: fuser's multi-line warnings (e.g. about mount
/// options) say nothing an operator can act on.
const DEFAULT_LOG: &str = "info,fuser=error";

/// Sets up logging: to `log_dir`, else to the journal when stderr is the
/// journal (systemd sets JOURNAL_STREAM), else to stderr. An invalid
/// `ISR_LOG` is reported once and the default used. The guard keeps the
/// file writer flushing until main returns.
fn init_logging(log_dir: Option<&Path>) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, invalid) = match std::env::var("ISR_LOG") {
        Ok(value) if !value.trim().is_empty() => match EnvFilter::try_new(&value) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new(DEFAULT_LOG), Some((value, e))),
        },
        _ => (EnvFilter::new(DEFAULT_LOG), None),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let mut guard = None;
    if let Some(dir) = log_dir {
        let appender = tracing_appender::rolling::Builder::new()
            .rotation(tracing_appender::rolling::Rotation::DAILY)
            .filename_prefix("isrfsd")
            .filename_suffix("log")
            .max_log_files(7)
            .build(dir);
        match appender {
            Ok(appender) => {
                let (writer, g) = tracing_appender::non_blocking(appender);
                guard = Some(g);
                registry
                    .with(fmt::layer().with_writer(writer).with_ansi(false))
                    .init();
            }
            Err(e) => {
                registry
                    .with(fmt::layer().with_writer(std::io::stderr).with_ansi(false))
                    .init();
                tracing::warn!(dir = %dir.display(), error = %e, "cannot log into files there; logging to stderr");
            }
        }
    } else if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(journal) => registry.with(journal).init(),
            // The journal's socket is not there: stderr still goes to it,
            // without our timestamp (the journal adds its own).
            Err(_) => registry
                .with(
                    fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_ansi(false)
                        .without_time(),
                )
                .init(),
        }
    } else {
        registry
            .with(fmt::layer().with_writer(std::io::stderr).with_ansi(false))
            .init();
    }
    if let Some((value, error)) = invalid {
        tracing::warn!(
            "ignoring invalid ISR_LOG={value:?} ({error}); logging with {DEFAULT_LOG:?}"
        );
    }
    guard
}

/// Whether stderr is the journal's stream: JOURNAL_STREAM (`DEV:INODE`, set
/// by systemd) names the file stderr is.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    value.to_string_lossy() == format!("{}:{}", stat.st_dev, stat.st_ino)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log_guard = init_logging(cli.log_dir.as_deref());
    // With the log in files, a fatal error is also said on stderr.
    let logs_to_files = cli.log_dir.is_some();
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
        idle_exit: (cli.idle_exit > 0).then(|| std::time::Duration::from_secs(cli.idle_exit)),
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            if logs_to_files {
                eprintln!("isrfsd: {error:#}");
            }
            ExitCode::from(1)
        }
    }
}
