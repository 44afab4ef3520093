// SPDX-License-Identifier: Apache-2.0

//! The steps of the vhost-user handshake a VMM does before a guest runs: features,
//! protocol features, queue count, config space, memory table and rings. Each step
//! checks what the backend answered and fails naming what is missing.

use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::config::BlkConfig;
use crate::control::Control;
use crate::memory::{BufferPool, GUEST_MEMORY_BASE, GuestRam, PAGE_SIZE, SharedRam};
use crate::queue::{BlkQueue, QueueSettings, RingLayout};
use crate::{ClientError, ClientOptions};

/// Smallest buffer pool a queue gets; below this `memory_size` is rejected.
const MIN_POOL_SIZE: u64 = 64 * 1024;

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// Virtio features the client understands and acks when offered.
pub const CLIENT_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_BLK_F_SIZE_MAX)
    | bit(VIRTIO_BLK_F_SEG_MAX)
    | bit(VIRTIO_BLK_F_GEOMETRY)
    | bit(VIRTIO_BLK_F_RO)
    | bit(VIRTIO_BLK_F_BLK_SIZE)
    | bit(VIRTIO_BLK_F_FLUSH)
    | bit(VIRTIO_BLK_F_TOPOLOGY)
    | bit(VIRTIO_BLK_F_CONFIG_WCE)
    | bit(VIRTIO_BLK_F_MQ)
    | bit(VIRTIO_BLK_F_DISCARD)
    | bit(VIRTIO_BLK_F_WRITE_ZEROES);

/// Virtio features offered by the backend and those the client will ack.
pub(crate) struct Features {
    pub(crate) offered: u64,
    pub(crate) acked: u64,
}

/// `GET_FEATURES`: picks the features to ack from the backend's offer and `opts`.
pub(crate) fn negotiate_features(
    control: &mut Control,
    opts: &ClientOptions,
) -> Result<Features, ClientError> {
    let offered = control.call("GET_FEATURES", |f| f.get_features())?;
    if offered & bit(VIRTIO_F_VERSION_1) == 0 {
        return Err(ClientError::MissingFeature("VIRTIO_F_VERSION_1"));
    }
    if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
        return Err(ClientError::MissingFeature(
            "VHOST_USER_F_PROTOCOL_FEATURES",
        ));
    }
    let mut wanted = CLIENT_FEATURES & opts.feature_mask;
    if !opts.event_idx {
        wanted &= !bit(VIRTIO_RING_F_EVENT_IDX);
    }
    // Version 1 and protocol features are not optional for this client.
    wanted |= bit(VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    let acked = offered & wanted;
    if opts.indirect && acked & bit(VIRTIO_RING_F_INDIRECT_DESC) == 0 {
        return Err(ClientError::MissingFeature("VIRTIO_RING_F_INDIRECT_DESC"));
    }
    Ok(Features { offered, acked })
}

/// `GET_PROTOCOL_FEATURES` and `SET_PROTOCOL_FEATURES`: config space is required, multiple
/// queues and reply acks are taken when offered.
pub(crate) fn negotiate_protocol_features(
    control: &mut Control,
) -> Result<VhostUserProtocolFeatures, ClientError> {
    let offered = control.call("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
    if !offered.contains(VhostUserProtocolFeatures::CONFIG) {
        return Err(ClientError::MissingFeature("VHOST_USER_PROTOCOL_F_CONFIG"));
    }
    let protocol_features = offered
        & (VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK);
    control.call("SET_PROTOCOL_FEATURES", |f| {
        f.set_protocol_features(protocol_features)
    })?;
    if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        // From now on every message without a reply of its own is acknowledged, so
        // the backend's errors surface on the message that caused them.
        control
            .frontend
            .set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    Ok(protocol_features)
}

/// `GET_QUEUE_NUM` when the backend has `MQ`; fails if it has fewer than `requested`
/// queues (one without `MQ`). Returns the backend's count, if it told one.
pub(crate) fn backend_queue_count(
    control: &mut Control,
    protocol_features: VhostUserProtocolFeatures,
    requested: u16,
) -> Result<Option<u64>, ClientError> {
    let backend_queues = if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
        Some(control.call("GET_QUEUE_NUM", |f| f.get_queue_num())?)
    } else {
        None
    };
    check_queue_count(requested, backend_queues.unwrap_or(1))?;
    Ok(backend_queues)
}

/// Fails if `requested` queues are more than the `available` ones.
pub(crate) fn check_queue_count(requested: u16, available: u64) -> Result<(), ClientError> {
    if u64::from(requested) > available {
        return Err(ClientError::TooManyQueues {
            requested,
            available,
        });
    }
    Ok(())
}

