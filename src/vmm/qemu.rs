//! Running a parcel's VM in QEMU, driven over QMP ([`super::qmp`]).
//!
//! - [`qemu_command`]: the QEMU command line for a [`VmConfig`] whose files are in a
//!   parcel directory, and [`QemuRuntime`], the per-run settings (binary,
//!   accelerator, runtime directory, whether to wait for an incoming migration).
//! - [`qemu_version`] / [`parse_version`]: `qemu-system-x86_64 --version`.
//! - [`save_memory`] / [`load_memory`]: suspend (stop, migrate the VM's state into
//!   a file, quit) and resume (load the file into a QEMU started with
//!   `-incoming defer`, then `cont`). QEMU 9 and later use a `file:` URI with the
//!   `mapped-ram` capability (RAM at fixed offsets: a sparse image whose unchanged
//!   pages stay at the same place from one suspend to the next) and `multifd`
//!   ([`MULTIFD_CHANNELS`]: large writes instead of one per page); older QEMU
//!   streams through `exec:cat`.
//! - [`QemuVm`]: a supervised QEMU process: [`QemuVm::boot`],
//!   [`QemuVm::resume_from`], [`QemuVm::suspend_to`], [`QemuVm::kill`].
//! - [`QemuAdapter`]: the [`Vmm`] adapter over [`QemuVm`] that
//!   [`super::supervise`] runs: QEMU as isrfsd's child, its pid in
//!   `<runtime dir>/qemu.pid` so a later isrfsd can kill a QEMU an earlier one
//!   (killed itself) left running ([`kill_leftover`]).
//!
//! Invariants: the saved state is written under a temporary name beside the
//! destination and renamed into place only once QEMU reports the migration
//! completed and the file is synced: a failed or interrupted suspend never leaves
//! a partial image under the final name. Which memory-image format is used
//! (mapped-ram or stream, by QEMU version) is decided here and nowhere else.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::config::{
    DiskInterface, DisplayKind, MemoryMode, NicMode, NicModel, Protocol, VmConfig,
};
use super::qmp::{Qmp, QmpError};
use super::{AdapterStatus, Ended, ParcelVm, SavedForm, SavedState, Started, VmError, Vmm};
use crate::error::{Classify, ErrorClass};

/// The accelerator used unless the runtime says otherwise. `tcg` (emulation)
/// works everywhere, including hosts whose `/dev/kvm` cannot run stock kernels;
/// set [`QemuRuntime::accel`] to `"kvm"` (or `"kvm:tcg"`) where KVM works.
pub const DEFAULT_ACCEL: &str = "tcg";

/// How long one QMP command may take to answer (see [`Qmp::set_timeout`]).
pub const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long QEMU may take to open its QMP socket after it starts.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// `migrate-set-parameters max-bandwidth` while saving or loading (bytes/s): QEMU's
/// default cap (32 MiB/s) would make a suspend needlessly slow.
pub const MAX_BANDWIDTH: u64 = 100 * 1024 * 1024 * 1024;

/// A version before [`MAPPED_RAM_SINCE`], for [`save_memory`]/[`load_memory`]
/// to use a plain migration stream (`exec:cat`) whatever QEMU runs.
pub const STREAM_ONLY: QemuVersion = QemuVersion { major: 8, minor: 2 };

/// Migration channels with mapped-ram. Without multifd, QEMU writes the image one
/// 4 KiB page per `pwritev` (23,000 writes for the test guest, each a FUSE request
/// when the image is in the mount: 2.0 s); with it, in batches of contiguous
/// pages (1,200 writes: 1.0 s). The file is the same either way, so an image saved
/// with multifd loads without it and back (tested across machines).
pub const MULTIFD_CHANNELS: u64 = 2;

/// First QEMU version with the `mapped-ram` migration capability.
pub const MAPPED_RAM_SINCE: QemuVersion = QemuVersion { major: 9, minor: 0 };

/// Errors running QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Talking to QEMU over QMP failed, or QEMU refused a command.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// `--version` could not be run.
    #[error("cannot tell the version of {}: cannot run it: {source}", binary.display())]
    VersionRun {
        /// The QEMU binary.
        binary: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// `--version` printed something unexpected.
    #[error("cannot tell the version of {}: {reason}", binary.display())]
    Version {
        /// The QEMU binary.
        binary: PathBuf,
        /// Why.
        reason: String,
    },
    /// A migration (suspend or resume) failed; QEMU's reason.
    #[error("{what} failed: {reason}")]
    Migration {
        /// `saving the VM's memory to …` / `loading …`.
        what: String,
        /// QEMU's error, or what else went wrong.
        reason: String,
    },
    /// A migration (suspend or resume) failed on a step around it.
    #[error("{what} failed: {source}")]
    MigrationStep {
        /// `saving the VM's memory to …`.
        what: String,
        /// The step that failed.
        source: Box<QemuError>,
    },
    /// A QEMU without mapped-ram could not load a memory image, which may be a
    /// mapped-ram one.
    #[error(
        "{what} failed: {source}; if the image was saved by QEMU 9 or later (mapped-ram), QEMU {version} cannot read it: install QEMU >= 9"
    )]
    NeedsMappedRam {
        /// `resuming from …`.
        what: String,
        /// The QEMU in use.
        version: QemuVersion,
        /// Why loading failed.
        source: Box<QemuError>,
    },
    /// A memory image loaded neither as mapped-ram nor as a migration stream.
    #[error("{what} failed: neither as mapped-ram ({mapped_ram}) nor as a stream ({source})")]
    NeitherFormat {
        /// `resuming from …`.
        what: String,
        /// Why it did not load as mapped-ram.
        mapped_ram: Box<QemuError>,
        /// Why it did not load as a stream.
        source: Box<QemuError>,
    },
    /// The VM description asks for something QEMU cannot do.
    #[error("vm.toml: {field}: {reason}")]
    Unsupported {
        /// The field, e.g. `disk[1].read_only`.
        field: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The QEMU process failed; the message gives the cause and points at its log.
    #[error("{what}{} (QEMU's log: {})", cause_text(source.as_deref()), log.display())]
    Process {
        /// What failed.
        what: String,
        /// QEMU's stdout/stderr log.
        log: PathBuf,
        /// The underlying error, if any.
        #[source]
        source: Option<Box<QemuError>>,
    },
}

