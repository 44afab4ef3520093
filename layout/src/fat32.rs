//! A FAT32 file system computed as extents, byte-identical to upstream's
//! `osbase/fat32` writer: 512-byte clusters, depth-first contiguous
//! allocation, LFN entries for every name, fixed 1980-01-01 timestamps.

use crate::SECTOR_SIZE;
use crate::error::{Error, Result};
use crate::extent::{ExtentMapBuilder, SourceId};

const CLUSTER_SIZE: u64 = SECTOR_SIZE;
const RESERVED_SECTORS: u64 = 8;
const FAT_COUNT: u64 = 2;
const BACKUP_BOOT_SECTOR: u64 = 6;
const DIR_ENTRY_SIZE: usize = 32;
const LFN_UNITS_PER_ENTRY: usize = 13;
const MEDIA: u8 = 0xF8;
/// FAT32 needs at least this many FAT entries (65525 clusters + 2).
const MIN_FAT_ENTRIES: u64 = 65525 + 2;
/// Entries that FAT32's 28-bit cluster numbers can address.
const MAX_FAT_ENTRIES: u64 = 0x0FFF_FFFF;
const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_LFN: u8 = 0x0F;
const LFN_LAST: u8 = 0x40;
/// MS-DOS date of 1980-01-01, the earliest FAT can express.
const DOS_DATE_1980: u16 = (1 << 5) | 1;
const MAX_DIR_BYTES: u64 = 2 << 20;

/// A file to place in the file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatFileSpec {
    /// Slash-separated path, e.g. `EFI/BOOT/BOOTx64.EFI`.
    pub path: String,
    pub size: u64,
    pub source: SourceId,
}

/// A placed file or directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FatEntry {
    pub path: String,
    pub short_name: String,
    pub directory: bool,
    pub size: u64,
    /// First cluster (0 for an empty file) and number of clusters.
    pub first_cluster: u32,
    pub clusters: u32,
    #[serde(skip)]
    pub source: Option<SourceId>,
}

/// A planned FAT32 file system of `total_sectors` sectors.
#[derive(Debug, Clone)]
pub struct Fat32 {
    pub total_sectors: u32,
    pub fat_sectors: u32,
    pub volume_id: u32,
    /// FAT entries in use, counting the two reserved ones.
    pub entries_used: u32,
    /// Length of the FAT as written, in entries.
    pub fat_entries: u32,
    /// Files and directories in allocation order (the root first).
    pub entries: Vec<FatEntry>,
    label: [u8; 11],
    dir_contents: Vec<Vec<u8>>,
}

struct Node {
    name: String,
    parent: Option<usize>,
    children: Vec<usize>,
    file: Option<(u64, SourceId)>,
    short_name: [u8; 11],
    size: u64,
    first_cluster: u32,
}

impl Fat32 {
    /// Plans the file system. `files` are placed in order, creating parent
    /// directories as needed (insertion order decides the allocation order).
    pub fn plan(
        total_sectors: u64,
        volume_id: u32,
        label: &str,
        files: &[FatFileSpec],
    ) -> Result<Self> {
        let total = u32::try_from(total_sectors).map_err(|_| Error::Param {
            param: "esp-size",
            message: format!("{total_sectors} sectors is more than FAT32 can address"),
        })?;
        let mut nodes = vec![Node::dir(String::new(), None)];
        for f in files {
            insert(&mut nodes, f)?;
        }
        let (order, used) = allocate_clusters(&mut nodes)?;
        let fat = FatSize::for_content(total, used)?;
        let label = label_bytes(label);
        let (entries, dir_contents) = placed_entries(&nodes, &order, &label);
        Ok(Fat32 {
            total_sectors: total,
            fat_sectors: fat.sectors as u32,
            volume_id,
            entries_used: used as u32,
            fat_entries: fat.entries as u32,
            entries,
            label,
            dir_contents,
        })
    }

    /// Byte offset of cluster `c` from the start of the file system.
    pub fn cluster_offset(&self, cluster: u32) -> u64 {
        (RESERVED_SECTORS + FAT_COUNT * u64::from(self.fat_sectors) + u64::from(cluster) - 2)
            * SECTOR_SIZE
    }

    /// Free clusters as FSInfo records them.
    pub fn free_count(&self) -> u32 {
        self.fat_entries - self.entries_used
    }

