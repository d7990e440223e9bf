//! A parcel's `vm.toml` (a file inside the parcel: it comes from the store)
//! through `VmConfig::parse` (TOML, then every check of `validate`), and for
//! an accepted one what the daemon derives from it: its files, boot files,
//! memory mode, and the QEMU check and command line.
#![no_main]

use std::path::Path;

use isr::vmm::config::VmConfig;
use isr::vmm::qemu;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = VmConfig::parse(text) else {
        return;
    };
    let _ = (
        config.files(),
        config.boot_files(),
        config.memory_mode(),
        config.memory_mib(),
    );
    let _ = qemu::check_config(&config);
    let runtime = qemu::QemuRuntime::new("qemu-system-x86_64", "/run/isr/fuzz");
    let _ = qemu::qemu_args(&config, Path::new("/mnt/parcel"), &runtime);
});
