//! The lazy mount, for real: `isrctl resume` → isrfsd → a FUSE mount on
//! /dev/fuse, driven with ordinary file I/O from several threads.

mod support;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::Env;

const CHUNK: u64 = 128 * 1024;

fn resume(env: &Env, name: &str) -> PathBuf {
    let value = env.json(&["resume", name]);
    PathBuf::from(value["mount"].as_str().unwrap())
}

/// The stored chunks of version 1 of `name`, read through the library.
fn base_tags(env: &Env, name: &str) -> Vec<isr::chunk::ChunkTag> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = isr::store::open(&env.store, &Default::default(), support::quick_retry()).unwrap();
    let credentials = vec![isr::keys::Credential::Passphrase(
        isr::keys::Zeroizing::new(support::PASSPHRASE.into()),
    )];
    let parcel = runtime
        .block_on(isr::parcel::open(&store, name, &credentials))
        .unwrap();
    let manifest = runtime
        .block_on(isr::parcel::read_manifest(&store, &parcel, 1))
        .unwrap();
    isr::parcel::distinct_chunks(&manifest)
        .into_iter()
        .map(|(tag, ..)| tag)
        .collect()
}

fn status(env: &Env, name: &str) -> serde_json::Value {
    env.json(&["status", name])["sessions"][0].clone()
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn random_read_write_workload_through_the_mount_matches_a_reference() {
    Env::require_fuse();
    let env = Env::local();
    let size = 16 << 20;
    let initial = support::random_bytes("workload", size);
    env.import_files(
        "vm",
        &[
            ("disk.img", initial.clone()),
            ("vm.toml", b"memory = 512\n".to_vec()),
        ],
    );
    let mount = resume(&env, "vm");
    assert_eq!(
        std::fs::read(mount.join("disk.img")).unwrap(),
        initial,
        "lazy reads return the base bytes"
    );

    // Four threads, each owning a quarter, write and read at random offsets and
    // sizes across chunk boundaries, with fsyncs, against their own model.
    let reference = Arc::new(Mutex::new(initial));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (path, reference) = (mount.join("disk.img"), reference.clone());
            std::thread::spawn(move || {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .unwrap();
                let quarter = (size / 4) as u64;
                let mut rng = 0x1234_5678 + t;
                for op in 0..150u64 {
                    let len = (xorshift(&mut rng) % (300 * 1024)) as usize + 1;
                    let offset = t * quarter + xorshift(&mut rng) % (quarter - len as u64);
                    if op % 3 == 2 {
                        let mut buffer = vec![0u8; len];
                        file.read_exact_at(&mut buffer, offset).unwrap();
                        let model = reference.lock().unwrap();
                        assert_eq!(
                            buffer,
                            model[offset as usize..offset as usize + len],
                            "thread {t} op {op}"
                        );
                    } else {
                        let data = support::random_bytes(&format!("{t}-{op}"), len);
                        file.write_all_at(&data, offset).unwrap();
                        reference.lock().unwrap()[offset as usize..offset as usize + len]
                            .copy_from_slice(&data);
                    }
                    if op % 20 == 0 {
                        file.sync_all().unwrap();
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let expected = reference.lock().unwrap().clone();
    assert_eq!(std::fs::read(mount.join("disk.img")).unwrap(), expected);

    // Namespace operations through the mount.
    std::fs::create_dir(mount.join("logs")).unwrap();
    std::fs::write(mount.join("logs/a.txt"), b"first").unwrap();
    std::fs::rename(mount.join("logs/a.txt"), mount.join("vm.toml")).unwrap();
    assert_eq!(std::fs::read(mount.join("vm.toml")).unwrap(), b"first");
    let file = OpenOptions::new()
        .write(true)
        .open(mount.join("disk.img"))
        .unwrap();
    file.set_len(5 * CHUNK + 17).unwrap();
    drop(file);
    assert_eq!(
        std::fs::read(mount.join("disk.img")).unwrap(),
        expected[..(5 * CHUNK + 17) as usize]
    );
    let mut names: Vec<String> = std::fs::read_dir(&mount)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec![".isr", "disk.img", "logs", "vm.toml"]);

    // Discard: unmounted, lock released, the session's own chunks and state
    // wiped, the store still holds only version 1.
    assert!(status(&env, "vm")["dirty_chunks"].as_u64().unwrap() > 0);
    env.ok(&["discard", "vm"]);
    assert!(
        !env.path("state/sessions/vm").exists(),
        "session state wiped"
    );
    let base: std::collections::HashSet<String> = base_tags(&env, "vm")
        .iter()
        .map(|t| t.to_hex())
        .chain(env.segments("vm", 1))
        .collect();
    for name in support::cached_chunk_tags(&env.path("cache")) {
        assert!(
            base.contains(&name),
            "a chunk written by the discarded session is still cached: {name}"
        );
    }
    let store = PathBuf::from(&env.store);
    assert!(!store.join("parcels/vm/lock").exists());
    assert_eq!(env.json(&["ls"])["parcels"][0]["newest_version"], 1);
    let mount_again = resume(&env, "vm");
    assert_eq!(
        std::fs::read(mount_again.join("vm.toml")).unwrap(),
        b"memory = 512\n",
        "discarded changes are gone"
    );
}

#[test]
fn the_daemon_isrctl_starts_has_two_malloc_arenas() {
    // Fewer glibc arenas keep isrfsd's peak RSS down (docs/decisions.md).
    Env::require_fuse();
    let env = Env::local();
    env.import_files("vm", &[("a.txt", b"a")]);
    resume(&env, "vm");
    let pid = env.daemon_pid().expect("isrctl started isrfsd");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ
            .split(|&b| b == 0)
            .any(|variable| variable == b"MALLOC_ARENA_MAX=2"),
        "isrfsd's environment: {}",
        String::from_utf8_lossy(&environ)
    );
    // And a fixed mmap threshold, so fuser's 16 MiB buffer per FUSE thread
    // stays mapped, not resident (docs/decisions.md; tests/many_sessions.rs).
    assert!(
        environ
            .split(|&b| b == 0)
            .any(|variable| variable == b"MALLOC_MMAP_THRESHOLD_=8388608"),
        "isrfsd's environment: {}",
        String::from_utf8_lossy(&environ)
    );
}

#[test]
fn concurrent_readers_cause_one_fetch_per_chunk() {
    Env::require_fuse();
    let env = Env::local();
    let data = support::random_bytes("readers", 4 << 20);
    env.import_files("vm", &[("disk.img", data.clone())]);
    let mount = resume(&env, "vm");
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let path = mount.join("disk.img");
            std::thread::spawn(move || std::fs::read(path).unwrap())
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.join().unwrap(), data);
    }
    let status = status(&env, "vm");
    assert_eq!(status["chunks_local"], status["chunks_total"]);
    assert_eq!(
        status["fetch"]["fetched_chunks"], status["chunks_total"],
        "every chunk downloaded exactly once: {status:#}"
    );
}

#[test]
fn a_second_machine_is_refused_with_the_holders_name() {
    Env::require_fuse();
    let a = Env::local();
    a.import_files(
        "vm",
        &[("disk.img", support::random_bytes("machines", 1 << 20))],
    );
    resume(&a, "vm");
    // Machine B: same store, its own state, cache and runtime directories.
    let b_dir = tempfile::tempdir().unwrap();
    let on_b = |args: &[&str]| {
        a.isrctl()
            .env("ISR_STATE_DIR", b_dir.path().join("state"))
            .env("ISR_CACHE_DIR", b_dir.path().join("cache"))
            .env("ISR_RUNTIME_DIR", b_dir.path().join("run"))
            .args(args)
            .output()
            .unwrap()
    };
    let refused = on_b(&["resume", "vm"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("is locked by") && stderr.contains("isrctl unlock --force vm"),
        "{stderr}"
    );
    a.ok(&["discard", "vm"]);
    let resumed = on_b(&["resume", "vm"]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let socket = isr::control::socket_path(&b_dir.path().join("run"));
    isr::control::call(&socket, isr::control::Request::Shutdown).unwrap();
    std::thread::sleep(Duration::from_millis(500));
}

#[test]
fn a_corrupt_chunk_gives_eio_for_its_range_only() {
    Env::require_fuse();
    let env = Env::local();
    let data = support::random_bytes("corrupt", 8 * CHUNK as usize);
    env.import_files("vm", &[("disk.img", data.clone())]);
    // Find chunk 3's object through the library and damage it in the store.
    let tag = base_tags(&env, "vm")[3];
    let object = Path::new(&env.store).join(isr::layout::chunk(&tag));
    let mut bytes = std::fs::read(&object).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&object, bytes).unwrap();

    let mount = resume(&env, "vm");
    let file = std::fs::File::open(mount.join("disk.img")).unwrap();
    let mut buffer = vec![0u8; CHUNK as usize];
    let error = file.read_exact_at(&mut buffer, 3 * CHUNK + 10).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc_eio()), "{error}");
    for index in [0u64, 2, 4, 7] {
        file.read_exact_at(&mut buffer, index * CHUNK).unwrap();
        assert_eq!(
            buffer,
            data[(index * CHUNK) as usize..((index + 1) * CHUNK) as usize]
        );
    }
    let status = status(&env, "vm");
    assert!(
        status["fetch"]["verify_failures"].as_u64().unwrap() >= 1,
        "{status:#}"
    );
}

