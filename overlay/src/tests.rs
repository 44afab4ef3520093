use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use ociblk_client::rng::Rng;

use super::format::{CLEAN_OFFSET, HEADER_SIZE};
use super::*;

mod chain;
mod compat;

/// The generator of the tests and the bench, seeds spread.
fn rng(seed: u64) -> Rng {
    Rng::for_stream(seed, 0)
}

/// A non-zero, position-dependent base disk.
fn base_byte(p: u64) -> u8 {
    let x = (p ^ (p >> 9)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((x >> 56) as u8) | 1
}

fn base(offset: u64, buf: &mut [u8]) -> io::Result<()> {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = base_byte(offset + i as u64);
    }
    Ok(())
}

fn fp(n: u8) -> [u8; 32] {
    let mut f = [0u8; 32];
    f[0] = 0xab;
    f[31] = n;
    f
}

fn cfg(disk_size: u64, n: u8, flush: FlushMode) -> OverlayConfig {
    OverlayConfig {
        disk_size,
        fingerprint: fp(n),
        flush,
    }
}

/// Splits `buf` into up to three pieces, so that I/O crosses iovecs.
fn scatter<'a>(buf: &'a mut [u8], rng: &mut Rng) -> IoBufs<'a> {
    let len = buf.len();
    let a = rng.below(len as u64 + 1) as usize;
    let b = a + rng.below((len - a) as u64 + 1) as usize;
    let p = buf.as_mut_ptr();
    // SAFETY: the three ranges partition `buf`, which stays mutably
    // borrowed for 'a.
    unsafe { IoBufs::from_raw([(p, a), (p.add(a), b - a), (p.add(b), len - b)]) }
}

/// Reads like the server: base for `Base`, data area for `Data`, zeros.
fn read(ov: &Overlay, offset: u64, len: u64, rng: &mut Rng) -> Vec<u8> {
    let mut out = vec![0xeeu8; len as usize];
    let mut dst = vec![0u8; len as usize];
    let bufs = scatter(&mut dst, rng);
    for run in ov.runs(offset, len) {
        let at = (run.offset - offset) as usize;
        match run.state {
            BlockState::Base => base(run.offset, &mut out[at..at + run.len as usize]).unwrap(),
            BlockState::Zero => out[at..at + run.len as usize].fill(0),
            BlockState::Data => {
                ov.read_data(run.offset, &bufs, at, run.len as usize)
                    .unwrap();
                bufs.copy_to(at, &mut out[at..at + run.len as usize]);
            }
        }
    }
    drop(bufs);
    out
}

/// Writes `data` at `offset` through a scattered list with a prefix.
fn write(ov: &Overlay, offset: u64, data: &[u8], rng: &mut Rng) -> io::Result<()> {
    write_over(ov, offset, data, rng, &base)
}

fn write_over(
    ov: &Overlay,
    offset: u64,
    data: &[u8],
    rng: &mut Rng,
    base: BaseReader<'_>,
) -> io::Result<()> {
    let pre = rng.below(700) as usize;
    let mut src = vec![0x5au8; pre + data.len() + 3];
    src[pre..pre + data.len()].copy_from_slice(data);
    let bufs = scatter(&mut src, rng);
    ov.write(offset, &bufs, pre, data.len(), base)
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A random range: whole blocks, 512-byte sectors, or odd bytes.
fn range(rng: &mut Rng, size: u64) -> (u64, u64) {
    let (off, len) = match rng.below(3) {
        0 => (rng.below(size / BS + 1) * BS, (1 + rng.below(8)) * BS),
        1 => (rng.below(size / 512) * 512, (1 + rng.below(20)) * 512),
        _ => (rng.below(size), 1 + rng.below(10_000)),
    };
    let off = off.min(size - 1);
    (off, len.min(size - off))
}

fn check(ov: &Overlay, model: &[u8], off: u64, len: u64, rng: &mut Rng, what: &str) {
    let got = read(ov, off, len, rng);
    let want = &model[off as usize..(off + len) as usize];
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!(
            "{what}: byte {} differs: got {} want {}",
            off + i as u64,
            got[i],
            want[i]
        );
    }
}

/// How `random_op` ended the overlay before opening it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reopen {
    /// `Overlay::close`.
    AfterClose,
    /// A plain drop.
    AfterDrop,
}

/// One random guest operation on `ov` over `off..off + len` (a write,
/// write-zeroes, discard, flush, or a close or drop followed by `reopen`),
/// mirrored in `model`. Returns the overlay to go on with.
fn random_op(
    mut ov: Overlay,
    model: &mut [u8],
    off: u64,
    len: u64,
    rng: &mut Rng,
    reopen: impl FnOnce(Reopen) -> Overlay,
) -> Overlay {
    let span = off as usize..(off + len) as usize;
    match rng.below(12) {
        0..=4 => {
            let data = rng.bytes(len as usize);
            write(&ov, off, &data, rng).unwrap();
            model[span].copy_from_slice(&data);
        }
        5 | 6 => {
            ov.write_zeroes(off, len, &base).unwrap();
            model[span].fill(0);
        }
        7 | 8 => {
            ov.discard(off, len, &base).unwrap();
            model[span].fill(0);
        }
        9 => ov.flush().unwrap(),
        10 => {
            ov.close().unwrap();
            ov = reopen(Reopen::AfterClose);
        }
        _ => {
            drop(ov);
            ov = reopen(Reopen::AfterDrop);
        }
    }
    ov
}

/// Every single bit flip of the encoded header `bytes` fails to parse,
/// except the clean flag's own bit, the map checksum's "recorded" bit and
/// an overlay's live map flag.
fn assert_header_bit_flips_caught(bytes: &[u8]) {
    for byte in 0..HEADER_SIZE {
        for bit in 0..8 {
            let mut b = bytes.to_vec();
            b[byte] ^= 1 << bit;
            let r = parse_header(&b);
            // The live map flag is one too, for an overlay (never a layer).
            let overlay = parse_header(bytes).is_ok_and(|h| h.layer().is_none());
            let live_flag = byte == format::LIVE_FLAG_OFFSET && overlay;
            if (byte == CLEAN_OFFSET || byte == format::MAP_CRC_FIELD_OFFSET || live_flag)
                && bit == 0
            {
                assert!(r.is_ok());
            } else {
                assert!(r.is_err(), "flip {byte}.{bit} accepted");
            }
        }
    }
}

