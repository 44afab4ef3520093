//! One virtio-blk request (virtio 1.2, 5.2.6): map its descriptor chain,
//! check it, run it against the device and write the status byte.
//!
//! A request is a 16-byte header (type, reserved, sector), device-readable
//! data (writes, discard segments), device-writable data (reads, GET_ID)
//! and a final device-writable status byte. Data goes straight between the
//! device and guest memory: the chain's buffers become an [`IoBufs`]
//! scatter list over the guest's mapping.
//!
//! A request that must be durable before it completes (FLUSH, and every
//! write in write-through mode) does its data part here and comes back as
//! [`Outcome::AfterFlush`]: the caller runs the device flush (the server
//! hands it to the device's flush thread) and then completes it with
//! [`PendingFlush::complete`].

use std::fmt;
use std::io;
use std::ops::Deref;

use ociblk_io::iobuf::IoBufs;
use tracing::{error, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, virtio_blk_discard_write_zeroes,
    virtio_blk_outhdr,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

use super::config::{
    ID_BYTES, MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, SECTOR_SHIFT, SECTOR_SIZE,
};
use super::dirty_log::{LogBitmap, mark_written};
use crate::device::BlockDevice;

/// Guest memory as the server maps it, with the dirty page log of a
/// migration ([`LogBitmap`]).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<LogBitmap>;

/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_SIZE: usize = size_of::<virtio_blk_outhdr>();
/// Size of `struct virtio_blk_discard_write_zeroes`.
pub const SEGMENT_SIZE: usize = size_of::<virtio_blk_discard_write_zeroes>();

/// Status byte values, narrowed from the bindings' `u32` constants.
const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The request types the server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

impl fmt::Display for RequestType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestType::In => f.write_str("IN"),
            RequestType::Out => f.write_str("OUT"),
            RequestType::Flush => f.write_str("FLUSH"),
            RequestType::GetId => f.write_str("GET_ID"),
            RequestType::Discard => f.write_str("DISCARD"),
            RequestType::WriteZeroes => f.write_str("WRITE_ZEROES"),
            RequestType::Unsupported(t) => write!(f, "type {t}"),
        }
    }
}

/// What executing a request needs besides its descriptor chain.
#[derive(Clone, Copy)]
pub struct RequestContext<'a> {
    pub device: &'a dyn BlockDevice,
    /// Queue index, for log lines.
    pub queue: u16,
    /// Refuse writes, discards and write-zeroes.
    pub read_only: bool,
    /// Write-back cache mode; in write-through mode every write is flushed.
    pub writeback: bool,
    /// The GET_ID answer.
    pub device_id: &'a [u8; ID_BYTES],
    /// Largest descriptor accepted: `size_max` when the driver negotiated
    /// VIRTIO_BLK_F_SIZE_MAX (and so promised to respect it), else none.
    pub size_max: Option<u32>,
}

impl fmt::Debug for RequestContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestContext")
            .field("queue", &self.queue)
            .field("read_only", &self.read_only)
            .field("writeback", &self.writeback)
            .finish_non_exhaustive()
    }
}

/// The result of one request, for the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Status byte written, or `None` when the chain had nowhere to put it.
    pub status: Option<u8>,
    /// Bytes written into the chain's buffers: data plus status byte.
    pub used_len: u32,
}

impl Completion {
    /// Whether the request completed with VIRTIO_BLK_S_OK.
    pub fn is_ok(&self) -> bool {
        self.status == Some(STATUS_OK)
    }
}

/// What [`process_request`] leaves to do.
#[derive(Debug)]
pub enum Outcome {
    /// The request is finished and its status byte written.
    Complete(Completion),
    /// The request's data part succeeded; it completes once a device flush
    /// that started after this point has succeeded (FLUSH, or a write in
    /// write-through mode).
    AfterFlush(PendingFlush),
}

/// A request waiting for a device flush; see [`Outcome::AfterFlush`].
#[derive(Debug)]
pub struct PendingFlush {
    /// Guest address of the status byte.
    status_addr: GuestAddress,
    /// Data bytes already written into the guest's buffers.
    written: usize,
    request: RequestType,
    sector: u64,
    queue: u16,
}

impl PendingFlush {
    /// Writes the status byte for the flush's `result` and returns what goes
    /// into the used ring. `mem` must be the guest memory the request was
    /// processed with.
    pub fn complete(self, mem: &GuestMemoryMmap, result: &io::Result<()>) -> Completion {
        let status = match result {
            Ok(()) => STATUS_OK,
            Err(e) => {
                error!(
                    queue = self.queue,
                    request = %self.request,
                    sector = self.sector,
                    "device flush failed: {e}"
                );
                STATUS_IOERR
            }
        };
        if let Err(e) = mem.write_slice(&[status], self.status_addr) {
            // Only with memory other than the map the chain was checked
            // against, where the status address was valid.
            warn!(
                queue = self.queue,
                "cannot write the status byte at {:#x}: {e}", self.status_addr.0
            );
            return Completion {
                status: None,
                used_len: 0,
            };
        }
        let written = if status == STATUS_OK { self.written } else { 0 };
        Completion {
            status: Some(status),
            used_len: u32::try_from(written).unwrap_or(u32::MAX).saturating_add(1),
        }
    }
}

