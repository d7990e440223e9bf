//! What changed between two versions, from their manifests alone (no chunk
//! is read): files added, removed and modified, and the stored chunks the
//! newer version has that the older one lacks (`isrctl diff`).
//!
//! A file is modified when its size or any chunk reference differs
//! (chunks are content-addressed, so equal references mean equal bytes);
//! its changed chunks are the chunk indexes whose references differ, and
//! their bytes the plaintext those chunks cover in the newer version.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::Manifest;
use crate::chunk::ChunkRef;

/// A file only one of the versions has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSize {
    /// Path in the parcel.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A file both versions have, with different contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModifiedFile {
    /// Path in the parcel.
    pub path: String,
    /// Size in the older version.
    pub old_size: u64,
    /// Size in the newer version.
    pub new_size: u64,
    /// Chunk indexes whose contents differ (or exist in one version only).
    pub changed_chunks: u64,
    /// Plaintext bytes those chunks cover (in the newer version, else the older).
    pub changed_bytes: u64,
}

/// The difference between two versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionDiff {
    /// The older version.
    pub from: u64,
    /// The newer version.
    pub to: u64,
    /// Files only in `to`, by path.
    pub added: Vec<FileSize>,
    /// Files only in `from`, by path.
    pub removed: Vec<FileSize>,
    /// Files in both whose contents differ, by path.
    pub modified: Vec<ModifiedFile>,
    /// Files in both with the same contents.
    pub unchanged_files: u64,
    /// Distinct stored chunks of `to` that `from` does not have: what
    /// resuming `to` where `from` is cached would fetch.
    pub new_chunks: u64,
    /// Their stored (compressed, encrypted) bytes.
    pub new_chunk_bytes: u64,
    /// Distinct stored chunks of `from` that `to` no longer uses.
    pub dropped_chunks: u64,
}

/// What changed from `from` to `to`.
pub fn diff(from: &Manifest, to: &Manifest) -> VersionDiff {
    let old: BTreeMap<&str, (u64, &[ChunkRef])> =
        from.files().map(|(p, s, c)| (p, (s, c))).collect();
    let new: BTreeMap<&str, (u64, &[ChunkRef])> = to.files().map(|(p, s, c)| (p, (s, c))).collect();
    let mut result = VersionDiff {
        from: from.version,
        to: to.version,
        added: Vec::new(),
        removed: Vec::new(),
        modified: Vec::new(),
        unchanged_files: 0,
        new_chunks: 0,
        new_chunk_bytes: 0,
        dropped_chunks: 0,
    };
    for (path, (size, chunks)) in &new {
        let Some((old_size, old_chunks)) = old.get(path) else {
            result.added.push(FileSize {
                path: (*path).to_owned(),
                size: *size,
            });
            continue;
        };
        if old_size == size && old_chunks == chunks {
            result.unchanged_files += 1;
            continue;
        }
        let (mut changed_chunks, mut changed_bytes) = (0, 0);
        let chunk_size = u64::from(to.chunk_size);
        for index in 0..chunks.len().max(old_chunks.len()) {
            if chunks.get(index) == old_chunks.get(index) {
                continue;
            }
            changed_chunks += 1;
            // The bytes of this chunk in the newer file, else in the older.
            let (length, start) = if index < chunks.len() {
                (*size, index as u64 * chunk_size)
            } else {
                (*old_size, index as u64 * u64::from(from.chunk_size))
            };
            changed_bytes += length.saturating_sub(start).min(chunk_size);
        }
        result.modified.push(ModifiedFile {
            path: (*path).to_owned(),
            old_size: *old_size,
            new_size: *size,
            changed_chunks,
            changed_bytes,
        });
    }
    for (path, (size, _)) in &old {
        if !new.contains_key(path) {
            result.removed.push(FileSize {
                path: (*path).to_owned(),
                size: *size,
            });
        }
    }
    let old_tags: HashSet<_> = from.stored_chunks().map(|(tag, _)| tag).collect();
    let mut seen = HashSet::new();
    for (tag, stored) in to.stored_chunks() {
        if !old_tags.contains(&tag) && seen.insert(tag) {
            result.new_chunks += 1;
            result.new_chunk_bytes += stored;
        }
    }
    let new_tags: HashSet<_> = to.stored_chunks().map(|(tag, _)| tag).collect();
    result.dropped_chunks = old_tags.difference(&new_tags).count() as u64;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{ChunkKey, ChunkTag};
    use crate::manifest::{Entry, EntryKind, Timestamp};

    fn stored(n: u8) -> ChunkRef {
        ChunkRef::Stored {
            tag: ChunkTag([n; 32]),
            key: ChunkKey::from_bytes([n; 32]),
            stored_len: 100 + u32::from(n),
        }
    }

    fn file(path: &str, size: u64, chunks: Vec<ChunkRef>) -> Entry {
        Entry {
            path: path.into(),
            mode: 0o644,
            mtime: Timestamp::now(),
            kind: EntryKind::File { size, chunks },
        }
    }

    fn manifest(version: u64, entries: Vec<Entry>) -> Manifest {
        Manifest {
            version,
            parent: None,
            created: Timestamp::now(),
            lock_nonce: None,
            host: "h".into(),
            message: String::new(),
            chunk_size: 10,
            entries,
        }
    }

    #[test]
    fn added_removed_and_modified_files_with_their_chunks() {
        let from = manifest(
            1,
            vec![
                file("same", 10, vec![stored(1)]),
                file("gone", 5, vec![stored(2)]),
                file("grown", 15, vec![stored(3), stored(4)]),
            ],
        );
        let to = manifest(
            2,
            vec![
                file("grown", 25, vec![stored(3), stored(5), ChunkRef::Zero]),
                file("new", 7, vec![stored(6)]),
                file("same", 10, vec![stored(1)]),
            ],
        );
        let d = diff(&from, &to);
        assert_eq!(
            d.added,
            vec![FileSize {
                path: "new".into(),
                size: 7
            }]
        );
        assert_eq!(
            d.removed,
            vec![FileSize {
                path: "gone".into(),
                size: 5
            }]
        );
        assert_eq!(
            d.modified,
            vec![ModifiedFile {
                path: "grown".into(),
                old_size: 15,
                new_size: 25,
                changed_chunks: 2,
                changed_bytes: 15,
            }]
        );
        assert_eq!(d.unchanged_files, 1);
        assert_eq!((d.new_chunks, d.new_chunk_bytes), (2, 105 + 106));
        assert_eq!(d.dropped_chunks, 2);
        let same = diff(&from, &from);
        assert!(same.added.is_empty() && same.removed.is_empty() && same.modified.is_empty());
        assert_eq!((same.new_chunks, same.dropped_chunks), (0, 0));
    }
}
