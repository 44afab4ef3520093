// SPDX-License-Identifier: Apache-2.0

//! `ociblk-bench` against QEMU's `qemu-storage-daemon`: the load generator's requests
//! really reach the disk, its dump matches the file, and its reports add up.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ociblk_tests::process::StorageDaemon;
use ociblk_tests::support::bench_bin;
use serde_json::Value;
use sha2::{Digest, Sha256};

const DISK_SIZE: u64 = 64 << 20;
const QUEUES: u16 = 2;
/// Bound on one `ociblk-bench` invocation.
const BENCH_TIMEOUT: Duration = Duration::from_secs(20);
/// The seed `ociblk-bench run` uses unless told otherwise.
const DEFAULT_SEED: u64 = 1;

/// A qemu-storage-daemon exporting a 64 MiB raw file (2 queues, writable) whose content
/// `fill` writes first; with `failing`, every read fails with EIO.
fn daemon_with(fill: impl FnOnce(&File), failing: bool) -> StorageDaemon {
    StorageDaemon::start(DISK_SIZE, QUEUES, failing, fill)
}

fn daemon(fill: impl FnOnce(&File)) -> StorageDaemon {
    daemon_with(fill, false)
}

/// What one `ociblk-bench` invocation did.
struct Outcome {
    success: bool,
    stdout: String,
    stderr: String,
}

fn drain(mut stream: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text
    })
}

