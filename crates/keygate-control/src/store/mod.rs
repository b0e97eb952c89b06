//! The store behind one interface, on two backends: the embedded default, one SQLite file
//! ([`sqlite`]), and Postgres for several replicas ([`postgres`]).
//!
//! Every operation runs inside one transaction of either backend, seen as a [`Tx`]:
//! [`Db::read`] opens a read-only snapshot (everything the closure reads is one version's
//! state), [`Db::write`] a write transaction that commits if the closure returns `Ok` and rolls
//! back otherwise. The service layer ([`crate::service`]) is written once against [`Tx`]; the
//! backends differ only in SQL and in how writers are ordered:
//!
//! - SQLite: one writer connection (`BEGIN IMMEDIATE`), readers from a pool over WAL.
//! - Postgres: a pool of connections; writers run concurrently until they bump the config
//!   version, a single row they then hold locked until they commit, so versions are handed out
//!   in commit order (see [`postgres`]). A reader's snapshot therefore never holds version V
//!   without every change at or below V.
//!
//! Reads run on tokio's blocking pool; writes are group-committed by one writer thread (see
//! [`Db`]), so handlers never block the runtime.

pub mod metrics;
pub mod postgres;
pub mod sqlite;

pub use metrics::DB;

use crate::error::{internal, Error};
use crate::model::{Account, Key, StoredSecret};
use crate::secret::OperatorKind;

pub use sqlite::{dense_delta, MIGRATIONS};

/// Which accounts, keys and secrets a change-feed page reads.
#[derive(Debug, Clone, Copy)]
pub enum Owners<'a> {
    /// These SIDs (a delta: a few SIDs anywhere in the table).
    Listed(&'a [String]),
    /// Every SID in `(after, last]` (a full walk's page: each row in the range is on it). A
    /// range scan of the SID index instead of one seek per listed SID: about 3 times faster
    /// at 1M keys on SQLite.
    Between(&'a str, &'a str),
}

/// What an edge said about itself on a feed request, as the fleet view keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeSeen {
    pub id: String,
    pub region: String,
    /// The config version the edge held when it asked; `None` on a sighting that does not say
    /// (a page of a walk in progress: the stored version stays).
    pub version: Option<u64>,
    /// Unix milliseconds: sightings of one edge on several replicas are ordered by it.
    pub last_seen_ms: i64,
}

/// One transaction of either backend. Methods are the store's queries; none commits.
pub trait Tx {
    /// The current config version.
    fn version(&mut self) -> Result<u64, Error>;
    /// Increments the config version and records every account and key this transaction
    /// changed in the change log at the new version. Called once, after the changes, by every
    /// write that changes what the edge sees.
    fn bump(&mut self) -> Result<u64, Error>;
    /// The version the change log starts at: a delta `since` an older version may miss
    /// deletions and is refused.
    fn changelog_floor(&mut self) -> Result<u64, Error>;

    fn insert_operator_token(
        &mut self,
        sid: &str,
        kind: OperatorKind,
        digest: &str,
        now: i64,
    ) -> Result<(), Error>;
    fn find_operator_token(&mut self, digest: &str) -> Result<Option<OperatorKind>, Error>;
    fn has_admin(&mut self) -> Result<bool, Error>;

    fn insert_account(&mut self, a: &Account) -> Result<(), Error>;
    fn update_account(&mut self, a: &Account) -> Result<(), Error>;
    /// In a write transaction the row stays locked until the end of it (Postgres), so a
    /// read-modify-write of one account cannot interleave with another.
    fn get_account(&mut self, sid: &str) -> Result<Option<Account>, Error>;
    fn all_accounts(&mut self) -> Result<Vec<Account>, Error>;

    fn insert_key(&mut self, k: &Key) -> Result<(), Error>;
    /// Writes the key's mutable fields and bumps its generation, if its generation is still
    /// `k.generation`. Returns whether the row was updated (false: changed concurrently).
    fn update_key(&mut self, k: &Key) -> Result<bool, Error>;
    /// A key of an account (`None` if unknown or another account's).
    fn get_key(&mut self, account_sid: &str, sid: &str) -> Result<Option<Key>, Error>;
    fn get_key_by_sid(&mut self, sid: &str) -> Result<Option<Key>, Error>;
    /// An account's keys sorted by date updated (then SID), `limit` from `offset`.
    fn list_keys(&mut self, account_sid: &str, offset: u64, limit: u64) -> Result<Vec<Key>, Error>;
    fn all_keys(&mut self) -> Result<Vec<Key>, Error>;
    fn count_keys(&mut self, account_sid: &str) -> Result<u64, Error>;
    /// Records a regeneration of `key_sid` at `at`, forgets those before `forget_before`, and
    /// returns how many remain (this one included) and when the oldest of them was.
    fn note_regeneration(
        &mut self,
        key_sid: &str,
        at: i64,
        forget_before: i64,
    ) -> Result<(u64, i64), Error>;
    fn delete_key(&mut self, sid: &str) -> Result<bool, Error>;