fn cause_text(cause: Option<&QemuError>) -> String {
    cause.map(|c| format!(": {c}")).unwrap_or_default()
}

impl Classify for QemuError {
    fn class(&self) -> ErrorClass {
        match self {
            QemuError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorClass::NotFound
            }
            QemuError::Qmp(e) => e.class(),
            QemuError::Unsupported { .. } => ErrorClass::Invalid,
            _ => ErrorClass::Other,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> QemuError {
    let what = what.into();
    move |source| QemuError::Io { what, source }
}

/// A QEMU version, from `--version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
}

impl QemuVersion {
    /// Whether this QEMU has the `mapped-ram` migration capability.
    pub fn has_mapped_ram(self) -> bool {
        self >= MAPPED_RAM_SINCE
    }
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Reads (major, minor) from `QEMU emulator version 10.0.2 (Debian …)`.
pub fn parse_version(text: &str) -> Option<QemuVersion> {
    let rest = &text[text.find("version ")? + "version ".len()..];
    let number: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = number.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some(QemuVersion { major, minor })
}

/// Runs `binary --version`.
pub fn qemu_version(binary: &Path) -> Result<QemuVersion, QemuError> {
    let output = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| QemuError::VersionRun {
            binary: binary.to_owned(),
            source,
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_version(&text).ok_or_else(|| QemuError::Version {
        binary: binary.to_owned(),
        reason: format!("unexpected output {:?}", text.lines().next().unwrap_or("")),
    })
}

/// Per-run settings for QEMU (not part of the parcel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuRuntime {
    /// The QEMU binary, e.g. `qemu-system-x86_64`.
    pub binary: PathBuf,
    /// `-accel` value: `tcg` (the default, [`DEFAULT_ACCEL`]), `kvm`, `kvm:tcg`, …
    pub accel: String,
    /// A private directory for the QMP socket, the serial console log and QEMU's
    /// own log.
    pub dir: PathBuf,
    /// Start with `-incoming defer` (to load a saved state).
    pub incoming: bool,
    /// Guest RAM backed by this file (lazy mode: the parcel's RAM file on the
    /// mount, shared, mapped by QEMU), instead of QEMU's anonymous memory.
    pub ram_file: Option<PathBuf>,
}

impl QemuRuntime {
    /// Settings with the default accelerator, booting (not incoming).
    pub fn new(binary: impl Into<PathBuf>, dir: impl Into<PathBuf>) -> QemuRuntime {
        QemuRuntime {
            binary: binary.into(),
            accel: DEFAULT_ACCEL.into(),
            dir: dir.into(),
            incoming: false,
            ram_file: None,
        }
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// The guest's serial console (first serial port), appended to.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// QEMU's own stdout and stderr.
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
}

/// A path as a value inside a QEMU `key=value,…` option (commas doubled).
fn option_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// Checks that QEMU can run `config` as described (what `vm.toml` allows but QEMU
/// refuses): QEMU's IDE/SATA disks (`ide-hd`) cannot be read-only.
pub fn check_config(config: &VmConfig) -> Result<(), QemuError> {
    for (i, disk) in config.disks.iter().enumerate() {
        if disk.read_only && disk.interface != DiskInterface::Virtio {
            return Err(QemuError::Unsupported {
                field: format!("disk[{i}].read_only"),
                reason: "QEMU cannot attach a read-only IDE or SATA disk: use interface = \"virtio\", or remove read_only".into(),
            });
        }
    }
    Ok(())
}

/// The QEMU command line for `config`, whose files are in `parcel_dir` (see
/// [`check_config`] for what QEMU will refuse).
pub fn qemu_command(config: &VmConfig, parcel_dir: &Path, runtime: &QemuRuntime) -> Command {
    let mut command = Command::new(&runtime.binary);
    command.args(qemu_args(config, parcel_dir, runtime));
    command
}

/// The arguments of [`qemu_command`].
pub fn qemu_args(config: &VmConfig, parcel_dir: &Path, runtime: &QemuRuntime) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["-nodefaults", "-no-user-config"]);
    match &runtime.ram_file {
        // prealloc stays off: it would read the whole file before the guest runs.
        // The id is the machine's default RAM id, so the RAM block is named
        // as without a backend ("pc.ram") and a memory image saved either
        // way loads into either.
        Some(ram_file) => push(&[
            "-object",
            &format!(
                "memory-backend-file,id=pc.ram,size={}M,mem-path={},share=on",
                config.memory_mib(),
                option_path(ram_file)
            ),
            "-machine",
            "pc,memory-backend=pc.ram",
        ]),
        None => push(&["-machine", "pc"]),
    }
    push(&["-accel", &runtime.accel]);
    push(&["-m", &config.memory_mib().to_string()]);
    push(&["-smp", &config.cpus.to_string()]);
    let mut ahci = false;
    for (i, disk) in config.disks.iter().enumerate() {
        let mut drive = format!(
            "file={},if=none,id=disk{i},format=raw,cache=writeback,discard=unmap,detect-zeroes=unmap",
            option_path(&parcel_dir.join(&disk.file))
        );
        if disk.read_only {
            drive.push_str(",readonly=on");
        }
        let device = match disk.interface {
            DiskInterface::Virtio => format!("virtio-blk-pci,drive=disk{i}"),
            DiskInterface::Ide => format!("ide-hd,drive=disk{i}"),
            DiskInterface::Sata => {
                if !ahci {
                    push(&["-device", "ahci,id=ahci"]);
                    ahci = true;
                }
                format!("ide-hd,drive=disk{i},bus=ahci.{i}")
            }
        };
        push(&["-drive", &drive, "-device", &device]);
    }
    if let Some(kernel) = &config.kernel {
        args.push("-kernel".into());
        args.push(parcel_dir.join(kernel).into());
        if let Some(initrd) = &config.initrd {
            args.push("-initrd".into());
            args.push(parcel_dir.join(initrd).into());
        }
        if let Some(append) = &config.append {
            args.push("-append".into());
            args.push(append.into());
        }
    }
    for (i, nic) in config.nics.iter().enumerate() {
        let NicMode::User = nic.mode;
        let mut netdev = format!("user,id=net{i}");
        for forward in &nic.forward {
            let protocol = match forward.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            };
            netdev.push_str(&format!(
                ",hostfwd={protocol}:127.0.0.1:{}-:{}",
                forward.host, forward.guest
            ));
        }
        let model = match nic.model {
            NicModel::Virtio => "virtio-net-pci",
            NicModel::E1000 => "e1000",
        };
        args.extend(
            [
                "-netdev",
                &netdev,
                "-device",
                &format!("{model},netdev=net{i}"),
            ]
            .map(OsString::from),
        );
    }
    let display = &config.display;
    match display.kind {
        DisplayKind::None => args.extend(["-display", "none"].map(OsString::from)),
        DisplayKind::Vnc => {
            // Display N listens on 5900 + N; without a port, the first free one.
            let vnc = match display.vnc_port {
                Some(port) => format!("127.0.0.1:{}", port - 5900),
                None => "127.0.0.1:0,to=99".into(),
            };
            args.extend(["-device", "VGA", "-display", "none", "-vnc", &vnc].map(OsString::from));
        }
        DisplayKind::Sdl | DisplayKind::Gtk => {
            let kind = if display.kind == DisplayKind::Sdl {
                "sdl"
            } else {
                "gtk"
            };
            args.extend(["-device", "VGA", "-display", kind].map(OsString::from));
            if display.fullscreen {
                args.push("-full-screen".into());
            }
        }
    }
    if config.free_page_reporting {
        args.extend(
            [
                "-device",
                "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
            ]
            .map(OsString::from),
        );
    }
    args.push("-serial".into());
    args.push(format!("file:{}", runtime.serial_log().display()).into());
    args.push("-qmp".into());
    args.push(
        format!(
            "unix:{},server=on,wait=off",
            option_path(&runtime.qmp_socket())
        )
        .into(),
    );
    if runtime.incoming {
        args.extend(["-incoming", "defer"].map(OsString::from));
    }
    args.extend(config.extra_args.iter().map(OsString::from));
    args
}

