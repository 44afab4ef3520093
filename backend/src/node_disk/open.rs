//! The one way a node's disk is put together, for `serve`, `export` and
//! `verify`: the image's payload store, then the overlay.
//!
//! The payloads are opened first: the overlay may be a new file, and a
//! payload that cannot be opened must not leave one behind.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ociblk_layout::{DiskReader, Layout};
use ociblk_overlay::{FlushMode, Overlay, OverlayConfig, OverlayError};

use super::DeferredOverlay;
use crate::image_source::LoadedImage;
use crate::payload::{PayloadOptions, Payloads};

/// How the node's overlay is to be opened.
#[derive(Debug, Clone)]
pub enum OverlayRequest {
    /// Read-write, created when missing.
    ReadWrite {
        path: PathBuf,
        flush: FlushMode,
        /// The layers under it, bottom first (`None`: those it records).
        layers: Option<Vec<PathBuf>>,
    },
    /// Read-only and locked shared: it must exist, and is never modified.
    ReadOnly {
        path: PathBuf,
        layers: Option<Vec<PathBuf>>,
    },
    /// Read-write at the disk's first use, waiting up to `wait` for a
    /// server that still holds it (see [`DeferredOverlay`]).
    Deferred {
        path: PathBuf,
        flush: FlushMode,
        layers: Option<Vec<PathBuf>>,
        wait: Duration,
    },
}

/// The overlay as opened.
#[derive(Debug)]
pub enum OverlayOpening {
    None,
    Open(Overlay),
    Deferred(DeferredOverlay),
}

/// A node's disk, taken apart: what [`NodeDisk`](super::NodeDisk) serves,
/// and what an export copies.
#[derive(Debug)]
pub struct DiskParts {
    pub layout: Layout,
    pub payloads: Arc<Payloads>,
    pub overlay: OverlayOpening,
}

/// Why a node's disk could not be put together.
#[derive(Debug, thiserror::Error)]
pub enum OpenDiskError {
    #[error("cannot open the image's payloads")]
    Layout(#[source] ociblk_layout::Error),
    #[error("cannot open the overlay")]
    Overlay(#[source] OverlayError),
}

/// Opens the disk `layout` describes for `image`: its payload store with
/// the layers `payloads` asks for, then the overlay `overlay` asks for.
pub fn open_parts(
    image: &LoadedImage,
    layout: Layout,
    payloads: PayloadOptions,
    overlay: Option<OverlayRequest>,
) -> Result<DiskParts, OpenDiskError> {
    let reader = DiskReader::open(layout).map_err(OpenDiskError::Layout)?;
    let (layout, payloads) = Payloads::open(reader, image, payloads);
    let cfg = |flush| OverlayConfig {
        disk_size: layout.size,
        fingerprint: layout.fingerprint,
        flush,
    };
    let overlay = match overlay {
        None => OverlayOpening::None,
        Some(OverlayRequest::ReadWrite {
            path,
            flush,
            layers,
        }) => OverlayOpening::Open(
            Overlay::open_over(&path, cfg(flush), layers.as_deref())
                .map_err(OpenDiskError::Overlay)?,
        ),
        Some(OverlayRequest::ReadOnly { path, layers }) => OverlayOpening::Open(
            Overlay::open_read_only_over(&path, cfg(FlushMode::Unsafe), layers.as_deref())
                .map_err(OpenDiskError::Overlay)?,
        ),
        Some(OverlayRequest::Deferred {
            path,
            flush,
            layers,
            wait,
        }) => OverlayOpening::Deferred(DeferredOverlay::new(path, cfg(flush), layers, wait)),
    };
    Ok(DiskParts {
        layout,
        payloads: Arc::new(payloads),
        overlay,
    })
}
