//! Stores: where parcels live.
//!
//! A store is a flat namespace of immutable objects under '/'-separated keys (the
//! layout is in [`crate::layout`]). Capabilities are separate traits:
//! - [`ReadStore`]: `get`, `exists` — every backend;
//! - [`ListStore`]: `list`, and `list_info`/`list_modified` with sizes and
//!   last-modified times — every backend but plain HTTP;
//! - [`WriteStore`]: create-only `put_new`, `delete`, `sync`, plus `modified`
//!   and `put_replace` (for garbage collection's grace period, see
//!   [`crate::gc`]) — local, S3, memory.
//!
//! Backends: [`local::LocalStore`] (a directory; `file:///path` or a plain path),
//! [`s3::S3Store`] (`s3://bucket/prefix`, via object_store), [`http::HttpStore`]
//! (`http(s)://host/prefix`, read-only, plain GETs of immutable objects),
//! [`memory::MemoryStore`] (tests; [`contract`] checks any backend). Wrappers layer on top: [`retry::Retrying`]
//! retries transient errors with backoff; [`faulty::FaultyStore`] injects faults
//! in tests.
//!
//! [`open`] turns a URL into a [`StoreHandle`] that holds whatever capabilities the
//! backend has, with retries: local and HTTP wrapped in [`retry::Retrying`], S3
//! through object_store's own retry policy.
//!
//! [`open_tiered`] is the same with the caller's word on which keys name
//! immutable objects ([`ImmutableKeys`]; the store knows keys as strings
//! only): S3 uploads of those carry `Cache-Control: public, max-age=…,
//! immutable` ([`IMMUTABLE_CACHE_CONTROL`]), and with a read URL (an HTTP
//! cache or CDN in front of the store) reads of those go there first
//! ([`tiered::Tiered`]); everything else — writes, locks, listings, mutable
//! objects, and [`ReadStore::get_uncached`] after a cached copy failed its
//! check — goes to the store itself.

pub mod contract;
pub mod faulty;
pub mod http;
pub mod local;
pub mod memory;
pub mod retry;
pub mod s3;
pub mod tiered;

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Classify, ErrorClass};

/// Boxed error source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a create-only put found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object did not exist and now holds the given bytes.
    Created,
    /// An object already existed under that key; nothing was written.
    AlreadyExists,
}

/// Errors of every store operation. Each names the store and the object key.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No object under that key.
    #[error("{key} not found in store {store}")]
    NotFound {
        /// Store URL.
        store: String,
        /// Object key.
        key: String,
    },
    /// A failure that may go away on retry (network, 5xx, timeouts).
    #[error("{key}: store {store} did not answer properly: {source}")]
    Transient {
        /// Store URL.
        store: String,
        /// Object key.
        key: String,
        /// Cause.
        source: BoxError,
    },
    /// Retries were exhausted.
    #[error(
        "store {store} is unreachable: {key} still failed after {attempts} attempts ({source}); check the store URL, the network and the server, then run the command again"
    )]
    Unreachable {
        /// Store URL.
        store: String,
        /// Object key.
        key: String,
        /// How many attempts were made.
        attempts: u32,
        /// Last cause.
        source: BoxError,
    },
    /// A failure retrying will not fix (permissions, bad request, disk full).
    #[error("{key}: store {store} refused the operation: {source}")]
    Permanent {
        /// Store URL.
        store: String,
        /// Object key.
        key: String,
        /// Cause.
        source: BoxError,
    },
    /// The operation needs a capability this store lacks.
    #[error("store {store} cannot {operation}: {hint}")]
    Unsupported {
        /// Store URL.
        store: String,
        /// What was attempted.
        operation: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
    /// An S3 store without credentials (and no instance metadata asked for).
    #[error(
        "store {store} needs S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or access_key_id and secret_access_key under [s3] in the config file (on EC2, ISR_S3_INSTANCE_METADATA=1 uses the instance's role instead)"
    )]
    NoCredentials {
        /// Store URL.
        store: String,
    },
    /// The URL could not be understood.
    #[error("invalid store URL {url:?}: {reason}")]
    BadUrl {
        /// As given.
        url: String,
        /// Why.
        reason: String,
    },
}

