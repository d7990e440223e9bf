//! Export (rebuild a version's files exactly) and verify (check every chunk).
//!
//! Export writes each file as a hidden partial file and renames it into place
//! only when every chunk has been fetched, verified and written, so a failure
//! never leaves a file with wrong bytes under its real name. Zero chunks become
//! holes; a chunk used many times in a file is fetched once. Verify fetches each distinct chunk once, checks its length and tag
//! and, with `deep`, decrypts it and checks the plaintext against its key; it
//! reports every bad chunk, not just the first.

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{StreamExt, TryStreamExt};

use crate::chunk::{self, ChunkError, ChunkRef, ChunkTag};
use crate::error::{Classify, ErrorClass};
use crate::layout;
use crate::manifest::{EntryKind, Manifest};
use crate::parcel::{self, OpenParcel};
use crate::progress::Progress;
use crate::store::{StoreError, StoreHandle};

/// Errors of export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The destination exists and is not an empty directory.
    #[error("{} exists and is not an empty directory; export into a new or empty directory", path.display())]
    DestinationNotEmpty {
        /// Destination.
        path: PathBuf,
    },
    /// Writing the output failed.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A chunk is missing from the store.
    #[error(
        "{file} at offset {offset}: chunk {tag} is missing from the store (run `isrctl verify` to list every damaged chunk)"
    )]
    MissingChunk {
        /// Chunk.
        tag: ChunkTag,
        /// Parcel path of the file.
        file: String,
        /// Byte offset in the file.
        offset: u64,
    },
    /// A chunk failed verification.
    #[error(
        "{file} at offset {offset}: {source} (run `isrctl verify` to list every damaged chunk)"
    )]
    BadChunk {
        /// Parcel path of the file.
        file: String,
        /// Byte offset in the file.
        offset: u64,
        /// What failed.
        source: ChunkError,
    },
    /// A store operation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for ExportError {
    fn class(&self) -> ErrorClass {
        match self {
            ExportError::DestinationNotEmpty { .. } => ErrorClass::Invalid,
            ExportError::Write { .. } => ErrorClass::Other,
            ExportError::MissingChunk { .. } | ExportError::BadChunk { .. } => {
                ErrorClass::Integrity
            }
            ExportError::Store(e) => e.class(),
        }
    }
}

/// What an export did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportSummary {
    /// Files written.
    pub files: u64,
    /// Bytes of all files.
    pub logical_bytes: u64,
    /// Stored bytes fetched.
    pub fetched_bytes: u64,
}

fn write_error(path: &Path) -> impl Fn(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Write {
        path: path.to_owned(),
        source,
    }
}

fn prepare_destination(dest: &Path) -> Result<(), ExportError> {
    match std::fs::read_dir(dest) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(ExportError::DestinationNotEmpty {
                    path: dest.to_owned(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dest).map_err(write_error(dest))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            Err(ExportError::DestinationNotEmpty {
                path: dest.to_owned(),
            })
        }
        Err(e) => Err(write_error(dest)(e)),
    }
}

/// Fetches, verifies and decodes one chunk; a copy that fails (a damaged
/// or stale one from a cache tier) is fetched once more from the store itself.
async fn fetch_chunk(
    store: &StoreHandle,
    parcel: &OpenParcel,
    chunk: &ChunkRef,
    file: &str,
    offset: u64,
) -> Result<bytes::Bytes, ExportError> {
    let ChunkRef::Stored { tag, key, .. } = chunk else {
        unreachable!("zero chunks are not fetched")
    };
    let object = layout::chunk(tag);
    let missing = |e: StoreError| match e {
        StoreError::NotFound { .. } => ExportError::MissingChunk {
            tag: *tag,
            file: file.to_owned(),
            offset,
        },
        other => other.into(),
    };
    let decode = |stored: bytes::Bytes| {
        let (tag, key, secret) = (*tag, key.clone(), parcel.secrets.dedup_secret.clone());
        tokio::task::spawn_blocking(move || chunk::decode(&secret, tag, &key, stored))
    };
    let stored = store.reader().get(&object).await.map_err(missing)?;
    let decoded = match decode(stored).await.expect("decode task") {
        Ok(plaintext) => Ok(plaintext),
        Err(error) => {
            // Debug, not warn: the command's one error line says it if the
            // store's own copy is bad too.
            tracing::debug!(chunk = %tag, %error, "chunk failed verification; fetching it from the store itself");
            let stored = store
                .reader()
                .get_uncached(&object)
                .await
                .map_err(missing)?;
            decode(stored).await.expect("decode task")
        }
    };
    decoded.map_err(|source| ExportError::BadChunk {
        file: file.to_owned(),
        offset,
        source,
    })
}

