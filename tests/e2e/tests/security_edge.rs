//! End-to-end: the edge's side of the second security round, in a real Envoy over real sockets.
//!
//! - `x-keygate-config-version` goes only on replies to requests whose credential authenticated;
//! - with `unknown_routes: allow`, a path bound to another account is `account_mismatch` whatever
//!   the method, and never reaches the upstream;
//! - identity headers sent as request trailers (and their `_` look-alikes) never reach the
//!   upstream, in static and in control-plane mode;
//! - the keyed failed-auth limiter refuses a guesser with 429 after exactly its limit, on every
//!   worker (the VMs share one key), and an IPv6 /64 is one client.
//!
//! Client addresses are chosen with `X-Forwarded-For` through one trusted hop
//! (`use_remote_address: true`, `xff_num_trusted_hops: 1`).

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use keygate_e2e::demo::CALLS;
use keygate_e2e::{demo, wait, ControlPlane, Echo, EnvoyBuilder, Req, Response};
use serde_json::{json, Value};

const OTHER_CALLS: &str = "/v2/accounts/ACdemo0002/calls";
const VERSION: &str = "x-keygate-config-version";
const WORKERS: u32 = 4;

fn code(r: &Response) -> String {
    r.body_json()["error"]["code"]
        .as_str()
        .unwrap_or("ok")
        .to_owned()
}

/// `req` as if sent by `client` (the trusted hop's `X-Forwarded-For`).
fn from(req: Req, client: &str) -> Req {
    req.header("x-forwarded-for", client)
}

/// The demo config with `edit` applied.
fn demo_config(edit: impl FnOnce(&mut Value)) -> Value {
    let mut config = demo::config();
    edit(&mut config);
    config
}

fn edge(config: &Value, echo: &Echo) -> EnvoyBuilder {
    EnvoyBuilder::new()
        .plugin_config_json(config)
        .upstream_port(echo.port())
        .concurrency(WORKERS)
        .use_remote_address(true)
        .xff_num_trusted_hops(1)
}

/// Polls `f` every 50 ms until it holds or `limit` passes.
fn within(limit: Duration, f: impl FnMut() -> bool) -> bool {
    wait::within(limit, f).is_some()
}

/// A chunked POST whose trailers carry forged identity headers, their `_` look-alikes, a
/// credential (removed like the `Authorization` header, since `forward_authorization` is off),
/// and one harmless field that must go through (proof that trailers reach the upstream at all).
fn post_with_forged_trailers(path: &str, user: &str, secret: &str) -> Req {
    Req::post(path)
        .basic(user, secret)
        .header("transfer-encoding", "chunked")
        .body(
            b"5\r\nhello\r\n0\r\n\
              x-keygate-key-sid: SKforged\r\n\
              X-Keygate-Account-Sid: ACforged\r\n\
              x_keygate_role: main\r\n\
              X_KEYGATE_API: keys\r\n\
              x-keygate-api: keys\r\n\
              authorization: Basic dXNlcjpzZWNyZXQ=\r\n\
              x-checksum: abc123\r\n\r\n"
                .to_vec(),
        )
}

/// The last request the echo received had `x-checksum` as its only trailer, and its identity
/// headers are keygate's (`key_sid`).
fn assert_trailers_clean(echo: &Echo, key_sid: &str) {
    let captured = echo.captured();
    let last = captured.last().expect("the request reached the upstream");
    assert_eq!(last.body, b"hello");
    assert_eq!(last.header_str("x-keygate-key-sid"), Some(key_sid));
    assert_eq!(last.header_all("x-keygate-key-sid").len(), 1, "{last:?}");
    let trailers = echo.captured_trailers().pop().unwrap_or_default();
    let names: Vec<String> = trailers.iter().map(|(n, _)| n.to_lowercase()).collect();
    assert_eq!(names, ["x-checksum"], "{trailers:?}");
    assert_eq!(trailers[0].1, b"abc123");
}