impl StoreError {
    /// True for errors a retry might fix.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient { .. })
    }

    /// True when the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

impl Classify for StoreError {
    fn class(&self) -> ErrorClass {
        match self {
            StoreError::NotFound { .. } => ErrorClass::NotFound,
            StoreError::Transient { .. } | StoreError::Unreachable { .. } => {
                ErrorClass::Unreachable
            }
            StoreError::Unsupported { .. }
            | StoreError::BadUrl { .. }
            | StoreError::NoCredentials { .. } => ErrorClass::Invalid,
            StoreError::Permanent { .. } => ErrorClass::Other,
        }
    }
}

/// Reading objects: every backend.
#[async_trait]
pub trait ReadStore: Send + Sync + fmt::Debug {
    /// The store's URL, for messages.
    fn url(&self) -> &str;
    /// The whole object.
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;
    /// Whether the object exists.
    async fn exists(&self, key: &str) -> Result<bool, StoreError>;
    /// The whole object from the store itself, past any cache tier in front
    /// of it: for a second try after the bytes [`ReadStore::get`] returned
    /// failed their check (a damaged or stale cached copy). The same as
    /// `get` for a store without a cache tier.
    async fn get_uncached(&self, key: &str) -> Result<Bytes, StoreError> {
        self.get(key).await
    }
}

/// Which object keys name immutable objects (the same bytes for ever):
/// `crate::layout::is_immutable`, passed in by the layers that know keys.
pub type ImmutableKeys = fn(&str) -> bool;

/// The `Cache-Control` S3 uploads of immutable objects carry: any cache may
/// keep them a year and need never revalidate them.
pub const IMMUTABLE_CACHE_CONTROL: &str = "public, max-age=31536000, immutable";

/// One listed object: key, size and last-modified time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Object key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// When the object was last written (local: file mtime; S3: `Last-Modified`,
    /// set by the server's clock; memory: time of the put).
    pub modified: SystemTime,
}

/// Listing objects.
#[async_trait]
pub trait ListStore: ReadStore {
    /// Every key starting with `prefix` (which should end in '/'), in any order.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Like [`ListStore::list`], with each object's size and last-modified time.
    async fn list_info(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError>;
    /// Like [`ListStore::list`], with each object's last-modified time.
    async fn list_modified(&self, prefix: &str) -> Result<Vec<(String, SystemTime)>, StoreError> {
        Ok(self
            .list_info(prefix)
            .await?
            .into_iter()
            .map(|object| (object.key, object.modified))
            .collect())
    }
}

/// Writing objects. Objects are immutable: puts are create-only, except
/// [`WriteStore::put_replace`], which rewrites an object with the bytes it
/// already has (see there).
#[async_trait]
pub trait WriteStore: ReadStore {
    /// Stores `data` under `key` unless an object already exists there.
    /// Atomic: concurrent puts of one key create it exactly once.
    async fn put_new(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError>;
    /// Stores `data` under `key` whether or not an object exists there,
    /// atomically replacing it (readers see the old or the new object, never a
    /// mix), and sets its last-modified time to now.
    ///
    /// For chunks this is only ever called with the bytes the chunk already
    /// has (its name is the hash of its bytes): it *refreshes* the chunk's age,
    /// so garbage collection's grace period starts again for it (see
    /// [`crate::gc`]). The only other use is small mutable hint objects
    /// (`parcels/<name>/versions/oldest`).
    async fn put_replace(&self, key: &str, data: Bytes) -> Result<(), StoreError>;
    /// When the object was last written, or `None` if it does not exist.
    async fn modified(&self, key: &str) -> Result<Option<SystemTime>, StoreError>;
    /// Removes an object; removing a missing object succeeds.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Makes every earlier successful put durable (a barrier before a commit).
    async fn sync(&self) -> Result<(), StoreError>;
}

/// A store opened from a URL, with the capabilities its backend has.
#[derive(Clone)]
pub struct StoreHandle {
    read: Arc<dyn ReadStore>,
    list: Option<Arc<dyn ListStore>>,
    write: Option<Arc<dyn WriteStore>>,
}

impl fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "StoreHandle({}, list: {}, write: {})",
            self.read.url(),
            self.list.is_some(),
            self.write.is_some()
        )
    }
}

