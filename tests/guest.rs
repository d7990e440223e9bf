//! The test guest: `tests/fixtures/make-guest.sh` builds it reproducibly (and from
//! its cache the second time), and it boots in QEMU and counts, continuing its
//! counter file when booted again from the same disk. Its control channel makes it
//! fill its disk and TRIM the space again, which punches holes in the disk file.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use support::guest::{self, BootOptions, GuestLine, Qemu};

/// Liveness guard for a boot under TCG (about 4–8 s here); not a timing assertion.
const BOOT_LIMIT: Duration = Duration::from_secs(300);

/// The `sha256 …` of each file in a builder manifest.
fn manifest_hashes(manifest: &str) -> Vec<(String, String)> {
    manifest
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            let hash = line.split("sha256 ").nth(1)?;
            Some((name.to_owned(), hash.trim().to_owned()))
        })
        .collect()
}

fn sha256(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn guest_build_is_cached_and_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let first = guest::build(&dir.path().join("a"));
    let first_time = started.elapsed();
    let started = Instant::now();
    let second = guest::build(&dir.path().join("b"));
    eprintln!(
        "guest build: {:.2} s, then {:.2} s from the cache",
        first_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    let hashes = manifest_hashes(&first.manifest);
    let names: Vec<&str> = hashes.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        ["vmlinuz", "initrd.img", "disk.img"],
        "{}",
        first.manifest
    );
    assert_eq!(first.manifest, second.manifest);
    for (name, hash) in &hashes {
        assert_eq!(
            &sha256(&first.dir.join(name)),
            hash,
            "{name} in the first output"
        );
        assert_eq!(
            &sha256(&second.dir.join(name)),
            hash,
            "{name} in the second output"
        );
    }

    // A real rebuild (from the downloaded packages) must match the cache byte for byte.
    guest::build_with_env(&dir.path().join("c"), &[("VERIFY", "1")]);
}

#[test]
fn guest_boots_counts_and_continues_from_its_disk() {
    let qemu = guest::qemu_binary();
    eprintln!("qemu: {}", qemu.display());
    let dir = tempfile::tempdir().unwrap();
    let files = guest::build(&dir.path().join("guest"));

    // Cold boot: ISR-BOOT, then counting from 1 with that boot id.
    let mut vm = Qemu::boot(&files, &dir.path().join("serial-1.log"));
    let lines = vm.wait_for("first counter line", BOOT_LIMIT, |lines| {
        guest::counting(lines, 1).is_some()
    });
    eprintln!(
        "first counter line after {:.1} s",
        vm.started.elapsed().as_secs_f64()
    );
    let (boot1, ns) = guest::counting(&lines, 1).unwrap();
    assert_eq!(ns[0], 1, "a fresh disk starts at n=1: {lines:?}");
    let lines = vm.wait_for("two counter lines", BOOT_LIMIT, |lines| {
        guest::counting(lines, 2).is_some()
    });
    let (_, ns) = guest::counting(&lines, 2).unwrap();
    assert!(ns[1] > ns[0], "counter goes up: {lines:?}");
    let boots = lines
        .iter()
        .filter(|l| matches!(l, GuestLine::Boot { .. }))
        .count();
    assert_eq!(boots, 1, "ISR-BOOT once: {lines:?}");
    vm.kill();
    let last1 = vm
        .lines()
        .iter()
        .filter_map(|l| match l {
            GuestLine::Counter { n, .. } => Some(*n),
            GuestLine::Boot { .. } | GuestLine::Control { .. } => None,
        })
        .max()
        .unwrap();

    // Boot again from the same disk: a new boot id, and n continues counter.log.
    let mut vm = Qemu::boot(&files, &dir.path().join("serial-2.log"));
    let lines = vm.wait_for("two counter lines after a reboot", BOOT_LIMIT, |lines| {
        guest::counting(lines, 2).is_some()
    });
    vm.kill();
    let (boot2, ns) = guest::counting(&lines, 2).unwrap();
    assert_ne!(boot1, boot2, "a boot from disk has a new boot id");
    // The kill may land between appending a line to counter.log and printing it.
    assert!(
        ns[0] == last1 + 1 || ns[0] == last1 + 2,
        "the counter continues from the disk (last printed {last1}): {lines:?}"
    );
    assert!(ns[1] > ns[0], "counter goes up: {lines:?}");
}

