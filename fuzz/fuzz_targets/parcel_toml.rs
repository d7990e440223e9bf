//! `parcels/<name>/parcel.toml` through `parcel::read_record` (UTF-8, TOML
//! with unknown keys refused, format, chunk size, id), served by a fuzz store.
//! A record that is accepted has a valid id and chunk size.
#![no_main]

use isr::{chunk, layout, parcel};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let store = isr_fuzz::Store::with(&[(&layout::record(isr_fuzz::PARCEL), data)]);
    if let Ok(Some(record)) = isr_fuzz::block_on(parcel::read_record(&store, isr_fuzz::PARCEL)) {
        record
            .id_bytes(isr_fuzz::PARCEL)
            .expect("an accepted record has an id");
        chunk::validate_chunk_size(record.chunk_size).expect("and a valid chunk size");
    }
});
