//! Raw vhost-user over a backend's Unix socket, for tests that send what a
//! well-behaved frontend never would: any header, any size field, any
//! payload, any file descriptors.
//!
//! [`RawConn`] is the byte-level connection (12-byte header: request,
//! flags, size; payload; descriptors with `SCM_RIGHTS`). [`RawFrontend`]
//! performs a valid setup of queue 0 over a memfd of its own, then lets the
//! test write descriptors and ring indexes by hand, through the client's
//! [`SplitRing`] (the same ring code `ociblk-client` drives its queues with). Request codes are vhost's [`FrontendReq`], flags and
//! feature bits come from vhost and virtio-bindings.
//!
//! Every receive is bounded by the socket timeout given at connect.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ociblk_client::{GuestRam, SplitRing};
use vhost::VhostUserMemoryRegionInfo;
pub use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Header size: request, flags, size (all `u32`, little endian).
pub const HEADER_SIZE: usize = 12;
/// Protocol version 1, in the bits [`VhostUserHeaderFlag::VERSION`] masks.
pub const VERSION: u32 = 0x1;
/// Flag of a reply.
pub const FLAG_REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();
/// Flag asking for a REPLY_ACK.
pub const FLAG_NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();
/// Bit of a vring fd message's payload: no descriptor attached (the
/// vhost-user specification's `VHOST_USER_VRING_NOFD_MASK`).
pub const VRING_NOFD: u64 = 0x100;

/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const F_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
/// Protocol features: MQ, REPLY_ACK, CONFIG.
pub const PF_MQ: u64 = VhostUserProtocolFeatures::MQ.bits();
pub const PF_REPLY_ACK: u64 = VhostUserProtocolFeatures::REPLY_ACK.bits();
pub const PF_CONFIG: u64 = VhostUserProtocolFeatures::CONFIG.bits();
/// Protocol feature LOG_SHMFD: the dirty log as a shared memory file.
pub const PF_LOG_SHMFD: u64 = VhostUserProtocolFeatures::LOG_SHMFD.bits();
/// `VHOST_F_LOG_ALL`: log every write to guest memory.
pub const F_LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

/// The 12 header bytes.
pub fn header(request: impl Into<u32>, flags: u32, size: u32) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    h[0..4].copy_from_slice(&request.into().to_le_bytes());
    h[4..8].copy_from_slice(&flags.to_le_bytes());
    h[8..12].copy_from_slice(&size.to_le_bytes());
    h
}

/// A `VhostUserU64` payload.
pub fn u64_payload(value: u64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

/// A `VhostUserVringState` payload (index, num).
pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&num.to_le_bytes());
    p
}

/// A `VhostUserVringAddr` payload.
pub fn vring_addr(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [desc, used, avail, 0] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// One region of a `SET_MEM_TABLE` payload.
#[derive(Debug, Clone, Copy)]
pub struct MemRegion {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
}

/// A `VhostUserMemory` payload: region count, padding, regions. `count`
/// may differ from `regions.len()`, to lie about it.
pub fn mem_table(count: u32, regions: &[MemRegion]) -> Vec<u8> {
    let mut p = count.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for r in regions {
        for v in [r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset] {
            p.extend_from_slice(&v.to_le_bytes());
        }
    }
    p
}

/// A `VhostUserLog` payload (SET_LOG_BASE): size, offset.
pub fn log_payload(mmap_size: u64, mmap_offset: u64) -> Vec<u8> {
    let mut p = mmap_size.to_le_bytes().to_vec();
    p.extend_from_slice(&mmap_offset.to_le_bytes());
    p
}

/// A `VhostUserConfig` payload: offset, size, flags, then `data`.
pub fn config_payload(offset: u32, size: u32, flags: u32, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_le_bytes().to_vec();
    p.extend_from_slice(&size.to_le_bytes());
    p.extend_from_slice(&flags.to_le_bytes());
    p.extend_from_slice(data);
    p
}

/// A message received from the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
}

impl Reply {
    /// The payload as a `u64`, if it is one.
    pub fn u64(&self) -> Option<u64> {
        let bytes: [u8; 8] = self.payload.as_slice().try_into().ok()?;
        Some(u64::from_le_bytes(bytes))
    }
}

/// What became of a request that asked for an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The backend answered.
    Reply(Reply),
    /// The backend closed the connection (or reset it).
    Closed,
    /// Nothing within the timeout.
    Silent,
}

