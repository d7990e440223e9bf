//! One open parcel as a mutable file tree: the base manifest's files plus a
//! durable overlay of changes. No FUSE types: the daemon's FUSE adapter
//! translates requests into these calls and maps [`ImageError`] to errno.
//!
//! Per file, a chunk index resolves through, in order:
//! 1. the **write-back buffer** (plaintext chunks written since they were last
//!    sealed, bounded by `write_back_limit` bytes);
//! 2. the **overlay** (chunks sealed by this session: zero, or stored in the
//!    local cache under a tag);
//! 3. the **base** (the manifest's chunk, below the file's `base_limit`);
//! 4. zeros.
//!
//! A write materialises its chunk into the buffer (fetching it if needed,
//! without holding any lock during the fetch) and modifies it there. `fsync`
//! of a file (and eviction when the buffer is full, and [`Image::flush_all`])
//! *seals* its dirty chunks: encode with the chunk codec, insert into the cache
//! durably (fsync), then commit the overlay entries and the file's record in
//! one redb transaction. So every write that fsync returned for survives a kill
//! of the daemon or a power loss; writes not yet fsynced may be lost, as on any
//! file system. A chunk being sealed stays readable from the buffer until its
//! overlay entry is committed, and a write during sealing keeps it dirty.
//!
//! State file (redb): `entries` path → entry record; `overlay` (file id, chunk
//! index) → chunk record encrypted with a key derived from the parcel key (the
//! records hold chunk keys, and the cache must be useless without the parcel
//! key); `meta` counters. After a failed write of local state the image refuses
//! further writes ([`ImageError::Poisoned`]) until it is reopened.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use std::time::{Duration, Instant, SystemTime};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::cache::{ChunkCache, Durability};
use crate::chunk::{self, ChunkEncoder, ChunkError, ChunkKey, ChunkRef, ChunkTag, EncodedChunk};
use crate::error::{Classify, ErrorClass};
use crate::fetch::{FetchError, Fetcher, Origin, Priority};
use crate::keys::ParcelSecrets;
use crate::manifest::{Entry, EntryKind, Manifest, Timestamp, validate_path};

const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
const OVERLAY: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("overlay");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Upload journal: chunk tag → when it was last written to (or found fresh
/// in) the store, seconds since the Unix epoch; 0 = present, age unknown.
const UPLOADED: TableDefinition<&[u8], u64> = TableDefinition::new("uploaded");
/// Access trace: position → chunk tag, in order of first read.
const TRACE: TableDefinition<u64, &[u8]> = TableDefinition::new("trace");
const OVERLAY_KEY_CONTEXT: &str = "isr 2026 session overlay records v1";

/// Errors of image operations; the FUSE adapter maps each to one errno.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No such file or directory.
    #[error("{0}: no such file or directory")]
    NotFound(String),
    /// The name is taken.
    #[error("{0}: already exists")]
    Exists(String),
    /// A directory was needed.
    #[error("{0}: not a directory")]
    NotDirectory(String),
    /// A file was needed.
    #[error("{0}: is a directory")]
    IsDirectory(String),
    /// rmdir of a non-empty directory.
    #[error("{0}: directory not empty")]
    NotEmpty(String),
    /// Bad path, or an operation that makes no sense (rename into itself).
    #[error("{0}")]
    Invalid(String),
    /// A chunk could not be fetched.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A chunk failed to decode.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// Local state (redb or the cache) failed; the image now refuses writes.
    #[error("session state: {0}")]
    State(String),
    /// The session is being checked in: no more changes.
    #[error("the parcel is being checked in; it is read-only until the checkin ends")]
    Frozen,
    /// An earlier local-state failure: reopen the session.
    #[error(
        "an earlier write of session state failed; the session must be reopened before it accepts writes"
    )]
    Poisoned,
}

impl Classify for ImageError {
    fn class(&self) -> ErrorClass {
        match self {
            ImageError::NotFound(_) => ErrorClass::NotFound,
            ImageError::Exists(_) | ImageError::Frozen => ErrorClass::Conflict,
            ImageError::NotDirectory(_)
            | ImageError::IsDirectory(_)
            | ImageError::NotEmpty(_)
            | ImageError::Invalid(_) => ErrorClass::Invalid,
            ImageError::Fetch(e) => e.class(),
            ImageError::Chunk(e) => e.class(),
            ImageError::State(_) | ImageError::Poisoned => ErrorClass::Other,
        }
    }
}

fn state_error(error: impl std::fmt::Display) -> ImageError {
    ImageError::State(error.to_string())
}

/// What a tree entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory.
    Directory,
    /// A regular file.
    File,
}

/// The attributes of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    /// Stable id (inode number), unchanged by rename; the root is 1.
    pub id: u64,
    /// Directory or file.
    pub kind: NodeKind,
    /// Permission bits.
    pub mode: u32,
    /// Modification time.
    pub mtime: Timestamp,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// Index of the base manifest file this file started as.
    base: Option<u64>,
    /// Base chunks at or past this index are zeros (after truncation).
    base_limit: u64,
}

impl Node {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(54);
        out.push(match self.kind {
            NodeKind::Directory => 1,
            NodeKind::File => 2,
        });
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.mode.to_le_bytes());
        out.extend_from_slice(&self.mtime.secs.to_le_bytes());
        out.extend_from_slice(&self.mtime.nanos.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.base.map_or(0, |b| b + 1).to_le_bytes());
        out.extend_from_slice(&self.base_limit.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Node> {
        if bytes.len() != 49 {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let base = u64_at(33);
        Some(Node {
            kind: match bytes[0] {
                1 => NodeKind::Directory,
                2 => NodeKind::File,
                _ => return None,
            },
            id: u64_at(1),
            mode: u32::from_le_bytes(bytes[9..13].try_into().expect("4 bytes")),
            mtime: Timestamp {
                secs: i64::from_le_bytes(bytes[13..21].try_into().expect("8 bytes")),
                nanos: u32::from_le_bytes(bytes[21..25].try_into().expect("4 bytes")),
            },
            size: u64_at(25),
            base: base.checked_sub(1),
            base_limit: u64_at(41),
        })
    }
}

#[derive(Debug)]
struct Dirty {
    data: Vec<u8>,
    generation: u64,
    /// Last change, for sealing chunks that have been quiet a while.
    modified: Instant,
}

/// Which buffered chunks a seal takes.
#[derive(Debug, Clone, Copy)]
enum SealScope {
    All,
    File(u64),
    QuietFor(Duration),
}

impl SealScope {
    fn takes(self, key: (u64, u64), dirty: &Dirty, now: Instant) -> bool {
        match self {
            SealScope::All => true,
            SealScope::File(id) => key.0 == id,
            SealScope::QuietFor(quiet) => now.duration_since(dirty.modified) >= quiet,
        }
    }

    fn covers_file(self, id: u64) -> bool {
        match self {
            SealScope::File(file) => file == id,
            SealScope::All | SealScope::QuietFor(_) => true,
        }
    }
}

/// The order in which this session first read each stored chunk.
#[derive(Debug, Default)]
struct AccessTrace {
    seen: HashSet<ChunkTag>,
    order: Vec<ChunkTag>,
    persisted: usize,
}

#[derive(Debug, Default)]
struct WriteBack {
    chunks: HashMap<(u64, u64), Dirty>,
    bytes: u64,
    generation: u64,
}

/// Recently decoded stored chunks (plaintext, by tag), so small reads do not
/// decrypt a whole chunk each time. Tags name immutable content, so an entry
/// can never be stale. Bounded by [`ImageOptions::decoded_cache_chunks`].
#[derive(Debug, Default)]
struct DecodedChunks {
    entries: HashMap<ChunkTag, (Bytes, u64)>,
    clock: u64,
}

impl DecodedChunks {
    fn contains(&self, tag: &ChunkTag) -> bool {
        self.entries.contains_key(tag)
    }

    fn get(&mut self, tag: &ChunkTag) -> Option<Bytes> {
        self.clock += 1;
        let now = self.clock;
        self.entries.get_mut(tag).map(|(data, last_use)| {
            *last_use = now;
            data.clone()
        })
    }

    fn insert(&mut self, tag: ChunkTag, data: Bytes, capacity: usize) {
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

/// Tuning of an open image.
#[derive(Debug, Clone, Copy)]
pub struct ImageOptions {
    /// Plaintext bytes the write-back buffer holds before it seals chunks.
    pub write_back_limit: u64,
    /// zstd level for sealed chunks.
    pub zstd_level: i32,
    /// Decoded chunks kept for small reads (0 disables).
    pub decoded_cache_chunks: usize,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            write_back_limit: 64 << 20,
            zstd_level: chunk::DEFAULT_ZSTD_LEVEL,
            decoded_cache_chunks: 64,
        }
    }
}

/// One open parcel: base manifest + overlay.
pub struct Image {
    chunk_size: u64,
    secrets: ParcelSecrets,
    overlay_key: zeroize::Zeroizing<[u8; 32]>,
    base_files: Vec<Vec<ChunkRef>>,
    db: redb::Database,
    tree: RwLock<BTreeMap<String, Node>>,
    overlay: RwLock<HashMap<(u64, u64), ChunkRef>>,
    buffer: Mutex<WriteBack>,
    /// Serialises sealing, so a chunk is never sealed twice at once.
    sealing: Mutex<()>,
    fetcher: Fetcher,
    cache: Arc<ChunkCache>,
    options: ImageOptions,
    decoded: Mutex<DecodedChunks>,
    next_id: AtomicU64,
    poisoned: AtomicBool,
    /// Held shared by every change, exclusively by [`Image::snapshot`].
    gate: RwLock<()>,
    /// Set for the end of a checkin: changes fail with [`ImageError::Frozen`].
    frozen: AtomicBool,
    /// When each chunk of the overlay was sealed (since the image was opened).
    sealed_at: Mutex<HashMap<ChunkTag, Instant>>,
    /// The upload journal (mirror of the `uploaded` table).
    uploaded: Mutex<HashMap<ChunkTag, u64>>,
    trace: Mutex<AccessTrace>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("chunk_size", &self.chunk_size)
            .finish_non_exhaustive()
    }
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(parent, _)| parent)
}