fn model_run(seed: u64, mode: FlushMode) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    // Not a multiple of 4096: the last block is partial.
    let size = (1 << 20) + 3 * 512;
    let mut rng = rng(seed);
    let mut model: Vec<u8> = (0..size).map(base_byte).collect();
    let mut ov = Overlay::open(&path, cfg(size, 1, mode)).unwrap();
    for step in 0..600 {
        let (off, len) = range(&mut rng, size);
        let what = format!("seed {seed} step {step}");
        // After a close or a drop alike (a drop flushes too), the overlay
        // opens again as it was.
        ov = random_op(ov, &mut model, off, len, &mut rng, |_| {
            Overlay::open(&path, cfg(size, 1, mode)).unwrap()
        });
        check(&ov, &model, off, len, &mut rng, &what);
        let (off, len) = range(&mut rng, size);
        check(&ov, &model, off, len, &mut rng, &what);
        if step % 100 == 99 {
            check(&ov, &model, 0, size, &mut rng, &what);
        }
    }
    ov.flush().unwrap();
    ov.close().unwrap();
    let ov = Overlay::open(&path, cfg(size, 1, mode)).unwrap();
    check(&ov, &model, 0, size, &mut rng, "after reopen");
    drop(ov);

    match Overlay::open(&path, cfg(size, 2, mode)) {
        Err(OverlayError::Mismatch { what, .. }) => assert!(what.contains("fingerprint")),
        r => panic!("expected a fingerprint mismatch, got {r:?}"),
    }
    match Overlay::open(&path, cfg(size + 512, 1, mode)) {
        Err(e @ OverlayError::Mismatch { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("size") && msg.contains("ociblk overlay reset"),
                "{msg}"
            );
        }
        r => panic!("expected a size mismatch, got {r:?}"),
    }
    // The failed opens changed nothing.
    let ov = Overlay::open(&path, cfg(size, 1, mode)).unwrap();
    check(&ov, &model, 0, size, &mut rng, "after mismatches");
}

#[test]
fn model_safe() {
    for seed in 1..=3 {
        model_run(seed, FlushMode::Safe);
    }
}

#[test]
fn model_unsafe() {
    for seed in 11..=13 {
        model_run(seed, FlushMode::Unsafe);
    }
}

#[test]
fn runs_split_and_clip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let size = 10 * BS + 512;
    let ov = Overlay::open(&path, cfg(size, 1, FlushMode::Safe)).unwrap();
    let mut rng = rng(5);
    write(&ov, BS, &[7u8; BS as usize], &mut rng).unwrap();
    write(&ov, 2 * BS, &[7u8; BS as usize], &mut rng).unwrap();
    ov.write_zeroes(3 * BS, BS, &base).unwrap();
    let runs: Vec<_> = ov.runs(100, 4 * BS).collect();
    let run = |offset, len, state| Run { offset, len, state };
    assert_eq!(
        runs,
        [
            run(100, BS - 100, BlockState::Base),
            run(BS, 2 * BS, BlockState::Data),
            run(3 * BS, BS, BlockState::Zero),
            run(4 * BS, 100, BlockState::Base),
        ]
    );
    // Clipped to the disk; the partial last block is one run.
    let runs: Vec<_> = ov.runs(size - 1000, 1 << 20).collect();
    assert_eq!(runs, [run(size - 1000, 1000, BlockState::Base)]);
    assert_eq!(ov.runs(size, 10).count(), 0);
    assert_eq!(ov.runs(u64::MAX, u64::MAX).count(), 0);
    // Out-of-range requests are errors, not panics.
    let mut buf = [0u8; 1024];
    let bufs = IoBufs::from_slice(&mut buf);
    let kind = |r: io::Result<()>| r.unwrap_err().kind();
    assert_eq!(
        kind(ov.read_data(size - 512, &bufs, 0, 1024)),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(ov.write(size, &bufs, 0, 1, &base)),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(ov.write(0, &bufs, 1000, 25, &base)),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(ov.write_zeroes(u64::MAX, 2, &base)),
        io::ErrorKind::InvalidInput
    );
    // Whole disk, including the partial last block.
    let data = rng.bytes(size as usize);
    write(&ov, 0, &data, &mut rng).unwrap();
    assert_eq!(read(&ov, 0, size, &mut rng), data);
    assert!(ov.runs(0, size).all(|r| r.state == BlockState::Data));
}

#[test]
fn zeroes_hide_base() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let ov = Overlay::open(&path, cfg(1 << 20, 1, FlushMode::Safe)).unwrap();
    let mut rng = rng(1);
    assert!(read(&ov, 0, BS, &mut rng).iter().all(|&b| b != 0));
    ov.write_zeroes(0, BS, &base).unwrap();
    ov.discard(2 * BS, 2 * BS, &base).unwrap();
    // A partial zeroing of a Base block keeps the rest of the base.
    ov.write_zeroes(5 * BS + 512, 1024, &base).unwrap();
    ov.close().unwrap();
    let ov = Overlay::open(&path, cfg(1 << 20, 1, FlushMode::Safe)).unwrap();
    assert!(read(&ov, 0, BS, &mut rng).iter().all(|&b| b == 0));
    assert!(read(&ov, 2 * BS, 2 * BS, &mut rng).iter().all(|&b| b == 0));
    let b5 = read(&ov, 5 * BS, BS, &mut rng);
    assert!(b5[512..1536].iter().all(|&b| b == 0));
    let mut want = vec![0u8; 512];
    base(5 * BS, &mut want).unwrap();
    assert_eq!(b5[..512], want);
    assert_eq!(read(&ov, BS, BS, &mut rng)[0], base_byte(BS));
}

#[test]
fn zeroing_frees_space() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let mib = 1u64 << 20;
    let ov = Overlay::open(&path, cfg(64 * mib, 1, FlushMode::Safe)).unwrap();
    let mut rng = rng(9);
    write(&ov, 0, &rng.bytes(4 * mib as usize), &mut rng).unwrap();
    ov.flush().unwrap();
    let written = allocated(&path);
    assert!(written >= 4 * mib, "{written}");
    // Zeroing and discarding Base blocks (map page 0, already allocated)
    // allocates nothing.
    ov.write_zeroes(8 * mib, 4 * mib, &base).unwrap();
    ov.discard(12 * mib, 2 * mib, &base).unwrap();
    ov.flush().unwrap();
    assert!(
        allocated(&path) <= written,
        "{} > {written}",
        allocated(&path)
    );
    // Zeroing written data gives its space back.
    ov.write_zeroes(0, 2 * mib, &base).unwrap();
    ov.discard(2 * mib, 2 * mib, &base).unwrap();
    ov.flush().unwrap();
    let after = allocated(&path);
    assert!(after + 4 * mib <= written, "{after} vs {written}");
    // Zeroing a sector of a Zero block stays free.
    ov.write_zeroes(512, 512, &base).unwrap();
    ov.flush().unwrap();
    assert_eq!(allocated(&path), after);
    assert!(read(&ov, 0, 4 * mib, &mut rng).iter().all(|&b| b == 0));
}

