//! The daemon: control socket, sessions and their mounts, the VMs it runs
//! from those mounts ([`isr::vmm::supervise`]), shutdown.

use std::collections::HashMap;
use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use isr::cache::ChunkCache;
use isr::config::Config;
use isr::control::{self, Request, Response};
use isr::error::{Classify, ErrorClass};
use isr::fetch::Priority;
use isr::image::ImageOptions;
use isr::session::{CommitReport, Session, SessionContext, SessionError};
use isr::store;
use isr::vmm::config::VmmKind;
use isr::vmm::supervise::{self, SupervisedVm, VmState, VmStatus};

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
}

struct Mounted {
    session: Arc<Session>,
    mount: Option<fuser::BackgroundSession>,
    vm: Arc<VmSlot>,
}

/// The VM a session's mount runs, if any.
#[derive(Default)]
struct VmSlot {
    /// Who runs it, chosen at the first resume (a reattach keeps it).
    kind: Mutex<Option<VmmKind>>,
    /// Held while the VM is started, suspended or stopped.
    vm: Mutex<Option<SupervisedVm>>,
    /// Its last status, answered while `vm` is busy.
    summary: Mutex<Option<VmStatus>>,
}

impl VmSlot {
    /// The VM's status; `busy` while another request is changing it.
    fn status(&self) -> Option<VmStatus> {
        match self.vm.try_lock() {
            Ok(mut vm) => match vm.as_mut() {
                Some(vm) => Some(self.remember(vm)),
                // Being started: the summary says so.
                None => self.summary.lock().expect("vm summary").clone(),
            },
            Err(_) => self
                .summary
                .lock()
                .expect("vm summary")
                .clone()
                .map(|status| VmStatus {
                    state: VmState::Busy,
                    ..status
                }),
        }
    }

    fn remember(&self, vm: &mut SupervisedVm) -> VmStatus {
        let status = vm.status();
        *self.summary.lock().expect("vm summary") = Some(status.clone());
        status
    }
}

