// SPDX-License-Identifier: Apache-2.0

//! The workload runner: one connection, one thread per queue, each keeping `iodepth`
//! requests in flight and recording their latencies.
//!
//! The hot loop reuses everything it owns (the in-flight table, the completion vector,
//! the write buffer, the histograms) and shares nothing but one abort flag between
//! threads; kicks are batched per refill. Reads land in buffers reserved once in the
//! client's guest memory, `iodepth` per queue, taken in turn (the one free the longest
//! first): the data stays there, as it would in a guest, and is not copied out; a
//! completion allocates nothing. (`dump` and the tests read the data out and check it.)
//!
//! CPU time of this process and, with `--server-pid`, of the server is sampled right
//! before the queue threads start and right after they end ([`super::cpu`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;

use super::args::{RunArgs, Rw};
use super::cpu::{CpuReport, CpuSample};
use super::histogram::Histogram;
use super::pattern::WritePattern;
use super::report::{Latency, RunReport, rates};
use super::{BenchError, client_options, connect, is_read_only};
use crate::rng::Rng;
use crate::{BlkQueue, BlkStatus, Completion, GuestBuffer, Request, SECTOR_SIZE, Token};

/// Runtime when neither `--runtime` nor `--size` is given.
pub const DEFAULT_RUNTIME: Duration = Duration::from_secs(10);

/// Longest single sleep on the call eventfd, so that an abort by another thread and
/// the per-request timeout are noticed promptly.
const MAX_WAIT: Duration = Duration::from_millis(100);

/// When a thread stops submitting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// After this long of measuring.
    Runtime(Duration),
    /// After this many bytes of measured requests (across all queues).
    Size(u64),
}

/// A validated workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// The pattern.
    pub rw: Rw,
    /// Percentage of reads (mixed).
    pub rwmix_read: u8,
    /// Bytes per request.
    pub bs: u64,
    /// Requests in flight per queue.
    pub iodepth: u32,
    /// Queues.
    pub queues: u16,
    /// When to stop.
    pub stop: Stop,
    /// Start of the region.
    pub offset: u64,
    /// Length of the region, a multiple of `bs`.
    pub length: u64,
    /// FLUSH after every this many writes per queue (0: never).
    pub flush_every: u64,
    /// Seed.
    pub seed: u64,
    /// Unmeasured warm-up.
    pub ramp: Duration,
    /// Bound on each request.
    pub timeout: Duration,
}

impl Job {
    /// Checks `args` against a disk of `disk_size` bytes.
    pub fn new(args: &RunArgs, disk_size: u64) -> Result<Self, BenchError> {
        let invalid = |why: String| Err(BenchError::Invalid(why));
        let bs = args.bs;
        if bs == 0 || !bs.is_multiple_of(SECTOR_SIZE) {
            return invalid(format!(
                "bs {bs} is not a positive multiple of {SECTOR_SIZE}"
            ));
        }
        if !args.offset.is_multiple_of(SECTOR_SIZE) {
            return invalid(format!(
                "offset {} is not a multiple of {SECTOR_SIZE}",
                args.offset
            ));
        }
        if args.offset >= disk_size {
            return invalid(format!(
                "offset {} is beyond the disk ({disk_size} bytes)",
                args.offset
            ));
        }
        let available = disk_size - args.offset;
        let length = args.length.unwrap_or(available);
        if length > available {
            return invalid(format!(
                "region {}+{length} extends beyond the disk ({disk_size} bytes)",
                args.offset
            ));
        }
        let length = length / bs * bs;
        let blocks = length / bs;
        if blocks == 0 {
            return invalid(format!("the region holds no whole {bs}-byte block"));
        }
        if !args.rw.is_random() && blocks < u64::from(args.queues) {
            return invalid(format!(
                "the region holds {blocks} blocks of {bs} bytes, too few for {} sequential \
                 queues",
                args.queues
            ));
        }
        let stop = match (args.runtime, args.size) {
            (Some(_), Some(_)) => return invalid("--runtime and --size exclude each other".into()),
            (_, Some(size)) if size < bs => {
                return invalid(format!("size {size} is smaller than bs {bs}"));
            }
            (_, Some(size)) => Stop::Size(size),
            (Some(runtime), None) if runtime.is_zero() => {
                return invalid("runtime must be positive".into());
            }
            (Some(runtime), None) => Stop::Runtime(runtime),
            (None, None) => Stop::Runtime(DEFAULT_RUNTIME),
        };
        if args.connect.timeout.is_zero() {
            return invalid("timeout must be positive".into());
        }
        Ok(Self {
            rw: args.rw,
            rwmix_read: args.rwmix_read.min(100),
            bs,
            iodepth: args.iodepth.max(1),
            queues: args.queues.max(1),
            stop,
            offset: args.offset,
            length,
            flush_every: args.flush_every,
            seed: args.seed,
            ramp: args.ramp,
            timeout: args.connect.timeout,
        })
    }

