//! The load: generator threads, each with its own keep-alive connection to Envoy, sending the mix
//! until the request budget or the time cap is spent, judging every reply as it arrives.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use keygate_e2e::{Conn, Req, Response};

use crate::mix::{judge, Class, Judged, Pool, Target};
use crate::now_us;

/// Unexpected replies (and transport errors) kept for the report.
const KEPT_FAILURES: usize = 20;

/// Shared by the generators and the progress printer.
#[derive(Default)]
pub struct Progress {
    /// Requests claimed (the budget counter).
    pub claimed: AtomicU64,
    pub done: AtomicU64,
    pub ok: AtomicU64,
    pub denied_4xx: AtomicU64,
    pub limited: AtomicU64,
    pub unexpected: AtomicU64,
    pub transport_errors: AtomicU64,
    /// Set to end the load early (too many failures, or the time cap).
    pub stop: AtomicBool,
    pub failures: Mutex<Vec<String>>,
}

impl Progress {
    fn keep(&self, what: String) {
        let mut failures = self.failures.lock().expect("failures lock");
        if failures.len() < KEPT_FAILURES {
            failures.push(what);
        }
    }
}

/// What one generator saw.
#[derive(Default)]
pub struct Tally {
    /// Replies by class and label (`200`, `429 rate_limited_key`, `503 ...`).
    pub replies: BTreeMap<(Class, String), u64>,
    /// Admitted requests of each pool's keys: (key, sent, answered), wall clock in µs.
    pub admitted: BTreeMap<Pool, Vec<(usize, u64, u64)>>,
    /// Requests sent to each key of a pool (the demand).
    pub sent: BTreeMap<(Pool, usize), u64>,
}

impl Tally {
    pub fn merge(&mut self, other: Tally) {
        for (k, n) in other.replies {
            *self.replies.entry(k).or_insert(0) += n;
        }
        for (pool, admitted) in other.admitted {
            self.admitted.entry(pool).or_default().extend(admitted);
        }
        for (k, n) in other.sent {
            *self.sent.entry(k).or_insert(0) += n;
        }
    }
}

/// How a generator stops.
pub struct Budget {
    pub requests: u64,
    pub deadline: Option<Instant>,
    /// Stop everything after this many unexpected replies and transport errors.
    pub max_failures: u64,
}

/// xorshift64*: enough randomness for picking classes, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One generator: sends on its own keep-alive connection to `port` until the budget is spent.
pub fn generate(
    id: usize,
    port: u16,
    target: &Target,
    budget: &Budget,
    progress: &Progress,
    started: Instant,
) -> Tally {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) << 32));
    let mut tally = Tally::default();
    let mut conn: Option<Conn> = None;
    loop {
        if progress.stop.load(Ordering::Relaxed)
            || budget.deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        let seq = progress.claimed.fetch_add(1, Ordering::Relaxed);
        if seq >= budget.requests {
            break;
        }
        let n = rng.next();
        let planned = target.plan(Class::pick((n % 1000) as u32), n >> 10);
        let class = planned.class;
        // A client address per request (Envoy trusts one X-Forwarded-For hop), spread over
        // 198.18.0.0/15: no address fails often enough to meet the failed-auth limit.
        let client = format!(
            "198.{}.{}.{}",
            18 + (seq >> 16) % 2,
            (seq >> 8) & 0xff,
            seq & 0xff
        );
        let req = planned.req.header("x-forwarded-for", client);
        let sent = now_us();
        let res = send(&mut conn, port, &req);
        let done = now_us();
        progress.done.fetch_add(1, Ordering::Relaxed);
        let res = match res {
            Ok(res) => res,
            Err(e) => {
                conn = None;
                progress.transport_errors.fetch_add(1, Ordering::Relaxed);
                progress.keep(format!(
                    "{:+.3} s {}: transport error: {e}",
                    started.elapsed().as_secs_f64(),
                    class.name()
                ));
                check_failures(progress, budget);
                continue;
            }
        };
        if let Some(key) = planned.limited_key {
            *tally.sent.entry(key).or_insert(0) += 1;
        }
        let label = match judge(&planned.expect, &res, sent, done) {
            Judged::Expected(label) => label,
            Judged::Unexpected(label, why) => {
                progress.unexpected.fetch_add(1, Ordering::Relaxed);
                progress.keep(format!(
                    "{:+.3} s {}: got {label}: {why}",
                    started.elapsed().as_secs_f64(),
                    class.name()
                ));
                check_failures(progress, budget);
                format!("{label} UNEXPECTED")
            }
        };
        match res.status {
            200 => {
                progress.ok.fetch_add(1, Ordering::Relaxed);
                if let Some((pool, i)) = planned.limited_key {
                    tally
                        .admitted
                        .entry(pool)
                        .or_default()
                        .push((i, sent, done));
                }
            }
            429 => {
                progress.limited.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                progress.denied_4xx.fetch_add(1, Ordering::Relaxed);
            }
        }
        *tally.replies.entry((class, label)).or_insert(0) += 1;
        if res
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"close"))
        {
            conn = None;
        }
    }
    tally
}

fn check_failures(progress: &Progress, budget: &Budget) {
    let failures = progress.unexpected.load(Ordering::Relaxed)
        + progress.transport_errors.load(Ordering::Relaxed);
    if failures >= budget.max_failures {
        progress.stop.store(true, Ordering::Relaxed);
    }
}

/// Sends `req` on `conn`, opening it first if needed.
fn send(conn: &mut Option<Conn>, port: u16, req: &Req) -> std::io::Result<Response> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(Conn::open(port)?),
    };
    c.send(req)
}
