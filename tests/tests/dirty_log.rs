//! Dirty page logging (VHOST_F_LOG_ALL, LOG_SHMFD) through the real
//! server, with a frontend that hands over its own log: what a request
//! writes into guest memory (read data, status byte, used ring) is marked,
//! nothing else is, also after a new memory table; without a log requests
//! are served as before.
//!
//! The log can only be installed through vhost-user-backend's handler
//! (SET_LOG_BASE), so this is tested over the socket, not in the crate.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use ociblk_tests::node::TestNode;
use ociblk_tests::raw_vhost::{
    self, Answer, BUFFERS, DESC_F_NEXT, DESC_F_WRITE, F_LOG_ALL, PF_LOG_SHMFD, RawFrontend,
    USED_RING, log_payload,
};

const TIMEOUT: Duration = Duration::from_secs(10);
/// Guest memory: 256 pages of 4 KiB, so the log is 32 bytes.
const MEM: usize = 1 << 20;
const PAGE: u64 = 4096;
const PAGES: u64 = MEM as u64 / PAGE;
const LOG_BYTES: u64 = PAGES / 8;

/// The request's buffers: the header on its own page, 4 KiB of data
/// straddling two pages, the status byte on a third.
const HEADER: u64 = BUFFERS;
const DATA: u64 = 0x2_0800;
const STATUS: u64 = 0x3_0000;

/// The pages whose bit is set in `log`.
fn marked(log: &OwnedFd) -> Vec<u64> {
    let file = File::from(log.try_clone().unwrap());
    let mut bytes = vec![0u8; LOG_BYTES as usize];
    file.read_exact_at(&mut bytes, 0).unwrap();
    (0..PAGES)
        .filter(|&p| bytes[(p / 8) as usize] & (1 << (p % 8)) != 0)
        .collect()
}

/// Clears the log, as QEMU does each time it syncs it.
fn clear(log: &OwnedFd) {
    let file = File::from(log.try_clone().unwrap());
    file.write_all_at(&vec![0u8; LOG_BYTES as usize], 0)
        .unwrap();
}

/// Reads the disk's first 4 KiB (protective MBR, GPT header) with the
/// chain at descriptors `first..first + 3` and waits for its completion.
fn read_first_block(fe: &mut RawFrontend, first: u16) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&0u32.to_le_bytes());
    fe.mem.write(HEADER, &header);
    fe.mem.write(DATA, &[0xee; PAGE as usize]);
    fe.mem.write(STATUS, &[0xff]);
    fe.set_desc(first, HEADER, 16, DESC_F_NEXT, first + 1);
    fe.set_desc(
        first + 1,
        DATA,
        PAGE as u32,
        DESC_F_NEXT | DESC_F_WRITE,
        first + 2,
    );
    fe.set_desc(first + 2, STATUS, 1, DESC_F_WRITE, 0);
    let used = fe.used_idx().wrapping_add(1);
    fe.publish(first);
    assert!(fe.wait_used(used, TIMEOUT), "the read did not complete");
    assert_eq!(fe.mem.read(STATUS, 1), [0], "status of the read");
    let data = fe.mem.read(DATA, PAGE as usize);
    assert_eq!(data[510..512], [0x55, 0xaa], "protective MBR signature");
    assert_eq!(&data[512..520], b"EFI PART", "GPT header");
}

/// The pages a read writes: data (two pages), status, used ring.
fn written_pages() -> Vec<u64> {
    let mut pages = vec![
        USED_RING / PAGE,
        DATA / PAGE,
        DATA / PAGE + 1,
        STATUS / PAGE,
    ];
    pages.sort_unstable();
    pages
}

/// Installs a fresh log of the right size and returns it.
fn install_log(fe: &RawFrontend) -> OwnedFd {
    let log = raw_vhost::memfd(LOG_BYTES).unwrap();
    match fe.set_log_base(log.as_raw_fd(), LOG_BYTES, 0) {
        Answer::Reply(r) if r.payload == log_payload(LOG_BYTES, 0) => {}
        a => panic!("SET_LOG_BASE: {a:?}"),
    }
    log
}

#[test]
fn a_read_marks_its_data_status_and_used_ring_pages() {
    let node = TestNode::small("dirty-log-1");
    let server = node.serve(&[]);
    let mut fe = RawFrontend::setup_with(&node.socket(), MEM, 16, TIMEOUT, PF_LOG_SHMFD).unwrap();
    assert_ne!(fe.features & F_LOG_ALL, 0, "VHOST_F_LOG_ALL is offered");
    let log = install_log(&fe);
    // The used ring's page may already be marked: the queue's worker writes
    // its notification state there (avail_event, flags) whenever it goes
    // back to waiting, which may come after the log arrived. No request
    // data or status was written yet.
    let early: Vec<u64> = marked(&log)
        .into_iter()
        .filter(|&p| p != USED_RING / PAGE)
        .collect();
    assert_eq!(early, [] as [u64; 0], "nothing written yet");

    read_first_block(&mut fe, 0);
    assert_eq!(marked(&log), written_pages(), "pages marked by one read");

    // QEMU clears what it synced; the next request marks again.
    clear(&log);
    read_first_block(&mut fe, 3);
    assert_eq!(
        marked(&log),
        written_pages(),
        "pages marked by the next read"
    );

    // A new memory table (QEMU sends one during a migration without a
    // new log when the log need not grow): its regions are logged too.
    clear(&log);
    fe.set_mem_table().unwrap();
    read_first_block(&mut fe, 6);
    assert_eq!(
        marked(&log),
        written_pages(),
        "pages marked after a new memory table"
    );
    drop(fe);
    assert!(
        !server.log.text().contains("WARN"),
        "no warning:\n{}",
        server.log.text()
    );
}

#[test]
fn without_a_log_requests_are_served() {
    let node = TestNode::small("dirty-log-2");
    let _server = node.serve(&[]);
    // Logging negotiated (LOG_ALL acked, LOG_SHMFD too), no log sent.
    let mut fe = RawFrontend::setup_with(&node.socket(), MEM, 16, TIMEOUT, PF_LOG_SHMFD).unwrap();
    read_first_block(&mut fe, 0);
    read_first_block(&mut fe, 3);
    drop(fe);
    // Not negotiated at all.
    let mut fe = RawFrontend::setup(&node.socket(), MEM, 16, TIMEOUT).unwrap();
    read_first_block(&mut fe, 0);
}