impl Answer {
    /// A REPLY_ACK value of 0.
    pub fn is_ack_ok(&self) -> bool {
        matches!(self, Answer::Reply(r) if r.u64() == Some(0))
    }
}

/// A vhost-user connection that sends whatever it is told to.
#[derive(Debug)]
pub struct RawConn {
    sock: UnixStream,
}

impl RawConn {
    /// Connects to `path`, retrying while the listener refuses (a server
    /// starting up), for at most `timeout`; receives are bounded by `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<RawConn> {
        let deadline = Instant::now() + timeout;
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if e.kind() == io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        Ok(RawConn { sock })
    }

    /// The socket's descriptor (e.g. to pass the socket itself as an fd).
    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends `bytes` as is, with `fds` attached.
    pub fn send_bytes(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        if fds.is_empty() {
            return (&self.sock).write_all(bytes);
        }
        let fd_bytes = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
        // u64 elements keep the control buffer aligned for cmsghdr.
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        // SAFETY: an all-zero msghdr is valid; the fields are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `space` bytes, enough for one cmsg
        // holding `fd_bytes` bytes, so CMSG_FIRSTHDR is non-null and the
        // header and its data are inside `control`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
        // SAFETY: msg points at live iovec and control buffers; the
        // descriptor is our socket.
        let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n < bytes.len() {
            (&self.sock).write_all(&bytes[n..])?;
        }
        Ok(())
    }

    /// Sends a message whose size field is `payload.len()`. `request` is a
    /// [`FrontendReq`] or any number.
    pub fn send(
        &self,
        request: impl Into<u32>,
        flags: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> io::Result<()> {
        self.send_sized(request, flags, payload.len() as u32, payload, fds)
    }

    /// Sends a message with an arbitrary size field.
    pub fn send_sized(
        &self,
        request: impl Into<u32>,
        flags: u32,
        size: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> io::Result<()> {
        let mut bytes = header(request, flags, size).to_vec();
        bytes.extend_from_slice(payload);
        self.send_bytes(&bytes, fds)
    }

    /// Receives one message (header and payload).
    pub fn recv(&self) -> Answer {
        let mut hdr = [0u8; HEADER_SIZE];
        match (&self.sock).read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Answer::Silent;
            }
            Err(_) => return Answer::Closed,
        }
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let size = word(8) as usize;
        if size > 0x1000 {
            return Answer::Closed;
        }
        let mut payload = vec![0u8; size];
        match (&self.sock).read_exact(&mut payload) {
            Ok(()) => Answer::Reply(Reply {
                request: word(0),
                flags: word(4),
                payload,
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Answer::Silent
            }
            Err(_) => Answer::Closed,
        }
    }

    /// Sends a request (version flag plus `NEED_REPLY`) and waits for its
    /// answer: the reply of a getter or the REPLY_ACK of a setter (once
    /// REPLY_ACK is negotiated).
    pub fn call(&self, request: impl Into<u32>, payload: &[u8], fds: &[RawFd]) -> Answer {
        if self
            .send(request, VERSION | FLAG_NEED_REPLY, payload, fds)
            .is_err()
        {
            return Answer::Closed;
        }
        self.recv()
    }
}

/// Memory shared with the backend: the client's [`GuestRam`] at guest
/// physical address 0, with accessors that panic outside it (a test bug).
#[derive(Debug)]
pub struct GuestMem {
    ram: GuestRam,
}

impl GuestMem {
    /// A memfd of `len` bytes (a multiple of the page size), mapped shared.
    pub fn new(len: usize) -> io::Result<GuestMem> {
        let ram = GuestRam::at(0, len).map_err(io::Error::other)?;
        Ok(GuestMem { ram })
    }

    /// The vm-memory view, e.g. for virtio-queue's ring views.
    pub fn mem(&self) -> &GuestMemoryMmap {
        self.ram.mem()
    }

    /// The memfd (what `SET_MEM_TABLE` passes).
    pub fn fd(&self) -> RawFd {
        self.region().mmap_handle
    }

