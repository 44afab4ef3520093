//! The node disk: partitions, ESP contents and system payload, as the upstream
//! installer lays them out for a test node.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ociblk_digest::{ChunkHashes, Digest};
use sha2::{Digest as _, Sha256};

use crate::SECTOR_SIZE;
use crate::error::{Error, Result};
use crate::extent::{ExtentMap, ExtentMapBuilder, SourceId};
use crate::fat32::{Fat32, FatFileSpec};
use crate::gpt::{self, Partition, PartitionSize};
use crate::guid::{Guid, seed_hash};
use crate::image::{OsImage, Payload};
use crate::mbr::protective_mbr;

pub const ESP_TYPE: Guid = Guid::from_u128(0xC12A7328_F81F_11D2_BA4B_00A0C93EC93B);
pub const SYSTEM_A_TYPE: Guid = Guid::from_u128(0xEE96054B_F6D0_4267_AAAA_724B2AFEA74C);
pub const SYSTEM_B_TYPE: Guid = Guid::from_u128(0xEE96054B_F6D0_4267_BBBB_724B2AFEA74C);
pub const DATA_TYPE: Guid = Guid::from_u128(0x9EEEC464_6885_414A_B278_4305C51F7966);
pub const ESP_LABEL: &str = "ESP";
pub const SYSTEM_A_LABEL: &str = "METROPOLIS-SYSTEM-A";
pub const SYSTEM_B_LABEL: &str = "METROPOLIS-SYSTEM-B";
pub const DATA_LABEL: &str = "METROPOLIS-NODE-DATA";
pub const FAT_LABEL: &str = "MNGN_BOOT";
pub const BOOT_A_PATH: &str = "EFI/metropolis/boot-a.efi";
pub const NODE_PARAMETERS_PATH: &str = "metropolis/parameters.pb";

/// Defaults of the upstream test launcher.
pub const DEFAULT_DISK_SIZE: u64 = 5 << 30;
pub const DEFAULT_ESP_SIZE: u64 = 128 << 20;
pub const DEFAULT_SYSTEM_SIZE: u64 = 1 << 30;

/// The IDs a node disk carries. Upstream makes them random; ociblk derives
/// them from a seed so that a node keeps its disk across launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskIds {
    pub disk: Guid,
    pub esp: Guid,
    pub system_a: Guid,
    pub system_b: Guid,
    pub data: Guid,
    pub fat_volume_id: u32,
}

impl DiskIds {
    /// IDs derived from `seed` (a node name): same seed, same IDs.
    pub fn from_seed(seed: &str) -> Self {
        let vid = seed_hash(seed, "fat-volume-id");
        DiskIds {
            disk: Guid::derive(seed, "disk"),
            esp: Guid::derive(seed, "esp"),
            system_a: Guid::derive(seed, "system-a"),
            system_b: Guid::derive(seed, "system-b"),
            data: Guid::derive(seed, "data"),
            fat_volume_id: u32::from_le_bytes([vid[0], vid[1], vid[2], vid[3]]),
        }
    }
}

/// What the disk should look like, besides the OS image.
#[derive(Debug, Clone)]
pub struct DiskParams {
    pub disk_size: u64,
    pub esp_size: u64,
    pub system_size: u64,
    pub data_partition: bool,
    /// The A/B loader for `EFI/BOOT/BOOT<arch>.EFI`; without it the kernel
    /// payload is placed there so that firmware boots it directly.
    pub abloader: Option<PathBuf>,
    /// Contents of `metropolis/parameters.pb`, when given.
    pub node_parameters: Option<PathBuf>,
    pub ids: DiskIds,
}

impl DiskParams {
    /// Upstream test launcher defaults with IDs from `seed`.
    pub fn new(seed: &str) -> Self {
        DiskParams {
            disk_size: DEFAULT_DISK_SIZE,
            esp_size: DEFAULT_ESP_SIZE,
            system_size: DEFAULT_SYSTEM_SIZE,
            data_partition: true,
            abloader: None,
            node_parameters: None,
            ids: DiskIds::from_seed(seed),
        }
    }
}

/// A file the disk's data comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Source {
    /// Payload name or the role of a user file (`abloader`, `node-parameters`).
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    /// The sha256 of the content: the blob digest for payloads, computed
    /// for the small user files. In JSON `sha256`, its 64 hex digits.
    #[serde(rename = "sha256", serialize_with = "crate::image::serialize_hex")]
    pub digest: Digest,
    /// The chunk hashes the bytes are checked against: payloads have them,
    /// user files (loader, node parameters) do not.
    #[serde(skip)]
    pub chunk_hashes: Option<Arc<ChunkHashes>>,
}

