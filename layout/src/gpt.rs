//! GUID partition table: placement and encoding, as upstream's `osbase/gpt`.

use crate::SECTOR_SIZE;
use crate::guid::Guid;

/// Partition entries in a table, and bytes per entry.
pub const ENTRY_COUNT: u64 = 128;
pub const ENTRY_SIZE: u64 = 128;
/// Sectors taken by the entry array (16 KiB).
pub const ENTRY_SECTORS: u64 = ENTRY_COUNT * ENTRY_SIZE / SECTOR_SIZE;
/// Partition starts are aligned to 1 MiB.
pub const ALIGN_SECTORS: u64 = (1 << 20) / SECTOR_SIZE;
const HEADER_SIZE: usize = 92;
const REVISION: u32 = 0x0001_0000;

/// A partition as placed on the disk; LBAs are inclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub type_guid: Guid,
    pub guid: Guid,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl Partition {
    pub fn sectors(&self) -> u64 {
        self.last_lba - self.first_lba + 1
    }

    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR_SIZE
    }

    pub fn size(&self) -> u64 {
        self.sectors() * SECTOR_SIZE
    }
}

/// How big a partition should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionSize {
    /// At least this many bytes (rounded up to whole sectors).
    Bytes(u64),
    /// The largest aligned free space, rounded down to whole MiB.
    Fill,
}

/// First LBA a partition may use.
pub fn first_usable_lba() -> u64 {
    2 + ENTRY_SECTORS
}

/// Last LBA a partition may use, on a disk of `sectors` sectors.
pub fn last_usable_lba(sectors: u64) -> u64 {
    sectors - 2 - ENTRY_SECTORS
}

/// Places partitions in order, first fit, 1 MiB-aligned, like upstream's
/// `AddPartition`. Returns the placed partitions or a message saying which
/// one did not fit.
pub fn place(
    sectors: u64,
    requests: &[(String, Guid, Guid, PartitionSize)],
) -> Result<Vec<Partition>, String> {
    if sectors < 3 + 2 * ENTRY_SECTORS {
        return Err(format!("{sectors} sectors cannot hold a GPT"));
    }
    let mut placed: Vec<Partition> = Vec::with_capacity(requests.len());
    for (name, type_guid, guid, size) in requests {
        // Free intervals [start, end) between the GPT areas and partitions.
        let mut used: Vec<(u64, u64)> = vec![
            (0, first_usable_lba()),
            (last_usable_lba(sectors) + 1, sectors),
        ];
        used.extend(placed.iter().map(|p| (p.first_lba, p.last_lba + 1)));
        used.sort_unstable();
        let free: Vec<(u64, u64)> = used
            .windows(2)
            .filter(|w| w[1].0 > w[0].1)
            .map(|w| (w[0].1.next_multiple_of(ALIGN_SECTORS), w[1].0))
            .filter(|(s, e)| e > s)
            .collect();
        let largest = free.iter().map(|(s, e)| e - s).max().unwrap_or(0);
        let blocks = match *size {
            PartitionSize::Bytes(bytes) => bytes.div_ceil(SECTOR_SIZE),
            PartitionSize::Fill => largest / ALIGN_SECTORS * ALIGN_SECTORS,
        };
        if blocks == 0 {
            return Err(format!("no space left for partition {name}"));
        }
        let Some(&(start, _)) = free.iter().find(|(s, e)| e - s >= blocks) else {
            return Err(format!(
                "partition {name} needs {blocks} sectors, the largest aligned free space is {largest} sectors"
            ));
        };
        placed.push(Partition {
            name: name.clone(),
            type_guid: *type_guid,
            guid: *guid,
            first_lba: start,
            last_lba: start + blocks - 1,
        });
    }
    Ok(placed)
}

/// The 16 KiB partition entry array.
pub fn entries(partitions: &[Partition]) -> Vec<u8> {
    let mut buf = vec![0u8; (ENTRY_COUNT * ENTRY_SIZE) as usize];
    for (p, e) in partitions
        .iter()
        .zip(buf.chunks_exact_mut(ENTRY_SIZE as usize))
    {
        e[0..16].copy_from_slice(&p.type_guid.to_mixed_endian());
        e[16..32].copy_from_slice(&p.guid.to_mixed_endian());
        e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
        // Attributes (48..56) stay zero. The name is UTF-16LE, cut at 36 units.
        for (unit, dst) in p.name.encode_utf16().zip(e[56..128].chunks_exact_mut(2)) {
            dst.copy_from_slice(&unit.to_le_bytes());
        }
    }
    buf
}

