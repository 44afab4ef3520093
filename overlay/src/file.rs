//! The overlay file, one job per module: [`lock`] opens and locks it,
//! [`open`] opens an overlay for serving, [`create`] lays out a new one,
//! [`check`] reads its header and map back and checks them,
//! [`recorded_chain`] reads and matches the layers its header records,
//! [`reclaim`] frees space after a crash, [`info`] reports on an overlay
//! and [`reset`] empties one that no server holds.

mod check;
mod create;
mod info;
mod lock;
mod open;
mod reclaim;
mod recorded_chain;
mod reset;

pub(super) use check::{read_header, zero_map_crc};
pub(super) use create::{new_header, write_new};
#[cfg(test)]
pub(super) use lock::tests;
pub(super) use lock::{Access, open_file, open_locked};
pub(super) use recorded_chain::{absolute_paths, resolve_chain};
