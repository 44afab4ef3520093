//! `ociblk serve` driven by the Rust vhost-user-blk client over its real
//! socket: the disk it serves, writes into the overlay, bad requests,
//! reconnects, restarts and crashes.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ociblk_client::{BlkStatus, ClientOptions, RawDesc, VhostBlkClient};
use ociblk_tests::node::{SMALL_DISK, TestNode};
use ociblk_tests::oci::{pseudo_random, sha256_hex};
use ociblk_tests::process::Server;
use ociblk_tests::support::{Collected, ociblk_bin, run_bounded, run_err, wait_until};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

const DISK_SIZE: u64 = 512 << 20;

fn opts(queues: u16) -> ClientOptions {
    ClientOptions {
        queues,
        ..ClientOptions::default()
    }
}

fn read_ok(c: &mut VhostBlkClient, q: u16, offset: u64, len: u32) -> Vec<u8> {
    let done = c.read(q, offset, len).unwrap();
    assert_eq!(done.status, BlkStatus::Ok, "read of {len} at {offset}");
    assert_eq!(done.used_len, len + 1, "used length = data + status byte");
    done.data
}

fn write_ok(c: &mut VhostBlkClient, q: u16, offset: u64, data: &[u8]) {
    let done = c.write(q, offset, data).unwrap();
    assert_eq!(
        done.status,
        BlkStatus::Ok,
        "write of {} at {offset}",
        data.len()
    );
}

fn flush_ok(c: &mut VhostBlkClient, q: u16) {
    assert_eq!(c.flush(q).unwrap().status, BlkStatus::Ok);
}

/// Reads the whole disk through the client, 1 MiB at a time.
fn read_disk(c: &mut VhostBlkClient) -> Vec<u8> {
    let size = c.config().capacity_bytes();
    let mut out = Vec::with_capacity(size as usize);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(1 << 20) as u32;
        out.extend(read_ok(c, (off >> 20) as u16 % c.num_queues(), off, n));
        off += u64::from(n);
    }
    out
}

fn payload_hashes(image: &Path) -> Vec<String> {
    let os = ociblk_layout::OsImage::open(image).unwrap();
    os.payloads
        .iter()
        .map(|p| sha256_hex(&fs::read(&p.path).unwrap()))
        .collect()
}

#[test]
fn whole_disk_equals_export_and_config_is_right() {
    let node = TestNode::small("client-1");
    let _server = node.serve(&["--queues", "2"]);
    let mut c = node.connect(opts(2));
    let cfg = c.config().clone();
    assert_eq!(cfg.capacity_bytes(), DISK_SIZE);
    assert_eq!(cfg.blk_size, Some(512));
    assert_eq!(cfg.num_queues, Some(2));
    assert!(!c.has_feature(VIRTIO_BLK_F_RO));
    let id = c.get_id(0).unwrap();
    assert_eq!(id.status, BlkStatus::Ok);
    assert_eq!(&id.data[..8], b"client-1", "GET_ID defaults to the seed");
    let disk = read_disk(&mut c);
    let export = node.export_bytes(false);
    assert_eq!(disk.len(), export.len());
    assert!(
        disk == export,
        "disk read through the server differs from ociblk export"
    );
}

