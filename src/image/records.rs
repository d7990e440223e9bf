//! The image's persisted state: a redb file per session, its tables and the
//! stored form of each record, apart from the live types ([`Node`],
//! [`ChunkRef`]) the image works with.
//!
//! Tables:
//! - `entries`: path → [`EntryRecord`] (49 bytes, little-endian):
//!   ```text
//!   0 kind u8 (1 directory, 2 file) | 1 id u64 | 9 mode u32 | 13 mtime secs i64
//!   | 21 mtime nanos u32 | 25 size u64 | 33 base file index + 1 u64 (0: none)
//!   | 41 base_limit u64
//!   ```
//! - `overlay`: (file id, chunk index) → chunk record sealed with
//!   XChaCha20-Poly1305 under a key derived from the parcel key (the records
//!   hold chunk keys; the cache and state directory must be useless without
//!   the parcel key), the (id, index) pair as associated data:
//!   ```text
//!   nonce [24] | ciphertext of: 1 (zero chunk)
//!                             | 0, tag [32], key [32], stored_len u32
//!   ```
//! - `meta`: `next_id` → the next node id to hand out (ids are never reused);
//!   a state file without it is new.
//! - `uploaded`: chunk tag → seconds since the epoch (the upload journal, see
//!   [`super::journal`]).
//! - `trace`: position → chunk tag (the access trace, see [`super::access`]).
//!
//! Every change is one write transaction ([`StateDb::commit`]): a failed
//! commit leaves the file as it was, and the image refuses further writes.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::ImageError;
use super::tree::{Node, NodeKind};
use crate::chunk::{ChunkKey, ChunkRef, ChunkTag};
use crate::keys::ParcelSecrets;
use crate::manifest::Timestamp;

const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
const OVERLAY: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("overlay");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const UPLOADED: TableDefinition<&[u8], u64> = TableDefinition::new("uploaded");
const TRACE: TableDefinition<u64, &[u8]> = TableDefinition::new("trace");
const OVERLAY_KEY_CONTEXT: &str = "isr 2026 session overlay records v1";

/// Key of an overlay entry: (file id, chunk index).
pub(super) type ChunkSlot = (u64, u64);

fn state_error(error: impl Into<redb::Error>) -> ImageError {
    ImageError::State(error.into())
}

/// The stored form of a [`Node`] (`entries` table value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EntryRecord {
    kind: u8,
    id: u64,
    mode: u32,
    mtime_secs: i64,
    mtime_nanos: u32,
    size: u64,
    /// Base manifest file index + 1; 0 for none.
    base: u64,
    base_limit: u64,
}

impl EntryRecord {
    const LEN: usize = 49;
    const DIRECTORY: u8 = 1;
    const FILE: u8 = 2;

    fn of(node: &Node) -> EntryRecord {
        EntryRecord {
            kind: match node.kind {
                NodeKind::Directory => Self::DIRECTORY,
                NodeKind::File => Self::FILE,
            },
            id: node.id,
            mode: node.mode,
            mtime_secs: node.mtime.secs,
            mtime_nanos: node.mtime.nanos,
            size: node.size,
            base: node.base.map_or(0, |b| b + 1),
            base_limit: node.base_limit,
        }
    }

