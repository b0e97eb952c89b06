//! Fleet limits per request with Envoy's own filter: keygate first, then
//! `envoy.filters.http.ratelimit` (domain `keygate`, `failure_mode_deny: true`, 503 on error)
//! whose route `rate_limits` build keygate-core's descriptors from keygate's identity headers,
//! calling a real keygate-ratelimit over a real Redis, whose limits are a real control plane's
//! export. The filter chain, the route's actions and the ratelimit filter's settings are those of
//! `envoy/envoy-ratelimit.yaml` (checked below), so the demo bootstrap is what is tested.
//!
//! An account limited to 60 a minute fleet-wide: of 100 requests exactly 60 reach the upstream
//! and 40 get Envoy's 429. With keygate-ratelimit stopped, every request keygate admits gets 503
//! and none reaches the upstream; started again, the account is still over its limit (the count
//! is in Redis).

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use keygate_e2e::{paths, wait, ControlPlane, Echo, Envoy, EnvoyBuilder, RateLimitService, Req};
use keygate_redistest::RedisServer;
use serde_json::{json, Value};

/// keygate's descriptors (crates/keygate-core/src/fleet.rs) as route actions: the kind
/// (`generic_key` with `descriptor_key: keygate`), then the identity headers keygate sets.
const DESCRIPTORS: [(&str, &[(&str, &str)]); 3] = [
    ("account", &[("x-keygate-account-sid", "account_sid")]),
    (
        "key",
        &[("x-keygate-role", "role"), ("x-keygate-key-sid", "key_sid")],
    ),
    (
        "key_api",
        &[("x-keygate-api", "api"), ("x-keygate-key-sid", "key_sid")],
    ),
];

fn rate_limits() -> Value {
    let entries: Vec<Value> = DESCRIPTORS
        .iter()
        .map(|(kind, headers)| {
            let mut actions = vec![
                json!({"generic_key": {"descriptor_key": "keygate", "descriptor_value": kind}}),
            ];
            actions.extend(headers.iter().map(|(header, key)| {
                json!({"request_headers": {"header_name": header, "descriptor_key": key}})
            }));
            json!({ "actions": actions })
        })
        .collect();
    Value::Array(entries)
}

/// The ratelimit filter as envoy/envoy-ratelimit.yaml configures it.
fn ratelimit_filter() -> Value {
    json!({
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": "keygate",
            "failure_mode_deny": true,
            "status_on_error": {"code": "ServiceUnavailable"},
            "timeout": "0.25s",
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "rate_limit_service": {
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": "keygate_ratelimit"}}
            }
        }
    })
}

/// The demo bootstrap has the same actions and filter settings as this test.
#[test]
fn the_demo_bootstrap_has_the_tested_actions_and_filter() {
    let yaml = std::fs::read_to_string(paths::envoy_dir().join("envoy-ratelimit.yaml")).unwrap();
    let mut want: Vec<String> = Vec::new();
    for (kind, headers) in DESCRIPTORS {
        want.push(format!(
            "- generic_key: {{ descriptor_key: keygate, descriptor_value: {kind} }}"
        ));
        for (header, key) in headers {
            want.push(format!(
                "- request_headers: {{ header_name: {header}, descriptor_key: {key} }}"
            ));
        }
    }
    want.extend(
        [
            "- name: envoy.filters.http.ratelimit",
            "domain: keygate",
            "failure_mode_deny: true",
            "status_on_error: { code: ServiceUnavailable }",
            "timeout: 0.25s",
            "enable_x_ratelimit_headers: DRAFT_VERSION_03",
            "envoy_grpc: { cluster_name: keygate_ratelimit }",
            "\"fleet_limits\": { \"mode\": \"envoy\" }",
        ]
        .map(str::to_owned),
    );
    let lines: Vec<&str> = yaml.lines().map(str::trim).collect();
    for w in &want {
        assert!(
            lines.contains(&w.as_str()),
            "envoy-ratelimit.yaml lacks {w:?}"
        );
    }
    // keygate comes first, the ratelimit filter after it, the router last.
    let at = |filter: &str| {
        let line = format!("- name: {filter}");
        lines.iter().position(|l| *l == line).unwrap()
    };
    assert!(at("envoy.filters.http.wasm") < at("envoy.filters.http.ratelimit"));
    assert!(at("envoy.filters.http.ratelimit") < at("envoy.filters.http.router"));
}