#[test]
fn locked_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let c = cfg(1 << 20, 1, FlushMode::Unsafe);
    let ov = Overlay::open(&path, c.clone()).unwrap();
    match Overlay::open(&path, c.clone()) {
        Err(e @ OverlayError::Locked { .. }) => {
            assert!(e.to_string().contains("in use by another process"))
        }
        r => panic!("expected Locked, got {r:?}"),
    }
    assert!(matches!(
        Overlay::reset(&path),
        Err(OverlayError::Locked { .. })
    ));
    // info needs no lock.
    assert!(!Overlay::info(&path).unwrap().clean);
    drop(ov);
    Overlay::open(&path, c).unwrap();
}

#[test]
fn info_and_reset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let size = 64 << 20;
    let ov = Overlay::open(&path, cfg(size, 7, FlushMode::Safe)).unwrap();
    let mut rng = rng(3);
    write(&ov, 0, &rng.bytes(3 * BS as usize), &mut rng).unwrap();
    write(&ov, 100 * BS + 1, &[1, 2, 3], &mut rng).unwrap();
    ov.write_zeroes(10 * BS, 2 * BS, &base).unwrap();
    // Nothing flushed yet: the map on disk is empty.
    assert_eq!(Overlay::info(&path).unwrap().written, 0);
    ov.flush().unwrap();
    let info = Overlay::info(&path).unwrap();
    assert_eq!(info.disk_size, size);
    assert_eq!(info.fingerprint, fp(7));
    assert_eq!(info.fingerprint_hex().len(), 64);
    assert!(info.fingerprint_hex().starts_with("ab00"));
    assert_eq!(info.block_size, 4096);
    assert_eq!(info.blocks, size / BS);
    assert_eq!((info.written, info.zeroed), (4, 2));
    assert!(!info.clean);
    assert!(info.allocated_bytes >= 4 * BS);
    assert!(info.file_size > size);
    ov.close().unwrap();
    assert!(Overlay::info(&path).unwrap().clean);

    Overlay::reset(&path).unwrap();
    let info = Overlay::info(&path).unwrap();
    assert_eq!((info.written, info.zeroed), (0, 0));
    assert!(info.clean);
    assert!(info.allocated_bytes <= 2 * BS, "{}", info.allocated_bytes);
    let ov = Overlay::open(&path, cfg(size, 7, FlushMode::Safe)).unwrap();
    assert!(ov.runs(0, size).all(|r| r.state == BlockState::Base));
    drop(ov);
    // A reset overlay holds nothing, so another disk may take it.
    let ov = Overlay::open(&path, cfg(size / 2, 8, FlushMode::Safe)).unwrap();
    assert_eq!(ov.disk_size(), size / 2);
    drop(ov);
    assert_eq!(Overlay::info(&path).unwrap().fingerprint, fp(8));
}

#[test]
fn concurrent_sector_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let size = 2 << 20;
    let ov = Arc::new(Overlay::open(&path, cfg(size, 1, FlushMode::Unsafe)).unwrap());
    const THREADS: u64 = 4;
    const WRITES: u64 = 200;
    // Write i goes to sector t of block i % BLOCKS: the first round hits
    // fresh blocks, so all threads read-modify-write the same Base block at
    // once (the barrier lines them up); later rounds overwrite in place.
    const BLOCKS: u64 = 100;
    let pattern = |t: u64, i: u64| [(t * 50 + i % 50) as u8 + 1; 512];
    let barrier = Arc::new(std::sync::Barrier::new(THREADS as usize));
    let mut writers = Vec::new();
    for t in 0..THREADS {
        let (ov, barrier) = (Arc::clone(&ov), Arc::clone(&barrier));
        writers.push(std::thread::spawn(move || {
            let mut rng = rng(100 + t);
            for i in 0..WRITES {
                if i < BLOCKS {
                    barrier.wait();
                }
                let off = (i % BLOCKS) * BS + t * 512;
                write_over(&ov, off, &pattern(t, i), &mut rng, &slow_base).unwrap();
            }
        }));
    }
    // Whole-block writes and zeroing in the same stripes, and lock-free
    // readers, run alongside.
    let stop = Arc::new(AtomicBool::new(false));
    let mut others = Vec::new();
    for t in 0..2u64 {
        let (ov, stop) = (Arc::clone(&ov), Arc::clone(&stop));
        others.push(std::thread::spawn(move || {
            let mut rng = rng(200 + t);
            while !stop.load(Ordering::Relaxed) {
                let b = 256 + rng.below(256);
                if t == 0 {
                    write(&ov, b * BS, &[9u8; BS as usize], &mut rng).unwrap();
                    ov.write_zeroes(b * BS, BS, &base).unwrap();
                } else {
                    let _ = read(&ov, 0, BLOCKS * BS, &mut rng);
                }
            }
        }));
    }
    for h in writers {
        h.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for h in others {
        h.join().unwrap();
    }
    let mut rng = rng(0);
    let got = read(&ov, 0, BLOCKS * BS, &mut rng);
    for b in 0..BLOCKS {
        let last = (0..WRITES).rev().find(|i| i % BLOCKS == b).unwrap();
        for s in 0..8 {
            let at = (b * BS + s * 512) as usize;
            let want = if s < THREADS {
                pattern(s, last).to_vec()
            } else {
                let mut v = vec![0u8; 512];
                base(at as u64, &mut v).unwrap();
                v
            };
            assert_eq!(got[at..at + 512], want, "block {b} sector {s}");
        }
    }
}

/// Slow enough that a racing writer lands inside a read-modify-write.
fn slow_base(offset: u64, buf: &mut [u8]) -> io::Result<()> {
    std::thread::sleep(std::time::Duration::from_micros(200));
    base(offset, buf)
}

