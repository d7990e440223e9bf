//! `isr::vmm::qemu` with real QEMU (TCG) and the test guest, from plain files (no
//! isr mount): boot, suspend to a memory image, resume in a new QEMU with the
//! guest's counter continuing in the same boot; suspend twice and compare the
//! images chunk by chunk; failed suspends leave no image behind.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use isr::vmm::config::VmConfig;
use isr::vmm::qemu::{QemuRuntime, QemuVm, partial_name};
use support::guest::{self, GuestLine};

/// Liveness guard for a boot under TCG (about 4–8 s here); not a timing assertion.
const BOOT_LIMIT: Duration = Duration::from_secs(300);
/// Liveness guard for the counter to go on after a resume.
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// isr's chunk size.
const CHUNK: usize = 128 * 1024;

const VM_TOML: &str = include_str!("fixtures/guest-vm.toml");

/// The test guest built into `dir/parcel` with a `vm.toml` describing it.
fn parcel(dir: &Path) -> (PathBuf, VmConfig) {
    let files = guest::build(&dir.join("parcel"));
    std::fs::write(files.dir.join("vm.toml"), VM_TOML).unwrap();
    let config = VmConfig::load(&files.dir.join("vm.toml")).unwrap();
    (files.dir, config)
}

fn runtime(dir: &Path, name: &str) -> QemuRuntime {
    QemuRuntime::new(guest::qemu_binary(), dir.join(name))
}

fn serial_lines(runtime: &QemuRuntime) -> Vec<GuestLine> {
    guest::parse_lines(&String::from_utf8_lossy(
        &std::fs::read(runtime.serial_log()).unwrap_or_default(),
    ))
}

fn output(runtime: &QemuRuntime) -> String {
    format!(
        "serial console:\n{}\nqemu log:\n{}",
        String::from_utf8_lossy(&std::fs::read(runtime.serial_log()).unwrap_or_default()),
        std::fs::read_to_string(runtime.qemu_log()).unwrap_or_default()
    )
}

/// Polls the VM's serial console until `done` holds (see [`guest::poll_serial`]).
fn wait_for(
    vm: &mut QemuVm,
    what: &str,
    limit: Duration,
    done: impl Fn(&[GuestLine]) -> bool,
) -> Vec<GuestLine> {
    let runtime = vm.runtime().clone();
    let exited = || (!vm.is_running()).then(|| "not running".to_owned());
    guest::poll_serial(&runtime.serial_log(), what, limit, done, exited, || {
        output(&runtime)
    })
}

fn counters(lines: &[GuestLine]) -> Vec<(u64, String)> {
    lines
        .iter()
        .filter_map(|l| match l {
            GuestLine::Counter { n, boot } => Some((*n, boot.clone())),
            GuestLine::Boot { .. } | GuestLine::Control { .. } => None,
        })
        .collect()
}

fn sizes(path: &Path) -> String {
    let meta = std::fs::metadata(path).unwrap();
    format!(
        "{} bytes apparent, {} bytes allocated",
        meta.len(),
        meta.blocks() * 512
    )
}

/// (chunks that differ, chunks in the larger image) at isr's chunk size.
fn differing_chunks(a: &Path, b: &Path) -> (usize, usize) {
    let a = std::fs::read(a).unwrap();
    let b = std::fs::read(b).unwrap();
    let total = a.len().max(b.len()).div_ceil(CHUNK);
    let differ = (0..total)
        .filter(|i| {
            let range = |data: &[u8]| {
                let start = (i * CHUNK).min(data.len());
                let end = ((i + 1) * CHUNK).min(data.len());
                data[start..end].to_vec()
            };
            range(&a) != range(&b)
        })
        .count();
    (differ, total)
}

