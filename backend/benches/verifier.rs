//! Payload verification on the read path, without the vhost-user round
//! trip: a chunk's first touch (read and hash 1 MiB from the page cache)
//! and the check a read of a verified chunk pays.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::hint::black_box;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ociblk::payload::{PayloadOptions, Payloads, check_chunk};
use ociblk_digest::{ChunkHashes, Digest as BlobDigest};
use ociblk_layout::Source;
use ociblk_registry::limiter::Priority;
use sha2::{Digest as _, Sha256};

const CHUNK: u64 = 1 << 20;
const CHUNKS: u64 = 64;

fn verifier(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("blob");
    let data: Vec<u8> = (0..CHUNK * CHUNKS).map(|i| (i * 31 % 251) as u8).collect();
    File::create(&path).unwrap().write_all(&data).unwrap();
    let chunk_hashes = data
        .chunks(CHUNK as usize)
        .map(|c| Sha256::digest(c).into())
        .collect();
    let hashes = ChunkHashes::new(data.len() as u64, CHUNK, chunk_hashes).unwrap();
    let source = Source {
        name: "system".into(),
        path: path.clone(),
        size: data.len() as u64,
        digest: BlobDigest::of(b"bench"),
        chunk_hashes: Some(Arc::new(hashes.clone())),
    };
    let file = File::open(&path).unwrap();
    let options = PayloadOptions {
        verify: true,
        record: false,
    };
    let v = Payloads::of_local_sources(Path::new("image"), &[source], options).unwrap();

    let mut group = c.benchmark_group("verify");
    group.throughput(Throughput::Bytes(CHUNK));
    // What a first read of a chunk adds: read it whole and hash it.
    let mut next = 0;
    group.bench_function("first_touch_1MiB_chunk", |b| {
        b.iter(|| {
            next = (next + 1) % CHUNKS;
            check_chunk("system", &path, &file, &hashes, black_box(next)).unwrap()
        })
    });
    group.finish();

    let read = |range: std::ops::Range<u64>| v.ensure(0, range, Priority::Foreground).map(|_| ());
    read(0..CHUNK * CHUNKS).unwrap();
    let mut group = c.benchmark_group("verified");
    // What every later read pays: an atomic load per chunk it touches.
    group.bench_function("read_4KiB", |b| {
        b.iter(|| read(black_box(5 * CHUNK + 8192)..5 * CHUNK + 8192 + 4096).unwrap())
    });
    group.bench_function("read_1MiB_across_2_chunks", |b| {
        b.iter(|| read(black_box(5 * CHUNK + 4096)..6 * CHUNK + 4096).unwrap())
    });
    group.finish();
}

criterion_group!(benches, verifier);
criterion_main!(benches);
