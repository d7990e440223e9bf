//! The image's persisted state: a redb file per session, its tables and the
//! stored form of each record, apart from the live types ([`Node`],
//! [`ChunkRef`]) the image works with.
//!
//! Tables:
//! - `sealed_entries`: keyed BLAKE3 hash of the path (32 bytes, under a key
//!   derived from the parcel key) → the entry sealed like overlay records,
//!   the hash as associated data, so no name is readable without the parcel
//!   key:
//!   ```text
//!   nonce [24] | ciphertext of: EntryRecord [49] | path (UTF-8)
//!   ```
//!   [`EntryRecord`] (49 bytes, little-endian):
//!   ```text
//!   0 kind u8 (1 directory, 2 file) | 1 id u64 | 9 mode u32 | 13 mtime secs i64
//!   | 21 mtime nanos u32 | 25 size u64 | 33 base file index + 1 u64 (0: none)
//!   | 41 base_limit u64
//!   ```
//!   Files written before names were sealed have a plaintext `entries` table
//!   (path → EntryRecord); loading such a file moves it into `sealed_entries`.
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
//! - `logged_writes`: (file id, chunk index, sequence) → a small write an
//!   fsync made durable without sealing its chunk (the fsync log, see
//!   [`super`]), sealed like overlay records with the three numbers as
//!   associated data:
//!   ```text
//!   nonce [24] | ciphertext of: offset in the chunk u32 | the bytes written
//!   ```
//!   A chunk's records are deleted in the transaction that seals the chunk
//!   or drops it; reopening the image applies what is left, in order.
//!
//! Every change is one write transaction ([`StateDb::commit`]): a failed
//! commit leaves the file as it was, and the image refuses further writes.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::ImageError;
use super::tree::{Node, NodeKind};
use crate::chunk::{ChunkKey, ChunkRef, ChunkTag};
use crate::keys::ParcelSecrets;
use crate::manifest::Timestamp;

const SEALED_ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sealed_entries");
/// The plaintext entries of files written before names were sealed.
const PLAIN_ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
const OVERLAY: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("overlay");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const UPLOADED: TableDefinition<&[u8], u64> = TableDefinition::new("uploaded");
const TRACE: TableDefinition<u64, &[u8]> = TableDefinition::new("trace");
const LOGGED_WRITES: TableDefinition<(u64, u64, u64), &[u8]> =
    TableDefinition::new("logged_writes");
const OVERLAY_KEY_CONTEXT: &str = "isr 2026 session overlay records v1";
const NAME_KEY_CONTEXT: &str = "isr 2026 session entry names v1";

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

/// Seals and opens the records that hold secrets or names (overlay and
/// entry records) under keys derived from the parcel key.
struct RecordCipher {
    key: zeroize::Zeroizing<[u8; 32]>,
    /// Keys the hash that stands for a path in `sealed_entries`.
    name_key: zeroize::Zeroizing<[u8; 32]>,
}

impl RecordCipher {
    fn new(secrets: &ParcelSecrets) -> RecordCipher {
        RecordCipher {
            key: zeroize::Zeroizing::new(blake3::derive_key(
                OVERLAY_KEY_CONTEXT,
                secrets.parcel_key.as_bytes(),
            )),
            name_key: zeroize::Zeroizing::new(blake3::derive_key(
                NAME_KEY_CONTEXT,
                secrets.parcel_key.as_bytes(),
            )),
        }
    }

