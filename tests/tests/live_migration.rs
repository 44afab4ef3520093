//! Live migration of a node: the overlay hand-over between two servers
//! (`serve --wait-for-overlay`), and a QEMU guest (TCG) migrated under
//! O_DIRECT I/O to a second QEMU on this host, whose own server takes the
//! overlay over once the first one stopped. Without the server's dirty
//! page log the same migration loses bytes, and the test sees it.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use ociblk::qmp::{MigrationStatus, Qmp};
use ociblk::server::dirty_log::SKIP_DATA_LOG_ENV;
use ociblk_client::{BlkStatus, ClientOptions, VhostBlkClient};
use ociblk_tests::node::TestNode;
use ociblk_tests::oci::pseudo_random;
use ociblk_tests::process::{Boot, Guest, GuestConfig, Server};
use ociblk_tests::support::wait_until;
use sha2::{Digest, Sha256};

/// The log line of a server that opened its deferred overlay.
const OPENED: &str = "overlay opened at the disk's first use";

fn client(socket: &Path) -> VhostBlkClient {
    let opts = ClientOptions {
        timeout: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    VhostBlkClient::connect(socket, opts).unwrap()
}

#[test]
fn a_waiting_server_takes_the_overlay_once_the_holder_stops() {
    let node = TestNode::small("handover-1");
    let data_off = node.partition_offset(3);
    let mut source = node.serve(&[]);
    let before = pseudo_random(64 << 10, 1);
    {
        let mut c = client(&node.socket());
        assert_eq!(c.write(0, data_off, &before).unwrap().status, BlkStatus::Ok);
        c.disconnect().unwrap();
    }
    // Starts and answers the handshake while the overlay is locked.
    let dest_socket = node.dir().join("dest.sock");
    let mut dest = node.serve_files(&dest_socket, &node.overlay(), &["--wait-for-overlay", "60"]);
    let mut c = client(&dest_socket);
    assert_eq!(c.config().capacity_bytes(), 512 << 20);
    let reader = std::thread::spawn(move || {
        let got = c.read(0, data_off, 64 << 10).unwrap();
        (c, got)
    });
    // Whatever the reader does meanwhile, the overlay has one writer.
    assert!(source.try_exit().is_none());
    assert!(
        !dest.log.text().contains(OPENED),
        "opened while the source held the overlay:\n{}",
        dest.log.text()
    );
    source.stop_cleanly(Duration::from_secs(20), "stopping the source");
    let (mut c, got) = reader.join().unwrap();
    assert_eq!(got.status, BlkStatus::Ok);
    assert!(
        got.data == before,
        "the source's write, read at the destination"
    );
    dest.wait_for_line(&[OPENED]);
    let after = pseudo_random(4096, 2);
    assert_eq!(
        c.write(0, data_off + (1 << 20), &after).unwrap().status,
        BlkStatus::Ok
    );
    c.disconnect().unwrap();
    dest.stop_cleanly(Duration::from_secs(20), "stopping the destination");
    let disk = node.export_bytes(true);
    let at = |off: u64, len: usize| &disk[off as usize..off as usize + len];
    assert!(at(data_off, 64 << 10) == before.as_slice());
    assert!(at(data_off + (1 << 20), 4096) == after.as_slice());
}

#[test]
fn a_waiting_server_fails_requests_past_its_bound_and_recovers() {
    let node = TestNode::small("handover-2");
    let data_off = node.partition_offset(3);
    let mut source = node.serve(&[]);
    let dest_socket = node.dir().join("dest.sock");
    let mut dest = node.serve_files(&dest_socket, &node.overlay(), &["--wait-for-overlay", "1"]);
    let mut c = client(&dest_socket);
    let started = Instant::now();
    let failed = c.read(0, data_off, 4096).unwrap();
    assert_eq!(failed.status, BlkStatus::IoErr, "a read past the bound");
    assert!(started.elapsed() >= Duration::from_secs(1));
    dest.wait_for_line(&["cannot open the overlay", "in use by another process"]);
    // Past the bound a request tries once and does not wait.
    assert_eq!(
        c.flush(0).unwrap().status,
        BlkStatus::Ok,
        "nothing to flush"
    );
    assert_eq!(c.read(0, data_off, 4096).unwrap().status, BlkStatus::IoErr);
    source.stop_cleanly(Duration::from_secs(20), "stopping the source");
    let got = c.read(0, data_off, 4096).unwrap();
    assert_eq!(got.status, BlkStatus::Ok, "once the overlay is free");
    c.disconnect().unwrap();
    dest.stop_cleanly(Duration::from_secs(20), "stopping the destination");
}
