// SPDX-License-Identifier: Apache-2.0

//! Parsing of the virtio-blk configuration space (`struct virtio_blk_config`).

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_GEOMETRY,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, virtio_blk_config,
};
use vm_memory::ByteValued;

/// Size of a virtio-blk sector: the unit of `capacity` and of request header sectors.
pub const SECTOR_SIZE: u64 = 512;

/// Fewest bytes of config space worth reading: the capacity.
pub(crate) const MIN_CONFIG_SIZE: u32 = (offset_of!(virtio_blk_config, capacity) + 8) as u32;

/// Bytes of config space the client reads by default: everything up to and including
/// the write-zeroes fields (`virtio_blk_config` before the secure-erase fields).
pub const DEFAULT_CONFIG_SIZE: u32 = offset_of!(virtio_blk_config, max_secure_erase_sectors) as u32;

/// Disk geometry (`VIRTIO_BLK_F_GEOMETRY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

/// I/O topology (`VIRTIO_BLK_F_TOPOLOGY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// log2 of logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// Optimal (suggested maximum) I/O size, in logical blocks.
    pub opt_io_size: u32,
}

/// Discard limits (`VIRTIO_BLK_F_DISCARD`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardLimits {
    /// Maximum sectors in one discard segment.
    pub max_sectors: u32,
    /// Maximum segments in one discard request.
    pub max_segments: u32,
    /// Required alignment of discard ranges, in sectors.
    pub sector_alignment: u32,
}

/// Write-zeroes limits (`VIRTIO_BLK_F_WRITE_ZEROES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteZeroesLimits {
    /// Maximum sectors in one write-zeroes segment.
    pub max_sectors: u32,
    /// Maximum segments in one write-zeroes request.
    pub max_segments: u32,
    /// Whether the device may unmap when asked to (non-zero `write_zeroes_may_unmap`).
    pub may_unmap: bool,
}

/// The virtio-blk config space as read with `VHOST_USER_GET_CONFIG`.
///
/// A field whose feature bit was not negotiated (or that lies beyond the bytes read) is
/// `None`: its value carries no meaning then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Maximum size of one segment (`VIRTIO_BLK_F_SIZE_MAX`).
    pub size_max: Option<u32>,
    /// Maximum number of segments in one request (`VIRTIO_BLK_F_SEG_MAX`).
    pub seg_max: Option<u32>,
    /// Geometry (`VIRTIO_BLK_F_GEOMETRY`).
    pub geometry: Option<Geometry>,
    /// Logical block size (`VIRTIO_BLK_F_BLK_SIZE`).
    pub blk_size: Option<u32>,
    /// Topology (`VIRTIO_BLK_F_TOPOLOGY`).
    pub topology: Option<Topology>,
    /// Write-back cache mode: 1 writeback, 0 writethrough (`VIRTIO_BLK_F_CONFIG_WCE`).
    pub writeback: Option<u8>,
    /// Number of request queues (`VIRTIO_BLK_F_MQ`).
    pub num_queues: Option<u16>,
    /// Discard limits (`VIRTIO_BLK_F_DISCARD`).
    pub discard: Option<DiscardLimits>,
    /// Write-zeroes limits (`VIRTIO_BLK_F_WRITE_ZEROES`).
    pub write_zeroes: Option<WriteZeroesLimits>,
    /// The bytes as received.
    pub raw: Vec<u8>,
}

fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// The config space as the bindings lay it out.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct WireConfig(virtio_blk_config);

// SAFETY: `virtio_blk_config` is a packed C struct of integers and integer arrays: it
// has no padding and every byte pattern is a valid value.
unsafe impl ByteValued for WireConfig {}