    /// Whether the workload reads.
    pub fn reads(&self) -> bool {
        reads(self.rw, self.rwmix_read)
    }

    /// Whether the workload writes.
    pub fn writes(&self) -> bool {
        match self.rw {
            Rw::Read | Rw::Randread => false,
            Rw::Write | Rw::Randwrite => true,
            Rw::Mixed => self.rwmix_read < 100,
        }
    }

    /// Blocks (of `bs`) in the region.
    fn blocks(&self) -> u64 {
        self.length / self.bs
    }

    /// Where queue `q` works: first block and block count. Sequential patterns give
    /// each queue its own slice; random ones share the region.
    fn slice(&self, q: u16) -> (u64, u64) {
        let blocks = self.blocks();
        if self.rw.is_random() {
            return (0, blocks);
        }
        let n = u64::from(self.queues);
        let per = blocks / n;
        let first = per * u64::from(q);
        let count = if u64::from(q) + 1 == n {
            blocks - first
        } else {
            per
        };
        (first, count)
    }

    /// Measured requests queue `q` issues with `--size`.
    fn quota(&self, q: u16) -> Option<u64> {
        let Stop::Size(size) = self.stop else {
            return None;
        };
        let ops = size.div_ceil(self.bs);
        let n = u64::from(self.queues);
        Some(ops / n + u64::from(u64::from(q) < ops % n))
    }
}

/// Whether pattern `rw` with `rwmix_read` percent of reads (mixed) reads.
pub fn reads(rw: Rw, rwmix_read: u8) -> bool {
    match rw {
        Rw::Read | Rw::Randread => true,
        Rw::Write | Rw::Randwrite => false,
        Rw::Mixed => rwmix_read > 0,
    }
}

/// The read buffers of one queue, reserved once in guest memory: a read takes the one
/// that has been free the longest and gives it back when it completes, so reads rotate
/// through all of them (as a guest's reads land all over its memory) without any
/// allocation or copy.
#[derive(Debug, Default)]
struct ReadBuffers {
    free: VecDeque<GuestBuffer>,
}

impl ReadBuffers {
    fn new(buffers: Vec<GuestBuffer>) -> Self {
        Self {
            free: buffers.into(),
        }
    }

    /// The buffer free the longest, if any is free.
    fn take(&mut self) -> Option<GuestBuffer> {
        self.free.pop_front()
    }

    /// Gives back a buffer whose read completed (or was never submitted).
    fn give(&mut self, buffer: GuestBuffer) {
        self.free.push_back(buffer);
    }
}

/// What a request in flight is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

/// A request in flight.
#[derive(Clone, Copy, Debug)]
struct Slot {
    token: Token,
    start: Instant,
    op: Op,
    offset: u64,
    /// The reserved buffer a read lands in.
    buffer: Option<GuestBuffer>,
}

impl Slot {
    fn describe(&self, bs: u64) -> String {
        match self.op {
            Op::Read => format!("read of {bs} bytes at {}", self.offset),
            Op::Write => format!("write of {bs} bytes at {}", self.offset),
            Op::Flush => "flush".to_string(),
        }
    }
}

/// What one queue's thread measured.
#[derive(Debug)]
struct QueueResult {
    read: Histogram,
    write: Histogram,
    flush: Histogram,
    errors: u64,
    first_error: Option<String>,
    /// Reads and writes completed OK, ramp included (what the CPU time paid for).
    all_ops: u64,
    measure_start: Instant,
    last_completion: Option<Instant>,
    kicks: u64,
    calls: u64,
}

/// Lets the queue threads start together; unlike a barrier, waiting ends when the run
/// is aborted (e.g. because a thread could not be started).
#[derive(Debug)]
struct StartGate {
    arrived: AtomicUsize,
    expected: usize,
}

impl StartGate {
    fn new(expected: usize) -> Self {
        Self {
            arrived: AtomicUsize::new(0),
            expected,
        }
    }

