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
//! **A writer reusing an orphan while gc deletes it.** An old unreferenced
//! chunk (an orphan) that a writer reuses is refreshed with `put_replace`.
//! If gc's HEAD saw the old time just before the refresh landed, gc's DELETE
//! would remove the refreshed object, and no store here offers a delete
//! conditional on the last-modified time (S3 has it only for directory
//! buckets; an ETag condition cannot tell a refresh of identical bytes
//! apart). So gc announces every batch before it looks at its chunks: it
//! writes a notice `gc/deleting/<id>` listing the batch's keys, HEADs and
//! deletes them, then removes the notice. A writer, after its refreshes and
//! before its commit, runs [`finish_pass`]: it lists the notices,
//! waits until every one naming a chunk it refreshed is gone, then HEADs
//! those chunks and writes again any that are missing. A notice the writer
//! does not see was posted after its refreshes, so that gc's HEAD sees the
//! new time and keeps the chunk. gc deletes nothing under a notice older
//! than a minute by its own clock, and writers ignore (and gc removes)
//! notices older than ten minutes by the store's clock, left by a gc that
//! died.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

use crate::chunk::ChunkTag;
use crate::error::{Classify, ErrorClass};
use crate::keys::Credential;
use crate::layout;
use crate::parcel::{self, OpenParcel, ParcelError};
use crate::progress::Progress;
use crate::store::{BoxError, ListStore, StoreError, StoreHandle, WriteStore};

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
    ) -> impl Future<Output = Result<OpenParcel, BoxError>> + Send;
}

/// Unlocks every parcel with the same credentials.
#[derive(Debug)]
pub struct WithCredentials(pub Vec<Credential>);

