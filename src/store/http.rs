//! A read-only store over plain HTTP(S): `GET <base>/<key>`.
//!
//! Stored objects are immutable, so any web server, cache or CDN that serves a
//! local store's directory can serve parcels. HTTP cannot list, so this backend
//! implements [`ReadStore`] only; versions are found by probing (see
//! [`crate::parcel::list_versions`]).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use reqwest::StatusCode;

use super::{ReadStore, RetrySettings, StoreError, check_key};

/// An HTTP(S) store.
#[derive(Debug, Clone)]
pub struct HttpStore {
    url: String,
    base: String,
    client: reqwest::Client,
}

impl HttpStore {
    /// A store whose objects are under `url` (e.g. `https://host/isr`).
    pub fn new(url: &str, retry: RetrySettings) -> Result<HttpStore, StoreError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(retry.request_timeout_secs.clamp(1, 30)))
            .timeout(Duration::from_secs(retry.request_timeout_secs.max(1)))
            .user_agent(concat!("isr/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StoreError::BadUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(HttpStore {
            url: url.to_owned(),
            base: url.trim_end_matches('/').to_owned(),
            client,
        })
    }

    fn classify_status(&self, key: &str, status: StatusCode) -> StoreError {
        let store = self.url.clone();
        let key = key.to_owned();
        let source = format!("HTTP {status}").into();
        if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            StoreError::NotFound { store, key }
        } else if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            StoreError::Transient { store, key, source }
        } else {
            StoreError::Permanent { store, key, source }
        }
    }

    fn classify_error(&self, key: &str, error: reqwest::Error) -> StoreError {
        let store = self.url.clone();
        let key = key.to_owned();
        if error.is_builder() {
            StoreError::Permanent {
                store,
                key,
                source: error.into(),
            }
        } else {
            StoreError::Transient {
                store,
                key,
                source: error.into(),
            }
        }
    }

    async fn request(
        &self,
        method: reqwest::Method,
        key: &str,
    ) -> Result<reqwest::Response, StoreError> {
        check_key(&self.url, key)?;
        let response = self
            .client
            .request(method, format!("{}/{key}", self.base))
            .send()
            .await
            .map_err(|e| self.classify_error(key, e))?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(self.classify_status(key, response.status()))
        }
    }
}

#[async_trait]
impl ReadStore for HttpStore {
    fn url(&self) -> &str {
        &self.url
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let response = self.request(reqwest::Method::GET, key).await?;
        response
            .bytes()
            .await
            .map_err(|e| self.classify_error(key, e))
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self.request(reqwest::Method::HEAD, key).await {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
