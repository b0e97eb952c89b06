//! A real PostgreSQL server for tests: started in a temporary directory on a free 127.0.0.1 port,
//! one fresh database per test, stopped and removed when dropped.
//!
//! ```no_run
//! let cluster = keygate_pgtest::PgCluster::start()?;
//! let url = cluster.create_database("feed_walk")?; // postgres://keygate:…@127.0.0.1:PORT/feed_walk
//! # Ok::<(), String>(())
//! ```
//!
//! The binaries come from `KEYGATE_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin` (Debian's
//! `postgresql` package, which `make setup-fleet` installs), else `initdb` on `PATH`.
//!
//! `initdb` and `postgres` refuse to run as root, so when this process is root every server binary
//! (`initdb`, `postgres`, `pg_ctl`, `pg_isready`, `psql`) runs as the `postgres` system user
//! (`setuid`/`setgid` in the child, supplementary groups dropped) in a directory chowned to it;
//! otherwise they run as the current user.
//!
//! Roles: the bootstrap superuser `postgres` is reached only over the Unix socket in the cluster's
//! private directory (trust); `keygate` is an ordinary login role with a random password
//! (SCRAM-SHA-256 over TCP) that owns every database created here, so tests connect as the
//! control plane would in production, not as a superuser.
//!
//! No server outlives its test process: `Drop` stops the server (immediate shutdown) and removes
//! the directory, also on a panic's unwind; and a small watchdog (`sh`) holding a pipe from this
//! process does the same when the process ends without dropping the cluster (a `static` shared
//! cluster, `std::process::exit`, `kill -9`).

use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The database `start` creates, owned by [`ROLE`].
pub const DATABASE: &str = "keygate";
/// The login role of every URL this crate gives out; it owns the databases it creates.
pub const ROLE: &str = "keygate";
/// The system user the server runs as when this process is root.
pub const SERVER_USER: &str = "postgres";

const SUPERUSER: &str = "postgres";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const PORT_ATTEMPTS: usize = 5;
const LOG_TAIL_LINES: usize = 20;

/// How to start a cluster. `PgOptions::default()` is a server with Postgres's durable defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// `fsync`, `synchronous_commit` and `full_page_writes` off: faster commits, and a crash of
    /// the server (not of a client) may lose the last transactions. For throwaway test data only.
    pub fast_unsafe: bool,
    /// `max_connections` (default 200: several control-plane pools per test binary).
    pub max_connections: u32,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            fast_unsafe: false,
            max_connections: 200,
        }
    }
}

/// A running PostgreSQL server in a temporary directory on 127.0.0.1.
pub struct PgCluster {
    bin: PathBuf,
    run_as: Option<RunAs>,
    port: u16,
    password: String,
    postmaster: Option<Child>,
    watchdog: Option<(Child, ChildStdin)>,
    next_database: AtomicU32,
    // Declared last so it is removed after the server has stopped.
    dir: Option<tempfile::TempDir>,
}

impl PgCluster {
    /// Starts a server with [`PgOptions::default()`] and creates the database [`DATABASE`].
    pub fn start() -> Result<PgCluster, String> {
        PgCluster::start_with(&PgOptions::default())
    }

