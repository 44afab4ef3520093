//! Faults around `ociblk serve`: the overlay's file system running full,
//! payload blobs changed behind the server's back, and the checks that keep
//! other local users and bad images out (socket mode, overlay lock, blob
//! file types).

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ociblk_client::{BlkStatus, ClientOptions, VhostBlkClient};
use ociblk_tests::node::{SMALL_DISK, TestNode};
use ociblk_tests::oci::pseudo_random;
use ociblk_tests::process::Server;
use ociblk_tests::support::wait_until;
use ociblk_tests::support::{copy_sample_image, require_tool, run_bounded, run_ok};

fn connect(socket: &Path) -> VhostBlkClient {
    let opts = ClientOptions {
        memory_size: 4 << 20,
        timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    };
    VhostBlkClient::connect(socket, opts).unwrap()
}

fn read_ok(c: &mut VhostBlkClient, offset: u64, len: u32) -> Vec<u8> {
    let r = c.read(0, offset, len).unwrap();
    assert_eq!(r.status, BlkStatus::Ok, "read of {len} bytes at {offset}");
    r.data
}

fn status_of_write(c: &mut VhostBlkClient, offset: u64, data: &[u8]) -> BlkStatus {
    c.write(0, offset, data).unwrap().status
}

fn assert_alive(server: &mut Server, what: &str) {
    assert!(
        server.try_exit().is_none(),
        "{what}: the server died:\n{}",
        server.log.text()
    );
}

/// The blob of `image`'s `system` payload (read from the image, so that a
/// rebuilt sample image needs no new digest here).
fn system_blob(image: &Path) -> PathBuf {
    let os = ociblk_layout::OsImage::open(image).unwrap();
    let system = os.payloads.iter().find(|p| p.name == "system").unwrap();
    image.join("blobs/sha256").join(system.digest.hex())
}

/// A copy of the sample image in `to` whose system blob is a regular file.
fn copy_image(to: &Path) -> PathBuf {
    let dir = copy_sample_image(to);
    let blob = system_blob(&dir);
    assert!(
        fs::symlink_metadata(&blob).unwrap().file_type().is_file(),
        "{} is not a regular file in the copy",
        blob.display()
    );
    dir
}

/// A tmpfs mounted for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test mounts a tmpfs and must run as root (CI does); run it with sudo"
        );
        fs::create_dir_all(at).unwrap();
        run_ok(
            Command::new(require_tool("mount"))
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(at),
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The overlay's file system fills up: writes fail with IOERR (no hang, no
/// crash), reads go on, and once space is freed writes work again; what was
/// flushed before is still there, also after a restart.
#[test]
fn overlay_on_a_full_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let small = Tmpfs::mount(&dir.path().join("small"), "8M");
    let node = TestNode::small("full-fs").overlay_at(&small.0.join("node.overlay"));
    let filler = small.0.join("filler");
    fs::write(&filler, vec![0x5a; 1 << 20]).unwrap();
    let socket = node.socket();
    let data = node.partition_offset(3);
    let mut server = node.serve(&[]);
    let mut c = connect(&socket);

    let marker = pseudo_random(64 << 10, 1);
    assert_eq!(status_of_write(&mut c, data, &marker), BlkStatus::Ok);
    assert_eq!(c.flush(0).unwrap().status, BlkStatus::Ok);

    // Writes of 64 KiB after the marker until the file system is full.
    let chunk = 64u64 << 10;
    let fill = |c: &mut VhostBlkClient, from: u64| -> (u64, u64) {
        for i in 0..1024u64 {
            let off = from + i * chunk;
            match status_of_write(c, off, &pseudo_random(chunk as usize, 100 + i)) {
                BlkStatus::Ok => {}
                BlkStatus::IoErr => return (i, off),
                other => panic!("write at {off}: status {other:?}"),
            }
        }
        panic!("8 MiB of tmpfs never filled up");
    };
    let first = data + (1 << 20);
    let (written, failed_at) = fill(&mut c, first);
    assert!(written > 0, "nothing could be written");
    assert_alive(&mut server, "after ENOSPC");
    let logged = wait_until(Duration::from_secs(5), || {
        server.log.text().contains("No space left on device")
    });
    assert!(logged, "the failure is logged:\n{}", server.log.text());
    // The failed write left its range as it was (zeros), reads go on.
    assert_eq!(
        read_ok(&mut c, failed_at, chunk as u32),
        vec![0; chunk as usize]
    );
    assert!(read_ok(&mut c, data, marker.len() as u32) == marker);
    assert_eq!(&read_ok(&mut c, 512, 512)[..8], b"EFI PART");
    // A flush may fail while the disk is full, but must answer.
    let flush = c.flush(0).unwrap().status;
    assert!(
        matches!(flush, BlkStatus::Ok | BlkStatus::IoErr),
        "{flush:?}"
    );

    // Discarding what was written punches holes: room again.
    let done = c.discard(0, first, written * chunk).unwrap();
    assert_eq!(done.status, BlkStatus::Ok);
    let again = pseudo_random(chunk as usize, 2);
    assert_eq!(status_of_write(&mut c, failed_at, &again), BlkStatus::Ok);
    assert_eq!(c.flush(0).unwrap().status, BlkStatus::Ok);
    assert!(read_ok(&mut c, failed_at, chunk as u32) == again);
    assert_eq!(
        read_ok(&mut c, first, chunk as u32),
        vec![0; chunk as usize]
    );

    // Full again; deleting a file that shares the file system helps too.
    let (_, failed_at) = fill(&mut c, failed_at + chunk);
    fs::remove_file(&filler).unwrap();
    let last = pseudo_random(chunk as usize, 3);
    assert_eq!(status_of_write(&mut c, failed_at, &last), BlkStatus::Ok);
    assert_eq!(c.flush(0).unwrap().status, BlkStatus::Ok);
    assert!(read_ok(&mut c, data, marker.len() as u32) == marker);
    c.disconnect().unwrap();

    // A clean stop and a restart on the same overlay.
    server.stop_cleanly(Duration::from_secs(20), "stopping");
    let _server = node.serve(&[]);
    let mut c = connect(&socket);
    assert!(read_ok(&mut c, data, marker.len() as u32) == marker);
    assert!(read_ok(&mut c, failed_at, chunk as u32) == last);
    c.disconnect().unwrap();
}

