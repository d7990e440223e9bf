//! Parcels in a store: the public parcel record, keyslots, versions and
//! the create-only commit of a version's manifest.
//!
//! ```text
//! chunks/<tt>/<tag-hex>                          immutable; create-only
//! parcels/<name>/parcel.toml                     public: format, id, chunk size, created
//! parcels/<name>/keyslots/<n>                    wrapped parcel secrets (see crate::keys)
//! parcels/<name>/versions/<0000000042>.manifest  create-only, encrypted (see crate::manifest)
//! parcels/<name>/versions/<0000000042>.trace     optional: access order of the session that made it
//! parcels/<name>/versions/oldest                 hint: the oldest version gc kept (decimal text)
//! parcels/<name>/lock                            create-only: holder, host, nonce, since
//! isr-store                                      marker written by `isrctl init` and parcel creation
//! ```
//!
//! A version exists exactly when its manifest object exists: committing is one
//! create-only put, so two clients racing for version N+1 cannot both win.
//! Versions are contiguous: they start at 1, and garbage collection
//! ([`crate::gc`]) only ever deletes the oldest ones, writing the first one it
//! kept into the `oldest` hint, so stores that cannot list find every version
//! by probing from the hint (see [`list_versions`]).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::chunk::{self, ChunkEncoder, ChunkRef, ChunkTag};
use crate::error::{Classify, ErrorClass};
use crate::keys::{self, Credential, KdfParams, KeyError, ParcelSecrets};
use crate::layout;
use crate::manifest::tree::{self, Root, Split};
use crate::manifest::{self, Manifest, ManifestError, Stored, Timestamp};
use crate::store::{PutOutcome, StoreError, StoreHandle};

/// Format of `parcel.toml` written by this build.
pub const RECORD_FORMAT: u32 = 1;
/// Keyslot numbers probed on stores that cannot list.
pub const MAX_KEYSLOTS: u32 = 8;

/// Errors about parcels and versions.
#[derive(Debug, thiserror::Error)]
pub enum ParcelError {
    /// The name is not usable.
    #[error(
        "invalid parcel name {name:?}: use 1–64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
    )]
    BadName {
        /// As given.
        name: String,
    },
    /// No such parcel.
    #[error("parcel {name} does not exist in store {store} (`isrctl ls` lists the parcels there)")]
    NotFound {
        /// Parcel.
        name: String,
        /// Store URL.
        store: String,
    },
    /// Creating a parcel that exists.
    #[error(
        "parcel {name} already exists; add a version with `isrctl import --new-version {name} PATH...` or choose another name"
    )]
    Exists {
        /// Parcel.
        name: String,
    },
    /// The parcel is locked by a session (or a rollback): nothing but the
    /// lock's holder may commit to it or change its keyslots.
    #[error(
        "parcel {name} is locked by {holder}@{host} since {since} (resumed there): check it in or discard it first; if that machine is gone, `isrctl unlock --force {name}` (its unsaved changes are then lost)"
    )]
    Locked {
        /// Parcel.
        name: String,
        /// Lock holder (user).
        holder: String,
        /// Host of the holder.
        host: String,
        /// Since.
        since: String,
    },
    /// The store named does not exist.
    #[error(
        "store {store} does not exist (check --store, ISR_STORE or the config's `store`; `isrctl init {store}` creates one)"
    )]
    StoreNotFound {
        /// Store URL.
        store: String,
    },
    /// The parcel has no committed version.
    #[error(
        "parcel {name} has no committed version yet (an import was interrupted: run the same `isrctl import` again to finish it)"
    )]
    NoVersions {
        /// Parcel.
        name: String,
    },
    /// The requested version does not exist.
    #[error("parcel {name} has no version {version} (`isrctl history {name}` lists its versions)")]
    VersionNotFound {
        /// Parcel.
        name: String,
        /// Version asked for.
        version: u64,
    },
    /// Someone else committed this version first.
    #[error(
        "version {version} of parcel {name} was committed by another client meanwhile; nothing of yours was lost — run the command again to commit on top of it"
    )]
    VersionExists {
        /// Parcel.
        name: String,
        /// Version number.
        version: u64,
    },
    /// `parcel.toml` cannot be understood.
    #[error("parcel record of {name} is corrupt: {reason}")]
    BadRecord {
        /// Parcel.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A store operation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Unlocking failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A manifest is invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

impl Classify for ParcelError {
    fn class(&self) -> ErrorClass {
        match self {
            ParcelError::BadName { .. } => ErrorClass::Invalid,
            ParcelError::NotFound { .. }
            | ParcelError::StoreNotFound { .. }
            | ParcelError::NoVersions { .. }
            | ParcelError::VersionNotFound { .. } => ErrorClass::NotFound,
            ParcelError::Exists { .. }
            | ParcelError::VersionExists { .. }
            | ParcelError::Locked { .. } => ErrorClass::Conflict,
            ParcelError::BadRecord { .. } => ErrorClass::Integrity,
            ParcelError::Store(e) => e.class(),
            ParcelError::Key(e) => e.class(),
            ParcelError::Manifest(e) => e.class(),
        }
    }
}

/// Checks a parcel name.
pub fn validate_name(name: &str) -> Result<(), ParcelError> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ParcelError::BadName {
            name: name.to_owned(),
        })
    }
}

