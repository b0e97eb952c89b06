//! Control-plane mode's poller as a state machine: exactly one VM per Envoy process long-polls
//! the control plane's change feed and publishes each new version into the shared store for
//! every worker. The filter's glue only does the host calls ([`Dispatch`], [`Clock`]) and logs
//! and records [`Event`]s ([`Event::log_line`], [`Event::stats`]).
//!
//! Election: [`POLLER_KEY`] holds `(vm_id, heartbeat_s)`. Every VM ticks every [`TICK_MS`]
//! (1 ms while a page waits to be checked) and calls [`Poller::on_tick`]; a VM claims the role
//! (compare-and-swap) when the slot is empty or its heartbeat is older than [`POLLER_LEASE_S`],
//! and the holder refreshes it each tick. If the poller's VM goes away, another takes over
//! within a few seconds (and starts its update over from the slot's state).
//!
//! Fetch: the change feed, page by page ([`Update`]): `<path>?since=<version the free slot is
//! complete at>&limit=<page_size>`, plus `&known=<version in force>&wait=<s>` on the first page
//! (the long poll) and `&after=<cursor>` on the following ones, and on every request the edge's
//! name, `&edge=<edge_id>` and its `&region=<region>`, when the plugin configuration gives them
//! (the control plane's fleet view: which edge holds which version; it knows edges by id, so a
//! region is sent only with an id). A 200 page is checked completely
//! and written into the free slot; after the last page of a consistent walk the head moves. 304
//! records contact; 410 fills the slot from scratch; anything else (an error status, a timeout:
//! no status) retries with exponential backoff and jitter.
//!
//! Pipelining: when a page names a next cursor, the next page is asked for first
//! ([`State::Waiting`]) and this one is checked on the next tick, after the callback has returned
//! and the request is on its way, so the control plane reads page N+1 while this VM checks page
//! N. An answer that arrives before that tick checks the waiting page first. If the check refuses
//! the page or starts the walk over, the answer asked for ahead is dropped.

use crate::config::ChangesPage;
use crate::plugin::ControlPlane;
use crate::published::{read_head, touch, valid_next_cursor, Rejection, Step, Update};
use crate::store::{SharedStore, POLLER_KEY};

/// A poller whose heartbeat is older than this is replaced.
pub const POLLER_LEASE_S: u64 = 5;
/// Tick period in control-plane mode (election, retries, heartbeats).
pub const TICK_MS: u64 = 250;
/// Tick period while a page waits to be checked.
pub const FAST_TICK_MS: u64 = 1;
/// First backoff after a failed fetch; doubles up to `max_backoff_ms`.
pub const FIRST_BACKOFF_MS: u64 = 250;

/// The host's clock.
pub trait Clock {
    /// Wall-clock time in microseconds since the Unix epoch.
    fn now_us(&self) -> u64;
}

/// The host calls the poller makes (in Envoy: `dispatch_http_call`, the call's response
/// headers and body, the tick period, logs and stats).
pub trait Dispatch {
    /// Sends `GET request.path` to the control plane; the call's token, or `None` if it could
    /// not be sent. An answer to a token the poller no longer waits for is ignored.
    fn send(&mut self, request: &Request) -> Option<u32>;
    /// The `:status` of the answer being handled (empty after a timeout or a reset).
    fn status(&mut self) -> Vec<u8>;
    /// The body of the answer being handled.
    fn body(&mut self) -> Vec<u8>;
    /// Sets the tick period.
    fn tick_every(&mut self, ms: u64);
    /// Something to log or count.
    fn report(&mut self, event: Event);
}

/// One request of the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `<path>?since=..&limit=..[&after=..][&known=..&wait=..][&edge=..][&region=..]`.
    pub path: String,
    pub since: u64,
    pub after: String,
    /// The version in force, on a long poll.
    pub known: Option<u64>,
}

/// What happened, for logs and stats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Seconds since the control plane was last heard from (each tick, while a head exists).
    Age(u64),
    /// A request is being sent.
    Fetch,
    /// Shared data refused the update's state.
    StateRefused,
    /// A new version is in force.
    Published(Finished),
    /// The free slot is complete at the version in force.
    WarmedUp(Finished),
    /// 304: nothing changed.
    NotModified,
    /// 410: the control plane cannot list the changes since the slot's version.
    Gone,
    /// Any other status (empty: a timeout or a reset).
    FetchFailed(Vec<u8>),
    /// A page was refused (or another VM published meanwhile: [`Rejection::Superseded`]).
    Rejected(Rejection),
    /// A failure that backs off (counted as a fetch error).
    Failed,
}

