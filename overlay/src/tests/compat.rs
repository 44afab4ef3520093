//! Files written by ociblk at commit 6ed6fdc (the fixtures in
//! `tests/fixtures/format-6ed6fdc`, see the README there) open and read
//! as they did then: every block's state and bytes as recorded with the
//! fixture, the headers, chain section and live header parsed and encoded
//! back to the same bytes, and a clean close writing back only what the
//! format lets it change.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::format::{self, HEADER_SIZE, LIVE_HEADER_USED};
use crate::{BlockState, FlushMode, Overlay, OverlayConfig, layer, live, parse_header};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/format-6ed6fdc");

/// The base disk the fixtures were written over.
fn base_byte(p: u64) -> u8 {
    (p.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 | 1
}

/// One way of reading the fixtures: a file, over the layers before it.
struct View {
    /// Layers bottom first, then the overlay (or only layers).
    files: Vec<String>,
    fingerprint: [u8; 32],
    /// Each block's state and the sha256 of its bytes within the disk.
    blocks: Vec<(BlockState, String)>,
}

/// What `manifest.txt` records.
#[derive(Default)]
struct Manifest {
    disk_size: u64,
    /// File name: its length and sha256.
    files: HashMap<String, (u64, String)>,
    /// File name: `Overlay::info`'s written and zeroed blocks and clean flag.
    infos: HashMap<String, (u64, u64, bool)>,
    views: HashMap<String, View>,
    layer_digests: HashMap<String, [u8; 32]>,
    boot_id: [u8; 16],
}

fn unhex<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).unwrap();
    out
}

fn state(s: &str) -> BlockState {
    match s {
        "base" => BlockState::Base,
        "data" => BlockState::Data,
        "zero" => BlockState::Zero,
        s => panic!("state {s}"),
    }
}

fn manifest() -> Manifest {
    let text = fs::read_to_string(Path::new(FIXTURES).join("manifest.txt")).unwrap();
    let mut m = Manifest::default();
    let mut view = None;
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w[..] {
            ["disk_size", n] => m.disk_size = n.parse().unwrap(),
            ["view", name, files, fp] => {
                let v = View {
                    files: files.split(',').map(str::to_string).collect(),
                    fingerprint: unhex(fp),
                    blocks: Vec::new(),
                };
                m.views.insert(name.to_string(), v);
                view = Some(name.to_string());
            }
            ["block", i, s, sha] => {
                let v = m.views.get_mut(view.as_ref().unwrap()).unwrap();
                assert_eq!(i.parse::<usize>().unwrap(), v.blocks.len());
                v.blocks.push((state(s), sha.to_string()));
            }
            ["layer_digest", name, d] => {
                m.layer_digests.insert(name.to_string(), unhex(d));
            }
            ["boot_id", id] => m.boot_id = unhex(id),
            ["file", name, len, sha] => {
                m.files
                    .insert(name.to_string(), (len.parse().unwrap(), sha.to_string()));
            }
            ["info", name, "written", w, "zeroed", z, "clean", c] => {
                let info = (w.parse().unwrap(), z.parse().unwrap(), c.parse().unwrap());
                m.infos.insert(name.to_string(), info);
            }
            _ => panic!("manifest line {line:?}"),
        }
    }
    m
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Expands fixture `name` into `dir` and checks it is the file written
/// then, byte for byte.
fn expand(m: &Manifest, dir: &Path, name: &str) -> PathBuf {
    let packed = fs::read(Path::new(FIXTURES).join(format!("{name}.sparse"))).unwrap();
    assert_eq!(&packed[..8], b"OCIBLKSP", "{name}");
    let path = dir.join(name);
    let file = fs::File::create(&path).unwrap();
    let len = u64::from_le_bytes(packed[8..16].try_into().unwrap());
    file.set_len(len).unwrap();
    let mut rest = &packed[16..];
    while !rest.is_empty() {
        let offset = u64::from_le_bytes(rest[..8].try_into().unwrap());
        let n = u32::from_le_bytes(rest[8..12].try_into().unwrap()) as usize;
        file.write_all_at(&rest[12..12 + n], offset).unwrap();
        rest = &rest[12 + n..];
    }
    let bytes = fs::read(&path).unwrap();
    assert_eq!((bytes.len() as u64, sha(&bytes)), m.files[name], "{name}");
    path
}

fn config(m: &Manifest, view: &View) -> OverlayConfig {
    OverlayConfig {
        disk_size: m.disk_size,
        fingerprint: view.fingerprint,
        flush: FlushMode::Safe,
    }
}

