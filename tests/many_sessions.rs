//! One isrfsd serving 50 resumed parcels at once (issue 17, part 4): every
//! mount reads the right bytes, and what the daemon holds per session is
//! counted — open file descriptors (/proc/PID/fd), threads (/proc/PID/task)
//! and resident memory (/proc/PID/status) — against bounds stated as counts
//! and configured sizes, never times. Then every session ends and the fds
//! and threads return to what one session had.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use support::Env;

const SESSIONS: usize = 50;
/// Sessions resumed before the first measurement (the reference point).
const FIRST: usize = 10;
/// isrfsd's FUSE worker threads per mount (its `--fuse-threads` default).
const FUSE_THREADS: usize = 8;
/// Plaintext chunks a session's decoded-chunk cache may hold, and their size.
const DECODED_CHUNKS: u64 = 64;
const CHUNK: u64 = 128 << 10;

/// What isrfsd holds at one moment.
#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: usize,
    threads: usize,
    /// Of `threads`, fuser's (named `fuser-…`): the mounts' own.
    fuse_threads: usize,
    rss_kib: u64,
}

fn usage(pid: i32) -> Usage {
    let count = |dir: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{dir}"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/{dir}: {e}"))
            .count()
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    let fuse_threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.starts_with("fuser-"))
        })
        .count();
    Usage {
        fds: count("fd"),
        threads: count("task"),
        fuse_threads,
        rss_kib,
    }
}

/// The daemon's usage once its transient threads (a blocking pool's idle
/// workers, a finished control connection's thread) are gone: the lowest
/// thread count seen over a few samples, with the fds and RSS of that sample.
fn settled_usage(pid: i32) -> Usage {
    let mut best = usage(pid);
    for _ in 0..24 {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let now = usage(pid);
        if now.threads < best.threads || (now.threads == best.threads && now.fds < best.fds) {
            best = now;
        }
    }
    best
}

