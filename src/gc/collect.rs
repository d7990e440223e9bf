//! [`collect`]: one gc run over a whole store, as a sequence of phases.
//!
//! 1. [`survey`]: per parcel, unlock it, plan which versions go
//!    ([`super::versions::plan_deletion`]) and read the chunks of the
//!    versions that stay. A parcel that does not unlock, or a manifest that
//!    does not read, is a problem.
//! 2. Delete versions ([`super::versions::delete_versions`]), only if there
//!    is no problem and this is no dry run.
//! 3. [`list_chunks`], take the reference time `T`, then
//!    [`add_committed_meanwhile`]: re-list every parcel's lock and versions
//!    and add the chunks of versions committed since phase 1.
//! 4. [`sort_chunks`]: referenced, in grace (modified less than `G` before
//!    `T`), or doomed.
//! 5. [`delete_chunks`]: announce each batch with a notice, HEAD and delete
//!    what is still old ([`super::notices`]).
//!
//! Invariants: any problem stops every deletion that has not happened yet
//! (versions are deleted only if phase 1 found none; chunks only if phases 1
//! and 3 found none), and the report still says what gc would have done.
//! `T` is taken after the chunks are listed and before the re-listing, and
//! every chunk's time is checked again against `T` right before its delete.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use futures::StreamExt;

use super::notices::{self, Notice};
use super::versions::{delete_versions, plan_deletion};
use super::{GcError, GcOptions, GcProblem, GcReport, ParcelGc, UnlockError, Unlocker};
use crate::chunk::ChunkTag;
use crate::error::{Classify, ErrorClass};
use crate::layout;
use crate::parcel::{self, OpenParcel, ParcelError};
use crate::progress::Progress;
use crate::store::{ListStore, StoreError, StoreHandle, WriteStore};

/// One parcel's plan.
struct Plan {
    name: String,
    versions: Vec<u64>,
    delete: Vec<u64>,
    /// Versions whose chunks are in the referenced set.
    read: HashSet<u64>,
    /// The base version of the parcel's lock, if it is locked.
    base: Option<u64>,
}

/// What phase 1 found.
struct Survey {
    /// Per parcel, in the order of the listing.
    plans: Vec<Plan>,
    /// The parcels unlocked so far.
    opened: BTreeMap<String, OpenParcel>,
    /// Chunks referenced by the versions read so far.
    referenced: HashSet<ChunkTag>,
    /// What keeps gc from deleting anything.
    problems: Vec<GcProblem>,
}

/// A chunk object as listed.
struct StoredChunk {
    tag: ChunkTag,
    key: String,
    size: u64,
    modified: SystemTime,
}

/// gc's age rule: old enough to delete if last modified more than the grace
/// period before the reference time.
#[derive(Clone, Copy)]
struct Age {
    reference_time: SystemTime,
    grace: Duration,
}

impl Age {
    fn is_old(self, modified: SystemTime) -> bool {
        self.reference_time
            .duration_since(modified)
            .is_ok_and(|age| age > self.grace)
    }
}

/// The listed chunks, sorted by phase 4.
struct Sorted {
    /// How many are referenced.
    referenced: u64,
    /// How many are unreferenced but younger than the grace period.
    in_grace: u64,
    /// Unreferenced and old: to delete.
    doomed: Vec<StoredChunk>,
}

/// What phase 5 did.
struct Swept {
    deleted: u64,
    bytes_freed: u64,
    /// Doomed chunks found refreshed (or gone) at their HEAD, or left because
    /// their notice passed its deadline.
    kept: u64,
}