/// Reads every block of `ov` as a server does and checks it against `view`.
fn check_view(ov: &Overlay, m: &Manifest, view: &View, what: &str) {
    assert_eq!(view.blocks.len() as u64, m.disk_size.div_ceil(4096));
    for (b, (want_state, want_sha)) in view.blocks.iter().enumerate() {
        let start = b as u64 * 4096;
        let end = (start + 4096).min(m.disk_size);
        let runs: Vec<_> = ov.runs(start, end - start).collect();
        assert_eq!(runs.len(), 1, "{what}: block {b} is one run");
        assert_eq!(runs[0].state, *want_state, "{what}: block {b}'s state");
        let mut buf = vec![0u8; (end - start) as usize];
        match runs[0].state {
            BlockState::Base => {
                for (i, v) in buf.iter_mut().enumerate() {
                    *v = base_byte(start + i as u64);
                }
            }
            BlockState::Zero => {}
            BlockState::Data => {
                let n = buf.len();
                let bufs = ociblk_io::iobuf::IoBufs::from_slice(&mut buf);
                ov.read_data(start, &bufs, 0, n).unwrap();
            }
        }
        assert_eq!(&sha(&buf), want_sha, "{what}: block {b}'s bytes");
    }
}

fn check_info(m: &Manifest, path: &Path, name: &str) {
    let info = Overlay::info(path).unwrap();
    assert_eq!(
        (info.written, info.zeroed, info.clean),
        m.infos[name],
        "{name}'s info"
    );
}

/// The header parses and encodes back to the same 4 KiB.
fn check_header_round_trip(path: &Path) -> format::Header {
    let bytes = fs::read(path).unwrap();
    let header = parse_header(&bytes).unwrap();
    assert!(
        header.encode() == bytes[..HEADER_SIZE],
        "{}: the header encodes back to other bytes",
        path.display()
    );
    header
}

#[test]
fn a_clean_overlay_written_by_6ed6fdc_reads_the_same() {
    let m = manifest();
    let dir = tempfile::tempdir().unwrap();
    let path = expand(&m, dir.path(), "plain.ov");
    let before = fs::read(&path).unwrap();
    let view = &m.views["plain"];
    check_header_round_trip(&path);
    check_info(&m, &path, "plain.ov");

    let ov = Overlay::open_read_only(&path, config(&m, view)).unwrap();
    check_view(&ov, &m, view, "plain, read-only");
    drop(ov);
    let ov = Overlay::open(&path, config(&m, view)).unwrap();
    check_view(&ov, &m, view, "plain, read-write");
    ov.close().unwrap();
    // Nothing changed: a clean close writes back the same header (clean
    // flag, map checksum, live flag and all), the same map, and leaves the
    // live map region as 6ed6fdc leaves it.
    let after = fs::read(&path).unwrap();
    assert!(before[..HEADER_SIZE] == after[..HEADER_SIZE], "header");
    assert!(before == after, "the file changed");
}

