//! Format 2: a version as a small **root** plus content-addressed **segments**.
//!
//! A format-1 manifest lists every chunk of every file, so its size grows with
//! the disk (69 bytes per stored chunk: ≈ 56 MB for 100 GiB at 128 KiB
//! chunks), and every version stores, uploads and downloads all of it. Format
//! 2 cuts each file's chunk list into segments of [`SEGMENT_CHUNKS`] chunks
//! (the root records the number, so a reader never assumes it). A segment is
//! stored as an ordinary chunk (the chunk codec under the dedup secret, in
//! `chunks/`), so an unchanged segment encodes to the same stored bytes and
//! tag as in the parent version: it is shared, not uploaded again, and gc,
//! the cache, the fetcher and any HTTP cache treat it like any other chunk.
//! The root — the manifest object itself, sealed with the parcel key like
//! format 1 — holds the header, the file tree and, per file, the references
//! of its segments.
//!
//! Root body (plaintext, little-endian):
//!
//! ```text
//! 4  magic "ISRt"      8 version        8 parent (0 = none)
//! 8  created secs (i64)  4 created nanos   16 lock nonce (all zero = none)
//! 4  chunk size        4 segment chunks  str16 host   str32 message   4 entry count
//! entries, sorted by path (bytes), each:
//!   1 kind (1 = directory, 2 = file)  str16 path  4 mode  8 mtime secs  4 mtime nanos
//!   file only: 8 size  4 segment count, segments: 32 tag  32 key  4 stored length
//! ```
//!
//! Segment plaintext: `4 magic "ISRs"  4 chunk count  4 record count`, then
//! the records of format 1 (stored chunk or zero run). Segment `i` of a file
//! holds chunks `i·S ..` of it, `S` chunks except the last. Readers check the
//! segment count against the file size, the chunk count against the
//! segment's place, and the records against the chunk count.

use std::collections::HashSet;

use bytes::Bytes;

use super::wire::{Reader, Truncated, Writer};
use super::{EntryKind, Manifest, ManifestError, read_body, write_body};
use crate::chunk::{self, ChunkEncoder, ChunkKey, ChunkRef, ChunkTag, EncodedChunk};

const ROOT_MAGIC: &[u8; 4] = b"ISRt";
const SEGMENT_MAGIC: &[u8; 4] = b"ISRs";
/// Chunks per segment written by this build: 256 MiB of file at the default
/// 128 KiB chunk size, at most ≈ 141 KB of segment.
pub const SEGMENT_CHUNKS: u32 = 2048;
/// Largest segment size a reader accepts (its plaintext stays far below the
/// chunk codec's 4 MiB limit: 69 bytes per chunk at most).
const MAX_SEGMENT_CHUNKS: u32 = 32 * 1024;

/// A format-2 version as stored: the manifest's header and tree with every
/// file's chunk list still in its segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    /// Header and tree; files have their size but an empty chunk list.
    pub manifest: Manifest,
    /// Chunks per segment.
    pub segment_chunks: u32,
    /// Per file, in [`Manifest::files`] order, its segments' references.
    pub segments: Vec<Vec<ChunkRef>>,
}

/// A manifest cut into segments, ready to store.
#[derive(Debug)]
pub struct Split {
    /// The root (its body is sealed as the manifest object).
    pub root: Root,
    /// Each distinct segment once: its reference and stored bytes.
    pub encoded: Vec<(ChunkRef, Vec<u8>)>,
}

impl Root {
    /// Every segment reference, in file order, repeats included.
    pub fn segment_refs(&self) -> impl Iterator<Item = &ChunkRef> {
        self.segments.iter().flatten()
    }

    /// Number of chunks segment `index` of a file with `chunk_count` chunks holds.
    pub fn chunks_in_segment(&self, chunk_count: u64, index: usize) -> u64 {
        chunks_in_segment(self.segment_chunks, chunk_count, index)
    }

    /// The full manifest, given each segment's plaintext by `segment`
    /// (called once per reference, repeats included).
    pub fn assemble(
        mut self,
        object: &str,
        mut segment: impl FnMut(&ChunkRef) -> Result<Bytes, ManifestError>,
    ) -> Result<Manifest, ManifestError> {
        let chunk_size = u64::from(self.manifest.chunk_size);
        let mut files = self.segments.iter();
        for entry in &mut self.manifest.entries {
            let EntryKind::File { size, chunks } = &mut entry.kind else {
                continue;
            };
            let refs = files.next().expect("one segment list per file");
            let count = size.div_ceil(chunk_size);
            chunks.reserve(count as usize);
            for (index, reference) in refs.iter().enumerate() {
                let expected = chunks_in_segment(self.segment_chunks, count, index);
                chunks.extend(decode_segment(&segment(reference)?, expected, object)?);
            }
        }
        self.manifest
            .validate()
            .map_err(|reason| ManifestError::Malformed {
                object: object.to_owned(),
                reason,
            })?;
        Ok(self.manifest)
    }

    /// The root body (see the module doc).
    pub fn encode_body(&self) -> Vec<u8> {
        write_body(
            &self.manifest,
            ROOT_MAGIC,
            Some(self.segment_chunks),
            |w, file, _| {
                let refs = &self.segments[file];
                w.u32(refs.len() as u32);
                for reference in refs {
                    write_stored(w, reference);
                }
            },
        )
    }

