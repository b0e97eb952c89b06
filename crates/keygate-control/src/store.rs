//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so a change is on
//! disk before it is acknowledged and survives `kill -9` at any moment.
//!
//! One connection behind a mutex, used from `spawn_blocking` ([`Db::call`]): every request's
//! reads and writes run in order, and every write is one `BEGIN IMMEDIATE` transaction that also
//! increments the config version (one row, `config_version`). Other processes (the CLI) may write
//! the same file; SQLite's locking and `busy_timeout` serialize them.
//!
//! Only digests of secrets are stored (`secrets.digest`, `operator_tokens.digest`).

use std::path::Path;
use std::sync::{Arc, Mutex};

use keygate_core::config::{AccountLimitsDoc, KeyLimitsDoc};
use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use serde::de::DeserializeOwned;

use crate::error::{internal, ApiError};
use crate::model::{parse_role, parse_status, role_str, status_str, Account, Key, StoredSecret};
use crate::secret::OperatorKind;

/// Schema migrations, applied in order; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[r#"
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
"#];

/// Opens (creating if needed) and migrates the database file.
pub fn open(path: &Path) -> Result<Connection, String> {
    let mut conn = Connection::open(path)
        .map_err(|e| format!("cannot open database {}: {e}", path.display()))?;
    let setup = || -> rusqlite::Result<()> {
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
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

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let applied: usize = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
    }
    tx.commit()
}

/// The shared connection. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
}

impl Db {
    pub fn new(conn: Connection) -> Db {
        Db {
            conn: Arc::new(Mutex::new(conn)),
        }
    }

    /// Runs `f` on the connection on the blocking pool.
    pub async fn call<R, F>(&self, f: F) -> Result<R, ApiError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, ApiError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic cannot leave a transaction open (Transaction rolls back on drop), so a
            // poisoned lock still guards a usable connection.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| internal("database task failed", e))?
    }
}

/// Starts a write transaction (takes the write lock now, so read-then-write cannot race).
pub fn write_tx(conn: &mut Connection) -> Result<Transaction<'_>, ApiError> {
    Ok(conn.transaction_with_behavior(TransactionBehavior::Immediate)?)
}

pub fn version(conn: &Connection) -> Result<u64, ApiError> {
    let v: i64 = conn.query_row("SELECT version FROM config_version WHERE id = 1", [], |r| {
        r.get(0)
    })?;
    Ok(u64::try_from(v).unwrap_or(0))
}

/// Increments the config version inside the caller's transaction.
pub fn bump(tx: &Transaction<'_>) -> Result<u64, ApiError> {
    let v: i64 = tx.query_row(
        "UPDATE config_version SET version = version + 1 WHERE id = 1 RETURNING version",
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

fn to_json<T: serde::Serialize>(v: &Option<T>) -> Result<Option<String>, ApiError> {
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
) -> Result<(), ApiError> {
    tx.execute(
        "INSERT INTO operator_tokens (sid, kind, digest, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![sid, kind.as_str(), digest, now],
    )?;
    Ok(())
}

pub fn find_operator_token(
    conn: &Connection,
    digest: &str,
) -> Result<Option<OperatorKind>, ApiError> {
    let kind: Option<String> = conn
        .query_row(
            "SELECT kind FROM operator_tokens WHERE digest = ?1",
            [digest],
            |r| r.get(0),
        )
        .optional()?;
    Ok(kind.as_deref().and_then(OperatorKind::parse))
}

pub fn has_admin(conn: &Connection) -> Result<bool, ApiError> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM operator_tokens WHERE kind = 'admin')",
        [],
        |r| r.get(0),
    )?)
}

// ---- accounts ----

const ACCOUNT_COLS: &str =
    "sid, friendly_name, status, region, allowed_ips, limits, created_at, updated_at";

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
    })
}

