//! The change feed, `GET /v1/edge/changes`, over a real socket: a full sync walked page by page
//! equals `/v1/edge/config`; deltas name exactly what changed; applying a delta to an old
//! document gives the new one (also when pages of one walk see different versions); a database
//! from before the change log is backfilled; long-poll; 400 / 401 / 403; no secret in a page.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use keygate_control::secret::{self, OperatorKind};
use keygate_control::{model, service, store};
use keygate_core::config::{AccountStatus, ChangesPage, Role, CHANGES_SCHEMA_V1};
use keygate_core::secret_format::SecretKind;
use serde_json::{json, Value};

const CHANGES: &str = "/v1/edge/changes";

fn edge(s: &InProc) -> Auth {
    Auth::bearer(&s.creds.edge)
}

/// A page (asserts 200 and the page's shape: the edge's own type, headers, cursor).
async fn page(s: &InProc, query: &str) -> Value {
    let r = s.client.get(&format!("{CHANGES}?{query}"), &edge(s)).await;
    assert_eq!(r.status, 200, "{query}: {}", r.text);
    let typed: ChangesPage = serde_json::from_str(&r.text).expect("a keygate.changes/v1 page");
    assert_eq!(typed.schema, CHANGES_SCHEMA_V1);
    assert_eq!(r.header("etag"), Some(format!("\"{}\"", typed.version)));
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.header("cache-control").as_deref(), Some("no-cache"));
    r.json()
}

fn sids_of(page: &Value, field: &str) -> Vec<String> {
    page[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.get("sid").unwrap_or(v).as_str().unwrap().to_owned())
        .collect()
}

/// Every SID of a page, in the order served: accounts, keys, deleted (each ascending).
fn all_sids(page: &Value) -> Vec<String> {
    let mut all = Vec::new();
    for field in ["accounts", "keys", "deleted"] {
        let sids = sids_of(page, field);
        assert!(sids.windows(2).all(|w| w[0] < w[1]), "{field} ascending");
        all.extend(sids);
    }
    all
}

/// Walks `changes?since=...` to its end with `limit`, checking the cursor on every page.
async fn walk(s: &InProc, since: u64, limit: usize) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut after = String::new();
    loop {
        let p = page(s, &format!("since={since}&after={after}&limit={limit}")).await;
        assert_eq!(p["since"], since);
        assert_eq!(p["after"], after.as_str());
        let mut sids = all_sids(&p);
        assert!(sids.len() <= limit);
        sids.sort();
        if sids.len() == limit {
            assert_eq!(
                p["next"],
                sids.last().unwrap().as_str(),
                "next: the page's last SID"
            );
        } else {
            assert!(p["next"].is_null(), "a short page is the last");
        }
        if let Some(first) = sids.first() {
            assert!(
                first.as_str() > after.as_str(),
                "a page starts after its cursor"
            );
        }
        let next = p["next"].as_str().map(str::to_owned);
        pages.push(p);
        match next {
            Some(n) => after = n,
            None => return pages,
        }
    }
}

fn by_sid(items: &Value) -> BTreeMap<String, Value> {
    items
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["sid"].as_str().unwrap().to_owned(), v.clone()))
        .collect()
}

/// The edge's view: accounts and keys by SID.
#[derive(Debug, Clone, PartialEq)]
struct EdgeState {
    version: u64,
    accounts: BTreeMap<String, Value>,
    keys: BTreeMap<String, Value>,
}

impl EdgeState {
    fn of_config(doc: &Value) -> EdgeState {
        EdgeState {
            version: doc["version"].as_u64().unwrap(),
            accounts: by_sid(&doc["accounts"]),
            keys: by_sid(&doc["keys"]),
        }
    }

