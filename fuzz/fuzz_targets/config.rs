//! Fuzz target `config`: the property is `keygate_core::props::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    keygate_core::props::config(data);
});
