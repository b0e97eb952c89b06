//! What every family shares: the canary fixtures and their config, what a case expects, the
//! runner ([`Bench`]) and the assertions it makes.

use std::any::Any;
use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::thread;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use keygate_core::digest::Digester;
use keygate_core::Reason;
pub use keygate_e2e::demo::{BALANCE, CALLS, KEYS, MESSAGES};
use keygate_e2e::{demo, CapturedRequest, Echo, Envoy, EnvoyBuilder, Req, Response};
use serde_json::{json, Value};

pub const ACCOUNT: &str = demo::ACCOUNT_SID;

pub const IDENTITY_HEADERS: [&str; 4] = [
    "x-keygate-account-sid",
    "x-keygate-key-sid",
    "x-keygate-role",
    "x-keygate-api",
];

/// A fixture credential whose secret carries the `CANARY` marker.
#[derive(Clone, Copy, Debug)]
pub struct Canary {
    pub sid: &'static str,
    pub secret: &'static str,
}

impl Canary {
    const fn new(sid: &'static str, secret: &'static str) -> Canary {
        Canary { sid, secret }
    }
}

/// Standard key limited to `calls`. `SKcanarystd01:<secret>` is 43 bytes, so its standard
/// base64 ends in `==`, and it contains a `+` (so the URL-safe form differs).
pub const STD: Canary = Canary::new("SKcanarystd01", "sk_live_CANARYadv0001_std~?>!");
/// Main key.
pub const MAIN: Canary = Canary::new("SKcanarymain1", "sk_live_CANARYadv0002_main");
/// Publishable key (balance only).
pub const PUBLISHABLE: Canary = Canary::new("SKcanarypub01", "pk_live_CANARYadv0003_pub");
/// A second auth token of the demo account (account credentials: Basic `ACdemo0001:<token>`).
pub const ACCOUNT_TOKEN: Canary = Canary::new(ACCOUNT, "CANARYadv0004_auth_token");
/// `enabled: false`.
pub const DISABLED: Canary = Canary::new("SKcanarydis01", "sk_live_CANARYadv0005_disabled");
/// `expires_at` in 2020.
pub const EXPIRED: Canary = Canary::new("SKcanaryexp01", "sk_live_CANARYadv0006_expired");
/// Rotated key: this old secret's grace ended in 2020 ...
pub const ROTATED_OLD: Canary = Canary::new("SKcanaryrot01", "sk_live_CANARYadv0007_rot_old");
/// ... and this is its current secret.
pub const ROTATED_NEW: Canary = Canary::new("SKcanaryrot01", "sk_live_CANARYadv0008_rot_new");
/// A revoked key: removed from the config, so simply unknown.
pub const REVOKED: Canary = Canary::new("SKcanaryrev01", "sk_live_CANARYadv0009_revoked");
/// Standard key allowed only from 192.0.2.0/24.
pub const IP_LOCKED: Canary = Canary::new("SKcanaryip01", "sk_live_CANARYadv0010_iplocked");

pub const CANARIES: [Canary; 10] = [
    STD,
    MAIN,
    PUBLISHABLE,
    ACCOUNT_TOKEN,
    DISABLED,
    EXPIRED,
    ROTATED_OLD,
    ROTATED_NEW,
    REVOKED,
    IP_LOCKED,
];

pub fn digest(secret: &str) -> Value {
    json!({"digest": Digester::Sha256.digest_hex(secret.as_bytes())})
}

