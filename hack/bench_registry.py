#!/usr/bin/env python3
"""ociblk serving an image straight from an OCI registry, against the local
layout and against what a user would otherwise do: `skopeo copy` the whole
image to a local layout, then serve that.

A `docker-registry` (Debian's CNCF distribution) runs on a free loopback
port with its own storage under build/bench; the sample image and the 1 GiB
synthetic image are pushed to it with `skopeo copy`. Per repetition, the
contenders alternate (their order rotates from one repetition to the next):

- sample image: a UEFI guest (OVMF, TCG) booted to its ready line;
- synthetic 1 GiB image (its system payload is pseudo-random bytes, not a
  file system, so it does not boot): a fixed read pattern through
  `ociblk-bench run` (see READ_PATTERN).

Each time runs from starting `ociblk serve` (and, for copy-then-serve, from
starting `skopeo copy`) to the ready line or the last read. Payload bytes
fetched from the registry are counted twice: by ociblk (its exit log line
"fetched from the registry requests=N bytes=M") and by the registry's access
log (bytes sent for each GET of a payload blob).

Then the same over a network, per profile of PROFILES: hack/netproxy.py
relays between the registry and its clients with a round trip added and the
bandwidth capped; the sample image boots from a cold cache (recording its
chunk order), from a second empty cache with --prefetch of that record, from
the warm cache and through skopeo copy then serve, and the 1 GiB image runs
its read pattern the same ways (--no-network leaves these rows out).

Results go to build/bench/registry.json; --write-md replaces section 6 of
BENCHMARKS.md. Run through `hack/bench --only-registry`, which builds what
is needed and the synthetic image.
"""

import argparse
import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (OCIBLK, ROOT, SECTOR, Contender, add_image_arguments, boot_once, inspect, median,  # noqa: E402
                      bench_run, qemu_command, ratio, replace_section, run, stop)
from netproxy import NetProxy  # noqa: E402

SECTION = 6
SEED = "bench"
REGISTRY_START_TIMEOUT = 30
SKOPEO_TIMEOUT = 900
BENCH_RUN_TIMEOUT = 600
# The access log line of a response may follow the client's last byte by a
# moment; its count is polled for this long before being taken as it is.
ACCESS_LOG_SETTLE = 5
MIB = 1 << 20

# What the synthetic image's read pattern reads, in the system partition
# (the system payload starts at its first byte): the first SEQ_BYTES in 1 MiB
# reads at queue depth 4, as a guest mounting and scanning a file system
# would, then RANDOM_READS reads of 4 KiB at random 4 KiB-aligned offsets
# over the whole payload, one at a time (fixed seed: the same offsets for
# every contender).
SEQ_BYTES = 64 * MIB
RANDOM_READS = 32

COLD = "registry, cold cache"
WARM = "registry, warm cache"
PREFETCH = "registry, second host with --prefetch"
LOCAL = "local layout"
COPY = "skopeo copy, then local serve"
CONTENDERS = [COLD, WARM, LOCAL, COPY]

# Network profiles: hack/netproxy.py between the registry and its clients
# (ociblk, skopeo), adding a round trip and capping each direction's
# bandwidth. (name, RTT in ms, Mbit/s); the first carries the targets.
PROFILES = [("20 ms RTT, 100 Mbit/s", 20, 100), ("2 ms RTT, 1 Gbit/s", 2, 1000)]
# The relay's own bound on its life: longer than a profile's rows take.
PROXY_LIFETIME = 3 * 3600
# Through the relay: the sample image's contenders (the local layout does
# not go through it, the loopback table has it) and the 1 GiB image's.
NET_BOOT = [COLD, PREFETCH, WARM, COPY]
NET_SYNTHETIC = [COLD, PREFETCH, WARM, COPY]
# FAST '16 (Harter et al., "Slacker"): containers read 6.4% of their
# image's data at start.
SLACKER_SHARE = 6.4


