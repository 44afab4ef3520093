// SPDX-License-Identifier: Apache-2.0

//! `pread`: sequential `pread` of a file through the page cache — the limit
//! any block backend serving that file can reach, measured the same way.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use serde::Serialize;

use super::BenchError;
use super::args::PreadArgs;

/// Result of a `pread` run.
#[derive(Debug, Serialize)]
pub struct PreadReport {
    pub file: String,
    pub bs: u64,
    pub offset: u64,
    pub length: u64,
    pub runtime_s: f64,
    pub ops: u64,
    pub bytes: u64,
    pub iops: f64,
    pub mib_s: f64,
}

impl PreadReport {
    pub fn text(&self) -> String {
        format!(
            "pread {} bs={}: {:.0} MiB/s, {:.0} IOPS, {} ops in {:.2} s\n",
            self.file, self.bs, self.mib_s, self.iops, self.ops, self.runtime_s
        )
    }
}

/// Reads `[offset, offset + length)` of the file over and over, `bs` at a
/// time into one reused buffer, for `runtime`.
pub fn run(args: &PreadArgs) -> Result<PreadReport, BenchError> {
    let io = |context: String| move |source| BenchError::Io { context, source };
    let file = File::open(&args.file).map_err(io(format!("opening {}", args.file.display())))?;
    let size = file
        .metadata()
        .map_err(io(format!("stat {}", args.file.display())))?
        .len();
    let length = args.length.unwrap_or(size.saturating_sub(args.offset)) / args.bs * args.bs;
    if length == 0 || args.offset + length > size {
        return Err(BenchError::Io {
            context: format!(
                "region {}+{} of {}",
                args.offset,
                length,
                args.file.display()
            ),
            source: std::io::Error::other(format!(
                "outside the file ({size} bytes) or shorter than bs"
            )),
        });
    }
    let mut buf = vec![0u8; args.bs as usize];
    let (mut ops, mut pos) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < args.runtime {
        file.read_exact_at(&mut buf, args.offset + pos)
            .map_err(io(format!("reading {}", args.file.display())))?;
        ops += 1;
        pos = (pos + args.bs) % length;
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = ops * args.bs;
    Ok(PreadReport {
        file: args.file.display().to_string(),
        bs: args.bs,
        offset: args.offset,
        length,
        runtime_s: secs,
        ops,
        bytes,
        iops: ops as f64 / secs,
        mib_s: bytes as f64 / secs / f64::from(1 << 20),
    })
}
