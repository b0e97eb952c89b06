//! The store on Postgres, for a control plane of several replicas on one database.
//!
//! Driver: `tokio-postgres` (rust-postgres, the driver most of the ecosystem's Postgres crates
//! build on) with `deadpool-postgres` for the pool and its per-connection statement cache. No
//! compile-time database (unlike sqlx's checked queries), plain SQL, and the driver's
//! `poll_message` gives LISTEN/NOTIFY without another crate. The service layer is synchronous
//! code shared with SQLite: it runs on tokio's blocking pool and waits on each query with
//! `Handle::block_on`, while the connections themselves are driven by the server's runtime.
//!
//! Ordering. Writes run concurrently, each in its own READ COMMITTED transaction on a pooled
//! connection (rows read for a change are locked `FOR UPDATE`, as `BEGIN IMMEDIATE` would on
//! SQLite). Each write's last statement is `keygate_bump()`, sent in one round trip with
//! `COMMIT`: it increments the one `config_version` row and so holds its lock until that
//! commit. Another write's bump waits for it and then reads the incremented value, so versions
//! are handed out in commit order: no reader can see version V while a change at a lower
//! version is still uncommitted (the trap of taking a sequence number early). The lock is held
//! only for the server's time of the bump and the commit (never for a round trip to a
//! replica), and rows are always locked before the version row, so writers cannot deadlock.
//! Readers use REPEATABLE READ READ ONLY transactions: every query of one feed page sees one
//! snapshot, hence one version. `BEGIN` goes out with each transaction's first statement.
//!
//! The change log works as on SQLite: triggers note changed SIDs in `pending_changes` under the
//! writing transaction's id, and the bump moves them to `changelog` at the new version; the
//! bump also sends `NOTIFY keygate_version, '<version>'`, which Postgres delivers at commit to
//! every replica's [`listen`] connection, in commit order.
//!
//! SIDs are compared bytewise (`COLLATE "C"`), as on SQLite and at the edge, whatever the
//! database's locale: the feed's pages are in SID order and its cursor is a SID.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::runtime::Handle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls, Row};

use super::{EdgeSeen, LastUsed, Owners, Tx, UsagePrune, UsageRow};
use crate::error::{internal, Error};
use crate::model::{parse_role, parse_status, role_str, status_str, Account, Key, StoredSecret};
use crate::secret::OperatorKind;

/// Connections per replica (reads and writes share them).
pub const POOL_SIZE: usize = 16;

/// The channel bumps notify on.
pub const CHANNEL: &str = "keygate_version";

/// `application_name` of each replica's LISTEN connection (the pool's is `keygate-control`).
pub const LISTENER_NAME: &str = "keygate-control-listen";

/// Schema migrations, applied in order; `keygate_schema.version` is the number applied. Applied
/// under an advisory lock, so replicas that start together migrate once.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE config_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO config_version (id, version) VALUES (1, 1);

CREATE TABLE operator_tokens (
    sid        TEXT COLLATE "C" PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('admin', 'edge')),
    digest     TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE accounts (
    sid           TEXT COLLATE "C" PRIMARY KEY,
    friendly_name TEXT,
    status        TEXT NOT NULL CHECK (status IN ('active', 'suspended')),
    region        TEXT NOT NULL,
    allowed_ips   TEXT,
    limits        TEXT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);

