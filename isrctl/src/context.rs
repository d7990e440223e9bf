//! What every command starts from and ends with: the global options, the
//! [`CommandContext`] they resolve to (configuration, store, credentials), the
//! command-line values every command parses alike (`NAME@VERSION`), and the
//! exit code of a command's error.
//!
//! Uses only [`crate::credentials`] (see the layering in `main.rs`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use isr::config::Config;
use isr::error::ErrorClass;
use isr::keys::Credential;
use isr::parcel::{self, OpenParcel};
use isr::store::{self, StoreHandle};

use crate::credentials::{self, Purpose};

/// Options every command takes (see DESIGN.md's CLI contract).
#[derive(Debug, Args)]
pub struct GlobalOptions {
    /// Store URL: /path, file:///path, s3://bucket/prefix or https://host/prefix (read-only).
    #[arg(long, global = true, env = "ISR_STORE", value_name = "URL")]
    store: Option<String>,
    /// A cache or CDN (http:// or https://) in front of the store: chunks are read there first.
    #[arg(long, global = true, env = "ISR_READ_URL", value_name = "URL")]
    read_url: Option<String>,
    /// Configuration file (replaces the default files).
    #[arg(long, global = true, env = "ISR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Session state directory.
    #[arg(long, global = true, env = "ISR_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Local chunk cache directory.
    #[arg(long, global = true, env = "ISR_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Directory of the control socket and default mount points.
    #[arg(long, global = true, env = "ISR_RUNTIME_DIR", value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// Read the parcel passphrase from FILE instead of prompting (first line).
    #[arg(long, global = true, env = "ISR_PASSPHRASE_FILE", value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// Unlock (or, on import, also lock) the parcel with a key file.
    #[arg(long, global = true, env = "ISR_KEY_FILE", value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// No progress bars and no messages on stderr but errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

impl GlobalOptions {
    /// The configuration keys given by option or environment, each with its
    /// source (`env ISR_STORE` or `option --store`), for `isrctl config`.
    pub fn overrides(&self) -> Vec<(&'static str, String)> {
        let given = [
            ("store", self.store.clone(), "ISR_STORE", "--store"),
            (
                "read_url",
                self.read_url.clone(),
                "ISR_READ_URL",
                "--read-url",
            ),
            (
                "state_dir",
                self.state_dir.as_ref().map(|p| p.display().to_string()),
                "ISR_STATE_DIR",
                "--state-dir",
            ),
            (
                "cache_dir",
                self.cache_dir.as_ref().map(|p| p.display().to_string()),
                "ISR_CACHE_DIR",
                "--cache-dir",
            ),
            (
                "runtime_dir",
                self.runtime_dir.as_ref().map(|p| p.display().to_string()),
                "ISR_RUNTIME_DIR",
                "--runtime-dir",
            ),
        ];
        given
            .into_iter()
            .filter_map(|(key, value, variable, flag)| {
                let value = value?;
                Some((key, source_of(&value, variable, flag)))
            })
            .collect()
    }

    /// Where a parcel's credentials come from, and what says so.
    pub fn credential_source(&self) -> (String, String) {
        if let Some(path) = &self.key_file {
            let source = source_of(&path.display().to_string(), "ISR_KEY_FILE", "--key-file");
            return (format!("key file {}", path.display()), source);
        }
        if std::env::var_os("ISR_PASSPHRASE").is_some() {
            return ("passphrase (not shown)".into(), "env ISR_PASSPHRASE".into());
        }
        if let Some(path) = &self.passphrase_file {
            let source = source_of(
                &path.display().to_string(),
                "ISR_PASSPHRASE_FILE",
                "--passphrase-file",
            );
            return (format!("passphrase file {}", path.display()), source);
        }
        if credentials::terminal_available() {
            ("passphrase prompt".into(), "default (a terminal)".into())
        } else {
            (
                "none: no terminal to ask on".into(),
                "default (set ISR_PASSPHRASE, --passphrase-file or --key-file)".into(),
            )
        }
    }
}

/// `env VARIABLE` when the value is the variable's, else `option FLAG`.
fn source_of(value: &str, variable: &str, flag: &str) -> String {
    if std::env::var_os(variable).is_some_and(|v| v.to_string_lossy() == value) {
        format!("env {variable}")
    } else {
        format!("option {flag}")
    }
}

/// Commands that take a parcel name.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// Parcel name.
    pub name: String,
}

/// The global options and the configuration they select: what a command
/// needs to reach the store and unlock parcels.
pub struct CommandContext {
    pub global: GlobalOptions,
    pub config: Config,
}

impl CommandContext {
    /// Loads the configuration; a directory or store given as an option
    /// (or in the environment) overrides the file's.
    pub fn new(global: GlobalOptions) -> anyhow::Result<CommandContext> {
        let mut config = Config::load(global.config.as_deref())?;
        tracing::debug!(
            "state dir {}, cache dir {}, runtime dir {}",
            config.state_dir.display(),
            config.cache_dir.display(),
            config.runtime_dir.display()
        );
        if let Some(store) = &global.store {
            config.store = store.clone();
        }
        config.store = absolute_store(&config.store)?;
        if let Some(read_url) = &global.read_url {
            config.read_url = Some(read_url.clone()).filter(|url| !url.is_empty());
            config.validate()?;
        }
        for (flag, dir) in [
            (&global.state_dir, &mut config.state_dir),
            (&global.cache_dir, &mut config.cache_dir),
            (&global.runtime_dir, &mut config.runtime_dir),
        ] {
            if let Some(value) = flag {
                *dir = value.clone();
            }
        }
        Ok(CommandContext { global, config })
    }

