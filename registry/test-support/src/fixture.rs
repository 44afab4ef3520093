//! The set-up the registry tests share: the sample image pushed to a fresh
//! registry, an empty cache, and the image opened from it, so that each
//! test states only what it changes.

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
