//! Root and HTTP contexts: host calls in, [`keygate_core::gate`] in the middle, host calls out.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use keygate_core::compile::Catalog;
use keygate_core::gate::{self, Denial, GateStats, InflightTicket, Verdict};
use keygate_core::headers::{forwarded_headers, is_identity_lookalike, parse_header_map};
use keygate_core::plugin::{parse_plugin_config, ControlPlane, OnStale, PluginConfig};
use keygate_core::published::{load_catalog, read_head, Head, RecordCache, SharedDirectory};
use keygate_core::ratelimit::{Counters, Quota};
use keygate_core::{CompiledConfig, Identity, Reason, RequestHead};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

use crate::host::{header_map, now_us, RequestHost, VmState};
use crate::metrics::Metrics;
use crate::poller::Poller;

/// Seconds a client is told to wait when no config is in force.
const NO_CONFIG_RETRY_AFTER: &str = "5";

fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

/// Control-plane mode: the source, and this VM's compiled view of the published version.
struct Published {
    source: ControlPlane,
    /// The catalogue of the version this VM last judged with.
    catalog: RefCell<Option<(u64, Arc<Catalog>)>>,
    /// Compiled keys and accounts of that version (bounded).
    cache: RefCell<RecordCache>,
}

impl Published {
    /// The catalogue of the head's version, compiled once per version per VM.
    fn catalog(&self, vm: &VmState, head: &Head, metrics: &Metrics) -> Option<Arc<Catalog>> {
        let version = head.version;
        if let Some((v, c)) = &*self.catalog.borrow() {
            if *v == version {
                return Some(c.clone());
            }
        }
        let c = Arc::new(load_catalog(vm, head)?);
        *self.catalog.borrow_mut() = Some((version, c.clone()));
        Metrics::set(metrics.config_version, version);
        Some(c)
    }
}

/// Where this plugin's config comes from.
#[derive(Clone, Default)]
enum Source {
    #[default]
    None,
    Static(Rc<CompiledConfig>),
    ControlPlane(Rc<Published>),
}

#[derive(Default)]
pub struct KeygateRoot {
    source: Source,
    metrics: Option<Rc<Metrics>>,
    vm: Option<Rc<VmState>>,
    poller: Poller,
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

    fn max_cas_retries(&self, vm: &VmState) -> u32 {
        match &self.source {
            Source::Static(c) => c.max_cas_retries(),
            Source::ControlPlane(p) => p
                .catalog
                .borrow()
                .as_ref()
                .map(|(_, c)| c.max_cas_retries())
                .or_else(|| {
                    read_head(vm)
                        .and_then(|h| load_catalog(vm, &h))
                        .map(|c| c.max_cas_retries())
                })
                .unwrap_or(16),
            Source::None => 16,
        }
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
        let (Some(vm), Some(metrics)) = (self.vm.clone(), self.metrics.clone()) else {
            return;
        };
        // Then long-poll again right away (tick() does nothing while backing off).
        if let Source::ControlPlane(p) = &self.source {
            let source = p.source.clone();
            self.poller
                .response(&vm, &source, token_id, body_size, &metrics);
            self.poller.tick(&vm, &source, &metrics);
        }
    }
}

