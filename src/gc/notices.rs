//! Deletion notices: how gc and writers (import, checkin) agree on a chunk
//! that a writer reuses while gc deletes it. Both sides of the protocol live
//! here; [`finish_pass`] is all a writer calls.
//!
//! **The race.** An old chunk that no manifest references (an orphan) may be
//! reused by a writer, which refreshes it with
//! [`crate::store::WriteStore::put_replace`] so that its last-modified time
//! is new again. gc HEADs a chunk right before it deletes it; if its HEAD
//! saw the old time just before the writer's refresh landed, its DELETE
//! would remove the refreshed object. No store here has a delete conditional
//! on the last-modified time (S3 has it only for directory buckets; an ETag
//! condition cannot tell a refresh of identical bytes apart), and
//! object_store offers no conditional delete.
//!
//! **The protocol.**
//! - gc ([`Notice::post`]) writes a notice `gc/deleting/<random id>` listing
//!   a batch of up to [`NOTICE_BATCH`] chunk keys *before* it HEADs any of
//!   them, deletes what is still old, then removes the notice
//!   ([`Notice::remove`]). It deletes nothing under a notice older than
//!   [`NOTICE_DEADLINE`] by its own clock ([`Notice::past_deadline`]), and
//!   removes notices older than [`NOTICE_STALE`] by the store's clock, left
//!   by a gc that died ([`remove_stale_notices`]).
//! - A writer, after its refreshes and right before its commit
//!   ([`finish_pass`]), syncs the store, lists the notices and waits while
//!   one that names a chunk it refreshed is there (ignoring stale ones);
//!   then it HEADs its refreshed chunks and is told which are gone, to write
//!   them again (import runs another pass; checkin clears their journal
//!   entries and confirms again).
//!
//! **Why that is enough.** A notice the writer's listing does not show was
//! either posted after the refreshes — so that gc's HEAD, which comes after
//! the notice, sees the new time and keeps the chunk — or already removed,
//! so its deletes are done and the writer's HEAD sees them. A notice posted
//! after the listing concerns a gc that looks at the chunks after they were
//! refreshed, so the writer waits only for the notices it listed. Writers
//! pay one LIST per commit that refreshed anything (reusing orphans is
//! rare), gc two small requests per 1,000 chunks deleted. The sync is
//! inside the writer's timed pass so that a slow sync cannot land the commit
//! more than `G/2` after the confirmation (see docs/decisions.md, "Garbage
//! collection: a grace period instead of a lock").

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::StreamExt;

use crate::chunk::ChunkTag;
use crate::layout;
use crate::store::{ListStore, StoreError, StoreHandle, WriteStore};

/// Chunk keys announced per deletion notice.
pub(super) const NOTICE_BATCH: usize = 1000;
/// gc deletes no chunk of a batch once the batch's notice is this old by its
/// own clock.
const NOTICE_DEADLINE: Duration = Duration::from_secs(60);
/// A notice older than this by the store's clock was left by a gc that died;
/// writers do not wait for it and gc removes it.
pub(super) const NOTICE_STALE: Duration = Duration::from_secs(600);
/// How often a writer looks whether the notices it waits for are gone.
const NOTICE_POLL: Duration = Duration::from_millis(100);

fn notice_is_stale(posted: SystemTime) -> bool {
    SystemTime::now()
        .duration_since(posted)
        .is_ok_and(|age| age > NOTICE_STALE)
}

/// gc's side: a notice posted for one batch of chunks it is about to look at.
pub(super) struct Notice {
    key: String,
    posted: Instant,
}

impl Notice {
    /// Announces `keys` (chunk keys) before gc HEADs any of them.
    pub(super) async fn post(writer: &dyn WriteStore, keys: &[&str]) -> Result<Self, StoreError> {
        let key = layout::gc_notice(&format!("{:032x}", rand::random::<u128>()));
        writer.put_new(&key, Bytes::from(keys.join("\n"))).await?;
        Ok(Notice {
            key,
            posted: Instant::now(),
        })
    }

    /// Past this point a writer may take the notice for a dead gc's: gc
    /// deletes no more chunks under it (the next run goes on).
    pub(super) fn past_deadline(&self) -> bool {
        self.posted.elapsed() > NOTICE_DEADLINE
    }

    /// Removes the notice once the batch's deletes are done.
    pub(super) async fn remove(self, writer: &dyn WriteStore) -> Result<(), StoreError> {
        writer.delete(&self.key).await
    }
}

/// gc's side: removes the notices of gc runs that died before removing them.
pub(super) async fn remove_stale_notices(
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
pub(super) async fn confirm_refreshed(
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