impl Image {
    /// Opens the session state at `state`, creating it from `base` if it does
    /// not exist yet (a new session), else reopening it as it was (after a
    /// restart or crash).
    pub fn open(
        state: &Path,
        base: &Manifest,
        secrets: ParcelSecrets,
        fetcher: Fetcher,
        cache: Arc<ChunkCache>,
        options: ImageOptions,
    ) -> Result<Image, ImageError> {
        let db = redb::Database::create(state).map_err(state_error)?;
        let overlay_key = zeroize::Zeroizing::new(blake3::derive_key(
            OVERLAY_KEY_CONTEXT,
            secrets.parcel_key.as_bytes(),
        ));
        let base_files: Vec<Vec<ChunkRef>> =
            base.files().map(|(_, _, chunks)| chunks.to_vec()).collect();
        let image = Image {
            chunk_size: u64::from(base.chunk_size),
            secrets,
            overlay_key,
            base_files,
            db,
            tree: RwLock::new(BTreeMap::new()),
            overlay: RwLock::new(HashMap::new()),
            buffer: Mutex::new(WriteBack::default()),
            sealing: Mutex::new(()),
            fetcher,
            cache,
            options,
            decoded: Mutex::new(DecodedChunks::default()),
            next_id: AtomicU64::new(2),
            poisoned: AtomicBool::new(false),
            gate: RwLock::new(()),
            frozen: AtomicBool::new(false),
            sealed_at: Mutex::new(HashMap::new()),
            uploaded: Mutex::new(HashMap::new()),
            trace: Mutex::new(AccessTrace::default()),
        };
        if !image.load()? {
            image.initialise(base)?;
        }
        Ok(image)
    }

    /// Loads existing state; false if the state file is new.
    fn load(&self) -> Result<bool, ImageError> {
        let read = self.db.begin_read().map_err(state_error)?;
        let Ok(meta) = read.open_table(META) else {
            return Ok(false);
        };
        let next_id = meta.get("next_id").map_err(state_error)?.map(|v| v.value());
        let Some(next_id) = next_id else {
            return Ok(false);
        };
        self.next_id.store(next_id, Ordering::SeqCst);
        let mut tree = self.tree.write().expect("tree lock");
        for item in read
            .open_table(ENTRIES)
            .map_err(state_error)?
            .iter()
            .map_err(state_error)?
        {
            let (path, record) = item.map_err(state_error)?;
            let node = Node::decode(record.value()).ok_or_else(|| {
                ImageError::State(format!("corrupt entry record for {}", path.value()))
            })?;
            tree.insert(path.value().to_owned(), node);
        }
        let mut overlay = self.overlay.write().expect("overlay lock");
        for item in read
            .open_table(OVERLAY)
            .map_err(state_error)?
            .iter()
            .map_err(state_error)?
        {
            let (key, record) = item.map_err(state_error)?;
            let key = key.value();
            overlay.insert(key, self.open_record(key, record.value())?);
        }
        let stored: Vec<ChunkTag> = overlay.values().filter_map(ChunkRef::tag).collect();
        self.cache.pin(stored.iter());
        let now = Instant::now();
        self.sealed_at
            .lock()
            .expect("sealed_at lock")
            .extend(stored.iter().map(|tag| (*tag, now)));
        let corrupt = |what: &str| ImageError::State(format!("corrupt {what} record"));
        if let Ok(table) = read.open_table(UPLOADED) {
            let mut uploaded = self.uploaded.lock().expect("uploaded lock");
            for item in table.iter().map_err(state_error)? {
                let (tag, at) = item.map_err(state_error)?;
                let tag = ChunkTag(tag.value().try_into().map_err(|_| corrupt("upload"))?);
                uploaded.insert(tag, at.value());
            }
        }
        if let Ok(table) = read.open_table(TRACE) {
            let mut trace = self.trace.lock().expect("trace lock");
            for item in table.iter().map_err(state_error)? {
                let (_, tag) = item.map_err(state_error)?;
                let tag = ChunkTag(tag.value().try_into().map_err(|_| corrupt("trace"))?);
                if trace.seen.insert(tag) {
                    trace.order.push(tag);
                }
            }
            trace.persisted = trace.order.len();
        }
        Ok(true)
    }

    fn initialise(&self, base: &Manifest) -> Result<(), ImageError> {
        let mut tree = self.tree.write().expect("tree lock");
        let mut base_index = 0u64;
        for entry in &base.entries {
            let id = self.next_id.fetch_add(1, Ordering::SeqCst);
            let node = match &entry.kind {
                EntryKind::Directory => Node {
                    id,
                    kind: NodeKind::Directory,
                    mode: entry.mode,
                    mtime: entry.mtime,
                    size: 0,
                    base: None,
                    base_limit: 0,
                },
                EntryKind::File { size, chunks } => {
                    let node = Node {
                        id,
                        kind: NodeKind::File,
                        mode: entry.mode,
                        mtime: entry.mtime,
                        size: *size,
                        base: Some(base_index),
                        base_limit: chunks.len() as u64,
                    };
                    base_index += 1;
                    node
                }
            };
            tree.insert(entry.path.clone(), node);
        }
        let write = self.db.begin_write().map_err(state_error)?;
        {
            let mut entries = write.open_table(ENTRIES).map_err(state_error)?;
            for (path, node) in tree.iter() {
                entries
                    .insert(path.as_str(), node.encode().as_slice())
                    .map_err(state_error)?;
            }
            write.open_table(OVERLAY).map_err(state_error)?;
            write.open_table(UPLOADED).map_err(state_error)?;
            write.open_table(TRACE).map_err(state_error)?;
            let mut meta = write.open_table(META).map_err(state_error)?;
            meta.insert("next_id", self.next_id.load(Ordering::SeqCst))
                .map_err(state_error)?;
        }
        write.commit().map_err(state_error)
    }

