//! ociblk-registry against a real registry: Debian's `docker-registry`
//! (CNCF distribution) on loopback, the sample image pushed with `skopeo`.

use std::process::Command;
use std::sync::Barrier;
use std::time::Duration;

use ociblk_registry::{BlobSpec, Cache, Error, Options, RegistryImage};
use ociblk_registry_test_support::fixture::{Fixture, REPO_TAG, reference, temp_cache};
use ociblk_registry_test_support::relay::Relay;
use ociblk_registry_test_support::{Auth, Registry, Tmpfs, token, write_chunk_hashes};

/// `ociblk-registry-fetch` filling every chunk of `blob` of [`REPO_TAG`] at
/// `host` into the fixture's cache, checked against the `hashes` file;
/// its log goes to a pipe.
fn fetcher(fixture: &Fixture, host: &str, blob: &BlobSpec, hashes: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ociblk-registry-fetch"));
    command
        .arg("--cache")
        .arg(fixture.cache.dir())
        .arg(format!("{host}/{REPO_TAG}"))
        .arg(blob.digest.to_string())
        .arg(blob.chunk_size().to_string())
        .arg(hashes)
        .stderr(std::process::Stdio::piped());
    command
}

#[test]
fn tag_and_digest_references_open_the_pushed_image() {
    let f = Fixture::new();
    let (sample, host) = (&f.sample, f.registry.host());

    let by_tag = f.open(&host);
    assert_eq!(by_tag.manifest_digest, sample.manifest_digest);
    assert_eq!(by_tag.manifest, sample.manifest);
    assert_eq!(by_tag.config, sample.config);
    assert!(!by_tag.offline);
    assert_eq!(
        by_tag.reference.digest.as_ref(),
        Some(&sample.manifest_digest)
    );
    let layers: Vec<_> = by_tag
        .layers
        .iter()
        .map(|l| (l.digest.clone(), l.size))
        .collect();
    let expected: Vec<_> = sample
        .payloads
        .iter()
        .map(|(_, p)| (p.digest.clone(), p.size()))
        .collect();
    assert_eq!(layers, expected);
    assert_eq!(
        f.cache
            .tag(&reference(&host, REPO_TAG))
            .expect("tag record"),
        Some(sample.manifest_digest.clone())
    );

    // A digest reference, into an empty cache: fetched by digest and verified.
    let (_dir2, cache2) = temp_cache();
    let pinned = RegistryImage::open(
        &reference(&host, &format!("monogon/os@{}", sample.manifest_digest)),
        &cache2,
        &Options::default(),
    )
    .expect("open by digest");
    assert_eq!(pinned.manifest, sample.manifest);
    assert_eq!(pinned.config, sample.config);

    let err = f
        .try_open(&host, "monogon/os:nope", &Options::default())
        .expect_err("unknown tag");
    assert!(
        matches!(&err, Error::Status { status: 404, url, .. } if url.ends_with("/v2/monogon/os/manifests/nope")),
        "{err}"
    );
}

#[test]
fn config_or_manifest_tampered_in_registry_storage_is_refused() {
    let f = Fixture::new();
    let (registry, sample) = (&f.registry, &f.sample);
    registry.corrupt_blob(&sample.config_digest, 10);
    let err = f
        .try_open(&registry.host(), REPO_TAG, &Options::default())
        .expect_err("tampered config");
    let msg = err.to_string();
    assert!(
        matches!(err, Error::DigestMismatch { what: "config", .. }),
        "{msg}"
    );
    assert!(msg.contains(&sample.config_digest.to_string()), "{msg}");

    // Fresh caches: the first open already cached the (intact) manifest.
    registry.rewrite_blob(&sample.manifest_digest, "os.image.v1\"", "os.image.v2\"");
    for rest in [
        format!("monogon/os@{}", sample.manifest_digest),
        REPO_TAG.to_string(),
    ] {
        let (_dir, cache) = temp_cache();
        let err = RegistryImage::open(
            &reference(&registry.host(), &rest),
            &cache,
            &Options::default(),
        )
        .expect_err("tampered manifest");
        let msg = err.to_string();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{rest}: {msg}");
        assert!(
            msg.contains("manifest") && msg.contains(&sample.manifest_digest.to_string()),
            "{rest}: {msg}"
        );
        assert_eq!(
            cache
                .metadata(&sample.manifest_digest, None)
                .expect("read cache"),
            None
        );
    }
}