/// Runs `ociblk-bench args`, bounded by [`BENCH_TIMEOUT`].
fn bench(args: &[&str]) -> Outcome {
    let mut child = Command::new(bench_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting ociblk-bench: {e}"));
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + BENCH_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ociblk-bench {args:?} ran longer than {BENCH_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Outcome {
        success: status.success(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Runs `ociblk-bench args`, which must succeed.
fn bench_ok(args: &[&str]) -> String {
    let out = bench(args);
    assert!(
        out.success,
        "ociblk-bench {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    out.stdout
}

/// Runs `ociblk-bench args` (with `--json`) and parses its report.
fn bench_json(args: &[&str]) -> Value {
    let stdout = bench_ok(args);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn u64_of(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {report}"))
}

fn f64_of(report: &Value, path: &[&str]) -> f64 {
    let mut v = report;
    for key in path {
        v = &v[key];
    }
    v.as_f64()
        .unwrap_or_else(|| panic!("{path:?} missing in {report}"))
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `ociblk-bench run --rw <rw> <args> --json` against `daemon`.
fn run_json(daemon: &StorageDaemon, rw: &str, args: &[&str]) -> Value {
    let mut argv = vec!["run", "--socket", daemon.socket_arg(), "--rw", rw];
    argv.extend_from_slice(args);
    argv.push("--json");
    bench_json(&argv)
}

/// `ociblk-bench run --rw <rw> <args>`: the text report.
fn run_text(daemon: &StorageDaemon, rw: &str, args: &[&str]) -> String {
    let mut argv = vec!["run", "--socket", daemon.socket_arg(), "--rw", rw];
    argv.extend_from_slice(args);
    bench_ok(&argv)
}

/// Fills the file with bytes that differ from sector to sector.
fn fill_distinct(file: &File) {
    let mut chunk: Vec<u8> = (0..1u32 << 20).map(|j| (j * 13) as u8).collect();
    for (i, offset) in (0..DISK_SIZE).step_by(chunk.len()).enumerate() {
        for (s, sector) in chunk.chunks_mut(512).enumerate() {
            sector[..8].copy_from_slice(&((i as u64) << 32 | s as u64).to_le_bytes());
        }
        file.write_all_at(&chunk, offset).unwrap();
    }
}

/// Checks that a 512-byte sector at disk `offset` carries the benchmark's stamp.
fn assert_stamped(sector: &[u8], offset: u64) {
    let value = offset ^ DEFAULT_SEED;
    assert_eq!(
        sector[..8],
        value.to_le_bytes(),
        "sector at {offset} lacks its stamp"
    );
    assert_eq!(sector[8..16], (!value).to_le_bytes());
}

#[test]
fn dump_matches_the_file() {
    let daemon = daemon(fill_distinct);
    let expected = sha256_hex(&std::fs::read(&daemon.image).unwrap());
    let saved = daemon.dir().join("dump.raw");
    let report = bench_json(&[
        "dump",
        "--socket",
        daemon.socket_arg(),
        "--queues",
        "2",
        "--output",
        saved.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(u64_of(&report, "size"), DISK_SIZE);
    assert_eq!(report["sha256"], expected.as_str());
    assert!(std::fs::read(&saved).unwrap() == std::fs::read(&daemon.image).unwrap());

    // The text form, over one queue with small reads.
    let text = bench_ok(&["dump", "--socket", daemon.socket_arg(), "--bs", "64K"]);
    assert!(text.contains(&format!("size {DISK_SIZE}\n")), "{text}");
    assert!(text.contains(&format!("sha256 {expected}\n")), "{text}");
}

#[test]
fn randread_reports_latency_and_throughput() {
    let mut daemon = daemon(|_| {});
    let pid = daemon.pid().to_string();
    let report = run_json(
        &daemon,
        "randread",
        &[
            "--bs",
            "4K",
            "--iodepth",
            "8",
            "--queues",
            "2",
            "--runtime",
            "1",
            "--label",
            "qsd",
            "--server-pid",
            &pid,
        ],
    );
    eprintln!("{report}");
    let ops = u64_of(&report, "ops");
    assert!(ops > 0);
    assert_eq!(u64_of(&report, "errors"), 0);
    assert_eq!(u64_of(&report, "read_ops"), ops);
    assert_eq!(u64_of(&report, "write_ops"), 0);
    assert_eq!(u64_of(&report, "bytes"), ops * 4096);
    assert_eq!(u64_of(&report, "queues"), 2);
    assert_eq!(report["rw"], "randread");
    assert_eq!(report["label"], "qsd");
    let runtime = f64_of(&report, &["runtime_s"]);
    assert!((0.9..5.0).contains(&runtime), "runtime {runtime}");
    assert!(f64_of(&report, &["iops"]) > 0.0);
    assert!(f64_of(&report, &["mib_s"]) > 0.0);
    let lat = |p: &str| f64_of(&report, &["lat_us", p]);
    assert!(lat("min") > 0.0);
    assert!(lat("min") <= lat("p50"));
    assert!(lat("p50") <= lat("p90"));
    assert!(lat("p90") <= lat("p99"));
    assert!(lat("p99") <= lat("p99_9"));
    assert!(lat("p99_9") <= lat("max"));
    assert!(lat("min") <= lat("mean") && lat("mean") <= lat("max"));
    // CPU accounting: both sides, for the same requests (no ramp: all were measured).
    let cpu = &report["cpu"];
    assert_eq!(u64_of(cpu, "requests"), ops);
    assert_eq!(u64_of(cpu, "bytes"), ops * 4096);
    let (client, server) = (f64_of(cpu, &["client_s"]), f64_of(cpu, &["server_s"]));
    assert!(client > 0.0, "{cpu}");
    assert!(server > 0.0, "the daemon served {ops} reads: {cpu}");
    assert_eq!(
        cpu["client_bound"].as_bool(),
        Some(client > server),
        "{cpu}"
    );
    let per_request = f64_of(cpu, &["server_us_per_request"]);
    assert!((per_request - server * 1e6 / ops as f64).abs() < 1e-6 * per_request.max(1.0));
    daemon.assert_running();
}

#[test]
fn randwrite_with_flushes_lands_in_the_file() {
    let mut daemon = daemon(|_| {});
    let args = ["--flush-every", "16", "--size", "4M"];
    let report = run_json(&daemon, "randwrite", &args);
    assert_eq!(u64_of(&report, "errors"), 0);
    assert_eq!(u64_of(&report, "write_ops"), 1024);
    assert_eq!(u64_of(&report, "write_bytes"), 4 << 20);
    assert_eq!(u64_of(&report, "read_ops"), 0);
    // A flush before every 16 writes after the first 16.
    assert_eq!(u64_of(&report, "flushes"), 1024 / 16 - 1);
    assert!(f64_of(&report, &["flush_lat_us", "max"]) > 0.0);

    // Random 4 KiB blocks were written, each carrying its own offset.
    let image = std::fs::read(&daemon.image).unwrap();
    let written: Vec<usize> = (0..image.len())
        .step_by(4096)
        .filter(|&o| image[o..o + 4096] != [0u8; 4096])
        .collect();
    assert!(!written.is_empty(), "the file is still all zeros");
    assert!(written.len() <= 1024);
    for &block in &written {
        for sector in (block..block + 4096).step_by(512) {
            assert_stamped(&image[sector..sector + 512], sector as u64);
        }
    }

    // The daemon still serves, and serves what the file holds.
    daemon.assert_running();
    let dump = bench_json(&["dump", "--socket", daemon.socket_arg(), "--json"]);
    assert_eq!(dump["sha256"], sha256_hex(&image).as_str());
}

#[test]
fn mixed_and_sequential_writes() {
    let mut daemon = daemon(|_| {});
    let text = run_text(&daemon, "mixed", &["--bs", "64K", "--size", "8M"]);
    assert!(text.contains("total     128 ops"), "{text}");
    assert!(text.contains("errors    0"), "{text}");
    assert!(text.contains("mixed (70% reads)"), "{text}");

    // Two queues writing their halves of the disk sequentially cover all of it.
    let report = run_json(
        &daemon,
        "write",
        &[
            "--bs",
            "64K",
            "--queues",
            "2",
            "--iodepth",
            "4",
            "--size",
            "64M",
        ],
    );
    assert_eq!(u64_of(&report, "write_bytes"), DISK_SIZE);
    let image = std::fs::read(&daemon.image).unwrap();
    for sector in (0..image.len()).step_by(512) {
        assert_stamped(&image[sector..sector + 512], sector as u64);
    }
    daemon.assert_running();
}

#[test]
fn failures_are_reported() {
    let mut daemon = daemon(|_| {});
    let missing = daemon.dir().join("missing.sock");
    let out = bench(&[
        "run",
        "--socket",
        missing.to_str().unwrap(),
        "--runtime",
        "1",
    ]);
    assert!(!out.success);
    assert!(out.stderr.contains("socket unreachable"), "{}", out.stderr);

    let out = bench(&["run", "--socket", daemon.socket_arg(), "--queues", "3"]);
    assert!(!out.success);
    assert!(
        out.stderr.contains("negotiation failed") && out.stderr.contains("3 queues requested"),
        "{}",
        out.stderr
    );

    let out = bench(&[
        "run",
        "--socket",
        daemon.socket_arg(),
        "--offset",
        "64M",
        "--runtime",
        "1",
    ]);
    assert!(!out.success);
    assert!(out.stderr.contains("beyond the disk"), "{}", out.stderr);
    daemon.assert_running();
}

#[test]
fn device_errors_fail_the_run() {
    let mut daemon = daemon_with(|_| {}, true);
    let out = bench(&[
        "run",
        "--socket",
        daemon.socket_arg(),
        "--rw",
        "randread",
        "--iodepth",
        "4",
        "--runtime",
        "1",
        "--json",
    ]);
    assert!(!out.success, "{}", out.stdout);
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(u64_of(&report, "errors") > 0);
    assert!(
        out.stderr.contains("requests failed") && out.stderr.contains("status IoErr"),
        "{}",
        out.stderr
    );

    let out = bench(&["dump", "--socket", daemon.socket_arg()]);
    assert!(!out.success);
    assert!(out.stderr.contains("status IoErr"), "{}", out.stderr);
    daemon.assert_running();
}

#[test]
fn stalled_daemon_times_out() {
    let mut daemon = daemon(|_| {});
    let socket = daemon.socket_arg().to_string();
    let run = std::thread::spawn(move || {
        bench(&[
            "run",
            "--socket",
            &socket,
            "--iodepth",
            "4",
            "--runtime",
            "10",
            "--timeout",
            "1",
        ])
    });
    std::thread::sleep(Duration::from_millis(300));
    daemon.signal(libc::SIGSTOP);
    let started = Instant::now();
    let out = run.join().unwrap();
    daemon.signal(libc::SIGCONT);
    assert!(!out.success, "{}", out.stdout);
    // Stopped mid-run a request times out; stopped before the handshake, a message.
    assert!(
        out.stderr.contains("not completed within 1s")
            || out.stderr.contains("no answer within 1s"),
        "{}",
        out.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Whether qemu-storage-daemon survives is not ociblk-bench's to judge: a
    // client that leaves while the stopped daemon still holds its requests
    // at times ends QEMU 7.2's daemon ("vhost_user_server_ref: Assertion
    // `!server->wait_idle' failed").
}
