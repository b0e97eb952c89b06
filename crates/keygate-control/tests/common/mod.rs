//! Test harness: a control plane on a real socket (port 0), in-process or as the real binary,
//! and a client that records every response so tests can scan them for secrets.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use keygate_control::store::{Database, Db};
use keygate_control::{service, AppState, Config};
use serde_json::Value;

/// Whether this run's control planes use Postgres (`KEYGATE_TEST_BACKEND=postgres`; `make
/// test` runs the suite once per backend) instead of SQLite, the default.
pub fn on_postgres() -> bool {
    match std::env::var("KEYGATE_TEST_BACKEND").as_deref() {
        Ok("postgres") => true,
        Ok("sqlite") | Err(_) => false,
        Ok(other) => panic!("KEYGATE_TEST_BACKEND={other}: must be sqlite or postgres"),
    }
}

/// A new, empty database of this run's backend: a file in `dir`, or a fresh database on the
/// test process's Postgres cluster (started on first use, stopped when the process ends).
pub fn test_database(dir: &Path) -> Database {
    if on_postgres() {
        let cluster = keygate_pgtest::PgCluster::shared().unwrap();
        Database::Postgres(cluster.fresh_database().unwrap())
    } else {
        Database::Sqlite(dir.join("keygate.db"))
    }
}

/// The binary's flags naming `database`.
pub fn database_args(database: &Database) -> Vec<String> {
    match database {
        Database::Sqlite(path) => vec!["--data".to_owned(), path.display().to_string()],
        Database::Postgres(url) => vec!["--database".to_owned(), url.clone()],
    }
}

/// The credentials `init` prints once.
#[derive(Debug, Clone)]
pub struct Creds {
    pub admin: String,
    pub account_sid: String,
    pub auth_token: String,
    pub edge: String,
}

#[derive(Debug, Clone)]
pub enum Auth {
    None,
    Basic(String, String),
    Bearer(String),
    /// A raw `Authorization` header value.
    Raw(String),
}

