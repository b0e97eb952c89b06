#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::store::sqlite;
use keygate_core::usage::{SecretUse, UsageEntry};

/// 2026-11-24T10:00:00Z.
const T0: i64 = 1_795_514_400;

fn entry(minute: i64, key: &str, allowed: u64, denied: &[(&str, u64)]) -> UsageEntry {
    UsageEntry {
        minute: minute as u64,
        account_sid: "AC1".into(),
        key_sid: Some(key.into()),
        allowed,
        denied: denied.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect(),
        secrets: vec![],
    }
}

fn batch(id: &str, entries: Vec<UsageEntry>) -> UsageBatch {
    UsageBatch {
        batch: id.into(),
        entries,
        dropped: 0,
    }
}

fn counts(
    conn: &mut rusqlite::Connection,
    width: i64,
    from: i64,
    to: i64,
) -> Vec<(i64, String, u64)> {
    sqlite::read(conn, |tx| tx.usage_counts("AC1", None, width, from, to)).unwrap()
}

fn db() -> (tempfile::TempDir, rusqlite::Connection) {
    let dir = tempfile::tempdir().unwrap();
    let conn = sqlite::open(&dir.path().join("k.db")).unwrap();
    (dir, conn)
}

#[test]
fn a_batch_id_is_applied_once_however_often_it_is_sent() {
    let (_dir, mut conn) = db();
    let b = batch(
        "edge-1.00ff.1",
        vec![
            entry(T0, "SK1", 5, &[("rate_limited_key", 2)]),
            entry(T0 + 60, "SK1", 1, &[]),
        ],
    );
    let first = sqlite::write(&mut conn, |tx| apply(tx, &b, T0)).unwrap();
    let again = sqlite::write(&mut conn, |tx| apply(tx, &b, T0 + 5)).unwrap();
    assert_eq!((first, again), (true, false));
    assert_eq!(
        counts(&mut conn, 60, T0, T0 + 120),
        vec![
            (T0, "allowed".into(), 5),
            (T0, "rate_limited_key".into(), 2),
            (T0 + 60, "allowed".into(), 1),
        ]
    );
    // Another id with the same counts is new usage: it adds.
    let other = batch("edge-1.00ff.2", vec![entry(T0, "SK1", 5, &[])]);
    assert!(sqlite::write(&mut conn, |tx| apply(tx, &other, T0)).unwrap());
    assert_eq!(
        counts(&mut conn, 60, T0, T0 + 60)[0],
        (T0, "allowed".into(), 10)
    );
}

#[test]
fn hour_buckets_sum_their_minutes_and_outlive_them() {
    let (_dir, mut conn) = db();
    // T0 is on the hour: three minutes of it and one of the next hour.
    let b = batch(
        "e.1.1",
        vec![
            entry(T0, "SK1", 1, &[("permission_denied", 1)]),
            entry(T0 + 600, "SK2", 2, &[]),
            entry(T0 + 3540, "SK1", 3, &[]),
            entry(T0 + 3600, "SK1", 4, &[]),
        ],
    );
    sqlite::write(&mut conn, |tx| apply(tx, &b, T0)).unwrap();
    assert_eq!(
        counts(&mut conn, 3600, T0, T0 + 7200),
        vec![
            (T0, "allowed".into(), 6),
            (T0, "permission_denied".into(), 1),
            (T0 + 3600, "allowed".into(), 4),
        ]
    );
    // One key only.
    let sk2 = sqlite::read(&mut conn, |tx| {
        tx.usage_counts("AC1", Some("SK2"), 3600, T0, T0 + 7200)
    })
    .unwrap();
    assert_eq!(sk2, vec![(T0, "allowed".into(), 2)]);
    // Retention: minute rows before T0 + 3600 go, hour rows stay; batch ids a day old go.
    let prune = UsagePrune {
        minutes: T0 + 3600,
        hours: T0,
        batches: T0 + 1,
    };
    sqlite::write(&mut conn, |tx| tx.prune_usage(&prune)).unwrap();
    assert_eq!(
        counts(&mut conn, 60, T0, T0 + 7200),
        vec![(T0 + 3600, "allowed".into(), 4)]
    );
    assert_eq!(counts(&mut conn, 3600, T0, T0 + 7200).len(), 3);
    // The id is forgotten: the same batch would apply again (an edge never retries that late).
    assert!(sqlite::write(&mut conn, |tx| tx.claim_usage_batch("e.1.1", T0 + 2)).unwrap());
    // Hour rows past their own retention go too.
    let prune = UsagePrune {
        minutes: T0,
        hours: T0 + 3601,
        batches: 0,
    };
    sqlite::write(&mut conn, |tx| tx.prune_usage(&prune)).unwrap();
    assert_eq!(counts(&mut conn, 3600, T0, T0 + 7200), vec![]);
}

