//! isr — Internet Suspend/Resume.
//!
//! A *parcel* is a VM's files (disk image, memory image, VMM config) plus their
//! history, kept in a *store* as immutable, encrypted, content-addressed chunks
//! and one encrypted manifest per version. This library holds everything that is
//! not argument parsing; `isrctl` and `isrfsd` are thin front ends over it.
//! Modules are layered, each importing only from layers below it
//! (docs/architecture.md; `tests/layering.rs` checks it).
//!
//! | module | owns |
//! |---|---|
//! | [`cache`] | local chunk cache: ciphertext by tag, LRU eviction, pins for live sessions |
//! | [`chunk`] | codec: plaintext ⇄ stored bytes (zstd, keyed convergent AEAD), tags, zero chunks |
//! | [`manifest`] | the version record: file tree, chunk lists, (de)serialisation, encryption |
//! | [`keys`] | parcel key and dedup secret, keyslots (argon2id passphrase, key file), hygiene |
//! | [`store`] | `ReadStore`/`ListStore`/`WriteStore`; local, S3, HTTP, memory; retries |
//! | [`layout`] | store keys: where each object of a store lives |
//! | [`parcel`] | `parcel.toml`, versions, create-only commit, locks |
//! | [`import`] | files → chunks → committed version, in parallel with bounded memory |
//! | [`export`] | version → files, and chunk verification |
//! | [`gc`] | garbage collection: old versions (oldest prefix), then unreferenced chunks past a grace period |
//! | [`fetch`] | scheduler: one download per chunk, priorities with a demand reservation, retries, verification |
//! | [`image`] | one open parcel: base manifest + durable overlay, write-back buffer, read/write/truncate/punch-hole |
//! | [`session`] | lifecycle: lock, resume or reattach, prefetch order, trickle upload, sync, checkin, discard |
//! | [`trace`] | the access trace stored beside a version (first-read order of chunks), encrypted |
//! | [`maintenance`] | rollback to an earlier version; passwd (re-wrap the parcel key) |
//! | [`vmm`] | the parcel's VM: `vm.toml` ([`vmm::config`]), the [`vmm::Vmm`] adapters (QEMU over QMP, libvirt, VirtualBox, none), supervision |
//! | [`daemon`] | the daemon's orchestration: sessions, their mounts (through a [`daemon::Mounter`]) and VMs, one answer per control request |
//! | [`control`] | isrctl ⇄ isrfsd protocol: versioned JSON lines over an owner-only Unix socket |
//! | [`config`] | TOML configuration |
//! | [`error`] | error classes ([`error::Classify`], implemented by each module's error) |
//! | [`exit`] | the exit mapping: the class of any error chain, the exit code of each class |
//! | [`progress`] | progress reporting to front ends |

pub mod cache;
pub mod chunk;
pub mod config;
pub mod control;
pub mod daemon;
pub mod error;
pub mod exit;
pub mod export;
pub mod fetch;
pub mod gc;
pub mod image;
pub mod import;
pub mod keys;
pub mod layout;
pub mod maintenance;
pub mod manifest;
pub mod parcel;
pub mod private;
pub mod progress;
pub mod session;
pub mod store;
pub mod trace;
pub mod vmm;