/// Runs garbage collection over every parcel of `store`.
pub async fn collect<U: Unlocker>(
    store: &StoreHandle,
    options: &GcOptions,
    unlocker: &U,
    progress: &dyn Progress,
) -> Result<GcReport, GcError> {
    let lister = store.lister().ok_or_else(|| StoreError::Unsupported {
        store: store.url().to_owned(),
        operation: "collect garbage",
        hint: "gc must list every parcel and chunk, which HTTP cannot; run it against the store itself (a directory or s3://)",
    })?;
    let writer = if options.dry_run {
        None
    } else {
        Some(store.writer("collect garbage")?)
    };

    // Phase 1: unlock every parcel, plan, and read the manifests that stay.
    let mut survey = survey(store, options, unlocker).await?;
    let deleting = writer.is_some() && survey.problems.is_empty();
    let mut report = GcReport {
        store: store.url().to_owned(),
        dry_run: options.dry_run,
        applied: deleting,
        grace_secs: options.grace.as_secs(),
        parcels: survey.plans.iter().map(parcel_report).collect(),
        chunks_swept: false,
        chunks_before: 0,
        chunks_referenced: 0,
        chunks_deleted: 0,
        bytes_freed: 0,
        chunks_in_grace: 0,
        problems: std::mem::take(&mut survey.problems),
    };

    // Phase 2: delete versions, oldest first, after pointing the hint past them.
    if let Some(writer) = writer.filter(|_| deleting) {
        for plan in &survey.plans {
            delete_versions(
                store,
                lister.as_ref(),
                writer.as_ref(),
                &plan.name,
                &plan.versions,
                &plan.delete,
            )
            .await?;
        }
    }
    if !report.problems.is_empty() {
        return Ok(report);
    }

    // Phase 3: chunks. List them, take the reference time, then re-list every
    // parcel's lock and versions and add what was committed meanwhile.
    let chunks = list_chunks(lister.as_ref()).await?;
    report.chunks_before = chunks.len() as u64;
    let age = Age {
        reference_time: SystemTime::now(),
        grace: options.grace,
    };
    let deleted_by_us: HashSet<(String, u64)> = if deleting {
        survey
            .plans
            .iter()
            .flat_map(|p| p.delete.iter().map(|&v| (p.name.clone(), v)))
            .collect()
    } else {
        HashSet::new()
    };
    let problems = add_committed_meanwhile(store, unlocker, &mut survey, &deleted_by_us).await?;
    report.problems.extend(problems);
    if !report.problems.is_empty() {
        return Ok(report);
    }

    // Phase 4: which chunks go.
    report.chunks_swept = true;
    let sorted = sort_chunks(chunks, &survey.referenced, age);
    report.chunks_referenced = sorted.referenced;
    report.chunks_in_grace = sorted.in_grace;
    let Some(writer) = writer else {
        report.chunks_deleted = sorted.doomed.len() as u64;
        report.bytes_freed = sorted.doomed.iter().map(|c| c.size).sum();
        return Ok(report);
    };

    // Phase 5: delete them under notices.
    let swept = delete_chunks(
        lister.as_ref(),
        writer.as_ref(),
        &sorted.doomed,
        age,
        options.parallel,
        progress,
    )
    .await?;
    report.chunks_deleted += swept.deleted;
    report.bytes_freed += swept.bytes_freed;
    report.chunks_in_grace += swept.kept;
    Ok(report)
}

fn parcel_report(plan: &Plan) -> ParcelGc {
    ParcelGc {
        name: plan.name.clone(),
        deleted_versions: plan.delete.clone(),
        kept_versions: plan.versions[plan.delete.len()..].to_vec(),
        locked_base_version: plan.base,
    }
}

/// Phase 1: every parcel's plan, and the chunks of the versions it keeps.
async fn survey<U: Unlocker>(
    store: &StoreHandle,
    options: &GcOptions,
    unlocker: &U,
) -> Result<Survey, GcError> {
    let mut survey = Survey {
        plans: Vec::new(),
        opened: BTreeMap::new(),
        referenced: HashSet::new(),
        problems: Vec::new(),
    };
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
                    survey.problems.push(unlock_problem(&name, &error));
                    None
                }
            }
        };
        let mut plan = Plan {
            name: name.clone(),
            delete: Vec::new(),
            read: HashSet::new(),
            versions,
            base,
        };
        if let Some(open) = &open {
            plan_and_read(store, options, open, now, &mut plan, &mut survey).await;
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
            survey.opened.insert(name, open);
        }
        survey.plans.push(plan);
    }
    Ok(survey)
}

