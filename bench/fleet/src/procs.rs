//! The processes under measurement: control-plane replicas started as children, and what
//! `/proc` says about them (resident memory, CPU time).

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Log lines of a replica kept for an error message.
const LOG_TAIL: usize = 20;

/// A `keygate-control serve` child on a free 127.0.0.1 port; killed when dropped.
pub struct Replica {
    pub name: String,
    pub base: String,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Replica {
    /// Starts `serve --listen 127.0.0.1:0` with `args` (the database and the limits) and waits
    /// for its "listening" log line. The database URL goes in `env` (as `KEYGATE_DATABASE`), off
    /// the command line.
    pub fn start(
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> Result<Replica, String> {
        let mut command = Command::new(bin);
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("KEYGATE_CATALOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| format!("{name}: no stderr pipe"))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        let sink = tail.clone();
        // Drains the log (one JSON line per request at the default level) so the replica never
        // blocks on a full pipe; keeps the last lines for errors.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "listening" {
                        let _ = addr_tx.send(v["addr"].as_str().unwrap_or_default().to_owned());
                    }
                }
                if let Ok(mut t) = sink.lock() {
                    if t.len() == LOG_TAIL {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            }
        });
        let mut replica = Replica {
            name: name.to_owned(),
            base: String::new(),
            child,
            tail,
        };
        match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) if !addr.is_empty() => {
                replica.base = format!("http://{addr}");
                Ok(replica)
            }
            _ => Err(format!(
                "{name}: no \"listening\" line within 30 s; log tail:\n{}",
                replica.log_tail()
            )),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_tail(&self) -> String {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// Resident memory in KiB (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> Result<u64, String> {
        self.status("VmRSS")
    }

    /// Threads of the process (the runtime's workers and its blocking pool).
    pub fn threads(&self) -> Result<u64, String> {
        self.status("Threads")
    }

    /// A numeric field of `/proc/<pid>/status` (`VmRSS: 1234 kB` gives 1234).
    fn status(&self, field: &str) -> Result<u64, String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .map_err(|e| format!("{}: /proc status: {e}", self.name))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| format!("{}: no {field} in /proc status", self.name))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One process as `/proc/<pid>/stat` shows it.
#[derive(Debug, Clone)]
struct Proc {
    comm: String,
    ppid: u32,
    nice: i32,
    /// utime + stime, in clock ticks.
    ticks: u64,
}

fn proc_of(pid: u32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let f: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // f[0] is field 3 (state): ppid is field 4, utime 14, stime 15, nice 19.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(Proc {
        comm: stat.get(open + 1..close)?.to_owned(),
        ppid: f.get(1)?.parse().ok()?,
        nice: f.get(16)?.parse().ok()?,
        ticks: utime + stime,
    })
}

fn all_procs() -> HashMap<u32, Proc> {
    let mut out = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(p) = proc_of(pid) {
                out.insert(pid, p);
            }
        }
    }
    out
}

/// Machine-wide ticks from the first line of `/proc/stat`: (busy at normal priority, niced,
/// total).
fn machine_ticks() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let total: u64 = (0..8).map(get).sum();
    let idle = get(3) + get(4);
    let nice = get(1);
    (total.saturating_sub(idle + nice), nice, total)
}

/// A snapshot of CPU time: every process, and the machine.
#[derive(Debug, Clone)]
pub struct Cpu {
    replicas: Vec<u32>,
    postgres: Option<u32>,
    procs: HashMap<u32, Proc>,
    busy: u64,
    nice: u64,
    total: u64,
}

impl Cpu {
    /// `replicas`: the control-plane processes; `postgres`: the postmaster (its children, the
    /// backends, count with it).
    pub fn now(replicas: &[u32], postgres: Option<u32>) -> Cpu {
        let (busy, nice, total) = machine_ticks();
        Cpu {
            replicas: replicas.to_vec(),
            postgres,
            procs: all_procs(),
            busy,
            nice,
            total,
        }
    }

    /// Shares of the machine (all cores = 100 %) between `self` and `later`.
    pub fn shares(&self, later: &Cpu) -> CpuShares {
        let all = later.total.saturating_sub(self.total).max(1) as f64;
        let pct = |ticks: u64| 100.0 * ticks as f64 / all;
        let me = std::process::id();
        let mut s = CpuShares::default();
        let mut others: HashMap<String, u64> = HashMap::new();
        for (pid, p) in &later.procs {
            let before = self.procs.get(pid).map_or(0, |b| b.ticks);
            let used = p.ticks.saturating_sub(before);
            if self.replicas.contains(pid) {
                s.replicas += pct(used);
            } else if Some(*pid) == self.postgres || Some(p.ppid) == self.postgres {
                s.postgres += pct(used);
            } else if *pid == me {
                s.generator += pct(used);
            } else if p.nice <= 0 && used > 0 {
                *others.entry(p.comm.clone()).or_default() += used;
            }
        }
        let busy = pct(later.busy.saturating_sub(self.busy));
        s.niced = pct(later.nice.saturating_sub(self.nice));
        // Busy at normal priority but none of the above: other processes, and kernel time not
        // charged to one (interrupts, the file system's journal).
        s.other = (busy - s.replicas - s.postgres - s.generator).max(0.0);
        s.idle = (100.0 - busy - s.niced).max(0.0);
        let mut top: Vec<(String, u64)> = others.into_iter().collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        s.top_other = top
            .iter()
            .filter(|(_, t)| pct(*t) >= 1.0)
            .take(3)
            .map(|(c, t)| format!("{c} {:.0}", pct(*t)))
            .collect::<Vec<_>>()
            .join(", ");
        s
    }
}

/// Percentages of the machine's CPU (2 cores = 100 %).
#[derive(Debug, Clone, Default)]
pub struct CpuShares {
    pub replicas: f64,
    pub postgres: f64,
    pub generator: f64,
    pub other: f64,
    /// The largest other processes at normal priority (`rustc 12, jbd2 2`).
    pub top_other: String,
    pub niced: f64,
    pub idle: f64,
}

/// Raises this process's open-file limit to its hard limit (the 1,000 long-polls need a socket
/// each); children inherit it. Returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            let _ = libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

/// `uptime`'s load averages and the processes running at nice > 0 (the fuzzers).
pub fn machine_load() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let avg: Vec<&str> = load.split_whitespace().take(3).collect();
    let mut niced: Vec<String> = all_procs()
        .values()
        .filter(|p| p.nice > 0)
        .map(|p| format!("{} (nice {})", p.comm, p.nice))
        .collect();
    niced.sort();
    niced.dedup();
    format!(
        "load average {} (1/5/15 min); processes at nice > 0: {}",
        avg.join(" "),
        if niced.is_empty() {
            "none".to_owned()
        } else {
            niced.join(", ")
        }
    )
}