/// The distinct stored chunks of one file, each with the chunk indices using it,
/// in order of first use.
fn chunk_uses(chunks: &[ChunkRef]) -> Vec<(&ChunkRef, Vec<usize>)> {
    let mut position: HashMap<ChunkTag, usize> = HashMap::new();
    let mut uses: Vec<(&ChunkRef, Vec<usize>)> = Vec::new();
    for (index, chunk) in chunks.iter().enumerate() {
        let Some(tag) = chunk.tag() else { continue };
        match position.get(&tag) {
            Some(&at) => uses[at].1.push(index),
            None => {
                position.insert(tag, uses.len());
                uses.push((chunk, vec![index]));
            }
        }
    }
    uses
}

/// Writes every file of `manifest` under `dest` (new or empty directory).
pub async fn export(
    store: &StoreHandle,
    parcel: &OpenParcel,
    manifest: &Manifest,
    dest: &Path,
    concurrency: usize,
    progress: &dyn Progress,
) -> Result<ExportSummary, ExportError> {
    prepare_destination(dest)?;
    let chunk_size = u64::from(manifest.chunk_size);
    let fetched = AtomicU64::new(0);
    progress.start("exporting", manifest.logical_size());
    for entry in &manifest.entries {
        let target = dest.join(&entry.path);
        let (size, chunks) = match &entry.kind {
            EntryKind::Directory => {
                std::fs::create_dir(&target).map_err(write_error(&target))?;
                continue;
            }
            EntryKind::File { size, chunks } => (*size, chunks),
        };
        let file_name = target
            .file_name()
            .expect("entries have names")
            .to_string_lossy();
        let partial = target.with_file_name(format!(".{file_name}.isr-partial"));
        let result = async {
            let file = Arc::new(std::fs::File::create(&partial).map_err(write_error(&partial))?);
            file.set_len(size).map_err(write_error(&partial))?;
            // Each distinct chunk is fetched and decoded once, then written at
            // every offset of this file that uses it.
            let uses = chunk_uses(chunks);
            futures::stream::iter(uses.iter())
                .map(|(chunk, indices)| {
                    let file = file.clone();
                    let (partial, fetched) = (&partial, &fetched);
                    async move {
                        let first_offset = indices[0] as u64 * chunk_size;
                        let plaintext = Arc::new(
                            fetch_chunk(store, parcel, chunk, &entry.path, first_offset).await?,
                        );
                        if let ChunkRef::Stored { stored_len, .. } = chunk {
                            fetched.fetch_add(u64::from(*stored_len), Ordering::Relaxed);
                        }
                        for &index in indices {
                            let offset = index as u64 * chunk_size;
                            let expected = (size - offset).min(chunk_size);
                            // A chunk may end early (the rest is zeros, and the
                            // file was set to its size above) or run past the end
                            // of the file with zeros (a session wrote it whole).
                            let (within, beyond) =
                                plaintext.split_at((expected as usize).min(plaintext.len()));
                            if beyond.iter().any(|&b| b != 0) {
                                return Err(ExportError::BadChunk {
                                    file: entry.path.clone(),
                                    offset,
                                    source: ChunkError::Decompress {
                                        tag: chunk.tag().expect("stored"),
                                        reason: format!(
                                            "{} bytes, not zeros past the file's {expected}",
                                            plaintext.len()
                                        ),
                                    },
                                });
                            }
                            let within_len = within.len();
                            let (file, plaintext, path) =
                                (file.clone(), plaintext.clone(), partial.clone());
                            tokio::task::spawn_blocking(move || {
                                file.write_all_at(&plaintext[..within_len], offset)
                            })
                            .await
                            .expect("write task")
                            .map_err(write_error(&path))?;
                            progress.advance(expected);
                        }
                        Ok(())
                    }
                })
                .buffer_unordered(concurrency.max(1))
                .try_collect::<()>()
                .await?;
            file.sync_all().map_err(write_error(&partial))?;
            file.set_permissions(std::fs::Permissions::from_mode(entry.mode))
                .map_err(write_error(&partial))?;
            file.set_modified(entry.mtime.to_system_time())
                .map_err(write_error(&partial))?;
            std::fs::rename(&partial, &target).map_err(write_error(&target))
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result?;
    }
    // Directory modes and times last, deepest first: writing inside a directory changes its mtime.
    for entry in manifest.entries.iter().rev() {
        if matches!(entry.kind, EntryKind::Directory) {
            let target = dest.join(&entry.path);
            let dir = std::fs::File::open(&target).map_err(write_error(&target))?;
            dir.set_modified(entry.mtime.to_system_time())
                .map_err(write_error(&target))?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(entry.mode))
                .map_err(write_error(&target))?;
        }
    }
    progress.finish();
    Ok(ExportSummary {
        files: manifest.files().count() as u64,
        logical_bytes: manifest.logical_size(),
        fetched_bytes: fetched.into_inner(),
    })
}

