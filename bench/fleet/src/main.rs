//! `make bench-fleet`: the control plane as a fleet, measured with its release binary.
//!
//! 1. Key writes per second: `POST /v1/accounts/{sid}/keys` (admin token) from 16 and 64
//!    clients in flight, for `FLEET_SECONDS` after `FLEET_WARMUP`, `FLEET_RUNS` times: through
//!    two replicas on one Postgres with its durable defaults (the clients split across both), and
//!    through one process on SQLite (`synchronous=FULL`) for comparison. Each client fills an
//!    account to 900 keys (the cap is 1,000) and moves to the next.
//! 2. Revocation latency: `FLEET_POLLS` (1,000) long-polls `GET /v1/edge/changes?since=V&known=V&
//!    wait=60` (edge token), half on each replica, each on its own connection; once both
//!    replicas' `/metrics` count them all open, a key is deleted through replica A and each poll's
//!    200 is timed from the DELETE's answer. A warm-up round, then `FLEET_ROUNDS` rounds.
//! 3. Memory per open long-poll: each replica's VmRSS before and with the warm-up round's polls
//!    open (once the blocking threads their arrival started are gone), over the polls it holds.
//!
//! Writes bench/results/fleet-latest.md and prints it. The load generator runs on the same
//! machine as the replicas and Postgres; the report says how the CPU was shared.

mod load;
mod procs;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate_pgtest::{PgCluster, PgOptions};
use reqwest::{Client, StatusCode};

use load::{median, quantile, Accounts, WriteRun};
use procs::{Cpu, CpuShares, Replica};

/// Writes/s the issue asks for, and the revocation bound (ms to all edges).
const GOAL_WRITES: f64 = 2000.0;
const GOAL_REVOCATION_MS: f64 = 1000.0;
/// Rate assumed when preparing accounts for a run (more are made on the fly if needed).
const PLANNED_RATE: f64 = 6000.0;

struct Settings {
    control: PathBuf,
    seconds: Duration,
    warmup: Duration,
    runs: usize,
    concurrency: Vec<usize>,
    polls: usize,
    rounds: usize,
    /// Also measure writes on a Postgres without fsync, to show what durable commits cost.
    diagnose: bool,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v}: not a number")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_env(root: &Path) -> Result<Settings, String> {
        let control = std::env::var_os("FLEET_CONTROL")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/release/keygate-control"));
        let concurrency = std::env::var("FLEET_CONCURRENCY")
            .unwrap_or_else(|_| "16,64".to_owned())
            .split(',')
            .map(|c| {
                c.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|c| *c > 0)
                    .ok_or_else(|| format!("FLEET_CONCURRENCY: {c:?} is not a positive number"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Settings {
            control,
            seconds: Duration::from_secs_f64(env_num("FLEET_SECONDS", 5.0)?),
            warmup: Duration::from_secs_f64(env_num("FLEET_WARMUP", 2.0)?),
            runs: env_num("FLEET_RUNS", 3)?,
            concurrency,
            polls: env_num("FLEET_POLLS", 1000)?,
            rounds: env_num("FLEET_ROUNDS", 3)?,
            diagnose: env_num("FLEET_DIAGNOSE", 1)? != 0,
        })
    }
}

/// The credentials `keygate-control init` prints once.
struct Creds {
    admin: String,
    edge: String,
}

