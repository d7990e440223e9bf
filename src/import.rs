//! Import: local files → chunks in a store → a committed version.
//!
//! Pipeline (bounded at every stage, so memory stays flat however large the
//! input is):
//!
//! ```text
//! reader thread ──crossbeam(2·jobs)──▶ encoder threads ×jobs ──mpsc(2·jobs)──▶
//!   async uploads (exists? else create-only put), `uploads` at a time ──▶ chunk map
//! ```
//!
//! The reader skips holes of sparse files (`SEEK_DATA`/`SEEK_HOLE`) without
//! reading them. Encoders zero-detect, compress, encrypt and hash. Chunks already
//! in the store (from an earlier version, another parcel with the same dedup
//! secret, or an interrupted run of this import) are not uploaded again. Only
//! when every chunk is stored and the store is synced is the manifest committed
//! with one create-only put, so a killed import leaves no visible version and a
//! rerun finishes without re-uploading.
//!
//! Garbage collection's invariant (see [`crate::gc`]): every chunk a commit
//! newly references was written or refreshed less than half the grace period
//! `G` before the commit. Chunks of the parent version are exempt (the commit
//! only succeeds while the parent is the newest version, which gc keeps). Any
//! other chunk found in the store is checked with `modified` instead of
//! `exists` and refreshed with `put_replace` when it is older than `G/4`; and
//! the pass ends with [`crate::gc::finish_pass`] (a store sync; a gc deleting
//! a refreshed chunk is waited out); if the pass took `G/4` or
//! longer, or gc deleted a refreshed chunk meanwhile, it is run again (it
//! then mostly checks) before committing.

use std::collections::HashSet;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::chunk::{ChunkEncoder, ChunkRef, ChunkTag, EncodedChunk};
use crate::error::{Classify, ErrorClass};
use crate::keys::{Credential, KdfParams, ParcelSecrets};
use crate::layout;
use crate::manifest::{Entry, EntryKind, Manifest, Timestamp, validate_path};
use crate::parcel::{self, OpenParcel, ParcelError};
use crate::progress::Progress;
use crate::store::{PutOutcome, StoreError, StoreHandle, WriteStore};

/// Import tuning (`[import]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportSettings {
    /// Chunk size of new parcels.
    pub chunk_size: u32,
    /// zstd level.
    pub zstd_level: i32,
    /// Encoder threads (0 = one per core).
    pub jobs: usize,
    /// Concurrent store requests.
    pub uploads: usize,
}

/// Errors of an import.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// An input path does not exist.
    #[error("{}: no such file or directory", path.display())]
    SourceMissing {
        /// Path given.
        path: PathBuf,
    },
    /// An input cannot be part of a parcel.
    #[error("{}: {reason}", path.display())]
    Source {
        /// Offending path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Options that contradict the parcel or each other.
    #[error("{reason}")]
    Option {
        /// What is wrong and what to do.
        reason: String,
    },
    /// Every pass took too long for garbage collection's grace period.
    #[error(
        "import of {parcel} did not commit: each of {passes} passes over its files took longer than a quarter of the gc grace period ({grace_secs} s), so its chunks could be collected before the commit; raise [gc] grace_secs (on every machine using the store) or import from faster storage"
    )]
    TooSlow {
        /// Parcel.
        parcel: String,
        /// Passes made.
        passes: u32,
        /// Grace period in seconds.
        grace_secs: u64,
    },
    /// Reading an input failed.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Parcel-level failure (exists, wrong passphrase, version race, …).
    #[error(transparent)]
    Parcel(#[from] ParcelError),
    /// A store operation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for ImportError {
    fn class(&self) -> ErrorClass {
        match self {
            ImportError::SourceMissing { .. } => ErrorClass::NotFound,
            ImportError::Source { .. } | ImportError::Option { .. } => ErrorClass::Invalid,
            ImportError::Read { .. } | ImportError::TooSlow { .. } => ErrorClass::Other,
            ImportError::Parcel(e) => e.class(),
            ImportError::Store(e) => e.class(),
        }
    }
}

