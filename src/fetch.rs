//! The fetch scheduler: brings stored chunks from the store into the local
//! cache, for readers that block on them and for prefetch.
//!
//! - **One download per chunk**, however many readers wait for it: waiters
//!   attach to the chunk's slot and all get the same result.
//! - **Priorities**: demand > boot files > memory image > trace order >
//!   prefetch. Up to `parallel` downloads run at once from the async runtime,
//!   but background priorities may use only `parallel − reserved_for_demand`
//!   of them, so a demand read never queues behind prefetch; a queued chunk a
//!   reader starts waiting for is promoted to that reader's priority.
//! - **A demand read shares the link with as little prefetch as possible**:
//!   the downloads in flight are held near the link's bandwidth-delay product
//!   (while a reader waits, its download counts too) by
//!   [`BackgroundWindow`] (delay-based, as TCP Vegas: it grows while downloads
//!   take no longer than the fastest one seen, and shrinks once they show more
//!   than a chunk and a half queued on the link). More in flight than that adds no
//!   throughput, only queueing in front of the next demand read.
//! - **Retries**: transient store failures are retried with backoff while the
//!   waiters keep waiting, until `give_up_after`; then every waiter gets an
//!   error (EIO at the FUSE edge) and the failure is counted.
//! - **Verification**: fetched bytes are checked against their tag before they
//!   enter the cache; bytes that fail are never served and are counted; the
//!   chunk is then fetched once more from the store itself, past any cache
//!   tier (a damaged or stale copy at a read URL,
//!   [`crate::store::ReadStore::get_uncached`]); if that copy fails too the
//!   readers get an error and the next reader fetches it again.
//! - **Missing chunks**: a chunk the store keeps answering "not found" for
//!   over `missing_after` is missing; it is remembered for `remember_missing`
//!   (5 minutes), during which its readers get the error at once and
//!   prefetch skips it (`missing_chunks` in the stats).
//!
//! Readers on FUSE threads use [`Fetcher::plaintext_blocking`] (a chunk's
//! verified plaintext; a damaged cached copy is dropped and fetched again) or
//! [`Fetcher::fetch_blocking`] (its stored bytes): they wait on a channel while
//! the network I/O runs on the runtime, never on their thread.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};

use crate::cache::{CacheError, ChunkCache, Durability};
use crate::chunk::{self, ChunkError, ChunkKey, ChunkTag};
use crate::error::{Classify, ErrorClass};
use crate::keys::DedupSecret;
use crate::layout;
use crate::store::{ReadStore, StoreError};

/// How urgently a chunk is wanted (lower value first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[repr(u8)]
pub enum Priority {
    /// A reader is blocked on it.
    Demand = 0,
    /// A file the VMM reads whole as it starts, before it loads the memory
    /// image (a kernel and initrd for direct boot, firmware).
    Boot = 1,
    /// Lazy memory's working set: the RAM chunks the guest touched first
    /// after its last resume, in that order.
    WorkingSet = 2,
    /// Part of a memory image the VMM will read whole before the guest runs
    /// (or, in lazy mode, the rest of the RAM file).
    Memory = 3,
    /// In the access trace of the previous session.
    Trace = 4,
    /// Sequential background prefetch / hoard.
    Prefetch = 5,
}

const PRIORITIES: [Priority; 6] = [
    Priority::Demand,
    Priority::Boot,
    Priority::WorkingSet,
    Priority::Memory,
    Priority::Trace,
    Priority::Prefetch,
];

/// Scheduler settings (`[fetch]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchSettings {
    /// Downloads in flight at most.
    pub parallel: usize,
    /// Of those, how many only demand reads may use.
    pub reserved_for_demand: usize,
    /// How long a failing chunk is retried before its readers get an error.
    pub give_up_after: Duration,
    /// First retry delay; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// How long a chunk a manifest references may answer "not found" (or
    /// another error of the store's own) before its readers are told (a store
    /// that is restarting, or an eventually consistent one, says so for a while).
    pub missing_after: Duration,
    /// How long a chunk found missing is remembered as missing: its readers
    /// get the error at once instead of waiting out `missing_after` again.
    pub remember_missing: Duration,
}

impl Default for FetchSettings {
    fn default() -> Self {
        FetchSettings {
            parallel: 16,
            reserved_for_demand: 4,
            give_up_after: Duration::from_secs(300),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            missing_after: Duration::from_secs(15),
            remember_missing: Duration::from_secs(300),
        }
    }
}

/// Why a chunk could not be fetched. Cloned to every waiter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The store has no such chunk.
    #[error("chunk {tag} is missing from the store")]
    Missing {
        /// Chunk.
        tag: ChunkTag,
    },
    /// The store returned bytes that are not the chunk.
    #[error("{0}")]
    Corrupt(Arc<ChunkError>),
    /// The store kept failing until the retry limit.
    #[error("chunk {tag}: {source}")]
    Store {
        /// Chunk.
        tag: ChunkTag,
        /// The last store error (shared: every waiter gets a clone).
        source: Arc<StoreError>,
    },
    /// The local cache failed.
    #[error("chunk {tag}: local cache: {source}")]
    Cache {
        /// Chunk.
        tag: ChunkTag,
        /// What failed.
        source: Arc<CacheError>,
    },
    /// Putting a downloaded chunk into the local cache did not finish (the
    /// blocking task panicked or the runtime is shutting down).
    #[error("chunk {tag}: local cache: {source}")]
    CacheTask {
        /// Chunk.
        tag: ChunkTag,
        /// Why the task did not finish.
        source: Arc<tokio::task::JoinError>,
    },
    /// The scheduler is shutting down.
    #[error("chunk {tag}: fetcher stopped")]
    Stopped {
        /// Chunk.
        tag: ChunkTag,
    },
}

