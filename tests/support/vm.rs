//! The test guest as a parcel that isrfsd runs (`isrctl resume` / `suspend`),
//! seen through isrctl and the files the daemon writes: its `vm.toml`, its
//! serial console log, its state in `isrctl status`, and the counter log on a
//! version's disk.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use isr::chunk::{ChunkRef, ChunkTag};
use isr::manifest::Manifest;

use super::Env;
use super::guest::{self, GuestLine};

/// The test guest's `vm.toml` for `vmm` (qemu, libvirt): 256 MiB, direct kernel
/// boot, one virtio disk, headless; `extra_args` go to QEMU.
pub fn guest_vm_toml(vmm: &str, extra_args: &[String]) -> String {
    let extra: Vec<String> = extra_args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "vmm = \"{vmm}\"\nmemory = 256\nkernel = \"vmlinuz\"\ninitrd = \"initrd.img\"\n\
         append = \"console=ttyS0 quiet panic=-1\"\nextra_args = [{}]\n\n[[disk]]\nfile = \"disk.img\"\n",
        extra.join(", ")
    )
}

/// Builds the guest and imports it with `vm_toml` as parcel `name`.
pub fn import_guest(env: &Env, name: &str, vm_toml: &str) {
    Env::require_fuse();
    guest::qemu_binary();
    let source = env.path(&format!("guest-{name}"));
    guest::build(&source);
    std::fs::remove_file(source.join("MANIFEST.txt")).unwrap();
    std::fs::write(source.join("vm.toml"), vm_toml).unwrap();
    env.ok(&["import", name, source.to_str().unwrap()]);
}

/// The guest's serial console log (isrfsd's runtime directory).
pub fn serial_log(env: &Env, name: &str) -> PathBuf {
    env.path(&format!("run/vm/{name}/serial.log"))
}

/// The guest's lines on its serial console so far.
pub fn serial_lines(env: &Env, name: &str) -> Vec<GuestLine> {
    guest::parse_lines(&String::from_utf8_lossy(
        &std::fs::read(serial_log(env, name)).unwrap_or_default(),
    ))
}

/// `isrctl status NAME --json`, the session's object.
pub fn status(env: &Env, name: &str) -> serde_json::Value {
    env.json(&["status", name])["sessions"][0].clone()
}

/// The VM's state; `not resumed` while no session exists (yet), `resuming`
/// while isrfsd resumes it, `none` when
/// the session runs no VM.
pub fn vm_state(env: &Env, name: &str) -> String {
    let output = env.run(&["--json", "status", name]);
    if output.status.code() == Some(4) {
        return "not resumed".into();
    }
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    if status["sessions"][0]["resuming"] == true {
        return "resuming".into();
    }
    status["sessions"][0]["vm"]["state"]
        .as_str()
        .unwrap_or("none")
        .to_owned()
}

/// Counter lines (n, boot) in order.
pub fn counters(lines: &[GuestLine]) -> Vec<(u64, String)> {
    lines
        .iter()
        .filter_map(|l| match l {
            GuestLine::Counter { n, boot } => Some((*n, boot.clone())),
            _ => None,
        })
        .collect()
}

/// The guest's `counter.log` on the disk image `disk` (debugfs reads ext4).
pub fn disk_counter_log(disk: &Path) -> Vec<(u64, String)> {
    let debugfs = super::find_program("debugfs", "apt-get install e2fsprogs");
    let output = std::process::Command::new(debugfs)
        .args(["-R", "cat /counter.log"])
        .arg(disk)
        .output()
        .unwrap();
    assert!(output.status.success(), "debugfs failed: {output:?}");
    counters(&guest::parse_lines(&String::from_utf8_lossy(
        &output.stdout,
    )))
}

/// Exports version `version` of `name` into a fresh directory; returns it.
pub fn export(env: &Env, name: &str, version: u64) -> PathBuf {
    let dir = env.path(&format!("export-{name}-{version}"));
    let _ = std::fs::remove_dir_all(&dir);
    env.ok(&[
        "export",
        &format!("{name}@{version}"),
        dir.to_str().unwrap(),
    ]);
    dir
}

/// The guest's `counter.log` on the disk of version `version` of `name`.
pub fn version_counter_log(env: &Env, name: &str, version: u64) -> Vec<(u64, String)> {
    let dir = export(env, name, version);
    let log = disk_counter_log(&dir.join("disk.img"));
    std::fs::remove_dir_all(&dir).unwrap();
    log
}

