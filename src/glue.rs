//! Root and HTTP contexts: host calls in, [`keygate_core::decide`] in the middle, host calls out.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use keygate_core::gate::{self, Denial, GateStats, Host, InflightTicket, Verdict};
use keygate_core::headers::parse_header_map;
use keygate_core::ip::parse_client_address;
use keygate_core::ratelimit::{Counters, LimitKind, Quota, SetError, SharedStore, StoreError};
use keygate_core::{compile, CompiledConfig, Identity, Reason, RequestHead};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

/// Seconds a client is told to wait when no config is in force.
const NO_CONFIG_RETRY_AFTER: &str = "5";

fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

/// Counter ids, defined once per VM. A failed definition leaves the id `None` (stat missing, not
/// a crash).
#[derive(Default)]
struct Metrics {
    allowed: Option<u32>,
    denied: [Option<u32>; Reason::ALL.len()],
    config_loaded: Option<u32>,
    config_rejected: Option<u32>,
    config_version: Option<u32>,
    cas_retries: Option<u32>,
    retries_exhausted: Option<u32>,
    garbage_values: Option<u32>,
    store_errors: Option<u32>,
    store_failures_allowed: Option<u32>,
    shadow_limited: [Option<u32>; LimitKind::ALL.len()],
}

impl Metrics {
    fn define() -> Metrics {
        let counter = |name: &str| hostcalls::define_metric(MetricType::Counter, name).ok();
        let mut m = Metrics {
            allowed: counter("keygate.allowed"),
            config_loaded: counter("keygate.config.loaded"),
            config_rejected: counter("keygate.config.rejected"),
            config_version: hostcalls::define_metric(MetricType::Gauge, "keygate.config.version")
                .ok(),
            cas_retries: counter("keygate.ratelimit.cas_retries"),
            retries_exhausted: counter("keygate.ratelimit.retries_exhausted"),
            garbage_values: counter("keygate.ratelimit.garbage_values"),
            store_errors: counter("keygate.ratelimit.store_errors"),
            store_failures_allowed: counter("keygate.ratelimit.store_failures_allowed"),
            ..Metrics::default()
        };
        for (slot, reason) in m.denied.iter_mut().zip(Reason::ALL) {
            *slot = counter(&format!("keygate.denied.{}", reason.code()));
        }
        for (slot, kind) in m.shadow_limited.iter_mut().zip(LimitKind::ALL) {
            *slot = counter(&format!("keygate.ratelimit.shadow_limited.{}", kind.name()));
        }
        m
    }

    fn add(id: Option<u32>, n: u32) {
        if let (Some(id), true) = (id, n > 0) {
            let _ = hostcalls::increment_metric(id, i64::from(n));
        }
    }

    fn counters(&self, c: &Counters) {
        Metrics::add(self.cas_retries, c.cas_retries);
        Metrics::add(self.retries_exhausted, c.retries_exhausted);
        Metrics::add(self.garbage_values, c.garbage_values);
        Metrics::add(self.store_errors, c.store_errors);
    }

    fn gate(&self, stats: &GateStats) {
        self.counters(&stats.counters);
        Metrics::add(self.store_failures_allowed, stats.store_failures_allowed);
        for kind in &stats.shadow_limited {
            let i = LimitKind::ALL.iter().position(|k| k == kind).unwrap_or(0);
            Metrics::bump(self.shadow_limited.get(i).copied().flatten());
        }
    }

    fn bump(id: Option<u32>) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn denied(&self, reason: Reason) {
        Metrics::bump(self.denied.get(reason as usize).copied().flatten());
    }
}

/// Shared-data key written at VM start; its CAS serves as the "absent CAS" (see
/// `keygate_core::ratelimit`).
const ANCHOR_KEY: &str = "kg:anchor";
/// Shared-data counter handing out VM identities for concurrency leases.
const VM_SEQ_KEY: &str = "kg:vmseq";

