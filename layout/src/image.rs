//! Reading a Monogon OS image from an OCI image layout directory, or from
//! a manifest and config verified elsewhere (a registry).
//!
//! Only metadata is read: `oci-layout`, `index.json`, the manifest and the
//! config (small, verified by sha256 and size). Payload blobs are checked for
//! existence and size but never read; their chunk hashes are decoded here and
//! checked against the bytes when they are read.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use ociblk_digest::{ChunkHashes, Digest};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

// The OCI types are oci-spec's `MediaType`s; these are Monogon's own (and
// the generic payload types), `MediaType::Other` to oci-spec.
pub const ARTIFACT_TYPE_OS_IMAGE: &str = "application/vnd.monogon.os.image.v1";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.monogon.os.image.config.v1+json";
pub const MEDIA_TYPE_PAYLOAD: &str = "application/octet-stream";
pub const MEDIA_TYPE_PAYLOAD_ZSTD: &str = "application/zstd";
pub const FORMAT_VERSION: &str = "1";
const MAX_CHUNK_SIZE: u64 = 16 << 20;
/// Upper bound for the JSON documents; real ones are a few KiB.
const MAX_METADATA_BYTES: u64 = 16 << 20;

/// `product_info` of the image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductInfo {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub variant: String,
    #[serde(default)]
    pub commit_hash: String,
    #[serde(default)]
    pub commit_date: String,
    #[serde(default)]
    pub build_tree_dirty: bool,
    #[serde(default)]
    pub components: Vec<Component>,
}

impl ProductInfo {
    /// The CPU architecture: the first `-`-separated field of `variant`.
    pub fn architecture(&self) -> &str {
        self.variant.split('-').next().unwrap_or_default()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    pub id: String,
    pub version: String,
}

#[derive(Debug, Clone, Deserialize)]
struct PayloadInfo {
    name: String,
    size: i64,
    hash_chunk_size: i64,
    chunk_hashes_sha256: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Config {
    format_version: String,
    product_info: ProductInfo,
    payloads: Vec<PayloadInfo>,
}

/// A payload of the image: an uncompressed blob served in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Payload {
    pub name: String,
    pub size: u64,
    /// The blob's digest (in JSON its 64 hex digits, without `sha256:`).
    #[serde(serialize_with = "serialize_hex")]
    pub digest: Digest,
    /// [`MEDIA_TYPE_PAYLOAD`] or [`MEDIA_TYPE_PAYLOAD_ZSTD`].
    pub media_type: MediaType,
    /// `blobs/sha256/<hex>` inside the image directory (may be a
    /// symlink), or the file the resolver of [`OsImage::from_verified`] named.
    pub path: PathBuf,
    pub hash_chunk_size: u64,
    /// `chunk_hashes_sha256`, decoded.
    #[serde(skip)]
    pub chunk_hashes: Arc<ChunkHashes>,
}

/// A digest as its 64 hex digits, as `inspect --json` has always shown
/// payload digests.
pub(crate) fn serialize_hex<S: serde::Serializer>(
    digest: &Digest,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.serialize_str(digest.hex())
}

impl Payload {
    /// Whether the blob is uncompressed ([`MEDIA_TYPE_PAYLOAD`]): only
    /// such a blob can be served in place.
    pub fn is_uncompressed(&self) -> bool {
        self.media_type.as_ref() == MEDIA_TYPE_PAYLOAD
    }
}

/// A validated OS image.
#[derive(Debug, Clone)]
pub struct OsImage {
    /// The image layout directory, or for an image opened with
    /// [`OsImage::from_verified`] the name it was given (a registry
    /// reference pinned to its digest).
    pub dir: PathBuf,
    pub manifest_digest: Digest,
    pub product_info: ProductInfo,
    pub payloads: Vec<Payload>,
}

impl OsImage {
    /// Opens and validates the image in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let layout_path = dir.join("oci-layout");
        let layout: serde_json::Value = parse_json(&layout_path, &read_small(&layout_path)?)?;
        if layout.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
            return Err(Error::invalid(
                &layout_path,
                "imageLayoutVersion",
                "must be \"1.0.0\"",
            ));
        }

