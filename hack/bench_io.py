"""Section 2 of BENCHMARKS.md: I/O through the same vhost-user-blk client
(`ociblk-bench`), ociblk against qemu-storage-daemon serving a qcow2 snapshot
and a raw disk, with the CPU time of both sides, the pread limit, where the
two sides run (QD1 placement), adaptive polling and flush durability.

Used by hack/bench.py (the whole benchmark, or `--only-io`)."""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import OCIBLK, SECTOR, Contender, bench_pread, bench_run, inspect, median, ratio, run, stop

CONTENDERS = ("ociblk", "qsd-qcow2", "qsd-raw")
QUEUE_COUNTS = (1, 2)
# The default poll window of `ociblk serve` (--poll-max-us), compared with 0 (off).
POLL_US = 50
# Placement: the server's threads on one CPU, the client on the other.
SERVER_CPU, CLIENT_CPU = 0, 1
# Each first-write job of a server instance gets its own fresh region.
WRITE_REGION = 256 << 20
WRITE_SIZE = 32 << 20

JOBS = ("seqread 1M", "randread 4K QD1", "randread 4K QD32", "first write 4K", "rewrite 4K")
METRIC = {"seqread 1M": "mib_s", "randread 4K QD1": "iops", "randread 4K QD32": "iops",
          "first write 4K": "iops", "rewrite 4K": "iops"}


class Disk:
    """Where the jobs read and write, and the files behind each contender."""

    def __init__(self, image, scratch):
        info = inspect(image, "bench")
        parts = info["partitions"]
        system = next(p for p in info["payloads"] if p["name"] == "system")
        self.image = image
        self.sys_off = parts[1]["first_lba"] * SECTOR
        self.sys_len = system["size"] // (1 << 20) * (1 << 20)
        self.data_off = parts[3]["first_lba"] * SECTOR
        blob = Path(system["path"])
        self.blob = blob.resolve() if blob.is_absolute() else (Path(image) / blob).resolve()
        self.base = scratch / "io-base.raw"
        self.raw = scratch / "io-raw.raw"
        run([OCIBLK, "export", "--image", image, "--seed", "bench", "--output", self.base])
        run(["cp", "--sparse=always", "--reflink=auto", self.base, self.raw])
        for path in (self.base, self.raw):
            with open(path, "rb+") as f:
                os.fsync(f.fileno())

    def cleanup(self):
        for path in (self.base, self.raw):
            if path.exists():
                path.unlink()

    def read_region(self):
        return ["--offset", str(self.sys_off), "--length", str(self.sys_len)]

    def write_region(self, n):
        return ["--offset", str(self.data_off + n * WRITE_REGION), "--length", str(WRITE_REGION)]

    def backing(self, name):
        """The file (and offset in it) a contender reads the system payload from."""
        if name == "ociblk":
            return self.blob, 0
        return (self.base if name == "qsd-qcow2" else self.raw), self.sys_off

    def warm(self, name):
        """Reads the payload's bytes from the contender's own file, so that the page
        cache holds them as on a host running nodes (this host reclaims cold page
        cache in the background), without a job through the server."""
        path, off = self.backing(name)
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = bytearray(1 << 20)
            for pos in range(0, self.sys_len, len(buf)):
                os.preadv(fd, [buf], off + pos)
        finally:
            os.close(fd)

    def fresh_raw(self):
        """Makes the raw copy's write regions holes again, so its next first write
        lands in fresh space."""
        run(["fallocate", "--punch-hole", "--offset", self.data_off, "--length", 4 * WRITE_REGION,
             self.raw])


def server(name, disk, d, extra=(), cpu=None, binary=OCIBLK):
    """A contender serving the disk with 2 queues (as launch gives guests), its
    threads on `cpu` if given; ociblk (the build at `binary`) takes `extra`
    options."""
    sock = d / "s.sock"
    if name == "ociblk":
        cmd = [binary, "serve", "--image", disk.image, "--seed", "bench", "--socket", sock,
               "--overlay", d / "o.overlay", "--queues", "2", *extra]
    elif name == "qsd-qcow2":
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", disk.base, "-F", "raw", d / "n.qcow2"])
        cmd = ["qemu-storage-daemon",
               "--blockdev", f"driver=file,node-name=f,filename={d / 'n.qcow2'}",
               "--blockdev", "driver=qcow2,node-name=q,file=f",
               "--export", f"type=vhost-user-blk,id=e,node-name=q,addr.type=unix,"
                           f"addr.path={sock},writable=on,num-queues=2"]
    else:
        disk.fresh_raw()
        cmd = ["qemu-storage-daemon",
               "--blockdev", f"driver=file,node-name=f,filename={disk.raw}",
               "--blockdev", "driver=raw,node-name=r,file=f",
               "--export", f"type=vhost-user-blk,id=e,node-name=r,addr.type=unix,"
                           f"addr.path={sock},writable=on,num-queues=2"]
    if cpu is not None:
        # Threads inherit the affinity: every thread of the server stays on `cpu`.
        cmd = ["taskset", "-c", str(cpu), *cmd]
    c = Contender(name, cmd, sock)
    c.start()
    return c


