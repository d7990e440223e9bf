//! Looking at versions without resuming them, and watching a session:
//! `isrctl mount`/`umount` (a read-only view of any version, without the
//! lock, while the parcel is resumed), `isrctl diff` (from the manifests),
//! and `isrctl status --watch` (the chunk map, on a non-terminal stdout).

mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use support::Env;

const CHUNK: usize = 128 * 1024;

fn resume(env: &Env, name: &str) -> PathBuf {
    let value = env.json(&["resume", "--vmm", "none", name]);
    PathBuf::from(value["mount"].as_str().unwrap())
}

/// Imports `files` as a new version of `name` (the parcel must exist).
fn new_version(env: &Env, name: &str, dir: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let source = env.path(dir);
    std::fs::create_dir_all(&source).unwrap();
    for (file, data) in files {
        std::fs::write(source.join(file), data).unwrap();
    }
    env.ok(&["import", "--new-version", name, source.to_str().unwrap()]);
    source
}

/// The view's files, without the virtual `.isr` directory every mount has.
fn view_hashes(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut hashes = support::tree_hashes(dir);
    hashes.retain(|path, _| !path.starts_with(".isr"));
    hashes
}

fn views_left(env: &Env) -> usize {
    std::fs::read_dir(env.path("state/views")).map_or(0, |d| d.count())
}

