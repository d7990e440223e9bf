//! `isrctl sync`, `isrctl checkin` and `isrctl suspend`: ask isrfsd to commit a
//! resumed parcel's state as a new version (checkin also unmounts and releases
//! it; suspend first saves the VM's memory into the mount and stops the VM).
//! A daemon restarted since the resume is handed what it needs to reopen the
//! session.
//!
//! Uses [`crate::daemon`], [`crate::context`], [`crate::credentials`] and
//! [`crate::output`] (see the layering in `main.rs`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use isr::control::{ControlError, Reopen, Request, Response, WireParcel};
use isr::error::ErrorClass;
use isr::keys::ParcelSecrets;
use isr::parcel::{self, OpenParcel};
use isr::session::{CommitReport, SessionError};
use isr::vmm::supervise::SuspendReport;

use crate::context::CommandContext;
use crate::credentials::Purpose;
use crate::daemon::{self, ensure_daemon};
use crate::output;

/// `isrctl checkin`.
#[derive(Debug, Args)]
pub struct CheckinArgs {
    /// Parcel.
    name: String,
    /// A message recorded with the version (shown by `isrctl history`).
    #[arg(long, short, default_value = "")]
    message: String,
    /// Also remove the parcel's chunks from this machine's cache.
    #[arg(long)]
    wipe: bool,
    /// Save the session as version 1 of a new parcel NEW-NAME instead (for a
    /// session whose lock someone broke); it shares the parcel's credentials.
    #[arg(long = "as", value_name = "NEW-NAME")]
    save_as: Option<String>,
}

/// `isrctl suspend`.
#[derive(Debug, Args)]
pub struct SuspendArgs {
    /// Parcel.
    name: String,
    /// A message recorded with the version (shown by `isrctl history`).
    #[arg(long, short, default_value = "")]
    message: String,
    /// Also remove the parcel's chunks from this machine's cache.
    #[arg(long)]
    wipe: bool,
}

/// `isrctl sync`.
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Parcel.
    name: String,
    /// A message recorded with the version (shown by `isrctl history`).
    #[arg(long, short, default_value = "")]
    message: String,
}

/// Creates (or, on a rerun, reopens) the parcel a lost session is saved
/// into: same chunk size and dedup secret as `original`, so every chunk the
/// session uses is already valid for it.
async fn save_as_parcel(
    context: &CommandContext,
    original: &OpenParcel,
    new_name: &str,
) -> anyhow::Result<OpenParcel> {
    let store = context.store()?;
    parcel::validate_name(new_name)?;
    let credentials = context.credentials(new_name, Purpose::Unlock)?;
    if parcel::read_record(&store, new_name).await?.is_some() {
        let existing = parcel::open(&store, new_name, &credentials).await?;
        let fresh = parcel::list_versions(&store, new_name).await?.is_empty();
        if !fresh
            || existing.secrets.dedup_secret.as_bytes() != original.secrets.dedup_secret.as_bytes()
        {
            return Err(parcel::ParcelError::Exists {
                name: new_name.to_owned(),
            }
            .into());
        }
        return Ok(existing);
    }
    let secrets = ParcelSecrets::generate(Some(original.secrets.dedup_secret.clone()));
    Ok(parcel::create(
        &store,
        new_name,
        original.record.chunk_size,
        secrets,
        &credentials,
        context.config.kdf,
    )
    .await?)
}