struct Daemon {
    runtime: tokio::runtime::Runtime,
    context: SessionContext,
    sessions: Mutex<HashMap<String, Mounted>>,
    /// Per parcel: held by resume, sync, checkin and discard, so they run one
    /// at a time and a request sees the previous one's end state.
    parcel_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Checkins this daemon finished: a repeated request (its client was
    /// killed) gets the same answer.
    checked_in: Mutex<HashMap<String, CommitReport>>,
    fuse_threads: usize,
    allow_other: bool,
    shutdown: std::sync::mpsc::Sender<()>,
    /// VMs' runtime files go under `<runtime dir>/vm/<parcel>/`.
    runtime_dir: PathBuf,
    /// How VMs are run.
    vmm: isr::vmm::supervise::VmmSettings,
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
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
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
    let daemon = Arc::new(Daemon {
        context: SessionContext {
            state_dir: config.state_dir.clone(),
            cache,
            runtime: runtime.handle().clone(),
            fetch: config.fetch,
            image: ImageOptions::default(),
            prefetch: config.prefetch,
            upload: config.upload,
        },
        runtime,
        sessions: Mutex::new(HashMap::new()),
        parcel_locks: Mutex::new(HashMap::new()),
        checked_in: Mutex::new(HashMap::new()),
        fuse_threads: options.fuse_threads,
        allow_other: options.allow_other,
        shutdown: shutdown.clone(),
        runtime_dir: config.runtime_dir.clone(),
        vmm: config.vmm.clone(),
    });
    {
        // Handlers are installed before READY=1, so an early SIGTERM is
        // never met by the default action (death without clean-up).
        use tokio::signal::unix::{SignalKind, signal};
        let (term, int) = daemon.runtime.block_on(async {
            (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            )
        });
        let (mut term, mut int) = (term?, int?);
        let shutdown = shutdown.clone();
        daemon.runtime.spawn(async move {
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
                for stream in listener.incoming().flatten() {
                    let daemon = daemon.clone();
                    let _ = std::thread::Builder::new()
                        .name("isrfsd-client".into())
                        .spawn(move || daemon.serve(stream));
                }
            })?;
    }
    tracing::info!(socket = %socket.display(), state = %config.state_dir.display(), cache = %config.cache_dir.display(), "isrfsd ready");
    notify_systemd("READY=1");
    let _ = shutdown_requested.recv();
    tracing::info!("shutting down: flushing and unmounting every session");
    notify_systemd("STOPPING=1");
    daemon.shut_down();
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}

/// The VM slot of a session being mounted, with the VMM chosen (unless its
/// vm.toml is unreadable: `ensure_vm` then says why); a VM to start shows as
/// `busy` until it runs. What the VM reads before its guest runs moves to the
/// front of the prefetch: the kernel and initrd (read whole as QEMU starts,
/// even when it then loads a saved state), then the memory image vm.toml names.
fn starting_slot(
    session: &Session,
    parcel: &str,
    requested: Option<VmmKind>,
    mount: &std::path::Path,
) -> Arc<VmSlot> {
    let config = supervise::load_config(parcel, mount);
    if let Ok(config) = &config {
        session.prefetch_files(&config.boot_files(), Priority::Boot);
        session.prefetch_files(&[config.memory_image.as_path()], Priority::Memory);
    }
    let kind = match requested {
        Some(kind) => Ok(kind),
        None => supervise::configured_kind(config),
    };
    let slot = VmSlot::default();
    if let Ok(kind) = kind {
        *slot.kind.lock().expect("vm kind") = Some(kind);
        if kind != VmmKind::None {
            *slot.summary.lock().expect("vm summary") = Some(VmStatus::starting(kind));
        }
    }
    Arc::new(slot)
}

fn error_response(class: ErrorClass, message: String) -> Response {
    Response::Error { class, message }
}

impl Daemon {
    fn serve(&self, stream: UnixStream) {
        let own_uid = nix::unistd::geteuid().as_raw();
        match nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials) {
            Ok(credentials) if credentials.uid() == own_uid => {}
            _ => {
                tracing::warn!("refused a control connection from another user");
                return;
            }
        }
        let mut reader = BufReader::new(match stream.try_clone() {
            Ok(s) => s,
            Err(_) => return,
        });
        let mut writer = stream;
        while let Ok(Some(envelope)) = control::receive::<Request>(&mut reader) {
            let response = if envelope.protocol != control::PROTOCOL_VERSION {
                error_response(
                    ErrorClass::Invalid,
                    format!(
                        "isrctl speaks control protocol {}, this isrfsd speaks {}: use matching versions",
                        envelope.protocol,
                        control::PROTOCOL_VERSION
                    ),
                )
            } else {
                self.handle(envelope.body)
            };
            if control::send(&mut writer, response).is_err() {
                return;
            }
        }
    }

