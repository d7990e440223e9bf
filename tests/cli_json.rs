//! The command line as scripts and operators meet it (issue 15, defects 9
//! and 10 and the CLI additions): with `--json` every command prints exactly
//! one JSON object carrying the schema version, errors too; exit codes of
//! credential mistakes are the ones `--help` lists; completions, man pages,
//! `isrctl config`, `-v` and an invalid `ISR_LOG`.

mod support;

use std::process::Output;

use support::Env;

/// Parses stdout as exactly one JSON document with the schema field.
fn document(args: &[&str], output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("isrctl {args:?}: stdout is not one JSON document ({e}):\n{stdout}")
    });
    assert_eq!(value["schema"], 1, "isrctl {args:?}: {value}");
    value
}

/// Runs `isrctl --json ARGS`, which must exit with `code`; its document.
fn json_exit(env: &Env, args: &[&str], code: i32) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let output = env.run(&all);
    assert_eq!(
        output.status.code(),
        Some(code),
        "isrctl {all:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    document(&all, &output)
}

fn error_of(env: &Env, args: &[&str], code: i32, class: &str) -> serde_json::Value {
    let value = json_exit(env, args, code);
    let error = &value["error"];
    assert_eq!(error["class"], class, "{args:?}: {value}");
    assert_eq!(error["exit_code"], code, "{args:?}: {value}");
    assert!(!error["message"].as_str().unwrap().is_empty(), "{value}");
    assert!(!error["hint"].as_str().unwrap().is_empty(), "{value}");
    value
}

#[test]
fn every_command_prints_one_json_document_with_the_schema_version() {
    Env::require_fuse();
    let env = Env::local();
    let source = env.path("src");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("a.txt"), b"one").unwrap();
    let src = source.to_str().unwrap();
    let out = env.path("out");
    let key = env.path("kiosk.key");
    let new_passphrase = env.path("new-passphrase");
    std::fs::write(&new_passphrase, "another passphrase\n").unwrap();
    let man = env.path("man");

    for args in [
        vec!["import", "vm", src],
        vec!["import", "--new-version", "vm", src],
        vec!["ls"],
        vec!["info", "vm"],
        vec!["history", "vm"],
        vec!["export", "vm@1", out.to_str().unwrap()],
        vec!["verify", "vm"],
        vec!["resume", "vm"],
        vec!["status"],
        vec!["status", "vm"],
        vec!["hoard", "vm"],
        vec!["sync", "vm"],
        vec!["checkin", "vm"],
        vec!["resume", "vm"],
        vec!["discard", "vm"],
        vec!["rollback", "vm", "1"],
        vec!["gc", "--keep-last", "2"],
        vec!["new-key-file", key.to_str().unwrap()],
        vec!["unlock", "--force", "vm"],
        vec!["config"],
        vec!["man", man.to_str().unwrap()],
    ] {
        json_exit(&env, &args, 0);
    }
    assert_eq!(json_exit(&env, &["ls"], 0)["parcels"][0]["name"], "vm");
    assert_eq!(
        json_exit(&env, &["history", "vm"], 0)["versions"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "gc --keep-last 2 kept two of the three versions"
    );
    let unlock = json_exit(&env, &["unlock", "--force", "vm"], 0);
    assert_eq!(unlock["was_locked"], false, "{unlock}");
    let passwd = json_exit(
        &env,
        &[
            "passwd",
            "vm",
            "--new-passphrase-file",
            new_passphrase.to_str().unwrap(),
        ],
        0,
    );
    assert_eq!(passwd["parcel"], "vm", "{passwd}");
    let key_file = json_exit(&env, &["new-key-file", env.path("k2").to_str().unwrap()], 0);
    assert_eq!(key_file["key_file"], env.path("k2").display().to_string());
}

#[test]
fn errors_are_json_documents_with_class_message_hint_and_the_same_exit_code() {
    let env = Env::local();
    env.import_files("vm", &[("a.txt", b"one")]);
    error_of(&env, &["info", "nosuch"], 4, "not_found");
    error_of(&env, &["unlock", "vm"], 2, "invalid");
    error_of(&env, &["discard", "vm"], 4, "not_found");
    error_of(&env, &["resume"], 2, "invalid"); // a usage error clap reports
    error_of(&env, &["history", "vm@x"], 2, "invalid");
    let exists = error_of(
        &env,
        &["new-key-file", env.path("config.toml").to_str().unwrap()],
        1,
        "other",
    );
    assert!(
        exists["error"]["message"]
            .as_str()
            .unwrap()
            .contains("config.toml")
    );
    // Without --json, stdout stays empty on errors.
    let output = env.run(&["info", "nosuch"]);
    assert!(output.stdout.is_empty());
}

