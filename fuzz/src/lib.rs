//! Shared pieces of isr's fuzz targets (`fuzz_targets/*.rs`).
//!
//! - [`fixture`]: the secrets of the committed v1 test store
//!   (`tests/fixtures/v1`, unlocked with its key file), so the real objects in
//!   the seed corpora open with the very key the targets use and the fuzzer
//!   starts deep inside the decoders, not at the AEAD tag.
//! - [`seal_trace_body`], [`seal_chunk`]: seal fuzzer-chosen plaintext under
//!   the fixture keys, to reach the parsers behind an AEAD tag through the
//!   library's public `open`/`decode`.
//! - [`Store`] and [`block_on`]: a store that serves fuzzer bytes to the
//!   async readers of `crate::parcel` (`parcel.toml`, lock, version hints).
//! - [`LimitedAlloc`]: the global allocator of every target. Without a
//!   sanitizer libFuzzer cannot see allocations (`-malloc_limit_mb` needs a
//!   sanitizer's malloc hooks), so this one aborts — a crash libFuzzer keeps
//!   as an artifact — on any single allocation over [`MAX_ONE_ALLOCATION`] or
//!   more than [`MAX_LIVE_BYTES`] live at once, before the memory is touched.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::pin::pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use bytes::Bytes;
use isr::chunk::{ChunkKey, ChunkRef, ChunkTag};
use isr::keys::{self, Credential, ParcelSecrets, Zeroizing};
use isr::manifest::Manifest;
use isr::parcel::ParcelRecord;
use isr::store::{ReadStore, StoreError, StoreHandle};

/// Largest single allocation a decoder may make on fuzz input (the largest
/// legitimate one is a 4 MiB chunk plaintext).
pub const MAX_ONE_ALLOCATION: usize = 64 << 20;
/// Most bytes the Rust side may hold at once.
pub const MAX_LIVE_BYTES: usize = 256 << 20;

/// The allocator of every fuzz target (see the crate doc).
#[derive(Debug)]
pub struct LimitedAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Set while a limit breach is reported: the report allocates freely.
static REPORTING: AtomicBool = AtomicBool::new(false);

#[cold]
fn over_limit(what: &[u8], size: usize) -> ! {
    // No allocation here: format the number by hand.
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = size;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(b"\n==isr-fuzz== unbounded allocation: ");
    let _ = err.write_all(what);
    let _ = err.write_all(&digits[at..]);
    let _ = err.write_all(b" bytes\n");
    drop(err);
    if !REPORTING.swap(true, Ordering::Relaxed) {
        eprintln!("{}", std::backtrace::Backtrace::force_capture());
    }
    std::process::abort();
}

