//! `isrfsd --help` explains the daemon and its directories.
//! (Also makes `cargo test` build this binary, which the root tests drive.)

#[test]
fn help_explains_the_daemon() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_isrfsd"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for word in [
        "--runtime-dir",
        "--state-dir",
        "--cache-dir",
        "--no-detach",
        "FUSE",
    ] {
        assert!(help.contains(word), "--help does not mention {word}");
    }
}
