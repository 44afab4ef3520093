//! End to end: QEMU guests (TCG) booting the sample OS image from
//! `ociblk serve` over vhost-user-blk, by direct kernel boot and by OVMF from
//! the virtual ESP; writes surviving reboots and restarts; QEMU reconnecting
//! to a restarted server; several request queues at once; a corrupted
//! payload never reaching the guest.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ociblk_tests::node::TestNode;
use ociblk_tests::oci::sha256_hex;
use ociblk_tests::process::{Boot, Guest, GuestConfig, Server};
use ociblk_tests::support::wait_until;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Boot to the ready line (TCG, possibly several guests at once).
const BOOT: Duration = Duration::from_secs(120);
/// One guest shell command.
const CMD: Duration = Duration::from_secs(60);
/// A process exiting after a signal or power-off.
const EXIT: Duration = Duration::from_secs(60);

/// A partition as `inspect --json` describes it.
struct Part {
    number: u64,
    name: String,
    first_lba: u64,
    size: u64,
}

fn partitions(info: &Value) -> Vec<Part> {
    info["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Part {
            number: p["number"].as_u64().unwrap(),
            name: p["name"].as_str().unwrap().to_owned(),
            first_lba: p["first_lba"].as_u64().unwrap(),
            size: p["size"].as_u64().unwrap(),
        })
        .collect()
}

/// Path of payload `name` (inspect gives it absolute for an absolute image).
fn payload_path(info: &Value, name: &str) -> PathBuf {
    let p = info["payloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no payload {name} in inspect output"));
    PathBuf::from(p["path"].as_str().unwrap())
}

