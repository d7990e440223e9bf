//! Configuration: TOML files, then environment and flags (applied by the front end).
//!
//! Files read, later ones overriding earlier ones key by key:
//! `/etc/isr/config.toml`, then `$XDG_CONFIG_HOME/isr/config.toml` (default
//! `~/.config/isr/config.toml`). An explicit `--config FILE` / `ISR_CONFIG` replaces
//! both. Unknown keys are errors naming the key and the file. Every key:
//!
//! ```toml
//! store = "/srv/isr"            # path, file:///path, s3://bucket/prefix, https://host/prefix
//! read_url = "https://cdn/isr"   # optional: an HTTP cache/CDN in front of the store; chunks are read there
//! state_dir = "/var/lib/isr"     # session state
//! cache_dir = "/var/cache/isr"   # local chunk cache
//! runtime_dir = "/run/isr"       # control socket, default mount points
//!
//! [s3]                           # anything unset falls back to AWS_* variables
//! endpoint = "http://127.0.0.1:8333"
//! region = "us-east-1"
//! access_key_id = "…"
//! secret_access_key = "…"
//! allow_http = true
//! virtual_hosted_style = false
//!
//! [retry]                        # transient store errors
//! attempts = 6
//! initial_backoff_ms = 200
//! max_backoff_ms = 5000
//! request_timeout_secs = 60
//!
//! [import]
//! chunk_size = 131072            # power of two, 64 KiB – 4 MiB; fixed per parcel
//! zstd_level = 3
//! jobs = 0                       # encoder threads; 0 = one per core
//! uploads = 16                   # concurrent store requests
//!
//! [fetch]                        # the daemon's chunk downloads
//! parallel = 16                  # downloads in flight
//! reserved_for_demand = 4        # of those, only for reads that are waiting
//! give_up_after_secs = 300       # a failing chunk's readers get EIO after this
//! prefetch = true                # fetch everything in the background after resume
//!
//! [upload]                     # the daemon's uploads of a session's changes
//! trickle = true                 # upload changed chunks in the background while resumed
//! quiet_secs = 30                # ... once nobody has changed them for this long
//! rate_bytes_per_sec = 0         # trickle rate limit; 0 = half the observed rate of one upload
//! parallel = 8                   # uploads in flight during sync/checkin
//!
//! [cache]
//! max_bytes = 68719476736        # local chunk cache size (64 GiB)
//!
//! [kdf]                          # argon2id cost of new passphrase keyslots
//! memory_kib = 65536             # at most 4194304 (4 GiB)
//! iterations = 3                 # at most 64
//! parallelism = 1                # at most 64 (a keyslot beyond these is refused as corrupt)
//!
//! [vmm]                          # how isrfsd runs a parcel's VM (`isrctl resume`)
//! qemu = "qemu-system-x86_64"    # the QEMU binary (a name on PATH, or a path)
//! accel = "tcg"                  # QEMU's -accel: "tcg" (works anywhere), "kvm", "kvm:tcg"
//! libvirt_uri = "qemu:///session"  # libvirt connection for `--vmm libvirt`
//!
//! [gc]
//! grace_secs = 86400             # `isrctl gc` deletes no chunk written or refreshed more
//!                                # recently than this; writers (import, checkin) refresh
//!                                # chunks they reuse that are older than a quarter of it
//!                                # and commit within half of it (see isr::gc). Every
//!                                # machine writing to a store must use the same value.
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::chunk::{self, DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL};
use crate::error::{Classify, ErrorClass};
use crate::fetch::FetchSettings;
use crate::gc::GcSettings;
use crate::import::ImportSettings;
use crate::keys::KdfParams;
use crate::session::UploadSettings;
use crate::store::{RetrySettings, S3Settings};
use crate::vmm::supervise::VmmSettings;

