//! The base version of an open parcel: its tree and chunk lists, with a
//! format-2 version's segments loaded when they are needed.
//!
//! A session mounts once it has the root (the tree, sizes and segment
//! references): [`BaseManifest::chunk`] fetches the one segment a read
//! needs at [`Priority::Demand`] (from the cache, or the store through the
//! session's fetcher, which caches it), and [`BaseManifest::load`] fetches
//! the rest in the background at the priority of the file each serves. A
//! format-1 version arrives whole and is loaded from the start.
//!
//! Invariants: a segment is decoded once and never changes; segments with
//! the same tag (equal plaintext, e.g. runs of zero chunks) are held once;
//! every decoded segment was checked like a chunk (tag, AEAD, convergent key)
//! and holds exactly the chunks its place in the file says. Everything that
//! needs every chunk of the base (a commit, hoard, the prefetch sweep)
//! awaits [`BaseManifest::load`] first; what only reports (status, chunk
//! maps) works from what is loaded.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::OnceCell;

use crate::chunk::{self, ChunkRef, ChunkTag};
use crate::error::{Classify, ErrorClass};
use crate::fetch::{FetchError, Fetcher, Priority};
use crate::keys::DedupSecret;
use crate::manifest::tree::{Root, decode_segment};
use crate::manifest::{EntryKind, Manifest, ManifestError, Stored};

/// Segments fetched at once by [`BaseManifest::load`] (the fetcher orders
/// them by priority among everything else it is asked for).
const LOADS_IN_FLIGHT: usize = 32;