CREATE TABLE keys (
    sid           TEXT COLLATE "C" PRIMARY KEY,
    account_sid   TEXT COLLATE "C" NOT NULL REFERENCES accounts (sid),
    friendly_name TEXT,
    role          TEXT NOT NULL CHECK (role IN ('main', 'standard', 'publishable')),
    apis          TEXT,
    allowed_ips   TEXT,
    limits        TEXT,
    expires_at    BIGINT,
    enabled       BOOLEAN NOT NULL,
    generation    BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX keys_by_account ON keys (account_sid, updated_at, sid);

CREATE TABLE secrets (
    digest     TEXT PRIMARY KEY,
    owner_sid  TEXT COLLATE "C" NOT NULL,
    not_after  BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX secrets_by_owner ON secrets (owner_sid);

CREATE TABLE changelog (sid TEXT COLLATE "C" PRIMARY KEY, version BIGINT NOT NULL);
CREATE INDEX changelog_by_version ON changelog (version, sid);
CREATE TABLE changelog_floor (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO changelog_floor (id, version) VALUES (1, 1);
-- SIDs a transaction changed, under its id, until its bump moves them to the change log.
CREATE TABLE pending_changes (
    txid BIGINT NOT NULL,
    sid  TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (txid, sid)
);

CREATE FUNCTION keygate_note_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'secrets' THEN
        IF TG_OP <> 'INSERT' THEN
            INSERT INTO pending_changes VALUES (txid_current(), OLD.owner_sid) ON CONFLICT DO NOTHING;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            INSERT INTO pending_changes VALUES (txid_current(), NEW.owner_sid) ON CONFLICT DO NOTHING;
        END IF;
    ELSE
        IF TG_OP <> 'INSERT' THEN
            INSERT INTO pending_changes VALUES (txid_current(), OLD.sid) ON CONFLICT DO NOTHING;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            INSERT INTO pending_changes VALUES (txid_current(), NEW.sid) ON CONFLICT DO NOTHING;
        END IF;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER accounts_changed AFTER INSERT OR UPDATE OR DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION keygate_note_change();
CREATE TRIGGER keys_changed AFTER INSERT OR UPDATE OR DELETE ON keys
    FOR EACH ROW EXECUTE FUNCTION keygate_note_change();
CREATE TRIGGER secrets_changed AFTER INSERT OR UPDATE OR DELETE ON secrets
    FOR EACH ROW EXECUTE FUNCTION keygate_note_change();

-- The next version, in commit order: the row lock taken here is held until commit.
CREATE FUNCTION keygate_bump() RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE v BIGINT;
BEGIN
    UPDATE config_version SET version = version + 1 WHERE id = 1 RETURNING version INTO v;
    INSERT INTO changelog (sid, version)
        SELECT sid, v FROM pending_changes WHERE txid = txid_current()
        ON CONFLICT (sid) DO UPDATE SET version = EXCLUDED.version;
    DELETE FROM pending_changes WHERE txid = txid_current();
    PERFORM pg_notify('keygate_version', v::text);
    RETURN v;
END $$;

CREATE TABLE regenerations (key_sid TEXT COLLATE "C" NOT NULL, at BIGINT NOT NULL);
CREATE INDEX regenerations_by_key ON regenerations (key_sid, at);

CREATE TABLE edges (
    id        TEXT COLLATE "C" PRIMARY KEY,
    region    TEXT NOT NULL,
    version   BIGINT NOT NULL,
    -- unix milliseconds
    last_seen_ms BIGINT NOT NULL
);
CREATE INDEX edges_by_last_seen ON edges (last_seen_ms);
"#,
    // 2: the further regions an account may be served in (JSON list; NULL: its home region only).
    r#"
ALTER TABLE accounts ADD COLUMN regions TEXT;
"#,
    // 3: usage from the edges (SQLite's migration 6, the same tables).
    r#"
CREATE TABLE usage_counts (
    account_sid TEXT COLLATE "C" NOT NULL,
    width       INTEGER NOT NULL,
    start       BIGINT NOT NULL,
    key_sid     TEXT COLLATE "C" NOT NULL,
    outcome     TEXT COLLATE "C" NOT NULL,
    n           BIGINT NOT NULL,
    PRIMARY KEY (account_sid, width, start, key_sid, outcome)
);
CREATE INDEX usage_counts_by_start ON usage_counts (width, start);
CREATE TABLE usage_batches (id TEXT COLLATE "C" PRIMARY KEY, applied_at BIGINT NOT NULL);
CREATE INDEX usage_batches_by_time ON usage_batches (applied_at);
CREATE TABLE secret_last_used (
    digest       TEXT PRIMARY KEY,
    owner_sid    TEXT COLLATE "C" NOT NULL,
    last_used_at BIGINT NOT NULL
);
CREATE INDEX secret_last_used_by_owner ON secret_last_used (owner_sid);
CREATE TABLE key_last_used (sid TEXT COLLATE "C" PRIMARY KEY, last_used_at BIGINT NOT NULL);
"#,
];

/// Any advisory lock id, the same in every replica: migrations run one replica at a time.
const MIGRATION_LOCK: i64 = 0x6b67_6d69_6772;

/// `url` with its password replaced by `***`, for logs and errors.
pub fn redacted(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return "postgres://(unparsed URL)".to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &url[..scheme_end + 3],
                &rest[..colon],
                &rest[at..]
            ),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        // Errors carry SQL state and the server's message (a conflicting digest at most).
        internal("database error", e)
    }
}

/// The pool and the runtime that drives its connections. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    rt: Handle,
    url: String,
}

