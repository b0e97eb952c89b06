//! Root and HTTP contexts: host calls in, [`keygate_core::view`] and [`keygate_core::gate`] in the
//! middle, host calls out.

use std::rc::Rc;
use std::sync::Arc;

use keygate_core::compile::Catalog;
use keygate_core::decision::Allow;
use keygate_core::fleet::lease::{parse_fleet_limits, FleetMode};
use keygate_core::gate::{self, GateStats, InflightTicket};
use keygate_core::headers::parse_header_map;
use keygate_core::poller::{Level, Poller, TICK_MS};
use keygate_core::ratelimit::Counters;
use keygate_core::stats::Stat;
use keygate_core::view::{denial_reply, refusal, Answer, Source};
use keygate_core::RequestHead;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

use crate::fleet::{self, Fleet, FleetState, Start};
use crate::host::{header_map, log, now_us, RequestHost, VmState};
use crate::poller;
use crate::request::{forward, remove, send, set_each};
use crate::usage;

/// The root's tick when fleet leases are on: how soon a lease running below half is asked for
/// ahead (and one lost with the request that asked for it asked again).
const FLEET_TICK_MS: u64 = 20;

pub struct KeygateRoot {
    context_id: u32,
    source: Rc<Source>,
    /// Fleet limits, shared with the HTTP contexts.
    fleet: Rc<Fleet>,
    /// Set when the VM starts.
    vm: Option<Rc<VmState>>,
    poller: Poller,
    /// Sends the process's usage batches while this VM is the elected poller.
    usage: keygate_core::usage::Sender,
}

impl KeygateRoot {
    pub fn new(context_id: u32) -> KeygateRoot {
        KeygateRoot {
            context_id,
            source: Rc::default(),
            fleet: Rc::default(),
            vm: None,
            poller: Poller::default(),
            usage: keygate_core::usage::Sender::default(),
        }
    }

    fn vm(&mut self) -> Rc<VmState> {
        self.vm
            .get_or_insert_with(|| Rc::new(VmState::start()))
            .clone()
    }
}

impl Context for KeygateRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        // Then long-poll again right away (nothing is asked while backing off).
        if let (Some(vm), Source::Published(p)) = (&self.vm, &*self.source) {
            let cp = &p.control_plane;
            if usage::on_response(vm, cp, &mut self.usage, token_id) {
                return;
            }
            let poller = &mut self.poller;
            poller::run(vm, cp, body_size, |env| poller.on_response(env, token_id));
        }
    }

    /// The answer to a lease asked for on a tick.
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, size: usize) {
        if let Some(vm) = &self.vm {
            fleet::on_answer(
                vm,
                &self.fleet,
                self.context_id,
                token_id,
                status_code,
                size,
            );
        }
    }
}

