#!/usr/bin/env python3
"""Compares two builds of ociblk on the write jobs of BENCHMARKS.md section 2:
first write 4K and rewrite 4K (8 in flight per queue, a FLUSH every 64
writes, durable flushes), at 1 and 2 queues, through `ociblk-bench`. The two
builds alternate within each repetition (which goes first changes too), each
on a fresh overlay, so that both see the same machine: the figure a change to
the write path must keep.

    hack/bench_compare.py --old OLD/ociblk [--new target/release/ociblk] [--reps 9]

Prints each run, then per job the medians, NEW/OLD and the ranges. Build both
first (`cargo build --release -p ociblk -p ociblk-client --bins`); the client
is this tree's `target/release/ociblk-bench`."""

import argparse
import tempfile
from pathlib import Path

from benchlib import OCIBLK, ROOT, median
from bench_io import Disk, job, job_args, rotated, server, show

JOBS = ("first write 4K", "rewrite 4K")
QUEUE_COUNTS = (1, 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, type=Path, help="the ociblk binary before the change")
    ap.add_argument("--new", default=OCIBLK, type=Path, help="the ociblk binary after it")
    ap.add_argument("--image", default=str(ROOT / "build/sample-image"))
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    builds = {"old": args.old, "new": args.new}
    iops = {(b, what, q): [] for b in builds for what in JOBS for q in QUEUE_COUNTS}
    with tempfile.TemporaryDirectory(dir=ROOT / "build") as scratch:
        scratch = Path(scratch)
        disk = Disk(args.image, scratch)
        try:
            for rep in range(args.reps):
                for b in rotated(list(builds), rep):
                    with tempfile.TemporaryDirectory(dir=scratch) as d:
                        c = server("ociblk", disk, Path(d), binary=builds[b])
                        try:
                            for n, q in enumerate(QUEUE_COUNTS):
                                for what in JOBS:
                                    r = job(c, job_args(what, disk, q, "3", n))
                                    show(f"rep{rep}", b, f"{what} {q}q", r, "iops")
                                    iops[(b, what, q)].append(r["iops"])
                        finally:
                            c.stop()
        finally:
            disk.cleanup()
    print("\n| job | queues | old IOPS | new IOPS | new / old | range old | range new |")
    print("|---|---|---|---|---|---|---|")
    for what in JOBS:
        for q in QUEUE_COUNTS:
            old, new = iops[("old", what, q)], iops[("new", what, q)]
            print(f"| {what} | {q} | {median(old):.0f} | {median(new):.0f} | "
                  f"{median(new) / median(old):.3f} | {min(old):.0f}-{max(old):.0f} | "
                  f"{min(new):.0f}-{max(new):.0f} |")


if __name__ == "__main__":
    main()