impl Classify for FetchError {
    fn class(&self) -> ErrorClass {
        match self {
            // A chunk a version references is gone or damaged: the store is.
            FetchError::Missing { .. } => ErrorClass::Integrity,
            FetchError::Corrupt(e) => e.class(),
            // Retries ran out, whatever the last answer was.
            FetchError::Store { .. } => ErrorClass::Unreachable,
            FetchError::Cache { source, .. } => source.class(),
            FetchError::CacheTask { .. } | FetchError::Stopped { .. } => ErrorClass::Other,
        }
    }
}

/// A snapshot of the scheduler's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FetchStats {
    /// Chunks downloaded and cached.
    pub fetched_chunks: u64,
    /// When the first of them arrived, milliseconds since the Unix epoch
    /// (a resume's first progress, in the web UI's timeline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_fetch_ms: Option<u64>,
    /// Stored bytes downloaded.
    pub fetched_bytes: u64,
    /// Downloads running now.
    pub in_flight: u64,
    /// Chunks waiting for a download slot.
    pub queued: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Chunks given up on (readers got an error).
    pub failures: u64,
    /// Downloaded copies whose bytes failed verification (a copy from a
    /// cache tier that failed, and the store's own copy fetched after it,
    /// count one each).
    pub verify_failures: u64,
    /// Requests answered from the cache without a download.
    pub cache_hits: u64,
    /// Chunks the store confirmed missing lately: reads of them fail at
    /// once (for `remember_missing`) instead of waiting for the store again.
    #[serde(default)]
    pub missing_chunks: u64,
    /// Segments of the base version's manifest downloaded (counted here,
    /// not in `fetched_chunks` or `cache_hits`: see [`Fetcher::count_as_manifest`]).
    #[serde(default)]
    pub manifest_segments: u64,
    /// Their stored bytes.
    #[serde(default)]
    pub manifest_bytes: u64,
}

type Waiter = oneshot::Sender<Result<Bytes, FetchError>>;

#[derive(Debug)]
struct Slot {
    priority: Priority,
    running: bool,
    waiters: Vec<Waiter>,
}

#[derive(Debug, Default)]
struct State {
    slots: HashMap<ChunkTag, Slot>,
    /// Per priority, chunks in arrival order; stale entries (started, or
    /// promoted to a higher queue) are skipped when popped.
    queues: [VecDeque<ChunkTag>; 6],
    running: usize,
    window: BackgroundWindow,
    stopped: bool,
    /// Chunks the store confirmed missing, and when: each is answered
    /// [`FetchError::Missing`] at once for `remember_missing`.
    missing: HashMap<ChunkTag, Instant>,
}

impl State {
    /// Whether `tag` was confirmed missing lately (forgets it afterwards).
    fn known_missing(&mut self, tag: &ChunkTag, remember: Duration) -> bool {
        match self.missing.get(tag) {
            Some(since) if since.elapsed() < remember => true,
            Some(_) => {
                self.missing.remove(tag);
                false
            }
            None => false,
        }
    }
}

/// How many background downloads may run at once: a delay-based estimate of
/// the link's bandwidth-delay product in chunks (TCP Vegas applied to whole
/// downloads).
///
/// `base` is the fastest download seen of a chunk of about that size, the
/// link's round trip plus that chunk's transfer with nothing queued. After
/// each round (as many completed downloads as the limit), the download of the
/// round closest to its base says how many chunks were queued on the link:
/// `limit × (1 − base ÷ took)`.
/// Fewer than half a chunk: the link may have room, so one more may run;
/// more than one and a half: they only wait on each other (and delay the next
/// demand read), so one fewer. (With 1 and 2, as Vegas has it, a demand read
/// on `wan` waited 55 ms at the median; with ½ and 1½, 49 ms, for the same
/// cold sequential throughput.) The limit stays within `[min(2, max), max]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BackgroundWindow {
    limit: usize,
    max: usize,
    /// The fastest download seen, per size class (stored size rounded down
    /// to a power of two): chunks compress to very different sizes, and a
    /// 5 KiB chunk alone is faster than a 128 KiB one alone.
    base: [Option<Duration>; SIZE_CLASSES],
    /// Over the round so far, the largest `base ÷ took` of a download.
    round_best: f64,
    round_left: usize,
}

/// Size classes of [`BackgroundWindow`]: up to 2^(SIZE_CLASSES − 1) bytes.
const SIZE_CLASSES: usize = 25;

impl Default for BackgroundWindow {
    fn default() -> Self {
        BackgroundWindow::new(1)
    }
}

impl BackgroundWindow {
    /// Queued chunks below which the window grows.
    const GROW_BELOW: f64 = 0.5;
    /// Queued chunks above which the window shrinks.
    const SHRINK_ABOVE: f64 = 1.5;

    /// A window of at most `max` downloads, starting small.
    pub fn new(max: usize) -> BackgroundWindow {
        let limit = max.min(2);
        BackgroundWindow {
            limit,
            max,
            base: [None; SIZE_CLASSES],
            round_best: 0.0,
            round_left: limit.max(1),
        }
    }

    /// Background downloads allowed in flight now.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes the duration of one download of `bytes` stored bytes that
    /// succeeded at its first attempt.
    pub fn completed(&mut self, took: Duration, bytes: usize) {
        let class = (usize::BITS - bytes.max(1).leading_zeros()) as usize - 1;
        let base = &mut self.base[class.min(SIZE_CLASSES - 1)];
        let fastest = base.map_or(took, |b| b.min(took));
        *base = Some(fastest);
        let closeness = if took.is_zero() {
            1.0
        } else {
            fastest.as_secs_f64() / took.as_secs_f64()
        };
        self.round_best = self.round_best.max(closeness);
        self.round_left = self.round_left.saturating_sub(1);
        if self.round_left > 0 {
            return;
        }
        let queued = self.limit as f64 * (1.0 - self.round_best);
        self.round_best = 0.0;
        let floor = self.max.min(2);
        if queued < Self::GROW_BELOW {
            self.limit = (self.limit + 1).min(self.max);
        } else if queued > Self::SHRINK_ABOVE {
            self.limit = self.limit.saturating_sub(1).max(floor);
        }
        self.round_left = self.limit.max(1);
    }
}

