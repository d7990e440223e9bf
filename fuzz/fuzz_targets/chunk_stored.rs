//! A stored chunk (`chunks/<tt>/<tag>`) through `chunk::decode`, named by
//! its own hash (a fuzzer cannot forge blake3, so the tag check passes by
//! construction) with the key the fixture manifests give that tag, else a
//! fixed one: length bounds, header (magic, version, compression, plaintext
//! length), ChaCha20-Poly1305, decompression, convergent-key check. The real
//! fixture chunks in the seeds decode in full. Also `verify_tag` against a
//! wrong name and `decrypt_cached` (the cache's path).
#![no_main]

use bytes::Bytes;
use isr::chunk::{self, ChunkKey, ChunkTag};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fixture = isr_fuzz::fixture();
    let tag = ChunkTag::of(data);
    let fixed = ChunkKey::from_bytes([0x42; 32]);
    let key = fixture.chunk_keys.get(&tag).unwrap_or(&fixed);
    let stored = Bytes::copy_from_slice(data);
    let decoded = chunk::decode(&fixture.secrets.dedup_secret, tag, key, stored.clone());
    let cached = chunk::decrypt_cached(tag, key, stored);
    if let Ok(plaintext) = &decoded {
        assert_eq!(
            plaintext,
            cached.as_ref().expect("decode ok, cache path ok")
        );
        assert!(!plaintext.is_empty() && plaintext.len() <= chunk::MAX_CHUNK_SIZE as usize);
    }
    if let Err(e) = &decoded {
        assert_eq!(e.tag(), tag, "every error names its chunk");
    }
    assert!(chunk::verify_tag(ChunkTag([0; 32]), data).is_err() || tag == ChunkTag([0; 32]));
});