/// How loud an event's log line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Event {
    /// The event's log line, if it has one (none names a secret: versions, counts, statuses
    /// and config error paths only).
    pub fn log_line(&self) -> Option<(Level, String)> {
        let line = |level, text: &str| Some((level, text.to_owned()));
        match self {
            Event::Age(_) | Event::Fetch | Event::Failed | Event::NotModified => None,
            Event::StateRefused => line(
                Level::Error,
                "shared data refused the config update's state; retrying",
            ),
            Event::Published(f) => f.line(&format!(
                "config version {} published from the control plane",
                f.version
            )),
            Event::WarmedUp(f) => f.line(&format!("config slot warmed up at version {}", f.version)),
            Event::Gone => line(
                Level::Warn,
                "the control plane cannot list changes since the edge's version; fetching everything",
            ),
            Event::FetchFailed(status) => Some((
                Level::Warn,
                format!(
                    "control plane fetch failed: status {:?}",
                    String::from_utf8_lossy(status)
                ),
            )),
            Event::Rejected(Rejection::NotNewer { offered, in_force }) => Some((
                Level::Warn,
                format!("config version {offered} rejected: not newer than {in_force} in force"),
            )),
            Event::Rejected(Rejection::Invalid(e)) => Some((
                Level::Warn,
                format!("config from the control plane rejected: {e}; the version in force stays"),
            )),
            Event::Rejected(Rejection::Store) => line(
                Level::Error,
                "config could not be written to shared data; the version in force stays",
            ),
            Event::Rejected(Rejection::Superseded) => line(
                Level::Info,
                "another VM published a config meanwhile; starting over",
            ),
        }
    }
}

/// A completed update, for the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub version: u64,
    pub pages: u64,
    pub records: u64,
    pub emptied: u64,
    /// From the update's first page to its end.
    pub ms: u64,
    pub both_slots: bool,
}

impl Finished {
    fn line(&self, what: &str) -> Option<(Level, String)> {
        let both = if self.both_slots { ", both slots" } else { "" };
        Some((
            Level::Info,
            format!(
                "{what} ({} pages, {} records written, {} Bearer entries emptied, {} ms{both})",
                self.pages, self.records, self.emptied, self.ms
            ),
        ))
    }
}

/// Where the poller is.
// One per VM, moved only between its own states: boxing the update would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Default)]
pub enum State {
    /// Nothing under way: the next tick of the elected VM begins an update.
    #[default]
    Idle,
    /// A failure: nothing is asked before `retry_at_ms`.
    Backoff { retry_at_ms: u64 },
    /// A long poll was answered 304: the next tick asks again, for the same update.
    NotModified(Update),
    /// A request for `update`'s next page is out as `token`.
    Fetching { update: Update, token: u32 },
    /// `page` waits to be checked; the request that follows it is already out as `token`.
    Waiting {
        update: Update,
        page: ChangesPage,
        token: u32,
    },
}

/// The state and what survives a state: consecutive failures, the update's start, the tick
/// period.
#[derive(Default)]
pub struct Poller {
    state: State,
    failures: u32,
    /// When the update's first page arrived (a long poll's wait is not part of the update).
    started_us: u64,
    /// The tick period is [`FAST_TICK_MS`] (a page is waiting).
    fast_tick: bool,
}

/// What the poller works with.
pub struct Env<'a> {
    pub store: &'a dyn SharedStore,
    pub vm_id: u64,
    pub control_plane: &'a ControlPlane,
    pub clock: &'a dyn Clock,
    pub dispatch: &'a mut dyn Dispatch,
}

impl Env<'_> {
    fn now_s(&self) -> u64 {
        self.clock.now_us() / 1_000_000
    }

    /// Claims or refreshes the poller role; true if this VM holds it.
    fn elect(&self) -> bool {
        elect(self.store, self.vm_id, self.now_s())
    }
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

