//! Live migration of a node: the overlay hand-over between two servers
//! (`serve --wait-for-overlay`), and a QEMU guest (TCG) migrated under
//! O_DIRECT I/O to a second QEMU on this host, whose own server takes the
//! overlay over once the first one stopped. Without the server's dirty
//! page log the same migration loses bytes, and the test sees it.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use ociblk_client::{BlkStatus, ClientOptions, VhostBlkClient};
use ociblk_launch::qmp::{MigrationStatus, Qmp};
use ociblk_server::dirty_log::SKIP_DATA_LOG_ENV;
use ociblk_tests::node::TestNode;
use ociblk_tests::oci::pseudo_random;
use ociblk_tests::process::{Boot, Guest, GuestConfig};
use ociblk_tests::support::wait_until;
use sha2::{Digest, Sha256};

/// The log line of a server that opened its deferred overlay.
const OPENED: &str = "overlay opened at the disk's first use";

fn client(socket: &Path) -> VhostBlkClient {
    let opts = ClientOptions {
        timeout: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    VhostBlkClient::connect(socket, opts).unwrap()
}

#[test]
fn a_waiting_server_takes_the_overlay_once_the_holder_stops() {
    let node = TestNode::small("handover-1");
    let data_off = node.partition_offset(3);
    let mut source = node.serve(&[]);
    let before = pseudo_random(64 << 10, 1);
    {
        let mut c = client(&node.socket());
        assert_eq!(c.write(0, data_off, &before).unwrap().status, BlkStatus::Ok);
        c.disconnect().unwrap();
    }
    // Starts and answers the handshake while the overlay is locked.
    let dest_socket = node.dir().join("dest.sock");
    let mut dest = node.serve_files(&dest_socket, &node.overlay(), &["--wait-for-overlay", "60"]);
    let mut c = client(&dest_socket);
    assert_eq!(c.config().capacity_bytes(), 512 << 20);
    let reader = std::thread::spawn(move || {
        let got = c.read(0, data_off, 64 << 10).unwrap();
        (c, got)
    });
    // Whatever the reader does meanwhile, the overlay has one writer.
    assert!(source.try_exit().is_none());
    assert!(
        !dest.log.text().contains(OPENED),
        "opened while the source held the overlay:\n{}",
        dest.log.text()
    );
    source.stop_cleanly(Duration::from_secs(20), "stopping the source");
    let (mut c, got) = reader.join().unwrap();
    assert_eq!(got.status, BlkStatus::Ok);
    assert!(
        got.data == before,
        "the source's write, read at the destination"
    );
    dest.wait_for_line(&[OPENED]);
    let after = pseudo_random(4096, 2);
    assert_eq!(
        c.write(0, data_off + (1 << 20), &after).unwrap().status,
        BlkStatus::Ok
    );
    c.disconnect().unwrap();
    dest.stop_cleanly(Duration::from_secs(20), "stopping the destination");
    let disk = node.export_bytes(true);
    let at = |off: u64, len: usize| &disk[off as usize..off as usize + len];
    assert!(at(data_off, 64 << 10) == before.as_slice());
    assert!(at(data_off + (1 << 20), 4096) == after.as_slice());
}

#[test]
fn a_waiting_server_fails_requests_past_its_bound_and_recovers() {
    let node = TestNode::small("handover-2");
    let data_off = node.partition_offset(3);
    let mut source = node.serve(&[]);
    let dest_socket = node.dir().join("dest.sock");
    let mut dest = node.serve_files(&dest_socket, &node.overlay(), &["--wait-for-overlay", "1"]);
    let mut c = client(&dest_socket);
    let started = Instant::now();
    let failed = c.read(0, data_off, 4096).unwrap();
    assert_eq!(failed.status, BlkStatus::IoErr, "a read past the bound");
    assert!(started.elapsed() >= Duration::from_secs(1));
    dest.wait_for_line(&["cannot open the overlay", "in use by another process"]);
    // Past the bound a request tries once and does not wait.
    assert_eq!(
        c.flush(0).unwrap().status,
        BlkStatus::Ok,
        "nothing to flush"
    );
    assert_eq!(c.read(0, data_off, 4096).unwrap().status, BlkStatus::IoErr);
    source.stop_cleanly(Duration::from_secs(20), "stopping the source");
    let got = c.read(0, data_off, 4096).unwrap();
    assert_eq!(got.status, BlkStatus::Ok, "once the overlay is free");
    c.disconnect().unwrap();
    dest.stop_cleanly(Duration::from_secs(20), "stopping the destination");
}

/// Boot to the shell prompt (TCG).
const BOOT: Duration = Duration::from_secs(180);
/// One guest shell command.
const CMD: Duration = Duration::from_secs(120);
/// Bound of each QMP exchange, and of a migration's phases.
const QMP: Duration = Duration::from_secs(30);
const MIGRATION: Duration = Duration::from_secs(180);
/// Guest memory: small enough to migrate quickly under TCG.
const GUEST_MIB: u32 = 256;

/// The blocks the guest writes: `n` blocks of 4 KiB, block `i` being
/// "TAG GEN I " repeated to 4095 bytes and a newline (the awk in
/// [`GEN`] makes the same bytes).
fn blocks(tag: &str, generation: u64, n: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n as usize * 4096);
    for i in 0..n {
        let unit = format!("{tag} {generation} {i} ");
        let mut block = unit.repeat(4095 / unit.len() + 1).into_bytes();
        block.truncate(4095);
        block.push(b'\n');
        out.extend_from_slice(&block);
    }
    out
}

