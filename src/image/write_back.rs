//! The write-back buffer: plaintext chunks written since they were last
//! sealed, by (file id, chunk index), each a whole chunk.
//!
//! Invariants:
//! - `bytes` is the number of buffered chunks times the chunk size;
//! - every change to a chunk takes a new `generation` from the buffer's
//!   counter, so a seal removes a chunk only if nobody changed it after the
//!   seal took its copy ([`WriteBack::settle`]): a write during sealing keeps
//!   it dirty;
//! - a chunk stays readable here until its overlay entry is committed;
//! - `unlogged` covers every byte changed since the chunk was last sealed
//!   or logged (the fsync log, see [`super`]), and `logged_bytes` is what
//!   the fsync log holds for it; taking a chunk to seal it resets both.
//!
//! The buffer sits behind the image's mutex; nothing here blocks or fetches.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::records::{ChunkSlot, LoggedWrite};

/// At most this many separate ranges are kept per chunk; past it they merge
/// into one covering range (logging unchanged bytes too is correct).
const MAX_RANGES: usize = 8;

/// One buffered chunk.
#[derive(Debug)]
struct Dirty {
    data: Vec<u8>,
    generation: u64,
    /// Last change, for sealing chunks that have been quiet a while.
    modified: Instant,
    /// Byte ranges (start, end) changed since the last seal or log, sorted
    /// and disjoint.
    unlogged: Vec<(usize, usize)>,
    /// Bytes of this chunk in the fsync log.
    logged_bytes: usize,
    /// The sequence number its next logged write gets.
    next_sequence: u64,
}

impl Dirty {
    fn new(data: Vec<u8>, generation: u64) -> Dirty {
        Dirty {
            data,
            generation,
            modified: Instant::now(),
            unlogged: Vec::new(),
            logged_bytes: 0,
            next_sequence: 0,
        }
    }

