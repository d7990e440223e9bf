//! The commands over this machine's sessions, through isrfsd: `isrctl
//! resume` (lock, mount, start the VM; `--foreground` waits for it),
//! `status`, `hoard`, `discard`, and `unlock` (breaking a session's lock from
//! anywhere). Committing a session is [`crate::checkin`]'s.
//!
//! Uses [`crate::daemon`], [`crate::context`] and [`crate::output`] (see the
//! layering in `main.rs`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use isr::control::{ControlError, ParcelStatus, Request, Response, WireParcel};
use isr::error::ErrorClass;
use isr::session::SessionError;
use isr::vmm::supervise::{VmState, VmStatus};

use crate::context::{CommandContext, ConflictingArgument, InvalidArgument, failure, parse_target};
use crate::daemon::{self, ensure_daemon};
use crate::output;

/// `isrctl resume`.
#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// Parcel, optionally with a version: NAME or NAME@VERSION (default: newest).
    target: String,
    /// Mount point (default: <runtime dir>/mnt/NAME).
    #[arg(long, value_name = "DIR")]
    mount: Option<PathBuf>,
    /// Who runs the VM from the mount: qemu (isrfsd starts and supervises it),
    /// libvirt (a transient domain via virsh), virtualbox (VMDK descriptors
    /// over the raw disks, then VBoxManage), none (mount only). Default: the
    /// `vmm` of the parcel's vm.toml; none without one.
    #[arg(long, value_name = "VMM", value_parser = parse_vmm)]
    vmm: Option<isr::vmm::config::VmmKind>,
    /// Stay until the VM stops: exit 0 when it was suspended or the guest
    /// powered off, 1 when QEMU died (resume returns once it runs otherwise).
    #[arg(long)]
    foreground: bool,
}

fn parse_vmm(text: &str) -> Result<isr::vmm::config::VmmKind, String> {
    text.parse()
}

/// `isrctl status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this parcel.
    pub name: Option<String>,
    /// A live view, refreshed every second: fetch rate, time until fully
    /// local, upload backlog, and a map of every file's chunks.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: stop after N refreshes.
    #[arg(long, value_name = "N", requires = "watch")]
    pub count: Option<u64>,
}

/// `isrctl unlock`.
#[derive(Debug, Args)]
pub struct UnlockArgs {
    /// Parcel.
    name: String,
    /// Required: breaking a lock loses the holder's unsaved changes.
    #[arg(long)]
    force: bool,
}

/// `isrctl resume`.
pub async fn resume(context: &CommandContext, args: ResumeArgs) -> anyhow::Result<ExitCode> {
    let (name, version) = parse_target(&args.target)?;
    // The daemon runs elsewhere: a relative mount point is this directory's.
    let explicit_mount = args
        .mount
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .context("resolving --mount")?;
    refuse_conflicting_resume(context, name, version, explicit_mount.as_deref())?;
    let store = context.store()?;
    let parcel = context.open_parcel(&store, name).await?;
    let mount = explicit_mount.unwrap_or_else(|| context.config.runtime_dir.join("mnt").join(name));
    let socket = ensure_daemon(context)?;
    let request = Request::Resume {
        parcel: Box::new(WireParcel::new(&parcel)),
        version,
        mount,
        store: daemon::wire_store(context),
        vmm: args.vmm,
    };
    let response = daemon::call(&socket, request).await??;
    let Response::Resumed {
        mount,
        reattached,
        vm,
        warnings,
    } = response
    else {
        anyhow::bail!("isrfsd answered resume with {response:?}");
    };
    if args.foreground && vm.as_ref().is_none_or(|vm| vm.state != VmState::Running) {
        return Err(InvalidArgument(format!(
            "--foreground waits for a VM isrfsd runs, and {name} has none running (its vm.toml names no VMM, or --vmm none, or the steps were only printed)"
        ))
        .into());
    }
    for warning in &warnings {
        eprintln!("isrctl: warning: {warning}");
    }
    if context.global.json {
        output::json(&serde_json::json!({
            "parcel": name, "mount": mount, "reattached": reattached, "vm": vm,
            "warnings": warnings,
        }))?;
    } else {
        if reattached {
            output::note(&format!("reattached to the existing session of {name}"));
        }
        println!("{}", mount.display());
        if let Some(vm) = vm.as_ref().filter(|_| !output::quiet()) {
            print_vm(name, vm);
        }
    }
    if args.foreground {
        let code = wait_for_vm_exit(&socket, name).await?;
        return Ok(code);
    }
    Ok(ExitCode::SUCCESS)
}

