//! The `versions/oldest` hint and what it steers: `parcel::read_oldest_hint`
//! on the hint's bytes, then `parcel::list_versions` on a store that cannot
//! list, which probes manifests from the hint. Input = first (u64 LE) ‖ span
//! (u64 LE) ‖ hint bytes: the store claims manifests `first ..= first + span`
//! exist (wrapping), as a hostile or broken HTTP store may. Shorter inputs are
//! all hint, with no manifests.
//!
//! `ISR_FUZZ_HONEST_STORE=1` makes the store claim at most 1,024 versions, none
//! within 2,048 of `u64::MAX`: probing then cannot hit the known defect of
//! `fuzz/known-defects` (a store claiming millions of versions), for a long run
//! of the rest of the decoder while that defect is open.
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
    let claims = match claims {
        Some((first, span)) if honest_store() => Some((first.min(u64::MAX - 2048), span.min(1023))),
        other => other,
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

fn honest_store() -> bool {
    static HONEST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HONEST.get_or_init(|| std::env::var_os("ISR_FUZZ_HONEST_STORE").is_some_and(|v| v == "1"))
}
