//! The node disk: partitions, ESP contents and system payload, as the upstream
//! installer lays them out for a test node.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use crate::SECTOR_SIZE;
use crate::chunk_hashes::ChunkHashes;
use crate::error::{Error, Result};
use crate::extent::{ExtentMap, ExtentMapBuilder, SourceId};
use crate::fat32::{Fat32, FatFileSpec};
use crate::gpt::{self, Partition, PartitionSize};
use crate::guid::{Guid, seed_hash};
use crate::image::OsImage;
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
    /// Hex sha256 of the content: the blob digest for payloads, computed for
    /// the small user files.
    pub sha256: String,
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

fn user_file(role: &str, path: &Path) -> Result<Source> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(Source {
        name: role.to_owned(),
        path: path.to_path_buf(),
        size: bytes.len() as u64,
        sha256: crate::image::hex_sha256(&bytes),
        chunk_hashes: None,
    })
}

impl Layout {
    /// Computes the node disk for `image` and `params`.
    pub fn build(image: &OsImage, params: &DiskParams) -> Result<Self> {
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
        let sectors = params.disk_size / SECTOR_SIZE;
        let boot_name = match image.product_info.architecture() {
            "x86_64" => "BOOTx64.EFI",
            "aarch64" => "BOOTAA64.EFI",
            other => return Err(Error::Architecture(other.to_owned())),
        };
        let kernel = image.payload("kernel.efi")?;
        let system = image.payload("system")?;

        let mut sources = vec![
            Source {
                name: system.name.clone(),
                path: system.path.clone(),
                size: system.size,
                sha256: system.digest.clone(),
                chunk_hashes: Some(system.chunk_hashes.clone()),
            },
            Source {
                name: kernel.name.clone(),
                path: kernel.path.clone(),
                size: kernel.size,
                sha256: kernel.digest.clone(),
                chunk_hashes: Some(kernel.chunk_hashes.clone()),
            },
        ];
        const SYSTEM: SourceId = 0;
        const KERNEL: SourceId = 1;
        let loader = match &params.abloader {
            Some(path) => {
                sources.push(user_file("abloader", path)?);
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
            sources.push(user_file("node-parameters", path)?);
            let s = sources.len() - 1;
            esp_files.push(FatFileSpec {
                path: NODE_PARAMETERS_PATH.into(),
                size: sources[s].size,
                source: s,
            });
        }

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
        let partitions = gpt::place(sectors, &requests).map_err(|m| {
            Error::DiskTooSmall(format!("{m} (disk has {} bytes)", params.disk_size))
        })?;
        let (esp_part, system_a) = (&partitions[0], &partitions[1]);

        let esp = Fat32::plan(esp_part.sectors(), ids.fat_volume_id, FAT_LABEL, &esp_files)?;
        if system.size > system_a.size() {
            return Err(Error::PayloadTooLarge {
                name: system.name.clone(),
                size: system.size,
                partition: SYSTEM_A_LABEL.into(),
                capacity: system_a.size(),
            });
        }

        let mut b = ExtentMapBuilder::new(params.disk_size);
        let entries = gpt::entries(&partitions);
        let entries_crc = crc32fast::hash(&entries);
        b.bytes(0, &protective_mbr(sectors));
        b.bytes(
            SECTOR_SIZE,
            &gpt::header(ids.disk, sectors, entries_crc, true),
        );
        b.bytes(2 * SECTOR_SIZE, &entries);
        b.bytes((sectors - 1 - gpt::ENTRY_SECTORS) * SECTOR_SIZE, &entries);
        b.bytes(
            (sectors - 1) * SECTOR_SIZE,
            &gpt::header(ids.disk, sectors, entries_crc, false),
        );
        esp.emit(esp_part.offset(), &mut b);
        b.file(system_a.offset(), system.size, SYSTEM, 0);
        // Overlaps here would be a bug in the code above, not in the input.
        let extents = b.build().map_err(|e| Error::Param {
            param: "layout",
            message: e.to_string(),
        })?;

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
        h.update(s.sha256.as_bytes());
    }
    h.finalize().into()
}