/// Phase 1 for an unlocked parcel: fills `plan.delete` (ages read from the
/// manifests as of `now`), then reads every version kept into
/// `survey.referenced` and `plan.read`. Unreadable manifests are problems.
async fn plan_and_read(
    store: &StoreHandle,
    options: &GcOptions,
    open: &OpenParcel,
    now: SystemTime,
    plan: &mut Plan,
    survey: &mut Survey,
) {
    let name = &plan.name;
    let keep_days = options.keep_days.unwrap_or(0);
    let young = |version: u64| async move {
        let manifest = parcel::read_manifest(store, open, version).await?;
        let age = now
            .duration_since(manifest.created.to_system_time())
            .unwrap_or(Duration::ZERO);
        Ok(age < Duration::from_secs(keep_days.saturating_mul(86_400)))
    };
    match plan_deletion(&plan.versions, options, plan.base, young).await {
        Ok(delete) => plan.delete = delete,
        Err((version, error)) => {
            survey
                .problems
                .push(manifest_problem(name, version, &error));
        }
    }
    for &version in &plan.versions[plan.delete.len()..] {
        match add_chunks(store, open, version, &mut survey.referenced).await {
            Ok(()) => {
                plan.read.insert(version);
            }
            Err(error) => {
                survey
                    .problems
                    .push(manifest_problem(name, version, &error));
            }
        }
    }
}

/// Phase 3: every chunk object of the store (keys that are not a chunk's
/// canonical key are ignored).
async fn list_chunks(lister: &dyn ListStore) -> Result<Vec<StoredChunk>, StoreError> {
    let listed = lister.list_info(layout::CHUNKS).await?;
    Ok(listed
        .into_iter()
        .filter_map(|object| {
            let hex = object.key.strip_prefix(layout::CHUNKS)?.split_once('/')?.1;
            let tag = ChunkTag::from_hex(hex)?;
            (layout::chunk(&tag) == object.key).then_some(StoredChunk {
                tag,
                key: object.key,
                size: object.size,
                modified: object.modified,
            })
        })
        .collect())
}

/// Phase 3, after the reference time: re-lists every parcel's lock and
/// versions and adds to `survey.referenced` the chunks of versions not read
/// in phase 1 (committed meanwhile, or of a parcel that had none). Returns
/// the problems: a lock whose base version is gone (one of
/// `deleted_by_us`, or below the oldest), a parcel that does not unlock, a
/// manifest that does not read.
async fn add_committed_meanwhile<U: Unlocker>(
    store: &StoreHandle,
    unlocker: &U,
    survey: &mut Survey,
    deleted_by_us: &HashSet<(String, u64)>,
) -> Result<Vec<GcProblem>, GcError> {
    let mut problems = Vec::new();
    for name in parcel::list_parcels(store).await? {
        let lock = parcel::read_lock(store, &name).await?;
        let versions = parcel::list_versions(store, &name).await?;
        if let Some(base) = lock.as_ref().and_then(|l| l.base_version)
            && (deleted_by_us.contains(&(name.clone(), base))
                || versions.first().is_some_and(|&oldest| base < oldest))
        {
            problems.push(problem(
                &name,
                format!(
                    "parcel {name} was resumed from version {base} while gc deleted that version; its session still needs the version's chunks, so gc deleted no chunk this time: run gc again after the session is checked in or discarded"
                ),
                ErrorClass::Conflict,
            ));
            continue;
        }
        let plan = survey.plans.iter().find(|p| p.name == name);
        if versions.is_empty() {
            continue;
        }
        let open = match survey.opened.get(&name) {
            Some(open) => open.clone(),
            None => match unlocker.unlock(store, &name).await {
                Ok(open) => {
                    survey.opened.insert(name.clone(), open.clone());
                    open
                }
                Err(error) => {
                    problems.push(unlock_problem(&name, &error));
                    continue;
                }
            },
        };
        for version in versions {
            // Already counted, or to be deleted (still there in a dry run).
            if plan.is_some_and(|p| p.read.contains(&version) || p.delete.contains(&version)) {
                continue;
            }
            match add_chunks(store, &open, version, &mut survey.referenced).await {
                Ok(()) => {}
                // Deleted meanwhile (by another gc): it no longer needs its chunks.
                Err(ParcelError::VersionNotFound { .. }) => {}
                Err(error) => problems.push(manifest_problem(&name, version, &error)),
            }
        }
    }
    Ok(problems)
}

