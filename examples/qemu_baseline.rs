//! The baseline for isr's VM figures: the same VM run by plain QEMU from local
//! files (no isr, no FUSE, no store), with the same adapter isrfsd uses.
//!
//! ```sh
//! cargo run --release --example qemu_baseline -- PARCEL_DIR [SECONDS]
//! ```
//!
//! PARCEL_DIR holds a `vm.toml` and the files it names (e.g. the test guest from
//! `tests/fixtures/make-guest.sh` with the quickstart's vm.toml). The VM boots,
//! runs SECONDS (default 5), is suspended into `PARCEL_DIR/<memory_image>`
//! (lazy mode: its device state beside `PARCEL_DIR/<ram_file>`, a local file),
//! resumed from it in a new QEMU, runs SECONDS again and is suspended a second
//! time. Prints one JSON object: boot, suspend and resume seconds, seconds from
//! the resume to the guest's first counter line, the saved state's apparent and
//! allocated bytes.
//!
//! With `MEM_MB=N` and a vm.toml whose extra_args attach the test guest's
//! control channel at `CONTROL=SOCKET` (tests/support/guest.rs), the booted
//! guest first writes N MiB into its memory (`mem N zero`) and the guest's own
//! figure is printed as `guest_memory_write_mb_per_s`.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use isr::vmm::config::{MemoryMode, VM_CONFIG_FILE, VmConfig};
use isr::vmm::qemu::{QemuRuntime, QemuVm};

/// Seconds until the serial log at `log` has a counter line (`None` after 120 s).
fn first_counter(log: &std::path::Path, since: Instant) -> Option<f64> {
    while since.elapsed() < Duration::from_secs(120) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("ISR-COUNTER") {
            return Some(since.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Sends `mem MB zero` over the guest's control channel at `socket` and reads
/// its answer (`ISR-CTL mem done bytes=N uptime=S-E`) from `log`: MB/s.
fn guest_memory_write(socket: &std::path::Path, log: &std::path::Path, mb: u64) -> Option<f64> {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream
        .write_all(format!("mem {mb} zero\n").as_bytes())
        .ok()?;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(300) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("ISR-CTL mem done")) {
            let (s, e) = line.rsplit_once("uptime=")?.1.split_once('-')?;
            let seconds = e.trim().parse::<f64>().ok()? - s.parse::<f64>().ok()?;
            return Some(mb as f64 / seconds.max(0.01));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or("usage: qemu_baseline PARCEL_DIR [SECONDS]")?,
    );
    let run_for = Duration::from_secs_f64(args.next().map_or(Ok(5.0), |s| s.parse())?);
    let config = VmConfig::load(&dir.join(VM_CONFIG_FILE))?;
    let lazy = config.memory_mode() == MemoryMode::Lazy;
    let ram_file = dir.join(&config.ram_file);
    let memory = dir.join(if lazy {
        &config.device_state
    } else {
        &config.memory_image
    });
    let _ = std::fs::remove_file(&memory);
    let _ = std::fs::remove_file(&ram_file);
    let scratch = tempfile::tempdir()?;
    let runtime = |name: &str| QemuRuntime {
        ram_file: lazy.then(|| ram_file.clone()),
        ..QemuRuntime::new("qemu-system-x86_64", scratch.path().join(name))
    };
    let suspend = |vm: &mut QemuVm| {
        if lazy {
            vm.suspend_lazy(&memory, &ram_file)
        } else {
            vm.suspend_to(&memory)
        }
    };

    let started = Instant::now();
    let boot = runtime("boot");
    let mut vm = QemuVm::boot(&config, &dir, &boot)?;
    let boot_seconds = started.elapsed().as_secs_f64();
    let mut memory_write = None;
    if let (Some(mb), Some(socket)) = (std::env::var_os("MEM_MB"), std::env::var_os("CONTROL")) {
        first_counter(&boot.serial_log(), Instant::now()).ok_or("the guest did not count")?;
        let mb: u64 = mb.to_string_lossy().parse()?;
        memory_write = guest_memory_write(socket.as_ref(), &boot.serial_log(), mb);
    }
    std::thread::sleep(run_for);
    let started = Instant::now();
    suspend(&mut vm)?;
    let suspend_seconds = started.elapsed().as_secs_f64();
    let meta = std::fs::metadata(&memory)?;
    let (apparent, allocated) = (meta.len(), meta.blocks() * 512);

    let started = Instant::now();
    let resumed = runtime("resume");
    let mut vm = if lazy {
        QemuVm::resume_lazy(&config, &dir, &resumed, &memory)?
    } else {
        QemuVm::resume_from(&config, &dir, &resumed, &memory)?
    };
    let resume_seconds = started.elapsed().as_secs_f64();
    let first_progress_seconds = first_counter(&resumed.serial_log(), started);
    std::thread::sleep(run_for);
    let started = Instant::now();
    suspend(&mut vm)?;
    let second_suspend_seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "qemu_boot_seconds": boot_seconds,
            "qemu_suspend_seconds": suspend_seconds,
            "qemu_resume_seconds": resume_seconds,
            "qemu_first_progress_seconds": first_progress_seconds,
            "guest_memory_write_mb_per_s": memory_write,
            "qemu_second_suspend_seconds": second_suspend_seconds,
            "memory_image_bytes": apparent,
            "memory_image_allocated_bytes": allocated,
        })
    );
    std::fs::remove_file(&memory)?;
    let _ = std::fs::remove_file(&ram_file);
    Ok(())
}
