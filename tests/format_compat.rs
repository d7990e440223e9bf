//! Backward compatibility: a store written by format version 1
//! (`tests/fixtures/v1`, made by `make-v1-fixture.sh` and never regenerated)
//! must keep opening, exporting and verifying, so a later format change cannot
//! silently break old parcels.

mod support;

use std::path::{Path, PathBuf};

use isr::keys::{Credential, Zeroizing};
use isr::manifest::{EntryKind, Timestamp};
use isr::parcel;
use isr::store;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

#[tokio::test]
async fn v1_manifests_and_keyslots_still_open() {
    let handle = store::open(
        fixture().join("store").to_str().unwrap(),
        &Default::default(),
        support::quick_retry(),
    )
    .unwrap();
    let passphrase = vec![Credential::Passphrase(Zeroizing::new(
        "isr fixture v1".into(),
    ))];
    let key_file = vec![Credential::from_key_file(&fixture().join("parcel.key")).unwrap()];
    let by_passphrase = parcel::open(&handle, "fixture", &passphrase).await.unwrap();
    let by_key_file = parcel::open(&handle, "fixture", &key_file).await.unwrap();
    assert_eq!(
        by_passphrase.secrets.parcel_key,
        by_key_file.secrets.parcel_key
    );
    assert_eq!(by_passphrase.record.chunk_size, 65536);
    assert_eq!(
        parcel::list_versions(&handle, "fixture").await.unwrap(),
        vec![1, 2]
    );

    let v1 = parcel::read_manifest(&handle, &by_passphrase, 1)
        .await
        .unwrap();
    let v2 = parcel::read_manifest(&handle, &by_passphrase, 2)
        .await
        .unwrap();
    assert_eq!((v1.parent, v1.message.as_str()), (None, "first"));
    assert_eq!((v2.parent, v2.message.as_str()), (Some(1), "second"));
    assert_eq!(v1.entries, v2.entries, "same tree, same chunks");
    let summary: Vec<(&str, u32, Option<u64>)> = v1
        .entries
        .iter()
        .map(|e| {
            let size = match &e.kind {
                EntryKind::File { size, .. } => Some(*size),
                EntryKind::Directory => None,
            };
            (e.path.as_str(), e.mode, size)
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("disk.img", 0o600, Some(300_000)),
            ("sub", 0o750, None),
            ("sub/empty", 0o644, Some(0)),
            ("sub/notes.txt", 0o640, Some(1400)),
            ("vm.toml", 0o644, Some(21)),
        ]
    );
    assert!(v1.entries.iter().all(|e| e.mtime
        == Timestamp {
            secs: 1_700_000_000,
            nanos: 0
        }));
    let EntryKind::File { chunks, .. } = &v1.entries[0].kind else {
        panic!("disk.img is a file")
    };
    assert_eq!(chunks.len(), 5);
    assert!(
        matches!(chunks[2], isr::chunk::ChunkRef::Zero),
        "the hole is a zero chunk"
    );
}

#[test]
fn v1_store_exports_and_verifies_with_todays_isrctl() {
    let env = support::Env::local();
    // Work on a copy: nothing may write into the committed fixture. Not the
    // env's own store (`init` made it): a v1 store has no store marker, and
    // must still count as a store.
    let copy = env.path("v1-store");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(fixture().join("store"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    for version in ["fixture@1", "fixture@2"] {
        let run = |args: &[&str]| {
            let output = env
                .isrctl()
                .env("ISR_STORE", &copy)
                .env("ISR_PASSPHRASE", "isr fixture v1")
                .args(args)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let out = env.path(&format!("out-{version}"));
        run(&["export", version, out.to_str().unwrap()]);
        run(&["verify", "--deep", version]);
        assert_eq!(
            support::tree_hashes(&fixture().join("expected")),
            support::tree_hashes(&out)
        );
    }
}
