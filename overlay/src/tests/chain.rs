//! Frozen layers and chains: model-based tests of freeze, chains of 0..3
//! layers and forks, and every refusal.

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::super::layer::{self, Frozen};
use super::*;

/// Not a multiple of 4096: the last block is partial.
const SIZE: u64 = (1 << 20) + 3 * 512;

fn safe(n: u8) -> OverlayConfig {
    cfg(SIZE, n, FlushMode::Safe)
}

fn file_sha(path: &Path) -> [u8; 32] {
    Sha256::digest(fs::read(path).unwrap()).into()
}

/// Random writes, zeroes, discards, flushes and reopens of the overlay at
/// `path` (by its recorded chain, or by the same chain given again),
/// checked against `model` after each.
fn random_ops(
    mut ov: Overlay,
    path: &Path,
    chain: &[PathBuf],
    model: &mut [u8],
    rng: &mut Rng,
    steps: usize,
    what: &str,
) -> Overlay {
    let size = model.len() as u64;
    for step in 0..steps {
        let (off, len) = range(rng, size);
        let what = format!("{what} step {step}");
        ov = random_op(ov, model, off, len, rng, |how| match how {
            // The recorded chain: no --layer needed.
            Reopen::AfterClose => Overlay::open(path, safe(1)).unwrap(),
            // The same chain given again is accepted.
            Reopen::AfterDrop => Overlay::open_over(path, safe(1), Some(chain)).unwrap(),
        });
        check(&ov, model, off, len, rng, &what);
        let (off, len) = range(rng, size);
        check(&ov, model, off, len, rng, &what);
    }
    check(&ov, model, 0, size, rng, &format!("{what} end"));
    ov
}

/// Freezes the overlay at `path` (closing `ov` first) into `layer` and
/// reopens it; checks that the disk reads the same and the overlay is
/// empty over the longer chain.
fn freeze_and_reopen(
    ov: Overlay,
    path: &Path,
    layer_path: &Path,
    model: &[u8],
    rng: &mut Rng,
) -> (Overlay, Frozen) {
    ov.close().unwrap();
    let frozen = layer::freeze(path, layer_path).unwrap();
    let mode = fs::metadata(layer_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o400, "a layer is read-only on disk");
    let info = Overlay::info(path).unwrap();
    assert_eq!((info.written, info.zeroed, info.clean), (0, 0, true));
    assert_eq!(info.chain.len(), frozen.chain.len());
    assert_eq!(info.chain_problem, None);
    let ov = Overlay::open(path, safe(1)).unwrap();
    check(&ov, model, 0, SIZE, rng, "after freeze");
    (ov, frozen)
}