#[test]
fn chunks_are_fetched_by_range_verified_and_stored_once() {
    let f = Fixture::new();
    let proxy = f.proxy();
    let image = f.open(&proxy.host());
    let kernel = f.sample.payload("kernel.efi");
    let last = kernel.chunks() - 1;

    image.blobs.ensure_chunk(kernel, 3).expect("chunk 3");
    image.blobs.ensure_chunk(kernel, last).expect("last chunk");
    f.assert_cached_chunk(&image, kernel, 3);
    f.assert_cached_chunk(&image, kernel, last);
    assert!(!image.blobs.chunk_present(kernel, 2).expect("map"));

    let requests = proxy.blob_requests(kernel.digest.hex());
    let ranges: Vec<_> = requests
        .iter()
        .map(|r| (r.status, r.range.clone()))
        .collect();
    let (start, len) = kernel.chunk_range(last);
    assert_eq!(
        ranges,
        vec![
            (206, Some("bytes=3145728-4194303".to_string())),
            (206, Some(format!("bytes={start}-{}", start + len - 1))),
        ]
    );

    // Present chunks are not fetched again.
    image.blobs.ensure_chunk(kernel, 3).expect("chunk 3 again");
    assert_eq!(proxy.blob_requests(kernel.digest.hex()).len(), 2);
    assert_eq!(
        image.blobs.fetch_stats(),
        ociblk_registry::FetchStats {
            requests: 2,
            bytes: kernel.chunk_size() + len
        }
    );
    let present = image.blobs.present_chunks(kernel).expect("map");
    let expected: Vec<bool> = (0..kernel.chunks()).map(|i| i == 3 || i == last).collect();
    assert_eq!(present, expected);

    // The cache files are private and the blob file sparse.
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let meta = std::fs::metadata(image.blobs.path(&kernel.digest)).expect("stat blob");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), kernel.size());
    assert!(
        meta.blocks() * 512 < kernel.size() / 2,
        "blob file is not sparse"
    );

    let info = f.cache.info().expect("cache info");
    assert_eq!(info.images.len(), 1);
    assert_eq!(
        info.images[0].reference,
        format!("{}/{REPO_TAG}", proxy.host())
    );
    let usage = info
        .blobs
        .iter()
        .find(|b| b.digest == kernel.digest)
        .expect("kernel in info");
    assert_eq!(
        usage.chunks,
        vec![(kernel.chunk_size(), 2, kernel.chunks())]
    );
}

#[test]
fn chunks_fetched_one_after_another_reuse_one_connection() {
    let f = Fixture::new();
    let relay = Relay::start(f.registry.addr);
    let image = f.open(&relay.host());
    let opened = relay.connections();
    let kernel = f.sample.payload("kernel.efi");
    for i in 0..4 {
        image.blobs.ensure_chunk(kernel, i).expect("chunk");
    }
    let more = relay.connections() - opened;
    assert!(
        more <= 1,
        "4 chunks fetched one after another opened {more} connections (each one is a round trip)"
    );
}

#[test]
fn chunk_corrupted_in_registry_is_refused_naming_digest_and_chunk() {
    let f = Fixture::new();
    let kernel = f.sample.payload("kernel.efi");
    f.registry
        .corrupt_blob(&kernel.digest, 2 * kernel.chunk_size() + 7);
    let image = f.open(&f.registry.host());

    let err = image
        .blobs
        .ensure_chunk(kernel, 2)
        .expect_err("corrupt chunk");
    let msg = err.to_string();
    assert!(matches!(err, Error::ChunkDigest { index: 2, .. }), "{msg}");
    assert!(
        msg.contains(&kernel.digest.to_string()) && msg.contains("chunk 2"),
        "{msg}"
    );
    assert!(
        !image.blobs.chunk_present(kernel, 2).expect("map"),
        "a bad chunk was stored"
    );

    image
        .blobs
        .ensure_chunk(kernel, 1)
        .expect("intact neighbour");
    f.assert_cached_chunk(&image, kernel, 1);
}

