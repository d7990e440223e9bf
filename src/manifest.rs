//! The version record: one [`Manifest`] per committed version of a parcel.
//!
//! A manifest holds the parcel's file tree (regular files and directories only),
//! per file its size, mode, mtime and chunk list, plus the version number, the
//! parent version, the creation time, the committing host, an optional message
//! and the committer's lock nonce. It is stored encrypted with the parcel key at
//! `parcels/<name>/versions/<0000000042>.manifest`.
//!
//! Stored object (little-endian; AAD = bytes 0..40 followed by the 16-byte parcel id):
//!
//! ```text
//!  0   4  magic "ISRM"
//!  4   2  format version (1)
//!  6   2  reserved, zero
//!  8   8  version number
//! 16  24  XChaCha20 nonce (random)
//! 40   …  XChaCha20-Poly1305 ciphertext of the body, then 16-byte tag
//! ```
//!
//! Body (plaintext):
//!
//! ```text
//! 4  magic "ISRm"      8 version        8 parent (0 = none)
//! 8  created secs (i64)  4 created nanos   16 lock nonce (all zero = none)
//! 4  chunk size        str16 host       str32 message      4 entry count
//! entries, sorted by path (bytes), each:
//!   1 kind (1 = directory, 2 = file)  str16 path ('/'-separated, relative)
//!   4 mode (permission bits)  8 mtime secs (i64)  4 mtime nanos
//!   file only: 8 size  4 record count, records:
//!     1 flags = 0 (stored): 32 tag  32 key  4 stored length
//!     1 flags = 1 (zero run): 4 number of consecutive zero chunks
//! ```
//! `strN` is an N-bit length followed by UTF-8 bytes. Everything is checked
//! before use: sizes before decryption, every field against the bytes left, paths
//! for `..` and duplicates, chunk counts against file sizes.

pub mod diff;
pub mod tree;
mod wire;

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};

use crate::chunk::{self, ChunkKey, ChunkRef, ChunkTag};
use crate::error::{Classify, ErrorClass};
use crate::keys::ParcelKey;
use wire::{Reader, Truncated, Writer};

const OUTER_MAGIC: &[u8; 4] = b"ISRM";
const BODY_MAGIC: &[u8; 4] = b"ISRm";
/// Manifest format version written by this build (a root and segments, [`tree`]).
pub const FORMAT_VERSION: u16 = 2;
/// The first format: the whole manifest in one object (still read).
pub const FORMAT_WHOLE: u16 = 1;
const OUTER_HEADER_LEN: usize = 40;
const AEAD_TAG_LEN: usize = 16;
/// Largest manifest object accepted (1 GiB).
pub const MAX_MANIFEST_LEN: usize = 1 << 30;
/// Largest number of chunks in one file.
pub const MAX_CHUNKS_PER_FILE: u64 = 1 << 28;
/// Longest path inside a parcel.
pub const MAX_PATH_LEN: usize = 4096;
const FLAG_STORED: u8 = 0;
const FLAG_ZERO_RUN: u8 = 1;
const KIND_DIRECTORY: u8 = 1;
const KIND_FILE: u8 = 2;

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Timestamp {
    /// Whole seconds (negative before 1970).
    pub secs: i64,
    /// Nanoseconds, below 1e9.
    pub nanos: u32,
}

impl Timestamp {
    /// The current time.
    pub fn now() -> Timestamp {
        Timestamp::from(SystemTime::now())
    }

    /// As a `SystemTime`.
    pub fn to_system_time(self) -> SystemTime {
        if self.secs >= 0 {
            UNIX_EPOCH + Duration::new(self.secs as u64, self.nanos)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.secs.unsigned_abs())
                + Duration::from_nanos(self.nanos.into())
        }
    }

    /// RFC 3339, seconds precision, UTC.
    pub fn to_rfc3339(self) -> String {
        humantime::format_rfc3339_seconds(self.to_system_time()).to_string()
    }

    /// Milliseconds since the Unix epoch (0 before it).
    pub fn unix_ms(self) -> u64 {
        self.to_system_time()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

impl From<SystemTime> for Timestamp {
    fn from(time: SystemTime) -> Timestamp {
        match time.duration_since(UNIX_EPOCH) {
            Ok(after) => Timestamp {
                secs: after.as_secs() as i64,
                nanos: after.subsec_nanos(),
            },
            Err(before) => {
                let d = before.duration();
                let (secs, nanos) = if d.subsec_nanos() == 0 {
                    (-(d.as_secs() as i64), 0)
                } else {
                    (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
                };
                Timestamp { secs, nanos }
            }
        }
    }
}

/// What a tree entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory (its contents are the entries below its path).
    Directory,
    /// A regular file.
    File {
        /// Length in bytes.
        size: u64,
        /// One reference per chunk: `ceil(size / chunk_size)` of them.
        chunks: Vec<ChunkRef>,
    },
}

/// One file or directory of the parcel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative, '/'-separated path.
    pub path: String,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    /// Modification time.
    pub mtime: Timestamp,
    /// Directory or file.
    pub kind: EntryKind,
}

