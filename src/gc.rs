//! Garbage collection: delete old versions, then the chunks no version needs.
//!
//! **Versions.** Per parcel, a version is kept if it is among the newest
//! `keep_last`, or younger than `keep_days` (its manifest's creation time), or
//! the `base_version` of the parcel's current lock; the newest version is
//! always kept. Only a *contiguous oldest prefix* is deleted: the first
//! version that must be kept stops the deletion, so versions stay contiguous
//! from the oldest kept one, which is written to `versions/oldest` for stores
//! that cannot list (see [`crate::parcel::list_versions`]). With neither
//! option, no version is deleted.
//!
//! **Chunks.** A chunk is deleted iff no remaining manifest of any parcel
//! references it *and* it was last written or refreshed more than the grace
//! period `G` ago. Reading manifests needs each parcel's key, so every parcel
//! is unlocked first; if one cannot be, or a manifest cannot be read, gc
//! deletes nothing at all (it still reports what it would do).
//!
//! **Why that is safe with concurrent writers.** A writer (import, checkin,
//! rollback) uploads chunks first and commits a manifest referencing them
//! afterwards, so in between, its chunks are unreferenced. The invariant:
//! *every chunk a commit newly references was written or refreshed
//! ([`crate::store::WriteStore::put_replace`]) less than `G/2` before the
//! commit* (a writer that took longer refreshes again or refuses). gc takes
//! its reference time `T` *before* it re-lists every parcel's lock and
//! versions, and deletes a chunk only if it was last modified more than `G`
//! before `T` (checked again with one HEAD right before the delete). A
//! manifest committed before `T` is in the re-listing, so its chunks are
//! referenced; one committed after `T` only references chunks modified after
//! `T - G/2`, which are younger than `G`. The remaining `G/2` absorbs clock
//! differences between the writer, gc and the store's server.
//!
//! Chunks referenced by the parent version need no refresh: the writer's
//! commit only succeeds if that parent is still the newest version, which gc
//! always keeps. A session's base version is kept through its lock's
//! `base_version`; if gc finds in its re-listing that a lock names a version it
//! just deleted (a resume raced with gc), it deletes no chunk this time.
//!
//! **A writer reusing an orphan while gc deletes it** is the one race the
//! grace period does not cover: gc announces every batch of chunks it is
//! about to delete with a notice, and writers wait for the notices naming
//! chunks they refreshed before they commit. The protocol, both sides, is in
//! `notices.rs`; writers call [`finish_pass`].
//!
//! Files: this one holds the options, the report and the [`Unlocker`];
//! [`collect`] (in `collect.rs`) runs the phases; `versions.rs` decides and
//! deletes the versions; `notices.rs` is the writer-side protocol.

mod collect;
mod notices;
mod versions;

pub use collect::collect;
pub use notices::finish_pass;

use std::future::Future;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Classify, ErrorClass};
use crate::keys::{Credential, KeyError};
use crate::parcel::{self, OpenParcel, ParcelError};
use crate::store::{StoreError, StoreHandle};

/// What to collect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcOptions {
    /// Keep the newest N versions of every parcel (N ≥ 1).
    pub keep_last: Option<u64>,
    /// Keep versions created less than D days ago.
    pub keep_days: Option<u64>,
    /// Unreferenced chunks modified more recently than this are kept.
    pub grace: Duration,
    /// Report only; delete nothing.
    pub dry_run: bool,
    /// Concurrent store requests.
    pub parallel: usize,
}

/// Unlocks parcels for gc (the front end may prompt).
pub trait Unlocker: Sync {
    /// The parcel `name`, unlocked, or why not.
    fn unlock(
        &self,
        store: &StoreHandle,
        name: &str,
    ) -> impl Future<Output = Result<OpenParcel, UnlockError>> + Send;
}

/// Why an [`Unlocker`] could not unlock a parcel: the message gc reports and
/// the class of the error behind it (which sets isrctl's exit code).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct UnlockError {
    /// The class of the underlying error.
    pub class: ErrorClass,
    /// What went wrong.
    pub message: String,
}

impl UnlockError {
    /// An error of `class` saying `message` (for failures of the front end
    /// itself, such as reading a passphrase from the terminal).
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        UnlockError {
            class,
            message: message.into(),
        }
    }

    fn of(error: &(impl Classify + std::fmt::Display)) -> Self {
        UnlockError::new(error.class(), error.to_string())
    }
}

