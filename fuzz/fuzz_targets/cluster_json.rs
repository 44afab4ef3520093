//! Arbitrary bytes as a snapshot's `cluster.json` (`snapshot::parse`, what
//! `ociblk launch --from` reads before it makes any file).
//!
//! What is accepted must be safe to make files from: every node name is a
//! plain file name, every layer path absolute without `..`, each node's own
//! layer in its directory of the snapshot, and the spec passes the check a
//! fork makes. A spec of the current format with digests is written back
//! and must read as the same spec.

#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use ociblk_launch::snapshot::{self, LAYER_FILE, SPEC_VERSION};

fuzz_target!(|data: &[u8]| {
    let dir = Path::new("/snapshots/snap");
    let Ok(spec) = snapshot::parse(data, dir) else {
        return;
    };
    assert!(!spec.nodes.is_empty());
    for node in &spec.nodes {
        let name = Path::new(&node.name);
        assert!(
            matches!(
                name.components().collect::<Vec<_>>()[..],
                [Component::Normal(_)]
            ) && node.name != "."
                && !node.name.contains('/'),
            "node name {:?}",
            node.name
        );
        assert_eq!(
            node.layers.last().map(|l| l.as_path()),
            Some(dir.join(&node.name).join(LAYER_FILE).as_path())
        );
        for layer in &node.layers {
            assert!(layer.is_absolute(), "{layer:?}");
            assert!(
                layer
                    .components()
                    .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
                "{layer:?}"
            );
        }
        if let Some(digests) = &node.digests {
            assert_eq!(digests.layers.len(), node.layers.len());
            for file in digests.tpm_state.keys() {
                assert!(
                    !file.contains('/') && file != "." && file != "..",
                    "{file:?}"
                );
            }
        }
    }
    spec.check().expect("a parsed spec passes the fork's check");
    if spec.version == SPEC_VERSION {
        let text = spec.to_json(dir).expect("a parsed spec can be written");
        let again = snapshot::parse(&text, dir).expect("a written spec reads back");
        assert_eq!(again, spec);
    }
});