/// One version of a parcel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Version number (1 for a new parcel).
    pub version: u64,
    /// Version this one was made from.
    pub parent: Option<u64>,
    /// When the version was committed.
    pub created: Timestamp,
    /// Nonce of the lock held by the committer (none for imports without a lock).
    pub lock_nonce: Option<[u8; 16]>,
    /// Host name of the committer.
    pub host: String,
    /// Free-form message (`--message`).
    pub message: String,
    /// Chunk size of every file.
    pub chunk_size: u32,
    /// The tree, sorted by path.
    pub entries: Vec<Entry>,
}

/// Errors reading or writing a manifest; each names the manifest object.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Too short or too long to be a manifest.
    #[error(
        "manifest {object} is {len} bytes, which cannot be a valid manifest (corrupt or truncated)"
    )]
    BadLength {
        /// Object key.
        object: String,
        /// Length found.
        len: usize,
    },
    /// Not a manifest at all.
    #[error("manifest {object} has a wrong magic number (not an isr manifest, or corrupt)")]
    BadMagic {
        /// Object key.
        object: String,
    },
    /// Written by a newer isr.
    #[error(
        "manifest {object} has format version {found}; this isr reads versions {FORMAT_WHOLE} and {FORMAT_VERSION} — upgrade isr"
    )]
    UnsupportedFormat {
        /// Object key.
        object: String,
        /// Version found.
        found: u16,
    },
    /// Header says another version than the object name.
    #[error(
        "manifest {object} claims version {found} (expected {expected}): it was moved or replaced"
    )]
    VersionMismatch {
        /// Object key.
        object: String,
        /// Expected.
        expected: u64,
        /// Found.
        found: u64,
    },
    /// Authentication failed.
    #[error(
        "manifest {object} does not decrypt with this parcel's key: it is corrupt, or belongs to another parcel"
    )]
    Decrypt {
        /// Object key.
        object: String,
    },
    /// Decrypted, but the body is malformed.
    #[error("manifest {object} is malformed: {reason}")]
    Malformed {
        /// Object key.
        object: String,
        /// What is wrong.
        reason: String,
    },
    /// A segment of a format-2 manifest is damaged (or another chunk).
    #[error("manifest segment: {0}")]
    Segment(std::sync::Arc<chunk::ChunkError>),
    /// The tree given to be written is invalid.
    #[error("invalid parcel tree: {0}")]
    InvalidTree(String),
}

impl Classify for ManifestError {
    fn class(&self) -> ErrorClass {
        match self {
            ManifestError::InvalidTree(_) => ErrorClass::Invalid,
            ManifestError::Segment(e) => e.class(),
            _ => ErrorClass::Integrity,
        }
    }
}

/// Checks a parcel-relative path: non-empty components, no `.`/`..`, no NUL.
pub fn validate_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > MAX_PATH_LEN {
        return Err(format!(
            "path {path:?} is empty or longer than {MAX_PATH_LEN} bytes"
        ));
    }
    for component in path.split('/') {
        if component.is_empty() || component == "." || component == ".." || component.contains('\0')
        {
            return Err(format!(
                "path {path:?} has an invalid component {component:?}"
            ));
        }
    }
    Ok(())
}

/// Checks that every stored chunk's length is one the chunk codec can produce.
pub(crate) fn check_stored_lengths(chunks: &[ChunkRef]) -> Result<(), String> {
    for chunk in chunks {
        if let ChunkRef::Stored { stored_len, .. } = chunk {
            let len = *stored_len as usize;
            if !(chunk::STORED_OVERHEAD..=chunk::MAX_STORED_LEN).contains(&len) {
                return Err(format!("stored length {len} out of range"));
            }
        }
    }
    Ok(())
}

