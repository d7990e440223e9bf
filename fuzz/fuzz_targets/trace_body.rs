//! What is behind a trace's AEAD tag: the harness seals the input as the
//! plaintext body (count u32 ‖ count × tag) under the fixture key, and
//! `trace::open` parses it. An accepted body is exactly count × 32 bytes.
#![no_main]

use isr::trace;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fixture = isr_fuzz::fixture();
    let stored = isr_fuzz::seal_trace_body(data, 3);
    let opened = trace::open(
        &stored,
        &fixture.secrets.parcel_key,
        &fixture.id,
        3,
        "fuzz.trace",
    );
    let well_formed = data.get(..4).is_some_and(|count| {
        let count = u32::from_le_bytes(count.try_into().expect("4 bytes")) as usize;
        count <= trace::MAX_TRACE_TAGS && data.len() == 4 + 32 * count
    });
    assert_eq!(
        opened.is_ok(),
        well_formed,
        "accepted exactly when count matches length"
    );
});