fn chain_model_run(seed: u64, depth: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.ov");
    let mut rng = rng(seed);
    let mut model: Vec<u8> = (0..SIZE).map(base_byte).collect();
    let mut ov = Overlay::open(&path, safe(1)).unwrap();
    let mut chain: Vec<PathBuf> = Vec::new();
    let mut parent = None;
    for level in 0..depth {
        let what = format!("seed {seed} depth {depth} level {level}");
        ov = random_ops(ov, &path, &chain, &mut model, &mut rng, 120, &what);
        let layer_path = dir.path().join(format!("layer{level}"));
        let frozen;
        (ov, frozen) = freeze_and_reopen(ov, &path, &layer_path, &model, &mut rng);
        assert_eq!(frozen.parent, parent, "{what}: parent digest");
        parent = Some(frozen.digest);
        chain.push(layer_path);
        assert_eq!(frozen.chain, chain);
    }
    let at_freeze = model.clone();
    let layer_shas: Vec<_> = chain.iter().map(|p| file_sha(p)).collect();

    // A fork of the chain reads as the frozen disk and diverges on its own.
    let fork_path = dir.path().join("fork.ov");
    let mut fork_model = at_freeze.clone();
    if !chain.is_empty() {
        layer::create_over(&fork_path, &chain).unwrap();
        let fork = Overlay::open(&fork_path, safe(1)).unwrap();
        check(&fork, &fork_model, 0, SIZE, &mut rng, "fork at start");
        let what = format!("seed {seed} depth {depth} fork");
        let fork = random_ops(
            fork,
            &fork_path,
            &chain,
            &mut fork_model,
            &mut rng,
            80,
            &what,
        );
        fork.close().unwrap();
    }

    let what = format!("seed {seed} depth {depth} top");
    let ov = random_ops(ov, &path, &chain, &mut model, &mut rng, 120, &what);
    ov.close().unwrap();

    // Both still read as their own models, read-only too.
    let ov = Overlay::open_read_only(&path, safe(1)).unwrap();
    check(&ov, &model, 0, SIZE, &mut rng, "top after the fork");
    drop(ov);
    if !chain.is_empty() {
        let fork = Overlay::open_read_only(&fork_path, safe(1)).unwrap();
        check(&fork, &fork_model, 0, SIZE, &mut rng, "fork after the top");
    }
    // Reset forgets the top only: the chain shows again.
    Overlay::reset(&path).unwrap();
    let ov = Overlay::open(&path, safe(1)).unwrap();
    assert_eq!(ov.chain().layers().len(), depth);
    check(&ov, &at_freeze, 0, SIZE, &mut rng, "after reset");
    drop(ov);
    let after: Vec<_> = chain.iter().map(|p| file_sha(p)).collect();
    assert_eq!(layer_shas, after, "layers are never written");
    for v in layer::verify(&path).unwrap() {
        assert!(chain.contains(&v.path));
    }
}

#[test]
fn chains_of_zero_to_three_layers_read_like_the_model() {
    for depth in 0..=3 {
        for seed in 0..2 {
            chain_model_run(100 + seed * 10 + depth as u64, depth);
        }
    }
}

#[test]
fn layer_blocks_fall_through_zero_and_read_modify_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ov");
    let mut rng = rng(5);
    let ov = Overlay::open(&path, safe(1)).unwrap();
    // Block 0 data, block 1 zero, block 2 untouched (base).
    write(&ov, 0, &[7u8; 4096], &mut rng).unwrap();
    ov.write_zeroes(4096, 4096, &base).unwrap();
    ov.close().unwrap();
    let l1 = dir.path().join("l1");
    layer::freeze(&path, &l1).unwrap();
    let ov = Overlay::open(&path, safe(1)).unwrap();
    let runs: Vec<_> = ov.runs(0, 3 * 4096).map(|r| r.state).collect();
    assert_eq!(
        runs,
        [BlockState::Data, BlockState::Zero, BlockState::Base],
        "a layer's Data and Zero blocks show through the empty top"
    );
    // A sector written over each: the rest of the block comes from the
    // layer's data, the layer's zeros and the base respectively.
    for b in 0..3u64 {
        write(&ov, b * 4096 + 512, &[9u8; 512], &mut rng).unwrap();
    }
    let got = read(&ov, 0, 3 * 4096, &mut rng);
    let mut want = vec![7u8; 4096];
    want.extend(vec![0u8; 4096]);
    let mut b2 = vec![0u8; 4096];
    base(2 * 4096, &mut b2).unwrap();
    want.extend(b2);
    for b in 0..3 {
        want[b * 4096 + 512..b * 4096 + 1024].fill(9);
    }
    assert_eq!(got, want);
    ov.close().unwrap();
    let info = Overlay::info(&path).unwrap();
    assert_eq!(info.written, 3);
    assert_eq!(info.chain.len(), 1);
}

