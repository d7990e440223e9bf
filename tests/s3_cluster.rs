//! isr against a real SeaweedFS cluster (master, three volume servers keeping
//! every volume on two of them, filer, S3 gateway — all from the one `weed`
//! binary) while a node fails: a volume server SIGKILLed mid-read and
//! mid-checkin, the S3 gateway restarted mid-checkin. The kills happen at an
//! exact byte count on the link between isr and the gateway (it freezes,
//! the node dies, it thaws), not after a sleep.
//!
//! What every scenario checks: reads complete with the right bytes; a
//! checkin either completes or fails with exit 6 (store unreachable) and a
//! rerun completes; `verify --deep` is clean for every version; every
//! version a command reported committed exports with its bytes; after the
//! node is back, a further resume/checkin/verify works with nothing done by
//! hand. What SeaweedFS did meanwhile is printed (see docs/scale.md).

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use support::Env;
use support::cluster::{Direction, SeaweedCluster};

const MIB: usize = 1 << 20;
const DISK: usize = 6 * MIB;

/// Files of a parcel (relative path → blake3), as `tree_hashes` gives them.
type Hashes = BTreeMap<String, String>;

/// Versions a command reported committed, with the files they must hold.
#[derive(Default)]
struct Committed(Vec<(u64, Hashes)>);

impl Committed {
    fn add(&mut self, version: u64, hashes: Hashes) {
        assert!(
            self.0.iter().all(|(v, _)| *v != version),
            "version {version} reported committed twice"
        );
        self.0.push((version, hashes));
    }

