//! The floor of any proxy-wasm HTTP filter, for `make bench`: one host call that reads the
//! `Authorization` request header as bytes, then `Continue`. Same SDK (proxy-wasm 0.2.5), same
//! release profile and same runtime (v8) as keygate, so the difference between this and bare
//! Envoy is what any wasm filter pays before doing anything.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(FloorRoot) });
}}

struct FloorRoot;

impl Context for FloorRoot {}

impl RootContext for FloorRoot {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Floor))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Floor;

impl Context for Floor {}

impl HttpContext for Floor {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Read the header (bytes, so no UTF-8 unwrap) and keep the result observable.
        let seen = self
            .get_http_request_header_bytes("authorization")
            .is_some();
        std::hint::black_box(seen);
        Action::Continue
    }
}