    /// Waits until every thread arrived (true) or the run is aborted (false).
    fn pass(&self, abort: &AtomicBool) -> bool {
        self.arrived.fetch_add(1, Ordering::AcqRel);
        while self.arrived.load(Ordering::Acquire) < self.expected {
            if abort.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        true
    }
}

/// Drives one queue.
struct Worker<'a> {
    queue: &'a mut BlkQueue,
    job: &'a Job,
    index: u16,
    abort: &'a AtomicBool,
    rng: Rng,
    pattern: Option<WritePattern>,
    first_block: u64,
    blocks: u64,
    next_seq: u64,
    writes_since_flush: u64,
    read_buffers: ReadBuffers,
    in_flight: Vec<Slot>,
    done: Vec<Completion>,
    result: QueueResult,
}

impl<'a> Worker<'a> {
    fn new(
        queue: &'a mut BlkQueue,
        job: &'a Job,
        abort: &'a AtomicBool,
    ) -> Result<Self, BenchError> {
        let index = queue.index();
        let (first_block, blocks) = job.slice(index);
        let bs = usize::try_from(job.bs)
            .map_err(|_| BenchError::Invalid(format!("bs {} does not fit memory", job.bs)))?;
        let depth = job.iodepth as usize;
        queue.set_auto_kick(false);
        let read_buffers = if job.reads() {
            let len = u32::try_from(job.bs)
                .map_err(|_| BenchError::Invalid(format!("bs {} exceeds a request", job.bs)))?;
            ReadBuffers::new(
                queue
                    .reserve_buffers(depth, len)
                    .map_err(BenchError::on_queue(index, "reserving read buffers"))?,
            )
        } else {
            ReadBuffers::default()
        };
        Ok(Self {
            queue,
            job,
            index,
            abort,
            rng: Rng::for_stream(job.seed, u64::from(index)),
            pattern: job.writes().then(|| WritePattern::new(bs, job.seed)),
            first_block,
            blocks,
            next_seq: 0,
            writes_since_flush: 0,
            read_buffers,
            in_flight: Vec::with_capacity(depth),
            done: Vec::with_capacity(depth),
            result: QueueResult {
                read: Histogram::new(),
                write: Histogram::new(),
                flush: Histogram::new(),
                errors: 0,
                first_error: None,
                all_ops: 0,
                measure_start: Instant::now(),
                last_completion: None,
                kicks: 0,
                calls: 0,
            },
        })
    }

    /// The next data request: its kind and byte offset.
    #[inline]
    fn next_data(&mut self) -> (Op, u64) {
        let job = self.job;
        let block = if job.rw.is_random() {
            self.rng.below(self.blocks)
        } else {
            let b = self.next_seq;
            self.next_seq = if b + 1 == self.blocks { 0 } else { b + 1 };
            b
        };
        let op = match job.rw {
            Rw::Read | Rw::Randread => Op::Read,
            Rw::Write | Rw::Randwrite => Op::Write,
            Rw::Mixed => {
                if self.rng.below(100) < u64::from(job.rwmix_read) {
                    Op::Read
                } else {
                    Op::Write
                }
            }
        };
        (op, job.offset + (self.first_block + block) * job.bs)
    }

    /// Submits one request (a flush if one is due, else the next data request).
    #[inline]
    fn submit_next(&mut self, now: Instant) -> Result<Op, BenchError> {
        let job = self.job;
        let (op, offset) = if job.flush_every > 0 && self.writes_since_flush >= job.flush_every {
            (Op::Flush, 0)
        } else {
            self.next_data()
        };
        let mut buffer = None;
        let request = match op {
            Op::Read => {
                // iodepth buffers for at most iodepth reads in flight: one is free.
                let Some(free) = self.read_buffers.take() else {
                    return Err(BenchError::Invalid(format!(
                        "queue {}: no free read buffer",
                        self.index
                    )));
                };
                buffer = Some(free);
                Request::ReadInto {
                    offset,
                    buffer: free,
                }
            }
            Op::Write => {
                self.writes_since_flush += 1;
                let data = match self.pattern.as_mut() {
                    Some(p) => p.stamp(offset),
                    None => return Err(BenchError::Invalid("write without a pattern".into())),
                };
                Request::Write { offset, data }
            }
            Op::Flush => {
                self.writes_since_flush = 0;
                Request::Flush
            }
        };
        let token = match self.queue.submit(request) {
            Ok(token) => token,
            Err(error) => {
                if let Some(buffer) = buffer {
                    self.read_buffers.give(buffer);
                }
                return Err(BenchError::Client {
                    context: format!("queue {}: submitting {op:?} at {offset}", self.index),
                    error,
                });
            }
        };
        self.in_flight.push(Slot {
            token,
            start: now,
            op,
            offset,
            buffer,
        });
        Ok(op)
    }