/// The demo config plus the canary keys and the canary auth token.
pub fn canary_config() -> Value {
    let mut cfg = demo::config();
    cfg["accounts"][0]["auth_tokens"]
        .as_array_mut()
        .unwrap()
        .push(digest(ACCOUNT_TOKEN.secret));
    let keys = cfg["keys"].as_array_mut().unwrap();
    let key = |c: Canary, role: &str| json!({"sid": c.sid, "account_sid": ACCOUNT, "role": role, "secrets": [digest(c.secret)]});
    let mut std_key = key(STD, "standard");
    std_key["apis"] = json!(["calls"]);
    keys.push(std_key);
    keys.push(key(MAIN, "main"));
    keys.push(key(PUBLISHABLE, "publishable"));
    let mut disabled = key(DISABLED, "standard");
    disabled["enabled"] = json!(false);
    keys.push(disabled);
    let mut expired = key(EXPIRED, "standard");
    expired["expires_at"] = json!("2020-01-01T00:00:00Z");
    keys.push(expired);
    keys.push(json!({"sid": ROTATED_NEW.sid, "account_sid": ACCOUNT, "role": "standard", "secrets": [
        digest(ROTATED_NEW.secret),
        {"digest": Digester::Sha256.digest_hex(ROTATED_OLD.secret.as_bytes()), "not_after": "2020-01-01T00:00:00Z"}]}));
    let mut ip = key(IP_LOCKED, "standard");
    ip["allowed_ips"] = json!(["192.0.2.0/24"]);
    keys.push(ip);
    cfg
}

/// `user:secret` in standard base64 with padding (what `Req::basic` sends).
pub fn b64(user: impl AsRef<[u8]>, secret: &[u8]) -> String {
    let mut userpass = user.as_ref().to_vec();
    userpass.push(b':');
    userpass.extend_from_slice(secret);
    STANDARD.encode(userpass)
}

/// Every form in which a canary could leak: plaintext, and `sid:secret` / `secret` in each base64
/// flavour (padding trimmed, so a prefix match catches the padded form too).
pub fn needles() -> Vec<String> {
    let mut out = Vec::new();
    for c in CANARIES {
        out.push(c.secret.to_owned());
        for text in [format!("{}:{}", c.sid, c.secret), c.secret.to_owned()] {
            out.push(STANDARD_NO_PAD.encode(&text));
            out.push(URL_SAFE_NO_PAD.encode(&text));
        }
    }
    out
}

/// What a case must produce.
#[derive(Clone, Debug)]
pub enum Expect {
    /// 200; the upstream got exactly one request with this path and identity (account SID is
    /// always the demo account), and no `Authorization`.
    Allow {
        key: Option<&'static str>,
        role: &'static str,
        api: &'static str,
        upstream_path: String,
    },
    /// keygate's denial: status and reason code, JSON body, nothing upstream.
    Deny(u16, &'static str),
    /// Envoy answered itself before the filter ran (its codec refused the bytes): this status,
    /// not a keygate body, nothing upstream.
    Envoy(u16),
}

/// [`Expect::Allow`] as `key` (a SID, or `None` for account credentials).
pub fn allow(
    key: impl Into<Option<&'static str>>,
    role: &'static str,
    api: &'static str,
    path: &str,
) -> Expect {
    Expect::Allow {
        key: key.into(),
        role,
        api,
        upstream_path: path.to_owned(),
    }
}

pub fn deny(status: u16, code: &'static str) -> Expect {
    Expect::Deny(status, code)
}

pub type Check = Box<dyn Fn(&CapturedRequest)>;

pub struct Case {
    name: String,
    req: Req,
    expect: Expect,
    /// Extra assertions on the one request the upstream received (allowed cases only).
    check: Option<Check>,
}

pub fn case(name: impl Into<String>, req: Req, expect: Expect) -> Case {
    Case {
        name: name.into(),
        req,
        expect,
        check: None,
    }
}

impl Case {
    pub fn with_check(mut self, f: impl Fn(&CapturedRequest) + 'static) -> Case {
        self.check = Some(Box::new(f));
        self
    }
}

/// An Envoy with the canary config, its echo upstream, and what the cases sent so far.
pub struct Bench {
    pub echo: Echo,
    pub envoy: Envoy,
    /// What was sent so far: denials by reason code, and allowed requests (follow-ups included),
    /// for the counters [`Bench::finish`] checks.
    pub denied: BTreeMap<&'static str, u64>,
    pub allowed: u64,
    /// The follow-up proving the VM survived each case.
    follow_up: Req,
    follow_up_key: &'static str,
    /// Cases Envoy itself answered, for the report.
    envoy_answered: Vec<String>,
}

impl Bench {
    pub fn start(builder: EnvoyBuilder) -> Bench {
        let echo = Echo::start();
        let envoy = builder
            .plugin_config_json(&canary_config())
            .component_log_level("wasm:trace")
            .upstream_port(echo.port())
            .start();
        Bench {
            echo,
            envoy,
            denied: BTreeMap::new(),
            allowed: 0,
            follow_up: Req::get(CALLS).basic(STD.sid, STD.secret),
            follow_up_key: STD.sid,
            envoy_answered: Vec::new(),
        }
    }

