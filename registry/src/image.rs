//! Opening an image in a registry: tag resolved to a digest once, manifest
//! and config fetched or taken from the cache, verified by digest and size.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use oci_spec::image::ImageManifest;

use crate::cache::{BlobCache, Cache, METADATA_LIMIT};
use crate::client::RegistryClient;
use crate::digest::{ChunkHashes, Digest, Verify as _};
use crate::error::{Error, Result};
use crate::fetch::BlobSource;
use crate::options::Options;
use crate::reference::Reference;
use crate::sources::Sources;

/// The media type asked for and accepted for image manifests.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A descriptor of the manifest: its config or one layer (payload blob).
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
    /// Opens `reference`, using its mirrors (registries.conf) and registry
    /// when they answer and the cache when they cannot be reached (an
    /// offline start needs the tag record or a digest reference, and the
    /// manifest and config in the cache).
    pub fn open(reference: &Reference, cache: &Cache, options: &Options) -> Result<Self> {
        let sources = Arc::new(Sources::open(reference, options)?);
        let mut offline = false;
        let offline_error = |source: Error| Error::Offline {
            reference: reference.to_string(),
            cache: cache.dir().to_path_buf(),
            source: Box::new(source),
        };

        let manifest_digest = match &reference.digest {
            Some(d) => d.clone(),
            None => match sources.try_each(true, "the tag", |_, s| {
                resolve_tag(&s.client, &s.reference, reference, cache)
            }) {
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
            None => fetch_metadata(
                &sources,
                cache,
                Metadata::Manifest,
                &manifest_digest,
                None,
                &offline_error,
            )?,
        };
        let parsed = Manifest::parse(&manifest, &manifest_digest)?;
        let config_digest = parsed.config.digest.clone();
        let config_size = parsed.config.size;
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
                fetch_metadata(
                    &sources,
                    cache,
                    Metadata::Config,
                    &config_digest,
                    Some(config_size),
                    &offline_error,
                )?
            }
        };
        let tables = chunk_tables(&manifest_digest, &parsed, &config)?;
        let blobs = BlobCache::new(cache.clone(), BlobSource::new(sources), tables);
        Ok(RegistryImage {
            reference: reference.with_digest(manifest_digest.clone()),
            manifest_digest,
            manifest,
            config,
            config_media_type: parsed.config.media_type,
            layers: parsed.layers,
            blobs,
            offline,
        })
    }
}

/// Asks `client` which manifest the tag of `at` (the image's reference
/// there) names now, checks the answer against the digest it states, and
/// caches manifest and tag (recorded for `reference`, as the user wrote it).
fn resolve_tag(
    client: &RegistryClient,
    at: &Reference,
    reference: &Reference,
    cache: &Cache,
) -> Result<Digest> {
    let path = format!("manifests/{}", at.tag_or_default());
    let deadline = Instant::now() + client.timeout();
    let fetched = client.get(&at.repository, &path, &[("Accept", OCI_MANIFEST)], deadline)?;
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
    keep(cache.store_metadata(&digest, &bytes), "manifest");
    keep(cache.store_tag(reference, &digest), "tag record");
    Ok(digest)
}

/// An image's metadata: fetched whole, named by its digest.
#[derive(Clone, Copy, Debug)]
enum Metadata {
    Manifest,
    Config,
}

impl Metadata {
    /// What it is called in messages.
    fn name(self) -> &'static str {
        match self {
            Metadata::Manifest => "manifest",
            Metadata::Config => "config",
        }
    }

    /// Its path under the repository, when its digest is `digest`.
    fn path(self, digest: &Digest) -> String {
        match self {
            Metadata::Manifest => format!("manifests/{digest}"),
            Metadata::Config => format!("blobs/{digest}"),
        }
    }

    /// The media type asked for and accepted, if any.
    fn accept(self) -> Option<&'static str> {
        match self {
            Metadata::Manifest => Some(OCI_MANIFEST),
            Metadata::Config => None,
        }
    }
}

