//! `parcels/<name>/lock` through `parcel::read_lock` (lossy UTF-8, TOML with
//! unknown keys refused), served by a fuzz store.
#![no_main]

use isr::{layout, parcel};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let store = isr_fuzz::Store::with(&[(&layout::lock(isr_fuzz::PARCEL), data)]);
    let _ = isr_fuzz::block_on(parcel::read_lock(&store, isr_fuzz::PARCEL));
});