    /// FSInfo's next-free hint: one past the first free cluster (upstream's
    /// quirk), or "unknown" when at most one cluster is free.
    pub fn next_free(&self) -> u32 {
        if self.free_count() > 1 {
            self.entries_used + 1
        } else {
            u32::MAX
        }
    }

    /// The boot sector (BPB).
    pub fn boot_sector(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..3].copy_from_slice(&[0xEB, 0xFE, 0x90]);
        b[3..11].copy_from_slice(b"MONOGON\0");
        b[11..13].copy_from_slice(&(SECTOR_SIZE as u16).to_le_bytes());
        b[13] = 1; // sectors per cluster
        b[14..16].copy_from_slice(&(RESERVED_SECTORS as u16).to_le_bytes());
        b[16] = FAT_COUNT as u8;
        // 17..21: root entries and 16-bit total, zero on FAT32.
        b[21] = MEDIA;
        // 22..24 FAT size 16, 24..26 sectors/track, 26..28 heads, 28..32 hidden: zero.
        b[32..36].copy_from_slice(&self.total_sectors.to_le_bytes());
        b[36..40].copy_from_slice(&self.fat_sectors.to_le_bytes());
        // 40..42 flags, 42..44 version: zero.
        b[44..48].copy_from_slice(&2u32.to_le_bytes()); // root cluster
        b[48..50].copy_from_slice(&1u16.to_le_bytes()); // FSInfo sector
        b[50..52].copy_from_slice(&(BACKUP_BOOT_SECTOR as u16).to_le_bytes());
        // 52..64 reserved, 64 drive number, 65 reserved.
        b[66] = 0x29;
        b[67..71].copy_from_slice(&self.volume_id.to_le_bytes());
        b[71..82].copy_from_slice(&self.label);
        b[82..90].copy_from_slice(b"FAT32   ");
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    /// The FSInfo sector.
    pub fn fsinfo(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(b"RRaA");
        b[484..488].copy_from_slice(b"rrAa");
        b[488..492].copy_from_slice(&self.free_count().to_le_bytes());
        b[492..496].copy_from_slice(&self.next_free().to_le_bytes());
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    /// Adds the file system's extents, with the file system starting at disk
    /// offset `base`.
    pub fn emit(&self, base: u64, out: &mut ExtentMapBuilder) {
        let boot = self.boot_sector();
        let fsinfo = self.fsinfo();
        for sector in [0, BACKUP_BOOT_SECTOR] {
            out.bytes(base + sector * SECTOR_SIZE, &boot);
            out.bytes(base + (sector + 1) * SECTOR_SIZE, &fsinfo);
        }
        let mut reserved = [0u8; 8];
        reserved[..4].copy_from_slice(&(0x0FFF_FF00 | u32::from(MEDIA)).to_le_bytes());
        reserved[4..].copy_from_slice(&0x0FFF_FFFFu32.to_le_bytes());
        for fat in 0..FAT_COUNT {
            let fat_start =
                base + (RESERVED_SECTORS + fat * u64::from(self.fat_sectors)) * SECTOR_SIZE;
            out.bytes(fat_start, &reserved);
            for e in self.entries.iter().filter(|e| e.clusters > 0) {
                out.fat_chain(
                    fat_start + u64::from(e.first_cluster) * 4,
                    e.first_cluster,
                    e.clusters,
                );
            }
        }
        let mut dirs = self.dir_contents.iter();
        for e in &self.entries {
            let at = base + self.cluster_offset(e.first_cluster);
            if e.directory {
                if let Some(bytes) = dirs.next() {
                    out.bytes(at, bytes);
                }
            } else if let (Some(source), true) = (e.source, e.size > 0) {
                out.file(at, e.size, source, 0);
            }
        }
    }
}

impl Node {
    fn dir(name: String, parent: Option<usize>) -> Self {
        Node {
            name,
            parent,
            children: Vec::new(),
            file: None,
            short_name: [b' '; 11],
            size: 0,
            first_cluster: 0,
        }
    }
}

fn insert(nodes: &mut Vec<Node>, f: &FatFileSpec) -> Result<()> {
    let bad = |why: &str| Error::Param {
        param: "esp file",
        message: format!("{:?}: {why}", f.path),
    };
    if f.size >= 1 << 32 {
        return Err(Error::EspContentTooLarge(format!(
            "{} has {} bytes, FAT32 files must be under 4 GiB",
            f.path, f.size
        )));
    }
    let parts: Vec<&str> = f.path.split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err(bad("not a clean relative path"));
    }
    let (file_name, dirs) = parts.split_last().ok_or_else(|| bad("empty path"))?;
    let mut cur = 0;
    for d in dirs {
        let found = nodes[cur]
            .children
            .iter()
            .copied()
            .find(|&c| nodes[c].name == *d);
        cur = match found {
            Some(c) if nodes[c].file.is_none() => c,
            Some(_) => return Err(bad("a parent is a file")),
            None => {
                nodes.push(Node::dir((*d).to_owned(), Some(cur)));
                let c = nodes.len() - 1;
                nodes[cur].children.push(c);
                c
            }
        };
    }
    if nodes[cur]
        .children
        .iter()
        .any(|&c| nodes[c].name == *file_name)
    {
        return Err(bad("placed twice"));
    }
    let mut node = Node::dir((*file_name).to_owned(), Some(cur));
    node.file = Some((f.size, f.source));
    node.size = f.size;
    nodes.push(node);
    let c = nodes.len() - 1;
    nodes[cur].children.push(c);
    Ok(())
}

