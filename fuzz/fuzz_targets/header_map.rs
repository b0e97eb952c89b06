//! Fuzz target `header_map`: the property is `keygate_core::props::header_map`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    keygate_core::props::header_map(data);
});
