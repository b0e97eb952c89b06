//! The REST API over a real socket: every status code, the secret-once rule, Twilio
//! compatibility (form bodies, RFC 2822 dates, paging, the 64-character FriendlyName), and
//! keygate's account and key extensions as the edge sees them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use keygate_core::secret_format::is_well_formed;
use serde_json::{json, Value};

/// Runs the real binary and checks every status code the API has; then scans every response,
/// the database files and the logs: each secret appears in exactly the one response that
/// created it, and nowhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_code_and_each_secret_only_in_its_one_response() {
    let dir = tempfile::tempdir().unwrap();
    let db = test_database(dir.path());
    let (creds, init_logs) = init_with_binary(&db);
    let server = Binary::spawn(&db);
    // The suite runs on the backend it was asked for (`KEYGATE_TEST_BACKEND`).
    assert!(
        server
            .logs()
            .contains(&format!("\"database\":\"{}\"", db.display())),
        "{}",
        server.logs()
    );
    let c = server.client();
    let ac = creds.account_sid.clone();
    let account = Auth::basic(&ac, &creds.auth_token);
    // (secret, number of responses that may contain it)
    let mut secrets: Vec<(String, usize)> = vec![
        (creds.admin.clone(), 0),
        (creds.auth_token.clone(), 0),
        (creds.edge.clone(), 0),
    ];

    // 401: no credential, wrong secret, unknown SID, malformed header; Twilio's error shape.
    let r = c.get(&keys_path(&ac), &Auth::None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["code"], 20003);
    assert_eq!(r.json()["status"], 401);
    assert_eq!(
        r.json()["more_info"],
        "https://www.twilio.com/docs/errors/20003"
    );
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .starts_with("Basic realm=\"keygate\""));
    let wrong = c
        .get(&keys_path(&ac), &Auth::basic(&ac, "at_live_wrong"))
        .await;
    let unknown = c
        .get(
            &keys_path(&ac),
            &Auth::basic("SK00000000000000000000000000000000", "x"),
        )
        .await;
    assert_eq!((wrong.status, unknown.status), (401, 401));
    assert_eq!(
        wrong.text, unknown.text,
        "unknown key and wrong secret are indistinguishable"
    );
    // The edge's parser and reason: a header that does not parse is 400 malformed_credentials.
    let r = c.get(&keys_path(&ac), &Auth::Raw("Basic !!!".into())).await;
    assert_eq!(
        (
            r.status,
            r.json()["code"].as_i64(),
            r.json()["reason"].as_str()
        ),
        (400, Some(20001), Some("malformed_credentials"))
    );

    // 201: keys of each role through the Twilio path (KeyType is keygate's extension).
    let create = |fields: Vec<(&'static str, &'static str)>| {
        let c = c.clone();
        let account = account.clone();
        let ac = ac.clone();
        async move { c.post_form(&keys_path(&ac), &account, &fields).await }
    };
    let main = create(vec![("FriendlyName", "ops main"), ("KeyType", "main")]).await;
    assert_eq!(main.status, 201, "{}", main.text);
    let std_key = create(vec![("FriendlyName", "billing service")]).await;
    let pub_key = create(vec![("KeyType", "publishable")]).await;
    assert_eq!((std_key.status, pub_key.status), (201, 201));
    let (main_sid, main_secret) = sid_secret(&main.json());
    let (std_sid, std_secret) = sid_secret(&std_key.json());
    let (pub_sid, pub_secret) = sid_secret(&pub_key.json());
    for s in [&main_secret, &std_secret, &pub_secret] {
        assert!(is_well_formed(s.as_bytes()), "{s}");
        secrets.push((s.clone(), 1));
    }
    assert!(pub_secret.starts_with("pk_live_") && std_secret.starts_with("sk_live_"));
    let main_auth = Auth::basic(&main_sid, &main_secret);

    // 200: fetch and list (with the main key, Basic and Bearer) never show the secret.
    let r = c.get(&key_path(&ac, &std_sid), &main_auth).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["friendly_name"], "billing service");
    assert!(r.json().get("secret").is_none());
    let r = c.get(&keys_path(&ac), &Auth::bearer(&main_secret)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["keys"].as_array().unwrap().len(), 3);
    assert!(!r.text.contains("secret"));

    // 403: standard and publishable keys may not manage keys (Basic or Bearer).
    for auth in [
        Auth::basic(&std_sid, &std_secret),
        Auth::bearer(&std_secret),
        Auth::basic(&pub_sid, &pub_secret),
    ] {
        let r = c.get(&keys_path(&ac), &auth).await;
        assert_eq!(r.status, 403, "{auth:?}");
        assert_eq!(r.json()["code"], 20403);
        let r = c
            .post_form(&keys_path(&ac), &auth, &[("KeyType", "main")])
            .await;
        assert_eq!(r.status, 403);
    }
    // ... nor may edge tokens; and only the admin may create accounts.
    assert_eq!(
        c.get(&keys_path(&ac), &Auth::bearer(&creds.edge))
            .await
            .status,
        403
    );
    let r = c.json("POST", "/v1/accounts", &main_auth, json!({})).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "forbidden");

    // 201 on keygate's path: a second account, by the admin; its auth token is shown once.
    let r = c
        .json(
            "POST",
            "/v1/accounts",
            &Auth::bearer(&creds.admin),
            json!({"friendly_name": "tenant b"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let acb = r.json()["sid"].as_str().unwrap().to_owned();
    let tok_b = r.json()["auth_token"].as_str().unwrap().to_owned();
    secrets.push((tok_b.clone(), 1));
    let account_b = Auth::basic(&acb, &tok_b);

    // 404: unknown key SID, another account's path, another account's key, unknown route.
    let r = c
        .get(
            &key_path(&ac, "SK0123456789abcdef0123456789abcdef"),
            &account,
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], 20404);
    assert_eq!(c.get(&keys_path(&acb), &main_auth).await.status, 404);
    assert_eq!(
        c.get(&key_path(&acb, &std_sid), &account_b).await.status,
        404
    );
    assert_eq!(
        c.send("DELETE", &key_path(&acb, &std_sid), &account_b, None, &[])
            .await
            .status,
        404
    );
    assert_eq!(
        c.get(&keys_path("ACnope"), &Auth::bearer(&creds.admin))
            .await
            .status,
        404
    );
    assert_eq!(
        c.get("/v1/accounts/ACnope", &Auth::bearer(&creds.admin))
            .await
            .status,
        404
    );
    let r = c.get("/nothing/here", &account).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (404, Some("not_found"))
    );

    // 400: the message names the field.
    let long = "x".repeat(65);
    let r = c
        .post_form(
            &keys_path(&ac),
            &account,
            &[("FriendlyName", long.as_str())],
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["message"],
        "FriendlyName: must be at most 64 characters"
    );
    assert_eq!(r.json()["code"], 20001);
    let r = c
        .post_form(&keys_path(&ac), &account, &[("KeyType", "root")])
        .await;
    assert_eq!(
        (
            r.status,
            r.json()["message"]
                .as_str()
                .unwrap()
                .starts_with("KeyType: ")
        ),
        (400, true)
    );
    let r = c
        .get(&format!("{}?PageSize=0", keys_path(&ac)), &account)
        .await;
    assert_eq!(
        (
            r.status,
            r.json()["message"]
                .as_str()
                .unwrap()
                .starts_with("PageSize: ")
        ),
        (400, true)
    );
    let v1_keys = format!("/v1/accounts/{ac}/keys");
    for (body, field) in [
        (
            json!({"apis": ["calls", "nope"]}),
            "apis[1]: unknown API \"nope\"",
        ),
        (
            json!({"role": "publishable", "apis": ["calls"]}),
            "apis[0]: a publishable key can never call \"calls\"",
        ),
        (
            json!({"allowed_ips": ["10.0.0/8"]}),
            "allowed_ips[0]: invalid CIDR \"10.0.0/8\"",
        ),
        (
            json!({"limits": {"rate": {"requests": 10, "per": "soon"}}}),
            "limits.rate.per: invalid duration",
        ),
        (json!({"role": "admin"}), "role: unknown variant"),
        (
            json!({"expires_at": "tomorrow"}),
            "expires_at: invalid RFC 3339 time",
        ),
        (
            json!({"colour": "red"}),
            "colour: unknown field `colour`, expected one of",
        ),
    ] {
        let r = c.json("POST", &v1_keys, &account, body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.starts_with(field), "{body}: {msg}");
        assert_eq!(r.json()["error"]["code"], "invalid_request");
    }
    let r = c
        .json(
            "POST",
            &format!("/v1/accounts/{ac}/keys/{main_sid}/regenerate"),
            &account,
            json!({"grace_seconds": -1}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("grace_seconds: "));

    // 200: update the friendly name (Twilio's POST to the instance).
    let r = c
        .post_form(
            &key_path(&ac, &std_sid),
            &main_auth,
            &[("FriendlyName", "billing v2")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["friendly_name"], "billing v2");

    // 200: regenerate the main key; the new secret is shown once, the old one still works.
    let r = c
        .json(
            "POST",
            &format!("/v1/accounts/{ac}/keys/{main_sid}/regenerate"),
            &account,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let rotated = r.json()["secret"].as_str().unwrap().to_owned();
    secrets.push((rotated.clone(), 1));
    assert_eq!(c.get(&keys_path(&ac), &main_auth).await.status, 200);
    assert_eq!(
        c.get(&keys_path(&ac), &Auth::basic(&main_sid, &rotated))
            .await
            .status,
        200
    );

    // 200 and 304 on the feed.
    let r = c.get("/v1/edge/config", &Auth::bearer(&creds.edge)).await;
    assert_eq!(r.status, 200);
    let etag = r.header("etag").unwrap();
    let r = c
        .send(
            "GET",
            "/v1/edge/config",
            &Auth::bearer(&creds.edge),
            None,
            &[("if-none-match", &etag)],
        )
        .await;
    assert_eq!((r.status, r.text.as_str()), (304, ""));

    // 204: delete = revoke; the key is gone and its secret no longer authenticates.
    let r = c.delete(&key_path(&ac, &std_sid), &main_auth).await;
    assert_eq!((r.status, r.text.as_str()), (204, ""));
    assert_eq!(
        c.get(&key_path(&ac, &std_sid), &main_auth).await.status,
        404
    );
    assert_eq!(
        c.get(&keys_path(&ac), &Auth::basic(&std_sid, &std_secret))
            .await
            .status,
        401
    );
    assert_eq!(
        c.delete(&key_path(&ac, &std_sid), &main_auth).await.status,
        404
    );

    // 405 on a known path, in the right shape.
    let r = c.send("PUT", &keys_path(&ac), &account, None, &[]).await;
    assert_eq!(r.status, 405);

    // The secret-once rule, over every response of this test, the database files and the logs.
    let responses = c.responses();
    let db_files = db_bytes(&db);
    let logs = format!("{init_logs}{}", server.logs());
    assert!(
        logs.contains("\"message\":\"key created\""),
        "logs were captured"
    );
    for (secret, shown) in &secrets {
        let n = responses
            .iter()
            .filter(|r| r.contains(secret.as_str()))
            .count();
        assert_eq!(n, *shown, "{secret} appears in {n} responses");
        assert_eq!(
            count(&db_files, secret),
            0,
            "a plaintext secret is in the database files"
        );
        assert!(
            !logs.contains(secret.as_str()),
            "a plaintext secret is in the logs"
        );
        // Not even the random part without its prefix.
        let body = &secret[secret.len() - 38..];
        assert_eq!(count(&db_files, body), 0);
        assert!(responses.iter().filter(|r| r.contains(body)).count() == *shown);
    }
}

fn sid_secret(v: &Value) -> (String, String) {
    (
        v["sid"].as_str().unwrap().to_owned(),
        v["secret"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_list_pages_sorted_by_date_updated_with_twilio_paging_fields() {
    let s = InProc::start().await;
    let (c, ac, auth) = (&s.client, s.creds.account_sid.clone(), s.account_auth());
    let mut created = Vec::new();
    for i in 0..5 {
        let r = c
            .post_form(
                &keys_path(&ac),
                &auth,
                &[("FriendlyName", &format!("key {i}"))],
            )
            .await;
        assert_eq!(r.status, 201);
        created.push(r.json()["sid"].as_str().unwrap().to_owned());
    }
    let first = c
        .get(&format!("{}?PageSize=2", keys_path(&ac)), &auth)
        .await
        .json();
    let base = keys_path(&ac);
    assert_eq!(first["page"], 0);
    assert_eq!(first["page_size"], 2);
    assert_eq!(first["start"], 0);
    assert_eq!(first["end"], 1);
    assert_eq!(first["uri"], format!("{base}?PageSize=2&Page=0"));
    assert_eq!(first["first_page_uri"], format!("{base}?PageSize=2&Page=0"));
    assert_eq!(first["previous_page_uri"], Value::Null);
    let mut seen: Vec<Value> = first["keys"].as_array().unwrap().clone();
    // Follow next_page_uri verbatim, as Twilio's helper libraries do.
    let mut page = first;
    let mut pages = 1;
    while let Some(next) = page["next_page_uri"].as_str() {
        assert!(next.contains("PageToken="), "{next}");
        page = c.get(next, &auth).await.json();
        pages += 1;
        assert_eq!(
            page["previous_page_uri"],
            format!("{base}?PageSize=2&Page={}", pages - 2)
        );
        seen.extend(page["keys"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(pages, 3);
    assert_eq!(
        (page["start"].as_u64(), page["end"].as_u64()),
        (Some(4), Some(4))
    );
    let sids: Vec<String> = seen
        .iter()
        .map(|k| k["sid"].as_str().unwrap().to_owned())
        .collect();
    let mut want = created.clone();
    want.sort();
    let mut got = sids.clone();
    got.sort();
    assert_eq!(got, want);
    // Sorted by date_updated: touch the first key, it moves to the end.
    assert_eq!(
        c.post_form(
            &key_path(&ac, &created[0]),
            &auth,
            &[("FriendlyName", "touched")]
        )
        .await
        .status,
        200
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        c.post_form(
            &key_path(&ac, &created[0]),
            &auth,
            &[("FriendlyName", "touched")]
        )
        .await
        .status,
        200
    );
    let all = c
        .get(&format!("{}?PageSize=50", keys_path(&ac)), &auth)
        .await
        .json();
    let keys = all["keys"].as_array().unwrap();
    assert_eq!(keys.last().unwrap()["sid"], created[0].as_str());
    let dates: Vec<i64> = keys
        .iter()
        .map(|k| {
            chrono::DateTime::parse_from_rfc2822(k["date_updated"].as_str().unwrap())
                .unwrap()
                .timestamp()
        })
        .collect();
    assert!(dates.windows(2).all(|w| w[0] <= w[1]), "{dates:?}");
    assert_eq!(all["next_page_uri"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_resource_fields_dates_form_bodies_and_friendly_name_limit() {
    let s = InProc::start().await;
    let (c, ac, auth) = (&s.client, s.creds.account_sid.clone(), s.account_auth());
    let name = "Ops & billing = «prod» 100%";
    let r = c
        .post_form(&keys_path(&ac), &auth, &[("FriendlyName", name)])
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let created = r.json();
    let mut fields: Vec<&str> = created
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "date_created",
            "date_updated",
            "friendly_name",
            "secret",
            "sid"
        ]
    );
    assert_eq!(created["friendly_name"], name);
    let sid = created["sid"].as_str().unwrap();
    assert!(
        sid.starts_with("SK")
            && sid.len() == 34
            && sid[2..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    for f in ["date_created", "date_updated"] {
        let d = created[f].as_str().unwrap();
        assert!(d.ends_with(" +0000"), "{d}");
        let t = chrono::DateTime::parse_from_rfc2822(d).unwrap().timestamp();
        assert!((t - now_unix() as i64).abs() < 30, "{d}");
    }
    // Fetch is the same representation without the secret.
    let fetched = c.get(&key_path(&ac, sid), &auth).await.json();
    let mut without = created.clone();
    without.as_object_mut().unwrap().remove("secret");
    assert_eq!(fetched, without);
    // FriendlyName: 64 characters (not bytes) is the limit, on create and update.
    let ok = "é".repeat(64);
    assert_eq!(
        c.post_form(&keys_path(&ac), &auth, &[("FriendlyName", ok.as_str())])
            .await
            .status,
        201
    );
    let too_long = "é".repeat(65);
    let r = c
        .post_form(
            &key_path(&ac, sid),
            &auth,
            &[("FriendlyName", too_long.as_str())],
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["message"],
        "FriendlyName: must be at most 64 characters"
    );
    // Keys made through Twilio's path are standard keys at the edge.
    let doc = c.feed(&s.creds.edge).await;
    let key = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["sid"] == sid)
        .unwrap();
    assert_eq!(key["role"], "standard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_suspend_reactivate_region_allowlist_and_limits() {
    let s = InProc::start().await;
    let (c, ac, auth, admin) = (
        &s.client,
        s.creds.account_sid.clone(),
        s.account_auth(),
        s.admin(),
    );
    let path = format!("/v1/accounts/{ac}");
    let r = c.get(&path, &auth).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (r.json()["status"].as_str(), r.json()["region"].as_str()),
        (Some("active"), Some("us1"))
    );
    // Status, region and limits are the operator's; the account may set its own allowlist
    // (one that keeps this test's own address in: the account's allowlist binds its
    // credentials here as at the edge).
    let r = c
        .json("PATCH", &path, &auth, json!({"status": "suspended"}))
        .await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (403, Some("escalation_denied"))
    );
    let r = c
        .json(
            "PATCH",
            &path,
            &auth,
            json!({"allowed_ips": ["127.0.0.0/8", "203.0.113.0/24"], "friendly_name": "acme"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = c
        .json(
            "PATCH",
            &path,
            &auth,
            json!({"allowed_ips": ["203.0.113.1/24"]}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("allowed_ips[0]: host bits set"));
    let r = c
        .json("PATCH", &path, &admin, json!({"region": "in1", "limits": {"rate": {"requests": 100, "per": "1m"}, "concurrency": 5}}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        c.json("PATCH", &path, &admin, json!({"region": "Mumbai!"}))
            .await
            .status,
        400
    );
    let doc = c.feed(&s.creds.edge).await;
    let acc = &doc["accounts"][0];
    assert_eq!(acc["allowed_ips"], json!(["127.0.0.0/8", "203.0.113.0/24"]));
    assert_eq!(acc["limits"]["concurrency"], 5);

    // Suspend: the account's credentials are refused (403), the edge sees it; reactivate.
    assert_eq!(
        c.json("PATCH", &path, &admin, json!({"status": "suspended"}))
            .await
            .status,
        200
    );
    let r = c.get(&keys_path(&ac), &auth).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        c.feed(&s.creds.edge).await["accounts"][0]["status"],
        "suspended"
    );
    assert_eq!(
        c.json("PATCH", &path, &admin, json!({"status": "active"}))
            .await
            .status,
        200
    );
    assert_eq!(c.get(&keys_path(&ac), &auth).await.status, 200);
    // Clearing the allowlist with null.
    let r = c
        .json("PATCH", &path, &auth, json!({"allowed_ips": null}))
        .await;
    assert_eq!(r.json()["allowed_ips"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_regions_are_the_operator_s_checked_and_reach_the_edge() {
    let s = InProc::start().await;
    let (c, ac, auth, admin) = (
        &s.client,
        s.creds.account_sid.clone(),
        s.account_auth(),
        s.admin(),
    );
    let path = format!("/v1/accounts/{ac}");
    let r = c.get(&path, &auth).await;
    assert_eq!(
        (r.json()["region"].clone(), r.json()["regions"].clone()),
        (json!("us1"), json!([]))
    );
    // The edge learns the home region of every account; no further region yet.
    let doc = c.feed(&s.creds.edge).await;
    assert_eq!(doc["accounts"][0]["region"], "us1");
    assert!(doc["accounts"][0].get("regions").is_none(), "{doc}");
    let before = doc["version"].as_u64().unwrap();

    // Only the operator changes where an account is served.
    let r = c
        .json("PATCH", &path, &auth, json!({"regions": ["in1"]}))
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(
        r.json()["error"],
        json!({"code": "escalation_denied", "message": "only the operator (admin token) may change an account's status, region, regions or limits"})
    );
    let r = c
        .json("PATCH", &path, &admin, json!({"regions": ["in1", "sg-1"]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["regions"], json!(["in1", "sg-1"]));
    assert_eq!(
        c.get(&path, &auth).await.json()["regions"],
        json!(["in1", "sg-1"])
    );
    // The change reaches edges like any other: in the export and in the change feed.
    let doc = c.feed(&s.creds.edge).await;
    assert_eq!(doc["accounts"][0]["regions"], json!(["in1", "sg-1"]));
    let page = c
        .get(
            &format!("/v1/edge/changes?since={before}"),
            &Auth::bearer(&s.creds.edge),
        )
        .await;
    assert_eq!(page.status, 200, "{}", page.text);
    assert_eq!(page.json()["accounts"][0]["sid"], ac.as_str());
    assert_eq!(page.json()["accounts"][0]["region"], "us1");
    assert_eq!(
        page.json()["accounts"][0]["regions"],
        json!(["in1", "sg-1"])
    );
    // An account's own unchanged regions are not a change of them.
    let r = c
        .json(
            "PATCH",
            &path,
            &auth,
            json!({"regions": ["in1", "sg-1"], "friendly_name": "acme"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    // Exact refusals, and nothing stored.
    let seventeen: Vec<String> = (0..17).map(|i| format!("r{i}")).collect();
    for (body, message) in [
        (
            json!({"regions": ["IN1"]}),
            r#"regions[0]: invalid region "IN1": must be 1 to 32 lowercase letters, digits or '-'"#,
        ),
        (
            json!({"regions": ["in1", "in1"]}),
            r#"regions[1]: duplicate region "in1" (also regions[0])"#,
        ),
        (
            json!({"regions": ["in1", "us1"]}),
            r#"regions[1]: duplicate region "us1" (the home region)"#,
        ),
        (
            json!({"region": "in1"}),
            r#"regions[0]: duplicate region "in1" (the home region)"#,
        ),
        (json!({"regions": seventeen}), "regions: at most 16 regions"),
        (
            json!({"region": "Mumbai!"}),
            "region: must be 1 to 32 lowercase letters, digits or '-'",
        ),
    ] {
        let r = c.json("PATCH", &path, &admin, body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert_eq!(r.json()["error"]["message"], message, "{body}");
    }
    assert_eq!(
        c.get(&path, &auth).await.json()["regions"],
        json!(["in1", "sg-1"])
    );
    // A new home region and the list together; then `[]` and `null` both clear the list.
    let r = c
        .json(
            "PATCH",
            &path,
            &admin,
            json!({"region": "in1", "regions": ["us1"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        (r.json()["region"].clone(), r.json()["regions"].clone()),
        (json!("in1"), json!(["us1"]))
    );
    for clear in [json!([]), Value::Null] {
        let r = c
            .json("PATCH", &path, &admin, json!({"regions": ["eu1"]}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let r = c
            .json("PATCH", &path, &admin, json!({"regions": clear}))
            .await;
        assert_eq!(
            (r.status, r.json()["regions"].clone()),
            (200, json!([])),
            "{clear}"
        );
        let doc = c.feed(&s.creds.edge).await;
        assert!(doc["accounts"][0].get("regions").is_none(), "{doc}");
        assert_eq!(doc["accounts"][0]["region"], "in1");
    }
    // The operator creates an account with its regions.
    let r = c
        .json(
            "POST",
            "/v1/accounts",
            &admin,
            json!({"region": "in1", "regions": ["sg1"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        (r.json()["region"].clone(), r.json()["regions"].clone()),
        (json!("in1"), json!(["sg1"]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_role_permissions_allowlist_limits_expiry_and_enable_reach_the_edge() {
    let s = InProc::start().await;
    let (c, ac, auth) = (&s.client, s.creds.account_sid.clone(), s.account_auth());
    let keys = format!("/v1/accounts/{ac}/keys");
    let r = c
        .json(
            "POST",
            &keys,
            &auth,
            json!({
                "friendly_name": "calls only",
                "role": "standard",
                "apis": ["calls"],
                "limits": {"rate": {"requests": 50, "per": "1m"}, "apis": {"calls": {"requests": 10, "per": "1s"}}},
                "expires_at": "2099-01-01T00:00:00Z",
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let sid = r.json()["sid"].as_str().unwrap().to_owned();
    let secret = r.json()["secret"].as_str().unwrap().to_owned();
    let key = Auth::basic(&sid, &secret);
    let calls = calls_path(&ac);
    let messages = format!("/2010-04-01/Accounts/{ac}/Messages.json");
    let now = now_unix();

    let doc = c.feed(&s.creds.edge).await;
    assert_eq!(
        edge_decides(&doc, "GET", &calls, &key, now),
        Ok("calls".into())
    );
    assert_eq!(
        edge_decides(&doc, "GET", &messages, &key, now),
        Err("permission_denied".into())
    );
    let k = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["sid"] == sid.as_str())
        .unwrap();
    assert_eq!(k["expires_at"], "2099-01-01T00:00:00Z");
    assert_eq!(k["limits"]["apis"]["calls"]["requests"], 10);

    // Allowlist: the edge checks the client address (here 127.0.0.1).
    let kp = format!("{keys}/{sid}");
    assert_eq!(
        c.json(
            "PATCH",
            &kp,
            &auth,
            json!({"allowed_ips": ["192.0.2.0/24"]})
        )
        .await
        .status,
        200
    );
    let doc = c.feed(&s.creds.edge).await;
    assert_eq!(
        edge_decides(&doc, "GET", &calls, &key, now),
        Err("ip_not_allowed".into())
    );
    // Disable, then expire: one 401 reason for both, as the edge promises.
    let r = c
        .json(
            "PATCH",
            &kp,
            &auth,
            json!({"allowed_ips": null, "enabled": false}),
        )
        .await;
    assert_eq!(r.json()["enabled"], false);
    let doc = c.feed(&s.creds.edge).await;
    assert_eq!(
        edge_decides(&doc, "GET", &calls, &key, now),
        Err("invalid_credentials".into())
    );
    let r = c
        .json(
            "PATCH",
            &kp,
            &auth,
            json!({"enabled": true, "expires_at": "2000-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(r.status, 200);
    let doc = c.feed(&s.creds.edge).await;
    assert_eq!(
        edge_decides(&doc, "GET", &calls, &key, now),
        Err("invalid_credentials".into())
    );
    // Widen: main role, every API, no expiry.
    let r = c
        .json(
            "PATCH",
            &kp,
            &auth,
            json!({"role": "main", "apis": null, "expires_at": null}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let doc = c.feed(&s.creds.edge).await;
    assert_eq!(
        edge_decides(&doc, "GET", &messages, &key, now),
        Ok("messages".into())
    );
    assert_eq!(
        edge_decides(&doc, "GET", &keys_path(&ac), &key, now),
        Ok("keys".into())
    );
    // ... and it may now manage keys at the control plane too.
    assert_eq!(c.get(&keys_path(&ac), &key).await.status, 200);
    // A publishable key cannot become a secret one (its prefix says pk_).
    let r = c
        .json("PATCH", &kp, &auth, json!({"role": "publishable"}))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("role: "));
    // The v1 list and fetch carry metadata about secrets, never the secrets.
    let r = c.get(&keys, &auth).await;
    assert_eq!(r.status, 200);
    assert!(!r.text.contains(&secret));
    assert_eq!(r.json()["keys"][0]["secrets"][0]["current"], true);
}
