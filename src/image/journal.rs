//! The upload journal: which chunks this session sealed, when, and which of
//! them are in the store (tag → seconds since the Unix epoch of the upload,
//! or of the moment it was found fresh in the store; 0 = present, age
//! unknown). It is what the trickle uploader and checkin send next and skip.
//!
//! This is the live mirror of the state file's `uploaded` table
//! ([`super::records`]); an entry is added here only after its record is
//! committed, so the journal never vouches for an upload a restart would not
//! remember. Seal times are not persisted: after a reopen every overlay chunk
//! counts as sealed at the reopen.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use crate::chunk::{ChunkRef, ChunkTag};

/// Seconds since the Unix epoch: the journal's clock.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The journal; see the module doc.
#[derive(Debug, Default)]
pub(super) struct UploadJournal {
    /// When each chunk of the overlay was sealed (since the image was opened).
    sealed_at: HashMap<ChunkTag, Instant>,
    /// Uploaded chunks (mirror of the `uploaded` table).
    uploaded: HashMap<ChunkTag, u64>,
}

impl UploadJournal {
    /// Notes that `tags` were sealed at `at`.
    pub(super) fn sealed(&mut self, tags: impl IntoIterator<Item = ChunkTag>, at: Instant) {
        self.sealed_at.extend(tags.into_iter().map(|tag| (tag, at)));
    }

    /// Adds committed upload records.
    pub(super) fn uploaded(&mut self, entries: impl IntoIterator<Item = (ChunkTag, u64)>) {
        self.uploaded.extend(entries);
    }

    /// When `tag` was last written to (or found in) the store.
    pub(super) fn uploaded_at(&self, tag: &ChunkTag) -> Option<u64> {
        self.uploaded.get(tag).copied()
    }

    /// Of `overlay` (distinct overlay chunks), those sealed at least `quiet`
    /// ago and not uploaded yet, oldest seal first.
    pub(super) fn candidates(&self, overlay: HashSet<ChunkTag>, quiet: Duration) -> Vec<ChunkTag> {
        let now = Instant::now();
        let mut candidates: Vec<(Instant, ChunkTag)> = overlay
            .into_iter()
            .filter(|tag| !self.uploaded.contains_key(tag))
            .filter_map(|tag| {
                let sealed = self.sealed_at.get(&tag).copied().unwrap_or(now);
                (now.duration_since(sealed) >= quiet).then_some((sealed, tag))
            })
            .collect();
        candidates.sort();
        candidates.into_iter().map(|(_, tag)| tag).collect()
    }

    /// Distinct stored chunks of `overlay`: (uploaded, pending upload,
    /// pending stored bytes).
    pub(super) fn counts<'a>(
        &self,
        overlay: impl Iterator<Item = &'a ChunkRef>,
    ) -> (u64, u64, u64) {
        let mut seen = HashSet::new();
        let (mut done, mut pending, mut pending_bytes) = (0, 0, 0);
        for chunk in overlay {
            if let ChunkRef::Stored {
                tag, stored_len, ..
            } = chunk
                && seen.insert(*tag)
            {
                if self.uploaded.contains_key(tag) {
                    done += 1;
                } else {
                    pending += 1;
                    pending_bytes += u64::from(*stored_len);
                }
            }
        }
        (done, pending, pending_bytes)
    }
}
