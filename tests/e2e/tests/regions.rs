//! Regions: an edge names its region in its plugin configuration; an account is served by the
//! edges of its home region and of its further `regions`, and refused elsewhere like Exotel does
//! (404 `wrong_region`) or, with `settings.wrong_region: "401"`, like Twilio (the
//! `invalid_credentials` reply, byte for byte). A real control plane feeds real Envoys.
//!
//! - A key of a `us1` account: 200 at the `us1` edge, 404 `wrong_region` at the `in1` edge
//!   (exact body, nothing reaches the upstream, `keygate.denied.wrong_region` counted); the
//!   operator PATCHes `regions: ["in1"]` and the `in1` edge admits the key once the change
//!   arrives.
//! - With `settings.wrong_region: "401"` in the control plane's catalogue, the `in1` edge's
//!   reply to the key equals its reply to a wrong secret, byte for byte (but the `date`).
//! - Static mode: the plugin configuration's top-level `"region"`.
//!
//! No timed assertion: waits are bounded polls.

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use keygate_e2e::demo;
use keygate_e2e::wait::within;
use keygate_e2e::{ControlPlane, Echo, Envoy, EnvoyBuilder, Req, Response};
use serde_json::{json, Value};

/// Bounded wait for a config or a change to reach an edge.
const SETTLE: Duration = Duration::from_secs(20);

/// The exact 404 body of `wrong_region`.
const WRONG_REGION_BODY: &str =
    r#"{"error":{"code":"wrong_region","message":"This account is not served in this region"}}"#;

/// An edge fed by `cp`, with `extra` in its `control_plane` (its `region`).
fn edge(cp: &ControlPlane, echo: &Echo, extra: Value) -> Envoy {
    EnvoyBuilder::new()
        .plugin_config_json(&cp.plugin_config(extra))
        .cluster("keygate_control", cp.port())
        .upstream_port(echo.port())
        .start()
}

/// A main key of the control plane's first account (home region `us1`, the default), with no
/// practical rate limit; the account's own limit lifted too.
fn key(cp: &ControlPlane) -> (String, String) {
    let unlimited = json!({"requests": 1_000_000, "per": "1m"});
    cp.patch_account(json!({"limits": {"rate": unlimited}}));
    cp.create_key_v1(json!({"role": "main", "limits": {"rate": unlimited}}))
}

fn call(edge: &Envoy, cp: &ControlPlane, (sid, secret): (&str, &str)) -> Response {
    Req::get(cp.calls_path())
        .basic(sid, secret)
        .send(edge.port())
}

/// Waits (bounded) until `edge` answers `want` to the key's call.
fn until(edge: &Envoy, cp: &ControlPlane, key: (&str, &str), want: u16) {
    within(SETTLE, || call(edge, cp, key).status == want).unwrap_or_else(|| {
        panic!(
            "{} never answered {want}; Envoy log:\n{}",
            edge.dir().display(),
            keygate_e2e::envoy::tail(&edge.logs(), 40)
        )
    });
}

fn wrong_region_count(edge: &Envoy) -> u64 {
    edge.custom_metric("keygate.denied.wrong_region")
        .unwrap_or(0)
}