/// What to import.
#[derive(Debug)]
pub struct ImportRequest<'a> {
    /// Parcel name.
    pub name: &'a str,
    /// Files or directories; one directory means "its contents".
    pub paths: &'a [PathBuf],
    /// Add a version to an existing parcel instead of creating one.
    pub new_version: bool,
    /// Chunking and parallelism (`settings.chunk_size` is the default for new parcels).
    pub settings: ImportSettings,
    /// Chunk size asked for explicitly: an error if an existing parcel has another.
    pub chunk_size: Option<u32>,
    /// Cost of new passphrase keyslots.
    pub kdf: KdfParams,
    /// Version message.
    pub message: String,
    /// Parcel whose dedup secret a new parcel shares.
    pub dedup_with: Option<&'a str>,
    /// Garbage collection's grace period (`[gc] grace_secs`): chunks reused
    /// from outside the parent version are refreshed when older than a
    /// quarter of it, and the import commits within half of it.
    pub gc_grace: Duration,
}

/// How many passes an import makes before giving up on the grace period.
const MAX_PASSES: u32 = 3;

/// What an import did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportSummary {
    /// Parcel.
    pub parcel: String,
    /// Version committed.
    pub version: u64,
    /// Files imported.
    pub files: u64,
    /// Sum of file sizes.
    pub logical_bytes: u64,
    /// Chunks in all files.
    pub chunks: u64,
    /// Of which all-zero (not stored).
    pub zero_chunks: u64,
    /// Of which already in the store or repeated within this import (not uploaded).
    pub deduplicated_chunks: u64,
    /// Chunks uploaded.
    pub uploaded_chunks: u64,
    /// Bytes uploaded.
    pub uploaded_bytes: u64,
    /// Of the deduplicated chunks, those rewritten to restart their age for
    /// garbage collection (found in the store, not in the parent version, and
    /// older than a quarter of the grace period).
    pub refreshed_chunks: u64,
    /// Passes over the files (more than one when a pass took a quarter of the
    /// grace period or longer).
    pub passes: u32,
    /// Stored size of the distinct chunks this version references.
    pub stored_bytes: u64,
    /// Wall time.
    pub seconds: f64,
    /// Logical bytes per second.
    pub bytes_per_second: f64,
}

/// One input file or directory, at its place in the parcel tree.
#[derive(Debug, Clone)]
struct SourceEntry {
    parcel_path: String,
    source: PathBuf,
    mode: u32,
    mtime: Timestamp,
    /// `None` for directories.
    size: Option<u64>,
}

/// Lists the inputs as parcel entries, sorted by parcel path.
fn scan(paths: &[PathBuf]) -> Result<Vec<SourceEntry>, ImportError> {
    let mut entries = Vec::new();
    if paths.is_empty() {
        return Err(ImportError::Source {
            path: PathBuf::from("."),
            reason: "nothing to import: give files or a directory".into(),
        });
    }
    if let [single] = paths {
        if std::fs::symlink_metadata(single)
            .map(|m| m.is_dir())
            .unwrap_or(false)
        {
            walk(single, "", &mut entries)?;
            return finish_scan(entries);
        }
    }
    for path in paths {
        let name =
            path.file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| ImportError::Source {
                    path: path.clone(),
                    reason: "has no usable file name".into(),
                })?;
        add_entry(path, name.to_owned(), &mut entries)?;
    }
    finish_scan(entries)
}

fn finish_scan(mut entries: Vec<SourceEntry>) -> Result<Vec<SourceEntry>, ImportError> {
    entries.sort_by(|a, b| a.parcel_path.as_bytes().cmp(b.parcel_path.as_bytes()));
    for pair in entries.windows(2) {
        if pair[0].parcel_path == pair[1].parcel_path {
            return Err(ImportError::Source {
                path: pair[1].source.clone(),
                reason: format!(
                    "two inputs would both be {:?} in the parcel",
                    pair[1].parcel_path
                ),
            });
        }
    }
    Ok(entries)
}

