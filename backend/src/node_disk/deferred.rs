//! An overlay opened only at the disk's first use: the destination of a
//! live migration.

use std::io;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use ociblk_overlay::{Overlay, OverlayConfig, OverlayError};
use tracing::{error, info};

/// How often a deferred overlay open tries the lock again.
const LOCK_RETRY: Duration = Duration::from_millis(10);

/// An overlay opened (and locked) only when the disk is first used, for
/// a server that takes a node over from another server still holding the
/// overlay: the destination of a live migration. Until then the server
/// answers the frontend's handshake from the layout alone. The first
/// request waits up to `wait` for the lock; once that time has passed,
/// each request tries once and fails with an I/O error while the overlay
/// is still locked.
#[derive(Debug)]
pub struct DeferredOverlay {
    path: PathBuf,
    cfg: OverlayConfig,
    layers: Option<Vec<PathBuf>>,
    wait: Duration,
    /// When the disk was first needed; held while opening, so that one
    /// thread opens and the others wait for it.
    first_need: Mutex<Option<Instant>>,
}

impl DeferredOverlay {
    /// The overlay at `path` (see [`Overlay::open_over`] for `cfg` and
    /// `layers`), opened read-write at the first use of the disk, waiting
    /// up to `wait` for its lock.
    pub fn new(
        path: PathBuf,
        cfg: OverlayConfig,
        layers: Option<Vec<PathBuf>>,
        wait: Duration,
    ) -> Self {
        DeferredOverlay {
            path,
            cfg,
            layers,
            wait,
            first_need: Mutex::new(None),
        }
    }

    /// Opens the overlay into `slot` unless another thread did.
    pub(super) fn open_into<'a>(&self, slot: &'a OnceLock<Overlay>) -> io::Result<&'a Overlay> {
        let mut first_need = self
            .first_need
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(overlay) = slot.get() {
            return Ok(overlay);
        }
        let deadline = *first_need.get_or_insert_with(Instant::now) + self.wait;
        let waited = Instant::now();
        loop {
            match Overlay::open_over(&self.path, self.cfg.clone(), self.layers.as_deref()) {
                Ok(overlay) => {
                    info!(
                        overlay = %self.path.display(),
                        waited = ?waited.elapsed(),
                        "overlay opened at the disk's first use"
                    );
                    return Ok(slot.get_or_init(|| overlay));
                }
                Err(OverlayError::Locked { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(LOCK_RETRY);
                }
                Err(e) => {
                    error!(overlay = %self.path.display(), "cannot open the overlay: {e}");
                    return Err(io::Error::other(format!(
                        "overlay {}: {e}",
                        self.path.display()
                    )));
                }
            }
        }
    }
}