#[test]
fn chunk_torn_in_the_cache_is_fetched_again_after_invalidation() {
    let f = Fixture::new();
    let proxy = f.proxy();
    let image = f.open(&proxy.host());
    let system = f.sample.payload("system");
    image.blobs.ensure_chunk(system, 0).expect("chunk 0");

    // What a crash between the data and the map write can leave behind.
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(image.blobs.path(&system.digest))
        .expect("open cached blob");
    file.write_all_at(&[0xee; 512], 4096).expect("tear chunk");
    assert!(image.blobs.chunk_present(system, 0).expect("map"));

    image.blobs.invalidate_chunk(system, 0).expect("invalidate");
    image.blobs.ensure_chunk(system, 0).expect("refetch");
    f.assert_cached_chunk(&image, system, 0);
    assert_eq!(proxy.blob_requests(system.digest.hex()).len(), 2);
}

#[test]
fn two_threads_wanting_one_chunk_fetch_it_once() {
    let f = Fixture::new();
    // A slow registry keeps the first fetch running while the second
    // thread asks for the same chunk.
    let proxy = f.proxy();
    let image = f.open(&proxy.host());
    proxy.set(|b| b.blob_delay = Duration::from_millis(300));
    let kernel = f.sample.payload("kernel.efi");
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let fetch = || {
            barrier.wait();
            image.blobs.ensure_chunk(kernel, 5)
        };
        let a = s.spawn(fetch);
        let b = s.spawn(fetch);
        a.join().expect("thread a").expect("fetch a");
        b.join().expect("thread b").expect("fetch b");
    });
    assert_eq!(proxy.blob_requests(kernel.digest.hex()).len(), 1);
    f.assert_cached_chunk(&image, kernel, 5);
}

#[test]
fn two_processes_filling_one_cache_fetch_each_chunk_once() {
    let f = Fixture::new();
    let proxy = f.proxy();
    // Slow enough that the second process catches up with the first and
    // waits on a chunk the first is fetching.
    proxy.set(|b| b.blob_delay = Duration::from_millis(100));
    let kernel = f.sample.payload("kernel.efi");
    let hashes = write_chunk_hashes(f.dir.path(), kernel);

    let spawn = || {
        fetcher(&f, &proxy.host(), kernel, &hashes)
            .env("RUST_LOG", "ociblk_registry=debug")
            .spawn()
            .expect("spawn ociblk-registry-fetch")
    };
    let children = [spawn(), spawn()];
    let mut logs = String::new();
    for child in children {
        let out = child.wait_with_output().expect("wait for fetcher");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "fetcher failed: {log}");
        logs.push_str(&log);
    }
    assert!(
        logs.contains("chunk stored by another fetcher while waiting"),
        "the processes never wanted the same chunk at once: {logs}"
    );

    let requests = proxy.blob_requests(kernel.digest.hex());
    let mut ranges: Vec<_> = requests.iter().filter_map(|r| r.range.clone()).collect();
    ranges.sort();
    let before = ranges.len();
    ranges.dedup();
    assert_eq!(
        before,
        ranges.len(),
        "a chunk was fetched twice: {requests:?}"
    );
    assert_eq!(
        ranges.len() as u64,
        kernel.chunks(),
        "every chunk fetched once: {requests:?}"
    );

    let image = f.open(&f.registry.host());
    f.assert_all_chunks_cached(&image, kernel);
}

