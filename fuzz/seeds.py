#!/usr/bin/env python3
"""Writes the checked-in seed corpora of the fuzz targets (fuzz/corpus/*).

Each seed is a well-formed input in the target's input format (see the doc
comment at the top of each fuzz_targets/*.rs), so that mutations start from
requests, images and overlays that get past the first checks. Output is
deterministic; rerun after changing an input format:

  python3 fuzz/seeds.py
"""

import base64
import hashlib
import json
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- oci_image ------------------------------------------------------------

SEP = b"\n@@"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.monogon.os.image.config.v1+json"
ARTIFACT = "application/vnd.monogon.os.image.v1"


def dumps(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def chunk_hashes(data, chunk):
    out = []
    for i in range(0, len(data), chunk):
        h = hashlib.sha256(data[i : i + chunk]).digest()
        out.append(base64.b64encode(h).decode().rstrip("="))
    return out


def size_param(sel, value):
    return bytes([sel]) + struct.pack("<I", value)


# Disk size, ESP size, system size (a selector byte and a u32 each), flags,
# two reads (u64 offset, u32 length). All zero: the defaults, no reads.
DEFAULT_PARAMS = bytes(3 * 5 + 1 + 2 * 12)


def oci_seed(
    variant, kernel, system, params=DEFAULT_PARAMS, sparse_system=None, copy=False, extra=()
):
    """An image as records: payload files, blob symlinks (or copies),
    config, manifest, index, oci-layout. `$D<k>`/`$S<k>` refer to record k."""
    chunk = 512
    records = []
    records.append(b"af" + kernel)  # 0: payloads/a = kernel
    if sparse_system is None:
        records.append(b"bf" + system)  # 1: payloads/b = system
        sys_size = len(system)
        sys_hashes = chunk_hashes(system, chunk)
    else:
        records.append(b"bz" + str(sparse_system).encode())
        sys_size = sparse_system
        chunk = 1 << 20
        sys_hashes = ["AAAA"] * ((sparse_system + chunk - 1) // chunk)
    if copy:
        records.append(b"0f" + kernel)  # 2: blob named by record 0's digest
    else:
        records.append(b"0sa")  # 2: blob -> ../../payloads/a
    records.append(b"1sb")  # 3: blob -> ../../payloads/b
    config = {
        "format_version": "1",
        "product_info": {
            "id": "metropolis-node",
            "name": "Metropolis Node",
            "version": "0.1.0",
            "variant": variant,
        },
        "payloads": [
            {
                "name": "kernel.efi",
                "size": len(kernel),
                "hash_chunk_size": 512,
                "chunk_hashes_sha256": chunk_hashes(kernel, 512),
            },
            {
                "name": "system",
                "size": sys_size,
                "hash_chunk_size": chunk,
                "chunk_hashes_sha256": sys_hashes,
            },
        ],
    }
    records.append(b"Bf" + dumps(config))  # 4
    # Sizes and digests as placeholders, so they follow mutated contents.
    manifest = (
        '{"schemaVersion":2,"mediaType":"%s","artifactType":"%s",'
        '"config":{"mediaType":"%s","digest":"sha256:$D4","size":$S4},'
        '"layers":[{"mediaType":"application/octet-stream","digest":"sha256:$D0","size":$S0},'
        '{"mediaType":"application/octet-stream","digest":"sha256:$D1","size":%s}]}'
        % (MEDIA_MANIFEST, ARTIFACT, MEDIA_CONFIG, "$S1" if sparse_system is None else sys_size)
    )
    records.append(b"Bf" + manifest.encode())  # 5
    index = (
        '{"schemaVersion":2,"mediaType":"%s","manifests":[{"mediaType":"%s",'
        '"artifactType":"%s","digest":"sha256:$D5","size":$S5}]}'
        % (MEDIA_INDEX, MEDIA_MANIFEST, MEDIA_CONFIG)
    )
    records.append(b"If" + index.encode())  # 6
    records.append(b'Lf{"imageLayoutVersion": "1.0.0"}')  # 7
    records.extend(extra)
    return params + b"".join(SEP + r for r in records)


def oci_seeds():
    kernel = b"MZ" + bytes(range(62))
    system = bytes((i * 7) & 0xFF for i in range(1024))
    write("oci_image", "default-x86_64", oci_seed("x86_64-fuzz", kernel, system))
    write("oci_image", "aarch64-copied-blob", oci_seed("aarch64", kernel, system, copy=True))
    # 64 MiB disk, 34 MiB ESP, 4 MiB system partitions, no data partition,
    # abloader and node parameters, second build, then two reads.
    small = (
        size_param(4, 64)
        + size_param(4, 34)
        + size_param(4, 4)
        + bytes([1 | 2 | 4 | 8])
        + struct.pack("<QI", 40 << 20, 8192)
        + struct.pack("<QI", 63 << 20, 4096)
    )
    extra = (b"xf" + b"ABLOADER" * 8, b"yf" + b"\x0a\x04node")
    write("oci_image", "small-disk-abloader", oci_seed("x86_64", kernel, system, small, extra=extra))
    # A disk of 2^64 - 512 bytes, read across its end (a regression seed:
    # reads that ended past u64::MAX overflowed).
    huge = size_param(5, 511) + bytes(len(DEFAULT_PARAMS) - 5)
    write("oci_image", "huge-disk", oci_seed("x86_64", kernel, system, huge))
    # A 3 MiB sparse system payload.
    write("oci_image", "sparse-system", oci_seed("x86_64", kernel, system, sparse_system=3 << 20))
    # The direct chunk-table check (parameter bytes 40..): 3000 bytes in
    # chunks of 2^10, and a last record (payloads/q) holding its 3 hashes.
    table = bytes([0]) + struct.pack("<I", 3000) + bytes([2, 10])
    hashes = ",".join(chunk_hashes(bytes(range(256)) * 12, 1024)[:3]).encode()
    write(
        "oci_image",
        "chunk-table",
        oci_seed("x86_64", kernel, system, DEFAULT_PARAMS + table, extra=(b"qf" + hashes,)),
    )


# ---- blk_request ----------------------------------------------------------

NEXT, WRITE, INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
BUFFERS = 0x1000


def blk_seed(cfg, queue_log, heads, descs, memory):
    """queue size 2 << queue_log; descs: (addr, len, flags, next)."""
    qsize = 2 << queue_log
    assert len(descs) <= qsize
    out = bytes([cfg, queue_log | (len(heads) << 4)])
    out += b"".join(struct.pack("<H", h) for h in heads)
    descs = list(descs) + [(0, 0, 0, 0)] * (qsize - len(descs))
    out += b"".join(struct.pack("<QIHH", *d) for d in descs)
    return out + memory


def header(t, sector):
    return struct.pack("<IIQ", t, 0, sector)


def mem(pieces):
    """Guest memory from BUFFERS: {address: bytes}."""
    end = max(a + len(b) for a, b in pieces.items())
    buf = bytearray(end - BUFFERS)
    for a, b in pieces.items():
        buf[a - BUFFERS : a - BUFFERS + len(b)] = b
    return bytes(buf)


def blk_seeds():
    # One read of two sectors.
    write(
        "blk_request",
        "read",
        blk_seed(
            0,
            3,
            [0],
            [(0x1000, 16, NEXT, 1), (0x2000, 1024, WRITE | NEXT, 2), (0x1100, 1, WRITE, 0)],
            mem({0x1000: header(T_IN, 3)}),
        ),
    )
    # Write, flush and GET_ID as three chains, write-through.
    write(
        "blk_request",
        "write-flush-getid",
        blk_seed(
            2,
            3,
            [0, 3, 5],
            [
                (0x1000, 16, NEXT, 1),
                (0x1200, 512, NEXT, 2),
                (0x1100, 1, WRITE, 0),
                (0x1010, 16, NEXT, 4),
                (0x1101, 1, WRITE, 0),
                (0x1020, 16, NEXT, 6),
                (0x1140, 20, WRITE | NEXT, 7),
                (0x1102, 1, WRITE, 0),
            ],
            mem(
                {
                    0x1000: header(T_OUT, 5),
                    0x1010: header(T_FLUSH, 0),
                    0x1020: header(T_GET_ID, 0),
                    0x1200: bytes(range(256)) * 2,
                }
            ),
        ),
    )
    # Discard and write-zeroes with UNMAP, one segment each.
    write(
        "blk_request",
        "discard-write-zeroes",
        blk_seed(
            0,
            2,
            [0, 3],
            [
                (0x1000, 16, NEXT, 1),
                (0x1040, 16, NEXT, 2),
                (0x1100, 1, WRITE, 0),
                (0x1010, 16, NEXT, 4),
                (0x1050, 16, NEXT, 5),
                (0x1101, 1, WRITE, 0),
            ],
            mem(
                {
                    0x1000: header(T_DISCARD, 0),
                    0x1010: header(T_WRITE_ZEROES, 0),
                    0x1040: struct.pack("<QII", 8, 4, 0),
                    0x1050: struct.pack("<QII", 16, 8, 1),
                }
            ),
        ),
    )
    # A read through an indirect table, on two adjacent memory regions,
    # with one injected device fault.
    table = b"".join(
        struct.pack("<QIHH", *d)
        for d in [(0x1000, 16, NEXT, 1), (0xFE00, 1024, WRITE | NEXT, 2), (0x1100, 1, WRITE, 0)]
    )
    write(
        "blk_request",
        "indirect-two-regions",
        blk_seed(
            (1 << 3) | (1 << 5),
            1,
            [0, 0],
            [(0x1800, len(table), INDIRECT, 0)],
            mem({0x1000: header(T_IN, 60), 0x1800: table}),
        ),
    )
    # A chain that loops back on itself, read-only.
    write(
        "blk_request",
        "loop-read-only",
        blk_seed(
            1,
            1,
            [0],
            [(0x1000, 16, NEXT, 1), (0x1100, 1, WRITE | NEXT, 0)],
            mem({0x1000: header(T_OUT, 0)}),
        ),
    )


# ---- overlay_header -------------------------------------------------------

BLOCK = 4096
MIB = 1 << 20


def overlay_header(disk_size, fingerprint, clean):
    blocks = (disk_size + BLOCK - 1) // BLOCK
    data_offset = (BLOCK + blocks + MIB - 1) // MIB * MIB
    b = bytearray(4096)
    b[0:8] = b"OCIBLKOV"
    b[8:56] = struct.pack("<IIQ", 1, BLOCK, disk_size) + fingerprint
    b[56:80] = struct.pack("<QQQ", BLOCK, blocks, data_offset)
    b[80:84] = struct.pack("<I", zlib.crc32(bytes(b[:80])))
    b[84] = 1 if clean else 0
    return bytes(b), blocks


def v2_crc(b):
    """Header CRC of a version 2 file: bytes 0..80 and 96..4096."""
    return zlib.crc32(bytes(b[96:4096]), zlib.crc32(bytes(b[:80])))


def layer_file(disk_size, fingerprint, states):
    """A frozen layer (version 2, kind 1) with a valid metadata digest."""
    blocks = (disk_size + BLOCK - 1) // BLOCK
    data_offset = (BLOCK + blocks + MIB - 1) // MIB * MIB
    m = bytes(states) + bytes(blocks - len(states))
    prefix = (
        b"ociblk layer v1\n"
        + struct.pack("<QI", disk_size, BLOCK)
        + fingerprint
        + bytes(1 + 32)
        + struct.pack("<Q", blocks)
    )
    meta = hashlib.sha256(prefix + m).digest()
    b = bytearray(4096)
    b[0:8] = b"OCIBLKOV"
    b[8:56] = struct.pack("<IIQ", 2, BLOCK, disk_size) + fingerprint
    b[56:80] = struct.pack("<QQQ", BLOCK, blocks, data_offset)
    b[96] = 1
    b[128:160] = hashlib.sha256(b"content").digest()
    b[192:224] = meta
    b[80:84] = struct.pack("<I", v2_crc(b))
    b[84] = 1
    return bytes(b) + m


def chain_overlay(disk_size, fingerprint, paths):
    """An overlay (version 2) over a chain of layers at `paths`."""
    section = b"".join(
        hashlib.sha256(p).digest() + struct.pack("<I", len(p)) + p for p in paths
    )
    blocks = (disk_size + BLOCK - 1) // BLOCK
    map_offset = BLOCK + (len(section) + BLOCK - 1) // BLOCK * BLOCK
    data_offset = (map_offset + blocks + MIB - 1) // MIB * MIB
    b = bytearray(4096)
    b[0:8] = b"OCIBLKOV"
    b[8:56] = struct.pack("<IIQ", 2, BLOCK, disk_size) + fingerprint
    b[56:80] = struct.pack("<QQQ", map_offset, blocks, data_offset)
    b[100:116] = struct.pack("<IQI", len(paths), len(section), zlib.crc32(section))
    b[80:84] = struct.pack("<I", v2_crc(b))
    b[84] = 1
    pad = bytes(map_offset - BLOCK - len(section))
    return bytes(b) + section + pad + bytes([1, 2]) + bytes(blocks - 2)


def ops(items):
    """(kind, offset, len, seed): kind < 0x80 sector units, else bytes."""
    return b"".join(struct.pack("<BIIB", k, o, n, s) + b"\0\0" for k, o, n, s in items)


def overlay_seeds():
    fp = bytes([0xAB] + [0] * 30 + [7])

    def seed(control, control2, window, disk_size, clean, states, op_items):
        hdr, blocks = overlay_header(disk_size, fp, clean)
        m = bytes(states) + bytes(blocks - len(states))
        return bytes([control, control2]) + struct.pack("<Q", window) + hdr + m + ops(op_items)

    # 64 KiB disk, clean, a few written and zeroed blocks; extended to its
    # length; writes (sector and byte granular), a zeroing, a flush and a
    # write whose base read fails.
    items = [
        (0, 1, 3, 9),
        (0x80 | 1, 1000, 5000, 3),
        (4, 16, 9, 0),
        (7, 0, 0, 0),
        (0x80 | 6, 8191, 100, 0),
        (2, 127, 1, 5),
    ]
    write(
        "overlay_header", "clean-64k", seed(2 | (3 << 5), 2, 0, 64 << 10, True, [1, 2, 0, 1], items)
    )
    # Not closed cleanly with data in the data area, size not a multiple of
    # 4 KiB, ops near the end, fdatasync.
    write(
        "overlay_header",
        "dirty-odd-size",
        seed(2 | 4 | (3 << 5), 1, 1 << 40, (1 << 20) + 512, False, [0, 2, 2, 1] * 64 + [1], items),
    )
    # Written blocks, opened for another disk first (refused).
    write(
        "overlay_header", "other-disk", seed(2 | 8 | (1 << 5), 0, 0, 32 << 10, True, [1], items[:2])
    )
    # A reset of a filled data area, then opened.
    write(
        "overlay_header", "reset", seed(2 | 16 | (1 << 5), 1, 0, 32 << 10, True, [1, 1], items[:2])
    )
    # An empty file: created anew.
    write("overlay_header", "empty", bytes([0, 0]))
    # A frozen layer: info checks it, open and reset refuse it.
    write(
        "overlay_header",
        "layer",
        bytes([2 | 16, 2]) + struct.pack("<Q", 0) + layer_file(32 << 10, fp, [1, 2, 0, 1]),
    )
    # An overlay over a chain of two layers that do not exist.
    write(
        "overlay_header",
        "chain",
        bytes([2 | 8, 2])
        + struct.pack("<Q", 0)
        + chain_overlay(32 << 10, fp, [b"/nonexistent/l1", b"/nonexistent/l2"]),
    )


# ---- registry_parsing -----------------------------------------------------

D = "sha256:" + hashlib.sha256(b"manifest").hexdigest()


def registry_seeds():
    refs = [
        "localhost:5000/monogon/os-image:v1.2",
        "127.0.0.1:5000/os@" + D,
        "[::1]:5000/os:t@" + D,
        "registry.example.com/a/b-c__d/e.f:latest",
        "docker.io/library/debian:12",
        "ghcr.io/monogon-dev/monogon/os-image@" + D,
        "build/sample-image",
    ]
    for i, r in enumerate(refs):
        write("registry_parsing", "reference-%d" % i, b"R" + r.encode())
    challenges = [
        # docker-registry (distribution) with token auth, as it answers a pull.
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/debian:pull"',
        'Bearer realm="http://127.0.0.1:5001/auth",service="Docker registry",'
        'scope="repository:os:pull,push",error="invalid_token"',
        'Basic realm="Registry Realm"',
        'Bearer realm=x, scope="a\\"b"',
    ]
    for i, c in enumerate(challenges):
        write("registry_parsing", "challenge-%d" % i, b"C" + c.encode())
    auth = lambda s: base64.b64encode(s.encode()).decode()
    config = {
        "auths": {
            "localhost:5000": {"auth": auth("alice:s3cr:et")},
            "https://index.docker.io/v1/": {"auth": auth("bob:pw")},
            "ghcr.io": {},
        },
        "credsStore": "desktop",
    }
    for i, host in enumerate(["localhost:5000", "docker.io", "ghcr.io"]):
        write("registry_parsing", "auth-%d" % i, b"A" + host.encode() + b"\n" + dumps(config))
    write("registry_parsing", "auth-bad-base64", b'Ah.example\n{"auths":{"h.example":{"auth":"!!"}}}')
    layer = {
        "mediaType": "application/octet-stream",
        "digest": "sha256:" + hashlib.sha256(b"kernel").hexdigest(),
        "size": 64,
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "artifactType": ARTIFACT,
        "config": {
            "mediaType": MEDIA_CONFIG,
            "digest": "sha256:" + hashlib.sha256(b"config").hexdigest(),
            "size": 512,
        },
        "layers": [layer, dict(layer, size=1 << 40)],
        "annotations": {"org.opencontainers.image.title": "os"},
    }
    write("registry_parsing", "manifest", b"M" + dumps(manifest))
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [dict(layer, mediaType=MEDIA_MANIFEST, platform={"architecture": "amd64", "os": "linux"})],
    }
    write("registry_parsing", "index", b"M" + dumps(index))
    write("registry_parsing", "digest", b"D" + D.encode())
    kernel = "sha256:" + hashlib.sha256(b"kernel").hexdigest()
    system = "sha256:" + hashlib.sha256(b"system").hexdigest()
    record = "ociblk-access-record 1\nmanifest %s\n# payload chunks in the order they were first read\n" % D
    for blob, index in [(system, 1), (kernel, 3), (system, 0), (kernel, 14)]:
        record += "%s %d\n" % (blob, index)
    write("registry_parsing", "access-record", b"P" + record.encode())
    write("registry_parsing", "access-record-empty", b"P" + ("ociblk-access-record 1\nmanifest %s\n" % D).encode())
    locations = [
        "http://127.0.0.1:5000/storage/v2/os/blobs/" + D,
        "hop",
        "//cdn.example/blob?sig=x",
        "http://192.0.2.1/blob",
        "hTtp://127.0.0.1:5000/blob",
    ]
    for i, location in enumerate(locations):
        write("registry_parsing", "location-%d" % i, b"L" + location.encode())
    confs = [
        'unqualified-search-registries = ["docker.io"]\n'
        '[[registry]]\nprefix = "reg.example/os"\nlocation = "internal.example:5000/os"\ninsecure = true\n'
        '[[registry.mirror]]\nlocation = "127.0.0.1:5001/cache"\n'
        '[[registry.mirror]]\nlocation = "m.example"\npull-from-mirror = "digest-only"\n'
        '[[registry]]\nprefix = "*.corp.example"\nblocked = true\n'
        '[aliases]\n"os" = "reg.example/os"\n',
        '[registries.search]\nregistries = []\n[registries.insecure]\nregistries = ["lab.example:5000"]\n'
        '[registries.block]\nregistries = ["bad.example"]\n',
        '[[registry]]\nlocation = "https://r.example"\n',
    ]
    for i, conf in enumerate(confs):
        write("registry_parsing", "registries-conf-%d" % i, b"G" + conf.encode())


if __name__ == "__main__":
    oci_seeds()
    blk_seeds()
    overlay_seeds()
    registry_seeds()