/// A backend with every capability.
pub trait FullStore: ListStore + WriteStore {}
impl<T: ListStore + WriteStore> FullStore for T {}

impl StoreHandle {
    /// A handle over a backend that can read, list and write.
    pub fn full<S: FullStore + 'static>(store: S) -> StoreHandle {
        let store = Arc::new(store);
        StoreHandle {
            read: store.clone(),
            list: Some(store.clone()),
            write: Some(store),
        }
    }

    /// A handle over a read-only, unlistable backend.
    pub fn read_only<S: ReadStore + 'static>(store: S) -> StoreHandle {
        StoreHandle {
            read: Arc::new(store),
            list: None,
            write: None,
        }
    }

    /// The store's URL.
    pub fn url(&self) -> &str {
        self.read.url()
    }

    /// Read access.
    pub fn reader(&self) -> &Arc<dyn ReadStore> {
        &self.read
    }

    /// List access, if the backend can list.
    pub fn lister(&self) -> Option<&Arc<dyn ListStore>> {
        self.list.as_ref()
    }

    /// Write access, or an error saying the store is read-only.
    pub fn writer(&self, operation: &'static str) -> Result<&Arc<dyn WriteStore>, StoreError> {
        self.write.as_ref().ok_or_else(|| StoreError::Unsupported {
            store: self.url().to_owned(),
            operation,
            hint: "this store is read-only (http/https); use a local directory or an s3:// store",
        })
    }
}

/// Connection settings for S3 stores (anything unset comes from the standard
/// `AWS_*` environment variables).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    /// Endpoint URL, e.g. `http://127.0.0.1:8333` (default: AWS).
    pub endpoint: Option<String>,
    /// Region name (default: `us-east-1`).
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Allow plain-HTTP endpoints (default: only when the endpoint is http://).
    pub allow_http: Option<bool>,
    /// Virtual-hosted-style requests (default false: path-style, which every S3 server supports).
    pub virtual_hosted_style: Option<bool>,
}

/// Retry policy for transient store errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// Delay before the first retry, in milliseconds; doubles each time.
    pub initial_backoff_ms: u64,
    /// Longest delay between two attempts, in milliseconds.
    pub max_backoff_ms: u64,
    /// Time limit of one request, in seconds.
    pub request_timeout_secs: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            attempts: 6,
            initial_backoff_ms: 200,
            max_backoff_ms: 5_000,
            request_timeout_secs: 60,
        }
    }
}

/// Opens the store at `url`: `/path`, `file:///path`, `s3://bucket/prefix`,
/// `http://host/prefix` or `https://host/prefix`.
pub fn open(url: &str, s3: &S3Settings, retry: RetrySettings) -> Result<StoreHandle, StoreError> {
    let bad = |reason: &str| StoreError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket name (expected s3://bucket/prefix)"));
        }
        // object_store retries S3 requests itself (see `s3`).
        return Ok(StoreHandle::full(s3::S3Store::new(
            url, bucket, prefix, s3, retry,
        )?));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        let store = http::HttpStore::new(url, retry)?;
        return Ok(StoreHandle::read_only(retry::Retrying::new(store, retry)));
    }
    if let Some((scheme, _)) = url.split_once(':')
        && !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && !url.contains("://")
    {
        return Err(bad(&format!(
            "{scheme}: is not followed by // (use s3://bucket/prefix, file:///path, http(s)://host/prefix, or ./{url} for a local path with a colon)"
        )));
    }
    let path = if let Some(rest) = url.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(bad("file:// URLs need an absolute path (file:///path)"));
        }
        rest
    } else if url.contains("://") {
        return Err(bad(
            "unknown scheme (use a path, file://, s3://, http:// or https://)",
        ));
    } else if url.is_empty() {
        return Err(bad("empty"));
    } else {
        url
    };
    let store = local::LocalStore::new(std::path::Path::new(path));
    Ok(StoreHandle::full(retry::Retrying::new(store, retry)))
}

