// SPDX-License-Identifier: Apache-2.0

//! The vhost-user-blk client against QEMU's own backend, `qemu-storage-daemon`: proves
//! the client speaks the protocol the way the reference implementation expects.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use ociblk_client::{
    BlkStatus, ClientError, ClientOptions, GUEST_MEMORY_BASE, RawDesc, Request, SECTOR_SIZE, Token,
    VhostBlkClient,
};
use ociblk_tests::oci::pseudo_random;
use ociblk_tests::process::StorageDaemon;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

const QSD: &str = "qemu-storage-daemon";
const DISK_SIZE: u64 = 64 << 20;
const QSD_QUEUES: u16 = 2;
/// How long a malformed request is given before it counts as dropped by the backend.
const MALFORMED_WAIT: Duration = Duration::from_secs(1);

/// A daemon exporting a 64 MiB raw file; `fill` may write into it first.
fn qsd_with(fill: impl FnOnce(&File)) -> StorageDaemon {
    StorageDaemon::start(DISK_SIZE, QSD_QUEUES, false, fill)
}

fn qsd() -> StorageDaemon {
    qsd_with(|_| {})
}

/// Deterministic bytes, different for every seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    pseudo_random(len, seed)
}

fn opts(queues: u16) -> ClientOptions {
    ClientOptions {
        queues,
        ..ClientOptions::default()
    }
}

#[test]
fn handshake_and_config() {
    let qsd = qsd();
    let mut client = qsd.connect(opts(QSD_QUEUES));
    assert!(client.has_feature(VIRTIO_F_VERSION_1));
    let config = client.config().clone();
    assert_eq!(config.capacity, DISK_SIZE / SECTOR_SIZE);
    assert_eq!(config.capacity_bytes(), DISK_SIZE);
    assert_eq!(config.block_size(), 512);
    assert_eq!(client.num_queues(), QSD_QUEUES);
    assert_eq!(client.backend_queue_count(), Some(u64::from(QSD_QUEUES)));
    if let Some(n) = config.num_queues {
        assert_eq!(n, QSD_QUEUES);
    }
    assert!(config.discard.is_some(), "qsd offers discard: {config:?}");
    assert!(
        config.write_zeroes.is_some(),
        "qsd offers write zeroes: {config:?}"
    );
    eprintln!(
        "qsd: offered {:#x}, negotiated {:#x}, protocol {:?}, config {config:?}",
        client.offered_features(),
        client.features(),
        client.protocol_features()
    );

    let id = client.get_id(0).expect("get_id");
    assert_eq!(id.status, BlkStatus::Ok);
    assert_eq!(id.data.len(), 20);
    eprintln!("qsd: device id {:?}", String::from_utf8_lossy(&id.data));

    // The write cache mode is writable through SET_CONFIG.
    assert_eq!(config.writeback, Some(0));
    client.set_writeback(true).expect("set_writeback");
    assert_eq!(client.refresh_config().expect("config").writeback, Some(1));
    client.disconnect().expect("disconnect");
}

