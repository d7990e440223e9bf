//! The commands over a parcel's stored versions: `isrctl import`, `ls`,
//! `info`, `history`, `export` and `verify`. Argument handling and
//! presentation over `isr::import`, `isr::parcel` and `isr::export`; none
//! needs isrfsd.
//!
//! Uses [`crate::context`], [`crate::credentials`] and [`crate::output`]
//! (see the layering in `main.rs`).

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use isr::chunk::{ChunkRef, ChunkTag};
use isr::error::{Classify, ErrorClass};
use isr::import::ImportRequest;
use isr::manifest::Manifest;
use isr::parcel::{self, OpenParcel};
use isr::store::StoreHandle;

use crate::context::{CommandContext, failure, parse_target};
use crate::credentials::Purpose;
use crate::output::{self, Bar};

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

/// `isrctl verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Parcel, optionally with a version: NAME or NAME@VERSION (default: newest).
    target: String,
    /// Also decrypt every chunk and check its plaintext against its key.
    #[arg(long)]
    deep: bool,
}

/// `isrctl import`.
pub async fn import(context: &CommandContext, args: ImportArgs) -> anyhow::Result<ExitCode> {
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

/// A parcel as `isrctl ls` lists it.
#[derive(Debug, serde::Serialize)]
pub struct ParcelListing {
    /// Parcel name.
    pub name: String,
    newest_version: Option<u64>,
    versions: usize,
    lock: Option<parcel::LockRecord>,
    /// What is wrong with the parcel's records, if something is (the rest
    /// of the store is listed all the same).
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<String>,
}

/// The parcels in the store, each with its newest version and lock holder:
/// what `isrctl ls` and the web UI list.
pub async fn parcel_listings(store: &StoreHandle) -> anyhow::Result<Vec<ParcelListing>> {
    let mut listings = Vec::new();
    for name in parcel::list_parcels(store).await? {
        let versions = parcel::list_versions(store, &name).await?;
        // One parcel's damaged lock must not hide the others.
        let (lock, problem) = match parcel::read_lock(store, &name).await {
            Ok(lock) => (lock, None),
            Err(e) if e.class() == ErrorClass::Integrity => (None, Some(e.to_string())),
            Err(e) => return Err(e.into()),
        };
        listings.push(ParcelListing {
            newest_version: versions.last().copied(),
            versions: versions.len(),
            lock,
            problem,
            name,
        });
    }
    Ok(listings)
}

/// `isrctl ls`.
pub async fn ls(context: &CommandContext) -> anyhow::Result<ExitCode> {
    let store = context.store()?;
    let listings = parcel_listings(&store).await?;
    if context.global.json {
        output::json_list("parcels", &listings)?;
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
                    match (&l.lock, &l.problem) {
                        (_, Some(problem)) => format!("? ({problem})"),
                        (Some(lock), None) => {
                            format!("{}@{} since {}", lock.holder, lock.host, lock.since)
                        }
                        (None, None) => "-".into(),
                    },
                ]
            })
            .collect();
        output::table(&["PARCEL", "NEWEST", "VERSIONS", "LOCKED BY"], &rows);
    }
    Ok(ExitCode::SUCCESS)
}

/// Per-version facts shown by `info` and `history`.
#[derive(Debug, serde::Serialize)]
pub struct VersionListing {
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

pub async fn version_listings(
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

/// `isrctl info`.
pub async fn info(context: &CommandContext, args: InfoArgs) -> anyhow::Result<ExitCode> {
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
            "locked by   {}",
            isr::error::printable(&format!(
                "{}@{} since {}",
                lock.holder, lock.host, lock.since
            ))
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

/// `isrctl history`.
pub async fn history(context: &CommandContext, name: &str) -> anyhow::Result<ExitCode> {
    let store = context.store()?;
    let parcel = context.open_parcel(&store, name).await?;
    let versions = version_listings(&store, &parcel).await?;
    if context.global.json {
        output::json_list("versions", &versions)?;
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

/// `isrctl export`.
pub async fn export(context: &CommandContext, args: ExportArgs) -> anyhow::Result<ExitCode> {
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

/// `isrctl verify`.
pub async fn verify(context: &CommandContext, args: VerifyArgs) -> anyhow::Result<ExitCode> {
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
        Ok(failure(ErrorClass::Integrity))
    }
}