fn init(bin: &Path, args: &[&str], env: &[(&str, String)]) -> Result<Creds, String> {
    let mut command = Command::new(bin);
    command.arg("init").args(args).env_remove("KEYGATE_CATALOG");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command
        .output()
        .map_err(|e| format!("cannot run {} init: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "keygate-control init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let get = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
            .ok_or_else(|| format!("init printed no {name}"))
    };
    Ok(Creds {
        admin: get("KEYGATE_ADMIN_TOKEN")?,
        edge: get("KEYGATE_EDGE_TOKEN")?,
    })
}

/// The control plane under load: its replicas, their credentials, and Postgres if it runs on
/// it. Dropping it stops the replicas, then Postgres.
struct Fleet {
    name: String,
    replicas: Vec<Replica>,
    creds: Creds,
    postgres: Option<Arc<PgCluster>>,
    /// What Postgres says of itself (version, fsync, synchronous_commit).
    describe: String,
}

impl Fleet {
    /// `replicas` replicas on a new Postgres; `fast_unsafe` turns fsync and synchronous_commit
    /// off (only to show what the durable commits cost).
    fn postgres(
        s: &Settings,
        name: &str,
        replicas: usize,
        fast_unsafe: bool,
    ) -> Result<Fleet, String> {
        let cluster = PgCluster::start_with(&PgOptions {
            fast_unsafe,
            ..PgOptions::default()
        })?;
        let describe = cluster.psql(
            "postgres",
            "SELECT 'Postgres ' || current_setting('server_version') || ', fsync=' || current_setting('fsync') || ', synchronous_commit=' || current_setting('synchronous_commit') || ', full_page_writes=' || current_setting('full_page_writes');",
        )?;
        let env = [("KEYGATE_DATABASE", cluster.url())];
        let creds = init(&s.control, &[], &env)?;
        let names = ["A", "B", "C", "D"];
        let replicas = (0..replicas)
            .map(|i| Replica::start(names.get(i).copied().unwrap_or("N"), &s.control, &[], &env))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Fleet {
            name: name.to_owned(),
            replicas,
            creds,
            postgres: Some(Arc::new(cluster)),
            describe: describe.trim().to_owned(),
        })
    }

    /// One process on the SQLite file `file`.
    fn sqlite(s: &Settings, name: &str, file: &Path) -> Result<Fleet, String> {
        let file = file.display().to_string();
        let creds = init(&s.control, &["--data", &file], &[])?;
        let replica = Replica::start("S", &s.control, &["--data".to_owned(), file], &[])?;
        Ok(Fleet {
            name: name.to_owned(),
            replicas: vec![replica],
            creds,
            postgres: None,
            describe: "SQLite (WAL, synchronous=FULL)".to_owned(),
        })
    }

    fn bases(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.base.clone()).collect()
    }

    fn cpu(&self) -> Cpu {
        let pids: Vec<u32> = self.replicas.iter().map(Replica::pid).collect();
        Cpu::now(&pids, self.postgres.as_ref().and_then(|c| c.pid()))
    }

    /// An error with each replica's last log lines.
    fn failed(&self, e: String) -> String {
        let mut s = e;
        for r in &self.replicas {
            let _ = write!(s, "\n--- replica {} log tail:\n{}", r.name, r.log_tail());
        }
        s
    }
}

/// Sum and count of the database transactions of `kind` over the replicas' `/metrics`.
async fn db_seconds(client: &Client, fleet: &Fleet, kind: &str) -> Result<(f64, f64), String> {
    let label = format!("kind=\"{kind}\"");
    let (mut sum, mut count) = (0.0, 0.0);
    for b in fleet.bases() {
        let m = load::metrics(client, &b, &fleet.creds.admin).await?;
        sum += load::metric(&m, "keygate_control_db_transaction_seconds_sum", &label);
        count += load::metric(&m, "keygate_control_db_transaction_seconds_count", &label);
    }
    Ok((sum, count))
}

/// What the replicas' Postgres connections are doing, sampled every 20 ms for `seconds`:
/// (state / wait event, samples), most frequent first. Only connections in a transaction count
/// (`active`, or `idle in transaction`: waiting for the replica's next statement).
fn pg_waits(cluster: &PgCluster, seconds: f64) -> Result<Vec<(String, u64)>, String> {
    let n = ((seconds / 0.02) as u64).max(1);
    let sql = format!(
        r#"CREATE TEMP TABLE w (ev TEXT);
DO $$ BEGIN
  FOR i IN 1..{n} LOOP
    PERFORM pg_stat_clear_snapshot();
    INSERT INTO w SELECT state || ' / ' || coalesce(wait_event_type || ':' || wait_event, 'on CPU')
      FROM pg_stat_activity
      WHERE application_name = 'keygate-control' AND state IN ('active', 'idle in transaction');
    PERFORM pg_sleep(0.02);
  END LOOP;
END $$;
SELECT ev, count(*) FROM w GROUP BY ev ORDER BY count(*) DESC, ev;"#
    );
    let out = cluster.psql(keygate_pgtest::DATABASE, &sql)?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let (ev, n) = l.rsplit_once('|')?;
            Some((ev.to_owned(), n.trim().parse().ok()?))
        })
        .collect())
}

