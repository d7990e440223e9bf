//! libvirt: the parcel's VM as a transient libvirt domain.
//!
//! [`domain_xml`] turns a [`VmConfig`] into domain XML for `virsh create`, with
//! every file inside the mounted parcel; [`virsh_steps`] lists the `virsh`
//! commands that resume (create, or restore a saved image) and suspend (save) it.
//! These are pure functions, tested without libvirt. [`LibvirtAdapter`], the
//! [`Vmm`] that [`super::supervise`] runs, is the only part that runs `virsh`
//! (through [`super::steps`]), or hands the steps over when it is missing.
//!
//! Invariants: a resume never boots past a memory image that is not
//! libvirt's ([`check_saved_image`] refuses it before anything runs); a
//! suspend never leaves a partial save under the memory image's name; only a
//! domain started from the same runtime directory is ever destroyed as a
//! leftover ([`destroy_leftover`]).
//!
//! Use the session daemon ([`SESSION_URI`]): QEMU must run as the user who
//! mounted the parcel, because nobody else can open files in a FUSE mount that
//! was not mounted with `allow_other`. For an unprivileged user that is the
//! user's own session daemon (started by `virsh` on demand). For root,
//! `qemu:///session` is served by the system daemon (`libvirtd` running as
//! root), whose QEMU runs as `libvirt-qemu` unless `/etc/libvirt/qemu.conf` says
//! `user = "root"` and `group = "root"`: as `libvirt-qemu`, QEMU fails to open
//! the disks with "Permission denied". `.ci/install-deps.sh` sets this up (Debian
//! 12's libvirt 9.0 without `libvirt-daemon-system`, hence also
//! `stdio_handler = "file"` so that no `virtlogd` is needed) and
//! `tests/libvirt_vm.rs` runs a parcel through it.
//!
//! The guest's first serial port is a pty (`virsh console NAME`) whose output
//! is also appended to a log file in the VM's runtime directory
//! ([`domain_xml`]'s `serial_log`), as with the QEMU adapter.
//!
//! The memory image is what `virsh save` writes: libvirt's header (with the
//! domain XML) and QEMU's migration stream, not mapped-ram (libvirt 9.0), so
//! two saves of one boot share few chunks (596 of 728 stored chunks new in
//! `tests/libvirt_vm.rs`, where the QEMU adapter's mapped-ram images share most).
//!
//! Port forwards need libvirt's `passt` backend and the `passt` program (Debian 12's
//! libvirt 9.0.0 rejects `<backend type='passt'/>`, libvirt issue 462; bookworm-
//! backports has 11.3): libvirt's default SLIRP user networking has no forwards, so a
//! NIC with forwards is given `<backend type='passt'/>` and one `<portForward>`
//! per forward, bound to 127.0.0.1. A NIC without forwards keeps the default.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::config::{DiskInterface, DisplayKind, NicModel, Protocol, VmConfig};
use super::qemu::partial_name;
use super::steps::{capture, handed, installed, run_or_hand, run_steps};
use super::{AdapterStatus, Ended, ParcelVm, SavedState, Started, VmError, Vmm, io_error};

/// The program.
pub const VIRSH: &str = "virsh";

/// The libvirt connection for the user's own VMs (for root, the system daemon's).
pub const SESSION_URI: &str = "qemu:///session";

/// The first bytes of a libvirt QEMU saved image (`virsh save`).
pub const SAVE_MAGIC: &[u8; 16] = b"LibvirtQemudSave";

/// How the guest's CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation (`<domain type='kvm'>`).
    Kvm,
    /// QEMU's emulator, TCG (`<domain type='qemu'>`): slow, but needs no `/dev/kvm`.
    Tcg,
}

/// What [`virsh_steps`] should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Boot the VM afresh: `virsh create XML`.
    Boot,
    /// Continue a VM suspended with `virsh save`: `virsh restore MEMFILE --xml XML`.
    /// The fresh XML replaces the one inside the saved image, so the parcel may be
    /// mounted somewhere else than when it was saved.
    Restore,
    /// Save the running VM's memory into the parcel and stop it:
    /// `virsh save NAME MEMFILE`. A saved transient domain is gone; no `destroy`.
    Suspend,
}

/// Whether `head` (the first bytes of the memory image) starts a libvirt saved
/// image, that is whether resume should [`Lifecycle::Restore`] rather than
/// [`Lifecycle::Boot`].
pub fn is_saved_image(head: &[u8]) -> bool {
    head.starts_with(SAVE_MAGIC)
}

