//! A real Redis server for tests: Debian's `redis-server` started in a temporary directory on a
//! free 127.0.0.1 port, with no persistence (`--save "" --appendonly no`), stopped and removed
//! when dropped.
//!
//! ```no_run
//! let mut redis = keygate_redistest::RedisServer::start()?;
//! let url = redis.url(); // redis://127.0.0.1:PORT
//! redis.stop()?; // an outage: nothing listens on the port
//! redis.start_again()?; // the same port, empty (no persistence)
//! # Ok::<(), String>(())
//! ```
//!
//! The binary comes from `KEYGATE_REDIS_SERVER`, else `/usr/bin/redis-server` (Debian's
//! `redis-server` package, which `make setup` installs), else `redis-server` on `PATH`.
//!
//! No server outlives its test process: `Drop` kills the server and removes the directory, also
//! on a panic's unwind; and a small watchdog (`sh`) holding a pipe from this process kills the
//! server and removes the directory when the process ends without dropping it (a `static`,
//! `std::process::exit`, `kill -9`). Each run of the server has its own watchdog.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const PORT_ATTEMPTS: usize = 5;
const LOG_TAIL_LINES: usize = 20;

/// A running (or stopped, between [`RedisServer::stop`] and [`RedisServer::start_again`])
/// `redis-server` on 127.0.0.1.
pub struct RedisServer {
    bin: PathBuf,
    port: u16,
    server: Option<Child>,
    watchdog: Option<(Child, ChildStdin)>,
    runs: u32,
    // Declared last so it is removed after the server has stopped.
    dir: Option<tempfile::TempDir>,
}