#[test]
fn two_forks_of_one_layer_diverge_and_leave_it_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.ov");
    let mut rng = rng(9);
    let mut model: Vec<u8> = (0..SIZE).map(base_byte).collect();
    let ov = Overlay::open(&path, safe(1)).unwrap();
    let ov = random_ops(ov, &path, &[], &mut model, &mut rng, 100, "before");
    ov.close().unwrap();
    let l = dir.path().join("snap.layer");
    let frozen = layer::freeze(&path, &l).unwrap();
    let sha = file_sha(&l);
    let chain = vec![l.clone()];
    let mut forks = Vec::new();
    for name in ["a.ov", "b.ov"] {
        let p = dir.path().join(name);
        layer::create_over(&p, &chain).unwrap();
        forks.push((p, model.clone()));
    }
    for (i, (p, m)) in forks.iter_mut().enumerate() {
        let ov = Overlay::open(&*p, safe(1)).unwrap();
        let ov = random_ops(ov, p, &chain, m, &mut rng, 100, &format!("fork {i}"));
        ov.close().unwrap();
    }
    assert_ne!(forks[0].1, forks[1].1, "the forks diverged");
    for (p, m) in &forks {
        let ov = Overlay::open(p, safe(1)).unwrap();
        check(&ov, m, 0, SIZE, &mut rng, "each fork keeps its own writes");
    }
    assert_eq!(file_sha(&l), sha, "the layer is byte-identical");
    let v = layer::verify(&l).unwrap();
    assert_eq!(v[0].digest, frozen.digest);
}

#[test]
fn digests_name_content_not_file_layout() {
    // The same writes, once over the base and once as the top of a chain
    // that adds nothing, give layers of one digest when both sit on the
    // base... and different digests with different parents.
    let dir = tempfile::tempdir().unwrap();
    let mut digests = Vec::new();
    for name in ["x", "y"] {
        let p = dir.path().join(format!("{name}.ov"));
        let ov = Overlay::open(&p, safe(1)).unwrap();
        let mut rng = rng(3);
        write(&ov, 8192, &rng.bytes(10_000), &mut rng).unwrap();
        ov.write_zeroes(65536, 8192, &base).unwrap();
        ov.close().unwrap();
        digests.push(layer::freeze(&p, &dir.path().join(format!("{name}.layer"))).unwrap());
    }
    assert_eq!(digests[0].digest, digests[1].digest);
    assert_eq!(digests[0].data_blocks, 3);
    assert_eq!(digests[0].zero_blocks, 2);
    // Frozen again with nothing written: a child layer, its own digest.
    let p = dir.path().join("x.ov");
    let child = layer::freeze(&p, &dir.path().join("x2.layer")).unwrap();
    assert_eq!(child.parent, Some(digests[0].digest));
    assert_ne!(child.digest, digests[0].digest);
    // Info of a layer shows its digests.
    let info = Overlay::info(dir.path().join("x2.layer")).unwrap();
    let fields = info.layer.unwrap();
    assert_eq!(fields.digest, child.digest);
    assert_eq!(fields.parent, child.parent);
}

/// A frozen layer `l1` (fingerprint 1) under `node.ov`, and the paths.
fn one_layer(dir: &Path) -> (PathBuf, PathBuf) {
    let path = dir.join("node.ov");
    let ov = Overlay::open(&path, safe(1)).unwrap();
    write(&ov, 0, &[1u8; 8192], &mut rng(1)).unwrap();
    ov.close().unwrap();
    let l1 = dir.join("l1");
    layer::freeze(&path, &l1).unwrap();
    (path, l1)
}

/// [`one_layer`], frozen again into `l2` on top of `l1`.
fn two_layers(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (path, l1) = one_layer(dir);
    let l2 = dir.join("l2");
    layer::freeze(&path, &l2).unwrap();
    (path, l1, l2)
}

fn err_text(r: Result<impl std::fmt::Debug, OverlayError>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn layers_for_another_disk_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, l1) = one_layer(dir.path());
    let new = dir.path().join("new.ov");
    let msg = err_text(Overlay::open_over(
        &new,
        safe(2),
        Some(std::slice::from_ref(&l1)),
    ));
    assert!(
        msg.contains(&format!(
            "layer {} was made for a different disk",
            l1.display()
        )) && msg.contains("fingerprint"),
        "{msg}"
    );
    let msg = err_text(Overlay::open_over(
        &new,
        cfg(SIZE + 512, 1, FlushMode::Safe),
        Some(std::slice::from_ref(&l1)),
    ));
    assert!(msg.contains("size"), "{msg}");
    // Nothing was created for the refused chain.
    assert!(!new.exists());
}