/// The computed disk.
#[derive(Debug, Clone)]
pub struct Layout {
    pub size: u64,
    pub ids: DiskIds,
    pub partitions: Vec<Partition>,
    pub esp: Fat32,
    pub sources: Vec<Source>,
    pub extents: ExtentMap,
    /// Identifies the disk's content: same fingerprint, same bytes.
    pub fingerprint: [u8; 32],
}

/// Where the payloads stand in [`Layout::sources`]: first, before any user file.
const SYSTEM: SourceId = 0;
const KERNEL: SourceId = 1;

impl Source {
    /// A payload blob of the image, checked against its chunk hashes when read.
    fn payload(payload: &Payload) -> Self {
        Source {
            name: payload.name.clone(),
            path: payload.path.clone(),
            size: payload.size,
            digest: payload.digest.clone(),
            chunk_hashes: Some(payload.chunk_hashes.clone()),
        }
    }

    /// A small file the user gave in the role `role`, hashed here.
    fn user_file(role: &str, path: &Path) -> Result<Self> {
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        Ok(Source {
            name: role.to_owned(),
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            digest: Digest::of(&bytes),
            chunk_hashes: None,
        })
    }
}

/// Refuses sizes no disk can have: a disk of part of a sector, an empty ESP or
/// system partition.
fn check_params(params: &DiskParams) -> Result<()> {
    if !params.disk_size.is_multiple_of(SECTOR_SIZE) {
        return Err(Error::Param {
            param: "disk-size",
            message: format!(
                "{} is not a multiple of {SECTOR_SIZE} bytes",
                params.disk_size
            ),
        });
    }
    for (param, v) in [
        ("esp-size", params.esp_size),
        ("system-size", params.system_size),
    ] {
        if v == 0 {
            return Err(Error::Param {
                param,
                message: "must not be zero".into(),
            });
        }
    }
    Ok(())
}

/// The name firmware boots on `image`'s architecture, under `EFI/BOOT/`.
fn boot_file_name(image: &OsImage) -> Result<&'static str> {
    match image.product_info.architecture() {
        "x86_64" => Ok("BOOTx64.EFI"),
        "aarch64" => Ok("BOOTAA64.EFI"),
        other => Err(Error::Architecture(other.to_owned())),
    }
}

/// The disk's sources (the system and kernel payloads, then the user files `params`
/// names) and the ESP's files, which point into them.
fn sources_and_esp_files(
    system: &Payload,
    kernel: &Payload,
    params: &DiskParams,
    boot_name: &str,
) -> Result<(Vec<Source>, Vec<FatFileSpec>)> {
    let mut sources = vec![Source::payload(system), Source::payload(kernel)];
    let loader = match &params.abloader {
        Some(path) => {
            sources.push(Source::user_file("abloader", path)?);
            sources.len() - 1
        }
        None => KERNEL,
    };
    let mut esp_files = vec![
        FatFileSpec {
            path: BOOT_A_PATH.into(),
            size: kernel.size,
            source: KERNEL,
        },
        FatFileSpec {
            path: format!("EFI/BOOT/{boot_name}"),
            size: sources[loader].size,
            source: loader,
        },
    ];
    if let Some(path) = &params.node_parameters {
        sources.push(Source::user_file("node-parameters", path)?);
        let s = sources.len() - 1;
        esp_files.push(FatFileSpec {
            path: NODE_PARAMETERS_PATH.into(),
            size: sources[s].size,
            source: s,
        });
    }
    Ok((sources, esp_files))
}

/// The partitions to place, in order: ESP, system A and B, and the data partition
/// filling the rest when asked for.
fn partition_requests(params: &DiskParams) -> Vec<(String, Guid, Guid, PartitionSize)> {
    let ids = &params.ids;
    let mut requests = vec![
        (
            ESP_LABEL.to_owned(),
            ESP_TYPE,
            ids.esp,
            PartitionSize::Bytes(params.esp_size),
        ),
        (
            SYSTEM_A_LABEL.to_owned(),
            SYSTEM_A_TYPE,
            ids.system_a,
            PartitionSize::Bytes(params.system_size),
        ),
        (
            SYSTEM_B_LABEL.to_owned(),
            SYSTEM_B_TYPE,
            ids.system_b,
            PartitionSize::Bytes(params.system_size),
        ),
    ];
    if params.data_partition {
        requests.push((
            DATA_LABEL.to_owned(),
            DATA_TYPE,
            ids.data,
            PartitionSize::Fill,
        ));
    }
    requests
}

