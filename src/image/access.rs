//! The access trace: the stored chunks this session read, in the order of
//! their first read. Stored beside a version at commit (see
//! [`crate::trace`]), it orders the next resume's prefetch.
//!
//! Invariants: `order` holds each tag once (`seen` is its set); the first
//! `persisted` entries are in the state file's `trace` table
//! ([`super::records`]), and only entries past them are appended.

use std::collections::HashSet;

use crate::chunk::ChunkTag;

/// The trace; see the module doc.
#[derive(Debug, Default)]
pub(super) struct AccessTrace {
    seen: HashSet<ChunkTag>,
    order: Vec<ChunkTag>,
    persisted: usize,
}

impl AccessTrace {
    /// A trace continued from the `persisted` entries of the state file.
    pub(super) fn resumed(persisted: impl IntoIterator<Item = ChunkTag>) -> AccessTrace {
        let mut trace = AccessTrace::default();
        for tag in persisted {
            trace.read(tag);
        }
        trace.persisted = trace.order.len();
        trace
    }

    /// Notes a read of `tag`.
    pub(super) fn read(&mut self, tag: ChunkTag) {
        if self.seen.insert(tag) {
            self.order.push(tag);
        }
    }

    /// Every chunk read so far, in order.
    pub(super) fn order(&self) -> &[ChunkTag] {
        &self.order
    }

    /// The entries not persisted yet, and the position of the first.
    pub(super) fn fresh(&self) -> (usize, Vec<ChunkTag>) {
        (self.persisted, self.order[self.persisted..].to_vec())
    }

    /// Notes that the entries up to `end` are persisted.
    pub(super) fn persisted_up_to(&mut self, end: usize) {
        self.persisted = self.persisted.max(end);
    }
}

/// Lazy memory's working set as it is recorded: the chunk indexes of one file
/// (the VM's RAM file) in the order of their first read, during a window that
/// starts when the VM does. Only reads of stored chunks count (a hole or a
/// chunk this session wrote costs no fetch).
#[derive(Debug, Default)]
pub(super) struct WorkingSetRecorder {
    node: Option<u64>,
    until: Option<std::time::Instant>,
    seen: HashSet<u64>,
    order: Vec<u64>,
}

impl WorkingSetRecorder {
    /// Records reads of file `node` from now until `window` has passed,
    /// replacing what was recorded before.
    pub(super) fn start(&mut self, node: u64, window: std::time::Duration) {
        *self = WorkingSetRecorder {
            node: Some(node),
            until: Some(std::time::Instant::now() + window),
            ..WorkingSetRecorder::default()
        };
    }

    /// Notes a read of chunk `index` of file `node`; false once the window
    /// has passed (nothing more will be recorded).
    pub(super) fn read(&mut self, node: u64, index: u64) -> bool {
        let open = self
            .until
            .is_some_and(|until| std::time::Instant::now() < until);
        if open && self.node == Some(node) && self.seen.insert(index) {
            self.order.push(index);
        }
        open
    }

    /// The file recorded and its chunk indexes in first-read order.
    pub(super) fn recorded(&self) -> Option<(u64, Vec<u64>)> {
        self.node.map(|node| (node, self.order.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_working_set_is_one_file_first_reads_within_the_window() {
        let mut set = WorkingSetRecorder::default();
        assert!(!set.read(7, 1));
        assert_eq!(set.recorded(), None, "nothing before it starts");
        set.start(7, Duration::from_secs(60));
        for (node, index) in [(7, 5), (8, 1), (7, 2), (7, 5), (7, 0)] {
            assert!(set.read(node, index));
        }
        assert_eq!(set.recorded(), Some((7, vec![5, 2, 0])));
        set.start(7, Duration::ZERO);
        assert!(!set.read(7, 3));
        assert_eq!(set.recorded(), Some((7, vec![])), "after the window");
    }
}
