//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so a change is on
//! disk before it is acknowledged and survives `kill -9` at any moment.
//!
//! One writer connection behind a mutex ([`Db::write`]): every write is one `BEGIN IMMEDIATE`
//! transaction that also increments the config version (one row, `config_version`). Reads that
//! need no write — authentication of every request, the edge feeds, fetches and lists — go to a
//! pool of read-only connections ([`Db::read`]; WAL lets them read while the writer writes), so
//! a flood of requests cannot queue the change feed behind one mutex. Other processes (the CLI)
//! may write the same file; SQLite's locking and `busy_timeout` serialize them.
//!
//! Only digests of secrets are stored (`secrets.digest`, `operator_tokens.digest`).

use std::path::Path;
use std::sync::{Arc, Mutex};

use keygate_core::config::{AccountLimitsDoc, KeyLimitsDoc};
use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use serde::de::DeserializeOwned;

use super::{EdgeSeen, LastUsed, Owners, Tx, UsagePrune, UsageRow};
use crate::error::{internal, Error};
use crate::model::{parse_role, parse_status, role_str, status_str, Account, Key, StoredSecret};
use crate::secret::OperatorKind;

/// Schema migrations, applied in order; `PRAGMA user_version` is the number applied.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE config_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO config_version (id, version) VALUES (1, 1);

CREATE TABLE operator_tokens (
    sid        TEXT PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('admin', 'edge')),
    digest     TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);

CREATE TABLE accounts (
    sid           TEXT PRIMARY KEY,
    friendly_name TEXT,
    status        TEXT NOT NULL CHECK (status IN ('active', 'suspended')),
    region        TEXT NOT NULL,
    allowed_ips   TEXT,
    limits        TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

CREATE TABLE keys (
    sid           TEXT PRIMARY KEY,
    account_sid   TEXT NOT NULL REFERENCES accounts (sid),
    friendly_name TEXT,
    role          TEXT NOT NULL CHECK (role IN ('main', 'standard', 'publishable')),
    apis          TEXT,
    allowed_ips   TEXT,
    limits        TEXT,
    expires_at    INTEGER,
    enabled       INTEGER NOT NULL,
    generation    INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX keys_by_account ON keys (account_sid, updated_at, sid);

-- Secrets of keys and auth tokens of accounts (owner_sid is a key or an account SID).
CREATE TABLE secrets (
    digest     TEXT PRIMARY KEY,
    owner_sid  TEXT NOT NULL,
    not_after  INTEGER,
    created_at INTEGER NOT NULL
);
CREATE INDEX secrets_by_owner ON secrets (owner_sid);
"#,
    // 2: the change log behind `GET /v1/edge/changes`. Triggers note every account or key whose
    // row or secrets a transaction touches in `pending_changes`; `bump` moves them into
    // `changelog` at the transaction's new version. A deleted row's SID stays as a tombstone.
    // `changelog_floor` is the version the log starts at: deletions before it are not recorded
    // (existing rows are backfilled at it), so a delta from an older version cannot be served.
    // WITHOUT ROWID: the table is its SID order, so a page read in SID order that skips rows
    // whose version is not newer reads one b-tree (30 times faster than through a rowid table's
    // separate primary-key index; see `changes_query_plans_at_200k_rows`).
    r#"
CREATE TABLE changelog (sid TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX changelog_by_version ON changelog (version, sid);
CREATE TABLE pending_changes (sid TEXT PRIMARY KEY);
CREATE TABLE changelog_floor (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);

CREATE TRIGGER accounts_inserted AFTER INSERT ON accounts BEGIN
    INSERT OR IGNORE INTO pending_changes (sid) VALUES (NEW.sid);
END;
CREATE TRIGGER accounts_updated AFTER UPDATE ON accounts BEGIN
    INSERT OR IGNORE INTO pending_changes (sid) VALUES (OLD.sid);
    INSERT OR IGNORE INTO pending_changes (sid) VALUES (NEW.sid);
END;
CREATE TRIGGER accounts_deleted AFTER DELETE ON accounts BEGIN
    INSERT OR IGNORE INTO pending_changes (sid) VALUES (OLD.sid);
END;

CREATE TRIGGER keys_inserted AFTER INSERT ON keys BEGIN
    INSERT OR IGNORE INTO pending_changes (sid) VALUES (NEW.sid);
END;
CREATE TRIGGER keys_updated AFTER UPDATE ON keys BEGIN
    INSERT OR IGNORE INTO pending_changes (sid) VALUES (OLD.sid);
    INSERT OR IGNORE INTO pending_changes (sid) VALUES (NEW.sid);
END;
CREATE TRIGGER keys_deleted AFTER DELETE ON keys BEGIN
    INSERT OR IGNORE INTO pending_changes (sid) VALUES (OLD.sid);
END;

CREATE TRIGGER secrets_inserted AFTER INSERT ON secrets BEGIN
    INSERT OR IGNORE INTO pending_changes (sid) VALUES (NEW.owner_sid);
END;
CREATE TRIGGER secrets_updated AFTER UPDATE ON secrets BEGIN
    INSERT OR IGNORE INTO pending_changes (sid) VALUES (OLD.owner_sid);
    INSERT OR IGNORE INTO pending_changes (sid) VALUES (NEW.owner_sid);
END;
CREATE TRIGGER secrets_deleted AFTER DELETE ON secrets BEGIN
    INSERT OR IGNORE INTO pending_changes (sid) VALUES (OLD.owner_sid);
END;

INSERT INTO changelog_floor (id, version) SELECT 1, version FROM config_version WHERE id = 1;
INSERT INTO changelog (sid, version)
    SELECT sid, (SELECT version FROM config_version WHERE id = 1) FROM accounts;
INSERT INTO changelog (sid, version)
    SELECT sid, (SELECT version FROM config_version WHERE id = 1) FROM keys WHERE true
    ON CONFLICT (sid) DO NOTHING;
"#,
    // 3: regenerations per key, for the per-key hourly cap (rows older than an hour are pruned
    // by each regeneration; a deleted key's rows go with it).
    r#"
CREATE TABLE regenerations (key_sid TEXT NOT NULL, at INTEGER NOT NULL);
CREATE INDEX regenerations_by_key ON regenerations (key_sid, at);
"#,
    // 4: the fleet view: what each edge said about itself on its last feed request.
    r#"
CREATE TABLE edges (
    id        TEXT PRIMARY KEY,
    region    TEXT NOT NULL,
    version   INTEGER NOT NULL,
    -- unix milliseconds
    last_seen_ms INTEGER NOT NULL
);
CREATE INDEX edges_by_last_seen ON edges (last_seen_ms);
"#,
    // 5: the further regions an account may be served in (JSON list; NULL: its home region only).
    r#"
ALTER TABLE accounts ADD COLUMN regions TEXT;
"#,
    // 6: usage from the edges (crate::usage): counts per account, key ('' for the account's own
    // credentials), bucket (width 60 or 3600 seconds, start in unix seconds) and outcome
    // ('allowed' or a reason code); the batch ids applied (each applied once); when each secret
    // (by digest) and each key was last used. No trigger: usage is not config.
    r#"
CREATE TABLE usage_counts (
    account_sid TEXT NOT NULL,
    width       INTEGER NOT NULL,
    start       INTEGER NOT NULL,
    key_sid     TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    n           INTEGER NOT NULL,
    PRIMARY KEY (account_sid, width, start, key_sid, outcome)
) WITHOUT ROWID;
CREATE INDEX usage_counts_by_start ON usage_counts (width, start);
CREATE TABLE usage_batches (id TEXT PRIMARY KEY, applied_at INTEGER NOT NULL);
CREATE INDEX usage_batches_by_time ON usage_batches (applied_at);
CREATE TABLE secret_last_used (
    digest       TEXT PRIMARY KEY,
    owner_sid    TEXT NOT NULL,
    last_used_at INTEGER NOT NULL
);
CREATE TABLE key_last_used (sid TEXT PRIMARY KEY, last_used_at INTEGER NOT NULL);
"#,
];

/// Opens (creating if needed) and migrates the database file.
pub fn open(path: &Path) -> Result<Connection, String> {
    let mut conn = Connection::open(path)
        .map_err(|e| format!("cannot open database {}: {e}", path.display()))?;
    let setup = || -> rusqlite::Result<()> {
        configure(&conn)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(rusqlite::Error::InvalidQuery);
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
        Ok(())
    };
    setup().map_err(|e| format!("cannot configure database {}: {e}", path.display()))?;
    migrate(&mut conn).map_err(|e| format!("cannot migrate database {}: {e}", path.display()))?;
    Ok(conn)
}

/// Settings of every connection, writer or reader.
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // Reads through a memory map (SQLite caps it at 2 GiB) instead of a pread into its small
    // page cache per b-tree page: a full walk of the change feed at 1M keys reads about 650 MB
    // of pages in random order (a fifth faster measured).
    conn.execute_batch("PRAGMA mmap_size = 2147418112;")
}

/// Read connections in the pool (each request holds one only while it reads).
pub const READERS: u32 = 8;

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let applied: usize = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
    }
    tx.commit()
}

