//! The daemon's orchestration: the resumed sessions of one runtime directory,
//! their mounts, the VMs run from those mounts, and the answer to every control
//! request ([`crate::control`]). `isrfsd` is a thin shell around it: it owns
//! the process (socket, signals, systemd notification) and the FUSE adapter,
//! which it hands in as a [`Mounter`], so everything here runs in unit tests
//! without FUSE.
//!
//! Invariants:
//! - Requests that change a parcel (resume, suspend, sync, checkin, discard)
//!   run one at a time per parcel ([`Daemon::parcel_lock`]); status and hoard
//!   do not wait for them.
//! - A session is in `sessions` exactly while it is resumed; its VM slot goes
//!   with it, and a checkin or discard removes both and unmounts. Its `mount`
//!   is `None` once the mount ended behind the daemon's back (someone ran
//!   `fusermount3 -u`; [`Daemon::check_mounts`] notices) until a resume mounts
//!   it again: a resume only answers with a mount point it found live and ours.
//! - A VM slot's `vm` mutex is held while its VM is started, suspended or
//!   stopped; status then answers from `summary` as `busy`.
//! - Read-only views (`isrctl mount`) are in `views`, keyed by canonical
//!   directory, apart from `sessions`: they take neither the store's lock
//!   nor a parcel lock, so they never wait for (or block) a resumed
//!   parcel's requests.

use std::collections::{HashMap, HashSet};
use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::cache::ChunkCache;
use crate::config::Config;
use crate::control::{self, ParcelStatus, Request, Response};
use crate::error::{Classify, ErrorClass};
use crate::fetch::Priority;
use crate::image::ImageOptions;
use crate::session::{CommitReport, Session, SessionContext, SessionError};
use crate::store;
use crate::vmm::config::VmmKind;
use crate::vmm::supervise::{self, SupervisedVm, VmState, VmStatus, VmmSettings};

/// Mounts a session's image where its record says (the FUSE adapter in
/// isrfsd; a stand-in in tests).
pub trait Mounter: Send + Sync {
    /// Mounts `session` at `mount_point`, which exists.
    fn mount(&self, session: &Session, mount_point: &Path)
    -> std::io::Result<Box<dyn MountHandle>>;
}

/// A live mount; unmounting it ends it.
pub trait MountHandle: Send {
    /// Unmounts, waiting for the file system's threads to end.
    fn unmount(self: Box<Self>) -> std::io::Result<()>;
    /// What is at the mount point now: this mount, something over it, or
    /// nothing of ours (someone unmounted it behind the daemon's back).
    fn state(&self) -> MountState;
}

/// What [`MountHandle::state`] finds at a mount point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountState {
    /// This mount is served and is what the mount point shows.
    Live,
    /// This mount is served, but something else is mounted over it.
    Covered,
    /// This mount ended or was detached: the mount point shows something else.
    Gone,
}

/// A read-only view ([`Session::view`]) and its mount.
struct View {
    session: Arc<Session>,
    mount: Box<dyn MountHandle>,
}

