//! The chunk cache's pack files (`<cache>/packs/<16 hex>.pack`): the record
//! format, and reading, writing and scanning records. Which records are live
//! and which pack is appended to is [`super`]'s business; the byte layout is
//! in docs/format.md ("Chunk cache pack").
//!
//! A record starts on a 4096-byte boundary: a 48-byte header (magic `ISRP`,
//! version, state, payload length, chunk tag, header checksum), the chunk's
//! stored bytes, zeros up to the next boundary.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::chunk::ChunkTag;

/// Records start at multiples of this.
pub const ALIGN: u64 = 4096;
/// Bytes of a record header.
pub const HEADER_LEN: usize = 48;
const MAGIC: [u8; 4] = *b"ISRP";
const VERSION: u8 = 1;
/// State byte of a record whose chunk is cached.
const LIVE: u8 = b'L';
/// State byte of a removed record (its tag is zeroed, its payload gone).
const DEAD: u8 = b'D';
/// Larger payloads are not chunks: a header claiming one is garbage.
const MAX_PAYLOAD: u32 = 64 << 20;

/// What a valid header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A cached chunk of `len` stored bytes.
    Live {
        /// Its tag.
        tag: ChunkTag,
        /// Its stored bytes.
        len: u32,
    },
    /// A removed record spanning a payload of `len` bytes.
    Dead {
        /// Payload length the record was written with.
        len: u32,
    },
}

impl Header {
    fn len(self) -> u32 {
        match self {
            Header::Live { len, .. } | Header::Dead { len } => len,
        }
    }

    /// Bytes the record takes in its pack (header, payload, padding).
    pub fn record_len(self) -> u64 {
        record_len(self.len())
    }

    /// The 48 bytes of this header.
    pub fn encode(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        let (state, tag) = match self {
            Header::Live { tag, .. } => (LIVE, tag.0),
            Header::Dead { .. } => (DEAD, [0; 32]),
        };
        out[5] = state;
        out[8..12].copy_from_slice(&self.len().to_le_bytes());
        out[12..44].copy_from_slice(&tag);
        let sum = checksum(&out);
        out[44..48].copy_from_slice(&sum);
        out
    }

    /// Parses a header; `None` when it is not a valid one (garbage, torn,
    /// another version).
    pub fn decode(bytes: &[u8]) -> Option<Header> {
        let bytes: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN)?.try_into().ok()?;
        if bytes[0..4] != MAGIC || bytes[4] != VERSION || bytes[6..8] != [0, 0] {
            return None;
        }
        if bytes[44..48] != checksum(bytes) {
            return None;
        }
        let len = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
        if len > MAX_PAYLOAD {
            return None;
        }
        let tag: [u8; 32] = bytes[12..44].try_into().ok()?;
        match bytes[5] {
            LIVE => Some(Header::Live {
                tag: ChunkTag(tag),
                len,
            }),
            DEAD if tag == [0; 32] => Some(Header::Dead { len }),
            _ => None,
        }
    }
}

/// First 4 bytes of BLAKE3 over header bytes 0..44.
fn checksum(header: &[u8; HEADER_LEN]) -> [u8; 4] {
    let hash = blake3::hash(&header[..44]);
    let mut out = [0u8; 4];
    out.copy_from_slice(&hash.as_bytes()[..4]);
    out
}

/// Bytes a record of `payload` stored bytes takes in its pack.
pub fn record_len(payload: u32) -> u64 {
    (HEADER_LEN as u64 + u64::from(payload)).div_ceil(ALIGN) * ALIGN
}

/// A whole record (header, payload, zero padding), ready to be written.
pub fn encode_record(tag: &ChunkTag, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a chunk is smaller than 4 GiB");
    let header = Header::Live { tag: *tag, len };
    let mut out = vec![0u8; header.record_len() as usize];
    out[..HEADER_LEN].copy_from_slice(&header.encode());
    out[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    out
}

/// The file name of pack `id`.
pub fn file_name(id: u64) -> String {
    format!("{id:016x}.pack")
}

/// The pack id a file name spells, if it is a pack's.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".pack")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// A record found by [`scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// Where the record starts.
    pub offset: u64,
    /// Its chunk.
    pub tag: ChunkTag,
    /// Its stored bytes.
    pub len: u32,
}

/// What [`scan`] found in a pack.
#[derive(Debug, Default)]
pub struct Scan {
    /// Live records, in file order.
    pub live: Vec<Found>,
    /// Where the last valid record (live or dead) ends.
    pub end: u64,
}