/// The writer and the pool of readers. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
    readers: r2d2::Pool<r2d2_sqlite::SqliteConnectionManager>,
}

impl Db {
    /// Opens (creating and migrating) the file: the writer and a pool of read-only connections.
    pub fn open(path: &Path) -> Result<Db, String> {
        Db::new(open(path)?, path)
    }

    /// The writer `conn` (opened by [`open`], so the file exists, is in WAL mode and migrated)
    /// and a pool of read-only connections to the same file.
    pub fn new(conn: Connection, path: &Path) -> Result<Db, String> {
        let manager = r2d2_sqlite::SqliteConnectionManager::file(path)
            .with_flags(
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | rusqlite::OpenFlags::SQLITE_OPEN_URI,
            )
            .with_init(|c| configure(c).and_then(|()| c.execute_batch("PRAGMA query_only = ON;")));
        let readers = r2d2::Pool::builder()
            .max_size(READERS)
            .min_idle(Some(1))
            .connection_timeout(std::time::Duration::from_secs(10))
            .build(manager)
            .map_err(|e| format!("cannot open read connections to {}: {e}", path.display()))?;
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
            readers,
        })
    }

    /// Runs `f` in a read transaction on a read-only connection from the pool. Writes fail
    /// there (`query_only`).
    pub fn read<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R, Error>) -> Result<R, Error> {
        let mut conn = self
            .readers
            .get()
            .map_err(|e| internal("no read connection", e))?;
        read(&mut conn, f)
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction on the writer; commits if it returns `Ok`.
    pub fn write<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R, Error>) -> Result<R, Error> {
        // A panic cannot leave a transaction open (Transaction rolls back on drop), so a
        // poisoned lock still guards a usable connection.
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        write(&mut guard, f)
    }
}

/// Runs `f` in a read transaction on `conn` (one snapshot).
pub fn read<R>(
    conn: &mut Connection,
    f: impl FnOnce(&mut dyn Tx) -> Result<R, Error>,
) -> Result<R, Error> {
    let mut tx = conn.transaction()?;
    let r = f(&mut tx)?;
    tx.commit()?;
    Ok(r)
}

/// Runs `f` in one `BEGIN IMMEDIATE` transaction on `conn`; commits if it returns `Ok`.
pub fn write<R>(
    conn: &mut Connection,
    f: impl FnOnce(&mut dyn Tx) -> Result<R, Error>,
) -> Result<R, Error> {
    let mut tx = write_tx(conn)?;
    let r = f(&mut tx)?;
    tx.commit()?;
    Ok(r)
}

/// Starts a write transaction (takes the write lock now, so read-then-write cannot race).
pub fn write_tx(conn: &mut Connection) -> Result<Transaction<'_>, Error> {
    Ok(conn.transaction_with_behavior(TransactionBehavior::Immediate)?)
}

pub fn version(conn: &Connection) -> Result<u64, Error> {
    let v: i64 = conn.query_row("SELECT version FROM config_version WHERE id = 1", [], |r| {
        r.get(0)
    })?;
    Ok(u64::try_from(v).unwrap_or(0))
}