/// Truncates `blob`, which `server` serves at `system_a` and whose bytes
/// were `original`, to 512 KiB: reads past the new end fail with IOERR and
/// an error line naming it; before it, elsewhere on the disk and in the
/// data partition at `data` all is well.
fn truncate_while_serving(
    c: &mut VhostBlkClient,
    server: &mut Server,
    blob: &Path,
    original: &[u8],
    system_a: u64,
    data: u64,
) {
    let keep = 512u64 << 10;
    fs::OpenOptions::new()
        .write(true)
        .open(blob)
        .unwrap()
        .set_len(keep)
        .unwrap();
    for (off, len) in [
        (keep, 4096u32),
        (keep - 4096, 8192),
        (keep + (64 << 10), 512),
    ] {
        let r = c.read(0, system_a + off, len).unwrap();
        assert_eq!(
            r.status,
            BlkStatus::IoErr,
            "read of {len} at system A + {off}"
        );
    }
    assert_alive(server, "after reads past the end of the blob");
    let names_blob = |log: &str| {
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains(&blob.display().to_string()))
    };
    let logged = wait_until(Duration::from_secs(5), || names_blob(&server.log.text()));
    assert!(
        logged,
        "no error line names {}:\n{}",
        blob.display(),
        server.log.text()
    );
    // Before the new end, and elsewhere on the disk, all is well.
    assert!(read_ok(c, system_a, keep as u32) == original[..keep as usize]);
    assert_eq!(&read_ok(c, 512, 512)[..8], b"EFI PART");
    read_ok(c, system_a - (1 << 20), 1 << 20);
    let fresh = pseudo_random(8192, 9);
    assert_eq!(status_of_write(c, data, &fresh), BlkStatus::Ok);
    assert!(read_ok(c, data, 8192) == fresh);
    // A partial block over the missing part needs its base: refused. A
    // whole block does not, and then shadows the missing bytes.
    let past = system_a + keep + (128 << 10);
    assert_eq!(status_of_write(c, past + 512, &[1; 512]), BlkStatus::IoErr);
    assert_eq!(status_of_write(c, past, &[2; 4096]), BlkStatus::Ok);
    assert_eq!(read_ok(c, past, 4096), vec![2; 4096]);
    assert_eq!(c.flush(0).unwrap().status, BlkStatus::Ok);
}