/// Gives every node its clusters, depth-first and pre-order as upstream allocates,
/// sizing each directory on the way. Returns the nodes in allocation order and the
/// FAT entries in use (the two reserved ones counted).
fn allocate_clusters(nodes: &mut [Node]) -> Result<(Vec<usize>, u64)> {
    let mut order = Vec::with_capacity(nodes.len());
    let mut next_cluster: u64 = 2;
    let mut stack = vec![0usize];
    while let Some(i) = stack.pop() {
        if nodes[i].file.is_none() {
            assign_short_names(nodes, i)?;
            nodes[i].size = dir_size(nodes, i)?;
        }
        let clusters = nodes[i].size.div_ceil(CLUSTER_SIZE);
        if clusters > 0 {
            if next_cluster + clusters > MAX_FAT_ENTRIES {
                return Err(Error::EspContentTooLarge(
                    "more than 2^28 clusters of content".into(),
                ));
            }
            nodes[i].first_cluster = next_cluster as u32;
            next_cluster += clusters;
        }
        order.push(i);
        stack.extend(nodes[i].children.iter().rev());
    }
    Ok((order, next_cluster))
}

/// The size of each FAT.
struct FatSize {
    /// Sectors each FAT takes.
    sectors: u64,
    /// Entries each FAT holds as written.
    entries: u64,
}

impl FatSize {
    /// The FATs of a file system of `total` sectors whose content uses `used` entries,
    /// or why the content does not fit.
    fn for_content(total: u32, used: u64) -> Result<Self> {
        // Upstream sizes a fixed-size FAT32 in two steps: first it checks the
        // content against a FAT of at least the FAT32 minimum, then splits the
        // sectors so that each FAT sector (128 entries) maps 128 data sectors.
        let min_len = used.max(MIN_FAT_ENTRIES);
        let min_occupied =
            RESERVED_SECTORS + (min_len - 2) + FAT_COUNT * (min_len * 4).div_ceil(SECTOR_SIZE);
        let total64 = u64::from(total);
        if total64 < min_occupied {
            return Err(if used > MIN_FAT_ENTRIES {
                Error::EspContentTooLarge(format!(
                    "{} clusters of files and directories need {min_occupied} sectors, the ESP has {total}",
                    used - 2
                ))
            } else {
                Error::EspTooSmall {
                    sectors: total64,
                    minimum: min_occupied,
                }
            });
        }
        let per_fat_sector = CLUSTER_SIZE / 4;
        let fat_sectors =
            (total64 + 2 + per_fat_sector + FAT_COUNT - 1) / (per_fat_sector + FAT_COUNT);
        let data_sectors = total64 - RESERVED_SECTORS - FAT_COUNT * fat_sectors;
        let data_entries = data_sectors + 2;
        if used > data_entries {
            return Err(Error::EspContentTooLarge(format!(
                "{} clusters of files and directories, the ESP has {data_sectors} data clusters",
                used - 2
            )));
        }
        let fat_len = min_len.max(data_entries);
        if fat_len * 4 > fat_sectors * SECTOR_SIZE {
            // Upstream would write a FAT longer than its space here.
            return Err(Error::EspTooSmall {
                sectors: total64,
                minimum: min_occupied + 2 * FAT_COUNT,
            });
        }
        Ok(FatSize {
            sectors: fat_sectors,
            entries: fat_len,
        })
    }
}

