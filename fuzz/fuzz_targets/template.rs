//! Fuzz target `template`: the property is `keygate_core::props::template`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    keygate_core::props::template(data);
});
