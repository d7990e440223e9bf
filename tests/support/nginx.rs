//! nginx from Debian as a test's own process: its own config, prefix, temp
//! and cache directories and loopback ports (never the system service);
//! stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{find_program, wait_for_port};

/// The access-log format [`Nginx`] servers can log in (`access_log FILE
/// counted;`): method, URI, status, cache status (`-` when not a cache),
/// bytes sent, and the `X-Isr-Via` request header (`-` when absent), one
/// request a line, separated by single spaces.
pub const LOG_FORMAT: &str = "log_format counted '$request_method $uri $status \
     $upstream_cache_status $body_bytes_sent $http_x_isr_via';";

/// One line of a `counted` access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub method: String,
    pub uri: String,
    pub status: u16,
    /// `HIT`, `MISS`, … or `-`.
    pub cache: String,
    pub bytes: u64,
    /// The `X-Isr-Via` header, `-` when absent.
    pub via: String,
}

/// A running nginx; stopped (SIGTERM to the master, then waited for) on drop.
pub struct Nginx {
    child: Child,
    pub dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with `servers` (text inside its `http {}` block; may use
    /// [`LOG_FORMAT`]'s `counted` and `{dir}` for its own directory) and
    /// waits until it listens on every port of `ports`.
    pub fn start(servers: &str, ports: &[u16]) -> Nginx {
        let sbin = Path::new("/usr/sbin/nginx");
        let nginx = if sbin.is_file() {
            sbin.to_owned()
        } else {
            find_program(
                "nginx",
                "install it with `apt-get install nginx` (.ci/install-deps.sh does; the tests run their own nginx, not the system service)",
            )
        };
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().display().to_string();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let config = format!(
            "daemon off;\nuser root;\nworker_processes 1;\npid {root}/nginx.pid;\n\
             error_log {root}/error.log info;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n  access_log off;\n  {LOG_FORMAT}\n\
             client_body_temp_path {root}/tmp/body;\n  proxy_temp_path {root}/tmp/proxy;\n\
             fastcgi_temp_path {root}/tmp/fastcgi;\n  uwsgi_temp_path {root}/tmp/uwsgi;\n\
             scgi_temp_path {root}/tmp/scgi;\n{}\n}}\n",
            servers.replace("{dir}", &root)
        );
        let config_path = dir.path().join("nginx.conf");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("stderr.log");
        let output = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&config_path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .expect("start nginx");
        for &port in ports {
            wait_for_port(port, &mut child, "nginx", &log);
        }
        Nginx { child, dir }
    }

    /// A file in nginx's own directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The lines of the `counted` access log `name` (relative to its directory).
    pub fn log(&self, name: &str) -> Vec<LogLine> {
        parse_log(&self.path(name))
    }
}

/// Parses a `counted` access log.
pub fn parse_log(path: &Path) -> Vec<LogLine> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(
                fields.len(),
                6,
                "an access log line of another format: {line:?}"
            );
            LogLine {
                method: fields[0].to_owned(),
                uri: fields[1].to_owned(),
                status: fields[2].parse().unwrap(),
                cache: fields[3].to_owned(),
                bytes: fields[4].parse().unwrap(),
                via: fields[5].to_owned(),
            }
        })
        .collect()
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}