impl Db {
    /// Connects, migrates and checks; call from inside the runtime that will drive the
    /// connections.
    pub async fn open(url: &str) -> Result<Db, String> {
        let shown = redacted(url);
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("invalid database URL {shown}: {e}"))?;
        if config.get_application_name().is_none() {
            config.application_name("keygate-control");
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| format!("cannot open database {shown}: {e}"))?;
        let mut client = pool
            .get()
            .await
            .map_err(|e| format!("cannot connect to database {shown}: {e}"))?;
        migrate(&mut client)
            .await
            .map_err(|e| format!("cannot migrate database {shown}: {e}"))?;
        drop(client);
        Ok(Db {
            pool,
            rt: Handle::current(),
            url: url.to_owned(),
        })
    }

    /// Runs `f` in a REPEATABLE READ READ ONLY transaction (one snapshot).
    pub fn read<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R, Error>) -> Result<R, Error> {
        self.run(false, f)
    }

    /// Runs `f` in a READ COMMITTED transaction; commits if it returns `Ok`.
    pub fn write<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R, Error>) -> Result<R, Error> {
        self.run(true, f)
    }

    fn run<R>(
        &self,
        write: bool,
        f: impl FnOnce(&mut dyn Tx) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let rt = &self.rt;
        let client = rt
            .block_on(self.pool.get())
            .map_err(|e| internal("no database connection", e))?;
        let mut t = PgTx {
            client: &client,
            rt,
            write,
            state: State::NotBegun,
        };
        let r = f(&mut t);
        let state = t.state;
        match (&r, state) {
            // Nothing was asked of the database.
            (_, State::NotBegun) => {}
            // The bump committed it.
            (Ok(_), State::Committed) => {}
            (Ok(_), State::Open) => rt.block_on(client.batch_execute("COMMIT"))?,
            (Err(_), State::Open) => rt.block_on(client.batch_execute("ROLLBACK"))?,
            (Err(_), State::Committed) => {
                // A write that failed after its bump (which committed it): never the case in
                // the service layer (the bump is each write's last statement), but say so.
                tracing::error!("a write failed after its version bump had committed it");
            }
        }
        r
    }

    /// Follows `NOTIFY keygate_version` on a connection of its own and hands every version to
    /// `published`, forever. After a (re)connect it reads the current version first, since
    /// notifications sent while disconnected are lost.
    pub async fn listen(self, published: impl Fn(u64) + Send + 'static) {
        let shown = redacted(&self.url);
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.listen_once(&published).await {
                Ok(()) => tracing::warn!(database = %shown, "notification connection closed"),
                Err(e) => {
                    tracing::warn!(database = %shown, error = %e, "notification connection failed")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn listen_once(&self, published: &impl Fn(u64)) -> Result<(), tokio_postgres::Error> {
        let mut config: tokio_postgres::Config = self.url.parse()?;
        config.application_name(LISTENER_NAME);
        let (client, mut connection) = config.connect(NoTls).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            while let Some(m) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().to_owned()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "notification connection error");
                        break;
                    }
                }
            }
        });
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        let v: i64 = client
            .query_one("SELECT version FROM config_version WHERE id = 1", &[])
            .await?
            .try_get(0)?;
        published(u64::try_from(v).unwrap_or(0));
        tracing::info!("listening for config versions");
        while let Some(payload) = rx.recv().await {
            if let Ok(v) = payload.parse::<u64>() {
                published(v);
            }
        }
        driver.abort();
        Ok(())
    }
}

async fn migrate(client: &mut deadpool_postgres::Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS keygate_schema (version INTEGER NOT NULL)")
        .await?;
    let applied: i64 = tx
        .query_one("SELECT count(*) FROM keygate_schema", &[])
        .await?
        .try_get(0)?;
    let applied: usize = if applied == 0 {
        tx.execute("INSERT INTO keygate_schema (version) VALUES (0)", &[])
            .await?;
        0
    } else {
        let v: i32 = tx
            .query_one("SELECT version FROM keygate_schema", &[])
            .await?
            .try_get(0)?;
        usize::try_from(v).unwrap_or(0)
    };
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.batch_execute(sql).await?;
        let n = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute("UPDATE keygate_schema SET version = $1", &[&n])
            .await?;
    }
    tx.commit().await
}

/// Where a [`PgTx`]'s transaction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `BEGIN` not sent yet: it goes with the first statement.
    NotBegun,
    Open,
    /// A write's [`Tx::bump`] committed it.
    Committed,
}

/// A transaction on one pooled connection, driven statement by statement.
///
/// Round trips are what a write costs here, so it saves two of them: `BEGIN` is sent in the
/// same round trip as the first statement (pipelined), and a write's [`Tx::bump`], always its
/// last statement, is sent together with `COMMIT`. The version row is thus locked only for the
/// server's time of the bump and the commit, never for a round trip to this process: that
/// short section is all that concurrent writers, on every replica, take in turn.
struct PgTx<'a> {
    client: &'a deadpool_postgres::Client,
    rt: &'a Handle,
    write: bool,
    state: State,
}

type Params<'p> = [&'p (dyn ToSql + Sync)];

const BEGIN_WRITE: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";
const BEGIN_READ: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

