//! Chunk codec: plaintext ⇄ stored bytes.
//!
//! A parcel's files are cut into fixed-size chunks (a power of two between
//! [`MIN_CHUNK_SIZE`] and [`MAX_CHUNK_SIZE`], fixed per parcel at import). Each
//! chunk is either all zeros — recorded as [`ChunkRef::Zero`] and never stored — or
//! sealed into *stored bytes*:
//!
//! ```text
//! key     = blake3::keyed_hash(dedup_secret, plaintext)          (convergent key)
//! payload = zstd(plaintext) if that is smaller, else plaintext
//! nonce   = blake3::keyed_hash(key, header[0..12] || payload)[0..12]
//! stored  = header || ChaCha20-Poly1305(key, nonce, payload, aad = header)
//! tag     = blake3(stored)                                        (the chunk's name)
//!
//! header (24 bytes, little-endian):
//!  0      4  magic "ISRC"
//!  4      1  format version (1)
//!  5      1  compression: 0 = none, 1 = zstd
//!  6      2  reserved, zero
//!  8      4  plaintext length (u32)
//! 12     12  nonce
//! 24      …  ciphertext of payload, then the 16-byte Poly1305 tag
//! ```
//!
//! The same plaintext under the same dedup secret gives the same key; the same
//! payload gives the same nonce and therefore the same stored bytes and tag, which
//! is what makes deduplication work. The nonce is derived from the payload (not
//! fixed at zero) so that two different payloads of one plaintext — a different zstd
//! level or library version — never reuse a (key, nonce) pair; see
//! `docs/format.md`.
//!
//! Decoding checks, in order: size bounds, the tag over the stored bytes, the
//! header, the AEAD, the decompressed length, and finally that the plaintext
//! hashes back to its convergent key. Any failure is a [`ChunkError`] naming the
//! chunk; wrong bytes are never returned.

use std::fmt;

use bytes::{Bytes, BytesMut};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::keys::DedupSecret;

/// Smallest allowed chunk size (64 KiB).
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
/// Largest allowed chunk size (4 MiB).
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Chunk size used when the user does not choose one (128 KiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 128 * 1024;
/// zstd level used when the user does not choose one.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

const MAGIC: &[u8; 4] = b"ISRC";
const FORMAT_VERSION: u8 = 1;
/// Length of the plaintext header in front of the ciphertext.
pub const HEADER_LEN: usize = 24;
/// Poly1305 authentication tag length.
const AEAD_TAG_LEN: usize = 16;
/// Bytes a stored chunk adds to its payload.
pub const STORED_OVERHEAD: usize = HEADER_LEN + AEAD_TAG_LEN;
/// Largest stored chunk that can be valid (an incompressible maximum-size chunk).
pub const MAX_STORED_LEN: usize = MAX_CHUNK_SIZE as usize + STORED_OVERHEAD;

/// Checks that `size` is a power of two within the allowed chunk size range.
pub fn validate_chunk_size(size: u32) -> Result<(), String> {
    if !size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        return Err(format!(
            "chunk size {size} is not a power of two between {MIN_CHUNK_SIZE} (64 KiB) and {MAX_CHUNK_SIZE} (4 MiB)"
        ));
    }
    Ok(())
}

/// How the payload inside a stored chunk is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Compression {
    /// Payload is the plaintext itself (compression did not help).
    None = 0,
    /// Payload is a zstd frame of the plaintext.
    Zstd = 1,
}

impl TryFrom<u8> for Compression {
    type Error = u8;
    fn try_from(value: u8) -> Result<Self, u8> {
        match value {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Zstd),
            other => Err(other),
        }
    }
}

/// The name of a stored chunk: blake3 of its stored bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkTag(pub [u8; 32]);

impl ChunkTag {
    /// The tag of `stored` bytes.
    pub fn of(stored: &[u8]) -> ChunkTag {
        ChunkTag(*blake3::hash(stored).as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(text: &str) -> Option<ChunkTag> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(ChunkTag(bytes))
    }
}

impl fmt::Display for ChunkTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkTag({})", &self.to_hex()[..16])
    }
}

