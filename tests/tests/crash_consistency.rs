//! Crash consistency of the overlay: random writes, discards, write-zeroes
//! and flushes through the Rust client, several in flight on two queues,
//! then `kill -9` of `ociblk serve` at a random point and a restart on the
//! same overlay.
//!
//! A host-side model tracks, per 4 KiB block, every content the block had
//! since the last completed flush. The host stays up, so a write whose
//! completion was published survives the kill whether or not a flush
//! followed: after the restart each block must hold exactly its content as
//! of its last completed request if no request in flight touched it, and
//! otherwise that content or one a request in flight would give it (checked
//! per block, and per sector if a block mixes two of them): never anything
//! else.
//!
//! A variant runs the same rounds on an overlay over a chain of two frozen
//! layers (each holding writes and zeroes over the region), so that reads
//! and partial writes fall through to the layers; the layers must come out
//! byte-identical and verified.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ociblk_client::rng::Rng;
use ociblk_client::{BlkStatus, ClientOptions, Request, Token, VhostBlkClient};
use ociblk_tests::node::TestNode;
use ociblk_tests::process::Server;
use ociblk_tests::support::{ociblk_bin, run_ok};

const BS: u64 = 4096;
const SECTOR: usize = 512;
/// Blocks of the region the rounds work on (2 MiB: half payload, half zeros).
const BLOCKS: u64 = 512;
const ROUNDS: u64 = 150;
/// Rounds of the variant over a chain of layers.
const CHAIN_ROUNDS: u64 = 60;
/// Bound on waiting for completions.
const WAIT: Duration = Duration::from_secs(20);

/// One content a block may hold.
#[derive(Clone)]
struct Version {
    data: Vec<u8>,
    /// Operation that produced it (0: known at the start of the round).
    op: u64,
    /// Completion number once the operation completed.
    done: Option<u64>,
}

/// What the disk region may hold after a crash.
struct Model {
    /// Per block, oldest first: the content as of the last completed flush,
    /// then every content since (the last may be of a request in flight).
    blocks: Vec<Vec<Version>>,
    /// Completions seen so far.
    completed: u64,
}

impl Model {
    fn new(contents: &[u8]) -> Model {
        let blocks = contents
            .chunks(BS as usize)
            .map(|c| {
                vec![Version {
                    data: c.to_vec(),
                    op: 0,
                    done: Some(0),
                }]
            })
            .collect();
        Model {
            blocks,
            completed: 0,
        }
    }

    fn current(&self, block: u64) -> &[u8] {
        &self.blocks[block as usize].last().unwrap().data
    }

