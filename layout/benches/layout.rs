//! Computing a node disk's layout: the cost of launching a node with ociblk.
//! Payloads grow from 1 MiB to 1 GiB; the time must not.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::hint::black_box;
use std::path::Path;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ociblk_digest::Digest;
use ociblk_layout::{DiskParams, Layout, OsImage};
use serde_json::json;

const CHUNK: u64 = 1 << 20;

/// Writes an image whose payloads are sparse files of the given sizes. The
/// layout never reads payload data, so their content does not matter; chunk
/// hash lists have the right length.
fn write_image(dir: &Path, system: u64, kernel: u64) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut infos = Vec::new();
    let mut layers = Vec::new();
    for (i, (name, size)) in [("system", system), ("kernel.efi", kernel)]
        .into_iter()
        .enumerate()
    {
        let digest = Digest::from_hex(&format!("{:064x}", i + 1)).unwrap();
        fs::File::create(blobs.join(digest.hex()))
            .unwrap()
            .set_len(size)
            .unwrap();
        // Opening decodes every hash; the values are not compared here.
        let hashes: Vec<String> = (0..size.div_ceil(CHUNK)).map(|_| "A".repeat(43)).collect();
        infos.push(json!({"name": name, "size": size, "hash_chunk_size": CHUNK, "chunk_hashes_sha256": hashes}));
        layers.push(json!({"mediaType": "application/octet-stream", "digest": digest.to_string(), "size": size}));
    }
    let config = serde_json::to_vec(
        &json!({"format_version": "1", "product_info": {"variant": "x86_64"}, "payloads": infos}),
    )
    .unwrap();
    let cd = Digest::of(&config);
    fs::write(blobs.join(cd.hex()), &config).unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.monogon.os.image.v1",
        "config": {"mediaType": "application/vnd.monogon.os.image.config.v1+json", "digest": cd.to_string(), "size": config.len()},
        "layers": layers,
    }))
    .unwrap();
    let md = Digest::of(&manifest);
    fs::write(blobs.join(md.hex()), &manifest).unwrap();
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md.to_string(), "size": manifest.len()}]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

fn layout(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("node_disk");
    for system in [1u64 << 20, 64 << 20, 1 << 30] {
        let dir = tmp.path().join(format!("img-{system}"));
        write_image(&dir, system, 16 << 20);
        let image = OsImage::open(&dir).unwrap();
        let params = DiskParams::new("node0");
        let label = format!("{}MiB", system >> 20);
        group.bench_with_input(BenchmarkId::new("layout", &label), &image, |b, image| {
            b.iter(|| Layout::build(black_box(image), black_box(&params)).unwrap())
        });
        group.bench_with_input(
            BenchmarkId::new("open_image_and_layout", &label),
            &dir,
            |b, dir| {
                b.iter(|| Layout::build(&OsImage::open(black_box(dir)).unwrap(), &params).unwrap())
            },
        );
    }
    group.finish();
}

criterion_group!(benches, layout);
criterion_main!(benches);
