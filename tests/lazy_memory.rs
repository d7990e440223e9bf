//! Lazy memory end to end, through the real binaries, real FUSE and real QEMU
//! (TCG): guest RAM is a file on the mount (`memory.ram`), a suspend saves
//! only the device state (`state.mig`) and the RAM file's changed chunks, and
//! a resume starts the guest before its memory is local. A → B → A on the
//! local store and on SeaweedFS; QEMU and isrfsd killed while the guest runs
//! (never a RAM file paired with another device state); the working set
//! fetched first at the next resume.

mod support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use isr::chunk::ChunkTag;
use support::guest::{self, GuestLine};
use support::vm::{
    BOOT_LIMIT, RUN_LIMIT, assert_contiguous_one_boot, count_on, counters, file_chunks, has_file,
    new_chunks, resume, serial_lines, status, suspend, version_counter_log, vm_state, wait_for,
    wait_for_control,
};
use support::{Env, SeaweedFs};

const RAM: &str = "memory.ram";
const STATE: &str = "state.mig";
/// The test guest's RAM (vm.toml: memory = 256).
const RAM_BYTES: u64 = 256 << 20;

/// Builds the test guest and imports it for QEMU with vm.toml's defaults
/// (lazy memory).
fn import_guest(env: &Env, name: &str) {
    let vm_toml = support::vm::guest_vm_toml("qemu", &["-no-reboot".to_owned()]);
    assert!(!vm_toml.contains("memory_mode"), "lazy is QEMU's default");
    support::vm::import_guest(env, name, &vm_toml);
}

/// `isrctl suspend` in lazy mode, checked: the device state is small, the RAM
/// file is named, both are in the new version.
fn suspend_lazy(env: &Env, name: &str) -> serde_json::Value {
    let answer = suspend(env, name);
    let saved = &answer["saved"];
    assert!(
        saved["memory_image"].as_str().unwrap().ends_with(STATE),
        "{answer}"
    );
    assert!(
        saved["ram_file"].as_str().unwrap().ends_with(RAM),
        "{answer}"
    );
    let state_bytes = saved["memory_bytes"].as_u64().unwrap();
    assert!(
        state_bytes < RAM_BYTES / 64,
        "the device state holds no RAM: {state_bytes} bytes"
    );
    let version = answer["checkin"]["version"].as_u64().unwrap();
    let manifest = env.manifest(name, version);
    assert!(has_file(&manifest, RAM), "version {version} lacks {RAM}");
    assert!(
        has_file(&manifest, STATE),
        "version {version} lacks {STATE}"
    );
    assert!(!has_file(&manifest, "memory.img"));
    answer
}