/// The convergent encryption key of one chunk. Zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct ChunkKey(pub(crate) [u8; 32]);

impl ChunkKey {
    /// Wraps raw key bytes (as read from a manifest).
    pub fn from_bytes(bytes: [u8; 32]) -> ChunkKey {
        ChunkKey(bytes)
    }

    /// Raw key bytes (for writing a manifest).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkKey(<redacted>)")
    }
}

/// How a manifest refers to one chunk of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkRef {
    /// The chunk is all zeros: nothing is stored, fetched or uploaded.
    Zero,
    /// The chunk is stored under `tag`; `key` decrypts it.
    Stored {
        /// blake3 of the stored bytes: the object name in the store.
        tag: ChunkTag,
        /// Convergent key of the plaintext.
        key: ChunkKey,
        /// Length of the stored bytes, checked before hashing.
        stored_len: u32,
    },
}

impl ChunkRef {
    /// The tag of a stored chunk, `None` for a zero chunk.
    pub fn tag(&self) -> Option<ChunkTag> {
        match self {
            ChunkRef::Zero => None,
            ChunkRef::Stored { tag, .. } => Some(*tag),
        }
    }

    /// The tag and stored length of a stored chunk, `None` for a zero chunk.
    pub fn stored(&self) -> Option<(ChunkTag, u64)> {
        match self {
            ChunkRef::Zero => None,
            ChunkRef::Stored {
                tag, stored_len, ..
            } => Some((*tag, u64::from(*stored_len))),
        }
    }
}

/// The result of encoding one plaintext chunk.
#[derive(Debug)]
pub enum EncodedChunk {
    /// All zeros: nothing to store.
    Zero,
    /// Bytes to store under the reference's tag.
    Stored {
        /// Reference to record in the manifest.
        chunk: ChunkRef,
        /// The stored bytes (header + ciphertext).
        stored: Vec<u8>,
    },
}

impl EncodedChunk {
    /// The manifest reference for this chunk.
    pub fn chunk_ref(&self) -> ChunkRef {
        match self {
            EncodedChunk::Zero => ChunkRef::Zero,
            EncodedChunk::Stored { chunk, .. } => chunk.clone(),
        }
    }
}

/// Why a stored chunk could not be decoded. Every variant names the chunk.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The stored bytes have an impossible length for a chunk.
    #[error("chunk {tag}: stored length {len} is outside the valid range")]
    BadLength {
        /// Chunk name.
        tag: ChunkTag,
        /// Length found.
        len: usize,
    },
    /// The stored bytes are not the ones the manifest names (tampered, truncated or swapped).
    #[error(
        "chunk {tag}: content does not match its tag (found {found}); the stored object is corrupt or was replaced"
    )]
    TagMismatch {
        /// Chunk name expected.
        tag: ChunkTag,
        /// Hash of what was found.
        found: ChunkTag,
    },
    /// The header is not one this version understands.
    #[error("chunk {tag}: bad header: {reason}")]
    BadHeader {
        /// Chunk name.
        tag: ChunkTag,
        /// What was wrong.
        reason: String,
    },
    /// Authentication failed: wrong key, or bytes changed in a way the tag did not catch.
    #[error("chunk {tag}: decryption failed (wrong key or corrupt data)")]
    Decrypt {
        /// Chunk name.
        tag: ChunkTag,
    },
    /// The payload did not decompress to the length in the header.
    #[error("chunk {tag}: payload does not decompress correctly: {reason}")]
    Decompress {
        /// Chunk name.
        tag: ChunkTag,
        /// What went wrong.
        reason: String,
    },
    /// The plaintext does not hash to the chunk's convergent key.
    #[error("chunk {tag}: plaintext does not match its key")]
    KeyMismatch {
        /// Chunk name.
        tag: ChunkTag,
    },
}