/// Why part of the base version could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// A segment could not be fetched or failed its checks.
    #[error("the base version's manifest segment: {0}")]
    Fetch(#[from] FetchError),
    /// A segment's contents do not fit its place.
    #[error(transparent)]
    Malformed(#[from] ManifestError),
}

impl Classify for BaseError {
    fn class(&self) -> ErrorClass {
        match self {
            BaseError::Fetch(e) => e.class(),
            BaseError::Malformed(e) => e.class(),
        }
    }
}

/// One distinct segment.
#[derive(Debug)]
struct Segment {
    /// Where it is stored (`Zero` for a format-1 file's preloaded list).
    reference: ChunkRef,
    /// Chunks it holds.
    chunks: u64,
    /// Its chunks once loaded (concurrent loads wait for the first).
    decoded: OnceCell<Box<[ChunkRef]>>,
}

/// Fetches and decodes segments (format 2 only).
#[derive(Debug)]
struct Loader {
    secret: DedupSecret,
    fetcher: Fetcher,
    /// The root's object name, for errors.
    object: String,
}

/// The base version (see the module doc).
#[derive(Debug)]
pub struct BaseManifest {
    /// Header and tree; files have their size and an empty chunk list.
    header: Manifest,
    /// Chunks per segment (`u64::MAX` for format 1: one per file).
    segment_chunks: u64,
    /// Per file, in [`Manifest::files`] order, its segments (indices into `segments`).
    files: Vec<Vec<usize>>,
    segments: Vec<Segment>,
    loader: Option<Loader>,
    loaded: AtomicUsize,
}

impl BaseManifest {
    /// A base read from the store: a format-2 root, whose segments `fetcher`
    /// fetches on demand (decoded under `secret`), or a whole format-1
    /// manifest. `object` names the manifest in errors.
    pub fn open(
        stored: Stored,
        secret: DedupSecret,
        fetcher: Fetcher,
        object: &str,
    ) -> Result<BaseManifest, ManifestError> {
        match stored {
            Stored::Whole(manifest) => Ok(BaseManifest::whole(manifest)),
            Stored::Tree(root) => BaseManifest::tree(root, secret, fetcher, object),
        }
    }

    /// A base whose chunk lists are all here.
    pub fn whole(mut manifest: Manifest) -> BaseManifest {
        let mut segments = Vec::new();
        let mut files = Vec::new();
        for entry in &mut manifest.entries {
            if let EntryKind::File { chunks, .. } = &mut entry.kind {
                let chunks = std::mem::take(chunks).into_boxed_slice();
                files.push(vec![segments.len()]);
                segments.push(Segment {
                    reference: ChunkRef::Zero,
                    chunks: chunks.len() as u64,
                    decoded: OnceCell::new_with(Some(chunks)),
                });
            }
        }
        let loaded = AtomicUsize::new(segments.len());
        BaseManifest {
            header: manifest,
            segment_chunks: u64::MAX,
            files,
            segments,
            loader: None,
            loaded,
        }
    }

    fn tree(
        root: Root,
        secret: DedupSecret,
        fetcher: Fetcher,
        object: &str,
    ) -> Result<BaseManifest, ManifestError> {
        let chunk_size = u64::from(root.manifest.chunk_size);
        let mut by_tag: HashMap<ChunkTag, usize> = HashMap::new();
        let mut segments: Vec<Segment> = Vec::new();
        let mut files = Vec::new();
        for ((_, size, _), refs) in root.manifest.files().zip(&root.segments) {
            let count = size.div_ceil(chunk_size);
            let mut indices = Vec::with_capacity(refs.len());
            for (index, reference) in refs.iter().enumerate() {
                let tag = reference.tag().expect("segments are stored chunks");
                let chunks = root.chunks_in_segment(count, index);
                let at = *by_tag.entry(tag).or_insert_with(|| {
                    segments.push(Segment {
                        reference: reference.clone(),
                        chunks,
                        decoded: OnceCell::new(),
                    });
                    segments.len() - 1
                });
                // Equal tags are equal plaintexts, which state their chunk count.
                if segments[at].chunks != chunks {
                    return Err(ManifestError::Malformed {
                        object: object.to_owned(),
                        reason: format!(
                            "segment {tag} stands for {} and for {chunks} chunks",
                            segments[at].chunks
                        ),
                    });
                }
                indices.push(at);
            }
            files.push(indices);
        }
        fetcher.count_as_manifest(by_tag.keys().copied());
        Ok(BaseManifest {
            header: root.manifest,
            segment_chunks: u64::from(root.segment_chunks),
            files,
            segments,
            loader: Some(Loader {
                secret,
                fetcher,
                object: object.to_owned(),
            }),
            loaded: AtomicUsize::new(0),
        })
    }

    /// Header and tree (files with their size; chunk lists are not here).
    pub fn header(&self) -> &Manifest {
        &self.header
    }

    /// Files as (path, size, file index), in path order.
    pub fn files(&self) -> impl Iterator<Item = (&str, u64, usize)> {
        self.header
            .files()
            .enumerate()
            .map(|(file, (path, size, _))| (path, size, file))
    }

    /// The tags of the stored segments (empty for format 1).
    pub fn segment_tags(&self) -> HashSet<ChunkTag> {
        self.segments
            .iter()
            .filter_map(|s| s.reference.tag())
            .collect()
    }

    /// (segments loaded, segments in all), distinct ones; (0, 0) for format 1.
    pub fn segments_loaded(&self) -> (u64, u64) {
        if self.loader.is_none() {
            return (0, 0);
        }
        (
            self.loaded.load(Ordering::Relaxed) as u64,
            self.segments.len() as u64,
        )
    }

    /// Whether every chunk list is here.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Relaxed) == self.segments.len()
    }

    /// The segment holding chunk `index` of file `file`, and the chunk's place in it.
    fn locate(&self, file: usize, index: u64) -> Option<(&Segment, usize)> {
        let segment = *self.files[file].get((index / self.segment_chunks) as usize)?;
        let within = (index % self.segment_chunks) as usize;
        Some((&self.segments[segment], within))
    }

    /// Chunk `index` of file `file` if its segment is loaded (`Zero` past
    /// the file's end).
    pub fn loaded_chunk(&self, file: usize, index: u64) -> Option<&ChunkRef> {
        match self.locate(file, index) {
            Some((segment, within)) if (within as u64) < segment.chunks => {
                segment.decoded.get()?.get(within)
            }
            _ => Some(&ChunkRef::Zero),
        }
    }

    /// Chunk `index` of file `file`, fetching its segment first if needed (a
    /// reader waits for it). For threads outside the async runtime.
    pub fn chunk(&self, file: usize, index: u64) -> Result<ChunkRef, BaseError> {
        if let Some(chunk) = self.loaded_chunk(file, index) {
            return Ok(chunk.clone());
        }
        let (segment, within) = self.locate(file, index).expect("located above");
        let loader = self
            .loader
            .as_ref()
            .expect("unloaded segments have a loader");
        let &ChunkRef::Stored { tag, ref key, .. } = &segment.reference else {
            unreachable!("unloaded segments are stored");
        };
        let plaintext =
            loader
                .fetcher
                .plaintext_blocking(tag, key, &loader.secret, Priority::Demand)?;
        let chunks = self.decode(segment, &plaintext)?;
        let chunk = chunks.get(within).cloned().unwrap_or(ChunkRef::Zero);
        // (A load that got there first keeps its equal copy.)
        if segment.decoded.set(chunks).is_ok() {
            self.loaded.fetch_add(1, Ordering::Relaxed);
        }
        Ok(chunk)
    }

    /// Loads the segments not loaded yet of the files that `priority`
    /// gives a priority (by path), each at the most urgent one among the
    /// files it serves; waits for loads already under way.
    pub async fn load(&self, priority: impl Fn(&str) -> Option<Priority>) -> Result<(), BaseError> {
        let Some(loader) = &self.loader else {
            return Ok(());
        };
        let mut wanted: HashMap<usize, Priority> = HashMap::new();
        for (path, _, file) in self.files() {
            let Some(urgency) = priority(path) else {
                continue;
            };
            for &segment in &self.files[file] {
                if self.segments[segment].decoded.get().is_none() {
                    let entry = wanted.entry(segment).or_insert(urgency);
                    *entry = (*entry).min(urgency);
                }
            }
        }
        let mut wanted: Vec<(usize, Priority)> = wanted.into_iter().collect();
        wanted.sort_by_key(|&(segment, urgency)| (urgency, segment));
        let mut loads = futures::stream::iter(wanted)
            .map(|(segment, urgency)| async move {
                let segment = &self.segments[segment];
                let &ChunkRef::Stored { tag, ref key, .. } = &segment.reference else {
                    unreachable!("unloaded segments are stored");
                };
                segment
                    .decoded
                    .get_or_try_init(|| async {
                        let stored = loader.fetcher.fetch(tag, urgency).await?;
                        let plaintext = chunk::decode_verified(&loader.secret, tag, key, stored)
                            .map_err(|e| FetchError::Corrupt(std::sync::Arc::new(e)))?;
                        let chunks = self.decode(segment, &plaintext)?;
                        self.loaded.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, BaseError>(chunks)
                    })
                    .await
                    .map(drop)
            })
            .buffer_unordered(LOADS_IN_FLIGHT);
        // One segment that fails does not stop the others.
        let mut first_error = None;
        while let Some(result) = loads.next().await {
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Decodes `segment`'s verified plaintext.
    fn decode(&self, segment: &Segment, plaintext: &Bytes) -> Result<Box<[ChunkRef]>, BaseError> {
        let object = &self.loader.as_ref().expect("segments have a loader").object;
        Ok(decode_segment(plaintext, segment.chunks, object)?.into_boxed_slice())
    }

    /// The loaded chunks of file `file` with their indices (every chunk once
    /// [`BaseManifest::load`] has finished).
    pub fn file_chunks(&self, file: usize) -> impl Iterator<Item = (u64, &ChunkRef)> {
        let segment_chunks = self.segment_chunks;
        self.files[file]
            .iter()
            .enumerate()
            .filter_map(move |(at, &segment)| {
                let chunks = self.segments[segment].decoded.get()?;
                let first = (at as u64).saturating_mul(segment_chunks);
                Some(
                    chunks
                        .iter()
                        .enumerate()
                        .map(move |(i, chunk)| (first + i as u64, chunk)),
                )
            })
            .flatten()
    }

    /// Every loaded stored chunk with its stored length, in file order,
    /// repeats included.
    pub fn stored_chunks(&self) -> impl Iterator<Item = (ChunkTag, u64)> + '_ {
        (0..self.files.len()).flat_map(move |file| {
            self.file_chunks(file)
                .filter_map(|(_, chunk)| chunk.stored())
        })
    }

    /// Whether `manifest` has this base's tree and chunk lists (as far as
    /// they are loaded: load first for the whole answer).
    pub fn same_files(&self, manifest: &Manifest) -> bool {
        if self.header.entries.len() != manifest.entries.len() {
            return false;
        }
        let mut file = 0;
        for (mine, theirs) in self.header.entries.iter().zip(&manifest.entries) {
            if (&mine.path, mine.mode, mine.mtime) != (&theirs.path, theirs.mode, theirs.mtime) {
                return false;
            }
            match (&mine.kind, &theirs.kind) {
                (EntryKind::Directory, EntryKind::Directory) => {}
                (
                    EntryKind::File { size, .. },
                    EntryKind::File {
                        size: other,
                        chunks,
                    },
                ) => {
                    let loaded = self.file_chunks(file).map(|(_, chunk)| chunk);
                    if size != other || !loaded.eq(chunks.iter()) {
                        return false;
                    }
                    file += 1;
                }
                _ => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cache::ChunkCache;
    use crate::chunk::{ChunkEncoder, ChunkKey};
    use crate::fetch::FetchSettings;
    use crate::layout;
    use crate::manifest::tree::{self, Split};
    use crate::manifest::{Entry, Timestamp};
    use crate::store::WriteStore;
    use crate::store::memory::MemoryStore;

    const SEGMENT: u32 = 4;

    /// `a.img` with 10 distinct chunks (3 segments of 4), `b.img` with a's
    /// first 4 (its one segment is a's first).
    fn manifest() -> Manifest {
        let stored = |n: u8| ChunkRef::Stored {
            tag: ChunkTag([n; 32]),
            key: ChunkKey::from_bytes([n; 32]),
            stored_len: 1000 + u32::from(n),
        };
        let file = |path: &str, chunks: Vec<ChunkRef>| Entry {
            path: path.into(),
            mode: 0o600,
            mtime: Timestamp::default(),
            kind: EntryKind::File {
                size: chunks.len() as u64 * 65536,
                chunks,
            },
        };
        let a: Vec<ChunkRef> = (1..=10).map(stored).collect();
        Manifest {
            version: 1,
            parent: None,
            created: Timestamp::default(),
            lock_nonce: None,
            host: "h".into(),
            message: String::new(),
            chunk_size: 65536,
            entries: vec![file("a.img", a.clone()), file("b.img", a[..4].to_vec())],
        }
    }

    struct Setup {
        manifest: Manifest,
        split: Split,
        secret: DedupSecret,
        store: MemoryStore,
        fetcher: Fetcher,
        _dir: tempfile::TempDir,
    }

    /// The split manifest with its segments in a store, but for `leave_out`.
    async fn setup(leave_out: &[usize]) -> Setup {
        let secret = DedupSecret::from_bytes([9; 32]);
        let mut encoder = ChunkEncoder::new(secret.clone(), 3).unwrap();
        let manifest = manifest();
        let split = tree::split(&manifest, SEGMENT, &mut encoder).unwrap();
        let store = MemoryStore::new();
        for (i, (reference, bytes)) in split.encoded.iter().enumerate() {
            if !leave_out.contains(&i) {
                let key = layout::chunk(&reference.tag().unwrap());
                store
                    .put_new(&key, Bytes::from(bytes.clone()))
                    .await
                    .unwrap();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(dir.path(), 1 << 30).unwrap());
        let fetcher = Fetcher::start(
            Arc::new(store.clone()),
            cache,
            crate::fetch::tests::quick(),
            tokio::runtime::Handle::current(),
        );
        Setup {
            manifest,
            split,
            secret,
            store,
            fetcher,
            _dir: dir,
        }
    }

    fn open(s: &Setup) -> Arc<BaseManifest> {
        let stored = Stored::Tree(s.split.root.clone());
        Arc::new(BaseManifest::open(stored, s.secret.clone(), s.fetcher.clone(), "m").unwrap())
    }

    fn chunks_of(manifest: &Manifest, file: usize) -> Vec<ChunkRef> {
        manifest.files().nth(file).unwrap().2.to_vec()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_loads_only_its_segment_and_load_brings_the_rest() {
        let s = setup(&[]).await;
        let base = open(&s);
        assert_eq!(base.segments_loaded(), (0, 3), "equal segments held once");
        assert_eq!(s.fetcher.stats().manifest_segments, 0, "nothing at open");

        let a = chunks_of(&s.manifest, 0);
        let reader = base.clone();
        let chunk = tokio::task::spawn_blocking(move || reader.chunk(0, 5))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(chunk, a[5]);
        let stats = s.fetcher.stats();
        assert_eq!(
            (stats.manifest_segments, stats.fetched_chunks),
            (1, 0),
            "one segment, counted apart from file chunks"
        );
        assert_eq!(base.loaded_chunk(0, 4), Some(&a[4]), "the same segment");
        assert_eq!(base.loaded_chunk(0, 0), None, "another segment");
        assert_eq!(
            base.loaded_chunk(0, 10),
            Some(&ChunkRef::Zero),
            "past the end"
        );

        // Only b's segment (a's first).
        base.load(|path| (path == "b.img").then_some(Priority::Prefetch))
            .await
            .unwrap();
        assert_eq!(base.segments_loaded(), (2, 3));
        assert_eq!(base.loaded_chunk(0, 0), Some(&a[0]));
        assert!(!base.is_loaded());

        base.load(|_| Some(Priority::Prefetch)).await.unwrap();
        assert!(base.is_loaded());
        assert_eq!(s.fetcher.stats().manifest_segments, 3, "each segment once");
        assert_eq!(
            base.stored_chunks().collect::<Vec<_>>(),
            s.manifest.stored_chunks().collect::<Vec<_>>()
        );
        assert!(base.same_files(&s.manifest));
        let mut changed = s.manifest.clone();
        let EntryKind::File { chunks, .. } = &mut changed.entries[1].kind else {
            panic!()
        };
        chunks[3] = ChunkRef::Zero;
        assert!(!base.same_files(&changed));
        assert_eq!(base.segment_tags().len(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_segment_fails_its_reads_and_the_load_but_not_the_others() {
        // Segment 1 of a.img (chunks 4..8) is not in the store.
        let s = setup(&[1]).await;
        let base = open(&s);
        let error = base
            .load(|_| Some(Priority::Prefetch))
            .await
            .expect_err("a segment is missing");
        assert!(
            matches!(error, BaseError::Fetch(FetchError::Missing { .. })),
            "{error}"
        );
        assert_eq!(base.segments_loaded(), (2, 3), "the others loaded");
        let reader = base.clone();
        let (missing, present) =
            tokio::task::spawn_blocking(move || (reader.chunk(0, 5), reader.chunk(0, 9)))
                .await
                .unwrap();
        assert!(missing.is_err());
        assert_eq!(present.unwrap(), chunks_of(&s.manifest, 0)[9]);

        // Once it is there, it loads.
        let (reference, bytes) = &s.split.encoded[1];
        let key = layout::chunk(&reference.tag().unwrap());
        s.store
            .put_new(&key, Bytes::from(bytes.clone()))
            .await
            .unwrap();
        let other_cache = tempfile::tempdir().unwrap();
        let fresh = open(&Setup {
            fetcher: Fetcher::start(
                Arc::new(s.store.clone()),
                Arc::new(ChunkCache::open(other_cache.path(), 1 << 30).unwrap()),
                FetchSettings::default(),
                tokio::runtime::Handle::current(),
            ),
            ..s
        });
        fresh.load(|_| Some(Priority::Demand)).await.unwrap();
        assert!(fresh.same_files(&manifest()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_segment_standing_for_two_chunk_counts_is_refused() {
        let s = setup(&[]).await;
        let mut root = s.split.root.clone();
        // a.img's last segment holds 2 chunks; its first, 4.
        root.segments[0][2] = root.segments[0][0].clone();
        let error =
            BaseManifest::open(Stored::Tree(root), s.secret.clone(), s.fetcher.clone(), "m")
                .expect_err("refused");
        assert!(error.to_string().contains("stands for"), "{error}");
    }

    #[test]
    fn a_whole_manifest_is_loaded_from_the_start() {
        let base = BaseManifest::whole(manifest());
        assert!(base.is_loaded());
        assert_eq!(base.segments_loaded(), (0, 0));
        assert!(base.segment_tags().is_empty());
        assert_eq!(base.loaded_chunk(1, 3), Some(&chunks_of(&manifest(), 1)[3]));
        assert_eq!(base.chunk(0, 9).unwrap(), chunks_of(&manifest(), 0)[9]);
        assert_eq!(
            base.stored_chunks().count(),
            manifest().stored_chunks().count()
        );
    }
}
