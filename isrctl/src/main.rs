//! `isrctl`: the command-line client of isr.
//!
//! This file owns the command line (`Cli`, `Command`), logging, the
//! dispatch to one function per command, and the process exit. The rest
//! resolves configuration and credentials, calls the library and presents
//! its results; no logic of its own beyond presentation.
//!
//! The modules, bottom up; each uses only modules of lower layers, never one
//! of its own layer or above, so there is no import circle:
//!
//! 1. [`output`] (progress bars, sizes, tables, JSON, one-line errors) and
//!    [`credentials`] (passphrase, key file, prompt): the `isr` library only.
//! 2. [`context`]: global options → configuration, store, credentials;
//!    `NAME@VERSION`; [`InvalidArgument`](context::InvalidArgument); the exit
//!    code of a command's error.
//! 3. [`daemon`]: finding or starting isrfsd, one control call.
//! 4. The commands, independent of each other: [`parcels`] (import, ls,
//!    info, history, export, verify), [`maintenance`] (gc, passwd, rollback,
//!    new-key-file, init, delete), [`session`] (resume, status, hoard,
//!    discard, unlock), [`checkin`] (sync, checkin, suspend), [`view`]
//!    (mount, umount, diff), [`watch`] (status --watch), [`settings`]
//!    (config). `parcels`, `maintenance` and `settings` need no daemon.
//! 5. [`ui`] (the web UI): its actions and listings are the commands' own
//!    functions (sync, checkin, suspend, hoard, discard, ls, history).
//! 6. `main.rs`: uses them all (and prints completions and man pages).

mod checkin;
mod context;
mod credentials;
mod daemon;
mod maintenance;
mod output;
mod parcels;
mod session;
mod settings;
mod ui;
mod view;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use isr::error::ErrorClass;

use crate::context::{CommandContext, GlobalOptions, NameArgs};

const AFTER_HELP: &str = "\
Environment (each also a global option):
  ISR_STORE            store URL: /path, file:///path, s3://bucket/prefix, https://host/prefix
  ISR_READ_URL         an http(s) cache or CDN in front of the store: chunks are read there first
  ISR_CONFIG           config file (default /etc/isr/config.toml, then $XDG_CONFIG_HOME/isr/config.toml)
  ISR_STATE_DIR        session state directory
  ISR_CACHE_DIR        local chunk cache directory
  ISR_RUNTIME_DIR      control socket and default mount points
  ISR_PASSPHRASE       the parcel passphrase itself (for scripts)
  ISR_PASSPHRASE_FILE  file holding the passphrase
  ISR_KEY_FILE         key file (for unattended machines)
  ISR_LOG              log filter (e.g. info, debug); logs go to stderr
  AWS_*                S3 credentials, region and endpoint when not in the config file
  ISR_S3_INSTANCE_METADATA=1  let S3 take credentials from the EC2 instance metadata service
                       (never asked otherwise)

Exit codes:
  0  success
  1  other error
  2  invalid usage, argument, name or configuration
  3  wrong passphrase or key file, or no way to ask for one
  4  store, parcel, version or input path not found
  5  conflict: parcel exists or is locked (resumed), or a version was committed concurrently
  6  store unreachable after retries
  7  data integrity: bad or missing chunks, corrupt manifest

Every error prints one line on stderr saying what failed and what to do next.