impl Manifest {
    /// A copy of the header and tree whose files have no chunk lists (what a
    /// format 2 root holds), without copying the chunk lists first.
    pub fn header_and_tree(&self) -> Manifest {
        let entries = self
            .entries
            .iter()
            .map(|entry| Entry {
                path: entry.path.clone(),
                mode: entry.mode,
                mtime: entry.mtime,
                kind: match &entry.kind {
                    EntryKind::Directory => EntryKind::Directory,
                    EntryKind::File { size, .. } => EntryKind::File {
                        size: *size,
                        chunks: Vec::new(),
                    },
                },
            })
            .collect();
        Manifest {
            version: self.version,
            parent: self.parent,
            created: self.created,
            lock_nonce: self.lock_nonce,
            host: self.host.clone(),
            message: self.message.clone(),
            chunk_size: self.chunk_size,
            entries,
        }
    }

    /// Total bytes of all files.
    pub fn logical_size(&self) -> u64 {
        self.files().map(|(_, size, _)| size).sum()
    }

    /// Files as (path, size, chunks).
    pub fn files(&self) -> impl Iterator<Item = (&str, u64, &[ChunkRef])> {
        self.entries.iter().filter_map(|e| match &e.kind {
            EntryKind::File { size, chunks } => Some((e.path.as_str(), *size, chunks.as_slice())),
            EntryKind::Directory => None,
        })
    }

    /// Every stored (not zero) chunk reference with its stored length, in
    /// file order, repeats included.
    pub fn stored_chunks(&self) -> impl Iterator<Item = (ChunkTag, u64)> + '_ {
        self.files()
            .flat_map(|(_, _, chunks)| chunks.iter().filter_map(ChunkRef::stored))
    }

    /// Number of chunks in all files, zero chunks included.
    pub fn chunk_count(&self) -> u64 {
        self.files().map(|(_, _, c)| c.len() as u64).sum()
    }

    /// Checks the invariants a reader relies on.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_tree()?;
        for entry in &self.entries {
            let EntryKind::File { size, chunks } = &entry.kind else {
                continue;
            };
            let expected = size.div_ceil(u64::from(self.chunk_size));
            if chunks.len() as u64 != expected {
                return Err(format!(
                    "{:?}: {} chunks for {size} bytes (expected {expected})",
                    entry.path,
                    chunks.len()
                ));
            }
            check_stored_lengths(chunks).map_err(|e| format!("{:?}: {e}", entry.path))?;
        }
        Ok(())
    }

    /// [`Manifest::validate`] but for the files' chunk lists: the header,
    /// the paths and their order, modes, file sizes (a format-2 root).
    fn validate_tree(&self) -> Result<(), String> {
        chunk::validate_chunk_size(self.chunk_size)?;
        if self.version == 0 {
            return Err("version 0 does not exist (versions start at 1)".into());
        }
        if let Some(parent) = self.parent {
            if parent == 0 || parent >= self.version {
                return Err(format!(
                    "parent {parent} of version {} is impossible",
                    self.version
                ));
            }
        }
        if self.host.len() > u16::MAX as usize {
            return Err("host name too long".into());
        }
        let mut directories: HashSet<&str> = HashSet::new();
        let mut previous: Option<&str> = None;
        for entry in &self.entries {
            validate_path(&entry.path)?;
            if let Some(prev) = previous {
                if prev.as_bytes() >= entry.path.as_bytes() {
                    return Err(format!(
                        "entries not sorted or duplicated at {:?}",
                        entry.path
                    ));
                }
            }
            previous = Some(&entry.path);
            if let Some((parent, _)) = entry.path.rsplit_once('/') {
                if !directories.contains(parent) {
                    return Err(format!("{:?} has no parent directory entry", entry.path));
                }
            }
            if entry.mode & !0o7777 != 0 {
                return Err(format!("{:?} has mode bits beyond permissions", entry.path));
            }
            match &entry.kind {
                EntryKind::Directory => {
                    directories.insert(&entry.path);
                }
                EntryKind::File { size, .. } => {
                    if size.div_ceil(u64::from(self.chunk_size)) > MAX_CHUNKS_PER_FILE {
                        return Err(format!("{:?}: {size} bytes is too many chunks", entry.path));
                    }
                }
            }
        }
        Ok(())
    }

    /// The plaintext body (see the module doc).
    pub fn encode_body(&self) -> Result<Vec<u8>, ManifestError> {
        self.validate().map_err(ManifestError::InvalidTree)?;
        Ok(write_body(self, BODY_MAGIC, None, |w, _, chunks| {
            let count_at = w.buf.len();
            w.u32(0);
            let records = write_records(w, chunks);
            w.buf[count_at..count_at + 4].copy_from_slice(&records.to_le_bytes());
        }))
    }

    /// Parses and validates a plaintext body; `object` names it in errors.
    pub fn decode_body(body: &[u8], object: &str) -> Result<Manifest, ManifestError> {
        let (manifest, _) = read_body(body, object, BODY_MAGIC, false, |r, expected, _| {
            let records = r.u32("record count")?;
            read_records(r, records, expected)
        })?;
        manifest
            .validate()
            .map_err(|reason| ManifestError::Malformed {
                object: object.to_owned(),
                reason,
            })?;
        Ok(manifest)
    }

    /// Encrypts the manifest into its stored form, format 1 (the whole
    /// manifest in one object). New versions are written as format 2
    /// ([`tree::split`], [`tree::Root::seal`]); this stays for reading tests
    /// and tools that make format-1 stores.
    pub fn seal(&self, key: &ParcelKey, parcel_id: &[u8; 16]) -> Result<Vec<u8>, ManifestError> {
        let body = zeroize::Zeroizing::new(self.encode_body()?);
        seal_body(FORMAT_WHOLE, self.version, &body, key, parcel_id)
    }
}

