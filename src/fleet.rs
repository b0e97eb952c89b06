//! Fleet limits in the glue: the VM's leases ([`keygate_core::fleet::lease`]) asked for with
//! `dispatch_grpc_call`, and the requests waiting for them.
//!
//! A request whose fleet limits this VM has no lease for is paused. The context that sends an
//! ask receives its answer (the SDK routes a call's answer to the context that made it); on
//! every answer, and on the root's tick, the waiting requests of the whole VM claim again: each
//! one is resumed, refused or left waiting from whichever context is running, with the host's
//! effective context switched to it for its own host calls and switched back after. A waiting
//! request remembers nothing in its own context: what it needs later (its concurrency ticket,
//! response headers, the catalogue that judged it) is left in [`FleetState::resolved`] for it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use keygate_core::compile::Catalog;
use keygate_core::decision::Allow;
use keygate_core::fleet::lease::{
    read_answer, request, After, Answer, Ask, Claim, FleetLimits, FleetMode, Leases, Need,
};
use keygate_core::fleet::{rls, Subject};
use keygate_core::gate::{self, Denial, FleetHold, InflightTicket};
use keygate_core::headers::parse_header_map;
use keygate_core::poller::Level;
use keygate_core::ratelimit::Counters;
use keygate_core::stats::Stat;
use keygate_core::view::denial_reply;
use prost::Message;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};

use crate::host::{log, now_us, RequestHost, VmState};
use crate::request::{forward, remove, send};