    /// Starts a server and creates the role [`ROLE`] and the database [`DATABASE`]; returns once
    /// the server accepts connections (at most 30 s, else an error with the server log's tail).
    pub fn start_with(options: &PgOptions) -> Result<PgCluster, String> {
        let bin = find_bindir()?;
        let run_as = RunAs::for_this_process()?;
        let dir = tempfile::Builder::new()
            .prefix("keygate-pg-")
            .tempdir()
            .map_err(|e| format!("pgtest: cannot make a temporary directory: {e}"))?;
        if let Some(user) = &run_as {
            std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid)).map_err(|e| {
                format!(
                    "pgtest: cannot chown {} to {SERVER_USER}: {e}",
                    dir.path().display()
                )
            })?;
        }
        let mut cluster = PgCluster {
            bin,
            run_as,
            port: 0,
            password: random_hex(24)?,
            postmaster: None,
            watchdog: None,
            next_database: AtomicU32::new(0),
            dir: Some(dir),
        };
        // From here on, an error drops `cluster`, which stops whatever was started.
        cluster.watchdog = Some(cluster.spawn_watchdog()?);
        cluster.initdb()?;
        cluster.start_postmaster(options)?;
        cluster.psql(
            "postgres",
            &format!(
                "CREATE ROLE {ROLE} LOGIN PASSWORD '{}';\nCREATE DATABASE {DATABASE} OWNER {ROLE};\n",
                cluster.password
            ),
        )?;
        Ok(cluster)
    }

    /// One server per test process, started on first use with `fast_unsafe` and never dropped
    /// (the watchdog stops it when the process ends). Give each test its own database with
    /// [`PgCluster::fresh_database`].
    pub fn shared() -> Result<&'static PgCluster, String> {
        static SHARED: OnceLock<Result<PgCluster, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                PgCluster::start_with(&PgOptions {
                    fast_unsafe: true,
                    ..PgOptions::default()
                })
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// `postgres://keygate:PASSWORD@127.0.0.1:PORT/keygate`.
    pub fn url(&self) -> String {
        self.url_for(DATABASE)
    }

    /// The URL of `database` on this server, as [`ROLE`].
    pub fn url_for(&self, database: &str) -> String {
        format!(
            "postgres://{ROLE}:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The password of [`ROLE`] (hex, so it needs no escaping in a URL).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The cluster's directory: `data/`, `postgres.log`, the Unix socket.
    pub fn dir(&self) -> &Path {
        match &self.dir {
            Some(dir) => dir.path(),
            None => Path::new(""),
        }
    }

    /// The directory of the server's binaries (`psql` included).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(Child::id)
    }

    /// Creates `name` (lowercase letters, digits and `_`, not starting with a digit, at most 63
    /// bytes) owned by [`ROLE`] and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, String> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(format!(
                "pgtest: database name {name:?}: use 1 to 63 of a-z, 0-9 and _, not starting with a digit"
            ));
        }
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {name} OWNER {ROLE};\n"),
        )?;
        Ok(self.url_for(name))
    }

    /// Creates a database with a name no other call on this cluster returns (`test_1`, `test_2`,
    /// ...) and returns its URL.
    pub fn fresh_database(&self) -> Result<String, String> {
        let n = self.next_database.fetch_add(1, Ordering::Relaxed) + 1;
        self.create_database(&format!("test_{n}"))
    }

    /// Runs `sql` with `psql` as the superuser over the Unix socket, in `database`; stops at the
    /// first error. Returns the output, unaligned and without headers (`-A -t`).
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let mut command = self.command("psql");
        command
            .arg("-X")
            .arg("-q")
            .arg("-A")
            .arg("-t")
            .args(["-v", "ON_ERROR_STOP=1"])
            .arg("-d")
            .arg(format!(
                "host={} port={} user={SUPERUSER} dbname={database} connect_timeout=10",
                self.dir().display(),
                self.port
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| {
            format!(
                "pgtest: cannot run {}: {e}",
                self.bin.join("psql").display()
            )
        })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(sql.as_bytes())
                .map_err(|e| format!("pgtest: cannot send SQL to psql: {e}"))?;
        }
        let output = child
            .wait_with_output()
            .map_err(|e| format!("pgtest: psql: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "pgtest: psql in {database} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    /// Stops the server (immediate shutdown) and removes its directory.
    pub fn stop(mut self) -> Result<(), String> {
        self.shutdown()?;
        match self.dir.take() {
            Some(dir) => {
                let path = dir.path().display().to_string();
                dir.close()
                    .map_err(|e| format!("pgtest: cannot remove {path}: {e}"))
            }
            None => Ok(()),
        }
    }

    fn shutdown(&mut self) -> Result<(), String> {
        let mut result = Ok(());
        if let Some(mut postmaster) = self.postmaster.take() {
            let stopped = self
                .command("pg_ctl")
                .args(["stop", "-m", "immediate", "-w", "-t", "30", "-D"])
                .arg(self.data_dir())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output();
            if !matches!(&stopped, Ok(out) if out.status.success()) {
                // pg_ctl could not stop it: SIGKILL; its backends exit when they see it gone.
                result = Err(format!(
                    "pgtest: pg_ctl stop failed ({}); killed the postmaster",
                    describe(&stopped)
                ));
                let _ = postmaster.kill();
            }
            let _ = postmaster.wait();
        }
        if let Some((mut watchdog, stdin)) = self.watchdog.take() {
            // The server is stopped: the watchdog has nothing left to do.
            let _ = watchdog.kill();
            drop(stdin);
            let _ = watchdog.wait();
        }
        result
    }

    fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// A command for one of the server's binaries, as the server user, in the cluster's
    /// directory, with no inherited `PG*` variable and C messages.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.current_dir(self.dir()).env("LC_ALL", "C");
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PG") {
                command.env_remove(name);
            }
        }
        if let Some(user) = &self.run_as {
            command.uid(user.uid).gid(user.gid).env("HOME", self.dir());
        }
        command
    }

    fn spawn_watchdog(&self) -> Result<(Child, ChildStdin), String> {
        // Waits for end of file on its stdin, which comes when this process closes the pipe:
        // on drop, or when it exits however it exits. Ignores the terminal's signals so a
        // Ctrl-C that kills the test process still leaves it to clean up.
        const SCRIPT: &str = "trap '' INT TERM HUP; read -r _ || :; \
            \"$0\" stop -D \"$1\" -m immediate -w -t 30 >/dev/null 2>&1 || :; rm -rf \"$2\"";
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(SCRIPT)
            .arg(self.bin.join("pg_ctl"))
            .arg(self.data_dir())
            .arg(self.dir())
            .current_dir(self.dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(user) = &self.run_as {
            command.uid(user.uid).gid(user.gid);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("pgtest: cannot start the watchdog (sh): {e}"))?;
        match child.stdin.take() {
            Some(stdin) => Ok((child, stdin)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err("pgtest: the watchdog has no stdin".to_string())
            }
        }
    }

    fn initdb(&self) -> Result<(), String> {
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", SUPERUSER])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .args(["--encoding=UTF8", "--locale=C"])
            // Only initdb's final flush: the directory is thrown away after the test.
            .arg("--no-sync")
            .output();
        match &output {
            Ok(out) if out.status.success() => Ok(()),
            _ => Err(format!(
                "pgtest: initdb in {} failed ({}){}",
                self.data_dir().display(),
                describe(&output),
                if self.run_as.is_some() {
                    format!(
                        "; it runs as {SERVER_USER}, who must be able to reach {}",
                        self.dir().display()
                    )
                } else {
                    String::new()
                }
            )),
        }
    }

    fn start_postmaster(&mut self, options: &PgOptions) -> Result<(), String> {
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            self.port = free_port()?;
            match self.try_postmaster(options)? {
                Started::Ready => return Ok(()),
                // Another process took the port between our probe and the server's bind.
                Started::PortTaken(error) => last_error = error,
            }
        }
        Err(format!(
            "pgtest: no free port after {PORT_ATTEMPTS} attempts: {last_error}"
        ))
    }

    fn try_postmaster(&mut self, options: &PgOptions) -> Result<Started, String> {
        let log_path = self.dir().join("postgres.log");
        let log = File::create(&log_path)
            .map_err(|e| format!("pgtest: cannot create {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("pgtest: {}: {e}", log_path.display()))?;
        let mut settings = vec![
            "listen_addresses=127.0.0.1".to_string(),
            format!("port={}", self.port),
            format!("unix_socket_directories={}", self.dir().display()),
            format!("max_connections={}", options.max_connections),
        ];
        if options.fast_unsafe {
            settings.extend(
                [
                    "fsync=off",
                    "synchronous_commit=off",
                    "full_page_writes=off",
                ]
                .map(String::from),
            );
        }
        let mut command = self.command("postgres");
        command.arg("-D").arg(self.data_dir());
        for setting in &settings {
            command.arg("-c").arg(setting);
        }
        let postmaster = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| {
                format!(
                    "pgtest: cannot run {}: {e}",
                    self.bin.join("postgres").display()
                )
            })?;
        self.postmaster = Some(postmaster);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = match self.postmaster.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            if let Some(status) = exited {
                self.postmaster = None;
                let tail = log_tail(&log_path);
                if tail.contains("could not bind") || tail.contains("already in use") {
                    return Ok(Started::PortTaken(tail));
                }
                return Err(format!(
                    "pgtest: postgres exited ({status}) before accepting connections; {} ends:\n{tail}",
                    log_path.display()
                ));
            }
            let ready = self
                .command("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-t", "1", "-p"])
                .arg(self.port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("pgtest: cannot run pg_isready: {e}"))?;
            if ready.success() {
                return Ok(Started::Ready);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "pgtest: postgres on 127.0.0.1:{} did not accept connections within {} s; {} ends:\n{}",
                    self.port,
                    READY_TIMEOUT.as_secs(),
                    log_path.display(),
                    log_tail(&log_path)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No password: the URL is printed by tests that fail.
        f.debug_struct("PgCluster")
            .field("port", &self.port)
            .field("dir", &self.dir())
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

enum Started {
    Ready,
    PortTaken(String),
}

/// The identity a root process gives the server's binaries.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

impl RunAs {
    fn for_this_process() -> Result<Option<RunAs>, String> {
        if id(&["-u"])? != 0 {
            return Ok(None);
        }
        let missing = |e: String| {
            format!(
                "pgtest: running as root, and initdb/postgres refuse root, but there is no `{SERVER_USER}` \
                 system user to run them as ({e}); `make setup-fleet` installs Debian's postgresql \
                 package, which creates it"
            )
        };
        let uid = id(&["-u", SERVER_USER]).map_err(missing)?;
        let gid = id(&["-g", SERVER_USER]).map_err(missing)?;
        Ok(Some(RunAs { uid, gid }))
    }
}

fn id(args: &[&str]) -> Result<u32, String> {
    let output = Command::new("id").args(args).output();
    match &output {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|e| format!("`id {}` printed a non-number: {e}", args.join(" "))),
        _ => Err(format!(
            "`id {}` failed ({})",
            args.join(" "),
            describe(&output)
        )),
    }
}

/// `KEYGATE_PG_BIN`, else the newest `/usr/lib/postgresql/N/bin` holding `initdb`, else the
/// `PATH` directory holding `initdb`.
fn find_bindir() -> Result<PathBuf, String> {
    const NEEDED: [&str; 5] = ["initdb", "postgres", "pg_ctl", "pg_isready", "psql"];
    let complete = |dir: &Path| NEEDED.iter().all(|b| dir.join(b).is_file());
    if let Some(dir) = std::env::var_os("KEYGATE_PG_BIN") {
        let dir = PathBuf::from(dir);
        if complete(&dir) {
            return Ok(dir);
        }
        return Err(format!(
            "pgtest: KEYGATE_PG_BIN={} lacks one of {}",
            dir.display(),
            NEEDED.join(", ")
        ));
    }
    let newest_debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    if let Some((_, bin)) = newest_debian {
        return Ok(bin);
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| dir.join("initdb").is_file());
    match on_path {
        Some(dir) if complete(&dir) => Ok(dir),
        Some(dir) => Err(format!(
            "pgtest: {} has initdb but lacks one of {}",
            dir.display(),
            NEEDED.join(", ")
        )),
        None => Err(
            "pgtest: no PostgreSQL server binaries (no /usr/lib/postgresql/*/bin/initdb, no initdb \
             on PATH): run `make setup-fleet` (installs Debian's postgresql package) or set \
             KEYGATE_PG_BIN to a directory holding initdb, postgres, pg_ctl, pg_isready and psql"
                .to_string(),
        ),
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("pgtest: cannot find a free port on 127.0.0.1: {e}"))
}

fn random_hex(bytes: usize) -> Result<String, String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| format!("pgtest: no randomness for a password: {e}"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

fn describe(output: &std::io::Result<Output>) -> String {
    match output {
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr = stderr.trim();
            if stderr.is_empty() {
                out.status.to_string()
            } else {
                format!("{}: {stderr}", out.status)
            }
        }
        Err(e) => e.to_string(),
    }
}
