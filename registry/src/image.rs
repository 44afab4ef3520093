//! Opening an image in a registry: tag resolved to a digest once, manifest
//! and config fetched or taken from the cache, verified by digest and size.

use std::sync::Arc;
use std::time::Instant;

use oci_spec::image::ImageManifest;

use crate::cache::{BlobCache, Cache, METADATA_LIMIT};
use crate::client::RegistryClient;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fetch::BlobSource;
use crate::options::Options;
use crate::reference::Reference;

/// The media type asked for and accepted for image manifests.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// One layer (payload blob) of the manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

/// An image in a registry, pinned to its manifest digest.
#[derive(Debug)]
pub struct RegistryImage {
    /// The reference, with the digest it resolved to.
    pub reference: Reference,
    pub manifest_digest: Digest,
    /// The manifest's bytes, verified against `manifest_digest`.
    pub manifest: Vec<u8>,
    /// The config's bytes, verified against the manifest's config descriptor.
    pub config: Vec<u8>,
    pub config_media_type: String,
    pub layers: Vec<Layer>,
    /// Payload chunks of this image's repository.
    pub blobs: BlobCache,
    /// Whether the image was opened from the cache because the registry
    /// could not be reached.
    pub offline: bool,
}

impl RegistryImage {
    /// Opens `reference`, using the registry when it answers and the cache
    /// when it cannot be reached (an offline start needs the tag record or
    /// a digest reference, and the manifest and config in the cache).
    pub fn open(reference: &Reference, cache: &Cache, options: &Options) -> Result<Self> {
        let client = Arc::new(RegistryClient::new(reference, options)?);
        let repo = reference.repository.as_str();
        let mut offline = false;
        let offline_error = |source: Error| Error::Offline {
            reference: reference.to_string(),
            cache: cache.dir().to_path_buf(),
            source: Box::new(source),
        };

        let manifest_digest = match &reference.digest {
            Some(d) => d.clone(),
            None => match resolve_tag(&client, reference, cache) {
                Ok(d) => {
                    tracing::info!(%reference, digest = %d, "resolved tag");
                    d
                }
                Err(err) if err.is_unreachable() => match cache.tag(reference)? {
                    Some(d) => {
                        tracing::warn!(%reference, digest = %d, %err,
                            "registry unreachable; offline start with the cached tag");
                        offline = true;
                        d
                    }
                    None => return Err(offline_error(err)),
                },
                Err(err) => return Err(err),
            },
        };

        let manifest = match cache.metadata(&manifest_digest, None)? {
            Some(m) => m,
            None => {
                let path = format!("manifests/{manifest_digest}");
                let m = get_metadata(&client, repo, &path, Some(OCI_MANIFEST)).map_err(|e| {
                    if e.is_unreachable() {
                        offline_error(e)
                    } else {
                        e
                    }
                })?;
                manifest_digest.verify("manifest", &m, m.len() as u64)?;
                cache.store_metadata(&manifest_digest, &m)?;
                m
            }
        };
        let parsed = parse_manifest(&manifest, &manifest_digest)?;
        let config_desc = parsed.config();
        let config_digest =
            descriptor_digest(&manifest_digest, "config.digest", config_desc.digest())?;
        let config_size = config_desc.size();
        let config = match cache.metadata(&config_digest, Some(config_size))? {
            Some(c) => c,
            None => {
                if config_size > METADATA_LIMIT {
                    return Err(Error::Invalid {
                        what: format!("manifest {manifest_digest}"),
                        field: "config.size".into(),
                        message: format!("{config_size} bytes, more than {METADATA_LIMIT}"),
                    });
                }
                let c = get_metadata(&client, repo, &format!("blobs/{config_digest}"), None)
                    .map_err(|e| {
                        if e.is_unreachable() {
                            offline_error(e)
                        } else {
                            e
                        }
                    })?;
                config_digest.verify("config", &c, config_size)?;
                cache.store_metadata(&config_digest, &c)?;
                c
            }
        };
        let layers = parsed
            .layers()
            .iter()
            .enumerate()
            .map(|(i, l)| {
                Ok(Layer {
                    digest: descriptor_digest(
                        &manifest_digest,
                        &format!("layers[{i}].digest"),
                        l.digest(),
                    )?,
                    size: l.size(),
                    media_type: l.media_type().to_string(),
                })
            })
            .collect::<Result<_>>()?;
        let blobs = BlobCache::new(cache.clone(), BlobSource::new(client, repo.to_string()));
        Ok(RegistryImage {
            reference: reference.with_digest(manifest_digest.clone()),
            manifest_digest,
            manifest,
            config,
            config_media_type: config_desc.media_type().to_string(),
            layers,
            blobs,
            offline,
        })
    }
}