    fn insert_secret(&mut self, owner_sid: &str, digest: &str, now: i64) -> Result<(), Error>;
    /// An owner's secrets: the current one first, then rotated ones by end of grace.
    fn secrets_of(&mut self, owner_sid: &str) -> Result<Vec<StoredSecret>, Error>;
    fn all_secrets(&mut self) -> Result<Vec<StoredSecret>, Error>;
    fn find_secret(&mut self, digest: &str) -> Result<Option<StoredSecret>, Error>;
    /// Ends the grace of the owner's current secret at `not_after`; returns how many changed.
    fn retire_current(&mut self, owner_sid: &str, not_after: i64) -> Result<usize, Error>;
    /// Deletes the owner's rotated secrets (all of them, or those whose grace ended before).
    fn delete_previous(
        &mut self,
        owner_sid: &str,
        expired_before: Option<i64>,
    ) -> Result<usize, Error>;
    fn delete_all_secrets(&mut self, owner_sid: &str) -> Result<usize, Error>;

    /// SIDs changed after version `since`, greater than `after`, ascending, at most `limit`.
    fn changed_sids(&mut self, since: u64, after: &str, limit: usize)
        -> Result<Vec<String>, Error>;
    /// The accounts among `owners`, ascending by SID.
    fn accounts_in(&mut self, owners: Owners<'_>) -> Result<Vec<Account>, Error>;
    /// The keys among `owners`, ascending by SID.
    fn keys_in(&mut self, owners: Owners<'_>) -> Result<Vec<Key>, Error>;
    /// The secrets of the owners among `owners`, by owner, each owner's current one first.
    fn secrets_in(&mut self, owners: Owners<'_>) -> Result<Vec<StoredSecret>, Error>;

    /// Remembers what edges said about themselves: a sighting replaces the stored one unless
    /// that one is newer (by `last_seen_ms`), and keeps the stored version when it names none.
    /// Forgets edges last seen before `forget_before_ms` (unix milliseconds).
    fn note_edges(&mut self, seen: &[EdgeSeen], forget_before_ms: i64) -> Result<(), Error>;
    /// Edges seen at or after `since_ms` (unix milliseconds), by id; `version` is always set.
    fn edges(&mut self, since_ms: i64) -> Result<Vec<EdgeSeen>, Error>;
    /// How many schema migrations the database has applied (`/readyz` wants all it knows).
    fn migrations_applied(&mut self) -> Result<usize, Error>;

    /// Takes the writers' lock before a batch's first write (Postgres: the `config_version`
    /// row, `FOR UPDATE`; SQLite's `BEGIN IMMEDIATE` already holds it). Every batch takes it
    /// first, so writes in batches on several replicas never wait for each other in a cycle
    /// (a batch holding the version row waiting for a key row another batch holds, which waits
    /// for the version row).
    fn lock_writes(&mut self) -> Result<(), Error>;
    /// `SAVEPOINT write`: one write of a batch (see [`Db`]) starts here.
    fn savepoint(&mut self) -> Result<(), Error>;
    /// `RELEASE SAVEPOINT write`: the write is kept (committed with the batch).
    fn release_savepoint(&mut self) -> Result<(), Error>;
    /// `ROLLBACK TO SAVEPOINT write` and release it: nothing of the failed write is kept.
    fn rollback_to_savepoint(&mut self) -> Result<(), Error>;

    /// Records that usage batch `id` is applied; false if it already was (apply nothing).
    fn claim_usage_batch(&mut self, id: &str, now: i64) -> Result<bool, Error>;
    /// Adds `row.n` to the row's count.
    fn add_usage(&mut self, row: &UsageRow) -> Result<(), Error>;
    /// The secret of `owner_sid` whose digest starts with `tag` (16 hex digits) was used at
    /// `at` (kept if later than what is stored); false if the owner has no such secret.
    fn note_secret_used(&mut self, owner_sid: &str, tag: &str, at: i64) -> Result<bool, Error>;
    /// Key `key_sid` (if it exists) was used at `at`.
    fn note_key_used(&mut self, key_sid: &str, at: i64) -> Result<(), Error>;
    /// An account's counts (one key's, or every principal's summed) in buckets of `width`
    /// seconds starting in `[from, to)`: `(start, outcome, n)` by start then outcome.
    fn usage_counts(
        &mut self,
        account_sid: &str,
        key_sid: Option<&str>,
        width: i64,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, String, u64)>, Error>;
    /// When a key (or an account's own credentials) and each of its secrets were last used.
    fn last_used(&mut self, owner_sid: &str) -> Result<LastUsed, Error>;
    /// Forgets counts, batch ids and last uses past their retention; how many rows went.
    fn prune_usage(&mut self, before: &UsagePrune) -> Result<u64, Error>;
}

/// One usage count to add ([`Tx::add_usage`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub account_sid: String,
    /// `""` for the account's own credentials.
    pub key_sid: String,
    /// 60 or 3600.
    pub width: i64,
    /// Unix seconds, a multiple of `width`.
    pub start: i64,
    /// `allowed` or a reason code.
    pub outcome: String,
    pub n: i64,
}

/// Last uses of a key and of its secrets (by digest), unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LastUsed {
    pub key: Option<i64>,
    pub secrets: Vec<(String, i64)>,
}

/// What [`Tx::prune_usage`] forgets: minute counts starting before `minutes`, hour counts
/// before `hours`, batch ids applied before `batches` (unix seconds); last uses of secrets and
/// keys that no longer exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsagePrune {
    pub minutes: i64,
    pub hours: i64,
    pub batches: i64,
}

