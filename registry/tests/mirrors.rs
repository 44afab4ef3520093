//! Mirrors from registries.conf against real registries: Debian's
//! `docker-registry` as a pull-through cache (`proxy.remoteurl`) in front
//! of another, and a mirror holding altered bytes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ociblk_registry::mirrors::ConfSource;
use ociblk_registry::{Digest, Options, RegistryImage};
use ociblk_registry_test_support::fixture::{Fixture, REPO_TAG, reference, temp_cache};
use ociblk_registry_test_support::proxy::{Behaviour, Proxy};
use ociblk_registry_test_support::{Registry, SampleImage};

/// Writes a registries.conf in `dir` with `text` and returns options
/// reading it alone.
fn conf(dir: &Path, text: &str) -> Options {
    let file = dir.join("registries.conf");
    std::fs::write(&file, text).expect("write registries.conf");
    Options {
        registries_conf: ConfSource::File(file),
        ..Options::default()
    }
}

/// One `[[registry]]` at `prefix` with these mirrors (location, extra lines).
fn registry_with_mirrors(prefix: &str, mirrors: &[(&str, &str)]) -> String {
    let mut text = format!("[[registry]]\nprefix = \"{prefix}\"\n");
    for (location, extra) in mirrors {
        text.push_str(&format!(
            "[[registry.mirror]]\nlocation = \"{location}\"\n{extra}"
        ));
    }
    text
}

/// Fetches every chunk of every payload and checks them against the
/// sample image.
fn fetch_all(fx: &Fixture, image: &RegistryImage) {
    for (_, blob) in &fx.sample.payloads {
        for i in 0..blob.chunks() {
            image.blobs.ensure_chunk(blob, i).expect("chunk");
        }
        fx.assert_all_chunks_cached(image, blob);
    }
}

