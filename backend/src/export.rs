//! Materialising a computed disk as a sparse raw file.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use ociblk_layout::{Content, DiskReader};

use crate::iobuf::IoBufs;
use crate::overlay::{BlockState, Overlay};
use crate::sys;
use crate::verifier::Verifiers;

/// Bytes written by [`export_disk`].
#[derive(Debug, Default, Clone, Copy)]
pub struct ExportStats {
    /// Payload bytes copied from source files.
    pub copied: u64,
    /// Generated metadata bytes written.
    pub generated: u64,
}

/// Writes the disk of `reader` to `out`: the file gets the disk's size, zero
/// extents stay holes, payload ranges are copied with `copy_file_range`
/// (reflinked where the file system can). Payload sources that `verifiers`
/// covers are hashed chunk by chunk before each chunk's bytes are copied; a
/// mismatch stops the export with an error naming the chunk. `progress`
/// gets copied byte counts.
pub fn export_disk(
    reader: &DiskReader,
    verifiers: &Verifiers,
    out: &File,
    mut progress: impl FnMut(u64),
) -> io::Result<ExportStats> {
    let map = &reader.layout.extents;
    out.set_len(0)?;
    out.set_len(map.size())?;
    let mut stats = ExportStats::default();
    let mut buf = Vec::new();
    for e in map.extents() {
        match e.content {
            Content::Zero => {}
            Content::File { source, offset } => {
                let file = &reader.files[source];
                match verifiers.get(source) {
                    None => copy_range(file, offset, out, e.start, e.len, &mut progress)?,
                    Some(v) => {
                        let end = offset + e.len;
                        for c in v.hashes().chunks_touching(offset..end) {
                            let chunk = v.hashes().range(c);
                            let (from, to) = (chunk.start.max(offset), chunk.end.min(end));
                            v.verify(file, c)?;
                            let at = e.start + (from - offset);
                            copy_range(file, from, out, at, to - from, &mut progress)?;
                        }
                    }
                }
                stats.copied += e.len;
            }
            Content::Metadata { .. } | Content::FatChain { .. } => {
                buf.resize(e.len as usize, 0);
                reader.read_at(e.start, &mut buf)?;
                out.write_all_at(&buf, e.start)?;
                stats.generated += e.len;
            }
        }
    }
    out.sync_all()?;
    Ok(stats)
}

fn copy_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
    progress: &mut impl FnMut(u64),
) -> io::Result<()> {
    const CHUNK: usize = 64 << 20;
    let mut done = 0;
    while done < len {
        let want = usize::try_from(len - done).map_or(CHUNK, |n| n.min(CHUNK));
        let (s, d) = (src_off + done, dst_off + done);
        match sys::copy_file_range(src.as_fd(), s, dst.as_fd(), d, want) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("source ended {} bytes early", len - done),
                ));
            }
            Ok(n) => {
                done += n as u64;
                progress(n as u64);
            }
            // Not supported across these files: fall back to plain copies.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                ) =>
            {
                return copy_plain(src, s, dst, d, len - done, progress);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn copy_plain(
    src: &File,
    mut s: u64,
    dst: &File,
    mut d: u64,
    mut left: u64,
    progress: &mut impl FnMut(u64),
) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], s)?;
        dst.write_all_at(&buf[..n], d)?;
        (s, d, left) = (s + n as u64, d + n as u64, left - n as u64);
        progress(n as u64);
    }
    Ok(())
}

/// Applies `overlay` on top of an exported base disk in `out`: written
/// blocks are copied in, zeroed blocks become holes. Returns the bytes copied.
pub fn apply_overlay(overlay: &Overlay, out: &File) -> io::Result<u64> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut copied = 0;
    for run in overlay.runs(0, overlay.disk_size()) {
        match run.state {
            BlockState::Base => {}
            BlockState::Data => {
                let mut done = 0;
                while done < run.len {
                    let n = (run.len - done).min(CHUNK) as usize;
                    overlay.read_data(
                        run.offset + done,
                        &IoBufs::from_slice(&mut buf[..n]),
                        0,
                        n,
                    )?;
                    out.write_all_at(&buf[..n], run.offset + done)?;
                    done += n as u64;
                }
                copied += run.len;
            }
            BlockState::Zero => punch_hole(out, run.offset, run.len)?,
        }
    }
    out.sync_all()?;
    Ok(copied)
}

/// Deallocates a range so it reads as zeros; writes zeros where the file
/// system cannot punch holes.
fn punch_hole(out: &File, offset: u64, len: u64) -> io::Result<()> {
    match sys::punch_hole(out.as_fd(), offset, len) {
        Err(e) if sys::unsupported(&e) => {}
        other => return other,
    }
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        out.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}
