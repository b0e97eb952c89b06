//! The churn: threads that create, regenerate and delete keys through the control plane's API for
//! the whole run, and the timeline of every credential they hand out, from which a reply to a
//! churned credential is judged.
//!
//! Each slot thread runs a key through a life: created (secret 1), regenerated with a grace of
//! [`GRACE`] (secret 2; secret 1 keeps working until its `not_after`), regenerated with grace 0
//! (secret 3; every older secret revoked at once), deleted; then a new key. Every secret a slot
//! handed out stays in the mix for [`KEEP_REVOKED`] after it must be refused, so refusals are
//! probed too. A credential's timeline (wall clock, the one Envoy's filter reads):
//!
//! - `must_from`: the create or regenerate call answered, plus the [`PROPAGATION`] window;
//! - `valid_until`: a moment no later than the call that ends it was sent (set before sending);
//!   for a grace regeneration, the call's start plus the grace less a second (`not_after` is
//!   stored in whole seconds);
//! - `invalid_from`: the call that ended it answered, plus [`PROPAGATION`] (for a grace, also past
//!   `not_after` by a second).
//!
//! A request sent at `s` and answered at `r` must be admitted if `must_from <= s` and
//! `r <= valid_until`, must be refused (401 `invalid_credentials`) if `invalid_from <= s`, and may
//! be either in between. A generator reads the timeline after the reply arrived, and a slot thread
//! sets `valid_until` before it sends the call, so a timeline read with no `valid_until` means the
//! credential was not being revoked while the request was in flight.
//!
//! A bulk thread meanwhile creates, regenerates and deletes keys the mix never uses, so the
//! feed carries changes all the time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use keygate_e2e::{ControlPlane, Req};
use serde_json::{json, Value};

use crate::mix::{Key, Rate};
use crate::now_us;

/// How long a change through the control plane may take to be in force at the edge (the
/// change feed's long poll carries it in tens of milliseconds; this is the bound the judge uses).
pub const PROPAGATION: Duration = Duration::from_secs(3);
/// The grace of the first regeneration of each key.
pub const GRACE: Duration = Duration::from_secs(4);
/// How long a refused credential stays in the mix.
pub const KEEP_REVOKED: Duration = Duration::from_secs(8);
/// Slot threads (keys in their life at once).
pub const SLOTS: usize = 4;
/// Pauses of a key's life: after creation, after the grace regeneration, after the second.
const HOLD_NEW: Duration = Duration::from_secs(6);
const HOLD_GRACE: Duration = Duration::from_secs(7);
const HOLD_LAST: Duration = Duration::from_secs(6);
/// Pause between the bulk thread's key lives.
const BULK_PAUSE: Duration = Duration::from_millis(100);

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// What a credential's timeline says of a request sent at `s` and answered at `r`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    MustAdmit,
    MustRefuse,
    Either,
}

#[derive(Clone, Copy, Debug)]
struct Timeline {
    must_from: u64,
    valid_until: u64,
    invalid_from: u64,
}

/// One secret handed out by the churn.
pub struct Cred {
    pub sid: String,
    pub secret: String,
    timeline: Mutex<Timeline>,
}

impl Cred {
    fn new(sid: &str, secret: String, answered_us: u64) -> Arc<Cred> {
        Arc::new(Cred {
            sid: sid.to_owned(),
            secret,
            timeline: Mutex::new(Timeline {
                must_from: answered_us + us(PROPAGATION),
                valid_until: u64::MAX,
                invalid_from: u64::MAX,
            }),
        })
    }

    fn timeline(&self) -> Timeline {
        *self.timeline.lock().expect("timeline lock")
    }

    fn ends_before(&self, until_us: u64) {
        let mut t = self.timeline.lock().expect("timeline lock");
        t.valid_until = t.valid_until.min(until_us);
    }

    fn refused_from(&self, from_us: u64) {
        let mut t = self.timeline.lock().expect("timeline lock");
        t.invalid_from = t.invalid_from.min(from_us);
    }

    pub fn verdict(&self, sent_us: u64, done_us: u64) -> Verdict {
        let t = self.timeline();
        if sent_us >= t.invalid_from {
            Verdict::MustRefuse
        } else if sent_us >= t.must_from && done_us <= t.valid_until {
            Verdict::MustAdmit
        } else {
            Verdict::Either
        }
    }

    /// The timeline against a request sent at `sent_us`, for a failure message.
    pub fn explain(&self, verdict: Verdict, sent_us: u64) -> String {
        let t = self.timeline();
        let rel = |at: u64| {
            if at == u64::MAX {
                "never".to_owned()
            } else {
                format!("{:+.3} s", (at as f64 - sent_us as f64) / 1e6)
            }
        };
        format!(
            "{verdict:?} (key {}: must work from {}, until {}; must be refused from {}, relative to the request)",
            self.sid,
            rel(t.must_from),
            rel(t.valid_until),
            rel(t.invalid_from)
        )
    }
}

/// The churned credentials in the mix, and what the churn did.
#[derive(Default)]
pub struct Churn {
    creds: Mutex<Vec<Arc<Cred>>>,
    pub created: AtomicU64,
    pub regenerated: AtomicU64,
    pub deleted: AtomicU64,
    pub failures: Mutex<Vec<String>>,
    pub failed: AtomicU64,
}

impl Churn {
    /// The `n`th (modulo) credential in the mix, if any.
    pub fn pick(&self, n: u64) -> Option<Arc<Cred>> {
        let creds = self.creds.lock().expect("churn lock");
        if creds.is_empty() {
            return None;
        }
        Some(Arc::clone(&creds[(n as usize) % creds.len()]))
    }