/// Per-VM state shared by the root context and every HTTP context of this VM.
struct VmState {
    anchor_cas: Cell<u32>,
    vm_id: Cell<u64>,
    /// Requests of each account (by concurrency store key) in flight on this VM.
    inflight: RefCell<HashMap<String, u32>>,
}

/// Envoy shared data as keygate-core's [`SharedStore`]; the anchor CAS lives in the VM state.
impl SharedStore for VmState {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(v), Some(cas))) => Ok(Some((v, cas))),
            Ok((Some(v), None)) => Ok(Some((v, 0))),
            Ok((None, _)) => Ok(None),
            Err(_) => Err(StoreError),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        match hostcalls::set_shared_data(key, Some(value), Some(cas)) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SetError::CasMismatch),
            Err(_) => Err(SetError::Other),
        }
    }

    fn absent_cas(&self) -> u32 {
        self.anchor_cas.get()
    }
}

impl VmState {
    fn start() -> VmState {
        let state = VmState {
            anchor_cas: Cell::new(0),
            vm_id: Cell::new(0),
            inflight: RefCell::new(HashMap::new()),
        };
        let _ = hostcalls::set_shared_data(ANCHOR_KEY, Some(b"1"), None);
        if let Ok((_, Some(cas))) = hostcalls::get_shared_data(ANCHOR_KEY) {
            state.anchor_cas.set(cas);
        }
        // Take the next VM identity with a CAS loop (insert-if-absent through the anchor CAS).
        let store = &state;
        for _ in 0..64 {
            let (next, cas) = match store.get(VM_SEQ_KEY) {
                Ok(Some((v, cas))) => {
                    let prev = <[u8; 8]>::try_from(v.as_slice())
                        .map(u64::from_le_bytes)
                        .unwrap_or(0);
                    (prev.wrapping_add(1), cas)
                }
                Ok(None) => (1, store.absent_cas()),
                Err(_) => break,
            };
            if store.set(VM_SEQ_KEY, &next.to_le_bytes(), cas).is_ok() {
                state.vm_id.set(next);
                break;
            }
        }
        state
    }
}

/// The gate's view of the host for one request.
struct RequestHost<'a> {
    vm: &'a VmState,
    now_us: u64,
    client_ip: OnceCell<Option<IpAddr>>,
}

impl Host for RequestHost<'_> {
    fn now_us(&self) -> u64 {
        self.now_us
    }

    fn client_ip(&self) -> Option<IpAddr> {
        *self.client_ip.get_or_init(client_ip)
    }

    fn store(&self) -> &dyn SharedStore {
        self.vm
    }

    fn vm_id(&self) -> u64 {
        self.vm.vm_id.get()
    }
}

#[derive(Default)]
pub struct KeygateRoot {
    config: Option<Rc<CompiledConfig>>,
    metrics: Option<Rc<Metrics>>,
    vm: Option<Rc<VmState>>,
}

impl KeygateRoot {
    fn metrics(&mut self) -> Rc<Metrics> {
        self.metrics
            .get_or_insert_with(|| Rc::new(Metrics::define()))
            .clone()
    }

    fn vm(&mut self) -> Rc<VmState> {
        self.vm
            .get_or_insert_with(|| Rc::new(VmState::start()))
            .clone()
    }
}

impl Context for KeygateRoot {}