    /// Notes that bytes `range` changed.
    fn changed(&mut self, (start, end): (usize, usize)) {
        if start >= end {
            return;
        }
        let ranges = &mut self.unlogged;
        ranges.push((start, end));
        ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
        for &(s, e) in ranges.iter() {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        if merged.len() > MAX_RANGES {
            let covering = (merged[0].0, merged[merged.len() - 1].1);
            merged = vec![covering];
        }
        *ranges = merged;
    }

    fn unlogged_bytes(&self) -> usize {
        self.unlogged.iter().map(|(s, e)| e - s).sum()
    }
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
    /// The chunks of one file with changes neither sealed nor logged.
    Unlogged(u64),
}

impl SealScope {
    fn takes(self, slot: ChunkSlot, dirty: &Dirty, now: Instant) -> bool {
        match self {
            SealScope::All => true,
            SealScope::File(id) => slot.0 == id,
            SealScope::QuietFor(quiet) => now.duration_since(dirty.modified) >= quiet,
            SealScope::Unlogged(id) => slot.0 == id && !dirty.unlogged.is_empty(),
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

    /// Applies `change`, which changes the bytes `range` (start, end), to
    /// chunk `slot`: to its buffered copy, or else to `loaded` (the chunk's
    /// committed content, full size), which is then buffered. Gives `change`
    /// back when the chunk is not buffered and nothing was loaded yet: the
    /// caller loads it (without the lock) and calls again.
    pub(super) fn modify<F: FnOnce(&mut [u8])>(
        &mut self,
        slot: ChunkSlot,
        range: (usize, usize),
        loaded: &mut Option<Vec<u8>>,
        change: F,
    ) -> Result<(), F> {
        if !self.chunks.contains_key(&slot) {
            let Some(data) = loaded.take() else {
                return Err(change);
            };
            self.bytes += self.chunk_size;
            self.chunks.insert(slot, Dirty::new(data, 0));
        }
        self.generation += 1;
        let dirty = self.chunks.get_mut(&slot).expect("buffered above");
        dirty.generation = self.generation;
        dirty.modified = Instant::now();
        dirty.changed(range);
        change(&mut dirty.data);
        Ok(())
    }

    /// Replaces chunk `slot` with zeros, without reading it.
    pub(super) fn zero(&mut self, slot: ChunkSlot) {
        self.generation += 1;
        let mut dirty = Dirty::new(vec![0u8; self.chunk_size as usize], self.generation);
        dirty.changed((0, self.chunk_size as usize));
        match self.chunks.insert(slot, dirty) {
            // The log's records of the chunk stay until it is sealed.
            Some(old) => {
                let new = self.chunks.get_mut(&slot).expect("just inserted");
                new.logged_bytes = old.logged_bytes;
                new.next_sequence = old.next_sequence;
            }
            None => self.bytes += self.chunk_size,
        }
    }

    /// Whether a chunk of file `id` has changes neither sealed nor logged.
    pub(super) fn any_unlogged(&self, id: u64) -> bool {
        self.chunks
            .iter()
            .any(|(slot, dirty)| slot.0 == id && !dirty.unlogged.is_empty())
    }

    /// For an fsync of file `id`: the unlogged changes of its chunks that
    /// the fsync log takes — at most `per_fsync` bytes of a chunk, and only
    /// while the log holds at most `per_chunk` bytes of it (past that the
    /// chunk is sealed instead) — as log records; those ranges count as
    /// logged from now on.
    pub(super) fn take_for_log(
        &mut self,
        id: u64,
        per_fsync: usize,
        per_chunk: usize,
    ) -> Vec<LoggedWrite> {
        let mut records = Vec::new();
        for (slot, dirty) in self.chunks.iter_mut().filter(|(slot, _)| slot.0 == id) {
            let bytes = dirty.unlogged_bytes();
            if bytes == 0 || bytes > per_fsync || dirty.logged_bytes + bytes > per_chunk {
                continue;
            }
            for (start, end) in std::mem::take(&mut dirty.unlogged) {
                records.push(LoggedWrite {
                    slot: *slot,
                    sequence: dirty.next_sequence,
                    within: start as u32,
                    bytes: dirty.data[start..end].to_vec(),
                });
                dirty.next_sequence += 1;
            }
            dirty.logged_bytes += bytes;
        }
        records
    }

    /// After reopening, marks chunk `slot` (rebuilt from the fsync log) as
    /// holding `logged_bytes` in the log, up to sequence `next_sequence`.
    pub(super) fn mark_logged(&mut self, slot: ChunkSlot, logged_bytes: usize, next_sequence: u64) {
        if let Some(dirty) = self.chunks.get_mut(&slot) {
            dirty.unlogged.clear();
            dirty.logged_bytes = logged_bytes;
            dirty.next_sequence = next_sequence;
        }
    }

    /// Whether any chunk has been quiet for `quiet`.
    pub(super) fn any_quiet(&self, quiet: Duration) -> bool {
        let now = Instant::now();
        self.chunks
            .values()
            .any(|dirty| now.duration_since(dirty.modified) >= quiet)
    }

    /// Copies of the chunks a seal of `scope` takes; from now on only later
    /// changes count as unlogged (the seal's commit deletes their log).
    pub(super) fn take(&mut self, scope: SealScope) -> Vec<Taken> {
        let now = Instant::now();
        self.chunks
            .iter_mut()
            .filter(|(slot, dirty)| scope.takes(**slot, dirty, now))
            .map(|(slot, dirty)| {
                dirty.unlogged.clear();
                dirty.logged_bytes = 0;
                Taken {
                    slot: *slot,
                    data: dirty.data.clone(),
                    generation: dirty.generation,
                }
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

    /// Forgets file `id`'s chunks from index `keep` on (all of them with 0);
    /// returns those of them the fsync log holds writes of.
    pub(super) fn drop_file_from(&mut self, id: u64, keep: u64) -> Vec<ChunkSlot> {
        let before = self.chunks.len();
        let mut logged = Vec::new();
        self.chunks.retain(|slot, dirty| {
            let keep = slot.0 != id || slot.1 < keep;
            if !keep && dirty.logged_bytes > 0 {
                logged.push(*slot);
            }
            keep
        });
        let removed = (before - self.chunks.len()) as u64;
        self.bytes -= removed * self.chunk_size;
        logged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_changed_during_a_seal_stays_dirty() {
        let mut buffer = WriteBack::new(4);
        let mut loaded = Some(vec![0u8; 4]);
        assert!(
            buffer
                .modify((2, 0), (0, 1), &mut loaded, |c| c[0] = 1)
                .is_ok()
        );
        let taken = buffer.take(SealScope::File(2));
        assert_eq!(taken.len(), 1);
        assert!(
            buffer
                .modify((2, 0), (1, 2), &mut None, |c| c[1] = 2)
                .is_ok()
        );
        buffer.settle((2, 0), taken[0].generation);
        assert_eq!(buffer.read(&(2, 0), 0, 2), Some(vec![1, 2]));
        assert_eq!(buffer.bytes(), 4);
        assert!(buffer.modify((3, 0), (0, 0), &mut None, |_| ()).is_err());
        buffer.zero((3, 1));
        assert!(
            buffer.drop_file_from(2, 0).is_empty(),
            "nothing of it logged"
        );
        assert_eq!(buffer.bytes(), 4);
        assert!(buffer.contains(&(3, 1)) && !buffer.is_empty());
    }

    #[test]
    fn small_changes_go_to_the_log_until_the_chunk_has_enough_there() {
        let mut buffer = WriteBack::new(16);
        let mut loaded = Some(vec![0u8; 16]);
        let write = |buffer: &mut WriteBack, at: usize, byte: u8| {
            assert!(
                buffer
                    .modify((1, 0), (at, at + 2), &mut None, |c| c[at..at + 2]
                        .fill(byte))
                    .is_ok()
            );
        };
        assert!(
            buffer
                .modify((1, 0), (0, 2), &mut loaded, |c| c[..2].fill(1))
                .is_ok()
        );
        write(&mut buffer, 1, 2); // overlaps: one range 0..3
        write(&mut buffer, 8, 3);
        assert!(buffer.any_unlogged(1));
        let records = buffer.take_for_log(1, 6, 8);
        assert_eq!(
            records
                .iter()
                .map(|r| (r.sequence, r.within, r.bytes.clone()))
                .collect::<Vec<_>>(),
            [(0, 0, vec![1, 2, 2]), (1, 8, vec![3, 3])]
        );
        assert!(!buffer.any_unlogged(1));
        assert!(buffer.take(SealScope::Unlogged(1)).is_empty());
        // 5 logged; 4 more would pass the chunk's 8: sealed instead.
        write(&mut buffer, 12, 4);
        write(&mut buffer, 4, 5);
        assert!(buffer.take_for_log(1, 6, 8).is_empty());
        assert_eq!(buffer.take(SealScope::Unlogged(1)).len(), 1);
        // Taken to seal: the log starts over, sequences go on.
        write(&mut buffer, 0, 6);
        let records = buffer.take_for_log(1, 6, 8);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].sequence, 2);
        assert_eq!(buffer.drop_file_from(1, 0), [(1, 0)]);
    }

    #[test]
    fn many_small_ranges_merge_into_one() {
        let mut dirty = Dirty::new(vec![0; 64], 0);
        for at in (0..32).step_by(4) {
            dirty.changed((at, at + 1));
        }
        assert_eq!(dirty.unlogged.len(), 8);
        dirty.changed((32, 33));
        assert_eq!(dirty.unlogged, [(0, 33)]);
    }
}
