//! Where the harness finds things: the workspace root, the Envoy binary and the built filter.
//! `KEYGATE_ENVOY` and `KEYGATE_WASM` override the defaults (the Makefile sets both).

use std::path::PathBuf;

/// The repository root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or(manifest)
}

/// The Envoy binary: `$KEYGATE_ENVOY`, else `<workspace>/.venv/bin/envoy` (installed by
/// `make setup`). Panics with what to run if it is missing.
pub fn envoy_bin() -> PathBuf {
    let path = std::env::var_os("KEYGATE_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/envoy"));
    if !path.is_file() {
        panic!(
            "Envoy binary not found at {} (set KEYGATE_ENVOY, or run `make setup`)",
            path.display()
        );
    }
    path
}

/// The built filter: `$KEYGATE_WASM`, else
/// `<workspace>/target/wasm32-wasip1/release/keygate_filter.wasm`. Panics with what to run if it
/// is missing.
pub fn wasm_path() -> PathBuf {
    let path = std::env::var_os("KEYGATE_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root().join("target/wasm32-wasip1/release/keygate_filter.wasm")
        });
    if !path.is_file() {
        panic!(
            "filter not built: {} is missing (run `make build`, or set KEYGATE_WASM)",
            path.display()
        );
    }
    path
}

/// Files under `<workspace>/envoy/`.
pub fn envoy_dir() -> PathBuf {
    workspace_root().join("envoy")
}