impl Auth {
    pub fn basic(user: &str, pass: &str) -> Auth {
        Auth::Basic(user.to_owned(), pass.to_owned())
    }
    pub fn bearer(t: &str) -> Auth {
        Auth::Bearer(t.to_owned())
    }
    /// The `Authorization` header value the edge would see.
    pub fn header(&self) -> Option<String> {
        match self {
            Auth::None => None,
            Auth::Basic(u, p) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )),
            Auth::Bearer(t) => Some(format!("Bearer {t}")),
            Auth::Raw(v) => Some(v.clone()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

/// An HTTP client that keeps a transcript of every response (status, headers, body).
#[derive(Clone)]
pub struct Client {
    pub base: String,
    http: reqwest::Client,
    pub transcript: Arc<Mutex<Vec<String>>>,
}

impl Client {
    pub fn new(base: &str) -> Client {
        Client {
            base: base.to_owned(),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            transcript: Arc::default(),
        }
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        auth: &Auth,
        body: Option<(&str, String)>,
        extra: &[(&str, &str)],
    ) -> Resp {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{}", self.base, path));
        if let Some(h) = auth.header() {
            req = req.header("authorization", h);
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        if let Some((ct, b)) = body {
            req = req.header("content-type", ct).body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        self.transcript
            .lock()
            .unwrap()
            .push(format!("{method} {path} -> {status} {headers:?}\n{text}"));
        Resp {
            status,
            headers,
            text,
        }
    }

    /// A form POST that reports transport errors (the server may be killed mid-request).
    pub async fn try_post_form(
        &self,
        path: &str,
        auth: &Auth,
        fields: &[(&str, &str)],
    ) -> Result<Resp, reqwest::Error> {
        let mut req = self
            .http
            .post(format!("{}{}", self.base, path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string(fields).unwrap());
        if let Some(h) = auth.header() {
            req = req.header("authorization", h);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await?;
        Ok(Resp {
            status,
            headers,
            text,
        })
    }

    pub async fn get(&self, path: &str, auth: &Auth) -> Resp {
        self.send("GET", path, auth, None, &[]).await
    }
    pub async fn delete(&self, path: &str, auth: &Auth) -> Resp {
        self.send("DELETE", path, auth, None, &[]).await
    }
    pub async fn post_form(&self, path: &str, auth: &Auth, fields: &[(&str, &str)]) -> Resp {
        let body = serde_urlencoded::to_string(fields).unwrap();
        self.send(
            "POST",
            path,
            auth,
            Some(("application/x-www-form-urlencoded", body)),
            &[],
        )
        .await
    }
    pub async fn json(&self, method: &str, path: &str, auth: &Auth, body: Value) -> Resp {
        self.send(
            method,
            path,
            auth,
            Some(("application/json", body.to_string())),
            &[],
        )
        .await
    }

    /// The edge config document (asserts 200).
    pub async fn feed(&self, edge: &str) -> Value {
        let r = self.get("/v1/edge/config", &Auth::bearer(edge)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.json()
    }

    pub fn responses(&self) -> Vec<String> {
        self.transcript.lock().unwrap().clone()
    }
}

pub fn keys_path(account: &str) -> String {
    format!("/2010-04-01/Accounts/{account}/Keys.json")
}

pub fn calls_path(account: &str) -> String {
    format!("/v2/accounts/{account}/calls")
}

pub fn key_path(account: &str, sid: &str) -> String {
    format!("/2010-04-01/Accounts/{account}/Keys/{sid}.json")
}

/// A control plane served in this process on 127.0.0.1:0.
pub struct InProc {
    pub client: Client,
    pub creds: Creds,
    pub dir: tempfile::TempDir,
    pub database: Database,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl InProc {
    pub async fn start() -> InProc {
        InProc::start_with(Config::with_built_in_catalog().unwrap()).await
    }

    /// A fresh control plane with `config` (limits, caps, trusted proxies, ...), on this run's
    /// backend.
    pub async fn start_with(config: Config) -> InProc {
        // The server's logs go to the test's output (shown when a test fails).
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("warn")
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let database = {
            let dir = dir.path().to_owned();
            tokio::task::spawn_blocking(move || test_database(&dir))
                .await
                .unwrap()
        };
        let db = Db::open(&database).await.unwrap();
        let (cat, region) = (config.catalog.clone(), config.default_region.clone());
        let out = db
            .write(move |tx| service::init(tx, &cat, &region, None))
            .await
            .unwrap();
        drop(db);
        let creds = Creds {
            admin: out.admin_token.expose().to_owned(),
            account_sid: out.account.sid.clone(),
            auth_token: out.auth_token.expose().to_owned(),
            edge: out.edge_token.expose().to_owned(),
        };
        InProc::serve_with(dir, database, creds, config).await
    }

    /// Serves an existing SQLite file (`dir` holds it and is kept until the server is dropped).
    pub async fn serve(dir: tempfile::TempDir, db: PathBuf, creds: Creds) -> InProc {
        let config = Config::with_built_in_catalog().unwrap();
        InProc::serve_with(dir, Database::Sqlite(db), creds, config).await
    }

    pub async fn serve_with(
        dir: tempfile::TempDir,
        database: Database,
        creds: Creds,
        config: Config,
    ) -> InProc {
        let state = AppState::open(&database, config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(keygate_control::run(listener, state, async move {
            let _ = rx.await;
        }));
        InProc {
            client: Client::new(&format!("http://{addr}")),
            creds,
            dir,
            database,
            stop: Some(tx),
        }
    }

    pub fn account_auth(&self) -> Auth {
        Auth::basic(&self.creds.account_sid, &self.creds.auth_token)
    }
    pub fn admin(&self) -> Auth {
        Auth::bearer(&self.creds.admin)
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The real `keygate-control serve` binary on 127.0.0.1:0 (database already initialized by
/// [`init_with_binary`]), its stderr (the logs) captured.
pub struct Binary {
    pub child: Child,
    pub addr: String,
    pub stderr: Arc<Mutex<String>>,
}

impl Binary {
    pub fn spawn(database: &Database) -> Binary {
        Binary::spawn_with(database, &[])
    }

    /// [`Binary::spawn`] with more `serve` flags (`--tls-cert`, ...).
    pub fn spawn_with(database: &Database, flags: &[&str]) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keygate-control"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(database_args(database))
            .args(flags)
            .env_remove("KEYGATE_CATALOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let err = BufReader::new(child.stderr.take().unwrap());
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in err.lines() {
                let Ok(line) = line else { break };
                {
                    // Kept before the address is handed out: the "listening" line is in the logs
                    // by the time `spawn` returns.
                    let mut s = sink.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["message"] == "listening" {
                        let _ = addr_tx.send(v["addr"].as_str().unwrap_or_default().to_owned());
                    }
                }
            }
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no listening line; stderr: {}", stderr.lock().unwrap()));
        Binary {
            child,
            addr,
            stderr,
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&format!("http://{}", self.addr))
    }

    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a `keygate-control` command printed.
pub struct Printed {
    pub stdout: String,
    pub stderr: String,
}

impl Printed {
    /// The value of the `NAME=value` line `name`; panics if it was not printed.
    pub fn get(&self, name: &str) -> String {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} not printed: {}", self.stdout))
            .to_owned()
    }
}

/// Runs the real binary's command `args` on `database` (`--data FILE` or `--database URL`
/// appended, no `KEYGATE_CATALOG`); panics with its stderr unless it succeeds.
pub fn cli(args: &[&str], database: &Database) -> Printed {
    let out = Command::new(env!("CARGO_BIN_EXE_keygate-control"))
        .args(args)
        .args(database_args(database))
        .env_remove("KEYGATE_CATALOG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Printed {
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `keygate-control init` and parses the credentials it prints.
pub fn init_with_binary(db: &Database) -> (Creds, String) {
    let printed = cli(&["init"], db);
    let creds = Creds {
        admin: printed.get("KEYGATE_ADMIN_TOKEN"),
        account_sid: printed.get("ACCOUNT_SID"),
        auth_token: printed.get("AUTH_TOKEN"),
        edge: printed.get("KEYGATE_EDGE_TOKEN"),
    };
    (creds, printed.stderr)
}

/// What the edge decides for a request, with the control plane's document compiled by the
/// edge's own compiler: `Ok(api name)` or `Err(reason code)`.
pub fn edge_decides(
    doc: &Value,
    method: &str,
    path: &str,
    auth: &Auth,
    now: u64,
) -> Result<String, String> {
    use keygate_core::headers::{AuthorizationHeader, RequestHead};
    let cfg = keygate_core::compile::compile(doc.to_string().as_bytes())
        .expect("the edge compiles the feed");
    let header = auth.header();
    let head = RequestHead {
        method: method.as_bytes(),
        path: path.as_bytes(),
        authorization: match &header {
            Some(h) => AuthorizationHeader::One(h.as_bytes()),
            None => AuthorizationHeader::Absent,
        },
        cors_preflight_headers: false,
    };
    match keygate_core::decide(&cfg, &head, now, &mut || Some("127.0.0.1".parse().unwrap())) {
        keygate_core::Decision::Allow(a) => {
            Ok(a.identity().and_then(|i| i.api).unwrap_or("").to_owned())
        }
        keygate_core::Decision::Deny(r) => Err(r.code().to_owned()),
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The bytes of the database file and its WAL / shared-memory files.
/// Everything the database holds, as bytes to scan for secrets: the SQLite file and its WAL, or
/// every row of every keygate table on Postgres (as text).
pub fn db_bytes(database: &Database) -> Vec<u8> {
    let db = match database {
        Database::Sqlite(path) => path,
        Database::Postgres(url) => {
            let name = url.rsplit('/').next().unwrap();
            let cluster = keygate_pgtest::PgCluster::shared().unwrap();
            let tables = cluster
                .psql(
                    name,
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
                )
                .unwrap();
            let mut all = Vec::new();
            for t in tables.lines().filter(|t| !t.is_empty()) {
                let rows = cluster
                    .psql(name, &format!("SELECT t::text FROM {t} t"))
                    .unwrap();
                all.extend_from_slice(rows.as_bytes());
            }
            assert!(!all.is_empty(), "the database holds rows");
            return all;
        }
    };
    let mut all = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        if let Ok(b) = std::fs::read(PathBuf::from(p)) {
            all.extend_from_slice(&b);
        }
    }
    all
}

pub fn count(haystack: &[u8], needle: &str) -> usize {
    let n = needle.as_bytes();
    haystack.windows(n.len()).filter(|w| *w == n).count()
}
