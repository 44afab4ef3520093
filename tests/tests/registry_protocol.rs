//! `ociblk serve` from a registry reference when the registry misbehaves
//! at the protocol level, driven over its socket by the Rust vhost-user
//! client: a real registry (Debian's `docker-registry` on loopback, the
//! sample image pushed with `skopeo`) behind the loopback proxy of the
//! registry tests, which can answer 429, hold or delay blob requests.

#![allow(clippy::unwrap_used)]

#[path = "../../registry/tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::time::Duration;

use ociblk_client::{BlkStatus, ClientOptions, VhostBlkClient};
use ociblk_layout::{DiskParams, Layout, OsImage};
use ociblk_tests::node::TestNode;
use ociblk_tests::process::Server;
use ociblk_tests::support::payload_disk_offsets;
use support::fixture::REPO_TAG;
use support::proxy::{Behaviour, Proxy};
use support::{Registry, SampleImage};

const SEED: &str = "proto";
const DISK: &[&str] = &["--disk-size", "1GiB", "--system-size", "64MiB"];
const MIB: u64 = 1 << 20;

/// The sample image in a registry behind a proxy, and the disk exported
/// from the local layout to compare with.
struct Fixture {
    node: TestNode,
    sample: SampleImage,
    _registry: Registry,
    proxy: Proxy,
    layout: Layout,
    local_disk: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let sample = SampleImage::load();
        let registry = Registry::start();
        registry.push(&sample.dir, REPO_TAG);
        let proxy = Proxy::start(registry.addr, Behaviour::default());
        let node = TestNode::with_image(&sample.dir, SEED).layout(DISK);
        let local_disk = node.export(false);
        let mut params = DiskParams::new(SEED);
        params.disk_size = 1 << 30;
        params.system_size = 64 << 20;
        let layout = Layout::build(&OsImage::open(&sample.dir).unwrap(), &params).unwrap();
        Fixture {
            node,
            sample,
            _registry: registry,
            proxy,
            layout,
            local_disk,
        }
    }

    fn socket(&self) -> PathBuf {
        self.node.dir().join("node.sock")
    }

    /// `ociblk serve --read-only` of the image through the proxy.
    fn serve(&self, fetch_timeout: &str) -> Server {
        let reference = format!("{}/{REPO_TAG}", self.proxy.host());
        let cache = self.node.dir().join("cache").display().to_string();
        let mut args = vec![
            "--image",
            &reference,
            "--cache",
            &cache,
            "--seed",
            SEED,
            "--read-only",
            "--fetch-timeout",
            fetch_timeout,
        ];
        args.extend(DISK);
        Server::start(&self.socket(), &args)
    }

    fn connect(&self) -> VhostBlkClient {
        VhostBlkClient::connect(&self.socket(), ClientOptions::default()).unwrap()
    }

    /// Where byte `at` of the kernel payload first appears on the disk.
    fn kernel_at(&self, at: u64) -> u64 {
        payload_disk_offsets(&self.layout, "kernel.efi", at)[0]
    }

    /// Disk bytes holding kernel chunks `0..chunks`, checked to be one
    /// run on the disk: offset and length.
    fn kernel_chunks(&self, chunks: u64) -> (u64, u64) {
        let chunk = self.sample.payload("kernel.efi").chunk_size;
        let (start, len) = (self.kernel_at(0), chunks * chunk);
        assert_eq!(
            self.kernel_at(len - 1),
            start + len - 1,
            "kernel chunks 0..{chunks} are not one run on the disk"
        );
        (start, len)
    }

    fn read_same(&self, c: &mut VhostBlkClient, offset: u64, len: u64) {
        let done = c.read(0, offset, len as u32).unwrap();
        assert_eq!(done.status, BlkStatus::Ok, "read of {len} at {offset}");
        assert!(
            done.data == support::read_range(&self.local_disk, offset, len),
            "{len} bytes at {offset} differ from the local layout's disk"
        );
    }
}

#[test]
fn a_retry_after_no_clock_can_hold_fails_the_read_and_the_server_keeps_serving() {
    let fx = Fixture::new();
    let mut server = fx.serve("2");
    let mut c = fx.connect();
    fx.proxy.set(|b| {
        b.too_many = 1;
        b.retry_after_raw = Some(u64::MAX.to_string());
    });
    let k1 = fx.kernel_at(MIB);
    let done = c.read(0, k1, 4096).unwrap();
    assert_eq!(done.status, BlkStatus::IoErr);
    let line = server.wait_for_line(&["could not be fetched", "chunk=1"]);
    assert!(
        line.contains("429") && line.contains(&format!("Retry-After {}s", u64::MAX)),
        "{line}"
    );
    // The same client, then the next one, are served; SIGTERM still ends
    // the server cleanly.
    fx.read_same(&mut c, 0, 4096);
    fx.read_same(&mut c, k1, 4096);
    drop(c);
    let mut next = fx.connect();
    fx.read_same(&mut next, k1 + 4096, 4096);
    drop(next);
    server.stop_cleanly(
        Duration::from_secs(20),
        "after a 429 with a huge Retry-After",
    );
}

#[test]
fn the_missing_chunks_of_one_read_are_fetched_side_by_side() {
    let fx = Fixture::new();
    let server = fx.serve("30");
    let mut c = fx.connect();
    // Each blob request waits for a second one in flight: fetched one
    // after another, they never meet.
    fx.proxy.set(|b| b.gather = 2);
    let (start, len) = fx.kernel_chunks(4);
    fx.read_same(&mut c, start, len);
    let most = fx.proxy.max_concurrent_blob_requests();
    assert!(
        (2..=4).contains(&most),
        "{most} blob requests in flight at once for one read of 4 missing chunks \
         (the host's limit is 4)"
    );
    let kernel = fx.sample.payload("kernel.efi");
    let fetched = fx.proxy.blob_requests(kernel.digest.hex());
    assert_eq!(fetched.len(), 4, "{fetched:?}");
    drop(server);
}

#[test]
fn one_read_of_many_chunks_has_one_deadline() {
    let fx = Fixture::new();
    let server = fx.serve("2");
    let mut c = fx.connect();
    // Each chunk alone comes well within --fetch-timeout; twelve of them,
    // four at a time (the host's limit), do not.
    fx.proxy.set(|b| b.blob_delay = Duration::from_millis(1200));
    let (start, len) = fx.kernel_chunks(12);
    let done = c.read(0, start, len as u32).unwrap();
    assert_eq!(done.status, BlkStatus::IoErr);
    let line = server.wait_for_line(&["could not be fetched", "one bound for the whole read"]);
    let kernel = fx.sample.payload("kernel.efi");
    assert!(
        line.contains(&kernel.digest.to_string()) && line.contains("within 2s"),
        "{line}"
    );
    // A later read gets the rest.
    fx.proxy.set(|b| b.blob_delay = Duration::ZERO);
    fx.read_same(&mut c, start, len);
    drop(server);
}
