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

/// glibc's mmap threshold for the isrfsd that isrctl starts (the systemd
/// unit sets the same), pinned at 8 MiB: allocations this big or bigger are
/// mapped, and their untouched pages take no memory. Left dynamic, glibc
/// raises the threshold past 16 MiB the first time a big mapped block is
/// freed, and from then on each FUSE thread's 16 MiB receive buffer (fuser
/// allocates one per thread, 8 threads per mount) comes zeroed from the heap,
/// resident: 49–61 MiB more RSS per session instead of 4.4
/// (tests/many_sessions.rs). Chunk buffers (≤ 4 MiB) stay on the heap. A
/// `MALLOC_MMAP_THRESHOLD_` already in the environment is kept.
const ISRFSD_MMAP_THRESHOLD: &str = "8388608";

/// The isrfsd that isrctl starts exits this long after its last session
/// ends (the systemd unit's daemon stays).
const IDLE_EXIT_SECONDS: u64 = 30;

/// Where the isrfsd that isrctl starts logs: `isrfsd.YYYY-MM-DD.log`.
pub fn log_dir(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("log")
}

/// The pid isrfsd wrote into the runtime directory, if that process lives.
fn daemon_pid(runtime_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(runtime_dir.join("isrfsd.pid")).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

/// Whether process `pid` lives (a zombie does not: an isrfsd whose parent
/// is gone may stay one when nothing reaps orphans).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// `isrctl daemon status`: whether isrfsd runs, its pid, socket, sessions
/// and log directory. Exit 0 either way (the answer says which).
pub fn status(context: &CommandContext) -> anyhow::Result<std::process::ExitCode> {
    let runtime_dir = &context.config.runtime_dir;
    let socket = isr::control::socket_path(runtime_dir);
    let running = socket_if_running(context).is_some();
    let pid = daemon_pid(runtime_dir).filter(|_| running);
    let sessions: Vec<String> = match running {
        false => Vec::new(),
        true => match isr::control::call(&socket, Request::Status { parcel: None })? {
            Response::Status { sessions, resuming } => sessions
                .into_iter()
                .map(|s| s.session.parcel)
                .chain(resuming)
                .collect(),
            other => anyhow::bail!("isrfsd answered status with {other:?}"),
        },
    };
    let log_dir = log_dir(runtime_dir);
    if context.global.json {
        let value = serde_json::json!({
            "running": running,
            "pid": pid,
            "socket": socket,
            "sessions": sessions,
            "log_dir": log_dir,
        });
        crate::output::json(&value)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if !running {
        println!(
            "isrfsd is not running (socket {}); `isrctl resume NAME` starts it",
            socket.display()
        );
        return Ok(std::process::ExitCode::SUCCESS);
    }
    match pid {
        Some(pid) => println!("isrfsd is running: pid {pid}"),
        None => println!("isrfsd is running"),
    }
    println!("socket:   {}", socket.display());
    match sessions.is_empty() {
        true => println!("sessions: none"),
        false => println!("sessions: {}", sessions.join(", ")),
    }
    println!(
        "log:      {} (when isrctl started it; under systemd: journalctl -u isrfsd)",
        log_dir.display()
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// `isrctl daemon stop`: asks isrfsd to shut down as SIGTERM does (running
/// VMs saved into their mounts, sessions flushed, unmounted, left
/// resumable) and waits until it has exited.
pub fn stop(context: &CommandContext) -> anyhow::Result<std::process::ExitCode> {
    let runtime_dir = &context.config.runtime_dir;
    let Some(socket) = socket_if_running(context) else {
        crate::output::outcome(
            context.global.json,
            &serde_json::json!({ "stopped": false, "running": false }),
            "isrfsd is not running",
        )?;
        return Ok(std::process::ExitCode::SUCCESS);
    };
    let pid = daemon_pid(runtime_dir);
    match isr::control::call(&socket, Request::Shutdown)? {
        Response::Done => {}
        other => anyhow::bail!("isrfsd answered shutdown with {other:?}"),
    }
    // Saving VMs can take minutes: wait as long as the process lives.
    loop {
        let alive = match pid {
            Some(pid) => alive(pid),
            None => std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        };
        if !alive {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    crate::output::outcome(
        context.global.json,
        &serde_json::json!({ "stopped": true, "running": false }),
        "isrfsd stopped; resumed parcels stay resumable (`isrctl resume NAME` reattaches)",
    )?;
    Ok(std::process::ExitCode::SUCCESS)
}

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
    let log_dir = log_dir(runtime_dir);
    isr::private::private_dir(&log_dir)
        .with_context(|| format!("creating {}", log_dir.display()))?;
    // The log proper goes to isrfsd's daily files (the last 7 kept); stderr
    // only says what comes before logging starts or after it ends (a
    // panic), and is emptied at each start, so both stay bounded.
    let log_path = log_dir.join("isrfsd.stderr");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut command = std::process::Command::new(&program);
    command
        .arg("--idle-exit")
        .arg(IDLE_EXIT_SECONDS.to_string())
        .arg("--log-dir")
        .arg(&log_dir)
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
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        command.env("MALLOC_MMAP_THRESHOLD_", ISRFSD_MMAP_THRESHOLD);
    }
    let mut child = command.spawn().with_context(|| {
        format!(
            "starting {} (is isrfsd installed next to isrctl?)",
            program.display()
        )
    })?;
    eprintln!(
        "isrctl: started isrfsd (pid {}, log in {}; it exits {IDLE_EXIT_SECONDS} s after the last session ends)",
        child.id(),
        log_dir.display()
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
        read_url: context.config.read_url.clone(),
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
