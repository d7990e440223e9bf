//! Writes the seed files that the library's own encoders make, under the
//! fixture's keys (`tests/fixtures/v1`), into `fuzz/corpus/<target>/`:
//! plaintexts behind AEAD tags (manifest bodies, trace bodies, opened chunks),
//! objects sealed with the key the targets open them with (a trace, a cheap
//! passphrase keyslot, a manifest with a zero run), and control-protocol lines
//! of real `Request`/`Response` values. The real store objects beside them are
//! copied by `fuzz/make-seeds.sh`, which runs this too:
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```
//!
//! Deterministic except for the random nonces and salts `seal` functions draw.

use std::path::{Path, PathBuf};

use isr::chunk::{ChunkEncoder, ChunkRef, ChunkTag, EncodedChunk};
use isr::control::{self, Reopen, Request, Response, WireParcel, WireStore};
use isr::error::ErrorClass;
use isr::keys::{self, Credential, KdfParams, Zeroizing};
use isr::manifest::{Entry, EntryKind, Manifest, Timestamp};
use isr::parcel::{LockRecord, OpenParcel};
use isr::store::{RetrySettings, S3Settings};
use isr::trace;
use isr_fuzz::{FIXTURE_MANIFESTS, FIXTURE_SLOTS, fixture, open_chunk};

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    assert!(
        data.len() < 64 * 1024,
        "{target}/{name}: seeds stay under 64 KiB"
    );
    std::fs::write(dir.join(name), data).expect("write seed");
    println!("{target}/{name} ({} bytes)", data.len());
}

fn line(body: impl serde::Serialize) -> Vec<u8> {
    let mut out = Vec::new();
    control::send(&mut out, body).expect("serialise");
    out
}

fn main() {
    let fixture = fixture();

    // Manifests: the fixture's bodies, and a version 3 with a directory, a
    // zero run and shared chunks, sealed under the fixture key.
    for (i, manifest) in fixture.manifests.iter().enumerate() {
        let body = manifest.encode_body().expect("encode");
        write("manifest_body", &format!("fixture-v{}.body", i + 1), &body);
        write(
            "manifest_open",
            &format!("fixture-v{}.manifest", i + 1),
            FIXTURE_MANIFESTS[i],
        );
    }
    let mut encoder = ChunkEncoder::new(fixture.secrets.dedup_secret.clone(), 3).expect("zstd");
    let chunk_size = fixture.record.chunk_size as usize;
    let text: Vec<u8> = (0..chunk_size)
        .map(|i| b"isr fuzz seed\n"[i % 14])
        .collect();
    let random: Vec<u8> = (0..chunk_size as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut stored_chunks = Vec::new();
    let mut refs = Vec::new();
    for plaintext in [
        &text[..],
        &random[..],
        &text[..1000],
        &vec![0u8; chunk_size][..],
    ] {
        let encoded = encoder.encode(plaintext);
        refs.push(encoded.chunk_ref());
        if let EncodedChunk::Stored { stored, .. } = encoded {
            stored_chunks.push(stored);
        }
    }
    let size = 3 * chunk_size as u64 + 1000;
    let manifest = Manifest {
        version: 3,
        parent: Some(2),
        created: Timestamp {
            secs: 1_800_000_000,
            nanos: 5,
        },
        lock_nonce: Some([7; 16]),
        host: "seed-host".into(),
        message: "seeds: a zero chunk, a directory, a shared chunk".into(),
        chunk_size: fixture.record.chunk_size,
        entries: vec![
            Entry {
                path: "a".into(),
                mode: 0o755,
                mtime: Timestamp {
                    secs: 1_700_000_000,
                    nanos: 0,
                },
                kind: EntryKind::Directory,
            },
            Entry {
                path: "a/disk.img".into(),
                mode: 0o600,
                mtime: Timestamp {
                    secs: -5,
                    nanos: 999_999_999,
                },
                kind: EntryKind::File {
                    size,
                    chunks: vec![
                        refs[0].clone(),
                        ChunkRef::Zero,
                        refs[1].clone(),
                        refs[2].clone(),
                    ],
                },
            },
            Entry {
                path: "b".into(),
                mode: 0o644,
                mtime: Timestamp::default(),
                kind: EntryKind::File {
                    size: 2 * chunk_size as u64,
                    chunks: vec![ChunkRef::Zero, refs[0].clone()],
                },
            },
            Entry {
                path: "empty".into(),
                mode: 0,
                mtime: Timestamp::default(),
                kind: EntryKind::File {
                    size: 0,
                    chunks: vec![],
                },
            },
        ],
    };
    manifest.validate().expect("seed manifest is valid");
    write(
        "manifest_body",
        "made-v3.body",
        &manifest.encode_body().expect("encode"),
    );
    let sealed = manifest
        .seal(&fixture.secrets.parcel_key, &fixture.id)
        .expect("seal");
    write("manifest_open", "made-v3.manifest", &sealed);
    // Format 2: its root body, and each segment's plaintext after the chunk
    // count its place gives (manifest_segment's input).
    let split = isr::manifest::tree::split(&manifest, 2, &mut encoder).expect("split");
    write("manifest_root", "made-v3.root", &split.root.encode_body());
    for (i, (reference, stored)) in split.encoded.iter().enumerate() {
        let ChunkRef::Stored { tag, key, .. } = reference else {
            unreachable!("segments are stored")
        };
        let plaintext = isr::chunk::decode(
            &fixture.secrets.dedup_secret,
            *tag,
            key,
            bytes::Bytes::from(stored.clone()),
        )
        .expect("a segment decodes");
        let mut seed = plaintext[4..8].to_vec();
        seed.extend_from_slice(&plaintext);
        write("manifest_segment", &format!("made-v3-{i}.segment"), &seed);
    }

    // Chunks: stored bytes (named by their tag) and what is behind the tag
    // (key ‖ header ‖ payload) of the fixture's and the made ones.
    let mut all: Vec<(ChunkTag, Vec<u8>)> = Vec::new();
    let chunks_dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v1/store/chunks");
    for dir in std::fs::read_dir(&chunks_dir).expect("fixture chunks") {
        for file in std::fs::read_dir(dir.expect("entry").path()).expect("chunk dir") {
            let path: PathBuf = file.expect("entry").path();
            let stored = std::fs::read(&path).expect("chunk");
            all.push((ChunkTag::of(&stored), stored));
        }
    }
    all.sort();
    for stored in &stored_chunks {
        all.push((ChunkTag::of(stored), stored.clone()));
    }
    let made_keys: Vec<(ChunkTag, isr::chunk::ChunkKey)> = refs
        .iter()
        .filter_map(|r| match r {
            ChunkRef::Stored { tag, key, .. } => Some((*tag, key.clone())),
            ChunkRef::Zero => None,
        })
        .collect();
    for (tag, stored) in &all {
        let key = fixture
            .chunk_keys
            .get(tag)
            .or_else(|| made_keys.iter().find(|(t, _)| t == tag).map(|(_, k)| k))
            .expect("every seed chunk's key is known");
        let short = &tag.to_hex()[..12];
        if stored.len() < 64 * 1024 {
            write("chunk_stored", short, stored);
        }
        let (header, payload) = open_chunk(key.as_bytes(), stored).expect("seed chunk opens");
        let mut plain = key.as_bytes().to_vec();
        plain.extend_from_slice(&header);
        plain.extend_from_slice(&payload);
        if plain.len() < 64 * 1024 {
            write("chunk_payload", short, &plain);
        }
    }

    // Keyslots: the fixture's, and a passphrase slot cheap enough for the
    // keyslot target's bounded path (so its passphrase opens it).
    write("keyslot", "fixture-0-key-file", FIXTURE_SLOTS[0]);
    write("keyslot", "fixture-1-passphrase", FIXTURE_SLOTS[1]);
    let cheap = KdfParams {
        memory_kib: 8,
        iterations: 1,
        parallelism: 1,
    };
    let passphrase = Credential::Passphrase(Zeroizing::new(isr_fuzz::PASSPHRASE.to_owned()));
    let slot = keys::seal_keyslot(&fixture.secrets, &passphrase, cheap, &fixture.id).expect("seal");
    write("keyslot", "made-cheap-passphrase", &slot);

    // Traces: sealed under the fixture key, and their plaintext bodies.
    let tags: Vec<ChunkTag> = all.iter().map(|(tag, _)| *tag).collect();
    write(
        "trace_open",
        "made-v2.trace",
        &trace::seal(&tags, &fixture.secrets.parcel_key, &fixture.id, 2),
    );
    write(
        "trace_open",
        "made-v1-empty.trace",
        &trace::seal(&[], &fixture.secrets.parcel_key, &fixture.id, 1),
    );
    let mut body = (tags.len() as u32).to_le_bytes().to_vec();
    for tag in &tags {
        body.extend_from_slice(&tag.0);
    }
    write("trace_body", "tags.body", &body);
    write("trace_body", "empty.body", &0u32.to_le_bytes());

    // Lock: one with and one without the optional base version.
    let mut lock = LockRecord {
        holder: "alice".into(),
        host: "laptop".into(),
        nonce: "0123456789abcdef0123456789abcdef".into(),
        since: "2026-11-22T02:36:03Z".into(),
        base_version: None,
    };
    write(
        "lock",
        "made-no-base",
        toml::to_string(&lock).expect("toml").as_bytes(),
    );
    lock.base_version = Some(3);
    write(
        "lock",
        "made-base",
        toml::to_string(&lock).expect("toml").as_bytes(),
    );

    // Version hints: the hint alone, and claims of manifests around it.
    write("version_hints", "hint-only", b"2\n");
    let mut claims = 2u64.to_le_bytes().to_vec();
    claims.extend_from_slice(&5u64.to_le_bytes());
    claims.extend_from_slice(b"2\n");
    write("version_hints", "claims-2-to-7", &claims);

    // Control lines: every request, with the fixture parcel on the wire, and
    // the responses whose fields are plain.
    let parcel = OpenParcel {
        name: isr_fuzz::PARCEL.into(),
        record: fixture.record.clone(),
        id: fixture.id,
        secrets: fixture.secrets.clone(),
    };
    let wire = || Box::new(WireParcel::new(&parcel));
    let store = || WireStore {
        url: "s3://bucket/isr".into(),
        read_url: None,
        s3: S3Settings::default(),
        retry: RetrySettings::default(),
    };
    let reopen = || {
        Some(Box::new(Reopen {
            parcel: *wire(),
            store: store(),
        }))
    };
    let requests = [
        (
            "resume",
            Request::Resume {
                parcel: wire(),
                version: Some(2),
                mount: "/run/isr/mnt/fixture".into(),
                store: store(),
                vmm: None,
            },
        ),
        ("status", Request::Status { parcel: None }),
        (
            "status-one",
            Request::Status {
                parcel: Some("fixture".into()),
            },
        ),
        (
            "hoard",
            Request::Hoard {
                parcel: "fixture".into(),
            },
        ),
        (
            "discard",
            Request::Discard {
                parcel: "fixture".into(),
            },
        ),
        (
            "sync",
            Request::Sync {
                parcel: "fixture".into(),
                message: "before the upgrade".into(),
            },
        ),
        (
            "checkin",
            Request::Checkin {
                parcel: "fixture".into(),
                message: "m".into(),
                wipe: true,
                save_as: Some(wire()),
                reopen: reopen(),
            },
        ),
        (
            "suspend",
            Request::Suspend {
                parcel: "fixture".into(),
                message: String::new(),
                wipe: false,
                reopen: reopen(),
            },
        ),
        ("shutdown", Request::Shutdown),
    ];
    for (name, request) in requests {
        write("control_line", &format!("request-{name}"), &line(request));
    }
    let responses = [
        (
            "resumed",
            Response::Resumed {
                mount: "/run/isr/mnt/fixture".into(),
                reattached: false,
                vm: None,
                warnings: vec!["vm.toml describes no VM".into()],
            },
        ),
        (
            "status",
            Response::Status {
                sessions: vec![],
                resuming: vec![],
            },
        ),
        ("hoarded", Response::Hoarded { chunks: 12 }),
        ("done", Response::Done),
        (
            "error",
            Response::Error {
                class: ErrorClass::Conflict,
                message: "locked".into(),
            },
        ),
    ];
    for (name, response) in responses {
        write("control_line", &format!("response-{name}"), &line(response));
    }
}
