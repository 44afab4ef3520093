//! Arbitrary bytes as a small archive of an OCI image directory, opened as
//! an OS image, laid out as a node disk and read back.
//!
//! Input: a parameter block, then records, each starting with [`SEP`]:
//!
//! ```text
//! <params> SEP <path> <kind> <contents> SEP <path> <kind> <contents> ...
//! ```
//!
//! `path` (one byte): `L` oci-layout, `I` index.json, `B`
//! blobs/sha256/<sha256 of this record's contents>, `0`-`9`
//! blobs/sha256/<sha256 of record N's contents>, `a`-`z` payloads/<letter>;
//! other bytes pick one of these by value.
//! `kind` (one byte): `f` a regular file, `s` a symlink to the path chosen by
//! the first content byte (relative, as the image builder writes them, so it
//! never leaves the image directory), `d` a directory, `z` a sparse file
//! whose length is the decimal number in the contents; other bytes pick one
//! by value.
//! In contents, `$D<digit>` becomes the hex sha256 and `$S<digit>` the length
//! of an earlier record's contents, so mutations keep digests and sizes that
//! match without the fuzzer having to invert sha256.
//!
//! Everything happens in a fresh temporary directory; nothing outside it is
//! written or followed.
//!
//! Chunk tables get a second, direct look: bytes 40.. of the parameter block
//! pick a payload size and chunk size, and the last record's contents (after its path
//! and kind bytes), split at `,`, are its `chunk_hashes_sha256`. `chunk_hashes::decode` must accept
//! them exactly when an independent check says they are right (count, and
//! each entry canonical base64 without padding of 32 bytes), and give back
//! the same bytes. Payloads of an image that opens have their first and last
//! chunks checked against their tables, which must agree with sha256.

#![no_main]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use std::os::unix::fs::FileExt;

use ociblk_layout::{DiskParams, DiskReader, Layout, OsImage, SECTOR_SIZE, chunk_hashes};
use sha2::{Digest as _, Sha256};

const SEP: &[u8] = b"\n@@";
/// Sparse files stay below this: larger than any partition the parameters
/// below can ask for a payload to fit into, and free on disk.
const MAX_SPARSE: u64 = 8 << 30;
/// Files the disk parameters name as abloader / node parameters. They are
/// read whole, as a user passes them, so they are kept small.
const USER_FILE_MAX: u64 = 1 << 20;
/// Most records looked at; an image has 5 or so files.
const MAX_RECORDS: usize = 32;
/// Largest read of one range of the disk.
const MAX_READ: usize = 256 << 10;
/// Largest chunk hashed when checking an opened image's payloads.
const MAX_CHUNK_CHECK: u64 = 1 << 20;
const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Symlink,
    Dir,
    Sparse,
}

#[derive(Debug)]
struct Record {
    path: u8,
    kind: Kind,
    /// Contents after placeholder substitution.
    contents: Vec<u8>,
    digest: String,
}

fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn split_records(data: &[u8]) -> (&[u8], Vec<&[u8]>) {
    let mut parts = Vec::new();
    let mut rest = data;
    let mut params: Option<&[u8]> = None;
    loop {
        let at = rest.windows(SEP.len()).position(|w| w == SEP);
        let (part, next) = match at {
            Some(i) => (&rest[..i], Some(&rest[i + SEP.len()..])),
            None => (rest, None),
        };
        if params.is_none() {
            params = Some(part);
        } else {
            parts.push(part);
        }
        match next {
            Some(n) if parts.len() < MAX_RECORDS => rest = n,
            _ => break,
        }
    }
    (params.unwrap_or_default(), parts)
}

/// Replaces `$D<k>` and `$S<k>` by the digest and size of record `k`.
fn substitute(contents: &[u8], done: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(contents.len());
    let mut i = 0;
    while i < contents.len() {
        if contents[i] == b'$' && i + 2 < contents.len() {
            let k = contents[i + 2].wrapping_sub(b'0') as usize;
            if let Some(r) = done.get(k) {
                match contents[i + 1] {
                    b'D' => {
                        out.extend_from_slice(r.digest.as_bytes());
                        i += 3;
                        continue;
                    }
                    b'S' => {
                        out.extend_from_slice(r.contents.len().to_string().as_bytes());
                        i += 3;
                        continue;
                    }
                    _ => {}
                }
            }
        }
        out.push(contents[i]);
        i += 1;
    }
    out
}

fn parse_records(parts: &[&[u8]]) -> Vec<Record> {
    let mut records: Vec<Record> = Vec::new();
    for part in parts {
        let (&path, rest) = part.split_first().unwrap_or((&b'B', &[]));
        let (&kind, raw) = rest.split_first().unwrap_or((&b'f', &[]));
        let kind = match kind {
            b'f' => Kind::File,
            b's' => Kind::Symlink,
            b'd' => Kind::Dir,
            b'z' => Kind::Sparse,
            k => [Kind::File, Kind::Symlink, Kind::Dir, Kind::Sparse][usize::from(k % 4)],
        };
        let contents = substitute(raw, &records);
        let digest = hex_sha256(&contents);
        records.push(Record {
            path,
            kind,
            contents,
            digest,
        });
    }
    records
}

