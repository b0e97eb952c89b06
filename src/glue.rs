//! Root and HTTP contexts: host calls in, [`keygate_core::decide`] in the middle, host calls out.

use std::net::IpAddr;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use keygate_core::headers::parse_header_map;
use keygate_core::ip::parse_client_address;
use keygate_core::{compile, decide, CompiledConfig, Decision, Identity, Reason, RequestHead};
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
}

impl Metrics {
    fn define() -> Metrics {
        let counter = |name: &str| hostcalls::define_metric(MetricType::Counter, name).ok();
        let mut m = Metrics {
            allowed: counter("keygate.allowed"),
            config_loaded: counter("keygate.config.loaded"),
            config_rejected: counter("keygate.config.rejected"),
            config_version: hostcalls::define_metric(MetricType::Gauge, "keygate.config.version").ok(),
            ..Metrics::default()
        };
        for (slot, reason) in m.denied.iter_mut().zip(Reason::ALL) {
            *slot = counter(&format!("keygate.denied.{}", reason.code()));
        }
        m
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

#[derive(Default)]
pub struct KeygateRoot {
    config: Option<Rc<CompiledConfig>>,
    metrics: Option<Rc<Metrics>>,
}

impl KeygateRoot {
    fn metrics(&mut self) -> Rc<Metrics> {
        self.metrics.get_or_insert_with(|| Rc::new(Metrics::define())).clone()
    }
}

impl Context for KeygateRoot {}

impl RootContext for KeygateRoot {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let metrics = self.metrics();
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, plugin_configuration_size) {
            Ok(b) => b.unwrap_or_default(),
            Err(status) => {
                log(LogLevel::Error, &format!("cannot read plugin configuration: {status:?}"));
                return false;
            }
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            log(LogLevel::Warn, "empty plugin configuration; every request gets 503 no_config");
            return true;
        }
        match compile(&bytes) {
            Ok(cfg) => {
                let (accounts, keys, apis) = cfg.counts();
                log(
                    LogLevel::Info,
                    &format!("config version {} in force: {accounts} accounts, {keys} keys, {apis} apis", cfg.version()),
                );
                Metrics::bump(metrics.config_loaded);
                if let Some(id) = metrics.config_version {
                    let _ = hostcalls::record_metric(id, cfg.version());
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
            metrics: self.metrics.clone().unwrap_or_else(|| Rc::new(Metrics::default())),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct KeygateHttp {
    config: Option<Rc<CompiledConfig>>,
    metrics: Rc<Metrics>,
}

impl Context for KeygateHttp {}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(map_type: MapType, return_map_data: *mut *mut u8, return_map_size: *mut usize) -> Status;
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

fn now_unix() -> u64 {
    // Without a clock every time-limited secret must fail closed: pretend it is the far future.
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(u64::MAX, |d| d.as_secs())
}

fn client_ip() -> Option<IpAddr> {
    let bytes = hostcalls::get_property(vec!["source", "address"]).ok().flatten()?;
    parse_client_address(&bytes)
}

impl KeygateHttp {
    fn deny(&self, reason: Reason, www_authenticate: &[String]) -> Action {
        self.metrics.denied(reason);
        let body = reason.body();
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json"), ("cache-control", "no-store")];
        if reason.challenges() {
            headers.extend(www_authenticate.iter().map(|v| ("www-authenticate", v.as_str())));
        }
        if reason == Reason::NoConfig {
            headers.push(("retry-after", NO_CONFIG_RETRY_AFTER));
        }
        if let Err(status) = hostcalls::send_http_response(reason.status(), headers, Some(body.as_bytes())) {
            log(LogLevel::Error, &format!("cannot send local reply: {status:?}"));
            let _ = hostcalls::reset_http_request();
        }
        Action::Pause
    }

    /// Sets identity headers (replacing client copies), removes client copies of unset ones and,
    /// unless configured otherwise, the `Authorization` header.
    fn forward(&self, cfg: &CompiledConfig, pairs: &[(&[u8], &[u8])], identity: Option<Identity<'_>>) {
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
            let _ = hostcalls::set_property(vec!["keygate.account_sid"], Some(id.account_sid.as_bytes()));
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
            return self.deny(Reason::NoConfig, &[]);
        };
        let raw = request_header_map();
        let pairs = parse_header_map(&raw).unwrap_or_default();
        let head = RequestHead::from_pairs(&pairs);
        match decide(&cfg, &head, now_unix(), &mut client_ip) {
            Decision::Deny(reason) => self.deny(reason, cfg.www_authenticate()),
            Decision::Allow(allow) => {
                self.forward(&cfg, &pairs, allow.identity);
                Metrics::bump(self.metrics.allowed);
                Action::Continue
            }
        }
    }
}
