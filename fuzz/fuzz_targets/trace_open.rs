//! A stored access trace or working set (`versions/<N>.trace`, `.wset`)
//! through `trace::open` with the fixture's parcel key and id, for the
//! version its header claims. Mutations stop at the AEAD tag; the seeds
//! (sealed by `trace::seal` under the fixture key) open.
#![no_main]

use isr::trace;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fixture = isr_fuzz::fixture();
    let version = isr_fuzz::claimed_version(data);
    if let Ok(tags) = trace::open(
        data,
        &fixture.secrets.parcel_key,
        &fixture.id,
        version,
        "fuzz.trace",
    ) {
        assert!(tags.len() <= trace::MAX_TRACE_TAGS);
    }
});