#[test]
fn last_use_is_kept_per_secret_by_its_tag_and_per_key() {
    let (_dir, mut conn) = db();
    let (a, b) = (
        "a".repeat(64),
        format!("{}{}", "b".repeat(16), "c".repeat(48)),
    );
    sqlite::write(&mut conn, |tx| {
        tx.insert_secret("SK1", &a, T0)?;
        tx.insert_secret("SK1", &b, T0)?;
        Ok(())
    })
    .unwrap();
    let mut e = entry(T0, "SK1", 2, &[]);
    e.secrets = vec![
        SecretUse {
            id: "a".repeat(16),
            n: 1,
            last_used_s: (T0 + 30) as u64,
        },
        // No secret of SK1 starts with this: ignored.
        SecretUse {
            id: "d".repeat(16),
            n: 1,
            last_used_s: (T0 + 40) as u64,
        },
    ];
    sqlite::write(&mut conn, |tx| {
        apply(tx, &batch("e.1.1", vec![e.clone()]), T0)
    })
    .unwrap();
    // An older use arriving late does not move it back.
    e.secrets[0].last_used_s = (T0 + 10) as u64;
    sqlite::write(&mut conn, |tx| apply(tx, &batch("e.1.2", vec![e]), T0)).unwrap();
    let last = sqlite::read(&mut conn, |tx| tx.last_used("SK1")).unwrap();
    assert_eq!(last.secrets, vec![(a.clone(), T0 + 30)]);
    // The key row needs the key to exist (none here): no key last use.
    assert_eq!(last.key, None);
    // A deleted secret's last use is forgotten by the pruning.
    sqlite::write(&mut conn, |tx| tx.delete_all_secrets("SK1")).unwrap();
    let prune = UsagePrune {
        minutes: 0,
        hours: 0,
        batches: 0,
    };
    sqlite::write(&mut conn, |tx| tx.prune_usage(&prune)).unwrap();
    assert_eq!(
        sqlite::read(&mut conn, |tx| tx.last_used("SK1")).unwrap(),
        LastUsed::default()
    );
}

#[test]
fn usage_query_parameters_and_their_exact_errors() {
    let now = T0 + 125;
    let p = |q: &str| UsageQuery::parse(Some(q), now).map_err(|e| e.message());
    assert_eq!(
        p(""),
        Ok(UsageQuery {
            key_sid: None,
            from: T0 + 180 - 3600,
            to: T0 + 180,
            width: 60
        })
    );
    let q = p("bucket=1h&key_sid=SK1&from=2026-11-24T09:30:00Z&to=2026-11-24T12:00:00Z").unwrap();
    assert_eq!(
        (q.key_sid.as_deref(), q.from, q.to, q.width),
        (Some("SK1"), T0 - 3600, T0 + 7200, 3600)
    );
    assert_eq!(p("bucket=1h").unwrap().from, T0 + 3600 - 86_400);
    for (q, msg) in [
        ("bucket=5m", "bucket: must be 1m or 1h"),
        (
            "key_sid=SK%201",
            "key_sid: must be a SID: 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'",
        ),
        (
            "from=yesterday",
            "from: invalid RFC 3339 time \"yesterday\" (expected like \"2026-11-24T10:00:00Z\")",
        ),
        (
            "to=2026-11-24",
            "to: invalid RFC 3339 time \"2026-11-24\" (expected like \"2026-11-24T10:00:00Z\")",
        ),
        (
            "from=2026-11-24T10:00:00Z&to=2026-11-24T10:00:00Z",
            "from: must be before to",
        ),
        (
            "from=2026-11-20T10:00:00Z&to=2026-11-24T10:00:00Z",
            "to: at most 1440 buckets after from (a day of 1m, 60 days of 1h)",
        ),
    ] {
        assert_eq!(p(q), Err(msg.to_owned()), "{q}");
    }
    // Exactly a day of minutes is fine; 60 days of hours too.
    assert!(p("from=2026-11-23T10:00:00Z&to=2026-11-24T10:00:00Z").is_ok());
    assert!(p("bucket=1h&from=2026-09-25T10:00:00Z&to=2026-11-24T10:00:00Z").is_ok());
}