impl crate::error::Classify for ChunkError {
    /// Every way a stored chunk fails to decode is damage (or a wrong key,
    /// which a manifest that opened rules out).
    fn class(&self) -> crate::error::ErrorClass {
        crate::error::ErrorClass::Integrity
    }
}

impl ChunkError {
    /// The chunk the error is about.
    pub fn tag(&self) -> ChunkTag {
        match self {
            ChunkError::BadLength { tag, .. }
            | ChunkError::TagMismatch { tag, .. }
            | ChunkError::BadHeader { tag, .. }
            | ChunkError::Decrypt { tag }
            | ChunkError::Decompress { tag, .. }
            | ChunkError::KeyMismatch { tag } => *tag,
        }
    }
}

/// True when every byte of `data` is zero.
pub fn is_all_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    let blocks_zero = blocks
        .by_ref()
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0);
    blocks_zero && blocks.remainder().iter().all(|&b| b == 0)
}

/// Encodes plaintext chunks under one parcel's dedup secret. One per worker
/// thread: it keeps a zstd context for reuse.
pub struct ChunkEncoder {
    secret: DedupSecret,
    compressor: zstd::bulk::Compressor<'static>,
}

impl fmt::Debug for ChunkEncoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkEncoder { .. }")
    }
}

impl ChunkEncoder {
    /// An encoder compressing at `zstd_level` (1–19; ≤ 0 means zstd's default).
    pub fn new(secret: DedupSecret, zstd_level: i32) -> std::io::Result<ChunkEncoder> {
        let compressor = zstd::bulk::Compressor::new(zstd_level)?;
        Ok(ChunkEncoder { secret, compressor })
    }

    /// Seals one chunk of plaintext. Panics only on allocation failure.
    pub fn encode(&mut self, plaintext: &[u8]) -> EncodedChunk {
        assert!(
            plaintext.len() <= MAX_CHUNK_SIZE as usize,
            "chunk larger than MAX_CHUNK_SIZE"
        );
        if is_all_zero(plaintext) {
            return EncodedChunk::Zero;
        }
        let key = ChunkKey(*blake3::keyed_hash(self.secret.as_bytes(), plaintext).as_bytes());
        let compressed = self.compressor.compress(plaintext).ok();
        let (compression, payload): (Compression, &[u8]) = match &compressed {
            Some(c) if c.len() < plaintext.len() => (Compression::Zstd, c),
            _ => (Compression::None, plaintext),
        };
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(MAGIC);
        header[4] = FORMAT_VERSION;
        header[5] = compression as u8;
        header[8..12].copy_from_slice(&(plaintext.len() as u32).to_le_bytes());
        let mut nonce_hasher = blake3::Hasher::new_keyed(&key.0);
        nonce_hasher.update(&header[0..12]);
        nonce_hasher.update(payload);
        header[12..24].copy_from_slice(&nonce_hasher.finalize().as_bytes()[0..12]);

        let mut stored = Vec::with_capacity(HEADER_LEN + payload.len() + AEAD_TAG_LEN);
        stored.extend_from_slice(&header);
        stored.extend_from_slice(payload);
        let (aad, in_out) = stored.split_at_mut(HEADER_LEN);
        let poly1305_tag = aead_key(&key)
            .seal_in_place_separate_tag(chunk_nonce(aad), Aad::from(&*aad), in_out)
            .expect("ChaCha20-Poly1305 encryption of a bounded buffer cannot fail");
        stored.extend_from_slice(poly1305_tag.as_ref());
        let tag = ChunkTag::of(&stored);
        EncodedChunk::Stored {
            chunk: ChunkRef::Stored {
                tag,
                key,
                stored_len: stored.len() as u32,
            },
            stored,
        }
    }
}

/// Checks that `stored` is the chunk named `tag` (length bounds and hash only, no key needed).
pub fn verify_tag(tag: ChunkTag, stored: &[u8]) -> Result<(), ChunkError> {
    if stored.len() < STORED_OVERHEAD || stored.len() > MAX_STORED_LEN {
        return Err(ChunkError::BadLength {
            tag,
            len: stored.len(),
        });
    }
    let found = ChunkTag::of(stored);
    if found != tag {
        return Err(ChunkError::TagMismatch { tag, found });
    }
    Ok(())
}

