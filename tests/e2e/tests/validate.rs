//! Every Envoy bootstrap in `envoy/` passes `envoy --mode validate`, which loads the filter and
//! runs its configuration step, so a broken config or filter fails here.
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keygate_e2e::paths;

const WASM_IN_BOOTSTRAPS: &str = "target/wasm32-wasip1/release/keygate_filter.wasm";

/// The CA the control-plane bootstrap's TLS cluster trusts; `make run` makes it
/// (`keygate-control tls-init --dir .run/tls`). Here a CA made by the test stands in for it.
const CA_IN_BOOTSTRAPS: &str = ".run/tls/ca.pem";

/// A CA certificate (PEM) made with rcgen in `dir`.
fn test_ca(dir: &Path) -> PathBuf {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keygate validate CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let path = dir.join("ca.pem");
    std::fs::write(&path, params.self_signed(&key).unwrap().pem()).unwrap();
    path
}

/// The top-level `envoy/*.yaml` files (subdirectories hold non-Envoy manifests, e.g. Istio).
fn bootstraps() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(paths::envoy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no bootstraps in envoy/");
    files
}

/// `envoy --mode validate -c <file>`, run from the workspace root so that the bootstraps'
/// relative wasm path resolves, exactly as `make run` starts them.
fn validate_file(file: &Path) -> Output {
    Command::new(paths::envoy_bin())
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "warning",
            "-c",
        ])
        .arg(file)
        .current_dir(paths::workspace_root())
        .output()
        .unwrap()
}

fn validate_text(text: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bootstrap.yaml");
    std::fs::write(&path, text).unwrap();
    validate_file(&path)
}

/// The bootstrap text with its filter path pointing at the module under test (`KEYGATE_WASM`,
/// absolute), so edited copies validate the same filter wherever they are written.
fn with_built_filter(text: &str) -> String {
    text.replace(WASM_IN_BOOTSTRAPS, paths::wasm_path().to_str().unwrap())
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn every_envoy_bootstrap_validates_with_the_filter_loaded() {
    for file in bootstraps() {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.contains(WASM_IN_BOOTSTRAPS),
            "{} must load the filter from {WASM_IN_BOOTSTRAPS}",
            file.display()
        );
        // The file itself when the module under test is the default build, else a copy
        // pointing at KEYGATE_WASM.
        let default = paths::workspace_root()
            .join(WASM_IN_BOOTSTRAPS)
            .canonicalize()
            .ok();
        // A bootstrap that trusts `make run`'s CA validates with one the test makes.
        let out = if text.contains(CA_IN_BOOTSTRAPS) {
            let dir = tempfile::tempdir().unwrap();
            let ca = test_ca(dir.path());
            validate_text(&with_built_filter(&text).replace(CA_IN_BOOTSTRAPS, ca.to_str().unwrap()))
        } else if default == paths::wasm_path().canonicalize().ok() {
            validate_file(&file)
        } else {
            validate_text(&with_built_filter(&text))
        };
        assert!(
            out.status.success(),
            "{} does not validate: {}",
            file.display(),
            describe(&out)
        );
    }
}

#[test]
fn validation_fails_when_the_filter_module_is_missing() {
    let text = std::fs::read_to_string(paths::envoy_dir().join("envoy.yaml")).unwrap();
    let out = validate_text(&text.replace(WASM_IN_BOOTSTRAPS, "target/does-not-exist.wasm"));
    assert!(
        !out.status.success(),
        "validated without a filter: {}",
        describe(&out)
    );
}

#[test]
fn validation_runs_the_filter_config_step_and_fails_on_a_bad_plugin_config() {
    let text = std::fs::read_to_string(paths::envoy_dir().join("envoy.yaml")).unwrap();
    let broken = text.replace(
        "\"schema\": \"keygate.config/v1\",",
        "\"schema\": \"keygate.config/v0-not-a-schema\",",
    );
    assert_ne!(
        broken, text,
        "envoy.yaml no longer has the schema line this test edits"
    );
    let out = validate_text(&with_built_filter(&broken));
    assert!(
        !out.status.success(),
        "validated a bad plugin config: {}",
        describe(&out)
    );
    assert!(
        describe(&out).contains("Unable to create Wasm"),
        "{}",
        describe(&out)
    );
}

/// The control-plane bootstrap reaches the control plane over TLS: Envoy loads the CA its
/// `keygate_control` cluster trusts, so the bootstrap does not validate without a CA there.
#[test]
fn the_control_plane_bootstrap_loads_the_ca_its_tls_cluster_trusts() {
    let text =
        std::fs::read_to_string(paths::envoy_dir().join("envoy-control-plane.yaml")).unwrap();
    assert!(
        text.contains(CA_IN_BOOTSTRAPS),
        "envoy-control-plane.yaml no longer trusts {CA_IN_BOOTSTRAPS}"
    );
    let text = with_built_filter(&text);
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("missing.pem");
    let out = validate_text(&text.replace(CA_IN_BOOTSTRAPS, missing.to_str().unwrap()));
    assert!(
        !out.status.success(),
        "validated without its CA: {}",
        describe(&out)
    );
    assert!(
        describe(&out).contains(&format!("Invalid path: {}", missing.display())),
        "{}",
        describe(&out)
    );

    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let out = validate_text(&text.replace(CA_IN_BOOTSTRAPS, junk.to_str().unwrap()));
    assert!(
        !out.status.success(),
        "validated with a CA file that is no certificate: {}",
        describe(&out)
    );
}