    /// Accounts for the completions in `self.done`, all reaped at `now`.
    fn finish(&mut self, now: Instant, measure_start: Instant) -> Result<(), BenchError> {
        for completion in self.done.drain(..) {
            let Some(pos) = self
                .in_flight
                .iter()
                .position(|s| s.token == completion.token)
            else {
                return Err(BenchError::Invalid(format!(
                    "queue {}: completion for {:?}, which is not in flight",
                    self.index, completion.token
                )));
            };
            let slot = self.in_flight.swap_remove(pos);
            if let Some(buffer) = slot.buffer {
                self.read_buffers.give(buffer);
            }
            if completion.status != BlkStatus::Ok {
                self.result.errors += 1;
                if self.result.first_error.is_none() {
                    self.result.first_error = Some(format!(
                        "queue {}: {} completed with status {:?}",
                        self.index,
                        slot.describe(self.job.bs),
                        completion.status
                    ));
                }
                self.abort.store(true, Ordering::Relaxed);
                continue;
            }
            if slot.op != Op::Flush {
                self.result.all_ops += 1;
            }
            if slot.start < measure_start {
                continue;
            }
            let nanos =
                u64::try_from(now.duration_since(slot.start).as_nanos()).unwrap_or(u64::MAX);
            match slot.op {
                Op::Read => self.result.read.record(nanos),
                Op::Write => self.result.write.record(nanos),
                Op::Flush => self.result.flush.record(nanos),
            }
            self.result.last_completion = Some(now);
        }
        Ok(())
    }

    /// Sleeps on the call eventfd, bounded; fails if the oldest request is overdue.
    fn wait(&mut self) -> Result<(), BenchError> {
        let Some(oldest) = self.in_flight.iter().min_by_key(|s| s.start).copied() else {
            return Ok(());
        };
        let overdue_at = oldest.start + self.job.timeout;
        let now = Instant::now();
        if now >= overdue_at {
            return Err(BenchError::Timeout {
                queue: self.index,
                what: oldest.describe(self.job.bs),
                timeout: self.job.timeout,
            });
        }
        let wait = (overdue_at - now).min(MAX_WAIT);
        self.queue
            .wait_call(wait)
            .map_err(BenchError::on_queue(self.index, "waiting"))?;
        Ok(())
    }

    /// Runs the workload once every queue's thread is ready (`gate`), so that all of
    /// them measure the same interval.
    fn run(mut self, gate: &StartGate) -> Result<QueueResult, BenchError> {
        let job = self.job;
        if !gate.pass(self.abort) {
            return Ok(self.result);
        }
        let start = Instant::now();
        self.result.measure_start = start + job.ramp;
        let measure_start = self.result.measure_start;
        let deadline = match job.stop {
            Stop::Runtime(d) => Some(measure_start + d),
            Stop::Size(_) => None,
        };
        let quota = job.quota(self.index);
        let depth = job.iodepth as usize;
        let mut measured_issued = 0u64;
        let mut stopping = quota == Some(0);
        loop {
            if !stopping {
                let mut now = Instant::now();
                let mut submitted = false;
                while self.in_flight.len() < depth {
                    if self.abort.load(Ordering::Relaxed)
                        || deadline.is_some_and(|d| now >= d)
                        || quota.is_some_and(|q| measured_issued >= q)
                    {
                        stopping = true;
                        break;
                    }
                    let op = self.submit_next(now)?;
                    submitted = true;
                    if op != Op::Flush && now >= measure_start {
                        measured_issued += 1;
                    }
                    now = Instant::now();
                }
                if submitted {
                    self.queue
                        .kick()
                        .map_err(BenchError::on_queue(self.index, "kick"))?;
                }
            }
            if self.in_flight.is_empty() {
                if stopping {
                    break;
                }
                continue;
            }
            let reaped = self
                .queue
                .poll_completions(&mut self.done)
                .map_err(BenchError::on_queue(self.index, "reaping"))?;
            if reaped == 0 {
                self.wait()?;
                continue;
            }
            self.finish(Instant::now(), measure_start)?;
        }
        let stats = self.queue.stats();
        self.result.kicks = stats.kicks;
        self.result.calls = stats.calls;
        Ok(self.result)
    }
}