def job(c, args, cpu=None):
    """One `ociblk-bench run` against contender `c`, with the server's CPU time."""
    return bench_run(c.sock, args, server_pid=c.proc.pid, cpu=cpu)


def job_args(name, disk, queues, runtime, region):
    """The command line of job `name` at `queues` queues; a write job writes into
    fresh region number `region`."""
    read = ["--offset", str(disk.sys_off), "--length", str(disk.sys_len), "--runtime", runtime,
            "--queues", str(queues)]
    write = [*disk.write_region(region), "--size", str(WRITE_SIZE), "--flush-every", "64",
             "--seed", "1", "--queues", str(queues)]
    return {
        "seqread 1M": ["--rw", "read", "--bs", "1M", "--iodepth", "4", *read],
        "randread 4K QD1": ["--rw", "randread", "--bs", "4K", "--iodepth", "1", *read],
        "randread 4K QD32": ["--rw", "randread", "--bs", "4K", "--iodepth", "32", *read],
        "first write 4K": ["--rw", "randwrite", "--bs", "4K", "--iodepth", "8", *write],
        "rewrite 4K": ["--rw", "randwrite", "--bs", "4K", "--iodepth", "8", *write],
    }[name]


def verify_pass(c, disk):
    """One sequential pass over the system payload through the server: ociblk
    verifies every chunk on first read, and the jobs after it measure the steady
    state. Returns the pass's result."""
    return job(c, ["--rw", "read", "--bs", "1M", "--iodepth", "4", *disk.read_region(),
                   "--size", str(disk.sys_len)])


def show(tag, name, what, r, metric):
    cpu = r["cpu"]
    unit = "s/GiB" if metric == "mib_s" else "us/req"
    key = "s_per_gib" if metric == "mib_s" else "us_per_request"
    mark = " client-bound" if cpu.get("client_bound") else ""
    print(f"io {tag} {name:10} {what:24} {r[metric]:10.1f} {metric} p50 {r['lat_us']['p50']:.1f} us "
          f"cpu server {cpu['server_' + key]:.3f} client {cpu['client_' + key]:.3f} {unit}{mark}",
          flush=True)


def rotated(names, rep):
    """`names` starting at a different one in each repetition."""
    k = rep % len(names)
    return names[k:] + names[:k]


def matrix_rep(disk, rep, runtime, scratch, samples):
    """Every job at 1 and 2 queues against every contender, one contender after
    the other (starting with a different one each repetition)."""
    for name in rotated(CONTENDERS, rep):
        with tempfile.TemporaryDirectory(dir=scratch) as d:
            c = server(name, disk, Path(d))
            try:
                verify_pass(c, disk)
                for n, queues in enumerate(QUEUE_COUNTS):
                    for what in JOBS:
                        if "read" in what and "write" not in what:
                            disk.warm(name)
                        r = job(c, job_args(what, disk, queues, runtime, n))
                        samples.setdefault((what, queues), {}).setdefault(name, []).append(r)
                        show(f"rep{rep}", name, f"{what} {queues}q", r, METRIC[what])
            finally:
                c.stop()


def limit_rep(disk, rep, runtime, samples):
    """pread of the payload into a memfd region like the client's, 1 and 2 threads."""
    for threads in QUEUE_COUNTS:
        disk.warm("ociblk")
        r = bench_pread(disk.blob, ["--bs", "1M", "--iodepth", "4", "--threads", str(threads),
                              "--length", str(disk.sys_len), "--runtime", runtime])
        samples.setdefault(threads, []).append(r)
        print(f"io rep{rep} pread      {threads} thread(s)              {r['mib_s']:10.1f} mib_s "
              f"cpu {r['cpu']['client_s_per_gib']:.3f} s/GiB", flush=True)


PLACEMENTS = ("different CPUs, cold start", "same CPU", "different CPUs, after seqread")


