//! `ociblk serve` from a registry reference, driven over its socket by the
//! Rust vhost-user client: a real registry (Debian's `docker-registry` on
//! loopback, the sample image pushed with `skopeo`), a counting proxy in
//! front of it, and the bytes compared with `ociblk export` of the local
//! layout. The proxy can also misbehave at the protocol level (answer 429
//! with any Retry-After, hold or delay blob requests).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ociblk_client::{BlkStatus, ClientOptions, VhostBlkClient};
use ociblk_layout::{DiskParams, Layout, OsImage};
use ociblk_registry::{AccessRecord, BlobSpec, ChunkRef};
use ociblk_registry_test_support::fixture::REPO_TAG;
use ociblk_registry_test_support::proxy::{Behaviour, Proxy};
use ociblk_registry_test_support::{Registry, SampleImage, Tmpfs, read_range};
use ociblk_tests::node::TestNode;
use ociblk_tests::process::Server;
use ociblk_tests::support::{
    ociblk_bin, payload_disk_offsets, run_bounded, run_err, run_ok, wait_until,
};

const SEED: &str = "reg";
/// A small disk: the whole of it is exported for comparison.
const DISK: &[&str] = &["--disk-size", "1GiB", "--system-size", "64MiB"];
const MIB: u64 = 1 << 20;

/// The sample image in a registry behind a counting proxy, a cache
/// directory, and the disk exported from the local layout.
struct Fixture {
    /// The local layout's node: its temp dir holds the sockets, the cache
    /// and the export.
    node: TestNode,
    sample: SampleImage,
    registry: Registry,
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
            registry,
            proxy,
            layout,
            local_disk,
        }
    }

    fn reference(&self) -> String {
        format!("{}/{REPO_TAG}", self.proxy.host())
    }

    fn cache(&self) -> PathBuf {
        self.node.dir().join("cache")
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.node.dir().join(format!("{name}.sock"))
    }

    /// `ociblk serve --read-only` of the registry reference.
    fn serve(&self, name: &str, extra: &[&str]) -> Server {
        self.serve_in(&self.cache(), name, extra)
    }

    /// [`Fixture::serve`] with the cache `cache`.
    fn serve_in(&self, cache: &Path, name: &str, extra: &[&str]) -> Server {
        let reference = self.reference();
        let cache = cache.display().to_string();
        let mut args = vec![
            "--image",
            &reference,
            "--cache",
            &cache,
            "--seed",
            SEED,
            "--read-only",
        ];
        if !extra.contains(&"--fetch-timeout") {
            args.extend(["--fetch-timeout", "5"]);
        }
        args.extend(DISK);
        args.extend(extra);
        Server::start(&self.socket(name), &args)
    }

    /// The `ociblk serve --read-only` command of the registry reference at
    /// socket `name`, not started: for starts that must fail.
    fn serve_command(&self, name: &str) -> Command {
        let mut cmd = Command::new(ociblk_bin());
        cmd.args(["serve", "--image", &self.reference(), "--cache"])
            .arg(self.cache())
            .args(["--seed", SEED])
            .args(DISK)
            .arg("--read-only")
            .arg("--socket")
            .arg(self.socket(name));
        cmd
    }

    /// Blob requests the registry saw after the first `before` of its log.
    fn blob_requests_since(&self, before: usize) -> usize {
        self.proxy.log()[before..]
            .iter()
            .filter(|l| l.path.contains("/blobs/"))
            .count()
    }

    fn connect(&self, name: &str) -> VhostBlkClient {
        VhostBlkClient::connect(&self.socket(name), ClientOptions::default()).unwrap()
    }

    /// Where byte `at` of payload `name` first appears on the disk.
    fn disk_offset(&self, name: &str, at: u64) -> u64 {
        payload_disk_offsets(&self.layout, name, at)[0]
    }

    /// Disk bytes holding kernel chunks `0..chunks`, checked to be one
    /// run on the disk: offset and length.
    fn kernel_chunks(&self, chunks: u64) -> (u64, u64) {
        let chunk = self.sample.payload("kernel.efi").chunk_size();
        let at = |byte| self.disk_offset("kernel.efi", byte);
        let (start, len) = (at(0), chunks * chunk);
        assert_eq!(
            at(len - 1),
            start + len - 1,
            "kernel chunks 0..{chunks} are not one run on the disk"
        );
        (start, len)
    }

    /// Reads through `c` and compares with the local layout's disk.
    fn read_same(&self, c: &mut VhostBlkClient, offset: u64, len: u64) {
        let done = c.read(0, offset, len as u32).unwrap();
        assert_eq!(done.status, BlkStatus::Ok, "read of {len} at {offset}");
        assert!(
            done.data == self.local(offset, len),
            "{len} bytes at {offset} differ from the local layout's disk"
        );
    }

    /// The local layout's disk bytes `[offset, offset + len)`.
    fn local(&self, offset: u64, len: u64) -> Vec<u8> {
        read_range(&self.local_disk, offset, len)
    }

    /// Blob requests that the proxy saw answered with bytes, for payload `name`.
    fn fetches(&self, name: &str) -> Vec<String> {
        let hex = self.sample.payload(name).digest.hex().to_owned();
        self.proxy
            .blob_requests(&hex)
            .into_iter()
            .filter(|l| matches!(l.status, 200 | 206))
            .map(|l| l.range.unwrap_or_default())
            .collect()
    }
}

