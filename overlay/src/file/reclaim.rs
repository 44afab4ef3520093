//! Reclaiming space after an unclean close: data-area blocks that no
//! `Data` entry claims were written but never published, and are freed.

use std::io;
use std::os::fd::AsFd;

use ociblk_io::sys;

use crate::Overlay;
use crate::format::{BLOCK_SIZE as BS, BlockState};

impl Overlay {
    /// Deallocates the data of every block that is not `Data`: after a
    /// crash, blocks written but never published in the durable map keep
    /// their bytes allocated.
    pub(super) fn reclaim(&self) -> io::Result<()> {
        let fd = self.file.as_fd();
        let start = self.header.data_offset;
        let end = self.header.file_len();
        let mut pos = start;
        while pos < end {
            let Some((s, e)) = sys::next_data(fd, pos)? else {
                break;
            };
            if s >= end {
                break;
            }
            let (b0, b1) = ((s - start) / BS, (e.min(end) - start).div_ceil(BS));
            let mut b = b0;
            while b < b1 {
                if self.map.get(b) == BlockState::Data {
                    b += 1;
                    continue;
                }
                let first = b;
                while b < b1 && self.map.get(b) != BlockState::Data {
                    b += 1;
                }
                match sys::punch_hole(fd, start + first * BS, (b - first) * BS) {
                    Err(e) if sys::unsupported(&e) => return Ok(()),
                    r => r?,
                }
            }
            pos = start + b1 * BS;
        }
        Ok(())
    }
}