    /// Starts a bench, runs `cases` on it and checks what it must at the end.
    pub fn run_family(builder: EnvoyBuilder, family: &str, cases: &[Case]) {
        let mut bench = Bench::start(builder);
        bench.run(cases);
        println!("{family}: {} cases", cases.len());
        bench.finish();
    }

    pub fn port(&self) -> u16 {
        self.envoy.port()
    }

    /// Sends a request and returns the response with what the upstream received meanwhile.
    pub fn send(&self, req: &Req) -> (Response, Vec<CapturedRequest>) {
        let before = self.echo.captured().len();
        let r = req.send(self.port());
        (r, self.echo.captured()[before..].to_vec())
    }

    /// Runs every case (and its follow-up), then fails listing every case that failed.
    pub fn run(&mut self, cases: &[Case]) {
        let mut failures = Vec::new();
        for c in cases {
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| self.run_one(c)));
            if let Err(e) = outcome {
                failures.push(format!("[{}] {}", c.name, panic_text(&e)));
            }
            self.assert_alive(&c.name);
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases failed:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }

    fn run_one(&mut self, c: &Case) {
        let name = &c.name;
        let (r, seen) = self.send(&c.req);
        match &c.expect {
            Expect::Allow {
                key,
                role,
                api,
                upstream_path,
            } => {
                assert_eq!(r.status, 200, "case {name:?}: {r:?}");
                assert_eq!(seen.len(), 1, "case {name:?}: upstream saw {seen:?}");
                let s = &seen[0];
                assert_eq!(&s.path, upstream_path, "case {name:?}: upstream path");
                assert_identity(s, Some(ACCOUNT), *key, Some(role), Some(api), name);
                assert!(
                    !s.has_header("authorization"),
                    "case {name:?}: Authorization forwarded"
                );
                if let Some(check) = &c.check {
                    check(s);
                }
                self.allowed += 1;
            }
            Expect::Deny(status, code) => {
                assert_denial(&r, *status, code, name);
                assert!(
                    seen.is_empty(),
                    "case {name:?}: denied but the upstream saw {seen:?}"
                );
                *self.denied.entry(code).or_default() += 1;
            }
            Expect::Envoy(status) => {
                assert_eq!(r.status, *status, "case {name:?}: {r:?}");
                assert!(
                    !r.body_text().contains("\"error\":{\"code\""),
                    "case {name:?}: expected Envoy's own reply, got keygate's: {r:?}"
                );
                assert!(seen.is_empty(), "case {name:?}: upstream saw {seen:?}");
                self.envoy_answered.push(name.clone());
            }
        }
    }

    /// The VM survived: a valid request right after still passes, as the right key.
    pub fn assert_alive(&mut self, after: &str) {
        let (ok, seen) = self.send(&self.follow_up.clone());
        assert_eq!(ok.status, 200, "after case {after:?}: {ok:?}");
        assert_eq!(seen.len(), 1, "after case {after:?}");
        assert_eq!(
            seen[0].header_str("x-keygate-key-sid"),
            Some(self.follow_up_key),
            "after case {after:?}"
        );
        self.allowed += 1;
    }