#[derive(Debug, Default)]
struct Counters {
    fetched_chunks: AtomicU64,
    /// [`FetchStats::first_fetch_ms`]; 0 until the first chunk arrives.
    first_fetch_ms: AtomicU64,
    fetched_bytes: AtomicU64,
    retries: AtomicU64,
    failures: AtomicU64,
    verify_failures: AtomicU64,
    cache_hits: AtomicU64,
    manifest_segments: AtomicU64,
    manifest_bytes: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn ReadStore>,
    cache: Arc<ChunkCache>,
    settings: FetchSettings,
    state: Mutex<State>,
    wake: Notify,
    counters: Counters,
    /// Tags counted as manifest segments, not file chunks.
    manifest_tags: std::sync::RwLock<std::collections::HashSet<ChunkTag>>,
    runtime: tokio::runtime::Handle,
}

impl Inner {
    fn is_manifest(&self, tag: &ChunkTag) -> bool {
        self.manifest_tags
            .read()
            .expect("manifest tags lock")
            .contains(tag)
    }
}

/// The scheduler. Cheap to clone; stops when [`Fetcher::stop`] is called.
#[derive(Debug, Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

impl Fetcher {
    /// Starts a scheduler on `runtime` that fetches from `store` into `cache`.
    pub fn start(
        store: Arc<dyn ReadStore>,
        cache: Arc<ChunkCache>,
        settings: FetchSettings,
        runtime: tokio::runtime::Handle,
    ) -> Fetcher {
        let settings = FetchSettings {
            parallel: settings.parallel.max(1),
            reserved_for_demand: settings
                .reserved_for_demand
                .min(settings.parallel.max(1) - 1),
            ..settings
        };
        let state = State {
            window: BackgroundWindow::new(settings.parallel - settings.reserved_for_demand),
            ..State::default()
        };
        let inner = Arc::new(Inner {
            store,
            cache,
            settings,
            state: Mutex::new(state),
            wake: Notify::new(),
            counters: Counters::default(),
            manifest_tags: Default::default(),
            runtime: runtime.clone(),
        });
        runtime.spawn(dispatch(inner.clone()));
        Fetcher { inner }
    }

    /// Counts downloads of `tags` (a base version's manifest segments, which
    /// are stored as chunks) apart from file chunks, so the chunk counters
    /// say what the files needed.
    pub fn count_as_manifest(&self, tags: impl IntoIterator<Item = ChunkTag>) {
        self.inner
            .manifest_tags
            .write()
            .expect("manifest tags lock")
            .extend(tags);
    }

    /// The chunk's stored bytes (verified), from the cache or, if absent, from
    /// the store; waits as long as the download takes.
    pub async fn fetch(&self, tag: ChunkTag, priority: Priority) -> Result<Bytes, FetchError> {
        match self.request(tag, priority, CacheRead::Verified)? {
            Request::Ready(bytes) => Ok(bytes),
            Request::Wait(receiver) => receiver.await.unwrap_or(Err(FetchError::Stopped { tag })),
        }
    }

    /// [`Fetcher::fetch`] for threads outside the async runtime (FUSE threads).
    pub fn fetch_blocking(&self, tag: ChunkTag, priority: Priority) -> Result<Bytes, FetchError> {
        self.fetch_blocking_from(tag, priority, CacheRead::Verified)
            .map(|(bytes, _)| bytes)
    }

    /// The chunk's plaintext, verified, for threads outside the async
    /// runtime (FUSE threads): `key` is the chunk's key from the manifest or
    /// overlay, `secret` the parcel's dedup secret.
    ///
    /// A cached copy was checked against its tag when it entered the cache,
    /// so it is only decrypted here (the AEAD check under `key` finds any
    /// damage since, or another chunk's bytes). A copy that fails is dropped
    /// from the cache and the chunk is fetched again, with every check: tag,
    /// AEAD, and the plaintext against its convergent key. Bytes downloaded
    /// now get those checks at once.
    pub fn plaintext_blocking(
        &self,
        tag: ChunkTag,
        key: &ChunkKey,
        secret: &DedupSecret,
        priority: Priority,
    ) -> Result<Bytes, FetchError> {
        let decode = |stored| {
            chunk::decode_verified(secret, tag, key, stored)
                .map_err(|e| FetchError::Corrupt(Arc::new(e)))
        };
        match self.fetch_blocking_from(tag, priority, CacheRead::ToDecrypt)? {
            (stored, Origin::Cache) => match chunk::decrypt_cached(tag, key, stored) {
                Ok(plaintext) => Ok(plaintext),
                Err(_) => {
                    self.drop_damaged(tag)?;
                    decode(self.fetch_blocking(tag, priority)?)
                }
            },
            (stored, Origin::Store) => decode(stored),
        }
    }

    fn fetch_blocking_from(
        &self,
        tag: ChunkTag,
        priority: Priority,
        read: CacheRead,
    ) -> Result<(Bytes, Origin), FetchError> {
        match self.request(tag, priority, read)? {
            Request::Ready(bytes) => Ok((bytes, Origin::Cache)),
            Request::Wait(receiver) => receiver
                .blocking_recv()
                .unwrap_or(Err(FetchError::Stopped { tag }))
                .map(|bytes| (bytes, Origin::Store)),
        }
    }