#[test]
fn chains_whose_parents_do_not_match_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, l1, l2) = two_layers(dir.path());
    // Another layer on the base disk.
    let other = dir.path().join("other.ov");
    Overlay::open(&other, safe(1)).unwrap().close().unwrap();
    let o1 = dir.path().join("o1");
    layer::freeze(&other, &o1).unwrap();
    let new = dir.path().join("new.ov");
    for (chain, want) in [
        (
            vec![l2.clone()],
            format!(
                "layer {} does not fit the chain: it was frozen over layer sha256:",
                l2.display()
            ),
        ),
        (
            vec![l2.clone(), l1.clone()],
            format!("layer {} does not fit the chain", l2.display()),
        ),
        (
            vec![o1.clone(), l2.clone()],
            format!(
                "layer {} does not fit the chain: it was frozen over layer",
                l2.display()
            ),
        ),
        (
            vec![l1.clone(), o1.clone()],
            format!(
                "layer {} does not fit the chain: it sits on the base disk, but is given above layer {}",
                o1.display(),
                l1.display()
            ),
        ),
    ] {
        let msg = err_text(Overlay::open_over(&new, safe(1), Some(&chain)));
        assert!(msg.contains(&want), "{chain:?}: {msg}");
    }
    Overlay::open_over(&new, safe(1), Some(&[l1, l2])).unwrap();
}

#[test]
fn modified_layers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, l1) = one_layer(dir.path());
    let header = parse_header(&fs::read(&l1).unwrap()[..HEADER_SIZE]).unwrap();
    let poke = |at: u64, v: u8| {
        fs::set_permissions(&l1, fs::Permissions::from_mode(0o600)).unwrap();
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&l1)
            .unwrap();
        let mut old = [0u8];
        f.read_exact_at(&mut old, at).unwrap();
        f.write_all_at(&[v], at).unwrap();
        old[0]
    };
    // A map byte: caught at every open by the metadata digest.
    let old = poke(header.map_offset + 5, BlockState::Zero as u8);
    let msg = err_text(Overlay::open(&path, safe(1)));
    assert!(
        msg.contains(&format!("layer {} was modified", l1.display()))
            && msg.contains("do not match their digest"),
        "{msg}"
    );
    let info = Overlay::info(&path).unwrap();
    assert!(info.chain_problem.unwrap().contains("was modified"));
    poke(header.map_offset + 5, old);
    Overlay::open(&path, safe(1)).unwrap().close().unwrap();
    // A data byte: not read at open; `verify` reads it all and says so.
    let old = poke(header.data_offset + 100, 0x55);
    Overlay::open(&path, safe(1)).unwrap().close().unwrap();
    for target in [&path, &l1] {
        let msg = err_text(layer::verify(target));
        assert!(
            msg.contains(&format!(
                "layer {} was modified: its data does not match its digest",
                l1.display()
            )),
            "{msg}"
        );
    }
    poke(header.data_offset + 100, old);
    assert_eq!(layer::verify(&path).unwrap().len(), 1);
    // A truncated layer.
    fs::set_permissions(&l1, fs::Permissions::from_mode(0o600)).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&l1).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 4096).unwrap();
    let msg = err_text(Overlay::open(&path, safe(1)));
    assert!(
        msg.contains(&format!("layer {} was modified", l1.display())),
        "{msg}"
    );
    f.set_len(len).unwrap();
    // A layer replaced by another valid layer at the recorded path.
    let other = dir.path().join("other.ov");
    Overlay::open(&other, safe(1)).unwrap().close().unwrap();
    fs::remove_file(&l1).unwrap();
    layer::freeze(&other, &l1).unwrap();
    let msg = err_text(Overlay::open(&path, safe(1)));
    assert!(
        msg.contains(&format!(
            "layer {} was modified: its digest is",
            l1.display()
        )) && msg.contains(&format!("overlay {} records", path.display())),
        "{msg}"
    );
}

