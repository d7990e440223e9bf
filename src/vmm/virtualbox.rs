//! VirtualBox: the parcel's VM registered from, and saved into, the mount.
//!
//! VirtualBox cannot open a raw image by itself, but it opens a VMDK
//! `monolithicFlat` *descriptor*: a small text file naming the raw file as its one
//! flat extent. [`vmdk_descriptor`] writes that text; the caller stores it in the
//! mount beside the raw disk, under [`descriptor_name`]. [`vboxmanage_steps`]
//! lists the `VBoxManage` commands that create (or re-register) and start the VM
//! with its machine folder *inside the parcel* (`MOUNT/NAME/NAME.vbox`, saved
//! state in `MOUNT/NAME/Snapshots/`), so a suspended VM travels with the parcel;
//! [`vboxmanage_suspend_steps`] saves its state and unregisters it.
//!
//! [`VirtualboxAdapter`], the [`Vmm`] that [`super::supervise`] runs, writes the
//! descriptors ([`write_descriptors`]) and runs the steps when `VBoxManage` is
//! installed (through [`super::steps`]), or hands them over to be printed.
//!
//! VirtualBox is not installed on the machines this was written on and cannot be
//! (it needs its own kernel modules): the descriptors and steps are pure
//! functions checked by unit tests against VirtualBox's documented formats and
//! commands, not against a running VirtualBox.
//!
//! Limits, each a [`VboxError`] or documented where it applies:
//! - no direct kernel boot: a `kernel` in `vm.toml` is an error;
//! - no virtio-blk in VirtualBox: `virtio` disks go on the SATA (AHCI) controller;
//! - a `read_only` disk is attached `immutable` (guest writes go to a differencing
//!   image VirtualBox discards at power-off, never to the parcel's file);
//! - VirtualBox records the descriptors' absolute paths in the `.vbox`, so a saved
//!   VM must be resumed with the parcel mounted at the same path;
//! - the saved state is VirtualBox's `.sav` file in the machine folder, not
//!   `memory_image`, which VirtualBox leaves alone.

use std::path::{Path, PathBuf};

use super::config::{DiskInterface, DisplayKind, NicModel, Protocol, VmConfig};
use super::steps::{handed, run_or_hand, run_steps};
use super::{
    AdapterStatus, Ended, ParcelVm, SavedForm, SavedState, Started, VmError, Vmm, io_error,
};
use crate::error::{Classify, ErrorClass};

/// The program.
pub const VBOXMANAGE: &str = "VBoxManage";

/// Bytes per VMDK sector.
pub const SECTOR_SIZE: u64 = 512;

/// Most SATA ports of VirtualBox's AHCI controller.
pub const MAX_SATA_DISKS: usize = 30;
/// IDE: primary and secondary channel, master and slave.
pub const MAX_IDE_DISKS: usize = 4;
/// Network adapters `VBoxManage modifyvm` configures (`--nic1` to `--nic8`).
pub const MAX_NICS: usize = 8;

/// The largest cylinder count of a BIOS (ATA) geometry.
const MAX_CYLINDERS: u64 = 16383;
/// Heads of the geometry for an IDE adapter (VirtualBox and QEMU).
const HEADS: u64 = 16;
/// Sectors per track.
const SECTORS_PER_TRACK: u64 = 63;

/// Why a VM cannot be described to VirtualBox.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VboxError {
    /// `vm.toml` asks for something VirtualBox cannot do.
    #[error("vm.toml: {field}: {reason}")]
    Unsupported {
        /// The field.
        field: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A name VirtualBox's files cannot hold.
    #[error("{what} {name:?}: {reason}")]
    BadName {
        /// What the name is of.
        what: &'static str,
        /// The name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
}

impl Classify for VboxError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Invalid
    }
}

/// The BIOS geometry (cylinders, heads, sectors per track) VirtualBox gives an
/// IDE disk of `sectors` 512-byte sectors: 16 heads, 63 sectors, and as many
/// whole cylinders as fit, at most 16383.
pub fn geometry(sectors: u64) -> (u64, u64, u64) {
    let cylinders = (sectors / (HEADS * SECTORS_PER_TRACK)).min(MAX_CYLINDERS);
    (cylinders, HEADS, SECTORS_PER_TRACK)
}