    /// Counters equal what the cases sent; no canary anywhere; no panic in the log.
    pub fn finish(self) {
        // The access log is flushed every 50 ms; give it time (this waits, it asserts no speed).
        thread::sleep(Duration::from_millis(300));
        for reason in Reason::ALL {
            let code = reason.code();
            let got = self
                .envoy
                .custom_metric(&format!("keygate.denied.{code}"))
                .unwrap_or(0);
            let want = self.denied.get(code).copied().unwrap_or(0);
            assert_eq!(got, want, "counter keygate.denied.{code}");
        }
        assert_eq!(
            self.envoy.custom_metric("keygate.allowed").unwrap_or(0),
            self.allowed,
            "counter keygate.allowed"
        );
        assert_no_canary(&self.envoy, &self.echo.captured());
        let logs = self.envoy.logs();
        for bad in [
            "panicked",
            "Function: proxy_on_request_headers failed",
            "wasm log keygate: cannot send",
        ] {
            assert!(
                !logs.contains(bad),
                "Envoy log contains {bad:?}:\n{}",
                keygate_e2e::envoy::tail(&logs, 60)
            );
        }
        if !self.envoy_answered.is_empty() {
            println!(
                "answered by Envoy before the filter ran: {:?}",
                self.envoy_answered
            );
        }
    }
}

/// The upstream request carries exactly these identity values (one line each, or none).
pub fn assert_identity(
    s: &CapturedRequest,
    account: Option<&str>,
    key: Option<&str>,
    role: Option<&str>,
    api: Option<&str>,
    name: &str,
) {
    for (header, want) in IDENTITY_HEADERS.iter().zip([account, key, role, api]) {
        let got = s.header_all(header);
        match want {
            Some(v) => assert_eq!(got, vec![v.as_bytes()], "case {name:?}: {header} in {s:?}"),
            None => assert!(
                got.is_empty(),
                "case {name:?}: {header} must be absent, got {s:?}"
            ),
        }
    }
}

/// A keygate denial: status, exactly `{"error":{"code","message"}}` with the fixed message,
/// `application/json`, `no-store`, and both challenges on a 401.
pub fn assert_denial(r: &Response, status: u16, code: &str, name: &str) {
    let reason = Reason::ALL
        .into_iter()
        .find(|x| x.code() == code)
        .unwrap_or_else(|| panic!("unknown code {code}"));
    assert_eq!(r.status, status, "case {name:?}: {r:?}");
    assert_eq!(
        u32::from(status),
        reason.status(),
        "case {name:?}: table status"
    );
    assert_eq!(
        r.body_json(),
        json!({"error": {"code": code, "message": reason.message()}}),
        "case {name:?}"
    );
    assert_eq!(
        r.header_str("content-type"),
        Some("application/json"),
        "case {name:?}"
    );
    assert_eq!(
        r.header_str("cache-control"),
        Some("no-store"),
        "case {name:?}"
    );
    let challenges = r.header_all("www-authenticate");
    if status == 401 {
        assert_eq!(
            challenges,
            vec![
                &b"Basic realm=\"keygate\", charset=\"UTF-8\""[..],
                b"Bearer realm=\"keygate\""
            ],
            "case {name:?}"
        );
    } else {
        assert!(challenges.is_empty(), "case {name:?}: {r:?}");
    }
}

/// Fails on any canary, in any form, in Envoy's log, its access log, or anything the upstream
/// received (path, header names and values, body).
pub fn assert_no_canary(envoy: &Envoy, captured: &[CapturedRequest]) {
    let mut places = vec![
        ("Envoy log".to_owned(), envoy.logs()),
        ("access log".to_owned(), envoy.access_log()),
    ];
    for (i, s) in captured.iter().enumerate() {
        let mut text = s.path.clone();
        for (n, v) in &s.headers {
            text.push_str(&format!("\n{n}: {}", String::from_utf8_lossy(v)));
        }
        text.push('\n');
        text.push_str(&String::from_utf8_lossy(&s.body));
        places.push((format!("upstream request #{i}"), text));
    }
    for needle in needles() {
        for (place, text) in &places {
            assert!(
                !text.contains(&needle),
                "canary {needle:?} leaked into the {place}"
            );
        }
    }
    // The scan is not vacuous: the marker is what the needles share.
    assert!(needles().iter().filter(|n| n.contains("CANARY")).count() == CANARIES.len());
}

pub fn panic_text(e: &Box<dyn Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

pub fn auth(value: impl AsRef<[u8]>) -> Req {
    Req::get(CALLS).header("authorization", value)
}
