//! Sync and checkin: a session's state back to the store as a new version.
//!
//! Both take a point-in-time snapshot of the image ([`Image::snapshot`]),
//! upload the chunks the snapshot references that the store may lack, and
//! commit the manifest with one create-only put carrying the lock's nonce.
//! Checkin first freezes the image (changes fail with EROFS, reads go on), and
//! afterwards the daemon unmounts and [`Session::close`]s it.
//!
//! Every step can be cut short and run again:
//! - uploads are create-only and recorded in the upload journal;
//! - the commit is one create-only put, so a version is either whole or absent;
//! - a rerun that finds the newest version carries this session's lock nonce
//!   knows an earlier run committed it, and commits again only if the image
//!   changed since (never a duplicate version);
//! - `checked_in` in the session record marks a committed checkin whose
//!   clean-up a rerun (or the next resume) finishes.
//!
//! Garbage collection deletes unreferenced chunks older than its grace period
//! G (see [`crate::gc`]). So that a chunk this commit relies on cannot be one
//! of them, every chunk the new version references beyond its base version
//! is confirmed written less than G/4 ago (the upload journal's time), or is
//! uploaded, or — found in the store older than that — refreshed with
//! `put_replace`; the pass ends with [`crate::gc::finish_pass`] (a store
//! sync; a gc deleting a refreshed chunk is waited out, and what it deleted
//! is uploaded again), and if it took G/4 or
//! longer it is repeated, so the commit lands within G/2 of every
//! confirmation. The base version's own
//! chunks are safe because gc keeps the version a lock names.

use std::collections::HashSet;
use std::time::Instant;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::trickle::{local_chunk, upload_new};
use super::{Session, SessionError, check_lock, memory, write_record};
use crate::cache::Durability;
use crate::chunk::ChunkTag;
use crate::fetch::Priority;
use crate::image::ImageError;
use crate::image::journal::unix_now;
use crate::layout;
use crate::manifest::tree::Root;
use crate::manifest::{Manifest, Timestamp};
use crate::parcel::{self, OpenParcel, ParcelError};

/// What a sync or checkin did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitReport {
    /// Parcel the version was committed to.
    pub parcel: String,
    /// The version now holding the session's state.
    pub version: u64,
    /// False when nothing had changed since `version`, so no version was made.
    pub committed: bool,
    /// Its parent version.
    pub parent: Option<u64>,
    /// Chunks of files uploaded by this commit.
    pub uploaded_chunks: u64,
    /// Stored bytes uploaded by this commit.
    pub uploaded_bytes: u64,
    /// Chunks rewritten only to restart gc's grace period for them.
    pub refreshed_chunks: u64,
    /// Chunks already in the store (trickle upload, an earlier run, dedup).
    pub present_chunks: u64,
    /// Distinct stored chunks of the version that its parent does not have.
    pub new_chunks: u64,
    /// Their stored bytes.
    pub new_bytes: u64,
    /// Stored bytes of the version's manifest this commit uploaded: the
    /// root and the segments the store did not have (format 2).
    #[serde(default)]
    pub manifest_bytes: u64,
    /// Wall time of the commit.
    pub seconds: f64,
    /// True when an earlier request already did this checkin.
    #[serde(default)]
    pub already_done: bool,
    /// Files of the session the version leaves out: lazy memory's RAM file
    /// without its device state (the VM runs, or crashed: the version holds
    /// the disks alone and its next resume boots), see [`super::memory`].
    #[serde(default)]
    pub left_out: Vec<String>,
}

impl CommitReport {
    /// The answer for a checkin an earlier request committed (`version`).
    pub fn finished_earlier(parcel: &str, version: u64) -> CommitReport {
        CommitReport {
            parcel: parcel.to_owned(),
            version,
            committed: true,
            parent: None,
            uploaded_chunks: 0,
            uploaded_bytes: 0,
            refreshed_chunks: 0,
            present_chunks: 0,
            new_chunks: 0,
            new_bytes: 0,
            manifest_bytes: 0,
            seconds: 0.0,
            already_done: true,
            left_out: Vec::new(),
        }
    }
}

