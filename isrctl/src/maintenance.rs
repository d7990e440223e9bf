//! The commands that look after a store and its parcels' keys: `isrctl gc`,
//! `passwd`, `rollback`, `new-key-file`, `init` and `delete`. Argument handling and
//! presentation over `isr::gc`, `isr::maintenance` and `isr::keys`.
//!
//! Uses [`crate::context`], [`crate::credentials`] and [`crate::output`]
//! (see the layering in `main.rs`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use isr::error::{Classify, ErrorClass};
use isr::gc::{GcOptions, GcReport, UnlockError, Unlocker};
use isr::keys::{Credential, KeyError, Zeroizing};
use isr::parcel::{self, OpenParcel};
use isr::store::StoreHandle;

use crate::context::{CommandContext, InvalidArgument, failure};
use crate::credentials::{self, Purpose};
use crate::output::{self, Bar};

/// `isrctl gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Keep the newest N versions of every parcel (N ≥ 1).
    #[arg(long, value_name = "N")]
    keep_last: Option<u64>,
    /// Keep versions created less than D days ago.
    #[arg(long, value_name = "D")]
    keep_days: Option<u64>,
    /// Keep unreferenced chunks written less than SECS seconds ago
    /// (default: [gc] grace_secs in the config, one day). Lower it only when
    /// no import, checkin or rollback can be running.
    #[arg(long, value_name = "SECS")]
    grace: Option<u64>,
    /// Only report what would be deleted.
    #[arg(long)]
    dry_run: bool,
}

/// `isrctl passwd`.
#[derive(Debug, Args)]
pub struct PasswdArgs {
    /// Parcel.
    name: String,
    /// Read the new passphrase from FILE (first line) instead of asking twice
    /// on the terminal.
    #[arg(long, value_name = "FILE", conflicts_with = "new_key_file")]
    new_passphrase_file: Option<PathBuf>,
    /// Unlock the parcel with this key file from now on instead of a
    /// passphrase; it is created (32 random bytes, mode 0600) if it does not exist.
    #[arg(long, value_name = "FILE")]
    new_key_file: Option<PathBuf>,
    /// Also delete every other keyslot (other passphrases and key files), so
    /// only the new credential opens the parcel.
    #[arg(long)]
    replace_all: bool,
}

/// `isrctl rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// Parcel.
    name: String,
    /// The version whose content the new version gets.
    #[arg(value_name = "VERSION")]
    to_version: u64,
    /// Message recorded with the new version (default "rollback to version VERSION").
    #[arg(long, short)]
    message: Option<String>,
}

/// `isrctl init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The store to create: /path, file:///path or s3://bucket/prefix
    /// (default: the store given by --store, ISR_STORE or the config).
    #[arg(value_name = "STORE")]
    store: Option<String>,
}

/// `isrctl delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Parcel.
    name: String,
    /// Really delete it (every version; this cannot be undone).
    #[arg(long)]
    yes: bool,
}

/// Unlocks each parcel with the credentials given by option or environment;
/// on a terminal, asks for the passphrase of a parcel they do not open (after
/// trying the passphrases typed for earlier parcels).
struct CliUnlocker {
    given: Vec<Credential>,
    typed: Mutex<Vec<Zeroizing<String>>>,
    interactive: bool,
}

impl CliUnlocker {
    async fn try_typed(&self, store: &StoreHandle, name: &str) -> Option<OpenParcel> {
        let typed: Vec<Credential> = self
            .typed
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|p| Credential::Passphrase(p.clone()))
            .collect();
        if typed.is_empty() {
            return None;
        }
        parcel::open(store, name, &typed).await.ok()
    }
}