fn read_status(c: &mut VhostBlkClient, offset: u64, len: u32) -> BlkStatus {
    c.read(0, offset, len).unwrap().status
}

/// Reads the whole disk through the client in 1 MiB requests and compares
/// it with the local layout's export.
fn read_whole_disk_same(fx: &Fixture, c: &mut VhostBlkClient) {
    let size = fx.layout.size;
    let mut offset = 0;
    while offset < size {
        let len = MIB.min(size - offset);
        fx.read_same(c, offset, len);
        offset += len;
    }
}

/// Serves the cache as `name` and reads the whole disk, checked against
/// the local layout's, asserting that no blob was fetched meanwhile (`why`
/// says why none may be).
fn serve_whole_disk_fetching_nothing(
    fx: &Fixture,
    name: &str,
    why: &str,
) -> (Server, VhostBlkClient) {
    let before = fx.proxy.log().len();
    let server = fx.serve(name, &[]);
    let mut c = fx.connect(name);
    read_whole_disk_same(fx, &mut c);
    assert_eq!(fx.blob_requests_since(before), 0, "{why}");
    (server, c)
}

#[test]
fn cold_cache_serves_the_layouts_bytes_fetching_only_touched_chunks_then_warm_and_offline() {
    let mut fx = Fixture::new();
    let system = fx.sample.payload("system").clone();
    let kernel = fx.sample.payload("kernel.efi").clone();

    // Cold cache: the partition table needs no payload at all.
    let server = fx.serve("cold", &[]);
    server.wait_for_line(&[
        "pinned to its manifest digest",
        &fx.sample.manifest_digest.to_string(),
    ]);
    let mut c = fx.connect("cold");
    fx.read_same(&mut c, 0, MIB);
    assert!(fx.fetches("system").is_empty() && fx.fetches("kernel.efi").is_empty());

    // One sector of system chunk 1: exactly that chunk is fetched.
    let sys = fx.disk_offset("system", 0);
    fx.read_same(&mut c, sys + system.chunk_size(), 512);
    assert_eq!(
        fx.fetches("system"),
        [format!(
            "bytes={}-{}",
            system.chunk_size(),
            system.size().min(2 * system.chunk_size()) - 1
        )]
    );
    assert!(fx.fetches("kernel.efi").is_empty());

    // Kernel chunk 3, through the ESP's file: one more fetch, that chunk.
    let k3 = fx.disk_offset("kernel.efi", 3 * kernel.chunk_size());
    fx.read_same(&mut c, k3, 4096);
    assert_eq!(
        fx.fetches("kernel.efi"),
        [format!(
            "bytes={}-{}",
            3 * kernel.chunk_size(),
            4 * kernel.chunk_size() - 1
        )]
    );

    // The whole disk equals the local layout's; each chunk fetched once.
    read_whole_disk_same(&fx, &mut c);
    assert_eq!(fx.fetches("system").len() as u64, system.chunks());
    assert_eq!(fx.fetches("kernel.efi").len() as u64, kernel.chunks());
    let fetched: u64 = fx
        .proxy
        .log()
        .iter()
        .filter(|l| l.path.contains("/blobs/") && l.status == 206)
        .count() as u64;
    assert_eq!(fetched, system.chunks() + kernel.chunks());
    drop(c);
    // Every chunk was fetched by this server, and the fetch checked it:
    // verified, and never hashed a second time.
    let mut server = server;
    server.stop_cleanly(Duration::from_secs(10), "the cold server");
    for (payload, chunks) in [("system", system.chunks()), ("kernel.efi", kernel.chunks())] {
        let line = server.wait_for_line(&["payload verification", &format!("payload={payload} ")]);
        assert!(
            line.contains(&format!("verified={chunks} hashed=0")),
            "{payload}: {line}"
        );
    }
    drop(server);

    // A warm cache: a second server reads everything, fetching nothing.
    let (server, c) =
        serve_whole_disk_fetching_nothing(&fx, "warm", "a warm cache fetches nothing");
    drop(c);
    drop(server);

    // Registry stopped: the cached tag, manifest, config and chunks serve.
    fx.registry.stop();
    let server = fx.serve("offline", &[]);
    server.wait_for_line(&["offline start"]);
    let mut c = fx.connect("offline");
    read_whole_disk_same(&fx, &mut c);
    drop(c);
    drop(server);
}

#[test]
fn registry_stopped_mid_run_fails_reads_of_missing_chunks_then_recovers() {
    let mut fx = Fixture::new();
    let kernel = fx.sample.payload("kernel.efi").clone();
    let server = fx.serve("node", &[]);
    let mut c = fx.connect("node");
    let k0 = fx.disk_offset("kernel.efi", 0);
    fx.read_same(&mut c, k0, 4096);

    fx.registry.stop();
    let k5 = fx.disk_offset("kernel.efi", 5 * kernel.chunk_size());
    assert_eq!(read_status(&mut c, k5, 4096), BlkStatus::IoErr);
    let line = server.wait_for_line(&["could not be fetched", "chunk=5"]);
    assert!(line.contains(&kernel.digest.to_string()), "{line}");
    // Cached chunks keep serving, and the server keeps serving.
    fx.read_same(&mut c, k0, 4096);

    fx.registry.restart();
    fx.read_same(&mut c, k5, 4096);
    fx.read_same(&mut c, k5 + kernel.chunk_size(), 8192);
    drop(server);
}

