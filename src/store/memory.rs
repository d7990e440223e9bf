//! An in-memory store for tests: every capability, nothing persisted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ListStore, ObjectInfo, PutOutcome, ReadStore, StoreError, WriteStore, check_key};

/// Objects in a map with the time each was put, shared between clones.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    objects: Arc<Mutex<BTreeMap<String, (Bytes, SystemTime)>>>,
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
            .insert(key.to_owned(), (data, SystemTime::now()));
    }

    /// Sets an object's last-modified time (to simulate age); false if absent.
    pub fn set_modified(&self, key: &str, time: SystemTime) -> bool {
        match self.objects.lock().expect("not poisoned").get_mut(key) {
            Some(object) => {
                object.1 = time;
                true
            }
            None => false,
        }
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
            .map(|(data, _)| data.clone())
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

    async fn list_info(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let objects = self.objects.lock().expect("not poisoned");
        Ok(objects
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(key, (data, modified))| ObjectInfo {
                key: key.clone(),
                size: data.len() as u64,
                modified: *modified,
            })
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
        objects.insert(key.to_owned(), (data, SystemTime::now()));
        Ok(PutOutcome::Created)
    }

    async fn put_replace(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        check_key(self.url(), key)?;
        self.objects
            .lock()
            .expect("not poisoned")
            .insert(key.to_owned(), (data, SystemTime::now()));
        Ok(())
    }

    async fn modified(&self, key: &str) -> Result<Option<SystemTime>, StoreError> {
        check_key(self.url(), key)?;
        let objects = self.objects.lock().expect("not poisoned");
        Ok(objects.get(key).map(|(_, modified)| *modified))
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

    #[tokio::test]
    async fn put_replace_refreshes_an_aged_object() {
        let store = MemoryStore::new();
        store
            .put_new("chunks/ab/x", Bytes::from_static(b"x"))
            .await
            .unwrap();
        let long_ago = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        assert!(store.set_modified("chunks/ab/x", long_ago));
        assert_eq!(store.modified("chunks/ab/x").await.unwrap(), Some(long_ago));
        store
            .put_replace("chunks/ab/x", Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert!(store.modified("chunks/ab/x").await.unwrap().unwrap() > long_ago);
        assert!(!store.set_modified("chunks/ab/missing", long_ago));
    }
}