    /// Replaces or removes every SID the page names.
    fn apply(&mut self, page: &Value) {
        for a in page["accounts"].as_array().unwrap() {
            self.accounts
                .insert(a["sid"].as_str().unwrap().to_owned(), a.clone());
        }
        for k in page["keys"].as_array().unwrap() {
            self.keys
                .insert(k["sid"].as_str().unwrap().to_owned(), k.clone());
        }
        for d in page["deleted"].as_array().unwrap() {
            let d = d.as_str().unwrap();
            self.accounts.remove(d);
            self.keys.remove(d);
        }
        self.version = page["version"].as_u64().unwrap();
    }

    /// The document the edge would compile, with the page's settings, APIs and limits.
    fn doc(&self, page: &Value) -> Value {
        let mut doc = json!({
            "schema": "keygate.config/v1",
            "version": self.version,
            "settings": page["settings"],
            "apis": page["apis"],
            "accounts": self.accounts.values().collect::<Vec<_>>(),
            "keys": self.keys.values().collect::<Vec<_>>(),
        });
        if let Some(l) = page.get("limits") {
            doc["limits"] = l.clone();
        }
        doc
    }
}

/// The edge's incremental sync: walk `since`; if the pages saw different versions, walk again
/// from the first page's version until one walk sees a single version. Returns the walks.
async fn sync(s: &InProc, state: &mut EdgeState, limit: usize) -> usize {
    let mut since = state.version;
    for walks in 1..10 {
        let pages = walk(s, since, limit).await;
        for p in &pages {
            state.apply(p);
        }
        let versions: BTreeSet<u64> = pages
            .iter()
            .map(|p| p["version"].as_u64().unwrap())
            .collect();
        if versions.len() == 1 {
            return walks;
        }
        since = pages[0]["version"].as_u64().unwrap();
    }
    panic!("no walk saw a single version");
}

