//! The control plane is a door of its own and keeps every promise the edge keeps: restricted
//! keys are refused with the edge's reason codes, nothing escalates through management, caps
//! and limiters answer with exact errors. Every test runs a real control plane on a real socket
//! (127.0.0.1, port 0) and talks HTTP to it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{edge_decides, key_path, keys_path, now_unix, Auth, InProc, Resp};
use keygate_control::{Caps, Config, ControlLimits};
use keygate_core::config::RateDoc;
use serde_json::{json, Value};

fn v1_keys(ac: &str) -> String {
    format!("/v1/accounts/{ac}/keys")
}

/// `(status, code)` of an error reply in either shape (`/v1` or Twilio's, whose `reason` is
/// keygate's code).
fn refusal(r: &Resp) -> (u16, String) {
    let j = r.json();
    let code = j["error"]["code"]
        .as_str()
        .or(j["reason"].as_str())
        .unwrap_or("")
        .to_owned();
    (r.status, code)
}

async fn new_key(s: &InProc, body: Value) -> (String, String, Value) {
    let r = s
        .client
        .json("POST", &v1_keys(&s.creds.account_sid), &s.admin(), body)
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let j = r.json();
    (
        j["sid"].as_str().unwrap().to_owned(),
        j["secret"].as_str().unwrap().to_owned(),
        j,
    )
}

fn rfc3339(t: u64) -> String {
    keygate_control::model::rfc3339(i64::try_from(t).unwrap())
}

/// The attacks of the issue, tried against a running control plane: a `main` key limited to an
/// address range is refused from any other address, on every management route, in both shapes,
/// with the edge's `ip_not_allowed`; the edge, compiling the same feed, decides the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_main_key_limited_to_other_addresses_is_refused_everywhere_as_at_the_edge() {
    let s = InProc::start().await;
    let (c, ac) = (&s.client, s.creds.account_sid.clone());
    let (sid, secret, _) =
        new_key(&s, json!({"role": "main", "allowed_ips": ["192.0.2.0/24"]})).await;
    let feed = c.feed(&s.creds.edge).await;
    for auth in [Auth::basic(&sid, &secret), Auth::bearer(&secret)] {
        let attempts: Vec<(&str, String, Option<Value>)> = vec![
            ("GET", keys_path(&ac), None),
            ("GET", v1_keys(&ac), None),
            ("POST", v1_keys(&ac), Some(json!({"role": "main"}))),
            (
                "PATCH",
                format!("/v1/accounts/{ac}/keys/{sid}"),
                Some(json!({"allowed_ips": null})),
            ),
            (
                "PATCH",
                format!("/v1/accounts/{ac}"),
                Some(json!({"allowed_ips": null})),
            ),
            (
                "POST",
                format!("/v1/accounts/{ac}/keys/{sid}/regenerate"),
                Some(json!({})),
            ),
            ("DELETE", format!("/v1/accounts/{ac}/keys/{sid}"), None),
        ];
        for (method, path, body) in attempts {
            let r = match body {
                Some(b) => c.json(method, &path, &auth, b).await,
                None => c.send(method, &path, &auth, None, &[]).await,
            };
            assert_eq!(
                refusal(&r),
                (403, "ip_not_allowed".to_owned()),
                "{method} {path}: {}",
                r.text
            );
        }
        let r = c
            .post_form(&keys_path(&ac), &auth, &[("KeyType", "main")])
            .await;
        assert_eq!(refusal(&r), (403, "ip_not_allowed".to_owned()));
        assert_eq!(r.json()["code"], 20403, "Twilio's shape: {}", r.text);
        assert_eq!(
            edge_decides(&feed, "POST", &keys_path(&ac), &auth, now_unix()),
            Err("ip_not_allowed".to_owned()),
            "the edge decides the same"
        );
    }
    // Nothing changed: the key still has its allowlist, no key was created.
    let r = c.get(&v1_keys(&ac), &s.admin()).await;
    assert_eq!(r.json()["keys"].as_array().unwrap().len(), 1);
    assert_eq!(r.json()["keys"][0]["allowed_ips"], json!(["192.0.2.0/24"]));

    // The account's own allowlist binds every credential of the account, its auth token too.
    let r = c
        .json(
            "PATCH",
            &format!("/v1/accounts/{ac}"),
            &s.admin(),
            json!({"allowed_ips": ["198.51.100.0/24"]}),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = c.get(&v1_keys(&ac), &s.account_auth()).await;
    assert_eq!(refusal(&r), (403, "ip_not_allowed".to_owned()));
}

