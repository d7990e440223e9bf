//! Changes to a parcel that are not sessions: rolling back to an earlier
//! version, re-wrapping the parcel key under a new passphrase or key file,
//! and deleting a parcel.
//! (Garbage collection is [`crate::gc`].)

use serde::Serialize;

use crate::keys::{self, Credential, KdfParams, KeyError};
use crate::layout;
use crate::manifest::{Manifest, Timestamp};
use crate::parcel::{self, LockRecord, OpenParcel, ParcelError};
use crate::session::{self, SessionError};
use crate::store::StoreHandle;

/// What a rollback committed.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackSummary {
    /// Parcel.
    pub parcel: String,
    /// The new version.
    pub version: u64,
    /// The version whose content it has (its parent).
    pub parent: u64,
    /// Its message.
    pub message: String,
}

/// Commits a new version (newest + 1) with the content of `version`, its
/// parent. Takes the parcel's lock first, naming `version` as its base so that
/// garbage collection keeps that version's chunks until the commit (see
/// [`crate::gc`]); the manifest carries the lock's nonce; the lock is released
/// afterwards, also on failure. No chunk is uploaded: they are `version`'s.
pub async fn rollback(
    store: &StoreHandle,
    parcel: &OpenParcel,
    version: u64,
    message: Option<String>,
) -> Result<RollbackSummary, SessionError> {
    store.writer("roll back a parcel")?;
    parcel::resolve_version(store, &parcel.name, Some(version)).await?;
    let lock = session::take_lock(store, &parcel.name, Some(version)).await?;
    let result = commit_copy(store, parcel, version, message, &lock).await;
    let released = release(store, &parcel.name, &lock).await;
    let summary = result?;
    released?;
    Ok(summary)
}

async fn commit_copy(
    store: &StoreHandle,
    parcel: &OpenParcel,
    version: u64,
    message: Option<String>,
    lock: &LockRecord,
) -> Result<RollbackSummary, SessionError> {
    let name = &parcel.name;
    let source = parcel::read_manifest(store, parcel, version).await?;
    let newest = parcel::resolve_version(store, name, None).await?;
    let mut nonce = [0u8; 16];
    hex::decode_to_slice(&lock.nonce, &mut nonce).map_err(|_| ParcelError::BadRecord {
        name: name.clone(),
        reason: format!("lock nonce {:?} is not 32 hex digits", lock.nonce),
    })?;
    let message = message.unwrap_or_else(|| format!("rollback to version {version}"));
    let manifest = Manifest {
        version: newest + 1,
        parent: Some(version),
        created: Timestamp::now(),
        lock_nonce: Some(nonce),
        host: crate::parcel::host_name(),
        message: message.clone(),
        chunk_size: source.chunk_size,
        entries: source.entries,
    };
    // Someone may have broken the lock meanwhile: then do not commit.
    match parcel::read_lock(store, name).await? {
        Some(current) if current.nonce == lock.nonce => {}
        other => {
            return Err(SessionError::LockLost {
                name: name.clone(),
                detail: other.map_or("no lock is held now".into(), |l| {
                    format!("now held by {} on {} since {}", l.holder, l.host, l.since)
                }),
            });
        }
    }
    parcel::commit(store, parcel, &manifest).await?;
    Ok(RollbackSummary {
        parcel: name.clone(),
        version: manifest.version,
        parent: version,
        message,
    })
}

/// Deletes the parcel's lock if it is still `lock`.
async fn release(store: &StoreHandle, name: &str, lock: &LockRecord) -> Result<(), SessionError> {
    match parcel::read_lock(store, name).await? {
        Some(current) if current.nonce == lock.nonce => {
            store
                .writer("release the lock")?
                .delete(&layout::lock(name))
                .await?;
            Ok(())
        }
        _ => Ok(()),
    }
}

/// What [`delete`] removed.
#[derive(Debug, Clone, Serialize)]
pub struct DeleteSummary {
    /// Parcel.
    pub parcel: String,
    /// Versions whose manifests were deleted.
    pub versions: Vec<u64>,
    /// Objects deleted in all (manifests, traces, keyslots, record).
    pub objects: u64,
}

/// Deletes parcel `name`: every object under `parcels/<name>/` — versions
/// (newest first, so an interrupted delete leaves contiguous versions),
/// traces, keyslots, and the record last. Chunks are left to
/// [`crate::gc`]. Takes the parcel's lock first, so a resumed parcel is
/// refused ([`ParcelError::Locked`]) and no resume can start meanwhile.
/// Works without the parcel's credentials, also on a parcel whose import
/// never committed a version (or wrote no keyslot).
pub async fn delete(store: &StoreHandle, name: &str) -> Result<DeleteSummary, SessionError> {
    let writer = store.writer("delete a parcel")?.clone();
    let lister = store
        .lister()
        .ok_or_else(|| crate::store::StoreError::Unsupported {
            store: store.url().to_owned(),
            operation: "delete a parcel",
            hint: "this store cannot list its objects",
        })?
        .clone();
    parcel::require_record(store, name).await?;
    let lock = session::take_lock(store, name, None).await?;
    let versions = parcel::list_versions(store, name).await?;
    let mut objects = 0;
    for &version in versions.iter().rev() {
        writer.delete(&layout::manifest(name, version)).await?;
        objects += 1;
    }
    let prefix = format!("{}{name}/", layout::PARCELS);
    let (record, lock_key) = (layout::record(name), layout::lock(name));
    for key in lister.list(&prefix).await? {
        if key != record && key != lock_key {
            writer.delete(&key).await?;
            objects += 1;
        }
    }
    writer.delete(&record).await?;
    objects += 1;
    release(store, name, &lock).await?;
    Ok(DeleteSummary {
        parcel: name.to_owned(),
        versions,
        objects,
    })
}

