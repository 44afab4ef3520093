#!/usr/bin/env python3
"""ociblk's running-snapshot benchmark (BENCHMARKS.md section 7): a
bootstrapped 3-node cluster (network, TPM) saved running (`--save --live`)
against saved powered off (`--save`), and forks of each until every node is
back: a running fork resumes where the guests were, a cold fork boots and
finds its state. Also the private memory (PSS) of each forked node's QEMU
once it runs.

The two kinds of fork alternate within every repetition; figures are
medians, comparisons ratios of medians. Results go to
build/bench/running.json; --write-md replaces section 7 of BENCHMARKS.md.
Run through `hack/bench --only-running`, which builds the release binaries.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fork  # noqa: E402
from bench_fork import READY, check_nodes, launch_fork, launch_fresh, node_names  # noqa: E402
from benchlib import OCIBLK, ROOT, median, replace_section, stop  # noqa: E402

MIB = 1 << 20
# Targets of the issue.
FORK_TARGET_S = 1.0
SAVE_TARGET_S = 3.0
PSS_TARGET = 0.25
QEMU_PID_FILE = "qemu.pid"


def save(kind, work, logs, timeout):
    """A fresh cluster saved `kind` ("running" or "cold"): the snapshot, the
    bootstrap ids and the seconds from every node ready to launch's exit."""
    snapshot = work / f"snapshot-{kind}"
    extra = ["--save", snapshot] + (["--live"] if kind == "running" else [])
    r = launch_fresh(work / f"origin-{kind}", logs / f"save-{kind}.log", timeout, extra)
    check_nodes(r, "bootstrapped")
    shutil.rmtree(work / f"origin-{kind}")
    return snapshot, r.ids, r.ended_at - r.table_at


def pss_of_fork(snapshot, state, log, timeout):
    """Starts a fork, waits for its table (every node resumed or ready),
    reads each node's QEMU PSS, and stops the fork. Bytes per node."""
    cmd = [str(OCIBLK), "launch", "--from", str(snapshot), "--state-dir", str(state), "--wait-for", READY,
           "--timeout", f"{timeout}s"]
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=out)
        try:
            rows, deadline = 0, time.monotonic() + timeout
            while rows < bench_fork.NODES + 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no table of times within {timeout} s (log {log})")
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError(f"ociblk launch ended before its table (log {log})")
                rows += 1
            pss = {}
            for n in node_names():
                pid = int((state / n / QEMU_PID_FILE).read_text().split()[0])
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    kb = next(int(l.split()[1]) for l in f if l.startswith("Pss:"))
                pss[n] = kb * 1024
            return pss
        finally:
            stop(p, signal.SIGTERM, timeout=90)


def guest_memory(snapshot):
    spec = json.loads((snapshot / "cluster.json").read_text())
    machine = spec.get("machine") or {}
    return machine.get("memory_mib", 512) * MIB


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=3, help="nodes of the cluster (section 7 is of 3)")
    ap.add_argument("--timeout", type=int, default=400, help="seconds a cluster may take to be ready")
    ap.add_argument("--write-md", action="store_true", help="replace section 7 of BENCHMARKS.md")
    a = ap.parse_args()
    scratch = ROOT / "build/bench"
    scratch.mkdir(parents=True, exist_ok=True)
    for tool in ("qemu-system-x86_64", "swtpm"):
        if not shutil.which(tool):
            raise SystemExit(f"bench_running: {tool} is needed (hack/setup installs it)")
    work = Path(tempfile.mkdtemp(dir=scratch, prefix="running-"))
    logs = scratch / "running-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    started = time.monotonic()
    # The fork benchmark's helpers read the cluster's size from its module.
    bench_fork.NODES = a.nodes
    res = {"date": time.strftime("%Y-%m-%d"), "reps": a.reps, "nodes": a.nodes}
    try:
        snaps, ids, saves = {}, {}, {"running": [], "cold": []}
        for rep in range(a.reps):
            for kind in (("running", "cold") if rep % 2 == 0 else ("cold", "running")):
                if kind in snaps:
                    shutil.rmtree(snaps[kind])
                snaps[kind], ids[kind], took = save(kind, work, logs, a.timeout)
                saves[kind].append(took)
                print(f"save rep{rep} {kind:7} {took:.2f} s from every node ready to launch's exit", flush=True)
        forks = {"running": [], "cold": []}
        for rep in range(a.reps):
            for kind in (("running", "cold") if rep % 2 == 0 else ("cold", "running")):
                state = Path(tempfile.mkdtemp(dir=work, prefix=f"fork-{kind}-"))
                try:
                    r = launch_fork(snaps[kind], state / "cluster", logs / f"fork-{kind}-rep{rep}.log", a.timeout)
                finally:
                    shutil.rmtree(state)
                if kind == "cold":
                    check_nodes(r, "found state", ids[kind])
                elif r.table_at is None or len(r.table) != bench_fork.NODES:
                    raise RuntimeError(f"the running fork printed no table of times (log {r.log})")
                forks[kind].append(r.table_at)
                print(f"fork rep{rep} {kind:7} every node back after {r.table_at:.2f} s", flush=True)
        state = Path(tempfile.mkdtemp(dir=work, prefix="pss-"))
        try:
            pss = pss_of_fork(snaps["running"], state / "cluster", logs / "pss.log", a.timeout)
        finally:
            shutil.rmtree(state)
        res["save_s"] = {k: median(v) for k, v in saves.items()}
        res["save_range_s"] = {k: [min(v), max(v)] for k, v in saves.items()}
        res["fork_s"] = {k: median(v) for k, v in forks.items()}
        res["fork_range_s"] = {k: [min(v), max(v)] for k, v in forks.items()}
        res["pss"] = pss
        res["guest_memory"] = guest_memory(snaps["running"])
        res["vmstate_bytes"] = sum((snaps["running"] / n / "vmstate").stat().st_size for n in node_names())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = time.monotonic() - started
    res["load_average"] = os.getloadavg()[0]
    (scratch / "running.json").write_text(json.dumps(res, indent=1))
    text = section(res)
    print("\n" + text)
    if a.write_md:
        replace_section(ROOT / "BENCHMARKS.md", 7, text)
        print("replaced section 7 of BENCHMARKS.md")
    return 0


