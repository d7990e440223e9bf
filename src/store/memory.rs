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
pub(crate) mod tests {
    use super::*;

    /// The behaviour every writable, listable backend must have.
    pub(crate) async fn exercise_store_contract<S: ListStore + WriteStore>(store: &S) {
        assert!(store.get("chunks/ab/x").await.unwrap_err().is_not_found());
        assert!(!store.exists("chunks/ab/x").await.unwrap());
        let first = Bytes::from_static(b"first");
        assert_eq!(
            store.put_new("chunks/ab/x", first.clone()).await.unwrap(),
            PutOutcome::Created
        );
        assert_eq!(
            store
                .put_new("chunks/ab/x", Bytes::from_static(b"second"))
                .await
                .unwrap(),
            PutOutcome::AlreadyExists
        );
        assert_eq!(store.get("chunks/ab/x").await.unwrap(), first);
        assert!(store.exists("chunks/ab/x").await.unwrap());
        store
            .put_new("parcels/p/parcel.toml", Bytes::from_static(b"t"))
            .await
            .unwrap();
        store
            .put_new("parcels/p/versions/0000000001.manifest", Bytes::new())
            .await
            .unwrap();
        let mut listed = store.list("parcels/").await.unwrap();
        listed.sort();
        assert_eq!(
            listed,
            vec![
                "parcels/p/parcel.toml",
                "parcels/p/versions/0000000001.manifest"
            ]
        );
        assert!(store.list("nothing/").await.unwrap().is_empty());
        store.delete("chunks/ab/x").await.unwrap();
        store.delete("chunks/ab/x").await.unwrap();
        assert!(!store.exists("chunks/ab/x").await.unwrap());
        store.sync().await.unwrap();
        assert!(store.get("../escape").await.is_err());
    }

    #[tokio::test]
    async fn memory_store_contract() {
        exercise_store_contract(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn concurrent_creates_of_one_key_create_once() {
        let store = MemoryStore::new();
        let puts = (0..8).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .put_new("k", Bytes::from(vec![i as u8]))
                    .await
                    .unwrap()
            })
        });
        let outcomes = futures::future::join_all(puts).await;
        let created = outcomes
            .into_iter()
            .filter(|o| *o.as_ref().unwrap() == PutOutcome::Created)
            .count();
        assert_eq!(created, 1);
    }
}
