//! One function per `isrctl` command: resolve inputs, call the library, print.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use isr::chunk::{ChunkRef, ChunkTag};
use isr::config::Config;
use isr::error::ErrorClass;
use isr::import::ImportRequest;
use isr::manifest::Manifest;
use isr::parcel::{self, OpenParcel};
use isr::store::{self, StoreHandle};
use isr::vmm::supervise::{VmState, VmStatus};

use crate::credentials::{self, Purpose};
use crate::output::{self, Bar};
use crate::{Command, GlobalOptions};

/// `isrctl import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Parcel name: 1–64 letters, digits, '.', '_' or '-'.
    name: String,
    /// Files (e.g. disk.img memory.img vm.toml) or one directory.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Add the next version to an existing parcel instead of creating one.
    #[arg(long)]
    new_version: bool,
    /// Chunk size of a new parcel in bytes: a power of two from 65536 to 4194304.
    #[arg(long, value_name = "BYTES")]
    chunk_size: Option<u32>,
    /// zstd compression level, 1–22 (default 3).
    #[arg(long, value_name = "N")]
    zstd_level: Option<i32>,
    /// Encoder threads (default: one per core).
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Concurrent store requests (default 16).
    #[arg(long, value_name = "N")]
    uploads: Option<usize>,
    /// A message recorded with the version (shown by `isrctl history`).
    #[arg(long, short, default_value = "")]
    message: String,
    /// New parcel only: share OTHER's dedup secret, so chunks the two parcels
    /// have in common are stored once. OTHER must open with the same credentials.
    #[arg(long, value_name = "OTHER")]
    dedup_with: Option<String>,
}

/// Commands that take a parcel name.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// Parcel name.
    name: String,
}

/// `isrctl info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Parcel name.
    name: String,
    /// Also list the newest version's files: size, chunks, zero chunks, stored bytes.
    #[arg(long)]
    files: bool,
}

/// `isrctl export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Parcel, optionally with a version: NAME or NAME@VERSION (default: newest).
    target: String,
    /// Destination: a new or empty directory.
    dir: PathBuf,
}

/// `isrctl resume`.
#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// Parcel, optionally with a version: NAME or NAME@VERSION (default: newest).
    target: String,
    /// Mount point (default: <runtime dir>/mnt/NAME).
    #[arg(long, value_name = "DIR")]
    mount: Option<PathBuf>,
    /// Who runs the VM from the mount: qemu (isrfsd starts and supervises it),
    /// libvirt (a transient domain via virsh), virtualbox (VMDK descriptors
    /// over the raw disks, then VBoxManage), none (mount only). Default: the
    /// `vmm` of the parcel's vm.toml; none without one.
    #[arg(long, value_name = "VMM", value_parser = parse_vmm)]
    vmm: Option<isr::vmm::config::VmmKind>,
    /// Stay until the VM stops: exit 0 when it was suspended or the guest
    /// powered off, 1 when QEMU died (resume returns once it runs otherwise).
    #[arg(long)]
    foreground: bool,
}

fn parse_vmm(text: &str) -> Result<isr::vmm::config::VmmKind, String> {
    text.parse()
}

/// `isrctl status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this parcel.
    name: Option<String>,
}

/// `isrctl unlock`.
#[derive(Debug, Args)]
pub struct UnlockArgs {
    /// Parcel.
    name: String,
    /// Required: breaking a lock loses the holder's unsaved changes.
    #[arg(long)]
    force: bool,
}

/// `isrctl verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Parcel, optionally with a version: NAME or NAME@VERSION (default: newest).
    target: String,
    /// Also decrypt every chunk and check its plaintext against its key.
    #[arg(long)]
    deep: bool,
}

pub(crate) struct CommandContext {
    pub(crate) global: GlobalOptions,
    pub(crate) config: Config,
}

impl CommandContext {
    pub(crate) fn store(&self) -> anyhow::Result<StoreHandle> {
        Ok(store::open(
            &self.config.store,
            &self.config.s3,
            self.config.retry,
        )?)
    }

