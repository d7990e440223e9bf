//! Checkin, sync and trickle upload through the real binaries and a real FUSE
//! mount, against the local-directory store and SeaweedFS.

mod support;

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use isr::chunk::{ChunkRef, ChunkTag};
use isr::manifest::Manifest;
use support::{Env, SeaweedFs};

const MIB: u64 = 1 << 20;

fn resume(env: &Env, target: &str) -> PathBuf {
    PathBuf::from(env.json(&["resume", target])["mount"].as_str().unwrap())
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn export_hash(env: &Env, target: &str, file: &str) -> String {
    let dir = env.path(&format!("export-{}", target.replace('@', "-")));
    let _ = std::fs::remove_dir_all(&dir);
    env.ok(&["export", target, dir.to_str().unwrap()]);
    let hash = support::file_hash(&dir.join(file));
    std::fs::remove_dir_all(&dir).unwrap();
    hash
}

/// Distinct stored chunks of `manifest` with their stored sizes.
fn stored(manifest: &Manifest) -> Vec<(ChunkTag, u64)> {
    let mut seen = HashSet::new();
    manifest
        .files()
        .flat_map(|(_, _, chunks)| chunks.iter())
        .filter_map(|chunk| match chunk {
            ChunkRef::Stored {
                tag, stored_len, ..
            } => seen.insert(*tag).then_some((*tag, u64::from(*stored_len))),
            ChunkRef::Zero => None,
        })
        .collect()
}

/// File hashes of a mounted parcel, without the daemon's `.isr` files.
fn parcel_hashes(mount: &Path) -> std::collections::BTreeMap<String, String> {
    let mut hashes = support::tree_hashes(mount);
    hashes.retain(|path, _| !path.starts_with(".isr"));
    hashes
}

fn s3_server() -> SeaweedFs {
    SeaweedFs::start()
}

// ---------------------------------------------------------------------------
// Resume → write 5 % of a 1 GiB image at random → checkin: only changed chunks go up.

fn checkin_uploads_only_what_changed(env: &Env) {
    Env::require_fuse();
    env.append_config("\n[upload]\ntrickle = false\n");
    let source = env.path("src-vm");
    std::fs::create_dir_all(&source).unwrap();
    support::write_mixed_file(&source.join("disk.img"), 1 << 30, "checkin-disk");
    env.ok(&["import", "vm", source.to_str().unwrap()]);
    let original = support::file_hash(&source.join("disk.img"));
    std::fs::remove_dir_all(&source).unwrap();

    let mount = resume(env, "vm");
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mount.join("disk.img"))
        .unwrap();
    let mut state = 0x5eed_u64;
    let block = 64 * 1024usize;
    let blocks = (((1u64 << 30) / 20) / block as u64) as usize; // 5 %
    for i in 0..blocks {
        let offset = (xorshift(&mut state) % ((1 << 30) - block as u64)) & !4095;
        let data = support::random_bytes(&format!("w{i}"), block);
        disk.write_all_at(&data, offset).unwrap();
    }
    disk.sync_all().unwrap();
    drop(disk);
    let mounted = support::file_hash(&mount.join("disk.img"));

    let started = Instant::now();
    let report = env.json(&["checkin", "vm", "-m", "five percent"]);
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(report["version"], 2);
    assert_eq!(report["committed"], true);
    let old: HashSet<ChunkTag> = stored(&env.manifest("vm", 1))
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    let (ideal_chunks, ideal_bytes) = stored(&env.manifest("vm", 2))
        .into_iter()
        .filter(|(tag, _)| !old.contains(tag))
        .fold((0u64, 0u64), |(n, b), (_, len)| (n + 1, b + len));
    let uploaded = report["uploaded_bytes"].as_u64().unwrap();
    println!(
        "checkin of 5 % random writes to 1 GiB ({}): uploaded {uploaded} bytes in {} chunks; \
         ideal (compressed size of the distinct changed chunks) {ideal_bytes} bytes in {ideal_chunks} chunks; \
         ratio {:.4}; {seconds:.2} s",
        env.store,
        report["uploaded_chunks"],
        uploaded as f64 / ideal_bytes as f64
    );
    assert!(
        ideal_bytes > 40 * MIB,
        "the writes changed {ideal_bytes} bytes"
    );
    assert!(
        uploaded as f64 <= 1.05 * ideal_bytes as f64,
        "uploaded {uploaded} > 1.05 × {ideal_bytes}"
    );
    assert_eq!(export_hash(env, "vm@2", "disk.img"), mounted);
    assert_eq!(export_hash(env, "vm@1", "disk.img"), original);
    assert!(
        !mount.join("disk.img").exists(),
        "checkin unmounts the parcel"
    );
    // The lock is released: another machine can resume at once.
    let other = env.another_machine();
    resume(&other, "vm");
    other.ok(&["discard", "vm"]);
}

