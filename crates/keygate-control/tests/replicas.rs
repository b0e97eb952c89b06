//! Several replicas on one Postgres database: versions in commit order across replicas (a feed
//! follower walking pages while writers race on both never misses a change), concurrent
//! regenerations of one key through two replicas, and long-polls on one replica woken by a
//! change through the other (LISTEN/NOTIFY, also after the notification connection is cut).
//!
//! Postgres only: on `KEYGATE_TEST_BACKEND=sqlite` each test says so and returns (`make
//! test-control` runs this suite again on Postgres).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use keygate_control::{Config, Database};
use serde_json::{json, Value};

/// Two replicas (in-process servers) on one fresh Postgres database, with `config`.
async fn two_replicas(config: Config) -> Option<(InProc, InProc)> {
    if !on_postgres() {
        eprintln!("replicas: Postgres only; this run is on SQLite (make test-control runs both)");
        return None;
    }
    let a = InProc::start_with(config.clone()).await;
    let b = InProc::serve_with(
        tempfile::tempdir().unwrap(),
        a.database.clone(),
        a.creds.clone(),
        config,
    )
    .await;
    assert!(matches!(a.database, Database::Postgres(_)));
    Some((a, b))
}

/// What an edge holds: every key SID present, as of `version`, kept by walking the change feed
/// the way the edge does (pages from `since`; a walk whose pages are at different versions is
/// applied and walked again from its first page's version, until one walk sees one version).
#[derive(Default)]
struct Follower {
    version: u64,
    keys: BTreeSet<String>,
    walks: usize,
    pages: usize,
}

impl Follower {
    async fn sync(&mut self, c: &Client, edge: &Auth) {
        loop {
            let mut after = String::new();
            let mut versions = BTreeSet::new();
            loop {
                let r = c
                    .get(
                        &format!(
                            "/v1/edge/changes?since={}&after={after}&limit=7",
                            self.version
                        ),
                        edge,
                    )
                    .await;
                assert_eq!(r.status, 200, "{}", r.text);
                let page = r.json();
                self.pages += 1;
                versions.insert(page["version"].as_u64().unwrap());
                for k in page["keys"].as_array().unwrap() {
                    self.keys.insert(k["sid"].as_str().unwrap().to_owned());
                }
                for d in page["deleted"].as_array().unwrap() {
                    self.keys.remove(d.as_str().unwrap());
                }
                match page["next"].as_str() {
                    Some(n) => after = n.to_owned(),
                    None => break,
                }
            }
            self.walks += 1;
            let first = *versions.first().unwrap();
            assert!(first >= self.version, "a page older than the version held");
            self.version = first;
            if versions.len() == 1 {
                return;
            }
        }
    }
}

