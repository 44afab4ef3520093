#!/usr/bin/env python3
"""Compares two builds of ociblk side by side in one run: the figure a change
to the read or write path must keep.

- The write jobs of BENCHMARKS.md section 2 (first write 4K and rewrite 4K, 8
  in flight per queue, a FLUSH every 64 writes, durable flushes), at 1 and 2
  queues, through `ociblk-bench`: the default.
- With --all-io, every job of section 2: the read jobs too (page cache warm,
  every chunk verified by a first pass, as in section 2).
- With --verify, the verification rows of section 4: the first pass over
  every chunk of the system payload (each chunk hashed on its first read),
  and `ociblk verify` of the image.

The two builds alternate within each repetition (which goes first changes
too), each on a fresh overlay, so that both see the same machine.

    hack/bench_compare.py --old OLD/ociblk [--new target/release/ociblk] [--reps 9]
                          [--all-io] [--verify] [--only JOB]... [--runtime SECONDS]

Prints each run, then per job the medians, NEW/OLD and the ranges. Build both
first (`cargo build --release -p ociblk -p ociblk-client --bins`); the client
is this tree's `target/release/ociblk-bench`."""

import argparse
import tempfile
from pathlib import Path

from benchlib import OCIBLK, ROOT, median, verify_gbps
from bench_io import JOBS, METRIC, Disk, job, job_args, rotated, server, show, verify_pass

WRITE_JOBS = ("first write 4K", "rewrite 4K")
QUEUE_COUNTS = (1, 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, type=Path, help="the ociblk binary before the change")
    ap.add_argument("--new", default=OCIBLK, type=Path, help="the ociblk binary after it")
    ap.add_argument("--image", help="default: the sample image for the write jobs alone, the "
                    "synthetic 1 GiB image (hack/mkimage --synthetic 1G) with --all-io or --verify, "
                    "whose system payload the read jobs need")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--all-io", action="store_true", help="the read jobs of section 2 too")
    ap.add_argument("--verify", action="store_true", help="the verification rows too")
    ap.add_argument("--runtime", default="3", help="seconds per read job")
    ap.add_argument("--only", action="append", metavar="JOB",
                    help="just this job of section 2 (repeatable), e.g. 'randread 4K QD1'")
    args = ap.parse_args()
    if args.image is None:
        wide = args.all_io or args.verify or any("read" in j for j in args.only or ())
        args.image = str(ROOT / ("build/synthetic-1g" if wide else "build/sample-image"))
    builds = {"old": args.old, "new": args.new}
    jobs = JOBS if args.all_io else WRITE_JOBS
    if args.only:
        unknown = set(args.only) - set(JOBS)
        if unknown:
            raise SystemExit(f"bench_compare: no job {sorted(unknown)}; jobs: {', '.join(JOBS)}")
        jobs = tuple(args.only)
    rows = {}

    def note(b, row, value):
        rows.setdefault(row, {"old": [], "new": []})[b].append(value)

    with tempfile.TemporaryDirectory(dir=ROOT / "build") as scratch:
        scratch = Path(scratch)
        disk = Disk(args.image, scratch)
        try:
            for rep in range(args.reps):
                for b in rotated(list(builds), rep):
                    with tempfile.TemporaryDirectory(dir=scratch) as d:
                        c = server("ociblk", disk, Path(d), binary=builds[b])
                        try:
                            # Read jobs measure the steady state: every chunk
                            # verified by a first pass.
                            if args.verify or any(j not in WRITE_JOBS for j in jobs):
                                disk.warm("ociblk")
                                r = verify_pass(c, disk)
                                note(b, ("first pass, verifying every chunk", 2, "mib_s"), r["mib_s"])
                            for n, q in enumerate(QUEUE_COUNTS):
                                for what in jobs:
                                    if what not in WRITE_JOBS:
                                        disk.warm("ociblk")
                                    r = job(c, job_args(what, disk, q, args.runtime, n))
                                    metric = METRIC[what]
                                    show(f"rep{rep}", b, f"{what} {q}q", r, metric)
                                    note(b, (what, q, metric), r[metric])
                        finally:
                            c.stop()
                    if args.verify:
                        gbps = verify_gbps(args.image, builds[b])
                        print(f"rep{rep} {b} ociblk verify {gbps:.2f} GB/s", flush=True)
                        note(b, ("ociblk verify", "-", "GB/s"), gbps)
        finally:
            disk.cleanup()
    print("\n| job | queues | metric | old | new | new / old | range old | range new |")
    print("|---|---|---|---|---|---|---|---|")
    for (what, q, metric), v in rows.items():
        old, new = v["old"], v["new"]
        print(f"| {what} | {q} | {metric} | {median(old):.1f} | {median(new):.1f} | "
              f"{median(new) / median(old):.3f} | {min(old):.1f}-{max(old):.1f} | "
              f"{min(new):.1f}-{max(new):.1f} |")


if __name__ == "__main__":
    main()