#[test]
fn checkin_uploads_only_what_changed_local() {
    checkin_uploads_only_what_changed(&Env::local());
}

#[test]
fn checkin_uploads_only_what_changed_s3() {
    let server = s3_server();
    checkin_uploads_only_what_changed(&Env::s3(&server, "checkin-5"));
}

// ---------------------------------------------------------------------------
// kill -9 of isrfsd or of isrctl at random points during checkin, 20 times.

fn kill_during_checkin(env: &Env) {
    Env::require_fuse();
    env.append_config("\n[upload]\ntrickle = false\n");
    let size = 16 * MIB as usize;
    env.import_files(
        "vm",
        &[("disk.img", &support::random_bytes("kill-base", size))],
    );
    let mut state = 0xdead_beef_u64;
    let mut killed = [0usize; 2];
    for round in 1..=20u64 {
        let mount = resume(env, "vm");
        let data = support::random_bytes(&format!("kill-{round}"), 2 * MIB as usize);
        let offset = (xorshift(&mut state) % (size as u64 - 2 * MIB)) & !4095;
        let disk = OpenOptions::new()
            .write(true)
            .open(mount.join("disk.img"))
            .unwrap();
        disk.write_all_at(&data, offset).unwrap();
        disk.sync_all().unwrap();
        drop(disk);
        let expected = support::file_hash(&mount.join("disk.img"));

        let mut checkin = env
            .isrctl()
            .args(["checkin", "vm"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(xorshift(&mut state) % 250));
        let kill_daemon = xorshift(&mut state) % 2 == 0;
        if kill_daemon {
            env.kill_daemon();
        } else {
            let _ = checkin.kill();
        }
        killed[usize::from(kill_daemon)] += 1;
        let _ = checkin.wait();

        let output = env.ok(&["checkin", "vm"]);
        assert!(output.contains("version"), "{output}");
        let versions = env.versions("vm");
        assert_eq!(
            versions,
            (1..=round + 1).collect::<Vec<_>>(),
            "round {round}: exactly one new version"
        );
        let verify = env.ok(&["verify", "vm"]);
        assert!(verify.contains(" 0 bad"), "{verify}");
        assert_eq!(
            export_hash(env, "vm", "disk.img"),
            expected,
            "round {round}"
        );
    }
    println!(
        "killed isrctl {} times, isrfsd {} times",
        killed[0], killed[1]
    );
}

#[test]
fn checkin_survives_kill_9_local() {
    kill_during_checkin(&Env::local());
}

#[test]
fn checkin_survives_kill_9_s3() {
    let server = s3_server();
    kill_during_checkin(&Env::s3(&server, "checkin-kill"));
}

// ---------------------------------------------------------------------------
// Sync while a writer keeps writing: each synced version is one instant.

const RECORD: usize = 4096;
const SLOTS: u64 = 256; // a 1 MiB ring of records

fn record(seq: u64) -> Vec<u8> {
    let mut out = support::random_bytes(&format!("record-{seq}"), RECORD);
    out[..8].copy_from_slice(&seq.to_le_bytes());
    let sum = blake3::hash(&out[..RECORD - 32]);
    out[RECORD - 32..].copy_from_slice(sum.as_bytes());
    out
}

/// The writer's states: record `seq` goes to slot `seq % SLOTS` of log.bin,
/// then head.bin says `seq + 1`. At any instant there is an `m` (the last
/// record written, `head − 1` or `head`) such that every slot holds the
/// newest record ≤ m of its residue (zeros if none yet), whole. Returns m + 1.
fn check_one_instant(dir: &Path) -> u64 {
    let log = std::fs::read(dir.join("log.bin")).unwrap();
    let head_bytes = std::fs::read(dir.join("head.bin")).unwrap();
    let head = u64::from_le_bytes(head_bytes[..8].try_into().unwrap());
    let slot = |seq: u64| &log[(seq % SLOTS) as usize * RECORD..][..RECORD];
    let written = if slot(head) == record(head).as_slice() {
        head + 1
    } else {
        head
    };
    for s in 0..SLOTS {
        let newest = (0..written).rev().find(|q| q % SLOTS == s);
        let expected = newest.map_or(vec![0u8; RECORD], record);
        assert!(
            slot(s) == expected.as_slice(),
            "slot {s} is not record {newest:?}: head.bin says {head}, so the files are not from one instant (or a record is torn)"
        );
    }
    written
}

fn sync_is_one_instant(env: &Env) {
    Env::require_fuse();
    env.append_config("\n[upload]\nquiet_secs = 1\n");
    env.import_files(
        "log",
        &[
            ("log.bin", vec![0u8; SLOTS as usize * RECORD]),
            ("head.bin", vec![0u8; 8]),
        ],
    );
    let mount = resume(env, "log");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, mount) = (stop.clone(), mount.clone());
        std::thread::spawn(move || {
            let log = OpenOptions::new()
                .write(true)
                .open(mount.join("log.bin"))
                .unwrap();
            let head = OpenOptions::new()
                .write(true)
                .open(mount.join("head.bin"))
                .unwrap();
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                log.write_all_at(&record(seq), (seq % SLOTS) * RECORD as u64)
                    .unwrap();
                head.write_all_at(&(seq + 1).to_le_bytes(), 0).unwrap();
                seq += 1;
            }
            seq
        })
    };
    let mut synced = Vec::new();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(100));
        let report = env.json(&["sync", "log"]);
        assert_eq!(
            report["committed"], true,
            "the writer keeps changing the parcel"
        );
        synced.push(report["version"].as_u64().unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().unwrap();
    let mut counts = Vec::new();
    for version in &synced {
        let dir = env.path(&format!("sync-{version}"));
        env.ok(&["export", &format!("log@{version}"), dir.to_str().unwrap()]);
        counts.push(check_one_instant(&dir));
    }
    println!("writer wrote {written} records; synced versions {synced:?} hold {counts:?} records");
    assert!(counts.windows(2).all(|w| w[0] < w[1]), "{counts:?}");
    // The session stayed writable; checkin commits the final state.
    env.json(&["checkin", "log"]);
    let dir = env.path("final");
    env.ok(&["export", "log", dir.to_str().unwrap()]);
    assert_eq!(check_one_instant(&dir), written);
}