#[test]
fn whole_block_write_races_partial_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let ov = Arc::new(Overlay::open(&path, cfg(1 << 20, 1, FlushMode::Unsafe)).unwrap());
    const BLOCKS: u64 = 100;
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let (ov, barrier) = (Arc::clone(&ov), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let mut rng = rng(300 + t);
                for b in 0..BLOCKS {
                    barrier.wait();
                    if t == 0 {
                        write(&ov, b * BS, &[7u8; BS as usize], &mut rng).unwrap();
                    } else {
                        write_over(&ov, b * BS, &[8u8; 512], &mut rng, &slow_base).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in threads {
        h.join().unwrap();
    }
    // Sector 0 may hold either write; the rest only the whole-block one,
    // never base bytes written back by a stale read-modify-write.
    let got = read(&ov, 0, BLOCKS * BS, &mut rng(0));
    for b in 0..BLOCKS as usize {
        let block = &got[b * BS as usize..(b + 1) * BS as usize];
        assert!(
            block[..512] == [7; 512] || block[..512] == [8; 512],
            "block {b}"
        );
        assert!(block[512..].iter().all(|&x| x == 7), "block {b}");
    }
}

#[test]
fn overlay_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Overlay>();
}

/// Simulates `kill -9`: the process ends without closing, the page cache
/// keeps what was written.
fn crash(mut ov: Overlay) {
    ov.closed = true;
    drop(ov);
}

#[test]
fn crash_keeps_flushed_writes_and_a_process_crash_keeps_completed_ones() {
    for mode in [FlushMode::Safe, FlushMode::Unsafe] {
        for host_crash in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ov");
            let size = 8 << 20;
            let mut rng = rng(4);
            let ov = Overlay::open(&path, cfg(size, 1, mode)).unwrap();
            let flushed = rng.bytes(3 * BS as usize + 700);
            write(&ov, 512, &flushed, &mut rng).unwrap();
            ov.write_zeroes(20 * BS, 2 * BS, &base).unwrap();
            ov.flush().unwrap();
            // Completed, not flushed: the live map holds it.
            let unflushed = rng.bytes(1 << 20);
            write(&ov, 1 << 20, &unflushed, &mut rng).unwrap();
            ov.write_zeroes(512, 512, &base).unwrap();
            crash(ov);
            if host_crash {
                live::tests::simulate_reboot();
            }

            let what = format!("{mode:?}, host crash {host_crash}");
            let ov = Overlay::open(&path, cfg(size, 1, mode)).unwrap();
            assert!(read(&ov, 20 * BS, 2 * BS, &mut rng).iter().all(|&b| b == 0));
            let mut base_bytes = vec![0u8; 1 << 20];
            base(1 << 20, &mut base_bytes).unwrap();
            let mut zeroed = flushed.clone();
            zeroed[..512].fill(0);
            if host_crash {
                // The page cache here kept everything, yet the map of the
                // last flush is what counts: as of the flush, or as written
                // for a block that was `Data` then (rewritten in place).
                let got = read(&ov, 512, flushed.len() as u64, &mut rng);
                assert!(got == flushed || got == zeroed, "{what}");
                assert_eq!(read(&ov, 1 << 20, 1 << 20, &mut rng), base_bytes, "{what}");
                // The blocks no flushed entry claims were reclaimed on open.
                let at = ov.header.data_offset + (1 << 20);
                let next = sys::next_data(ov.file.as_fd(), at).unwrap();
                assert!(
                    next.is_none_or(|(s, _)| s >= at + (1 << 20)),
                    "{what}: {next:?}"
                );
            } else {
                assert_eq!(
                    read(&ov, 512, flushed.len() as u64, &mut rng),
                    zeroed,
                    "{what}"
                );
                assert_eq!(read(&ov, 1 << 20, 1 << 20, &mut rng), unflushed, "{what}");
            }
            // The next server's flush makes them durable: a host crash now
            // keeps them.
            ov.flush().unwrap();
            crash(ov);
            live::tests::simulate_reboot();
            let ov = Overlay::open(&path, cfg(size, 1, mode)).unwrap();
            if !host_crash {
                assert_eq!(read(&ov, 1 << 20, 1 << 20, &mut rng), unflushed, "{what}");
                assert_eq!(
                    read(&ov, 512, flushed.len() as u64, &mut rng),
                    zeroed,
                    "{what}"
                );
            }
            ov.close().unwrap();
        }
    }
}

#[test]
fn failed_writes_keep_state() {
    // Real ENOSPC needs a small filesystem (a tmpfs mount); here writes fail
    // because the overlay's descriptor is swapped for a read-only one.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let size = 1 << 20;
    let mut rng = rng(6);
    let ov = Overlay::open(&path, cfg(size, 1, FlushMode::Safe)).unwrap();
    let mut model: Vec<u8> = (0..size).map(base_byte).collect();
    let data = rng.bytes(2 * BS as usize);
    write(&ov, 4 * BS, &data, &mut rng).unwrap();
    model[4 * BS as usize..6 * BS as usize].copy_from_slice(&data);
    ov.write_zeroes(8 * BS, BS, &base).unwrap();
    model[8 * BS as usize..9 * BS as usize].fill(0);
    ov.flush().unwrap();

    let fd = ov.file.as_raw_fd();
    let ro = std::fs::File::open(&path).unwrap();
    // SAFETY: dup/dup2 on descriptors this test owns; `saved` keeps the
    // overlay's open file description (and its lock) alive meanwhile.
    let saved = unsafe { libc::dup(fd) };
    assert!(saved >= 0);
    // SAFETY: as above.
    assert!(unsafe { libc::dup2(ro.as_raw_fd(), fd) } >= 0);

    let states = |ov: &Overlay| ov.runs(0, size).collect::<Vec<_>>();
    let before = states(&ov);
    let page = vec![1u8; BS as usize];
    assert!(write(&ov, 0, &page, &mut rng).is_err()); // Base, whole
    assert!(write(&ov, BS + 512, &[1; 512], &mut rng).is_err()); // Base, partial
    assert!(write(&ov, 8 * BS + 1, &[1; 3], &mut rng).is_err()); // Zero, partial
    assert!(write(&ov, 4 * BS + 100, &[1; 3], &mut rng).is_err()); // Data, partial
    assert!(ov.write_zeroes(4 * BS, BS, &base).is_err()); // Data, whole
    assert_eq!(states(&ov), before);
    check(&ov, &model, 0, size, &mut rng, "after failed writes");
    // Base reads failing do not change state either.
    let failing = |_: u64, _: &mut [u8]| Err(io::Error::other("base unavailable"));
    let bufs_src = &mut [1u8; 512];
    let bufs = IoBufs::from_slice(bufs_src);
    assert!(ov.write(2 * BS, &bufs, 0, 512, &failing).is_err());
    assert_eq!(states(&ov), before);

    // SAFETY: restores the overlay's description on its descriptor number.
    assert!(unsafe { libc::dup2(saved, fd) } >= 0);
    // SAFETY: `saved` is ours and no longer needed.
    unsafe { libc::close(saved) };
    write(&ov, 0, &page, &mut rng).unwrap();
    model[..BS as usize].copy_from_slice(&page);
    ov.close().unwrap();
    // A failed write may have left bytes behind: not marked clean, so the
    // next open reclaims.
    assert!(!Overlay::info(&path).unwrap().clean);
    let ov = Overlay::open(&path, cfg(size, 1, FlushMode::Safe)).unwrap();
    check(&ov, &model, 0, size, &mut rng, "after reopen");
}

