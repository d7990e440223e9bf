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
//!
//! One retry is ours: object_store does not retry a create-only put that
//! timed out or was cut off after it was sent (the put may have landed), and a
//! SeaweedFS volume server that hangs holds such puts until the timeout (see
//! docs/scale.md). `put_new` sends those again, up to the configured attempts;
//! when a later attempt finds the object there, it is ours if it holds our
//! bytes (an earlier attempt landed), else someone else's.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::client::{HttpError, HttpErrorKind};
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
    initial_backoff: Duration,
    max_backoff: Duration,
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
            initial_backoff: Duration::from_millis(retry.initial_backoff_ms),
            max_backoff: Duration::from_millis(retry.max_backoff_ms),
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

impl S3Store {
    /// After a create-only put whose earlier attempt may have landed found
    /// the object there: ours if it holds exactly `data`.
    async fn landed(
        &self,
        key: &str,
        path: &ObjectPath,
        data: &Bytes,
    ) -> Result<PutOutcome, StoreError> {
        let found = match self.client.get(path).await {
            Ok(result) => result.bytes().await.map_err(|e| self.error(key, e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(PutOutcome::AlreadyExists),
            Err(e) => return Err(self.error(key, e)),
        };
        Ok(if found == *data {
            PutOutcome::Created
        } else {
            PutOutcome::AlreadyExists
        })
    }
}

/// True when the request failed after it may have reached the server
/// (timed out, or the connection was cut off): object_store retries those
/// only for idempotent requests.
fn outcome_unknown(error: &object_store::Error) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if let Some(http) = error.downcast_ref::<HttpError>() {
            return matches!(
                http.kind(),
                HttpErrorKind::Timeout | HttpErrorKind::Interrupted
            );
        }
        current = error.source();
    }
    false
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
        let mut attempt = 1;
        let mut delay = self.initial_backoff;
        loop {
            match self
                .client
                .put_opts(
                    &path,
                    PutPayload::from_bytes(data.clone()),
                    self.put_options(key, PutMode::Create),
                )
                .await
            {
                Ok(_) => return Ok(PutOutcome::Created),
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) if attempt > 1 => return self.landed(key, &path, &data).await,
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => return Ok(PutOutcome::AlreadyExists),
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(StoreError::Permanent {
                        store: self.url.clone(),
                        key: key.to_owned(),
                        source: "the bucket does not exist (create it first)".into(),
                    });
                }
                Err(e) if attempt < self.attempts && outcome_unknown(&e) => {
                    tracing::warn!(error = %e, ?delay, key, "create-only put cut off; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.max_backoff);
                    attempt += 1;
                }
                Err(e) => return Err(self.error(key, e)),
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Mutex;

    /// A one-object S3 server on loopback whose first PUT lands but is never
    /// answered (the client times out), as a SeaweedFS gateway does when a
    /// volume server hangs and then recovers. `landed` is what that PUT
    /// leaves in the bucket (its own body, or another writer's bytes).
    struct LostAnswer {
        object: Mutex<Option<Vec<u8>>>,
        landed: Option<Vec<u8>>,
        puts: Mutex<u32>,
    }

    fn serve(server: Arc<LostAnswer>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let server = server.clone();
                std::thread::spawn(move || connection(&server, stream));
            }
        });
        port
    }

    fn connection(server: &LostAnswer, stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        loop {
            let mut request = String::new();
            if reader.read_line(&mut request).unwrap_or(0) == 0 {
                return;
            }
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap();
                }
            }
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body).unwrap();
            let answer = if request.starts_with("PUT") {
                let mut puts = server.puts.lock().unwrap();
                *puts += 1;
                let mut object = server.object.lock().unwrap();
                if *puts == 1 {
                    *object = Some(server.landed.clone().unwrap_or(body));
                    drop(object);
                    drop(puts);
                    // Never answered: the client's 1 s timeout ends it.
                    std::thread::sleep(Duration::from_secs(3));
                    return;
                }
                if object.is_some() {
                    "HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\n\r\n".to_owned()
                } else {
                    *object = Some(body);
                    "HTTP/1.1 200 OK\r\nETag: \"1\"\r\nContent-Length: 0\r\n\r\n".to_owned()
                }
            } else {
                let object = server.object.lock().unwrap().clone().unwrap_or_default();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nETag: \"1\"\r\nLast-Modified: Thu, 03 Dec 2026 10:00:00 GMT\r\nContent-Length: {}\r\n\r\n",
                    object.len()
                );
                writer.write_all(head.as_bytes()).unwrap();
                writer.write_all(&object).unwrap();
                continue;
            };
            writer.write_all(answer.as_bytes()).unwrap();
        }
    }

    async fn put_after_a_lost_answer(landed: Option<Vec<u8>>) -> (PutOutcome, u32) {
        let server = Arc::new(LostAnswer {
            object: Mutex::new(None),
            landed,
            puts: Mutex::new(0),
        });
        let port = serve(server.clone());
        let store = S3Store::new(
            "s3://bucket",
            "bucket",
            "",
            &S3Settings {
                endpoint: Some(format!("http://127.0.0.1:{port}")),
                region: Some("us-east-1".into()),
                access_key_id: Some("key".into()),
                secret_access_key: Some("secret".into()),
                allow_http: Some(true),
                virtual_hosted_style: Some(false),
            },
            RetrySettings {
                attempts: 3,
                initial_backoff_ms: 10,
                max_backoff_ms: 20,
                request_timeout_secs: 1,
            },
        )
        .unwrap();
        let outcome = store
            .put_new("parcels/p/versions/2", Bytes::from_static(b"our manifest"))
            .await
            .unwrap();
        let puts = *server.puts.lock().unwrap();
        (outcome, puts)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_create_only_put_whose_answer_was_lost_is_sent_again_and_found_ours() {
        let (outcome, puts) = put_after_a_lost_answer(None).await;
        assert_eq!(outcome, PutOutcome::Created);
        assert_eq!(puts, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_create_only_put_finding_other_bytes_after_a_lost_answer_is_not_ours() {
        let (outcome, _) = put_after_a_lost_answer(Some(b"their manifest".to_vec())).await;
        assert_eq!(outcome, PutOutcome::AlreadyExists);
    }
}
