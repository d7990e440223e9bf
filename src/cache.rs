//! The local chunk cache: chunks exactly as stored (ciphertext), by tag, shared
//! by every parcel and version on the machine — resuming version N+1 reuses what
//! N cached, and the cache never holds plaintext.
//!
//! On disk, chunks are records in append-only pack files
//! (`<dir>/packs/<16 hex>.pack`, format in [`pack`] and docs/format.md): one
//! pack is appended to at a time, so chunks cached one after another (a
//! sequential fetch, a prefetch in image order, an import) lie one after
//! another on disk and a warm sequential read is a sequential read of a pack.
//! In memory it keeps an index (tag → pack, offset, size, last use), rebuilt
//! by scanning the packs' record headers when opened. A read checks the
//! record's header; [`ChunkCache::get`] also re-checks the tag, and the
//! decrypting reader's AEAD check stands for it in
//! [`ChunkCache::get_to_decrypt`], so a chunk damaged on local disk (or torn by
//! a crash: fetched chunks are not fsynced) is dropped and fetched again,
//! never served. Chunks written by a session (not yet in any store) are
//! inserted durably: fsynced before the insert returns.
//!
//! The cache is bounded: past `limit_bytes`, least-recently-used chunks are
//! evicted, except chunks *pinned* by a live session (its dirty chunks, which
//! exist nowhere else until uploaded). A removed record is marked dead and its
//! space punched out of the pack; a pack with no live record left is deleted.
//!
//! One process uses a cache directory at a time (an exclusive `flock` on
//! `<dir>/lock`); opening it again in the same process shares the open one.
//! A directory in the old one-file-per-chunk layout (`<dir>/chunks/`) is moved
//! into packs when opened.

pub mod pack;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use bytes::Bytes;
use nix::fcntl::{Flock, FlockArg};

use crate::chunk::{self, ChunkTag};
use crate::error::{Classify, ErrorClass};
use crate::layout;
use crate::store::StoreError;
use crate::store::local::LocalStore;

/// A new pack is started once the active one holds this many bytes.
const PACK_BYTES: u64 = 256 << 20;

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
    /// Another process (an isrfsd) has the cache directory open.
    #[error(
        "chunk cache {} is in use by another process (another isrfsd); stop it or give this one another cache directory",
        dir.display()
    )]
    InUse {
        /// Cache directory.
        dir: PathBuf,
    },
    /// Reading or writing a pack file failed.
    #[error("chunk cache {}: {source}", path.display())]
    Pack {
        /// The pack (or directory) concerned.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Reading or writing a cached chunk failed.
    #[error("chunk cache: {0}")]
    Io(#[from] StoreError),
}

impl Classify for CacheError {
    fn class(&self) -> ErrorClass {
        match self {
            CacheError::InUse { .. } => ErrorClass::Conflict,
            _ => ErrorClass::Other,
        }
    }
}

fn pack_error(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Pack {
        path: path.to_owned(),
        source,
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

/// Where a cached chunk's record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    pack: u64,
    offset: u64,
    len: u32,
    last_use: u64,
}

/// An open pack.
#[derive(Debug)]
struct Pack {
    file: Arc<File>,
    path: PathBuf,
    /// Live records, counting those being appended.
    live: u64,
    /// Whether the packs directory was fsynced since this pack was created
    /// (or it was found at open).
    dir_synced: bool,
}

/// The pack appended to.
#[derive(Debug, Clone, Copy)]
struct Active {
    id: u64,
    end: u64,
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<ChunkTag, Entry>,
    pins: HashMap<ChunkTag, u32>,
    total_bytes: u64,
    clock: u64,
    packs: HashMap<u64, Pack>,
    active: Option<Active>,
    next_pack: u64,
    /// Holes could not be punched (logged once).
    no_holes: bool,
}

/// Disk work decided under the index lock, done outside it.
#[derive(Debug)]
enum Removal {
    /// Mark the record dead and punch it out.
    Kill {
        file: Arc<File>,
        path: PathBuf,
        offset: u64,
        len: u32,
    },
    /// The pack holds nothing live any more: delete it.
    Delete(PathBuf),
}

impl Index {
    /// Drops `tag`'s entry (if it is at `at`, when given) and says what to do
    /// on disk.
    fn remove(&mut self, tag: &ChunkTag, at: Option<(u64, u64)>) -> Option<Removal> {
        let entry = *self.entries.get(tag)?;
        if at.is_some_and(|at| at != (entry.pack, entry.offset)) {
            return None;
        }
        self.entries.remove(tag);
        self.total_bytes -= u64::from(entry.len);
        self.release(entry.pack, entry.offset, entry.len)
    }

    /// One live record of `pack` less.
    fn release(&mut self, id: u64, offset: u64, len: u32) -> Option<Removal> {
        let active = self.active.map(|a| a.id);
        let pack = self.packs.get_mut(&id)?;
        pack.live -= 1;
        if pack.live == 0 && active != Some(id) {
            let pack = self.packs.remove(&id)?;
            return Some(Removal::Delete(pack.path));
        }
        Some(Removal::Kill {
            file: pack.file.clone(),
            path: pack.path.clone(),
            offset,
            len,
        })
    }

    fn touch(&mut self, tag: &ChunkTag) -> Option<Entry> {
        self.clock += 1;
        let now = self.clock;
        let entry = self.entries.get_mut(tag)?;
        entry.last_use = now;
        Some(*entry)
    }
}

/// State shared by every [`ChunkCache`] handle of one directory in this process.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    packs_dir: PathBuf,
    index: Mutex<Index>,
    lock: Mutex<Option<Flock<File>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Release the directory, then let an open waiting for it go on.
        if let Ok(mut lock) = self.lock.lock() {
            lock.take();
        }
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(_, shared)| shared.strong_count() > 0);
        CLOSED.notify_all();
    }
}