#[test]
fn missing_layers_are_refused_naming_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let (path, l1) = one_layer(dir.path());
    let moved = dir.path().join("moved");
    fs::rename(&l1, &moved).unwrap();
    let msg = err_text(Overlay::open(&path, safe(1)));
    assert_eq!(
        msg,
        format!(
            "layer {} is missing (recorded in overlay {})",
            l1.display(),
            path.display()
        )
    );
    let msg = err_text(Overlay::open_read_only(&path, safe(1)));
    assert!(msg.contains("is missing"), "{msg}");
    // The moved layer, named where it is now, has the recorded digest.
    let ov = Overlay::open_over(&path, safe(1), Some(std::slice::from_ref(&moved))).unwrap();
    drop(ov);
    let msg = err_text(layer::create_over(
        &dir.path().join("f.ov"),
        std::slice::from_ref(&l1),
    ));
    assert!(
        msg.contains(&format!("layer {} is missing", l1.display())),
        "{msg}"
    );
    // A directory where a layer should be.
    let msg = err_text(Overlay::open_over(
        dir.path().join("g.ov"),
        safe(1),
        Some(&[dir.path().to_path_buf()]),
    ));
    assert_eq!(
        msg,
        format!(
            "layer {} is not a regular file (it is a directory)",
            dir.path().display()
        )
    );
}

#[test]
fn a_layer_list_that_disagrees_with_the_recorded_chain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, l1, l2) = two_layers(dir.path());
    let plain = dir.path().join("plain.ov");
    Overlay::open(&plain, safe(1)).unwrap().close().unwrap();
    let msg = err_text(Overlay::open_over(
        &path,
        safe(1),
        Some(std::slice::from_ref(&l1)),
    ));
    assert!(
        msg.contains(&format!("overlay {} was made over another chain of layers: it records 2 layers, --layer gives 1 layer", path.display())),
        "{msg}"
    );
    let msg = err_text(Overlay::open_over(
        &plain,
        safe(1),
        Some(std::slice::from_ref(&l1)),
    ));
    assert!(
        msg.contains("it records no layers, --layer gives 1 layer"),
        "{msg}"
    );
    // Same count, another layer at a position.
    let other = dir.path().join("other.ov");
    Overlay::open(&other, safe(1)).unwrap().close().unwrap();
    let o1 = dir.path().join("o1");
    layer::freeze(&other, &o1).unwrap();
    let o2 = dir.path().join("o2");
    layer::freeze(&other, &o2).unwrap();
    let msg = err_text(Overlay::open_over(
        &path,
        safe(1),
        Some(&[o1.clone(), o2.clone()]),
    ));
    assert!(
        msg.contains(&format!("layer {} is sha256:", o1.display())) && msg.contains("as layer 1"),
        "{msg}"
    );
    let msg = err_text(Overlay::open_read_only_over(
        &path,
        safe(1),
        Some(&[o1, o2]),
    ));
    assert!(msg.contains("another chain of layers"), "{msg}");
    // The recorded chain given again, and relative paths made absolute.
    let ov = Overlay::open_over(&path, safe(1), Some(&[l1.clone(), l2.clone()])).unwrap();
    drop(ov);
}

#[test]
fn the_recorded_chain_is_read_from_the_header_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (path, l1, l2) = two_layers(dir.path());
    let chain = Overlay::recorded_chain(&path).unwrap();
    let paths: Vec<&[u8]> = chain.iter().map(|e| e.path.as_slice()).collect();
    assert_eq!(paths, [&l1, &l2].map(|l| l.as_os_str().as_encoded_bytes()));
    assert_eq!(chain, Overlay::info(&path).unwrap().chain);
    // Read while a server holds the overlay, and with a layer gone.
    let ov = Overlay::open(&path, safe(1)).unwrap();
    fs::rename(&l2, dir.path().join("moved")).unwrap();
    assert_eq!(Overlay::recorded_chain(&path).unwrap(), chain);
    drop(ov);
    let fresh = dir.path().join("fresh.ov");
    Overlay::open(&fresh, safe(1)).unwrap().close().unwrap();
    assert_eq!(Overlay::recorded_chain(&fresh).unwrap(), []);
    let msg = err_text(Overlay::recorded_chain(&l1));
    assert!(msg.contains("is a frozen layer, not an overlay"), "{msg}");
}

