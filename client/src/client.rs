// SPDX-License-Identifier: Apache-2.0

//! [`VhostBlkClient`]: one connection to a backend, the queues it set up and the
//! requests sent on them by queue number.

use std::net::Shutdown;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::VhostBackend;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;

use crate::config::BlkConfig;
use crate::control::Control;
use crate::handshake::{
    backend_queue_count, check_queue_count, negotiate_features, negotiate_protocol_features,
    queue_settings, read_config, setup_queues, share_guest_memory,
};
use crate::memory::SharedRam;
use crate::options::validate;
use crate::queue::BlkQueue;
use crate::request::{Completion, RawCompletion, RawDesc, Request, Token};
use crate::{ClientError, ClientOptions};

/// A connection to a vhost-user-blk backend, with its guest memory and queues.
///
/// Dropping the client closes the socket; [`disconnect`](Self::disconnect) first stops
/// the rings the way a VMM does.
pub struct VhostBlkClient {
    control: Control,
    offered_features: u64,
    features: u64,
    protocol_features: VhostUserProtocolFeatures,
    backend_queues: Option<u64>,
    config_size: u32,
    config: BlkConfig,
    queues: Vec<BlkQueue>,
    ram: SharedRam,
}

impl std::fmt::Debug for VhostBlkClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostBlkClient")
            .field("control", &self.control)
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol_features", &self.protocol_features)
            .field("backend_queues", &self.backend_queues)
            .field("config", &self.config)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

impl VhostBlkClient {
    /// Connects to the backend listening on `socket` and sets up `opts.queues` queues.
    pub fn connect(socket: &Path, opts: ClientOptions) -> Result<Self, ClientError> {
        validate(&opts)?;
        let mut control = Control::connect(socket, opts.queues, opts.timeout)?;
        let features = negotiate_features(&mut control, &opts)?;
        let protocol_features = negotiate_protocol_features(&mut control)?;
        let backend_queues = backend_queue_count(&mut control, protocol_features, opts.queues)?;
        control.call("SET_OWNER", |f| f.set_owner())?;
        let config = read_config(&mut control, opts.config_size, features.acked)?;
        if let Some(n) = config.num_queues {
            check_queue_count(opts.queues, u64::from(n))?;
        }
        control.call("SET_FEATURES", |f| f.set_features(features.acked))?;
        let ram = share_guest_memory(&mut control, opts.memory_size)?;
        let settings = queue_settings(&opts, features.acked, &config);
        let queues = setup_queues(&mut control, &ram, opts.queues, settings)?;
        Ok(Self {
            control,
            offered_features: features.offered,
            features: features.acked,
            protocol_features,
            backend_queues,
            config_size: opts.config_size,
            config,
            queues,
            ram,
        })
    }

    /// Virtio features the backend offered.
    pub fn offered_features(&self) -> u64 {
        self.offered_features
    }