/// The text of a VMDK `monolithicFlat` descriptor whose one extent is the raw file
/// `raw_disk_file_name` (a bare file name: the descriptor lies beside it) of
/// `size_bytes` bytes, with content ID `cid`.
///
/// The extent is `ceil(size_bytes / 512)` sectors: a raw disk is normally a whole
/// number of sectors; a partial last sector is counted whole, as QEMU does. The
/// adapter type is `ide` (VirtualBox takes the bus from the controller the disk is
/// attached to; the geometry is the IDE one).
pub fn vmdk_descriptor(
    raw_disk_file_name: &str,
    size_bytes: u64,
    cid: u32,
) -> Result<String, VboxError> {
    check_name("disk file", raw_disk_file_name)?;
    let sectors = size_bytes.div_ceil(SECTOR_SIZE);
    let (cylinders, heads, per_track) = geometry(sectors);
    Ok(format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         CID={cid:08x}\n\
         parentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\
         \n\
         # Extent description\n\
         RW {sectors} FLAT \"{raw_disk_file_name}\" 0\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.virtualHWVersion = \"4\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"{heads}\"\n\
         ddb.geometry.sectors = \"{per_track}\"\n\
         ddb.adapterType = \"ide\"\n"
    ))
}

/// The descriptor for a parcel disk, relative to the parcel's root: beside it,
/// its extension replaced by `.vmdk` (`disks/disk.img` → `disks/disk.vmdk`;
/// a raw file already named `*.vmdk` gets `.vmdk` appended).
pub fn descriptor_name(disk_file: &Path) -> PathBuf {
    if disk_file.extension().is_some_and(|e| e == "vmdk") {
        let mut name = disk_file.as_os_str().to_owned();
        name.push(".vmdk");
        PathBuf::from(name)
    } else {
        disk_file.with_extension("vmdk")
    }
}

/// The VM's settings file in the mount: `MOUNT/NAME/NAME.vbox`. It exists after a
/// suspend, and then resume passes `resume_saved_state` to [`vboxmanage_steps`].
pub fn settings_file(mount: &Path, name: &str) -> PathBuf {
    mount.join(name).join(format!("{name}.vbox"))
}

