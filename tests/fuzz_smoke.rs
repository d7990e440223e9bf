//! The fuzz targets' smoke run (issue #14): `bash fuzz/run.sh smoke` builds the
//! fuzz crate (its own workspace, `fuzz/target`; stable Rust, libFuzzer without a
//! sanitizer, see docs/decisions.md) and runs every target over its seed corpus
//! and 100,000 mutations with a fixed seed. Any crash, hang or oversized
//! allocation fails this test, except a defect listed in `fuzz/known-defects`
//! (reported, not yet fixed). A fresh machine builds the fuzz crate from scratch
//! first: several minutes on two cores.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

#[test]
fn every_fuzz_target_survives_its_smoke_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("fuzz/run.sh");
    assert!(script.exists(), "{} is missing", script.display());
    let started = Instant::now();
    let output = Command::new("bash")
        .arg(&script)
        .arg("smoke")
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("fuzz smoke took {:.0} s", started.elapsed().as_secs_f64());
    if output.status.success() {
        return;
    }
    let built = stderr.contains("== build took");
    let help = if built {
        "A fuzz target found a crash, hang or oversized allocation: the input is in \
         fuzz/artifacts/<target>/ (the table above names the target). Reproduce it with \
         `fuzz/target/x86_64-unknown-linux-gnu/release/<target> fuzz/artifacts/<target>/<file>` \
         (it prints the panic or the allocating stack), fix the decoder, then move the input \
         into fuzz/corpus/<target>/ as a regression seed."
    } else {
        "The fuzz crate did not build. It needs the stable toolchain and a C++ compiler for \
         libFuzzer (`apt-get install g++`); run `bash fuzz/run.sh build` to see the error. \
         The build is `cargo build --release --target <host>` of fuzz/Cargo.toml with \
         SanitizerCoverage RUSTFLAGS (see fuzz/run.sh); a compile error there usually \
         means a fuzz target uses an isr API that changed."
    };
    let lines: Vec<&str> = stderr.lines().collect();
    let tail = lines[lines.len().saturating_sub(80)..].join("\n");
    panic!(
        "bash fuzz/run.sh smoke failed ({}).\n{help}\n---- stderr (last 80 lines):\n{tail}",
        output.status
    );
}
