// SPDX-License-Identifier: Apache-2.0

//! What a connection is asked to set up, and the check that it can work.

use std::time::Duration;

use vhost::vhost_user::message::VHOST_USER_CONFIG_SIZE;

use crate::ClientError;
use crate::config::{DEFAULT_CONFIG_SIZE, MIN_CONFIG_SIZE};

/// Largest split virtqueue size allowed by the virtio spec.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Connection settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// Queues to set up (at most what the backend offers).
    pub queues: u16,
    /// Descriptors per queue: a power of two, at most [`MAX_QUEUE_SIZE`].
    pub queue_size: u16,
    /// Bytes of guest memory (rings and request buffers).
    pub memory_size: usize,
    /// Bound on each vhost-user exchange and each blocking request.
    pub timeout: Duration,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` if offered.
    pub event_idx: bool,
    /// Put typed requests in an indirect table (one ring descriptor per request);
    /// needs `VIRTIO_RING_F_INDIRECT_DESC`.
    pub indirect: bool,
    /// Skip kicks the device suppressed (`avail_event` or `VRING_USED_F_NO_NOTIFY`);
    /// off means every submission kicks.
    pub kick_suppression: bool,
    /// Fill read buffers with [`POISON_BYTE`](crate::POISON_BYTE) before submitting
    /// (so data the device failed to write shows); benchmarks may turn it off.
    pub poison_buffers: bool,
    /// Bytes of config space to read.
    pub config_size: u32,
    /// Virtio features the client may ack, intersected with
    /// [`CLIENT_FEATURES`](crate::CLIENT_FEATURES).
    pub feature_mask: u64,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            queues: 1,
            queue_size: 128,
            memory_size: 64 << 20,
            timeout: Duration::from_secs(10),
            event_idx: true,
            indirect: false,
            kick_suppression: false,
            poison_buffers: true,
            config_size: DEFAULT_CONFIG_SIZE,
            feature_mask: u64::MAX,
        }
    }
}

/// Refuses options that cannot work, before anything is sent.
pub(crate) fn validate(opts: &ClientOptions) -> Result<(), ClientError> {
    let invalid = |why: String| Err(ClientError::InvalidOptions(why));
    if opts.queues == 0 {
        return invalid("at least one queue is needed".into());
    }
    if !opts.queue_size.is_power_of_two() || opts.queue_size > MAX_QUEUE_SIZE {
        return invalid(format!(
            "queue size {} is not a power of two up to {MAX_QUEUE_SIZE}",
            opts.queue_size
        ));
    }
    if opts.config_size < MIN_CONFIG_SIZE || opts.config_size > VHOST_USER_CONFIG_SIZE {
        return invalid(format!("config size {} out of range", opts.config_size));
    }
    if opts.timeout.is_zero() {
        return invalid("timeout must be positive".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_validated() {
        for opts in [
            ClientOptions {
                queues: 0,
                ..ClientOptions::default()
            },
            ClientOptions {
                queue_size: 100,
                ..ClientOptions::default()
            },
            ClientOptions {
                config_size: 0,
                ..ClientOptions::default()
            },
        ] {
            assert!(matches!(
                validate(&opts),
                Err(ClientError::InvalidOptions(_))
            ));
        }
        validate(&ClientOptions::default()).unwrap();
    }
}
