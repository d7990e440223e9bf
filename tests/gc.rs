//! Garbage collection, passwd and rollback through the real `isrctl`, against a
//! local-directory store and a real S3 server (SeaweedFS on loopback): gc
//! deletes exactly the old versions and the chunks only they used, keeps
//! young orphans for the grace period and a locked session's base version,
//! loses nothing of versions committed while it runs, and deletes nothing when
//! a parcel does not unlock; HTTP stores still find the versions afterwards.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use isr::store::StoreHandle;
use support::{Env, SeaweedFs};

/// 1 MiB of random data: 8 chunks of the default 128 KiB, shared by no other part.
const PART: usize = 1 << 20;
const CHUNKS_PER_PART: u64 = 8;
/// Chunk objects each version adds beyond its files' chunks: its manifest
/// segment (format 2; a one-file parcel this small has one, its own).
const SEGMENTS: u64 = 1;

/// One backend under test: an `isrctl` environment and the store opened
/// through the library, to look at objects directly.
struct Backend {
    env: Env,
    store: StoreHandle,
    runtime: tokio::runtime::Runtime,
    _server: Option<SeaweedFs>,
}

impl Backend {
    fn local() -> Backend {
        let env = Env::local();
        let store = isr::store::open(&env.store, &Default::default(), support::quick_retry())
            .expect("open the local store");
        Backend::new(env, store, None)
    }

    fn s3() -> Backend {
        let server = SeaweedFs::start();
        let env = Env::s3(&server, "gc");
        let store = isr::store::open(&env.store, &server.settings(), support::quick_retry())
            .expect("open the S3 store");
        Backend::new(env, store, Some(server))
    }

    fn new(env: Env, store: StoreHandle, server: Option<SeaweedFs>) -> Backend {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        Backend {
            env,
            store,
            runtime,
            _server: server,
        }
    }

    fn list(&self, prefix: &str) -> Vec<String> {
        let mut keys = self
            .runtime
            .block_on(self.store.lister().unwrap().list(prefix))
            .unwrap();
        keys.sort();
        keys
    }

