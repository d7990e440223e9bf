//! The isrfsd process: configuration and directories, the control socket,
//! signals and systemd notification, and the FUSE mounter. What the daemon
//! does with requests is the library's [`isr::daemon`].

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use isr::cache::ChunkCache;
use isr::config::Config;
use isr::control;
use isr::daemon::{Daemon, MountHandle, MountState, Mounter, ShutdownStep};
use isr::session::Session;

use crate::fuse::ParcelFs;

/// Daemon settings from the command line.
#[derive(Debug)]
pub struct Options {
    pub runtime_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub cache_size: Option<u64>,
    pub fuse_threads: usize,
    pub allow_other: bool,
    /// Exit after this long without sessions (None: never).
    pub idle_exit: Option<std::time::Duration>,
}

/// How long systemd is asked to wait for each step of the shutdown (a VM's
/// save, a session's flush and unmount) before it kills: each step that
/// starts extends the stop timeout by this much (EXTEND_TIMEOUT_USEC), so
/// saving many VMs is not cut off by one TimeoutStopSec, while a step that
/// hangs still is.
const SHUTDOWN_STEP_BUDGET: std::time::Duration = std::time::Duration::from_secs(300);

/// Mounts sessions with FUSE ([`ParcelFs`]).
struct FuseMounter {
    threads: usize,
    allow_other: bool,
}

impl Mounter for FuseMounter {
    fn mount(
        &self,
        session: &Session,
        mount_point: &Path,
    ) -> std::io::Result<Box<dyn MountHandle>> {
        let mut config = fuser::Config::default();
        let record = session.record();
        let name = if session.is_view() {
            format!("isr:{}@{}", record.parcel, record.base_version)
        } else {
            format!("isr:{}", record.parcel)
        };
        config.mount_options = vec![
            fuser::MountOption::FSName(name),
            fuser::MountOption::Subtype("isr".into()),
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
            fuser::MountOption::DefaultPermissions,
        ];
        if session.is_view() {
            // A view is read-only: the kernel refuses writes with EROFS.
            config.mount_options.push(fuser::MountOption::RO);
        }
        if self.allow_other {
            config.acl = fuser::SessionACL::All;
        }
        config.n_threads = Some(self.threads);
        config.clone_fd = true;
        let fs = ParcelFs::new(
            session.image.clone(),
            session.status_source(),
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let background = fuser::spawn_mount(fs, mount_point, &config)?;
        crate::fuse::tune_bdi(mount_point);
        // The kernel names each FUSE mount by a device number of its own:
        // what tells this mount from whatever else the path may show later.
        let mount_point = std::fs::canonicalize(mount_point)?;
        let device = mount_devices(&mount_point).pop().unwrap_or_default();
        Ok(Box::new(FuseMount {
            session: background,
            mount_point,
            device,
        }))
    }
}

/// A FUSE mount served by fuser's background threads.
struct FuseMount {
    session: fuser::BackgroundSession,
    mount_point: PathBuf,
    /// `major:minor` of the mount, from /proc/self/mountinfo.
    device: String,
}

impl MountHandle for FuseMount {
    fn unmount(self: Box<Self>) -> std::io::Result<()> {
        self.session.umount_and_join()
    }

