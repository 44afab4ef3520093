//! The set-up the registry tests share: the sample image pushed to a fresh
//! registry, an empty cache, and the image opened from it, so that each
//! test states only what it changes.

use std::time::Duration;

use ociblk_registry::{BlobSpec, Cache, Error, Options, Reference, RegistryImage};

use crate::proxy::{Behaviour, Proxy};
use crate::{Registry, SampleImage, read_range};

/// The repository and tag the sample image is pushed as.
pub const REPO_TAG: &str = "monogon/os:v1";

/// `host/rest` as a reference.
pub fn reference(host: &str, rest: &str) -> Reference {
    Reference::parse(&format!("{host}/{rest}")).expect("valid reference")
}

/// An empty cache in a temp dir of its own.
pub fn temp_cache() -> (tempfile::TempDir, Cache) {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = Cache::open(dir.path().join("cache")).expect("open cache");
    (dir, cache)
}

/// The sample image pushed as [`REPO_TAG`] to a registry, and an empty cache.
#[derive(Debug)]
pub struct Fixture {
    pub sample: SampleImage,
    pub registry: Registry,
    pub cache: Cache,
    /// Holds the cache; tests keep their own files here too.
    pub dir: tempfile::TempDir,
}

impl Fixture {
    /// The sample image in a fresh registry that asks for no credentials.
    // Not `Default`: this starts a registry process and pushes an image.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Fixture {
        Fixture::pushed_to(Registry::start(), None)
    }

    /// The sample image pushed to `registry`, with `user:password`
    /// credentials when given.
    pub fn pushed_to(registry: Registry, creds: Option<&str>) -> Fixture {
        let sample = SampleImage::load();
        registry.push_as(&sample.dir, REPO_TAG, creds);
        let (dir, cache) = temp_cache();
        Fixture {
            sample,
            registry,
            cache,
            dir,
        }
    }

    /// A counting proxy in front of the registry, passing everything on.
    pub fn proxy(&self) -> Proxy {
        Proxy::start(self.registry.addr, Behaviour::default())
    }

    /// Opens `host/rest` into the fixture's cache.
    pub fn try_open(
        &self,
        host: &str,
        rest: &str,
        options: &Options,
    ) -> Result<RegistryImage, Error> {
        RegistryImage::open(&reference(host, rest), &self.cache, options)
    }

    /// Opens [`REPO_TAG`] at `host` (the registry's or a proxy's) with
    /// `options`.
    pub fn open_with(&self, host: &str, options: &Options) -> RegistryImage {
        self.try_open(host, REPO_TAG, options)
            .unwrap_or_else(|e| panic!("open {host}/{REPO_TAG}: {e}"))
    }

    /// Opens [`REPO_TAG`] at `host` with the default options.
    pub fn open(&self, host: &str) -> RegistryImage {
        self.open_with(host, &Options::default())
    }

    /// Asserts that chunk `index` of `blob` in the image's cache equals the
    /// sample image's.
    pub fn assert_cached_chunk(&self, image: &RegistryImage, blob: &BlobSpec, index: u64) {
        let (start, len) = blob.chunk_range(index);
        let cached = read_range(&image.blobs.path(&blob.digest), start, len);
        assert!(
            cached == self.sample.chunk(blob, index),
            "cached chunk {index} of {} differs from the image's",
            blob.digest
        );
    }

    /// Asks for chunk 0 of the `system` payload through a proxy that
    /// answers the first blob request 429 with the `Retry-After` that
    /// `retry_after` sets, under a 2 s request timeout: the request must
    /// fail with that 429, whose text goes to `check` (with the blob), and
    /// a later request for the chunk must be served.
    pub fn assert_retry_after_fails_then_serves(
        &self,
        retry_after: impl FnOnce(&mut Behaviour),
        check: impl FnOnce(&str, &BlobSpec),
    ) {
        let proxy = self.proxy();
        let options = Options {
            chunk_timeout: Duration::from_secs(2),
            ..Options::default()
        };
        let image = self.open_with(&proxy.host(), &options);
        proxy.set(|b| {
            b.too_many = 1;
            retry_after(b);
        });
        let system = self.sample.payload("system");
        let err = image
            .blobs
            .ensure_chunk(system, 0)
            .expect_err("Retry-After beyond the request timeout");
        let msg = err.to_string();
        assert!(matches!(err, Error::Status { status: 429, .. }), "{msg}");
        check(&msg, system);
        // A later request tries again, and the registry serves it.
        image.blobs.ensure_chunk(system, 0).expect("later request");
        self.assert_cached_chunk(&image, system, 0);
    }

    /// Asserts that every chunk of `blob` is in the image's cache, marked
    /// present, and equal to the sample image's.
    pub fn assert_all_chunks_cached(&self, image: &RegistryImage, blob: &BlobSpec) {
        for i in 0..blob.chunks() {
            assert!(
                image.blobs.chunk_present(blob, i).expect("map"),
                "chunk {i} missing"
            );
            self.assert_cached_chunk(image, blob, i);
        }
    }
}