/// Cache directories open in this process.
static OPEN: Mutex<Vec<(PathBuf, Weak<Shared>)>> = Mutex::new(Vec::new());
/// Signalled when one of [`OPEN`] is closed.
static CLOSED: Condvar = Condvar::new();

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
    shared: Arc<Shared>,
    limit_bytes: u64,
}

fn tag_of_key(key: &str) -> Option<ChunkTag> {
    ChunkTag::from_hex(key.rsplit('/').next()?)
}

/// A live record found by [`cached_chunks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedChunk {
    /// The chunk.
    pub tag: ChunkTag,
    /// The pack file holding it.
    pub pack: PathBuf,
    /// Where its stored bytes start in the pack.
    pub offset: u64,
    /// How many stored bytes.
    pub len: u64,
}

/// The chunks a cache directory's packs hold, read from disk without opening
/// the cache (no lock taken, nothing changed): for tests and diagnostics
/// while a daemon uses the cache. Records appended or removed meanwhile may
/// or may not be seen.
pub fn cached_chunks(dir: &Path) -> io::Result<Vec<CachedChunk>> {
    let packs = pack::dir(dir);
    if !packs.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (_, path) in pack::list(&packs)? {
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for found in pack::scan(&file)?.live {
            out.push(CachedChunk {
                tag: found.tag,
                pack: path.clone(),
                offset: found.offset + pack::HEADER_LEN as u64,
                len: u64::from(found.len),
            });
        }
    }
    Ok(out)
}

/// fsyncs a directory (so entries created or removed in it are durable).
fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(pack_error(dir))
}