/// Fetches the `kind` of metadata named `digest` (of `size` bytes, when the
/// manifest states it) from the first of `sources` that serves it verified,
/// and keeps it in `cache`. When no source can be reached, the error is
/// `offline_error`'s: the image cannot be opened from the cache either.
fn fetch_metadata(
    sources: &Sources,
    cache: &Cache,
    kind: Metadata,
    digest: &Digest,
    size: Option<u64>,
    offline_error: &dyn Fn(Error) -> Error,
) -> Result<Vec<u8>> {
    let path = kind.path(digest);
    let bytes = sources
        .try_each(false, &format!("the {}", kind.name()), |_, s| {
            let bytes = get_metadata(&s.client, s.repository(), &path, kind.accept())?;
            digest.verify(kind.name(), &bytes, size.unwrap_or(bytes.len() as u64))?;
            Ok(bytes)
        })
        .map_err(|e| {
            if e.is_unreachable() {
                offline_error(e)
            } else {
                e
            }
        })?;
    keep(cache.store_metadata(digest, &bytes), kind.name());
    Ok(bytes)
}

/// A failure to keep verified metadata in the cache costs only a warning:
/// the image is opened from the bytes in hand (a full cache file system
/// must not stop a start); the next start fetches them again.
fn keep(stored: Result<()>, what: &str) {
    if let Err(e) = stored {
        tracing::warn!("cannot keep the {what} in the cache: {e}");
    }
}

/// The digest of each payload blob's chunk-hash table (see
/// [`ChunkHashes::table_digest`]) as the config lists it
/// (`payloads[i]` describes `layers[i]`), which keys the blob's bytes in
/// the cache. Payloads the config does not describe well are left out: the
/// layout refuses such an image with a better message. A blob listed twice
/// with different chunk hashes is refused: its bytes could not be keyed.
pub fn chunk_tables(
    manifest_digest: &Digest,
    manifest: &Manifest,
    config: &[u8],
) -> Result<HashMap<Digest, Digest>> {
    let mut tables: HashMap<Digest, (usize, Digest)> = HashMap::new();
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(config) else {
        return Ok(HashMap::new());
    };
    let Some(payloads) = value.get("payloads").and_then(|p| p.as_array()) else {
        return Ok(HashMap::new());
    };
    for (i, (layer, payload)) in manifest.layers.iter().zip(payloads).enumerate() {
        let size = payload.get("size").and_then(|v| v.as_u64());
        let chunk_size = payload.get("hash_chunk_size").and_then(|v| v.as_u64());
        let hashes = payload
            .get("chunk_hashes_sha256")
            .and_then(|v| v.as_array())
            .and_then(|hashes| {
                hashes
                    .iter()
                    .map(|h| h.as_str())
                    .collect::<Option<Vec<_>>>()
            });
        let (Some(size), Some(chunk_size), Some(hashes)) = (size, chunk_size, hashes) else {
            continue;
        };
        let Ok(table) = ChunkHashes::from_base64(size, chunk_size, &hashes) else {
            continue;
        };
        let table = table.table_digest();
        match tables.get(&layer.digest) {
            Some((j, other)) if *other != table => {
                return Err(Error::Invalid {
                    what: format!("manifest {manifest_digest}"),
                    field: format!("layers[{i}].digest"),
                    message: format!(
                        "blob {} is also layers[{j}], with other chunk hashes in the config",
                        layer.digest
                    ),
                });
            }
            Some(_) => {}
            None => {
                tables.insert(layer.digest.clone(), (i, table));
            }
        }
    }
    Ok(tables.into_iter().map(|(d, (_, t))| (d, t)).collect())
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

/// What ociblk reads from an image manifest: the config and layer
/// descriptors, with sha256 digests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub config: Layer,
    pub layers: Vec<Layer>,
}