/// `label` as the 11 bytes of a volume label, padded with spaces.
fn label_bytes(label: &str) -> [u8; 11] {
    let mut bytes = [b' '; 11];
    for (d, s) in bytes.iter_mut().zip(label.bytes()) {
        *d = s;
    }
    bytes
}

/// The placed entries in allocation `order`, and the bytes of each directory in the
/// same order.
fn placed_entries(
    nodes: &[Node],
    order: &[usize],
    label: &[u8; 11],
) -> (Vec<FatEntry>, Vec<Vec<u8>>) {
    let mut entries = Vec::with_capacity(order.len());
    let mut dir_contents = Vec::new();
    for &i in order {
        let n = &nodes[i];
        if n.file.is_none() {
            dir_contents.push(dir_bytes(nodes, i, label));
        }
        entries.push(FatEntry {
            path: path_of(nodes, i),
            short_name: short_name_text(&n.short_name),
            directory: n.file.is_none(),
            size: n.size,
            first_cluster: n.first_cluster,
            clusters: n.size.div_ceil(CLUSTER_SIZE) as u32,
            source: n.file.map(|(_, s)| s),
        });
    }
    (entries, dir_contents)
}

fn path_of(nodes: &[Node], mut i: usize) -> String {
    let mut parts = Vec::new();
    while let Some(p) = nodes[i].parent {
        parts.push(nodes[i].name.as_str());
        i = p;
    }
    parts.reverse();
    parts.join("/")
}

fn lfn_units(name: &str) -> Result<Vec<u16>> {
    let mut units: Vec<u16> = name.encode_utf16().collect();
    units.push(0);
    if units.len() > 255 {
        return Err(Error::Param {
            param: "esp file",
            message: format!("file name {name:?} is longer than 255 UTF-16 units"),
        });
    }
    Ok(units)
}

/// Bytes of directory entries a child takes: its LFN entries plus the 8.3 entry.
fn entry_bytes(name: &str) -> Result<u64> {
    let lfn = lfn_units(name)?.len().div_ceil(LFN_UNITS_PER_ENTRY);
    Ok(((lfn + 1) * DIR_ENTRY_SIZE) as u64)
}

fn dir_size(nodes: &[Node], i: usize) -> Result<u64> {
    let own = if nodes[i].parent.is_some() { 2 } else { 1 } * DIR_ENTRY_SIZE as u64;
    let mut size = own;
    for &c in &nodes[i].children {
        size += entry_bytes(&nodes[c].name)?;
    }
    if size > MAX_DIR_BYTES {
        return Err(Error::EspContentTooLarge(format!(
            "directory {:?} needs more than 2 MiB of entries",
            path_of(nodes, i)
        )));
    }
    Ok(size)
}

/// Characters allowed in a pass-through 8.3 base name.
fn is_dos_char(c: char) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit() || "!#$%&'()@^_`{}~-".contains(c)
}

/// Characters upstream's extension pattern allows: the base set plus the
/// range `)`..=`@` its character class spells by accident.
fn is_dos_ext_char(c: char) -> bool {
    is_dos_char(c) || (')'..='@').contains(&c)
}

/// The 8.3 name of `upper` when it can be kept as it is.
fn pass_through_name(upper: &str) -> Option<[u8; 11]> {
    let split = upper.find(|c: char| !is_dos_char(c)).unwrap_or(upper.len());
    let (base, rest) = upper.split_at(split);
    if base.len() > 8 {
        return None;
    }
    let ext = match rest.strip_prefix('.') {
        None if rest.is_empty() => "",
        Some(ext) if (1..=3).contains(&ext.chars().count()) && ext.chars().all(is_dos_ext_char) => {
            ext
        }
        _ => return None,
    };
    let mut name = [b' '; 11];
    name[..base.len()].copy_from_slice(base.as_bytes());
    name[8..8 + ext.len()].copy_from_slice(ext.as_bytes());
    Some(name)
}

