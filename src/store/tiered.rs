//! A store read through a cache tier: reads of immutable objects go to a read
//! URL (an HTTP cache or CDN in front of the store) first, everything else to
//! the store itself (the origin).
//!
//! - `get` of an immutable key: the cache; when the cache fails or has no such
//!   object, the origin (a cache is never the only way to an object).
//! - `get` of any other key, `exists` (whether an object exists *now*: gc may
//!   have deleted a chunk a cache still holds) and `get_uncached`: the origin.
//!
//! The bytes a cache returns are checked by the reader (a chunk against its
//! tag); a reader whose check fails asks again with
//! [`ReadStore::get_uncached`], which never goes through the cache, so a
//! damaged or stale cached copy costs one extra request, not a loop.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ImmutableKeys, ReadStore, StoreError};

/// A cache in front of an origin.
#[derive(Debug)]
pub struct Tiered {
    cache: Arc<dyn ReadStore>,
    origin: Arc<dyn ReadStore>,
    immutable: ImmutableKeys,
}

impl Tiered {
    /// Reads the keys `immutable` accepts through `cache`, the rest from `origin`.
    pub fn new(
        cache: Arc<dyn ReadStore>,
        origin: Arc<dyn ReadStore>,
        immutable: ImmutableKeys,
    ) -> Tiered {
        Tiered {
            cache,
            origin,
            immutable,
        }
    }

    /// The cache's URL.
    pub fn cache_url(&self) -> &str {
        self.cache.url()
    }
}

#[async_trait]
impl ReadStore for Tiered {
    /// The origin's URL: the store's identity.
    fn url(&self) -> &str {
        self.origin.url()
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        if !(self.immutable)(key) {
            return self.origin.get(key).await;
        }
        match self.cache.get(key).await {
            Ok(bytes) => Ok(bytes),
            Err(error) => {
                if error.is_not_found() {
                    tracing::debug!(
                        cache = self.cache.url(),
                        key,
                        "not in the cache; reading the store"
                    );
                } else {
                    tracing::warn!(cache = self.cache.url(), key, %error, "the read URL failed; reading the store");
                }
                self.origin.get(key).await
            }
        }
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.origin.exists(key).await
    }

    async fn get_uncached(&self, key: &str) -> Result<Bytes, StoreError> {
        self.origin.get_uncached(key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WriteStore;
    use crate::store::faulty::{Fault, FaultyStore};
    use crate::store::memory::MemoryStore;

    fn chunks_only(key: &str) -> bool {
        key.starts_with("chunks/")
    }

    async fn stores() -> (Arc<FaultyStore<MemoryStore>>, Arc<FaultyStore<MemoryStore>>) {
        let cache = Arc::new(FaultyStore::new(MemoryStore::new()));
        let origin = Arc::new(FaultyStore::new(MemoryStore::new()));
        for (store, text) in [(&cache, "cached"), (&origin, "origin")] {
            for key in ["chunks/aa/1", "parcels/p/lock"] {
                store.inner().put_new(key, Bytes::from(text)).await.unwrap();
            }
        }
        (cache, origin)
    }

    #[tokio::test]
    async fn immutable_reads_go_to_the_cache_and_the_rest_to_the_origin() {
        let (cache, origin) = stores().await;
        let tiered = Tiered::new(cache.clone(), origin.clone(), chunks_only);
        assert_eq!(tiered.get("chunks/aa/1").await.unwrap(), "cached");
        assert_eq!(tiered.get("parcels/p/lock").await.unwrap(), "origin");
        assert_eq!(tiered.get_uncached("chunks/aa/1").await.unwrap(), "origin");
        assert!(tiered.exists("chunks/aa/1").await.unwrap());
        assert_eq!((cache.calls(), origin.calls()), (1, 3));
        assert_eq!(tiered.url(), origin.url());
    }

    #[tokio::test]
    async fn a_failing_or_empty_cache_falls_back_to_the_origin() {
        let (cache, origin) = stores().await;
        origin
            .inner()
            .put_new("chunks/bb/2", Bytes::from("only here"))
            .await
            .unwrap();
        let tiered = Tiered::new(cache.clone(), origin.clone(), chunks_only);
        assert_eq!(tiered.get("chunks/bb/2").await.unwrap(), "only here");
        cache.inject(Fault::PermanentTimes(1));
        assert_eq!(tiered.get("chunks/aa/1").await.unwrap(), "origin");
        assert!(tiered.get("chunks/cc/3").await.unwrap_err().is_not_found());
    }
}
