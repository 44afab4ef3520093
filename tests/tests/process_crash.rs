//! A write whose completion the server published survives the server
//! process dying, with no FLUSH in between: the client negotiates FLUSH (a
//! write-back cache, as Linux's driver does), writes, keeps its connection
//! open as a running guest does, the server is killed with SIGKILL, a new
//! server starts on the same overlay, the client connects again (as QEMU
//! does with `reconnect`), sends a FLUSH and reads everything back.
//!
//! Every kind of change is covered: whole and partial blocks, write-zeroes
//! and discard, in the ESP, both system partitions and the data partition,
//! on one and two queues, over the base disk and over a chain of layers.
//! After the second server's FLUSH, the map on disk (what `overlay info`
//! reports) holds every one of them: they are durable, not only in the page
//! cache.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ociblk_client::{BlkStatus, ClientOptions, VhostBlkClient};
use ociblk_tests::node::TestNode;
use ociblk_tests::oci::pseudo_random;
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;

const WAIT: Duration = Duration::from_secs(20);
const BS: u64 = 4096;

/// One change the test makes and then expects back.
enum Change {
    Write { offset: u64, data: Vec<u8> },
    Zeroes { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
}

impl Change {
    fn range(&self) -> (u64, u64) {
        match self {
            Change::Write { offset, data } => (*offset, data.len() as u64),
            Change::Zeroes { offset, len } | Change::Discard { offset, len } => (*offset, *len),
        }
    }

    fn expected(&self) -> Vec<u8> {
        match self {
            Change::Write { data, .. } => data.clone(),
            Change::Zeroes { len, .. } | Change::Discard { len, .. } => vec![0; *len as usize],
        }
    }
}

fn connect(node: &TestNode, queues: u16) -> VhostBlkClient {
    let c = node.connect(ClientOptions {
        queues,
        memory_size: 16 << 20,
        timeout: WAIT,
        ..ClientOptions::default()
    });
    assert!(
        c.has_feature(VIRTIO_BLK_F_FLUSH),
        "the client runs a write-back cache, as a guest does"
    );
    c
}

/// The changes: 5 x 64 KiB into blocks never written (the ESP, both system
/// partitions, the data partition twice), a partial-block write, a
/// write-zeroes and a discard over payload data, each on its own place.
fn changes(node: &TestNode, seed: u64) -> Vec<Change> {
    let esp = node.partition_offset(0);
    let sys_a = node.partition_offset(1);
    let sys_b = node.partition_offset(2);
    let data = node.partition_offset(3);
    let write = |offset: u64, len: usize, n: u64| Change::Write {
        offset,
        data: pseudo_random(len, seed ^ n),
    };
    vec![
        write(esp + (1 << 20), 64 << 10, 1),
        write(sys_a + (2 << 20), 64 << 10, 2),
        write(sys_b + (2 << 20), 64 << 10, 3),
        write(data, 64 << 10, 4),
        write(data + (8 << 20), 64 << 10, 5),
        // Three sectors in the middle of a payload block.
        write(sys_a + 5 * BS + 1024, 1536, 6),
        Change::Zeroes {
            offset: sys_a + 16 * BS,
            len: 3 * BS + 512,
        },
        Change::Discard {
            offset: sys_a + 32 * BS,
            len: 8 * BS,
        },
    ]
}

fn apply(c: &mut VhostBlkClient, queues: u16, changes: &[Change]) {
    for (i, change) in changes.iter().enumerate() {
        let q = i as u16 % queues;
        let done = match change {
            Change::Write { offset, data } => c.write(q, *offset, data),
            Change::Zeroes { offset, len } => c.write_zeroes(q, *offset, *len, false),
            Change::Discard { offset, len } => c.discard(q, *offset, *len),
        }
        .unwrap();
        assert_eq!(done.status, BlkStatus::Ok, "change {i}");
    }
}

fn check(c: &mut VhostBlkClient, changes: &[Change], what: &str) {
    for (i, change) in changes.iter().enumerate() {
        let (offset, len) = change.range();
        let done = c.read(0, offset, len as u32).unwrap();
        assert_eq!(done.status, BlkStatus::Ok, "{what}: reading change {i}");
        assert!(
            done.data == change.expected(),
            "{what}: change {i} ({len} bytes at {offset}) was lost"
        );
    }
}

/// Blocks the map on disk records as written or zeroed.
fn durable_blocks(node: &TestNode) -> (u64, u64) {
    let info = node.overlay_info_json();
    (
        info["blocks_written"].as_u64().unwrap(),
        info["blocks_zeroed"].as_u64().unwrap(),
    )
}

fn completed_writes_survive(node: &TestNode, queues: u16, extra: &[&str], seed: u64) {
    let what = format!("{queues} queue(s), serve {extra:?}");
    let changes = changes(node, seed);
    let mut server = node.serve(extra);
    let mut guest = connect(node, queues);
    // What the map on disk holds before: the writes are not flushed.
    let before = durable_blocks(node);
    apply(&mut guest, queues, &changes);
    assert_eq!(
        durable_blocks(node),
        before,
        "{what}: nothing was flushed yet"
    );

    // The server dies while the guest still holds its connection.
    server.stop_with(libc::SIGKILL, WAIT);
    let _ = std::fs::remove_file(node.socket());
    let _server = node.serve(extra);
    drop(guest);
    let mut guest = connect(node, queues);
    assert_eq!(guest.flush(0).unwrap().status, BlkStatus::Ok);
    check(&mut guest, &changes, &what);

    // The FLUSH made them durable: the map on disk has every block.
    let (written, zeroed) = durable_blocks(node);
    assert!(
        written > before.0 + 5 * 16,
        "{what}: the map on disk records {written} written blocks after the FLUSH"
    );
    assert!(
        zeroed >= before.1 + 3 + 8,
        "{what}: the map on disk records {zeroed} zeroed blocks after the FLUSH"
    );
    guest.disconnect().unwrap();
}

#[test]
fn completed_writes_survive_a_server_killed_before_any_flush_one_queue() {
    let node = TestNode::small("process-crash-1");
    completed_writes_survive(&node, 1, &["--queues", "1"], 0x17);
}

#[test]
fn completed_writes_survive_a_server_killed_before_any_flush_two_queues() {
    let node = TestNode::small("process-crash-2");
    completed_writes_survive(&node, 2, &["--queues", "2"], 0x27);
}

#[test]
fn completed_writes_survive_a_server_killed_before_any_flush_over_layers() {
    let node = TestNode::small("process-crash-3");
    // Two layers, each with writes over the same places, under the overlay.
    let mut layers = Vec::new();
    for n in 0..2u64 {
        // The overlay records its chain: no --layer needed.
        let mut server = node.serve(&[]);
        let mut c = connect(&node, 1);
        apply(&mut c, 1, &changes(&node, 0x100 + n));
        assert_eq!(c.flush(0).unwrap().status, BlkStatus::Ok);
        c.disconnect().unwrap();
        server.stop_cleanly(WAIT, "building a layer");
        let layer = node.dir().join(format!("layer{n}"));
        node.overlay_freeze(&layer);
        layers.push(layer);
    }
    completed_writes_survive(&node, 2, &["--queues", "2"], 0x37);
}