/// The `system` blob replaced (renamed over) or truncated while the server
/// runs. Renaming over it changes nothing for the running server, which
/// keeps its descriptor; a restart serves the new file (payload content is
/// not verified at serve time). Truncating the open file makes reads past
/// the new end fail with IOERR and a log line naming the file; nothing
/// else is affected.
#[test]
fn payload_blob_replaced_or_truncated_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let image = copy_image(dir.path());
    let node = TestNode::with_image(&image, "blob-faults").layout(SMALL_DISK);
    let socket = node.socket();
    let system_a = node.partition_offset(1);
    let blob = system_blob(&image);
    let original = fs::read(&blob).unwrap();
    let size = original.len() as u32;
    let data = node.partition_offset(3);
    let mut server = node.serve(&[]);
    let mut c = connect(&socket);
    assert!(
        read_ok(&mut c, system_a, size) == original,
        "system A starts with the payload"
    );

    // Renamed over: the running server still reads the file it opened.
    let replacement: Vec<u8> = original.iter().map(|b| !b).collect();
    let temp = image.join("blobs/sha256/.replacement");
    fs::write(&temp, &replacement).unwrap();
    fs::rename(&temp, &blob).unwrap();
    assert!(
        read_ok(&mut c, system_a, size) == original,
        "a blob renamed over is not seen by the running server"
    );
    c.disconnect().unwrap();
    server.stop_cleanly(Duration::from_secs(20), "stopping");

    // Restarted: the new file is checked against the image's chunk hashes
    // like any other, and is never served.
    let mut server = node.serve(&[]);
    let mut c = connect(&socket);
    let r = c.read(0, system_a, 4096).unwrap();
    assert_eq!(r.status, BlkStatus::IoErr, "a swapped blob is not served");
    let refused = wait_until(Duration::from_secs(5), || {
        server
            .log
            .text()
            .lines()
            .any(|l| l.contains("failed verification") && l.contains("chunk=0"))
    });
    assert!(
        refused,
        "no verification failure logged:\n{}",
        server.log.text()
    );
    // The right bytes written back into the file the server holds: served
    // from the next read on, no restart.
    fs::write(&blob, &original).unwrap();
    assert!(read_ok(&mut c, system_a, size) == original);

    // Truncated in place: the server's open file shrinks.
    truncate_while_serving(&mut c, &mut server, &blob, &original, system_a, data);
    c.disconnect().unwrap();
    assert_alive(&mut server, "at the end");
}

/// The socket is private to the caller and a live overlay is locked.
#[test]
fn socket_is_private_and_overlay_is_locked() {
    let node = TestNode::small("security");
    let dir = node.dir();
    let socket = node.socket();
    let overlay = node.overlay();
    let _server = node.serve(&[]);
    let meta = fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "socket mode");
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    assert_eq!(meta.uid(), uid, "socket owner");
    assert_eq!(meta.gid(), gid, "socket group");

    // A second server on the same overlay, from another process.
    let mut cmd = node.serve_command(&dir.join("other.sock"), &overlay);
    let out = run_bounded(&mut cmd, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("in use"), "{err}");
    assert!(!dir.join("other.sock").exists());
    // Another overlay on the same, live, socket.
    let mut cmd = node.serve_command(&socket, &dir.join("other.overlay"));
    let out = run_bounded(&mut cmd, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("listening"), "{err}");
    // The first server is unaffected.
    let mut c = connect(&socket);
    assert_eq!(&read_ok(&mut c, 512, 512)[..8], b"EFI PART");
}

/// A blob that is a symlink to a directory, a FIFO or a device is refused
/// when the image is opened, before anything reads (or blocks on) it.
/// Digests that are paths (`/`, `..`) are refused too: see
/// `image_errors.rs`, `digests_that_are_paths_are_refused`.
#[test]
fn blob_links_to_non_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = copy_image(dir.path());
    let blob = system_blob(&image);
    let fifo = dir.path().join("fifo");
    let c_fifo = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; the result is checked.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    let subdir = dir.path().join("a-directory");
    fs::create_dir(&subdir).unwrap();
    for target in [subdir.as_path(), fifo.as_path(), Path::new("/dev/zero")] {
        fs::remove_file(&blob).unwrap();
        std::os::unix::fs::symlink(target, &blob).unwrap();
        let node = TestNode::with_image(&image, "links").layout(SMALL_DISK);
        let socket = node.socket();
        let mut cmd = node.serve_command(&socket, &dir.path().join("node.overlay"));
        let out = run_bounded(&mut cmd, Duration::from_secs(20));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("not a regular file"),
            "blob linked to {}: {err}",
            target.display()
        );
        assert!(
            !socket.exists(),
            "nothing served for a link to {}",
            target.display()
        );
    }
}
