//! Server options, the feature bits the server offers and the virtio-blk
//! configuration space it reports.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, virtio_blk_config,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use std::mem::offset_of;
use std::time::Duration;

use vm_memory::ByteValued;

use super::ServerError;

/// Bytes per virtio-blk sector; request sectors are always in this unit.
pub const SECTOR_SIZE: u64 = 512;
/// `log2(SECTOR_SIZE)`.
pub const SECTOR_SHIFT: u32 = 9;

/// Largest number of request queues.
pub const MAX_QUEUES: u16 = 16;
/// Default number of request queues.
pub const DEFAULT_QUEUES: u16 = 4;
/// Smallest virtqueue size accepted: `seg_max` (queue size - 2) must stay positive.
pub const MIN_QUEUE_SIZE: u16 = 4;
/// Largest virtqueue size, the virtio limit QEMU enforces for `queue-size`.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Default largest virtqueue size; QEMU's default `queue-size` is 128.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// I/O helper threads per device by default (besides the queue workers).
pub const DEFAULT_IO_THREADS: usize = 2;
/// Most I/O helper threads per device.
pub const MAX_IO_THREADS: usize = 64;
/// Longest poll window by default, in microseconds. BENCHMARKS.md
/// (section 2, polling) measured it: at queue depth 1 it gains a little on
/// idle CPUs and about 1.5x with a busy loop on every CPU, where the
/// contention back-off keeps it from taking CPU the guest needs.
pub const DEFAULT_POLL_MAX_US: u32 = 50;
/// Longest poll window accepted, in microseconds.
pub const MAX_POLL_US: u32 = 1_000_000;

/// How long a new connection may take to ask for its features.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Logical block size reported to the guest.
pub const BLK_SIZE: u32 = SECTOR_SIZE as u32;
/// Physical blocks are `2^3` logical blocks: 4 KiB, the overlay's granularity.
pub const PHYSICAL_BLOCK_EXP: u8 = 3;
/// Minimum I/O size in logical blocks (4 KiB).
pub const MIN_IO_SIZE: u16 = 8;
/// Optimal I/O size in logical blocks; 0 means "not reported".
pub const OPT_IO_SIZE: u32 = 0;
/// Largest single data segment of a request.
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest discard, in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Discard segments per request.
pub const MAX_DISCARD_SEG: u32 = 1;
/// Discard alignment hint in sectors (4 KiB).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// Largest write-zeroes, in sectors (1 GiB).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 21;
/// Write-zeroes segments per request.
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;
/// Write-zeroes with the UNMAP flag may deallocate.
pub const WRITE_ZEROES_MAY_UNMAP: u8 = 1;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Offset of the `writeback` byte (`wce`), the one field the driver
/// may write.
pub const WRITEBACK_OFFSET: usize = offset_of!(virtio_blk_config, wce);

/// How the server presents the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// Number of request queues (`1..=MAX_QUEUES`), one worker thread each.
    pub queues: u16,
    /// Largest virtqueue the frontend may configure: a power of two up to
    /// 1024, at least QEMU's `queue-size` (128 by default).
    pub queue_size: u16,
    /// Present the disk read-only, whatever the device says.
    pub read_only: bool,
    /// Serial number returned by GET_ID: its first 20 bytes, zero padded.
    pub serial: String,
    /// Initial write cache mode: write back (guest flushes) when true,
    /// write through (every write flushed) when false. The guest may
    /// change it through the `writeback` config field.
    pub writeback: bool,
    /// A new connection whose frontend has not sent both GET_FEATURES and
    /// GET_PROTOCOL_FEATURES within this time is dropped, so that a client
    /// that connects and says nothing cannot hold the only connection slot.
    /// QEMU sends both right when it connects.
    pub handshake_timeout: Duration,
    /// I/O helper threads per device: with the queue workers, they run a
    /// queue's requests concurrently. 0: each request runs on its queue's
    /// worker.
    pub io_threads: usize,
    /// Longest window, in microseconds, a queue worker polls the available
    /// ring after a batch before sleeping on the kick; 0 disables polling.
    pub poll_max_us: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            queues: DEFAULT_QUEUES,
            queue_size: DEFAULT_QUEUE_SIZE,
            read_only: false,
            serial: String::new(),
            writeback: true,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            io_threads: DEFAULT_IO_THREADS,
            poll_max_us: DEFAULT_POLL_MAX_US,
        }
    }
}