fn account(size: usize) {
    if REPORTING.load(Ordering::Relaxed) {
        return;
    }
    if size > MAX_ONE_ALLOCATION {
        over_limit(b"one allocation of ", size);
    }
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    if live > MAX_LIVE_BYTES {
        over_limit(b"live total of ", live);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments; the
// bookkeeping around it only counts sizes.
unsafe impl GlobalAlloc for LimitedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        account(layout.size());
        // SAFETY: forwarded contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        account(layout.size());
        // SAFETY: forwarded contract.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        account(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: LimitedAlloc = LimitedAlloc;

/// Name of the fixture parcel.
pub const PARCEL: &str = "fixture";
/// Passphrase of the fixture's passphrase keyslot (`tests/fixtures/make-v1-fixture.sh`).
pub const PASSPHRASE: &str = "isr fixture v1";

const FIXTURE_KEY_FILE: &[u8] = include_bytes!("../../tests/fixtures/v1/parcel.key");
const FIXTURE_RECORD: &[u8] =
    include_bytes!("../../tests/fixtures/v1/store/parcels/fixture/parcel.toml");
/// Keyslots of the fixture (0: key file, 1: passphrase).
pub const FIXTURE_SLOTS: [&[u8]; 2] = [
    include_bytes!("../../tests/fixtures/v1/store/parcels/fixture/keyslots/0"),
    include_bytes!("../../tests/fixtures/v1/store/parcels/fixture/keyslots/1"),
];
/// Manifests of the fixture, versions 1 and 2.
pub const FIXTURE_MANIFESTS: [&[u8]; 2] = [
    include_bytes!("../../tests/fixtures/v1/store/parcels/fixture/versions/0000000001.manifest"),
    include_bytes!("../../tests/fixtures/v1/store/parcels/fixture/versions/0000000002.manifest"),
];

/// The unlocked v1 fixture parcel.
#[derive(Debug)]
pub struct Fixture {
    /// Parcel key and dedup secret.
    pub secrets: ParcelSecrets,
    /// Parcel id.
    pub id: [u8; 16],
    /// `parcel.toml`.
    pub record: ParcelRecord,
    /// Both manifests, opened.
    pub manifests: Vec<Manifest>,
    /// The key of every stored chunk the manifests name.
    pub chunk_keys: HashMap<ChunkTag, ChunkKey>,
}

impl Fixture {
    /// The key-file credential that opens keyslot 0.
    pub fn key_file() -> Credential {
        Credential::KeyFile {
            bytes: Zeroizing::new(FIXTURE_KEY_FILE.to_vec()),
            path: "tests/fixtures/v1/parcel.key".into(),
        }
    }
}

/// The fixture, unlocked once per process (blake3 key-file slot: no argon2).
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let store = Store::with(&[(&isr::layout::record(PARCEL), FIXTURE_RECORD)]);
        let record = block_on(isr::parcel::read_record(&store, PARCEL))
            .expect("fixture parcel.toml")
            .expect("fixture parcel.toml exists");
        let id = record.id_bytes(PARCEL).expect("fixture id");
        let secrets = keys::unlock(
            PARCEL,
            &id,
            &[(0, FIXTURE_SLOTS[0].to_vec())],
            &Fixture::key_file(),
        )
        .expect("the fixture key file opens keyslot 0");
        let manifests: Vec<Manifest> = FIXTURE_MANIFESTS
            .iter()
            .enumerate()
            .map(|(i, stored)| {
                match isr::manifest::open(stored, &secrets.parcel_key, &id, i as u64 + 1, "fixture")
                    .expect("fixture manifest opens")
                {
                    isr::manifest::Stored::Whole(manifest) => manifest,
                    isr::manifest::Stored::Tree(_) => panic!("the fixture is format 1"),
                }
            })
            .collect();
        let mut chunk_keys = HashMap::new();
        for manifest in &manifests {
            for (_, _, chunks) in manifest.files() {
                for chunk in chunks {
                    if let ChunkRef::Stored { tag, key, .. } = chunk {
                        chunk_keys.insert(*tag, key.clone());
                    }
                }
            }
        }
        Fixture {
            secrets,
            id,
            record,
            manifests,
            chunk_keys,
        }
    })
}

/// Runs a future that never waits (the stores here answer at once).
pub fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a fuzz store future is pending; the stores here never wait"),
    }
}

/// A read-only store of fixed objects; `exists` may also answer yes for a
/// range of manifest versions (a store that claims versions it cannot serve).
#[derive(Debug, Default)]
pub struct Store {
    objects: HashMap<String, Bytes>,
    /// Manifest versions `v` of [`PARCEL`] with `v - first <= span` (wrapping) exist.
    pub manifests: Option<(u64, u64)>,
}

impl Store {
    /// A read-only handle over `objects`.
    pub fn with(objects: &[(&str, &[u8])]) -> StoreHandle {
        StoreHandle::read_only(Store::new(objects))
    }

    /// The store itself.
    pub fn new(objects: &[(&str, &[u8])]) -> Store {
        Store {
            objects: objects
                .iter()
                .map(|(key, data)| ((*key).to_owned(), Bytes::copy_from_slice(data)))
                .collect(),
            manifests: None,
        }
    }