impl tree::Root {
    /// Encrypts the root into its stored form, format 2.
    pub fn seal(&self, key: &ParcelKey, parcel_id: &[u8; 16]) -> Result<Vec<u8>, ManifestError> {
        self.manifest
            .validate_tree()
            .map_err(ManifestError::InvalidTree)?;
        let body = zeroize::Zeroizing::new(self.encode_body());
        seal_body(FORMAT_VERSION, self.manifest.version, &body, key, parcel_id)
    }
}

/// A stored version as opened: format 1 holds the whole manifest, format 2
/// a root whose segments are read separately ([`tree::Root::assemble`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Format 1.
    Whole(Manifest),
    /// Format 2.
    Tree(tree::Root),
}

impl Stored {
    /// The version's header and tree (format 2: files without chunk lists).
    pub fn header(&self) -> &Manifest {
        match self {
            Stored::Whole(manifest) => manifest,
            Stored::Tree(root) => &root.manifest,
        }
    }

    /// The version's segments (none in format 1).
    pub fn segment_refs(&self) -> impl Iterator<Item = &ChunkRef> {
        let root = match self {
            Stored::Whole(_) => None,
            Stored::Tree(root) => Some(root),
        };
        root.into_iter().flat_map(tree::Root::segment_refs)
    }
}

fn seal_body(
    format: u16,
    version: u64,
    body: &[u8],
    key: &ParcelKey,
    parcel_id: &[u8; 16],
) -> Result<Vec<u8>, ManifestError> {
    let nonce: [u8; 24] = rand::random();
    let mut out = Vec::with_capacity(OUTER_HEADER_LEN + body.len() + AEAD_TAG_LEN);
    out.extend_from_slice(OUTER_MAGIC);
    out.extend_from_slice(&format.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&nonce);
    let mut aad = out.clone();
    aad.extend_from_slice(parcel_id);
    let cipher = XChaCha20Poly1305::new(&Key::from(*key.as_bytes()));
    let ciphertext = cipher
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: body,
                aad: &aad,
            },
        )
        .expect("encryption of a bounded buffer cannot fail");
    out.extend_from_slice(&ciphertext);
    if out.len() > MAX_MANIFEST_LEN {
        return Err(ManifestError::InvalidTree(format!(
            "manifest would be {} bytes, over the {MAX_MANIFEST_LEN}-byte limit: use a larger chunk size",
            out.len()
        )));
    }
    Ok(out)
}

/// Checks, decrypts and parses a stored manifest object that should be
/// `expected_version`, of either format.
pub fn open(
    stored: &[u8],
    key: &ParcelKey,
    parcel_id: &[u8; 16],
    expected_version: u64,
    object: &str,
) -> Result<Stored, ManifestError> {
    let object_name = || object.to_owned();
    if stored.len() < OUTER_HEADER_LEN + AEAD_TAG_LEN || stored.len() > MAX_MANIFEST_LEN {
        return Err(ManifestError::BadLength {
            object: object_name(),
            len: stored.len(),
        });
    }
    if &stored[0..4] != OUTER_MAGIC {
        return Err(ManifestError::BadMagic {
            object: object_name(),
        });
    }
    let format = u16::from_le_bytes([stored[4], stored[5]]);
    if format != FORMAT_WHOLE && format != FORMAT_VERSION {
        return Err(ManifestError::UnsupportedFormat {
            object: object_name(),
            found: format,
        });
    }
    let version = u64::from_le_bytes(stored[8..16].try_into().expect("8 bytes"));
    if version != expected_version {
        return Err(ManifestError::VersionMismatch {
            object: object_name(),
            expected: expected_version,
            found: version,
        });
    }
    let nonce: [u8; 24] = stored[16..40].try_into().expect("24 bytes");
    let mut aad = stored[..OUTER_HEADER_LEN].to_vec();
    aad.extend_from_slice(parcel_id);
    let cipher = XChaCha20Poly1305::new(&Key::from(*key.as_bytes()));
    let body = zeroize::Zeroizing::new(
        cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &stored[OUTER_HEADER_LEN..],
                    aad: &aad,
                },
            )
            .map_err(|_| ManifestError::Decrypt {
                object: object_name(),
            })?,
    );
    let opened = if format == FORMAT_WHOLE {
        Stored::Whole(Manifest::decode_body(&body, object)?)
    } else {
        Stored::Tree(tree::Root::decode_body(&body, object)?)
    };
    let found = opened.header().version;
    if found != expected_version {
        return Err(ManifestError::VersionMismatch {
            object: object_name(),
            expected: expected_version,
            found,
        });
    }
    Ok(opened)
}