impl RootContext for KeygateRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        let _ = self.vm();
        true
    }

    fn on_tick(&mut self) {
        let Some(vm) = self.vm.clone() else {
            return;
        };
        fleet::on_tick(&vm, &self.fleet, self.context_id);
        let now = now_us();
        // What this VM counted since the last tick (at most FLUSH_MS ago).
        vm.metrics.flush();
        // The poller and the heartbeat at their own period (the fleet's tick may be shorter).
        if !vm.ticks.base_due(now) {
            return;
        }
        if let Source::Published(p) = &*self.source {
            let poller = &mut self.poller;
            poller::run(&vm, &p.control_plane, 0, |env| poller.on_tick(env));
            // This VM's usage counts into shared data; the elected poller sends the batches.
            usage::on_tick(&vm, &p.control_plane, &mut self.usage);
        }
        // Refresh this VM's concurrency leases for accounts with slots here (and give back the
        // idle ones no request took), and give back what expired rate leases left unspent.
        let mut counters = Counters::default();
        let mut retries = || self.source.max_cas_retries(&*vm);
        let id = vm.vm_id.get();
        (vm.local.slots).heartbeat(&mut retries, &*vm, id, now, &mut counters);
        if !vm.local.rates.is_empty() {
            let retries = self.source.max_cas_retries(&*vm);
            // Every lease that would expire before the tick after next ends now.
            let horizon_us = 2 * TICK_MS * 1000;
            (vm.local.rates).sweep(&*vm, id, now, horizon_us, retries, &mut counters);
        }
        vm.metrics.record(counters.stats());
    }

    fn on_configure(&mut self, size: usize) -> bool {
        let vm = self.vm();
        let read = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size);
        let bytes = match read {
            Ok(b) => b.unwrap_or_default(),
            Err(status) => {
                let msg = format!("cannot read plugin configuration: {status:?}");
                log(Level::Error, &msg);
                return false;
            }
        };
        let fleet_limits = match parse_fleet_limits(&bytes) {
            Ok(f) => f,
            Err(e) => {
                log(Level::Error, &format!("config rejected: {e}"));
                vm.metrics.bump(Stat::ConfigRejected);
                vm.metrics.flush();
                return false;
            }
        };
        let configured = self.source.configure(&bytes);
        let (level, line) = &configured.log;
        log(*level, line);
        vm.metrics.record(configured.stats());
        // A rejected configuration may be the VM's last word.
        vm.metrics.flush();
        if let Some(source) = configured.source {
            // Leases are asked for ahead, and asks lost with their request asked again, on the
            // fleet's tick.
            let lease_tick = (fleet_limits.as_ref())
                .is_some_and(|f| f.mode == FleetMode::Lease)
                .then_some(FLEET_TICK_MS);
            vm.ticks.set_base(configured.tick_ms);
            vm.ticks.set_fleet(lease_tick);
            // Usage is counted where someone sends it: in control-plane mode.
            vm.local
                .usage
                .enable(matches!(source, Source::Published(_)));
            self.source = Rc::new(source);
            *self.fleet.borrow_mut() = fleet_limits.map(FleetState::new);
        }
        configured.accepted
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(KeygateHttp {
            context_id,
            source: self.source.clone(),
            vm: self.vm.clone()?,
            fleet: self.fleet.clone(),
            ticket: None,
            response_headers: Vec::new(),
            judged_by: None,
            waiting: false,
            asked: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct KeygateHttp {
    context_id: u32,
    source: Rc<Source>,
    fleet: Rc<Fleet>,
    vm: Rc<VmState>,
    /// A concurrency slot held until the stream ends.
    ticket: Option<InflightTicket>,
    /// Headers for the response of an allowed request.
    response_headers: Vec<(&'static str, String)>,
    /// The catalogue that judged the request (its identity header names are stripped from
    /// request trailers too).
    judged_by: Option<Arc<Catalog>>,
    /// Paused for its fleet limits (see [`fleet`]): what it needs later is left in the VM's
    /// fleet state when it is resumed or refused.
    waiting: bool,
    /// This context sent asks for leases (their answers come to it).
    asked: bool,
}

impl Context for KeygateHttp {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, size: usize) {
        fleet::on_answer(
            &self.vm,
            &self.fleet,
            self.context_id,
            token_id,
            status_code,
            size,
        );
        self.settle();
    }
}

impl KeygateHttp {
    /// Takes what the fleet state left for this request once it stopped waiting.
    fn settle(&mut self) {
        if !self.waiting {
            return;
        }
        let resolved =
            (self.fleet.borrow_mut().as_mut()).and_then(|f| f.resolved.remove(&self.context_id));
        if let Some(r) = resolved {
            self.waiting = false;
            self.ticket = r.ticket;
            self.response_headers = r.response_headers;
        }
    }
}

impl HttpContext for KeygateHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let raw = header_map(MapType::HttpRequestHeaders);
        let pairs = parse_header_map(&raw).unwrap_or_default();
        // One clock read serves the staleness check and the gate.
        let now = now_us();
        let view = match self.source.view(&*self.vm, now) {
            Ok(view) => view,
            Err(reason) => {
                self.vm.metrics.bump(Stat::Denied(reason));
                return send(&refusal(reason));
            }
        };
        self.vm.metrics.record(view.stats());
        let host = RequestHost::at(&self.vm, now);
        let mut stats = GateStats::default();
        let verdict = gate::evaluate(&view, &RequestHead::from_pairs(&pairs), &host, &mut stats);
        self.vm.metrics.record(stats.stats());
        let cat = view.catalog().clone();
        let action = match view.answer(verdict) {
            Answer::Deny { reason, reply } => {
                self.vm.metrics.bump(Stat::Denied(reason));
                // The request stops here, but access logs and later filters still see its
                // headers: never leave a client-chosen identity on it.
                remove(MapType::HttpRequestHeaders, &pairs, &cat, true);
                send(&reply)
            }
            Answer::Allow {
                allow,
                ticket,
                response_headers,
                fleet: Some(hold),
            } => {
                let start = fleet::start(
                    &self.vm,
                    &self.fleet,
                    self.context_id,
                    now,
                    hold,
                    &allow,
                    &cat,
                    &raw,
                    &ticket,
                    &response_headers,
                );
                match start {
                    Start::Go => {
                        usage::fleet_decided(&self.vm, &allow, now, None);
                        self.admit(&cat, &pairs, &allow, ticket, response_headers)
                    }
                    Start::Deny(denial) => {
                        usage::fleet_decided(&self.vm, &allow, now, Some(denial.reason));
                        self.vm.metrics.bump(Stat::Denied(denial.reason));
                        remove(MapType::HttpRequestHeaders, &pairs, &cat, true);
                        send(&denial_reply(&denial, cat.www_authenticate(), None))
                    }
                    Start::Wait => {
                        self.waiting = true;
                        self.asked = true;
                        Action::Pause
                    }
                }
            }
            Answer::Allow {
                allow,
                ticket,
                response_headers,
                fleet: None,
            } => self.admit(&cat, &pairs, &allow, ticket, response_headers),
        };
        self.judged_by = Some(cat);
        action
    }

    /// Removes client-sent identity headers and their `_` look-alikes from the request trailers
    /// (an upstream that merges trailers into headers must not see a client-chosen identity),
    /// and an `Authorization` trailer unless `forward_authorization` is on.
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.settle();
        if let Some(cat) = &self.judged_by {
            let raw = header_map(MapType::HttpRequestTrailers);
            let pairs = parse_header_map(&raw).unwrap_or_default();
            let map = MapType::HttpRequestTrailers;
            remove(map, &pairs, cat, cat.forward_authorization());
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.settle();
        let headers = self.response_headers.iter().map(|(n, v)| (*n, &**v));
        set_each(MapType::HttpResponseHeaders, headers);
        Action::Continue
    }

    fn on_log(&mut self) {
        if self.waiting || self.asked {
            // Still waiting: it gives back what it took; either way its asks die with it.
            if let Some(r) = fleet::on_end(&self.vm, &self.fleet, self.context_id) {
                self.ticket = r.ticket;
            }
            self.waiting = false;
        }
        // The stream is over, however it ended: give the concurrency slot back.
        if let Some(ticket) = self.ticket.take() {
            let mut counters = Counters::default();
            let slots = &self.vm.local.slots;
            let id = self.vm.vm_id.get();
            slots.release(&ticket, &*self.vm, id, &now_us, &mut counters);
            self.vm.metrics.record(counters.stats());
        }
    }
}

impl KeygateHttp {
    /// Forwards an admitted request.
    fn admit(
        &mut self,
        cat: &Catalog,
        pairs: &[(&[u8], &[u8])],
        allow: &Allow,
        ticket: Option<InflightTicket>,
        response_headers: Vec<(&'static str, String)>,
    ) -> Action {
        forward(cat, pairs, allow.identity());
        if let Some(ticket) = &ticket {
            self.vm.local.slots.hold(ticket);
        }
        self.ticket = ticket;
        self.response_headers = response_headers;
        self.vm.metrics.bump(Stat::Allowed);
        Action::Continue
    }
}