/// A `main` key limited to `apis: ["calls"]` may not manage keys anywhere (403
/// `permission_denied`, the edge's answer on the same Twilio path) nor lift its own limit;
/// standard and publishable keys are refused the same way; another account's path is the
/// edge's 404 `account_mismatch`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_permissions_roles_and_the_account_binding_are_the_edges() {
    let s = InProc::start().await;
    let (c, ac) = (&s.client, s.creds.account_sid.clone());
    let (sid, secret, _) = new_key(&s, json!({"role": "main", "apis": ["calls"]})).await;
    let (std_sid, std_secret, _) = new_key(&s, json!({"role": "standard"})).await;
    let feed = c.feed(&s.creds.edge).await;
    let calls_only = Auth::basic(&sid, &secret);
    let standard = Auth::basic(&std_sid, &std_secret);
    for auth in [&calls_only, &standard] {
        let r = c
            .post_form(&keys_path(&ac), auth, &[("KeyType", "main")])
            .await;
        assert_eq!(
            refusal(&r),
            (403, "permission_denied".to_owned()),
            "{}",
            r.text
        );
        assert_eq!(
            edge_decides(&feed, "POST", &keys_path(&ac), auth, now_unix()),
            Err("permission_denied".to_owned())
        );
        let r = c.json("POST", &v1_keys(&ac), auth, json!({})).await;
        assert_eq!(refusal(&r), (403, "permission_denied".to_owned()));
        let r = c
            .json(
                "PATCH",
                &format!("/v1/accounts/{ac}/keys/{sid}"),
                auth,
                json!({"apis": null}),
            )
            .await;
        assert_eq!(refusal(&r), (403, "permission_denied".to_owned()));
    }
    // A key listing "keys" may manage; the edge agrees.
    let (mgr, mgr_secret, _) =
        new_key(&s, json!({"role": "main", "apis": ["calls", "keys"]})).await;
    let manager = Auth::basic(&mgr, &mgr_secret);
    let feed = c.feed(&s.creds.edge).await;
    assert_eq!(c.get(&keys_path(&ac), &manager).await.status, 200);
    assert_eq!(
        edge_decides(&feed, "GET", &keys_path(&ac), &manager, now_unix()),
        Ok("keys".to_owned())
    );
    // Another account: the edge's 404 account_mismatch; operator routes: 403.
    let r = c.json("POST", "/v1/accounts", &s.admin(), json!({})).await;
    let other = r.json()["sid"].as_str().unwrap().to_owned();
    let r = c.get(&keys_path(&other), &manager).await;
    assert_eq!(refusal(&r), (404, "account_mismatch".to_owned()));
    let r = c.get(&v1_keys(&other), &manager).await;
    assert_eq!(refusal(&r), (404, "account_mismatch".to_owned()));
    let r = c.json("POST", "/v1/accounts", &manager, json!({})).await;
    assert_eq!(refusal(&r), (403, "forbidden".to_owned()));
    // Unknown key, wrong secret, malformed header: the edge's 401 / 400, byte-identical 401s.
    let wrong = c
        .get(&keys_path(&ac), &Auth::basic(&mgr, "sk_live_nope"))
        .await;
    let unknown = c
        .get(
            &keys_path(&ac),
            &Auth::basic("SK0123456789abcdef0123456789abcdef", "x"),
        )
        .await;
    assert_eq!(refusal(&wrong), (401, "invalid_credentials".to_owned()));
    assert_eq!(wrong.text, unknown.text);
    let two = c
        .send(
            "GET",
            &v1_keys(&ac),
            &Auth::None,
            None,
            &[("authorization", "Bearer a"), ("authorization", "Bearer b")],
        )
        .await;
    assert_eq!(refusal(&two), (400, "multiple_credentials".to_owned()));
}