/// The public `parcel.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParcelRecord {
    /// Record format ([`RECORD_FORMAT`]).
    pub format: u32,
    /// Random parcel id, 32 hex digits (bound into keyslots and manifests).
    pub id: String,
    /// Chunk size of every file, fixed at creation.
    pub chunk_size: u32,
    /// Creation time, RFC 3339.
    pub created: String,
}

impl ParcelRecord {
    /// The id as bytes.
    pub fn id_bytes(&self, name: &str) -> Result<[u8; 16], ParcelError> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(&self.id, &mut id).map_err(|_| ParcelError::BadRecord {
            name: name.to_owned(),
            reason: format!("id {:?} is not 32 hex digits", self.id),
        })?;
        Ok(id)
    }
}

/// The lock object of a resumed parcel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockRecord {
    /// User who holds it.
    pub holder: String,
    /// Host it was taken on.
    pub host: String,
    /// Random nonce, 32 hex digits; written into the manifest its holder commits.
    pub nonce: String,
    /// When it was taken, RFC 3339.
    pub since: String,
    /// The version the holder's session started from: `isrctl gc` keeps it
    /// (the session's unchanged chunks are that version's), and every newer
    /// one. A rollback's lock names the version it copies, for the same reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u64>,
}

/// A parcel whose secrets are unlocked.
#[derive(Debug, Clone)]
pub struct OpenParcel {
    /// Name.
    pub name: String,
    /// Public record.
    pub record: ParcelRecord,
    /// Id bytes.
    pub id: [u8; 16],
    /// Parcel key and dedup secret.
    pub secrets: ParcelSecrets,
}