fn libc_eio() -> i32 {
    nix::errno::Errno::EIO as i32
}

#[test]
fn fsynced_writes_survive_kill_9_of_the_daemon_twenty_times() {
    Env::require_fuse();
    let env = Env::local();
    let size: u64 = 64 << 20;
    env.import_files("vm", &[("disk.img", vec![0u8; size as usize])]);
    let blocks = size / 4096;
    let mut acknowledged: Vec<u64> = Vec::new();
    let mut next_record = 0u64;
    let mut rng = 42u64;
    for round in 0..20 {
        let mount = resume(&env, "vm");
        let path = mount.join("disk.img");
        // Everything acknowledged in earlier rounds is there after the restart.
        let file = std::fs::File::open(&path).unwrap();
        for &record in &acknowledged {
            let mut block = vec![0u8; 4096];
            file.read_exact_at(&mut block, (record * 7 % blocks) * 4096)
                .unwrap();
            assert_eq!(
                &block[..8],
                &record.to_le_bytes(),
                "round {round}: record {record} lost"
            );
        }
        drop(file);
        let acknowledged_now = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let acknowledged_now = acknowledged_now.clone();
            let first = next_record;
            std::thread::spawn(move || {
                let Ok(file) = OpenOptions::new().write(true).open(&path) else {
                    return;
                };
                for record in first.. {
                    let mut block = vec![0u8; 4096];
                    block[..8].copy_from_slice(&record.to_le_bytes());
                    if file
                        .write_all_at(&block, (record * 7 % blocks) * 4096)
                        .is_err()
                        || file.sync_data().is_err()
                    {
                        return;
                    }
                    acknowledged_now.lock().unwrap().push(record);
                }
            })
        };
        std::thread::sleep(Duration::from_millis(50 + xorshift(&mut rng) % 250));
        env.kill_daemon();
        writer.join().unwrap();
        let now = acknowledged_now.lock().unwrap().clone();
        next_record += now.len() as u64 + 1;
        acknowledged.extend(now);
    }
    println!(
        "{} acknowledged writes checked across 20 kills",
        acknowledged.len()
    );
    assert!(acknowledged.len() > 20, "the writer made progress");
    let mount = resume(&env, "vm");
    let file = std::fs::File::open(mount.join("disk.img")).unwrap();
    for &record in &acknowledged {
        let mut block = vec![0u8; 8];
        file.read_exact_at(&mut block, (record * 7 % blocks) * 4096)
            .unwrap();
        assert_eq!(block, record.to_le_bytes(), "record {record} lost");
    }
}