impl Unlocker for WithCredentials {
    async fn unlock(&self, store: &StoreHandle, name: &str) -> Result<OpenParcel, BoxError> {
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

/// One parcel's plan.
struct Plan {
    name: String,
    versions: Vec<u64>,
    delete: Vec<u64>,
    /// Versions whose chunks are in the referenced set.
    read: HashSet<u64>,
}

fn problem(parcel: &str, message: String, class: ErrorClass) -> GcProblem {
    GcProblem {
        parcel: parcel.to_owned(),
        message,
        class,
    }
}

/// The class of an unlocker's error: the first of the chain that a lower
/// module classifies.
fn class_of_unlock_error(error: &BoxError) -> ErrorClass {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    while let Some(error) = current {
        if let Some(e) = error.downcast_ref::<ParcelError>() {
            return e.class();
        }
        if let Some(e) = error.downcast_ref::<crate::keys::KeyError>() {
            return e.class();
        }
        if let Some(e) = error.downcast_ref::<StoreError>() {
            return e.class();
        }
        current = error.source();
    }
    ErrorClass::Other
}

fn unlock_problem(name: &str, error: &BoxError) -> GcProblem {
    let class = class_of_unlock_error(error);
    problem(
        name,
        format!(
            "parcel {name} cannot be unlocked ({error}); gc needs every parcel's key to read which chunks its versions use: give credentials that open it (ISR_PASSPHRASE, --passphrase-file or --key-file, or run on a terminal to be asked per parcel)"
        ),
        class,
    )
}

fn manifest_problem(name: &str, version: u64, error: &ParcelError) -> GcProblem {
    problem(
        name,
        format!(
            "version {version} of parcel {name} cannot be read ({error}); gc deletes nothing while it cannot see every chunk in use: fix or restore that manifest (or the store), then run gc again"
        ),
        error.class(),
    )
}

fn add_chunks(referenced: &mut HashSet<ChunkTag>, manifest: &crate::manifest::Manifest) {
    for (_, _, chunks) in manifest.files() {
        referenced.extend(chunks.iter().filter_map(|c| c.tag()));
    }
}

/// Which versions to delete: the oldest prefix before the first version that
/// must be kept. `young(v)` says whether version `v` is younger than
/// `keep_days` (asked only when that option is set, oldest first).
async fn plan_deletion<F, Fut>(
    versions: &[u64],
    options: &GcOptions,
    base: Option<u64>,
    mut young: F,
) -> Result<Vec<u64>, (u64, ParcelError)>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<bool, ParcelError>>,
{
    if options.keep_last.is_none() && options.keep_days.is_none() {
        return Ok(Vec::new());
    }
    let first_kept_by_count = options.keep_last.map_or(versions.len(), |n| {
        versions.len().saturating_sub(n as usize)
    });
    let mut delete = Vec::new();
    for (index, &version) in versions.iter().enumerate() {
        let newest = index + 1 == versions.len();
        if newest || index >= first_kept_by_count || Some(version) == base {
            break;
        }
        if options.keep_days.is_some() && young(version).await.map_err(|e| (version, e))? {
            break;
        }
        delete.push(version);
    }
    Ok(delete)
}

/// Runs garbage collection over every parcel of `store`.
pub async fn collect<U: Unlocker>(
    store: &StoreHandle,
    options: &GcOptions,
    unlocker: &U,
    progress: &dyn Progress,
) -> Result<GcReport, GcError> {
    let lister = store
        .lister()
        .ok_or_else(|| StoreError::Unsupported {
            store: store.url().to_owned(),
            operation: "collect garbage",
            hint: "gc must list every parcel and chunk, which HTTP cannot; run it against the store itself (a directory or s3://)",
        })?
        .clone();
    let writer = if options.dry_run {
        None
    } else {
        Some(store.writer("collect garbage")?.clone())
    };
    let mut report = GcReport {
        store: store.url().to_owned(),
        dry_run: options.dry_run,
        applied: false,
        grace_secs: options.grace.as_secs(),
        parcels: Vec::new(),
        chunks_swept: false,
        chunks_before: 0,
        chunks_referenced: 0,
        chunks_deleted: 0,
        bytes_freed: 0,
        chunks_in_grace: 0,
        problems: Vec::new(),
    };

    // Phase 1: unlock every parcel, plan, and read the manifests that stay.
    let mut opened: BTreeMap<String, OpenParcel> = BTreeMap::new();
    let mut plans = Vec::new();
    let mut referenced: HashSet<ChunkTag> = HashSet::new();
    let now = SystemTime::now();
    for name in parcel::list_parcels(store).await? {
        let lock = parcel::read_lock(store, &name).await?;
        let versions = parcel::list_versions(store, &name).await?;
        let base = lock.as_ref().and_then(|l| l.base_version);
        // A parcel without versions (an interrupted import) uses no chunk yet,
        // so it needs no key; one committed meanwhile is unlocked in phase 3.
        let open = if versions.is_empty() {
            None
        } else {
            match unlocker.unlock(store, &name).await {
                Ok(open) => Some(open),
                Err(error) => {
                    report.problems.push(unlock_problem(&name, &error));
                    None
                }
            }
        };
        let mut plan = Plan {
            name: name.clone(),
            delete: Vec::new(),
            read: HashSet::new(),
            versions,
        };
        if let Some(open) = &open {
            let keep_days = options.keep_days.unwrap_or(0);
            let young = |version: u64| async move {
                let manifest = parcel::read_manifest(store, open, version).await?;
                let age = now
                    .duration_since(manifest.created.to_system_time())
                    .unwrap_or(Duration::ZERO);
                Ok(age < Duration::from_secs(keep_days.saturating_mul(86_400)))
            };
            match plan_deletion(&plan.versions, options, base, young).await {
                Ok(delete) => plan.delete = delete,
                Err((version, error)) => {
                    report
                        .problems
                        .push(manifest_problem(&name, version, &error));
                }
            }
            for &version in &plan.versions[plan.delete.len()..] {
                match parcel::read_manifest(store, open, version).await {
                    Ok(manifest) => {
                        add_chunks(&mut referenced, &manifest);
                        plan.read.insert(version);
                    }
                    Err(error) => {
                        report
                            .problems
                            .push(manifest_problem(&name, version, &error));
                    }
                }
            }
        } else {
            // Report what gc would do by count; age and chunks need the key.
            let never_young = |_| async { Ok(false) };
            let by_count = GcOptions {
                keep_days: None,
                ..*options
            };
            plan.delete = plan_deletion(&plan.versions, &by_count, base, never_young)
                .await
                .unwrap_or_default();
        }
        if let Some(open) = open {
            opened.insert(name.clone(), open);
        }
        report.parcels.push(ParcelGc {
            name: plan.name.clone(),
            deleted_versions: plan.delete.clone(),
            kept_versions: plan.versions[plan.delete.len()..].to_vec(),
            locked_base_version: base,
        });
        plans.push(plan);
    }
    let deleting = writer.is_some() && report.problems.is_empty();
    report.applied = deleting;

    // Phase 2: delete versions, oldest first, after pointing the hint past them.
    if deleting {
        let writer = writer.as_ref().expect("deleting needs a writer");
        for plan in &plans {
            delete_versions(store, lister.as_ref(), writer.as_ref(), plan).await?;
        }
    }
    if !report.problems.is_empty() {
        return Ok(report);
    }

    // Phase 3: chunks. List them, take the reference time, then re-list every
    // parcel's lock and versions and add what was committed meanwhile.
    let listed = lister.list_info(layout::CHUNKS).await?;
    let chunks: Vec<(ChunkTag, String, u64, SystemTime)> = listed
        .into_iter()
        .filter_map(|object| {
            let hex = object.key.strip_prefix(layout::CHUNKS)?.split_once('/')?.1;
            let tag = ChunkTag::from_hex(hex)?;
            (layout::chunk(&tag) == object.key).then_some((
                tag,
                object.key,
                object.size,
                object.modified,
            ))
        })
        .collect();
    report.chunks_before = chunks.len() as u64;
    let reference_time = SystemTime::now();
    let deleted_by_us: HashSet<(String, u64)> = if deleting {
        plans
            .iter()
            .flat_map(|p| p.delete.iter().map(|&v| (p.name.clone(), v)))
            .collect()
    } else {
        HashSet::new()
    };
    for name in parcel::list_parcels(store).await? {
        let lock = parcel::read_lock(store, &name).await?;
        let versions = parcel::list_versions(store, &name).await?;
        if let Some(base) = lock.as_ref().and_then(|l| l.base_version)
            && (deleted_by_us.contains(&(name.clone(), base))
                || versions.first().is_some_and(|&oldest| base < oldest))
        {
            report.problems.push(problem(
                &name,
                format!(
                    "parcel {name} was resumed from version {base} while gc deleted that version; its session still needs the version's chunks, so gc deleted no chunk this time: run gc again after the session is checked in or discarded"
                ),
                ErrorClass::Conflict,
            ));
            continue;
        }
        let plan = plans.iter().find(|p| p.name == name);
        if versions.is_empty() {
            continue;
        }
        let open = match opened.get(&name) {
            Some(open) => open.clone(),
            None => match unlocker.unlock(store, &name).await {
                Ok(open) => {
                    opened.insert(name.clone(), open.clone());
                    open
                }
                Err(error) => {
                    report.problems.push(unlock_problem(&name, &error));
                    continue;
                }
            },
        };
        for version in versions {
            // Already counted, or to be deleted (still there in a dry run).
            if plan.is_some_and(|p| p.read.contains(&version) || p.delete.contains(&version)) {
                continue;
            }
            match parcel::read_manifest(store, &open, version).await {
                Ok(manifest) => add_chunks(&mut referenced, &manifest),
                // Deleted meanwhile (by another gc): it no longer needs its chunks.
                Err(ParcelError::VersionNotFound { .. }) => {}
                Err(error) => report
                    .problems
                    .push(manifest_problem(&name, version, &error)),
            }
        }
    }
    if !report.problems.is_empty() {
        return Ok(report);
    }
    report.chunks_swept = true;
    report.chunks_referenced = chunks
        .iter()
        .filter(|(tag, ..)| referenced.contains(tag))
        .count() as u64;
    let old = |modified: SystemTime| {
        reference_time
            .duration_since(modified)
            .is_ok_and(|age| age > options.grace)
    };
    let mut doomed = Vec::new();
    for (tag, key, size, modified) in chunks {
        if referenced.contains(&tag) {
            continue;
        }
        if old(modified) {
            doomed.push((key, size));
        } else {
            report.chunks_in_grace += 1;
        }
    }

    let Some(writer) = writer else {
        report.chunks_deleted = doomed.len() as u64;
        report.bytes_freed = doomed.iter().map(|(_, size)| size).sum();
        return Ok(report);
    };
    progress.start("deleting", doomed.iter().map(|(_, size)| size).sum());
    remove_stale_notices(lister.as_ref(), writer.as_ref()).await?;
    let mut results: Vec<Result<Option<u64>, StoreError>> = Vec::new();
    for batch in doomed.chunks(NOTICE_BATCH) {
        // Announce the batch before looking at any of its chunks: a writer
        // that refreshed one of them and then does not see this notice
        // refreshed it before the HEAD below, which then sees the new time.
        let notice = layout::gc_notice(&format!("{:032x}", rand::random::<u128>()));
        let keys: Vec<&str> = batch.iter().map(|(key, _)| key.as_str()).collect();
        writer
            .put_new(&notice, Bytes::from(keys.join("\n")))
            .await?;
        let posted = Instant::now();
        let batch_results: Vec<_> = futures::stream::iter(batch)
            .map(|(key, size)| {
                let writer = writer.clone();
                async move {
                    // Refreshed since the listing (a writer reuses it), or gone.
                    match writer.modified(key).await? {
                        Some(modified) if old(modified) => {}
                        _ => return Ok(None),
                    }
                    // Past the deadline a writer may take the notice for a
                    // dead gc's: stop deleting (the next run goes on).
                    if posted.elapsed() > NOTICE_DEADLINE {
                        return Ok(None);
                    }
                    writer.delete(key).await?;
                    progress.advance(*size);
                    Ok(Some(*size))
                }
            })
            .buffer_unordered(options.parallel.max(1))
            .collect()
            .await;
        results.extend(batch_results);
        writer.delete(&notice).await?;
    }
    progress.finish();
    for result in results {
        match result? {
            Some(size) => {
                report.chunks_deleted += 1;
                report.bytes_freed += size;
            }
            None => report.chunks_in_grace += 1,
        }
    }
    Ok(report)
}

/// Chunk keys announced per deletion notice.
const NOTICE_BATCH: usize = 1000;
/// gc deletes no chunk of a batch once the batch's notice is this old by its
/// own clock.
const NOTICE_DEADLINE: Duration = Duration::from_secs(60);
/// A notice older than this by the store's clock was left by a gc that died;
/// writers do not wait for it and gc removes it.
const NOTICE_STALE: Duration = Duration::from_secs(600);
/// How often a writer looks whether the notices it waits for are gone.
const NOTICE_POLL: Duration = Duration::from_millis(100);

fn notice_is_stale(posted: SystemTime) -> bool {
    SystemTime::now()
        .duration_since(posted)
        .is_ok_and(|age| age > NOTICE_STALE)
}

async fn remove_stale_notices(
    lister: &dyn ListStore,
    writer: &dyn WriteStore,
) -> Result<(), StoreError> {
    for notice in lister.list_info(layout::GC_NOTICES).await? {
        if notice_is_stale(notice.modified) {
            tracing::info!(notice = %notice.key, "removing the deletion notice of a gc that did not finish");
            writer.delete(&notice.key).await?;
        }
    }
    Ok(())
}

/// For writers (import, checkin): ends a pass over the chunks a commit will
/// reference, right before the commit. Makes every chunk put so far durable
/// (so that nothing slow is left between the pass's timing and the commit),
/// then confirms the refreshed chunks (`confirm_refreshed`): returns the chunks of `refreshed` that a gc
/// deleted meanwhile, which the writer must put again before it commits.
pub async fn finish_pass(
    store: &StoreHandle,
    refreshed: &[ChunkTag],
) -> Result<Vec<ChunkTag>, StoreError> {
    store.writer("commit a version")?.sync().await?;
    confirm_refreshed(store, refreshed).await
}

/// Run after the chunks in `refreshed` were found older than a quarter of
/// the grace period and rewritten with `put_replace`, before the commit
/// that references them. A gc that looked
/// at one of them before the rewrite may still delete the rewritten object;
/// such a gc announced the deletion beforehand (a notice under
/// `gc/deleting/`). This waits until every notice naming one of `refreshed`
/// is gone (or stale), then returns the chunks of `refreshed` that are no
/// longer in the store: the caller writes them again before it commits.
async fn confirm_refreshed(
    store: &StoreHandle,
    refreshed: &[ChunkTag],
) -> Result<Vec<ChunkTag>, StoreError> {
    if refreshed.is_empty() {
        return Ok(Vec::new());
    }
    // A store that cannot list cannot be collected either.
    let Some(lister) = store.lister() else {
        return Ok(Vec::new());
    };
    let wanted: HashSet<String> = refreshed.iter().map(layout::chunk).collect();
    // Notices posted after this listing come from gc runs that look at the
    // chunks after they were refreshed: only the ones listed now matter.
    let mut blocking = HashSet::new();
    for notice in lister.list_info(layout::GC_NOTICES).await? {
        if notice_is_stale(notice.modified) {
            continue;
        }
        let body = match store.reader().get(&notice.key).await {
            Ok(body) => body,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        if String::from_utf8_lossy(&body)
            .lines()
            .any(|key| wanted.contains(key))
        {
            blocking.insert(notice.key);
        }
    }
    if !blocking.is_empty() {
        tracing::info!(
            notices = blocking.len(),
            "garbage collection is deleting chunks this commit reuses; waiting for it to finish"
        );
    }
    while !blocking.is_empty() {
        tokio::time::sleep(NOTICE_POLL).await;
        let present: HashSet<String> = lister
            .list_info(layout::GC_NOTICES)
            .await?
            .into_iter()
            .filter(|notice| !notice_is_stale(notice.modified))
            .map(|notice| notice.key)
            .collect();
        blocking.retain(|key| present.contains(key));
    }
    let writer = store.writer("confirm chunks")?;
    let mut missing = Vec::new();
    let mut checks = futures::stream::iter(refreshed)
        .map(|tag| async move {
            let gone = writer.modified(&layout::chunk(tag)).await?.is_none();
            Ok::<_, StoreError>(gone.then_some(*tag))
        })
        .buffer_unordered(16);
    while let Some(checked) = checks.next().await {
        missing.extend(checked?);
    }
    if !missing.is_empty() {
        tracing::warn!(
            chunks = missing.len(),
            "garbage collection deleted chunks this commit reuses while they were refreshed; writing them again"
        );
    }
    Ok(missing)
}

/// Deletes `plan.delete` (oldest first) with their traces, after writing the
/// `oldest` hint; also repairs a missing or stale hint and removes traces left
/// without a manifest below the oldest version.
async fn delete_versions(
    store: &StoreHandle,
    lister: &dyn ListStore,
    writer: &dyn crate::store::WriteStore,
    plan: &Plan,
) -> Result<(), GcError> {
    let Some(&oldest_kept) = plan.versions.get(plan.delete.len()) else {
        return Ok(());
    };
    let hint = parcel::read_oldest_hint(store, &plan.name).await?;
    let write_hint = |version: u64| async move {
        writer
            .put_replace(
                &layout::oldest_hint(&plan.name),
                Bytes::from(format!("{version}\n")),
            )
            .await
    };
    if oldest_kept > 1 && hint != Some(oldest_kept) {
        write_hint(oldest_kept).await?;
    }
    for &version in &plan.delete {
        writer
            .delete(&layout::manifest(&plan.name, version))
            .await?;
        writer.delete(&layout::trace(&plan.name, version)).await?;
    }
    // Traces of versions that are gone (an interrupted earlier gc).
    let prefix = layout::versions(&plan.name);
    for key in lister.list(&prefix).await? {
        let stray = key
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".trace"))
            .and_then(|number| number.parse::<u64>().ok())
            .is_some_and(|version| version < oldest_kept);
        if stray {
            writer.delete(&key).await?;
        }
    }
    // Another gc at the same time may have deleted more: point at what is there.
    let remaining = parcel::list_versions(store, &plan.name).await?;
    if let Some(&oldest) = remaining.first()
        && oldest != oldest_kept
        && oldest > 1
    {
        write_hint(oldest).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::ImportSettings;
    use crate::import::{ImportRequest, import};
    use crate::keys::{KdfParams, Zeroizing};
    use crate::progress::NoProgress;
    use crate::store::ReadStore;
    use crate::store::memory::MemoryStore;
    use std::path::Path;

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
        assert_eq!(memory.count("chunks/"), 16);
        let unlocker = WithCredentials(credentials(PASS));

        // Dry run: nothing changes, the plan is reported.
        let snapshot = store.lister().unwrap().list("").await.unwrap();
        let dry = GcOptions {
            dry_run: true,
            ..options(Some(1), Duration::ZERO)
        };
        let report = collect(&store, &dry, &unlocker, &NoProgress).await.unwrap();
        assert_eq!(report.parcels[0].deleted_versions, vec![1, 2]);
        assert_eq!(report.chunks_deleted, 8);
        assert_eq!(store.lister().unwrap().list("").await.unwrap(), snapshot);

        // Young chunks survive the default grace even once unreferenced.
        let one_day = options(Some(1), Duration::from_secs(86_400));
        let report = collect(&store, &one_day, &unlocker, &NoProgress)
            .await
            .unwrap();
        assert_eq!(report.parcels[0].deleted_versions, vec![1, 2]);
        assert_eq!((report.chunks_deleted, report.chunks_in_grace), (0, 8));
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
        assert_eq!((report.chunks_deleted, report.chunks_referenced), (8, 8));
        assert_eq!(memory.count("chunks/"), 8);
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
        assert_eq!(report.chunks_deleted, 4, "only B's chunks");
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
        assert_eq!((report.chunks_deleted, report.chunks_in_grace), (0, 8));
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
        assert_eq!(report.chunks_deleted, 8);
        let announced = announced.lock().unwrap().clone();
        assert_eq!(announced.len(), 8);
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
        assert_eq!(refreshed.len(), 8);
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
        assert_eq!(report.chunks_deleted, 8);
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