struct Mounted {
    session: Arc<Session>,
    mount: Option<Box<dyn MountHandle>>,
    vm: Arc<VmSlot>,
    /// When its resume was asked for and mounted.
    timeline: control::ResumeTimeline,
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

/// A step of [`Daemon::shut_down_with_progress`], naming the parcel.
#[derive(Debug, Clone, Copy)]
pub enum ShutdownStep<'a> {
    /// Saving a running VM's memory into its mount.
    SavingVm(&'a str),
    /// Flushing a session's writes and unmounting it.
    Flushing(&'a str),
}

/// Every session of one runtime directory and the VMs run from them.
pub struct Daemon {
    runtime: tokio::runtime::Runtime,
    context: SessionContext,
    sessions: Mutex<HashMap<String, Mounted>>,
    /// Read-only views by their (canonical) directory.
    views: Mutex<HashMap<PathBuf, View>>,
    /// Held while a view is mounted or unmounted, so two requests for one
    /// directory do not race.
    view_changes: Mutex<()>,
    /// Per parcel: held by resume, sync, checkin and discard, so they run one
    /// at a time and a request sees the previous one's end state.
    parcel_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Parcels with a resume under way (status lists them as resuming).
    resuming: Mutex<HashSet<String>>,
    /// Checkins this daemon finished: a repeated request (its client was
    /// killed) gets the same answer.
    checked_in: Mutex<HashMap<String, CommitReport>>,
    mounter: Box<dyn Mounter>,
    shutdown: std::sync::mpsc::Sender<()>,
    /// VMs' runtime files go under `<runtime dir>/vm/<parcel>/`.
    runtime_dir: PathBuf,
    /// How VMs are run.
    vmm: VmmSettings,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("runtime_dir", &self.runtime_dir)
            .field("state_dir", &self.context.state_dir)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// A daemon with no sessions yet, configured by `config`, caching chunks
    /// in `cache`, doing its I/O on `runtime` and mounting with `mounter`. A
    /// shutdown request sends on `shutdown`.
    pub fn new(
        config: &Config,
        cache: Arc<ChunkCache>,
        runtime: tokio::runtime::Runtime,
        mounter: Box<dyn Mounter>,
        shutdown: std::sync::mpsc::Sender<()>,
    ) -> Daemon {
        let stale = crate::session::remove_stale_views(&config.state_dir);
        if stale > 0 {
            tracing::info!(
                views = stale,
                "removed the scratch state of views a killed daemon left"
            );
        }
        Daemon {
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
            views: Mutex::new(HashMap::new()),
            view_changes: Mutex::new(()),
            parcel_locks: Mutex::new(HashMap::new()),
            resuming: Mutex::new(HashSet::new()),
            checked_in: Mutex::new(HashMap::new()),
            mounter,
            shutdown,
            runtime_dir: config.runtime_dir.clone(),
            vmm: config.vmm.clone(),
        }
    }

    /// The runtime the daemon's I/O runs on.
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    /// Resumed sessions, read-only views and resumes under way (a resume
    /// that downloads a big format-1 manifest over a slow link takes longer
    /// than the idle timeout): the daemon is idle at zero.
    pub fn session_count(&self) -> usize {
        self.sessions.lock().expect("sessions lock").len()
            + self.views.lock().expect("views lock").len()
            + self.resuming.lock().expect("resuming").len()
    }
}

/// The VM slot of a session being mounted, with the VMM chosen (unless its
/// vm.toml is unreadable: `ensure_vm` then says why); a VM to start shows as
/// `busy` until it runs. What the VM reads before its guest runs moves to the
/// front of the prefetch: the kernel and initrd (read whole as QEMU starts,
/// even when it then loads a saved state) and lazy mode's device state, then
/// the memory image vm.toml names, or (with background prefetch on) its RAM
/// file; the working set goes between the two (`Session::resume`).
fn starting_slot(
    session: &Session,
    parcel: &str,
    requested: Option<VmmKind>,
    mount: &std::path::Path,
) -> Arc<VmSlot> {
    let config = supervise::load_config(parcel, mount);
    if let Ok(config) = &config {
        // Lazy mode's device state is small and read whole as QEMU starts.
        let mut boot = config.boot_files();
        boot.push(config.device_state.as_path());
        session.prefetch_files(&boot, Priority::Boot);
        session.prefetch_files(&[config.memory_image.as_path()], Priority::Memory);
        if session.prefetches() {
            session.prefetch_files(&[config.ram_file.as_path()], Priority::Memory);
        }
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

/// The parcel and store a request names, opened, or the error reply.
fn open_requested(
    parcel: &control::WireParcel,
    store: &control::WireStore,
) -> Result<(crate::parcel::OpenParcel, store::StoreHandle), Response> {
    let Some(open) = parcel.open() else {
        return Err(error_response(
            ErrorClass::Invalid,
            "malformed parcel secrets in the request".into(),
        ));
    };
    let store = store::open_tiered(
        &store.url,
        store.read_url.as_deref(),
        crate::layout::is_immutable,
        &store.s3,
        store.retry,
    )
    .map_err(|e| error_response(e.class(), e.to_string()))?;
    Ok((open, store))
}

impl Daemon {
    /// Answers the requests of one control connection until it closes;
    /// connections from other users are refused.
    pub fn serve(&self, stream: UnixStream) {
        let own_uid = nix::unistd::geteuid().as_raw();
        match nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials) {
            Ok(credentials) if credentials.uid() == own_uid => {}
            _ => {
                tracing::warn!("refused a control connection from another user");
                return;
            }
        }
        // An idle connection is closed (isrctl sends its request at once).
        if stream
            .set_read_timeout(Some(control::IDLE_TIMEOUT))
            .is_err()
        {
            return;
        }
        let mut reader = BufReader::new(match stream.try_clone() {
            Ok(s) => s,
            Err(_) => return,
        });
        let mut writer = stream;
        loop {
            let envelope =
                match control::receive::<Request>(&mut reader, control::MAX_REQUEST_BYTES) {
                    Ok(Some(envelope)) => envelope,
                    Ok(None) => return,
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        let _ = control::send(
                            &mut writer,
                            error_response(
                                ErrorClass::Invalid,
                                format!("malformed control request: {e}"),
                            ),
                        );
                        return;
                    }
                    Err(_) => return, // timed out, or the client went away
                };
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

    /// Carries out one request.
    pub fn handle(&self, request: Request) -> Response {
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
                let name = parcel.name.clone();
                self.resuming.lock().expect("resuming").insert(name.clone());
                let response = self.resume(*parcel, version, mount, store, vmm);
                self.resuming.lock().expect("resuming").remove(&name);
                response
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
                    Ok(report) => Response::Committed {
                        report: Box::new(report),
                    },
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
                    .map(|(_, m)| ParcelStatus {
                        session: m.session.status(),
                        vm: m.vm.status(),
                        mounted: m.mount.is_some(),
                        timeline: m.timeline,
                    })
                    .collect();
                statuses.sort_by(|a, b| a.session.parcel.cmp(&b.session.parcel));
                let mut resuming: Vec<String> = self
                    .resuming
                    .lock()
                    .expect("resuming")
                    .iter()
                    .filter(|name| parcel.as_ref().is_none_or(|p| p == *name))
                    .filter(|name| !sessions.contains_key(*name))
                    .cloned()
                    .collect();
                resuming.sort();
                if let Some(name) = parcel
                    && statuses.is_empty()
                    && resuming.is_empty()
                {
                    let e = SessionError::NotResumed(name);
                    return error_response(e.class(), e.to_string());
                }
                Response::Status {
                    sessions: statuses,
                    resuming,
                }
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
                match self
                    .runtime
                    .block_on(crate::session::hoard(&fetcher, &base))
                {
                    Ok(chunks) => Response::Hoarded { chunks },
                    Err(e) => error_response(e.class(), e.to_string()),
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
                    let _ = mount.unmount();
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
            Request::Mount {
                parcel,
                version,
                dir,
                store,
            } => self.mount_view(*parcel, version, dir, store),
            Request::Unmount { dir } => self.unmount_view(&dir),
            Request::Views => {
                let mut views: Vec<control::ViewInfo> = self
                    .views
                    .lock()
                    .expect("views lock")
                    .iter()
                    .map(|(dir, view)| {
                        let record = view.session.record();
                        control::ViewInfo {
                            parcel: record.parcel,
                            version: record.base_version,
                            dir: dir.clone(),
                        }
                    })
                    .collect();
                views.sort_by(|a, b| a.dir.cmp(&b.dir));
                Response::Views { views }
            }
            Request::ChunkMap { parcel } => {
                let Some(session) = self.live_session(&parcel) else {
                    let e = SessionError::NotResumed(parcel);
                    return error_response(e.class(), e.to_string());
                };
                let files = session
                    .image
                    .files()
                    .into_iter()
                    .filter_map(|(path, node)| {
                        let map = session.image.chunk_map(node.id).ok()?;
                        Some(control::FileChunks {
                            path,
                            size: node.size,
                            runs: control::encode_runs(&map),
                        })
                    })
                    .collect();
                Response::ChunkMap { files }
            }
        }
    }

    /// Mounts `version` of `parcel` read-only at `dir` (an existing
    /// directory), without the parcel's lock.
    fn mount_view(
        &self,
        parcel: control::WireParcel,
        version: Option<u64>,
        dir: PathBuf,
        wire_store: control::WireStore,
    ) -> Response {
        let _one_at_a_time = self.view_changes.lock().expect("view changes");
        if !dir.is_absolute() {
            return error_response(
                ErrorClass::Invalid,
                format!(
                    "{}: the directory of a view must be an absolute path",
                    dir.display()
                ),
            );
        }
        crate::session::detach_dead_mount(&dir);
        let dir = match std::fs::metadata(&dir) {
            Ok(meta) if meta.is_dir() => std::fs::canonicalize(&dir).unwrap_or(dir),
            Ok(_) => {
                return error_response(
                    ErrorClass::Invalid,
                    format!(
                        "{} is not a directory; give an empty directory to mount the version on",
                        dir.display()
                    ),
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return error_response(
                    ErrorClass::NotFound,
                    format!(
                        "{} does not exist; create an empty directory to mount the version on",
                        dir.display()
                    ),
                );
            }
            Err(e) => {
                return error_response(ErrorClass::Other, format!("{}: {e}", dir.display()));
            }
        };
        if let Some(view) = self.views.lock().expect("views lock").get(&dir) {
            let record = view.session.record();
            return error_response(
                ErrorClass::Conflict,
                format!(
                    "{} already shows version {} of {} read-only; `isrctl umount {}` first",
                    dir.display(),
                    record.base_version,
                    record.parcel,
                    dir.display()
                ),
            );
        }
        let resumed_there = self
            .sessions
            .lock()
            .expect("sessions lock")
            .values()
            .map(|m| m.session.record())
            .find(|r| std::fs::canonicalize(&r.mount).unwrap_or_else(|_| r.mount.clone()) == dir);
        if let Some(record) = resumed_there {
            return error_response(
                ErrorClass::Conflict,
                format!(
                    "{} is where {} is resumed; mount the version on another directory",
                    dir.display(),
                    record.parcel
                ),
            );
        }
        let (open, store) = match open_requested(&parcel, &wire_store) {
            Ok(opened) => opened,
            Err(response) => return response,
        };
        let session = match self.runtime.block_on(Session::view(
            store,
            open,
            version,
            dir.clone(),
            self.context.clone(),
        )) {
            Ok(session) => session,
            Err(e) => return error_response(e.class(), e.to_string()),
        };
        let mount = match self.mount_live(&session, &dir) {
            Ok(mount) => mount,
            Err(response) => {
                session.end_view();
                return response;
            }
        };
        let version = session.record().base_version;
        tracing::info!(parcel = %parcel.name, version, dir = %dir.display(), "mounted a read-only view");
        self.views.lock().expect("views lock").insert(
            dir.clone(),
            View {
                session: Arc::new(session),
                mount,
            },
        );
        Response::Mounted {
            parcel: parcel.name.clone(),
            version,
            dir,
        }
    }

    /// Ends the view mounted at `dir`.
    fn unmount_view(&self, dir: &Path) -> Response {
        let _one_at_a_time = self.view_changes.lock().expect("view changes");
        let view = {
            let mut views = self.views.lock().expect("views lock");
            match views.remove(dir) {
                Some(view) => Some(view),
                None => std::fs::canonicalize(dir)
                    .ok()
                    .and_then(|dir| views.remove(&dir)),
            }
        };
        let Some(view) = view else {
            return error_response(
                ErrorClass::NotFound,
                format!(
                    "no view of isrfsd is mounted at {} (`isrctl mount NAME@VERSION DIR` mounts one)",
                    dir.display()
                ),
            );
        };
        let result = view.mount.unmount();
        view.session.end_view();
        match result {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), "unmounted a read-only view");
                Response::Done
            }
            Err(e) => error_response(
                ErrorClass::Other,
                format!("unmounting the view at {}: {e}", dir.display()),
            ),
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
                report,
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
        tracing::info!(parcel, vmm = %chosen, from_memory = status.resumed_from_memory, seconds = status.start_seconds, lazy = status.ram_file.is_some(), "VM started");
        if let Some(ram_file) = status
            .ram_file
            .as_ref()
            .and_then(|f| f.strip_prefix(&mount).ok())
            && let Some(session) = self.live_session(parcel)
        {
            session.record_working_set(ram_file);
        }
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
                        report: Box::new(CommitReport {
                            already_done: true,
                            ..report.clone()
                        }),
                    };
                }
                match self.reopen_for_checkin(parcel, reopen) {
                    Ok(Ok(session)) => Arc::new(session),
                    Ok(Err(report)) => {
                        return Response::Committed {
                            report: Box::new(report),
                        };
                    }
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
            return Response::Committed {
                report: Box::new(report),
            };
        }
        let mounted = self.sessions.lock().expect("sessions lock").remove(parcel);
        if let Some(mount) = mounted.and_then(|m| m.mount) {
            if let Err(e) = mount.unmount() {
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
        Response::Committed {
            report: Box::new(report),
        }
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
        let record = crate::session::read_record(&self.context.state_dir, parcel)
            .map_err(fail)?
            .ok_or_else(|| fail(SessionError::NotResumed(parcel.to_owned())))?;
        let Some(reopen) = reopen else {
            // isrctl resends with the parcel's secrets.
            return Err(fail(SessionError::NotResumed(parcel.to_owned())));
        };
        let (open, store) = open_requested(&reopen.parcel, &reopen.store)?;
        crate::session::detach_dead_mount(&record.mount);
        if record.checked_in {
            let version = self
                .runtime
                .block_on(crate::session::finish_checked_in(
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
        let requested_ms = crate::manifest::Timestamp::now().unix_ms();
        let existing = self
            .sessions
            .lock()
            .expect("sessions lock")
            .get(&parcel.name)
            .map(|m| m.session.record().mount.clone());
        if let Some(mount) = existing {
            if let Err(response) = self.remount_if_gone(&parcel.name) {
                return response;
            }
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
        let (open, store) = match open_requested(&parcel, &wire_store) {
            Ok(opened) => opened,
            Err(response) => return response,
        };
        let reattaching = crate::session::read_record(&self.context.state_dir, &open.name)
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
        match self.mount_live(&session, &mount) {
            Ok(handle) => {
                tracing::info!(parcel = %parcel.name, mount = %mount.display(), reattaching, "mounted");
                self.checked_in
                    .lock()
                    .expect("checked_in")
                    .remove(&parcel.name);
                let vm = starting_slot(&session, &parcel.name, vmm, &mount);
                self.sessions.lock().expect("sessions lock").insert(
                    parcel.name.clone(),
                    Mounted {
                        session: Arc::new(session),
                        mount: Some(handle),
                        vm,
                        timeline: control::ResumeTimeline {
                            requested_ms: Some(requested_ms),
                            mounted_ms: Some(crate::manifest::Timestamp::now().unix_ms()),
                        },
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
            Err(response) => {
                // Nothing of this resume may stay behind: the session's
                // database closes, and a fresh session gives its lock back.
                self.runtime.block_on(session.abandon());
                response
            }
        }
    }

    /// Mounts `session` at `mount` (detaching a dead mount there first) and
    /// checks that the mount point then shows this mount.
    fn mount_live(
        &self,
        session: &Session,
        mount: &Path,
    ) -> Result<Box<dyn MountHandle>, Response> {
        crate::session::detach_dead_mount(mount);
        if let Err(e) = std::fs::create_dir_all(mount) {
            return Err(error_response(
                ErrorClass::Other,
                format!("creating mount point {}: {e}", mount.display()),
            ));
        }
        let handle = self.mounter.mount(session, mount).map_err(|e| {
            error_response(
                ErrorClass::Other,
                format!("mounting {}: {e}", mount.display()),
            )
        })?;
        match handle.state() {
            MountState::Live => Ok(handle),
            state => {
                let _ = handle.unmount();
                Err(error_response(
                    ErrorClass::Other,
                    format!(
                        "mounting {}: the mount point does not show the new mount ({state:?}); unmount whatever is mounted there, then run the command again",
                        mount.display()
                    ),
                ))
            }
        }
    }

    /// Mounts a resumed parcel again if its mount is gone (a reattach must
    /// answer with a live mount); refuses if something covers it.
    fn remount_if_gone(&self, parcel: &str) -> Result<(), Response> {
        let (session, state) = {
            let sessions = self.sessions.lock().expect("sessions lock");
            let Some(mounted) = sessions.get(parcel) else {
                return Ok(());
            };
            let state = mounted
                .mount
                .as_ref()
                .map_or(MountState::Gone, |handle| handle.state());
            (mounted.session.clone(), state)
        };
        let mount = session.record().mount;
        match state {
            MountState::Live => Ok(()),
            MountState::Covered => Err(error_response(
                ErrorClass::Conflict,
                format!(
                    "something else is mounted over parcel {parcel}'s mount {}; unmount it (`umount {}`), then run `isrctl resume {parcel}` again",
                    mount.display(),
                    mount.display()
                ),
            )),
            MountState::Gone => {
                self.forget_mount(parcel);
                let handle = self.mount_live(&session, &mount)?;
                tracing::info!(parcel, mount = %mount.display(), "mounted again");
                if let Some(mounted) = self.sessions.lock().expect("sessions lock").get_mut(parcel)
                {
                    mounted.mount = Some(handle);
                }
                Ok(())
            }
        }
    }

    /// Drops a session's mount handle that is no longer what its mount
    /// point shows (its unmount fails harmlessly: nothing of ours is there).
    fn forget_mount(&self, parcel: &str) {
        let handle = self
            .sessions
            .lock()
            .expect("sessions lock")
            .get_mut(parcel)
            .and_then(|m| m.mount.take());
        if let Some(handle) = handle {
            let _ = handle.unmount();
        }
    }

    /// Notices mounts that ended behind the daemon's back (someone unmounted
    /// them): flushes what their sessions wrote and forgets the mount, so
    /// status says so and `isrctl resume` mounts them again. isrfsd calls
    /// this every few seconds.
    pub fn check_mounts(&self) {
        let gone: Vec<View> = {
            let mut views = self.views.lock().expect("views lock");
            let dirs: Vec<PathBuf> = views
                .iter()
                .filter(|(_, v)| v.mount.state() == MountState::Gone)
                .map(|(dir, _)| dir.clone())
                .collect();
            dirs.iter().filter_map(|dir| views.remove(dir)).collect()
        };
        for view in gone {
            tracing::info!(dir = %view.session.record().mount.display(), "a view was unmounted behind isrfsd's back; forgetting it");
            let _ = view.mount.unmount();
            view.session.end_view();
        }
        let names: Vec<String> = self
            .sessions
            .lock()
            .expect("sessions lock")
            .keys()
            .cloned()
            .collect();
        for name in names {
            let lock = self.parcel_lock(&name);
            // A request busy with the parcel decides about its mount itself.
            let Ok(_one_at_a_time) = lock.try_lock() else {
                continue;
            };
            let gone = self
                .sessions
                .lock()
                .expect("sessions lock")
                .get(&name)
                .filter(|m| {
                    m.mount
                        .as_ref()
                        .is_some_and(|handle| handle.state() == MountState::Gone)
                })
                .map(|m| m.session.clone());
            let Some(session) = gone else {
                continue;
            };
            tracing::warn!(parcel = %name, mount = %session.record().mount.display(), "the mount ended behind isrfsd's back (unmounted by someone else); the session's changes are kept, and `isrctl resume {name}` mounts it again");
            if let Err(e) = session.image.flush_all() {
                tracing::error!(parcel = %name, error = %e, "flush failed after the mount ended");
            }
            self.forget_mount(&name);
        }
    }

    /// Saves running VMs into their mounts, flushes and unmounts every
    /// session; each stays resumable (`isrctl resume` reattaches it).
    pub fn shut_down(&self) {
        self.shut_down_with_progress(&|_| {});
    }

    /// [`Daemon::shut_down`], calling `progress` before each step (a VM's
    /// save, a session's flush and unmount) with what it starts, so a
    /// supervisor can give each step its own time budget.
    pub fn shut_down_with_progress(&self, progress: &dyn Fn(ShutdownStep<'_>)) {
        let views: Vec<View> = self
            .views
            .lock()
            .expect("views lock")
            .drain()
            .map(|(_, view)| view)
            .collect();
        for view in views {
            if let Err(e) = view.mount.unmount() {
                tracing::error!(dir = %view.session.record().mount.display(), error = %e, "unmounting a view failed at shutdown");
            }
            view.session.end_view();
        }
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
                progress(ShutdownStep::SavingVm(&name));
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
            progress(ShutdownStep::Flushing(&name));
            if let Err(e) = mounted.session.image.flush_all() {
                tracing::error!(parcel = %name, error = %e, "flush failed at shutdown");
            }
            mounted.session.fetcher.stop();
            if let Some(mount) = mounted.mount {
                if let Err(e) = mount.unmount() {
                    tracing::error!(parcel = %name, error = %e, "unmount failed at shutdown");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::control::{WireParcel, WireStore};
    use crate::keys::{Credential, Zeroizing};
    use crate::parcel::{self, OpenParcel};
    use crate::store::{RetrySettings, S3Settings};

    /// Counts mounts and unmounts instead of mounting; fails when told to.
    #[derive(Default)]
    struct CountingMounter {
        mounts: Arc<AtomicUsize>,
        unmounts: Arc<AtomicUsize>,
        fail: Arc<std::sync::atomic::AtomicBool>,
        /// When set, a mount waits for a message on it first.
        gate: Arc<Mutex<Option<std::sync::mpsc::Receiver<()>>>>,
    }

    struct CountedMount(Arc<AtomicUsize>);

    impl MountHandle for CountedMount {
        fn unmount(self: Box<Self>) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        fn state(&self) -> MountState {
            MountState::Live
        }
    }

    impl Mounter for CountingMounter {
        fn mount(
            &self,
            _session: &Session,
            mount_point: &Path,
        ) -> std::io::Result<Box<dyn MountHandle>> {
            assert!(mount_point.is_dir(), "the daemon creates the mount point");
            if let Some(gate) = self.gate.lock().unwrap().as_ref() {
                gate.recv().unwrap();
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("no FUSE here"));
            }
            self.mounts.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(CountedMount(self.unmounts.clone())))
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        parcel: OpenParcel,
        daemon: Daemon,
        mounts: Arc<AtomicUsize>,
        unmounts: Arc<AtomicUsize>,
        fail_mounts: Arc<std::sync::atomic::AtomicBool>,
        mount_gate: Arc<Mutex<Option<std::sync::mpsc::Receiver<()>>>>,
    }

    /// A daemon over a local store holding parcel `p` (one empty version).
    fn fixture(fail_mounts: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store_url = dir.path().join("store").display().to_string();
        let store =
            store::open(&store_url, &S3Settings::default(), RetrySettings::default()).unwrap();
        let setup = tokio::runtime::Runtime::new().unwrap();
        let parcel = setup.block_on(parcel::testing::parcel_with_one_version(
            &store,
            &[Credential::Passphrase(Zeroizing::new("pw".into()))],
        ));
        let mut config = Config::from_toml("", Path::new("test.toml")).unwrap();
        config.state_dir = dir.path().join("state");
        config.runtime_dir = dir.path().join("run");
        config.prefetch = false;
        let cache = Arc::new(ChunkCache::open(&dir.path().join("cache"), 1 << 30).unwrap());
        let mounter = CountingMounter {
            fail: Arc::new(fail_mounts.into()),
            ..CountingMounter::default()
        };
        let (mounts, unmounts, fail_mounts, mount_gate) = (
            mounter.mounts.clone(),
            mounter.unmounts.clone(),
            mounter.fail.clone(),
            mounter.gate.clone(),
        );
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (shutdown, _) = std::sync::mpsc::channel();
        let daemon = Daemon::new(&config, cache, runtime, Box::new(mounter), shutdown);
        Fixture {
            dir,
            parcel,
            daemon,
            mounts,
            unmounts,
            fail_mounts,
            mount_gate,
        }
    }

    impl Fixture {
        fn resume(&self) -> Response {
            self.daemon.handle(Request::Resume {
                parcel: Box::new(WireParcel::new(&self.parcel)),
                version: None,
                mount: self.dir.path().join("mnt"),
                store: WireStore {
                    url: self.dir.path().join("store").display().to_string(),
                    read_url: None,
                    s3: S3Settings::default(),
                    retry: RetrySettings::default(),
                },
                vmm: Some(VmmKind::None),
            })
        }

        fn status(&self) -> Response {
            self.daemon.handle(Request::Status {
                parcel: Some("p".into()),
            })
        }
    }

    #[test]
    fn resume_mounts_once_and_checkin_commits_and_unmounts() {
        let f = fixture(false);
        let Response::Resumed {
            reattached: false,
            vm: None,
            ..
        } = f.resume()
        else {
            panic!("first resume");
        };
        let Response::Resumed {
            reattached: true, ..
        } = f.resume()
        else {
            panic!("second resume reattaches");
        };
        assert_eq!(f.mounts.load(Ordering::SeqCst), 1);
        let Response::Status { sessions, .. } = f.status() else {
            panic!("status");
        };
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].session.parcel, "p");

        let reply = f.daemon.handle(Request::Checkin {
            parcel: "p".into(),
            message: "done".into(),
            wipe: false,
            save_as: None,
            reopen: None,
        });
        let Response::Committed { report } = reply else {
            panic!("checkin: {reply:?}");
        };
        assert_eq!(report.parcel, "p");
        assert_eq!(f.unmounts.load(Ordering::SeqCst), 1);
        let Response::Error { class, .. } = f.status() else {
            panic!("no session after checkin");
        };
        assert_eq!(class, ErrorClass::NotFound);
    }

    #[test]
    fn status_lists_a_resume_under_way_as_resuming_not_as_a_session() {
        let f = fixture(false);
        let (open_gate, gate) = std::sync::mpsc::channel();
        *f.mount_gate.lock().unwrap() = Some(gate);
        /// Lets the held mount go on however the test ends (a panic would
        /// otherwise wait forever for the resume thread).
        struct Release(std::sync::mpsc::Sender<()>);
        impl Drop for Release {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let state = f.dir.path().join("state");
        let during = std::thread::scope(|scope| {
            let release = Release(open_gate);
            let resume = scope.spawn(|| f.resume());
            // The resume writes its session record, then waits in mount.
            for _ in 0..600 {
                if crate::session::read_record(&state, "p").unwrap().is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let during = f.status();
            drop(release);
            assert!(matches!(resume.join().unwrap(), Response::Resumed { .. }));
            during
        });
        let Response::Status { sessions, resuming } = during else {
            panic!("status during the resume: {during:?}");
        };
        assert_eq!((sessions.len(), resuming), (0, vec!["p".to_owned()]));
        let Response::Status { sessions, resuming } = f.status() else {
            panic!("status after the resume");
        };
        assert_eq!((sessions.len(), resuming.len()), (1, 0));
    }

    #[test]
    fn discard_unmounts_and_forgets_the_session() {
        let f = fixture(false);
        assert!(matches!(f.resume(), Response::Resumed { .. }));
        let reply = f.daemon.handle(Request::Discard { parcel: "p".into() });
        assert!(matches!(reply, Response::Done), "{reply:?}");
        assert_eq!(f.unmounts.load(Ordering::SeqCst), 1);
        assert!(matches!(f.status(), Response::Error { .. }));
    }

    #[test]
    fn a_failed_mount_is_an_error_reply_and_no_session() {
        let f = fixture(true);
        let reply = f.resume();
        let Response::Error { class, message } = reply else {
            panic!("resume with a failing mount: {reply:?}");
        };
        assert_eq!(class, ErrorClass::Other);
        assert!(message.contains("mounting"), "{message}");
        assert!(matches!(f.status(), Response::Error { .. }));
        // Nothing of the failed resume stays: no session state, no lock, and
        // the session database is closed, so the next resume starts afresh.
        assert!(!crate::session::session_dir(&f.dir.path().join("state"), "p").exists());
        assert!(!f.dir.path().join("store/parcels/p/lock").exists());
        f.fail_mounts.store(false, Ordering::SeqCst);
        assert!(
            matches!(
                f.resume(),
                Response::Resumed {
                    reattached: false,
                    ..
                }
            ),
            "a resume after a failed mount works"
        );
    }

    #[test]
    fn a_view_mounts_beside_the_session_and_counts_until_unmounted() {
        let f = fixture(false);
        assert!(matches!(f.resume(), Response::Resumed { .. }));
        let dir = f.dir.path().join("view");
        std::fs::create_dir(&dir).unwrap();
        let mount = |dir: PathBuf| Request::Mount {
            parcel: Box::new(WireParcel::new(&f.parcel)),
            version: Some(1),
            dir,
            store: WireStore {
                url: f.dir.path().join("store").display().to_string(),
                read_url: None,
                s3: S3Settings::default(),
                retry: RetrySettings::default(),
            },
        };
        let reply = f.daemon.handle(mount(dir.clone()));
        let Response::Mounted { version: 1, .. } = reply else {
            panic!("mount: {reply:?}");
        };
        assert_eq!(f.daemon.session_count(), 2, "the session and the view");
        let Response::Views { views } = f.daemon.handle(Request::Views) else {
            panic!("views");
        };
        assert_eq!(views.len(), 1);
        assert_eq!((views[0].parcel.as_str(), views[0].version), ("p", 1));
        let views = crate::session::views_dir(&f.dir.path().join("state"));
        assert_eq!(std::fs::read_dir(&views).unwrap().count(), 1);
        let Response::Error { class, .. } = f.daemon.handle(mount(dir.clone())) else {
            panic!("a second view on one directory");
        };
        assert_eq!(class, ErrorClass::Conflict);
        let Response::Error { class, .. } = f.daemon.handle(mount(PathBuf::from("rel"))) else {
            panic!("a relative directory");
        };
        assert_eq!(class, ErrorClass::Invalid);

        let reply = f.daemon.handle(Request::Unmount { dir: dir.clone() });
        assert!(matches!(reply, Response::Done), "{reply:?}");
        assert_eq!(f.daemon.session_count(), 1);
        assert_eq!(std::fs::read_dir(&views).unwrap().count(), 0);
        let Response::Error { class, .. } = f.daemon.handle(Request::Unmount { dir }) else {
            panic!("unmounting twice");
        };
        assert_eq!(class, ErrorClass::NotFound);
        // Two mounts (session, view), one unmount (the view).
        assert_eq!(f.mounts.load(Ordering::SeqCst), 2);
        assert_eq!(f.unmounts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn requests_for_a_parcel_that_is_not_resumed_are_not_found() {
        let f = fixture(false);
        for request in [
            Request::Sync {
                parcel: "p".into(),
                message: "m".into(),
            },
            Request::Hoard { parcel: "p".into() },
            Request::Discard { parcel: "p".into() },
        ] {
            let reply = f.daemon.handle(request);
            let Response::Error { class, .. } = reply else {
                panic!("{reply:?}");
            };
            assert_eq!(class, ErrorClass::NotFound);
        }
    }
}