        let index_path = dir.join("index.json");
        let index_bytes = read_small(&index_path)?;
        check_digests(
            &index_path,
            &parse_json(&index_path, &index_bytes)?,
            &["manifests"],
        )?;
        let index: ImageIndex = parse_json(&index_path, &index_bytes)?;
        if let Some(mt) = index.media_type()
            && *mt != MediaType::ImageIndex
        {
            return Err(Error::invalid(
                &index_path,
                "mediaType",
                format!("is {mt}, expected {}", MediaType::ImageIndex),
            ));
        }
        let manifests = index.manifests();
        if manifests.len() != 1 {
            return Err(Error::invalid(
                &index_path,
                "manifests",
                format!(
                    "has {} entries, an OS image has exactly one",
                    manifests.len()
                ),
            ));
        }
        let desc = &manifests[0];
        if *desc.media_type() != MediaType::ImageManifest {
            return Err(Error::invalid(
                &index_path,
                "manifests[0].mediaType",
                format!(
                    "is {}, expected {}",
                    desc.media_type(),
                    MediaType::ImageManifest
                ),
            ));
        }
        let (manifest_digest, manifest_path) =
            blob_path(&dir, &index_path, "manifests[0].digest", desc)?;
        let manifest_bytes = read_verified(&manifest_path, &manifest_digest, desc.size())?;
        let store = BlobStore::Directory(&dir);
        from_manifest(
            dir.clone(),
            &manifest_path,
            manifest_digest,
            &manifest_bytes,
            &store,
        )
    }

    /// Builds the image from a manifest and config that were fetched and
    /// verified elsewhere (from a registry: the manifest against its digest,
    /// the config against the manifest's descriptor), with every check of
    /// [`OsImage::open`] from the manifest on. `origin` names the image in
    /// errors and in [`OsImage::dir`] (e.g. the registry reference with its
    /// digest); `blob_path` gives the file that holds (or will hold) a
    /// payload blob by its digest. Payload files are not looked at: the
    /// caller makes them exist with the right size before reading.
    pub fn from_verified(
        origin: impl Into<PathBuf>,
        manifest_digest: &Digest,
        manifest: &[u8],
        config: &[u8],
        blob_path: &dyn Fn(&Digest) -> PathBuf,
    ) -> Result<Self> {
        let origin = origin.into();
        let manifest_path = origin.join("manifest");
        let actual = Digest::of(manifest);
        if actual != *manifest_digest {
            return Err(Error::BlobDigest {
                path: manifest_path,
                expected: manifest_digest.hex().to_owned(),
                actual: actual.hex().to_owned(),
            });
        }
        let store = BlobStore::Resolved {
            origin: &origin,
            config,
            blob_path,
        };
        from_manifest(
            origin.clone(),
            &manifest_path,
            manifest_digest.clone(),
            manifest,
            &store,
        )
    }

    /// The payload called `name`, which must be uncompressed.
    pub fn payload(&self, name: &str) -> Result<&Payload> {
        let p = self
            .payloads
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::MissingPayload(name.to_owned()))?;
        if !p.is_uncompressed() {
            return Err(Error::CompressedPayload {
                name: p.name.clone(),
                media_type: p.media_type.to_string(),
            });
        }
        Ok(p)
    }
}

/// Where an image's config and payload blobs are.
enum BlobStore<'a> {
    /// `blobs/sha256/<hex>` of an OCI image layout directory.
    Directory(&'a Path),
    /// A config already in hand and payload files named by a resolver
    /// (the registry cache's sparse blobs).
    Resolved {
        origin: &'a Path,
        config: &'a [u8],
        blob_path: &'a dyn Fn(&Digest) -> PathBuf,
    },
}

impl BlobStore<'_> {
    /// The config blob's path (for errors) and bytes, checked against its
    /// descriptor's size and sha256.
    fn config(&self, referrer: &Path, desc: &Descriptor) -> Result<(PathBuf, Vec<u8>)> {
        match self {
            BlobStore::Directory(dir) => {
                let (digest, path) = blob_path(dir, referrer, "config.digest", desc)?;
                let bytes = read_verified(&path, &digest, desc.size())?;
                Ok((path, bytes))
            }
            BlobStore::Resolved { origin, config, .. } => {
                let digest = descriptor_digest(referrer, "config.digest", desc)?;
                let path = origin.join("blobs/sha256").join(digest.hex());
                check_verified(&path, &digest, desc.size(), config)?;
                Ok((path, config.to_vec()))
            }
        }
    }

    /// The path of a payload blob, and whether to check the file now.
    fn payload(
        &self,
        referrer: &Path,
        field: &str,
        desc: &Descriptor,
    ) -> Result<(Digest, PathBuf, bool)> {
        match self {
            BlobStore::Directory(dir) => {
                let (digest, path) = blob_path(dir, referrer, field, desc)?;
                Ok((digest, path, true))
            }
            BlobStore::Resolved { blob_path, .. } => {
                let digest = descriptor_digest(referrer, field, desc)?;
                let path = blob_path(&digest);
                Ok((digest, path, false))
            }
        }
    }
}

