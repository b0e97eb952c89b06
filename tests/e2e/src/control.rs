//! A real keygate control plane (the `keygate-control` binary) for end-to-end tests: started on a
//! temporary database and a free loopback port, killed on drop, restartable on the same data.
//! [`ControlPlane::start_tls`] serves HTTPS (`--tls-cert`/`--tls-key`); the harness then talks
//! to it over TLS, trusting the CA it is given. [`ControlPlane::start_postgres`] serves a Postgres
//! database instead of the SQLite file, and [`ControlPlane::replica`] starts another replica on the
//! same database (a fleet).

use std::collections::HashMap;
use std::io::{self, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::READ_TIMEOUT;
use crate::paths;
use crate::{Req, Response};

/// The control-plane binary: `KEYGATE_CONTROL`, else `target/{release,debug}/keygate-control`.
pub fn control_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYGATE_CONTROL") {
        return PathBuf::from(p);
    }
    let root = paths::workspace_root();
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("keygate-control");
        if p.exists() {
            return p;
        }
    }
    panic!("keygate-control not built: run `cargo build -p keygate-control` (make test-e2e does)");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// TLS for [`ControlPlane::start_tls`]: what the server presents and what the harness trusts.
#[derive(Clone, Debug)]
pub struct ControlTls {
    /// `--tls-cert`: the server's certificate chain (PEM).
    pub cert: PathBuf,
    /// `--tls-key`: its private key (PEM).
    pub key: PathBuf,
    /// The CA certificate (PEM) the harness's client trusts.
    pub ca: PathBuf,
    /// The name the client asks for (SNI) and requires in the certificate.
    pub server_name: String,
}

/// HTTPS, one request per connection (`connection: close`), for a control plane serving TLS.
struct TlsClient {
    server_name: rustls::pki_types::ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
}

impl TlsClient {
    fn new(tls: &ControlTls) -> TlsClient {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&tls.ca)
            .unwrap_or_else(|e| panic!("read CA {}: {e}", tls.ca.display()))
        {
            roots
                .add(cert.expect("a CA certificate"))
                .expect("a usable CA");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        TlsClient {
            server_name: rustls::pki_types::ServerName::try_from(tls.server_name.clone())
                .expect("a server name"),
            config: Arc::new(config),
        }
    }

    fn send(&self, req: &Req, port: u16) -> io::Result<Response> {
        let conn = rustls::ClientConnection::new(self.config.clone(), self.server_name.clone())
            .map_err(io::Error::other)?;
        let tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(READ_TIMEOUT))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(&req.clone().header("connection", "close").to_bytes(port))?;
        tls.flush()?;
        let mut raw = Vec::new();
        match tls.read_to_end(&mut raw) {
            Ok(_) => {}
            // Closed without close_notify after a whole response: the framing below decides.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => return Err(e),
        }
        parse_response(&raw, req.is_head())
    }
}