def free_loopback_port():
    """A TCP port free on 127.0.0.1 when asked (the registry binds it next;
    another program taking it first shows as the registry exiting)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """A `docker-registry serve` on loopback with its own storage in `work`,
    ended by its PID."""

    ANY_REQUEST = re.compile(rb'"(?:GET|HEAD|PUT|POST|PATCH|DELETE) /\S* HTTP/[0-9.]+" \d{3} ')
    BLOB_GET = re.compile(rb'"GET /v2/\S+/blobs/sha256:([0-9a-f]{64}) HTTP/[0-9.]+" (\d{3}) (\d+)')

    def __init__(self, work):
        self.work = work
        self.addr = f"127.0.0.1:{free_loopback_port()}"
        self.log = work / "registry.log"
        self.config = work / "config.yml"
        storage = work / "storage"
        storage.mkdir()
        self.config.write_text(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
            f"http:\n  addr: {self.addr}\n")
        self.proc = None

    def start(self):
        exe = shutil.which("docker-registry")
        if not exe:
            raise RuntimeError("docker-registry not found: install Debian's docker-registry (hack/setup)")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([exe, "serve", self.config], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + REGISTRY_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited ({self.proc.returncode}) at start: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.addr}/v2/", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.02)
        raise RuntimeError(f"docker-registry did not answer /v2/ on {self.addr} within "
                           f"{REGISTRY_START_TIMEOUT} s")

    def stop(self):
        if self.proc:
            stop(self.proc)
            self.proc = None

    def push(self, image, repo_tag):
        run(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
             f"oci:{image}", f"docker://{self.addr}/{repo_tag}"], timeout=SKOPEO_TIMEOUT)

    def ref(self, repo_tag):
        return f"{self.addr}/{repo_tag}"

    def log_offset(self):
        return self.log.stat().st_size

    def blob_bytes_since(self, offset, digests):
        """(requests, bytes) the registry answered with content for GETs of
        the blobs `digests` (hex), from its access log after `offset`."""
        with open(self.log, "rb") as f:
            f.seek(offset)
            text = f.read()
        requests = sent = 0
        for m in self.BLOB_GET.finditer(text):
            if m.group(1).decode() in digests and m.group(2) in (b"200", b"206"):
                requests += 1
                sent += int(m.group(3))
        return requests, sent

    def requests_since(self, offset):
        """HTTP requests the registry's access log shows after `offset`."""
        with open(self.log, "rb") as f:
            f.seek(offset)
            return len(self.ANY_REQUEST.findall(f.read()))

    def settled_blob_bytes(self, offset, digests, expected):
        """blob_bytes_since, polled (bounded) until it reaches `expected`
        bytes: the access log is written just after each response."""
        deadline = time.monotonic() + ACCESS_LOG_SETTLE
        while True:
            got = self.blob_bytes_since(offset, digests)
            if got[1] >= expected or time.monotonic() >= deadline:
                return got
            time.sleep(0.01)


def fetched_line(log):
    """(requests, bytes) from `ociblk serve`'s exit line "fetched from the
    registry", or None when there is none (a local image)."""
    for line in log.read_text().splitlines():
        if "fetched from the registry" in line:
            words = dict(w.split("=", 1) for w in line.split() if "=" in w)
            return int(words["requests"]), int(words["bytes"])
    return None


def prefetch_line(log):
    """From `ociblk serve --prefetch`'s log: chunks the prefetch thread
    fetched, found present (the guest read them first) and its seconds,
    or None when it logged no end (stopped while fetching)."""
    for line in log.read_text().splitlines():
        if "prefetch done" in line or "prefetch stopped" in line:
            words = dict(w.split("=", 1) for w in line.split() if "=" in w)
            return {"chunks": int(words["chunks"]), "fetched": int(words["fetched"]),
                    "present": int(words["already_present"]), "seconds": int(words["elapsed_ms"]) / 1e3,
                    "stopped": "prefetch stopped" in line}
    return None


def serve_args(image, cache):
    return ["--image", image, *(["--cache", cache] if cache else [])]


def start_server(name, image_args, work, queues, extra=()):
    """Starts `ociblk serve` on a fresh overlay; returns it and the seconds
    until its socket existed (tag resolution, manifest and config included)."""
    sock = work / f"{name}.sock"
    log = work / f"{name}.log"
    cmd = [OCIBLK, "serve", *image_args, "--seed", SEED, "--socket", sock,
           "--overlay", work / f"{name}.overlay", "--queues", str(queues), *extra]
    server = Contender(name, cmd, sock, log=log)
    t0 = time.perf_counter()
    try:
        server.start()
    except RuntimeError as e:
        server.stop()
        raise RuntimeError(f"{e}: {log.read_text()[-2000:]}") from None
    return server, time.perf_counter() - t0


def skopeo_copy(ref, dest):
    """`skopeo copy` of the whole image `ref` from the registry to a
    local OCI layout, as a user would before serving it; returns seconds."""
    t0 = time.perf_counter()
    run(["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
         f"docker://{ref}", f"oci:{dest}:{ref.split(':')[-1]}"],
        timeout=SKOPEO_TIMEOUT)
    return time.perf_counter() - t0


class Image:
    """One image in the registry and the local layout it was pushed from."""

    def __init__(self, label, layout, repo_tag, registry):
        self.label, self.layout, self.repo_tag, self.registry = label, layout, repo_tag, registry
        # Where clients reach the registry: itself, or a relay in front of it.
        self.addr = registry.addr
        info = inspect(layout, SEED)
        self.payloads = {p["digest"]: p["size"] for p in info["payloads"]}
        self.payload_bytes = sum(self.payloads.values())
        system = next(p for p in info["payloads"] if p["name"] == "system")
        self.system_size = system["size"]
        self.system_offset = next(p for p in info["partitions"]
                                  if p["name"] == "METROPOLIS-SYSTEM-A")["first_lba"] * SECTOR
        self.manifest_digest = info["manifest_digest"]

    @property
    def ref(self):
        return f"{self.addr}/{self.repo_tag}"

    def via(self, addr):
        """This image reached through `addr` (a relay to its registry)."""
        other = copy.copy(self)
        other.addr = addr
        return other


