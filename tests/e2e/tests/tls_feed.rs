//! The edge feed over TLS: a real control plane serving HTTPS (`--tls-cert`/`--tls-key`) with a
//! certificate from a CA this test makes, and real Envoys whose `keygate_control` cluster has a
//! TLS transport socket (SNI `keygate-control`, the CA in `validation_context.trusted_ca`, the
//! name required among the certificate's SANs), as in `envoy/envoy-control-plane.yaml`.
//!
//! An edge that trusts the CA gets the feed: a key created at the control plane (over HTTPS) is
//! admitted, and a deleted one refused. An edge that trusts another CA, or asks for a name the
//! certificate does not carry, never gets a config: 503 `no_config`, and fetch errors count up.

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use keygate_e2e::control::ControlTls;
use keygate_e2e::{wait, ControlPlane, Echo, Envoy, EnvoyBuilder, Req};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;

/// The name the control plane's certificate is for, the edges' SNI and required SAN.
const SERVER_NAME: &str = "keygate-control";

/// A new CA (`ca.pem`) in `dir` and, signed by it, a certificate for `names` (`server.pem`,
/// `server.key`).
fn make_pki(dir: &Path, label: &str, names: &[&str]) -> ControlTls {
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, format!("keygate e2e CA ({label})"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().unwrap();
    let mut server =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, names[0].to_string());
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = server.signed_by(&key, &issuer).unwrap();

    let files = ControlTls {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        ca: dir.join("ca.pem"),
        server_name: SERVER_NAME.to_string(),
    };
    std::fs::write(&files.ca, ca_cert.pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

/// An Envoy whose `keygate_control` cluster reaches `cp` over TLS, trusting the CA in `ca` and
/// asking for `sni`.
fn edge(cp: &ControlPlane, echo: &Echo, ca: &Path, sni: &str) -> Envoy {
    EnvoyBuilder::new()
        .plugin_config_json(&cp.plugin_config(json!({})))
        .tls_cluster("keygate_control", cp.port(), ca, sni)
        .upstream_port(echo.port())
        .start()
}

/// Polls `f` every 50 ms until it holds or `limit` passes.
fn within(limit: Duration, f: impl FnMut() -> bool) -> bool {
    wait::within(limit, f).is_some()
}

fn fetch_errors(envoy: &Envoy) -> u64 {
    envoy
        .custom_metric("keygate.config.fetch_errors")
        .unwrap_or(0)
}

fn counter(envoy: &Envoy, name: &str) -> u64 {
    envoy.counter(name).unwrap_or(0)
}

fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    (dir, path)
}

#[test]
fn a_key_created_at_the_control_plane_is_admitted_at_the_edge_over_the_tls_feed() {
    let (_keep, dir) = tempdir();
    let pki = make_pki(&dir, "trusted", &[SERVER_NAME]);
    let cp = ControlPlane::start_tls(pki.clone());
    let echo = Echo::start();
    let envoy = edge(&cp, &echo, &pki.ca, SERVER_NAME);

    // The control plane speaks TLS only: a plain HTTP request gets no HTTP answer.
    assert!(
        Req::get("/v1/edge/config").try_send(cp.port()).is_err(),
        "the control plane answered plain HTTP"
    );

    let (sid, secret) = cp.create_key_v1(json!({"role": "main", "friendly_name": "tls"}));
    let req = Req::get(cp.calls_path()).basic(&sid, &secret);
    assert!(
        within(Duration::from_secs(15), || req.send(envoy.port()).status
            == 200),
        "the key was not admitted over the TLS feed; Envoy log:\n{}",
        envoy.logs()
    );
    let seen = echo.captured();
    assert_eq!(
        seen.last().and_then(|r| r.header_str("x-keygate-key-sid")),
        Some(sid.as_str())
    );
    assert!(counter(&envoy, "cluster.keygate_control.ssl.handshake") >= 1);
    assert_eq!(
        counter(&envoy, "cluster.keygate_control.ssl.fail_verify_error"),
        0
    );
    assert_eq!(fetch_errors(&envoy), 0, "{}", envoy.logs());

    // The feed keeps flowing over TLS: a deletion reaches the edge too.
    cp.delete_key(&sid);
    assert!(
        within(Duration::from_secs(15), || req.send(envoy.port()).status
            == 401),
        "the deleted key is still admitted"
    );
}

#[test]
fn an_edge_that_does_not_trust_the_ca_or_asks_another_name_never_gets_a_config() {
    let (_keep, dir) = tempdir();
    let pki = make_pki(&dir.join("trusted"), "trusted", &[SERVER_NAME]);
    let other = make_pki(&dir.join("other"), "other", &[SERVER_NAME]);
    let cp = ControlPlane::start_tls(pki.clone());
    let echo = Echo::start();
    let (sid, secret) = cp.create_key_v1(json!({"role": "main", "friendly_name": "tls"}));
    let untrusting = edge(&cp, &echo, &other.ca, SERVER_NAME);
    let wrong_name = edge(&cp, &echo, &pki.ca, "control.example");

    for (label, envoy) in [("untrusting", &untrusting), ("wrong name", &wrong_name)] {
        assert!(
            within(Duration::from_secs(15), || fetch_errors(envoy) >= 3),
            "{label}: fewer than 3 fetch errors; Envoy log:\n{}",
            envoy.logs()
        );
        // Meanwhile the feed is served over TLS to a client that trusts the CA.
        assert!(cp.feed_version() >= 1);
        for _ in 0..4 {
            let r = Req::get(cp.calls_path())
                .basic(&sid, &secret)
                .send(envoy.port());
            assert_eq!(r.status, 503, "{label}: {r:?}");
            assert_eq!(r.body_json()["error"]["code"], "no_config", "{label}");
        }
        assert_eq!(
            counter(envoy, "cluster.keygate_control.ssl.handshake"),
            0,
            "{label}"
        );
    }
    assert!(counter(&untrusting, "cluster.keygate_control.ssl.fail_verify_error") >= 1);
    assert!(counter(&wrong_name, "cluster.keygate_control.ssl.fail_verify_san") >= 1);
    assert!(
        echo.captured().is_empty(),
        "a request got past an edge without a config"
    );
    assert!(
        cp.logs().contains("TLS handshake failed"),
        "the control plane did not log the refused handshakes:\n{}",
        cp.logs()
    );
}