/// Shell function `gen TAG GEN N`: [`blocks`] on stdout.
const GEN: &str = r#"gen() { awk -v t="$1" -v g="$2" -v n="$3" 'BEGIN{for(i=0;i<n;i++){s=t" "g" "i" ";b=s;while(length(b)<4095)b=b b;printf "%s\n",substr(b,1,4095)}}'; }"#;

/// The write-and-verify loop: generation after generation, 256 blocks
/// (1 MiB) at the start of the data partition written with O_DIRECT, read
/// back with O_DIRECT and compared with what was written; one line per
/// generation in /tmp/w.log, until /tmp/stop exists.
const W_LOOP: &str = r#"( g=0; while [ ! -e /tmp/stop ]; do g=$((g+1)); gen W $g 256 | dd of=$D bs=1M iflag=fullblock oflag=direct 2>/dev/null || echo "gen $g write-failed"; a=$(dd if=$D bs=1M count=1 iflag=direct 2>/dev/null | sha256sum); b=$(gen W $g 256 | sha256sum); if [ "$a" = "$b" ]; then echo "gen $g ok"; else echo "gen $g BAD"; dd if=$D bs=1M count=1 iflag=direct 2>/dev/null > /tmp/bad.r; gen W $g 256 > /tmp/bad.w; cmp /tmp/bad.r /tmp/bad.w; cmp -l /tmp/bad.r /tmp/bad.w | wc -l; fi; done > /tmp/w.log 2>&1 ) & W=$!"#;