#[test]
fn sync_is_one_instant_local() {
    sync_is_one_instant(&Env::local());
}

#[test]
fn sync_is_one_instant_s3() {
    let server = s3_server();
    sync_is_one_instant(&Env::s3(&server, "sync"));
}

// ---------------------------------------------------------------------------
// Two machines, one store.

fn two_machines(a: &Env) {
    Env::require_fuse();
    let b = a.another_machine();
    a.import_files(
        "vm",
        &[(
            "disk.img",
            &support::random_bytes("two-machines", 8 * MIB as usize),
        )],
    );
    let mount_a = resume(a, "vm");
    let locked = b.run(&["resume", "vm"]);
    let stderr = String::from_utf8_lossy(&locked.stderr);
    assert_eq!(locked.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("is locked by"), "{stderr}");
    std::fs::write(mount_a.join("note.txt"), b"written on A").unwrap();
    let disk = OpenOptions::new()
        .write(true)
        .open(mount_a.join("disk.img"))
        .unwrap();
    disk.write_all_at(b"changed on A", 4096).unwrap();
    disk.sync_all().unwrap();
    drop(disk);
    // What is checked below is that checkin keeps A's cache, so A's prefetch
    // has to have filled it first (on a loaded machine it may still be going).
    wait_until_prefetched(a, "vm");
    a.json(&["checkin", "vm"]);

    let mount_b = resume(&b, "vm");
    assert_eq!(
        std::fs::read(mount_b.join("note.txt")).unwrap(),
        b"written on A"
    );
    let mut head = vec![0u8; 12];
    std::fs::File::open(mount_b.join("disk.img"))
        .unwrap()
        .read_exact_at(&mut head, 4096)
        .unwrap();
    assert_eq!(head, b"changed on A");
    let fetched_b = b.json(&["status", "vm"])["sessions"][0]["fetch"]["fetched_bytes"]
        .as_u64()
        .unwrap();
    assert!(fetched_b > 0, "B's cache was cold, so B fetched");
    // A's cache still holds every chunk of the version A committed.
    let cached_a: HashSet<String> = support::cached_chunk_tags(&a.path("cache"))
        .into_iter()
        .collect();
    let version_2 = stored(&a.manifest("vm", 2));
    let warm = version_2
        .iter()
        .filter(|(tag, _)| cached_a.contains(&tag.to_string()))
        .count();
    println!(
        "B fetched {fetched_b} bytes cold; A's cache holds {warm}/{} chunks of version 2",
        version_2.len()
    );
    assert_eq!(warm, version_2.len(), "A's cache stays warm after checkin");
    std::fs::write(mount_b.join("note.txt"), b"and then on B").unwrap();
    b.json(&["checkin", "vm"]);
    assert_eq!(a.versions("vm"), vec![1, 2, 3]);
}

