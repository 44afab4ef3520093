//! `ociblk export` output judged by outside tools: sgdisk, fsck.fat, mtools,
//! and the `gpt` and `fatfs` crates, for several input sets.

#![allow(clippy::unwrap_used)]

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use ociblk_layout::{DiskParams, DiskReader, Layout, OsImage};
use ociblk_tests::node::PINNED_IDS;
use ociblk_tests::oci::{ImageBuilder, pseudo_random, sha256_hex};
use ociblk_tests::support::{ociblk_bin, require_tool, run_ok, sample_image};
use serde_json::Value;

struct Case {
    image: PathBuf,
    /// Extra arguments for `ociblk inspect`/`export`.
    args: Vec<String>,
    /// Files expected on the ESP: (path, content source file).
    esp_files: Vec<(&'static str, PathBuf)>,
}

fn inspect_json(case: &Case) -> Value {
    let out = run_ok(
        Command::new(ociblk_bin())
            .arg("inspect")
            .arg("--json")
            .arg("--image")
            .arg(&case.image)
            .args(&case.args),
    );
    serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON")
}

fn export(case: &Case, out: &Path) {
    run_ok(
        Command::new(ociblk_bin())
            .arg("export")
            .arg("--image")
            .arg(&case.image)
            .arg("--output")
            .arg(out)
            .args(&case.args),
    );
}

fn payload_hashes(image: &Path) -> Vec<String> {
    let os = OsImage::open(image).unwrap();
    os.payloads
        .iter()
        .map(|p| sha256_hex(&fs::read(&p.path).unwrap()))
        .collect()
}

/// Copies partition `number` (1-based, per inspect) out of the disk.
fn extract_partition(disk: &Path, info: &Value, number: usize, out: &Path) {
    let p = &info["partitions"][number - 1];
    let first = p["first_lba"].as_u64().unwrap();
    let size = p["size"].as_u64().unwrap();
    let src = File::open(disk).unwrap();
    let dst = File::create(out).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < size {
        let n = (size - done).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], first * 512 + done)
            .unwrap();
        dst.write_all_at(&buf[..n], done).unwrap();
        done += n as u64;
    }
}

/// sgdisk finds a valid GPT with both headers and the protective MBR; the
/// gpt crate reads back the names, types, GUIDs and LBAs `info` lists.
fn judge_gpt(disk: &Path, info: &Value) {
    let out = run_ok(Command::new(require_tool("sgdisk")).arg("-v").arg(disk));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("No problems found"), "sgdisk -v:\n{text}");

    // The gpt crate reads back names, types, GUIDs and LBAs.
    let gdisk = gpt::GptConfig::new()
        .writable(false)
        .open(disk)
        .expect("gpt crate opens the disk");
    assert_eq!(
        gdisk.guid().to_string().to_uppercase(),
        info["disk"]["guid"].as_str().unwrap()
    );
    let parts = gdisk.partitions();
    let want = info["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), want.len());
    for (i, w) in want.iter().enumerate() {
        let p = &parts[&(i as u32 + 1)];
        assert_eq!(p.name, w["name"].as_str().unwrap());
        assert_eq!(
            p.part_type_guid.guid.to_string().to_uppercase(),
            w["type_guid"].as_str().unwrap()
        );
        assert_eq!(
            p.part_guid.to_string().to_uppercase(),
            w["guid"].as_str().unwrap()
        );
        assert_eq!(p.first_lba, w["first_lba"].as_u64().unwrap());
        assert_eq!(p.last_lba, w["last_lba"].as_u64().unwrap());
    }
}

