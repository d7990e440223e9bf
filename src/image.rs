//! One open parcel as a mutable file tree: the base manifest's files plus a
//! durable overlay of changes. No FUSE types: the daemon's FUSE adapter
//! translates requests into these calls and maps [`ImageError`] to errno.
//!
//! Files and directories are named by node id ([`Node::id`], the inode number
//! at the FUSE edge; the root is [`ROOT`]): every operation on an open file
//! takes its id, and a directory entry is found by (parent id, name). Paths
//! are for callers that only have paths ([`Image::resolve`], [`Image::files`])
//! and for the state records and the manifest, which are keyed by path.
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
//! file system.
//!
//! A chunk that an fsync finds changed in only a few bytes is not sealed then
//! (a 4 KiB write would cost a whole chunk's encoding and write): the changed
//! bytes go to the **fsync log** instead (`logged_writes` in the state file,
//! committed with the file's record in one transaction) and the chunk stays
//! buffered. Its log is bounded (a quarter of a chunk per fsync, half a chunk
//! in all; past that the fsync seals it), and the transaction that seals or
//! drops the chunk deletes its log. Reopening the image applies the log to
//! the committed chunks in order, so the chunks are what they were at the
//! last fsync. A chunk being sealed stays readable from the buffer until its
//! overlay entry is committed, and a write during sealing keeps it dirty.
//! After a failed write of local state the image refuses further writes
//! ([`ImageError::Poisoned`]) until it is reopened.
//!
//! | file | owns |
//! |---|---|
//! | `image/tree.rs` | the node tree: nodes by id, directories' children by name, paths derived |
//! | `image/records.rs` | the state file (redb): tables, stored records, encrypted overlay records |
//! | `image/write_back.rs` | the write-back buffer of dirty plaintext chunks |
//! | [`journal`] | the upload journal (what is in the store since when), [`journal::unix_now`] |
//! | `image/access.rs` | the access trace (first-read order of stored chunks) |
//! | `image/decoded.rs` | recently decoded chunks, for small reads |
//! | [`base`] | the base version, its format-2 segments loaded as they are needed |

mod access;
mod base;
mod decoded;
pub mod journal;
mod records;
mod tree;
mod write_back;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::cache::{CacheError, ChunkCache, Durability};
use crate::chunk::{self, ChunkEncoder, ChunkKey, ChunkRef, ChunkTag, EncodedChunk};
use crate::error::{Classify, ErrorClass};
use crate::fetch::{FetchError, Fetcher, Priority};
use crate::keys::ParcelSecrets;
use crate::manifest::{Entry, EntryKind, Manifest, Timestamp, validate_path};

