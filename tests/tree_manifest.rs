//! Manifest format 2 through the real binaries: a checkin of a small change
//! to a big file uploads one new segment and shares the others with the
//! parent version; the machine that checked in has the new segments cached;
//! another machine reads the new version whole; a damaged segment is an
//! integrity error (exit 7), never wrong bytes.

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;

use support::Env;

const CHUNK: u64 = 64 * 1024;
/// Chunks per segment written today (`isr::manifest::tree::SEGMENT_CHUNKS`).
const SEGMENT: u64 = isr::manifest::tree::SEGMENT_CHUNKS as u64;
const SEGMENTS: u64 = 4;

/// A sparse 512 MiB disk: four segments' worth of 64 KiB chunks, a few
/// random chunks in each segment's range (so the segments differ), the rest
/// zeros.
fn sparse_disk(env: &Env) -> std::path::PathBuf {
    let dir = env.path("src");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(SEGMENTS * SEGMENT * CHUNK).unwrap();
    for segment in 0..SEGMENTS {
        for i in 0..3 {
            let chunk = segment * SEGMENT + i * 500;
            let data = support::random_bytes(&format!("s{segment}-{i}"), CHUNK as usize);
            file.write_all_at(&data, chunk * CHUNK).unwrap();
        }
    }
    dir
}

/// [`sparse_disk`] imported as parcel `vm`; returns the source directory.
fn import_sparse_disk(env: &Env) -> std::path::PathBuf {
    let source = sparse_disk(env);
    env.ok(&[
        "import",
        "--chunk-size",
        &CHUNK.to_string(),
        "vm",
        source.to_str().unwrap(),
    ]);
    source
}