/// Upstream's short names: names valid as 8.3 pass through upper-cased;
/// others get the first four bytes of the base, a per-directory hex counter
/// and the extension cut to three bytes.
fn assign_short_names(nodes: &mut [Node], dir: usize) -> Result<()> {
    let children = nodes[dir].children.clone();
    let mut taken = std::collections::HashSet::new();
    let mut lossy = Vec::new();
    for &c in &children {
        let upper = nodes[c].name.to_uppercase();
        match pass_through_name(&upper) {
            Some(n) => {
                if !taken.insert(n) {
                    return Err(Error::Param {
                        param: "esp file",
                        message: format!(
                            "name {:?} occurs more than once in the same directory",
                            nodes[c].name
                        ),
                    });
                }
                nodes[c].short_name = n;
            }
            None => lossy.push(c),
        }
    }
    let mut counter: u32 = 0;
    for c in lossy {
        let upper = nodes[c].name.to_uppercase();
        // Upstream drops a dot-separated part only when it is one invalid character.
        let parts: Vec<&str> = upper
            .split('.')
            .map(|p| {
                let mut chars = p.chars();
                match (chars.next(), chars.next()) {
                    (Some(ch), None) if !is_dos_char(ch) => "",
                    _ => p,
                }
            })
            .collect();
        let mut name = [b' '; 11];
        let last = parts[parts.len() - 1];
        let base = if parts.len() > 1 && !parts[0].is_empty() && !last.is_empty() {
            copy_prefix(&mut name[8..11], last);
            parts[..parts.len() - 1].concat()
        } else {
            parts.concat()
        };
        copy_prefix(&mut name[..4], &base);
        loop {
            name[4..8].copy_from_slice(format!("{counter:04X}").as_bytes());
            counter += 1;
            if counter >= u32::from(u16::MAX) {
                return Err(Error::EspContentTooLarge(
                    "too many names in one directory".into(),
                ));
            }
            if !taken.contains(&name) {
                break;
            }
        }
        nodes[c].short_name = name;
    }
    Ok(())
}

fn copy_prefix(dst: &mut [u8], src: &str) {
    for (d, s) in dst.iter_mut().zip(src.bytes()) {
        *d = s;
    }
}