    /// Every object under `prefixes` (key → blake3 of its bytes).
    fn snapshot(&self, prefixes: &[&str]) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for prefix in prefixes {
            for key in self.list(prefix) {
                let bytes = self
                    .runtime
                    .block_on(self.store.reader().get(&key))
                    .unwrap();
                out.insert(key, blake3::hash(&bytes).to_hex().to_string());
            }
        }
        out
    }

    fn everything(&self) -> BTreeMap<String, String> {
        self.snapshot(&["chunks/", "parcels/"])
    }

    fn chunk_count(&self) -> u64 {
        self.list("chunks/").len() as u64
    }

    fn get_text(&self, key: &str) -> String {
        let bytes = self.runtime.block_on(self.store.reader().get(key)).unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// Writes `parts` (seeds) one after another into `<dir>/disk.img`.
    fn source(&self, dir: &str, parts: &[&str]) -> std::path::PathBuf {
        let path = self.env.path(dir);
        std::fs::create_dir_all(&path).unwrap();
        let data: Vec<u8> = parts
            .iter()
            .flat_map(|seed| support::random_bytes(seed, PART))
            .collect();
        std::fs::write(path.join("disk.img"), data).unwrap();
        path
    }

    fn import(&self, name: &str, dir: &Path, new_version: bool) -> serde_json::Value {
        let mut args = vec!["import"];
        if new_version {
            args.push("--new-version");
        }
        args.extend([name, dir.to_str().unwrap()]);
        self.env.json(&args)
    }

    fn verify_clean(&self, target: &str) {
        let report = self.env.json(&["verify", target]);
        assert_eq!(
            report["bad_chunks"].as_array().unwrap().len(),
            0,
            "{target}: {report:#}"
        );
    }

    fn export_matches(&self, target: &str, source: &Path) {
        let out = self.env.path(&format!("out-{}", target.replace('@', "-")));
        let _ = std::fs::remove_dir_all(&out);
        self.env.ok(&["export", target, out.to_str().unwrap()]);
        assert_eq!(
            support::tree_hashes(source),
            support::tree_hashes(&out),
            "{target} exports byte for byte as its source"
        );
    }

    fn versions(&self, name: &str) -> Vec<u64> {
        self.env.json(&["history", name])["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["version"].as_u64().unwrap())
            .collect()
    }
}

fn numbers(value: &serde_json::Value) -> Vec<u64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

/// Versions 1–3 of `vm`: a shared part A plus B, C, D in turn.
fn three_versions(backend: &Backend) -> Vec<std::path::PathBuf> {
    let sources: Vec<_> = ["b", "c", "d"]
        .iter()
        .map(|other| backend.source(&format!("src-{other}"), &["a", other]))
        .collect();
    for (i, source) in sources.iter().enumerate() {
        let summary = backend.import("vm", source, i > 0);
        assert_eq!(summary["version"], i as u64 + 1);
    }
    sources
}

fn keep_last_deletes_old_versions_and_only_their_chunks(backend: Backend) {
    let sources = three_versions(&backend);
    let before = backend.chunk_count();
    assert_eq!(
        before,
        4 * CHUNKS_PER_PART + 3 * SEGMENTS,
        "A, B, C and D, and each version's segment"
    );

    // Dry runs change nothing.
    let snapshot = backend.everything();
    let dry = backend
        .env
        .json(&["gc", "--keep-last", "1", "--grace", "0", "--dry-run"]);
    assert_eq!(dry["applied"], false);
    assert_eq!(numbers(&dry["parcels"][0]["deleted_versions"]), vec![1, 2]);
    assert_eq!(dry["chunks_deleted"], 2 * CHUNKS_PER_PART + 2 * SEGMENTS);
    let by_age = backend.env.json(&["gc", "--keep-days", "1", "--dry-run"]);
    assert!(
        numbers(&by_age["parcels"][0]["deleted_versions"]).is_empty(),
        "every version is younger than a day"
    );
    assert_eq!(backend.everything(), snapshot, "dry runs delete nothing");

    let report = backend
        .env
        .json(&["gc", "--keep-last", "1", "--grace", "0"]);
    let after = backend.chunk_count();
    println!("chunk objects before gc: {before}, after: {after}");
    assert_eq!(report["applied"], true);
    assert_eq!(
        numbers(&report["parcels"][0]["deleted_versions"]),
        vec![1, 2]
    );
    assert_eq!(numbers(&report["parcels"][0]["kept_versions"]), vec![3]);
    assert_eq!(report["chunks_before"], before);
    assert_eq!(report["chunks_referenced"], 2 * CHUNKS_PER_PART + SEGMENTS);
    assert_eq!(
        before - after,
        2 * CHUNKS_PER_PART + 2 * SEGMENTS,
        "exactly B's and C's chunks and the segments of versions 1 and 2"
    );
    assert_eq!(report["chunks_deleted"], before - after);
    assert!(report["bytes_freed"].as_u64().unwrap() >= 2 * PART as u64);
    assert_eq!(backend.versions("vm"), vec![3]);
    assert_eq!(backend.get_text("parcels/vm/versions/oldest").trim(), "3");
    backend.verify_clean("vm");
    backend.export_matches("vm", &sources[2]);

    // Nothing left to collect.
    let again = backend
        .env
        .json(&["gc", "--keep-last", "1", "--grace", "0"]);
    assert_eq!(again["chunks_deleted"], 0);
    assert!(numbers(&again["parcels"][0]["deleted_versions"]).is_empty());
    let text = backend.env.ok(&["gc", "--keep-last", "1", "--dry-run"]);
    assert!(
        text.contains("vm: kept versions 3, none to delete"),
        "{text}"
    );
}

#[test]
fn keep_last_deletes_old_versions_and_only_their_chunks_local() {
    keep_last_deletes_old_versions_and_only_their_chunks(Backend::local());
}

#[test]
fn keep_last_deletes_old_versions_and_only_their_chunks_s3() {
    keep_last_deletes_old_versions_and_only_their_chunks(Backend::s3());
}

fn young_orphans_survive_the_grace_period(backend: Backend) {
    let first = backend.source("src-1", &["a", "b"]);
    let second = backend.source("src-2", &["a", "c"]);
    backend.import("vm", &first, false);
    backend.import("vm", &second, true);
    let before = backend.chunk_count();

    // The default grace (a day): version 1 goes, B's chunks are too young.
    let report = backend.env.json(&["gc", "--keep-last", "1"]);
    assert_eq!(numbers(&report["parcels"][0]["deleted_versions"]), vec![1]);
    assert_eq!(report["grace_secs"], 86_400);
    assert_eq!(report["chunks_deleted"], 0);
    assert_eq!(report["chunks_in_grace"], CHUNKS_PER_PART + SEGMENTS);
    assert_eq!(backend.chunk_count(), before);

    // Without a grace period the orphans go (no option: no version is deleted).
    let report = backend.env.json(&["gc", "--grace", "0"]);
    assert!(numbers(&report["parcels"][0]["deleted_versions"]).is_empty());
    assert_eq!(report["chunks_deleted"], CHUNKS_PER_PART + SEGMENTS);
    assert_eq!(backend.chunk_count(), before - CHUNKS_PER_PART - SEGMENTS);
    backend.verify_clean("vm");
    backend.export_matches("vm", &second);
}

#[test]
fn young_orphans_survive_the_grace_period_local() {
    young_orphans_survive_the_grace_period(Backend::local());
}

#[test]
fn young_orphans_survive_the_grace_period_s3() {
    young_orphans_survive_the_grace_period(Backend::s3());
}

/// gc runs in a loop with a short grace period G while versions are imported
/// one after another. Content alternates P, Q: each new version reuses the
/// chunks of the version before last, which are orphans by then (gc keeps one
/// version). The pauses grow, so those orphans are first younger than G (the
/// import refreshes them) and then about G old (gc deletes them while the
/// import reuses them). Every committed version must stay whole.
fn gc_concurrent_with_imports_loses_no_chunk(backend: Backend) {
    const GRACE_SECS: u64 = 4;
    backend
        .env
        .append_config(&format!("\n[gc]\ngrace_secs = {GRACE_SECS}\n"));
    let pauses_ms = [800, 1200, 1500, 1800, 2000, 2200];
    let sources: Vec<_> = (0..=pauses_ms.len())
        .map(|k| {
            let alternating = if k % 2 == 0 { "p" } else { "q" };
            let unique = format!("u{k}");
            backend.source(&format!("src-{k}"), &["s", alternating, &unique])
        })
        .collect();
    backend.import("vm", &sources[0], false);

    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let stop = stop.clone();
        let mut command = backend.env.isrctl();
        command.args(["--json", "gc", "--keep-last", "1"]);
        std::thread::spawn(move || {
            let mut runs = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let output = command.output().expect("run isrctl gc");
                assert!(
                    output.status.success(),
                    "gc failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
                runs.push(report["chunks_deleted"].as_u64().unwrap());
            }
            runs
        })
    };
    for (k, source) in sources.iter().enumerate().skip(1) {
        std::thread::sleep(Duration::from_millis(pauses_ms[k - 1]));
        let summary = backend.import("vm", source, true);
        println!(
            "version {}: uploaded {}, refreshed {}, passes {}",
            summary["version"],
            summary["uploaded_chunks"],
            summary["refreshed_chunks"],
            summary["passes"]
        );
        assert_eq!(summary["version"], k as u64 + 1);
        backend.verify_clean("vm");
    }
    stop.store(true, Ordering::Relaxed);
    let runs = collector.join().expect("gc loop");
    println!(
        "{} gc runs deleted {} chunks in all",
        runs.len(),
        runs.iter().sum::<u64>()
    );
    for version in backend.versions("vm") {
        backend.verify_clean(&format!("vm@{version}"));
    }
    backend.export_matches("vm", sources.last().unwrap());
}

