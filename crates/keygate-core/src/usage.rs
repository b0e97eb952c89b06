//! Usage from the edge: how many requests each key (and the account's own credential) had
//! admitted and refused, by reason, per minute, and which of its secrets they presented, counted
//! without any host call on the request path, and sent to the control plane in idempotent
//! batches.
//!
//! 1. **Per VM** ([`Usage`], a field of [`crate::local::VmLocal`]): the gate counts every request
//!    whose credential authenticated ([`Used`]: account, key, and the matched secret's
//!    [`SecretTag`]) as allowed or denied by reason, in the minute it was judged. Requests refused
//!    before authentication (no, malformed or invalid credentials, a bad path, the failed-auth
//!    limiter, no or stale config) belong to no key and are not counted here (Envoy's stats count
//!    them). A request the fleet tier decides later is counted by the glue when it is resolved
//!    ([`Usage::allowed`], [`Usage::denied`]).
//! 2. **Per process** ([`flush`], on the root's tick, every 250 ms): a VM adds its counts into
//!    one shared-data record, [`USAGE_KEY`] ([`Record`]: the process's nonce, the last batch
//!    sequence, the batch being sent and the counts not yet in a batch), with compare-and-swap;
//!    counts a VM could not add stay in its memory for its next tick.
//! 3. **To the control plane** ([`Sender`], on the elected poller VM only): every
//!    [`SEND_EVERY_US`] it moves up to [`BATCH_MAX_ENTRIES`] entries of the record into a batch
//!    named `<edge_id>.<nonce>.<seq>` (the same CAS, so counts are never in both), and sends it
//!    as `POST /v1/edge/usage` with the edge token. The batch stays in the record, and is sent
//!    again, byte for byte under the same id, until the control plane answers 2xx; the control
//!    plane applies a batch id once ([`crate::usage`] README: it remembers applied ids for a
//!    day). A 4xx other than 401, 403, 408 and 429 means the control plane can never take it:
//!    the batch is dropped and counted ([`SendEvent::Refused`]). Because the batch lives in
//!    shared data, a new poller VM sends the batch its predecessor left.
//!
//! What can be lost: the counts of an Envoy process that exits (shared data goes with it; at
//! most the last [`SEND_EVERY_US`] plus the time the control plane was unreachable), and counts
//! beyond [`ACC_MAX_ENTRIES`] entries waiting (then whole entries are dropped and their requests
//! reported in the next batch's `dropped`). A batch is never counted twice.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::reason::Reason;
use crate::store::{compare_and_swap, Change, SharedStore, USAGE_KEY, USAGE_TAG};

/// A secret as the usage names it: the first 8 bytes of its digest (the control plane stores
/// digests, and finds the secret of the key whose digest starts with them).
pub type SecretTag = [u8; 8];

/// The tag of a digest.
pub fn secret_tag(digest: &[u8; 32]) -> SecretTag {
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&digest[..8]);
    tag
}

/// Who used a credential: the principal that authenticated and the secret it presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Used {
    pub account_sid: Arc<str>,
    /// `None` for the account's own credentials (account SID + auth token).
    pub key_sid: Option<Arc<str>>,
    pub secret: SecretTag,
}

/// Counts of one principal in one minute.
#[derive(Debug, Default, Clone)]
struct Counts {
    allowed: u64,
    denied: Vec<(Reason, u64)>,
    /// `(secret, requests, last use in seconds)`.
    secrets: Vec<(SecretTag, u64, u64)>,
}

type TallyKey = (u64, Arc<str>, Option<Arc<str>>);

/// What one VM counted since its last [`flush`]. Single-threaded, like the VM.
#[derive(Debug, Default)]
pub struct Usage {
    /// Counting is on (control-plane mode: someone sends the counts).
    enabled: std::cell::Cell<bool>,
    tally: RefCell<HashMap<TallyKey, Counts>>,
    /// Entries a flush could not add to the shared record: tried again on the next tick.
    unflushed: RefCell<Vec<UsageEntry>>,
}