/// What a change of credentials did.
#[derive(Debug, Clone, Serialize)]
pub struct PasswdSummary {
    /// Parcel.
    pub parcel: String,
    /// Number of the new keyslot.
    pub new_slot: u32,
    /// "passphrase" or "key file".
    pub new_kind: &'static str,
    /// Keyslots deleted: the one the current credentials opened (and, with
    /// `replace_all`, every other).
    pub removed_slots: Vec<u32>,
    /// Other keyslots left as they were.
    pub kept_slots: Vec<u32>,
}

/// Re-wraps the parcel's secrets under `new`: unlocks with `current`, writes a
/// new keyslot at a free number, checks that it opens, and only then deletes
/// the keyslot `current` opened (with `replace_all`, every other keyslot too).
/// A crash in between leaves both the old and the new credential working.
/// Chunks and manifests are untouched: the parcel key itself does not change.
pub async fn change_credential(
    store: &StoreHandle,
    name: &str,
    current: &[Credential],
    new: &Credential,
    kdf: KdfParams,
    replace_all: bool,
) -> Result<PasswdSummary, ParcelError> {
    let writer = store.writer("change a parcel's passphrase")?.clone();
    let (parcel, used) = parcel::open_slot(store, name, current).await?;
    let written = parcel::write_keyslots(store, &parcel, std::slice::from_ref(new), kdf).await?;
    let new_slot = written[0];
    let slots = parcel::read_keyslots(store, name).await?;
    let new_only: Vec<(u32, Vec<u8>)> = slots
        .iter()
        .filter(|(number, _)| *number == new_slot)
        .cloned()
        .collect();
    let reopened = keys::unlock(name, &parcel.id, &new_only, new)?;
    if reopened.parcel_key != parcel.secrets.parcel_key {
        return Err(KeyError::CorruptSlot {
            parcel: name.to_owned(),
            slot: new_slot,
            reason: "the new keyslot does not hold the parcel key just written".into(),
        }
        .into());
    }
    let (removed_slots, kept_slots): (Vec<u32>, Vec<u32>) = slots
        .iter()
        .map(|(number, _)| *number)
        .filter(|&number| number != new_slot)
        .partition(|&number| replace_all || number == used);
    for &number in &removed_slots {
        writer.delete(&layout::keyslot(name, number)).await?;
    }
    Ok(PasswdSummary {
        parcel: name.to_owned(),
        new_slot,
        new_kind: match new {
            Credential::Passphrase(_) => "passphrase",
            Credential::KeyFile { .. } => "key file",
        },
        removed_slots,
        kept_slots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Zeroizing;
    use crate::store::memory::MemoryStore;

    const CHEAP: KdfParams = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    fn pass(text: &str) -> Credential {
        Credential::Passphrase(Zeroizing::new(text.to_owned()))
    }

    async fn parcel_with_one_version(store: &StoreHandle) -> OpenParcel {
        parcel::testing::parcel_with_one_version(store, &[pass("old"), pass("other")]).await
    }

    #[tokio::test]
    async fn passwd_replaces_the_slot_that_opened() {
        let store = StoreHandle::full(MemoryStore::new());
        parcel_with_one_version(&store).await;
        let summary = change_credential(&store, "p", &[pass("old")], &pass("new"), CHEAP, false)
            .await
            .unwrap();
        assert_eq!(
            (summary.new_slot, summary.removed_slots, summary.kept_slots),
            (2, vec![0], vec![1])
        );
        assert!(matches!(
            parcel::open(&store, "p", &[pass("old")]).await,
            Err(ParcelError::Key(KeyError::WrongPassphrase { .. }))
        ));
        parcel::open(&store, "p", &[pass("new")]).await.unwrap();
        parcel::open(&store, "p", &[pass("other")]).await.unwrap();

        let summary = change_credential(&store, "p", &[pass("new")], &pass("last"), CHEAP, true)
            .await
            .unwrap();
        assert_eq!(summary.new_slot, 0, "the first free number");
        assert_eq!(summary.removed_slots, vec![1, 2]);
        assert!(parcel::open(&store, "p", &[pass("other")]).await.is_err());
        assert_eq!(parcel::read_keyslots(&store, "p").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn rollback_commits_a_copy_and_releases_the_lock() {
        let store = StoreHandle::full(MemoryStore::new());
        let parcel = parcel_with_one_version(&store).await;
        let summary = rollback(&store, &parcel, 1, None).await.unwrap();
        assert_eq!((summary.version, summary.parent), (2, 1));
        let copy = parcel::read_manifest(&store, &parcel, 2).await.unwrap();
        assert_eq!(copy.parent, Some(1));
        assert_eq!(copy.message, "rollback to version 1");
        assert!(copy.lock_nonce.is_some());
        assert!(parcel::read_lock(&store, "p").await.unwrap().is_none());

        let held = session::take_lock(&store, "p", None).await.unwrap();
        assert!(matches!(
            rollback(&store, &parcel, 1, None).await,
            Err(SessionError::Parcel(ParcelError::Locked { .. }))
        ));
        assert_eq!(
            parcel::read_lock(&store, "p").await.unwrap().unwrap().nonce,
            held.nonce,
            "someone else's lock is left alone"
        );
        assert!(matches!(
            rollback(&store, &parcel, 7, None).await,
            Err(SessionError::Parcel(ParcelError::VersionNotFound { .. }))
        ));
    }
}