    pub fn len(&self) -> u64 {
        self.ram.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// This process's address of offset 0 (what `user_addr` describes).
    pub fn addr(&self) -> u64 {
        self.region().userspace_addr
    }

    /// This memory as the one region of a `SET_MEM_TABLE`, at GPA 0.
    pub fn mem_region(&self) -> MemRegion {
        MemRegion {
            guest_phys_addr: 0,
            memory_size: self.len(),
            user_addr: self.addr(),
            mmap_offset: 0,
        }
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        self.ram.region_info().expect("one region")
    }

    /// Writes `bytes` at `offset` (panics outside the memory).
    pub fn write(&self, offset: u64, bytes: &[u8]) {
        self.mem()
            .write_slice(bytes, GuestAddress(offset))
            .unwrap_or_else(|e| panic!("{} bytes at {offset:#x}: {e}", bytes.len()));
    }

    /// Reads `len` bytes at `offset` (panics outside the memory).
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem()
            .read_slice(&mut out, GuestAddress(offset))
            .unwrap_or_else(|e| panic!("{len} bytes at {offset:#x}: {e}"));
        out
    }
}

/// A memfd of `len` bytes, not mapped.
pub fn memfd(len: u64) -> io::Result<OwnedFd> {
    // SAFETY: a valid NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"ociblk-raw-vhost".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(fd.try_clone()?).set_len(len)?;
    Ok(fd)
}

/// Guest physical layout used by [`RawFrontend`]: memory starts at GPA 0.
pub const DESC_TABLE: u64 = 0x1000;
pub const AVAIL_RING: u64 = 0x2000;
pub const USED_RING: u64 = 0x3000;
/// Where request buffers may go.
pub const BUFFERS: u64 = 0x10000;

/// Split-ring descriptor flags.
pub const DESC_F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub const DESC_F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// A frontend that set up queue 0 correctly over its own memory, and then
/// writes rings by hand.
#[derive(Debug)]
pub struct RawFrontend {
    pub conn: RawConn,
    pub mem: GuestMem,
    pub queue_size: u16,
    pub kick: EventFd,
    pub call: EventFd,
    /// Features acked with SET_FEATURES.
    pub features: u64,
    /// Queue 0's ring at [`DESC_TABLE`], [`AVAIL_RING`], [`USED_RING`].
    pub ring: SplitRing,
    next_avail: u16,
}

impl RawFrontend {
    /// Acks every offered feature (EVENT_IDX included, see
    /// [`avail_event`](Self::avail_event)) and REPLY_ACK, sends one memory region of `mem_size` bytes at GPA 0 and sets up queue 0 with
    /// `queue_size` entries at [`DESC_TABLE`], [`AVAIL_RING`], [`USED_RING`].
    pub fn setup(
        socket: &Path,
        mem_size: usize,
        queue_size: u16,
        timeout: Duration,
    ) -> io::Result<RawFrontend> {
        Self::setup_with(socket, mem_size, queue_size, timeout, 0)
    }

    /// [`setup`](Self::setup), also acking the protocol features in
    /// `protocol_extra` (e.g. [`PF_LOG_SHMFD`]) when they are offered.
    pub fn setup_with(
        socket: &Path,
        mem_size: usize,
        queue_size: u16,
        timeout: Duration,
        protocol_extra: u64,
    ) -> io::Result<RawFrontend> {
        let conn = RawConn::connect(socket, timeout)?;
        let fail = |what: &str, a: &Answer| io::Error::other(format!("{what}: {a:?}"));
        let get = |request: FrontendReq| match conn.call(request, &[], &[]) {
            Answer::Reply(r) if r.u64().is_some() => Ok(r.u64().unwrap_or_default()),
            a => Err(fail("getter", &a)),
        };
        let offered = get(FrontendReq::GET_FEATURES)?;
        let protocol = get(FrontendReq::GET_PROTOCOL_FEATURES)?;
        conn.send(
            FrontendReq::SET_PROTOCOL_FEATURES,
            VERSION,
            &u64_payload(protocol & (PF_MQ | PF_REPLY_ACK | PF_CONFIG | protocol_extra)),
            &[],
        )?;
        let features = offered;
        let mem = GuestMem::new(mem_size)?;
        let ring = SplitRing::new(DESC_TABLE, AVAIL_RING, USED_RING, queue_size);
        // Zeroed rings: flags, indexes and event fields.
        ring.reset(mem.mem()).map_err(io::Error::other)?;
        let fe = RawFrontend {
            conn,
            mem,
            queue_size,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            features,
            ring,
            next_avail: 0,
        };
        fe.ack(FrontendReq::SET_OWNER, &[], &[])?;
        fe.ack(FrontendReq::SET_FEATURES, &u64_payload(features), &[])?;
        fe.set_mem_table()?;
        fe.ack(
            FrontendReq::SET_VRING_NUM,
            &vring_state(0, u32::from(queue_size)),
            &[],
        )?;
        fe.ack(FrontendReq::SET_VRING_BASE, &vring_state(0, 0), &[])?;
        let addr = vring_addr(0, fe.va(DESC_TABLE), fe.va(USED_RING), fe.va(AVAIL_RING));
        fe.ack(FrontendReq::SET_VRING_ADDR, &addr, &[])?;
        fe.ack(
            FrontendReq::SET_VRING_CALL,
            &u64_payload(0),
            &[fe.call.as_raw_fd()],
        )?;
        fe.ack(
            FrontendReq::SET_VRING_KICK,
            &u64_payload(0),
            &[fe.kick.as_raw_fd()],
        )?;
        fe.ack(FrontendReq::SET_VRING_ENABLE, &vring_state(0, 1), &[])?;
        Ok(fe)
    }