/// A resume of a parcel already resumed here reattaches its session as it
/// is: a version or mount point other than the session's would be ignored,
/// so it is refused (exit 5), naming what is resumed. The session record on
/// disk is the fact, whether isrfsd runs or not.
fn refuse_conflicting_resume(
    context: &CommandContext,
    name: &str,
    version: Option<u64>,
    mount: Option<&Path>,
) -> anyhow::Result<()> {
    let Some(record) = isr::session::read_record(&context.config.state_dir, name)? else {
        return Ok(());
    };
    if record.checked_in {
        return Ok(()); // a cut-short checkin: the next resume starts afresh
    }
    let session_version = record.committed.unwrap_or(record.base_version);
    let recorded_mount = std::path::absolute(&record.mount).unwrap_or(record.mount.clone());
    let mut conflicts = Vec::new();
    if let Some(version) = version.filter(|&v| v != session_version) {
        conflicts.push(format!("version {version} was asked for"));
    }
    if let Some(mount) = mount.filter(|&m| m != recorded_mount) {
        conflicts.push(format!("--mount {} was asked for", mount.display()));
    }
    if conflicts.is_empty() {
        return Ok(());
    }
    let committed = record.committed.map_or(String::new(), |v| {
        format!(", last committed as version {v}")
    });
    Err(ConflictingArgument(isr::error::printable(&format!(
        "{name} is already resumed here from version {}{committed}, mounted at {} (since {}), but {}; `isrctl resume {name}` reattaches it as it is, or `isrctl checkin {name}` / `isrctl discard {name}` ends it first",
        record.base_version,
        record.mount.display(),
        record.since,
        conflicts.join(" and ")
    )))
    .into())
}

/// What the VM of a resumed parcel is doing, on stderr (stdout keeps the mount path).
fn print_vm(name: &str, vm: &VmStatus) {
    match vm.state {
        VmState::Handed => {
            eprintln!(
                "isrctl: {} is not installed here; to run the VM of {name}, run:",
                vm.steps
                    .first()
                    .and_then(|s| s.first())
                    .map_or("its VMM", String::as_str)
            );
            for step in &vm.steps {
                eprintln!("  {}", step.join(" "));
            }
        }
        _ => {
            let how = match (vm.resumed_from_memory, vm.ram_file.is_some()) {
                (true, true) => "resumed, its memory arriving as the guest touches it,",
                (true, false) => "resumed from its memory image",
                (false, _) => "booted",
            };
            let mut line = format!(
                "isrctl: the VM of {name} runs ({}, {how} in {:.1} s",
                vm.kind, vm.start_seconds
            );
            if let Some(pid) = vm.pid {
                line.push_str(&format!(", pid {pid}"));
            }
            if let Some(serial) = &vm.serial_log {
                line.push_str(&format!(", serial console {}", serial.display()));
            }
            if let Some(vnc) = &vm.vnc {
                line.push_str(&format!(", VNC {vnc}"));
            }
            eprintln!("{line}); `isrctl suspend {name}` saves it and checks it in");
        }
    }
}