With --json, stdout is always exactly one JSON object with a top-level field
\"schema\": 1 (the version of these documents), errors too:
  {\"schema\": 1, \"error\": {\"class\": \"not_found\", \"exit_code\": 4, \"message\": \"...\", \"hint\": \"...\"}}
and the exit code is the same as without --json.";

/// isr: Internet Suspend/Resume. A VM's disk, memory and config, kept as
/// encrypted, content-addressed chunks in a store, versioned, and
/// reconstructible on any machine.
#[derive(Debug, Parser)]
#[command(name = "isrctl", version, after_help = AFTER_HELP, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalOptions,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a parcel from files or a directory, or add a version to one.
    ///
    /// With one directory, the parcel's tree is that directory's contents;
    /// otherwise each PATH becomes a top-level entry under its own name. Only
    /// regular files and directories are accepted. Chunks already in the store are
    /// not uploaded again, so an interrupted import can simply be run again.
    Import(parcels::ImportArgs),
    /// List the parcels in the store with their newest version and lock holder.
    Ls,
    /// Show a parcel's record, lock and versions with sizes and dates (--files: per file).
    Info(parcels::InfoArgs),
    /// Show a parcel's versions: date, host, parent, new bytes, message.
    History(NameArgs),
    /// Rebuild a version's files byte for byte into a new or empty directory.
    Export(parcels::ExportArgs),
    /// Check that every chunk of a version exists and is intact.
    ///
    /// Lists every bad chunk (missing, truncated, replaced, undecryptable) and
    /// exits with code 7 if there is any.
    Verify(parcels::VerifyArgs),
    /// Lock a parcel, mount its newest (or given) version lazily, start its VM.
    ///
    /// Asks isrfsd (started if it is not running) to take the parcel's lock in
    /// the store and mount it; prints the mount path and returns. Reads of data
    /// not yet local wait for exactly that chunk while the rest is prefetched
    /// (the memory image first). Then starts the VM its vm.toml describes (see
    /// --vmm): from the memory image when the parcel has one (the image is
    /// consumed: after a crash the VM boots from its disks), otherwise it
    /// boots; returns once the VM runs (the VM's details go to stderr, its
    /// serial console to <runtime dir>/vm/NAME/serial.log). After a crash of
    /// isrfsd or QEMU, resume reattaches the session with every fsynced write
    /// intact and starts the VM again.
    Resume(session::ResumeArgs),
    /// Show resumed sessions: mount, chunks local/total, dirty data, fetches, errors.
    Status(session::StatusArgs),
    /// Fetch every chunk of a resumed parcel and wait, so it keeps working offline.
    Hoard(NameArgs),
    /// Commit a resumed parcel's current state as a new version; it stays mounted.
    ///
    /// The version is one point in time: every write either made it entirely
    /// or not at all. Only chunks not yet in the store are uploaded (most are
    /// usually there already: the daemon trickles changes up in the background).
    ///
    /// With a VM running, the version holds its disks alone, as after a power
    /// cut: its memory is not saved (in lazy mode the live RAM file is left out
    /// of the version and not uploaded), so resuming that version boots the VM.
    /// `isrctl suspend` saves memory and disks together.
    Sync(checkin::SyncArgs),
    /// Commit a resumed parcel as a new version, unmount it, release its lock.
    ///
    /// From the start of the checkin the mount is read-only. Only chunks not
    /// yet in the store are uploaded; the version becomes visible in one step.
    /// The local cache is kept (the next resume here is fast) unless --wipe.
    /// Interrupted or killed, run it again: it finishes without uploading
    /// twice or making a second version. If someone broke the lock, nothing is
    /// committed and the changes are kept: save them with --as NEW-NAME.
    Checkin(checkin::CheckinArgs),
    /// Save the VM's memory into the mount, stop it, and check the parcel in.
    ///
    /// For a VM isrfsd runs (QEMU): stops the guest, migrates its memory into
    /// the parcel's memory image (QEMU >= 9: mapped-ram, so unchanged memory
    /// gives unchanged chunks), quits QEMU, then checks in as `isrctl checkin`
    /// does. If the save fails, nothing is committed and the VM goes on
    /// running; if QEMU died, nothing is committed and `isrctl resume` boots it
    /// again. Without a VM under isrfsd (--vmm none) it is `isrctl checkin`.
    /// Interrupted, run it again.
    Suspend(checkin::SuspendArgs),
    /// Unmount a resumed parcel, drop its local changes and release its lock.
    Discard(NameArgs),
    /// Break a parcel's lock (the holder's unsaved changes can no longer be committed).
    Unlock(session::UnlockArgs),
    /// Delete old versions and the chunks no remaining version uses.
    ///
    /// Versions: with --keep-last and/or --keep-days, a version is kept if it is
    /// among the newest N or younger than D days, or is the base of the parcel's
    /// current session; the newest is always kept, and only the oldest versions
    /// before the first kept one are deleted. Without either option no version
    /// is deleted. Chunks: deleted when no remaining version of any parcel uses
    /// them and they were written more than the grace period ago (so uploads of
    /// a running import or checkin are safe). Every parcel must unlock (its
    /// manifests are encrypted); if one does not, nothing is deleted.
    Gc(maintenance::GcArgs),
    /// Change the passphrase (or key file) that unlocks a parcel.
    ///
    /// Unlocks with the current credentials, writes a keyslot for the new
    /// passphrase (asked twice, or --new-passphrase-file) or key file
    /// (--new-key-file), then deletes the keyslot the current credentials
    /// opened; other keyslots stay unless --replace-all. Chunks and manifests
    /// are not touched: the parcel key itself stays the same.
    Passwd(maintenance::PasswdArgs),
    /// Make a new version whose content is an earlier version's.
    ///
    /// Takes the parcel's lock (fails with exit code 5 if it is locked),
    /// commits version newest+1 with VERSION's files and VERSION as its parent,
    /// and releases the lock. Nothing is uploaded and no version is removed.
    Rollback(maintenance::RollbackArgs),
    /// Mount any version read-only on an existing directory, without the lock.
    ///
    /// For restoring files: the version appears at DIR (through isrfsd, which
    /// is started if it is not running), fetched lazily like a resumed parcel
    /// but never prefetched; every write fails with EROFS. The parcel's lock is
    /// not taken, so it works while the parcel is resumed here or elsewhere.
    /// `isrctl umount DIR` ends it; so does a stop of isrfsd. Without
    /// arguments, lists the views mounted now.
    Mount(view::MountArgs),
    /// End a read-only mount made by `isrctl mount`.
    Umount(view::UmountArgs),
    /// Show which files and chunks changed between two versions.
    ///
    /// Files added, removed and modified (with their sizes, and the chunks and
    /// bytes that differ), and the stored chunks the newer version has that the
    /// older lacks. Reads the two manifests only; no chunk is downloaded.
    Diff(view::DiffArgs),
    /// Create a store: a local directory (or an S3 prefix) with its marker.
    ///
    /// A store given with --store, ISR_STORE or the config file must exist:
    /// commands refuse a missing one (exit 4) so a typo does not start a new,
    /// empty store; only the default store is created on first use. For S3 it
    /// checks that the bucket answers with the credentials given. Running it
    /// on an existing store changes nothing and succeeds.
    Init(maintenance::InitArgs),
    /// Delete a parcel: its versions, keyslots and record (needs --yes).
    ///
    /// Refused with exit code 5 while the parcel is locked (resumed
    /// somewhere). Needs no passphrase: it also removes a parcel whose import
    /// never finished. Chunks are left for `isrctl gc`, which deletes those no
    /// other parcel uses once its grace period has passed.
    Delete(maintenance::DeleteArgs),
    /// Write a new random key file (mode 0600) for unattended machines.
    ///
    /// Use it with `--key-file FILE` (or ISR_KEY_FILE) when importing, to add a
    /// key-file keyslot, and when resuming on a kiosk.
    NewKeyFile {
        /// Where to write the key file (must not exist).
        path: PathBuf,
    },
    /// Show the effective configuration and where each value came from.
    ///
    /// Each key with its value and its source: default, config file (with
    /// line), environment variable or option. S3 secrets are never shown.
    /// docs/config.example.toml documents every key.
    Config,
    /// Print a shell completion script on stdout.
    ///
    /// e.g. `isrctl completions bash > /etc/bash_completion.d/isrctl`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (isrctl.1 and one per command) into DIR.
    ///
    /// e.g. `isrctl man /usr/local/share/man/man1`.
    Man {
        /// Directory to write the pages into (created if missing).
        dir: PathBuf,
    },
    /// Serve a local web page on this machine's sessions and the store's parcels.
    ///
    /// A live chunk map per file of each resumed parcel (zero, remote,
    /// fetching, local, changed, uploading), fetch and upload rates, bytes to go and
    /// an ETA, the VM's state and the resume's timeline; the parcels with
    /// their versions and lock holders; and sync, hoard, suspend, checkin and
    /// discard. Listens on 127.0.0.1 only and answers only requests with the
    /// random token of the URL it prints (--json: {"schema":1,"url":...});
    /// opens it with xdg-open on a desktop. Runs until Ctrl-C or SIGTERM.
    /// Versions are listed when a passphrase (ISR_PASSPHRASE,
    /// --passphrase-file) or key file is given: the UI never prompts.
    Ui(ui::UiArgs),
    /// The isrfsd daemon: whether it runs, or stop it.
    ///
    /// The daemon isrctl starts exits 30 s after its last session ends; under
    /// systemd it is the isrfsd service (use systemctl).
    #[command(subcommand)]
    Daemon(DaemonCommand),
}