/// Which database a control plane runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// One SQLite file (created if missing).
    Sqlite(std::path::PathBuf),
    /// A Postgres URL (`postgres://user:password@host:port/db`).
    Postgres(String),
}

impl Database {
    /// How the database is named in logs and errors, without a password.
    pub fn display(&self) -> String {
        match self {
            Database::Sqlite(p) => format!("sqlite:{}", p.display()),
            Database::Postgres(url) => postgres::redacted(url),
        }
    }
}

/// The open store of either backend. Cheap to clone.
///
/// Writes on SQLite are group-committed: every [`Db::write`] is queued to one writer thread,
/// which runs all the writes waiting when it is free in one transaction, each inside a
/// savepoint (a write that fails is rolled back alone, to its savepoint; each keeps its own
/// version bump), and answers them only after the commit: one fsync serves a whole batch.
/// Writes on Postgres run concurrently, each in its own transaction on a pooled connection,
/// and take turns only for their last round trip, the version bump sent with the commit (see
/// [`postgres`]). Reads run on tokio's blocking pool.
#[derive(Clone)]
pub struct Db {
    backend: Backend,
    /// The SQLite writer thread's queue (Postgres writes run concurrently on the pool).
    writer: Option<std::sync::mpsc::Sender<Job>>,
}

#[derive(Clone)]
enum Backend {
    Sqlite(sqlite::Db),
    Postgres(postgres::Db),
}

/// A queued write: runs on the writer's transaction and says whether it succeeded (else its
/// savepoint is rolled back); the answer is sent by the returned [`Done`] once the batch's
/// commit is known.
type Job = Box<dyn FnOnce(&mut dyn Tx) -> (bool, Done) + Send>;
type Done = Box<dyn FnOnce(Result<(), Error>) + Send>;

/// Most writes committed together.
pub const MAX_BATCH: usize = 64;

impl Backend {
    fn write<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R, Error>) -> Result<R, Error> {
        match self {
            Backend::Sqlite(db) => db.write(f),
            Backend::Postgres(db) => db.write(f),
        }
    }

    /// The writer thread: takes every job waiting (up to [`MAX_BATCH`]) and commits them in
    /// one transaction.
    fn run_writer(self, jobs: std::sync::mpsc::Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            let started = std::time::Instant::now();
            let n = batch.len();
            let mut answers: Vec<(bool, Done)> = Vec::with_capacity(n);
            let committed = self.write(|tx| {
                tx.lock_writes()?;
                for job in batch.drain(..) {
                    tx.savepoint()?;
                    let (ok, done) =
                        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(tx))) {
                            Ok(r) => r,
                            Err(_) => {
                                tracing::error!("a write panicked; rolled back alone");
                                (false, Box::new(|_| {}) as Done)
                            }
                        };
                    if ok {
                        tx.release_savepoint()?;
                    } else {
                        tx.rollback_to_savepoint()?;
                    }
                    answers.push((ok, done));
                }
                Ok(())
            });
            for (ok, done) in answers {
                DB.observe("write", started, ok && committed.is_ok());
                done(committed.clone());
            }
            if let Err(e) = &committed {
                tracing::error!(error = ?e, writes = n, "a batch of writes did not commit");
            }
        }
    }
}

