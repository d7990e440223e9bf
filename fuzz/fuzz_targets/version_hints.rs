//! The `versions/oldest` hint and what it steers: `parcel::read_oldest_hint`
//! on the hint's bytes, then `parcel::list_versions` on a store that cannot
//! list, which probes manifests from the hint. Input = first (u64 LE) ‖ span
//! (u64 LE) ‖ hint bytes: the store claims manifests `first ..= first + span`
//! exist (wrapping), as a hostile or broken HTTP store may. Shorter inputs are
//! all hint, with no manifests.
#![no_main]

use isr::{layout, parcel};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (claims, hint) = if data.len() >= 16 {
        let first = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
        let span = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
        (Some((first, span)), &data[16..])
    } else {
        (None, data)
    };
    let mut store = isr_fuzz::Store::new(&[(&layout::oldest_hint(isr_fuzz::PARCEL), hint)]);
    store.manifests = claims;
    let store = isr::store::StoreHandle::read_only(store);
    let parsed = isr_fuzz::block_on(parcel::read_oldest_hint(&store, isr_fuzz::PARCEL))
        .expect("a hint that is there reads");
    assert!(parsed != Some(0));
    if let Ok(versions) = isr_fuzz::block_on(parcel::list_versions(&store, isr_fuzz::PARCEL)) {
        assert!(versions.windows(2).all(|w| w[0] + 1 == w[1]), "contiguous");
    }
});