/// isrfsd's threads by name, with counts ("isrfsd-io ×2, …").
fn thread_names(pid: i32) -> String {
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        *names.entry(comm.trim().to_owned()).or_default() += 1;
    }
    names
        .iter()
        .map(|(name, n)| format!("{name} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// isrfsd's open files by kind, with counts ("/dev/fuse ×8, socket ×3, …"):
/// paths under a session's state directory count as "state", others by
/// their kind or path.
fn fd_kinds(pid: i32) -> String {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path())
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        let kind = if let Some((kind, _)) = target.split_once(':') {
            kind.to_owned()
        } else if target.contains("/state/") {
            "state".to_owned()
        } else if target.contains("/cache/") {
            "cache".to_owned()
        } else {
            target
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
        .iter()
        .map(|(kind, n)| format!("{kind} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn name(i: usize) -> String {
    format!("p{i:02}")
}

/// A small parcel: a disk image of its own (random), a base image every
/// parcel shares (so the cache dedups it), and a text file.
fn source(env: &Env, i: usize, base: &[u8]) -> PathBuf {
    let dir = env.path(&format!("src-{}", name(i)));
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(
        dir.join("disk.img"),
        support::random_bytes(&name(i), 1_500_000 + i * 4_099),
    )
    .unwrap();
    std::fs::write(dir.join("base.img"), base).unwrap();
    std::fs::write(
        dir.join("etc/notes.txt"),
        format!("parcel {i}\n").repeat(20_000),
    )
    .unwrap();
    dir
}

#[test]
fn fifty_sessions_on_one_daemon_read_correctly_with_bounded_fds_threads_and_memory() {
    Env::require_fuse();
    let env = Env::local();
    // No trickle upload: the sessions are measured at rest (its uploads, all
    // 30 s after the writes below, would run blocking work while counted).
    env.append_config("\n[upload]\ntrickle = false\n");
    let base = support::random_bytes("shared base", 2 << 20);
    let mut expected: Vec<BTreeMap<String, String>> = Vec::new();
    for i in 0..SESSIONS {
        let dir = source(&env, i, &base);
        expected.push(support::tree_hashes(&dir));
        env.ok(&["import", &name(i), dir.to_str().unwrap()]);
    }

    let resume = |i: usize| -> PathBuf {
        let answer = env.json(&["resume", "--vmm", "none", &name(i)]);
        PathBuf::from(answer["mount"].as_str().unwrap())
    };
    let check = |mount: &Path, i: usize| {
        // (.isr/ is the daemon's status view of the session, not a file of the parcel.)
        let mut read = support::tree_hashes(mount);
        read.retain(|path, _| !path.starts_with(".isr"));
        assert_eq!(
            read,
            expected[i],
            "{} reads its own files through its mount",
            name(i)
        );
    };
    let mut mounts = vec![resume(0)];
    check(&mounts[0], 0);
    let pid = env.daemon_pid().expect("isrfsd runs");
    let single = settled_usage(pid);
    for i in 1..FIRST {
        mounts.push(resume(i));
    }
    for (i, mount) in mounts.iter().enumerate() {
        check(mount, i);
    }
    let first = settled_usage(pid);

    for i in FIRST..SESSIONS {
        mounts.push(resume(i));
    }
    assert_eq!(
        env.daemon_pid(),
        Some(pid),
        "one daemon serves every session"
    );
    for (i, mount) in mounts.iter().enumerate() {
        check(mount, i);
    }
    // A few bytes written and fsynced in every session, read back.
    for (i, mount) in mounts.iter().enumerate() {
        let path = mount.join("etc/notes.txt");
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        use std::os::unix::fs::FileExt;
        file.write_all_at(format!("changed {i}").as_bytes(), 7)
            .unwrap();
        file.sync_all().unwrap();
    }
    let status = env.json(&["status"]);
    assert_eq!(status["sessions"].as_array().unwrap().len(), SESSIONS);
    let all = settled_usage(pid);
    let added = (SESSIONS - FIRST) as f64;
    let per_session_fds = (all.fds - first.fds) as f64 / added;
    let per_session_threads = (all.threads - first.threads) as f64 / added;
    let per_session_kib = (all.rss_kib as f64 - first.rss_kib as f64) / added;
    println!(
        "isrfsd with 1 session: {} fds, {} threads, {} KiB RSS",
        single.fds, single.threads, single.rss_kib
    );
    println!("threads by name: {}", thread_names(pid));
    println!("fds by kind: {}", fd_kinds(pid));
    println!(
        "isrfsd with {FIRST} sessions: {} fds, {} threads, {} KiB RSS; with {SESSIONS}: {} fds, \
         {} threads, {} KiB RSS; per session: {per_session_fds:.2} fds, {per_session_threads:.2} \
         threads, {per_session_kib:.0} KiB",
        first.fds, first.threads, first.rss_kib, all.fds, all.threads, all.rss_kib
    );

    // Per mount, fuser opens /dev/fuse once and clones it for each further
    // worker (clone_fd): FUSE_THREADS fds; the session's state database
    // (redb) is one more. Nothing else may grow with the sessions.
    let fds_per_session = FUSE_THREADS + 1;
    assert!(
        all.fds <= first.fds + (SESSIONS - FIRST) * fds_per_session,
        "{} fds with {SESSIONS} sessions, {} with {FIRST}: more than {fds_per_session} per session",
        all.fds,
        first.fds
    );
    // Per mount, FUSE_THREADS workers and fuser's thread that joins them.
    // The sessions' fetches, prefetch and uploads are tasks on the daemon's
    // one runtime (2 workers and a blocking pool that grows with concurrent
    // blocking work, not with sessions), so the other threads do not grow
    // per session. The pool keeps the threads of the last burst of blocking
    // work while each session's uploader ticks (its idle threads end only
    // after 10 s without any work): it was seen 4 to 9 threads bigger with
    // 50 sessions than with 10; a thread per added session would be 40.
    let threads_per_session = FUSE_THREADS + 1;
    assert_eq!(all.fuse_threads, SESSIONS * threads_per_session);
    assert_eq!(first.fuse_threads, FIRST * threads_per_session);
    let others = |u: &Usage| u.threads - u.fuse_threads;
    assert!(
        others(&all) <= others(&first) + 16,
        "isrfsd's own threads grew with the sessions: {} with {SESSIONS}, {} with {FIRST}",
        others(&all),
        others(&first)
    );
    // Memory: the daemon's 64 MiB, each session's decoded-chunk cache (its
    // configured size, or the whole image if smaller: every chunk was read),
    // and a small amount per session (its trees, fetcher, state database
    // handle and the stacks its FUSE threads touched): at most 1 MiB.
    let image_bytes = |i: usize| -> u64 {
        let dir = env.path(&format!("src-{}", name(i)));
        ["disk.img", "base.img", "etc/notes.txt"]
            .iter()
            .map(|f| {
                std::fs::metadata(dir.join(f))
                    .unwrap()
                    .len()
                    .div_ceil(CHUNK)
                    * CHUNK
            })
            .sum()
    };
    let decoded_kib: u64 = (0..SESSIONS)
        .map(|i| image_bytes(i).min(DECODED_CHUNKS * CHUNK) / 1024)
        .sum();
    let bound_kib = 64 * 1024 + decoded_kib + SESSIONS as u64 * 1024;
    assert!(
        all.rss_kib <= bound_kib,
        "isrfsd RSS {} KiB with {SESSIONS} sessions is over 64 MiB + decoded-chunk caches \
         {decoded_kib} KiB + 1 MiB per session = {bound_kib} KiB",
        all.rss_kib
    );

    // Half are checked in, half discarded: the daemon is back to one session's worth.
    for i in 1..SESSIONS {
        if i % 2 == 0 {
            env.ok(&["checkin", &name(i)]);
        } else {
            env.ok(&["discard", &name(i)]);
        }
    }
    assert_eq!(
        env.json(&["status"])["sessions"].as_array().unwrap().len(),
        1
    );
    let one = settled_usage(pid);
    println!(
        "isrfsd after the others ended, one session left: {} fds, {} threads, {} KiB RSS",
        one.fds, one.threads, one.rss_kib
    );
    assert!(
        one.fds <= single.fds + 2,
        "fds did not return: {} with one session left, {} with the first alone",
        one.fds,
        single.fds
    );
    assert_eq!(
        one.fuse_threads, single.fuse_threads,
        "fuser's threads ended with their mounts"
    );
    assert!(
        one.threads <= single.threads + 16,
        "threads did not return: {} with one session left, {} with the first alone",
        one.threads,
        single.threads
    );
    // A second round of the same 49 sessions reuses what the first freed:
    // the same fds and fuser threads, and no more memory than the first
    // round's peak (glibc keeps the freed heap, so RSS did not fall above).
    for (i, files) in expected.iter().enumerate().skip(1) {
        let mount = resume(i);
        let mut read = support::tree_hashes(&mount);
        read.retain(|path, _| !path.starts_with(".isr"));
        assert_eq!(read.len(), files.len(), "{} mounted again", name(i));
    }
    let again = settled_usage(pid);
    println!(
        "isrfsd with {SESSIONS} sessions again: {} fds, {} threads, {} KiB RSS",
        again.fds, again.threads, again.rss_kib
    );
    assert_eq!(again.fds, all.fds);
    assert_eq!(again.fuse_threads, all.fuse_threads);
    assert!(
        again.rss_kib <= all.rss_kib + 16 * 1024,
        "a second round of sessions grew isrfsd: {} KiB RSS, {} KiB in the first",
        again.rss_kib,
        all.rss_kib
    );
    for i in 1..SESSIONS {
        env.ok(&["discard", &name(i)]);
    }
    // The checked-in parcels hold their change.
    let other = env.another_machine();
    let mount = PathBuf::from(
        other.json(&["resume", "--vmm", "none", &name(2)])["mount"]
            .as_str()
            .unwrap(),
    );
    let notes = std::fs::read(mount.join("etc/notes.txt")).unwrap();
    assert_eq!(&notes[7..16], b"changed 2");
    other.ok(&["discard", &name(2)]);
    env.ok(&["discard", &name(0)]);
}