    /// Starts reading the cached ones of `tags` from the disk in the background
    /// (a reader about to read several chunks in a row).
    pub fn advise_will_need(&self, tags: impl IntoIterator<Item = ChunkTag>) {
        self.inner.cache.advise_will_need(tags);
    }

    /// Drops a cached copy whose decryption failed, so it is fetched again.
    fn drop_damaged(&self, tag: ChunkTag) -> Result<(), FetchError> {
        self.inner
            .cache
            .drop_damaged(&tag)
            .map_err(|e| cache_error(tag, e))
    }

    /// Queues chunks for background download without waiting for them; chunks
    /// already cached or already queued are skipped.
    pub fn prefetch(&self, tags: impl IntoIterator<Item = ChunkTag>, priority: Priority) {
        let mut state = self.inner.state.lock().expect("fetch state lock");
        let remember = self.inner.settings.remember_missing;
        for tag in tags {
            if self.inner.cache.contains(&tag) || state.known_missing(&tag, remember) {
                continue;
            }
            enqueue(&mut state, tag, priority, None);
        }
        drop(state);
        self.inner.wake.notify_one();
    }

    /// The cached bytes, or a receiver for the download's result.
    fn request(
        &self,
        tag: ChunkTag,
        priority: Priority,
        read: CacheRead,
    ) -> Result<Request, FetchError> {
        let cached = match read {
            CacheRead::Verified => self.inner.cache.get(&tag),
            CacheRead::ToDecrypt => self.inner.cache.get_to_decrypt(&tag),
        };
        if let Some(bytes) = cached.map_err(|e| cache_error(tag, e))? {
            if !self.inner.is_manifest(&tag) {
                self.inner
                    .counters
                    .cache_hits
                    .fetch_add(1, Ordering::Relaxed);
            }
            return Ok(Request::Ready(bytes));
        }
        let (sender, receiver) = oneshot::channel();
        {
            let mut state = self.inner.state.lock().expect("fetch state lock");
            if state.stopped {
                return Err(FetchError::Stopped { tag });
            }
            if state.known_missing(&tag, self.inner.settings.remember_missing) {
                return Err(FetchError::Missing { tag });
            }
            enqueue(&mut state, tag, priority, Some(sender));
        }
        self.inner.wake.notify_one();
        Ok(Request::Wait(receiver))
    }

    /// The chunks being downloaded now (at most the parallel downloads):
    /// what a session's chunk map shows as fetching.
    pub fn running(&self) -> std::collections::HashSet<ChunkTag> {
        let state = self.inner.state.lock().expect("fetch state lock");
        state
            .slots
            .iter()
            .filter(|(_, slot)| slot.running)
            .map(|(tag, _)| *tag)
            .collect()
    }

    /// Current counters.
    pub fn stats(&self) -> FetchStats {
        let state = self.inner.state.lock().expect("fetch state lock");
        let c = &self.inner.counters;
        FetchStats {
            fetched_chunks: c.fetched_chunks.load(Ordering::Relaxed),
            first_fetch_ms: Some(c.first_fetch_ms.load(Ordering::Relaxed)).filter(|&ms| ms > 0),
            fetched_bytes: c.fetched_bytes.load(Ordering::Relaxed),
            in_flight: state.running as u64,
            queued: state.slots.values().filter(|s| !s.running).count() as u64,
            retries: c.retries.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            verify_failures: c.verify_failures.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            manifest_segments: c.manifest_segments.load(Ordering::Relaxed),
            manifest_bytes: c.manifest_bytes.load(Ordering::Relaxed),
            missing_chunks: state
                .missing
                .values()
                .filter(|since| since.elapsed() < self.inner.settings.remember_missing)
                .count() as u64,
        }
    }

    /// Stops dispatching; queued chunks' waiters get [`FetchError::Stopped`].
    /// Downloads already running finish.
    pub fn stop(&self) {
        let mut state = self.inner.state.lock().expect("fetch state lock");
        state.stopped = true;
        let queued: Vec<ChunkTag> = state
            .slots
            .iter()
            .filter(|(_, s)| !s.running)
            .map(|(t, _)| *t)
            .collect();
        for tag in queued {
            if let Some(slot) = state.slots.remove(&tag) {
                for waiter in slot.waiters {
                    let _ = waiter.send(Err(FetchError::Stopped { tag }));
                }
            }
        }
        for queue in &mut state.queues {
            queue.clear();
        }
        drop(state);
        self.inner.wake.notify_one();
    }
}

/// Where the bytes a reader got came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The local cache.
    Cache,
    /// A download (checked against the tag).
    Store,
}

/// How a cached chunk is read.
#[derive(Debug, Clone, Copy)]
enum CacheRead {
    /// Checked against its tag.
    Verified,
    /// Unchecked: the reader decrypts it (AEAD) at once.
    ToDecrypt,
}

enum Request {
    Ready(Bytes),
    Wait(oneshot::Receiver<Result<Bytes, FetchError>>),
}

fn cache_error(tag: ChunkTag, error: CacheError) -> FetchError {
    FetchError::Cache {
        tag,
        source: Arc::new(error),
    }
}

/// Adds a waiter (or a background want) for `tag`, creating or promoting its slot.
fn enqueue(state: &mut State, tag: ChunkTag, priority: Priority, waiter: Option<Waiter>) {
    if state.stopped {
        return;
    }
    match state.slots.get_mut(&tag) {
        Some(slot) => {
            if let Some(waiter) = waiter {
                slot.waiters.push(waiter);
            }
            if priority < slot.priority {
                slot.priority = priority;
                if !slot.running {
                    state.queues[priority as usize].push_back(tag);
                }
            }
        }
        None => {
            state.slots.insert(
                tag,
                Slot {
                    priority,
                    running: false,
                    waiters: waiter.into_iter().collect(),
                },
            );
            state.queues[priority as usize].push_back(tag);
        }
    }
}

