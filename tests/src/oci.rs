//! Writing Monogon OS images (OCI image layouts) for tests, including
//! deliberately broken ones.
//!
//! The format follows Monogon's image builder: payload blobs are relative
//! symlinks into the layout directory by default, chunk hashes are base64
//! (no padding) sha256 of 1 MiB chunks unless a test picks another size.

pub use ociblk_client::rng::pseudo_random;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const CHUNK_SIZE: u64 = 1 << 20;

/// A payload to put into an image.
#[derive(Debug, Clone)]
pub struct PayloadSpec {
    pub name: String,
    pub data: Vec<u8>,
    pub media_type: String,
}

/// Builds an OS image directory.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    pub product_info: Value,
    pub payloads: Vec<PayloadSpec>,
    /// Store payload blobs as symlinks into `payloads/` (upstream's way).
    pub symlink_blobs: bool,
    /// `hash_chunk_size` of every payload.
    pub chunk_size: u64,
}

/// The files of a written image, for tests that break them on purpose.
#[derive(Debug, Clone)]
pub struct WrittenImage {
    pub dir: PathBuf,
    pub manifest_digest: String,
    pub config_digest: String,
    /// (name, hex digest) per payload, in order.
    pub payload_digests: Vec<(String, String)>,
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

impl ImageBuilder {
    /// An x86_64 image with a `system` and a `kernel.efi` payload of the
    /// given sizes (pseudo-random content).
    /// An image (1 MiB system, 1000-byte kernel) whose `system` payload
    /// claims zstd compression, which ociblk does not serve.
    pub fn with_compressed_system() -> Self {
        let mut b = ImageBuilder::with_sizes(1 << 20, 1000);
        b.payloads[0].media_type = "application/zstd".into();
        b
    }

    pub fn with_sizes(system: usize, kernel: usize) -> Self {
        ImageBuilder {
            product_info: json!({
                "id": "ociblk-test", "name": "ociblk test OS", "version": "0.0.1",
                "variant": "x86_64", "commit_hash": "0000000000000000000000000000000000000000",
                "commit_date": "2026-01-01T00:00:00Z", "build_tree_dirty": false,
                "components": [{"id": "linux", "version": "6.1.0"}],
            }),
            payloads: vec![
                PayloadSpec::plain("system", pseudo_random(system, 1)),
                PayloadSpec::plain("kernel.efi", pseudo_random(kernel, 2)),
            ],
            symlink_blobs: true,
            chunk_size: CHUNK_SIZE,
        }
    }

    /// Writes the image into `dir` (which must not exist or be empty).
    /// Writes the image into a fresh temp directory, kept while the guard
    /// lives.
    pub fn write_temp(&self) -> (tempfile::TempDir, WrittenImage) {
        let dir = tempfile::tempdir().expect("temp dir");
        let img = self.write(dir.path()).expect("write the image");
        (dir, img)
    }

    pub fn write(&self, dir: &Path) -> io::Result<WrittenImage> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs)?;
        fs::create_dir_all(dir.join("payloads"))?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;

        let mut infos = Vec::new();
        let mut layers = Vec::new();
        let mut payload_digests = Vec::new();
        for p in &self.payloads {
            let digest = sha256_hex(&p.data);
            if self.symlink_blobs {
                fs::write(dir.join("payloads").join(&p.name), &p.data)?;
                let link = blobs.join(&digest);
                if !link.exists() {
                    symlink(Path::new("../../payloads").join(&p.name), link)?;
                }
            } else {
                fs::write(blobs.join(&digest), &p.data)?;
            }
            let hashes: Vec<String> = p
                .data
                .chunks(self.chunk_size as usize)
                .map(|c| base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(c)))
                .collect();
            infos.push(json!({
                "name": p.name, "size": p.data.len(), "hash_chunk_size": self.chunk_size,
                "chunk_hashes_sha256": hashes,
            }));
            layers.push(json!({"mediaType": p.media_type, "digest": format!("sha256:{digest}"), "size": p.data.len()}));
            payload_digests.push((p.name.clone(), digest));
        }
        let config =
            json!({"format_version": "1", "product_info": self.product_info, "payloads": infos});
        let mut img = WrittenImage {
            dir: dir.to_path_buf(),
            manifest_digest: String::new(),
            config_digest: String::new(),
            payload_digests,
        };
        img.config_digest = write_blob(dir, &config)?;
        let config_size = blob_size(dir, &img.config_digest)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.monogon.os.image.v1",
            "config": {"mediaType": "application/vnd.monogon.os.image.config.v1+json",
                       "digest": format!("sha256:{}", img.config_digest), "size": config_size},
            "layers": layers,
        });
        img.manifest_digest = write_blob(dir, &manifest)?;
        img.write_index_for_manifest()?;
        Ok(img)
    }
}

impl PayloadSpec {
    pub fn plain(name: &str, data: Vec<u8>) -> Self {
        PayloadSpec {
            name: name.into(),
            data,
            media_type: "application/octet-stream".into(),
        }
    }
}

fn write_blob(dir: &Path, v: &Value) -> io::Result<String> {
    let bytes = serde_json::to_vec(v).map_err(io::Error::other)?;
    let digest = sha256_hex(&bytes);
    fs::write(dir.join("blobs/sha256").join(&digest), bytes)?;
    Ok(digest)
}

fn blob_size(dir: &Path, digest: &str) -> io::Result<u64> {
    Ok(fs::metadata(dir.join("blobs/sha256").join(digest))?.len())
}

fn read_json(path: &Path) -> io::Result<Value> {
    serde_json::from_slice(&fs::read(path)?).map_err(io::Error::other)
}

impl WrittenImage {
    pub fn blob(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest)
    }

    pub fn payload_blob(&self, name: &str) -> PathBuf {
        let (_, d) = self
            .payload_digests
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no payload {name}"));
        self.blob(d)
    }

    pub fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    pub fn write_index_for_manifest(&self) -> io::Result<()> {
        let size = blob_size(&self.dir, &self.manifest_digest)?;
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": "application/vnd.monogon.os.image.config.v1+json",
                "digest": format!("sha256:{}", self.manifest_digest), "size": size,
            }],
        });
        fs::write(
            self.index_path(),
            serde_json::to_vec(&index).map_err(io::Error::other)?,
        )
    }

    /// Rewrites `index.json` through `f`.
    pub fn edit_index(&self, f: impl FnOnce(&mut Value)) -> io::Result<()> {
        let mut v = read_json(&self.index_path())?;
        f(&mut v);
        fs::write(
            self.index_path(),
            serde_json::to_vec(&v).map_err(io::Error::other)?,
        )
    }

    /// Rewrites the manifest through `f` and re-links the index to it, so
    /// that the edit is the only thing wrong with the image.
    pub fn edit_manifest(&mut self, f: impl FnOnce(&mut Value)) -> io::Result<()> {
        let mut v = read_json(&self.blob(&self.manifest_digest))?;
        f(&mut v);
        self.manifest_digest = write_blob(&self.dir, &v)?;
        self.write_index_for_manifest()
    }

    /// Rewrites the config through `f` and re-links manifest and index.
    pub fn edit_config(&mut self, f: impl FnOnce(&mut Value)) -> io::Result<()> {
        let mut v = read_json(&self.blob(&self.config_digest))?;
        f(&mut v);
        let digest = write_blob(&self.dir, &v)?;
        let size = blob_size(&self.dir, &digest)?;
        self.config_digest = digest.clone();
        self.edit_manifest(|m| {
            m["config"]["digest"] = json!(format!("sha256:{digest}"));
            m["config"]["size"] = json!(size);
        })
    }
}