#[test]
fn write_read_patterns_reach_the_file() {
    let qsd = qsd();
    let mut client = qsd.connect(opts(1));
    // Disjoint ranges, 4 KiB aligned and only 512-byte aligned.
    let cases: [(u64, usize); 6] = [
        (0, 4096),
        (4096, 8192),
        ((512 << 10) + 3 * 512, 512),
        ((1 << 20) + 512, 3 * 512),
        ((2 << 20) + 2048, 65536),
        (DISK_SIZE - 4096, 4096),
    ];
    for (i, &(offset, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        let done = client.write(0, offset, &data).expect("write");
        assert_eq!(done.status, BlkStatus::Ok, "write at {offset}");
    }
    assert_eq!(client.flush(0).expect("flush").status, BlkStatus::Ok);
    for (i, &(offset, len)) in cases.iter().enumerate() {
        let expected = pattern(i as u64 + 1, len);
        let done = client.read(0, offset, len as u32).expect("read");
        assert_eq!(done.status, BlkStatus::Ok, "read at {offset}");
        assert!(done.data == expected, "read back at {offset} differs");
        assert!(
            qsd.read_image(offset, len) == expected,
            "image at {offset} differs"
        );
    }
}

#[test]
fn read_returns_what_the_file_holds() {
    const OFFSET: u64 = 5 << 20;
    let contents = pattern(77, 12288);
    let qsd = qsd_with(|file| file.write_all_at(&contents, OFFSET).expect("preload"));
    let mut client = qsd.connect(opts(1));
    let done = client.read(0, OFFSET, contents.len() as u32).expect("read");
    assert_eq!(done.status, BlkStatus::Ok);
    assert!(done.data == contents);
    // Unwritten parts of the sparse file read as zeroes.
    let zeros = client.read(0, OFFSET + 12288, 4096).expect("read");
    assert!(zeros.data.iter().all(|&b| b == 0));
}

#[test]
fn flush_write_zeroes_and_discard() {
    const OFFSET: u64 = 8 << 20;
    const LEN: u64 = 64 * 1024;
    let qsd = qsd();
    let mut client = qsd.connect(opts(1));
    let data = pattern(5, LEN as usize);
    assert!(client.write(0, OFFSET, &data).expect("write").is_ok());
    assert!(client.flush(0).expect("flush").is_ok());

    let zeroed = client
        .write_zeroes(0, OFFSET, LEN / 2, false)
        .expect("write_zeroes");
    assert_eq!(zeroed.status, BlkStatus::Ok);
    let back = client.read(0, OFFSET, LEN as u32).expect("read");
    assert!(back.data[..LEN as usize / 2].iter().all(|&b| b == 0));
    assert!(back.data[LEN as usize / 2..] == data[LEN as usize / 2..]);

    let unmapped = client
        .write_zeroes(0, OFFSET + LEN / 2, LEN / 2, true)
        .expect("write_zeroes unmap");
    assert_eq!(unmapped.status, BlkStatus::Ok);
    let back = client.read(0, OFFSET, LEN as u32).expect("read");
    assert!(back.data.iter().all(|&b| b == 0));

    let discarded = client.discard(0, OFFSET, LEN).expect("discard");
    assert_eq!(discarded.status, BlkStatus::Ok);
    assert!(client.flush(0).expect("flush").is_ok());
}

#[test]
fn out_of_range_requests_fail_with_ioerr() {
    let qsd = qsd();
    let mut client = qsd.connect(opts(1));
    let end = client.config().capacity_bytes();
    let past = client.read(0, end, 512).expect("read past end");
    assert_eq!(past.status, BlkStatus::IoErr);
    let straddling = client.read(0, end - 512, 1024).expect("read across end");
    assert_eq!(straddling.status, BlkStatus::IoErr);
    let write = client.write(0, end, &[0xaa; 512]).expect("write past end");
    assert_eq!(write.status, BlkStatus::IoErr);
    let zeroes = client
        .write_zeroes(0, end, 4096, false)
        .expect("zeroes past end");
    assert_eq!(zeroes.status, BlkStatus::IoErr);
    // The device is still usable afterwards.
    assert!(
        client
            .read(0, end - 512, 512)
            .expect("read last sector")
            .is_ok()
    );
}

#[test]
fn second_queue_works() {
    let qsd = qsd();
    let mut client = qsd.connect(opts(2));
    let data = pattern(9, 4096);
    assert!(
        client
            .write(1, 1 << 20, &data)
            .expect("write on queue 1")
            .is_ok()
    );
    let back = client.read(1, 1 << 20, 4096).expect("read on queue 1");
    assert!(back.is_ok() && back.data == data);
    let back = client.read(0, 1 << 20, 4096).expect("read on queue 0");
    assert!(back.is_ok() && back.data == data);
    assert!(matches!(
        client.read(2, 0, 512),
        Err(ClientError::NoSuchQueue { queue: 2, count: 2 })
    ));
}

#[test]
fn disconnect_and_reconnect() {
    let qsd = qsd();
    let data = pattern(11, 8192);
    let mut client = qsd.connect(opts(2));
    assert!(client.write(0, 4096, &data).expect("write").is_ok());
    client.disconnect().expect("disconnect");

    let mut client = qsd.connect(opts(1));
    let back = client.read(0, 4096, 8192).expect("read after reconnect");
    assert!(back.is_ok() && back.data == data);
    // Dropping without the ring shutdown is a disconnect too.
    drop(client);

    let mut client = qsd.connect(opts(2));
    let back = client
        .read(1, 4096, 8192)
        .expect("read after second reconnect");
    assert!(back.is_ok() && back.data == data);
}

/// Submits `count` writes and then `count` reads on queue 0 without waiting in
/// between, reaping completions in whatever order they come.
fn run_in_flight(client: &mut VhostBlkClient, count: usize, len: usize) {
    let queue = client.queue_mut(0).expect("queue 0");
    queue.set_auto_kick(false);
    let offset = |i: usize| (16 << 20) + (i * len) as u64;
    let mut writes = Vec::new();
    for i in 0..count {
        let data = pattern(1000 + i as u64, len);
        let token = queue
            .submit(Request::Write {
                offset: offset(i),
                data: &data,
            })
            .expect("submit write");
        writes.push(token);
    }
    assert_eq!(queue.in_flight(), count);
    queue.kick().expect("kick");
    let done = reap_all(queue, count);
    for token in &writes {
        assert_eq!(done.get(token).map(|c| c.0), Some(BlkStatus::Ok));
    }

    queue.set_auto_kick(true);
    let reads: Vec<Token> = (0..count)
        .map(|i| {
            queue
                .submit(Request::Read {
                    offset: offset(i),
                    len: len as u32,
                })
                .expect("submit read")
        })
        .collect();
    assert_eq!(queue.in_flight(), count);
    let done = reap_all(queue, count);
    for (i, token) in reads.iter().enumerate() {
        let (status, data) = done.get(token).expect("read completed");
        assert_eq!(*status, BlkStatus::Ok);
        assert!(*data == pattern(1000 + i as u64, len), "read {i} differs");
    }
    assert_eq!(queue.in_flight(), 0);
}

fn reap_all(
    queue: &mut ociblk_client::BlkQueue,
    count: usize,
) -> std::collections::HashMap<Token, (BlkStatus, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    let mut done = std::collections::HashMap::new();
    while done.len() < count {
        queue.poll_completions(&mut out).expect("poll");
        for c in out.drain(..) {
            done.insert(c.token, (c.status, c.data));
        }
        if done.len() == count {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "only {} of {count} completed", done.len());
        queue.wait_call(left).expect("wait_call");
    }
    done
}

#[test]
fn thirty_two_requests_in_flight() {
    let qsd = qsd();
    let mut client = qsd.connect(opts(1));
    run_in_flight(&mut client, 32, 4096);
    let stats = client.queue(0).expect("queue").stats();
    assert_eq!(stats.submitted, 64);
    assert_eq!(stats.completed, 64);
    eprintln!("direct chains, always kick: {stats:?}");
}

#[test]
fn thirty_two_in_flight_indirect_with_event_idx_suppression() {
    let qsd = qsd();
    let mut client = qsd.connect(ClientOptions {
        queue_size: 32,
        indirect: true,
        kick_suppression: true,
        ..opts(1)
    });
    assert!(client.has_feature(VIRTIO_RING_F_INDIRECT_DESC));
    assert!(client.has_feature(VIRTIO_RING_F_EVENT_IDX));
    run_in_flight(&mut client, 32, 4096);
    eprintln!(
        "indirect, EVENT_IDX kick suppression: {:?}",
        client.queue(0).expect("queue").stats()
    );
}

#[test]
fn without_event_idx() {
    let qsd = qsd();
    let mut client = qsd.connect(ClientOptions {
        event_idx: false,
        kick_suppression: true,
        ..opts(1)
    });
    assert!(!client.has_feature(VIRTIO_RING_F_EVENT_IDX));
    run_in_flight(&mut client, 16, 512);
}

/// What the backend did with one malformed request.
#[derive(Debug)]
enum Outcome {
    Completed { used_len: u32, status: Option<u8> },
    NoCompletion,
    Disconnected,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Completed { used_len, status } => {
                write!(f, "completed, used len {used_len}, status byte {status:?}")
            }
            Outcome::NoCompletion => write!(f, "no completion within {MALFORMED_WAIT:?}"),
            Outcome::Disconnected => write!(f, "backend closed the connection"),
        }
    }
}