#[test]
fn two_machines_local() {
    two_machines(&Env::local());
}

#[test]
fn two_machines_s3() {
    let server = s3_server();
    two_machines(&Env::s3(&server, "two"));
}

// ---------------------------------------------------------------------------
// Force-unlock while A runs: A's checkin refuses and loses nothing.

fn force_unlock_keeps_changes(a: &Env) {
    Env::require_fuse();
    a.import_files(
        "vm",
        &[(
            "disk.img",
            &support::random_bytes("unlock", 4 * MIB as usize),
        )],
    );
    let mount = resume(a, "vm");
    std::fs::write(mount.join("work.txt"), b"precious").unwrap();
    let expected = parcel_hashes(&mount);
    let admin = a.another_machine();
    admin.ok(&["unlock", "--force", "vm"]);

    let refused = a.fails(&["checkin", "vm"], 5);
    assert!(refused.contains("--as"), "says how to save: {refused}");
    assert_eq!(a.versions("vm"), vec![1], "nothing committed");
    assert_eq!(parcel_hashes(&mount), expected, "nothing lost");
    std::fs::write(mount.join("more.txt"), b"still writable").unwrap();
    let expected = parcel_hashes(&mount);

    let report = a.json(&["checkin", "vm", "--as", "vm-rescued"]);
    assert_eq!(report["parcel"], "vm-rescued");
    assert_eq!(report["version"], 1);
    let dir = a.path("rescued");
    a.ok(&["export", "vm-rescued", dir.to_str().unwrap()]);
    assert_eq!(support::tree_hashes(&dir), expected);
    assert_eq!(a.versions("vm"), vec![1]);
    let verify = a.ok(&["verify", "vm-rescued"]);
    assert!(verify.contains(" 0 bad"), "{verify}");
}

#[test]
fn force_unlock_keeps_changes_local() {
    force_unlock_keeps_changes(&Env::local());
}

#[test]
fn force_unlock_keeps_changes_s3() {
    let server = s3_server();
    force_unlock_keeps_changes(&Env::s3(&server, "unlock"));
}

// ---------------------------------------------------------------------------
// Trickle upload: quiet chunks go up in the background, a restart does not
// send them again, and checkin is left with (almost) nothing to do.

