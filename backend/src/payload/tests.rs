//! The store's layers over a local blob: verification, the stripe locks,
//! prefetch and recording.

use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use ociblk_digest::{ChunkHashes, Digest};
use ociblk_layout::Source;
use ociblk_registry::limiter::Priority;
use sha2::{Digest as _, Sha256};

use super::*;

const READ: Priority = Priority::Foreground;

/// A payload source over `data` in `dir`, chunks of `chunk` bytes, whose
/// blob digest is `digest`.
fn source(dir: &Path, data: &[u8], chunk: u64, digest: &Digest) -> Source {
    let path = dir.join("blob");
    let mut f = File::create(&path).expect("create blob");
    f.write_all(data).expect("write blob");
    let chunk_hashes = data
        .chunks(chunk as usize)
        .map(|c| Sha256::digest(c).into())
        .collect();
    let hashes = ChunkHashes::new(data.len() as u64, chunk, chunk_hashes).expect("ok");
    Source {
        name: "system".into(),
        path,
        size: data.len() as u64,
        digest: digest.clone(),
        chunk_hashes: Some(Arc::new(hashes)),
    }
}

/// A user file: no chunk hashes, served as it is.
fn user_file(dir: &Path) -> Source {
    let path = dir.join("params");
    std::fs::write(&path, b"params").expect("write");
    Source {
        name: "node-parameters".into(),
        path,
        size: 6,
        digest: Digest::of(b"params"),
        chunk_hashes: None,
    }
}

fn store(sources: &[Source], record: bool) -> Payloads {
    let options = PayloadOptions {
        verify: true,
        record,
    };
    Payloads::of_local_sources(Path::new("img"), sources, options).expect("open")
}

fn counts(p: &Payloads) -> VerificationCounts {
    p.verification_counts()[0].1
}

#[test]
fn bad_chunk_is_refused_until_fixed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let s = source(dir.path(), &data, 4096, &Digest::of(b"blob"));
    let v = store(std::slice::from_ref(&s), false);
    let mut bad = data.clone();
    bad[5000] ^= 1;
    std::fs::write(&s.path, &bad).expect("corrupt");
    v.ensure(0, 0..10, READ).expect("chunk 0 is fine");
    let err = v.ensure(0, 4095..4097, READ).expect_err("chunk 1 is bad");
    assert_eq!(err.chunk(), Some(1));
    assert!(matches!(err, PayloadError::Mismatch { .. }));
    assert!(
        err.to_string().contains("chunk 1 (bytes 4096..8192)"),
        "{err}"
    );
    assert!(v.is_verified(0, 0) && !v.is_verified(0, 1) && !v.is_verified(0, 2));
    v.ensure(0, 9000..10_000, READ)
        .expect("short last chunk is fine");
    std::fs::write(&s.path, &data).expect("fix");
    v.ensure(0, 4096..4097, READ).expect("fixed chunk verifies");
    assert_eq!(counts(&v).verified, 3);
}

#[test]
fn concurrent_first_reads_hash_each_chunk_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Chunks large enough that hashing one takes a while: without the
    // stripe locks, threads would hash the same chunk side by side.
    const CHUNK: u64 = 256 << 10;
    let data: Vec<u8> = (0..10 * CHUNK as u32).map(|i| (i % 251) as u8).collect();
    let s = source(dir.path(), &data, CHUNK, &Digest::of(b"blob"));
    let v = store(&[s], false);
    let start = std::sync::Barrier::new(8);
    std::thread::scope(|scope| {
        for t in 0..8u64 {
            let (v, start) = (&v, &start);
            scope.spawn(move || {
                start.wait();
                // Every thread reads every chunk, in different orders.
                for i in 0..10u64 {
                    let c = (i + t) % 10;
                    v.ensure(0, c * CHUNK..c * CHUNK + 1, READ)
                        .expect("good chunk");
                }
            });
        }
    });
    assert_eq!(counts(&v).verified, 10);
    assert_eq!(counts(&v).hashed, 10, "each chunk hashed once");
}

#[test]
fn prefetch_verifies_ahead_and_only_guest_reads_are_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 3) as u8).collect();
    let blob = Digest::of(b"blob");
    let sources = [
        user_file(dir.path()),
        source(dir.path(), &data, 4096, &blob),
    ];
    let v = store(&sources, true);
    let recorder = v.recorder().expect("recording").clone();
    assert_eq!(v.prefetch(1, 2).expect("good"), Prefetched::Present);
    assert!(v.is_verified(1, 2) && counts(&v).hashed == 1);
    assert!(recorder.is_empty(), "a prefetch is not a guest read");
    // Guest reads: chunk 2 costs no second hash; each chunk recorded
    // once, in the order first read.
    v.ensure(1, 2 * 4096..2 * 4096 + 10, READ).expect("read");
    v.ensure(1, 0..4097, READ).expect("read");
    v.ensure(1, 8191..8193, READ).expect("read");
    assert_eq!(counts(&v).hashed, 3);
    let order: Vec<u64> = recorder
        .record(Digest::of(b"manifest"))
        .chunks
        .iter()
        .map(|c| {
            assert_eq!(c.chunk.blob, blob);
            c.chunk.index
        })
        .collect();
    assert_eq!(order, [2, 0, 1]);
    // Past the end: nothing to do, nothing recorded.
    assert_eq!(v.prefetch(1, 3).expect("past the end"), Prefetched::Present);
    // The user file is served as it is, and never recorded.
    let mut buf = [0u8; 6];
    let servable = v.ensure(0, 0..6, READ).expect("user file");
    servable
        .read_into(&ociblk_io::iobuf::IoBufs::from_slice(&mut buf), 0)
        .expect("read");
    assert_eq!(&buf, b"params");
    assert_eq!(recorder.len(), 3);
}

#[test]
fn truncated_blob_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = vec![7u8; 10_000];
    let s = source(dir.path(), &data, 4096, &Digest::of(b"blob"));
    let v = store(std::slice::from_ref(&s), false);
    File::options()
        .write(true)
        .open(&s.path)
        .and_then(|w| w.set_len(6000))
        .expect("truncate");
    let err = v.ensure(0, 8192..8202, READ).expect_err("truncated");
    assert!(matches!(err, PayloadError::Truncated { chunk: 2, .. }));
    assert!(err.to_string().contains("ends at byte 8192"), "{err}");
}

#[test]
fn without_verification_bytes_are_served_unhashed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = vec![7u8; 10_000];
    let s = source(dir.path(), &data, 4096, &Digest::of(b"blob"));
    std::fs::write(&s.path, vec![8u8; 10_000]).expect("corrupt");
    let options = PayloadOptions {
        verify: false,
        record: false,
    };
    let v = Payloads::of_local_sources(Path::new("img"), &[s], options).expect("open");
    v.ensure(0, 0..10_000, READ)
        .expect("--no-verify serves what the file holds");
    assert!(!v.verifies() && v.verification_counts().is_empty());
}