#[test]
fn an_old_version_mounts_read_only_while_the_parcel_is_resumed() {
    Env::require_fuse();
    let env = Env::local();
    let v1_disk = support::random_bytes("view-v1", 3 * CHUNK);
    let v1 = env.import_files("vm", &[("disk.img", &v1_disk[..]), ("notes.txt", b"one")]);
    new_version(
        &env,
        "vm",
        "v2",
        &[("disk.img", b"version two"), ("new.txt", b"2")],
    );
    let resumed = resume(&env, "vm");
    std::fs::write(resumed.join("notes.txt"), b"changed in the session").unwrap();

    let view = env.path("view");
    std::fs::create_dir(&view).unwrap();
    let mounted = env.json(&["mount", "vm@1", view.to_str().unwrap()]);
    assert_eq!(mounted["version"], 1);
    assert_eq!(mounted["parcel"], "vm");
    assert_eq!(
        view_hashes(&view),
        support::tree_hashes(&v1),
        "the view shows version 1"
    );
    assert_eq!(std::fs::read(view.join("disk.img")).unwrap(), v1_disk);
    // The resumed session is untouched and still writable.
    assert_eq!(
        std::fs::read(resumed.join("notes.txt")).unwrap(),
        b"changed in the session"
    );
    std::fs::write(resumed.join("more.txt"), b"still writable").unwrap();

    // Every change to the view fails with EROFS.
    const EROFS: i32 = 30;
    let write = std::fs::OpenOptions::new()
        .write(true)
        .open(view.join("notes.txt"));
    assert_eq!(write.unwrap_err().raw_os_error(), Some(EROFS));
    let create = std::fs::write(view.join("new-file"), b"x");
    assert_eq!(create.unwrap_err().raw_os_error(), Some(EROFS));
    let remove = std::fs::remove_file(view.join("notes.txt"));
    assert_eq!(remove.unwrap_err().raw_os_error(), Some(EROFS));
    assert_eq!(std::fs::read(view.join("notes.txt")).unwrap(), b"one");

    // Errors, each with its exit code.
    let again = env.fails(&["mount", "vm@2", view.to_str().unwrap()], 5);
    assert!(again.contains("already shows version 1"), "{again}");
    let onto_session = env.fails(&["mount", "vm@2", resumed.to_str().unwrap()], 5);
    assert!(onto_session.contains("resumed"), "{onto_session}");
    let file = env.path("a-file");
    std::fs::write(&file, b"").unwrap();
    let not_dir = env.fails(&["mount", "vm@1", file.to_str().unwrap()], 2);
    assert!(not_dir.contains("not a directory"), "{not_dir}");
    env.fails(&["mount", "vm@9", env.path("v2").to_str().unwrap()], 4);
    let unknown = env.fails(&["umount", env.path("v2").to_str().unwrap()], 4);
    assert!(unknown.contains("no view"), "{unknown}");

    // A second view of another version beside the first, by a relative path.
    let second = env.path("second");
    std::fs::create_dir(&second).unwrap();
    let out = env
        .isrctl()
        .current_dir(env.dir.path())
        .args(["mount", "vm@2", "second"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read(second.join("disk.img")).unwrap(),
        b"version two"
    );
    assert_eq!(views_left(&env), 2);
    let listed = env.json(&["mount"]);
    assert_eq!(listed["views"].as_array().unwrap().len(), 2, "{listed:#}");
    assert_eq!(listed["views"][0]["parcel"], "vm");
    assert_eq!(listed["views"][0]["version"], 2);
    assert_eq!(listed["views"][0]["dir"], second.to_str().unwrap());
    assert_eq!(listed["views"][1]["version"], 1);
    let table = env.ok(&["mount"]);
    assert!(table.contains(view.to_str().unwrap()), "{table}");

    // Another machine, whose daemon the lock holder is not, mounts it too.
    let other = env.another_machine();
    let elsewhere = other.path("view");
    std::fs::create_dir(&elsewhere).unwrap();
    other.ok(&["mount", "vm@1", elsewhere.to_str().unwrap()]);
    assert_eq!(std::fs::read(elsewhere.join("disk.img")).unwrap(), v1_disk);
    other.ok(&["umount", elsewhere.to_str().unwrap()]);
    drop(other);

    env.ok(&["umount", view.to_str().unwrap()]);
    assert!(
        std::fs::read_dir(&view).unwrap().next().is_none(),
        "after umount the directory is empty again"
    );
    env.fails(&["umount", view.to_str().unwrap()], 4);
    assert_eq!(views_left(&env), 1, "the view's scratch state is gone");
    // The session goes on; a stop of the daemon ends the remaining view.
    assert_eq!(
        std::fs::read(resumed.join("more.txt")).unwrap(),
        b"still writable"
    );
    env.stop_daemon();
    assert!(std::fs::read_dir(&second).unwrap().next().is_none());
    assert_eq!(views_left(&env), 0);
    let no_daemon = env.fails(&["umount", second.to_str().unwrap()], 4);
    assert!(no_daemon.contains("isrfsd is not running"), "{no_daemon}");
}

#[test]
fn a_view_of_a_killed_daemon_is_cleaned_up_by_the_next_one() {
    Env::require_fuse();
    let env = Env::local();
    env.import_files("vm", &[("a.txt", b"a")]);
    let view = env.path("view");
    std::fs::create_dir(&view).unwrap();
    // mount starts the daemon, as resume does.
    env.ok(&["mount", "vm", view.to_str().unwrap()]);
    assert_eq!(std::fs::read(view.join("a.txt")).unwrap(), b"a");
    env.kill_daemon();
    assert_eq!(views_left(&env), 1);
    // The next daemon removes the stale scratch state and the dead mount.
    env.ok(&["status"]);
    resume(&env, "vm");
    assert_eq!(views_left(&env), 0);
    assert!(std::fs::read_dir(&view).unwrap().next().is_none());
    env.ok(&["mount", "vm@1", view.to_str().unwrap()]);
    assert_eq!(std::fs::read(view.join("a.txt")).unwrap(), b"a");
}

#[test]
fn diff_lists_added_removed_and_modified_files_and_new_chunks() {
    let env = Env::local();
    let keep = support::random_bytes("keep", 2 * CHUNK);
    let change = support::random_bytes("change", 3 * CHUNK);
    env.import_files(
        "vm",
        &[
            ("keep.img", &keep[..]),
            ("change.img", &change[..]),
            ("gone.txt", b"bye"),
        ],
    );
    let mut changed = change.clone();
    changed[CHUNK + 5] ^= 0xff; // one byte of the middle chunk
    changed.extend_from_slice(&[7u8; 1000]); // and a partial chunk at the end
    let added = support::random_bytes("added", CHUNK + 10);
    new_version(
        &env,
        "vm",
        "v2",
        &[
            ("keep.img", &keep[..]),
            ("change.img", &changed[..]),
            ("added.bin", &added[..]),
        ],
    );
    // import --new-version with a directory replaces the tree: gone.txt is gone.
    let diff = env.json(&["diff", "vm", "1", "2"]);
    assert_eq!(diff["from"], 1);
    assert_eq!(diff["to"], 2);
    assert_eq!(
        diff["added"],
        serde_json::json!([{"path": "added.bin", "size": CHUNK + 10}])
    );
    assert_eq!(
        diff["removed"],
        serde_json::json!([{"path": "gone.txt", "size": 3}])
    );
    assert_eq!(
        diff["modified"],
        serde_json::json!([{
            "path": "change.img",
            "old_size": 3 * CHUNK,
            "new_size": 3 * CHUNK + 1000,
            "changed_chunks": 2,
            "changed_bytes": CHUNK + 1000,
        }])
    );
    assert_eq!(diff["unchanged_files"], 1);
    // The changed middle chunk, the new last chunk, the two of added.bin.
    assert_eq!(diff["new_chunks"], 4);
    assert_eq!(
        diff["dropped_chunks"], 2,
        "gone.txt's and the old middle chunk"
    );
    let stored: u64 = {
        let v1 = env.manifest("vm", 1);
        let old: std::collections::HashSet<_> = v1.stored_chunks().map(|(t, _)| t).collect();
        env.manifest("vm", 2)
            .stored_chunks()
            .filter(|(t, _)| !old.contains(t))
            .map(|(_, len)| len)
            .sum()
    };
    assert_eq!(diff["new_chunk_bytes"], stored);

    let text = env.ok(&["diff", "vm", "1", "2"]);
    assert!(
        text.contains("added") && text.contains("added.bin"),
        "{text}"
    );
    assert!(
        text.contains("removed") && text.contains("gone.txt"),
        "{text}"
    );
    assert!(
        text.contains("modified") && text.contains("change.img"),
        "{text}"
    );
    assert!(!text.contains("keep.img"), "{text}");
    assert!(
        text.contains("1 files added, 1 removed, 1 modified, 1 unchanged; 4 new chunks"),
        "{text}"
    );
    let same = env.ok(&["diff", "vm", "2", "2"]);
    assert!(same.contains("same files"), "{same}");
    env.fails(&["diff", "vm", "1", "3"], 4);
    env.fails(&["diff", "nosuch", "1", "2"], 4);
}

/// The map line of `file` in a plain `status --watch` block.
fn map_of(block: &str, file: &str) -> String {
    let line = block
        .lines()
        .find(|l| l.trim_start().starts_with(file))
        .unwrap_or_else(|| panic!("no map for {file} in:\n{block}"));
    line.split('[')
        .nth(1)
        .unwrap()
        .trim_end_matches(']')
        .to_owned()
}

#[test]
fn status_watch_shows_each_chunks_state_without_cursor_codes() {
    Env::require_fuse();
    let env = Env::local();
    env.append_config("\n[fetch]\nprefetch = false\n");
    let disk = support::random_bytes("watch", 4 * CHUNK);
    env.import_files(
        "vm",
        &[
            ("disk.img", &disk[..]),
            ("zero.img", &vec![0u8; 2 * CHUNK][..]),
        ],
    );
    let mount = resume(&env, "vm");

    // Read the first half, without kernel readahead reaching further.
    let file = std::fs::File::open(mount.join("disk.img")).unwrap();
    nix::fcntl::posix_fadvise(
        &file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM,
    )
    .unwrap();
    let mut half = vec![0u8; 2 * CHUNK];
    file.read_exact_at(&mut half, 0).unwrap();
    assert_eq!(half, disk[..2 * CHUNK]);

    let out = env.ok(&["status", "--watch", "--count", "2", "vm"]);
    assert!(
        !out.contains('\u{1b}'),
        "no cursor codes off a terminal: {out:?}"
    );
    let blocks: Vec<&str> = out.split("\n\n").filter(|b| !b.trim().is_empty()).collect();
    assert_eq!(blocks.len(), 2, "one block per refresh:\n{out}");
    assert_eq!(map_of(blocks[1], "disk.img"), "LLRR", "{out}");
    assert_eq!(map_of(blocks[1], "zero.img"), "..", "{out}");
    assert!(blocks[1].contains("local 2/4 chunks"), "{out}");
    assert!(blocks[1].contains("upload backlog 0 B (0 chunks)"), "{out}");

    // A small change made durable by fsync is in the fsync log: changed, not
    // sealed, so nothing waits for upload yet.
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.join("disk.img"))
        .unwrap();
    writer.write_all_at(b"changed", 3 * CHUNK as u64).unwrap();
    writer.sync_all().unwrap();
    let watch = env.json(&["status", "--watch", "--count", "1", "vm"]);
    assert_eq!(
        watch["sessions"][0]["files"][0]["runs"], "2L1R1D",
        "{watch:#}"
    );
    assert_eq!(watch["sessions"][0]["status"]["pending_chunks"], 0);
    // A change of half the chunk is sealed by fsync and waits for upload
    // (the trickle waits 30 s of quiet).
    writer
        .write_all_at(&vec![7u8; CHUNK / 2], 3 * CHUNK as u64)
        .unwrap();
    writer.sync_all().unwrap();
    let watch = env.json(&["status", "--watch", "--count", "1", "vm"]);
    let files = &watch["sessions"][0]["files"];
    assert_eq!(files[0]["path"], "disk.img");
    assert_eq!(files[0]["runs"], "2L1R1U", "{watch:#}");
    assert_eq!(files[1]["runs"], "2.", "{watch:#}");
    assert_eq!(watch["sessions"][0]["status"]["pending_chunks"], 1);
    // Once synced it is changed and in the store.
    env.ok(&["sync", "vm"]);
    let out = env.ok(&["status", "--watch", "--count", "1", "vm"]);
    assert_eq!(map_of(&out, "disk.img"), "LLRD", "{out}");
    assert!(
        out.contains("upload backlog 0 B (0 chunks), 1 chunks uploaded"),
        "{out}"
    );

    // Every chunk local: the ETA says so.
    env.ok(&["hoard", "vm"]);
    let out = env.ok(&["status", "--watch", "--count", "1", "vm"]);
    assert!(out.contains("local 4/4 chunks (100%)"), "{out}");
    assert!(out.contains("fully local"), "{out}");
    assert_eq!(map_of(&out, "disk.img"), "LLLD", "{out}");

    // Plain status labels its columns with their units.
    let table = env.ok(&["status"]);
    let header = table.lines().next().unwrap();
    assert!(
        header.contains("DIRTY CHUNKS") && header.contains("UPLOAD BACKLOG"),
        "{header}"
    );

    // The watch of a parcel that is not resumed fails; of one that ends, stops.
    env.fails(&["status", "--watch", "--count", "1", "nosuch"], 4);
    env.ok(&["checkin", "vm"]);
    env.fails(&["status", "--watch", "--count", "1", "vm"], 4);
}