#[test]
fn gc_concurrent_with_imports_loses_no_chunk_local() {
    gc_concurrent_with_imports_loses_no_chunk(Backend::local());
}

#[test]
fn gc_concurrent_with_imports_loses_no_chunk_s3() {
    gc_concurrent_with_imports_loses_no_chunk(Backend::s3());
}

fn a_lock_keeps_its_base_version(backend: Backend) {
    let sources = three_versions(&backend);
    let lock = backend
        .runtime
        .block_on(isr::session::take_lock(&backend.store, "vm", Some(2)))
        .unwrap();
    let report = backend
        .env
        .json(&["gc", "--keep-last", "1", "--grace", "0"]);
    assert_eq!(numbers(&report["parcels"][0]["deleted_versions"]), vec![1]);
    assert_eq!(report["parcels"][0]["locked_base_version"], 2);
    assert_eq!(
        report["chunks_deleted"],
        CHUNKS_PER_PART + SEGMENTS,
        "B's and version 1's segment only"
    );
    assert_eq!(backend.versions("vm"), vec![2, 3]);
    backend.verify_clean("vm@2");
    backend.export_matches("vm@2", &sources[1]);

    assert_eq!(lock.base_version, Some(2));
    backend.env.ok(&["unlock", "--force", "vm"]);
    let report = backend
        .env
        .json(&["gc", "--keep-last", "1", "--grace", "0"]);
    assert_eq!(numbers(&report["parcels"][0]["deleted_versions"]), vec![2]);
    assert_eq!(backend.versions("vm"), vec![3]);
    backend.verify_clean("vm");
}

