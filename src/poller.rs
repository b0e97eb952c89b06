//! Control-plane mode: exactly one VM per Envoy process long-polls the control plane's edge feed
//! and publishes each new version into shared data for every worker.
//!
//! Election: `kg:cfg:poller` holds `(vm_id, heartbeat_s)`. Every VM's root context ticks every
//! [`TICK_MS`] (250 ms; 1 ms while a page waits to be checked); a VM claims the role (compare-and-swap) when the slot is empty or its heartbeat is
//! older than [`POLLER_LEASE_S`], and the holder refreshes it each tick. If the poller's VM goes
//! away (worker VM replaced, crash), another VM takes over within a few seconds. This works the
//! same in plain Envoy and under Istio's `WasmPlugin`, which has no bootstrap singleton.
//!
//! Fetch: the change feed, page by page ([`keygate_core::published::Update`]): `GET
//! <path>?since=<version the free slot is complete at>&limit=<page_size>`, plus
//! `&known=<version in force>&wait=<s>` on the first page (the long poll: the control plane holds
//! it until something changes) and `&after=<cursor>` on the following ones, with the edge token
//! as Bearer, over `dispatch_http_call` to the configured cluster. A 200 page is validated
//! completely and written into the free slot; after the last page of a consistent walk the head
//! moves (an invalid, older or replayed page is rejected and counted; the version in force
//! stays). 304 → record contact; anything else → retry with exponential backoff and jitter.

use std::time::Duration;

use keygate_core::config::ChangesPage;
use keygate_core::plugin::ControlPlane;
use keygate_core::published::{self, read_head, Rejection, Step, Update};
use keygate_core::store::{SharedStore, POLLER_KEY};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType};

use crate::host::{now_us, VmState};
use crate::metrics::Metrics;

/// A poller whose heartbeat is older than this is replaced.
pub const POLLER_LEASE_S: u64 = 5;
/// Tick period in control-plane mode (election, retries, heartbeats).
pub const TICK_MS: u64 = 250;
/// First backoff after a failed fetch; doubles up to `max_backoff_ms`.
const FIRST_BACKOFF_MS: u64 = 250;

fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

/// Per-VM poller state (only the elected VM uses it).
#[derive(Default)]
pub struct Poller {
    in_flight: Option<u32>,
    failures: u32,
    next_attempt_ms: u64,
    /// The update under way (the free slot being brought to the newest version).
    update: Option<Update>,
    /// When the update's first page arrived (a long poll's wait is not part of the update).
    update_started_us: u64,
    /// A page received but not yet checked: its successor is already asked for (the fetch in
    /// flight), and the page is checked and written on the next tick, so that the control plane
    /// reads the next page while this VM checks this one.
    pending: Option<ChangesPage>,
    /// The tick period is 1 ms (a page is waiting) instead of [`TICK_MS`].
    fast_tick: bool,
}

fn decode_claim(b: &[u8]) -> Option<(u64, u64)> {
    let id = <[u8; 8]>::try_from(b.get(..8)?)
        .ok()
        .map(u64::from_le_bytes)?;
    let hb = <[u8; 8]>::try_from(b.get(8..16)?)
        .ok()
        .map(u64::from_le_bytes)?;
    Some((id, hb))
}

/// Claims or refreshes the poller role; true if this VM holds it.
fn elect(vm: &VmState, now_s: u64) -> bool {
    let me = vm.vm_id.get();
    let (cas, holder) = match vm.get(POLLER_KEY) {
        Ok(Some((bytes, cas))) => (cas, decode_claim(&bytes)),
        Ok(None) => (vm.absent_cas(), None),
        Err(_) => return false,
    };
    let free = match holder {
        Some((id, hb)) => id == me || hb.saturating_add(POLLER_LEASE_S) < now_s,
        None => true,
    };
    if !free {
        return false;
    }
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&me.to_le_bytes());
    value[8..].copy_from_slice(&now_s.to_le_bytes());
    vm.set(POLLER_KEY, &value, cas).is_ok()
}

