//! The virtual machine side of a parcel: how the VM in a parcel is described
//! ([`config`], the parcel's `vm.toml`), the adapters that run it, and
//! [`supervise`], which runs one parcel's VM from its mount with any of them.
//!
//! # The adapter interface
//!
//! An adapter implements [`Vmm`] for one parcel's VM ([`ParcelVm`]: its name,
//! `vm.toml`, mount and runtime directory, given when the adapter is made):
//!
//! - [`Vmm::saved_state`]: the saved state in the mount the VM would resume
//!   from, if any ([`SavedState`]: what it is read from, and which files a
//!   resume consumes).
//! - [`Vmm::boot`]: starts the VM from its disks.
//! - [`Vmm::resume`]: starts it from a [`SavedState`] instead.
//! - [`Vmm::suspend`]: saves its memory into the mount and stops it; on failure
//!   nothing is left under the memory image's name and a VM that is still alive
//!   goes on running.
//! - [`Vmm::ended`]: whether it has ended by itself since it started (the guest
//!   powered off, the VMM died), with why ([`Ended`]).
//! - [`Vmm::kill`]: stops it at once without saving (safe in any state).
//! - [`Vmm::status`]: where its pieces are ([`AdapterStatus`]: pid, logs,
//!   sockets, VNC display, the external steps run or to run).
//!
//! Starting answers [`Started::Running`], or [`Started::Handed`] when the
//! adapter's program is not installed here and its steps are handed to the
//! user to run (a handed VM's [`Vmm::suspend`] answers with the steps to save
//! it, [`VmError::NotInstalled`]).
//!
//! The adapters, each keeping its specifics to itself:
//!
//! - [`qemu`] ([`qemu::QemuAdapter`]): QEMU as isrfsd's child, driven over QMP
//!   ([`qmp`]): command line from `vm.toml`, suspend to and resume from a memory
//!   image (`file:` + mapped-ram on QEMU ≥ 9, `exec:cat` before).
//! - [`libvirt`] ([`libvirt::LibvirtAdapter`]): a transient domain from domain
//!   XML, `virsh create`/`restore`/`save`.
//! - [`virtualbox`] ([`virtualbox::VirtualboxAdapter`]): VMDK descriptors over
//!   the parcel's raw disks and the `VBoxManage` steps to register, start, save
//!   and unregister the VM.
//! - [`none`] ([`none::NoVm`]): the parcel is only mounted; no VM.
//!
//! [`steps`] runs the external command lines of libvirt and VirtualBox, or
//! hands them over. [`supervise::SupervisedVm`] holds a `Box<dyn Vmm>` chosen
//! from the [`config::VmmKind`] in one place ([`supervise::adapter`]), keeps the VM's
//! state (running, saved, exited, handed) and consumes the saved state a resume
//! started from.
//!
//! Two ways of keeping memory fit the same interface ([`config::MemoryMode`]):
//! a memory image (a [`SavedState`] of form [`SavedForm::MemoryImage`], read
//! whole before the guest runs), and lazy mode (QEMU only): guest RAM as a file
//! on the mount with only the device state saved — a [`SavedState`] of form
//! [`SavedForm::DeviceState`] whose `consumes` names the device state but not
//! the RAM file, a [`Vmm::resume`] that maps the one and loads the other, and a
//! [`Vmm::suspend`] that makes the RAM file durable before it puts the device
//! state in place.

use std::path::PathBuf;

use self::config::{VmConfig, VmConfigError};
use self::qemu::QemuError;
use self::virtualbox::VboxError;
use crate::error::{Classify, ErrorClass};

pub mod config;
pub mod libvirt;
pub mod none;
pub mod qemu;
pub mod qmp;
pub mod steps;
pub mod supervise;
pub mod virtualbox;

/// One parcel's VM as an adapter runs it: all of its files are in the mount
/// or the runtime directory.
#[derive(Debug, Clone, PartialEq)]
pub struct ParcelVm {
    /// The parcel's name (libvirt's domain name, VirtualBox's VM name).
    pub parcel: String,
    /// Its `vm.toml`.
    pub config: VmConfig,
    /// Where the parcel is mounted; `vm.toml`'s paths are relative to it.
    pub mount: PathBuf,
    /// The VM's private runtime directory (`<runtime dir>/vm/NAME`): sockets,
    /// console and VMM logs, generated descriptions.
    pub dir: PathBuf,
}

impl ParcelVm {
    /// The memory image in the mount (`vm.toml`'s `memory_image`).
    pub fn memory_image(&self) -> PathBuf {
        self.mount.join(&self.config.memory_image)
    }

    /// Lazy mode's RAM file in the mount (`vm.toml`'s `ram_file`).
    pub fn ram_file(&self) -> PathBuf {
        self.mount.join(&self.config.ram_file)
    }

