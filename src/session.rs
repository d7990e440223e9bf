//! A resumed parcel's lifecycle: lock, resume (or reattach after a restart),
//! background prefetch, trickle upload ([`trickle`]), sync and checkin
//! ([`commit`]), status, discard.
//!
//! Resuming takes the parcel's lock in the store with one create-only put of
//! `parcels/<name>/lock` (holder, host, random nonce, time), writes a session
//! record under the state directory, and opens the [`Image`] from the newest
//! (or the requested) version. If a session record for the parcel already
//! exists on this machine — the daemon was killed — resume *reattaches*: the
//! lock in the store must still carry the record's nonce, and the image reopens
//! with every fsynced write intact.
//!
//! Prefetch after resume: memory image files first, in order, then the chunks
//! of the base version's access trace in the order the previous session first
//! read them, then every other file in order ([`Priority::Memory`],
//! [`Priority::Trace`], [`Priority::Prefetch`]). The daemon moves the files its
//! VMM reads before the guest runs further ahead ([`Session::prefetch_files`]).

mod commit;
pub mod memory;
mod trickle;

pub use commit::CommitReport;
pub use trickle::UploadSettings;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::cache::{CacheError, ChunkCache};
use crate::chunk::ChunkTag;
use crate::error::{Classify, ErrorClass};
use crate::fetch::{FetchSettings, FetchStats, Fetcher, Priority};
use crate::image::{BaseManifest, Image, ImageError, ImageOptions};
use crate::layout;
use crate::manifest::Timestamp;
use crate::parcel::{self, LockRecord, OpenParcel, ParcelError};
use crate::store::{PutOutcome, StoreError, StoreHandle};

/// Errors of session lifecycle operations.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// This machine's session lost its lock (someone forced it).
    #[error(
        "the lock of parcel {name} was broken by someone else ({detail}); nothing was committed and this machine's changes are kept: save them as a new parcel with `isrctl checkin --as NEW-NAME {name}`, or drop them with `isrctl discard {name}`"
    )]
    LockLost {
        /// Parcel.
        name: String,
        /// Who holds it now, if anyone.
        detail: String,
    },
    /// No such session.
    #[error("parcel {0} is not resumed on this machine (`isrctl status` lists the sessions)")]
    NotResumed(String),
    /// A chunk this session wrote is gone from the local cache before upload.
    #[error(
        "chunk {tag} written by this session is missing from the local cache, so it cannot be uploaded; the cache directory was changed behind isrfsd's back"
    )]
    MissingLocalChunk {
        /// Chunk.
        tag: ChunkTag,
    },
    /// Someone committed a version of the parcel while this session held its lock.
    #[error(
        "version {version} of parcel {name} was committed by someone else while this session held the lock; nothing was committed: save this session's changes with `isrctl checkin --as NEW-NAME {name}`"
    )]
    Diverged {
        /// Parcel.
        name: String,
        /// The foreign version.
        version: u64,
    },
    /// Writing the session record failed.
    #[error("session state {}: {source}", path.display())]
    State {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The session record is not what this version writes.
    #[error("session state {}: {source}", path.display())]
    Record {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: toml::de::Error,
    },
    /// Every pass over the chunks to upload outlasted a quarter of gc's
    /// grace period, so gc may have deleted some of them meanwhile.
    #[error(
        "every pass over the chunks to upload took longer than a quarter of [gc] grace_secs ({grace_secs} s); raise it on every machine using the store, then run the command again"
    )]
    SlowerThanGcGrace {
        /// The grace period, in seconds.
        grace_secs: u64,
    },
    /// The local chunk cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Parcel-level failure.
    #[error(transparent)]
    Parcel(#[from] ParcelError),
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Image failure.
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl Classify for SessionError {
    fn class(&self) -> ErrorClass {
        match self {
            SessionError::LockLost { .. } => ErrorClass::Conflict,
            SessionError::NotResumed(_) => ErrorClass::NotFound,
            SessionError::MissingLocalChunk { .. } => ErrorClass::Integrity,
            SessionError::Diverged { .. } => ErrorClass::Conflict,
            SessionError::State { .. }
            | SessionError::Record { .. }
            | SessionError::SlowerThanGcGrace { .. } => ErrorClass::Other,
            SessionError::Cache(e) => e.class(),
            SessionError::Parcel(e) => e.class(),
            SessionError::Store(e) => e.class(),
            // (The base version's manifest is the store's, like a chunk.)
            SessionError::Image(ImageError::Base(e)) => e.class(),
            SessionError::Image(_) => ErrorClass::Other,
        }
    }
}

/// What a session remembers on local disk (`<state>/sessions/<name>/session.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRecord {
    /// Parcel name.
    pub parcel: String,
    /// Store URL.
    pub store: String,
    /// Version the session started from.
    pub base_version: u64,
    /// Nonce of the lock this session holds (32 hex digits).
    pub lock_nonce: String,
    /// Where it is mounted.
    pub mount: PathBuf,
    /// When it was resumed, RFC 3339.
    pub since: String,
    /// The newest version this session committed (by sync or checkin): the
    /// parent of its next commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed: Option<u64>,
    /// The newest version when the lock was taken: versions after it can
    /// only come from this session (or from someone who broke the lock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_at_resume: Option<u64>,
    /// Set once checkin has committed: what is left is releasing the lock
    /// and removing this state, which a rerun finishes.
    #[serde(default)]
    pub checked_in: bool,
}

