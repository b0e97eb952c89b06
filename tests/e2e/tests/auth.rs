//! End-to-end: every reply class of the filter inside a real Envoy (v8), over real sockets, with
//! the demo config (`envoy/keygate-demo.json`, secrets in `envoy/README.md`).
//!
//! Each case asserts status, reason code, and what the upstream received: nothing for a denial,
//! and for an allow the identity headers keygate set, with no `Authorization` and no client copy
//! of an identity header.

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use keygate_e2e::demo::{DemoKey, BALANCE, CALLS, KEYS, MESSAGES};
use keygate_e2e::{demo, Echo, Envoy, EnvoyBuilder, Req, Response};
use serde_json::json;

fn code(r: &Response) -> String {
    r.body_json()["error"]["code"]
        .as_str()
        .unwrap_or("<none>")
        .to_owned()
}

fn start() -> (Echo, Envoy) {
    let echo = Echo::start();
    let envoy = EnvoyBuilder::new().upstream_port(echo.port()).start();
    (echo, envoy)
}

/// A denial case: request, status, reason code.
struct Denied {
    name: &'static str,
    req: Req,
    status: u16,
    code: &'static str,
}

fn denied(status: u16, code: &'static str, name: &'static str, req: Req) -> Denied {
    Denied {
        name,
        req,
        status,
        code,
    }
}

/// The denial cases: status, reason code, name, request.
#[rustfmt::skip]
fn denial_cases() -> Vec<Denied> {
    let m = demo::MAIN;
    let auth = |value: &[u8]| Req::get(CALLS).header("authorization", value);
    let as_main = |path: &str| Req::get(path).basic(m.sid, m.secret);
    let as_key = |k: DemoKey, path: &str| Req::get(path).basic(k.sid, k.secret);
    let bearer = |token: &str| Req::get(CALLS).bearer(token);
    let other_account = "/v2/accounts/ACdemo0002/calls";
    let comma_joined = format!("Bearer {}, Basic abc", m.secret);
    vec![
        denied(401, "missing_credentials", "no credentials", Req::get(CALLS)),
        denied(401, "invalid_credentials", "unknown key", Req::get(CALLS).basic("SKnope", m.secret)),
        denied(401, "invalid_credentials", "wrong secret", Req::get(CALLS).basic(m.sid, "sk_live_wrong")),
        denied(401, "invalid_credentials", "unknown bearer", bearer("sk_live_nope")),
        denied(401, "unsupported_scheme", "unsupported scheme", auth(b"Digest username=\"x\"")),
        denied(400, "multiple_credentials", "two Authorization headers", as_main(CALLS).bearer(m.secret)),
        denied(400, "multiple_credentials", "comma-joined schemes", auth(comma_joined.as_bytes())),
        denied(400, "malformed_credentials", "not token68", auth(b"Bearer a b")),
        denied(400, "malformed_credentials", "bad base64", auth(b"Basic !!!!")),
        denied(400, "malformed_credentials", "non-UTF-8 credential", auth(b"Bearer \xff\xfe")),
        denied(400, "malformed_path", "dot segments", as_main(&format!("{CALLS}/../../ACdemo0002/calls"))),
        denied(400, "malformed_path", "encoded slash", as_main("/v2/accounts/ACdemo0001%2Fcalls")),
        denied(404, "account_mismatch", "wrong account SID", as_main(other_account)),
        denied(404, "unknown_route", "unknown route", as_main("/v9/unknown")),
        denied(403, "permission_denied", "standard key, management API", as_key(demo::STANDARD, KEYS)),
        denied(403, "permission_denied", "key limited to calls, messages", as_key(demo::STANDARD, MESSAGES)),
        denied(403, "permission_denied", "publishable key, secret API", bearer(demo::PUBLISHABLE.secret)),
        denied(403, "ip_not_allowed", "IP allowlist", as_key(demo::IP_LOCKED, CALLS)),
        denied(403, "account_suspended", "suspended account", as_key(demo::SUSPENDED, other_account)),
    ]
}

