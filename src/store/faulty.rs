//! A fault-injecting wrapper for tests: fails the next operations on demand,
//! and can make every operation slow.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ListStore, ObjectInfo, PutOutcome, ReadStore, StoreError, WriteStore};

/// What the next operations do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass everything through.
    None,
    /// Fail the next N operations with a transient error.
    TransientTimes(u32),
    /// Fail the next N operations with a permanent error.
    PermanentTimes(u32),
}

/// Wraps a store and fails operations as told.
#[derive(Debug)]
pub struct FaultyStore<S> {
    inner: S,
    fault: Mutex<Fault>,
    latency: Mutex<Duration>,
    calls: AtomicU64,
}

impl<S: ReadStore> FaultyStore<S> {
    /// Wraps `inner`, passing everything through until told otherwise.
    pub fn new(inner: S) -> Self {
        FaultyStore {
            inner,
            fault: Mutex::new(Fault::None),
            latency: Mutex::new(Duration::ZERO),
            calls: AtomicU64::new(0),
        }
    }

    /// The wrapped store (bypasses faults).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Sets what the next operations do.
    pub fn inject(&self, fault: Fault) {
        *self.fault.lock().expect("not poisoned") = fault;
    }

    /// Makes every later operation wait `latency` before it runs.
    pub fn set_latency(&self, latency: Duration) {
        *self.latency.lock().expect("not poisoned") = latency;
    }

    /// Operations attempted through the wrapper so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    async fn check(&self, key: &str) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let latency = *self.latency.lock().expect("not poisoned");
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut fault = self.fault.lock().expect("not poisoned");
        let store = self.inner.url().to_owned();
        let key = key.to_owned();
        match *fault {
            Fault::None => Ok(()),
            Fault::TransientTimes(n) => {
                *fault = if n <= 1 {
                    Fault::None
                } else {
                    Fault::TransientTimes(n - 1)
                };
                Err(StoreError::Transient {
                    store,
                    key,
                    source: "injected transient fault".into(),
                })
            }
            Fault::PermanentTimes(n) => {
                *fault = if n <= 1 {
                    Fault::None
                } else {
                    Fault::PermanentTimes(n - 1)
                };
                Err(StoreError::Permanent {
                    store,
                    key,
                    source: "injected permanent fault".into(),
                })
            }
        }
    }
}

#[async_trait]
impl<S: ReadStore> ReadStore for FaultyStore<S> {
    fn url(&self) -> &str {
        self.inner.url()
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.check(key).await?;
        self.inner.get(key).await
    }
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.check(key).await?;
        self.inner.exists(key).await
    }
}

#[async_trait]
impl<S: ListStore> ListStore for FaultyStore<S> {
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.check(prefix).await?;
        self.inner.list(prefix).await
    }
    async fn list_info(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.check(prefix).await?;
        self.inner.list_info(prefix).await
    }
}

#[async_trait]
impl<S: WriteStore> WriteStore for FaultyStore<S> {
    async fn put_new(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        self.check(key).await?;
        self.inner.put_new(key, data).await
    }
    async fn put_replace(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.check(key).await?;
        self.inner.put_replace(key, data).await
    }
    async fn modified(&self, key: &str) -> Result<Option<std::time::SystemTime>, StoreError> {
        self.check(key).await?;
        self.inner.modified(key).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.check(key).await?;
        self.inner.delete(key).await
    }
    async fn sync(&self) -> Result<(), StoreError> {
        self.check("").await?;
        self.inner.sync().await
    }
}