impl RedisServer {
    /// Starts a server on a free port; returns once it answers `PING` (at most 20 s, else an
    /// error with the server log's tail).
    pub fn start() -> Result<RedisServer, String> {
        let bin = find_server()?;
        let dir = tempfile::Builder::new()
            .prefix("keygate-redis-")
            .tempdir()
            .map_err(|e| format!("redistest: cannot make a temporary directory: {e}"))?;
        let mut server = RedisServer {
            bin,
            port: 0,
            server: None,
            watchdog: None,
            runs: 0,
            dir: Some(dir),
        };
        // Another process may take the free port between the probe and the bind: try again.
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port()?;
            match server.run()? {
                Started::Ready => return Ok(server),
                Started::PortTaken(tail) => last = tail,
            }
        }
        Err(format!(
            "redistest: no free port after {PORT_ATTEMPTS} attempts; the last log ends:\n{last}"
        ))
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The TCP port on 127.0.0.1 (the same across [`RedisServer::stop`] and
    /// [`RedisServer::start_again`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's directory (`redis.log`).
    pub fn dir(&self) -> &Path {
        match &self.dir {
            Some(dir) => dir.path(),
            None => Path::new(""),
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(Child::id)
    }

    /// Whether the server process runs.
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Kills the server (SIGKILL: an outage, not a shutdown) and waits for it to exit. The port
    /// is free afterwards; the directory stays for [`RedisServer::start_again`]. Stopping a
    /// stopped server does nothing.
    pub fn stop(&mut self) -> Result<(), String> {
        if let Some(mut server) = self.server.take() {
            let killed = server.kill();
            let waited = server.wait();
            if let Some((mut watchdog, stdin)) = self.watchdog.take() {
                // The server is gone: this run's watchdog has nothing left to do.
                let _ = watchdog.kill();
                drop(stdin);
                let _ = watchdog.wait();
            }
            killed.map_err(|e| format!("redistest: cannot kill redis-server: {e}"))?;
            waited.map_err(|e| format!("redistest: redis-server: {e}"))?;
        }
        Ok(())
    }

    /// Starts the server again on the same port, empty. Fails if the port was taken meanwhile.
    pub fn start_again(&mut self) -> Result<(), String> {
        if self.server.is_some() {
            return Err("redistest: the server is already running".to_string());
        }
        match self.run()? {
            Started::Ready => Ok(()),
            Started::PortTaken(tail) => Err(format!(
                "redistest: port {} was taken while the server was stopped; the log ends:\n{tail}",
                self.port
            )),
        }
    }

    /// Sends `PING` over a new connection: `Ok` when the answer is `+PONG`.
    pub fn ping(&self) -> Result<(), String> {
        let addr = (Ipv4Addr::LOCALHOST, self.port);
        let mut stream = TcpStream::connect(addr)
            .map_err(|e| format!("redistest: connect to 127.0.0.1:{}: {e}", self.port))?;
        let timeout = Some(Duration::from_secs(2));
        stream
            .set_read_timeout(timeout)
            .and_then(|()| stream.set_write_timeout(timeout))
            .and_then(|()| stream.write_all(b"PING\r\n"))
            .map_err(|e| format!("redistest: PING: {e}"))?;
        let mut reply = [0u8; 7];
        stream
            .read_exact(&mut reply)
            .map_err(|e| format!("redistest: PING: {e}"))?;
        if &reply == b"+PONG\r\n" {
            Ok(())
        } else {
            Err(format!(
                "redistest: PING answered {:?}",
                String::from_utf8_lossy(&reply)
            ))
        }
    }

    /// Runs the server on `self.port` with this run's watchdog; returns once it answers `PING`.
    fn run(&mut self) -> Result<Started, String> {
        self.runs += 1;
        let log_path = self.dir().join(format!("redis-{}.log", self.runs));
        let child = Command::new(&self.bin)
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir())
            .arg("--logfile")
            .arg(&log_path)
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redistest: cannot run {}: {e}", self.bin.display()))?;
        let pid = child.id();
        self.server = Some(child);
        self.watchdog = Some(self.spawn_watchdog(pid)?);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = match self.server.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            if let Some(status) = exited {
                self.stop()?;
                let tail = log_tail(&log_path);
                if tail.contains("Address already in use") {
                    return Ok(Started::PortTaken(tail));
                }
                return Err(format!(
                    "redistest: redis-server exited ({status}) before answering PING; {} ends:\n{tail}",
                    log_path.display()
                ));
            }
            if self.ping().is_ok() {
                return Ok(Started::Ready);
            }
            if Instant::now() > deadline {
                let tail = log_tail(&log_path);
                self.stop()?;
                return Err(format!(
                    "redistest: redis-server on 127.0.0.1:{} did not answer PING within {} s; {} ends:\n{tail}",
                    self.port,
                    READY_TIMEOUT.as_secs(),
                    log_path.display(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn_watchdog(&self, pid: u32) -> Result<(Child, ChildStdin), String> {
        // Waits for end of file on its stdin, which comes when this process closes the pipe:
        // when it exits however it exits. Ignores the terminal's signals so a Ctrl-C that kills
        // the test process still leaves it to clean up.
        const SCRIPT: &str =
            "trap '' INT TERM HUP; read -r _ || :; kill -9 \"$0\" 2>/dev/null || :; rm -rf \"$1\"";
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg(pid.to_string())
            .arg(self.dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redistest: cannot start the watchdog (sh): {e}"))?;
        match child.stdin.take() {
            Some(stdin) => Ok((child, stdin)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err("redistest: the watchdog has no stdin".to_string())
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
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

/// `KEYGATE_REDIS_SERVER`, else `/usr/bin/redis-server`, else `redis-server` on `PATH`.
fn find_server() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("KEYGATE_REDIS_SERVER") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "redistest: KEYGATE_REDIS_SERVER={} is not a file",
                path.display()
            ))
        };
    }
    let debian = PathBuf::from("/usr/bin/redis-server");
    if debian.is_file() {
        return Ok(debian);
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("redis-server"))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            "redistest: no redis-server (not /usr/bin/redis-server, not on PATH): run `make setup` \
             (installs Debian's redis-server package) or set KEYGATE_REDIS_SERVER to the binary"
                .to_string()
        })
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("redistest: cannot find a free port on 127.0.0.1: {e}"))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}