/// `isrctl daemon` subcommands.
#[derive(Debug, Subcommand)]
enum DaemonCommand {
    /// Whether isrfsd runs: pid, socket, sessions, log directory (--json).
    Status,
    /// Stop isrfsd as SIGTERM does: VMs saved, sessions flushed and left
    /// resumable; waits until it has exited.
    Stop,
}

/// Runs one command: its exit code, or its error for [`main`] to report.
async fn run(global: GlobalOptions, command: Command) -> anyhow::Result<ExitCode> {
    // These need no configuration: they must work before there is one.
    match &command {
        Command::NewKeyFile { path } => return maintenance::new_key_file(path, global.json),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut command = Cli::command();
            clap_complete::generate(*shell, &mut command, "isrctl", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man { dir } => return write_man_pages(dir, global.json),
        _ => {}
    }
    let context = CommandContext::new(global)?;
    if let Command::Ui(args) = command {
        // The server's handlers share the context past this call.
        return ui::ui(context, args).await;
    }
    let context = &context;
    if matches!(
        command,
        Command::Import(_)
            | Command::Ls
            | Command::Info(_)
            | Command::History(_)
            | Command::Export(_)
            | Command::Verify(_)
            | Command::Resume(_)
            | Command::Unlock(_)
            | Command::Gc(_)
            | Command::Passwd(_)
            | Command::Rollback(_)
            | Command::Delete(_)
            | Command::Diff(_)
    ) || matches!(&command, Command::Mount(args) if args.mounts_a_version())
    {
        // A mistyped store is an error, not a new empty store.
        context.require_store().await?;
    }
    match command {
        Command::Import(args) => parcels::import(context, args).await,
        Command::Ls => parcels::ls(context).await,
        Command::Info(args) => parcels::info(context, args).await,
        Command::History(args) => parcels::history(context, &args.name).await,
        Command::Export(args) => parcels::export(context, args).await,
        Command::Verify(args) => parcels::verify(context, args).await,
        Command::Resume(args) => session::resume(context, args).await,
        Command::Status(args) if args.watch => {
            watch::watch(context, args.name.as_deref(), args.count)
        }
        Command::Status(args) => session::status(context, args),
        Command::Hoard(args) => session::hoard(context, &args.name),
        Command::Discard(args) => session::discard(context, &args.name).await,
        Command::Unlock(args) => session::unlock(context, args).await,
        Command::Sync(args) => checkin::sync(context, args).await,
        Command::Checkin(args) => checkin::checkin(context, args).await,
        Command::Suspend(args) => checkin::suspend(context, args).await,
        Command::Gc(args) => maintenance::gc(context, args).await,
        Command::Passwd(args) => maintenance::passwd(context, args).await,
        Command::Rollback(args) => maintenance::rollback(context, args).await,
        Command::Mount(args) => view::mount(context, args).await,
        Command::Umount(args) => view::umount(context, args).await,
        Command::Diff(args) => view::diff(context, args).await,
        Command::Config => settings::show(context),
        Command::Daemon(DaemonCommand::Status) => daemon::status(context),
        Command::Daemon(DaemonCommand::Stop) => daemon::stop(context),
        Command::Init(args) => maintenance::init(context, args).await,
        Command::Delete(args) => maintenance::delete(context, args).await,
        Command::NewKeyFile { .. }
        | Command::Completions { .. }
        | Command::Man { .. }
        | Command::Ui(_) => {
            unreachable!("handled above")
        }
    }
}

/// `isrctl man DIR`: isrctl.1 and isrctl-COMMAND.1 for each command.
fn write_man_pages(dir: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let command = Cli::command();
    let mut written = Vec::new();
    let mut write = |name: String, page: clap::Command| -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut buffer = Vec::new();
        clap_mangen::Man::new(page).render(&mut buffer)?;
        std::fs::write(&path, buffer).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        Ok(())
    };
    for sub in command.get_subcommands() {
        let name = format!("isrctl-{}", sub.get_name());
        let page = sub
            .clone()
            .display_name(name.clone())
            .bin_name(name.clone());
        write(name, page)?;
    }
    write("isrctl".into(), command.clone())?;
    output::outcome(
        json,
        &serde_json::json!({ "pages": written }),
        &format!("wrote {} man pages into {}", written.len(), dir.display()),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `ISR_LOG`'s filter, or `None` (with a one-line warning naming the
/// variable) when it is set but not a valid filter.
fn log_filter_from_env() -> Option<tracing_subscriber::EnvFilter> {
    let value = std::env::var("ISR_LOG").ok()?;
    match tracing_subscriber::EnvFilter::try_new(&value) {
        Ok(filter) => Some(filter),
        Err(e) => {
            eprintln!(
                "isrctl: warning: ignoring ISR_LOG={value:?}: {e}; use a level (error, warn, info, debug, trace) or a filter like isr=debug"
            );
            None
        }
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "info",
        _ => "debug",
    };
    let filter =
        log_filter_from_env().unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// Ends the process quietly when stdout is a closed pipe (`isrctl ls | head -1`),
/// as a program killed by SIGPIPE would (Rust ignores SIGPIPE, so `println!`
/// panics instead); every other panic is reported as usual.
fn exit_quietly_on_broken_pipe() {
    /// What a shell reports for a program killed by SIGPIPE: 128 + 13. A
    /// signal's status, not one of the error classes' exit codes.
    const EXIT_BROKEN_PIPE: i32 = 128 + 13;
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(EXIT_BROKEN_PIPE);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    exit_quietly_on_broken_pipe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            use clap::error::ErrorKind;
            let json = std::env::args_os().any(|a| a == "--json");
            if json
                && !matches!(
                    error.kind(),
                    ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
                )
            {
                let message = error.kind().as_str().unwrap_or("invalid usage");
                let detail = error.to_string();
                let first = detail.lines().next().unwrap_or(message);
                let first = first.trim_start_matches("error: ");
                let document = output::error_document(
                    ErrorClass::Invalid,
                    &format!("{first}; see `isrctl --help`"),
                );
                println!("{document:#}");
                eprint!("{error}");
                return context::failure(ErrorClass::Invalid);
            }
            error.exit();
        }
    };
    init_logging(cli.global.verbose, cli.global.quiet);
    output::set_quiet(cli.global.quiet);
    let json = cli.global.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("isrctl-io")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            if json {
                let line = format!("cannot start the async runtime: {e}");
                println!("{:#}", output::error_document(ErrorClass::Other, &line));
            }
            eprintln!("isrctl: cannot start the async runtime: {e}");
            return context::failure(ErrorClass::Other);
        }
    };
    match runtime.block_on(run(cli.global, cli.command)) {
        Ok(code) => code,
        Err(error) => {
            let line = output::one_line(&error);
            let class = context::error_class(&error);
            if json {
                println!("{:#}", output::error_document(class, &line));
            }
            eprintln!("isrctl: {line}");
            context::failure(class)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