/// An Envoy with keygate (control-plane mode, `fleet_limits` in envoy mode), then the ratelimit
/// filter to `rls`, then the router; the route carries [`rate_limits`].
fn edge(control: &ControlPlane, rls: &RateLimitService, echo: &Echo) -> Envoy {
    let mut plugin = control.plugin_config(json!({}));
    plugin["fleet_limits"] = json!({"mode": "envoy"});
    let builder = EnvoyBuilder::new()
        .plugin_config_json(&plugin)
        .concurrency(2)
        .upstream_port(echo.port())
        .cluster("keygate_control", control.port())
        .grpc_cluster("keygate_ratelimit", rls.grpc_port());
    // The harness's own filter chain and route, with the ratelimit filter put after keygate and
    // the actions on the route.
    let base = builder.bootstrap(&paths::wasm_path(), std::path::Path::new("/dev/null"));
    let hcm =
        &base["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let mut filters = hcm["http_filters"].as_array().unwrap().clone();
    assert_eq!(filters[0]["name"], "envoy.filters.http.wasm");
    filters.insert(1, ratelimit_filter());
    let mut route_config = hcm["route_config"].clone();
    route_config["virtual_hosts"][0]["routes"][0]["route"]["rate_limits"] = rate_limits();
    builder
        .hcm_field("http_filters", Value::Array(filters))
        .hcm_field("route_config", route_config)
        .start()
}

#[test]
fn an_account_limited_to_60_a_minute_fleet_wide_gets_exactly_60_through_envoys_filter() {
    let redis = RedisServer::start().unwrap();
    let control = ControlPlane::start();
    control.patch_account(
        json!({"limits": {"rate": {"requests": 60, "per": "1m", "scope": "fleet"}}}),
    );
    let (sid, secret) = control.create_key_v1(json!({"role": "standard"}));
    let mut rls = RateLimitService::start(&redis.url(), &control);
    let echo = Echo::start();
    let envoy = edge(&control, &rls, &echo);

    // The edge has its config once a bad credential gets 401 (503 no_config before); such a
    // request never reaches the ratelimit filter, so it counts nothing.
    let probe = Req::get(control.calls_path()).basic(&sid, "not-the-secret");
    let loaded = wait::within(Duration::from_secs(20), || {
        probe.try_send(envoy.port()).is_ok_and(|r| r.status == 401)
    });
    assert!(loaded.is_some(), "no config at the edge:\n{}", envoy.logs());

    let req = Req::get(control.calls_path()).basic(&sid, &secret);
    let mut statuses = Vec::new();
    for _ in 0..100 {
        let r = req.send(envoy.port());
        if r.status == 429 {
            assert_eq!(
                r.header_str("x-envoy-ratelimited"),
                Some("true"),
                "a 429 from Envoy's ratelimit filter: {:?}",
                r.body_text()
            );
        }
        statuses.push(r.status);
    }
    let count = |s: u16| statuses.iter().filter(|&&x| x == s).count();
    assert_eq!(
        (count(200), count(429)),
        (60, 40),
        "statuses: {statuses:?}\nratelimit log:\n{}",
        rls.logs()
    );
    assert!(
        statuses[..60].iter().all(|&s| s == 200),
        "the first 60 pass: {statuses:?}"
    );
    assert_eq!(
        echo.captured().len(),
        60,
        "the upstream got exactly what was admitted"
    );
    assert_eq!(
        envoy.counter("cluster.upstream.ratelimit.over_limit"),
        Some(40)
    );

    // The service stopped: failure_mode_deny, so the configured status (503) and nothing
    // reaches the upstream; keygate's own refusals are unchanged.
    rls.kill();
    for _ in 0..3 {
        assert_eq!(req.send(envoy.port()).status, 503);
    }
    assert_eq!(probe.send(envoy.port()).status, 401);
    assert_eq!(echo.captured().len(), 60);
    assert_eq!(
        envoy.counter("cluster.upstream.ratelimit.error"),
        Some(3),
        "{}",
        envoy.stats()
    );

    // Back: the account is still over its limit (the count lives in Redis, not in the service).
    rls.restart();
    assert_eq!(req.send(envoy.port()).status, 429);
    assert_eq!(echo.captured().len(), 60);
}