#[test]
fn layers_are_not_overlays_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (path, l1) = one_layer(dir.path());
    for msg in [
        err_text(Overlay::open(&l1, safe(1))),
        err_text(Overlay::open_read_only(&l1, safe(1))),
        err_text(Overlay::reset(&l1)),
        err_text(layer::freeze(&l1, &dir.path().join("l9"))),
    ] {
        assert!(
            msg.contains(&format!(
                "{} is a frozen layer, not an overlay",
                l1.display()
            )),
            "{msg}"
        );
    }
    let sha = file_sha(&l1);
    let msg = err_text(layer::freeze(&path, &l1));
    assert_eq!(
        msg,
        format!(
            "layer {} already exists: a layer is never overwritten",
            l1.display()
        )
    );
    assert_eq!(file_sha(&l1), sha);
    let msg = err_text(layer::create_over(
        &dir.path().join("f.ov"),
        std::slice::from_ref(&path),
    ));
    assert!(msg.contains("is an overlay, not a frozen layer"), "{msg}");
    // Nothing temporary is left behind.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn freeze_refuses_an_overlay_in_use_and_recovers_an_unclean_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.ov");
    let mut rng = rng(4);
    let ov = Overlay::open(&path, safe(1)).unwrap();
    write(&ov, 4096, &[3u8; 4096], &mut rng).unwrap();
    ov.flush().unwrap();
    let l = dir.path().join("l");
    let msg = err_text(layer::freeze(&path, &l));
    assert_eq!(
        msg,
        format!("overlay {} is in use by another process", path.display())
    );
    assert!(!l.exists());
    // Killed after a flush: the layer holds what a restarted server serves.
    crash(ov);
    assert!(!Overlay::info(&path).unwrap().clean);
    let frozen = layer::freeze(&path, &l).unwrap();
    assert_eq!(frozen.data_blocks, 1);
    let ov = Overlay::open(&path, safe(1)).unwrap();
    assert_eq!(read(&ov, 4096, 4096, &mut rng), vec![3u8; 4096]);
}

#[test]
fn new_overlays_over_layers_keep_their_chain_and_read_only_serves_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_, l1) = one_layer(dir.path());
    let mut rng = rng(2);
    // An empty file given layers read-only reads as the chain.
    let empty = dir.path().join("empty.ov");
    fs::write(&empty, b"").unwrap();
    let ov =
        Overlay::open_read_only_over(&empty, safe(1), Some(std::slice::from_ref(&l1))).unwrap();
    assert_eq!(read(&ov, 0, 8192, &mut rng), vec![1u8; 8192]);
    drop(ov);
    let new = dir.path().join("new.ov");
    let ov = Overlay::open_over(&new, safe(1), Some(std::slice::from_ref(&l1))).unwrap();
    drop(ov);
    let info = Overlay::info(&new).unwrap();
    assert_eq!(info.chain.len(), 1);
    assert!(info.chain[0].path.starts_with(b"/"));
    assert_eq!(info.chain[0].path, l1.as_os_str().as_encoded_bytes());
    // Version 2 on disk; an overlay without layers stays version 1.
    let v = |p: &Path| u32::from_le_bytes(fs::read(p).unwrap()[8..12].try_into().unwrap());
    assert_eq!(v(&new), 2);
    assert_eq!(v(&l1), 2);
    let plain = dir.path().join("plain.ov");
    Overlay::open(&plain, safe(1)).unwrap().close().unwrap();
    assert_eq!(v(&plain), 1);
}