#[test]
fn bad_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let c = cfg(1 << 20, 1, FlushMode::Unsafe);
    let reopen = || Overlay::open(&path, c.clone()).map(drop);
    reopen().unwrap();
    let full = std::fs::read(&path).unwrap();
    let put = |bytes: &[u8]| std::fs::write(&path, bytes).unwrap();
    let msg = |r: Result<(), OverlayError>| r.unwrap_err().to_string();

    put(&full[..100]);
    let m = msg(reopen());
    assert!(
        m.contains("truncated") && m.contains(&*path.to_string_lossy()),
        "{m}"
    );
    let data_end = parse_header(&full).unwrap().file_len() as usize;
    put(&full[..data_end - 4096]);
    assert!(msg(reopen()).contains("truncated"));
    assert!(matches!(
        Overlay::info(&path),
        Err(OverlayError::Corrupt { .. })
    ));

    let mut bad = full.clone();
    bad[HEADER_SIZE + 5] = 7;
    put(&bad);
    let m = msg(reopen());
    assert!(m.contains("unknown state byte 7 for block 5"), "{m}");
    Overlay::info(&path).unwrap_err();

    let mut bad = full.clone();
    bad[0] = b'X';
    put(&bad);
    assert!(matches!(
        Overlay::open(&path, c.clone()),
        Err(OverlayError::BadMagic { .. })
    ));
    assert!(matches!(
        Overlay::reset(&path),
        Err(OverlayError::BadMagic { .. })
    ));

    let mut bad = full.clone();
    bad[20] ^= 0x10;
    put(&bad);
    assert!(msg(reopen()).contains("checksum"));

    put(&full);
    reopen().unwrap();
    let odd = Overlay::open(&path, cfg(1000, 1, FlushMode::Unsafe));
    assert!(matches!(odd, Err(OverlayError::Config { .. })));
    assert!(matches!(
        Overlay::info(dir.path().join("missing")),
        Err(OverlayError::Io { .. })
    ));
}

fn with_crc(mut h: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&h[..80]);
    h[80..84].copy_from_slice(&crc.to_le_bytes());
    h
}

#[test]
fn parse_header_rejects_bad_input() {
    let good = Header::new(1 << 30, fp(3));
    let bytes = good.encode();
    assert_eq!(parse_header(&bytes), Ok(good.clone()));
    assert_eq!(good.data_offset, 1 << 20);
    assert_eq!(good.map_len, 1 << 18);

    assert!(matches!(
        parse_header(&[]),
        Err(FormatError::Truncated { .. })
    ));
    assert!(matches!(
        parse_header(&bytes[..HEADER_SIZE - 1]),
        Err(FormatError::Truncated { .. })
    ));
    let mut rng = rng(77);
    for _ in 0..1000 {
        let junk = rng.bytes(HEADER_SIZE);
        parse_header(&junk).unwrap_err();
    }
    // A recorded map checksum round-trips.
    let recorded = Header {
        map_crc: Some(0xdead_beef),
        ..good.clone()
    };
    assert_eq!(parse_header(&recorded.encode()), Ok(recorded));
    // Every single bit flip is caught, except the clean flag's own bit and
    // the map checksum's "recorded" bit (both outside the header CRC; the
    // latter then claims a checksum of 0, which the next open compares).
    assert_header_bit_flips_caught(&bytes);
    // Consistent checksums over inconsistent fields.
    let field = |at: usize, v: u64| {
        let mut b = bytes.clone();
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        parse_header(&with_crc(b))
    };
    let invalid = |r: Result<Header, FormatError>, what: &str| match r {
        Err(FormatError::Invalid(m)) => assert!(m.contains(what), "{m}"),
        r => panic!("expected {what}, got {r:?}"),
    };
    invalid(field(16, (1 << 30) + 1), "multiple of 512");
    invalid(field(16, 0), "multiple of 512");
    invalid(field(16, 1 << 60), "maximum");
    invalid(field(64, 5), "entries");
    invalid(field(56, 100), "map offset");
    invalid(field(56, u64::MAX - 4095), "map offset");
    invalid(field(72, 4096), "data offset");
    invalid(field(72, 1 << 19), "data offset");
    invalid(field(72, !((1u64 << 20) - 1)), "data offset");
    let mut b = bytes.clone();
    b[8] = 3;
    assert_eq!(parse_header(&with_crc(b)), Err(FormatError::Version(3)));
    let mut b = bytes.clone();
    b[13] = 2; // block size 512 + 4096
    invalid(parse_header(&with_crc(b)), "block size");

    // Random corruption of valid headers never panics.
    for _ in 0..20_000 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(90) as usize;
            b[i] = rng.next_u64() as u8;
        }
        let b = if rng.below(2) == 0 { with_crc(b) } else { b };
        let _ = parse_header(&b);
    }
}

#[test]
fn parse_map_rejects_unknown_states() {
    let map = parse_map(&[0, 1, 2, 0]).unwrap();
    assert_eq!(map.len(), 4);
    assert_eq!(
        parse_map(&[0, 1, 3]).err(),
        Some(FormatError::BadState { block: 2, value: 3 })
    );
}

#[test]
fn map_states_are_counted_decoded_and_checked_in_long_runs() {
    // Longer than the runs states are counted in, with every state in
    // runs of all lengths.
    let mut b: Vec<u8> = (0..10_000u32).map(|i| ((i * i / 7) % 3) as u8).collect();
    b[..600].fill(BlockState::Data as u8);
    let mut counts = map::StateCounts::default();
    format::count_states(&b, 100, &mut counts).unwrap();
    let mut want = [0u64; 3];
    for &v in &b {
        want[usize::from(v)] += 1;
    }
    assert_eq!([counts.base, counts.data, counts.zero], want);
    let map = parse_map(&b).unwrap();
    assert!(
        map.iter()
            .map(|a| a.load(Ordering::Relaxed))
            .eq(b.iter().copied())
    );
    // The first bad entry is named, by its block.
    b[7777] = 9;
    b[8888] = 3;
    let bad = Err(FormatError::BadState {
        block: 100 + 7777,
        value: 9,
    });
    assert_eq!(format::count_states(&b, 100, &mut counts), bad);
    assert_eq!(format::check_states(&b, 100), bad);
    let mut out = Vec::new();
    assert_eq!(format::decode_map(&b, 100, &mut out), bad);
}