impl Poller {
    /// Called every tick on every VM.
    pub fn tick(&mut self, vm: &VmState, cp: &ControlPlane, metrics: &Metrics) {
        let now_ms = now_us() / 1000;
        let now_s = now_ms / 1000;
        if let Some(head) = read_head(vm) {
            Metrics::set(
                metrics.config_age,
                now_s.saturating_sub(head.contacted_at_s),
            );
        }
        if !elect(vm, now_s) || self.in_flight.is_some() || now_ms < self.next_attempt_ms {
            return;
        }
        let mut long_poll = true;
        if self.update.is_none() {
            // An empty free slot is filled at the version in force right away, so that the
            // first change after start travels alone instead of refetching everything.
            let warm_up = Update::free_slot_is_empty(vm);
            long_poll = !warm_up;
            let begun = if warm_up {
                Update::warm_up(vm)
            } else {
                Update::begin(vm)
            };
            match begun {
                Ok(u) => self.update = Some(u),
                Err(_) => {
                    log(
                        LogLevel::Error,
                        "shared data refused the config update's state; retrying",
                    );
                    self.failed(vm, cp, metrics);
                    return;
                }
            }
        }
        self.send(vm, cp, metrics, long_poll);
    }

    /// Asks for the page the update needs next (`long_poll`: the first one, held by the
    /// control plane until something changes).
    fn send(&mut self, vm: &VmState, cp: &ControlPlane, metrics: &Metrics, long_poll: bool) {
        let Some(update) = &self.update else {
            return;
        };
        let (since, after) = update.request();
        let known = update.in_force().map(|h| h.version).filter(|_| long_poll);
        let after = after.to_owned();
        self.fetch(vm, cp, metrics, since, &after, known);
    }

    /// Sends `GET <path>?since=&limit=[&after=][&known=&wait=]`.
    fn fetch(
        &mut self,
        vm: &VmState,
        cp: &ControlPlane,
        metrics: &Metrics,
        since: u64,
        after: &str,
        known: Option<u64>,
    ) {
        let mut path = format!("{}?since={since}&limit={}", cp.path, cp.page_size);
        if !after.is_empty() {
            // Only a SID ([A-Za-z0-9_-], at most 64 bytes) goes into the path: nothing to escape.
            // Update never names anything else (a page whose next cursor is not one is refused);
            // this keeps it so whatever changes there.
            if !published::valid_next_cursor("", after) {
                self.rejected(
                    vm,
                    cp,
                    metrics,
                    Rejection::Invalid(keygate_core::compile::ConfigError {
                        path: "next".into(),
                        message: "invalid next cursor: not a SID".into(),
                    }),
                );
                return;
            }
            path.push_str("&after=");
            path.push_str(after);
        }
        if let Some(known) = known {
            path.push_str(&format!("&known={known}&wait={}", cp.wait_s));
        }
        let bearer = format!("Bearer {}", cp.token);
        let headers: Vec<(&str, &str)> = vec![
            (":method", "GET"),
            (":path", &path),
            (":authority", &cp.authority),
            ("authorization", &bearer),
            ("accept", "application/json"),
        ];
        Metrics::bump(metrics.config_fetches);
        match hostcalls::dispatch_http_call(
            &cp.cluster,
            headers,
            None,
            vec![],
            Duration::from_millis(cp.timeout_ms),
        ) {
            Ok(token) => self.in_flight = Some(token),
            Err(status) => {
                log(
                    LogLevel::Warn,
                    &format!(
                        "control plane fetch not sent (cluster {:?}): {status:?}",
                        cp.cluster
                    ),
                );
                self.drop_update();
                self.failed(vm, cp, metrics);
            }
        }
    }

    /// Forgets the update under way, a page waiting to be checked and a fetch in flight.
    fn drop_update(&mut self) {
        self.update = None;
        self.pending = None;
        self.in_flight = None;
    }