    fn handle(&self, request: Request) -> Response {
        match request {
            Request::Resume {
                parcel,
                version,
                mount,
                store,
                vmm,
            } => {
                let lock = self.parcel_lock(&parcel.name);
                let _one_at_a_time = lock.lock().expect("parcel lock");
                self.resume(*parcel, version, mount, store, vmm)
            }
            Request::Suspend {
                parcel,
                message,
                wipe,
                reopen,
            } => {
                let lock = self.parcel_lock(&parcel);
                let _one_at_a_time = lock.lock().expect("parcel lock");
                self.suspend(&parcel, &message, wipe, reopen.as_deref())
            }
            Request::Sync { parcel, message } => {
                let lock = self.parcel_lock(&parcel);
                let _one_at_a_time = lock.lock().expect("parcel lock");
                let Some(session) = self.live_session(&parcel) else {
                    let e = SessionError::NotResumed(parcel.clone());
                    return error_response(
                        e.class(),
                        format!(
                            "{e}; after a restart of isrfsd, `isrctl resume {parcel}` reattaches it"
                        ),
                    );
                };
                match self.runtime.block_on(session.commit(&message, None)) {
                    Ok(report) => Response::Committed { report },
                    Err(e) => error_response(e.class(), e.to_string()),
                }
            }
            Request::Checkin {
                parcel,
                message,
                wipe,
                save_as,
                reopen,
            } => {
                let lock = self.parcel_lock(&parcel);
                let _one_at_a_time = lock.lock().expect("parcel lock");
                self.checkin(
                    &parcel,
                    &message,
                    wipe,
                    save_as.as_deref(),
                    reopen.as_deref(),
                )
            }
            Request::Status { parcel } => {
                let sessions = self.sessions.lock().expect("sessions lock");
                let mut statuses: Vec<_> = sessions
                    .iter()
                    .filter(|(name, _)| parcel.as_ref().is_none_or(|p| p == *name))
                    .map(|(_, m)| {
                        let mut status = m.session.status();
                        status.vm = m.vm.status();
                        status
                    })
                    .collect();
                statuses.sort_by(|a, b| a.parcel.cmp(&b.parcel));
                if let Some(name) = parcel
                    && statuses.is_empty()
                {
                    let e = SessionError::NotResumed(name);
                    return error_response(e.class(), e.to_string());
                }
                Response::Status { sessions: statuses }
            }
            Request::Hoard { parcel } => {
                let session_parts = {
                    let sessions = self.sessions.lock().expect("sessions lock");
                    sessions
                        .get(&parcel)
                        .map(|m| (m.session.fetcher.clone(), m.session.base.clone()))
                };
                let Some((fetcher, base)) = session_parts else {
                    let e = SessionError::NotResumed(parcel);
                    return error_response(e.class(), e.to_string());
                };
                match self.runtime.block_on(isr::session::hoard(&fetcher, &base)) {
                    Ok(chunks) => Response::Hoarded { chunks },
                    Err(e) => error_response(ErrorClass::Unreachable, e.to_string()),
                }
            }
            Request::Discard { parcel } => {
                let lock = self.parcel_lock(&parcel);
                let _one_at_a_time = lock.lock().expect("parcel lock");
                let mounted = self.sessions.lock().expect("sessions lock").remove(&parcel);
                let Some(mounted) = mounted else {
                    let e = SessionError::NotResumed(parcel);
                    return error_response(e.class(), e.to_string());
                };
                if let Some(vm) = mounted.vm.vm.lock().expect("vm lock").as_mut() {
                    vm.kill();
                }
                if let Some(mount) = mounted.mount {
                    let _ = mount.umount_and_join();
                }
                match self.runtime.block_on(mounted.session.discard()) {
                    Ok(()) => Response::Done,
                    Err(e) => error_response(e.class(), e.to_string()),
                }
            }
            Request::Shutdown => {
                let _ = self.shutdown.send(());
                Response::Done
            }
        }
    }

    fn parcel_lock(&self, parcel: &str) -> Arc<Mutex<()>> {
        self.parcel_locks
            .lock()
            .expect("parcel locks")
            .entry(parcel.to_owned())
            .or_default()
            .clone()
    }

    fn vm_slot(&self, parcel: &str) -> Option<Arc<VmSlot>> {
        self.sessions
            .lock()
            .expect("sessions lock")
            .get(parcel)
            .map(|m| m.vm.clone())
    }

    /// Suspend: save the VM's memory into the mount and stop it, then check in.
    fn suspend(
        &self,
        parcel: &str,
        message: &str,
        wipe: bool,
        reopen: Option<&control::Reopen>,
    ) -> Response {
        let mut saved = None;
        if let Some(slot) = self.vm_slot(parcel) {
            let mut guard = slot.vm.lock().expect("vm lock");
            if let Some(vm) = guard.as_mut() {
                match vm.suspend() {
                    Ok(report) => {
                        tracing::info!(
                            parcel,
                            seconds = report.seconds,
                            bytes = report.memory_bytes,
                            "VM saved"
                        );
                        slot.remember(vm);
                        saved = Some(report);
                    }
                    Err(e) => {
                        let next = match vm.state() {
                            VmState::Running => format!(
                                "the VM goes on running; fix the cause and run `isrctl suspend {parcel}` again"
                            ),
                            _ => format!(
                                "`isrctl resume {parcel}` starts the VM again (it boots from its disks), `isrctl checkin {parcel}` commits the disks as they are (as after a power cut), `isrctl discard {parcel}` drops the session's changes"
                            ),
                        };
                        slot.remember(vm);
                        return error_response(
                            e.class(),
                            format!(
                                "suspending {parcel} failed: {e}; nothing was committed: {next}"
                            ),
                        );
                    }
                }
            }
        }
        match self.checkin(parcel, message, wipe, None, reopen) {
            Response::Committed { report } => Response::Suspended {
                saved: saved.map(Box::new),
                report: Box::new(report),
            },
            other => other,
        }
    }

