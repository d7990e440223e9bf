//! `vm.toml`: the description of the VM a parcel holds, stored as a file in the
//! parcel beside its disk and memory images.
//!
//! Every path in it names a file *inside the parcel*: relative, without `..`, so
//! the same file works wherever the parcel is mounted. Unknown keys are errors;
//! every error is one line naming the field and what to do.
//!
//! ```toml
//! vmm = "qemu"                 # who runs the VM: "qemu", "libvirt", "virtualbox", "none"
//! memory = "512M"              # guest RAM: MiB as an integer (512), or "512M", "2G"
//!                              # (also "512MiB", "2GiB"); 16 MiB to 1 TiB
//! cpus = 1                     # virtual CPUs, 1 to 255 (default 1)
//! memory_mode = "lazy"        # qemu: "lazy" (default) or "image"; others: "image" only
//! memory_image = "memory.img"  # image mode: the saved memory (default memory.img)
//! ram_file = "memory.ram"      # lazy mode: guest RAM itself, a file on the mount (default memory.ram)
//! device_state = "state.mig"   # lazy mode: the saved device state (default state.mig)
//! free_page_reporting = true   # qemu: a virtio-balloon reporting free guest pages (default true)
//! kernel = "vmlinuz"           # optional direct kernel boot (no bootloader on the disk)
//! initrd = "initrd.img"        # optional, only with kernel
//! append = "console=ttyS0"     # optional kernel command line, only with kernel
//! extra_args = ["-accel", "tcg"]   # optional, passed to QEMU as they are, after ours
//!
//! [[disk]]                     # one table per disk, in boot order; at least one disk
//! file = "disk.img"            # or a kernel is needed
//! interface = "virtio"         # "virtio" (default), "ide", "sata"
//! format = "raw"               # "raw" (default; the only format: chunks need fixed offsets)
//! read_only = false            # default false
//!
//! [[nic]]                      # one table per network card; none = no network
//! mode = "user"                # "user": user-mode networking (NAT, no root needed)
//! model = "virtio"             # "virtio" (default) or "e1000"
//! forward = [                  # optional: host ports (on 127.0.0.1) forwarded to the guest
//!   { host = 2222, guest = 22 },               # protocol "tcp" (default) or "udp"
//!   { host = 5353, guest = 53, protocol = "udp" },
//! ]
//!
//! [display]                    # default: type = "none"
//! type = "vnc"                 # "none" (headless), "vnc" (on 127.0.0.1 only), "sdl", "gtk"
//! vnc_port = 5901              # vnc only, optional: TCP port 5900–65535 (default: any free)
//! fullscreen = false           # sdl and gtk only (kiosks); default false
//! ```
//!
//! Field by field:
//!
//! - `vmm` (required): the adapter that runs the VM. `none` means isr only mounts
//!   the parcel and something else runs the VM.
//! - `memory` (required): guest RAM, a whole number of MiB. A string takes a binary
//!   suffix: `M`/`MiB` or `G`/`GiB`.
//! - `cpus`: number of virtual CPUs.
//! - `memory_mode`: how the VM's memory is kept in the parcel.
//!   - `lazy` (QEMU's default): guest RAM *is* `ram_file`, a file on the mount
//!     that QEMU maps; a suspend saves only the device state (`device_state`,
//!     a few hundred KB) and the RAM file's changed chunks, and a resume starts
//!     the guest at once while its memory arrives on demand. `ram_file` and
//!     `device_state` are one unit: a version holds both or neither.
//!   - `image` (libvirt's and VirtualBox's only mode): suspend writes the whole
//!     memory into `memory_image` and resume reads all of it before the guest
//!     runs. A version saved in either mode resumes in the other.
//! - `memory_image`: the file the VM's memory is saved into on suspend and restored
//!   from on resume in image mode; it need not exist before the first suspend.
//! - `ram_file`, `device_state`: lazy mode's two files (created by the first boot
//!   and the first suspend).
//! - `free_page_reporting`: QEMU gets a `virtio-balloon` device with free page
//!   reporting: the guest reports the pages it frees, and QEMU punches them out
//!   of the RAM file (lazy mode), so they are zero chunks, neither fetched nor
//!   stored. Part of the VM's device set: change it only while the parcel holds
//!   no saved memory. The guest holds up to 64 MiB off its free lists while it
//!   reports them: a guest with little RAM that allocates fast right after it
//!   freed much can run out of memory (seen with 256 MiB); turn it off there.
//! - `kernel`, `initrd`, `append`: boot this kernel directly instead of from the
//!   first disk (the test guest does this). `initrd` and `append` need `kernel`.
//! - `extra_args`: extra QEMU command-line arguments, one string per argument
//!   (QEMU only).
//! - `[[disk]]`: `file` (required), `interface`, `format`, `read_only`. No two disks,
//!   nor a disk and `memory_image`, may name the same file.
//! - `[[nic]]`: `mode` (required; `user`), `model`, `forward` (each `host` and `guest`
//!   port 1–65535, `protocol`; each host port and protocol at most once).
//! - `[display]`: `type`, `vnc_port`, `fullscreen`.

