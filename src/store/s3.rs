//! An S3-compatible store (AWS S3, SeaweedFS, MinIO, Ceph RGW, …) via object_store.
//!
//! Create-only puts use `If-None-Match: *` (object_store's `PutMode::Create`), so
//! committing a version is one atomic conditional write; `put_replace` is a
//! plain (overwriting) PUT, and last-modified times are the server's
//! `Last-Modified` (listings give milliseconds, HEAD whole seconds). Retries are
//! object_store's own, configured from [`RetrySettings`]: it knows which S3
//! answers are worth retrying (5xx, 429, transport failures) and which are not
//! (other 4xx). What still fails after its retries is reported as
//! [`StoreError::Unreachable`] when the transport failed, else as
//! [`StoreError::Permanent`].
//!
//! Uploads of immutable objects (chunks; which keys are is the caller's word,
//! [`S3Store::with_immutable_keys`]) carry `Cache-Control:`
//! [`IMMUTABLE_CACHE_CONTROL`] and `Content-Type: application/octet-stream`,
//! which S3 keeps and returns with every GET, so an HTTP cache or CDN in
//! front of the bucket keeps them; other objects carry no cache headers.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::client::HttpError;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, RetryConfig,
};

use super::{
    IMMUTABLE_CACHE_CONTROL, ImmutableKeys, ListStore, ObjectInfo, PutOutcome, ReadStore,
    RetrySettings, S3Settings, StoreError, WriteStore, check_key,
};

/// An S3 bucket (and optional prefix) used as a store.
#[derive(Debug, Clone)]
pub struct S3Store {
    url: String,
    attempts: u32,
    prefix: String,
    client: Arc<dyn ObjectStore>,
    immutable: Option<ImmutableKeys>,
}

impl S3Store {
    /// Connects to `bucket` under `prefix` with `settings` (falling back to `AWS_*` variables).
    pub fn new(
        url: &str,
        bucket: &str,
        prefix: &str,
        settings: &S3Settings,
        retry: RetrySettings,
    ) -> Result<S3Store, StoreError> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let endpoint = settings
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| env("AWS_ENDPOINT"));
        let allow_http = settings
            .allow_http
            .or_else(|| env("AWS_ALLOW_HTTP").map(|v| v.eq_ignore_ascii_case("true")))
            .unwrap_or_else(|| {
                endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://"))
            });
        // Without credentials object_store would ask the EC2 instance
        // metadata service (169.254.169.254), which elsewhere only times out:
        // that happens only when asked for.
        let has_keys = settings.access_key_id.is_some() || env("AWS_ACCESS_KEY_ID").is_some();
        let other_source = [
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        ]
        .iter()
        .any(|name| env(name).is_some());
        let metadata = env("ISR_S3_INSTANCE_METADATA")
            .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        if !has_keys && !other_source && !metadata {
            return Err(StoreError::NoCredentials {
                store: url.to_owned(),
            });
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(settings.virtual_hosted_style.unwrap_or(false))
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(retry.initial_backoff_ms),
                    max_backoff: Duration::from_millis(retry.max_backoff_ms),
                    base: 2.0,
                },
                max_retries: retry.attempts.saturating_sub(1) as usize,
                retry_timeout: Duration::from_secs(
                    retry.request_timeout_secs.max(1) * u64::from(retry.attempts.max(1)),
                ),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(allow_http)
                    .with_timeout(Duration::from_secs(retry.request_timeout_secs.max(1)))
                    .with_connect_timeout(Duration::from_secs(
                        retry.request_timeout_secs.clamp(1, 30),
                    )),
            );
        if let Some(endpoint) = &endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &settings.region {
            builder = builder.with_region(region);
        }
        if let Some(id) = &settings.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &settings.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let client = builder.build().map_err(|e| StoreError::BadUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(S3Store {
            attempts: retry.attempts,
            url: url.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            client: Arc::new(client),
            immutable: None,
        })
    }

    /// Marks uploads of the keys `immutable` accepts cacheable for ever.
    pub fn with_immutable_keys(mut self, immutable: ImmutableKeys) -> S3Store {
        self.immutable = Some(immutable);
        self
    }

    /// A put's options: `mode`, and the cache headers of an immutable object.
    fn put_options(&self, key: &str, mode: PutMode) -> PutOptions {
        let mut attributes = Attributes::new();
        if self.immutable.is_some_and(|immutable| immutable(key)) {
            attributes.insert(Attribute::CacheControl, IMMUTABLE_CACHE_CONTROL.into());
            attributes.insert(Attribute::ContentType, "application/octet-stream".into());
        }
        PutOptions {
            mode,
            attributes,
            ..PutOptions::default()
        }
    }

    fn path(&self, key: &str) -> Result<ObjectPath, StoreError> {
        check_key(&self.url, key)?;
        Ok(if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        })
    }

    fn error(&self, key: &str, error: object_store::Error) -> StoreError {
        let store = self.url.clone();
        let key = key.to_owned();
        match error {
            object_store::Error::NotFound { .. } => StoreError::NotFound { store, key },
            object_store::Error::Generic { .. } if transport_failed(&error) => {
                StoreError::Unreachable {
                    store,
                    key,
                    attempts: self.attempts,
                    source: error.into(),
                }
            }
            other => StoreError::Permanent {
                store,
                key,
                source: other.into(),
            },
        }
    }
}