def measure(image, contender, work, workload, queues, cache, state):
    """Runs `workload(socket)` against a server for one contender; returns
    a sample dict: seconds in all and in parts, and bytes fetched."""
    reg = image.registry
    at = reg.log_offset()
    copy_s = 0.0
    if contender == COPY:
        dest = work / "copied"
        copy_s = skopeo_copy(image.ref, dest)
        image_args = serve_args(dest, None)
    elif contender == LOCAL:
        image_args = serve_args(image.layout, None)
    else:
        image_args = serve_args(image.ref, cache)
    extra = []
    if contender == COLD and state.get("record"):
        extra = ["--record-access", state["record"]]
    elif contender == PREFETCH:
        extra = ["--prefetch", state["record"]]
    name = re.sub(r"[^a-z]+", "-", contender).strip("-")
    server, start_s = start_server(name, image_args, work, queues, extra)
    try:
        work_s = workload(server.sock)
    except (RuntimeError, subprocess.SubprocessError) as e:
        server.stop()
        detail = getattr(e, "stderr", None) or b""
        raise RuntimeError(f"{contender}: {e}: {detail.decode(errors='replace')[-1000:]}\n"
                           f"server log {work / (name + '.log')}:\n"
                           f"{(work / (name + '.log')).read_text()[-3000:]}") from None
    finally:
        server.stop()
    fetched = fetched_line(work / f"{name}.log")
    prefetched = prefetch_line(work / f"{name}.log") if contender == PREFETCH else None
    if contender in (LOCAL, COPY):
        if fetched is not None:
            raise RuntimeError(f"{contender}: ociblk fetched from a registry serving a local layout")
    elif fetched is None:
        raise RuntimeError(f"{contender}: no 'fetched from the registry' line in {work / (name + '.log')}")
    # What the registry should have sent: what ociblk counted, the whole
    # payloads for skopeo, nothing for the local layout.
    expected = fetched[1] if fetched else image.payload_bytes if contender == COPY else 0
    log_requests, log_bytes = reg.settled_blob_bytes(at, image.payloads, expected)
    if log_bytes != expected:
        print(f"warning: {contender}: the registry's access log shows {log_bytes} payload bytes sent, "
              f"expected {expected}", flush=True)
    if contender == COPY:
        shutil.rmtree(work / "copied")
    return {"seconds": copy_s + start_s + work_s, "copy_s": copy_s, "serve_start_s": start_s,
            "work_s": work_s,
            "ociblk_requests": fetched[0] if fetched else None,
            "ociblk_bytes": fetched[1] if fetched else None,
            "registry_requests": log_requests, "registry_bytes": log_bytes, "prefetch": prefetched}


def boot_workload(work):
    def boot(sock):
        vars_file = work / "vars.fd"
        return boot_once(qemu_command(vars_file, "--socket", sock), vars_file)
    return boot