impl Manifest {
    /// Parses the manifest `bytes` whose digest is `digest`; errors name
    /// the manifest by digest and the field at fault.
    pub fn parse(bytes: &[u8], digest: &Digest) -> Result<Self> {
        let invalid = |field: &str, message: String| Error::Invalid {
            what: format!("manifest {digest}"),
            field: field.to_string(),
            message,
        };
        // The whole document is read as JSON first: a typed parse skips
        // unknown fields without checking them, and would accept a manifest
        // that is not JSON (invalid UTF-8, lone surrogates) as long as the
        // fields it knows are fine.
        let manifest: ImageManifest = serde_json::from_slice::<serde_json::Value>(bytes)
            .and_then(serde_json::from_value)
            .map_err(|e| invalid("(document)", e.to_string()))?;
        if manifest.schema_version() != 2 {
            return Err(invalid(
                "schemaVersion",
                format!("{}, not 2", manifest.schema_version()),
            ));
        }
        if let Some(mt) = manifest.media_type()
            && mt.to_string() != OCI_MANIFEST
        {
            return Err(invalid("mediaType", format!("{mt}, not {OCI_MANIFEST}")));
        }
        let descriptor = |field: String, d: &oci_spec::image::Descriptor| {
            let digest = d.digest().to_string().parse().map_err(|_| {
                invalid(
                    &format!("{field}.digest"),
                    format!("{} is not a sha256 digest", d.digest()),
                )
            })?;
            Ok(Layer {
                digest,
                size: d.size(),
                media_type: d.media_type().to_string(),
            })
        };
        Ok(Manifest {
            config: descriptor("config".into(), manifest.config())?,
            layers: manifest
                .layers()
                .iter()
                .enumerate()
                .map(|(i, l)| descriptor(format!("layers[{i}]"), l))
                .collect::<Result<_>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(schema_version: u32, media_type: &str, layer_digest: &str) -> Vec<u8> {
        let config = Digest::of(b"config");
        format!(
            r#"{{"schemaVersion":{schema_version},"mediaType":"{media_type}",
            "config":{{"mediaType":"application/vnd.monogon.os.image.config.v1+json","digest":"{config}","size":6}},
            "layers":[{{"mediaType":"application/octet-stream","digest":"{layer_digest}","size":64}}]}}"#
        )
        .into_bytes()
    }

    #[test]
    fn parses_descriptors() {
        let layer = Digest::of(b"kernel");
        let bytes = manifest(2, OCI_MANIFEST, &layer.to_string());
        let m = Manifest::parse(&bytes, &Digest::of(&bytes)).expect("manifest");
        assert_eq!(m.config.digest, Digest::of(b"config"));
        assert_eq!(m.config.size, 6);
        assert_eq!(
            m.layers,
            [Layer {
                digest: layer,
                size: 64,
                media_type: "application/octet-stream".into()
            }]
        );
    }

    #[test]
    fn refuses_other_schema_versions_naming_manifest_and_field() {
        let layer = Digest::of(b"kernel").to_string();
        for (bytes, field) in [
            (
                manifest(1, OCI_MANIFEST, &layer),
                "field schemaVersion: 1, not 2",
            ),
            (
                manifest(3, OCI_MANIFEST, &layer),
                "field schemaVersion: 3, not 2",
            ),
            (
                manifest(2, "application/vnd.oci.image.index.v1+json", &layer),
                "field mediaType",
            ),
            (
                manifest(2, OCI_MANIFEST, &format!("sha512:{}", "0".repeat(128))),
                "field layers[0].digest",
            ),
        ] {
            let digest = Digest::of(&bytes);
            let err = Manifest::parse(&bytes, &digest)
                .expect_err(field)
                .to_string();
            assert!(
                err.contains(&format!("manifest {digest}: {field}")),
                "{err}"
            );
        }
    }

    #[test]
    fn refuses_a_document_that_is_not_json_even_in_unknown_fields() {
        let layer = Digest::of(b"kernel").to_string();
        let good = manifest(2, OCI_MANIFEST, &layer);
        // An unknown field whose value is not valid JSON text: invalid
        // UTF-8, and a lone surrogate escape (found by fuzzing).
        for junk in [&b"\"x\":\"\xff\xff\","[..], &b"\"x\":\"\\udc00\","[..]] {
            let mut bytes = b"{".to_vec();
            bytes.extend_from_slice(junk);
            bytes.extend_from_slice(&good[1..]);
            let digest = Digest::of(&bytes);
            let err = Manifest::parse(&bytes, &digest)
                .expect_err("not JSON")
                .to_string();
            assert!(
                err.contains(&format!("manifest {digest}: field (document)")),
                "{err}"
            );
        }
        Manifest::parse(&good, &Digest::of(&good)).expect("the same manifest without junk");
    }
}
