//! One parcel's VM as `isrfsd` runs it, whatever the adapter: started from the
//! mounted parcel once `isrctl resume` has mounted it, saved back into the mount
//! by `isrctl suspend` before the checkin.
//!
//! - [`SupervisedVm::start`]: reads the parcel's `vm.toml` from the mount and
//!   starts the VM with the chosen [`VmmKind`]: QEMU under supervision
//!   ([`super::qemu::QemuVm`], QMP socket, serial console and QEMU's log in the
//!   VM's runtime directory), or the `virsh` / `VBoxManage` steps of the libvirt
//!   and VirtualBox adapters (run when the program is installed, otherwise handed
//!   back to be printed).
//! - [`SupervisedVm::suspend`]: saves the VM's memory into the mount and stops
//!   it. A failed save leaves the VM running (QEMU) and nothing renamed into place.
//! - [`SupervisedVm::status`]: a [`VmStatus`] for `isrctl status` and `.isr/stats`.
//!
//! **The memory image is consumed.** Once a VM has been started from its memory
//! image, that file describes a moment the disks have already moved past: a sync,
//! a checkin after a crash of QEMU, or a second resume would pair new disks with
//! old memory and corrupt the guest's file systems. So the image is deleted from
//! the mount as soon as the VM has loaded it, and exists again only after the
//! next successful suspend. A version without a memory image is the disks alone,
//! as after a power cut: the next resume boots it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::config::{DisplayKind, VM_CONFIG_FILE, VmConfig, VmConfigError, VmmKind};
use super::libvirt::{self, Lifecycle};
use super::qemu::{self, QemuError, QemuRuntime, QemuVm};
use super::virtualbox::{self, VboxError};
use crate::error::{Classify, ErrorClass};

/// How the daemon runs a parcel's VM (`[vmm]` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmmSettings {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// QEMU's `-accel` value.
    pub accel: String,
    /// The libvirt connection URI.
    pub libvirt_uri: String,
}

impl Default for VmmSettings {
    fn default() -> Self {
        VmmSettings {
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel: qemu::DEFAULT_ACCEL.to_owned(),
            libvirt_uri: libvirt::SESSION_URI.to_owned(),
        }
    }
}

/// Errors starting, saving or stopping a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The parcel has no `vm.toml`.
    #[error(
        "parcel {parcel} has no {VM_CONFIG_FILE}: add one describing its VM (see `isr::vmm::config`), or resume it with `--vmm none` to only mount it"
    )]
    NoConfig {
        /// Parcel.
        parcel: String,
    },
    /// `vm.toml` is wrong.
    #[error("parcel {parcel}: {source}")]
    Config {
        /// Parcel.
        parcel: String,
        /// Cause.
        source: VmConfigError,
    },
    /// QEMU failed.
    #[error("{0}")]
    Qemu(#[from] QemuError),
    /// VirtualBox cannot run this VM as described.
    #[error("{0}")]
    Vbox(#[from] VboxError),
    /// An external step (`virsh`, `VBoxManage`) failed.
    #[error("`{command}` failed ({status}): {output}")]
    Step {
        /// The command line.
        command: String,
        /// How it ended.
        status: String,
        /// Its last output lines.
        output: String,
    },
    /// The adapter's program is not installed, so nothing can be run for it.
    #[error("{program} is not installed here: run these steps yourself:\n{steps}")]
    NotInstalled {
        /// The program.
        program: String,
        /// The command lines, one per line.
        steps: String,
    },
    /// The VM is not running (any more).
    #[error("the VM of {parcel} is not running: {why}")]
    NotRunning {
        /// Parcel.
        parcel: String,
        /// How it ended.
        why: String,
    },
    /// The memory image is not one this adapter can resume from.
    #[error("{}: {reason}", path.display())]
    MemoryImage {
        /// The memory image in the mount.
        path: PathBuf,
        /// What it is and what to do.
        reason: String,
    },
    /// A file in the mount could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
}

impl Classify for VmError {
    fn class(&self) -> ErrorClass {
        match self {
            VmError::NoConfig { .. }
            | VmError::Config { .. }
            | VmError::Vbox(_)
            | VmError::MemoryImage { .. } => ErrorClass::Invalid,
            VmError::Qemu(e) => e.class(),
            VmError::NotInstalled { .. } => ErrorClass::NotFound,
            _ => ErrorClass::Other,
        }
    }
}

/// What a VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Running under isrfsd's supervision (QEMU), or started by libvirt/VirtualBox.
    Running,
    /// Its memory is saved into the mount and it has stopped (`isrctl suspend`).
    Saved,
    /// It ended by itself (guest power-off, QEMU crashed or was killed).
    Exited,
    /// Its steps were printed, not run: someone else runs it.
    Handed,
    /// isrfsd is changing it (starting or suspending) right now.
    Busy,
}

