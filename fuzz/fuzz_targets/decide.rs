//! Fuzz target `decide`: the property is `keygate_core::props::decide_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    keygate_core::props::decide_request(data);
});
