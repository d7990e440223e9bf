//! The plaintext behind a manifest's AEAD tag: `Manifest::decode_body` (the
//! parser `isr::manifest::open` runs after decrypting format 1) on fuzzer bytes. A body that
//! decodes must be valid, encode back to the same bytes' meaning, and survive
//! seal → open under the fixture key.
#![no_main]

use isr::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = Manifest::decode_body(data, "fuzz.manifest") else {
        return;
    };
    manifest.validate().expect("a decoded manifest is valid");
    let _ = (
        manifest.logical_size(),
        manifest.chunk_count(),
        manifest.stored_chunks().count(),
    );
    let body = manifest.encode_body().expect("a decoded manifest encodes");
    let again = Manifest::decode_body(&body, "fuzz.manifest").expect("its encoding decodes");
    assert_eq!(again, manifest);
    let fixture = isr_fuzz::fixture();
    let sealed = manifest
        .seal(&fixture.secrets.parcel_key, &fixture.id)
        .expect("a decoded manifest seals");
    let opened = isr::manifest::open(
        &sealed,
        &fixture.secrets.parcel_key,
        &fixture.id,
        manifest.version,
        "fuzz.manifest",
    )
    .expect("a sealed manifest opens");
    assert_eq!(opened, isr::manifest::Stored::Whole(manifest));
});