/// Where a parcel's session state lives.
pub fn session_dir(state_dir: &Path, parcel: &str) -> PathBuf {
    state_dir.join("sessions").join(parcel)
}

/// Where read-only views ([`Session::view`]) keep their throwaway state:
/// one directory `PID-N` per view, named by the daemon's process id.
pub fn views_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("views")
}

/// Removes the scratch directories of views whose daemon is gone (it was
/// killed: nobody holds the directory's lock), detaching their dead mounts;
/// returns how many it removed.
pub fn remove_stale_views(state_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(views_dir(state_dir)) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        // A live view's daemon holds its lock (a killed one's ended with it).
        let Ok(_lock) = lock_view(&entry.path()) else {
            continue;
        };
        if let Ok(mount) = std::fs::read(entry.path().join("mount")) {
            use std::os::unix::ffi::OsStrExt;
            detach_dead_mount(Path::new(std::ffi::OsStr::from_bytes(&mount)));
        }
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Locks a view's scratch directory (`flock` on its `lock` file), without waiting.
fn lock_view(dir: &Path) -> std::io::Result<nix::fcntl::Flock<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, errno)| std::io::Error::from(errno))
}

fn record_path(state_dir: &Path, parcel: &str) -> PathBuf {
    session_dir(state_dir, parcel).join("session.toml")
}

/// The session record of `parcel` on this machine, if any.
pub fn read_record(state_dir: &Path, parcel: &str) -> Result<Option<SessionRecord>, SessionError> {
    let path = record_path(state_dir, parcel);
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text)
            .map(Some)
            .map_err(|source| SessionError::Record { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SessionError::State { path, source }),
    }
}

/// Every session record on this machine (`<state>/sessions/*/session.toml`),
/// by parcel name: the sessions a daemon would reattach, whether one runs or not.
pub fn list_records(state_dir: &Path) -> Result<Vec<SessionRecord>, SessionError> {
    let dir = state_dir.join("sessions");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(SessionError::State { path: dir, source }),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut records = Vec::new();
    for name in names {
        if let Some(record) = read_record(state_dir, &name)? {
            records.push(record);
        }
    }
    Ok(records)
}

/// Writes the session record durably (temporary file, fsync, rename).
pub fn write_record(state_dir: &Path, record: &SessionRecord) -> Result<(), SessionError> {
    let path = record_path(state_dir, &record.parcel);
    let state_error = |source| SessionError::State {
        path: path.clone(),
        source,
    };
    let dir = path.parent().expect("record has a directory");
    crate::private::private_dir(state_dir).map_err(state_error)?;
    std::fs::create_dir_all(dir).map_err(state_error)?;
    let temp = dir.join("session.toml.tmp");
    let text = toml::to_string(record).expect("record serialises");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        // It holds the lock's nonce.
        let mut file = crate::private::create_private_file(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(state_error)
}

fn user_name() -> String {
    let uid = nix::unistd::geteuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|user| user.name)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| format!("uid {uid}"))
}

/// Takes the parcel's lock, or fails naming the holder. `base_version` is the
/// version the holder works from (kept by garbage collection while locked).
pub async fn take_lock(
    store: &StoreHandle,
    name: &str,
    base_version: Option<u64>,
) -> Result<LockRecord, SessionError> {
    let writer = store.writer("lock a parcel")?;
    let lock = LockRecord {
        holder: user_name(),
        host: crate::parcel::host_name(),
        nonce: hex::encode(rand::random::<[u8; 16]>()),
        since: Timestamp::now().to_rfc3339(),
        base_version,
    };
    let text = toml::to_string(&lock).expect("lock serialises");
    match writer
        .put_new(&layout::lock(name), Bytes::from(text))
        .await?
    {
        PutOutcome::Created => Ok(lock),
        PutOutcome::AlreadyExists => {
            let holder = parcel::read_lock(store, name).await?;
            let (holder, host, since) =
                holder
                    .map(|l| (l.holder, l.host, l.since))
                    .unwrap_or_else(|| {
                        (
                            "someone".into(),
                            "another machine".into(),
                            "just now".into(),
                        )
                    });
            Err(ParcelError::Locked {
                name: name.to_owned(),
                holder,
                host,
                since,
            }
            .into())
        }
    }
}

