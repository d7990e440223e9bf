//! One parcel's VM as `isrfsd` runs it, whatever the adapter: started from the
//! mounted parcel once `isrctl resume` has mounted it, saved back into the mount
//! by `isrctl suspend` before the checkin.
//!
//! - [`SupervisedVm::start`]: reads the parcel's `vm.toml` from the mount and
//!   starts the VM with the [`Vmm`] adapter for the chosen [`VmmKind`]
//!   ([`adapter`], the one place that maps one to the other): QEMU under
//!   supervision ([`super::qemu::QemuAdapter`]), or the `virsh` / `VBoxManage`
//!   steps of the libvirt and VirtualBox adapters (run when the program is
//!   installed, otherwise handed back to be printed).
//! - [`SupervisedVm::suspend`]: saves the VM's memory into the mount and stops
//!   it. A failed save leaves the VM running (QEMU) and nothing renamed into place.
//! - [`SupervisedVm::status`]: a [`VmStatus`] for `isrctl status` and `.isr/stats`.
//!
//! This module keeps the VM's state ([`VmState`]); the adapters know nothing
//! of it beyond what [`Vmm`] asks.
//!
//! **The saved state is consumed.** Once a VM has been started from its memory
//! image, that file describes a moment the disks have already moved past: a sync,
//! a checkin after a crash of QEMU, or a second resume would pair new disks with
//! old memory and corrupt the guest's file systems. So the files a resume
//! consumes ([`SavedState::consumes`]) are deleted from the mount as soon as the
//! VM has loaded them, and exist again only after the next successful suspend. A
//! version without a memory image is the disks alone, as after a power cut: the
//! next resume boots it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::config::{DisplayKind, VM_CONFIG_FILE, VmConfig, VmmKind};
use super::libvirt::{self, LibvirtAdapter};
use super::none::NoVm;
use super::qemu::{self, QemuAdapter};
use super::virtualbox::VirtualboxAdapter;
use super::{ParcelVm, SavedForm, SavedState, Started, Vmm, io_error};

pub use super::VmError;
pub use super::steps::installed;

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

/// The adapter that runs `vm` for `kind`, with `settings`: the one place a
/// [`VmmKind`] is mapped to a [`Vmm`].
pub fn adapter(kind: VmmKind, vm: &ParcelVm, settings: &VmmSettings) -> Box<dyn Vmm> {
    match kind {
        VmmKind::None => Box::new(NoVm::new(&vm.parcel)),
        VmmKind::Qemu => Box::new(QemuAdapter::new(vm, &settings.qemu, &settings.accel)),
        VmmKind::Libvirt => Box::new(LibvirtAdapter::new(
            vm,
            &settings.libvirt_uri,
            &settings.accel,
        )),
        VmmKind::Virtualbox => Box::new(VirtualboxAdapter::new(vm)),
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
    /// Lazy memory: the RAM file on the mount that is the guest's memory
    /// (none when the VM's memory is QEMU's own, image mode).
    #[serde(default)]
    pub ram_file: Option<PathBuf>,
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
            ram_file: None,
            exit: None,
            powered_off: false,
        }
    }
}

/// What [`SupervisedVm::suspend`] did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuspendReport {
    /// The saved state in the mount: the memory image, or in lazy mode the
    /// device state (beside the RAM file).
    pub memory_image: PathBuf,
    /// Its apparent size, bytes.
    pub memory_bytes: u64,
    /// Lazy mode: the RAM file the device state goes with.
    #[serde(default)]
    pub ram_file: Option<PathBuf>,
    /// Seconds from the suspend request until the VM had stopped.
    pub seconds: f64,
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

/// Stops whatever VM an earlier isrfsd (killed itself) left running for
/// `parcel` from the VM runtime directory `dir` (`<runtime dir>/vm/NAME`): a
/// QEMU it started, or a libvirt domain it created. For clean-up after a
/// crash (`isrctl discard` without a daemon); a new start does the same.
pub fn stop_leftovers(parcel: &str, dir: &Path, settings: &VmmSettings) {
    qemu::kill_leftover(dir);
    libvirt::destroy_leftover(&settings.libvirt_uri, parcel, &dir.join("serial.log"));
}

/// A parcel's VM, started from its mount.
pub struct SupervisedVm {
    kind: VmmKind,
    vm: ParcelVm,
    vmm: Box<dyn Vmm>,
    state: VmState,
    resumed_from_memory: bool,
    start_seconds: f64,
    exit: Option<String>,
    powered_off: bool,
}