/// Connects to `args.connect.socket`, runs the workload and reports. Requests that
/// complete with an error status are counted in [`RunReport::errors`]; transport
/// failures and timeouts are errors.
pub fn run(args: &RunArgs) -> Result<RunReport, BenchError> {
    // A read into a reserved buffer takes no data block per request, so the memory for
    // requests in flight holds the reserved buffers; a job that also writes needs both.
    let reserved = if args.rw == Rw::Mixed && reads(args.rw, args.rwmix_read) {
        args.iodepth
    } else {
        0
    };
    let opts = client_options(
        args.queues,
        args.iodepth,
        args.bs,
        reserved,
        args.connect.timeout,
    )?;
    let mut client = connect(&args.connect.socket, opts, args.bs)?;
    let disk_size = client.config().capacity_bytes();
    let job = Job::new(args, disk_size)?;
    if job.writes() && is_read_only(&client) {
        return Err(BenchError::Invalid(format!(
            "--rw {} writes, but the device is read-only",
            job.rw.name()
        )));
    }
    if job.flush_every > 0 && job.writes() && !client.has_feature(VIRTIO_BLK_F_FLUSH) {
        return Err(BenchError::Invalid(
            "--flush-every needs VIRTIO_BLK_F_FLUSH, which the device does not offer".into(),
        ));
    }

    let abort = AtomicBool::new(false);
    let workers = client
        .queues_mut()
        .iter_mut()
        .map(|queue| Worker::new(queue, &job, &abort))
        .collect::<Result<Vec<_>, _>>()?;
    let gate = StartGate::new(workers.len());
    let cpu_before = CpuSample::take(args.server_pid)?;
    let results = std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(workers.len());
        let mut first_err = None;
        for worker in workers {
            let spawned = std::thread::Builder::new()
                .name(format!("bench-q{}", worker.index))
                .spawn_scoped(scope, || {
                    let result = worker.run(&gate);
                    if result.is_err() {
                        // Stop the other queues now rather than when they are joined.
                        abort.store(true, Ordering::Relaxed);
                    }
                    result
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    abort.store(true, Ordering::Relaxed);
                    first_err = Some(BenchError::Thread(e.to_string()));
                    break;
                }
            }
        }
        let mut results = Vec::with_capacity(handles.len());
        for handle in handles {
            match handle.join() {
                Ok(Ok(r)) => results.push(r),
                Ok(Err(e)) => {
                    abort.store(true, Ordering::Relaxed);
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    abort.store(true, Ordering::Relaxed);
                    first_err.get_or_insert(BenchError::Thread("a queue thread panicked".into()));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(results),
        }
    })?;
    let cpu_after = CpuSample::take(args.server_pid)?;
    let all_ops: u64 = results.iter().map(|r| r.all_ops).sum();
    let cpu = CpuReport::between(&cpu_before, &cpu_after, all_ops, all_ops * job.bs);
    let report = summarise(&job, disk_size, &results, args.label.clone(), cpu);
    client
        .disconnect()
        .map_err(BenchError::client("disconnecting"))?;
    Ok(report)
}