/// Claims or refreshes the poller role for `me` at `now_s`; true if `me` holds it.
pub fn elect(store: &dyn SharedStore, me: u64, now_s: u64) -> bool {
    let (cas, holder) = match store.get(POLLER_KEY) {
        Ok(Some((bytes, cas))) => (cas, decode_claim(&bytes)),
        Ok(None) => (store.absent_cas(), None),
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
    store.set(POLLER_KEY, &value, cas).is_ok()
}

/// The backoff after `failures` consecutive failures: `FIRST_BACKOFF_MS` doubling, at most
/// `max_ms`, with jitter in `[base/2, base*3/2)` from `seed` (this VM's id and the clock).
pub fn backoff_ms(failures: u32, max_ms: u64, vm_id: u64, now_us: u64) -> u64 {
    let base = FIRST_BACKOFF_MS
        .saturating_mul(1u64 << failures.saturating_sub(1).min(16))
        .min(max_ms);
    let seed = vm_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ now_us;
    base / 2 + seed % base.max(1)
}

impl Poller {
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Every tick on every VM: checks a waiting page, reports the config's age, keeps (or
    /// claims) the poller role, and asks for the next page when nothing is out and no backoff
    /// holds.
    pub fn on_tick(&mut self, env: &mut Env<'_>) {
        if self.fast_tick {
            // Back to the usual period, whether the page waited for this tick or an answer
            // that came first already checked it.
            env.dispatch.tick_every(TICK_MS);
            self.fast_tick = false;
        }
        if matches!(self.state, State::Waiting { .. }) {
            if env.elect() {
                self.check_waiting(env);
            } else {
                self.state = State::Idle;
            }
        }
        self.tick(env);
    }

    /// The answer to call `token` (or its timeout or reset), then a tick (so that the long poll
    /// is asked again at once).
    pub fn on_response(&mut self, env: &mut Env<'_>, token: u32) {
        self.response(env, token);
        self.tick(env);
    }

    fn tick(&mut self, env: &mut Env<'_>) {
        let now_us = env.clock.now_us();
        if let Some(head) = read_head(env.store) {
            let age = (now_us / 1_000_000).saturating_sub(head.contacted_at_s);
            env.dispatch.report(Event::Age(age));
        }
        if !env.elect() {
            return;
        }
        let (update, long_poll) = match std::mem::take(&mut self.state) {
            State::Backoff { retry_at_ms } if now_us / 1000 < retry_at_ms => {
                self.state = State::Backoff { retry_at_ms };
                return;
            }
            State::NotModified(update) => (update, true),
            State::Idle | State::Backoff { .. } => {
                // An empty free slot is filled at the version in force right away, so that the
                // first change after start travels alone instead of refetching everything.
                let warm_up = Update::free_slot_is_empty(env.store);
                let begun = if warm_up {
                    Update::warm_up(env.store)
                } else {
                    Update::begin(env.store)
                };
                match begun {
                    Ok(update) => (update, !warm_up),
                    Err(_) => {
                        env.dispatch.report(Event::StateRefused);
                        self.failed(env);
                        return;
                    }
                }
            }
            busy @ (State::Fetching { .. } | State::Waiting { .. }) => {
                self.state = busy;
                return;
            }
        };
        self.send(env, update, long_poll);
    }

    /// Asks for the page `update` needs next (`long_poll`: the first one, held by the control
    /// plane until something changes).
    fn send(&mut self, env: &mut Env<'_>, update: Update, long_poll: bool) {
        let (since, after) = update.request();
        let after = after.to_owned();
        let known = update.in_force().map(|h| h.version).filter(|_| long_poll);
        if let Some(token) = self.fetch(env, since, &after, known) {
            self.state = State::Fetching { update, token };
        }
    }

    /// Sends `GET <path>?since=&limit=[&after=][&known=&wait=][&edge=][&region=]`; `None` (and
    /// the state set) if it was not sent.
    fn fetch(
        &mut self,
        env: &mut Env<'_>,
        since: u64,
        after: &str,
        known: Option<u64>,
    ) -> Option<u32> {
        let cp = env.control_plane;
        let mut path = format!("{}?since={since}&limit={}", cp.path, cp.page_size);
        if !after.is_empty() {
            // Only a SID ([A-Za-z0-9_-], at most 64 bytes) goes into the path: nothing to escape.
            // Update never names anything else (a page whose next cursor is not one is refused);
            // this keeps it so whatever changes there.
            if !valid_next_cursor("", after) {
                let e = crate::compile::ConfigError {
                    path: "next".into(),
                    message: "invalid next cursor: not a SID".into(),
                };
                self.rejected(env, Rejection::Invalid(e));
                return None;
            }
            path.push_str("&after=");
            path.push_str(after);
        }
        if let Some(known) = known {
            path.push_str(&format!("&known={known}&wait={}", cp.wait_s));
        }
        // Checked at load (plugin::valid_edge_name, region::valid_region): nothing to escape.
        if let Some(id) = &cp.edge_id {
            path.push_str(&format!("&edge={id}"));
            if let Some(region) = &cp.region {
                path.push_str(&format!("&region={region}"));
            }
        }
        env.dispatch.report(Event::Fetch);
        let request = Request {
            path,
            since,
            after: after.to_owned(),
            known,
        };
        let token = env.dispatch.send(&request);
        if token.is_none() {
            self.failed(env);
        }
        token
    }

    /// Checks and writes the page that waits while its successor is fetched.
    fn check_waiting(&mut self, env: &mut Env<'_>) {
        let State::Waiting {
            mut update,
            page,
            token,
        } = std::mem::take(&mut self.state)
        else {
            return;
        };
        // What the fetch out asks for (it was sent ahead of this check).
        let ahead = update.request_after(&page);
        let outcome = update.apply_page(env.store, &page, env.now_s());
        drop(page);
        self.applied(env, update, outcome, ahead.map(|a| (a, token)));
    }

    /// Goes on after a page was checked (and, if acceptable, written). `ahead`: the request a
    /// fetch already out makes, and its token.
    fn applied(
        &mut self,
        env: &mut Env<'_>,
        update: Update,
        outcome: Result<Step, Rejection>,
        ahead: Option<((u64, String), u32)>,
    ) {
        let now_s = env.now_s();
        match outcome {
            Ok(Step::More) => {
                touch(env.store, now_s);
                let (since, after) = update.request();
                match ahead {
                    // The page asked for ahead is the one needed: its answer is on its way.
                    Some(((s, a), token)) if s == since && a == after => {
                        self.state = State::Fetching { update, token };
                    }
                    // Nothing was asked ahead, or the walk started over: ask for what it needs
                    // (an answer to the earlier request is dropped).
                    _ => self.send(env, update, false),
                }
            }
            Ok(step @ (Step::Ready(v) | Step::Done(v))) => {
                if step == Step::Ready(v) {
                    touch(env.store, now_s);
                }
                let finished = Finished {
                    version: v,
                    pages: update.pages,
                    records: update.records,
                    emptied: update.emptied,
                    ms: env.clock.now_us().saturating_sub(self.started_us) / 1000,
                    both_slots: update.fills_both_slots(),
                };
                env.dispatch.report(if step == Step::Done(v) {
                    Event::Published(finished)
                } else {
                    Event::WarmedUp(finished)
                });
                self.state = State::Idle;
                self.failures = 0;
            }
            Err(e) => self.rejected(env, e),
        }
    }

    fn response(&mut self, env: &mut Env<'_>, token: u32) {
        let awaited = match &self.state {
            State::Fetching { token: t, .. } | State::Waiting { token: t, .. } => *t == token,
            _ => false,
        };
        if !awaited {
            return;
        }
        if !env.elect() {
            // Another VM took over while this fetch was out: it owns the free slot now.
            self.state = State::Idle;
            return;
        }
        if let State::Waiting { .. } = self.state {
            // This answer came before the tick that checks the page before it: check that one
            // first (if it is refused, or the walk went elsewhere, this answer is dropped).
            self.check_waiting(env);
        }
        let update = match std::mem::take(&mut self.state) {
            State::Fetching { update, token: t } if t == token => update,
            other => {
                self.state = other;
                return;
            }
        };
        let now_s = env.now_s();
        match env.dispatch.status().as_slice() {
            b"200" => {
                let body = env.dispatch.body();
                if update.pages == 0 {
                    self.started_us = env.clock.now_us();
                }
                let page = match Update::parse(&body) {
                    Ok(page) => page,
                    Err(e) => return self.rejected(env, e),
                };
                drop(body);
                if let Some((since, after)) = update.request_after(&page) {
                    // Ask for the next page now and check this one on the next tick (right
                    // after this callback returns and the request is on its way).
                    if let Some(token) = self.fetch(env, since, &after, None) {
                        self.state = State::Waiting {
                            update,
                            page,
                            token,
                        };
                        if !self.fast_tick {
                            env.dispatch.tick_every(FAST_TICK_MS);
                            self.fast_tick = true;
                        }
                    }
                    return;
                }
                let mut update = update;
                let outcome = update.apply_page(env.store, &page, now_s);
                drop(page);
                self.applied(env, update, outcome, None);
            }
            b"410" => {
                env.dispatch.report(Event::Gone);
                let mut update = update;
                match update.start_over(env.store) {
                    Ok(()) => self.send(env, update, false),
                    Err(_) => self.failed(env),
                }
            }
            b"304" => {
                touch(env.store, now_s);
                env.dispatch.report(Event::NotModified);
                self.failures = 0;
                self.state = State::NotModified(update);
            }
            other => {
                env.dispatch.report(Event::FetchFailed(other.to_vec()));
                self.failed(env);
            }
        }
    }

    /// Drops the update under way after a refused page.
    fn rejected(&mut self, env: &mut Env<'_>, e: Rejection) {
        let backs_off = e != Rejection::Superseded;
        env.dispatch.report(Event::Rejected(e));
        if backs_off {
            self.failed(env);
        } else {
            self.state = State::Idle;
        }
    }

    /// Drops the update under way and backs off.
    fn failed(&mut self, env: &mut Env<'_>) {
        env.dispatch.report(Event::Failed);
        self.failures = self.failures.saturating_add(1);
        let now_us = env.clock.now_us();
        let wait = backoff_ms(
            self.failures,
            env.control_plane.max_backoff_ms,
            env.vm_id,
            now_us,
        );
        self.state = State::Backoff {
            retry_at_ms: now_us / 1000 + wait,
        };
    }
}

#[cfg(test)]
mod tests;