/// `isrctl suspend NAME --json`, checked: memory saved, a version committed.
pub fn suspend(env: &Env, name: &str) -> serde_json::Value {
    let answer = env.json(&["suspend", name]);
    assert!(
        answer["saved"]["memory_bytes"].as_u64().unwrap() > 0,
        "{answer}"
    );
    assert_eq!(answer["checkin"]["committed"], true, "{answer}");
    answer
}

/// One boot counting 1, 2, 3, … without a gap or a repeat.
pub fn assert_contiguous_one_boot(log: &[(u64, String)], boot: &str) {
    assert!(!log.is_empty());
    for (i, (n, id)) in log.iter().enumerate() {
        assert_eq!(*n, i as u64 + 1, "counter.log is not contiguous: {log:?}");
        assert_eq!(id, boot, "counter.log has another boot: {log:?}");
    }
}

/// Liveness guard for a boot under TCG (4–8 s here); not a timing assertion.
pub const BOOT_LIMIT: Duration = Duration::from_secs(300);
/// Liveness guard for counting to go on.
pub const RUN_LIMIT: Duration = Duration::from_secs(180);

/// Polls the serial console until `done` holds; panics with the console and
/// QEMU's log if the VM stops running first.
pub fn wait_for(
    env: &Env,
    name: &str,
    what: &str,
    limit: Duration,
    done: impl Fn(&[GuestLine]) -> bool,
) -> Vec<GuestLine> {
    let exited = || {
        let state = vm_state(env, name);
        (!["running", "busy", "resuming", "not resumed"].contains(&state.as_str())).then_some(state)
    };
    let output = || {
        format!(
            "serial console:\n{}\nqemu log:\n{}",
            String::from_utf8_lossy(&std::fs::read(serial_log(env, name)).unwrap_or_default()),
            std::fs::read_to_string(env.path(&format!("run/vm/{name}/qemu.log")))
                .unwrap_or_default()
        )
    };
    guest::poll_serial(&serial_log(env, name), what, limit, done, exited, output)
}

/// Waits until the console shows `more` counter lines beyond the `seen` first.
pub fn count_on(env: &Env, name: &str, seen: usize, more: usize) -> Vec<(u64, String)> {
    let lines = wait_for(env, name, "counter lines", RUN_LIMIT, |l| {
        counters(l).len() >= seen + more
    });
    counters(&lines)
}

/// `isrctl resume NAME --json`, checked: the VM runs under QEMU.
pub fn resume(env: &Env, name: &str) -> serde_json::Value {
    let answer = env.json(&["resume", name]);
    assert_eq!(answer["vm"]["state"], "running", "{answer}");
    assert_eq!(answer["vm"]["kind"], "qemu", "{answer}");
    answer
}

/// Distinct stored chunks of one file of a manifest, with stored sizes.
pub fn file_chunks(manifest: &Manifest, file: &str) -> HashMap<ChunkTag, u64> {
    let (_, _, chunks) = manifest
        .files()
        .find(|(path, _, _)| *path == file)
        .unwrap_or_else(|| panic!("{file} is not in the version"));
    chunks
        .iter()
        .filter_map(|c| match c {
            ChunkRef::Stored {
                tag, stored_len, ..
            } => Some((*tag, u64::from(*stored_len))),
            ChunkRef::Zero => None,
        })
        .collect()
}

/// Whether the version has `file`.
pub fn has_file(manifest: &Manifest, file: &str) -> bool {
    manifest.files().any(|(path, _, _)| path == file)
}

/// Chunks (count, stored bytes) of `file` in `new` that no file of `old` has.
pub fn new_chunks(old: &Manifest, new: &Manifest, file: &str) -> (usize, u64) {
    let before: HashSet<ChunkTag> = old.stored_chunks().map(|(t, _)| t).collect();
    let fresh: Vec<u64> = file_chunks(new, file)
        .into_iter()
        .filter(|(tag, _)| !before.contains(tag))
        .map(|(_, len)| len)
        .collect();
    (fresh.len(), fresh.iter().sum())
}

/// Waits for the guest's answer on the control channel that starts with
/// `prefix` (an `ISR-CTL` line, see `make-guest.sh`) and returns it.
pub fn wait_for_control(env: &Env, name: &str, prefix: &str) -> String {
    let lines = wait_for(env, name, prefix, RUN_LIMIT, |l| {
        l.iter()
            .any(|l| matches!(l, GuestLine::Control { text } if text.starts_with(prefix)))
    });
    lines
        .iter()
        .find_map(|l| match l {
            GuestLine::Control { text } if text.starts_with(prefix) => Some(text.clone()),
            _ => None,
        })
        .unwrap()
}