/// One complete response from `raw` (framed by Content-Length, chunked, or the end).
fn parse_response(raw: &[u8], head_request: bool) -> io::Result<Response> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_owned());
    let mut headers = vec![httparse::EMPTY_HEADER; 64];
    let mut res = httparse::Response::new(&mut headers);
    let len = match res.parse(raw).map_err(io::Error::other)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Err(bad("incomplete response head")),
    };
    let headers: Vec<(String, Vec<u8>)> = res
        .headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect();
    let status = res.code.unwrap_or(0);
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).trim().to_ascii_lowercase())
    };
    let rest = &raw[len..];
    let body = if head_request || status == 204 || status == 304 {
        Vec::new()
    } else if find("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
        dechunk(rest).ok_or_else(|| bad("bad chunked body"))?
    } else if let Some(n) = find("content-length") {
        let n: usize = n.parse().map_err(|_| bad("bad content-length"))?;
        rest.get(..n)
            .ok_or_else(|| bad("body shorter than content-length"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        reason: res.reason.unwrap_or("").to_owned(),
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// A running control plane.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// `NAME=value` credentials printed once at initialization.
    pub creds: HashMap<String, String>,
    /// Set by [`ControlPlane::start_tls`]: serve HTTPS, and talk to it over TLS.
    tls: Option<(ControlTls, TlsClient)>,
    /// Set by [`ControlPlane::start_postgres`]: the Postgres URL served instead of the file.
    database: Option<String>,
    /// Set by [`ControlPlane::start_with_catalog`]: served with `--catalog` this file.
    catalog: Option<PathBuf>,
}

impl ControlPlane {
    /// Starts a control plane on a new database and waits until it answers.
    pub fn start() -> ControlPlane {
        ControlPlane::start_with(None)
    }

    /// Starts a control plane serving HTTPS with `tls.cert` / `tls.key`, and waits until it
    /// answers over TLS (the harness trusts `tls.ca` and asks for `tls.server_name`).
    pub fn start_tls(tls: ControlTls) -> ControlPlane {
        let client = TlsClient::new(&tls);
        ControlPlane::start_with(Some((tls, client)))
    }

    /// Starts a control plane whose API catalogue (`--catalog`) is `catalog`.
    pub fn start_with_catalog(catalog: &serde_json::Value) -> ControlPlane {
        let mut cp = ControlPlane::new(None, None);
        let path = cp.dir.path().join("catalog.json");
        std::fs::write(&path, catalog.to_string()).expect("write the catalogue");
        cp.catalog = Some(path);
        let stdout = cp.spawn();
        cp.read_creds(&stdout);
        cp
    }

    /// The built-in API catalogue (the demo's APIs and limit defaults), as JSON.
    pub fn built_in_catalog() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../crates/keygate-control/src/default_catalog.json"
        );
        let text = std::fs::read_to_string(path).expect("the built-in catalogue");
        serde_json::from_str(&text).expect("the built-in catalogue is JSON")
    }

    fn start_with(tls: Option<(ControlTls, TlsClient)>) -> ControlPlane {
        let mut cp = ControlPlane::new(tls, None);
        let stdout = cp.spawn();
        cp.read_creds(&stdout);
        cp
    }

    fn new(tls: Option<(ControlTls, TlsClient)>, database: Option<String>) -> ControlPlane {
        ControlPlane {
            dir: tempfile::tempdir().expect("tempdir"),
            port: free_port(),
            child: None,
            creds: HashMap::new(),
            tls,
            database,
            catalog: None,
        }
    }

    /// Starts a replica serving the Postgres database at `url` (`keygate-control serve
    /// --database`, given as `KEYGATE_DATABASE` so that the password stays off the command line)
    /// on an empty database, which it initializes: the credentials it prints are kept. Start
    /// the fleet's other replicas with [`ControlPlane::replica`].
    pub fn start_postgres(url: &str) -> ControlPlane {
        let mut cp = ControlPlane::new(None, Some(url.to_owned()));
        let stdout = cp.spawn();
        cp.read_creds(&stdout);
        cp
    }

    /// Another replica on this one's Postgres database, on a port of its own, with the same
    /// credentials (it prints none: the database is initialized).
    pub fn replica(&self) -> ControlPlane {
        let database = self
            .database
            .clone()
            .expect("a replica of a control plane on Postgres (start_postgres)");
        let mut cp = ControlPlane::new(None, Some(database));
        cp.creds = self.creds.clone();
        let _ = cp.spawn();
        cp
    }

    /// Initializes a database and picks a port without serving yet (`keygate-control init`):
    /// the credentials are known, nothing listens until [`ControlPlane::restart`]. For tests
    /// that start Envoy before the control plane.
    pub fn initialized() -> ControlPlane {
        let mut cp = ControlPlane::new(None, None);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(cp.dir.path().join("control.log"))
            .expect("log");
        let out = Command::new(control_bin())
            .env_remove("KEYGATE_DATABASE")
            .args(["init", "--data"])
            .arg(cp.db())
            .stderr(Stdio::from(log))
            .output()
            .expect("run keygate-control init");
        assert!(out.status.success(), "init failed; log:\n{}", cp.logs());
        let stdout = String::from_utf8_lossy(&out.stdout);
        cp.read_creds(&stdout);
        cp
    }

    /// Keeps the `NAME=value` credentials `init` printed; panics if there are none.
    fn read_creds(&mut self, stdout: &str) {
        for line in stdout.lines() {
            if let Some((k, v)) = line.split_once('=') {
                if !k.starts_with('#') {
                    self.creds.insert(k.trim().to_owned(), v.trim().to_owned());
                }
            }
        }
        assert!(
            self.creds.contains_key("KEYGATE_EDGE_TOKEN"),
            "no credentials printed: {stdout}"
        );
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("keygate.db")
    }

    /// Spawns `serve`; returns what it printed on stdout before it answered.
    fn spawn(&mut self) -> String {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let out = self.dir.path().join(format!(
            "stdout-{}.txt",
            STARTS.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::File::create(&out).expect("stdout file");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("control.log"))
            .expect("log");
        let mut cmd = Command::new(control_bin());
        cmd.arg("serve");
        match &self.database {
            Some(url) => cmd.env("KEYGATE_DATABASE", url),
            None => cmd
                .env_remove("KEYGATE_DATABASE")
                .arg("--data")
                .arg(self.db()),
        };
        cmd.args(["--listen", &format!("127.0.0.1:{}", self.port)]);
        if let Some(catalog) = &self.catalog {
            cmd.arg("--catalog").arg(catalog);
        }
        if let Some((tls, _)) = &self.tls {
            cmd.arg("--tls-cert")
                .arg(&tls.cert)
                .arg("--tls-key")
                .arg(&tls.key);
        }
        let child = cmd
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn keygate-control");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.try_send(&Req::get("/v1/edge/config")).is_ok() {
                let mut s = String::new();
                let _ = std::fs::File::open(&out).and_then(|mut f| f.read_to_string(&mut s));
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("keygate-control did not start; log:\n{}", self.logs());
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn cred(&self, name: &str) -> &str {
        self.creds
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no credential {name}"))
    }

    pub fn account_sid(&self) -> &str {
        self.cred("ACCOUNT_SID")
    }

    /// The `calls` API path of [`ControlPlane::account_sid`].
    pub fn calls_path(&self) -> String {
        format!("/v2/accounts/{}/calls", self.account_sid())
    }

    /// Basic with the first account's SID and auth token.
    pub fn as_account(&self, req: Req) -> Req {
        req.basic(self.cred("ACCOUNT_SID"), self.cred("AUTH_TOKEN"))
    }

    /// Sends `req` (over TLS after [`ControlPlane::start_tls`]); panics on I/O errors.
    pub fn send(&self, req: &Req) -> Response {
        match &self.tls {
            None => req.send(self.port),
            Some(_) => self.try_send(req).unwrap_or_else(|e| {
                panic!(
                    "{} {} to the control plane over TLS failed: {e}",
                    String::from_utf8_lossy(req.method()),
                    String::from_utf8_lossy(req.target())
                )
            }),
        }
    }

    pub fn try_send(&self, req: &Req) -> io::Result<Response> {
        match &self.tls {
            None => req.try_send(self.port),
            Some((_, client)) => client.send(req, self.port),
        }
    }

    /// The TLS files it serves with ([`ControlPlane::start_tls`]).
    pub fn tls(&self) -> Option<&ControlTls> {
        self.tls.as_ref().map(|(t, _)| t)
    }

    /// The Postgres URL it serves ([`ControlPlane::start_postgres`]).
    pub fn database(&self) -> Option<&str> {
        self.database.as_deref()
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same database and port.
    pub fn restart(&mut self) {
        self.kill();
        let _ = self.spawn();
    }

    /// Whether the process is running (false after [`ControlPlane::kill`] or
    /// [`ControlPlane::initialized`]).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Creates a key through the Twilio-compatible API as the first account; returns
    /// `(sid, secret)`.
    pub fn create_key(&self, key_type: &str) -> (String, String) {
        let path = format!("/2010-04-01/Accounts/{}/Keys.json", self.account_sid());
        let r = self.send(
            &self
                .as_account(Req::post(path))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("FriendlyName=e2e&KeyType={key_type}")),
        );
        assert_eq!(r.status, 201, "{r:?}");
        let v = r.body_json();
        (
            v["sid"].as_str().expect("sid").to_owned(),
            v["secret"].as_str().expect("secret").to_owned(),
        )
    }

    /// `POST /v1/accounts/{AC}/keys` as the first account with `body` (`role`, `apis`, `limits`,
    /// ...); returns `(sid, secret)`.
    pub fn create_key_v1(&self, body: serde_json::Value) -> (String, String) {
        let path = format!("/v1/accounts/{}/keys", self.account_sid());
        let r = self.send(&self.as_account(Req::post(path)).json(&body));
        assert_eq!(r.status, 201, "{r:?}");
        let v = r.body_json();
        (
            v["sid"].as_str().expect("sid").to_owned(),
            v["secret"].as_str().expect("secret").to_owned(),
        )
    }

    /// `PATCH /v1/accounts/{AC}` on the first account with the admin token (status, region,
    /// regions, allowed_ips, limits).
    pub fn patch_account(&self, body: serde_json::Value) -> serde_json::Value {
        let path = format!("/v1/accounts/{}", self.account_sid());
        let r = self.send(
            &Req::new("PATCH", path)
                .bearer(self.cred("KEYGATE_ADMIN_TOKEN"))
                .json(&body),
        );
        assert_eq!(r.status, 200, "{r:?}");
        r.body_json()
    }

    /// Deletes (revokes) a key of the first account.
    pub fn delete_key(&self, sid: &str) {
        let path = format!(
            "/2010-04-01/Accounts/{}/Keys/{sid}.json",
            self.account_sid()
        );
        let r = self.send(&self.as_account(Req::delete(path)));
        assert_eq!(r.status, 204, "{r:?}");
    }

    /// `POST /v1/accounts/{AC}/keys/{SK}/regenerate` with `grace_seconds`; returns the answer
    /// (new `secret`, and `secrets[]` with the previous one's `not_after`).
    pub fn regenerate_key(&self, sid: &str, grace_seconds: u64) -> serde_json::Value {
        let path = format!("/v1/accounts/{}/keys/{sid}/regenerate", self.account_sid());
        let r = self.send(
            &self
                .as_account(Req::post(path))
                .json(&serde_json::json!({ "grace_seconds": grace_seconds })),
        );
        assert_eq!(r.status, 200, "{r:?}");
        r.body_json()
    }

    /// The feed's current config version (its `ETag`), read with the edge token.
    pub fn feed_version(&self) -> u64 {
        let r = self.send(&Req::get("/v1/edge/config").bearer(self.cred("KEYGATE_EDGE_TOKEN")));
        assert_eq!(r.status, 200, "{r:?}");
        r.body_json()["version"].as_u64().expect("version")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("control.log")).unwrap_or_default()
    }

    /// Every file of its database (for secret scans).
    pub fn database_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.db().into_os_string();
            p.push(suffix);
            if let Ok(b) = std::fs::read(PathBuf::from(p)) {
                all.extend(b);
            }
        }
        all
    }

    /// The plugin configuration for an Envoy whose cluster `keygate_control` points here.
    pub fn plugin_config(&self, extra: serde_json::Value) -> serde_json::Value {
        let mut cp = serde_json::json!({
            "cluster": "keygate_control",
            "authority": "keygate-control",
            "token": self.cred("KEYGATE_EDGE_TOKEN"),
            "wait_s": 10,
        });
        if let (Some(obj), Some(more)) = (cp.as_object_mut(), extra.as_object()) {
            for (k, v) in more {
                obj.insert(k.clone(), v.clone());
            }
        }
        serde_json::json!({ "control_plane": cp })
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}
