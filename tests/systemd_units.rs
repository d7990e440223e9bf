//! The systemd units (systemd/*.service) under a real systemd: a Debian
//! minbase booted with `systemd-nspawn -b`, the built binaries and the units
//! installed in it. The base tree is made once with debootstrap and cached in
//! /var/cache/isr-tests/nspawn-base; each test boots an overlay of it.
//!
//! Needs root, `systemd-nspawn` and `debootstrap` (apt-get install
//! systemd-container debootstrap; .ci/install-deps.sh), and the network the
//! first time (the Debian mirror from apt's sources).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::{Env, binary};

/// nspawn with --keep-unit makes its `payload`/`supervisor` cgroups inside
/// ours: one container at a time.
static ONE_CONTAINER: Mutex<()> = Mutex::new(());

const CACHE: &str = "/var/cache/isr-tests";

/// The cached Debian base tree, made on first use (a lock file keeps test
/// processes running at once from making it twice).
fn base_tree() -> PathBuf {
    for (program, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("debootstrap", "debootstrap"),
        ("nsenter", "util-linux"),
    ] {
        support::find_program(
            program,
            &format!("apt-get install {package} (see .ci/install-deps.sh)"),
        );
    }
    std::fs::create_dir_all(CACHE).unwrap();
    let base = Path::new(CACHE).join("nspawn-base");
    let lock = std::fs::File::create(Path::new(CACHE).join("nspawn-base.lock")).unwrap();
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    if base.join("usr/lib/systemd/systemd").exists() {
        return base;
    }
    let partial = Path::new(CACHE).join("nspawn-base.partial");
    let _ = std::fs::remove_dir_all(&partial);
    let status = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--include=systemd,systemd-sysv,dbus,fuse3",
            "bookworm",
        ])
        .arg(&partial)
        .arg(debian_mirror())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "debootstrap of the container base failed ({status}); it needs the network"
    );
    std::fs::rename(&partial, &base).unwrap();
    base
}

/// The Debian mirror apt uses on this machine.
fn debian_mirror() -> String {
    let mut text = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries.flatten() {
            text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    text.split_whitespace()
        .find(|word| word.starts_with("http") && word.trim_end_matches('/').ends_with("/debian"))
        .unwrap_or("http://deb.debian.org/debian")
        .to_owned()
}

/// A booted container: an overlay of the base tree with isr installed.
struct Container {
    dir: tempfile::TempDir,
    root: PathBuf,
    nspawn: Child,
    /// The container's systemd (pid 1 inside).
    leader: i32,
    _one: std::sync::MutexGuard<'static, ()>,
}

impl Container {
    /// Boots a container with the binaries, the units, the store of `env`
    /// at /srv/store and `files` (path inside, contents) installed.
    fn boot(env: &Env, files: &[(&str, &[u8])]) -> Container {
        let one = ONE_CONTAINER.lock().unwrap_or_else(|e| e.into_inner());
        let base = base_tree();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        for sub in ["upper", "work", "root"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            base.display(),
            dir.path().join("upper").display(),
            dir.path().join("work").display()
        );
        nix::mount::mount(
            Some("overlay"),
            &root,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .unwrap();
        let install = |inside: &str, data: &[u8], mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            let path = root.join(inside.trim_start_matches('/'));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, data).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        for program in ["isrfsd", "isrctl"] {
            install(
                &format!("/usr/local/bin/{program}"),
                &std::fs::read(binary(program)).unwrap(),
                0o755,
            );
        }
        let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
        for unit in ["isrfsd.service", "isr-kiosk@.service"] {
            install(
                &format!("/etc/systemd/system/{unit}"),
                &std::fs::read(units.join(unit)).unwrap(),
                0o644,
            );
        }
        for (inside, data) in files {
            install(inside, data, 0o600);
        }
        std::fs::create_dir_all(root.join("var/log/journal")).unwrap();
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&env.store)
            .arg(root.join("srv/store"))
            .status()
            .unwrap();
        assert!(copied.success());
        let log = std::fs::File::create(dir.path().join("nspawn.log")).unwrap();
        let nspawn = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(&root)
            .args([
                "-b",
                "--register=no",
                "--keep-unit",
                "--console=passive",
                "--bind=/dev/fuse",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut container = Container {
            dir,
            root,
            leader: 0,
            nspawn,
            _one: one,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while container.leader == 0 {
            assert!(
                Instant::now() < deadline,
                "the container did not start: {}",
                container.nspawn_log()
            );
            // nspawn's first child is a helper; the container's systemd
            // follows it.
            container.leader = child_of(container.nspawn.id() as i32)
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|comm| comm.trim() == "systemd")
                })
                .unwrap_or(0);
            std::thread::sleep(Duration::from_millis(50));
        }
        // Until its manager answers on its private socket.
        let mut state = String::new();
        while state.is_empty() && Instant::now() < deadline {
            state = container.output(&["systemctl", "is-system-running", "--wait"]);
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            state.contains("running") || state.contains("degraded"),
            "the container's systemd did not boot ({state}): {}",
            container.nspawn_log()
        );
        container
    }

    fn nspawn_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nspawn.log")).unwrap_or_default()
    }

    /// Runs a command inside (as its systemd's namespaces see things).
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// stdout of a command inside, whatever its exit status.
    fn output(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.run(args).stdout)
            .trim()
            .to_owned()
    }

    /// A command inside that must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "{args:?} failed in the container ({}): {}\n{}\njournal:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.journal()
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// A property of a unit (`systemctl show -p NAME --value`).
    fn property(&self, unit: &str, name: &str) -> String {
        self.output(&["systemctl", "show", "-p", name, "--value", unit])
    }

    /// The isr units' journal.
    fn journal(&self) -> String {
        let output = Command::new("journalctl")
            .arg("-D")
            .arg(self.root.join("var/log/journal"))
            .args([
                "--no-pager",
                "-o",
                "short-monotonic",
                "-u",
                "isrfsd.service",
                "-u",
                "isr-kiosk@*",
            ])
            .output();
        output
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the container has powered off.
    fn wait_for_poweroff(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if self.nspawn.try_wait().unwrap().is_some() {
                return;
            }
            assert!(Instant::now() < deadline, "the container did not power off");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.nspawn.try_wait().ok().flatten().is_none() {
            // SIGTERM: nspawn asks the container's systemd to power off.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.nspawn.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.nspawn.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        let _ = nix::mount::umount2(&self.root, nix::mount::MntFlags::MNT_DETACH);
        remove_nspawn_cgroups();
    }
}

/// A child process of `parent` (the container's systemd is nspawn's child).
fn child_of(parent: i32) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...: comm may hold spaces, so after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        if rest.split_whitespace().nth(1) == Some(&parent.to_string()) {
            return Some(pid);
        }
    }
    None
}

