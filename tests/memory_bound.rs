//! A 50 GiB sparse disk image imports with bounded memory (< 512 MiB RSS),
//! without reading its holes. Alone in its test binary so the children's peak
//! RSS (getrusage) is isrctl's.

mod support;

use std::os::unix::fs::FileExt;

use nix::sys::resource::{UsageWho, getrusage};

#[test]
fn fifty_gib_sparse_image_imports_under_512_mib_rss() {
    let env = support::Env::local();
    let source = env.path("src");
    std::fs::create_dir(&source).unwrap();
    let file = std::fs::File::create(source.join("disk.img")).unwrap();
    let size: u64 = 50 << 30;
    file.set_len(size).unwrap();
    for i in 0..8u64 {
        let offset = i * (size / 8) + 12_345;
        file.write_all_at(
            &support::random_bytes(&format!("island{i}"), 8 << 20),
            offset,
        )
        .unwrap();
    }
    drop(file);

    let summary = env.json(&["import", "vm", source.to_str().unwrap()]);
    let max_rss_kib = getrusage(UsageWho::RUSAGE_CHILDREN).unwrap().max_rss();
    println!(
        "50 GiB sparse import: peak RSS {} MiB, {} chunks ({} zero), {:.1} s",
        max_rss_kib / 1024,
        summary["chunks"],
        summary["zero_chunks"],
        summary["seconds"].as_f64().unwrap()
    );
    assert_eq!(summary["chunks"], size / (128 << 10));
    assert!(
        max_rss_kib < 512 * 1024,
        "peak RSS {max_rss_kib} KiB is not under 512 MiB"
    );

    let verify = env.json(&["verify", "vm"]);
    assert_eq!(verify["bad_chunks"].as_array().unwrap().len(), 0);
    // Each 8 MiB island starts 12345 bytes into a chunk, so it spans 65 chunks.
    assert_eq!(verify["chunks_checked"].as_u64().unwrap(), 8 * 65);
}
