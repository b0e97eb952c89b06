//! Fuzz target `path`: the property is `keygate_core::props::path`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    keygate_core::props::path(data);
});