/// The probe: `dd` reads area A (4 MiB at 16 MiB of the partition) and
/// then area B (at 20 MiB) with O_DIRECT into the same buffer, writing each
/// into a FIFO the shell holds open as fd 3. It reads B only once A was
/// drained, and then holds B in its buffer, blocked on the full FIFO.
const PROBE: &str = "mkfifo /tmp/probe; exec 3<>/tmp/probe; dd if=$D bs=4M skip=4 count=2 iflag=direct of=/tmp/probe 2>/dev/null & P=$!";
/// Waits until the probe's `dd` has read up to byte `pos` of the partition.
fn probe_read_to(pos: u64) -> String {
    format!("while ! grep -q '^pos:[[:space:]]*{pos}$' /proc/$P/fdinfo/0; do sleep 0.1; done")
}
/// Drains one area from the FIFO and prints its sha256.
const PROBE_DRAIN: &str = "dd bs=4M count=1 iflag=fullblock <&3 2>/dev/null | sha256sum";

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The sha256 a guest command printed.
fn printed_sha256(out: &str) -> String {
    out.split_whitespace()
        .find(|w| w.len() == 64 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no sha256 in:\n{out}"))
        .to_owned()
}

/// `gen N STATE` lines of the loop's log.
fn generations(log: &str) -> Vec<(u64, String)> {
    log.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "gen").then_some(())?;
            let g = words.next()?.parse().ok()?;
            Some((g, words.next()?.to_owned()))
        })
        .collect()
}

/// What one migration under I/O showed.
struct Migrated {
    /// The probe's buffer held area B on the destination.
    probe_ok: bool,
    /// What the loop printed.
    loop_log: String,
    /// The loop's generations, and whether each verified.
    generations: Vec<(u64, String)>,
    /// Generations done before the migration was started.
    generations_before: usize,
    /// The completed migration's `query-migrate`.
    status: MigrationStatus,
    /// The destination's disk (exported after both servers stopped).
    disk: Vec<u8>,
    data_off: u64,
}