/// A VM's state and where to find its pieces (`isrctl status --json`, `vm`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// The adapter.
    pub kind: VmmKind,
    /// What it is doing.
    pub state: VmState,
    /// QEMU's process id.
    pub pid: Option<u32>,
    /// The guest's serial console log (QEMU).
    pub serial_log: Option<PathBuf>,
    /// QEMU's own log.
    pub qemu_log: Option<PathBuf>,
    /// QEMU's QMP socket.
    pub qmp_socket: Option<PathBuf>,
    /// The VNC display (`127.0.0.1:PORT`), when it has one.
    pub vnc: Option<String>,
    /// True when it was started from a saved memory image, false when it booted.
    pub resumed_from_memory: bool,
    /// Seconds from the start until the VM ran.
    pub start_seconds: f64,
    /// The commands run (libvirt, VirtualBox) or to run (state `handed`).
    pub steps: Vec<Vec<String>>,
    /// How it ended, for state `exited`.
    pub exit: Option<String>,
    /// For state `exited`: true when the guest powered itself off (QEMU exited
    /// with status 0), false when QEMU failed or was killed.
    #[serde(default)]
    pub powered_off: bool,
}

impl VmStatus {
    /// The status of a VM being started.
    pub fn starting(kind: VmmKind) -> VmStatus {
        VmStatus {
            kind,
            state: VmState::Busy,
            pid: None,
            serial_log: None,
            qemu_log: None,
            qmp_socket: None,
            vnc: None,
            resumed_from_memory: false,
            start_seconds: 0.0,
            steps: Vec::new(),
            exit: None,
            powered_off: false,
        }
    }
}

/// What [`SupervisedVm::suspend`] did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuspendReport {
    /// The memory image in the mount.
    pub memory_image: PathBuf,
    /// Its apparent size, bytes.
    pub memory_bytes: u64,
    /// Seconds from the suspend request until the VM had stopped.
    pub seconds: f64,
}

enum Runner {
    Qemu(Box<QemuVm>),
    /// libvirt or VirtualBox, run through their command-line tools.
    External {
        executed: bool,
    },
}

/// A parcel's VM, started from its mount.
pub struct SupervisedVm {
    parcel: String,
    kind: VmmKind,
    config: VmConfig,
    mount: PathBuf,
    dir: PathBuf,
    settings: VmmSettings,
    runner: Runner,
    state: VmState,
    resumed_from_memory: bool,
    start_seconds: f64,
    steps: Vec<Vec<String>>,
    exit: Option<String>,
    powered_off: bool,
    vnc: Option<String>,
    /// libvirt: when `virsh domstate` was last asked whether the domain runs.
    libvirt_checked: Option<Instant>,
}

impl std::fmt::Debug for SupervisedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisedVm")
            .field("parcel", &self.parcel)
            .field("kind", &self.kind)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Reads the parcel's `vm.toml` from the mount.
pub fn load_config(parcel: &str, mount: &Path) -> Result<VmConfig, VmError> {
    let path = mount.join(VM_CONFIG_FILE);
    if !path.exists() {
        return Err(VmError::NoConfig {
            parcel: parcel.to_owned(),
        });
    }
    VmConfig::load(&path).map_err(|source| VmError::Config {
        parcel: parcel.to_owned(),
        source,
    })
}

/// The VMM a resume uses: the one asked for, else the one `vm.toml` names, else
/// none (a parcel without a `vm.toml` is only mounted).
pub fn chosen_kind(
    parcel: &str,
    requested: Option<VmmKind>,
    mount: &Path,
) -> Result<VmmKind, VmError> {
    match requested {
        Some(kind) => Ok(kind),
        None => configured_kind(load_config(parcel, mount)),
    }
}