#[test]
fn a_header_that_never_reached_the_disk_means_a_new_overlay() {
    // Creation does not sync: a crash right after it can leave the file
    // with its size set but a zero header. That is a new overlay, not a
    // corrupt one.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let ov = Overlay::open(&path, cfg(1 << 20, 1, FlushMode::Safe)).unwrap();
    let mut rng = rng(5);
    write(&ov, 4096, &[7u8; 4096], &mut rng).unwrap();
    ov.flush().unwrap();
    drop(ov);
    let ov = Overlay::open(&path, cfg(1 << 20, 1, FlushMode::Safe)).unwrap();
    assert_eq!(read(&ov, 4096, 4096, &mut rng), vec![7u8; 4096]);
}

/// Makes a FIFO at `path`.
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn anything_but_a_regular_file_is_refused_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let subdir = dir.path().join("dir");
    std::fs::create_dir(&subdir).unwrap();
    let c = cfg(1 << 20, 1, FlushMode::Unsafe);
    for path in [fifo.as_path(), Path::new("/dev/null"), subdir.as_path()] {
        let results = [
            Overlay::open(path, c.clone()).map(drop),
            Overlay::open_read_only(path, c.clone()).map(drop),
            Overlay::info(path).map(drop),
            Overlay::reset(path),
        ];
        for r in results {
            match r {
                Err(e @ OverlayError::NotRegular { .. }) => {
                    let m = e.to_string();
                    assert!(
                        m.contains("not a regular file") && m.contains(&*path.to_string_lossy()),
                        "{m}"
                    );
                }
                r => panic!("{}: expected NotRegular, got {r:?}", path.display()),
            }
        }
    }
    // Nothing was created or changed.
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert_eq!(std::fs::read_dir(&subdir).unwrap().count(), 0);
}

#[test]
fn io_errors_name_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let e = anyhow::Error::from(Overlay::info(&missing).unwrap_err());
    let chain = format!("{e:#}");
    assert_eq!(
        chain.matches("No such file or directory").count(),
        1,
        "{chain}"
    );
    assert!(chain.contains(&*missing.to_string_lossy()), "{chain}");
}

#[test]
fn new_overlays_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    drop(Overlay::open(&path, cfg(1 << 20, 1, FlushMode::Unsafe)).unwrap());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, OVERLAY_MODE, "{mode:o}");
    // An existing file keeps the mode its owner gave it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    drop(Overlay::open(&path, cfg(1 << 20, 1, FlushMode::Unsafe)).unwrap());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "{mode:o}");
}

#[test]
fn an_empty_file_is_a_new_overlay_for_open_and_info_alike() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    std::fs::File::create(&path).unwrap();
    match Overlay::info(&path) {
        Err(e @ OverlayError::NotInitialised { .. }) => {
            assert!(e.to_string().contains("no header yet"), "{e}")
        }
        r => panic!("expected NotInitialised, got {r:?}"),
    }
    // Read-only: nothing written, the base disk shows, the file stays empty.
    let ro = Overlay::open_read_only(&path, cfg(1 << 20, 1, FlushMode::Safe)).unwrap();
    assert!(ro.runs(0, 1 << 20).all(|r| r.state == BlockState::Base));
    drop(ro);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    let ov = Overlay::open(&path, cfg(1 << 20, 1, FlushMode::Safe)).unwrap();
    ov.close().unwrap();
    assert!(Overlay::info(&path).unwrap().clean);
}

/// Sets map entry `block` of the overlay file at `path` to `state`.
fn poke_map(path: &Path, block: u64, state: BlockState) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[state as u8], HEADER_SIZE as u64 + block)
        .unwrap();
}

#[test]
fn a_map_changed_after_a_clean_close_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let c = cfg(8 << 20, 1, FlushMode::Safe);
    let mut rng = rng(9);
    let ov = Overlay::open(&path, c.clone()).unwrap();
    write(&ov, 0, &[5u8; 4096], &mut rng).unwrap();
    ov.close().unwrap();
    assert_eq!(Overlay::info(&path).unwrap().map_check, MapCheck::Verified);

    // One entry turned into another valid state.
    poke_map(&path, 7, BlockState::Zero);
    for r in [
        Overlay::open(&path, c.clone()).map(drop),
        Overlay::open_read_only(&path, c.clone()).map(drop),
        Overlay::info(&path).map(drop),
    ] {
        match r {
            Err(e @ OverlayError::Corrupt { .. }) => {
                assert!(e.to_string().contains("map checksum mismatch"), "{e}")
            }
            r => panic!("expected a map checksum mismatch, got {r:?}"),
        }
    }
    // Put back, it opens again.
    poke_map(&path, 7, BlockState::Base);
    let ov = Overlay::open(&path, c.clone()).unwrap();
    // While in use (or after a crash) the map is not checked: it changes
    // entry by entry, each a crash-safe one-byte update.
    assert_eq!(
        Overlay::info(&path).unwrap().map_check,
        MapCheck::NotClosedCleanly
    );
    crash(ov);
    poke_map(&path, 7, BlockState::Zero);
    // After a host crash (the next open sees another boot) the map on disk
    // is what counts, not the dead server's live map.
    live::tests::simulate_reboot();
    let ov = Overlay::open(&path, c.clone()).unwrap();
    assert_eq!(ov.map.get(7), BlockState::Zero);
    assert_eq!(read(&ov, 0, 4096, &mut rng), vec![5u8; 4096]);
    ov.close().unwrap();
    // The next clean close records the map as it is now.
    assert_eq!(Overlay::info(&path).unwrap().map_check, MapCheck::Verified);

    // A reset records the checksum of its empty map.
    Overlay::reset(&path).unwrap();
    assert_eq!(Overlay::info(&path).unwrap().map_check, MapCheck::Verified);
    poke_map(&path, 3, BlockState::Data);
    assert!(matches!(
        Overlay::info(&path),
        Err(OverlayError::Corrupt { .. })
    ));
}

