//! Smoke test of the harness with the real filter: Echo + Envoy with the demo config.
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use keygate_e2e::demo::CALLS;
use keygate_e2e::{demo, Echo, EnvoyBuilder, Req};

#[test]
fn demo_config_denies_anonymous_and_admits_the_main_key_without_forwarding_its_credential() {
    let echo = Echo::start();
    let envoy = EnvoyBuilder::new().upstream_port(echo.port()).start();

    let anonymous = Req::get(CALLS).send(envoy.port());
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    assert!(
        echo.captured().is_empty(),
        "upstream saw {:?}",
        echo.captured()
    );

    // What `curl -u SKdemomain01:sk_live_demoMain0001` sends.
    let main = Req::get(CALLS)
        .basic(demo::MAIN.sid, demo::MAIN.secret)
        .send(envoy.port());
    assert_eq!(main.status, 200, "{main:?}");
    assert_eq!(main.body_json()["path"], CALLS);
    let seen = echo.captured();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path, CALLS);
    assert!(!seen[0].has_header("authorization"), "{:?}", seen[0]);

    let lines = envoy.wait_access_log(2, Duration::from_secs(10));
    assert!(lines[0].contains(" 401 "), "{lines:?}");
    assert!(lines[1].contains(" 200 "), "{lines:?}");
    assert!(
        lines[1].contains("identity=ACdemo0001 SKdemomain01 key=SKdemomain01"),
        "{lines:?}"
    );
    assert_eq!(envoy.counter("http.keygate.downstream_rq_4xx"), Some(1));
    assert_eq!(envoy.counter("http.keygate.downstream_rq_2xx"), Some(1));
    assert_eq!(envoy.counter("http.keygate.no-such-counter"), None);
}

#[test]
fn envoy_refuses_to_start_with_an_unparsable_plugin_config() {
    let log = EnvoyBuilder::new()
        .plugin_config("this is not a keygate config")
        .start_expect_failure();
    assert!(
        log.contains("Unable to create Wasm"),
        "expected Envoy to refuse the plugin; log:\n{log}"
    );
}