impl Db {
    fn new(backend: Backend) -> Result<Db, String> {
        let writer = match &backend {
            Backend::Postgres(_) => None,
            Backend::Sqlite(_) => {
                let (writer, jobs) = std::sync::mpsc::channel();
                let b = backend.clone();
                std::thread::Builder::new()
                    .name("keygate-writer".to_owned())
                    .spawn(move || b.run_writer(jobs))
                    .map_err(|e| format!("cannot start the writer thread: {e}"))?;
                Some(writer)
            }
        };
        Ok(Db { backend, writer })
    }

    /// Opens (creating and migrating) the database. Postgres needs a tokio runtime (its
    /// connections are driven by it): call from inside one.
    pub async fn open(database: &Database) -> Result<Db, String> {
        let backend = match database {
            Database::Sqlite(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || sqlite::Db::open(&path).map(Backend::Sqlite))
                    .await
                    .map_err(|e| format!("cannot open the database: {e}"))??
            }
            Database::Postgres(url) => Backend::Postgres(postgres::Db::open(url).await?),
        };
        Db::new(backend)
    }

    /// The Postgres pool, on that backend (for LISTEN).
    pub fn postgres(&self) -> Option<&postgres::Db> {
        match &self.backend {
            Backend::Postgres(db) => Some(db),
            Backend::Sqlite(_) => None,
        }
    }

    /// Runs `f` in a read-only transaction (one snapshot), on the blocking pool.
    pub async fn read<R, F>(&self, f: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<R, Error> + Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.read_blocking(f))
            .await
            .map_err(|e| internal("database task failed", e))?
    }

    /// Runs `f` in a write transaction (see [`Db`]: batched with the writes waiting with it);
    /// answers once it is committed, with `f`'s error if `f` failed (nothing of it is kept).
    pub async fn write<R, F>(&self, f: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<R, Error> + Send + 'static,
    {
        if let Backend::Postgres(pg) = &self.backend {
            let pg = pg.clone();
            return tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let r = pg.write(f);
                DB.observe("write", started, r.is_ok());
                r
            })
            .await
            .map_err(|e| internal("database task failed", e))?;
        }
        self.queue(f)?
            .await
            .map_err(|e| internal("the writer thread stopped", e))?
    }

    /// [`Db::read`] on the calling thread (never on a runtime thread: Postgres would block it).
    pub fn read_blocking<R>(
        &self,
        f: impl FnOnce(&mut dyn Tx) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let started = std::time::Instant::now();
        let r = match &self.backend {
            Backend::Sqlite(db) => db.read(f),
            Backend::Postgres(db) => db.read(f),
        };
        DB.observe("read", started, r.is_ok());
        r
    }

    /// [`Db::write`] from a thread outside the runtime (the CLI).
    pub fn write_blocking<R, F>(&self, f: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<R, Error> + Send + 'static,
    {
        if let Backend::Postgres(pg) = &self.backend {
            let started = std::time::Instant::now();
            let r = pg.write(f);
            DB.observe("write", started, r.is_ok());
            return r;
        }
        self.queue(f)?
            .blocking_recv()
            .map_err(|e| internal("the writer thread stopped", e))?
    }

    fn queue<R, F>(&self, f: F) -> Result<tokio::sync::oneshot::Receiver<Result<R, Error>>, Error>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<R, Error> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |tx: &mut dyn Tx| {
            let r = f(tx);
            let ok = r.is_ok();
            let done: Done = Box::new(move |committed: Result<(), Error>| {
                let _ = answer.send(committed.and(r));
            });
            (ok, done)
        });
        self.writer
            .as_ref()
            .ok_or_else(|| internal("no writer thread", "Postgres writes are not queued"))?
            .send(job)
            .map_err(|e| internal("the writer thread stopped", e))?;
        Ok(answered)
    }

    /// For `/readyz`: the database answers and has applied every migration this binary knows.
    /// `Err` names what is wrong (safe to show: no URL, no credential).
    pub async fn ready(&self) -> Result<u64, String> {
        let known = match &self.backend {
            Backend::Sqlite(_) => sqlite::MIGRATIONS.len(),
            Backend::Postgres(_) => postgres::MIGRATIONS.len(),
        };
        let (version, applied) = self
            .read(|tx| Ok((tx.version()?, tx.migrations_applied()?)))
            .await
            .map_err(|_| "the database does not answer".to_owned())?;
        if applied < known {
            return Err(format!(
                "the database has {applied} of this binary's {known} migrations"
            ));
        }
        Ok(version)
    }
}