impl Unlocker for CliUnlocker {
    async fn unlock(&self, store: &StoreHandle, name: &str) -> Result<OpenParcel, UnlockError> {
        let mut refused = None;
        if !self.given.is_empty() {
            match parcel::open(store, name, &self.given).await {
                Ok(open) => return Ok(open),
                Err(e) if e.class() == ErrorClass::WrongKey => refused = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(open) = self.try_typed(store, name).await {
            return Ok(open);
        }
        if !self.interactive {
            return Err(match refused {
                Some(e) => e.into(),
                None => KeyError::NoCredential {
                    parcel: name.to_owned(),
                }
                .into(),
            });
        }
        let passphrase = credentials::prompt(name, Purpose::Unlock)
            .map_err(|e| UnlockError::new(ErrorClass::Other, e.to_string()))?;
        let open = parcel::open(store, name, &[Credential::Passphrase(passphrase.clone())]).await?;
        self.typed.lock().expect("not poisoned").push(passphrase);
        Ok(open)
    }
}

/// "1", "1–3" or "1, 3" for a list of versions.
fn versions_text(versions: &[u64]) -> String {
    match versions {
        [] => "none".into(),
        [one] => one.to_string(),
        [first, .., last] if last - first + 1 == versions.len() as u64 => {
            format!("{first}–{last}")
        }
        _ => versions
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn print_report(report: &GcReport) {
    let would = !report.applied;
    let (deleted, deleted_verb) = if would {
        ("would delete", "would be deleted")
    } else {
        ("deleted", "deleted")
    };
    println!(
        "gc of {}{}",
        report.store,
        if report.dry_run {
            " (dry run: nothing deleted)"
        } else if would {
            " (stopped: nothing deleted)"
        } else {
            ""
        }
    );
    for parcel in &report.parcels {
        let lock = parcel
            .locked_base_version
            .map_or(String::new(), |v| format!(" (locked, session base {v})"));
        if parcel.deleted_versions.is_empty() {
            println!(
                "  {}: kept versions {}{lock}, none to delete",
                parcel.name,
                versions_text(&parcel.kept_versions)
            );
        } else {
            println!(
                "  {}: {deleted} versions {}, kept {}{lock}",
                parcel.name,
                versions_text(&parcel.deleted_versions),
                versions_text(&parcel.kept_versions)
            );
        }
    }
    if report.chunks_swept {
        println!(
            "  chunks: {} in the store, {} in use; {} {deleted_verb} ({}); {} unused but written less than {} ago, kept",
            report.chunks_before,
            report.chunks_referenced,
            report.chunks_deleted,
            output::bytes(report.bytes_freed),
            report.chunks_in_grace,
            humantime::format_duration(Duration::from_secs(report.grace_secs)),
        );
    } else {
        println!("  chunks: not collected");
    }
}

/// `isrctl gc`.
pub async fn gc(context: &CommandContext, args: GcArgs) -> anyhow::Result<ExitCode> {
    if args.keep_last == Some(0) {
        return Err(InvalidArgument(
            "--keep-last must be at least 1 (the newest version is always kept)".into(),
        )
        .into());
    }
    let store = context.store()?;
    let options = GcOptions {
        keep_last: args.keep_last,
        keep_days: args.keep_days,
        grace: args
            .grace
            .map_or(context.config.gc.grace(), Duration::from_secs),
        dry_run: args.dry_run,
        parallel: context.config.import.uploads,
    };
    let unlocker = CliUnlocker {
        given: context.given_credentials()?,
        typed: Mutex::new(Vec::new()),
        interactive: credentials::terminal_available(),
    };
    let report = isr::gc::collect(&store, &options, &unlocker, &Bar::new()).await?;
    if context.global.json {
        let mut value = serde_json::to_value(&report)?;
        for (problem, json) in report
            .problems
            .iter()
            .zip(value["problems"].as_array_mut().into_iter().flatten())
        {
            json["exit_code"] = isr::exit::code(problem.class).into();
        }
        output::json(&value)?;
    } else {
        print_report(&report);
    }
    let Some(first) = report.problems.first() else {
        return Ok(ExitCode::SUCCESS);
    };
    let what = if report.applied {
        "gc deleted old versions but no chunk"
    } else {
        "gc deleted nothing"
    };
    let more = match report.problems.len() {
        1 => String::new(),
        n => format!(
            " ({} more problem(s), with parcels {})",
            n - 1,
            report.problems[1..]
                .iter()
                .map(|p| p.parcel.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    eprintln!(
        "isrctl: {}",
        isr::error::printable(&format!("{what}: {}{more}", first.message))
    );
    Ok(failure(first.class))
}

fn prompt_new_passphrase(name: &str) -> anyhow::Result<Zeroizing<String>> {
    let first = Zeroizing::new(
        rpassword::prompt_password(format!("New passphrase for parcel {name}: "))
            .context("reading the new passphrase")?,
    );
    if first.is_empty() {
        return Err(isr::keys::KeyError::UnusablePassphrase {
            what: "empty new passphrase refused; nothing was changed".into(),
        }
        .into());
    }
    let again = Zeroizing::new(
        rpassword::prompt_password("Same new passphrase again: ")
            .context("reading the new passphrase")?,
    );
    if *again != *first {
        return Err(isr::keys::KeyError::PassphraseMismatch.into());
    }
    Ok(first)
}

/// `isrctl passwd`.
pub async fn passwd(context: &CommandContext, args: PasswdArgs) -> anyhow::Result<ExitCode> {
    parcel::validate_name(&args.name)?;
    let store = context.store()?;
    store.writer("change a parcel's passphrase")?;
    parcel::require_record(&store, &args.name).await?;
    let current = context.credentials(&args.name, Purpose::Unlock)?;
    let mut created_key_file = false;
    let new = if let Some(path) = &args.new_key_file {
        if !path.exists() {
            isr::keys::create_key_file(path)?;
            created_key_file = true;
        }
        Credential::from_key_file(path)?
    } else if let Some(path) = &args.new_passphrase_file {
        Credential::Passphrase(credentials::read_passphrase_file(path)?)
    } else if credentials::terminal_available() {
        Credential::Passphrase(prompt_new_passphrase(&args.name)?)
    } else {
        return Err(InvalidArgument(format!(
            "no new passphrase for parcel {} and no terminal to ask on: pass --new-passphrase-file FILE or --new-key-file FILE",
            args.name
        ))
        .into());
    };
    // A key file created above stays even if this fails: a new keyslot may
    // already need it.
    let summary = isr::maintenance::change_credential(
        &store,
        &args.name,
        &current,
        &new,
        context.config.kdf,
        args.replace_all,
    )
    .await?;
    if context.global.json {
        output::json(&summary)?;
    } else {
        let list = |slots: &[u32]| {
            slots
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "parcel {}: new {} keyslot {} written; removed keyslot(s) {}{}",
            summary.parcel,
            summary.new_kind,
            summary.new_slot,
            list(&summary.removed_slots),
            if summary.kept_slots.is_empty() {
                String::new()
            } else {
                format!(
                    "; other keyslot(s) {} still open it",
                    list(&summary.kept_slots)
                )
            }
        );
        if created_key_file && let Some(path) = &args.new_key_file {
            print_key_file_written(path);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `isrctl rollback`.
pub async fn rollback(context: &CommandContext, args: RollbackArgs) -> anyhow::Result<ExitCode> {
    if args.to_version == 0 {
        return Err(InvalidArgument("versions are numbered from 1".into()).into());
    }
    let store = context.store()?;
    store.writer("roll back a parcel")?;
    let parcel = context.open_parcel(&store, &args.name).await?;
    let summary =
        isr::maintenance::rollback(&store, &parcel, args.to_version, args.message).await?;
    if context.global.json {
        output::json(&summary)?;
    } else {
        println!(
            "parcel {}: version {} has the content of version {} ({})",
            summary.parcel, summary.version, summary.parent, summary.message
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `isrctl init [STORE]`.
pub async fn init(context: &CommandContext, args: InitArgs) -> anyhow::Result<ExitCode> {
    let url = match &args.store {
        Some(store) => crate::context::absolute_store(store)?,
        None => context.config.store.clone(),
    };
    let store = isr::store::open(&url, &context.config.s3, context.config.retry)?;
    let existed = parcel::init_store(&store).await?;
    if context.global.json {
        output::json(&serde_json::json!({ "store": store.url(), "created": !existed }))?;
    } else if existed {
        println!("{} is already a store; nothing changed", store.url());
    } else {
        println!(
            "created store {} (use it with --store {} or ISR_STORE)",
            store.url(),
            store.url()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `isrctl delete NAME --yes`.
pub async fn delete(context: &CommandContext, args: DeleteArgs) -> anyhow::Result<ExitCode> {
    parcel::validate_name(&args.name)?;
    if !args.yes {
        return Err(InvalidArgument(format!(
            "deleting parcel {} removes every version of it for good: run `isrctl delete --yes {}`",
            args.name, args.name
        ))
        .into());
    }
    let store = context.store()?;
    let summary = isr::maintenance::delete(&store, &args.name).await?;
    if context.global.json {
        output::json(&summary)?;
    } else {
        println!(
            "deleted parcel {} ({} version(s), {} object(s)); `isrctl gc` frees the chunks no other parcel uses",
            summary.parcel,
            summary.versions.len(),
            summary.objects
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `isrctl new-key-file PATH`.
pub fn new_key_file(path: &Path, json: bool) -> anyhow::Result<ExitCode> {
    isr::keys::create_key_file(path)?;
    if json {
        output::json(&serde_json::json!({ "key_file": path, "mode": "0600", "bytes": 32 }))?;
    } else {
        print_key_file_written(path);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_key_file_written(path: &Path) {
    println!(
        "wrote key file {} (32 random bytes, mode 0600); keep a copy somewhere safe",
        path.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_lists() {
        assert_eq!(versions_text(&[]), "none");
        assert_eq!(versions_text(&[3]), "3");
        assert_eq!(versions_text(&[1, 2, 3]), "1–3");
        assert_eq!(versions_text(&[1, 3]), "1, 3");
    }
}