/// `path` quoted for `sh -c`.
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

/// The temporary name a memory image is written under before it is complete.
pub fn partial_name(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.partial"))
}

/// What a migration file holds, and so how it is written and read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFormat {
    /// The whole memory at fixed offsets (`file:` + mapped-ram, QEMU ≥ 9).
    MappedRam,
    /// The whole memory as a migration stream (`exec:cat`, any QEMU).
    Stream,
    /// Device state only (`file:` + `x-ignore-shared`): the RAM is a shared
    /// file-backed memory backend that QEMU leaves where it is (lazy mode).
    DeviceOnly,
}

impl StateFormat {
    /// The whole-memory format a QEMU of `version` writes.
    pub fn memory_image(version: QemuVersion) -> StateFormat {
        if version.has_mapped_ram() {
            StateFormat::MappedRam
        } else {
            StateFormat::Stream
        }
    }

    fn uri(self, file: &Path, incoming: bool) -> String {
        match (self, incoming) {
            (StateFormat::Stream, false) => format!("exec:cat > {}", shell_quote(file)),
            (StateFormat::Stream, true) => format!("exec:cat {}", shell_quote(file)),
            _ => format!("file:{}", file.display()),
        }
    }
}

/// Sets the capabilities and parameters of `format`. Every capability a format
/// depends on is set either way: one QEMU may load in one format and save in
/// another (a lazy resume, then a suspend to a memory image), and a capability
/// left on from the load would change what the save writes.
fn set_migration_options(qmp: &mut Qmp, format: StateFormat) -> Result<(), QemuError> {
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": MAX_BANDWIDTH })),
    )?;
    let whole_memory = format == StateFormat::MappedRam;
    let mut capabilities = vec![
        json!({ "capability": "x-ignore-shared", "state": format == StateFormat::DeviceOnly }),
        json!({ "capability": "multifd", "state": whole_memory }),
    ];
    // Older QEMU has no mapped-ram (and then never uses it).
    let known = qmp.execute("query-migrate-capabilities", None)?;
    if known
        .as_array()
        .is_some_and(|caps| caps.iter().any(|c| c["capability"] == "mapped-ram"))
    {
        capabilities.push(json!({ "capability": "mapped-ram", "state": whole_memory }));
    }
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": capabilities })),
    )?;
    if whole_memory {
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "multifd-channels": MULTIFD_CHANNELS })),
        )?;
    }
    Ok(())
}

fn migration_error(status: &Value) -> String {
    status
        .get("error-desc")
        .and_then(Value::as_str)
        .unwrap_or("QEMU gave no reason")
        .to_owned()
}

/// Suspends: stops the VM, saves its state into `dest` (QEMU ≥ 9: `file:` with
/// `mapped-ram`; older: `exec:cat`), and quits QEMU. The state is written to
/// [`partial_name`]`(dest)` and renamed to `dest` only after QEMU reports the
/// migration completed and the file is synced; on any error the partial file is
/// removed and `dest` is untouched.
pub fn save_memory(qmp: &mut Qmp, dest: &Path, version: QemuVersion) -> Result<(), QemuError> {
    save_state(qmp, dest, StateFormat::memory_image(version), None)
}