    /// Sends a setter and requires a successful REPLY_ACK.
    pub fn ack(&self, request: FrontendReq, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        match self.conn.call(request, payload, fds) {
            a if a.is_ack_ok() => Ok(()),
            a => Err(io::Error::other(format!("{request:?}: {a:?}"))),
        }
    }

    /// SET_MEM_TABLE of [`mem`](Self::mem) as its one region, requiring a
    /// successful REPLY_ACK.
    pub fn set_mem_table(&self) -> io::Result<()> {
        self.ack(
            FrontendReq::SET_MEM_TABLE,
            &mem_table(1, &[self.mem.mem_region()]),
            &[self.mem.fd()],
        )
    }

    /// SET_LOG_BASE with `log` (size and offset from the payload); the
    /// answer is the backend's reply, or the connection closing when it
    /// refused the log.
    pub fn set_log_base(&self, log: RawFd, mmap_size: u64, mmap_offset: u64) -> Answer {
        self.conn.call(
            FrontendReq::SET_LOG_BASE,
            &log_payload(mmap_size, mmap_offset),
            &[log],
        )
    }

    /// The frontend address of guest physical address `gpa`.
    pub fn va(&self, gpa: u64) -> u64 {
        self.mem.addr() + gpa
    }

    /// Writes descriptor `index` of the table at [`DESC_TABLE`].
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.ring
            .write_desc(self.mem.mem(), index, addr, len, flags, next)
            .unwrap_or_else(|e| panic!("descriptor {index}: {e}"));
    }

    /// Puts `head` in the next avail slot, publishes the new index and kicks.
    pub fn publish(&mut self, head: u16) {
        self.next_avail = self
            .ring
            .publish(self.mem.mem(), self.next_avail, head)
            .unwrap_or_else(|e| panic!("avail entry {}: {e}", self.next_avail));
        self.kick();
    }

    /// Writes the avail ring's index (any value).
    pub fn set_avail_idx(&self, idx: u16) {
        self.ring
            .set_avail_idx(self.mem.mem(), idx)
            .unwrap_or_else(|e| panic!("avail idx: {e}"));
    }

    /// Notifies the backend.
    pub fn kick(&self) {
        let _ = self.kick.write(1);
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.ring
            .used_idx(self.mem.mem())
            .unwrap_or_else(|e| panic!("used idx: {e}"))
    }

    /// The `avail_event` the device publishes (EVENT_IDX): how far it has
    /// consumed the avail ring.
    pub fn avail_event(&self) -> u16 {
        self.ring
            .avail_event(self.mem.mem())
            .unwrap_or_else(|e| panic!("avail_event: {e}"))
    }

    /// Waits (polling, bounded) until the device has consumed the avail ring
    /// up to `want`.
    pub fn wait_consumed(&self, want: u16, timeout: Duration) -> bool {
        crate::support::wait_until(timeout, || self.avail_event() == want)
    }

    /// The avail index this frontend published last.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Waits (polling, bounded) until the used index reaches `want`.
    pub fn wait_used(&self, want: u16, timeout: Duration) -> bool {
        crate::support::wait_until(timeout, || {
            let _ = self.call.read();
            self.used_idx() == want
        })
    }
}

/// Writes a split-ring descriptor at guest offset `at` of `mem` (an
/// indirect table, or a descriptor table placed anywhere).
pub fn write_desc(mem: &GuestMem, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    SplitRing::write_desc_at(mem.mem(), at, addr, len, flags, next)
        .unwrap_or_else(|e| panic!("descriptor at {at:#x}: {e}"));
}
