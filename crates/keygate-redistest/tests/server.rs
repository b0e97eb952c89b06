//! A real redis-server: started on a free port, stopped (nothing listens) and started again on
//! the same port, and gone (process and directory) after drop and after its process exits
//! without dropping it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keygate_redistest::RedisServer;

/// Whether `pid` is a live process (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits (bounded) until `pid` is gone and `dir` removed; false if that never happens.
fn gone_within(pid: u32, dir: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !alive(pid) && !dir.exists() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn listening(port: u16) -> bool {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
}

#[test]
fn start_answers_ping_on_its_own_127_0_0_1_port() {
    let redis = RedisServer::start().unwrap();
    redis.ping().unwrap();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    assert!(alive(redis.pid().unwrap()));
    let other = RedisServer::start().unwrap();
    assert_ne!(redis.port(), other.port());
}

#[test]
fn stop_frees_the_port_and_start_again_serves_the_same_port() {
    let mut redis = RedisServer::start().unwrap();
    let (port, pid) = (redis.port(), redis.pid().unwrap());
    redis.stop().unwrap();
    assert!(!alive(pid));
    assert!(!redis.is_running());
    assert!(!listening(port), "something still listens on {port}");
    assert!(redis.ping().is_err());
    redis.stop().unwrap(); // stopping a stopped server does nothing

    redis.start_again().unwrap();
    assert_eq!(redis.port(), port);
    assert_ne!(redis.pid(), Some(pid));
    redis.ping().unwrap();
    assert_eq!(
        redis.start_again().unwrap_err(),
        "redistest: the server is already running"
    );
}

#[test]
fn drop_ends_the_server_and_removes_the_directory() {
    let mut redis = RedisServer::start().unwrap();
    redis.stop().unwrap();
    redis.start_again().unwrap();
    let (pid, dir) = (redis.pid().unwrap(), redis.dir().to_path_buf());
    assert!(dir.is_dir());
    drop(redis);
    assert!(!alive(pid));
    assert!(!dir.exists());
}

#[test]
fn a_process_that_exits_without_dropping_its_server_leaves_none() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_start_then_exit_without_drop",
            "--ignored",
            "--nocapture",
        ])
        .env("KEYGATE_REDISTEST_HELPER", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("server "))
        .unwrap_or_else(|| {
            panic!(
                "helper printed no server: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let (pid, dir) = line.split_once(' ').unwrap();
    let (pid, dir): (u32, PathBuf) = (pid.parse().unwrap(), PathBuf::from(dir));
    // The watchdog sees the helper's end of its pipe close and kills the server.
    assert!(
        gone_within(pid, &dir, Duration::from_secs(20)),
        "server {pid} or {} outlived its process",
        dir.display()
    );
}

#[test]
#[ignore = "helper: run in a child process by a_process_that_exits_without_dropping_its_server_leaves_none"]
fn helper_start_then_exit_without_drop() {
    if std::env::var_os("KEYGATE_REDISTEST_HELPER").is_none() {
        return;
    }
    let mut redis = RedisServer::start().unwrap();
    // The second run's watchdog is the one that must act.
    redis.stop().unwrap();
    redis.start_again().unwrap();
    println!("server {} {}", redis.pid().unwrap(), redis.dir().display());
    std::io::stdout().flush().unwrap();
    std::process::exit(0);
}