    /// `nonce | ciphertext` of `plain`, bound to `aad`.
    fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; 24] = rand::random();
        let cipher = XChaCha20Poly1305::new(&Key::from(*self.key));
        let mut out = nonce.to_vec();
        out.extend(
            cipher
                .encrypt(&XNonce::from(nonce), Payload { msg: plain, aad })
                .expect("encryption of a small record cannot fail"),
        );
        out
    }

    /// The plaintext of a [`RecordCipher::seal`]ed record, if it is intact
    /// and was sealed with `aad` under this parcel's key.
    fn open(&self, aad: &[u8], record: &[u8]) -> Option<zeroize::Zeroizing<Vec<u8>>> {
        let (nonce, sealed) = record.split_first_chunk::<24>()?;
        let cipher = XChaCha20Poly1305::new(&Key::from(*self.key));
        cipher
            .decrypt(&XNonce::from(*nonce), Payload { msg: sealed, aad })
            .ok()
            .map(zeroize::Zeroizing::new)
    }

    fn slot_aad(slot: ChunkSlot) -> [u8; 16] {
        let mut aad = [0u8; 16];
        aad[..8].copy_from_slice(&slot.0.to_le_bytes());
        aad[8..].copy_from_slice(&slot.1.to_le_bytes());
        aad
    }

    fn seal_chunk(&self, slot: ChunkSlot, chunk: &ChunkRef) -> Vec<u8> {
        let mut plain = zeroize::Zeroizing::new(Vec::with_capacity(69));
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
        self.seal(&Self::slot_aad(slot), &plain)
    }

    fn open_chunk(&self, slot: ChunkSlot, record: &[u8]) -> Result<ChunkRef, ImageError> {
        let corrupt = || {
            ImageError::CorruptState(format!(
                "overlay record {slot:?} is corrupt or from another parcel"
            ))
        };
        let plain = self
            .open(&Self::slot_aad(slot), record)
            .ok_or_else(corrupt)?;
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

    fn logged_aad(slot: ChunkSlot, sequence: u64) -> [u8; 24] {
        let mut aad = [0u8; 24];
        aad[..16].copy_from_slice(&Self::slot_aad(slot));
        aad[16..].copy_from_slice(&sequence.to_le_bytes());
        aad
    }

    fn seal_logged(&self, write: &LoggedWrite) -> Vec<u8> {
        let mut plain = zeroize::Zeroizing::new(Vec::with_capacity(4 + write.bytes.len()));
        plain.extend_from_slice(&write.within.to_le_bytes());
        plain.extend_from_slice(&write.bytes);
        self.seal(&Self::logged_aad(write.slot, write.sequence), &plain)
    }

    fn open_logged(
        &self,
        (file, index, sequence): (u64, u64, u64),
        record: &[u8],
    ) -> Result<LoggedWrite, ImageError> {
        let slot = (file, index);
        let plain = self
            .open(&Self::logged_aad(slot, sequence), record)
            .filter(|plain| plain.len() >= 4)
            .ok_or_else(|| {
                ImageError::CorruptState(format!(
                    "logged write {slot:?}/{sequence} is corrupt or from another parcel"
                ))
            })?;
        Ok(LoggedWrite {
            slot,
            sequence,
            within: u32::from_le_bytes(plain[..4].try_into().expect("4 bytes")),
            bytes: plain[4..].to_vec(),
        })
    }

    /// What stands for `path` as the key of `sealed_entries`.
    fn name_hash(&self, path: &str) -> [u8; 32] {
        *blake3::keyed_hash(&self.name_key, path.as_bytes()).as_bytes()
    }

    fn seal_entry(&self, path: &str, node: &Node) -> ([u8; 32], Vec<u8>) {
        let hash = self.name_hash(path);
        let mut plain = EntryRecord::of(node).encode();
        plain.extend_from_slice(path.as_bytes());
        (hash, self.seal(&hash, &plain))
    }

    fn open_entry(&self, hash: &[u8], record: &[u8]) -> Result<(String, Node), ImageError> {
        let corrupt =
            || ImageError::CorruptState("an entry record is corrupt or from another parcel".into());
        let plain = self.open(hash, record).ok_or_else(corrupt)?;
        let (record, path) = plain
            .split_at_checked(EntryRecord::LEN)
            .ok_or_else(corrupt)?;
        let node = EntryRecord::decode(record)
            .and_then(|r| r.node())
            .ok_or_else(corrupt)?;
        let path = std::str::from_utf8(path).map_err(|_| corrupt())?;
        if self.name_hash(path) != hash {
            return Err(corrupt());
        }
        Ok((path.to_owned(), node))
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
    /// The fsync log, by slot and sequence.
    pub(super) logged: Vec<LoggedWrite>,
}

/// A write an fsync made durable in the fsync log: `bytes` at offset
/// `within` of chunk `slot`, the slot's `sequence`-th since it was sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LoggedWrite {
    pub(super) slot: ChunkSlot,
    pub(super) sequence: u64,
    pub(super) within: u32,
    pub(super) bytes: Vec<u8>,
}

