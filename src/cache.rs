//! The local chunk cache: chunks exactly as stored (ciphertext), by tag, shared
//! by every parcel and version on the machine — resuming version N+1 reuses what
//! N cached, and the cache never holds plaintext.
//!
//! On disk it is a local store (`<dir>/chunks/<tt>/<tag>`, see
//! [`crate::store::local`]). In memory it keeps an index (tag → size, last use),
//! rebuilt by scanning the directory when opened. Every read re-checks the tag,
//! so a chunk damaged on local disk (or torn by a crash: fetched chunks are not
//! fsynced) is dropped and fetched again, never served. Chunks written by a
//! session (not yet in any store) are inserted durably.
//!
//! The cache is bounded: past `limit_bytes`, least-recently-used chunks are
//! evicted, except chunks *pinned* by a live session (its dirty chunks, which
//! exist nowhere else until uploaded).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;

use crate::chunk::{self, ChunkTag};
use crate::error::{Classify, ErrorClass};
use crate::layout;
use crate::store::local::LocalStore;
use crate::store::{PutOutcome, StoreError};

/// Errors of the local cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The cache directory could not be used.
    #[error("chunk cache {}: {source}", dir.display())]
    Open {
        /// Cache directory.
        dir: PathBuf,
        /// Cause.
        source: StoreError,
    },
    /// Reading or writing a cached chunk failed.
    #[error("chunk cache: {0}")]
    Io(#[from] StoreError),
}

impl Classify for CacheError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Other
    }
}

/// Whether an inserted chunk must survive a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Fetched from a store: can be fetched again, so no fsync.
    Refetchable,
    /// Written locally and not yet uploaded: fsynced before it counts as cached.
    Durable,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    last_use: u64,
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<ChunkTag, Entry>,
    pins: HashMap<ChunkTag, u32>,
    total_bytes: u64,
    clock: u64,
}

/// Counters of the cache, for `isrctl status` and `.isr/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Chunks cached.
    pub chunks: u64,
    /// Bytes cached.
    pub bytes: u64,
    /// Size limit.
    pub limit_bytes: u64,
    /// Chunks pinned by live sessions.
    pub pinned: u64,
}

/// The machine's chunk cache.
#[derive(Debug)]
pub struct ChunkCache {
    store: LocalStore,
    limit_bytes: u64,
    index: Mutex<Index>,
}

fn tag_of_key(key: &str) -> Option<ChunkTag> {
    ChunkTag::from_hex(key.rsplit('/').next()?)
}