/// [`open`], knowing which keys are immutable (`immutable`), and with an
/// optional read URL: an `http(s)://` cache or CDN in front of the store that
/// serves its immutable objects. Their reads go to the read URL first (falling
/// back to the store when it fails or has no such object); every other
/// operation goes to the store. S3 uploads of immutable objects carry
/// [`IMMUTABLE_CACHE_CONTROL`].
pub fn open_tiered(
    url: &str,
    read_url: Option<&str>,
    immutable: ImmutableKeys,
    s3: &S3Settings,
    retry: RetrySettings,
) -> Result<StoreHandle, StoreError> {
    let mut handle = if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return open(url, s3, retry);
        }
        StoreHandle::full(
            s3::S3Store::new(url, bucket, prefix, s3, retry)?.with_immutable_keys(immutable),
        )
    } else {
        open(url, s3, retry)?
    };
    if let Some(read_url) = read_url.filter(|u| !u.is_empty()) {
        if !(read_url.starts_with("http://") || read_url.starts_with("https://")) {
            return Err(StoreError::BadUrl {
                url: read_url.to_owned(),
                reason: "a read URL is an http:// or https:// cache in front of the store".into(),
            });
        }
        // One retry at the cache, then the store: a cache that is down
        // costs a read little more than the store's own latency.
        let cache_retry = RetrySettings {
            attempts: retry.attempts.min(2),
            ..retry
        };
        let cache = retry::Retrying::new(http::HttpStore::new(read_url, retry)?, cache_retry);
        handle.read = Arc::new(tiered::Tiered::new(
            Arc::new(cache),
            handle.read.clone(),
            immutable,
        ));
    }
    Ok(handle)
}

/// Validates an object key: relative, '/'-separated, no empty/`.`/`..` parts.
pub(crate) fn check_key(store: &str, key: &str) -> Result<(), StoreError> {
    let valid = !key.is_empty()
        && key
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != ".." && !part.contains('\0'));
    if valid {
        Ok(())
    } else {
        Err(StoreError::Permanent {
            store: store.to_owned(),
            key: key.to_owned(),
            source: "invalid object key".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let r = RetrySettings::default();
        let s3 = S3Settings::default();
        assert!(open("/tmp/x", &s3, r).unwrap().writer("w").is_ok());
        assert!(open("file:///tmp/x", &s3, r).unwrap().lister().is_some());
        let http = open("http://127.0.0.1:1/store", &s3, r).unwrap();
        assert!(http.lister().is_none());
        assert!(matches!(
            http.writer("import"),
            Err(StoreError::Unsupported { .. })
        ));
        assert!(matches!(
            open("ftp://x", &s3, r),
            Err(StoreError::BadUrl { .. })
        ));
        assert!(matches!(
            open("file://relative", &s3, r),
            Err(StoreError::BadUrl { .. })
        ));
        assert!(matches!(
            open("s3:///prefix", &s3, r),
            Err(StoreError::BadUrl { .. })
        ));
        for malformed in ["s3:/bucket", "s3:bucket/x", "file:/tmp/x", "s3://"] {
            assert!(
                matches!(open(malformed, &s3, r), Err(StoreError::BadUrl { .. })),
                "{malformed}"
            );
        }
        assert!(open("./a:b", &s3, r).is_ok());
    }

    #[test]
    fn keys() {
        assert!(check_key("s", "chunks/ab/abcd").is_ok());
        for bad in ["", "/abs", "a//b", "a/../b", "a/.", "trailing/"] {
            assert!(check_key("s", bad).is_err(), "{bad}");
        }
    }
}