#[test]
fn blob_corrupted_in_registry_storage_gets_ioerr_naming_digest_and_chunk() {
    let fx = Fixture::new();
    let kernel = fx.sample.payload("kernel.efi").clone();
    fx.registry
        .corrupt_blob(&kernel.digest, 2 * kernel.chunk_size() + 100);
    let server = fx.serve("node", &[]);
    let mut c = fx.connect("node");
    let k2 = fx.disk_offset("kernel.efi", 2 * kernel.chunk_size());
    assert_eq!(read_status(&mut c, k2, 4096), BlkStatus::IoErr);
    let line = server.wait_for_line(&["could not be fetched", "chunk=2"]);
    assert!(
        line.contains(&format!("blob {} chunk 2: sha256 is", kernel.digest)),
        "{line}"
    );
    // Its neighbours read right; the bad chunk is never cached.
    fx.read_same(&mut c, k2 - 4096, 4096);
    fx.read_same(&mut c, k2 + kernel.chunk_size(), 4096);
    assert_eq!(read_status(&mut c, k2 + 8192, 512), BlkStatus::IoErr);
    drop(server);
}

#[test]
fn no_verify_still_fetches_verified_chunks() {
    let fx = Fixture::new();
    let kernel = fx.sample.payload("kernel.efi").clone();
    fx.registry.corrupt_blob(&kernel.digest, 100);
    let server = fx.serve("node", &["--no-verify"]);
    server.wait_for_line(&["--no-verify", "still verified"]);
    let mut c = fx.connect("node");
    let k0 = fx.disk_offset("kernel.efi", 0);
    assert_eq!(read_status(&mut c, k0, 4096), BlkStatus::IoErr);
    fx.read_same(&mut c, k0 + kernel.chunk_size(), 4096);
    drop(server);
}