#[test]
fn the_config_version_header_is_sent_only_to_authenticated_requests() {
    let mut cp = ControlPlane::start();
    let echo = Echo::start();
    let config = cp.plugin_config(json!({
        "debug_version_header": true, "wait_s": 1, "max_staleness_s": 2, "on_stale": "deny"
    }));
    let envoy = edge(&config, &echo)
        .cluster("keygate_control", cp.port())
        .http1_trailers()
        .start();
    let account = cp.account_sid().to_owned();
    let calls = format!("/v2/accounts/{account}/calls");
    let (main, main_secret) = cp.create_key_v1(json!({"role": "main", "friendly_name": "e2e"}));
    let (std, std_secret) =
        cp.create_key_v1(json!({"role": "standard", "friendly_name": "e2e", "apis": ["messages"]}));
    let ok = Req::get(&calls).basic(&main, &main_secret);
    assert!(
        within(Duration::from_secs(15), || ok.send(envoy.port()).status
            == 200),
        "the key was never admitted; Envoy log:\n{}",
        envoy.logs()
    );
    let version = ok.send(envoy.port()).header_str(VERSION).map(str::to_owned);
    assert!(version.is_some(), "an allowed request carries the version");

    // Each from its own address, so no case is the failed-auth limiter's.
    let authenticated = [
        ("ok", Req::get(&calls).basic(&main, &main_secret)),
        (
            "permission_denied",
            Req::get(&calls).basic(&std, &std_secret),
        ),
        (
            "account_mismatch",
            Req::get("/v2/accounts/ACnotmine/calls").basic(&main, &main_secret),
        ),
        (
            "unknown_route",
            Req::get("/v9/elsewhere").basic(&main, &main_secret),
        ),
    ];
    let unauthenticated = [
        ("missing_credentials", Req::get(&calls)),
        (
            "malformed_credentials",
            Req::get(&calls).header("authorization", "Basic !!!"),
        ),
        (
            "unsupported_scheme",
            Req::get(&calls).header("authorization", "Digest abc"),
        ),
        (
            "invalid_credentials",
            Req::get(&calls).basic(&main, "sk_live_wrong"),
        ),
        (
            "malformed_path",
            Req::get(format!("{calls}/../calls")).basic(&main, &main_secret),
        ),
    ];
    for (i, (want, req)) in authenticated.into_iter().enumerate() {
        let r = from(req, &format!("198.18.1.{i}")).send(envoy.port());
        assert_eq!(code(&r), want, "{r:?}");
        assert_eq!(
            r.header_str(VERSION).map(str::to_owned),
            version,
            "{want}: {r:?}"
        );
    }
    for (i, (want, req)) in unauthenticated.into_iter().enumerate() {
        let r = from(req, &format!("198.18.2.{i}")).send(envoy.port());
        assert_eq!(code(&r), want, "{r:?}");
        assert_eq!(r.header_str(VERSION), None, "{want}: {r:?}");
    }
    // The catalogue allows 30 failures a minute per address; then 429, without the version.
    let guess = from(Req::get(&calls).basic(&main, "sk_live_wrong"), "198.18.3.1");
    let first_refusal = (0..40)
        .map(|_| guess.send(envoy.port()))
        .find(|r| r.status == 429)
        .expect("the guesser is refused");
    assert_eq!(code(&first_refusal), "too_many_failed_auth");
    assert!(first_refusal.header_str("retry-after").is_some());
    assert_eq!(first_refusal.header_str(VERSION), None, "{first_refusal:?}");

    // Forged identity trailers on an allowed request, in control-plane mode.
    let r = from(
        post_with_forged_trailers(&calls, &main, &main_secret),
        "198.18.4.1",
    )
    .send(envoy.port());
    assert_eq!(r.status, 200, "{r:?}");
    assert_trailers_clean(&echo, &main);

    // A stale config is refused without saying which version is in force.
    cp.kill();
    assert!(
        within(Duration::from_secs(15), || from(ok.clone(), "198.18.5.1")
            .send(envoy.port())
            .status
            == 503),
        "never went stale"
    );
    let stale = from(ok.clone(), "198.18.5.2").send(envoy.port());
    assert_eq!(code(&stale), "config_stale", "{stale:?}");
    assert_eq!(stale.header_str(VERSION), None, "{stale:?}");
}

#[test]
fn no_config_replies_carry_no_version() {
    // A control plane that never answers: every request is 503 no_config.
    let echo = Echo::start();
    let cp = ControlPlane::initialized();
    let config = cp.plugin_config(json!({"debug_version_header": true}));
    let envoy = edge(&config, &echo)
        .cluster("keygate_control", cp.port())
        .start();
    let m = demo::MAIN;
    let r = Req::get(CALLS).basic(m.sid, m.secret).send(envoy.port());
    assert_eq!(code(&r), "no_config", "{r:?}");
    assert_eq!(r.header_str(VERSION), None, "{r:?}");
}