/// Reads the headers of a pack, one record after another. A range that is
/// not a valid record (a torn append, damage) is skipped a page at a time
/// until a valid header follows, so damage to one header loses only that
/// record; a record whose payload runs past the end of the file (a torn
/// tail) is not counted.
pub fn scan(file: &File) -> io::Result<Scan> {
    let size = file.metadata()?.len();
    let mut out = Scan::default();
    let mut header = [0u8; HEADER_LEN];
    let mut offset = 0u64;
    while offset + HEADER_LEN as u64 <= size {
        file.read_exact_at(&mut header, offset)?;
        match Header::decode(&header) {
            Some(found) if offset + HEADER_LEN as u64 + u64::from(found.len()) <= size => {
                if let Header::Live { tag, len } = found {
                    out.live.push(Found { offset, tag, len });
                }
                offset += found.record_len();
                out.end = offset;
            }
            // Not a record here (a removed one's hole, damage): on to the
            // next page with data.
            _ => offset = next_data(file, offset + ALIGN).unwrap_or(size),
        }
    }
    Ok(out)
}

/// The first page boundary at or after `from` that is not in a hole (`None`
/// when only holes follow); `from` itself where holes cannot be asked for.
fn next_data(file: &File, from: u64) -> Option<u64> {
    use nix::unistd::{Whence, lseek};
    match lseek(file, i64::try_from(from).ok()?, Whence::SeekData) {
        Ok(data) => Some(u64::try_from(data).ok()? / ALIGN * ALIGN).map(|d| d.max(from)),
        Err(nix::errno::Errno::ENXIO) => None,
        Err(_) => Some(from),
    }
}

/// Reads the record at `offset` and returns its payload if its header is a
/// live one for `tag` of `len` bytes; `None` otherwise (removed meanwhile,
/// damaged header).
pub fn read(
    file: &File,
    offset: u64,
    tag: &ChunkTag,
    len: u32,
) -> io::Result<Option<bytes::Bytes>> {
    let mut buf = vec![0u8; HEADER_LEN + len as usize];
    match file.read_exact_at(&mut buf, offset) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if Header::decode(&buf) != Some(Header::Live { tag: *tag, len }) {
        return Ok(None);
    }
    Ok(Some(bytes::Bytes::from(buf).slice(HEADER_LEN..)))
}

/// Removes the record at `offset`: all of it becomes a hole (zeros, which
/// a scan skips page by page). Where the file system cannot punch holes,
/// its first page becomes a dead header and zeros instead (no tag, no
/// payload byte left; the rest keeps its space). Returns whether the hole
/// could be punched; the record is gone either way.
pub fn kill(file: &File, offset: u64, len: u32) -> io::Result<bool> {
    let header = Header::Dead { len };
    if punch_hole(file, offset, header.record_len()) {
        return Ok(true);
    }
    let mut page = vec![0u8; ALIGN as usize];
    page[..HEADER_LEN].copy_from_slice(&header.encode());
    file.write_all_at(&page, offset)?;
    Ok(false)
}

/// Deallocates `len` bytes at `offset`, keeping the file size; false when
/// the file system refuses.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> bool {
    use nix::fcntl::{FallocateFlags, fallocate};
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return false;
    };
    fallocate(
        file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
    .is_ok()
}

/// Asks the kernel to read a range of a pack into the page cache.
pub fn will_need(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    let _ = nix::fcntl::posix_fadvise(
        file,
        offset,
        len,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
    );
}

/// The packs directory of a cache directory.
pub fn dir(cache: &Path) -> PathBuf {
    cache.join("packs")
}

/// Every pack of a packs directory, by id.
pub fn list(packs: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(packs)? {
        let entry = entry?;
        if let Some(id) = entry.file_name().to_str().and_then(parse_file_name) {
            out.push((id, entry.path()));
        }
    }
    out.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_damage_is_rejected() {
        let tag = ChunkTag::of(b"x");
        let live = Header::Live { tag, len: 5000 };
        let bytes = live.encode();
        assert_eq!(Header::decode(&bytes), Some(live));
        assert_eq!(live.record_len(), 8192);
        assert_eq!(record_len(4048), 4096);
        assert_eq!(record_len(4049), 8192);
        for i in 0..HEADER_LEN {
            let mut damaged = bytes;
            damaged[i] ^= 1;
            assert_eq!(Header::decode(&damaged), None, "a flip in byte {i}");
        }
        let dead = Header::Dead { len: 7 };
        assert_eq!(Header::decode(&dead.encode()), Some(dead));
        assert_eq!(Header::decode(&[0u8; HEADER_LEN]), None);
        assert_eq!(parse_file_name(&file_name(0xab)), Some(0xab));
        assert_eq!(parse_file_name("00ab.pack"), None);
    }
}
