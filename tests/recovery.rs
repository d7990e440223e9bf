//! Recovery from what goes wrong around a resumed parcel (issue #14): a
//! daemon killed and resumed at once, a mount unmounted behind the daemon's
//! back, a resume that fails half-way, a store that is down or has lost a
//! chunk, a client flooding the control socket. Real isrfsd, real FUSE mounts.

mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::Env;

const CHUNK: u64 = 128 * 1024;

fn resume(env: &Env, name: &str) -> PathBuf {
    let value = env.json(&["resume", name]);
    PathBuf::from(value["mount"].as_str().unwrap())
}

/// Whether `mount` is a live FUSE mount (statfs goes to its daemon).
fn is_live_fuse_mount(mount: &Path) -> bool {
    nix::sys::statfs::statfs(mount)
        .is_ok_and(|stats| stats.filesystem_type() == nix::sys::statfs::FUSE_SUPER_MAGIC)
}

fn write_synced(path: &Path, data: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    file.write_all_at(data, 0).unwrap();
    file.sync_all().unwrap();
}

/// isrfsd's log once it holds `line` (its file writer runs in the
/// background), or as it is after 10 s.
fn daemon_log_with(env: &Env, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = env.daemon_log();
        if log.contains(line) || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn resume_right_after_a_daemon_crash_reattaches_ten_times_in_a_row() {
    Env::require_fuse();
    let env = Env::local();
    env.import_files("vm", &[("disk.img", vec![7u8; 4 * CHUNK as usize])]);
    for round in 0..10u8 {
        let mount = resume(&env, "vm");
        write_synced(&mount.join(format!("round-{round}")), &[round; 100]);
        // The kernel now caches the root's attributes (for a second): a
        // dead-mount check that trusts `stat` takes the dead mount for a
        // live one, and mounting over it fails.
        std::fs::metadata(&mount).unwrap();
        env.kill_daemon();
        std::thread::sleep(Duration::from_millis(200));
        let again = env.json(&["resume", "vm"]);
        assert_eq!(again["reattached"], true, "round {round}: {again}");
        assert!(is_live_fuse_mount(&mount), "round {round}: mount is live");
        for earlier in 0..=round {
            assert_eq!(
                std::fs::read(mount.join(format!("round-{earlier}"))).unwrap(),
                [earlier; 100],
                "round {round}: file of round {earlier}"
            );
        }
        env.kill_daemon();
    }
    let report = env.json(&["checkin", "vm"]);
    assert_eq!(report["version"], 2, "{report}");
    let mount = resume(&env, "vm");
    assert_eq!(std::fs::read(mount.join("round-9")).unwrap(), [9u8; 100]);
}

#[test]
fn an_unmount_behind_the_daemon_is_noticed_and_resume_mounts_again() {
    Env::require_fuse();
    let env = Env::local();
    env.import_files("vm", &[("disk.img", vec![1u8; 2 * CHUNK as usize])]);
    let mount = resume(&env, "vm");
    write_synced(&mount.join("before"), b"written before the unmount");

    // Unmounted behind the daemon's back, then resumed at once: resume
    // itself finds the mount gone and mounts it again.
    nix::mount::umount(&mount).unwrap();
    assert!(!is_live_fuse_mount(&mount));
    let again = env.json(&["resume", "vm"]);
    assert_eq!(again["mount"], mount.display().to_string(), "{again}");
    assert!(is_live_fuse_mount(&mount), "resume mounted it again");
    assert_eq!(
        std::fs::read(mount.join("before")).unwrap(),
        b"written before the unmount"
    );

    // Unmounted again and left alone: the daemon notices, and status says so.
    nix::mount::umount(&mount).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = env.json(&["status", "vm"])["sessions"].clone();
        if status[0]["mounted"] == false {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon noticed the unmount: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = daemon_log_with(&env, "the mount ended behind isrfsd's back");
    assert!(
        log.contains("the mount ended behind isrfsd's back"),
        "{log}"
    );
    let text = env.ok(&["status"]);
    assert!(text.contains("not mounted"), "{text}");
    resume(&env, "vm");
    assert!(is_live_fuse_mount(&mount));
    assert_eq!(env.json(&["status", "vm"])["sessions"][0]["mounted"], true);
    write_synced(&mount.join("after"), b"written after mounting again");
    let report = env.json(&["checkin", "vm"]);
    assert_eq!(report["version"], 2, "{report}");

    let mount = resume(&env, "vm");
    assert_eq!(
        std::fs::read(mount.join("before")).unwrap(),
        b"written before the unmount"
    );
    assert_eq!(
        std::fs::read(mount.join("after")).unwrap(),
        b"written after mounting again"
    );
}

#[test]
fn a_resume_that_fails_gives_back_the_lock_and_leaves_no_session() {
    let env = Env::local();
    env.import_files("vm", &[("disk.img", vec![3u8; CHUNK as usize])]);
    let manifest = env.path("store/parcels/vm/versions/0000000001.manifest");
    let original = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, support::random_bytes("damaged", original.len())).unwrap();

    let resumed = env.run(&["resume", "vm"]);
    assert_eq!(resumed.status.code(), Some(7), "{resumed:?}");
    assert!(
        !env.path("store/parcels/vm/lock").exists(),
        "the failed resume released the lock"
    );
    assert_eq!(env.json(&["status"])["sessions"], serde_json::json!([]));
    // Another machine is told about the damage, not about a lock.
    let other = env.another_machine();
    let resumed = other.run(&["resume", "vm"]);
    assert_eq!(resumed.status.code(), Some(7), "{resumed:?}");

    // Repaired, the parcel resumes (on either machine) as if nothing happened.
    std::fs::write(&manifest, &original).unwrap();
    Env::require_fuse();
    let mount = resume(&env, "vm");
    assert_eq!(
        std::fs::read(mount.join("disk.img")).unwrap(),
        vec![3u8; CHUNK as usize]
    );
}

#[test]
fn an_open_does_not_wait_for_a_read_that_waits_for_the_store() {
    Env::require_fuse();
    let mut server = support::SeaweedFs::start();
    let env = Env::s3(&server, "open-during-outage");
    env.append_config("\n[fetch]\nprefetch = false\n");
    let data = support::random_bytes("outage", 16 * CHUNK as usize);
    env.import_files("vm", &[("disk.img", data.clone())]);
    let mount = resume(&env, "vm");
    let path = mount.join("disk.img");

    server.kill();
    let reader = support::read_in_background(path.clone(), 9 * CHUNK, CHUNK as usize);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.json(&["status", "vm"])["sessions"][0]["fetch"]["in_flight"] == 0 {
        assert!(Instant::now() < deadline, "the read reached the fetcher");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Opening the file again (as a VMM or a backup tool would) while that
    // read waits must not wait for it.
    let opener = std::thread::spawn(move || {
        for _ in 0..3 {
            drop(std::fs::File::open(&path).unwrap());
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !opener.is_finished() {
        assert!(
            Instant::now() < deadline,
            "open() waited for a pending read (the store is still down)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!reader.is_finished(), "the read still waits for the store");

    server.restart();
    let chunk = reader.join().unwrap().unwrap();
    assert_eq!(chunk, data[9 * CHUNK as usize..10 * CHUNK as usize]);
    // Pages kept across opens are the file's bytes.
    let whole = std::fs::read(mount.join("disk.img")).unwrap();
    assert!(whole == data, "the file reads back whole");
}

#[test]
fn a_chunk_missing_from_the_store_is_remembered_and_shown() {
    Env::require_fuse();
    let env = Env::local();
    env.append_config("\n[fetch]\nprefetch = false\n");
    let data = support::random_bytes("deleted", 4 * CHUNK as usize);
    env.import_files("vm", &[("disk.img", data.clone())]);
    let manifest = env.manifest("vm", 1);
    let (_, _, chunks) = manifest.files().next().unwrap();
    let lost = chunks[2].tag().unwrap();
    std::fs::remove_file(Path::new(&env.store).join(isr::layout::chunk(&lost))).unwrap();

    let mount = resume(&env, "vm");
    let file = std::fs::File::open(mount.join("disk.img")).unwrap();
    let mut chunk = vec![0u8; CHUNK as usize];
    for attempt in 0..3 {
        let error = file.read_exact_at(&mut chunk, 2 * CHUNK).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(nix::libc::EIO), "read {attempt}");
    }
    file.read_exact_at(&mut chunk, 3 * CHUNK).unwrap();
    assert_eq!(chunk, data[3 * CHUNK as usize..]);

    // The store was given up on once; the later reads knew better at once.
    let status = env.json(&["status", "vm"])["sessions"][0].clone();
    assert_eq!(status["fetch"]["failures"], 1, "{status:#}");
    assert_eq!(status["fetch"]["missing_chunks"], 1, "{status:#}");
    let text = env.ok(&["status"]);
    assert!(text.contains("1 missing from the store"), "{text}");
}

fn proc_status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

fn threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

#[test]
fn the_control_socket_bounds_lines_and_connections() {
    use std::io::{BufRead, Read, Write};
    use std::os::unix::net::UnixStream;
    Env::require_fuse();
    let env = Env::local();
    env.import_files("vm", &[("disk.img", vec![5u8; CHUNK as usize])]);
    resume(&env, "vm");
    let pid = env.daemon_pid().unwrap();
    let socket = isr::control::socket_path(&env.path("run"));
    let rss_before = proc_status_kib(pid, "VmRSS:");

    // 200 MB without a newline: refused after the first MiB, with an answer.
    let mut stream = UnixStream::connect(&socket).unwrap();
    let block = vec![b'x'; 1 << 20];
    let mut sent = 0usize;
    while sent < 200 {
        if stream.write_all(&block).is_err() {
            break;
        }
        sent += 1;
    }
    assert!(sent < 200, "the daemon stopped reading the endless line");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.contains("longer than"), "{answer}");
    assert_eq!(answer.trim_end().lines().count(), 1, "{answer}");
    let rss_after = proc_status_kib(pid, "VmRSS:");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS {rss_before} KiB before, {rss_after} KiB after"
    );

    // 300 idle connections: at most MAX_CONNECTIONS get a thread, the rest
    // an error line each.
    let threads_before = threads(pid);
    let idle: Vec<UnixStream> = (0..300)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let mut refused = 0;
    for stream in &idle {
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut line = String::new();
        if std::io::BufReader::new(stream).read_line(&mut line).is_ok() && !line.is_empty() {
            assert!(line.contains("control connections"), "{line}");
            refused += 1;
        }
    }
    assert_eq!(refused, 300 - isr::control::MAX_CONNECTIONS);
    let threads_with_idle = threads(pid);
    assert!(
        threads_with_idle <= threads_before + isr::control::MAX_CONNECTIONS,
        "{threads_before} threads before, {threads_with_idle} with 300 idle connections"
    );
    drop(idle);
    // Once they are closed, the daemon answers as before.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = env.run(&["status", "vm"]);
        if status.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "{status:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn session_state_holds_no_names_and_is_owner_only() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    Env::require_fuse();
    let env = Env::local();
    env.import_files("vm", &[("quarterly-report.img", vec![9u8; CHUNK as usize])]);
    // Directories left open by an older version are tightened.
    for dir in ["state", "cache"] {
        std::fs::create_dir_all(env.path(dir)).unwrap();
        std::fs::set_permissions(env.path(dir), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mount = resume(&env, "vm");
    write_synced(&mount.join("letter-to-my-lawyer.txt"), b"confidential");
    std::fs::create_dir(mount.join("holiday-photos")).unwrap();

    let mode = |path: PathBuf| std::fs::metadata(&path).unwrap().mode() & 0o777;
    for dir in ["state", "cache", "run"] {
        assert_eq!(mode(env.path(dir)), 0o700, "{dir}");
    }
    let session = env.path("state/sessions/vm");
    assert_eq!(mode(session.join("session.toml")), 0o600);
    assert_eq!(mode(session.join("image.redb")), 0o600);
    let state = std::fs::read(session.join("image.redb")).unwrap();
    for name in ["letter-to-my-lawyer", "holiday-photos", "quarterly-report"] {
        assert!(
            !state.windows(name.len()).any(|w| w == name.as_bytes()),
            "{name} is readable in the session database"
        );
    }
    // And the names are all there after a crash.
    env.kill_daemon();
    let mount = resume(&env, "vm");
    assert_eq!(
        std::fs::read(mount.join("letter-to-my-lawyer.txt")).unwrap(),
        b"confidential"
    );
    assert!(mount.join("holiday-photos").is_dir());
}
