//! Chunk codec micro-benchmarks: encode and decode one 128 KiB chunk of random,
//! text-like and all-zero data. Throughput is reported per plaintext byte; compare
//! encode against `blake3` alone (the floor: every byte is hashed at least twice).
//! `decode` is a download's full check; `decrypt_cached` a warm read's.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use isr::chunk::{self, ChunkEncoder, ChunkRef, DEFAULT_CHUNK_SIZE, EncodedChunk};
use isr::keys::DedupSecret;

fn inputs() -> Vec<(&'static str, Vec<u8>)> {
    let size = DEFAULT_CHUNK_SIZE as usize;
    let mut random = vec![0u8; size];
    blake3::Hasher::new()
        .update(b"bench")
        .finalize_xof()
        .fill(&mut random);
    let text: Vec<u8> = (0..)
        .flat_map(|n: u32| {
            format!("{n}: the quick brown fox jumps over the lazy dog\n").into_bytes()
        })
        .take(size)
        .collect();
    vec![
        ("random", random),
        ("text", text),
        ("zero", vec![0u8; size]),
    ]
}

fn codec(c: &mut Criterion) {
    let secret = DedupSecret::from_bytes([7; 32]);
    let mut group = c.benchmark_group("chunk");
    group.throughput(Throughput::Bytes(u64::from(DEFAULT_CHUNK_SIZE)));
    for (name, data) in inputs() {
        let mut encoder = ChunkEncoder::new(secret.clone(), chunk::DEFAULT_ZSTD_LEVEL).unwrap();
        group.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| encoder.encode(black_box(&data)))
        });
        if let EncodedChunk::Stored {
            chunk: ChunkRef::Stored { tag, key, .. },
            stored,
        } = encoder.encode(&data)
        {
            group.bench_function(format!("decode/{name}"), |b| {
                b.iter(|| {
                    let bytes = bytes::Bytes::from(black_box(&stored).clone());
                    chunk::decode(&secret, tag, &key, bytes).unwrap()
                })
            });
            // A warm read of a cached chunk: decryption only, in its own buffer
            // (the copy stands for the read of the cache file).
            group.bench_function(format!("decrypt_cached/{name}"), |b| {
                b.iter(|| {
                    let bytes = bytes::Bytes::from(black_box(&stored).clone());
                    chunk::decrypt_cached(tag, &key, bytes).unwrap()
                })
            });
        }
    }
    let (_, random) = &inputs()[0];
    group.bench_function("baseline/blake3", |b| {
        b.iter(|| blake3::hash(black_box(random)))
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
