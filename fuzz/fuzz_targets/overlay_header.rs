//! Arbitrary bytes as an overlay file: the pure parsers, then `info`,
//! `open` (for the disk the header names and for another one), and when an
//! open succeeds, writes, zeroing and reads checked against a model of the
//! disk, across a close and reopen.
//!
//! Input: two control bytes, eight bytes of window choice, then the file
//! contents.
//!
//! ```text
//! control  bit 0 recompute the header CRC (so mutations get past it),
//!          bit 1 extend the file to the length the header asks for (a hole),
//!          bit 2 fdatasync flushes, bit 3 open for another disk first,
//!          bit 4 reset the overlay before opening, bits 5-7 operations / 2
//! control2 bit 0 fill the window's blocks in the data area (so that
//!          reclaiming space after an unclean close has work to do),
//!          bit 1 check that a second open and a reset are refused while
//!          the overlay is open
//! window   u64: where in a large disk the operations happen
//! ops      taken from the end of the file contents, 12 bytes each
//! ```
//!
//! Right after an open that keeps the file's map, the window must read as
//! the map says: base bytes, zeros, or the data area's bytes.

#![no_main]

use std::fs;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use ociblk_io::iobuf::IoBufs;
use ociblk_overlay::format::HEADER_SIZE;
use ociblk_overlay::{
    BLOCK_SIZE, BlockState, FlushMode, Header, Overlay, OverlayConfig, OverlayError, OverlayInfo,
    parse_header, parse_map,
};

/// The file is only extended (as a hole) up to this length: reading the
/// map costs a byte per 4 KiB block of the disk.
const MAX_FILE_LEN: u64 = 1 << 30;
/// Operations and checks cover at most this much of the disk.
const WINDOW: u64 = 256 << 10;
const OP_SIZE: usize = 12;
const CRC_OFFSET: usize = 80;

/// A non-zero, position-dependent base disk.
fn base_byte(p: u64) -> u8 {
    (p.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 | 1
}

fn base(offset: u64, buf: &mut [u8]) -> io::Result<()> {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = base_byte(offset + i as u64);
    }
    Ok(())
}

/// A base disk whose reads fail: write errors must leave the overlay usable.
fn failing_base(_: u64, _: &mut [u8]) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(5))
}

/// Reads `[offset, offset + len)` as the server does: base, data or zeros.
/// Read errors are failures: an open overlay must be able to serve reads.
fn read(ov: &Overlay, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0xeeu8; len];
    let mut got = 0;
    for run in ov.runs(offset, len as u64) {
        let at = (run.offset - offset) as usize;
        let n = run.len as usize;
        assert_eq!(at, got, "runs must be contiguous");
        let dst = &mut out[at..at + n];
        match run.state {
            BlockState::Base => base(run.offset, dst).expect("base read"),
            BlockState::Zero => dst.fill(0),
            BlockState::Data => {
                let bufs = IoBufs::from_slice(dst);
                ov.read_data(run.offset, &bufs, 0, n)
                    .unwrap_or_else(|e| panic!("read_data of {n} bytes at {}: {e}", run.offset));
            }
        }
        got += n;
    }
    let inside = (ov.disk_size().saturating_sub(offset) as usize).min(len);
    assert_eq!(
        got, inside,
        "runs must cover the range up to the disk's end"
    );
    out
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { offset: u64, len: usize, seed: u8 },
    Zero { offset: u64, len: u64 },
    FailingWrite { offset: u64, len: usize },
    Flush,
}

fn parse_ops(bytes: &[u8], count: usize, w0: u64, wlen: u64) -> Vec<Op> {
    bytes
        .rchunks_exact(OP_SIZE)
        .take(count)
        .map(|c| {
            let off = u64::from(u32::from_le_bytes([c[1], c[2], c[3], c[4]]));
            let len = u64::from(u32::from_le_bytes([c[5], c[6], c[7], c[8]]));
            // Low values of the kind byte ask for sector-aligned ranges, as
            // the server sends; high values for arbitrary bytes.
            let (offset, len) = if c[0] & 0x80 == 0 {
                (off % (wlen / 512 + 1) * 512, len % 64 * 512)
            } else {
                (off % (wlen + 1), len % (2 * 4096 + 1))
            };
            let offset = w0 + offset;
            match c[0] % 8 {
                0..=3 => Op::Write {
                    offset,
                    len: len as usize,
                    seed: c[9],
                },
                4 | 5 => Op::Zero { offset, len },
                6 => Op::FailingWrite {
                    offset,
                    len: len as usize,
                },
                _ => Op::Flush,
            }
        })
        .collect()
}