/// sha256 of every payload blob, to show serving never changes them.
fn payload_hashes(info: &Value) -> Vec<String> {
    info["payloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| sha256_hex(&fs::read(p["path"].as_str().unwrap()).unwrap()))
        .collect()
}

/// `/system/data/blob.bin` as `hack/mkimage` makes it: SHA-256 in counter
/// mode from a fixed seed.
fn sample_blob() -> Vec<u8> {
    (0..32768)
        .flat_map(|i| Sha256::digest(format!("ociblk-sample blob.bin {i}")))
        .collect()
}

fn read_at(file: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fs::File::open(file)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Starts QEMU and waits for the sample system's shell.
fn boot(cfg: &GuestConfig) -> Guest {
    let mut guest = Guest::start(cfg);
    wait_shell(&mut guest);
    guest
}

/// Waits for the (next) ready line and shell prompt, then makes pipelines
/// fail when any part fails.
fn wait_shell(guest: &mut Guest) {
    guest.expect("ociblk-sample: ready", BOOT);
    guest.expect("/ # ", CMD);
    guest.run_ok("set -o pipefail", CMD);
}

/// Lines the guest printed with `echo "@$((6*7)) ..."`: the terminal's
/// echo of the command shows `@$((6*7))`, never `@42`.
const TAG: &str = "@$((6*7))";

fn tagged(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("@42 "))
        .map(str::to_owned)
        .collect()
}

/// sha256 of what `source` (a shell pipeline) writes to stdout.
fn guest_sha256(guest: &mut Guest, source: &str) -> String {
    let out = guest.run_ok(&format!("{source} | sha256sum"), CMD);
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .find(|w| w.len() == 64 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no sha256 in the output of {source:?}:\n{out}"))
        .to_owned()
}

/// The guest's block device (`vdaN`) for the partition named `name`.
fn guest_dev(guest: &mut Guest, name: &str) -> String {
    let out = guest.run_ok(
        &format!(
            "for f in $(grep -lx PARTNAME={name} /sys/class/block/vda*/uevent); do echo \"{TAG} $f\"; done"
        ),
        CMD,
    );
    let lines = tagged(&out);
    assert_eq!(lines.len(), 1, "partition {name} in the guest:\n{out}");
    lines[0]
        .strip_prefix("/sys/class/block/")
        .and_then(|s| s.strip_suffix("/uevent"))
        .unwrap()
        .to_owned()
}

/// Mounts the data partition (ext2 made before) at /data.
fn mount_data(guest: &mut Guest, dev: &str) {
    guest.run_ok(
        &format!("mkdir -p /data && mount -t ext4 /dev/{dev} /data"),
        CMD,
    );
}

/// Powers the guest off and waits for QEMU to exit by itself.
fn power_off(guest: &mut Guest) {
    guest.send("poweroff -f");
    let status = guest.wait_exit(EXIT);
    assert!(status.success(), "QEMU exited with {status} after poweroff");
}

/// Whether a server log line says `message` (tracing's fmt output).
fn log_has(server: &Server, message: &str) -> bool {
    server.log.text().lines().any(|l| l.contains(message))
}

#[test]
fn guest_sees_partitions_esp_and_system() {
    let node = TestNode::new("e2e-1");
    let info = node.inspect();
    let _server = node.serve(&[]);
    let mut guest = boot(&node.guest_config(Boot::DirectKernel));

    // Disk size and serial (GET_ID: the seed by default).
    let out = guest.run_ok(
        &format!("echo \"{TAG} $(cat /sys/block/vda/size) $(cat /sys/block/vda/serial)\""),
        CMD,
    );
    assert_eq!(
        tagged(&out),
        [format!("{} e2e-1", info["disk"]["sectors"])],
        "disk sectors and serial:\n{out}"
    );

    // Partitions: number, GPT name, start and size in sectors.
    let out = guest.run_ok(
        &format!(
            "for d in /sys/class/block/vda?*; do echo \"{TAG} $(cat $d/partition) \
             $(sed -n s/^PARTNAME=//p $d/uevent) $(cat $d/start) $(cat $d/size)\"; done"
        ),
        CMD,
    );
    let mut seen = tagged(&out);
    seen.sort();
    let mut want: Vec<String> = partitions(&info)
        .iter()
        .map(|p| format!("{} {} {} {}", p.number, p.name, p.first_lba, p.size / 512))
        .collect();
    want.sort();
    assert_eq!(seen, want, "guest partitions differ from inspect:\n{out}");

    // The ESP: both boot paths hold the kernel payload.
    let kernel = sha256_hex(&fs::read(payload_path(&info, "kernel.efi")).unwrap());
    let esp = guest_dev(&mut guest, "ESP");
    // The kernel's default iocharset (ascii) is not in the initramfs.
    guest.run_ok(
        &format!("mkdir -p /mnt && mount -t vfat -o ro,iocharset=iso8859-1 /dev/{esp} /mnt"),
        CMD,
    );
    for file in ["EFI/metropolis/boot-a.efi", "EFI/BOOT/BOOTx64.EFI"] {
        let got = guest_sha256(&mut guest, &format!("cat /mnt/{file}"));
        assert_eq!(got, kernel, "sha256 of {file} on the guest's ESP");
    }
    guest.run_ok("umount /mnt", CMD);

    // System A: the erofs the initramfs mounted checks out file by file.
    let out = guest.run_ok("(cd /system && sha256sum -c MANIFEST.sha256)", CMD);
    assert!(
        out.contains("data/blob.bin: OK") && !out.contains("FAILED"),
        "sha256sum -c:\n{out}"
    );
    let blob = sha256_hex(&sample_blob());
    assert_eq!(
        guest_sha256(&mut guest, "cat /system/data/blob.bin"),
        blob,
        "sha256 of /system/data/blob.bin"
    );
    // The partition starts with the system payload, zeros after it.
    let system = fs::read(payload_path(&info, "system")).unwrap();
    let dev = guest_dev(&mut guest, "METROPOLIS-SYSTEM-A");
    assert_eq!(
        guest_sha256(&mut guest, &format!("head -c {} /dev/{dev}", system.len())),
        sha256_hex(&system),
        "system A's first bytes in the guest"
    );
    let after = (system.len() as u64).div_ceil(4096);
    assert_eq!(
        guest_sha256(
            &mut guest,
            &format!("dd if=/dev/{dev} bs=4096 skip={after} count=256 2>/dev/null")
        ),
        sha256_hex(&vec![0u8; 1 << 20]),
        "system A after the payload"
    );

    power_off(&mut guest);
}

#[test]
fn data_survives_guest_reboot_and_qemu_restart() {
    let node = TestNode::new("e2e-2");
    let info = node.inspect();
    let before = payload_hashes(&info);
    let blob = sha256_hex(&sample_blob());
    let mut server = node.serve(&[]);
    let cfg = node.guest_config(Boot::DirectKernel);
    let mut guest = boot(&cfg);

    let data = guest_dev(&mut guest, "METROPOLIS-NODE-DATA");
    guest.run_ok(&format!("mke2fs -q /dev/{data}"), Duration::from_secs(180));
    mount_data(&mut guest, &data);
    guest.run_ok(
        "echo written-by-e2e-2 > /data/hello && cp /system/data/blob.bin /data/blob.bin",
        CMD,
    );
    guest.run_ok("sync && umount /data", CMD);

    // Both files, as written.
    let check = |guest: &mut Guest, when: &str| {
        mount_data(guest, &data);
        let out = guest.run_ok(&format!("echo \"{TAG} $(cat /data/hello)\""), CMD);
        assert_eq!(
            tagged(&out),
            ["written-by-e2e-2"],
            "/data/hello {when}:\n{out}"
        );
        assert_eq!(
            guest_sha256(guest, "cat /data/blob.bin"),
            blob,
            "/data/blob.bin {when}"
        );
        guest.run_ok("umount /data", CMD);
    };

    // A guest reboot: QEMU resets the device on the same connection.
    guest.send("reboot -f");
    wait_shell(&mut guest);
    check(&mut guest, "after a guest reboot");

    // A new QEMU on the same server.
    guest.kill();
    let mut guest = boot(&cfg);
    check(&mut guest, "after a QEMU restart");

    // SIGTERM with the guest still connected: clean exit, socket removed.
    server.stop_cleanly(EXIT, "stopping");
    assert!(
        !node.socket().exists(),
        "socket left behind after SIGTERM:\n{}",
        server.log.text()
    );
    guest.kill();

    // A new server on the same overlay.
    let _server = node.serve(&[]);
    let mut guest = boot(&cfg);
    check(&mut guest, "after a server restart");
    power_off(&mut guest);

    assert_eq!(payload_hashes(&info), before, "payload blobs changed");
}

/// Where (in 64 KiB units of the data partition) the write completed but not
/// flushed before the kill goes: past the in-flight writer's 64 MiB.
const WINDOW_SEEK: u64 = 2048;

/// O_DIRECT readers running across the restart in `qemu_reconnects_after_server_restart`.
const DIRECT_READERS: u64 = 8;

#[test]
fn qemu_reconnects_after_server_restart() {
    let node = TestNode::new("e2e-3");
    let info = node.inspect();
    let parts = partitions(&info);
    let base = node.export(false);
    let blob = sample_blob();
    let server = node.serve(&[]);
    let mut cfg = node.guest_config(Boot::DirectKernel);
    cfg.reconnect = true;
    let mut guest = boot(&cfg);
    let data = guest_dev(&mut guest, "METROPOLIS-NODE-DATA");
    let esp = parts.iter().find(|p| p.name == "ESP").unwrap();
    let data_start = parts
        .iter()
        .find(|p| p.name == "METROPOLIS-NODE-DATA")
        .unwrap()
        .first_lba
        * 512;

    // 1 MiB inside the kernel file on the ESP, 8 MiB into the partition.
    let offset = esp.first_lba * 512 + (8 << 20);
    let want = read_at(&base, offset, 1 << 20);
    assert!(want.iter().any(|&b| b != 0), "test region is all zero");
    let want = sha256_hex(&want);
    let read = format!(
        "echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/vda bs=4096 skip={} count=256 2>/dev/null",
        offset / 4096
    );
    assert_eq!(
        guest_sha256(&mut guest, &read),
        want,
        "read before the restart"
    );

    write_unflushed(&node, &mut guest, &data);

    let esp_mib = (esp.first_lba * 512) >> 20;
    start_io_in_flight(&mut guest, &data, esp_mib);
    // Still running: the restart below happens with requests in flight.
    guest.run_ok("test ! -s /tmp/r", CMD);
    let mut server = kill_and_restart(&node, server);

    // The guest reads its completed write back from the new server, and its
    // next FLUSH goes there.
    assert_eq!(
        guest_sha256(
            &mut guest,
            &format!(
                "dd if=/dev/{data} iflag=direct bs=64k skip={WINDOW_SEEK} count=16 2>/dev/null"
            )
        ),
        sha256_hex(&blob),
        "the write completed before the kill, unflushed, reads back after the restart"
    );
    guest.run_ok(
        &format!("dd if=/dev/null of=/dev/{data} count=0 conv=fsync 2>/dev/null"),
        CMD,
    );
    check_io_in_flight(&mut guest, &base, esp_mib);

    // New reads and writes on the new connection.
    assert_eq!(
        guest_sha256(&mut guest, &read),
        want,
        "read after the restart"
    );
    guest.run_ok(
        &format!(
            "dd if=/system/data/blob.bin of=/dev/{data} bs=4096 seek=20000 conv=fsync && sync"
        ),
        CMD,
    );
    assert_eq!(
        guest_sha256(
            &mut guest,
            &format!(
                "echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/{data} bs=4096 skip=20000 count=256 2>/dev/null"
            )
        ),
        sha256_hex(&blob),
        "write read back after the restart"
    );
    power_off(&mut guest);
    server.stop_cleanly(EXIT, "stopping");

    // Both writes are in the overlay.
    check_overlay_after_restart(&node, data_start, &blob);
}

/// Writes blob.bin at [`WINDOW_SEEK`] of the data partition `data`, in the
/// window a restart must not lose: a write the guest saw complete
/// (O_DIRECT, so no page cache) with no FLUSH after it. The map on disk
/// does not have it yet: only the server's live map does.
fn write_unflushed(node: &TestNode, guest: &mut Guest, data: &str) {
    let durable = |node: &TestNode| node.overlay_info_json()["blocks_written"].as_u64().unwrap();
    let before = durable(node);
    guest.run_ok(
        &format!(
            "dd if=/system/data/blob.bin of=/dev/{data} bs=64k seek={WINDOW_SEEK} oflag=direct 2>/dev/null"
        ),
        CMD,
    );
    assert_eq!(
        durable(node),
        before,
        "the window write was flushed before the kill: the test would prove nothing"
    );
}

/// Starts, in the background, reads of the ESP (which starts at MiB
/// `esp_mib`) and writes of the data partition `data` that take seconds.
fn start_io_in_flight(guest: &mut Guest, data: &str, esp_mib: u64) {
    // I/O in flight across the restart: a 128 MiB reader (the ESP), eight
    // O_DIRECT readers of 8 MiB each that keep a deeper queue (the server
    // runs a queue's requests concurrently and must still complete them
    // in order for the restart to be exact) and a 64 MiB writer (blob.bin
    // over and over, each piece fsynced) take seconds under TCG. Observed with QEMU 7.2: when the backend dies,
    // QEMU cannot fetch the ring state ("vhost VQ n ring restore failed" on
    // its stderr), rewinds each queue to its used index, and on reconnect
    // the new server processes every request the old one had not
    // completed, so both jobs finish with the right bytes (ociblk offers no
    // inflight tracking and needs none for this).
    guest.run_ok(
        &format!(
            "(dd if=/dev/vda bs=1M skip={esp_mib} count=128 2>/dev/null | sha256sum > /tmp/r) & rp=$!; \
             (for k in $(seq 0 63); do dd if=/system/data/blob.bin of=/dev/{data} bs=64k \
             seek=$((k * 16)) conv=fsync 2>/dev/null || exit 1; done) & wp=$!; \
             dps=; for k in $(seq 0 {last}); do \
             (dd if=/dev/vda iflag=direct bs=64k skip=$(( ({esp_mib} + k * 8) * 16 )) count=128 \
             2>/dev/null | sha256sum > /tmp/d$k) & dps=\"$dps $!\"; done",
            last = DIRECT_READERS - 1,
        ),
        CMD,
    );
}

/// SIGKILLs `server` and starts a new one on the old socket, which it
/// replaces; QEMU reconnects to it.
fn kill_and_restart(node: &TestNode, mut server: Server) -> Server {
    let status = server.stop_with(libc::SIGKILL, EXIT);
    assert!(!status.success(), "SIGKILL should not exit cleanly");
    drop(server);
    let server = node.serve(&[]);
    assert!(
        wait_until(Duration::from_secs(30), || log_has(
            &server,
            "frontend connected"
        )),
        "QEMU did not reconnect to the new server:\n{}",
        server.log.text()
    );
    server
}

/// Waits for the I/O [`start_io_in_flight`] started and compares what its
/// readers read with the exported disk `base`.
fn check_io_in_flight(guest: &mut Guest, base: &Path, esp_mib: u64) {
    let out = guest.run_ok(
        &format!(
            "wait $rp && wait $wp && for p in $dps; do wait $p || exit 1; done && \
             echo \"{TAG} $(cut -c1-64 /tmp/r)\" && \
             for k in $(seq 0 {last}); do echo \"{TAG} $(cut -c1-64 /tmp/d$k)\"; done",
            last = DIRECT_READERS - 1,
        ),
        Duration::from_secs(180),
    );
    let mut want_reads = vec![sha256_hex(&read_at(base, esp_mib << 20, 128 << 20))];
    want_reads.extend(
        (0..DIRECT_READERS).map(|k| sha256_hex(&read_at(base, (esp_mib + k * 8) << 20, 8 << 20))),
    );
    assert_eq!(
        tagged(&out),
        want_reads,
        "reads in flight across the restart:\n{out}"
    );
}

/// The write in flight across the restart, the write after it and the
/// unflushed write before the kill are all in the exported overlay.
fn check_overlay_after_restart(node: &TestNode, data_start: u64, blob: &[u8]) {
    let disk = node.export(true);
    assert!(
        read_at(&disk, data_start, 64 << 20) == blob.repeat(64),
        "the write in flight across the restart is not in the exported overlay"
    );
    assert!(
        read_at(&disk, data_start + 20000 * 4096, 1 << 20) == blob,
        "the write after the restart is not in the exported overlay"
    );
    assert!(
        read_at(&disk, data_start + WINDOW_SEEK * (64 << 10), blob.len()) == blob,
        "the write completed before the kill, unflushed, is not in the exported overlay"
    );
}

#[test]
fn uefi_boots_kernel_from_the_virtual_esp() {
    let node = TestNode::new("e2e-4");
    let system_a = partitions(&node.inspect())
        .iter()
        .find(|p| p.name == "METROPOLIS-SYSTEM-A")
        .unwrap()
        .number;
    let vars = node.dir().join("OVMF_VARS.fd");
    fs::copy("/usr/share/OVMF/OVMF_VARS.fd", &vars).expect("copy OVMF_VARS.fd (run hack/setup)");
    let _server = node.serve(&[]);
    let mut cfg = node.guest_config(Boot::Uefi);
    cfg.vars = Some(vars);

    // No -kernel: OVMF loads EFI/BOOT/BOOTx64.EFI (the kernel.efi payload)
    // from the served ESP; its initramfs finds system A by name.
    let mut guest = Guest::start(&cfg);
    let boot_log = guest.expect("ociblk-sample: ready", BOOT);
    let mounted = format!("ociblk-sample: system mounted from /dev/vda{system_a}");
    assert!(
        boot_log.contains(&mounted),
        "no {mounted:?} in the boot log:\n{boot_log}"
    );
    guest.expect("/ # ", CMD);
    // Booted by firmware: EFI runtime services are there.
    guest.run_ok("test -d /sys/firmware/efi", CMD);
    power_off(&mut guest);
}

#[test]
fn multiqueue_guest_io() {
    let node = TestNode::new("e2e-5");
    let base = node.export(false);
    let mut server = node.serve(&["--queues", "4"]);
    let mut cfg = node.guest_config(Boot::DirectKernel);
    cfg.queues = 4;
    let mut guest = boot(&cfg);
    let data = guest_dev(&mut guest, "METROPOLIS-NODE-DATA");
    let out = guest.run_ok(
        &format!("echo \"{TAG} $(ls /sys/block/vda/mq | wc -l)\""),
        CMD,
    );
    let hw_queues: usize = tagged(&out)
        .first()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no queue count in:\n{out}"));
    assert!(hw_queues >= 2, "guest uses {hw_queues} queue(s):\n{out}");

    // Four readers (pinned to alternate CPUs, so to different queues) and a
    // writer, all at once; each job's status is collected.
    let cmd = format!(
        "p=; for i in 0 1 2 3; do (taskset $((1 << (i % 2))) dd if=/dev/vda bs=1M count=64 \
         skip=$((i * 64)) 2>/dev/null | sha256sum > /tmp/h$i) & p=\"$p $!\"; done; \
         (for k in 0 1 2 3 4 5 6 7; do taskset 2 dd if=/system/data/blob.bin of=/dev/{data} \
         bs=64k seek=$((k * 16)) conv=fsync 2>/dev/null || exit 1; done) & p=\"$p $!\"; \
         r=0; for j in $p; do wait $j || r=1; done; test $r = 0"
    );
    guest.run_ok(&cmd, Duration::from_secs(180));
    let out = guest.run_ok(
        &format!("for i in 0 1 2 3; do echo \"{TAG} $(cut -c1-64 /tmp/h$i)\"; done"),
        CMD,
    );
    let want: Vec<String> = (0..4u64)
        .map(|i| sha256_hex(&read_at(&base, i * (64 << 20), 64 << 20)))
        .collect();
    assert_eq!(tagged(&out), want, "sha256 of what the readers read");
    let blob = sample_blob();
    assert_eq!(
        guest_sha256(
            &mut guest,
            &format!(
                "echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/{data} bs=1M count=8 2>/dev/null"
            )
        ),
        sha256_hex(&blob.repeat(8)),
        "writer's data read back"
    );
    power_off(&mut guest);

    server.stop_cleanly(EXIT, "stopping");
    assert!(
        wait_until(Duration::from_secs(10), || log_has(&server, "stopped")),
        "no final log line:\n{}",
        server.log.text()
    );
    // "queue statistics queue=N requests=M errors=E", one line per busy queue.
    let log = server.log.text();
    let stats: Vec<(u64, u64, u64)> = log
        .lines()
        .filter(|l| l.contains("queue statistics"))
        .map(|l| {
            let field = |key: &str| -> u64 {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {key} in {l:?}"))
            };
            (field("queue="), field("requests="), field("errors="))
        })
        .collect();
    let busy = stats.iter().filter(|s| s.1 > 0).count();
    assert!(busy >= 2, "requests on {busy} queue(s) only:\n{log}");
    assert!(stats.iter().all(|s| s.2 == 0), "queue errors:\n{log}");
}

#[test]
fn corrupted_system_payload_fails_the_guest_mount_with_an_io_error() {
    // A copy of the sample image with real files, one bit flipped in the
    // system payload's first chunk, far from the erofs superblock: the
    // whole chunk is checked before any byte of it reaches the guest.
    let node = TestNode::with_sample_copy("e2e-6");
    let system = payload_path(&node.inspect(), "system");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&system)
        .unwrap();
    let at = 300_000;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 1], at).unwrap();

    let server = node.serve(&[]);
    let mut guest = Guest::start(&node.guest_config(Boot::DirectKernel));
    guest.expect("ociblk-sample: FATAL: cannot mount", BOOT);
    let status = guest.wait_exit(EXIT);
    assert!(status.success(), "QEMU exited with {status}");
    let console = &guest.transcript();
    // busybox prints strerror(EIO); erofs would complain about the
    // superblock's contents had it seen the corrupted bytes.
    assert!(
        console.contains("I/O error") || console.contains("Input/output error"),
        "no I/O error on the console:\n{console}"
    );
    assert!(
        !console.contains("ociblk-sample: ready") && !console.contains("valid erofs"),
        "{console}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            server.log.text().lines().any(|l| {
                l.contains("failed verification")
                    && l.contains("payload=system")
                    && l.contains("chunk=0")
            })
        }),
        "no verification failure in the server log:\n{}",
        server.log.text()
    );
}