impl ChunkCache {
    /// Opens (creating if needed) the cache in `dir`, indexing what is there.
    /// Fails with [`CacheError::InUse`] when another process has it open; a
    /// second open in this process shares the first one's state.
    pub fn open(dir: &Path, limit_bytes: u64) -> Result<ChunkCache, CacheError> {
        let open_error = |e: io::Error| CacheError::Open {
            dir: dir.to_owned(),
            source: StoreError::Permanent {
                store: dir.display().to_string(),
                key: String::new(),
                source: e.into(),
            },
        };
        crate::private::private_dir(dir).map_err(open_error)?;
        let canonical = dir.canonicalize().map_err(open_error)?;
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((_, shared)) = open.iter().find(|(d, _)| *d == canonical) {
            if let Some(shared) = shared.upgrade() {
                return Ok(ChunkCache {
                    shared,
                    limit_bytes,
                });
            }
            // Being closed: its drop releases the lock, then signals.
            open = CLOSED.wait(open).unwrap_or_else(|e| e.into_inner());
        }
        let shared = Arc::new(Shared::open(dir)?);
        open.push((canonical, Arc::downgrade(&shared)));
        drop(open);
        let cache = ChunkCache {
            shared,
            limit_bytes,
        };
        cache.migrate()?;
        Ok(cache)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.shared.index.lock().expect("cache index lock poisoned")
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
    /// BLAKE3 pass over every chunk a warm read serves. The record's header
    /// is checked (it must name `tag`); a record whose header does not is
    /// dropped and `None` returned.
    pub fn get_to_decrypt(&self, tag: &ChunkTag) -> Result<Option<Bytes>, CacheError> {
        let (entry, file, path) = {
            let mut index = self.lock();
            let Some(entry) = index.touch(tag) else {
                return Ok(None);
            };
            let pack = &index.packs[&entry.pack];
            (entry, pack.file.clone(), pack.path.clone())
        };
        match pack::read(&file, entry.offset, tag, entry.len).map_err(pack_error(&path))? {
            Some(bytes) => Ok(Some(bytes)),
            None => {
                tracing::warn!(chunk = %tag, pack = %path.display(), "cached chunk's record is damaged; dropping it so it is fetched again");
                let removal = self.lock().remove(tag, Some((entry.pack, entry.offset)));
                self.apply(removal)?;
                Ok(None)
            }
        }
    }

    /// Starts reading the cached ones of `tags` from the disk in the
    /// background, for a reader about to read them one after another
    /// (adjacent records are asked for as one range).
    pub fn advise_will_need(&self, tags: impl IntoIterator<Item = ChunkTag>) {
        let mut ranges: Vec<(u64, u64, u64)> = {
            let index = self.lock();
            tags.into_iter()
                .filter_map(|tag| index.entries.get(&tag))
                .map(|e| (e.pack, e.offset, pack::record_len(e.len)))
                .collect()
        };
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64, u64)> = Vec::new();
        for (id, offset, len) in ranges {
            match merged.last_mut() {
                Some((last_id, last_offset, last_len))
                    if *last_id == id && *last_offset + *last_len >= offset =>
                {
                    *last_len = (*last_len).max(offset + len - *last_offset);
                }
                _ => merged.push((id, offset, len)),
            }
        }
        let files: Vec<(Arc<File>, u64, u64)> = {
            let index = self.lock();
            merged
                .into_iter()
                .filter_map(|(id, offset, len)| {
                    Some((index.packs.get(&id)?.file.clone(), offset, len))
                })
                .collect()
        };
        for (file, offset, len) in files {
            pack::will_need(&file, offset, len);
        }
    }

    /// Removes a cached copy found damaged, so the next reader fetches it again.
    pub fn drop_damaged(&self, tag: &ChunkTag) -> Result<(), CacheError> {
        tracing::warn!(chunk = %tag, "cached chunk is damaged; dropping it so it is fetched again");
        let removal = self.lock().remove(tag, None);
        self.apply(removal)
    }