/// An allowed request waiting for its fleet limits.
pub struct Waiter {
    pub context_id: u32,
    pub since_us: u64,
    pub hold: Box<FleetHold>,
    pub allow: Allow,
    pub catalog: Arc<Catalog>,
    /// The request headers as read (to forward them once admitted).
    pub raw_headers: Vec<u8>,
    pub ticket: Option<InflightTicket>,
    pub response_headers: Vec<(&'static str, String)>,
}

/// What a request that waited left for its own context.
pub struct Resolved {
    pub ticket: Option<InflightTicket>,
    pub response_headers: Vec<(&'static str, String)>,
}

/// An ask on its way: what its answer is for.
struct Call {
    ask: Ask,
    sent_us: u64,
    period_us: u64,
}

/// The VM's fleet-limit state (none without a `fleet_limits` section), shared by its root and
/// HTTP contexts.
pub type Fleet = RefCell<Option<FleetState>>;

/// The VM's fleet-limit state for the plugin configuration in force.
pub struct FleetState {
    pub cfg: FleetLimits,
    leases: Leases,
    /// `dispatch_grpc_call`'s upstream: a serialized `GrpcService` naming the cluster.
    upstream: String,
    calls: HashMap<u32, Call>,
    pub waiters: Vec<Waiter>,
    pub resolved: HashMap<u32, Resolved>,
}

impl FleetState {
    pub fn new(cfg: FleetLimits) -> FleetState {
        let service = rls::GrpcService {
            envoy_grpc: Some(rls::EnvoyGrpc {
                cluster_name: cfg.cluster.clone(),
            }),
        };
        // Short cluster names encode to UTF-8 (lengths below 128); otherwise Envoy takes the
        // plain name as a cluster name.
        let upstream =
            String::from_utf8(service.encode_to_vec()).unwrap_or_else(|_| cfg.cluster.clone());
        FleetState {
            leases: Leases::new(&cfg),
            cfg,
            upstream,
            calls: HashMap::new(),
            waiters: Vec::new(),
            resolved: HashMap::new(),
        }
    }
}

/// What becomes of an allowed request with fleet limits, right away.
pub enum Start {
    /// Go on (admitted from this VM's leases, counted by Envoy's filter, or let through by the
    /// failure mode).
    Go,
    /// Refuse.
    Deny(Denial),
    /// Paused: it is a waiter now.
    Wait,
}

/// A request allowed by the local tier that owes the fleet `hold`: claim it from the leases,
/// or pause it (sending the asks it needs from context `context_id`). On a refusal, what the
/// request took locally (its limits, its concurrency slot) is given back here.
#[allow(clippy::too_many_arguments)]
pub fn start(
    vm: &VmState,
    cell: &Fleet,
    context_id: u32,
    now: u64,
    hold: Box<FleetHold>,
    allow: &Allow,
    catalog: &Arc<Catalog>,
    raw_headers: &[u8],
    ticket: &Option<InflightTicket>,
    response_headers: &[(&'static str, String)],
) -> Start {
    let outcome = {
        let mut guard = cell.borrow_mut();
        match guard.as_mut() {
            // Fleet limits with no service configured: the limiter cannot answer.
            None => hold.failed().map_or(Start::Go, Start::Deny),
            Some(fleet) if fleet.cfg.mode == FleetMode::Envoy => Start::Go,
            Some(fleet) => match fleet.leases.claim(&hold.needs, now) {
                Claim::Admitted => Start::Go,
                Claim::Refused {
                    kind,
                    limit,
                    retry_after_s,
                } => Start::Deny(hold.refused(kind, limit, retry_after_s)),
                Claim::Wait(asks) => {
                    let mut sent = true;
                    for ask in asks {
                        let period_us = period_of(&hold.needs, &ask);
                        sent = sent && send_ask(vm, fleet, ask, period_us, now, context_id);
                    }
                    if sent {
                        vm.metrics.bump(Stat::FleetWaits);
                        fleet.waiters.push(Waiter {
                            context_id,
                            since_us: now,
                            hold,
                            allow: allow.clone(),
                            catalog: catalog.clone(),
                            raw_headers: raw_headers.to_vec(),
                            ticket: ticket.clone(),
                            response_headers: response_headers.to_vec(),
                        });
                        return Start::Wait;
                    }
                    hold.failed().map_or(Start::Go, Start::Deny)
                }
            },
        }
    };
    if let Start::Deny(_) = &outcome {
        let host = RequestHost::at(vm, now);
        let mut counters = Counters::default();
        hold.give_back(&host, &mut counters);
        if let Some(ticket) = ticket {
            gate::release(ticket, &host, &mut counters);
        }
        vm.metrics.record(counters.stats());
    }
    outcome
}

/// The period of the limit `ask` is for.
fn period_of(needs: &[Need], ask: &Ask) -> u64 {
    needs
        .iter()
        .find(|n| n.subject == ask.subject)
        .map_or(1_000_000, |n| n.limit.rate.period_us)
}

/// Sends `ask` from the current context; false if the host refused to send it.
fn send_ask(
    vm: &VmState,
    fleet: &mut FleetState,
    ask: Ask,
    period_us: u64,
    now: u64,
    owner: u32,
) -> bool {
    let message = request(&fleet.cfg.domain, &ask).encode_to_vec();
    let sent = hostcalls::dispatch_grpc_call(
        &fleet.upstream,
        rls::SERVICE,
        rls::METHOD,
        Vec::new(),
        Some(&message),
        Duration::from_millis(fleet.cfg.timeout_ms),
    );
    match sent {
        Ok(token) => {
            vm.metrics.bump(Stat::FleetCalls);
            fleet.leases.sent(&ask, now, owner);
            fleet.calls.insert(
                token,
                Call {
                    ask,
                    sent_us: now,
                    period_us,
                },
            );
            true
        }
        Err(status) => {
            vm.metrics.bump(Stat::FleetErrors);
            let msg = format!(
                "fleet limits: cannot call the rate-limit service on cluster {:?}: {status:?}",
                fleet.cfg.cluster
            );
            log(Level::Error, &msg);
            false
        }
    }
}

/// The answer to call `token` (gRPC status `status`, body of `size` bytes), received by the
/// context `current`.
pub fn on_answer(vm: &VmState, cell: &Fleet, current: u32, token: u32, status: u32, size: usize) {
    let now = now_us();
    let failed_subject = {
        let mut guard = cell.borrow_mut();
        let Some(fleet) = guard.as_mut() else {
            return;
        };
        let Some(call) = fleet.calls.remove(&token) else {
            return;
        };
        let answer = if status == 0 {
            hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
                .ok()
                .flatten()
                .and_then(|body| rls::RateLimitResponse::decode(&body[..]).ok())
                .map_or(Answer::Failed, |r| read_answer(&r))
        } else {
            Answer::Failed
        };
        if let Answer::Granted { .. } = answer {
            vm.metrics
                .record([(Stat::FleetHitsLeased, u64::from(call.ask.hits))]);
        }
        if answer == Answer::Failed {
            vm.metrics.bump(Stat::FleetErrors);
        }
        let after = fleet.leases.answered(
            &call.ask.subject,
            call.ask.hits,
            call.sent_us,
            call.period_us,
            answer,
            now,
        );
        match after {
            After::Claim => None,
            After::AskAgain(ask) => {
                let subject = ask.subject.clone();
                let sent = send_ask(vm, fleet, ask, call.period_us, now, current);
                (!sent).then_some(subject)
            }
            After::Failed => Some(call.ask.subject),
        }
    };
    drive(vm, cell, current, now, failed_subject.as_ref());
}

/// The root's tick: leases running below half are asked for ahead; waiters whose ask was lost
/// (its sender ended) ask again from the root, and any waiting longer than twice the timeout
/// gets the failure mode.
pub fn on_tick(vm: &VmState, cell: &Fleet, root_id: u32) {
    let now = now_us();
    let waiting = {
        let mut guard = cell.borrow_mut();
        let Some(fleet) = guard.as_mut() else {
            return;
        };
        // Leases running below half, asked for ahead from the root (which outlives the
        // answer): the requests spend the rest meanwhile.
        for (ask, period_us) in fleet.leases.due(now) {
            let subject = ask.subject.clone();
            if !send_ask(vm, fleet, ask, period_us, now, root_id) {
                fleet.leases.forget(&subject);
            }
        }
        // Answers that will never come (their context ended and Envoy cancelled the call).
        let forget_after = fleet.leases.timeout_us.saturating_mul(10);
        (fleet.calls).retain(|_, c| now.saturating_sub(c.sent_us) < forget_after);
        !fleet.waiters.is_empty()
    };
    if waiting {
        drive(vm, cell, root_id, now, None);
    }
}

/// The context `context_id` ended: if it was waiting, it gives back what it took; the asks it
/// sent will not be answered.
pub fn on_end(vm: &VmState, cell: &Fleet, context_id: u32) -> Option<Resolved> {
    let mut guard = cell.borrow_mut();
    let fleet = guard.as_mut()?;
    fleet.leases.orphan(context_id);
    if let Some(i) = fleet
        .waiters
        .iter()
        .position(|w| w.context_id == context_id)
    {
        let w = fleet.waiters.remove(i);
        drop(guard);
        let host = RequestHost::new(vm);
        let mut counters = Counters::default();
        w.hold.give_back(&host, &mut counters);
        if let Some(ticket) = &w.ticket {
            gate::release(ticket, &host, &mut counters);
        }
        vm.metrics.record(counters.stats());
        return None;
    }
    fleet.resolved.remove(&context_id)
}

enum Outcome {
    Go { failed_open: bool },
    Deny(Denial),
}

/// Every waiter claims again (those needing `failed` get the failure mode); each is resumed or
/// refused with the host's effective context switched to it, then back to `current`, which
/// sends the asks still needed.
fn drive(vm: &VmState, cell: &Fleet, current: u32, now: u64, failed: Option<&Subject>) {
    let mut done: Vec<(Waiter, Outcome)> = Vec::new();
    let mut asks: Vec<(Ask, u64)> = Vec::new();
    {
        let mut guard = cell.borrow_mut();
        let Some(fleet) = guard.as_mut() else {
            return;
        };
        let patience = fleet.leases.timeout_us.saturating_mul(2);
        let waiters = std::mem::take(&mut fleet.waiters);
        for w in waiters {
            let fails = failed.is_some_and(|s| w.hold.needs.iter().any(|n| &n.subject == s))
                || now.saturating_sub(w.since_us) > patience;
            if fails {
                let outcome = match w.hold.failed() {
                    Some(d) => Outcome::Deny(d),
                    None => Outcome::Go { failed_open: true },
                };
                done.push((w, outcome));
                continue;
            }
            match fleet.leases.claim(&w.hold.needs, now) {
                Claim::Admitted => done.push((w, Outcome::Go { failed_open: false })),
                Claim::Refused {
                    kind,
                    limit,
                    retry_after_s,
                } => {
                    let d = w.hold.refused(kind, limit, retry_after_s);
                    done.push((w, Outcome::Deny(d)));
                }
                Claim::Wait(more) => {
                    for ask in more {
                        // Mark it sent now so the next waiter does not ask for it too.
                        fleet.leases.sent(&ask, now, current);
                        let period_us = period_of(&w.hold.needs, &ask);
                        asks.push((ask, period_us));
                    }
                    fleet.waiters.push(w);
                }
            }
        }
    }
    for (w, outcome) in done {
        let _ = hostcalls::set_effective_context(w.context_id);
        let resolved = resolve(vm, w, outcome);
        if let Some((id, r)) = resolved {
            if let Some(f) = cell.borrow_mut().as_mut() {
                f.resolved.insert(id, r);
            }
        }
    }
    let _ = hostcalls::set_effective_context(current);
    if asks.is_empty() {
        return;
    }
    let mut lost = Vec::new();
    {
        let mut guard = cell.borrow_mut();
        let Some(fleet) = guard.as_mut() else {
            return;
        };
        for (ask, period_us) in asks {
            let subject = ask.subject.clone();
            if !send_ask(vm, fleet, ask, period_us, now, current) {
                fleet.leases.forget(&subject);
                lost.push(subject);
            }
        }
    }
    for subject in lost {
        drive(vm, cell, current, now, Some(&subject));
    }
}

/// Resumes or refuses waiter `w` (the effective context is its own).
fn resolve(vm: &VmState, w: Waiter, outcome: Outcome) -> Option<(u32, Resolved)> {
    let pairs = parse_header_map(&w.raw_headers).unwrap_or_default();
    match outcome {
        Outcome::Go { failed_open } => {
            forward(&w.catalog, &pairs, w.allow.identity());
            if let Some(ticket) = &w.ticket {
                vm.local.slots.hold(ticket);
            }
            vm.metrics.bump(Stat::Allowed);
            crate::usage::fleet_decided(vm, &w.allow, now_us(), None);
            if failed_open {
                vm.metrics.bump(Stat::StoreFailuresAllowed);
            }
            let _ = hostcalls::resume_http_request();
            Some((
                w.context_id,
                Resolved {
                    ticket: w.ticket,
                    response_headers: w.response_headers,
                },
            ))
        }
        Outcome::Deny(denial) => {
            let host = RequestHost::new(vm);
            let mut counters = Counters::default();
            w.hold.give_back(&host, &mut counters);
            if let Some(ticket) = &w.ticket {
                gate::release(ticket, &host, &mut counters);
            }
            vm.metrics.record(counters.stats());
            vm.metrics.bump(Stat::Denied(denial.reason));
            crate::usage::fleet_decided(vm, &w.allow, now_us(), Some(denial.reason));
            remove(MapType::HttpRequestHeaders, &pairs, &w.catalog, true);
            send(&denial_reply(&denial, w.catalog.www_authenticate(), None));
            Some((
                w.context_id,
                Resolved {
                    ticket: None,
                    response_headers: Vec::new(),
                },
            ))
        }
    }
}
