//! Versions and deduplication: re-imports upload nothing, parcels sharing a
//! dedup secret store shared data once, concurrent commits of one version
//! produce exactly one winner, and a killed import finishes on rerun without
//! re-uploading.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{Env, SeaweedFs};

fn write(path: &std::path::Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

#[test]
fn reimport_uploads_nothing_and_shared_dedup_secret_stores_only_the_difference() {
    let env = Env::local();
    let store = std::path::PathBuf::from(&env.store);
    let half_a = support::random_bytes("half-a", 4 << 20);
    let half_b = support::random_bytes("half-b", 4 << 20);
    let half_c = support::random_bytes("half-c", 4 << 20);
    write(
        &env.path("one/disk.img"),
        &[half_a.clone(), half_b].concat(),
    );
    write(&env.path("two/disk.img"), &[half_a, half_c].concat());

    let first = env.json(&["import", "one", env.path("one").to_str().unwrap()]);
    assert_eq!(first["uploaded_chunks"], 64);
    let chunk_files = support::local_chunk_files(&store).len();
    let segments = env.segments("one", 1);
    assert_eq!(
        chunk_files,
        64 + segments.len(),
        "the chunks and the manifest's segment"
    );

    // Same data again: no new chunk.
    let again = env.json(&[
        "import",
        "--new-version",
        "one",
        env.path("one").to_str().unwrap(),
    ]);
    assert_eq!(again["version"], 2);
    assert_eq!(again["uploaded_chunks"], 0);
    assert_eq!(again["uploaded_bytes"], 0);
    assert_eq!(again["deduplicated_chunks"], 64);
    assert_eq!(support::local_chunk_files(&store).len(), chunk_files);
    assert_eq!(
        env.segments("one", 2),
        segments,
        "an unchanged segment is shared"
    );

    // A second parcel sharing half its data, with the first parcel's dedup secret.
    let two = env.json(&[
        "import",
        "--dedup-with",
        "one",
        "two",
        env.path("two").to_str().unwrap(),
    ]);
    assert_eq!(
        two["uploaded_chunks"], 32,
        "only the half not in `one` is stored"
    );
    assert_eq!(two["deduplicated_chunks"], 32);
    assert_eq!(
        support::local_chunk_files(&store).len(),
        chunk_files + 32 + env.segments("two", 1).len()
    );

    // Without a shared secret nothing is shared (the store learns nothing across parcels).
    let three = env.json(&["import", "three", env.path("two").to_str().unwrap()]);
    assert_eq!(three["uploaded_chunks"], 64);

    let out = env.path("out-two");
    env.ok(&["export", "two", out.to_str().unwrap()]);
    assert_eq!(
        support::tree_hashes(&env.path("two")),
        support::tree_hashes(&out)
    );
    let history = env.json(&["history", "one"])["versions"].clone();
    assert_eq!(history.as_array().unwrap().len(), 2);
    assert_eq!(history[1]["parent"], 1);
    assert_eq!(history[1]["new_bytes"], 0);
}

fn concurrent_new_versions(env: &Env) {
    write(
        &env.path("v1/disk.img"),
        &support::random_bytes("base", 1 << 20),
    );
    env.ok(&["import", "vm", env.path("v1").to_str().unwrap()]);
    let racers = 4;
    for i in 0..racers {
        write(
            &env.path(&format!("racer{i}/disk.img")),
            &support::random_bytes(&format!("racer{i}"), 48 << 20),
        );
    }
    let children: Vec<_> = (0..racers)
        .map(|i| {
            env.isrctl()
                .args(["import", "--new-version", "vm"])
                .arg(env.path(&format!("racer{i}")))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let winners: Vec<_> = outputs.iter().filter(|o| o.status.success()).collect();
    assert_eq!(winners.len(), 1, "exactly one import commits version 2");
    assert!(String::from_utf8_lossy(&winners[0].stdout).contains("version 2"));
    for loser in outputs.iter().filter(|o| !o.status.success()) {
        let stderr = String::from_utf8_lossy(&loser.stderr);
        assert_eq!(loser.status.code(), Some(5), "{stderr}");
        assert!(
            stderr.contains("version 2 of parcel vm was committed by another client meanwhile"),
            "{stderr}"
        );
    }
    let info = env.json(&["info", "vm"]);
    let versions: Vec<u64> = info["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![1, 2]);
    assert_eq!(
        env.json(&["verify", "vm"])["bad_chunks"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[test]
fn concurrent_new_versions_local_store() {
    concurrent_new_versions(&Env::local());
}

#[test]
fn concurrent_new_versions_s3_store() {
    let server = SeaweedFs::start();
    concurrent_new_versions(&Env::s3(&server, "race"));
}

#[test]
fn killed_import_finishes_on_rerun_without_reuploading() {
    let env = Env::local();
    let store = std::path::PathBuf::from(&env.store);
    let source = env.path("src");
    write(
        &source.join("disk.img"),
        &support::random_bytes("interrupted", 384 << 20),
    );
    let total_chunks = 384 * 8;

    let mut child = env
        .isrctl()
        .args(["import", "--jobs", "1", "--uploads", "1", "vm"])
        .arg(&source)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while support::local_chunk_files(&store).len() < 300 {
        assert!(Instant::now() < deadline, "import made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "import finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let present = support::local_chunk_files(&store).len();
    assert!(
        present < total_chunks,
        "killed halfway ({present} of {total_chunks} chunks stored)"
    );
    assert!(
        !store.join("parcels/vm/versions").exists()
            || std::fs::read_dir(store.join("parcels/vm/versions"))
                .unwrap()
                .next()
                .is_none(),
        "no version is visible after the kill"
    );
    let ls = env.json(&["ls"])["parcels"].clone();
    assert_eq!(ls[0]["newest_version"], serde_json::Value::Null);

    let rerun = env.json(&["import", "vm", source.to_str().unwrap()]);
    println!("rerun after kill with {present} chunks stored: {rerun:#}");
    assert_eq!(rerun["version"], 1);
    assert_eq!(
        rerun["deduplicated_chunks"].as_u64().unwrap() as usize,
        present
    );
    assert_eq!(
        rerun["uploaded_chunks"].as_u64().unwrap() as usize,
        total_chunks - present
    );
    let out = env.path("out");
    env.ok(&["export", "vm", out.to_str().unwrap()]);
    assert_eq!(
        support::file_hash(&source.join("disk.img")),
        support::file_hash(&out.join("disk.img"))
    );
}
