// SPDX-License-Identifier: Apache-2.0

//! The vhost-user control channel: the socket, connected with bounded retries, and
//! every exchange on it bounded by a watchdog.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use vhost::vhost_user::Frontend;

use crate::ClientError;

/// Interval between connection attempts while the listener refuses connections.
const CONNECT_RETRY_INTERVAL: Duration = Duration::from_millis(10);

/// The vhost-user control channel: a [`Frontend`] plus a watchdog bounding each exchange.
pub(crate) struct Control {
    pub(crate) frontend: Frontend,
    /// The socket, for the queues to watch and for shutting it down.
    pub(crate) sock: Arc<UnixStream>,
    pub(crate) timeout: Duration,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("sock", &self.sock)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Control {
    /// Connects to the backend listening on `socket`, for a frontend of `queues` queues.
    pub(crate) fn connect(
        socket: &Path,
        queues: u16,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let stream = connect_socket(socket, timeout)?;
        let sock = Arc::new(stream.try_clone().map_err(|source| ClientError::Connect {
            path: socket.to_owned(),
            source,
        })?);
        Ok(Self {
            frontend: Frontend::from_stream(stream, u64::from(queues)),
            sock,
            timeout,
        })
    }

    /// Runs one vhost-user exchange; if it takes longer than the timeout, a watchdog
    /// thread shuts the socket down, which makes the blocked send/receive return.
    pub(crate) fn call<T>(
        &mut self,
        message: impl Into<String>,
        exchange: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, ClientError> {
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let fired = AtomicBool::new(false);
        let (sock, timeout, frontend) = (&*self.sock, self.timeout, &mut self.frontend);
        let fired_ref = &fired;
        let result = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("vhost-user-watchdog".into())
                .spawn_scoped(scope, move || {
                    if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
                        fired_ref.store(true, Ordering::SeqCst);
                        let _ = sock.shutdown(Shutdown::Both);
                    }
                })
                .map_err(ClientError::Watchdog)?;
            let result = exchange(frontend);
            drop(done_tx);
            Ok(result)
        })?;
        let message = message.into();
        if fired.load(Ordering::SeqCst) {
            return Err(ClientError::ControlTimeout { message, timeout });
        }
        result.map_err(|source| ClientError::VhostUser { message, source })
    }
}

fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(sock) => return Ok(sock),
            // The listener exists but is not accepting yet: retry, bounded.
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(CONNECT_RETRY_INTERVAL);
            }
            Err(source) => {
                return Err(ClientError::Connect {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
}