/// Resumes from `image` in a fresh QEMU and checks the counter continues after
/// `last` in boot `boot`; returns the VM and the lines seen.
fn resume_and_check(
    config: &VmConfig,
    parcel: &Path,
    runtime: &QemuRuntime,
    image: &Path,
    last: u64,
    boot: &str,
) -> (QemuVm, Vec<GuestLine>) {
    let started = Instant::now();
    let mut vm = QemuVm::resume_from(config, parcel, runtime, image)
        .unwrap_or_else(|e| panic!("resume from {}: {e}; {}", image.display(), output(runtime)));
    eprintln!(
        "resume from {}: running after {:.2} s (QEMU start + load + cont)",
        image.display(),
        started.elapsed().as_secs_f64()
    );
    vm.qmp()
        .wait_event("RESUME", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("QEMU says the VM resumed: {e}"));
    let lines = wait_for(&mut vm, "two counter lines after resume", RUN_LIMIT, |l| {
        counters(l).len() >= 2
    });
    assert!(
        !lines.iter().any(|l| matches!(l, GuestLine::Boot { .. })),
        "a resume is not a boot: {lines:?}"
    );
    let seen = counters(&lines);
    // The line being printed when the VM stopped may be cut in two between the
    // consoles (its end, without the counter, lands in the new one).
    assert!(
        seen[0].0 == last + 1 || seen[0].0 == last + 2,
        "the counter continues after n={last}: {seen:?}"
    );
    assert!(
        seen.iter().all(|(_, b)| b == boot),
        "same boot id {boot}: {seen:?}"
    );
    assert!(seen[1].0 > seen[0].0, "{seen:?}");
    (vm, lines)
}

#[test]
fn suspend_resume_continues_the_same_boot_and_suspends_again() {
    let dir = tempfile::tempdir().unwrap();
    let (parcel, config) = parcel(dir.path());
    let first = runtime(dir.path(), "run-1");
    let image1 = parcel.join("memory.img");
    let image2 = parcel.join("memory-2.img");

    // Cold boot, count.
    let mut vm = QemuVm::boot(&config, &parcel, &first)
        .unwrap_or_else(|e| panic!("boot: {e}; {}", output(&first)));
    eprintln!("qemu {}", vm.version());
    let lines = wait_for(&mut vm, "two counter lines", BOOT_LIMIT, |l| {
        guest::counting(l, 2).is_some()
    });
    let (boot, _) = guest::counting(&lines, 2).unwrap();

    // Suspend.
    let started = Instant::now();
    vm.suspend_to(&image1)
        .unwrap_or_else(|e| panic!("suspend: {e}; {}", output(&first)));
    let suspend_time = started.elapsed();
    assert!(!vm.is_running(), "QEMU exits after a suspend");
    assert!(image1.is_file());
    assert!(!partial_name(&image1).exists());
    let last = counters(&serial_lines(&first)).last().unwrap().0;
    eprintln!(
        "suspend at n={last}: {:.2} s; memory.img: {}",
        suspend_time.as_secs_f64(),
        sizes(&image1)
    );

    // Resume in a new QEMU: same boot, counter continues.
    let second = runtime(dir.path(), "run-2");
    let (mut vm, _) = resume_and_check(&config, &parcel, &second, &image1, last, &boot);
    wait_for(
        &mut vm,
        "three counter lines after resume",
        RUN_LIMIT,
        |l| counters(l).len() >= 3,
    );

    // Suspend the same boot again, into a second file.
    let started = Instant::now();
    vm.suspend_to(&image2)
        .unwrap_or_else(|e| panic!("second suspend: {e}; {}", output(&second)));
    let suspend_time = started.elapsed();
    assert!(!vm.is_running());
    let last = counters(&serial_lines(&second)).last().unwrap().0;
    let (differ, total) = differing_chunks(&image1, &image2);
    eprintln!(
        "second suspend at n={last}: {:.2} s; memory-2.img: {}",
        suspend_time.as_secs_f64(),
        sizes(&image2)
    );
    eprintln!(
        "memory.img vs memory-2.img: {differ} of {total} chunks of 128 KiB differ ({:.1} MiB to upload of {:.1} MiB)",
        (differ * CHUNK) as f64 / 1048576.0,
        (total * CHUNK) as f64 / 1048576.0
    );
    assert!(differ > 0, "the guest ran between the suspends");

    // And the second image resumes too.
    let third = runtime(dir.path(), "run-3");
    let (mut vm, _) = resume_and_check(&config, &parcel, &third, &image2, last, &boot);
    vm.kill();
}

