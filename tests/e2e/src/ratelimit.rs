//! A real keygate-ratelimit (the `keygate-ratelimit` binary) for end-to-end tests: Envoy's
//! rate-limit service over a real Redis, following a real control plane's export. Started on free
//! loopback ports, ready once its `/readyz` answers 200, killed on drop; [`RateLimitService::kill`]
//! and [`RateLimitService::restart`] for outages.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::control::ControlPlane;
use crate::{paths, wait, Req};

/// The binary: `KEYGATE_RATELIMIT`, else `target/{release,debug}/keygate-ratelimit`.
pub fn ratelimit_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYGATE_RATELIMIT") {
        return PathBuf::from(p);
    }
    let root = paths::workspace_root();
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("keygate-ratelimit");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "keygate-ratelimit not built: run `cargo build -p keygate-ratelimit` (make test-e2e does)"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running keygate-ratelimit.
pub struct RateLimitService {
    grpc_port: u16,
    http_port: u16,
    redis_url: String,
    control_url: String,
    edge_token: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RateLimitService {
    /// Starts one counting in `redis_url` with the limits `control` exports (polled every
    /// second), and waits until it is ready.
    pub fn start(redis_url: &str, control: &ControlPlane) -> RateLimitService {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RateLimitService {
            grpc_port: free_port(),
            http_port: free_port(),
            redis_url: redis_url.to_owned(),
            control_url: format!("http://127.0.0.1:{}", control.port()),
            edge_token: control.cred("KEYGATE_EDGE_TOKEN").to_owned(),
            log: dir.path().join("ratelimit.log"),
            _dir: dir,
            child: None,
        };
        s.restart();
        s
    }

    /// The gRPC port (Envoy's cluster for it).
    pub fn grpc_port(&self) -> u16 {
        self.grpc_port
    }

    /// `GET path` on its HTTP side.
    pub fn http_get(&self, path: &str) -> crate::Response {
        Req::get(path).send(self.http_port)
    }

    /// Starts it again on the same ports (after [`RateLimitService::kill`]) and waits until ready.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(ratelimit_bin())
            .args(["--listen", &format!("127.0.0.1:{}", self.grpc_port)])
            .args(["--http", &format!("127.0.0.1:{}", self.http_port)])
            .args(["--redis", &self.redis_url])
            .args(["--control-plane", &self.control_url])
            .args(["--poll-s", "1", "--log-format", "text"])
            .env("KEYGATE_EDGE_TOKEN", &self.edge_token)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start keygate-ratelimit");
        self.child = Some(child);
        let ready = wait::within(Duration::from_secs(20), || {
            Req::get("/readyz")
                .try_send(self.http_port)
                .is_ok_and(|r| r.status == 200)
        });
        assert!(
            ready.is_some(),
            "keygate-ratelimit not ready in 20 s:\n{}",
            self.logs()
        );
    }

    /// Stops it (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RateLimitService {
    fn drop(&mut self) {
        self.kill();
    }
}