/// nspawn (--keep-unit) leaves `payload` and `supervisor` cgroups in ours.
fn remove_nspawn_cgroups() {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for hierarchy in hierarchies.flatten() {
        for line in own.lines() {
            let Some(path) = line.splitn(3, ':').nth(2) else {
                continue;
            };
            for leftover in ["payload", "supervisor"] {
                let dir = hierarchy
                    .path()
                    .join(path.trim_start_matches('/'))
                    .join(leftover);
                // Children first (the container's own cgroups), deepest
                // first; whatever a failed boot left in them is killed.
                let mut dirs: Vec<PathBuf> = walk_dirs(&dir);
                for d in &dirs {
                    let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                    for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                if !dirs.is_empty() {
                    std::thread::sleep(Duration::from_millis(200));
                }
                dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
                for d in dirs {
                    let _ = std::fs::remove_dir(d);
                }
            }
        }
    }
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if dir.is_dir() {
        out.push(dir.to_owned());
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(walk_dirs(&entry.path()));
            }
        }
    }
    out
}

/// A parcel `vm` in a fresh local store, unlocked by the passphrase and by
/// the key file returned.
fn parcel_with_key_file(env: &Env) -> Vec<u8> {
    let key = env.path("kiosk.key");
    env.ok(&["new-key-file", key.to_str().unwrap()]);
    let source = env.path("src-vm");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("disk.img"), vec![7u8; 65536]).unwrap();
    env.ok(&[
        "import",
        "--key-file",
        key.to_str().unwrap(),
        "vm",
        source.to_str().unwrap(),
    ]);
    std::fs::read(&key).unwrap()
}

/// The kiosk's VM is `--vmm none` here (no guest in the container): the
/// kiosk resumes the parcel and stays active; its ExecStop (suspend) is the
/// unit's own.
const KIOSK_WITHOUT_VM: &[u8] = b"[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=\nExecStart=/usr/local/bin/isrctl resume --vmm none %i\n";

/// The host's view of the container's store.
fn store_seen_from_host(env: &Env, container: &Container) -> Env {
    let mut host = env.another_machine();
    host.store = container.root.join("srv/store").display().to_string();
    host
}

/// Writes into the mount of the kiosk's parcel, inside the container.
fn change_the_disk(container: &Container, byte: &str) {
    container.ok(&[
        "sh",
        "-c",
        &format!(
            "printf {byte} | dd of=/run/isr/mnt/vm/disk.img bs=1 seek=100 conv=notrunc status=none"
        ),
    ]);
}