#[test]
fn cached_image_opens_and_reads_with_the_registry_stopped_and_recovers_when_it_returns() {
    let mut f = Fixture::new();
    let host = f.registry.host();
    let kernel = f.sample.payload("kernel.efi");
    let missing = kernel.chunks() - 1;
    {
        let image = f.open(&host);
        for (_, blob) in &f.sample.payloads {
            for i in 0..blob.chunks() {
                if !(blob.digest == kernel.digest && i == missing) {
                    image.blobs.ensure_chunk(blob, i).expect("fill cache");
                }
            }
        }
    }
    f.registry.stop();

    let image = f.open(&host);
    assert!(image.offline, "opened without the registry, so offline");
    assert_eq!(image.manifest_digest, f.sample.manifest_digest);
    assert_eq!(image.config, f.sample.config);
    for (_, blob) in &f.sample.payloads {
        for i in 0..blob.chunks() {
            if !(blob.digest == kernel.digest && i == missing) {
                image
                    .blobs
                    .ensure_chunk(blob, i)
                    .expect("cached chunk offline");
                f.assert_cached_chunk(&image, blob, i);
            }
        }
    }
    // A chunk the cache lacks fails while the registry is away...
    let err = image
        .blobs
        .ensure_chunk(kernel, missing)
        .expect_err("registry down");
    assert!(err.is_unreachable(), "{err}");
    assert!(
        err.to_string().contains(&kernel.digest.to_string()),
        "{err}"
    );
    assert!(!image.blobs.chunk_present(kernel, missing).expect("map"));

    // ... and an image the cache does not have cannot start, and says so.
    let err = f
        .try_open(&host, "monogon/os:other", &Options::default())
        .expect_err("uncached tag offline");
    let msg = err.to_string();
    assert!(matches!(err, Error::Offline { .. }), "{msg}");
    assert!(
        msg.contains("unreachable") && msg.contains("monogon/os:other"),
        "{msg}"
    );

    // When the registry is back, the same image fetches the chunk.
    f.registry.restart();
    image
        .blobs
        .ensure_chunk(kernel, missing)
        .expect("registry back");
    f.assert_cached_chunk(&image, kernel, missing);
}

#[test]
fn too_many_requests_is_retried_after_the_time_the_registry_asks() {
    let f = Fixture::new();
    let proxy = f.proxy();
    let image = f.open(&proxy.host());
    proxy.set(|b| {
        b.too_many = 1;
        b.retry_after_secs = 1;
    });
    let system = f.sample.payload("system");
    image
        .blobs
        .ensure_chunk(system, 1)
        .expect("chunk after 429");
    f.assert_cached_chunk(&image, system, 1);
    let requests = proxy.blob_requests(system.digest.hex());
    let statuses: Vec<_> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![429, 206]);
    let waited = requests[1].at - requests[0].at;
    assert!(
        waited >= Duration::from_secs(1),
        "retried after {waited:?}, Retry-After said 1 s"
    );
}

#[test]
fn retry_after_beyond_the_chunk_timeout_fails_the_request_clearly() {
    let f = Fixture::new();
    f.assert_retry_after_fails_then_serves(
        |b| b.retry_after_secs = 60,
        |msg, system| {
            assert!(
                msg.contains("Retry-After 60s") && msg.contains(&system.digest.to_string()),
                "{msg}"
            );
        },
    );
}

#[test]
fn registry_ignoring_range_still_serves_chunks_and_keeps_those_before() {
    let f = Fixture::new();
    let proxy = f.proxy();
    let image = f.open(&proxy.host());
    proxy.set(|b| b.ignore_range = true);
    let kernel = f.sample.payload("kernel.efi");
    image
        .blobs
        .ensure_chunk(kernel, 3)
        .expect("chunk 3 from a whole-blob answer");
    for i in 0..=3 {
        assert!(
            image.blobs.chunk_present(kernel, i).expect("map"),
            "chunk {i} kept"
        );
        f.assert_cached_chunk(&image, kernel, i);
    }
    assert!(!image.blobs.chunk_present(kernel, 4).expect("map"));
    assert_eq!(
        image.blobs.fetch_stats().bytes,
        4 * kernel.chunk_size(),
        "read up to chunk 3 only"
    );
    let statuses: Vec<_> = proxy
        .blob_requests(kernel.digest.hex())
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![200]);
}

#[test]
fn redirect_to_storage_is_followed_with_the_range() {
    let f = Fixture::new();
    let proxy = f.proxy();
    let image = f.open(&proxy.host());
    proxy.set(|b| b.redirect_blobs = true);
    let kernel = f.sample.payload("kernel.efi");
    image
        .blobs
        .ensure_chunk(kernel, 7)
        .expect("chunk through redirect");
    f.assert_cached_chunk(&image, kernel, 7);
    let requests = proxy.blob_requests(kernel.digest.hex());
    let seen: Vec<_> = requests
        .iter()
        .map(|r| (r.path.starts_with("/storage/"), r.status, r.range.clone()))
        .collect();
    let range = Some("bytes=7340032-8388607".to_string());
    assert_eq!(seen, vec![(false, 307, range.clone()), (true, 206, range)]);
}