use std::collections::HashSet;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::error::{Classify, ErrorClass};

/// The name of the file, in a parcel, that holds its VM description.
pub const VM_CONFIG_FILE: &str = "vm.toml";

/// Smallest guest RAM accepted, MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest guest RAM accepted, MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1024 * 1024;
/// Most virtual CPUs accepted.
pub const MAX_CPUS: u32 = 255;

/// Errors reading a `vm.toml`.
#[derive(Debug, thiserror::Error)]
pub enum VmConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key, or a value of the wrong type.
    #[error("vm.toml: {0}")]
    Parse(String),
    /// A value is out of range or inconsistent with another.
    #[error("vm.toml: {field}: {reason}")]
    Invalid {
        /// The field, e.g. `disk[0].file`.
        field: String,
        /// What is wrong and what to do.
        reason: String,
    },
}

impl Classify for VmConfigError {
    fn class(&self) -> ErrorClass {
        match self {
            VmConfigError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorClass::NotFound
            }
            _ => ErrorClass::Invalid,
        }
    }
}

/// Who runs the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmKind {
    /// QEMU, driven over QMP.
    Qemu,
    /// libvirt.
    Libvirt,
    /// VirtualBox.
    Virtualbox,
    /// Nobody: isr only mounts the parcel.
    None,
}

impl VmmKind {
    /// The name used in `vm.toml` and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            VmmKind::Qemu => "qemu",
            VmmKind::Libvirt => "libvirt",
            VmmKind::Virtualbox => "virtualbox",
            VmmKind::None => "none",
        }
    }
}

impl fmt::Display for VmmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for VmmKind {
    type Err = String;

    fn from_str(text: &str) -> Result<VmmKind, String> {
        match text {
            "qemu" => Ok(VmmKind::Qemu),
            "libvirt" => Ok(VmmKind::Libvirt),
            "virtualbox" => Ok(VmmKind::Virtualbox),
            "none" => Ok(VmmKind::None),
            other => Err(format!(
                "unknown VMM {other:?}: use qemu, libvirt, virtualbox or none"
            )),
        }
    }
}

/// A disk's bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskInterface {
    /// virtio-blk.
    #[default]
    Virtio,
    /// IDE.
    Ide,
    /// SATA (AHCI).
    Sata,
}

/// A disk image's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A raw image: guest offset = file offset.
    #[default]
    Raw,
}

/// One disk of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// The image, relative to the parcel's root.
    pub file: PathBuf,
    /// Bus.
    #[serde(default)]
    pub interface: DiskInterface,
    /// Format.
    #[serde(default)]
    pub format: DiskFormat,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// How a network card reaches the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicMode {
    /// User-mode networking (NAT inside the VMM, no privileges).
    User,
}

/// A network card's model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    /// virtio-net.
    #[default]
    Virtio,
    /// Intel e1000.
    E1000,
}

/// Protocol of a forwarded port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// A host port (on 127.0.0.1) forwarded to a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    /// Port on the host's loopback address.
    pub host: u16,
    /// Port in the guest.
    pub guest: u16,
    /// Protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// One network card.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// How it reaches the network.
    pub mode: NicMode,
    /// Model.
    #[serde(default)]
    pub model: NicModel,
    /// Forwarded ports.
    #[serde(default)]
    pub forward: Vec<Forward>,
}