use access::{AccessTrace, WorkingSetRecorder};
pub use base::{BaseError, BaseManifest};
use decoded::DecodedChunks;
use journal::UploadJournal;
use records::{Change, ChunkSlot, Loaded, LoggedWrite, StateDb};
pub use tree::{Node, NodeKind, ROOT};
use tree::{Tree, join};
use write_back::{SealScope, WriteBack};

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
    /// A chunk could not be fetched (or what came was not the chunk).
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A segment of the base version's manifest could not be loaded.
    #[error(transparent)]
    Base(#[from] BaseError),
    /// The session state file could not be opened or created.
    #[error("session state {}: {source}", path.display())]
    OpenState {
        /// The state file.
        path: PathBuf,
        /// Cause.
        source: redb::DatabaseError,
    },
    /// Reading or writing the session state failed; after a failed write the
    /// image refuses writes.
    #[error("session state: {0}")]
    State(#[source] redb::Error),
    /// A record of the session state is corrupt or from another parcel.
    #[error("session state: {0}")]
    CorruptState(String),
    /// The local cache could not keep a sealed chunk; the image now refuses writes.
    #[error("session state: {0}")]
    Cache(#[source] CacheError),
    /// The chunk encoder could not be set up.
    #[error("chunk encoder: {0}")]
    Encoder(#[source] std::io::Error),
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
            ImageError::Base(e) => e.class(),
            ImageError::Cache(e) => e.class(),
            ImageError::OpenState { .. }
            | ImageError::State(_)
            | ImageError::CorruptState(_)
            | ImageError::Encoder(_)
            | ImageError::Poisoned => ErrorClass::Other,
        }
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
    base: Arc<BaseManifest>,
    state: StateDb,
    tree: RwLock<Tree>,
    overlay: RwLock<HashMap<ChunkSlot, ChunkRef>>,
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
    journal: Mutex<UploadJournal>,
    trace: Mutex<AccessTrace>,
    working_set: Mutex<WorkingSetRecorder>,
    /// The file whose reads `working_set` records now (0: none), checked on
    /// the read path before its lock is taken.
    working_set_file: AtomicU64,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("chunk_size", &self.chunk_size)
            .finish_non_exhaustive()
    }
}

/// How node `id` is named in messages: its path, or its number once gone.
fn describe(tree: &Tree, id: u64) -> String {
    tree.path_of(id).unwrap_or_else(|| format!("inode {id}"))
}

/// How `name` in directory `parent` is named in messages.
fn describe_child(tree: &Tree, parent: u64, name: &str) -> String {
    tree.path_of(parent)
        .map_or_else(|| name.to_owned(), |p| join(&p, name))
}

/// Where chunk `index` of `node` comes from, short of the write-back buffer;
/// `None` while the base's segment that holds it is not loaded.
fn committed_chunk(
    overlay: &HashMap<ChunkSlot, ChunkRef>,
    base: &BaseManifest,
    node: &Node,
    index: u64,
) -> Option<ChunkRef> {
    if let Some(chunk) = overlay.get(&(node.id, index)) {
        return Some(chunk.clone());
    }
    match node.base {
        Some(file) if index < node.base_limit => base.loaded_chunk(file as usize, index).cloned(),
        _ => Some(ChunkRef::Zero),
    }
}

impl Image {
    /// Opens the session state at `state`, creating it from `base` if it does
    /// not exist yet (a new session), else reopening it as it was (after a
    /// restart or crash).
    pub fn open(
        state: &Path,
        base: Arc<BaseManifest>,
        secrets: ParcelSecrets,
        fetcher: Fetcher,
        cache: Arc<ChunkCache>,
        options: ImageOptions,
    ) -> Result<Image, ImageError> {
        let state = StateDb::open(state, &secrets)?;
        let chunk_size = u64::from(base.header().chunk_size);
        let image = Image {
            chunk_size,
            secrets,
            base,
            state,
            tree: RwLock::new(Tree::new()),
            overlay: RwLock::new(HashMap::new()),
            buffer: Mutex::new(WriteBack::new(chunk_size)),
            sealing: Mutex::new(()),
            fetcher,
            cache,
            options,
            decoded: Mutex::new(DecodedChunks::default()),
            next_id: AtomicU64::new(2),
            poisoned: AtomicBool::new(false),
            gate: RwLock::new(()),
            frozen: AtomicBool::new(false),
            journal: Mutex::new(UploadJournal::default()),
            trace: Mutex::new(AccessTrace::default()),
            working_set: Mutex::new(WorkingSetRecorder::default()),
            working_set_file: AtomicU64::new(0),
        };
        match image.state.load()? {
            Some(mut loaded) => {
                let logged = std::mem::take(&mut loaded.logged);
                image.resume(loaded)?;
                image.replay_logged(logged)?;
            }
            None => image.initialise()?,
        }
        Ok(image)
    }

    /// Takes over the state of an existing state file.
    fn resume(&self, loaded: Loaded) -> Result<(), ImageError> {
        self.next_id.store(loaded.next_id, Ordering::SeqCst);
        let mut tree = self.tree.write().expect("tree lock");
        for (path, node) in loaded.entries {
            if !tree.insert_at(&path, node) {
                return Err(ImageError::CorruptState(format!(
                    "entry record for {path} has no parent directory"
                )));
            }
        }
        let mut overlay = self.overlay.write().expect("overlay lock");
        overlay.extend(loaded.overlay);
        let stored: Vec<ChunkTag> = overlay.values().filter_map(ChunkRef::tag).collect();
        self.cache.pin(stored.iter());
        let mut journal = self.journal.lock().expect("journal lock");
        journal.sealed(stored, Instant::now());
        journal.uploaded(loaded.uploaded);
        *self.trace.lock().expect("trace lock") = AccessTrace::resumed(loaded.trace);
        Ok(())
    }

    /// Builds the tree of a new session from its base version.
    fn initialise(&self) -> Result<(), ImageError> {
        let base = self.base.header();
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
                EntryKind::File { size, .. } => {
                    let node = Node {
                        id,
                        kind: NodeKind::File,
                        mode: entry.mode,
                        mtime: entry.mtime,
                        size: *size,
                        base: Some(base_index),
                        base_limit: size.div_ceil(self.chunk_size),
                    };
                    base_index += 1;
                    node
                }
            };
            if !tree.insert_at(&entry.path, node) {
                return Err(ImageError::Invalid(format!(
                    "{}: the base version lists it twice or without its directory",
                    entry.path
                )));
            }
        }
        self.state
            .initialise(&tree.all(), self.next_id.load(Ordering::SeqCst))
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

    /// The node with id `id` ([`ROOT`] is the root directory).
    pub fn node(&self, id: u64) -> Result<Node, ImageError> {
        self.tree
            .read()
            .expect("tree lock")
            .get(id)
            .ok_or_else(|| ImageError::NotFound(format!("inode {id}")))
    }

    /// The entry `name` in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &str) -> Result<Node, ImageError> {
        let tree = self.tree.read().expect("tree lock");
        tree.child(parent, name)
            .and_then(|id| tree.get(id))
            .ok_or_else(|| ImageError::NotFound(describe_child(&tree, parent, name)))
    }

    /// The entry at `path` ("" is the root directory), for callers that name
    /// files by path; one step per path component.
    pub fn resolve(&self, path: &str) -> Result<Node, ImageError> {
        let tree = self.tree.read().expect("tree lock");
        tree.resolve(path)
            .and_then(|id| tree.get(id))
            .ok_or_else(|| ImageError::NotFound(path.to_owned()))
    }

    /// The entries directly inside directory `dir`, as (name, node), by name.
    pub fn list(&self, dir: u64) -> Result<Vec<(String, Node)>, ImageError> {
        let tree = self.tree.read().expect("tree lock");
        if tree.get(dir).is_none() {
            return Err(ImageError::NotFound(format!("inode {dir}")));
        }
        let children = tree
            .children(dir)
            .ok_or_else(|| ImageError::NotDirectory(describe(&tree, dir)))?;
        Ok(children
            .iter()
            .filter_map(|(name, id)| Some((name.clone(), tree.get(*id)?)))
            .collect())
    }

    /// The file with id `id` (an error for a directory).
    fn file(&self, id: u64) -> Result<Node, ImageError> {
        let tree = self.tree.read().expect("tree lock");
        match tree.get(id) {
            Some(node) if node.kind == NodeKind::File => Ok(node),
            Some(_) => Err(ImageError::IsDirectory(describe(&tree, id))),
            None => Err(ImageError::NotFound(format!("inode {id}"))),
        }
    }

    /// Where chunk `index` of `node` comes from, short of the write-back
    /// buffer; a base segment not loaded yet is fetched (no lock held).
    fn committed_chunk(&self, node: &Node, index: u64) -> Result<ChunkRef, ImageError> {
        let overlay = self.overlay.read().expect("overlay lock");
        if let Some(chunk) = committed_chunk(&overlay, &self.base, node, index) {
            return Ok(chunk);
        }
        drop(overlay);
        let file = node.base.expect("only base chunks can be unloaded");
        Ok(self.base.chunk(file as usize, index)?)
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
        self.trace.lock().expect("trace lock").read(tag);
        let data =
            self.fetcher
                .plaintext_blocking(tag, key, &self.secrets.dedup_secret, priority)?;
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

    /// Reads up to `len` bytes at `offset` of file `id` (short at end of file).
    pub fn read(&self, id: u64, offset: u64, len: usize) -> Result<Vec<u8>, ImageError> {
        let node = self.file(id)?;
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
            let buffered =
                self.buffer
                    .lock()
                    .expect("buffer lock")
                    .read(&(node.id, index), within, take);
            match buffered {
                Some(bytes) => out.extend_from_slice(&bytes),
                None => {
                    match self.committed_chunk(&node, index)? {
                        ChunkRef::Zero => out.resize(out.len() + take, 0),
                        ChunkRef::Stored { tag, key, .. } => {
                            if self.working_set_file.load(Ordering::Relaxed) == node.id {
                                self.note_working_set_read(node.id, index);
                            }
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
            let overlay = self.overlay.read().expect("overlay lock");
            chunks
                .filter_map(|index| committed_chunk(&overlay, &self.base, node, index)?.tag())
                .filter(|tag| !decoded.contains(tag))
                .collect()
        };
        self.fetcher.advise_will_need(wanted);
    }

    /// Writes `data` at `offset` of file `id`, extending the file if needed.
    pub fn write(&self, id: u64, offset: u64, data: &[u8]) -> Result<usize, ImageError> {
        let _change = self.begin_change()?;
        let node = self.file(id)?;
        let mut position = offset;
        let mut written = 0usize;
        while written < data.len() {
            let index = position / self.chunk_size;
            let within = (position % self.chunk_size) as usize;
            let take = (self.chunk_size as usize - within).min(data.len() - written);
            self.modify_chunk(&node, index, (within, within + take), |chunk| {
                chunk[within..within + take].copy_from_slice(&data[written..written + take]);
            })?;
            position += take as u64;
            written += take;
        }
        self.update_node(id, |n| {
            n.size = n.size.max(offset + data.len() as u64);
            n.mtime = Timestamp::now();
        })?;
        self.evict_if_full()?;
        Ok(written)
    }

    /// Applies `change`, which changes the bytes `range` of chunk `index` of
    /// `node`, in the write-back buffer, materialising the chunk first (no
    /// lock is held while fetching; not at all when `range` is all of it).
    fn modify_chunk(
        &self,
        node: &Node,
        index: u64,
        range: (usize, usize),
        change: impl FnOnce(&mut [u8]),
    ) -> Result<(), ImageError> {
        let slot = (node.id, index);
        // A change of the whole chunk needs nothing of what was there.
        let whole = range == (0, self.chunk_size as usize);
        let mut loaded: Option<Vec<u8>> = None;
        let mut change = change;
        loop {
            let applied =
                self.buffer
                    .lock()
                    .expect("buffer lock")
                    .modify(slot, range, &mut loaded, change);
            match applied {
                Ok(()) => return Ok(()),
                Err(unapplied) => change = unapplied,
            }
            loaded = Some(if whole {
                vec![0u8; self.chunk_size as usize]
            } else {
                self.load_chunk(&self.committed_chunk(node, index)?, Priority::Demand)?
            });
        }
    }

    fn update_node(&self, id: u64, change: impl FnOnce(&mut Node)) -> Result<Node, ImageError> {
        let mut tree = self.tree.write().expect("tree lock");
        let Some(node) = tree.get_mut(id) else {
            return Err(ImageError::NotFound(describe(&tree, id)));
        };
        change(node);
        Ok(*node)
    }

    fn evict_if_full(&self) -> Result<(), ImageError> {
        let over = self.buffer.lock().expect("buffer lock").bytes() > self.options.write_back_limit;
        if over { self.flush_all() } else { Ok(()) }
    }

    /// Makes every write to `id` so far durable (the file's `fsync`): small
    /// changes of a chunk into the fsync log, the other chunks sealed.
    pub fn fsync(&self, id: u64) -> Result<(), ImageError> {
        let node = self.node(id)?;
        let logged = self.log_small_writes(node.id)?;
        if logged
            && !self
                .buffer
                .lock()
                .expect("buffer lock")
                .any_unlogged(node.id)
        {
            return Ok(()); // the log's commit wrote the file's record too
        }
        self.seal(SealScope::Unlogged(node.id), &[])
    }

    /// Commits the small unlogged changes of file `id`'s chunks to the fsync
    /// log, with the file's record; whether there were any.
    fn log_small_writes(&self, id: u64) -> Result<bool, ImageError> {
        self.check_writable()?;
        let _sealing = self.sealing.lock().expect("sealing lock");
        let chunk_size = self.chunk_size as usize;
        let logged = self.buffer.lock().expect("buffer lock").take_for_log(
            id,
            chunk_size / 4,
            chunk_size / 2,
        );
        if logged.is_empty() {
            return Ok(false);
        }
        let change = Change {
            logged,
            entries: self.entries_of(SealScope::File(id)),
            ..Change::default()
        };
        if let Err(e) = self.state.commit(&change) {
            return self.poison(e);
        }
        Ok(true)
    }

    /// Applies the fsync log left in a reopened state file: each logged
    /// chunk is rebuilt in the write-back buffer as of its last fsync.
    fn replay_logged(&self, logged: Vec<LoggedWrite>) -> Result<(), ImageError> {
        let mut by_slot: std::collections::BTreeMap<ChunkSlot, Vec<LoggedWrite>> =
            std::collections::BTreeMap::new();
        for write in logged {
            by_slot.entry(write.slot).or_default().push(write);
        }
        for ((id, index), mut writes) in by_slot {
            writes.sort_by_key(|w| w.sequence);
            let node = self.file(id).map_err(|_| {
                ImageError::CorruptState(format!(
                    "the fsync log has writes of inode {id}, which is not a file"
                ))
            })?;
            let chunk_size = self.chunk_size as usize;
            if writes
                .iter()
                .any(|w| w.within as usize + w.bytes.len() > chunk_size)
            {
                return Err(ImageError::CorruptState(format!(
                    "the fsync log has a write past the end of chunk {index} of inode {id}"
                )));
            }
            let logged_bytes = writes.iter().map(|w| w.bytes.len()).sum();
            let next_sequence = writes.last().map_or(0, |w| w.sequence + 1);
            self.modify_chunk(&node, index, (0, 0), |chunk| {
                for w in &writes {
                    let at = w.within as usize;
                    chunk[at..at + w.bytes.len()].copy_from_slice(&w.bytes);
                }
            })?;
            self.buffer.lock().expect("buffer lock").mark_logged(
                (id, index),
                logged_bytes,
                next_sequence,
            );
        }
        Ok(())
    }

    /// Makes every write so far durable (sync of the whole session).
    pub fn flush_all(&self) -> Result<(), ImageError> {
        self.seal(SealScope::All, &[])
    }

    /// Seals the buffered chunks nobody has changed for `quiet` (the
    /// trickle uploader's timer), so they can be uploaded.
    pub fn seal_quiet(&self, quiet: Duration) -> Result<(), ImageError> {
        let any_quiet = self.buffer.lock().expect("buffer lock").any_quiet(quiet);
        if any_quiet {
            self.seal(SealScope::QuietFor(quiet), &[])
        } else {
            Ok(())
        }
    }

    /// The entry records a seal of `scope` writes: the file's own, or all.
    fn entries_of(&self, scope: SealScope) -> Vec<(String, Node)> {
        let tree = self.tree.read().expect("tree lock");
        match scope {
            SealScope::File(id) | SealScope::Unlogged(id) => tree.entry(id).into_iter().collect(),
            SealScope::All | SealScope::QuietFor(_) => tree.all(),
        }
    }

    /// Seals the dirty chunks of `scope`, then commits their overlay
    /// entries, the removal of `dropped` overlay entries and the entry records
    /// in one transaction.
    fn seal(&self, scope: SealScope, dropped: &[ChunkSlot]) -> Result<(), ImageError> {
        /// Chunks encoded and made durable together (8 MiB of 128 KiB chunks).
        const SEAL_BATCH_CHUNKS: usize = 64;
        self.check_writable()?;
        let _sealing = self.sealing.lock().expect("sealing lock");
        let taken = self.buffer.lock().expect("buffer lock").take(scope);
        let mut sealed = Vec::with_capacity(taken.len());
        let mut encoder =
            ChunkEncoder::new(self.secrets.dedup_secret.clone(), self.options.zstd_level)
                .map_err(ImageError::Encoder)?;
        // Encoded a batch at a time, each batch made durable with one sync
        // of the cache (not one per chunk), bounding the encoded bytes held.
        for batch in taken.chunks(SEAL_BATCH_CHUNKS) {
            let encoded: Vec<_> = batch
                .iter()
                .map(|taken| (taken.slot, encoder.encode(&taken.data), taken.generation))
                .collect();
            let stored: Vec<(ChunkTag, &[u8])> = encoded
                .iter()
                .filter_map(|(_, encoded, _)| match encoded {
                    EncodedChunk::Stored {
                        chunk: ChunkRef::Stored { tag, .. },
                        stored,
                    } => Some((*tag, stored.as_slice())),
                    _ => None,
                })
                .collect();
            // Pinned before they enter the cache: the insert evicts down to
            // the limit, and these chunks exist nowhere else.
            let tags: Vec<ChunkTag> = stored.iter().map(|(tag, _)| *tag).collect();
            self.cache.pin(tags.iter());
            if let Err(e) = self.cache.insert_all(&stored, Durability::Durable) {
                self.cache.unpin(tags.iter());
                return self.poison(ImageError::Cache(e));
            }
            sealed.extend(
                encoded
                    .into_iter()
                    .map(|(slot, encoded, generation)| (slot, encoded.chunk_ref(), generation)),
            );
        }
        let change = Change {
            dropped,
            sealed: sealed
                .iter()
                .map(|(slot, chunk, _)| (*slot, chunk.clone()))
                .collect(),
            entries: self.entries_of(scope),
            ..Change::default()
        };
        if let Err(e) = self.state.commit(&change) {
            return self.poison(e);
        }
        let mut overlay = self.overlay.write().expect("overlay lock");
        let mut buffer = self.buffer.lock().expect("buffer lock");
        let mut superseded = Vec::new();
        self.journal.lock().expect("journal lock").sealed(
            sealed.iter().filter_map(|(_, c, _)| c.tag()),
            Instant::now(),
        );
        for (slot, chunk, generation) in sealed {
            if let Some(old) = overlay.insert(slot, chunk).and_then(|c| c.tag()) {
                self.cache.unpin([&old]);
                superseded.push(old);
            }
            buffer.settle(slot, generation);
        }
        drop((overlay, buffer));
        // Earlier versions of rewritten chunks: only this session had them
        // (still-pinned ones — the same content elsewhere — are kept).
        if let Err(e) = self.cache.remove_unpinned(superseded.iter()) {
            tracing::warn!(error = %e, "could not remove superseded chunks from the cache");
        }
        Ok(())
    }

    /// Persists a change of the tree: removes the entry records at
    /// `removed`, writes those of the nodes `changed` as they are now (paths
    /// included), drops `dropped` overlay entries, and records the id counter.
    fn persist_tree_change(
        &self,
        removed: Vec<String>,
        changed: &[u64],
        dropped: &[ChunkSlot],
    ) -> Result<(), ImageError> {
        self.check_writable()?;
        let entries = {
            let tree = self.tree.read().expect("tree lock");
            changed.iter().filter_map(|id| tree.entry(*id)).collect()
        };
        let change = Change {
            dropped,
            removed,
            entries,
            next_id: Some(self.next_id.load(Ordering::SeqCst)),
            ..Change::default()
        };
        match self.state.commit(&change) {
            Ok(()) => Ok(()),
            Err(e) => self.poison(e),
        }
    }

    /// The path `name` would have in directory `parent`, if it can be
    /// created there: a valid path, free, in an existing directory.
    fn check_new(&self, tree: &Tree, parent: u64, name: &str) -> Result<String, ImageError> {
        let Some(parent_path) = tree.path_of(parent) else {
            return Err(ImageError::NotFound(format!("inode {parent}")));
        };
        let path = join(&parent_path, name);
        validate_path(&path).map_err(ImageError::Invalid)?;
        if name.contains('/') {
            return Err(ImageError::Invalid(format!(
                "{name:?} is not a name: it has a slash"
            )));
        }
        if tree.child(parent, name).is_some() {
            return Err(ImageError::Exists(path));
        }
        if tree.children(parent).is_none() {
            return Err(ImageError::NotDirectory(parent_path));
        }
        Ok(path)
    }

    fn create_node(
        &self,
        parent: u64,
        name: &str,
        kind: NodeKind,
        mode: u32,
    ) -> Result<Node, ImageError> {
        let _change = self.begin_change()?;
        let node = {
            let mut tree = self.tree.write().expect("tree lock");
            self.check_new(&tree, parent, name)?;
            let node = Node {
                id: self.next_id.fetch_add(1, Ordering::SeqCst),
                kind,
                mode: mode & 0o7777,
                mtime: Timestamp::now(),
                size: 0,
                base: None,
                base_limit: 0,
            };
            tree.insert(parent, name, node);
            node
        };
        self.persist_tree_change(Vec::new(), &[node.id], &[])?;
        Ok(node)
    }

    /// Creates an empty file `name` in directory `parent`.
    pub fn create_file(&self, parent: u64, name: &str, mode: u32) -> Result<Node, ImageError> {
        self.create_node(parent, name, NodeKind::File, mode)
    }

    /// Creates a directory `name` in directory `parent`.
    pub fn mkdir(&self, parent: u64, name: &str, mode: u32) -> Result<Node, ImageError> {
        self.create_node(parent, name, NodeKind::Directory, mode)
    }

    /// Forgets the buffered and sealed chunks of file `id` (beyond chunk
    /// `keep - 1`; all with 0); returns the overlay keys to delete durably.
    fn drop_chunks(&self, id: u64, keep: u64) -> Vec<ChunkSlot> {
        let logged = self
            .buffer
            .lock()
            .expect("buffer lock")
            .drop_file_from(id, keep);
        let mut overlay = self.overlay.write().expect("overlay lock");
        let dropped: Vec<ChunkSlot> = overlay
            .keys()
            .filter(|(file, index)| *file == id && *index >= keep)
            .copied()
            .collect();
        let mut unreferenced = Vec::new();
        for slot in &dropped {
            if let Some(tag) = overlay.remove(slot).and_then(|c| c.tag()) {
                self.cache.unpin([&tag]);
                unreferenced.push(tag);
            }
        }
        // Chunks only this session wrote and no longer uses: nothing else needs them.
        if let Err(e) = self.cache.remove_unpinned(unreferenced.iter()) {
            tracing::warn!(error = %e, "could not remove dropped chunks from the cache");
        }
        // And the fsync log of chunks never sealed (deleting twice is harmless).
        let mut dropped = dropped;
        dropped.extend(logged);
        dropped
    }

    /// Removes file `name` from directory `parent`.
    pub fn unlink(&self, parent: u64, name: &str) -> Result<(), ImageError> {
        let _change = self.begin_change()?;
        let (id, path) = {
            let mut tree = self.tree.write().expect("tree lock");
            let path = describe_child(&tree, parent, name);
            let Some((id, node)) = tree
                .child(parent, name)
                .and_then(|id| Some((id, tree.get(id)?)))
            else {
                return Err(ImageError::NotFound(path));
            };
            if node.kind != NodeKind::File {
                return Err(ImageError::IsDirectory(path));
            }
            tree.remove(id);
            (id, path)
        };
        let dropped = self.drop_chunks(id, 0);
        self.persist_tree_change(vec![path], &[], &dropped)
    }

    /// Removes the empty directory `name` from directory `parent`.
    pub fn rmdir(&self, parent: u64, name: &str) -> Result<(), ImageError> {
        let _change = self.begin_change()?;
        let path = {
            let mut tree = self.tree.write().expect("tree lock");
            let path = describe_child(&tree, parent, name);
            let Some(id) = tree.child(parent, name) else {
                return Err(ImageError::NotFound(path));
            };
            match tree.children(id) {
                None => return Err(ImageError::NotDirectory(path)),
                Some(children) if !children.is_empty() => {
                    return Err(ImageError::NotEmpty(path));
                }
                Some(_) => {}
            }
            tree.remove(id);
            path
        };
        self.persist_tree_change(vec![path], &[], &[])
    }

    /// Renames `name` in directory `parent` to `new_name` in `new_parent`
    /// atomically, replacing a file (or an empty directory, for a directory)
    /// there.
    pub fn rename(
        &self,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
    ) -> Result<(), ImageError> {
        let _change = self.begin_change()?;
        let (removed, changed, replaced) = {
            let mut tree = self.tree.write().expect("tree lock");
            let (Some(from_dir), Some(to_dir)) = (tree.path_of(parent), tree.path_of(new_parent))
            else {
                let missing = if tree.get(parent).is_none() {
                    parent
                } else {
                    new_parent
                };
                return Err(ImageError::NotFound(format!("inode {missing}")));
            };
            let (from, to) = (join(&from_dir, name), join(&to_dir, new_name));
            validate_path(&to).map_err(ImageError::Invalid)?;
            if new_name.contains('/') {
                return Err(ImageError::Invalid(format!(
                    "{new_name:?} is not a name: it has a slash"
                )));
            }
            if (parent, name) == (new_parent, new_name) {
                return Ok(());
            }
            let moving = tree.child(parent, name);
            if moving.is_some_and(|id| tree.is_within(new_parent, id)) {
                return Err(ImageError::Invalid(format!(
                    "cannot move {from} into itself"
                )));
            }
            let Some((id, node)) = moving.and_then(|id| Some((id, tree.get(id)?))) else {
                return Err(ImageError::NotFound(from));
            };
            let mut replaced = None;
            if let Some(existing) = tree.child(new_parent, new_name).and_then(|id| tree.get(id)) {
                match (existing.kind, node.kind) {
                    (NodeKind::File, NodeKind::File) => replaced = Some(existing.id),
                    (NodeKind::Directory, NodeKind::Directory) => {
                        if tree
                            .children(existing.id)
                            .is_some_and(|children| !children.is_empty())
                        {
                            return Err(ImageError::NotEmpty(to));
                        }
                    }
                    (NodeKind::Directory, NodeKind::File) => {
                        return Err(ImageError::IsDirectory(to));
                    }
                    (NodeKind::File, NodeKind::Directory) => {
                        return Err(ImageError::NotDirectory(to));
                    }
                }
                tree.remove(existing.id);
            }
            if tree.children(new_parent).is_none() {
                return Err(ImageError::NotDirectory(to_dir));
            }
            let moved = tree.subtree(id);
            tree.move_to(id, new_parent, new_name);
            let changed: Vec<u64> = moved.iter().map(|(_, node)| node.id).collect();
            let mut removed: Vec<String> = moved.into_iter().map(|(path, _)| path).collect();
            removed.push(to);
            (removed, changed, replaced)
        };
        let dropped = replaced
            .map(|id| self.drop_chunks(id, 0))
            .unwrap_or_default();
        self.persist_tree_change(removed, &changed, &dropped)
    }

    /// Sets the size of file `id`: shrinking drops data past it (the rest of
    /// the last chunk is zeroed), growing adds zeros. Durable when it returns.
    pub fn truncate(&self, id: u64, size: u64) -> Result<(), ImageError> {
        let _change = self.begin_change()?;
        let node = self.file(id)?;
        let keep = size.div_ceil(self.chunk_size);
        let mut dropped = Vec::new();
        if size < node.size {
            if size % self.chunk_size != 0 {
                let within = (size % self.chunk_size) as usize;
                let chunk_size = self.chunk_size as usize;
                self.modify_chunk(
                    &node,
                    size / self.chunk_size,
                    (within, chunk_size),
                    |chunk| chunk[within..].fill(0),
                )?;
            }
            dropped = self.drop_chunks(node.id, keep);
        }
        self.update_node(id, |n| {
            if size < n.size {
                n.base_limit = n.base_limit.min(keep);
            }
            n.size = size;
            n.mtime = Timestamp::now();
        })?;
        self.seal(SealScope::File(node.id), &dropped)
    }

    /// Zeroes `len` bytes at `offset` of file `id`: whole chunks become zero
    /// chunks (nothing stored or uploaded), partial ones are zeroed in place.
    /// The size is unchanged.
    pub fn punch_hole(&self, id: u64, offset: u64, len: u64) -> Result<(), ImageError> {
        let _change = self.begin_change()?;
        let node = self.file(id)?;
        let end = node.size.min(offset.saturating_add(len));
        let mut position = offset;
        while position < end {
            let index = position / self.chunk_size;
            let within = (position % self.chunk_size) as usize;
            let take = (self.chunk_size - within as u64).min(end - position) as usize;
            let whole = take as u64 == self.chunk_size
                || (within == 0 && position + take as u64 == node.size);
            if whole {
                self.buffer
                    .lock()
                    .expect("buffer lock")
                    .zero((node.id, index));
            } else {
                self.modify_chunk(&node, index, (within, within + take), |chunk| {
                    chunk[within..within + take].fill(0)
                })?;
            }
            position += take as u64;
        }
        self.seal(SealScope::File(node.id), &[])
    }

    /// Sets permission bits and/or the modification time of node `id`.
    pub fn set_attributes(
        &self,
        id: u64,
        mode: Option<u32>,
        mtime: Option<Timestamp>,
    ) -> Result<Node, ImageError> {
        let _change = self.begin_change()?;
        let node = self.update_node(id, |n| {
            if let Some(mode) = mode {
                n.mode = mode & 0o7777;
            }
            if let Some(mtime) = mtime {
                n.mtime = mtime;
            }
        })?;
        self.persist_tree_change(Vec::new(), &[id], &[])?;
        Ok(node)
    }

    /// The current tree as a manifest body (all writes must be flushed first:
    /// call [`Image::flush_all`]).
    pub fn to_manifest(&self, template: &Manifest) -> Result<Manifest, ImageError> {
        if !self.buffer.lock().expect("buffer lock").is_empty() {
            return Err(ImageError::Invalid(
                "unflushed writes: flush before building a manifest".into(),
            ));
        }
        let all = self.tree.read().expect("tree lock").all();
        let overlay = self.overlay.read().expect("overlay lock");
        let not_loaded =
            || ImageError::Invalid("the base version is not loaded yet: load it first".into());
        let entries = all
            .into_iter()
            .map(|(path, node)| {
                Ok(Entry {
                    path,
                    mode: node.mode,
                    mtime: node.mtime,
                    kind: match node.kind {
                        NodeKind::Directory => EntryKind::Directory,
                        NodeKind::File => EntryKind::File {
                            size: node.size,
                            chunks: (0..node.size.div_ceil(self.chunk_size))
                                .map(|index| {
                                    committed_chunk(&overlay, &self.base, &node, index)
                                        .ok_or_else(not_loaded)
                                })
                                .collect::<Result<_, _>>()?,
                        },
                    },
                })
            })
            .collect::<Result<_, ImageError>>()?;
        Ok(Manifest {
            entries,
            ..template.clone()
        })
    }

    /// One character per chunk of file `id`: `.` zero, `L` in the local cache,
    /// `F` being downloaded now, `R` remote only, `D` changed by this session (being written, or sealed
    /// and already in the store), `U` changed, sealed and waiting for upload
    /// (the upload journal does not list it).
    pub fn chunk_map(&self, id: u64) -> Result<String, ImageError> {
        let node = self.file(id)?;
        let fetching = self.fetcher.running();
        let overlay = self.overlay.read().expect("overlay lock");
        let buffer = self.buffer.lock().expect("buffer lock");
        let journal = self.journal.lock().expect("journal lock");
        Ok((0..node.size.div_ceil(self.chunk_size))
            .map(|index| {
                let slot = (node.id, index);
                if buffer.contains(&slot) {
                    return 'D';
                }
                match overlay.get(&slot) {
                    Some(ChunkRef::Stored { tag, .. }) if journal.uploaded_at(tag).is_none() => {
                        return 'U';
                    }
                    Some(_) => return 'D',
                    None => {}
                }
                match committed_chunk(&overlay, &self.base, &node, index) {
                    Some(ChunkRef::Zero) => '.',
                    Some(ChunkRef::Stored { tag, .. }) if self.cache.contains(&tag) => 'L',
                    Some(ChunkRef::Stored { tag, .. }) if fetching.contains(&tag) => 'F',
                    // (Remote, or in a segment not loaded yet.)
                    Some(ChunkRef::Stored { .. }) | None => 'R',
                }
            })
            .collect())
    }

    /// Every file with its path, in path order.
    pub fn files(&self) -> Vec<(String, Node)> {
        let mut all = self.tree.read().expect("tree lock").all();
        all.retain(|(_, node)| node.kind == NodeKind::File);
        all
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
        self.buffer.lock().expect("buffer lock").bytes()
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
    /// journal does not list yet, of files other than `skip` (node ids):
    /// what the trickle uploader sends next.
    pub fn upload_candidates(&self, quiet: Duration, skip: &[u64]) -> Vec<ChunkTag> {
        let overlay_tags: HashSet<ChunkTag> = self
            .overlay
            .read()
            .expect("overlay lock")
            .iter()
            .filter(|((node, _), _)| !skip.contains(node))
            .filter_map(|(_, chunk)| chunk.tag())
            .collect();
        self.journal
            .lock()
            .expect("journal lock")
            .candidates(overlay_tags, quiet)
    }

    /// When the upload journal says `tag` was last written to (or found in)
    /// the store: seconds since the epoch, 0 when its age is unknown.
    pub fn uploaded_at(&self, tag: &ChunkTag) -> Option<u64> {
        self.journal.lock().expect("journal lock").uploaded_at(tag)
    }

    /// Records uploads in the journal, durably (a restart does not send them again).
    pub fn record_uploaded(&self, entries: &[(ChunkTag, u64)]) -> Result<(), ImageError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.state.record_uploaded(entries)?;
        self.journal
            .lock()
            .expect("journal lock")
            .uploaded(entries.iter().copied());
        Ok(())
    }

    /// Distinct overlay chunks: (uploaded, pending upload, pending stored bytes).
    pub fn upload_counts(&self) -> (u64, u64, u64) {
        let overlay = self.overlay.read().expect("overlay lock");
        self.journal
            .lock()
            .expect("journal lock")
            .counts(overlay.values())
    }

    /// The access trace so far: stored chunks in the order they were first read.
    pub fn trace(&self) -> Vec<ChunkTag> {
        self.trace.lock().expect("trace lock").order().to_vec()
    }

    /// Starts recording lazy memory's working set: the stored chunks of file
    /// `id` read from now until `window` has passed, in first-read order.
    pub fn record_working_set(&self, id: u64, window: Duration) {
        self.working_set
            .lock()
            .expect("working set lock")
            .start(id, window);
        self.working_set_file.store(id, Ordering::Relaxed);
    }

    /// Notes a read of chunk `index` of the file whose working set is being
    /// recorded; stops looking once its window has passed.
    fn note_working_set_read(&self, id: u64, index: u64) {
        let recording = self
            .working_set
            .lock()
            .expect("working set lock")
            .read(id, index);
        if !recording {
            self.working_set_file.store(0, Ordering::Relaxed);
        }
    }

    /// The working set recorded: the file and its chunk indexes in first-read
    /// order (not kept across a restart of the daemon).
    pub fn working_set(&self) -> Option<(u64, Vec<u64>)> {
        self.working_set
            .lock()
            .expect("working set lock")
            .recorded()
    }

    /// Appends the trace entries recorded since the last call to the state
    /// file, so a restarted daemon continues the trace.
    pub fn persist_trace(&self) -> Result<(), ImageError> {
        let (start, fresh) = self.trace.lock().expect("trace lock").fresh();
        if fresh.is_empty() {
            return Ok(());
        }
        self.state.append_trace(start, &fresh)?;
        self.trace
            .lock()
            .expect("trace lock")
            .persisted_up_to(start + fresh.len());
        Ok(())
    }
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
                Arc::new(BaseManifest::whole(self.base.clone())),
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
        let disk = image.resolve("disk.img").unwrap().id;
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        for step in 0..400u64 {
            let op = next(&mut rng) % 100;
            let max = model.len() as u64 + 2 * u64::from(CHUNK);
            if op < 60 {
                let offset = next(&mut rng) % max;
                let len = (next(&mut rng) % (2 * u64::from(CHUNK) + 7)) as usize + 1;
                let data = pattern(step + 100, len);
                image.write(disk, offset, &data).unwrap();
                let end = offset as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[offset as usize..end].copy_from_slice(&data);
            } else if op < 70 {
                let size = next(&mut rng) % max;
                image.truncate(disk, size).unwrap();
                model.resize(size as usize, 0);
            } else if op < 78 {
                let offset = next(&mut rng) % max;
                let len = next(&mut rng) % (3 * u64::from(CHUNK));
                image.punch_hole(disk, offset, len).unwrap();
                let end = (offset + len).min(model.len() as u64) as usize;
                if (offset as usize) < end {
                    model[offset as usize..end].fill(0);
                }
            } else if op < 85 {
                image.fsync(disk).unwrap();
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
                    image.read(disk, offset, len).unwrap(),
                    expected,
                    "step {step}: read at {offset}+{len}"
                );
            }
            assert_eq!(
                image.node(disk).unwrap().size,
                model.len() as u64,
                "step {step}: size"
            );
        }
        assert_eq!(image.read(disk, 0, model.len()).unwrap(), model);
    }

    #[test]
    fn concurrent_writers_of_disjoint_ranges() {
        let h = harness(&[("disk.img", pattern(2, 8 * CHUNK as usize))]);
        let image = Arc::new(h.open(4 * u64::from(CHUNK)));
        let disk = image.resolve("disk.img").unwrap().id;
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let image = image.clone();
                std::thread::spawn(move || {
                    for i in 0..50u64 {
                        // Thread t owns bytes where (offset / 1000) % 4 == t; writes straddle chunk edges.
                        let offset = (i * 4 + t) * 1000 + i * 37 % 100;
                        let len = 1000 - (i * 37 % 100) as usize;
                        image
                            .write(disk, offset * 3, &vec![t as u8 + 1; len.min(900)])
                            .unwrap();
                        if i % 10 == 0 {
                            image.fsync(disk).unwrap();
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
        assert_eq!(image.read(disk, 0, model.len()).unwrap(), model);
    }

    #[test]
    fn fsynced_writes_survive_a_crash_and_unsynced_ones_do_not_corrupt() {
        let h = harness(&[("disk.img", pattern(3, 3 * CHUNK as usize))]);
        let image = h.open(1 << 30);
        let disk = image.resolve("disk.img").unwrap().id;
        image.write(disk, 100, b"durable").unwrap();
        image.write(disk, 4 * u64::from(CHUNK), b"grown").unwrap();
        image.fsync(disk).unwrap();
        image.write(disk, 200, b"lost in the crash").unwrap();
        drop(image); // a kill: the write-back buffer is gone, nothing else happens
        let reopened = h.open(1 << 30);
        assert_eq!(reopened.read(disk, 100, 7).unwrap(), b"durable");
        assert_eq!(
            reopened.read(disk, 4 * u64::from(CHUNK), 5).unwrap(),
            b"grown"
        );
        assert_eq!(reopened.node(disk).unwrap().size, 4 * u64::from(CHUNK) + 5);
        let base = pattern(3, 3 * CHUNK as usize);
        assert_eq!(
            reopened.read(disk, 200, 17).unwrap(),
            &base[200..217],
            "unsynced write is simply absent"
        );
    }

    #[test]
    fn small_fsynced_writes_go_to_the_log_and_survive_a_crash() {
        let chunk = CHUNK as usize;
        let mut model = pattern(5, 3 * chunk);
        let h = harness(&[("disk.img", model.clone()), ("other", pattern(6, chunk))]);
        let image = h.open(1 << 30);
        let disk = image.resolve("disk.img").unwrap().id;
        let other = image.resolve("other").unwrap().id;
        for (at, bytes) in [
            (10, &b"logged"[..]),
            (chunk + 20, b"also"),
            (chunk + 22, b"SO"),
        ] {
            image.write(disk, at as u64, bytes).unwrap();
            model[at..at + bytes.len()].copy_from_slice(bytes);
        }
        image.fsync(disk).unwrap();
        assert_eq!(image.cache.stats().pinned, 0, "nothing sealed");
        image.write(other, 0, b"goes with its file").unwrap();
        image.fsync(other).unwrap();
        image.unlink(ROOT, "other").unwrap();
        drop(image); // a kill: only the log has the writes
        let image = h.open(1 << 30);
        assert_eq!(image.read(disk, 0, 3 * chunk).unwrap(), model);
        assert!(matches!(
            image.lookup(ROOT, "other"),
            Err(ImageError::NotFound(_))
        ));

        // Chunk 2's logged write is dropped with the chunk by a truncate:
        // growing the file again gives zeros, after a crash too.
        image.write(disk, 2 * chunk as u64 + 5, b"dropped").unwrap();
        image.fsync(disk).unwrap();
        image.truncate(disk, 2 * chunk as u64).unwrap();
        image.truncate(disk, 3 * chunk as u64).unwrap();
        model[2 * chunk..].fill(0);
        drop(image);
        let image = h.open(1 << 30);
        assert_eq!(image.read(disk, 0, 3 * chunk).unwrap(), model);

        // A change of more than a quarter chunk is sealed at once.
        let sealed = image.overlay_tags();
        let big = vec![7u8; chunk / 2];
        image.write(disk, 0, &big).unwrap();
        model[..chunk / 2].copy_from_slice(&big);
        image.fsync(disk).unwrap();
        assert_ne!(image.overlay_tags(), sealed, "chunk 0 sealed again");
        drop(image);
        assert_eq!(h.open(1 << 30).read(disk, 0, 3 * chunk).unwrap(), model);
    }

    #[test]
    fn tree_operations() {
        let h = harness(&[
            ("disk.img", pattern(4, 1000)),
            ("vm.toml", b"x = 1\n".to_vec()),
        ]);
        let image = h.open(1 << 30);
        let sub = image.mkdir(ROOT, "sub", 0o755).unwrap().id;
        let id = image.create_file(sub, "new", 0o600).unwrap().id;
        image.write(id, 0, b"hello").unwrap();
        assert!(matches!(
            image.create_file(sub, "new", 0o600),
            Err(ImageError::Exists(_))
        ));
        let nodir = image.next_id.load(Ordering::SeqCst) + 10;
        assert!(matches!(
            image.create_file(nodir, "x", 0o600),
            Err(ImageError::NotFound(_))
        ));
        assert!(matches!(
            image.rmdir(ROOT, "sub"),
            Err(ImageError::NotEmpty(_))
        ));
        let names: Vec<String> = image
            .list(ROOT)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, vec!["disk.img", "sub", "vm.toml"]);
        // Atomic rename over an existing file keeps the moved file's identity and content.
        assert_eq!(image.lookup(sub, "new").unwrap().id, id);
        image.rename(sub, "new", ROOT, "vm.toml").unwrap();
        assert_eq!(image.lookup(ROOT, "vm.toml").unwrap().id, id);
        assert_eq!(image.read(id, 0, 100).unwrap(), b"hello");
        assert!(matches!(
            image.lookup(sub, "new"),
            Err(ImageError::NotFound(_))
        ));
        image.rename(ROOT, "sub", ROOT, "moved").unwrap();
        image.rmdir(ROOT, "moved").unwrap();
        image.unlink(ROOT, "disk.img").unwrap();
        image
            .set_attributes(id, Some(0o640), Some(Timestamp { secs: 5, nanos: 6 }))
            .unwrap();
        image.flush_all().unwrap();
        drop(image);
        let reopened = h.open(1 << 30);
        let names: Vec<String> = reopened
            .list(ROOT)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, vec!["vm.toml"]);
        let node = reopened.resolve("vm.toml").unwrap();
        assert_eq!(
            (node.mode, node.mtime, node.id),
            (0o640, Timestamp { secs: 5, nanos: 6 }, id)
        );
        assert_eq!(reopened.read(id, 0, 100).unwrap(), b"hello");
        assert!(
            reopened.next_id.load(Ordering::SeqCst) > id,
            "ids are never reused"
        );
    }

    #[test]
    fn a_moved_directory_takes_its_files_along_across_a_reopen() {
        let h = harness(&[("disk.img", pattern(7, 1000))]);
        let image = h.open(1 << 30);
        let a = image.mkdir(ROOT, "a", 0o755).unwrap().id;
        let b = image.mkdir(a, "b", 0o755).unwrap().id;
        let file = image.create_file(b, "f", 0o644).unwrap().id;
        image.write(file, 0, b"inside").unwrap();
        assert!(matches!(
            image.rename(ROOT, "a", b, "a"),
            Err(ImageError::Invalid(_))
        ));
        image.rename(ROOT, "a", ROOT, "z").unwrap();
        assert!(matches!(
            image.resolve("a/b/f"),
            Err(ImageError::NotFound(_))
        ));
        assert_eq!(image.resolve("z/b/f").unwrap().id, file);
        image.flush_all().unwrap();
        drop(image);
        let reopened = h.open(1 << 30);
        assert_eq!(reopened.resolve("z/b/f").unwrap().id, file);
        assert_eq!(reopened.read(file, 0, 100).unwrap(), b"inside");
        let paths: Vec<String> = reopened.files().into_iter().map(|(p, _)| p).collect();
        assert_eq!(paths, ["disk.img", "z/b/f"]);
        let names: Vec<String> = reopened
            .list(ROOT)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["disk.img", "z"]);
    }

    #[test]
    fn a_cached_chunk_damaged_on_disk_is_dropped_and_fetched_again() {
        use std::os::unix::fs::FileExt;
        let data = pattern(8, 2 * CHUNK as usize);
        let h = harness(&[("disk.img", data.clone())]);
        let image = h.open(1 << 30);
        let disk = image.resolve("disk.img").unwrap().id;
        assert_eq!(image.read(disk, 0, data.len()).unwrap(), data);
        drop(image);
        let EntryKind::File { chunks, .. } = &h.base.entries[0].kind else {
            panic!("file")
        };
        let tag = chunks[0].tag().unwrap();
        let cache_dir = h.dir.path().join("cache");
        let record = |dir: &std::path::Path| {
            crate::cache::cached_chunks(dir)
                .unwrap()
                .into_iter()
                .find(|c| c.tag == tag)
                .expect("the chunk is cached")
        };
        let cached = record(&cache_dir);
        let pack = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cached.pack)
            .unwrap();
        let mut byte = [0u8];
        pack.read_exact_at(&mut byte, cached.offset + 100).unwrap();
        pack.write_all_at(&[byte[0] ^ 0x40], cached.offset + 100)
            .unwrap();
        // A warm read only decrypts a cached chunk: the AEAD check finds the
        // damage, and the chunk comes from the store again, checked in full.
        let image = h.open(1 << 30);
        let disk = image.resolve("disk.img").unwrap().id;
        assert_eq!(image.read(disk, 0, data.len()).unwrap(), data);
        let cached = record(&cache_dir);
        let mut stored = vec![0u8; cached.len as usize];
        std::fs::File::open(&cached.pack)
            .unwrap()
            .read_exact_at(&mut stored, cached.offset)
            .unwrap();
        assert!(chunk::verify_tag(tag, &stored).is_ok());
    }

    #[test]
    fn a_snapshot_keeps_its_chunks_cached_until_unpinned() {
        let h = harness(&[("disk.img", pattern(6, 2 * CHUNK as usize))]);
        let image = h.open(1 << 30);
        let disk = image.resolve("disk.img").unwrap().id;
        image.write(disk, 0, b"first").unwrap();
        let (manifest, pinned) = image.snapshot(&h.base).unwrap();
        let EntryKind::File { chunks, .. } = &manifest.entries[0].kind else {
            panic!("file")
        };
        let tag = chunks[0].tag().unwrap();
        assert_eq!(pinned, vec![tag]);
        // A write after the snapshot supersedes the chunk in the overlay; the
        // snapshot's copy must stay until it has been uploaded.
        image.write(disk, 0, b"second").unwrap();
        image.flush_all().unwrap(); // (an fsync would only log so small a write)
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
        let disk = image.resolve("disk.img").unwrap().id;
        image.write(disk, 10, b"changed").unwrap();
        image
            .punch_hole(disk, u64::from(CHUNK), 2 * u64::from(CHUNK))
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
        let disk = image.resolve("disk.img").unwrap().id;
        assert_eq!(image.read(disk, 0, 1000).unwrap(), pattern(6, 1000));
        image.truncate(disk, 3000).unwrap();
        assert_eq!(image.read(disk, 2000, 500).unwrap(), vec![0u8; 500]);
        assert_eq!(
            image.read(disk, 900, 200).unwrap()[..100],
            pattern(6, 1000)[900..]
        );
    }
}