    /// Records a submitted write (`data`) or zeroing (`None`) of `len` bytes
    /// at region offset `off`.
    fn submit(&mut self, op: u64, off: u64, len: u64, data: Option<&[u8]>) {
        for b in off / BS..(off + len).div_ceil(BS) {
            let mut content = self.current(b).to_vec();
            let (start, end) = (off.max(b * BS), (off + len).min((b + 1) * BS));
            let dst = &mut content[(start - b * BS) as usize..(end - b * BS) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(start - off) as usize..(end - off) as usize]),
                None => dst.fill(0),
            }
            self.blocks[b as usize].push(Version {
                data: content,
                op,
                done: None,
            });
        }
    }

    /// Records the completion of data operation `op` over `off..off + len`.
    fn complete(&mut self, op: u64, off: u64, len: u64) {
        self.completed += 1;
        for b in off / BS..(off + len).div_ceil(BS) {
            let last = self.blocks[b as usize].last_mut().unwrap();
            assert_eq!(last.op, op, "model: overlapping requests in flight");
            last.done = Some(self.completed);
        }
    }

    /// The server process was killed with the host up: every completed
    /// request is kept as if flushed, only those in flight may still differ.
    fn process_killed(&mut self) {
        for versions in &mut self.blocks {
            if let Some(k) = versions.iter().rposition(|v| v.done.is_some()) {
                versions.drain(..k);
            }
        }
    }

    /// A flush submitted when `mark` completions had been seen has completed:
    /// everything completed by then is durable.
    fn flushed(&mut self, mark: u64) {
        self.completed += 1;
        for versions in &mut self.blocks {
            if let Some(k) = versions
                .iter()
                .rposition(|v| v.done.is_some_and(|d| d <= mark))
            {
                versions.drain(..k);
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Write,
    Discard,
    WriteZeroes { unmap: bool },
    Flush { mark: u64 },
}

struct InFlight {
    op: u64,
    kind: Kind,
    off: u64,
    len: u64,
}

/// Statistics over all rounds.
#[derive(Debug, Default)]
struct Stats {
    rounds: u64,
    ops: u64,
    flushes: u64,
    killed_in_flight: u64,
    killed_after_flush: u64,
    /// Blocks with unflushed changes at a crash, by what they showed.
    showed_newest: u64,
    showed_older: u64,
    showed_mixed_sectors: u64,
}

struct Round<'a> {
    client: VhostBlkClient,
    model: Model,
    rng: Rng,
    /// Disk offset of the region.
    base: u64,
    in_flight: HashMap<(u16, Token), InFlight>,
    next_op: u64,
    stats: &'a mut Stats,
    context: String,
}

impl Round<'_> {
    fn busy_blocks(&self) -> Vec<(u64, u64)> {
        self.in_flight
            .values()
            .filter(|f| !matches!(f.kind, Kind::Flush { .. }))
            .map(|f| (f.off / BS, (f.off + f.len).div_ceil(BS)))
            .collect()
    }

    /// Submits a random data operation on a range no request in flight
    /// touches (so that the order of completions is the order of effects).
    fn submit_data(&mut self) {
        let busy = self.busy_blocks();
        for _ in 0..20 {
            let (off, len) = if self.rng.chance(40) {
                let blocks = self.rng.range(1, 16);
                let first = self.rng.range(0, BLOCKS - blocks);
                (first * BS, blocks * BS)
            } else {
                let sectors = self.rng.range(1, 128);
                let total = BLOCKS * BS / SECTOR as u64;
                let first = self.rng.range(0, total - sectors);
                (first * SECTOR as u64, sectors * SECTOR as u64)
            };
            let (b0, b1) = (off / BS, (off + len).div_ceil(BS));
            if busy.iter().any(|&(s, e)| b0 < e && s < b1) {
                continue;
            }
            let kind = match self.rng.range(0, 9) {
                0 => Kind::Discard,
                1 => Kind::WriteZeroes {
                    unmap: self.rng.chance(50),
                },
                _ => Kind::Write,
            };
            self.next_op += 1;
            let op = self.next_op;
            let queue = (self.rng.next_u64() % 2) as u16;
            let offset = self.base + off;
            let token = match kind {
                Kind::Write => {
                    let data = self.rng.bytes(len as usize);
                    self.model.submit(op, off, len, Some(&data));
                    self.client
                        .submit(
                            queue,
                            Request::Write {
                                offset,
                                data: &data,
                            },
                        )
                        .unwrap()
                }
                Kind::Discard => {
                    self.model.submit(op, off, len, None);
                    self.client
                        .submit(queue, Request::Discard { offset, len })
                        .unwrap()
                }
                Kind::WriteZeroes { unmap } => {
                    self.model.submit(op, off, len, None);
                    let r = Request::WriteZeroes { offset, len, unmap };
                    self.client.submit(queue, r).unwrap()
                }
                Kind::Flush { .. } => unreachable!(),
            };
            self.stats.ops += 1;
            self.in_flight
                .insert((queue, token), InFlight { op, kind, off, len });
            return;
        }
    }

    fn submit_flush(&mut self) {
        let queue = (self.rng.next_u64() % 2) as u16;
        let mark = self.model.completed;
        let token = self.client.submit(queue, Request::Flush).unwrap();
        self.next_op += 1;
        self.stats.flushes += 1;
        self.in_flight.insert(
            (queue, token),
            InFlight {
                op: self.next_op,
                kind: Kind::Flush { mark },
                off: 0,
                len: 0,
            },
        );
    }

    /// Takes whatever completed; with `all`, waits until nothing is in flight.
    fn reap(&mut self, all: bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut done = Vec::new();
            for q in 0..2u16 {
                let mut out = Vec::new();
                self.client.poll_completions(q, &mut out).unwrap();
                done.extend(out.into_iter().map(|c| (q, c)));
            }
            let progress = !done.is_empty();
            for (q, c) in done {
                let f = self.in_flight.remove(&(q, c.token)).unwrap();
                assert_eq!(
                    c.status,
                    BlkStatus::Ok,
                    "{}: {:?} of {} bytes at region offset {} failed",
                    self.context,
                    f.kind,
                    f.len,
                    f.off
                );
                match f.kind {
                    Kind::Flush { mark } => self.model.flushed(mark),
                    _ => self.model.complete(f.op, f.off, f.len),
                }
            }
            if !all || self.in_flight.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {} requests still in flight after {WAIT:?}",
                self.context,
                self.in_flight.len()
            );
            if !progress {
                let q = self.in_flight.keys().next().map_or(0, |k| k.0);
                self.client.wait_call(q, Duration::from_millis(20)).unwrap();
            }
        }
    }

    fn submit_batch(&mut self) {
        for _ in 0..self.rng.range(1, 6) {
            self.submit_data();
        }
    }

    /// Random batches, flushes and reaps: what a guest keeps in flight.
    fn run_ops(&mut self) {
        for _ in 0..self.rng.range(3, 24) {
            if self.in_flight.len() > 24 {
                self.reap(true);
            }
            match self.rng.range(0, 99) {
                0..=11 => {
                    self.reap(true);
                    self.submit_flush();
                    self.reap(true);
                }
                12..=21 => self.submit_flush(),
                _ => self.submit_batch(),
            }
            match self.rng.range(0, 2) {
                0 => self.reap(true),
                1 => self.reap(false),
                _ => {}
            }
        }
    }

    /// The kill point: right after a flush completed, with requests in
    /// flight whose completions were not looked at, or after reaping all.
    fn reach_the_kill_point(&mut self) {
        match self.rng.range(0, 2) {
            0 => {
                self.reap(true);
                self.submit_flush();
                self.reap(true);
                self.stats.killed_after_flush += 1;
            }
            1 => {
                // Killed before the completions are even looked at.
                self.submit_batch();
                if self.rng.chance(30) {
                    self.submit_flush();
                }
                if !self.in_flight.is_empty() {
                    self.stats.killed_in_flight += 1;
                }
            }
            _ => self.reap(true),
        }
    }
}