    fn node(&self) -> Option<Node> {
        Some(Node {
            kind: match self.kind {
                Self::DIRECTORY => NodeKind::Directory,
                Self::FILE => NodeKind::File,
                _ => return None,
            },
            id: self.id,
            mode: self.mode,
            mtime: Timestamp {
                secs: self.mtime_secs,
                nanos: self.mtime_nanos,
            },
            size: self.size,
            base: self.base.checked_sub(1),
            base_limit: self.base_limit,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.push(self.kind);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.mode.to_le_bytes());
        out.extend_from_slice(&self.mtime_secs.to_le_bytes());
        out.extend_from_slice(&self.mtime_nanos.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.base.to_le_bytes());
        out.extend_from_slice(&self.base_limit.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<EntryRecord> {
        if bytes.len() != Self::LEN {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        Some(EntryRecord {
            kind: bytes[0],
            id: u64_at(1),
            mode: u32::from_le_bytes(bytes[9..13].try_into().expect("4 bytes")),
            mtime_secs: i64::from_le_bytes(bytes[13..21].try_into().expect("8 bytes")),
            mtime_nanos: u32::from_le_bytes(bytes[21..25].try_into().expect("4 bytes")),
            size: u64_at(25),
            base: u64_at(33),
            base_limit: u64_at(41),
        })
    }
}

/// Seals and opens overlay records under the key derived from the parcel key.
struct OverlayCipher {
    key: zeroize::Zeroizing<[u8; 32]>,
}

impl OverlayCipher {
    fn new(secrets: &ParcelSecrets) -> OverlayCipher {
        OverlayCipher {
            key: zeroize::Zeroizing::new(blake3::derive_key(
                OVERLAY_KEY_CONTEXT,
                secrets.parcel_key.as_bytes(),
            )),
        }
    }

    fn seal(&self, slot: ChunkSlot, chunk: &ChunkRef) -> Vec<u8> {
        let mut plain = Vec::with_capacity(69);
        match chunk {
            ChunkRef::Zero => plain.push(1),
            ChunkRef::Stored {
                tag,
                key,
                stored_len,
            } => {
                plain.push(0);
                plain.extend_from_slice(&tag.0);
                plain.extend_from_slice(key.as_bytes());
                plain.extend_from_slice(&stored_len.to_le_bytes());
            }
        }
        let plain = zeroize::Zeroizing::new(plain);
        let nonce: [u8; 24] = rand::random();
        let aad = [slot.0.to_le_bytes(), slot.1.to_le_bytes()].concat();
        let cipher = XChaCha20Poly1305::new(&Key::from(*self.key));
        let mut out = nonce.to_vec();
        out.extend(
            cipher
                .encrypt(
                    &XNonce::from(nonce),
                    Payload {
                        msg: &plain,
                        aad: &aad,
                    },
                )
                .expect("encryption of a small record cannot fail"),
        );
        out
    }

    fn open(&self, slot: ChunkSlot, record: &[u8]) -> Result<ChunkRef, ImageError> {
        let corrupt = || {
            ImageError::CorruptState(format!(
                "overlay record {slot:?} is corrupt or from another parcel"
            ))
        };
        if record.len() < 24 {
            return Err(corrupt());
        }
        let aad = [slot.0.to_le_bytes(), slot.1.to_le_bytes()].concat();
        let cipher = XChaCha20Poly1305::new(&Key::from(*self.key));
        let nonce: [u8; 24] = record[..24].try_into().expect("24 bytes");
        let plain = zeroize::Zeroizing::new(
            cipher
                .decrypt(
                    &XNonce::from(nonce),
                    Payload {
                        msg: &record[24..],
                        aad: &aad,
                    },
                )
                .map_err(|_| corrupt())?,
        );
        match (plain.first(), plain.len()) {
            (Some(1), 1) => Ok(ChunkRef::Zero),
            (Some(0), 69) => Ok(ChunkRef::Stored {
                tag: ChunkTag(plain[1..33].try_into().expect("32 bytes")),
                key: ChunkKey::from_bytes(plain[33..65].try_into().expect("32 bytes")),
                stored_len: u32::from_le_bytes(plain[65..69].try_into().expect("4 bytes")),
            }),
            _ => Err(corrupt()),
        }
    }
}

/// What an existing state file holds.
#[derive(Debug, Default)]
pub(super) struct Loaded {
    /// The next node id to hand out.
    pub(super) next_id: u64,
    /// Every tree entry by path, in path order (parents first).
    pub(super) entries: Vec<(String, Node)>,
    /// The overlay.
    pub(super) overlay: Vec<(ChunkSlot, ChunkRef)>,
    /// The upload journal.
    pub(super) uploaded: Vec<(ChunkTag, u64)>,
    /// The access trace, in order.
    pub(super) trace: Vec<ChunkTag>,
}

/// One durable change, applied in this order: overlay entries dropped, then
/// sealed ones inserted; entry records removed, then written.
#[derive(Debug, Default)]
pub(super) struct Change<'a> {
    pub(super) dropped: &'a [ChunkSlot],
    pub(super) sealed: Vec<(ChunkSlot, ChunkRef)>,
    pub(super) removed: Vec<String>,
    pub(super) entries: Vec<(String, Node)>,
    /// A new `next_id` counter to record, if ids were handed out.
    pub(super) next_id: Option<u64>,
}

/// The session's state file.
pub(super) struct StateDb {
    db: redb::Database,
    cipher: OverlayCipher,
}

impl StateDb {
    /// Opens (or creates) the state file at `path`.
    pub(super) fn open(path: &Path, secrets: &ParcelSecrets) -> Result<StateDb, ImageError> {
        let db = redb::Database::create(path).map_err(|source| ImageError::OpenState {
            path: path.to_owned(),
            source,
        })?;
        Ok(StateDb {
            db,
            cipher: OverlayCipher::new(secrets),
        })
    }

    /// The state, or `None` if the file is new.
    pub(super) fn load(&self) -> Result<Option<Loaded>, ImageError> {
        let read = self.db.begin_read().map_err(state_error)?;
        let Ok(meta) = read.open_table(META) else {
            return Ok(None);
        };
        let Some(next_id) = meta.get("next_id").map_err(state_error)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let mut loaded = Loaded {
            next_id,
            ..Loaded::default()
        };
        for item in read
            .open_table(ENTRIES)
            .map_err(state_error)?
            .iter()
            .map_err(state_error)?
        {
            let (path, record) = item.map_err(state_error)?;
            let node = EntryRecord::decode(record.value())
                .and_then(|r| r.node())
                .ok_or_else(|| {
                    ImageError::CorruptState(format!("corrupt entry record for {}", path.value()))
                })?;
            loaded.entries.push((path.value().to_owned(), node));
        }
        for item in read
            .open_table(OVERLAY)
            .map_err(state_error)?
            .iter()
            .map_err(state_error)?
        {
            let (slot, record) = item.map_err(state_error)?;
            let slot = slot.value();
            loaded
                .overlay
                .push((slot, self.cipher.open(slot, record.value())?));
        }
        let corrupt = |what: &str| ImageError::CorruptState(format!("corrupt {what} record"));
        if let Ok(table) = read.open_table(UPLOADED) {
            for item in table.iter().map_err(state_error)? {
                let (tag, at) = item.map_err(state_error)?;
                let tag = ChunkTag(tag.value().try_into().map_err(|_| corrupt("upload"))?);
                loaded.uploaded.push((tag, at.value()));
            }
        }
        if let Ok(table) = read.open_table(TRACE) {
            for item in table.iter().map_err(state_error)? {
                let (_, tag) = item.map_err(state_error)?;
                loaded.trace.push(ChunkTag(
                    tag.value().try_into().map_err(|_| corrupt("trace"))?,
                ));
            }
        }
        Ok(Some(loaded))
    }

    /// Writes a new state file's tables: the base tree and the id counter.
    pub(super) fn initialise(
        &self,
        entries: &[(String, Node)],
        next_id: u64,
    ) -> Result<(), ImageError> {
        let write = self.db.begin_write().map_err(state_error)?;
        {
            let mut table = write.open_table(ENTRIES).map_err(state_error)?;
            for (path, node) in entries {
                table
                    .insert(path.as_str(), EntryRecord::of(node).encode().as_slice())
                    .map_err(state_error)?;
            }
            write.open_table(OVERLAY).map_err(state_error)?;
            write.open_table(UPLOADED).map_err(state_error)?;
            write.open_table(TRACE).map_err(state_error)?;
            let mut meta = write.open_table(META).map_err(state_error)?;
            meta.insert("next_id", next_id).map_err(state_error)?;
        }
        write.commit().map_err(state_error)
    }

    /// Applies `change` in one transaction.
    pub(super) fn commit(&self, change: &Change<'_>) -> Result<(), ImageError> {
        let commit = || -> Result<(), redb::Error> {
            let write = self.db.begin_write()?;
            {
                let mut overlay = write.open_table(OVERLAY)?;
                for slot in change.dropped {
                    overlay.remove(*slot)?;
                }
                for (slot, chunk) in &change.sealed {
                    overlay.insert(*slot, self.cipher.seal(*slot, chunk).as_slice())?;
                }
                let mut entries = write.open_table(ENTRIES)?;
                for path in &change.removed {
                    entries.remove(path.as_str())?;
                }
                for (path, node) in &change.entries {
                    entries.insert(path.as_str(), EntryRecord::of(node).encode().as_slice())?;
                }
                if let Some(next_id) = change.next_id {
                    let mut meta = write.open_table(META)?;
                    meta.insert("next_id", next_id)?;
                }
            }
            write.commit()?;
            Ok(())
        };
        commit().map_err(ImageError::State)
    }

    /// Records uploads in the `uploaded` table.
    pub(super) fn record_uploaded(&self, entries: &[(ChunkTag, u64)]) -> Result<(), ImageError> {
        let commit = || -> Result<(), redb::Error> {
            let write = self.db.begin_write()?;
            {
                let mut table = write.open_table(UPLOADED)?;
                for (tag, at) in entries {
                    table.insert(tag.0.as_slice(), *at)?;
                }
            }
            write.commit()?;
            Ok(())
        };
        commit().map_err(ImageError::State)
    }

    /// Appends `tags` to the `trace` table from position `start`.
    pub(super) fn append_trace(&self, start: usize, tags: &[ChunkTag]) -> Result<(), ImageError> {
        let commit = || -> Result<(), redb::Error> {
            let write = self.db.begin_write()?;
            {
                let mut table = write.open_table(TRACE)?;
                for (offset, tag) in tags.iter().enumerate() {
                    table.insert((start + offset) as u64, tag.0.as_slice())?;
                }
            }
            write.commit()?;
            Ok(())
        };
        commit().map_err(ImageError::State)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_records_round_trip() {
        let node = Node {
            id: 7,
            kind: NodeKind::File,
            mode: 0o640,
            mtime: Timestamp { secs: -5, nanos: 6 },
            size: 1 << 40,
            base: Some(0),
            base_limit: 3,
        };
        let bytes = EntryRecord::of(&node).encode();
        assert_eq!(bytes.len(), EntryRecord::LEN);
        assert_eq!(
            EntryRecord::decode(&bytes).and_then(|r| r.node()),
            Some(node)
        );
        let dir = Node {
            kind: NodeKind::Directory,
            base: None,
            ..node
        };
        assert_eq!(
            EntryRecord::decode(&EntryRecord::of(&dir).encode()).and_then(|r| r.node()),
            Some(dir)
        );
        assert_eq!(EntryRecord::decode(&bytes[1..]), None);
    }
}