fn summarise(
    job: &Job,
    disk_size: u64,
    results: &[QueueResult],
    label: Option<String>,
    cpu: CpuReport,
) -> RunReport {
    let mut read = Histogram::new();
    let mut write = Histogram::new();
    let mut flush = Histogram::new();
    let (mut errors, mut kicks, mut calls) = (0, 0, 0);
    let mut first_error = None;
    let mut end = None;
    for r in results {
        read.merge(&r.read);
        write.merge(&r.write);
        flush.merge(&r.flush);
        errors += r.errors;
        kicks += r.kicks;
        calls += r.calls;
        if first_error.is_none() {
            first_error.clone_from(&r.first_error);
        }
        end = end.max(r.last_completion);
    }
    // The threads started within microseconds of each other; measure from the first.
    let measure_start = results.iter().map(|r| r.measure_start).min();
    let runtime_s = match (measure_start, end) {
        (Some(s), Some(e)) => e.saturating_duration_since(s).as_secs_f64(),
        _ => 0.0,
    };
    let mut all = read.clone();
    all.merge(&write);
    let (read_ops, write_ops) = (read.count(), write.count());
    let (read_bytes, write_bytes) = (read_ops * job.bs, write_ops * job.bs);
    let (iops, mib_s) = rates(read_ops + write_ops, read_bytes + write_bytes, runtime_s);
    let (read_iops, read_mib_s) = rates(read_ops, read_bytes, runtime_s);
    let (write_iops, write_mib_s) = rates(write_ops, write_bytes, runtime_s);
    RunReport {
        label,
        rw: job.rw.name().to_string(),
        rwmix_read: (job.rw == Rw::Mixed).then_some(job.rwmix_read),
        bs: job.bs,
        iodepth: job.iodepth,
        queues: job.queues,
        offset: job.offset,
        length: job.length,
        disk_size,
        flush_every: job.flush_every,
        seed: job.seed,
        ramp_s: job.ramp.as_secs_f64(),
        runtime_s,
        ops: read_ops + write_ops,
        bytes: read_bytes + write_bytes,
        read_ops,
        read_bytes,
        write_ops,
        write_bytes,
        flushes: flush.count(),
        iops,
        mib_s,
        read_iops,
        read_mib_s,
        write_iops,
        write_mib_s,
        errors,
        first_error,
        lat_us: Latency::from_nanos(&all),
        read_lat_us: Latency::from_nanos(&read),
        write_lat_us: Latency::from_nanos(&write),
        flush_lat_us: Latency::from_nanos(&flush),
        kicks,
        calls,
        cpu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::args::{Cli, Command};
    use clap::Parser;

    fn job(extra: &[&str], disk: u64) -> Result<Job, BenchError> {
        let mut argv = vec!["ociblk-bench", "run", "--socket", "/s"];
        argv.extend_from_slice(extra);
        let Command::Run(args) = Cli::try_parse_from(argv).expect("parses").command else {
            panic!("not run");
        };
        Job::new(&args, disk)
    }

    #[test]
    fn regions_slices_and_quotas() {
        let j = job(&["--rw", "read", "--queues", "3", "--size", "40K"], 1 << 20).expect("job");
        assert_eq!((j.offset, j.length), (0, 1 << 20));
        assert_eq!(j.slice(0), (0, 85));
        assert_eq!(j.slice(2), (170, 86));
        assert_eq!(
            (j.quota(0), j.quota(1), j.quota(2)),
            (Some(4), Some(3), Some(3))
        );
        assert!(!j.writes());

        let j = job(
            &[
                "--rw",
                "randwrite",
                "--offset",
                "4K",
                "--length",
                "10K",
                "--queues",
                "2",
            ],
            1 << 20,
        )
        .expect("job");
        assert_eq!((j.length, j.slice(1)), (8192, (0, 2)));
        assert_eq!(j.stop, Stop::Runtime(DEFAULT_RUNTIME));
        assert!(j.writes());
        assert!(
            !job(&["--rw", "mixed", "--rwmix-read", "100"], 1 << 20)
                .expect("job")
                .writes()
        );
    }

    #[test]
    fn reads_rotate_through_every_buffer() {
        let buffer = |i: u64| GuestBuffer {
            addr: 0x10000 + i * 4096,
            len: 4096,
        };
        let mut buffers = ReadBuffers::new((0..3).map(buffer).collect());
        let (a, b) = (buffers.take(), buffers.take());
        assert_eq!((a, b), (Some(buffer(0)), Some(buffer(1))));
        // Buffer 0 completes first, but buffer 2 has been free longer.
        buffers.give(buffer(0));
        assert_eq!(buffers.take(), Some(buffer(2)));
        assert_eq!(buffers.take(), Some(buffer(0)));
        // All three in flight: none is free, and none is handed out twice.
        assert_eq!(buffers.take(), None);
        buffers.give(buffer(1));
        assert_eq!(buffers.take(), Some(buffer(1)));
        // One read at a time over two buffers: each lands where the one before did not.
        let mut qd1 = ReadBuffers::new((0..2).map(buffer).collect());
        let mut previous = None;
        for _ in 0..6 {
            let next = qd1.take().expect("a free buffer");
            assert_ne!(Some(next), previous);
            qd1.give(next);
            previous = Some(next);
        }
        assert!(ReadBuffers::default().take().is_none());
    }

    #[test]
    fn bad_regions_are_rejected() {
        for extra in [
            &["--offset", "1M"][..],
            &["--offset", "100"],
            &["--length", "2M"],
            &["--bs", "1000"],
            &["--bs", "4K", "--length", "2K"],
            &["--size", "1K"],
            &["--runtime", "0"],
            &["--rw", "read", "--queues", "4", "--length", "12K"],
        ] {
            assert!(
                matches!(job(extra, 1 << 20), Err(BenchError::Invalid(_))),
                "{extra:?}"
            );
        }
    }
}
