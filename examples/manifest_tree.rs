//! Manifest bytes of a big image, format 1 (whole) vs format 2 (root and
//! segments): what each version stores and what a small checkin uploads.
//! Prints benchmark rows (benches/lib.sh's format) for benches/harness.sh's
//! `manifest` section.
//!
//!   cargo run --release --example manifest_tree [IMAGE_GIB] [CHUNK_KIB]
//!
//! The image has every chunk written (distinct chunks: the largest manifest
//! an image of that size can have). A checkin changes 1 % of its chunks,
//! either in R contiguous regions (R = 1, 16, 256) or scattered at random;
//! the tree's upload is its root plus the segments whose bytes changed. The
//! issue's goal for it: at most 2 × (1 % of the whole manifest) plus one
//! segment per changed region.

use std::collections::HashSet;

use isr::chunk::{ChunkEncoder, ChunkKey, ChunkRef, ChunkTag};
use isr::keys::{DedupSecret, ParcelKey};
use isr::manifest::tree;
use isr::manifest::{Entry, EntryKind, Manifest, Timestamp};

fn chunk(n: u64) -> ChunkRef {
    let hash = blake3::hash(&n.to_le_bytes());
    ChunkRef::Stored {
        tag: ChunkTag(*hash.as_bytes()),
        key: ChunkKey::from_bytes(*blake3::hash(hash.as_bytes()).as_bytes()),
        stored_len: 100_000,
    }
}

fn image(chunks: Vec<ChunkRef>, chunk_size: u32, version: u64) -> Manifest {
    Manifest {
        version,
        parent: version.checked_sub(1).filter(|&p| p > 0),
        created: Timestamp::now(),
        lock_nonce: None,
        host: "bench".into(),
        message: String::new(),
        chunk_size,
        entries: vec![Entry {
            path: "disk.img".into(),
            mode: 0o600,
            mtime: Timestamp::default(),
            kind: EntryKind::File {
                size: chunks.len() as u64 * u64::from(chunk_size),
                chunks,
            },
        }],
    }
}

fn row(figure: &str, value: f64, unit: &str, baseline: &str, base: f64, target: &str) {
    println!(
        "ROW\t{figure}\t{value:.3}\t{unit}\t{baseline}\t{base:.3}\t{:.3}\t{target}",
        value / base
    );
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: IMAGE_GIB CHUNK_KIB"))
        .collect();
    let gib = args.first().copied().unwrap_or(100);
    let chunk_size = (args.get(1).copied().unwrap_or(128) * 1024) as u32;
    let count = gib * (1 << 30) / u64::from(chunk_size);
    let key = ParcelKey::from_bytes([7; 32]);
    let mut encoder = ChunkEncoder::new(DedupSecret::from_bytes([9; 32]), 3).unwrap();
    let mb = |bytes: usize| bytes as f64 / 1e6;

    let base: Vec<ChunkRef> = (0..count).map(chunk).collect();
    let v1 = image(base.clone(), chunk_size, 1);
    let whole = v1.seal(&key, &[1; 16]).unwrap().len();
    let split = tree::split(&v1, tree::SEGMENT_CHUNKS, &mut encoder).unwrap();
    let root = split.root.seal(&key, &[1; 16]).unwrap().len();
    let segments: usize = split.encoded.iter().map(|(_, b)| b.len()).sum();
    let segment_len = segments / split.encoded.len();
    eprintln!(
        "{gib} GiB at {} KiB chunks: {count} chunks; whole manifest {:.1} MB; root {:.3} MB + {} segments of {:.3} MB",
        chunk_size / 1024,
        mb(whole),
        mb(root),
        split.encoded.len(),
        mb(segment_len)
    );
    row(
        &format!("manifest stored by the first version of a {gib} GiB image, MB"),
        mb(root + segments),
        "MB",
        "format 1 (whole)",
        mb(whole),
        "",
    );

    let changed = (count / 100) as usize;
    let old: HashSet<ChunkTag> = split.encoded.iter().filter_map(|(r, _)| r.tag()).collect();
    let cases: Vec<(String, usize, Vec<u64>)> = [1usize, 16, 256]
        .into_iter()
        .map(|regions| {
            let per = changed / regions;
            let stride = count as usize / regions;
            let indexes = (0..regions)
                .flat_map(|r| (0..per).map(move |i| (r * stride + i) as u64))
                .collect();
            (format!("{regions} region(s)"), regions, indexes)
        })
        .chain(std::iter::once({
            let mut state = 0x9E37_79B9_7F4A_7C15u64;
            let indexes = (0..changed)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state % count
                })
                .collect();
            ("scattered chunks".to_owned(), changed, indexes)
        }))
        .collect();
    for (label, regions, indexes) in cases {
        let mut chunks = base.clone();
        for index in indexes {
            chunks[index as usize] = chunk(count + index);
        }
        let v2 = image(chunks, chunk_size, 2);
        let split2 = tree::split(&v2, tree::SEGMENT_CHUNKS, &mut encoder).unwrap();
        let root2 = split2.root.seal(&key, &[1; 16]).unwrap().len();
        let new: usize = split2
            .encoded
            .iter()
            .filter(|(r, _)| !r.tag().is_some_and(|t| old.contains(&t)))
            .map(|(_, b)| b.len())
            .sum();
        let upload = root2 + new;
        let goal = 2.0 * mb(whole) / 100.0 + regions as f64 * mb(segment_len);
        row(
            &format!("manifest uploaded by a 1 % checkin of {gib} GiB, {label}, MB"),
            mb(upload),
            "MB",
            "format 1 (whole)",
            mb(whole),
            "",
        );
        row(
            "the same against the goal 2 × 1 % of format 1 + a segment per region, MB",
            mb(upload),
            "MB",
            "goal",
            goal,
            "<= 1",
        );
    }
}