def read_pattern_args(image):
    off = str(image.system_offset)
    return [
        ["--rw", "read", "--bs", "1M", "--iodepth", "4", "--queues", "1",
         "--offset", off, "--length", str(SEQ_BYTES), "--size", str(SEQ_BYTES)],
        ["--rw", "randread", "--bs", "4K", "--iodepth", "1", "--queues", "1", "--seed", "1",
         "--offset", off, "--length", str(image.system_size // 4096 * 4096),
         "--size", str(RANDOM_READS * 4096)],
    ]


def read_workload(image):
    jobs = read_pattern_args(image)

    def reads(sock):
        t0 = time.perf_counter()
        for args in jobs:
            # ociblk-bench exits non-zero on any failed request.
            bench_run(sock, args, timeout=BENCH_RUN_TIMEOUT)
        return time.perf_counter() - t0
    return reads


def prefetch_supported():
    """Whether this `ociblk serve` records a boot's chunk order and replays
    it (`--record-access FILE`, `--prefetch FILE`): the hook for the
    second-host row, measured only when both exist."""
    usage = run([OCIBLK, "serve", "--help"]).stdout.decode()
    return "--record-access" in usage and "--prefetch" in usage


def bench_image(image, contenders, workload_for, queues, reps, scratch, prefetch=False, label=""):
    """Per repetition: the registry group (cold, warm on the same cache,
    and the second host with prefetch when measured), the local layout and
    copy-then-serve, in an order that rotates per repetition."""
    samples = {c: [] for c in contenders}
    groups = [g for g in ([c for c in contenders if c.startswith("registry")], [LOCAL], [COPY])
              if set(g) <= set(contenders) and g]
    for rep in range(reps):
        k = rep % len(groups)
        order = groups[k:] + groups[:k]
        for group in order:
            with tempfile.TemporaryDirectory(dir=scratch) as d:
                work = Path(d)
                cache = work / "cache"
                state = {"record": work / "access.record" if prefetch else None}
                for contender in group:
                    # The second host: its own empty cache, the first host's record.
                    c = work / "cache-second-host" if contender == PREFETCH else cache
                    s = measure(image, contender, work, workload_for(work), queues, c, state)
                    samples[contender].append(s)
                    fetched = s["ociblk_bytes"] if s["ociblk_bytes"] is not None else s["registry_bytes"]
                    print(f"registry{label} {image.label} rep{rep} {contender:38} {s['seconds']:8.3f} s "
                          f"(copy {s['copy_s']:.3f}, serve start {s['serve_start_s']:.3f}, "
                          f"{s['work_s']:.3f}), fetched {fetched} B", flush=True)
    return summarize(image, samples)


def summarize(image, samples):
    out = {"image": image.label, "manifest_digest": image.manifest_digest,
           "payload_bytes": image.payload_bytes, "contenders": {}}
    for c, ss in samples.items():
        seconds = [s["seconds"] for s in ss]
        pick = lambda k: [s[k] for s in ss if s[k] is not None]  # noqa: E731
        out["contenders"][c] = {
            "median_s": median(seconds), "range_s": [min(seconds), max(seconds)],
            "copy_s": median(pick("copy_s")), "serve_start_s": median(pick("serve_start_s")),
            "work_s": median(pick("work_s")),
            "ociblk_bytes": median(pick("ociblk_bytes")) if pick("ociblk_bytes") else None,
            "ociblk_requests": median(pick("ociblk_requests")) if pick("ociblk_requests") else None,
            "registry_bytes": median(pick("registry_bytes")),
            "registry_requests": median(pick("registry_requests")),
            "samples": ss}
    return out


def calibrate(addr, image, registry):
    """What a client sees through `addr`: milliseconds for GET /v2/ on a
    new connection (median of 5; a round trip for the TCP handshake and one
    for the request), and Mbit/s for a GET of the image's largest payload
    blob."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://{addr}/v2/", timeout=30) as r:
            r.read()
        times.append(time.perf_counter() - t0)
    digest, size = max(image.payloads.items(), key=lambda kv: kv[1])
    repo = image.repo_tag.rsplit(":", 1)[0]
    at = registry.log_offset()
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://{addr}/v2/{repo}/blobs/sha256:{digest}", timeout=300) as r:
        got = 0
        while chunk := r.read(1 << 20):
            got += len(chunk)
    seconds = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"calibration through {addr}: blob {digest} gave {got} bytes, expected {size}")
    # Its access log line, written just after the response, must not fall
    # into the next row's count.
    registry.settled_blob_bytes(at, {digest}, size)
    return {"new_connection_get_ms": median(times) * 1e3, "blob_bytes": size,
            "blob_mbit_s": size * 8 / seconds / 1e6}


def bench_profile(profile, registry, sample, synthetic, reps, scratch, work):
    """The network rows of one profile: a relay in front of the registry,
    its calibration, then the sample image's boots and the 1 GiB image's
    read pattern through it."""
    name, rtt_ms, mbit = profile
    proxy = NetProxy(registry.addr, rtt_ms, mbit, work / f"netproxy-{rtt_ms}ms.log", PROXY_LIFETIME)
    addr = proxy.start()
    label = f" [{name}]"
    try:
        out = {"name": name, "rtt_ms": rtt_ms, "mbit": mbit, "direct": calibrate(registry.addr, sample, registry)}
        # From here on, every request the registry answers came through the relay.
        at = registry.log_offset()
        out["calibration"] = calibrate(addr, sample, registry)
        print(f"registry{label}: relay on {addr}: {out['calibration']}; direct: {out['direct']}", flush=True)
        out["sample"] = bench_image(sample.via(addr), NET_BOOT, boot_workload, 2, reps, scratch,
                                    prefetch=True, label=label)
        via = synthetic.via(addr)
        out["synthetic"] = bench_image(via, NET_SYNTHETIC, lambda _work: read_workload(via), 1, reps, scratch,
                                       prefetch=True, label=label)
    finally:
        proxy.stop()
    # Connections the relay accepted against the requests the registry
    # answered: how many requests a connection carried.
    stopped = (work / f"netproxy-{rtt_ms}ms.log").read_text()
    m = re.search(r"netproxy: stopped \([^)]*\); (\d+) connections", stopped)
    out["relay_connections"] = int(m.group(1)) if m else None
    out["registry_requests"] = registry.requests_since(at)
    out["verdicts"] = net_verdicts(out, target=profile == PROFILES[0])
    return out


# --- report -------------------------------------------------------------------------


def fmt_bytes(n):
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n:.0f} B"


def time_table(res, what):
    c = res["contenders"]
    local = c[LOCAL]["median_s"]
    L = [f"| how the image reaches the server | {what} | / local layout | range over repetitions | "
         "of it: skopeo copy; serve start |", "|---|---|---|---|---|"]
    for name, r in c.items():
        copy = f"{r['copy_s']:.2f} s" if r["copy_s"] else "–"
        L.append(f"| {name} | {r['median_s']:.2f} s | {ratio(r['median_s'], local):.2f}x | "
                 f"{r['range_s'][0]:.2f}-{r['range_s'][1]:.2f} s | {copy}; {r['serve_start_s'] * 1e3:.0f} ms |")
    return L


def bytes_rows(res):
    L = []
    for name, r in res["contenders"].items():
        if name == LOCAL:
            continue
        ours = f"{r['ociblk_bytes']:.0f} in {r['ociblk_requests']:.0f} requests" \
            if r["ociblk_bytes"] is not None else "– (skopeo)"
        share = r["ociblk_bytes"] if r["ociblk_bytes"] is not None else r["registry_bytes"]
        L.append(f"| {res['image']} | {name} | {ours} | {r['registry_bytes']:.0f} in "
                 f"{r['registry_requests']:.0f} requests | {res['payload_bytes']} | "
                 f"{100 * ratio(share, res['payload_bytes']):.1f}% |")
    return L


def verdicts(res):
    boot = res["sample"]["contenders"]
    syn = res["synthetic"]["contenders"]
    out = []
    x = ratio(boot[COLD]["median_s"], boot[LOCAL]["median_s"])
    out.append(f"- Registry, cold-cache boot of the sample image: {x:.2f}x the local layout's time "
               f"(target within 1.5x): {'met' if x <= 1.5 else 'MISSED'}.")
    cold, copy = syn[COLD]["median_s"], syn[COPY]["median_s"]
    out.append(f"- Registry, cold cache, 1 GiB synthetic image (read pattern): {cold:.2f} s against "
               f"{copy:.2f} s for skopeo copy then local serve, which takes {ratio(copy, cold):.2f}x as long "
               f"(target faster than copy-then-serve): {'met' if cold < copy else 'MISSED'}.")
    x = ratio(boot[WARM]["median_s"], boot[LOCAL]["median_s"])
    out.append(f"- Registry, warm-cache boot of the sample image: {x:.3f}x the local layout's time "
               f"(target within 5%): {'met' if x <= 1.05 else 'MISSED'}.")
    return out


def net_verdicts(net, target):
    """The network targets (stated for the first profile, reported as
    figures for the others)."""
    boot = net["sample"]["contenders"]
    syn = net["synthetic"]["contenders"]
    pre, warm, cold = boot[PREFETCH]["median_s"], boot[WARM]["median_s"], boot[COLD]["median_s"]
    x = ratio(pre, warm)
    tail = f" (target within 1.25x): {'met' if x <= 1.25 else 'MISSED'}." if target else "."
    out = [f"- {net['name']}: cold-cache boot of the sample image with --prefetch {pre:.2f} s, "
           f"{x:.2f}x the warm-cache boot ({warm:.2f} s){tail} Without --prefetch: {cold:.2f} s, "
           f"{ratio(cold, warm):.2f}x."]
    copy_s = syn[COPY]["median_s"]
    for c in (COLD, PREFETCH):
        t = syn[c]["median_s"]
        y = ratio(copy_s, t)
        what = "cold cache" if c == COLD else "cold cache with --prefetch"
        tail = f" (target at least 2x): {'met' if y >= 2 else 'MISSED'}." if target else "."
        out.append(f"- {net['name']}: 1 GiB image, {what}, read pattern {t:.2f} s against {copy_s:.2f} s for "
                   f"skopeo copy then local serve: {y:.2f}x faster{tail}")
    return out


def prefetch_lines(net):
    """What the prefetch thread did in each --prefetch row."""
    L = []
    for what in ("sample", "synthetic"):
        res = net[what]
        runs = [s["prefetch"] for s in res["contenders"][PREFETCH]["samples"] if s.get("prefetch")]
        if not runs:
            recorded = any("prefetch" in s for s in res["contenders"][PREFETCH]["samples"])
            L.append(f"- {net['name']}, {res['image']}: "
                     f"{'the prefetch thread logged no end' if recorded else 'not in this result'}.")
            continue
        floor = res["contenders"][COLD]["ociblk_bytes"] * 8 / (net["mbit"] * 1e6)
        each = "; ".join(f"fetched {r['fetched']} of {r['chunks']} chunks in {r['seconds']:.2f} s"
                         f"{' (stopped)' if r['stopped'] else ''}" for r in runs)
        L.append(f"- {net['name']}, {res['image']}: {each} (the guest or reader asked first for the others); "
                 f"the cold rows' bytes take {floor:.2f} s at the cap alone.")
    return L


def net_why(net):
    """Where a --prefetch row's time goes, from the figures: the relay's
    connections per request, and the prefetch thread's time per chunk
    against the link's (one round trip and a chunk at the cap)."""
    L = []
    conns, reqs = net.get("relay_connections"), net.get("registry_requests")
    if conns and reqs and conns >= 0.8 * reqs:
        L.append(f"- {net['name']}: the relay accepted {conns} connections for {reqs} requests the registry "
                 f"answered: nearly every request opened a connection of its own, so each chunk costs a round "
                 f"trip ({net['rtt_ms']} ms) for the TCP handshake on top of the one for the request.")
    runs = [r for r in (s.get("prefetch") for s in net["sample"]["contenders"][PREFETCH]["samples"]) if r]
    done = [r for r in runs if r["fetched"] and not r["stopped"]]
    if done:
        per_chunk = median([r["seconds"] / r["fetched"] for r in done])
        chunk = net["sample"]["contenders"][COLD]["ociblk_bytes"] / max(
            net["sample"]["contenders"][COLD]["ociblk_requests"], 1)
        link = chunk * 8 / (net["mbit"] * 1e6) + net["rtt_ms"] / 1e3
        guest = sum(r["present"] for r in runs)
        L.append(f"- {net['name']}: the sample boot's prefetch took {per_chunk * 1e3:.0f} ms per chunk it fetched "
                 f"(median over repetitions), one chunk at a time, against {link * 1e3:.0f} ms for a chunk's bytes "
                 f"at the cap plus one round trip; over the repetitions, the guest read {guest} of "
                 f"{sum(r['chunks'] for r in runs)} recorded chunks before the prefetch reached them.")
    return L


def share_line(net):
    c = net["sample"]["contenders"][COLD]
    share = 100 * ratio(c["ociblk_bytes"], net["sample"]["payload_bytes"])
    s = net["synthetic"]["contenders"][COLD]
    sshare = 100 * ratio(s["ociblk_bytes"], net["synthetic"]["payload_bytes"])
    return (f"- {net['name']}: the cold boot fetched {fmt_bytes(c['ociblk_bytes'])} of the sample image's "
            f"{fmt_bytes(net['sample']['payload_bytes'])} before ready ({share:.1f}%); the 1 GiB read pattern "
            f"{fmt_bytes(s['ociblk_bytes'])} ({sshare:.1f}%).")


def net_time_table(res, what):
    c = res["contenders"]
    warm = c[WARM]["median_s"]
    L = [f"| how the image reaches the server | {what} | / warm cache | range over repetitions | "
         "of it: skopeo copy; serve start | fetched by ociblk (requests) |", "|---|---|---|---|---|---|"]
    for name, r in c.items():
        copy_s = f"{r['copy_s']:.2f} s" if r["copy_s"] else "–"
        fetched = (f"{fmt_bytes(r['ociblk_bytes'])} ({r['ociblk_requests']:.0f})" if r["ociblk_bytes"] is not None
                   else f"{fmt_bytes(r['registry_bytes'])} (skopeo, {r['registry_requests']:.0f})")
        L.append(f"| {name} | {r['median_s']:.2f} s | {ratio(r['median_s'], warm):.2f}x | "
                 f"{r['range_s'][0]:.2f}-{r['range_s'][1]:.2f} s | {copy_s}; {r['serve_start_s'] * 1e3:.0f} ms | "
                 f"{fetched} |")
    return L


def net_section(res):
    L = ["### Over a network\n",
         "The same registry behind `hack/netproxy.py`, a TCP relay on loopback written for this benchmark "
         "(the kernel here has no netem): each direction is one link shared by all connections, bytes "
         "serialised at the bandwidth cap in the order read, then delivered RTT/2 later; a new "
         "connection's first request waits one more round trip (the TCP handshake). ociblk and skopeo "
         "reach the registry only through it. Per profile: the sample image booted from a cold cache "
         "(recording its chunk order with `--record-access`), from a second empty cache with `--prefetch` "
         "of that record, then from the first cache again (warm), and through `skopeo copy` then serve; "
         "the 1 GiB image's read pattern likewise (its record is the read pattern's). ociblk's byte "
         "count is taken when the server stops, right after the ready line or the last read.\n",
         "Measured through the relay before the rows (a GET of `/v2/` on a new connection, median of 5; "
         "a GET of the sample image's largest payload blob), against the registry directly:\n",
         "| profile | GET /v2/, new connection | blob GET | directly: GET /v2/; blob GET | "
         "connections through the relay / requests the registry answered, whole profile |",
         "|---|---|---|---|---|"]
    for net in res["network"]:
        c, d = net["calibration"], net["direct"]
        L.append(f"| {net['name']} | {c['new_connection_get_ms']:.1f} ms | {c['blob_mbit_s']:.0f} Mbit/s | "
                 f"{d['new_connection_get_ms']:.1f} ms; {d['blob_mbit_s']:.0f} Mbit/s | "
                 f"{net.get('relay_connections', '–')} / {net.get('registry_requests', '–')} |")
    L.append("")
    for net in res["network"]:
        L += [f"#### {net['name']}\n", "Sample image, boot to the ready line:\n"]
        L += net_time_table(net["sample"], "to ready")
        L += ["", "1 GiB image, the read pattern:\n"]
        L += net_time_table(net["synthetic"], "read pattern")
        L.append("")
    L.append(f"Bytes fetched before ready, as a share of the payload (FAST '16, Slacker: containers read "
             f"{SLACKER_SHARE}% of their image at start):\n")
    L += [share_line(net) for net in res["network"]]
    L += ["", "The prefetch thread (its log line `prefetch done`), per repetition:\n"]
    L += [line for net in res["network"] for line in prefetch_lines(net)]
    L += ["", "Network targets:\n"]
    for net in res["network"]:
        L += net["verdicts"]
    why = [line for net in res["network"] for line in net_why(net)]
    if why:
        L += ["", "Where the cold rows' time goes, from the figures above:\n"] + why
    L.append("")
    return L


def why_missed(res):
    boot = res["sample"]["contenders"]
    syn = res["synthetic"]["contenders"]
    L = []
    cold, warm, local = boot[COLD], boot[WARM], boot[LOCAL]
    if ratio(cold["median_s"], local["median_s"]) > 1.5:
        extra = cold["median_s"] - local["median_s"]
        per_chunk = extra / max(cold["ociblk_requests"], 1)
        scold, slocal = syn[COLD], syn[LOCAL]
        fetch = (scold["work_s"] - slocal["work_s"]) / max(scold["ociblk_requests"], 1)
        lo, hi = local["range_s"]
        L.append(f"- **Cold-cache boot.** It took {extra:.2f} s more than from the local layout while "
                 f"fetching {fmt_bytes(cold['ociblk_bytes'])} in {cold['ociblk_requests']:.0f} chunk requests: "
                 f"{per_chunk * 1e3:.0f} ms per chunk, which the guest waits for at its first read of each "
                 "chunk (fetch, hash, store, hash again from the cache). Without a guest, the same work costs "
                 f"{fetch * 1e3:.1f} ms per chunk (the 1 GiB read pattern, cold minus local, over its "
                 f"{scold['ociblk_requests']:.0f} chunk requests); the server's start (tag, manifest, config) "
                 f"took {cold['serve_start_s'] * 1e3:.0f} ms against {local['serve_start_s'] * 1e3:.0f} ms; "
                 f"boots from the local layout alone ranged {lo:.2f}-{hi:.2f} s over the repetitions.")
    if ratio(warm["median_s"], local["median_s"]) > 1.05:
        lo, hi = local["range_s"]
        L.append(f"- **Warm-cache boot.** It fetched {warm['ociblk_bytes']:.0f} bytes and took "
                 f"{warm['median_s'] - local['median_s']:.2f} s more than from the local layout "
                 f"({warm['serve_start_s'] * 1e3:.0f} ms of it the server's start, against "
                 f"{local['serve_start_s'] * 1e3:.0f} ms); boots from the local layout alone ranged "
                 f"{lo:.2f}-{hi:.2f} s over the repetitions (TCG guests on a shared 2-core machine).")
    scold, scopy = syn[COLD], syn[COPY]
    if scold["median_s"] >= scopy["median_s"]:
        L.append(f"- **1 GiB image, cold cache vs copy-then-serve.** The cold read pattern fetched "
                 f"{fmt_bytes(scold['ociblk_bytes'])} in {scold['ociblk_requests']:.0f} chunk requests in "
                 f"{scold['work_s']:.2f} s ({scold['ociblk_bytes'] / MIB / scold['work_s']:.0f} MiB/s), "
                 f"while skopeo copied {fmt_bytes(scopy['registry_bytes'])} in {scopy['copy_s']:.2f} s "
                 f"({scopy['registry_bytes'] / MIB / scopy['copy_s']:.0f} MiB/s).")
    return L


def section(res):
    boot, syn = res["sample"], res["synthetic"]
    L = [f"## {SECTION}. Serving from a registry\n",
         f"From a separate run: `{res['command']}`, {res['date']}, repetitions: {res['reps']}; "
         f"{res['machine']}.\n",
         "`ociblk serve --image 127.0.0.1:PORT/REPO:TAG --cache DIR` against a `docker-registry` "
         "(Debian's CNCF distribution 2.8, filesystem storage) on loopback, the images pushed to it "
         "with `skopeo copy`. Contenders: *registry, cold cache* (an empty `--cache` directory), "
         "*registry, warm cache* (a second server on the same cache, after the cold one), *local "
         "layout* (the OCI layout the image was pushed from), and *skopeo copy, then local serve* "
         "(`skopeo copy docker://… oci:DIR`, the whole image, then `ociblk serve` of DIR): what a user "
         "would do without registry support. Each time runs from starting `skopeo copy` or `ociblk "
         "serve` to the end; a fresh overlay per server. Contenders alternate within each repetition, "
         "their order rotating between repetitions; figures are medians, ratios are ratios of "
         "medians.\n",
         "### Sample image: boot to the ready line\n",
         "A UEFI guest (OVMF, TCG, 2 vCPUs, the command line of `ociblk qemu-command`) from QEMU's start "
         "to `ociblk-sample: ready`, plus the server's start before it.\n"]
    L += time_table(boot, "to ready")
    L.append("")
    L += ["### Synthetic 1 GiB image: a read pattern\n",
          "Its system payload is 1 GiB of pseudo-random bytes (`hack/mkimage --synthetic 1G`), not a file "
          "system, so a guest cannot boot from it. Instead `ociblk-bench run` reads, in the system "
          f"partition: the first {SEQ_BYTES >> 20} MiB in 1 MiB reads at queue depth 4, then "
          f"{RANDOM_READS} reads of 4 KiB at random offsets over the whole 1 GiB payload, one at a time "
          "(same seed, so the same offsets, for every contender). Each 4 KiB read of a chunk not yet in "
          "the cache fetches its whole 1 MiB chunk.\n"]
    L += time_table(syn, "read pattern")
    L.append("")
    L += ["### Bytes fetched from the registry\n",
          "Payload bytes only (manifest and config are a few KiB). *ociblk*: the server's exit log line "
          "`fetched from the registry requests=N bytes=M`; *registry*: bytes the registry's access log "
          "shows sent for GETs of the payload blobs (`206` answers to `Range` requests, `200` for "
          "skopeo's whole blobs). A warm cache fetches nothing.\n",
          "| image | how | ociblk's count (bytes) | registry access log (bytes) | payload size (bytes) | "
          "fetched / payload |", "|---|---|---|---|---|---|"]
    L += bytes_rows(boot) + bytes_rows(syn)
    L.append("")
    if res["prefetch"] is None:
        L.append("*Second host with prefetch*: not measured; this `ociblk serve` has no `--record-access` / "
                 "`--prefetch`. When it has, this benchmark records the cold boot's chunk order and boots a "
                 "second host (an empty cache of its own) with `--prefetch`, as a row of the boot table.\n")
    else:
        L.append("*Registry, second host with --prefetch*: an empty cache of its own, `--prefetch` of the "
                 "record the cold boot of the same repetition wrote with `--record-access`.\n")
    if res.get("network"):
        L += net_section(res)
    L.append("Targets:\n")
    L += res["verdicts"]
    why = why_missed(res)
    if why:
        L += ["", "Why targets are missed, from the figures above:\n"] + why
    L.append("")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_image_arguments(ap)
    ap.add_argument("--write-md", action="store_true", help=f"replace section {SECTION} of BENCHMARKS.md")
    ap.add_argument("--no-network", action="store_true",
                    help="skip the rows through hack/netproxy.py (" + "; ".join(p[0] for p in PROFILES) + ")")
    ap.add_argument("--from-json", type=Path, metavar="FILE",
                    help="measure nothing: print (and with --write-md write) the section of a saved "
                         "build/bench/registry.json")
    ap.add_argument("--command", default="hack/bench --only-registry", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.reps < 1:
        ap.error("--reps must be at least 1")
    if a.from_json:
        try:
            saved = a.from_json.read_text()
        except OSError as e:
            sys.exit(f"bench_registry: --from-json {a.from_json}: {e.strerror}")
        try:
            text = section(json.loads(saved))
        except (ValueError, KeyError, TypeError) as e:
            sys.exit(f"bench_registry: --from-json {a.from_json}: not a result of this benchmark: {e!r}")
        return write_section(text, a.write_md)
    for tool in ("skopeo", "docker-registry", "qemu-system-x86_64"):
        if not shutil.which(tool):
            sys.exit(f"bench_registry: {tool} not found: run hack/setup")
    scratch = ROOT / "build/bench"
    scratch.mkdir(parents=True, exist_ok=True)
    prefetch = prefetch_supported()
    res = {"command": a.command, "date": time.strftime("%Y-%m-%d"), "reps": a.reps,
           "machine": f"{os.cpu_count()} cores, "
                      f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} GiB, "
                      f"{os.uname().release}",
           "read_pattern": {"sequential_bytes": SEQ_BYTES, "random_4k_reads": RANDOM_READS}}
    with tempfile.TemporaryDirectory(dir=scratch, prefix="registry-") as d:
        registry = Registry(Path(d))
        registry.start()
        try:
            t0 = time.perf_counter()
            registry.push(a.image, "bench/sample:v1")
            registry.push(a.synthetic, "bench/synthetic-1g:v1")
            print(f"registry on {registry.addr}; pushed both images in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            sample = Image("sample", a.image, "bench/sample:v1", registry)
            synthetic = Image("synthetic 1 GiB", a.synthetic, "bench/synthetic-1g:v1", registry)
            boot_contenders = [COLD, WARM] + ([PREFETCH] if prefetch else []) + [LOCAL, COPY]
            res["sample"] = bench_image(sample, boot_contenders, boot_workload, 2, a.reps, scratch,
                                        prefetch=prefetch)
            res["synthetic"] = bench_image(synthetic, CONTENDERS, lambda _work: read_workload(synthetic), 1,
                                           a.reps, scratch)
            if not a.no_network:
                if not prefetch:
                    raise RuntimeError("the network rows need `ociblk serve --record-access/--prefetch`")
                res["network"] = [bench_profile(p, registry, sample, synthetic, a.reps, scratch, Path(d))
                                  for p in PROFILES]
        finally:
            registry.stop()
    res["prefetch"] = PREFETCH if prefetch else None
    res["verdicts"] = verdicts(res)
    res["load_average_at_end"] = os.getloadavg()[0]
    (scratch / "registry.json").write_text(json.dumps(res, indent=1))
    return write_section(section(res), a.write_md)


def write_section(text, write_md):
    print(text)
    if write_md:
        replace_section(ROOT / "BENCHMARKS.md", SECTION, text)
        print(f"rewrote section {SECTION} of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