fn poll_migration(qmp: &mut Qmp, until: impl Fn(&MigrationStatus) -> bool) -> MigrationStatus {
    let deadline = Instant::now() + MIGRATION;
    loop {
        let s = qmp.query_migrate().unwrap();
        if until(&s) || matches!(s.status.as_str(), "failed" | "cancelled" | "completed") {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "migration still {} after {MIGRATION:?}: {}",
            s.status,
            s.raw
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// In the booted `source`: the probe's areas, the probe holding area A,
/// the write-and-verify loop and a process dirtying memory; returns the
/// loop's generations done once its first one was.
fn start_io(source: &mut Guest) -> usize {
    source.run_ok(
        "D=/dev/$(basename $(dirname $(grep -lx PARTNAME=METROPOLIS-NODE-DATA /sys/class/block/vda*/uevent)))",
        CMD,
    );
    source.run_ok(GEN, CMD);
    // The probe's two areas, written with O_DIRECT.
    source.run_ok(
        "gen A 1 1024 | dd of=$D bs=1M seek=16 iflag=fullblock oflag=direct 2>/dev/null",
        CMD,
    );
    source.run_ok(
        "gen B 1 1024 | dd of=$D bs=1M seek=20 iflag=fullblock oflag=direct 2>/dev/null",
        CMD,
    );
    // A is in the probe's buffer before the migration starts, so the
    // migration's first pass sends the buffer with A in it.
    source.run_ok(PROBE, CMD);
    source.run_ok(&probe_read_to(20 << 20), CMD);
    source.run_ok(W_LOOP, CMD);
    // Memory dirtied (with bytes that are not zero, which the migration
    // must send in full) faster than it converges at 1 ms downtime.
    source.run_ok(
        "dd if=/dev/urandom of=/dev/null bs=1M 2>/dev/null & Z=$!",
        CMD,
    );
    source.run_ok(
        "while ! grep -q '^gen 1 ' /tmp/w.log; do sleep 0.1; done",
        CMD,
    );
    generations(&source.run_ok("cat /tmp/w.log", CMD)).len()
}

/// The destination QEMU, on the server at `socket`, waiting for the state
/// on `incoming`; its QMP at `qmp`.
fn start_destination(socket: &Path, qmp: &Path, incoming: &Path) -> (Guest, Qmp) {
    let mut dest_cfg = GuestConfig::new(socket, Boot::DirectKernel);
    dest_cfg.memory_mib = GUEST_MIB;
    dest_cfg.extra_args = vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
        "-incoming".into(),
        format!("unix:{}", incoming.display()),
    ];
    let dest = Guest::start(&dest_cfg);
    let qd = Qmp::connect(qmp, QMP).unwrap();
    assert!(wait_until(QMP, || incoming.exists()), "no incoming socket");
    (dest, qd)
}

/// Migrates `source` (QMP `qs`) to `incoming`, held until every page was
/// sent once; the probe then drains `area_a` and reads area B into its
/// buffer before the migration may complete.
fn migrate_across_the_probe(
    qs: &mut Qmp,
    source: &mut Guest,
    incoming: &Path,
    area_a: &[u8],
) -> MigrationStatus {
    qs.execute(
        "migrate-set-parameters",
        Some(serde_json::json!({"downtime-limit": 1, "max-bandwidth": 16u64 << 20})),
    )
    .unwrap();
    qs.execute(
        "migrate",
        Some(serde_json::json!({"uri": format!("unix:{}", incoming.display())})),
    )
    .unwrap();
    // Every page sent at least once.
    let s = poll_migration(qs, |s| s.dirty_sync_count >= 2);
    assert_eq!(
        s.status, "active",
        "the migration ended before the probe: {}",
        s.raw
    );
    // Drain A: the probe reads B into its buffer, pages the migration
    // has already sent and nothing has written since but the server.
    let drained = source.run_ok(PROBE_DRAIN, CMD);
    assert_eq!(
        printed_sha256(&drained),
        sha256_hex(area_a),
        "area A on the source"
    );
    source.run_ok(&probe_read_to(24 << 20), CMD);
    source.run_ok("kill $Z", CMD);
    let s = qs.query_migrate().unwrap();
    assert_eq!(
        s.status, "active",
        "the migration ended during the probe: {}",
        s.raw
    );
    qs.execute(
        "migrate-set-parameters",
        Some(serde_json::json!({"downtime-limit": 2000, "max-bandwidth": 1u64 << 30})),
    )
    .unwrap();
    let status = poll_migration(qs, |_| false);
    assert_eq!(status.status, "completed", "migration: {}", status.raw);
    status
}

/// Boots a guest on one server, starts the I/O loop, migrates it to a
/// second QEMU on a second server (started with `--wait-for-overlay`),
/// hands the overlay over and checks on the destination. With
/// `skip_log`, the source server does not log the request data it writes
/// into guest memory.
///
/// The probe makes a lost log visible deterministically. Its buffer holds
/// area A before the migration starts. The migration is held (tiny
/// downtime limit and bandwidth, a process dirtying memory: QEMU syncs the
/// dirty bitmap under its global lock only as often as the dirty pages
/// take to send, and the guest's console needs that lock too, so the
/// dirtied bytes must not be zeros) until every page was sent once. Then
/// the probe reads area B into the same buffer: only the server writes
/// those pages (the guest kernel zeroes a page when it allocates it, which
/// would mark it dirty, so a fresh buffer or page-cache page would not
/// do). Only then may the migration finish, and the destination reads B
/// out of the buffer: unlogged pages still hold A.
fn migrate_under_io(seed: &str, skip_log: bool) -> Migrated {
    let node = TestNode::small(seed);
    let data_off = node.partition_offset(3);
    let env: &[(&str, &str)] = if skip_log {
        &[(SKIP_DATA_LOG_ENV, "1")]
    } else {
        &[]
    };
    let mut source_server = node.serve_files_with_env(&node.socket(), &node.overlay(), &[], env);
    let dest_socket = node.dir().join("dest.sock");
    let mut dest_server = node.serve_files(
        &dest_socket,
        &node.overlay(),
        &["--wait-for-overlay", "120"],
    );
    let qmp_source = node.dir().join("qmp-source.sock");
    let qmp_dest = node.dir().join("qmp-dest.sock");
    let incoming = node.dir().join("migration.sock");

    let mut cfg = GuestConfig::new(&node.socket(), Boot::DirectKernel);
    cfg.memory_mib = GUEST_MIB;
    cfg.extra_args = vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp_source.display()),
    ];
    let mut source = Guest::start(&cfg);
    source.expect("ociblk-sample: ready", BOOT);
    source.expect("/ # ", CMD);
    let generations_before = start_io(&mut source);

    // The destination QEMU, on its own server, waiting for the state.
    let (mut dest, mut qd) = start_destination(&dest_socket, &qmp_dest, &incoming);

    let mut qs = Qmp::connect(&qmp_source, QMP).unwrap();
    let (area_a, area_b) = (blocks("A", 1, 1024), blocks("B", 1, 1024));
    let status = migrate_across_the_probe(&mut qs, &mut source, &incoming, &area_a);
    let running = qd.execute("query-status", None).unwrap();
    assert_eq!(running["status"], "running", "destination: {running}");
    eprintln!(
        "migration{}: downtime {:?} ms, total {:?} ms, setup {:?} ms",
        if skip_log {
            " without the data log"
        } else {
            ""
        },
        status.downtime_ms,
        status.total_time_ms,
        status.setup_time_ms
    );
    // The source QEMU stopped its device before completing: its server
    // finishes, flushes and releases the overlay; the destination's takes it.
    source_server.stop_cleanly(Duration::from_secs(30), "stopping the source server");
    qs.execute("quit", None).ok();
    source.wait_exit(Duration::from_secs(30));

    // B, as the probe's buffer holds it on the destination.
    let held = dest.run_ok(PROBE_DRAIN, CMD);
    let probe_ok = printed_sha256(&held) == sha256_hex(&area_b);
    dest.run_ok("wait $P; touch /tmp/stop; wait $W", CMD);
    let loop_log = dest.run_ok("cat /tmp/w.log", CMD);
    let generations = generations(&loop_log);
    dest.send("poweroff -f");
    dest.wait_exit(Duration::from_secs(60));
    dest_server.wait_for_line(&[OPENED]);
    dest_server.stop_cleanly(Duration::from_secs(30), "stopping the destination server");
    Migrated {
        probe_ok,
        loop_log,
        generations,
        generations_before,
        status,
        disk: node.export_bytes(true),
        data_off,
    }
}