def placement_rep(disk, rep, runtime, scratch, samples):
    """randread 4K QD1 with the server's threads on one CPU: the client on the other
    CPU from a fresh start, on the same CPU, and on the other CPU right after a
    sequential read at 2 queues. ociblk runs with --no-verify here so that a fresh
    server's first reads do not hash chunks (section 4 measures that)."""
    qd1 = job_args("randread 4K QD1", disk, 1, runtime, 0)
    heavy = job_args("seqread 1M", disk, 2, runtime, 0)
    for name in rotated(CONTENDERS, rep):
        with tempfile.TemporaryDirectory(dir=scratch) as d:
            disk.warm(name)
            c = server(name, disk, Path(d), extra=["--no-verify"], cpu=SERVER_CPU)
            try:
                for where in PLACEMENTS:
                    if where == "different CPUs, after seqread":
                        job(c, heavy, cpu=CLIENT_CPU)
                    r = job(c, qd1, cpu=SERVER_CPU if where == "same CPU" else CLIENT_CPU)
                    samples.setdefault(where, {}).setdefault(name, []).append(r)
                    show(f"rep{rep}", name, f"QD1 {where}", r, "iops")
            finally:
                c.stop()


def start_hogs():
    """One busy loop per CPU, each pinned to its CPU; ended by PID in stop_hogs."""
    return [subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", "while True: pass"])
            for cpu in range(os.cpu_count() or 1)]


def stop_hogs(hogs):
    for h in hogs:
        stop(h, signal.SIGKILL)


def polling_rep(disk, rep, runtime, scratch, samples):
    """ociblk, randread 4K QD1, server and client on different CPUs: polling off
    (--poll-max-us 0) vs on, with the CPUs idle and with one busy loop per CPU."""
    qd1 = job_args("randread 4K QD1", disk, 1, runtime, 0)
    for load in ("idle", "one hog per CPU"):
        for poll in rotated((0, POLL_US), rep):
            with tempfile.TemporaryDirectory(dir=scratch) as d:
                disk.warm("ociblk")
                c = server("ociblk", disk, Path(d), cpu=SERVER_CPU,
                           extra=["--no-verify", "--poll-max-us", str(poll)])
                hogs = start_hogs() if load != "idle" else []
                try:
                    r = job(c, qd1, cpu=CLIENT_CPU)
                finally:
                    stop_hogs(hogs)
                    c.stop()
                samples.setdefault(load, {}).setdefault(poll, []).append(r)
                show(f"rep{rep}", "ociblk", f"QD1 poll {poll} us, {load}", r, "iops")


def flush_rep(disk, rep, scratch, samples):
    """ociblk's first write 4K (a FLUSH every 64 writes) with the default durable
    flush vs --flush unsafe, fresh servers, 1 and 2 queues."""
    for mode in rotated(("safe", "unsafe"), rep):
        with tempfile.TemporaryDirectory(dir=scratch) as d:
            c = server("ociblk", disk, Path(d), extra=["--flush", mode])
            try:
                for n, queues in enumerate(QUEUE_COUNTS):
                    r = job(c, job_args("first write 4K", disk, queues, "1", n))
                    samples.setdefault(queues, {}).setdefault(mode, []).append(r)
                    show(f"rep{rep}", "ociblk", f"first write --flush {mode} {queues}q", r, "iops")
            finally:
                c.stop()


PROFILED = [(what, q) for what in ("seqread 1M", "randread 4K QD32", "first write 4K") for q in QUEUE_COUNTS]