fn serve(node: &TestNode, mode: &str) -> Server {
    node.serve(&["--queues", "2", "--flush", mode])
}

fn connect(node: &TestNode) -> VhostBlkClient {
    node.connect(ClientOptions {
        queues: 2,
        memory_size: 16 << 20,
        timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    })
}

fn read_region(c: &mut VhostBlkClient, base: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((BLOCKS * BS) as usize);
    for chunk in 0..BLOCKS * BS / (64 << 10) {
        let r = c.read(0, base + chunk * (64 << 10), 64 << 10).unwrap();
        assert_eq!(r.status, BlkStatus::Ok, "reading the region back");
        out.extend(r.data);
    }
    out
}

/// Checks what the region holds after a crash against the model.
fn check(model: &Model, got: &[u8], stats: &mut Stats, context: &str) {
    for (b, versions) in model.blocks.iter().enumerate() {
        let block = &got[b * BS as usize..(b + 1) * BS as usize];
        if versions.len() == 1 {
            assert!(
                block == versions[0].data.as_slice(),
                "{context}: block {b} lost completed data (first differing byte {:?})",
                block
                    .iter()
                    .zip(&versions[0].data)
                    .position(|(x, y)| x != y)
            );
            continue;
        }
        if let Some(i) = versions.iter().rposition(|v| v.data == block) {
            if i + 1 == versions.len() {
                stats.showed_newest += 1;
            } else {
                stats.showed_older += 1;
            }
            continue;
        }
        // Mixed: each sector must still come from one of the versions.
        for (s, sector) in block.chunks(SECTOR).enumerate() {
            let range = s * SECTOR..(s + 1) * SECTOR;
            assert!(
                versions.iter().any(|v| v.data[range.clone()] == *sector),
                "{context}: block {b} sector {s} holds data it never had \
                 ({} candidate versions, ops {:?})",
                versions.len(),
                versions.iter().map(|v| (v.op, v.done)).collect::<Vec<_>>()
            );
        }
        stats.showed_mixed_sectors += 1;
    }
}