#[test]
fn a_node_migrates_under_io_without_a_wrong_byte() {
    let m = migrate_under_io("migrate-1", false);
    assert!(m.probe_ok, "the probe read on the destination differs");
    let (last, _) = *m.generations.last().expect("the loop ran");
    assert!(
        m.generations.iter().all(|(_, state)| state == "ok"),
        "every generation verified:\n{}",
        m.loop_log
    );
    assert!(
        m.generations.len() > m.generations_before,
        "the loop ran across the migration: {} before, {:?} in all",
        m.generations_before,
        m.generations
    );
    // The exported overlay holds the last generation and the probe area.
    let at = |off: u64, len: usize| &m.disk[off as usize..off as usize + len];
    assert!(
        at(m.data_off, 1 << 20) == blocks("W", last, 256).as_slice(),
        "generation {last} in the exported disk"
    );
    assert!(
        at(m.data_off + (16 << 20), 4 << 20) == blocks("A", 1, 1024).as_slice(),
        "probe area A in the exported disk"
    );
    assert!(
        at(m.data_off + (20 << 20), 4 << 20) == blocks("B", 1, 1024).as_slice(),
        "probe area B in the exported disk"
    );
    assert!(m.status.downtime_ms.is_some() && m.status.total_time_ms.is_some());
}

/// The same migration with the server's logging of request data turned
/// off must lose bytes, and the checks above must see it.
#[test]
fn without_the_servers_dirty_log_the_migration_test_fails() {
    let m = migrate_under_io("migrate-2", true);
    assert!(
        !m.probe_ok,
        "with request data unlogged, the destination still read the probe right: \
         the test cannot see a missing dirty-page log"
    );
}
