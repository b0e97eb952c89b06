//! Shared by the tests: keygate-ratelimit served in-process on 127.0.0.1 (port 0), its gRPC
//! client (envoy-types'), its HTTP side, and requests in keygate's descriptor format.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use keygate_core::fleet::Subject;
use keygate_ratelimit::{LimitSet, Limits, Options};
use tonic::transport::Channel;

pub struct Service {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Service {
    /// Serves `limits_yaml` (a static set) against the Redis at `redis_url`.
    pub async fn with_limits(redis_url: &str, limits_yaml: &str) -> Service {
        let limits = Limits::Static(LimitSet::parse(limits_yaml).unwrap());
        Service::start(redis_url, limits).await
    }

    pub async fn start(redis_url: &str, limits: Limits) -> Service {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let options = Options {
            redis_url: redis_url.to_string(),
            limits,
        };
        let task = tokio::spawn(keygate_ratelimit::serve(grpc, http, options, async move {
            let _ = stopped.await;
        }));
        Service {
            grpc: grpc_addr,
            http: http_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    /// GET on the HTTP side: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("http://{}{path}", self.http))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Waits (bounded) for `/readyz` to answer 200.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.get("/readyz").await;
            if status == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "never ready: {status} {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A sample's value in `/metrics` (`name` with its labels, as printed).
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{body}"))
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A descriptor of `(key, value)` entries.
pub fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(key, value)| Entry {
                key: key.to_string(),
                value: value.to_string(),
            })
            .collect(),
        ..RateLimitDescriptor::default()
    }
}

/// The descriptor keygate sends for `subject` (keygate-core's `fleet::Subject::entries`).
pub fn of(subject: &Subject) -> RateLimitDescriptor {
    descriptor(&subject.entries())
}

pub fn request(descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: keygate_core::fleet::DEFAULT_DOMAIN.to_string(),
        descriptors,
        hits_addend: hits,
    }
}

pub async fn ask(
    client: &mut RateLimitServiceClient<Channel>,
    request: RateLimitRequest,
) -> Result<RateLimitResponse, tonic::Status> {
    client
        .should_rate_limit(request)
        .await
        .map(tonic::Response::into_inner)
}

pub fn account(sid: &str) -> Subject {
    Subject::Account {
        account_sid: sid.into(),
    }
}

/// One limit of the Limitador limits file, in the control plane's export's syntax.
pub fn limit(name: &str, max: u32, seconds: u64, conditions: &[&str], variable: &str) -> String {
    let mut s = format!(
        "- namespace: \"keygate\"\n  name: \"{name}\"\n  max_value: {max}\n  seconds: {seconds}\n  conditions:\n"
    );
    for c in conditions {
        s.push_str(&format!("    - \"{c}\"\n"));
    }
    s.push_str(&format!(
        "  variables:\n    - \"descriptors[0].{variable}\"\n"
    ));
    s
}

/// The `keygate-ratelimit` binary running as a child process, its stderr (JSON logs) read.
pub struct Binary {
    pub child: std::process::Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Binary {
    /// Starts the binary with `args` (plus `--listen`/`--http` on port 0) and `env`; returns
    /// once it logged the addresses it listens on.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Binary {
        use std::io::BufRead;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_keygate-ratelimit"));
        command
            .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                kept.lock().unwrap().push(line.clone());
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v["fields"]["message"] == "listening" {
                    let addr = |k: &str| v["fields"][k].as_str().unwrap().parse().unwrap();
                    let _ = tx.send((addr("grpc"), addr("http")));
                }
            }
        });
        let (grpc, http) = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no listening line; log: {:?}", log.lock().unwrap()));
        Binary {
            child,
            grpc,
            http,
            log,
        }
    }

    pub async fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("http://{}{path}", self.http))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.get("/readyz").await;
            if status == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "never ready: {status} {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }

    pub fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