impl RootContext for KeygateRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        let _ = self.vm();
        let _ = self.metrics();
        true
    }

    fn on_tick(&mut self) {
        // Refresh this VM's concurrency leases for accounts with requests in flight here.
        let (Some(vm), Some(cfg)) = (self.vm.clone(), self.config.clone()) else {
            return;
        };
        let host = RequestHost {
            vm: &vm,
            now_us: now_us(),
            client_ip: OnceCell::new(),
        };
        let mut counters = Counters::default();
        let keys: Vec<String> = vm
            .inflight
            .borrow()
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            gate::heartbeat(cfg.max_cas_retries(), &key, &host, &mut counters);
        }
        if let Some(m) = &self.metrics {
            m.counters(&counters);
        }
    }

    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let metrics = self.metrics();
        let _ = self.vm();
        let bytes = match hostcalls::get_buffer(
            BufferType::PluginConfiguration,
            0,
            plugin_configuration_size,
        ) {
            Ok(b) => b.unwrap_or_default(),
            Err(status) => {
                log(
                    LogLevel::Error,
                    &format!("cannot read plugin configuration: {status:?}"),
                );
                return false;
            }
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            log(
                LogLevel::Warn,
                "empty plugin configuration; every request gets 503 no_config",
            );
            return true;
        }
        match compile(&bytes) {
            Ok(cfg) => {
                let (accounts, keys, apis) = cfg.counts();
                log(
                    LogLevel::Info,
                    &format!(
                        "config version {} in force: {accounts} accounts, {keys} keys, {apis} apis",
                        cfg.version()
                    ),
                );
                Metrics::bump(metrics.config_loaded);
                if let Some(id) = metrics.config_version {
                    let _ = hostcalls::record_metric(id, cfg.version());
                }
                if cfg.uses_concurrency_limits() {
                    let _ =
                        hostcalls::set_tick_period(Duration::from_secs(gate::INFLIGHT_HEARTBEAT_S));
                }
                self.config = Some(Rc::new(cfg));
                true
            }
            Err(e) => {
                Metrics::bump(metrics.config_rejected);
                let kept = match &self.config {
                    Some(c) => format!("keeping version {}", c.version()),
                    None => "no config in force".to_owned(),
                };
                // ConfigError messages name paths and values from the document, never digests'
                // preimages (the document holds none).
                log(LogLevel::Error, &format!("config rejected: {e} ({kept})"));
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(KeygateHttp {
            config: self.config.clone(),
            metrics: self
                .metrics
                .clone()
                .unwrap_or_else(|| Rc::new(Metrics::default())),
            vm: self.vm.clone()?,
            ticket: None,
            quota: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct KeygateHttp {
    config: Option<Rc<CompiledConfig>>,
    metrics: Rc<Metrics>,
    vm: Rc<VmState>,
    /// A concurrency slot held until the stream ends.
    ticket: Option<InflightTicket>,
    /// Quota to report on the response, when configured.
    quota: Option<Quota>,
}

impl Context for KeygateHttp {}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
}

/// All request headers in proxy-wasm's serialized form, as bytes. The SDK's own getter decodes
/// names with `unwrap`; this one leaves every byte to the panic-free parser in keygate-core.
fn request_header_map() -> Vec<u8> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer to a buffer it allocated through this module's exported
    // allocator (proxy_on_memory_allocate) and its size; we take ownership of exactly that.
    unsafe {
        match proxy_get_header_map_pairs(MapType::HttpRequestHeaders, &mut data, &mut size) {
            Status::Ok if !data.is_null() => Vec::from_raw_parts(data, size, size),
            _ => Vec::new(),
        }
    }
}

fn now_us() -> u64 {
    // Without a clock every time-limited secret must fail closed: pretend it is the far future.
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(u64::MAX, |d| {
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
        })
}

fn client_ip() -> Option<IpAddr> {
    let bytes = hostcalls::get_property(vec!["source", "address"])
        .ok()
        .flatten()?;
    parse_client_address(&bytes)
}

impl KeygateHttp {
    fn deny(&self, denial: &Denial, www_authenticate: &[String]) -> Action {
        let reason = denial.reason;
        self.metrics.denied(reason);
        let body = reason.body();
        let mut headers: Vec<(&str, &str)> = vec![
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ];
        if reason.challenges() {
            headers.extend(
                www_authenticate
                    .iter()
                    .map(|v| ("www-authenticate", v.as_str())),
            );
        }
        let retry_after = match (reason, denial.retry_after_s) {
            (Reason::NoConfig, _) => Some(NO_CONFIG_RETRY_AFTER.to_owned()),
            (_, Some(s)) => Some(s.to_string()),
            _ => None,
        };
        if let Some(v) = &retry_after {
            headers.push(("retry-after", v));
        }
        let policy = denial.quota.as_ref().map(gate::ratelimit_headers);
        if let Some((p, r)) = &policy {
            headers.push(("ratelimit-policy", p));
            headers.push(("ratelimit", r));
        }
        if let Err(status) =
            hostcalls::send_http_response(reason.status(), headers, Some(body.as_bytes()))
        {
            log(
                LogLevel::Error,
                &format!("cannot send local reply: {status:?}"),
            );
            let _ = hostcalls::reset_http_request();
        }
        Action::Pause
    }

    /// Sets identity headers (replacing client copies), removes client copies of unset ones and,
    /// unless configured otherwise, the `Authorization` header.
    fn forward(
        &self,
        cfg: &CompiledConfig,
        pairs: &[(&[u8], &[u8])],
        identity: Option<Identity<'_>>,
    ) {
        let names = cfg.identity_headers();
        let values: [Option<&str>; 4] = match identity {
            Some(id) => [Some(id.account_sid), id.key_sid, Some(id.role), id.api],
            None => [None; 4],
        };
        for (name, value) in names.iter().zip(values) {
            match value {
                Some(v) => {
                    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(v));
                }
                None if has_header(pairs, name.as_bytes()) => {
                    let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
                }
                None => {}
            }
        }
        if !cfg.forward_authorization() && has_header(pairs, b"authorization") {
            let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, "authorization");
        }
        if let Some(id) = identity {
            let _ = hostcalls::set_property(
                vec!["keygate.account_sid"],
                Some(id.account_sid.as_bytes()),
            );
            if let Some(key) = id.key_sid {
                let _ = hostcalls::set_property(vec!["keygate.key_sid"], Some(key.as_bytes()));
            }
        }
    }
}