/// Runs `ops` on `ov`, keeping `model` (the disk's bytes from `w0`) in step,
/// and checks every read against it.
fn exercise(ov: &Overlay, ops: &[Op], w0: u64, model: &mut [u8]) {
    let size = ov.disk_size();
    let in_disk = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= size);
    // The model covers the window only: ranges that leave it but not the
    // disk are cut at its end; ranges past the disk's end stay, to fail.
    let w1 = w0 + model.len() as u64;
    let clip = |offset: u64, len: u64| {
        if offset + len > w1 && offset + len <= size {
            w1 - offset
        } else {
            len
        }
    };
    for op in ops {
        match *op {
            Op::Write { offset, len, seed } => {
                let len = clip(offset, len as u64) as usize;
                let mut src: Vec<u8> = (0..len + 7)
                    .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                    .collect();
                let bufs = IoBufs::from_slice(&mut src);
                let r = ov.write(offset, &bufs, 7, len, &base);
                drop(bufs);
                assert_eq!(
                    r.is_ok(),
                    in_disk(offset, len as u64),
                    "write {op:?}: {r:?}"
                );
                if r.is_ok() {
                    let at = (offset - w0) as usize;
                    model[at..at + len].copy_from_slice(&src[7..7 + len]);
                }
            }
            Op::Zero { offset, len } => {
                let len = clip(offset, len);
                let r = ov.write_zeroes(offset, len, &base);
                assert_eq!(r.is_ok(), in_disk(offset, len), "zero {op:?}: {r:?}");
                if r.is_ok() {
                    let at = (offset - w0) as usize;
                    model[at..at + len as usize].fill(0);
                }
            }
            Op::FailingWrite { offset, len } => {
                let len = clip(offset, len as u64) as usize;
                let mut src = vec![0x42u8; len];
                let bufs = IoBufs::from_slice(&mut src);
                let r = ov.write(offset, &bufs, 0, len, &failing_base);
                drop(bufs);
                if !in_disk(offset, len as u64) {
                    assert!(r.is_err(), "write past the disk's end succeeded");
                    continue;
                }
                let at = (offset - w0) as usize;
                if r.is_ok() {
                    model[at..at + len].fill(0x42);
                } else {
                    // The range may be partly written, like a failed write
                    // to a real disk: take what the overlay now holds there.
                    // Bytes outside it must not change (checked below).
                    model[at..at + len].copy_from_slice(&read(ov, offset, len));
                }
            }
            Op::Flush => ov.flush().expect("flush"),
        }
    }
    assert!(
        read(ov, w0, model.len()) == model,
        "overlay reads differ from what was written"
    );
}

fn config(disk_size: u64, fingerprint: [u8; 32], safe: bool) -> OverlayConfig {
    OverlayConfig {
        disk_size,
        fingerprint,
        flush: if safe {
            FlushMode::Safe
        } else {
            FlushMode::Unsafe
        },
    }
}

/// `info` of the file, checked for consistency; `None` when it is not a
/// valid overlay.
fn check_info(path: &Path) -> Option<OverlayInfo> {
    match Overlay::info(path) {
        Ok(info) => {
            assert!(info.written + info.zeroed <= info.blocks);
            assert_eq!(info.blocks, info.disk_size.div_ceil(info.block_size));
            Some(info)
        }
        Err(OverlayError::Io { .. } | OverlayError::Corrupt { .. }) => None,
        Err(OverlayError::BadMagic { .. } | OverlayError::Version { .. }) => None,
        // Empty, or a header that was never written.
        Err(OverlayError::NotInitialised { .. }) => None,
        // A frozen layer's header and map are checked against its digest.
        Err(OverlayError::LayerModified { .. } | OverlayError::NotALayer { .. }) => None,
        Err(e) => panic!("info: unexpected error {e}"),
    }
}

/// What block `b` of the data area is filled with (control2 bit 0).
fn data_byte(block: u64, i: usize) -> u8 {
    (block as u8).wrapping_mul(13) ^ (i as u8) | 0x80
}