fn add_entry(
    path: &Path,
    parcel_path: String,
    entries: &mut Vec<SourceEntry>,
) -> Result<(), ImportError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ImportError::SourceMissing {
            path: path.to_owned(),
        },
        _ => ImportError::Read {
            path: path.to_owned(),
            source: e,
        },
    })?;
    validate_path(&parcel_path).map_err(|reason| ImportError::Source {
        path: path.to_owned(),
        reason,
    })?;
    let file_type = meta.file_type();
    let kind = if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_dir() || file_type.is_file() {
        ""
    } else {
        "a device, FIFO or socket"
    };
    if !kind.is_empty() {
        return Err(ImportError::Source {
            path: path.to_owned(),
            reason: format!("is {kind}; a parcel holds only regular files and directories"),
        });
    }
    if file_type.is_file() {
        // Unreadable inputs fail here, before the parcel record is written.
        std::fs::File::open(path).map_err(|source| ImportError::Read {
            path: path.to_owned(),
            source,
        })?;
    }
    entries.push(SourceEntry {
        parcel_path: parcel_path.clone(),
        source: path.to_owned(),
        mode: meta.permissions().mode() & 0o7777,
        mtime: Timestamp {
            secs: meta.mtime(),
            nanos: meta.mtime_nsec() as u32,
        },
        size: file_type.is_file().then_some(meta.len()),
    });
    if file_type.is_dir() {
        walk(path, &parcel_path, entries)?;
    }
    Ok(())
}

fn walk(dir: &Path, prefix: &str, entries: &mut Vec<SourceEntry>) -> Result<(), ImportError> {
    let read_error = |source| ImportError::Read {
        path: dir.to_owned(),
        source,
    };
    for child in std::fs::read_dir(dir).map_err(read_error)? {
        let child = child.map_err(read_error)?;
        let name = child
            .file_name()
            .into_string()
            .map_err(|_| ImportError::Source {
                path: child.path(),
                reason: "file name is not UTF-8".into(),
            })?;
        let parcel_path = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        add_entry(&child.path(), parcel_path, entries)?;
    }
    Ok(())
}

/// Byte ranges of `file` that hold data (holes excluded); the whole file if the
/// filesystem cannot tell.
fn data_extents(file: &std::fs::File, size: u64) -> Vec<(u64, u64)> {
    use nix::unistd::{Whence, lseek};
    let mut extents = Vec::new();
    let mut offset = 0i64;
    let size = size as i64;
    while offset < size {
        let start = match lseek(file, offset, Whence::SeekData) {
            Ok(start) => start,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(_) => return vec![(0, size as u64)],
        };
        let end = match lseek(file, start, Whence::SeekHole) {
            Ok(end) => end.min(size),
            Err(_) => return vec![(0, size as u64)],
        };
        if end <= start {
            break;
        }
        extents.push((start as u64, end as u64));
        offset = end;
    }
    extents
}

struct ChunkJob {
    file: usize,
    index: usize,
    len: u64,
    /// `None`: the range is a hole, known to be zeros.
    data: Option<Vec<u8>>,
}

struct EncodedJob {
    file: usize,
    index: usize,
    len: u64,
    encoded: EncodedChunk,
}

#[derive(Default)]
struct Counters {
    zero: AtomicU64,
    dedup: AtomicU64,
    uploaded: AtomicU64,
    uploaded_bytes: AtomicU64,
    refreshed: Mutex<Vec<ChunkTag>>,
    stored_bytes: AtomicU64,
}

/// Which chunks found in the store must be young enough (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct Freshness {
    /// Chunks of the parent version: found is enough.
    pub(crate) exempt: HashSet<ChunkTag>,
    /// Other chunks found older than this are refreshed.
    pub(crate) refresh_after: Duration,
}