impl std::fmt::Debug for SupervisedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisedVm")
            .field("parcel", &self.vm.parcel)
            .field("kind", &self.kind)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl SupervisedVm {
    /// Starts the parcel's VM from `mount` with `kind` (not [`VmmKind::None`]),
    /// its runtime files (QMP socket, serial console, logs, domain XML) in `dir`.
    /// Returns once the VM runs (or its steps are handed over).
    pub fn start(
        parcel: &str,
        kind: VmmKind,
        mount: &Path,
        dir: &Path,
        settings: &VmmSettings,
    ) -> Result<SupervisedVm, VmError> {
        let config = load_config(parcel, mount)?;
        std::fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
        let vm = ParcelVm {
            parcel: parcel.to_owned(),
            config,
            mount: mount.to_owned(),
            dir: dir.to_owned(),
        };
        let mut vmm = adapter(kind, &vm, settings);
        let saved = vmm.saved_state();
        let started = Instant::now();
        let state = match &saved {
            Some(saved) => vmm.resume(saved)?,
            None => vmm.boot()?,
        };
        let state = match state {
            Started::Running => VmState::Running,
            Started::Handed => VmState::Handed,
        };
        let mut supervised = SupervisedVm {
            kind,
            vm,
            vmm,
            state,
            resumed_from_memory: saved.is_some() && state == VmState::Running,
            start_seconds: 0.0,
            exit: None,
            powered_off: false,
        };
        if supervised.resumed_from_memory
            && let Some(saved) = &saved
        {
            supervised.consume(saved)?;
        }
        supervised.start_seconds = started.elapsed().as_secs_f64();
        Ok(supervised)
    }

    /// Removes the files the VM was resumed from (see the module docs); kills
    /// the VM when one cannot be removed.
    fn consume(&mut self, saved: &SavedState) -> Result<(), VmError> {
        for file in &saved.consumes {
            if let Err(source) = std::fs::remove_file(file) {
                self.kill();
                return Err(VmError::Io {
                    what: format!(
                        "removing the memory image {} the VM was resumed from",
                        file.display()
                    ),
                    source,
                });
            }
        }
        Ok(())
    }

    /// The adapter.
    pub fn kind(&self) -> VmmKind {
        self.kind
    }

    /// What the VM is doing now (notices a VM that ended by itself).
    pub fn state(&mut self) -> VmState {
        if self.state == VmState::Running
            && let Some(ended) = self.vmm.ended()
        {
            self.state = VmState::Exited;
            self.powered_off = ended.powered_off;
            self.exit = Some(ended.why);
        }
        self.state
    }

    /// The VM's status.
    pub fn status(&mut self) -> VmStatus {
        let state = self.state();
        let pieces = self.vmm.status();
        let display = &self.vm.config.display;
        let vnc = match (display.kind, display.vnc_port) {
            (DisplayKind::Vnc, _) if pieces.vnc.is_some() => pieces.vnc,
            (DisplayKind::Vnc, Some(port)) => Some(format!("127.0.0.1:{port}")),
            _ => None,
        };
        VmStatus {
            kind: self.kind,
            state,
            pid: pieces.pid.filter(|_| state == VmState::Running),
            serial_log: pieces.serial_log,
            qemu_log: pieces.qemu_log,
            qmp_socket: pieces.qmp_socket,
            vnc,
            resumed_from_memory: self.resumed_from_memory,
            start_seconds: self.start_seconds,
            steps: pieces.steps,
            ram_file: pieces.ram_file,
            exit: self.exit.clone(),
            powered_off: self.powered_off,
        }
    }

    /// Saves the VM's memory into the mount and stops it. On failure nothing is
    /// left under the memory image's name; a QEMU that is still alive goes on
    /// running the VM. A handed VM answers with the steps that save it.
    pub fn suspend(&mut self) -> Result<SuspendReport, VmError> {
        let started = Instant::now();
        match self.state() {
            VmState::Running | VmState::Handed => {}
            VmState::Saved => return Ok(self.saved_report(0.0)),
            VmState::Exited | VmState::Busy => {
                return Err(VmError::NotRunning {
                    parcel: self.vm.parcel.clone(),
                    why: self.exit.clone().unwrap_or_else(|| "it stopped".into()),
                });
            }
        }
        if let Err(e) = self.vmm.suspend() {
            // Notes a VM that did not survive the failed save.
            self.state();
            return Err(e);
        }
        self.state = VmState::Saved;
        Ok(self.saved_report(started.elapsed().as_secs_f64()))
    }

    /// What a suspend saved: the saved state the adapter would resume from.
    fn saved_report(&self, seconds: f64) -> SuspendReport {
        let saved = self.vmm.saved_state();
        let memory = saved
            .as_ref()
            .map_or_else(|| self.vm.memory_image(), |s| s.path.clone());
        SuspendReport {
            memory_bytes: std::fs::metadata(&memory).map_or(0, |m| m.len()),
            memory_image: memory,
            ram_file: saved
                .filter(|s| s.form == SavedForm::DeviceState)
                .map(|_| self.vm.ram_file()),
            seconds,
        }
    }

    /// Stops the VM at once, without saving it (discard, or a failed start).
    pub fn kill(&mut self) {
        self.vmm.kill();
        if self.state == VmState::Running {
            self.state = VmState::Exited;
            self.exit = Some("stopped by isrfsd".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Classify, ErrorClass};

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
        libvirt::check_saved_image(&image).unwrap();
        for (head, says) in [
            (&b"QEVM\0\0\0\x03"[..], "--vmm qemu"),
            (b"LibvirtQemudPart\x02\0\0\0", "incomplete"),
            (b"Libvirt", "not a libvirt saved image"),
        ] {
            std::fs::write(&image, head).unwrap();
            let error = libvirt::check_saved_image(&image).unwrap_err();
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
}
