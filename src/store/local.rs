//! A store in a local directory: each object is a file at `<root>/<key>`.
//!
//! Create-only puts write a temporary file in the target directory, `fsync` it,
//! then `link(2)` it into place, which fails atomically if the name exists; so an
//! object is either absent or complete, even across a crash. [`WriteStore::sync`]
//! calls `syncfs(2)` so directory entries are durable before a commit.
//! [`WriteStore::put_replace`] writes a temporary file, `fdatasync`s it and
//! `rename(2)`s it over the old one, so the object is replaced atomically and
//! its mtime (the object's last-modified time) is the time of the write.

use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ListStore, ObjectInfo, PutOutcome, ReadStore, StoreError, WriteStore, check_key};

const TEMP_PREFIX: &str = ".tmp-";

/// A directory store.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    url: String,
}

impl LocalStore {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: &Path) -> LocalStore {
        LocalStore {
            root: root.to_owned(),
            url: root.display().to_string(),
        }
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(&self.url, key)?;
        Ok(self.root.join(key))
    }

    fn io_error(&self, key: &str, error: std::io::Error) -> StoreError {
        let store = self.url.clone();
        let key = key.to_owned();
        match error.kind() {
            ErrorKind::NotFound => StoreError::NotFound { store, key },
            ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                StoreError::Transient {
                    store,
                    key,
                    source: error.into(),
                }
            }
            _ => StoreError::Permanent {
                store,
                key,
                source: error.into(),
            },
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        key: &str,
        work: impl FnOnce(LocalStore, String) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        let owned_key = key.to_owned();
        tokio::task::spawn_blocking(move || work(this, owned_key))
            .await
            .map_err(|e| StoreError::Permanent {
                store: self.url.clone(),
                key: key.to_owned(),
                source: e.into(),
            })?
    }

    /// Writes `data` to a new temporary file beside `key`'s final place
    /// (fdatasynced with `durable`); returns the final and temporary paths.
    fn write_temporary(
        &self,
        key: &str,
        data: &[u8],
        durable: bool,
    ) -> Result<(PathBuf, PathBuf), StoreError> {
        let path = self.path(key)?;
        let dir = path.parent().expect("keys have a parent (the root)");
        let name = path
            .file_name()
            .expect("keys end in a name")
            .to_string_lossy();
        fs::create_dir_all(dir).map_err(|e| self.io_error(key, e))?;
        let temp = dir.join(format!(
            "{TEMP_PREFIX}{name}-{:016x}",
            rand::random::<u64>()
        ));
        let result = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)?;
            file.write_all(data)?;
            if durable {
                file.sync_data()?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&temp);
            return Err(self.io_error(key, e));
        }
        Ok((path, temp))
    }

    /// Create-only put, synchronously. With `durable`, the data is fsynced
    /// before it is linked into place (a cache of refetchable chunks skips that;
    /// readers verify tags, so a torn file after a crash is detected and dropped).
    pub fn put_new_blocking(
        &self,
        key: &str,
        data: &[u8],
        durable: bool,
    ) -> Result<PutOutcome, StoreError> {
        if self.path(key)?.exists() {
            return Ok(PutOutcome::AlreadyExists);
        }
        let (path, temp) = self.write_temporary(key, data, durable)?;
        let result = match fs::hard_link(&temp, &path) {
            Ok(()) => Ok(PutOutcome::Created),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(PutOutcome::AlreadyExists),
            Err(e) => Err(e),
        };
        let _ = fs::remove_file(&temp);
        result.map_err(|e| self.io_error(key, e))
    }

    /// Unconditional put, synchronously: a temporary file, `fdatasync`ed, then
    /// renamed over whatever is at `key`.
    pub fn put_replace_blocking(&self, key: &str, data: &[u8]) -> Result<(), StoreError> {
        let (path, temp) = self.write_temporary(key, data, true)?;
        fs::rename(&temp, &path).map_err(|e| {
            let _ = fs::remove_file(&temp);
            self.io_error(key, e)
        })
    }

    /// Reads an object synchronously.
    pub fn get_blocking(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.path(key)?;
        fs::read(path)
            .map(Bytes::from)
            .map_err(|e| self.io_error(key, e))
    }

    /// Asks the kernel to start reading an object into the page cache
    /// (`posix_fadvise(WILLNEED)`), so that several reads that follow
    /// overlap on the disk; a missing object is ignored.
    pub fn advise_will_need(&self, key: &str) {
        let Ok(path) = self.path(key) else { return };
        if let Ok(file) = fs::File::open(path) {
            let _ = nix::fcntl::posix_fadvise(
                &file,
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }
    }

    /// Removes an object synchronously; a missing object is fine.
    pub fn delete_blocking(&self, key: &str) -> Result<(), StoreError> {
        match fs::remove_file(self.path(key)?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io_error(key, e)),
        }
    }

    /// Every key under `prefix`, synchronously.
    pub fn list_blocking(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        self.walk(prefix, |key, _| {
            keys.push(key);
            Ok(())
        })?;
        Ok(keys)
    }

    /// Every object under `prefix` with its size and mtime, synchronously.
    pub fn list_info_blocking(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut objects = Vec::new();
        self.walk(prefix, |key, entry| {
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                // Deleted since the directory was read.
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(self.io_error(&key, e)),
            };
            let modified = meta.modified().map_err(|e| self.io_error(&key, e))?;
            objects.push(ObjectInfo {
                key,
                size: meta.len(),
                modified,
            });
            Ok(())
        })?;
        Ok(objects)
    }

    /// Calls `found` with the key and directory entry of every object under `prefix`.
    fn walk(
        &self,
        prefix: &str,
        mut found: impl FnMut(String, &fs::DirEntry) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let start = self.root.join(prefix.trim_end_matches('/'));
        let mut pending = vec![start];
        while let Some(dir) = pending.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io_error(prefix, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.io_error(prefix, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(TEMP_PREFIX) {
                    continue;
                }
                let file_type = entry.file_type().map_err(|e| self.io_error(prefix, e))?;
                if file_type.is_dir() {
                    pending.push(entry.path());
                } else if let Ok(relative) = entry.path().strip_prefix(&self.root) {
                    found(relative.to_string_lossy().into_owned(), &entry)?;
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl ReadStore for LocalStore {
    fn url(&self) -> &str {
        &self.url
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.blocking(key, |this, key| this.get_blocking(&key))
            .await
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(meta) => Ok(meta.is_file()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io_error(key, e)),
        }
    }
}

#[async_trait]
impl ListStore for LocalStore {
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.blocking(prefix, |this, prefix| this.list_blocking(&prefix))
            .await
    }

    async fn list_info(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.blocking(prefix, |this, prefix| this.list_info_blocking(&prefix))
            .await
    }
}

#[async_trait]
impl WriteStore for LocalStore {
    async fn put_new(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        self.blocking(key, move |this, key| {
            this.put_new_blocking(&key, &data, true)
        })
        .await
    }

    async fn put_replace(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.blocking(key, move |this, key| this.put_replace_blocking(&key, &data))
            .await
    }

    async fn modified(&self, key: &str) -> Result<Option<std::time::SystemTime>, StoreError> {
        let path = self.path(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() => {
                meta.modified().map(Some).map_err(|e| self.io_error(key, e))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_error(key, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io_error(key, e)),
        }
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.blocking("", |this, _| {
            let root = match fs::File::open(&this.root) {
                Ok(root) => root,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(this.io_error("", e)),
            };
            nix::unistd::syncfs(&root).map_err(|e| this.io_error("", e.into()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreHandle;
    use crate::store::contract::check_store_contract;

    #[tokio::test]
    async fn local_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        check_store_contract(&StoreHandle::full(LocalStore::new(dir.path()))).await;
    }

    #[tokio::test]
    async fn put_replace_refreshes_an_aged_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store
            .put_new("chunks/ab/x", Bytes::from_static(b"x"))
            .await
            .unwrap();
        let long_ago = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30);
        fs::File::options()
            .write(true)
            .open(dir.path().join("chunks/ab/x"))
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        assert_eq!(store.modified("chunks/ab/x").await.unwrap(), Some(long_ago));
        assert_eq!(
            store.list_modified("chunks/").await.unwrap(),
            vec![("chunks/ab/x".to_string(), long_ago)]
        );
        store
            .put_replace("chunks/ab/x", Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert!(store.modified("chunks/ab/x").await.unwrap().unwrap() > long_ago);
        assert_eq!(
            fs::read_dir(dir.path().join("chunks/ab")).unwrap().count(),
            1
        );
        assert_eq!(store.modified("chunks/ab/none").await.unwrap(), None);
    }

    #[tokio::test]
    async fn no_temp_files_left_and_none_listed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store
            .put_new("a/b", Bytes::from_static(b"x"))
            .await
            .unwrap();
        fs::write(dir.path().join("a/.tmp-c-123"), b"partial").unwrap();
        assert_eq!(store.list("a/").await.unwrap(), vec!["a/b".to_string()]);
        assert_eq!(fs::read_dir(dir.path().join("a")).unwrap().count(), 2);
    }
}
