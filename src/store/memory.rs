//! An in-memory store for tests: every capability, nothing persisted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ListStore, PutOutcome, ReadStore, StoreError, WriteStore, check_key};

/// Objects in a map, shared between clones.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    objects: Arc<Mutex<BTreeMap<String, Bytes>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Replaces an object's bytes behind the create-only API (to simulate tampering).
    pub fn overwrite(&self, key: &str, data: Bytes) {
        self.objects
            .lock()
            .expect("not poisoned")
            .insert(key.to_owned(), data);
    }

    /// Number of objects whose key starts with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        let objects = self.objects.lock().expect("not poisoned");
        objects.keys().filter(|k| k.starts_with(prefix)).count()
    }
}

#[async_trait]
impl ReadStore for MemoryStore {
    fn url(&self) -> &str {
        "memory:"
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        check_key(self.url(), key)?;
        let objects = self.objects.lock().expect("not poisoned");
        objects
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound {
                store: self.url().into(),
                key: key.into(),
            })
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        check_key(self.url(), key)?;
        Ok(self.objects.lock().expect("not poisoned").contains_key(key))
    }
}

#[async_trait]
impl ListStore for MemoryStore {
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let objects = self.objects.lock().expect("not poisoned");
        Ok(objects
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }
}

#[async_trait]
impl WriteStore for MemoryStore {
    async fn put_new(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        check_key(self.url(), key)?;
        let mut objects = self.objects.lock().expect("not poisoned");
        if objects.contains_key(key) {
            return Ok(PutOutcome::AlreadyExists);
        }
        objects.insert(key.to_owned(), data);
        Ok(PutOutcome::Created)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.objects.lock().expect("not poisoned").remove(key);
        Ok(())
    }

    async fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreHandle;
    use crate::store::contract::check_store_contract;

    #[tokio::test]
    async fn memory_store_contract() {
        check_store_contract(&StoreHandle::full(MemoryStore::new())).await;
    }
}