/// Reads `parcel.toml`, or `None` when the parcel does not exist.
pub async fn read_record(
    store: &StoreHandle,
    name: &str,
) -> Result<Option<ParcelRecord>, ParcelError> {
    validate_name(name)?;
    let bytes = match store.reader().get(&layout::record(name)).await {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let bad = |reason: String| ParcelError::BadRecord {
        name: name.to_owned(),
        reason,
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("not UTF-8".into()))?;
    let record: ParcelRecord = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    if record.format != RECORD_FORMAT {
        return Err(bad(format!(
            "format {} is not supported (this isr reads format {RECORD_FORMAT}) — upgrade isr",
            record.format
        )));
    }
    chunk::validate_chunk_size(record.chunk_size).map_err(bad)?;
    record.id_bytes(name)?;
    Ok(Some(record))
}

/// Reads `parcel.toml`, failing when the parcel does not exist.
pub async fn require_record(store: &StoreHandle, name: &str) -> Result<ParcelRecord, ParcelError> {
    read_record(store, name)
        .await?
        .ok_or_else(|| ParcelError::NotFound {
            name: name.to_owned(),
            store: store.url().to_owned(),
        })
}

/// Every keyslot of the parcel as (number, bytes).
pub async fn read_keyslots(
    store: &StoreHandle,
    name: &str,
) -> Result<Vec<(u32, Vec<u8>)>, ParcelError> {
    let numbers: Vec<u32> = match store.lister() {
        Some(lister) => {
            let prefix = layout::keyslots(name);
            let mut numbers: Vec<u32> = lister
                .list(&prefix)
                .await?
                .iter()
                .filter_map(|key| key.strip_prefix(&prefix)?.parse().ok())
                .collect();
            numbers.sort_unstable();
            numbers
        }
        None => (0..MAX_KEYSLOTS).collect(),
    };
    let mut slots = Vec::new();
    for number in numbers {
        match store.reader().get(&layout::keyslot(name, number)).await {
            Ok(bytes) => slots.push((number, bytes.to_vec())),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(slots)
}

/// Unlocks the parcel with the first credential that opens one of its keyslots.
pub async fn open(
    store: &StoreHandle,
    name: &str,
    credentials: &[Credential],
) -> Result<OpenParcel, ParcelError> {
    open_slot(store, name, credentials)
        .await
        .map(|(parcel, _)| parcel)
}

/// Like [`open`], and also says which keyslot number opened (for `passwd`).
pub async fn open_slot(
    store: &StoreHandle,
    name: &str,
    credentials: &[Credential],
) -> Result<(OpenParcel, u32), ParcelError> {
    let record = require_record(store, name).await?;
    let id = record.id_bytes(name)?;
    let slots = read_keyslots(store, name).await?;
    if slots.is_empty() {
        return Err(ParcelError::NoVersions {
            name: name.to_owned(),
        });
    }
    let mut last_error = None;
    for credential in credentials {
        match keys::unlock_slot(name, &id, &slots, credential) {
            Ok((secrets, number)) => {
                let parcel = OpenParcel {
                    name: name.to_owned(),
                    record,
                    id,
                    secrets,
                };
                return Ok((parcel, number));
            }
            Err(e @ KeyError::CorruptSlot { .. }) => return Err(e.into()),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error
        .unwrap_or(KeyError::WrongPassphrase {
            parcel: name.to_owned(),
        })
        .into())
}

/// Creates a parcel: `parcel.toml` (create-only: a racing creator fails with
/// [`ParcelError::Exists`]) and one keyslot per credential.
pub async fn create(
    store: &StoreHandle,
    name: &str,
    chunk_size: u32,
    secrets: ParcelSecrets,
    credentials: &[Credential],
    kdf: KdfParams,
) -> Result<OpenParcel, ParcelError> {
    validate_name(name)?;
    let writer = store.writer("create a parcel")?;
    let id: [u8; 16] = rand::random();
    let record = ParcelRecord {
        format: RECORD_FORMAT,
        id: hex::encode(id),
        chunk_size,
        created: Timestamp::now().to_rfc3339(),
    };
    let text = toml::to_string(&record).expect("record serialises");
    init_store(store).await?;
    if writer
        .put_new(&layout::record(name), Bytes::from(text))
        .await?
        == PutOutcome::AlreadyExists
    {
        return Err(ParcelError::Exists {
            name: name.to_owned(),
        });
    }
    let parcel = OpenParcel {
        name: name.to_owned(),
        record,
        id,
        secrets,
    };
    write_keyslots(store, &parcel, credentials, kdf).await?;
    Ok(parcel)
}

/// Writes one keyslot per credential, at the first free slot numbers
/// (create-only, so a slot in use is never overwritten); returns the numbers.
pub async fn write_keyslots(
    store: &StoreHandle,
    parcel: &OpenParcel,
    credentials: &[Credential],
    kdf: KdfParams,
) -> Result<Vec<u32>, ParcelError> {
    let writer = store.writer("write keyslots")?;
    check_not_locked(store, &parcel.name, None).await?;
    let mut number = 0;
    let mut written = Vec::new();
    for credential in credentials {
        let slot = keys::seal_keyslot(&parcel.secrets, credential, kdf, &parcel.id)?;
        let slot = Bytes::from(slot);
        loop {
            if number >= MAX_KEYSLOTS {
                return Err(
                    KeyError::Kdf(format!("parcel {} has no free keyslot", parcel.name)).into(),
                );
            }
            let key = layout::keyslot(&parcel.name, number);
            number += 1;
            if writer.put_new(&key, slot.clone()).await? == PutOutcome::Created {
                written.push(number - 1);
                break;
            }
        }
    }
    Ok(written)
}

/// Finishes creating a parcel whose creation was interrupted between writing
/// `parcel.toml` and its keyslots: new secrets, keyslots written.
pub async fn complete_creation(
    store: &StoreHandle,
    name: &str,
    record: ParcelRecord,
    secrets: ParcelSecrets,
    credentials: &[Credential],
    kdf: KdfParams,
) -> Result<OpenParcel, ParcelError> {
    let id = record.id_bytes(name)?;
    let parcel = OpenParcel {
        name: name.to_owned(),
        record,
        id,
        secrets,
    };
    write_keyslots(store, &parcel, credentials, kdf).await?;
    Ok(parcel)
}

/// Committed versions of the parcel, ascending. Listing stores list
/// `versions/` (ignoring traces and the `oldest` hint); others probe.
pub async fn list_versions(store: &StoreHandle, name: &str) -> Result<Vec<u64>, ParcelError> {
    validate_name(name)?;
    match store.lister() {
        Some(lister) => {
            let prefix = layout::versions(name);
            let mut versions: Vec<u64> = lister
                .list(&prefix)
                .await?
                .iter()
                .filter_map(|key| {
                    key.strip_prefix(&prefix)?
                        .strip_suffix(".manifest")?
                        .parse()
                        .ok()
                })
                .filter(|&v| v > 0)
                .collect();
            versions.sort_unstable();
            Ok(versions)
        }
        None => probe_versions(store, name).await,
    }
}

/// Versions a stale `oldest` hint may lag behind the oldest version (a gc
/// killed between its deletions and rewriting the hint, or two gcs at once).
const HINT_SLACK: u64 = 16;
/// The highest version number (a manifest's key has ten digits).
pub const MAX_VERSION: u64 = 9_999_999_999;
/// How many versions a store that cannot list may claim to hold: more is
/// not believed (a hostile or broken server answering "exists" to every key
/// would otherwise be probed, and its versions collected, for ever).
const MAX_PROBED_VERSIONS: u64 = 1 << 20;

/// The `oldest` hint gc leaves after deleting versions, if any.
pub async fn read_oldest_hint(store: &StoreHandle, name: &str) -> Result<Option<u64>, ParcelError> {
    match store.reader().get(&layout::oldest_hint(name)).await {
        Ok(bytes) => {
            let hint = std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .filter(|&v| (1..=MAX_VERSION).contains(&v));
            if hint.is_none() {
                tracing::warn!(parcel = name, "ignoring an unreadable versions/oldest hint");
            }
            Ok(hint)
        }
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// On stores that cannot list: versions are contiguous from the oldest kept
/// one (1, or the `oldest` hint gc writes), so find the first by probing from
/// there and the newest by exponential probing, then binary search.
async fn probe_versions(store: &StoreHandle, name: &str) -> Result<Vec<u64>, ParcelError> {
    let exists = |v: u64| async move { store.reader().exists(&layout::manifest(name, v)).await };
    let (start, slack) = match read_oldest_hint(store, name).await? {
        Some(hint) => (hint, HINT_SLACK),
        None => (1, 1),
    };
    let mut oldest = None;
    for version in start..start.saturating_add(slack) {
        if exists(version).await? {
            oldest = Some(version);
            break;
        }
    }
    let Some(oldest) = oldest else {
        return Ok(Vec::new());
    };
    let (mut present, mut absent) = (oldest, oldest + 1);
    while exists(absent).await? {
        present = absent;
        absent = oldest + 2 * (absent - oldest);
        if absent - oldest > MAX_PROBED_VERSIONS || absent > MAX_VERSION + 1 {
            return Err(ParcelError::BadRecord {
                name: name.to_owned(),
                reason: format!(
                    "the store claims more than {MAX_PROBED_VERSIONS} versions from version {oldest} on (is it answering every request with success?)"
                ),
            });
        }
    }
    while absent - present > 1 {
        let middle = present + (absent - present) / 2;
        if exists(middle).await? {
            present = middle;
        } else {
            absent = middle;
        }
    }
    Ok((oldest..=present).collect())
}

/// Names of every parcel in the store.
pub async fn list_parcels(store: &StoreHandle) -> Result<Vec<String>, ParcelError> {
    let lister = store.lister().ok_or_else(|| StoreError::Unsupported {
        store: store.url().to_owned(),
        operation: "list parcels",
        hint: "HTTP stores cannot list; name the parcel (e.g. `isrctl info NAME`)",
    })?;
    let mut names: Vec<String> = lister
        .list(layout::PARCELS)
        .await?
        .iter()
        .filter_map(|key| {
            key.strip_prefix(layout::PARCELS)?
                .strip_suffix("/parcel.toml")
        })
        .filter(|name| !name.contains('/'))
        .map(str::to_owned)
        .collect();
    names.sort();
    Ok(names)
}

/// Reads and decrypts one version's manifest object: the whole manifest
/// (format 1) or its root (format 2, segments not read yet).
pub async fn read_stored(
    store: &StoreHandle,
    parcel: &OpenParcel,
    version: u64,
) -> Result<Stored, ParcelError> {
    let key = layout::manifest(&parcel.name, version);
    let bytes = match store.reader().get(&key).await {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => {
            return Err(ParcelError::VersionNotFound {
                name: parcel.name.clone(),
                version,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let stored = manifest::open(
        &bytes,
        &parcel.secrets.parcel_key,
        &parcel.id,
        version,
        &key,
    )?;
    let chunk_size = stored.header().chunk_size;
    if chunk_size != parcel.record.chunk_size {
        return Err(ManifestError::Malformed {
            object: key,
            reason: format!(
                "chunk size {chunk_size} differs from the parcel's {}",
                parcel.record.chunk_size
            ),
        }
        .into());
    }
    Ok(stored)
}

/// Reads one version's whole manifest: its object and, for format 2, every
/// segment (from the store, several at a time).
pub async fn read_manifest(
    store: &StoreHandle,
    parcel: &OpenParcel,
    version: u64,
) -> Result<Manifest, ParcelError> {
    let stored = read_stored(store, parcel, version).await?;
    assemble(store, parcel, stored).await
}

/// The whole manifest of a version read with [`read_stored`], its
/// segments read from the store (a session reads them through its fetcher
/// instead: `image::BaseManifest`). Every segment is checked like a chunk:
/// tag, AEAD, convergent key.
pub async fn assemble(
    store: &StoreHandle,
    parcel: &OpenParcel,
    stored: Stored,
) -> Result<Manifest, ParcelError> {
    let root = match stored {
        Stored::Whole(manifest) => return Ok(manifest),
        Stored::Tree(root) => root,
    };
    let mut distinct: Vec<&ChunkRef> = root.segment_refs().collect();
    distinct.sort_by_key(|r| r.tag());
    distinct.dedup_by_key(|r| r.tag());
    let secret = &parcel.secrets.dedup_secret;
    let plaintexts: HashMap<ChunkTag, Bytes> = futures::stream::iter(distinct)
        .map(|reference| async move {
            let &ChunkRef::Stored { tag, ref key, .. } = reference else {
                unreachable!("segments are stored chunks");
            };
            let stored = read_segment(store, tag).await?;
            let plaintext = chunk::decode(secret, tag, key, stored)
                .map_err(|e| ManifestError::Segment(Arc::new(e)))?;
            Ok::<_, ParcelError>((tag, plaintext))
        })
        .buffer_unordered(SEGMENT_READS)
        .try_collect()
        .await?;
    let object = layout::manifest(&parcel.name, root.manifest.version);
    Ok(root.assemble(&object, |reference| {
        Ok(plaintexts[&reference.tag().expect("stored")].clone())
    })?)
}

/// A segment's stored bytes from the store; a copy that fails its tag (a
/// damaged or stale copy in a cache tier) is read again past the cache.
async fn read_segment(store: &StoreHandle, tag: ChunkTag) -> Result<Bytes, ParcelError> {
    let key = layout::chunk(&tag);
    let bytes = store.reader().get(&key).await?;
    if chunk::verify_tag(tag, &bytes).is_ok() {
        return Ok(bytes);
    }
    Ok(store.reader().get_uncached(&key).await?)
}

/// Segments read at once by [`assemble`].
const SEGMENT_READS: usize = 16;

/// Cuts `manifest` into its format-2 root and segments, encoded under
/// `parcel`'s dedup secret.
pub fn split(parcel: &OpenParcel, manifest: &Manifest) -> Result<Split, ParcelError> {
    let mut encoder = ChunkEncoder::new(
        parcel.secrets.dedup_secret.clone(),
        chunk::DEFAULT_ZSTD_LEVEL,
    )
    .map_err(|e| ParcelError::Manifest(ManifestError::InvalidTree(format!("zstd: {e}"))))?;
    Ok(tree::split(manifest, tree::SEGMENT_CHUNKS, &mut encoder)?)
}

/// Resolves `version` (or the newest when `None`) to an existing version number.
pub async fn resolve_version(
    store: &StoreHandle,
    name: &str,
    version: Option<u64>,
) -> Result<u64, ParcelError> {
    let versions = list_versions(store, name).await?;
    if versions.is_empty() {
        // A parcel that does not exist (e.g. a store path resolved elsewhere)
        // is not an interrupted import.
        require_record(store, name).await?;
    }
    match version {
        None => versions
            .last()
            .copied()
            .ok_or_else(|| ParcelError::NoVersions {
                name: name.to_owned(),
            }),
        Some(v) if versions.contains(&v) => Ok(v),
        Some(version) => Err(ParcelError::VersionNotFound {
            name: name.to_owned(),
            version,
        }),
    }
}

/// Commits `manifest` as its version: uploads its segments (create-only,
/// so those the store has are not sent again), then [`commit_root`]. For
/// writers that do not keep segments in a cache (import, rollback); a
/// session uploads them with its chunks.
pub async fn commit(
    store: &StoreHandle,
    parcel: &OpenParcel,
    manifest: &Manifest,
) -> Result<(), ParcelError> {
    let writer = store.writer("commit a version")?;
    let split = split(parcel, manifest)?;
    futures::stream::iter(split.encoded)
        .map(|(reference, bytes)| async move {
            let tag = reference.tag().expect("segments are stored chunks");
            writer
                .put_new(&layout::chunk(&tag), Bytes::from(bytes))
                .await
        })
        .buffer_unordered(SEGMENT_READS)
        .try_collect::<Vec<_>>()
        .await?;
    commit_root(store, parcel, &split.root).await.map(drop)
}

/// Commits a version's root with one create-only put. The chunks and
/// segments it references must be durable already: a writer that uploaded
/// some ends its pass with [`crate::gc::finish_pass`] (which syncs the
/// store) right before, and a rollback references chunks of a committed
/// version. Fails with [`ParcelError::VersionExists`] if another client
/// committed that version first. Returns the root's stored size.
pub async fn commit_root(
    store: &StoreHandle,
    parcel: &OpenParcel,
    root: &Root,
) -> Result<u64, ParcelError> {
    let writer = store.writer("commit a version")?;
    let version = root.manifest.version;
    check_not_locked(store, &parcel.name, root.manifest.lock_nonce.as_ref()).await?;
    let sealed = root.seal(&parcel.secrets.parcel_key, &parcel.id)?;
    writer.sync().await?;
    let key = layout::manifest(&parcel.name, version);
    let len = sealed.len() as u64;
    match writer.put_new(&key, Bytes::from(sealed)).await? {
        PutOutcome::Created => {
            writer.sync().await?;
            Ok(len)
        }
        PutOutcome::AlreadyExists => Err(ParcelError::VersionExists {
            name: parcel.name.clone(),
            version,
        }),
    }
}

/// The parcel's lock, if it is held.
pub async fn read_lock(store: &StoreHandle, name: &str) -> Result<Option<LockRecord>, ParcelError> {
    let bytes = match store.reader().get(&layout::lock(name)).await {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let text = String::from_utf8_lossy(&bytes);
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| ParcelError::BadRecord {
            name: name.to_owned(),
            reason: format!("lock object: {e}"),
        })
}

/// Fails with [`ParcelError::Locked`] when the parcel's lock is held by
/// anyone but the holder of `nonce` (the nonce a session or rollback writes
/// into the manifests it commits). Every change of a parcel's versions or
/// keyslots passes here ([`commit`], [`write_keyslots`]), so a resumed
/// parcel is safe from imports, rollbacks and passphrase changes alike.
pub async fn check_not_locked(
    store: &StoreHandle,
    name: &str,
    nonce: Option<&[u8; 16]>,
) -> Result<(), ParcelError> {
    let Some(lock) = read_lock(store, name).await? else {
        return Ok(());
    };
    if nonce.is_some_and(|n| hex::encode(n) == lock.nonce) {
        return Ok(());
    }
    Err(ParcelError::Locked {
        name: name.to_owned(),
        holder: lock.holder,
        host: lock.host,
        since: lock.since,
    })
}

/// Whether the store exists: it has the marker `isrctl init` and parcel
/// creation write, or (a store made before the marker) any parcel object.
pub async fn store_exists(store: &StoreHandle) -> Result<bool, ParcelError> {
    if store.reader().exists(layout::STORE_MARKER).await? {
        return Ok(true);
    }
    match store.lister() {
        Some(lister) => Ok(!lister.list(layout::PARCELS).await?.is_empty()),
        // A store that cannot list (HTTP) is taken on trust.
        None => Ok(true),
    }
}

/// Fails with [`ParcelError::StoreNotFound`] unless [`store_exists`].
pub async fn require_store(store: &StoreHandle) -> Result<(), ParcelError> {
    if store_exists(store).await? {
        Ok(())
    } else {
        Err(ParcelError::StoreNotFound {
            store: store.url().to_owned(),
        })
    }
}

/// Writes the store marker (create-only: an existing one is left as it is).
/// Returns whether the store existed already.
pub async fn init_store(store: &StoreHandle) -> Result<bool, ParcelError> {
    let existed = store_exists(store).await?;
    let text = format!(
        "# an isr store (see docs/format.md)\nformat = {RECORD_FORMAT}\ncreated = \"{}\"\n",
        Timestamp::now().to_rfc3339()
    );
    store
        .writer("create a store")?
        .put_new(layout::STORE_MARKER, Bytes::from(text))
        .await?;
    Ok(existed)
}

/// Distinct stored chunks of a manifest with the first place each is used.
pub fn distinct_chunks(manifest: &Manifest) -> Vec<(ChunkTag, &chunk::ChunkRef, &str, u64)> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (path, _, chunks) in manifest.files() {
        for (index, chunk_ref) in chunks.iter().enumerate() {
            if let Some(tag) = chunk_ref.tag() {
                if seen.insert(tag) {
                    out.push((
                        tag,
                        chunk_ref,
                        path,
                        index as u64 * u64::from(manifest.chunk_size),
                    ));
                }
            }
        }
    }
    out
}

/// This machine's host name, as locks and commits record it.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Parcels for other modules' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Argon2 parameters cheap enough for unit tests.
    pub const CHEAP: KdfParams = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    /// Parcel `p` with one empty version, opened by each of `credentials`.
    pub async fn parcel_with_one_version(
        store: &StoreHandle,
        credentials: &[Credential],
    ) -> OpenParcel {
        let parcel = create(
            store,
            "p",
            65536,
            ParcelSecrets::generate(None),
            credentials,
            CHEAP,
        )
        .await
        .unwrap();
        let manifest = Manifest {
            version: 1,
            parent: None,
            created: Timestamp::now(),
            lock_nonce: None,
            host: "h".into(),
            message: "first".into(),
            chunk_size: 65536,
            entries: vec![],
        };
        commit(store, &parcel, &manifest).await.unwrap();
        parcel
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use zeroize::Zeroizing;

    fn pass(p: &str) -> Vec<Credential> {
        vec![Credential::Passphrase(Zeroizing::new(p.to_owned()))]
    }

    const CHEAP: KdfParams = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    #[test]
    fn names() {
        for good in ["a", "my-vm", "vm_1.2", &"x".repeat(64)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "-opt", "a/b", "a b", "ü", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn create_open_commit_and_race() {
        let store = StoreHandle::full(MemoryStore::new());
        let created = create(
            &store,
            "p",
            65536,
            ParcelSecrets::generate(None),
            &pass("pw"),
            CHEAP,
        )
        .await
        .unwrap();
        assert!(matches!(
            create(
                &store,
                "p",
                65536,
                ParcelSecrets::generate(None),
                &pass("pw"),
                CHEAP
            )
            .await,
            Err(ParcelError::Exists { .. })
        ));
        let opened = open(&store, "p", &pass("pw")).await.unwrap();
        assert_eq!(opened.secrets.parcel_key, created.secrets.parcel_key);
        assert!(matches!(
            open(&store, "p", &pass("nope")).await,
            Err(ParcelError::Key(KeyError::WrongPassphrase { .. }))
        ));
        assert!(list_versions(&store, "p").await.unwrap().is_empty());

        let manifest = Manifest {
            version: 1,
            parent: None,
            created: Timestamp::now(),
            lock_nonce: None,
            host: "h".into(),
            message: String::new(),
            chunk_size: 65536,
            entries: vec![],
        };
        commit(&store, &opened, &manifest).await.unwrap();
        assert!(matches!(
            commit(&store, &opened, &manifest).await,
            Err(ParcelError::VersionExists { version: 1, .. })
        ));
        assert_eq!(list_versions(&store, "p").await.unwrap(), vec![1]);
        assert_eq!(read_manifest(&store, &opened, 1).await.unwrap(), manifest);
        assert_eq!(resolve_version(&store, "p", None).await.unwrap(), 1);
        assert!(matches!(
            resolve_version(&store, "p", Some(2)).await,
            Err(ParcelError::VersionNotFound { .. })
        ));
        assert_eq!(list_parcels(&store).await.unwrap(), vec!["p".to_string()]);
    }

    #[tokio::test]
    async fn probing_starts_at_the_oldest_hint_and_listing_ignores_it() {
        let memory = MemoryStore::new();
        let probing = StoreHandle::read_only(memory.clone());
        let listing = StoreHandle::full(memory.clone());
        for v in 5..=9 {
            memory.overwrite(&layout::manifest("p", v), Bytes::new());
        }
        memory.overwrite(&layout::trace("p", 5), Bytes::new());
        assert!(probe_versions(&probing, "p").await.unwrap().is_empty());
        memory.overwrite(&layout::oldest_hint("p"), Bytes::from_static(b"5\n"));
        assert_eq!(
            probe_versions(&probing, "p").await.unwrap(),
            vec![5, 6, 7, 8, 9]
        );
        // A stale hint (older than the oldest version) is walked forward.
        memory.overwrite(&layout::oldest_hint("p"), Bytes::from_static(b"2"));
        assert_eq!(
            probe_versions(&probing, "p").await.unwrap(),
            vec![5, 6, 7, 8, 9]
        );
        assert_eq!(
            list_versions(&listing, "p").await.unwrap(),
            vec![5, 6, 7, 8, 9]
        );
        assert_eq!(
            layout::trace("p", 42),
            "parcels/p/versions/0000000042.trace"
        );
    }

    /// A broken or hostile web server: every object exists and holds `body`.
    #[derive(Debug)]
    struct EverythingExists(&'static [u8]);

    #[async_trait::async_trait]
    impl crate::store::ReadStore for EverythingExists {
        fn url(&self) -> &str {
            "https://everything.example"
        }
        async fn get(&self, _key: &str) -> Result<Bytes, StoreError> {
            Ok(Bytes::from_static(self.0))
        }
        async fn exists(&self, _key: &str) -> Result<bool, StoreError> {
            Ok(true)
        }
    }

    #[tokio::test]
    async fn a_store_claiming_every_version_is_not_believed() {
        for hint in [&b"1"[..], b"9999999999", b"18446744073709551615", b"junk"] {
            let store = StoreHandle::read_only(EverythingExists(hint));
            let error = probe_versions(&store, "p").await.unwrap_err();
            assert!(
                matches!(error, ParcelError::BadRecord { .. }),
                "hint {hint:?}: {error}"
            );
        }
    }

    #[tokio::test]
    async fn probing_finds_contiguous_versions() {
        let memory = MemoryStore::new();
        let store = StoreHandle::read_only(memory.clone());
        assert!(probe_versions(&store, "p").await.unwrap().is_empty());
        for v in 1..=13 {
            memory.overwrite(&layout::manifest("p", v), Bytes::new());
            assert_eq!(
                probe_versions(&store, "p").await.unwrap(),
                (1..=v).collect::<Vec<_>>()
            );
        }
    }
}