    /// Virtio features negotiated (acked with `SET_FEATURES`).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether virtio feature `bit` was negotiated.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < u64::BITS && self.features & (1 << bit) != 0
    }

    /// vhost-user protocol features negotiated.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// Queue count from `GET_QUEUE_NUM`, if the backend supports `MQ`.
    pub fn backend_queue_count(&self) -> Option<u64> {
        self.backend_queues
    }

    /// The config space read at connect (or by the last [`refresh_config`](Self::refresh_config)).
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Reads the config space again.
    pub fn refresh_config(&mut self) -> Result<&BlkConfig, ClientError> {
        self.config = read_config(&mut self.control, self.config_size, self.features)?;
        Ok(&self.config)
    }

    /// Switches the write cache mode (`VIRTIO_BLK_F_CONFIG_WCE`) with `SET_CONFIG`.
    pub fn set_writeback(&mut self, writeback: bool) -> Result<(), ClientError> {
        if !self.has_feature(VIRTIO_BLK_F_CONFIG_WCE) {
            return Err(ClientError::MissingFeature("VIRTIO_BLK_F_CONFIG_WCE"));
        }
        let value = [u8::from(writeback)];
        self.control.call("SET_CONFIG (wce)", |f| {
            f.set_config(BlkConfig::WCE_OFFSET, VhostUserConfigFlags::empty(), &value)
        })
    }

    /// Number of queues this client set up.
    pub fn num_queues(&self) -> u16 {
        self.queues.len() as u16
    }

    /// The bound used for control messages and blocking requests.
    pub fn timeout(&self) -> Duration {
        self.control.timeout
    }

    /// Bytes of guest memory.
    pub fn memory_size(&self) -> u64 {
        self.ram.size()
    }

    /// Queue `queue`.
    pub fn queue(&self, queue: u16) -> Result<&BlkQueue, ClientError> {
        let count = self.num_queues();
        self.queues
            .get(usize::from(queue))
            .ok_or(ClientError::NoSuchQueue { queue, count })
    }

    /// Queue `queue`, for submitting and reaping.
    pub fn queue_mut(&mut self, queue: u16) -> Result<&mut BlkQueue, ClientError> {
        let count = self.num_queues();
        self.queues
            .get_mut(usize::from(queue))
            .ok_or(ClientError::NoSuchQueue { queue, count })
    }

    /// All queues, e.g. to drive each from its own thread.
    pub fn queues_mut(&mut self) -> &mut [BlkQueue] {
        &mut self.queues
    }

    /// Submits a typed request on `queue`; see [`BlkQueue::submit`].
    pub fn submit(&mut self, queue: u16, request: Request<'_>) -> Result<Token, ClientError> {
        self.queue_mut(queue)?.submit(request)
    }

    /// Submits a raw descriptor chain on `queue`; see [`BlkQueue::submit_raw`].
    pub fn submit_raw(
        &mut self,
        queue: u16,
        descriptors: &[RawDesc],
    ) -> Result<Token, ClientError> {
        self.queue_mut(queue)?.submit_raw(descriptors)
    }

    /// Notifies the device of published requests; see [`BlkQueue::kick`].
    pub fn kick(&mut self, queue: u16) -> Result<(), ClientError> {
        self.queue_mut(queue)?.kick()
    }

    /// Reaps finished typed requests without blocking; see [`BlkQueue::poll_completions`].
    pub fn poll_completions(
        &mut self,
        queue: u16,
        out: &mut Vec<Completion>,
    ) -> Result<usize, ClientError> {
        self.queue_mut(queue)?.poll_completions(out)
    }

    /// Waits for typed request `token`; see [`BlkQueue::wait_completion`].
    pub fn wait_completion(
        &mut self,
        queue: u16,
        token: Token,
        deadline: Instant,
    ) -> Result<Completion, ClientError> {
        self.queue_mut(queue)?.wait_completion(token, deadline)
    }

    /// Waits for raw request `token`; see [`BlkQueue::wait`].
    pub fn wait(
        &mut self,
        queue: u16,
        token: Token,
        deadline: Instant,
    ) -> Result<RawCompletion, ClientError> {
        self.queue_mut(queue)?.wait(token, deadline)
    }

    /// Blocks on `queue`'s call eventfd; see [`BlkQueue::wait_call`].
    pub fn wait_call(&mut self, queue: u16, timeout: Duration) -> Result<bool, ClientError> {
        self.queue_mut(queue)?.wait_call(timeout)
    }

    /// Reads `len` bytes at byte `offset`; the data is in [`Completion::data`].
    pub fn read(&mut self, queue: u16, offset: u64, len: u32) -> Result<Completion, ClientError> {
        self.queue_mut(queue)?.read(offset, len)
    }

    /// Writes `data` at byte `offset`.
    pub fn write(
        &mut self,
        queue: u16,
        offset: u64,
        data: &[u8],
    ) -> Result<Completion, ClientError> {
        self.queue_mut(queue)?.write(offset, data)
    }

    /// Flushes the write cache.
    pub fn flush(&mut self, queue: u16) -> Result<Completion, ClientError> {
        self.queue_mut(queue)?.flush()
    }

    /// Discards `len` bytes at byte `offset`.
    pub fn discard(
        &mut self,
        queue: u16,
        offset: u64,
        len: u64,
    ) -> Result<Completion, ClientError> {
        self.queue_mut(queue)?.discard(offset, len)
    }

    /// Zeroes `len` bytes at byte `offset`, allowing unmapping if `unmap`.
    pub fn write_zeroes(
        &mut self,
        queue: u16,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<Completion, ClientError> {
        self.queue_mut(queue)?.write_zeroes(offset, len, unmap)
    }

    /// Fetches the device ID; the 20 bytes are in [`Completion::data`].
    pub fn get_id(&mut self, queue: u16) -> Result<Completion, ClientError> {
        self.queue_mut(queue)?.get_id()
    }

    /// Stops every ring with `GET_VRING_BASE` (as a VMM does before it lets go of a
    /// backend) and closes the connection. The socket is closed even if a ring fails
    /// to stop; the first error is returned.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        let mut result = Ok(());
        for queue in 0..self.queues.len() {
            let stopped = self
                .control
                .call(format!("GET_VRING_BASE (queue {queue})"), |f| {
                    f.get_vring_base(queue)
                });
            if let (Err(e), Ok(())) = (stopped, &result) {
                result = Err(e);
            }
        }
        let _ = self.control.sock.shutdown(Shutdown::Both);
        result
    }
}

impl Drop for VhostBlkClient {
    fn drop(&mut self) {
        // Makes the backend see the disconnect now, even while queue handles or the
        // frontend still hold descriptors of the socket.
        let _ = self.control.sock.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;

    /// A "backend" that accepts one connection and runs `serve` on it.
    fn fake_backend(
        serve: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("backend.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let handle = std::thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                serve(stream);
            }
        });
        (dir, path, handle)
    }

    fn short_timeout() -> ClientOptions {
        ClientOptions {
            timeout: Duration::from_millis(200),
            ..ClientOptions::default()
        }
    }

    #[test]
    fn silent_backend_hits_the_control_timeout() {
        // Reads everything, answers nothing, until the client goes away.
        let (_dir, path, server) = fake_backend(|mut stream| {
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink);
        });
        let start = Instant::now();
        let err = VhostBlkClient::connect(&path, short_timeout()).expect_err("must time out");
        assert!(
            matches!(&err, ClientError::ControlTimeout { message, .. } if message == "GET_FEATURES"),
            "{err}"
        );
        assert!(start.elapsed() < Duration::from_secs(2));
        server.join().expect("server thread");
    }

    #[test]
    fn backend_hanging_up_names_the_message() {
        let (_dir, path, server) = fake_backend(drop);
        let err = VhostBlkClient::connect(&path, short_timeout()).expect_err("must fail");
        assert!(
            matches!(&err, ClientError::VhostUser { message, .. } if message == "GET_FEATURES"),
            "{err}"
        );
        server.join().expect("server thread");
    }

    #[test]
    fn missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = VhostBlkClient::connect(&dir.path().join("nothing"), short_timeout())
            .expect_err("must fail");
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    }
}