    /// Does on disk what a removal from the index decided.
    fn apply(&self, removal: Option<Removal>) -> Result<(), CacheError> {
        match removal {
            None => Ok(()),
            Some(Removal::Delete(path)) => match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(pack_error(&path)(e)),
            },
            Some(Removal::Kill {
                file,
                path,
                offset,
                len,
            }) => {
                let punched = pack::kill(&file, offset, len).map_err(pack_error(&path))?;
                if !punched {
                    let mut index = self.lock();
                    if !index.no_holes {
                        index.no_holes = true;
                        tracing::warn!(pack = %path.display(), "the cache's file system cannot punch holes: removed chunks keep their space until their pack holds no live chunk");
                    }
                }
                Ok(())
            }
        }
    }

    /// Adds a chunk (which the caller has verified against `tag`), then evicts
    /// down to the limit if needed. A [`Durability::Durable`] chunk is on
    /// stable storage when this returns.
    pub fn insert(
        &self,
        tag: &ChunkTag,
        bytes: &[u8],
        durability: Durability,
    ) -> Result<(), CacheError> {
        self.insert_all(&[(*tag, bytes)], durability)
    }

    /// Adds chunks like [`ChunkCache::insert`], with one sync per pack they
    /// are in instead of one per chunk (a seal of many chunks at once).
    pub fn insert_all(
        &self,
        chunks: &[(ChunkTag, &[u8])],
        durability: Durability,
    ) -> Result<(), CacheError> {
        for (tag, bytes) in chunks {
            self.append(tag, bytes)?;
        }
        if durability == Durability::Durable {
            let packs: BTreeMap<u64, (Arc<File>, PathBuf, bool)> = {
                let index = self.lock();
                chunks
                    .iter()
                    .filter_map(|(tag, _)| index.entries.get(tag))
                    .map(|entry| {
                        let pack = &index.packs[&entry.pack];
                        (
                            entry.pack,
                            (pack.file.clone(), pack.path.clone(), pack.dir_synced),
                        )
                    })
                    .collect()
            };
            for (id, (file, path, dir_synced)) in packs {
                self.sync_pack(id, &file, &path, dir_synced)?;
            }
        }
        self.evict_to_limit()?;
        Ok(())
    }

    /// Appends a record for `tag` to the active pack (unless cached already:
    /// then it only counts as used) and indexes it, without a sync.
    fn append(&self, tag: &ChunkTag, bytes: &[u8]) -> Result<(), CacheError> {
        let len = u32::try_from(bytes.len()).expect("a chunk is smaller than 4 GiB");
        let record_len = pack::record_len(len);
        let (id, offset, file, path) = {
            let mut index = self.lock();
            if index.touch(tag).is_some() {
                return Ok(());
            }
            let (id, offset) = self.reserve(&mut index, record_len)?;
            let pack = &index.packs[&id];
            (id, offset, pack.file.clone(), pack.path.clone())
        };
        let written = file
            .write_all_at(&pack::encode_record(tag, bytes), offset)
            .map_err(pack_error(&path));
        let mut index = self.lock();
        if let Err(e) = written {
            let removal = index.release(id, offset, len);
            drop(index);
            let _ = self.apply(removal);
            return Err(e);
        }
        if index.entries.contains_key(tag) {
            // A concurrent insert of the same chunk won: this copy is dead.
            let removal = index.release(id, offset, len);
            drop(index);
            return self.apply(removal);
        }
        index.clock += 1;
        let last_use = index.clock;
        index.entries.insert(
            *tag,
            Entry {
                pack: id,
                offset,
                len,
                last_use,
            },
        );
        index.total_bytes += u64::from(len);
        Ok(())
    }

    /// Room for a record of `record_len` bytes at the end of the active pack
    /// (a new pack when there is none or it is full), counted as live.
    fn reserve(&self, index: &mut Index, record_len: u64) -> Result<(u64, u64), CacheError> {
        let full = index
            .active
            .is_none_or(|a| a.end > 0 && a.end + record_len > PACK_BYTES);
        if full {
            if let Some(old) = index.active.take() {
                if index.packs.get(&old.id).is_some_and(|p| p.live == 0) {
                    if let Some(pack) = index.packs.remove(&old.id) {
                        let _ = std::fs::remove_file(&pack.path);
                    }
                }
            }
            let id = index.next_pack;
            index.next_pack += 1;
            let path = self.shared.packs_dir.join(pack::file_name(id));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(pack_error(&path))?;
            index.packs.insert(
                id,
                Pack {
                    file: Arc::new(file),
                    path,
                    live: 0,
                    dir_synced: false,
                },
            );
            index.active = Some(Active { id, end: 0 });
        }
        let active = index.active.as_mut().expect("an active pack");
        let (id, offset) = (active.id, active.end);
        active.end += record_len;
        index.packs.get_mut(&id).expect("the active pack").live += 1;
        Ok((id, offset))
    }

    /// Makes what was written to a pack durable, with the pack's directory
    /// entry if this pack's was not synced yet.
    fn sync_pack(
        &self,
        id: u64,
        file: &File,
        path: &Path,
        dir_synced: bool,
    ) -> Result<(), CacheError> {
        file.sync_data().map_err(pack_error(path))?;
        if !dir_synced {
            sync_dir(&self.shared.packs_dir)?;
            if let Some(pack) = self.lock().packs.get_mut(&id) {
                pack.dir_synced = true;
            }
        }
        Ok(())
    }

    /// Moves a cache in the old layout (one file per chunk under
    /// `<dir>/chunks/`) into packs: every chunk is appended, the packs are
    /// synced, and only then are the old files deleted. A crash in between
    /// leaves both; the next open skips chunks the packs hold.
    fn migrate(&self) -> Result<(), CacheError> {
        let dir = &self.shared.dir;
        let old = dir.join(layout::CHUNKS);
        if !old.exists() {
            return Ok(());
        }
        let store = LocalStore::new(dir);
        let keys = store.list_blocking(layout::CHUNKS)?;
        tracing::info!(chunks = keys.len(), cache = %dir.display(), "moving the chunk cache into pack files");
        for key in keys {
            let Some(tag) = tag_of_key(&key) else {
                continue;
            };
            if self.contains(&tag) {
                continue;
            }
            let bytes = match store.get_blocking(&key) {
                Ok(bytes) => bytes,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            };
            self.append(&tag, &bytes)?;
        }
        let packs: Vec<(u64, Arc<File>, PathBuf)> = self
            .lock()
            .packs
            .iter()
            .map(|(id, p)| (*id, p.file.clone(), p.path.clone()))
            .collect();
        for (id, file, path) in packs {
            self.sync_pack(id, &file, &path, false)?;
        }
        std::fs::remove_dir_all(&old).map_err(pack_error(&old))?;
        sync_dir(dir)
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
        let removals: Vec<Option<Removal>> = {
            let mut index = self.lock();
            let victims: Vec<ChunkTag> = tags
                .into_iter()
                .filter(|tag| index.entries.contains_key(tag) && !index.pins.contains_key(tag))
                .copied()
                .collect();
            victims.iter().map(|tag| index.remove(tag, None)).collect()
        };
        let removed = removals.len() as u64;
        self.apply_all(removals)?;
        Ok(removed)
    }

    fn apply_all(&self, removals: Vec<Option<Removal>>) -> Result<(), CacheError> {
        let mut first_error = None;
        for removal in removals {
            if let Err(e) = self.apply(removal) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Evicts least-recently-used unpinned chunks until the cache fits its
    /// limit; returns how many were removed.
    pub fn evict_to_limit(&self) -> Result<u64, CacheError> {
        let removals: Vec<Option<Removal>> = {
            let mut index = self.lock();
            if index.total_bytes <= self.limit_bytes {
                return Ok(0);
            }
            let mut candidates: Vec<(u64, ChunkTag, u64)> = index
                .entries
                .iter()
                .filter(|(tag, _)| !index.pins.contains_key(tag))
                .map(|(tag, entry)| (entry.last_use, *tag, u64::from(entry.len)))
                .collect();
            candidates.sort_unstable_by_key(|(last_use, _, _)| *last_use);
            let mut excess = index.total_bytes - self.limit_bytes;
            let mut victims = Vec::new();
            for (_, tag, size) in candidates {
                if excess == 0 {
                    break;
                }
                victims.push(tag);
                excess = excess.saturating_sub(size);
            }
            victims.iter().map(|tag| index.remove(tag, None)).collect()
        };
        let removed = removals.len() as u64;
        self.apply_all(removals)?;
        Ok(removed)
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

impl Shared {
    /// Locks `dir` for this process and indexes its packs.
    fn open(dir: &Path) -> Result<Shared, CacheError> {
        let lock_path = dir.join("lock");
        let lock_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(pack_error(&lock_path))?;
        let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(CacheError::InUse {
                    dir: dir.to_owned(),
                });
            }
            Err((_, errno)) => return Err(pack_error(&lock_path)(errno.into())),
        };
        let packs_dir = pack::dir(dir);
        if !packs_dir.exists() {
            crate::private::private_dir(&packs_dir).map_err(pack_error(&packs_dir))?;
            sync_dir(dir)?;
        }
        let mut index = Index::default();
        for (id, path) in pack::list(&packs_dir).map_err(pack_error(&packs_dir))? {
            index.next_pack = index.next_pack.max(id + 1);
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(pack_error(&path))?;
            let scan = pack::scan(&file).map_err(pack_error(&path))?;
            let mut live = 0;
            let mut duplicates = Vec::new();
            for found in scan.live {
                if index.entries.contains_key(&found.tag) {
                    duplicates.push(found);
                    continue;
                }
                index.entries.insert(
                    found.tag,
                    Entry {
                        pack: id,
                        offset: found.offset,
                        len: found.len,
                        last_use: 0,
                    },
                );
                index.total_bytes += u64::from(found.len);
                live += 1;
            }
            for found in duplicates {
                // A copy appended twice (a crash during a move into packs):
                // keep the first.
                pack::kill(&file, found.offset, found.len).map_err(pack_error(&path))?;
            }
            if live == 0 {
                std::fs::remove_file(&path).map_err(pack_error(&path))?;
                continue;
            }
            index.packs.insert(
                id,
                Pack {
                    file: Arc::new(file),
                    path,
                    live,
                    dir_synced: true,
                },
            );
        }
        Ok(Shared {
            dir: dir.to_owned(),
            packs_dir,
            index: Mutex::new(index),
            lock: Mutex::new(Some(lock)),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn chunk(seed: u8, len: usize) -> (ChunkTag, Vec<u8>) {
        let data = vec![seed; len];
        (ChunkTag::of(&data), data)
    }

    /// Incompressible bytes, so a pack's allocated blocks follow its records.
    fn random_chunk(seed: u64, len: usize) -> (ChunkTag, Vec<u8>) {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        (ChunkTag::of(&data), data)
    }

    fn packs(dir: &Path) -> Vec<PathBuf> {
        pack::list(&pack::dir(dir))
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    fn flip_byte(path: &Path, offset: u64) {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, offset).unwrap();
        byte[0] ^= 0x40;
        file.write_all_at(&byte, offset).unwrap();
    }

    fn located(dir: &Path, tag: &ChunkTag) -> CachedChunk {
        cached_chunks(dir)
            .unwrap()
            .into_iter()
            .find(|c| c.tag == *tag)
            .expect("chunk in a pack")
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
        let (other, other_data) = chunk(2, 5000);
        cache
            .insert(&other, &other_data, Durability::Durable)
            .unwrap();
        assert_eq!(packs(dir.path()).len(), 1, "one pack, appended to");
        let on_disk = cached_chunks(dir.path()).unwrap();
        assert_eq!(on_disk.len(), 2);
        assert_eq!(on_disk[0].offset, pack::HEADER_LEN as u64);
        assert_eq!(
            on_disk[1].offset,
            4096 + pack::HEADER_LEN as u64,
            "records in insertion order"
        );
        drop(cache);
        let reopened = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(reopened.stats().chunks, 2);
        assert_eq!(reopened.stats().bytes, 6000);
        assert_eq!(reopened.get(&tag).unwrap().unwrap(), data);
        assert_eq!(
            reopened.get_to_decrypt(&other).unwrap().unwrap(),
            other_data
        );
    }

    #[test]
    fn damaged_chunks_are_dropped_not_served_and_can_be_cached_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let (tag, data) = chunk(2, 100);
        let (kept, kept_data) = chunk(3, 100);
        cache.insert(&tag, &data, Durability::Refetchable).unwrap();
        cache
            .insert(&kept, &kept_data, Durability::Refetchable)
            .unwrap();
        let record = located(dir.path(), &tag);
        flip_byte(&record.pack, record.offset + 50);
        // get_to_decrypt serves it (its caller's AEAD check finds the damage);
        // get checks the tag.
        assert!(cache.get_to_decrypt(&tag).unwrap().is_some());
        assert!(cache.get(&tag).unwrap().is_none());
        assert!(!cache.contains(&tag));
        assert!(
            cached_chunks(dir.path())
                .unwrap()
                .iter()
                .all(|c| c.tag != tag),
            "marked dead on disk"
        );
        cache.insert(&tag, &data, Durability::Refetchable).unwrap();
        assert_eq!(cache.get(&tag).unwrap().unwrap(), data, "fetched again");

        // A damaged header: not served even without the tag check.
        let record = located(dir.path(), &kept);
        flip_byte(&record.pack, record.offset - 40);
        assert!(cache.get_to_decrypt(&kept).unwrap().is_none());
        assert!(!cache.contains(&kept));
        drop(cache);
        let reopened = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(reopened.stats().chunks, 1);
        assert_eq!(reopened.get(&tag).unwrap().unwrap(), data);
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
        let on_disk: Vec<ChunkTag> = cached_chunks(dir.path())
            .unwrap()
            .iter()
            .map(|c| c.tag)
            .collect();
        assert_eq!(
            on_disk,
            vec![chunks[1].0, tag],
            "removed records are dead on disk"
        );
    }

    #[test]
    fn removed_records_give_their_space_back() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        let chunks: Vec<_> = (0..16).map(|i| random_chunk(i, 128 << 10)).collect();
        for (tag, data) in &chunks {
            cache.insert(tag, data, Durability::Durable).unwrap();
        }
        let pack = &packs(dir.path())[0];
        let before = std::fs::metadata(pack).unwrap().blocks() * 512;
        assert!(before >= 16 * (128 << 10), "{before} bytes allocated");
        let gone: Vec<&ChunkTag> = chunks[..12].iter().map(|(t, _)| t).collect();
        assert_eq!(cache.remove_unpinned(gone).unwrap(), 12);
        let after = std::fs::metadata(pack).unwrap().blocks() * 512;
        assert!(
            after <= before - 12 * (120 << 10),
            "holes punched: {before} bytes allocated before, {after} after"
        );
        for (tag, data) in &chunks[12..] {
            assert_eq!(cache.get(tag).unwrap().unwrap(), *data);
        }
        drop(cache);
        let reopened = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(reopened.stats().chunks, 4, "dead records stay dead");
        for (tag, data) in &chunks[12..] {
            assert_eq!(reopened.get(tag).unwrap().unwrap(), *data);
        }
    }

    #[test]
    fn a_pack_with_nothing_live_is_deleted_unless_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let (old, old_data) = chunk(1, 1000);
        let (new, new_data) = chunk(2, 1000);
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        cache
            .insert(&old, &old_data, Durability::Refetchable)
            .unwrap();
        drop(cache);
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        cache
            .insert(&new, &new_data, Durability::Refetchable)
            .unwrap();
        let [first, second] = <[PathBuf; 2]>::try_from(packs(dir.path())).unwrap();
        cache.remove_unpinned([&old]).unwrap();
        assert!(!first.exists(), "the old pack held nothing live any more");
        cache.remove_unpinned([&new]).unwrap();
        assert!(second.exists(), "the active pack stays");
        drop(cache);
        ChunkCache::open(dir.path(), 1 << 20).unwrap();
        assert!(
            packs(dir.path()).is_empty(),
            "an empty pack is deleted at open"
        );
    }

    #[test]
    fn a_torn_tail_is_ignored_and_damage_mid_pack_loses_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        let chunks: Vec<_> = (0..4).map(|i| random_chunk(i, 10_000)).collect();
        for (tag, data) in &chunks {
            cache.insert(tag, data, Durability::Refetchable).unwrap();
        }
        drop(cache);
        let pack = packs(dir.path()).remove(0);
        // A crash mid-append of the last record, and a damaged header.
        let last = located(dir.path(), &chunks[3].0);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&pack)
            .unwrap()
            .set_len(last.offset + 5000)
            .unwrap();
        flip_byte(&pack, located(dir.path(), &chunks[1].0).offset - 30);
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(cache.stats().chunks, 2);
        for i in [0, 2] {
            assert_eq!(cache.get(&chunks[i].0).unwrap().unwrap(), chunks[i].1);
        }
        assert!(!cache.contains(&chunks[1].0) && !cache.contains(&chunks[3].0));
        cache
            .insert(&chunks[3].0, &chunks[3].1, Durability::Durable)
            .unwrap();
        drop(cache);
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(cache.get(&chunks[3].0).unwrap().unwrap(), chunks[3].1);
    }

    const CHILD_DIR: &str = "ISR_CACHE_TEST_CHILD_DIR";

    #[test]
    fn durable_inserts_survive_a_kill() {
        use std::io::BufRead;
        let (tag, data) = random_chunk(7, 100_000);
        if let Ok(dir) = std::env::var(CHILD_DIR) {
            // The child: insert, say so, wait to be killed.
            let cache = ChunkCache::open(Path::new(&dir), 1 << 30).unwrap();
            cache.insert(&tag, &data, Durability::Durable).unwrap();
            println!("inserted");
            loop {
                std::thread::park();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cache::tests::durable_inserts_survive_a_kill",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut said = false;
        for line in stdout.lines() {
            // libtest prints "test NAME ... " before the child's line.
            if line.unwrap().ends_with("inserted") {
                said = true;
                break;
            }
        }
        assert!(said, "the child inserted");
        let error = ChunkCache::open(dir.path(), 1 << 30).unwrap_err();
        assert!(matches!(error, CacheError::InUse { .. }), "{error}");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(cache.get(&tag).unwrap().unwrap(), data);
    }

    #[test]
    fn a_cache_used_by_another_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let held = Flock::lock(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.path().join("lock"))
                .unwrap(),
            FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        let error = ChunkCache::open(dir.path(), 1 << 20).unwrap_err();
        assert_eq!(error.class(), ErrorClass::Conflict);
        assert!(
            error
                .to_string()
                .contains(&dir.path().display().to_string()),
            "{error}"
        );
        assert!(error.to_string().contains("another isrfsd"), "{error}");
        drop(held);
        // In one process, opens share the cache.
        let (tag, data) = chunk(1, 10);
        let first = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let second = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        first.insert(&tag, &data, Durability::Refetchable).unwrap();
        assert!(second.contains(&tag));
    }

    #[test]
    fn the_one_file_per_chunk_layout_is_moved_into_packs() {
        let dir = tempfile::tempdir().unwrap();
        let old = LocalStore::new(dir.path());
        let chunks: Vec<_> = (0..5).map(|i| random_chunk(i, 50_000)).collect();
        for (tag, data) in &chunks {
            old.put_new_blocking(&layout::chunk(tag), data, true)
                .unwrap();
        }
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        assert!(!dir.path().join("chunks").exists());
        assert_eq!(cache.stats().chunks, 5);
        for (tag, data) in &chunks {
            assert_eq!(cache.get(tag).unwrap().unwrap(), *data);
        }
        drop(cache);
        // A crash after the packs were synced but before the old files were
        // deleted: the next open keeps one copy of each.
        old.put_new_blocking(&layout::chunk(&chunks[0].0), &chunks[0].1, true)
            .unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        assert!(!dir.path().join("chunks").exists());
        assert_eq!(cache.stats().chunks, 5);
        assert_eq!(cached_chunks(dir.path()).unwrap().len(), 5);
    }

    #[test]
    fn a_chunk_found_in_two_packs_is_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        let (tag, data) = chunk(4, 3000);
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        cache.insert(&tag, &data, Durability::Durable).unwrap();
        drop(cache);
        let first = packs(dir.path()).remove(0);
        std::fs::copy(&first, pack::dir(dir.path()).join(pack::file_name(9))).unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(cache.stats().chunks, 1);
        assert_eq!(cache.stats().bytes, 3000);
        assert_eq!(
            packs(dir.path()),
            vec![first],
            "the duplicate's pack held nothing else"
        );
        assert_eq!(cache.get(&tag).unwrap().unwrap(), data);
    }
}