fn has_header(pairs: &[(&[u8], &[u8])], name: &[u8]) -> bool {
    pairs.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
}

impl HttpContext for KeygateHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(cfg) = self.config.clone() else {
            return self.deny(
                &Denial {
                    reason: Reason::NoConfig,
                    retry_after_s: None,
                    quota: None,
                },
                &[],
            );
        };
        let raw = request_header_map();
        let pairs = parse_header_map(&raw).unwrap_or_default();
        let head = RequestHead::from_pairs(&pairs);
        let host = RequestHost {
            vm: &self.vm,
            now_us: now_us(),
            client_ip: OnceCell::new(),
        };
        let mut stats = GateStats::default();
        let verdict = gate::evaluate(&cfg, &head, &host, &mut stats);
        self.metrics.gate(&stats);
        match verdict {
            Verdict::Deny(denial) => self.deny(&denial, cfg.www_authenticate()),
            Verdict::Allow {
                allow,
                quota,
                inflight,
            } => {
                self.forward(&cfg, &pairs, allow.identity());
                if let Some(ticket) = inflight {
                    *self
                        .vm
                        .inflight
                        .borrow_mut()
                        .entry(ticket.store_key.clone())
                        .or_insert(0) += 1;
                    self.ticket = Some(ticket);
                }
                self.quota = quota;
                Metrics::bump(self.metrics.allowed);
                Action::Continue
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(q) = &self.quota {
            let (policy, state) = gate::ratelimit_headers(q);
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                "ratelimit-policy",
                Some(&policy),
            );
            let _ =
                hostcalls::set_map_value(MapType::HttpResponseHeaders, "ratelimit", Some(&state));
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // The stream is over, however it ended: give the concurrency slot back.
        if let (Some(ticket), Some(cfg)) = (self.ticket.take(), self.config.as_ref()) {
            let host = RequestHost {
                vm: &self.vm,
                now_us: now_us(),
                client_ip: OnceCell::new(),
            };
            let mut counters = Counters::default();
            gate::release(cfg.max_cas_retries(), &ticket, &host, &mut counters);
            self.metrics.counters(&counters);
            if let Some(n) = self.vm.inflight.borrow_mut().get_mut(&ticket.store_key) {
                *n = n.saturating_sub(1);
            }
        }
    }
}