#[test]
fn a_lock_keeps_its_base_version_local() {
    a_lock_keeps_its_base_version(Backend::local());
}

#[test]
fn a_lock_keeps_its_base_version_s3() {
    a_lock_keeps_its_base_version(Backend::s3());
}

fn a_parcel_that_does_not_unlock_stops_gc(backend: Backend) {
    three_versions(&backend);
    let other = backend.source("src-other", &["o"]);
    let output = backend
        .env
        .isrctl()
        .env("ISR_PASSPHRASE", "a different passphrase")
        .args(["import", "other", other.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success());
    let snapshot = backend.everything();

    let stderr = backend
        .env
        .fails(&["gc", "--keep-last", "1", "--grace", "0"], 3);
    assert!(stderr.contains("gc deleted nothing"), "{stderr}");
    assert!(
        stderr.contains("parcel other cannot be unlocked"),
        "{stderr}"
    );
    assert_eq!(backend.everything(), snapshot, "no object was deleted");
    let report = backend.run_json_failing(&["gc", "--keep-last", "1", "--grace", "0"]);
    assert_eq!(report["applied"], false);
    assert_eq!(report["chunks_swept"], false);
    assert_eq!(report["problems"][0]["parcel"], "other");
    assert_eq!(report["problems"][0]["exit_code"], 3);
    assert_eq!(
        numbers(&report["parcels"][1]["deleted_versions"]),
        vec![1, 2]
    );
    assert_eq!(backend.everything(), snapshot);
}

impl Backend {
    /// Runs `isrctl --json ARGS`, which must fail; returns its JSON report.
    fn run_json_failing(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let output = self.env.run(&all);
        assert!(!output.status.success());
        serde_json::from_slice(&output.stdout).expect("a JSON report")
    }
}

#[test]
fn a_parcel_that_does_not_unlock_stops_gc_local() {
    a_parcel_that_does_not_unlock_stops_gc(Backend::local());
}

#[test]
fn a_parcel_that_does_not_unlock_stops_gc_s3() {
    a_parcel_that_does_not_unlock_stops_gc(Backend::s3());
}

fn passwd_changes_only_the_keyslots(backend: Backend) {
    let sources = three_versions(&backend);
    let data = backend.snapshot(&["chunks/", "parcels/vm/versions/"]);
    let slots_before = backend.list("parcels/vm/keyslots/");
    let new_pass = backend.env.path("new-pass");
    std::fs::write(&new_pass, "a new passphrase\n").unwrap();

    let text = backend.env.ok(&[
        "passwd",
        "vm",
        "--new-passphrase-file",
        new_pass.to_str().unwrap(),
    ]);
    assert!(text.contains("new passphrase keyslot"), "{text}");
    let stderr = backend.env.fails(&["info", "vm"], 3);
    assert!(
        stderr.contains("wrong passphrase for parcel vm"),
        "{stderr}"
    );
    let with_new = |args: &[&str]| {
        let output = backend
            .env
            .isrctl()
            .env("ISR_PASSPHRASE", "a new passphrase")
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    with_new(&["verify", "vm"]);
    assert_ne!(backend.list("parcels/vm/keyslots/"), slots_before);
    assert_eq!(
        backend.snapshot(&["chunks/", "parcels/vm/versions/"]),
        data,
        "chunks and manifests unchanged byte for byte"
    );

    // To a key file (created), with the new passphrase as the current one.
    let key = backend.env.path("vm.key");
    with_new(&["passwd", "vm", "--new-key-file", key.to_str().unwrap()]);
    assert!(key.exists());
    backend.env.fails(&["info", "vm"], 3);
    let output = backend
        .env
        .isrctl()
        .env("ISR_PASSPHRASE", "a new passphrase")
        .args(["info", "vm"])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(3),
        "the new passphrase is gone too"
    );
    let out = backend.env.path("out-key");
    let output = backend
        .env
        .isrctl()
        .env_remove("ISR_PASSPHRASE")
        .args(["--key-file", key.to_str().unwrap(), "export", "vm"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        support::tree_hashes(&sources[2]),
        support::tree_hashes(&out)
    );
    assert_eq!(backend.snapshot(&["chunks/", "parcels/vm/versions/"]), data);

    // Without a terminal and without a new credential: refused, nothing changed.
    let slots = backend.list("parcels/vm/keyslots/");
    backend.env.fails(&["passwd", "vm"], 2);
    assert_eq!(backend.list("parcels/vm/keyslots/"), slots);
}

#[test]
fn passwd_changes_only_the_keyslots_local() {
    passwd_changes_only_the_keyslots(Backend::local());
}

#[test]
fn passwd_changes_only_the_keyslots_s3() {
    passwd_changes_only_the_keyslots(Backend::s3());
}

fn rollback_commits_a_copy_of_an_old_version(backend: Backend) {
    let sources = three_versions(&backend);
    let chunks = backend.snapshot(&["chunks/"]);
    let summary = backend.env.json(&["rollback", "vm", "1"]);
    assert_eq!(
        (summary["version"].as_u64(), summary["parent"].as_u64()),
        (Some(4), Some(1))
    );
    backend.export_matches("vm", &sources[0]);
    backend.verify_clean("vm");
    let history = backend.env.json(&["history", "vm"])["versions"].clone();
    assert_eq!(history[3]["version"], 4);
    assert_eq!(history[3]["parent"], 1);
    assert_eq!(history[3]["message"], "rollback to version 1");
    assert_eq!(
        backend.snapshot(&["chunks/"]),
        chunks,
        "no chunk is written"
    );
    assert!(
        !backend
            .runtime
            .block_on(backend.store.reader().exists("parcels/vm/lock"))
            .unwrap(),
        "the lock is released"
    );

    let text = backend.env.ok(&["rollback", "vm", "2", "-m", "back to C"]);
    assert!(
        text.contains("version 5 has the content of version 2"),
        "{text}"
    );
    backend.export_matches("vm", &sources[1]);

    backend
        .runtime
        .block_on(isr::session::take_lock(&backend.store, "vm", Some(5)))
        .unwrap();
    let stderr = backend.env.fails(&["rollback", "vm", "1"], 5);
    assert!(stderr.contains("parcel vm is locked"), "{stderr}");
    assert_eq!(backend.versions("vm"), vec![1, 2, 3, 4, 5]);
    backend.env.fails(&["rollback", "vm", "9"], 4);
}

#[test]
fn rollback_commits_a_copy_of_an_old_version_local() {
    rollback_commits_a_copy_of_an_old_version(Backend::local());
}

#[test]
fn rollback_commits_a_copy_of_an_old_version_s3() {
    rollback_commits_a_copy_of_an_old_version(Backend::s3());
}

#[test]
fn http_stores_find_the_versions_gc_kept() {
    let backend = Backend::local();
    let sources: Vec<_> = (1..=5)
        .map(|k| backend.source(&format!("src-{k}"), &["a", &format!("x{k}")]))
        .collect();
    for (i, source) in sources.iter().enumerate() {
        backend.import("vm", source, i > 0);
    }
    let report = backend
        .env
        .json(&["gc", "--keep-last", "2", "--grace", "0"]);
    assert_eq!(
        numbers(&report["parcels"][0]["deleted_versions"]),
        vec![1, 2, 3]
    );
    let server = support::HttpServer::serve(Path::new(&backend.env.store));
    let url = server.url();
    let history = backend.env.json(&["--store", &url, "history", "vm"])["versions"].clone();
    let versions: Vec<u64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![4, 5]);
    let out = backend.env.path("out-http");
    backend
        .env
        .ok(&["--store", &url, "export", "vm@4", out.to_str().unwrap()]);
    assert_eq!(
        support::tree_hashes(&sources[3]),
        support::tree_hashes(&out)
    );
    backend.env.fails(
        &["--store", &url, "export", "vm@3", out.to_str().unwrap()],
        4,
    );
    let stderr = backend
        .env
        .fails(&["--store", &url, "gc", "--keep-last", "1"], 2);
    assert!(stderr.contains("cannot collect garbage"), "{stderr}");
}