#[test]
fn a_failed_suspend_leaves_no_memory_image() {
    let dir = tempfile::tempdir().unwrap();
    let (parcel, config) = parcel(dir.path());

    // The destination's directory does not exist: QEMU cannot write the image.
    let run = runtime(dir.path(), "run-nodir");
    let mut vm = QemuVm::boot(&config, &parcel, &run)
        .unwrap_or_else(|e| panic!("boot: {e}; {}", output(&run)));
    let dest = dir.path().join("missing-dir/memory.img");
    let error = vm.suspend_to(&dest).unwrap_err().to_string();
    eprintln!("suspend into a missing directory: {error}");
    assert!(error.contains("memory.img"), "{error}");
    assert!(error.contains("qemu.log"), "points at the log: {error}");
    assert!(error.contains("QEMU says"), "gives QEMU's reason: {error}");
    assert!(error.contains("goes on running"), "{error}");
    assert!(vm.is_running(), "the VM goes on after a failed suspend");
    assert!(!dest.exists() && !partial_name(&dest).exists());
    let before = counters(&serial_lines(vm.runtime())).len();
    wait_for(
        &mut vm,
        "counting after the failed suspend",
        RUN_LIMIT,
        |l| counters(l).len() > before + 1,
    );
    vm.kill();

    // QEMU is killed while it writes the image. The kill may land after the
    // migration completed (the save takes well under a second): try again then.
    let dest = parcel.join("memory.img");
    for attempt in 1..=3 {
        let run = runtime(dir.path(), &format!("run-kill-{attempt}"));
        let mut vm = QemuVm::boot(&config, &parcel, &run)
            .unwrap_or_else(|e| panic!("boot: {e}; {}", output(&run)));
        wait_for(&mut vm, "a counter line", BOOT_LIMIT, |l| {
            !counters(l).is_empty()
        });
        let pid = nix::unistd::Pid::from_raw(vm.pid() as i32);
        let partial = partial_name(&dest);
        let killer = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !partial.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(200));
            }
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok()
        });
        let result = vm.suspend_to(&dest);
        let killed = killer.join().unwrap();
        match result {
            Err(error) => {
                eprintln!("attempt {attempt}: QEMU killed during suspend: {error}");
                assert!(killed);
                assert!(error.to_string().contains("QEMU exited"), "{error}");
                assert!(!vm.is_running());
                assert!(!dest.exists(), "no image under the final name");
                assert!(!partial_name(&dest).exists(), "no partial image left");
                return;
            }
            Ok(()) => {
                eprintln!("attempt {attempt}: the suspend completed before the kill; again");
                std::fs::remove_file(&dest).unwrap();
            }
        }
    }
    panic!("the suspend always completed before QEMU could be killed");
}

#[test]
fn qemu_accepts_every_disk_bus_nic_and_vnc_and_listens_on_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let parcel = dir.path().join("parcel");
    std::fs::create_dir_all(&parcel).unwrap();
    for name in ["system.img", "data.img", "extra.img"] {
        let file = std::fs::File::create(parcel.join(name)).unwrap();
        file.set_len(64 * 1024 * 1024).unwrap();
    }
    let ports = support::free_ports(2);
    let config = VmConfig::parse(&format!(
        r#"
vmm = "qemu"
memory = 64
cpus = 2
[[disk]]
file = "system.img"
interface = "sata"
[[disk]]
file = "data.img"
interface = "ide"
[[disk]]
file = "extra.img"
read_only = true
[[nic]]
mode = "user"
model = "e1000"
forward = [{{ host = {}, guest = 22 }}]
[[nic]]
mode = "user"
forward = [{{ host = {}, guest = 53, protocol = "udp" }}]
[display]
type = "vnc"
"#,
        ports[0], ports[1]
    ))
    .unwrap();
    let run = runtime(dir.path(), "run");
    let mut vm = QemuVm::boot(&config, &parcel, &run)
        .unwrap_or_else(|e| panic!("start: {e}; {}", output(&run)));
    let status = vm.qmp().execute("query-status", None).unwrap();
    assert_eq!(status["status"], "running", "{status}");

    let blocks = vm.qmp().execute("query-block", None).unwrap();
    let devices: Vec<(String, bool)> = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| {
            let inserted = b.get("inserted")?;
            Some((
                inserted["file"].as_str()?.rsplit('/').next()?.to_owned(),
                inserted["ro"].as_bool()?,
            ))
        })
        .collect();
    assert_eq!(
        devices,
        [
            ("system.img".to_owned(), false),
            ("data.img".to_owned(), false),
            ("extra.img".to_owned(), true)
        ]
    );

    let vnc = vm.qmp().execute("query-vnc", None).unwrap();
    eprintln!("vnc: {vnc}");
    assert_eq!(vnc["enabled"], true, "{vnc}");
    assert_eq!(vnc["host"], "127.0.0.1", "{vnc}");
    let vnc_port: u16 = vnc["service"].as_str().unwrap().parse().unwrap();
    assert!(vnc_port >= 5900, "{vnc}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", vnc_port)).is_ok());

    // The forwarded TCP port listens on loopback (user-mode networking accepts
    // the connection even with nothing behind it in the guest).
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", ports[0])).is_ok(),
        "hostfwd on 127.0.0.1:{}",
        ports[0]
    );
    assert!(vm.is_running());
    vm.kill();
    assert!(!vm.is_running());
}