/// The path, relative to the image directory, that selector `sel` names
/// for record `own`.
fn rel_path(sel: u8, own: usize, records: &[Record]) -> PathBuf {
    let blob = |hex: &str| Path::new("blobs/sha256").join(hex);
    let sel = match sel {
        b'L' | b'I' | b'B' | b'0'..=b'9' | b'a'..=b'z' => sel,
        s => [b'L', b'I', b'B', b'0' + s % 10, b'a' + s % 26][usize::from(s % 5)],
    };
    match sel {
        b'L' => PathBuf::from("oci-layout"),
        b'I' => PathBuf::from("index.json"),
        b'0'..=b'9' => match records.get(usize::from(sel - b'0')) {
            Some(r) => blob(&r.digest),
            None => blob(&"0".repeat(64)),
        },
        b'a'..=b'z' => Path::new("payloads").join(char::from(sel).to_string()),
        _ => blob(&records[own].digest),
    }
}

/// `target` relative to the directory holding `from` (both relative to
/// the image directory), e.g. `../../payloads/a`.
fn relative_link(from: &Path, target: &Path) -> PathBuf {
    let depth = from.components().count().saturating_sub(1);
    let mut p = PathBuf::new();
    for _ in 0..depth {
        p.push("..");
    }
    p.join(target)
}

fn parse_sparse_len(contents: &[u8]) -> u64 {
    let digits: Vec<u8> = contents
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .take(19)
        .collect();
    std::str::from_utf8(&digits)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0)
        .min(MAX_SPARSE)
}

/// Writes the records into `dir`. Failures (a path taken by an earlier
/// record, a missing parent) just leave that record out, as a broken image
/// would.
fn materialize(dir: &Path, records: &[Record]) {
    for sub in ["blobs/sha256", "payloads"] {
        fs::create_dir_all(dir.join(sub)).expect("create image directories");
    }
    for (i, r) in records.iter().enumerate() {
        let rel = rel_path(r.path, i, records);
        let path = dir.join(&rel);
        let _ = match r.kind {
            Kind::File => fs::write(&path, &r.contents),
            Kind::Dir => fs::create_dir(&path),
            Kind::Symlink => {
                let sel = r.contents.first().copied().unwrap_or(b'L');
                let target = rel_path(sel, i, records);
                symlink(relative_link(&rel, &target), &path)
            }
            Kind::Sparse => {
                fs::File::create(&path).and_then(|f| f.set_len(parse_sparse_len(&r.contents)))
            }
        };
    }
}

/// A size parameter: a selector byte and 4 bytes of value.
fn size_param(p: &mut Params<'_>, default: u64) -> u64 {
    let sel = p.byte();
    let v = u64::from(p.u32());
    match sel % 8 {
        0 => default,
        1 => 0,
        2 => v * SECTOR_SIZE,
        3 => v,
        4 => (v % 65536) << 20,
        5 => u64::MAX - v,
        6 => (v % 8192) * 4096,
        _ => v << 30,
    }
}

/// Reads the parameter block; past its end every byte is zero.
struct Params<'a>(&'a [u8]);

impl Params<'_> {
    fn byte(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
}

fn small_file(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.len() <= USER_FILE_MAX)
}

fn check_layout(layout: &Layout, disk_size: u64) {
    // Every byte of the disk belongs to exactly one extent, in order.
    assert_eq!(layout.size, disk_size);
    assert_eq!(layout.extents.size(), disk_size);
    let mut pos = 0;
    for e in layout.extents.extents() {
        assert_eq!(e.start, pos, "extents must be contiguous");
        assert!(e.len > 0, "empty extent at {pos}");
        pos = e.end();
    }
    assert_eq!(pos, disk_size, "extents must cover the disk");
}

fn read_ranges(reader: &DiskReader, p: &mut Params<'_>) {
    let layout = &reader.layout;
    let size = layout.size;
    let mut ranges = vec![
        (0, 34 * SECTOR_SIZE as usize),
        (size.saturating_sub(4096), 8192),
    ];
    for part in &layout.partitions {
        ranges.push((part.offset(), 64 << 10));
        ranges.push(((part.offset() + part.size()).saturating_sub(4096), 4096));
    }
    for _ in 0..2 {
        let off = p.u64() % size.saturating_add(1 << 20).max(1);
        let len = p.u32() as usize % MAX_READ;
        ranges.push((off, len));
    }
    for (off, len) in ranges {
        let mut buf = vec![0xa5u8; len];
        reader
            .read_at(off, &mut buf)
            .unwrap_or_else(|e| panic!("read of {len} bytes at {off} failed: {e}"));
        // Bytes past the end of the disk read as zeros.
        let inside = size.saturating_sub(off).min(len as u64) as usize;
        assert!(
            buf[inside..].iter().all(|&b| b == 0),
            "bytes past the end of the disk are not zero"
        );
    }
}

