//! The test guest (`tests/fixtures/make-guest.sh`) and QEMU running it.
//!
//! The guest prints `ISR-BOOT boot=ID` once per boot from disk, then every second
//! `ISR-COUNTER n=N boot=ID` on its serial console (after appending the same line to
//! `counter.log` on its disk and syncing).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::find_program;

/// How to get QEMU, for failures that need it.
pub const QEMU_HINT: &str = "install QEMU >= 9 (Debian bookworm: add `deb http://deb.debian.org/debian \
     bookworm-backports main` to the apt sources, then `apt-get install -t bookworm-backports \
     qemu-system-x86 qemu-utils`; .ci/run does this)";

/// The guest builder script.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make-guest.sh")
}

/// The files of a built guest.
#[derive(Debug, Clone)]
pub struct GuestFiles {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
    /// The builder's MANIFEST.txt (inputs and sha256 of the files).
    pub manifest: String,
}

/// Runs the builder into `dir` (from the cache when it is there), with extra
/// environment variables; panics with the script's output when it fails.
pub fn build_with_env(dir: &Path, env: &[(&str, &str)]) -> GuestFiles {
    let output = Command::new("bash")
        .arg(script())
        .arg(dir)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run bash tests/fixtures/make-guest.sh");
    assert!(
        output.status.success(),
        "tests/fixtures/make-guest.sh failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    GuestFiles {
        dir: dir.to_owned(),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        disk: dir.join("disk.img"),
        manifest: std::fs::read_to_string(dir.join("MANIFEST.txt")).expect("MANIFEST.txt"),
    }
}

/// Runs the builder into `dir`.
pub fn build(dir: &Path) -> GuestFiles {
    build_with_env(dir, &[])
}

/// `qemu-system-x86_64`, or a panic saying how to install it.
pub fn qemu_binary() -> PathBuf {
    find_program("qemu-system-x86_64", QEMU_HINT)
}

/// One line the guest printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLine {
    /// `ISR-BOOT boot=ID`.
    Boot { boot: String },
    /// `ISR-COUNTER n=N boot=ID`.
    Counter { n: u64, boot: String },
}

/// The guest's complete lines in `text` (serial output, which may carry terminal
/// escapes, and whose last line may still be being written: it is left out).
pub fn parse_lines(text: &str) -> Vec<GuestLine> {
    let complete = &text[..text.rfind('\n').map_or(0, |at| at + 1)];
    let mut lines = Vec::new();
    for line in complete.lines() {
        if let Some(at) = line.find("ISR-BOOT boot=") {
            let boot = line[at + "ISR-BOOT boot=".len()..].trim().to_owned();
            lines.push(GuestLine::Boot { boot });
        } else if let Some(at) = line.find("ISR-COUNTER n=") {
            let rest = &line[at + "ISR-COUNTER n=".len()..];
            let mut parts = rest.split_whitespace();
            let n = parts.next().and_then(|n| n.parse().ok());
            let boot = parts.next().and_then(|b| b.strip_prefix("boot="));
            if let (Some(n), Some(boot)) = (n, boot) {
                lines.push(GuestLine::Counter {
                    n,
                    boot: boot.to_owned(),
                });
            }
        }
    }
    lines
}

/// A QEMU process running the guest, serial console to a file; killed on drop.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    pub serial: PathBuf,
    pub started: Instant,
}

impl Qemu {
    /// Boots `guest` with its disk as a virtio raw drive (TCG, 256 MiB), the serial
    /// console going to `serial` (created or truncated).
    pub fn boot(guest: &GuestFiles, serial: &Path) -> Qemu {
        let qemu = qemu_binary();
        std::fs::write(serial, b"").unwrap();
        let stderr = std::fs::File::create(serial.with_extension("stderr")).unwrap();
        let child = Command::new(qemu)
            .args(["-accel", "tcg", "-m", "256", "-nographic", "-no-reboot"])
            .args(["-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(&guest.kernel)
            .arg("-initrd")
            .arg(&guest.initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw",
                guest.disk.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start qemu-system-x86_64");
        Qemu {
            child,
            serial: serial.to_owned(),
            started: Instant::now(),
        }
    }

    /// The guest's lines so far.
    pub fn lines(&self) -> Vec<GuestLine> {
        parse_lines(&String::from_utf8_lossy(
            &std::fs::read(&self.serial).unwrap_or_default(),
        ))
    }

    /// Polls the serial console until `done` holds for the lines so far, and
    /// returns them (see [`poll_serial`]).
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        done: impl Fn(&[GuestLine]) -> bool,
    ) -> Vec<GuestLine> {
        let serial = self.serial.clone();
        let child = &mut self.child;
        let exited = || child.try_wait().ok().flatten().map(|s| s.to_string());
        let output = {
            let serial = serial.clone();
            move || {
                format!(
                    "serial console:\n{}\nqemu stderr:\n{}",
                    String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()),
                    std::fs::read_to_string(serial.with_extension("stderr")).unwrap_or_default()
                )
            }
        };
        poll_serial(&serial, what, limit, done, exited, output)
    }

    /// Kills QEMU (SIGKILL: like pulling the plug) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The boot id and counter values of the first boot in `lines` that printed at
/// least `count` counter lines, if any.
pub fn counting(lines: &[GuestLine], count: usize) -> Option<(String, Vec<u64>)> {
    let mut current: Option<(String, Vec<u64>)> = None;
    for line in lines {
        match line {
            GuestLine::Boot { boot } => current = Some((boot.clone(), Vec::new())),
            GuestLine::Counter { n, boot } => match current.as_mut() {
                Some((id, ns)) if id == boot => ns.push(*n),
                _ => {}
            },
        }
        if current.as_ref().is_some_and(|(_, ns)| ns.len() >= count) {
            return current;
        }
    }
    None
}

/// Polls the guest's serial console file until `done` holds for the lines so
/// far, and returns them. Panics with `output()` if `exited()` reports that
/// QEMU exited, or when `limit` (a liveness guard, not a timing assertion)
/// passes first.
pub fn poll_serial(
    serial: &Path,
    what: &str,
    limit: Duration,
    done: impl Fn(&[GuestLine]) -> bool,
    mut exited: impl FnMut() -> Option<String>,
    output: impl Fn() -> String,
) -> Vec<GuestLine> {
    let deadline = Instant::now() + limit;
    loop {
        let lines = parse_lines(&String::from_utf8_lossy(
            &std::fs::read(serial).unwrap_or_default(),
        ));
        if done(&lines) {
            return lines;
        }
        if let Some(status) = exited() {
            panic!(
                "QEMU exited ({status}) while waiting for {what}; {}",
                output()
            );
        }
        if Instant::now() > deadline {
            panic!(
                "no {what} within {} s (liveness guard); {}",
                limit.as_secs(),
                output()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