/// Increments the config version inside the caller's transaction, and records every account
/// and key the transaction changed (noted in `pending_changes` by the triggers) in the change
/// log at the new version. Called once, after the changes, by every write that changes what the
/// edge sees.
pub fn bump(tx: &Transaction<'_>) -> Result<u64, Error> {
    let v: i64 = tx.query_row(
        "UPDATE config_version SET version = version + 1 WHERE id = 1 RETURNING version",
        [],
        |r| r.get(0),
    )?;
    tx.execute(
        "INSERT INTO changelog (sid, version) SELECT sid, ?1 FROM pending_changes WHERE true
         ON CONFLICT (sid) DO UPDATE SET version = excluded.version",
        [v],
    )?;
    tx.execute("DELETE FROM pending_changes", [])?;
    Ok(u64::try_from(v).unwrap_or(0))
}

/// The version the change log starts at (see migration 2): a delta `since` an older version
/// may miss deletions and is refused.
pub fn changelog_floor(conn: &Connection) -> Result<u64, Error> {
    let v: i64 = conn.query_row(
        "SELECT version FROM changelog_floor WHERE id = 1",
        [],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(v).unwrap_or(0))
}

fn json_col<T: DeserializeOwned>(r: &Row<'_>, idx: usize) -> rusqlite::Result<Option<T>> {
    let s: Option<String> = r.get(idx)?;
    s.map(|s| {
        serde_json::from_str(&s)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e)))
    })
    .transpose()
}

fn to_json<T: serde::Serialize>(v: &Option<T>) -> Result<Option<String>, Error> {
    v.as_ref()
        .map(|v| serde_json::to_string(v).map_err(|e| internal("serialize column", e)))
        .transpose()
}

fn bad_col(idx: usize, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, format!("invalid {what}").into())
}

// ---- operator tokens ----

pub fn insert_operator_token(
    tx: &Transaction<'_>,
    sid: &str,
    kind: OperatorKind,
    digest: &str,
    now: i64,
) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO operator_tokens (sid, kind, digest, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![sid, kind.as_str(), digest, now],
    )?;
    Ok(())
}

pub fn find_operator_token(conn: &Connection, digest: &str) -> Result<Option<OperatorKind>, Error> {
    let kind: Option<String> = conn
        .query_row(
            "SELECT kind FROM operator_tokens WHERE digest = ?1",
            [digest],
            |r| r.get(0),
        )
        .optional()?;
    Ok(kind.as_deref().and_then(OperatorKind::parse))
}

pub fn has_admin(conn: &Connection) -> Result<bool, Error> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM operator_tokens WHERE kind = 'admin')",
        [],
        |r| r.get(0),
    )?)
}

// ---- accounts ----

const ACCOUNT_COLS: &str =
    "sid, friendly_name, status, region, allowed_ips, limits, created_at, updated_at, regions";

fn account_row(r: &Row<'_>) -> rusqlite::Result<Account> {
    let status: String = r.get(2)?;
    Ok(Account {
        sid: r.get(0)?,
        friendly_name: r.get(1)?,
        status: parse_status(&status).ok_or_else(|| bad_col(2, "status"))?,
        region: r.get(3)?,
        allowed_ips: json_col(r, 4)?,
        limits: json_col::<AccountLimitsDoc>(r, 5)?,
        created_at: r.get(6)?,
        updated_at: r.get(7)?,
        regions: json_col(r, 8)?,
    })
}

pub fn insert_account(tx: &Transaction<'_>, a: &Account) -> Result<(), Error> {
    tx.execute(
        &format!(
            "INSERT INTO accounts ({ACCOUNT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
        ),
        params![
            a.sid,
            a.friendly_name,
            status_str(a.status),
            a.region,
            to_json(&a.allowed_ips)?,
            to_json(&a.limits)?,
            a.created_at,
            a.updated_at,
            to_json(&a.regions)?
        ],
    )?;
    Ok(())
}

pub fn update_account(tx: &Transaction<'_>, a: &Account) -> Result<(), Error> {
    tx.execute(
        "UPDATE accounts SET friendly_name = ?2, status = ?3, region = ?4, allowed_ips = ?5, limits = ?6, updated_at = ?7,
             regions = ?8
         WHERE sid = ?1",
        params![a.sid, a.friendly_name, status_str(a.status), a.region, to_json(&a.allowed_ips)?, to_json(&a.limits)?, a.updated_at, to_json(&a.regions)?],
    )?;
    Ok(())
}

pub fn get_account(conn: &Connection, sid: &str) -> Result<Option<Account>, Error> {
    Ok(conn
        .query_row(
            &format!("SELECT {ACCOUNT_COLS} FROM accounts WHERE sid = ?1"),
            [sid],
            account_row,
        )
        .optional()?)
}