/// The VMM a parcel's `vm.toml` (as [`load_config`] read it) names; none
/// without a `vm.toml`.
pub fn configured_kind(config: Result<VmConfig, VmError>) -> Result<VmmKind, VmError> {
    match config {
        Ok(config) => Ok(config.vmm),
        Err(VmError::NoConfig { .. }) => Ok(VmmKind::None),
        Err(e) => Err(e),
    }
}

/// The file whose first line is the pid of the QEMU started for a VM directory.
fn pid_file(dir: &Path) -> PathBuf {
    dir.join("qemu.pid")
}

/// Kills a QEMU an earlier isrfsd (killed itself) left running for this VM:
/// its disks are in a mount that is gone, and two QEMUs must never run one VM.
fn kill_leftover_qemu(dir: &Path) {
    let Ok(text) = std::fs::read_to_string(pid_file(dir)) else {
        return;
    };
    let Some(pid) = text.trim().parse::<i32>().ok().filter(|&p| p > 1) else {
        return;
    };
    // Only if that pid is still a QEMU using this VM's QMP socket.
    let socket = dir.join("qmp.sock").display().to_string();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains(&socket) {
        tracing::warn!(pid, "killing a QEMU left running by an earlier isrfsd");
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        for _ in 0..100 {
            if nix::sys::signal::kill(pid, None).is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_file(pid_file(dir));
}

/// libvirt: destroys a domain named `parcel` that an earlier isrfsd (killed
/// itself) started from this runtime directory (its console logs to
/// `serial_log`) and left running: its disks are in a mount that is gone. A
/// domain of the same name started by anyone else is left alone (`virsh
/// create` then says the name is taken).
fn destroy_leftover_domain(uri: &str, parcel: &str, serial_log: &Path) {
    if !installed("virsh") {
        return;
    }
    let step = libvirt::dumpxml_step(uri, parcel);
    let Ok(output) = Command::new(&step[0])
        .args(&step[1..])
        .stdin(std::process::Stdio::null())
        .output()
    else {
        return;
    };
    if output.status.success()
        && libvirt::is_started_with(&String::from_utf8_lossy(&output.stdout), serial_log)
    {
        tracing::warn!(
            parcel,
            "destroying a libvirt domain left running by an earlier isrfsd"
        );
        if let Err(e) = run_steps(&[libvirt::destroy_step(uri, parcel)]) {
            tracing::warn!(parcel, error = %e, "destroying the leftover domain failed");
        }
    }
}

/// Stops whatever VM an earlier isrfsd (killed itself) left running for
/// `parcel` from the VM runtime directory `dir` (`<runtime dir>/vm/NAME`): a
/// QEMU it started, or a libvirt domain it created. For clean-up after a
/// crash (`isrctl discard` without a daemon); a new start does the same.
pub fn stop_leftovers(parcel: &str, dir: &Path, settings: &VmmSettings) {
    kill_leftover_qemu(dir);
    destroy_leftover_domain(&settings.libvirt_uri, parcel, &dir.join("serial.log"));
}

/// Whether `program` is found on `PATH` (or is an existing path).
pub fn installed(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn steps_text(steps: &[Vec<String>]) -> String {
    steps
        .iter()
        .map(|step| format!("  {}", step.join(" ")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How often, at most, `virsh domstate` is asked whether a libvirt domain runs.
const LIBVIRT_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Syncs the finished file `partial`, renames it to `dest` and syncs the directory.
fn sync_and_rename(partial: &Path, dest: &Path) -> Result<(), VmError> {
    let io = |what: String| move |source| VmError::Io { what, source };
    std::fs::File::open(partial)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("syncing {}", partial.display())))?;
    std::fs::rename(partial, dest).map_err(io(format!(
        "renaming {} to {}",
        partial.display(),
        dest.display()
    )))?;
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("syncing {}", parent.display())))?;
    }
    Ok(())
}

/// Checks that the memory image `memory` is a libvirt saved image (`virsh
/// save`). Anything else is refused rather than booted past: it would stay in
/// the mount beside disks that have moved on.
fn check_libvirt_image(memory: &Path) -> Result<(), VmError> {
    use std::io::Read as _;
    let mut head = Vec::with_capacity(libvirt::SAVE_MAGIC.len());
    std::fs::File::open(memory)
        .and_then(|f| {
            f.take(libvirt::SAVE_MAGIC.len() as u64)
                .read_to_end(&mut head)
        })
        .map_err(|source| VmError::Io {
            what: format!("reading the memory image {}", memory.display()),
            source,
        })?;
    if libvirt::is_saved_image(&head) {
        return Ok(());
    }
    let what = if head.starts_with(b"QEVM") {
        "a QEMU memory image (`--vmm qemu` resumes it)"
    } else if head.starts_with(b"LibvirtQemudPart") {
        "an incomplete libvirt save (`virsh save` did not finish)"
    } else {
        "not a libvirt saved image (`virsh save`)"
    };
    Err(VmError::MemoryImage {
        path: memory.to_owned(),
        reason: format!(
            "{what}; libvirt cannot resume from it: resume with the VMM that saved it, or remove the file from the mount to boot the VM from its disks"
        ),
    })
}

/// Runs command lines in order, stopping at the first that fails.
fn run_steps(steps: &[Vec<String>]) -> Result<(), VmError> {
    for step in steps {
        let Some((program, args)) = step.split_first() else {
            continue;
        };
        let output = Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| VmError::Io {
                what: format!("running {program}"),
                source,
            })?;
        if !output.status.success() {
            let text = String::from_utf8_lossy(&output.stderr).into_owned()
                + &String::from_utf8_lossy(&output.stdout);
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            return Err(VmError::Step {
                command: step.join(" "),
                status: output.status.to_string(),
                output: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
            });
        }
    }
    Ok(())
}