/// A → B → A in lazy mode with the same boot, the counter continuing.
fn lazy_a_to_b_to_a(a: Env) {
    let name = "lazy";
    import_guest(&a, name);

    let answer = resume(&a, name);
    assert_eq!(answer["vm"]["resumed_from_memory"], false);
    assert!(
        answer["vm"]["ram_file"].as_str().unwrap().ends_with(RAM),
        "{answer}"
    );
    let on_a = count_on(&a, name, 0, 3);
    let boot = on_a[0].1.clone();
    let answer = suspend_lazy(&a, name);
    eprintln!(
        "A: booted, suspended in {:.2} s; device state {} bytes; checkin uploaded {} bytes",
        answer["saved"]["seconds"].as_f64().unwrap(),
        answer["saved"]["memory_bytes"],
        answer["checkin"]["uploaded_bytes"]
    );
    let last_a = counters(&serial_lines(&a, name)).last().unwrap().0;
    let v2 = a.manifest(name, 2);

    // B: a cold cache. The guest runs before its memory is here.
    let b = a.another_machine();
    let answer = resume(&b, name);
    assert_eq!(answer["vm"]["resumed_from_memory"], true, "{answer}");
    let mount = PathBuf::from(answer["mount"].as_str().unwrap());
    assert!(
        !mount.join(STATE).exists(),
        "the device state is consumed once the VM runs from it"
    );
    assert!(
        mount.join(RAM).exists(),
        "the RAM file stays: it is the guest's memory"
    );
    let on_b = count_on(&b, name, 0, 3);
    assert_eq!(on_b[0], (last_a + 1, boot.clone()), "B continues A's boot");
    assert!(
        !serial_lines(&b, name)
            .iter()
            .any(|l| matches!(l, GuestLine::Boot { .. })),
        "B resumed, it did not boot"
    );
    let answer = suspend_lazy(&b, name);
    let uploaded = answer["checkin"]["uploaded_bytes"].as_u64().unwrap();
    let v3 = b.manifest(name, 3);
    let ram_chunks = file_chunks(&v3, RAM).len();
    let (fresh, fresh_bytes) = new_chunks(&v2, &v3, RAM);
    eprintln!(
        "B: suspended; checkin uploaded {uploaded} bytes; RAM file in {ram_chunks} stored chunks, {fresh} ({fresh_bytes} bytes) new"
    );
    assert!(
        fresh * 2 < ram_chunks,
        "a second suspend of one boot changes few RAM chunks ({fresh} of {ram_chunks})"
    );
    assert!(
        uploaded < RAM_BYTES / 8,
        "suspend uploads the changed chunks only: {uploaded} bytes"
    );
    assert_contiguous_one_boot(&version_counter_log(&b, name, 3), &boot);

    // Back on A.
    let answer = resume(&a, name);
    assert_eq!(answer["vm"]["resumed_from_memory"], true);
    let seen = counters(&serial_lines(&a, name)).len();
    let last_b = counters(&serial_lines(&b, name)).last().unwrap().0;
    let again = count_on(&a, name, seen, 2);
    assert_eq!(again[seen], (last_b + 1, boot.clone()));
    suspend_lazy(&a, name);
    assert_eq!(a.versions(name), [1, 2, 3, 4]);
    assert_contiguous_one_boot(&version_counter_log(&a, name, 4), &boot);
    a.ok(&["verify", name]);
}

#[test]
fn a_lazy_vm_moves_between_machines_local_store() {
    lazy_a_to_b_to_a(Env::local());
}

#[test]
fn a_lazy_vm_moves_between_machines_s3() {
    let server = SeaweedFs::start();
    lazy_a_to_b_to_a(Env::s3(&server, "lazy-a-b"));
}

/// Resumes `name` from its device state and waits for two more counter lines;
/// returns the boot id and the lines seen before.
fn resume_and_count(env: &Env, name: &str) -> (serde_json::Value, String, usize) {
    let answer = resume(env, name);
    assert_eq!(answer["vm"]["resumed_from_memory"], true, "{answer}");
    let seen = counters(&serial_lines(env, name)).len();
    let lines = count_on(env, name, seen, 2);
    (answer, lines.last().unwrap().1.clone(), seen)
}

/// After a crash the next resume boots from the disk: a new boot id, the
/// counter going on from the disk's log.
fn boots_again(env: &Env, name: &str, old_boot: &str, before: u64) {
    let answer = resume(env, name);
    assert_eq!(answer["vm"]["resumed_from_memory"], false, "{answer}");
    let seen = serial_lines(env, name).len();
    let lines = wait_for(env, name, "a new boot counting", BOOT_LIMIT, |l| {
        guest::counting(&l[seen.min(l.len())..], 2).is_some()
    });
    let (new_boot, ns) = guest::counting(&lines[seen..], 2).unwrap();
    assert_ne!(new_boot, old_boot, "a fresh boot after the crash");
    assert!(
        ns[0] > before,
        "the counter goes on from the disk's log: {ns:?} after {before}"
    );
}