async fn listed_keys(c: &Client, s: &InProc) -> BTreeSet<String> {
    let r = c
        .get(
            &format!("{}?PageSize=1000", keys_path(&s.creds.account_sid)),
            &s.account_auth(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["sid"].as_str().unwrap().to_owned())
        .collect()
}

/// Writers on both replicas create and delete keys at once while a follower walks the feed in
/// small pages, alternating replicas. Were a version handed out before an earlier one
/// committed, the follower would hold the later version and never be sent the earlier change:
/// at the end it holds exactly the keys both replicas list. (Checked against the trap: with
/// versions from a sequence, taken before commit, this test fails: the follower misses keys
/// that committed below a version it already held.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_on_two_replicas_keep_versions_in_commit_order() {
    let Some((a, b)) = two_replicas(Config::with_built_in_catalog().unwrap()).await else {
        return;
    };
    let account = a.account_auth();
    let ac = a.creds.account_sid.clone();
    let mut writers = Vec::new();
    for (i, c) in [a.client.clone(), b.client.clone()]
        .into_iter()
        .cycle()
        .take(8)
        .enumerate()
    {
        let (account, ac) = (account.clone(), ac.clone());
        writers.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            for n in 0..30 {
                let r = c
                    .json(
                        "POST",
                        &format!("/v1/accounts/{ac}/keys"),
                        &account,
                        json!({"role": "standard", "friendly_name": format!("w{i} #{n}")}),
                    )
                    .await;
                assert_eq!(r.status, 201, "{}", r.text);
                let sid = r.json()["sid"].as_str().unwrap().to_owned();
                if n % 3 == 0 {
                    let r = c
                        .delete(&format!("/v1/accounts/{ac}/keys/{sid}"), &account)
                        .await;
                    assert_eq!(r.status, 204, "{}", r.text);
                }
                versions.push(sid);
            }
            versions
        }));
    }
    let edge = Auth::bearer(&a.creds.edge);
    let mut follower = Follower::default();
    let mut syncs = 0;
    while writers.iter().any(|w| !w.is_finished()) {
        let c = if syncs % 2 == 0 { &a.client } else { &b.client };
        follower.sync(c, &edge).await;
        syncs += 1;
    }
    let mut created = 0;
    for w in writers {
        created += w.await.unwrap().len();
    }
    follower.sync(&b.client, &edge).await;
    let in_a = listed_keys(&a.client, &a).await;
    let in_b = listed_keys(&b.client, &b).await;
    assert_eq!(in_a, in_b, "both replicas list the same keys");
    let missed: Vec<_> = in_a.difference(&follower.keys).collect();
    let stale: Vec<_> = follower.keys.difference(&in_a).collect();
    assert!(
        missed.is_empty() && stale.is_empty(),
        "the follower at version {} missed {} stored keys {missed:?} and kept {} deleted ones {stale:?}",
        follower.version,
        missed.len(),
        stale.len()
    );
    assert_eq!(in_a.len(), created - created.div_ceil(3));
    eprintln!(
        "{created} creates on 2 replicas; follower: {syncs} syncs, {} walks, {} pages, at version {}",
        follower.walks, follower.pages, follower.version
    );
    assert!(syncs > 1, "the follower walked while the writers wrote");
}