/// Why a request failed; each case maps to the status byte the guest gets.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("request header is {len} bytes, expected {HEADER_SIZE}")]
    ShortHeader { len: usize },
    #[error("a descriptor of {len} bytes exceeds size_max ({max} bytes)")]
    SizeMax { len: u32, max: u32 },
    #[error("{len} bytes of {direction} data in the wrong direction")]
    WrongDirection { len: usize, direction: &'static str },
    #[error("data length {len} is not a multiple of {SECTOR_SIZE}")]
    Unaligned { len: usize },
    /// Past the end of the disk, or a sector whose byte offset overflows.
    #[error("{len} bytes at sector {sector} go past the end of the disk ({disk_sectors} sectors)")]
    OutOfRange {
        sector: u64,
        len: u64,
        disk_sectors: u64,
    },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("GET_ID buffer of {len} bytes, needs {ID_BYTES}")]
    IdBufferTooSmall { len: usize },
    #[error("{len} bytes of segments, expected exactly one {SEGMENT_SIZE}-byte segment")]
    BadSegments { len: usize },
    #[error("segment of {sectors} sectors exceeds the maximum of {max}")]
    SegmentTooLarge { sectors: u32, max: u32 },
    /// Virtio 1.2, 5.2.6.2: unknown flags, and UNMAP on a discard, are
    /// UNSUPP.
    #[error("segment flags {flags:#x} not supported")]
    UnsupportedFlags { flags: u32 },
    #[error("unknown request type {0}")]
    UnknownType(u32),
    #[error("device I/O error: {0}")]
    Device(#[source] io::Error),
    #[error("the request panicked: {0}")]
    Panic(String),
}

impl Failure {
    fn status(&self) -> u8 {
        match self {
            Failure::UnsupportedFlags { .. } | Failure::UnknownType(_) => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// A wire struct of the bindings, read from guest buffers as raw bytes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct Wire<T>(T);

// SAFETY: both structs are `repr(C)` integers with no padding (the
// bindings assert their sizes and offsets), so every bit pattern is valid.
unsafe impl ByteValued for Wire<virtio_blk_outhdr> {}
// SAFETY: as above.
unsafe impl ByteValued for Wire<virtio_blk_discard_write_zeroes> {}

impl<T> Wire<T>
where
    Wire<T>: ByteValued + Default,
{
    /// Reads the struct from `bufs` at byte `at`; the caller checked that
    /// it fits.
    fn read(bufs: &IoBufs<'_>, at: usize) -> T {
        let mut wire = Wire::<T>::default();
        bufs.copy_to(at, wire.as_mut_slice());
        wire.0
    }
}

/// The request header (`struct virtio_blk_outhdr`), decoded.
#[derive(Debug, Clone, Copy)]
struct Header {
    request_type: RequestType,
    sector: u64,
}

impl From<virtio_blk_outhdr> for Header {
    fn from(raw: virtio_blk_outhdr) -> Self {
        // `ioprio` is ignored.
        Header {
            request_type: RequestType::from(u32::from_le(raw.type_)),
            sector: u64::from_le(raw.sector),
        }
    }
}

/// One discard or write-zeroes segment
/// (`struct virtio_blk_discard_write_zeroes`), decoded.
#[derive(Debug, Clone, Copy)]
struct Segment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

impl From<virtio_blk_discard_write_zeroes> for Segment {
    fn from(raw: virtio_blk_discard_write_zeroes) -> Self {
        Segment {
            sector: u64::from_le(raw.sector),
            num_sectors: u32::from_le(raw.num_sectors),
            flags: u32::from_le(raw.flags),
        }
    }
}

/// The chain's buffers as host memory, split by direction.
struct ChainBuffers<'m> {
    /// Device-readable bytes, in chain order: header then data.
    readable: IoBufs<'m>,
    /// Device-writable bytes, in chain order: data then status.
    writable: IoBufs<'m>,
    /// Length of the chain's longest descriptor.
    longest: u32,
    /// Guest address of the last device-writable byte (the status byte).
    last_writable: Option<GuestAddress>,
    /// The device-writable descriptors as guest ranges, for the dirty log.
    writable_ranges: Vec<(GuestAddress, u32)>,
}

/// Translates every descriptor of `chain` into host ranges of `mem`,
/// splitting descriptors that cross memory regions. Returns the guest
/// address of the first descriptor that is not backed by `mem`.
fn map_chain<'m, M>(
    mem: &'m GuestMemoryMmap,
    chain: DescriptorChain<M>,
) -> Result<ChainBuffers<'m>, u64>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut longest = 0;
    let mut last_writable = None;
    let mut writable_ranges = Vec::new();
    for desc in chain {
        longest = longest.max(desc.len());
        let ranges = if desc.is_write_only() {
            if let Some(last) = desc.len().checked_sub(1) {
                last_writable = desc.addr().checked_add(u64::from(last));
            }
            writable_ranges.push((desc.addr(), desc.len()));
            &mut writable
        } else {
            &mut readable
        };
        let slices = GuestMemoryBackend::get_slices(mem, desc.addr(), desc.len() as usize);
        for slice in slices {
            let slice = slice.map_err(|_| desc.addr().0)?;
            // Without the `xen` feature the guard is a plain pointer into the
            // region's mapping; the mapping lives as long as `mem`.
            ranges.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
        }
    }
    // SAFETY: every range lies within a guest memory region of `mem`, mapped
    // readable and writable (vhost-user maps guest memory shared, read-write)
    // for as long as `mem` is borrowed, which bounds 'm. The guest may change
    // the memory at any time; IoBufs only touches it through raw copies and
    // syscalls.
    let (readable, writable) = unsafe { (IoBufs::from_raw(readable), IoBufs::from_raw(writable)) };
    Ok(ChainBuffers {
        readable,
        writable,
        longest,
        last_writable,
        writable_ranges,
    })
}