/// Removes the parcel's lock whoever holds it (`isrctl unlock --force`).
pub async fn force_unlock(
    store: &StoreHandle,
    name: &str,
) -> Result<Option<LockRecord>, SessionError> {
    let lock = match parcel::read_lock(store, name).await {
        // A damaged lock is removed all the same: this is its remedy.
        Err(ParcelError::BadRecord { .. }) => None,
        other => other?,
    };
    store
        .writer("unlock a parcel")?
        .delete(&layout::lock(name))
        .await?;
    Ok(lock)
}

/// Checks that the store's lock is still the one `record` took.
pub async fn check_lock(store: &StoreHandle, record: &SessionRecord) -> Result<(), SessionError> {
    let current = parcel::read_lock(store, &record.parcel).await?;
    match current {
        Some(lock) if lock.nonce == record.lock_nonce => Ok(()),
        other => Err(SessionError::LockLost {
            name: record.parcel.clone(),
            detail: other.map_or("no lock is held now".into(), |l| {
                format!("now held by {} on {} since {}", l.holder, l.host, l.since)
            }),
        }),
    }
}

/// Shared machinery a session runs on.
#[derive(Debug, Clone)]
pub struct SessionContext {
    /// Session state directory.
    pub state_dir: PathBuf,
    /// The machine's chunk cache.
    pub cache: Arc<ChunkCache>,
    /// Runtime for fetches.
    pub runtime: tokio::runtime::Handle,
    /// Fetch tuning.
    pub fetch: FetchSettings,
    /// Image tuning.
    pub image: ImageOptions,
    /// Prefetch every chunk in the background after resume.
    pub prefetch: bool,
    /// Trickle and commit uploads.
    pub upload: UploadSettings,
}

/// Counters of a session, for `isrctl status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionStatus {
    /// Parcel.
    pub parcel: String,
    /// Base version.
    pub base_version: u64,
    /// Mount point.
    pub mount: PathBuf,
    /// Distinct stored chunks the session needs (of the loaded segments).
    pub chunks_total: u64,
    /// Of which in the local cache.
    pub chunks_local: u64,
    /// Plaintext bytes written but not yet sealed.
    pub dirty_bytes: u64,
    /// Chunks this session wrote (sealed into the cache).
    pub dirty_chunks: u64,
    /// Of the distinct chunks this session wrote, how many are in the store.
    pub uploaded_chunks: u64,
    /// ... and how many are still to upload, with their stored size.
    pub pending_chunks: u64,
    /// Stored bytes still to upload.
    pub pending_bytes: u64,
    /// Stored bytes this daemon uploaded for the session (trickle and commits).
    pub uploaded_bytes: u64,
    /// The trickle uploader's current rate limit, bytes per second (0 = off).
    pub trickle_rate: u64,
    /// The newest version this session committed, if any.
    pub committed_version: Option<u64>,
    /// Fetch counters.
    pub fetch: FetchStats,
    /// Chunks of lazy memory's stored working set fetched first at this
    /// resume (0 when the base version has none).
    #[serde(default)]
    pub working_set_chunks: u64,
    /// Their stored bytes.
    #[serde(default)]
    pub working_set_bytes: u64,
    /// Segments of the base version's manifest (format 2; 0 for format 1)…
    #[serde(default)]
    pub manifest_segments: u64,
    /// … and how many are here: until all are, the chunk counts above cover
    /// the files' loaded parts only.
    #[serde(default)]
    pub manifest_segments_loaded: u64,
}

