//! The test guest (`tests/fixtures/make-guest.sh`) and QEMU running it.
//!
//! The guest prints `ISR-BOOT boot=ID` once per boot from disk, then every second
//! `ISR-COUNTER n=N boot=ID` on its serial console (after appending the same line to
//! `counter.log` on its disk and syncing).
//!
//! Given a second UART ([`control_args`]), it also takes commands from the host
//! ([`send_control`]: `fill MB`, `trim`) and answers each with an `ISR-CTL …` console
//! line ([`GuestLine::Control`]); see the script's header for the formats.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
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
    /// `ISR-CTL TEXT`: the guest's answer to a control command, e.g. `fill done
    /// bytes=8388608`, `trim done trimmed=56842240` or `unknown LINE`.
    Control { text: String },
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
        } else if let Some(at) = line.find("ISR-CTL ") {
            let text = line[at + "ISR-CTL ".len()..].trim().to_owned();
            lines.push(GuestLine::Control { text });
        }
    }
    lines
}

/// The QEMU arguments that give the guest its control channel: a second UART
/// (ttyS1, pinned by `index=1` whatever `-serial` options there are) whose other
/// end is the unix socket `socket`, which QEMU creates (server, not waiting for a
/// client). For [`Qemu::boot_with`]'s `extra_args` or a vm.toml's `extra_args`.
/// A unix socket path is limited to 107 bytes.
pub fn control_args(socket: &Path) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!(
            "socket,id=isrctl,path={},server=on,wait=off",
            socket.display().to_string().replace(',', ",,")
        ),
        "-device".into(),
        "isa-serial,chardev=isrctl,index=1".into(),
    ]
}

/// Liveness guard for [`send_control`]'s connecting and its echo.
const CONTROL_LIMIT: Duration = Duration::from_secs(60);

/// Sends `command` (one line, without its newline) to the guest over the control
/// socket `socket` (see [`control_args`]), connecting as soon as QEMU has created
/// it. Returns once the guest's serial line has echoed the line back, so it has
/// arrived (closing earlier could lose it); the guest's answer is an
/// `ISR-CTL …` line on its console ([`GuestLine::Control`]). Panics when the socket
/// does not take the connection or the echo does not come within a liveness limit.
/// Send only once the guest has printed a counter line: its control loop has
/// ttyS1 open by then, and what arrives before that may be lost.
pub fn send_control(socket: &Path, command: &str) {
    assert!(
        !command.contains(['\n', '\r']),
        "a control command is one line: {command:?}"
    );
    let deadline = Instant::now() + CONTROL_LIMIT;
    let mut stream = loop {
        match UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(e)
                if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!(
                "cannot connect to the guest control socket {} within {} s (liveness guard; \
                 is QEMU running with guest::control_args?): {e}",
                socket.display(),
                CONTROL_LIMIT.as_secs()
            ),
        }
    };
    stream
        .write_all(format!("{command}\n").as_bytes())
        .unwrap_or_else(|e| panic!("write {command:?} to {}: {e}", socket.display()));
    // The guest's tty echoes the line (newline as \r\n) as it receives it.
    let mut echo = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let text = String::from_utf8_lossy(&echo);
        if text
            .find(command)
            .is_some_and(|at| text[at + command.len()..].contains('\n'))
        {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the guest did not echo control command {command:?} on {} within {} s \
             (liveness guard; is its control loop running?); echoed so far: {text:?}",
            socket.display(),
            CONTROL_LIMIT.as_secs()
        );
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => panic!(
                "the guest control socket {} closed before echoing {command:?}; \
                 echoed so far: {text:?}",
                socket.display()
            ),
            Ok(n) => echo.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "read the echo of {command:?} from {}: {e}",
                socket.display()
            ),
        }
    }
}

/// What [`Qemu::boot_with`] changes from [`Qemu::boot`]'s defaults.
#[derive(Debug, Clone, Default)]
pub struct BootOptions {
    /// The raw disk image to boot from, instead of the guest's `disk.img`.
    pub disk: Option<PathBuf>,
    /// More `-drive` suboptions, e.g. `discard=unmap`.
    pub drive_options: Vec<String>,
    /// More QEMU arguments, after all the others (e.g. [`control_args`]).
    pub extra_args: Vec<String>,
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
        Qemu::boot_with(guest, serial, &BootOptions::default())
    }

    /// Like [`Qemu::boot`], with another disk image, more drive options or more
    /// arguments.
    pub fn boot_with(guest: &GuestFiles, serial: &Path, options: &BootOptions) -> Qemu {
        let qemu = qemu_binary();
        let disk = options.disk.as_ref().unwrap_or(&guest.disk);
        let mut drive = format!("file={},if=virtio,format=raw", disk.display());
        for option in &options.drive_options {
            drive.push(',');
            drive.push_str(option);
        }
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
            .arg(drive)
            .args(&options.extra_args)
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
            GuestLine::Control { .. } => {}
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