impl<'a> PgTx<'a> {
    /// Runs `statement` on the prepared `sql`, with `BEGIN` sent first if not yet.
    fn run<T, F, Fut>(&mut self, sql: &str, statement: F) -> Result<T, Error>
    where
        F: FnOnce(&'a deadpool_postgres::Client, tokio_postgres::Statement) -> Fut,
        Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        match self.state {
            State::Committed => Err(internal(
                "a statement after the version bump",
                "the bump is a write's last statement",
            )),
            State::Open => {
                let st = self.rt.block_on(self.client.prepare_cached(sql))?;
                Ok(self.rt.block_on(statement(self.client, st))?)
            }
            State::NotBegun => {
                let begin = if self.write { BEGIN_WRITE } else { BEGIN_READ };
                // A statement is prepared outside any transaction (a cached one costs nothing);
                // then BEGIN and the statement go out together.
                let st = self.rt.block_on(self.client.prepare_cached(sql))?;
                let client = self.client;
                let (began, r) = self.rt.block_on(async {
                    tokio::join!(client.batch_execute(begin), statement(client, st))
                });
                began?;
                self.state = State::Open;
                Ok(r?)
            }
        }
    }

    fn query(&mut self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, Error> {
        self.run(sql, |c, st| async move { c.query(&st, params).await })
    }

    fn query_opt(&mut self, sql: &str, params: &Params<'_>) -> Result<Option<Row>, Error> {
        self.run(sql, |c, st| async move { c.query_opt(&st, params).await })
    }

    fn query_one(&mut self, sql: &str, params: &Params<'_>) -> Result<Row, Error> {
        self.run(sql, |c, st| async move { c.query_one(&st, params).await })
    }

    fn execute(&mut self, sql: &str, params: &Params<'_>) -> Result<usize, Error> {
        let n = self.run(sql, |c, st| async move { c.execute(&st, params).await })?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Sends `sql` (no parameters) in the open transaction, beginning it if needed.
    fn batch(&mut self, sql: &str) -> Result<(), Error> {
        if self.state == State::NotBegun {
            let begin = if self.write { BEGIN_WRITE } else { BEGIN_READ };
            self.rt.block_on(self.client.batch_execute(begin))?;
            self.state = State::Open;
        }
        Ok(self.rt.block_on(self.client.batch_execute(sql))?)
    }

    /// ` FOR UPDATE` in a write transaction: the rows read for a change stay locked until it
    /// ends, as `BEGIN IMMEDIATE` keeps them on SQLite.
    fn lock(&self) -> &'static str {
        if self.write {
            " FOR UPDATE"
        } else {
            ""
        }
    }
}

/// Column `idx` (a BIGINT: a version, a count) as a `u64`.
fn u64_col(r: &Row, idx: usize) -> Result<u64, Error> {
    let v: i64 = r.try_get(idx)?;
    Ok(u64::try_from(v).unwrap_or(0))
}

fn json_col<T: serde::de::DeserializeOwned>(r: &Row, idx: usize) -> Result<Option<T>, Error> {
    let s: Option<String> = r.try_get(idx)?;
    s.map(|s| serde_json::from_str(&s).map_err(|e| internal("invalid JSON column", e)))
        .transpose()
}

fn to_json<T: serde::Serialize>(v: &Option<T>) -> Result<Option<String>, Error> {
    v.as_ref()
        .map(|v| serde_json::to_string(v).map_err(|e| internal("serialize column", e)))
        .transpose()
}

const ACCOUNT_COLS: &str =
    "sid, friendly_name, status, region, allowed_ips, limits, created_at, updated_at, regions";

fn account_row(r: &Row) -> Result<Account, Error> {
    let status: String = r.try_get(2)?;
    Ok(Account {
        sid: r.try_get(0)?,
        friendly_name: r.try_get(1)?,
        status: parse_status(&status).ok_or_else(|| internal("invalid column", "status"))?,
        region: r.try_get(3)?,
        allowed_ips: json_col(r, 4)?,
        limits: json_col(r, 5)?,
        created_at: r.try_get(6)?,
        updated_at: r.try_get(7)?,
        regions: json_col(r, 8)?,
    })
}

const KEY_COLS: &str = "sid, account_sid, friendly_name, role, apis, allowed_ips, limits, expires_at, enabled, generation, created_at, updated_at";

fn key_row(r: &Row) -> Result<Key, Error> {
    let role: String = r.try_get(3)?;
    Ok(Key {
        sid: r.try_get(0)?,
        account_sid: r.try_get(1)?,
        friendly_name: r.try_get(2)?,
        role: parse_role(&role).ok_or_else(|| internal("invalid column", "role"))?,
        apis: json_col(r, 4)?,
        allowed_ips: json_col(r, 5)?,
        limits: json_col(r, 6)?,
        expires_at: r.try_get(7)?,
        enabled: r.try_get(8)?,
        generation: r.try_get(9)?,
        created_at: r.try_get(10)?,
        updated_at: r.try_get(11)?,
    })
}

const SECRET_COLS: &str = "digest, owner_sid, not_after, created_at";
const SECRETS_ORDER: &str = "owner_sid, not_after IS NOT NULL, not_after DESC, created_at DESC";

fn secret_row(r: &Row) -> Result<StoredSecret, Error> {
    Ok(StoredSecret {
        digest: r.try_get(0)?,
        owner_sid: r.try_get(1)?,
        not_after: r.try_get(2)?,
        created_at: r.try_get(3)?,
    })
}

fn rows<T>(rows: Vec<Row>, f: impl Fn(&Row) -> Result<T, Error>) -> Result<Vec<T>, Error> {
    rows.iter().map(f).collect()
}

fn big(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl PgTx<'_> {
    fn owners<T>(
        &mut self,
        owners: Owners<'_>,
        select: &str,
        col: &str,
        order: &str,
        f: impl Fn(&Row) -> Result<T, Error>,
    ) -> Result<Vec<T>, Error> {
        let found = match owners {
            Owners::Listed(sids) => self.query(
                &format!("{select} WHERE {col} = ANY($1) ORDER BY {order}"),
                &[&sids],
            )?,
            Owners::Between(after, last) => self.query(
                &format!("{select} WHERE {col} > $1 AND {col} <= $2 ORDER BY {order}"),
                &[&after, &last],
            )?,
        };
        rows(found, f)
    }
}

impl Tx for PgTx<'_> {
    fn version(&mut self) -> Result<u64, Error> {
        let r = self.query_one("SELECT version FROM config_version WHERE id = 1", &[])?;
        u64_col(&r, 0)
    }