#[test]
fn a_small_checkin_uploads_one_segment_and_shares_the_rest() {
    Env::require_fuse();
    let env = Env::local();
    let source = import_sparse_disk(&env);
    let store = std::path::PathBuf::from(&env.store);
    let v1: BTreeSet<String> = env.segments("vm", 1);
    assert_eq!(v1.len() as u64, SEGMENTS, "one distinct segment per range");
    let objects_before = support::local_chunk_files(&store).len();

    // One 4 KiB write in the third segment's range, then checkin.
    let mount = std::path::PathBuf::from(env.json(&["resume", "vm"])["mount"].as_str().unwrap());
    let offset = (2 * SEGMENT + 1000) * CHUNK;
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.join("disk.img"))
        .unwrap();
    disk.write_all_at(&[0xAB; 4096], offset).unwrap();
    disk.sync_all().unwrap();
    drop(disk);
    let report = env.json(&["checkin", "vm"]);
    assert_eq!(report["version"], 2, "{report}");
    assert_eq!(report["uploaded_chunks"], 1, "one file chunk: {report}");
    let manifest_bytes = report["manifest_bytes"].as_u64().unwrap();

    // Exactly one segment changed: one new segment object beside the chunk.
    let v2 = env.segments("vm", 2);
    let shared: Vec<_> = v1.intersection(&v2).collect();
    assert_eq!(shared.len() as u64, SEGMENTS - 1, "v1 {v1:?} v2 {v2:?}");
    let new: Vec<&String> = v2.difference(&v1).collect();
    assert_eq!(new.len(), 1);
    assert_eq!(
        support::local_chunk_files(&store).len(),
        objects_before + 2,
        "the changed chunk and the changed segment"
    );
    let segment_len = std::fs::metadata(store.join("chunks").join(&new[0][..2]).join(new[0]))
        .unwrap()
        .len();
    assert!(
        manifest_bytes >= segment_len && manifest_bytes < segment_len + 4096,
        "the root and one segment: {manifest_bytes} bytes, segment {segment_len}"
    );
    // The machine that checked in keeps the new version's segments cached.
    let cached: BTreeSet<String> = support::cached_chunk_tags(&env.path("cache"))
        .into_iter()
        .collect();
    assert!(
        cached.contains(new[0]),
        "new segment not cached: {cached:?}"
    );

    // Another machine reads version 2 whole.
    let other = env.another_machine();
    let out = other.path("out");
    other.ok(&["export", "vm@2", out.to_str().unwrap()]);
    let mut expected = std::fs::read(source.join("disk.img")).unwrap();
    expected[offset as usize..offset as usize + 4096].fill(0xAB);
    assert!(std::fs::read(out.join("disk.img")).unwrap() == expected);
    other.ok(&["verify", "--deep", "vm"]);

    // A damaged segment: an integrity error, exit 7, for a reader that
    // has no copy of its own.
    let path = store.join("chunks").join(&new[0][..2]).join(new[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let third = env.another_machine();
    let out = third.path("out");
    third.fails(&["export", "vm@2", out.to_str().unwrap()], 7);
    third.ok(&["export", "vm@1", third.path("out1").to_str().unwrap()]);
}

/// A resume mounts once it has the root: a segment is fetched when a read
/// needs it. With three of the four segments damaged in the store, the
/// parcel still mounts, the intact range reads right, a read in a damaged
/// range is EIO (never wrong bytes), a checkin is refused with exit 7 and
/// the session stays; once the segments are whole again the same reads
/// succeed and a checkin commits.
#[test]
fn a_resume_mounts_with_the_root_and_fetches_a_segment_when_a_read_needs_it() {
    Env::require_fuse();
    let env = Env::local();
    let source = import_sparse_disk(&env);
    let store = std::path::PathBuf::from(&env.store);
    let order = env.segments_in_order("vm", 1);
    assert_eq!(order.len() as u64, SEGMENTS);
    let object = |tag: &String| store.join("chunks").join(&tag[..2]).join(tag);
    let originals: Vec<Vec<u8>> = order
        .iter()
        .map(|t| std::fs::read(object(t)).unwrap())
        .collect();
    for tag in &order[1..] {
        let mut bytes = std::fs::read(object(tag)).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(object(tag), bytes).unwrap();
    }

    // Another machine: nothing cached.
    let other = env.another_machine();
    let mount = std::path::PathBuf::from(other.json(&["resume", "vm"])["mount"].as_str().unwrap());
    let expected = std::fs::read(source.join("disk.img")).unwrap();
    let disk = std::fs::File::open(mount.join("disk.img")).unwrap();
    let read = |offset: u64| {
        let mut buf = vec![0u8; CHUNK as usize];
        disk.read_exact_at(&mut buf, offset).map(|()| buf)
    };
    let at = |chunk: u64| (chunk * CHUNK) as usize;
    assert!(read(0).unwrap() == expected[..at(1)], "segment 0's range");
    let damaged = read(2 * SEGMENT * CHUNK).expect_err("segment 2 is damaged");
    assert_eq!(
        damaged.raw_os_error(),
        Some(nix::errno::Errno::EIO as i32),
        "{damaged}"
    );

    let status = other.json(&["status", "vm"]);
    let session = &status["sessions"][0];
    assert_eq!(session["manifest_segments"], SEGMENTS, "{status:#}");
    assert_eq!(session["manifest_segments_loaded"], 1, "{status:#}");
    other.fails(&["checkin", "vm"], 7);
    assert_eq!(other.json(&["status", "vm"])["sessions"][0]["parcel"], "vm");

    // Whole again: the same reads succeed, a change checks in.
    for (tag, bytes) in order.iter().zip(&originals) {
        std::fs::write(object(tag), bytes).unwrap();
    }
    let offset = 2 * SEGMENT * CHUNK;
    assert!(read(offset).unwrap() == expected[offset as usize..offset as usize + CHUNK as usize]);
    let writable = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.join("disk.img"))
        .unwrap();
    writable
        .write_all_at(&[0xCD; 4096], 3 * SEGMENT * CHUNK)
        .unwrap();
    writable.sync_all().unwrap();
    drop((writable, disk));
    let report = other.json(&["checkin", "vm"]);
    assert_eq!(report["version"], 2, "{report}");
    let out = env.path("out");
    env.ok(&["export", "vm@2", out.to_str().unwrap()]);
    let mut changed = expected;
    let at3 = (3 * SEGMENT * CHUNK) as usize;
    changed[at3..at3 + 4096].fill(0xCD);
    assert!(std::fs::read(out.join("disk.img")).unwrap() == changed);
}