impl SupervisedVm {
    /// Starts the parcel's VM from `mount` with `kind` (not [`VmmKind::None`]),
    /// its runtime files (QMP socket, serial console, logs, domain XML) in `dir`.
    /// Returns once the VM runs.
    pub fn start(
        parcel: &str,
        kind: VmmKind,
        mount: &Path,
        dir: &Path,
        settings: &VmmSettings,
    ) -> Result<SupervisedVm, VmError> {
        let config = load_config(parcel, mount)?;
        std::fs::create_dir_all(dir).map_err(|source| VmError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let memory = mount.join(&config.memory_image);
        let has_memory = std::fs::metadata(&memory).is_ok_and(|m| m.len() > 0);
        let started = Instant::now();
        let mut vm = SupervisedVm {
            parcel: parcel.to_owned(),
            kind,
            config,
            mount: mount.to_owned(),
            dir: dir.to_owned(),
            settings: settings.clone(),
            runner: Runner::External { executed: false },
            state: VmState::Running,
            resumed_from_memory: false,
            start_seconds: 0.0,
            steps: Vec::new(),
            exit: None,
            powered_off: false,
            vnc: None,
            libvirt_checked: None,
        };
        match kind {
            VmmKind::None => {
                return Err(VmError::NotRunning {
                    parcel: parcel.to_owned(),
                    why: "`--vmm none` runs no VM".into(),
                });
            }
            VmmKind::Qemu => vm.start_qemu(&memory, has_memory)?,
            VmmKind::Libvirt => vm.start_libvirt(&memory, has_memory)?,
            VmmKind::Virtualbox => vm.start_virtualbox()?,
        }
        if vm.resumed_from_memory {
            // Consumed: see the module docs.
            if let Err(source) = std::fs::remove_file(&memory) {
                vm.kill();
                return Err(VmError::Io {
                    what: format!(
                        "removing the memory image {} the VM was resumed from",
                        memory.display()
                    ),
                    source,
                });
            }
        }
        vm.start_seconds = started.elapsed().as_secs_f64();
        Ok(vm)
    }

    fn start_qemu(&mut self, memory: &Path, has_memory: bool) -> Result<(), VmError> {
        kill_leftover_qemu(&self.dir);
        let runtime = QemuRuntime {
            accel: self.settings.accel.clone(),
            ..QemuRuntime::new(&self.settings.qemu, &self.dir)
        };
        let mut qemu = if has_memory {
            self.resumed_from_memory = true;
            QemuVm::resume_from(&self.config, &self.mount, &runtime, memory)?
        } else {
            QemuVm::boot(&self.config, &self.mount, &runtime)?
        };
        if self.config.display.kind == DisplayKind::Vnc {
            // The port QEMU actually listens on (any free one unless vm.toml fixes it).
            if let Ok(vnc) = qemu.qmp().execute("query-vnc", None) {
                let host = vnc.get("host").and_then(|v| v.as_str());
                let port = vnc.get("service").and_then(|v| v.as_str());
                if let (Some(host), Some(port)) = (host, port) {
                    self.vnc = Some(format!("{host}:{port}"));
                }
            }
        }
        let _ = std::fs::write(pid_file(&self.dir), format!("{}\n", qemu.pid()));
        self.runner = Runner::Qemu(Box::new(qemu));
        Ok(())
    }

    fn start_libvirt(&mut self, memory: &Path, has_memory: bool) -> Result<(), VmError> {
        let accel = if self.settings.accel.starts_with("kvm") {
            libvirt::Accel::Kvm
        } else {
            libvirt::Accel::Tcg
        };
        let serial_log = self.libvirt_serial_log();
        let xml = libvirt::domain_xml(
            &self.config,
            &self.parcel,
            &self.mount,
            accel,
            Some(&serial_log),
        );
        let domain_file = self.dir.join("domain.xml");
        std::fs::write(&domain_file, xml).map_err(|source| VmError::Io {
            what: format!("writing {}", domain_file.display()),
            source,
        })?;
        // A memory image is resumed from (`virsh restore`), or refused.
        let restore = has_memory;
        if restore {
            check_libvirt_image(memory)?;
        }
        if installed("virsh") {
            destroy_leftover_domain(&self.settings.libvirt_uri, &self.parcel, &serial_log);
        }
        let step = if restore {
            Lifecycle::Restore
        } else {
            Lifecycle::Boot
        };
        self.steps = libvirt::virsh_steps(
            step,
            &self.settings.libvirt_uri,
            &self.parcel,
            &domain_file,
            memory,
        );
        self.run_external("virsh")?;
        self.resumed_from_memory = restore && self.state == VmState::Running;
        Ok(())
    }

    fn start_virtualbox(&mut self) -> Result<(), VmError> {
        for disk in &self.config.disks {
            let raw = self.mount.join(&disk.file);
            let size = std::fs::metadata(&raw)
                .map_err(|source| VmError::Io {
                    what: format!("reading the size of {}", raw.display()),
                    source,
                })?
                .len();
            let file_name = disk
                .file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let cid = u32::from_le_bytes(
                blake3::hash(disk.file.to_string_lossy().as_bytes()).as_bytes()[..4]
                    .try_into()
                    .expect("4 bytes"),
            );
            let text = virtualbox::vmdk_descriptor(&file_name, size, cid)?;
            let descriptor = self.mount.join(virtualbox::descriptor_name(&disk.file));
            if std::fs::read_to_string(&descriptor).ok().as_deref() != Some(text.as_str()) {
                std::fs::write(&descriptor, text).map_err(|source| VmError::Io {
                    what: format!("writing the VMDK descriptor {}", descriptor.display()),
                    source,
                })?;
            }
        }
        let saved = virtualbox::settings_file(&self.mount, &self.parcel).exists();
        self.steps = virtualbox::vboxmanage_steps(&self.config, &self.parcel, &self.mount, saved)?;
        self.run_external(virtualbox::VBOXMANAGE)?;
        self.resumed_from_memory = saved && self.state == VmState::Running;
        Ok(())
    }

    /// Runs `self.steps` if `program` is installed; otherwise leaves them to be
    /// printed (state [`VmState::Handed`]).
    fn run_external(&mut self, program: &str) -> Result<(), VmError> {
        if installed(program) {
            run_steps(&self.steps)?;
            self.runner = Runner::External { executed: true };
            self.state = VmState::Running;
        } else {
            self.runner = Runner::External { executed: false };
            self.state = VmState::Handed;
        }
        Ok(())
    }

    /// The adapter.
    pub fn kind(&self) -> VmmKind {
        self.kind
    }

    /// What the VM is doing now (notices a QEMU that exited).
    pub fn state(&mut self) -> VmState {
        if self.state == VmState::Running
            && let Runner::Qemu(qemu) = &mut self.runner
            && let Some(status) = qemu.exit_status()
        {
            self.state = VmState::Exited;
            self.powered_off = status.success();
            self.exit = Some(if status.success() {
                "the guest powered off (QEMU exited with status 0)".to_owned()
            } else {
                format!("QEMU exited ({status})")
            });
            let _ = std::fs::remove_file(pid_file(&self.dir));
        }
        if self.state == VmState::Running
            && self.kind == VmmKind::Libvirt
            && matches!(self.runner, Runner::External { executed: true })
            && self
                .libvirt_checked
                .is_none_or(|at| at.elapsed() >= LIBVIRT_POLL)
        {
            self.check_libvirt_domain();
        }
        self.state
    }

    /// The VM's status.
    pub fn status(&mut self) -> VmStatus {
        let state = self.state();
        let (pid, serial_log, qemu_log, qmp_socket) = match &self.runner {
            Runner::Qemu(qemu) => {
                let runtime = qemu.runtime();
                (
                    (state == VmState::Running).then(|| qemu.pid()),
                    Some(runtime.serial_log()),
                    Some(runtime.qemu_log()),
                    Some(runtime.qmp_socket()),
                )
            }
            Runner::External { .. } => (
                None,
                (self.kind == VmmKind::Libvirt).then(|| self.libvirt_serial_log()),
                None,
                None,
            ),
        };
        let vnc = match (self.config.display.kind, self.config.display.vnc_port) {
            (DisplayKind::Vnc, _) if self.vnc.is_some() => self.vnc.clone(),
            (DisplayKind::Vnc, Some(port)) => Some(format!("127.0.0.1:{port}")),
            _ => None,
        };
        VmStatus {
            kind: self.kind,
            state,
            pid,
            serial_log,
            qemu_log,
            qmp_socket,
            vnc,
            resumed_from_memory: self.resumed_from_memory,
            start_seconds: self.start_seconds,
            steps: self.steps.clone(),
            exit: self.exit.clone(),
            powered_off: self.powered_off,
        }
    }

    /// Saves the VM's memory into the mount and stops it. On failure nothing is
    /// left under the memory image's name; a QEMU that is still alive goes on
    /// running the VM.
    pub fn suspend(&mut self) -> Result<SuspendReport, VmError> {
        let memory = self.mount.join(&self.config.memory_image);
        let started = Instant::now();
        match self.state() {
            VmState::Running => {}
            VmState::Saved => {
                return Ok(SuspendReport {
                    memory_bytes: std::fs::metadata(&memory).map_or(0, |m| m.len()),
                    memory_image: memory,
                    seconds: 0.0,
                });
            }
            VmState::Handed => {
                let steps = match self.kind {
                    VmmKind::Libvirt => self.libvirt_suspend_steps(&memory),
                    _ => virtualbox::vboxmanage_suspend_steps(&self.parcel),
                };
                return Err(VmError::NotInstalled {
                    program: steps
                        .first()
                        .and_then(|s| s.first())
                        .cloned()
                        .unwrap_or_default(),
                    steps: steps_text(&steps),
                });
            }
            VmState::Exited | VmState::Busy => {
                return Err(VmError::NotRunning {
                    parcel: self.parcel.clone(),
                    why: self.exit.clone().unwrap_or_else(|| "it stopped".into()),
                });
            }
        }
        match &mut self.runner {
            Runner::Qemu(qemu) => {
                if let Err(e) = qemu.suspend_to(&memory) {
                    if !qemu.is_running() {
                        self.state = VmState::Exited;
                        self.exit = Some(format!("QEMU died while suspending: {e}"));
                    }
                    return Err(e.into());
                }
                let _ = std::fs::remove_file(pid_file(&self.dir));
            }
            Runner::External { .. } if self.kind == VmmKind::Libvirt => {
                self.libvirt_save(&memory)?;
            }
            Runner::External { .. } => {
                self.steps = virtualbox::vboxmanage_suspend_steps(&self.parcel);
                run_steps(&self.steps)?;
            }
        }
        self.state = VmState::Saved;
        Ok(SuspendReport {
            memory_bytes: std::fs::metadata(&memory).map_or(0, |m| m.len()),
            memory_image: memory,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn libvirt_suspend_steps(&self, memory: &Path) -> Vec<Vec<String>> {
        libvirt::virsh_steps(
            Lifecycle::Suspend,
            &self.settings.libvirt_uri,
            &self.parcel,
            &self.dir.join("domain.xml"),
            memory,
        )
    }

    /// libvirt: where the domain's serial console is logged (see
    /// [`libvirt::domain_xml`]), as the QEMU adapter's `serial.log`.
    fn libvirt_serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// libvirt: `virsh save` into a partial file beside the memory image, which
    /// is synced and renamed into place once the save has finished, as the QEMU
    /// adapter does. On failure the partial file is removed and libvirt is asked
    /// whether the domain still runs (libvirt resumes it after a failed save).
    fn libvirt_save(&mut self, memory: &Path) -> Result<(), VmError> {
        let partial = qemu::partial_name(memory);
        let _ = std::fs::remove_file(&partial);
        self.steps = self.libvirt_suspend_steps(&partial);
        let result = run_steps(&self.steps).and_then(|()| sync_and_rename(&partial, memory));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&partial);
            self.check_libvirt_domain();
            return Err(e);
        }
        Ok(())
    }

    /// libvirt: asks `virsh domstate` whether the domain still runs; notes its
    /// end (state [`VmState::Exited`]) when it does not.
    fn check_libvirt_domain(&mut self) {
        self.libvirt_checked = Some(Instant::now());
        let step = libvirt::domstate_step(&self.settings.libvirt_uri, &self.parcel);
        let Ok(output) = Command::new(&step[0])
            .args(&step[1..])
            .stdin(std::process::Stdio::null())
            .output()
        else {
            return;
        };
        if let Some(why) = libvirt::stopped_reason(
            output.status.success(),
            &String::from_utf8_lossy(&output.stdout),
            &String::from_utf8_lossy(&output.stderr),
        ) {
            self.state = VmState::Exited;
            self.exit = Some(why);
        }
    }

    /// Stops the VM at once, without saving it (discard, or a failed start).
    pub fn kill(&mut self) {
        match &mut self.runner {
            Runner::Qemu(qemu) => qemu.kill(),
            Runner::External { executed: true } if self.state == VmState::Running => {
                let stop = match self.kind {
                    VmmKind::Libvirt => vec![libvirt::destroy_step(
                        &self.settings.libvirt_uri,
                        &self.parcel,
                    )],
                    _ => vec![
                        vec![
                            virtualbox::VBOXMANAGE.to_owned(),
                            "controlvm".to_owned(),
                            self.parcel.clone(),
                            "poweroff".to_owned(),
                        ],
                        vec![
                            virtualbox::VBOXMANAGE.to_owned(),
                            "unregistervm".to_owned(),
                            self.parcel.clone(),
                        ],
                    ],
                };
                if let Err(e) = run_steps(&stop) {
                    tracing::warn!(parcel = %self.parcel, error = %e, "stopping the VM failed");
                }
            }
            Runner::External { .. } => {}
        }
        let _ = std::fs::remove_file(pid_file(&self.dir));
        if self.state == VmState::Running {
            self.state = VmState::Exited;
            self.exit = Some("stopped by isrfsd".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parcel_without_vm_toml_is_only_mounted() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(chosen_kind("p", None, dir.path()).unwrap(), VmmKind::None);
        assert_eq!(
            chosen_kind("p", Some(VmmKind::Qemu), dir.path()).unwrap(),
            VmmKind::Qemu
        );
        let error = SupervisedVm::start(
            "p",
            VmmKind::Qemu,
            dir.path(),
            &dir.path().join("run"),
            &VmmSettings::default(),
        )
        .unwrap_err();
        assert!(matches!(error, VmError::NoConfig { .. }), "{error}");
        assert!(error.to_string().contains("--vmm none"), "{error}");
        assert_eq!(error.class(), ErrorClass::Invalid);
    }

    #[test]
    fn vm_toml_names_the_vmm_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(VM_CONFIG_FILE),
            "vmm = \"virtualbox\"\nmemory = 64\n[[disk]]\nfile = \"disk.img\"\n",
        )
        .unwrap();
        assert_eq!(
            chosen_kind("p", None, dir.path()).unwrap(),
            VmmKind::Virtualbox
        );
        std::fs::write(dir.path().join(VM_CONFIG_FILE), "vmm = \"qemu\"\n").unwrap();
        let error = chosen_kind("p", None, dir.path()).unwrap_err();
        assert!(error.to_string().contains("memory"), "{error}");
    }

    #[test]
    fn virtualbox_without_vboxmanage_writes_descriptors_and_hands_the_steps_over() {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        std::fs::write(
            mount.join(VM_CONFIG_FILE),
            "vmm = \"virtualbox\"\nmemory = 64\n[[disk]]\nfile = \"disk.img\"\n",
        )
        .unwrap();
        let disk = std::fs::File::create(mount.join("disk.img")).unwrap();
        disk.set_len(8 << 20).unwrap();
        let mut vm = SupervisedVm::start(
            "vbox",
            VmmKind::Virtualbox,
            &mount,
            &dir.path().join("run"),
            &VmmSettings::default(),
        )
        .unwrap();
        let descriptor = std::fs::read_to_string(mount.join("disk.vmdk")).unwrap();
        assert!(
            descriptor.contains("RW 16384 FLAT \"disk.img\" 0"),
            "{descriptor}"
        );
        let status = vm.status();
        assert_eq!(status.state, VmState::Handed);
        assert!(
            status
                .steps
                .iter()
                .any(|s| s.first().map(String::as_str) == Some("VBoxManage")
                    && s.get(1).map(String::as_str) == Some("startvm")),
            "{:?}",
            status.steps
        );
        let error = vm.suspend().unwrap_err();
        assert!(
            error.to_string().contains("controlvm vbox savestate"),
            "{error}"
        );
    }

    #[test]
    fn libvirt_resumes_only_from_its_own_saved_images() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("memory.img");
        std::fs::write(&image, b"LibvirtQemudSave\x02\0\0\0rest").unwrap();
        check_libvirt_image(&image).unwrap();
        for (head, says) in [
            (&b"QEVM\0\0\0\x03"[..], "--vmm qemu"),
            (b"LibvirtQemudPart\x02\0\0\0", "incomplete"),
            (b"Libvirt", "not a libvirt saved image"),
        ] {
            std::fs::write(&image, head).unwrap();
            let error = check_libvirt_image(&image).unwrap_err();
            assert!(error.to_string().contains(says), "{error}");
            assert_eq!(error.class(), ErrorClass::Invalid);
        }

        // Before running anything: the domain XML is written (console logged in
        // the runtime directory), the foreign image refused and left alone.
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        std::fs::write(
            mount.join(VM_CONFIG_FILE),
            "vmm = \"libvirt\"\nmemory = 64\n[[disk]]\nfile = \"disk.img\"\n",
        )
        .unwrap();
        std::fs::write(mount.join("disk.img"), [0u8; 4096]).unwrap();
        std::fs::write(mount.join("memory.img"), b"QEVM\0\0\0\x03").unwrap();
        let run = dir.path().join("run");
        let error = SupervisedVm::start(
            "lv",
            VmmKind::Libvirt,
            &mount,
            &run,
            &VmmSettings::default(),
        )
        .unwrap_err();
        assert!(matches!(error, VmError::MemoryImage { .. }), "{error}");
        assert!(mount.join("memory.img").exists());
        let xml = std::fs::read_to_string(run.join("domain.xml")).unwrap();
        assert!(
            xml.contains(&format!(
                "<log file='{}' append='on'/>",
                run.join("serial.log").display()
            )),
            "{xml}"
        );
    }

    #[test]
    fn steps_that_fail_name_the_command() {
        let error = run_steps(&[vec!["false".to_owned()]]).unwrap_err();
        assert!(error.to_string().contains("`false` failed"), "{error}");
        run_steps(&[vec!["true".to_owned()]]).unwrap();
    }
}
