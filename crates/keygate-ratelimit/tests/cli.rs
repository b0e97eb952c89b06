//! The `keygate-ratelimit` binary: exact errors for bad flags and a bad limits file (clap's
//! usage errors exit 2, the service's own exit 1 with one `keygate-ratelimit: error:` line),
//! and a real run from a limits file: listening, ready, counting, stopped by SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::process::Command;

use common::{account, ask, limit, of, request, Binary};
use keygate_redistest::RedisServer;

/// Runs the binary with `args` and `env` only: (exit code, stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keygate-ratelimit"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

/// Arguments, environment, exit code, stderr.
type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, i32, String);

#[test]
fn bad_flags_are_refused_with_exact_errors() {
    let limits = file("[]\n");
    let path = limits.path().to_str().unwrap();
    let cases: Vec<Case> = vec![
        (
            vec![],
            vec![],
            2,
            "error: the following required arguments were not provided:\n  \
             <--control-plane <URL>|--limits <FILE>>\n\n\
             Usage: keygate-ratelimit <--control-plane <URL>|--limits <FILE>>\n\n\
             For more information, try '--help'.\n"
                .into(),
        ),
        (
            vec!["--limits", path, "--poll-s", "0"],
            vec![],
            2,
            "error: invalid value '0' for '--poll-s <SECONDS>': 0 is not in 1..=3600\n\n\
             For more information, try '--help'.\n"
                .into(),
        ),
        (
            vec!["--limits", path, "--listen", "nope"],
            vec![],
            2,
            "error: invalid value 'nope' for '--listen <ADDR>': invalid socket address syntax\n\n\
             For more information, try '--help'.\n"
                .into(),
        ),
        (
            vec!["--limits", path, "--control-plane", "http://127.0.0.1:1"],
            vec![],
            2,
            "error: the argument '--limits <FILE>' cannot be used with '--control-plane <URL>'\n\n\
             Usage: keygate-ratelimit <--control-plane <URL>|--limits <FILE>>\n\n\
             For more information, try '--help'.\n"
                .into(),
        ),
        (
            vec!["--limits", path, "--redis", "nope"],
            vec![],
            1,
            "keygate-ratelimit: error: --redis \"nope\": Redis URL did not parse- InvalidClientConfig\n"
                .into(),
        ),
        (
            vec!["--limits", "/no/such/file"],
            vec![],
            1,
            "keygate-ratelimit: error: --limits /no/such/file: No such file or directory (os error 2)\n"
                .into(),
        ),
        (
            vec!["--control-plane", "http://127.0.0.1:1"],
            vec![],
            1,
            "keygate-ratelimit: error: --control-plane needs the edge token in KEYGATE_EDGE_TOKEN\n"
                .into(),
        ),
        (
            vec!["--control-plane", "ftp://127.0.0.1:1"],
            vec![("KEYGATE_EDGE_TOKEN", "kg_edge_x")],
            1,
            "keygate-ratelimit: error: --control-plane \"ftp://127.0.0.1:1\": not an http:// or https:// URL\n"
                .into(),
        ),
        // The environment stands in for a flag.
        (
            vec![],
            vec![("KEYGATE_RATELIMIT_LIMITS", "/no/such/file")],
            1,
            "keygate-ratelimit: error: --limits /no/such/file: No such file or directory (os error 2)\n"
                .into(),
        ),
        (
            vec!["--limits", path, "--log", "[["],
            vec![],
            1,
            format!(
                "keygate-ratelimit: error: --log \"[[\": {}\n",
                tracing_subscriber_error("[[")
            ),
        ),
    ];
    for (args, env, code, stderr) in cases {
        assert_eq!(run(&args, &env), (code, stderr), "{args:?} {env:?}");
    }
}

/// tracing-subscriber's own message for a bad filter (not ours to spell).
fn tracing_subscriber_error(filter: &str) -> String {
    let (code, stderr) = run(&["--limits", "/dev/null", "--log", filter], &[]);
    assert_eq!(code, 1);
    let message = stderr
        .trim_end()
        .strip_prefix(&format!("keygate-ratelimit: error: --log {filter:?}: "))
        .unwrap_or_else(|| panic!("{stderr}"))
        .to_string();
    assert!(!message.is_empty());
    message
}

