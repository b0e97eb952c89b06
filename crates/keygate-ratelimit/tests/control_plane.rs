//! Limits follow the control plane: the real `keygate-control` binary (`KEYGATE_CONTROL`, else
//! `target/debug/keygate-control`; `make test-ratelimit` builds it) and the real
//! `keygate-ratelimit` binary polling its export with the edge token. A limit changed through the
//! control plane's API is the limit the service enforces, without a restart; the control plane
//! gone, the last good limits stay in force.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{account, ask, of, request, Binary};
use keygate_redistest::RedisServer;
use serde_json::json;

fn control_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("KEYGATE_CONTROL") {
        return PathBuf::from(path);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/keygate-control");
    assert!(
        path.is_file(),
        "keygate-control not built: run `cargo build -p keygate-control` (make test-ratelimit does) or set KEYGATE_CONTROL"
    );
    path
}

struct Control {
    child: Child,
    url: String,
    credentials: HashMap<String, String>,
    _dir: tempfile::TempDir,
}

impl Control {
    /// `keygate-control init` on a new database (its credentials kept), then `serve`.
    async fn start() -> Control {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keygate.db");
        let out = Command::new(control_bin())
            .args(["init", "--data"])
            .arg(&db)
            .env_clear()
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let credentials = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(control_bin())
            .args(["serve", "--data"])
            .arg(&db)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env_clear()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let control = Control {
            child,
            url: format!("http://127.0.0.1:{port}"),
            credentials,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{}/healthz", control.url))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "keygate-control never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        control
    }

    fn credential(&self, name: &str) -> &str {
        self.credentials
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.credentials.keys()))
    }

    /// The operator sets the account's rate: `requests` a minute, fleet-wide.
    async fn set_account_rate(&self, requests: u32) {
        let sid = self.credential("ACCOUNT_SID");
        let r = reqwest::Client::new()
            .patch(format!("{}/v1/accounts/{sid}", self.url))
            .bearer_auth(self.credential("KEYGATE_ADMIN_TOKEN"))
            .json(
                &json!({"limits": {"rate": {"requests": requests, "per": "1m", "scope": "fleet"}}}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_changed_through_the_control_plane_are_enforced_without_a_restart() {
    let redis = RedisServer::start().unwrap();
    let mut control = Control::start().await;
    control.set_account_rate(3).await;
    let sid = control.credential("ACCOUNT_SID").to_string();
    let binary = Binary::start(
        &[
            "--control-plane",
            &control.url,
            "--redis",
            &redis.url(),
            "--poll-s",
            "1",
        ],
        &[(
            "KEYGATE_EDGE_TOKEN",
            control.credential("KEYGATE_EDGE_TOKEN"),
        )],
    );
    binary.wait_ready().await;
    let mut client = binary.client().await;
    let one = || request(vec![of(&account(&sid))], 1);
    let mut answers = Vec::new();
    for _ in 0..4 {
        let r = ask(&mut client, one()).await.unwrap();
        let limit = r.statuses[0].current_limit.clone().unwrap();
        answers.push((
            r.overall_code,
            r.statuses[0].limit_remaining,
            limit.requests_per_unit,
        ));
    }
    assert_eq!(answers, vec![(1, 2, 3), (1, 1, 3), (1, 0, 3), (2, 0, 3)]);
    // Another account has no fleet limit: unlimited.
    let r = ask(&mut client, request(vec![of(&account("AC0"))], 1))
        .await
        .unwrap();
    assert_eq!(
        (r.overall_code, r.statuses[0].current_limit.clone()),
        (1, None)
    );

    // Raised to 5 through the API: the same counter (3 used) has 2 more once the service has
    // polled the new export.
    control.set_account_rate(5).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let r = ask(&mut client, one()).await.unwrap();
        if r.overall_code == 1 {
            break r;
        }
        assert_eq!(
            r.statuses[0]
                .current_limit
                .as_ref()
                .unwrap()
                .requests_per_unit,
            3
        );
        assert!(Instant::now() < deadline, "the new limit never came: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (
            first.statuses[0].limit_remaining,
            first.statuses[0]
                .current_limit
                .as_ref()
                .unwrap()
                .requests_per_unit
        ),
        (1, 5)
    );
    let r = ask(&mut client, one()).await.unwrap();
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (1, 0));
    let r = ask(&mut client, one()).await.unwrap();
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (2, 0));
    let (_, metrics) = binary.get("/metrics").await;
    let version = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keygate_ratelimit_config_version "))
        .unwrap();
    assert_ne!(version, "0", "{metrics}");

    // The control plane gone: polls fail (counted), the last good limits stay in force.
    let _ = control.child.kill();
    let _ = control.child.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = binary.get("/metrics").await;
        if metrics.contains("keygate_ratelimit_errors_total{kind=\"control_plane\"}") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed poll counted:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = ask(&mut client, one()).await.unwrap();
    assert_eq!(
        (
            r.overall_code,
            r.statuses[0]
                .current_limit
                .as_ref()
                .unwrap()
                .requests_per_unit
        ),
        (2, 5)
    );
    assert!(
        !binary
            .logs()
            .contains(control.credential("KEYGATE_EDGE_TOKEN")),
        "the edge token was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_edge_token_loads_nothing_and_says_so() {
    let redis = RedisServer::start().unwrap();
    let control = Control::start().await;
    let binary = Binary::start(
        &["--control-plane", &control.url, "--redis", &redis.url()],
        &[("KEYGATE_EDGE_TOKEN", "kg_edge_0000")],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = binary.get("/metrics").await;
        if metrics.contains("keygate_ratelimit_errors_total{kind=\"control_plane\"}") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed poll counted:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        binary.get("/readyz").await,
        (503, "not ready: no limits loaded yet\n".to_string())
    );
    let mut client = binary.client().await;
    let status = ask(&mut client, request(vec![of(&account("AC1"))], 1))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            tonic::Code::Unavailable,
            "keygate-ratelimit: no limits loaded yet"
        )
    );
    assert!(
        binary.logs().contains("the control plane answered 401"),
        "{}",
        binary.logs()
    );
}