/// A name that goes into a VMDK extent line or a VirtualBox file name.
fn check_name(what: &'static str, name: &str) -> Result<(), VboxError> {
    let bad = |reason| {
        Err(VboxError::BadName {
            what,
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name == "." || name == ".." {
        return bad("not a file name");
    }
    if name.contains('/') {
        return bad("must not contain '/'");
    }
    if name.contains('"') || name.chars().any(char::is_control) {
        return bad("must not contain '\"' or control characters");
    }
    Ok(())
}

fn command(args: &[&str]) -> Vec<String> {
    std::iter::once(VBOXMANAGE)
        .chain(args.iter().copied())
        .map(str::to_owned)
        .collect()
}

/// The `VBoxManage` command lines (each a program and its arguments) that bring up
/// the VM `name` from the parcel mounted at `mount`. The caller has written each
/// disk's descriptor ([`vmdk_descriptor`]) to `mount/`[`descriptor_name`] first.
///
/// Fresh (`resume_saved_state` false):
/// 1. `createvm --name NAME --ostype Other_64 --basefolder MOUNT --register`;
/// 2. `modifyvm`: memory, CPUs, ACPI and I/O APIC, boot from disk, NICs (NAT,
///    `virtio` or `82540EM`; `--nic1 none` when there are none), VRDE;
/// 3. `modifyvm --natpfN NAME,PROTO,127.0.0.1,HOST,,GUEST`, one per forward;
/// 4. `setextradata NAME GUI/Fullscreen true` when full screen is asked;
/// 5. `storagectl` for SATA (`IntelAhci`) and/or IDE (`PIIX4`), the host I/O cache
///    on (FUSE files may refuse the `O_DIRECT` VirtualBox uses otherwise), only the
///    first disk's controller bootable;
/// 6. `storageattach` of each descriptor as an `hdd` (`--mtype immutable` when
///    read-only);
///
/// Saved (`resume_saved_state` true): `registervm MOUNT/NAME/NAME.vbox`, which
/// carries all of the above and the saved state.
///
/// Then `startvm NAME --type T`: `headless` for none and VNC (VNC is VirtualBox's
/// VRDE server with the `VNC` extension pack, on 127.0.0.1, the configured port or
/// one of 5900–5999), `sdl` for SDL, `gui` for GTK and for any full-screen display
/// (only the GUI front end honours `GUI/Fullscreen`).
pub fn vboxmanage_steps(
    config: &VmConfig,
    name: &str,
    mount: &Path,
    resume_saved_state: bool,
) -> Result<Vec<Vec<String>>, VboxError> {
    check_name("VM name", name)?;
    let unsupported = |field: &str, reason: &str| VboxError::Unsupported {
        field: field.to_owned(),
        reason: reason.to_owned(),
    };
    if config.kernel.is_some() {
        return Err(unsupported(
            "kernel",
            "VirtualBox cannot boot a kernel directly: install a bootloader on the first disk and remove kernel, initrd and append",
        ));
    }
    if config.nics.len() > MAX_NICS {
        return Err(unsupported(
            "nic",
            "VirtualBox takes at most 8 network cards: remove some [[nic]] tables",
        ));
    }
    let ide = config
        .disks
        .iter()
        .filter(|d| d.interface == DiskInterface::Ide)
        .count();
    if ide > MAX_IDE_DISKS {
        return Err(unsupported(
            "disk",
            "VirtualBox's IDE controller takes at most 4 disks: set interface = \"sata\" on the others",
        ));
    }
    if config.disks.len() - ide > MAX_SATA_DISKS {
        return Err(unsupported(
            "disk",
            "VirtualBox's SATA controller takes at most 30 disks (virtio disks are attached to it too)",
        ));
    }
    let mut descriptors = Vec::with_capacity(config.disks.len());
    for (i, disk) in config.disks.iter().enumerate() {
        let descriptor = descriptor_name(&disk.file);
        let raw = disk
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        check_name("disk file", &raw)?;
        let same = |p: &Path| {
            p.components()
                .filter(|c| matches!(c, std::path::Component::Normal(_)))
                .eq(descriptor
                    .components()
                    .filter(|c| matches!(c, std::path::Component::Normal(_))))
        };
        if config.files().into_iter().any(same) || descriptors.iter().any(|d: &PathBuf| same(d)) {
            return Err(unsupported(
                &format!("disk[{i}].file"),
                &format!(
                    "its VMDK descriptor {} would be another file of the parcel: rename the disk",
                    descriptor.display()
                ),
            ));
        }
        descriptors.push(descriptor);
    }

    let display = config.display;
    let start_type = match display.kind {
        _ if display.fullscreen => "gui",
        DisplayKind::None | DisplayKind::Vnc => "headless",
        DisplayKind::Sdl => "sdl",
        DisplayKind::Gtk => "gui",
    };
    let mut steps = Vec::new();
    if resume_saved_state {
        steps.push(command(&[
            "registervm",
            &settings_file(mount, name).to_string_lossy(),
        ]));
        steps.push(command(&["startvm", name, "--type", start_type]));
        return Ok(steps);
    }

    steps.push(command(&[
        "createvm",
        "--name",
        name,
        "--ostype",
        "Other_64",
        "--basefolder",
        &mount.to_string_lossy(),
        "--register",
    ]));

    let mut modify: Vec<String> = [
        "modifyvm",
        name,
        "--memory",
        &config.memory_mib().to_string(),
        "--cpus",
        &config.cpus.to_string(),
        "--acpi",
        "on",
        "--ioapic",
        "on",
        "--boot1",
        "disk",
        "--boot2",
        "none",
        "--boot3",
        "none",
        "--boot4",
        "none",
    ]
    .map(str::to_owned)
    .into();
    if config.nics.is_empty() {
        modify.extend(["--nic1", "none"].map(str::to_owned));
    }
    for (i, nic) in config.nics.iter().enumerate() {
        let n = i + 1;
        let model = match nic.model {
            NicModel::Virtio => "virtio",
            NicModel::E1000 => "82540EM",
        };
        modify.extend([
            format!("--nic{n}"),
            "nat".into(),
            format!("--nictype{n}"),
            model.into(),
            format!("--cableconnected{n}"),
            "on".into(),
        ]);
    }
    if display.kind == DisplayKind::Vnc {
        let port = display
            .vnc_port
            .map_or_else(|| "5900-5999".to_owned(), |p| p.to_string());
        modify.extend(
            [
                "--vrde",
                "on",
                "--vrdeextpack",
                "VNC",
                "--vrdeaddress",
                "127.0.0.1",
                "--vrdeport",
                &port,
            ]
            .map(str::to_owned),
        );
    } else {
        modify.extend(["--vrde", "off"].map(str::to_owned));
    }
    steps.push(
        std::iter::once(VBOXMANAGE.to_owned())
            .chain(modify)
            .collect(),
    );

    for (i, nic) in config.nics.iter().enumerate() {
        for forward in &nic.forward {
            let proto = match forward.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            };
            let rule = format!(
                "isr-{proto}-{host},{proto},127.0.0.1,{host},,{guest}",
                host = forward.host,
                guest = forward.guest
            );
            steps.push(command(&[
                "modifyvm",
                name,
                &format!("--natpf{}", i + 1),
                &rule,
            ]));
        }
    }
    if display.fullscreen {
        steps.push(command(&["setextradata", name, "GUI/Fullscreen", "true"]));
    }

    let on_sata = |i: &DiskInterface| *i != DiskInterface::Ide;
    let boot_on_sata = config.disks.first().is_some_and(|d| on_sata(&d.interface));
    let sata = config.disks.len() - ide;
    let bootable = |yes: bool| if yes { "on" } else { "off" };
    if sata > 0 {
        steps.push(command(&[
            "storagectl",
            name,
            "--name",
            "SATA",
            "--add",
            "sata",
            "--controller",
            "IntelAhci",
            "--portcount",
            &sata.to_string(),
            "--hostiocache",
            "on",
            "--bootable",
            bootable(boot_on_sata),
        ]));
    }
    if ide > 0 {
        steps.push(command(&[
            "storagectl",
            name,
            "--name",
            "IDE",
            "--add",
            "ide",
            "--controller",
            "PIIX4",
            "--hostiocache",
            "on",
            "--bootable",
            bootable(!boot_on_sata),
        ]));
    }
    let (mut sata_port, mut ide_slot) = (0usize, 0usize);
    for (disk, descriptor) in config.disks.iter().zip(&descriptors) {
        let (controller, port, device) = if on_sata(&disk.interface) {
            sata_port += 1;
            ("SATA", sata_port - 1, 0)
        } else {
            ide_slot += 1;
            ("IDE", (ide_slot - 1) / 2, (ide_slot - 1) % 2)
        };
        let mut attach = command(&[
            "storageattach",
            name,
            "--storagectl",
            controller,
            "--port",
            &port.to_string(),
            "--device",
            &device.to_string(),
            "--type",
            "hdd",
            "--medium",
            &mount.join(descriptor).to_string_lossy(),
        ]);
        if disk.read_only {
            attach.extend(["--mtype", "immutable"].map(str::to_owned));
        }
        steps.push(attach);
    }
    steps.push(command(&["startvm", name, "--type", start_type]));
    Ok(steps)
}

/// The `VBoxManage` command lines that suspend the VM `name`: save its state into
/// its machine folder in the parcel (`controlvm NAME savestate`), then forget it
/// on this host (`unregistervm NAME`, without `--delete`: the `.vbox`, the saved
/// state and the disks stay in the parcel).
pub fn vboxmanage_suspend_steps(name: &str) -> Vec<Vec<String>> {
    vec![
        command(&["controlvm", name, "savestate"]),
        command(&["unregistervm", name]),
    ]
}

/// The `VBoxManage` command lines that stop the VM `name` at once, without
/// saving it (`controlvm NAME poweroff`), and forget it on this host.
pub fn vboxmanage_poweroff_steps(name: &str) -> Vec<Vec<String>> {
    vec![
        command(&["controlvm", name, "poweroff"]),
        command(&["unregistervm", name]),
    ]
}

/// Writes the VMDK descriptor of each of the VM's raw disks into the mount,
/// beside the disk ([`descriptor_name`]), unless it is there already with the
/// same text. The content ID is derived from the disk's path in the parcel.
pub fn write_descriptors(config: &VmConfig, mount: &Path) -> Result<(), VmError> {
    for disk in &config.disks {
        let raw = mount.join(&disk.file);
        let size = std::fs::metadata(&raw)
            .map_err(io_error(format!("reading the size of {}", raw.display())))?
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
        let text = vmdk_descriptor(&file_name, size, cid)?;
        let descriptor = mount.join(descriptor_name(&disk.file));
        if std::fs::read_to_string(&descriptor).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&descriptor, text).map_err(io_error(format!(
                "writing the VMDK descriptor {}",
                descriptor.display()
            )))?;
        }
    }
    Ok(())
}

