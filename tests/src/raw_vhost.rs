//! Raw vhost-user over a backend's Unix socket, for tests that send what a
//! well-behaved frontend never would: any header, any size field, any
//! payload, any file descriptors.
//!
//! [`RawConn`] is the byte-level connection (12-byte header: request,
//! flags, size; payload; descriptors with `SCM_RIGHTS`). [`RawFrontend`]
//! performs a valid setup of queue 0 over a memfd of its own, then lets the
//! test write descriptor tables and ring indexes by hand.
//!
//! Every receive is bounded by the socket timeout given at connect.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// vhost-user request codes (frontend to backend).
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
}

/// Header size: request, flags, size (all `u32`, little endian).
pub const HEADER_SIZE: usize = 12;
/// Protocol version in the flags.
pub const VERSION: u32 = 0x1;
/// Flag of a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Flag asking for a REPLY_ACK.
pub const FLAG_NEED_REPLY: u32 = 0x8;
/// Bit of a vring fd message's payload: no descriptor attached.
pub const VRING_NOFD: u64 = 0x100;

/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const F_EVENT_IDX: u64 = 1 << 29;
/// Protocol features: MQ, REPLY_ACK, CONFIG.
pub const PF_MQ: u64 = 1 << 0;
pub const PF_REPLY_ACK: u64 = 1 << 3;
pub const PF_CONFIG: u64 = 1 << 9;

/// The 12 header bytes.
pub fn header(request: u32, flags: u32, size: u32) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    h[0..4].copy_from_slice(&request.to_le_bytes());
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

    /// Sends a message whose size field is `payload.len()`.
    pub fn send(&self, request: u32, flags: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        self.send_sized(request, flags, payload.len() as u32, payload, fds)
    }

    /// Sends a message with an arbitrary size field.
    pub fn send_sized(
        &self,
        request: u32,
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
    pub fn call(&self, request: u32, payload: &[u8], fds: &[RawFd]) -> Answer {
        if self
            .send(request, VERSION | FLAG_NEED_REPLY, payload, fds)
            .is_err()
        {
            return Answer::Closed;
        }
        self.recv()
    }
}

/// Memory shared with the backend: a memfd mapped into this process.
#[derive(Debug)]
pub struct GuestMem {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; it is
// only accessed through bounds-checked copies.
unsafe impl Send for GuestMem {}

impl GuestMem {
    /// A memfd of `len` bytes (a multiple of the page size), mapped shared.
    pub fn new(len: usize) -> io::Result<GuestMem> {
        let fd = memfd(len as u64)?;
        // SAFETY: a fresh shared mapping of a descriptor we own, checked
        // for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(GuestMem {
            fd,
            ptr: ptr.cast(),
            len,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// This process's address of offset 0 (what `user_addr` describes).
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    fn check(&self, offset: u64, len: usize) -> usize {
        let off = usize::try_from(offset).expect("offset fits usize");
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "{len} bytes at {offset:#x} are outside the {}-byte memory",
            self.len
        );
        off
    }

    /// Writes `bytes` at `offset` (panics outside the memory).
    pub fn write(&self, offset: u64, bytes: &[u8]) {
        let off = self.check(offset, bytes.len());
        // SAFETY: the range is inside our live mapping (checked above); the
        // backend may access it concurrently, as guest memory is.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off), bytes.len()) }
    }

    /// Reads `len` bytes at `offset` (panics outside the memory).
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let off = self.check(offset, len);
        let mut out = vec![0u8; len];
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), out.as_mut_ptr(), len) }
        out
    }

    pub fn write_u16(&self, offset: u64, v: u16) {
        self.write(offset, &v.to_le_bytes());
    }

    pub fn read_u16(&self, offset: u64) -> u16 {
        let b = self.read(offset, 2);
        u16::from_le_bytes([b[0], b[1]])
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing
        // references any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
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
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

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
        let conn = RawConn::connect(socket, timeout)?;
        let fail = |what: &str, a: &Answer| io::Error::other(format!("{what}: {a:?}"));
        let get = |request: u32| match conn.call(request, &[], &[]) {
            Answer::Reply(r) if r.u64().is_some() => Ok(r.u64().unwrap_or_default()),
            a => Err(fail("getter", &a)),
        };
        let offered = get(req::GET_FEATURES)?;
        let protocol = get(req::GET_PROTOCOL_FEATURES)?;
        conn.send(
            req::SET_PROTOCOL_FEATURES,
            VERSION,
            &u64_payload(protocol & (PF_MQ | PF_REPLY_ACK | PF_CONFIG)),
            &[],
        )?;
        let features = offered;
        let fe = RawFrontend {
            conn,
            mem: GuestMem::new(mem_size)?,
            queue_size,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            features,
            next_avail: 0,
        };
        fe.ack(req::SET_OWNER, &[], &[])?;
        fe.ack(req::SET_FEATURES, &u64_payload(features), &[])?;
        let region = MemRegion {
            guest_phys_addr: 0,
            memory_size: mem_size as u64,
            user_addr: fe.mem.addr(),
            mmap_offset: 0,
        };
        fe.ack(req::SET_MEM_TABLE, &mem_table(1, &[region]), &[fe.mem.fd()])?;
        fe.ack(
            req::SET_VRING_NUM,
            &vring_state(0, u32::from(queue_size)),
            &[],
        )?;
        fe.ack(req::SET_VRING_BASE, &vring_state(0, 0), &[])?;
        let addr = vring_addr(0, fe.va(DESC_TABLE), fe.va(USED_RING), fe.va(AVAIL_RING));
        fe.ack(req::SET_VRING_ADDR, &addr, &[])?;
        fe.ack(req::SET_VRING_CALL, &u64_payload(0), &[fe.call.as_raw_fd()])?;
        fe.ack(req::SET_VRING_KICK, &u64_payload(0), &[fe.kick.as_raw_fd()])?;
        fe.ack(req::SET_VRING_ENABLE, &vring_state(0, 1), &[])?;
        Ok(fe)
    }

    /// Sends a setter and requires a successful REPLY_ACK.
    pub fn ack(&self, request: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        match self.conn.call(request, payload, fds) {
            a if a.is_ack_ok() => Ok(()),
            a => Err(io::Error::other(format!("request {request}: {a:?}"))),
        }
    }

    /// The frontend address of guest physical address `gpa`.
    pub fn va(&self, gpa: u64) -> u64 {
        self.mem.addr() + gpa
    }

    /// Writes descriptor `index` of the table at [`DESC_TABLE`].
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(
            &self.mem,
            DESC_TABLE + 16 * u64::from(index),
            addr,
            len,
            flags,
            next,
        );
    }

    /// Puts `head` in the next avail slot, publishes the new index and kicks.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % self.queue_size);
        self.mem.write_u16(AVAIL_RING + 4 + 2 * slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.set_avail_idx(self.next_avail);
        self.kick();
    }

    /// Writes the avail ring's index (any value).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem.write_u16(AVAIL_RING + 2, idx);
    }

    /// Notifies the backend.
    pub fn kick(&self) {
        let _ = self.kick.write(1);
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_u16(USED_RING + 2)
    }

    /// The `avail_event` the device publishes (EVENT_IDX): how far it has
    /// consumed the avail ring.
    pub fn avail_event(&self) -> u16 {
        self.mem
            .read_u16(USED_RING + 4 + 8 * u64::from(self.queue_size))
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

/// Writes a split-ring descriptor at guest offset `at` of `mem`.
pub fn write_desc(mem: &GuestMem, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write(at, &d);
}