    fn claims(&self, key: &str) -> bool {
        let Some((first, span)) = self.manifests else {
            return false;
        };
        let Some(name) = key
            .strip_prefix(&isr::layout::versions(PARCEL))
            .and_then(|name| name.strip_suffix(".manifest"))
        else {
            return false;
        };
        name.parse::<u64>()
            .is_ok_and(|v| isr::layout::manifest(PARCEL, v) == key && v.wrapping_sub(first) <= span)
    }
}

#[async_trait]
impl ReadStore for Store {
    fn url(&self) -> &str {
        "fuzz:"
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.objects
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound {
                store: "fuzz:".into(),
                key: key.into(),
            })
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.objects.contains_key(key) || self.claims(key))
    }
}

/// Header of a sealed trace object of `version` with a fixed nonce.
pub fn trace_header(version: u64) -> [u8; 40] {
    let mut header = [0u8; 40];
    header[0..4].copy_from_slice(b"ISRT");
    header[4..6].copy_from_slice(&1u16.to_le_bytes());
    header[8..16].copy_from_slice(&version.to_le_bytes());
    header[16..40].copy_from_slice(&[0x5a; 24]);
    header
}

/// A trace object of `version` whose plaintext body is `body`, sealed with the
/// fixture's parcel key exactly as `isr::trace::seal` seals one (docs/format.md).
pub fn seal_trace_body(body: &[u8], version: u64) -> Vec<u8> {
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
    let fixture = fixture();
    let header = trace_header(version);
    let mut aad = header.to_vec();
    aad.extend_from_slice(&fixture.id);
    let cipher = XChaCha20Poly1305::new(&Key::from(*fixture.secrets.parcel_key.as_bytes()));
    let nonce: [u8; 24] = header[16..40].try_into().expect("24 bytes");
    let mut out = header.to_vec();
    out.extend(
        cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: body,
                    aad: &aad,
                },
            )
            .expect("sealing a bounded buffer"),
    );
    out
}

/// Stored chunk bytes: `header` (24 bytes: magic, version, compression,
/// reserved, plaintext length, nonce) then `payload` sealed with
/// ChaCha20-Poly1305 under `key` (nonce = header bytes 12..24, AAD = the
/// header), as `isr::chunk::ChunkEncoder` seals one (docs/format.md).
pub fn seal_chunk(key: &[u8; 32], header: &[u8; 24], payload: &[u8]) -> Vec<u8> {
    use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("32-byte key"));
    let mut stored = Vec::with_capacity(header.len() + payload.len() + 16);
    stored.extend_from_slice(header);
    stored.extend_from_slice(payload);
    let (aad, in_out) = stored.split_at_mut(24);
    let nonce = Nonce::try_assume_unique_for_key(&aad[12..24]).expect("12-byte nonce");
    let tag = key
        .seal_in_place_separate_tag(nonce, Aad::from(&*aad), in_out)
        .expect("sealing a bounded buffer");
    stored.extend_from_slice(tag.as_ref());
    stored
}

/// Opens a stored chunk's AEAD (no other check): `(header, payload)`, for
/// the seed generator.
pub fn open_chunk(key: &[u8; 32], stored: &[u8]) -> Option<([u8; 24], Vec<u8>)> {
    use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).ok()?);
    let header: [u8; 24] = stored.get(..24)?.try_into().ok()?;
    let mut in_out = stored[24..].to_vec();
    let nonce = Nonce::try_assume_unique_for_key(&header[12..24]).ok()?;
    let payload = key
        .open_in_place(nonce, Aad::from(&header[..]), &mut in_out)
        .ok()?;
    Some((header, payload.to_vec()))
}

/// The version a sealed object's header claims (bytes 8..16, little-endian;
/// 1 if the input is shorter): opening for it gets past the version check.
pub fn claimed_version(data: &[u8]) -> u64 {
    data.get(8..16)
        .map_or(1, |v| u64::from_le_bytes(v.try_into().expect("8 bytes")))
}
