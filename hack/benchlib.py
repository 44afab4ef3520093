"""What ociblk's benchmark scripts share: paths, process handling, a guest
boot to its ready line, and putting one section into BENCHMARKS.md."""

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OCIBLK = ROOT / "target/release/ociblk"
BENCH = ROOT / "target/release/ociblk-bench"
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
SECTOR = 512
READY = b"ociblk-sample: ready"


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, **kw)


def verify_gbps(image, binary=OCIBLK):
    """`ociblk verify` throughput (GB/s) from its summary line."""
    out = run([binary, "verify", "--image", image]).stdout.decode()
    line = next(l for l in out.splitlines() if "GB/s" in l)
    return float(line.split("(")[1].split(" GB/s")[0])


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def wait_accepting(path, deadline):
    """Polls until a Unix socket accepts a connection (bounded)."""
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
                return True
        except OSError:
            time.sleep(0.0005)
    return False


def stop(proc, sig=signal.SIGTERM, timeout=30):
    """Ends a process this script started, by its PID."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def inspect(image, seed):
    out = run([OCIBLK, "inspect", "--json", "--image", image, "--seed", seed]).stdout
    return json.loads(out)


def allocated(path):
    return os.stat(path).st_blocks * 512


class Contender:
    """A vhost-user-blk server for the I/O jobs."""

    def __init__(self, name, cmd, sock, log=None):
        self.name, self.cmd, self.sock, self.log = name, cmd, sock, log
        self.proc = None

    def start(self):
        if self.sock.exists():
            self.sock.unlink()
        out = open(self.log, "w") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen([str(c) for c in self.cmd], stdout=out, stderr=out)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start")
            time.sleep(0.01)
        if not self.sock.exists():
            raise RuntimeError(f"{self.name} did not create {self.sock}")

    def stop(self):
        if self.proc:
            stop(self.proc)
            self.proc = None


def boot_once(cmd, vars_file, timeout=240):
    shutil.copy(OVMF_VARS, vars_file)
    t0 = time.perf_counter()
    q = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    seen = b""
    os.set_blocking(q.stdout.fileno(), False)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = q.stdout.read(65536)
            if chunk:
                seen = (seen + chunk)[-4096:]
                if READY in seen:
                    return time.perf_counter() - t0
            elif q.poll() is not None:
                break
            else:
                time.sleep(0.005)
        raise RuntimeError("guest did not reach its ready line")
    finally:
        stop(q, signal.SIGKILL)


def qemu_command(vars_file, *disk):
    """The QEMU command line ociblk launch runs for a node (2 vCPUs here), from
    `ociblk qemu-command`; `disk` selects --socket PATH or --image FILE."""
    out = run([OCIBLK, "qemu-command", "--cpus", "2", "--ovmf-vars", vars_file, *disk])
    return out.stdout.decode().splitlines()


def ratio(a, b):
    return a / b if b else float("nan")


def replace_section(path, number, section):
    """Puts `section` (markdown starting with "## {number}. ") into
    BENCHMARKS.md in place of the section of that number, or before the
    targets when it is not there yet; the other sections stay as they are."""
    text = path.read_text()
    start = text.find(f"## {number}. ")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        at = text.find("## Targets")
        at = at if at >= 0 else len(text)
        text = text[:at] + section + text[at:]
    path.write_text(text)


def sections_from(path, first):
    """The sections numbered `first` and above of an existing BENCHMARKS.md
    (written by separate runs), for a full rewrite to keep."""
    if not path.exists():
        return ""
    text, out, n = path.read_text(), [], first
    while (start := text.find(f"## {n}. ")) >= 0:
        end = text.find("\n## ", start + 1)
        out.append(text[start:end + 1] if end >= 0 else text[start:] + "\n")
        n += 1
    return "".join(out)


def add_image_arguments(ap):
    """The options every benchmark that serves both images takes: the
    sample image, the 1 GiB synthetic one, and the repetitions."""
    ap.add_argument("--image", default=str(ROOT / "build/sample-image"))
    ap.add_argument("--synthetic", default=str(ROOT / "build/synthetic-1g"),
                    help="image with a 1 GiB system payload (hack/mkimage --synthetic 1G DIR)")
    ap.add_argument("--reps", type=int, default=3)


def bench_run(sock, args, server_pid=None, cpu=None, timeout=None):
    """One `ociblk-bench run` against the server on `sock`, its JSON report;
    with `server_pid` it carries that process's CPU time, with `cpu` the
    client runs pinned to that CPU (`taskset`)."""
    cmd = [BENCH, "run", "--socket", sock, "--json", *args]
    if server_pid is not None:
        cmd += ["--server-pid", server_pid]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    return json.loads(run(cmd, timeout=timeout).stdout)


def bench_pread(path, args):
    """One `ociblk-bench pread` of `path`: the limit a server's reads are
    measured against. Its JSON report."""
    return json.loads(run([BENCH, "pread", "--file", path, "--json", *args]).stdout)
