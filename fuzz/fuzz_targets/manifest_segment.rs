//! The plaintext of a format-2 manifest segment (what a session decodes when
//! a read needs the segment): `decode_segment` on fuzzer bytes, the first 4
//! (little-endian) being the chunk count the segment's place says it holds.
#![no_main]

use isr::manifest::tree::decode_segment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((count, plaintext)) = data.split_first_chunk::<4>() else {
        return;
    };
    let expected = u64::from(u32::from_le_bytes(*count));
    if let Ok(chunks) = decode_segment(plaintext, expected, "fuzz.segment") {
        assert_eq!(chunks.len() as u64, expected);
    }
});