    /// Every acknowledged version verifies deep and exports its bytes.
    fn check(&self, env: &Env, name: &str) {
        let versions = env.versions(name);
        for (version, hashes) in &self.0 {
            assert!(
                versions.contains(version),
                "version {version} was reported committed but the store lists {versions:?}"
            );
            let target = format!("{name}@{version}");
            let report = env.json(&["verify", "--deep", &target]);
            assert_eq!(report["bad_chunks"], serde_json::json!([]), "{report:#}");
            let dir = env.path(&format!("export-{version}"));
            let _ = std::fs::remove_dir_all(&dir);
            env.ok(&["export", &target, dir.to_str().unwrap()]);
            assert_eq!(
                &support::tree_hashes(&dir),
                hashes,
                "{target} exports other bytes than were committed"
            );
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

fn resume(env: &Env, name: &str) -> PathBuf {
    PathBuf::from(env.json(&["resume", name])["mount"].as_str().unwrap())
}

/// File hashes of a mounted parcel, without the daemon's `.isr` files.
fn parcel_hashes(mount: &Path) -> Hashes {
    let mut hashes = support::tree_hashes(mount);
    hashes.retain(|path, _| !path.starts_with(".isr"));
    hashes
}

/// A parcel source: a random disk image (every chunk stored) and two files.
fn import(env: &Env, name: &str) -> Hashes {
    let disk = support::random_bytes(&format!("{name}-disk"), DISK);
    let source = env.import_files(
        name,
        &[
            ("disk.img", disk.as_slice()),
            ("vm.toml", b"memory = 512\n".as_slice()),
            ("notes.txt", b"hello\n".repeat(1000).as_slice()),
        ],
    );
    let hashes = support::tree_hashes(&source);
    std::fs::remove_dir_all(&source).unwrap();
    hashes
}

/// Overwrites `len` bytes of the mounted disk image at `offset` with fresh
/// random data and fsyncs; returns the parcel's hashes after.
fn write_disk(mount: &Path, seed: &str, offset: u64, len: usize) -> Hashes {
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.join("disk.img"))
        .unwrap();
    disk.write_all_at(&support::random_bytes(seed, len), offset)
        .unwrap();
    disk.sync_all().unwrap();
    drop(disk);
    parcel_hashes(mount)
}

/// Starts `isrctl --json ARGS` without waiting for it.
fn spawn(env: &Env, args: &[&str]) -> Child {
    env.isrctl()
        .arg("--json")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start isrctl")
}

/// Waits for `child`; a command still running after 5 minutes hangs (the
/// store is back long before), which fails the test.
fn finish(mut child: Child, what: &str, env: &Env, cluster: &SeaweedCluster) -> Output {
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "{what} hung; stderr:\n{}\nisrfsd's log:\n{}\n{}",
                String::from_utf8_lossy(&output.stderr),
                env.daemon_log(),
                cluster.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// The outcome of a checkin that may have been interrupted: `Some(version)`
/// if it reported a commit; `None` if it failed the documented way (exit 6,
/// the store unreachable, in one line). Anything else fails the test.
fn checkin_outcome(output: &Output, what: &str) -> Option<u64> {
    let stderr = String::from_utf8_lossy(&output.stderr);
    match output.status.code() {
        Some(0) => {
            let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            assert_eq!(report["committed"], true, "{what}: {report:#}");
            Some(report["version"].as_u64().unwrap())
        }
        Some(6) => {
            let errors: Vec<&str> = stderr
                .lines()
                .filter(|l| l.starts_with("isrctl:"))
                .collect();
            assert_eq!(errors.len(), 1, "{what}: one error line:\n{stderr}");
            println!("{what}: failed cleanly (exit 6): {}", errors[0]);
            None
        }
        other => panic!("{what}: exit {other:?}, expected 0 or 6:\n{stderr}"),
    }
}

/// Runs the checkin of `name` whose upload the link freezes after `after`
/// bytes; while frozen, `fail` breaks a node; after the thaw, `heal` may
/// bring it back. A failed run is followed by a rerun, which must commit.
/// Returns the committed version and the measurements printed.
fn interrupted_checkin(
    env: &Env,
    cluster: &mut SeaweedCluster,
    name: &str,
    after: u64,
    what: &str,
    fail: impl FnOnce(&mut SeaweedCluster),
    heal: impl FnOnce(&mut SeaweedCluster),
) -> u64 {
    let up_before = cluster.link.bytes(Direction::Up);
    let retries_before = store_retries(env);
    cluster.link.freeze_after(Direction::Up, after);
    let child = spawn(env, &["checkin", name, "-m", what]);
    assert!(
        cluster.link.wait_frozen(Duration::from_secs(120)),
        "{what}: the checkin never sent {after} bytes"
    );
    fail(cluster);
    cluster.link.thaw();
    heal(cluster);
    let output = finish(child, what, env, cluster);
    let version = match checkin_outcome(&output, what) {
        Some(version) => version,
        None => {
            let rerun = env.run(&["--json", "checkin", name, "-m", what]);
            checkin_outcome(&rerun, &format!("{what} (rerun)"))
                .unwrap_or_else(|| panic!("{what}: the rerun failed too"))
        }
    };
    println!(
        "{what}: committed version {version}; {} bytes went up in all; {} requests retried \
         by isrfsd; link connections (accepted, refused by a stopped gateway): {:?}",
        cluster.link.bytes(Direction::Up) - up_before,
        store_retries(env) - retries_before,
        cluster.link.connections()
    );
    version
}

/// Store requests isrfsd retried so far (object_store logs each backoff).
fn store_retries(env: &Env) -> usize {
    env.daemon_log()
        .lines()
        .filter(|line| line.contains("backing off") || line.contains("retrying"))
        .count()
}

#[test]
fn a_volume_server_killed_mid_read_and_mid_checkin_loses_nothing() {
    Env::require_fuse();
    let mut cluster = SeaweedCluster::start();
    let env = Env::cluster(&cluster, "volume-kill");
    env.append_config("\n[fetch]\nprefetch = false\n\n[upload]\ntrickle = false\n");
    let mut committed = Committed::default();
    committed.add(1, import(&env, "vm"));

    // Mid-read: the link freezes half-way through reading the parcel, volume
    // server 0 dies, the link thaws; the read goes on.
    let mount = resume(&env, "vm");
    cluster
        .link
        .freeze_after(Direction::Down, (DISK / 2) as u64);
    let reader = {
        let mount = mount.clone();
        std::thread::spawn(move || parcel_hashes(&mount))
    };
    assert!(
        cluster.link.wait_frozen(Duration::from_secs(120)),
        "the read never fetched {} bytes",
        DISK / 2
    );
    cluster.kill_volume(0);
    cluster.link.thaw();
    let read = reader.join().expect("reading the parcel");
    assert_eq!(
        &read, &committed.0[0].1,
        "the parcel read with a volume server killed mid-read"
    );
    let fetch = env.json(&["status", "vm"])["sessions"][0]["fetch"].clone();
    println!("read with volume server 0 killed half-way: fetch counters {fetch}");
    assert_eq!(fetch["failures"], 0, "{fetch:#}");

    // Writes while a replica is down: a checkin with volume server 0 still down.
    let hashes = write_disk(&mount, "while-down", MIB as u64, 2 * MIB);
    let report = env.json(&["checkin", "vm", "-m", "one volume server down"]);
    assert_eq!(report["committed"], true, "{report:#}");
    let version = report["version"].as_u64().unwrap();
    println!(
        "checkin with volume server 0 down: version {version}, {} chunks uploaded",
        report["uploaded_chunks"]
    );
    committed.add(version, hashes);
    committed.check(&env, "vm");

    // The node comes back; then another dies mid-checkin.
    cluster.restart_volume(0);
    let mount = resume(&env, "vm");
    let hashes = write_disk(&mount, "mid-checkin", 3 * MIB as u64, 3 * MIB);
    let version = interrupted_checkin(
        &env,
        &mut cluster,
        "vm",
        MIB as u64,
        "checkin with volume server 1 killed mid-upload",
        |cluster| cluster.kill_volume(1),
        |_| {},
    );
    committed.add(version, hashes);
    committed.check(&env, "vm");

    // Back to three nodes, nothing repaired by hand: another machine
    // resumes, reads everything, changes it and checks in.
    cluster.restart_volume(1);
    let other = env.another_machine();
    let mount = resume(&other, "vm");
    assert_eq!(&parcel_hashes(&mount), &committed.0.last().unwrap().1);
    let hashes = write_disk(&mount, "after", 0, MIB);
    let report = other.json(&["checkin", "vm", "-m", "all nodes back"]);
    assert_eq!(report["committed"], true, "{report:#}");
    committed.add(report["version"].as_u64().unwrap(), hashes);
    committed.check(&other, "vm");
}

#[test]
fn the_s3_gateway_restarting_mid_read_and_mid_checkin_loses_nothing() {
    Env::require_fuse();
    let mut cluster = SeaweedCluster::start();
    let env = Env::cluster(&cluster, "gateway-restart");
    env.append_config("\n[fetch]\nprefetch = false\n\n[upload]\ntrickle = false\n");
    let mut committed = Committed::default();
    committed.add(1, import(&env, "vm"));

    // Mid-read: the gateway dies half-way through reading the parcel and
    // comes back; the reads wait for it and complete.
    let mount = resume(&env, "vm");
    cluster
        .link
        .freeze_after(Direction::Down, (DISK / 2) as u64);
    let reader = {
        let mount = mount.clone();
        std::thread::spawn(move || parcel_hashes(&mount))
    };
    assert!(cluster.link.wait_frozen(Duration::from_secs(120)));
    cluster.kill_gateway();
    cluster.link.thaw();
    cluster.start_gateway();
    let read = reader.join().expect("reading the parcel");
    assert_eq!(
        &read, &committed.0[0].1,
        "the parcel read with the gateway restarted mid-read"
    );
    let fetch = env.json(&["status", "vm"])["sessions"][0]["fetch"].clone();
    println!("read with the S3 gateway restarted half-way: fetch counters {fetch}");
    assert_eq!(fetch["failures"], 0, "{fetch:#}");

    // Mid-checkin, with the tests' short retries ([retry] attempts = 3,
    // 50–200 ms apart: less than the gateway takes to start).
    let hashes = write_disk(&mount, "gateway", MIB as u64, 4 * MIB);
    let version = interrupted_checkin(
        &env,
        &mut cluster,
        "vm",
        2 * MIB as u64,
        "checkin with the S3 gateway restarted mid-upload (short retries)",
        SeaweedCluster::kill_gateway,
        SeaweedCluster::start_gateway,
    );
    committed.add(version, hashes);
    committed.check(&env, "vm");

    // The same with the default [retry] settings (6 attempts, 0.2–5 s apart).
    let config = std::fs::read_to_string(&env.config).unwrap();
    let defaults = config.replace(
        "attempts = 3\ninitial_backoff_ms = 50\nmax_backoff_ms = 200\nrequest_timeout_secs = 10\n",
        "",
    );
    assert_ne!(config, defaults, "the test config's [retry] lines");
    std::fs::write(&env.config, defaults).unwrap();
    env.stop_daemon();
    let mount = resume(&env, "vm");
    assert_eq!(&parcel_hashes(&mount), &committed.0.last().unwrap().1);
    let hashes = write_disk(&mount, "gateway-defaults", 2 * MIB as u64, 4 * MIB);
    let version = interrupted_checkin(
        &env,
        &mut cluster,
        "vm",
        2 * MIB as u64,
        "checkin with the S3 gateway restarted mid-upload (default retries)",
        SeaweedCluster::kill_gateway,
        SeaweedCluster::start_gateway,
    );
    committed.add(version, hashes);
    committed.check(&env, "vm");

    let mount = resume(&env, "vm");
    assert_eq!(&parcel_hashes(&mount), &committed.0.last().unwrap().1);
    let hashes = write_disk(&mount, "after", 0, MIB);
    let report = env.json(&["checkin", "vm", "-m", "gateway back"]);
    assert_eq!(report["committed"], true, "{report:#}");
    committed.add(report["version"].as_u64().unwrap(), hashes);
    committed.check(&env, "vm");
}

/// A volume server that hangs (SIGSTOP: its connections stay open, nothing
/// answers) is not a dead one: SeaweedFS keeps it in the topology and keeps
/// assigning writes to its volumes, which wait. isr's PUT waits out its
/// request timeout and is sent again (a new assignment, likely to a live
/// pair); the checkin completes, or fails cleanly (exit 6) when every attempt
/// of a chunk hung; once the node runs again, a rerun completes.
#[test]
fn a_volume_server_hanging_mid_checkin_fails_cleanly_until_it_returns() {
    Env::require_fuse();
    let cluster = SeaweedCluster::start();
    let env = Env::cluster(&cluster, "volume-hang");
    env.append_config("\n[upload]\ntrickle = false\n");
    // Each hung attempt costs a request timeout: 2 s here.
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace("request_timeout_secs = 10", "request_timeout_secs = 2"),
    )
    .unwrap();
    let mut committed = Committed::default();
    committed.add(1, import(&env, "vm"));
    let mount = resume(&env, "vm");
    let hashes = write_disk(&mount, "hang", MIB as u64, 4 * MIB);

    cluster.link.freeze_after(Direction::Up, MIB as u64);
    let what = "checkin with volume server 2 frozen (SIGSTOP) mid-upload";
    let child = spawn(&env, &["checkin", "vm", "-m", what]);
    assert!(cluster.link.wait_frozen(Duration::from_secs(120)));
    cluster.stop_volume(2);
    cluster.link.thaw();
    let started = Instant::now();
    let first = checkin_outcome(&finish(child, what, &env, &cluster), what);
    println!(
        "{what}: {} after {:.1} s; the master still lists {:?}",
        if first.is_some() {
            "committed"
        } else {
            "failed"
        },
        started.elapsed().as_secs_f64(),
        cluster.registered_volume_servers()
    );
    let retries = store_retries(&env);
    println!("{what}: {retries} requests retried by isrfsd");
    let version = match first {
        Some(version) => version,
        None => {
            let again = env.run(&["--json", "checkin", "vm"]);
            let what = format!("{what} (rerun while it hangs)");
            match checkin_outcome(&again, &what) {
                Some(version) => version,
                None => {
                    cluster.continue_volume(2);
                    let what = format!("{what} (rerun after SIGCONT)");
                    let last = env.run(&["--json", "checkin", "vm"]);
                    checkin_outcome(&last, &what)
                        .unwrap_or_else(|| panic!("{what}: failed once the node was back"))
                }
            }
        }
    };
    cluster.continue_volume(2);
    committed.add(version, hashes);
    committed.check(&env, "vm");
    let mount = resume(&env, "vm");
    assert_eq!(&parcel_hashes(&mount), &committed.0.last().unwrap().1);
    let hashes = write_disk(&mount, "after", 0, MIB);
    let report = env.json(&["checkin", "vm", "-m", "node back"]);
    assert_eq!(report["committed"], true, "{report:#}");
    committed.add(report["version"].as_u64().unwrap(), hashes);
    committed.check(&env, "vm");
}