impl ChunkCache {
    /// Opens (creating if needed) the cache in `dir`, indexing what is there.
    pub fn open(dir: &Path, limit_bytes: u64) -> Result<ChunkCache, CacheError> {
        let open_error = |source| CacheError::Open {
            dir: dir.to_owned(),
            source,
        };
        crate::private::private_dir(dir).map_err(|e| {
            open_error(StoreError::Permanent {
                store: dir.display().to_string(),
                key: String::new(),
                source: e.into(),
            })
        })?;
        let store = LocalStore::new(dir);
        let mut index = Index::default();
        for key in store.list_blocking(layout::CHUNKS).map_err(open_error)? {
            let Some(tag) = tag_of_key(&key) else {
                continue;
            };
            let size = std::fs::metadata(dir.join(&key))
                .map(|m| m.len())
                .unwrap_or(0);
            index.entries.insert(tag, Entry { size, last_use: 0 });
            index.total_bytes += size;
        }
        Ok(ChunkCache {
            store,
            limit_bytes,
            index: Mutex::new(index),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().expect("cache index lock poisoned")
    }

    /// Whether the chunk is cached (not verified: [`ChunkCache::get`] does that).
    pub fn contains(&self, tag: &ChunkTag) -> bool {
        self.lock().entries.contains_key(tag)
    }

    /// The chunk's stored bytes, verified against its tag; `None` when absent
    /// or damaged (a damaged copy is removed). For bytes that leave the
    /// machine (uploads) or are served without decryption.
    pub fn get(&self, tag: &ChunkTag) -> Result<Option<Bytes>, CacheError> {
        let Some(bytes) = self.get_to_decrypt(tag)? else {
            return Ok(None);
        };
        if chunk::verify_tag(*tag, &bytes).is_err() {
            self.drop_damaged(tag)?;
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// The chunk's stored bytes *without* the tag check, for a reader that
    /// decrypts them at once: the AEAD check under the manifest's key detects
    /// any damage (the tag was checked when the bytes entered the cache), and
    /// that reader then calls [`ChunkCache::drop_damaged`]. This saves a
    /// BLAKE3 pass over every chunk a warm read serves.
    pub fn get_to_decrypt(&self, tag: &ChunkTag) -> Result<Option<Bytes>, CacheError> {
        if !self.contains(tag) {
            return Ok(None);
        }
        let key = layout::chunk(tag);
        let bytes = match self.store.get_blocking(&key) {
            Ok(bytes) => bytes,
            Err(e) if e.is_not_found() => {
                self.forget(tag);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        self.touch(tag);
        Ok(Some(bytes))
    }

    /// Starts reading the cached ones of `tags` from the disk in the
    /// background, for a reader about to read them one after another.
    pub fn advise_will_need(&self, tags: impl IntoIterator<Item = ChunkTag>) {
        for tag in tags {
            if self.contains(&tag) {
                self.store.advise_will_need(&layout::chunk(&tag));
            }
        }
    }

    /// Removes a cached copy found damaged, so the next reader fetches it again.
    pub fn drop_damaged(&self, tag: &ChunkTag) -> Result<(), CacheError> {
        tracing::warn!(chunk = %tag, "cached chunk is damaged; dropping it so it is fetched again");
        self.store.delete_blocking(&layout::chunk(tag))?; // a missing file is fine
        self.forget(tag);
        Ok(())
    }

    /// Marks the chunk as just used (for eviction order).
    fn touch(&self, tag: &ChunkTag) {
        let mut index = self.lock();
        index.clock += 1;
        let now = index.clock;
        if let Some(entry) = index.entries.get_mut(tag) {
            entry.last_use = now;
        }
    }

    fn forget(&self, tag: &ChunkTag) {
        let mut index = self.lock();
        if let Some(entry) = index.entries.remove(tag) {
            index.total_bytes -= entry.size;
        }
    }

    /// Adds a chunk (which the caller has verified against `tag`), then evicts
    /// down to the limit if needed.
    pub fn insert(
        &self,
        tag: &ChunkTag,
        bytes: &[u8],
        durability: Durability,
    ) -> Result<(), CacheError> {
        let outcome = self.store.put_new_blocking(
            &layout::chunk(tag),
            bytes,
            durability == Durability::Durable,
        )?;
        {
            let mut index = self.lock();
            index.clock += 1;
            let last_use = index.clock;
            let size = bytes.len() as u64;
            if outcome == PutOutcome::Created || !index.entries.contains_key(tag) {
                if let Some(old) = index.entries.insert(*tag, Entry { size, last_use }) {
                    index.total_bytes -= old.size;
                }
                index.total_bytes += size;
            }
        }
        self.evict_to_limit()?;
        Ok(())
    }

    /// Protects chunks from eviction until unpinned (counted: pin twice, unpin twice).
    pub fn pin<'a>(&self, tags: impl IntoIterator<Item = &'a ChunkTag>) {
        let mut index = self.lock();
        for tag in tags {
            *index.pins.entry(*tag).or_insert(0) += 1;
        }
    }

    /// Releases pins taken with [`ChunkCache::pin`].
    pub fn unpin<'a>(&self, tags: impl IntoIterator<Item = &'a ChunkTag>) {
        let mut index = self.lock();
        for tag in tags {
            if let Some(count) = index.pins.get_mut(tag) {
                *count -= 1;
                if *count == 0 {
                    index.pins.remove(tag);
                }
            }
        }
    }

    /// Deletes the given chunks unless a live session still pins them
    /// (a discarded session's own chunks); returns how many were removed.
    pub fn remove_unpinned<'a>(
        &self,
        tags: impl IntoIterator<Item = &'a ChunkTag>,
    ) -> Result<u64, CacheError> {
        let victims: Vec<ChunkTag> = {
            let index = self.lock();
            tags.into_iter()
                .filter(|tag| index.entries.contains_key(tag) && !index.pins.contains_key(tag))
                .copied()
                .collect()
        };
        for tag in &victims {
            self.store.delete_blocking(&layout::chunk(tag))?;
            self.forget(tag);
        }
        Ok(victims.len() as u64)
    }

    /// Evicts least-recently-used unpinned chunks until the cache fits its
    /// limit; returns how many were removed.
    pub fn evict_to_limit(&self) -> Result<u64, CacheError> {
        let victims: Vec<(ChunkTag, u64)> = {
            let index = self.lock();
            if index.total_bytes <= self.limit_bytes {
                return Ok(0);
            }
            let mut candidates: Vec<(u64, ChunkTag, u64)> = index
                .entries
                .iter()
                .filter(|(tag, _)| !index.pins.contains_key(tag))
                .map(|(tag, entry)| (entry.last_use, *tag, entry.size))
                .collect();
            candidates.sort_unstable_by_key(|(last_use, _, _)| *last_use);
            let mut excess = index.total_bytes - self.limit_bytes;
            let mut victims = Vec::new();
            for (_, tag, size) in candidates {
                if excess == 0 {
                    break;
                }
                victims.push((tag, size));
                excess = excess.saturating_sub(size);
            }
            victims
        };
        for (tag, _) in &victims {
            self.store.delete_blocking(&layout::chunk(tag))?;
            self.forget(tag);
        }
        Ok(victims.len() as u64)
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        let index = self.lock();
        CacheStats {
            chunks: index.entries.len() as u64,
            bytes: index.total_bytes,
            limit_bytes: self.limit_bytes,
            pinned: index.pins.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seed: u8, len: usize) -> (ChunkTag, Vec<u8>) {
        let data = vec![seed; len];
        (ChunkTag::of(&data), data)
    }

    #[test]
    fn insert_get_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let (tag, data) = chunk(1, 1000);
        assert!(cache.get(&tag).unwrap().is_none());
        cache.insert(&tag, &data, Durability::Refetchable).unwrap();
        assert_eq!(cache.get(&tag).unwrap().unwrap(), data);
        cache.insert(&tag, &data, Durability::Durable).unwrap();
        assert_eq!(
            cache.stats().bytes,
            1000,
            "a second insert is not counted twice"
        );
        drop(cache);
        let reopened = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(reopened.stats().chunks, 1);
        assert_eq!(reopened.get(&tag).unwrap().unwrap(), data);
    }

    #[test]
    fn damaged_chunks_are_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let (tag, data) = chunk(2, 100);
        cache.insert(&tag, &data, Durability::Refetchable).unwrap();
        std::fs::write(dir.path().join(layout::chunk(&tag)), b"torn").unwrap();
        assert!(cache.get(&tag).unwrap().is_none());
        assert!(!cache.contains(&tag));
        assert!(!dir.path().join(layout::chunk(&tag)).exists());
    }

    #[test]
    fn eviction_is_lru_and_spares_pinned_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 3000).unwrap();
        let chunks: Vec<_> = (0..3).map(|i| chunk(i, 1000)).collect();
        for (tag, data) in &chunks {
            cache.insert(tag, data, Durability::Refetchable).unwrap();
        }
        cache.pin([&chunks[0].0]);
        cache.get(&chunks[1].0).unwrap(); // chunk 2 is now least recently used among unpinned
        let (tag, data) = chunk(9, 1000);
        cache.insert(&tag, &data, Durability::Refetchable).unwrap();
        assert!(cache.contains(&chunks[0].0), "pinned chunk kept");
        assert!(cache.contains(&chunks[1].0), "recently used chunk kept");
        assert!(
            !cache.contains(&chunks[2].0),
            "least recently used chunk evicted"
        );
        assert!(cache.stats().bytes <= 3000);
        cache.unpin([&chunks[0].0]);
        assert_eq!(cache.stats().pinned, 0);
        cache.pin([&chunks[1].0]);
        assert_eq!(
            cache.remove_unpinned([&chunks[0].0, &chunks[1].0]).unwrap(),
            1
        );
        assert!(!cache.contains(&chunks[0].0) && cache.contains(&chunks[1].0));
    }
}
