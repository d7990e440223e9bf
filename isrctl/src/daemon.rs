//! Reaching isrfsd: its socket if it runs, starting it when a command needs
//! it ([`ensure_daemon`]), and one control call off the async threads
//! ([`call`]). What is asked of it is the commands' business.
//!
//! Uses only [`crate::context`] (see the layering in `main.rs`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use isr::control::{ControlError, Request, Response, WireStore};
use tokio::task::JoinHandle;

use crate::context::CommandContext;

/// glibc malloc arenas for the isrfsd that isrctl starts (the systemd unit
/// sets the same). glibc's default, 8 per core, lets each FUSE thread keep
/// the 128 KiB chunk buffers it freed: 67–74 MiB peak after 4 KiB random
/// reads, 56 MiB with 2, at the same throughput (docs/decisions.md). A
/// `MALLOC_ARENA_MAX` already in the environment is kept.
const ISRFSD_MALLOC_ARENAS: &str = "2";

/// The daemon's socket, starting isrfsd first if nothing answers there.
pub fn ensure_daemon(context: &CommandContext) -> anyhow::Result<PathBuf> {
    let runtime_dir = &context.config.runtime_dir;
    let socket = isr::control::socket_path(runtime_dir);
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        tracing::info!("isrfsd answers on {}", socket.display());
        return Ok(socket);
    }
    tracing::info!("no isrfsd on {}: starting one", socket.display());
    isr::private::private_dir(runtime_dir)
        .with_context(|| format!("creating {}", runtime_dir.display()))?;
    let beside_us = std::env::current_exe()?.with_file_name("isrfsd");
    let program = if beside_us.exists() {
        beside_us
    } else {
        PathBuf::from("isrfsd")
    };
    let log_path = runtime_dir.join("isrfsd.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut command = std::process::Command::new(&program);
    command
        .arg("--runtime-dir")
        .arg(runtime_dir)
        .arg("--state-dir")
        .arg(&context.config.state_dir)
        .arg("--cache-dir")
        .arg(&context.config.cache_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(config) = &context.global.config {
        command.arg("--config").arg(config);
    }
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        command.env("MALLOC_ARENA_MAX", ISRFSD_MALLOC_ARENAS);
    }
    let mut child = command.spawn().with_context(|| {
        format!(
            "starting {} (is isrfsd installed next to isrctl?)",
            program.display()
        )
    })?;
    eprintln!(
        "isrctl: started isrfsd (pid {}, log {})",
        child.id(),
        log_path.display()
    );
    for _ in 0..200 {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Ok(socket);
        }
        if let Ok(Some(status)) = child.try_wait() {
            anyhow::bail!(
                "isrfsd exited ({status}) before it was ready; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    anyhow::bail!(
        "isrfsd did not answer on {} within 10 s; see {}",
        socket.display(),
        log_path.display()
    )
}

/// The daemon's socket if isrfsd answers there (a command that only asks
/// about sessions does not start it).
pub fn socket_if_running(context: &CommandContext) -> Option<PathBuf> {
    let socket = isr::control::socket_path(&context.config.runtime_dir);
    std::os::unix::net::UnixStream::connect(&socket)
        .is_ok()
        .then_some(socket)
}

/// The store as the daemon is told to open it: this command's store and settings.
pub fn wire_store(context: &CommandContext) -> WireStore {
    WireStore {
        url: context.config.store.clone(),
        s3: context.config.s3.clone(),
        retry: context.config.retry,
    }
}

/// Starts one control call on a blocking thread (the call blocks on the
/// socket); await the handle for the daemon's answer.
pub fn call(socket: &Path, request: Request) -> JoinHandle<Result<Response, ControlError>> {
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || isr::control::call(&socket, request))
}