fn reader_thread(
    files: Vec<(PathBuf, u64)>,
    chunk_size: u64,
    out: crossbeam::channel::Sender<Result<ChunkJob, ImportError>>,
) {
    for (file_index, (path, size)) in files.into_iter().enumerate() {
        let read = || -> Result<(), ImportError> {
            let read_error = |source| ImportError::Read {
                path: path.clone(),
                source,
            };
            let file = std::fs::File::open(&path).map_err(read_error)?;
            let actual = file.metadata().map_err(read_error)?.len();
            if actual != size {
                return Err(ImportError::Source {
                    path: path.clone(),
                    reason: format!(
                        "changed size while importing ({size} → {actual} bytes); stop what writes it and retry"
                    ),
                });
            }
            let extents = data_extents(&file, size);
            let mut next_extent = 0;
            for index in 0..size.div_ceil(chunk_size) {
                let start = index * chunk_size;
                let end = (start + chunk_size).min(size);
                while next_extent < extents.len() && extents[next_extent].1 <= start {
                    next_extent += 1;
                }
                let has_data = next_extent < extents.len() && extents[next_extent].0 < end;
                let data = if has_data {
                    let mut buffer = vec![0u8; (end - start) as usize];
                    file.read_exact_at(&mut buffer, start).map_err(read_error)?;
                    Some(buffer)
                } else {
                    None
                };
                let job = ChunkJob {
                    file: file_index,
                    index: index as usize,
                    len: end - start,
                    data,
                };
                if out.send(Ok(job)).is_err() {
                    return Ok(()); // the pipeline stopped
                }
            }
            Ok(())
        };
        if let Err(e) = read() {
            let _ = out.send(Err(e));
            return;
        }
    }
}

fn encoder_thread(
    mut encoder: ChunkEncoder,
    jobs: crossbeam::channel::Receiver<Result<ChunkJob, ImportError>>,
    out: tokio::sync::mpsc::Sender<Result<EncodedJob, ImportError>>,
) {
    for job in jobs {
        let result = job.map(|job| EncodedJob {
            file: job.file,
            index: job.index,
            len: job.len,
            encoded: match &job.data {
                Some(data) => encoder.encode(data),
                None => EncodedChunk::Zero,
            },
        });
        if out.blocking_send(result).is_err() {
            return;
        }
    }
}