/// One timed write run with what the CPU and the database did meanwhile.
struct MeasuredRun {
    run: WriteRun,
    cpu: CpuShares,
    /// Mean write transaction in ms (waiting for a connection included).
    txn_ms: f64,
    /// Postgres connections' states and wait events (samples).
    waits: Vec<(String, u64)>,
}

async fn measured_write_run(
    client: &Client,
    fleet: &Fleet,
    concurrency: usize,
    s: &Settings,
) -> Result<MeasuredRun, String> {
    let bases = fleet.bases();
    let admin = &fleet.creds.admin;
    let span = (s.warmup + s.seconds).as_secs_f64();
    let prepared = load::create_accounts(
        client,
        &bases[0],
        admin,
        Accounts::needed(concurrency, PLANNED_RATE, span),
    )
    .await?;
    let accounts = Arc::new(Accounts::new(prepared));
    let writers = load::write_run(
        client,
        &bases,
        admin,
        accounts,
        concurrency,
        s.warmup,
        s.seconds,
    );
    // CPU, transactions and wait events over the measured window only.
    let sampler = async {
        tokio::time::sleep(s.warmup).await;
        let c0 = fleet.cpu();
        let t0 = db_seconds(client, fleet, "write").await?;
        let waits = match &fleet.postgres {
            Some(cluster) => {
                let (cluster, secs) = (cluster.clone(), s.seconds.as_secs_f64() * 0.9);
                Some(tokio::task::spawn_blocking(move || {
                    pg_waits(&cluster, secs)
                }))
            }
            None => None,
        };
        tokio::time::sleep(s.seconds).await;
        let c1 = fleet.cpu();
        let t1 = db_seconds(client, fleet, "write").await?;
        let waits = match waits {
            Some(w) => w.await.map_err(|e| format!("wait sampler: {e}"))??,
            None => Vec::new(),
        };
        let n = t1.1 - t0.1;
        let txn_ms = if n > 0.0 {
            (t1.0 - t0.0) / n * 1e3
        } else {
            f64::NAN
        };
        Ok::<_, String>((c0.shares(&c1), txn_ms, waits))
    };
    let (run, sampled) = tokio::join!(writers, sampler);
    let (cpu, txn_ms, waits) = sampled?;
    Ok(MeasuredRun {
        run: run?,
        cpu,
        txn_ms,
        waits,
    })
}

/// Write results per concurrency for one backend.
struct WriteResult {
    backend: String,
    concurrency: usize,
    runs: Vec<MeasuredRun>,
}

async fn write_bench(
    client: &Client,
    fleet: &Fleet,
    s: &Settings,
) -> Result<Vec<WriteResult>, String> {
    let mut results: Vec<WriteResult> = s
        .concurrency
        .iter()
        .map(|c| WriteResult {
            backend: fleet.name.clone(),
            concurrency: *c,
            runs: Vec::new(),
        })
        .collect();
    for run in 0..s.runs {
        for r in &mut results {
            let m = measured_write_run(client, fleet, r.concurrency, s)
                .await
                .map_err(|e| fleet.failed(e))?;
            eprintln!(
                "bench-fleet: {}, {} in flight, run {}: {:.0} writes/s, p50 {:.1} ms, p99 {:.1} ms, other answers {:?}",
                fleet.name,
                r.concurrency,
                run + 1,
                m.run.rate(),
                pct(&m.run.latencies_ms, 0.5),
                pct(&m.run.latencies_ms, 0.99),
                m.run.other
            );
            r.runs.push(m);
        }
    }
    Ok(results)
}

fn pct(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    quantile(&v, q)
}

/// One round of long-polls answered by a deletion.
struct Round {
    open_s: f64,
    delete_ms: f64,
    latencies_ms: Vec<f64>,
    wrong: usize,
    version: u64,
    cpu: CpuShares,
    reads: f64,
    read_ms: f64,
}