#[test]
fn v2_headers_round_trip_and_reject_bad_fields() {
    let layer = Header::with_kind(
        1 << 30,
        fp(3),
        format::Kind::Layer(LayerFields {
            digest: [1; 32],
            parent: Some([2; 32]),
            meta_digest: [3; 32],
        }),
    );
    assert_eq!(parse_header(&layer.encode()), Ok(layer.clone()));
    let chain = vec![ChainEntry {
        digest: [4; 32],
        path: b"/a/b".to_vec(),
    }];
    let section = format::encode_chain(&chain);
    let top = Header::with_kind(
        1 << 30,
        fp(3),
        format::Kind::Overlay {
            chain_len: 1,
            chain_bytes: section.len() as u64,
            chain_crc: crc32fast::hash(&section),
        },
    );
    assert_eq!(top.map_offset, 8192);
    assert_eq!(parse_header(&top.encode()), Ok(top.clone()));
    assert_eq!(
        format::parse_chain(&section, 1, crc32fast::hash(&section)),
        Ok(chain)
    );
    assert!(matches!(
        format::parse_chain(&section, 1, 0),
        Err(FormatError::ChainCrc { .. })
    ));
    format::parse_chain(&section[..10], 1, crc32fast::hash(&section[..10])).unwrap_err();
    // Every bit flip of a v2 header is caught, except the clean flag's
    // and the map checksum's recorded bit, as in version 1.
    for h in [&layer, &top] {
        let bytes = h.encode();
        assert_header_bit_flips_caught(&bytes);
    }
}

#[test]
fn freeze_copies_only_data_blocks_and_falls_back_from_cloning() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.ov");
    let mut rng = rng(6);
    let ov = Overlay::open(&path, safe(1)).unwrap();
    write(&ov, 0, &rng.bytes(3 * 4096), &mut rng).unwrap();
    write(&ov, 40 * 4096, &[0u8; 4096], &mut rng).unwrap();
    ov.write_zeroes(50 * 4096, 4096, &base).unwrap();
    ov.close().unwrap();
    let l = dir.path().join("l");
    let frozen = layer::freeze(&path, &l).unwrap();
    let c = frozen.copy;
    // Which method the file system allowed (run with TMPDIR on XFS or Btrfs
    // to see `cloned`).
    eprintln!("freeze placed the data blocks: {c:?}");
    assert_eq!(frozen.data_blocks, 4);
    assert_eq!(c.cloned + c.copied + c.written, 4 * 4096, "{c:?}");
    // The layer's data area holds the data blocks and holes elsewhere.
    let header = parse_header(&fs::read(&l).unwrap()[..HEADER_SIZE]).unwrap();
    assert!(allocated(&l) <= header.map_offset + (1 << 20) + 8 * 4096);
    let ov = Overlay::open(&path, safe(1)).unwrap();
    assert_eq!(read(&ov, 40 * 4096, 4096, &mut rng), vec![0u8; 4096]);
    drop(ov);
    // Each fallback on its own: data identical, holes kept.
    for method in [Method::CopyRange, Method::Plain] {
        let src = fs::File::open(&path).unwrap();
        let dst_path = dir.path().join(format!("copy-{method:?}"));
        let dst = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&dst_path)
            .unwrap();
        let data = rng.bytes(8192);
        let src_w = fs::OpenOptions::new().write(true).open(&path).unwrap();
        src_w.write_all_at(&data, 1 << 24).unwrap();
        dst.set_len(1 << 25).unwrap();
        FileCopier::new(&src, &dst, method, 4096)
            .copy_allocated((1 << 24) - 8192, 1 << 24, 3 * 8192)
            .unwrap();
        let mut got = vec![0u8; 8192];
        dst.read_exact_at(&mut got, (1 << 24) + 8192).unwrap();
        assert_eq!(got, data, "{method:?}");
        assert!(
            allocated(&dst_path) <= 2 * 8192 + 4096,
            "{method:?}: holes stay holes"
        );
        drop(src_w);
    }
}

use ociblk_io::copy::{FileCopier, Method};

/// Names in `dir` starting with a dot: temporary files left behind.
fn hidden_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// Writes `v` at `at` in the read-only layer `l`; returns the old byte.
fn poke_layer(l: &Path, at: u64, v: u8) -> u8 {
    fs::set_permissions(l, fs::Permissions::from_mode(0o600)).unwrap();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(l)
        .unwrap();
    let mut old = [0u8];
    f.read_exact_at(&mut old, at).unwrap();
    f.write_all_at(&[v], at).unwrap();
    fs::set_permissions(l, fs::Permissions::from_mode(layer::LAYER_MODE)).unwrap();
    old[0]
}