    /// Starts the session's VM unless it runs already (or nobody is to run it),
    /// and answers with its status.
    fn ensure_vm(
        &self,
        parcel: &str,
        requested: Option<VmmKind>,
    ) -> Result<(Option<VmStatus>, Vec<String>), Response> {
        let Some((slot, mount)) = self
            .sessions
            .lock()
            .expect("sessions lock")
            .get(parcel)
            .map(|m| (m.vm.clone(), m.session.record().mount.clone()))
        else {
            return Ok((None, Vec::new()));
        };
        let fail = |e: supervise::VmError| {
            error_response(
                e.class(),
                format!(
                    "{parcel} is mounted at {}, but its VM did not start: {e}; fix that and run `isrctl resume {parcel}` again, or `isrctl resume --vmm none {parcel}` to only mount it",
                    mount.display()
                ),
            )
        };
        let mut warnings = Vec::new();
        let mut kind = slot.kind.lock().expect("vm kind");
        let chosen = match (requested, *kind) {
            (Some(k), _) | (None, Some(k)) => k,
            (None, None) => match supervise::chosen_kind(parcel, None, &mount) {
                Ok(k) => k,
                // Nobody asked for a VM: a vm.toml that describes none is
                // not fatal (the parcel may predate VMs); the next resume
                // reads it again.
                Err(e) => {
                    warnings.push(format!(
                        "{e}: {parcel} is only mounted; fix vm.toml and run `isrctl resume {parcel}` again to start its VM"
                    ));
                    *slot.summary.lock().expect("vm summary") = None;
                    return Ok((None, warnings));
                }
            },
        };
        *kind = Some(chosen);
        let mut guard = slot.vm.lock().expect("vm lock");
        if let Some(vm) = guard.as_mut()
            && matches!(vm.state(), VmState::Running | VmState::Handed)
        {
            return Ok((Some(slot.remember(vm)), warnings));
        }
        if chosen == VmmKind::None {
            return Ok((guard.as_mut().map(|vm| slot.remember(vm)), warnings));
        }
        let dir = self.runtime_dir.join("vm").join(parcel);
        *slot.summary.lock().expect("vm summary") = Some(VmStatus::starting(chosen));
        let started = SupervisedVm::start(parcel, chosen, &mount, &dir, &self.vmm);
        let mut vm = started.map_err(|e| {
            *slot.summary.lock().expect("vm summary") = None;
            fail(e)
        })?;
        let status = slot.remember(&mut vm);
        tracing::info!(parcel, vmm = %chosen, from_memory = status.resumed_from_memory, seconds = status.start_seconds, "VM started");
        *guard = Some(vm);
        Ok((Some(status), warnings))
    }

    fn live_session(&self, parcel: &str) -> Option<Arc<Session>> {
        self.sessions
            .lock()
            .expect("sessions lock")
            .get(parcel)
            .map(|m| m.session.clone())
    }