#[test]
fn pull_fills_the_cache_and_cache_tools_report_and_collect() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let ociblk = |args: &[&str]| {
        let mut cmd = Command::new(ociblk_bin());
        cmd.args(args);
        cmd
    };
    let cache_arg = cache.display().to_string();
    let out = run_ok(&mut ociblk(&[
        "pull",
        &fx.reference(),
        "--cache",
        &cache_arg,
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let total: u64 = fx.sample.payloads.iter().map(|(_, p)| p.size()).sum();
    assert!(
        stdout.contains(&format!("{total} bytes of 2 payloads")) && stdout.contains("all match"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("fetched {total} bytes")),
        "{stdout}"
    );

    let info = run_ok(&mut ociblk(&[
        "cache", "info", "--cache", &cache_arg, "--json",
    ]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        info["images"][0]["manifest_digest"],
        fx.sample.manifest_digest.to_string()
    );
    for (_, p) in &fx.sample.payloads {
        let blob = cached_blob(&info, p);
        assert_eq!(blob["chunks"][0]["present"], p.chunks());
    }

    // `cache gc` asked to shrink the cache to nothing; returns its report.
    let gc_to_nothing = || {
        let gc = run_ok(&mut ociblk(&[
            "cache",
            "gc",
            "--cache",
            &cache_arg,
            "--max-size",
            "0",
        ]));
        String::from_utf8_lossy(&gc.stdout).into_owned()
    };

    // A server over the pulled cache fetches nothing, even from a stopped registry.
    let mut fx = fx;
    fx.registry.stop();
    let (server, c) =
        serve_whole_disk_fetching_nothing(&fx, "node", "a pulled cache fetches nothing");
    // Blobs in use are kept by gc.
    let gc_out = gc_to_nothing();
    assert!(gc_out.contains("in use, kept"), "{gc_out}");
    drop(c);
    drop(server);
    let gc_out = gc_to_nothing();
    assert!(
        gc_out.contains("removed") && gc_out.contains("0 bytes of payload blobs remain"),
        "{gc_out}"
    );

    // A directory wins; neither reading gives an error naming both.
    let err = run_err(&mut ociblk(&[
        "inspect",
        "--image",
        "no-such-dir/os",
        "--cache",
        &cache_arg,
    ]));
    assert!(
        err.contains("neither an OCI image layout directory nor a registry reference")
            && err.contains("no such directory"),
        "{err}"
    );
}

#[test]
fn torn_cached_chunk_is_fetched_again_and_served_right() {
    let fx = Fixture::new();
    let kernel = fx.sample.payload("kernel.efi").clone();
    let cache_arg = fx.cache().display().to_string();
    run_ok(Command::new(ociblk_bin()).args(["pull", &fx.reference(), "--cache", &cache_arg]));
    // What a machine crash can leave: the chunk map says present, the
    // bytes are not the chunk's.
    let cached = fx.cache().join("blobs/sha256").join(format!(
        "{}.{}",
        kernel.digest.hex(),
        kernel.table_digest().hex()
    ));
    let at = 4 * kernel.chunk_size() + 10;
    let mut byte = read_range(&cached, at, 1);
    byte[0] ^= 0xff;
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new()
            .write(true)
            .open(&cached)
            .unwrap(),
        &byte,
        at,
    )
    .unwrap();
    let before = fx.fetches("kernel.efi").len();
    let server = fx.serve("node", &[]);
    let mut c = fx.connect("node");
    let k4 = fx.disk_offset("kernel.efi", 4 * kernel.chunk_size());
    fx.read_same(&mut c, k4, 4096);
    server.wait_for_line(&["chunk 4", "fetching the chunk again"]);
    assert_eq!(
        fx.fetches("kernel.efi")[before..],
        [format!(
            "bytes={}-{}",
            4 * kernel.chunk_size(),
            5 * kernel.chunk_size() - 1
        )]
    );
    drop(server);
}

/// A real guest boots the sample image by UEFI from a registry reference
/// with an empty cache: OVMF reads the kernel from the served ESP, the
/// initramfs mounts system A; only the chunks read are fetched.
#[test]
fn qemu_guest_boots_from_a_registry_reference_with_a_cold_cache() {
    use ociblk_tests::process::{Boot, Guest, GuestConfig};

    let fx = Fixture::new();
    let vars = fx.node.dir().join("OVMF_VARS.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS.fd", &vars)
        .expect("copy OVMF_VARS.fd (run hack/setup)");
    let reference = fx.reference();
    let cache = fx.cache().display().to_string();
    let overlay = fx.node.dir().join("node.overlay").display().to_string();
    let socket = fx.socket("guest");
    let record = fx.node.dir().join("boot.access");
    let record_arg = record.display().to_string();
    let mut server = Server::start(
        &socket,
        &[
            "--image",
            &reference,
            "--cache",
            &cache,
            "--seed",
            "guest",
            "--overlay",
            &overlay,
            "--record-access",
            &record_arg,
        ],
    );
    let mut cfg = GuestConfig::new(&socket, Boot::Uefi);
    cfg.vars = Some(vars);
    let mut guest = Guest::start(&cfg);
    guest.expect("ociblk-sample: ready", Duration::from_secs(180));
    guest.kill();
    let status = server.stop_with(libc::SIGTERM, Duration::from_secs(30));
    assert!(status.success(), "{}", server.log.text());
    let line = server.wait_for_line(&["fetched from the registry"]);
    let bytes: u64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("bytes="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bytes= in {line}"));
    let payloads: u64 = fx.sample.payloads.iter().map(|(_, p)| p.size()).sum();
    let requests = chunks_fetched_once_each(&fx);
    assert!(bytes > 0 && bytes <= payloads, "{bytes} of {payloads}");
    eprintln!(
        "cold-cache UEFI boot: fetched {bytes} of {payloads} payload bytes in {requests} chunk requests"
    );

    // The boot's record lists exactly the chunks it fetched (every fetch
    // was for a guest read), and replayed into an empty cache with no
    // guest it fetches them all again.
    let recorded = AccessRecord::read(&record).unwrap();
    assert_eq!(recorded.manifest, fx.sample.manifest_digest);
    assert_eq!(recorded.chunks.len(), requests, "{recorded:?}");
    let recorded_chunks =
        |blob: &BlobSpec| chunks_of(recorded.chunks.iter().map(|c| &c.chunk), blob);
    for (_, blob) in &fx.sample.payloads {
        assert_eq!(recorded_chunks(blob), cached_chunks(&fx.cache(), blob));
    }
    let empty = fx.node.dir().join("cache2");
    let mut replay = fx.serve_in(&empty, "replay", &["--prefetch", &record_arg]);
    let filled = wait_until(Duration::from_secs(60), || {
        fx.sample
            .payloads
            .iter()
            .all(|(_, b)| cached_chunks(&empty, b) == recorded_chunks(b))
    });
    assert!(
        filled,
        "prefetch did not fill the cache:\n{}",
        replay.log.text()
    );
    let line = replay.wait_for_line(&["prefetch done"]);
    assert!(line.contains(&format!("fetched={requests} ")), "{line}");
    replay.stop_cleanly(Duration::from_secs(20), "after the replay");
}

/// Chunk requests for both payloads, none fetched twice and neither
/// payload untouched: how many.
fn chunks_fetched_once_each(fx: &Fixture) -> usize {
    let mut requests = 0;
    for name in ["system", "kernel.efi"] {
        let fetched = fx.fetches(name);
        let mut unique = fetched.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            fetched.len(),
            "{name}: a chunk fetched twice: {fetched:?}"
        );
        assert!(!fetched.is_empty(), "{name}: nothing fetched");
        eprintln!(
            "{name}: {} of {} chunks fetched",
            fetched.len(),
            fx.sample.payload(name).chunks()
        );
        requests += fetched.len();
    }
    requests
}

#[test]
fn two_servers_filling_one_cache_fetch_each_chunk_once() {
    let fx = Fixture::new();
    let _a = fx.serve("a", &[]);
    let _b = fx.serve("b", &[]);
    std::thread::scope(|scope| {
        for name in ["a", "b"] {
            let fx = &fx;
            scope.spawn(move || {
                let mut c = fx.connect(name);
                read_whole_disk_same(fx, &mut c);
            });
        }
    });
    for (name, p) in &fx.sample.payloads {
        let mut fetched = fx.fetches(name);
        fetched.sort();
        fetched.dedup();
        assert_eq!(
            (fetched.len() as u64, fx.fetches(name).len() as u64),
            (p.chunks(), p.chunks()),
            "{name}: every chunk fetched exactly once by the two servers"
        );
    }
}

#[test]
fn chunk_not_fetched_in_time_fails_the_read_and_a_later_read_succeeds() {
    let fx = Fixture::new();
    let kernel = fx.sample.payload("kernel.efi").clone();
    let server = fx.serve("node", &["--fetch-timeout", "1"]);
    let mut c = fx.connect("node");
    fx.proxy.set(|b| b.blob_delay = Duration::from_secs(3));
    let k1 = fx.disk_offset("kernel.efi", kernel.chunk_size());
    assert_eq!(read_status(&mut c, k1, 4096), BlkStatus::IoErr);
    server.wait_for_line(&["could not be fetched", "chunk=1"]);
    fx.proxy.set(|b| b.blob_delay = Duration::ZERO);
    fx.read_same(&mut c, k1, 4096);
    drop(server);
}

/// `ociblk launch` resolves a tag once and serves every node that digest.
#[test]
fn launch_pins_a_tag_once_for_the_cluster() {
    let fx = Fixture::new();
    let state = fx.node.dir().join("cluster");
    let cache = fx.cache().display().to_string();
    let out = run_ok(
        Command::new(ociblk_bin())
            .args(["launch", "--image", &fx.reference(), "--cache", &cache])
            .args(["--nodes", "1", "--quiet"])
            .arg("--state-dir")
            .arg(&state)
            .args(["--wait-for", "ociblk-sample: ready", "--timeout", "180s"])
            .arg("--exit-when-ready"),
    );
    let serve_log = std::fs::read_to_string(state.join("node-1/serve.log")).unwrap();
    let pinned = format!("{}@{}", fx.reference(), fx.sample.manifest_digest);
    assert!(
        serve_log.contains(&format!("image={pinned}")),
        "{serve_log}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tag_lookups = fx
        .proxy
        .log()
        .iter()
        .filter(|l| l.path.ends_with("/manifests/v1"))
        .count();
    assert_eq!(tag_lookups, 1, "the tag is resolved by launch alone");
}

#[test]
fn verify_of_a_reference_lists_a_chunk_corrupted_in_the_registry() {
    let fx = Fixture::new();
    let system = fx.sample.payload("system").clone();
    fx.registry.corrupt_blob(&system.digest, 5);
    let cache = fx.cache().display().to_string();
    let mut cmd = Command::new(ociblk_bin());
    cmd.args(["verify", "--image", &fx.reference(), "--cache", &cache]);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bad: Vec<&str> = stdout.lines().filter(|l| l.starts_with("BAD ")).collect();
    assert_eq!(bad.len(), 1, "{stdout}");
    assert!(
        bad[0].contains(&format!("blob {} chunk 0", system.digest)),
        "{}",
        bad[0]
    );
    assert!(stdout.contains("1 bad"), "{stdout}");
}

#[test]
fn a_registry_ignoring_range_still_serves_the_right_bytes() {
    let fx = Fixture::new();
    fx.proxy.set(|b| b.ignore_range = true);
    let kernel = fx.sample.payload("kernel.efi").clone();
    let server = fx.serve("node", &[]);
    let mut c = fx.connect("node");
    let k3 = fx.disk_offset("kernel.efi", 3 * kernel.chunk_size());
    fx.read_same(&mut c, k3, 8192);
    // The whole-blob answer brought chunks 0 to 3: reading them fetches nothing more.
    let answers = fx.fetches("kernel.efi").len();
    assert_eq!(answers, 1);
    let k0 = fx.disk_offset("kernel.efi", 0);
    fx.read_same(&mut c, k0, 3 * kernel.chunk_size());
    assert_eq!(fx.fetches("kernel.efi").len(), answers);
    drop(server);
}

/// What `ociblk cache info --json` (`info`) says of `blob`.
fn cached_blob<'a>(info: &'a serde_json::Value, blob: &BlobSpec) -> &'a serde_json::Value {
    info["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["digest"] == blob.digest.to_string())
        .unwrap()
}

/// The chunks of `blob` present in the cache `cache` (its chunk map).
fn cached_chunks(cache: &Path, blob: &BlobSpec) -> Vec<u64> {
    let map = cache.join("blobs/sha256").join(format!(
        "{}.{}.{}.chunks",
        blob.digest.hex(),
        blob.table_digest().hex(),
        blob.chunk_size()
    ));
    match std::fs::read(&map) {
        Ok(bytes) => (0..bytes.len() as u64)
            .filter(|&i| bytes[i as usize] == 1)
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", map.display()),
    }
}

#[test]
fn recorded_access_is_prefetched_into_an_empty_cache_without_guest_reads() {
    let fx = Fixture::new();
    let system = fx.sample.payload("system").clone();
    let kernel = fx.sample.payload("kernel.efi").clone();
    let record = fx.node.dir().join("boot.access");
    let record_arg = record.display().to_string();

    // Record: first reads in this order, a repeat and the partition table
    // (no payload) in between.
    let mut server = fx.serve("rec", &["--record-access", &record_arg]);
    let mut c = fx.connect("rec");
    let reads = [
        (&system, 1),
        (&kernel, 3),
        (&system, 0),
        (&kernel, 3),
        (&kernel, 0),
    ];
    for (blob, chunk) in reads {
        let name = if blob.digest == system.digest {
            "system"
        } else {
            "kernel.efi"
        };
        fx.read_same(
            &mut c,
            fx.disk_offset(name, chunk * blob.chunk_size()),
            4096,
        );
        fx.read_same(&mut c, 0, 4096);
    }
    drop(c);
    server.stop_cleanly(Duration::from_secs(20), "after recording");
    server.wait_for_line(&["access record written", "chunks=4"]);
    let order = [(&system, 1), (&kernel, 3), (&system, 0), (&kernel, 0)];
    let in_cache = check_written_record(&fx, &record, &chunk_refs(&order));

    // Replay on an empty cache (another host's): exactly the recorded
    // chunks arrive, in order, with no client connected.
    replay_into_an_empty_cache(&fx, &record_arg, &order);

    // The record kept in the first cache is replayed there without
    // --prefetch, once gc has emptied it; --no-prefetch leaves it alone,
    // and a damaged one is ignored.
    prefetch_from_the_caches_record(&fx, &kernel, &in_cache);
}

/// The chunks `order` names, as an access record lists them.
fn chunk_refs(order: &[(&BlobSpec, u64)]) -> Vec<ChunkRef> {
    order
        .iter()
        .map(|(b, i)| ChunkRef {
            blob: b.digest.clone(),
            index: *i,
        })
        .collect()
}

/// The indexes of `blob`'s chunks among `chunks`, sorted.
fn chunks_of<'a>(chunks: impl IntoIterator<Item = &'a ChunkRef>, blob: &BlobSpec) -> Vec<u64> {
    let mut v: Vec<u64> = chunks
        .into_iter()
        .filter(|c| c.blob == blob.digest)
        .map(|c| c.index)
        .collect();
    v.sort_unstable();
    v
}

/// Checks the access record written at `record`: for the sample's
/// manifest, `expected` in order, mode 0600, and the same bytes as the
/// copy the cache keeps, whose path it returns.
fn check_written_record(fx: &Fixture, record: &Path, expected: &[ChunkRef]) -> PathBuf {
    let written = AccessRecord::read(record).unwrap();
    assert_eq!(written.manifest, fx.sample.manifest_digest);
    let order: Vec<ChunkRef> = written.chunks.iter().map(|c| c.chunk.clone()).collect();
    assert_eq!(order, expected);
    let mode = std::fs::metadata(record).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let in_cache = fx
        .cache()
        .join("access/sha256")
        .join(fx.sample.manifest_digest.hex());
    assert_eq!(
        std::fs::read(&in_cache).unwrap(),
        std::fs::read(record).unwrap()
    );
    in_cache
}

/// Serves an empty cache with `--prefetch record_arg` and no client: the
/// chunks of `order` arrive, one request each, in order; a guest's read of
/// a prefetched chunk then fetches nothing more.
fn replay_into_an_empty_cache(fx: &Fixture, record_arg: &str, order: &[(&BlobSpec, u64)]) {
    let system = fx.sample.payload("system");
    let kernel = fx.sample.payload("kernel.efi");
    let expected = chunk_refs(order);
    let empty = fx.node.dir().join("cache2");
    let before = fx.proxy.log().len();
    let mut replay = fx.serve_in(&empty, "replay", &["--prefetch", record_arg]);
    let filled = wait_until(Duration::from_secs(30), || {
        cached_chunks(&empty, system) == chunks_of(&expected, system)
            && cached_chunks(&empty, kernel) == chunks_of(&expected, kernel)
    });
    assert!(
        filled,
        "prefetch did not fill the cache: system {:?}, kernel {:?}\n{}",
        cached_chunks(&empty, system),
        cached_chunks(&empty, kernel),
        replay.log.text()
    );
    let line = replay.wait_for_line(&["prefetch done"]);
    assert!(
        line.contains("fetched=4")
            && line.contains("already_present=0")
            && line.contains("failed=0"),
        "{line}"
    );
    // Payload requests only: the empty cache fetched manifest and config too.
    let payload_ranges = || -> Vec<String> {
        fx.proxy.log()[before..]
            .iter()
            .filter(|l| {
                [system, kernel]
                    .iter()
                    .any(|b| l.path.ends_with(&b.digest.to_string()))
                    && matches!(l.status, 200 | 206)
            })
            .map(|l| l.range.clone().unwrap_or_default())
            .collect()
    };
    let ranges = payload_ranges();
    let expected_ranges: Vec<String> = order
        .iter()
        .map(|(b, i)| {
            let (start, len) = b.chunk_range(*i);
            format!("bytes={start}-{}", start + len - 1)
        })
        .collect();
    assert_eq!(
        ranges, expected_ranges,
        "one request per recorded chunk, in order"
    );
    // The guest's read of a prefetched chunk fetches nothing more.
    let mut c = fx.connect("replay");
    fx.read_same(&mut c, fx.disk_offset("system", system.chunk_size()), 4096);
    assert_eq!(payload_ranges(), expected_ranges);
    drop(c);
    replay.stop_cleanly(Duration::from_secs(20), "after the replay");
}

/// The record the cache keeps at `in_cache` is prefetched without
/// --prefetch once gc has emptied the cache (`kernel` among its chunks);
/// --no-prefetch leaves it alone; a damaged one is ignored with a warning
/// naming it, and the server serves.
fn prefetch_from_the_caches_record(fx: &Fixture, kernel: &BlobSpec, in_cache: &Path) {
    run_ok(Command::new(ociblk_bin()).args([
        "cache",
        "gc",
        "--max-size",
        "0",
        "--cache",
        &fx.cache().display().to_string(),
    ]));
    assert!(cached_chunks(&fx.cache(), kernel).is_empty());
    let auto = fx.serve("auto", &[]);
    auto.wait_for_line(&[
        "prefetching recorded chunks",
        &in_cache.display().to_string(),
    ]);
    let line = auto.wait_for_line(&["prefetch done"]);
    assert!(line.contains("fetched=4"), "{line}");
    drop(auto);

    let mut off = fx.serve("off", &["--no-prefetch"]);
    off.stop_cleanly(Duration::from_secs(20), "with --no-prefetch");
    assert!(!off.log.text().contains("prefetch"), "{}", off.log.text());
    std::fs::write(in_cache, "ociblk-access-record 1\nmanifest x\n").unwrap();
    let damaged = fx.serve("damaged", &[]);
    let line = damaged.wait_for_line(&["not prefetching from the cache's access record"]);
    assert!(
        line.contains(&in_cache.display().to_string()) && line.contains("line 2"),
        "{line}"
    );
    let mut c = fx.connect("damaged");
    fx.read_same(&mut c, fx.disk_offset("kernel.efi", 0), 4096);
    drop(c);
    drop(damaged);
}

#[test]
fn prefetch_records_for_other_images_or_past_a_blobs_end_are_refused_naming_the_file() {
    let fx = Fixture::new();
    let kernel = fx.sample.payload("kernel.efi").clone();
    let reference = fx.reference();
    let cache = fx.cache().display().to_string();
    let serve = |record: &Path| {
        let mut cmd = Command::new(ociblk_bin());
        cmd.args([
            "serve",
            "--image",
            &reference,
            "--cache",
            &cache,
            "--read-only",
        ])
        .arg("--socket")
        .arg(fx.socket("refused"))
        .arg("--prefetch")
        .arg(record);
        run_err(&mut cmd)
    };
    let other = fx.node.dir().join("other.access");
    let elsewhere = ociblk_registry::Digest::of(b"another image");
    AccessRecord::new(elsewhere.clone(), [])
        .write(&other)
        .unwrap();
    let err = serve(&other);
    assert!(
        err.contains(&other.display().to_string())
            && err.contains(&format!("made for the image with manifest {elsewhere}"))
            && err.contains(&fx.sample.manifest_digest.to_string()),
        "{err}"
    );
    let past = fx.node.dir().join("past.access");
    let chunks = kernel.chunks();
    AccessRecord::new(
        fx.sample.manifest_digest.clone(),
        [ChunkRef {
            blob: kernel.digest.clone(),
            index: chunks,
        }],
    )
    .write(&past)
    .unwrap();
    let err = serve(&past);
    assert!(
        err.contains(&past.display().to_string())
            && err.contains("line 4")
            && err.contains(&format!("chunk {chunks} of blob {}", kernel.digest)),
        "{err}"
    );
    assert!(!fx.socket("refused").exists());
}

/// Makes a FIFO at `path`.
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

#[test]
fn another_image_claiming_a_blobs_digest_never_changes_chunks_a_running_server_verified() {
    let fx = Fixture::new();
    let kernel = fx.sample.payload("kernel.efi").clone();
    // Image B, in another registry: the sample's kernel digest, its chunk 0
    // changed in the stored blob and in B's config's chunk hashes.
    let other = Registry::start();
    let altered = fx
        .sample
        .with_chunk_changed(&fx.node.dir().join("altered"), "kernel.efi", 0);
    other.push(&altered.dir, "other/os:v1");
    other.write_blob(&kernel.digest, 0, &altered.chunk);
    let b_reference = format!("{}/other/os:v1", other.host());

    // A verifying server of A reads (and verifies) kernel chunk 0.
    let server = fx.serve("a", &[]);
    let mut c = fx.connect("a");
    let k0 = fx.disk_offset("kernel.efi", 0);
    fx.read_same(&mut c, k0, 64 << 10);

    let cache_arg = fx.cache().display().to_string();
    let out = run_bounded(
        Command::new(ociblk_bin()).args(["pull", &b_reference, "--cache", &cache_arg]),
        Duration::from_secs(120),
    );

    // A's server still serves A's bytes, and so does a new one.
    fx.read_same(&mut c, k0, 64 << 10);
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("serves other bytes under this digest"),
        "pull of B did not notice its blob is not its digest:\n{text}"
    );
    drop(c);
    drop(server);
    let server = fx.serve("a-again", &[]);
    let mut c = fx.connect("a-again");
    read_whole_disk_same(&fx, &mut c);
    drop(c);
    drop(server);
    let info =
        run_ok(Command::new(ociblk_bin()).args(["cache", "info", "--json", "--cache", &cache_arg]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let blob = cached_blob(&info, &kernel);
    assert_eq!(blob["chunks"].as_array().unwrap().len(), 2, "{blob}");
}

#[test]
fn fifos_as_access_record_tag_record_or_prefetch_file_are_refused_not_waited_on() {
    let mut fx = Fixture::new();
    let cache_arg = fx.cache().display().to_string();
    run_ok(Command::new(ociblk_bin()).args(["pull", &fx.reference(), "--cache", &cache_arg]));
    let bounded = Duration::from_secs(30);

    // The cache's access record of the image: a warning, then serving.
    let record = fx
        .cache()
        .join("access/sha256")
        .join(fx.sample.manifest_digest.hex());
    mkfifo(&record);
    let server = fx.serve("fifo-record", &[]);
    server.wait_for_line(&["not prefetching", "a FIFO"]);
    let mut c = fx.connect("fifo-record");
    fx.read_same(&mut c, 0, MIB);
    drop(c);
    drop(server);

    // --prefetch FIFO: refused, naming it.
    let fifo = fx.node.dir().join("prefetch.fifo");
    mkfifo(&fifo);
    refused_naming_fifo(
        fx.serve_command("fifo-prefetch")
            .arg("--prefetch")
            .arg(&fifo),
        &fifo,
    );

    // A FIFO tag record: cache info and gc list and collect the rest...
    let tag = fx
        .cache()
        .join("tags")
        .join(fx.proxy.host())
        .join("monogon/os/:v1");
    std::fs::remove_file(&tag).unwrap();
    mkfifo(&tag);
    for args in [
        &["cache", "info", "--cache", &cache_arg][..],
        &["cache", "gc", "--max-size", "1T", "--cache", &cache_arg][..],
    ] {
        let out = run_bounded(Command::new(ociblk_bin()).args(args), bounded);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // ... and an offline start, which needs the tag record, says what it is.
    fx.registry.stop();
    refused_naming_fifo(&mut fx.serve_command("fifo-tag"), &tag);
}

/// Runs `cmd` (bounded): it fails, naming the FIFO `fifo`.
fn refused_naming_fifo(cmd: &mut Command, fifo: &Path) {
    let out = run_bounded(cmd, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&fifo.display().to_string()) && err.contains("a FIFO"),
        "{err}"
    );
}

#[test]
fn a_full_cache_file_system_starts_a_cached_tag_and_pull_says_no_space() {
    let fx = Fixture::new();
    let small = Tmpfs::mount(&fx.node.dir().join("small"), "24M");
    let cache = small.0.join("cache");
    let cache_arg = cache.display().to_string();
    run_ok(Command::new(ociblk_bin()).args(["pull", &fx.reference(), "--cache", &cache_arg]));
    // Fill what is left of the file system.
    {
        use std::io::Write as _;
        let mut filler = std::fs::File::create(small.0.join("filler")).unwrap();
        let block = vec![0x5a; MIB as usize];
        while filler.write_all(&block).is_ok() {}
    }
    let before = fx.proxy.log().len();
    let server = fx.serve_in(&cache, "full", &[]);
    let mut c = fx.connect("full");
    read_whole_disk_same(&fx, &mut c);
    assert_eq!(fx.blob_requests_since(before), 0, "everything was cached");
    drop(c);
    drop(server);

    // A pull into a full cache: the chunks it cannot store are "no space".
    let empty = small.0.join("empty-cache");
    let out = run_bounded(
        Command::new(ociblk_bin()).args([
            "pull",
            &fx.reference(),
            "--cache",
            &empty.display().to_string(),
        ]),
        Duration::from_secs(120),
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success());
    assert!(
        stdout.contains("NO SPACE") && !stdout.contains("BAD"),
        "{stdout}"
    );
    assert!(
        stderr.contains("no space left on the cache's file system")
            && !stderr.contains("could not be verified"),
        "{stderr}"
    );
    drop(small);
}

// The registry misbehaving at the protocol level: 429 with a Retry-After no
// clock can hold, slow and many-chunk reads.

#[test]
fn a_retry_after_no_clock_can_hold_fails_the_read_and_the_server_keeps_serving() {
    let fx = Fixture::new();
    let mut server = fx.serve("proto", &["--fetch-timeout", "2"]);
    let mut c = fx.connect("proto");
    fx.proxy.set(|b| {
        b.too_many = 1;
        b.retry_after_raw = Some(u64::MAX.to_string());
    });
    let k1 = fx.disk_offset("kernel.efi", MIB);
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
    let mut next = fx.connect("proto");
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
    let server = fx.serve("proto", &["--fetch-timeout", "30"]);
    let mut c = fx.connect("proto");
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
    let server = fx.serve("proto", &["--fetch-timeout", "2"]);
    let mut c = fx.connect("proto");
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