/// The ESP, extracted into `dir`: fsck.fat finds nothing, mtools and fatfs
/// read every file of `case`.
fn judge_esp(case: &Case, disk: &Path, info: &Value, dir: &Path) {
    let esp = dir.join("esp.img");
    extract_partition(disk, info, 1, &esp);
    let out = run_ok(
        Command::new(require_tool("fsck.fat"))
            .args(["-n", "-V"])
            .arg(&esp),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let files = case.esp_files.len();
    assert!(
        text.contains(&format!("{} files", files + 4 + usize::from(files == 3))),
        "fsck.fat:\n{text}"
    );
    let mdir = run_ok(
        Command::new(require_tool("mdir"))
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-/", "-b", "-i"])
            .arg(&esp)
            .arg("::"),
    );
    let listing = String::from_utf8_lossy(&mdir.stdout);
    for (path, source) in &case.esp_files {
        assert!(
            listing.contains(&format!("::/{path}")),
            "mdir lacks {path}:\n{listing}"
        );
        let got = dir.join("extracted");
        let _ = fs::remove_file(&got);
        run_ok(
            Command::new(require_tool("mcopy"))
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(&esp)
                .arg(format!("::{path}"))
                .arg(&got),
        );
        assert!(
            fs::read(&got).unwrap() == fs::read(source).unwrap(),
            "mcopy of {path} differs from its source"
        );
    }
    let fs_img = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&esp)
        .unwrap();
    let fat =
        fatfs::FileSystem::new(fs_img, fatfs::FsOptions::new()).expect("fatfs mounts the ESP");
    assert_eq!(fat.fat_type(), fatfs::FatType::Fat32);
    assert_eq!(fat.volume_label(), "MNGN_BOOT");
    assert_eq!(
        format!("{:08X}", fat.volume_id()),
        info["esp"]["volume_id"].as_str().unwrap()
    );
    for (path, source) in &case.esp_files {
        let mut f = fat
            .root_dir()
            .open_file(path)
            .unwrap_or_else(|e| panic!("fatfs: {path}: {e}"));
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert!(
            got == fs::read(source).unwrap(),
            "fatfs read of {path} differs from its source"
        );
    }
}

fn check_case(case: &Case) {
    let t = tempfile::tempdir().unwrap();
    let disk = t.path().join("disk.raw");
    let before = payload_hashes(&case.image);
    let info = inspect_json(case);
    export(case, &disk);
    let size = info["disk"]["size"].as_u64().unwrap();
    assert_eq!(fs::metadata(&disk).unwrap().len(), size);

    judge_gpt(&disk, &info);

    judge_esp(case, &disk, &info, t.path());

    // System A starts with the system payload and is zero after it.
    let os = OsImage::open(&case.image).unwrap();
    let system = os.payload("system").unwrap();
    let a = &info["partitions"][1];
    let a_off = a["first_lba"].as_u64().unwrap() * 512;
    let disk_file = File::open(&disk).unwrap();
    let mut got = vec![0u8; system.size as usize + 4096];
    disk_file.read_exact_at(&mut got, a_off).unwrap();
    assert!(got[..system.size as usize] == fs::read(&system.path).unwrap()[..]);
    assert!(got[system.size as usize..].iter().all(|&b| b == 0));

    // Sparse: only payloads and metadata take space.
    let allocated = fs::metadata(&disk).unwrap().blocks() * 512;
    let data = info["extents"]["file_bytes"].as_u64().unwrap()
        + info["extents"]["metadata_bytes"].as_u64().unwrap();
    assert!(
        allocated < data + (8 << 20),
        "export allocated {allocated} bytes for {data} bytes of data"
    );

    assert_eq!(payload_hashes(&case.image), before, "payload blobs changed");
}

#[test]
fn sample_image_default_node_disk() {
    let image = sample_image();
    let kernel = OsImage::open(&image)
        .unwrap()
        .payload("kernel.efi")
        .unwrap()
        .path
        .clone();
    check_case(&Case {
        image,
        args: vec!["--seed".into(), "judge".into()],
        esp_files: vec![
            ("EFI/metropolis/boot-a.efi", kernel.clone()),
            ("EFI/BOOT/BOOTx64.EFI", kernel),
        ],
    });
}

