//! The mission end to end, through the real binaries, real FUSE and real QEMU
//! (TCG): `isrctl resume` starts the test guest from the lazy mount, `isrctl
//! suspend` saves its memory into the mount and checks it in, and another
//! machine (its own state, cache and daemon, the same store) continues the same
//! boot where it stopped. Against the local-directory store and SeaweedFS (S3).
//! Also: a QEMU killed mid-session, a failed migration, and guest TRIM.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use isr::chunk::ChunkRef;
use isr::manifest::Manifest;
use support::guest::{self, GuestLine};
use support::vm::{
    BOOT_LIMIT, RUN_LIMIT, assert_contiguous_one_boot, count_on, counters, file_chunks, has_file,
    new_chunks, resume, serial_lines, status, suspend, version_counter_log, vm_state, wait_for,
    wait_for_control,
};
use support::{Env, SeaweedFs};

/// Builds the test guest and imports it for QEMU in image mode (these tests
/// are about the memory image; tests/lazy_memory.rs has lazy mode), with
/// `extra_args` in its vm.toml.
fn import_guest(env: &Env, name: &str, extra_args: &[String]) {
    let extra: Vec<String> = ["-no-reboot".to_owned()]
        .into_iter()
        .chain(extra_args.iter().cloned())
        .collect();
    let vm_toml = format!(
        "memory_mode = \"image\"\n{}",
        support::vm::guest_vm_toml("qemu", &extra)
    );
    support::vm::import_guest(env, name, &vm_toml);
}

/// A → B → A with the same boot, the counter continuing at every move.
fn suspend_on_one_machine_resume_on_another(a: Env) {
    let name = "vm";
    import_guest(&a, name, &[]);
    let v1 = a.manifest(name, 1);
    assert!(
        !has_file(&v1, "memory.img"),
        "a fresh import has no memory image"
    );

    // Machine A boots it (no memory image yet) from the mount.
    let answer = resume(&a, name);
    assert_eq!(answer["vm"]["resumed_from_memory"], false);
    let on_a = count_on(&a, name, 0, 3);
    let boot = on_a[0].1.clone();
    let answer = suspend(&a, name);
    let memory_bytes = answer["saved"]["memory_bytes"].as_u64().unwrap();
    eprintln!(
        "A: booted, counted to {}, suspended in {:.2} s: memory image {memory_bytes} bytes, checkin uploaded {} bytes in {:.2} s",
        on_a.last().unwrap().0,
        answer["saved"]["seconds"].as_f64().unwrap(),
        answer["checkin"]["uploaded_bytes"],
        answer["checkin"]["seconds"].as_f64().unwrap(),
    );
    let last_a = counters(&serial_lines(&a, name)).last().unwrap().0;
    let v2 = a.manifest(name, 2);
    assert!(has_file(&v2, "memory.img"));

    // Machine B: empty state and cache, the same store.
    let b = a.another_machine();
    let answer = resume(&b, name);
    assert_eq!(answer["vm"]["resumed_from_memory"], true, "{answer}");
    let fetched = status(&b, name)["fetch"]["fetched_bytes"].as_u64().unwrap();
    eprintln!(
        "B (cold cache): VM running {:.2} s after the request, {fetched} bytes fetched by then",
        answer["vm"]["start_seconds"].as_f64().unwrap()
    );
    let on_b = count_on(&b, name, 0, 3);
    assert_eq!(
        on_b[0],
        (last_a + 1, boot.clone()),
        "B continues A's boot where it stopped"
    );
    assert!(
        !serial_lines(&b, name)
            .iter()
            .any(|l| matches!(l, GuestLine::Boot { .. })),
        "B resumed, it did not boot"
    );
    let answer = suspend(&b, name);
    let last_b = counters(&serial_lines(&b, name)).last().unwrap().0;
    let v3 = b.manifest(name, 3);
    let memory_chunks = file_chunks(&v3, "memory.img").len();
    let (fresh, fresh_bytes) = new_chunks(&v2, &v3, "memory.img");
    eprintln!(
        "B: suspended; checkin uploaded {} bytes; memory image {} bytes in {memory_chunks} stored chunks, of which {fresh} ({fresh_bytes} stored bytes) were new",
        answer["checkin"]["uploaded_bytes"], answer["saved"]["memory_bytes"]
    );
    assert!(
        fresh * 2 < memory_chunks,
        "mapped-ram: a second suspend of one boot changes few memory chunks ({fresh} of {memory_chunks} are new)"
    );
    assert!(fresh_bytes < answer["saved"]["memory_bytes"].as_u64().unwrap() / 2);
    assert_contiguous_one_boot(&version_counter_log(&b, name, 3), &boot);

    // Back on A, whose cache holds version 2's chunks.
    let answer = resume(&a, name);
    assert_eq!(answer["vm"]["resumed_from_memory"], true);
    let fetched = status(&a, name)["fetch"]["fetched_bytes"].as_u64().unwrap();
    let seen = counters(&serial_lines(&a, name)).len();
    let again = count_on(&a, name, seen, 2);
    eprintln!(
        "A (warm cache): VM running {:.2} s after the request, {fetched} bytes fetched by then",
        answer["vm"]["start_seconds"].as_f64().unwrap()
    );
    assert_eq!(again[seen], (last_b + 1, boot.clone()));
    suspend(&a, name);
    assert_eq!(a.versions(name), [1, 2, 3, 4]);
    assert_contiguous_one_boot(&version_counter_log(&a, name, 4), &boot);
    a.ok(&["verify", name]);
}