#[test]
fn every_denial_class_has_its_status_code_and_never_reaches_the_upstream() {
    let (echo, envoy) = start();
    let m = demo::MAIN;
    let cases = denial_cases();
    for c in &cases {
        let r = c.req.send(envoy.port());
        assert_eq!(
            (r.status, code(&r).as_str()),
            (c.status, c.code),
            "case {:?}: {r:?}",
            c.name
        );
        assert_eq!(
            r.header_str("content-type"),
            Some("application/json"),
            "case {:?}",
            c.name
        );
        let body = r.body_text();
        assert!(
            !body.contains(m.secret) && !body.contains("SKnope"),
            "case {:?}: body echoes request data: {body}",
            c.name
        );
        if c.status == 401 {
            let challenges: Vec<&[u8]> = r.header_all("www-authenticate");
            assert_eq!(
                challenges,
                vec![
                    &b"Basic realm=\"keygate\", charset=\"UTF-8\""[..],
                    b"Bearer realm=\"keygate\""
                ],
                "case {:?}",
                c.name
            );
        }
        // The filter survives every case: a valid request right after still passes.
        let ok = Req::get(CALLS).basic(m.sid, m.secret).send(envoy.port());
        assert_eq!(ok.status, 200, "after case {:?}: {ok:?}", c.name);
    }
    // Only the valid follow-up requests reached the upstream.
    let seen = echo.captured();
    assert_eq!(seen.len(), cases.len(), "{seen:?}");
    assert!(seen
        .iter()
        .all(|s| s.header_str("x-keygate-key-sid") == Some(m.sid)));
    // Stats count each reason.
    assert_eq!(
        envoy.custom_metric("keygate.allowed"),
        Some(cases.len() as u64)
    );
    assert_eq!(
        envoy.custom_metric("keygate.denied.invalid_credentials"),
        Some(3)
    );
    assert_eq!(
        envoy.custom_metric("keygate.denied.malformed_credentials"),
        Some(3)
    );
    assert_eq!(
        envoy.custom_metric("keygate.denied.permission_denied"),
        Some(3)
    );
}

#[test]
fn unknown_key_wrong_secret_expired_and_disabled_are_byte_identical() {
    let mut cfg = demo::config();
    // An expired key, a disabled key, and a rotated key whose old secret's grace is over.
    let digest = |s: &str| keygate_core::digest::Digester::Sha256.digest_hex(s.as_bytes());
    let keys = cfg["keys"].as_array_mut().unwrap();
    keys.push(json!({"sid": "SKexpired", "account_sid": "ACdemo0001", "role": "standard", "expires_at": "2020-01-01T00:00:00Z", "secrets": [{"digest": digest("sk_live_expired")}]}));
    keys.push(json!({"sid": "SKdisabled", "account_sid": "ACdemo0001", "role": "standard", "enabled": false, "secrets": [{"digest": digest("sk_live_disabled")}]}));
    keys.push(
        json!({"sid": "SKrotated", "account_sid": "ACdemo0001", "role": "standard", "secrets": [
        {"digest": digest("sk_live_new")},
        {"digest": digest("sk_live_old"), "not_after": "2020-01-01T00:00:00Z"}]}),
    );
    let echo = Echo::start();
    let envoy = EnvoyBuilder::new()
        .plugin_config_json(&cfg)
        .upstream_port(echo.port())
        .start();
    let p = envoy.port();
    let reference = Req::get(CALLS)
        .basic("SKnope", "sk_live_x")
        .send(p)
        .without_date();
    assert_eq!(reference.status, 401);
    for (name, req) in [
        (
            "wrong secret",
            Req::get(CALLS).basic(demo::MAIN.sid, "sk_live_demoMain0002"),
        ),
        (
            "expired key",
            Req::get(CALLS).basic("SKexpired", "sk_live_expired"),
        ),
        (
            "disabled key",
            Req::get(CALLS).basic("SKdisabled", "sk_live_disabled"),
        ),
        (
            "old secret after grace",
            Req::get(CALLS).basic("SKrotated", "sk_live_old"),
        ),
        (
            "old secret after grace, Bearer",
            Req::get(CALLS).bearer("sk_live_old"),
        ),
        ("unknown bearer", Req::get(CALLS).bearer("sk_live_x")),
    ] {
        assert_eq!(req.send(p).without_date(), reference, "{name}");
    }
    assert_eq!(
        Req::get(CALLS)
            .basic("SKrotated", "sk_live_new")
            .send(p)
            .status,
        200
    );
    assert_eq!(echo.captured().len(), 1);
}