fn nonce_bytes(hex_nonce: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    hex::decode_to_slice(hex_nonce, &mut out).ok()?;
    Some(out)
}

#[derive(Debug, Default)]
struct UploadTally {
    /// Chunks of files uploaded, and their bytes.
    uploaded_chunks: u64,
    uploaded_bytes: u64,
    /// Bytes of manifest segments uploaded.
    segment_bytes: u64,
    present_chunks: u64,
    /// Chunks found older than G/4 and refreshed.
    refreshed: Vec<ChunkTag>,
}

impl Session {
    /// Commits the session's current state as a new version while it stays
    /// mounted and writable (`isrctl sync`), or, with `save_as`, as version 1
    /// of that new parcel (which must share this parcel's dedup secret and
    /// chunk size).
    pub async fn commit(
        &self,
        message: &str,
        save_as: Option<&OpenParcel>,
    ) -> Result<CommitReport, SessionError> {
        let _one_at_a_time = self.commit_lock.lock().await;
        if let Some(report) = self.earlier_checkin() {
            return Ok(report);
        }
        self.commit_locked(message, save_as).await
    }

    /// The answer of the checkin that already ended this session, if any.
    fn earlier_checkin(&self) -> Option<CommitReport> {
        let report = self.checked_in.lock().expect("checked_in lock").clone()?;
        Some(CommitReport {
            already_done: true,
            ..report
        })
    }

    async fn commit_locked(
        &self,
        message: &str,
        save_as: Option<&OpenParcel>,
    ) -> Result<CommitReport, SessionError> {
        let started = Instant::now();
        // The snapshot needs every chunk list of the base (a commit right
        // after a resume waits for the segments still loading).
        self.base
            .load(|_| Some(Priority::Demand))
            .await
            .map_err(ImageError::from)?;
        let (image, base) = (self.image.clone(), self.base.clone());
        let (mut snapshot, pinned, config) = tokio::task::spawn_blocking(move || {
            image.persist_trace()?;
            let (snapshot, pinned) = image.snapshot(base.header())?;
            Ok::<_, crate::image::ImageError>((snapshot, pinned, memory::image_vm_config(&image)))
        })
        .await
        .expect("snapshot task")?;
        let left_out = memory::leave_out_unpaired(&mut snapshot, config.as_ref());
        if !left_out.is_empty() {
            tracing::info!(parcel = %self.parcel.name, ?left_out, "lazy memory without its device state: the version holds the disks alone");
        }
        let result = self
            .commit_snapshot(snapshot, message, save_as, started)
            .await
            .map(|report| CommitReport { left_out, ..report });
        self.context.cache.unpin(pinned.iter());
        result
    }