    /// Called on every timer tick before [`Poller::tick`]: checks and writes a page that was
    /// set aside while its successor is fetched.
    pub fn check_pending(&mut self, vm: &VmState, cp: &ControlPlane, metrics: &Metrics) {
        if self.fast_tick {
            // Back to the usual period, whether the page waited for this tick or an answer
            // that came first already checked it.
            let _ = hostcalls::set_tick_period(Duration::from_millis(TICK_MS));
            self.fast_tick = false;
        }
        if self.pending.is_none() {
            return;
        }
        if !elect(vm, now_us() / 1_000_000) {
            self.drop_update();
            return;
        }
        self.apply_pending(vm, cp, metrics);
    }

    fn apply_pending(&mut self, vm: &VmState, cp: &ControlPlane, metrics: &Metrics) {
        let Some(page) = self.pending.take() else {
            return;
        };
        let Some(update) = self.update.as_mut() else {
            return;
        };
        // What the fetch in flight asks for (it was sent ahead of this check).
        let ahead = update.request_after(&page);
        let outcome = update.apply_page(vm, &page, now_us() / 1_000_000);
        drop(page);
        self.applied(vm, cp, metrics, outcome, ahead);
    }

    /// Goes on after a page was checked (and, if acceptable, written). `ahead`: the request a
    /// fetch already in flight makes.
    fn applied(
        &mut self,
        vm: &VmState,
        cp: &ControlPlane,
        metrics: &Metrics,
        outcome: Result<Step, Rejection>,
        ahead: Option<(u64, String)>,
    ) {
        let now_s = now_us() / 1_000_000;
        let Some(update) = self.update.as_mut() else {
            return;
        };
        match outcome {
            Ok(Step::More) => {
                published::touch(vm, now_s);
                let (since, after) = update.request();
                let wanted = ahead
                    .as_ref()
                    .is_some_and(|(s, a)| *s == since && a == after);
                // Otherwise the page asked for ahead is the one needed, and its answer is on
                // its way.
                if !(wanted && self.in_flight.is_some()) {
                    // Nothing was asked ahead, or the walk started over: ask for what it needs
                    // (an answer to the earlier request is dropped).
                    self.in_flight = None;
                    self.send(vm, cp, metrics, false);
                }
            }
            Ok(step @ (Step::Ready(v) | Step::Done(v))) => {
                let what = if step == Step::Done(v) {
                    Metrics::bump(metrics.config_published);
                    Metrics::set(metrics.config_version, v);
                    format!("config version {v} published from the control plane")
                } else {
                    published::touch(vm, now_s);
                    format!("config slot warmed up at version {v}")
                };
                let ms = now_us().saturating_sub(self.update_started_us) / 1000;
                let both = if update.fills_both_slots() {
                    ", both slots"
                } else {
                    ""
                };
                log(
                    LogLevel::Info,
                    &format!(
                        "{what} ({} pages, {} records written, {} Bearer entries emptied, {ms} ms{both})",
                        update.pages, update.records, update.emptied
                    ),
                );
                self.drop_update();
                self.failures = 0;
                self.next_attempt_ms = 0;
            }
            Err(e) => self.rejected(vm, cp, metrics, e),
        }
    }