/// Writes random data and zeroes over parts of the region through a
/// server, stops it cleanly and freezes the overlay into a new layer,
/// `layers` times. Returns the layers with their sha256 (of the files),
/// and what the region must read as over them.
#[allow(clippy::type_complexity)]
fn build_chain(
    node: &TestNode,
    mode: &str,
    base: u64,
    layers: usize,
    seed: u64,
) -> (Vec<(PathBuf, String)>, Option<Vec<u8>>) {
    let mut rng = Rng::for_stream(seed, 0);
    let mut out = Vec::new();
    let mut region = None;
    for n in 0..layers {
        let mut server = serve(node, mode);
        let mut c = connect(node);
        let region = region.get_or_insert_with(|| read_region(&mut c, base));
        for _ in 0..40 {
            let off = rng.range(0, BLOCKS * BS / 512 - 16) * 512;
            let len = rng.range(1, 16) * 512;
            let span = off as usize..(off + len) as usize;
            let r = if rng.chance(25) {
                region[span].fill(0);
                c.write_zeroes(0, base + off, len, false).unwrap()
            } else {
                let data = rng.bytes(len as usize);
                region[span].copy_from_slice(&data);
                c.write(0, base + off, &data).unwrap()
            };
            assert_eq!(r.status, BlkStatus::Ok, "building layer {n}");
        }
        assert_eq!(c.flush(0).unwrap().status, BlkStatus::Ok);
        c.disconnect().unwrap();
        server.stop_cleanly(WAIT, &format!("building layer {n}"));
        let layer = node.dir().join(format!("layer{n}"));
        node.overlay_freeze(&layer);
        let sha = ociblk_tests::oci::sha256_hex(&fs::read(&layer).unwrap());
        out.push((layer, sha));
    }
    (out, region)
}

/// The layers of `chain` still hold the bytes of their sha256, and `ociblk
/// overlay verify` of the node verifies each.
fn check_layers_unchanged(node: &TestNode, chain: &[(PathBuf, String)]) {
    for (layer, sha) in chain {
        let now = ociblk_tests::oci::sha256_hex(&fs::read(layer).unwrap());
        assert_eq!(&now, sha, "{} was written to", layer.display());
    }
    if !chain.is_empty() {
        let out = run_ok(
            Command::new(ociblk_bin())
                .args(["overlay", "verify"])
                .arg(node.overlay()),
        );
        let out = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.matches("verified").count(), chain.len(), "{out}");
    }
}

fn crash_rounds(mode: &'static str, seed: u64) {
    crash_rounds_over(mode, seed, 0, ROUNDS);
}

fn crash_rounds_over(mode: &'static str, seed: u64, layers: usize, rounds: u64) {
    let start = Instant::now();
    let node = TestNode::small(&format!("crash-{mode}"));
    // System partition A: its first MiB is the system payload.
    let base = node.partition_offset(1);
    let (chain, over_chain) = build_chain(&node, mode, base, layers, seed ^ 0x1a7e);
    let mut stats = Stats::default();
    let mut server = serve(&node, mode);
    let mut model: Option<Model> = None;
    for round in 0..rounds {
        let round_seed = seed ^ round.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let context = format!("--flush {mode}, round {round}, seed {round_seed:#x}");
        let mut client = connect(&node);
        // What survived the last crash; from now on it is the flushed state.
        let got = read_region(&mut client, base);
        if let Some(m) = &model {
            check(m, &got, &mut stats, &context);
        } else if let Some(want) = &over_chain {
            assert!(
                got == *want,
                "{context}: the region does not read as the layers"
            );
        }
        assert_eq!(client.flush(0).unwrap().status, BlkStatus::Ok, "{context}");
        let mut r = Round {
            client,
            model: Model::new(&got),
            rng: Rng::for_stream(round_seed, 0),
            base,
            in_flight: HashMap::new(),
            next_op: 0,
            stats: &mut stats,
            context: context.clone(),
        };
        r.run_ops();
        r.reach_the_kill_point();
        server.stop_with(libc::SIGKILL, Duration::from_secs(20));
        let Round { model: mut m, .. } = r;
        m.process_killed();
        model = Some(m);
        drop(fs::remove_file(node.socket()));
        server = serve(&node, mode);
        stats.rounds += 1;
    }
    // The last crash, checked too.
    let mut client = connect(&node);
    let got = read_region(&mut client, base);
    check(
        model.as_ref().unwrap(),
        &got,
        &mut stats,
        &format!("--flush {mode}, after the last round"),
    );
    client.disconnect().unwrap();
    drop(server);
    check_layers_unchanged(&node, &chain);
    eprintln!(
        "crash consistency --flush {mode} over {layers} layers: {} rounds survived kill -9 \
         in {:.1?}: {stats:?}",
        stats.rounds,
        start.elapsed()
    );
}

#[test]
fn crash_consistency_flush_safe() {
    crash_rounds("safe", 0x5afe_c0de_0000_0001);
}

#[test]
fn crash_consistency_flush_unsafe() {
    crash_rounds("unsafe", 0x0a5a_fe00_c0de_0002);
}

#[test]
fn crash_consistency_over_two_layers() {
    crash_rounds_over("safe", 0x1a7e_c0de_0000_0003, 2, CHAIN_ROUNDS);
}