/// Picks the next chunk to download, honouring the demand reservation: a
/// background download starts only while fewer downloads than the background
/// window's limit run, the ones readers wait for included (the window is at
/// most `parallel − reserved_for_demand`).
fn next_download(state: &mut State, settings: &FetchSettings) -> Option<ChunkTag> {
    if state.stopped || state.running >= settings.parallel {
        return None;
    }
    for priority in PRIORITIES {
        if priority != Priority::Demand && state.running >= state.window.limit() {
            return None;
        }
        while let Some(tag) = state.queues[priority as usize].pop_front() {
            let Some(slot) = state.slots.get_mut(&tag) else {
                continue;
            };
            if slot.running || slot.priority != priority {
                continue; // stale: already started, or promoted to another queue
            }
            slot.running = true;
            state.running += 1;
            return Some(tag);
        }
    }
    None
}

async fn dispatch(inner: Arc<Inner>) {
    loop {
        let next = {
            let mut state = inner.state.lock().expect("fetch state lock");
            if state.stopped && state.running == 0 {
                return;
            }
            next_download(&mut state, &inner.settings)
        };
        match next {
            Some(tag) => {
                let inner = inner.clone();
                inner.runtime.clone().spawn(async move {
                    let started = Instant::now();
                    let (result, attempts) = download(&inner, tag).await;
                    let clean = match &result {
                        Ok(bytes) if attempts == 1 => Some((started.elapsed(), bytes.len())),
                        _ => None,
                    };
                    finish(&inner, tag, result, clean);
                });
            }
            None => inner.wake.notified().await,
        }
    }
}

/// How many answers that are not the chunk (not found, or another error the
/// store answered with) it takes, at least, over `missing_after`, to give up.
const ODD_ANSWERS: u32 = 3;

/// Downloads one chunk with retries, verifies it and puts it in the cache;
/// also says how many attempts it took.
async fn download(inner: &Inner, tag: ChunkTag) -> (Result<Bytes, FetchError>, u32) {
    let mut attempts = 0;
    let result = download_attempts(inner, tag, &mut attempts).await;
    (result, attempts)
}