#[test]
fn a_killed_qemu_never_pairs_its_ram_with_old_device_state() {
    let env = Env::local();
    let name = "crash";
    import_guest(&env, name);
    resume(&env, name);
    count_on(&env, name, 0, 2);
    suspend_lazy(&env, name);

    let (answer, boot, _) = resume_and_count(&env, name);
    let before = counters(&serial_lines(&env, name)).last().unwrap().0;
    let pid = answer["vm"]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + RUN_LIMIT;
    while vm_state(&env, name) != "exited" {
        assert!(std::time::Instant::now() < deadline, "QEMU's death unseen");
        std::thread::sleep(Duration::from_millis(100));
    }
    let stderr = env.fails(&["suspend", name], 1);
    assert!(stderr.contains("nothing was committed"), "{stderr}");
    assert_eq!(env.versions(name), [1, 2]);

    // A sync now holds the disks alone: the RAM file of the dead guest is
    // left out, and there is no device state to pair it with.
    let report = env.json(&["sync", name]);
    assert_eq!(report["committed"], true, "{report}");
    assert_eq!(report["left_out"], serde_json::json!([RAM]), "{report}");
    let v3 = env.manifest(name, 3);
    assert!(!has_file(&v3, RAM) && !has_file(&v3, STATE), "disks alone");
    assert!(has_file(&v3, "disk.img"));

    boots_again(&env, name, &boot, before);
    suspend_lazy(&env, name);
    assert_eq!(env.versions(name), [1, 2, 3, 4]);
}

#[test]
fn a_killed_isrfsd_never_pairs_its_ram_with_old_device_state() {
    let env = Env::local();
    let name = "daemon";
    import_guest(&env, name);
    resume(&env, name);
    count_on(&env, name, 0, 2);
    suspend_lazy(&env, name);

    let (_, boot, _) = resume_and_count(&env, name);
    let before = counters(&serial_lines(&env, name)).last().unwrap().0;
    env.kill_daemon();
    // The next resume starts a daemon, reattaches the session (its RAM file
    // changed in place, its device state consumed) and boots.
    boots_again(&env, name, &boot, before);
    assert_eq!(env.versions(name), [1, 2], "nothing committed");
    let answer = suspend_lazy(&env, name);
    assert_eq!(answer["checkin"]["version"], 3);
    env.ok(&["verify", name]);
}

/// Stored chunks of `file` in the version, with their stored sizes, that are
/// in `tags`.
fn stored_bytes_of(env: &Env, name: &str, version: u64, tags: &HashSet<ChunkTag>) -> u64 {
    env.manifest(name, version)
        .stored_chunks()
        .filter(|(tag, _)| tags.contains(tag))
        .collect::<std::collections::HashMap<_, _>>()
        .values()
        .sum()
}

#[test]
fn the_working_set_is_fetched_first_and_little_else_before_the_guest_goes_on() {
    let a = Env::local();
    let name = "wset";
    import_guest(&a, name);
    resume(&a, name);
    count_on(&a, name, 0, 2);
    suspend_lazy(&a, name);
    // A resume from memory records what the guest touches first; the
    // suspend stores it with version 3.
    resume_and_count(&a, name);
    suspend_lazy(&a, name);
    let key = isr::layout::working_set(name, 3);
    let working_set = std::fs::read(PathBuf::from(&a.store).join(&key))
        .unwrap_or_else(|e| panic!("version 3 has no working set {key}: {e}"));
    let (_runtime, _store, parcel) = a.open_parcel(name);
    let tags: Vec<ChunkTag> = isr::trace::open(
        &working_set,
        &parcel.secrets.parcel_key,
        &parcel.id,
        3,
        &key,
    )
    .unwrap();
    assert!(!tags.is_empty());
    let v3 = a.manifest(name, 3);
    let ram: HashSet<ChunkTag> = file_chunks(&v3, RAM).into_keys().collect();
    assert!(
        tags.iter().all(|t| ram.contains(t)),
        "the working set is chunks of version 3's RAM file"
    );

    // C: cold cache, no background prefetch: what it fetches before the
    // guest's first progress is the working set and what the guest asks for.
    let c = a.another_machine();
    c.append_config("\n[fetch]\nprefetch = false\n");
    let answer = resume(&c, name);
    assert_eq!(answer["vm"]["resumed_from_memory"], true);
    count_on(&c, name, 0, 1);
    let status = status(&c, name);
    let fetched = status["fetch"]["fetched_bytes"].as_u64().unwrap();
    assert_eq!(
        status["working_set_chunks"].as_u64().unwrap(),
        tags.len() as u64,
        "{status}"
    );
    let boot_files: HashSet<ChunkTag> = ["vmlinuz", "initrd.img", STATE]
        .iter()
        .flat_map(|f| file_chunks(&v3, f).into_keys())
        .collect();
    let working_set: HashSet<ChunkTag> = tags.iter().copied().collect();
    let expected = stored_bytes_of(
        &c,
        name,
        3,
        &working_set.union(&boot_files).copied().collect(),
    );
    eprintln!(
        "C: {} working-set chunks; {fetched} bytes fetched by the first progress; working set + boot files {expected} bytes",
        tags.len()
    );
    assert!(
        fetched <= 2 * expected,
        "fetched {fetched} bytes before the first progress, more than twice the working set and boot files ({expected})"
    );
    c.ok(&["discard", name]);
}