#[test]
fn writes_discards_and_write_zeroes_read_back() {
    let node = TestNode::small("client-2");
    let before = payload_hashes(node.image());
    let _server = node.serve(&["--queues", "2"]);
    let mut c = node.connect(opts(2));
    let base = node.export_bytes(false);
    let mut model = base.clone();
    let data_off = node.partition_offset(3);
    // System A (over the payload), the ESP's FAT and the data partition.
    let system_a = 264192u64 * 512;
    let cases: Vec<(u64, usize)> = vec![
        (system_a, 4096),                   // whole block over payload data
        (system_a + 8192 + 512, 512),       // one sector inside a block
        (system_a + 3 * 4096 - 1024, 3072), // crosses a block boundary, partial both ends
        (1 << 20, 1536),                    // ESP boot sector area
        (data_off, 64 << 10),               // 64 KiB into zeros
        (DISK_SIZE - 4096, 4096),           // last block: backup GPT
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = pseudo_random(len, 100 + i as u64);
        write_ok(&mut c, (i % 2) as u16, off, &data);
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    // Zeroing over non-zero base data must never let the base show through.
    for (off, len, discard) in [
        (system_a + 16 * 4096, 8 * 4096u64, true),
        (system_a + 64 * 4096 + 512, 4096 + 1024, false),
    ] {
        let done = if discard {
            c.discard(0, off, len).unwrap()
        } else {
            c.write_zeroes(1, off, len, true).unwrap()
        };
        assert_eq!(done.status, BlkStatus::Ok);
        model[off as usize..(off + len) as usize].fill(0);
    }
    for &(off, len) in &cases {
        let start = off.saturating_sub(4096);
        let n = (len as u64 + 8192).min(DISK_SIZE - start) as u32;
        assert!(
            read_ok(&mut c, 1, start, n) == model[start as usize..start as usize + n as usize],
            "read around {off}"
        );
    }
    flush_ok(&mut c, 0);
    assert!(
        read_disk(&mut c) == model,
        "whole disk differs from the model"
    );
    drop(c);
    drop(_server);
    // The node's disk as exported with its overlay is what the guest saw.
    assert!(
        node.export_bytes(true) == model,
        "export --overlay differs from the model"
    );
    assert_eq!(
        payload_hashes(node.image()),
        before,
        "payload blobs were written"
    );
}

/// A raw chain's completion bound.
fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

/// Out of range, straddling the end, and overflowing sector numbers get
/// IOERR; the next good request works.
fn out_of_range_requests_fail(c: &mut VhostBlkClient) {
    let sectors = DISK_SIZE / 512;
    for (sector, len) in [
        (sectors, 512u32),
        (sectors - 1, 1024),
        (u64::MAX / 512, 512),
    ] {
        let done = c.read(0, sector * 512, len);
        match done {
            Ok(done) => assert_eq!(done.status, BlkStatus::IoErr, "read at sector {sector}"),
            Err(e) => panic!("read at sector {sector}: {e}"),
        }
        assert_eq!(
            c.write(0, sector * 512, &vec![1; len as usize])
                .unwrap()
                .status,
            BlkStatus::IoErr
        );
        assert_eq!(
            read_ok(c, 0, 0, 512)[510..],
            [0x55, 0xAA],
            "next good request works"
        );
    }
}

/// Malformed chains: data length not a multiple of 512, a write whose data
/// descriptor is writable, a short header. Each must end with IOERR (an
/// unknown type with UNSUPP); the next good request works.
fn malformed_chains_fail(c: &mut VhostBlkClient) {
    let chains: Vec<(&str, Vec<RawDesc>)> = vec![
        (
            "odd length",
            vec![
                RawDesc::header(VIRTIO_BLK_T_IN, 0),
                RawDesc::writable(100),
                RawDesc::status(),
            ],
        ),
        (
            "write with writable data",
            vec![
                RawDesc::header(VIRTIO_BLK_T_OUT, 8),
                RawDesc::writable(512),
                RawDesc::status(),
            ],
        ),
        (
            "short header",
            vec![RawDesc::readable(vec![0u8; 8]), RawDesc::status()],
        ),
        (
            "unknown type",
            vec![RawDesc::header(99, 0), RawDesc::status()],
        ),
    ];
    for (what, chain) in chains {
        let t = c.submit_raw(0, &chain).unwrap();
        let done = c
            .wait(0, t, deadline())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = done
            .status_byte()
            .unwrap_or_else(|| panic!("{what}: no status"));
        let want = if what == "unknown type" { 2 } else { 1 };
        assert_eq!(status, want, "{what}: status");
        assert_eq!(
            read_ok(c, 0, 512, 512)[..8],
            *b"EFI PART",
            "{what}: next good request works"
        );
    }
}

/// size_max is what the server advertises, and a driver that negotiated
/// it (as this client and Linux do) gets IOERR beyond it. The client
/// splits its own buffers at size_max; raw chains do not.
fn chains_past_size_max_fail(c: &mut VhostBlkClient) {
    let size_max = c.config().size_max.unwrap();
    assert_eq!(size_max, 1 << 20);
    assert_eq!(read_ok(c, 0, 0, 4 * size_max).len(), 4 << 20);
    for (what, chain) in [
        (
            "4 MiB single read segment",
            vec![
                RawDesc::header(VIRTIO_BLK_T_IN, 0),
                RawDesc::writable(4 * size_max),
                RawDesc::status(),
            ],
        ),
        (
            "one byte over",
            vec![
                RawDesc::header(VIRTIO_BLK_T_IN, 0),
                RawDesc::writable(size_max + 512),
                RawDesc::status(),
            ],
        ),
        (
            "2 MiB single write segment",
            vec![
                RawDesc::header(VIRTIO_BLK_T_OUT, 0),
                RawDesc::readable(vec![0u8; 2 * size_max as usize]),
                RawDesc::status(),
            ],
        ),
    ] {
        let t = c.submit_raw(0, &chain).unwrap();
        let done = c.wait(0, t, deadline()).unwrap();
        assert_eq!(done.status_byte(), Some(1), "{what}: IOERR");
    }
    assert_eq!(read_ok(c, 0, 512, 512)[..8], *b"EFI PART");
}

#[test]
fn bad_requests_get_ioerr_and_the_server_keeps_serving() {
    let node = TestNode::small("client-3");
    let mut server = node.serve(&[]);
    let mut c = node.connect(opts(1));
    out_of_range_requests_fail(&mut c);
    malformed_chains_fail(&mut c);
    chains_past_size_max_fail(&mut c);
    c.disconnect().unwrap();
    // A driver that did not negotiate it (OVMF does not) owes no limit.
    let mut c = VhostBlkClient::connect(
        &node.socket(),
        ClientOptions {
            feature_mask: !(1 << VIRTIO_BLK_F_SIZE_MAX),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    assert_eq!(read_ok(&mut c, 0, 0, 4 << 20).len(), 4 << 20);
    assert!(
        server.try_exit().is_none(),
        "server died:\n{}",
        server.log.text()
    );
    assert!(
        server.log.text().contains("WARN"),
        "bad requests are logged:\n{}",
        server.log.text()
    );
}

#[test]
fn reconnect_restart_and_kill_keep_flushed_data() {
    let node = TestNode::small("client-4");
    let data_off = node.partition_offset(3);
    let first = pseudo_random(64 << 10, 7);
    let second = pseudo_random(8192, 8);
    let mut server = node.serve(&[]);
    {
        let mut c = node.connect(opts(1));
        write_ok(&mut c, 0, data_off, &first);
        c.disconnect().unwrap();
    }
    // A new connection to the same server sees the write.
    {
        let mut c = node.connect(opts(1));
        assert!(read_ok(&mut c, 0, data_off, first.len() as u32) == first);
        flush_ok(&mut c, 0);
    }
    // SIGTERM: exit 0, socket removed; a new server on the overlay has the data.
    server.stop_cleanly(Duration::from_secs(20), "stopping");
    assert!(!node.socket().exists(), "socket removed on shutdown");
    let mut server = node.serve(&[]);
    {
        let mut c = node.connect(opts(1));
        assert!(
            read_ok(&mut c, 0, data_off, first.len() as u32) == first,
            "data after restart"
        );
        write_ok(&mut c, 0, data_off + 4096, &second);
        flush_ok(&mut c, 0);
        // kill -9 right after the flush completed: nothing acknowledged is lost.
        server.stop_with(libc::SIGKILL, Duration::from_secs(20));
    }
    let _server = node.serve(&[]);
    let mut c = node.connect(opts(1));
    let mut want = first.clone();
    want[4096..4096 + second.len()].copy_from_slice(&second);
    assert!(
        read_ok(&mut c, 0, data_off, want.len() as u32) == want,
        "flushed data after kill -9"
    );
}

#[test]
fn overlay_is_locked_and_checked_against_the_disk() {
    let node = TestNode::small("client-5");
    let _server = node.serve(&[]);
    // A second server on the same overlay fails with a clear error.
    let other_socket = node.dir().join("other.sock");
    let mut cmd = node.serve_command(&other_socket, &node.overlay());
    let err = run_err(&mut cmd);
    assert!(err.contains("in use"), "{err}");
    drop(_server);
    // The same overlay under another node's disk is refused once written.
    let mut s = node.serve(&[]);
    let mut c = node.connect(opts(1));
    write_ok(&mut c, 0, node.partition_offset(3), &[1; 4096]);
    flush_ok(&mut c, 0);
    drop(c);
    s.stop_with(libc::SIGTERM, Duration::from_secs(20));
    let other = TestNode::with_image(node.image(), "another-node").layout(SMALL_DISK);
    let mut cmd = other.serve_command(&other_socket, &node.overlay());
    let err = run_err(&mut cmd);
    assert!(err.contains("different disk"), "{err}");
    // info and reset.
    assert_eq!(node.overlay_info_json()["blocks_written"], 1);
    node.overlay_reset();
    assert_eq!(node.overlay_info_json()["blocks_written"], 0);
}

#[test]
fn read_only_serving() {
    let node = TestNode::small("client-6");
    let mut args = node.layout_args();
    args.push("--read-only".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _server = Server::start(&node.socket(), &args);
    let mut c = node.connect(opts(1));
    assert!(c.has_feature(VIRTIO_BLK_F_RO));
    assert_eq!(c.write(0, 0, &[0; 512]).unwrap().status, BlkStatus::IoErr);
    assert_eq!(
        c.write_zeroes(0, 0, 4096, false).unwrap().status,
        BlkStatus::IoErr
    );
    assert_eq!(read_ok(&mut c, 0, 0, 512)[510..], [0x55, 0xAA]);
}

#[test]
fn socket_path_that_is_not_a_socket_is_refused() {
    let node = TestNode::small("client-7");
    fs::write(node.socket(), b"precious").unwrap();
    let mut cmd = node.serve_command(&node.socket(), &node.overlay());
    let err = run_err(&mut cmd);
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(fs::read(node.socket()).unwrap(), b"precious");
}

/// A node whose data partition starts with a block of `byte` (flushed if
/// `flush`), and its running server.
fn node_with_a_written_block(seed: &str, byte: u8, flush: bool) -> (TestNode, u64, Server) {
    let node = TestNode::small(seed);
    let data_off = node.partition_offset(3);
    let server = node.serve(&[]);
    let mut c = node.connect(opts(1));
    write_ok(&mut c, 0, data_off, &[byte; 4096]);
    if flush {
        flush_ok(&mut c, 0);
    }
    drop(c);
    (node, data_off, server)
}

/// Runs `cmd` to its end (bounded) and returns its status and stderr.
fn run_to_end(cmd: &mut Command) -> (std::process::ExitStatus, String) {
    let out = run_bounded(cmd, Duration::from_secs(30));
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn socket_path_over_107_bytes_is_refused_before_any_file_is_made() {
    let node = TestNode::small("client-8");
    let base = node.dir().as_os_str().len() + 1;
    let socket = node.dir().join("s".repeat(108 - base));
    assert_eq!(socket.as_os_str().len(), 108);
    let mut cmd = node.serve_command(&socket, &node.overlay());
    // Bounded: a server that accepted the path would serve on forever.
    let (status, err) = run_to_end(&mut cmd);
    assert!(!status.success(), "{status}");
    assert!(
        err.contains(&*socket.to_string_lossy()) && err.contains("at most 107 bytes"),
        "{err}"
    );
    assert_eq!(fs::read_dir(node.dir()).unwrap().count(), 0);
}

#[test]
fn of_two_servers_started_together_on_one_socket_exactly_one_serves() {
    let node = TestNode::small("client-9");
    let socket = node.socket();
    for round in 0..4 {
        let overlays = [0, 1].map(|i| node.dir().join(format!("r{round}-{i}.overlay")));
        let mut children = overlays
            .clone()
            .map(|overlay| Some(Collected::spawn(&mut node.serve_command(&socket, &overlay))));
        // One of them fails; find it.
        let mut loser = None;
        assert!(
            wait_until(Duration::from_secs(60), || {
                for (i, child) in children.iter_mut().enumerate() {
                    if let Some(c) = child
                        && c.try_exit().is_some()
                    {
                        loser = Some(i);
                        return true;
                    }
                }
                false
            }),
            "round {round}: both servers kept running"
        );
        let loser = loser.unwrap();
        let out = children[loser]
            .take()
            .unwrap()
            .finish(Duration::from_secs(30));
        let (status, err) = (out.status, String::from_utf8_lossy(&out.stderr));
        assert!(
            !status.success(),
            "round {round}: loser exited with {status}"
        );
        assert!(
            err.contains("in use by another server") && err.contains(&*socket.to_string_lossy()),
            "round {round}: {err}"
        );
        // The other serves, and stops cleanly.
        let mut winner = children[1 - loser].take().unwrap();
        assert!(wait_until(Duration::from_secs(30), || socket.exists()));
        let mut c = node.connect(opts(1));
        assert_eq!(read_ok(&mut c, 0, 512, 512)[..8], *b"EFI PART");
        c.disconnect().unwrap();
        assert!(winner.try_exit().is_none(), "round {round}: winner exited");
        assert!(winner.signal(libc::SIGTERM));
        let out = winner.finish(Duration::from_secs(30));
        let (status, err) = (out.status, String::from_utf8_lossy(&out.stderr));
        assert!(status.success(), "round {round}: winner: {status}\n{err}");
        assert!(!socket.exists(), "round {round}: socket left behind");
        assert!(
            !node.dir().join("node.sock.lock").exists(),
            "round {round}: lock file left behind"
        );
    }
}

#[test]
fn sighup_sigusr1_and_sigpipe_never_cost_the_clean_shutdown() {
    // Not flushed by the guest: the final flush keeps it.
    let (node, data_off, mut server) = node_with_a_written_block("client-10", 3, false);
    // SIGHUP: shuts down like SIGTERM.
    let status = server.stop_with(libc::SIGHUP, Duration::from_secs(20));
    assert!(status.success(), "SIGHUP: {status}\n{}", server.log.text());
    assert!(!node.socket().exists(), "SIGHUP: socket left behind");
    let info = node.overlay_info();
    assert!(info.contains("Closed cleanly yes"), "SIGHUP:\n{info}");
    assert!(info.contains("Written        1 blocks"), "SIGHUP:\n{info}");
    // SIGUSR1 and SIGPIPE: ignored, the server keeps serving; a SIGTERM
    // afterwards still ends it cleanly (a signal that killed it would show
    // in the exit status).
    let mut server = node.serve(&[]);
    for (name, sig) in [("SIGUSR1", libc::SIGUSR1), ("SIGPIPE", libc::SIGPIPE)] {
        assert!(server.signal(sig), "{name} sent");
        let mut c = node.connect(opts(1));
        assert_eq!(read_ok(&mut c, 0, data_off, 4096), vec![3; 4096], "{name}");
        c.disconnect().unwrap();
        assert!(server.try_exit().is_none(), "{name} ended it");
    }
    server.stop_cleanly(Duration::from_secs(20), "stopping");
    assert!(!node.socket().exists());
    assert!(node.overlay_info().contains("Closed cleanly yes"));
}

#[test]
fn overlay_paths_that_are_not_regular_files_are_refused() {
    let node = TestNode::small("client-11");
    let fifo = node.dir().join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let dir = node.dir().join("dir");
    fs::create_dir(&dir).unwrap();
    for path in [fifo.as_path(), Path::new("/dev/null"), dir.as_path()] {
        let mut commands = Vec::new();
        for sub in ["info", "reset"] {
            let mut cmd = Command::new(ociblk_bin());
            cmd.args(["overlay", sub]).arg(path);
            commands.push(cmd);
        }
        for extra in [&[][..], &["--read-only"][..]] {
            let mut cmd = node.serve_command(&node.socket(), path);
            cmd.args(extra);
            commands.push(cmd);
        }
        for mut cmd in commands {
            let what = format!("{cmd:?}");
            let (status, err) = run_to_end(&mut cmd);
            assert!(!status.success(), "{what} succeeded");
            assert!(
                err.contains("not a regular file") && err.contains(&*path.to_string_lossy()),
                "{what}: {err}"
            );
        }
    }
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(!node.socket().exists());
    // An error's cause is printed once.
    let missing = node.dir().join("missing");
    let err = run_err(
        Command::new(ociblk_bin())
            .args(["overlay", "info"])
            .arg(&missing),
    );
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn bad_arguments_leave_no_file_behind() {
    let node = TestNode::small("client-12");
    for bad in [
        &["--queue-size", "3"][..],
        &["--queue-size", "2048"][..],
        &["--queues", "0"][..],
        &["--handshake-timeout", "0"][..],
    ] {
        let mut cmd = node.serve_command(&node.socket(), &node.overlay());
        cmd.args(bad);
        let err = run_err(&mut cmd);
        assert!(err.contains("invalid"), "{bad:?}: {err}");
        assert_eq!(
            fs::read_dir(node.dir()).unwrap().count(),
            0,
            "{bad:?} left a file"
        );
    }
}

#[test]
fn overlays_and_exports_are_private_and_an_empty_overlay_is_initialised_aloud() {
    let node = TestNode::small("client-13");
    // Created by serve: 0600, whatever the umask lets through.
    let mut server = node.serve(&[]);
    let mode = fs::metadata(node.overlay()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "overlay mode {mode:o}");
    server.stop_with(libc::SIGTERM, Duration::from_secs(20));
    let out = node.export(true);
    let mode = fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "export mode {mode:o}");
    fs::remove_file(&out).unwrap();

    // An existing empty file: info and serve agree it is a new overlay
    // (info answers, exit 0), and serve says it initialises it.
    fs::write(node.overlay(), b"").unwrap();
    let err = node.overlay_info();
    assert!(err.contains("no header yet"), "{err}");
    let mut server = node.serve(&[]);
    let status = server.stop_with(libc::SIGTERM, Duration::from_secs(20));
    assert!(status.success());
    let log = server.log.text();
    assert!(
        log.contains("INFO") && log.contains("initialising an existing file"),
        "{log}"
    );
    assert!(node.overlay_info().contains("Closed cleanly yes"));
}

#[test]
fn read_only_serving_shares_the_overlay_and_never_modifies_it() {
    let (node, data_off, mut server) = node_with_a_written_block("client-14", 8, true);
    server.stop_with(libc::SIGTERM, Duration::from_secs(20));
    fs::set_permissions(node.overlay(), fs::Permissions::from_mode(0o400)).unwrap();
    let before = fs::read(node.overlay()).unwrap();
    let mtime = fs::metadata(node.overlay()).unwrap().mtime_nsec();

    let mut a = node.serve(&["--read-only"]);
    // A second reader shares it, a writer is refused.
    let mut b = node.serve_on(&node.dir().join("second.sock"), &["--read-only"]);
    let mut cmd = node.serve_command(&node.dir().join("writer.sock"), &node.overlay());
    let err = run_err(&mut cmd);
    assert!(err.contains("in use"), "{err}");
    // Not even marked in use.
    assert!(node.overlay_info().contains("Closed cleanly yes"));
    let mut c = node.connect(opts(1));
    assert!(c.has_feature(VIRTIO_BLK_F_RO));
    assert_eq!(read_ok(&mut c, 0, data_off, 4096), vec![8; 4096]);
    assert_eq!(
        c.write(0, data_off, &[0; 4096]).unwrap().status,
        BlkStatus::IoErr
    );
    flush_ok(&mut c, 0);
    c.disconnect().unwrap();
    for s in [&mut a, &mut b] {
        s.stop_cleanly(Duration::from_secs(20), "stopping");
    }
    assert!(
        fs::read(node.overlay()).unwrap() == before,
        "overlay modified"
    );
    assert_eq!(fs::metadata(node.overlay()).unwrap().mtime_nsec(), mtime);
}