    fn seal_record(&self, key: (u64, u64), chunk: &ChunkRef) -> Vec<u8> {
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
        let aad = [key.0.to_le_bytes(), key.1.to_le_bytes()].concat();
        let cipher = XChaCha20Poly1305::new(&Key::from(*self.overlay_key));
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

    fn open_record(&self, key: (u64, u64), record: &[u8]) -> Result<ChunkRef, ImageError> {
        let corrupt = || {
            ImageError::State(format!(
                "overlay record {key:?} is corrupt or from another parcel"
            ))
        };
        if record.len() < 24 {
            return Err(corrupt());
        }
        let aad = [key.0.to_le_bytes(), key.1.to_le_bytes()].concat();
        let cipher = XChaCha20Poly1305::new(&Key::from(*self.overlay_key));
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

    fn check_writable(&self) -> Result<(), ImageError> {
        if self.poisoned.load(Ordering::SeqCst) {
            Err(ImageError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Enters a change of the tree or of file contents: holds the snapshot
    /// gate shared (so [`Image::snapshot`] sees each change entirely or not at
    /// all) and refuses changes once the image is frozen for checkin.
    fn begin_change(&self) -> Result<std::sync::RwLockReadGuard<'_, ()>, ImageError> {
        let gate = self.gate.read().expect("gate lock");
        if self.frozen.load(Ordering::SeqCst) {
            return Err(ImageError::Frozen);
        }
        self.check_writable()?;
        Ok(gate)
    }

    fn poison<T>(&self, error: ImageError) -> Result<T, ImageError> {
        self.poisoned.store(true, Ordering::SeqCst);
        tracing::error!(%error, "session state write failed; refusing further writes");
        Err(error)
    }

    /// The entry at `path` ("" is the root directory).
    pub fn lookup(&self, path: &str) -> Result<Node, ImageError> {
        if path.is_empty() {
            return Ok(Node {
                id: 1,
                kind: NodeKind::Directory,
                mode: 0o755,
                mtime: Timestamp::default(),
                size: 0,
                base: None,
                base_limit: 0,
            });
        }
        self.tree
            .read()
            .expect("tree lock")
            .get(path)
            .copied()
            .ok_or_else(|| ImageError::NotFound(path.to_owned()))
    }

    /// The path of the entry with id `id` ("" for the root, 1).
    pub fn path_of(&self, id: u64) -> Option<String> {
        if id == 1 {
            return Some(String::new());
        }
        let tree = self.tree.read().expect("tree lock");
        tree.iter()
            .find(|(_, node)| node.id == id)
            .map(|(path, _)| path.clone())
    }

    /// The entries directly inside directory `path`, as (name, node), by name.
    pub fn list(&self, path: &str) -> Result<Vec<(String, Node)>, ImageError> {
        if self.lookup(path)?.kind != NodeKind::Directory {
            return Err(ImageError::NotDirectory(path.to_owned()));
        }
        let tree = self.tree.read().expect("tree lock");
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        Ok(tree
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .filter(|(p, _)| !p[prefix.len()..].contains('/'))
            .map(|(p, node)| (p[prefix.len()..].to_owned(), *node))
            .collect())
    }

    fn file(&self, path: &str) -> Result<Node, ImageError> {
        let node = self.lookup(path)?;
        match node.kind {
            NodeKind::File => Ok(node),
            NodeKind::Directory => Err(ImageError::IsDirectory(path.to_owned())),
        }
    }

    /// Where chunk `index` of `node` comes from, short of the write-back buffer.
    fn committed_chunk(&self, node: &Node, index: u64) -> ChunkRef {
        if let Some(chunk) = self
            .overlay
            .read()
            .expect("overlay lock")
            .get(&(node.id, index))
        {
            return chunk.clone();
        }
        match node.base {
            Some(base) if index < node.base_limit => self.base_files[base as usize]
                .get(index as usize)
                .cloned()
                .unwrap_or(ChunkRef::Zero),
            _ => ChunkRef::Zero,
        }
    }

    /// Plaintext of a stored chunk, from the decoded-chunk cache or fetched
    /// (if needed) and decoded; as long as the plaintext (≤ chunk size).
    fn stored_plaintext(
        &self,
        tag: ChunkTag,
        key: &ChunkKey,
        priority: Priority,
    ) -> Result<Bytes, ImageError> {
        if let Some(data) = self.decoded.lock().expect("decoded lock").get(&tag) {
            return Ok(data);
        }
        {
            let mut trace = self.trace.lock().expect("trace lock");
            if trace.seen.insert(tag) {
                trace.order.push(tag);
            }
        }
        // A cached chunk was checked against its tag when it entered the
        // cache, so it is only decrypted (the AEAD check finds any damage
        // since); a downloaded one arrives checked against its tag.
        let (stored, origin) = self.fetcher.fetch_to_decrypt_blocking(tag, priority)?;
        let secret = &self.secrets.dedup_secret;
        let data = match origin {
            Origin::Cache => match chunk::decrypt_cached(tag, key, stored) {
                Ok(data) => data,
                Err(_) => {
                    self.fetcher.drop_damaged(tag)?;
                    let stored = self.fetcher.fetch_blocking(tag, priority)?;
                    chunk::decode_verified(secret, tag, key, stored)?
                }
            },
            Origin::Store => chunk::decode_verified(secret, tag, key, stored)?,
        };
        self.decoded.lock().expect("decoded lock").insert(
            tag,
            data.clone(),
            self.options.decoded_cache_chunks,
        );
        Ok(data)
    }

    /// Plaintext of a committed chunk (fetching and decoding as needed), full chunk size.
    fn load_chunk(&self, chunk: &ChunkRef, priority: Priority) -> Result<Vec<u8>, ImageError> {
        let mut data = match chunk {
            ChunkRef::Zero => Vec::new(),
            ChunkRef::Stored { tag, key, .. } => {
                self.stored_plaintext(*tag, key, priority)?.to_vec()
            }
        };
        data.resize(self.chunk_size as usize, 0);
        Ok(data)
    }

    /// Reads up to `len` bytes at `offset` (short at end of file).
    pub fn read(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, ImageError> {
        let node = self.file(path)?;
        let end = node.size.min(offset.saturating_add(len as u64));
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        if end > offset && (end - 1) / self.chunk_size > offset / self.chunk_size {
            self.advise_will_need(
                &node,
                offset / self.chunk_size..=(end - 1) / self.chunk_size,
            );
        }
        let mut position = offset;
        while position < end {
            let index = position / self.chunk_size;
            let within = (position % self.chunk_size) as usize;
            let take = ((self.chunk_size - within as u64).min(end - position)) as usize;
            let buffered = {
                let buffer = self.buffer.lock().expect("buffer lock");
                buffer
                    .chunks
                    .get(&(node.id, index))
                    .map(|d| d.data[within..within + take].to_vec())
            };
            match buffered {
                Some(bytes) => out.extend_from_slice(&bytes),
                None => {
                    match self.committed_chunk(&node, index) {
                        ChunkRef::Zero => out.resize(out.len() + take, 0),
                        ChunkRef::Stored { tag, key, .. } => {
                            let data = self.stored_plaintext(tag, &key, Priority::Demand)?;
                            // A base file's last chunk may be shorter than the range read.
                            let available = data.len().saturating_sub(within).min(take);
                            if available > 0 {
                                out.extend_from_slice(&data[within..within + available]);
                            }
                            out.resize(out.len() + take - available, 0);
                        }
                    }
                }
            }
            position += take as u64;
        }
        Ok(out)
    }

    /// For a read of several chunks: starts reading the cached ones that are
    /// not decoded yet from the disk at once, so the reads overlap (each
    /// chunk is a file in the cache; one request of 1 MiB is 8 of them).
    fn advise_will_need(&self, node: &Node, chunks: std::ops::RangeInclusive<u64>) {
        let wanted: Vec<ChunkTag> = {
            let decoded = self.decoded.lock().expect("decoded lock");
            chunks
                .filter_map(|index| self.committed_chunk(node, index).tag())
                .filter(|tag| !decoded.contains(tag))
                .collect()
        };
        self.fetcher.advise_will_need(wanted);
    }

    /// Writes `data` at `offset`, extending the file if needed.
    pub fn write(&self, path: &str, offset: u64, data: &[u8]) -> Result<usize, ImageError> {
        let _change = self.begin_change()?;
        let node = self.file(path)?;
        let mut position = offset;
        let mut written = 0usize;
        while written < data.len() {
            let index = position / self.chunk_size;
            let within = (position % self.chunk_size) as usize;
            let take = (self.chunk_size as usize - within).min(data.len() - written);
            self.modify_chunk(&node, index, |chunk| {
                chunk[within..within + take].copy_from_slice(&data[written..written + take]);
            })?;
            position += take as u64;
            written += take;
        }
        self.update_node(path, |n| {
            n.size = n.size.max(offset + data.len() as u64);
            n.mtime = Timestamp::now();
        })?;
        self.evict_if_full()?;
        Ok(written)
    }

    /// Applies `change` to chunk `index` of `node` in the write-back buffer,
    /// materialising it first (no lock is held while fetching).
    fn modify_chunk(
        &self,
        node: &Node,
        index: u64,
        change: impl FnOnce(&mut [u8]),
    ) -> Result<(), ImageError> {
        let key = (node.id, index);
        let mut loaded: Option<Vec<u8>> = None;
        loop {
            let mut buffer = self.buffer.lock().expect("buffer lock");
            buffer.generation += 1;
            let generation = buffer.generation;
            if let Some(dirty) = buffer.chunks.get_mut(&key) {
                dirty.generation = generation;
                dirty.modified = Instant::now();
                change(&mut dirty.data);
                return Ok(());
            }
            if let Some(data) = loaded.take() {
                buffer.bytes += self.chunk_size;
                let dirty = buffer.chunks.entry(key).or_insert(Dirty {
                    data,
                    generation,
                    modified: Instant::now(),
                });
                change(&mut dirty.data);
                return Ok(());
            }
            drop(buffer);
            loaded = Some(self.load_chunk(&self.committed_chunk(node, index), Priority::Demand)?);
        }
    }

    /// Replaces chunk `index` of `node` with zeros in the buffer, without reading it.
    fn zero_chunk(&self, node: &Node, index: u64) {
        let mut buffer = self.buffer.lock().expect("buffer lock");
        buffer.generation += 1;
        let generation = buffer.generation;
        let data = vec![0u8; self.chunk_size as usize];
        if buffer
            .chunks
            .insert(
                (node.id, index),
                Dirty {
                    data,
                    generation,
                    modified: Instant::now(),
                },
            )
            .is_none()
        {
            buffer.bytes += self.chunk_size;
        }
    }

    fn update_node(&self, path: &str, change: impl FnOnce(&mut Node)) -> Result<Node, ImageError> {
        let mut tree = self.tree.write().expect("tree lock");
        let node = tree
            .get_mut(path)
            .ok_or_else(|| ImageError::NotFound(path.to_owned()))?;
        change(node);
        Ok(*node)
    }

    fn evict_if_full(&self) -> Result<(), ImageError> {
        let over = self.buffer.lock().expect("buffer lock").bytes > self.options.write_back_limit;
        if over { self.flush_all() } else { Ok(()) }
    }

    /// Makes every write to `path` so far durable (the file's `fsync`).
    pub fn fsync(&self, path: &str) -> Result<(), ImageError> {
        let node = self.lookup(path)?;
        self.seal(SealScope::File(node.id), &[])
    }

    /// Makes every write so far durable (sync of the whole session).
    pub fn flush_all(&self) -> Result<(), ImageError> {
        self.seal(SealScope::All, &[])
    }

    /// Seals the buffered chunks nobody has changed for `quiet` (the
    /// trickle uploader's timer), so they can be uploaded.
    pub fn seal_quiet(&self, quiet: Duration) -> Result<(), ImageError> {
        let any_quiet = {
            let buffer = self.buffer.lock().expect("buffer lock");
            let now = Instant::now();
            buffer
                .chunks
                .values()
                .any(|dirty| now.duration_since(dirty.modified) >= quiet)
        };
        if any_quiet {
            self.seal(SealScope::QuietFor(quiet), &[])
        } else {
            Ok(())
        }
    }

    /// Seals the dirty chunks of file `id` (or all), then commits their overlay
    /// entries, the removal of `dropped` overlay entries and the entry records
    /// in one transaction.
    fn seal(&self, scope: SealScope, dropped: &[(u64, u64)]) -> Result<(), ImageError> {
        self.check_writable()?;
        let _sealing = self.sealing.lock().expect("sealing lock");
        let now = Instant::now();
        let snapshot: Vec<((u64, u64), Vec<u8>, u64)> = {
            let buffer = self.buffer.lock().expect("buffer lock");
            buffer
                .chunks
                .iter()
                .filter(|(key, dirty)| scope.takes(**key, dirty, now))
                .map(|(key, dirty)| (*key, dirty.data.clone(), dirty.generation))
                .collect()
        };
        let mut sealed = Vec::with_capacity(snapshot.len());
        let mut encoder =
            ChunkEncoder::new(self.secrets.dedup_secret.clone(), self.options.zstd_level)
                .map_err(state_error)?;
        for (key, data, generation) in snapshot {
            let encoded = encoder.encode(&data);
            if let EncodedChunk::Stored {
                chunk: ChunkRef::Stored { tag, .. },
                stored,
            } = &encoded
            {
                if let Err(e) = self.cache.insert(tag, stored, Durability::Durable) {
                    return self.poison(state_error(e));
                }
                self.cache.pin([tag]);
            }
            sealed.push((key, encoded.chunk_ref(), generation));
        }
        let tree = self.tree.read().expect("tree lock").clone();
        let commit = || -> Result<(), redb::Error> {
            let write = self.db.begin_write()?;
            {
                let mut overlay = write.open_table(OVERLAY)?;
                for key in dropped {
                    overlay.remove(*key)?;
                }
                for (key, chunk, _) in &sealed {
                    overlay.insert(*key, self.seal_record(*key, chunk).as_slice())?;
                }
                let mut entries = write.open_table(ENTRIES)?;
                for (path, node) in &tree {
                    if scope.covers_file(node.id) {
                        entries.insert(path.as_str(), node.encode().as_slice())?;
                    }
                }
            }
            write.commit()?;
            Ok(())
        };
        if let Err(e) = commit() {
            return self.poison(state_error(e));
        }
        let mut overlay = self.overlay.write().expect("overlay lock");
        let mut buffer = self.buffer.lock().expect("buffer lock");
        let mut superseded = Vec::new();
        {
            let mut sealed_at = self.sealed_at.lock().expect("sealed_at lock");
            let now = Instant::now();
            sealed_at.extend(
                sealed
                    .iter()
                    .filter_map(|(_, c, _)| c.tag())
                    .map(|t| (t, now)),
            );
        }
        for (key, chunk, generation) in sealed {
            if let Some(old) = overlay.insert(key, chunk).and_then(|c| c.tag()) {
                self.cache.unpin([&old]);
                superseded.push(old);
            }
            if buffer
                .chunks
                .get(&key)
                .is_some_and(|d| d.generation == generation)
            {
                buffer.chunks.remove(&key);
                buffer.bytes -= self.chunk_size;
            }
        }
        drop((overlay, buffer));
        // Earlier versions of rewritten chunks: only this session had them
        // (still-pinned ones — the same content elsewhere — are kept).
        if let Err(e) = self.cache.remove_unpinned(superseded.iter()) {
            tracing::warn!(error = %e, "could not remove superseded chunks from the cache");
        }
        Ok(())
    }

    /// Persists the current tree records (after a metadata change).
    fn persist_tree_change(
        &self,
        removed: &[String],
        changed: &[String],
        dropped: &[(u64, u64)],
    ) -> Result<(), ImageError> {
        self.check_writable()?;
        let tree = self.tree.read().expect("tree lock").clone();
        let commit = || -> Result<(), redb::Error> {
            let write = self.db.begin_write()?;
            {
                let mut overlay = write.open_table(OVERLAY)?;
                for key in dropped {
                    overlay.remove(*key)?;
                }
                let mut entries = write.open_table(ENTRIES)?;
                for path in removed {
                    entries.remove(path.as_str())?;
                }
                for path in changed {
                    if let Some(node) = tree.get(path) {
                        entries.insert(path.as_str(), node.encode().as_slice())?;
                    }
                }
                let mut meta = write.open_table(META)?;
                meta.insert("next_id", self.next_id.load(Ordering::SeqCst))?;
            }
            write.commit()?;
            Ok(())
        };
        match commit() {
            Ok(()) => Ok(()),
            Err(e) => self.poison(state_error(e)),
        }
    }

    fn check_new_path(&self, tree: &BTreeMap<String, Node>, path: &str) -> Result<(), ImageError> {
        validate_path(path).map_err(ImageError::Invalid)?;
        if tree.contains_key(path) {
            return Err(ImageError::Exists(path.to_owned()));
        }
        let parent = parent_of(path);
        if !parent.is_empty() {
            match tree.get(parent) {
                None => return Err(ImageError::NotFound(parent.to_owned())),
                Some(node) if node.kind != NodeKind::Directory => {
                    return Err(ImageError::NotDirectory(parent.to_owned()));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn create_node(&self, path: &str, kind: NodeKind, mode: u32) -> Result<Node, ImageError> {
        let _change = self.begin_change()?;
        let node = {
            let mut tree = self.tree.write().expect("tree lock");
            self.check_new_path(&tree, path)?;
            let node = Node {
                id: self.next_id.fetch_add(1, Ordering::SeqCst),
                kind,
                mode: mode & 0o7777,
                mtime: Timestamp::now(),
                size: 0,
                base: None,
                base_limit: 0,
            };
            tree.insert(path.to_owned(), node);
            node
        };
        self.persist_tree_change(&[], &[path.to_owned()], &[])?;
        Ok(node)
    }

    /// Creates an empty file.
    pub fn create_file(&self, path: &str, mode: u32) -> Result<Node, ImageError> {
        self.create_node(path, NodeKind::File, mode)
    }

    /// Creates a directory.
    pub fn mkdir(&self, path: &str, mode: u32) -> Result<Node, ImageError> {
        self.create_node(path, NodeKind::Directory, mode)
    }

    /// Forgets the buffered and sealed chunks of file `id` (beyond chunk
    /// `keep - 1`; all with 0); returns the overlay keys to delete durably.
    fn drop_chunks(&self, id: u64, keep: u64) -> Vec<(u64, u64)> {
        let mut buffer = self.buffer.lock().expect("buffer lock");
        let before = buffer.chunks.len();
        buffer
            .chunks
            .retain(|(file, index), _| *file != id || *index < keep);
        let removed = (before - buffer.chunks.len()) as u64;
        buffer.bytes -= removed * self.chunk_size;
        drop(buffer);
        let mut overlay = self.overlay.write().expect("overlay lock");
        let dropped: Vec<(u64, u64)> = overlay
            .keys()
            .filter(|(file, index)| *file == id && *index >= keep)
            .copied()
            .collect();
        let mut unreferenced = Vec::new();
        for key in &dropped {
            if let Some(tag) = overlay.remove(key).and_then(|c| c.tag()) {
                self.cache.unpin([&tag]);
                unreferenced.push(tag);
            }
        }
        // Chunks only this session wrote and no longer uses: nothing else needs them.
        if let Err(e) = self.cache.remove_unpinned(unreferenced.iter()) {
            tracing::warn!(error = %e, "could not remove dropped chunks from the cache");
        }
        dropped
    }

    /// Removes a file.
    pub fn unlink(&self, path: &str) -> Result<(), ImageError> {
        let _change = self.begin_change()?;
        let node = self.file(path)?;
        self.tree.write().expect("tree lock").remove(path);
        let dropped = self.drop_chunks(node.id, 0);
        self.persist_tree_change(&[path.to_owned()], &[], &dropped)
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, path: &str) -> Result<(), ImageError> {
        let _change = self.begin_change()?;
        if self.lookup(path)?.kind != NodeKind::Directory {
            return Err(ImageError::NotDirectory(path.to_owned()));
        }
        if !self.list(path)?.is_empty() {
            return Err(ImageError::NotEmpty(path.to_owned()));
        }
        self.tree.write().expect("tree lock").remove(path);
        self.persist_tree_change(&[path.to_owned()], &[], &[])
    }

    /// Renames `from` to `to` atomically, replacing a file at `to`.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), ImageError> {
        let _change = self.begin_change()?;
        validate_path(to).map_err(ImageError::Invalid)?;
        if to == from {
            return Ok(());
        }
        if to.starts_with(&format!("{from}/")) {
            return Err(ImageError::Invalid(format!(
                "cannot move {from} into itself"
            )));
        }
        let (removed, changed, replaced) = {
            let mut tree = self.tree.write().expect("tree lock");
            let node = *tree
                .get(from)
                .ok_or_else(|| ImageError::NotFound(from.to_owned()))?;
            let mut replaced = None;
            if let Some(existing) = tree.get(to).copied() {
                match (existing.kind, node.kind) {
                    (NodeKind::File, NodeKind::File) => replaced = Some(existing.id),
                    (NodeKind::Directory, NodeKind::Directory) => {
                        let prefix = format!("{to}/");
                        if tree
                            .range(prefix.clone()..)
                            .next()
                            .is_some_and(|(p, _)| p.starts_with(&prefix))
                        {
                            return Err(ImageError::NotEmpty(to.to_owned()));
                        }
                    }
                    (NodeKind::Directory, NodeKind::File) => {
                        return Err(ImageError::IsDirectory(to.to_owned()));
                    }
                    (NodeKind::File, NodeKind::Directory) => {
                        return Err(ImageError::NotDirectory(to.to_owned()));
                    }
                }
                tree.remove(to);
            }
            self.check_new_path(&tree, to)?;
            let prefix = format!("{from}/");
            let moved: Vec<String> = std::iter::once(from.to_owned())
                .chain(
                    tree.range(prefix.clone()..)
                        .take_while(|(p, _)| p.starts_with(&prefix))
                        .map(|(p, _)| p.clone()),
                )
                .collect();
            let mut changed = Vec::new();
            for old in &moved {
                let node = tree.remove(old).expect("listed above");
                let new = format!("{to}{}", &old[from.len()..]);
                tree.insert(new.clone(), node);
                changed.push(new);
            }
            let mut removed = moved;
            removed.push(to.to_owned());
            (removed, changed, replaced)
        };
        let dropped = replaced
            .map(|id| self.drop_chunks(id, 0))
            .unwrap_or_default();
        self.persist_tree_change(&removed, &changed, &dropped)
    }

    /// Sets the size: shrinking drops data past it (the rest of the last chunk
    /// is zeroed), growing adds zeros. Durable when it returns.
    pub fn truncate(&self, path: &str, size: u64) -> Result<(), ImageError> {
        let _change = self.begin_change()?;
        let node = self.file(path)?;
        let keep = size.div_ceil(self.chunk_size);
        let mut dropped = Vec::new();
        if size < node.size {
            if size % self.chunk_size != 0 {
                let within = (size % self.chunk_size) as usize;
                self.modify_chunk(&node, size / self.chunk_size, |chunk| {
                    chunk[within..].fill(0)
                })?;
            }
            dropped = self.drop_chunks(node.id, keep);
        }
        self.update_node(path, |n| {
            if size < n.size {
                n.base_limit = n.base_limit.min(keep);
            }
            n.size = size;
            n.mtime = Timestamp::now();
        })?;
        self.seal(SealScope::File(node.id), &dropped)
    }

    /// Zeroes `len` bytes at `offset`: whole chunks become zero chunks (nothing
    /// stored or uploaded), partial ones are zeroed in place. The size is unchanged.
    pub fn punch_hole(&self, path: &str, offset: u64, len: u64) -> Result<(), ImageError> {
        let _change = self.begin_change()?;
        let node = self.file(path)?;
        let end = node.size.min(offset.saturating_add(len));
        let mut position = offset;
        while position < end {
            let index = position / self.chunk_size;
            let within = (position % self.chunk_size) as usize;
            let take = (self.chunk_size - within as u64).min(end - position) as usize;
            let whole = take as u64 == self.chunk_size
                || (within == 0 && position + take as u64 == node.size);
            if whole {
                self.zero_chunk(&node, index);
            } else {
                self.modify_chunk(&node, index, |chunk| chunk[within..within + take].fill(0))?;
            }
            position += take as u64;
        }
        self.seal(SealScope::File(node.id), &[])
    }

    /// Sets permission bits and/or the modification time.
    pub fn set_attributes(
        &self,
        path: &str,
        mode: Option<u32>,
        mtime: Option<Timestamp>,
    ) -> Result<Node, ImageError> {
        let _change = self.begin_change()?;
        let node = self.update_node(path, |n| {
            if let Some(mode) = mode {
                n.mode = mode & 0o7777;
            }
            if let Some(mtime) = mtime {
                n.mtime = mtime;
            }
        })?;
        self.persist_tree_change(&[], &[path.to_owned()], &[])?;
        Ok(node)
    }

    /// The current tree as a manifest body (all writes must be flushed first:
    /// call [`Image::flush_all`]).
    pub fn to_manifest(&self, template: &Manifest) -> Result<Manifest, ImageError> {
        if !self.buffer.lock().expect("buffer lock").chunks.is_empty() {
            return Err(ImageError::Invalid(
                "unflushed writes: flush before building a manifest".into(),
            ));
        }
        let tree = self.tree.read().expect("tree lock");
        let entries = tree
            .iter()
            .map(|(path, node)| Entry {
                path: path.clone(),
                mode: node.mode,
                mtime: node.mtime,
                kind: match node.kind {
                    NodeKind::Directory => EntryKind::Directory,
                    NodeKind::File => EntryKind::File {
                        size: node.size,
                        chunks: (0..node.size.div_ceil(self.chunk_size))
                            .map(|index| self.committed_chunk(node, index))
                            .collect(),
                    },
                },
            })
            .collect();
        Ok(Manifest {
            entries,
            ..template.clone()
        })
    }

    /// One character per chunk of `path`: `.` zero, `L` in the local cache,
    /// `R` remote only, `D` changed by this session.
    pub fn chunk_map(&self, path: &str) -> Result<String, ImageError> {
        let node = self.file(path)?;
        let overlay = self.overlay.read().expect("overlay lock");
        let buffer = self.buffer.lock().expect("buffer lock");
        Ok((0..node.size.div_ceil(self.chunk_size))
            .map(|index| {
                let key = (node.id, index);
                if buffer.chunks.contains_key(&key) || overlay.contains_key(&key) {
                    return 'D';
                }
                match self.committed_chunk(&node, index) {
                    ChunkRef::Zero => '.',
                    ChunkRef::Stored { tag, .. } if self.cache.contains(&tag) => 'L',
                    ChunkRef::Stored { .. } => 'R',
                }
            })
            .collect())
    }

    /// Every file path, in order.
    pub fn file_paths(&self) -> Vec<String> {
        let tree = self.tree.read().expect("tree lock");
        tree.iter()
            .filter(|(_, node)| node.kind == NodeKind::File)
            .map(|(path, _)| path.clone())
            .collect()
    }

    /// Chunks sealed by this session and stored in the cache (for upload).
    pub fn overlay_tags(&self) -> Vec<ChunkTag> {
        self.overlay
            .read()
            .expect("overlay lock")
            .values()
            .filter_map(ChunkRef::tag)
            .collect()
    }

    /// Plaintext bytes waiting in the write-back buffer.
    pub fn dirty_bytes(&self) -> u64 {
        self.buffer.lock().expect("buffer lock").bytes
    }

    /// Stops accepting changes (the end of a checkin): waits for changes in
    /// progress, after which every change fails with [`ImageError::Frozen`]
    /// (EROFS through FUSE). Reads keep working.
    pub fn freeze(&self) {
        let _gate = self.gate.write().expect("gate lock");
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Accepts changes again (a checkin that failed).
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// A consistent point-in-time manifest of the whole tree: with changes
    /// held off, seals every buffered chunk and builds the manifest, so every
    /// write, truncate or rename is in it entirely or not at all. Changes wait
    /// for the seal (bounded by the write-back buffer), reads do not.
    ///
    /// The overlay chunks the manifest references are pinned in the cache
    /// before changes resume (a later write would otherwise supersede and
    /// delete them before they are uploaded); they are returned, and the
    /// caller unpins them when done.
    pub fn snapshot(&self, template: &Manifest) -> Result<(Manifest, Vec<ChunkTag>), ImageError> {
        let _gate = self.gate.write().expect("gate lock");
        self.seal(SealScope::All, &[])?;
        let manifest = self.to_manifest(template)?;
        let pinned = self.overlay_tags();
        self.cache.pin(pinned.iter());
        Ok((manifest, pinned))
    }

    /// Distinct overlay chunks sealed at least `quiet` ago that the upload
    /// journal does not list yet: what the trickle uploader sends next.
    pub fn upload_candidates(&self, quiet: Duration) -> Vec<ChunkTag> {
        let overlay_tags: HashSet<ChunkTag> = self.overlay_tags().into_iter().collect();
        let uploaded = self.uploaded.lock().expect("uploaded lock");
        let sealed_at = self.sealed_at.lock().expect("sealed_at lock");
        let now = Instant::now();
        let mut candidates: Vec<(Instant, ChunkTag)> = overlay_tags
            .into_iter()
            .filter(|tag| !uploaded.contains_key(tag))
            .filter_map(|tag| {
                let sealed = sealed_at.get(&tag).copied().unwrap_or(now);
                (now.duration_since(sealed) >= quiet).then_some((sealed, tag))
            })
            .collect();
        candidates.sort();
        candidates.into_iter().map(|(_, tag)| tag).collect()
    }

    /// When the upload journal says `tag` was last written to (or found in)
    /// the store: seconds since the epoch, 0 when its age is unknown.
    pub fn uploaded_at(&self, tag: &ChunkTag) -> Option<u64> {
        self.uploaded
            .lock()
            .expect("uploaded lock")
            .get(tag)
            .copied()
    }

    /// Records uploads in the journal, durably (a restart does not send them again).
    pub fn record_uploaded(&self, entries: &[(ChunkTag, u64)]) -> Result<(), ImageError> {
        if entries.is_empty() {
            return Ok(());
        }
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
        commit().map_err(state_error)?;
        self.uploaded
            .lock()
            .expect("uploaded lock")
            .extend(entries.iter().copied());
        Ok(())
    }

    /// Distinct overlay chunks: (uploaded, pending upload, pending stored bytes).
    pub fn upload_counts(&self) -> (u64, u64, u64) {
        let overlay = self.overlay.read().expect("overlay lock");
        let uploaded = self.uploaded.lock().expect("uploaded lock");
        let mut seen = HashSet::new();
        let (mut done, mut pending, mut pending_bytes) = (0, 0, 0);
        for chunk in overlay.values() {
            if let ChunkRef::Stored {
                tag, stored_len, ..
            } = chunk
                && seen.insert(*tag)
            {
                if uploaded.contains_key(tag) {
                    done += 1;
                } else {
                    pending += 1;
                    pending_bytes += u64::from(*stored_len);
                }
            }
        }
        (done, pending, pending_bytes)
    }

    /// The access trace so far: stored chunks in the order they were first read.
    pub fn trace(&self) -> Vec<ChunkTag> {
        self.trace.lock().expect("trace lock").order.clone()
    }

    /// Appends the trace entries recorded since the last call to the state
    /// file, so a restarted daemon continues the trace.
    pub fn persist_trace(&self) -> Result<(), ImageError> {
        let (start, fresh) = {
            let trace = self.trace.lock().expect("trace lock");
            (trace.persisted, trace.order[trace.persisted..].to_vec())
        };
        if fresh.is_empty() {
            return Ok(());
        }
        let commit = || -> Result<(), redb::Error> {
            let write = self.db.begin_write()?;
            {
                let mut table = write.open_table(TRACE)?;
                for (offset, tag) in fresh.iter().enumerate() {
                    table.insert((start + offset) as u64, tag.0.as_slice())?;
                }
            }
            write.commit()?;
            Ok(())
        };
        commit().map_err(state_error)?;
        let mut trace = self.trace.lock().expect("trace lock");
        trace.persisted = trace.persisted.max(start + fresh.len());
        Ok(())
    }
}

/// Seconds since the Unix epoch, for the upload journal.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::FetchSettings;
    use crate::layout;
    use crate::store::memory::MemoryStore;
    use crate::store::{ReadStore, WriteStore};

    const CHUNK: u32 = 65536;

    struct Harness {
        runtime: tokio::runtime::Runtime,
        store: MemoryStore,
        secrets: ParcelSecrets,
        base: Manifest,
        dir: tempfile::TempDir,
    }

    /// A base version holding `files`, stored in a memory store.
    fn harness(files: &[(&str, Vec<u8>)]) -> Harness {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store = MemoryStore::new();
        let secrets = ParcelSecrets::generate(None);
        let mut encoder = ChunkEncoder::new(secrets.dedup_secret.clone(), 3).unwrap();
        let mut entries = Vec::new();
        for (path, data) in files {
            let mut chunks = Vec::new();
            for piece in data.chunks(CHUNK as usize) {
                let encoded = encoder.encode(piece);
                if let EncodedChunk::Stored {
                    chunk: ChunkRef::Stored { tag, .. },
                    stored,
                } = &encoded
                {
                    runtime
                        .block_on(
                            store.put_new(&layout::chunk(tag), bytes::Bytes::from(stored.clone())),
                        )
                        .unwrap();
                }
                chunks.push(encoded.chunk_ref());
            }
            entries.push(Entry {
                path: (*path).into(),
                mode: 0o644,
                mtime: Timestamp::default(),
                kind: EntryKind::File {
                    size: data.len() as u64,
                    chunks,
                },
            });
        }
        let base = Manifest {
            version: 1,
            parent: None,
            created: Timestamp::now(),
            lock_nonce: None,
            host: "h".into(),
            message: String::new(),
            chunk_size: CHUNK,
            entries,
        };
        Harness {
            runtime,
            store,
            secrets,
            base,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    impl Harness {
        fn open(&self, write_back_limit: u64) -> Image {
            let cache =
                Arc::new(ChunkCache::open(&self.dir.path().join("cache"), 1 << 30).unwrap());
            let store: Arc<dyn ReadStore> = Arc::new(self.store.clone());
            let fetcher = Fetcher::start(
                store,
                cache.clone(),
                FetchSettings::default(),
                self.runtime.handle().clone(),
            );
            let options = ImageOptions {
                write_back_limit,
                zstd_level: 3,
                decoded_cache_chunks: 4,
            };
            Image::open(
                &self.dir.path().join("session.redb"),
                &self.base,
                self.secrets.clone(),
                fetcher,
                cache,
                options,
            )
            .unwrap()
        }
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut out);
        out
    }

    /// xorshift: deterministic random numbers for the workload.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn random_workload_matches_a_reference_model_across_reopens() {
        let initial = pattern(1, 5 * CHUNK as usize + 1234);
        let h = harness(&[("disk.img", initial.clone())]);
        let mut model = initial;
        let mut image = h.open(3 * u64::from(CHUNK)); // tiny buffer: forces eviction
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        for step in 0..400u64 {
            let op = next(&mut rng) % 100;
            let max = model.len() as u64 + 2 * u64::from(CHUNK);
            if op < 60 {
                let offset = next(&mut rng) % max;
                let len = (next(&mut rng) % (2 * u64::from(CHUNK) + 7)) as usize + 1;
                let data = pattern(step + 100, len);
                image.write("disk.img", offset, &data).unwrap();
                let end = offset as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[offset as usize..end].copy_from_slice(&data);
            } else if op < 70 {
                let size = next(&mut rng) % max;
                image.truncate("disk.img", size).unwrap();
                model.resize(size as usize, 0);
            } else if op < 78 {
                let offset = next(&mut rng) % max;
                let len = next(&mut rng) % (3 * u64::from(CHUNK));
                image.punch_hole("disk.img", offset, len).unwrap();
                let end = (offset + len).min(model.len() as u64) as usize;
                if (offset as usize) < end {
                    model[offset as usize..end].fill(0);
                }
            } else if op < 85 {
                image.fsync("disk.img").unwrap();
            } else if op < 88 {
                image.flush_all().unwrap();
                drop(image);
                image = h.open(3 * u64::from(CHUNK)); // reopen: only durable state survives, and all of it was flushed
            } else {
                let offset = next(&mut rng) % (model.len() as u64 + 10);
                let len = (next(&mut rng) % (3 * u64::from(CHUNK))) as usize;
                let expected_end = (offset as usize + len).min(model.len());
                let expected = if (offset as usize) < expected_end {
                    &model[offset as usize..expected_end]
                } else {
                    &[][..]
                };
                assert_eq!(
                    image.read("disk.img", offset, len).unwrap(),
                    expected,
                    "step {step}: read at {offset}+{len}"
                );
            }
            assert_eq!(
                image.lookup("disk.img").unwrap().size,
                model.len() as u64,
                "step {step}: size"
            );
        }
        assert_eq!(image.read("disk.img", 0, model.len()).unwrap(), model);
    }

    #[test]
    fn concurrent_writers_of_disjoint_ranges() {
        let h = harness(&[("disk.img", pattern(2, 8 * CHUNK as usize))]);
        let image = Arc::new(h.open(4 * u64::from(CHUNK)));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let image = image.clone();
                std::thread::spawn(move || {
                    for i in 0..50u64 {
                        // Thread t owns bytes where (offset / 1000) % 4 == t; writes straddle chunk edges.
                        let offset = (i * 4 + t) * 1000 + i * 37 % 100;
                        let len = 1000 - (i * 37 % 100) as usize;
                        image
                            .write("disk.img", offset * 3, &vec![t as u8 + 1; len.min(900)])
                            .unwrap();
                        if i % 10 == 0 {
                            image.fsync("disk.img").unwrap();
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        image.flush_all().unwrap();
        let mut model = pattern(2, 8 * CHUNK as usize);
        for i in 0..50u64 {
            for t in 0..4u64 {
                let offset = ((i * 4 + t) * 1000 + i * 37 % 100) * 3;
                let len = (1000 - (i * 37 % 100) as usize).min(900);
                let end = offset as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[offset as usize..end].fill(t as u8 + 1);
            }
        }
        assert_eq!(image.read("disk.img", 0, model.len()).unwrap(), model);
    }

    #[test]
    fn fsynced_writes_survive_a_crash_and_unsynced_ones_do_not_corrupt() {
        let h = harness(&[("disk.img", pattern(3, 3 * CHUNK as usize))]);
        let image = h.open(1 << 30);
        image.write("disk.img", 100, b"durable").unwrap();
        image
            .write("disk.img", 4 * u64::from(CHUNK), b"grown")
            .unwrap();
        image.fsync("disk.img").unwrap();
        image.write("disk.img", 200, b"lost in the crash").unwrap();
        drop(image); // a kill: the write-back buffer is gone, nothing else happens
        let reopened = h.open(1 << 30);
        assert_eq!(reopened.read("disk.img", 100, 7).unwrap(), b"durable");
        assert_eq!(
            reopened.read("disk.img", 4 * u64::from(CHUNK), 5).unwrap(),
            b"grown"
        );
        assert_eq!(
            reopened.lookup("disk.img").unwrap().size,
            4 * u64::from(CHUNK) + 5
        );
        let base = pattern(3, 3 * CHUNK as usize);
        assert_eq!(
            reopened.read("disk.img", 200, 17).unwrap(),
            &base[200..217],
            "unsynced write is simply absent"
        );
    }

    #[test]
    fn tree_operations() {
        let h = harness(&[
            ("disk.img", pattern(4, 1000)),
            ("vm.toml", b"x = 1\n".to_vec()),
        ]);
        let image = h.open(1 << 30);
        image.mkdir("sub", 0o755).unwrap();
        image.create_file("sub/new", 0o600).unwrap();
        image.write("sub/new", 0, b"hello").unwrap();
        assert!(matches!(
            image.create_file("sub/new", 0o600),
            Err(ImageError::Exists(_))
        ));
        assert!(matches!(
            image.create_file("nodir/x", 0o600),
            Err(ImageError::NotFound(_))
        ));
        assert!(matches!(image.rmdir("sub"), Err(ImageError::NotEmpty(_))));
        let names: Vec<String> = image
            .list("")
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, vec!["disk.img", "sub", "vm.toml"]);
        // Atomic rename over an existing file keeps the moved file's identity and content.
        let id = image.lookup("sub/new").unwrap().id;
        image.rename("sub/new", "vm.toml").unwrap();
        assert_eq!(image.lookup("vm.toml").unwrap().id, id);
        assert_eq!(image.read("vm.toml", 0, 100).unwrap(), b"hello");
        assert!(matches!(
            image.lookup("sub/new"),
            Err(ImageError::NotFound(_))
        ));
        image.rename("sub", "moved").unwrap();
        image.rmdir("moved").unwrap();
        image.unlink("disk.img").unwrap();
        image
            .set_attributes(
                "vm.toml",
                Some(0o640),
                Some(Timestamp { secs: 5, nanos: 6 }),
            )
            .unwrap();
        image.flush_all().unwrap();
        drop(image);
        let reopened = h.open(1 << 30);
        let names: Vec<String> = reopened
            .list("")
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, vec!["vm.toml"]);
        let node = reopened.lookup("vm.toml").unwrap();
        assert_eq!(
            (node.mode, node.mtime, node.id),
            (0o640, Timestamp { secs: 5, nanos: 6 }, id)
        );
        assert_eq!(reopened.read("vm.toml", 0, 100).unwrap(), b"hello");
        assert!(
            reopened.next_id.load(Ordering::SeqCst) > id,
            "ids are never reused"
        );
    }

    #[test]
    fn a_cached_chunk_damaged_on_disk_is_dropped_and_fetched_again() {
        let data = pattern(8, 2 * CHUNK as usize);
        let h = harness(&[("disk.img", data.clone())]);
        let image = h.open(1 << 30);
        assert_eq!(image.read("disk.img", 0, data.len()).unwrap(), data);
        drop(image);
        let EntryKind::File { chunks, .. } = &h.base.entries[0].kind else {
            panic!("file")
        };
        let tag = chunks[0].tag().unwrap();
        let file = h.dir.path().join("cache").join(layout::chunk(&tag));
        let mut stored = std::fs::read(&file).unwrap();
        stored[100] ^= 0x40;
        std::fs::write(&file, &stored).unwrap();
        // A warm read only decrypts a cached chunk: the AEAD check finds the
        // damage, and the chunk comes from the store again, checked in full.
        let image = h.open(1 << 30);
        assert_eq!(image.read("disk.img", 0, data.len()).unwrap(), data);
        assert!(chunk::verify_tag(tag, &std::fs::read(&file).unwrap()).is_ok());
    }

    #[test]
    fn a_snapshot_keeps_its_chunks_cached_until_unpinned() {
        let h = harness(&[("disk.img", pattern(6, 2 * CHUNK as usize))]);
        let image = h.open(1 << 30);
        image.write("disk.img", 0, b"first").unwrap();
        let (manifest, pinned) = image.snapshot(&h.base).unwrap();
        let EntryKind::File { chunks, .. } = &manifest.entries[0].kind else {
            panic!("file")
        };
        let tag = chunks[0].tag().unwrap();
        assert_eq!(pinned, vec![tag]);
        // A write after the snapshot supersedes the chunk in the overlay; the
        // snapshot's copy must stay until it has been uploaded.
        image.write("disk.img", 0, b"second").unwrap();
        image.fsync("disk.img").unwrap();
        assert_ne!(image.overlay_tags(), vec![tag]);
        assert!(
            image.cache.get(&tag).unwrap().is_some(),
            "superseded but pinned"
        );
        image.cache.unpin(pinned.iter());
    }

    #[test]
    fn punched_chunks_become_zero_chunks_and_keys_stay_encrypted_on_disk() {
        let h = harness(&[("disk.img", pattern(5, 4 * CHUNK as usize))]);
        let image = h.open(1 << 30);
        image.write("disk.img", 10, b"changed").unwrap();
        image
            .punch_hole("disk.img", u64::from(CHUNK), 2 * u64::from(CHUNK))
            .unwrap();
        image.flush_all().unwrap();
        let manifest = image.to_manifest(&h.base).unwrap();
        let EntryKind::File { chunks, .. } = &manifest.entries[0].kind else {
            panic!("file")
        };
        assert!(matches!(chunks[1], ChunkRef::Zero) && matches!(chunks[2], ChunkRef::Zero));
        assert!(
            matches!(chunks[0], ChunkRef::Stored { .. })
                && matches!(chunks[3], ChunkRef::Stored { .. })
        );
        let ChunkRef::Stored { key, tag, .. } = &chunks[0] else {
            unreachable!()
        };
        assert_ne!(
            Some(*tag),
            h.base.files().next().unwrap().2[0].tag(),
            "chunk 0 was rewritten"
        );
        assert_eq!(image.overlay_tags().len(), 1, "zero chunks take no storage");
        drop(image);
        let state = std::fs::read(h.dir.path().join("session.redb")).unwrap();
        assert!(
            !state.windows(32).any(|w| w == key.as_bytes()),
            "a chunk key is stored in the clear in the session state"
        );
    }

    #[test]
    fn growing_a_file_with_a_short_last_chunk_reads_zeros_past_the_old_end() {
        let h = harness(&[("disk.img", pattern(6, 1000))]);
        let image = h.open(1 << 30);
        assert_eq!(image.read("disk.img", 0, 1000).unwrap(), pattern(6, 1000));
        image.truncate("disk.img", 3000).unwrap();
        assert_eq!(image.read("disk.img", 2000, 500).unwrap(), vec![0u8; 500]);
        assert_eq!(
            image.read("disk.img", 900, 200).unwrap()[..100],
            pattern(6, 1000)[900..]
        );
    }
}
