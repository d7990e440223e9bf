//! A stored manifest object (`versions/<N>.manifest`) through
//! `isr::manifest::open` (either format) with the fixture's parcel key and id: size bounds, magic,
//! format, version, then XChaCha20-Poly1305. The expected version is the one
//! the header claims (else the mismatch check stops everything). Mutated
//! objects stop at the AEAD tag; the real fixture manifests in the seeds open.
#![no_main]

use isr::manifest::Stored;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fixture = isr_fuzz::fixture();
    let version = isr_fuzz::claimed_version(data);
    if let Ok(stored) = isr::manifest::open(
        data,
        &fixture.secrets.parcel_key,
        &fixture.id,
        version,
        "fuzz.manifest",
    ) {
        assert_eq!(stored.header().version, version);
        if let Stored::Whole(manifest) = &stored {
            manifest.validate().expect("an opened manifest is valid");
        }
    }
});
