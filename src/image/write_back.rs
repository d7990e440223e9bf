//! The write-back buffer: plaintext chunks written since they were last
//! sealed, by (file id, chunk index), each a whole chunk.
//!
//! Invariants:
//! - `bytes` is the number of buffered chunks times the chunk size;
//! - every change to a chunk takes a new `generation` from the buffer's
//!   counter, so a seal removes a chunk only if nobody changed it after the
//!   seal took its copy ([`WriteBack::settle`]): a write during sealing keeps
//!   it dirty;
//! - a chunk stays readable here until its overlay entry is committed.
//!
//! The buffer sits behind the image's mutex; nothing here blocks or fetches.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::records::ChunkSlot;

/// One buffered chunk.
#[derive(Debug)]
struct Dirty {
    data: Vec<u8>,
    generation: u64,
    /// Last change, for sealing chunks that have been quiet a while.
    modified: Instant,
}

/// Which buffered chunks a seal takes.
#[derive(Debug, Clone, Copy)]
pub(super) enum SealScope {
    /// Every chunk.
    All,
    /// The chunks of one file.
    File(u64),
    /// Chunks nobody changed for this long.
    QuietFor(Duration),
}

impl SealScope {
    fn takes(self, slot: ChunkSlot, dirty: &Dirty, now: Instant) -> bool {
        match self {
            SealScope::All => true,
            SealScope::File(id) => slot.0 == id,
            SealScope::QuietFor(quiet) => now.duration_since(dirty.modified) >= quiet,
        }
    }
}

/// A buffered chunk as a seal copied it.
#[derive(Debug)]
pub(super) struct Taken {
    pub(super) slot: ChunkSlot,
    pub(super) data: Vec<u8>,
    pub(super) generation: u64,
}

/// The buffer; see the module doc.
#[derive(Debug)]
pub(super) struct WriteBack {
    chunk_size: u64,
    chunks: HashMap<ChunkSlot, Dirty>,
    bytes: u64,
    generation: u64,
}

impl WriteBack {
    /// An empty buffer of chunks of `chunk_size` bytes.
    pub(super) fn new(chunk_size: u64) -> WriteBack {
        WriteBack {
            chunk_size,
            chunks: HashMap::new(),
            bytes: 0,
            generation: 0,
        }
    }

    /// Plaintext bytes buffered.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether nothing is buffered.
    pub(super) fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Whether chunk `slot` is buffered.
    pub(super) fn contains(&self, slot: &ChunkSlot) -> bool {
        self.chunks.contains_key(slot)
    }

    /// `len` bytes at `within` of chunk `slot`, if it is buffered.
    pub(super) fn read(&self, slot: &ChunkSlot, within: usize, len: usize) -> Option<Vec<u8>> {
        self.chunks
            .get(slot)
            .map(|dirty| dirty.data[within..within + len].to_vec())
    }

    /// Applies `change` to chunk `slot`: to its buffered copy, or else to
    /// `loaded` (the chunk's committed content, full size), which is then
    /// buffered. Gives `change` back when the chunk is not buffered and
    /// nothing was loaded yet: the caller loads it (without the lock) and
    /// calls again.
    pub(super) fn modify<F: FnOnce(&mut [u8])>(
        &mut self,
        slot: ChunkSlot,
        loaded: &mut Option<Vec<u8>>,
        change: F,
    ) -> Result<(), F> {
        let now = Instant::now();
        if let Some(dirty) = self.chunks.get_mut(&slot) {
            self.generation += 1;
            dirty.generation = self.generation;
            dirty.modified = now;
            change(&mut dirty.data);
            return Ok(());
        }
        let Some(data) = loaded.take() else {
            return Err(change);
        };
        self.generation += 1;
        self.bytes += self.chunk_size;
        let dirty = self.chunks.entry(slot).or_insert(Dirty {
            data,
            generation: self.generation,
            modified: now,
        });
        change(&mut dirty.data);
        Ok(())
    }

    /// Replaces chunk `slot` with zeros, without reading it.
    pub(super) fn zero(&mut self, slot: ChunkSlot) {
        self.generation += 1;
        let dirty = Dirty {
            data: vec![0u8; self.chunk_size as usize],
            generation: self.generation,
            modified: Instant::now(),
        };
        if self.chunks.insert(slot, dirty).is_none() {
            self.bytes += self.chunk_size;
        }
    }

    /// Whether any chunk has been quiet for `quiet`.
    pub(super) fn any_quiet(&self, quiet: Duration) -> bool {
        let now = Instant::now();
        self.chunks
            .values()
            .any(|dirty| now.duration_since(dirty.modified) >= quiet)
    }

    /// Copies of the chunks a seal of `scope` takes.
    pub(super) fn take(&self, scope: SealScope) -> Vec<Taken> {
        let now = Instant::now();
        self.chunks
            .iter()
            .filter(|(slot, dirty)| scope.takes(**slot, dirty, now))
            .map(|(slot, dirty)| Taken {
                slot: *slot,
                data: dirty.data.clone(),
                generation: dirty.generation,
            })
            .collect()
    }

    /// Forgets chunk `slot` once sealed, unless it changed after the seal
    /// copied it (at `generation`).
    pub(super) fn settle(&mut self, slot: ChunkSlot, generation: u64) {
        if self
            .chunks
            .get(&slot)
            .is_some_and(|d| d.generation == generation)
        {
            self.chunks.remove(&slot);
            self.bytes -= self.chunk_size;
        }
    }

    /// Forgets file `id`'s chunks from index `keep` on (all of them with 0).
    pub(super) fn drop_file_from(&mut self, id: u64, keep: u64) {
        let before = self.chunks.len();
        self.chunks
            .retain(|(file, index), _| *file != id || *index < keep);
        let removed = (before - self.chunks.len()) as u64;
        self.bytes -= removed * self.chunk_size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_changed_during_a_seal_stays_dirty() {
        let mut buffer = WriteBack::new(4);
        let mut loaded = Some(vec![0u8; 4]);
        assert!(buffer.modify((2, 0), &mut loaded, |c| c[0] = 1).is_ok());
        let taken = buffer.take(SealScope::File(2));
        assert_eq!(taken.len(), 1);
        assert!(buffer.modify((2, 0), &mut None, |c| c[1] = 2).is_ok());
        buffer.settle((2, 0), taken[0].generation);
        assert_eq!(buffer.read(&(2, 0), 0, 2), Some(vec![1, 2]));
        assert_eq!(buffer.bytes(), 4);
        assert!(buffer.modify((3, 0), &mut None, |_| ()).is_err());
        buffer.zero((3, 1));
        buffer.drop_file_from(2, 0);
        assert_eq!(buffer.bytes(), 4);
        assert!(buffer.contains(&(3, 1)) && !buffer.is_empty());
    }
}