/// One chunk that failed verification.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BadChunk {
    /// Chunk name (hex).
    pub tag: String,
    /// Object key in the store.
    pub object: String,
    /// First file that uses it.
    pub file: String,
    /// Offset in that file.
    pub offset: u64,
    /// What is wrong.
    pub problem: String,
}

/// Result of [`verify`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// Parcel.
    pub parcel: String,
    /// Version checked.
    pub version: u64,
    /// Whether chunks were decrypted too.
    pub deep: bool,
    /// Distinct stored chunks checked.
    pub chunks_checked: u64,
    /// Stored bytes read.
    pub bytes_checked: u64,
    /// Every bad chunk.
    pub bad_chunks: Vec<BadChunk>,
}

/// Checks that every chunk `manifest` references exists and matches its tag
/// (and, if `deep`, decrypts to plaintext matching its key).
pub async fn verify(
    store: &StoreHandle,
    parcel: &OpenParcel,
    manifest: &Manifest,
    deep: bool,
    concurrency: usize,
    progress: &dyn Progress,
) -> Result<VerifyReport, StoreError> {
    let distinct = parcel::distinct_chunks(manifest);
    let total: u64 = distinct
        .iter()
        .map(|(_, chunk, _, _)| match chunk {
            ChunkRef::Stored { stored_len, .. } => u64::from(*stored_len),
            ChunkRef::Zero => 0,
        })
        .sum();
    progress.start(
        if deep {
            "verifying (deep)"
        } else {
            "verifying"
        },
        total,
    );
    let bytes_checked = AtomicU64::new(0);
    let outcomes: Vec<Option<BadChunk>> = futures::stream::iter(distinct.iter())
        .map(|(tag, chunk, file, offset)| {
            let bytes_checked = &bytes_checked;
            async move {
                let ChunkRef::Stored {
                    key, stored_len, ..
                } = chunk
                else {
                    return Ok(None);
                };
                let object = layout::chunk(tag);
                let bad = |problem: String| {
                    Some(BadChunk {
                        tag: tag.to_hex(),
                        object: object.clone(),
                        file: (*file).to_owned(),
                        offset: *offset,
                        problem,
                    })
                };
                // The store's own copy, past any cache tier: that is what
                // is verified.
                let stored = match store.reader().get_uncached(&object).await {
                    Ok(stored) => stored,
                    Err(StoreError::NotFound { .. }) => {
                        return Ok(bad("missing from the store".into()));
                    }
                    Err(e) => return Err(e),
                };
                bytes_checked.fetch_add(stored.len() as u64, Ordering::Relaxed);
                progress.advance(u64::from(*stored_len));
                if stored.len() != *stored_len as usize {
                    return Ok(bad(format!(
                        "length {} instead of {stored_len} (truncated or replaced)",
                        stored.len()
                    )));
                }
                let (tag, key, secret) = (*tag, key.clone(), parcel.secrets.dedup_secret.clone());
                let check = tokio::task::spawn_blocking(move || {
                    if deep {
                        chunk::decode(&secret, tag, &key, stored).map(drop)
                    } else {
                        chunk::verify_tag(tag, &stored)
                    }
                })
                .await
                .expect("verify task");
                Ok(check.err().and_then(|e| bad(e.to_string())))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    progress.finish();
    Ok(VerifyReport {
        parcel: parcel.name.clone(),
        version: manifest.version,
        deep,
        chunks_checked: distinct.len() as u64,
        bytes_checked: bytes_checked.into_inner(),
        bad_chunks: outcomes.into_iter().flatten().collect(),
    })
}