    /// Fails unless the store exists, when it was named explicitly (option,
    /// environment or config file); the default store is created on first use.
    pub async fn require_store(&self) -> anyhow::Result<()> {
        let default = isr::config::default_store();
        if self.config.store == default.display().to_string() {
            return Ok(());
        }
        parcel::require_store(&self.store()?).await?;
        Ok(())
    }

    /// The store, with its read URL if one is configured.
    pub fn store(&self) -> anyhow::Result<StoreHandle> {
        tracing::info!(
            "store {}{}",
            self.config.store,
            self.config
                .read_url
                .as_ref()
                .map(|url| format!(", chunks read through {url}"))
                .unwrap_or_default()
        );
        Ok(store::open_tiered(
            &self.config.store,
            self.config.read_url.as_deref(),
            isr::layout::is_immutable,
            &self.config.s3,
            self.config.retry,
        )?)
    }

    /// Every credential given for `parcel`, prompting when none was.
    pub fn credentials(&self, parcel: &str, purpose: Purpose) -> anyhow::Result<Vec<Credential>> {
        credentials::gather(
            parcel,
            purpose,
            self.global.passphrase_file.as_deref(),
            self.global.key_file.as_deref(),
        )
    }

    /// The credentials given by option or environment, without prompting.
    pub fn given_credentials(&self) -> anyhow::Result<Vec<Credential>> {
        credentials::given(
            self.global.passphrase_file.as_deref(),
            self.global.key_file.as_deref(),
        )
    }

    pub async fn open_parcel(&self, store: &StoreHandle, name: &str) -> anyhow::Result<OpenParcel> {
        parcel::require_record(store, name).await?;
        let credentials = self.credentials(name, Purpose::Unlock)?;
        Ok(parcel::open(store, name, &credentials).await?)
    }
}

/// A relative local store path made absolute against this process's working
/// directory, before it is used or sent to isrfsd (whose working directory
/// is another). URLs and absolute paths are returned as they are.
pub fn absolute_store(store: &str) -> anyhow::Result<String> {
    let path = std::path::Path::new(store);
    // Anything with a colon before its first '/' is (maybe malformed) URL:
    // `isr::store::open` judges it (`./a:b` is the path of a file `a:b`).
    let url_like = store
        .split('/')
        .next()
        .is_some_and(|first| first.contains(':'));
    if store.is_empty() || url_like || path.is_absolute() {
        return Ok(store.to_owned());
    }
    let cwd = std::env::current_dir()
        .context("resolving the relative store path: the working directory is unreadable")?;
    Ok(cwd.join(path).display().to_string())
}

/// Splits `NAME@VERSION`.
pub fn parse_target(target: &str) -> anyhow::Result<(&str, Option<u64>)> {
    match target.rsplit_once('@') {
        None => Ok((target, None)),
        Some((name, version)) => {
            let version: u64 = version.parse().ok().filter(|&v| v > 0).ok_or_else(|| {
                InvalidArgument(format!(
                    "{target:?}: the version after '@' must be a number ≥ 1"
                ))
            })?;
            Ok((name, Some(version)))
        }
    }
}

/// A command-line value that makes no sense ([`ErrorClass::Invalid`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidArgument(pub String);

/// A command-line request that contradicts what is already so on this
/// machine ([`ErrorClass::Conflict`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConflictingArgument(pub String);

/// The class of a command's error: an [`InvalidArgument`] is invalid, a
/// [`ConflictingArgument`] a conflict, any other error is what the library
/// classifies it as.
pub fn error_class(error: &anyhow::Error) -> ErrorClass {
    if error.downcast_ref::<InvalidArgument>().is_some() {
        ErrorClass::Invalid
    } else if error.downcast_ref::<ConflictingArgument>().is_some() {
        ErrorClass::Conflict
    } else {
        isr::exit::classify(error.as_ref())
    }
}

/// The exit code of a command that failed with `class` (the codes `isrctl
/// --help` lists).
pub fn failure(class: ErrorClass) -> ExitCode {
    ExitCode::from(isr::exit::code(class))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_stores_become_absolute() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            absolute_store("isr/store").unwrap(),
            cwd.join("isr/store").display().to_string()
        );
        for same in ["/srv/isr", "s3://bucket/x", "file:///srv/isr", "s3:/bucket"] {
            assert_eq!(absolute_store(same).unwrap(), same);
        }
    }

    #[test]
    fn targets() {
        assert_eq!(parse_target("vm").unwrap(), ("vm", None));
        assert_eq!(parse_target("vm@12").unwrap(), ("vm", Some(12)));
        assert!(parse_target("vm@0").is_err());
        assert!(parse_target("vm@x").is_err());
    }

    #[test]
    fn invalid_arguments_are_invalid_wherever_they_are_wrapped() {
        let error = anyhow::Error::new(InvalidArgument("bad".into())).context("doing x");
        assert_eq!(error_class(&error), ErrorClass::Invalid);
        assert_eq!(error_class(&anyhow::anyhow!("plain")), ErrorClass::Other);
    }
}