/// `--foreground`: polls the daemon until the VM stops running.
async fn wait_for_vm_exit(socket: &Path, name: &str) -> anyhow::Result<ExitCode> {
    loop {
        let request = Request::Status {
            parcel: Some(name.to_owned()),
        };
        let vm = match daemon::call(socket, request).await? {
            Ok(Response::Status { sessions, .. }) => sessions.into_iter().next().and_then(|s| s.vm),
            // Checked in or discarded from elsewhere: nothing runs any more.
            Err(ControlError::Daemon {
                class: ErrorClass::NotFound,
                ..
            }) => None,
            Ok(other) => anyhow::bail!("isrfsd answered status with {other:?}"),
            Err(e) => return Err(e.into()),
        };
        match vm {
            Some(vm) if matches!(vm.state, VmState::Running | VmState::Busy) => {}
            Some(vm) if vm.state == VmState::Saved => {
                eprintln!("isrctl: the VM of {name} was suspended");
                return Ok(ExitCode::SUCCESS);
            }
            Some(vm) => {
                eprintln!(
                    "isrctl: the VM of {name} stopped ({}); the parcel stays mounted: `isrctl checkin {name}` commits its disks, `isrctl resume {name}` starts it again",
                    vm.exit.as_deref().unwrap_or("exited")
                );
                // A crash is a failure (a kiosk's unit restarts it); a power-off is not.
                return Ok(if vm.powered_off {
                    ExitCode::SUCCESS
                } else {
                    failure(ErrorClass::Other)
                });
            }
            None => {
                eprintln!("isrctl: {name} is no longer resumed here");
                return Ok(ExitCode::SUCCESS);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// What `isrctl status` lists: the sessions isrfsd serves and those only on
/// this machine's disk (isrfsd not running, or restarted without them).
#[derive(Debug)]
pub struct Listing {
    /// Whether isrfsd answered.
    pub daemon_running: bool,
    /// The sessions isrfsd serves.
    pub sessions: Vec<ParcelStatus>,
    /// Parcels isrfsd is resuming right now, with their session record
    /// when it is on disk already.
    pub resuming: Vec<(String, Option<isr::session::SessionRecord>)>,
    /// Session records on disk that no running isrfsd serves: `isrctl
    /// resume` reattaches them, `isrctl checkin` commits them.
    pub detached: Vec<isr::session::SessionRecord>,
}

impl Listing {
    /// The `--json` document: every session in `sessions`, each with
    /// `attached` (served by isrfsd) and, for the detached, a `hint`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut sessions = Vec::new();
        for status in &self.sessions {
            let mut value = serde_json::to_value(status).unwrap_or_default();
            value["attached"] = true.into();
            sessions.push(value);
        }
        for (parcel, record) in &self.resuming {
            sessions.push(serde_json::json!({
                "parcel": parcel,
                "store": record.as_ref().map(|r| &r.store),
                "base_version": record.as_ref().map(|r| r.base_version),
                "mount": record.as_ref().map(|r| &r.mount),
                "mounted": false,
                "vm": null,
                "attached": true,
                "resuming": true,
            }));
        }
        for record in &self.detached {
            // The fields a session's status shares with its record, flat as
            // the daemon's sessions are.
            sessions.push(serde_json::json!({
                "parcel": record.parcel,
                "store": record.store,
                "base_version": record.base_version,
                "committed_version": record.committed,
                "mount": record.mount,
                "since": record.since,
                "mounted": false,
                "vm": null,
                "attached": false,
                "hint": self.detached_hint(&record.parcel),
            }));
        }
        serde_json::json!({ "daemon_running": self.daemon_running, "sessions": sessions })
    }

    fn detached_hint(&self, parcel: &str) -> String {
        if self.daemon_running {
            format!("not attached to isrfsd — `isrctl resume {parcel}` reattaches")
        } else {
            format!("daemon not running — `isrctl resume {parcel}` reattaches")
        }
    }
}

/// The sessions of this machine (only `name`'s if given), from isrfsd if it
/// runs and from the session records on disk.
pub fn listing(context: &CommandContext, name: Option<&str>) -> anyhow::Result<Listing> {
    let socket = daemon::socket_if_running(context);
    let (sessions, resuming) = match &socket {
        None => (Vec::new(), Vec::new()),
        Some(socket) => {
            tracing::debug!(socket = %socket.display(), "asking isrfsd for its sessions");
            let request = Request::Status {
                parcel: name.map(str::to_owned),
            };
            match isr::control::call(socket, request) {
                Ok(Response::Status { sessions, resuming }) => (sessions, resuming),
                Err(ControlError::Daemon {
                    class: ErrorClass::NotFound,
                    ..
                }) if name.is_some() => (Vec::new(), Vec::new()),
                Ok(other) => anyhow::bail!("isrfsd answered status with {other:?}"),
                Err(e) => return Err(e.into()),
            }
        }
    };
    let state_dir = &context.config.state_dir;
    tracing::debug!(state_dir = %state_dir.display(), "reading the session records");
    let mut records: Vec<_> = isr::session::list_records(state_dir)?
        .into_iter()
        .filter(|record| name.is_none_or(|name| name == record.parcel))
        .filter(|record| !record.checked_in)
        .filter(|record| !sessions.iter().any(|s| s.session.parcel == record.parcel))
        .collect();
    // A resume under way writes its record before it becomes a session: that
    // record is not detached.
    let resuming = resuming
        .into_iter()
        .map(|parcel| {
            let record = records
                .iter()
                .position(|r| r.parcel == parcel)
                .map(|i| records.remove(i));
            (parcel, record)
        })
        .collect();
    let listing = Listing {
        daemon_running: socket.is_some(),
        sessions,
        resuming,
        detached: records,
    };
    if let Some(name) = name
        && listing.sessions.is_empty()
        && listing.resuming.is_empty()
        && listing.detached.is_empty()
    {
        return Err(SessionError::NotResumed(name.to_owned()).into());
    }
    Ok(listing)
}

/// `isrctl status`.
pub fn status(context: &CommandContext, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let listing = listing(context, args.name.as_deref())?;
    if context.global.json {
        output::json(&listing.to_json())?;
        return Ok(ExitCode::SUCCESS);
    }
    print_listing(&listing);
    Ok(ExitCode::SUCCESS)
}

/// The text of `isrctl status`: a table of the attached sessions, then one
/// line per detached one.
pub fn print_listing(listing: &Listing) {
    if listing.sessions.is_empty() && listing.resuming.is_empty() && listing.detached.is_empty() {
        println!("no resumed parcels (`isrctl resume NAME` mounts one)");
        return;
    }
    if !listing.sessions.is_empty() {
        print_table(&listing.sessions);
    }
    for (parcel, _) in &listing.resuming {
        println!("{}", isr::error::printable(&format!("{parcel}: resuming…")));
    }
    for record in &listing.detached {
        println!(
            "{}",
            isr::error::printable(&format!(
                "{}  base {}  {}  since {}: {} (`isrctl checkin {}` commits it)",
                record.parcel,
                record.base_version,
                record.mount.display(),
                record.since,
                listing.detached_hint(&record.parcel),
                record.parcel
            ))
        );
    }
}

fn print_table(sessions: &[ParcelStatus]) {
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(
            |ParcelStatus {
                 session: s,
                 vm,
                 mounted,
                 ..
             }| {
                vec![
                    s.parcel.clone(),
                    s.base_version.to_string(),
                    if *mounted {
                        s.mount.display().to_string()
                    } else {
                        format!(
                            "{} (not mounted: `isrctl resume {}` mounts it again)",
                            s.mount.display(),
                            s.parcel
                        )
                    },
                    if s.manifest_segments_loaded < s.manifest_segments {
                        format!(
                            "{}/{} so far (manifest {}/{} segments)",
                            s.chunks_local,
                            s.chunks_total,
                            s.manifest_segments_loaded,
                            s.manifest_segments
                        )
                    } else {
                        format!("{}/{}", s.chunks_local, s.chunks_total)
                    },
                    s.dirty_chunks.to_string(),
                    output::bytes(s.pending_bytes),
                    s.committed_version.map_or("-".into(), |v| v.to_string()),
                    output::bytes(s.fetch.fetched_bytes),
                    s.fetch.in_flight.to_string(),
                    match s.fetch.missing_chunks {
                        0 => (s.fetch.failures + s.fetch.verify_failures).to_string(),
                        missing => format!(
                            "{} ({missing} missing from the store)",
                            s.fetch.failures + s.fetch.verify_failures
                        ),
                    },
                    vm.as_ref().map_or("-".into(), |vm| {
                        let state = serde_json::to_value(vm.state)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default();
                        let memory = if vm.ram_file.is_some() {
                            ", lazy memory"
                        } else {
                            ""
                        };
                        match vm.pid {
                            Some(pid) => format!("{} {state} (pid {pid}{memory})", vm.kind),
                            None => format!("{} {state}", vm.kind),
                        }
                    }),
                ]
            },
        )
        .collect();
    output::table(
        &[
            "PARCEL",
            "BASE",
            "MOUNT",
            "LOCAL/TOTAL",
            "DIRTY CHUNKS",
            "UPLOAD BACKLOG",
            "SYNCED",
            "FETCHED",
            "IN FLIGHT",
            "ERRORS",
            "VM",
        ],
        &rows,
    );
}

/// `isrctl hoard`.
pub fn hoard(context: &CommandContext, name: &str) -> anyhow::Result<ExitCode> {
    let chunks = hoard_parcel(context, name)?;
    if context.global.json {
        output::json(&serde_json::json!({ "parcel": name, "chunks": chunks }))?;
    } else {
        println!("{name}: all {chunks} chunks are local; it keeps working without the store");
    }
    Ok(ExitCode::SUCCESS)
}

/// Fetches every chunk of a resumed parcel and waits (blocking; a progress
/// bar on a terminal): what `isrctl hoard` and the web UI's hoard do. The
/// number of chunks.
pub fn hoard_parcel(context: &CommandContext, name: &str) -> anyhow::Result<u64> {
    let socket = daemon::socket_if_running(context)
        .ok_or_else(|| SessionError::NotResumed(name.to_owned()))?;
    let call = {
        let (socket, parcel) = (socket.clone(), name.to_owned());
        std::thread::spawn(move || isr::control::call(&socket, Request::Hoard { parcel }))
    };
    if output::progress_visible() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "   hoarding [{bar:30}] {pos}/{len} chunks, eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        while !call.is_finished() {
            let request = Request::Status {
                parcel: Some(name.to_owned()),
            };
            if let Ok(Response::Status { sessions, .. }) = isr::control::call(&socket, request)
                && let Some(session) = sessions.first().map(|s| &s.session)
            {
                bar.set_length(session.chunks_total);
                bar.set_position(session.chunks_local);
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        bar.finish_and_clear();
    }
    match call.join().expect("hoard thread")? {
        Response::Hoarded { chunks } => Ok(chunks),
        other => anyhow::bail!("isrfsd answered hoard with {other:?}"),
    }
}

/// `isrctl discard`.
pub async fn discard(context: &CommandContext, name: &str) -> anyhow::Result<ExitCode> {
    let released = discard_session(context, name).await?;
    print_discarded(context, name, released)?;
    Ok(ExitCode::SUCCESS)
}

/// Drops a parcel's local session (its changes since the last commit) and
/// releases its lock: what `isrctl discard` and the web UI's discard do.
/// Whether the lock was released.
pub async fn discard_session(context: &CommandContext, name: &str) -> anyhow::Result<bool> {
    if let Some(socket) = daemon::socket_if_running(context) {
        let request = Request::Discard {
            parcel: name.to_owned(),
        };
        match daemon::call(&socket, request).await? {
            Ok(_) => return Ok(true),
            Err(ControlError::Daemon {
                class: ErrorClass::NotFound,
                ..
            }) => {} // not mounted: maybe a stale record
            Err(e) => return Err(e.into()),
        }
    }
    // No daemon holds it: remove what a killed daemon left behind: its VM,
    // its dead mount, the lock, the session state.
    let Some(record) = isr::session::read_record(&context.config.state_dir, name)? else {
        return Err(SessionError::NotResumed(name.to_owned()).into());
    };
    isr::vmm::supervise::stop_leftovers(
        name,
        &context.config.runtime_dir.join("vm").join(name),
        &context.config.vmm,
    );
    isr::session::detach_dead_mount(&record.mount);
    let store = context.store()?;
    let released = match isr::session::check_lock(&store, &record).await {
        Ok(()) => {
            store
                .writer("release the lock")?
                .delete(&isr::layout::lock(name))
                .await?;
            true
        }
        Err(e) => {
            eprintln!("isrctl: not releasing the lock: {e}");
            false
        }
    };
    let dir = isr::session::session_dir(&context.config.state_dir, name);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(released)
}

fn print_discarded(context: &CommandContext, name: &str, released: bool) -> anyhow::Result<()> {
    output::outcome(
        context.global.json,
        &serde_json::json!({ "parcel": name, "discarded": true, "lock_released": released }),
        &if released {
            format!("discarded the local session of {name} and released its lock")
        } else {
            format!("discarded the local session of {name}")
        },
    )
}

/// `isrctl unlock`.
pub async fn unlock(context: &CommandContext, args: UnlockArgs) -> anyhow::Result<ExitCode> {
    if !args.force {
        return Err(InvalidArgument(format!(
            "breaking the lock of {} loses its holder's unsaved changes; run `isrctl unlock --force {}` if that is what you want",
            args.name, args.name
        ))
        .into());
    }
    let store = context.store()?;
    isr::parcel::require_record(&store, &args.name).await?;
    let lock = isr::session::force_unlock(&store, &args.name).await?;
    let text = match &lock {
        Some(lock) => isr::error::printable(&format!(
            "broke the lock of {} held by {} on {} since {}",
            args.name, lock.holder, lock.host, lock.since
        )),
        None => format!("{} was not locked", args.name),
    };
    output::outcome(
        context.global.json,
        &serde_json::json!({ "parcel": args.name, "was_locked": lock.is_some(), "broken_lock": lock }),
        &text,
    )?;
    Ok(ExitCode::SUCCESS)
}