/// Phase 4: referenced chunks stay; of the others, those old by `age` are
/// doomed (in listing order) and the rest are in grace.
fn sort_chunks(chunks: Vec<StoredChunk>, referenced: &HashSet<ChunkTag>, age: Age) -> Sorted {
    let mut sorted = Sorted {
        referenced: 0,
        in_grace: 0,
        doomed: Vec::new(),
    };
    for chunk in chunks {
        if referenced.contains(&chunk.tag) {
            sorted.referenced += 1;
        } else if age.is_old(chunk.modified) {
            sorted.doomed.push(chunk);
        } else {
            sorted.in_grace += 1;
        }
    }
    sorted
}

/// Phase 5: deletes `doomed` in batches, each announced by a notice before
/// any of its chunks is looked at; a chunk goes only if its HEAD still finds
/// it old by `age` and the notice is within its deadline. A failed HEAD or
/// DELETE of one chunk does not stop the others: the first such error is
/// returned once every batch is done.
async fn delete_chunks(
    lister: &dyn ListStore,
    writer: &dyn WriteStore,
    doomed: &[StoredChunk],
    age: Age,
    parallel: usize,
    progress: &dyn Progress,
) -> Result<Swept, StoreError> {
    progress.start("deleting", doomed.iter().map(|c| c.size).sum());
    notices::remove_stale_notices(lister, writer).await?;
    let mut results: Vec<Result<Option<u64>, StoreError>> = Vec::new();
    for batch in doomed.chunks(notices::NOTICE_BATCH) {
        // Announce the batch before looking at any of its chunks: a writer
        // that refreshed one of them and then does not see this notice
        // refreshed it before the HEAD below, which then sees the new time.
        let keys: Vec<&str> = batch.iter().map(|c| c.key.as_str()).collect();
        let notice = Notice::post(writer, &keys).await?;
        let announced = &notice;
        let batch_results: Vec<_> = futures::stream::iter(batch)
            .map(|chunk| async move {
                // Refreshed since the listing (a writer reuses it), or gone.
                match writer.modified(&chunk.key).await? {
                    Some(modified) if age.is_old(modified) => {}
                    _ => return Ok(None),
                }
                // Past the deadline a writer may take the notice for a
                // dead gc's: stop deleting (the next run goes on).
                if announced.past_deadline() {
                    return Ok(None);
                }
                writer.delete(&chunk.key).await?;
                progress.advance(chunk.size);
                Ok(Some(chunk.size))
            })
            .buffer_unordered(parallel.max(1))
            .collect()
            .await;
        results.extend(batch_results);
        notice.remove(writer).await?;
    }
    progress.finish();
    let mut swept = Swept {
        deleted: 0,
        bytes_freed: 0,
        kept: 0,
    };
    for result in results {
        match result? {
            Some(size) => {
                swept.deleted += 1;
                swept.bytes_freed += size;
            }
            None => swept.kept += 1,
        }
    }
    Ok(swept)
}

/// Adds the chunks `version` uses to `referenced`: its segments (format 2)
/// and the chunks of its files.
async fn add_chunks(
    store: &StoreHandle,
    open: &OpenParcel,
    version: u64,
    referenced: &mut HashSet<ChunkTag>,
) -> Result<(), ParcelError> {
    let stored = parcel::read_stored(store, open, version).await?;
    referenced.extend(stored.segment_refs().filter_map(|c| c.tag()));
    let manifest = parcel::assemble(store, open, stored).await?;
    for (_, _, chunks) in manifest.files() {
        referenced.extend(chunks.iter().filter_map(|c| c.tag()));
    }
    Ok(())
}

fn problem(parcel: &str, message: String, class: ErrorClass) -> GcProblem {
    GcProblem {
        parcel: parcel.to_owned(),
        message,
        class,
    }
}

fn unlock_problem(name: &str, error: &UnlockError) -> GcProblem {
    problem(
        name,
        format!(
            "parcel {name} cannot be unlocked ({error}); gc needs every parcel's key to read which chunks its versions use: give credentials that open it (ISR_PASSPHRASE, --passphrase-file or --key-file, or run on a terminal to be asked per parcel)"
        ),
        error.class(),
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