/// Where the VM's screen goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DisplayKind {
    /// Headless.
    #[default]
    None,
    /// A VNC server on 127.0.0.1.
    Vnc,
    /// An SDL window.
    Sdl,
    /// A GTK window.
    Gtk,
}

/// The display section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Display {
    /// Where the screen goes.
    #[serde(rename = "type", default)]
    pub kind: DisplayKind,
    /// VNC only: the TCP port (5900–65535); `None` = any free one.
    #[serde(default)]
    pub vnc_port: Option<u16>,
    /// SDL and GTK only: full screen.
    #[serde(default)]
    pub fullscreen: bool,
}

/// Guest RAM in MiB; deserialised from an integer (MiB) or a string such as
/// `"512M"` or `"2G"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMib(pub u64);

impl<'de> Deserialize<'de> for MemoryMib {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = MemoryMib;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("MiB as an integer, or a string such as \"512M\" or \"2G\"")
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<MemoryMib, E> {
                u64::try_from(value)
                    .map(MemoryMib)
                    .map_err(|_| E::custom("memory must be positive"))
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<MemoryMib, E> {
                Ok(MemoryMib(value))
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<MemoryMib, E> {
                parse_memory(value).map(MemoryMib).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Parses `"512M"`, `"512MiB"`, `"2G"`, `"2GiB"` or `"512"` (MiB) into MiB.
fn parse_memory(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let factor = match unit.trim() {
        "" | "M" | "MiB" => 1,
        "G" | "GiB" => 1024,
        _ => {
            return Err(format!(
                "cannot read memory size {text:?}: write MiB as an integer, or a string such as \"512M\" or \"2G\""
            ));
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| {
            format!(
                "cannot read memory size {text:?}: write MiB as an integer, or a string such as \"512M\" or \"2G\""
            )
        })
}

fn default_cpus() -> u32 {
    1
}

fn default_memory_image() -> PathBuf {
    PathBuf::from("memory.img")
}

fn default_ram_file() -> PathBuf {
    PathBuf::from("memory.ram")
}

fn default_device_state() -> PathBuf {
    PathBuf::from("state.mig")
}

fn default_true() -> bool {
    true
}

/// How a VM's memory is kept in the parcel (`memory_mode`; see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryMode {
    /// Guest RAM is a file on the mount; only device state is saved.
    Lazy,
    /// The whole memory is saved into one image.
    Image,
}

/// A parcel's VM description (`vm.toml`), validated.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Who runs the VM.
    pub vmm: VmmKind,
    /// Guest RAM.
    pub memory: MemoryMib,
    /// Virtual CPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// How memory is kept; `None` means the VMM's default ([`VmConfig::memory_mode`]).
    #[serde(default, rename = "memory_mode")]
    pub memory_mode_setting: Option<MemoryMode>,
    /// Image mode's saved memory, relative to the parcel's root.
    #[serde(default = "default_memory_image")]
    pub memory_image: PathBuf,
    /// Lazy mode's RAM file.
    #[serde(default = "default_ram_file")]
    pub ram_file: PathBuf,
    /// Lazy mode's saved device state.
    #[serde(default = "default_device_state")]
    pub device_state: PathBuf,
    /// A virtio-balloon device with free page reporting (QEMU).
    #[serde(default = "default_true")]
    pub free_page_reporting: bool,
    /// Direct kernel boot: the kernel, relative to the parcel's root.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Direct kernel boot: the initrd.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Direct kernel boot: the command line.
    #[serde(default)]
    pub append: Option<String>,
    /// Extra QEMU arguments.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Disks, in boot order.
    #[serde(default, rename = "disk")]
    pub disks: Vec<Disk>,
    /// Network cards.
    #[serde(default, rename = "nic")]
    pub nics: Vec<Nic>,
    /// Display.
    #[serde(default)]
    pub display: Display,
}

impl VmConfig {
    /// Reads and validates a `vm.toml` file.
    pub fn load(path: &Path) -> Result<VmConfig, VmConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| VmConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        VmConfig::parse(&text)
    }

    /// Parses and validates the text of a `vm.toml`.
    pub fn parse(text: &str) -> Result<VmConfig, VmConfigError> {
        let config: VmConfig = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().replace('\n', " ");
            VmConfigError::Parse(match e.span() {
                // A missing top-level key has no place to show.
                Some(span) if !message.starts_with("missing field") || span.start > 0 => {
                    format!("{message} {}", locate(text, span))
                }
                _ => message,
            })
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Memory in MiB.
    pub fn memory_mib(&self) -> u64 {
        self.memory.0
    }

    /// How memory is kept: as `memory_mode` says, else lazy for QEMU and image
    /// for the others.
    pub fn memory_mode(&self) -> MemoryMode {
        self.memory_mode_setting.unwrap_or(match self.vmm {
            VmmKind::Qemu => MemoryMode::Lazy,
            _ => MemoryMode::Image,
        })
    }

    /// Every parcel file the description names (memory image, RAM file, device
    /// state, disks, kernel, initrd), relative to the parcel's root.
    pub fn files(&self) -> Vec<&Path> {
        let mut files = vec![
            self.memory_image.as_path(),
            self.ram_file.as_path(),
            self.device_state.as_path(),
        ];
        files.extend(self.disks.iter().map(|d| d.file.as_path()));
        files.extend(self.kernel.as_deref());
        files.extend(self.initrd.as_deref());
        files
    }

    /// The files the VMM reads whole as it starts, before it loads the memory
    /// image or runs the guest (direct boot's kernel and initrd).
    pub fn boot_files(&self) -> Vec<&Path> {
        self.kernel
            .iter()
            .chain(&self.initrd)
            .map(PathBuf::as_path)
            .collect()
    }

    /// Checks ranges and consistency; the first problem found is the error.
    pub fn validate(&self) -> Result<(), VmConfigError> {
        let invalid = |field: &str, reason: String| VmConfigError::Invalid {
            field: field.to_owned(),
            reason,
        };
        let memory = self.memory.0;
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory) {
            return Err(invalid(
                "memory",
                format!(
                    "{memory} MiB is out of range: give {MIN_MEMORY_MIB} MiB to {} GiB, e.g. \"512M\" or \"2G\"",
                    MAX_MEMORY_MIB / 1024
                ),
            ));
        }
        if !(1..=MAX_CPUS).contains(&self.cpus) {
            return Err(invalid(
                "cpus",
                format!("{} is out of range: give 1 to {MAX_CPUS}", self.cpus),
            ));
        }
        check_parcel_path("memory_image", &self.memory_image)?;
        check_parcel_path("ram_file", &self.ram_file)?;
        check_parcel_path("device_state", &self.device_state)?;
        if self.memory_mode_setting == Some(MemoryMode::Lazy) && self.vmm != VmmKind::Qemu {
            return Err(invalid(
                "memory_mode",
                format!(
                    "\"lazy\" needs QEMU ({} saves whole memory images): set memory_mode = \"image\", or vmm = \"qemu\"",
                    self.vmm.as_str()
                ),
            ));
        }
        for (i, disk) in self.disks.iter().enumerate() {
            check_parcel_path(&format!("disk[{i}].file"), &disk.file)?;
        }
        if let Some(kernel) = &self.kernel {
            check_parcel_path("kernel", kernel)?;
        }
        if let Some(initrd) = &self.initrd {
            check_parcel_path("initrd", initrd)?;
        }
        if self.kernel.is_none() {
            if self.initrd.is_some() {
                return Err(invalid(
                    "initrd",
                    "needs `kernel`: add the kernel file, or remove initrd".into(),
                ));
            }
            if self.append.is_some() {
                return Err(invalid(
                    "append",
                    "needs `kernel`: add the kernel file, or remove append".into(),
                ));
            }
            if self.disks.is_empty() {
                return Err(invalid(
                    "disk",
                    "the VM has nothing to boot: add a [[disk]] table with a file, or a kernel"
                        .into(),
                ));
            }
        }
        let mut seen = HashSet::new();
        let memory_files = [
            ("memory_image", &self.memory_image),
            ("ram_file", &self.ram_file),
            ("device_state", &self.device_state),
        ];
        let disk_files = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, disk)| (format!("disk[{i}].file"), &disk.file));
        for (field, file) in memory_files
            .into_iter()
            .map(|(f, p)| (f.to_owned(), p))
            .chain(disk_files)
        {
            if !seen.insert(normalise(file)) {
                return Err(invalid(
                    &field,
                    format!(
                        "{} is already used by memory_image, ram_file, device_state or a disk: give each its own file",
                        file.display()
                    ),
                ));
            }
        }
        if self.append.as_deref().is_some_and(|a| a.contains('\n')) {
            return Err(invalid(
                "append",
                "the kernel command line must be one line".into(),
            ));
        }
        if let Some(i) = self.extra_args.iter().position(|a| a.is_empty()) {
            return Err(invalid(
                &format!("extra_args[{i}]"),
                "an empty argument: remove it".into(),
            ));
        }
        if !self.extra_args.is_empty() && self.vmm != VmmKind::Qemu {
            return Err(invalid(
                "extra_args",
                "only QEMU takes extra arguments: remove them, or set vmm = \"qemu\"".into(),
            ));
        }
        let mut host_ports = HashSet::new();
        for (i, nic) in self.nics.iter().enumerate() {
            for (j, forward) in nic.forward.iter().enumerate() {
                let field = format!("nic[{i}].forward[{j}]");
                if forward.host == 0 || forward.guest == 0 {
                    return Err(invalid(
                        &field,
                        "ports must be 1 to 65535 (`host` on 127.0.0.1, `guest` in the VM)".into(),
                    ));
                }
                if !host_ports.insert((forward.host, forward.protocol)) {
                    return Err(invalid(
                        &field,
                        format!(
                            "host port {} is forwarded twice: give each forward its own host port",
                            forward.host
                        ),
                    ));
                }
            }
        }
        let display = &self.display;
        if let Some(port) = display.vnc_port {
            if display.kind != DisplayKind::Vnc {
                return Err(invalid(
                    "display.vnc_port",
                    "only for type = \"vnc\": remove it, or set display.type = \"vnc\"".into(),
                ));
            }
            if port < 5900 {
                return Err(invalid(
                    "display.vnc_port",
                    format!("{port} is out of range: give 5900 to 65535, or leave it out"),
                ));
            }
        }
        if display.fullscreen && !matches!(display.kind, DisplayKind::Sdl | DisplayKind::Gtk) {
            return Err(invalid(
                "display.fullscreen",
                "needs a window: set display.type = \"sdl\" or \"gtk\", or remove fullscreen"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// "at line N: `the line`" for an error's span, so the message shows the field.
fn locate(text: &str, span: std::ops::Range<usize>) -> String {
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |at| at + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |at| start + at);
    let number = text[..line_start].matches('\n').count() + 1;
    let line = text[line_start..line_end].trim();
    if line.is_empty() || span.end > line_end + 1 {
        format!("(at line {number})")
    } else {
        format!("(at line {number}: `{line}`)")
    }
}

/// A parcel path must be relative, stay inside the parcel, and name a file.
fn check_parcel_path(field: &str, path: &Path) -> Result<(), VmConfigError> {
    let invalid = |reason: String| VmConfigError::Invalid {
        field: field.to_owned(),
        reason,
    };
    if path.as_os_str().is_empty() {
        return Err(invalid(
            "empty: name a file inside the parcel, e.g. \"disk.img\"".into(),
        ));
    }
    let mut normal = 0;
    for component in path.components() {
        match component {
            Component::Normal(_) => normal += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(invalid(format!(
                    "{} leaves the parcel (`..`): name a file inside the parcel, relative to its root",
                    path.display()
                )));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(invalid(format!(
                    "{} is absolute: name a file inside the parcel, relative to its root (e.g. \"disk.img\")",
                    path.display()
                )));
            }
        }
    }
    if normal == 0 || path.as_os_str().to_string_lossy().ends_with('/') {
        return Err(invalid(format!(
            "{} is not a file name: name a file inside the parcel, e.g. \"disk.img\"",
            path.display()
        )));
    }
    Ok(())
}

/// `./a//b` and `a/b` are the same parcel file.
/// `path` (a parcel path, checked by [`check_parcel_path`]) as the manifest
/// spells it: its names only, without `.` components.
pub fn normalise(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        VmConfig::parse(text).unwrap_err().to_string()
    }

    const TEST_GUEST: &str = r#"
vmm = "qemu"
memory = 256
kernel = "vmlinuz"
initrd = "initrd.img"
append = "console=ttyS0 quiet"
extra_args = ["-accel", "tcg"]

[[disk]]
file = "disk.img"
"#;

    #[test]
    fn the_test_guest_parses_with_defaults() {
        let config = VmConfig::parse(TEST_GUEST).unwrap();
        assert_eq!(config.vmm, VmmKind::Qemu);
        assert_eq!(config.memory_mib(), 256);
        assert_eq!(config.cpus, 1);
        assert_eq!(config.memory_image, Path::new("memory.img"));
        assert_eq!(config.kernel.as_deref(), Some(Path::new("vmlinuz")));
        assert_eq!(config.append.as_deref(), Some("console=ttyS0 quiet"));
        assert_eq!(config.extra_args, ["-accel", "tcg"]);
        assert_eq!(
            config.disks,
            [Disk {
                file: "disk.img".into(),
                interface: DiskInterface::Virtio,
                format: DiskFormat::Raw,
                read_only: false,
            }]
        );
        assert!(config.nics.is_empty());
        assert_eq!(config.display, Display::default());
        assert_eq!(config.display.kind, DisplayKind::None);
        assert_eq!(
            config.files(),
            [
                Path::new("memory.img"),
                Path::new("memory.ram"),
                Path::new("state.mig"),
                Path::new("disk.img"),
                Path::new("vmlinuz"),
                Path::new("initrd.img")
            ]
        );
        assert_eq!(config.memory_mode(), MemoryMode::Lazy, "QEMU's default");
        assert!(config.free_page_reporting);
    }

    #[test]
    fn memory_modes() {
        let parse = |vmm: &str, extra: &str| {
            VmConfig::parse(&format!(
                "vmm = \"{vmm}\"\nmemory = 64\n{extra}[[disk]]\nfile = \"disk.img\"\n"
            ))
        };
        assert_eq!(parse("qemu", "").unwrap().memory_mode(), MemoryMode::Lazy);
        let image = parse("qemu", "memory_mode = \"image\"\n").unwrap();
        assert_eq!(image.memory_mode(), MemoryMode::Image);
        for vmm in ["libvirt", "virtualbox"] {
            assert_eq!(parse(vmm, "").unwrap().memory_mode(), MemoryMode::Image);
            let error = parse(vmm, "memory_mode = \"lazy\"\n")
                .unwrap_err()
                .to_string();
            assert!(
                error.starts_with("vm.toml: memory_mode: \"lazy\" needs QEMU"),
                "{error}"
            );
        }
        let error = parse("qemu", "memory_mode = \"eager\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("memory_mode"), "{error}");
        let error = parse("qemu", "ram_file = \"disk.img\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("vm.toml: disk[0].file: disk.img is already used"),
            "{error}"
        );
        let error = parse("qemu", "device_state = \"/abs\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("vm.toml: device_state"), "{error}");
    }

    #[test]
    fn every_field_parses() {
        let config = VmConfig::parse(
            r#"
vmm = "libvirt"
memory = "2G"
cpus = 4
memory_image = "state/mem.img"

[[disk]]
file = "disks/system.img"
interface = "sata"
format = "raw"
read_only = false

[[disk]]
file = "./disks/data.img"
interface = "ide"
read_only = true

[[nic]]
mode = "user"
model = "e1000"
forward = [
  { host = 2222, guest = 22 },
  { host = 2222, guest = 53, protocol = "udp" },
]

[display]
type = "gtk"
fullscreen = true
"#,
        )
        .unwrap();
        assert_eq!(config.vmm, VmmKind::Libvirt);
        assert_eq!(config.memory_mib(), 2048);
        assert_eq!(config.cpus, 4);
        assert_eq!(config.memory_image, Path::new("state/mem.img"));
        assert_eq!(config.disks.len(), 2);
        assert_eq!(config.disks[0].interface, DiskInterface::Sata);
        assert_eq!(config.disks[1].interface, DiskInterface::Ide);
        assert!(config.disks[1].read_only);
        assert_eq!(
            config.nics,
            [Nic {
                mode: NicMode::User,
                model: NicModel::E1000,
                forward: vec![
                    Forward {
                        host: 2222,
                        guest: 22,
                        protocol: Protocol::Tcp
                    },
                    Forward {
                        host: 2222,
                        guest: 53,
                        protocol: Protocol::Udp
                    },
                ],
            }]
        );
        assert_eq!(
            config.display,
            Display {
                kind: DisplayKind::Gtk,
                vnc_port: None,
                fullscreen: true
            }
        );

        let vnc = VmConfig::parse(
            "vmm = \"virtualbox\"\nmemory = \"1024MiB\"\n[[disk]]\nfile = \"d.img\"\n\
             [display]\ntype = \"vnc\"\nvnc_port = 5901\n",
        )
        .unwrap();
        assert_eq!(vnc.vmm, VmmKind::Virtualbox);
        assert_eq!(vnc.memory_mib(), 1024);
        assert_eq!(vnc.display.vnc_port, Some(5901));
        let none =
            VmConfig::parse("vmm = \"none\"\nmemory = \"1GiB\"\n[[disk]]\nfile = \"d\"\n").unwrap();
        assert_eq!(none.vmm, VmmKind::None);
        assert_eq!(none.memory_mib(), 1024);
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512"), Ok(512));
        assert_eq!(parse_memory("512M"), Ok(512));
        assert_eq!(parse_memory("3GiB"), Ok(3072));
        for bad in [
            "",
            "M",
            "1.5G",
            "512K",
            "-1G",
            "1T",
            "99999999999999999999G",
        ] {
            assert!(parse_memory(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn load_reads_a_file_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(VM_CONFIG_FILE);
        std::fs::write(&path, TEST_GUEST).unwrap();
        assert_eq!(
            VmConfig::load(&path).unwrap(),
            VmConfig::parse(TEST_GUEST).unwrap()
        );
        let missing = VmConfig::load(&dir.path().join("nope.toml")).unwrap_err();
        assert!(missing.to_string().contains("nope.toml"), "{missing}");
        assert_eq!(missing.class(), ErrorClass::NotFound);
    }

    #[test]
    fn bad_files_are_one_line_errors_naming_the_field() {
        let disk = "\n[[disk]]\nfile = \"disk.img\"\n";
        let cases: &[(String, &str)] = &[
            // parse errors: type, enum value, unknown key, missing key
            (
                format!("vmm = \"qemu\"\nmemory = 512\ncpus = \"two\"{disk}"),
                "cpus",
            ),
            (format!("vmm = \"kvm\"\nmemory = 512{disk}"), "qemu"),
            (
                format!("vmm = \"qemu\"\nmemory = 512\nmemroy = 1{disk}"),
                "memroy",
            ),
            (format!("memory = 512{disk}"), "missing field `vmm`"),
            (
                "vmm = \"qemu\"\nmemory = 512\n[[disk]]\nread_only = true\n".into(),
                "missing field `file`",
            ),
            (format!("vmm = \"qemu\"{disk}"), "memory"),
            (
                format!("vmm = \"qemu\"\nmemory = \"lots\"{disk}"),
                "\"512M\"",
            ),
            (format!("vmm = \"qemu\"\nmemory = -5{disk}"), "positive"),
            (
                "vmm = \"qemu\"\nmemory = 512\n[[disk]]\nfile = \"d\"\nformat = \"qcow2\"\n".into(),
                "raw",
            ),
            (
                "vmm = \"qemu\"\nmemory = 512\n[[disk]]\nfile = \"d\"\nbus = \"ide\"\n".into(),
                "bus",
            ),
            (
                format!("vmm = \"qemu\"\nmemory = 512\n[[nic]]\nmode = \"tap\"{disk}"),
                "user",
            ),
            // validation
            (format!("vmm = \"qemu\"\nmemory = 8{disk}"), "memory: 8 MiB"),
            (
                format!("vmm = \"qemu\"\nmemory = \"2048G\"{disk}"),
                "memory:",
            ),
            (
                format!("vmm = \"qemu\"\nmemory = 512\ncpus = 0{disk}"),
                "cpus:",
            ),
            (
                format!("vmm = \"qemu\"\nmemory = 512\ncpus = 256{disk}"),
                "cpus:",
            ),
            (
                "vmm = \"qemu\"\nmemory = 512\n".into(),
                "disk: the VM has nothing to boot",
            ),
            (
                "vmm = \"qemu\"\nmemory = 512\n[[disk]]\nfile = \"/var/disk.img\"\n".into(),
                "disk[0].file: /var/disk.img is absolute",
            ),
            (
                "vmm = \"qemu\"\nmemory = 512\n[[disk]]\nfile = \"a/../../disk.img\"\n".into(),
                "disk[0].file: a/../../disk.img leaves the parcel",
            ),
            (
                "vmm = \"qemu\"\nmemory = 512\n[[disk]]\nfile = \"\"\n".into(),
                "disk[0].file: empty",
            ),
            (
                "vmm = \"qemu\"\nmemory = 512\n[[disk]]\nfile = \"./\"\n".into(),
                "disk[0].file: ./ is not a file name",
            ),
            (
                "vmm = \"qemu\"\nmemory = 512\n[[disk]]\nfile = \"d\"\n[[disk]]\nfile = \"./d\"\n"
                    .into(),
                "disk[1].file: ./d is already used",
            ),
            (
                format!("vmm = \"qemu\"\nmemory = 512\nmemory_image = \"disk.img\"{disk}"),
                "disk[0].file: disk.img is already used",
            ),
            (
                format!("vmm = \"qemu\"\nmemory = 512\nmemory_image = \"../m\"{disk}"),
                "memory_image: ../m leaves the parcel",
            ),
            (
                "vmm = \"qemu\"\nmemory = 512\nkernel = \"/boot/vmlinuz\"\n".into(),
                "kernel: /boot/vmlinuz is absolute",
            ),
            (
                format!("vmm = \"qemu\"\nmemory = 512\ninitrd = \"i\"{disk}"),
                "initrd: needs `kernel`",
            ),
            (
                format!("vmm = \"qemu\"\nmemory = 512\nappend = \"quiet\"{disk}"),
                "append: needs `kernel`",
            ),
            (
                format!("vmm = \"none\"\nmemory = 512\nextra_args = [\"-s\"]{disk}"),
                "extra_args: only QEMU",
            ),
            (
                format!("vmm = \"qemu\"\nmemory = 512\nextra_args = [\"\"]{disk}"),
                "extra_args[0]:",
            ),
            (
                format!(
                    "vmm = \"qemu\"\nmemory = 512{disk}[[nic]]\nmode = \"user\"\n\
                     forward = [{{ host = 0, guest = 22 }}]\n"
                ),
                "nic[0].forward[0]: ports must be",
            ),
            (
                format!(
                    "vmm = \"qemu\"\nmemory = 512{disk}[[nic]]\nmode = \"user\"\n\
                     forward = [{{ host = 80, guest = 22 }}]\n[[nic]]\nmode = \"user\"\n\
                     forward = [{{ host = 80, guest = 80 }}]\n"
                ),
                "nic[1].forward[0]: host port 80 is forwarded twice",
            ),
            (
                format!("vmm = \"qemu\"\nmemory = 512{disk}[display]\nvnc_port = 5901\n"),
                "display.vnc_port: only for type = \"vnc\"",
            ),
            (
                format!(
                    "vmm = \"qemu\"\nmemory = 512{disk}[display]\ntype = \"vnc\"\nvnc_port = 22\n"
                ),
                "display.vnc_port: 22 is out of range",
            ),
            (
                format!(
                    "vmm = \"qemu\"\nmemory = 512{disk}[display]\ntype = \"vnc\"\nfullscreen = true\n"
                ),
                "display.fullscreen: needs a window",
            ),
            (
                format!("vmm = \"qemu\"\nmemory = 512{disk}[display]\ntype = \"spice\"\n"),
                "vnc",
            ),
        ];
        for (text, expected) in cases {
            let message = err(text);
            assert!(
                message.contains(expected),
                "{text:?}: expected {expected:?} in {message:?}"
            );
            assert!(!message.contains('\n'), "one line: {message:?}");
            assert!(message.starts_with("vm.toml: "), "{message:?}");
        }
    }

    #[test]
    fn errors_are_invalid_requests() {
        let e = VmConfig::parse("vmm = \"qemu\"\nmemory = 512\n").unwrap_err();
        assert_eq!(e.class(), ErrorClass::Invalid);
    }
}