/// The extents of a disk of `disk_size` bytes: protective MBR, both GPT copies, the
/// ESP's file system at `esp_offset` and the system payload of `system_size` bytes at
/// `system_offset`.
fn extent_map(
    disk_size: u64,
    disk_guid: Guid,
    partitions: &[Partition],
    esp: &Fat32,
    esp_offset: u64,
    system_offset: u64,
    system_size: u64,
) -> Result<ExtentMap> {
    let sectors = disk_size / SECTOR_SIZE;
    let mut b = ExtentMapBuilder::new(disk_size);
    let entries = gpt::entries(partitions);
    let entries_crc = crc32fast::hash(&entries);
    b.bytes(0, &protective_mbr(sectors));
    b.bytes(
        SECTOR_SIZE,
        &gpt::header(disk_guid, sectors, entries_crc, true),
    );
    b.bytes(2 * SECTOR_SIZE, &entries);
    b.bytes((sectors - 1 - gpt::ENTRY_SECTORS) * SECTOR_SIZE, &entries);
    b.bytes(
        (sectors - 1) * SECTOR_SIZE,
        &gpt::header(disk_guid, sectors, entries_crc, false),
    );
    esp.emit(esp_offset, &mut b);
    b.file(system_offset, system_size, SYSTEM, 0);
    // Overlaps here would be a bug in the code above, not in the input.
    b.build().map_err(|e| Error::Param {
        param: "layout",
        message: e.to_string(),
    })
}

impl Layout {
    /// Computes the node disk for `image` and `params`.
    pub fn build(image: &OsImage, params: &DiskParams) -> Result<Self> {
        check_params(params)?;
        let sectors = params.disk_size / SECTOR_SIZE;
        let boot_name = boot_file_name(image)?;
        let kernel = image.payload("kernel.efi")?;
        let system = image.payload("system")?;
        let (sources, esp_files) = sources_and_esp_files(system, kernel, params, boot_name)?;

        let partitions = gpt::place(sectors, &partition_requests(params)).map_err(|m| {
            Error::DiskTooSmall(format!("{m} (disk has {} bytes)", params.disk_size))
        })?;
        let (esp_part, system_a) = (&partitions[0], &partitions[1]);
        let ids = &params.ids;
        let esp = Fat32::plan(esp_part.sectors(), ids.fat_volume_id, FAT_LABEL, &esp_files)?;
        if system.size > system_a.size() {
            return Err(Error::PayloadTooLarge {
                name: system.name.clone(),
                size: system.size,
                partition: SYSTEM_A_LABEL.into(),
                capacity: system_a.size(),
            });
        }

        let extents = extent_map(
            params.disk_size,
            ids.disk,
            &partitions,
            &esp,
            esp_part.offset(),
            system_a.offset(),
            system.size,
        )?;
        let fingerprint = fingerprint(&extents, &sources);
        Ok(Layout {
            size: params.disk_size,
            ids: *ids,
            partitions,
            esp,
            sources,
            extents,
            fingerprint,
        })
    }

    /// The fingerprint as 64 hex digits.
    pub fn fingerprint_hex(&self) -> String {
        hex::encode(self.fingerprint)
    }
}

/// sha256 over the extent map (positions, generated bytes) and the identity
/// of every source file: two layouts with the same fingerprint serve the
/// same bytes.
fn fingerprint(map: &ExtentMap, sources: &[Source]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"ociblk-layout-v1\0");
    h.update(map.size().to_le_bytes());
    for e in map.extents() {
        h.update(e.start.to_le_bytes());
        h.update(e.len.to_le_bytes());
        match e.content {
            crate::extent::Content::Zero => h.update([0]),
            crate::extent::Content::Metadata { .. } => {
                h.update([1]);
                h.update(map.metadata(e).unwrap_or_default());
            }
            crate::extent::Content::FatChain { first_cluster } => {
                h.update([2]);
                h.update(first_cluster.to_le_bytes());
            }
            crate::extent::Content::File { source, offset } => {
                h.update([3]);
                h.update((source as u64).to_le_bytes());
                h.update(offset.to_le_bytes());
            }
        }
    }
    for s in sources {
        h.update(s.size.to_le_bytes());
        // The hex text, as the fingerprint has always hashed it.
        h.update(s.digest.hex().as_bytes());
    }
    h.finalize().into()
}