    /// Parses and checks a root body; `object` names it in errors.
    pub fn decode_body(body: &[u8], object: &str) -> Result<Root, ManifestError> {
        let invalid = |what| Truncated { what, at: 0 };
        let mut segments = Vec::new();
        let (manifest, segment_chunks) = read_body(
            body,
            object,
            ROOT_MAGIC,
            true,
            |r, chunk_count, segment_chunks| {
                if !(1..=MAX_SEGMENT_CHUNKS).contains(&segment_chunks) {
                    return Err(invalid("segment chunks"));
                }
                let count = r.u32("segment count")?;
                if u64::from(count) != chunk_count.div_ceil(u64::from(segment_chunks))
                    || count as usize > r.remaining() / 68
                {
                    return Err(invalid("segment count"));
                }
                let refs = (0..count)
                    .map(|_| read_stored(r))
                    .collect::<Result<Vec<_>, _>>()?;
                segments.push(refs);
                Ok(Vec::new())
            },
        )?;
        manifest
            .validate_tree()
            .map_err(|reason| ManifestError::Malformed {
                object: object.to_owned(),
                reason,
            })?;
        // (Checked here too for a root without files.)
        if !(1..=MAX_SEGMENT_CHUNKS).contains(&segment_chunks) {
            return Err(ManifestError::Malformed {
                object: object.to_owned(),
                reason: format!("{segment_chunks} segment chunks is out of range"),
            });
        }
        Ok(Root {
            manifest,
            segment_chunks,
            segments,
        })
    }
}

fn chunks_in_segment(segment_chunks: u32, chunk_count: u64, index: usize) -> u64 {
    let start = index as u64 * u64::from(segment_chunks);
    chunk_count
        .saturating_sub(start)
        .min(u64::from(segment_chunks))
}

/// Cuts `manifest` into segments of `segment_chunks` chunks, encoding each
/// with `encoder` (the parcel's dedup secret: equal segments, equal chunks).
pub fn split(
    manifest: &Manifest,
    segment_chunks: u32,
    encoder: &mut ChunkEncoder,
) -> Result<Split, ManifestError> {
    manifest.validate().map_err(ManifestError::InvalidTree)?;
    let mut seen = HashSet::new();
    let mut encoded = Vec::new();
    let mut segments = Vec::new();
    for (_, _, chunks) in manifest.files() {
        let mut refs = Vec::new();
        for part in chunks.chunks(segment_chunks as usize) {
            let EncodedChunk::Stored { chunk, stored } = encoder.encode(&encode_segment(part))
            else {
                unreachable!("a segment starts with its magic, so it is never all zero");
            };
            if seen.insert(chunk.tag()) {
                encoded.push((chunk.clone(), stored));
            }
            refs.push(chunk);
        }
        segments.push(refs);
    }
    Ok(Split {
        root: Root {
            manifest: manifest.header_and_tree(),
            segment_chunks,
            segments,
        },
        encoded,
    })
}

/// The plaintext of a segment holding `chunks`.
pub(super) fn encode_segment(chunks: &[ChunkRef]) -> Vec<u8> {
    let mut w = Writer::default();
    w.bytes(SEGMENT_MAGIC);
    w.u32(chunks.len() as u32);
    let count_at = w.buf.len();
    w.u32(0);
    let records = super::write_records(&mut w, chunks);
    w.buf[count_at..count_at + 4].copy_from_slice(&records.to_le_bytes());
    w.buf
}

/// Parses a segment's plaintext, which must hold `expected` chunks.
pub fn decode_segment(
    plaintext: &[u8],
    expected: u64,
    object: &str,
) -> Result<Vec<ChunkRef>, ManifestError> {
    let malformed = |reason: String| ManifestError::Malformed {
        object: object.to_owned(),
        reason: format!("segment: {reason}"),
    };
    let mut r = Reader::new(plaintext);
    let parse = |r: &mut Reader| -> Result<Vec<ChunkRef>, Truncated> {
        if &r.array::<4>("segment magic")? != SEGMENT_MAGIC {
            return Err(Truncated {
                what: "segment magic",
                at: 0,
            });
        }
        if u64::from(r.u32("segment chunk count")?) != expected {
            return Err(Truncated {
                what: "segment chunk count",
                at: 0,
            });
        }
        let records = r.u32("record count")?;
        let chunks = super::read_records(r, records, expected)?;
        if chunks.len() as u64 != expected {
            return Err(Truncated {
                what: "segment records",
                at: 0,
            });
        }
        Ok(chunks)
    };
    let chunks = parse(&mut r)
        .map_err(|t| malformed(format!("{} invalid or cut short at byte {}", t.what, t.at)))?;
    if r.remaining() != 0 {
        return Err(malformed(format!(
            "{} bytes of trailing garbage",
            r.remaining()
        )));
    }
    super::check_stored_lengths(&chunks).map_err(malformed)?;
    Ok(chunks)
}

fn write_stored(w: &mut Writer, reference: &ChunkRef) {
    let ChunkRef::Stored {
        tag,
        key,
        stored_len,
    } = reference
    else {
        unreachable!("segments are never zero chunks");
    };
    w.bytes(&tag.0);
    w.bytes(key.as_bytes());
    w.u32(*stored_len);
}

fn read_stored(r: &mut Reader) -> Result<ChunkRef, Truncated> {
    let tag = ChunkTag(r.array("segment tag")?);
    let key = ChunkKey::from_bytes(r.array("segment key")?);
    let stored_len = r.u32("segment stored length")?;
    if !(chunk::STORED_OVERHEAD..=chunk::MAX_STORED_LEN).contains(&(stored_len as usize)) {
        return Err(Truncated {
            what: "segment stored length",
            at: 0,
        });
    }
    Ok(ChunkRef::Stored {
        tag,
        key,
        stored_len,
    })
}
