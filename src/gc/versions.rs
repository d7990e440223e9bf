//! Which versions of a parcel gc deletes, and deleting them.
//!
//! Invariants: only a *contiguous oldest prefix* of a parcel's versions is
//! deleted — the first version that must be kept (among the newest
//! `keep_last`, younger than `keep_days`, the lock's `base_version`, or the
//! newest) stops the deletion, and with neither option nothing is deleted.
//! The `versions/oldest` hint is pointed at the oldest kept version *before*
//! any manifest goes, so that stores that cannot list always find the
//! versions by probing from it (see [`crate::parcel::list_versions`]); a
//! version's trace goes with its manifest.

use std::future::Future;

use bytes::Bytes;

use super::GcError;
use super::GcOptions;
use crate::layout;
use crate::parcel::{self, ParcelError};
use crate::store::{ListStore, StoreHandle, WriteStore};

/// Which versions to delete: the oldest prefix before the first version that
/// must be kept. `young(v)` says whether version `v` is younger than
/// `keep_days` (asked only when that option is set, oldest first).
pub(super) async fn plan_deletion<F, Fut>(
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

/// Deletes `delete` (an oldest prefix of `versions`, oldest first) of parcel
/// `name` with their traces, after writing the `oldest` hint; also repairs a
/// missing or stale hint and removes traces left without a manifest below
/// the oldest version.
pub(super) async fn delete_versions(
    store: &StoreHandle,
    lister: &dyn ListStore,
    writer: &dyn WriteStore,
    name: &str,
    versions: &[u64],
    delete: &[u64],
) -> Result<(), GcError> {
    let Some(&oldest_kept) = versions.get(delete.len()) else {
        return Ok(());
    };
    let hint = parcel::read_oldest_hint(store, name).await?;
    let write_hint = |version: u64| async move {
        writer
            .put_replace(
                &layout::oldest_hint(name),
                Bytes::from(format!("{version}\n")),
            )
            .await
    };
    if oldest_kept > 1 && hint != Some(oldest_kept) {
        write_hint(oldest_kept).await?;
    }
    for &version in delete {
        writer.delete(&layout::manifest(name, version)).await?;
        writer.delete(&layout::trace(name, version)).await?;
        writer.delete(&layout::working_set(name, version)).await?;
    }
    // Traces and working sets of versions that are gone (an interrupted earlier gc).
    let prefix = layout::versions(name);
    for key in lister.list(&prefix).await? {
        let stray = key
            .strip_prefix(&prefix)
            .and_then(|rest| {
                rest.strip_suffix(".trace")
                    .or_else(|| rest.strip_suffix(".wset"))
            })
            .and_then(|number| number.parse::<u64>().ok())
            .is_some_and(|version| version < oldest_kept);
        if stray {
            writer.delete(&key).await?;
        }
    }
    // Another gc at the same time may have deleted more: point at what is there.
    let remaining = parcel::list_versions(store, name).await?;
    if let Some(&oldest) = remaining.first()
        && oldest != oldest_kept
        && oldest > 1
    {
        write_hint(oldest).await?;
    }
    Ok(())
}