/// The `virsh` command lines (each a program and its arguments) for one step of
/// the VM's life. `domain_file` is where the caller wrote [`domain_xml`];
/// `memory_file` is the parcel's memory image in the mount
/// (`mount.join(&config.memory_image)`); `uri` is usually [`SESSION_URI`].
pub fn virsh_steps(
    step: Lifecycle,
    uri: &str,
    name: &str,
    domain_file: &Path,
    memory_file: &Path,
) -> Vec<Vec<String>> {
    let virsh = |args: &[&str]| virsh(uri, args);
    let domain_file = domain_file.to_string_lossy();
    let memory_file = memory_file.to_string_lossy();
    match step {
        Lifecycle::Boot => vec![virsh(&["create", &domain_file])],
        Lifecycle::Restore => vec![virsh(&[
            "restore",
            &memory_file,
            "--xml",
            &domain_file,
            "--running",
        ])],
        Lifecycle::Suspend => vec![virsh(&["save", name, &memory_file])],
    }
}

/// `virsh --connect URI ARGS…` as a command line.
pub fn virsh(uri: &str, args: &[&str]) -> Vec<String> {
    ["virsh", "--connect", uri]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect()
}

/// `virsh domstate NAME`: whether the domain still runs (see [`stopped_reason`]).
pub fn domstate_step(uri: &str, name: &str) -> Vec<String> {
    virsh(uri, &["domstate", name])
}

/// `virsh destroy NAME`: stops the domain at once (a transient one is then gone).
pub fn destroy_step(uri: &str, name: &str) -> Vec<String> {
    virsh(uri, &["destroy", name])
}

/// `virsh dumpxml NAME`: the running domain's XML (see [`is_started_with`]).
pub fn dumpxml_step(uri: &str, name: &str) -> Vec<String> {
    virsh(uri, &["dumpxml", name])
}

/// What the answer to [`domstate_step`] (whether `virsh` succeeded, its stdout
/// and stderr) says about a transient domain isr started: `Some(why)` once it has
/// stopped, `None` while it exists and has not (running, paused, …) and when the
/// answer says neither (libvirt unreachable: nothing is known, so nothing changes).
/// A transient domain disappears as soon as its QEMU ends: the guest powered off
/// (`<on_poweroff>destroy`), QEMU crashed or was killed, or someone ran
/// `virsh destroy`; libvirt cannot tell afterwards which it was.
pub fn stopped_reason(success: bool, stdout: &str, stderr: &str) -> Option<String> {
    if success {
        let state = stdout.trim();
        return matches!(state, "shut off" | "crashed")
            .then(|| format!("libvirt reports the domain {state}"));
    }
    stderr.contains("failed to get domain").then(|| {
        "its libvirt domain is gone (the guest powered off, QEMU ended, or it was destroyed)"
            .to_owned()
    })
}

/// Whether `dumpxml` (the XML of a running domain, [`dumpxml_step`]) is of a
/// domain started with `serial_log` as its console log, that is by the same
/// runtime directory: a domain an earlier isrfsd (killed itself) left running.
pub fn is_started_with(dumpxml: &str, serial_log: &Path) -> bool {
    let file = escape(&serial_log.to_string_lossy());
    dumpxml.contains(&format!("<log file='{file}'"))
        || dumpxml.contains(&format!("<log file=\"{file}\""))
}