#[test]
fn a_key_is_served_at_its_account_s_edges_and_refused_with_404_elsewhere() {
    let cp = ControlPlane::start();
    let echo = Echo::start();
    let (sid, secret) = key(&cp);
    let key = (sid.as_str(), secret.as_str());
    // The in1 edge names itself (edge_id) for the fleet view; the us1 edge gives a region only.
    let us1 = edge(&cp, &echo, json!({"region": "us1"}));
    let in1 = edge(&cp, &echo, json!({"region": "in1", "edge_id": "edge-in1"}));
    until(&us1, &cp, key, 200);
    // The in1 edge has the config once a wrong secret is an authentication failure.
    until(&in1, &cp, (key.0, "sk_live_wrong"), 401);
    let before = echo.captured().len();

    let r = call(&in1, &cp, key);
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.body_text(), WRONG_REGION_BODY);
    assert_eq!(r.header_str("content-type"), Some("application/json"));
    assert_eq!(r.header_str("www-authenticate"), None);
    // The account's own credentials too: where an account is served binds every principal.
    let r = Req::get(cp.calls_path())
        .basic(cp.account_sid(), cp.cred("AUTH_TOKEN"))
        .send(in1.port());
    assert_eq!((r.status, r.body_text().as_str()), (404, WRONG_REGION_BODY));
    assert_eq!(
        echo.captured().len(),
        before,
        "nothing refused reached the upstream"
    );
    assert_eq!(wrong_region_count(&in1), 2);
    assert_eq!(wrong_region_count(&us1), 0);
    assert_eq!(call(&us1, &cp, key).status, 200);
    assert_eq!(echo.captured().len(), before + 1);

    // The operator lets the account use in1 too: the in1 edge admits it once the change
    // arrives, and the us1 edge still does.
    let account = cp.patch_account(json!({"regions": ["in1"]}));
    assert_eq!(
        (account["region"].clone(), account["regions"].clone()),
        (json!("us1"), json!(["in1"]))
    );
    until(&in1, &cp, key, 200);
    let refused = wrong_region_count(&in1);
    let r = call(&in1, &cp, key);
    assert_eq!(r.status, 200, "{r:?}");
    let seen = echo.captured();
    assert_eq!(
        seen.last().unwrap().header_str("x-keygate-key-sid"),
        Some(key.0)
    );
    assert_eq!(
        wrong_region_count(&in1),
        refused,
        "an admitted request counts nothing"
    );
    assert_eq!(call(&us1, &cp, key).status, 200);

    // And back: cleared, the in1 edge refuses again.
    cp.patch_account(json!({"regions": null}));
    until(&in1, &cp, key, 404);
}

#[test]
fn with_wrong_region_401_the_reply_is_the_invalid_credentials_reply_byte_for_byte() {
    let mut catalog = ControlPlane::built_in_catalog();
    catalog["settings"] = json!({"wrong_region": "401"});
    let cp = ControlPlane::start_with_catalog(&catalog);
    let echo = Echo::start();
    let (sid, secret) = key(&cp);
    let key = (sid.as_str(), secret.as_str());
    // Both edges add the version header to replies to authenticated requests: a 404
    // wrong_region would carry it, the invalid_credentials 401 must not.
    let versioned = |region: &str| json!({"region": region, "debug_version_header": true});
    let us1 = edge(&cp, &echo, versioned("us1"));
    let in1 = edge(&cp, &echo, versioned("in1"));
    until(&us1, &cp, key, 200);
    until(&in1, &cp, (key.0, "sk_live_wrong"), 401);

    let invalid = call(&in1, &cp, (key.0, "sk_live_wrong")).without_date();
    let unknown = call(&in1, &cp, ("SK00000000000000000000000000000000", "x")).without_date();
    let wrong_region = call(&in1, &cp, key).without_date();
    assert_eq!(invalid.status, 401);
    assert_eq!(invalid.header_str("x-keygate-config-version"), None);
    assert_eq!(wrong_region, invalid);
    assert_eq!(wrong_region, unknown);
    // Counted as what it is.
    assert_eq!(wrong_region_count(&in1), 1);
    assert_eq!(
        in1.custom_metric("keygate.denied.invalid_credentials"),
        Some(3),
        "the wait's wrong secret, the wrong secret and the unknown key"
    );
    // At its own edge the key is admitted, with the version header.
    let r = call(&us1, &cp, key);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header_str("x-keygate-config-version").is_some(), "{r:?}");
}

#[test]
fn a_static_configuration_names_its_edge_s_region_beside_the_document() {
    let echo = Echo::start();
    let static_edge = |region: &str| {
        let mut cfg = demo::config();
        cfg["accounts"][0]["region"] = json!("us1");
        cfg["region"] = json!(region);
        EnvoyBuilder::new()
            .plugin_config_json(&cfg)
            .upstream_port(echo.port())
            .start()
    };
    let main = Req::get(demo::CALLS).basic(demo::MAIN.sid, demo::MAIN.secret);
    let in1 = static_edge("in1");
    let r = main.send(in1.port());
    assert_eq!((r.status, r.body_text().as_str()), (404, WRONG_REGION_BODY));
    assert_eq!(wrong_region_count(&in1), 1);
    let us1 = static_edge("us1");
    assert_eq!(main.send(us1.port()).status, 200);
    assert_eq!(echo.captured().len(), 1);
}
