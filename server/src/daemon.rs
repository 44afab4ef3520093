//! The accept loop: one frontend connection at a time, until shutdown.
//!
//! A `VhostUserDaemon` serves a single connection, so every connection gets
//! a fresh backend and daemon, while the listening socket is created once
//! and stays in place: a frontend reconnecting (QEMU restarted, or QEMU's
//! `reconnect` after our own restart) always finds it.
//!
//! Shutdown is an eventfd. The accept loop polls it together with the
//! listening socket and only calls the daemon's (blocking) accept once a
//! connection is pending; while a connection is served, a watcher thread
//! polls it and shuts the connection's socket down, which ends the daemon's
//! request loop.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ociblk_io::sys::{self, try_lock_exclusive};
use tracing::{error, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::ServerError;
use super::backend::{BlkBackend, GuestMemoryAtomic};
use super::config::ServerOptions;
use super::engine::DeviceEngine;
use super::request::GuestMemoryMmap;
use crate::device::BlockDevice;

/// Name of the thread reading vhost-user messages.
const DAEMON_THREAD_NAME: &str = "vhost-user-blk";
/// Mode of the listening socket and of its lock file: only our user.
const SOCKET_MODE: u32 = 0o600;
/// Longest socket path: `sun_path` holds 108 bytes with the final NUL.
/// QEMU refuses longer paths too.
pub const MAX_SOCKET_PATH: usize = 107;
/// Appended to the socket path to name its lock file.
pub const LOCK_SUFFIX: &str = ".lock";
/// Tries at taking a lock file that other servers keep removing.
const LOCK_ATTEMPTS: usize = 16;

/// A level-triggered shutdown request, shared by the CLI (signals), the
/// server and tests. Once triggered it stays triggered.
#[derive(Debug, Clone)]
pub struct ShutdownSignal {
    event: Arc<EventFd>,
}

impl ShutdownSignal {
    pub fn new() -> Result<Self, ServerError> {
        let event = EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK).map_err(ServerError::EventFd)?;
        Ok(ShutdownSignal {
            event: Arc::new(event),
        })
    }

    /// Requests shutdown.
    pub fn trigger(&self) {
        // Fails only when the counter would overflow, i.e. when already
        // triggered many times over.
        let _ = self.event.write(1);
    }

    /// Whether shutdown was requested.
    pub fn is_triggered(&self) -> bool {
        // The counter is never read, so the eventfd stays readable.
        matches!(poll_readable([self.fd()], 0), Ok([true]))
    }

    /// Triggers this signal on SIGTERM, SIGINT and SIGHUP (a closing
    /// terminal must not cost the final flush), and ignores SIGUSR1 and
    /// SIGPIPE, for the rest of the process's life: no signal a user or a
    /// terminal commonly sends ends the server without its clean shutdown.
    pub fn trigger_on_termination_signals(&self) -> Result<(), ServerError> {
        self.trigger_on(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP])?;
        ignore_signals(&[libc::SIGUSR1, libc::SIGPIPE])
    }

    fn trigger_on(&self, signals: &[libc::c_int]) -> Result<(), ServerError> {
        // The handler gets its own descriptor, never closed: it may run at
        // any moment, even after every ShutdownSignal is gone.
        let fd = self
            .event
            .try_clone()
            .map_err(ServerError::Signal)?
            .into_raw_fd();
        // A previous descriptor is left open too: a handler running right
        // now may still be writing to it.
        SIGNAL_EVENT_FD.store(fd, Ordering::SeqCst);
        // Not vmm-sys-util's register_signal_handler: it installs without
        // SA_RESTART, and the workers' syscalls must not fail with EINTR.
        for &signal in signals {
            // SAFETY: an all-zero sigaction is a valid value (empty mask, no
            // flags) that is completed below.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_termination_signal as extern "C" fn(libc::c_int) as usize;
            // Restart interrupted syscalls in the worker threads.
            action.sa_flags = libc::SA_RESTART;
            // SAFETY: `action` is a valid sigaction, the handler is
            // async-signal-safe, and the old action is not requested.
            if unsafe { libc::sigaction(signal, &raw const action, std::ptr::null_mut()) } != 0 {
                return Err(ServerError::Signal(io::Error::last_os_error()));
            }
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

/// Sets `signals` to be ignored. A broken pipe then shows as EPIPE on the
/// write instead of ending the process.
fn ignore_signals(signals: &[libc::c_int]) -> Result<(), ServerError> {
    for &signal in signals {
        // SAFETY: an all-zero sigaction is valid; SIG_IGN needs no handler.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = libc::SIG_IGN;
        // SAFETY: `action` is a valid sigaction; the old one is not requested.
        if unsafe { libc::sigaction(signal, &raw const action, std::ptr::null_mut()) } != 0 {
            return Err(ServerError::Signal(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The eventfd the signal handler writes to, -1 before installation.
static SIGNAL_EVENT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_termination_signal(_signal: libc::c_int) {
    let fd = SIGNAL_EVENT_FD.load(Ordering::SeqCst);
    if fd < 0 {
        return;
    }
    let one = 1u64.to_ne_bytes();
    // SAFETY: errno access and write(2) are async-signal-safe; `fd` is an
    // eventfd that is never closed and `one` outlives the call. errno is
    // restored so the interrupted code does not see ours.
    unsafe {
        let errno = *libc::__errno_location();
        libc::write(fd, one.as_ptr().cast(), one.len());
        *libc::__errno_location() = errno;
    }
}

/// Polls `fds` for readability (or error/hangup), retrying on EINTR, and
/// returns which ones are ready. `timeout_ms` is -1 for no timeout.
fn poll_readable<const N: usize>(fds: [RawFd; N], timeout_ms: i32) -> io::Result<[bool; N]> {
    let mut pollfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `pollfds` is an array of N initialised pollfd structures
        // that lives across the call.
        let ready = unsafe { libc::poll(pollfds.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
        if ready >= 0 {
            return Ok(pollfds.map(|p| p.revents != 0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Serves `device` on `socket` until `shutdown` is triggered.
///
/// Takes the socket's lock file `<socket>.lock` (a second server on the
/// same path fails), creates the socket (mode 0600; a stale socket at the
/// path is replaced, anything else is refused) and serves one frontend connection after the
/// other. On shutdown it stops accepting, closes the current connection,
/// waits for every request taken from the rings to complete, flushes the
/// device, removes the socket and returns `Ok`. The device's I/O pool and
/// flush thread ([`DeviceEngine`]) serve every connection.
pub fn serve(
    device: Arc<dyn BlockDevice>,
    socket: &Path,
    opts: &ServerOptions,
    shutdown: ShutdownSignal,
) -> Result<(), ServerError> {
    opts.validate()?;
    serve_claimed(device, SocketClaim::take(socket)?, opts, shutdown)
}

/// [`serve`] on a socket path claimed beforehand ([`SocketClaim::take`]),
/// so that a caller can refuse a bad path before it creates other files.
pub fn serve_claimed(
    device: Arc<dyn BlockDevice>,
    claim: SocketClaim,
    opts: &ServerOptions,
    shutdown: ShutdownSignal,
) -> Result<(), ServerError> {
    opts.validate()?;
    let engine = Arc::new(DeviceEngine::new(Arc::clone(&device), opts)?);
    let mut socket = ServerSocket::bind_claimed(claim)?;
    info!(
        socket = %socket.path.display(),
        size = device.size(),
        queues = opts.queues,
        read_only = opts.read_only || device.read_only(),
        "listening for vhost-user frontends"
    );
    let served = accept_loop(&engine, &mut socket, opts, &shutdown);
    info!("shutting down");
    let flushed = device.flush().map_err(ServerError::Flush);
    drop(socket);
    drop(engine);
    served.and(flushed)
}

fn accept_loop(
    engine: &Arc<DeviceEngine>,
    socket: &mut ServerSocket,
    opts: &ServerOptions,
    shutdown: &ShutdownSignal,
) -> Result<(), ServerError> {
    loop {
        let [pending, stop] = poll_readable([socket.listener.as_raw_fd(), shutdown.fd()], -1)
            .map_err(ServerError::Poll)?;
        if stop {
            return Ok(());
        }
        if pending {
            serve_connection(engine, &mut socket.listener, opts, shutdown)?;
        }
    }
}

/// Accepts the pending connection and serves it until the frontend leaves
/// or shutdown is requested.
fn serve_connection(
    engine: &Arc<DeviceEngine>,
    listener: &mut Listener,
    opts: &ServerOptions,
    shutdown: &ShutdownSignal,
) -> Result<(), ServerError> {
    let ended = EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK).map_err(ServerError::EventFd)?;
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = Arc::new(BlkBackend::new(Arc::clone(engine), opts, mem.clone())?);
    let mut daemon = VhostUserDaemon::new(DAEMON_THREAD_NAME.to_owned(), Arc::clone(&backend), mem)
        .map_err(daemon_error)?;
    // A connection is pending, so this accept returns at once.
    daemon.start(listener).map_err(daemon_error)?;
    info!("frontend connected");

    let handle = daemon.shutdown_handle();
    let watch = Watch {
        shutdown,
        ended: &ended,
        handshake: backend.handshake_event(),
        handshake_timeout: opts.handshake_timeout,
    };
    let result = thread::scope(|scope| {
        scope.spawn(|| watch.run(handle));
        let result = daemon.wait();
        // Releases the watcher; the write cannot fail on a fresh eventfd.
        let _ = ended.write(1);
        result
    });
    match result {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => info!("frontend disconnected"),
        Err(e) => warn!("frontend disconnected after an error: {e}"),
    }
    // Joins the queue workers; requests they handed to the I/O pool or
    // the flush thread may still run: wait for them.
    drop(daemon);
    backend.drain();
    backend.log_stats();
    if !shutdown.is_triggered() {
        // Whatever the guest did not flush should not wait for the next
        // connection (or be lost if the server is killed meanwhile).
        if let Err(e) = engine.device().flush() {
            error!("flushing the device after disconnect: {e}");
        }
    }
    Ok(())
}

/// What the watcher of one connection waits for.
struct Watch<'a> {
    shutdown: &'a ShutdownSignal,
    /// Written when the daemon's request loop has ended.
    ended: &'a EventFd,
    /// Written once the frontend has made its first handshake requests.
    handshake: &'a EventFd,
    handshake_timeout: Duration,
}

impl Watch<'_> {
    /// Waits for shutdown, the end of the connection or the handshake
    /// deadline. On shutdown, or when the frontend has not made its first
    /// handshake requests in time (it would hold the only connection slot),
    /// closes the connection so the daemon's request loop ends. Once the
    /// handshake is done the connection is never timed out: an established
    /// frontend may stay idle for as long as it likes.
    fn run(&self, handle: Option<ShutdownHandle>) {
        let deadline = Instant::now() + self.handshake_timeout;
        let mut handshake_done = false;
        loop {
            // poll(2) skips negative descriptors.
            let (handshake_fd, timeout_ms) = if handshake_done {
                (-1, -1)
            } else {
                let left = deadline.saturating_duration_since(Instant::now());
                let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                (self.handshake.as_raw_fd(), ms)
            };
            let ready = poll_readable(
                [self.shutdown.fd(), self.ended.as_raw_fd(), handshake_fd],
                timeout_ms,
            );
            match ready {
                Ok([true, _, _]) => {
                    info!("shutdown requested, closing the frontend connection");
                    break;
                }
                Ok([false, true, _]) => return,
                Ok([false, false, true]) => handshake_done = true,
                Ok([false, false, false]) => {
                    if Instant::now() >= deadline {
                        warn!(
                            timeout = ?self.handshake_timeout,
                            "the frontend did not ask for its features \
                             (GET_FEATURES, GET_PROTOCOL_FEATURES) in time; \
                             dropping the connection"
                        );
                        break;
                    }
                }
                Err(e) => {
                    error!("waiting for shutdown: {e}");
                    return;
                }
            }
        }
        if let Some(handle) = handle {
            handle.shutdown();
        }
    }
}

fn daemon_error(e: vhost_user_backend::Error) -> ServerError {
    ServerError::Daemon(e.to_string())
}

/// The listening socket; removed on drop if it is still ours.
struct ServerSocket {
    listener: Listener,
    path: PathBuf,
    /// Device and inode of the socket we created.
    id: (u64, u64),
    /// Held for the server's life; dropped after the socket is removed.
    _lock: SocketLock,
}

impl ServerSocket {
    /// Binds the claimed path: under its lock nobody else can be between
    /// the claim's checks and the rename, so of two servers started
    /// together on one path exactly one gets it. The path is checked once
    /// more (it may have changed since the claim was taken).
    fn bind_claimed(claim: SocketClaim) -> Result<Self, ServerError> {
        let SocketClaim { path, lock } = claim;
        let socket_error = |source| ServerError::Socket {
            path: path.clone(),
            source,
        };
        if check_existing(&path)? {
            info!(socket = %path.display(), "replacing a stale socket");
        }
        let listener = bind_private(&path).map_err(socket_error)?;
        let meta = fs::symlink_metadata(&path).map_err(socket_error)?;
        Ok(ServerSocket {
            // A Listener built from a UnixListener does not unlink the path
            // on drop: ServerSocket does, only if the socket is still ours.
            listener: Listener::from(listener),
            id: (meta.dev(), meta.ino()),
            path,
            _lock: lock,
        })
    }

    /// Claims and binds `path`.
    #[cfg(test)]
    fn bind(path: &Path) -> Result<Self, ServerError> {
        Self::bind_claimed(SocketClaim::take(path)?)
    }
}

/// A socket path checked and claimed, not bound yet: its length fits, its
/// directory exists, its lock file `<path>.lock` is held, and nothing is at
/// the path but a stale socket. `ociblk serve` takes it before it creates
/// any other file (the overlay), so that a bad `--socket` leaves nothing
/// behind; [`serve_claimed`] binds it once the device is open, so that a
/// client that reaches the socket finds a server ready. Dropped, it
/// removes the lock file again.
#[derive(Debug)]
pub struct SocketClaim {
    path: PathBuf,
    lock: SocketLock,
}

impl SocketClaim {
    /// Checks `path` and takes its lock file. A path that is not a socket
    /// is refused before the lock file is made; one that another server
    /// holds (its lock) or answers on is in use.
    pub fn take(path: &Path) -> Result<SocketClaim, ServerError> {
        check_socket_path(path)?;
        let dir = sys::parent_dir(path);
        if !dir.is_dir() {
            return Err(ServerError::Socket {
                path: path.to_owned(),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("its directory {} does not exist", dir.display()),
                ),
            });
        }
        check_existing(path)?;
        let lock = SocketLock::take(path)?;
        check_existing(path)?;
        Ok(SocketClaim {
            path: path.to_owned(),
            lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What is at a socket path about to be bound: nothing (`false`), a stale
/// socket (`true`: it is replaced), or an error: something that is not a
/// socket, or a socket someone answers on (a live server, also one that
/// takes no lock file, e.g. an older ociblk).
fn check_existing(path: &Path) -> Result<bool, ServerError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::SocketInUse(path.to_owned()));
            }
            Ok(true)
        }
        Ok(_) => Err(ServerError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(ServerError::Socket {
            path: path.to_owned(),
            source: e,
        }),
    }
}

impl Drop for ServerSocket {
    fn drop(&mut self) {
        let ours =
            fs::symlink_metadata(&self.path).is_ok_and(|meta| (meta.dev(), meta.ino()) == self.id);
        if ours && let Err(e) = fs::remove_file(&self.path) {
            warn!(socket = %self.path.display(), "cannot remove the socket: {e}");
        }
    }
}

/// Checks that a client can reach a socket at `path`: its length fits in
/// `sun_path`. Callers may check early, before creating other files.
pub fn check_socket_path(path: &Path) -> Result<(), ServerError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ServerError::SocketPathTooLong {
            path: path.to_owned(),
            len,
        });
    }
    Ok(())
}

/// The path of the lock file of the socket at `socket`.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut name = OsString::from(socket.as_os_str());
    name.push(LOCK_SUFFIX);
    PathBuf::from(name)
}

/// `<socket>.lock`, mode 0600, exclusively `flock`ed for the server's life.
/// Removed (while still locked) when the server ends; a killed server's
/// file stays behind unlocked and is simply taken by the next server.
#[derive(Debug)]
struct SocketLock {
    file: File,
    path: PathBuf,
}

impl SocketLock {
    fn take(socket: &Path) -> Result<Self, ServerError> {
        let path = lock_path(socket);
        let lock_error = |source| ServerError::SocketLock {
            path: path.clone(),
            source,
        };
        for _ in 0..LOCK_ATTEMPTS {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(SOCKET_MODE)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(lock_error)?;
            if !try_lock_exclusive(&file).map_err(lock_error)? {
                return Err(ServerError::SocketInUse(socket.to_owned()));
            }
            // The previous holder removes the file before unlocking it: if
            // we locked a removed file, someone else may hold a new one.
            let held = file.metadata().map_err(lock_error)?;
            let current = fs::symlink_metadata(&path);
            if current.is_ok_and(|m| (m.dev(), m.ino()) == (held.dev(), held.ino())) {
                return Ok(SocketLock { file, path });
            }
        }
        Err(lock_error(io::Error::other(
            "the lock file keeps being replaced",
        )))
    }
}

impl Drop for SocketLock {
    fn drop(&mut self) {
        // Removed before the descriptor (and so the lock) goes: whoever
        // opened the old file then sees it is gone and retries.
        let ours = fs::symlink_metadata(&self.path).is_ok_and(|m| {
            self.file
                .metadata()
                .is_ok_and(|held| (m.dev(), m.ino()) == (held.dev(), held.ino()))
        });
        if ours && let Err(e) = fs::remove_file(&self.path) {
            warn!(lock = %self.path.display(), "cannot remove the socket's lock file: {e}");
        }
    }
}

/// Start of the temporary names a server binds its socket under, in the
/// socket's directory: `.ociblk.<pid>.<n>`.
const TEMP_SOCKET_PREFIX: &str = ".ociblk.";

/// The start of every temporary socket name the server with process id
/// `pid` uses; what a crashed server may leave behind.
pub fn temp_socket_prefix(pid: u32) -> String {
    format!("{TEMP_SOCKET_PREFIX}{pid}.")
}

/// Binds a socket at `path` that only our user can connect to. The socket
/// is bound under a temporary name, restricted, then renamed into place,
/// so it never appears with looser permissions and a stale socket is
/// replaced atomically.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp = dir.join(format!("{}{n}", temp_socket_prefix(std::process::id())));
    // A leftover of an earlier process that had our pid.
    if fs::symlink_metadata(&temp).is_ok_and(|meta| meta.file_type().is_socket()) {
        let _ = fs::remove_file(&temp);
    }
    let listener = match UnixListener::bind(&temp) {
        Ok(listener) => listener,
        // The temporary name does not fit in sun_path while the real one
        // may: bind in place and restrict right after.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            let listener = UnixListener::bind(path)?;
            fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE))?;
            return Ok(listener);
        }
        Err(e) => return Err(e),
    };
    let placed = fs::set_permissions(&temp, fs::Permissions::from_mode(SOCKET_MODE))
        .and_then(|()| fs::rename(&temp, path));
    if let Err(e) = placed {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config;
    use crate::mem_disk::MemDisk;

    const DEADLINE: Duration = Duration::from_secs(10);

    /// Polls `condition` until it holds or the deadline passes.
    fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    const GET_FEATURES: u32 = 1;
    const GET_PROTOCOL_FEATURES: u32 = 15;

    /// Sends GET_FEATURES and returns the answer.
    fn get_features(stream: &mut UnixStream) -> u64 {
        get_u64(stream, GET_FEATURES)
    }

    /// Sends a request without payload and returns its u64 answer.
    fn get_u64(stream: &mut UnixStream, code: u32) -> u64 {
        const VERSION_1: u32 = 0x1;
        let mut request = Vec::new();
        for word in [code, VERSION_1, 0] {
            request.extend_from_slice(&word.to_le_bytes());
        }
        stream.write_all(&request).unwrap();
        let mut reply = [0u8; 20];
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..4], code.to_le_bytes());
        assert_eq!(reply[8..12], 8u32.to_le_bytes());
        u64::from_le_bytes(reply[12..].try_into().unwrap())
    }

    /// Whether the server closed `stream` within `within` (read gives EOF).
    fn closed_within(stream: &mut UnixStream, within: Duration) -> bool {
        stream.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 1];
        match stream.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => panic!("unexpected bytes from the server"),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("reading from the server: {e}"),
        }
    }

    struct Running {
        disk: Arc<MemDisk>,
        shutdown: ShutdownSignal,
        server: Option<thread::JoinHandle<Result<(), ServerError>>>,
        path: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Running {
        fn start() -> Self {
            Self::start_with(ServerOptions::default())
        }

        fn start_with(opts: ServerOptions) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk.sock");
            let disk = Arc::new(MemDisk::new(1 << 20));
            let shutdown = ShutdownSignal::new().unwrap();
            let server = {
                let (disk, path, shutdown) = (disk.clone(), path.clone(), shutdown.clone());
                thread::spawn(move || serve(disk, &path, &opts, shutdown))
            };
            wait_until("the socket", || path.exists());
            Running {
                disk,
                shutdown,
                server: Some(server),
                path,
                _dir: dir,
            }
        }

        fn stop(mut self) -> Result<(), ServerError> {
            self.shutdown.trigger();
            let server = self.server.take().unwrap();
            wait_until("the server to stop", || server.is_finished());
            server.join().unwrap()
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.shutdown.trigger();
        }
    }

    #[test]
    fn socket_mode_reconnect_and_shutdown() {
        let running = Running::start();
        let meta = fs::symlink_metadata(&running.path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, SOCKET_MODE);

        // Served, disconnected, served again.
        for _ in 0..2 {
            let mut stream = UnixStream::connect(&running.path).unwrap();
            let features = get_features(&mut stream);
            assert_eq!(features, config::virtio_features(false));
        }

        // Shutdown while a frontend is connected.
        let mut stream = UnixStream::connect(&running.path).unwrap();
        get_features(&mut stream);
        let path = running.path.clone();
        let disk = running.disk.clone();
        running.stop().unwrap();
        assert!(!path.exists(), "socket not removed");
        assert!(disk.flushes() >= 1, "device not flushed");
        // The connection was closed by the server.
        let mut buf = [0u8; 1];
        assert_eq!(stream.read(&mut buf).unwrap_or(0), 0);
    }

    #[test]
    fn silent_connection_is_dropped_but_an_idle_frontend_is_not() {
        let timeout = Duration::from_millis(300);
        let running = Running::start_with(ServerOptions {
            handshake_timeout: timeout,
            ..ServerOptions::default()
        });
        // Connects and says nothing: dropped, and the next client is served.
        let mut silent = UnixStream::connect(&running.path).unwrap();
        assert!(
            closed_within(&mut silent, DEADLINE),
            "silent connection kept"
        );
        // Only GET_FEATURES is not the whole handshake either.
        let mut half = UnixStream::connect(&running.path).unwrap();
        get_features(&mut half);
        assert!(closed_within(&mut half, DEADLINE), "half handshake kept");
        // A frontend that made its first requests may then stay idle.
        let mut idle = UnixStream::connect(&running.path).unwrap();
        get_features(&mut idle);
        get_u64(&mut idle, GET_PROTOCOL_FEATURES);
        assert!(
            !closed_within(&mut idle, timeout * 4),
            "established frontend dropped"
        );
        assert_eq!(get_features(&mut idle), config::virtio_features(false));
        running.stop().unwrap();
    }

    #[test]
    fn socket_path_longer_than_sun_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().as_os_str().len() + 1;
        let fits = dir.path().join("s".repeat(MAX_SOCKET_PATH - base));
        assert_eq!(fits.as_os_str().len(), MAX_SOCKET_PATH);
        let too_long = dir.path().join("s".repeat(MAX_SOCKET_PATH + 1 - base));
        let err = ServerSocket::bind(&too_long).err().unwrap();
        assert!(
            matches!(err, ServerError::SocketPathTooLong { len: 108, .. }),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&*too_long.to_string_lossy()) && message.contains("107 bytes"),
            "{message}"
        );
        // Nothing was created for it.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        // 107 bytes work, and a client reaches the socket.
        let socket = ServerSocket::bind(&fits).unwrap();
        UnixStream::connect(&fits).unwrap();
        drop(socket);
    }

    #[test]
    fn lock_file_is_private_held_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.sock");
        let socket = ServerSocket::bind(&path).unwrap();
        let lock = lock_path(&path);
        let meta = fs::symlink_metadata(&lock).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, SOCKET_MODE);
        let other = File::open(&lock).unwrap();
        assert!(!try_lock_exclusive(&other).unwrap(), "lock not held");
        drop(socket);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        // A killed server's lock file, left unlocked, is simply taken.
        fs::write(&lock, b"").unwrap();
        let socket = ServerSocket::bind(&path).unwrap();
        drop(socket);
        assert!(!lock.exists());
    }

    #[test]
    fn a_held_lock_refuses_the_socket_even_without_a_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.sock");
        // Another server between taking the lock and binding.
        let holder = File::create(lock_path(&path)).unwrap();
        assert!(try_lock_exclusive(&holder).unwrap());
        let err = ServerSocket::bind(&path).err().unwrap();
        assert!(matches!(err, ServerError::SocketInUse(_)), "{err}");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn of_two_servers_binding_at_once_exactly_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.sock");
        for round in 0..50 {
            let barrier = std::sync::Barrier::new(2);
            let results = thread::scope(|scope| {
                let bind = || {
                    barrier.wait();
                    ServerSocket::bind(&path)
                };
                let a = scope.spawn(bind);
                let b = scope.spawn(bind);
                [a.join().unwrap(), b.join().unwrap()]
            });
            let winners = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(winners, 1, "round {round}: {winners} servers bound");
            for r in &results {
                if let Err(e) = r {
                    assert!(matches!(e, ServerError::SocketInUse(_)), "{e}");
                }
            }
            // The winner's socket is the one at the path, and it answers.
            UnixStream::connect(&path).unwrap();
            drop(results);
            assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

    #[test]
    fn shutdown_while_idle() {
        let running = Running::start();
        let path = running.path.clone();
        running.stop().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn refuses_a_path_that_is_not_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        fs::write(&path, b"keep me").unwrap();
        let shutdown = ShutdownSignal::new().unwrap();
        let err = serve(
            Arc::new(MemDisk::new(4096)),
            &path,
            &ServerOptions::default(),
            shutdown,
        )
        .unwrap_err();
        assert!(matches!(err, ServerError::NotASocket(_)), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn replaces_a_stale_socket_but_not_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.sock");
        // A stale socket: bound, then its listener closed.
        drop(UnixListener::bind(&path).unwrap());
        let socket = ServerSocket::bind(&path).unwrap();
        assert_eq!(
            fs::symlink_metadata(&path).unwrap().permissions().mode() & 0o777,
            SOCKET_MODE
        );
        // Now live: a second server must not take it over.
        let err = ServerSocket::bind(&path).err().unwrap();
        assert!(matches!(err, ServerError::SocketInUse(_)), "{err}");
        // Nor one that does not take the lock file (an older ociblk): the
        // live check stays.
        let lock = lock_path(&path);
        fs::remove_file(&lock).unwrap();
        let err = ServerSocket::bind(&path).err().unwrap();
        assert!(matches!(err, ServerError::SocketInUse(_)), "{err}");
        drop(socket);
        assert!(!path.exists());
        // Nothing temporary left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn invalid_options_are_refused_before_binding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.sock");
        let opts = ServerOptions {
            queues: 0,
            ..ServerOptions::default()
        };
        let err = serve(
            Arc::new(MemDisk::new(4096)),
            &path,
            &opts,
            ShutdownSignal::new().unwrap(),
        )
        .unwrap_err();
        assert!(matches!(err, ServerError::QueueCount(0)));
        assert!(!path.exists());
    }

    #[test]
    fn signal_triggers_shutdown() {
        let shutdown = ShutdownSignal::new().unwrap();
        assert!(!shutdown.is_triggered());
        // SIGUSR2 stands in for SIGTERM, which would end the test process
        // if delivered before the handler is installed.
        shutdown.trigger_on(&[libc::SIGUSR2]).unwrap();
        // SAFETY: raise only sends a signal to this thread; its handler is
        // installed just above.
        assert_eq!(unsafe { libc::raise(libc::SIGUSR2) }, 0);
        wait_until("the signal", || shutdown.is_triggered());
        // Level-triggered: stays set, and clones see it.
        assert!(shutdown.clone().is_triggered());
    }
}