#[test]
fn a_hoarded_parcel_reads_fully_without_its_store() {
    Env::require_fuse();
    let env = Env::local();
    let data = support::random_bytes("hoard", 6 << 20);
    env.import_files("vm", &[("disk.img", data.clone())]);
    let mount = resume(&env, "vm");
    let hoarded = env.json(&["hoard", "vm"]);
    assert!(hoarded["chunks"].as_u64().unwrap() >= 48);
    // The store disappears (disconnected operation).
    std::fs::rename(&env.store, env.path("store-away")).unwrap();
    assert_eq!(std::fs::read(mount.join("disk.img")).unwrap(), data);
    std::fs::rename(env.path("store-away"), &env.store).unwrap();
}

#[test]
fn stats_and_chunk_maps_are_readable_inside_the_mount() {
    Env::require_fuse();
    let env = Env::local();
    env.import_files(
        "vm",
        &[(
            "disk.img",
            support::random_bytes("stats", 3 * CHUNK as usize),
        )],
    );
    let mount = resume(&env, "vm");
    std::fs::read(mount.join("disk.img")).unwrap();
    // A map opened now keeps this moment however it is read.
    let opened_before = std::fs::File::open(mount.join(".isr/chunks")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(mount.join("disk.img"))
        .unwrap()
        .write_all_at(b"x", 0)
        .unwrap();
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(mount.join(".isr/stats")).unwrap()).unwrap();
    assert_eq!(stats["parcel"], "vm");
    assert_eq!(stats["chunks_total"], 3);
    let maps = std::fs::read_to_string(mount.join(".isr/chunks")).unwrap();
    // Closing them succeeds too (`cat` reports an error from close).
    for file in [".isr/chunks", ".isr/stats"] {
        let cat = std::process::Command::new("cat")
            .arg(mount.join(file))
            .output()
            .unwrap();
        assert!(cat.status.success(), "cat {file}: {cat:?}");
    }
    // The one-byte write went to the fsync log at close: durable, and dirty
    // until the chunk is sealed.
    assert_eq!(maps.trim(), "disk.img: DLL", "{maps}");
    let mut before = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        match opened_before
            .read_at(&mut byte, before.len() as u64)
            .unwrap()
        {
            0 => break,
            _ => before.push(byte[0]),
        }
    }
    assert_eq!(String::from_utf8(before).unwrap(), "disk.img: LLL\n");
    let names: Vec<String> = std::fs::read_dir(mount.join(".isr"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2);
    assert!(
        std::fs::write(mount.join(".isr/new"), b"no").is_err(),
        ".isr is read-only"
    );
}