    async fn commit_snapshot(
        &self,
        snapshot: Manifest,
        message: &str,
        save_as: Option<&OpenParcel>,
        started: Instant,
    ) -> Result<CommitReport, SessionError> {
        let trace = self.image.trace();
        let record = self.record();
        let nonce = nonce_bytes(&record.lock_nonce);

        // Where the new version goes, and what it is compared with.
        let (target, version, parent) = match save_as {
            Some(new) => (new, 1, None),
            None => {
                check_lock(&self.store, &record).await?;
                let mut parent = record.committed.unwrap_or(record.base_version);
                let newest = parcel::list_versions(&self.store, &self.parcel.name)
                    .await?
                    .last()
                    .copied()
                    .unwrap_or(parent);
                let newest_at_resume = record.newest_at_resume.unwrap_or(record.base_version);
                if newest > parent.max(newest_at_resume) {
                    let stored = parcel::read_stored(&self.store, &self.parcel, newest).await?;
                    let lock_nonce = stored.header().lock_nonce;
                    if lock_nonce.is_none() || lock_nonce != nonce {
                        return Err(SessionError::Diverged {
                            name: self.parcel.name.clone(),
                            version: newest,
                        });
                    }
                    parent = newest; // an earlier run of this commit got that far
                }
                (&self.parcel, newest + 1, Some(parent))
            }
        };
        // The parent's chunks, whether the snapshot is the parent, and the
        // parent's parent (the base was loaded whole before the snapshot).
        let (parent_tags, unchanged, grandparent): (HashSet<ChunkTag>, bool, Option<u64>) =
            match parent {
                Some(v) if v == record.base_version => (
                    self.base.stored_chunks().map(|(tag, _)| tag).collect(),
                    self.base.same_files(&snapshot),
                    self.base.header().parent,
                ),
                Some(v) => {
                    let parent = parcel::read_manifest(&self.store, &self.parcel, v).await?;
                    (
                        parent.stored_chunks().map(|(tag, _)| tag).collect(),
                        parent.entries == snapshot.entries,
                        parent.parent,
                    )
                }
                None => (HashSet::new(), false, None),
            };
        let mut new_chunks = HashSet::new();
        let new_bytes: u64 = snapshot
            .stored_chunks()
            .filter(|(tag, _)| !parent_tags.contains(tag) && new_chunks.insert(*tag))
            .map(|(_, len)| len)
            .sum();
        if let Some(parent) = parent
            && unchanged
        {
            // No new version; the trace still helps the next resume of this
            // one if it has none yet.
            self.store_trace(&self.parcel, parent, &trace).await;
            self.note_committed(parent)?;
            return Ok(CommitReport {
                parcel: self.parcel.name.clone(),
                version: parent,
                committed: false,
                parent: grandparent,
                uploaded_chunks: 0,
                uploaded_bytes: 0,
                refreshed_chunks: 0,
                present_chunks: 0,
                new_chunks: 0,
                new_bytes: 0,
                manifest_bytes: 0,
                seconds: started.elapsed().as_secs_f64(),
                already_done: false,
                left_out: Vec::new(),
            });
        }

        // The new version's segments; those its base version does not share
        // are uploaded with the chunks (from the cache, like them).
        let split = parcel::split(target, &snapshot)?;
        let base_segments = self.base.segment_tags();
        let new_segments: Vec<(ChunkTag, &[u8])> = split
            .encoded
            .iter()
            .filter_map(|(reference, bytes)| Some((reference.tag()?, bytes.as_slice())))
            .filter(|(tag, _)| save_as.is_some() || !base_segments.contains(tag))
            .collect();
        // Pinned first: inserting evicts down to the cache's limit.
        let segment_tags: Vec<ChunkTag> = new_segments.iter().map(|(tag, _)| *tag).collect();
        self.context.cache.pin(segment_tags.iter());
        if let Err(e) = self
            .context
            .cache
            .insert_all(&new_segments, Durability::Durable)
        {
            self.context.cache.unpin(segment_tags.iter());
            return Err(e.into());
        }
        let result = self
            .commit_split(
                split.root,
                &snapshot,
                &segment_tags,
                message,
                save_as,
                version,
                parent,
            )
            .await;
        self.context.cache.unpin(segment_tags.iter());
        let (tally, header, root_bytes) = result?;
        drop(split.encoded); // uploaded: free them before the working set is read
        let manifest = Manifest {
            entries: snapshot.entries,
            ..header
        };

        tracing::info!(parcel = %target.name, version, "committed");
        self.store_trace(target, version, &trace).await;
        let working_set = memory::working_set_tags(&self.image, &manifest);
        self.store_working_set(target, version, &working_set).await;
        if save_as.is_none() {
            self.note_committed(version)?;
        }
        Ok(CommitReport {
            parcel: target.name.clone(),
            version,
            committed: true,
            parent,
            uploaded_chunks: tally.uploaded_chunks,
            uploaded_bytes: tally.uploaded_bytes,
            refreshed_chunks: tally.refreshed.len() as u64,
            present_chunks: tally.present_chunks,
            new_chunks: new_chunks.len() as u64,
            new_bytes,
            manifest_bytes: root_bytes + tally.segment_bytes,
            seconds: started.elapsed().as_secs_f64(),
            already_done: false,
            left_out: Vec::new(),
        })
    }

