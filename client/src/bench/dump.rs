// SPDX-License-Identifier: Apache-2.0

//! `dump`: reads a whole disk in order and hashes it (optionally saving it), so tests
//! can compare what the backend serves with a file.
//!
//! One thread drives every queue: reads are spread round-robin, completions are put
//! back in disk order before hashing, and the distance between the next read and the
//! next chunk to hash is bounded, so memory stays bounded even if one read lags.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::args::DumpArgs;
use super::report::{DumpReport, rates};
use super::{BenchError, client_options, connect};
use crate::{BlkStatus, Completion, Request, Token, VhostBlkClient};

/// Longest single sleep while waiting for completions.
const MAX_WAIT: Duration = Duration::from_millis(100);

/// A read in flight: its token, chunk number and submission time.
#[derive(Clone, Copy, Debug)]
struct Pending {
    token: Token,
    chunk: u64,
    start: Instant,
}

/// Reads the disk behind `args.connect.socket` and returns its size and SHA-256.
pub fn run(args: &DumpArgs) -> Result<DumpReport, BenchError> {
    let opts = client_options(args.queues, args.iodepth, args.bs, 0, args.connect.timeout)?;
    let mut client = connect(&args.connect.socket, opts, args.bs)?;
    let size = client.config().capacity_bytes();
    let mut output = match &args.output {
        Some(path) => Some(File::create(path).map_err(|source| BenchError::Io {
            context: format!("creating {}", path.display()),
            source,
        })?),
        None => None,
    };

    let start = Instant::now();
    let mut hasher = Sha256::new();
    let mut consume = |data: &[u8]| -> Result<(), BenchError> {
        hasher.update(data);
        if let (Some(file), Some(path)) = (output.as_mut(), args.output.as_ref()) {
            file.write_all(data).map_err(|source| BenchError::Io {
                context: format!("writing {}", path.display()),
                source,
            })?;
        }
        Ok(())
    };
    read_in_order(&mut client, args, size, &mut consume)?;
    if let (Some(file), Some(path)) = (output.as_mut(), args.output.as_ref()) {
        file.sync_all().map_err(|source| BenchError::Io {
            context: format!("syncing {}", path.display()),
            source,
        })?;
    }
    let seconds = start.elapsed().as_secs_f64();
    client
        .disconnect()
        .map_err(BenchError::client("disconnecting"))?;
    let sha256 = hex::encode(hasher.finalize());
    Ok(DumpReport {
        size,
        sha256,
        bs: args.bs,
        queues: args.queues,
        iodepth: args.iodepth,
        seconds,
        mib_s: rates(0, size, seconds).1,
        output: args.output.as_ref().map(|p| p.display().to_string()),
    })
}

/// Reads `size` bytes in chunks of `args.bs` over every queue and hands the chunks to
/// `consume` in disk order.
fn read_in_order(
    client: &mut VhostBlkClient,
    args: &DumpArgs,
    size: u64,
    consume: &mut dyn FnMut(&[u8]) -> Result<(), BenchError>,
) -> Result<(), BenchError> {
    let bs = args.bs;
    let chunks = size.div_ceil(bs);
    let queues = client.num_queues();
    let depth = args.iodepth as usize;
    // Chunks read ahead of the next one to hash: twice what can be in flight.
    let window = 2 * u64::from(queues) * u64::from(args.iodepth);
    let timeout = args.connect.timeout;
    let mut in_flight: Vec<Vec<Pending>> = (0..queues).map(|_| Vec::with_capacity(depth)).collect();
    let mut ready: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut done: Vec<Completion> = Vec::new();
    let (mut next_read, mut next_hash) = (0u64, 0u64);
    for q in 0..queues {
        client
            .queue_mut(q)
            .map_err(BenchError::client("dump"))?
            .set_auto_kick(false);
    }

    while next_hash < chunks {
        // Refill round-robin, one read per queue per turn.
        let mut progress = true;
        while progress {
            progress = false;
            for (q, flights) in in_flight.iter_mut().enumerate() {
                if next_read >= chunks || next_read >= next_hash + window || flights.len() >= depth
                {
                    continue;
                }
                let offset = next_read * bs;
                let len = (size - offset).min(bs) as u32;
                let token = client
                    .submit(q as u16, Request::Read { offset, len })
                    .map_err(|error| BenchError::Client {
                        context: format!("queue {q}: submitting a read at {offset}"),
                        error,
                    })?;
                flights.push(Pending {
                    token,
                    chunk: next_read,
                    start: Instant::now(),
                });
                next_read += 1;
                progress = true;
            }
        }
        let mut reaped = 0;
        for (q, flights) in in_flight.iter_mut().enumerate() {
            let q = q as u16;
            client.kick(q).map_err(BenchError::on_queue(q, "kick"))?;
            reaped += client
                .poll_completions(q, &mut done)
                .map_err(BenchError::on_queue(q, "reaping"))?;
            for c in done.drain(..) {
                let pos = flights
                    .iter()
                    .position(|p| p.token == c.token)
                    .ok_or_else(|| {
                        BenchError::ReadFailed(format!(
                            "queue {q}: completion for {:?}, which is not in flight",
                            c.token
                        ))
                    })?;
                let p = flights.swap_remove(pos);
                let offset = p.chunk * bs;
                let expected = (size - offset).min(bs) as usize;
                if c.status != BlkStatus::Ok || c.data.len() != expected {
                    return Err(BenchError::ReadFailed(format!(
                        "queue {q}: read of {expected} bytes at {offset} completed with status \
                         {:?} and {} bytes",
                        c.status,
                        c.data.len()
                    )));
                }
                ready.insert(p.chunk, c.data);
            }
        }
        while let Some(data) = ready.remove(&next_hash) {
            consume(&data)?;
            next_hash += 1;
        }
        if reaped == 0 && next_hash < chunks {
            wait_any(client, &in_flight, timeout)?;
        }
    }
    Ok(())
}

/// Sleeps until a call eventfd of a queue with reads in flight fires (bounded), then
/// consumes the signals; fails if a read is overdue or the backend hung up.
fn wait_any(
    client: &mut VhostBlkClient,
    in_flight: &[Vec<Pending>],
    timeout: Duration,
) -> Result<(), BenchError> {
    let oldest = in_flight
        .iter()
        .enumerate()
        .flat_map(|(q, v)| v.iter().map(move |p| (q, p)))
        .min_by_key(|(_, p)| p.start);
    let Some((q, oldest)) = oldest else {
        return Ok(());
    };
    let now = Instant::now();
    let overdue_at = oldest.start + timeout;
    if now >= overdue_at {
        return Err(BenchError::Timeout {
            queue: q as u16,
            what: format!("read of chunk {}", oldest.chunk),
            timeout,
        });
    }
    let wait = (overdue_at - now).min(MAX_WAIT);
    let mut fds = Vec::with_capacity(in_flight.len());
    for q in 0..client.num_queues() {
        let queue = client.queue(q).map_err(BenchError::client("dump"))?;
        fds.push(libc::pollfd {
            fd: queue.call_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }
    let millis = wait.as_millis().clamp(1, 1000) as libc::c_int;
    // SAFETY: `fds` is a valid, initialised array of pollfd structs whose length is
    // passed alongside; the descriptors belong to the client, which outlives the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(BenchError::Io {
                context: "polling the call eventfds".into(),
                source: err,
            });
        }
    }
    // Consume the signals (and notice a hang-up) through the client.
    for q in 0..client.num_queues() {
        client
            .wait_call(q, Duration::ZERO)
            .map_err(BenchError::on_queue(q, "waiting"))?;
    }
    Ok(())
}