#[test]
fn loader_parameters_and_pinned_ids_on_the_ha_disk_size() {
    let t = tempfile::tempdir().unwrap();
    let img = ImageBuilder::with_sizes((3 << 20) + 17, (5 << 20) + 1)
        .write(&t.path().join("img"))
        .unwrap();
    let loader = t.path().join("loader.efi");
    fs::write(&loader, pseudo_random(151234, 9)).unwrap();
    let params = t.path().join("parameters.pb");
    fs::write(&params, pseudo_random(3000, 10)).unwrap();
    let kernel = img.payload_blob("kernel.efi");
    let args: Vec<String> = [
        "--disk-size",
        "2818572288",
        "--abloader",
        loader.to_str().unwrap(),
        "--node-parameters",
        params.to_str().unwrap(),
    ]
    .iter()
    .chain(PINNED_IDS)
    .map(|s| s.to_string())
    .collect();
    let case = Case {
        image: img.dir.clone(),
        args,
        esp_files: vec![
            ("EFI/metropolis/boot-a.efi", kernel),
            ("EFI/BOOT/BOOTx64.EFI", loader),
            ("metropolis/parameters.pb", params),
        ],
    };
    let info = inspect_json(&case);
    assert_eq!(info["disk"]["guid"], "11111111-2222-4333-8444-555555555555");
    assert_eq!(
        info["partitions"][3]["guid"],
        "D1111111-2222-4333-8444-555555555555"
    );
    assert_eq!(info["esp"]["volume_id"], "CAFEF00D");
    check_case(&case);
}

#[test]
fn small_disk_without_data_partition() {
    let t = tempfile::tempdir().unwrap();
    let img = ImageBuilder::with_sizes(1 << 20, 1)
        .write(&t.path().join("img"))
        .unwrap();
    let kernel = img.payload_blob("kernel.efi");
    let case = Case {
        image: img.dir.clone(),
        args: [
            "--disk-size",
            "1GiB",
            "--esp-size",
            "40MiB",
            "--system-size",
            "256MiB",
            "--no-data-partition",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        esp_files: vec![
            ("EFI/metropolis/boot-a.efi", kernel.clone()),
            ("EFI/BOOT/BOOTx64.EFI", kernel),
        ],
    };
    assert_eq!(
        inspect_json(&case)["partitions"].as_array().unwrap().len(),
        3
    );
    check_case(&case);
}

#[test]
fn same_seed_same_disk_other_seed_other_ids() {
    let image = sample_image();
    let os = OsImage::open(&image).unwrap();
    let a = Layout::build(&os, &DiskParams::new("node-a")).unwrap();
    let a2 = Layout::build(&os, &DiskParams::new("node-a")).unwrap();
    let b = Layout::build(&os, &DiskParams::new("node-b")).unwrap();
    assert_eq!(a.fingerprint, a2.fingerprint);
    assert_ne!(a.fingerprint, b.fingerprint);
    assert_ne!(a.ids.disk, b.ids.disk);
    // Reading through the library equals the exported file, at odd offsets too.
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("a.raw");
    export(
        &Case {
            image: image.clone(),
            args: vec!["--seed".into(), "node-a".into()],
            esp_files: vec![],
        },
        &out,
    );
    let file = File::open(&out).unwrap();
    let reader = DiskReader::open(a).unwrap();
    let size = reader.layout.size;
    let mut offsets = vec![0, 511, 512 * 33 + 7, size - 4096, size - 1];
    offsets.extend(
        reader
            .layout
            .extents
            .extents()
            .iter()
            .map(|e| e.start.saturating_sub(3)),
    );
    for off in offsets {
        let len = 8192.min(size - off) as usize;
        let (mut want, mut got) = (vec![0u8; len], vec![0u8; len]);
        file.read_exact_at(&mut want, off).unwrap();
        reader.read_at(off, &mut got).unwrap();
        assert!(want == got, "library read at {off} differs from the export");
    }
}