    fn state(&self) -> MountState {
        if self.session.guard.is_finished() || self.device.is_empty() {
            return MountState::Gone;
        }
        let devices = mount_devices(&self.mount_point);
        match devices.last() {
            Some(top) if *top == self.device => MountState::Live,
            _ if devices.contains(&self.device) => MountState::Covered,
            _ => MountState::Gone,
        }
    }
}

/// The devices (`major:minor`) mounted at `path`, bottom to top, from
/// /proc/self/mountinfo (which reads no file system, so it never waits on a
/// busy or dead FUSE mount).
fn mount_devices(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let wanted = path.as_os_str().as_encoded_bytes();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let device = fields.nth(2)?;
            let mount_point = fields.nth(1)?;
            (unescape_mountinfo(mount_point) == wanted).then(|| device.to_owned())
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

/// Runs the daemon until SIGTERM/SIGINT or a shutdown request.
pub fn run(options: Options) -> anyhow::Result<()> {
    let mut config = Config::load(options.config.as_deref())?;
    if let Some(dir) = options.runtime_dir {
        config.runtime_dir = dir;
    }
    if let Some(dir) = options.state_dir {
        config.state_dir = dir;
    }
    if let Some(dir) = options.cache_dir {
        config.cache_dir = dir;
    }
    for dir in [&config.runtime_dir, &config.state_dir, &config.cache_dir] {
        isr::private::private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::set_permissions(&config.runtime_dir, std::fs::Permissions::from_mode(0o700))?;
    let socket = control::socket_path(&config.runtime_dir);
    if UnixStream::connect(&socket).is_ok() {
        anyhow::bail!("another isrfsd already serves {}", socket.display());
    }
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    let pid_file = config.runtime_dir.join("isrfsd.pid");
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("isrfsd-io")
        .enable_all()
        .build()?;
    let cache = Arc::new(ChunkCache::open(
        &config.cache_dir,
        options.cache_size.unwrap_or(config.cache_max_bytes),
    )?);
    let (shutdown, shutdown_requested) = std::sync::mpsc::channel();
    let mounter = FuseMounter {
        threads: options.fuse_threads,
        allow_other: options.allow_other,
    };
    let daemon = Arc::new(Daemon::new(
        &config,
        cache,
        runtime,
        Box::new(mounter),
        shutdown.clone(),
    ));
    {
        // Handlers are installed before READY=1, so an early SIGTERM is
        // never met by the default action (death without clean-up).
        use tokio::signal::unix::{SignalKind, signal};
        let (term, int) = daemon.runtime().block_on(async {
            (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            )
        });
        let (mut term, mut int) = (term?, int?);
        let shutdown = shutdown.clone();
        daemon.runtime().spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            let _ = shutdown.send(());
        });
    }
    {
        let daemon = daemon.clone();
        std::thread::Builder::new()
            .name("isrfsd-accept".into())
            .spawn(move || {
                let open = Arc::new(AtomicUsize::new(0));
                for mut stream in listener.incoming().flatten() {
                    if open.fetch_add(1, Ordering::SeqCst) >= control::MAX_CONNECTIONS {
                        open.fetch_sub(1, Ordering::SeqCst);
                        refuse_connection(&mut stream);
                        continue;
                    }
                    let (daemon, still_open) = (daemon.clone(), open.clone());
                    let spawned = std::thread::Builder::new()
                        .name("isrfsd-client".into())
                        .spawn(move || {
                            daemon.serve(stream);
                            still_open.fetch_sub(1, Ordering::SeqCst);
                        });
                    if spawned.is_err() {
                        open.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            })?;
    }
    {
        // systemd's watchdog (WatchdogSec=): pinged while the session table
        // answers (a check of the mounts may wait minutes on a checkin's
        // parcel lock, so not from there).
        let mut watchdog_usec = 0;
        if sd_notify::watchdog_enabled(false, &mut watchdog_usec) {
            let daemon = daemon.clone();
            let period = std::time::Duration::from_micros(watchdog_usec / 2);
            std::thread::Builder::new()
                .name("isrfsd-watchdog".into())
                .spawn(move || {
                    loop {
                        let _ = daemon.session_count();
                        notify(&[sd_notify::NotifyState::Watchdog]);
                        std::thread::sleep(period);
                    }
                })?;
        }
    }
    {
        // Notices mounts someone unmounted behind the daemon's back, and
        // ends an idle daemon (--idle-exit).
        let daemon = daemon.clone();
        let shutdown = shutdown.clone();
        let idle_exit = options.idle_exit;
        std::thread::Builder::new()
            .name("isrfsd-mounts".into())
            .spawn(move || {
                let mut idle_since = std::time::Instant::now();
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(2));
                    daemon.check_mounts();
                    if daemon.session_count() > 0 {
                        idle_since = std::time::Instant::now();
                    } else if let Some(limit) = idle_exit
                        && idle_since.elapsed() >= limit
                    {
                        tracing::info!(
                            seconds = limit.as_secs(),
                            "no sessions for the idle timeout: exiting"
                        );
                        let _ = shutdown.send(());
                        break;
                    }
                }
            })?;
    }
    tracing::info!(socket = %socket.display(), state = %config.state_dir.display(), cache = %config.cache_dir.display(), "isrfsd ready");
    notify(&[sd_notify::NotifyState::Ready]);
    let _ = shutdown_requested.recv();
    tracing::info!("shutting down: flushing and unmounting every session");
    notify(&[sd_notify::NotifyState::Stopping]);
    let budget = u32::try_from(SHUTDOWN_STEP_BUDGET.as_micros()).unwrap_or(u32::MAX);
    daemon.shut_down_with_progress(&|step| {
        let status = match step {
            ShutdownStep::SavingVm(parcel) => format!("saving the VM of {parcel}"),
            ShutdownStep::Flushing(parcel) => format!("flushing and unmounting {parcel}"),
        };
        notify(&[
            sd_notify::NotifyState::ExtendTimeoutUsec(budget),
            sd_notify::NotifyState::Status(&status),
        ]);
    });
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}

/// Answers a connection beyond [`control::MAX_CONNECTIONS`] with an error
/// (without waiting for its request) and closes it.
fn refuse_connection(stream: &mut UnixStream) {
    tracing::warn!(
        limit = control::MAX_CONNECTIONS,
        "refused a control connection: too many open"
    );
    let _ = stream.set_write_timeout(Some(std::time::Duration::from_secs(1)));
    let _ = control::send(
        stream,
        control::Response::Error {
            class: isr::error::ErrorClass::Other,
            message: format!(
                "isrfsd already serves {} control connections; close idle ones (or wait a minute: idle ones are closed), then try again",
                control::MAX_CONNECTIONS
            ),
        },
    );
}

/// Tells systemd (Type=notify) about our state, when it started us
/// (nothing happens without NOTIFY_SOCKET).
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::unescape_mountinfo;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/mnt/my\040vm"), b"/mnt/my vm");
        assert_eq!(unescape_mountinfo(r"/a\134b"), b"/a\\b");
        assert_eq!(unescape_mountinfo(r"/plain\"), b"/plain\\");
    }
}
