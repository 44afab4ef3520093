// SPDX-License-Identifier: Apache-2.0

//! Benchmark results: what `run` and `dump` print, as text or as one JSON object.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::cpu::CpuReport;
use super::histogram::Histogram;

/// Bytes in a MiB.
const MIB: f64 = (1u64 << 20) as f64;

/// Latency summary in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Smallest.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    /// Summarises a histogram of nanoseconds.
    pub fn from_nanos(h: &Histogram) -> Self {
        let us = |ns: f64| ns / 1000.0;
        Self {
            min: us(h.min() as f64),
            mean: us(h.mean()),
            p50: us(h.percentile(50.0)),
            p90: us(h.percentile(90.0)),
            p99: us(h.percentile(99.0)),
            p99_9: us(h.percentile(99.9)),
            max: us(h.max() as f64),
        }
    }

    fn line(&self) -> String {
        format!(
            "min {:.1}  mean {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            self.min, self.mean, self.p50, self.p90, self.p99, self.p99_9, self.max
        )
    }
}

/// Result of `ociblk-bench run`. Counts cover the measured phase (after the ramp);
/// `ops` and `bytes` are reads plus writes, flushes are counted apart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// `--label`, if given.
    pub label: Option<String>,
    /// The pattern: read, randread, write, randwrite or mixed.
    pub rw: String,
    /// Percentage of reads (mixed only).
    pub rwmix_read: Option<u8>,
    /// Bytes per request.
    pub bs: u64,
    /// Requests in flight per queue.
    pub iodepth: u32,
    /// Queues (and threads).
    pub queues: u16,
    /// Start of the region.
    pub offset: u64,
    /// Length of the region (a multiple of `bs`).
    pub length: u64,
    /// Size of the disk.
    pub disk_size: u64,
    /// FLUSH after this many writes per queue (0: never).
    pub flush_every: u64,
    /// The seed.
    pub seed: u64,
    /// Seconds of unmeasured warm-up.
    pub ramp_s: f64,
    /// Seconds measured: from the end of the ramp to the last completion.
    pub runtime_s: f64,
    /// Reads and writes completed.
    pub ops: u64,
    /// Bytes read and written.
    pub bytes: u64,
    /// Reads completed.
    pub read_ops: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Writes completed.
    pub write_ops: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Reads and writes per second.
    pub iops: f64,
    /// MiB per second, reads and writes.
    pub mib_s: f64,
    /// Reads per second.
    pub read_iops: f64,
    /// MiB read per second.
    pub read_mib_s: f64,
    /// Writes per second.
    pub write_iops: f64,
    /// MiB written per second.
    pub write_mib_s: f64,
    /// Requests the device completed with a status other than OK (any phase).
    pub errors: u64,
    /// The first such request, described.
    pub first_error: Option<String>,
    /// Latency of reads and writes.
    pub lat_us: Latency,
    /// Latency of reads.
    pub read_lat_us: Latency,
    /// Latency of writes.
    pub write_lat_us: Latency,
    /// Latency of flushes.
    pub flush_lat_us: Latency,
    /// Kick eventfd writes (whole run, ramp included).
    pub kicks: u64,
    /// Call eventfd wake-ups consumed (whole run, ramp included).
    pub calls: u64,
    /// CPU time of the client and the server over the whole run, ramp included.
    pub cpu: CpuReport,
}

/// Per-second rates of `ops` and `bytes` over `seconds`.
pub fn rates(ops: u64, bytes: u64, seconds: f64) -> (f64, f64) {
    if seconds > 0.0 {
        (ops as f64 / seconds, bytes as f64 / MIB / seconds)
    } else {
        (0.0, 0.0)
    }
}

impl RunReport {
    /// Human-readable rendering.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let label = self
            .label
            .as_deref()
            .map(|l| format!(" [{l}]"))
            .unwrap_or_default();
        let mix = self
            .rwmix_read
            .map(|p| format!(" ({p}% reads)"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{}{mix}: bs {} iodepth {} queues {}, region {}+{} of {} bytes{label}",
            self.rw, self.bs, self.iodepth, self.queues, self.offset, self.length, self.disk_size
        );
        let _ = writeln!(
            s,
            "  runtime   {:.3} s (after {:.3} s ramp)",
            self.runtime_s, self.ramp_s
        );
        let _ = writeln!(
            s,
            "  IOPS      {:.0}  (read {:.0}, write {:.0})",
            self.iops, self.read_iops, self.write_iops
        );
        let _ = writeln!(
            s,
            "  bandwidth {:.2} MiB/s  (read {:.2}, write {:.2})",
            self.mib_s, self.read_mib_s, self.write_mib_s
        );
        let _ = writeln!(
            s,
            "  total     {} ops, {} bytes  (read {}, write {}, flush {})",
            self.ops, self.bytes, self.read_ops, self.write_ops, self.flushes
        );
        let _ = writeln!(s, "  lat (us)  {}", self.lat_us.line());
        if self.read_ops > 0 && self.write_ops > 0 {
            let _ = writeln!(s, "  read      {}", self.read_lat_us.line());
            let _ = writeln!(s, "  write     {}", self.write_lat_us.line());
        }
        if self.flushes > 0 {
            let _ = writeln!(s, "  flush     {}", self.flush_lat_us.line());
        }
        let _ = writeln!(s, "  notify    {} kicks, {} calls", self.kicks, self.calls);
        let _ = writeln!(s, "  cpu       {}", self.cpu.line());
        let _ = write!(s, "  errors    {}", self.errors);
        if let Some(first) = &self.first_error {
            let _ = write!(s, " (first: {first})");
        }
        s.push('\n');
        s
    }
}

/// Result of `ociblk-bench dump`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DumpReport {
    /// Disk size in bytes.
    pub size: u64,
    /// SHA-256 of the disk's content, lowercase hex.
    pub sha256: String,
    /// Bytes per read.
    pub bs: u64,
    /// Queues used.
    pub queues: u16,
    /// Reads in flight per queue.
    pub iodepth: u32,
    /// Seconds taken.
    pub seconds: f64,
    /// MiB read per second.
    pub mib_s: f64,
    /// Where the content was written, if anywhere.
    pub output: Option<String>,
}

impl DumpReport {
    /// Human-readable rendering: `size` and `sha256` lines, `sha256sum`-style.
    pub fn text(&self) -> String {
        let mut s = format!("size {}\nsha256 {}\n", self.size, self.sha256);
        let _ = writeln!(
            s,
            "read in {:.3} s ({:.1} MiB/s, bs {}, {} queues x iodepth {})",
            self.seconds, self.mib_s, self.bs, self.queues, self.iodepth
        );
        if let Some(out) = &self.output {
            let _ = writeln!(s, "written to {out}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_in_microseconds() {
        let mut h = Histogram::new();
        for ns in [10_000, 20_000, 30_000] {
            h.record(ns);
        }
        let l = Latency::from_nanos(&h);
        assert_eq!((l.min, l.max), (10.0, 30.0));
        assert!((l.mean - 20.0).abs() < 1e-9);
        assert!((l.p50 - 20.0).abs() / 20.0 < 0.01);
        assert_eq!(rates(10, 10 << 20, 2.0), (5.0, 5.0));
        assert_eq!(rates(10, 10, 0.0), (0.0, 0.0));
    }
}