impl ServerOptions {
    /// Checks the queue count and size, the handshake timeout, the I/O
    /// threads and the poll window.
    pub fn validate(&self) -> Result<(), ServerError> {
        if self.handshake_timeout.is_zero() {
            return Err(ServerError::HandshakeTimeout);
        }
        if self.io_threads > MAX_IO_THREADS {
            return Err(ServerError::IoThreads(self.io_threads));
        }
        if self.poll_max_us > MAX_POLL_US {
            return Err(ServerError::PollMax(self.poll_max_us));
        }
        if !(1..=MAX_QUEUES).contains(&self.queues) {
            return Err(ServerError::QueueCount(self.queues));
        }
        if !(MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&self.queue_size)
            || !self.queue_size.is_power_of_two()
        {
            return Err(ServerError::QueueSize(self.queue_size));
        }
        Ok(())
    }

    /// The GET_ID answer: the serial's first 20 bytes, zero padded.
    pub fn device_id(&self) -> [u8; ID_BYTES] {
        let mut id = [0u8; ID_BYTES];
        let serial = self.serial.as_bytes();
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial[..n]);
        id
    }

    /// Largest number of data segments per request: the queue size minus
    /// the header and status descriptors.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }
}

/// Virtio feature bits offered to the frontend.
pub fn virtio_features(read_only: bool) -> u64 {
    let mut features = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ]
    .iter()
    .fold(0u64, |acc, bit| acc | 1 << bit);
    if read_only {
        features |= 1 << VIRTIO_BLK_F_RO;
    }
    // QEMU's vhost-user-blk needs protocol feature negotiation (bit 30) for
    // the CONFIG and MQ protocol features below. LOG_ALL: the server logs
    // the guest pages it writes while a migration runs (`dirty_log`).
    features
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits()
}

/// vhost-user protocol features offered. QEMU requires CONFIG (GET_CONFIG)
/// and MQ (GET_QUEUE_NUM), and LOG_SHMFD (the dirty log as a shared memory
/// file) with LOG_ALL to migrate or save a VM. Inflight tracking, status
/// and packed rings are not implemented and must not be offered.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// The virtio-blk configuration space: the bindings' `virtio_blk_config`,
/// every field little endian.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(transparent)]
pub struct ConfigSpace(virtio_blk_config);

// SAFETY: `virtio_blk_config` is `repr(C, packed)` and made of integers and
// byte arrays only: it has no padding and every bit pattern is valid.
unsafe impl ByteValued for ConfigSpace {}

impl ConfigSpace {
    /// The configuration for a disk of `capacity` sectors.
    pub fn new(capacity: u64, opts: &ServerOptions, writeback: bool) -> Self {
        // Geometry and the secure erase and zoned fields stay zero: their
        // features are not offered.
        ConfigSpace(virtio_blk_config {
            capacity: capacity.to_le(),
            size_max: SIZE_MAX.to_le(),
            seg_max: opts.seg_max().to_le(),
            blk_size: BLK_SIZE.to_le(),
            physical_block_exp: PHYSICAL_BLOCK_EXP,
            alignment_offset: 0,
            min_io_size: MIN_IO_SIZE.to_le(),
            opt_io_size: OPT_IO_SIZE.to_le(),
            wce: u8::from(writeback),
            num_queues: opts.queues.to_le(),
            max_discard_sectors: MAX_DISCARD_SECTORS.to_le(),
            max_discard_seg: MAX_DISCARD_SEG.to_le(),
            discard_sector_alignment: DISCARD_SECTOR_ALIGNMENT.to_le(),
            max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS.to_le(),
            max_write_zeroes_seg: MAX_WRITE_ZEROES_SEG.to_le(),
            write_zeroes_may_unmap: WRITE_ZEROES_MAY_UNMAP,
            ..virtio_blk_config::default()
        })
    }

    /// Sets the `writeback` byte.
    pub fn set_writeback(&mut self, writeback: bool) {
        self.0.wce = u8::from(writeback);
    }

    /// Exactly `size` bytes from `offset`, zero past the end of the
    /// structure: QEMU asks for sizes that depend on its own version and
    /// flags and drops the connection on a short answer.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.as_slice();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(bytes.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(bytes.len());
        out[..end - start].copy_from_slice(&bytes[start..end]);
        out
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_blk::virtio_blk_config_virtio_blk_geometry as Geometry;

    use super::*;

