//! The write path: a request range is split into a partial head block,
//! whole blocks and a partial tail block; whole blocks are written or
//! punched under shared stripe locks, a partial block is read, modified
//! and written back under its stripe's exclusive lock.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{PoisonError, RwLockReadGuard, RwLockWriteGuard};

use ociblk_io::iobuf::IoBufs;
use ociblk_io::sys;

use super::format::{BLOCK_SIZE as BS, BlockState};
use super::{BaseReader, Overlay, STRIPES};

/// Part of a request range: a partial block, or a run of whole blocks.
#[derive(Debug, Clone, Copy)]
struct Piece {
    offset: u64,
    len: u64,
    whole: bool,
}

/// What a partial-block update writes.
#[derive(Clone, Copy)]
enum Fill<'a, 'b> {
    /// Bytes of a scatter list from this position.
    Bytes(&'a IoBufs<'b>, usize),
    Zeros,
}

impl Overlay {
    /// Writes `src[at..at + len]` at disk offset `offset`. `base` reads the
    /// base disk for partial blocks that neither the overlay nor a layer
    /// under it holds.
    ///
    /// On error, each block keeps its previous state; bytes of blocks that
    /// were already `Data` may be partly overwritten, like a failed write
    /// to a real disk.
    pub fn write(
        &self,
        offset: u64,
        src: &IoBufs<'_>,
        at: usize,
        len: usize,
        base: BaseReader<'_>,
    ) -> io::Result<()> {
        self.check_writable()?;
        let end = self.check_range(offset, len as u64)?;
        Self::check_bufs(src, at, len)?;
        for p in self.split(offset, end).into_iter().flatten() {
            let pos = at + (p.offset - offset) as usize;
            if p.whole {
                self.write_whole(p, src, pos)?;
            } else {
                self.write_partial(p, Fill::Bytes(src, pos), base)?;
            }
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros: whole blocks become
    /// `Zero` and their data is deallocated, partial blocks are rewritten.
    pub fn write_zeroes(&self, offset: u64, len: u64, base: BaseReader<'_>) -> io::Result<()> {
        self.check_writable()?;
        let end = self.check_range(offset, len)?;
        for p in self.split(offset, end).into_iter().flatten() {
            if p.whole {
                self.zero_whole(p)?;
            } else {
                self.write_partial(p, Fill::Zeros, base)?;
            }
        }
        Ok(())
    }

    /// Drops `len` bytes at `offset`. Same as [`Self::write_zeroes`]: the
    /// base underneath must never show through again.
    pub fn discard(&self, offset: u64, len: u64, base: BaseReader<'_>) -> io::Result<()> {
        self.write_zeroes(offset, len, base)
    }

    /// Splits `[offset, end)` into a partial head block, whole blocks and
    /// a partial tail block. The disk's last block counts as whole when
    /// the range reaches the end of the disk.
    fn split(&self, offset: u64, end: u64) -> [Option<Piece>; 3] {
        let size = self.header.disk_size;
        let block_end = |p: u64| ((p / BS + 1) * BS).min(size);
        let mut out = [None; 3];
        let mut pos = offset;
        if pos < end && (!pos.is_multiple_of(BS) || end < block_end(pos)) {
            let e = end.min(block_end(pos));
            out[0] = Some(Piece {
                offset: pos,
                len: e - pos,
                whole: false,
            });
            pos = e;
        }
        let whole_end = if end == size { end } else { end / BS * BS };
        if pos < whole_end {
            out[1] = Some(Piece {
                offset: pos,
                len: whole_end - pos,
                whole: true,
            });
            pos = whole_end;
        }
        if pos < end {
            out[2] = Some(Piece {
                offset: pos,
                len: end - pos,
                whole: false,
            });
        }
        out
    }

    /// Locks the stripes of blocks `[b0, b1)` shared, in ascending order.
    fn lock_shared(&self, b0: u64, b1: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        let mut mask = if b1 - b0 >= STRIPES as u64 {
            u64::MAX
        } else {
            (b0..b1).fold(0u64, |m, b| m | 1 << (b % STRIPES as u64))
        };
        let mut guards = Vec::with_capacity(mask.count_ones() as usize);
        while mask != 0 {
            let i = mask.trailing_zeros() as usize;
            guards.push(
                self.stripes[i]
                    .read()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            mask &= mask - 1;
        }
        guards
    }

    fn lock_exclusive(&self, block: u64) -> RwLockWriteGuard<'_, ()> {
        self.stripes[(block % STRIPES as u64) as usize]
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write_whole(&self, p: Piece, src: &IoBufs<'_>, at: usize) -> io::Result<()> {
        let (b0, b1) = (p.offset / BS, (p.offset + p.len).div_ceil(BS));
        let _locks = self.lock_shared(b0, b1);
        let r = src.write_to_file(
            &self.file,
            self.header.data_offset + p.offset,
            at,
            p.len as usize,
        );
        if let Err(e) = r {
            self.leaked.store(true, Ordering::Relaxed);
            return Err(e);
        }
        for b in b0..b1 {
            self.map.set(b, BlockState::Data);
        }
        Ok(())
    }

    fn zero_whole(&self, p: Piece) -> io::Result<()> {
        let (b0, b1) = (p.offset / BS, (p.offset + p.len).div_ceil(BS));
        let _locks = self.lock_shared(b0, b1);
        // Punch before publishing `Zero`: if the punch fails the blocks keep
        // their state. A reader that sees `Data` meanwhile gets old bytes or
        // zeros, either a valid result for a read racing the zeroing.
        self.punch(self.header.data_offset + b0 * BS, (b1 - b0) * BS)?;
        for b in b0..b1 {
            self.map.set(b, BlockState::Zero);
        }
        Ok(())
    }

    /// Deallocates part of the data area. Reads never depend on it (the map
    /// says `Zero`), so a filesystem without hole punching only costs space.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        match sys::punch_hole(self.file.as_fd(), offset, len) {
            Err(e) if sys::unsupported(&e) => Ok(()),
            r => r,
        }
    }

    /// Updates part of one block under its exclusive stripe lock.
    fn write_partial(&self, p: Piece, fill: Fill<'_, '_>, base: BaseReader<'_>) -> io::Result<()> {
        let block = p.offset / BS;
        let block_start = block * BS;
        let start = (p.offset - block_start) as usize;
        let len = p.len as usize;
        let data_pos = self.header.data_offset + block_start;
        let _lock = self.lock_exclusive(block);
        let state = self.map.get(block);
        match (state, fill) {
            (BlockState::Zero, Fill::Zeros) => return Ok(()),
            // The rest of the block is already in the data area: write in
            // place, nothing to read.
            (BlockState::Data, Fill::Bytes(src, at)) => {
                return src.write_to_file(&self.file, data_pos + start as u64, at, len);
            }
            (BlockState::Data, Fill::Zeros) => {
                return self
                    .file
                    .write_all_at(&vec![0u8; len], data_pos + start as u64);
            }
            _ => {}
        }
        let valid = (self.header.disk_size - block_start).min(BS) as usize;
        let mut buf = vec![0u8; valid];
        if state == BlockState::Base {
            // The block's content below the overlay: a layer's, or the base.
            self.chain.read_lower(block_start, &mut buf, base)?;
        }
        match fill {
            Fill::Bytes(src, at) => src.copy_to(at, &mut buf[start..start + len]),
            Fill::Zeros => buf[start..start + len].fill(0),
        }
        if buf.iter().all(|&b| b == 0) {
            // Keeps zeroing a sector of a fresh block from allocating it.
            self.punch(data_pos, BS)?;
            self.map.set(block, BlockState::Zero);
            return Ok(());
        }
        if let Err(e) = self.file.write_all_at(&buf, data_pos) {
            self.leaked.store(true, Ordering::Relaxed);
            return Err(e);
        }
        self.map.set(block, BlockState::Data);
        Ok(())
    }
}