#[test]
fn credential_mistakes_exit_with_the_codes_help_lists() {
    let env = Env::local();
    env.import_files("vm", &[("a.txt", b"one")]);
    let missing = env.path("no-such-passphrase-file");
    let output = env
        .isrctl()
        .env_remove("ISR_PASSPHRASE")
        .args(["--passphrase-file", missing.to_str().unwrap(), "info", "vm"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(4), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no-such-passphrase-file"), "{stderr}");
    let empty = env.path("empty");
    std::fs::write(&empty, "").unwrap();
    let refused = env.fails(
        &[
            "passwd",
            "vm",
            "--new-passphrase-file",
            empty.to_str().unwrap(),
        ],
        2,
    );
    assert!(refused.contains("empty"), "{refused}");
    let missing_key = env.path("no-such-key");
    env.fails(
        &["--key-file", missing_key.to_str().unwrap(), "info", "vm"],
        4,
    );

    // New passphrases typed twice differently, on a real terminal (script(1)).
    let script = support::find_program("script", "apt-get install bsdutils");
    let isrctl = support::binary("isrctl");
    let mut command = env.isrctl();
    command.env_remove("ISR_PASSPHRASE");
    let passphrase = env.path("passphrase");
    std::fs::write(&passphrase, format!("{}\n", support::PASSPHRASE)).unwrap();
    let line = format!(
        "{} --passphrase-file {} passwd vm",
        isrctl.display(),
        passphrase.display()
    );
    let output = {
        use std::io::Write;
        let mut child = std::process::Command::new(script)
            .args(["-qec", &line, "/dev/null"])
            .envs(command.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
            .env_remove("ISR_PASSPHRASE")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        stdin.write_all(b"first try\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        stdin.write_all(b"second try\n").unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    };
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("passphrases differ"), "{text}");
    assert_eq!(output.status.code(), Some(2), "{text}");
}

#[test]
fn completions_and_man_pages_come_from_the_command_line() {
    let env = Env::local();
    let bash = env.ok(&["completions", "bash"]);
    assert!(bash.contains("isrctl"), "{bash}");
    assert!(bash.contains("resume"), "{bash}");
    assert!(env.ok(&["completions", "zsh"]).contains("#compdef isrctl"));
    let dir = env.path("man1");
    env.ok(&["man", dir.to_str().unwrap()]);
    let main = std::fs::read_to_string(dir.join("isrctl.1")).unwrap();
    assert!(main.contains(".TH"), "{main}");
    let resume = std::fs::read_to_string(dir.join("isrctl-resume.1")).unwrap();
    assert!(resume.contains(r"\-\-mount"), "{resume}");
    assert!(dir.join("isrctl-config.1").exists());
}

#[test]
fn config_shows_each_value_and_where_it_came_from() {
    let env = Env::local();
    let config = json_exit(&env, &["config"], 0);
    let settings = &config["settings"];
    assert_eq!(settings["store"]["value"], env.store, "{config}");
    assert_eq!(settings["store"]["source"], "env ISR_STORE", "{config}");
    let file = env.config.display().to_string();
    assert_eq!(
        settings["kdf.memory_kib"]["source"],
        format!("config file {file} (line 2)"),
        "{config}"
    );
    assert_eq!(settings["kdf.memory_kib"]["value"], "1024");
    assert_eq!(settings["import.zstd_level"]["source"], "default");
    assert_eq!(settings["credentials"]["source"], "env ISR_PASSPHRASE");
    let other = env.path("other-store");
    let config = json_exit(&env, &["--store", other.to_str().unwrap(), "config"], 0);
    assert_eq!(config["settings"]["store"]["source"], "option --store");
    // Secrets are never printed.
    env.append_config("\n[s3]\nsecret_access_key = \"hunter2-secret\"\n");
    let text = env.ok(&["config"]);
    assert!(!text.contains("hunter2-secret"), "{text}");
    assert!(text.contains("s3.secret_access_key"), "{text}");
    // A config error names the file and the line.
    env.append_config("bogus_key = 1\n");
    let error = env.fails(&["ls"], 2);
    assert!(error.contains(&file), "{error}");
    assert!(error.contains("line 15"), "{error}");
}

#[test]
fn verbose_says_what_it_does_and_an_invalid_isr_log_is_reported() {
    let env = Env::local();
    env.import_files("vm", &[("a.txt", b"one")]);
    let output = env.run(&["-v", "ls"]);
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("reading config file"), "{stderr}");
    assert!(stderr.contains(&format!("store {}", env.store)), "{stderr}");
    let output = env.run(&["-q", "ls"]);
    assert!(output.stderr.is_empty(), "{output:?}");
    let output = env
        .isrctl()
        .env("ISR_LOG", "info,[[[")
        .args(["ls"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("ISR_LOG"), "{stderr}");
}