fn submit_malformed(qsd: &mut StorageDaemon, name: &str, chain: &[RawDesc]) -> Outcome {
    let mut client = qsd.connect(opts(1));
    let token = client.submit_raw(0, chain).expect("submit_raw");
    let started = Instant::now();
    let outcome = match client.wait(0, token, Instant::now() + MALFORMED_WAIT) {
        Ok(done) => Outcome::Completed {
            used_len: done.used_len,
            status: done.status_byte(),
        },
        Err(ClientError::Timeout { .. }) => Outcome::NoCompletion,
        Err(ClientError::Disconnected { .. }) => Outcome::Disconnected,
        Err(e) => panic!("{name}: unexpected client error {e}"),
    };
    assert!(started.elapsed() < MALFORMED_WAIT + Duration::from_secs(1));
    eprintln!("qsd, {name}: {outcome}");
    drop(client);
    assert!(qsd.is_running(), "{QSD} died on {name}:\n{}", qsd.log());
    outcome
}

#[test]
fn malformed_chains_do_not_hang() {
    let mut qsd = qsd();
    let no_status = submit_malformed(
        &mut qsd,
        "no writable status descriptor",
        &[
            RawDesc::header(VIRTIO_BLK_T_IN, 0),
            RawDesc::readable(vec![0; 512]),
        ],
    );
    let short_header = submit_malformed(
        &mut qsd,
        "8-byte header",
        &[RawDesc::readable(vec![0; 8]), RawDesc::status()],
    );
    let read_only_status = submit_malformed(
        &mut qsd,
        "read-only status after a flush header",
        &[
            RawDesc::header(VIRTIO_BLK_T_FLUSH, 0),
            RawDesc::readable(vec![0xff]),
        ],
    );
    let read_only_status_after_data = submit_malformed(
        &mut qsd,
        "read-only status after writable read data",
        &[
            RawDesc::header(VIRTIO_BLK_T_IN, 0),
            RawDesc::writable(512),
            RawDesc::readable(vec![0xff]),
        ],
    );
    let outside = submit_malformed(
        &mut qsd,
        "data descriptor outside guest memory",
        &[
            RawDesc::header(VIRTIO_BLK_T_IN, 0),
            RawDesc::addr(GUEST_MEMORY_BASE / 2, 512, true),
            RawDesc::status(),
        ],
    );
    // Whatever those did, a fresh connection still gets correct service, including for
    // a well-formed request inside an indirect table.
    let mut client = qsd.connect(opts(1));
    let data = pattern(3, 1024);
    assert!(client.write(0, 512, &data).expect("write").is_ok());
    let token = client
        .submit_raw(
            0,
            &[RawDesc::indirect(vec![
                RawDesc::header(VIRTIO_BLK_T_IN, 1),
                RawDesc::writable(1024),
                RawDesc::status(),
            ])],
        )
        .expect("submit indirect");
    let done = client
        .wait(0, token, Instant::now() + Duration::from_secs(10))
        .expect("indirect request completes");
    assert_eq!(done.status_byte(), Some(0));
    assert!(done.writable[0] == data);
    assert_eq!(done.used_len, 1025);
    eprintln!(
        "qsd summary: no status: {no_status}; short header: {short_header}; \
         read-only status: {read_only_status}; read-only status after data: \
         {read_only_status_after_data}; outside memory: {outside}\nqsd log:\n{}",
        qsd.log()
    );
}

#[test]
fn unaligned_offsets_are_rejected_by_the_client() {
    let qsd = qsd();
    let mut client = qsd.connect(opts(1));
    assert!(matches!(
        client.read(0, 100, 512),
        Err(ClientError::InvalidRequest(_))
    ));
    assert!(matches!(
        client.discard(0, 0, 100),
        Err(ClientError::InvalidRequest(_))
    ));
    // Nothing was left in flight by the rejected requests.
    assert_eq!(client.queue(0).expect("queue").in_flight(), 0);
    assert!(client.read(0, 512, 512).expect("read").is_ok());
}
