//! Fuzz target `control_auth`: the property is `keygate_control::props::control_auth` (the
//! control plane's request authentication decides as keygate-core's decision does over the same
//! accounts and keys). The fixture (a SQLite database of accounts and keys of every kind) is
//! built once per process.
#![no_main]

use std::sync::OnceLock;

use keygate_control::props::{control_auth, Fixture};

struct Shared(Fixture);
// The fuzzer calls the target from one thread; the fixture's connection is never used from two.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

static FIXTURE: OnceLock<Shared> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let fixture = FIXTURE.get_or_init(|| Shared(Fixture::new()));
    control_auth(&fixture.0, data);
});