#[test]
fn allowed_requests_carry_keygate_identity_only() {
    let (echo, envoy) = start();
    let p = envoy.port();
    let cases = [
        (
            "Basic main key",
            Req::get(CALLS).basic(demo::MAIN.sid, demo::MAIN.secret),
            [
                Some("ACdemo0001"),
                Some("SKdemomain01"),
                Some("main"),
                Some("calls"),
            ],
        ),
        (
            "Bearer main key",
            Req::post("/v2/accounts/ACdemo0001/calls/CA1").bearer(demo::MAIN.secret),
            [
                Some("ACdemo0001"),
                Some("SKdemomain01"),
                Some("main"),
                Some("calls"),
            ],
        ),
        (
            "standard key on its API",
            Req::get(CALLS).basic(demo::STANDARD.sid, demo::STANDARD.secret),
            [
                Some("ACdemo0001"),
                Some("SKdemostd01"),
                Some("standard"),
                Some("calls"),
            ],
        ),
        (
            "publishable key",
            Req::get(BALANCE).bearer(demo::PUBLISHABLE.secret),
            [
                Some("ACdemo0001"),
                Some("SKdemopub01"),
                Some("publishable"),
                Some("balance"),
            ],
        ),
        (
            "account credentials on Keys",
            Req::get(KEYS).basic(demo::ACCOUNT_SID, demo::ACCOUNT_AUTH_TOKEN),
            [Some("ACdemo0001"), None, Some("account"), Some("keys")],
        ),
        (
            "main key on Keys",
            Req::post(KEYS).basic(demo::MAIN.sid, demo::MAIN.secret),
            [
                Some("ACdemo0001"),
                Some("SKdemomain01"),
                Some("main"),
                Some("keys"),
            ],
        ),
    ];
    let names = [
        "x-keygate-account-sid",
        "x-keygate-key-sid",
        "x-keygate-role",
        "x-keygate-api",
    ];
    for (name, req, want) in cases {
        echo.clear();
        // The client tries to spoof every identity header, twice, in mixed case.
        let mut req = req;
        for n in names {
            req = req
                .header(n, "spoofed")
                .header(n.to_uppercase(), "spoofed-too");
        }
        // Everything else reaches the upstream as sent: repeated headers, in order, and bytes
        // that are not UTF-8 (keygate rewrites the header map in one write).
        let req = req
            .header("x-trace", "one")
            .header("x-other", b"caf\xe9 \xff")
            .header("x-trace", "two");
        let method = String::from_utf8_lossy(req.method()).into_owned();
        let path = String::from_utf8_lossy(req.target()).into_owned();
        let r = req.send(p);
        assert_eq!(r.status, 200, "{name}: {r:?}");
        let seen = echo.captured();
        assert_eq!(seen.len(), 1, "{name}");
        let s = &seen[0];
        assert_eq!(
            (s.method.as_str(), s.path.as_str()),
            (method.as_str(), path.as_str())
        );
        assert_eq!(
            s.header_all("x-trace"),
            vec![b"one".as_slice(), b"two"],
            "{name}"
        );
        assert_eq!(
            s.header("x-other"),
            Some(b"caf\xe9 \xff".as_slice()),
            "{name}"
        );
        let host = format!("127.0.0.1:{p}");
        assert_eq!(s.header_str("host"), Some(host.as_str()), "{name}");
        assert!(
            !s.has_header("authorization"),
            "{name}: Authorization forwarded"
        );
        for (n, w) in names.iter().zip(want) {
            let got: Vec<&[u8]> = s.header_all(n);
            match w {
                Some(v) => assert_eq!(got, vec![v.as_bytes()], "{name}: {n}"),
                None => assert!(got.is_empty(), "{name}: {n} should be absent, got {got:?}"),
            }
        }
    }
}