def top_symbols(data):
    """The hottest symbols of a `perf record` file: (percent, where, symbol)."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort",
                          "dso,sym", "-g", "none", "--percent-limit", "2"],
                         capture_output=True, text=True, check=True).stdout
    top = []
    for line in out.splitlines():
        m = re.match(r"^\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.+?)\s*$", line)
        if m:
            top.append([float(m.group(1)), m.group(2), m.group(3)])
    return top[:6]


def profile(disk, runtime, scratch):
    """A `perf record` of ociblk's server over one more run of some jobs (not
    counted in the figures), for the reasons of missed targets."""
    out = {}
    with tempfile.TemporaryDirectory(dir=scratch) as d:
        d = Path(d)
        c = server("ociblk", disk, d)
        try:
            verify_pass(c, disk)
            for what, queues in PROFILED:
                if "write" not in what:
                    disk.warm("ociblk")
                data = d / "perf.data"
                try:
                    rec = subprocess.Popen(["perf", "record", "-q", "-F", "999", "-p", str(c.proc.pid),
                                            "-o", str(data)], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE)
                except OSError as e:
                    out[f"{what} {queues}"] = {"error": f"perf: {e}"}
                    continue
                time.sleep(0.2)  # perf attaches before the job starts
                try:
                    job(c, job_args(what, disk, queues, runtime, 2 + queues))
                finally:
                    stop(rec, signal.SIGINT)
                err = rec.stderr.read().decode(errors="replace").strip()
                # perf record ends on SIGINT by raising it again once its file is written.
                if rec.returncode not in (0, -signal.SIGINT) or not data.exists():
                    out[f"{what} {queues}"] = {"error": err or f"perf record exited {rec.returncode}"}
                    continue
                try:
                    out[f"{what} {queues}"] = {"top": top_symbols(data)}
                except subprocess.CalledProcessError as e:
                    out[f"{what} {queues}"] = {"error": f"perf report: {e.stderr.strip() or e}"}
                    continue
                print(f"io profile ociblk {what} {queues}q: " + ", ".join(
                    f"{p:.0f}% {sym}" for p, _, sym in out[f"{what} {queues}"]["top"]), flush=True)
        finally:
            c.stop()
    return out


def profile_text(io, what, queues):
    p = io.get("profiles", {}).get(f"{what} {queues}")
    if not p:
        return ""
    if "error" in p:
        return f" (No profile: {p['error']}.)"
    return (" Profile of ociblk's server over one more such run (`perf record`, hottest symbols): "
            + ", ".join(f"{pct:.0f}% `{sym}` ({dso})" for pct, dso, sym in p["top"]) + ".")


def per_unit(r, metric, side):
    cpu = r["cpu"]
    v = cpu[f"{side}_s_per_gib"] if metric == "mib_s" else cpu[f"{side}_us_per_request"]
    return v if v is not None else float("nan")


def summary(rs, metric):
    """Medians and spread over the repetitions of one job against one contender."""
    vals = [r[metric] for r in rs]
    server = median([per_unit(r, metric, "server") for r in rs])
    client = median([per_unit(r, metric, "client") for r in rs])
    return {
        "median": median(vals), "range": [min(vals), max(vals)], "reps": len(vals),
        "p50_us": median([r["lat_us"]["p50"] for r in rs]),
        "p99_us": median([r["lat_us"]["p99"] for r in rs]),
        "flush_mean_us": median([r["flush_lat_us"]["mean"] for r in rs]),
        "flushes": median([r["flushes"] for r in rs]),
        "write_p50_us": median([r["write_lat_us"]["p50"] for r in rs]),
        "runtime_s": median([r["runtime_s"] for r in rs]),
        "server_cpu": server, "client_cpu": client,
        "server_cores": median([(r["cpu"]["server_s"] or 0) / r["runtime_s"] if r["runtime_s"] else 0
                                for r in rs]),
        "client_cores": median([r["cpu"]["client_s"] / r["runtime_s"] if r["runtime_s"] else 0 for r in rs]),
        "client_bound": client > server,
        "client_bound_reps": sum(1 for r in rs if r["cpu"].get("client_bound")),
    }


def bench_io(image, reps, runtime, scratch):
    """Runs every part of section 2 `reps` times; returns the summaries."""
    if (os.cpu_count() or 1) <= max(SERVER_CPU, CLIENT_CPU):
        raise RuntimeError(f"the QD1 placement jobs pin to CPUs {SERVER_CPU} and {CLIENT_CPU}: "
                           f"this host has {os.cpu_count()} CPU(s)")
    disk = Disk(image, scratch)
    matrix, limit, placement, polling, flush = {}, {}, {}, {}, {}
    t0 = time.monotonic()
    try:
        for rep in range(reps):
            matrix_rep(disk, rep, runtime, scratch, matrix)
            limit_rep(disk, rep, runtime, limit)
            placement_rep(disk, rep, runtime, scratch, placement)
            polling_rep(disk, rep, runtime, scratch, polling)
            flush_rep(disk, rep, scratch, flush)
        profiles = profile(disk, runtime, scratch)
    finally:
        disk.cleanup()
    rows = []
    for queues in QUEUE_COUNTS:
        for what in JOBS:
            metric = METRIC[what]
            rows.append({"job": what, "queues": queues, "metric": metric,
                         "contenders": {n: summary(rs, metric) for n, rs in matrix[(what, queues)].items()}})
    lim = {}
    for threads, rs in limit.items():
        vals = [r["mib_s"] for r in rs]
        lim[str(threads)] = {"median": median(vals), "range": [min(vals), max(vals)],
                             "cpu_s_per_gib": median([r["cpu"]["client_s_per_gib"] for r in rs]),
                             "region_bytes": rs[0]["region_bytes"], "buffers": rs[0]["buffers"]}
    return {
        "runtime_s": runtime,
        "reps": reps,
        "seconds": time.monotonic() - t0,
        "rows": rows,
        "limit": lim,
        "placement": {w: {n: summary(rs, "iops") for n, rs in by.items()} for w, by in placement.items()},
        "polling": {load: {str(p): summary(rs, "iops") for p, rs in by.items()} for load, by in polling.items()},
        "flush": {str(q): {m: summary(rs, "iops") for m, rs in by.items()} for q, by in flush.items()},
        "poll_us": POLL_US,
        "cpus": os.cpu_count(),
        "profiles": profiles,
        # Other work on the host shows in the spreads; this VM has few cores.
        "load_average_at_end": os.getloadavg()[0],
    }


# --- verdicts -------------------------------------------------------------------


def row(io, what, queues):
    return next(r for r in io["rows"] if r["job"] == what and r["queues"] == queues)["contenders"]


def n_of(n, what):
    return f"{n} {what}" + ("s" if n != 1 else "")


def verdict(text, met):
    return f"- {text}: {'met' if met else 'MISSED'}."


def io_verdicts(io):
    """The issue's targets, each met or MISSED, from the medians."""
    out = []
    for q in QUEUE_COUNTS:
        s = row(io, "seqread 1M", q)
        x = ratio(s["ociblk"]["median"], s["qsd-raw"]["median"])
        target = 1.2 if q == 1 else 1.5
        out.append(verdict(f"Sequential 1 MiB read, {n_of(q, 'queue')}: {x:.2f}x qsd-raw (target {target}x)",
                           x >= target))
        limit = io["limit"][str(q)]["median"]
        pct = 100 * ratio(s["ociblk"]["median"], limit)
        out.append(verdict(f"Sequential 1 MiB read, {n_of(q, 'queue')}: {pct:.0f}% of the pread limit with "
                           f"{n_of(q, 'thread')}, {limit:.0f} MiB/s (target 70%)", pct >= 70))
    bound = [f"{r['job']} {r['queues']}q {n}" for r in io["rows"] for n, c in r["contenders"].items()
             if c["client_bound"]]
    out.append(verdict("No I/O job client-bound" + (f" (client-bound: {', '.join(bound)})" if bound else ""),
                       not bound))
    p = io["placement"]
    for where in ("different CPUs, cold start", "different CPUs, after seqread"):
        x = ratio(p[where]["ociblk"]["median"], p[where]["qsd-qcow2"]["median"])
        out.append(verdict(f"Random 4K QD1, {where}: {x:.2f}x qsd+qcow2 (target 2x)", x >= 2))
    hog = io["polling"]["one hog per CPU"]
    x = ratio(hog[str(io["poll_us"])]["median"], hog["0"]["median"])
    out.append(verdict(f"Random 4K QD1 with one CPU hog per core: polling on ({io['poll_us']} µs) at "
                       f"{100 * x:.0f}% of polling off (target ≥ 95%)", x >= 0.95))
    for q in QUEUE_COUNTS:
        r = row(io, "randread 4K QD32", q)
        x = ratio(r["ociblk"]["median"], r["qsd-qcow2"]["median"])
        out.append(verdict(f"Random 4K QD32, {n_of(q, 'queue')}: {x:.2f}x qsd+qcow2 (target 2x)", x >= 2))
    for q in QUEUE_COUNTS:
        f = io["flush"][str(q)]
        x = ratio(f["safe"]["median"], f["unsafe"]["median"])
        out.append(verdict(f"First write 4K, {n_of(q, 'queue')}: {100 * x:.0f}% of --flush unsafe (target 60%)",
                           x >= 0.6))
        r = row(io, "first write 4K", q)
        x = ratio(r["ociblk"]["median"], r["qsd-qcow2"]["median"])
        out.append(verdict(f"First write 4K, {n_of(q, 'queue')}: {x:.2f}x qsd+qcow2 (target 3x)", x >= 3))
    return out


