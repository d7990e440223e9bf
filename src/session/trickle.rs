//! Trickle upload: while a session runs, chunks it wrote that nobody has
//! changed for `quiet` are sealed (if still in the write-back buffer) and
//! uploaded in the background, rate-limited so demand fetches keep the link,
//! and recorded in the session's durable upload journal (the image's redb
//! file), so a restarted daemon does not send them again and checkin is
//! mostly the manifest.
//!
//! Rate: `upload.rate_bytes_per_sec`, or by default half of the best rate a
//! single upload has achieved lately (each put's bytes over its duration: with
//! one put in flight, what the link gives one request), starting at 1 MiB/s
//! and never below 256 KiB/s. Uploads go one at a time, paced chunk by chunk,
//! so demand fetches never queue behind a burst of them.
//!
//! The same loop also persists the access trace once a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use super::SessionError;
use crate::cache::ChunkCache;
use crate::chunk::ChunkTag;
use crate::image::Image;
use crate::image::journal::unix_now;
use crate::layout;
use crate::store::{PutOutcome, StoreHandle};

/// How a session's changes are uploaded (`[upload]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadSettings {
    /// Upload in the background while the session runs.
    pub trickle: bool,
    /// How long a chunk must be unchanged before the trickle uploader takes it.
    pub quiet: Duration,
    /// Trickle rate limit; `None` = half the observed single-upload rate.
    pub rate_bytes_per_sec: Option<u64>,
    /// Uploads in flight during sync and checkin.
    pub parallel: usize,
    /// Garbage collection's grace period: a commit makes sure every chunk it
    /// newly references was written or refreshed less than half of this ago.
    pub gc_grace: Duration,
}

impl Default for UploadSettings {
    fn default() -> Self {
        UploadSettings {
            trickle: true,
            quiet: Duration::from_secs(30),
            rate_bytes_per_sec: None,
            parallel: 8,
            gc_grace: Duration::from_secs(86_400),
        }
    }
}

const TICK: Duration = Duration::from_secs(1);
const UNOBSERVED_RATE: u64 = 1 << 20;
const MIN_AUTO_RATE: u64 = 256 << 10;
/// How the remembered best upload rate decays with each upload, so the
/// estimate follows a link that got slower.
const RATE_DECAY: f64 = 0.98;

/// Upload counters of a session (trickle and commits).
#[derive(Debug, Default)]
pub(crate) struct UploadCounters {
    /// Stored bytes uploaded.
    pub bytes: AtomicU64,
    /// Chunks uploaded.
    pub chunks: AtomicU64,
    /// Current trickle rate limit (0 = off).
    pub rate: AtomicU64,
}

impl UploadCounters {
    pub(crate) fn add(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.chunks.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the uploader works with.
pub(super) struct TrickleParts {
    pub image: Arc<Image>,
    pub store: StoreHandle,
    pub cache: Arc<ChunkCache>,
    pub settings: UploadSettings,
    pub counters: Arc<UploadCounters>,
    pub runtime: tokio::runtime::Handle,
}

/// The running uploader of one session.
#[derive(Debug)]
pub(super) struct Trickle {
    stop: Arc<AtomicBool>,
    wake: Arc<Notify>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Trickle {
    /// Starts the loop on the session's runtime.
    pub fn start(parts: TrickleParts) -> Trickle {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Notify::new());
        let runtime = parts.runtime.clone();
        let task = runtime.spawn(run(parts, stop.clone(), wake.clone()));
        Trickle {
            stop,
            wake,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Stops the loop (an upload in progress finishes).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Stops the loop and waits until it has ended (and dropped its image).
    pub async fn stop_and_wait(&self) {
        self.stop();
        let task = self.task.lock().expect("trickle task lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// The stored bytes of a chunk this session wrote, from the cache.
pub(super) fn local_chunk(cache: &ChunkCache, tag: &ChunkTag) -> Result<Bytes, SessionError> {
    match cache.get(tag) {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err(SessionError::MissingLocalChunk { tag: *tag }),
        Err(e) => Err(SessionError::Cache(e)),
    }
}

/// Create-only upload of one chunk; the journal entry it earns: the time of
/// the upload, or 0 (present, age unknown) when the store already had it.
pub(super) async fn upload_new(
    store: &StoreHandle,
    tag: &ChunkTag,
    bytes: Bytes,
) -> Result<(ChunkTag, u64, Option<u64>), SessionError> {
    let len = bytes.len() as u64;
    let outcome = store
        .writer("upload chunks")?
        .put_new(&layout::chunk(tag), bytes)
        .await?;
    Ok(match outcome {
        PutOutcome::Created => (*tag, unix_now(), Some(len)),
        PutOutcome::AlreadyExists => (*tag, 0, None),
    })
}

async fn run(parts: TrickleParts, stop: Arc<AtomicBool>, wake: Arc<Notify>) {
    let settings = parts.settings;
    let mut best_upload = 0f64; // bytes per second one put achieved
    let mut more_work = false;
    loop {
        let pause = if more_work { Duration::ZERO } else { TICK };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = wake.notified() => {}
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        more_work = false;
        let image = parts.image.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            image.seal_quiet(settings.quiet)?;
            image.persist_trace()
        })
        .await;
        if let Ok(Err(e)) = sealed {
            tracing::warn!(error = %e, "trickle: sealing quiet chunks failed");
        }
        if !settings.trickle {
            parts.counters.rate.store(0, Ordering::Relaxed);
            continue;
        }
        let rate_now = |best_upload: f64| {
            settings
                .rate_bytes_per_sec
                .unwrap_or(if best_upload == 0.0 {
                    UNOBSERVED_RATE
                } else {
                    ((best_upload / 2.0) as u64).max(MIN_AUTO_RATE)
                })
        };
        parts
            .counters
            .rate
            .store(rate_now(best_upload), Ordering::Relaxed);
        // Up to one tick's worth of bytes, paced, then look again (chunks
        // rewritten meanwhile drop out of the candidates).
        let mut budget = rate_now(best_upload) as i64;
        // Lazy memory's RAM file while its guest runs is left alone.
        let image = parts.image.clone();
        let skip = tokio::task::spawn_blocking(move || super::memory::unpaired_nodes(&image))
            .await
            .unwrap_or_default();
        for tag in parts.image.upload_candidates(settings.quiet, &skip) {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            if budget <= 0 {
                more_work = true;
                break;
            }
            let Ok(bytes) = local_chunk(&parts.cache, &tag) else {
                continue; // rewritten and removed since the candidates were listed
            };
            let started = Instant::now();
            let len = bytes.len() as u64;
            match upload_new(&parts.store, &tag, bytes).await {
                Ok((tag, at, uploaded)) => {
                    if uploaded.is_some() {
                        let seconds = started.elapsed().as_secs_f64().max(1e-6);
                        best_upload = (best_upload * RATE_DECAY).max(len as f64 / seconds);
                    }
                    if let Err(e) = parts.image.record_uploaded(&[(tag, at)]) {
                        tracing::warn!(error = %e, "trickle: journal write failed");
                        break;
                    }
                    if let Some(bytes) = uploaded {
                        parts.counters.add(bytes);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "trickle upload failed; retrying later");
                    break;
                }
            }
            budget -= len as i64;
            let rate = rate_now(best_upload);
            parts.counters.rate.store(rate, Ordering::Relaxed);
            let pace = Duration::from_secs_f64(len as f64 / rate as f64);
            if let Some(rest) = pace.checked_sub(started.elapsed()) {
                tokio::time::sleep(rest).await;
            }
        }
    }
}