#[test]
fn slow_registry_times_out_the_chunk_and_a_later_request_recovers() {
    let f = Fixture::new();
    let proxy = f.proxy();
    let options = Options {
        chunk_timeout: Duration::from_secs(1),
        ..Options::default()
    };
    let image = f.open_with(&proxy.host(), &options);
    proxy.set(|b| b.blob_delay = Duration::from_secs(3));
    let system = f.sample.payload("system");
    let err = image
        .blobs
        .ensure_chunk(system, 0)
        .expect_err("slow registry");
    let msg = err.to_string();
    assert!(matches!(err, Error::Timeout { .. }), "{msg}");
    assert!(msg.contains(&system.digest.to_string()), "{msg}");
    assert!(!image.blobs.chunk_present(system, 0).expect("map"));
    proxy.set(|b| b.blob_delay = Duration::ZERO);
    image.blobs.ensure_chunk(system, 0).expect("recovered");
    f.assert_cached_chunk(&image, system, 0);
}

#[test]
fn gc_removes_least_recently_used_blobs_but_never_one_in_use() {
    let f = Fixture::new();
    let (cache, host) = (&f.cache, f.registry.host());
    let system = f.sample.payload("system");
    let kernel = f.sample.payload("kernel.efi");
    let fill = |blobs: &[&BlobSpec]| {
        let image = f.open(&host);
        for blob in blobs {
            image.blobs.ensure_chunk(blob, 0).expect("fill chunk");
        }
    };
    // system used first, kernel last: system is the least recently used.
    fill(&[system, kernel]);
    let total = cache.info().expect("info").blob_bytes();
    let report = cache.gc(total - 1).expect("gc");
    assert_eq!(report.removed, vec![system.digest.clone()]);
    assert!(report.in_use.is_empty());
    assert_eq!(report.remaining, total - report.freed);

    // Now kernel first, system last, and kernel held open by an image.
    fill(&[system]);
    let in_use = f.open(&host);
    in_use
        .blobs
        .ensure_chunk(kernel, 1)
        .expect("kernel chunk 1");
    let report = cache.gc(0).expect("gc");
    assert_eq!(report.removed, vec![system.digest.clone()]);
    assert_eq!(report.in_use, vec![kernel.digest.clone()]);
    assert!(!in_use.blobs.path(&system.digest).exists());
    f.assert_cached_chunk(&in_use, kernel, 1);

    drop(in_use);
    let report = cache.gc(0).expect("gc");
    assert_eq!(report.removed, vec![kernel.digest.clone()]);
    assert_eq!(report.remaining, 0);
    assert!(cache.info().expect("info").blobs.is_empty());

    // The cache fills again after gc.
    let image = f.open(&host);
    image.blobs.ensure_chunk(kernel, 1).expect("refill");
    f.assert_cached_chunk(&image, kernel, 1);
}

/// `ociblk:test-password`, bcrypt cost 4.
const HTPASSWD: &str = "ociblk:$2b$04$1zGbIXKr/YkKwu3FCABTyuFbfoL4aZ1T0FcV0uB7HcF5qzwvNVHuy\n";