#[test]
fn overlays_without_a_recorded_map_checksum_still_open() {
    // What an ociblk before the map checksum wrote: the field all zeros.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let c = cfg(8 << 20, 1, FlushMode::Safe);
    let mut rng = rng(10);
    let ov = Overlay::open(&path, c.clone()).unwrap();
    write(&ov, 8192, &[6u8; 4096], &mut rng).unwrap();
    ov.close().unwrap();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0u8; 7], format::MAP_CRC_FIELD_OFFSET as u64)
        .unwrap();
    let info = Overlay::info(&path).unwrap();
    assert_eq!(info.map_check, MapCheck::NotRecorded);
    assert!(info.clean);
    let ov = Overlay::open(&path, c).unwrap();
    assert_eq!(read(&ov, 8192, 4096, &mut rng), vec![6u8; 4096]);
    ov.close().unwrap();
    assert_eq!(Overlay::info(&path).unwrap().map_check, MapCheck::Verified);
}

#[test]
fn read_only_opens_read_only_shares_and_never_modifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let c = cfg(8 << 20, 1, FlushMode::Safe);
    let mut rng = rng(11);
    let ov = Overlay::open(&path, c.clone()).unwrap();
    write(&ov, 4096, &[9u8; 4096], &mut rng).unwrap();
    // A writer excludes readers.
    assert!(matches!(
        Overlay::open_read_only(&path, c.clone()),
        Err(OverlayError::Locked { .. })
    ));
    ov.close().unwrap();

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
    let before = std::fs::read(&path).unwrap();
    let ro = Overlay::open_read_only(&path, c.clone()).unwrap();
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(ro.file.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
    assert!(!ro.writable());
    assert_eq!(read(&ro, 4096, 4096, &mut rng), vec![9u8; 4096]);
    assert!(write(&ro, 0, &[1u8; 4096], &mut rng).is_err());
    assert!(ro.write_zeroes(0, 4096, &base).is_err());
    ro.flush().unwrap();
    // Readers share; a writer is excluded.
    let ro2 = Overlay::open_read_only(&path, c.clone()).unwrap();
    assert!(matches!(
        Overlay::open(&path, c.clone()),
        Err(OverlayError::Locked { .. })
    ));
    assert!(matches!(
        Overlay::reset(&path),
        Err(OverlayError::Locked { .. })
    ));
    drop(ro2);
    ro.close().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before, "file modified");
    assert!(Overlay::info(&path).unwrap().clean);
}

#[test]
fn an_open_held_before_its_lock_while_a_freeze_replaces_the_file_serves_the_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let frozen = dir.path().join("layer1");
    let c = cfg(8 << 20, 1, FlushMode::Safe);
    let mut rng = rng(12);
    let ov = Overlay::open(&path, c.clone()).unwrap();
    write(&ov, 0, &[1u8; 4096], &mut rng).unwrap();
    ov.close().unwrap();
    let replaced = std::fs::metadata(&path).unwrap().ino();

    // The server has opened the overlay but not locked it yet when a freeze
    // replaces the file.
    let into = frozen.clone();
    file::tests::hold_between_open_and_lock(move |p| {
        layer::freeze(p, &into).unwrap();
    });
    let ov = Overlay::open(&path, c.clone()).unwrap();
    let serving = ov.file.metadata().unwrap();
    assert_ne!(serving.ino(), replaced, "still serving the unlinked file");
    assert_eq!(serving.ino(), std::fs::metadata(&path).unwrap().ino());
    assert_eq!(ov.chain().layers().len(), 1);
    assert_eq!(read(&ov, 0, 4096, &mut rng), vec![1u8; 4096]);
    write(&ov, 4096, &[2u8; 4096], &mut rng).unwrap();
    ov.flush().unwrap();
    crash(ov);

    // Nothing was lost: the next server sees both writes.
    let ov = Overlay::open(&path, c).unwrap();
    assert_eq!(read(&ov, 0, 4096, &mut rng), vec![1u8; 4096]);
    assert_eq!(read(&ov, 4096, 4096, &mut rng), vec![2u8; 4096]);
    ov.close().unwrap();
    assert!(frozen.exists());
}

#[test]
fn an_open_whose_file_keeps_being_replaced_gives_up_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let c = cfg(1 << 20, 1, FlushMode::Safe);
    Overlay::open(&path, c.clone()).unwrap().close().unwrap();
    // Each attempt finds the file replaced by a copy once it has opened it.
    fn replace_again(p: &Path) {
        let copy = p.with_extension("copy");
        std::fs::copy(p, &copy).unwrap();
        std::fs::rename(&copy, p).unwrap();
        file::tests::hold_between_open_and_lock(replace_again);
    }
    file::tests::hold_between_open_and_lock(replace_again);
    let e = Overlay::open(&path, c).unwrap_err();
    assert!(matches!(e, OverlayError::Replaced { .. }), "{e}");
    assert!(e.to_string().contains("was replaced"), "{e}");
    file::tests::hold_between_open_and_lock(|_| {});
}