async fn new_account(s: &InProc) -> (String, String) {
    let r = s
        .client
        .json(
            "POST",
            "/v1/accounts",
            &s.admin(),
            json!({"friendly_name": "tenant"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let v = r.json();
    (
        v["sid"].as_str().unwrap().to_owned(),
        v["auth_token"].as_str().unwrap().to_owned(),
    )
}

async fn new_key(s: &InProc, account: &str, role: &str) -> (String, String) {
    let r = s
        .client
        .json(
            "POST",
            &format!("/v1/accounts/{account}/keys"),
            &s.admin(),
            json!({"role": role}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let v = r.json();
    (
        v["sid"].as_str().unwrap().to_owned(),
        v["secret"].as_str().unwrap().to_owned(),
    )
}

fn key_path(account: &str, key: &str) -> String {
    format!("/v1/accounts/{account}/keys/{key}")
}

async fn patch_key(s: &InProc, account: &str, key: &str, body: Value) {
    let r = s
        .client
        .json("PATCH", &key_path(account, key), &s.admin(), body)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
}

async fn regenerate(s: &InProc, account: &str, key: &str, grace: u64) -> String {
    let r = s
        .client
        .json(
            "POST",
            &format!("{}/regenerate", key_path(account, key)),
            &s.admin(),
            json!({"grace_seconds": grace}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()["secret"].as_str().unwrap().to_owned()
}

async fn delete_key(s: &InProc, account: &str, key: &str) {
    let r = s.client.delete(&key_path(account, key), &s.admin()).await;
    assert_eq!(r.status, 204, "{}", r.text);
}

async fn version(s: &InProc) -> u64 {
    s.client.feed(&s.creds.edge).await["version"]
        .as_u64()
        .unwrap()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// No secret handed out, nor its random part, appears in any change-feed response.
fn assert_no_secret_in_pages(s: &InProc, secrets: &[String]) {
    let pages: Vec<String> = s
        .client
        .responses()
        .into_iter()
        .filter(|r| r.starts_with(&format!("GET {CHANGES}")))
        .collect();
    assert!(!pages.is_empty());
    let all = pages.join("\n");
    for secret in secrets {
        assert_eq!(count(all.as_bytes(), secret), 0, "a secret in a page");
        let body = &secret[secret.len() - 38..];
        assert_eq!(count(all.as_bytes(), body), 0, "a secret's body in a page");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_walks_every_account_and_key_once_and_equals_the_config() {
    let s = InProc::start().await;
    let ac = s.creds.account_sid.clone();
    let mut secrets = vec![s.creds.auth_token.clone()];
    let (ac2, token2) = new_account(&s).await;
    let (ac3, token3) = new_account(&s).await;
    secrets.extend([token2, token3]);
    let mut keys = Vec::new();
    for (account, role) in [
        (&ac, "main"),
        (&ac, "standard"),
        (&ac, "publishable"),
        (&ac2, "standard"),
        (&ac2, "main"),
        (&ac3, "standard"),
    ] {
        let (sid, secret) = new_key(&s, account, role).await;
        secrets.push(secret);
        keys.push((account.clone(), sid));
    }
    // A key with a rotated secret in its grace, and a deleted key.
    secrets.push(regenerate(&s, &ac, &keys[1].1, 3600).await);
    delete_key(&s, &ac2, &keys[3].1).await;
    let gone = keys[3].1.clone();

    let config = s.client.feed(&s.creds.edge).await;
    for limit in [2, 3, 1000] {
        let pages = walk(&s, 0, limit).await;
        let served: Vec<String> = pages
            .iter()
            .flat_map(|p| {
                let mut v = all_sids(p);
                v.sort();
                v
            })
            .collect();
        assert!(
            served.windows(2).all(|w| w[0] < w[1]),
            "every SID once, ascending across pages: {served:?}"
        );
        let mut state = EdgeState {
            version: 0,
            accounts: BTreeMap::new(),
            keys: BTreeMap::new(),
        };
        for p in &pages {
            assert_eq!(p["version"], config["version"], "no write during the walk");
            for field in ["settings", "apis", "limits"] {
                assert_eq!(p.get(field), config.get(field), "{field}");
            }
            state.apply(p);
        }
        assert_eq!(state, EdgeState::of_config(&config), "limit {limit}");
        let deleted: Vec<String> = pages.iter().flat_map(|p| sids_of(p, "deleted")).collect();
        assert_eq!(
            deleted,
            vec![gone.clone()],
            "the deleted key is a tombstone"
        );
        assert_eq!(state.accounts.len(), 3);
        assert_eq!(state.keys.len(), 5);
        // The result compiles at the edge, with the catalogue of the pages.
        let doc = state.doc(&pages[0]);
        keygate_core::compile::compile(doc.to_string().as_bytes()).unwrap();
    }
    assert_eq!(
        EdgeState::of_config(&config).keys[&keys[1].1]["secrets"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "the rotated key carries both digests"
    );
    // Default limit: one page.
    let p = page(&s, "").await;
    assert!(p["next"].is_null());
    assert_eq!(all_sids(&p).len(), 3 + 5 + 1);
    assert_no_secret_in_pages(&s, &secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_name_exactly_the_changed_sids() {
    let s = InProc::start().await;
    let ac = s.creds.account_sid.clone();
    let mut k = Vec::new();
    for _ in 0..4 {
        k.push(new_key(&s, &ac, "standard").await.0);
    }
    let v0 = version(&s).await;
    let created = new_key(&s, &ac, "main").await.0;
    let v1 = version(&s).await;
    patch_key(&s, &ac, &k[1], json!({"enabled": false})).await;
    let v2 = version(&s).await;
    regenerate(&s, &ac, &k[2], 600).await;
    let v3 = version(&s).await;
    delete_key(&s, &ac, &k[3]).await;
    let v4 = version(&s).await;
    assert_eq!([v1, v2, v3, v4], [v0 + 1, v0 + 2, v0 + 3, v0 + 4]);

    let config = EdgeState::of_config(&s.client.feed(&s.creds.edge).await);
    let expect = |since: u64, keys: Vec<&String>, deleted: Vec<&String>| {
        let keys = sorted(keys.into_iter().cloned().collect());
        let deleted = sorted(deleted.into_iter().cloned().collect());
        (since, keys, deleted)
    };
    for (since, keys, deleted) in [
        expect(v0, vec![&created, &k[1], &k[2]], vec![&k[3]]),
        expect(v1, vec![&k[1], &k[2]], vec![&k[3]]),
        expect(v2, vec![&k[2]], vec![&k[3]]),
        expect(v3, vec![], vec![&k[3]]),
        expect(v4, vec![], vec![]),
    ] {
        for limit in [1, 1000] {
            let pages = walk(&s, since, limit).await;
            let served_keys: Vec<String> = pages.iter().flat_map(|p| sids_of(p, "keys")).collect();
            let served_deleted: Vec<String> =
                pages.iter().flat_map(|p| sids_of(p, "deleted")).collect();
            let served_accounts: Vec<String> =
                pages.iter().flat_map(|p| sids_of(p, "accounts")).collect();
            assert_eq!(served_keys, keys, "since {since} limit {limit}");
            assert_eq!(served_deleted, deleted, "since {since} limit {limit}");
            assert!(
                served_accounts.is_empty(),
                "since {since}: {served_accounts:?}"
            );
            for p in &pages {
                assert_eq!(p["version"], v4);
                // Each key as the full document has it.
                for key in p["keys"].as_array().unwrap() {
                    assert_eq!(Some(key), config.keys.get(key["sid"].as_str().unwrap()));
                }
            }
        }
    }
    // Up to date: an empty last page at the current version.
    let p = page(&s, &format!("since={v4}")).await;
    assert_eq!(all_sids(&p), Vec::<String>::new());
    assert!(p["next"].is_null());
    assert_eq!(p["version"], v4);
    // The updated and regenerated keys as the edge must now see them.
    assert_eq!(config.keys[&k[1]]["enabled"], false);
    assert_eq!(config.keys[&k[2]]["secrets"].as_array().unwrap().len(), 2);
    // An account change is an account entry (suspension and its auth token).
    let r = s
        .client
        .json(
            "PATCH",
            &format!("/v1/accounts/{ac}"),
            &s.admin(),
            json!({"status": "suspended"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let p = page(&s, &format!("since={v4}")).await;
    assert_eq!(sids_of(&p, "accounts"), vec![ac.clone()]);
    assert_eq!(p["accounts"][0]["status"], "suspended");
    assert_eq!(all_sids(&p).len(), 1);
}

/// The invariant the edge relies on: the document at version A plus `changes?since=A` is the
/// document at the new version, including when a write lands between the pages of a walk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_the_changes_to_an_old_document_gives_the_new_one() {
    let s = InProc::start().await;
    let ac = s.creds.account_sid.clone();
    let (ac2, _) = new_account(&s).await;
    let mut k = Vec::new();
    for (account, role) in [
        (&ac, "main"),
        (&ac, "standard"),
        (&ac2, "standard"),
        (&ac2, "publishable"),
        (&ac, "standard"),
    ] {
        k.push((account.clone(), new_key(&s, account, role).await.0));
    }
    let old = s.client.feed(&s.creds.edge).await;
    let mut state = EdgeState::of_config(&old);

    // Every kind of change.
    let (ac3, _) = new_account(&s).await;
    let fresh = new_key(&s, &ac3, "main").await.0;
    regenerate(&s, &k[0].0, &k[0].1, 3600).await;
    regenerate(&s, &k[1].0, &k[1].1, 3600).await;
    let r = s
        .client
        .delete(
            &format!("{}/secrets/previous", key_path(&k[1].0, &k[1].1)),
            &s.admin(),
        )
        .await;
    assert_eq!(r.status, 204);
    regenerate(&s, &k[2].0, &k[2].1, 0).await;
    patch_key(
        &s,
        &k[3].0,
        &k[3].1,
        json!({"allowed_ips": ["10.0.0.0/8"], "limits": {"rate": {"requests": 5, "per": "1s"}}}),
    )
    .await;
    delete_key(&s, &k[4].0, &k[4].1).await;
    let r = s
        .client
        .json(
            "PATCH",
            &format!("/v1/accounts/{ac2}"),
            &s.admin(),
            json!({"status": "suspended", "allowed_ips": ["192.0.2.0/24"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    assert_eq!(sync(&s, &mut state, 2).await, 1, "no write during the walk");
    let new = s.client.feed(&s.creds.edge).await;
    assert_eq!(state, EdgeState::of_config(&new));
    assert!(state.keys.contains_key(&fresh) && !state.keys.contains_key(&k[4].1));
    let p = page(&s, "since=0&limit=1").await;
    let doc = state.doc(&p);
    let compiled = keygate_core::compile::compile(doc.to_string().as_bytes()).unwrap();
    assert_eq!(compiled.version(), new["version"].as_u64().unwrap());

    // A walk whose pages see different versions: a key created and one deleted between pages.
    let mut state = EdgeState::of_config(&old);
    let a = state.version;
    let first = page(&s, &format!("since={a}&limit=2")).await;
    state.apply(&first);
    let (late, _) = new_key(&s, &ac, "standard").await;
    delete_key(&s, &k[0].0, &k[0].1).await;
    let mut after = first["next"].as_str().unwrap().to_owned();
    let mut versions = BTreeSet::from([first["version"].as_u64().unwrap()]);
    loop {
        let p = page(&s, &format!("since={a}&after={after}&limit=2")).await;
        state.apply(&p);
        versions.insert(p["version"].as_u64().unwrap());
        match p["next"].as_str() {
            Some(n) => after = n.to_owned(),
            None => break,
        }
    }
    assert_eq!(versions.len(), 2, "the walk saw two versions");
    // The protocol: walk again since the first page's version; one version now.
    state.version = first["version"].as_u64().unwrap();
    assert_eq!(sync(&s, &mut state, 2).await, 1);
    let newest = s.client.feed(&s.creds.edge).await;
    assert_eq!(state, EdgeState::of_config(&newest));
    assert!(state.keys.contains_key(&late) && !state.keys.contains_key(&k[0].1));
}

/// A database written before the change log existed (migration 1 only) is migrated on open;
/// every account and key it holds is served by a full sync, and deltas work from its version on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_before_the_change_log_is_backfilled() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    let auth_token = secret::new_secret(SecretKind::AuthToken).unwrap();
    let account = model::Account {
        sid: secret::new_sid("AC").unwrap(),
        friendly_name: Some("from before".into()),
        status: AccountStatus::Active,
        region: "us1".into(),
        regions: None,
        allowed_ips: None,
        limits: None,
        created_at: 1_700_000_000,
        updated_at: 1_700_000_000,
    };
    let mut key_sids = Vec::new();
    {
        let mut conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(store::MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        let tx = conn.transaction().unwrap();
        // As migration 1 wrote an account (no column of a later migration).
        tx.execute(
            "INSERT INTO accounts (sid, friendly_name, status, region, allowed_ips, limits, created_at, updated_at)
             VALUES (?1, ?2, 'active', ?3, NULL, NULL, ?4, ?4)",
            rusqlite::params![account.sid, account.friendly_name, account.region, account.created_at],
        )
        .unwrap();
        store::sqlite::insert_secret(
            &tx,
            &account.sid,
            &secret::digest(auth_token.expose().as_bytes()),
            1_700_000_000,
        )
        .unwrap();
        for (i, role) in [Role::Main, Role::Standard, Role::Publishable]
            .into_iter()
            .enumerate()
        {
            let key = model::Key {
                sid: secret::new_sid("SK").unwrap(),
                account_sid: account.sid.clone(),
                friendly_name: None,
                role,
                apis: None,
                allowed_ips: None,
                limits: None,
                expires_at: None,
                enabled: true,
                generation: 0,
                created_at: 1_700_000_000,
                updated_at: 1_700_000_000,
            };
            store::sqlite::insert_key(&tx, &key).unwrap();
            store::sqlite::insert_secret(
                &tx,
                &key.sid,
                &format!("{i:02x}").repeat(32),
                1_700_000_000,
            )
            .unwrap();
            key_sids.push(key.sid);
        }
        tx.execute("UPDATE config_version SET version = 9", [])
            .unwrap();
        tx.commit().unwrap();
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'changelog'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0, "migration 1 only");
    }
    // Opening migrates; the operator tokens the test needs create no change.
    let mut conn = store::sqlite::open(&db).unwrap();
    let user_version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(user_version, store::MIGRATIONS.len() as i64);
    let (_, admin) = store::sqlite::write(&mut conn, |tx| {
        service::create_operator_token(tx, OperatorKind::Admin)
    })
    .unwrap();
    let (_, edge_token) = store::sqlite::write(&mut conn, |tx| {
        service::create_operator_token(tx, OperatorKind::Edge)
    })
    .unwrap();
    drop(conn);
    let creds = Creds {
        admin: admin.expose().to_owned(),
        account_sid: account.sid.clone(),
        auth_token: auth_token.expose().to_owned(),
        edge: edge_token.expose().to_owned(),
    };
    let s = InProc::serve(dir, db, creds).await;

    let config = s.client.feed(&s.creds.edge).await;
    assert_eq!(config["version"], 9);
    let mut state = EdgeState {
        version: 0,
        accounts: BTreeMap::new(),
        keys: BTreeMap::new(),
    };
    let pages = walk(&s, 0, 2).await;
    // Four SIDs in pages of two: two full pages (each with `next`), then an empty last one.
    assert_eq!(pages.len(), 3);
    assert_eq!(all_sids(&pages[2]), Vec::<String>::new());
    for p in &pages {
        assert_eq!(p["version"], 9);
        state.apply(p);
    }
    assert_eq!(state, EdgeState::of_config(&config));
    assert_eq!(
        state.accounts.keys().cloned().collect::<Vec<_>>(),
        vec![account.sid.clone()]
    );
    assert_eq!(
        state.keys.keys().cloned().collect::<Vec<_>>(),
        sorted(key_sids.clone())
    );
    // Nothing changed since 9; deletions before the log are unknown, so older deltas are refused.
    let p = page(&s, "since=9").await;
    assert_eq!(all_sids(&p), Vec::<String>::new());
    let r = s.client.get(&format!("{CHANGES}?since=8"), &edge(&s)).await;
    assert_eq!(r.status, 410, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "changes_unavailable");
    assert_eq!(
        r.json()["error"]["message"],
        "since: the change log starts at version 9; changes since an older version are not known (sync again from since=0)"
    );
    // Writes after the migration are logged: the old account's credentials create a key.
    let r = s
        .client
        .post_form(
            &keys_path(&account.sid),
            &s.account_auth(),
            &[("KeyType", "standard")],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let created = r.json()["sid"].as_str().unwrap().to_owned();
    let p = page(&s, "since=9").await;
    assert_eq!(p["version"], 10);
    assert_eq!(all_sids(&p), vec![created]);
    assert_eq!(sync(&s, &mut state, 2).await, 1);
    assert_eq!(
        state,
        EdgeState::of_config(&s.client.feed(&s.creds.edge).await)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_answers_304_after_the_wait_and_200_as_soon_as_a_key_is_created() {
    let s = InProc::start().await;
    let e = edge(&s);
    let v = version(&s).await;

    // Already newer than `known`: 200 at once. Not newer and no wait: 304 at once.
    let p = page(&s, &format!("since={v}&known={}&wait=5", v - 1)).await;
    assert_eq!(p["version"], v);
    let started = Instant::now();
    let r = s
        .client
        .get(&format!("{CHANGES}?since={v}&known={v}"), &e)
        .await;
    assert_eq!((r.status, r.text.as_str()), (304, ""));
    assert_eq!(r.header("etag"), Some(format!("\"{v}\"")));
    assert!(started.elapsed() < Duration::from_secs(1));

    // No change: 304 after the wait.
    let started = Instant::now();
    let r = s
        .client
        .get(&format!("{CHANGES}?since={v}&known={v}&wait=5"), &e)
        .await;
    let waited = started.elapsed();
    assert_eq!((r.status, r.text.as_str()), (304, ""));
    assert_eq!(r.header("etag"), Some(format!("\"{v}\"")));
    assert!(
        waited >= Duration::from_millis(4900) && waited < Duration::from_secs(8),
        "{waited:?}"
    );

    // A change during the wait: 200 with that change, within milliseconds of it.
    let c = s.client.clone();
    let (e2, path) = (e.clone(), format!("{CHANGES}?since={v}&known={v}&wait=30"));
    let poll = tokio::spawn(async move {
        let r = c.get(&path, &e2).await;
        (r, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished());
    let (key, _) = new_key(&s, &s.creds.account_sid, "standard").await;
    let created = Instant::now();
    let (r, answered) = poll.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
    let lag = answered.saturating_duration_since(created);
    assert!(
        lag < Duration::from_millis(500),
        "answered {lag:?} after the change"
    );
    let p = r.json();
    assert_eq!(p["version"], v + 1);
    assert_eq!(r.header("etag"), Some(format!("\"{}\"", v + 1)));
    assert_eq!(sids_of(&p, "keys"), vec![key]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_400_and_the_feed_needs_an_edge_credential() {
    let s = InProc::start().await;
    let c = &s.client;
    let e = edge(&s);
    let after = "after: must be a SID: 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'";
    let long = "a".repeat(65);
    for (query, message) in [
        ("limit=0", "limit: must be between 1 and 10000"),
        ("limit=10001", "limit: must be between 1 and 10000"),
        ("limit=many", "limit: must be between 1 and 10000"),
        (
            "since=-1",
            "since: must be a whole number (a config version)",
        ),
        (
            "since=v3",
            "since: must be a whole number (a config version)",
        ),
        (
            "since=18446744073709551616",
            "since: must be a whole number (a config version)",
        ),
        (
            "known=latest",
            "known: must be a whole number (a config version)",
        ),
        ("wait=soon", "wait: must be a whole number of seconds"),
        ("after=SK%20x", after),
        ("after=..%2F", after),
        (&format!("after={long}"), after),
    ] {
        let r = c.get(&format!("{CHANGES}?{query}"), &e).await;
        assert_eq!(r.status, 400, "{query}");
        assert_eq!(r.json()["error"]["code"], "invalid_request");
        assert_eq!(r.json()["error"]["message"], message, "{query}");
    }
    // The bounds themselves are fine.
    page(&s, "limit=1").await;
    page(&s, "limit=10000").await;
    page(&s, &format!("after={}", "z".repeat(64))).await;

    let r = c.get(CHANGES, &Auth::None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "missing_credentials");
    assert!(r.header("www-authenticate").is_some());
    assert_eq!(
        c.get(CHANGES, &Auth::bearer("kg_edge_00")).await.status,
        401
    );
    // Credentials are checked before parameters.
    assert_eq!(
        c.get(&format!("{CHANGES}?limit=0"), &Auth::None)
            .await
            .status,
        401
    );
    assert_eq!(c.get(CHANGES, &s.account_auth()).await.status, 403);
    assert_eq!(c.get(CHANGES, &s.admin()).await.status, 200);
}