impl Classify for UnlockError {
    fn class(&self) -> ErrorClass {
        self.class
    }
}

impl From<ParcelError> for UnlockError {
    fn from(error: ParcelError) -> Self {
        UnlockError::of(&error)
    }
}

impl From<KeyError> for UnlockError {
    fn from(error: KeyError) -> Self {
        UnlockError::of(&error)
    }
}

impl From<StoreError> for UnlockError {
    fn from(error: StoreError) -> Self {
        UnlockError::of(&error)
    }
}

/// Unlocks every parcel with the same credentials.
#[derive(Debug)]
pub struct WithCredentials(pub Vec<Credential>);

impl Unlocker for WithCredentials {
    async fn unlock(&self, store: &StoreHandle, name: &str) -> Result<OpenParcel, UnlockError> {
        Ok(parcel::open(store, name, &self.0).await?)
    }
}

/// Fatal errors (reported problems with single parcels are not errors).
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// A store operation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A parcel-level operation failed.
    #[error(transparent)]
    Parcel(#[from] ParcelError),
}

impl Classify for GcError {
    fn class(&self) -> ErrorClass {
        match self {
            GcError::Store(e) => e.class(),
            GcError::Parcel(e) => e.class(),
        }
    }
}

/// Garbage collection settings (`[gc]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcSettings {
    /// Unreferenced chunks written or refreshed less than this many seconds
    /// ago are kept (default 86400, one day).
    pub grace_secs: u64,
}

impl GcSettings {
    /// Default grace period: one day.
    pub const DEFAULT_GRACE_SECS: u64 = 86_400;

    /// The grace period.
    pub fn grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.grace_secs)
    }
}

impl Default for GcSettings {
    fn default() -> Self {
        GcSettings {
            grace_secs: GcSettings::DEFAULT_GRACE_SECS,
        }
    }
}

/// Something that kept gc from deleting anything.
#[derive(Debug, Clone, Serialize)]
pub struct GcProblem {
    /// Parcel concerned.
    pub parcel: String,
    /// What went wrong and what to do.
    pub message: String,
    /// Its class (isrctl's JSON adds the exit code it maps to).
    pub class: ErrorClass,
}

/// What gc did (or would do) to one parcel.
#[derive(Debug, Clone, Serialize)]
pub struct ParcelGc {
    /// Parcel.
    pub name: String,
    /// Versions deleted (or to delete), ascending: always an oldest prefix.
    pub deleted_versions: Vec<u64>,
    /// Versions kept, ascending.
    pub kept_versions: Vec<u64>,
    /// The base version of the parcel's lock, if it is locked.
    pub locked_base_version: Option<u64>,
}

/// What gc did (or, with `dry_run` or problems, would do).
#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    /// Store URL.
    pub store: String,
    /// Nothing was deleted on purpose.
    pub dry_run: bool,
    /// The deletions listed were carried out (false in a dry run, or when a
    /// problem stopped gc before it deleted anything).
    pub applied: bool,
    /// Grace period used.
    pub grace_secs: u64,
    /// Per parcel.
    pub parcels: Vec<ParcelGc>,
    /// Whether the chunk phase ran (false when there were problems).
    pub chunks_swept: bool,
    /// Chunk objects in the store when gc listed them.
    pub chunks_before: u64,
    /// Distinct chunks referenced by the remaining versions.
    pub chunks_referenced: u64,
    /// Chunks deleted (or that would be).
    pub chunks_deleted: u64,
    /// Their stored bytes.
    pub bytes_freed: u64,
    /// Unreferenced chunks kept because they are younger than the grace period.
    pub chunks_in_grace: u64,
    /// Why nothing was deleted, if anything stopped gc.
    pub problems: Vec<GcProblem>,
}

impl GcReport {
    /// The exit code of the first problem, if any.
    pub fn problem_class(&self) -> Option<ErrorClass> {
        self.problems.first().map(|p| p.class)
    }
}