    #[test]
    fn encoding_matches_virtio_bindings_struct() {
        let opts = ServerOptions {
            queues: 3,
            queue_size: 128,
            ..ServerOptions::default()
        };
        let capacity = 0x0102_0304_0506_0708;
        let space = ConfigSpace::new(capacity, &opts, true);
        let expected = virtio_blk_config {
            capacity: capacity.to_le(),
            size_max: SIZE_MAX.to_le(),
            seg_max: 126u32.to_le(),
            geometry: Geometry::default(),
            blk_size: 512u32.to_le(),
            physical_block_exp: 3,
            alignment_offset: 0,
            min_io_size: 8u16.to_le(),
            opt_io_size: 0,
            wce: 1,
            num_queues: 3u16.to_le(),
            max_discard_sectors: MAX_DISCARD_SECTORS.to_le(),
            max_discard_seg: 1u32.to_le(),
            discard_sector_alignment: 8u32.to_le(),
            max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS.to_le(),
            max_write_zeroes_seg: 1u32.to_le(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        assert_eq!(space.as_slice(), ConfigSpace(expected).as_slice());
        // The whole virtio 1.2 structure, secure erase and zoned fields too.
        assert_eq!(space.as_slice().len(), 96);
        // Little endian on the wire, whatever the host.
        assert_eq!(space.read(0, 8), capacity.to_le_bytes());
        assert_eq!(space.read(WRITEBACK_OFFSET as u32 + 2, 2), [3, 0]);
    }

    #[test]
    fn read_is_exactly_the_requested_size() {
        let space = ConfigSpace::new(2048, &ServerOptions::default(), false);
        for size in [36, 48, 57, 60, 96, 128] {
            let bytes = space.read(0, size);
            assert_eq!(bytes.len(), size as usize);
            assert_eq!(bytes[..8], 2048u64.to_le_bytes());
        }
        assert!(space.read(96, 32).iter().all(|&b| b == 0));
        assert_eq!(
            space.read(offset_of!(virtio_blk_config, num_queues) as u32, 2),
            [4, 0]
        );
        assert_eq!(space.read(WRITEBACK_OFFSET as u32, 1), [0]);
        assert_eq!(space.read(u32::MAX, 4), [0; 4]);
    }

    #[test]
    fn options_validation() {
        ServerOptions::default().validate().unwrap();
        let bad = |queues, queue_size| {
            ServerOptions {
                queues,
                queue_size,
                ..ServerOptions::default()
            }
            .validate()
            .unwrap_err()
        };
        assert!(matches!(bad(0, 256), ServerError::QueueCount(0)));
        assert!(matches!(bad(17, 256), ServerError::QueueCount(17)));
        assert!(matches!(bad(4, 100), ServerError::QueueSize(100)));
        assert!(matches!(bad(4, 2048), ServerError::QueueSize(2048)));
        assert!(matches!(bad(4, 2), ServerError::QueueSize(2)));
        let threads = ServerOptions {
            io_threads: MAX_IO_THREADS + 1,
            ..ServerOptions::default()
        };
        assert!(matches!(
            threads.validate(),
            Err(ServerError::IoThreads(65))
        ));
        let poll = ServerOptions {
            poll_max_us: MAX_POLL_US + 1,
            ..ServerOptions::default()
        };
        assert!(matches!(poll.validate(), Err(ServerError::PollMax(_))));
        ServerOptions {
            queues: 16,
            queue_size: 1024,
            ..ServerOptions::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn device_id_is_truncated_and_padded() {
        let mut opts = ServerOptions {
            serial: "node-1".into(),
            ..ServerOptions::default()
        };
        assert_eq!(&opts.device_id()[..7], b"node-1\0");
        opts.serial = "0123456789abcdefghijKLMN".into();
        assert_eq!(&opts.device_id(), b"0123456789abcdefghij");
    }

    #[test]
    fn feature_bits() {
        let rw = virtio_features(false);
        assert_ne!(rw & 1 << VIRTIO_F_VERSION_1, 0);
        assert_ne!(rw & 1 << 30, 0, "protocol features bit");
        assert_ne!(rw & 1 << 26, 0, "VHOST_F_LOG_ALL");
        assert_eq!(rw & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(virtio_features(true) & 1 << VIRTIO_BLK_F_RO, 0);
        let proto = protocol_features();
        assert!(proto.contains(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::LOG_SHMFD
        ));
        for unsupported in [
            VhostUserProtocolFeatures::INFLIGHT_SHMFD,
            VhostUserProtocolFeatures::STATUS,
        ] {
            assert!(!proto.intersects(unsupported));
        }
    }
}