/// Decodes `s` as unpadded standard base64 of exactly 32 bytes, written
/// independently of the library: 43 characters, the last carrying 4 bits.
fn reference_decode(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 43 {
        return None;
    }
    let mut bits: u32 = 0;
    let mut nbits = 0;
    let mut out = Vec::with_capacity(33);
    for &c in b {
        let v = BASE64.iter().position(|&a| a == c)? as u32;
        bits = bits << 6 | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    // Two bits are left over; a canonical encoding has them zero.
    if bits != 0 {
        return None;
    }
    out.try_into().ok()
}

fn check_chunk_table(p: &mut Params<'_>, last_record: &[u8]) {
    let size = match p.byte() % 4 {
        0 => u64::from(p.u32() % 4096),
        1 => u64::from(p.u32()),
        2 => p.u64(),
        _ => u64::MAX - u64::from(p.u32()),
    };
    let chunk = match p.byte() % 4 {
        0 => u64::from(p.u32() % 64),
        1 => u64::from(p.u32()),
        2 => 1 << (p.byte() % 64),
        _ => p.u64(),
    };
    let text = String::from_utf8_lossy(last_record);
    let entries: Vec<String> = if text.is_empty() {
        Vec::new()
    } else {
        text.split(',').map(str::to_owned).collect()
    };
    let field = "payloads[0].chunk_hashes_sha256";
    let got = chunk_hashes::decode(Path::new("config"), field, size, chunk, &entries);
    let expected: Option<Vec<[u8; 32]>> = if chunk == 0
        || entries.len() as u64 != size.div_ceil(chunk)
    {
        None
    } else {
        entries.iter().map(|e| reference_decode(e)).collect()
    };
    match (got, expected) {
        (Ok(h), Some(want)) => {
            assert_eq!(h.count(), want.len() as u64);
            for (c, w) in want.iter().enumerate() {
                assert_eq!(h.expected(c as u64), Some(w), "entry {c}");
                let r = h.range(c as u64);
                assert!(r.start < r.end && r.end <= size && r.end - r.start <= chunk);
            }
            assert_eq!(h.chunks_touching(0..size), 0..h.count());
        }
        (Err(e), None) => {
            let msg = e.to_string();
            assert!(msg.contains(field), "error does not name the field: {msg}");
        }
        (Ok(_), None) => panic!("accepted a bad chunk table: {entries:?}"),
        (Err(e), Some(_)) => panic!("refused a good chunk table: {e}"),
    }
}

/// The first and last chunk of each payload, checked against its table.
fn check_payload_chunks(image: &OsImage) {
    for payload in &image.payloads {
        let h = &payload.chunk_hashes;
        if h.chunk_size() > MAX_CHUNK_CHECK || h.count() == 0 {
            continue;
        }
        let Ok(f) = fs::File::open(&payload.path) else {
            continue;
        };
        for c in [0, h.count() - 1] {
            let r = h.range(c);
            let mut buf = vec![0u8; (r.end - r.start) as usize];
            if f.read_exact_at(&mut buf, r.start).is_err() {
                continue;
            }
            let matches = h.check_bytes(c, &buf).is_ok();
            let digest: [u8; 32] = Sha256::digest(&buf).into();
            assert_eq!(matches, h.expected(c) == Some(&digest), "chunk {c}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (params, parts) = split_records(data);
    // The disk and read parameters use the block's first 40 bytes.
    check_chunk_table(
        &mut Params(params.get(40..).unwrap_or_default()),
        parts.last().and_then(|r| r.get(2..)).unwrap_or_default(),
    );
    let records = parse_records(&parts);
    let tmp = tempfile::Builder::new()
        .prefix("ociblk-fuzz-")
        .tempdir()
        .expect("create temp dir");
    let dir = tmp.path();
    materialize(dir, &records);

    let Ok(image) = OsImage::open(dir) else {
        return;
    };
    check_payload_chunks(&image);

    let mut p = Params(params);
    let mut disk = DiskParams::new("fuzz");
    disk.disk_size = size_param(&mut p, disk.disk_size);
    disk.esp_size = size_param(&mut p, disk.esp_size);
    disk.system_size = size_param(&mut p, disk.system_size);
    let flags = p.byte();
    disk.data_partition = flags & 1 == 0;
    let abloader = dir.join("payloads/x");
    if flags & 2 != 0 && small_file(&abloader) {
        disk.abloader = Some(abloader);
    }
    let node_parameters = dir.join("payloads/y");
    if flags & 4 != 0 && small_file(&node_parameters) {
        disk.node_parameters = Some(node_parameters);
    }

    let Ok(layout) = Layout::build(&image, &disk) else {
        return;
    };
    check_layout(&layout, disk.disk_size);
    // Same inputs, same disk.
    if flags & 8 != 0 {
        let again = Layout::build(&image, &disk).expect("second build of the same layout");
        assert_eq!(again.fingerprint, layout.fingerprint);
    }
    let Ok(reader) = DiskReader::open(layout) else {
        return;
    };
    read_ranges(&reader, &mut p);
});