/// No escalation through management: a restricted main key can create, edit and regenerate only
/// keys within what it holds itself; each rule refuses with its own code, nothing is clamped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restricted_main_key_cannot_make_a_key_that_holds_more_than_itself() {
    let s = InProc::start().await;
    let (c, ac) = (&s.client, s.creds.account_sid.clone());
    let expiry = now_unix() + 86_400;
    let (sid, secret, _) = new_key(
        &s,
        json!({"role": "main", "apis": ["calls", "keys"], "allowed_ips": ["127.0.0.0/8"],
               "expires_at": rfc3339(expiry)}),
    )
    .await;
    let (unrestricted, _, _) = new_key(&s, json!({"role": "main"})).await;
    let me = Auth::basic(&sid, &secret);
    let within = json!({"role": "standard", "apis": ["calls"], "allowed_ips": ["127.0.0.1"],
                        "expires_at": rfc3339(expiry - 60)});
    let with = |k: &str, v: Value| {
        let mut b = within.clone();
        b[k] = v;
        b
    };
    let cases = [
        (with("apis", Value::Null), "escalation_apis"),
        (
            with("apis", json!(["calls", "messages"])),
            "escalation_apis",
        ),
        (with("allowed_ips", Value::Null), "escalation_allowed_ips"),
        (
            with("allowed_ips", json!(["127.0.0.1", "10.0.0.0/8"])),
            "escalation_allowed_ips",
        ),
        (
            with("allowed_ips", json!(["0.0.0.0/1"])),
            "escalation_allowed_ips",
        ),
        (with("expires_at", Value::Null), "escalation_expiry"),
        (
            with("expires_at", json!(rfc3339(expiry + 1))),
            "escalation_expiry",
        ),
    ];
    for (body, code) in &cases {
        let r = c.json("POST", &v1_keys(&ac), &me, body.clone()).await;
        assert_eq!(refusal(&r), (403, (*code).to_owned()), "{body}: {}", r.text);
    }
    // Within every bound: created.
    let r = c.json("POST", &v1_keys(&ac), &me, within.clone()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let made = r.json()["sid"].as_str().unwrap().to_owned();
    // Lifting its own restrictions, or widening what it made: refused.
    let own = format!("/v1/accounts/{ac}/keys/{sid}");
    for (patch, code) in [
        (json!({"allowed_ips": null}), "escalation_allowed_ips"),
        (json!({"apis": null}), "escalation_apis"),
        (json!({"expires_at": null}), "escalation_expiry"),
    ] {
        let r = c.json("PATCH", &own, &me, patch.clone()).await;
        assert_eq!(refusal(&r), (403, code.to_owned()), "{patch}");
        let r = c
            .json(
                "PATCH",
                &format!("/v1/accounts/{ac}/keys/{made}"),
                &me,
                patch.clone(),
            )
            .await;
        assert_eq!(refusal(&r), (403, code.to_owned()), "{patch}");
    }
    // Narrowing is fine.
    let r = c.json("PATCH", &own, &me, json!({"apis": ["keys"]})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Regenerating a key that holds more would hand over a credential it does not hold.
    let r = c
        .json(
            "POST",
            &format!("/v1/accounts/{ac}/keys/{unrestricted}/regenerate"),
            &me,
            json!({}),
        )
        .await;
    assert_eq!(refusal(&r), (403, "escalation_apis".to_owned()));
    // Twilio's create cannot carry restrictions: refused in Twilio's shape, with the rule.
    let r = c
        .post_form(&keys_path(&ac), &me, &[("KeyType", "standard")])
        .await;
    assert_eq!(refusal(&r), (403, "escalation_apis".to_owned()));
    assert_eq!(r.json()["code"], 20403);
    // The account's allowlist: a key may narrow it within its own, not lift or widen it.
    let acct = format!("/v1/accounts/{ac}");
    let r = c
        .json("PATCH", &acct, &me, json!({"allowed_ips": ["10.0.0.0/8"]}))
        .await;
    assert_eq!(refusal(&r), (403, "escalation_allowed_ips".to_owned()));
    let r = c
        .json(
            "PATCH",
            &acct,
            &s.admin(),
            json!({"allowed_ips": ["127.0.0.0/8", "192.0.2.0/24"]}),
        )
        .await;
    assert_eq!(r.status, 200);
    for list in [
        Value::Null,
        json!(["127.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24"]),
    ] {
        let r = c
            .json("PATCH", &acct, &me, json!({ "allowed_ips": list }))
            .await;
        assert_eq!(
            refusal(&r),
            (403, "escalation_allowed_ips".to_owned()),
            "{list}"
        );
    }
    let r = c
        .json("PATCH", &acct, &me, json!({"allowed_ips": ["127.0.0.0/8"]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = c
        .json("PATCH", &acct, &me, json!({"status": "suspended"}))
        .await;
    assert_eq!(refusal(&r), (403, "escalation_denied".to_owned()));
    // Account credentials hold the whole account; the admin everything.
    let r = c
        .json(
            "PATCH",
            &acct,
            &s.account_auth(),
            json!({"allowed_ips": null}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = c
        .json(
            "POST",
            &v1_keys(&ac),
            &s.account_auth(),
            json!({"role": "main"}),
        )
        .await;
    assert_eq!(r.status, 201);
    // Nothing above changed the keys it was refused on.
    let r = c.get(&own, &s.admin()).await;
    assert_eq!(r.json()["allowed_ips"], json!(["127.0.0.0/8"]));
    assert_eq!(r.json()["apis"], json!(["keys"]));
}

fn config_with(caps: Caps, limits: ControlLimits) -> Config {
    Config {
        caps,
        limits,
        ..Config::with_built_in_catalog().unwrap()
    }
}

/// Every cap refuses with its exact error, and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cap_refuses_with_its_exact_error() {
    let caps = Caps {
        keys_per_account: 3,
        allowlist_entries: 2,
        secrets_in_grace: 1,
        regenerations_per_hour: 3,
        body_bytes: 300,
    };
    let s = InProc::start_with(config_with(caps, ControlLimits::default())).await;
    let (c, ac) = (&s.client, s.creds.account_sid.clone());
    let admin = s.admin();
    // Allowlist entries, on a key and on the account.
    let r = c
        .json(
            "POST",
            &v1_keys(&ac),
            &admin,
            json!({"allowed_ips": ["10.0.0.1", "10.0.0.2", "10.0.0.3"]}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error"]["message"],
        "allowed_ips: at most 2 entries (--max-allowlist-entries); got 3"
    );
    let r = c
        .json(
            "PATCH",
            &format!("/v1/accounts/{ac}"),
            &admin,
            json!({"allowed_ips": ["10.0.0.1", "10.0.0.2", "10.0.0.3"]}),
        )
        .await;
    assert_eq!(r.status, 400);
    // Keys per account: the 4th is refused, in both shapes.
    let mut keys = Vec::new();
    for _ in 0..3 {
        let r = c.json("POST", &v1_keys(&ac), &admin, json!({})).await;
        assert_eq!(r.status, 201);
        keys.push(r.json()["sid"].as_str().unwrap().to_owned());
    }
    let r = c.json("POST", &v1_keys(&ac), &admin, json!({})).await;
    assert_eq!(refusal(&r), (409, "too_many_keys".to_owned()));
    assert_eq!(
        r.json()["error"]["message"],
        "the account already has 3 keys, the most it may hold (--max-keys-per-account 3); delete one first"
    );
    let r = c.post_form(&keys_path(&ac), &admin, &[]).await;
    assert_eq!(refusal(&r), (409, "too_many_keys".to_owned()));
    assert_eq!(r.json()["code"], 20409);
    // Secrets in grace: one regeneration with grace leaves one in grace; a second is refused.
    let regen = format!("/v1/accounts/{ac}/keys/{}/regenerate", keys[0]);
    assert_eq!(c.json("POST", &regen, &admin, json!({})).await.status, 200);
    let r = c.json("POST", &regen, &admin, json!({})).await;
    assert_eq!(refusal(&r), (409, "too_many_secrets_in_grace".to_owned()));
    // ... and with grace 0 it goes through (every older secret ends now).
    let r = c
        .json("POST", &regen, &admin, json!({"grace_seconds": 0}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["secrets"].as_array().unwrap().len(), 1);
    // Regenerations per hour: 3 counted (the refused one was rolled back), the 4th is 429.
    let r = c
        .json("POST", &regen, &admin, json!({"grace_seconds": 0}))
        .await;
    assert_eq!(r.status, 200);
    let r = c
        .json("POST", &regen, &admin, json!({"grace_seconds": 0}))
        .await;
    assert_eq!(refusal(&r), (429, "too_many_regenerations".to_owned()));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((3500..=3600).contains(&retry), "{retry}");
    // Body size.
    let big = json!({"friendly_name": "x".repeat(400)});
    let r = c.json("POST", &v1_keys(&ac), &admin, big).await;
    assert_eq!(refusal(&r), (413, "body_too_large".to_owned()));
    assert_eq!(
        r.json()["error"]["message"],
        "the request body must be at most 300 bytes (--max-body-bytes)"
    );
    // Nothing was lost: 3 keys, the first with one secret.
    let r = c.get(&v1_keys(&ac), &admin).await;
    assert_eq!(r.json()["keys"].as_array().unwrap().len(), 3);
    let r = c.get(&key_path(&ac, &keys[1]), &admin).await;
    assert_eq!(r.status, 200);
}

/// The failed-authentication limiter (per client address, the edge's) answers 429
/// `too_many_failed_auth` with `Retry-After` once a guesser is over its limit, even for a right
/// secret; a per-credential rate limits each key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_and_a_credentials_rate_are_limited_with_429() {
    let limits = ControlLimits {
        failed_auth: Some(RateDoc {
            requests: 5,
            per: "1m".to_owned(),
            shadow: false,
            scope: Default::default(),
        }),
        credential_rate: Some(RateDoc {
            requests: 8,
            per: "1m".to_owned(),
            shadow: false,
            scope: Default::default(),
        }),
    };
    let s = InProc::start_with(config_with(Caps::default(), limits)).await;
    let (c, ac) = (&s.client, s.creds.account_sid.clone());
    let (sid, secret, _) = new_key(&s, json!({"role": "main"})).await;
    let good = Auth::basic(&sid, &secret);
    // The credential's rate: 8 a minute, then 429 rate_limited_key with Retry-After.
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(c.get(&keys_path(&ac), &good).await.status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 200, 200, 429, 429]);
    let r = c.get(&v1_keys(&ac), &good).await;
    assert_eq!(refusal(&r), (429, "rate_limited_key".to_owned()));
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    // Operator tokens are not limited by it.
    for _ in 0..10 {
        assert_eq!(c.get(&v1_keys(&ac), &s.admin()).await.status, 200);
    }
    // Failed authentications from this address: 5, then 429 even with the account's token.
    for i in 0..5 {
        let r = c
            .get(&v1_keys(&ac), &Auth::basic(&sid, "sk_live_wrong"))
            .await;
        assert_eq!(r.status, 401, "attempt {i}");
    }
    let r = c
        .get(&v1_keys(&ac), &Auth::basic(&sid, "sk_live_wrong"))
        .await;
    assert_eq!(refusal(&r), (429, "too_many_failed_auth".to_owned()));
    assert!(r.header("retry-after").is_some());
    let r = c.get(&v1_keys(&ac), &s.account_auth()).await;
    assert_eq!(refusal(&r), (429, "too_many_failed_auth".to_owned()));
    // Operator tokens never meet the limiter: the admin and the edges behind the same address
    // as a guesser keep working (the feed must not stall).
    assert_eq!(c.get(&v1_keys(&ac), &s.admin()).await.status, 200);
    assert_eq!(
        c.get("/v1/edge/changes", &Auth::bearer(&s.creds.edge))
            .await
            .status,
        200
    );
    // A wrong operator-looking token is a failed authentication like any other.
    let r = c
        .get(&v1_keys(&ac), &Auth::bearer("kg_admin_00000000"))
        .await;
    assert_eq!(refusal(&r), (429, "too_many_failed_auth".to_owned()));
    // Requests without credentials do not count and are not refused by it.
    let r = c.get(&v1_keys(&ac), &Auth::None).await;
    assert_eq!(refusal(&r), (401, "missing_credentials".to_owned()));
}

/// The client address is the TCP peer; `X-Forwarded-For` is believed only from a trusted proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    let s = InProc::start().await;
    let (c, ac) = (&s.client, s.creds.account_sid.clone());
    let (sid, secret, _) =
        new_key(&s, json!({"role": "main", "allowed_ips": ["192.0.2.0/24"]})).await;
    let auth = Auth::basic(&sid, &secret);
    // Untrusted peer (no proxies configured): a forged header changes nothing.
    let r = c
        .send(
            "GET",
            &v1_keys(&ac),
            &auth,
            None,
            &[("x-forwarded-for", "192.0.2.7")],
        )
        .await;
    assert_eq!(refusal(&r), (403, "ip_not_allowed".to_owned()));
    drop(s);

    let mut config = Config::with_built_in_catalog().unwrap();
    config.trusted_proxies =
        Some(keygate_core::ip::IpAllowlist::parse(&["127.0.0.0/8".to_owned()]).unwrap());
    let s = InProc::start_with(config).await;
    let (c, ac) = (&s.client, s.creds.account_sid.clone());
    let (sid, secret, _) =
        new_key(&s, json!({"role": "main", "allowed_ips": ["192.0.2.0/24"]})).await;
    let auth = Auth::basic(&sid, &secret);
    let via = |xff: &'static str| {
        let (c, auth, path) = (c.clone(), auth.clone(), v1_keys(&ac));
        async move {
            c.send("GET", &path, &auth, None, &[("x-forwarded-for", xff)])
                .await
                .status
        }
    };
    assert_eq!(via("192.0.2.7").await, 200);
    // The right-most entry is the one the trusted proxy saw; a client-written one left of it
    // proves nothing.
    assert_eq!(via("192.0.2.7, 198.51.100.1").await, 403);
    assert_eq!(via("198.51.100.1, 192.0.2.7").await, 200);
    assert_eq!(via("nonsense").await, 403);
    // No header: the peer (127.0.0.1) is the client.
    assert_eq!(c.get(&v1_keys(&ac), &auth).await.status, 403);
}