    /// Uploads what the new version needs beyond its base version (this
    /// session's chunks and `segments`) and commits its root; returns the
    /// upload tally, the committed manifest's header (its entries are the
    /// snapshot's) and the root's stored size.
    #[allow(clippy::too_many_arguments)]
    async fn commit_split(
        &self,
        root: Root,
        snapshot: &Manifest,
        segments: &[ChunkTag],
        message: &str,
        save_as: Option<&OpenParcel>,
        version: u64,
        parent: Option<u64>,
    ) -> Result<(UploadTally, Manifest, u64), SessionError> {
        let target = save_as.unwrap_or(&self.parcel);
        // Chunks beyond the base version: this session's (and its syncs').
        let base_tags: HashSet<ChunkTag> = self.base.stored_chunks().map(|(t, _)| t).collect();
        let mut needed: Vec<ChunkTag> = snapshot
            .stored_chunks()
            .map(|(tag, _)| tag)
            .filter(|tag| save_as.is_some() || !base_tags.contains(tag))
            .chain(segments.iter().copied())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        needed.sort();
        // (The snapshot pinned them: a write after it may supersede them.)
        let tally = self
            .ensure_uploaded_in_time(
                &needed,
                &segments.iter().copied().collect(),
                save_as.is_some(),
            )
            .await?;

        let record = self.record();
        if save_as.is_none() {
            check_lock(&self.store, &record).await?;
        }
        let header = Manifest {
            version,
            parent,
            created: Timestamp::now(),
            lock_nonce: if save_as.is_some() {
                None
            } else {
                nonce_bytes(&record.lock_nonce)
            },
            host: crate::parcel::host_name(),
            message: message.to_owned(),
            ..root.manifest
        };
        let root = Root {
            manifest: header,
            ..root
        };
        let root_bytes = match parcel::commit_root(&self.store, target, &root).await {
            Ok(bytes) => bytes,
            Err(ParcelError::VersionExists { name, version }) => {
                return Err(SessionError::Diverged { name, version });
            }
            Err(e) => return Err(e.into()),
        };
        Ok((tally, root.manifest, root_bytes))
    }

    /// Stores lazy memory's working set beside `version` (see
    /// [`super::memory`]); like the trace, it only orders fetching.
    async fn store_working_set(&self, parcel: &OpenParcel, version: u64, tags: &[ChunkTag]) {
        let key = layout::working_set(&parcel.name, version);
        self.store_tags(parcel, version, key, tags, "store the working set")
            .await;
    }

    /// Stores the access trace beside `version` unless it has one. The trace
    /// only orders prefetching: failing to store it costs speed, not data.
    async fn store_trace(&self, parcel: &OpenParcel, version: u64, trace: &[ChunkTag]) {
        let key = layout::trace(&parcel.name, version);
        self.store_tags(parcel, version, key, trace, "store the access trace")
            .await;
    }

    /// Stores `tags` sealed like a trace ([`crate::trace`]) under `key`
    /// beside `version`, unless there is one already; a failure is logged.
    async fn store_tags(
        &self,
        parcel: &OpenParcel,
        version: u64,
        key: String,
        tags: &[ChunkTag],
        operation: &'static str,
    ) {
        if tags.is_empty() {
            return;
        }
        let sealed = crate::trace::seal(tags, &parcel.secrets.parcel_key, &parcel.id, version);
        let stored = match self.store.writer(operation) {
            Ok(writer) => writer.put_new(&key, sealed.into()).await.map(|_| ()),
            Err(e) => Err(e),
        };
        match stored {
            Ok(()) => {
                tracing::debug!(parcel = %parcel.name, version, chunks = tags.len(), "{operation}: done")
            }
            Err(e) => tracing::warn!(error = %e, "could not {operation}"),
        }
    }

