//! Round trip: a ~1 GiB file mixing random data, zeros and repeated blocks, plus
//! a small text file and a subdirectory, imported and exported byte-identical —
//! against the local store, a real S3 server (SeaweedFS) and, read-only, over HTTP.

mod support;

use std::os::unix::fs::PermissionsExt;

use support::{Env, HttpServer, SeaweedFs};

const GIB: u64 = 1 << 30;

fn make_source(env: &Env) -> std::path::PathBuf {
    let source = env.path("source");
    std::fs::create_dir_all(source.join("config")).unwrap();
    support::write_mixed_file(&source.join("disk.img"), GIB + 12_345, "roundtrip");
    std::fs::write(
        source.join("vm.toml"),
        "[vm]\nmemory = \"512M\"\ncpus = 1\n",
    )
    .unwrap();
    std::fs::write(source.join("config/extra.txt"), "extra\n").unwrap();
    std::fs::set_permissions(
        source.join("vm.toml"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    source
}

fn roundtrip(env: &Env) {
    let source = make_source(env);
    let summary = env.json(&["import", "vm", source.to_str().unwrap()]);
    println!("import summary: {summary:#}");
    assert_eq!(summary["version"], 1);
    assert_eq!(summary["files"], 3);
    assert!(
        summary["zero_chunks"].as_u64().unwrap() > 1000,
        "holes became zero chunks"
    );
    assert!(
        summary["deduplicated_chunks"].as_u64().unwrap() > 1000,
        "repeated block was deduplicated"
    );
    assert!(
        summary["stored_bytes"].as_u64().unwrap() < GIB / 2,
        "text compressed, zeros and repeats not stored"
    );

    let out = env.path("out");
    let exported = env.json(&["export", "vm", out.to_str().unwrap()]);
    assert_eq!(support::tree_hashes(&source), support::tree_hashes(&out));
    assert_eq!(
        exported["fetched_bytes"], summary["stored_bytes"],
        "each distinct chunk fetched once, zero chunks never"
    );
    let mode = std::fs::metadata(out.join("vm.toml"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o640, "mode restored");
    let mtime = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
    assert_eq!(
        mtime(&source.join("disk.img")),
        mtime(&out.join("disk.img")),
        "mtime restored"
    );
    let verify = env.json(&["verify", "vm", "--deep"]);
    assert_eq!(verify["bad_chunks"].as_array().unwrap().len(), 0);
}

#[test]
fn one_gib_roundtrip_local_store() {
    let env = Env::local();
    roundtrip(&env);

    // The same store served read-only over plain HTTP: export and verify work,
    // writes are refused with a clear message.
    let server = HttpServer::serve(std::path::Path::new(&env.store));
    let out = env.path("out-http");
    let http = |args: &[&str]| {
        let mut command = env.isrctl();
        command.env("ISR_STORE", server.url()).args(args);
        command.output().unwrap()
    };
    let exported = http(&["export", "vm@1", out.to_str().unwrap()]);
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    assert_eq!(
        support::tree_hashes(&env.path("source")),
        support::tree_hashes(&out)
    );
    let refused = http(&[
        "import",
        "--new-version",
        "vm",
        env.path("source").to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("read-only"));
    let refused = http(&["ls"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot list"));
}

#[test]
fn one_gib_roundtrip_s3_store() {
    let server = SeaweedFs::start();
    let env = Env::s3(&server, "roundtrip");
    roundtrip(&env);
}
