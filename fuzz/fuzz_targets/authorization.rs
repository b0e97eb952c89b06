//! Fuzz target `authorization`: the property is `keygate_core::props::authorization`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    keygate_core::props::authorization(data);
});