def section(res):
    n, mem = res["nodes"], res["guest_memory"]
    pss = res["pss"]
    worst = max(pss.values())
    L = [f"## 7. Running snapshots\n",
         f"A bootstrapped {n}-node cluster of the sample image (`--network --tpm`, {mem // MIB} MiB and 1 vCPU "
         "per node, TCG, 2 cores) saved running (`ociblk launch ... --save SNAPDIR --live`) and saved powered "
         "off (`--save`), then forked (`ociblk launch --from SNAPDIR --exit-when-ready`). *Save*: from launch's "
         "table of times (every node ready) to its exit, the snapshot complete. *Fork*: from starting the fork "
         "to its table of times: for a running snapshot every guest resumed (loaded its VM state and "
         "continued; no firmware, no boot), for a cold one every guest booted and showed the ready line "
         f"after finding its state. Medians of {res['reps']}, the kinds alternating; {res['date']}, load "
         f"average {res['load_average']:.1f} at the end.\n",
         "| | running | cold | running / cold |",
         "|---|---|---|---|",
         f"| save | {res['save_s']['running']:.2f} s ({res['save_range_s']['running'][0]:.2f}-"
         f"{res['save_range_s']['running'][1]:.2f}) | {res['save_s']['cold']:.2f} s | "
         f"{res['save_s']['running'] / res['save_s']['cold']:.2f}x |",
         f"| fork until every node is back | {res['fork_s']['running']:.2f} s "
         f"({res['fork_range_s']['running'][0]:.2f}-{res['fork_range_s']['running'][1]:.2f}) | "
         f"{res['fork_s']['cold']:.2f} s ({res['fork_range_s']['cold'][0]:.2f}-"
         f"{res['fork_range_s']['cold'][1]:.2f}) | {res['fork_s']['running'] / res['fork_s']['cold']:.3f}x |",
         "",
         f"The VM states hold {res['vmstate_bytes'] / MIB:.0f} MiB for the {n} nodes. Private memory of each "
         "node's QEMU in a running fork once every node resumed (PSS, `/proc/PID/smaps_rollup`): "
         + ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in sorted(pss.items()))
         + f" ({100 * worst / mem:.0f}% of guest RAM at most). Guest memory is not shared between forks: "
           "see the README, *Running snapshots*, on why QEMU's `share=off` template with `x-ignore-shared` "
           "does not fit a vhost-user disk.\n",
         "**Targets** (issue 20):\n",
         f"- Fork of a saved {n}-node running cluster until every node is back: "
         f"{res['fork_s']['running']:.2f} s (target {FORK_TARGET_S:.1f} s): "
         + ("met." if res['fork_s']['running'] <= FORK_TARGET_S else "MISSED."),
         f"- Save of a running {n}-node cluster: {res['save_s']['running']:.2f} s (target "
         f"{SAVE_TARGET_S:.0f} s): " + ("met." if res['save_s']['running'] <= SAVE_TARGET_S else "MISSED."),
         f"- Private memory per forked node: {100 * worst / mem:.0f}% of guest RAM, unshared (target "
         f"{100 * PSS_TARGET:.0f}% with shared memory): "
         + ("met." if worst <= PSS_TARGET * mem else "MISSED: memory is not shared (see above)."),
         ""]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