#[test]
fn basic_auth_uses_the_credentials_of_the_auth_file() {
    let f = Fixture::pushed_to(
        Registry::start_with(Auth::Htpasswd(HTPASSWD)),
        Some("ociblk:test-password"),
    );
    let host = f.registry.host();
    let auth_file = f.dir.path().join("auth.json");
    let options = Options {
        auth_file: Some(auth_file.clone()),
        ..Options::default()
    };

    let err = f
        .try_open(&host, REPO_TAG, &options)
        .expect_err("no credentials");
    assert!(
        matches!(&err, Error::Auth { message, .. } if message.contains("none is stored")),
        "{err}"
    );

    let write_auth = |userpass: &str| {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(userpass);
        let json = format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, host);
        std::fs::write(&auth_file, json).expect("write auth file");
    };
    write_auth("ociblk:wrong");
    let err = f
        .try_open(&host, REPO_TAG, &options)
        .expect_err("wrong password");
    assert!(
        matches!(&err, Error::Auth { message, .. } if message.contains("stored credentials")),
        "{err}"
    );

    write_auth("ociblk:test-password");
    let image = f
        .try_open(&host, REPO_TAG, &options)
        .expect("open with credentials");
    assert_eq!(image.manifest_digest, f.sample.manifest_digest);
    let kernel = f.sample.payload("kernel.efi");
    image
        .blobs
        .ensure_chunk(kernel, 4)
        .expect("chunk with credentials");
    f.assert_cached_chunk(&image, kernel, 4);
}

#[test]
fn a_fetcher_killed_mid_fill_leaves_a_cache_the_next_one_completes() {
    let f = Fixture::new();
    let proxy = f.proxy();
    proxy.set(|b| b.blob_delay = Duration::from_millis(100));
    let kernel = f.sample.payload("kernel.efi");
    let hashes = write_chunk_hashes(f.dir.path(), kernel);
    let fetcher = || fetcher(&f, &proxy.host(), kernel, &hashes);
    let map_path = f.cache.dir().join(format!(
        "blobs/sha256/{}.{}.{}.chunks",
        kernel.digest.hex(),
        kernel.table_digest().hex(),
        kernel.chunk_size()
    ));
    #[allow(
        clippy::naive_bytecount,
        reason = "one byte per chunk: too few to need the bytecount crate"
    )]
    let present =
        || std::fs::read(&map_path).map_or(0, |m| m.iter().filter(|&&b| b == 1).count() as u64);

    let mut first = fetcher().spawn().expect("spawn fetcher");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while present() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first fetcher stored no chunks"
        );
        assert!(
            first.try_wait().expect("poll fetcher").is_none(),
            "the first fetcher ended early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    first.kill().expect("kill -9 the first fetcher");
    first.wait().expect("reap");
    assert!(
        present() < kernel.chunks(),
        "killed after the fill was complete"
    );

    let out = fetcher().output().expect("run second fetcher");
    assert!(
        out.status.success(),
        "second fetcher: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = f.open(&f.registry.host());
    f.assert_all_chunks_cached(&image, kernel);
}

#[test]
fn a_full_cache_file_system_fails_the_chunk_and_recovers_when_space_is_freed() {
    let f = Fixture::new();
    let small = Tmpfs::mount(&f.dir.path().join("small"), "4M");
    let cache = Cache::open(small.0.join("cache")).expect("open cache");
    let image = RegistryImage::open(
        &reference(&f.registry.host(), REPO_TAG),
        &cache,
        &Options::default(),
    )
    .expect("open into the tmpfs cache");
    let filler = small.0.join("filler");
    std::fs::write(&filler, vec![0x5a; (3 << 20) + (512 << 10)]).expect("fill the tmpfs");

    let kernel = f.sample.payload("kernel.efi");
    let err = image
        .blobs
        .ensure_chunk(kernel, 0)
        .expect_err("no space for a chunk");
    let msg = err.to_string();
    assert!(matches!(err, Error::Io { .. }), "{msg}");
    assert!(
        msg.contains(kernel.digest.hex()) && msg.contains("No space left"),
        "{msg}"
    );
    assert!(
        !image.blobs.chunk_present(kernel, 0).expect("map"),
        "a partly written chunk is marked present"
    );

    std::fs::remove_file(&filler).expect("free space");
    image
        .blobs
        .ensure_chunk(kernel, 0)
        .expect("chunk after space was freed");
    f.assert_cached_chunk(&image, kernel, 0);
    drop(image);
}

#[test]
fn bearer_token_from_the_challenge_realm_is_fetched_once_and_used() {
    let dir = tempfile::tempdir().expect("temp dir");
    let issuer = token::TokenIssuer::start(dir.path());
    let f = Fixture::pushed_to(Registry::start_with(Auth::Token(&issuer)), None);
    let pushed = issuer.requests().len();
    assert!(
        pushed > 0,
        "skopeo pushed without a token: the registry does not ask for one"
    );

    let image = f.open(&f.registry.host());
    assert_eq!(image.manifest_digest, f.sample.manifest_digest);
    let kernel = f.sample.payload("kernel.efi");
    image
        .blobs
        .ensure_chunk(kernel, 2)
        .expect("chunk with a token");
    image
        .blobs
        .ensure_chunk(kernel, 9)
        .expect("chunk with the same token");
    f.assert_cached_chunk(&image, kernel, 2);
    f.assert_cached_chunk(&image, kernel, 9);

    // One token for manifest, config and chunks, for the scope the challenge named.
    let ours = &issuer.requests()[pushed..];
    assert_eq!(ours.len(), 1, "token requests: {ours:?}");
    assert!(
        ours[0].contains("scope=repository%3Amonogon%2Fos%3Apull")
            && ours[0].contains(&format!("service={}", token::SERVICE)),
        "token request: {}",
        ours[0]
    );
}

#[test]
fn requests_in_flight_per_registry_are_bounded() {
    let f = Fixture::new();
    let proxy = f.proxy();
    let options = Options {
        max_in_flight: 2,
        ..Options::default()
    };
    let image = f.open_with(&proxy.host(), &options);
    // Slow answers keep each request in flight while the others start.
    proxy.set(|b| b.blob_delay = Duration::from_millis(200));
    let kernel = f.sample.payload("kernel.efi");
    let barrier = Barrier::new(6);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..6u64)
            .map(|i| {
                let (image, barrier) = (&image, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    image.blobs.ensure_chunk(kernel, i)
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread").expect("chunk");
        }
    });
    assert_eq!(proxy.blob_requests(kernel.digest.hex()).len(), 6);
    let most = proxy.max_concurrent_blob_requests();
    assert!(
        most <= 2,
        "{most} blob requests in flight at once, the bound is 2"
    );
    for i in 0..6 {
        f.assert_cached_chunk(&image, kernel, i);
    }
}