/// Two replicas regenerate the same key at the same moment, many times: writers serialize on
/// the key's row, so the second either read the key before the first committed (409, nothing
/// stored) or waits and regenerates after it (both get a secret, the first one's in grace); in
/// every case no stored secret is one nobody was given, and exactly one is current.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_regenerations_through_two_replicas_never_leave_an_unheld_secret() {
    // Caps off: this test is about concurrent writers.
    let config = Config {
        caps: keygate_control::Caps {
            secrets_in_grace: u64::MAX,
            regenerations_per_hour: u64::MAX,
            ..keygate_control::Caps::default()
        },
        ..Config::with_built_in_catalog().unwrap()
    };
    let Some((a, b)) = two_replicas(config).await else {
        return;
    };
    let ac = a.creds.account_sid.clone();
    let r = a
        .client
        .json(
            "POST",
            &format!("/v1/accounts/{ac}/keys"),
            &a.account_auth(),
            json!({"role": "standard"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let sid = r.json()["sid"].as_str().unwrap().to_owned();
    let mut held = BTreeSet::from([digest(r.json()["secret"].as_str().unwrap().as_bytes())]);
    let path = format!("/v1/accounts/{ac}/keys/{sid}/regenerate");
    let (mut won, mut conflicts) = (0, 0);
    for _ in 0..8 {
        let calls: Vec<_> = [a.client.clone(), b.client.clone()]
            .into_iter()
            .map(|c| {
                let (p, auth) = (path.clone(), a.account_auth());
                tokio::spawn(async move {
                    c.json("POST", &p, &auth, json!({"grace_seconds": 3600}))
                        .await
                })
            })
            .collect();
        let mut round_wins = 0;
        for call in calls {
            let r = call.await.unwrap();
            match r.status {
                200 => {
                    round_wins += 1;
                    held.insert(digest(r.json()["secret"].as_str().unwrap().as_bytes()));
                }
                409 => {
                    assert_eq!(r.json()["error"]["code"], "conflict");
                    conflicts += 1;
                }
                s => panic!("unexpected {s}: {}", r.text),
            }
        }
        assert!(round_wins >= 1, "one of two concurrent regenerations wins");
        won += round_wins;
        // Keep within the cap of secrets in grace: end the old ones now.
        let r = a
            .client
            .delete(
                &format!("/v1/accounts/{ac}/keys/{sid}/secrets/previous"),
                &a.account_auth(),
            )
            .await;
        assert!(r.status == 204 || r.status == 200, "{}", r.text);
    }
    let doc = b.client.feed(&b.creds.edge).await;
    let secrets: Vec<Value> = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["sid"] == sid.as_str())
        .unwrap()["secrets"]
        .as_array()
        .unwrap()
        .clone();
    let stored: BTreeSet<String> = secrets
        .iter()
        .map(|s| s["digest"].as_str().unwrap().to_owned())
        .collect();
    assert!(stored.is_subset(&held), "{stored:?} vs {held:?}");
    assert_eq!(
        secrets.iter().filter(|s| s["not_after"].is_null()).count(),
        1
    );
    eprintln!("regenerations through two replicas: {won} won, {conflicts} got 409");
}

/// With the version poll off (an hour), only NOTIFY can tell replica B of a change made
/// through replica A: B's long-poll answers with the new version long before its wait ends,
/// also after B's notification connection was cut (it reconnects and re-reads the version).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_through_one_replica_wakes_long_polls_on_the_other() {
    let config = Config {
        version_poll: Duration::from_secs(3600),
        ..Config::with_built_in_catalog().unwrap()
    };
    let Some((a, b)) = two_replicas(config).await else {
        return;
    };
    let edge = Auth::bearer(&a.creds.edge);
    let ac = a.creds.account_sid.clone();
    let version = |r: &Resp| r.json()["version"].as_u64().unwrap();
    let r = b
        .client
        .get("/v1/edge/changes?since=0&limit=1000", &edge)
        .await;
    let mut known = version(&r);

    let mut wake_ms = BTreeMap::new();
    for round in 0..2 {
        if round == 1 {
            // There are two listeners on this database: A's and B's. Cut them both.
            // Cut B's LISTEN connection (the server side): B must reconnect, LISTEN again and
            // read the version it missed.
            let Database::Postgres(url) = &b.database else {
                unreachable!()
            };
            let name = url.rsplit('/').next().unwrap();
            let cluster = keygate_pgtest::PgCluster::shared().unwrap();
            let cut = cluster
                .psql(
                    name,
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE datname = current_database() \
                     AND application_name = 'keygate-control-listen'",
                )
                .unwrap();
            assert_eq!(
                cut.trim(),
                "2",
                "A's and B's LISTEN connections were found and cut"
            );
        }
        let poll = {
            let (c, edge) = (b.client.clone(), edge.clone());
            tokio::spawn(async move {
                let r = c
                    .get(
                        &format!("/v1/edge/changes?since={known}&known={known}&wait=30"),
                        &edge,
                    )
                    .await;
                (r, Instant::now())
            })
        };
        // Let the long-poll reach B before the change.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = a
            .client
            .json(
                "POST",
                &format!("/v1/accounts/{ac}/keys"),
                &a.account_auth(),
                json!({"role": "standard"}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        let answered = Instant::now();
        let sid = r.json()["sid"].as_str().unwrap().to_owned();
        let (r, woke) = poll.await.unwrap();
        assert_eq!(r.status, 200, "woken with a page, not 304 after the wait");
        assert!(version(&r) > known);
        assert!(r.json()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["sid"] == sid.as_str()));
        wake_ms.insert(round, woke.duration_since(answered).as_secs_f64() * 1e3);
        known = version(&r);
    }
    eprintln!(
        "B woke {:.1} ms after A answered; after a cut notification connection {:.1} ms",
        wake_ms[&0], wake_ms[&1]
    );
}

fn digest(b: &[u8]) -> String {
    keygate_control::secret::digest(b)
}