/// Errors loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A file is not valid TOML or has an unknown key / wrong type.
    #[error("config file {}: {message}", path.display())]
    Parse {
        /// File.
        path: PathBuf,
        /// toml's message (names the key).
        message: String,
    },
    /// A value is out of range.
    #[error("invalid {key}: {reason}")]
    Invalid {
        /// Key, dotted.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

impl Classify for ConfigError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Invalid
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    store: Option<String>,
    read_url: Option<String>,
    state_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    runtime_dir: Option<PathBuf>,
    #[serde(default)]
    s3: S3Settings,
    #[serde(default)]
    retry: RetryFile,
    #[serde(default)]
    import: ImportFile,
    #[serde(default)]
    kdf: KdfFile,
    #[serde(default)]
    fetch: FetchFile,
    #[serde(default)]
    cache: CacheFile,
    #[serde(default)]
    upload: UploadFile,
    #[serde(default)]
    gc: GcFile,
    #[serde(default)]
    vmm: VmmFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmmFile {
    qemu: Option<PathBuf>,
    accel: Option<String>,
    libvirt_uri: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadFile {
    trickle: Option<bool>,
    quiet_secs: Option<u64>,
    rate_bytes_per_sec: Option<u64>,
    parallel: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GcFile {
    grace_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchFile {
    parallel: Option<usize>,
    reserved_for_demand: Option<usize>,
    give_up_after_secs: Option<u64>,
    prefetch: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheFile {
    max_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryFile {
    attempts: Option<u32>,
    initial_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
    request_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportFile {
    chunk_size: Option<u32>,
    zstd_level: Option<i32>,
    jobs: Option<usize>,
    uploads: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KdfFile {
    memory_kib: Option<u32>,
    iterations: Option<u32>,
    parallelism: Option<u32>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Store URL.
    pub store: String,
    /// An `http(s)://` cache or CDN in front of the store that serves its
    /// chunks: chunk reads go there first, everything else to the store
    /// (see [`crate::store::open_tiered`]).
    pub read_url: Option<String>,
    /// Session state directory.
    pub state_dir: PathBuf,
    /// Chunk cache directory.
    pub cache_dir: PathBuf,
    /// Runtime directory (socket, mounts).
    pub runtime_dir: PathBuf,
    /// S3 connection settings.
    pub s3: S3Settings,
    /// Retry policy.
    pub retry: RetrySettings,
    /// Import tuning.
    pub import: ImportSettings,
    /// Key derivation cost for new keyslots.
    pub kdf: KdfParams,
    /// The daemon's fetch scheduler.
    pub fetch: FetchSettings,
    /// Whether the daemon prefetches every chunk after resume.
    pub prefetch: bool,
    /// Local chunk cache size limit in bytes.
    pub cache_max_bytes: u64,
    /// How the daemon uploads a session's changes.
    pub upload: UploadSettings,
    /// Garbage collection.
    pub gc: GcSettings,
    /// Running VMs.
    pub vmm: VmmSettings,
}

/// Where configuration files are looked for, in order.
pub fn default_config_files() -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("/etc/isr/config.toml")];
    if let Some(dir) = xdg_dir("XDG_CONFIG_HOME", ".config") {
        files.push(dir.join("isr/config.toml"));
    }
    files
}

fn xdg_dir(variable: &str, home_relative: &str) -> Option<PathBuf> {
    match std::env::var_os(variable) {
        Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir)),
        _ => std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|home| PathBuf::from(home).join(home_relative)),
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Default directory for `kind`: the XDG variable if set; else the system
/// directory for root; else the XDG default under `$HOME`.
fn default_dir(variable: &str, home_relative: &str, system: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(variable).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("isr");
    }
    if is_root() {
        return PathBuf::from(system);
    }
    xdg_dir(variable, home_relative)
        .map(|d| d.join("isr"))
        .unwrap_or_else(|| PathBuf::from(system))
}

/// The embedded default store: a directory under the data directory,
/// created on first use (an explicit store must exist: `isrctl init`).
pub fn default_store() -> PathBuf {
    default_dir("XDG_DATA_HOME", ".local/share", "/var/lib/isr").join("store")
}

impl Config {
    /// Loads `explicit` if given, else the default files that exist.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let mut merged = ConfigFile::default();
        match explicit {
            Some(path) => merge(&mut merged, read_file(path)?),
            None => {
                for path in default_config_files() {
                    if path.exists() {
                        merge(&mut merged, read_file(&path)?);
                    }
                }
            }
        }
        Config::resolve(merged)
    }

    /// Parses one configuration text (for tests and tools).
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        Config::resolve(parse(text, origin)?)
    }

    fn resolve(file: ConfigFile) -> Result<Config, ConfigError> {
        let data_default = default_store();
        let defaults = RetrySettings::default();
        let kdf_defaults = KdfParams::default();
        let fetch_defaults = FetchSettings::default();
        let config = Config {
            store: file
                .store
                .unwrap_or_else(|| data_default.display().to_string()),
            read_url: file.read_url.filter(|url| !url.is_empty()),
            state_dir: file
                .state_dir
                .unwrap_or_else(|| default_dir("XDG_STATE_HOME", ".local/state", "/var/lib/isr")),
            cache_dir: file
                .cache_dir
                .unwrap_or_else(|| default_dir("XDG_CACHE_HOME", ".cache", "/var/cache/isr")),
            runtime_dir: file.runtime_dir.unwrap_or_else(|| {
                default_dir("XDG_RUNTIME_DIR", ".cache/isr-runtime", "/run/isr")
            }),
            s3: file.s3,
            retry: RetrySettings {
                attempts: file.retry.attempts.unwrap_or(defaults.attempts),
                initial_backoff_ms: file
                    .retry
                    .initial_backoff_ms
                    .unwrap_or(defaults.initial_backoff_ms),
                max_backoff_ms: file.retry.max_backoff_ms.unwrap_or(defaults.max_backoff_ms),
                request_timeout_secs: file
                    .retry
                    .request_timeout_secs
                    .unwrap_or(defaults.request_timeout_secs),
            },
            import: ImportSettings {
                chunk_size: file.import.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE),
                zstd_level: file.import.zstd_level.unwrap_or(DEFAULT_ZSTD_LEVEL),
                jobs: file.import.jobs.unwrap_or(0),
                uploads: file.import.uploads.unwrap_or(16),
            },
            kdf: KdfParams {
                memory_kib: file.kdf.memory_kib.unwrap_or(kdf_defaults.memory_kib),
                iterations: file.kdf.iterations.unwrap_or(kdf_defaults.iterations),
                parallelism: file.kdf.parallelism.unwrap_or(kdf_defaults.parallelism),
            },
            fetch: FetchSettings {
                parallel: file.fetch.parallel.unwrap_or(fetch_defaults.parallel),
                reserved_for_demand: file
                    .fetch
                    .reserved_for_demand
                    .unwrap_or(fetch_defaults.reserved_for_demand),
                give_up_after: file
                    .fetch
                    .give_up_after_secs
                    .map_or(fetch_defaults.give_up_after, Duration::from_secs),
                ..fetch_defaults
            },
            prefetch: file.fetch.prefetch.unwrap_or(true),
            cache_max_bytes: file.cache.max_bytes.unwrap_or(64 << 30),
            upload: {
                let defaults = UploadSettings::default();
                UploadSettings {
                    trickle: file.upload.trickle.unwrap_or(defaults.trickle),
                    quiet: file
                        .upload
                        .quiet_secs
                        .map_or(defaults.quiet, Duration::from_secs),
                    rate_bytes_per_sec: file
                        .upload
                        .rate_bytes_per_sec
                        .filter(|&rate| rate > 0)
                        .or(defaults.rate_bytes_per_sec),
                    parallel: file.upload.parallel.unwrap_or(defaults.parallel),
                    gc_grace: Duration::from_secs(
                        file.gc.grace_secs.unwrap_or(GcSettings::DEFAULT_GRACE_SECS),
                    ),
                }
            },
            gc: GcSettings {
                grace_secs: file.gc.grace_secs.unwrap_or(GcSettings::DEFAULT_GRACE_SECS),
            },
            vmm: {
                let defaults = VmmSettings::default();
                VmmSettings {
                    qemu: file.vmm.qemu.unwrap_or(defaults.qemu),
                    accel: file.vmm.accel.unwrap_or(defaults.accel),
                    libvirt_uri: file.vmm.libvirt_uri.unwrap_or(defaults.libvirt_uri),
                }
            },
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks value ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.read_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid {
                key: "read_url",
                reason: format!(
                    "{url:?} is not an http:// or https:// URL (the read URL is a cache or CDN in front of the store)"
                ),
            });
        }
        chunk::validate_chunk_size(self.import.chunk_size).map_err(|reason| {
            ConfigError::Invalid {
                key: "import.chunk_size",
                reason,
            }
        })?;
        if !(1..=22).contains(&self.import.zstd_level) {
            return Err(ConfigError::Invalid {
                key: "import.zstd_level",
                reason: format!("{} is not between 1 and 22", self.import.zstd_level),
            });
        }
        if !(1..=1024).contains(&self.import.uploads) {
            return Err(ConfigError::Invalid {
                key: "import.uploads",
                reason: "must be between 1 and 1024".into(),
            });
        }
        if !(1..=1024).contains(&self.fetch.parallel)
            || self.fetch.reserved_for_demand >= self.fetch.parallel
        {
            return Err(ConfigError::Invalid {
                key: "fetch",
                reason: "parallel must be 1–1024 and reserved_for_demand smaller than parallel"
                    .into(),
            });
        }
        if !(1..=256).contains(&self.upload.parallel) {
            return Err(ConfigError::Invalid {
                key: "upload.parallel",
                reason: "must be between 1 and 256".into(),
            });
        }
        if self.gc.grace_secs == 0 {
            return Err(ConfigError::Invalid {
                key: "gc.grace_secs",
                reason: "must be at least 1: imports and checkins commit within half of it".into(),
            });
        }
        if self.retry.attempts == 0 {
            return Err(ConfigError::Invalid {
                key: "retry.attempts",
                reason: "must be at least 1".into(),
            });
        }
        if self.kdf.memory_kib < 8 * self.kdf.parallelism.max(1)
            || self.kdf.iterations == 0
            || self.kdf.parallelism == 0
        {
            return Err(ConfigError::Invalid {
                key: "kdf",
                reason: "memory_kib must be at least 8 × parallelism; iterations and parallelism at least 1".into(),
            });
        }
        if let Some(reason) = self.kdf.beyond_bounds() {
            return Err(ConfigError::Invalid {
                key: "kdf",
                reason: format!(
                    "{reason}: no isr could open such a keyslot; give at most memory_kib = {}, iterations = {}, parallelism = {}",
                    crate::keys::MAX_KDF_MEMORY_KIB,
                    crate::keys::MAX_KDF_ITERATIONS,
                    crate::keys::MAX_KDF_PARALLELISM
                ),
            });
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    tracing::info!("reading config file {}", path.display());
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

fn parse(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.message().to_owned()
            + &e.span()
                .map(|span| format!(" (at line {})", line_of(text, span.start)))
                .unwrap_or_default(),
    })
}

/// The 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn merge(into: &mut ConfigFile, from: ConfigFile) {
    macro_rules! take {
        ($($field:ident).+) => {
            if from.$($field).+.is_some() {
                into.$($field).+ = from.$($field).+;
            }
        };
    }
    take!(store);
    take!(read_url);
    take!(state_dir);
    take!(cache_dir);
    take!(runtime_dir);
    take!(s3.endpoint);
    take!(s3.region);
    take!(s3.access_key_id);
    take!(s3.secret_access_key);
    take!(s3.allow_http);
    take!(s3.virtual_hosted_style);
    take!(retry.attempts);
    take!(retry.initial_backoff_ms);
    take!(retry.max_backoff_ms);
    take!(retry.request_timeout_secs);
    take!(import.chunk_size);
    take!(import.zstd_level);
    take!(import.jobs);
    take!(import.uploads);
    take!(kdf.memory_kib);
    take!(kdf.iterations);
    take!(kdf.parallelism);
    take!(fetch.parallel);
    take!(fetch.reserved_for_demand);
    take!(fetch.give_up_after_secs);
    take!(fetch.prefetch);
    take!(cache.max_bytes);
    take!(upload.trickle);
    take!(upload.quiet_secs);
    take!(upload.rate_bytes_per_sec);
    take!(upload.parallel);
    take!(gc.grace_secs);
    take!(vmm.qemu);
    take!(vmm.accel);
    take!(vmm.libvirt_uri);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses() {
        let text = r#"
            store = "s3://bucket/prefix"
            read_url = "https://cdn.example/isr"
            [s3]
            endpoint = "http://127.0.0.1:8333"
            [retry]
            attempts = 2
            [import]
            chunk_size = 65536
            [kdf]
            memory_kib = 1024
            [fetch]
            parallel = 8
            prefetch = false
            [cache]
            max_bytes = 1000000
            [gc]
            grace_secs = 3600
        "#;
        let config = Config::from_toml(text, Path::new("c.toml")).unwrap();
        assert_eq!(config.store, "s3://bucket/prefix");
        assert_eq!(config.read_url.as_deref(), Some("https://cdn.example/isr"));
        assert_eq!(config.retry.attempts, 2);
        assert_eq!(
            config.retry.max_backoff_ms,
            RetrySettings::default().max_backoff_ms
        );
        assert_eq!(config.import.chunk_size, 65536);
        assert_eq!(config.kdf.memory_kib, 1024);
        assert_eq!(config.fetch.parallel, 8);
        assert!(!config.prefetch);
        assert_eq!(config.cache_max_bytes, 1_000_000);
        assert_eq!(config.gc.grace(), Duration::from_secs(3600));
        let defaults = Config::from_toml("", Path::new("c.toml")).unwrap();
        assert_eq!(defaults.gc, GcSettings::default());
        assert_eq!(defaults.gc.grace_secs, 86_400);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("stor = \"x\"\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("stor"), "{err}");
        assert!(err.to_string().contains("c.toml"), "{err}");
        let err = Config::from_toml("[import]\nchunksize = 1\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("chunksize"), "{err}");
        let err = Config::from_toml("[gc]\ngrace = 1\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("grace"), "{err}");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Config::from_toml("[import]\nchunk_size = 1000\n", Path::new("c")).is_err());
        assert!(Config::from_toml("[import]\nzstd_level = 40\n", Path::new("c")).is_err());
        assert!(Config::from_toml("[retry]\nattempts = 0\n", Path::new("c")).is_err());
        assert!(Config::from_toml("[gc]\ngrace_secs = 0\n", Path::new("c")).is_err());
        assert!(Config::from_toml("read_url = \"s3://b/p\"\n", Path::new("c")).is_err());
    }

    #[test]
    fn later_files_override_key_by_key() {
        let mut merged =
            parse("store = \"a\"\n[import]\nzstd_level = 5\n", Path::new("1")).unwrap();
        merge(
            &mut merged,
            parse("[import]\nchunk_size = 65536\n", Path::new("2")).unwrap(),
        );
        let config = Config::resolve(merged).unwrap();
        assert_eq!(config.store, "a");
        assert_eq!(config.import.zstd_level, 5);
        assert_eq!(config.import.chunk_size, 65536);
    }
}