#[test]
fn sigterm_flushes_unmounts_and_the_session_stays_resumable() {
    Env::require_fuse();
    let env = Env::local();
    env.import_files(
        "vm",
        &[(
            "disk.img",
            support::random_bytes("term", 2 * CHUNK as usize),
        )],
    );
    let mount = resume(&env, "vm");
    std::fs::write(mount.join("notes.txt"), b"written before SIGTERM").unwrap();
    let pid = env.daemon_pid().expect("isrfsd runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(support::wait_for_exit(pid), "isrfsd exited");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(mount.to_str().unwrap()), "unmounted");
    assert!(
        !isr::control::socket_path(&env.path("run")).exists(),
        "socket removed"
    );
    let again = env.json(&["resume", "vm"]);
    assert_eq!(again["reattached"], true);
    assert_eq!(
        std::fs::read(mount.join("notes.txt")).unwrap(),
        b"written before SIGTERM"
    );
}

#[test]
fn with_the_store_stopped_local_reads_go_on_and_missing_ones_wait_for_it() {
    Env::require_fuse();
    let mut server = support::SeaweedFs::start();
    let env = Env::s3(&server, "stopped");
    env.append_config("\n[fetch]\nprefetch = false\n");
    let data = support::random_bytes("stopped", 16 * CHUNK as usize);
    env.import_files("vm", &[("disk.img", data.clone())]);
    let mount = resume(&env, "vm");
    let file = std::fs::File::open(mount.join("disk.img")).unwrap();
    let mut chunk = vec![0u8; CHUNK as usize];
    file.read_exact_at(&mut chunk, 0).unwrap();

    server.kill();
    file.read_exact_at(&mut chunk, 0).unwrap();
    assert_eq!(
        chunk,
        data[..CHUNK as usize],
        "a local chunk reads with the store down"
    );
    let reader = support::read_in_background(mount.join("disk.img"), 9 * CHUNK, CHUNK as usize);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !reader.is_finished(),
        "a read of a missing chunk waits while the store is down"
    );
    server.restart();
    let chunk = reader.join().unwrap().unwrap_or_else(|e| {
        panic!(
            "the read completes once the store is back: {e}; isrfsd's log:\n{}",
            env.daemon_log()
        )
    });
    assert_eq!(chunk, data[9 * CHUNK as usize..10 * CHUNK as usize]);
    let status = status(&env, "vm");
    assert!(
        status["fetch"]["retries"].as_u64().unwrap() >= 1,
        "{status:#}"
    );
    assert_eq!(status["fetch"]["failures"], 0);
}

#[test]
fn isrfsd_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let env = Env::local();
    let notify = std::os::unix::net::UnixDatagram::bind(env.path("notify.sock")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut daemon = std::process::Command::new(support::binary("isrfsd"))
        .args(["--no-detach", "--runtime-dir"])
        .arg(env.path("run"))
        .arg("--state-dir")
        .arg(env.path("state"))
        .arg("--cache-dir")
        .arg(env.path("cache"))
        .env("NOTIFY_SOCKET", env.path("notify.sock"))
        .env("ISR_CONFIG", &env.config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut message = [0u8; 64];
    let n = notify.recv(&mut message).expect("READY=1 from isrfsd");
    assert_eq!(message[..n].trim_ascii_end(), b"READY=1");
    assert!(
        isr::control::socket_path(&env.path("run")).exists(),
        "ready means the socket answers"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = notify.recv(&mut message).expect("STOPPING=1 from isrfsd");
    assert_eq!(message[..n].trim_ascii_end(), b"STOPPING=1");
    assert!(daemon.wait().unwrap().success());
}