/// The window `[w0, w0 + len)` as `header` and the file's bytes say it
/// reads: the map in `file` (a hole past its end), the data area holding
/// `data_byte` where `filled`, else zeros.
fn expected(header: &Header, file: &[u8], filled: bool, w0: u64, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    base(w0, &mut out).expect("base read");
    for (i, b) in out.iter_mut().enumerate() {
        let pos = w0 + i as u64;
        let block = pos / BLOCK_SIZE;
        let state = usize::try_from(header.map_offset + block)
            .ok()
            .and_then(|at| file.get(at))
            .copied()
            .unwrap_or(0);
        match BlockState::from_u8(state).expect("a map that opened is valid") {
            BlockState::Base => {}
            BlockState::Zero => *b = 0,
            BlockState::Data if filled => *b = data_byte(block, (pos % BLOCK_SIZE) as usize),
            BlockState::Data => *b = 0,
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let (&control, rest) = data.split_first().unwrap_or((&0, &[]));
    let (&control2, rest) = rest.split_first().unwrap_or((&0, &[]));
    let (window, contents) = rest.split_at(rest.len().min(8));
    let mut wbytes = [0u8; 8];
    wbytes[..window.len()].copy_from_slice(window);
    let window = u64::from_le_bytes(wbytes);

    let _ = parse_map(contents);
    let mut file = contents.to_vec();
    if control & 1 != 0 && file.len() >= CRC_OFFSET + 4 {
        // Version 2 also covers bytes 96..4096 (its chain and layer fields).
        let mut h = crc32fast::Hasher::new();
        h.update(&file[..CRC_OFFSET]);
        if file[8..12] == 2u32.to_le_bytes() && file.len() >= HEADER_SIZE {
            h.update(&file[96..HEADER_SIZE]);
        }
        let crc = h.finalize();
        file[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    }
    let header = parse_header(&file);
    if let Ok(h) = &header {
        assert!(h.data_offset >= h.map_offset + h.map_len);
        assert!(h.map_offset >= HEADER_SIZE as u64);
        // The header round-trips.
        assert_eq!(parse_header(&h.encode()).as_ref(), Ok(h));
    }

    let tmp = tempfile::Builder::new()
        .prefix("ociblk-fuzz-")
        .tempdir()
        .expect("create temp dir");
    let path = tmp.path().join("node.overlay");
    fs::write(&path, &file).expect("write the overlay file");
    if control & 2 != 0
        && let Ok(h) = &header
        && h.file_len() <= MAX_FILE_LEN
        && h.file_len() > file.len() as u64
    {
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(h.file_len()))
            .expect("extend the overlay file");
    }
    let small = header.as_ref().is_ok_and(|h| h.file_len() <= MAX_FILE_LEN);
    // A valid header may describe a disk of up to 1 PiB, whose map is read
    // whole; only small ones are opened.
    if header.is_ok() && !small {
        return;
    }
    let (disk_size, fingerprint) = match &header {
        Ok(h) => (h.disk_size, h.fingerprint),
        Err(_) => (64 << 10, [0; 32]),
    };
    let wlen = disk_size.min(WINDOW);
    let w0 = window % (disk_size - wlen + 1) / 512 * 512;
    let filled = control2 & 1 != 0 && header.is_ok();
    if let (true, Ok(h)) = (filled, &header) {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open the overlay file");
        for block in w0 / BLOCK_SIZE..(w0 + wlen).div_ceil(BLOCK_SIZE) {
            let bytes: Vec<u8> = (0..BLOCK_SIZE as usize)
                .map(|i| data_byte(block, i))
                .collect();
            f.write_all_at(&bytes, h.data_offset + block * BLOCK_SIZE)
                .expect("fill the data area");
        }
    }
    let mut info = check_info(&path);
    let mut reset = false;
    if control & 16 != 0 && Overlay::reset(&path).is_ok() {
        reset = true;
        info = check_info(&path);
        if !file.is_empty() {
            let info = info.as_ref().expect("info after a reset");
            assert_eq!((info.written, info.zeroed, info.clean), (0, 0, true));
        }
    }

    let safe = control & 4 != 0;
    // An empty file, or one whose header is all zeros (a crash right after
    // creation), is a new overlay to `open`, and not an overlay to `info`.
    let never_written = file[..file.len().min(HEADER_SIZE)].iter().all(|&b| b == 0);
    if control & 8 != 0 {
        // Another disk: refused, unless nothing was ever written (then the
        // file is laid out anew).
        let mut other = fingerprint;
        other[0] ^= 1;
        if let Ok(ov) = Overlay::open(&path, config(disk_size + 512, other, safe)) {
            assert!(
                never_written || info.is_some_and(|i| i.written + i.zeroed == 0),
                "an overlay holding data was opened for another disk"
            );
            ov.close().expect("close");
            return;
        }
    }
    let opened = Overlay::open(&path, config(disk_size, fingerprint, safe));
    if !never_written && info.is_none() {
        assert!(opened.is_err(), "open accepted a file that info rejects");
    }
    let Ok(ov) = opened else {
        return;
    };
    assert_eq!(ov.disk_size(), disk_size);
    if control2 & 2 != 0 {
        let again = Overlay::open(&path, config(disk_size, fingerprint, safe));
        assert!(
            matches!(again, Err(OverlayError::Locked { .. })),
            "a second open of an open overlay: {again:?}"
        );
        let reset = Overlay::reset(&path);
        assert!(
            matches!(reset, Err(OverlayError::Locked { .. })),
            "a reset of an open overlay: {reset:?}"
        );
    }

    let ops = parse_ops(contents, usize::from(control >> 5) * 2, w0, wlen);
    let mut model = read(&ov, w0, wlen as usize);
    if let Ok(h) = &header
        && !never_written
    {
        // The file's own map: what was written must read back, and space
        // reclaimed after an unclean close must not include written blocks.
        let want = if reset {
            expected(h, &[], false, w0, wlen)
        } else {
            expected(h, &file, filled, w0, wlen)
        };
        assert!(
            model == want,
            "a freshly opened overlay does not read as its map says"
        );
    }
    exercise(&ov, &ops, w0, &mut model);
    ov.close().expect("close");

    let ov = Overlay::open(&path, config(disk_size, fingerprint, safe)).expect("reopen");
    assert!(
        read(&ov, w0, wlen as usize) == model,
        "contents changed across close and reopen"
    );
    ov.close().expect("close");
    check_info(&path);
});