type FlushHook = Box<dyn FnMut(&Overlay, &'static str)>;

thread_local! {
    static FLUSH_HOOK: std::cell::RefCell<Option<FlushHook>> = const { std::cell::RefCell::new(None) };
}

/// Called by [`Overlay::flush`] after each of its steps.
pub(super) fn flush_step(ov: &Overlay, step: &'static str) {
    FLUSH_HOOK.with(|h| {
        if let Some(hook) = h.borrow_mut().as_mut() {
            hook(ov, step);
        }
    });
}

/// A copy of the overlay file's bytes at one step, and whether they were
/// all durable then (right after an fdatasync).
struct Image {
    step: &'static str,
    bytes: Vec<u8>,
    durable: bool,
}

/// A host crash image: each 4 KiB page of the file from `durable` or from
/// `now` (the page cache), chosen by `pick`.
fn host_crash_image(durable: &[u8], now: &[u8], mut pick: impl FnMut() -> bool) -> Vec<u8> {
    let len = durable.len().max(now.len());
    let mut out = vec![0u8; len];
    for (i, page) in out.chunks_mut(BS as usize).enumerate() {
        let from = if pick() { now } else { durable };
        let at = i * BS as usize;
        let n = page.len().min(from.len().saturating_sub(at));
        page[..n].copy_from_slice(&from[at..at + n]);
    }
    out
}

/// Every block reads as flushed or as written; blocks the unflushed writes
/// did not touch read exactly as flushed.
fn check_blocks(got: &[u8], flushed: &[u8], written: &[u8], what: &str) {
    for (b, ((g, f), w)) in got
        .chunks(BS as usize)
        .zip(flushed.chunks(BS as usize))
        .zip(written.chunks(BS as usize))
        .enumerate()
    {
        if f == w {
            assert!(
                g == f,
                "{what}: block {b}, untouched since the flush, changed"
            );
        } else {
            assert!(
                g == f || g == w,
                "{what}: block {b} reads neither as flushed nor as written"
            );
        }
    }
}

/// Completed, not flushed: a rewrite, a first write, a partial write of a
/// base block, a zeroing of written blocks, a partial zeroing.
fn write_without_flush(ov: &Overlay, rng: &mut Rng) {
    write(ov, 4 * BS, &rng.bytes(2 * BS as usize), rng).unwrap();
    write(ov, 20 * BS, &rng.bytes(4 * BS as usize), rng).unwrap();
    write(ov, 30 * BS + 100, &rng.bytes(200), rng).unwrap();
    ov.write_zeroes(6 * BS, 2 * BS, &base).unwrap();
    ov.write_zeroes(2 * BS + 512, 1024, &base).unwrap();
}

/// Flushes `ov`, then crashes it: the file's bytes before the flush and
/// after each of its steps.
fn flush_step_by_step(ov: Overlay) -> Vec<Image> {
    let images = Arc::new(std::sync::Mutex::new(vec![Image {
        step: "written, not flushed",
        bytes: std::fs::read(ov.path()).unwrap(),
        durable: false,
    }]));
    let record = Arc::clone(&images);
    FLUSH_HOOK.with(|h| {
        *h.borrow_mut() = Some(Box::new(move |ov: &Overlay, step| {
            record.lock().unwrap().push(Image {
                step,
                bytes: std::fs::read(ov.path()).unwrap(),
                durable: step.ends_with("synced"),
            });
        }))
    });
    ov.flush().unwrap();
    FLUSH_HOOK.with(|h| *h.borrow_mut() = None);
    crash(ov);
    std::mem::take(&mut *images.lock().unwrap())
}

#[test]
fn a_crash_at_every_step_between_a_write_and_its_flush_keeps_the_guarantees() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let size = 1 << 20;
    let c = cfg(size, 1, FlushMode::Safe);
    let mut rng = rng(13);
    let ov = Overlay::open(&path, c.clone()).unwrap();
    write(&ov, 0, &rng.bytes(8 * BS as usize), &mut rng).unwrap();
    ov.write_zeroes(8 * BS, 4 * BS, &base).unwrap();
    ov.flush().unwrap();
    let flushed = read(&ov, 0, size, &mut rng);
    let first_durable = std::fs::read(&path).unwrap();
    write_without_flush(&ov, &mut rng);
    let written = read(&ov, 0, size, &mut rng);
    assert_ne!(written, flushed);

    let images = flush_step_by_step(ov);
    assert!(images.len() >= 5, "{} steps", images.len());

    let open_image = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        Overlay::open(&p, c.clone()).unwrap()
    };
    let mut durable: &[u8] = &first_durable;
    for (k, image) in images.iter().enumerate() {
        if image.durable {
            durable = &image.bytes;
        }
        let what = format!("crash at step {k} ({})", image.step);

        // The process dies, the host stays up: everything completed reads
        // back, and the next server's flush makes it durable.
        live::tests::real_boot();
        let ov = open_image(&format!("process-{k}"), &image.bytes);
        assert!(
            read(&ov, 0, size, &mut rng) == written,
            "{what}: process crash"
        );
        let after_open = std::fs::read(ov.path()).unwrap();
        ov.flush().unwrap();
        let flushed_again = std::fs::read(ov.path()).unwrap();
        crash(ov);

        // The host crashes: each page of the file is as of the last sync
        // or as in the page cache, any mix of the two.
        let mut picks: Vec<Box<dyn FnMut() -> bool>> = vec![Box::new(|| false), Box::new(|| true)];
        for seed in 0..4 {
            let mut r = self::rng(100 + seed);
            picks.push(Box::new(move || r.chance(50)));
        }
        for (m, pick) in picks.into_iter().enumerate() {
            // At step k itself.
            live::tests::simulate_reboot();
            let crashed = host_crash_image(durable, &image.bytes, pick);
            let ov = open_image(&format!("host-{k}-{m}"), &crashed);
            let got = read(&ov, 0, size, &mut rng);
            check_blocks(
                &got,
                &flushed,
                &written,
                &format!("{what}, host crash mix {m}"),
            );
            drop(ov);
        }
        // After a process kill at step k, a new server opened the overlay
        // (taking the live map, reclaiming), then the host crashed before
        // its first flush: nothing synced since step k.
        for seed in 0..3 {
            live::tests::simulate_reboot();
            let mut r = self::rng(200 + seed);
            let crashed = host_crash_image(durable, &after_open, || r.chance(50));
            let ov = open_image(&format!("kill-host-{k}-{seed}"), &crashed);
            let got = read(&ov, 0, size, &mut rng);
            check_blocks(
                &got,
                &flushed,
                &written,
                &format!("{what}, process kill then host crash"),
            );
            drop(ov);
        }
        // After that server's flush, a host crash keeps everything.
        live::tests::simulate_reboot();
        let ov = open_image(&format!("flushed-host-{k}"), &flushed_again);
        assert!(
            read(&ov, 0, size, &mut rng) == written,
            "{what}: flushed by the next server"
        );
        drop(ov);
    }
    live::tests::real_boot();
}

#[test]
fn a_dead_servers_completed_writes_reach_a_read_only_open_and_a_freeze() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let c = cfg(4 << 20, 1, FlushMode::Safe);
    let mut rng = rng(14);
    let ov = Overlay::open(&path, c.clone()).unwrap();
    let data = rng.bytes(3 * BS as usize + 512);
    write(&ov, 7 * BS, &data, &mut rng).unwrap();
    crash(ov);

    // An export (read-only, never writing) of the dead server's overlay.
    let ro = Overlay::open_read_only(&path, c.clone()).unwrap();
    assert_eq!(read(&ro, 7 * BS, data.len() as u64, &mut rng), data);
    drop(ro);

    // A freeze takes them into the layer.
    let frozen = dir.path().join("layer");
    layer::freeze(&path, &frozen).unwrap();
    let ov = Overlay::open(&path, c).unwrap();
    assert_eq!(ov.chain().layers().len(), 1);
    assert_eq!(read(&ov, 7 * BS, data.len() as u64, &mut rng), data);
    ov.close().unwrap();
}