pub fn insert_account(tx: &Transaction<'_>, a: &Account) -> Result<(), ApiError> {
    tx.execute(
        &format!("INSERT INTO accounts ({ACCOUNT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
        params![
            a.sid,
            a.friendly_name,
            status_str(a.status),
            a.region,
            to_json(&a.allowed_ips)?,
            to_json(&a.limits)?,
            a.created_at,
            a.updated_at
        ],
    )?;
    Ok(())
}

pub fn update_account(tx: &Transaction<'_>, a: &Account) -> Result<(), ApiError> {
    tx.execute(
        "UPDATE accounts SET friendly_name = ?2, status = ?3, region = ?4, allowed_ips = ?5, limits = ?6, updated_at = ?7
         WHERE sid = ?1",
        params![a.sid, a.friendly_name, status_str(a.status), a.region, to_json(&a.allowed_ips)?, to_json(&a.limits)?, a.updated_at],
    )?;
    Ok(())
}

pub fn get_account(conn: &Connection, sid: &str) -> Result<Option<Account>, ApiError> {
    Ok(conn
        .query_row(
            &format!("SELECT {ACCOUNT_COLS} FROM accounts WHERE sid = ?1"),
            [sid],
            account_row,
        )
        .optional()?)
}

pub fn all_accounts(conn: &Connection) -> Result<Vec<Account>, ApiError> {
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

pub fn insert_key(tx: &Transaction<'_>, k: &Key) -> Result<(), ApiError> {
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
pub fn update_key(tx: &Transaction<'_>, k: &Key) -> Result<bool, ApiError> {
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
pub fn get_key(conn: &Connection, account_sid: &str, sid: &str) -> Result<Option<Key>, ApiError> {
    Ok(conn
        .query_row(
            &format!("SELECT {KEY_COLS} FROM keys WHERE sid = ?1 AND account_sid = ?2"),
            [sid, account_sid],
            key_row,
        )
        .optional()?)
}

pub fn get_key_by_sid(conn: &Connection, sid: &str) -> Result<Option<Key>, ApiError> {
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
) -> Result<Vec<Key>, ApiError> {
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

pub fn all_keys(conn: &Connection) -> Result<Vec<Key>, ApiError> {
    let mut st = conn.prepare(&format!(
        "SELECT {KEY_COLS} FROM keys ORDER BY account_sid, sid"
    ))?;
    let rows = st.query_map([], key_row)?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn delete_key(tx: &Transaction<'_>, sid: &str) -> Result<bool, ApiError> {
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
) -> Result<(), ApiError> {
    tx.execute(
        "INSERT INTO secrets (digest, owner_sid, not_after, created_at) VALUES (?1, ?2, NULL, ?3)",
        params![digest, owner_sid, now],
    )?;
    Ok(())
}

/// An owner's secrets: the current one first, then rotated ones by end of grace.
pub fn secrets_of(conn: &Connection, owner_sid: &str) -> Result<Vec<StoredSecret>, ApiError> {
    let mut st = conn.prepare(
        "SELECT digest, owner_sid, not_after, created_at FROM secrets WHERE owner_sid = ?1
         ORDER BY not_after IS NOT NULL, not_after DESC, created_at DESC",
    )?;
    let rows = st
        .query_map([owner_sid], secret_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn all_secrets(conn: &Connection) -> Result<Vec<StoredSecret>, ApiError> {
    let mut st = conn.prepare(
        "SELECT digest, owner_sid, not_after, created_at FROM secrets
         ORDER BY owner_sid, not_after IS NOT NULL, not_after DESC, created_at DESC",
    )?;
    let rows = st
        .query_map([], secret_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn find_secret(conn: &Connection, digest: &str) -> Result<Option<StoredSecret>, ApiError> {
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
) -> Result<usize, ApiError> {
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
) -> Result<usize, ApiError> {
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

pub fn delete_all_secrets(tx: &Transaction<'_>, owner_sid: &str) -> Result<usize, ApiError> {
    Ok(tx.execute("DELETE FROM secrets WHERE owner_sid = ?1", [owner_sid])?)
}
