//! The plaintext behind a format-2 manifest's AEAD tag: `Root::decode_body`
//! (what `isr::manifest::open` runs after decrypting format 2) on fuzzer
//! bytes. A root that decodes must encode back to bytes that decode to it.
#![no_main]

use isr::manifest::tree::Root;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(root) = Root::decode_body(data, "fuzz.manifest") else {
        return;
    };
    let _ = root.segment_refs().count();
    let again = Root::decode_body(&root.encode_body(), "fuzz.manifest")
        .expect("a decoded root's encoding decodes");
    assert_eq!(again, root);
});
