//! What runs a device's requests for every connection of a server: the
//! I/O pool and the flush thread. Made once per served device, so its
//! threads persist across frontend connections.

use std::sync::Arc;

use super::ServerError;
use super::config::ServerOptions;
use super::flusher::{FlushHandle, Flusher};
use super::io_pool::IoPool;
use crate::device::BlockDevice;

pub struct DeviceEngine {
    device: Arc<dyn BlockDevice>,
    pool: IoPool,
    flusher: Flusher,
}

impl std::fmt::Debug for DeviceEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceEngine")
            .field("pool", &self.pool)
            .field("flusher", &self.flusher)
            .finish_non_exhaustive()
    }
}

impl DeviceEngine {
    /// Starts `opts.io_threads` I/O helpers and the flush thread for `device`.
    pub fn new(device: Arc<dyn BlockDevice>, opts: &ServerOptions) -> Result<Self, ServerError> {
        let pool = IoPool::new(opts.io_threads).map_err(ServerError::Threads)?;
        let flusher = Flusher::new(Arc::clone(&device)).map_err(ServerError::Threads)?;
        Ok(DeviceEngine {
            device,
            pool,
            flusher,
        })
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    pub fn pool(&self) -> &IoPool {
        &self.pool
    }

    pub fn flusher(&self) -> FlushHandle {
        self.flusher.handle()
    }

    /// Device flushes run by the flush thread so far.
    pub fn flush_rounds(&self) -> u64 {
        self.flusher.rounds()
    }
}