/// Writes a body of either format: `magic`, the header (format 2 adds the
/// segment chunks after the chunk size), then the entries; `file` writes a
/// file's contents after its size, given its index among the files.
fn write_body(
    m: &Manifest,
    magic: &[u8; 4],
    segment_chunks: Option<u32>,
    mut file: impl FnMut(&mut Writer, usize, &[ChunkRef]),
) -> Vec<u8> {
    let mut w = Writer::default();
    w.bytes(magic);
    w.u64(m.version);
    w.u64(m.parent.unwrap_or(0));
    w.i64(m.created.secs);
    w.u32(m.created.nanos);
    w.bytes(&m.lock_nonce.unwrap_or([0; 16]));
    w.u32(m.chunk_size);
    if let Some(segment_chunks) = segment_chunks {
        w.u32(segment_chunks);
    }
    w.str16(&m.host);
    w.str32(&m.message);
    w.u32(m.entries.len() as u32);
    let mut files = 0;
    for entry in &m.entries {
        w.u8(match entry.kind {
            EntryKind::Directory => KIND_DIRECTORY,
            EntryKind::File { .. } => KIND_FILE,
        });
        w.str16(&entry.path);
        w.u32(entry.mode);
        w.i64(entry.mtime.secs);
        w.u32(entry.mtime.nanos);
        if let EntryKind::File { size, chunks } = &entry.kind {
            w.u64(*size);
            file(&mut w, files, chunks);
            files += 1;
        }
    }
    w.buf
}

/// Reads a body written by [`write_body`], every field bounds-checked and
/// no trailing bytes; `file` reads a file's contents given its chunk count
/// and the segment chunks (format 2), returning its chunk list. Returns the
/// manifest (not yet validated) and the segment chunks.
fn read_body(
    body: &[u8],
    object: &str,
    magic: &[u8; 4],
    has_segment_chunks: bool,
    mut file: impl FnMut(&mut Reader, u64, u32) -> Result<Vec<ChunkRef>, Truncated>,
) -> Result<(Manifest, u32), ManifestError> {
    let malformed = |reason: String| ManifestError::Malformed {
        object: object.to_owned(),
        reason,
    };
    let mut r = Reader::new(body);
    let invalid = |what| Truncated { what, at: 0 };
    let parsed = (|| -> Result<(Manifest, u32), Truncated> {
        if &r.array::<4>("magic")? != magic {
            return Err(invalid("magic"));
        }
        let version = r.u64("version")?;
        let parent = Some(r.u64("parent")?).filter(|&p| p != 0);
        let created = Timestamp {
            secs: r.i64("created")?,
            nanos: r.u32("created")?,
        };
        let lock_nonce = Some(r.array::<16>("lock nonce")?).filter(|n| n != &[0; 16]);
        let chunk_size = r.u32("chunk size")?;
        let segment_chunks = if has_segment_chunks {
            r.u32("segment chunks")?
        } else {
            0
        };
        let host = r.str16("host")?;
        let message = r.str32("message")?;
        let entry_count = r.u32("entry count")? as usize;
        // Every entry takes at least 19 bytes: refuse counts the input cannot hold.
        if entry_count > r.remaining() / 19 {
            return Err(invalid("entry count"));
        }
        let mut entries = Vec::with_capacity(entry_count);
        for _ in 0..entry_count {
            let kind = r.u8("entry kind")?;
            let path = r.str16("path")?;
            let mode = r.u32("mode")?;
            let mtime = Timestamp {
                secs: r.i64("mtime")?,
                nanos: r.u32("mtime")?,
            };
            let kind = match kind {
                KIND_DIRECTORY => EntryKind::Directory,
                KIND_FILE => {
                    let size = r.u64("file size")?;
                    let expected = size.div_ceil(u64::from(chunk_size.max(1)));
                    if expected > MAX_CHUNKS_PER_FILE {
                        return Err(invalid("file size"));
                    }
                    let chunks = file(&mut r, expected, segment_chunks)?;
                    EntryKind::File { size, chunks }
                }
                _ => return Err(invalid("entry kind")),
            };
            entries.push(Entry {
                path,
                mode,
                mtime,
                kind,
            });
        }
        let manifest = Manifest {
            version,
            parent,
            created,
            lock_nonce,
            host,
            message,
            chunk_size,
            entries,
        };
        Ok((manifest, segment_chunks))
    })()
    .map_err(|t| malformed(format!("{} invalid or cut short at byte {}", t.what, t.at)))?;
    if r.remaining() != 0 {
        return Err(malformed(format!(
            "{} bytes of trailing garbage",
            r.remaining()
        )));
    }
    Ok(parsed)
}