/// Sends `make(reopen)` to the daemon; if it does not have the session open
/// (it was restarted) but this machine has its state, unlocks the parcel and
/// sends it again with what the daemon needs to reopen it.
async fn call_reopening(
    context: &CommandContext,
    name: &str,
    unlocked: Option<&OpenParcel>,
    make: impl Fn(Option<Box<Reopen>>) -> Request,
) -> anyhow::Result<Response> {
    if let Some(socket) = daemon::socket_if_running(context) {
        let request = make(None);
        match call_with_progress(context, socket, name, request).await {
            Err(ControlError::Daemon {
                class: ErrorClass::NotFound,
                ..
            }) if isr::session::read_record(&context.config.state_dir, name)?.is_some() => {}
            Ok(Response::Committed { report })
                if report.already_done
                    && isr::session::read_record(&context.config.state_dir, name)?.is_none()
                    && !isr::session::still_newest(
                        &context.store()?,
                        &report.parcel,
                        report.version,
                    )
                    .await? =>
            {
                // The daemon remembers a checkin, but the parcel has moved on
                // since (a rollback, an import, another machine): this is no
                // rerun of that checkin.
                return Err(SessionError::NotResumed(name.to_owned()).into());
            }
            other => return Ok(other?),
        }
    }
    if isr::session::read_record(&context.config.state_dir, name)?.is_none() {
        let store = context.store()?;
        if let Some(version) =
            isr::session::replayable_checkin(&store, &context.config.state_dir, name).await?
        {
            // An earlier run finished the checkin (and was then interrupted).
            return Ok(Response::Committed {
                report: Box::new(CommitReport::finished_earlier(name, version)),
            });
        }
        return Err(SessionError::NotResumed(name.to_owned()).into());
    }
    let parcel = match unlocked {
        Some(parcel) => parcel.clone(),
        None => context.open_parcel(&context.store()?, name).await?,
    };
    let socket = ensure_daemon(context)?;
    let reopen = Reopen {
        parcel: WireParcel::new(&parcel),
        store: daemon::wire_store(context),
    };
    Ok(call_with_progress(context, socket, name, make(Some(Box::new(reopen)))).await?)
}