async fn store_chunk(
    writer: &dyn WriteStore,
    seen: &Mutex<HashSet<ChunkTag>>,
    counters: &Counters,
    freshness: Option<&Freshness>,
    encoded: EncodedChunk,
) -> Result<ChunkRef, StoreError> {
    let chunk = encoded.chunk_ref();
    let EncodedChunk::Stored { stored, .. } = encoded else {
        counters.zero.fetch_add(1, Ordering::Relaxed);
        return Ok(chunk);
    };
    let tag = chunk.tag().expect("stored chunks have a tag");
    let first_time = seen.lock().expect("not poisoned").insert(tag);
    if !first_time {
        counters.dedup.fetch_add(1, Ordering::Relaxed);
        return Ok(chunk);
    }
    let len = stored.len() as u64;
    counters.stored_bytes.fetch_add(len, Ordering::Relaxed);
    let key = layout::chunk(&tag);
    let outcome = match freshness {
        Some(freshness) if !freshness.exempt.contains(&tag) => match writer.modified(&key).await? {
            None => writer.put_new(&key, Bytes::from(stored)).await?,
            Some(modified) => {
                let age = std::time::SystemTime::now()
                    .duration_since(modified)
                    .unwrap_or(Duration::ZERO);
                if age >= freshness.refresh_after {
                    writer.put_replace(&key, Bytes::from(stored)).await?;
                    counters.refreshed.lock().expect("not poisoned").push(tag);
                }
                PutOutcome::AlreadyExists
            }
        },
        _ if writer.exists(&key).await? => PutOutcome::AlreadyExists,
        _ => writer.put_new(&key, Bytes::from(stored)).await?,
    };
    match outcome {
        PutOutcome::Created => {
            counters.uploaded.fetch_add(1, Ordering::Relaxed);
            counters.uploaded_bytes.fetch_add(len, Ordering::Relaxed);
        }
        PutOutcome::AlreadyExists => {
            counters.dedup.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(chunk)
}

/// Chunks, encodes and stores `files` (path, size); returns one chunk list per
/// file. With `freshness`, chunks found in the store outside its exempt set
/// are refreshed when older than its limit (see the module doc).
pub(crate) async fn store_files(
    writer: &Arc<dyn WriteStore>,
    secrets: &ParcelSecrets,
    chunk_size: u32,
    settings: ImportSettings,
    files: Vec<(PathBuf, u64)>,
    freshness: Option<&Freshness>,
    progress: &dyn Progress,
) -> Result<(Vec<Vec<ChunkRef>>, ImportCounts), ImportError> {
    let jobs = match settings.jobs {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        n => n,
    };
    let mut results: Vec<Vec<Option<ChunkRef>>> = files
        .iter()
        .map(|(_, size)| vec![None; size.div_ceil(u64::from(chunk_size)) as usize])
        .collect();
    let (job_tx, job_rx) = crossbeam::channel::bounded(2 * jobs);
    let (encoded_tx, mut encoded_rx) = tokio::sync::mpsc::channel(2 * jobs);
    let mut threads = Vec::new();
    threads.push(
        std::thread::Builder::new()
            .name("isr-import-read".into())
            .spawn(move || reader_thread(files, u64::from(chunk_size), job_tx))
            .map_err(|source| ImportError::Read {
                path: PathBuf::from("<thread>"),
                source,
            })?,
    );
    for worker in 0..jobs {
        let encoder = ChunkEncoder::new(secrets.dedup_secret.clone(), settings.zstd_level)
            .map_err(|source| ImportError::Read {
                path: PathBuf::from("<zstd>"),
                source,
            })?;
        let (rx, tx) = (job_rx.clone(), encoded_tx.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("isr-import-encode-{worker}"))
                .spawn(move || encoder_thread(encoder, rx, tx))
                .map_err(|source| ImportError::Read {
                    path: PathBuf::from("<thread>"),
                    source,
                })?,
        );
    }
    drop((job_rx, encoded_tx));

    let seen = Mutex::new(HashSet::new());
    let counters = Counters::default();
    let outcome = futures::stream::poll_fn(|cx| encoded_rx.poll_recv(cx))
        .map(|item| {
            let (seen, counters) = (&seen, &counters);
            async move {
                let job = item?;
                let chunk =
                    store_chunk(writer.as_ref(), seen, counters, freshness, job.encoded).await?;
                Ok::<_, ImportError>((job.file, job.index, job.len, chunk))
            }
        })
        .buffer_unordered(settings.uploads.max(1))
        .try_for_each(|(file, index, len, chunk)| {
            results[file][index] = Some(chunk);
            progress.advance(len);
            futures::future::ready(Ok(()))
        })
        .await;
    drop(encoded_rx);
    tokio::task::spawn_blocking(move || {
        for thread in threads {
            let _ = thread.join();
        }
    })
    .await
    .expect("joining import threads");
    outcome?;

    let chunk_lists = results
        .into_iter()
        .map(|chunks| {
            chunks
                .into_iter()
                .map(|c| c.expect("every chunk was stored"))
                .collect()
        })
        .collect();
    let counts = ImportCounts {
        zero: counters.zero.into_inner(),
        dedup: counters.dedup.into_inner(),
        uploaded: counters.uploaded.into_inner(),
        uploaded_bytes: counters.uploaded_bytes.into_inner(),
        refreshed: counters.refreshed.into_inner().expect("not poisoned"),
        stored_bytes: counters.stored_bytes.into_inner(),
    };
    Ok((chunk_lists, counts))
}

/// Counts from [`store_files`].
#[derive(Debug, Clone, Default)]
pub(crate) struct ImportCounts {
    zero: u64,
    dedup: u64,
    uploaded: u64,
    uploaded_bytes: u64,
    /// Chunks found older than a quarter of the grace period and refreshed.
    refreshed: Vec<ChunkTag>,
    stored_bytes: u64,
}

/// Opens or creates the parcel the import writes to, and the version it makes.
async fn prepare_parcel(
    store: &StoreHandle,
    request: &ImportRequest<'_>,
    credentials: &[Credential],
) -> Result<(OpenParcel, u64, Option<u64>), ImportError> {
    let name = request.name;
    if request.new_version && request.dedup_with.is_some() {
        return Err(ImportError::Option {
            reason: "--dedup-with only applies when creating a parcel; versions of a parcel always share its dedup secret".into(),
        });
    }
    let existing = parcel::read_record(store, name).await?;
    if let (Some(record), Some(wanted)) = (&existing, request.chunk_size) {
        if record.chunk_size != wanted {
            return Err(ImportError::Option {
                reason: format!(
                    "parcel {name} has chunk size {}, fixed when it was created; drop --chunk-size {wanted}",
                    record.chunk_size
                ),
            });
        }
    }
    let dedup_secret = match request.dedup_with {
        Some(other) => Some(
            parcel::open(store, other, credentials)
                .await?
                .secrets
                .dedup_secret,
        ),
        None => None,
    };
    let Some(record) = existing else {
        if request.new_version {
            return Err(ParcelError::NotFound {
                name: name.to_owned(),
                store: store.url().to_owned(),
            }
            .into());
        }
        let secrets = ParcelSecrets::generate(dedup_secret);
        let parcel = parcel::create(
            store,
            name,
            request.chunk_size.unwrap_or(request.settings.chunk_size),
            secrets,
            credentials,
            request.kdf,
        )
        .await?;
        return Ok((parcel, 1, None));
    };
    let versions = parcel::list_versions(store, name).await?;
    if let Some(&latest) = versions.last() {
        if !request.new_version {
            return Err(ParcelError::Exists {
                name: name.to_owned(),
            }
            .into());
        }
        // Fail before uploading anything (the commit checks again).
        parcel::check_not_locked(store, name, None).await?;
        let parcel = parcel::open(store, name, credentials).await?;
        return Ok((parcel, latest + 1, Some(latest)));
    }
    // The parcel record exists but no version: an earlier import of it was
    // interrupted. Finish that import (reusing its secrets, so chunks already
    // uploaded are found again).
    tracing::info!(
        parcel = name,
        "continuing an interrupted import of a new parcel"
    );
    let parcel = if parcel::read_keyslots(store, name).await?.is_empty() {
        let secrets = ParcelSecrets::generate(dedup_secret);
        parcel::complete_creation(store, name, record, secrets, credentials, request.kdf).await?
    } else {
        parcel::open(store, name, credentials).await?
    };
    Ok((parcel, 1, None))
}

/// Imports `request.paths` as a new parcel or a new version of one.
pub async fn import(
    store: &StoreHandle,
    request: &ImportRequest<'_>,
    credentials: &[Credential],
    progress: &dyn Progress,
) -> Result<ImportSummary, ImportError> {
    let started = Instant::now();
    parcel::validate_name(request.name)?;
    let writer = store.writer("import")?.clone();
    let sources = scan(request.paths)?;
    let (parcel, version, parent) = prepare_parcel(store, request, credentials).await?;
    let chunk_size = parcel.record.chunk_size;

    let files: Vec<(PathBuf, u64)> = sources
        .iter()
        .filter_map(|s| s.size.map(|size| (s.source.clone(), size)))
        .collect();
    let logical_bytes: u64 = files.iter().map(|(_, size)| size).sum();
    // Chunks of the parent need no refresh (see the module doc).
    let exempt = match parent {
        Some(parent) => {
            let manifest = parcel::read_manifest(store, &parcel, parent).await?;
            parcel::distinct_chunks(&manifest)
                .into_iter()
                .map(|(tag, ..)| tag)
                .collect()
        }
        None => HashSet::new(),
    };
    let freshness = Freshness {
        exempt,
        refresh_after: request.gc_grace / 4,
    };
    let mut passes = 0;
    let mut earlier_uploads = (0, 0);
    let (manifest, counts) = loop {
        passes += 1;
        let pass_started = Instant::now();
        progress.start(&format!("importing {}", request.name), logical_bytes);
        let (chunk_lists, counts) = store_files(
            &writer,
            &parcel.secrets,
            chunk_size,
            request.settings,
            files.clone(),
            Some(&freshness),
            progress,
        )
        .await?;
        progress.finish();

        let mut chunk_lists = chunk_lists.into_iter();
        let entries: Vec<Entry> = sources
            .iter()
            .map(|source| Entry {
                path: source.parcel_path.clone(),
                mode: source.mode,
                mtime: source.mtime,
                kind: match source.size {
                    None => EntryKind::Directory,
                    Some(size) => EntryKind::File {
                        size,
                        chunks: chunk_lists.next().expect("one chunk list per file"),
                    },
                },
            })
            .collect();
        let manifest = Manifest {
            version,
            parent,
            created: Timestamp::now(),
            lock_nonce: None,
            host: parcel::host_name(),
            message: request.message.clone(),
            chunk_size,
            entries,
        };
        let lost = crate::gc::finish_pass(store, &counts.refreshed).await?;
        if lost.is_empty() && pass_started.elapsed() < freshness.refresh_after {
            break (manifest, counts);
        }
        if passes >= MAX_PASSES {
            return Err(ImportError::TooSlow {
                parcel: request.name.to_owned(),
                passes,
                grace_secs: request.gc_grace.as_secs(),
            });
        }
        tracing::info!(
            parcel = request.name,
            seconds = pass_started.elapsed().as_secs_f64(),
            lost = lost.len(),
            "the pass took a quarter of the gc grace period or longer, or gc deleted chunks it refreshed; checking the chunks again before committing"
        );
        earlier_uploads.0 += counts.uploaded;
        earlier_uploads.1 += counts.uploaded_bytes;
    };
    parcel::commit(store, &parcel, &manifest).await?;
    let seconds = started
        .elapsed()
        .max(Duration::from_micros(1))
        .as_secs_f64();
    Ok(ImportSummary {
        parcel: request.name.to_owned(),
        version,
        files: manifest.files().count() as u64,
        logical_bytes,
        chunks: manifest.chunk_count(),
        zero_chunks: counts.zero,
        // Chunks an earlier pass uploaded were found again by the last one.
        deduplicated_chunks: counts.dedup.saturating_sub(earlier_uploads.0),
        uploaded_chunks: counts.uploaded + earlier_uploads.0,
        uploaded_bytes: counts.uploaded_bytes + earlier_uploads.1,
        refreshed_chunks: counts.refreshed.len() as u64,
        passes,
        stored_bytes: counts.stored_bytes,
        seconds,
        bytes_per_second: logical_bytes as f64 / seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use crate::store::memory::MemoryStore;
    use zeroize::Zeroizing;

    fn request<'a>(name: &'a str, paths: &'a [PathBuf], new_version: bool) -> ImportRequest<'a> {
        ImportRequest {
            name,
            paths,
            new_version,
            settings: ImportSettings {
                chunk_size: 65536,
                zstd_level: 3,
                jobs: 2,
                uploads: 4,
            },
            kdf: KdfParams {
                memory_kib: 64,
                iterations: 1,
                parallelism: 1,
            },
            message: String::new(),
            dedup_with: None,
            chunk_size: None,
            gc_grace: Duration::from_secs(86_400),
        }
    }

    fn pass() -> Vec<Credential> {
        vec![Credential::Passphrase(Zeroizing::new("pw".into()))]
    }

    #[tokio::test]
    async fn import_twice_uploads_nothing_new() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(dir.path().join("a.img"), &data).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b"), vec![0u8; 200_000]).unwrap();
        let memory = MemoryStore::new();
        let store = StoreHandle::full(memory.clone());
        let paths = [dir.path().to_owned()];
        let first = import(&store, &request("p", &paths, false), &pass(), &NoProgress)
            .await
            .unwrap();
        assert_eq!(first.version, 1);
        assert_eq!(first.chunks, 5 + 4);
        assert_eq!(first.zero_chunks, 4);
        assert!(first.uploaded_chunks > 0);
        let second = import(&store, &request("p", &paths, true), &pass(), &NoProgress)
            .await
            .unwrap();
        assert_eq!(second.version, 2);
        assert_eq!(second.uploaded_chunks, 0);
        assert_eq!(second.uploaded_bytes, 0);
        assert!(matches!(
            import(&store, &request("p", &paths, false), &pass(), &NoProgress).await,
            Err(ImportError::Parcel(ParcelError::Exists { .. }))
        ));
        assert_eq!(memory.count("parcels/p/versions/"), 2);
    }

    #[tokio::test]
    async fn reused_chunks_outside_the_parent_are_refreshed_when_old() {
        let dir = tempfile::tempdir().unwrap();
        let part = |seed: &str| {
            let mut out = vec![0u8; 2 * 65536];
            blake3::Hasher::new()
                .update(seed.as_bytes())
                .finalize_xof()
                .fill(&mut out);
            out
        };
        let memory = MemoryStore::new();
        let store = StoreHandle::full(memory.clone());
        let mut versions = Vec::new();
        for (i, other) in ["b", "c", "b"].iter().enumerate() {
            let source = dir.path().join(format!("v{i}"));
            std::fs::create_dir(&source).unwrap();
            std::fs::write(source.join("disk"), [part("a"), part(other)].concat()).unwrap();
            let paths = [source];
            // Before the third import everything is old and version 1 is
            // gone (as after gc): B's chunks are orphans, A's are the parent's.
            if i == 2 {
                let old = std::time::SystemTime::now() - Duration::from_secs(3 * 86_400);
                for key in memory_keys(&memory).await {
                    memory.set_modified(&key, old);
                }
                store
                    .writer("test")
                    .unwrap()
                    .delete(&layout::manifest("p", 1))
                    .await
                    .unwrap();
            }
            let summary = import(&store, &request("p", &paths, i > 0), &pass(), &NoProgress)
                .await
                .unwrap();
            versions.push(summary);
        }
        assert_eq!(
            versions[1].refreshed_chunks, 0,
            "young chunks are left alone"
        );
        assert_eq!(versions[2].uploaded_chunks, 0);
        assert_eq!(versions[2].refreshed_chunks, 2, "B's chunks, not A's");
        assert_eq!(versions[2].passes, 1);
    }

    async fn memory_keys(memory: &MemoryStore) -> Vec<String> {
        use crate::store::ListStore;
        memory.list("").await.unwrap()
    }

    #[test]
    fn scan_refuses_symlinks_and_missing_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        std::os::unix::fs::symlink("f", dir.path().join("link")).unwrap();
        let err = scan(&[dir.path().to_owned()]).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        let err = scan(&[dir.path().join("nope")]).unwrap_err();
        assert!(matches!(err, ImportError::SourceMissing { .. }));
        let entries = scan(&[dir.path().join("f")]).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].parcel_path, "f");
    }

    #[test]
    fn sparse_files_report_their_extents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(b"data", 32 << 20).unwrap();
        let extents = data_extents(&file, 64 << 20);
        let covered: u64 = extents.iter().map(|(s, e)| e - s).sum();
        assert!(covered < 64 << 20, "holes not detected: {extents:?}");
        assert!(extents.iter().any(|&(s, e)| s <= 32 << 20 && e > 32 << 20));
    }
}