/// The bytes `[start, start + len)` of `bufs` as their own list.
fn sub_bufs<'m>(bufs: &IoBufs<'m>, start: usize, len: usize) -> IoBufs<'m> {
    let ranges = bufs
        .iovecs(start, len)
        .into_iter()
        .map(|v| (v.iov_base.cast::<u8>(), v.iov_len));
    // SAFETY: the iovecs are pieces of `bufs`' ranges, which are valid for
    // reads and writes for 'm.
    unsafe { IoBufs::from_raw(ranges) }
}

/// Processes the request in `chain`: runs it and, unless it must wait for
/// a device flush ([`Outcome::AfterFlush`]), writes its status byte and
/// returns what goes into the used ring. Never fails: malformed requests
/// get an error status (and a log line), device errors get IOERR.
pub fn process_request<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    ctx: &RequestContext<'_>,
) -> Outcome
where
    M: Deref,
    M::Target: GuestMemory,
{
    process(mem, chain, ctx).0
}

/// [`process_request`], also returning why the request failed.
fn process<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    ctx: &RequestContext<'_>,
) -> (Outcome, Option<Failure>)
where
    M: Deref,
    M::Target: GuestMemory,
{
    const DROPPED: Outcome = Outcome::Complete(Completion {
        status: None,
        used_len: 0,
    });
    let head = chain.head_index();
    let bufs = match map_chain(mem, chain) {
        Ok(bufs) => bufs,
        Err(addr) => {
            warn!(
                queue = ctx.queue,
                head, "dropping request: descriptor address {addr:#x} is outside guest memory"
            );
            return (DROPPED, None);
        }
    };
    // The status byte is the last device-writable byte.
    let (Some(status_at), Some(status_addr)) =
        (bufs.writable.len().checked_sub(1), bufs.last_writable)
    else {
        warn!(
            queue = ctx.queue,
            head, "dropping request: no device-writable status byte"
        );
        return (DROPPED, None);
    };

    let result = if bufs.readable.len() < HEADER_SIZE {
        let len = bufs.readable.len();
        Err((None, Failure::ShortHeader { len }))
    } else {
        let header = Header::from(Wire::<virtio_blk_outhdr>::read(&bufs.readable, 0));
        // A panic below (in the device, a verifier, a registry fetch) is a
        // bug behind this one request: it fails with IOERR, and the thread
        // that ran it goes on serving.
        let executed = catch_panic(|| execute(&header, &bufs, status_at, ctx))
            .unwrap_or_else(|message| Err(Failure::Panic(message)));
        match executed {
            Ok(Executed {
                written,
                flush: true,
            }) => {
                // The data part is done; the status byte, written later
                // through vm-memory, is logged there.
                mark_written(mem, &bufs.writable_ranges);
                let pending = PendingFlush {
                    status_addr,
                    written,
                    request: header.request_type,
                    sector: header.sector,
                    queue: ctx.queue,
                };
                return (Outcome::AfterFlush(pending), None);
            }
            Ok(Executed {
                written,
                flush: false,
            }) => Ok(written),
            Err(failure) => Err((Some(header), failure)),
        }
    };
    let (status, written, failure) = match result {
        Ok(written) => (STATUS_OK, written, None),
        Err((header, failure)) => {
            log_failure(head, header.as_ref(), &failure, ctx);
            (failure.status(), 0, Some(failure))
        }
    };
    bufs.writable.copy_from(status_at, &[status]);
    // Data and status are in place: log them before the caller publishes.
    mark_written(mem, &bufs.writable_ranges);
    let done = Outcome::Complete(Completion {
        status: Some(status),
        // Chains are limited to 4 GiB in total, so this saturates only for
        // broken chains.
        used_len: u32::try_from(written).unwrap_or(u32::MAX).saturating_add(1),
    });
    (done, failure)
}

/// Processes the request in `chain` to the end, running a flush it needs
/// on the calling thread.
#[cfg(test)]
pub fn process_request_now<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    ctx: &RequestContext<'_>,
) -> Completion
where
    M: Deref,
    M::Target: GuestMemory,
{
    complete_now(mem, process_request(mem, chain, ctx), ctx)
}

/// Completes `outcome`, running the flush it waits for on this thread.
#[cfg(test)]
fn complete_now(mem: &GuestMemoryMmap, outcome: Outcome, ctx: &RequestContext<'_>) -> Completion {
    match outcome {
        Outcome::Complete(done) => done,
        Outcome::AfterFlush(pending) => pending.complete(mem, &ctx.device.flush()),
    }
}

