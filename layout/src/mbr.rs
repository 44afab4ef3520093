//! The protective MBR in LBA 0 of a GPT disk, as upstream writes it.

use crate::SECTOR_SIZE;

/// Logical CHS address of `lba` with 255 heads and 63 sectors per track,
/// saturating to `FF FF FF` past cylinder 1023.
fn chs(lba: u64) -> [u8; 3] {
    const MAX_CYLINDER: u64 = 1023;
    const HEADS: u64 = 255;
    const SECTORS: u64 = 62; // sectors are 1-based, so 62 per track in the math
    let (mut cyl, mut head, mut sec) = (
        lba / (HEADS * SECTORS),
        (lba / SECTORS) % HEADS,
        lba % SECTORS + 1,
    );
    if cyl > MAX_CYLINDER {
        (cyl, head, sec) = (MAX_CYLINDER, HEADS, SECTORS + 1);
    }
    [
        head as u8,
        (sec as u8) | ((cyl >> 2) as u8 & 0xC0),
        cyl as u8,
    ]
}

/// The protective MBR of a disk of `sectors` sectors: one partition of type
/// 0xEE from LBA 1 over the whole disk (capped at 2^32 - 1 sectors).
pub fn protective_mbr(sectors: u64) -> [u8; SECTOR_SIZE as usize] {
    let mut m = [0u8; SECTOR_SIZE as usize];
    let rec = &mut m[446..462];
    rec[0] = 0x00; // not bootable
    rec[1..4].copy_from_slice(&chs(1));
    rec[4] = 0xEE;
    // Upstream's quirk: the end CHS is computed for LBA N+1.
    rec[5..8].copy_from_slice(&chs(sectors + 1));
    rec[8..12].copy_from_slice(&1u32.to_le_bytes());
    let represented = sectors.min(u64::from(u32::MAX)) as u32;
    rec[12..16].copy_from_slice(&represented.wrapping_sub(1).to_le_bytes());
    m[510] = 0x55;
    m[511] = 0xAA;
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_chs_matches_spec_examples() {
        assert_eq!(chs(1), [0x00, 0x02, 0x00]);
        assert_eq!(chs(5505024 + 1), [0x32, 0x6E, 0x5C]);
        assert_eq!(chs(10485760 + 1), [0x3C, 0x8C, 0x97]);
        assert_eq!(chs(1u64 << 40), [0xFF, 0xFF, 0xFF]);
    }

    #[test]
    fn protective_record() {
        let m = protective_mbr(10485760);
        assert!(m[..446].iter().all(|&b| b == 0));
        assert_eq!(
            &m[446..462],
            &[
                0, 0, 2, 0, 0xEE, 0x3C, 0x8C, 0x97, 1, 0, 0, 0, 0xFF, 0xFF, 0x9F, 0
            ]
        );
        assert!(m[462..510].iter().all(|&b| b == 0));
        assert_eq!(&m[510..], &[0x55, 0xAA]);
        // Capped for disks past 2 TiB.
        let big = protective_mbr(1 << 33);
        assert_eq!(&big[458..462], &0xFFFF_FFFEu32.to_le_bytes());
    }
}