def missed(verdicts, prefix):
    return any(v.startswith("- " + prefix) and v.endswith("MISSED.") for v in verdicts)


def why_missed(io, verdicts):
    """For each missed target, what the same run measured that bears on it."""
    out = []
    for q in QUEUE_COUNTS:
        s = row(io, "seqread 1M", q)
        if missed(verdicts, f"Sequential 1 MiB read, {n_of(q, 'queue')}") or s["ociblk"]["client_bound"]:
            o, lim = s["ociblk"], io["limit"][str(q)]
            out.append(
                f"- **Sequential read, {n_of(q, 'queue')}.** ociblk {o['median']:.0f} MiB/s, qsd-raw "
                f"{s['qsd-raw']['median']:.0f}, pread limit {lim['median']:.0f}. ociblk's server used "
                f"{o['server_cpu']:.3f} CPU-s per GiB ({o['server_cores']:.2f} cores busy over the job), the "
                f"client {o['client_cpu']:.3f} ({o['client_cores']:.2f} cores); the pread loop itself needs "
                f"{lim['cpu_s_per_gib']:.3f} CPU-s per GiB for the same copy. qsd-raw's server: "
                f"{s['qsd-raw']['server_cpu']:.3f} CPU-s per GiB ({s['qsd-raw']['server_cores']:.2f} cores)."
                + (" The client used more CPU than the server here: the job measures the load generator "
                   "as much as the server." if o["client_bound"] else "")
                + profile_text(io, "seqread 1M", q))
    if missed(verdicts, "Random 4K QD1, different"):
        p = io["placement"]
        d, h, s = p["different CPUs, cold start"], p["different CPUs, after seqread"], p["same CPU"]
        share = 1 - ratio(s["ociblk"]["p50_us"], d["ociblk"]["p50_us"])
        out.append(
            f"- **Random read QD1.** With server and client on different CPUs ociblk answers at "
            f"{d['ociblk']['median']:.0f} IOPS from a cold start (p50 {d['ociblk']['p50_us']:.1f} µs) and "
            f"{h['ociblk']['median']:.0f} after a sequential read (p50 {h['ociblk']['p50_us']:.1f} µs), "
            f"qsd+qcow2 at {d['qsd-qcow2']['median']:.0f} and {h['qsd-qcow2']['median']:.0f} (p50 "
            f"{d['qsd-qcow2']['p50_us']:.1f} and {h['qsd-qcow2']['p50_us']:.1f} µs); on one CPU ociblk reaches "
            f"{s['ociblk']['median']:.0f} IOPS (p50 {s['ociblk']['p50_us']:.1f} µs): {100 * share:.0f}% of the "
            f"cross-CPU round trip (p50) goes to having the two sides on different CPUs, which every server "
            f"pays. ociblk's server "
            f"spends {d['ociblk']['server_cpu']:.1f} µs of CPU per request, qsd+qcow2 "
            f"{d['qsd-qcow2']['server_cpu']:.1f} µs.")
    if missed(verdicts, "Random 4K QD1 with one CPU hog"):
        pol = io["polling"]
        out.append(
            "- **Polling under contention.** ociblk QD1: " + "; ".join(
                f"{load}: off {by['0']['median']:.0f} IOPS, on {by[str(io['poll_us'])]['median']:.0f} "
                f"(server CPU {by['0']['server_cpu']:.1f} vs {by[str(io['poll_us'])]['server_cpu']:.1f} µs "
                "per request)" for load, by in pol.items()) + ".")
    for q in QUEUE_COUNTS:
        r = row(io, "randread 4K QD32", q)
        if missed(verdicts, f"Random 4K QD32, {n_of(q, 'queue')}"):
            out.append(
                f"- **Random read QD32, {n_of(q, 'queue')}.** ociblk {r['ociblk']['median']:.0f} IOPS with "
                f"{r['ociblk']['server_cpu']:.1f} µs of server CPU per request ({r['ociblk']['server_cores']:.2f} "
                f"cores) and {r['ociblk']['client_cpu']:.1f} µs of client CPU; qsd+qcow2 "
                f"{r['qsd-qcow2']['median']:.0f} IOPS with {r['qsd-qcow2']['server_cpu']:.1f} µs "
                f"({r['qsd-qcow2']['server_cores']:.2f} cores); the host has {io['cpus']} CPUs for both sides."
                + profile_text(io, "randread 4K QD32", q))
    for q in QUEUE_COUNTS:
        if missed(verdicts, f"First write 4K, {n_of(q, 'queue')}"):
            f = io["flush"][str(q)]
            r = row(io, "first write 4K", q)
            out.append(
                f"- **First write, {n_of(q, 'queue')}.** ociblk {f['safe']['median']:.0f} IOPS with durable flushes, "
                f"{f['unsafe']['median']:.0f} with --flush unsafe; a FLUSH took {f['safe']['flush_mean_us']:.0f} "
                f"µs on average ({f['unsafe']['flush_mean_us']:.0f} µs unsafe), a write p50 "
                f"{f['safe']['write_p50_us']:.0f} µs. qsd+qcow2: {r['qsd-qcow2']['median']:.0f} IOPS, FLUSH "
                f"{r['qsd-qcow2']['flush_mean_us']:.0f} µs on average." + profile_text(io, "first write 4K", q))
    return out


