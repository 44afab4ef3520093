#!/usr/bin/env python3
"""ociblk's fork benchmark (BENCHMARKS.md section 5): what it costs to fork a
saved 3-node cluster, per node, against a qcow2 linked clone of the same
state and against copying it; how soon a forked cluster is ready against a
fresh one that bootstraps; and reads through a chain of 3 frozen layers
against the same data in one overlay.

Contenders alternate within every repetition; each figure is the median of
the repetitions, comparisons are ratios of medians. Results go to
build/bench/fork.json; --write-md replaces section 5 of BENCHMARKS.md. Run
through `hack/bench --only-fork`, which builds the release binaries; this
script builds the `fork_prepare` example it times.
"""

import argparse
import json
import os
import re
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (BENCH, OCIBLK, ROOT, SECTOR, Contender, allocated, inspect, median,  # noqa: E402
                      bench_run, ratio, replace_section, run, stop)

FORK_PREPARE = ROOT / "target/release/examples/fork_prepare"
IMAGE = ROOT / "build/sample-image"
NODES = 3
READY = "ociblk-sample: ready"
KIB = 1024
MIB = 1 << 20
# Targets of the issue.
FORK_TIME_TARGET_S = 0.005
FORK_BYTES_TARGET = 64 * KIB
CHAIN_READ_TARGET = 0.95


def files_allocated(root):
    """Allocated bytes (st_blocks * 512) of the regular files under root."""
    total = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                total += allocated(p)
    return total


