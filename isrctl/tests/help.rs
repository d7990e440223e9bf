//! `isrctl --help` documents every command and the exit codes scripts rely on.
//! (Also makes `cargo test` build this binary, which the root tests drive.)

#[test]
fn help_lists_commands_and_exit_codes() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_isrctl"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for word in [
        "import", "ls", "info", "history", "export", "verify", "resume", "status", "hoard",
        "discard", "unlock",
    ] {
        assert!(help.contains(word), "--help does not mention {word}");
    }
    for code in [
        "0  success",
        "3  wrong passphrase",
        "5  conflict",
        "6  store unreachable",
        "7  data integrity",
    ] {
        assert!(
            help.contains(code),
            "--help does not document exit code {code:?}"
        );
    }
}
