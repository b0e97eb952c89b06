//! The host-call ladder, for `make bench-ladder`: the wasm floor (one read of the `Authorization`
//! request header) plus `n` host calls of one kind per request, then `Continue`. Measured at
//! n = 0, 1, 2, 4, 8 (or a taller ladder), the slope of Envoy's CPU per request against n is what one call of that kind
//! costs on this Envoy. Same SDK (proxy-wasm 0.2.5), release profile and runtime (v8) as keygate
//! and the floor filter.
//!
//! Plugin configuration: `{"call": "<kind>", "n": <n>}` (kinds: [`Kind::parse`]). Each kind is a
//! call keygate's request path makes (src/host.rs, src/request.rs, src/metrics.rs and the rate
//! limiter in keygate-core); every result goes through `black_box`. Names, keys and values are
//! made once at configuration, so a request spends its time in the host calls.

use std::hint::black_box;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType, Status};

/// The most calls a request makes.
const MAX_N: usize = 64;

/// A 13-byte shared-data value, the size of a rate record with one entry.
const RECORD: &[u8; 13] = b"\x01\x00\x00\x00\x00\x01\x02\x03\x04\x05\x06\x07\x08";

/// A filter-state value the size of a SID.
const SID: &str = "SK0123456789abcdef0123456789abcdef";

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(LadderRoot::default()) });
}}

/// One rung's kind of host call.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Nothing beyond the floor's `Authorization` read.
    None,
    /// `get_http_request_header` of `:path`.
    Header,
    /// `proxy_get_header_map_pairs` of the whole request map (as keygate reads it).
    HeaderMap,
    /// `get_property(source.address)`.
    Property,
    /// `get_current_time`.
    Clock,
    /// `get_shared_data` of a 13-byte record, a key per call.
    SharedGet,
    /// `get_shared_data` then `set_shared_data` with its CAS, a key per call (a rate take).
    SharedGetCas,
    /// `add_http_request_header`, a distinct name per call.
    HeaderAdd,
    /// `set_map_bytes` of the whole request map plus one header (the map is read once per
    /// request for every n, so n = 0 of this kind is the floor plus one `HeaderMap`).
    HeaderMapSet,
    /// `remove_http_request_header` of a name the request does not carry, a distinct one per call.
    HeaderRemove,
    /// `set_property` of filter state `keygate.x<i>` (a SID-sized value).
    SetProperty,
    /// `increment_metric` on a counter defined when the plugin is configured.
    Metric,
    /// `log` at debug, below Envoy's level (`-l warning`), so the host drops it.
    LogDebug,
}

impl Kind {
    fn parse(name: &str) -> Option<Kind> {
        Some(match name {
            "none" => Kind::None,
            "header" => Kind::Header,
            "header_map" => Kind::HeaderMap,
            "property" => Kind::Property,
            "clock" => Kind::Clock,
            "shared_get" => Kind::SharedGet,
            "shared_get_cas" => Kind::SharedGetCas,
            "header_add" => Kind::HeaderAdd,
            "header_map_set" => Kind::HeaderMapSet,
            "header_remove" => Kind::HeaderRemove,
            "set_property" => Kind::SetProperty,
            "metric" => Kind::Metric,
            "log_debug" => Kind::LogDebug,
            _ => return None,
        })
    }
}

/// What every request of this plugin does, made once at configuration.
#[derive(Clone)]
struct Plan {
    kind: Kind,
    n: usize,
    /// Per-call names: shared-data keys, header names or filter-state names, as the kind needs.
    names: Vec<String>,
    metric: Option<u32>,
}

#[derive(Default)]
struct LadderRoot {
    plan: Option<Plan>,
}

impl Context for LadderRoot {}