    fn note_committed(&self, version: u64) -> Result<(), SessionError> {
        let mut record = self.record.lock().expect("record lock");
        if record.committed != Some(version) {
            let mut updated = record.clone();
            updated.committed = Some(version);
            write_record(&self.context.state_dir, &updated)?;
            *record = updated;
        }
        Ok(())
    }

    /// [`Session::ensure_uploaded`], repeated while a pass takes a quarter
    /// of gc's grace period or longer (then the earliest confirmation could
    /// be too old by the time of the commit).
    async fn ensure_uploaded_in_time(
        &self,
        needed: &[ChunkTag],
        segments: &HashSet<ChunkTag>,
        check_all: bool,
    ) -> Result<UploadTally, SessionError> {
        let quarter = self.context.upload.gc_grace / 4;
        let mut total = UploadTally::default();
        for _ in 0..3 {
            let started = Instant::now();
            let tally = self.ensure_uploaded(needed, segments, check_all).await?;
            total.uploaded_chunks += tally.uploaded_chunks;
            total.uploaded_bytes += tally.uploaded_bytes;
            total.segment_bytes += tally.segment_bytes;
            total.present_chunks = tally.present_chunks;
            let lost = crate::gc::finish_pass(&self.store, &tally.refreshed).await?;
            total.refreshed.extend(tally.refreshed);
            if lost.is_empty() && started.elapsed() < quarter {
                return Ok(total);
            }
            // The journal must not vouch for a chunk gc deleted.
            let forget: Vec<(ChunkTag, u64)> = lost.iter().map(|tag| (*tag, 0)).collect();
            self.image.record_uploaded(&forget)?;
            tracing::warn!(
                lost = lost.len(),
                "uploading took a quarter of gc's grace period, or gc deleted chunks it refreshed; confirming again"
            );
        }
        Err(SessionError::SlowerThanGcGrace {
            grace_secs: self.context.upload.gc_grace.as_secs(),
        })
    }