/// The VirtualBox [`Vmm`]: descriptors written into the mount, then the
/// `VBoxManage` steps run when it is installed, else handed over. A saved VM
/// is its machine folder in the parcel ([`settings_file`]).
#[derive(Debug)]
pub struct VirtualboxAdapter {
    vm: ParcelVm,
    steps: Vec<Vec<String>>,
    /// Started by running `VBoxManage` (not handed over).
    executed: bool,
    /// Believed to run: started, not saved or killed.
    running: bool,
}

impl VirtualboxAdapter {
    /// For `vm`.
    pub fn new(vm: &ParcelVm) -> VirtualboxAdapter {
        VirtualboxAdapter {
            vm: vm.clone(),
            steps: Vec::new(),
            executed: false,
            running: false,
        }
    }

    fn start(&mut self, saved: bool) -> Result<Started, VmError> {
        write_descriptors(&self.vm.config, &self.vm.mount)?;
        self.steps = vboxmanage_steps(&self.vm.config, &self.vm.parcel, &self.vm.mount, saved)?;
        let started = run_or_hand(VBOXMANAGE, &self.steps)?;
        self.executed = started == Started::Running;
        self.running = self.executed;
        Ok(started)
    }
}

impl Vmm for VirtualboxAdapter {
    /// The VM's settings file in the mount, left by a suspend. A resume
    /// consumes the parcel's memory image (`vm.toml`'s `memory_image`, which
    /// VirtualBox does not write), as every resume did before the adapters
    /// were split: VirtualBox discards its own saved state itself.
    fn saved_state(&self) -> Option<SavedState> {
        let settings = settings_file(&self.vm.mount, &self.vm.parcel);
        settings.exists().then(|| SavedState {
            path: settings,
            consumes: vec![self.vm.memory_image()],
            form: SavedForm::MemoryImage,
        })
    }

