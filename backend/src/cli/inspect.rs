//! `ociblk inspect`: what the node disk will hold.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use ociblk_layout::{Layout, OsImage, SECTOR_SIZE};
use serde_json::json;

use super::layout_args::LayoutArgs;

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let (loaded, layout) = args.layout.load()?;
    let image = &loaded.image;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &to_json(image, &layout))?;
        writeln!(out)?;
    } else {
        print_text(&mut out, image, &layout)?;
    }
    Ok(())
}

pub fn to_json(image: &OsImage, layout: &Layout) -> serde_json::Value {
    let esp = &layout.esp;
    json!({
        "image": image.dir,
        "manifest_digest": image.manifest_digest.to_string(),
        "product_info": image.product_info,
        "payloads": image.payloads,
        "disk": {
            "size": layout.size,
            "sectors": layout.size / SECTOR_SIZE,
            "guid": layout.ids.disk.to_string(),
            "fingerprint": layout.fingerprint_hex(),
        },
        "partitions": layout.partitions.iter().enumerate().map(|(i, p)| json!({
            "number": i + 1,
            "name": p.name,
            "type_guid": p.type_guid.to_string(),
            "guid": p.guid.to_string(),
            "first_lba": p.first_lba,
            "last_lba": p.last_lba,
            "size": p.size(),
        })).collect::<Vec<_>>(),
        "esp": {
            "volume_id": format!("{:08X}", esp.volume_id),
            "total_sectors": esp.total_sectors,
            "fat_sectors": esp.fat_sectors,
            "clusters_used": esp.entries_used - 2,
            "free_clusters": esp.free_count(),
            "entries": esp.entries,
        },
        "sources": layout.sources,
        "extents": layout.extents.summary(),
    })
}

fn print_text(out: &mut impl Write, image: &OsImage, layout: &Layout) -> std::io::Result<()> {
    let pi = &image.product_info;
    writeln!(out, "Image      {}", image.dir.display())?;
    writeln!(
        out,
        "Product    {} {} ({}, variant {})",
        pi.name, pi.version, pi.id, pi.variant
    )?;
    writeln!(
        out,
        "Commit     {} {}{}",
        pi.commit_hash,
        pi.commit_date,
        if pi.build_tree_dirty { " (dirty)" } else { "" }
    )?;
    writeln!(out, "Manifest   {}", image.manifest_digest)?;
    writeln!(out, "\nPayloads")?;
    for p in &image.payloads {
        writeln!(
            out,
            "  {:<12} {:>12} bytes  {}  {}",
            p.name, p.size, p.media_type, p.digest
        )?;
    }
    writeln!(
        out,
        "\nDisk       {} bytes ({} sectors), GUID {}",
        layout.size,
        layout.size / SECTOR_SIZE,
        layout.ids.disk
    )?;
    writeln!(out, "Fingerprint {}", layout.fingerprint_hex())?;
    writeln!(
        out,
        "\n  #  {:<22} {:<38} {:<38} {:>10} {:>10} {:>12}",
        "name", "type", "GUID", "first LBA", "last LBA", "size"
    )?;
    for (i, p) in layout.partitions.iter().enumerate() {
        writeln!(
            out,
            "  {}  {:<22} {:<38} {:<38} {:>10} {:>10} {:>12}",
            i + 1,
            p.name,
            p.type_guid.to_string(),
            p.guid.to_string(),
            p.first_lba,
            p.last_lba,
            p.size()
        )?;
    }
    let esp = &layout.esp;
    writeln!(
        out,
        "\nESP (FAT32, volume ID {:08X}): {} sectors, FAT {} sectors x 2, {} clusters used, {} free",
        esp.volume_id,
        esp.total_sectors,
        esp.fat_sectors,
        esp.entries_used - 2,
        esp.free_count()
    )?;
    for e in &esp.entries {
        let path = if e.path.is_empty() {
            "/".to_owned()
        } else {
            format!("/{}{}", e.path, if e.directory { "/" } else { "" })
        };
        writeln!(
            out,
            "  {:<32} {:<13} {:>10} bytes  clusters {}+{}",
            path, e.short_name, e.size, e.first_cluster, e.clusters
        )?;
    }
    let s = layout.extents.summary();
    writeln!(
        out,
        "\nExtents    {} metadata ({} bytes), {} file-backed ({} bytes), {} zero ({} bytes)",
        s.metadata_extents,
        s.metadata_bytes,
        s.file_extents,
        s.file_bytes,
        s.zero_extents,
        s.zero_bytes
    )?;
    Ok(())
}
