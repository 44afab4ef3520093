//! The `ociblk` command line.

pub mod cache;
pub mod command_line;
pub mod export;
pub mod inspect;
pub mod launch;
pub mod layout_args;
pub mod overlay;
pub mod pull;
pub mod qemu_command;
pub mod serve;
pub mod serve_args;
pub mod verify;

use clap::{Parser, Subcommand};

/// Serve Monogon OS node disks computed from an OCI OS image to QEMU over
/// vhost-user-blk, with a copy-on-write overlay per node.
#[derive(Debug, Parser)]
#[command(name = "ociblk", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the image, the partition table, the ESP's files and the extent map.
    Inspect(inspect::InspectArgs),
    /// Write the node disk (with an overlay: as the node sees it) to a sparse raw file.
    Export(export::ExportArgs),
    /// Serve the node disk to QEMU over vhost-user-blk, writes going to an overlay.
    Serve(serve_args::ServeArgs),
    /// Inspect, reset, freeze or verify an overlay or a frozen layer.
    Overlay(overlay::OverlayArgs),
    /// Check every chunk of every payload against the image's chunk hashes
    /// (fetching a registry image's missing chunks into the cache first).
    Verify(verify::VerifyArgs),
    /// Launch a test cluster: per node an ociblk serve backend and a QEMU guest.
    Launch(launch::LaunchArgs),
    /// Print the QEMU command line `launch` runs for a node, one argument a line.
    QemuCommand(qemu_command::QemuCommandArgs),
    /// Fetch every chunk of a registry image into the host cache.
    Pull(pull::PullArgs),
    /// Show or shrink the host cache of registry images.
    Cache(cache::CacheArgs),
}