/// Memory of one replica before and with its long-polls open.
struct Memory {
    name: String,
    polls: usize,
    /// (VmRSS KiB, threads): before the polls, just after all were open, after SETTLE with
    /// them open, after their answers.
    before: (u64, u64),
    opened: (u64, u64),
    settled: (u64, u64),
    answered: (u64, u64),
}

/// How long the polls stay open before memory is measured again: longer than the idle time
/// (10 s) after which tokio's blocking pool lets the threads go that the burst of arrivals
/// started (each poll's first read runs on it).
const SETTLE: Duration = Duration::from_secs(11);

fn rss_threads(r: &Replica) -> Result<(u64, u64), String> {
    Ok((r.rss_kib()?, r.threads()?))
}

async fn revocation_round(
    poll_client: &Client,
    client: &Client,
    fleet: &Fleet,
    polls: usize,
    (account, key): (&str, &str),
    memory: Option<&mut Vec<Memory>>,
) -> Result<Round, String> {
    let bases = fleet.bases();
    let admin = &fleet.creds.admin;
    let known = load::version(client, &bases[0]).await?;
    let before: Vec<(u64, u64)> = fleet
        .replicas
        .iter()
        .map(rss_threads)
        .collect::<Result<_, _>>()?;
    let targets: Vec<(String, usize)> = (0..polls)
        .map(|i| (bases[i % bases.len()].clone(), i))
        .collect();
    let opened = Instant::now();
    let handles = load::open_polls(poll_client, &targets, &fleet.creds.edge, known);
    // Every poll is waiting when the replicas' open long-polls add up to all of them.
    let deadline = opened + Duration::from_secs(40);
    loop {
        let mut open = 0.0;
        for b in &bases {
            let m = load::metrics(client, b, admin).await?;
            open += load::metric(&m, "keygate_control_long_polls_open", "");
        }
        if open as usize == polls {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("only {open} of {polls} long-polls open after 40 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open_s = opened.elapsed().as_secs_f64();
    if let Some(memory) = memory {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (r, before) in fleet.replicas.iter().zip(before) {
            memory.push(Memory {
                name: r.name.clone(),
                polls: targets.iter().filter(|(b, _)| *b == r.base).count(),
                before,
                opened: rss_threads(r)?,
                settled: (0, 0),
                answered: (0, 0),
            });
        }
        tokio::time::sleep(SETTLE).await;
        for (m, r) in memory.iter_mut().zip(&fleet.replicas) {
            m.settled = rss_threads(r)?;
        }
    }
    let reads0 = db_seconds(client, fleet, "read").await?;
    let cpu0 = fleet.cpu();
    let (answered, delete) = load::delete_key(client, &bases[0], admin, account, key).await?;
    let mut latencies_ms = Vec::with_capacity(polls);
    let mut answers = Vec::with_capacity(polls);
    for h in handles {
        let a = h.await.map_err(|e| format!("poll task: {e}"))??;
        // Signed: a poll on replica A may be answered before the DELETE's own answer arrives.
        let ms = if a.at >= answered {
            a.at.duration_since(answered).as_secs_f64() * 1e3
        } else {
            -(answered.duration_since(a.at).as_secs_f64() * 1e3)
        };
        latencies_ms.push(ms);
        answers.push(a);
    }
    let cpu1 = fleet.cpu();
    let reads1 = db_seconds(client, fleet, "read").await?;
    let version = load::version(client, &bases[0]).await?;
    let wrong = answers
        .iter()
        .filter(|a| a.status != StatusCode::OK || a.version != Some(version))
        .count();
    latencies_ms.sort_by(f64::total_cmp);
    // Not counting the reads of the first /metrics calls (one per replica).
    let reads = reads1.1 - reads0.1 - bases.len() as f64;
    Ok(Round {
        open_s,
        delete_ms: delete.as_secs_f64() * 1e3,
        latencies_ms,
        wrong,
        version,
        cpu: cpu0.shares(&cpu1),
        reads,
        read_ms: if reads > 0.0 {
            (reads1.0 - reads0.0) / (reads1.1 - reads0.1) * 1e3
        } else {
            f64::NAN
        },
    })
}

struct Revocation {
    rounds: Vec<Round>,
    memory: Vec<Memory>,
}

async fn revocation_bench(
    client: &Client,
    fleet: &Fleet,
    s: &Settings,
) -> Result<Revocation, String> {
    let (a, admin) = (&fleet.replicas[0].base, &fleet.creds.admin);
    let account = load::create_account(client, a, admin).await?;
    let mut keys = Vec::new();
    for _ in 0..=s.rounds {
        keys.push(load::create_key(client, a, admin, &account).await?);
    }
    let poll_client = load::client(s.polls)?;
    let mut memory = Vec::new();
    let mut rounds = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let warmup = i == 0;
        let round = revocation_round(
            &poll_client,
            client,
            fleet,
            s.polls,
            (&account, key),
            if warmup { Some(&mut memory) } else { None },
        )
        .await?;
        eprintln!(
            "bench-fleet: revocation {}: {} polls open in {:.2} s; DELETE {:.1} ms; to all: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; wrong answers {}",
            if warmup { "warm-up".to_owned() } else { format!("round {i}") },
            s.polls,
            round.open_s,
            round.delete_ms,
            quantile(&round.latencies_ms, 0.5),
            quantile(&round.latencies_ms, 0.99),
            quantile(&round.latencies_ms, 1.0),
            round.wrong
        );
        if warmup {
            // Memory once the polls are answered (the connections stay open, idle).
            tokio::time::sleep(Duration::from_millis(300)).await;
            for (m, r) in memory.iter_mut().zip(&fleet.replicas) {
                m.answered = rss_threads(r)?;
            }
        } else {
            rounds.push(round);
        }
    }
    Ok(Revocation { rounds, memory })
}

fn fmt_other(runs: &[MeasuredRun]) -> String {
    let mut all = std::collections::BTreeMap::new();
    for r in runs {
        for (k, v) in &r.run.other {
            *all.entry(k.clone()).or_insert(0usize) += v;
        }
    }
    if all.is_empty() {
        "0".to_owned()
    } else {
        all.iter()
            .map(|(k, v)| format!("{v} × {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The run with the median rate (its figures are reported with it).
fn median_run(runs: &[MeasuredRun]) -> Option<&MeasuredRun> {
    let mut v: Vec<&MeasuredRun> = runs.iter().collect();
    v.sort_by(|a, b| a.run.rate().total_cmp(&b.run.rate()));
    v.get(v.len() / 2).copied()
}

struct Context {
    started: String,
    load_before: String,
    load_after: String,
    pg: String,
    /// fdatasync: mean, median, p90 (µs).
    fsync_us: (f64, f64, f64),
    fd_limit: u64,
    cpu_model: String,
    build: String,
}

/// "62 % active / Lock:transactionid, ..." over the samples of one run: the top `n`.
fn fmt_waits(waits: &[(String, u64)], n: usize) -> String {
    let total: u64 = waits.iter().map(|(_, c)| c).sum();
    if total == 0 {
        return "no connection in a transaction was sampled".to_owned();
    }
    waits
        .iter()
        .take(n)
        .map(|(ev, c)| format!("{:.0} % {ev}", 100.0 * *c as f64 / total as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

fn report(s: &Settings, ctx: &Context, writes: &[WriteResult], rev: &Revocation) -> String {
    let mut o = String::new();
    let secs = s.seconds.as_secs_f64();
    let _ = writeln!(o, "# keygate fleet benchmark (`make bench-fleet`)\n");
    let _ = writeln!(
        o,
        "{} · {} · {} cores, shared by the load generator, the replicas and Postgres · {} · control plane: {}",
        ctx.started,
        ctx.cpu_model,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        ctx.pg,
        ctx.build,
    );
    let _ = writeln!(o, "\nMachine load before: {}.  ", ctx.load_before);
    let _ = writeln!(o, "Machine load after: {}.  ", ctx.load_after);
    let _ = writeln!(
        o,
        "Background fuzzers run at nice 19 and other agents may be compiling: the fuzzers yield, but with the kernel's autogroup scheduling they still get a share (the CPU columns say how much went where).\n"
    );

    let _ = writeln!(
        o,
        "## Key writes (`POST /v1/accounts/{{sid}}/keys`, admin token)\n"
    );
    let _ = writeln!(
        o,
        "{} runs of {secs:.0} s after {:.0} s of warm-up per row; writes/s is the median run (all runs in brackets), latencies and CPU are that run's. Postgres: the clients alternate between replicas A and B. Write txn: the replicas' mean write transaction (`keygate_control_db_transaction_seconds`, waiting for a pooled connection included). CPU: share of the machine (all cores = 100 %).\n",
        s.runs,
        s.warmup.as_secs_f64()
    );
    let _ = writeln!(
        o,
        "| backend | in flight | writes/s (runs) | p50 ms | p99 ms | non-201 | write txn ms | CPU %: replicas / Postgres / load gen / other / niced / idle | largest other |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---|---|");
    for w in writes {
        let Some(m) = median_run(&w.runs) else {
            continue;
        };
        let rates: Vec<String> = w
            .runs
            .iter()
            .map(|r| format!("{:.0}", r.run.rate()))
            .collect();
        let _ = writeln!(
            o,
            "| {} | {} | **{:.0}** ({}) | {:.1} | {:.1} | {} | {:.2} | {:.0} / {:.0} / {:.0} / {:.0} / {:.0} / {:.0} | {} |",
            w.backend,
            w.concurrency,
            m.run.rate(),
            rates.join(", "),
            pct(&m.run.latencies_ms, 0.5),
            pct(&m.run.latencies_ms, 0.99),
            fmt_other(&w.runs),
            m.txn_ms,
            m.cpu.replicas,
            m.cpu.postgres,
            m.cpu.generator,
            m.cpu.other,
            m.cpu.niced,
            m.cpu.idle,
            if m.cpu.top_other.is_empty() { "-" } else { &m.cpu.top_other },
        );
    }
    let durable_pg = |w: &&WriteResult| w.backend == "Postgres, 2 replicas";
    let best_pg = writes
        .iter()
        .filter(durable_pg)
        .filter_map(|w| median_run(&w.runs).map(|m| m.run.rate()))
        .fold(f64::NAN, f64::max);
    let _ = writeln!(
        o,
        "\nGoal >= {GOAL_WRITES:.0} writes/s (Postgres, durable): **{}** (best median {best_pg:.0}/s).",
        if best_pg >= GOAL_WRITES {
            "met"
        } else {
            "missed"
        }
    );
    let _ = writeln!(
        o,
        "\nWhat the replicas' Postgres connections were doing (sampled every 20 ms in the median run; only connections inside a transaction; `idle in transaction` = waiting for the replica's next statement):\n"
    );
    for w in writes.iter().filter(|w| w.backend.starts_with("Postgres")) {
        if let Some(m) = median_run(&w.runs) {
            let _ = writeln!(
                o,
                "- {}, {} in flight: {}",
                w.backend,
                w.concurrency,
                fmt_waits(&m.waits, 6)
            );
        }
    }
    let _ = writeln!(
        o,
        "\nfdatasync probe (a preallocated file in the same file system, 8 KiB writes in order, back to back): mean {:.0} µs, median {:.0} µs, p90 {:.0} µs; this virtual disk answers either in about 0.2 ms or in about 4 ms.",
        ctx.fsync_us.0, ctx.fsync_us.1, ctx.fsync_us.2
    );

    let _ = writeln!(
        o,
        "\n## Revocation to {} long-polling edges (Postgres, two replicas)\n",
        s.polls
    );
    let _ = writeln!(
        o,
        "{} long-polls `GET /v1/edge/changes?since=V&known=V&wait=60&edge=sim-N&region=bench` (edge token, one HTTP/1.1 connection each, half on each replica); once both replicas' `keygate_control_long_polls_open` add up to {}, a key is deleted through replica A. Latency: from the DELETE's answer until each poll has its 200 with the new version. A warm-up round, then {} rounds. Read txns: the replicas' read transactions during the round (their mean ms, waiting for a pooled connection included).\n",
        s.polls, s.polls, s.rounds
    );
    let _ = writeln!(
        o,
        "| round | polls open after | DELETE took ms | p50 ms | p99 ms | max ms | not 200 at the new version | read txns (mean ms) | CPU %: replicas / Postgres / load gen / other / niced / idle |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for (i, r) in rev.rounds.iter().enumerate() {
        let _ = writeln!(
            o,
            "| {} (v{}) | {:.2} s | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.0} ({:.1}) | {:.0} / {:.0} / {:.0} / {:.0} / {:.0} / {:.0} |",
            i + 1,
            r.version,
            r.open_s,
            r.delete_ms,
            quantile(&r.latencies_ms, 0.5),
            quantile(&r.latencies_ms, 0.99),
            quantile(&r.latencies_ms, 1.0),
            r.wrong,
            r.reads,
            r.read_ms,
            r.cpu.replicas,
            r.cpu.postgres,
            r.cpu.generator,
            r.cpu.other,
            r.cpu.niced,
            r.cpu.idle
        );
    }
    let of = |q: f64| {
        median(
            &rev.rounds
                .iter()
                .map(|r| quantile(&r.latencies_ms, q))
                .collect::<Vec<_>>(),
        )
    };
    let (p50, p99, max) = (of(0.5), of(0.99), of(1.0));
    let _ = writeln!(
        o,
        "| **median of rounds** | | | **{p50:.1}** | **{p99:.1}** | **{max:.1}** | | | |"
    );
    let _ = writeln!(
        o,
        "\nGoal <= {GOAL_REVOCATION_MS:.0} ms to all {}: **{}** (median of the rounds' max: {max:.1} ms).",
        s.polls,
        if max <= GOAL_REVOCATION_MS {
            "met"
        } else {
            "missed"
        }
    );

    let _ = writeln!(o, "\n## Memory per open long-poll\n");
    let _ = writeln!(
        o,
        "VmRSS and threads of each replica in the warm-up round: before its polls were opened (the replicas had served only the set-up requests), just after all were waiting, {} s later with them still waiting (tokio's blocking pool has let go of the threads the burst of arrivals started: each poll's first read runs there), and after their answers (connections kept open, idle). Per poll: (RSS after {} s - RSS before) / polls held; in brackets, just after opening.\n",
        SETTLE.as_secs(),
        SETTLE.as_secs()
    );
    let _ = writeln!(
        o,
        "| replica | polls held | RSS KiB: before / just opened / after {} s / answered | threads: same | per poll KiB |",
        SETTLE.as_secs()
    );
    let _ = writeln!(o, "|---|---:|---|---|---:|");
    for m in &rev.memory {
        let per = |kib: u64| (kib as f64 - m.before.0 as f64) / m.polls.max(1) as f64;
        let _ = writeln!(
            o,
            "| {} | {} | {} / {} / {} / {} | {} / {} / {} / {} | **{:.1}** ({:.1}) |",
            m.name,
            m.polls,
            m.before.0,
            m.opened.0,
            m.settled.0,
            m.answered.0,
            m.before.1,
            m.opened.1,
            m.settled.1,
            m.answered.1,
            per(m.settled.0),
            per(m.opened.0)
        );
    }
    let _ = writeln!(
        o,
        "\nSettings: FLEET_SECONDS={secs:.0} FLEET_WARMUP={:.0} FLEET_RUNS={} FLEET_CONCURRENCY={} FLEET_POLLS={} FLEET_ROUNDS={} FLEET_DIAGNOSE={}; open-file limit {}; the control plane's default limits (the admin token is not rate-limited; each writer fills an account to 900 keys, then takes the next).",
        s.warmup.as_secs_f64(),
        s.runs,
        s.concurrency
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        s.polls,
        s.rounds,
        u8::from(s.diagnose),
        ctx.fd_limit,
    );
    o
}

/// The commit the control plane was built from, and whether its sources had changes on top.
fn build_of(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = git(&[
        "status",
        "--porcelain",
        "--",
        "crates/keygate-control",
        "crates/keygate-core",
    ]);
    if dirty.is_empty() {
        format!("release build of {head}")
    } else {
        format!("release build of {head} plus uncommitted changes")
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// fdatasync after an 8 KiB write, written in order into a preallocated file in the
/// temporary directory (where Postgres and the SQLite file live, the way a WAL segment is
/// written), for about a second: (mean, median, p90) in µs. What one durable commit costs on
/// this disk.
fn fdatasync_us() -> Result<(f64, f64, f64), String> {
    use std::io::{Seek, SeekFrom, Write};
    const BLOCK: usize = 8192;
    const BLOCKS: usize = 2048;
    let err = |e: std::io::Error| format!("fdatasync probe: {e}");
    let mut f = tempfile::tempfile().map_err(err)?;
    f.write_all(&vec![0u8; BLOCK * BLOCKS]).map_err(err)?;
    f.sync_all().map_err(err)?;
    let block = [0x5au8; BLOCK];
    let mut times = Vec::new();
    let start = Instant::now();
    for i in 0..BLOCKS {
        if start.elapsed() > Duration::from_secs(1) {
            break;
        }
        let t = Instant::now();
        f.seek(SeekFrom::Start((i * BLOCK) as u64)).map_err(err)?;
        f.write_all(&block).map_err(err)?;
        f.sync_data().map_err(err)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    times.sort_by(f64::total_cmp);
    Ok((mean, quantile(&times, 0.5), quantile(&times, 0.9)))
}

async fn bench(root: &Path, s: &Settings) -> Result<String, String> {
    if !s.control.is_file() {
        return Err(format!(
            "no control-plane binary at {} (cargo build --release -p keygate-control, or set FLEET_CONTROL)",
            s.control.display()
        ));
    }
    let fd_limit = procs::raise_fd_limit();
    if fd_limit < (s.polls as u64) * 2 + 256 {
        return Err(format!(
            "open-file limit {fd_limit} is too low for {} long-polls (raise the hard limit: ulimit -Hn)",
            s.polls
        ));
    }
    let started = utc_now();
    let load_before = procs::machine_load();
    eprintln!("bench-fleet: {load_before}");
    let fsync_us = fdatasync_us()?;
    eprintln!(
        "bench-fleet: fdatasync of 8 KiB: mean {:.0} us, median {:.0} us, p90 {:.0} us",
        fsync_us.0, fsync_us.1, fsync_us.2
    );
    let client = load::client(256)?;

    // Postgres with its durable defaults: two replicas. Revocation first, on fresh replicas
    // (their memory before the polls is the set-up's only), then writes.
    let fleet = Fleet::postgres(s, "Postgres, 2 replicas", 2, false)?;
    let pg = fleet.describe.clone();
    eprintln!("bench-fleet: {pg}");
    let rev = revocation_bench(&client, &fleet, s)
        .await
        .map_err(|e| fleet.failed(e))?;
    let mut writes = write_bench(&client, &fleet, s).await?;
    drop(fleet);

    // SQLite: one process.
    let dir = tempfile::Builder::new()
        .prefix("keygate-bench-fleet-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    let fleet = Fleet::sqlite(s, "SQLite, 1 process", &dir.path().join("keygate.db"))?;
    writes.extend(write_bench(&client, &fleet, s).await?);
    drop(fleet);

    // Diagnosis: the same two replicas on a Postgres without durable commits.
    if s.diagnose {
        let fleet = Fleet::postgres(
            s,
            "Postgres, 2 replicas, fsync off (diagnosis only: not durable)",
            2,
            true,
        )?;
        writes.extend(write_bench(&client, &fleet, s).await?);
    }

    let ctx = Context {
        started,
        load_after: procs::machine_load(),
        load_before,
        pg,
        fsync_us,
        fd_limit,
        cpu_model: cpu_model(),
        build: build_of(root),
    };
    let text = report(s, &ctx, &writes, &rev);
    let out = root.join("bench/results/fleet-latest.md");
    std::fs::write(&out, &text).map_err(|e| format!("{}: {e}", out.display()))?;
    eprintln!("bench-fleet: wrote {}", out.display());
    Ok(text)
}

fn main() -> ExitCode {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from("."));
    let result = Settings::from_env(&root).and_then(|s| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        rt.block_on(bench(&root, &s))
    });
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-fleet: {e}");
            ExitCode::FAILURE
        }
    }
}
