//! Fuzz target `cidr`: the property is `keygate_core::props::cidr`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    keygate_core::props::cidr(data);
});