# --- markdown -------------------------------------------------------------------


def unit(metric):
    return "MiB/s" if metric == "mib_s" else "IOPS"


def cpu_unit(metric):
    return "CPU-s/GiB" if metric == "mib_s" else "CPU-µs/request"


def fmt_cpu(c, metric):
    f = "{:.3f}" if metric == "mib_s" else "{:.1f}"
    return f"{f.format(c['server_cpu'])} / {f.format(c['client_cpu'])}" + (" **client-bound**"
                                                                              if c["client_bound"] else "")


def section_lines(io, command=None, date=None):
    """Section 2 of BENCHMARKS.md, its targets and why missed ones are missed."""
    L = ["## 2. I/O through the same client (`ociblk-bench`)\n"]
    if command:
        L.append(f"From a separate run: `{command}`, {date}, {io['reps']} repetitions.\n")
    L.append(
        "ociblk (fresh overlay) vs `qemu-storage-daemon --export type=vhost-user-blk` serving a qcow2 snapshot "
        "over the raw base (*qcow2*) and serving the raw disk (*raw*); every server offers 2 queues, as launch "
        "gives guests, and each job runs with the client on 1 and on 2 of them. Contenders alternate within "
        f"each repetition; figures are medians of {io['reps']}, ratios are ratios of medians, *range* is the "
        f"minimum-maximum over the repetitions; timed jobs run {io['runtime_s']} s. Reads cover the system "
        "partition's payload (1 GiB) with the page cache warm, after one pass through the server that lets "
        "ociblk verify every chunk (steady state); writes go to fresh space of the data partition "
        f"({WRITE_SIZE >> 20} MiB of 4 KiB writes, 8 in flight per queue, a FLUSH every 64 writes per queue; "
        "*rewrite* writes the same offsets again). The client reads into buffers it keeps in its guest memory "
        "(nothing is copied out, and a completion allocates nothing).\n")
    L.append("![I/O results](bench-io.png)\n")
    L.append("| job | queues | ociblk | qsd qcow2 | qsd raw | ociblk / qcow2 | ociblk / raw | range: ociblk; qcow2; raw "
             "| p50 / p99 µs: ociblk, qcow2, raw |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in io["rows"]:
        c = r["contenders"]
        rng = "; ".join(f"{c[n]['range'][0]:.0f}-{c[n]['range'][1]:.0f}" for n in CONTENDERS)
        lat = ", ".join(f"{c[n]['p50_us']:.0f}/{c[n]['p99_us']:.0f}" for n in CONTENDERS)
        L.append(f"| {r['job']} | {r['queues']} | {c['ociblk']['median']:.0f} {unit(r['metric'])} | "
                 f"{c['qsd-qcow2']['median']:.0f} | {c['qsd-raw']['median']:.0f} | "
                 f"{ratio(c['ociblk']['median'], c['qsd-qcow2']['median']):.2f}x | "
                 f"{ratio(c['ociblk']['median'], c['qsd-raw']['median']):.2f}x | {rng} | {lat} |")
    L.append("")
    L.append("**CPU time** of the server process (all threads, `/proc/PID/stat`) and of the client "
             "(`getrusage`, all threads) over each job, per GiB for sequential reads and per request "
             "otherwise, as *server / client*; a job is **client-bound** when the client used more CPU than "
             "the server (medians): then it measures the load generator at least as much as the server.\n")
    L.append("| job | queues | unit | ociblk | qsd qcow2 | qsd raw |")
    L.append("|---|---|---|---|---|---|")
    for r in io["rows"]:
        c = r["contenders"]
        L.append(f"| {r['job']} | {r['queues']} | {cpu_unit(r['metric'])} | " +
                 " | ".join(fmt_cpu(c[n], r["metric"]) for n in CONTENDERS) + " |")
    L.append("")
    L.append("**Limit.** `ociblk-bench pread`: `pread` of the payload blob, 1 MiB at a time, into a shared memfd "
             "region as large as the client's guest memory for the same job, its 1 MiB buffers taken in turn, "
             "each thread reading its own slice as each queue does.\n")
    L.append("| threads | pread | range | CPU-s/GiB | ociblk seqread at as many queues |")
    L.append("|---|---|---|---|---|")
    for q in QUEUE_COUNTS:
        lim = io["limit"][str(q)]
        o = row(io, "seqread 1M", q)["ociblk"]["median"]
        L.append(f"| {q} | {lim['median']:.0f} MiB/s | {lim['range'][0]:.0f}-{lim['range'][1]:.0f} | "
                 f"{lim['cpu_s_per_gib']:.3f} | {o:.0f} MiB/s ({100 * ratio(o, lim['median']):.0f}%) |")
    L.append("")
    L.append(f"**QD1 placement.** randread 4K QD1, 1 queue, with every thread of the server on CPU {SERVER_CPU} "
             f"(`taskset`) and the client on CPU {CLIENT_CPU} (*different CPUs*) or on CPU {SERVER_CPU} "
             "(*same CPU*); *cold start* is the first job of a fresh server, *after seqread* follows a 1 MiB "
             "sequential read at 2 queues on the same server. ociblk runs with `--no-verify` here, so that a "
             "fresh server's first reads do not hash chunks (section 4 measures that).\n")
    L.append("| placement | ociblk | qsd qcow2 | qsd raw | ociblk / qcow2 | range: ociblk; qcow2; raw | "
             "p50 µs: ociblk, qcow2, raw | server CPU-µs/request: ociblk, qcow2, raw |")
    L.append("|---|---|---|---|---|---|---|---|")
    for where, c in io["placement"].items():
        L.append(f"| {where} | {c['ociblk']['median']:.0f} IOPS | {c['qsd-qcow2']['median']:.0f} | "
                 f"{c['qsd-raw']['median']:.0f} | {ratio(c['ociblk']['median'], c['qsd-qcow2']['median']):.2f}x | "
                 + "; ".join(f"{c[n]['range'][0]:.0f}-{c[n]['range'][1]:.0f}" for n in CONTENDERS) + " | "
                 + ", ".join(f"{c[n]['p50_us']:.1f}" for n in CONTENDERS) + " | "
                 + ", ".join(f"{c[n]['server_cpu']:.1f}" for n in CONTENDERS) + " |")
    L.append("")
    L.append(f"**Polling.** ociblk, randread 4K QD1, server and client on different CPUs as above, "
             f"`--poll-max-us 0` (no polling) vs `--poll-max-us {io['poll_us']}` (the default), with the CPUs "
             "otherwise idle and with one busy-loop process pinned to each CPU.\n")
    L.append("| load | polling off | polling on | on / off | range: off; on | p50 µs: off, on | "
             "server / client CPU-µs/request: off; on |")
    L.append("|---|---|---|---|---|---|---|")
    for load, by in io["polling"].items():
        off, on = by["0"], by[str(io["poll_us"])]
        L.append(f"| {load} | {off['median']:.0f} IOPS | {on['median']:.0f} | {ratio(on['median'], off['median']):.2f}x | "
                 f"{off['range'][0]:.0f}-{off['range'][1]:.0f}; {on['range'][0]:.0f}-{on['range'][1]:.0f} | "
                 f"{off['p50_us']:.1f}, {on['p50_us']:.1f} | {fmt_cpu(off, 'iops')}; {fmt_cpu(on, 'iops')} |")
    L.append("")
    L.append("**Flush durability.** ociblk's first write 4K (a FLUSH every 64 writes per queue) with durable "
             "flushes (the default) vs `--flush unsafe` (FLUSH completes without syncing), fresh servers.\n")
    L.append("| queues | default | --flush unsafe | default / unsafe | range: default; unsafe | "
             "mean FLUSH µs: default, unsafe |")
    L.append("|---|---|---|---|---|---|")
    for q, by in io["flush"].items():
        s, u = by["safe"], by["unsafe"]
        L.append(f"| {q} | {s['median']:.0f} IOPS | {u['median']:.0f} | {100 * ratio(s['median'], u['median']):.0f}% | "
                 f"{s['range'][0]:.0f}-{s['range'][1]:.0f}; {u['range'][0]:.0f}-{u['range'][1]:.0f} | "
                 f"{s['flush_mean_us']:.0f}, {u['flush_mean_us']:.0f} |")
    L.append("")
    rw = [row(io, "rewrite 4K", q) for q in QUEUE_COUNTS]
    L.append("Rewrite 4K has no target of its own beyond not getting slower: ociblk / qsd+qcow2 "
             + ", ".join(f"{ratio(r['ociblk']['median'], r['qsd-qcow2']['median']):.2f}x at {n_of(q, 'queue')}"
                         for q, r in zip(QUEUE_COUNTS, rw))
             + f". Load average when the I/O jobs ended: {io['load_average_at_end']:.1f}.\n")
    v = io_verdicts(io)
    L.append("**Targets** (issue 13):\n")
    L.extend(v)
    L.append("")
    why = why_missed(io, v)
    if why:
        L.append("**Why targets are missed**, from this run's figures:\n")
        L.extend(why)
        L.append("")
    return L


def write_plot(io, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = io["rows"]
    fig, axes = plt.subplots(len(QUEUE_COUNTS), len(JOBS), figsize=(3.0 * len(JOBS), 3.2 * len(QUEUE_COUNTS)))
    for ax, r in zip(axes.flat, rows):
        keys = list(CONTENDERS)
        vals = [r["contenders"][k]["median"] for k in keys]
        errs = [[v - r["contenders"][k]["range"][0] for k, v in zip(keys, vals)],
                [r["contenders"][k]["range"][1] - v for k, v in zip(keys, vals)]]
        colors = ["#2a7", "#c84", "#68c"]
        if r["job"] == "seqread 1M":
            lim = io["limit"][str(r["queues"])]
            keys.append("pread limit")
            vals.append(lim["median"])
            errs[0].append(lim["median"] - lim["range"][0])
            errs[1].append(lim["range"][1] - lim["median"])
            colors.append("#999")
        ax.bar(range(len(keys)), vals, yerr=errs, color=colors, capsize=3)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([k.replace(" ", "\n").replace("-", "\n") for k in keys], fontsize=7)
        ax.set_title(f"{r['job']}, {r['queues']} queue{'s' if r['queues'] > 1 else ''}", fontsize=9)
        ax.set_ylabel(unit(r["metric"]), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("ociblk vs qemu-storage-daemon (qcow2 snapshot, raw), same client: medians, "
                 "bars span the repetitions", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
