//! Crash safety: `kill -9` the real binary during a burst of concurrent creates, restart it on
//! the same file, and every create that was acknowledged with 201 is there and its secret
//! authenticates (at the control plane, and at the edge through the feed + compile + decide).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_burst_of_creates_loses_no_acknowledged_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = test_database(dir.path());
    let (creds, _) = init_with_binary(&db);
    let ac = creds.account_sid.clone();
    let account = Auth::basic(&ac, &creds.auth_token);
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let mut cut_off = 0;

    for round in 0..3 {
        let mut server = Binary::spawn(&db);
        let client = server.client();
        let before = acked.lock().unwrap().len();
        let failed = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let (c, a, acked, failed, ac) = (
                    client.clone(),
                    account.clone(),
                    acked.clone(),
                    failed.clone(),
                    ac.clone(),
                );
                tokio::spawn(async move {
                    for i in 0.. {
                        let name = format!("round {round} worker {w} #{i}");
                        match c
                            .try_post_form(&keys_path(&ac), &a, &[("FriendlyName", name.as_str())])
                            .await
                        {
                            Ok(r) if r.status == 201 => {
                                let v = r.json();
                                let pair = (
                                    v["sid"].as_str().unwrap().to_owned(),
                                    v["secret"].as_str().unwrap().to_owned(),
                                );
                                acked.lock().unwrap().push(pair);
                            }
                            Ok(r) => panic!("unexpected {}: {}", r.status, r.text),
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        while acked.lock().unwrap().len() < before + 40 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.kill9();
        for w in workers {
            w.await.unwrap();
        }
        cut_off += failed.load(Ordering::Relaxed);
    }
    assert!(
        cut_off > 0,
        "some requests were in flight when the process was killed"
    );

    let server = Binary::spawn(&db);
    let c = server.client();
    let acked = acked.lock().unwrap().clone();
    let listed = c
        .get(&format!("{}?PageSize=1000", keys_path(&ac)), &account)
        .await
        .json();
    let listed: std::collections::HashSet<String> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["sid"].as_str().unwrap().to_owned())
        .collect();
    let doc = c.feed(&creds.edge).await;
    let calls = calls_path(&ac);
    let now = now_unix();
    for (sid, secret) in &acked {
        assert!(listed.contains(sid), "acknowledged key {sid} lost");
        assert_eq!(
            edge_decides(&doc, "GET", &calls, &Auth::basic(sid, secret), now),
            Ok("calls".into()),
            "{sid}"
        );
    }
    // Authenticated at the control plane too: a standard key is refused key management (403),
    // not unknown (401).
    let (sid, secret) = &acked[acked.len() - 1];
    assert_eq!(
        c.get(&keys_path(&ac), &Auth::basic(sid, secret))
            .await
            .status,
        403
    );
    if let keygate_control::Database::Sqlite(path) = &db {
        let conn = rusqlite::Connection::open(path).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }
    eprintln!(
        "{} acknowledged creates survived 3 kills ({cut_off} requests cut off)",
        acked.len()
    );
}
