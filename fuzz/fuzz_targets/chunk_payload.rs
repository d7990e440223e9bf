//! What is behind a stored chunk's AEAD tag: input = chunk key (32) ‖ header
//! (24) ‖ payload. The harness seals the payload under that key as the
//! encoder does, so every input passes the tag and the AEAD and reaches the
//! header checks, the zstd decompression bounded by the header's plaintext
//! length and the convergent-key check (`chunk::decode`, then
//! `chunk::decrypt_cached`). Seeds are the real fixture chunks opened: they
//! decode in full.
#![no_main]

use bytes::Bytes;
use isr::chunk::{self, ChunkKey, ChunkTag};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 32 + 24 {
        return;
    }
    let key: [u8; 32] = data[..32].try_into().expect("32 bytes");
    let header: [u8; 24] = data[32..56].try_into().expect("24 bytes");
    let stored = isr_fuzz::seal_chunk(&key, &header, &data[56..]);
    let tag = ChunkTag::of(&stored);
    let key = ChunkKey::from_bytes(key);
    let stored = Bytes::from(stored);
    let fixture = isr_fuzz::fixture();
    match chunk::decode(&fixture.secrets.dedup_secret, tag, &key, stored.clone()) {
        Ok(plaintext) => {
            let declared = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
            assert_eq!(plaintext.len(), declared as usize);
        }
        Err(e) => assert_eq!(e.tag(), tag),
    }
    let _ = chunk::decrypt_cached(tag, &key, stored);
});