/// One durable change, applied in this order: overlay entries dropped, then
/// sealed ones inserted (the logged writes of both deleted); writes logged;
/// entry records removed, then written.
#[derive(Debug, Default)]
pub(super) struct Change<'a> {
    pub(super) dropped: &'a [ChunkSlot],
    pub(super) sealed: Vec<(ChunkSlot, ChunkRef)>,
    pub(super) logged: Vec<LoggedWrite>,
    pub(super) removed: Vec<String>,
    pub(super) entries: Vec<(String, Node)>,
    /// A new `next_id` counter to record, if ids were handed out.
    pub(super) next_id: Option<u64>,
}

/// The session's state file.
pub(super) struct StateDb {
    db: redb::Database,
    cipher: RecordCipher,
}

impl StateDb {
    /// Opens (or creates) the state file at `path`.
    pub(super) fn open(path: &Path, secrets: &ParcelSecrets) -> Result<StateDb, ImageError> {
        // Owner-only, like the directory it is in (an older file is tightened).
        let private = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .and_then(|file| file.set_permissions(std::fs::Permissions::from_mode(0o600)));
        private.map_err(|e| ImageError::OpenState {
            path: path.to_owned(),
            source: redb::DatabaseError::Storage(redb::StorageError::Io(e)),
        })?;
        let db = redb::Database::create(path).map_err(|source| ImageError::OpenState {
            path: path.to_owned(),
            source,
        })?;
        Ok(StateDb {
            db,
            cipher: RecordCipher::new(secrets),
        })
    }

    /// The state, or `None` if the file is new.
    pub(super) fn load(&self) -> Result<Option<Loaded>, ImageError> {
        self.seal_plain_entries()?;
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
            .open_table(SEALED_ENTRIES)
            .map_err(state_error)?
            .iter()
            .map_err(state_error)?
        {
            let (hash, record) = item.map_err(state_error)?;
            loaded
                .entries
                .push(self.cipher.open_entry(hash.value(), record.value())?);
        }
        // Parents before children, as the tree is rebuilt.
        loaded.entries.sort_by(|a, b| a.0.cmp(&b.0));
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
                .push((slot, self.cipher.open_chunk(slot, record.value())?));
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
        if let Ok(table) = read.open_table(LOGGED_WRITES) {
            for item in table.iter().map_err(state_error)? {
                let (key, record) = item.map_err(state_error)?;
                loaded
                    .logged
                    .push(self.cipher.open_logged(key.value(), record.value())?);
            }
        }
        Ok(Some(loaded))
    }

    /// Moves the plaintext `entries` table of a file written before names
    /// were sealed into `sealed_entries`, in one transaction.
    fn seal_plain_entries(&self) -> Result<(), ImageError> {
        let read = self.db.begin_read().map_err(state_error)?;
        let plain: Vec<(String, Node)> = match read.open_table(PLAIN_ENTRIES) {
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(state_error(e)),
            Ok(table) => {
                let mut plain = Vec::new();
                for item in table.iter().map_err(state_error)? {
                    let (path, record) = item.map_err(state_error)?;
                    let node = EntryRecord::decode(record.value())
                        .and_then(|r| r.node())
                        .ok_or_else(|| {
                            ImageError::CorruptState("corrupt plaintext entry record".into())
                        })?;
                    plain.push((path.value().to_owned(), node));
                }
                plain
            }
        };
        drop(read);
        let write = self.db.begin_write().map_err(state_error)?;
        {
            let mut sealed = write.open_table(SEALED_ENTRIES).map_err(state_error)?;
            for (path, node) in &plain {
                let (hash, record) = self.cipher.seal_entry(path, node);
                sealed
                    .insert(hash.as_slice(), record.as_slice())
                    .map_err(state_error)?;
            }
        }
        write.delete_table(PLAIN_ENTRIES).map_err(state_error)?;
        write.commit().map_err(state_error)
    }