/// Detaches the mount at `mount` if it is dead: the FUSE mount of a daemon that
/// was killed answers ENOTCONN to everything until it is unmounted.
///
/// The check asks the kernel for the file system's statistics, which a FUSE
/// mount always forwards to its daemon: `stat` would be answered from the
/// attributes the kernel still caches for the dead mount's root.
pub fn detach_dead_mount(mount: &Path) {
    use nix::errno::Errno;
    if let Err(Errno::ENOTCONN | Errno::ECONNABORTED) = nix::sys::statfs::statfs(mount) {
        tracing::info!(mount = %mount.display(), "detaching the dead mount of a daemon that was killed");
        let _ = nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Downloads every chunk of `base` (and its manifest segments) into the
/// cache and waits (`isrctl hoard`): afterwards the session works with the
/// store unreachable.
pub async fn hoard(fetcher: &Fetcher, base: &BaseManifest) -> Result<u64, ImageError> {
    base.load(|_| Some(Priority::Prefetch)).await?;
    let tags: Vec<ChunkTag> = base
        .stored_chunks()
        .map(|(tag, _)| tag)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    fetcher.prefetch(tags.iter().copied(), Priority::Prefetch);
    for tag in &tags {
        fetcher.fetch(*tag, Priority::Prefetch).await?;
    }
    Ok(tags.len() as u64)
}

/// Reads the base version: a format-2 root (its segments are fetched
/// through `fetcher` once the image is open, as reads and the background
/// load need them) or a whole format-1 manifest.
async fn read_base(
    store: &StoreHandle,
    parcel: &OpenParcel,
    version: u64,
    fetcher: &Fetcher,
) -> Result<BaseManifest, SessionError> {
    let stored = parcel::read_stored(store, parcel, version).await?;
    let object = layout::manifest(&parcel.name, version);
    BaseManifest::open(
        stored,
        parcel.secrets.dedup_secret.clone(),
        fetcher.clone(),
        &object,
    )
    .map_err(|e| SessionError::Parcel(e.into()))
}

/// How urgently the background load wants the segments of the file at
/// `path`: a memory image's first (every RAM access of a lazy-memory guest
/// needs them), the rest ahead of the data prefetch.
fn segment_priority(path: &str) -> Option<Priority> {
    Some(if is_memory_image(path) {
        Priority::Boot
    } else {
        Priority::Trace
    })
}

/// What a session's counters are computed from; cheap to clone (the FUSE
/// adapter keeps one for `.isr/stats`).
#[derive(Debug, Clone)]
pub struct StatusSource {
    record: Arc<Mutex<SessionRecord>>,
    base: Arc<BaseManifest>,
    image: Arc<Image>,
    fetcher: Fetcher,
    cache: Arc<ChunkCache>,
    uploads: Arc<trickle::UploadCounters>,
    working_set: Arc<WorkingSetCounters>,
}

/// What [`Session::fetch_working_set`] queued.
#[derive(Debug, Default)]
struct WorkingSetCounters {
    chunks: AtomicU64,
    bytes: AtomicU64,
}

impl StatusSource {
    /// Current counters.
    pub fn status(&self) -> SessionStatus {
        let distinct: HashSet<ChunkTag> = self.base.stored_chunks().map(|(tag, _)| tag).collect();
        let chunks_local = distinct
            .iter()
            .filter(|tag| self.cache.contains(tag))
            .count() as u64;
        let (manifest_segments_loaded, manifest_segments) = self.base.segments_loaded();
        let record = self.record.lock().expect("record lock").clone();
        let (uploaded_chunks, pending_chunks, pending_bytes) = self.image.upload_counts();
        SessionStatus {
            parcel: record.parcel,
            base_version: record.base_version,
            mount: record.mount,
            chunks_total: distinct.len() as u64,
            chunks_local,
            dirty_bytes: self.image.dirty_bytes(),
            dirty_chunks: self.image.overlay_tags().len() as u64,
            uploaded_chunks,
            pending_chunks,
            pending_bytes,
            uploaded_bytes: self
                .uploads
                .bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            trickle_rate: self.uploads.rate.load(std::sync::atomic::Ordering::Relaxed),
            committed_version: record.committed,
            fetch: self.fetcher.stats(),
            working_set_chunks: self.working_set.chunks.load(Ordering::Relaxed),
            working_set_bytes: self.working_set.bytes.load(Ordering::Relaxed),
            manifest_segments,
            manifest_segments_loaded,
        }
    }

    /// Per-file chunk-state maps, one line per file: `path: map` (see [`Image::chunk_map`]).
    pub fn chunk_maps(&self) -> String {
        let mut out = String::new();
        for (path, file) in self.image.files() {
            if let Ok(map) = self.image.chunk_map(file.id) {
                out.push_str(&format!("{path}: {map}\n"));
            }
        }
        out
    }
}

/// A resumed parcel.
#[derive(Debug)]
pub struct Session {
    record: Arc<Mutex<SessionRecord>>,
    /// The parcel's file tree.
    pub image: Arc<Image>,
    /// Its fetcher.
    pub fetcher: Fetcher,
    /// The base version.
    pub base: Arc<BaseManifest>,
    parcel: OpenParcel,
    store: StoreHandle,
    context: SessionContext,
    uploads: Arc<trickle::UploadCounters>,
    working_set: Arc<WorkingSetCounters>,
    trickle: trickle::Trickle,
    /// One sync or checkin at a time.
    commit_lock: tokio::sync::Mutex<()>,
    /// What the checkin that ended this session did (later requests get it too).
    checked_in: Mutex<Option<CommitReport>>,
    /// This resume took the lock and created the session state (not a reattach).
    fresh: bool,
    /// A read-only view ([`Session::view`]): its scratch directory.
    view_dir: Option<PathBuf>,
    /// Held while the view lives: tells a later daemon the directory is not stale.
    view_lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // Background work must not outlive the session: it holds the image,
        // and with it the session database that a later resume reopens.
        self.trickle.stop();
        self.fetcher.stop();
    }
}

/// Whether a file is (part of) a memory image, prefetched first.
fn is_memory_image(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    name == "memory"
        || name.starts_with("memory.")
        || name.ends_with(".sav")
        || name.ends_with(".mem")
}

/// Finishes a checkin whose commit is done but whose clean-up was cut short
/// (the daemon was killed): releases the lock if this session still holds it
/// and removes the session state. Returns the version it committed.
pub async fn finish_checked_in(
    store: &StoreHandle,
    state_dir: &Path,
    record: &SessionRecord,
) -> Result<Option<u64>, SessionError> {
    release_lock_if_held(store, record).await?;
    if let Some(version) = record.committed {
        note_last_checkin(state_dir, &record.parcel, version)?;
    }
    remove_state(state_dir, &record.parcel)?;
    Ok(record.committed)
}

fn last_checkin_path(state_dir: &Path, parcel: &str) -> PathBuf {
    state_dir.join("checked-in").join(parcel)
}

/// The version the last finished checkin of `parcel` on this machine
/// committed, while the parcel has not been resumed here since: lets a
/// repeated `isrctl checkin` (its first run was killed after finishing)
/// answer instead of failing.
pub fn last_checkin(state_dir: &Path, parcel: &str) -> Option<u64> {
    std::fs::read_to_string(last_checkin_path(state_dir, parcel))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// [`last_checkin`], if a repeated `isrctl checkin` may still answer with
/// it: only while that version is the parcel's newest. Once anything was
/// committed after it (a rollback, an import, another machine's session) a
/// checkin with nothing resumed is no rerun of that one; the note is removed.
pub async fn replayable_checkin(
    store: &StoreHandle,
    state_dir: &Path,
    parcel: &str,
) -> Result<Option<u64>, SessionError> {
    let Some(version) = last_checkin(state_dir, parcel) else {
        return Ok(None);
    };
    if still_newest(store, parcel, version).await? {
        return Ok(Some(version));
    }
    let _ = std::fs::remove_file(last_checkin_path(state_dir, parcel));
    Ok(None)
}

/// Whether `version` is still the newest version of `parcel`: the test a
/// replayed checkin answer (from the daemon's memory or [`last_checkin`])
/// must pass to be the answer of the same, interrupted checkin.
pub async fn still_newest(
    store: &StoreHandle,
    parcel: &str,
    version: u64,
) -> Result<bool, SessionError> {
    let newest = parcel::list_versions(store, parcel).await?.last().copied();
    Ok(newest == Some(version))
}

fn note_last_checkin(state_dir: &Path, parcel: &str, version: u64) -> Result<(), SessionError> {
    let path = last_checkin_path(state_dir, parcel);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        let temp = path.with_extension("tmp");
        std::fs::write(&temp, format!("{version}\n"))?;
        std::fs::File::open(&temp)?.sync_all()?;
        std::fs::rename(&temp, &path)
    };
    write().map_err(|source| SessionError::State { path, source })
}

async fn release_lock_if_held(
    store: &StoreHandle,
    record: &SessionRecord,
) -> Result<(), SessionError> {
    match check_lock(store, record).await {
        Ok(()) => {
            store
                .writer("unlock")?
                .delete(&layout::lock(&record.parcel))
                .await?;
        }
        Err(SessionError::LockLost { .. }) => {
            tracing::info!(parcel = %record.parcel, "not releasing a lock this session no longer holds");
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Releases the lock a resume took and removes the session state it wrote
/// (best effort: the resume's own error is what the caller reports).
async fn undo_fresh_resume(store: &StoreHandle, state_dir: &Path, record: &SessionRecord) {
    if let Err(e) = release_lock_if_held(store, record).await {
        tracing::warn!(parcel = %record.parcel, error = %e, "could not release the lock of a failed resume");
    }
    if let Err(e) = remove_state(state_dir, &record.parcel) {
        tracing::warn!(parcel = %record.parcel, error = %e, "could not remove the state of a failed resume");
    }
}

fn remove_state(state_dir: &Path, parcel: &str) -> Result<(), SessionError> {
    let dir = session_dir(state_dir, parcel);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SessionError::State { path: dir, source }),
    }
}

impl Session {
    /// Resumes `parcel` (at `version`, default newest) mounted at `mount`, or
    /// reattaches to this machine's existing session of it.
    pub async fn resume(
        store: StoreHandle,
        parcel: OpenParcel,
        version: Option<u64>,
        mount: PathBuf,
        context: SessionContext,
    ) -> Result<Session, SessionError> {
        let name = parcel.name.clone();
        let mut existing = read_record(&context.state_dir, &name)?;
        if let Some(record) = existing.as_ref().filter(|r| r.checked_in) {
            // A checkin committed, then was cut short: finish it, then resume afresh.
            finish_checked_in(&store, &context.state_dir, record).await?;
            existing = None;
        }
        let record = match existing {
            Some(record) => {
                check_lock(&store, &record).await?;
                tracing::info!(parcel = %name, "reattaching to the existing session");
                record
            }
            None => {
                let base_version = parcel::resolve_version(&store, &name, version).await?;
                let lock = take_lock(&store, &name, Some(base_version)).await?;
                let _ = std::fs::remove_file(last_checkin_path(&context.state_dir, &name));
                let newest = match parcel::list_versions(&store, &name).await {
                    Ok(versions) => versions.last().copied(),
                    Err(e) => {
                        let _ = store.writer("unlock")?.delete(&layout::lock(&name)).await;
                        return Err(e.into());
                    }
                };
                let record = SessionRecord {
                    parcel: name.clone(),
                    store: store.url().to_owned(),
                    base_version,
                    lock_nonce: lock.nonce,
                    mount,
                    since: lock.since,
                    committed: None,
                    newest_at_resume: newest,
                    checked_in: false,
                };
                if let Err(e) = write_record(&context.state_dir, &record) {
                    let _ = store.writer("unlock")?.delete(&layout::lock(&name)).await;
                    return Err(e);
                }
                // A resume that fails from here on gives back what it took.
                return match Session::open(store.clone(), parcel, record.clone(), context.clone())
                    .await
                {
                    Ok(mut session) => {
                        session.fresh = true;
                        Ok(session)
                    }
                    Err(e) => {
                        undo_fresh_resume(&store, &context.state_dir, &record).await;
                        Err(e)
                    }
                };
            }
        };
        Session::open(store, parcel, record, context).await
    }

    /// Gives up a session whose resume could not finish (its mount failed):
    /// stops its background work and waits until the session database is
    /// closed; a fresh resume also releases the lock and removes the session
    /// state it created, while a reattached session stays as it was.
    pub async fn abandon(self) {
        self.trickle.stop_and_wait().await;
        self.fetcher.stop();
        if self.fresh {
            let (store, state_dir, record) = (
                self.store.clone(),
                self.context.state_dir.clone(),
                self.record(),
            );
            drop(self);
            undo_fresh_resume(&store, &state_dir, &record).await;
        }
    }

    /// Reopens this machine's session of `parcel` without checking the lock
    /// (for a checkin after a daemon restart: the commit checks it, and a
    /// session that lost its lock can still be saved under a new name).
    pub async fn reopen(
        store: StoreHandle,
        parcel: OpenParcel,
        context: SessionContext,
    ) -> Result<Session, SessionError> {
        let record = read_record(&context.state_dir, &parcel.name)?
            .ok_or_else(|| SessionError::NotResumed(parcel.name.clone()))?;
        Session::open(store, parcel, record, context).await
    }

    /// Opens `version` (default newest) of `parcel` read-only, to be mounted
    /// at `mount`: a view for restoring files. It takes no lock and leaves
    /// the parcel's session alone (the parcel may be resumed here or
    /// elsewhere); its state is a throwaway directory under
    /// `<state>/views/` ([`views_dir`]), removed by [`Session::end_view`].
    /// Nothing is prefetched; every change fails ([`ImageError::Frozen`]).
    pub async fn view(
        store: StoreHandle,
        parcel: OpenParcel,
        version: Option<u64>,
        mount: PathBuf,
        context: SessionContext,
    ) -> Result<Session, SessionError> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let version = parcel::resolve_version(&store, &parcel.name, version).await?;
        let views = views_dir(&context.state_dir);
        let dir = views.join(format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let state_error = |path: &Path| {
            let path = path.to_owned();
            move |source| SessionError::State { path, source }
        };
        crate::private::private_dir(&context.state_dir).map_err(state_error(&context.state_dir))?;
        std::fs::create_dir_all(&dir).map_err(state_error(&dir))?;
        // Tells a later daemon where this view was mounted, if this one dies.
        std::fs::write(dir.join("mount"), mount.as_os_str().as_encoded_bytes())
            .map_err(state_error(&dir))?;
        let lock = lock_view(&dir).map_err(state_error(&dir))?;
        let record = SessionRecord {
            parcel: parcel.name.clone(),
            store: store.url().to_owned(),
            base_version: version,
            lock_nonce: String::new(),
            mount,
            since: Timestamp::now().to_rfc3339(),
            committed: None,
            newest_at_resume: None,
            checked_in: false,
        };
        let context = SessionContext {
            prefetch: false,
            upload: UploadSettings {
                trickle: false,
                ..context.upload
            },
            ..context
        };
        let state = dir.join("image.redb");
        match Session::open_at(store, parcel, record, context, state).await {
            Ok(mut session) => {
                session.image.freeze();
                session.view_dir = Some(dir);
                session.view_lock = Some(lock);
                Ok(session)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Whether this is a read-only view ([`Session::view`]).
    pub fn is_view(&self) -> bool {
        self.view_dir.is_some()
    }

    /// Ends a view: stops its background work and removes its scratch
    /// directory (its unmount comes first).
    pub fn end_view(&self) {
        self.trickle.stop();
        self.fetcher.stop();
        if let Some(dir) = &self.view_dir
            && let Err(e) = std::fs::remove_dir_all(dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a view's scratch directory");
        }
    }

    async fn open(
        store: StoreHandle,
        parcel: OpenParcel,
        record: SessionRecord,
        context: SessionContext,
    ) -> Result<Session, SessionError> {
        let name = parcel.name.clone();
        let state = session_dir(&context.state_dir, &name).join("image.redb");
        let session = Session::open_at(store, parcel, record, context, state).await?;
        session.fetch_working_set();
        session.load_base();
        Ok(session)
    }

    async fn open_at(
        store: StoreHandle,
        parcel: OpenParcel,
        record: SessionRecord,
        context: SessionContext,
        state: PathBuf,
    ) -> Result<Session, SessionError> {
        let fetcher = Fetcher::start(
            store.reader().clone(),
            context.cache.clone(),
            context.fetch,
            context.runtime.clone(),
        );
        let base = match read_base(&store, &parcel, record.base_version, &fetcher).await {
            Ok(base) => Arc::new(base),
            Err(e) => {
                fetcher.stop();
                return Err(e);
            }
        };
        // Nothing is fetched (so nothing inserted into the cache) before the
        // image is open and has pinned the session's own chunks: an insert
        // could evict one of them before it is uploaded.
        let (image_base, secrets, cache, fetch_handle, options) = (
            base.clone(),
            parcel.secrets.clone(),
            context.cache.clone(),
            fetcher.clone(),
            context.image,
        );
        let image = Arc::new(
            tokio::task::spawn_blocking(move || {
                Image::open(&state, image_base, secrets, fetch_handle, cache, options)
            })
            .await
            .expect("image open task")?,
        );
        let uploads = Arc::new(trickle::UploadCounters::default());
        let trickle = trickle::Trickle::start(trickle::TrickleParts {
            image: image.clone(),
            store: store.clone(),
            cache: context.cache.clone(),
            settings: context.upload,
            counters: uploads.clone(),
            runtime: context.runtime.clone(),
        });
        let session = Session {
            record: Arc::new(Mutex::new(record)),
            image,
            fetcher,
            base,
            parcel,
            store,
            context,
            uploads,
            working_set: Arc::default(),
            trickle,
            commit_lock: tokio::sync::Mutex::new(()),
            checked_in: Mutex::new(None),
            fresh: false,
            view_dir: None,
            view_lock: None,
        };
        Ok(session)
    }

    /// The session record as it is now.
    pub fn record(&self) -> SessionRecord {
        self.record.lock().expect("record lock").clone()
    }

    /// Loads the base version's segments in the background (see
    /// [`segment_priority`]), then, with `[fetch] prefetch`, queues every
    /// chunk: a memory image's first, the previous session's first reads
    /// (its access trace) next, the rest in file order.
    fn load_base(&self) {
        let (base, store, parcel, version, fetcher, prefetch) = (
            self.base.clone(),
            self.store.clone(),
            self.parcel.clone(),
            self.record().base_version,
            self.fetcher.clone(),
            self.context.prefetch,
        );
        self.context.runtime.spawn(async move {
            if let Err(error) = base.load(segment_priority).await {
                // Reads still fetch the segments they need.
                tracing::warn!(parcel = %parcel.name, %error, "the base version's manifest did not load in the background");
                return;
            }
            if !prefetch {
                return;
            }
            let (mut memory, mut rest) = (Vec::new(), Vec::new());
            for (path, _, file) in base.files() {
                let tags = base.file_chunks(file).filter_map(|(_, chunk)| chunk.tag());
                if is_memory_image(path) {
                    memory.extend(tags);
                } else {
                    rest.extend(tags);
                }
            }
            fetcher.prefetch(memory, Priority::Memory);
            fetcher.prefetch(rest.iter().copied(), Priority::Prefetch);
            // The previous session's first reads jump ahead of the sweep
            // when the trace arrives (a queued chunk moves up).
            let in_base: HashSet<ChunkTag> = rest.into_iter().collect();
            match read_trace(&store, &parcel, version).await {
                Ok(Some(trace)) => {
                    let tags: Vec<ChunkTag> =
                        trace.into_iter().filter(|t| in_base.contains(t)).collect();
                    tracing::info!(parcel = %parcel.name, version, chunks = tags.len(), "prefetching in access-trace order");
                    fetcher.prefetch(tags, Priority::Trace);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "ignoring the access trace"),
            }
        });
    }

    /// Fetches the base version's working set (lazy memory, see [`memory`])
    /// ahead of everything but demand reads and boot files, whether or not the
    /// background prefetch is on: it is what the resumed guest touches first.
    fn fetch_working_set(&self) {
        let (store, parcel, version, fetcher, counters, base) = (
            self.store.clone(),
            self.parcel.clone(),
            self.record().base_version,
            self.fetcher.clone(),
            self.working_set.clone(),
            self.base.clone(),
        );
        let key = layout::working_set(&parcel.name, version);
        self.context.runtime.spawn(async move {
            match read_sealed_tags(&store, &parcel, version, key).await {
                Ok(Some(tags)) => {
                    tracing::info!(parcel = %parcel.name, version, chunks = tags.len(), "fetching the working set first");
                    counters.chunks.store(tags.len() as u64, Ordering::Relaxed);
                    fetcher.prefetch(tags.iter().copied(), Priority::WorkingSet);
                    // Its stored size is in the memory image's segments.
                    let memory = |path: &str| is_memory_image(path).then_some(Priority::Boot);
                    if base.load(memory).await.is_ok() {
                        let stored: std::collections::HashMap<ChunkTag, u64> =
                            base.stored_chunks().collect();
                        let bytes = tags.iter().filter_map(|t| stored.get(t)).sum();
                        counters.bytes.store(bytes, Ordering::Relaxed);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "ignoring the working set"),
            }
        });
    }

    /// Whether the whole parcel is fetched in the background (`[fetch] prefetch`).
    pub fn prefetches(&self) -> bool {
        self.context.prefetch
    }

    /// Starts recording lazy memory's working set: the first reads of the
    /// file at `path` (the VM's RAM file) for [`memory::WORKING_SET_WINDOW`].
    pub fn record_working_set(&self, path: &Path) {
        match self.image.resolve(&path.to_string_lossy()) {
            Ok(node) => self
                .image
                .record_working_set(node.id, memory::WORKING_SET_WINDOW),
            Err(e) => tracing::warn!(error = %e, "not recording the working set"),
        }
    }

    /// Moves the base version's chunks of `files` (paths relative to the
    /// parcel's root) ahead of the sweep, at `priority`: the daemon names the
    /// files its VMM reads before the guest runs ([`Priority::Boot`] for a
    /// kernel and initrd, [`Priority::Memory`] for the memory image that
    /// vm.toml names). Files the base version does not have are skipped.
    /// Their segments are loaded first, at the same priority.
    pub fn prefetch_files(&self, files: &[&Path], priority: Priority) {
        let wanted: Vec<String> = files
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let (base, fetcher) = (self.base.clone(), self.fetcher.clone());
        self.context.runtime.spawn(async move {
            let is_wanted = |path: &str| wanted.iter().any(|w| w == path);
            if let Err(error) = base.load(|path| is_wanted(path).then_some(priority)).await {
                tracing::warn!(%error, "not prefetching the VMM's files");
                return;
            }
            let tags: Vec<ChunkTag> = base
                .files()
                .filter(|(path, _, _)| is_wanted(path))
                .flat_map(|(_, _, file)| base.file_chunks(file).filter_map(|(_, c)| c.tag()))
                .collect();
            fetcher.prefetch(tags, priority);
        });
    }

    /// Where the session's counters come from.
    pub fn status_source(&self) -> StatusSource {
        StatusSource {
            record: self.record.clone(),
            base: self.base.clone(),
            image: self.image.clone(),
            fetcher: self.fetcher.clone(),
            cache: self.context.cache.clone(),
            uploads: self.uploads.clone(),
            working_set: self.working_set.clone(),
        }
    }

    /// Current counters.
    pub fn status(&self) -> SessionStatus {
        self.status_source().status()
    }

    /// Stops the background work and removes the session: releases the lock
    /// if still held, unpins this session's chunks and deletes `remove` from
    /// the cache (those nobody else pins), then removes the session state.
    async fn close(&self, remove: &[ChunkTag]) -> Result<(), SessionError> {
        self.trickle.stop();
        self.fetcher.stop();
        let tags = self.image.overlay_tags();
        self.context.cache.unpin(tags.iter());
        if let Err(e) = self.context.cache.remove_unpinned(remove.iter()) {
            tracing::warn!(error = %e, "could not remove the session's chunks from the cache");
        }
        let record = self.record();
        release_lock_if_held(&self.store, &record).await?;
        remove_state(&self.context.state_dir, &record.parcel)
    }

    /// Drops every local change, wipes the session's state and releases the lock.
    pub async fn discard(&self) -> Result<(), SessionError> {
        // The session's own chunks exist nowhere else: wipe them with its state.
        let own = self.image.overlay_tags();
        self.close(&own).await
    }
}

/// The access trace stored beside `version`, if there is one.
pub async fn read_trace(
    store: &StoreHandle,
    parcel: &OpenParcel,
    version: u64,
) -> Result<Option<Vec<ChunkTag>>, SessionError> {
    read_sealed_tags(store, parcel, version, layout::trace(&parcel.name, version)).await
}

/// A list of chunk tags sealed like a trace ([`crate::trace`]) under `key`
/// beside `version`; `None` when there is none.
async fn read_sealed_tags(
    store: &StoreHandle,
    parcel: &OpenParcel,
    version: u64,
    key: String,
) -> Result<Option<Vec<ChunkTag>>, SessionError> {
    let bytes = match store.reader().get(&key).await {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    crate::trace::open(
        &bytes,
        &parcel.secrets.parcel_key,
        &parcel.id,
        version,
        &key,
    )
    .map(Some)
    .map_err(|e| {
        SessionError::Store(StoreError::Permanent {
            store: store.url().to_owned(),
            key,
            source: e.into(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_images_are_recognised() {
        for yes in [
            "memory.img",
            "vm/memory.img",
            "Memory.bin",
            "vm.sav",
            "ram.mem",
        ] {
            assert!(is_memory_image(yes), "{yes}");
        }
        for no in ["disk.img", "vm.toml", "notes/memoryless"] {
            assert!(!is_memory_image(no), "{no}");
        }
    }
}
