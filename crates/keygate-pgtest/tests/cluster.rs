//! A real server: started, reached by its URLs with a password, one database per test, and gone
//! (processes and directory) after drop, after a panic and after its process exits without
//! dropping it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keygate_pgtest::{PgCluster, PgOptions};

/// `psql URL -c SQL` as this process's user, over TCP with the URL's password.
fn psql_url(cluster: &PgCluster, url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(cluster.bin().join("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .env_remove("PGPASSWORD")
        .env_remove("PGPASSFILE")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Whether `pid` is a live process (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The processes whose parent is `pid` (the postmaster's backends and auxiliary processes).
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            found.push(child);
        }
    }
    found
}

/// Waits (bounded) until none of `pids` is alive and `dir` is gone; false if that never happens.
fn gone_within(pids: &[u32], dir: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !pids.iter().any(|&p| alive(p)) && !dir.exists() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn start_serves_the_keygate_database_to_the_keygate_role_over_tcp() {
    let started = Instant::now();
    let cluster = PgCluster::start().unwrap();
    eprintln!("cluster started in {} ms", started.elapsed().as_millis());
    let url = cluster.url();
    assert_eq!(
        url,
        format!(
            "postgres://keygate:{}@127.0.0.1:{}/keygate",
            cluster.password(),
            cluster.port()
        )
    );
    assert_eq!(
        psql_url(
            &cluster,
            &url,
            "select current_user || ' ' || current_database()"
        )
        .unwrap(),
        "keygate keygate"
    );
    // Tests connect as the control plane would in production: not as a superuser.
    assert_eq!(
        psql_url(
            &cluster,
            &url,
            "select rolsuper from pg_roles where rolname = current_user"
        )
        .unwrap(),
        "f"
    );
    // The durable defaults unless asked otherwise, and the connection budget asked for.
    assert_eq!(psql_url(&cluster, &url, "show fsync").unwrap(), "on");
    assert_eq!(
        psql_url(&cluster, &url, "show max_connections").unwrap(),
        "200"
    );
    assert_eq!(
        psql_url(&cluster, &url, "show listen_addresses").unwrap(),
        "127.0.0.1"
    );
}

#[test]
fn the_password_is_checked() {
    let cluster = PgCluster::start().unwrap();
    let wrong = cluster.url().replace(cluster.password(), "0000");
    let err = psql_url(&cluster, &wrong, "select 1").unwrap_err();
    assert!(err.contains("password authentication failed"), "{err}");
}

#[test]
fn each_created_database_is_reachable_and_separate() {
    let cluster = PgCluster::start().unwrap();
    let alpha = cluster.create_database("alpha").unwrap();
    let beta = cluster.create_database("beta").unwrap();
    assert_eq!(alpha, cluster.url_for("alpha"));
    assert!(
        beta.ends_with(&format!("127.0.0.1:{}/beta", cluster.port())),
        "{beta}"
    );
    for url in [&alpha, &beta] {
        assert_eq!(psql_url(&cluster, url, "select 1").unwrap(), "1");
    }
    // The keygate role owns them, so it can create tables (what migrations do).
    psql_url(
        &cluster,
        &alpha,
        "create table t (x int); insert into t values (7)",
    )
    .unwrap();
    assert_eq!(psql_url(&cluster, &alpha, "select x from t").unwrap(), "7");
    assert_eq!(
        psql_url(&cluster, &beta, "select to_regclass('t') is null").unwrap(),
        "t"
    );
    // Creating one twice is an error, not a silent reuse of another test's data.
    let err = cluster.create_database("alpha").unwrap_err();
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn fast_unsafe_turns_off_fsync_and_synchronous_commit() {
    let cluster = PgCluster::start_with(&PgOptions {
        fast_unsafe: true,
        max_connections: 50,
    })
    .unwrap();
    let url = cluster.url();
    assert_eq!(psql_url(&cluster, &url, "show fsync").unwrap(), "off");
    assert_eq!(
        psql_url(&cluster, &url, "show synchronous_commit").unwrap(),
        "off"
    );
    assert_eq!(
        psql_url(&cluster, &url, "show max_connections").unwrap(),
        "50"
    );
}

#[test]
fn database_names_outside_the_safe_set_are_refused() {
    let cluster = PgCluster::shared().unwrap();
    for name in [
        "",
        "Alpha",
        "1x",
        "a-b",
        "a;drop database keygate",
        "a b",
        &"x".repeat(64),
    ] {
        let err = cluster.create_database(name).unwrap_err();
        assert!(
            err.contains("use 1 to 63 of a-z, 0-9 and _"),
            "{name:?}: {err}"
        );
    }
}

#[test]
fn the_shared_cluster_hands_out_fresh_databases() {
    let first = PgCluster::shared().unwrap();
    let second = PgCluster::shared().unwrap();
    assert_eq!(first.port(), second.port());
    let a = first.fresh_database().unwrap();
    let b = second.fresh_database().unwrap();
    assert_ne!(a, b);
    psql_url(first, &a, "create table only_in_a (x int)").unwrap();
    assert_eq!(
        psql_url(first, &b, "select to_regclass('only_in_a') is null").unwrap(),
        "t"
    );
}

#[test]
fn the_superuser_psql_runs_sql_in_a_database() {
    let cluster = PgCluster::start().unwrap();
    assert_eq!(
        cluster
            .psql("keygate", "select current_user;")
            .unwrap()
            .trim(),
        "postgres"
    );
    let err = cluster
        .psql("keygate", "select * from no_such_table;")
        .unwrap_err();
    assert!(err.contains("no_such_table"), "{err}");
}

fn running(cluster: &PgCluster) -> (Vec<u32>, PathBuf) {
    let pid = cluster.pid().unwrap();
    assert!(alive(pid));
    // Touch the server so it has a backend besides its auxiliary processes.
    cluster.psql("keygate", "select 1;").unwrap();
    let mut pids = children(pid);
    assert!(!pids.is_empty(), "the postmaster has no child processes");
    pids.push(pid);
    let dir = cluster.dir().to_path_buf();
    assert!(dir.join("data").join("PG_VERSION").is_file());
    (pids, dir)
}

#[test]
fn stop_ends_every_server_process_and_removes_the_directory() {
    let cluster = PgCluster::start().unwrap();
    let (pids, dir) = running(&cluster);
    cluster.stop().unwrap();
    // stop returns after the postmaster has exited and been reaped, and its children before it.
    assert!(pids.iter().all(|&p| !alive(p)), "still running: {pids:?}");
    assert!(!dir.exists());
}

#[test]
fn drop_ends_every_server_process_and_removes_the_directory() {
    let cluster = PgCluster::start().unwrap();
    let (pids, dir) = running(&cluster);
    drop(cluster);
    assert!(pids.iter().all(|&p| !alive(p)), "still running: {pids:?}");
    assert!(!dir.exists());
}

#[test]
fn a_panicking_test_leaves_no_server() {
    let seen = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let cluster = PgCluster::start().unwrap();
        *seen.lock().unwrap() = Some(running(&cluster));
        panic!("the test fails while holding the cluster");
    });
    assert!(result.is_err());
    let (pids, dir) = seen.lock().unwrap().take().unwrap();
    assert!(pids.iter().all(|&p| !alive(p)), "still running: {pids:?}");
    assert!(!dir.exists());
}

#[test]
fn a_process_that_exits_without_dropping_its_cluster_leaves_no_server() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_start_then_exit_without_drop",
            "--ignored",
            "--nocapture",
        ])
        .env("KEYGATE_PGTEST_HELPER", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("cluster "))
        .unwrap_or_else(|| {
            panic!(
                "helper printed no cluster: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let mut fields = line.split(' ');
    let pids: Vec<u32> = fields
        .next()
        .unwrap()
        .split(',')
        .map(|p| p.parse().unwrap())
        .collect();
    let dir = PathBuf::from(fields.next().unwrap());
    // The watchdog sees the helper's end of its pipe close and stops the server.
    assert!(
        gone_within(&pids, &dir, Duration::from_secs(30)),
        "server {pids:?} or {} outlived its process",
        dir.display()
    );
}

#[test]
#[ignore = "helper: run in a child process by a_process_that_exits_without_dropping_its_cluster_leaves_no_server"]
fn helper_start_then_exit_without_drop() {
    if std::env::var_os("KEYGATE_PGTEST_HELPER").is_none() {
        return;
    }
    let cluster = PgCluster::start().unwrap();
    let (pids, dir) = running(&cluster);
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    println!("cluster {} {}", pids.join(","), dir.display());
    std::io::stdout().flush().unwrap();
    std::process::exit(0);
}