#[test]
fn a_bad_limits_file_is_refused_with_the_path_of_the_error() {
    let cases = [
        (
            "- namespace: keygate\n  max_value: 60\n  seconds: 0\n",
            "[0].seconds: 0: a window must be 1 to 31622400 seconds",
        ),
        (
            "- namespace: keygate\n  max_value: 60\n  seconds: 60\n  conditions: [\"descriptors[0].keygate ==\"]\n",
            "[0].conditions[0]: ",
        ),
        ("- namespace: [\n", "not YAML: "),
    ];
    for (yaml, want) in cases {
        let f = file(yaml);
        let path = f.path().display().to_string();
        let (code, stderr) = run(&["--limits", &path], &[]);
        let prefix = format!("keygate-ratelimit: error: --limits {path}: {want}");
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.starts_with(&prefix), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

#[test]
fn help_names_every_flag_and_its_environment_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_keygate-ratelimit"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--http",
        "--redis",
        "--control-plane",
        "--control-ca",
        "--limits",
        "--poll-s",
        "KEYGATE_EDGE_TOKEN",
        "[default: 127.0.0.1:8081]",
        "[default: 127.0.0.1:8082]",
        "[default: redis://127.0.0.1:6379]",
        "[default: 2]",
    ] {
        assert!(help.contains(flag), "{flag} not in\n{help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_a_limits_file_and_stops_cleanly_on_sigterm() {
    let redis = RedisServer::start().unwrap();
    let limits = file(&limit(
        "account",
        2,
        60,
        &["descriptors[0].keygate == 'account'"],
        "account_sid",
    ));
    let binary = Binary::start(
        &["--limits", limits.path().to_str().unwrap()],
        &[("KEYGATE_REDIS_URL", &redis.url())],
    );
    binary.wait_ready().await;
    let mut client = binary.client().await;
    let mut answers = Vec::new();
    for _ in 0..3 {
        let r = ask(&mut client, request(vec![of(&account("AC1"))], 1))
            .await
            .unwrap();
        answers.push((r.overall_code, r.statuses[0].limit_remaining));
    }
    assert_eq!(answers, vec![(1, 1), (1, 0), (2, 0)]);
    let (status, metrics) = binary.get("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "keygate_ratelimit_requests_total 3",
        "keygate_ratelimit_hits_granted_total 2",
        "keygate_ratelimit_over_limit_total 1",
        "keygate_ratelimit_limits_loaded 1",
        "keygate_ratelimit_config_version 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in\n{metrics}"
        );
    }
    assert!(
        metrics.contains("keygate_ratelimit_redis_seconds_count 3"),
        "{metrics}"
    );
    assert_eq!(binary.get("/healthz").await, (200, "ok\n".to_string()));
    let logs = binary.logs();
    let status = binary.terminate();
    assert!(status.success(), "{status}; log:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_redis_answers_and_then_ready_without_a_restart() {
    // Redis is not there when the service starts: /readyz says so, calls are UNAVAILABLE.
    let mut redis = RedisServer::start().unwrap();
    redis.stop().unwrap();
    let limits = file(&limit(
        "account",
        2,
        60,
        &["descriptors[0].keygate == 'account'"],
        "account_sid",
    ));
    let binary = Binary::start(
        &[
            "--limits",
            limits.path().to_str().unwrap(),
            "--redis",
            &redis.url(),
        ],
        &[],
    );
    assert_eq!(
        binary.get("/readyz").await,
        (503, "not ready: Redis not connected yet\n".to_string())
    );
    let mut client = binary.client().await;
    let status = ask(&mut client, request(vec![of(&account("AC1"))], 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    redis.start_again().unwrap();
    binary.wait_ready().await;
    let r = ask(&mut client, request(vec![of(&account("AC1"))], 1))
        .await
        .unwrap();
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (1, 1));
}
