//! Prepares a fork of a saved cluster the way `ociblk launch --from
//! SNAPDIR --state-dir NEW` does before it starts anything, and prints
//! how long that took as one JSON object. `hack/bench --only-fork` runs
//! it to measure what a fork costs per node.
//!
//! ```text
//! fork_prepare SNAPDIR NEW            # snapshot::prepare_fork: overlays and state files
//! fork_prepare SNAPDIR NEW --disk     # only each node's new overlay (layer::create_over)
//! ```
//!
//! `seconds` covers `prepare_fork` (or the `create_over` calls) alone;
//! reading `cluster.json` is `load_seconds`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ociblk_launch::OVERLAY_FILE;
use ociblk_launch::snapshot;
use ociblk_overlay::layer;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (snapshot_dir, state_dir, disk_only) = match args.as_slice() {
        [snap, state] => (PathBuf::from(snap), PathBuf::from(state), false),
        [snap, state, flag] if flag == "--disk" => {
            (PathBuf::from(snap), PathBuf::from(state), true)
        }
        _ => bail!("usage: fork_prepare SNAPDIR NEW [--disk]"),
    };
    let t0 = Instant::now();
    let saved = snapshot::load(&snapshot_dir)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    if disk_only {
        create_overlays(&saved, &state_dir)?;
    } else {
        snapshot::prepare_fork(&saved, &snapshot_dir, &state_dir)
            .with_context(|| format!("forking {}", snapshot_dir.display()))?
            .keep();
    }
    let seconds = t1.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "nodes": saved.nodes.len(),
            "seconds": seconds,
            "load_seconds": load_seconds,
            "disk_only": disk_only,
        })
    );
    Ok(())
}

/// The disk part of `prepare_fork`: per node a directory and a new
/// overlay over its chain of layers, nothing else.
fn create_overlays(saved: &snapshot::SnapshotSpec, state_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    for node in &saved.nodes {
        let dir = state_dir.join(&node.name);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let overlay = dir.join(OVERLAY_FILE);
        layer::create_over(&overlay, &node.layers)
            .with_context(|| format!("node {}: creating {}", node.name, overlay.display()))?;
    }
    Ok(())
}