#[test]
fn stopping_isrfsd_or_powering_off_checks_the_kiosk_parcel_in() {
    Env::require_fuse();
    let env = Env::local();
    let key = parcel_with_key_file(&env);
    let mut container = Container::boot(
        &env,
        &[
            ("/etc/isr/kiosk.key", &key),
            ("/etc/isr/kiosk-vm.env", b"ISR_STORE=/srv/store\n"),
            (
                "/etc/systemd/system/isr-kiosk@vm.service.d/no-vm.conf",
                KIOSK_WITHOUT_VM,
            ),
        ],
    );

    // Type=notify: active only after isrfsd said READY=1.
    container.ok(&["systemctl", "start", "isrfsd.service"]);
    assert_eq!(
        container.property("isrfsd.service", "ActiveState"),
        "active"
    );
    assert_eq!(container.property("isrfsd.service", "NotifyAccess"), "main");
    // Only isrfsd gets SIGTERM at stop: QEMU, its child, must live until
    // isrfsd has saved it (control-group sent SIGTERM to both: defect 1).
    assert_eq!(container.property("isrfsd.service", "KillMode"), "mixed");

    container.ok(&["systemctl", "start", "isr-kiosk@vm.service"]);
    assert_eq!(
        container.property("isr-kiosk@vm.service", "ActiveState"),
        "active"
    );
    let host = store_seen_from_host(&env, &container);
    assert!(
        !host.json(&["info", "vm"])["lock"].is_null(),
        "the kiosk holds the lock"
    );
    change_the_disk(&container, "A");

    // Stopping the daemon stops the kiosk first: it suspends (checks in).
    container.ok(&["systemctl", "stop", "isrfsd.service"]);
    assert_eq!(
        container.property("isr-kiosk@vm.service", "ActiveState"),
        "inactive"
    );
    assert_eq!(
        host.versions("vm"),
        vec![1, 2],
        "journal:\n{}",
        container.journal()
    );
    assert!(
        host.json(&["info", "vm"])["lock"].is_null(),
        "lock released"
    );

    // Starting the kiosk starts the daemon (Requires=); power off checks in.
    container.ok(&["systemctl", "start", "isr-kiosk@vm.service"]);
    assert_eq!(
        container.property("isrfsd.service", "ActiveState"),
        "active"
    );
    change_the_disk(&container, "B");
    container.ok(&["systemctl", "poweroff"]);
    container.wait_for_poweroff();
    assert_eq!(
        host.versions("vm"),
        vec![1, 2, 3],
        "journal:\n{}",
        container.journal()
    );
    assert!(
        host.json(&["info", "vm"])["lock"].is_null(),
        "lock released"
    );
    let journal = container.journal();
    assert!(!journal.contains("could not save"), "{journal}");
    // Logged through the journal's protocol: the message alone, its fields
    // and time are the journal's (no second timestamp in the text).
    let messages = Command::new("journalctl")
        .arg("-D")
        .arg(container.root.join("var/log/journal"))
        .args(["--no-pager", "-o", "cat", "-u", "isrfsd.service"])
        .output()
        .unwrap();
    let messages = String::from_utf8_lossy(&messages.stdout);
    assert!(
        messages.lines().any(|line| line == "isrfsd ready"),
        "{messages}"
    );
}

#[test]
fn a_wrong_key_fails_the_kiosk_without_restarts() {
    Env::require_fuse();
    let env = Env::local();
    parcel_with_key_file(&env);
    let wrong = [9u8; 32];
    let container = Container::boot(
        &env,
        &[
            ("/etc/isr/kiosk.key", &wrong),
            ("/etc/isr/kiosk-vm.env", b"ISR_STORE=/srv/store\n"),
            (
                "/etc/systemd/system/isr-kiosk@vm.service.d/no-vm.conf",
                KIOSK_WITHOUT_VM,
            ),
        ],
    );
    let started = container.run(&["systemctl", "start", "isr-kiosk@vm.service"]);
    assert!(!started.status.success());
    // A unit that will restart waits RestartSec in "activating"
    // (auto-restart); one that will not is "failed" at once.
    let unit = "isr-kiosk@vm.service";
    assert_eq!(
        container.property(unit, "ActiveState"),
        "failed",
        "{}",
        container.journal()
    );
    assert_eq!(container.property(unit, "NRestarts"), "0");
    assert_eq!(container.property(unit, "ExecMainStatus"), "3");
    let host = store_seen_from_host(&env, &container);
    assert!(
        host.json(&["info", "vm"])["lock"].is_null(),
        "no lock taken"
    );
}
