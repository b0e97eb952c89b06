//! Fuzz target `changes_page`: the property is `keygate_core::props::changes_page` (the edge's
//! change-feed page parser and check, as the answer to a first publication's request).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    keygate_core::props::changes_page(data);
});