/// One control call; on a terminal, a progress line from the session's
/// upload counters while it runs.
async fn call_with_progress(
    context: &CommandContext,
    socket: PathBuf,
    name: &str,
    request: Request,
) -> Result<Response, ControlError> {
    let call = daemon::call(&socket, request);
    if !output::progress_visible() || context.global.json {
        return call.await.expect("control call task");
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("   {spinner} {msg}").expect("valid template"),
    );
    while !call.is_finished() {
        let status = Request::Status {
            parcel: Some(name.to_owned()),
        };
        if let Ok(Ok(Response::Status { sessions, .. })) = daemon::call(&socket, status).await
            && let Some(session) = sessions.first().map(|s| &s.session)
        {
            bar.set_message(format!(
                "{name}: {} chunks uploaded, {} ({}) to go",
                session.uploaded_chunks,
                session.pending_chunks,
                output::bytes(session.pending_bytes)
            ));
        }
        bar.tick();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
    call.await.expect("control call task")
}

fn print_report(context: &CommandContext, report: &CommitReport, what: &str) -> anyhow::Result<()> {
    if context.global.json {
        return output::json(report);
    }
    if !report.committed {
        println!(
            "{}: nothing changed since version {}; no new version",
            report.parcel, report.version
        );
    } else if report.already_done {
        println!(
            "{}: already {what} as version {}",
            report.parcel, report.version
        );
    } else {
        println!(
            "{}: {what} as version {} (parent {}): {} new chunks ({}); uploaded {} chunks ({}) in {:.1} s, {} were already in the store",
            report.parcel,
            report.version,
            report.parent.map_or("none".into(), |p| p.to_string()),
            report.new_chunks,
            output::bytes(report.new_bytes),
            report.uploaded_chunks,
            output::bytes(report.uploaded_bytes),
            report.seconds,
            report.present_chunks,
        );
    }
    if !report.left_out.is_empty() {
        println!(
            "{}: left out {} (the memory of a running or crashed VM, without its saved device state): this version holds the disks alone, and resuming it boots the VM",
            report.parcel,
            report.left_out.join(", ")
        );
    }
    Ok(())
}

/// `isrctl checkin NAME`.
pub async fn checkin(context: &CommandContext, args: CheckinArgs) -> anyhow::Result<ExitCode> {
    let name = args.name.as_str();
    let (unlocked, save_as) = match &args.save_as {
        Some(new_name) => {
            let original = context.open_parcel(&context.store()?, name).await?;
            let target = save_as_parcel(context, &original, new_name).await?;
            (Some(original), Some(target))
        }
        None => (None, None),
    };
    let report = checkin_parcel(
        context,
        name,
        &args.message,
        args.wipe,
        unlocked.as_ref(),
        save_as.as_ref(),
    )
    .await?;
    print_report(context, &report, "checked in")?;
    if !context.global.json {
        println!(
            "{name}: unmounted, lock released, local cache {}",
            if args.wipe { "wiped" } else { "kept" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Commits a version, unmounts the parcel and releases its lock: what
/// `isrctl checkin` and the web UI's checkin do (`save_as`: into that new
/// parcel, unlocked as `unlocked`).
pub async fn checkin_parcel(
    context: &CommandContext,
    name: &str,
    message: &str,
    wipe: bool,
    unlocked: Option<&OpenParcel>,
    save_as: Option<&OpenParcel>,
) -> anyhow::Result<CommitReport> {
    let save_as_wire = save_as.map(|p| Box::new(WireParcel::new(p)));
    let response = call_reopening(context, name, unlocked, |reopen| Request::Checkin {
        parcel: name.to_owned(),
        message: message.to_owned(),
        wipe,
        save_as: save_as_wire.clone(),
        reopen,
    })
    .await?;
    let Response::Committed { report } = response else {
        anyhow::bail!("isrfsd answered checkin with {response:?}");
    };
    Ok(*report)
}

/// `isrctl sync NAME`.
pub async fn sync(context: &CommandContext, args: SyncArgs) -> anyhow::Result<ExitCode> {
    let report = sync_parcel(context, &args.name, &args.message).await?;
    print_report(context, &report, "synced")?;
    Ok(ExitCode::SUCCESS)
}

/// Commits a version of a resumed parcel that stays mounted: what `isrctl
/// sync` and the web UI's sync do.
pub async fn sync_parcel(
    context: &CommandContext,
    name: &str,
    message: &str,
) -> anyhow::Result<CommitReport> {
    let socket =
        daemon::socket_if_running(context).ok_or_else(|| SessionError::NotResumed(name.into()))?;
    let request = Request::Sync {
        parcel: name.to_owned(),
        message: message.to_owned(),
    };
    let response = call_with_progress(context, socket, name, request).await?;
    let Response::Committed { report } = response else {
        anyhow::bail!("isrfsd answered sync with {response:?}");
    };
    Ok(*report)
}

/// Saves the VM's memory into the mount, stops it and checks the parcel in:
/// what `isrctl suspend` and the web UI's suspend do. The save is `None`
/// when isrfsd ran no VM (or an earlier run had finished the checkin).
pub async fn suspend_parcel(
    context: &CommandContext,
    name: &str,
    message: &str,
    wipe: bool,
) -> anyhow::Result<(Option<Box<SuspendReport>>, CommitReport)> {
    let response = call_reopening(context, name, None, |reopen| Request::Suspend {
        parcel: name.to_owned(),
        message: message.to_owned(),
        wipe,
        reopen,
    })
    .await?;
    match response {
        Response::Suspended { saved, report } => Ok((saved, *report)),
        // A rerun after the checkin was finished by an earlier run.
        Response::Committed { report } => Ok((None, *report)),
        other => anyhow::bail!("isrfsd answered suspend with {other:?}"),
    }
}

/// `isrctl suspend NAME`.
pub async fn suspend(context: &CommandContext, args: SuspendArgs) -> anyhow::Result<ExitCode> {
    let name = args.name.as_str();
    let (saved, report) = suspend_parcel(context, name, &args.message, args.wipe).await?;
    if context.global.json {
        return output::json(&serde_json::json!({ "saved": saved, "checkin": report }))
            .map(|()| ExitCode::SUCCESS);
    }
    match &saved {
        Some(saved) => match &saved.ram_file {
            Some(ram_file) => println!(
                "{name}: VM device state saved to {} ({}) in {:.1} s; its memory is {} (only the changed chunks are uploaded)",
                saved.memory_image.display(),
                output::bytes(saved.memory_bytes),
                saved.seconds,
                ram_file.display()
            ),
            None => println!(
                "{name}: VM memory saved to {} ({}) in {:.1} s",
                saved.memory_image.display(),
                output::bytes(saved.memory_bytes),
                saved.seconds
            ),
        },
        None => println!("{name}: no VM running under isrfsd; checking in the files as they are"),
    }
    print_report(context, &report, "checked in")?;
    println!(
        "{name}: unmounted, lock released, local cache {}; `isrctl resume {name}` continues it on any machine",
        if args.wipe { "wiped" } else { "kept" }
    );
    Ok(ExitCode::SUCCESS)
}