    /// Makes sure every chunk in `needed` is in the store and young enough
    /// for gc: journal entries younger than G/4 are trusted; the rest are put
    /// create-only, and one found already there but older than G/4 (or of
    /// unknown age) is refreshed. `check_all` ignores the journal (a new
    /// parcel: trust nothing). Uploads of `segments` (manifest segments) are
    /// counted apart from the files' chunks.
    async fn ensure_uploaded(
        &self,
        needed: &[ChunkTag],
        segments: &HashSet<ChunkTag>,
        check_all: bool,
    ) -> Result<UploadTally, SessionError> {
        let quarter = self.context.upload.gc_grace.as_secs() / 4;
        let fresh_since = unix_now().saturating_sub(quarter);
        let mut tally = UploadTally::default();
        let to_send: Vec<ChunkTag> = needed
            .iter()
            .filter(|tag| {
                let trusted = !check_all
                    && self
                        .image
                        .uploaded_at(tag)
                        .is_some_and(|at| at != 0 && at >= fresh_since);
                if trusted {
                    tally.present_chunks += 1;
                }
                !trusted
            })
            .copied()
            .collect();
        let mut results = futures::stream::iter(to_send.into_iter().map(|tag| async move {
            let bytes = local_chunk(&self.context.cache, &tag)?;
            type Outcome = Result<(ChunkTag, u64, Option<u64>, bool), SessionError>;
            let (tag, at, uploaded) = upload_new(&self.store, &tag, bytes.clone()).await?;
            if uploaded.is_some() {
                return Outcome::Ok((tag, at, uploaded, false));
            }
            // Already there: from this session's trickle, an earlier run, or
            // an orphan of unknown age that gc may be about to collect.
            let writer = self.store.writer("refresh chunks")?;
            let key = layout::chunk(&tag);
            let modified = writer.modified(&key).await?.and_then(|time| {
                time.duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs())
            });
            match modified {
                Some(at) if at >= fresh_since => Ok((tag, at, None, false)),
                _ => {
                    writer.put_replace(&key, bytes).await?;
                    Ok((tag, unix_now(), None, true))
                }
            }
        }))
        .buffer_unordered(self.context.upload.parallel.max(1));
        let mut journal = Vec::new();
        while let Some(result) = results.next().await {
            let (tag, at, uploaded, refreshed) = result?;
            match uploaded {
                Some(bytes) if segments.contains(&tag) => {
                    tally.segment_bytes += bytes;
                    self.uploads.add(bytes);
                }
                Some(bytes) => {
                    tally.uploaded_chunks += 1;
                    tally.uploaded_bytes += bytes;
                    self.uploads.add(bytes);
                }
                None if refreshed => tally.refreshed.push(tag),
                None => tally.present_chunks += 1,
            }
            journal.push((tag, at));
            if journal.len() >= 256 {
                self.image.record_uploaded(&journal)?;
                journal.clear();
            }
        }
        self.image.record_uploaded(&journal)?;
        Ok(tally)
    }

    /// Checkin: freezes the image, commits (to this parcel, or with
    /// `save_as` to a new one), and marks the session checked in. The caller
    /// unmounts and then calls [`Session::finish_checkin`]. On error the image
    /// is writable again and nothing is lost.
    pub async fn checkin(
        &self,
        message: &str,
        save_as: Option<&OpenParcel>,
    ) -> Result<CommitReport, SessionError> {
        let _one_at_a_time = self.commit_lock.lock().await;
        if let Some(report) = self.earlier_checkin() {
            return Ok(report);
        }
        let image = self.image.clone();
        tokio::task::spawn_blocking(move || image.freeze())
            .await
            .expect("freeze task");
        let report = match self.commit_locked(message, save_as).await {
            Ok(report) => report,
            Err(e) => {
                self.image.thaw();
                return Err(e);
            }
        };
        {
            let mut record = self.record.lock().expect("record lock");
            let mut updated = record.clone();
            updated.checked_in = true;
            if save_as.is_none() {
                updated.committed = Some(report.version);
            }
            if let Err(e) = write_record(&self.context.state_dir, &updated) {
                drop(record);
                self.image.thaw();
                return Err(e);
            }
            *record = updated;
        }
        *self.checked_in.lock().expect("checked_in lock") = Some(report.clone());
        Ok(report)
    }

    /// After checkin and unmount: releases the lock, keeps the session's
    /// chunks in the cache (the next resume here is warm) or with `wipe`
    /// removes every chunk of the version, and removes the session state.
    pub async fn finish_checkin(&self, wipe: bool) -> Result<(), SessionError> {
        let remove: Vec<ChunkTag> = if wipe {
            // (Loaded by the commit; to be sure, a wipe after an empty one.)
            if let Err(error) = self.base.load(|_| Some(Priority::Demand)).await {
                tracing::warn!(%error, "the wipe leaves chunks of segments it could not read");
            }
            let image = self.image.clone();
            let mut tags: HashSet<ChunkTag> = self.base.stored_chunks().map(|(t, _)| t).collect();
            tags.extend(image.overlay_tags());
            tags.extend(image.trace()); // everything this session read
            tags.into_iter().collect()
        } else {
            Vec::new()
        };
        let record = self.record();
        if let Some(version) = record.committed {
            super::note_last_checkin(&self.context.state_dir, &record.parcel, version)?;
        }
        self.close(&remove).await
    }
}
