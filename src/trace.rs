//! The access trace stored beside a version (`versions/<N>.trace`): the order
//! in which the session that committed version N first read each stored chunk.
//! The next resume of the parcel prefetches in that order, after the memory
//! image and before the sequential sweep, so a replayed workload (a boot, an
//! application start) finds its chunks local sooner.
//!
//! Stored form (all integers little-endian), encrypted like a manifest so the
//! store learns nothing it could not already see from the chunk names:
//!
//! ```text
//! "ISRT" | format u16 = 1 | 0u16 | version u64 | nonce [24]
//! XChaCha20-Poly1305(parcel key, nonce, aad = the 40 header bytes ‖ parcel id,
//!                    count u32 ‖ count × tag [32])
//! ```

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};

use crate::chunk::ChunkTag;
use crate::keys::ParcelKey;

const MAGIC: &[u8; 4] = b"ISRT";
/// Format of trace objects.
pub const FORMAT_VERSION: u16 = 1;
const HEADER_LEN: usize = 40;
const AEAD_TAG_LEN: usize = 16;
/// Longest trace kept (4 Mi chunks: 512 GiB of 128 KiB chunks); longer traces
/// are cut, which only shortens the prefetch order.
pub const MAX_TRACE_TAGS: usize = 1 << 22;

/// Why a stored trace was rejected.
#[derive(Debug, thiserror::Error)]
#[error("access trace {object} is unusable: {reason}")]
pub struct TraceError {
    /// Object key.
    pub object: String,
    /// Why.
    pub reason: String,
}

impl crate::error::Classify for TraceError {
    fn class(&self) -> crate::error::ErrorClass {
        crate::error::ErrorClass::Integrity
    }
}

/// Encrypts `tags` (cut to [`MAX_TRACE_TAGS`]) as the trace of `version`.
pub fn seal(tags: &[ChunkTag], key: &ParcelKey, parcel_id: &[u8; 16], version: u64) -> Vec<u8> {
    let tags = &tags[..tags.len().min(MAX_TRACE_TAGS)];
    let mut body = Vec::with_capacity(4 + 32 * tags.len());
    body.extend_from_slice(&(tags.len() as u32).to_le_bytes());
    for tag in tags {
        body.extend_from_slice(&tag.0);
    }
    let nonce: [u8; 24] = rand::random();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + AEAD_TAG_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&nonce);
    let mut aad = out.clone();
    aad.extend_from_slice(parcel_id);
    let cipher = XChaCha20Poly1305::new(&Key::from(*key.as_bytes()));
    out.extend(
        cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &body,
                    aad: &aad,
                },
            )
            .expect("encryption of a bounded buffer cannot fail"),
    );
    out
}

/// Checks and decrypts the stored trace of `version`.
pub fn open(
    stored: &[u8],
    key: &ParcelKey,
    parcel_id: &[u8; 16],
    version: u64,
    object: &str,
) -> Result<Vec<ChunkTag>, TraceError> {
    let reject = |reason: &str| TraceError {
        object: object.to_owned(),
        reason: reason.to_owned(),
    };
    if stored.len() < HEADER_LEN + AEAD_TAG_LEN + 4 {
        return Err(reject("too short"));
    }
    if &stored[..4] != MAGIC {
        return Err(reject("not a trace object"));
    }
    if u16::from_le_bytes([stored[4], stored[5]]) != FORMAT_VERSION {
        return Err(reject("unsupported format"));
    }
    if u64::from_le_bytes(stored[8..16].try_into().expect("8 bytes")) != version {
        return Err(reject("belongs to another version"));
    }
    let nonce: [u8; 24] = stored[16..40].try_into().expect("24 bytes");
    let mut aad = stored[..HEADER_LEN].to_vec();
    aad.extend_from_slice(parcel_id);
    let cipher = XChaCha20Poly1305::new(&Key::from(*key.as_bytes()));
    let body = cipher
        .decrypt(
            &XNonce::from(nonce),
            Payload {
                msg: &stored[HEADER_LEN..],
                aad: &aad,
            },
        )
        .map_err(|_| reject("does not decrypt with this parcel's key"))?;
    let count = u32::from_le_bytes(body[..4].try_into().expect("4 bytes")) as usize;
    if count > MAX_TRACE_TAGS || body.len() != 4 + 32 * count {
        return Err(reject("length does not match its count"));
    }
    Ok(body[4..]
        .chunks_exact(32)
        .map(|tag| ChunkTag(tag.try_into().expect("32 bytes")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_binding_is_checked() {
        let key = ParcelKey::random();
        let id = [7u8; 16];
        let tags: Vec<ChunkTag> = (0..100u8).map(|i| ChunkTag::of(&[i])).collect();
        let sealed = seal(&tags, &key, &id, 5);
        assert_eq!(open(&sealed, &key, &id, 5, "t").unwrap(), tags);
        assert!(open(&sealed, &key, &id, 6, "t").is_err(), "other version");
        assert!(
            open(&sealed, &key, &[8u8; 16], 5, "t").is_err(),
            "other parcel"
        );
        assert!(open(&sealed, &ParcelKey::random(), &id, 5, "t").is_err());
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(open(&flipped, &key, &id, 5, "t").is_err());
        assert!(open(&sealed[..30], &key, &id, 5, "t").is_err());
        assert!(
            open(&seal(&[], &key, &id, 1), &key, &id, 1, "t")
                .unwrap()
                .is_empty()
        );
    }
}