/// A child process, stopped with SIGSTOP by the test; continued and killed
/// (by its PID) when dropped, also when the test fails.
struct StoppedChild(std::process::Child);

impl StoppedChild {
    fn stop(child: std::process::Child) -> StoppedChild {
        let pid = child.id().cast_signed();
        let stopped = StoppedChild(child);
        // SAFETY: kill has no memory effects; the PID is our unreaped child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP");
        stopped
    }
}

impl Drop for StoppedChild {
    fn drop(&mut self) {
        let pid = self.0.id().cast_signed();
        // SAFETY: as above; the child is not reaped before `wait` below.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_stopped_fetcher_holding_a_chunk_is_taken_over_after_its_lease_lapses() {
    let f = Fixture::new();
    let proxy = f.proxy();
    let kernel = f.sample.payload("kernel.efi");
    let hashes = write_chunk_hashes(f.dir.path(), kernel);
    // The fetcher's request for chunk 5 is held in the proxy while we stop it.
    proxy.set(|b| b.blob_delay = Duration::from_secs(5));
    let child = fetcher(&f, &proxy.host(), kernel, &hashes)
        .arg("5")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn fetcher");
    let pid = child.id();
    let options = Options {
        chunk_timeout: Duration::from_secs(20),
        ..Options::default()
    };
    let image = f.open_with(&proxy.host(), &options);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // Holding the chunk is observable: the holder's PID and its lease.
    while image
        .blobs
        .chunk_holder(kernel, 5)
        .expect("lease")
        .map(|h| h.0)
        != Some(pid)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the fetcher never took chunk 5"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let stopped = StoppedChild::stop(child);
    proxy.set(|b| b.blob_delay = Duration::ZERO);

    let start = std::time::Instant::now();
    image
        .blobs
        .ensure_chunk(kernel, 5)
        .expect("chunk 5 taken over from the stopped fetcher");
    assert!(
        start.elapsed() < options.chunk_timeout,
        "took {:?}",
        start.elapsed()
    );
    f.assert_cached_chunk(&image, kernel, 5);
    drop(stopped);
}

#[test]
fn cache_directories_are_private_and_planted_symlinks_are_never_written_through() {
    use std::os::unix::fs::PermissionsExt as _;
    let f = Fixture::new();
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    // Created 0700, subdirectories too.
    for sub in ["", "blobs/sha256", "meta/sha256", "tags", "access/sha256"] {
        assert_eq!(mode(&f.cache.dir().join(sub)), 0o700, "{sub}");
    }
    // An existing one others may write: refused, and left as it is, unless allowed.
    let shared = f.dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let err = Cache::open(&shared).expect_err("0777 cache dir");
    let msg = err.to_string();
    assert!(
        msg.contains(&shared.display().to_string())
            && msg.contains("0777")
            && msg.contains("--allow-insecure-cache-dir"),
        "{msg}"
    );
    assert_eq!(mode(&shared), 0o777);
    let allow = ociblk_registry::cache::DirPolicy {
        allow_insecure: true,
    };
    Cache::open_with(&shared, allow).expect("allowed");
    // A subdirectory that is a symlink: refused even when allowed.
    let elsewhere = f.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    std::fs::remove_dir_all(shared.join("access")).expect("rm");
    std::os::unix::fs::symlink(&elsewhere, shared.join("access")).expect("symlink");
    let err = Cache::open_with(&shared, allow).expect_err("symlinked subdirectory");
    assert!(err.to_string().contains("symbolic link"), "{err}");

    // Symlinks planted where the blob's data and map files go.
    let image = f.open(&f.registry.host());
    let kernel = f.sample.payload("kernel.efi");
    let victim = f.dir.path().join("victim");
    std::fs::write(&victim, b"not the cache's").expect("victim");
    let victim_mode = mode(&victim);
    let data = image.blobs.path(&kernel.digest);
    std::os::unix::fs::symlink(&victim, &data).expect("plant");
    let err = image
        .blobs
        .ensure_chunk(kernel, 0)
        .expect_err("planted data");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    std::fs::remove_file(&data).expect("unplant");
    let map = f.cache.dir().join(format!(
        "blobs/sha256/{}.{}.{}.chunks",
        kernel.digest.hex(),
        kernel.table_digest().hex(),
        kernel.chunk_size()
    ));
    std::fs::remove_file(&map).ok();
    std::os::unix::fs::symlink(&victim, &map).expect("plant");
    let err = image
        .blobs
        .ensure_chunk(kernel, 0)
        .expect_err("planted map");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read(&victim).expect("victim"), b"not the cache's");
    assert_eq!(mode(&victim), victim_mode);
}