impl RootContext for LadderRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = self.get_plugin_configuration() else {
            return fail("no plugin configuration");
        };
        let Some((kind, n)) = parse_config(&config) else {
            return fail(r#"configuration is not {"call": "<kind>", "n": 0..64}"#);
        };
        let names: Vec<String> = (0..n)
            .map(|i| match kind {
                Kind::SharedGet => format!("ladder:get:{i}"),
                Kind::SharedGetCas => format!("ladder:cas:{i}"),
                Kind::HeaderAdd => format!("x-ladder-add-{i}"),
                Kind::HeaderMapSet => format!("x-ladder-set-{i}"),
                Kind::HeaderRemove => format!("x-ladder-absent-{i}"),
                Kind::SetProperty => format!("keygate.x{i}"),
                _ => String::new(),
            })
            .collect();
        if kind == Kind::SharedGet {
            for key in &names {
                if hostcalls::set_shared_data(key, Some(RECORD), None).is_err() {
                    return fail("cannot write shared data");
                }
            }
        }
        let metric = match kind {
            Kind::Metric => match hostcalls::define_metric(MetricType::Counter, "ladder.calls") {
                Ok(id) => Some(id),
                Err(_) => return fail("cannot define the metric"),
            },
            _ => None,
        };
        self.plan = Some(Plan {
            kind,
            n,
            names,
            metric,
        });
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Ladder {
            plan: self.plan.clone()?,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn fail(msg: &str) -> bool {
    let _ = hostcalls::log(LogLevel::Error, &format!("ladder: {msg}"));
    false
}

/// `{"call": "<kind>", "n": <n>}`, read without a JSON library (the configuration is ours).
fn parse_config(bytes: &[u8]) -> Option<(Kind, usize)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let after = |field: &str| -> Option<&str> {
        let rest = &text[text.find(&format!("\"{field}\""))? + field.len() + 2..];
        Some(rest.trim_start().strip_prefix(':')?.trim_start())
    };
    let call = after("call")?.strip_prefix('"')?;
    let kind = Kind::parse(&call[..call.find('"')?])?;
    let n_text = after("n")?;
    let digits = n_text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(n_text.len());
    let n: usize = n_text[..digits].parse().ok()?;
    (n <= MAX_N).then_some((kind, n))
}

struct Ladder {
    plan: Plan,
}

impl Context for Ladder {}

impl HttpContext for Ladder {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // The floor: read the header (bytes, so no UTF-8 unwrap) and keep the result observable.
        let seen = self
            .get_http_request_header_bytes("authorization")
            .is_some();
        black_box(seen);
        let plan = &self.plan;
        let request = MapType::HttpRequestHeaders;
        match plan.kind {
            Kind::None => {}
            Kind::Header => {
                for _ in 0..plan.n {
                    black_box(hostcalls::get_map_value_bytes(request, ":path").ok());
                }
            }
            Kind::HeaderMap => {
                for _ in 0..plan.n {
                    black_box(header_map(request).len());
                }
            }
            Kind::Property => {
                for _ in 0..plan.n {
                    black_box(hostcalls::get_property(vec!["source", "address"]).ok());
                }
            }
            Kind::Clock => {
                for _ in 0..plan.n {
                    black_box(hostcalls::get_current_time().ok());
                }
            }
            Kind::SharedGet => {
                for key in &plan.names {
                    black_box(hostcalls::get_shared_data(key).ok());
                }
            }
            Kind::SharedGetCas => {
                for key in &plan.names {
                    // Absent on the first request: the write without a CAS inserts it.
                    let cas = match hostcalls::get_shared_data(key) {
                        Ok((_, cas)) => cas,
                        Err(_) => None,
                    };
                    black_box(hostcalls::set_shared_data(key, Some(RECORD), cas).ok());
                }
            }
            Kind::HeaderAdd => {
                for name in &plan.names {
                    black_box(hostcalls::add_map_value(request, name, "1").ok());
                }
            }
            Kind::HeaderMapSet => {
                let map = hostcalls::get_map_bytes(request).unwrap_or_default();
                for name in &plan.names {
                    let mut pairs: Vec<(&str, &[u8])> = map
                        .iter()
                        .map(|(n, v)| (n.as_str(), v.as_slice()))
                        .collect();
                    pairs.push((name.as_str(), b"1"));
                    black_box(hostcalls::set_map_bytes(request, pairs).ok());
                }
                black_box(map.len());
            }
            Kind::HeaderRemove => {
                for name in &plan.names {
                    black_box(hostcalls::remove_map_value(request, name).ok());
                }
            }
            Kind::SetProperty => {
                for name in &plan.names {
                    let path = vec![name.as_str()];
                    black_box(hostcalls::set_property(path, Some(SID.as_bytes())).ok());
                }
            }
            Kind::Metric => {
                if let Some(id) = plan.metric {
                    for _ in 0..plan.n {
                        black_box(hostcalls::increment_metric(id, 1).ok());
                    }
                }
            }
            Kind::LogDebug => {
                for _ in 0..plan.n {
                    let line = "ladder: a debug line below Envoy's log level";
                    black_box(hostcalls::log(LogLevel::Debug, line).ok());
                }
            }
        }
        Action::Continue
    }
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
}

/// The whole header map in proxy-wasm's serialized form, the way keygate's `host::header_map`
/// reads it (one host call, the bytes left undecoded).
fn header_map(map: MapType) -> Vec<u8> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer to a buffer it allocated through this module's exported
    // allocator (proxy_on_memory_allocate) and its size; we take ownership of exactly that.
    unsafe {
        match proxy_get_header_map_pairs(map, &mut data, &mut size) {
            Status::Ok if !data.is_null() => Vec::from_raw_parts(data, size, size),
            _ => Vec::new(),
        }
    }
}