/// Runs `f`, returning a panic's message instead of unwinding further.
///
/// For the request paths of the server: a panic there fails one request
/// (or one flush) and the server keeps serving. Whatever the panicking code
/// held is left as it was; the locks on those paths recover from poisoning,
/// and the request's buffers are the guest's to judge by its status.
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "(no message)".to_owned()
        }
    })
}

/// What a request's data part did.
struct Executed {
    /// Data bytes written into the guest's buffers (status byte excluded).
    written: usize,
    /// The request completes only after a device flush.
    flush: bool,
}

impl Executed {
    fn done(written: usize) -> Self {
        Executed {
            written,
            flush: false,
        }
    }
}

fn log_failure(head: u16, header: Option<&Header>, failure: &Failure, ctx: &RequestContext<'_>) {
    let queue = ctx.queue;
    match (header, failure) {
        (None, _) => warn!(queue, head, "rejected request: {failure}"),
        (Some(h), Failure::Device(e)) => {
            let (request, sector) = (h.request_type, h.sector);
            error!(queue, head, %request, sector, "device I/O error: {e}");
        }
        (Some(h), Failure::Panic(message)) => {
            let (request, sector) = (h.request_type, h.sector);
            error!(queue, head, %request, sector, "request failed with IOERR: it panicked: {message}");
        }
        (Some(h), _) => {
            let (request, sector) = (h.request_type, h.sector);
            warn!(queue, head, %request, sector, "rejected request: {failure}");
        }
    }
}

/// Runs the data part of a request whose header is `header`.
fn execute(
    header: &Header,
    bufs: &ChainBuffers<'_>,
    status_at: usize,
    ctx: &RequestContext<'_>,
) -> Result<Executed, Failure> {
    if let Some(max) = ctx.size_max
        && bufs.longest > max
    {
        return Err(Failure::SizeMax {
            len: bufs.longest,
            max,
        });
    }
    // Data the device reads (after the header) and writes (before the status).
    let out_len = bufs.readable.len() - HEADER_SIZE;
    let in_len = status_at;
    let device = ctx.device;

    match header.request_type {
        RequestType::In => {
            expect_no_data(out_len, "device-readable")?;
            let offset = data_range(header.sector, in_len, device.size())?;
            let dst = sub_bufs(&bufs.writable, 0, in_len);
            device.read(offset, &dst).map_err(Failure::Device)?;
            Ok(Executed::done(in_len))
        }
        RequestType::Out => {
            refuse_if_read_only(ctx)?;
            expect_no_data(in_len, "device-writable")?;
            let offset = data_range(header.sector, out_len, device.size())?;
            let src = sub_bufs(&bufs.readable, HEADER_SIZE, out_len);
            device.write(offset, &src).map_err(Failure::Device)?;
            Ok(write_through(ctx))
        }
        RequestType::Flush => Ok(Executed {
            written: 0,
            flush: true,
        }),
        RequestType::GetId => {
            expect_no_data(out_len, "device-readable")?;
            if in_len < ID_BYTES {
                return Err(Failure::IdBufferTooSmall { len: in_len });
            }
            bufs.writable.copy_from(0, ctx.device_id);
            Ok(Executed::done(ID_BYTES))
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            refuse_if_read_only(ctx)?;
            expect_no_data(in_len, "device-writable")?;
            if out_len != SEGMENT_SIZE {
                return Err(Failure::BadSegments { len: out_len });
            }
            let segment = Segment::from(Wire::<virtio_blk_discard_write_zeroes>::read(
                &bufs.readable,
                HEADER_SIZE,
            ));
            discard_or_write_zeroes(header.request_type, &segment, ctx)?;
            Ok(write_through(ctx))
        }
        RequestType::Unsupported(t) => Err(Failure::UnknownType(t)),
    }
}

fn discard_or_write_zeroes(
    request_type: RequestType,
    segment: &Segment,
    ctx: &RequestContext<'_>,
) -> Result<(), Failure> {
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let (max_sectors, allowed_flags) = match request_type {
        RequestType::Discard => (MAX_DISCARD_SECTORS, 0),
        _ => (MAX_WRITE_ZEROES_SECTORS, unmap),
    };
    // Virtio 1.2, 5.2.6.2: unknown flags, and UNMAP on a discard, are UNSUPP.
    if segment.flags & !allowed_flags != 0 {
        return Err(Failure::UnsupportedFlags {
            flags: segment.flags,
        });
    }
    if segment.num_sectors > max_sectors {
        return Err(Failure::SegmentTooLarge {
            sectors: segment.num_sectors,
            max: max_sectors,
        });
    }
    let len = u64::from(segment.num_sectors) << SECTOR_SHIFT;
    let offset = byte_range(segment.sector, len, ctx.device.size())?;
    if len == 0 {
        return Ok(());
    }
    let result = if request_type == RequestType::Discard || segment.flags & unmap != 0 {
        // Discarded ranges read back as zeros, so UNMAP may deallocate.
        ctx.device.discard(offset, len)
    } else {
        ctx.device.write_zeroes(offset, len)
    };
    result.map_err(Failure::Device)
}

fn refuse_if_read_only(ctx: &RequestContext<'_>) -> Result<(), Failure> {
    if ctx.read_only {
        return Err(Failure::ReadOnly);
    }
    Ok(())
}