/// A UUID derived from the domain name alone, so the same parcel always gets the
/// same domain UUID (an RFC 9562 version 8 UUID over a BLAKE3 hash of the name).
pub fn domain_uuid(name: &str) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"isr libvirt domain uuid\0");
    hasher.update(name.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80; // version 8
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // variant 10
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Escapes text for XML character data and for attribute values in either quote.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Whitespace in attributes would be normalised away; keep it.
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            // Not allowed in XML 1.0 at all, not even as references.
            c if (c as u32) < 0x20 => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// The libvirt device name for the `index`-th disk on a bus: `vda`, … `vdz`,
/// `vdaa`, … (the same scheme libvirt and Linux use).
fn device_name(prefix: &str, index: usize) -> String {
    let mut letters = Vec::new();
    let mut n = index + 1;
    while n > 0 {
        n -= 1;
        letters.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    letters.reverse();
    format!("{prefix}{}", String::from_utf8_lossy(&letters))
}

/// Domain XML for `virsh create`: a transient domain named `name`, its files in
/// the parcel mounted at `mount`.
///
/// - `<domain type='kvm'>` or `type='qemu'` (TCG) per `accel`; the UUID is
///   [`domain_uuid`] of the name; memory in MiB; `vcpu`.
/// - Direct kernel boot (`kernel`, `initrd`, `cmdline`) when `vm.toml` has a
///   kernel, else boot from the first disk.
/// - Each disk raw, `cache='writeback'`, `discard='unmap'` and
///   `detect_zeroes='unmap'` (freed and zeroed guest blocks become holes, so they
///   are not uploaded), on virtio (`vdX`), IDE (`hdX`) or SATA (`sdX`);
///   `<readonly/>` when read-only (QEMU refuses read-only IDE and SATA *hard
///   disks*; libvirt reports that on `virsh create`).
/// - User-mode NICs; forwards through passt on 127.0.0.1 (see the module doc).
/// - Display: VNC listening on 127.0.0.1 only (a fixed port or autoport); SDL
///   (also for `gtk`, which libvirt has no graphics type for), full screen if
///   asked; none: no graphics at all.
/// - A serial console on a pty (`virsh console NAME`); with `serial_log`, its
///   output is also appended to that file (`<log file=… append='on'/>`).
///
/// Every name, path and the command line are XML-escaped.
pub fn domain_xml(
    config: &VmConfig,
    name: &str,
    mount: &Path,
    accel: Accel,
    serial_log: Option<&Path>,
) -> String {
    let file = |relative: &Path| escape(&mount.join(relative).to_string_lossy());
    let domain_type = match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "qemu",
    };
    let mut xml = String::new();
    // Writing into a String cannot fail.
    let mut line = |indent: usize, text: &str| {
        let _ = writeln!(xml, "{:indent$}{text}", "", indent = indent * 2);
    };
    line(0, &format!("<domain type='{domain_type}'>"));
    line(1, &format!("<name>{}</name>", escape(name)));
    line(1, &format!("<uuid>{}</uuid>", domain_uuid(name)));
    line(
        1,
        &format!("<memory unit='MiB'>{}</memory>", config.memory_mib()),
    );
    line(
        1,
        &format!(
            "<currentMemory unit='MiB'>{}</currentMemory>",
            config.memory_mib()
        ),
    );
    line(1, &format!("<vcpu>{}</vcpu>", config.cpus));
    line(1, "<os>");
    line(2, "<type>hvm</type>");
    if let Some(kernel) = &config.kernel {
        line(2, &format!("<kernel>{}</kernel>", file(kernel)));
        if let Some(initrd) = &config.initrd {
            line(2, &format!("<initrd>{}</initrd>", file(initrd)));
        }
        if let Some(append) = &config.append {
            line(2, &format!("<cmdline>{}</cmdline>", escape(append)));
        }
    } else {
        line(2, "<boot dev='hd'/>");
    }
    line(1, "</os>");
    line(1, "<features>");
    line(2, "<acpi/>");
    line(1, "</features>");
    line(1, "<on_poweroff>destroy</on_poweroff>");
    line(1, "<on_reboot>restart</on_reboot>");
    line(1, "<on_crash>destroy</on_crash>");
    line(1, "<devices>");
    let mut per_bus = [0usize; 3];
    for disk in &config.disks {
        let (bus, prefix, slot) = match disk.interface {
            DiskInterface::Virtio => ("virtio", "vd", 0),
            DiskInterface::Ide => ("ide", "hd", 1),
            DiskInterface::Sata => ("sata", "sd", 2),
        };
        let dev = device_name(prefix, per_bus[slot]);
        per_bus[slot] += 1;
        line(2, "<disk type='file' device='disk'>");
        line(
            3,
            "<driver name='qemu' type='raw' cache='writeback' discard='unmap' detect_zeroes='unmap'/>",
        );
        line(3, &format!("<source file='{}'/>", file(&disk.file)));
        line(3, &format!("<target dev='{dev}' bus='{bus}'/>"));
        if disk.read_only {
            line(3, "<readonly/>");
        }
        line(2, "</disk>");
    }
    for nic in &config.nics {
        let model = match nic.model {
            NicModel::Virtio => "virtio",
            NicModel::E1000 => "e1000",
        };
        line(2, "<interface type='user'>");
        if !nic.forward.is_empty() {
            line(3, "<backend type='passt'/>");
        }
        line(3, &format!("<model type='{model}'/>"));
        for forward in &nic.forward {
            let proto = match forward.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            };
            line(
                3,
                &format!("<portForward proto='{proto}' address='127.0.0.1'>"),
            );
            line(
                4,
                &format!("<range start='{}' to='{}'/>", forward.host, forward.guest),
            );
            line(3, "</portForward>");
        }
        line(2, "</interface>");
    }
    match config.display.kind {
        DisplayKind::None => {}
        DisplayKind::Vnc => {
            let port = match config.display.vnc_port {
                Some(port) => format!("port='{port}' autoport='no'"),
                None => "autoport='yes'".to_owned(),
            };
            line(
                2,
                &format!("<graphics type='vnc' {port} listen='127.0.0.1'>"),
            );
            line(3, "<listen type='address' address='127.0.0.1'/>");
            line(2, "</graphics>");
        }
        DisplayKind::Sdl | DisplayKind::Gtk => {
            let fullscreen = if config.display.fullscreen {
                " fullscreen='yes'"
            } else {
                ""
            };
            line(2, &format!("<graphics type='sdl'{fullscreen}/>"));
        }
    }
    line(2, "<serial type='pty'>");
    if let Some(log) = serial_log {
        line(
            3,
            &format!(
                "<log file='{}' append='on'/>",
                escape(&log.to_string_lossy())
            ),
        );
    }
    line(3, "<target port='0'/>");
    line(2, "</serial>");
    line(2, "<console type='pty'>");
    line(3, "<target type='serial' port='0'/>");
    line(2, "</console>");
    line(1, "</devices>");
    line(0, "</domain>");
    xml
}