impl Usage {
    /// Turns counting on or off (off: nothing is counted, what was counted stays to be flushed).
    pub fn enable(&self, on: bool) {
        self.enabled.set(on);
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.get()
    }

    fn count(&self, used: &Used, now_us: u64, outcome: Option<Reason>) {
        if !self.enabled.get() {
            return;
        }
        let now_s = now_us / 1_000_000;
        let minute = now_s - now_s % 60;
        let mut tally = self.tally.borrow_mut();
        let key = (minute, used.account_sid.clone(), used.key_sid.clone());
        let c = tally.entry(key).or_default();
        match outcome {
            None => c.allowed += 1,
            Some(reason) => match c.denied.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => c.denied.push((reason, 1)),
            },
        }
        match c.secrets.iter_mut().find(|(t, _, _)| *t == used.secret) {
            Some((_, n, last)) => {
                *n += 1;
                *last = (*last).max(now_s);
            }
            None => c.secrets.push((used.secret, 1, now_s)),
        }
    }

    /// Counts an admitted request.
    pub fn allowed(&self, used: &Used, now_us: u64) {
        self.count(used, now_us, None);
    }

    /// Counts a request refused with `reason` after its credential authenticated.
    pub fn denied(&self, used: &Used, now_us: u64, reason: Reason) {
        self.count(used, now_us, Some(reason));
    }

    /// Takes what was counted (and what an earlier flush left) as entries.
    fn take(&self) -> Vec<UsageEntry> {
        let mut out = std::mem::take(&mut *self.unflushed.borrow_mut());
        for ((minute, account, key), c) in self.tally.borrow_mut().drain() {
            out.push(UsageEntry {
                minute,
                account_sid: account.to_string(),
                key_sid: key.map(|k| k.to_string()),
                allowed: c.allowed,
                denied: (c.denied.iter())
                    .map(|(r, n)| (r.code().to_owned(), *n))
                    .collect(),
                secrets: (c.secrets.iter())
                    .map(|(t, n, last)| SecretUse {
                        id: hex::encode(t),
                        n: *n,
                        last_used_s: *last,
                    })
                    .collect(),
            });
        }
        out
    }

    /// Whether nothing waits to be flushed.
    pub fn is_empty(&self) -> bool {
        self.tally.borrow().is_empty() && self.unflushed.borrow().is_empty()
    }
}

/// One secret's use in an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretUse {
    /// Lowercase hex of the [`SecretTag`] (16 characters).
    pub id: String,
    /// Requests that presented it.
    pub n: u64,
    /// The last of them, unix seconds.
    pub last_used_s: u64,
}

/// One principal's counts in one minute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageEntry {
    /// Start of the minute, unix seconds (a multiple of 60).
    pub minute: u64,
    pub account_sid: String,
    /// `None`: the account's own credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sid: Option<String>,
    #[serde(default)]
    pub allowed: u64,
    /// By reason code.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub denied: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretUse>,
}

impl UsageEntry {
    fn requests(&self) -> u64 {
        self.allowed
            .saturating_add(self.denied.values().fold(0u64, |a, n| a.saturating_add(*n)))
    }

    /// Adds `other` (same minute and principal) into this one.
    fn add(&mut self, other: &UsageEntry) {
        self.allowed = self.allowed.saturating_add(other.allowed);
        for (r, n) in &other.denied {
            let d = self.denied.entry(r.clone()).or_default();
            *d = d.saturating_add(*n);
        }
        for s in &other.secrets {
            match self.secrets.iter_mut().find(|t| t.id == s.id) {
                Some(t) => {
                    t.n = t.n.saturating_add(s.n);
                    t.last_used_s = t.last_used_s.max(s.last_used_s);
                }
                None => self.secrets.push(s.clone()),
            }
        }
    }
}