/// A finished write: in write-through mode it completes after a flush.
fn write_through(ctx: &RequestContext<'_>) -> Executed {
    Executed {
        written: 0,
        flush: !ctx.writeback,
    }
}

fn expect_no_data(len: usize, direction: &'static str) -> Result<(), Failure> {
    if len != 0 {
        return Err(Failure::WrongDirection { len, direction });
    }
    Ok(())
}

/// Checks a read or write of `len` bytes at `sector` and returns its byte offset.
fn data_range(sector: u64, len: usize, size: u64) -> Result<u64, Failure> {
    if !(len as u64).is_multiple_of(SECTOR_SIZE) {
        return Err(Failure::Unaligned { len });
    }
    byte_range(sector, len as u64, size)
}

/// Checks that `len` bytes from `sector` lie within a disk of `size` bytes
/// and returns the byte offset of `sector`.
fn byte_range(sector: u64, len: u64, size: u64) -> Result<u64, Failure> {
    match sector.checked_mul(SECTOR_SIZE) {
        Some(offset) if offset.checked_add(len).is_some_and(|end| end <= size) => Ok(offset),
        _ => Err(Failure::OutOfRange {
            sector,
            len,
            disk_sectors: size / SECTOR_SIZE,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::mem_disk::MemDisk;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const DISK_SECTORS: u64 = 64;
    const HEADER_ADDR: u64 = 0x1000;
    const DATA_ADDR: u64 = 0x2000;
    const STATUS_ADDR: u64 = 0xf000;
    const ID: &[u8; ID_BYTES] = b"ociblk-test-serial\0\0";

    /// One descriptor: guest address, length, device-writable.
    #[derive(Clone, Copy)]
    struct D(u64, u32, bool);

    fn readable(addr: u64, len: u32) -> D {
        D(addr, len, false)
    }

    fn writable(addr: u64, len: u32) -> D {
        D(addr, len, true)
    }

    fn header() -> D {
        readable(HEADER_ADDR, HEADER_SIZE as u32)
    }

    fn status() -> D {
        writable(STATUS_ADDR, 1)
    }

    struct Harness {
        mem: GuestMemoryMmap,
        disk: Arc<MemDisk>,
        read_only: bool,
        writeback: bool,
        size_max: Option<u32>,
    }

    impl Harness {
        fn new() -> Self {
            Self::with_memory(&[(GuestAddress(0), 0x10_0000)])
        }

        fn with_memory(ranges: &[(GuestAddress, usize)]) -> Self {
            let disk = MemDisk::from_bytes(
                (0..DISK_SECTORS * SECTOR_SIZE)
                    .map(|i| (i / SECTOR_SIZE) as u8)
                    .collect(),
            );
            Harness {
                mem: GuestMemoryMmap::from_ranges(ranges).unwrap(),
                disk: Arc::new(disk),
                read_only: false,
                writeback: true,
                size_max: None,
            }
        }

        fn header(&self, request_type: u32, sector: u64) {
            let header = virtio_blk_outhdr {
                type_: request_type.to_le(),
                ioprio: 0,
                sector: sector.to_le(),
            };
            self.mem
                .write_obj(Wire(header), GuestAddress(HEADER_ADDR))
                .unwrap();
        }

        fn segment(&self, addr: u64, sector: u64, num_sectors: u32, flags: u32) {
            let segment = virtio_blk_discard_write_zeroes {
                sector: sector.to_le(),
                num_sectors: num_sectors.to_le(),
                flags: flags.to_le(),
            };
            self.mem
                .write_obj(Wire(segment), GuestAddress(addr))
                .unwrap();
        }

        fn write(&self, addr: u64, bytes: &[u8]) {
            self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut out = vec![0u8; len];
            self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
            out
        }

        fn run(&self, descs: &[D]) -> Completion {
            self.process(descs).0
        }

        fn process(&self, descs: &[D]) -> (Completion, Option<Failure>) {
            // Poison the status byte so a missing write shows.
            self.write(STATUS_ADDR, &[0xff]);
            let queue = MockSplitQueue::new(&self.mem, 16);
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .map(|&D(addr, len, w)| {
                    let flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
                })
                .collect();
            let chain = queue.build_desc_chain(&raw).unwrap();
            let ctx = RequestContext {
                device: &*self.disk,
                queue: 0,
                read_only: self.read_only,
                writeback: self.writeback,
                device_id: ID,
                size_max: self.size_max,
            };
            let (outcome, failure) = process(&self.mem, chain, &ctx);
            (complete_now(&self.mem, outcome, &ctx), failure)
        }
    }

    /// Runs a request that must fail: checks its completion and which
    /// failure fired.
    macro_rules! assert_fails {
        ($h:expr, $descs:expr, $done:expr, $failure:pat $(if $guard:expr)?) => {{
            let (done, failure) = $h.process(&$descs);
            assert_eq!(done, $done);
            assert!(
                matches!(failure, Some($failure) $(if $guard)?),
                "expected {}, got {failure:?}",
                stringify!($failure)
            );
        }};
    }

    fn ok(used_len: u32) -> Completion {
        Completion {
            status: Some(STATUS_OK),
            used_len,
        }
    }

    fn ioerr() -> Completion {
        Completion {
            status: Some(STATUS_IOERR),
            used_len: 1,
        }
    }

    fn unsupp() -> Completion {
        Completion {
            status: Some(STATUS_UNSUPP),
            used_len: 1,
        }
    }

    #[test]
    fn read() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_IN, 3);
        let done = h.run(&[header(), writable(DATA_ADDR, 1024), status()]);
        assert_eq!(done, ok(1025));
        assert_eq!(h.read(STATUS_ADDR, 1), [STATUS_OK]);
        assert_eq!(h.read(DATA_ADDR, 512), [3u8; 512]);
        assert_eq!(h.read(DATA_ADDR + 512, 512), [4u8; 512]);
    }

    #[test]
    fn read_multi_descriptor_and_status_in_data_descriptor() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_IN, 1);
        // 512 + 1024 + 513 writable bytes: the last byte is the status.
        let done = h.run(&[
            header(),
            writable(DATA_ADDR, 512),
            writable(0x4000, 1024),
            writable(0x8000, 513),
        ]);
        assert_eq!(done, ok(2049));
        assert_eq!(h.read(DATA_ADDR, 512), [1u8; 512]);
        assert_eq!(h.read(0x4000, 512), [2u8; 512]);
        assert_eq!(h.read(0x4200, 512), [3u8; 512]);
        assert_eq!(h.read(0x8000, 512), [4u8; 512]);
        assert_eq!(h.read(0x8200, 1), [STATUS_OK]);
    }

    #[test]
    fn descriptors_beyond_a_negotiated_size_max_are_refused() {
        let mut h = Harness::new();
        h.header(VIRTIO_BLK_T_IN, 0);
        let one_long = [header(), writable(DATA_ADDR, 2048), status()];
        let two_short = [
            header(),
            writable(DATA_ADDR, 1024),
            writable(0x4000, 1024),
            status(),
        ];
        // Not negotiated: no limit.
        assert_eq!(h.run(&one_long), ok(2049));
        h.size_max = Some(1024);
        assert_fails!(
            h,
            one_long,
            ioerr(),
            Failure::SizeMax {
                len: 2048,
                max: 1024
            }
        );
        assert_eq!(h.read(STATUS_ADDR, 1), [STATUS_IOERR]);
        assert_eq!(h.run(&two_short), ok(2049));
    }

    #[test]
    fn write() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_OUT, 10);
        h.write(DATA_ADDR, &[0xaa; 512]);
        h.write(0x5000, &[0xbb; 1024]);
        let done = h.run(&[
            header(),
            readable(DATA_ADDR, 512),
            readable(0x5000, 1024),
            status(),
        ]);
        assert_eq!(done, ok(1));
        assert_eq!(h.disk.contents(10 * 512, 512), [0xaa; 512]);
        assert_eq!(h.disk.contents(11 * 512, 1024), [0xbb; 1024]);
        assert_eq!(h.disk.contents(13 * 512, 1), [13]);
        assert_eq!(h.disk.flushes(), 0);
    }

    #[test]
    fn header_and_data_in_one_descriptor() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_OUT, 2);
        h.write(HEADER_ADDR + HEADER_SIZE as u64, &[0x5a; 512]);
        let done = h.run(&[readable(HEADER_ADDR, HEADER_SIZE as u32 + 512), status()]);
        assert_eq!(done, ok(1));
        assert_eq!(h.disk.contents(2 * 512, 512), [0x5a; 512]);
    }

    #[test]
    fn write_through_flushes_every_write() {
        let mut h = Harness::new();
        h.writeback = false;
        h.header(VIRTIO_BLK_T_OUT, 0);
        let done = h.run(&[header(), readable(DATA_ADDR, 512), status()]);
        assert_eq!(done, ok(1));
        assert_eq!(h.disk.flushes(), 1);
    }

    #[test]
    fn flush() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(h.run(&[header(), status()]), ok(1));
        assert_eq!(h.disk.flushes(), 1);
    }

    #[test]
    fn get_id() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_GET_ID, 0);
        h.write(DATA_ADDR, &[0xee; 32]);
        let done = h.run(&[header(), writable(DATA_ADDR, 20), status()]);
        assert_eq!(done, ok(21));
        assert_eq!(h.read(DATA_ADDR, 20), ID);

        // A larger buffer still gets exactly 20 bytes.
        h.write(DATA_ADDR, &[0xee; 32]);
        let done = h.run(&[header(), writable(DATA_ADDR, 32), status()]);
        assert_eq!(done, ok(21));
        assert_eq!(h.read(DATA_ADDR + 20, 1), [0xee]);
    }

    #[test]
    fn get_id_buffer_too_small() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_GET_ID, 0);
        assert_fails!(
            h,
            [header(), writable(DATA_ADDR, 8), status()],
            ioerr(),
            Failure::IdBufferTooSmall { len: 8 }
        );
    }

    #[test]
    fn discard() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_DISCARD, 0);
        h.segment(DATA_ADDR, 8, 16, 0);
        let done = h.run(&[header(), readable(DATA_ADDR, 16), status()]);
        assert_eq!(done, ok(1));
        assert_eq!(h.disk.contents(8 * 512, 16 * 512), vec![0; 16 * 512]);
        assert_eq!(h.disk.contents(24 * 512, 1), [24]);
        assert_eq!(h.disk.contents(7 * 512, 1), [7]);
    }

    #[test]
    fn write_zeroes_with_and_without_unmap() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        h.segment(DATA_ADDR, 1, 2, 0);
        assert_eq!(h.run(&[header(), readable(DATA_ADDR, 16), status()]), ok(1));
        assert_eq!(h.disk.contents(512, 1024), vec![0; 1024]);
        assert_eq!(h.disk.contents(3 * 512, 1), [3]);

        h.segment(DATA_ADDR, 5, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(h.run(&[header(), readable(DATA_ADDR, 16), status()]), ok(1));
        assert_eq!(h.disk.contents(5 * 512, 512), vec![0; 512]);
    }

    #[test]
    fn discard_and_write_zeroes_validation() {
        let h = Harness::new();
        let seg = || [header(), readable(DATA_ADDR, 16), status()];

        // UNMAP on a discard and unknown flags are UNSUPP (virtio 1.2, 5.2.6.2).
        h.header(VIRTIO_BLK_T_DISCARD, 0);
        h.segment(DATA_ADDR, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_fails!(h, seg(), unsupp(), Failure::UnsupportedFlags { flags: 1 });
        h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        h.segment(DATA_ADDR, 0, 1, 0x2);
        assert_fails!(h, seg(), unsupp(), Failure::UnsupportedFlags { flags: 2 });

        // Oversized, out of range, overflowing.
        h.segment(DATA_ADDR, 0, MAX_WRITE_ZEROES_SECTORS + 1, 0);
        assert_fails!(
            h,
            seg(),
            ioerr(),
            Failure::SegmentTooLarge { sectors, max }
                if sectors == MAX_WRITE_ZEROES_SECTORS + 1 && max == MAX_WRITE_ZEROES_SECTORS
        );
        h.segment(DATA_ADDR, DISK_SECTORS - 1, 2, 0);
        assert_fails!(
            h,
            seg(),
            ioerr(),
            Failure::OutOfRange {
                sector: 63,
                len: 1024,
                disk_sectors: 64
            }
        );
        h.segment(DATA_ADDR, u64::MAX / 256, 1, 0);
        assert_fails!(
            h,
            seg(),
            ioerr(),
            Failure::OutOfRange { sector, len: 512, .. } if sector == u64::MAX / 256
        );

        // Two segments, half a segment.
        h.segment(DATA_ADDR, 0, 1, 0);
        h.segment(DATA_ADDR + 16, 2, 1, 0);
        assert_fails!(
            h,
            [header(), readable(DATA_ADDR, 32), status()],
            ioerr(),
            Failure::BadSegments { len: 32 }
        );
        assert_fails!(
            h,
            [header(), readable(DATA_ADDR, 8), status()],
            ioerr(),
            Failure::BadSegments { len: 8 }
        );
        // Nothing was zeroed by the rejected requests.
        assert_eq!(h.disk.contents(0, 1), [0]);
        assert_eq!(h.disk.contents(2 * 512, 1), [2]);
        assert_eq!(h.disk.contents((DISK_SECTORS - 1) as usize * 512, 1), [63]);
    }

    #[test]
    fn unsupported_type() {
        let h = Harness::new();
        h.header(0x1234, 0);
        assert_fails!(
            h,
            [header(), status()],
            unsupp(),
            Failure::UnknownType(0x1234)
        );
        assert_eq!(h.read(STATUS_ADDR, 1), [STATUS_UNSUPP]);
    }

    #[test]
    fn out_of_range_and_overflowing_sectors() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
        assert_fails!(
            h,
            [header(), writable(DATA_ADDR, 1024), status()],
            ioerr(),
            Failure::OutOfRange {
                sector: 63,
                len: 1024,
                disk_sectors: 64
            }
        );
        h.header(VIRTIO_BLK_T_IN, DISK_SECTORS);
        assert_fails!(
            h,
            [header(), writable(DATA_ADDR, 512), status()],
            ioerr(),
            Failure::OutOfRange {
                sector: 64,
                len: 512,
                ..
            }
        );
        // sector * 512 overflows u64.
        h.header(VIRTIO_BLK_T_IN, u64::MAX / 2);
        assert_fails!(
            h,
            [header(), writable(DATA_ADDR, 512), status()],
            ioerr(),
            Failure::OutOfRange { sector, len: 512, .. } if sector == u64::MAX / 2
        );
        // sector * 512 fits, sector * 512 + len does not.
        h.header(VIRTIO_BLK_T_OUT, u64::MAX / 512);
        assert_fails!(
            h,
            [header(), readable(DATA_ADDR, 512), status()],
            ioerr(),
            Failure::OutOfRange { sector, len: 512, .. } if sector == u64::MAX / 512
        );
        // The last sector is fine.
        h.header(VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
        assert_eq!(
            h.run(&[header(), writable(DATA_ADDR, 512), status()]),
            ok(513)
        );
    }

    #[test]
    fn length_not_a_multiple_of_512() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_IN, 0);
        assert_fails!(
            h,
            [header(), writable(DATA_ADDR, 100), status()],
            ioerr(),
            Failure::Unaligned { len: 100 }
        );
        h.header(VIRTIO_BLK_T_OUT, 0);
        assert_fails!(
            h,
            [header(), readable(DATA_ADDR, 700), status()],
            ioerr(),
            Failure::Unaligned { len: 700 }
        );
    }

    #[test]
    fn short_header() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_IN, 0);
        assert_fails!(
            h,
            [readable(HEADER_ADDR, 8), writable(DATA_ADDR, 512), status()],
            ioerr(),
            Failure::ShortHeader { len: 8 }
        );
        assert_eq!(h.read(STATUS_ADDR, 1), [STATUS_IOERR]);
    }

    #[test]
    fn missing_status() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_FLUSH, 0);
        let done = h.run(&[header()]);
        assert_eq!(
            done,
            Completion {
                status: None,
                used_len: 0
            }
        );
        assert_eq!(h.disk.flushes(), 0);
    }

    #[test]
    fn read_only_status_descriptor() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_OUT, 0);
        let done = h.run(&[header(), readable(DATA_ADDR, 512), readable(STATUS_ADDR, 1)]);
        assert_eq!(done.status, None);
        assert_eq!(done.used_len, 0);
        assert_eq!(h.read(STATUS_ADDR, 1), [0xff]);
        assert_eq!(h.disk.contents(0, 1), [0]);
    }

    #[test]
    fn data_in_the_wrong_direction() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_IN, 0);
        assert_fails!(
            h,
            [
                header(),
                readable(DATA_ADDR, 512),
                writable(0x4000, 512),
                status(),
            ],
            ioerr(),
            Failure::WrongDirection {
                len: 512,
                direction: "device-readable"
            }
        );
        h.header(VIRTIO_BLK_T_OUT, 0);
        h.write(DATA_ADDR, &[0x77; 512]);
        assert_fails!(
            h,
            [header(), writable(DATA_ADDR, 512), status()],
            ioerr(),
            Failure::WrongDirection {
                len: 512,
                direction: "device-writable"
            }
        );
        assert_eq!(h.disk.contents(0, 1), [0]);
    }

    #[test]
    fn writes_on_a_read_only_disk() {
        let mut h = Harness::new();
        h.read_only = true;
        h.header(VIRTIO_BLK_T_OUT, 0);
        h.write(DATA_ADDR, &[0x77; 512]);
        assert_fails!(
            h,
            [header(), readable(DATA_ADDR, 512), status()],
            ioerr(),
            Failure::ReadOnly
        );
        h.header(VIRTIO_BLK_T_DISCARD, 0);
        h.segment(DATA_ADDR, 0, 1, 0);
        let seg = [header(), readable(DATA_ADDR, 16), status()];
        assert_fails!(h, seg, ioerr(), Failure::ReadOnly);
        h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert_fails!(h, seg, ioerr(), Failure::ReadOnly);
        assert_eq!(h.disk.contents(0, 512), vec![0; 512]);
        assert_eq!(h.disk.contents(512, 1), [1]);
        // Reads still work.
        h.header(VIRTIO_BLK_T_IN, 1);
        assert_eq!(
            h.run(&[header(), writable(DATA_ADDR, 512), status()]),
            ok(513)
        );
    }

    #[test]
    fn device_error_then_success() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_IN, 2);
        h.disk.fail_next(1);
        let io = [header(), writable(DATA_ADDR, 512), status()];
        assert_fails!(h, io, ioerr(), Failure::Device(_));
        assert_eq!(h.run(&io), ok(513));
        assert_eq!(h.read(DATA_ADDR, 512), [2u8; 512]);

        h.header(VIRTIO_BLK_T_FLUSH, 0);
        // A failed flush is not a rejected request: the status comes from
        // the flush that the request waited for.
        h.disk.fail_next(1);
        assert_eq!(h.run(&[header(), status()]), ioerr());
    }

    #[test]
    fn descriptor_outside_guest_memory() {
        let h = Harness::new();
        h.header(VIRTIO_BLK_T_IN, 0);
        let done = h.run(&[header(), writable(0x20_0000, 512), status()]);
        assert_eq!(done.status, None);
        assert_eq!(h.read(STATUS_ADDR, 1), [0xff]);
    }

    #[test]
    fn descriptor_spanning_two_memory_regions() {
        // Two separately mapped regions, contiguous in guest physical space.
        let h = Harness::with_memory(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ]);
        let span = 0x1_0000 - 512;
        h.header(VIRTIO_BLK_T_IN, 5);
        let done = h.run(&[header(), writable(span, 1024), status()]);
        assert_eq!(done, ok(1025));
        assert_eq!(h.read(span, 512), [5u8; 512]);
        assert_eq!(h.read(0x1_0000, 512), [6u8; 512]);

        h.header(VIRTIO_BLK_T_OUT, 20);
        h.write(span, &[0x42; 1024]);
        let done = h.run(&[header(), readable(span, 1024), status()]);
        assert_eq!(done, ok(1));
        assert_eq!(h.disk.contents(20 * 512, 1024), vec![0x42; 1024]);
    }

    #[test]
    fn request_type_names() {
        assert_eq!(RequestType::from(VIRTIO_BLK_T_IN).to_string(), "IN");
        assert_eq!(RequestType::from(99).to_string(), "type 99");
    }
}