#[test]
fn a_vm_suspended_on_one_machine_continues_on_another_local_store() {
    suspend_on_one_machine_resume_on_another(Env::local());
}

#[test]
fn a_vm_suspended_on_one_machine_continues_on_another_s3() {
    let server = SeaweedFs::start();
    suspend_on_one_machine_resume_on_another(Env::s3(&server, "vm-a-b"));
}

#[test]
fn a_killed_qemu_commits_nothing_and_the_session_boots_again() {
    let env = Env::local();
    let name = "crash";
    import_guest(&env, name, &[]);
    resume(&env, name);
    count_on(&env, name, 0, 2);
    suspend(&env, name);

    // Resumed from memory; then QEMU dies.
    let answer = resume(&env, name);
    assert_eq!(answer["vm"]["resumed_from_memory"], true);
    let mount = PathBuf::from(answer["mount"].as_str().unwrap());
    assert!(
        !mount.join("memory.img").exists(),
        "the memory image is consumed once the VM runs from it"
    );
    let seen = counters(&serial_lines(&env, name)).len();
    let before = count_on(&env, name, seen, 2);
    let boot = before.last().unwrap().1.clone();
    let pid = answer["vm"]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // isrfsd notices (and reaps) its dead child when asked for the status.
    let deadline = std::time::Instant::now() + RUN_LIMIT;
    while vm_state(&env, name) != "exited" {
        assert!(
            std::time::Instant::now() < deadline,
            "isrfsd does not see QEMU's death"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let vm = &status(&env, name)["vm"];
    assert!(vm["exit"].as_str().unwrap().contains("signal"), "{vm}");

    let stderr = env.fails(&["suspend", name], 1);
    assert!(stderr.contains("not running"), "{stderr}");
    assert!(stderr.contains("nothing was committed"), "{stderr}");
    assert!(
        stderr.contains("isrctl resume crash"),
        "says what to do: {stderr}"
    );
    assert_eq!(env.versions(name), [1, 2], "nothing committed");

    // The session is still there: resume boots the VM from its disk.
    let answer = resume(&env, name);
    assert_eq!(answer["reattached"], true);
    assert_eq!(answer["vm"]["resumed_from_memory"], false, "{answer}");
    let lines = wait_for(&env, name, "a new boot counting", BOOT_LIMIT, |l| {
        guest::counting(&l[seen..], 2).is_some()
    });
    let (new_boot, ns) = guest::counting(&lines[seen..], 2).unwrap();
    assert_ne!(new_boot, boot, "a fresh boot after the crash");
    assert!(
        ns[0] > before[0].0,
        "the counter goes on from the disk's log: {ns:?} after {before:?}"
    );
    suspend(&env, name);
    assert_eq!(env.versions(name), [1, 2, 3]);
}

#[test]
fn a_failed_migration_commits_nothing_and_the_vm_goes_on() {
    let env = Env::local();
    let name = "nosave";
    import_guest(&env, name, &[]);
    let answer = resume(&env, name);
    let mount = PathBuf::from(answer["mount"].as_str().unwrap());
    count_on(&env, name, 0, 2);

    // Where QEMU writes the memory image there is a directory: the save fails.
    let blocker = mount.join(".memory.img.partial");
    std::fs::create_dir(&blocker).unwrap();
    let stderr = env.fails(&["suspend", name], 1);
    assert!(stderr.contains("goes on running"), "{stderr}");
    assert!(stderr.contains("nothing was committed"), "{stderr}");
    assert_eq!(env.versions(name), [1]);
    assert!(!mount.join("memory.img").exists());
    assert_eq!(vm_state(&env, name), "running");
    let seen = counters(&serial_lines(&env, name)).len();
    let after = count_on(&env, name, seen, 2);
    let boot = after[0].1.clone();

    std::fs::remove_dir(&blocker).unwrap();
    suspend(&env, name);
    assert_eq!(env.versions(name), [1, 2]);
    let answer = resume(&env, name);
    assert_eq!(answer["vm"]["resumed_from_memory"], true);
    let seen = counters(&serial_lines(&env, name)).len();
    let again = count_on(&env, name, seen, 1);
    assert_eq!(again[seen].1, boot, "the same boot goes on");
    env.ok(&["discard", name]);
}

#[test]
fn checkin_refuses_a_running_vm_and_discard_stops_it() {
    let env = Env::local();
    let name = "busy";
    import_guest(&env, name, &[]);
    let answer = resume(&env, name);
    let pid = answer["vm"]["pid"].as_i64().unwrap() as i32;
    let stderr = env.fails(&["checkin", name], 5);
    assert!(stderr.contains("isrctl suspend busy"), "{stderr}");
    env.ok(&["discard", name]);
    assert!(support::wait_for_exit(pid), "discard stops QEMU");
    assert_eq!(env.versions(name), [1]);
}

#[test]
fn resume_with_vmm_none_only_mounts() {
    let env = Env::local();
    let name = "plain";
    import_guest(&env, name, &[]);
    let answer = env.json(&["resume", "--vmm", "none", name]);
    assert!(answer["vm"].is_null(), "{answer}");
    let mount = Path::new(answer["mount"].as_str().unwrap());
    assert!(mount.join("vm.toml").exists() && mount.join("disk.img").exists());
    let output = env.run(&["resume", "--vmm", "nonsense", name]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("qemu, libvirt, virtualbox or none"),
        "{stderr}"
    );
    // Without a VM, suspend is a checkin of the files as they are.
    let answer = env.json(&["suspend", name]);
    assert!(answer["saved"].is_null(), "{answer}");
    assert_eq!(env.versions(name), [1], "nothing changed: no version");
}

/// Zero chunks of `file` in a version.
fn zero_chunks(manifest: &Manifest, file: &str) -> usize {
    let (_, _, chunks) = manifest.files().find(|(p, _, _)| *p == file).unwrap();
    chunks
        .iter()
        .filter(|c| matches!(c, ChunkRef::Zero))
        .count()
}

#[test]
fn guest_trim_turns_chunks_into_zero_chunks_that_are_not_uploaded() {
    let env = Env::local();
    env.append_config("\n[upload]\ntrickle = false\n");
    let name = "trim";
    let socket = env.path("ctl.sock");
    import_guest(&env, name, &guest::control_args(&socket));
    resume(&env, name);
    count_on(&env, name, 0, 1);

    // 8 MiB of random data on the guest's disk, committed as version 2.
    guest::send_control(&socket, "fill 8");
    let done = wait_for_control(&env, name, "fill done");
    assert_eq!(done, "fill done bytes=8388608");
    let synced = env.json(&["sync", name]);
    assert_eq!(synced["version"], 2, "{synced}");
    let (v1, v2) = (env.manifest(name, 1), env.manifest(name, 2));
    let (filled, filled_bytes) = new_chunks(&v1, &v2, "disk.img");
    assert!(
        filled_bytes >= 8 * (1 << 20),
        "the fill is stored: {filled_bytes}"
    );

    // The guest deletes it and trims: QEMU punches holes (discard=unmap), which
    // become zero chunks in the image; nothing of them is uploaded.
    guest::send_control(&socket, "trim");
    let done = wait_for_control(&env, name, "trim done");
    let answer = suspend(&env, name);
    let v3 = env.manifest(name, 3);
    let (zeros2, zeros3) = (zero_chunks(&v2, "disk.img"), zero_chunks(&v3, "disk.img"));
    let (rewritten, rewritten_bytes) = new_chunks(&v2, &v3, "disk.img");
    let stored = |m: &Manifest| file_chunks(m, "disk.img").values().sum::<u64>();
    eprintln!(
        "{done}: disk.img zero chunks {zeros2} -> {zeros3}, stored disk bytes {} -> {}; version 2 added {filled} chunks ({filled_bytes} bytes), version 3 {rewritten} ({rewritten_bytes} bytes); checkin uploaded {} bytes in all",
        stored(&v2),
        stored(&v3),
        answer["checkin"]["uploaded_bytes"]
    );
    // 8 MiB is 64 chunks of 128 KiB; ext4 may place the file unaligned.
    assert!(
        zeros3 >= zeros2 + 62,
        "the trimmed chunks are zero chunks now ({zeros2} -> {zeros3}, {filled} filled)"
    );
    assert!(
        rewritten_bytes < 2 * (1 << 20),
        "the trimmed data is not uploaded again: {rewritten_bytes} bytes"
    );
    assert!(stored(&v3) + 7 * (1 << 20) < stored(&v2));

    // `isrctl info --files` shows the same per file.
    let info = env.json(&["info", "--files", name]);
    let files = info["files"].as_array().unwrap();
    let disk = files.iter().find(|f| f["path"] == "disk.img").unwrap();
    assert_eq!(
        disk["stored_bytes"].as_u64().unwrap(),
        stored(&v3),
        "{disk}"
    );
    assert_eq!(disk["zero_chunks"].as_u64().unwrap() as usize, zeros3);
    assert!(files.iter().any(|f| f["path"] == "memory.img"));
    assert!(env.json(&["info", name]).get("files").is_none());
}

/// Waits (liveness guard) for a child process to end; returns its output.
fn wait_child(child: std::process::Child, what: &str) -> std::process::Output {
    let pid = child.id() as i32;
    let watchdog = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + RUN_LIMIT;
        while std::time::Instant::now() < deadline {
            if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    let output = child.wait_with_output().unwrap();
    watchdog.join().unwrap();
    assert!(
        output.status.code().is_some(),
        "{what} did not return (killed after the liveness guard)"
    );
    output
}

#[test]
fn resume_in_the_foreground_returns_when_the_vm_stops() {
    let env = Env::local();
    let name = "front";
    import_guest(&env, name, &[]);
    let spawn = || {
        env.isrctl()
            .args(["resume", "--foreground", name])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };

    // Suspended from elsewhere: exit 0.
    let front = spawn();
    count_on(&env, name, 0, 2);
    suspend(&env, name);
    let output = wait_child(front, "resume --foreground");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("/mnt/front"),
        "prints the mount first"
    );

    // QEMU dies: exit 1, saying what to do.
    let front = spawn();
    let seen = counters(&serial_lines(&env, name)).len();
    count_on(&env, name, seen, 1);
    let pid = status(&env, name)["vm"]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let output = wait_child(front, "resume --foreground");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stopped") && stderr.contains("signal"),
        "{stderr}"
    );
    assert!(stderr.contains("isrctl resume front"), "{stderr}");
    env.ok(&["discard", name]);

    // Nothing to wait for without a VM.
    let output = env.run(&["resume", "--foreground", "--vmm", "none", name]);
    assert_eq!(output.status.code(), Some(2));
    env.ok(&["discard", name]);
}

#[test]
fn stopping_isrfsd_saves_the_vm_and_resume_continues_it() {
    let env = Env::local();
    let name = "reboot";
    import_guest(&env, name, &[]);
    resume(&env, name);
    let before = count_on(&env, name, 0, 2);
    let boot = before[0].1.clone();

    // SIGTERM (systemd stopping the daemon): the VM is saved into the mount.
    let pid = env.daemon_pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(support::wait_for_exit(pid), "isrfsd exits after SIGTERM");
    let last = counters(&serial_lines(&env, name)).last().unwrap().0;
    let answer = resume(&env, name);
    assert_eq!(answer["reattached"], true);
    assert_eq!(answer["vm"]["resumed_from_memory"], true, "{answer}");
    let seen = counters(&serial_lines(&env, name)).len();
    let after = count_on(&env, name, seen, 1);
    // The same boot goes on: its counter (in guest memory) continues. Under
    // load one line can be missing from the log: printed while the VM was
    // being saved, it is in the saved UART state but not in the file (seen
    // once in a loaded run: 2, then 4). The counter still proves the state.
    let (next, next_boot) = after[seen].clone();
    assert_eq!(next_boot, boot, "the same boot goes on");
    assert!(
        (last + 1..=last + 2).contains(&next),
        "the counter continues from {last}: {next}"
    );

    // kill -9: QEMU is left behind on a dead mount; the next resume kills it
    // and boots the VM from its disks (the memory image was consumed).
    let qemu = answer["vm"]["pid"].as_i64().unwrap() as i32;
    env.kill_daemon();
    let answer = resume(&env, name);
    assert!(support::wait_for_exit(qemu), "the leftover QEMU is killed");
    assert_eq!(answer["vm"]["resumed_from_memory"], false, "{answer}");
    let seen = counters(&serial_lines(&env, name)).len();
    let lines = wait_for(&env, name, "a new boot counting", BOOT_LIMIT, |l| {
        guest::counting(&l[seen..], 1).is_some()
    });
    let (new_boot, ns) = guest::counting(&lines[seen..], 1).unwrap();
    assert_ne!(new_boot, boot);
    assert!(ns[0] > last, "counts on from the disk's log");
    suspend(&env, name);
    assert_eq!(env.versions(name), [1, 2]);
}

#[test]
fn virtualbox_gets_vmdk_descriptors_in_the_mount_and_its_steps() {
    Env::require_fuse();
    let env = Env::local();
    let name = "vbox";
    let disk = vec![0u8; 4 << 20];
    env.import_files(
        name,
        &[
            (
                "vm.toml",
                b"vmm = \"virtualbox\"\nmemory = 512\n[[disk]]\nfile = \"disk.img\"\n".as_slice(),
            ),
            ("disk.img", disk.as_slice()),
        ],
    );
    let output = env.run(&["--json", "resume", name]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["vm"]["kind"], "virtualbox");
    assert_eq!(
        answer["vm"]["state"], "handed",
        "VBoxManage is not installed here"
    );
    let mount = Path::new(answer["mount"].as_str().unwrap());
    let descriptor = std::fs::read_to_string(mount.join("disk.vmdk")).unwrap();
    assert!(
        descriptor.contains("createType=\"monolithicFlat\""),
        "{descriptor}"
    );
    assert!(
        descriptor.contains("RW 8192 FLAT \"disk.img\" 0"),
        "{descriptor}"
    );
    let steps = answer["vm"]["steps"].to_string();
    assert!(
        steps.contains("createvm") && steps.contains("startvm"),
        "{steps}"
    );
    assert!(
        steps.contains(&mount.join("disk.vmdk").display().to_string()),
        "{steps}"
    );

    // Without --json the steps are printed for a person to run.
    let output = env.run(&["resume", name]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("VBoxManage is not installed here"),
        "{stderr}"
    );
    assert!(stderr.contains("VBoxManage startvm vbox"), "{stderr}");

    // Suspend cannot save a VM it did not start: it says what to run.
    let stderr = env.fails(&["suspend", name], 4);
    assert!(stderr.contains("controlvm vbox savestate"), "{stderr}");
    // The descriptor travels with the parcel.
    let report = env.json(&["checkin", name]);
    assert_eq!(report["version"], 2, "{report}");
    let v2 = env.manifest(name, 2);
    assert!(has_file(&v2, "disk.vmdk"));
}

#[test]
fn discard_after_isrfsd_died_stops_the_vm_and_detaches_the_mount() {
    let env = Env::local();
    let name = "orphan";
    import_guest(&env, name, &[]);
    let answer = resume(&env, name);
    let mount = PathBuf::from(answer["mount"].as_str().unwrap());
    let qemu = answer["vm"]["pid"].as_i64().unwrap() as i32;
    count_on(&env, name, 0, 1);
    env.kill_daemon();
    assert!(
        std::fs::metadata(&mount).is_err(),
        "the killed daemon's mount is dead"
    );
    env.ok(&["discard", name]);
    assert!(
        support::wait_for_exit(qemu),
        "discard stops the orphaned QEMU"
    );
    assert!(
        std::fs::metadata(&mount).is_ok(),
        "the dead mount is detached"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(mount.to_str().unwrap()), "{mounts}");
    // The lock is released: another machine can resume it.
    let other = env.another_machine();
    let answer = resume(&other, name);
    assert_eq!(answer["vm"]["resumed_from_memory"], false);
    other.ok(&["discard", name]);
}

#[test]
fn a_vm_toml_that_describes_no_vm_only_mounts_with_a_warning() {
    Env::require_fuse();
    let env = Env::local();
    let name = "oldstyle";
    env.import_files(name, &[("vm.toml", "[vm]\nmemory = \"512M\"\n")]);
    let output = env.run(&["--json", "resume", name]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(answer["vm"].is_null(), "{answer}");
    assert!(
        stderr.contains("warning") && stderr.contains("only mounted"),
        "{stderr}"
    );
    assert!(stderr.contains("vmm"), "names the missing field: {stderr}");
    // Asked for explicitly, it is an error (the parcel stays mounted).
    let stderr = env.fails(&["resume", "--vmm", "qemu", name], 2);
    assert!(stderr.contains("did not start"), "{stderr}");
    env.ok(&["discard", name]);
}