/// The path for QEMU before 9 (no mapped-ram): `exec:cat` both ways, forced on
/// this QEMU by passing an older version to save_memory / load_memory.
#[test]
fn exec_cat_migration_for_qemu_before_9() {
    use isr::vmm::qemu::{STREAM_ONLY, load_memory, save_memory};
    let old = STREAM_ONLY;
    let dir = tempfile::tempdir().unwrap();
    let (parcel, config) = parcel(dir.path());
    let image = parcel.join("memory.img");

    let first = runtime(dir.path(), "run-1");
    let mut vm = QemuVm::boot(&config, &parcel, &first)
        .unwrap_or_else(|e| panic!("boot: {e}; {}", output(&first)));
    let lines = wait_for(&mut vm, "two counter lines", BOOT_LIMIT, |l| {
        guest::counting(l, 2).is_some()
    });
    let (boot, _) = guest::counting(&lines, 2).unwrap();
    let started = Instant::now();
    save_memory(vm.qmp(), &image, old)
        .unwrap_or_else(|e| panic!("save with exec:cat: {e}; {}", output(&first)));
    eprintln!(
        "exec:cat save: {:.2} s; memory.img: {}",
        started.elapsed().as_secs_f64(),
        sizes(&image)
    );
    assert!(!partial_name(&image).exists());
    let last = counters(&serial_lines(&first)).last().unwrap().0;
    drop(vm);

    let second = QemuRuntime {
        incoming: true,
        ..runtime(dir.path(), "run-2")
    };
    let mut vm = QemuVm::start(&config, &parcel, second.clone())
        .unwrap_or_else(|e| panic!("start incoming: {e}; {}", output(&second)));
    load_memory(vm.qmp(), &image, old)
        .unwrap_or_else(|e| panic!("load with exec:cat: {e}; {}", output(&second)));
    let lines = wait_for(&mut vm, "two counter lines after resume", RUN_LIMIT, |l| {
        counters(l).len() >= 2
    });
    let seen = counters(&lines);
    assert!(
        seen[0].0 == last + 1 || seen[0].0 == last + 2,
        "the counter continues after n={last}: {seen:?}"
    );
    assert!(
        seen.iter().all(|(_, b)| *b == boot),
        "same boot id {boot}: {seen:?}"
    );

    // A second exec:cat save of the same boot: a stream, so offsets shift (compare
    // with the mapped-ram figure in the test above).
    let image2 = parcel.join("memory-2.img");
    save_memory(vm.qmp(), &image2, old)
        .unwrap_or_else(|e| panic!("second save with exec:cat: {e}; {}", output(&second)));
    let (differ, total) = differing_chunks(&image, &image2);
    eprintln!(
        "exec:cat memory.img vs memory-2.img: {differ} of {total} chunks of 128 KiB differ; memory-2.img: {}",
        sizes(&image2)
    );
    let last = counters(&serial_lines(&second)).last().unwrap().0;
    vm.kill();

    // A machine with QEMU >= 9 resumes an image a QEMU before 9 saved: it is
    // not mapped-ram, so resume_from loads it as a stream.
    let third = runtime(dir.path(), "run-3");
    let mut vm = QemuVm::resume_from(&config, &parcel, &third, &image2)
        .unwrap_or_else(|e| panic!("resume a stream image: {e}; {}", output(&third)));
    let lines = wait_for(
        &mut vm,
        "counting after a cross-version resume",
        RUN_LIMIT,
        |l| !counters(l).is_empty(),
    );
    let seen = counters(&lines);
    assert!(
        seen[0].0 > last && seen[0].0 <= last + 2,
        "{seen:?} after n={last}"
    );
    assert_eq!(seen[0].1, boot, "the same boot");
    vm.kill();
}
