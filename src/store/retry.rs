//! Retries transient store errors with exponential backoff (and jitter).
//!
//! Wraps any backend; each capability the backend has is passed through with
//! retries. When the attempts run out, the last transient error becomes
//! [`StoreError::Unreachable`], which says how many attempts were made.
//! Permanent errors and not-found are returned at once.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;

use super::{ListStore, ObjectInfo, PutOutcome, ReadStore, RetrySettings, StoreError, WriteStore};

/// A store whose operations retry transient failures.
#[derive(Debug)]
pub struct Retrying<S> {
    inner: S,
    settings: RetrySettings,
}

impl<S: ReadStore> Retrying<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, settings: RetrySettings) -> Self {
        Retrying { inner, settings }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    async fn run<T, F, Fut>(&self, key: &str, operation: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut operation = operation;
        let attempts = AtomicU32::new(0);
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.settings.initial_backoff_ms))
            .with_max_delay(Duration::from_millis(self.settings.max_backoff_ms))
            .with_max_times(self.settings.attempts.saturating_sub(1) as usize)
            .with_jitter();
        let result = (|| {
            attempts.fetch_add(1, Ordering::Relaxed);
            operation()
        })
        .retry(backoff)
        .when(StoreError::is_transient)
        .notify(|error, delay| {
            tracing::warn!(%error, ?delay, "store operation failed; retrying");
        })
        .await;
        result.map_err(|error| match error {
            StoreError::Transient { store, source, .. } => StoreError::Unreachable {
                store,
                key: key.to_owned(),
                attempts: attempts.load(Ordering::Relaxed),
                source,
            },
            other => other,
        })
    }
}

#[async_trait]
impl<S: ReadStore> ReadStore for Retrying<S> {
    fn url(&self) -> &str {
        self.inner.url()
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.run(key, || self.inner.get(key)).await
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.run(key, || self.inner.exists(key)).await
    }

    async fn get_uncached(&self, key: &str) -> Result<Bytes, StoreError> {
        self.run(key, || self.inner.get_uncached(key)).await
    }
}

#[async_trait]
impl<S: ListStore> ListStore for Retrying<S> {
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.run(prefix, || self.inner.list(prefix)).await
    }

    async fn list_info(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.run(prefix, || self.inner.list_info(prefix)).await
    }
}

#[async_trait]
impl<S: WriteStore> WriteStore for Retrying<S> {
    async fn put_new(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        self.run(key, || self.inner.put_new(key, data.clone()))
            .await
    }

    async fn put_replace(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.run(key, || self.inner.put_replace(key, data.clone()))
            .await
    }

    async fn modified(&self, key: &str) -> Result<Option<std::time::SystemTime>, StoreError> {
        self.run(key, || self.inner.modified(key)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.run(key, || self.inner.delete(key)).await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.run("", || self.inner.sync()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::faulty::{Fault, FaultyStore};
    use crate::store::memory::MemoryStore;

    fn quick(attempts: u32) -> RetrySettings {
        RetrySettings {
            attempts,
            initial_backoff_ms: 1,
            max_backoff_ms: 2,
            request_timeout_secs: 1,
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_success() {
        let faulty = FaultyStore::new(MemoryStore::new());
        faulty
            .inner()
            .put_new("k", Bytes::from_static(b"v"))
            .await
            .unwrap();
        faulty.inject(Fault::TransientTimes(3));
        let store = Retrying::new(faulty, quick(5));
        assert_eq!(store.get("k").await.unwrap(), Bytes::from_static(b"v"));
        assert_eq!(store.inner().calls(), 4);
    }

    #[tokio::test]
    async fn exhausted_retries_report_unreachable_with_the_key() {
        let faulty = FaultyStore::new(MemoryStore::new());
        faulty.inject(Fault::TransientTimes(100));
        let store = Retrying::new(faulty, quick(3));
        let err = store.get("chunks/aa/bb").await.unwrap_err();
        assert!(
            matches!(err, StoreError::Unreachable { attempts: 3, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chunks/aa/bb"));
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let faulty = FaultyStore::new(MemoryStore::new());
        faulty.inject(Fault::PermanentTimes(1));
        let store = Retrying::new(faulty, quick(5));
        assert!(matches!(
            store.get("k").await,
            Err(StoreError::Permanent { .. })
        ));
        assert_eq!(store.inner().calls(), 1);
        assert!(store.get("k").await.unwrap_err().is_not_found());
    }
}