/// Suspends in lazy mode: stops the VM, saves its device state into `dest`
/// (`x-ignore-shared`), makes `ram_file` durable (QEMU never syncs it: its
/// pages reach the file only by the kernel's writeback), and only then puts the
/// device state in place and quits QEMU. So a device state in place always has
/// its RAM file beside it, complete; on any error `dest` is untouched.
pub fn save_device_state(qmp: &mut Qmp, dest: &Path, ram_file: &Path) -> Result<(), QemuError> {
    save_state(qmp, dest, StateFormat::DeviceOnly, Some(ram_file))
}

/// Syncs `file` (opened for reading: fsync writes back its dirty pages).
fn sync_file(file: &Path) -> Result<(), QemuError> {
    File::open(file)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("syncing {}", file.display())))
}

fn save_state(
    qmp: &mut Qmp,
    dest: &Path,
    format: StateFormat,
    ram_file: Option<&Path>,
) -> Result<(), QemuError> {
    let what = || format!("saving the VM's memory to {}", dest.display());
    let partial = partial_name(dest);
    let result = save_to_partial(qmp, &partial, format).and_then(|()| {
        if let Some(ram_file) = ram_file {
            sync_file(ram_file)?;
        }
        let file = File::open(&partial).map_err(io(format!("opening {}", partial.display())))?;
        file.sync_all()
            .map_err(io(format!("syncing {}", partial.display())))?;
        std::fs::rename(&partial, dest).map_err(io(format!(
            "renaming {} to {}",
            partial.display(),
            dest.display()
        )))?;
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io(format!("syncing {}", parent.display())))?;
        }
        Ok(())
    });
    if let Err(error) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(match error {
            QemuError::Migration { .. } => error,
            other => QemuError::MigrationStep {
                what: what(),
                source: Box::new(other),
            },
        });
    }
    // The state is safely in place; QEMU may go (and may close the connection
    // before it answers).
    match qmp.execute("quit", None) {
        Err(e) if e.is_refusal() => Err(e.into()),
        _ => Ok(()),
    }
}