/// The RAM file's stored bytes and zero chunks in the version a suspend
/// makes after the guest wrote 100 MiB of random data into its memory and freed
/// it, with or without free page reporting.
fn ram_after_the_guest_freed_memory(reporting: bool) -> (u64, usize) {
    let env = Env::local();
    env.append_config("\n[upload]\ntrickle = false\n");
    let name = if reporting { "reporting" } else { "silent" };
    let socket = env.path("ctl.sock");
    let mut extra = vec!["-no-reboot".to_owned()];
    extra.extend(guest::control_args(&socket));
    let vm_toml = format!(
        "free_page_reporting = {reporting}\n{}",
        support::vm::guest_vm_toml("qemu", &extra)
    );
    support::vm::import_guest(&env, name, &vm_toml);
    resume(&env, name);
    // After its boot the guest reports the memory it freed, up to 64 MiB at a
    // time held off its free lists: a 256 MiB guest that allocates 100 MiB
    // meanwhile can run out of memory. Let that settle first.
    count_on(&env, name, 0, 6);
    guest::send_control(&socket, "mem 100 random");
    let done = wait_for_control(&env, name, "mem ");
    assert!(
        done.starts_with("mem done bytes=104857600"),
        "{done}; serial console:\n{}",
        String::from_utf8_lossy(&std::fs::read(support::vm::serial_log(&env, name)).unwrap())
    );
    guest::send_control(&socket, "free");
    wait_for_control(&env, name, "free done");
    // The guest reports free pages a few seconds after they are freed.
    let seen = counters(&serial_lines(&env, name)).len();
    count_on(&env, name, seen, 6);
    let answer = suspend_lazy(&env, name);
    let manifest = env.manifest(name, answer["checkin"]["version"].as_u64().unwrap());
    let (_, _, chunks) = manifest.files().find(|(path, _, _)| *path == RAM).unwrap();
    let zero = chunks
        .iter()
        .filter(|c| matches!(c, isr::chunk::ChunkRef::Zero))
        .count();
    (file_chunks(&manifest, RAM).values().sum(), zero)
}

#[test]
fn free_page_reporting_turns_freed_guest_memory_into_zero_chunks() {
    let (reported, reported_zero) = ram_after_the_guest_freed_memory(true);
    let (silent, silent_zero) = ram_after_the_guest_freed_memory(false);
    eprintln!(
        "RAM file after 100 MiB written and freed: {reported} stored bytes, {reported_zero} zero chunks with free page reporting; {silent} stored bytes, {silent_zero} zero chunks without"
    );
    assert!(
        reported + (64 << 20) < silent,
        "freed memory is not stored with reporting ({reported} bytes) as it is without ({silent})"
    );
    assert!(
        reported_zero > silent_zero + 500,
        "{reported_zero} vs {silent_zero} zero chunks"
    );
}