/// Everything from the verified manifest on, shared by both ways of
/// opening an image.
fn from_manifest(
    dir: PathBuf,
    manifest_path: &Path,
    manifest_digest: Digest,
    manifest_bytes: &[u8],
    store: &BlobStore<'_>,
) -> Result<OsImage> {
    let manifest_path = manifest_path.to_path_buf();
    check_digests(
        &manifest_path,
        &parse_json(&manifest_path, manifest_bytes)?,
        &["config", "layers"],
    )?;
    let manifest: ImageManifest = parse_json(&manifest_path, manifest_bytes)?;
    match manifest.artifact_type() {
        Some(at) if at.as_ref() == ARTIFACT_TYPE_OS_IMAGE => {}
        other => {
            return Err(Error::invalid(
                &manifest_path,
                "artifactType",
                format!(
                    "is {}, expected {ARTIFACT_TYPE_OS_IMAGE}",
                    other
                        .as_ref()
                        .map_or("missing".to_owned(), |m| m.to_string())
                ),
            ));
        }
    }
    let cdesc = manifest.config();
    if cdesc.media_type().as_ref() != MEDIA_TYPE_CONFIG {
        return Err(Error::invalid(
            &manifest_path,
            "config.mediaType",
            format!("is {}, expected {MEDIA_TYPE_CONFIG}", cdesc.media_type()),
        ));
    }
    let (config_path, config_bytes) = store.config(&manifest_path, cdesc)?;
    let config: Config = parse_json(&config_path, &config_bytes)?;
    if config.format_version != FORMAT_VERSION {
        return Err(Error::invalid(
            &config_path,
            "format_version",
            format!(
                "is {:?}, this version of ociblk reads \"{FORMAT_VERSION}\"",
                config.format_version
            ),
        ));
    }
    let layers = manifest.layers();
    if layers.len() != config.payloads.len() {
        return Err(Error::invalid(
            &manifest_path,
            "layers",
            format!(
                "has {} entries but the config lists {} payloads",
                layers.len(),
                config.payloads.len()
            ),
        ));
    }

    let mut payloads = Vec::with_capacity(layers.len());
    for (i, (info, layer)) in config.payloads.iter().zip(layers).enumerate() {
        payloads.push(check_payload(
            store,
            &config_path,
            &manifest_path,
            i,
            info,
            layer,
        )?);
    }
    for (i, p) in payloads.iter().enumerate() {
        if payloads[..i].iter().any(|q| q.name == p.name) {
            return Err(Error::invalid(
                &config_path,
                format!("payloads[{i}].name"),
                format!("{:?} appears twice", p.name),
            ));
        }
    }
    Ok(OsImage {
        dir,
        manifest_digest,
        product_info: config.product_info,
        payloads,
    })
}

fn check_payload(
    store: &BlobStore<'_>,
    config_path: &Path,
    manifest_path: &Path,
    i: usize,
    info: &PayloadInfo,
    layer: &Descriptor,
) -> Result<Payload> {
    let field = |f: &str| format!("payloads[{i}].{f}");
    let size = u64::try_from(info.size).map_err(|_| {
        Error::invalid(
            config_path,
            field("size"),
            format!("{} is negative", info.size),
        )
    })?;
    let chunk = u64::try_from(info.hash_chunk_size).unwrap_or(0);
    if chunk == 0 || chunk > MAX_CHUNK_SIZE {
        return Err(Error::invalid(
            config_path,
            field("hash_chunk_size"),
            format!("{} is outside 1..={MAX_CHUNK_SIZE}", info.hash_chunk_size),
        ));
    }
    let chunk_hashes = crate::chunk_hashes::decode(
        config_path,
        &field("chunk_hashes_sha256"),
        size,
        chunk,
        &info.chunk_hashes_sha256,
    )?;
    let media_type = layer.media_type().clone();
    let raw = media_type.as_ref() == MEDIA_TYPE_PAYLOAD;
    if !raw && media_type.as_ref() != MEDIA_TYPE_PAYLOAD_ZSTD {
        return Err(Error::invalid(
            manifest_path,
            format!("layers[{i}].mediaType"),
            format!("is {media_type}, expected {MEDIA_TYPE_PAYLOAD} or {MEDIA_TYPE_PAYLOAD_ZSTD}"),
        ));
    }
    let (digest, path, check_file) =
        store.payload(manifest_path, &format!("layers[{i}].digest"), layer)?;
    if raw && layer.size() != size {
        return Err(Error::invalid(
            manifest_path,
            format!("layers[{i}].size"),
            format!(
                "is {}, but payload {:?} has {size} bytes",
                layer.size(),
                info.name
            ),
        ));
    }
    if raw && check_file {
        // Follows the symlinks upstream writes; the target must be a regular file.
        let meta = fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if !meta.is_file() {
            return Err(Error::invalid(&path, "blob", "is not a regular file"));
        }
        if meta.len() != size {
            return Err(Error::BlobSize {
                path,
                digest: digest.hex().to_owned(),
                expected: size,
                actual: meta.len(),
            });
        }
    }
    Ok(Payload {
        name: info.name.clone(),
        size,
        digest,
        media_type,
        path,
        hash_chunk_size: chunk,
        chunk_hashes: Arc::new(chunk_hashes),
    })
}

