// SPDX-License-Identifier: Apache-2.0

//! `pread`: sequential `pread` of a file through the page cache into the same kind of
//! destination a backend writes to: a shared memfd mapping the size of the guest
//! memory `ociblk-bench run` would set up for the same threads (queues), iodepth and
//! block size, cut into `bs` buffers that the reads take in turn. This is the limit
//! any backend serving that file can reach, measured the same way.
//!
//! Each thread reads its own slice of the region over and over (as a sequential `run`
//! gives each queue its own slice), into its own share of the buffers.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::args::PreadArgs;
use super::cpu::{CpuReport, CpuSample};
use super::{BenchError, client_options};
use crate::{GUEST_MEMORY_BASE, GuestRam};

/// Result of a `pread` run.
#[derive(Debug, Serialize, Deserialize)]
pub struct PreadReport {
    /// The file read.
    pub file: String,
    /// Bytes per read.
    pub bs: u64,
    /// Threads reading.
    pub threads: u16,
    /// Bytes of the shared memory region the reads land in.
    pub region_bytes: u64,
    /// Buffers of `bs` bytes in the region, taken in turn.
    pub buffers: u64,
    /// Start of the file region.
    pub offset: u64,
    /// Length of the file region.
    pub length: u64,
    /// Seconds measured.
    pub runtime_s: f64,
    /// Reads.
    pub ops: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Reads per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// CPU time of this process (there is no server).
    pub cpu: CpuReport,
}

impl PreadReport {
    /// Human-readable rendering.
    pub fn text(&self) -> String {
        format!(
            "pread {} bs={} threads={} into {} buffers of a {}-byte memfd: {:.0} MiB/s, \
             {:.0} IOPS, {} ops in {:.2} s\n  cpu       {}\n",
            self.file,
            self.bs,
            self.threads,
            self.buffers,
            self.region_bytes,
            self.mib_s,
            self.iops,
            self.ops,
            self.runtime_s,
            self.cpu.line()
        )
    }
}

/// Buffers of thread `thread` out of `threads`, among `buffers` buffers: every
/// `threads`-th one, so that each thread rotates through its own share of the region.
pub fn buffers_of(thread: u64, threads: u64, buffers: u64) -> impl Iterator<Item = u64> {
    (thread..buffers).step_by(threads.max(1) as usize)
}

/// Slice `[first, first + len)` of `length` bytes (whole `bs` blocks) that thread
/// `thread` of `threads` reads.
pub fn slice_of(thread: u64, threads: u64, length: u64, bs: u64) -> (u64, u64) {
    let blocks = length / bs;
    let per = blocks / threads;
    let first = per * thread;
    let count = if thread + 1 == threads {
        blocks - first
    } else {
        per
    };
    (first * bs, count * bs)
}

/// Reads exactly `len` bytes at file offset `offset` into host memory at `addr`.
fn pread_exact(file: &File, addr: usize, len: usize, offset: u64) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let at = i64::try_from(offset + done as u64)
            .map_err(|_| std::io::Error::other("offset beyond i64"))?;
        // SAFETY: `addr..addr + len` lies inside the memfd mapping, which outlives this
        // call, and no other thread reads into this buffer (each has its own).
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                (addr + done) as *mut libc::c_void,
                len - done,
                at,
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        done += n as usize;
    }
    Ok(())
}

/// What one thread did.
struct ThreadResult {
    ops: u64,
    elapsed: Duration,
}

/// What every reading thread shares: the file region, the memory the reads land in,
/// and the gate they start at together.
struct ReadJob<'a> {
    file: &'a File,
    args: &'a PreadArgs,
    /// Length of the file region, in whole `bs` blocks.
    length: u64,
    /// `bs` as a length in memory.
    len: usize,
    /// Host address of the region's first buffer.
    base: usize,
    /// Buffers of `bs` bytes in the region.
    buffers: u64,
    gate: &'a Barrier,
}

/// Opens the file and checks the region `args` names: inside the file, with at least
/// one `bs` block per thread. Returns the file and the region's length in whole blocks.
fn open_region(args: &PreadArgs) -> Result<(File, u64), BenchError> {
    let io = |context: String| move |source| BenchError::Io { context, source };
    let file = File::open(&args.file).map_err(io(format!("opening {}", args.file.display())))?;
    let size = file
        .metadata()
        .map_err(io(format!("stat {}", args.file.display())))?
        .len();
    let bs = args.bs;
    let threads = u64::from(args.threads);
    let length = args.length.unwrap_or(size.saturating_sub(args.offset)) / bs * bs;
    if bs == 0 || length / bs < threads || args.offset + length > size {
        return Err(BenchError::Io {
            context: format!(
                "region {}+{} of {}",
                args.offset,
                length,
                args.file.display()
            ),
            source: std::io::Error::other(format!(
                "outside the file ({size} bytes), or fewer {bs}-byte blocks than threads"
            )),
        });
    }
    Ok((file, length))
}

/// Thread `thread`'s reads: its slice of the region, over and over, into its buffers
/// in turn, from the moment all threads pass the gate until the runtime is up.
fn read_slice(job: &ReadJob<'_>, thread: u64) -> Result<ThreadResult, BenchError> {
    let (args, bs) = (job.args, job.args.bs);
    let threads = u64::from(args.threads);
    let mine: Vec<u64> = buffers_of(thread, threads, job.buffers).collect();
    let (first, span) = slice_of(thread, threads, job.length, bs);
    let (mut ops, mut pos) = (0u64, 0u64);
    job.gate.wait();
    let start = Instant::now();
    while start.elapsed() < args.runtime {
        let buffer = mine[(ops % mine.len() as u64) as usize];
        let addr = job.base + (buffer * bs) as usize;
        pread_exact(job.file, addr, job.len, args.offset + first + pos).map_err(|source| {
            BenchError::Io {
                context: format!("reading {}", args.file.display()),
                source,
            }
        })?;
        ops += 1;
        pos = (pos + bs) % span;
    }
    Ok(ThreadResult {
        ops,
        elapsed: start.elapsed(),
    })
}