    /// Checkin: commit, unmount, release the lock, remove the session state.
    fn checkin(
        &self,
        parcel: &str,
        message: &str,
        wipe: bool,
        save_as: Option<&control::WireParcel>,
        reopen: Option<&control::Reopen>,
    ) -> Response {
        let save_as = match save_as.map(|w| w.open()) {
            None => None,
            Some(Some(open)) => Some(open),
            Some(None) => {
                return error_response(
                    ErrorClass::Invalid,
                    "malformed parcel secrets in the request".into(),
                );
            }
        };
        if let Some(slot) = self.vm_slot(parcel)
            && let Some(vm) = slot.vm.lock().expect("vm lock").as_mut()
            && vm.state() == VmState::Running
        {
            return error_response(
                ErrorClass::Conflict,
                format!(
                    "the VM of {parcel} is running: `isrctl suspend {parcel}` saves its memory and checks in; to check in its disks alone, stop the VM first"
                ),
            );
        }
        let session = match self.live_session(parcel) {
            Some(session) => session,
            None => {
                if let Some(report) = self.checked_in.lock().expect("checked_in").get(parcel) {
                    return Response::Committed {
                        report: CommitReport {
                            already_done: true,
                            ..report.clone()
                        },
                    };
                }
                match self.reopen_for_checkin(parcel, reopen) {
                    Ok(Ok(session)) => Arc::new(session),
                    Ok(Err(report)) => return Response::Committed { report },
                    Err(response) => return response,
                }
            }
        };
        let report = match self
            .runtime
            .block_on(session.checkin(message, save_as.as_ref()))
        {
            Ok(report) => report,
            Err(e) => return error_response(e.class(), e.to_string()),
        };
        if report.already_done {
            return Response::Committed { report };
        }
        let mounted = self.sessions.lock().expect("sessions lock").remove(parcel);
        if let Some(mount) = mounted.and_then(|m| m.mount) {
            if let Err(e) = mount.umount_and_join() {
                tracing::warn!(parcel, error = %e, "unmount after checkin failed");
            }
        }
        if let Err(e) = self.runtime.block_on(session.finish_checkin(wipe)) {
            return error_response(
                e.class(),
                format!(
                    "version {} of {} is committed, but cleaning up failed: {e}; run `isrctl checkin {parcel}` again to finish",
                    report.version, report.parcel
                ),
            );
        }
        tracing::info!(parcel, version = report.version, "checked in");
        self.checked_in
            .lock()
            .expect("checked_in")
            .insert(parcel.to_owned(), report.clone());
        Response::Committed { report }
    }

    /// Opens a session this daemon does not have (it was restarted) for
    /// checkin, without mounting it; or finishes a checkin that committed but
    /// was cut short, answering with what it committed.
    fn reopen_for_checkin(
        &self,
        parcel: &str,
        reopen: Option<&control::Reopen>,
    ) -> Result<Result<Session, CommitReport>, Response> {
        let fail = |e: SessionError| error_response(e.class(), e.to_string());
        let record = isr::session::read_record(&self.context.state_dir, parcel)
            .map_err(fail)?
            .ok_or_else(|| fail(SessionError::NotResumed(parcel.to_owned())))?;
        let Some(reopen) = reopen else {
            // isrctl resends with the parcel's secrets.
            return Err(fail(SessionError::NotResumed(parcel.to_owned())));
        };
        let Some(open) = reopen.parcel.open() else {
            return Err(error_response(
                ErrorClass::Invalid,
                "malformed parcel secrets in the request".into(),
            ));
        };
        let store = store::open(&reopen.store.url, &reopen.store.s3, reopen.store.retry)
            .map_err(|e| error_response(e.class(), e.to_string()))?;
        isr::session::detach_dead_mount(&record.mount);
        if record.checked_in {
            let version = self
                .runtime
                .block_on(isr::session::finish_checked_in(
                    &store,
                    &self.context.state_dir,
                    &record,
                ))
                .map_err(fail)?;
            return Ok(Err(CommitReport::finished_earlier(
                parcel,
                version.unwrap_or(record.base_version),
            )));
        }
        let context = SessionContext {
            prefetch: false,
            ..self.context.clone()
        };
        self.runtime
            .block_on(Session::reopen(store, open, context))
            .map(Ok)
            .map_err(fail)
    }

