// SPDX-License-Identifier: Apache-2.0

//! Command line of `ociblk-bench`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ociblk_layout::parse_size;

/// Load generator for vhost-user-blk backends: drives a socket the way a guest's
/// virtio-blk driver does and reports IOPS, bandwidth and latency.
#[derive(Debug, Parser)]
#[command(name = "ociblk-bench", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a workload and report its throughput and latency.
    Run(RunArgs),
    /// Read the whole disk sequentially; print its size and SHA-256.
    Dump(DumpArgs),
    /// Read a file sequentially with pread through the page cache into a shared
    /// memfd region like the client's guest memory: the limit for a backend serving
    /// that file.
    Pread(PreadArgs),
}

/// Options of `pread`.
#[derive(Clone, Debug, Args)]
pub struct PreadArgs {
    /// File to read.
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
    /// Bytes per read.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    pub bs: u64,
    /// Threads, each reading its own slice of the region (like `run --queues`).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// The destination is as large as the guest memory of `run --queues THREADS
    /// --iodepth N` with the same --bs; reads take its bs-sized buffers in turn.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=8192))]
    pub iodepth: u32,
    /// Start of the region.
    #[arg(long, value_name = "BYTES", default_value = "0", value_parser = parse_size)]
    pub offset: u64,
    /// Length of the region [default: to the end of the file].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub length: Option<u64>,
    /// Measure for this long.
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = parse_seconds)]
    pub runtime: Duration,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The I/O pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Rw {
    /// Sequential reads (each queue walks its own slice of the region, wrapping).
    Read,
    /// Reads at random bs-aligned offsets.
    Randread,
    /// Sequential writes (each queue walks its own slice of the region, wrapping).
    Write,
    /// Writes at random bs-aligned offsets.
    Randwrite,
    /// Random reads and writes, --rwmix-read percent of them reads.
    Mixed,
}

impl Rw {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Randread => "randread",
            Rw::Write => "write",
            Rw::Randwrite => "randwrite",
            Rw::Mixed => "mixed",
        }
    }

    /// Whether offsets are random (otherwise sequential).
    pub fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Mixed)
    }
}

/// Options shared by every subcommand that connects.
#[derive(Clone, Debug, Args)]
pub struct ConnectArgs {
    /// The backend's vhost-user socket.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Bound on connecting, each vhost-user message and each request.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    pub timeout: Duration,
}

/// Options of `run`.
#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// I/O pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    pub rw: Rw,
    /// Percentage of reads with --rw mixed.
    #[arg(long, value_name = "PCT", default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmix_read: u8,
    /// Bytes per request (suffixes K, M, G: powers of 1024).
    #[arg(long, value_name = "SIZE", default_value = "4K", value_parser = parse_size)]
    pub bs: u64,
    /// Requests kept in flight on each queue.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8192))]
    pub iodepth: u32,
    /// Queues to use, each driven by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub queues: u16,
    /// Measure for this long, after --ramp [default: 10 without --size].
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, conflicts_with = "size")]
    pub runtime: Option<Duration>,
    /// Measure until this many bytes were transferred, split across the queues.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub size: Option<u64>,
    /// Start of the region, in bytes (a multiple of 512).
    #[arg(long, value_name = "BYTES", default_value = "0", value_parser = parse_size)]
    pub offset: u64,
    /// Length of the region, in bytes [default: to the end of the disk].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub length: Option<u64>,
    /// Send a FLUSH after every N writes on each queue (it takes an iodepth slot);
    /// 0 never flushes.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub flush_every: u64,
    /// Seed for offsets, the read/write mix and the write pattern.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// Run the workload this long before measuring.
    #[arg(long, value_name = "SECONDS", default_value = "0", value_parser = parse_seconds)]
    pub ramp: Duration,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Free text copied into the report.
    #[arg(long, value_name = "STR")]
    pub label: Option<String>,
    /// PID of the server process: its CPU time (all threads, from /proc/PID/stat) over
    /// the run is reported beside the client's, per GiB and per request, and the job
    /// is marked client-bound when the client used more.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
}

/// Options of `dump`.
#[derive(Clone, Debug, Args)]
pub struct DumpArgs {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Bytes per read request.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    pub bs: u64,
    /// Queues to spread the reads over.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub queues: u16,
    /// Reads in flight on each queue.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub iodepth: u32,
    /// Also write the disk's content to this file.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Parses a duration in seconds (decimals allowed).
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("1"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        parse_seconds("-1").unwrap_err();
        parse_seconds("soon").unwrap_err();
    }

    #[test]
    fn command_line() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "ociblk-bench",
            "run",
            "--socket",
            "/s",
            "--rw",
            "mixed",
            "--bs",
            "64K",
            "--size",
            "8M",
        ])
        .expect("parses");
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(
            (run.rw, run.bs, run.size),
            (Rw::Mixed, 65536, Some(8 << 20))
        );
        assert_eq!((run.iodepth, run.queues, run.rwmix_read), (1, 1, 70));
        Cli::try_parse_from([
            "ociblk-bench",
            "run",
            "--socket",
            "/s",
            "--size",
            "1M",
            "--runtime",
            "1",
        ])
        .unwrap_err();
    }
}