impl RootContext for KeygateRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        let _ = self.vm();
        let _ = self.metrics();
        true
    }

    fn on_tick(&mut self) {
        let (Some(vm), Some(metrics)) = (self.vm.clone(), self.metrics.clone()) else {
            return;
        };
        if let Source::ControlPlane(p) = &self.source {
            let source = p.source.clone();
            self.poller.check_pending(&vm, &source, &metrics);
            self.poller.tick(&vm, &source, &metrics);
        }
        // Refresh this VM's concurrency leases for accounts with requests in flight here.
        let keys: Vec<String> = vm
            .inflight
            .borrow()
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            return;
        }
        let retries = self.max_cas_retries(&vm);
        let host = RequestHost::new(&vm);
        let mut counters = Counters::default();
        for key in keys {
            gate::heartbeat(retries, &key, &host, &mut counters);
        }
        metrics.counters(&counters);
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
        match parse_plugin_config(&bytes) {
            Ok(PluginConfig::Static(cfg)) => {
                let (accounts, keys, apis) = cfg.counts();
                log(
                    LogLevel::Info,
                    &format!(
                        "config version {} in force: {accounts} accounts, {keys} keys, {apis} apis",
                        cfg.version()
                    ),
                );
                Metrics::bump(metrics.config_loaded);
                Metrics::set(metrics.config_version, cfg.version());
                if cfg.uses_concurrency_limits() {
                    let _ =
                        hostcalls::set_tick_period(Duration::from_secs(gate::INFLIGHT_HEARTBEAT_S));
                }
                self.source = Source::Static(Rc::new(*cfg));
                true
            }
            Ok(PluginConfig::ControlPlane(cp)) => {
                // Never log the token.
                log(
                    LogLevel::Info,
                    &format!(
                        "control-plane mode: feed {}{} on cluster {:?}, long-poll {} s",
                        cp.authority, cp.path, cp.cluster, cp.wait_s
                    ),
                );
                Metrics::bump(metrics.config_loaded);
                // Ticks drive the poller election, fetch retries and lease heartbeats.
                let _ = hostcalls::set_tick_period(Duration::from_millis(crate::poller::TICK_MS));
                self.source = Source::ControlPlane(Rc::new(Published {
                    source: cp,
                    catalog: RefCell::new(None),
                    cache: RefCell::new(RecordCache::default()),
                }));
                true
            }
            Err(e) => {
                Metrics::bump(metrics.config_rejected);
                let kept = match &self.source {
                    Source::Static(c) => format!("keeping version {}", c.version()),
                    Source::ControlPlane(_) => "keeping the control-plane source".to_owned(),
                    Source::None => "no config in force".to_owned(),
                };
                // ConfigError messages name paths and values from the document, never digests'
                // preimages (the document holds none) nor the edge token.
                log(LogLevel::Error, &format!("config rejected: {e} ({kept})"));
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(KeygateHttp {
            source: self.source.clone(),
            metrics: self
                .metrics
                .clone()
                .unwrap_or_else(|| Rc::new(Metrics::default())),
            vm: self.vm.clone()?,
            ticket: None,
            quota: None,
            max_cas_retries: 16,
            version_header: None,
            judged_by: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct KeygateHttp {
    source: Source,
    metrics: Rc<Metrics>,
    vm: Rc<VmState>,
    /// A concurrency slot held until the stream ends.
    ticket: Option<InflightTicket>,
    max_cas_retries: u32,
    /// Quota to report on the response, when configured.
    quota: Option<Quota>,
    /// `x-keygate-config-version` for the response, when enabled and the request's credential
    /// authenticated.
    version_header: Option<String>,
    /// Control-plane mode: the catalogue that judged the request (its identity header names are
    /// stripped from request trailers too).
    judged_by: Option<Arc<Catalog>>,
}

impl Context for KeygateHttp {}

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
            (Reason::NoConfig | Reason::ConfigStale, _) => Some(NO_CONFIG_RETRY_AFTER.to_owned()),
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
        if let Some(v) = &self.version_header {
            headers.push(("x-keygate-config-version", v));
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

    fn deny_plain(&self, reason: Reason) -> Action {
        self.deny(
            &Denial {
                reason,
                retry_after_s: None,
                quota: None,
            },
            &[],
        )
    }

    /// Sets identity headers (replacing client copies), removes client copies of unset ones and
    /// of `_` look-alikes and, unless configured otherwise, the `Authorization` header: one
    /// whole-map write (one host call and one route-cache clear instead of one per header).
    fn forward(&self, cat: &Catalog, pairs: &[(&[u8], &[u8])], identity: Option<Identity<'_>>) {
        let names = cat.identity_headers();
        let values: [Option<&str>; 4] = match identity {
            Some(id) => [Some(id.account_sid), id.key_sid, Some(id.role), id.api],
            None => [None; 4],
        };
        let out = forwarded_headers(pairs, names, values, cat.forward_authorization());
        let changed = out.len() != pairs.len() || out.iter().zip(pairs).any(|(a, b)| a != b);
        if changed {
            // Envoy validated every header name, so each is a token (ASCII).
            let map: Option<Vec<(&str, &[u8])>> = out
                .iter()
                .map(|(n, v)| std::str::from_utf8(n).ok().map(|n| (n, *v)))
                .collect();
            match map {
                Some(map) => {
                    let _ = hostcalls::set_map_bytes(MapType::HttpRequestHeaders, map);
                }
                None => self.forward_header_by_header(cat, pairs, values),
            }
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

    /// [`Self::forward`]'s edits one host call each (for a map the whole-map write cannot
    /// carry: a header name that is not UTF-8).
    fn forward_header_by_header(
        &self,
        cat: &Catalog,
        pairs: &[(&[u8], &[u8])],
        values: [Option<&str>; 4],
    ) {
        for (name, value) in cat.identity_headers().iter().zip(values) {
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
        strip_lookalikes(cat, pairs);
        if !cat.forward_authorization() && has_header(pairs, b"authorization") {
            let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, "authorization");
        }
    }

    /// Runs the gate and acts on its verdict. `version` is the `x-keygate-config-version` value
    /// when enabled: it goes only on replies to requests whose credential authenticated (an
    /// unauthenticated client learns nothing about the deployment).
    fn judge(
        &mut self,
        cat: &Catalog,
        dir: &dyn keygate_core::Directory,
        pairs: &[(&[u8], &[u8])],
        now_us: u64,
        version: Option<String>,
    ) -> Action {
        let head = RequestHead::from_pairs(pairs);
        let host = RequestHost::at(&self.vm, now_us);
        let mut stats = GateStats::default();
        let verdict = gate::evaluate_in(cat, dir, &head, &host, &mut stats);
        self.metrics.gate(&stats);
        self.max_cas_retries = cat.max_cas_retries();
        match verdict {
            Verdict::Deny(denial) => {
                // The request stops here, but access logs and later filters still see its
                // headers: never leave a client-chosen identity on it.
                strip_client_identity(cat, pairs);
                if denial.authenticated() {
                    self.version_header = version;
                }
                self.deny(&denial, cat.www_authenticate())
            }
            Verdict::Allow {
                allow,
                quota,
                inflight,
            } => {
                let identity = allow.identity();
                // A CORS preflight passed without credentials has no identity.
                if identity.is_some() {
                    self.version_header = version;
                }
                self.forward(cat, pairs, identity);
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
}

fn has_header(pairs: &[(&[u8], &[u8])], name: &[u8]) -> bool {
    pairs.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
}

/// Removes client-sent copies of every identity header (on denials).
fn strip_client_identity(cat: &Catalog, pairs: &[(&[u8], &[u8])]) {
    for name in cat.identity_headers() {
        if has_header(pairs, name.as_bytes()) {
            let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
        }
    }
    strip_lookalikes(cat, pairs);
}

/// Removes client-sent identity headers and their `_` look-alikes from the request trailers
/// (an upstream that merges trailers into headers must not see a client-chosen identity), and an
/// `Authorization` trailer unless `forward_authorization` is on.
fn strip_identity_trailers(cat: &Catalog) {
    let raw = header_map(MapType::HttpRequestTrailers);
    let pairs = parse_header_map(&raw).unwrap_or_default();
    let names = cat.identity_headers();
    for (name, _) in pairs {
        let identity = names
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
            || is_identity_lookalike(name, names);
        // A credential sent as a trailer goes no further than one sent as a header.
        let credential =
            !cat.forward_authorization() && name.eq_ignore_ascii_case(b"authorization");
        if identity || credential {
            if let Ok(n) = std::str::from_utf8(name) {
                let _ = hostcalls::remove_map_value(MapType::HttpRequestTrailers, n);
            }
        }
    }
}

/// Removes headers that spell an identity header with `_` for `-` (`x_keygate_key_sid`).
fn strip_lookalikes(cat: &Catalog, pairs: &[(&[u8], &[u8])]) {
    for (name, _) in pairs {
        if is_identity_lookalike(name, cat.identity_headers()) {
            if let Ok(n) = std::str::from_utf8(name) {
                let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, n);
            }
        }
    }
}

impl HttpContext for KeygateHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let raw = header_map(MapType::HttpRequestHeaders);
        let pairs = parse_header_map(&raw).unwrap_or_default();
        match self.source.clone() {
            Source::None => self.deny_plain(Reason::NoConfig),
            Source::Static(cfg) => self.judge(&cfg.catalog, &cfg.directory, &pairs, now_us(), None),
            Source::ControlPlane(p) => {
                let vm = self.vm.clone();
                let Some(head) = read_head(&*vm) else {
                    return self.deny_plain(Reason::NoConfig);
                };
                let version = p
                    .source
                    .debug_version_header
                    .then(|| head.version.to_string());
                // One clock read serves the staleness check and the gate.
                let now = now_us();
                if p.source.is_stale(now / 1_000_000, head.contacted_at_s) {
                    match p.source.on_stale {
                        OnStale::Deny => return self.deny_plain(Reason::ConfigStale),
                        OnStale::Serve => Metrics::bump(self.metrics.config_stale_served),
                    }
                }
                let Some(catalog) = p.catalog(&vm, &head, &self.metrics) else {
                    return self.deny_plain(Reason::NoConfig);
                };
                let dir = SharedDirectory {
                    store: &*vm,
                    head,
                    catalog: &catalog,
                    cache: &p.cache,
                };
                let action = self.judge(&catalog, &dir, &pairs, now, version);
                self.judged_by = Some(catalog);
                action
            }
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        match (&self.source, &self.judged_by) {
            (Source::Static(cfg), _) => strip_identity_trailers(&cfg.catalog),
            (Source::ControlPlane(_), Some(cat)) => strip_identity_trailers(cat),
            _ => {}
        }
        Action::Continue
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
        if let Some(v) = &self.version_header {
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                "x-keygate-config-version",
                Some(v),
            );
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // The stream is over, however it ended: give the concurrency slot back.
        if let Some(ticket) = self.ticket.take() {
            let host = RequestHost::new(&self.vm);
            let mut counters = Counters::default();
            gate::release(self.max_cas_retries, &ticket, &host, &mut counters);
            self.metrics.counters(&counters);
            if let Some(n) = self.vm.inflight.borrow_mut().get_mut(&ticket.store_key) {
                *n = n.saturating_sub(1);
            }
        }
    }
}