/// Checks that the memory image `memory` is a libvirt saved image (`virsh
/// save`). Anything else is refused rather than booted past: it would stay in
/// the mount beside disks that have moved on.
pub fn check_saved_image(memory: &Path) -> Result<(), VmError> {
    use std::io::Read as _;
    let mut head = Vec::with_capacity(SAVE_MAGIC.len());
    std::fs::File::open(memory)
        .and_then(|f| f.take(SAVE_MAGIC.len() as u64).read_to_end(&mut head))
        .map_err(io_error(format!(
            "reading the memory image {}",
            memory.display()
        )))?;
    if is_saved_image(&head) {
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

/// Destroys a domain named `name` that an earlier isrfsd (killed itself)
/// started with `serial_log` as its console log (so from the same runtime
/// directory) and left running: its disks are in a mount that is gone. A
/// domain of the same name started by anyone else is left alone (`virsh
/// create` then says the name is taken). Nothing happens without `virsh`.
pub fn destroy_leftover(uri: &str, name: &str, serial_log: &Path) {
    if !installed(VIRSH) {
        return;
    }
    let Ok(output) = capture(&dumpxml_step(uri, name)) else {
        return;
    };
    if output.status.success()
        && is_started_with(&String::from_utf8_lossy(&output.stdout), serial_log)
    {
        tracing::warn!(
            parcel = name,
            "destroying a libvirt domain left running by an earlier isrfsd"
        );
        if let Err(e) = run_steps(&[destroy_step(uri, name)]) {
            tracing::warn!(parcel = name, error = %e, "destroying the leftover domain failed");
        }
    }
}

/// How often, at most, `virsh domstate` is asked whether a domain runs.
const POLL: Duration = Duration::from_secs(1);

/// The libvirt [`Vmm`]: a transient domain named after the parcel, its XML in
/// `<runtime dir>/domain.xml` and its console logged to
/// `<runtime dir>/serial.log`, driven by `virsh` when it is installed (else
/// the steps are handed over).
///
/// Suspend is `virsh save` into a partial file beside the memory image, synced
/// and renamed into place once the save has finished (as the QEMU adapter
/// does); after a failed save libvirt is asked whether the domain still runs
/// (libvirt resumes it after a failed save).
#[derive(Debug)]
pub struct LibvirtAdapter {
    vm: ParcelVm,
    uri: String,
    accel: Accel,
    steps: Vec<Vec<String>>,
    /// Started by running `virsh` (not handed over).
    executed: bool,
    /// Believed to run: started, not saved, killed or found ended.
    running: bool,
    /// When `virsh domstate` was last asked whether the domain runs.
    checked: Option<Instant>,
    /// How the domain ended, found by the last check and not yet reported.
    ended: Option<Ended>,
}

impl LibvirtAdapter {
    /// For `vm`, through the libvirt connection `uri` (usually
    /// [`SESSION_URI`]); the domain is KVM when `accel` starts with `kvm`,
    /// else TCG.
    pub fn new(vm: &ParcelVm, uri: &str, accel: &str) -> LibvirtAdapter {
        LibvirtAdapter {
            vm: vm.clone(),
            uri: uri.to_owned(),
            accel: if accel.starts_with("kvm") {
                Accel::Kvm
            } else {
                Accel::Tcg
            },
            steps: Vec::new(),
            executed: false,
            running: false,
            checked: None,
            ended: None,
        }
    }

    /// Where the domain's serial console is logged (see [`domain_xml`]), as the
    /// QEMU adapter's `serial.log`.
    fn serial_log(&self) -> PathBuf {
        self.vm.dir.join("serial.log")
    }

    fn domain_file(&self) -> PathBuf {
        self.vm.dir.join("domain.xml")
    }

    /// Writes the domain XML, refuses a memory image that is not libvirt's
    /// (before running anything), destroys a leftover domain, then creates or
    /// restores the domain.
    fn start(&mut self, restore: Option<&SavedState>) -> Result<Started, VmError> {
        let serial_log = self.serial_log();
        let xml = domain_xml(
            &self.vm.config,
            &self.vm.parcel,
            &self.vm.mount,
            self.accel,
            Some(&serial_log),
        );
        let domain_file = self.domain_file();
        std::fs::write(&domain_file, xml)
            .map_err(io_error(format!("writing {}", domain_file.display())))?;
        if let Some(saved) = restore {
            check_saved_image(&saved.path)?;
        }
        destroy_leftover(&self.uri, &self.vm.parcel, &serial_log);
        let (step, memory) = match restore {
            Some(saved) => (Lifecycle::Restore, saved.path.clone()),
            None => (Lifecycle::Boot, self.vm.memory_image()),
        };
        self.steps = virsh_steps(step, &self.uri, &self.vm.parcel, &domain_file, &memory);
        let started = run_or_hand(VIRSH, &self.steps)?;
        self.executed = started == Started::Running;
        self.running = self.executed;
        Ok(started)
    }

    fn suspend_steps(&self, memory: &Path) -> Vec<Vec<String>> {
        virsh_steps(
            Lifecycle::Suspend,
            &self.uri,
            &self.vm.parcel,
            &self.domain_file(),
            memory,
        )
    }

    /// Asks `virsh domstate` whether the domain still runs; notes its end when
    /// it does not.
    fn check(&mut self) {
        self.checked = Some(Instant::now());
        let Ok(output) = capture(&domstate_step(&self.uri, &self.vm.parcel)) else {
            return;
        };
        if let Some(why) = stopped_reason(
            output.status.success(),
            &String::from_utf8_lossy(&output.stdout),
            &String::from_utf8_lossy(&output.stderr),
        ) {
            self.running = false;
            self.ended = Some(Ended {
                why,
                powered_off: false,
            });
        }
    }
}

impl Vmm for LibvirtAdapter {
    /// The memory image, when it is there and not empty (resumed from with
    /// `virsh restore`, or refused when it is not libvirt's).
    fn saved_state(&self) -> Option<SavedState> {
        self.vm.saved_memory_image()
    }

    fn boot(&mut self) -> Result<Started, VmError> {
        self.start(None)
    }

    fn resume(&mut self, saved: &SavedState) -> Result<Started, VmError> {
        self.start(Some(saved))
    }

    fn suspend(&mut self) -> Result<(), VmError> {
        let memory = self.vm.memory_image();
        if !self.executed {
            return Err(handed(&self.suspend_steps(&memory)));
        }
        let partial = partial_name(&memory);
        let _ = std::fs::remove_file(&partial);
        self.steps = self.suspend_steps(&partial);
        let result = run_steps(&self.steps).and_then(|()| sync_and_rename(&partial, &memory));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&partial);
            self.check();
            return Err(e);
        }
        self.running = false;
        Ok(())
    }

    fn ended(&mut self) -> Option<Ended> {
        if self.running && self.checked.is_none_or(|at| at.elapsed() >= POLL) {
            self.check();
        }
        self.ended.take()
    }

    fn kill(&mut self) {
        if self.running
            && let Err(e) = run_steps(&[destroy_step(&self.uri, &self.vm.parcel)])
        {
            tracing::warn!(parcel = %self.vm.parcel, error = %e, "stopping the VM failed");
        }
        self.running = false;
    }

    fn status(&self) -> AdapterStatus {
        AdapterStatus {
            serial_log: Some(self.serial_log()),
            steps: self.steps.clone(),
            ..AdapterStatus::default()
        }
    }
}

