//! A resumed session over a slow store (every request delayed by the
//! fault-injecting wrapper): a read of a missing chunk blocks until that chunk
//! arrives and returns the right bytes, and prefetch keeps running meanwhile.

mod support;

use std::sync::Arc;
use std::time::Duration;

use isr::cache::ChunkCache;
use isr::fetch::FetchSettings;
use isr::image::ImageOptions;
use isr::session::{Session, SessionContext};
use isr::store::StoreHandle;
use isr::store::faulty::FaultyStore;
use isr::store::memory::MemoryStore;

#[test]
fn a_missing_chunk_read_blocks_then_returns_the_right_bytes_while_prefetch_runs() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = support::random_bytes("slow", 64 * 128 * 1024);
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("src/disk.img"), &data).unwrap();

    let memory = MemoryStore::new();
    let credentials = support::import_with_library(
        &runtime,
        &StoreHandle::full(memory.clone()),
        "vm",
        &dir.path().join("src"),
        128 * 1024,
    );

    // The session sees the same objects through a store answering in 100 ms.
    let slow = FaultyStore::new(memory);
    slow.set_latency(Duration::from_millis(100));
    let store = StoreHandle::full(slow);
    let parcel = runtime
        .block_on(isr::parcel::open(&store, "vm", &credentials))
        .unwrap();
    let context = SessionContext {
        state_dir: dir.path().join("state"),
        cache: Arc::new(ChunkCache::open(&dir.path().join("cache"), 1 << 30).unwrap()),
        runtime: runtime.handle().clone(),
        fetch: FetchSettings {
            parallel: 4,
            reserved_for_demand: 1,
            ..FetchSettings::default()
        },
        image: ImageOptions::default(),
        prefetch: true,
        upload: Default::default(),
    };
    let session = runtime
        .block_on(Session::resume(
            store,
            parcel,
            None,
            dir.path().join("mnt"),
            context,
        ))
        .unwrap();

    // Read the last chunk: the sequential prefetch would reach it last.
    let offset = 63 * 128 * 1024;
    let image = session.image.clone();
    let disk = image.resolve("disk.img").unwrap().id;
    let read = image.read(disk, offset, 128 * 1024).unwrap();
    assert_eq!(read, data[offset as usize..]);
    let status = session.status();
    assert!(status.fetch.fetched_chunks >= 1);
    assert!(
        status.fetch.fetched_chunks + status.fetch.in_flight > 1,
        "prefetch was running alongside the demand read: {status:?}"
    );
    assert!(
        status.chunks_local < status.chunks_total,
        "the demand read did not wait for the whole prefetch"
    );
    runtime.block_on(session.discard()).unwrap();
}