#[test]
fn layers_and_an_overlay_over_them_written_by_6ed6fdc_read_the_same() {
    let m = manifest();
    let dir = tempfile::tempdir().unwrap();
    let l1 = expand(&m, dir.path(), "l1.layer");
    let l2 = expand(&m, dir.path(), "l2.layer");
    let top = expand(&m, dir.path(), "top.ov");
    let files: Vec<Vec<u8>> = [&l1, &l2, &top].map(|p| fs::read(p).unwrap()).into();

    for (path, name, parent) in [(&l1, "l1.layer", None), (&l2, "l2.layer", Some("l1.layer"))] {
        let header = check_header_round_trip(path);
        let fields = header.layer().expect("a layer");
        assert_eq!(fields.digest, m.layer_digests[name], "{name}'s digest");
        assert_eq!(fields.parent, parent.map(|p| m.layer_digests[p]));
        check_info(&m, path, name);
        let verified = layer::verify(path).unwrap();
        assert_eq!(verified[0].digest, m.layer_digests[name]);
    }

    // The chain section: the layers' digests and the paths they had then.
    let header = check_header_round_trip(&top);
    check_info(&m, &top, "top.ov");
    let format::Kind::Overlay {
        chain_len,
        chain_bytes,
        chain_crc,
    } = header.kind
    else {
        panic!("top.ov is an overlay");
    };
    let section = &files[2][HEADER_SIZE..HEADER_SIZE + chain_bytes as usize];
    let chain = format::parse_chain(section, chain_len, chain_crc).unwrap();
    assert_eq!(format::encode_chain(&chain), section);
    let recorded: Vec<_> = chain.iter().map(|e| (e.digest, e.path.clone())).collect();
    let want: Vec<_> = ["l1.layer", "l2.layer"]
        .map(|n| {
            (
                m.layer_digests[n],
                format!("/tmp/ociblk-compat/{n}").into_bytes(),
            )
        })
        .into();
    assert_eq!(recorded, want);

    // Each layer read through a new overlay over it, as a fork starts.
    for name in ["l1", "l1+l2"] {
        let view = &m.views[name];
        let layers: Vec<PathBuf> = view.files.iter().map(|f| dir.path().join(f)).collect();
        let fork = dir.path().join(format!("fork-{name}.ov"));
        layer::create_over(&fork, &layers).unwrap();
        let ov = Overlay::open_read_only(&fork, config(&m, view)).unwrap();
        check_view(&ov, &m, view, name);
    }

    let view = &m.views["top"];
    let layers = [l1.clone(), l2.clone()];
    let ov = Overlay::open_read_only_over(&top, config(&m, view), Some(&layers)).unwrap();
    check_view(&ov, &m, view, "top, read-only");
    drop(ov);
    let ov = Overlay::open_over(&top, config(&m, view), Some(&layers)).unwrap();
    check_view(&ov, &m, view, "top, read-write");
    ov.close().unwrap();
    // The overlay keeps the recorded paths, and nothing else changed
    // either; the layers are never written.
    for (path, before) in [&l1, &l2, &top].into_iter().zip(&files) {
        let after = fs::read(path).unwrap();
        assert!(before[..HEADER_SIZE] == after[..HEADER_SIZE], "header");
        assert!(*before == after, "{} changed", path.display());
    }
}

/// Opens a fresh copy of `live.ov` on the boot `boot`, read-only then
/// read-write, checks it reads as `view` each time, and checks what a
/// clean close wrote back.
fn check_live(m: &Manifest, boot: Option<[u8; 16]>, view: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = expand(m, dir.path(), "live.ov");
    let before = fs::read(&path).unwrap();
    let view = &m.views[view];
    match boot {
        Some(id) => live::tests::simulate_boot(id),
        None => live::tests::simulate_reboot(),
    }

    let ov = Overlay::open_read_only(&path, config(m, view)).unwrap();
    check_view(&ov, m, view, "live, read-only");
    drop(ov);
    assert!(fs::read(&path).unwrap() == before, "a read-only open wrote");
    let ov = Overlay::open(&path, config(m, view)).unwrap();
    check_view(&ov, m, view, "live, read-write");
    ov.close().unwrap();
    live::tests::real_boot();

    // Outside bytes 84..93 (the clean flag, the map checksum and the live
    // map flag) the header is as it was.
    let after = fs::read(&path).unwrap();
    assert!(before[..84] == after[..84], "header bytes 0..84");
    assert!(
        before[93..HEADER_SIZE] == after[93..HEADER_SIZE],
        "header bytes 93.."
    );
    let header = parse_header(&after).unwrap();
    assert!(header.clean && !header.live);
    let map = &after[header.map_offset as usize..][..header.map_len as usize];
    assert_eq!(header.map_crc, Some(crc32fast::hash(map)));
    let ov = Overlay::open_read_only(&path, config(m, view)).unwrap();
    check_view(&ov, m, view, "live, after a clean close");
}

#[test]
fn an_overlay_left_by_a_dead_server_on_6ed6fdc_reads_the_same() {
    let m = manifest();
    let dir = tempfile::tempdir().unwrap();
    let path = expand(&m, dir.path(), "live.ov");
    let header = check_header_round_trip(&path);
    assert!(!header.clean && header.live, "the live map flag is set");
    check_info(&m, &path, "live.ov");
    let bytes = fs::read(&path).unwrap();
    let at = header.live_offset() as usize;
    let live = format::parse_live_header(&bytes[at..]).unwrap();
    assert_eq!(live.boot_id, m.boot_id);
    assert_eq!(live.map_len, header.map_len);
    assert_eq!(live.encode(), bytes[at..at + LIVE_HEADER_USED]);

    // On the boot that wrote it, the live map holds every write; on
    // another, the map of the last flush counts.
    check_live(&m, Some(m.boot_id), "live-same-boot");
    check_live(&m, None, "live-other-boot");
}