    fn bump(&mut self) -> Result<u64, Error> {
        if self.state == State::NotBegun {
            self.batch("")?;
        }
        // The bump and the commit in one round trip (simple query protocol, two statements).
        let msgs = self
            .rt
            .block_on(self.client.simple_query("SELECT keygate_bump(); COMMIT"))?;
        self.state = State::Committed;
        let v = msgs
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
                _ => None,
            })
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| internal("keygate_bump() answered no version", "no row"))?;
        Ok(v)
    }

    fn changelog_floor(&mut self) -> Result<u64, Error> {
        let r = self.query_one("SELECT version FROM changelog_floor WHERE id = 1", &[])?;
        u64_col(&r, 0)
    }

    fn insert_operator_token(
        &mut self,
        sid: &str,
        kind: OperatorKind,
        digest: &str,
        now: i64,
    ) -> Result<(), Error> {
        self.execute(
            "INSERT INTO operator_tokens (sid, kind, digest, created_at) VALUES ($1, $2, $3, $4)",
            &[&sid, &kind.as_str(), &digest, &now],
        )?;
        Ok(())
    }

    fn find_operator_token(&mut self, digest: &str) -> Result<Option<OperatorKind>, Error> {
        let r = self.query_opt(
            "SELECT kind FROM operator_tokens WHERE digest = $1",
            &[&digest],
        )?;
        Ok(match r {
            Some(r) => OperatorKind::parse(&r.try_get::<_, String>(0)?),
            None => None,
        })
    }

    fn has_admin(&mut self) -> Result<bool, Error> {
        let r = self.query_one(
            "SELECT EXISTS (SELECT 1 FROM operator_tokens WHERE kind = 'admin')",
            &[],
        )?;
        Ok(r.try_get(0)?)
    }

    fn insert_account(&mut self, a: &Account) -> Result<(), Error> {
        self.execute(
            &format!(
                "INSERT INTO accounts ({ACCOUNT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ),
            &[
                &a.sid,
                &a.friendly_name,
                &status_str(a.status),
                &a.region,
                &to_json(&a.allowed_ips)?,
                &to_json(&a.limits)?,
                &a.created_at,
                &a.updated_at,
                &to_json(&a.regions)?,
            ],
        )?;
        Ok(())
    }

    fn update_account(&mut self, a: &Account) -> Result<(), Error> {
        self.execute(
            "UPDATE accounts SET friendly_name = $2, status = $3, region = $4, allowed_ips = $5,
                 limits = $6, updated_at = $7, regions = $8
             WHERE sid = $1",
            &[
                &a.sid,
                &a.friendly_name,
                &status_str(a.status),
                &a.region,
                &to_json(&a.allowed_ips)?,
                &to_json(&a.limits)?,
                &a.updated_at,
                &to_json(&a.regions)?,
            ],
        )?;
        Ok(())
    }

    fn get_account(&mut self, sid: &str) -> Result<Option<Account>, Error> {
        let sql = format!(
            "SELECT {ACCOUNT_COLS} FROM accounts WHERE sid = $1{}",
            self.lock()
        );
        self.query_opt(&sql, &[&sid])?
            .map(|r| account_row(&r))
            .transpose()
    }

    fn all_accounts(&mut self) -> Result<Vec<Account>, Error> {
        let found = self.query(
            &format!("SELECT {ACCOUNT_COLS} FROM accounts ORDER BY sid"),
            &[],
        )?;
        rows(found, account_row)
    }

    fn insert_key(&mut self, k: &Key) -> Result<(), Error> {
        self.execute(
            &format!(
                "INSERT INTO keys ({KEY_COLS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            ),
            &[
                &k.sid,
                &k.account_sid,
                &k.friendly_name,
                &role_str(k.role),
                &to_json(&k.apis)?,
                &to_json(&k.allowed_ips)?,
                &to_json(&k.limits)?,
                &k.expires_at,
                &k.enabled,
                &k.generation,
                &k.created_at,
                &k.updated_at,
            ],
        )?;
        Ok(())
    }

    fn update_key(&mut self, k: &Key) -> Result<bool, Error> {
        let n = self.execute(
            "UPDATE keys SET friendly_name = $3, role = $4, apis = $5, allowed_ips = $6,
                 limits = $7, expires_at = $8, enabled = $9, updated_at = $10,
                 generation = generation + 1
             WHERE sid = $1 AND generation = $2",
            &[
                &k.sid,
                &k.generation,
                &k.friendly_name,
                &role_str(k.role),
                &to_json(&k.apis)?,
                &to_json(&k.allowed_ips)?,
                &to_json(&k.limits)?,
                &k.expires_at,
                &k.enabled,
                &k.updated_at,
            ],
        )?;
        Ok(n == 1)
    }

    fn get_key(&mut self, account_sid: &str, sid: &str) -> Result<Option<Key>, Error> {
        let sql = format!(
            "SELECT {KEY_COLS} FROM keys WHERE sid = $1 AND account_sid = $2{}",
            self.lock()
        );
        self.query_opt(&sql, &[&sid, &account_sid])?
            .map(|r| key_row(&r))
            .transpose()
    }

    fn get_key_by_sid(&mut self, sid: &str) -> Result<Option<Key>, Error> {
        let sql = format!("SELECT {KEY_COLS} FROM keys WHERE sid = $1{}", self.lock());
        self.query_opt(&sql, &[&sid])?
            .map(|r| key_row(&r))
            .transpose()
    }

    fn list_keys(&mut self, account_sid: &str, offset: u64, limit: u64) -> Result<Vec<Key>, Error> {
        let found = self.query(
            &format!(
                "SELECT {KEY_COLS} FROM keys WHERE account_sid = $1
                 ORDER BY updated_at, sid LIMIT $2 OFFSET $3"
            ),
            &[&account_sid, &big(limit), &big(offset)],
        )?;
        rows(found, key_row)
    }

    fn all_keys(&mut self) -> Result<Vec<Key>, Error> {
        let found = self.query(
            &format!("SELECT {KEY_COLS} FROM keys ORDER BY account_sid, sid"),
            &[],
        )?;
        rows(found, key_row)
    }

    fn count_keys(&mut self, account_sid: &str) -> Result<u64, Error> {
        let r = self.query_one(
            "SELECT count(*) FROM keys WHERE account_sid = $1",
            &[&account_sid],
        )?;
        u64_col(&r, 0)
    }

    fn note_regeneration(
        &mut self,
        key_sid: &str,
        at: i64,
        forget_before: i64,
    ) -> Result<(u64, i64), Error> {
        self.execute(
            "DELETE FROM regenerations WHERE key_sid = $1 AND at < $2",
            &[&key_sid, &forget_before],
        )?;
        self.execute(
            "INSERT INTO regenerations (key_sid, at) VALUES ($1, $2)",
            &[&key_sid, &at],
        )?;
        let r = self.query_one(
            "SELECT count(*), min(at) FROM regenerations WHERE key_sid = $1",
            &[&key_sid],
        )?;
        let n: i64 = r.try_get(0)?;
        let oldest: Option<i64> = r.try_get(1)?;
        Ok((u64::try_from(n).unwrap_or(0), oldest.unwrap_or(at)))
    }

    fn delete_key(&mut self, sid: &str) -> Result<bool, Error> {
        self.execute("DELETE FROM regenerations WHERE key_sid = $1", &[&sid])?;
        self.execute("DELETE FROM secrets WHERE owner_sid = $1", &[&sid])?;
        Ok(self.execute("DELETE FROM keys WHERE sid = $1", &[&sid])? == 1)
    }

    fn insert_secret(&mut self, owner_sid: &str, digest: &str, now: i64) -> Result<(), Error> {
        self.execute(
            "INSERT INTO secrets (digest, owner_sid, not_after, created_at) VALUES ($1, $2, NULL, $3)",
            &[&digest, &owner_sid, &now],
        )?;
        Ok(())
    }

    fn secrets_of(&mut self, owner_sid: &str) -> Result<Vec<StoredSecret>, Error> {
        let found = self.query(
            &format!(
                "SELECT {SECRET_COLS} FROM secrets WHERE owner_sid = $1 ORDER BY {SECRETS_ORDER}"
            ),
            &[&owner_sid],
        )?;
        rows(found, secret_row)
    }

    fn all_secrets(&mut self) -> Result<Vec<StoredSecret>, Error> {
        let found = self.query(
            &format!("SELECT {SECRET_COLS} FROM secrets ORDER BY {SECRETS_ORDER}"),
            &[],
        )?;
        rows(found, secret_row)
    }

    fn find_secret(&mut self, digest: &str) -> Result<Option<StoredSecret>, Error> {
        self.query_opt(
            &format!("SELECT {SECRET_COLS} FROM secrets WHERE digest = $1"),
            &[&digest],
        )?
        .map(|r| secret_row(&r))
        .transpose()
    }

    fn retire_current(&mut self, owner_sid: &str, not_after: i64) -> Result<usize, Error> {
        self.execute(
            "UPDATE secrets SET not_after = $2 WHERE owner_sid = $1 AND not_after IS NULL",
            &[&owner_sid, &not_after],
        )
    }

    fn delete_previous(
        &mut self,
        owner_sid: &str,
        expired_before: Option<i64>,
    ) -> Result<usize, Error> {
        match expired_before {
            None => self.execute(
                "DELETE FROM secrets WHERE owner_sid = $1 AND not_after IS NOT NULL",
                &[&owner_sid],
            ),
            Some(now) => self.execute(
                "DELETE FROM secrets WHERE owner_sid = $1 AND not_after IS NOT NULL AND not_after < $2",
                &[&owner_sid, &now],
            ),
        }
    }

    fn delete_all_secrets(&mut self, owner_sid: &str) -> Result<usize, Error> {
        self.execute("DELETE FROM secrets WHERE owner_sid = $1", &[&owner_sid])
    }

    fn changed_sids(
        &mut self,
        since: u64,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let found = self.query(
            "SELECT sid FROM changelog WHERE version > $1 AND sid > $2 ORDER BY sid LIMIT $3",
            &[&big(since), &after, &limit],
        )?;
        rows(found, |r| Ok(r.try_get(0)?))
    }

    fn accounts_in(&mut self, owners: Owners<'_>) -> Result<Vec<Account>, Error> {
        let select = format!("SELECT {ACCOUNT_COLS} FROM accounts");
        self.owners(owners, &select, "sid", "sid", account_row)
    }

    fn keys_in(&mut self, owners: Owners<'_>) -> Result<Vec<Key>, Error> {
        let select = format!("SELECT {KEY_COLS} FROM keys");
        self.owners(owners, &select, "sid", "sid", key_row)
    }

    fn secrets_in(&mut self, owners: Owners<'_>) -> Result<Vec<StoredSecret>, Error> {
        let select = format!("SELECT {SECRET_COLS} FROM secrets");
        self.owners(owners, &select, "owner_sid", SECRETS_ORDER, secret_row)
    }

    fn note_edges(&mut self, seen: &[EdgeSeen], forget_before_ms: i64) -> Result<(), Error> {
        self.execute(
            "DELETE FROM edges WHERE last_seen_ms < $1",
            &[&forget_before_ms],
        )?;
        for e in seen {
            let version = e.version.map(big);
            self.execute(
                "INSERT INTO edges (id, region, version, last_seen_ms)
                 VALUES ($1, $2, COALESCE($3::BIGINT, 0), $4)
                 ON CONFLICT (id) DO UPDATE SET region = EXCLUDED.region,
                     version = CASE WHEN $3::BIGINT IS NULL THEN edges.version
                                    ELSE EXCLUDED.version END,
                     last_seen_ms = EXCLUDED.last_seen_ms
                 WHERE EXCLUDED.last_seen_ms >= edges.last_seen_ms",
                &[&e.id, &e.region, &version, &e.last_seen_ms],
            )?;
        }
        Ok(())
    }

    fn lock_writes(&mut self) -> Result<(), Error> {
        self.query_one(
            "SELECT version FROM config_version WHERE id = 1 FOR UPDATE",
            &[],
        )?;
        Ok(())
    }

    fn savepoint(&mut self) -> Result<(), Error> {
        self.batch("SAVEPOINT write")
    }

    fn release_savepoint(&mut self) -> Result<(), Error> {
        self.batch("RELEASE SAVEPOINT write")
    }

    fn rollback_to_savepoint(&mut self) -> Result<(), Error> {
        self.batch("ROLLBACK TO SAVEPOINT write; RELEASE SAVEPOINT write")
    }

    fn migrations_applied(&mut self) -> Result<usize, Error> {
        let r = self.query_one("SELECT version FROM keygate_schema", &[])?;
        let v: i32 = r.try_get(0)?;
        Ok(usize::try_from(v).unwrap_or(0))
    }

    fn claim_usage_batch(&mut self, id: &str, now: i64) -> Result<bool, Error> {
        // A replica applying the same id concurrently holds the row: this waits for its commit,
        // then finds it.
        let n = self.execute(
            "INSERT INTO usage_batches (id, applied_at) VALUES ($1, $2)
             ON CONFLICT (id) DO NOTHING",
            &[&id, &now],
        )?;
        Ok(n == 1)
    }

    fn add_usage(&mut self, row: &UsageRow) -> Result<(), Error> {
        let width = i32::try_from(row.width).unwrap_or(i32::MAX);
        self.execute(
            "INSERT INTO usage_counts (account_sid, width, start, key_sid, outcome, n)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (account_sid, width, start, key_sid, outcome)
             DO UPDATE SET n = usage_counts.n + EXCLUDED.n",
            &[
                &row.account_sid,
                &width,
                &row.start,
                &row.key_sid,
                &row.outcome,
                &row.n,
            ],
        )?;
        Ok(())
    }

    fn note_secret_used(&mut self, owner_sid: &str, tag: &str, at: i64) -> Result<bool, Error> {
        let n = self.execute(
            "INSERT INTO secret_last_used (digest, owner_sid, last_used_at)
             SELECT digest, owner_sid, $3 FROM secrets
             WHERE owner_sid = $1 AND substr(digest, 1, 16) = $2
             ON CONFLICT (digest) DO UPDATE
             SET last_used_at = GREATEST(secret_last_used.last_used_at, EXCLUDED.last_used_at)",
            &[&owner_sid, &tag, &at],
        )?;
        Ok(n > 0)
    }

    fn note_key_used(&mut self, key_sid: &str, at: i64) -> Result<(), Error> {
        self.execute(
            "INSERT INTO key_last_used (sid, last_used_at)
             SELECT sid, $2 FROM keys WHERE sid = $1
             ON CONFLICT (sid) DO UPDATE
             SET last_used_at = GREATEST(key_last_used.last_used_at, EXCLUDED.last_used_at)",
            &[&key_sid, &at],
        )?;
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
        let width = i32::try_from(width).unwrap_or(i32::MAX);
        let found = self.query(
            "SELECT start, outcome, sum(n)::BIGINT FROM usage_counts
             WHERE account_sid = $1 AND width = $2 AND start >= $3 AND start < $4
               AND ($5::TEXT IS NULL OR key_sid = $5)
             GROUP BY start, outcome ORDER BY start, outcome",
            &[&account_sid, &width, &from, &to, &key_sid],
        )?;
        found
            .iter()
            .map(|r| {
                let n: i64 = r.try_get(2)?;
                Ok((r.try_get(0)?, r.try_get(1)?, u64::try_from(n).unwrap_or(0)))
            })
            .collect()
    }

    fn last_used(&mut self, owner_sid: &str) -> Result<LastUsed, Error> {
        let key = self
            .query_opt(
                "SELECT last_used_at FROM key_last_used WHERE sid = $1",
                &[&owner_sid],
            )?
            .map(|r| r.try_get::<_, i64>(0))
            .transpose()?;
        let found = self.query(
            "SELECT digest, last_used_at FROM secret_last_used WHERE owner_sid = $1",
            &[&owner_sid],
        )?;
        let secrets = found
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(LastUsed { key, secrets })
    }

    fn prune_usage(&mut self, before: &UsagePrune) -> Result<u64, Error> {
        let mut n = 0;
        n += self.execute(
            "DELETE FROM usage_counts WHERE width = 60 AND start < $1",
            &[&before.minutes],
        )?;
        n += self.execute(
            "DELETE FROM usage_counts WHERE width = 3600 AND start < $1",
            &[&before.hours],
        )?;
        n += self.execute(
            "DELETE FROM usage_batches WHERE applied_at < $1",
            &[&before.batches],
        )?;
        n += self.execute(
            "DELETE FROM secret_last_used s WHERE NOT EXISTS
             (SELECT 1 FROM secrets WHERE secrets.digest = s.digest)",
            &[],
        )?;
        n += self.execute(
            "DELETE FROM key_last_used k WHERE NOT EXISTS (SELECT 1 FROM keys WHERE keys.sid = k.sid)",
            &[],
        )?;
        Ok(n as u64)
    }

    fn edges(&mut self, since_ms: i64) -> Result<Vec<EdgeSeen>, Error> {
        let found = self.query(
            "SELECT id, region, version, last_seen_ms FROM edges WHERE last_seen_ms >= $1
             ORDER BY id",
            &[&since_ms],
        )?;
        rows(found, |r| {
            Ok(EdgeSeen {
                id: r.try_get(0)?,
                region: r.try_get(1)?,
                version: Some(u64_col(r, 2)?),
                last_seen_ms: r.try_get(3)?,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            redacted("postgres://kg:s3cr%2Ft@127.0.0.1:5432/keygate"),
            "postgres://kg:***@127.0.0.1:5432/keygate"
        );
        assert_eq!(
            redacted("postgres://kg@127.0.0.1/keygate?x=a:b@c"),
            "postgres://kg@127.0.0.1/keygate?x=a:b@c"
        );
        assert_eq!(
            redacted("postgresql://127.0.0.1/keygate"),
            "postgresql://127.0.0.1/keygate"
        );
        assert_eq!(redacted("host=x password=y"), "postgres://(unparsed URL)");
    }
}