/// True when the error chain holds a transport failure (connect, timeout, …)
/// rather than an answer from the server.
fn transport_failed(error: &object_store::Error) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if error.downcast_ref::<HttpError>().is_some() {
            return true;
        }
        current = error.source();
    }
    false
}

#[async_trait]
impl ReadStore for S3Store {
    fn url(&self) -> &str {
        &self.url
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.path(key)?;
        let result = self
            .client
            .get(&path)
            .await
            .map_err(|e| self.error(key, e))?;
        result.bytes().await.map_err(|e| self.error(key, e))
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path(key)?;
        match self.client.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error(key, e)),
        }
    }
}

#[async_trait]
impl ListStore for S3Store {
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list_info(prefix)
            .await?
            .into_iter()
            .map(|object| object.key)
            .collect())
    }

    async fn list_info(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let trimmed = prefix.trim_end_matches('/');
        let path = self.path(trimmed)?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let objects: Vec<_> = self
            .client
            .list(Some(&path))
            .try_collect()
            .await
            .map_err(|e| self.error(prefix, e))?;
        Ok(objects
            .into_iter()
            .filter_map(|meta| {
                Some(ObjectInfo {
                    key: meta.location.as_ref().strip_prefix(&strip)?.to_owned(),
                    size: meta.size,
                    modified: SystemTime::from(meta.last_modified),
                })
            })
            .collect())
    }
}

#[async_trait]
impl WriteStore for S3Store {
    async fn put_new(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        let path = self.path(key)?;
        match self
            .client
            .put_opts(
                &path,
                PutPayload::from_bytes(data),
                self.put_options(key, PutMode::Create),
            )
            .await
        {
            Ok(_) => Ok(PutOutcome::Created),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(PutOutcome::AlreadyExists),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::Permanent {
                store: self.url.clone(),
                key: key.to_owned(),
                source: "the bucket does not exist (create it first)".into(),
            }),
            Err(e) => Err(self.error(key, e)),
        }
    }

    async fn put_replace(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match self
            .client
            .put_opts(
                &path,
                PutPayload::from_bytes(data),
                self.put_options(key, PutMode::Overwrite),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::Permanent {
                store: self.url.clone(),
                key: key.to_owned(),
                source: "the bucket does not exist (create it first)".into(),
            }),
            Err(e) => Err(self.error(key, e)),
        }
    }

    async fn modified(&self, key: &str) -> Result<Option<SystemTime>, StoreError> {
        let path = self.path(key)?;
        match self.client.head(&path).await {
            Ok(meta) => Ok(Some(SystemTime::from(meta.last_modified))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(key, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match self.client.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(key, e)),
        }
    }

    async fn sync(&self) -> Result<(), StoreError> {
        // A successful S3 PUT is durable when it returns.
        Ok(())
    }
}
