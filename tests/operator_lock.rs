//! The parcel lock and the store as an operator meets them (issue 15,
//! defects 2, 3, 4, 7 and 8): every committing command respects the lock,
//! relative store paths, mistyped stores and `isrctl init`, `isrctl delete`,
//! and a checkin that is not replayed once the parcel moved on.

mod support;

use std::path::Path;

use support::{Env, SeaweedFs};

/// `user@host` of the parcel's lock, as `isrctl ls` shows it.
fn lock_holder(env: &Env, name: &str) -> String {
    let listing = env.json(&["ls"]);
    let parcel = listing["parcels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .expect("parcel listed");
    let lock = &parcel["lock"];
    format!(
        "{}@{}",
        lock["holder"].as_str().unwrap(),
        lock["host"].as_str().unwrap()
    )
}

fn keyslot_count(env: &Env, name: &str) -> usize {
    let dir = Path::new(&env.store).join(format!("parcels/{name}/keyslots"));
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn every_committing_command_respects_a_resumed_parcels_lock() {
    Env::require_fuse();
    let env = Env::local();
    let source = env.import_files(
        "vm",
        &[("disk.img", support::random_bytes("lock", 1 << 20))],
    );
    let source = source.to_str().unwrap();
    env.ok(&["import", "--new-version", "vm", source]);
    env.json(&["resume", "vm@1"]);
    let holder = lock_holder(&env, "vm");

    let refused = env.fails(&["import", "--new-version", "vm", source], 5);
    assert!(refused.contains(&holder), "{refused}");
    let refused = env.fails(&["rollback", "vm", "1"], 5);
    assert!(refused.contains(&holder), "{refused}");
    let new_passphrase = env.path("new-passphrase");
    std::fs::write(&new_passphrase, "another passphrase\n").unwrap();
    let slots = keyslot_count(&env, "vm");
    let refused = env.fails(
        &[
            "passwd",
            "vm",
            "--new-passphrase-file",
            new_passphrase.to_str().unwrap(),
        ],
        5,
    );
    assert!(refused.contains(&holder), "{refused}");
    assert_eq!(keyslot_count(&env, "vm"), slots, "no keyslot written");
    assert_eq!(env.versions("vm"), vec![1, 2], "nothing committed");

    // gc keeps the session's base (version 1) though --keep-last 1 drops it.
    let report = env.json(&["gc", "--keep-last", "1", "--grace", "0"]);
    assert_eq!(
        report["parcels"][0]["deleted_versions"],
        serde_json::json!([])
    );
    assert_eq!(env.versions("vm"), vec![1, 2]);

    // Once the session ends, the same commands work.
    env.ok(&["discard", "vm"]);
    env.ok(&["import", "--new-version", "vm", source]);
    env.ok(&["rollback", "vm", "1"]);
    assert_eq!(env.versions("vm"), vec![1, 2, 3, 4]);
}

#[test]
fn a_relative_store_is_resolved_where_isrctl_runs() {
    Env::require_fuse();
    let env = Env::local();
    env.import_files(
        "first",
        &[("a.img", support::random_bytes("first", 70_000))],
    );
    env.import_files("vm", &[("disk.img", support::random_bytes("rel", 200_000))]);
    // The daemon starts in this test's working directory...
    env.json(&["resume", "first"]);
    env.ok(&["discard", "first"]);
    // ... and isrctl runs in the store's parent with a relative path.
    let relative = |args: &[&str]| {
        env.isrctl()
            .current_dir(env.dir.path())
            .env("ISR_STORE", "store")
            .args(args)
            .output()
            .unwrap()
    };
    let resumed = relative(&["resume", "vm"]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let status = env.ok(&["status"]);
    assert!(status.contains("vm"), "{status}");
    assert!(relative(&["discard", "vm"]).status.success());

    // A parcel missing from a store is not found; no import is blamed.
    let missing = env.fails(&["resume", "ghost"], 4);
    assert!(!missing.contains("import"), "{missing}");
    let (runtime, store, _) = env.open_parcel("vm");
    let error = runtime
        .block_on(isr::parcel::resolve_version(&store, "ghost", None))
        .unwrap_err();
    assert!(
        matches!(error, isr::parcel::ParcelError::NotFound { .. }),
        "{error}"
    );
}

#[test]
fn a_mistyped_store_is_an_error_and_init_creates_one() {
    let env = Env::local();
    let source = env.path("src");
    std::fs::create_dir(&source).unwrap();
    std::fs::write(source.join("disk.img"), b"data").unwrap();
    let source = source.to_str().unwrap();
    let typo = env.path("stroe");
    let typo_url = typo.to_str().unwrap();
    for args in [
        vec!["--store", typo_url, "ls"],
        vec!["--store", typo_url, "import", "vm", source],
    ] {
        let error = env.fails(&args, 4);
        assert!(error.contains("isrctl init"), "{error}");
    }
    assert!(!typo.exists(), "nothing was created");

    assert!(env.ok(&["init", typo_url]).contains("created store"));
    assert!(env.ok(&["init", typo_url]).contains("already a store"));
    env.ok(&["--store", typo_url, "import", "vm", source]);

    for malformed in [
        "s3:/isr/x",
        "s3://",
        "s3:///x",
        "ftp://host/x",
        "file:relative",
    ] {
        let error = env.fails(&["--store", malformed, "ls"], 2);
        assert!(error.contains("invalid store URL"), "{malformed}: {error}");
    }

    // S3 without credentials: which variables to set, and no network at all.
    let error = env.fails(&["--store", "s3://bucket/x", "ls"], 2);
    assert!(
        error.contains("AWS_ACCESS_KEY_ID") && error.contains("access_key_id"),
        "{error}"
    );
    assert!(!error.contains("169.254"), "{error}");

    // The default store (no store named anywhere) is created on first use.
    let import_default = env
        .isrctl()
        .env_remove("ISR_STORE")
        .env("XDG_DATA_HOME", env.path("data"))
        .args(["import", "vm", source])
        .output()
        .unwrap();
    assert!(
        import_default.status.success(),
        "{}",
        String::from_utf8_lossy(&import_default.stderr)
    );
    assert!(env.path("data/isr/store/parcels/vm/parcel.toml").exists());
}

#[test]
fn s3_stores_need_init_and_init_checks_the_bucket() {
    let server = SeaweedFs::start();
    let env = Env::s3(&server, "operator");
    let source = env.import_files("vm", &[("disk.img", b"on s3".to_vec())]);
    let typo = server.store_url("operatr");
    let error = env.fails(&["--store", &typo, "ls"], 4);
    assert!(error.contains("isrctl init"), "{error}");
    env.ok(&["init", &typo]);
    env.ok(&["--store", &typo, "import", "vm", source.to_str().unwrap()]);
    assert!(env.ok(&["--store", &typo, "ls"]).contains("vm"));
    // A bucket that does not exist is no store.
    env.run(&["init", "s3://no-such-bucket/x"])
        .status
        .success()
        .then(|| panic!("init of a missing bucket succeeded"));
}

#[test]
fn delete_removes_a_parcel_but_not_a_locked_one() {
    Env::require_fuse();
    let env = Env::local();
    env.import_files("vm", &[("disk.img", support::random_bytes("del", 300_000))]);
    let chunks = walkdir(Path::new(&env.store).join("chunks").as_path());
    assert!(chunks > 0);

    env.fails(&["delete", "vm"], 2);
    env.json(&["resume", "vm"]);
    let holder = lock_holder(&env, "vm");
    let refused = env.fails(&["delete", "--yes", "vm"], 5);
    assert!(refused.contains(&holder), "{refused}");
    env.ok(&["discard", "vm"]);
    env.ok(&["delete", "--yes", "vm"]);
    let parcel_dir = Path::new(&env.store).join("parcels/vm");
    assert!(!parcel_dir.exists() || walkdir(&parcel_dir) == 0);
    assert!(env.ok(&["ls"]).contains("no parcels"));
    assert_eq!(
        walkdir(Path::new(&env.store).join("chunks").as_path()),
        chunks,
        "chunks are left for gc"
    );
    env.fails(&["delete", "--yes", "vm"], 4);

    // A parcel left without a version by an old interrupted import is deletable.
    let (runtime, store, _) = {
        let config = isr::config::Config::load(Some(&env.config)).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = isr::store::open(&env.store, &config.s3, support::quick_retry()).unwrap();
        (runtime, store, config)
    };
    runtime
        .block_on(isr::parcel::create(
            &store,
            "empty",
            65536,
            isr::keys::ParcelSecrets::generate(None),
            &[],
            isr::keys::KdfParams::default(),
        ))
        .unwrap();
    assert!(env.ok(&["ls"]).contains("empty"));
    env.ok(&["delete", "--yes", "empty"]);
    assert!(env.ok(&["ls"]).contains("no parcels"));
}

fn walkdir(dir: &Path) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            count += walkdir(&entry.path());
        } else {
            count += 1;
        }
    }
    count
}

#[test]
fn a_checkin_is_not_replayed_once_the_parcel_moved_on() {
    Env::require_fuse();
    let env = Env::local();
    env.import_files(
        "vm",
        &[("disk.img", support::random_bytes("replay", 100_000))],
    );
    env.json(&["resume", "vm"]);
    let first = env.json(&["checkin", "vm"]);
    assert_eq!(first["version"], 1);
    // A rerun of that checkin (as if the first run was cut short) answers.
    let again = env.json(&["checkin", "vm"]);
    assert_eq!(again["already_done"], true);
    env.ok(&["rollback", "vm", "1"]);
    let error = env.fails(&["checkin", "vm"], 4);
    assert!(error.contains("not resumed"), "{error}");
    env.fails(&["--json", "checkin", "vm"], 4);
}
