//! Damage and bad input: every tampered chunk is named by `verify`, `export`
//! never writes wrong bytes, and bad passphrases, manifests, config, paths and
//! stores give one clear error line, a documented exit code and an unchanged store.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use support::{Env, SeaweedFs};

fn chunk_tags(store: &Path) -> BTreeSet<PathBuf> {
    support::local_chunk_files(store).into_iter().collect()
}

fn tag_of(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn tampered_chunks_are_each_named_and_export_writes_no_wrong_bytes() {
    let env = Env::local();
    let store = PathBuf::from(&env.store);
    support::small_tree(&env.path("vm-src"), "vm");
    std::fs::write(
        env.path("vm-src/disk.img"),
        support::random_bytes("vm-disk", 2 << 20),
    )
    .unwrap();
    env.ok(&["import", "vm", env.path("vm-src").to_str().unwrap()]);
    let vm_chunks = chunk_tags(&store);
    support::small_tree(&env.path("other-src"), "other");
    env.ok(&["import", "other", env.path("other-src").to_str().unwrap()]);
    let other_chunk = chunk_tags(&store)
        .difference(&vm_chunks)
        .next()
        .unwrap()
        .clone();
    assert_eq!(
        env.json(&["verify", "vm", "--deep"])["bad_chunks"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // Victims among disk.img's full-size chunks (the small files' chunks are tiny).
    let mut victims = vm_chunks
        .iter()
        .filter(|p| std::fs::metadata(p).unwrap().len() > 64 * 1024);
    let flipped = victims.next().unwrap().clone();
    let truncated = victims.next().unwrap().clone();
    let swapped = victims.next().unwrap().clone();
    let deleted = victims.next().unwrap().clone();
    let mut bytes = std::fs::read(&flipped).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&flipped, bytes).unwrap();
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::copy(&other_chunk, &swapped).unwrap();
    std::fs::remove_file(&deleted).unwrap();

    for deep in [false, true] {
        let mut args = vec!["--json", "verify", "vm"];
        if deep {
            args.push("--deep");
        }
        let output = env.run(&args);
        assert_eq!(
            output.status.code(),
            Some(7),
            "verify exits 7 on bad chunks"
        );
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let bad: BTreeSet<String> = report["bad_chunks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["tag"].as_str().unwrap().to_owned())
            .collect();
        let expected: BTreeSet<String> = [&flipped, &truncated, &swapped, &deleted]
            .iter()
            .map(|p| tag_of(p))
            .collect();
        assert_eq!(
            bad, expected,
            "verify names exactly the damaged chunks (deep: {deep})"
        );
        let problems = report["bad_chunks"].to_string();
        assert!(problems.contains("missing"), "{problems}");
    }
    let human = env.fails(&["verify", "vm"], 7);
    assert!(human.contains("4 bad chunk(s)"), "{human}");
    assert!(
        String::from_utf8_lossy(&env.run(&["verify", "vm"]).stdout).contains(&tag_of(&flipped))
    );

    let out = env.path("out");
    let stderr = env.fails(&["export", "vm", out.to_str().unwrap()], 7);
    assert!(
        [&flipped, &truncated, &swapped, &deleted]
            .iter()
            .any(|p| stderr.contains(&tag_of(p))),
        "export names the bad chunk: {stderr}"
    );
    assert!(
        !out.join("disk.img").exists(),
        "no file with wrong bytes under its real name"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("isr-partial"))
        .collect();
    assert!(leftovers.is_empty(), "partial files removed: {leftovers:?}");
    // The other parcel is untouched by damage to chunks it does not use.
    assert_eq!(
        env.json(&["verify", "other", "--deep"])["bad_chunks"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[test]
fn bad_input_gives_one_clear_line_and_leaves_the_store_unchanged() {
    let env = Env::local();
    let store = PathBuf::from(&env.store);
    support::small_tree(&env.path("src"), "bad-input");
    env.ok(&["import", "vm", env.path("src").to_str().unwrap()]);
    let before = support::store_snapshot(&store);
    let unchanged = |what: &str| {
        assert_eq!(
            support::store_snapshot(&store),
            before,
            "store changed by {what}"
        )
    };

    // Wrong passphrase, for every command that unlocks.
    for args in [
        vec!["info", "vm"],
        vec!["history", "vm"],
        vec!["verify", "vm"],
        vec!["export", "vm", env.path("x").to_str().unwrap()],
        vec![
            "import",
            "--new-version",
            "vm",
            env.path("src").to_str().unwrap(),
        ],
    ] {
        let output = env
            .isrctl()
            .env("ISR_PASSPHRASE", "wrong")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(3), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            stderr.trim(),
            "isrctl: wrong passphrase for parcel vm",
            "{args:?}"
        );
        unchanged("a wrong passphrase");
    }

    // No passphrase at all and no terminal to ask on (setsid: no controlling terminal).
    let setsid = support::find_program("setsid", "apt-get install util-linux");
    let command = env.isrctl();
    let program = command.get_program().to_owned();
    let output = std::process::Command::new(setsid)
        .arg(program)
        .args(["info", "vm"])
        .envs(
            command
                .get_envs()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
        )
        .env_remove("ISR_PASSPHRASE")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("set ISR_PASSPHRASE"));

    // Unknown config key: named, with the file.
    let bad_config = env.path("bad.toml");
    std::fs::write(&bad_config, "stor = \"/tmp/x\"\n").unwrap();
    let output = env
        .isrctl()
        .env("ISR_CONFIG", &bad_config)
        .args(["ls"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("stor") && stderr.contains("bad.toml"),
        "{stderr}"
    );

    // Non-existent import path: nothing is created.
    let stderr = env.fails(
        &[
            "import",
            "newparcel",
            env.path("no-such-dir").to_str().unwrap(),
        ],
        4,
    );
    assert!(stderr.contains("no-such-dir"), "{stderr}");
    unchanged("an import of a missing path");

    // Invalid names and targets, existing parcel, non-empty destination.
    env.fails(&["import", "../evil", env.path("src").to_str().unwrap()], 2);
    env.fails(&["export", "vm@zero", env.path("y").to_str().unwrap()], 2);
    env.fails(&["export", "vm@9", env.path("y").to_str().unwrap()], 4);
    env.fails(&["info", "nosuchparcel"], 4);
    let stderr = env.fails(&["import", "vm", env.path("src").to_str().unwrap()], 5);
    assert!(stderr.contains("--new-version"), "{stderr}");
    let src = env.path("src");
    let stderr = env.fails(
        &[
            "import",
            "--new-version",
            "--chunk-size",
            "65536",
            "vm",
            src.to_str().unwrap(),
        ],
        2,
    );
    assert!(stderr.contains("chunk size 131072"), "{stderr}");
    let stderr = env.fails(
        &[
            "import",
            "--new-version",
            "--dedup-with",
            "x",
            "vm",
            src.to_str().unwrap(),
        ],
        2,
    );
    assert!(stderr.contains("--dedup-with only applies"), "{stderr}");
    let stderr = env.fails(
        &[
            "import",
            "--chunk-size",
            "1000",
            "other",
            src.to_str().unwrap(),
        ],
        2,
    );
    assert!(stderr.contains("power of two"), "{stderr}");
    let stderr = env.fails(&["export", "vm", env.path("src").to_str().unwrap()], 2);
    assert!(stderr.contains("not an empty directory"), "{stderr}");
    unchanged("refused commands");

    // Truncated, then garbage manifest: a clear integrity error naming the manifest.
    let manifest = store.join("parcels/vm/versions/0000000001.manifest");
    let original = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &original[..original.len() / 2]).unwrap();
    let stderr = env.fails(&["export", "vm", env.path("out1").to_str().unwrap()], 7);
    assert!(stderr.contains("0000000001.manifest"), "{stderr}");
    std::fs::write(&manifest, support::random_bytes("garbage", 3000)).unwrap();
    let stderr = env.fails(&["verify", "vm"], 7);
    assert!(stderr.contains("0000000001.manifest"), "{stderr}");
    std::fs::write(&manifest, &original).unwrap();
    unchanged("reading damaged manifests");
}

#[test]
fn unreachable_stores_fail_with_exit_6_after_retrying() {
    let mut server = SeaweedFs::start();
    let env = Env::s3(&server, "gone");
    support::small_tree(&env.path("src"), "gone");
    env.ok(&["import", "vm", env.path("src").to_str().unwrap()]);
    server.kill();
    for args in [
        vec!["ls"],
        vec!["info", "vm"],
        vec!["import", "other", env.path("src").to_str().unwrap()],
    ] {
        let stderr = env.fails(&args, 6);
        assert!(stderr.contains("unreachable"), "{stderr}");
    }
    let closed_port = support::free_ports(1)[0];
    let output = env
        .isrctl()
        .env("ISR_STORE", format!("http://127.0.0.1:{closed_port}/store"))
        .args(["export", "vm", env.path("out").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !env.path("out").exists(),
        "nothing written when the store is unreachable"
    );
}

#[test]
fn a_closed_stdout_ends_isrctl_quietly_like_sigpipe() {
    let env = Env::local();
    env.import_files("vm", &[("disk.img", vec![7u8; 4096])]);
    let mut child = env
        .isrctl()
        .args(["info", "vm"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // like `isrctl info vm | head -0`
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_keyslot_asking_for_endless_argon2_work_is_refused_at_once() {
    let env = Env::local();
    env.import_files("vm", &[("disk.img", vec![7u8; 4096])]);
    // A store writer sets the passphrase slot's time cost to 2^32 - 1.
    let slot = std::path::PathBuf::from(&env.store).join("parcels/vm/keyslots/0");
    let mut bytes = std::fs::read(&slot).unwrap();
    assert_eq!(bytes[5], 1, "slot 0 is the passphrase slot");
    bytes[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&slot, bytes).unwrap();
    let out = env.path("out");
    for args in [
        vec!["info", "vm"],
        vec!["history", "vm"],
        vec!["verify", "vm"],
        vec!["export", "vm", out.to_str().unwrap()],
        vec!["resume", "--vmm", "none", "vm"],
    ] {
        let stderr = env.fails(&args, 7);
        assert!(
            stderr.contains("beyond isr's maximum"),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn an_empty_passphrase_or_a_short_key_file_is_a_usage_error() {
    let env = Env::local();
    env.import_files("vm", &[("disk.img", vec![7u8; 4096])]);
    let run = |command: &mut std::process::Command| command.output().unwrap();
    let empty = run(env.isrctl().env("ISR_PASSPHRASE", "").args(["info", "vm"]));
    assert_eq!(empty.status.code(), Some(2), "{empty:?}");
    let stderr = String::from_utf8_lossy(&empty.stderr);
    assert!(
        stderr.contains("ISR_PASSPHRASE is set but empty"),
        "{stderr}"
    );

    let short = env.path("short.key");
    std::fs::write(&short, [1u8; 8]).unwrap();
    let key = run(env.isrctl().env_remove("ISR_PASSPHRASE").args([
        "--key-file",
        short.to_str().unwrap(),
        "info",
        "vm",
    ]));
    assert_eq!(key.status.code(), Some(2), "{key:?}");
    let stderr = String::from_utf8_lossy(&key.stderr);
    assert!(stderr.contains("at least 16"), "{stderr}");

    let empty_file = env.path("empty.pw");
    std::fs::write(&empty_file, "").unwrap();
    let file = run(env.isrctl().env_remove("ISR_PASSPHRASE").args([
        "--passphrase-file",
        empty_file.to_str().unwrap(),
        "info",
        "vm",
    ]));
    assert_eq!(file.status.code(), Some(2), "{file:?}");
}

#[test]
fn hostile_bytes_in_store_files_stay_escaped_on_one_line() {
    let env = Env::local();
    let store = PathBuf::from(&env.store);
    env.import_files("good", &[("a", b"fine".as_slice())]);
    env.import_files("bad", &[("a", b"fine".as_slice())]);
    // A damaged lock with an escape sequence that retitles the terminal,
    // line breaks of several kinds and a right-to-left override.
    let hostile =
        b"holder = \"\x1b]0;pwned\x07\"\r\nhost = \x1b[2J\n\xe2\x80\xa8garbage\xe2\x80\xae\x85\n";
    std::fs::write(store.join("parcels/bad/lock"), hostile).unwrap();

    let listing = env.run(&["ls"]);
    assert!(listing.status.success(), "{listing:?}");
    let stdout = String::from_utf8(listing.stdout).unwrap();
    assert!(stdout.contains("good"), "{stdout}");
    let bad = stdout
        .lines()
        .find(|l| l.starts_with("bad"))
        .unwrap_or_else(|| panic!("the damaged parcel is listed: {stdout}"));
    assert!(bad.contains("lock"), "and marked: {bad}");
    assert!(
        !stdout.chars().any(|c| c.is_control() && c != '\n'),
        "{stdout:?}"
    );
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    let json = env.json(&["ls"])["parcels"].clone();
    assert!(
        json[0]["problem"].as_str().unwrap().contains("lock"),
        "{json}"
    );
    assert!(json[1].get("problem").is_none(), "{json}");

    // Commands that read the lock fail on one escaped line (the helper
    // checks both); `unlock --force` removes the damaged lock.
    env.fails(&["info", "bad"], 7);
    env.ok(&["unlock", "--force", "bad"]);
    assert!(env.json(&["ls"])["parcels"][0].get("problem").is_none());
}
