//! Where every object of a store lives: the key of each chunk, parcel record,
//! keyslot, manifest, access trace, version hint, lock and gc notice. The one
//! place that spells store keys; see docs/format.md for the objects themselves.

use crate::chunk::ChunkTag;

/// Prefix of every parcel's objects.
pub const PARCELS: &str = "parcels/";
/// Prefix of every chunk.
pub const CHUNKS: &str = "chunks/";

/// The marker object of a store (`isrctl init`, parcel creation).
pub const STORE_MARKER: &str = "isr-store";

/// Prefix of garbage collection's deletion notices (see [`crate::gc`]).
pub const GC_NOTICES: &str = "gc/deleting/";

/// `gc/deleting/<id>`: the chunk keys one gc run is about to delete.
pub fn gc_notice(id: &str) -> String {
    format!("gc/deleting/{id}")
}
/// Whether `key` names an immutable object: one whose key always holds the
/// same bytes, wherever and whenever it is read, so any HTTP cache or CDN may
/// keep it for ever (uploads mark it `Cache-Control: immutable`, and reads of
/// it may go to a store's read URL; see [`crate::store::open_tiered`]).
///
/// Only chunks are: a chunk's key is the tag of its stored bytes. Nothing
/// under `parcels/` is, not even a version's manifest (create-only, but
/// deleting a parcel and importing one of the same name writes other bytes
/// under the same version keys); locks, hints, keyslots and parcel records
/// change in place; gc notices come and go.
pub fn is_immutable(key: &str) -> bool {
    key.starts_with(CHUNKS)
}

/// `chunks/<tt>/<tag-hex>`.
pub fn chunk(tag: &ChunkTag) -> String {
    let hex = tag.to_hex();
    format!("chunks/{}/{hex}", &hex[..2])
}
/// `parcels/<name>/parcel.toml`.
pub fn record(name: &str) -> String {
    format!("parcels/{name}/parcel.toml")
}
/// `parcels/<name>/keyslots/`.
pub fn keyslots(name: &str) -> String {
    format!("parcels/{name}/keyslots/")
}
/// `parcels/<name>/keyslots/<n>`.
pub fn keyslot(name: &str, number: u32) -> String {
    format!("parcels/{name}/keyslots/{number}")
}
/// `parcels/<name>/versions/`.
pub fn versions(name: &str) -> String {
    format!("parcels/{name}/versions/")
}
/// `parcels/<name>/versions/<0000000042>.manifest`.
pub fn manifest(name: &str, version: u64) -> String {
    format!("parcels/{name}/versions/{version:010}.manifest")
}
/// `parcels/<name>/versions/<0000000042>.trace`: the access order of the
/// session that committed the version (optional).
pub fn trace(name: &str, version: u64) -> String {
    format!("parcels/{name}/versions/{version:010}.trace")
}
/// `parcels/<name>/versions/<0000000042>.wset`: lazy memory's working set
/// (the RAM chunks of the version its guest touched first after its last
/// resume, in that order; optional). Sealed like a trace.
pub fn working_set(name: &str, version: u64) -> String {
    format!("parcels/{name}/versions/{version:010}.wset")
}
/// `parcels/<name>/versions/oldest`: the oldest version garbage collection
/// kept, as decimal text (a hint for stores that cannot list).
pub fn oldest_hint(name: &str) -> String {
    format!("parcels/{name}/versions/oldest")
}
/// `parcels/<name>/lock`.
pub fn lock(name: &str) -> String {
    format!("parcels/{name}/lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_chunks_are_immutable() {
        let tag = ChunkTag([7; 32]);
        assert!(is_immutable(&chunk(&tag)));
        for mutable in [
            record("p"),
            keyslot("p", 0),
            manifest("p", 1),
            trace("p", 1),
            working_set("p", 1),
            oldest_hint("p"),
            lock("p"),
            gc_notice("x"),
            STORE_MARKER.to_owned(),
        ] {
            assert!(!is_immutable(&mutable), "{mutable}");
        }
    }
}