    fn resume(
        &self,
        parcel: control::WireParcel,
        version: Option<u64>,
        mount: PathBuf,
        wire_store: control::WireStore,
        vmm: Option<VmmKind>,
    ) -> Response {
        let existing = self
            .sessions
            .lock()
            .expect("sessions lock")
            .get(&parcel.name)
            .map(|m| m.session.record().mount.clone());
        if let Some(mount) = existing {
            return match self.ensure_vm(&parcel.name, vmm) {
                Ok((vm, warnings)) => Response::Resumed {
                    mount,
                    reattached: true,
                    vm: vm.map(Box::new),
                    warnings,
                },
                Err(response) => response,
            };
        }
        let Some(open) = parcel.open() else {
            return error_response(
                ErrorClass::Invalid,
                "malformed parcel secrets in the request".into(),
            );
        };
        let store = match store::open(&wire_store.url, &wire_store.s3, wire_store.retry) {
            Ok(store) => store,
            Err(e) => return error_response(e.class(), e.to_string()),
        };
        let reattaching = isr::session::read_record(&self.context.state_dir, &open.name)
            .ok()
            .flatten()
            .is_some();
        let session = match self.runtime.block_on(Session::resume(
            store,
            open,
            version,
            mount.clone(),
            self.context.clone(),
        )) {
            Ok(session) => session,
            Err(e) => return error_response(e.class(), e.to_string()),
        };
        let mount = session.record().mount.clone();
        isr::session::detach_dead_mount(&mount);
        if let Err(e) = std::fs::create_dir_all(&mount) {
            return error_response(
                ErrorClass::Other,
                format!("creating mount point {}: {e}", mount.display()),
            );
        }
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(format!("isr:{}", parcel.name)),
            fuser::MountOption::Subtype("isr".into()),
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
            fuser::MountOption::DefaultPermissions,
        ];
        if self.allow_other {
            config.acl = fuser::SessionACL::All;
        }
        config.n_threads = Some(self.fuse_threads);
        config.clone_fd = true;
        let fs = ParcelFs::new(
            session.image.clone(),
            session.status_source(),
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        match fuser::spawn_mount(fs, &mount, &config) {
            Ok(background) => {
                tracing::info!(parcel = %parcel.name, mount = %mount.display(), reattaching, "mounted");
                crate::fuse::raise_readahead(&mount);
                self.checked_in
                    .lock()
                    .expect("checked_in")
                    .remove(&parcel.name);
                let vm = starting_slot(&session, &parcel.name, vmm, &mount);
                self.sessions.lock().expect("sessions lock").insert(
                    parcel.name.clone(),
                    Mounted {
                        session: Arc::new(session),
                        mount: Some(background),
                        vm,
                    },
                );
                match self.ensure_vm(&parcel.name, vmm) {
                    Ok((vm, warnings)) => Response::Resumed {
                        mount,
                        reattached: reattaching,
                        vm: vm.map(Box::new),
                        warnings,
                    },
                    Err(response) => response,
                }
            }
            Err(e) => error_response(
                ErrorClass::Other,
                format!("mounting {}: {e}", mount.display()),
            ),
        }
    }

    fn shut_down(&self) {
        let sessions: Vec<(String, Mounted)> = self
            .sessions
            .lock()
            .expect("sessions lock")
            .drain()
            .collect();
        for (name, mounted) in sessions {
            if let Some(vm) = mounted.vm.vm.lock().expect("vm lock").as_mut()
                && vm.state() == VmState::Running
            {
                // Saved into the mount: `isrctl resume` later continues it.
                match vm.suspend() {
                    Ok(report) => {
                        tracing::info!(parcel = %name, seconds = report.seconds, "VM saved at shutdown")
                    }
                    Err(e) => {
                        tracing::error!(parcel = %name, error = %e, "could not save the VM at shutdown; stopping it");
                        vm.kill();
                    }
                }
            }
            if let Err(e) = mounted.session.image.flush_all() {
                tracing::error!(parcel = %name, error = %e, "flush failed at shutdown");
            }
            mounted.session.fetcher.stop();
            if let Some(mount) = mounted.mount {
                if let Err(e) = mount.umount_and_join() {
                    tracing::error!(parcel = %name, error = %e, "unmount failed at shutdown");
                }
            }
        }
    }
}

/// Tells systemd (Type=notify) about our state, when it started us.
fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let address = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = address
        .and_then(|address| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &address));
    if let Err(e) = sent {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}
