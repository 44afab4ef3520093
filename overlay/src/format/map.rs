//! The block-state map's bytes: one [`BlockState`] per 4 KiB block, read
//! and counted a run at a time.

use std::sync::atomic::AtomicU8;

use super::FormatError;
use crate::map::StateCounts;

/// State of one block, as stored in the map (one byte per block).
///
/// A whole byte per entry (rather than 2 bits) lets every entry be
/// published with a plain atomic store and rewritten in place on disk
/// without touching its neighbours; the map costs 1/4096 of the disk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlockState {
    /// Read the base disk. Zero so that a hole in the map means "untouched".
    Base = 0,
    /// Read the overlay's data area.
    Data = 1,
    /// Reads as zeros.
    Zero = 2,
}

impl BlockState {
    /// Decodes a map byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Base),
            1 => Some(Self::Data),
            2 => Some(Self::Zero),
            _ => None,
        }
    }
}

/// Decodes the block-state map, rejecting unknown state bytes.
pub fn parse_map(b: &[u8]) -> Result<Vec<AtomicU8>, FormatError> {
    let mut out = Vec::with_capacity(b.len());
    decode_map(b, 0, &mut out)?;
    Ok(out)
}

/// Checks that every byte of map bytes `b`, which start at block `first`,
/// is a [`BlockState`].
pub(crate) fn check_states(b: &[u8], first: u64) -> Result<(), FormatError> {
    // A maximum, not a search: it runs at memory speed. The bad entry is
    // looked for only when there is one.
    let highest = b.iter().fold(0u8, |m, &v| m.max(v));
    if BlockState::from_u8(highest).is_some() {
        return Ok(());
    }
    match b
        .iter()
        .enumerate()
        .find(|&(_, &v)| BlockState::from_u8(v).is_none())
    {
        Some((i, &value)) => Err(FormatError::BadState {
            block: first + i as u64,
            value,
        }),
        None => Ok(()),
    }
}

/// Appends the states of map bytes `b`, which start at block `first`.
pub(crate) fn decode_map(b: &[u8], first: u64, out: &mut Vec<AtomicU8>) -> Result<(), FormatError> {
    check_states(b, first)?;
    out.extend(b.iter().map(|&v| AtomicU8::new(v)));
    Ok(())
}

/// Adds the blocks of map bytes `b` (starting at block `first`) to
/// `counts`.
pub(crate) fn count_states(
    b: &[u8],
    first: u64,
    counts: &mut StateCounts,
) -> Result<(), FormatError> {
    check_states(b, first)?;
    let data = count_byte(b, BlockState::Data as u8);
    let zero = count_byte(b, BlockState::Zero as u8);
    counts.data += data;
    counts.zero += zero;
    counts.base += b.len() as u64 - data - zero;
    Ok(())
}

/// How many bytes of `b` are `v`: counted in a byte per run of 255, a
/// loop that vectorizes over whole vector registers (a count in a wider
/// type spends most of them widening).
fn count_byte(b: &[u8], v: u8) -> u64 {
    b.chunks(255)
        .map(|run| u64::from(run.iter().fold(0u8, |n, &x| n + u8::from(x == v))))
        .sum()
}
