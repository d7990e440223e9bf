//! Recently decoded stored chunks (plaintext, by tag), so small reads do not
//! decrypt a whole chunk each time. Tags name immutable content, so an entry
//! can never be stale. Holds at most `capacity` chunks (the
//! [`super::ImageOptions::decoded_cache_chunks`]); the least recently used
//! goes first.

use std::collections::HashMap;

use bytes::Bytes;

use crate::chunk::ChunkTag;

/// The decoded-chunk cache; see the module doc.
#[derive(Debug, Default)]
pub(super) struct DecodedChunks {
    entries: HashMap<ChunkTag, (Bytes, u64)>,
    clock: u64,
}

impl DecodedChunks {
    /// Whether `tag` is held.
    pub(super) fn contains(&self, tag: &ChunkTag) -> bool {
        self.entries.contains_key(tag)
    }

    /// The plaintext of `tag`, if held (marking it used).
    pub(super) fn get(&mut self, tag: &ChunkTag) -> Option<Bytes> {
        self.clock += 1;
        let now = self.clock;
        self.entries.get_mut(tag).map(|(data, last_use)| {
            *last_use = now;
            data.clone()
        })
    }

    /// Keeps `data` as the plaintext of `tag`, evicting the least recently
    /// used entry when `capacity` are held (nothing is kept with 0).
    pub(super) fn insert(&mut self, tag: ChunkTag, data: Bytes, capacity: usize) {
        if capacity == 0 {
            return;
        }
        if self.entries.len() >= capacity {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(t, _)| *t)
            {
                self.entries.remove(&oldest);
            }
        }
        self.clock += 1;
        self.entries.insert(tag, (data, self.clock));
    }
}
