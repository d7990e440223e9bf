//! The baseline for isr's VM figures: the same VM run by plain QEMU from local
//! files (no isr, no FUSE, no store), with the same adapter isrfsd uses.
//!
//! ```sh
//! cargo run --release --example qemu_baseline -- PARCEL_DIR [SECONDS]
//! ```
//!
//! PARCEL_DIR holds a `vm.toml` and the files it names (e.g. the test guest from
//! `tests/fixtures/make-guest.sh` with the quickstart's vm.toml). The VM boots,
//! runs SECONDS (default 5), is suspended into `PARCEL_DIR/<memory_image>`,
//! resumed from it in a new QEMU, runs SECONDS again and is suspended a second
//! time. Prints one JSON object: boot, suspend and resume seconds, the memory
//! image's apparent and allocated bytes.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use isr::vmm::config::{VM_CONFIG_FILE, VmConfig};
use isr::vmm::qemu::{QemuRuntime, QemuVm};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or("usage: qemu_baseline PARCEL_DIR [SECONDS]")?,
    );
    let run_for = Duration::from_secs_f64(args.next().map_or(Ok(5.0), |s| s.parse())?);
    let config = VmConfig::load(&dir.join(VM_CONFIG_FILE))?;
    let memory = dir.join(&config.memory_image);
    let _ = std::fs::remove_file(&memory);
    let scratch = tempfile::tempdir()?;
    let runtime = |name: &str| QemuRuntime::new("qemu-system-x86_64", scratch.path().join(name));

    let started = Instant::now();
    let mut vm = QemuVm::boot(&config, &dir, &runtime("boot"))?;
    let boot_seconds = started.elapsed().as_secs_f64();
    std::thread::sleep(run_for);
    let started = Instant::now();
    vm.suspend_to(&memory)?;
    let suspend_seconds = started.elapsed().as_secs_f64();
    let meta = std::fs::metadata(&memory)?;
    let (apparent, allocated) = (meta.len(), meta.blocks() * 512);

    let started = Instant::now();
    let mut vm = QemuVm::resume_from(&config, &dir, &runtime("resume"), &memory)?;
    let resume_seconds = started.elapsed().as_secs_f64();
    std::thread::sleep(run_for);
    let started = Instant::now();
    vm.suspend_to(&memory)?;
    let second_suspend_seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "qemu_boot_seconds": boot_seconds,
            "qemu_suspend_seconds": suspend_seconds,
            "qemu_resume_seconds": resume_seconds,
            "qemu_second_suspend_seconds": second_suspend_seconds,
            "memory_image_bytes": apparent,
            "memory_image_allocated_bytes": allocated,
        })
    );
    std::fs::remove_file(&memory)?;
    Ok(())
}