#[test]
fn create_over_checks_the_chain_and_writes_a_cleanly_closed_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let (_, l1, l2) = two_layers(dir.path());
    let new = dir.path().join("new.ov");
    let refused = |chain: &[PathBuf], want: &str| {
        let msg = err_text(layer::create_over(&new, chain));
        assert!(msg.contains(want), "{chain:?}: {msg}");
        assert!(!new.exists(), "{chain:?}: nothing is created");
        assert_eq!(hidden_files(dir.path()), Vec::<String>::new());
    };
    // A broken parent link.
    refused(
        std::slice::from_ref(&l2),
        &format!("layer {} does not fit the chain", l2.display()),
    );
    refused(
        &[l2.clone(), l1.clone()],
        &format!("layer {} does not fit the chain", l2.display()),
    );
    // A layer below the top one made for another disk.
    let other = dir.path().join("other.ov");
    Overlay::open(&other, safe(2)).unwrap().close().unwrap();
    let o1 = dir.path().join("o1");
    layer::freeze(&other, &o1).unwrap();
    refused(
        &[o1.clone(), l2.clone()],
        &format!(
            "layer {} was made for a different disk (fingerprint",
            o1.display()
        ),
    );
    // A missing layer below the top one.
    refused(
        &[dir.path().join("gone"), l2.clone()],
        &format!("layer {} is missing", dir.path().join("gone").display()),
    );
    // A modified map, in the lower and in the top layer; an invalid state.
    let header = parse_header(&fs::read(&l1).unwrap()[..HEADER_SIZE]).unwrap();
    for l in [&l1, &l2] {
        let old = poke_layer(l, header.map_offset + 5, BlockState::Zero as u8);
        refused(
            &[l1.clone(), l2.clone()],
            &format!(
                "layer {} was modified: its header and map do not match their digest",
                l.display()
            ),
        );
        poke_layer(l, header.map_offset + 5, 7);
        refused(
            &[l1.clone(), l2.clone()],
            "unknown state byte 7 for block 5",
        );
        poke_layer(l, header.map_offset + 5, old);
    }

    layer::create_over(&new, &[l1.clone(), l2.clone()]).unwrap();
    assert_eq!(hidden_files(dir.path()), Vec::<String>::new());
    let meta = fs::metadata(&new).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    // Written as a clean close leaves it: clean, map checksum recorded
    // and matching, the chain recorded with its digests.
    let info = Overlay::info(&new).unwrap();
    assert!(info.clean);
    assert_eq!(info.map_check, MapCheck::Verified);
    assert_eq!((info.written, info.zeroed), (0, 0));
    assert_eq!(info.chain_problem, None);
    let digests: Vec<_> = [&l1, &l2]
        .iter()
        .map(|l| Overlay::info(l).unwrap().layer.unwrap().digest)
        .collect();
    let recorded: Vec<_> = info.chain.iter().map(|e| e.digest).collect();
    assert_eq!(recorded, digests);
    let paths: Vec<_> = info
        .chain
        .iter()
        .map(|e| PathBuf::from(String::from_utf8(e.path.clone()).unwrap()))
        .collect();
    assert_eq!(paths, vec![l1.clone(), l2.clone()]);
    // An existing file is never replaced.
    let sha = file_sha(&new);
    match layer::create_over(&new, &[l1.clone(), l2.clone()]) {
        Err(OverlayError::Io { path, op, source }) => {
            assert_eq!((path, op), (new.clone(), "create"));
            assert_eq!(source.kind(), io::ErrorKind::AlreadyExists);
        }
        r => panic!("expected AlreadyExists, got {r:?}"),
    }
    assert_eq!(file_sha(&new), sha);
    // It opens over its recorded chain and reads as the top layer does.
    let ov = Overlay::open(&new, safe(1)).unwrap();
    assert_eq!(read(&ov, 0, 8192, &mut rng(3)), vec![1u8; 8192]);
}