fn wait_until_prefetched(env: &Env, name: &str) {
    // A liveness guard, not a timing check: prefetch must finish eventually.
    for _ in 0..1200 {
        let status = env.json(&["status", name])["sessions"][0].clone();
        if status["chunks_local"] == status["chunks_total"] {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("prefetch never filled the cache");
}

fn wait_until_uploaded(env: &Env, name: &str) -> serde_json::Value {
    // A liveness guard, not a timing check: the trickle must finish eventually.
    for _ in 0..1200 {
        let status = env.json(&["status", name])["sessions"][0].clone();
        if status["pending_chunks"] == 0
            && status["dirty_bytes"] == 0
            && status["uploaded_chunks"].as_u64() > Some(0)
        {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the trickle uploader never finished");
}

fn trickle_upload(env: &Env) {
    Env::require_fuse();
    env.append_config("\n[upload]\nquiet_secs = 1\nrate_bytes_per_sec = 104857600\n");
    env.import_files(
        "vm",
        &[(
            "disk.img",
            &support::random_bytes("trickle", 16 * MIB as usize),
        )],
    );
    let mount = resume(env, "vm");
    let disk = OpenOptions::new()
        .write(true)
        .open(mount.join("disk.img"))
        .unwrap();
    disk.write_all_at(&support::random_bytes("trickle-w", 4 * MIB as usize), 0)
        .unwrap();
    drop(disk); // no fsync: the quiet timer seals the buffered chunks
    let status = wait_until_uploaded(env, "vm");
    println!("trickle status: {status}");
    assert!(status["uploaded_chunks"].as_u64().unwrap() >= 32);

    // A crash and reattach: the journal remembers what went up.
    env.kill_daemon();
    resume(env, "vm");
    let started = Instant::now();
    let report = env.json(&["checkin", "vm"]);
    let with_trickle = started.elapsed().as_secs_f64();
    assert_eq!(report["uploaded_chunks"], 0, "{report}");
    assert!(report["present_chunks"].as_u64().unwrap() >= 32, "{report}");
    println!("checkin after a quiet period with trickle on: {with_trickle:.2} s, report {report}");
    let verify = env.ok(&["verify", "vm"]);
    assert!(verify.contains(" 0 bad"), "{verify}");
}

#[test]
fn trickle_upload_local() {
    trickle_upload(&Env::local());
}

#[test]
fn trickle_upload_s3() {
    let server = s3_server();
    trickle_upload(&Env::s3(&server, "trickle"));
}

// ---------------------------------------------------------------------------
// History: resuming an old version makes the newest, with its parent recorded.

#[test]
fn resume_of_an_old_version_commits_the_newest_with_its_parent() {
    Env::require_fuse();
    let env = Env::local();
    let source = env.import_files("vm", &[("a.txt", b"one")]);
    std::fs::write(source.join("a.txt"), b"two").unwrap();
    env.ok(&["import", "--new-version", "vm", source.to_str().unwrap()]);
    let mount = resume(&env, "vm@1");
    assert_eq!(std::fs::read(mount.join("a.txt")).unwrap(), b"one");
    std::fs::write(mount.join("a.txt"), b"three").unwrap();
    let report = env.json(&["checkin", "vm", "-m", "from one"]);
    assert_eq!(report["version"], 3);
    let history = env.json(&["history", "vm"])["versions"].clone();
    assert_eq!(history[2]["parent"], 1);
    assert_eq!(history[2]["message"], "from one");
    assert!(
        !support::cached_chunk_tags(&env.path("cache")).is_empty(),
        "checkin keeps the cache"
    );
    // Nothing changed: no empty version. --wipe empties this machine's cache.
    let mount = resume(&env, "vm");
    assert_eq!(std::fs::read(mount.join("a.txt")).unwrap(), b"three");
    let report = env.json(&["checkin", "--wipe", "vm"]);
    assert_eq!(report["committed"], false);
    assert_eq!(env.versions("vm"), vec![1, 2, 3]);
    let cached: HashSet<String> = support::cached_chunk_tags(&env.path("cache"))
        .into_iter()
        .collect();
    for (tag, _) in stored(&env.manifest("vm", 3)) {
        assert!(
            !cached.contains(&tag.to_string()),
            "checkin --wipe leaves no chunk of the version in the cache"
        );
    }
}

// ---------------------------------------------------------------------------
// gc running while sessions trickle and check in loses no chunk of any
// committed version, and frees the chunks of the versions it deletes.

fn chunk_objects(env: &Env, name: &str) -> usize {
    let (runtime, store, _) = env.open_parcel(name);
    runtime
        .block_on(store.lister().unwrap().list("chunks/"))
        .unwrap()
        .len()
}

fn gc_during_checkins(env: &Env) {
    Env::require_fuse();
    env.append_config(
        "\n[gc]\ngrace_secs = 4\n\n[upload]\nquiet_secs = 1\nrate_bytes_per_sec = 104857600\n",
    );
    let size = 4 * MIB as usize;
    env.import_files(
        "vm",
        &[("disk.img", &support::random_bytes("gc-base", size))],
    );
    let admin = env.another_machine();
    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let (stop, admin_config, store) = (stop.clone(), admin.config.clone(), admin.store.clone());
        let admin_dir = admin.dir.path().to_owned();
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(Ordering::SeqCst) {
                let output = std::process::Command::new(support::binary("isrctl"))
                    .args(["gc", "--keep-last", "2"])
                    .env("ISR_STORE", &store)
                    .env("ISR_CONFIG", &admin_config)
                    .env("ISR_STATE_DIR", admin_dir.join("state"))
                    .env("ISR_CACHE_DIR", admin_dir.join("cache"))
                    .env("ISR_RUNTIME_DIR", admin_dir.join("run"))
                    .env("ISR_PASSPHRASE", support::PASSPHRASE)
                    .env("HOME", &admin_dir)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .unwrap();
                // gc may refuse a run that raced with a resume (exit 5); it never deletes then.
                assert!(
                    matches!(output.status.code(), Some(0) | Some(5)),
                    "gc failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                runs += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            runs
        })
    };
    let mut state = 0x6c_u64;
    let mut refreshed = 0;
    for round in 0..8u64 {
        let mount = resume(env, "vm");
        let disk = OpenOptions::new()
            .write(true)
            .open(mount.join("disk.img"))
            .unwrap();
        // Alternate between two contents per region, so chunks gc orphaned
        // come back and must be refreshed, not trusted.
        let seed = format!("gc-{}", round % 2);
        let offset = (xorshift(&mut state) % 4) * MIB;
        disk.write_all_at(&support::random_bytes(&seed, MIB as usize), offset)
            .unwrap();
        disk.sync_all().unwrap();
        drop(disk);
        std::thread::sleep(Duration::from_millis(1500 + xorshift(&mut state) % 3000));
        let expected = support::file_hash(&mount.join("disk.img"));
        let report = env.json(&["checkin", "vm"]);
        refreshed += report["refreshed_chunks"].as_u64().unwrap();
        assert_eq!(
            export_hash(env, "vm", "disk.img"),
            expected,
            "round {round}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    let runs = collector.join().unwrap();
    for version in env.versions("vm") {
        let verify = env.ok(&["verify", &format!("vm@{version}")]);
        assert!(verify.contains(" 0 bad"), "{verify}");
    }
    std::thread::sleep(Duration::from_secs(5)); // past the grace period
    let before = chunk_objects(env, "vm");
    let versions_before = env.versions("vm");
    admin.ok(&["gc", "--keep-last", "1"]);
    let after = chunk_objects(env, "vm");
    let newest = *versions_before.last().unwrap();
    let needed = stored(&env.manifest("vm", newest)).len() + env.segments("vm", newest).len();
    println!(
        "gc ran {runs} times during 8 checkins ({refreshed} chunks refreshed); then --keep-last 1: versions {versions_before:?} → {:?}, chunk objects {before} → {after} (the newest version needs {needed})",
        env.versions("vm")
    );
    assert_eq!(env.versions("vm"), vec![newest]);
    assert_eq!(
        after, needed,
        "exactly the newest version's chunks are left"
    );
    let verify = env.ok(&["verify", "vm"]);
    assert!(verify.contains(" 0 bad"), "{verify}");
}

#[test]
fn gc_during_checkins_local() {
    gc_during_checkins(&Env::local());
}

#[test]
fn gc_during_checkins_s3() {
    let server = s3_server();
    gc_during_checkins(&Env::s3(&server, "gc-checkin"));
}