#[test]
fn unknown_routes_allow_never_forwards_another_accounts_path() {
    let echo = Echo::start();
    let config = demo_config(|c| c["settings"]["unknown_routes"] = json!("allow"));
    let envoy = edge(&config, &echo).start();
    let (m, s) = (demo::MAIN, demo::STANDARD);
    // `calls` takes GET and POST: these methods match no API, but the paths are ACdemo0002's.
    for (method, path, key) in [
        ("PUT", OTHER_CALLS.to_owned(), m),
        ("DELETE", format!("{OTHER_CALLS}/CA1/Recordings"), m),
        ("PATCH", OTHER_CALLS.to_owned(), s),
        (
            "PUT",
            "/2010-04-01/Accounts/ACdemo0002/Messages.json".to_owned(),
            m,
        ),
    ] {
        let r = Req::new(method, &path)
            .basic(key.sid, key.secret)
            .send(envoy.port());
        assert_eq!(
            (r.status, code(&r)),
            (404, "account_mismatch".to_owned()),
            "{method} {path}: {r:?}"
        );
    }
    assert!(echo.captured().is_empty(), "{:?}", echo.captured());
    // The same method on the key's own account is an unknown route, which `allow` forwards.
    let r = Req::new("PUT", CALLS)
        .basic(m.sid, m.secret)
        .send(envoy.port());
    assert_eq!(r.status, 200, "{r:?}");
    let captured = echo.captured();
    assert_eq!(captured.len(), 1);
    assert_eq!(captured[0].method, "PUT");
    assert_eq!(captured[0].header_str("x-keygate-key-sid"), Some(m.sid));
    assert_eq!(captured[0].header("x-keygate-api"), None);
}

#[test]
fn identity_headers_sent_as_trailers_never_reach_the_upstream() {
    let echo = Echo::start();
    let envoy = edge(&demo::config(), &echo).http1_trailers().start();
    let m = demo::MAIN;
    let r = post_with_forged_trailers(CALLS, m.sid, m.secret).send(envoy.port());
    assert_eq!(r.status, 200, "{r:?}");
    assert_trailers_clean(&echo, m.sid);
    // A denied request never reaches the upstream, trailers or not.
    let r = post_with_forged_trailers(CALLS, m.sid, "sk_live_wrong").send(envoy.port());
    assert_eq!(code(&r), "invalid_credentials");
    assert_eq!(echo.captured().len(), 1);
}

#[test]
fn the_failed_auth_limiter_refuses_a_guesser_after_exactly_its_limit_on_every_worker() {
    let echo = Echo::start();
    let config = demo_config(|c| {
        c["limits"] = json!({"failed_auth": {"requests": 4, "per": "1h"}});
    });
    let envoy = edge(&config, &echo).start();
    let m = demo::MAIN;
    let wrong = Req::get(CALLS).basic(m.sid, "sk_live_wrong");
    let right = Req::get(CALLS).basic(m.sid, m.secret);
    // Sequential guesses, each on a fresh connection (spread over the 4 workers): whichever VM
    // judges, the same two buckets fill, so the fifth is refused before it is compared.
    let guesser = "2001:db8:5:6::1";
    let outcomes: Vec<String> = (0..6)
        .map(|_| code(&from(wrong.clone(), guesser).send(envoy.port())))
        .collect();
    assert_eq!(
        outcomes,
        [
            "invalid_credentials",
            "invalid_credentials",
            "invalid_credentials",
            "invalid_credentials",
            "too_many_failed_auth",
            "too_many_failed_auth"
        ]
    );
    // Refused before comparison, even with the right secret, from anywhere in the same /64.
    let r = from(right.clone(), "2001:db8:5:6:abcd::9").send(envoy.port());
    assert_eq!(
        (r.status, code(&r)),
        (429, "too_many_failed_auth".to_owned())
    );
    assert_eq!(r.header_str("retry-after"), Some("900"), "{r:?}");
    assert_eq!(
        r.header_str("ratelimit-policy"),
        Some("\"failed_auth\";q=4;w=3600")
    );
    // Another /64, and an IPv4 client, are not locked out.
    for client in ["2001:db8:5:7::1", "198.51.100.20"] {
        let r = from(right.clone(), client).send(envoy.port());
        assert_eq!(r.status, 200, "{client}: {r:?}");
    }
    assert_eq!(echo.captured().len(), 2);
    assert_eq!(
        envoy.custom_metric("keygate.denied.too_many_failed_auth"),
        Some(3)
    );
    assert_eq!(
        envoy.custom_metric("keygate.denied.invalid_credentials"),
        Some(4)
    );
}
