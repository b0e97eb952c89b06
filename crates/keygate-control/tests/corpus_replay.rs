//! Replays every input of the `control_auth` fuzz target's corpus and every recorded crasher
//! (`fuzz/corpus/control_auth/`, `fuzz/artifacts/control_auth/`) through the property the
//! target checks ([`keygate_control::props::control_auth`]), so a finding stays fixed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use keygate_control::props::{control_auth, Fixture};

#[test]
fn every_control_auth_corpus_input_and_crasher_still_satisfies_its_property() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let fixture = Fixture::new();
    let mut replayed = 0;
    for dir in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join("control_auth")) else {
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
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    control_auth(&fixture, &data)
                }));
                assert!(result.is_ok(), "{} fails its property", path.display());
                replayed += 1;
            }
        }
    }
    assert!(replayed > 0, "no corpus for fuzz target control_auth");
    eprintln!("replayed {replayed} control_auth inputs");
}