def run_measured(cmd, timeout=120):
    """Runs cmd to its end; returns (wall seconds, write_bytes, rusage,
    stdout). write_bytes is the kernel's count of bytes the process sent
    towards storage (/proc/PID/io write_bytes), read at its exit from
    wait4's ru_oublock (in 512-byte units)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err)
        pidfd = os.pidfd_open(p.pid)
        try:
            exited, _, _ = select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
        if not exited:
            p.kill()
        _, status, usage = os.wait4(p.pid, 0)
        elapsed = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if not exited or p.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({'timed out' if not exited else p.returncode}): "
                               f"{err.read().decode(errors='replace')}")
        return elapsed, usage.ru_oublock * 512, usage, out.read()


# --- launching clusters --------------------------------------------------------------

LINE = re.compile(rb"^\[(?P<node>[^\] ]+)\] ociblk-sample: (?P<what>product|bootstrapped|found state|ready)"
                  rb"(?::| (?P<id>\S+))?")


class LaunchRun:
    """One `ociblk launch` to its exit, with the host time of every guest
    console line it echoes (`[node] ociblk-sample: ...` on stderr) and of the
    moment it prints its table of times (stdout), which it does once every
    node showed --wait-for."""

    def __init__(self, args, log, timeout):
        self.args, self.log, self.timeout = args, log, timeout
        self.events = {}  # node -> {what: seconds since start}
        self.ids = {}  # node -> id from its bootstrapped / found state line
        self.table = {}  # node -> console-ready seconds, as launch reports them
        self.table_at = None  # seconds from start to the table's last line
        self.ended_at = None  # seconds from start to launch's exit
        self.rc = None

    def run(self):
        cmd = [str(OCIBLK), "launch", *map(str, self.args)]
        log = open(self.log, "wb")
        log.write((" ".join(cmd) + "\n").encode())
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        sel = selectors.DefaultSelector()
        bufs = {}
        for f in (p.stdout, p.stderr):
            os.set_blocking(f.fileno(), False)
            sel.register(f.fileno(), selectors.EVENT_READ)
            bufs[f.fileno()] = b""
        deadline = time.monotonic() + self.timeout
        try:
            while sel.get_map():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ociblk launch did not finish within {self.timeout} s (log {self.log})")
                for key, _ in sel.select(timeout=1.0):
                    fd = key.fileobj
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    now = time.perf_counter() - t0
                    if not chunk:
                        sel.unregister(fd)
                        continue
                    log.write(chunk)
                    bufs[fd] += chunk
                    *lines, bufs[fd] = bufs[fd].split(b"\n")
                    for line in lines:
                        if fd == p.stdout.fileno():
                            self._table_line(line, now)
                        else:
                            self._console_line(line, now)
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
            self.ended_at = time.perf_counter() - t0
        finally:
            # On an error or a timeout: SIGTERM makes launch tear its cluster
            # down (its children also die with it: PR_SET_PDEATHSIG).
            stop(p, signal.SIGTERM, timeout=90)
            log.close()
        self.rc = p.returncode
        if self.rc != 0:
            raise RuntimeError(f"ociblk launch exited {self.rc} (log {self.log})")
        return self

    def _console_line(self, line, now):
        m = LINE.match(line.rstrip(b"\r"))
        if m:
            node, what = m["node"].decode(), m["what"].decode()
            self.events.setdefault(node, {}).setdefault(what, now)
            if what in ("bootstrapped", "found state") and m["id"]:
                self.ids[node] = m["id"].decode()

    def _table_line(self, line, now):
        cols = re.split(r"\s{2,}", line.decode(errors="replace").strip())
        if len(cols) == 4 and cols[3].endswith(" s"):
            self.table[cols[0]] = float(cols[3][:-2])
            if len(self.table) == NODES:
                self.table_at = now

    def step(self, node, done):
        """Seconds between a node's product line (printed just before the
        bootstrap step) and its `done` line."""
        e = self.events.get(node, {})
        return e[done] - e["product"] if done in e and "product" in e else None


def launch_fresh(state_dir, log, timeout, extra=()):
    return LaunchRun(["--image", IMAGE, "--nodes", NODES, "--network", "--tpm", "--state-dir", state_dir,
                      "--wait-for", READY, "--timeout", f"{timeout}s", *extra], log, timeout + 120).run()


def launch_fork(snapshot, state_dir, log, timeout):
    return LaunchRun(["--from", snapshot, "--state-dir", state_dir, "--wait-for", READY,
                      "--timeout", f"{timeout}s", "--exit-when-ready"], log, timeout + 120).run()


def node_names():
    return [f"node-{i}" for i in range(1, NODES + 1)]


def check_nodes(r, what, ids=None):
    for n in node_names():
        if what not in r.events.get(n, {}):
            raise RuntimeError(f"{n} printed no '{what}' line (log {r.log})")
        if ids and r.ids.get(n) != ids[n]:
            raise RuntimeError(f"{n} found state {r.ids.get(n)}, the snapshot holds {ids[n]} (log {r.log})")
    if r.table_at is None:
        raise RuntimeError(f"ociblk launch printed no table of times (log {r.log})")


# --- 1. fork cost per node ------------------------------------------------------------


def prepare_references(snapshot, work):
    """Per node, its saved disk as a raw file and as a standalone qcow2
    (`ociblk export --overlay` of an overlay over the node's layer, then
    `qemu-img convert`): what a qcow2 user would publish and clone."""
    ref = work / "reference"
    run([FORK_PREPARE, snapshot, ref / "overlays", "--disk"])
    spec = json.loads((snapshot / "cluster.json").read_text())
    raws, qcows = {}, {}
    for node in spec["nodes"]:
        n = node["name"]
        raws[n], qcows[n] = ref / f"{n}.raw", ref / f"{n}.qcow2"
        run([OCIBLK, "export", "--image", spec["image"], "--seed", n, *spec["serve_args"], *node["serve_args"],
             "--overlay", ref / "overlays" / n / "node.overlay", "--output", raws[n]])
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raws[n], qcows[n]])
    return raws, qcows


def fork_ociblk(snapshot, dest, disk_only):
    args = [FORK_PREPARE, snapshot, dest] + (["--disk"] if disk_only else [])
    wall, written, usage, out = run_measured(args)
    r = json.loads(out)
    if r["nodes"] != NODES:
        raise RuntimeError(f"fork_prepare forked {r['nodes']} nodes, not {NODES}")
    overlays = sum(allocated(dest / n / "node.overlay") for n in node_names())
    return {"seconds": r["seconds"], "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "involuntary_switches": usage.ru_nivcsw, "write_bytes": written,
            "allocated": files_allocated(dest), "overlay_allocated": overlays}


def fork_per_node_commands(commands, made):
    wall = written = cpu = switches = 0
    for cmd in commands:
        w, b, usage, _ = run_measured(cmd)
        wall += w
        written += b
        cpu += usage.ru_utime + usage.ru_stime
        switches += usage.ru_nivcsw
    return {"seconds": wall, "wall": wall, "cpu": cpu, "involuntary_switches": switches, "write_bytes": written,
            "allocated": sum(allocated(p) for p in made)}


FORK_CONTENDERS = ["ociblk fork", "ociblk overlay only", "qcow2 linked clone", "cp qcow2", "cp raw disk"]


def bench_fork_cost(snapshot, raws, qcows, reps, work):
    samples = {c: [] for c in FORK_CONTENDERS}
    for rep in range(reps):
        order = FORK_CONTENDERS if rep % 2 == 0 else FORK_CONTENDERS[::-1]
        for c in order:
            dest = Path(tempfile.mkdtemp(dir=work, prefix="fork-"))
            try:
                if c == "ociblk fork":
                    r = fork_ociblk(snapshot, dest / "state", disk_only=False)
                elif c == "ociblk overlay only":
                    r = fork_ociblk(snapshot, dest / "state", disk_only=True)
                elif c == "qcow2 linked clone":
                    made = [dest / f"{n}.qcow2" for n in node_names()]
                    r = fork_per_node_commands(
                        [["qemu-img", "create", "-q", "-f", "qcow2", "-b", qcows[n], "-F", "qcow2", m]
                         for n, m in zip(node_names(), made)], made)
                elif c == "cp qcow2":
                    made = [dest / f"{n}.qcow2" for n in node_names()]
                    r = fork_per_node_commands(
                        [["cp", "--sparse=always", "--reflink=auto", qcows[n], m]
                         for n, m in zip(node_names(), made)], made)
                else:
                    made = [dest / f"{n}.raw" for n in node_names()]
                    r = fork_per_node_commands(
                        [["cp", "--sparse=always", "--reflink=auto", raws[n], m]
                         for n, m in zip(node_names(), made)], made)
            finally:
                shutil.rmtree(dest)
            per_node = {k: v / NODES for k, v in r.items()}
            samples[c].append(per_node)
            print(f"fork rep{rep} {c:20} {per_node['seconds'] * 1e3:8.2f} ms/node "
                  f"(wall {per_node['wall'] * 1e3:.2f} ms, CPU {per_node['cpu'] * 1e3:.2f} ms), "
                  f"{per_node['allocated'] / KIB:8.0f} KiB allocated, "
                  f"{per_node['write_bytes'] / KIB:8.0f} KiB write_bytes per node", flush=True)
    out = {}
    for c, rs in samples.items():
        out[c] = {k: median([r[k] for r in rs]) for k in rs[0]}
        out[c]["range_seconds"] = [min(r["seconds"] for r in rs), max(r["seconds"] for r in rs)]
    return {"per_node": out, "samples": samples, "load_average": os.getloadavg()[0]}


SYNC_CALLS = ("fsync", "fdatasync", "syncfs", "sync_file_range")


def count_syncs(commands, summary):
    """Runs commands under `strace -f -c -w`; returns the sync calls they
    made and the wall time those took (a diagnostic: strace slows the
    rest)."""
    calls, seconds = 0, 0.0
    for cmd in commands:
        run(["strace", "-f", "-c", "-w", "-o", summary, "-e", "trace=" + ",".join(SYNC_CALLS), *cmd])
        for line in summary.read_text().splitlines():
            cols = line.split()
            # % time, seconds, usecs/call, calls, [errors,] syscall
            if len(cols) >= 5 and cols[-1] in SYNC_CALLS:
                seconds += float(cols[1])
                calls += int(cols[3])
    return {"calls": calls, "seconds": seconds}


def sync_breakdown(snapshot, qcows, work):
    """The syncs of one more ociblk fork and of the qcow2 linked clones of
    its nodes."""
    if not shutil.which("strace"):
        return None
    dest = Path(tempfile.mkdtemp(dir=work, prefix="strace-"))
    try:
        fork = count_syncs([[FORK_PREPARE, snapshot, dest / "state"]], dest / "summary")
        qcow2 = count_syncs([["qemu-img", "create", "-q", "-f", "qcow2", "-b", qcows[n], "-F", "qcow2",
                              dest / f"{n}.qcow2"] for n in node_names()], dest / "summary")
        return {"ociblk fork": fork, "qcow2 linked clone": qcow2}
    finally:
        shutil.rmtree(dest)


def state_file_sizes(snapshot):
    """Sizes of the small state files a fork copies, for node-1."""
    node = snapshot / "node-1"
    vars_bytes = (node / "OVMF_VARS.fd").stat().st_size
    tpm = sum(p.stat().st_size for p in (node / "tpm").iterdir() if p.is_file()) if (node / "tpm").is_dir() else 0
    return {"ovmf_vars": vars_bytes, "tpm": tpm}


# --- 2. time to ready -------------------------------------------------------------------


def bench_ready(snapshot, ids, reps, timeout, work, logs):
    samples = {"fresh": [], "fork": []}
    for rep in range(reps):
        order = ["fresh", "fork"] if rep % 2 == 0 else ["fork", "fresh"]
        for c in order:
            state = Path(tempfile.mkdtemp(dir=work, prefix=f"{c}-"))
            log = logs / f"ready-{c}-rep{rep}.log"
            try:
                if c == "fresh":
                    r = launch_fresh(state / "cluster", log, timeout, ["--exit-when-ready"])
                    check_nodes(r, "bootstrapped")
                    step = [r.step(n, "bootstrapped") for n in node_names()]
                else:
                    r = launch_fork(snapshot, state / "cluster", log, timeout)
                    check_nodes(r, "found state", ids)
                    step = [r.step(n, "found state") for n in node_names()]
            finally:
                shutil.rmtree(state)
            # A console line garbled by kernel messages leaves a node out.
            step = [x for x in step if x is not None] or [float("nan")]
            s = {"ready_s": r.table_at, "launch_reported_s": max(r.table.values()),
                 "node_ready_s": r.table, "step_s": step,
                 "product_s": [r.events[n].get("product", float("nan")) for n in node_names()]}
            samples[c].append(s)
            print(f"ready rep{rep} {c:5} all nodes ready after {s['ready_s']:.2f} s (launch's table: "
                  f"{s['launch_reported_s']:.2f} s); bootstrap step per node "
                  + ", ".join(f"{x:.2f} s" for x in step), flush=True)
    out = {}
    for c, rs in samples.items():
        out[c] = {"ready_s": median([r["ready_s"] for r in rs]),
                  "launch_reported_s": median([r["launch_reported_s"] for r in rs]),
                  "ready_range_s": [min(r["ready_s"] for r in rs), max(r["ready_s"] for r in rs)],
                  # The nodes bootstrap in parallel: the cluster waits for the slowest.
                  "step_max_s": median([max(r["step_s"]) for r in rs]),
                  "step_node_median_s": median([x for r in rs for x in r["step_s"]]),
                  "product_max_s": median([max(r["product_s"]) for r in rs])}
    return {"median": out, "samples": samples, "load_average": os.getloadavg()[0]}


# --- 3. reads through a chain of layers ----------------------------------------------------


def dump_hash(sock):
    return json.loads(run([BENCH, "dump", "--socket", sock, "--json"], timeout=600).stdout)["sha256"]


def serve_cmd(sock, overlay, layers=()):
    cmd = [OCIBLK, "serve", "--image", IMAGE, "--seed", "chain", "--socket", sock, "--overlay", overlay,
           "--queues", "1"]
    for layer in layers:
        cmd += ["--layer", layer]
    return cmd


def layer_writes(k, offset, length):
    """Layer k's writes: 64 KiB writes over a quarter of the region and 4 KiB
    writes over a 32nd, at random offsets, one at a time so that a replay
    leaves the same bytes."""
    common = ["--rw", "randwrite", "--iodepth", "1", "--queues", "1", "--offset", offset, "--length", length]
    return [common + ["--bs", "64K", "--size", length // 4, "--seed", k],
            common + ["--bs", "4K", "--size", length // 32, "--seed", 100 + k]]


def bench_chain(reps, runtime, region_len, work, logs):
    info = inspect(IMAGE, "chain")
    offset = info["partitions"][3]["first_lba"] * SECTOR
    d = work / "chain"
    d.mkdir()
    sock = d / "s.sock"
    top, single = d / "top.overlay", d / "single.overlay"
    layers = [d / f"L{k}.layer" for k in (1, 2, 3)]

    def with_server(cmd, log, fn):
        c = Contender("serve", cmd, sock, log)
        c.start()
        try:
            return fn(c.proc.pid)
        finally:
            c.stop()

    # The chain: write, stop, freeze, three times (the overlay then sits
    # over all three layers; it is not read below).
    for k, layer in enumerate(layers, 1):
        with_server(serve_cmd(sock, top), logs / f"chain-write-{k}.log",
                    lambda _: [bench_run(sock, job) for job in layer_writes(k, offset, region_len)])
        run([OCIBLK, "overlay", "freeze", top, layer])
    # The same writes, in the same order, into one overlay.
    with_server(serve_cmd(sock, single), logs / "single-write.log",
                lambda _: [bench_run(sock, job) for k in (1, 2, 3) for job in layer_writes(k, offset, region_len)])
    layer_info = [json.loads(run([OCIBLK, "overlay", "info", "--json", layer]).stdout) for layer in layers]

    region = ["--offset", offset, "--length", region_len]
    jobs = [("seqread 1M", ["--rw", "read", "--bs", "1M", "--iodepth", "4", "--queues", "1", "--runtime", runtime,
                            *region], "mib_s"),
            ("randread 4K QD32", ["--rw", "randread", "--bs", "4K", "--iodepth", "32", "--queues", "1",
                                  "--runtime", runtime, *region], "iops")]
    contenders = ["3-layer chain", "single overlay"]
    samples = {j: {c: [] for c in contenders} for j, _, _ in jobs}
    hashes = {}
    for rep in range(reps):
        order = contenders if rep % 2 == 0 else contenders[::-1]
        for c in order:
            new = d / "new.overlay"
            if new.exists():
                new.unlink()
            cmd = serve_cmd(sock, new, layers) if c == "3-layer chain" else serve_cmd(sock, single)

            def measure(_):
                if rep == 0:
                    # The same disk both ways, or the comparison means nothing.
                    hashes[c] = dump_hash(sock)
                # Page cache warm over the region, as on a host running nodes.
                bench_run(sock, ["--rw", "read", "--bs", "1M", "--iodepth", "4", *region, "--size", region_len])
                for job, args, metric in jobs:
                    r = bench_run(sock, args)
                    samples[job][c].append(r)
                    print(f"chain rep{rep} {c:14} {job:17} {r[metric]:10.1f} {metric} "
                          f"p50 {r['lat_us']['p50']:.1f} us p99 {r['lat_us']['p99']:.1f} us", flush=True)
            with_server(cmd, logs / f"chain-read-{c.replace(' ', '-')}-rep{rep}.log", measure)
    if len(set(hashes.values())) != 1:
        raise RuntimeError(f"the chain and the single overlay serve different disks: {hashes}")
    # A diagnostic pass: the server's read calls per 1 MiB request.
    seq = ["--rw", "read", "--bs", "1M", "--iodepth", "4", *region, "--size", region_len]
    reads = {}
    if shutil.which("strace"):
        for c in contenders:
            new = d / "new.overlay"
            if new.exists():
                new.unlink()
            cmd = serve_cmd(sock, new, layers) if c == "3-layer chain" else serve_cmd(sock, single)
            name = c.replace(" ", "-")
            calls = with_server(cmd, logs / f"chain-strace-{name}.log",
                                lambda pid: server_read_calls(pid, sock, seq, logs / f"strace-{name}.txt"))
            reads[c] = calls / (region_len / MIB)
    rows = []
    for job, _, metric in jobs:
        row = {"job": job, "metric": metric, "median": {}, "range": {}, "p50_us": {}, "p99_us": {}}
        for c in contenders:
            rs = samples[job][c]
            row["median"][c] = median([r[metric] for r in rs])
            row["range"][c] = [min(r[metric] for r in rs), max(r[metric] for r in rs)]
            row["p50_us"][c] = median([r["lat_us"]["p50"] for r in rs])
            row["p99_us"][c] = median([r["lat_us"]["p99"] for r in rs])
        rows.append(row)
    written = [li["blocks_written"] for li in layer_info]
    return {"region_offset": offset, "region_bytes": region_len, "layer_written_blocks": written,
            "read_calls_per_1m_request": reads, "load_average": os.getloadavg()[0],
            "disk_sha256": next(iter(hashes.values())), "rows": rows, "samples": samples}


def server_read_calls(pid, sock, job, summary):
    """The read system calls (pread64/preadv/preadv2) the server process
    `pid` makes while `job` runs, counted by `strace -f -c` attached to it."""
    calls = ("pread64", "preadv", "preadv2")
    tr = subprocess.Popen(["strace", "-f", "-c", "-o", str(summary), "-e", "trace=" + ",".join(calls), "-p", str(pid)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # strace says "Process N attached with T threads" once it traces them all.
        os.set_blocking(tr.stderr.fileno(), False)
        seen, deadline = b"", time.monotonic() + 20
        while b"attached" not in seen:
            if time.monotonic() > deadline or tr.poll() is not None:
                raise RuntimeError(f"strace did not attach to {pid}: {seen.decode(errors='replace')}")
            seen += tr.stderr.read(4096) or b""
            time.sleep(0.01)
        bench_run(sock, job)
    finally:
        stop(tr, signal.SIGINT)
    total = 0
    for line in summary.read_text().splitlines():
        cols = line.split()
        if len(cols) >= 5 and cols[-1] in calls:
            total += int(cols[3])
    return total


# --- report ----------------------------------------------------------------------------


def kib(b):
    return f"{b / KIB:.0f} KiB" if b < 10 * MIB else f"{b / MIB:.1f} MiB"


def section(res):
    f, rd, ch = res["fork"], res["ready"], res["chain"]
    p = f["per_node"]
    L = ["## 5. Forking a saved cluster\n",
         f"From a separate run: `{res['command']}`, {res['date']}, {res['reps']} repetitions; machine: "
         f"{res['machine']}. Contenders alternate within each repetition (their order reversed every other "
         "one); figures are medians, comparisons ratios of medians.\n",
         f"The snapshot: `ociblk launch --image build/sample-image --nodes {NODES} --network --tpm "
         "--wait-for \"ociblk-sample: ready\" --save SNAPDIR`, made once per run (every node bootstrapped: an "
         "ext2 file system on its data partition and a state file), "
         f"{kib(res['snapshot']['layer_written_bytes'])} of written blocks in each node's layer.\n",
         "### Fork cost per node\n",
         "*ociblk fork*: `ociblk_launch::snapshot::prepare_fork`, the step `ociblk launch --from SNAPDIR "
         "--state-dir NEW` runs before it starts anything (per node: a new overlay over the node's frozen "
         f"layer, made durable, and copies of its OVMF variable store ({kib(res['state_files']['ovmf_vars'])}) "
         f"and TPM state ({res['state_files']['tpm']} bytes), each synced), timed inside the process "
         "(`target/release/examples/fork_prepare`, one process for the 3 nodes); *wall* adds its process "
         "start. *ociblk overlay only*: the disk part alone (`layer::create_over` per node). *qcow2 linked "
         "clone*: `qemu-img create -f qcow2 -b node-N.qcow2 -F qcow2` per node, where node-N.qcow2 holds the "
         "same node disk (`ociblk export --overlay` of the fork's disk, `qemu-img convert` to qcow2, made "
         "once); *cp*: `cp --sparse=always --reflink=auto` of that qcow2, or of the raw disk. qemu-img and "
         "cp are timed as processes (one per node). *CPU*: user + system time of the process(es). "
         "*allocated*: st_blocks × 512 of the files made; "
         "*write_bytes*: the process's bytes sent towards storage (/proc/PID/io, read at exit through "
         f"wait4's ru_oublock). Build directory on {res['filesystem']}.\n",
         "| per node | time | wall (process) | CPU | allocated | write_bytes |",
         "|---|---|---|---|---|---|"]
    for c in FORK_CONTENDERS:
        r = p[c]
        L.append(f"| {c} | {r['seconds'] * 1e3:.2f} ms | {r['wall'] * 1e3:.2f} ms | {r['cpu'] * 1e3:.2f} ms | "
                 f"{kib(r['allocated'])} | "
                 f"{kib(r['write_bytes'])} |")
    L.append("")
    if f.get("syncs"):
        L.append("Syncs, under `strace -f -c -w` (a separate run; strace slows the rest): " + "; ".join(
            f"{c}: {s['calls'] / NODES:.0f} fsync/fdatasync calls per node, {s['seconds'] / NODES * 1e3:.2f} ms"
            for c, s in f["syncs"].items()) + ".\n")
    L.append("### Time from launch to every node ready\n")
    L.append("`ociblk launch ... --wait-for \"ociblk-sample: ready\" --exit-when-ready`, a fresh cluster "
             f"(`--image --nodes {NODES} --network --tpm`: every node bootstraps) vs a fork of the snapshot "
             "(`--from SNAPDIR`: every node finds its state), 512 MiB and 1 vCPU per node under TCG on 2 "
             "cores. *ready*: from starting `ociblk launch` to its table of times, which it prints once every "
             "node showed the ready line (its own figure, from the start of the launch after the fork was "
             "prepared, in the next column). *bootstrap step*: host arrival time of a node's "
             "`ociblk-sample: bootstrapped` (fresh) or `found state` (fork) console line minus that of the "
             "line the guest prints just before it starts the step (`ociblk-sample: product`), slowest node "
             "(the nodes run it in parallel).\n")
    m = rd["median"]
    L.append("| cluster | ready | launch's figure | range | bootstrap step (slowest node) | last node's step start |")
    L.append("|---|---|---|---|---|---|")
    for c, name in (("fresh", "fresh (bootstrap)"), ("fork", "forked")):
        r = m[c]
        L.append(f"| {name} | {r['ready_s']:.2f} s | {r['launch_reported_s']:.2f} s | "
                 f"{r['ready_range_s'][0]:.2f}-{r['ready_range_s'][1]:.2f} s | {r['step_max_s']:.2f} s | "
                 f"{r['product_max_s']:.2f} s |")
    L.append("")
    L.append("### Reads through a chain of 3 layers\n")
    L.append(f"A {ch['region_bytes'] >> 20} MiB region of the data partition, written by 3 rounds (each: "
             "random 64 KiB writes over a quarter of the region and random 4 KiB writes over a 32nd, "
             "`ociblk-bench run --rw randwrite`), each round frozen into a layer "
             f"({', '.join(str(w) for w in ch['layer_written_blocks'])} blocks written); served by "
             "`ociblk serve --overlay NEW --layer L1 --layer L2 --layer L3` vs the same writes in one overlay "
             "(both serve the same disk: equal `ociblk-bench dump` hashes). One queue, page cache warm, "
             "`ociblk-bench run` over the region.\n")
    L.append("| job | 3-layer chain | single overlay | chain / single | range over repetitions: chain; single | p50 / p99 µs: chain, single |")
    L.append("|---|---|---|---|---|---|")
    for r in ch["rows"]:
        mm, rg = r["median"], r["range"]
        unit = "IOPS" if r["metric"] == "iops" else "MiB/s"
        L.append(f"| {r['job']} | {mm['3-layer chain']:.0f} {unit} | {mm['single overlay']:.0f} | "
                 f"{ratio(mm['3-layer chain'], mm['single overlay']):.3f}x | "
                 f"{rg['3-layer chain'][0]:.0f}-{rg['3-layer chain'][1]:.0f}; "
                 f"{rg['single overlay'][0]:.0f}-{rg['single overlay'][1]:.0f} | "
                 f"{r['p50_us']['3-layer chain']:.0f}/{r['p99_us']['3-layer chain']:.0f}, "
                 f"{r['p50_us']['single overlay']:.0f}/{r['p99_us']['single overlay']:.0f} |")
    L.append("")
    if ch.get("read_calls_per_1m_request"):
        L.append("Read calls of the server per 1 MiB request (`strace -f -c` attached to it during one more "
                 "sequential pass over the region): " + ", ".join(
                     f"{c} {n:.1f}" for c, n in ch["read_calls_per_1m_request"].items()) + ".\n")
    L.extend(res["verdicts"])
    L.append("")
    return "\n".join(L) + "\n"


def verdicts(res):
    out = []
    f = res["fork"]["per_node"]
    fork, disk, q = f["ociblk fork"], f["ociblk overlay only"], f["qcow2 linked clone"]
    syncs = (res["fork"].get("syncs") or {}).get("ociblk fork")
    met = fork["seconds"] <= FORK_TIME_TARGET_S
    line = (f"- Fork cost per node, time: {fork['seconds'] * 1e3:.2f} ms (overlay only "
            f"{disk['seconds'] * 1e3:.2f} ms; qcow2 linked clone {q['seconds'] * 1e3:.2f} ms) "
            f"(target ≤ 5 ms): {'met' if met else 'MISSED'}.")
    if not met:
        why = (f" Why: of the fork_prepare process's {fork['wall'] * 1e3:.2f} ms per node, "
               f"{fork['cpu'] * 1e3:.2f} ms are CPU (user + system time), most of it opening the node's chain "
               "as a server would: the layer's header and its map (a byte per 4 KiB block of the 5 GiB disk) "
               "are read, checked against the layer's digest and merged into the overlay's index. The other "
               f"{max(0.0, fork['wall'] - fork['cpu']) * 1e3:.2f} ms are spent off the CPU, waiting for the "
               "disk, as every file the fork makes is made durable before a node can start")
        if syncs:
            why += (f" ({syncs['calls'] / NODES:.0f} fsync/fdatasync calls per node, "
                    f"{syncs['seconds'] / NODES * 1e3:.2f} ms per node under strace)")
        if fork["involuntary_switches"] >= 1:
            why += (f", and for a CPU ({fork['involuntary_switches']:.0f} involuntary context switch(es) per "
                    f"node; load average {res['fork']['load_average']:.1f} after the fork measurements)")
        line += why + "."
    out.append(line)
    met = fork["allocated"] <= FORK_BYTES_TARGET
    line = (f"- Fork cost per node, bytes written: {kib(fork['allocated'])} allocated, "
            f"{kib(fork['write_bytes'])} write_bytes (overlay only {kib(disk['allocated'])}; qcow2 linked clone "
            f"{kib(q['allocated'])}) (target ≤ 64 KiB): {'met' if met else 'MISSED'}.")
    if not met:
        sf = res["state_files"]
        line += (f" Why: the node's own copy of its OVMF variable store ({kib(sf['ovmf_vars'])}) and TPM state "
                 f"({sf['tpm']} bytes) are copied, on {res['filesystem']} without sharing blocks; the disk "
                 f"part is {kib(disk['allocated'])}.")
    out.append(line)
    m = res["ready"]["median"]
    gain = m["fresh"]["ready_s"] - m["fork"]["ready_s"]
    boot = m["fresh"]["step_max_s"]
    met = gain >= boot
    line = (f"- Forked cluster ready: {m['fork']['ready_s']:.2f} s vs {m['fresh']['ready_s']:.2f} s fresh, "
            f"{abs(gain):.2f} s {'sooner' if gain >= 0 else 'later'}; the bootstrap step takes {boot:.2f} s "
            "(slowest node) "
            f"(target: sooner by at least the bootstrap time): {'met' if met else 'MISSED'}.")
    if not met:
        fresh_pm, fork_pm = m["fresh"]["product_max_s"], m["fork"]["product_max_s"]
        spread = (f"ready times over the repetitions: fresh {m['fresh']['ready_range_s'][0]:.2f}-"
                  f"{m['fresh']['ready_range_s'][1]:.2f} s, fork {m['fork']['ready_range_s'][0]:.2f}-"
                  f"{m['fork']['ready_range_s'][1]:.2f} s; {NODES} TCG guests share 2 cores (load average "
                  f"{res['ready']['load_average']:.1f} after these runs)")
        if fork_pm > fresh_pm - boot:
            line += (f" Why: the fork's nodes reached the step late (the last one at {fork_pm:.2f} s, vs "
                     f"{fresh_pm:.2f} s fresh), which took back what the step saves; {spread}.")
        else:
            line += (f" Why: the fork's own step (finding the state) took {m['fork']['step_max_s']:.2f} s; "
                     f"{spread}.")
    out.append(line)
    for r in res["chain"]["rows"]:
        x = ratio(r["median"]["3-layer chain"], r["median"]["single overlay"])
        met = x >= CHAIN_READ_TARGET
        line = (f"- Reads through a 3-layer chain, {r['job']}: {x:.3f}x of a single overlay "
                f"(target within 5%, at least 0.95x): {'met' if met else 'MISSED'}.")
        if not met:
            c, s1 = r["range"]["3-layer chain"], r["range"]["single overlay"]
            spread = (f"repetitions spread over {c[0]:.0f}-{c[1]:.0f} (chain) and {s1[0]:.0f}-{s1[1]:.0f} "
                      "(single)")
            if c[1] >= s1[0]:
                line += (f" Why: within the run-to-run spread on this shared machine: {spread}, the ranges "
                         "overlap.")
            elif r["job"].startswith("seqread"):
                line += (f" Why: {spread}, the chain below every single-overlay repetition; p50 latency "
                         f"{r['p50_us']['3-layer chain']:.0f} vs {r['p50_us']['single overlay']:.0f} µs. "
                         "A request reads each run of blocks from the file that holds it, one read call per "
                         "run: blocks of different layers that lie side by side on the disk are separate "
                         "runs in the chain and one run in the single overlay")
                rc = res["chain"].get("read_calls_per_1m_request")
                if rc:
                    line += (f" ({rc['3-layer chain']:.1f} vs {rc['single overlay']:.1f} read calls per 1 MiB "
                             "request)")
                line += "."
            else:
                line += (f" Why: {spread}, the chain below every single-overlay repetition; p50 latency "
                         f"{r['p50_us']['3-layer chain']:.0f} vs {r['p50_us']['single overlay']:.0f} µs. A 4 KiB "
                         "request is one block, read with one call either way; the chain adds one lookup in "
                         "its index. Load average after the chain runs: "
                         f"{res['chain'].get('load_average', float('nan')):.1f}.")
        out.append(line)
    return out


def filesystem_of(path):
    try:
        return run(["findmnt", "-n", "-o", "FSTYPE", "-T", path]).stdout.decode().strip() or "unknown"
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", default="5", help="seconds per timed read job (reads through a chain)")
    ap.add_argument("--timeout", type=int, default=400, help="seconds a cluster may take to be ready")
    ap.add_argument("--region", default=256, type=int, help="MiB of the data partition the chain covers")
    ap.add_argument("--write-md", action="store_true", help="replace section 5 of BENCHMARKS.md")
    ap.add_argument("--keep", action="store_true", help="keep the work directory under build/bench")
    ap.add_argument("--command", default="hack/bench --only-fork", help=argparse.SUPPRESS)
    a = ap.parse_args()
    scratch = ROOT / "build/bench"
    scratch.mkdir(parents=True, exist_ok=True)
    print("building the fork_prepare example", flush=True)
    subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "ociblk", "--example", "fork_prepare"],
                   cwd=ROOT, check=True)
    for tool in ("qemu-system-x86_64", "qemu-img", "swtpm", "cp"):
        if not shutil.which(tool):
            raise SystemExit(f"bench_fork: {tool} is needed (hack/setup installs it)")
    for binary in (OCIBLK, BENCH, FORK_PREPARE):
        if not binary.exists():
            raise SystemExit(f"bench_fork: {binary} is missing (hack/bench builds it)")
    work = Path(tempfile.mkdtemp(dir=scratch, prefix="fork-"))
    logs = scratch / "fork-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    started = time.monotonic()
    res = {"command": a.command, "date": time.strftime("%Y-%m-%d"), "reps": a.reps,
           "machine": f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} "
                      f"GiB, {os.uname().release}",
           "filesystem": filesystem_of(scratch)}
    try:
        snapshot = work / "snapshot"
        print(f"saving a bootstrapped {NODES}-node cluster", flush=True)
        saved = launch_fresh(work / "origin", logs / "snapshot.log", a.timeout, ["--save", snapshot])
        check_nodes(saved, "bootstrapped")
        shutil.rmtree(work / "origin")
        layer = json.loads(run([OCIBLK, "overlay", "info", "--json", snapshot / "node-1/disk.layer"]).stdout)
        res["snapshot"] = {"layer_written_bytes": layer_written_bytes(layer), "ids": saved.ids}
        res["state_files"] = state_file_sizes(snapshot)

        raws, qcows = prepare_references(snapshot, work)
        res["fork"] = bench_fork_cost(snapshot, raws, qcows, a.reps, work)
        res["fork"]["syncs"] = sync_breakdown(snapshot, qcows, work)
        shutil.rmtree(work / "reference")

        res["ready"] = bench_ready(snapshot, saved.ids, a.reps, a.timeout, work, logs)
        res["chain"] = bench_chain(a.reps, a.runtime, a.region * MIB, work, logs)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = time.monotonic() - started
    res["verdicts"] = verdicts(res)
    (scratch / "fork.json").write_text(json.dumps(res, indent=1))
    text = section(res)
    print("\n" + text)
    print(f"bench_fork: {res['seconds']:.0f} s; results in build/bench/fork.json")
    if a.write_md:
        replace_section(ROOT / "BENCHMARKS.md", 5, text)
        print("replaced section 5 of BENCHMARKS.md")
    return 0


def layer_written_bytes(info):
    return info["blocks_written"] * info["block_size"]


if __name__ == "__main__":
    sys.exit(main())