/// What the edge sends: `POST /v1/edge/usage` (`keygate.usage/v1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageBatch {
    /// `<edge_id>.<nonce>.<seq>`: applied once by the control plane, however often it is sent.
    pub batch: String,
    pub entries: Vec<UsageEntry>,
    /// Requests this edge counted but could not keep since its previous batch (a full record).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Entries of the record not yet in a batch, at most (whole entries beyond are dropped).
pub const ACC_MAX_ENTRIES: usize = 20_000;
/// Entries per batch, at most (a batch of them stays under the control plane's 64 KiB body cap:
/// an entry with two reasons and two secrets is about 250 bytes).
pub const BATCH_MAX_ENTRIES: usize = 200;
/// How often the sender takes a new batch.
pub const SEND_EVERY_US: u64 = 2_000_000;
/// Longest wait between failed sends (doubling from [`crate::poller::FIRST_BACKOFF_MS`]).
pub const MAX_BACKOFF_MS: u64 = 4_000;
/// Compare-and-swap tries of a flush or a take.
const CAS_TRIES: u32 = 16;

/// The process's usage record in shared data.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Names this process's batches (with the edge id and the sequence).
    pub nonce: String,
    /// The sequence number of the last batch taken.
    pub seq: u64,
    /// The batch being sent (until acknowledged), serialized as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out: Option<String>,
    /// Counts not yet in a batch, sorted by (minute, account, key).
    pub acc: Vec<UsageEntry>,
    /// Requests of entries dropped because `acc` was full, since the last batch.
    #[serde(default)]
    pub dropped: u64,
}

impl Record {
    fn decode(bytes: Option<&[u8]>) -> Option<Record> {
        match bytes? {
            [USAGE_TAG, json @ ..] => serde_json::from_slice(json).ok(),
            _ => None,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = vec![USAGE_TAG];
        // A record of plain strings and numbers always serializes.
        if serde_json::to_writer(&mut out, self).is_err() {
            out.truncate(1);
        }
        out
    }

    /// Adds `entries` into `acc`, keeping it sorted; entries that would go beyond
    /// [`ACC_MAX_ENTRIES`] are dropped and their requests counted in `dropped`.
    fn merge(&mut self, entries: &[UsageEntry]) {
        for e in entries {
            let key = (e.minute, e.account_sid.as_str(), e.key_sid.as_deref());
            let found = self.acc.binary_search_by(|a| {
                (a.minute, a.account_sid.as_str(), a.key_sid.as_deref()).cmp(&key)
            });
            match found {
                Ok(i) => self.acc[i].add(e),
                Err(_) if self.acc.len() >= ACC_MAX_ENTRIES => {
                    self.dropped = self.dropped.saturating_add(e.requests());
                }
                Err(i) => self.acc.insert(i, e.clone()),
            }
        }
    }
}

/// The process's record as it is in `store` (for tests and the glue's stats).
pub fn read_record(store: &dyn SharedStore) -> Option<Record> {
    let value = store.get(USAGE_KEY).ok()??;
    Record::decode(Some(&value.0))
}

/// A VM's tick: adds what it counted into the process's record. `nonce` names the process's
/// batches if this VM creates the record (a random number, or the clock without one). What
/// cannot be added (store errors, contention) stays for the next tick. Returns whether the
/// VM's counts are in the record.
pub fn flush(store: &dyn SharedStore, usage: &Usage, nonce: u64) -> bool {
    if usage.is_empty() {
        return true;
    }
    let entries = usage.take();
    let added = compare_and_swap(store, USAGE_KEY, CAS_TRIES, |value| {
        let mut record = Record::decode(value).unwrap_or_else(|| Record {
            nonce: format!("{nonce:016x}"),
            ..Record::default()
        });
        record.merge(&entries);
        Some(Change::Write(record.encode(), ()))
    });
    if added.is_none() {
        *usage.unflushed.borrow_mut() = entries;
        return false;
    }
    true
}

/// What the sender tells the glue (to log and count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendEvent {
    /// A batch was sent (`seq`, entries, again: a retry of the same batch).
    Sent {
        seq: u64,
        entries: usize,
        again: bool,
    },
    /// The control plane took the batch.
    Acknowledged { seq: u64 },
    /// A failure (the status; empty: no answer): the batch is sent again after a backoff.
    Failed { status: Vec<u8> },
    /// The control plane refused the batch for good (a 4xx): it is dropped.
    Refused { seq: u64, status: Vec<u8> },
    /// The batch could not be sent or the record not written: tried again later.
    NotSent,
}

