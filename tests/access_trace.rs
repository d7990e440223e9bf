//! The access trace: a session records the order in which it first read
//! chunks, checkin stores it (encrypted) beside the version, and the next
//! resume prefetches in that order. Measured here on a store that answers
//! every request after 20 ms: how long a replayed workload takes with and
//! without the trace (printed, not asserted: timings are the harness's job).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use isr::cache::ChunkCache;
use isr::fetch::FetchSettings;
use isr::image::ImageOptions;
use isr::layout;
use isr::session::{Session, SessionContext};
use isr::store::StoreHandle;
use isr::store::faulty::FaultyStore;
use isr::store::memory::MemoryStore;

const CHUNK: u64 = 128 * 1024;
const CHUNKS: u64 = 256; // a 32 MiB disk

fn context(
    root: &std::path::Path,
    runtime: &tokio::runtime::Runtime,
    prefetch: bool,
) -> SessionContext {
    SessionContext {
        state_dir: root.join("state"),
        cache: Arc::new(ChunkCache::open(&root.join("cache"), 1 << 30).unwrap()),
        runtime: runtime.handle().clone(),
        fetch: FetchSettings {
            parallel: 4,
            reserved_for_demand: 1,
            ..FetchSettings::default()
        },
        image: ImageOptions::default(),
        prefetch,
        upload: Default::default(),
    }
}

/// The workload: 48 chunks in a scattered order, with a little "compute"
/// between reads, as an application start would.
fn workload() -> Vec<u64> {
    let mut state = 0x7ace_u64;
    let mut order = Vec::new();
    while order.len() < 48 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let index = state % CHUNKS;
        if !order.contains(&index) {
            order.push(index);
        }
    }
    order
}

fn replay(session: &Session, data: &[u8]) -> Duration {
    let disk = session.image.resolve("disk.img").unwrap().id;
    let started = Instant::now();
    for index in workload() {
        let read = session.image.read(disk, index * CHUNK, 4096).unwrap();
        assert_eq!(read, data[(index * CHUNK) as usize..][..4096]);
        std::thread::sleep(Duration::from_millis(5));
    }
    started.elapsed()
}

#[test]
fn the_trace_is_stored_with_the_version_and_replayed_first() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = support::random_bytes("trace", (CHUNKS * CHUNK) as usize);
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("src/disk.img"), &data).unwrap();
    let memory = MemoryStore::new();
    let credentials = support::import_with_library(
        &runtime,
        &StoreHandle::full(memory.clone()),
        "vm",
        &dir.path().join("src"),
        CHUNK as u32,
    );
    let slow = FaultyStore::new(memory.clone());
    slow.set_latency(Duration::from_millis(20));
    let store = StoreHandle::full(slow);
    let parcel = runtime
        .block_on(isr::parcel::open(&store, "vm", &credentials))
        .unwrap();
    let base = runtime
        .block_on(isr::parcel::read_manifest(&store, &parcel, 1))
        .unwrap();
    let (_, _, chunks) = base.files().next().unwrap();
    let expected: Vec<_> = workload()
        .iter()
        .map(|&i| chunks[i as usize].tag().unwrap())
        .collect();

    // Machine A: run the workload (no prefetch, so only it reads), check in.
    let a = dir.path().join("a");
    let session = runtime
        .block_on(Session::resume(
            store.clone(),
            parcel.clone(),
            None,
            a.join("mnt"),
            context(&a, &runtime, false),
        ))
        .unwrap();
    let cold_demand = replay(&session, &data);
    let report = runtime.block_on(session.checkin("", None)).unwrap();
    runtime.block_on(session.finish_checkin(false)).unwrap();
    assert!(!report.committed, "nothing was written: {report:?}");
    let trace = runtime
        .block_on(isr::session::read_trace(&store, &parcel, 1))
        .unwrap()
        .expect("checkin stored the trace beside version 1");
    assert_eq!(trace, expected, "the trace is the order of first reads");

    // Machines B and C resume version 1 cold, with prefetch: B with the
    // trace, C after the trace object is deleted.
    let mut timings = Vec::new();
    for (machine, keep_trace) in [("b", true), ("c", false)] {
        if !keep_trace {
            runtime
                .block_on(
                    store
                        .writer("test")
                        .unwrap()
                        .delete(&layout::trace("vm", 1)),
                )
                .unwrap();
        }
        let root = dir.path().join(machine);
        let session = runtime
            .block_on(Session::resume(
                store.clone(),
                parcel.clone(),
                None,
                root.join("mnt"),
                context(&root, &runtime, true),
            ))
            .unwrap();
        timings.push(replay(&session, &data));
        runtime.block_on(session.discard()).unwrap();
    }
    println!(
        "replay of 48 scattered 4 KiB reads (5 ms apart) over a 20 ms store: \
         demand only {cold_demand:?}; prefetch with trace {:?}; prefetch without trace {:?}",
        timings[0], timings[1]
    );
}