impl BlkConfig {
    /// Parses `raw` (config space from offset 0) given the negotiated virtio `features`.
    ///
    /// Returns `None` if `raw` is too short to hold the capacity.
    pub fn parse(raw: &[u8], features: u64) -> Option<Self> {
        type C = virtio_blk_config;
        if raw.len() < MIN_CONFIG_SIZE as usize {
            return None;
        }
        let mut wire = WireConfig::default();
        let n = raw.len().min(size_of::<WireConfig>());
        wire.as_mut_slice()[..n].copy_from_slice(&raw[..n]);
        let c = wire.0;
        // A field (or group) is there if its feature was negotiated and the bytes read
        // reach its end: the offset of the field after it.
        let present = |bit: u32, end: usize| has(features, bit) && end <= raw.len();
        Some(Self {
            capacity: u64::from_le(c.capacity),
            size_max: present(VIRTIO_BLK_F_SIZE_MAX, offset_of!(C, seg_max))
                .then(|| u32::from_le(c.size_max)),
            seg_max: present(VIRTIO_BLK_F_SEG_MAX, offset_of!(C, geometry))
                .then(|| u32::from_le(c.seg_max)),
            geometry: present(VIRTIO_BLK_F_GEOMETRY, offset_of!(C, blk_size)).then(|| Geometry {
                cylinders: u16::from_le(c.geometry.cylinders),
                heads: c.geometry.heads,
                sectors: c.geometry.sectors,
            }),
            blk_size: present(VIRTIO_BLK_F_BLK_SIZE, offset_of!(C, physical_block_exp))
                .then(|| u32::from_le(c.blk_size)),
            topology: present(VIRTIO_BLK_F_TOPOLOGY, offset_of!(C, wce)).then(|| Topology {
                physical_block_exp: c.physical_block_exp,
                alignment_offset: c.alignment_offset,
                min_io_size: u16::from_le(c.min_io_size),
                opt_io_size: u32::from_le(c.opt_io_size),
            }),
            writeback: present(VIRTIO_BLK_F_CONFIG_WCE, offset_of!(C, unused)).then_some(c.wce),
            num_queues: present(VIRTIO_BLK_F_MQ, offset_of!(C, max_discard_sectors))
                .then(|| u16::from_le(c.num_queues)),
            discard: present(
                VIRTIO_BLK_F_DISCARD,
                offset_of!(C, max_write_zeroes_sectors),
            )
            .then(|| DiscardLimits {
                max_sectors: u32::from_le(c.max_discard_sectors),
                max_segments: u32::from_le(c.max_discard_seg),
                sector_alignment: u32::from_le(c.discard_sector_alignment),
            }),
            write_zeroes: present(VIRTIO_BLK_F_WRITE_ZEROES, offset_of!(C, unused1)).then(|| {
                WriteZeroesLimits {
                    max_sectors: u32::from_le(c.max_write_zeroes_sectors),
                    max_segments: u32::from_le(c.max_write_zeroes_seg),
                    may_unmap: c.write_zeroes_may_unmap != 0,
                }
            }),
            raw: raw.to_vec(),
        })
    }

    /// Disk size in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.saturating_mul(SECTOR_SIZE)
    }

    /// Logical block size: `blk_size` if offered, else the 512-byte sector.
    pub fn block_size(&self) -> u32 {
        self.blk_size.unwrap_or(SECTOR_SIZE as u32)
    }

    /// Offset of the `wce` (writeback) field, for `VHOST_USER_SET_CONFIG`.
    pub(crate) const WCE_OFFSET: u32 = offset_of!(virtio_blk_config, wce) as u32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_size_is_60() {
        assert_eq!(DEFAULT_CONFIG_SIZE, 60);
    }

    #[test]
    fn parse_gates_fields_on_features() {
        let mut raw = vec![0u8; DEFAULT_CONFIG_SIZE as usize];
        raw[0..8].copy_from_slice(&131072u64.to_le_bytes());
        raw[12..16].copy_from_slice(&126u32.to_le_bytes());
        raw[20..24].copy_from_slice(&4096u32.to_le_bytes());
        raw[32] = 1;
        raw[34..36].copy_from_slice(&2u16.to_le_bytes());
        raw[48..52].copy_from_slice(&32768u32.to_le_bytes());
        raw[56] = 1;

        let none = BlkConfig::parse(&raw, 0).expect("parse");
        assert_eq!(none.capacity, 131072);
        assert_eq!(none.capacity_bytes(), 64 << 20);
        assert_eq!(none.seg_max, None);
        assert_eq!(none.block_size(), 512);

        let features = (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        let all = BlkConfig::parse(&raw, features).expect("parse");
        assert_eq!(all.seg_max, Some(126));
        assert_eq!(all.block_size(), 4096);
        assert_eq!(all.writeback, Some(1));
        assert_eq!(all.num_queues, Some(2));
        assert_eq!(
            all.write_zeroes,
            Some(WriteZeroesLimits {
                max_sectors: 32768,
                max_segments: 0,
                may_unmap: true
            })
        );
        assert!(BlkConfig::parse(&raw[..4], features).is_none());
        // Fields beyond the bytes read are absent rather than garbage.
        let short = BlkConfig::parse(&raw[..24], features).expect("parse");
        assert_eq!(short.block_size(), 4096);
        assert_eq!(short.num_queues, None);
    }
}