pub fn all_accounts(conn: &Connection) -> Result<Vec<Account>, Error> {
    let mut st = conn.prepare(&format!("SELECT {ACCOUNT_COLS} FROM accounts ORDER BY sid"))?;
    let rows = st
        .query_map([], account_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

// ---- keys ----

const KEY_COLS: &str =
    "sid, account_sid, friendly_name, role, apis, allowed_ips, limits, expires_at, enabled, generation, created_at, updated_at";

fn key_row(r: &Row<'_>) -> rusqlite::Result<Key> {
    let role: String = r.get(3)?;
    Ok(Key {
        sid: r.get(0)?,
        account_sid: r.get(1)?,
        friendly_name: r.get(2)?,
        role: parse_role(&role).ok_or_else(|| bad_col(3, "role"))?,
        apis: json_col(r, 4)?,
        allowed_ips: json_col(r, 5)?,
        limits: json_col::<KeyLimitsDoc>(r, 6)?,
        expires_at: r.get(7)?,
        enabled: r.get(8)?,
        generation: r.get(9)?,
        created_at: r.get(10)?,
        updated_at: r.get(11)?,
    })
}

pub fn insert_key(tx: &Transaction<'_>, k: &Key) -> Result<(), Error> {
    tx.execute(
        &format!("INSERT INTO keys ({KEY_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
        params![
            k.sid,
            k.account_sid,
            k.friendly_name,
            role_str(k.role),
            to_json(&k.apis)?,
            to_json(&k.allowed_ips)?,
            to_json(&k.limits)?,
            k.expires_at,
            k.enabled,
            k.generation,
            k.created_at,
            k.updated_at
        ],
    )?;
    Ok(())
}

/// Writes the key's mutable fields and bumps its generation, if its generation is still
/// `k.generation`. Returns whether the row was updated (false: changed concurrently).
pub fn update_key(tx: &Transaction<'_>, k: &Key) -> Result<bool, Error> {
    let n = tx.execute(
        "UPDATE keys SET friendly_name = ?3, role = ?4, apis = ?5, allowed_ips = ?6, limits = ?7, expires_at = ?8,
                enabled = ?9, updated_at = ?10, generation = generation + 1
         WHERE sid = ?1 AND generation = ?2",
        params![
            k.sid,
            k.generation,
            k.friendly_name,
            role_str(k.role),
            to_json(&k.apis)?,
            to_json(&k.allowed_ips)?,
            to_json(&k.limits)?,
            k.expires_at,
            k.enabled,
            k.updated_at
        ],
    )?;
    Ok(n == 1)
}

/// A key of an account (`None` if unknown or another account's).
pub fn get_key(conn: &Connection, account_sid: &str, sid: &str) -> Result<Option<Key>, Error> {
    Ok(conn
        .query_row(
            &format!("SELECT {KEY_COLS} FROM keys WHERE sid = ?1 AND account_sid = ?2"),
            [sid, account_sid],
            key_row,
        )
        .optional()?)
}

pub fn get_key_by_sid(conn: &Connection, sid: &str) -> Result<Option<Key>, Error> {
    Ok(conn
        .query_row(
            &format!("SELECT {KEY_COLS} FROM keys WHERE sid = ?1"),
            [sid],
            key_row,
        )
        .optional()?)
}

/// An account's keys sorted by date updated (then SID), `limit` from `offset`.
pub fn list_keys(
    conn: &Connection,
    account_sid: &str,
    offset: u64,
    limit: u64,
) -> Result<Vec<Key>, Error> {
    let mut st = conn.prepare(&format!(
        "SELECT {KEY_COLS} FROM keys WHERE account_sid = ?1 ORDER BY updated_at, sid LIMIT ?2 OFFSET ?3"
    ))?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let offset = i64::try_from(offset).unwrap_or(i64::MAX);
    let rows = st
        .query_map(params![account_sid, limit, offset], key_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn all_keys(conn: &Connection) -> Result<Vec<Key>, Error> {
    let mut st = conn.prepare(&format!(
        "SELECT {KEY_COLS} FROM keys ORDER BY account_sid, sid"
    ))?;
    let rows = st.query_map([], key_row)?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// How many keys an account has.
pub fn count_keys(conn: &Connection, account_sid: &str) -> Result<u64, Error> {
    let n: i64 = conn.query_row(
        "SELECT count(*) FROM keys WHERE account_sid = ?1",
        [account_sid],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Records a regeneration of `key_sid` at `at`, forgets those before `forget_before`, and
/// returns how many remain (this one included) and when the oldest of them was.
pub fn note_regeneration(
    tx: &Transaction<'_>,
    key_sid: &str,
    at: i64,
    forget_before: i64,
) -> Result<(u64, i64), Error> {
    tx.execute(
        "DELETE FROM regenerations WHERE key_sid = ?1 AND at < ?2",
        params![key_sid, forget_before],
    )?;
    tx.execute(
        "INSERT INTO regenerations (key_sid, at) VALUES (?1, ?2)",
        params![key_sid, at],
    )?;
    let (n, oldest): (i64, Option<i64>) = tx.query_row(
        "SELECT count(*), min(at) FROM regenerations WHERE key_sid = ?1",
        [key_sid],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((u64::try_from(n).unwrap_or(0), oldest.unwrap_or(at)))
}

pub fn delete_key(tx: &Transaction<'_>, sid: &str) -> Result<bool, Error> {
    tx.execute("DELETE FROM regenerations WHERE key_sid = ?1", [sid])?;
    tx.execute("DELETE FROM secrets WHERE owner_sid = ?1", [sid])?;
    Ok(tx.execute("DELETE FROM keys WHERE sid = ?1", [sid])? == 1)
}

// ---- secrets ----

fn secret_row(r: &Row<'_>) -> rusqlite::Result<StoredSecret> {
    Ok(StoredSecret {
        digest: r.get(0)?,
        owner_sid: r.get(1)?,
        not_after: r.get(2)?,
        created_at: r.get(3)?,
    })
}

pub fn insert_secret(
    tx: &Transaction<'_>,
    owner_sid: &str,
    digest: &str,
    now: i64,
) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO secrets (digest, owner_sid, not_after, created_at) VALUES (?1, ?2, NULL, ?3)",
        params![digest, owner_sid, now],
    )?;
    Ok(())
}

/// An owner's secrets: the current one first, then rotated ones by end of grace.
pub fn secrets_of(conn: &Connection, owner_sid: &str) -> Result<Vec<StoredSecret>, Error> {
    let mut st = conn.prepare(
        "SELECT digest, owner_sid, not_after, created_at FROM secrets WHERE owner_sid = ?1
         ORDER BY not_after IS NOT NULL, not_after DESC, created_at DESC",
    )?;
    let rows = st
        .query_map([owner_sid], secret_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn all_secrets(conn: &Connection) -> Result<Vec<StoredSecret>, Error> {
    let mut st = conn.prepare(&format!("{OWNED_SECRETS} ORDER BY {SECRETS_ORDER}"))?;
    let rows = st
        .query_map([], secret_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn find_secret(conn: &Connection, digest: &str) -> Result<Option<StoredSecret>, Error> {
    Ok(conn
        .query_row(
            "SELECT digest, owner_sid, not_after, created_at FROM secrets WHERE digest = ?1",
            [digest],
            secret_row,
        )
        .optional()?)
}

/// Ends the grace of the owner's current secret at `not_after`; returns how many were changed.
pub fn retire_current(
    tx: &Transaction<'_>,
    owner_sid: &str,
    not_after: i64,
) -> Result<usize, Error> {
    Ok(tx.execute(
        "UPDATE secrets SET not_after = ?2 WHERE owner_sid = ?1 AND not_after IS NULL",
        params![owner_sid, not_after],
    )?)
}

/// Deletes the owner's rotated secrets (all of them, or only those whose grace ended before `now`).
pub fn delete_previous(
    tx: &Transaction<'_>,
    owner_sid: &str,
    expired_before: Option<i64>,
) -> Result<usize, Error> {
    Ok(match expired_before {
        None => tx.execute(
            "DELETE FROM secrets WHERE owner_sid = ?1 AND not_after IS NOT NULL",
            [owner_sid],
        )?,
        Some(now) => tx.execute(
            "DELETE FROM secrets WHERE owner_sid = ?1 AND not_after IS NOT NULL AND not_after < ?2",
            params![owner_sid, now],
        )?,
    })
}

pub fn delete_all_secrets(tx: &Transaction<'_>, owner_sid: &str) -> Result<usize, Error> {
    Ok(tx.execute("DELETE FROM secrets WHERE owner_sid = ?1", [owner_sid])?)
}

// ---- change log ----

/// Up to this many changed SIDs (counted on the version index), a delta page is read from the
/// version index; beyond it, in SID order from the primary key. See [`changed_sids`].
pub fn dense_delta(limit: usize) -> usize {
    limit.saturating_mul(8).clamp(2_000, 20_000)
}

/// SIDs changed after version `since`, greater than `after`, ascending, at most `limit`.
///
/// `since == 0` (a full sync) reads the primary key from `after`. A delta first counts its
/// changes on the version index, stopping at [`dense_delta`]: a sparse delta (the edge's usual
/// poll: a handful of changes) reads them from that index and sorts them, a cost proportional to
/// the changes; a dense one reads the primary key from `after` and skips rows whose version is
/// not newer, finding `limit` matches within about `limit × rows / changes` rows. Either way a
/// page costs a bounded amount of work (measured in `changes_query_plans_at_200k_rows`).
pub fn changed_sids(
    conn: &Connection,
    since: u64,
    after: &str,
    limit: usize,
) -> Result<Vec<String>, Error> {
    let since = i64::try_from(since).unwrap_or(i64::MAX);
    let sql = if since == 0 {
        FULL_PAGE
    } else {
        let dense = dense_delta(limit);
        let n: usize = conn.prepare_cached(COUNT_DELTA)?.query_row(
            params![since, i64::try_from(dense).unwrap_or(i64::MAX)],
            |r| r.get(0),
        )?;
        if n < dense {
            SPARSE_PAGE
        } else {
            DENSE_PAGE
        }
    };
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut st = conn.prepare_cached(sql)?;
    let rows = st
        .query_map(params![since, after, limit], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(rows)
}

/// `select` restricted to `owners` (by column `col`), ordered by `order`, and its arguments.
fn owners_sql(
    owners: Owners<'_>,
    select: &str,
    col: &str,
    order: &str,
) -> Result<(String, Vec<String>), Error> {
    let (cond, args) = match owners {
        Owners::Listed(sids) => (
            format!("{col} IN (SELECT value FROM json_each(?1))"),
            vec![serde_json::to_string(sids).map_err(|e| internal("serialize SID list", e))?],
        ),
        Owners::Between(after, last) => (
            format!("{col} > ?1 AND {col} <= ?2"),
            vec![after.to_owned(), last.to_owned()],
        ),
    };
    Ok((format!("{select} WHERE {cond} ORDER BY {order}"), args))
}

fn owners_query<T>(
    conn: &Connection,
    owners: Owners<'_>,
    select: &str,
    col: &str,
    order: &str,
    row: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, Error> {
    let (sql, args) = owners_sql(owners, select, col, order)?;
    let mut st = conn.prepare_cached(&sql)?;
    let rows = st
        .query_map(rusqlite::params_from_iter(args), row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The accounts among `owners`, ascending by SID.
pub fn accounts_in(conn: &Connection, owners: Owners<'_>) -> Result<Vec<Account>, Error> {
    let select = format!("SELECT {ACCOUNT_COLS} FROM accounts");
    owners_query(conn, owners, &select, "sid", "sid", account_row)
}

const OWNED_SECRETS: &str = "SELECT digest, owner_sid, not_after, created_at FROM secrets";
const SECRETS_ORDER: &str = "owner_sid, not_after IS NOT NULL, not_after DESC, created_at DESC";

/// The keys among `owners`, ascending by SID.
pub fn keys_in(conn: &Connection, owners: Owners<'_>) -> Result<Vec<Key>, Error> {
    let select = format!("SELECT {KEY_COLS} FROM keys");
    owners_query(conn, owners, &select, "sid", "sid", key_row)
}

/// The secrets of the owners among `owners`, in [`all_secrets`]' order.
pub fn secrets_in(conn: &Connection, owners: Owners<'_>) -> Result<Vec<StoredSecret>, Error> {
    owners_query(
        conn,
        owners,
        OWNED_SECRETS,
        "owner_sid",
        SECRETS_ORDER,
        secret_row,
    )
}

/// `?1` since, `?2` cap.
const COUNT_DELTA: &str = "SELECT count(*) FROM (SELECT 1 FROM changelog INDEXED BY changelog_by_version WHERE version > ?1 LIMIT ?2)";
/// `?1` since (unused), `?2` after, `?3` limit.
const FULL_PAGE: &str =
    "SELECT sid FROM changelog NOT INDEXED WHERE sid > ?2 ORDER BY sid LIMIT ?3";
const SPARSE_PAGE: &str = "SELECT sid FROM changelog INDEXED BY changelog_by_version WHERE version > ?1 AND sid > ?2 ORDER BY sid LIMIT ?3";
const DENSE_PAGE: &str =
    "SELECT sid FROM changelog NOT INDEXED WHERE sid > ?2 AND version > ?1 ORDER BY sid LIMIT ?3";

// ---- fleet ----

pub fn note_edges(
    conn: &Connection,
    seen: &[EdgeSeen],
    forget_before_ms: i64,
) -> Result<(), Error> {
    conn.prepare_cached("DELETE FROM edges WHERE last_seen_ms < ?1")?
        .execute([forget_before_ms])?;
    let mut st = conn.prepare_cached(EDGE_UPSERT)?;
    for e in seen {
        let version = e.version.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        st.execute(params![e.id, e.region, version, e.last_seen_ms])?;
    }
    Ok(())
}

/// `?1` id, `?2` region, `?3` version or NULL, `?4` unix ms.
const EDGE_UPSERT: &str = "INSERT INTO edges (id, region, version, last_seen_ms)
    VALUES (?1, ?2, COALESCE(?3, 0), ?4)
    ON CONFLICT (id) DO UPDATE SET region = excluded.region,
        version = CASE WHEN ?3 IS NULL THEN edges.version ELSE excluded.version END,
        last_seen_ms = excluded.last_seen_ms
    WHERE excluded.last_seen_ms >= edges.last_seen_ms";

pub fn edges(conn: &Connection, since_ms: i64) -> Result<Vec<EdgeSeen>, Error> {
    let mut st = conn.prepare_cached(
        "SELECT id, region, version, last_seen_ms FROM edges WHERE last_seen_ms >= ?1 ORDER BY id",
    )?;
    let rows = st
        .query_map([since_ms], |r| {
            Ok(EdgeSeen {
                id: r.get(0)?,
                region: r.get(1)?,
                version: Some(u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0)),
                last_seen_ms: r.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// A SQLite transaction is the store's [`Tx`]: each method is the function of the same name.
impl Tx for Transaction<'_> {
    fn version(&mut self) -> Result<u64, Error> {
        version(self)
    }
    fn bump(&mut self) -> Result<u64, Error> {
        bump(self)
    }
    fn changelog_floor(&mut self) -> Result<u64, Error> {
        changelog_floor(self)
    }
    fn insert_operator_token(
        &mut self,
        sid: &str,
        kind: OperatorKind,
        digest: &str,
        now: i64,
    ) -> Result<(), Error> {
        insert_operator_token(self, sid, kind, digest, now)
    }
    fn find_operator_token(&mut self, digest: &str) -> Result<Option<OperatorKind>, Error> {
        find_operator_token(self, digest)
    }
    fn has_admin(&mut self) -> Result<bool, Error> {
        has_admin(self)
    }
    fn insert_account(&mut self, a: &Account) -> Result<(), Error> {
        insert_account(self, a)
    }
    fn update_account(&mut self, a: &Account) -> Result<(), Error> {
        update_account(self, a)
    }
    fn get_account(&mut self, sid: &str) -> Result<Option<Account>, Error> {
        get_account(self, sid)
    }
    fn all_accounts(&mut self) -> Result<Vec<Account>, Error> {
        all_accounts(self)
    }
    fn insert_key(&mut self, k: &Key) -> Result<(), Error> {
        insert_key(self, k)
    }
    fn update_key(&mut self, k: &Key) -> Result<bool, Error> {
        update_key(self, k)
    }
    fn get_key(&mut self, account_sid: &str, sid: &str) -> Result<Option<Key>, Error> {
        get_key(self, account_sid, sid)
    }
    fn get_key_by_sid(&mut self, sid: &str) -> Result<Option<Key>, Error> {
        get_key_by_sid(self, sid)
    }
    fn list_keys(&mut self, account_sid: &str, offset: u64, limit: u64) -> Result<Vec<Key>, Error> {
        list_keys(self, account_sid, offset, limit)
    }
    fn all_keys(&mut self) -> Result<Vec<Key>, Error> {
        all_keys(self)
    }
    fn count_keys(&mut self, account_sid: &str) -> Result<u64, Error> {
        count_keys(self, account_sid)
    }
    fn note_regeneration(
        &mut self,
        key_sid: &str,
        at: i64,
        forget_before: i64,
    ) -> Result<(u64, i64), Error> {
        note_regeneration(self, key_sid, at, forget_before)
    }
    fn delete_key(&mut self, sid: &str) -> Result<bool, Error> {
        delete_key(self, sid)
    }
    fn insert_secret(&mut self, owner_sid: &str, digest: &str, now: i64) -> Result<(), Error> {
        insert_secret(self, owner_sid, digest, now)
    }
    fn secrets_of(&mut self, owner_sid: &str) -> Result<Vec<StoredSecret>, Error> {
        secrets_of(self, owner_sid)
    }
    fn all_secrets(&mut self) -> Result<Vec<StoredSecret>, Error> {
        all_secrets(self)
    }
    fn find_secret(&mut self, digest: &str) -> Result<Option<StoredSecret>, Error> {
        find_secret(self, digest)
    }
    fn retire_current(&mut self, owner_sid: &str, not_after: i64) -> Result<usize, Error> {
        retire_current(self, owner_sid, not_after)
    }
    fn delete_previous(
        &mut self,
        owner_sid: &str,
        expired_before: Option<i64>,
    ) -> Result<usize, Error> {
        delete_previous(self, owner_sid, expired_before)
    }
    fn delete_all_secrets(&mut self, owner_sid: &str) -> Result<usize, Error> {
        delete_all_secrets(self, owner_sid)
    }
    fn changed_sids(
        &mut self,
        since: u64,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, Error> {
        changed_sids(self, since, after, limit)
    }
    fn accounts_in(&mut self, owners: Owners<'_>) -> Result<Vec<Account>, Error> {
        accounts_in(self, owners)
    }
    fn keys_in(&mut self, owners: Owners<'_>) -> Result<Vec<Key>, Error> {
        keys_in(self, owners)
    }
    fn secrets_in(&mut self, owners: Owners<'_>) -> Result<Vec<StoredSecret>, Error> {
        secrets_in(self, owners)
    }
    fn note_edges(&mut self, seen: &[EdgeSeen], forget_before_ms: i64) -> Result<(), Error> {
        note_edges(self, seen, forget_before_ms)
    }
    fn lock_writes(&mut self) -> Result<(), Error> {
        Ok(())
    }
    fn savepoint(&mut self) -> Result<(), Error> {
        Ok(self.execute_batch("SAVEPOINT write")?)
    }
    fn release_savepoint(&mut self) -> Result<(), Error> {
        Ok(self.execute_batch("RELEASE SAVEPOINT write")?)
    }
    fn rollback_to_savepoint(&mut self) -> Result<(), Error> {
        Ok(self.execute_batch("ROLLBACK TO SAVEPOINT write; RELEASE SAVEPOINT write")?)
    }
    fn migrations_applied(&mut self) -> Result<usize, Error> {
        let n: i64 = self.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        Ok(usize::try_from(n).unwrap_or(0))
    }
    fn edges(&mut self, since_ms: i64) -> Result<Vec<EdgeSeen>, Error> {
        edges(self, since_ms)
    }
    fn claim_usage_batch(&mut self, id: &str, now: i64) -> Result<bool, Error> {
        let n = self
            .prepare_cached(
                "INSERT INTO usage_batches (id, applied_at) VALUES (?1, ?2)
                 ON CONFLICT (id) DO NOTHING",
            )?
            .execute(params![id, now])?;
        Ok(n == 1)
    }
    fn add_usage(&mut self, row: &UsageRow) -> Result<(), Error> {
        self.prepare_cached(
            "INSERT INTO usage_counts (account_sid, width, start, key_sid, outcome, n)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (account_sid, width, start, key_sid, outcome)
             DO UPDATE SET n = n + excluded.n",
        )?
        .execute(params![
            row.account_sid,
            row.width,
            row.start,
            row.key_sid,
            row.outcome,
            row.n
        ])?;
        Ok(())
    }
    fn note_secret_used(&mut self, owner_sid: &str, tag: &str, at: i64) -> Result<bool, Error> {
        let n = self
            .prepare_cached(
                "INSERT INTO secret_last_used (digest, owner_sid, last_used_at)
                 SELECT digest, owner_sid, ?3 FROM secrets
                 WHERE owner_sid = ?1 AND substr(digest, 1, 16) = ?2
                 ON CONFLICT (digest) DO UPDATE
                 SET last_used_at = max(last_used_at, excluded.last_used_at)",
            )?
            .execute(params![owner_sid, tag, at])?;
        Ok(n > 0)
    }
    fn note_key_used(&mut self, key_sid: &str, at: i64) -> Result<(), Error> {
        self.prepare_cached(
            "INSERT INTO key_last_used (sid, last_used_at)
             SELECT sid, ?2 FROM keys WHERE sid = ?1
             ON CONFLICT (sid) DO UPDATE
             SET last_used_at = max(last_used_at, excluded.last_used_at)",
        )?
        .execute(params![key_sid, at])?;
        Ok(())
    }
    fn usage_counts(
        &mut self,
        account_sid: &str,
        key_sid: Option<&str>,
        width: i64,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, String, u64)>, Error> {
        let mut st = self.prepare_cached(
            "SELECT start, outcome, sum(n) FROM usage_counts
             WHERE account_sid = ?1 AND width = ?2 AND start >= ?3 AND start < ?4
               AND (?5 IS NULL OR key_sid = ?5)
             GROUP BY start, outcome ORDER BY start, outcome",
        )?;
        let rows = st
            .query_map(params![account_sid, width, from, to, key_sid], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
    fn last_used(&mut self, owner_sid: &str) -> Result<LastUsed, Error> {
        let key = self
            .prepare_cached("SELECT last_used_at FROM key_last_used WHERE sid = ?1")?
            .query_row([owner_sid], |r| r.get::<_, i64>(0))
            .optional()?;
        let mut st = self.prepare_cached(
            "SELECT digest, last_used_at FROM secret_last_used WHERE owner_sid = ?1",
        )?;
        let secrets = st
            .query_map([owner_sid], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LastUsed { key, secrets })
    }
    fn prune_usage(&mut self, before: &UsagePrune) -> Result<u64, Error> {
        let mut n = 0;
        n += self.execute(
            "DELETE FROM usage_counts WHERE width = 60 AND start < ?1",
            [before.minutes],
        )?;
        n += self.execute(
            "DELETE FROM usage_counts WHERE width = 3600 AND start < ?1",
            [before.hours],
        )?;
        n += self.execute(
            "DELETE FROM usage_batches WHERE applied_at < ?1",
            [before.batches],
        )?;
        n += self.execute(
            "DELETE FROM secret_last_used WHERE digest NOT IN (SELECT digest FROM secrets)",
            [],
        )?;
        n += self.execute(
            "DELETE FROM key_last_used WHERE sid NOT IN (SELECT sid FROM keys)",
            [],
        )?;
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn plan(conn: &Connection, sql: &str) -> String {
        let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let n = st.parameter_count();
        let args: Vec<i64> = vec![1; n];
        st.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
            .join("; ")
    }

    #[test]
    fn change_queries_use_the_intended_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("k.db")).unwrap();
        assert_eq!(
            plan(&conn, FULL_PAGE),
            "SEARCH changelog USING PRIMARY KEY (sid>?)"
        );
        assert_eq!(
            plan(&conn, DENSE_PAGE),
            "SEARCH changelog USING PRIMARY KEY (sid>?)"
        );
        assert_eq!(
            plan(&conn, SPARSE_PAGE),
            "SEARCH changelog USING COVERING INDEX changelog_by_version (version>?); USE TEMP B-TREE FOR ORDER BY"
        );
        // A full walk's page reads its SID range from the SID indexes; a delta looks its
        // SIDs up one by one.
        let keys = format!("SELECT {KEY_COLS} FROM keys");
        let range = Owners::Between("", "");
        let listed = Owners::Listed(&[]);
        let sql = |o: Owners<'_>, select: &str, col: &str, order: &str| {
            owners_sql(o, select, col, order).unwrap().0
        };
        assert_eq!(
            plan(&conn, &sql(range, &keys, "sid", "sid")),
            "SEARCH keys USING INDEX sqlite_autoindex_keys_1 (sid>? AND sid<?)"
        );
        assert_eq!(
            plan(
                &conn,
                &sql(range, OWNED_SECRETS, "owner_sid", SECRETS_ORDER)
            ),
            "SEARCH secrets USING INDEX secrets_by_owner (owner_sid>? AND owner_sid<?); \
             USE TEMP B-TREE FOR LAST 3 TERMS OF ORDER BY"
        );
        let by_sid = plan(&conn, &sql(listed, &keys, "sid", "sid"));
        assert!(
            by_sid.contains("SEARCH keys USING INDEX sqlite_autoindex_keys_1 (sid=?)"),
            "{by_sid}"
        );
        let count = plan(&conn, COUNT_DELTA);
        assert!(
            count
                .contains("SEARCH changelog USING COVERING INDEX changelog_by_version (version>?)"),
            "{count}"
        );
    }

    /// Whichever plan a page takes, a walk yields exactly the changed SIDs, ascending.
    #[test]
    fn walks_return_exactly_the_changes_whatever_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("k.db")).unwrap();
        let mut rows: Vec<(String, i64)> = (0u64..6000)
            .map(|i| {
                let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                (format!("SK{h:016x}"), 2 + (h >> 7) as i64 % 3000)
            })
            .collect();
        let tx = conn.transaction().unwrap();
        for (sid, v) in &rows {
            tx.execute(
                "INSERT INTO changelog (sid, version) VALUES (?1, ?2)",
                params![sid, v],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        rows.sort();
        for since in [0u64, 1, 100, 2000, 2990, 3001, 4000] {
            let want: Vec<&str> = rows
                .iter()
                .filter(|(_, v)| *v as u64 > since)
                .map(|(s, _)| s.as_str())
                .collect();
            for limit in [9usize, 1000, 3000] {
                let mut got = Vec::new();
                let mut after = String::new();
                loop {
                    let page = changed_sids(&conn, since, &after, limit).unwrap();
                    assert!(page.len() <= limit);
                    got.extend(page.iter().cloned());
                    match page.last() {
                        Some(last) if page.len() == limit => after = last.clone(),
                        _ => break,
                    }
                }
                assert_eq!(got, want, "since {since} limit {limit}");
            }
        }
    }

    #[test]
    fn page_loads_look_each_sid_up() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("k.db")).unwrap();
        for (table, col) in [
            ("accounts", "sid"),
            ("keys", "sid"),
            ("secrets", "owner_sid"),
        ] {
            let p = plan(
                &conn,
                &format!("SELECT * FROM {table} WHERE {col} IN (SELECT value FROM json_each(?1)) ORDER BY {col}"),
            );
            assert!(
                p.starts_with(&format!("SEARCH {table} USING INDEX ")),
                "{p}"
            );
            assert!(!p.contains(&format!("SCAN {table}")), "{p}");
        }
    }

    /// Milliseconds for the slowest page and the whole walk, and the number of pages.
    fn walk(
        conn: &Connection,
        page: impl Fn(&str) -> Vec<String>,
        limit: usize,
    ) -> (f64, f64, usize) {
        let mut after = String::new();
        let started = Instant::now();
        let (mut slowest, mut pages) = (0f64, 0);
        loop {
            let t = Instant::now();
            let sids = page(&after);
            slowest = slowest.max(t.elapsed().as_secs_f64() * 1e3);
            pages += 1;
            match sids.last() {
                Some(last) if sids.len() == limit => after = last.clone(),
                _ => break,
            }
        }
        let _ = conn;
        (slowest, started.elapsed().as_secs_f64() * 1e3, pages)
    }

    fn fixed(conn: &Connection, sql: &str, since: u64, after: &str, limit: usize) -> Vec<String> {
        conn.prepare_cached(sql)
            .unwrap()
            .query_map(params![since as i64, after, limit as i64], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// The page queries at 200k change-log rows, timed: each plan on its own and the adaptive
    /// choice of [`changed_sids`]. Run with
    /// `cargo test --release -p keygate-control --lib -- --ignored --nocapture changes_query_plans`.
    #[test]
    #[ignore]
    fn changes_query_plans_at_200k_rows() {
        // KEYGATE_BENCH_ROWS=1000000 for the 1M figures.
        let n_rows: u64 = std::env::var("KEYGATE_BENCH_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("k.db")).unwrap();
        let tx = conn.transaction().unwrap();
        {
            let mut ins = tx
                .prepare("INSERT INTO changelog (sid, version) VALUES (?1, ?2)")
                .unwrap();
            // SID order unrelated to version order, as with random SIDs.
            for i in 0..n_rows {
                let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                ins.execute(params![format!("SK{h:016x}{i:016x}"), (i + 2) as i64])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
        let v = n_rows + 1;
        for limit in [1000usize, 10_000] {
            let (slow, total, pages) =
                walk(&conn, |a| changed_sids(&conn, 0, a, limit).unwrap(), limit);
            println!("limit={limit} full sync: slowest page {slow:.2} ms, walk {total:.1} ms ({pages} pages)");
            for changes in [
                1u64, 100, 1_000, 5_000, 10_000, 20_000, 50_000, 100_000, n_rows,
            ] {
                let since = v - changes;
                // The version index alone reads every change for every page: skip the slow ones.
                let (s1, w1, p1) = if changes <= 50_000 {
                    walk(&conn, |a| fixed(&conn, SPARSE_PAGE, since, a, limit), limit)
                } else {
                    (f64::NAN, f64::NAN, 0)
                };
                let (s2, w2, p2) =
                    walk(&conn, |a| fixed(&conn, DENSE_PAGE, since, a, limit), limit);
                let (s3, w3, p3) = walk(
                    &conn,
                    |a| changed_sids(&conn, since, a, limit).unwrap(),
                    limit,
                );
                assert!((p1 == p2 || p1 == 0) && p2 == p3);
                println!(
                    "limit={limit} changes={changes} ({p2} pages): version index slowest {s1:.2} walk {w1:.1} | \
                     SID order slowest {s2:.2} walk {w2:.1} | chosen slowest {s3:.2} walk {w3:.1} (ms)"
                );
            }
        }
    }
}
