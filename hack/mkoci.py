#!/usr/bin/env python3
"""Write a Monogon OS image as an uncompressed OCI image layout directory.

Usage:
  hack/mkoci.py --out DIR --product-info FILE.json \\
      --payload NAME=PATH [--payload NAME=PATH ...] \\
      [--chunk-size BYTES] [--copy]

The layout matches what Monogon's image builder writes for uncompressed
payloads:

  DIR/oci-layout             {"imageLayoutVersion": "1.0.0"}
  DIR/index.json             index with one manifest descriptor
  DIR/blobs/sha256/<hex>     manifest, config and one blob per payload
  DIR/payloads/<NAME>        payload files (default mode only)

By default each payload blob is a relative symlink into DIR/payloads/, so a
large payload is stored once and can be reflinked instead of copied. With
--copy the blob is a regular file instead.

Payloads are streamed in reads of at most 1 MiB, so memory use does not grow
with payload size. Same inputs give byte-identical output.
"""

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

ARTIFACT_TYPE = "application/vnd.monogon.os.image.v1"
CONFIG_MEDIA_TYPE = "application/vnd.monogon.os.image.config.v1+json"
PAYLOAD_MEDIA_TYPE = "application/octet-stream"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
OCI_LAYOUT = b'{"imageLayoutVersion": "1.0.0"}'

READ_SIZE = 1 << 20

# Monogon's rule for payload names: 1-80 characters from [0-9A-Za-z._-], not
# starting with "." or "_" and not ending with ".".
NAME_RE = re.compile(r"^[0-9A-Za-z-][0-9A-Za-z._-]{0,79}$")


def die(msg):
    print(f"mkoci: {msg}", file=sys.stderr)
    sys.exit(1)


def dumps(obj):
    # Compact and key order as built, so output is byte-for-byte reproducible.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def b64_nopad(digest):
    return base64.b64encode(digest).decode("ascii").rstrip("=")


def hash_file(path, chunk_size):
    """Returns (size, sha256 hex, [chunk hashes]) of the file, streaming it."""
    whole = hashlib.sha256()
    chunks = []
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = hashlib.sha256()
            got = 0
            # A chunk may be larger than one read: feed it piecewise.
            while got < chunk_size:
                buf = f.read(min(READ_SIZE, chunk_size - got))
                if not buf:
                    break
                chunk.update(buf)
                whole.update(buf)
                got += len(buf)
            if got == 0:
                break
            size += got
            chunks.append(b64_nopad(chunk.digest()))
            if got < chunk_size:
                break
    return size, whole.hexdigest(), chunks


def copy_file(src, dst):
    # cp shares extents with the source where the file system allows it,
    # which makes multi-GiB payloads cheap; otherwise it copies.
    try:
        subprocess.run(["cp", "--reflink=auto", "--", src, dst], check=True)
    except (OSError, subprocess.CalledProcessError):
        shutil.copyfile(src, dst)


def write_blob(blobs, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return digest


def parse_args(argv):
    p = argparse.ArgumentParser(description="Write a Monogon OS image as an OCI layout directory.")
    p.add_argument("--out", required=True, help="output directory (removed and recreated)")
    p.add_argument("--product-info", required=True, help="JSON file with the product_info object")
    p.add_argument("--payload", action="append", required=True, metavar="NAME=PATH",
                   help="payload, in image order (repeatable)")
    p.add_argument("--chunk-size", type=int, default=1 << 20, metavar="BYTES",
                   help="hash chunk size (default 1048576)")
    p.add_argument("--copy", action="store_true",
                   help="store payload blobs as regular files instead of symlinks")
    args = p.parse_args(argv)

    if args.chunk_size <= 0:
        die("--chunk-size must be positive")
    payloads = []
    seen = set()
    for spec in args.payload:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            die(f"--payload {spec!r}: expected NAME=PATH")
        if not NAME_RE.match(name) or name.endswith("."):
            die(f"--payload {spec!r}: invalid payload name")
        if name in seen:
            die(f"--payload {spec!r}: duplicate payload name")
        seen.add(name)
        if not os.path.isfile(path):
            die(f"--payload {spec!r}: {path} is not a regular file")
        payloads.append((name, os.path.abspath(path)))
    args.payloads = payloads
    return args


def main(argv):
    args = parse_args(argv)
    try:
        with open(args.product_info, "rb") as f:
            product_info = json.load(f)
    except (OSError, ValueError) as e:
        die(f"cannot read product info {args.product_info}: {e}")
    if not isinstance(product_info, dict):
        die(f"{args.product_info}: product info must be a JSON object")

    out = os.path.abspath(args.out)
    for _, path in args.payloads:
        if path == out or path.startswith(out + os.sep):
            die(f"payload {path} lies inside --out, which is about to be removed")
    if os.path.lexists(out):
        shutil.rmtree(out)
    blobs = os.path.join(out, "blobs", "sha256")
    os.makedirs(blobs)
    if not args.copy:
        os.makedirs(os.path.join(out, "payloads"))

    layers = []
    infos = []
    for name, src in args.payloads:
        if args.copy:
            # Copy under a temporary name, then rename to the digest.
            stored = os.path.join(blobs, f".tmp-{name}")
        else:
            stored = os.path.join(out, "payloads", name)
        copy_file(src, stored)
        # Modes are not part of the image; keep them uniform anyway.
        os.chmod(stored, 0o644)
        # Hash what was stored, not the source, so the digest describes the blob.
        size, digest, chunks = hash_file(stored, args.chunk_size)
        blob = os.path.join(blobs, digest)
        if args.copy:
            os.replace(stored, blob)
        elif not os.path.lexists(blob):
            # Two payloads with equal content share one blob.
            os.symlink(os.path.join("..", "..", "payloads", name), blob)
        layers.append({"mediaType": PAYLOAD_MEDIA_TYPE, "digest": f"sha256:{digest}", "size": size})
        infos.append({"name": name, "size": size, "hash_chunk_size": args.chunk_size,
                      "chunk_hashes_sha256": chunks})

    config = dumps({"format_version": "1", "product_info": product_info, "payloads": infos})
    config_digest = write_blob(blobs, config)
    manifest = dumps({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": f"sha256:{config_digest}",
                   "size": len(config)},
        "layers": layers,
    })
    manifest_digest = write_blob(blobs, manifest)
    index = dumps({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [{"mediaType": MANIFEST_MEDIA_TYPE, "artifactType": CONFIG_MEDIA_TYPE,
                       "digest": f"sha256:{manifest_digest}", "size": len(manifest)}],
    })
    with open(os.path.join(out, "index.json"), "wb") as f:
        f.write(index)
    with open(os.path.join(out, "oci-layout"), "wb") as f:
        f.write(OCI_LAYOUT)
    print(f"mkoci: wrote {out} (manifest sha256:{manifest_digest})")


if __name__ == "__main__":
    main(sys.argv[1:])