#[test]
fn a_blob_checked_whole_is_shared_read_only_with_an_image_that_disagrees_about_a_chunk() {
    let f = Fixture::new();
    let host = f.registry.host();
    let kernel = f.sample.payload("kernel.efi");
    let a = f.open(&host);
    for i in 0..kernel.chunks() {
        a.blobs.ensure_chunk(kernel, i).expect("chunk");
    }
    assert_eq!(
        a.blobs.check_whole(kernel).expect("check"),
        ociblk_registry::cache::Wholeness::Whole
    );
    // B claims the same digest with another hash for chunk 0, from another registry.
    let other = Registry::start();
    let altered = f
        .sample
        .with_chunk_changed(&f.dir.path().join("altered"), "kernel.efi", 0);
    other.push(&altered.dir, "other/os:v1");
    other.write_blob(&kernel.digest, 0, &altered.chunk);
    let b = RegistryImage::open(
        &reference(&other.host(), "other/os:v1"),
        &f.cache,
        &Options::default(),
    )
    .expect("open B");
    assert_ne!(b.blobs.path(&kernel.digest), a.blobs.path(&kernel.digest));
    // B finds every chunk present (the blob as checked whole), and may not
    // replace the one its hashes disagree with.
    assert!(b.blobs.chunk_present(&altered.blob, 0).expect("map"));
    let err = b
        .blobs
        .invalidate_chunk(&altered.blob, 0)
        .expect_err("the whole blob's chunk");
    assert!(
        err.to_string().contains("image's chunk hashes are wrong"),
        "{err}"
    );
    b.blobs.ensure_chunk(&altered.blob, 0).expect("present");
    f.assert_all_chunks_cached(&a, kernel);
}
