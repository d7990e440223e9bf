//! A keyslot object (`keyslots/<n>`) through `keys::unlock_slot`, with the
//! fixture's key file (blake3 wrapping key: every slot of that kind reaches
//! the AEAD) and, on the bounded path only, its passphrase: a passphrase slot
//! is tried when its argon2 cost is beyond isr's bounds (refused before any
//! work), invalid for argon2, or tiny (≤ 64 KiB, ≤ 2 passes, ≤ 2 lanes).
//! Store-chosen costs are never derived otherwise. The slot's plaintext is a
//! fixed 64 bytes (two keys), so there is no parser behind the tag.
#![no_main]

use isr::keys::{self, Credential, KdfParams, KeyError, Zeroizing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fixture = isr_fuzz::fixture();
    let slots = [(7u32, data.to_vec())];
    let check = |result: Result<_, KeyError>| match result {
        Ok((_, number)) => assert_eq!(number, 7),
        Err(KeyError::CorruptSlot { slot, .. }) => assert_eq!(slot, 7),
        Err(_) => {}
    };
    check(keys::unlock_slot(
        isr_fuzz::PARCEL,
        &fixture.id,
        &slots,
        &isr_fuzz::Fixture::key_file(),
    ));
    let u32_at = |at: usize| {
        data.get(at..at + 4)
            .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let params = KdfParams {
        memory_kib: u32_at(24),
        iterations: u32_at(28),
        parallelism: u32_at(32),
    };
    let cheap = params.beyond_bounds().is_some()
        || params.iterations == 0
        || params.parallelism == 0
        || params.memory_kib < 8 * params.parallelism
        || (params.memory_kib <= 64 && params.iterations <= 2 && params.parallelism <= 2);
    if cheap {
        let passphrase = Credential::Passphrase(Zeroizing::new(isr_fuzz::PASSPHRASE.to_owned()));
        check(keys::unlock_slot(
            isr_fuzz::PARCEL,
            &fixture.id,
            &slots,
            &passphrase,
        ));
    }
});