fn short_name_text(n: &[u8; 11]) -> String {
    let base = String::from_utf8_lossy(&n[..8]).trim_end().to_owned();
    let ext = String::from_utf8_lossy(&n[8..]).trim_end().to_owned();
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

fn lfn_checksum(short: &[u8; 11]) -> u8 {
    short.iter().fold(0u8, |sum, &b| {
        ((sum & 1) << 7).wrapping_add(sum >> 1).wrapping_add(b)
    })
}

/// A short (8.3) directory entry with upstream's fixed 1980-01-01 times.
fn short_entry(
    name: &[u8; 11],
    attr: u8,
    cluster: u32,
    size: u32,
    dated: bool,
) -> [u8; DIR_ENTRY_SIZE] {
    let mut e = [0u8; DIR_ENTRY_SIZE];
    e[0..11].copy_from_slice(name);
    e[11] = attr;
    if dated {
        e[16..18].copy_from_slice(&DOS_DATE_1980.to_le_bytes()); // created
        e[24..26].copy_from_slice(&DOS_DATE_1980.to_le_bytes()); // written
    }
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

fn push_lfn_entries(out: &mut Vec<u8>, name: &str, short: &[u8; 11]) {
    // lfn_units succeeded for this name while sizing the directory.
    let mut units = lfn_units(name).unwrap_or_default();
    let count = units.len().div_ceil(LFN_UNITS_PER_ENTRY);
    units.resize(count * LFN_UNITS_PER_ENTRY, 0xFFFF);
    let checksum = lfn_checksum(short);
    for seq in (1..=count).rev() {
        let part = &units[(seq - 1) * LFN_UNITS_PER_ENTRY..seq * LFN_UNITS_PER_ENTRY];
        let mut e = [0u8; DIR_ENTRY_SIZE];
        e[0] = seq as u8 | if seq == count { LFN_LAST } else { 0 };
        e[11] = ATTR_LFN;
        e[13] = checksum;
        let slots = (1..11)
            .step_by(2)
            .chain((14..26).step_by(2))
            .chain((28..32).step_by(2));
        for (unit, at) in part.iter().zip(slots) {
            e[at..at + 2].copy_from_slice(&unit.to_le_bytes());
        }
        out.extend_from_slice(&e);
    }
}

fn dir_bytes(nodes: &[Node], i: usize, label: &[u8; 11]) -> Vec<u8> {
    let n = &nodes[i];
    let mut out = Vec::with_capacity(n.size as usize);
    match n.parent {
        None => out.extend_from_slice(&short_entry(label, ATTR_VOLUME_ID, 0, 0, false)),
        Some(p) => {
            out.extend_from_slice(&short_entry(
                b".          ",
                ATTR_DIRECTORY,
                n.first_cluster,
                0,
                true,
            ));
            // `..` of a directory in the root points at cluster 0 by definition.
            let parent_cluster = if nodes[p].parent.is_none() {
                0
            } else {
                nodes[p].first_cluster
            };
            out.extend_from_slice(&short_entry(
                b"..         ",
                ATTR_DIRECTORY,
                parent_cluster,
                0,
                true,
            ));
        }
    }
    for &c in &n.children {
        let child = &nodes[c];
        push_lfn_entries(&mut out, &child.name, &child.short_name);
        let (attr, size) = match child.file {
            Some((size, _)) => (0, size as u32),
            None => (ATTR_DIRECTORY, 0),
        };
        out.extend_from_slice(&short_entry(
            &child.short_name,
            attr,
            child.first_cluster,
            size,
            true,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ESP_SECTORS: u64 = 262144;

    fn test_node_files(kernel: u64, loader: u64, params: Option<u64>) -> Vec<FatFileSpec> {
        let mut v = vec![
            FatFileSpec {
                path: "EFI/metropolis/boot-a.efi".into(),
                size: kernel,
                source: 0,
            },
            FatFileSpec {
                path: "EFI/BOOT/BOOTx64.EFI".into(),
                size: loader,
                source: 1,
            },
        ];
        if let Some(p) = params {
            v.push(FatFileSpec {
                path: "metropolis/parameters.pb".into(),
                size: p,
                source: 2,
            });
        }
        v
    }

    #[test]
    fn geometry_of_a_128_mib_esp() {
        let fs = Fat32::plan(
            ESP_SECTORS,
            0x1234_5678,
            "MNGN_BOOT",
            &test_node_files(1, 1, None),
        )
        .unwrap();
        assert_eq!(fs.fat_sectors, 2017);
        assert_eq!(fs.fat_entries, 258104);
        assert_eq!(fs.cluster_offset(2), 4042 * 512);
        let bs = fs.boot_sector();
        assert_eq!(&bs[3..11], b"MONOGON\0");
        assert_eq!(&bs[71..82], b"MNGN_BOOT  ");
        assert_eq!(&bs[82..90], b"FAT32   ");
        assert_eq!(
            u32::from_le_bytes(bs[67..71].try_into().unwrap()),
            0x1234_5678
        );
    }

    #[test]
    fn allocation_order_and_fsinfo_match_the_spec_example() {
        // The spec's HA test input: an 18000123-byte kernel and a 151234-byte loader.
        let fs = Fat32::plan(
            ESP_SECTORS,
            1,
            "MNGN_BOOT",
            &test_node_files(18000123, 151234, Some(10)),
        )
        .unwrap();
        let placed: Vec<(&str, u32)> = fs
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e.first_cluster))
            .collect();
        let kernel_clusters = 18000123u32.div_ceil(512);
        let loader_clusters = 151234u32.div_ceil(512);
        assert_eq!(
            placed,
            [
                ("", 2),
                ("EFI", 3),
                ("EFI/metropolis", 4),
                ("EFI/metropolis/boot-a.efi", 5),
                ("EFI/BOOT", 5 + kernel_clusters),
                ("EFI/BOOT/BOOTx64.EFI", 6 + kernel_clusters),
                ("metropolis", 6 + kernel_clusters + loader_clusters),
                (
                    "metropolis/parameters.pb",
                    7 + kernel_clusters + loader_clusters
                ),
            ]
        );
        let fs = Fat32::plan(
            ESP_SECTORS,
            1,
            "MNGN_BOOT",
            &test_node_files(18000123, 151234, None),
        )
        .unwrap();
        assert_eq!(fs.entries_used - 2, 35457);
        assert_eq!(fs.free_count(), 222645);
        assert_eq!(fs.next_free(), 35460);
        let fsi = fs.fsinfo();
        assert_eq!(&fsi[0..4], b"RRaA");
        assert_eq!(&fsi[484..488], b"rrAa");
        assert_eq!(
            u32::from_le_bytes(fsi[488..492].try_into().unwrap()),
            222645
        );
        assert_eq!(u32::from_le_bytes(fsi[492..496].try_into().unwrap()), 35460);
        assert_eq!(&fsi[510..], &[0x55, 0xAA]);
    }

    #[test]
    fn short_names() {
        assert_eq!(pass_through_name("BOOT-A.EFI"), Some(*b"BOOT-A  EFI"));
        assert_eq!(pass_through_name("BOOTX64.EFI"), Some(*b"BOOTX64 EFI"));
        assert_eq!(pass_through_name("EFI"), Some(*b"EFI        "));
        assert_eq!(pass_through_name("METROPOLIS"), None);
        assert_eq!(pass_through_name("PARAMETERS.PB"), None);
        assert_eq!(
            pass_through_name("A.B.C"),
            Some(*b"A       B.C"),
            "upstream's extension class quirk"
        );
        assert_eq!(pass_through_name("A B.TXT"), None);

        let files = test_node_files(1, 1, Some(1));
        let fs = Fat32::plan(ESP_SECTORS, 1, "MNGN_BOOT", &files).unwrap();
        let names: Vec<&str> = fs.entries.iter().map(|e| e.short_name.as_str()).collect();
        assert_eq!(
            names,
            [
                "",
                "EFI",
                "METR0000",
                "BOOT-A.EFI",
                "BOOT",
                "BOOTX64.EFI",
                "METR0000",
                "PARA0000.PB"
            ]
        );
    }

    #[test]
    fn lossy_names_count_per_directory_and_skip_nothing_taken() {
        let files: Vec<FatFileSpec> = [
            "some long name.txt",
            "another.config",
            "x.tar.gz",
            "Ünïcode",
        ]
        .iter()
        .map(|n| FatFileSpec {
            path: (*n).into(),
            size: 0,
            source: 0,
        })
        .collect();
        let fs = Fat32::plan(ESP_SECTORS, 1, "L", &files).unwrap();
        let names: Vec<&str> = fs
            .entries
            .iter()
            .skip(1)
            .map(|e| e.short_name.as_str())
            .collect();
        assert_eq!(names[..3], ["SOME0000.TXT", "ANOT0001.CON", "XTAR0002.GZ"]);
        // Empty files take no cluster.
        assert!(
            fs.entries
                .iter()
                .skip(1)
                .all(|e| e.first_cluster == 0 && e.clusters == 0)
        );
    }

    #[test]
    fn lfn_entries_and_checksum() {
        let mut out = Vec::new();
        let short = *b"BOOT-A  EFI";
        push_lfn_entries(&mut out, "boot-a.efi", &short);
        assert_eq!(out.len(), 32);
        assert_eq!(out[0], 0x41);
        assert_eq!(out[11], 0x0F);
        assert_eq!(out[13], lfn_checksum(&short));
        assert_eq!(&out[1..3], &[b'b', 0]);
        // "boot-a.efi" is 10 units + terminator, then 0xFFFF fill.
        assert_eq!(&out[28..30], &[0xFF, 0xFF]);
        assert_eq!(&out[24..26], &[0, 0]);
        // A 13-character name needs a second entry for its terminator.
        let mut out = Vec::new();
        push_lfn_entries(&mut out, "abcdefghijklm", b"ABCD0000   ");
        assert_eq!(out.len(), 64);
        assert_eq!(out[0], 0x42);
        assert_eq!(
            &out[1..5],
            &[0, 0, 0xFF, 0xFF],
            "terminator first, highest sequence first"
        );
        assert_eq!(out[32], 0x01);
        assert_eq!(&out[33..37], &[b'a', 0, b'b', 0]);
    }

    #[test]
    fn size_limits() {
        assert!(matches!(
            Fat32::plan(60000, 1, "L", &test_node_files(1, 1, None)),
            Err(Error::EspTooSmall { .. })
        ));
        assert!(matches!(
            Fat32::plan(
                ESP_SECTORS,
                1,
                "L",
                &test_node_files(ESP_SECTORS * 512, 1, None)
            ),
            Err(Error::EspContentTooLarge(_))
        ));
        // The smallest ESP upstream accepts still works.
        Fat32::plan(66557, 1, "L", &test_node_files(1, 1, None)).unwrap();
    }
}