/// The host calls of the sender.
pub trait Post {
    /// Sends `POST <usage path>` with `body` (JSON); the call's token, `None` if not sent.
    fn post(&mut self, body: &[u8]) -> Option<u32>;
    fn report(&mut self, event: SendEvent);
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
enum State {
    #[default]
    Idle,
    /// Batch `seq` is out as `token`.
    InFlight {
        token: u32,
        seq: u64,
    },
    Backoff {
        until_us: u64,
    },
}

/// The elected poller VM's sender of the process's batches.
#[derive(Debug, Default)]
pub struct Sender {
    state: State,
    failures: u32,
    last_take_us: u64,
}

/// The sequence number of a batch id (its last dot-separated part).
fn seq_of(batch_json: &str) -> Option<u64> {
    let batch: UsageBatch = serde_json::from_str(batch_json).ok()?;
    batch.batch.rsplit('.').next()?.parse().ok()
}

impl Sender {
    /// Whether a batch is out.
    pub fn in_flight(&self) -> bool {
        matches!(self.state, State::InFlight { .. })
    }

    /// A tick of the elected VM (`edge`: the edge's id, or a default name): sends the batch
    /// waiting in the record, or takes a new one when [`SEND_EVERY_US`] has passed since the
    /// last.
    pub fn on_tick(
        &mut self,
        store: &dyn SharedStore,
        edge: &str,
        now_us: u64,
        vm_id: u64,
        post: &mut dyn Post,
    ) {
        match self.state {
            State::InFlight { .. } => return,
            State::Backoff { until_us } if now_us < until_us => return,
            _ => {}
        }
        self.state = State::Idle;
        let due = now_us.saturating_sub(self.last_take_us) >= SEND_EVERY_US;
        let taken = compare_and_swap(store, USAGE_KEY, CAS_TRIES, |value| {
            let mut record = Record::decode(value)?;
            if let Some(out) = &record.out {
                return Some(Change::Keep(Some((out.clone(), true))));
            }
            if !due || (record.acc.is_empty() && record.dropped == 0) {
                return Some(Change::Keep(None));
            }
            let n = record.acc.len().min(BATCH_MAX_ENTRIES);
            let seq = record.seq + 1;
            let batch = UsageBatch {
                batch: format!("{edge}.{}.{seq}", record.nonce),
                entries: record.acc.drain(..n).collect(),
                dropped: std::mem::take(&mut record.dropped),
            };
            let json = serde_json::to_string(&batch).ok()?;
            record.seq = seq;
            record.out = Some(json.clone());
            Some(Change::Write(record.encode(), Some((json, false))))
        });
        let Some(Some((json, again))) = taken else {
            // Nothing to send (or no record yet).
            return;
        };
        if !again {
            self.last_take_us = now_us;
        }
        let seq = seq_of(&json).unwrap_or(0);
        match post.post(json.as_bytes()) {
            Some(token) => {
                let entries =
                    serde_json::from_str::<UsageBatch>(&json).map_or(0, |b| b.entries.len());
                post.report(SendEvent::Sent {
                    seq,
                    entries,
                    again,
                });
                self.state = State::InFlight { token, seq };
            }
            None => {
                post.report(SendEvent::NotSent);
                self.back_off(now_us, vm_id);
            }
        }
    }