/// Decodes stored bytes back to plaintext, verifying everything (see the module doc).
pub fn decode(
    secret: &DedupSecret,
    tag: ChunkTag,
    key: &ChunkKey,
    stored: Bytes,
) -> Result<Bytes, ChunkError> {
    verify_tag(tag, &stored)?;
    decode_verified(secret, tag, key, stored)
}

/// [`decode`] for bytes already checked with [`verify_tag`] (downloads):
/// everything but the tag hash, so also the check that the plaintext is the
/// one its convergent key was derived from.
pub fn decode_verified(
    secret: &DedupSecret,
    tag: ChunkTag,
    key: &ChunkKey,
    stored: Bytes,
) -> Result<Bytes, ChunkError> {
    let plaintext = decrypt_cached(tag, key, stored)?;
    if blake3::keyed_hash(secret.as_bytes(), &plaintext).as_bytes() != key.as_bytes() {
        return Err(ChunkError::KeyMismatch { tag });
    }
    Ok(plaintext)
}

/// Decrypts (and decompresses) a chunk from the local cache: bytes that were
/// checked in full ([`decode`] or [`decode_verified`], or sealed here) when
/// they entered the cache. The AEAD check under `key` is what this still
/// does: damage since, or the bytes of any other chunk, fail it. Neither
/// BLAKE3 pass is repeated; a warm read is one decryption per chunk
/// (docs/decisions.md).
pub fn decrypt_cached(tag: ChunkTag, key: &ChunkKey, stored: Bytes) -> Result<Bytes, ChunkError> {
    if stored.len() < STORED_OVERHEAD || stored.len() > MAX_STORED_LEN {
        return Err(ChunkError::BadLength {
            tag,
            len: stored.len(),
        });
    }
    let header = &stored[..HEADER_LEN];
    let bad_header = |reason: String| ChunkError::BadHeader { tag, reason };
    if &header[0..4] != MAGIC {
        return Err(bad_header("wrong magic".into()));
    }
    if header[4] != FORMAT_VERSION {
        return Err(bad_header(format!(
            "format version {} is not supported (this isr reads version {FORMAT_VERSION})",
            header[4]
        )));
    }
    let compression = Compression::try_from(header[5])
        .map_err(|c| bad_header(format!("unknown compression {c}")))?;
    let plaintext_len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
    if plaintext_len == 0 || plaintext_len > MAX_CHUNK_SIZE as usize {
        return Err(bad_header(format!(
            "plaintext length {plaintext_len} out of range"
        )));
    }
    let mut buffer = writable(stored);
    let (aad, in_out) = buffer.split_at_mut(HEADER_LEN);
    let payload_len = aead_key(key)
        .open_in_place(chunk_nonce(aad), Aad::from(&*aad), in_out)
        .map_err(|_| ChunkError::Decrypt { tag })?
        .len();
    let payload = buffer.freeze().slice(HEADER_LEN..HEADER_LEN + payload_len);
    let plaintext = match compression {
        Compression::None => payload,
        Compression::Zstd => Bytes::from(zstd::bulk::decompress(&payload, plaintext_len).map_err(
            |e| ChunkError::Decompress {
                tag,
                reason: e.to_string(),
            },
        )?),
    };
    if plaintext.len() != plaintext_len {
        return Err(ChunkError::Decompress {
            tag,
            reason: format!("{} bytes instead of {plaintext_len}", plaintext.len()),
        });
    }
    Ok(plaintext)
}

/// The bytes as a buffer to decrypt in place: without a copy when nobody
/// else holds them (a chunk file just read from the cache).
fn writable(stored: Bytes) -> BytesMut {
    stored
        .try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]))
}