    /// Lazy mode's device state in the mount (`vm.toml`'s `device_state`).
    pub fn device_state(&self) -> PathBuf {
        self.mount.join(&self.config.device_state)
    }

    /// The memory image as the saved state to resume from (and consume), when
    /// it is there and not empty.
    pub fn saved_memory_image(&self) -> Option<SavedState> {
        let memory = self.memory_image();
        is_non_empty(&memory).then(|| SavedState {
            path: memory.clone(),
            consumes: vec![memory],
            form: SavedForm::MemoryImage,
        })
    }

    /// Lazy mode's saved state: the device state, with the RAM file it goes
    /// with (both there, the device state not empty). Consumes the device
    /// state only: the RAM file is the running guest's memory.
    pub fn saved_device_state(&self) -> Option<SavedState> {
        let state = self.device_state();
        (is_non_empty(&state) && self.ram_file().is_file()).then(|| SavedState {
            path: state.clone(),
            consumes: vec![state],
            form: SavedForm::DeviceState,
        })
    }
}

fn is_non_empty(path: &std::path::Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() > 0)
}

/// What a [`SavedState`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavedForm {
    /// The whole memory (image mode, or the VMM's own saved-state format).
    MemoryImage,
    /// Device state only; the memory is the RAM file (lazy mode).
    DeviceState,
}

/// A saved state in the mount that a VM resumes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedState {
    /// The file the adapter resumes from.
    pub path: PathBuf,
    /// The files a resume consumes: removed from the mount once the VM runs
    /// from them, because they describe a moment the disks are about to move
    /// past (see [`supervise`]).
    pub consumes: Vec<PathBuf>,
    /// What it holds.
    pub form: SavedForm,
}

/// How a start ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// The VM runs.
    Running,
    /// The adapter's program is not installed: its steps are to be run by the
    /// user ([`AdapterStatus::steps`]).
    Handed,
}

/// How a VM ended by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Why, for `isrctl status`.
    pub why: String,
    /// True when the guest powered itself off, false when the VMM failed or
    /// was killed (or cannot tell).
    pub powered_off: bool,
}

/// Where a VM's pieces are, as far as its adapter has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdapterStatus {
    /// The VMM's process id.
    pub pid: Option<u32>,
    /// The guest's serial console log.
    pub serial_log: Option<PathBuf>,
    /// QEMU's own log.
    pub qemu_log: Option<PathBuf>,
    /// QEMU's QMP socket.
    pub qmp_socket: Option<PathBuf>,
    /// The VNC display the VMM actually listens on (`HOST:PORT`), when known.
    pub vnc: Option<String>,
    /// The external command lines run, or to run when handed.
    pub steps: Vec<Vec<String>>,
    /// Lazy memory: the RAM file on the mount that is the guest's memory.
    pub ram_file: Option<PathBuf>,
}

/// One way of running a parcel's VM (see the module docs). Made for one
/// [`ParcelVm`]; [`Vmm::boot`] or [`Vmm::resume`] is called once, before any
/// other method but [`Vmm::saved_state`].
pub trait Vmm: Send {
    /// The saved state in the mount this adapter would resume from, if any.
    fn saved_state(&self) -> Option<SavedState>;

    /// Starts the VM from its disks.
    fn boot(&mut self) -> Result<Started, VmError>;

    /// Starts the VM from `saved` (as [`Vmm::saved_state`] found it). Does not
    /// remove `saved.consumes`: the caller does once the VM runs.
    fn resume(&mut self, saved: &SavedState) -> Result<Started, VmError>;

    /// Saves the VM's memory into the mount and stops it. On failure nothing is
    /// left under the memory image's name, and a VM still alive goes on running
    /// ([`Vmm::ended`] tells otherwise). A handed VM answers with the steps to
    /// run ([`VmError::NotInstalled`]).
    fn suspend(&mut self) -> Result<(), VmError>;

    /// `Some` once the running VM has ended by itself (asked while it is
    /// believed to run; an adapter may ask its VMM only so often).
    fn ended(&mut self) -> Option<Ended>;

    /// Stops the VM at once without saving it, if it runs.
    fn kill(&mut self);

    /// Where the VM's pieces are.
    fn status(&self) -> AdapterStatus;
}

/// Errors starting, saving or stopping a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The parcel has no `vm.toml`.
    #[error(
        "parcel {parcel} has no {}: add one describing its VM (see `isr::vmm::config`), or resume it with `--vmm none` to only mount it",
        config::VM_CONFIG_FILE
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

/// `what` and an I/O error as a [`VmError::Io`], for `map_err`.
pub(crate) fn io_error(what: String) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}