    pub(crate) fn credentials(
        &self,
        parcel: &str,
        purpose: Purpose,
    ) -> anyhow::Result<Vec<isr::keys::Credential>> {
        credentials::gather(
            parcel,
            purpose,
            self.global.passphrase_file.as_deref(),
            self.global.key_file.as_deref(),
        )
    }

    pub(crate) async fn open_parcel(
        &self,
        store: &StoreHandle,
        name: &str,
    ) -> anyhow::Result<OpenParcel> {
        parcel::require_record(store, name).await?;
        let credentials = self.credentials(name, Purpose::Unlock)?;
        Ok(parcel::open(store, name, &credentials).await?)
    }
}

/// Splits `NAME@VERSION`.
fn parse_target(target: &str) -> anyhow::Result<(&str, Option<u64>)> {
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

/// A command-line value that makes no sense (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct InvalidArgument(pub(crate) String);

fn exit_code_for(error: &anyhow::Error) -> Option<ExitCode> {
    error
        .downcast_ref::<InvalidArgument>()
        .map(|_| ExitCode::from(isr::exit::code(ErrorClass::Invalid)))
}

/// Runs one command.
pub async fn run(global: GlobalOptions, command: Command) -> anyhow::Result<ExitCode> {
    if let Command::NewKeyFile { path } = &command {
        isr::keys::create_key_file(path)?;
        println!(
            "wrote key file {} (32 random bytes, mode 0600); keep a copy somewhere safe",
            path.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut config = Config::load(global.config.as_deref())?;
    if let Some(store) = &global.store {
        config.store = store.clone();
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
    let context = CommandContext { global, config };
    let result = match command {
        Command::Import(args) => import(&context, args).await,
        Command::Ls => ls(&context).await,
        Command::Info(args) => info(&context, args).await,
        Command::History(args) => history(&context, &args.name).await,
        Command::Export(args) => export(&context, args).await,
        Command::Verify(args) => verify(&context, args).await,
        Command::Resume(args) => resume(&context, args).await,
        Command::Status(args) => status(&context, args.name.as_deref()),
        Command::Hoard(args) => hoard(&context, &args.name),
        Command::Discard(args) => discard(&context, &args.name).await,
        Command::Unlock(args) => unlock(&context, args).await,
        Command::Sync(args) => crate::checkin::sync(&context, args).await,
        Command::Checkin(args) => crate::checkin::checkin(&context, args).await,
        Command::Suspend(args) => crate::checkin::suspend(&context, args).await,
        Command::Gc(args) => crate::maintenance::gc(&context, args).await,
        Command::Passwd(args) => crate::maintenance::passwd(&context, args).await,
        Command::Rollback(args) => crate::maintenance::rollback(&context, args).await,
        Command::NewKeyFile { .. } => unreachable!("handled above"),
    };
    match result {
        Err(error) => match exit_code_for(&error) {
            Some(code) => {
                eprintln!("isrctl: {}", output::one_line(&error));
                Ok(code)
            }
            None => Err(error),
        },
        ok => ok,
    }
}

async fn import(context: &CommandContext, args: ImportArgs) -> anyhow::Result<ExitCode> {
    let mut settings = context.config.import;
    settings.chunk_size = args.chunk_size.unwrap_or(settings.chunk_size);
    settings.zstd_level = args.zstd_level.unwrap_or(settings.zstd_level);
    settings.jobs = args.jobs.unwrap_or(settings.jobs);
    settings.uploads = args.uploads.unwrap_or(settings.uploads);
    let mut checked = context.config.clone();
    checked.import = settings;
    checked.validate()?;
    parcel::validate_name(&args.name)?;

    let store = context.store()?;
    let purpose = if args.new_version {
        Purpose::Unlock
    } else {
        Purpose::Create
    };
    let credentials = context.credentials(&args.name, purpose)?;
    let request = ImportRequest {
        name: &args.name,
        paths: &args.paths,
        new_version: args.new_version,
        settings,
        kdf: context.config.kdf,
        message: args.message.clone(),
        dedup_with: args.dedup_with.as_deref(),
        chunk_size: args.chunk_size,
        gc_grace: context.config.gc.grace(),
    };
    let summary = isr::import::import(&store, &request, &credentials, &Bar::new()).await?;
    if context.global.json {
        output::json(&summary)?;
    } else {
        println!(
            "imported parcel {} version {} into {}",
            summary.parcel,
            summary.version,
            store.url()
        );
        println!("  files               {}", summary.files);
        println!(
            "  logical bytes       {} ({})",
            output::bytes(summary.logical_bytes),
            summary.logical_bytes
        );
        println!("  chunks              {}", summary.chunks);
        println!("  zero chunks         {}", summary.zero_chunks);
        println!("  deduplicated chunks {}", summary.deduplicated_chunks);
        println!(
            "  uploaded chunks     {} ({})",
            summary.uploaded_chunks,
            output::bytes(summary.uploaded_bytes)
        );
        println!(
            "  stored bytes        {} ({})",
            output::bytes(summary.stored_bytes),
            summary.stored_bytes
        );
        println!(
            "  throughput          {:.1} MB/s ({:.2} s)",
            summary.bytes_per_second / 1e6,
            summary.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize)]
struct ParcelListing {
    name: String,
    newest_version: Option<u64>,
    versions: usize,
    lock: Option<parcel::LockRecord>,
}

async fn ls(context: &CommandContext) -> anyhow::Result<ExitCode> {
    let store = context.store()?;
    let mut listings = Vec::new();
    for name in parcel::list_parcels(&store).await? {
        let versions = parcel::list_versions(&store, &name).await?;
        listings.push(ParcelListing {
            newest_version: versions.last().copied(),
            versions: versions.len(),
            lock: parcel::read_lock(&store, &name).await?,
            name,
        });
    }
    if context.global.json {
        output::json(&listings)?;
    } else if listings.is_empty() {
        println!(
            "no parcels in {} (create one with `isrctl import NAME PATH...`)",
            store.url()
        );
    } else {
        let rows: Vec<Vec<String>> = listings
            .iter()
            .map(|l| {
                vec![
                    l.name.clone(),
                    l.newest_version.map_or("-".into(), |v| v.to_string()),
                    l.versions.to_string(),
                    l.lock.as_ref().map_or("-".into(), |lock| {
                        format!("{}@{} since {}", lock.holder, lock.host, lock.since)
                    }),
                ]
            })
            .collect();
        output::table(&["PARCEL", "NEWEST", "VERSIONS", "LOCKED BY"], &rows);
    }
    Ok(ExitCode::SUCCESS)
}

/// Per-version facts shown by `info` and `history`.
#[derive(serde::Serialize)]
struct VersionListing {
    version: u64,
    parent: Option<u64>,
    created: String,
    host: String,
    message: String,
    files: u64,
    logical_bytes: u64,
    chunks: u64,
    zero_chunks: u64,
    stored_bytes: u64,
    /// Stored bytes of chunks the previous version did not have.
    new_bytes: u64,
}

async fn version_listings(
    store: &StoreHandle,
    parcel: &OpenParcel,
) -> anyhow::Result<Vec<VersionListing>> {
    let mut listings = Vec::new();
    let mut previous: HashSet<ChunkTag> = HashSet::new();
    for version in parcel::list_versions(store, &parcel.name).await? {
        let manifest = parcel::read_manifest(store, parcel, version).await?;
        let mut distinct = HashSet::new();
        let (mut stored_bytes, mut new_bytes) = (0, 0);
        for (tag, len) in manifest.stored_chunks() {
            if distinct.insert(tag) {
                stored_bytes += len;
                if !previous.contains(&tag) {
                    new_bytes += len;
                }
            }
        }
        let zero_chunks = manifest
            .files()
            .flat_map(|(_, _, chunks)| chunks)
            .filter(|c| matches!(c, ChunkRef::Zero))
            .count() as u64;
        listings.push(VersionListing {
            version,
            parent: manifest.parent,
            created: manifest.created.to_rfc3339(),
            host: manifest.host.clone(),
            message: manifest.message.clone(),
            files: manifest.files().count() as u64,
            logical_bytes: manifest.logical_size(),
            chunks: manifest.chunk_count(),
            zero_chunks,
            stored_bytes,
            new_bytes,
        });
        previous = distinct;
    }
    Ok(listings)
}

#[derive(serde::Serialize)]
struct ParcelInfo {
    name: String,
    store: String,
    id: String,
    chunk_size: u32,
    created: String,
    keyslots: usize,
    lock: Option<parcel::LockRecord>,
    versions: Vec<VersionListing>,
    /// With `--files`: the newest version's files.
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<Vec<FileListing>>,
}

/// One file of a version (`isrctl info --files`).
#[derive(serde::Serialize)]
struct FileListing {
    path: String,
    size: u64,
    chunks: u64,
    zero_chunks: u64,
    /// Stored (compressed, encrypted) bytes of the file's distinct chunks.
    stored_bytes: u64,
}

fn file_listings(manifest: &Manifest) -> Vec<FileListing> {
    manifest
        .files()
        .map(|(path, size, chunks)| {
            let mut distinct = HashSet::new();
            let mut stored_bytes = 0;
            let mut zero_chunks = 0;
            for chunk in chunks {
                match chunk {
                    ChunkRef::Zero => zero_chunks += 1,
                    ChunkRef::Stored {
                        tag, stored_len, ..
                    } => {
                        if distinct.insert(*tag) {
                            stored_bytes += u64::from(*stored_len);
                        }
                    }
                }
            }
            FileListing {
                path: path.to_owned(),
                size,
                chunks: chunks.len() as u64,
                zero_chunks,
                stored_bytes,
            }
        })
        .collect()
}

async fn info(context: &CommandContext, args: InfoArgs) -> anyhow::Result<ExitCode> {
    let name = args.name.as_str();
    let store = context.store()?;
    let parcel = context.open_parcel(&store, name).await?;
    let versions = version_listings(&store, &parcel).await?;
    let files = match versions.last() {
        Some(newest) if args.files => Some(file_listings(
            &parcel::read_manifest(&store, &parcel, newest.version).await?,
        )),
        _ => None,
    };
    let info = ParcelInfo {
        name: name.to_owned(),
        store: store.url().to_owned(),
        id: parcel.record.id.clone(),
        chunk_size: parcel.record.chunk_size,
        created: parcel.record.created.clone(),
        keyslots: parcel::read_keyslots(&store, name).await?.len(),
        lock: parcel::read_lock(&store, name).await?,
        versions,
        files,
    };
    if context.global.json {
        output::json(&info)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("parcel      {}", info.name);
    println!("store       {}", info.store);
    println!("id          {}", info.id);
    println!("chunk size  {}", output::bytes(u64::from(info.chunk_size)));
    println!("created     {}", info.created);
    println!("keyslots    {}", info.keyslots);
    match &info.lock {
        Some(lock) => println!(
            "locked by   {}@{} since {}",
            lock.holder, lock.host, lock.since
        ),
        None => println!("locked by   nobody"),
    }
    println!();
    let rows: Vec<Vec<String>> = info
        .versions
        .iter()
        .map(|v| {
            vec![
                v.version.to_string(),
                v.created.clone(),
                v.host.clone(),
                v.files.to_string(),
                output::bytes(v.logical_bytes),
                v.chunks.to_string(),
                v.zero_chunks.to_string(),
                output::bytes(v.stored_bytes),
            ]
        })
        .collect();
    output::table(
        &[
            "VERSION", "CREATED", "HOST", "FILES", "SIZE", "CHUNKS", "ZERO", "STORED",
        ],
        &rows,
    );
    if let (Some(files), Some(newest)) = (&info.files, info.versions.last()) {
        println!();
        println!("files of version {}:", newest.version);
        let rows: Vec<Vec<String>> = files
            .iter()
            .map(|f| {
                vec![
                    f.path.clone(),
                    output::bytes(f.size),
                    f.chunks.to_string(),
                    f.zero_chunks.to_string(),
                    output::bytes(f.stored_bytes),
                ]
            })
            .collect();
        output::table(&["FILE", "SIZE", "CHUNKS", "ZERO", "STORED"], &rows);
    }
    Ok(ExitCode::SUCCESS)
}

async fn history(context: &CommandContext, name: &str) -> anyhow::Result<ExitCode> {
    let store = context.store()?;
    let parcel = context.open_parcel(&store, name).await?;
    let versions = version_listings(&store, &parcel).await?;
    if context.global.json {
        output::json(&versions)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = versions
        .iter()
        .map(|v| {
            vec![
                v.version.to_string(),
                v.parent.map_or("-".into(), |p| p.to_string()),
                v.created.clone(),
                v.host.clone(),
                output::bytes(v.new_bytes),
                v.message.clone(),
            ]
        })
        .collect();
    output::table(
        &["VERSION", "PARENT", "CREATED", "HOST", "NEW", "MESSAGE"],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

async fn open_version(
    context: &CommandContext,
    store: &StoreHandle,
    target: &str,
) -> anyhow::Result<(OpenParcel, Manifest)> {
    let (name, version) = parse_target(target)?;
    let parcel = context.open_parcel(store, name).await?;
    let version = parcel::resolve_version(store, name, version).await?;
    let manifest = parcel::read_manifest(store, &parcel, version).await?;
    Ok((parcel, manifest))
}

async fn export(context: &CommandContext, args: ExportArgs) -> anyhow::Result<ExitCode> {
    let store = context.store()?;
    let (parcel, manifest) = open_version(context, &store, &args.target).await?;
    let summary = isr::export::export(
        &store,
        &parcel,
        &manifest,
        &args.dir,
        context.config.import.uploads,
        &Bar::new(),
    )
    .await
    .with_context(|| format!("exporting {}@{}", parcel.name, manifest.version))?;
    if context.global.json {
        output::json(&summary)?;
    } else {
        println!(
            "exported {}@{} to {}: {} files, {}, {} fetched",
            parcel.name,
            manifest.version,
            args.dir.display(),
            summary.files,
            output::bytes(summary.logical_bytes),
            output::bytes(summary.fetched_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify(context: &CommandContext, args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let store = context.store()?;
    let (parcel, manifest) = open_version(context, &store, &args.target).await?;
    let report = isr::export::verify(
        &store,
        &parcel,
        &manifest,
        args.deep,
        context.config.import.uploads,
        &Bar::new(),
    )
    .await?;
    if context.global.json {
        output::json(&report)?;
    } else {
        for bad in &report.bad_chunks {
            println!(
                "BAD chunk {} ({} at offset {}): {}",
                bad.tag, bad.file, bad.offset, bad.problem
            );
        }
        println!(
            "{}@{}: {} chunks checked ({}{}), {} bad",
            report.parcel,
            report.version,
            report.chunks_checked,
            output::bytes(report.bytes_checked),
            if report.deep { ", decrypted" } else { "" },
            report.bad_chunks.len()
        );
    }
    if report.bad_chunks.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "isrctl: {} bad chunk(s) in {}@{}; the version cannot be fully restored from this store",
            report.bad_chunks.len(),
            report.parcel,
            report.version
        );
        Ok(ExitCode::from(isr::exit::code(ErrorClass::Integrity)))
    }
}

/// glibc malloc arenas for the isrfsd that isrctl starts (the systemd unit
/// sets the same). glibc's default, 8 per core, lets each FUSE thread keep
/// the 128 KiB chunk buffers it freed: 67–74 MiB peak after 4 KiB random
/// reads, 56 MiB with 2, at the same throughput (docs/decisions.md). A
/// `MALLOC_ARENA_MAX` already in the environment is kept.
const ISRFSD_MALLOC_ARENAS: &str = "2";

/// The daemon's socket, starting isrfsd first if nothing answers there.
pub(crate) fn ensure_daemon(context: &CommandContext) -> anyhow::Result<PathBuf> {
    let runtime_dir = &context.config.runtime_dir;
    let socket = isr::control::socket_path(runtime_dir);
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Ok(socket);
    }
    std::fs::create_dir_all(runtime_dir)
        .with_context(|| format!("creating {}", runtime_dir.display()))?;
    let beside_us = std::env::current_exe()?.with_file_name("isrfsd");
    let program = if beside_us.exists() {
        beside_us
    } else {
        PathBuf::from("isrfsd")
    };
    let log_path = runtime_dir.join("isrfsd.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut command = std::process::Command::new(&program);
    command
        .arg("--runtime-dir")
        .arg(runtime_dir)
        .arg("--state-dir")
        .arg(&context.config.state_dir)
        .arg("--cache-dir")
        .arg(&context.config.cache_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(config) = &context.global.config {
        command.arg("--config").arg(config);
    }
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        command.env("MALLOC_ARENA_MAX", ISRFSD_MALLOC_ARENAS);
    }
    let mut child = command.spawn().with_context(|| {
        format!(
            "starting {} (is isrfsd installed next to isrctl?)",
            program.display()
        )
    })?;
    eprintln!(
        "isrctl: started isrfsd (pid {}, log {})",
        child.id(),
        log_path.display()
    );
    for _ in 0..200 {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Ok(socket);
        }
        if let Ok(Some(status)) = child.try_wait() {
            anyhow::bail!(
                "isrfsd exited ({status}) before it was ready; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    anyhow::bail!(
        "isrfsd did not answer on {} within 10 s; see {}",
        socket.display(),
        log_path.display()
    )
}

pub(crate) fn daemon_socket_if_running(context: &CommandContext) -> Option<PathBuf> {
    let socket = isr::control::socket_path(&context.config.runtime_dir);
    std::os::unix::net::UnixStream::connect(&socket)
        .is_ok()
        .then_some(socket)
}

async fn resume(context: &CommandContext, args: ResumeArgs) -> anyhow::Result<ExitCode> {
    let (name, version) = parse_target(&args.target)?;
    let store = context.store()?;
    let parcel = context.open_parcel(&store, name).await?;
    let mount = args
        .mount
        .unwrap_or_else(|| context.config.runtime_dir.join("mnt").join(name));
    let socket = ensure_daemon(context)?;
    let request = isr::control::Request::Resume {
        parcel: Box::new(isr::control::WireParcel::new(&parcel)),
        version,
        mount,
        store: isr::control::WireStore {
            url: context.config.store.clone(),
            s3: context.config.s3.clone(),
            retry: context.config.retry,
        },
        vmm: args.vmm,
    };
    let call_socket = socket.clone();
    let response =
        tokio::task::spawn_blocking(move || isr::control::call(&call_socket, request)).await??;
    let isr::control::Response::Resumed {
        mount,
        reattached,
        vm,
        warnings,
    } = response
    else {
        anyhow::bail!("isrfsd answered resume with {response:?}");
    };
    if args.foreground && vm.as_ref().is_none_or(|vm| vm.state != VmState::Running) {
        return Err(InvalidArgument(format!(
            "--foreground waits for a VM isrfsd runs, and {name} has none running (its vm.toml names no VMM, or --vmm none, or the steps were only printed)"
        ))
        .into());
    }
    for warning in &warnings {
        eprintln!("isrctl: warning: {warning}");
    }
    if context.global.json {
        output::json(&serde_json::json!({
            "parcel": name, "mount": mount, "reattached": reattached, "vm": vm,
            "warnings": warnings,
        }))?;
    } else {
        if reattached {
            eprintln!("isrctl: reattached to the existing session of {name}");
        }
        println!("{}", mount.display());
        if let Some(vm) = &vm {
            print_vm(name, vm);
        }
    }
    if args.foreground {
        let code = wait_for_vm_exit(&socket, name).await?;
        return Ok(code);
    }
    Ok(ExitCode::SUCCESS)
}

/// What the VM of a resumed parcel is doing, on stderr (stdout keeps the mount path).
fn print_vm(name: &str, vm: &VmStatus) {
    match vm.state {
        VmState::Handed => {
            eprintln!(
                "isrctl: {} is not installed here; to run the VM of {name}, run:",
                vm.steps
                    .first()
                    .and_then(|s| s.first())
                    .map_or("its VMM", String::as_str)
            );
            for step in &vm.steps {
                eprintln!("  {}", step.join(" "));
            }
        }
        _ => {
            let how = if vm.resumed_from_memory {
                "resumed from its memory image"
            } else {
                "booted"
            };
            let mut line = format!(
                "isrctl: the VM of {name} runs ({}, {how} in {:.1} s",
                vm.kind, vm.start_seconds
            );
            if let Some(pid) = vm.pid {
                line.push_str(&format!(", pid {pid}"));
            }
            if let Some(serial) = &vm.serial_log {
                line.push_str(&format!(", serial console {}", serial.display()));
            }
            if let Some(vnc) = &vm.vnc {
                line.push_str(&format!(", VNC {vnc}"));
            }
            eprintln!("{line}); `isrctl suspend {name}` saves it and checks it in");
        }
    }
}

/// `--foreground`: polls the daemon until the VM stops running.
async fn wait_for_vm_exit(socket: &std::path::Path, name: &str) -> anyhow::Result<ExitCode> {
    loop {
        let (socket, parcel) = (socket.to_owned(), name.to_owned());
        let request = isr::control::Request::Status {
            parcel: Some(parcel),
        };
        let response =
            tokio::task::spawn_blocking(move || isr::control::call(&socket, request)).await?;
        let vm = match response {
            Ok(isr::control::Response::Status { sessions }) => {
                sessions.into_iter().next().and_then(|s| s.vm)
            }
            // Checked in or discarded from elsewhere: nothing runs any more.
            Err(isr::control::ControlError::Daemon {
                class: ErrorClass::NotFound,
                ..
            }) => None,
            Ok(other) => anyhow::bail!("isrfsd answered status with {other:?}"),
            Err(e) => return Err(e.into()),
        };
        match vm {
            Some(vm) if matches!(vm.state, VmState::Running | VmState::Busy) => {}
            Some(vm) if vm.state == VmState::Saved => {
                eprintln!("isrctl: the VM of {name} was suspended");
                return Ok(ExitCode::SUCCESS);
            }
            Some(vm) => {
                eprintln!(
                    "isrctl: the VM of {name} stopped ({}); the parcel stays mounted: `isrctl checkin {name}` commits its disks, `isrctl resume {name}` starts it again",
                    vm.exit.as_deref().unwrap_or("exited")
                );
                // A crash is a failure (a kiosk's unit restarts it); a power-off is not.
                return Ok(if vm.powered_off {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(isr::exit::code(ErrorClass::Other))
                });
            }
            None => {
                eprintln!("isrctl: {name} is no longer resumed here");
                return Ok(ExitCode::SUCCESS);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

fn status(context: &CommandContext, name: Option<&str>) -> anyhow::Result<ExitCode> {
    let sessions = match daemon_socket_if_running(context) {
        None if name.is_some() => {
            return Err(isr::session::SessionError::NotResumed(
                name.unwrap_or_default().to_owned(),
            )
            .into());
        }
        None => Vec::new(),
        Some(socket) => {
            let request = isr::control::Request::Status {
                parcel: name.map(str::to_owned),
            };
            match isr::control::call(&socket, request)? {
                isr::control::Response::Status { sessions } => sessions,
                other => anyhow::bail!("isrfsd answered status with {other:?}"),
            }
        }
    };
    if context.global.json {
        output::json(&sessions)?;
        return Ok(ExitCode::SUCCESS);
    }
    if sessions.is_empty() {
        println!("no resumed parcels (`isrctl resume NAME` mounts one)");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|s| {
            vec![
                s.parcel.clone(),
                s.base_version.to_string(),
                s.mount.display().to_string(),
                format!("{}/{}", s.chunks_local, s.chunks_total),
                format!(
                    "{} ({} chunks)",
                    output::bytes(s.dirty_bytes),
                    s.dirty_chunks
                ),
                format!("{} up, {} to go", s.uploaded_chunks, s.pending_chunks),
                s.committed_version.map_or("-".into(), |v| v.to_string()),
                output::bytes(s.fetch.fetched_bytes),
                s.fetch.in_flight.to_string(),
                (s.fetch.failures + s.fetch.verify_failures).to_string(),
                s.vm.as_ref().map_or("-".into(), |vm| {
                    let state = serde_json::to_value(vm.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    match vm.pid {
                        Some(pid) => format!("{} {state} (pid {pid})", vm.kind),
                        None => format!("{} {state}", vm.kind),
                    }
                }),
            ]
        })
        .collect();
    output::table(
        &[
            "PARCEL",
            "BASE",
            "MOUNT",
            "LOCAL/TOTAL",
            "DIRTY",
            "UPLOAD",
            "SYNCED",
            "FETCHED",
            "IN FLIGHT",
            "ERRORS",
            "VM",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

fn hoard(context: &CommandContext, name: &str) -> anyhow::Result<ExitCode> {
    let socket = daemon_socket_if_running(context)
        .ok_or_else(|| isr::session::SessionError::NotResumed(name.to_owned()))?;
    let call = {
        let (socket, parcel) = (socket.clone(), name.to_owned());
        std::thread::spawn(move || {
            isr::control::call(&socket, isr::control::Request::Hoard { parcel })
        })
    };
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "   hoarding [{bar:30}] {pos}/{len} chunks, eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        while !call.is_finished() {
            let request = isr::control::Request::Status {
                parcel: Some(name.to_owned()),
            };
            if let Ok(isr::control::Response::Status { sessions }) =
                isr::control::call(&socket, request)
                && let Some(session) = sessions.first()
            {
                bar.set_length(session.chunks_total);
                bar.set_position(session.chunks_local);
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        bar.finish_and_clear();
    }
    match call.join().expect("hoard thread")? {
        isr::control::Response::Hoarded { chunks } => {
            if context.global.json {
                output::json(&serde_json::json!({ "parcel": name, "chunks": chunks }))?;
            } else {
                println!(
                    "{name}: all {chunks} chunks are local; it keeps working without the store"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        other => anyhow::bail!("isrfsd answered hoard with {other:?}"),
    }
}

async fn discard(context: &CommandContext, name: &str) -> anyhow::Result<ExitCode> {
    if let Some(socket) = daemon_socket_if_running(context) {
        let request = isr::control::Request::Discard {
            parcel: name.to_owned(),
        };
        match tokio::task::spawn_blocking(move || isr::control::call(&socket, request)).await? {
            Ok(_) => {
                println!("discarded the local session of {name} and released its lock");
                return Ok(ExitCode::SUCCESS);
            }
            Err(isr::control::ControlError::Daemon {
                class: ErrorClass::NotFound,
                ..
            }) => {} // not mounted: maybe a stale record
            Err(e) => return Err(e.into()),
        }
    }
    // No daemon holds it: remove what a killed daemon left behind: its VM,
    // its dead mount, the lock, the session state.
    let Some(record) = isr::session::read_record(&context.config.state_dir, name)? else {
        return Err(isr::session::SessionError::NotResumed(name.to_owned()).into());
    };
    isr::vmm::supervise::stop_leftovers(
        name,
        &context.config.runtime_dir.join("vm").join(name),
        &context.config.vmm,
    );
    isr::session::detach_dead_mount(&record.mount);
    let store = context.store()?;
    match isr::session::check_lock(&store, &record).await {
        Ok(()) => {
            store
                .writer("release the lock")?
                .delete(&isr::layout::lock(name))
                .await?;
        }
        Err(e) => eprintln!("isrctl: not releasing the lock: {e}"),
    }
    let dir = isr::session::session_dir(&context.config.state_dir, name);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    println!("discarded the local session of {name} and released its lock");
    Ok(ExitCode::SUCCESS)
}

async fn unlock(context: &CommandContext, args: UnlockArgs) -> anyhow::Result<ExitCode> {
    if !args.force {
        return Err(InvalidArgument(format!(
            "breaking the lock of {} loses its holder's unsaved changes; run `isrctl unlock --force {}` if that is what you want",
            args.name, args.name
        ))
        .into());
    }
    let store = context.store()?;
    isr::parcel::require_record(&store, &args.name).await?;
    match isr::session::force_unlock(&store, &args.name).await? {
        Some(lock) => println!(
            "broke the lock of {} held by {} on {} since {}",
            args.name, lock.holder, lock.host, lock.since
        ),
        None => println!("{} was not locked", args.name),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("vm").unwrap(), ("vm", None));
        assert_eq!(parse_target("vm@12").unwrap(), ("vm", Some(12)));
        assert!(parse_target("vm@0").is_err());
        assert!(parse_target("vm@x").is_err());
    }
}