/// A chunk's AEAD key (ChaCha20-Poly1305, RFC 8439).
fn aead_key(key: &ChunkKey) -> LessSafeKey {
    LessSafeKey::new(
        UnboundKey::new(&CHACHA20_POLY1305, &key.0).expect("a 32-byte ChaCha20-Poly1305 key"),
    )
}

/// The nonce stored in a chunk's header.
fn chunk_nonce(header: &[u8]) -> Nonce {
    Nonce::try_assume_unique_for_key(&header[12..24]).expect("12-byte nonce")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secret(byte: u8) -> DedupSecret {
        DedupSecret::from_bytes([byte; 32])
    }

    /// Seals `data` (not all zeros) under `secret(seed)`: tag, key, stored bytes.
    fn sealed(seed: u8, zstd_level: i32, data: &[u8]) -> (ChunkTag, ChunkKey, Vec<u8>) {
        let EncodedChunk::Stored {
            chunk: ChunkRef::Stored { tag, key, .. },
            stored,
        } = ChunkEncoder::new(secret(seed), zstd_level)
            .unwrap()
            .encode(data)
        else {
            panic!("stored chunk expected")
        };
        (tag, key, stored)
    }

    fn roundtrip(data: &[u8]) -> EncodedChunk {
        let mut encoder = ChunkEncoder::new(secret(7), 3).unwrap();
        let encoded = encoder.encode(data);
        if let EncodedChunk::Stored {
            chunk:
                ChunkRef::Stored {
                    tag,
                    key,
                    stored_len,
                },
            stored,
        } = &encoded
        {
            assert_eq!(*stored_len as usize, stored.len());
            assert_eq!(
                decode(&secret(7), *tag, key, Bytes::copy_from_slice(stored)).unwrap(),
                data
            );
        }
        encoded
    }

    #[test]
    fn the_chunk_aead_is_rfc_8439_chacha20_poly1305_as_before() {
        // Chunks were sealed with the chacha20poly1305 crate until ring took
        // over for speed: both must be the same construction, byte for byte.
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let plaintext: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (tag, key, stored) = sealed(9, 0, &plaintext);
        let cipher = chacha20poly1305::ChaCha20Poly1305::new(&chacha20poly1305::Key::from(key.0));
        let nonce = chacha20poly1305::Nonce::try_from(&stored[12..24]).unwrap();
        let header = &stored[..HEADER_LEN];
        let payload = cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: &stored[HEADER_LEN..],
                    aad: header,
                },
            )
            .expect("the other implementation opens it");
        let resealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &payload,
                    aad: header,
                },
            )
            .unwrap();
        assert_eq!(&stored[HEADER_LEN..], &resealed[..]);
        assert_eq!(
            decode(&secret(9), tag, &key, Bytes::from(stored)).unwrap(),
            plaintext
        );
    }

    #[test]
    fn a_damaged_cached_chunk_fails_decryption() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
        let (tag, key, stored) = sealed(5, 3, &data);
        let good = Bytes::from(stored.clone());
        assert_eq!(decrypt_cached(tag, &key, good).unwrap(), data);
        for at in [0, 12, HEADER_LEN, stored.len() - 1] {
            let mut bad = stored.clone();
            bad[at] ^= 1;
            assert!(
                decrypt_cached(tag, &key, Bytes::from(bad)).is_err(),
                "byte {at}"
            );
        }
    }

    #[test]
    fn zero_chunk_is_elided() {
        assert!(matches!(roundtrip(&[0u8; 65536]), EncodedChunk::Zero));
    }

    #[test]
    fn text_is_compressed_and_random_is_not() {
        let text: Vec<u8> = b"the quick brown fox "
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        let EncodedChunk::Stored { stored, .. } = roundtrip(&text) else {
            panic!("zero?")
        };
        assert_eq!(stored[5], Compression::Zstd as u8);
        assert!(stored.len() < 4096);

        let random: Vec<u8> = (0..65536).map(|_| rand::random::<u8>()).collect();
        let EncodedChunk::Stored { stored, .. } = roundtrip(&random) else {
            panic!("zero?")
        };
        assert_eq!(stored[5], Compression::None as u8);
        assert_eq!(stored.len(), random.len() + STORED_OVERHEAD);
    }

    #[test]
    fn same_plaintext_same_secret_dedups_other_secret_does_not() {
        let data = vec![42u8; 100_000];
        let a = ChunkEncoder::new(secret(1), 3)
            .unwrap()
            .encode(&data)
            .chunk_ref();
        let b = ChunkEncoder::new(secret(1), 3)
            .unwrap()
            .encode(&data)
            .chunk_ref();
        let c = ChunkEncoder::new(secret(2), 3)
            .unwrap()
            .encode(&data)
            .chunk_ref();
        assert_eq!(a.tag(), b.tag());
        assert_ne!(a.tag(), c.tag());
    }

    #[test]
    fn different_levels_use_different_nonces() {
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 7000) as u8)
            .collect();
        let a = ChunkEncoder::new(secret(1), 1).unwrap().encode(&data);
        let b = ChunkEncoder::new(secret(1), 19).unwrap().encode(&data);
        let (EncodedChunk::Stored { stored: sa, .. }, EncodedChunk::Stored { stored: sb, .. }) =
            (a, b)
        else {
            panic!("zero?")
        };
        if sa[HEADER_LEN..] != sb[HEADER_LEN..] {
            assert_ne!(
                sa[12..24],
                sb[12..24],
                "different payloads must not share a nonce"
            );
        }
    }

    #[test]
    fn every_corruption_is_an_error_naming_the_chunk() {
        let data: Vec<u8> = b"hello chunk "
            .iter()
            .cycle()
            .take(70_000)
            .copied()
            .collect();
        let (tag, key, stored) = sealed(3, 3, &data);
        for position in [0, 5, HEADER_LEN + 3, stored.len() - 1] {
            let mut bad = stored.clone();
            bad[position] ^= 1;
            let err = decode(&secret(3), tag, &key, Bytes::from(bad)).unwrap_err();
            assert!(matches!(err, ChunkError::TagMismatch { .. }), "{err}");
            assert_eq!(err.tag(), tag);
        }
        let truncated = Bytes::copy_from_slice(&stored[..stored.len() - 10]);
        let err = decode(&secret(3), tag, &key, truncated).unwrap_err();
        assert!(err.to_string().contains(&tag.to_hex()));
        let wrong_key = ChunkKey([9; 32]);
        assert!(matches!(
            decode(&secret(3), tag, &wrong_key, Bytes::from(stored.clone())),
            Err(ChunkError::Decrypt { .. })
        ));
        assert!(matches!(
            decode(&secret(4), tag, &key, Bytes::from(stored)),
            Err(ChunkError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn chunk_sizes() {
        assert!(validate_chunk_size(DEFAULT_CHUNK_SIZE).is_ok());
        assert!(validate_chunk_size(MIN_CHUNK_SIZE).is_ok());
        assert!(validate_chunk_size(MAX_CHUNK_SIZE).is_ok());
        assert!(validate_chunk_size(32 * 1024).is_err());
        assert!(validate_chunk_size(100_000).is_err());
        assert!(validate_chunk_size(8 * 1024 * 1024).is_err());
    }

    #[test]
    fn debug_never_shows_keys() {
        let key = ChunkKey([0xab; 32]);
        assert!(!format!("{key:?}").contains("ab"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn codec_roundtrips(
            pattern in proptest::collection::vec(any::<u8>(), 1..512),
            repeat in 1usize..300,
            zero_prefix in 0usize..4096,
        ) {
            let mut data = vec![0u8; zero_prefix];
            for _ in 0..repeat { data.extend_from_slice(&pattern); }
            data.truncate(MAX_CHUNK_SIZE as usize);
            let encoded = roundtrip(&data);
            prop_assert_eq!(matches!(encoded, EncodedChunk::Zero), is_all_zero(&data));
        }
    }
}