fn save_to_partial(qmp: &mut Qmp, partial: &Path, format: StateFormat) -> Result<(), QemuError> {
    let _ = std::fs::remove_file(partial);
    qmp.execute("stop", None)?;
    set_migration_options(qmp, format)?;
    let uri = format.uri(partial, false);
    qmp.execute("migrate", Some(json!({ "uri": uri })))?;
    loop {
        let status = qmp.execute("query-migrate", None)?;
        match status.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
            Some(state @ ("failed" | "cancelled")) => {
                return Err(QemuError::Migration {
                    what: format!("saving the VM's memory to {}", partial.display()),
                    reason: format!("migration {state}: {}", migration_error(&status)),
                });
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Resumes: loads `src` into a QEMU started with `-incoming defer` and continues
/// the VM (a VM stopped before saving comes back paused), then checks it runs.
pub fn load_memory(qmp: &mut Qmp, src: &Path, version: QemuVersion) -> Result<(), QemuError> {
    load_state(qmp, src, StateFormat::memory_image(version))
}

/// Resumes in lazy mode: loads the device state `src` into a QEMU started with
/// `-incoming defer` over the RAM file it was saved with, then continues the VM.
/// No memory is read: the guest's pages come from the RAM file as it touches them.
pub fn load_device_state(qmp: &mut Qmp, src: &Path) -> Result<(), QemuError> {
    load_state(qmp, src, StateFormat::DeviceOnly)
}

fn load_state(qmp: &mut Qmp, src: &Path, format: StateFormat) -> Result<(), QemuError> {
    let what = || format!("loading the VM's memory from {}", src.display());
    if !src.is_file() {
        return Err(QemuError::Migration {
            what: what(),
            reason: "no such file".into(),
        });
    }
    set_migration_options(qmp, format)?;
    let uri = format.uri(src, true);
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
    loop {
        let migration = qmp.execute("query-migrate", None)?;
        let state = migration.get("status").and_then(Value::as_str);
        if matches!(state, Some("failed" | "cancelled")) {
            return Err(QemuError::Migration {
                what: what(),
                reason: format!(
                    "migration {}: {}",
                    state.unwrap_or("?"),
                    migration_error(&migration)
                ),
            });
        }
        let run_state = run_status(qmp)?;
        match run_state.as_str() {
            "running" => return Ok(()),
            "paused" | "postmigrate" | "prelaunch" if state == Some("completed") => break,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    qmp.execute("cont", None)?;
    match run_status(qmp)?.as_str() {
        "running" => Ok(()),
        other => Err(QemuError::Migration {
            what: what(),
            reason: format!("the VM is {other} after `cont`, not running"),
        }),
    }
}

fn run_status(qmp: &mut Qmp) -> Result<String, QemuError> {
    let status = qmp.execute("query-status", None)?;
    Ok(status
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned())
}

/// A QEMU process running a parcel's VM, supervised over QMP; killed on drop.
#[derive(Debug)]
pub struct QemuVm {
    child: Child,
    qmp: Qmp,
    runtime: QemuRuntime,
    version: QemuVersion,
}

impl QemuVm {
    /// Cold-boots the VM.
    pub fn boot(
        config: &VmConfig,
        parcel_dir: &Path,
        runtime: &QemuRuntime,
    ) -> Result<QemuVm, QemuError> {
        let runtime = QemuRuntime {
            incoming: false,
            ..runtime.clone()
        };
        QemuVm::start(config, parcel_dir, runtime)
    }

    /// Starts QEMU waiting for a saved state, loads `memory_image` and runs the VM.
    pub fn resume_from(
        config: &VmConfig,
        parcel_dir: &Path,
        runtime: &QemuRuntime,
        memory_image: &Path,
    ) -> Result<QemuVm, QemuError> {
        let runtime = QemuRuntime {
            incoming: true,
            ..runtime.clone()
        };
        let mut vm = QemuVm::start(config, parcel_dir, runtime.clone())?;
        let what = format!("resuming from {}", memory_image.display());
        let first = match load_memory(&mut vm.qmp, memory_image, vm.version) {
            Ok(()) => return Ok(vm),
            Err(e) if !vm.version.has_mapped_ram() => {
                let e = QemuError::NeedsMappedRam {
                    what: what.clone(),
                    version: vm.version,
                    source: Box::new(e),
                };
                return Err(vm.fail(what, e));
            }
            Err(e) => e,
        };
        // Saved by a QEMU before 9 (a migration stream, not mapped-ram): load
        // it as one, in a fresh QEMU (a failed incoming migration ends QEMU).
        tracing::info!(error = %first, "not a mapped-ram image; loading it as a migration stream");
        vm.kill();
        let mut vm = QemuVm::start(config, parcel_dir, runtime)?;
        match load_memory(&mut vm.qmp, memory_image, STREAM_ONLY) {
            Ok(()) => Ok(vm),
            Err(e) => {
                let e = QemuError::NeitherFormat {
                    what: what.clone(),
                    mapped_ram: Box::new(first),
                    source: Box::new(e),
                };
                Err(vm.fail(what, e))
            }
        }
    }

    /// Starts QEMU over the RAM file `runtime.ram_file` waiting for a saved
    /// device state, loads `device_state` ([`load_device_state`]) and runs the VM.
    pub fn resume_lazy(
        config: &VmConfig,
        parcel_dir: &Path,
        runtime: &QemuRuntime,
        device_state: &Path,
    ) -> Result<QemuVm, QemuError> {
        let runtime = QemuRuntime {
            incoming: true,
            ..runtime.clone()
        };
        let mut vm = QemuVm::start(config, parcel_dir, runtime)?;
        match load_device_state(&mut vm.qmp, device_state) {
            Ok(()) => Ok(vm),
            Err(e) => Err(vm.fail(format!("resuming from {}", device_state.display()), e)),
        }
    }

    /// Starts QEMU as `runtime` says (booting, or with `-incoming defer` waiting
    /// for [`load_memory`] through [`QemuVm::qmp`]) and connects over QMP.
    pub fn start(
        config: &VmConfig,
        parcel_dir: &Path,
        runtime: QemuRuntime,
    ) -> Result<QemuVm, QemuError> {
        check_config(config)?;
        let version = qemu_version(&runtime.binary)?;
        std::fs::create_dir_all(&runtime.dir).map_err(io(format!(
            "creating QEMU's runtime directory {}",
            runtime.dir.display()
        )))?;
        let socket = runtime.qmp_socket();
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(format!("removing the old {}", socket.display()))(e));
            }
            _ => {}
        }
        let log_path = runtime.qemu_log();
        // Appended to: a resume that retries in a second QEMU keeps the first one's reasons.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io("QEMU log"))?;
        // A process group of its own: a Ctrl-C (SIGINT to the terminal's
        // foreground group) or a group kill meant for isrfsd does not reach
        // QEMU, which isrfsd saves at shutdown (under systemd, KillMode=mixed
        // does the same for the service's cgroup).
        let mut child = std::os::unix::process::CommandExt::process_group(
            &mut qemu_command(config, parcel_dir, &runtime),
            0,
        )
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(io(format!("starting {}", runtime.binary.display())))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let qmp = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(QemuError::Process {
                    what: format!("QEMU exited at start ({status})"),
                    log: log_path,
                    source: None,
                });
            }
            if socket.exists() {
                match Qmp::connect(&socket, QMP_TIMEOUT) {
                    Ok(qmp) => break qmp,
                    Err(e) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(QemuError::Process {
                            what: "cannot talk to QEMU over QMP".into(),
                            log: log_path,
                            source: Some(Box::new(e.into())),
                        });
                    }
                    Err(_) => {}
                }
            } else if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(QemuError::Process {
                    what: format!(
                        "QEMU did not open its QMP socket {} within {} s",
                        socket.display(),
                        START_TIMEOUT.as_secs()
                    ),
                    log: log_path,
                    source: None,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(QemuVm {
            child,
            qmp,
            runtime,
            version,
        })
    }

    /// Kills QEMU and wraps `error` with what failed and where the log is.
    fn fail(&mut self, what: String, error: QemuError) -> QemuError {
        // A QEMU that closed the connection is usually exiting: say how it ended.
        let what = match self.wait_exit(Duration::from_millis(500)) {
            Some(status) => format!("{what}: QEMU exited ({status})"),
            None => what,
        };
        self.kill();
        QemuError::Process {
            what,
            log: self.runtime.qemu_log(),
            source: Some(Box::new(error)),
        }
    }

    /// Suspends the VM into `memory_image` (see [`save_memory`]) and waits for QEMU
    /// to exit. On error no file is left under `memory_image`; if QEMU is still
    /// alive the VM is continued (`cont`) and goes on running as if nothing had
    /// happened ([`QemuVm::is_running`] tells), otherwise QEMU is killed.
    pub fn suspend_to(&mut self, memory_image: &Path) -> Result<(), QemuError> {
        let format = StateFormat::memory_image(self.version);
        self.suspend_as(memory_image, format, None)
    }

    /// Suspends the VM in lazy mode: its device state into `device_state`, its
    /// RAM file made durable first (see [`save_device_state`]); otherwise as
    /// [`QemuVm::suspend_to`].
    pub fn suspend_lazy(&mut self, device_state: &Path, ram_file: &Path) -> Result<(), QemuError> {
        self.suspend_as(device_state, StateFormat::DeviceOnly, Some(ram_file))
    }

    fn suspend_as(
        &mut self,
        dest: &Path,
        format: StateFormat,
        ram_file: Option<&Path>,
    ) -> Result<(), QemuError> {
        let what = format!("suspending the VM to {}", dest.display());
        if let Err(e) = save_state(&mut self.qmp, dest, format, ram_file) {
            if self.is_running() && self.qmp.execute("cont", None).is_ok() {
                tracing::warn!(error = %e, "suspend failed; the VM goes on running");
                return Err(QemuError::Process {
                    what: format!("{what} (the VM goes on running)"),
                    log: self.runtime.qemu_log(),
                    source: Some(Box::new(e)),
                });
            }
            return Err(self.fail(what, e));
        }
        match self.wait_exit(START_TIMEOUT) {
            Some(_) => Ok(()),
            None => {
                self.kill();
                Ok(())
            }
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the QEMU process is still alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How QEMU ended, once it has.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The QEMU version in use.
    pub fn version(&self) -> QemuVersion {
        self.version
    }

    /// The runtime settings (socket, logs).
    pub fn runtime(&self) -> &QemuRuntime {
        &self.runtime
    }

    /// The QMP connection, for anything else.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// Kills QEMU (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The file whose first line is the pid of the QEMU started for a VM's runtime
/// directory.
fn pid_file(dir: &Path) -> PathBuf {
    dir.join("qemu.pid")
}

/// Kills a QEMU an earlier isrfsd (killed itself) left running for the VM whose
/// runtime directory is `dir`: its disks are in a mount that is gone, and two
/// QEMUs must never run one VM. Only a process whose command line names this
/// directory's QMP socket is killed.
pub fn kill_leftover(dir: &Path) {
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
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_file(pid_file(dir));
}

/// The QEMU [`Vmm`]: a [`QemuVm`] started from the mount, its runtime files
/// (QMP socket, serial console, QEMU's log, `qemu.pid`) in the VM's runtime
/// directory.
///
/// Memory ([`MemoryMode`]): in lazy mode guest RAM is the parcel's RAM file,
/// mapped from the mount, and a suspend saves the device state beside it; in
/// image mode RAM is QEMU's own and a suspend saves the memory image. A resume
/// takes whichever saved state the parcel holds (a device state with its RAM
/// file first), so a version saved in one mode resumes in the other: a device
/// state always needs the RAM file it was saved with; a memory image loads
/// into either kind of RAM. A boot, or a resume from a memory image, removes a
/// RAM file left from before (its pages would be fetched for nothing) so QEMU
/// starts from a sparse new one.
///
/// With the RAM file on the mount, QEMU's process runs with transparent huge
/// pages disabled ([`disable_huge_pages`]): QEMU advises huge pages on guest
/// RAM, which on kernels that read around a fault by that advice turns a
/// fault of a 4 KiB page into a read of up to 2 MiB — megabytes fetched that
/// the guest never touches (not seen on Linux 6.18 with FUSE; see
/// docs/decisions.md).
#[derive(Debug)]
pub struct QemuAdapter {
    vm: ParcelVm,
    runtime: QemuRuntime,
    qemu: Option<QemuVm>,
    /// The address QEMU's VNC server listens on, asked once it runs.
    vnc: Option<String>,
    /// Set when QEMU died while suspending (reported by [`Vmm::ended`]).
    died: Option<Ended>,
}

impl QemuAdapter {
    /// For `vm`, run by the QEMU binary `binary` with `-accel accel`.
    pub fn new(vm: &ParcelVm, binary: &Path, accel: &str) -> QemuAdapter {
        QemuAdapter {
            runtime: QemuRuntime {
                accel: accel.to_owned(),
                ..QemuRuntime::new(binary, &vm.dir)
            },
            vm: vm.clone(),
            qemu: None,
            vnc: None,
            died: None,
        }
    }

    fn start(&mut self, saved: Option<&SavedState>) -> Result<Started, VmError> {
        kill_leftover(&self.vm.dir);
        let config = &self.vm.config;
        let from_device_state = saved.is_some_and(|s| s.form == SavedForm::DeviceState);
        let ram_file = self.vm.ram_file();
        self.runtime.ram_file = if from_device_state || config.memory_mode() == MemoryMode::Lazy {
            if !from_device_state {
                remove_stale(&ram_file)?;
            }
            disable_huge_pages();
            Some(ram_file)
        } else {
            None
        };
        let mut qemu = match saved {
            Some(saved) if from_device_state => {
                QemuVm::resume_lazy(config, &self.vm.mount, &self.runtime, &saved.path)?
            }
            Some(saved) => QemuVm::resume_from(config, &self.vm.mount, &self.runtime, &saved.path)?,
            None => QemuVm::boot(config, &self.vm.mount, &self.runtime)?,
        };
        if config.display.kind == DisplayKind::Vnc {
            // The port QEMU actually listens on (any free one unless vm.toml fixes it).
            if let Ok(vnc) = qemu.qmp().execute("query-vnc", None) {
                let host = vnc.get("host").and_then(|v| v.as_str());
                let port = vnc.get("service").and_then(|v| v.as_str());
                if let (Some(host), Some(port)) = (host, port) {
                    self.vnc = Some(format!("{host}:{port}"));
                }
            }
        }
        let _ = std::fs::write(pid_file(&self.vm.dir), format!("{}\n", qemu.pid()));
        self.qemu = Some(qemu);
        Ok(Started::Running)
    }
}

/// Removes a RAM file that a boot (or a memory image's load) would only
/// overwrite.
fn remove_stale(ram_file: &Path) -> Result<(), VmError> {
    match std::fs::remove_file(ram_file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(VmError::Io {
            what: format!("removing the old RAM file {}", ram_file.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Disables transparent huge pages for this process and the QEMU it starts
/// (`PR_SET_THP_DISABLE`, inherited across fork and exec). Process-wide, so it
/// also covers the daemon's own memory, which gains nothing from huge pages.
fn disable_huge_pages() {
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::warn!(error = %e, "cannot disable transparent huge pages: faults on guest RAM will read more than they need");
    }
}

impl Vmm for QemuAdapter {
    /// Lazy mode's device state with its RAM file, else the memory image.
    fn saved_state(&self) -> Option<SavedState> {
        self.vm
            .saved_device_state()
            .or_else(|| self.vm.saved_memory_image())
    }

    fn boot(&mut self) -> Result<Started, VmError> {
        self.start(None)
    }

    /// Loads the memory image as mapped-ram, else as a stream (see
    /// [`QemuVm::resume_from`]).
    fn resume(&mut self, saved: &SavedState) -> Result<Started, VmError> {
        self.start(Some(saved))
    }

    /// Lazy mode with RAM on the mount: the device state; otherwise the
    /// memory image (from RAM on the mount too, when the parcel's mode is image).
    fn suspend(&mut self) -> Result<(), VmError> {
        let lazy =
            self.runtime.ram_file.is_some() && self.vm.config.memory_mode() == MemoryMode::Lazy;
        let (memory, device_state, ram_file) = (
            self.vm.memory_image(),
            self.vm.device_state(),
            self.vm.ram_file(),
        );
        let Some(qemu) = self.qemu.as_mut() else {
            return Err(VmError::NotRunning {
                parcel: self.vm.parcel.clone(),
                why: "QEMU was not started".into(),
            });
        };
        let saved = if lazy {
            qemu.suspend_lazy(&device_state, &ram_file)
        } else {
            qemu.suspend_to(&memory)
        };
        if let Err(e) = saved {
            if !qemu.is_running() {
                self.died = Some(Ended {
                    why: format!("QEMU died while suspending: {e}"),
                    powered_off: false,
                });
            }
            return Err(e.into());
        }
        let _ = std::fs::remove_file(pid_file(&self.vm.dir));
        Ok(())
    }

    fn ended(&mut self) -> Option<Ended> {
        if let Some(died) = self.died.take() {
            return Some(died);
        }
        let status = self.qemu.as_mut()?.exit_status()?;
        let _ = std::fs::remove_file(pid_file(&self.vm.dir));
        Some(Ended {
            why: if status.success() {
                "the guest powered off (QEMU exited with status 0)".to_owned()
            } else {
                format!("QEMU exited ({status})")
            },
            powered_off: status.success(),
        })
    }

    fn kill(&mut self) {
        if let Some(qemu) = self.qemu.as_mut() {
            qemu.kill();
        }
        let _ = std::fs::remove_file(pid_file(&self.vm.dir));
    }

    fn status(&self) -> AdapterStatus {
        let Some(qemu) = &self.qemu else {
            return AdapterStatus::default();
        };
        let runtime = qemu.runtime();
        AdapterStatus {
            pid: Some(qemu.pid()),
            serial_log: Some(runtime.serial_log()),
            qemu_log: Some(runtime.qemu_log()),
            qmp_socket: Some(runtime.qmp_socket()),
            vnc: self.vnc.clone(),
            steps: Vec::new(),
            ram_file: self.runtime.ram_file.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The value after each occurrence of `flag`.
    fn values(args: &[String], flag: &str) -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }

    fn runtime() -> QemuRuntime {
        QemuRuntime::new("/usr/bin/qemu-system-x86_64", "/run/isr/p")
    }

    #[test]
    fn the_test_guest_command_line() {
        let config = VmConfig::parse(
            "vmm = \"qemu\"\nmemory = 256\ncpus = 2\nkernel = \"vmlinuz\"\ninitrd = \"initrd.img\"\n\
             append = \"console=ttyS0 quiet\"\nextra_args = [\"-no-reboot\"]\n\
             [[disk]]\nfile = \"disk.img\"\n",
        )
        .unwrap();
        let args = strings(&qemu_args(&config, Path::new("/mnt/p"), &runtime()));
        assert_eq!(
            qemu_command(&config, Path::new("/mnt/p"), &runtime()).get_program(),
            "/usr/bin/qemu-system-x86_64"
        );
        assert!(args.contains(&"-nodefaults".to_owned()), "{args:?}");
        assert!(args.contains(&"-no-user-config".to_owned()), "{args:?}");
        assert_eq!(values(&args, "-accel"), ["tcg"]);
        assert_eq!(values(&args, "-m"), ["256"]);
        assert_eq!(values(&args, "-smp"), ["2"]);
        assert_eq!(
            values(&args, "-drive"),
            [
                "file=/mnt/p/disk.img,if=none,id=disk0,format=raw,cache=writeback,discard=unmap,detect-zeroes=unmap"
            ]
        );
        assert_eq!(
            values(&args, "-device"),
            [
                "virtio-blk-pci,drive=disk0",
                "virtio-balloon-pci,id=balloon0,free-page-reporting=on"
            ]
        );
        assert_eq!(values(&args, "-machine"), ["pc"]);
        assert!(values(&args, "-object").is_empty());
        assert_eq!(values(&args, "-kernel"), ["/mnt/p/vmlinuz"]);
        assert_eq!(values(&args, "-initrd"), ["/mnt/p/initrd.img"]);
        assert_eq!(values(&args, "-append"), ["console=ttyS0 quiet"]);
        assert_eq!(values(&args, "-display"), ["none"]);
        assert!(values(&args, "-vnc").is_empty());
        assert_eq!(values(&args, "-serial"), ["file:/run/isr/p/serial.log"]);
        assert_eq!(
            values(&args, "-qmp"),
            ["unix:/run/isr/p/qmp.sock,server=on,wait=off"]
        );
        assert!(values(&args, "-incoming").is_empty());
        assert_eq!(args.last().unwrap(), "-no-reboot", "extra args come last");

        let incoming = QemuRuntime {
            incoming: true,
            accel: "kvm".into(),
            ..runtime()
        };
        let args = strings(&qemu_args(&config, Path::new("/mnt/p"), &incoming));
        assert_eq!(values(&args, "-incoming"), ["defer"]);
        assert_eq!(values(&args, "-accel"), ["kvm"]);

        // Lazy memory: guest RAM is the RAM file, shared, not preallocated.
        let lazy = QemuRuntime {
            ram_file: Some("/mnt/p/a,b.ram".into()),
            ..runtime()
        };
        let args = strings(&qemu_args(&config, Path::new("/mnt/p"), &lazy));
        assert_eq!(
            values(&args, "-object"),
            ["memory-backend-file,id=pc.ram,size=256M,mem-path=/mnt/p/a,,b.ram,share=on"]
        );
        assert_eq!(values(&args, "-machine"), ["pc,memory-backend=pc.ram"]);
        assert_eq!(values(&args, "-m"), ["256"]);
    }

    #[test]
    fn disks_nics_and_displays() {
        let config = VmConfig::parse(
            r#"
vmm = "qemu"
memory = "1G"
[[disk]]
file = "a,b.img"
interface = "sata"
[[disk]]
file = "data.img"
interface = "ide"
read_only = true
[[disk]]
file = "more.img"
interface = "sata"
[[nic]]
mode = "user"
model = "e1000"
forward = [{ host = 2222, guest = 22 }, { host = 5353, guest = 53, protocol = "udp" }]
[[nic]]
mode = "user"
[display]
type = "vnc"
vnc_port = 5903
"#,
        )
        .unwrap();
        let args = strings(&qemu_args(&config, Path::new("/p"), &runtime()));
        let drives = values(&args, "-drive");
        assert_eq!(drives.len(), 3);
        assert!(
            drives[0].starts_with("file=/p/a,,b.img,if=none,id=disk0,"),
            "{drives:?}"
        );
        for drive in &drives {
            assert!(drive.contains(",discard=unmap,"), "{drive}");
            assert!(drive.contains(",format=raw,"), "{drive}");
        }
        assert!(drives[1].ends_with(",readonly=on"), "{drives:?}");
        assert!(!drives[0].contains("readonly"), "{drives:?}");
        assert_eq!(
            values(&args, "-device"),
            [
                "ahci,id=ahci",
                "ide-hd,drive=disk0,bus=ahci.0",
                "ide-hd,drive=disk1",
                "ide-hd,drive=disk2,bus=ahci.2",
                "e1000,netdev=net0",
                "virtio-net-pci,netdev=net1",
                "VGA",
                "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
            ]
        );
        assert_eq!(
            values(&args, "-netdev"),
            [
                "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp:127.0.0.1:5353-:53",
                "user,id=net1",
            ]
        );
        assert_eq!(values(&args, "-vnc"), ["127.0.0.1:3"]);
        assert_eq!(values(&args, "-display"), ["none"]);
        assert!(values(&args, "-kernel").is_empty());

        let any_port = VmConfig::parse(
            "vmm = \"qemu\"\nmemory = 512\n[[disk]]\nfile = \"d\"\n[display]\ntype = \"vnc\"\n",
        )
        .unwrap();
        let args = strings(&qemu_args(&any_port, Path::new("/p"), &runtime()));
        let vnc = values(&args, "-vnc");
        assert_eq!(vnc, ["127.0.0.1:0,to=99"]);
        assert!(vnc.iter().all(|v| v.starts_with("127.0.0.1:")));

        let kiosk = VmConfig::parse(
            "vmm = \"qemu\"\nmemory = 512\n[[disk]]\nfile = \"d\"\n[display]\ntype = \"gtk\"\nfullscreen = true\n",
        )
        .unwrap();
        let args = strings(&qemu_args(&kiosk, Path::new("/p"), &runtime()));
        assert_eq!(values(&args, "-display"), ["gtk"]);
        assert!(args.contains(&"-full-screen".to_owned()));
        let sdl = VmConfig::parse(
            "vmm = \"qemu\"\nmemory = 512\n[[disk]]\nfile = \"d\"\n[display]\ntype = \"sdl\"\n",
        )
        .unwrap();
        let args = strings(&qemu_args(&sdl, Path::new("/p"), &runtime()));
        assert_eq!(values(&args, "-display"), ["sdl"]);
        assert!(!args.contains(&"-full-screen".to_owned()));
    }

    #[test]
    fn read_only_disks_only_on_virtio() {
        let config = |interface: &str| {
            VmConfig::parse(&format!(
                "vmm = \"qemu\"\nmemory = 512\n[[disk]]\nfile = \"a\"\n[[disk]]\nfile = \"b\"\n\
                 interface = \"{interface}\"\nread_only = true\n"
            ))
            .unwrap()
        };
        check_config(&config("virtio")).unwrap();
        for interface in ["ide", "sata"] {
            let error = check_config(&config(interface)).unwrap_err();
            assert_eq!(error.class(), ErrorClass::Invalid);
            let message = error.to_string();
            assert!(
                message.starts_with("vm.toml: disk[1].read_only: QEMU cannot"),
                "{message}"
            );
        }
    }

    #[test]
    fn versions() {
        let v = |major, minor| Some(QemuVersion { major, minor });
        assert_eq!(
            parse_version(
                "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright (c) 2003-2025"
            ),
            v(10, 0)
        );
        assert_eq!(
            parse_version("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u13)"),
            v(7, 2)
        );
        assert_eq!(parse_version("QEMU emulator version 9.1.0"), v(9, 1));
        assert_eq!(parse_version("QEMU emulator version 8.2"), v(8, 2));
        assert_eq!(parse_version("QEMU emulator version 10"), None);
        assert_eq!(parse_version("qemu-img"), None);
        assert_eq!(parse_version(""), None);
        assert!(v(9, 0).unwrap().has_mapped_ram());
        assert!(v(10, 0).unwrap().has_mapped_ram());
        assert!(!v(8, 2).unwrap().has_mapped_ram());
        assert!(!v(7, 2).unwrap().has_mapped_ram());
        assert_eq!(v(10, 0).unwrap().to_string(), "10.0");
    }

    #[test]
    fn partial_names_and_quoting() {
        assert_eq!(
            partial_name(Path::new("/p/memory.img")),
            Path::new("/p/.memory.img.partial")
        );
        assert_eq!(shell_quote(Path::new("/a b/it's")), "'/a b/it'\\''s'");
    }
}