/// A descriptor's digest and its `blobs/sha256/<hex>`, refusing anything
/// but sha256 with 64 lowercase hex digits, so a digest can never be a path.
fn blob_path(
    dir: &Path,
    referrer: &Path,
    field: &str,
    desc: &Descriptor,
) -> Result<(Digest, PathBuf)> {
    let digest = descriptor_digest(referrer, field, desc)?;
    let path = dir.join("blobs").join("sha256").join(digest.hex());
    Ok((digest, path))
}

/// The digest of a sha256 descriptor.
fn descriptor_digest(referrer: &Path, field: &str, desc: &Descriptor) -> Result<Digest> {
    let Some(hex) = desc.as_digest_sha256() else {
        return Err(Error::invalid(
            referrer,
            field,
            format!("{} is not a sha256 digest", desc.digest()),
        ));
    };
    check_hex(referrer, field, hex)
}

fn check_hex(referrer: &Path, field: &str, hex: &str) -> Result<Digest> {
    Digest::from_hex(hex).map_err(|e| Error::invalid(referrer, field, e.to_string()))
}

/// Checks digests in the raw JSON before the typed parse, so that a bad one
/// is reported with its field name rather than as a JSON error.
fn check_digests(path: &Path, doc: &serde_json::Value, fields: &[&str]) -> Result<()> {
    let check = |field: String, d: &serde_json::Value| -> Result<()> {
        let Some(s) = d.get("digest") else {
            return Ok(());
        };
        let s = s.as_str().unwrap_or_default();
        let field = format!("{field}.digest");
        let hex = Digest::strip_algorithm(s).ok_or_else(|| {
            Error::invalid(
                path,
                &field,
                format!("{s:?} is not a sha256 digest (sha256:<64 hex digits>)"),
            )
        })?;
        check_hex(path, &field, hex).map(drop)
    };
    for f in fields {
        match doc.get(*f) {
            Some(serde_json::Value::Array(items)) => {
                for (i, d) in items.iter().enumerate() {
                    check(format!("{f}[{i}]"), d)?;
                }
            }
            Some(d) => check((*f).to_owned(), d)?,
            None => {}
        }
    }
    Ok(())
}

fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn read_small(path: &Path) -> Result<Vec<u8>> {
    let f = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = Vec::new();
    f.take(MAX_METADATA_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > MAX_METADATA_BYTES {
        return Err(Error::invalid(
            path,
            "size",
            format!("larger than {MAX_METADATA_BYTES} bytes"),
        ));
    }
    Ok(buf)
}

/// Reads a small blob and checks it against its descriptor's size and sha256.
fn read_verified(path: &Path, digest: &Digest, size: u64) -> Result<Vec<u8>> {
    if size > MAX_METADATA_BYTES {
        return Err(Error::invalid(
            path,
            "size",
            format!("descriptor says {size} bytes, more than a manifest or config has"),
        ));
    }
    let bytes = read_small(path)?;
    check_verified(path, digest, size, &bytes)?;
    Ok(bytes)
}

/// Checks a small blob's bytes against its descriptor's size and sha256.
fn check_verified(path: &Path, digest: &Digest, size: u64, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 != size {
        return Err(Error::BlobSize {
            path: path.to_path_buf(),
            digest: digest.hex().to_owned(),
            expected: size,
            actual: bytes.len() as u64,
        });
    }
    let actual = Digest::of(bytes);
    if actual != *digest {
        return Err(Error::BlobDigest {
            path: path.to_path_buf(),
            expected: digest.hex().to_owned(),
            actual: actual.hex().to_owned(),
        });
    }
    Ok(())
}