/// `GET_CONFIG`: the first `size` bytes of config space, parsed for `features`.
pub(crate) fn read_config(
    control: &mut Control,
    size: u32,
    features: u64,
) -> Result<BlkConfig, ClientError> {
    let request = vec![0u8; size as usize];
    let (_, payload) = control.call("GET_CONFIG", |f| {
        f.get_config(0, size, VhostUserConfigFlags::empty(), &request)
    })?;
    BlkConfig::parse(&payload, features)
        .ok_or_else(|| ClientError::Config(format!("{} bytes is too short", payload.len())))
}

/// Creates `size` bytes of guest memory and shares it with `SET_MEM_TABLE`.
pub(crate) fn share_guest_memory(
    control: &mut Control,
    size: usize,
) -> Result<SharedRam, ClientError> {
    let ram: SharedRam = Arc::new(GuestRam::new(size)?);
    let region = ram.region_info()?;
    control.call("SET_MEM_TABLE", |f| f.set_mem_table(&[region]).map(drop))?;
    Ok(ram)
}

/// The settings of every queue, from `opts`, the acked `features` and the config space.
pub(crate) fn queue_settings(
    opts: &ClientOptions,
    features: u64,
    config: &BlkConfig,
) -> QueueSettings {
    QueueSettings {
        size: opts.queue_size,
        event_idx: features & bit(VIRTIO_RING_F_EVENT_IDX) != 0,
        kick_suppression: opts.kick_suppression,
        indirect: opts.indirect,
        poison: opts.poison_buffers,
        timeout: opts.timeout,
        // Like a driver that negotiated SIZE_MAX (Linux): data buffers
        // are split into descriptors of at most size_max.
        size_max: config.size_max.filter(|&m| m > 0),
    }
}

/// Lays out the rings and buffer pools in guest memory and hands every ring to the
/// backend.
pub(crate) fn setup_queues(
    control: &mut Control,
    ram: &SharedRam,
    count: u16,
    settings: QueueSettings,
) -> Result<Vec<BlkQueue>, ClientError> {
    let mut next = GUEST_MEMORY_BASE;
    let rings: Vec<RingLayout> = (0..count)
        .map(|_| {
            let ring = RingLayout::new(next, settings.size);
            next = ring.end;
            ring
        })
        .collect();
    let end = GUEST_MEMORY_BASE + ram.size();
    let per_queue = end.saturating_sub(next) / u64::from(count) / PAGE_SIZE * PAGE_SIZE;
    if per_queue < MIN_POOL_SIZE {
        return Err(ClientError::InvalidOptions(format!(
            "memory size {} leaves {per_queue} bytes of buffers per queue",
            ram.size()
        )));
    }

    let mut queues = Vec::with_capacity(usize::from(count));
    for (i, ring) in rings.into_iter().enumerate() {
        let pool_start = next + per_queue * i as u64;
        let pool = BufferPool::new(pool_start, pool_start + per_queue);
        let queue = BlkQueue::new(
            i as u16,
            settings,
            Arc::clone(ram),
            ring,
            pool,
            Arc::clone(&control.sock),
        )?;
        hand_over_ring(control, ram, &queue, settings.size)?;
        queues.push(queue);
    }
    Ok(queues)
}

/// Gives the backend `queue`'s ring of `size` entries, its eventfds, and enables it.
fn hand_over_ring(
    control: &mut Control,
    ram: &SharedRam,
    queue: &BlkQueue,
    size: u16,
) -> Result<(), ClientError> {
    let index = queue.index();
    let i = usize::from(index);
    let (desc, avail, used) = queue.ring_addresses();
    let addrs = VringConfigData {
        queue_max_size: size,
        queue_size: size,
        flags: 0,
        desc_table_addr: ram.host_address(desc)?,
        used_ring_addr: ram.host_address(used)?,
        avail_ring_addr: ram.host_address(avail)?,
        log_addr: None,
    };
    let msg = |name: &str| format!("{name} (queue {index})");
    control.call(msg("SET_VRING_NUM"), |f| f.set_vring_num(i, size))?;
    control.call(msg("SET_VRING_BASE"), |f| f.set_vring_base(i, 0))?;
    control.call(msg("SET_VRING_ADDR"), |f| f.set_vring_addr(i, &addrs))?;
    control.call(msg("SET_VRING_CALL"), |f| {
        f.set_vring_call(i, queue.call_fd())
    })?;
    control.call(msg("SET_VRING_KICK"), |f| {
        f.set_vring_kick(i, queue.kick_fd())
    })?;
    control.call(msg("SET_VRING_ENABLE"), |f| f.set_vring_enable(i, true))?;
    Ok(())
}
