//! Arbitrary descriptor tables, available rings and guest memory contents,
//! run through the request executor the way a queue worker does: pop each
//! available chain, process it against an in-memory disk, add it to the
//! used ring.
//!
//! Input layout (missing bytes read as zero):
//!
//! ```text
//! byte 0   bit 0 read-only context, bit 1 write-through, bit 2 read-only
//!          device, bits 3-4 second memory region (none, adjacent, after a
//!          gap, overlapping the end of the first), bits 5-7 faults to inject
//! byte 1   queue size 2^(1 + b % 5) (2..32), number of available heads
//!          (b >> 4, at most the queue size); bit 3 also enforces a
//!          size_max of MAX_LEN / 4 (a driver that negotiated SIZE_MAX)
//! then     per available head: u16 head index (taken as is: may be out of
//!          range)
//! then     per descriptor (queue size of them): u64 address, u32 length,
//!          u16 flags, u16 next; an address or length with its top bit clear
//!          is folded into guest memory (MEM_SPAN, MAX_LEN), otherwise taken
//!          as is (outside memory, overflowing)
//! rest     guest memory contents from BUFFERS: headers, segments, data,
//!          indirect descriptor tables
//! ```

#![no_main]

use libfuzzer_sys::fuzz_target;
use ociblk_server::device::BlockDevice as _;
use ociblk_server::MemDisk;
use ociblk_server::config::ID_BYTES;
use ociblk_server::request::{GuestMemoryMmap, Outcome, RequestContext, process_request};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT as _};
use vm_memory::{Bytes as _, GuestAddress};

/// The queue (descriptor table, rings) lives below this address.
const BUFFERS: u64 = 0x1000;
const REGION: usize = 0x1_0000;
/// Folded addresses fall in here: both regions and the gap between them.
const MEM_SPAN: u64 = 0x3_0000;
/// Folded lengths are below this.
const MAX_LEN: u32 = 0x8000;
const DISK_SECTORS: u64 = 64;
const ID: &[u8; ID_BYTES] = b"ociblk-fuzz-serial\0\0";

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
}

fn memory(layout: u8) -> GuestMemoryMmap {
    let first = (GuestAddress(0), REGION);
    let ranges: &[(GuestAddress, usize)] = match layout % 4 {
        0 => &[first],
        1 => &[first, (GuestAddress(REGION as u64), REGION)],
        2 => &[first, (GuestAddress(2 * REGION as u64), REGION)],
        // Refused by vm-memory (overlapping regions); falls back below.
        _ => &[first, (GuestAddress(REGION as u64 / 2), REGION)],
    };
    GuestMemoryMmap::from_ranges(ranges)
        .or_else(|_| GuestMemoryMmap::from_ranges(&[first]))
        .expect("map guest memory")
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let cfg = input.byte();
    let sizes = input.byte();
    let queue_size = 2u16 << (sizes % 5);
    let heads = u16::from(sizes >> 4).min(queue_size);

    let mem = memory(cfg >> 3);
    let mock = MockSplitQueue::new(&mem, queue_size);
    assert!(
        mock.end().0 <= BUFFERS,
        "the queue must fit below the buffers"
    );

    let avail: Vec<u16> = (0..heads).map(|_| input.u16()).collect();
    for i in 0..queue_size {
        let mut addr = input.u64();
        if addr >> 63 == 0 {
            addr %= MEM_SPAN;
        }
        let mut len = input.u32();
        if len >> 31 == 0 {
            len %= MAX_LEN;
        }
        let flags = input.u16();
        let next = input.u16();
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        mock.desc_table()
            .store(i, desc)
            .expect("store a descriptor");
    }
    for (i, &head) in avail.iter().enumerate() {
        mock.avail()
            .ring()
            .ref_at(i)
            .expect("avail ring entry")
            .store(head.to_le());
    }
    mock.avail().idx().store(heads.to_le());
    // Guest memory contents: whatever is left, from the buffer area on.
    let contents = &input.0[..input.0.len().min(REGION - BUFFERS as usize)];
    mem.write_slice(contents, GuestAddress(BUFFERS))
        .expect("fill guest memory");

    let disk = MemDisk::from_bytes(
        (0..DISK_SECTORS * 512)
            .map(|i| (i / 512) as u8 ^ (i % 7) as u8)
            .collect(),
    )
    .with_read_only(cfg & 4 != 0);
    disk.fail_next(u32::from(cfg >> 5));
    let ctx = RequestContext {
        device: &disk,
        queue: 0,
        read_only: cfg & 1 != 0,
        writeback: cfg & 2 == 0,
        device_id: ID,
        size_max: (sizes & 8 != 0).then_some(MAX_LEN / 4),
    };
    let before = disk.contents(0, (DISK_SECTORS * 512) as usize);

    let mut queue: Queue = mock.create_queue().expect("create the queue");
    // Requests may write guest memory anywhere, the available ring
    // included, and so make more chains available as they run: a busy guest,
    // not a server bug. Bound the drain so such an input cannot spin.
    for _ in 0..4 * queue_size {
        let Some(chain) = queue.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        // What the chain offers the device to write: the used length may not
        // exceed it (virtio 1.2, 2.7.8.2).
        let writable: u64 = chain
            .clone()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum();
        // A request that waits for a flush completes after one runs here,
        // as the server's flush thread does.
        let done = match process_request(&mem, chain, &ctx) {
            Outcome::Complete(done) => done,
            Outcome::AfterFlush(pending) => pending.complete(&mem, &disk.flush()),
        };
        assert_eq!(
            done.status.is_none(),
            done.used_len == 0,
            "a request without a status byte reports nothing, any other reports its status byte"
        );
        assert!(
            u64::from(done.used_len) <= writable,
            "used length {} exceeds the {writable} device-writable bytes",
            done.used_len
        );
        // The used ring may be out of memory or full: an error, not a panic.
        let _ = queue.add_used(&mem, head, done.used_len);
    }

    if ctx.read_only || disk.read_only() {
        assert_eq!(
            disk.contents(0, before.len()),
            before,
            "a read-only disk was changed"
        );
    }
});