    /// The response to our fetch (or its timeout / reset: no `:status`).
    pub fn response(
        &mut self,
        vm: &VmState,
        cp: &ControlPlane,
        token: u32,
        body_size: usize,
        metrics: &Metrics,
    ) {
        if self.in_flight != Some(token) {
            return;
        }
        self.in_flight = None;
        let now_s = now_us() / 1_000_000;
        if !elect(vm, now_s) {
            // Another VM took over while this fetch was out: it owns the free slot now.
            self.drop_update();
            return;
        }
        if self.pending.is_some() {
            // This answer came before the tick that checks the page before it: check that one
            // first (if it is refused, or the walk went elsewhere, this answer is dropped).
            self.in_flight = Some(token);
            self.apply_pending(vm, cp, metrics);
            if self.in_flight != Some(token) || self.update.is_none() {
                return;
            }
            self.in_flight = None;
        }
        let status = hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders)
            .ok()
            .and_then(|h| h.into_iter().find(|(n, _)| n == ":status").map(|(_, v)| v))
            .unwrap_or_default();
        match status.as_slice() {
            b"200" => {
                let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                let Some(update) = self.update.as_mut() else {
                    return;
                };
                if update.pages == 0 {
                    self.update_started_us = now_us();
                }
                let page = match Update::parse(&body) {
                    Ok(page) => page,
                    Err(e) => {
                        self.rejected(vm, cp, metrics, e);
                        return;
                    }
                };
                drop(body);
                if let Some((since, after)) = update.request_after(&page) {
                    // Ask for the next page now and check this one on the next tick (right
                    // after this callback returns and the request is on its way).
                    self.fetch(vm, cp, metrics, since, &after, None);
                    if self.in_flight.is_some() {
                        self.pending = Some(page);
                        if !self.fast_tick {
                            let _ = hostcalls::set_tick_period(Duration::from_millis(1));
                            self.fast_tick = true;
                        }
                    }
                    return;
                }
                let outcome = update.apply_page(vm, &page, now_s);
                drop(page);
                self.applied(vm, cp, metrics, outcome, None);
            }
            b"410" => {
                // The control plane no longer knows the changes since the free slot's version:
                // fill it from scratch.
                log(
                    LogLevel::Warn,
                    "the control plane cannot list changes since the edge's version; fetching everything",
                );
                let restarted = self.update.as_mut().map(|s| s.start_over(vm));
                match restarted {
                    Some(Ok(())) => self.send(vm, cp, metrics, false),
                    _ => {
                        self.drop_update();
                        self.failed(vm, cp, metrics);
                    }
                }
            }
            b"304" => {
                published::touch(vm, now_s);
                Metrics::bump(metrics.config_not_modified);
                self.failures = 0;
                self.next_attempt_ms = 0;
            }
            other => {
                log(
                    LogLevel::Warn,
                    &format!(
                        "control plane fetch failed: status {:?}",
                        String::from_utf8_lossy(other)
                    ),
                );
                self.drop_update();
                self.failed(vm, cp, metrics);
            }
        }
    }

    fn rejected(&mut self, vm: &VmState, cp: &ControlPlane, metrics: &Metrics, e: Rejection) {
        self.drop_update();
        match e {
            Rejection::NotNewer { offered, in_force } => {
                log(
                    LogLevel::Warn,
                    &format!(
                        "config version {offered} rejected: not newer than {in_force} in force"
                    ),
                );
                Metrics::bump(metrics.config_rejected);
                self.failed(vm, cp, metrics);
            }
            Rejection::Invalid(e) => {
                log(
                    LogLevel::Warn,
                    &format!(
                        "config from the control plane rejected: {e}; the version in force stays"
                    ),
                );
                Metrics::bump(metrics.config_rejected);
                self.failed(vm, cp, metrics);
            }
            Rejection::Store => {
                log(
                    LogLevel::Error,
                    "config could not be written to shared data; the version in force stays",
                );
                self.failed(vm, cp, metrics);
            }
            Rejection::Superseded => {
                log(
                    LogLevel::Info,
                    "another VM published a config meanwhile; starting over",
                );
                self.next_attempt_ms = 0;
            }
        }
    }

    fn failed(&mut self, vm: &VmState, cp: &ControlPlane, metrics: &Metrics) {
        Metrics::bump(metrics.config_fetch_errors);
        self.failures = self.failures.saturating_add(1);
        let base = FIRST_BACKOFF_MS
            .saturating_mul(1u64 << self.failures.saturating_sub(1).min(16))
            .min(cp.max_backoff_ms);
        // Jitter in [base/2, base*3/2), from this VM's id and the clock.
        let seed = vm.vm_id.get().wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ now_us();
        let jitter = seed % base.max(1);
        self.next_attempt_ms = now_us() / 1000 + base / 2 + jitter;
    }
}