/// A GPT header sector. `primary` selects LBA 1 (entries at LBA 2) or the
/// backup at the last LBA (entries just before it).
pub fn header(
    disk_guid: Guid,
    sectors: u64,
    entries_crc: u32,
    primary: bool,
) -> [u8; SECTOR_SIZE as usize] {
    let (my_lba, alternate_lba, entries_lba) = if primary {
        (1, sectors - 1, 2)
    } else {
        (sectors - 1, 1, sectors - 1 - ENTRY_SECTORS)
    };
    let mut h = [0u8; SECTOR_SIZE as usize];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&REVISION.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
    // 16..20 CRC, 20..24 reserved.
    h[24..32].copy_from_slice(&my_lba.to_le_bytes());
    h[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
    h[40..48].copy_from_slice(&first_usable_lba().to_le_bytes());
    h[48..56].copy_from_slice(&last_usable_lba(sectors).to_le_bytes());
    h[56..72].copy_from_slice(&disk_guid.to_mixed_endian());
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&(ENTRY_COUNT as u32).to_le_bytes());
    h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
    h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[..HEADER_SIZE]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: u64 = 5 << 21; // 5 GiB in sectors

    fn req(name: &str, size: PartitionSize) -> (String, Guid, Guid, PartitionSize) {
        (
            name.into(),
            Guid::derive(name, "type"),
            Guid::derive(name, "id"),
            size,
        )
    }

    #[test]
    fn test_node_placement_matches_spec_table() {
        let parts = place(
            N,
            &[
                req("ESP", PartitionSize::Bytes(128 << 20)),
                req("A", PartitionSize::Bytes(1 << 30)),
                req("B", PartitionSize::Bytes(1 << 30)),
                req("D", PartitionSize::Fill),
            ],
        )
        .unwrap();
        let lbas: Vec<_> = parts.iter().map(|p| (p.first_lba, p.last_lba)).collect();
        let data_last = 4458496 + (N - 33 - 4458496) / 2048 * 2048 - 1;
        assert_eq!(
            lbas,
            [
                (2048, 264191),
                (264192, 2361343),
                (2361344, 4458495),
                (4458496, data_last)
            ]
        );
    }

    #[test]
    fn unaligned_sizes_round_up_and_next_start_aligns() {
        let parts = place(
            N,
            &[
                req("X", PartitionSize::Bytes(1)),
                req("Y", PartitionSize::Bytes(513)),
            ],
        )
        .unwrap();
        assert_eq!((parts[0].first_lba, parts[0].last_lba), (2048, 2048));
        assert_eq!((parts[1].first_lba, parts[1].last_lba), (4096, 4097));
    }

    #[test]
    fn too_small_disk_is_an_error() {
        let err = place(4096, &[req("ESP", PartitionSize::Bytes(128 << 20))]).unwrap_err();
        assert!(err.contains("ESP"), "{err}");
        place(60, &[]).unwrap_err();
    }

    #[test]
    fn header_fields_and_crc() {
        let e = entries(&[]);
        let ecrc = crc32fast::hash(&e);
        let h = header(Guid::derive("x", "disk"), N, ecrc, false);
        assert_eq!(&h[0..8], b"EFI PART");
        assert_eq!(u64::from_le_bytes(h[24..32].try_into().unwrap()), N - 1);
        assert_eq!(u64::from_le_bytes(h[32..40].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(h[40..48].try_into().unwrap()), 34);
        assert_eq!(u64::from_le_bytes(h[48..56].try_into().unwrap()), N - 34);
        assert_eq!(u64::from_le_bytes(h[72..80].try_into().unwrap()), N - 33);
        let mut zeroed = h;
        zeroed[16..20].fill(0);
        assert_eq!(crc32fast::hash(&zeroed[..92]).to_le_bytes(), h[16..20]);
        assert!(h[92..].iter().all(|&b| b == 0));
    }

    #[test]
    fn entry_name_is_utf16_and_truncated() {
        let mut p = Partition {
            name: "METROPOLIS-SYSTEM-A".into(),
            type_guid: Guid::default(),
            guid: Guid::default(),
            first_lba: 1,
            last_lba: 2,
        };
        let e = entries(std::slice::from_ref(&p));
        assert_eq!(&e[56..60], &[b'M', 0, b'E', 0]);
        assert!(e[56 + 38..128].iter().all(|&b| b == 0));
        p.name = "x".repeat(40);
        let e = entries(&[p]);
        assert!(e[56..128].chunks(2).all(|c| c == [b'x', 0]));
        assert!(e[128..].iter().all(|&b| b == 0));
    }
}