#[test]
fn curl_forms_of_basic_and_bearer_work() {
    let (echo, envoy) = start();
    let base = format!("http://127.0.0.1:{}", envoy.port());
    let curl = |args: &[&str]| -> String {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(args)
            .output()
            .expect("curl is installed (Debian package curl)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let m = demo::MAIN;
    assert_eq!(
        curl(&[
            "-u",
            &format!("{}:{}", m.sid, m.secret),
            &format!("{base}{CALLS}")
        ]),
        "200"
    );
    let userinfo = base.replace("http://", &format!("http://{}:{}@", m.sid, m.secret));
    assert_eq!(curl(&[&format!("{userinfo}{CALLS}")]), "200");
    assert_eq!(
        curl(&[
            "-H",
            &format!("Authorization: Bearer {}", m.secret),
            &format!("{base}{CALLS}")
        ]),
        "200"
    );
    assert_eq!(
        curl(&["-u", &format!("{}:wrong", m.sid), &format!("{base}{CALLS}")]),
        "401"
    );
    assert_eq!(echo.captured().len(), 3);
}

#[test]
fn non_utf8_bytes_in_any_header_do_not_kill_the_vm() {
    let (echo, envoy) = start();
    let p = envoy.port();
    let m = demo::MAIN;
    let r = Req::get(CALLS)
        .basic(m.sid, m.secret)
        .header("x-odd", b"\xff\xfe\x80latin\xe9")
        .send(p);
    assert_eq!(r.status, 200, "{r:?}");
    let r = Req::get(CALLS)
        .header("authorization", b"Basic \xc3\x28")
        .header("x-odd", b"\xff")
        .send(p);
    assert_eq!(r.status, 400, "{r:?}");
    for _ in 0..3 {
        assert_eq!(Req::get(CALLS).basic(m.sid, m.secret).send(p).status, 200);
    }
    assert_eq!(echo.captured().len(), 4);
    assert_eq!(
        echo.captured()[0].header("x-odd"),
        Some(&b"\xff\xfe\x80latin\xe9"[..])
    );
    assert!(
        !envoy.logs().contains("panicked"),
        "VM panicked:\n{}",
        envoy.logs()
    );
}

#[test]
fn no_config_answers_503_with_retry_after() {
    let echo = Echo::start();
    let envoy = EnvoyBuilder::new()
        .plugin_config("")
        .upstream_port(echo.port())
        .start();
    let r = Req::get(CALLS)
        .basic(demo::MAIN.sid, demo::MAIN.secret)
        .send(envoy.port());
    assert_eq!((r.status, code(&r).as_str()), (503, "no_config"), "{r:?}");
    assert_eq!(r.header_str("retry-after"), Some("5"));
    assert!(echo.captured().is_empty());
}

#[test]
fn an_invalid_config_is_refused_with_the_exact_path() {
    let mut cfg = demo::config();
    cfg["keys"][3]["allowed_ips"][0] = json!("10.0.0/8");
    let log = EnvoyBuilder::new()
        .plugin_config_json(&cfg)
        .start_expect_failure();
    assert!(
        log.contains(r#"config rejected: keys[3].allowed_ips[0]: invalid CIDR \"10.0.0/8\""#)
            || log.contains(r#"config rejected: keys[3].allowed_ips[0]: invalid CIDR "10.0.0/8""#),
        "{log}"
    );
    assert!(!log.contains("sk_live_"), "no secret in logs");
}

#[test]
fn cors_preflight_passes_without_credentials_only_when_enabled() {
    let preflight = || {
        Req::options(CALLS)
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST")
    };
    let (echo, envoy) = start();
    assert_eq!(preflight().send(envoy.port()).status, 401);
    assert!(echo.captured().is_empty());
    drop(envoy);

    let mut cfg = demo::config();
    cfg["settings"]["cors_preflight"] = json!("allow");
    let envoy = EnvoyBuilder::new()
        .plugin_config_json(&cfg)
        .upstream_port(echo.port())
        .start();
    let r = preflight()
        .header("x-keygate-role", "main")
        .send(envoy.port());
    assert_eq!(r.status, 200, "{r:?}");
    let seen = echo.captured();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].has_header("x-keygate-role"),
        "spoofed identity stripped on preflight too"
    );
    // A plain OPTIONS without the CORS headers still needs credentials.
    assert_eq!(Req::options(CALLS).send(envoy.port()).status, 401);
}

#[test]
fn forward_authorization_can_be_enabled() {
    let mut cfg = demo::config();
    cfg["settings"]["forward_authorization"] = json!(true);
    let echo = Echo::start();
    let envoy = EnvoyBuilder::new()
        .plugin_config_json(&cfg)
        .upstream_port(echo.port())
        .start();
    assert_eq!(
        Req::get(CALLS)
            .bearer(demo::MAIN.secret)
            .send(envoy.port())
            .status,
        200
    );
    assert_eq!(
        echo.captured()[0].header_str("authorization"),
        Some(format!("Bearer {}", demo::MAIN.secret).as_str())
    );
}
