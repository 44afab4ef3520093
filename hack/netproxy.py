#!/usr/bin/env python3
"""A TCP relay on loopback that behaves like a network link: a fixed round
trip and a bandwidth cap, for benchmarks of registry pulls on a kernel
without netem.

    hack/netproxy.py --upstream 127.0.0.1:5000 --rtt-ms 20 --mbit 100

It listens on 127.0.0.1 (a free port unless --listen names one), prints
"listening 127.0.0.1:PORT" on its first line of standard output, and relays
every connection to --upstream. Each direction is one link shared by all
connections, as a host's uplink and downlink are: bytes are serialised at
the cap, in the order they were read, then delivered RTT/2 later. A new
connection's first bytes to the upstream wait one more RTT, the TCP
handshake a real network would cost (the relay's own accept is local and
immediate). Queued bytes per connection and direction are bounded, so a
slow reader slows the sender as TCP would.

It ends by itself after --lifetime seconds, when the process that started it
is gone, or on SIGTERM/SIGINT, then prints what it relayed on standard
error.
"""

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

# Bytes read (and so delivered) at once: about this many seconds of the
# link's capacity, between these bounds. Small enough that pacing is smooth
# against the round trip, large enough that the relay's per-read cost stays
# small at 1 Gbit/s.
SLICE_S = 0.002
MIN_READ, MAX_READ = 16 << 10, 256 << 10
# Reads queued per connection and direction before the relay stops reading
# (and TCP's window pushes back on the sender).
QUEUE_READS = 32
PARENT_POLL_S = 1.0
START_TIMEOUT = 10


class Link:
    """One direction: a serialiser at `rate` bytes/s shared by every
    connection, then `delay` seconds of propagation."""

    def __init__(self, rate, delay):
        self.rate, self.delay = rate, delay
        self.free_at = 0.0
        self.bytes = 0

    def deliver_at(self, n, now):
        start = max(now, self.free_at)
        self.free_at = start + n / self.rate
        self.bytes += n
        return self.free_at + self.delay


class Relay:
    def __init__(self, upstream, rtt, rate):
        self.upstream = upstream
        self.rtt = rtt
        self.up = Link(rate, rtt / 2)
        self.down = Link(rate, rtt / 2)
        self.read_size = int(min(MAX_READ, max(MIN_READ, rate * SLICE_S)))
        self.connections = 0
        self.failed = 0

    async def pump(self, reader, writer, link, not_before):
        """Copies reader to writer through `link`; the first bytes are read
        no earlier than `not_before` in the link's eyes."""
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue(QUEUE_READS)

        async def read_side():
            try:
                while True:
                    data = await reader.read(self.read_size)
                    now = max(loop.time(), not_before)
                    at = link.deliver_at(len(data), now) if data else now + link.delay
                    await queue.put((at, data))
                    if not data:
                        return
            except (ConnectionError, OSError):
                await queue.put((loop.time(), None))

        async def write_side():
            while True:
                at, data = await queue.get()
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:  # the reading side broke: so does this one
                    writer.close()
                    return
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        reading = asyncio.create_task(read_side())
        try:
            await write_side()
        finally:
            reading.cancel()

    async def handle(self, client_reader, client_writer):
        loop = asyncio.get_running_loop()
        accepted = loop.time()
        self.connections += 1
        host, port = self.upstream
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            self.failed += 1
            client_writer.close()
            return
        try:
            await asyncio.gather(
                self.pump(client_reader, up_writer, self.up, accepted + self.rtt),
                self.pump(up_reader, client_writer, self.down, 0.0))
        except (ConnectionError, OSError):
            self.failed += 1
        except asyncio.CancelledError:  # the relay is stopping
            pass
        finally:
            for w in (up_writer, client_writer):
                w.close()


def parse_addr(s):
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{s!r}: expected HOST:PORT")
    return host, int(port)


async def serve(a):
    relay = Relay(a.upstream, a.rtt_ms / 1000, a.mbit * 1e6 / 8)
    host, port = a.listen
    server = await asyncio.start_server(relay.handle, host, port)
    addr = server.sockets[0].getsockname()
    print(f"listening {addr[0]}:{addr[1]}", flush=True)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: done.done() or done.set_result("signal"))
    parent = os.getppid()
    deadline = loop.time() + a.lifetime
    why = "signal"
    async with server:
        while not done.done():
            if loop.time() >= deadline:
                why = "lifetime"
                break
            if os.getppid() != parent:
                why = "parent gone"
                break
            await asyncio.wait([done], timeout=PARENT_POLL_S)
    print(f"netproxy: stopped ({why}); {relay.connections} connections ({relay.failed} failed), "
          f"upstream {relay.up.bytes} B, downstream {relay.down.bytes} B", file=sys.stderr, flush=True)


class NetProxy:
    """This relay as a child process of a benchmark: start() returns its
    address; stop() ends it by its PID."""

    def __init__(self, upstream, rtt_ms, mbit, log, lifetime):
        self.cmd = [sys.executable, os.path.abspath(__file__), "--upstream", upstream,
                    "--rtt-ms", str(rtt_ms), "--mbit", str(mbit), "--lifetime", str(lifetime)]
        self.log = log
        self.proc = None
        self.addr = None

    def start(self):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=log)
        os.set_blocking(self.proc.stdout.fileno(), False)
        deadline = time.monotonic() + START_TIMEOUT
        seen = b""
        while time.monotonic() < deadline:
            seen += self.proc.stdout.read() or b""
            if b"\n" in seen:
                line = seen.split(b"\n", 1)[0].decode()
                if not line.startswith("listening "):
                    break
                self.addr = line.split()[1]
                return self.addr
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"netproxy did not start: {seen[-500:]!r}; see {self.log}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", type=parse_addr, required=True, help="HOST:PORT to relay to")
    ap.add_argument("--listen", type=parse_addr, default=("127.0.0.1", 0), help="default 127.0.0.1:0")
    ap.add_argument("--rtt-ms", type=float, required=True, help="round trip added, milliseconds")
    ap.add_argument("--mbit", type=float, required=True, help="bandwidth cap per direction, Mbit/s")
    ap.add_argument("--lifetime", type=float, default=3600, help="seconds before it stops by itself")
    a = ap.parse_args()
    if a.rtt_ms < 0 or a.mbit <= 0 or a.lifetime <= 0:
        ap.error("--rtt-ms must be at least 0, --mbit and --lifetime more than 0")
    asyncio.run(serve(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
