//! Adds two versions of a big image to an existing parcel, for
//! benches/resume-tree.sh: the same manifest (IMAGE_GIB of distinct chunks)
//! committed in format 2 (root and segments) and then written whole in
//! format 1. The chunks themselves are not stored: the bench measures how
//! long a resume takes to mount, which reads manifests only.
//!
//!   ISR_STORE=… ISR_CONFIG=… ISR_PASSPHRASE=… \
//!     cargo run --release --example tree_version PARCEL [IMAGE_GIB]
//!
//! Prints `TREE_VERSION ROOT_BYTES WHOLE_VERSION WHOLE_BYTES`.

use bytes::Bytes;
use isr::chunk::{ChunkKey, ChunkRef, ChunkTag};
use isr::keys::{Credential, Zeroizing};
use isr::manifest::{Entry, EntryKind, Manifest, Timestamp};
use isr::{layout, parcel};

fn chunk(n: u64) -> ChunkRef {
    let hash = blake3::hash(&n.to_le_bytes());
    ChunkRef::Stored {
        tag: ChunkTag(*hash.as_bytes()),
        key: ChunkKey::from_bytes(*blake3::hash(hash.as_bytes()).as_bytes()),
        stored_len: 100_000,
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args
        .first()
        .expect("usage: tree_version PARCEL [IMAGE_GIB]");
    let gib: u64 = args.get(1).map_or(100, |a| a.parse().expect("IMAGE_GIB"));
    let env = |key: &str| std::env::var(key).unwrap_or_else(|_| panic!("{key} must be set"));
    let config = isr::config::Config::load(Some(env("ISR_CONFIG").as_ref())).unwrap();
    let store =
        isr::store::open(&env("ISR_STORE"), &config.s3, Default::default()).expect("the store");
    let credentials = [Credential::Passphrase(Zeroizing::new(env(
        "ISR_PASSPHRASE",
    )))];
    let parcel = parcel::open(&store, name, &credentials).await.unwrap();
    let newest = parcel::resolve_version(&store, name, None).await.unwrap();
    let chunk_size = parcel.record.chunk_size;
    let count = gib * (1 << 30) / u64::from(chunk_size);
    let mut manifest = Manifest {
        version: newest + 1,
        parent: Some(newest),
        created: Timestamp::now(),
        lock_nonce: None,
        host: "bench".into(),
        message: format!("{gib} GiB of distinct chunks (not stored)"),
        chunk_size,
        entries: vec![Entry {
            path: "disk.img".into(),
            mode: 0o600,
            mtime: Timestamp::default(),
            kind: EntryKind::File {
                size: count * u64::from(chunk_size),
                chunks: (0..count).map(chunk).collect(),
            },
        }],
    };
    parcel::commit(&store, &parcel, &manifest).await.unwrap();
    let size = |version| {
        let (store, name) = (&store, name);
        async move {
            let key = layout::manifest(name, version);
            store.reader().get(&key).await.unwrap().len()
        }
    };
    let root = size(newest + 1).await;

    manifest.version = newest + 2;
    manifest.parent = Some(newest + 1);
    let whole = manifest
        .seal(&parcel.secrets.parcel_key, &parcel.id)
        .unwrap();
    let whole_len = whole.len();
    store
        .writer("bench")
        .unwrap()
        .put_new(&layout::manifest(name, newest + 2), Bytes::from(whole))
        .await
        .unwrap();
    println!("{} {root} {} {whole_len}", newest + 1, newest + 2);
}