    /// The answer to call `token` (`status` empty: a timeout or a reset). Returns whether the
    /// call was the sender's.
    pub fn on_response(
        &mut self,
        store: &dyn SharedStore,
        token: u32,
        status: &[u8],
        now_us: u64,
        vm_id: u64,
        post: &mut dyn Post,
    ) -> bool {
        let seq = match self.state {
            State::InFlight { token: t, seq } if t == token => seq,
            _ => return false,
        };
        self.state = State::Idle;
        let code: u16 = std::str::from_utf8(status)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let done = (200..300).contains(&code);
        let refused = (400..500).contains(&code) && !matches!(code, 401 | 403 | 408 | 429);
        if !done && !refused {
            post.report(SendEvent::Failed {
                status: status.to_vec(),
            });
            self.back_off(now_us, vm_id);
            return true;
        }
        // Clear the batch it answered (only that one: the record names its sequence).
        let cleared = compare_and_swap(store, USAGE_KEY, CAS_TRIES, |value| {
            let mut record = Record::decode(value)?;
            if record.out.as_deref().and_then(seq_of) != Some(seq) {
                return Some(Change::Keep(()));
            }
            record.out = None;
            Some(Change::Write(record.encode(), ()))
        });
        if cleared.is_none() {
            // Sent again later under the same id: the control plane applies it once.
            post.report(SendEvent::NotSent);
            self.back_off(now_us, vm_id);
            return true;
        }
        self.failures = 0;
        post.report(if done {
            SendEvent::Acknowledged { seq }
        } else {
            SendEvent::Refused {
                seq,
                status: status.to_vec(),
            }
        });
        true
    }

    fn back_off(&mut self, now_us: u64, vm_id: u64) {
        self.failures = self.failures.saturating_add(1);
        let wait = crate::poller::backoff_ms(self.failures, MAX_BACKOFF_MS, vm_id, now_us);
        self.state = State::Backoff {
            until_us: now_us.saturating_add(wait * 1000),
        };
    }
}

/// The usage path beside the change feed's: `…/changes` → `…/usage`, else `/v1/edge/usage`.
pub fn usage_path(feed_path: &str) -> String {
    match feed_path.strip_suffix("/changes") {
        Some(prefix) => format!("{prefix}/usage"),
        None => "/v1/edge/usage".to_owned(),
    }
}

/// Checks a batch the control plane received: the batch id, each entry's minute, SIDs, reason
/// codes and secret ids. The error names the field (`entries[3].denied: unknown reason "x"`).
pub fn check_batch(batch: &UsageBatch) -> Result<(), String> {
    let id_ok = (1..=200).contains(&batch.batch.len())
        && (batch.batch.bytes())
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !id_ok {
        return Err("batch: must be 1 to 200 characters of A-Z, a-z, 0-9, '_', '-' and '.'".into());
    }
    let sid_ok = |s: &str| {
        (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    for (i, e) in batch.entries.iter().enumerate() {
        if e.minute % 60 != 0 {
            return Err(format!("entries[{i}].minute: must be a multiple of 60"));
        }
        if !sid_ok(&e.account_sid) {
            return Err(format!("entries[{i}].account_sid: not a SID"));
        }
        if e.key_sid.as_deref().is_some_and(|k| !sid_ok(k)) {
            return Err(format!("entries[{i}].key_sid: not a SID"));
        }
        if let Some(r) = (e.denied.keys()).find(|r| !Reason::ALL.iter().any(|x| x.code() == *r)) {
            return Err(format!("entries[{i}].denied: unknown reason {r:?}"));
        }
        for (j, s) in e.secrets.iter().enumerate() {
            let hex16 =
                s.id.len() == 16 && s.id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if !hex16 {
                return Err(format!(
                    "entries[{i}].secrets[{j}].id: must be 16 lowercase hex digits"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