/// Rewrites the parcel's vm.toml through a `--vmm none` session and checks
/// it in (nothing of the saved memory is consumed: no VM starts).
fn set_memory_mode(env: &Env, name: &str, mode: &str) {
    let mount = PathBuf::from(env.ok(&["resume", "--vmm", "none", name]).trim());
    let path = mount.join("vm.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("memory_mode"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, format!("memory_mode = \"{mode}\"\n{text}")).unwrap();
    env.ok(&["checkin", name]);
}

#[test]
fn a_version_saved_in_one_mode_resumes_in_the_other() {
    let env = Env::local();
    let name = "modes";
    let vm_toml = format!(
        "memory_mode = \"image\"\n{}",
        support::vm::guest_vm_toml("qemu", &["-no-reboot".to_owned()])
    );
    support::vm::import_guest(&env, name, &vm_toml);
    let answer = resume(&env, name);
    assert!(answer["vm"]["ram_file"].is_null(), "image mode: {answer}");
    let boot = count_on(&env, name, 0, 2)[0].1.clone();
    let answer = suspend(&env, name);
    assert!(answer["saved"]["ram_file"].is_null(), "{answer}");
    let version = env.versions(name).last().copied().unwrap();
    assert!(has_file(&env.manifest(name, version), "memory.img"));

    // Image → lazy: the memory image loads into RAM on the mount; the suspend
    // saves the device state beside it.
    set_memory_mode(&env, name, "lazy");
    let (answer, same, _) = resume_and_count(&env, name);
    assert_eq!(same, boot, "{answer}");
    assert!(!answer["vm"]["ram_file"].is_null(), "{answer}");
    let answer = suspend_lazy(&env, name);
    let version = answer["checkin"]["version"].as_u64().unwrap();
    assert!(
        !has_file(&env.manifest(name, version), "memory.img"),
        "consumed"
    );

    // Lazy → image: the device state resumes over its RAM file; the suspend
    // saves a memory image, and the RAM file without device state is left out.
    set_memory_mode(&env, name, "image");
    let (_, same, _) = resume_and_count(&env, name);
    assert_eq!(same, boot);
    let answer = suspend(&env, name);
    assert!(
        answer["saved"]["memory_image"]
            .as_str()
            .unwrap()
            .ends_with("memory.img")
    );
    assert_eq!(
        answer["checkin"]["left_out"],
        serde_json::json!([RAM]),
        "{answer}"
    );
    let version = answer["checkin"]["version"].as_u64().unwrap();
    let manifest = env.manifest(name, version);
    assert!(has_file(&manifest, "memory.img"));
    assert!(!has_file(&manifest, RAM) && !has_file(&manifest, STATE));

    let (answer, same, _) = resume_and_count(&env, name);
    assert_eq!(same, boot);
    assert!(answer["vm"]["ram_file"].is_null(), "{answer}");
    suspend(&env, name);
    env.ok(&["verify", name]);
}

#[test]
fn a_failed_lazy_suspend_commits_nothing_and_the_vm_goes_on() {
    let env = Env::local();
    let name = "nosave";
    import_guest(&env, name);
    let answer = resume(&env, name);
    let mount = PathBuf::from(answer["mount"].as_str().unwrap());
    let boot = count_on(&env, name, 0, 2)[0].1.clone();

    // Where QEMU writes the device state there is a directory: the save fails.
    let blocker = mount.join(format!(".{STATE}.partial"));
    std::fs::create_dir(&blocker).unwrap();
    let stderr = env.fails(&["suspend", name], 1);
    assert!(stderr.contains("goes on running"), "{stderr}");
    assert!(stderr.contains("nothing was committed"), "{stderr}");
    assert_eq!(env.versions(name), [1]);
    assert!(!mount.join(STATE).exists());
    let seen = counters(&serial_lines(&env, name)).len();
    let after = count_on(&env, name, seen, 2);
    assert_eq!(after[seen].1, boot, "the same boot goes on");

    std::fs::remove_dir(&blocker).unwrap();
    suspend_lazy(&env, name);
    let (_, same, _) = resume_and_count(&env, name);
    assert_eq!(same, boot);
    env.ok(&["discard", name]);
}
