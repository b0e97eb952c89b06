//! Replays every fuzz corpus input and every recorded crasher (`fuzz/corpus/<target>/`,
//! `fuzz/artifacts/<target>/`) through the same property checks the fuzz targets run, so a
//! finding stays fixed. Native only: the wasm test runner has no file system.

#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use keygate_core::props;

#[test]
fn every_corpus_input_and_crasher_still_satisfies_its_property() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut replayed = std::collections::BTreeMap::new();
    for dir in ["corpus", "artifacts"] {
        for target in props::TARGETS {
            let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                if path.is_file()
                    && path
                        .file_name()
                        .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
                {
                    let data = std::fs::read(&path).unwrap();
                    let result = std::panic::catch_unwind(|| props::run(target, &data));
                    assert!(
                        matches!(result, Ok(true)),
                        "{} fails its property",
                        path.display()
                    );
                    *replayed.entry(target).or_insert(0) += 1;
                }
            }
        }
    }
    for target in props::TARGETS {
        assert!(
            replayed.get(target).copied().unwrap_or(0) > 0,
            "no corpus for fuzz target {target}: {replayed:?}"
        );
    }
    eprintln!("replayed: {replayed:?}");
}