    fn add(&self, cred: Arc<Cred>) {
        let now = now_us();
        let mut creds = self.creds.lock().expect("churn lock");
        creds.retain(|c| c.timeline().invalid_from.saturating_add(us(KEEP_REVOKED)) > now);
        creds.push(cred);
    }

    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.failures.lock().expect("churn lock");
        if failures.len() < 10 {
            failures.push(what);
        }
    }

    /// Runs one key life after another in slot `slot` until `stop`.
    pub fn run_slot(&self, api: &Api<'_>, rate: Rate, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = self.one_life(api, rate, stop) {
                self.fail(e);
                pause(Duration::from_secs(1), stop);
            }
        }
    }

    fn one_life(&self, api: &Api<'_>, rate: Rate, stop: &AtomicBool) -> Result<(), String> {
        let key = api.create("soak-churn", rate)?;
        self.created.fetch_add(1, Ordering::Relaxed);
        let first = Cred::new(&key.sid, key.secret.clone(), now_us());
        self.add(Arc::clone(&first));
        pause(HOLD_NEW, stop);

        // Regenerate with a grace: the first secret keeps working until its not_after.
        let start = now_us();
        first.ends_before(start + us(GRACE) - 1_000_000);
        let second = api.regenerate(&key.sid, GRACE.as_secs())?;
        let answered = now_us();
        first.refused_from((answered + us(GRACE) + 1_000_000).max(answered + us(PROPAGATION)));
        self.regenerated.fetch_add(1, Ordering::Relaxed);
        let second = Cred::new(&key.sid, second, answered);
        self.add(Arc::clone(&second));
        pause(HOLD_GRACE, stop);

        // Regenerate with grace 0: every older secret revoked at once.
        let start = now_us();
        first.ends_before(start);
        second.ends_before(start);
        let third = api.regenerate(&key.sid, 0)?;
        let answered = now_us();
        first.refused_from(answered + us(PROPAGATION));
        second.refused_from(answered + us(PROPAGATION));
        self.regenerated.fetch_add(1, Ordering::Relaxed);
        let third = Cred::new(&key.sid, third, answered);
        self.add(Arc::clone(&third));
        pause(HOLD_LAST, stop);

        // Delete.
        let start = now_us();
        for cred in [&first, &second, &third] {
            cred.ends_before(start);
        }
        api.delete(&key.sid)?;
        let answered = now_us();
        for cred in [&first, &second, &third] {
            cred.refused_from(answered + us(PROPAGATION));
        }
        self.deleted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Creates, regenerates and deletes keys nobody uses, until `stop`.
    pub fn run_bulk(&self, api: &Api<'_>, rate: Rate, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let life = || -> Result<(), String> {
                let key = api.create("soak-bulk", rate)?;
                self.created.fetch_add(1, Ordering::Relaxed);
                api.regenerate(&key.sid, 0)?;
                self.regenerated.fetch_add(1, Ordering::Relaxed);
                api.delete(&key.sid)?;
                self.deleted.fetch_add(1, Ordering::Relaxed);
                Ok(())
            };
            if let Err(e) = life() {
                self.fail(e);
            }
            pause(BULK_PAUSE, stop);
        }
    }
}

/// Sleeps `d`, waking early if `stop` is set.
fn pause(d: Duration, stop: &AtomicBool) {
    let step = Duration::from_millis(50);
    let mut left = d;
    while !left.is_zero() && !stop.load(Ordering::Relaxed) {
        let now = left.min(step);
        thread::sleep(now);
        left -= now;
    }
}

/// The control plane's key API, as the account (HTTP Basic with its SID and auth token).
pub struct Api<'a> {
    pub cp: &'a ControlPlane,
}

impl Api<'_> {
    fn call(&self, req: Req, want: u16, what: &str) -> Result<Value, String> {
        let res = self
            .cp
            .try_send(&self.cp.as_account(req))
            .map_err(|e| format!("{what}: {e}"))?;
        if res.status != want {
            return Err(format!(
                "{what}: {} {} (expected {want})",
                res.status,
                res.body_text()
            ));
        }
        if res.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&res.body).map_err(|e| format!("{what}: body is not JSON: {e}"))
    }

    fn keys_path(&self) -> String {
        format!("/v1/accounts/{}/keys", self.cp.account_sid())
    }

    /// Creates a standard key with its own rate `rate`.
    pub fn create(&self, name: &str, rate: Rate) -> Result<Key, String> {
        self.create_with(json!({
            "role": "standard",
            "friendly_name": name,
            "limits": {"rate": rate.json()},
        }))
    }

    /// Creates a key from a `POST /v1/accounts/{AC}/keys` body.
    pub fn create_with(&self, body: Value) -> Result<Key, String> {
        let v = self.call(Req::post(self.keys_path()).json(&body), 201, "create key")?;
        match (v["sid"].as_str(), v["secret"].as_str()) {
            (Some(sid), Some(secret)) => Ok(Key {
                sid: sid.to_owned(),
                secret: secret.to_owned(),
            }),
            _ => Err(format!("create key: no sid or secret in {v}")),
        }
    }

    /// Regenerates `sid` with `grace_s`; returns the new secret.
    pub fn regenerate(&self, sid: &str, grace_s: u64) -> Result<String, String> {
        let path = format!("{}/{sid}/regenerate", self.keys_path());
        let v = self.call(
            Req::post(path).json(&json!({ "grace_seconds": grace_s })),
            200,
            "regenerate key",
        )?;
        v["secret"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("regenerate key: no secret in {v}"))
    }

    pub fn delete(&self, sid: &str) -> Result<(), String> {
        let path = format!("{}/{sid}", self.keys_path());
        self.call(Req::delete(path), 204, "delete key").map(|_| ())
    }
}