    fn boot(&mut self) -> Result<Started, VmError> {
        self.start(false)
    }

    fn resume(&mut self, _saved: &SavedState) -> Result<Started, VmError> {
        self.start(true)
    }

    fn suspend(&mut self) -> Result<(), VmError> {
        let steps = vboxmanage_suspend_steps(&self.vm.parcel);
        if !self.executed {
            return Err(handed(&steps));
        }
        self.steps = steps;
        run_steps(&self.steps)?;
        self.running = false;
        Ok(())
    }

    /// Not watched: VirtualBox runs the VM on its own.
    fn ended(&mut self) -> Option<Ended> {
        None
    }

    fn kill(&mut self) {
        if self.running
            && let Err(e) = run_steps(&vboxmanage_poweroff_steps(&self.vm.parcel))
        {
            tracing::warn!(parcel = %self.vm.parcel, error = %e, "stopping the VM failed");
        }
        self.running = false;
    }

    fn status(&self) -> AdapterStatus {
        AdapterStatus {
            steps: self.steps.clone(),
            ..AdapterStatus::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const GIB: u64 = 1 << 30;

    /// Parses a descriptor back: `key=value` lines (values unquoted), and extents.
    fn parse(text: &str) -> (HashMap<String, String>, Vec<String>) {
        let mut keys = HashMap::new();
        let mut extents = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with("RW ") {
                extents.push(line.to_owned());
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not key=value: {line:?}"));
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            assert!(
                keys.insert(key.trim().to_owned(), value.to_owned())
                    .is_none(),
                "{key} twice"
            );
        }
        (keys, extents)
    }

    fn number(keys: &HashMap<String, String>, key: &str) -> u64 {
        keys[key].parse().unwrap()
    }

    #[test]
    fn descriptor_for_one_gib() {
        let text = vmdk_descriptor("disk.img", GIB, 0x1234abcd).unwrap();
        assert!(text.starts_with("# Disk DescriptorFile\n"));
        let (keys, extents) = parse(&text);
        assert_eq!(keys["version"], "1");
        assert_eq!(keys["CID"], "1234abcd");
        assert_eq!(keys["parentCID"], "ffffffff");
        assert_eq!(keys["createType"], "monolithicFlat");
        assert_eq!(keys["ddb.adapterType"], "ide");
        assert_eq!(keys["ddb.virtualHWVersion"], "4");
        assert_eq!(extents, ["RW 2097152 FLAT \"disk.img\" 0"]);
        assert_eq!(number(&keys, "ddb.geometry.cylinders"), 2080);
        assert_eq!(number(&keys, "ddb.geometry.heads"), 16);
        assert_eq!(number(&keys, "ddb.geometry.sectors"), 63);
        // The geometry never claims more than the disk holds.
        let (c, h, s) = geometry(2097152);
        assert!(c * h * s <= 2097152);
    }

    #[test]
    fn descriptor_for_ten_gib_and_an_odd_size() {
        let size = 10 * GIB + 12345;
        let text = vmdk_descriptor("big disk.raw", size, 7).unwrap();
        let (keys, extents) = parse(&text);
        assert_eq!(keys["CID"], "00000007");
        // 10 GiB is 20971520 sectors; 12345 more bytes are 24.1 sectors: 25 more.
        assert_eq!(extents, ["RW 20971545 FLAT \"big disk.raw\" 0"]);
        assert_eq!(20971545 * 512 - size, 455);
        // 20971545 / (16 * 63) = 20805, more than the BIOS limit.
        assert_eq!(number(&keys, "ddb.geometry.cylinders"), 16383);
        assert_eq!(number(&keys, "ddb.geometry.heads"), 16);
        assert_eq!(number(&keys, "ddb.geometry.sectors"), 63);

        let exact = vmdk_descriptor("d", 10 * GIB, 0).unwrap();
        assert!(exact.contains("RW 20971520 FLAT \"d\" 0\n"));
        let tiny = vmdk_descriptor("d", 512 * 100, 0).unwrap();
        assert_eq!(number(&parse(&tiny).0, "ddb.geometry.cylinders"), 0);
    }

    #[test]
    fn descriptors_refuse_names_they_cannot_hold() {
        for bad in ["", ".", "..", "a/b", "a\"b", "a\nb"] {
            assert!(
                matches!(vmdk_descriptor(bad, GIB, 0), Err(VboxError::BadName { .. })),
                "{bad:?}"
            );
        }
        let e = vmdk_descriptor("a\"b", GIB, 0).unwrap_err();
        assert_eq!(e.class(), ErrorClass::Invalid);
        assert!(e.to_string().contains("disk file"), "{e}");
    }

    #[test]
    fn descriptor_names() {
        assert_eq!(
            descriptor_name(Path::new("disk.img")),
            Path::new("disk.vmdk")
        );
        assert_eq!(
            descriptor_name(Path::new("disks/system.raw")),
            Path::new("disks/system.vmdk")
        );
        assert_eq!(descriptor_name(Path::new("disk")), Path::new("disk.vmdk"));
        assert_eq!(
            descriptor_name(Path::new("disk.vmdk")),
            Path::new("disk.vmdk.vmdk")
        );
    }

    fn config(text: &str) -> VmConfig {
        VmConfig::parse(text).unwrap()
    }

    const TWO_DISKS: &str = r#"
vmm = "virtualbox"
memory = "1G"
cpus = 2
[[disk]]
file = "disks/system.img"
[[disk]]
file = "data.img"
interface = "ide"
read_only = true
[[nic]]
mode = "user"
forward = [{ host = 2222, guest = 22 }, { host = 5353, guest = 53, protocol = "udp" }]
[[nic]]
mode = "user"
model = "e1000"
[display]
type = "vnc"
vnc_port = 5901
"#;

    fn s(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn fresh_steps_register_configure_attach_and_start() {
        let steps = vboxmanage_steps(
            &config(TWO_DISKS),
            "guest",
            Path::new("/mnt/isr/guest"),
            false,
        )
        .unwrap();
        assert!(steps.iter().all(|s| s[0] == "VBoxManage"));
        assert_eq!(
            steps[0],
            s(&[
                "VBoxManage",
                "createvm",
                "--name",
                "guest",
                "--ostype",
                "Other_64",
                "--basefolder",
                "/mnt/isr/guest",
                "--register"
            ])
        );
        let modify = steps[1].join(" ");
        assert!(modify.starts_with("VBoxManage modifyvm guest --memory 1024 --cpus 2 "));
        assert!(modify.contains(" --boot1 disk "));
        assert!(modify.contains(" --nic1 nat --nictype1 virtio --cableconnected1 on"));
        assert!(modify.contains(" --nic2 nat --nictype2 82540EM --cableconnected2 on"));
        assert!(!modify.contains("--nic1 none"));
        assert!(
            modify
                .ends_with(" --vrde on --vrdeextpack VNC --vrdeaddress 127.0.0.1 --vrdeport 5901")
        );
        assert_eq!(
            steps[2],
            s(&[
                "VBoxManage",
                "modifyvm",
                "guest",
                "--natpf1",
                "isr-tcp-2222,tcp,127.0.0.1,2222,,22"
            ])
        );
        assert_eq!(
            steps[3],
            s(&[
                "VBoxManage",
                "modifyvm",
                "guest",
                "--natpf1",
                "isr-udp-5353,udp,127.0.0.1,5353,,53"
            ])
        );
        assert_eq!(
            steps[4].join(" "),
            "VBoxManage storagectl guest --name SATA --add sata --controller IntelAhci \
             --portcount 1 --hostiocache on --bootable on"
        );
        assert_eq!(
            steps[5].join(" "),
            "VBoxManage storagectl guest --name IDE --add ide --controller PIIX4 \
             --hostiocache on --bootable off"
        );
        assert_eq!(
            steps[6],
            s(&[
                "VBoxManage",
                "storageattach",
                "guest",
                "--storagectl",
                "SATA",
                "--port",
                "0",
                "--device",
                "0",
                "--type",
                "hdd",
                "--medium",
                "/mnt/isr/guest/disks/system.vmdk"
            ])
        );
        assert_eq!(
            steps[7].join(" "),
            "VBoxManage storageattach guest --storagectl IDE --port 0 --device 0 \
             --type hdd --medium /mnt/isr/guest/data.vmdk --mtype immutable"
        );
        assert_eq!(
            steps[8],
            s(&["VBoxManage", "startvm", "guest", "--type", "headless"])
        );
        assert_eq!(steps.len(), 9);
    }

    #[test]
    fn saved_steps_register_the_parcels_settings_and_start() {
        let steps = vboxmanage_steps(
            &config(TWO_DISKS),
            "guest",
            Path::new("/mnt/isr/guest"),
            true,
        )
        .unwrap();
        assert_eq!(
            steps,
            [
                s(&[
                    "VBoxManage",
                    "registervm",
                    "/mnt/isr/guest/guest/guest.vbox"
                ]),
                s(&["VBoxManage", "startvm", "guest", "--type", "headless"]),
            ]
        );
        assert_eq!(
            settings_file(Path::new("/m"), "vm"),
            Path::new("/m/vm/vm.vbox")
        );
    }

    #[test]
    fn suspend_saves_state_then_unregisters_keeping_files() {
        assert_eq!(
            vboxmanage_suspend_steps("guest"),
            [
                s(&["VBoxManage", "controlvm", "guest", "savestate"]),
                s(&["VBoxManage", "unregistervm", "guest"]),
            ]
        );
    }

    fn minimal(extra: &str) -> VmConfig {
        config(&format!(
            "vmm = \"virtualbox\"\nmemory = 512\n[[disk]]\nfile = \"d.img\"\n{extra}"
        ))
    }

    #[test]
    fn no_nics_means_no_network_and_displays_pick_the_front_end() {
        let steps = vboxmanage_steps(&minimal(""), "n", Path::new("/p"), false).unwrap();
        let modify = steps[1].join(" ");
        assert!(modify.contains(" --nic1 none"), "{modify}");
        assert!(!modify.contains("nat"), "{modify}");
        assert!(modify.ends_with(" --vrde off"));
        assert!(
            !steps
                .iter()
                .any(|s| s.iter().any(|a| a.starts_with("--natpf")))
        );
        assert_eq!(
            steps.last().unwrap().join(" "),
            "VBoxManage startvm n --type headless"
        );
        // One virtio disk: SATA, bootable; no IDE controller.
        assert!(steps.iter().any(|s| s.join(" ").contains("--name SATA")));
        assert!(!steps.iter().any(|s| s.join(" ").contains("--name IDE")));

        let start = |display: &str| {
            let steps = vboxmanage_steps(&minimal(display), "n", Path::new("/p"), false).unwrap();
            let fullscreen = steps.iter().any(|s| {
                s == &s_vec(&["VBoxManage", "setextradata", "n", "GUI/Fullscreen", "true"])
            });
            (steps.last().unwrap()[4].clone(), fullscreen)
        };
        fn s_vec(args: &[&str]) -> Vec<String> {
            args.iter().map(|a| a.to_string()).collect()
        }
        assert_eq!(start("[display]\ntype = \"sdl\"\n"), ("sdl".into(), false));
        assert_eq!(start("[display]\ntype = \"gtk\"\n"), ("gui".into(), false));
        assert_eq!(
            start("[display]\ntype = \"sdl\"\nfullscreen = true\n"),
            ("gui".into(), true)
        );
        assert_eq!(
            start("[display]\ntype = \"gtk\"\nfullscreen = true\n"),
            ("gui".into(), true)
        );
        let vnc = vboxmanage_steps(
            &minimal("[display]\ntype = \"vnc\"\n"),
            "n",
            Path::new("/p"),
            false,
        )
        .unwrap();
        assert!(
            vnc[1]
                .join(" ")
                .ends_with("--vrdeaddress 127.0.0.1 --vrdeport 5900-5999")
        );
        assert_eq!(vnc.last().unwrap()[4], "headless");
    }

    #[test]
    fn ide_slots_and_the_boot_controller() {
        let cfg = config(
            r#"
vmm = "virtualbox"
memory = 512
[[disk]]
file = "a.img"
interface = "ide"
[[disk]]
file = "b.img"
interface = "ide"
[[disk]]
file = "c.img"
interface = "ide"
[[disk]]
file = "d.img"
interface = "sata"
"#,
        );
        let steps = vboxmanage_steps(&cfg, "n", Path::new("/p"), false).unwrap();
        let lines: Vec<String> = steps.iter().map(|s| s.join(" ")).collect();
        assert!(
            lines
                .iter()
                .any(|l| l.contains("--name IDE") && l.ends_with("--bootable on"))
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("--name SATA") && l.ends_with("--bootable off"))
        );
        let attach: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("storageattach"))
            .collect();
        assert!(
            attach[0].contains("--storagectl IDE --port 0 --device 0 ")
                && attach[0].contains("/p/a.vmdk")
        );
        assert!(
            attach[1].contains("--storagectl IDE --port 0 --device 1 ")
                && attach[1].contains("/p/b.vmdk")
        );
        assert!(
            attach[2].contains("--storagectl IDE --port 1 --device 0 ")
                && attach[2].contains("/p/c.vmdk")
        );
        assert!(
            attach[3].contains("--storagectl SATA --port 0 --device 0 ")
                && attach[3].contains("/p/d.vmdk")
        );
    }

    #[test]
    fn what_virtualbox_cannot_do_is_an_error() {
        let kernel = config(
            "vmm = \"virtualbox\"\nmemory = 512\nkernel = \"vmlinuz\"\n[[disk]]\nfile = \"d\"\n",
        );
        let e = vboxmanage_steps(&kernel, "n", Path::new("/p"), false).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("vm.toml: kernel: VirtualBox cannot boot"),
            "{e}"
        );

        let mut five_ide = String::from("vmm = \"virtualbox\"\nmemory = 512\n");
        for i in 0..5 {
            five_ide.push_str(&format!("[[disk]]\nfile = \"d{i}\"\ninterface = \"ide\"\n"));
        }
        let e = vboxmanage_steps(&config(&five_ide), "n", Path::new("/p"), false).unwrap_err();
        assert!(e.to_string().contains("at most 4"), "{e}");

        let mut nine_nics =
            String::from("vmm = \"virtualbox\"\nmemory = 512\n[[disk]]\nfile = \"d\"\n");
        for _ in 0..9 {
            nine_nics.push_str("[[nic]]\nmode = \"user\"\n");
        }
        let e = vboxmanage_steps(&config(&nine_nics), "n", Path::new("/p"), false).unwrap_err();
        assert!(e.to_string().contains("at most 8"), "{e}");

        let clash = config(
            "vmm = \"virtualbox\"\nmemory = 512\n[[disk]]\nfile = \"a.img\"\n[[disk]]\nfile = \"a.raw\"\n",
        );
        let e = vboxmanage_steps(&clash, "n", Path::new("/p"), false).unwrap_err();
        assert!(e.to_string().starts_with("vm.toml: disk[1].file:"), "{e}");
        let onto_memory = config(
            "vmm = \"virtualbox\"\nmemory = 512\nmemory_image = \"a.vmdk\"\n[[disk]]\nfile = \"./a.img\"\n",
        );
        let e = vboxmanage_steps(&onto_memory, "n", Path::new("/p"), false).unwrap_err();
        assert!(e.to_string().starts_with("vm.toml: disk[0].file:"), "{e}");

        for bad in ["", "a/b", "a\nb"] {
            assert!(
                matches!(
                    vboxmanage_steps(&minimal(""), bad, Path::new("/p"), false),
                    Err(VboxError::BadName {
                        what: "VM name",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }
}