/// Asks the registry which manifest the tag names now, checks the answer
/// against the digest the registry states, and caches manifest and tag.
fn resolve_tag(client: &RegistryClient, reference: &Reference, cache: &Cache) -> Result<Digest> {
    let path = format!("manifests/{}", reference.tag_or_default());
    let deadline = Instant::now() + client.timeout();
    let fetched = client.get(
        &reference.repository,
        &path,
        &[("Accept", OCI_MANIFEST)],
        deadline,
    )?;
    let stated = fetched
        .response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (url, bytes) = read_metadata(fetched, Some(OCI_MANIFEST))?;
    let digest = Digest::of(&bytes);
    if let Some(stated) = stated
        && stated != digest.to_string()
    {
        return Err(Error::DigestMismatch {
            what: "manifest (Docker-Content-Digest)",
            expected: stated,
            actual: digest.to_string(),
        });
    }
    tracing::debug!(%url, %digest, "manifest");
    cache.store_metadata(&digest, &bytes)?;
    cache.store_tag(reference, &digest)?;
    Ok(digest)
}

fn get_metadata(
    client: &RegistryClient,
    repo: &str,
    path: &str,
    accept: Option<&str>,
) -> Result<Vec<u8>> {
    let deadline = Instant::now() + client.timeout();
    let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
    let fetched = client.get(repo, path, &headers, deadline)?;
    Ok(read_metadata(fetched, accept)?.1)
}

/// Reads a 200 answer's body, at most [`METADATA_LIMIT`] bytes, checking
/// the content type when one was asked for.
fn read_metadata(
    fetched: crate::client::Fetched,
    accept: Option<&str>,
) -> Result<(String, Vec<u8>)> {
    let url = fetched.url;
    let mut response = fetched.response;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(Error::Status {
            url,
            status,
            detail: if status == 404 {
                "not found".into()
            } else {
                String::new()
            },
        });
    }
    if let Some(accept) = accept {
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type.starts_with(accept) {
            return Err(Error::Protocol {
                url,
                message: format!(
                    "answered a manifest of type {content_type:?}, not {accept:?} \
                     (an image index? reference the platform's manifest by digest)"
                ),
            });
        }
    }
    let bytes = response
        .body_mut()
        .with_config()
        .limit(METADATA_LIMIT)
        .read_to_vec()
        .map_err(|e| Error::Protocol {
            url: url.clone(),
            message: format!("reading the body: {e}"),
        })?;
    Ok((url, bytes))
}

fn parse_manifest(bytes: &[u8], digest: &Digest) -> Result<ImageManifest> {
    let manifest: ImageManifest = serde_json::from_slice(bytes).map_err(|e| Error::Invalid {
        what: format!("manifest {digest}"),
        field: "(document)".into(),
        message: e.to_string(),
    })?;
    if let Some(mt) = manifest.media_type()
        && mt.to_string() != OCI_MANIFEST
    {
        return Err(Error::Invalid {
            what: format!("manifest {digest}"),
            field: "mediaType".into(),
            message: format!("{mt}, not {OCI_MANIFEST}"),
        });
    }
    Ok(manifest)
}

fn descriptor_digest(
    manifest: &Digest,
    field: &str,
    d: &oci_spec::image::Digest,
) -> Result<Digest> {
    d.to_string().parse().map_err(|_| Error::Invalid {
        what: format!("manifest {manifest}"),
        field: field.to_string(),
        message: format!("{d} is not a sha256 digest"),
    })
}