async fn download_attempts(
    inner: &Inner,
    tag: ChunkTag,
    attempts: &mut u32,
) -> Result<Bytes, FetchError> {
    let key = layout::chunk(&tag);
    let started = Instant::now();
    let mut backoff = inner.settings.initial_backoff;
    let mut odd_answers = 0u32;
    let mut first_odd_answer: Option<Instant> = None;
    loop {
        *attempts += 1;
        let error = match get_verified(inner, tag, &key).await {
            Ok(Err(corrupt)) => return Err(corrupt),
            Ok(Ok(bytes)) => {
                let cache = inner.cache.clone();
                let stored = bytes.clone();
                tokio::task::spawn_blocking(move || {
                    cache.insert(&tag, &stored, Durability::Refetchable)
                })
                .await
                .map_err(|e| FetchError::CacheTask {
                    tag,
                    source: Arc::new(e),
                })?
                .map_err(|e| cache_error(tag, e))?;
                let c = &inner.counters;
                if inner.is_manifest(&tag) {
                    c.manifest_segments.fetch_add(1, Ordering::Relaxed);
                    c.manifest_bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                } else {
                    if c.fetched_chunks.fetch_add(1, Ordering::Relaxed) == 0 {
                        let _ = c.first_fetch_ms.compare_exchange(
                            0,
                            crate::manifest::Timestamp::now().unix_ms(),
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    c.fetched_bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
                return Ok(bytes);
            }
            Err(e) => e,
        };
        // A chunk a manifest references should exist: a store that is still
        // starting (SeaweedFS loading its volumes) or an eventually consistent
        // one can answer 404, or an error of its own, for a moment; so ask
        // again, over `missing_after`, before telling readers.
        let odd = matches!(
            error,
            StoreError::NotFound { .. } | StoreError::Permanent { .. }
        );
        if odd {
            odd_answers += 1;
            first_odd_answer.get_or_insert_with(Instant::now);
        }
        let settled = odd_answers >= ODD_ANSWERS
            && first_odd_answer.is_some_and(|t| t.elapsed() >= inner.settings.missing_after);
        if error.is_not_found() && settled {
            return Err(FetchError::Missing { tag });
        }
        let retryable = matches!(
            error,
            StoreError::Transient { .. } | StoreError::Unreachable { .. }
        ) || (odd && !settled);
        if !retryable || started.elapsed() + backoff > inner.settings.give_up_after {
            return Err(FetchError::Store {
                tag,
                source: Arc::new(error),
            });
        }
        inner.counters.retries.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(chunk = %tag, %error, ?backoff, "fetch failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(inner.settings.max_backoff);
    }
}

/// One try at the chunk's stored bytes, checked against its tag. Bytes that
/// fail (a damaged or stale copy in a cache tier in front of the store, or
/// damage on the way) are never served: the chunk is asked for once more
/// from the store itself, past any cache ([`ReadStore::get_uncached`]), and
/// only when that copy fails too is the chunk corrupt. The outer error is the
/// store's, for the caller's retries.
async fn get_verified(
    inner: &Inner,
    tag: ChunkTag,
    key: &str,
) -> Result<Result<Bytes, FetchError>, StoreError> {
    let failed = |error: &ChunkError, what: &str| {
        inner
            .counters
            .verify_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(chunk = %tag, %error, "{what}");
    };
    let bytes = inner.store.get(key).await?;
    let Err(error) = chunk::verify_tag(tag, &bytes) else {
        return Ok(Ok(bytes));
    };
    failed(
        &error,
        "fetched chunk failed verification (a damaged or stale cached copy?); fetching it from the store itself",
    );
    let bytes = inner.store.get_uncached(key).await?;
    Ok(match chunk::verify_tag(tag, &bytes) {
        Ok(()) => Ok(bytes),
        Err(error) => {
            failed(
                &error,
                "the store's own copy of the chunk failed verification too; not served",
            );
            Err(FetchError::Corrupt(Arc::new(error)))
        }
    })
}

/// Hands a download's result to its waiters; `clean` is how long it took
/// and how many bytes it brought when it succeeded at the first attempt (a
/// sample for the background window).
fn finish(
    inner: &Inner,
    tag: ChunkTag,
    result: Result<Bytes, FetchError>,
    clean: Option<(Duration, usize)>,
) {
    let waiters = {
        let mut state = inner.state.lock().expect("fetch state lock");
        state.running -= 1;
        if let Some((took, bytes)) = clean {
            state.window.completed(took, bytes);
        }
        if let Err(FetchError::Missing { .. }) = result {
            state.missing.insert(tag, Instant::now());
        }
        state
            .slots
            .remove(&tag)
            .map(|slot| slot.waiters)
            .unwrap_or_default()
    };
    if let Err(error) = &result {
        inner.counters.failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(chunk = %tag, %error, waiters = waiters.len(), "giving up on chunk");
    }
    for waiter in waiters {
        let _ = waiter.send(result.clone());
    }
    inner.wake.notify_one();
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::WriteStore;
    use crate::store::faulty::{Fault, FaultyStore};
    use crate::store::memory::MemoryStore;

    struct Setup {
        faulty: Arc<FaultyStore<MemoryStore>>,
        fetcher: Fetcher,
        _dir: tempfile::TempDir,
    }

    async fn setup(settings: FetchSettings, chunks: &[Vec<u8>]) -> (Setup, Vec<ChunkTag>) {
        let memory = MemoryStore::new();
        let mut tags = Vec::new();
        for data in chunks {
            let tag = ChunkTag::of(data);
            memory
                .put_new(&layout::chunk(&tag), Bytes::from(data.clone()))
                .await
                .unwrap();
            tags.push(tag);
        }
        let faulty = Arc::new(FaultyStore::new(memory));
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(dir.path(), 1 << 30).unwrap());
        let fetcher = Fetcher::start(
            faulty.clone(),
            cache,
            settings,
            tokio::runtime::Handle::current(),
        );
        (
            Setup {
                faulty,
                fetcher,
                _dir: dir,
            },
            tags,
        )
    }

    fn data(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![i as u8 + 1; 40 + i]).collect()
    }

    /// Settings for tests: small windows, short retries.
    pub(crate) fn quick() -> FetchSettings {
        FetchSettings {
            parallel: 4,
            reserved_for_demand: 1,
            give_up_after: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            missing_after: Duration::from_millis(50),
            remember_missing: Duration::from_secs(60),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_readers_of_one_chunk_cause_one_download() {
        let (s, tags) = setup(quick(), &data(1)).await;
        s.faulty.set_latency(Duration::from_millis(100));
        let readers = (0..10).map(|_| {
            let fetcher = s.fetcher.clone();
            let tag = tags[0];
            tokio::spawn(async move { fetcher.fetch(tag, Priority::Demand).await.unwrap() })
        });
        for bytes in futures::future::join_all(readers).await {
            assert_eq!(bytes.unwrap(), data(1)[0]);
        }
        assert_eq!(s.faulty.calls(), 1);
        assert_eq!(s.fetcher.stats().fetched_chunks, 1);
        // Now cached: no further download.
        s.fetcher.fetch(tags[0], Priority::Demand).await.unwrap();
        assert_eq!(s.faulty.calls(), 1);
        assert_eq!(s.fetcher.stats().cache_hits, 1);
    }

    /// A store whose gets record the order they start in and then wait until
    /// the test releases them: scheduling order without any timing.
    #[derive(Debug)]
    struct GatedStore {
        inner: MemoryStore,
        started: Mutex<Vec<String>>,
        gate: tokio::sync::Semaphore,
    }

    #[async_trait::async_trait]
    impl ReadStore for GatedStore {
        fn url(&self) -> &str {
            "gated:"
        }
        async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
            self.started.lock().unwrap().push(key.to_owned());
            self.gate.acquire().await.unwrap().forget();
            self.inner.get(key).await
        }
        async fn exists(&self, key: &str) -> Result<bool, StoreError> {
            self.inner.exists(key).await
        }
    }

    async fn gated(
        parallel: usize,
        reserved: usize,
        n: usize,
    ) -> (Arc<GatedStore>, Fetcher, Vec<ChunkTag>, tempfile::TempDir) {
        let memory = MemoryStore::new();
        let mut tags = Vec::new();
        for data in data(n) {
            let tag = ChunkTag::of(&data);
            memory
                .put_new(&layout::chunk(&tag), Bytes::from(data))
                .await
                .unwrap();
            tags.push(tag);
        }
        let store = Arc::new(GatedStore {
            inner: memory,
            started: Mutex::new(Vec::new()),
            gate: tokio::sync::Semaphore::new(0),
        });
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(dir.path(), 1 << 30).unwrap());
        let settings = FetchSettings {
            parallel,
            reserved_for_demand: reserved,
            ..quick()
        };
        let fetcher = Fetcher::start(
            store.clone(),
            cache,
            settings,
            tokio::runtime::Handle::current(),
        );
        (store, fetcher, tags, dir)
    }

    /// Waits (a liveness guard, not a performance bound) until `n` gets started.
    async fn started(store: &GatedStore, n: usize) -> Vec<String> {
        for _ in 0..1000 {
            let started = store.started.lock().unwrap().clone();
            if started.len() >= n {
                return started;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "scheduler made no progress: {:?}",
            store.started.lock().unwrap()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn demand_reads_do_not_queue_behind_prefetch() {
        let (store, fetcher, tags, _dir) = gated(2, 1, 10).await;
        fetcher.prefetch(tags[..9].iter().copied(), Priority::Prefetch);
        assert_eq!(started(&store, 1).await, vec![layout::chunk(&tags[0])]);
        let demand = tokio::spawn({
            let fetcher = fetcher.clone();
            let tag = tags[9];
            async move { fetcher.fetch(tag, Priority::Demand).await }
        });
        // The demand read starts in the reserved slot while 8 prefetches wait.
        assert_eq!(started(&store, 2).await[1], layout::chunk(&tags[9]));
        assert_eq!(fetcher.stats().queued, 8);
        store.gate.add_permits(100);
        demand.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_reader_s_download_counts_against_the_background_window() {
        let (store, fetcher, tags, _dir) = gated(4, 1, 10).await;
        let demand = tokio::spawn({
            let fetcher = fetcher.clone();
            let tag = tags[9];
            async move { fetcher.fetch(tag, Priority::Demand).await }
        });
        assert_eq!(started(&store, 1).await, vec![layout::chunk(&tags[9])]);
        fetcher.prefetch(tags[..9].iter().copied(), Priority::Prefetch);
        // Slots are free, but the window (2 to start with) holds the
        // reader's download and one prefetch.
        assert_eq!(started(&store, 2).await.len(), 2);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.started.lock().unwrap().len(), 2);
        store.gate.add_permits(1);
        demand.await.unwrap().unwrap();
        // With no reader waiting, the window is all prefetch's.
        assert_eq!(started(&store, 3).await.len(), 3);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.started.lock().unwrap().len(), 3);
        store.gate.add_permits(100);
        for tag in &tags {
            fetcher.fetch(*tag, Priority::Prefetch).await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn boot_files_go_before_the_memory_image() {
        let (store, fetcher, tags, _dir) = gated(2, 1, 6).await;
        fetcher.prefetch(tags[..1].iter().copied(), Priority::Prefetch);
        started(&store, 1).await;
        fetcher.prefetch(tags[1..3].iter().copied(), Priority::Memory);
        fetcher.prefetch(tags[3..5].iter().copied(), Priority::Boot);
        store.gate.add_permits(100);
        let order = started(&store, 5).await;
        let expected: Vec<String> = [0, 3, 4, 1, 2]
            .iter()
            .map(|&i| layout::chunk(&tags[i]))
            .collect();
        assert_eq!(order, expected);
    }

    fn window_after(max: usize, samples: impl IntoIterator<Item = u64>) -> BackgroundWindow {
        let mut window = BackgroundWindow::new(max);
        for ms in samples {
            window.completed(Duration::from_millis(ms), 128 << 10);
        }
        window
    }

    #[test]
    fn the_background_window_grows_while_downloads_take_no_longer() {
        // Downloads as fast as the fastest seen: nothing queues, so it grows to max.
        assert_eq!(window_after(12, std::iter::repeat_n(30, 200)).limit(), 12);
        assert_eq!(window_after(3, std::iter::repeat_n(30, 200)).limit(), 3);
        assert_eq!(BackgroundWindow::new(12).limit(), 2);
        assert_eq!(BackgroundWindow::new(1).limit(), 1);
    }

    #[test]
    fn the_background_window_settles_near_the_bandwidth_delay_product() {
        // A link where a download alone takes 30 ms (20 ms round trip + 10 ms
        // transfer) and n in flight share it: each takes max(30, 10 n) ms.
        let mut window = BackgroundWindow::new(12);
        let mut limits = Vec::new();
        for _ in 0..400 {
            let n = window.limit() as u64;
            window.completed(Duration::from_millis((10 * n).max(30)), 128 << 10);
            limits.push(window.limit());
        }
        let settled = &limits[200..];
        assert!(
            settled.iter().all(|&l| (3..=5).contains(&l)),
            "limits after settling: {settled:?}"
        );
    }

    #[test]
    fn small_chunks_being_faster_is_not_taken_for_queueing() {
        // Alone on the link: 5 KiB chunks take 20 ms, 128 KiB ones 30 ms.
        let mut window = BackgroundWindow::new(12);
        for i in 0..400 {
            let (ms, bytes) = if i % 2 == 0 {
                (20, 5 << 10)
            } else {
                (30, 128 << 10)
            };
            window.completed(Duration::from_millis(ms), bytes);
        }
        assert_eq!(window.limit(), 12);
    }

    #[test]
    fn the_background_window_shrinks_when_downloads_queue() {
        let mut window = window_after(12, std::iter::repeat_n(30, 200));
        // Now each download takes 4 × as long as the fastest: most are queued.
        for _ in 0..200 {
            window.completed(Duration::from_millis(120), 128 << 10);
        }
        assert_eq!(window.limit(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_prefetch_is_promoted_when_a_reader_waits() {
        let (store, fetcher, tags, _dir) = gated(2, 0, 10).await;
        fetcher.prefetch(tags.iter().copied(), Priority::Prefetch);
        started(&store, 2).await;
        // Registers the waiter synchronously, as fetch() does.
        let Ok(Request::Wait(demand)) =
            fetcher.request(tags[9], Priority::Demand, CacheRead::Verified)
        else {
            panic!("chunk 9 is not cached yet")
        };
        store.gate.add_permits(1);
        // The next download to start is the promoted chunk, not prefetch #2.
        assert_eq!(started(&store, 3).await[2], layout::chunk(&tags[9]));
        store.gate.add_permits(100);
        demand.await.unwrap().unwrap();
        for tag in &tags {
            fetcher.fetch(*tag, Priority::Demand).await.unwrap();
        }
        assert_eq!(
            store.started.lock().unwrap().len(),
            10,
            "every chunk downloaded exactly once"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transient_failures_are_retried_while_the_reader_waits() {
        let (s, tags) = setup(quick(), &data(1)).await;
        s.faulty.inject(Fault::TransientTimes(3));
        assert_eq!(
            s.fetcher.fetch(tags[0], Priority::Demand).await.unwrap(),
            data(1)[0]
        );
        assert_eq!(s.fetcher.stats().retries, 3);
        assert_eq!(s.fetcher.stats().failures, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_answering_errors_for_a_moment_is_asked_again_then_given_up_on() {
        // A restarting store may answer errors of its own for a while.
        let (s, tags) = setup(quick(), &data(2)).await;
        s.faulty.inject(Fault::PermanentTimes(2));
        s.fetcher.fetch(tags[0], Priority::Demand).await.unwrap();
        // One that keeps answering them is given up on after `missing_after`.
        s.faulty.inject(Fault::PermanentTimes(1000));
        let err = s
            .fetcher
            .fetch(tags[1], Priority::Demand)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Store { .. }), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn giving_up_fails_every_waiter_and_a_later_read_tries_again() {
        let settings = FetchSettings {
            give_up_after: Duration::from_millis(100),
            ..quick()
        };
        let (s, tags) = setup(settings, &data(1)).await;
        s.faulty.inject(Fault::TransientTimes(1000));
        let err = s
            .fetcher
            .fetch(tags[0], Priority::Demand)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Store { .. }), "{err}");
        assert_eq!(s.fetcher.stats().failures, 1);
        s.faulty.inject(Fault::None);
        s.fetcher.fetch(tags[0], Priority::Demand).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_copy_in_a_cache_tier_is_read_again_from_the_store_once() {
        let chunks = data(2);
        let origin = Arc::new(FaultyStore::new(MemoryStore::new()));
        let cache = Arc::new(FaultyStore::new(MemoryStore::new()));
        let mut tags = Vec::new();
        for (index, chunk) in chunks.iter().enumerate() {
            let tag = ChunkTag::of(chunk);
            let key = layout::chunk(&tag);
            origin
                .inner()
                .put_new(&key, Bytes::from(chunk.clone()))
                .await
                .unwrap();
            let mut cached = chunk.clone();
            if index == 0 {
                cached[3] ^= 1;
            }
            cache
                .inner()
                .put_new(&key, Bytes::from(cached))
                .await
                .unwrap();
            tags.push(tag);
        }
        let tiered =
            crate::store::tiered::Tiered::new(cache.clone(), origin.clone(), layout::is_immutable);
        let dir = tempfile::tempdir().unwrap();
        let fetcher = Fetcher::start(
            Arc::new(tiered),
            Arc::new(ChunkCache::open(dir.path(), 1 << 30).unwrap()),
            quick(),
            tokio::runtime::Handle::current(),
        );
        for (tag, chunk) in tags.iter().zip(&chunks) {
            assert_eq!(fetcher.fetch(*tag, Priority::Demand).await.unwrap(), chunk);
        }
        assert_eq!(fetcher.stats().verify_failures, 1);
        // Both chunks from the cache; only the damaged one from the store.
        assert_eq!((cache.calls(), origin.calls()), (2, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_and_missing_chunks_are_never_served() {
        let (s, tags) = setup(quick(), &data(2)).await;
        s.faulty.inner().overwrite(
            &layout::chunk(&tags[0]),
            Bytes::from_static(b"not the chunk at all, but long enough to pass"),
        );
        let err = s
            .fetcher
            .fetch(tags[0], Priority::Demand)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Corrupt(_)), "{err}");
        // The copy `get` returned, then the store's own (`get_uncached`):
        // the same object here, with no cache tier.
        assert_eq!(s.fetcher.stats().verify_failures, 2);
        // Fixed in the store: the next read fetches again and succeeds.
        s.faulty
            .inner()
            .overwrite(&layout::chunk(&tags[0]), Bytes::from(data(2)[0].clone()));
        assert_eq!(
            s.fetcher.fetch(tags[0], Priority::Demand).await.unwrap(),
            data(2)[0]
        );

        s.faulty
            .inner()
            .delete(&layout::chunk(&tags[1]))
            .await
            .unwrap();
        assert!(matches!(
            s.fetcher.fetch(tags[1], Priority::Demand).await,
            Err(FetchError::Missing { .. })
        ));
        // Confirmed missing, the chunk is remembered: the next reads fail at
        // once, without asking the store (nor waiting for it) again.
        let (failures, retries) = (s.fetcher.stats().failures, s.fetcher.stats().retries);
        assert_eq!(s.fetcher.stats().missing_chunks, 1);
        s.faulty.inject(Fault::TransientTimes(1000));
        for _ in 0..3 {
            assert!(matches!(
                s.fetcher.fetch(tags[1], Priority::Demand).await,
                Err(FetchError::Missing { .. })
            ));
        }
        s.fetcher.prefetch([tags[1]], Priority::Prefetch);
        assert_eq!(s.fetcher.stats().queued, 0);
        assert_eq!(s.fetcher.stats().failures, failures);
        assert_eq!(s.fetcher.stats().retries, retries);
    }

    #[test]
    fn blocking_readers_wait_off_the_runtime() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (s, tags) = runtime.block_on(setup(quick(), &data(3)));
        s.faulty.set_latency(Duration::from_millis(20));
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let fetcher = s.fetcher.clone();
                let tag = tags[i % 3];
                std::thread::spawn(move || fetcher.fetch_blocking(tag, Priority::Demand).unwrap())
            })
            .collect();
        for (i, thread) in threads.into_iter().enumerate() {
            assert_eq!(thread.join().unwrap(), data(3)[i % 3]);
        }
        assert_eq!(s.faulty.calls(), 3);
        s.fetcher.stop();
        assert!(matches!(
            s.fetcher
                .fetch_blocking(ChunkTag([0; 32]), Priority::Demand),
            Err(FetchError::Stopped { .. })
        ));
    }
}