/// Waits (bounded) until `registry`'s storage holds each of `digests`: a
/// pull-through cache stores what it passed on in the background.
fn wait_stored(registry: &Registry, digests: &[Digest]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let missing = || -> Vec<PathBuf> {
        digests
            .iter()
            .map(|d| registry.blob_file(d))
            .filter(|p| !p.is_file())
            .collect()
    };
    while !missing().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the pull-through cache did not store {:?} within 30 s: {}",
            missing(),
            registry.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn blob_requests(proxy: &Proxy) -> usize {
    proxy
        .log()
        .iter()
        .filter(|l| l.path.contains("/blobs/"))
        .count()
}

#[test]
fn a_cold_start_through_a_pull_through_cache_fills_it_and_a_second_host_starts_with_the_origin_stopped()
 {
    let mut fx = Fixture::new();
    // Counts what the client asks the origin itself.
    let origin = fx.proxy();
    let mirror = Registry::start_proxy_of(&format!("http://{}", fx.registry.host()));
    let at_mirror = Proxy::start(mirror.addr, Behaviour::default());
    let options = conf(
        fx.dir.path(),
        &registry_with_mirrors(&origin.host(), &[(&at_mirror.host(), "")]),
    );

    let image = fx.open_with(&origin.host(), &options);
    assert_eq!(image.manifest_digest, fx.sample.manifest_digest);
    fetch_all(&fx, &image);
    assert!(
        origin.log().is_empty(),
        "the origin was asked directly: {:?}",
        origin.log()
    );
    assert!(
        blob_requests(&at_mirror) > 0,
        "nothing came through the mirror"
    );
    drop(image);

    let mut stored: Vec<Digest> = fx
        .sample
        .payloads
        .iter()
        .map(|(_, b)| b.digest.clone())
        .collect();
    stored.push(fx.sample.config_digest.clone());
    wait_stored(&mirror, &stored);

    // A second host: its own cache, the origin gone.
    fx.registry.stop();
    let (_dir, cache) = temp_cache();
    let second = RegistryImage::open(&reference(&origin.host(), REPO_TAG), &cache, &options)
        .expect("open through the mirror with the origin stopped");
    assert!(!second.offline);
    assert_eq!(second.manifest_digest, fx.sample.manifest_digest);
    fetch_all(&fx, &second);
    assert!(
        origin.log().is_empty(),
        "the origin was asked directly: {:?}",
        origin.log()
    );
}

/// A registry holding the sample image, as a mirror that will be made to lie.
fn liar(sample: &SampleImage) -> (Registry, Proxy) {
    let registry = Registry::start();
    registry.push(&sample.dir, REPO_TAG);
    let proxy = Proxy::start(registry.addr, Behaviour::default());
    (registry, proxy)
}

#[test]
fn a_mirror_serving_altered_bytes_is_caught_and_the_origin_is_used() {
    let fx = Fixture::new();
    let origin = fx.proxy();
    let kernel = fx.sample.payload("kernel.efi").clone();

    // A mirror whose copy of one chunk is altered: that chunk comes from
    // the origin, the others from the mirror.
    let (bad_chunk, at_bad_chunk) = liar(&fx.sample);
    let (start, _) = kernel.chunk_range(1);
    bad_chunk.corrupt_blob(&kernel.digest, start + 7);
    let dir = tempfile::tempdir().expect("temp dir");
    let options = conf(
        dir.path(),
        &registry_with_mirrors(&origin.host(), &[(&at_bad_chunk.host(), "")]),
    );
    let image = fx.open_with(&origin.host(), &options);
    image
        .blobs
        .ensure_chunk(&kernel, 0)
        .expect("chunk 0 from the mirror");
    assert_eq!(origin.blob_requests(kernel.digest.hex()).len(), 0);
    image
        .blobs
        .ensure_chunk(&kernel, 1)
        .expect("chunk 1 from the origin");
    fx.assert_cached_chunk(&image, &kernel, 0);
    fx.assert_cached_chunk(&image, &kernel, 1);
    assert_eq!(at_bad_chunk.blob_requests(kernel.digest.hex()).len(), 2);
    let from_origin = origin.blob_requests(kernel.digest.hex());
    assert_eq!(from_origin.len(), 1, "{from_origin:?}");
    let (s, l) = kernel.chunk_range(1);
    assert_eq!(
        from_origin[0].range.as_deref(),
        Some(format!("bytes={s}-{}", s + l - 1).as_str())
    );

    // A mirror whose config is altered: the origin's is used.
    let (bad_config, at_bad_config) = liar(&fx.sample);
    bad_config.corrupt_blob(&fx.sample.config_digest, 10);
    let options = conf(
        dir.path(),
        &registry_with_mirrors(&origin.host(), &[(&at_bad_config.host(), "")]),
    );
    let (_dir, cache) = temp_cache();
    let image = RegistryImage::open(&reference(&origin.host(), REPO_TAG), &cache, &options)
        .expect("open with the origin's config");
    assert_eq!(image.config, fx.sample.config);
    let config_path = format!("/blobs/{}", fx.sample.config_digest);
    assert!(origin.log().iter().any(|l| l.path.ends_with(&config_path)));
}

#[test]
fn a_digest_only_mirror_is_not_asked_for_the_tag_but_serves_the_content() {
    let fx = Fixture::new();
    let origin = fx.proxy();
    let (_mirror, at_mirror) = liar(&fx.sample);
    let options = conf(
        fx.dir.path(),
        &registry_with_mirrors(
            &origin.host(),
            &[(&at_mirror.host(), "pull-from-mirror = \"digest-only\"\n")],
        ),
    );
    let image = fx.open_with(&origin.host(), &options);
    let kernel = fx.sample.payload("kernel.efi").clone();
    image.blobs.ensure_chunk(&kernel, 0).expect("chunk");
    let tag_path = format!("/manifests/{}", REPO_TAG.split(':').nth(1).expect("tag"));
    assert!(at_mirror.log().iter().all(|l| !l.path.ends_with(&tag_path)));
    assert!(origin.log().iter().any(|l| l.path.ends_with(&tag_path)));
    assert_eq!(origin.blob_requests(kernel.digest.hex()).len(), 0);
    assert_eq!(at_mirror.blob_requests(kernel.digest.hex()).len(), 1);
}

#[test]
fn a_blocked_registry_is_refused_naming_the_file() {
    let fx = Fixture::new();
    let host = fx.registry.host();
    let options = conf(
        fx.dir.path(),
        &format!("[[registry]]\nprefix = \"{host}/monogon\"\nblocked = true\n"),
    );
    let err = fx
        .try_open(&host, REPO_TAG, &options)
        .expect_err("blocked")
        .to_string();
    let ConfSource::File(file) = &options.registries_conf else {
        unreachable!()
    };
    assert!(
        err.contains(&file.display().to_string()) && err.contains("blocked"),
        "{err}"
    );
}