/// Writes `chunks` as records (a stored chunk, or a run of zero chunks);
/// returns how many.
fn write_records(w: &mut Writer, chunks: &[ChunkRef]) -> u32 {
    let mut records = 0u32;
    let mut index = 0;
    while index < chunks.len() {
        match &chunks[index] {
            ChunkRef::Zero => {
                let run = chunks[index..]
                    .iter()
                    .take_while(|c| matches!(c, ChunkRef::Zero))
                    .count();
                w.u8(FLAG_ZERO_RUN);
                w.u32(run as u32);
                index += run;
            }
            ChunkRef::Stored {
                tag,
                key,
                stored_len,
            } => {
                w.u8(FLAG_STORED);
                w.bytes(&tag.0);
                w.bytes(key.as_bytes());
                w.u32(*stored_len);
                index += 1;
            }
        }
        records += 1;
    }
    records
}

/// Reads `records` records of at most `expected` chunks in all.
fn read_records(r: &mut Reader, records: u32, expected: u64) -> Result<Vec<ChunkRef>, Truncated> {
    // Reserve only what the records left in the input can be (each takes at
    // least 5 bytes), not what the size claims: a 60-byte body could ask for
    // gigabytes.
    let reserve = expected
        .min(u64::from(records))
        .min((r.remaining() / 5) as u64);
    let mut chunks = Vec::with_capacity(reserve as usize);
    for _ in 0..records {
        match r.u8("chunk flags")? {
            FLAG_STORED => {
                if chunks.len() as u64 >= expected {
                    return Err(Truncated {
                        what: "chunk records",
                        at: 0,
                    });
                }
                chunks.push(ChunkRef::Stored {
                    tag: ChunkTag(r.array("chunk tag")?),
                    key: ChunkKey::from_bytes(r.array("chunk key")?),
                    stored_len: r.u32("stored length")?,
                })
            }
            FLAG_ZERO_RUN => {
                let run = r.u32("zero run")? as u64;
                if run == 0 || chunks.len() as u64 + run > expected {
                    return Err(Truncated {
                        what: "zero run",
                        at: 0,
                    });
                }
                chunks.extend((0..run).map(|_| ChunkRef::Zero));
            }
            _ => {
                return Err(Truncated {
                    what: "chunk flags",
                    at: 0,
                });
            }
        }
    }
    Ok(chunks)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::chunk::ChunkEncoder;
    use bytes::Bytes;
    use proptest::prelude::*;

    pub(crate) fn sample_manifest() -> Manifest {
        let stored = |n: u8| ChunkRef::Stored {
            tag: ChunkTag([n; 32]),
            key: ChunkKey::from_bytes([n.wrapping_add(100); 32]),
            stored_len: 1000 + u32::from(n),
        };
        Manifest {
            version: 3,
            parent: Some(2),
            created: Timestamp {
                secs: 1_790_000_000,
                nanos: 5,
            },
            lock_nonce: Some([7; 16]),
            host: "machine-a".into(),
            message: "after installing packages".into(),
            chunk_size: 65536,
            entries: vec![
                Entry {
                    path: "disk.img".into(),
                    mode: 0o600,
                    mtime: Timestamp {
                        secs: 1_700_000_000,
                        nanos: 999,
                    },
                    kind: EntryKind::File {
                        size: 65536 * 4 + 10,
                        chunks: vec![
                            stored(1),
                            ChunkRef::Zero,
                            ChunkRef::Zero,
                            stored(1),
                            stored(2),
                        ],
                    },
                },
                Entry {
                    path: "sub".into(),
                    mode: 0o755,
                    mtime: Timestamp::default(),
                    kind: EntryKind::Directory,
                },
                Entry {
                    path: "sub/empty".into(),
                    mode: 0o644,
                    mtime: Timestamp { secs: -5, nanos: 0 },
                    kind: EntryKind::File {
                        size: 0,
                        chunks: vec![],
                    },
                },
            ],
        }
    }

    #[test]
    fn seal_open_roundtrip() {
        let key = ParcelKey::from_bytes([3; 32]);
        let manifest = sample_manifest();
        let stored = manifest.seal(&key, &[1; 16]).unwrap();
        assert_eq!(
            open(&stored, &key, &[1; 16], 3, "m").unwrap(),
            Stored::Whole(manifest)
        );
    }

    #[test]
    fn wrong_key_parcel_or_version_is_refused() {
        let key = ParcelKey::from_bytes([3; 32]);
        let stored = sample_manifest().seal(&key, &[1; 16]).unwrap();
        let other = ParcelKey::from_bytes([4; 32]);
        assert!(matches!(
            open(&stored, &other, &[1; 16], 3, "m"),
            Err(ManifestError::Decrypt { .. })
        ));
        assert!(matches!(
            open(&stored, &key, &[2; 16], 3, "m"),
            Err(ManifestError::Decrypt { .. })
        ));
        assert!(matches!(
            open(&stored, &key, &[1; 16], 4, "m"),
            Err(ManifestError::VersionMismatch { .. })
        ));
    }

    #[test]
    fn truncated_and_garbage_are_errors_not_panics() {
        let key = ParcelKey::from_bytes([3; 32]);
        let stored = sample_manifest().seal(&key, &[1; 16]).unwrap();
        for len in [0, 10, 40, 56, stored.len() - 1] {
            assert!(open(&stored[..len], &key, &[1; 16], 3, "m").is_err());
        }
        let mut flipped = stored.clone();
        flipped[60] ^= 0x80;
        assert!(matches!(
            open(&flipped, &key, &[1; 16], 3, "m"),
            Err(ManifestError::Decrypt { .. })
        ));
        let mut garbage = vec![0xAB; 500];
        garbage[..4].copy_from_slice(b"ISRM");
        assert!(open(&garbage, &key, &[1; 16], 3, "m").is_err());
        let body = sample_manifest().encode_body().unwrap();
        for len in 0..body.len() {
            assert!(
                Manifest::decode_body(&body[..len], "m").is_err(),
                "prefix {len} accepted"
            );
        }
    }

    #[test]
    fn invalid_trees_are_refused() {
        let mut m = sample_manifest();
        m.entries[2].path = "missing-parent/x".into();
        assert!(m.encode_body().is_err());
        let mut m = sample_manifest();
        m.entries[0].path = "../escape".into();
        assert!(m.encode_body().is_err());
        let mut m = sample_manifest();
        m.entries.swap(0, 1);
        assert!(m.encode_body().is_err());
        let mut m = sample_manifest();
        if let EntryKind::File { size, .. } = &mut m.entries[0].kind {
            *size += 65536;
        }
        assert!(m.encode_body().is_err());
    }

    /// A format-2 manifest: the root and its segments back to the manifest,
    /// equal segments stored once, a file of many segments cut at
    /// `segment_chunks`.
    #[test]
    fn tree_roundtrip_shares_equal_segments() {
        let key = ParcelKey::from_bytes([3; 32]);
        let mut encoder =
            ChunkEncoder::new(crate::keys::DedupSecret::from_bytes([9; 32]), 3).unwrap();
        let mut manifest = sample_manifest();
        let EntryKind::File { size, chunks } = &mut manifest.entries[0].kind else {
            panic!()
        };
        let pattern = chunks.clone();
        *chunks = (0..50).flat_map(|_| pattern.clone()).collect();
        *size = chunks.len() as u64 * 65536;
        let split = tree::split(&manifest, 10, &mut encoder).unwrap();
        // 250 chunks in 25 segments of 10: all equal (the pattern of 5 repeats).
        assert_eq!(split.root.segments[0].len(), 25);
        assert_eq!(
            split.encoded.len(),
            1,
            "every segment holds the pattern twice; the empty file has none"
        );
        let sealed = split.root.seal(&key, &[1; 16]).unwrap();
        let Stored::Tree(root) = open(&sealed, &key, &[1; 16], 3, "m").unwrap() else {
            panic!("format 2 expected")
        };
        assert_eq!(root, split.root);
        let plaintexts: std::collections::HashMap<ChunkTag, Bytes> = split
            .encoded
            .iter()
            .map(|(reference, stored)| {
                let ChunkRef::Stored { tag, key, .. } = reference else {
                    panic!()
                };
                let secret = crate::keys::DedupSecret::from_bytes([9; 32]);
                (
                    *tag,
                    chunk::decode(&secret, *tag, key, Bytes::from(stored.clone())).unwrap(),
                )
            })
            .collect();
        let assembled = root
            .assemble("m", |r| Ok(plaintexts[&r.tag().unwrap()].clone()))
            .unwrap();
        assert_eq!(assembled, manifest);
    }

    /// A checkin that changes one chunk of a big file changes one segment:
    /// the others are the same stored chunks as before.
    #[test]
    fn one_changed_chunk_changes_one_segment() {
        let mut encoder =
            ChunkEncoder::new(crate::keys::DedupSecret::from_bytes([9; 32]), 3).unwrap();
        let stored = |n: u32| ChunkRef::Stored {
            tag: ChunkTag(*blake3::hash(&n.to_le_bytes()).as_bytes()),
            key: ChunkKey::from_bytes([1; 32]),
            stored_len: 5000,
        };
        let mut manifest = sample_manifest();
        let EntryKind::File { size, chunks } = &mut manifest.entries[0].kind else {
            panic!()
        };
        *chunks = (0..1000).map(stored).collect();
        *size = 1000 * 65536;
        let before = tree::split(&manifest, 100, &mut encoder).unwrap();
        let EntryKind::File { chunks, .. } = &mut manifest.entries[0].kind else {
            panic!()
        };
        chunks[555] = ChunkRef::Zero;
        let after = tree::split(&manifest, 100, &mut encoder).unwrap();
        let changed: Vec<usize> = (0..10)
            .filter(|&i| before.root.segments[0][i] != after.root.segments[0][i])
            .collect();
        assert_eq!(changed, vec![5]);
    }

    /// Damaged or mismatched roots and segments are errors, not panics.
    #[test]
    fn truncated_roots_and_segments_are_errors() {
        let mut encoder =
            ChunkEncoder::new(crate::keys::DedupSecret::from_bytes([9; 32]), 3).unwrap();
        let split = tree::split(&sample_manifest(), 2, &mut encoder).unwrap();
        let body = split.root.encode_body();
        for len in 0..body.len() {
            assert!(
                tree::Root::decode_body(&body[..len], "m").is_err(),
                "prefix {len} accepted"
            );
        }
        assert!(tree::Root::decode_body(&body, "m").is_ok());
        let segment = tree::encode_segment(&[ChunkRef::Zero, ChunkRef::Zero]);
        assert!(tree::decode_segment(&segment, 2, "m").is_ok());
        assert!(tree::decode_segment(&segment, 3, "m").is_err());
        for len in 0..segment.len() {
            assert!(tree::decode_segment(&segment[..len], 2, "m").is_err());
        }
    }

    fn arb_chunk() -> impl Strategy<Value = ChunkRef> {
        prop_oneof![
            Just(ChunkRef::Zero),
            (any::<[u8; 32]>(), any::<[u8; 32]>(), 40u32..100_000).prop_map(|(t, k, l)| {
                ChunkRef::Stored {
                    tag: ChunkTag(t),
                    key: ChunkKey::from_bytes(k),
                    stored_len: l,
                }
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn body_roundtrips(
            files in proptest::collection::btree_map("[a-z]{1,8}", (0u64..400_000, any::<u32>(), any::<i64>()), 0..6),
            chunk_pool in proptest::collection::vec(arb_chunk(), 8),
            message in ".{0,40}",
            parent in proptest::option::of(1u64..9),
        ) {
            let entries: Vec<Entry> = files.into_iter().enumerate().map(|(i, (path, (size, mode, secs)))| {
                let n = size.div_ceil(65536) as usize;
                Entry {
                    path,
                    mode: mode & 0o7777,
                    mtime: Timestamp { secs, nanos: (i * 7) as u32 },
                    kind: EntryKind::File { size, chunks: (0..n).map(|j| chunk_pool[(j * 3 + i) % 8].clone()).collect() },
                }
            }).collect();
            let manifest = Manifest {
                version: 10, parent, created: Timestamp::now(), lock_nonce: None,
                host: "h".into(), message, chunk_size: 65536, entries,
            };
            let body = manifest.encode_body().unwrap();
            prop_assert_eq!(Manifest::decode_body(&body, "m").unwrap(), manifest);
        }
    }
}
