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

#[test]
fn a_small_checkin_uploads_one_segment_and_shares_the_rest() {
    Env::require_fuse();
    let env = Env::local();
    let source = sparse_disk(&env);
    let store = std::path::PathBuf::from(&env.store);
    env.ok(&[
        "import",
        "--chunk-size",
        &CHUNK.to_string(),
        "vm",
        source.to_str().unwrap(),
    ]);
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