    /// Writes a new state file's tables: the base tree and the id counter.
    pub(super) fn initialise(
        &self,
        entries: &[(String, Node)],
        next_id: u64,
    ) -> Result<(), ImageError> {
        let write = self.db.begin_write().map_err(state_error)?;
        {
            let mut table = write.open_table(SEALED_ENTRIES).map_err(state_error)?;
            for (path, node) in entries {
                let (hash, record) = self.cipher.seal_entry(path, node);
                table
                    .insert(hash.as_slice(), record.as_slice())
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
                    overlay.insert(*slot, self.cipher.seal_chunk(*slot, chunk).as_slice())?;
                }
                let mut logged = write.open_table(LOGGED_WRITES)?;
                let settled = change
                    .dropped
                    .iter()
                    .chain(change.sealed.iter().map(|(s, _)| s));
                for &(file, index) in settled {
                    logged.retain_in((file, index, 0)..=(file, index, u64::MAX), |_, _| false)?;
                }
                for write in &change.logged {
                    let (file, index) = write.slot;
                    let record = self.cipher.seal_logged(write);
                    logged.insert((file, index, write.sequence), record.as_slice())?;
                }
                let mut entries = write.open_table(SEALED_ENTRIES)?;
                for path in &change.removed {
                    entries.remove(self.cipher.name_hash(path).as_slice())?;
                }
                for (path, node) in &change.entries {
                    let (hash, record) = self.cipher.seal_entry(path, node);
                    entries.insert(hash.as_slice(), record.as_slice())?;
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

    fn file_node(id: u64) -> Node {
        Node {
            id,
            kind: NodeKind::File,
            mode: 0o600,
            mtime: Timestamp { secs: 1, nanos: 0 },
            size: 10,
            base: None,
            base_limit: 0,
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn names_are_sealed_at_rest_and_come_back_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.redb");
        let secrets = ParcelSecrets::generate(None);
        let db = StateDb::open(&path, &secrets).unwrap();
        let root = Node {
            kind: NodeKind::Directory,
            ..file_node(1)
        };
        db.initialise(&[(String::new(), root)], 3).unwrap();
        db.commit(&Change {
            entries: vec![
                ("tax-return-2026.pdf".into(), file_node(2)),
                ("diary/secret-plans.txt".into(), file_node(3)),
            ],
            ..Change::default()
        })
        .unwrap();
        db.commit(&Change {
            removed: vec!["tax-return-2026.pdf".into()],
            ..Change::default()
        })
        .unwrap();
        drop(db);
        assert_eq!(
            std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&path).unwrap()) & 0o777,
            0o600
        );
        let bytes = std::fs::read(&path).unwrap();
        for name in ["tax-return", "secret-plans", "diary"] {
            assert!(!contains(&bytes, name.as_bytes()), "{name} in the file");
        }
        let db = StateDb::open(&path, &secrets).unwrap();
        let loaded = db.load().unwrap().unwrap();
        let paths: Vec<&str> = loaded.entries.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["", "diary/secret-plans.txt"]);
        drop(db);
        // Another parcel's key opens nothing.
        let other = StateDb::open(&path, &ParcelSecrets::generate(None)).unwrap();
        assert!(matches!(other.load(), Err(ImageError::CorruptState(_))));
    }

    #[test]
    fn a_file_with_plaintext_names_is_sealed_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.redb");
        let secrets = ParcelSecrets::generate(None);
        {
            // The layout written before names were sealed.
            let db = redb::Database::create(&path).unwrap();
            let write = db.begin_write().unwrap();
            {
                let mut entries = write.open_table(PLAIN_ENTRIES).unwrap();
                entries
                    .insert(
                        "old-name.img",
                        EntryRecord::of(&file_node(2)).encode().as_slice(),
                    )
                    .unwrap();
                write.open_table(OVERLAY).unwrap();
                write
                    .open_table(META)
                    .unwrap()
                    .insert("next_id", 3)
                    .unwrap();
            }
            write.commit().unwrap();
        }
        let db = StateDb::open(&path, &secrets).unwrap();
        let loaded = db.load().unwrap().unwrap();
        assert_eq!(
            loaded.entries,
            vec![("old-name.img".to_owned(), file_node(2))]
        );
        let read = db.db.begin_read().unwrap();
        assert!(
            read.open_table(PLAIN_ENTRIES).is_err(),
            "the plaintext table is gone"
        );
        drop(read);
        drop(db);
        let db = StateDb::open(&path, &secrets).unwrap();
        assert_eq!(db.load().unwrap().unwrap().entries.len(), 1);
    }
}
