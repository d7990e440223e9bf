//! Looking at versions without resuming them: `isrctl mount` (a read-only
//! view of any version, through isrfsd, without the parcel's lock), `isrctl
//! umount`, and `isrctl diff` (what changed between two versions, from their
//! manifests alone: nothing is downloaded but the two manifests).
//!
//! Uses [`crate::daemon`], [`crate::context`] and [`crate::output`] (see the
//! layering in `main.rs`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use isr::control::{ControlError, Request, Response, WireParcel};
use isr::error::ErrorClass;

use crate::context::{CommandContext, InvalidArgument, parse_target};
use crate::daemon::{self, ensure_daemon};
use crate::output;

/// `isrctl mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Parcel, optionally with a version: NAME or NAME@VERSION (default:
    /// newest). Without it, lists the views mounted now.
    #[arg(requires = "dir")]
    target: Option<String>,
    /// An existing directory to show the version in (read-only).
    dir: Option<PathBuf>,
}

impl MountArgs {
    /// Whether this mounts a version (it reads the store) rather than
    /// listing the views.
    pub fn mounts_a_version(&self) -> bool {
        self.target.is_some()
    }
}

/// `isrctl umount`.
#[derive(Debug, Args)]
pub struct UmountArgs {
    /// The directory a view is mounted on (`isrctl mount`).
    dir: PathBuf,
}

/// `isrctl diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// Parcel.
    name: String,
    /// The older version.
    from: u64,
    /// The newer version.
    to: u64,
}

/// A command-line directory as the daemon needs it: absolute (the daemon
/// runs elsewhere), canonical when it exists.
fn absolute(dir: &Path) -> anyhow::Result<PathBuf> {
    if let Ok(canonical) = std::fs::canonicalize(dir) {
        return Ok(canonical);
    }
    Ok(std::env::current_dir()?.join(dir))
}

/// An error of the class the daemon would give, said before reaching it.
fn refused(class: ErrorClass, message: String) -> anyhow::Error {
    ControlError::Daemon { class, message }.into()
}

/// `isrctl mount`.
pub async fn mount(context: &CommandContext, args: MountArgs) -> anyhow::Result<ExitCode> {
    let (Some(target), Some(arg_dir)) = (&args.target, &args.dir) else {
        return list(context).await;
    };
    let (name, version) = parse_target(target)?;
    match std::fs::metadata(arg_dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(InvalidArgument(format!(
                "{} is not a directory; give an empty directory to mount the version on",
                arg_dir.display()
            ))
            .into());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(refused(
                ErrorClass::NotFound,
                format!(
                    "{} does not exist; create an empty directory to mount the version on",
                    arg_dir.display()
                ),
            ));
        }
        // A dead mount of a killed daemon: isrfsd detaches it.
        Err(_) => {}
    }
    let dir = absolute(arg_dir)?;
    let store = context.store()?;
    let parcel = context.open_parcel(&store, name).await?;
    let socket = ensure_daemon(context)?;
    let request = Request::Mount {
        parcel: Box::new(WireParcel::new(&parcel)),
        version,
        dir,
        store: daemon::wire_store(context),
    };
    let response = daemon::call(&socket, request).await??;
    let Response::Mounted {
        parcel,
        version,
        dir,
    } = response
    else {
        anyhow::bail!("isrfsd answered mount with {response:?}");
    };
    if context.global.json {
        output::json(&serde_json::json!({
            "parcel": parcel, "version": version, "dir": dir, "read_only": true,
        }))?;
    } else {
        println!("{}", dir.display());
        eprintln!(
            "isrctl: version {version} of {parcel} is mounted read-only at {}; `isrctl umount {}` ends it",
            dir.display(),
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `isrctl mount` without arguments: the views mounted now.
async fn list(context: &CommandContext) -> anyhow::Result<ExitCode> {
    let views = match daemon::socket_if_running(context) {
        None => Vec::new(),
        Some(socket) => match daemon::call(&socket, Request::Views).await?? {
            Response::Views { views } => views,
            other => anyhow::bail!("isrfsd answered views with {other:?}"),
        },
    };
    if context.global.json {
        output::json_list("views", &views)?;
    } else if views.is_empty() {
        println!("no read-only views (`isrctl mount NAME@VERSION DIR` mounts one)");
    } else {
        let rows: Vec<Vec<String>> = views
            .iter()
            .map(|v| {
                vec![
                    v.parcel.clone(),
                    v.version.to_string(),
                    v.dir.display().to_string(),
                ]
            })
            .collect();
        output::table(&["PARCEL", "VERSION", "DIR"], &rows);
    }
    Ok(ExitCode::SUCCESS)
}

/// `isrctl umount`.
pub async fn umount(context: &CommandContext, args: UmountArgs) -> anyhow::Result<ExitCode> {
    let dir = absolute(&args.dir)?;
    let Some(socket) = daemon::socket_if_running(context) else {
        return Err(refused(
            ErrorClass::NotFound,
            format!(
                "isrfsd is not running, so no view is mounted at {}; a dead mount left there goes with `umount -l {}`",
                dir.display(),
                dir.display()
            ),
        ));
    };
    daemon::call(&socket, Request::Unmount { dir: dir.clone() }).await??;
    if context.global.json {
        output::json(&serde_json::json!({ "dir": dir, "unmounted": true }))?;
    } else {
        eprintln!("isrctl: unmounted the view at {}", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `isrctl diff`.
pub async fn diff(context: &CommandContext, args: DiffArgs) -> anyhow::Result<ExitCode> {
    if args.from == 0 || args.to == 0 {
        return Err(InvalidArgument("versions are numbered from 1".into()).into());
    }
    let store = context.store()?;
    let parcel = context.open_parcel(&store, &args.name).await?;
    let from = isr::parcel::read_manifest(&store, &parcel, args.from).await?;
    let to = isr::parcel::read_manifest(&store, &parcel, args.to).await?;
    let diff = isr::manifest::diff::diff(&from, &to);
    if context.global.json {
        output::json(&diff)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    for file in &diff.added {
        rows.push(vec![
            "added".into(),
            file.path.clone(),
            output::bytes(file.size),
            "-".into(),
        ]);
    }
    for file in &diff.removed {
        rows.push(vec![
            "removed".into(),
            file.path.clone(),
            output::bytes(file.size),
            "-".into(),
        ]);
    }
    for file in &diff.modified {
        let size = if file.old_size == file.new_size {
            output::bytes(file.new_size)
        } else {
            format!(
                "{} → {}",
                output::bytes(file.old_size),
                output::bytes(file.new_size)
            )
        };
        rows.push(vec![
            "modified".into(),
            file.path.clone(),
            size,
            format!(
                "{} chunks, {}",
                file.changed_chunks,
                output::bytes(file.changed_bytes)
            ),
        ]);
    }
    rows.sort_by(|a, b| a[1].cmp(&b[1]));
    if rows.is_empty() {
        println!(
            "versions {} and {} of {} have the same files",
            diff.from, diff.to, args.name
        );
    } else {
        output::table(&["CHANGE", "PATH", "SIZE", "CHANGED"], &rows);
    }
    println!(
        "{} files added, {} removed, {} modified, {} unchanged; {} new chunks ({} stored) in version {}, {} chunks of version {} unused",
        diff.added.len(),
        diff.removed.len(),
        diff.modified.len(),
        diff.unchanged_files,
        diff.new_chunks,
        output::bytes(diff.new_chunk_bytes),
        diff.to,
        diff.dropped_chunks,
        diff.from
    );
    Ok(ExitCode::SUCCESS)
}