/// Runs one [`read_slice`] per thread and collects what each did.
fn run_threads(job: &ReadJob<'_>) -> Result<Vec<ThreadResult>, BenchError> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..u64::from(job.args.threads))
            .map(|t| {
                std::thread::Builder::new()
                    .name(format!("pread-{t}"))
                    .spawn_scoped(scope, move || read_slice(job, t))
            })
            .collect::<Result<_, _>>()
            .map_err(|e| BenchError::Thread(e.to_string()))?;
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| BenchError::Thread("a pread thread panicked".into()))?
            })
            .collect::<Result<Vec<ThreadResult>, BenchError>>()
    })
}

/// Reads `[offset, offset + length)` of the file over and over, `bs` at a time, with
/// `threads` threads, for `runtime`.
pub fn run(args: &PreadArgs) -> Result<PreadReport, BenchError> {
    let (file, length) = open_region(args)?;
    let bs = args.bs;
    let threads = u64::from(args.threads);
    let len = usize::try_from(bs)
        .map_err(|_| BenchError::Invalid(format!("bs {bs} does not fit memory")))?;
    let opts = client_options(args.threads, args.iodepth, bs, 0, Duration::from_secs(1))?;
    let ram = GuestRam::new(opts.memory_size).map_err(BenchError::client("guest memory"))?;
    let region_bytes = ram.size();
    let buffers = region_bytes / bs;
    if buffers < threads {
        return Err(BenchError::Invalid(format!(
            "a {region_bytes}-byte region holds fewer {bs}-byte buffers than threads"
        )));
    }
    let base = ram
        .host_address(GUEST_MEMORY_BASE)
        .map_err(BenchError::client("guest memory"))?;
    let base = usize::try_from(base).map_err(|_| BenchError::Invalid("address".into()))?;

    let gate = Barrier::new(args.threads.into());
    let job = ReadJob {
        file: &file,
        args,
        length,
        len,
        base,
        buffers,
        gate: &gate,
    };
    let before = CpuSample::take(None)?;
    let results = run_threads(&job)?;
    let after = CpuSample::take(None)?;
    let ops: u64 = results.iter().map(|r| r.ops).sum();
    let secs = results
        .iter()
        .map(|r| r.elapsed.as_secs_f64())
        .fold(0.0, f64::max);
    let bytes = ops * bs;
    Ok(PreadReport {
        file: args.file.display().to_string(),
        bs,
        threads: args.threads,
        region_bytes,
        buffers,
        offset: args.offset,
        length,
        runtime_s: secs,
        ops,
        bytes,
        iops: ops as f64 / secs,
        mib_s: bytes as f64 / secs / f64::from(1 << 20),
        cpu: CpuReport::between(&before, &after, ops, bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_share_buffers_and_region_without_overlap() {
        let a: Vec<u64> = buffers_of(0, 2, 7).collect();
        let b: Vec<u64> = buffers_of(1, 2, 7).collect();
        assert_eq!((a, b), (vec![0, 2, 4, 6], vec![1, 3, 5]));
        assert_eq!(buffers_of(0, 1, 3).collect::<Vec<_>>(), [0, 1, 2]);
        // 10 blocks over 3 threads: 3, 3 and the remaining 4.
        assert_eq!(slice_of(0, 3, 10 * 4096, 4096), (0, 3 * 4096));
        assert_eq!(slice_of(1, 3, 10 * 4096, 4096), (3 * 4096, 3 * 4096));
        assert_eq!(slice_of(2, 3, 10 * 4096, 4096), (6 * 4096, 4 * 4096));
    }

    #[test]
    fn reads_land_in_the_shared_region() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("blob");
        let content: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).expect("write");
        let args = PreadArgs {
            file: path,
            bs: 4096,
            threads: 2,
            iodepth: 1,
            offset: 4096,
            length: Some(32 * 1024),
            runtime: Duration::from_millis(20),
            json: false,
        };
        let report = run(&args).expect("pread");
        assert_eq!((report.threads, report.length), (2, 32 * 1024));
        assert!(report.ops > 0);
        assert_eq!(report.bytes, report.ops * 4096);
        assert_eq!(report.buffers, report.region_bytes / 4096);
        assert_eq!(report.cpu.server_s, None);

        // pread_exact itself: the bytes arrive where they were asked to.
        let ram = GuestRam::new(1 << 20).expect("ram");
        let base = ram.host_address(GUEST_MEMORY_BASE).expect("addr") as usize;
        let file = File::open(&args.file).expect("open");
        pread_exact(&file, base + 8192, 4096, 12288).expect("pread");
        let mut got = vec![0u8; 4096];
        vm_memory::Bytes::read_slice(
            ram.mem(),
            &mut got,
            vm_memory::GuestAddress(GUEST_MEMORY_BASE + 8192),
        )
        .expect("read back");
        assert_eq!(got, content[12288..16384]);
        let short = pread_exact(&file, base, 4096, 64 * 1024 - 100).expect_err("beyond the end");
        assert_eq!(short.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
