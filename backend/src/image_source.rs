//! Opening an OS image from its argument: an OCI image layout directory, or
//! a reference to an image in a registry whose payload chunks are fetched
//! into the host cache as they are first read.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ociblk_layout::OsImage;
use ociblk_registry::{Cache, Digest, ImageSource, Options, RegistryImage};

use crate::payload::ChunkFetcher;

/// Why an image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open OS image {arg}")]
    Registry {
        arg: String,
        #[source]
        source: ociblk_registry::Error,
    },
    #[error("cannot open the cache")]
    Cache(#[source] ociblk_registry::Error),
    #[error("cannot read OS image {}", origin.display())]
    Layout {
        origin: PathBuf,
        #[source]
        source: ociblk_layout::Error,
    },
    #[error("no cache directory: neither root, nor $XDG_CACHE_HOME or $HOME set; give --cache DIR")]
    NoCacheDir,
}

/// How registry images are reached and cached.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// The host cache; `None` for the default directory.
    pub cache: Option<PathBuf>,
    pub options: Options,
}

impl RegistrySettings {
    /// Opens (creating) the cache directory.
    pub fn open_cache(&self) -> Result<Cache, OpenError> {
        let dir = match &self.cache {
            Some(dir) => dir.clone(),
            None => Cache::default_dir().ok_or(OpenError::NoCacheDir)?,
        };
        Cache::open_with(dir, self.options.cache_dir).map_err(OpenError::Cache)
    }
}

/// An opened OS image and, for a registry image, what fetches its chunks.
#[derive(Debug)]
pub struct LoadedImage {
    pub image: OsImage,
    /// Names the image in logs: the directory, or the reference pinned to
    /// its manifest digest.
    pub origin: PathBuf,
    pub fetcher: Option<Arc<ChunkFetcher>>,
}

/// Opens the image `arg` names: a directory is an OCI image layout, anything
/// else a registry reference (see [`ImageSource::parse`]). A registry
/// image's tag is resolved once, here; its payload files in the cache are
/// created (sparse) and marked in use, so that the layout can be read
/// through them while chunks arrive.
pub fn open_image(arg: &Path, settings: &RegistrySettings) -> Result<LoadedImage, OpenError> {
    let text = arg.to_string_lossy();
    let registry_error = |source| OpenError::Registry {
        arg: text.to_string(),
        source,
    };
    let source = if arg.is_dir() {
        ImageSource::Layout(arg.to_path_buf())
    } else {
        ImageSource::parse(&text).map_err(registry_error)?
    };
    match source {
        ImageSource::Layout(dir) => {
            let image = OsImage::open(&dir).map_err(|source| OpenError::Layout {
                origin: dir.clone(),
                source,
            })?;
            Ok(LoadedImage {
                image,
                origin: dir,
                fetcher: None,
            })
        }
        ImageSource::Registry(reference) => {
            let cache = settings.open_cache()?;
            let registry = RegistryImage::open(&reference, &cache, &settings.options)
                .map_err(registry_error)?;
            let origin = PathBuf::from(registry.reference.to_string());
            tracing::info!(
                image = %reference,
                digest = %registry.manifest_digest,
                cache = %cache.dir().display(),
                offline = registry.offline,
                "registry image pinned to its manifest digest"
            );
            let blob_path = |digest: &Digest| registry.blobs.path(digest);
            let image = OsImage::from_verified(
                &origin,
                &registry.manifest_digest,
                &registry.manifest,
                &registry.config,
                &blob_path,
            )
            .map_err(|source| OpenError::Layout {
                origin: origin.clone(),
                source,
            })?;
            let fetcher = ChunkFetcher::new(registry, &image, cache, &settings.options)
                .map_err(registry_error)?;
            Ok(LoadedImage {
                image,
                origin,
                fetcher: Some(Arc::new(fetcher)),
            })
        }
    }
}