#[cfg(test)]
mod tests {
    use super::notices::{NOTICE_STALE, confirm_refreshed};
    use super::*;
    use crate::chunk::ChunkTag;
    use crate::import::ImportSettings;
    use crate::import::{ImportRequest, import};
    use crate::keys::{KdfParams, Zeroizing};
    use crate::layout;
    use crate::progress::NoProgress;
    use crate::store::ReadStore;
    use crate::store::memory::MemoryStore;
    use crate::store::{ListStore, WriteStore};
    use bytes::Bytes;
    use std::collections::HashSet;
    use std::path::Path;
    use std::time::SystemTime;

    const PASS: &str = "pw";

    fn credentials(pass: &str) -> Vec<Credential> {
        vec![Credential::Passphrase(Zeroizing::new(pass.to_owned()))]
    }

    fn options(keep_last: Option<u64>, grace: Duration) -> GcOptions {
        GcOptions {
            keep_last,
            keep_days: None,
            grace,
            dry_run: false,
            parallel: 4,
        }
    }

    async fn import_bytes(store: &StoreHandle, dir: &Path, name: &str, data: &[u8], pass: &str) {
        let path = dir.join(format!("{name}-{}", blake3::hash(data).to_hex()));
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("disk.img"), data).unwrap();
        let paths = [path];
        let new_version = parcel::read_record(store, name).await.unwrap().is_some();
        let request = ImportRequest {
            name,
            paths: &paths,
            new_version,
            settings: ImportSettings {
                chunk_size: 65536,
                zstd_level: 1,
                jobs: 1,
                uploads: 4,
            },
            chunk_size: None,
            kdf: KdfParams {
                memory_kib: 64,
                iterations: 1,
                parallelism: 1,
            },
            message: String::new(),
            dedup_with: None,
            gc_grace: Duration::from_secs(86_400),
        };
        import(store, &request, &credentials(pass), &NoProgress)
            .await
            .unwrap();
    }

    fn data(seed: &str, chunks: usize) -> Vec<u8> {
        let mut out = vec![0u8; chunks * 65536];
        blake3::Hasher::new()
            .update(seed.as_bytes())
            .finalize_xof()
            .fill(&mut out);
        out
    }

    fn age_everything(memory: &MemoryStore, store: &StoreHandle) {
        let long_ago = SystemTime::now() - Duration::from_secs(10 * 86_400);
        let keys = futures::executor::block_on(store.lister().unwrap().list("")).unwrap();
        for key in keys {
            memory.set_modified(&key, long_ago);
        }
    }

    /// Chunks each version of these one-file parcels adds beyond its data:
    /// its one manifest segment (format 2).
    const SEGMENTS: u64 = 1;

    /// Three versions: A+B, A+C, A+D (4 chunks each part).
    async fn three_versions() -> (MemoryStore, StoreHandle, tempfile::TempDir) {
        let memory = MemoryStore::new();
        let store = StoreHandle::full(memory.clone());
        let dir = tempfile::tempdir().unwrap();
        let a = data("a", 4);
        for other in ["b", "c", "d"] {
            let content = [a.clone(), data(other, 4)].concat();
            import_bytes(&store, dir.path(), "p", &content, PASS).await;
        }
        (memory, store, dir)
    }

    #[tokio::test]
    async fn keep_last_deletes_the_oldest_versions_and_their_old_chunks_only() {
        let (memory, store, _dir) = three_versions().await;
        assert_eq!(memory.count("chunks/"), 16 + 3 * SEGMENTS as usize);
        let unlocker = WithCredentials(credentials(PASS));

        // Dry run: nothing changes, the plan is reported.
        let snapshot = store.lister().unwrap().list("").await.unwrap();
        let dry = GcOptions {
            dry_run: true,
            ..options(Some(1), Duration::ZERO)
        };
        let report = collect(&store, &dry, &unlocker, &NoProgress).await.unwrap();
        assert_eq!(report.parcels[0].deleted_versions, vec![1, 2]);
        assert_eq!(report.chunks_deleted, 8 + 2 * SEGMENTS);
        assert_eq!(store.lister().unwrap().list("").await.unwrap(), snapshot);

        // Young chunks survive the default grace even once unreferenced.
        let one_day = options(Some(1), Duration::from_secs(86_400));
        let report = collect(&store, &one_day, &unlocker, &NoProgress)
            .await
            .unwrap();
        assert_eq!(report.parcels[0].deleted_versions, vec![1, 2]);
        assert_eq!(
            (report.chunks_deleted, report.chunks_in_grace),
            (0, 8 + 2 * SEGMENTS)
        );
        assert_eq!(parcel::list_versions(&store, "p").await.unwrap(), vec![3]);
        assert_eq!(
            parcel::read_oldest_hint(&store, "p").await.unwrap(),
            Some(3)
        );

        // Once old, they go; the chunks of version 3 stay.
        age_everything(&memory, &store);
        let report = collect(&store, &one_day, &unlocker, &NoProgress)
            .await
            .unwrap();
        assert!(report.parcels[0].deleted_versions.is_empty());
        assert_eq!(
            (report.chunks_deleted, report.chunks_referenced),
            (8 + 2 * SEGMENTS, 8 + SEGMENTS)
        );
        assert_eq!(memory.count("chunks/"), 8 + SEGMENTS as usize);
        let open = parcel::open(&store, "p", &credentials(PASS)).await.unwrap();
        let manifest = parcel::read_manifest(&store, &open, 3).await.unwrap();
        for (tag, ..) in parcel::distinct_chunks(&manifest) {
            assert!(store.reader().exists(&layout::chunk(&tag)).await.unwrap());
        }
    }

    #[tokio::test]
    async fn no_option_deletes_no_version_and_a_lock_keeps_its_base() {
        let (memory, store, _dir) = three_versions().await;
        age_everything(&memory, &store);
        let unlocker = WithCredentials(credentials(PASS));
        let report = collect(
            &store,
            &options(None, Duration::ZERO),
            &unlocker,
            &NoProgress,
        )
        .await
        .unwrap();
        assert!(report.parcels[0].deleted_versions.is_empty());
        assert_eq!(report.chunks_deleted, 0);

        let lock = crate::session::take_lock(&store, "p", Some(2))
            .await
            .unwrap();
        let report = collect(
            &store,
            &options(Some(1), Duration::ZERO),
            &unlocker,
            &NoProgress,
        )
        .await
        .unwrap();
        assert_eq!(report.parcels[0].deleted_versions, vec![1]);
        assert_eq!(report.parcels[0].locked_base_version, Some(2));
        assert_eq!(
            report.chunks_deleted,
            4 + SEGMENTS,
            "only B's chunks and version 1's segment"
        );
        assert_eq!(
            parcel::list_versions(&store, "p").await.unwrap(),
            vec![2, 3]
        );
        drop(lock);
    }

    #[tokio::test]
    async fn a_parcel_that_does_not_unlock_stops_every_deletion() {
        let (memory, store, dir) = three_versions().await;
        import_bytes(&store, dir.path(), "other", &data("o", 2), "another").await;
        age_everything(&memory, &store);
        let before = store.lister().unwrap().list("").await.unwrap();
        let report = collect(
            &store,
            &options(Some(1), Duration::ZERO),
            &WithCredentials(credentials(PASS)),
            &NoProgress,
        )
        .await
        .unwrap();
        assert_eq!(report.problems.len(), 1);
        assert_eq!(report.problems[0].parcel, "other");
        assert_eq!(report.problem_class(), Some(ErrorClass::WrongKey));
        assert!(!report.chunks_swept);
        assert_eq!(store.lister().unwrap().list("").await.unwrap(), before);
    }

    #[tokio::test]
    async fn a_chunk_refreshed_after_listing_is_not_deleted() {
        let (memory, store, _dir) = three_versions().await;
        let unlocker = WithCredentials(credentials(PASS));
        collect(
            &store,
            &options(Some(1), Duration::from_secs(3600)),
            &unlocker,
            &NoProgress,
        )
        .await
        .unwrap();
        age_everything(&memory, &store);
        // Refresh every orphan, as a writer reusing them would.
        let orphans: Vec<String> = store.lister().unwrap().list("chunks/").await.unwrap();
        let writer = store.writer("test").unwrap();
        for key in &orphans {
            let bytes = store.reader().get(key).await.unwrap();
            writer.put_replace(key, bytes).await.unwrap();
        }
        let report = collect(
            &store,
            &options(Some(1), Duration::from_secs(3600)),
            &unlocker,
            &NoProgress,
        )
        .await
        .unwrap();
        assert_eq!(
            (report.chunks_deleted, report.chunks_in_grace),
            (0, 8 + 2 * SEGMENTS)
        );
    }

    /// A memory store on which every HEAD of a chunk is followed at once by
    /// a writer's refresh of that chunk: gc's HEAD sees the old time and its
    /// DELETE removes the refreshed object, the race deletion notices are for.
    /// Records whether a notice named the chunk when gc looked at it.
    #[derive(Debug)]
    struct RefreshAfterHead {
        inner: MemoryStore,
        announced: std::sync::Arc<std::sync::Mutex<Vec<bool>>>,
    }

    #[async_trait::async_trait]
    impl ReadStore for RefreshAfterHead {
        fn url(&self) -> &str {
            self.inner.url()
        }
        async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
            self.inner.get(key).await
        }
        async fn exists(&self, key: &str) -> Result<bool, StoreError> {
            self.inner.exists(key).await
        }
    }

    #[async_trait::async_trait]
    impl ListStore for RefreshAfterHead {
        async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
            self.inner.list(prefix).await
        }
        async fn list_info(
            &self,
            prefix: &str,
        ) -> Result<Vec<crate::store::ObjectInfo>, StoreError> {
            self.inner.list_info(prefix).await
        }
    }

    #[async_trait::async_trait]
    impl WriteStore for RefreshAfterHead {
        async fn put_new(
            &self,
            key: &str,
            data: Bytes,
        ) -> Result<crate::store::PutOutcome, StoreError> {
            self.inner.put_new(key, data).await
        }
        async fn put_replace(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
            self.inner.put_replace(key, data).await
        }
        async fn modified(&self, key: &str) -> Result<Option<SystemTime>, StoreError> {
            let modified = self.inner.modified(key).await?;
            if key.starts_with(layout::CHUNKS) && modified.is_some() {
                let mut announced = false;
                for notice in self.inner.list(layout::GC_NOTICES).await? {
                    let body = self.inner.get(&notice).await?;
                    announced |= String::from_utf8_lossy(&body).lines().any(|k| k == key);
                }
                self.announced.lock().unwrap().push(announced);
                let bytes = self.inner.get(key).await?;
                self.inner.put_replace(key, bytes).await?;
            }
            Ok(modified)
        }
        async fn delete(&self, key: &str) -> Result<(), StoreError> {
            self.inner.delete(key).await
        }
        async fn sync(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    async fn put(store: &StoreHandle, key: &str, data: Bytes) {
        let writer = store.writer("test").unwrap();
        writer.put_new(key, data).await.unwrap();
    }

    fn tag_of(key: &str) -> ChunkTag {
        ChunkTag::from_hex(key.rsplit('/').next().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn chunks_gc_deletes_as_a_writer_refreshes_them_are_reported_to_the_writer() {
        let (memory, _, _dir) = three_versions().await;
        age_everything(&memory, &StoreHandle::full(memory.clone()));
        let announced = std::sync::Arc::default();
        let store = StoreHandle::full(RefreshAfterHead {
            inner: memory.clone(),
            announced: std::sync::Arc::clone(&announced),
        });
        let orphans: HashSet<String> = memory.list("chunks/").await.unwrap().into_iter().collect();
        let report = collect(
            &store,
            &options(Some(1), Duration::from_secs(3600)),
            &WithCredentials(credentials(PASS)),
            &NoProgress,
        )
        .await
        .unwrap();
        assert_eq!(report.chunks_deleted, 8 + 2 * SEGMENTS);
        let announced = announced.lock().unwrap().clone();
        assert_eq!(announced.len(), 8 + 2 * SEGMENTS as usize);
        assert!(
            announced.iter().all(|&a| a),
            "gc looked at a chunk it had not announced: {announced:?}"
        );
        assert_eq!(
            memory.count(layout::GC_NOTICES),
            0,
            "gc removes its notices"
        );
        // Each deleted chunk was refreshed by a writer just before gc's DELETE:
        // the writer's confirmation finds them gone, so it writes them again.
        let left: HashSet<String> = memory.list("chunks/").await.unwrap().into_iter().collect();
        let refreshed: Vec<ChunkTag> = orphans.difference(&left).map(|k| tag_of(k)).collect();
        assert_eq!(refreshed.len(), 8 + 2 * SEGMENTS as usize);
        let mut lost = confirm_refreshed(&store, &refreshed).await.unwrap();
        let mut expected = refreshed.clone();
        lost.sort_by_key(|t| t.to_hex());
        expected.sort_by_key(|t| t.to_hex());
        assert_eq!(lost, expected);
        let kept: Vec<ChunkTag> = left.iter().map(|k| tag_of(k)).collect();
        assert!(confirm_refreshed(&store, &kept).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_writer_waits_for_a_gc_that_announced_a_chunk_it_refreshed() {
        let memory = MemoryStore::new();
        let store = StoreHandle::full(memory.clone());
        let writer = store.writer("test").unwrap();
        let tag = ChunkTag::from_hex(&"ab".repeat(32)).unwrap();
        let key = layout::chunk(&tag);
        put(&store, &key, Bytes::from_static(b"c")).await;
        let notice = layout::gc_notice("running");
        put(
            &store,
            &notice,
            Bytes::from(format!("chunks/00/other\n{key}")),
        )
        .await;
        // A gc that looked before the refresh deletes the chunk a moment later.
        let gc = {
            let writer = writer.clone();
            let (key, notice) = (key.clone(), notice.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                writer.delete(&key).await.unwrap();
                writer.delete(&notice).await.unwrap();
            })
        };
        let lost = tokio::time::timeout(Duration::from_secs(30), confirm_refreshed(&store, &[tag]))
            .await
            .expect("the writer waits only while the notice is there")
            .unwrap();
        gc.await.unwrap();
        assert_eq!(
            lost,
            vec![tag],
            "the writer waited for gc, then found the chunk gone"
        );
    }

    #[tokio::test]
    async fn notices_of_other_chunks_and_stale_notices_do_not_hold_a_writer_up() {
        let (memory, store, _dir) = three_versions().await;
        let tag = ChunkTag::from_hex(&"cd".repeat(32)).unwrap();
        let key = layout::chunk(&tag);
        put(&store, &key, Bytes::from_static(b"c")).await;
        let other = layout::gc_notice("other");
        put(&store, &other, Bytes::from_static(b"chunks/00/other")).await;
        let stale = layout::gc_notice("stale");
        put(&store, &stale, Bytes::from(key.clone())).await;
        memory.set_modified(&stale, SystemTime::now() - 2 * NOTICE_STALE);
        let lost = tokio::time::timeout(Duration::from_secs(30), confirm_refreshed(&store, &[tag]))
            .await
            .expect("neither notice holds the writer up")
            .unwrap();
        assert!(lost.is_empty());
        // gc removes the stale notice (a gc that died left it) and no other.
        age_everything(&memory, &store);
        memory.set_modified(&other, SystemTime::now());
        collect(
            &store,
            &options(Some(1), Duration::from_secs(3600)),
            &WithCredentials(credentials(PASS)),
            &NoProgress,
        )
        .await
        .unwrap();
        assert_eq!(
            store
                .lister()
                .unwrap()
                .list(layout::GC_NOTICES)
                .await
                .unwrap(),
            vec![other]
        );
    }

    #[tokio::test]
    async fn a_parcel_without_versions_needs_no_key() {
        let (memory, store, _dir) = three_versions().await;
        parcel::create(
            &store,
            "unfinished",
            65536,
            crate::keys::ParcelSecrets::generate(None),
            &credentials("unknown"),
            KdfParams {
                memory_kib: 64,
                iterations: 1,
                parallelism: 1,
            },
        )
        .await
        .unwrap();
        age_everything(&memory, &store);
        let report = collect(
            &store,
            &options(Some(1), Duration::ZERO),
            &WithCredentials(credentials(PASS)),
            &NoProgress,
        )
        .await
        .unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.chunks_deleted, 8 + 2 * SEGMENTS);
    }

    #[tokio::test]
    async fn http_like_stores_are_refused() {
        let store = StoreHandle::read_only(MemoryStore::new());
        let err = collect(
            &store,
            &options(Some(1), Duration::ZERO),
            &WithCredentials(Vec::new()),
            &NoProgress,
        )
        .await
        .unwrap_err();
        assert_eq!(err.class(), ErrorClass::Invalid);
    }
}