/// Syncs the finished file `partial`, renames it to `dest` and syncs the directory.
fn sync_and_rename(partial: &Path, dest: &Path) -> Result<(), VmError> {
    std::fs::File::open(partial)
        .and_then(|f| f.sync_all())
        .map_err(io_error(format!("syncing {}", partial.display())))?;
    std::fs::rename(partial, dest).map_err(io_error(format!(
        "renaming {} to {}",
        partial.display(),
        dest.display()
    )))?;
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_error(format!("syncing {}", parent.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal well-formedness check: tags balance, attributes are quoted,
    /// every `&` starts a known entity or a character reference, no stray `<`/`>`
    /// in text. Returns the element names in document order.
    fn check_well_formed(xml: &str) -> Vec<String> {
        fn check_text(text: &str) {
            assert!(!text.contains('>'), "raw > in {text:?}");
            let mut rest = text;
            while let Some(at) = rest.find('&') {
                let after = &rest[at + 1..];
                let end = after
                    .find(';')
                    .unwrap_or_else(|| panic!("& without ; in {text:?}"));
                let entity = &after[..end];
                assert!(
                    matches!(entity, "amp" | "lt" | "gt" | "quot" | "apos")
                        || (entity.starts_with('#')
                            && entity[1..].chars().all(|c| c.is_ascii_digit())),
                    "unknown entity &{entity}; in {text:?}"
                );
                rest = &after[end + 1..];
            }
        }
        let mut stack: Vec<String> = Vec::new();
        let mut names = Vec::new();
        let mut rest = xml;
        let mut root_closed = false;
        while let Some(open) = rest.find('<') {
            check_text(&rest[..open]);
            assert!(
                !root_closed || rest[..open].trim().is_empty(),
                "text after the root element"
            );
            let after = &rest[open + 1..];
            // Find the closing '>' outside quoted attribute values.
            let mut quote = None;
            let mut close = None;
            for (i, c) in after.char_indices() {
                match (quote, c) {
                    (None, '\'' | '"') => quote = Some(c),
                    (Some(q), c) if c == q => quote = None,
                    (None, '<') => panic!("< inside a tag: {after:?}"),
                    (None, '>') => {
                        close = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let close = close.expect("unterminated tag");
            let tag = &after[..close];
            rest = &after[close + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                let top = stack.pop().expect("close without open");
                assert_eq!(top, name.trim(), "mismatched close tag");
                root_closed = stack.is_empty();
                continue;
            }
            assert!(!root_closed, "second root element <{tag}>");
            let self_closing = tag.ends_with('/');
            let body = tag.trim_end_matches('/');
            let name_end = body.find(char::is_whitespace).unwrap_or(body.len());
            let name = &body[..name_end];
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "bad element name {name:?}"
            );
            // Attributes: name='value' or name="value", values escaped.
            let mut attrs = body[name_end..].trim();
            let mut seen = Vec::new();
            while !attrs.is_empty() {
                let eq = attrs.find('=').expect("attribute without =");
                let attr = attrs[..eq].trim();
                assert!(!seen.contains(&attr), "duplicate attribute {attr}");
                seen.push(attr);
                let value = &attrs[eq + 1..];
                let q = value.chars().next().expect("attribute without value");
                assert!(q == '\'' || q == '"', "unquoted attribute {attr}");
                let end = value[1..].find(q).expect("unterminated value") + 1;
                let text = &value[1..end];
                check_text(text);
                assert!(!text.contains('<'), "< in attribute {attr}");
                attrs = value[end + 1..].trim_start();
            }
            names.push(name.to_owned());
            if !self_closing {
                stack.push(name.to_owned());
            }
        }
        check_text(rest);
        assert!(rest.trim().is_empty(), "text after the root: {rest:?}");
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert!(root_closed, "no root element");
        names
    }

    fn config(text: &str) -> VmConfig {
        VmConfig::parse(text).unwrap()
    }

    const TEST_GUEST: &str = r#"
vmm = "libvirt"
memory = 256
kernel = "vmlinuz"
initrd = "initrd.img"
append = "console=ttyS0 quiet"

[[disk]]
file = "disk.img"
"#;

    #[test]
    fn the_test_guest_is_a_well_formed_tcg_domain() {
        let xml = domain_xml(
            &config(TEST_GUEST),
            "guest",
            Path::new("/mnt/isr/guest"),
            Accel::Tcg,
            Some(Path::new("/run/isr/vm/guest/serial.log")),
        );
        let names = check_well_formed(&xml);
        assert_eq!(names[0], "domain");
        assert!(xml.starts_with("<domain type='qemu'>"), "{xml}");
        assert!(xml.contains("<name>guest</name>"));
        assert!(xml.contains(&format!("<uuid>{}</uuid>", domain_uuid("guest"))));
        assert!(xml.contains("<memory unit='MiB'>256</memory>"));
        assert!(xml.contains("<vcpu>1</vcpu>"));
        assert!(xml.contains("<kernel>/mnt/isr/guest/vmlinuz</kernel>"));
        assert!(xml.contains("<initrd>/mnt/isr/guest/initrd.img</initrd>"));
        assert!(xml.contains("<cmdline>console=ttyS0 quiet</cmdline>"));
        assert!(!xml.contains("<boot"), "direct kernel boot: {xml}");
        assert!(xml.contains(
            "<driver name='qemu' type='raw' cache='writeback' discard='unmap' detect_zeroes='unmap'/>"
        ));
        assert!(xml.contains("<source file='/mnt/isr/guest/disk.img'/>"));
        assert!(xml.contains("<target dev='vda' bus='virtio'/>"));
        assert!(!xml.contains("<readonly/>"));
        assert!(!xml.contains("<interface"), "no NICs: {xml}");
        assert!(!xml.contains("<graphics"), "display none: {xml}");
        assert!(xml.contains(
            "<serial type='pty'>\n      <log file='/run/isr/vm/guest/serial.log' append='on'/>\n      <target port='0'/>\n    </serial>"
        ), "{xml}");
        assert!(xml.contains("<console type='pty'>"));

        let kvm = domain_xml(
            &config(TEST_GUEST),
            "guest",
            Path::new("/m"),
            Accel::Kvm,
            None,
        );
        assert!(kvm.starts_with("<domain type='kvm'>"));
        assert!(!kvm.contains("<log"), "no serial log asked for: {kvm}");
        assert!(kvm.contains("<serial type='pty'>\n      <target port='0'/>"));
    }

    #[test]
    fn names_paths_and_command_lines_are_escaped() {
        let cfg = config(
            r#"
vmm = "libvirt"
memory = 512
kernel = "k&<'\">.bin"
append = "a=\"1\" b='2' & c<3"
[[disk]]
file = "dir with space/d'isk&<x>.img"
"#,
        );
        let xml = domain_xml(
            &cfg,
            "my<vm>&'\"",
            Path::new("/mnt/a'b&c"),
            Accel::Tcg,
            Some(Path::new("/run/it's <here>/serial.log")),
        );
        check_well_formed(&xml);
        assert!(xml.contains("<log file='/run/it&apos;s &lt;here&gt;/serial.log' append='on'/>"));
        assert!(xml.contains("<name>my&lt;vm&gt;&amp;&apos;&quot;</name>"));
        assert!(xml.contains(
            "<source file='/mnt/a&apos;b&amp;c/dir with space/d&apos;isk&amp;&lt;x&gt;.img'/>"
        ));
        assert!(
            xml.contains("<kernel>/mnt/a&apos;b&amp;c/k&amp;&lt;&apos;&quot;&gt;.bin</kernel>")
        );
        assert!(xml.contains("<cmdline>a=&quot;1&quot; b=&apos;2&apos; &amp; c&lt;3</cmdline>"));
        assert_eq!(escape("a\nb\tc\u{1}"), "a&#10;b&#9;c\u{fffd}");
    }

    #[test]
    fn disks_buses_read_only_and_boot() {
        let cfg = config(
            r#"
vmm = "libvirt"
memory = "1G"
cpus = 2
[[disk]]
file = "a.img"
interface = "sata"
[[disk]]
file = "b.img"
interface = "ide"
read_only = true
[[disk]]
file = "c.img"
[[disk]]
file = "d.img"
interface = "sata"
"#,
        );
        let xml = domain_xml(&cfg, "n", Path::new("/p"), Accel::Kvm, None);
        check_well_formed(&xml);
        assert!(xml.contains("<boot dev='hd'/>"));
        assert!(xml.contains("<vcpu>2</vcpu>"));
        assert!(xml.contains("<memory unit='MiB'>1024</memory>"));
        let targets: Vec<&str> = xml
            .lines()
            .filter(|l| l.contains("<target dev="))
            .map(str::trim)
            .collect();
        assert_eq!(
            targets,
            [
                "<target dev='sda' bus='sata'/>",
                "<target dev='hda' bus='ide'/>",
                "<target dev='vda' bus='virtio'/>",
                "<target dev='sdb' bus='sata'/>",
            ]
        );
        assert_eq!(xml.matches("<readonly/>").count(), 1);
        let b = xml.find("/p/b.img").unwrap();
        let readonly = xml.find("<readonly/>").unwrap();
        assert!(readonly > b && readonly < xml.find("/p/c.img").unwrap());
        assert_eq!(xml.matches("discard='unmap'").count(), 4);
    }

    #[test]
    fn device_names_follow_libvirt() {
        assert_eq!(device_name("vd", 0), "vda");
        assert_eq!(device_name("vd", 25), "vdz");
        assert_eq!(device_name("vd", 26), "vdaa");
        assert_eq!(device_name("sd", 27), "sdab");
        assert_eq!(device_name("sd", 26 + 26 * 26), "sdaaa");
    }

    #[test]
    fn nics_forward_on_loopback_through_passt() {
        let cfg = config(
            r#"
vmm = "libvirt"
memory = 512
[[disk]]
file = "d.img"
[[nic]]
mode = "user"
forward = [{ host = 2222, guest = 22 }, { host = 5353, guest = 53, protocol = "udp" }]
[[nic]]
mode = "user"
model = "e1000"
"#,
        );
        let xml = domain_xml(&cfg, "n", Path::new("/p"), Accel::Tcg, None);
        check_well_formed(&xml);
        assert_eq!(xml.matches("<interface type='user'>").count(), 2);
        assert_eq!(xml.matches("<backend type='passt'/>").count(), 1);
        assert!(xml.contains("<model type='virtio'/>"));
        assert!(xml.contains("<model type='e1000'/>"));
        assert!(xml.contains(
            "<portForward proto='tcp' address='127.0.0.1'>\n        <range start='2222' to='22'/>"
        ));
        assert!(xml.contains(
            "<portForward proto='udp' address='127.0.0.1'>\n        <range start='5353' to='53'/>"
        ));
    }

    #[test]
    fn displays() {
        let with = |display: &str| {
            let xml = domain_xml(
                &config(&format!(
                    "vmm = \"libvirt\"\nmemory = 512\n[[disk]]\nfile = \"d\"\n[display]\n{display}"
                )),
                "n",
                Path::new("/p"),
                Accel::Tcg,
                None,
            );
            check_well_formed(&xml);
            xml
        };
        let vnc = with("type = \"vnc\"\nvnc_port = 5901\n");
        assert!(vnc.contains("<graphics type='vnc' port='5901' autoport='no' listen='127.0.0.1'>"));
        assert!(vnc.contains("<listen type='address' address='127.0.0.1'/>"));
        assert!(!vnc.contains("0.0.0.0"));
        let auto = with("type = \"vnc\"\n");
        assert!(auto.contains("<graphics type='vnc' autoport='yes' listen='127.0.0.1'>"));
        assert!(with("type = \"sdl\"\n").contains("<graphics type='sdl'/>"));
        assert!(
            with("type = \"gtk\"\nfullscreen = true\n")
                .contains("<graphics type='sdl' fullscreen='yes'/>")
        );
        assert!(!with("type = \"none\"\n").contains("<graphics"));
    }

    #[test]
    fn uuids_are_stable_per_name_and_well_formed() {
        let a = domain_uuid("alpha");
        assert_eq!(a, domain_uuid("alpha"));
        assert_ne!(a, domain_uuid("beta"));
        let groups: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        assert_eq!(&a[14..15], "8", "version 8: {a}");
        assert!("89ab".contains(&a[19..20]), "variant: {a}");
    }

    #[test]
    fn virsh_steps_for_boot_restore_and_suspend() {
        let xml = Path::new("/run/isr/guest.xml");
        let mem = Path::new("/mnt/isr/guest/memory.img");
        assert_eq!(
            virsh_steps(Lifecycle::Boot, SESSION_URI, "guest", xml, mem),
            [[
                "virsh",
                "--connect",
                "qemu:///session",
                "create",
                "/run/isr/guest.xml"
            ]]
        );
        assert_eq!(
            virsh_steps(Lifecycle::Restore, SESSION_URI, "guest", xml, mem),
            [[
                "virsh",
                "--connect",
                "qemu:///session",
                "restore",
                "/mnt/isr/guest/memory.img",
                "--xml",
                "/run/isr/guest.xml",
                "--running"
            ]]
        );
        assert_eq!(
            virsh_steps(Lifecycle::Suspend, SESSION_URI, "guest", xml, mem),
            [[
                "virsh",
                "--connect",
                "qemu:///session",
                "save",
                "guest",
                "/mnt/isr/guest/memory.img"
            ]]
        );
    }

    #[test]
    fn saved_images_are_recognised_by_their_magic() {
        assert!(is_saved_image(b"LibvirtQemudSave\x02\0\0\0rest"));
        assert!(!is_saved_image(b"LibvirtQemudPart"), "a partial save");
        assert!(!is_saved_image(b""));
        assert!(!is_saved_image(&[0u8; 4096]));
        assert!(!is_saved_image(b"QEVM"));
    }

    #[test]
    fn domstate_answers_tell_a_stopped_domain() {
        assert_eq!(
            domstate_step(SESSION_URI, "g"),
            ["virsh", "--connect", "qemu:///session", "domstate", "g"]
        );
        assert_eq!(
            destroy_step(SESSION_URI, "g"),
            ["virsh", "--connect", "qemu:///session", "destroy", "g"]
        );
        assert_eq!(stopped_reason(true, "running\n\n", ""), None);
        assert_eq!(stopped_reason(true, "paused\n", ""), None);
        assert!(
            stopped_reason(true, "shut off\n", "")
                .unwrap()
                .contains("shut off")
        );
        assert!(stopped_reason(true, "crashed\n", "").is_some());
        // libvirt 9.0's answer for a transient domain whose QEMU has ended.
        let gone = stopped_reason(false, "", "error: failed to get domain 'g'\n").unwrap();
        assert!(gone.contains("gone"), "{gone}");
        // libvirtd unreachable: unknown, not stopped.
        assert_eq!(
            stopped_reason(
                false,
                "",
                "error: failed to connect to the hypervisor\nerror: Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file or directory\n"
            ),
            None
        );
    }

    #[test]
    fn a_leftover_domain_is_recognised_by_its_serial_log() {
        let log = Path::new("/run/isr/vm/g/serial.log");
        let xml = domain_xml(
            &config(TEST_GUEST),
            "g",
            Path::new("/m"),
            Accel::Tcg,
            Some(log),
        );
        assert!(is_started_with(&xml, log));
        assert!(!is_started_with(&xml, Path::new("/other/vm/g/serial.log")));
        assert!(!is_started_with(&xml, Path::new("/run/isr/vm/g/serial")));
        // As `virsh dumpxml` prints it.
        let dumped = "<serial type='pty'>\n      <source path='/dev/pts/0'/>\n      <log file='/run/isr/vm/g/serial.log' append='on'/>\n";
        assert!(is_started_with(dumped, log));
    }
}