/// Bytes of `path` the file system has allocated (holes take none).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Whether the guest has answered a control command with a line starting `prefix`.
fn answered(lines: &[GuestLine], prefix: &str) -> bool {
    lines
        .iter()
        .any(|l| matches!(l, GuestLine::Control { text } if text.starts_with(prefix)))
}

const MIB: u64 = 1 << 20;

#[test]
fn guest_trim_punches_holes_in_the_disk_file() {
    let dir = tempfile::tempdir().unwrap();
    let files = guest::build(&dir.path().join("guest"));
    // A sparse copy of the disk, ours to measure.
    let disk = dir.path().join("trim-disk.img");
    let status = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(&files.disk)
        .arg(&disk)
        .status()
        .expect("run cp");
    assert!(
        status.success(),
        "cp --sparse=always {}",
        files.disk.display()
    );
    let socket = dir.path().join("ctl.sock");
    let mut vm = Qemu::boot_with(
        &files,
        &dir.path().join("serial.log"),
        &BootOptions {
            disk: Some(disk.clone()),
            drive_options: vec!["discard=unmap".into()],
            extra_args: guest::control_args(&socket),
        },
    );
    // The control loop is listening before the guest counts.
    vm.wait_for("first counter line", BOOT_LIMIT, |lines| {
        guest::counting(lines, 1).is_some()
    });
    let before = allocated(&disk);

    guest::send_control(&socket, "fill 8");
    let lines = vm.wait_for("ISR-CTL fill done", BOOT_LIMIT, |lines| {
        answered(lines, "fill done") || answered(lines, "fill failed")
    });
    assert!(
        answered(&lines, "fill done bytes=8388608"),
        "the guest filled 8 MiB: {lines:?}"
    );
    let filled = allocated(&disk);

    guest::send_control(&socket, "trim");
    let lines = vm.wait_for("ISR-CTL trim done", BOOT_LIMIT, |lines| {
        answered(lines, "trim done") || answered(lines, "trim failed")
    });
    assert!(
        answered(&lines, "trim done"),
        "the guest trimmed: {lines:?}"
    );
    let trimmed = allocated(&disk);

    guest::send_control(&socket, "no such command");
    let lines = vm.wait_for("ISR-CTL unknown", BOOT_LIMIT, |lines| {
        answered(lines, "unknown")
    });
    vm.kill();
    assert!(
        answered(&lines, "unknown no such command"),
        "an unknown command is named: {lines:?}"
    );
    let answers: Vec<&str> = lines
        .iter()
        .filter_map(|l| match l {
            GuestLine::Control { text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    eprintln!(
        "disk file allocated: {before} bytes after boot, {filled} after `fill 8`, \
         {trimmed} after `trim`; guest said {answers:?}"
    );
    assert!(
        filled >= before + 8 * MIB - MIB / 4,
        "writing 8 MiB in the guest allocates about 8 MiB of the disk file: \
         {before} -> {filled} bytes"
    );
    assert!(
        trimmed + 7 * MIB <= filled,
        "TRIM after removing the 8 MiB punches at least 7 MiB of holes in the disk file \
         (discard=unmap): {filled} -> {trimmed} bytes"
    );
}

#[test]
fn serial_lines_are_parsed_through_terminal_noise_and_half_written_lines() {
    let text = "\x1bc\x1b[?7l\x1b[2JISR-BOOT boot=25b41fda\r\nISR-COUNTER n=1 boot=25b41fda\r\n\
                [    3.1] random kernel line\nISR-CTL fill done bytes=8388608 \r\n\
                ISR-COUNTER n=2 boot=25b4";
    let lines = guest::parse_lines(text);
    assert_eq!(
        lines,
        [
            GuestLine::Boot {
                boot: "25b41fda".into()
            },
            GuestLine::Counter {
                n: 1,
                boot: "25b41fda".into()
            },
            GuestLine::Control {
                text: "fill done bytes=8388608".into()
            },
        ]
    );
    assert_eq!(
        guest::counting(&lines, 1),
        Some(("25b41fda".to_owned(), vec![1]))
    );
    assert_eq!(guest::counting(&lines, 2), None);
}
